//! The router's configuration file (`router.toml`): its schema, every default
//! (here and nowhere else), and validation that names the offending key.
//! docs/router.md documents each key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{invalid, validate_name, ConfigError};

/// Default TCP port of the router, as PgBouncer's.
pub const DEFAULT_PORT: u16 = 6432;

/// A router's configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    /// Where clients connect and which formation the router serves.
    pub router: RouterSection,
    /// How clients authenticate to the router.
    #[serde(default)]
    pub auth: AuthSection,
    /// TLS toward clients.
    #[serde(default)]
    pub tls: TlsSection,
    /// How the router logs into Postgres nodes.
    #[serde(default)]
    pub server: ServerSection,
    /// Server connection pooling.
    #[serde(default)]
    pub pool: PoolSection,
    /// The admin console (the virtual databases `pgbouncer` and `hapg`).
    #[serde(default)]
    pub admin: AdminSection,
    /// The Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsSection,
    /// The read-only port's standbys: lag bounds and fallback.
    #[serde(default)]
    pub read_only: ReadOnlySection,
}

/// What a read-only session gets when no standby is eligible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ReadFallback {
    /// The primary serves it (reads stay available, at the primary's cost).
    #[default]
    Primary,
    /// It waits for an eligible standby, up to `router.pause_timeout_ms`.
    Wait,
    /// It fails at once.
    Error,
}

/// The `[read_only]` section: which standbys the read-only port
/// (`router.listen_read_only`) may use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadOnlySection {
    /// A standby further behind the primary than this many bytes of WAL
    /// gets no read session.
    #[serde(default = "default_max_lag_bytes")]
    pub max_lag_bytes: u64,
    /// A standby whose last replayed transaction is older than this (while
    /// the primary has written since) gets no read session.
    #[serde(default = "default_max_lag_ms")]
    pub max_lag_ms: u64,
    /// How often, at most, the router checks each standby's replay itself.
    #[serde(default = "default_lag_check_interval_ms")]
    pub lag_check_interval_ms: u64,
    /// `primary`, `wait` or `error`.
    #[serde(default)]
    pub fallback: ReadFallback,
}

impl Default for ReadOnlySection {
    fn default() -> Self {
        ReadOnlySection {
            max_lag_bytes: default_max_lag_bytes(),
            max_lag_ms: default_max_lag_ms(),
            lag_check_interval_ms: default_lag_check_interval_ms(),
            fallback: ReadFallback::default(),
        }
    }
}

/// Who reaches the admin console: a client that logs in to the virtual
/// database `pgbouncer` (or `hapg`), authenticated as any client is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Users allowed every console command (PgBouncer's `admin_users`).
    #[serde(default)]
    pub admin_users: Vec<String>,
    /// Users allowed the SHOW commands only (PgBouncer's `stats_users`).
    #[serde(default)]
    pub stats_users: Vec<String>,
    /// How many primary changes `SHOW FAILOVERS` keeps.
    #[serde(default = "default_failovers_kept")]
    pub failovers_kept: u32,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            admin_users: Vec::new(),
            stats_users: Vec::new(),
            failovers_kept: default_failovers_kept(),
        }
    }
}

/// The router's Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Address of the HTTP listener serving `GET /metrics` (none: no endpoint,
    /// and the hot path counts nothing).
    #[serde(default)]
    pub listen: Option<String>,
}

/// When a server connection goes back to the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PoolMode {
    /// A client keeps its server connection until it disconnects; the
    /// connection is then reset with `DISCARD ALL` and reused.
    #[default]
    Session,
    /// A client holds a server connection for one transaction only.
    Transaction,
}

/// The `[pool]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSection {
    /// `session` or `transaction`.
    #[serde(default)]
    pub mode: PoolMode,
    /// Server connections per user and database, in use and idle together.
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// Idle server connections kept open per user and database.
    #[serde(default)]
    pub min_idle: u32,
    /// An idle server connection older than this is closed (0: never).
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// A server connection older than this is closed when it is next idle (0: never).
    #[serde(default = "default_lifetime_ms")]
    pub lifetime_ms: u64,
    /// Server connections the router opens to one node, all pools together
    /// (0: computed from the node's `max_connections` and
    /// `superuser_reserved_connections`, see [`server_connection_limit`]).
    #[serde(default)]
    pub max_server_connections: u32,
}

impl Default for PoolSection {
    fn default() -> Self {
        PoolSection {
            mode: PoolMode::default(),
            pool_size: default_pool_size(),
            min_idle: 0,
            idle_timeout_ms: default_idle_timeout_ms(),
            lifetime_ms: default_lifetime_ms(),
            max_server_connections: 0,
        }
    }
}

