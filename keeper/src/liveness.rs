//! Whether the local Postgres runs, from its postmaster rather than a login:
//! a Postgres that refuses the keeper's connection (every slot taken,
//! starting up, shutting down) still runs, and must be neither restarted nor
//! reported down (issue 23, item 8).

/// What the keeper knows of its Postgres after one observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// The keeper logged in and observed it.
    Serving,
    /// The postmaster runs (this pid) but the keeper could not log in.
    Refusing {
        /// The postmaster's pid.
        postmaster: i32,
    },
    /// No postmaster runs for the data directory.
    Down,
}

impl Liveness {
    /// `answered`: the keeper's observation logged in; `postmaster`: the pid
    /// of the live postmaster of the data directory, if any
    /// (`LocalPostgres::postmaster_pid`).
    pub fn of(answered: bool, postmaster: Option<i32>) -> Liveness {
        match (answered, postmaster) {
            (true, _) => Liveness::Serving,
            (false, Some(postmaster)) => Liveness::Refusing { postmaster },
            (false, None) => Liveness::Down,
        }
    }

    /// Postgres runs: what the keeper reports as `pg_running`, and when it
    /// must not start or restart it.
    pub fn running(self) -> bool {
        !matches!(self, Liveness::Down)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_postmaster_that_refuses_logins_runs_and_only_no_postmaster_is_down() {
        for (answered, postmaster, liveness, running) in [
            (true, Some(42), Liveness::Serving, true),
            // A login that succeeded proves it, whatever the pid file says.
            (true, None, Liveness::Serving, true),
            // Every slot taken (53300), starting up, shutting down: it runs.
            (false, Some(42), Liveness::Refusing { postmaster: 42 }, true),
            (false, None, Liveness::Down, false),
        ] {
            let got = Liveness::of(answered, postmaster);
            assert_eq!(
                got, liveness,
                "answered {answered}, postmaster {postmaster:?}"
            );
            assert_eq!(got.running(), running, "{got:?}");
        }
    }
}
