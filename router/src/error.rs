//! [`RouterError`]: what stops the router or refuses a reload.

use hapg_config::ConfigError;

use crate::auth::userlist::UserlistError;
use crate::tls::TlsError;

/// Errors that stop the router or refuse a reload.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The configuration file is unreadable or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The auth file is unreadable or invalid. Its text is in this one's and
    /// it is no `source()`, so that a printed chain says it once.
    #[error("auth.file: {0}")]
    Userlist(UserlistError),
    /// The TLS certificate or key is unusable.
    #[error("tls: {0}")]
    Tls(TlsError),
    /// Listening or accepting failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The monitor answers but has no such formation.
    #[error("router.formation: the monitor has no formation {0:?} (`hapg show state --monitor URI` lists what it has)")]
    NoSuchFormation(String),
    /// The monitor refused the router's connection or query for good (not
    /// merely unreachable).
    #[error("router.monitor: {0}")]
    Monitor(hapg_monitor::MonitorError),
}

impl From<UserlistError> for RouterError {
    fn from(e: UserlistError) -> Self {
        RouterError::Userlist(e)
    }
}

impl From<TlsError> for RouterError {
    fn from(e: TlsError) -> Self {
        RouterError::Tls(e)
    }
}