/// The `[router]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterSection {
    /// Address clients connect to, `host:port`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Monitor connection string.
    pub monitor: String,
    /// Formation whose primary the router follows.
    #[serde(default = "default_formation")]
    pub formation: String,
    /// Name the router registers with the monitor; default `<hostname>:<port>`.
    #[serde(default)]
    pub id: Option<String>,
    /// Address the router registers with the monitor; default the listen address.
    #[serde(default)]
    pub address: Option<String>,
    /// Address of the read-only port, `host:port` (none: no read-only port).
    #[serde(default)]
    pub listen_read_only: Option<String>,
    /// How long a new transaction waits for a writable primary before it fails.
    #[serde(default = "default_pause_timeout_ms")]
    pub pause_timeout_ms: u64,
    /// How long open statements and transactions may go on when the router
    /// drains: at a switchover (then they are cut with SQLSTATE 57P01 and the
    /// router acknowledges the drain to the monitor), and when the router stops.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
    /// How long a client may take to complete its startup and authentication.
    #[serde(default = "default_login_timeout_ms")]
    pub login_timeout_ms: u64,
    /// Client connections served at once; more are refused with SQLSTATE 53300.
    #[serde(default = "default_max_client_connections")]
    pub max_client_connections: u32,
    /// Largest message (bytes, header included) a client may send.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: u32,
    /// Threads that serve clients; default one per CPU. Read at start only.
    #[serde(default)]
    pub worker_threads: Option<u32>,
    /// How Linux schedules those threads. Read at start only.
    #[serde(default)]
    pub cpu_scheduling: CpuScheduling,
}

/// The Linux scheduling policy of the router's threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CpuScheduling {
    /// SCHED_OTHER, as every process has by default.
    #[default]
    Normal,
    /// SCHED_BATCH: a woken thread does not preempt the task running on its
    /// CPU. When every CPU is busy (a router sharing its machine with Postgres
    /// under load), the router then waits for a CPU to come free and forwards
    /// everything that arrived meanwhile in one go, instead of being woken and
    /// switched to for each message. With a CPU free it runs at once, as normal.
    Batch,
}

/// How clients authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum AuthType {
    /// Anyone who names a user is let in.
    #[default]
    #[serde(rename = "trust")]
    Trust,
    /// MD5 challenge (SCRAM when the file holds a SCRAM secret for the user).
    #[serde(rename = "md5")]
    Md5,
    /// SCRAM-SHA-256.
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
}

/// The `[auth]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// `trust`, `md5` or `scram-sha-256`.
    #[serde(rename = "type", default)]
    pub kind: AuthType,
    /// User list in PgBouncer's `"user" "secret"` format (relative to the config file).
    #[serde(default)]
    pub file: Option<PathBuf>,
}

/// Whether clients must use TLS (PgBouncer's `client_tls_sslmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ClientTlsMode {
    /// A client chooses: TLS when it asks for it (and `[tls]` has a
    /// certificate), plain otherwise.
    #[default]
    Allow,
    /// A client that does not ask for TLS is refused before it authenticates.
    Require,
}

/// The `[tls]` section: certificate and key the router presents to clients,
/// and whether clients must use TLS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// PEM certificate chain (relative to the config file).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM private key (relative to the config file).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// `allow` or `require`.
    #[serde(default)]
    pub client_mode: ClientTlsMode,
}

/// TLS toward Postgres nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ServerSslMode {
    /// Plain TCP.
    Disable,
    /// TLS when the node offers it (no certificate check), else plain.
    #[default]
    Prefer,
    /// TLS or nothing (no certificate check, as libpq's `require`).
    Require,
    /// TLS with a certificate signed by a CA of `server.sslrootcert`.
    VerifyCa,
    /// As `verify-ca`, and the certificate names the host the router
    /// connects to (the node's address as the monitor has it).
    VerifyFull,
}

impl ServerSslMode {
    /// True for `verify-ca` and `verify-full`.
    pub fn verifies(self) -> bool {
        matches!(self, ServerSslMode::VerifyCa | ServerSslMode::VerifyFull)
    }
}

/// The `[server]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// User the router logs into nodes as; default the client's user.
    #[serde(default)]
    pub user: Option<String>,
    /// Password for nodes; default the plain-text secret of the auth file, if any.
    #[serde(default)]
    pub password: Option<String>,
    /// `disable`, `prefer`, `require`, `verify-ca` or `verify-full`.
    #[serde(default)]
    pub sslmode: ServerSslMode,
    /// PEM file of the CA certificates that sign the nodes' certificates, as
    /// libpq's `sslrootcert` (relative to the config file); needed by
    /// `verify-ca` and `verify-full`.
    #[serde(default)]
    pub sslrootcert: Option<PathBuf>,
    /// Time allowed to open and log into one server connection.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// When the primary runs on this machine, reach it through its Unix
    /// socket in this directory instead of TCP; default TCP always.
    #[serde(default)]
    pub unix_socket_dir: Option<PathBuf>,
    /// `TCP_USER_TIMEOUT` of server connections: data sent to a server (or a
    /// keepalive probe) unacknowledged for this long ends the connection, so
    /// that a server gone silent (powered off, cut off) fails the statement
    /// in flight instead of holding it for TCP's own ~15 minutes. 0: the
    /// kernel's default.
    #[serde(default = "default_tcp_user_timeout_ms")]
    pub tcp_user_timeout_ms: u64,
    /// Idle time of a server connection before its first keepalive probe, in
    /// whole seconds (Linux counts them in seconds): what notices a silent
    /// server while a statement runs and nothing is being sent.
    #[serde(default = "default_tcp_keepalive_idle_ms")]
    pub tcp_keepalive_idle_ms: u64,
    /// Time between keepalive probes on server connections, in whole seconds.
    #[serde(default = "default_tcp_keepalive_interval_ms")]
    pub tcp_keepalive_interval_ms: u64,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            user: None,
            password: None,
            sslmode: ServerSslMode::default(),
            sslrootcert: None,
            connect_timeout_ms: default_connect_timeout_ms(),
            unix_socket_dir: None,
            tcp_user_timeout_ms: default_tcp_user_timeout_ms(),
            tcp_keepalive_idle_ms: default_tcp_keepalive_idle_ms(),
            tcp_keepalive_interval_ms: default_tcp_keepalive_interval_ms(),
        }
    }
}

