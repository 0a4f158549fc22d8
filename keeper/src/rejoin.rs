//! How a node becomes a standby of the current primary again: a pure decision
//! between streaming from where it stopped, pg_rewind, and a fresh
//! pg_basebackup, from what the node's WAL and the primary's timeline history
//! say. The keeper gathers the facts and carries the plan out
//! ([`crate::keeper`]); no I/O happens here.
//!
//! A node whose WAL is a prefix of the primary's history needs neither rewind
//! nor copy: it restarts in recovery and streams (the primary's replication
//! slot keeps the WAL it misses). Only a node with WAL the primary's history
//! does not hold, because it was a primary or followed one that lost, needs
//! pg_rewind. A base backup is the last resort: no data directory, or
//! pg_rewind failed.

use std::fmt;

use hapg_monitor::pgconn::{format_lsn, parse_lsn};

/// A timeline id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timeline(pub u32);

impl fmt::Display for Timeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A WAL position (bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_lsn(self.0))
    }
}

/// What the node's own data directory last was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalRole {
    /// In recovery (running, crashed or shut down): it only holds WAL it received.
    Standby,
    /// Out of recovery at some point on its timeline: it may hold WAL of its own.
    Primary,
}

/// The node's WAL as far as it is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalWal {
    /// Standby or primary.
    pub role: LocalRole,
    /// The timeline its WAL ends on.
    pub tli: Timeline,
    /// Where its WAL ends (for a stopped node, the control file's knowledge:
    /// a lower bound when it crashed).
    pub end: Lsn,
}

/// One line of a timeline history file: `tli` was left at `switch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switch {
    /// The ancestor timeline.
    pub tli: Timeline,
    /// The first position that is no longer on it.
    pub switch: Lsn,
}

/// The primary's timeline and the history that led to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrimaryHistory {
    /// Its current timeline.
    pub tli: Timeline,
    /// Its ancestors, oldest first (the history file of `tli`; empty on timeline 1).
    pub ancestors: Vec<Switch>,
}

impl PrimaryHistory {
    /// Parses a timeline history file (`<parent tli> <switch lsn> <reason>` lines).
    pub fn parse(tli: Timeline, text: &str) -> PrimaryHistory {
        let ancestors = text
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let parent = fields.next()?.parse().ok()?;
                let switch = parse_lsn(fields.next()?)?;
                Some(Switch {
                    tli: Timeline(parent),
                    switch: Lsn(switch),
                })
            })
            .collect();
        PrimaryHistory { tli, ancestors }
    }

    fn switch_off(&self, tli: Timeline) -> Option<Lsn> {
        self.ancestors
            .iter()
            .find(|s| s.tli == tli)
            .map(|s| s.switch)
    }
}

/// What already failed in this attempt to rejoin (the keeper escalates).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failed {
    /// Nothing yet.
    Nothing,
    /// Restarted in recovery, it did not stream: the message says what Postgres said.
    Streaming(String),
    /// pg_rewind failed with this message.
    Rewind(String),
}

/// How the node rejoins, with the reason the keeper logs and records as an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejoin {
    /// Restart (or stay) in recovery and stream from the primary.
    Stream(String),
    /// pg_rewind from the primary, then stream.
    Rewind(String),
    /// A fresh pg_basebackup (last resort).
    BaseBackup(String),
}

impl Rejoin {
    /// The reason, for logs and events.
    pub fn reason(&self) -> &str {
        match self {
            Rejoin::Stream(r) | Rejoin::Rewind(r) | Rejoin::BaseBackup(r) => r,
        }
    }

    /// The method, as a word.
    pub fn method(&self) -> &'static str {
        match self {
            Rejoin::Stream(_) => "streaming",
            Rejoin::Rewind(_) => "pg_rewind",
            Rejoin::BaseBackup(_) => "pg_basebackup",
        }
    }
}

