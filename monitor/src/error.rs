//! The monitor layer's errors: what can go wrong talking to, or deciding in, the monitor.

use tokio_postgres::error::SqlState;

/// Errors from the monitor database, the monitor client and the monitor service.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// The monitor's Postgres answered with an error, or the connection failed.
    #[error("monitor database: {}", describe(.0))]
    Db(#[from] tokio_postgres::Error),
    /// No answer from the monitor within the retry budget.
    #[error("the monitor at {uri} does not answer after {attempts} attempts over {seconds} s: {last_error}")]
    Unreachable {
        /// The URI, with any password removed.
        uri: String,
        /// How many connection attempts were made.
        attempts: u32,
        /// How long they took in all.
        seconds: u64,
        /// The last attempt's error.
        last_error: String,
    },
    /// The URI does not parse as a Postgres connection string.
    #[error("invalid monitor URI {uri:?}: {reason}")]
    BadUri {
        /// The URI as given, password removed.
        uri: String,
        /// Why it does not parse.
        reason: String,
    },
    /// The monitor's certificate does not pass the URI's `sslmode`
    /// (`verify-ca`, `verify-full`) check against its `sslrootcert`.
    #[error("the monitor at {uri} presents a certificate its sslmode refuses ({reason}): check sslrootcert and the host name in the URI")]
    CertificateRefused {
        /// The URI, password removed.
        uri: String,
        /// What was wrong with the certificate.
        reason: String,
    },
    /// The database answers but was never set up as a hapg monitor.
    #[error("this database is not a hapg monitor (no hapg schema); create one with `hapg create monitor`")]
    NotAMonitor,
    /// The monitor's schema is older than this binary: run `hapg run` on the monitor to migrate.
    #[error("the monitor schema is at version {found}, this hapg expects {expected}: restart the monitor with this hapg version to migrate it")]
    SchemaTooOld {
        /// Version in the database.
        found: i32,
        /// Version this binary speaks.
        expected: i32,
    },
    /// The monitor's schema is newer than this binary understands.
    #[error("the monitor schema is at version {found}, newer than this hapg supports ({supported}): upgrade hapg")]
    SchemaTooNew {
        /// Version in the database.
        found: i32,
        /// Latest version this binary knows.
        supported: i32,
    },
    /// The named formation does not exist.
    #[error("formation {0:?} does not exist on the monitor")]
    NoSuchFormation(String),
    /// The node id is not (or no longer) registered.
    #[error("node {0} is not registered with the monitor (was it dropped?)")]
    NoSuchNode(i64),
    /// The named node does not exist in the formation.
    #[error("no node named {name:?} in formation {formation:?}")]
    NoSuchNodeName {
        /// Formation searched.
        formation: String,
        /// Name asked for.
        name: String,
    },
    /// Registration refused (duplicate name or address, ...).
    #[error("registration refused: {0}")]
    RegistrationRefused(String),
    /// The monitor service refused an operator request, saying why.
    #[error("{0}")]
    Refused(String),
    /// Waiting for a state change took longer than allowed.
    #[error("timed out after {seconds} s waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        seconds: u64,
    },
    /// A value read from the monitor is not what this binary expects.
    #[error("unexpected value in monitor database: {0}")]
    Corrupt(String),
    /// This monitor service's write was refused because another one leads
    /// now (its lease lapsed): it stops deciding and campaigns again.
    #[error("this monitor service no longer leads: its write was refused")]
    NotLeader,
    /// The first request to etcd failed: the reason names the likely cause
    /// (a CA that did not sign the members' certificate, plain http against
    /// TLS-only members, no member listening).
    #[error("cannot reach etcd at {endpoints}: {reason}")]
    EtcdConnect {
        /// The members' client URLs.
        endpoints: String,
        /// What failed, and the likely cause.
        reason: String,
        /// False for what retrying does not mend (a refused certificate).
        transient: bool,
    },
    /// An etcd URI's TLS option cannot be used.
    #[error("etcd TLS option {option}: {reason}")]
    EtcdTls {
        /// The URI option (`cacert`, `cert`, `key`).
        option: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The etcd store answered with an error, or could not be reached.
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    /// A state read from the database that this binary does not know.
    #[error("unknown state in monitor database: {0}")]
    UnknownState(#[from] crate::state::UnknownState),
}

impl MonitorError {
    /// True when retrying later may succeed (connection problems), false for refusals.
    pub fn is_transient(&self) -> bool {
        match self {
            MonitorError::Db(e) => e.as_db_error().is_none(),
            MonitorError::Unreachable { .. } => true,
            MonitorError::EtcdConnect { transient, .. } => *transient,
            MonitorError::Etcd(e) => matches!(
                e,
                etcd_client::Error::TransportError(_)
                    | etcd_client::Error::IoError(_)
                    | etcd_client::Error::GRpcStatus(_)
            ),
            _ => false,
        }
    }

    /// True for what a monitor answers while it is still being created or
    /// started: its Postgres is starting up (57P03), or already listens while
    /// `hapg create monitor` has not yet created the `autoctl_node` role
    /// (28000, "role ... does not exist"), the database (3D000) or committed
    /// its schema. Worth retrying for a while, but if it lasts, the error
    /// itself says best what is wrong. Other refusals with 28000 (no
    /// pg_hba.conf entry) are reported at once.
    pub fn is_monitor_not_ready(&self) -> bool {
        match self {
            MonitorError::Db(e) => e.as_db_error().is_some_and(|db| {
                let code = db.code();
                *code == SqlState::CANNOT_CONNECT_NOW
                    || *code == SqlState::INVALID_CATALOG_NAME
                    || (*code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
                        && db.message().starts_with("role ")
                        && db.message().ends_with(" does not exist"))
            }),
            MonitorError::NotAMonitor => true,
            _ => false,
        }
    }
}

/// A Postgres error with the server's message, detail and SQLSTATE, or the
/// connection error's cause: tokio-postgres' own Display says only "db error".
pub fn describe(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        let mut text = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(detail) = db.detail() {
            text.push_str(&format!(": {detail}"));
        }
        return text;
    }
    match std::error::Error::source(error) {
        Some(cause) => format!("{error}: {cause}"),
        None => error.to_string(),
    }
}