fn default_listen() -> String {
    format!("0.0.0.0:{DEFAULT_PORT}")
}
fn default_formation() -> String {
    "default".to_string()
}
fn default_pause_timeout_ms() -> u64 {
    30_000
}
fn default_drain_timeout_ms() -> u64 {
    10_000
}
fn default_login_timeout_ms() -> u64 {
    15_000
}
fn default_max_client_connections() -> u32 {
    1_000
}
/// Postgres' own limit for the messages it lets be large (`PQ_LARGE_MESSAGE_LIMIT`, 1 GiB).
fn default_max_message_size() -> u32 {
    1024 * 1024 * 1024
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_tcp_user_timeout_ms() -> u64 {
    5_000
}
fn default_tcp_keepalive_idle_ms() -> u64 {
    3_000
}
fn default_tcp_keepalive_interval_ms() -> u64 {
    1_000
}
/// As PgBouncer's `default_pool_size`: a pool is for concurrency, not one
/// server connection per client.
fn default_failovers_kept() -> u32 {
    50
}
fn default_pool_size() -> u32 {
    20
}
fn default_idle_timeout_ms() -> u64 {
    600_000
}
fn default_lifetime_ms() -> u64 {
    3_600_000
}
/// 16 MiB: one WAL segment.
fn default_max_lag_bytes() -> u64 {
    16 * 1024 * 1024
}
fn default_max_lag_ms() -> u64 {
    5_000
}
fn default_lag_check_interval_ms() -> u64 {
    500
}

/// A node's connection settings, as the router reads them from the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeConnectionLimits {
    /// `max_connections`.
    pub max_connections: u32,
    /// `superuser_reserved_connections`.
    pub superuser_reserved_connections: u32,
}

impl NodeConnectionLimits {
    /// The slots any role may take: what is left once the superusers' are set apart.
    pub fn open_to_all(&self) -> u32 {
        self.max_connections
            .saturating_sub(self.superuser_reserved_connections)
    }
}

/// How many server connections one router opens to a node, all pools
/// together: never more than the node's slots open to all roles, so that
/// `superuser_reserved_connections` stay free for the keeper and an
/// operator's psql even though the router may log in as a superuser.
/// `configured` is `pool.max_server_connections` (0: computed, leaving a
/// tenth of those slots, at least one, to everything else: other routers
/// and applications, pg_rewind from a rejoining node). Also returns
/// whether `configured` asked for more than the node allows.
pub fn server_connection_limit(node: NodeConnectionLimits, configured: u32) -> (u32, bool) {
    let open = node.open_to_all().max(1);
    if configured == 0 {
        let margin = open.div_ceil(10).max(1);
        return (open.saturating_sub(margin).max(1), false);
    }
    (configured.min(open), configured > open)
}

