//! The keeper layer's errors: local Postgres operations, files, and the monitor.

use std::path::PathBuf;

use hapg_monitor::{MonitorError, NodeState};

/// Errors of the keeper and of the local Postgres operations it runs.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    /// A Postgres tool (initdb, pg_ctl, pg_basebackup, pg_rewind, ...) failed.
    #[error("{tool} failed ({status}): {output}")]
    Tool {
        /// The program.
        tool: String,
        /// Its exit status.
        status: String,
        /// The tail of what it printed.
        output: String,
    },
    /// A Postgres tool could not be started at all.
    #[error("cannot run {tool}: {source}")]
    Spawn {
        /// The program.
        tool: String,
        /// Why.
        source: std::io::Error,
    },
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The local Postgres answered with an error or could not be reached.
    #[error("local postgres: {}", hapg_monitor::error::describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// The monitor refused or could not be reached.
    #[error(transparent)]
    Monitor(#[from] MonitorError),
    /// The configuration file is missing or wrong.
    #[error(transparent)]
    Config(#[from] hapg_config::ConfigError),
    /// The state file is unreadable.
    #[error("state file {path}: {message}")]
    StateFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The keeper has no transition between these states.
    #[error("no transition from {from} to {to}")]
    NoTransition {
        /// Current state.
        from: NodeState,
        /// Goal state.
        to: NodeState,
    },
    /// The OS user that should run Postgres does not exist or cannot reach the data directory.
    #[error("{0}")]
    OsUser(String),
    /// Something the user asked for cannot be done, with what to do instead.
    #[error("{0}")]
    Refused(String),
    /// A transition step did not complete in time; it will be retried.
    #[error("timed out: {0}")]
    Timeout(String),
}

impl KeeperError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> KeeperError {
        KeeperError::Io {
            path: path.into(),
            source,
        }
    }
}