/// Decides how a node with `local` WAL (`None`: no data directory) rejoins a
/// primary with `primary`'s history, after `failed`.
pub fn plan(local: Option<&LocalWal>, primary: &PrimaryHistory, failed: &Failed) -> Rejoin {
    let Some(local) = local else {
        return Rejoin::BaseBackup("no initialised data directory to start from".into());
    };
    match failed {
        Failed::Rewind(e) => return Rejoin::BaseBackup(format!("pg_rewind failed: {e}")),
        Failed::Streaming(e) => {
            return Rejoin::Rewind(format!(
                "restarted in recovery on timeline {}, it did not stream from the primary ({e})",
                local.tli
            ))
        }
        Failed::Nothing => {}
    }
    if local.tli == primary.tli {
        return match local.role {
            // Every promotion starts a new timeline: a standby on the
            // primary's timeline holds a prefix of the primary's WAL.
            LocalRole::Standby => Rejoin::Stream(format!(
                "it was a standby on the primary's timeline {} (WAL up to {}): it streams from there",
                local.tli, local.end
            )),
            LocalRole::Primary => Rejoin::Rewind(format!(
                "it was a primary on timeline {}, the primary's timeline: pg_rewind checks it holds no WAL of its own",
                local.tli
            )),
        };
    }
    match primary.switch_off(local.tli) {
        Some(switch) if local.role == LocalRole::Standby && local.end <= switch => {
            Rejoin::Stream(format!(
                "it was a standby on timeline {}, which the primary left at {} after it (WAL up to {}): it follows the switch to timeline {} by streaming",
                local.tli, switch, local.end, primary.tli
            ))
        }
        Some(switch) if local.role == LocalRole::Standby => Rejoin::Rewind(format!(
            "its WAL on timeline {} goes to {}, past {} where the primary's history left that timeline for timeline {}: it diverged",
            local.tli, local.end, switch, primary.tli
        )),
        Some(switch) => Rejoin::Rewind(format!(
            "it was a primary on timeline {}, which the primary's history left at {} for timeline {}: what it wrote after that (its WAL is known up to {}) is not the primary's",
            local.tli, switch, primary.tli, local.end
        )),
        None => Rejoin::Rewind(format!(
            "its timeline {} is not in the history of the primary's timeline {}: it diverged",
            local.tli, primary.tli
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(role: LocalRole, tli: u32, end: u64) -> Option<LocalWal> {
        Some(LocalWal {
            role,
            tli: Timeline(tli),
            end: Lsn(end),
        })
    }

    /// The primary on timeline 3, which left timeline 1 at 0/3000000 and
    /// timeline 2 at 0/5000000.
    fn primary() -> PrimaryHistory {
        PrimaryHistory::parse(
            Timeline(3),
            "1\t0/3000000\tno recovery target specified\n\n2\t0/5000000\tno recovery target specified\n",
        )
    }

    #[test]
    fn history_files_parse() {
        assert_eq!(
            primary().ancestors,
            vec![
                Switch {
                    tli: Timeline(1),
                    switch: Lsn(0x300_0000)
                },
                Switch {
                    tli: Timeline(2),
                    switch: Lsn(0x500_0000)
                },
            ]
        );
        assert!(PrimaryHistory::parse(Timeline(1), "").ancestors.is_empty());
    }

    /// One row per rule: (local WAL, what failed, expected method).
    #[test]
    fn table_of_rejoins() {
        use LocalRole::*;
        let streaming =
            Failed::Streaming("requested starting point is not in this server's history".into());
        let rewind = Failed::Rewind("could not find common ancestor".into());
        let rows: &[(Option<LocalWal>, Failed, &str)] = &[
            // No data directory: copy.
            (None, Failed::Nothing, "pg_basebackup"),
            // A standby powered off on the primary's timeline: stream, no rewind.
            (local(Standby, 3, 0x900_0000), Failed::Nothing, "streaming"),
            // A standby on an ancestor timeline, not past the switch: follow it.
            (local(Standby, 2, 0x480_0000), Failed::Nothing, "streaming"),
            (local(Standby, 2, 0x500_0000), Failed::Nothing, "streaming"),
            // A standby that received WAL the primary's history does not hold.
            (local(Standby, 2, 0x500_0001), Failed::Nothing, "pg_rewind"),
            // A standby promoted behind the monitor's back (a new timeline).
            (local(Primary, 4, 0x600_0000), Failed::Nothing, "pg_rewind"),
            // The old primary of timeline 2, with writes past the switch.
            (local(Primary, 2, 0x520_0000), Failed::Nothing, "pg_rewind"),
            // A primary on the same timeline: pg_rewind decides.
            (local(Primary, 3, 0x900_0000), Failed::Nothing, "pg_rewind"),
            // An old primary even at the switch point: pg_rewind decides.
            (local(Primary, 2, 0x500_0000), Failed::Nothing, "pg_rewind"),
            // A timeline the primary never knew.
            (local(Standby, 7, 0x100_0000), Failed::Nothing, "pg_rewind"),
            // Streaming was tried and failed: rewind.
            (
                local(Standby, 3, 0x900_0000),
                streaming.clone(),
                "pg_rewind",
            ),
            // pg_rewind failed: the last resort.
            (
                local(Primary, 4, 0x600_0000),
                rewind.clone(),
                "pg_basebackup",
            ),
            (local(Standby, 3, 0x900_0000), rewind, "pg_basebackup"),
            (None, streaming, "pg_basebackup"),
        ];
        for (local, failed, expected) in rows {
            let got = plan(local.as_ref(), &primary(), failed);
            assert_eq!(
                got.method(),
                *expected,
                "{local:?} after {failed:?}: {}",
                got.reason()
            );
        }
    }

    #[test]
    fn reasons_name_the_divergence() {
        let got = plan(
            local(LocalRole::Primary, 4, 0x600_0000).as_ref(),
            &primary(),
            &Failed::Nothing,
        );
        assert!(got.reason().contains("timeline 4 is not in the history"));
        let got = plan(
            local(LocalRole::Standby, 3, 0x900_0000).as_ref(),
            &primary(),
            &Failed::Rewind("boom".into()),
        );
        assert_eq!(got.reason(), "pg_rewind failed: boom");
    }
}