impl RouterConfig {
    /// Reads and validates a router configuration file; relative paths in it
    /// are resolved against the file's directory.
    pub fn load(path: &Path) -> Result<RouterConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::parse(path, &text)?;
        if let Some(dir) = path.parent() {
            for file in [
                &mut config.auth.file,
                &mut config.tls.cert,
                &mut config.tls.key,
                &mut config.server.sslrootcert,
            ]
            .into_iter()
            .flatten()
            {
                if file.is_relative() {
                    *file = dir.join(&*file);
                }
            }
        }
        Ok(config)
    }

    /// Parses and validates configuration text read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<RouterConfig, ConfigError> {
        let config: RouterConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value, naming the first key that is wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        self.read_only_addr()?;
        if self.router.monitor.trim().is_empty() {
            return Err(invalid(
                "router.monitor",
                "the monitor's connection string is required",
            ));
        }
        crate::validate_monitor_uri("router.monitor", &self.router.monitor)?;
        validate_name("router.formation", &self.router.formation)?;
        if let Some(id) = &self.router.id {
            if id.is_empty() || id.len() > 200 {
                return Err(invalid("router.id", "must be 1 to 200 characters long"));
            }
        }
        for (key, value, min, max) in [
            (
                "router.pause_timeout_ms",
                self.router.pause_timeout_ms,
                0,
                3_600_000,
            ),
            (
                "router.drain_timeout_ms",
                self.router.drain_timeout_ms,
                0,
                3_600_000,
            ),
            (
                "router.login_timeout_ms",
                self.router.login_timeout_ms,
                100,
                3_600_000,
            ),
            (
                "server.connect_timeout_ms",
                self.server.connect_timeout_ms,
                10,
                600_000,
            ),
            (
                "pool.idle_timeout_ms",
                self.pool.idle_timeout_ms,
                0,
                86_400_000,
            ),
            ("pool.lifetime_ms", self.pool.lifetime_ms, 0, 604_800_000),
            (
                "server.tcp_user_timeout_ms",
                self.server.tcp_user_timeout_ms,
                0,
                3_600_000,
            ),
            (
                "server.tcp_keepalive_idle_ms",
                self.server.tcp_keepalive_idle_ms,
                1_000,
                7_200_000,
            ),
            (
                "server.tcp_keepalive_interval_ms",
                self.server.tcp_keepalive_interval_ms,
                1_000,
                600_000,
            ),
            (
                "read_only.max_lag_bytes",
                self.read_only.max_lag_bytes,
                0,
                1 << 40,
            ),
            (
                "read_only.max_lag_ms",
                self.read_only.max_lag_ms,
                0,
                86_400_000,
            ),
            (
                "read_only.lag_check_interval_ms",
                self.read_only.lag_check_interval_ms,
                10,
                600_000,
            ),
        ] {
            if value < min || value > max {
                return Err(invalid(key, format!("must be between {min} and {max}")));
            }
        }
        for (key, value) in [
            (
                "server.tcp_keepalive_idle_ms",
                self.server.tcp_keepalive_idle_ms,
            ),
            (
                "server.tcp_keepalive_interval_ms",
                self.server.tcp_keepalive_interval_ms,
            ),
        ] {
            if value % 1_000 != 0 {
                return Err(invalid(
                    key,
                    "must be a whole number of seconds (Linux counts keepalive times in seconds)",
                ));
            }
        }
        if self.router.max_client_connections == 0 {
            return Err(invalid(
                "router.max_client_connections",
                "must be at least 1",
            ));
        }
        if self.router.max_message_size < 1024 {
            return Err(invalid(
                "router.max_message_size",
                "must be at least 1024 bytes",
            ));
        }
        if let Some(threads) = self.router.worker_threads {
            if !(1..=1024).contains(&threads) {
                return Err(invalid(
                    "router.worker_threads",
                    "must be between 1 and 1024 (leave it out for one per CPU)",
                ));
            }
        }
        if let Some(dir) = &self.server.unix_socket_dir {
            if !dir.is_absolute() {
                return Err(invalid(
                    "server.unix_socket_dir",
                    format!(
                        "\"{}\" must be an absolute path, a directory of Postgres's unix_socket_directories such as /var/run/postgresql",
                        dir.display()
                    ),
                ));
            }
            // sun_path holds 108 bytes with its terminating NUL; Postgres
            // adds "/.s.PGSQL.<port>" (at most 16 bytes).
            if dir.as_os_str().len() > 107 - 16 {
                return Err(invalid(
                    "server.unix_socket_dir",
                    "is too long for a Unix socket path (at most 91 bytes)",
                ));
            }
        }
        if self.pool.pool_size == 0 || self.pool.pool_size > 10_000 {
            return Err(invalid("pool.pool_size", "must be between 1 and 10000"));
        }
        if self.pool.max_server_connections > 100_000 {
            return Err(invalid(
                "pool.max_server_connections",
                "must be between 0 (computed from the node) and 100000",
            ));
        }
        if self.pool.min_idle > self.pool.pool_size {
            return Err(invalid(
                "pool.min_idle",
                format!("must not exceed pool.pool_size ({})", self.pool.pool_size),
            ));
        }
        if self.auth.kind != AuthType::Trust && self.auth.file.is_none() {
            return Err(invalid(
                "auth.file",
                "md5 and scram-sha-256 need a user list file",
            ));
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(invalid(
                if self.tls.cert.is_some() {
                    "tls.key"
                } else {
                    "tls.cert"
                },
                "tls.cert and tls.key go together",
            ));
        }
        if self.tls.client_mode == ClientTlsMode::Require && self.tls.cert.is_none() {
            return Err(invalid(
                "tls.client_mode",
                "require needs tls.cert and tls.key (the certificate the router presents)",
            ));
        }
        if self.server.sslmode.verifies() && self.server.sslrootcert.is_none() {
            return Err(invalid(
                "server.sslrootcert",
                "server.sslmode verify-ca and verify-full need the CA certificate file the nodes' certificates are checked against",
            ));
        }
        if let Some(user) = &self.server.user {
            if user.is_empty() || user.contains('\0') {
                return Err(invalid("server.user", "must be a non-empty user name"));
            }
        }
        for (key, users) in [
            ("admin.admin_users", &self.admin.admin_users),
            ("admin.stats_users", &self.admin.stats_users),
        ] {
            if let Some(bad) = users.iter().find(|u| u.is_empty() || u.contains('\0')) {
                return Err(invalid(key, format!("{bad:?} is not a user name")));
            }
        }
        if !(1..=10_000).contains(&self.admin.failovers_kept) {
            return Err(invalid(
                "admin.failovers_kept",
                "must be between 1 and 10000",
            ));
        }
        self.metrics_addr()?;
        Ok(())
    }

    /// `metrics.listen` as a socket address, when set.
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        match &self.metrics.listen {
            None => Ok(None),
            Some(listen) => listen.parse().map(Some).map_err(|_| {
                invalid(
                    "metrics.listen",
                    format!("\"{listen}\" is not an address and port such as 127.0.0.1:9127"),
                )
            }),
        }
    }

    /// Whether `user` may run every console command (`admin.admin_users`).
    pub fn is_admin(&self, user: &str) -> bool {
        self.admin.admin_users.iter().any(|u| u == user)
    }

    /// Whether `user` may run the console's SHOW commands (`admin.admin_users`
    /// or `admin.stats_users`).
    pub fn may_show(&self, user: &str) -> bool {
        self.is_admin(user) || self.admin.stats_users.iter().any(|u| u == user)
    }

    /// `router.listen` as a socket address.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.router.listen.parse().map_err(|_| {
            invalid(
                "router.listen",
                format!(
                    "{:?} is not an address:port such as 127.0.0.1:{DEFAULT_PORT}",
                    self.router.listen
                ),
            )
        })
    }

    /// `router.listen_read_only` as a socket address, if set.
    pub fn read_only_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        let Some(addr) = &self.router.listen_read_only else {
            return Ok(None);
        };
        let parsed: SocketAddr = addr.parse().map_err(|_| {
            invalid(
                "router.listen_read_only",
                format!("{addr:?} is not an address:port such as 127.0.0.1:6433"),
            )
        })?;
        if self.listen_addr().is_ok_and(|main| main == parsed) {
            return Err(invalid(
                "router.listen_read_only",
                "must differ from router.listen",
            ));
        }
        Ok(Some(parsed))
    }

    /// `read_only.max_lag_ms` as a duration.
    pub fn read_max_lag(&self) -> Duration {
        Duration::from_millis(self.read_only.max_lag_ms)
    }

    /// `read_only.lag_check_interval_ms` as a duration.
    pub fn lag_check_interval(&self) -> Duration {
        Duration::from_millis(self.read_only.lag_check_interval_ms)
    }

    /// `router.pause_timeout_ms` as a duration.
    pub fn pause_timeout(&self) -> Duration {
        Duration::from_millis(self.router.pause_timeout_ms)
    }

    /// `router.drain_timeout_ms` as a duration: the switchover drain's and the
    /// shutdown drain's limit.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.router.drain_timeout_ms)
    }

    /// `router.login_timeout_ms` as a duration.
    pub fn login_timeout(&self) -> Duration {
        Duration::from_millis(self.router.login_timeout_ms)
    }

    /// `pool.idle_timeout_ms` as a duration; `None` when idle connections stay.
    pub fn pool_idle_timeout(&self) -> Option<Duration> {
        (self.pool.idle_timeout_ms > 0).then(|| Duration::from_millis(self.pool.idle_timeout_ms))
    }

    /// `pool.lifetime_ms` as a duration; `None` when connections live on.
    pub fn pool_lifetime(&self) -> Option<Duration> {
        (self.pool.lifetime_ms > 0).then(|| Duration::from_millis(self.pool.lifetime_ms))
    }

    /// `server.connect_timeout_ms` as a duration.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.server.connect_timeout_ms)
    }

    /// `server.tcp_user_timeout_ms` as a duration; `None` for the kernel's default.
    pub fn server_tcp_user_timeout(&self) -> Option<Duration> {
        (self.server.tcp_user_timeout_ms > 0)
            .then(|| Duration::from_millis(self.server.tcp_user_timeout_ms))
    }

    /// `server.tcp_keepalive_idle_ms` as a duration.
    pub fn server_keepalive_idle(&self) -> Duration {
        Duration::from_millis(self.server.tcp_keepalive_idle_ms)
    }

    /// `server.tcp_keepalive_interval_ms` as a duration.
    pub fn server_keepalive_interval(&self) -> Duration {
        Duration::from_millis(self.server.tcp_keepalive_interval_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TUTORIAL: &str = r#"
[router]
listen = "127.0.0.1:6432"
monitor = "postgres://autoctl_node@localhost:5000/pg_auto_failover"
formation = "default"

[auth]
type = "trust"
"#;

    #[test]
    fn tutorial_file_parses_with_defaults() {
        let config = RouterConfig::parse(Path::new("router.toml"), TUTORIAL).expect("parses");
        assert_eq!(config.router.listen, "127.0.0.1:6432");
        assert_eq!(config.auth.kind, AuthType::Trust);
        assert_eq!(config.router.pause_timeout_ms, 30_000);
        assert_eq!(config.server.sslmode, ServerSslMode::Prefer);
        assert_eq!(config.server.user, None);
        assert!(config.tls.cert.is_none());
        assert_eq!(config.pool, PoolSection::default());
        assert_eq!(config.pool.mode, PoolMode::Session);
        assert_eq!(config.pool.pool_size, 20);
        assert_eq!(config.pool.max_server_connections, 0);
        assert_eq!(config.router.worker_threads, None);
        assert_eq!(config.router.cpu_scheduling, CpuScheduling::Normal);
    }

    #[test]
    fn worker_threads_and_cpu_scheduling_parse_and_name_bad_values() {
        let text = TUTORIAL.replace(
            "formation = \"default\"",
            "formation = \"default\"\nworker_threads = 1\ncpu_scheduling = \"batch\"",
        );
        let config = RouterConfig::parse(Path::new("r.toml"), &text).expect("parses");
        assert_eq!(config.router.worker_threads, Some(1));
        assert_eq!(config.router.cpu_scheduling, CpuScheduling::Batch);
        let text = TUTORIAL.replace(
            "formation = \"default\"",
            "formation = \"default\"\nworker_threads = 0",
        );
        let err = RouterConfig::parse(Path::new("r.toml"), &text).expect_err("0 threads");
        assert!(
            err.to_string().starts_with("router.worker_threads"),
            "{err}"
        );
        let text = TUTORIAL.replace(
            "formation = \"default\"",
            "formation = \"default\"\ncpu_scheduling = \"realtime\"",
        );
        let err = RouterConfig::parse(Path::new("r.toml"), &text).expect_err("realtime");
        assert!(err.to_string().contains("cpu_scheduling"), "{err}");
        assert!(err.to_string().contains("batch"), "{err}");
    }

    #[test]
    fn unix_socket_dir_parses_and_names_bad_values() {
        let config = RouterConfig::parse(Path::new("r.toml"), TUTORIAL).expect("tutorial");
        assert_eq!(config.server.unix_socket_dir, None);
        let text = format!("{TUTORIAL}\n[server]\nunix_socket_dir = \"/var/run/postgresql\"\n");
        let config = RouterConfig::parse(Path::new("r.toml"), &text).expect("absolute");
        assert_eq!(
            config.server.unix_socket_dir.as_deref(),
            Some(Path::new("/var/run/postgresql"))
        );
        for (dir, says) in [
            ("run/postgresql", "absolute"),
            (&*format!("/{}", "d".repeat(100)), "too long"),
        ] {
            let text = format!("{TUTORIAL}\n[server]\nunix_socket_dir = \"{dir}\"\n");
            let err = RouterConfig::parse(Path::new("r.toml"), &text).expect_err(dir);
            let err = err.to_string();
            assert!(err.starts_with("server.unix_socket_dir"), "{err}");
            assert!(err.contains(says), "{err}");
        }
    }

    #[test]
    fn admin_and_metrics_sections_parse_and_name_bad_values() {
        let config = RouterConfig::parse(Path::new("r.toml"), TUTORIAL).expect("tutorial");
        assert_eq!(config.admin, AdminSection::default());
        assert_eq!(config.admin.failovers_kept, 50);
        assert_eq!(config.metrics_addr().expect("none"), None);
        let text = format!(
            "{TUTORIAL}\n[admin]\nadmin_users = [\"ops\"]\nstats_users = [\"grafana\"]\n\n[metrics]\nlisten = \"127.0.0.1:9127\"\n"
        );
        let config = RouterConfig::parse(Path::new("r.toml"), &text).expect("parses");
        assert!(config.is_admin("ops") && config.may_show("ops"));
        assert!(!config.is_admin("grafana") && config.may_show("grafana"));
        assert!(!config.may_show("app"));
        assert_eq!(
            config.metrics_addr().expect("addr").map(|a| a.port()),
            Some(9127)
        );
        for (section, key) in [
            ("[admin]\nadmin_users = [\"\"]", "admin.admin_users"),
            ("[admin]\nstats_users = [\"\"]", "admin.stats_users"),
            ("[admin]\nfailovers_kept = 0", "admin.failovers_kept"),
            ("[metrics]\nlisten = \"localhost\"", "metrics.listen"),
        ] {
            let text = format!("{TUTORIAL}\n{section}\n");
            let e = RouterConfig::parse(Path::new("r.toml"), &text).expect_err(section);
            assert!(e.to_string().contains(key), "{section}: {e}");
        }
        let text = format!("{TUTORIAL}\n[admin]\nadmins = [\"ops\"]\n");
        let e = RouterConfig::parse(Path::new("r.toml"), &text).expect_err("unknown key");
        assert!(e.to_string().contains("admins"), "{e}");
    }

    #[test]
    fn pool_section_parses_and_names_bad_keys() {
        let text = format!(
            "{TUTORIAL}\n[pool]\nmode = \"transaction\"\npool_size = 4\nmin_idle = 1\nidle_timeout_ms = 0\nlifetime_ms = 1000\n"
        );
        let config = RouterConfig::parse(Path::new("r.toml"), &text).expect("parses");
        assert_eq!(config.pool.mode, PoolMode::Transaction);
        assert_eq!(config.pool.pool_size, 4);
        assert_eq!(config.pool_idle_timeout(), None);
        assert_eq!(config.pool_lifetime(), Some(Duration::from_secs(1)));
        for (body, key) in [
            ("pool_size = 0", "pool.pool_size"),
            ("pool_size = 2\nmin_idle = 3", "pool.min_idle"),
            ("idle_timeout_ms = 100000000000", "pool.idle_timeout_ms"),
            ("lifetime_ms = 100000000000", "pool.lifetime_ms"),
            (
                "max_server_connections = 100001",
                "pool.max_server_connections",
            ),
        ] {
            let text = format!("{TUTORIAL}\n[pool]\n{body}\n");
            let err = RouterConfig::parse(Path::new("r.toml"), &text).expect_err(key);
            assert!(err.to_string().starts_with(key), "{key}: {err}");
        }
        let text = format!("{TUTORIAL}\n[pool]\nmode = \"statement\"\n");
        let err = RouterConfig::parse(Path::new("r.toml"), &text).expect_err("mode");
        assert!(err.to_string().contains("mode"), "{err}");
    }

    #[test]
    fn the_server_connection_limit_leaves_the_reserved_slots_and_a_margin() {
        let node = |max_connections, superuser_reserved_connections| NodeConnectionLimits {
            max_connections,
            superuser_reserved_connections,
        };
        for (max, reserved, configured, limit, too_many) in [
            // Computed: a tenth of the slots open to all (rounded up) is left.
            (100, 3, 0, 87, false),
            (50, 3, 0, 42, false),
            (10, 3, 0, 6, false),
            (5, 3, 0, 1, false),
            // A node whose reserved slots are all it has still gets one.
            (3, 3, 0, 1, false),
            // Configured: taken as it is up to the slots open to all.
            (100, 3, 40, 40, false),
            (100, 3, 97, 97, false),
            (100, 3, 98, 97, true),
            (50, 3, 1000, 47, true),
        ] {
            assert_eq!(
                server_connection_limit(node(max, reserved), configured),
                (limit, too_many),
                "max_connections {max}, reserved {reserved}, configured {configured}"
            );
        }
    }

    #[test]
    fn server_liveness_keys_parse_and_name_bad_values() {
        let config = RouterConfig::parse(Path::new("r.toml"), TUTORIAL).expect("tutorial");
        assert_eq!(
            config.server_tcp_user_timeout(),
            Some(Duration::from_secs(5))
        );
        assert_eq!(config.server_keepalive_idle(), Duration::from_secs(3));
        assert_eq!(config.server_keepalive_interval(), Duration::from_secs(1));
        let text = format!(
            "{TUTORIAL}\n[server]\ntcp_user_timeout_ms = 0\ntcp_keepalive_idle_ms = 10000\ntcp_keepalive_interval_ms = 2000\n"
        );
        let config = RouterConfig::parse(Path::new("r.toml"), &text).expect("parses");
        assert_eq!(config.server_tcp_user_timeout(), None);
        assert_eq!(config.server_keepalive_idle(), Duration::from_secs(10));
        assert_eq!(config.server_keepalive_interval(), Duration::from_secs(2));
        for (body, key, says) in [
            (
                "tcp_user_timeout_ms = 4000000",
                "server.tcp_user_timeout_ms",
                "between",
            ),
            (
                "tcp_keepalive_idle_ms = 0",
                "server.tcp_keepalive_idle_ms",
                "between",
            ),
            (
                "tcp_keepalive_idle_ms = 2500",
                "server.tcp_keepalive_idle_ms",
                "whole number of seconds",
            ),
            (
                "tcp_keepalive_interval_ms = 1500",
                "server.tcp_keepalive_interval_ms",
                "whole number of seconds",
            ),
        ] {
            let text = format!("{TUTORIAL}\n[server]\n{body}\n");
            let err = RouterConfig::parse(Path::new("r.toml"), &text).expect_err(key);
            let err = err.to_string();
            assert!(err.starts_with(key) && err.contains(says), "{key}: {err}");
        }
    }

    #[test]
    fn minimal_file_uses_default_port() {
        let config = RouterConfig::parse(
            Path::new("router.toml"),
            "[router]\nmonitor = \"postgres://m/pg_auto_failover\"\n",
        )
        .expect("parses");
        assert_eq!(config.listen_addr().expect("addr").port(), DEFAULT_PORT);
    }

    #[test]
    fn read_only_settings_parse_default_and_name_bad_values() {
        let config = RouterConfig::parse(Path::new("r.toml"), TUTORIAL).expect("parses");
        assert_eq!(config.router.listen_read_only, None);
        assert_eq!(config.read_only_addr().expect("ok"), None);
        assert_eq!(config.read_only.max_lag_bytes, 16 * 1024 * 1024);
        assert_eq!(config.read_only.max_lag_ms, 5_000);
        assert_eq!(config.read_only.fallback, ReadFallback::Primary);
        let text = TUTORIAL.replace(
            "formation =",
            "listen_read_only = \"127.0.0.1:6433\"\nformation =",
        ) + "\n[read_only]\nmax_lag_bytes = 1024\nfallback = \"wait\"\n";
        let config = RouterConfig::parse(Path::new("r.toml"), &text).expect("parses");
        assert_eq!(
            config.read_only_addr().expect("ok").map(|a| a.port()),
            Some(6433)
        );
        assert_eq!(config.read_only.max_lag_bytes, 1024);
        assert_eq!(config.read_only.fallback, ReadFallback::Wait);
        for (bad, key) in [
            ("[read_only]\nfallback = \"nowhere\"\n", "fallback"),
            ("[read_only]\nmax_lag = 1\n", "max_lag"),
            (
                "[read_only]\nlag_check_interval_ms = 0\n",
                "read_only.lag_check_interval_ms",
            ),
        ] {
            let text = format!("{TUTORIAL}\n{bad}");
            let err = RouterConfig::parse(Path::new("r.toml"), &text).expect_err("refused");
            assert!(err.to_string().contains(key), "{bad}: {err}");
        }
        let text = TUTORIAL.replace(
            "formation =",
            "listen_read_only = \"127.0.0.1:6432\"\nformation =",
        );
        let err = RouterConfig::parse(Path::new("r.toml"), &text).expect_err("refused");
        assert!(err.to_string().contains("router.listen_read_only"), "{err}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let text = TUTORIAL.replace("formation =", "formaton = \"x\"\nformation =");
        let err = RouterConfig::parse(Path::new("r.toml"), &text).expect_err("refused");
        assert!(err.to_string().contains("formaton"), "{err}");
        let text = format!("{TUTORIAL}\n[limits]\nx = 1\n");
        let err = RouterConfig::parse(Path::new("r.toml"), &text).expect_err("refused");
        assert!(err.to_string().contains("limits"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            (
                "listen = \"127.0.0.1:6432\"",
                "listen = \"nowhere\"",
                "router.listen",
            ),
            (
                "formation = \"default\"",
                "formation = \"a b\"",
                "router.formation",
            ),
            ("type = \"trust\"", "type = \"md5\"", "auth.file"),
            (
                "formation = \"default\"",
                "formation = \"default\"\nmax_client_connections = 0",
                "router.max_client_connections",
            ),
            (
                "formation = \"default\"",
                "formation = \"default\"\nmax_message_size = 10",
                "router.max_message_size",
            ),
        ];
        for (from, to, key) in cases {
            let text = TUTORIAL.replace(from, to);
            let err = RouterConfig::parse(Path::new("r.toml"), &text).expect_err(key);
            assert!(err.to_string().starts_with(key), "{key}: {err}");
        }
        let text = TUTORIAL.replace("type = \"trust\"", "type = \"plain\"");
        let err = RouterConfig::parse(Path::new("r.toml"), &text).expect_err("plain");
        assert!(err.to_string().contains("type"), "{err}");
        let text = format!("{TUTORIAL}\n[tls]\ncert = \"c.pem\"\n");
        let err = RouterConfig::parse(Path::new("r.toml"), &text).expect_err("tls");
        assert!(err.to_string().starts_with("tls.key"), "{err}");
    }

    #[test]
    fn tls_policies_parse_and_name_what_they_lack() {
        let config = RouterConfig::parse(Path::new("r.toml"), TUTORIAL).expect("tutorial");
        assert_eq!(config.tls.client_mode, ClientTlsMode::Allow);
        let text = format!(
            "{TUTORIAL}\n[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nclient_mode = \"require\"\n\n[server]\nsslmode = \"verify-full\"\nsslrootcert = \"ca.pem\"\n"
        );
        let config = RouterConfig::parse(Path::new("r.toml"), &text).expect("parses");
        assert_eq!(config.tls.client_mode, ClientTlsMode::Require);
        assert_eq!(config.server.sslmode, ServerSslMode::VerifyFull);
        assert_eq!(
            config.server.sslrootcert.as_deref(),
            Some(Path::new("ca.pem"))
        );
        for (body, key) in [
            ("[tls]\nclient_mode = \"require\"", "tls.client_mode"),
            ("[server]\nsslmode = \"verify-ca\"", "server.sslrootcert"),
            ("[server]\nsslmode = \"verify-full\"", "server.sslrootcert"),
        ] {
            let text = format!("{TUTORIAL}\n{body}\n");
            let err = RouterConfig::parse(Path::new("r.toml"), &text).expect_err(key);
            assert!(err.to_string().starts_with(key), "{key}: {err}");
        }
        let text = format!("{TUTORIAL}\n[tls]\nclient_mode = \"prefer\"\n");
        let err = RouterConfig::parse(Path::new("r.toml"), &text).expect_err("prefer");
        assert!(err.to_string().contains("client_mode"), "{err}");
    }
}
