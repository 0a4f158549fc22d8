//! The replication states a node can report or be assigned, with the predicates the
//! state machines, the CLI and the router share.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A node's replication state, as pg_auto_failover names them.
///
/// The same enum is the keeper's *reported* (current) state and the monitor's
/// *assigned* (goal) state. The SQL type `hapg.replication_state` lists the same
/// values in the same order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Registered, nothing done yet.
    Init,
    /// The only node of its group: read-write, no replication.
    Single,
    /// Writable primary without a usable synchronous standby (replication is async).
    WaitPrimary,
    /// Writable primary with synchronous replication to its quorum standbys.
    Primary,
    /// Old primary told to stop taking writes: Postgres is stopped.
    Draining,
    /// Old primary that could not confirm it stopped; also self-assigned when fenced.
    DemoteTimeout,
    /// Old primary, fenced: Postgres stays down until it rejoins as a standby.
    Demoted,
    /// Standby streaming but not (yet) a failover candidate.
    Catchingup,
    /// Caught-up standby, a failover candidate when its priority is above 0.
    Secondary,
    /// Chosen candidate: replication from the old primary is cut, ready to promote.
    PreparePromotion,
    /// Promoted but held read-only until the old primary is known to be down.
    StopReplication,
    /// New node waiting for the primary to be ready to serve a base backup.
    WaitStandby,
    /// Taken out by the operator; the monitor leaves it alone.
    Maintenance,
    /// Deprecated primary state, kept for compatibility (treated as primary).
    JoinPrimary,
    /// Primary re-reading `synchronous_standby_names` after a settings change.
    ApplySettings,
    /// Primary going to maintenance: checkpoint and stop while a standby takes over.
    PrepareMaintenance,
    /// Standby waiting for the primary to turn synchronous replication off first.
    WaitMaintenance,
    /// Election: standby restarted without upstream so its LSN stays put and is reported.
    ReportLsn,
    /// Elected candidate fetching missing WAL from the most advanced standby.
    FastForward,
    /// Standby that lost the election, re-pointing to the new primary.
    JoinSecondary,
    /// Being removed from the formation.
    Dropped,
}

impl NodeState {
    /// Every state, in SQL enum order.
    pub const ALL: [NodeState; 21] = [
        NodeState::Init,
        NodeState::Single,
        NodeState::WaitPrimary,
        NodeState::Primary,
        NodeState::Draining,
        NodeState::DemoteTimeout,
        NodeState::Demoted,
        NodeState::Catchingup,
        NodeState::Secondary,
        NodeState::PreparePromotion,
        NodeState::StopReplication,
        NodeState::WaitStandby,
        NodeState::Maintenance,
        NodeState::JoinPrimary,
        NodeState::ApplySettings,
        NodeState::PrepareMaintenance,
        NodeState::WaitMaintenance,
        NodeState::ReportLsn,
        NodeState::FastForward,
        NodeState::JoinSecondary,
        NodeState::Dropped,
    ];

    /// The state's name as Postgres and the CLI spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Init => "init",
            NodeState::Single => "single",
            NodeState::WaitPrimary => "wait_primary",
            NodeState::Primary => "primary",
            NodeState::Draining => "draining",
            NodeState::DemoteTimeout => "demote_timeout",
            NodeState::Demoted => "demoted",
            NodeState::Catchingup => "catchingup",
            NodeState::Secondary => "secondary",
            NodeState::PreparePromotion => "prepare_promotion",
            NodeState::StopReplication => "stop_replication",
            NodeState::WaitStandby => "wait_standby",
            NodeState::Maintenance => "maintenance",
            NodeState::JoinPrimary => "join_primary",
            NodeState::ApplySettings => "apply_settings",
            NodeState::PrepareMaintenance => "prepare_maintenance",
            NodeState::WaitMaintenance => "wait_maintenance",
            NodeState::ReportLsn => "report_lsn",
            NodeState::FastForward => "fast_forward",
            NodeState::JoinSecondary => "join_secondary",
            NodeState::Dropped => "dropped",
        }
    }

    /// States in which Postgres accepts writes (pg_auto_failover's CanTakeWrites).
    pub fn can_take_writes(self) -> bool {
        matches!(
            self,
            NodeState::Single
                | NodeState::WaitPrimary
                | NodeState::Primary
                | NodeState::JoinPrimary
                | NodeState::ApplySettings
        )
    }

    /// States that belong to the node that is, or just was, the primary.
    pub fn belongs_to_primary(self) -> bool {
        self.can_take_writes()
            || matches!(
                self,
                NodeState::Draining | NodeState::DemoteTimeout | NodeState::PrepareMaintenance
            )
    }

    /// States of a running standby (Postgres in recovery).
    pub fn is_standby(self) -> bool {
        matches!(
            self,
            NodeState::Catchingup
                | NodeState::Secondary
                | NodeState::PreparePromotion
                | NodeState::WaitMaintenance
                | NodeState::ReportLsn
                | NodeState::FastForward
                | NodeState::JoinSecondary
        )
    }

    /// States in which Postgres must not run.
    pub fn is_fenced(self) -> bool {
        matches!(
            self,
            NodeState::Draining
                | NodeState::DemoteTimeout
                | NodeState::Demoted
                | NodeState::Dropped
        )
    }

    /// The connection type `show state` prints for a node in this reported state.
    pub fn connection_type(self) -> &'static str {
        if self.can_take_writes() || self == NodeState::PrepareMaintenance {
            "read-write"
        } else if self.is_standby() || self == NodeState::StopReplication {
            "read-only"
        } else {
            "none"
        }
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state name that is not one of [`NodeState::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown replication state {0:?}")]
pub struct UnknownState(pub String);

impl FromStr for NodeState {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NodeState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_string()))
    }
}

/// What the monitor's health checks last concluded about a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Never checked since registration (or since the monitor started).
    Unknown,
    /// The last checks failed.
    Bad,
    /// The last check connected.
    Good,
}

impl Health {
    /// The value stored in `hapg.node.health` (-1, 0, 1, as pg_auto_failover).
    pub fn to_db(self) -> i16 {
        match self {
            Health::Unknown => -1,
            Health::Bad => 0,
            Health::Good => 1,
        }
    }

    /// Reads the stored value; anything unexpected is `Unknown`.
    pub fn from_db(value: i16) -> Health {
        match value {
            0 => Health::Bad,
            1 => Health::Good,
            _ => Health::Unknown,
        }
    }

    /// `good`, `bad` or `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Bad => "bad",
            Health::Good => "good",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for state in NodeState::ALL {
            assert_eq!(state.as_str().parse::<NodeState>(), Ok(state));
        }
        assert!("primaryy".parse::<NodeState>().is_err());
    }

    #[test]
    fn connection_types() {
        assert_eq!(NodeState::Primary.connection_type(), "read-write");
        assert_eq!(NodeState::Secondary.connection_type(), "read-only");
        assert_eq!(NodeState::Demoted.connection_type(), "none");
    }
}
