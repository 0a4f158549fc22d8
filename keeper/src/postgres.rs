//! The local Postgres instance: its tools (initdb, pg_ctl, pg_basebackup,
//! pg_rewind) run as the right OS user, the configuration files hapg owns in the
//! data directory, and what the keeper observes about the running server.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use hapg_config::{NodeConfig, SslConfig};
use hapg_monitor::pgconn::{self, parse_lsn};
use hapg_monitor::schema::{HEALTH_CHECK_ROLE, REPLICATION_ROLE};
use tokio::process::Command;
use tokio_postgres::{Client, Config};

use crate::error::KeeperError;
use crate::rejoin::{PrimaryHistory, Timeline};

/// Directory for the instance's Unix socket: writable by any OS user, and what
/// the keeper uses to reach its own Postgres without a password.
pub const SOCKET_DIR: &str = "/tmp";
/// The configuration file hapg owns, included from postgresql.conf.
pub const HAPG_CONF: &str = "postgresql.hapg.conf";
/// The standby settings hapg owns, included from postgresql.conf.
pub const STANDBY_CONF: &str = "postgresql.hapg-standby.conf";
/// The server log pg_ctl writes to, in the data directory.
pub const LOG_FILE: &str = "postgres.log";

/// How `pg_ctl stop` shuts Postgres down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Sessions are ended, a shutdown checkpoint is written: the normal stop.
    Fast,
    /// No checkpoint: the next start runs crash recovery. For a shutdown
    /// that must not wait (`hapg stop --immediate`, a failed create).
    Immediate,
}

impl StopMode {
    /// `pg_ctl stop --mode` argument.
    pub fn as_str(self) -> &'static str {
        match self {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

/// The server settings the keeper changes at run time with `ALTER SYSTEM`
/// (everything else it needs is in [`HAPG_CONF`], written before a start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemSetting {
    /// `synchronous_standby_names`: which standbys a commit waits for.
    SynchronousStandbyNames,
    /// `default_transaction_read_only`: `on` while a promoted node must not
    /// take writes yet.
    DefaultTransactionReadOnly,
}

impl SystemSetting {
    /// The GUC's name.
    pub fn name(self) -> &'static str {
        match self {
            SystemSetting::SynchronousStandbyNames => "synchronous_standby_names",
            SystemSetting::DefaultTransactionReadOnly => "default_transaction_read_only",
        }
    }
}

/// The pid a `postmaster.pid` names, when that process has exited and waits
/// to be reaped (a zombie).
fn zombie_lock(lock: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(lock).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    let exists = Path::new(&format!("/proc/{pid}")).exists();
    (exists && !crate::pidfile::process_alive(pid)).then_some(pid)
}

/// The last `lines` lines of a log file, or a note that it cannot be read.
fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let tail: Vec<&str> = text.lines().rev().take(lines).collect();
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        }
        Err(e) => format!("(cannot read it: {e})"),
    }
}

/// The OS user that owns the data directory and runs Postgres.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OsUser {
    /// Name.
    pub name: String,
    /// Uid.
    pub uid: u32,
    /// Primary gid.
    pub gid: u32,
}

impl OsUser {
    /// When hapg runs as root, Postgres runs as `name`; otherwise as hapg's own user.
    pub fn for_running_as(name: &str) -> Result<Option<OsUser>, KeeperError> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(None);
        }
        let user = nix::unistd::User::from_name(name)
            .map_err(|e| KeeperError::OsUser(format!("cannot look up OS user {name:?}: {e}")))?
            .ok_or_else(|| {
                KeeperError::OsUser(format!(
                    "hapg runs as root, and Postgres refuses to: it runs Postgres as --os-user {name:?}, \
                     which does not exist. Create it (useradd --system {name}) or pass --os-user"
                ))
            })?;
        Ok(Some(OsUser {
            name: name.to_string(),
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        }))
    }
}

/// Where a standby streams from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
}

/// What the keeper sees of its running Postgres.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observation {
    /// Postgres accepts connections.
    pub running: bool,
    /// It is a standby.
    pub in_recovery: bool,
    /// Timeline: the primary's, or the one a standby last received WAL on.
    pub tli: i32,
    /// `tli` comes from the WAL (false: a standby without a WAL receiver, whose
    /// only clue is its last restartpoint's timeline, which can be older).
    pub tli_is_exact: bool,
    /// Flush LSN on a primary, receive (or replay) LSN on a standby.
    pub lsn: u64,
    /// A standby's WAL receiver is streaming.
    pub upstream_streaming: bool,
    /// While the WAL receiver streams: how long ago it last received a
    /// message (WAL or keepalive) from the primary.
    pub upstream_silence: Option<Duration>,
    /// Best sync_state among hapg standbys connected to a primary.
    pub rep_state: String,
    /// How long ago this primary last heard from a standby (its latest reply,
    /// or the start of a base backup's connection); `None` without any.
    pub standby_reply_age: Option<Duration>,
    /// `synchronous_standby_names` in force.
    pub synchronous_standby_names: String,
    /// A standby's replay distance behind the end of the primary's WAL as
    /// its walsender last told it (`latest_end_lsn`), in bytes.
    pub replay_lag_bytes: Option<u64>,
    /// A standby's replay delay: none when it has replayed all it received,
    /// else the age of the last transaction it replayed.
    pub replay_delay: Option<Duration>,
}

/// The local instance and how to drive it.
#[derive(Debug, Clone)]
pub struct LocalPostgres {
    /// Data directory.
    pub pgdata: PathBuf,
    /// Port.
    pub port: u16,
    /// `listen_addresses`.
    pub listen_addresses: String,
    /// Binaries.
    pub bindir: PathBuf,
    /// Runs Postgres when hapg is root.
    pub os_user: Option<OsUser>,
    /// Superuser name.
    pub username: String,
    /// Application database.
    pub dbname: String,
    /// TLS settings.
    pub ssl: SslConfig,
    /// Method for the pg_hba rules hapg writes.
    pub auth_method: String,
    /// Leave pg_hba.conf alone.
    pub skip_pg_hba: bool,
    /// Replication user's password.
    pub replication_password: Option<String>,
    /// Host name for the self-signed certificate.
    pub hostname: String,
    /// `wal_sender_timeout` written into the configuration.
    pub wal_sender_timeout: Duration,
}

impl LocalPostgres {
    /// The instance described by a node configuration file.
    pub fn from_config(config: &NodeConfig) -> Result<LocalPostgres, KeeperError> {
        Ok(LocalPostgres {
            pgdata: config.postgresql.pgdata.clone(),
            port: config.postgresql.port,
            listen_addresses: config.postgresql.listen_addresses.clone(),
            bindir: config.postgresql.bindir.clone(),
            os_user: OsUser::for_running_as(&config.node.os_user)?,
            username: config.postgresql.username.clone(),
            dbname: config.postgresql.dbname.clone(),
            ssl: config.ssl.clone(),
            auth_method: config.postgresql.auth_method.clone(),
            skip_pg_hba: config.postgresql.skip_pg_hba,
            replication_password: config.replication.password.clone(),
            hostname: config.node.hostname.clone(),
            wal_sender_timeout: config.timeout.wal_sender_timeout(),
        })
    }

    fn command(&self, tool: &str) -> Command {
        let mut cmd = Command::new(self.bindir.join(tool));
        if let Some(user) = &self.os_user {
            cmd.uid(user.uid).gid(user.gid);
            cmd.env("HOME", "/tmp").env("USER", &user.name);
        }
        cmd.env("PGCONNECT_TIMEOUT", "5")
            .env_remove("PGDATA")
            .env_remove("PGHOST")
            .env_remove("PGPORT")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(password) = &self.replication_password {
            cmd.env("PGPASSWORD", password);
        }
        cmd
    }

    /// Runs a Postgres tool to completion; its output goes into the error if it fails.
    async fn run_tool<I, S>(&self, tool: &str, args: I) -> Result<String, KeeperError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(tool);
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        tracing::debug!(?cmd, "running");
        let output = cmd.output().await.map_err(|source| KeeperError::Spawn {
            tool: tool.to_string(),
            source,
        })?;
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        if output.status.success() {
            Ok(text)
        } else {
            let tail: Vec<&str> = text.lines().rev().take(12).collect();
            Err(KeeperError::Tool {
                tool: tool.to_string(),
                status: output.status.to_string(),
                output: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            })
        }
    }

    /// Gives a file or directory to the OS user that runs Postgres.
    pub fn chown(&self, path: &Path) -> Result<(), KeeperError> {
        if let Some(user) = &self.os_user {
            std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
                .map_err(|e| KeeperError::io(path, e))?;
        }
        Ok(())
    }

    /// Writes a file into the data directory, owned by the Postgres OS user.
    fn write_owned(&self, name: &str, contents: &str, mode: u32) -> Result<(), KeeperError> {
        let path = self.pgdata.join(name);
        std::fs::write(&path, contents).map_err(|e| KeeperError::io(&path, e))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| KeeperError::io(&path, e))?;
        self.chown(&path)
    }

    /// The data directory holds an initialised cluster.
    pub fn is_initialized(&self) -> bool {
        self.pgdata.join("PG_VERSION").exists()
    }

    /// Checks that the OS user can reach the data directory's parent, so Postgres
    /// will be able to use it; names the directory that blocks it otherwise.
    pub fn check_access(&self) -> Result<(), KeeperError> {
        let Some(user) = &self.os_user else {
            return Ok(());
        };
        let mut dir = self.pgdata.parent();
        while let Some(d) = dir {
            if let Ok(meta) = std::fs::metadata(d) {
                use std::os::unix::fs::MetadataExt;
                let mode = meta.mode();
                let searchable = if meta.uid() == user.uid {
                    mode & 0o100 != 0
                } else if meta.gid() == user.gid {
                    mode & 0o010 != 0
                } else {
                    mode & 0o001 != 0
                };
                if !searchable {
                    return Err(KeeperError::OsUser(format!(
                        "Postgres runs as OS user {:?}, which cannot reach {}: {} is not searchable by it. \
                         Use a data directory outside it (for example under /var/lib/hapg) or run chmod o+x {}",
                        user.name,
                        self.pgdata.display(),
                        d.display(),
                        d.display()
                    )));
                }
            }
            dir = d.parent();
        }
        Ok(())
    }

    /// Creates the data directory (mode 0700, owned by the OS user) if missing.
    pub fn create_pgdata(&self) -> Result<(), KeeperError> {
        std::fs::create_dir_all(&self.pgdata).map_err(|e| KeeperError::io(&self.pgdata, e))?;
        std::fs::set_permissions(&self.pgdata, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| KeeperError::io(&self.pgdata, e))?;
        self.chown(&self.pgdata)
    }

    /// Runs initdb into an empty data directory.
    pub async fn initdb(&self) -> Result<(), KeeperError> {
        self.create_pgdata()?;
        let auth_host = if self.auth_method == "trust" {
            "trust"
        } else {
            self.auth_method.as_str()
        };
        self.run_tool(
            "initdb",
            [
                OsStr::new("--pgdata"),
                self.pgdata.as_os_str(),
                OsStr::new("--username"),
                OsStr::new(&self.username),
                OsStr::new("--encoding=UTF8"),
                OsStr::new("--no-locale"),
                OsStr::new("--auth-local=trust"),
                OsStr::new(&format!("--auth-host={auth_host}")),
            ],
        )
        .await?;
        Ok(())
    }

    /// Writes `postgresql.hapg.conf` (the settings hapg needs) and makes sure
    /// postgresql.conf includes it and the standby file. Run before every start:
    /// pg_basebackup and pg_rewind copy these files from another node.
    pub fn write_config(&self, extra: &[(&str, String)]) -> Result<(), KeeperError> {
        let mut conf = format!(
            "# Written by hapg: it is rewritten before every start, edit postgresql.conf instead.\n\
             listen_addresses = '{}'\n\
             port = {}\n\
             unix_socket_directories = '{SOCKET_DIR}'\n\
             wal_level = 'replica'\n\
             wal_log_hints = on\n\
             max_wal_senders = 12\n\
             max_replication_slots = 12\n\
             wal_keep_size = '512MB'\n\
             hot_standby = on\n\
             hot_standby_feedback = on\n\
             synchronous_commit = on\n\
             wal_sender_timeout = '{}ms'\n\
             wal_receiver_timeout = '5s'\n\
             wal_receiver_status_interval = '1s'\n\
             wal_retrieve_retry_interval = '500ms'\n\
             password_encryption = 'scram-sha-256'\n\
             ssl = {}\n",
            self.listen_addresses.replace('\'', "''"),
            self.port,
            self.wal_sender_timeout.as_millis(),
            if self.ssl.active { "on" } else { "off" },
        );
        if self.ssl.active {
            let quoted = |path: &Option<PathBuf>, default: &str| {
                path.as_ref().map_or(default.to_string(), |p| {
                    p.display().to_string().replace('\'', "''")
                })
            };
            conf.push_str(&format!(
                "ssl_cert_file = '{}'\nssl_key_file = '{}'\n",
                quoted(&self.ssl.cert_file, "server.crt"),
                quoted(&self.ssl.key_file, "server.key")
            ));
            if self.ssl.ca_file.is_some() {
                conf.push_str(&format!(
                    "ssl_ca_file = '{}'\n",
                    quoted(&self.ssl.ca_file, "")
                ));
            }
        }
        for (key, value) in extra {
            conf.push_str(&format!("{key} = {value}\n"));
        }
        self.write_owned(HAPG_CONF, &conf, 0o600)?;
        let standby = self.pgdata.join(STANDBY_CONF);
        if !standby.exists() {
            self.write_owned(STANDBY_CONF, "", 0o600)?;
        }
        let main = self.pgdata.join("postgresql.conf");
        let text = std::fs::read_to_string(&main).map_err(|e| KeeperError::io(&main, e))?;
        if !text.contains(HAPG_CONF) {
            let text = format!(
                "{text}\n# hapg\ninclude_if_exists = '{HAPG_CONF}'\ninclude_if_exists = '{STANDBY_CONF}'\n"
            );
            std::fs::write(&main, text).map_err(|e| KeeperError::io(&main, e))?;
        }
        if self.ssl.active && self.ssl.self_signed {
            self.ensure_certificate()?;
        }
        Ok(())
    }

    /// Generates the self-signed certificate and key if they are missing.
    fn ensure_certificate(&self) -> Result<(), KeeperError> {
        if self.pgdata.join("server.crt").exists() && self.pgdata.join("server.key").exists() {
            return Ok(());
        }
        let cert =
            rcgen::generate_simple_self_signed(vec![self.hostname.clone()]).map_err(|e| {
                KeeperError::Refused(format!("cannot generate a self-signed certificate: {e}"))
            })?;
        self.write_owned("server.crt", &cert.cert.pem(), 0o644)?;
        self.write_owned("server.key", &cert.key_pair.serialize_pem(), 0o600)?;
        Ok(())
    }

    /// Writes the standby settings: stream from `upstream` as
    /// `application_name`, through the replication slot of the same name when
    /// `use_slot` (a primary keeps one per standby; a standby serving WAL to a
    /// fast-forwarding peer has none), or, with no upstream, stay a standby that
    /// streams from nobody. Creates standby.signal.
    pub fn write_standby_config(
        &self,
        upstream: Option<&Upstream>,
        application_name: &str,
        use_slot: bool,
    ) -> Result<(), KeeperError> {
        let conf = match upstream {
            Some(up) => {
                let mut conninfo = format!(
                    "application_name={application_name} host={} port={} user={REPLICATION_ROLE} dbname=postgres {} connect_timeout=2 keepalives_idle=2 keepalives_interval=1 keepalives_count=3",
                    up.host,
                    up.port,
                    self.ssl.libpq_params(),
                );
                if let Some(password) = &self.replication_password {
                    conninfo.push_str(&format!(" password={password}"));
                }
                let slot = if use_slot {
                    format!("primary_slot_name = '{application_name}'\n")
                } else {
                    String::new()
                };
                format!(
                    "primary_conninfo = '{}'\n{slot}recovery_target_timeline = 'latest'\n",
                    conninfo.replace('\'', "''")
                )
            }
            None => "primary_conninfo = ''\nrecovery_target_timeline = 'latest'\n".to_string(),
        };
        self.write_owned(STANDBY_CONF, &conf, 0o600)?;
        self.write_owned("standby.signal", "", 0o600)
    }

    /// Removes the standby settings (after a promotion).
    pub fn clear_standby_config(&self) -> Result<(), KeeperError> {
        self.write_owned(STANDBY_CONF, "", 0o600)?;
        let signal = self.pgdata.join("standby.signal");
        if signal.exists() {
            std::fs::remove_file(&signal).map_err(|e| KeeperError::io(&signal, e))?;
        }
        Ok(())
    }

    /// Writes pg_hba.conf: local trust for the keeper, trust for the monitor's
    /// health checks (they authenticate nothing secret), and `auth_method` for
    /// replication from other nodes and for applications.
    /// Returns true when the file changed (Postgres then needs a reload).
    pub fn write_hba(&self, other_hosts: &[String]) -> Result<bool, KeeperError> {
        if self.skip_pg_hba {
            return Ok(false);
        }
        let auth = &self.auth_method;
        let mut hba = format!(
            "# Written by hapg (--skip-pg-hba to manage this file yourself).\n\
             local   all          all                                   trust\n\
             host    all          {HEALTH_CHECK_ROLE}  all                trust\n\
             host    replication  {REPLICATION_ROLE}  samenet     {auth}\n\
             host    all          {REPLICATION_ROLE}  samenet     {auth}\n"
        );
        for host in other_hosts {
            let host = hba_address(host);
            hba.push_str(&format!(
                "host    replication  {REPLICATION_ROLE}  {host}  {auth}\n\
                 host    all          {REPLICATION_ROLE}  {host}  {auth}\n"
            ));
        }
        hba.push_str(&format!(
            "host    all          all          samenet                   {auth}\n"
        ));
        let path = self.pgdata.join("pg_hba.conf");
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        if current == hba {
            return Ok(false);
        }
        self.write_owned("pg_hba.conf", &hba, 0o600)?;
        Ok(true)
    }

    /// The postmaster's pid, if one is running for this data directory.
    pub fn postmaster_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.pgdata.join("postmaster.pid")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok()?;
        crate::pidfile::process_alive(pid).then_some(pid)
    }

    /// Removes `postmaster.pid` when the postmaster it names has exited but
    /// is not yet reaped (a zombie). Postgres takes such a pid for a running
    /// postmaster and refuses to start ("lock file already exists") until the
    /// parent reaps it, which an init process that reaps late (as in some VMs
    /// and containers) delays for seconds: long enough to turn a restart in
    /// place into a failover. The postmaster is gone, so the lock is stale;
    /// Postgres still refuses to start while any of its old backends holds
    /// the shared memory.
    fn remove_stale_lock(&self) -> Result<(), KeeperError> {
        let lock = self.pgdata.join("postmaster.pid");
        if let Some(pid) = zombie_lock(&lock) {
            tracing::warn!(pid, "the previous postmaster exited but is not reaped yet: removing its stale postmaster.pid");
            std::fs::remove_file(&lock).map_err(|e| KeeperError::io(&lock, e))?;
        }
        Ok(())
    }

    /// Starts Postgres and waits until it accepts connections.
    pub async fn start(&self) -> Result<(), KeeperError> {
        if self.postmaster_pid().is_some() {
            return Ok(());
        }
        self.remove_stale_lock()?;
        let log = self.pgdata.join(LOG_FILE);
        let result = self
            .run_tool(
                "pg_ctl",
                [
                    OsStr::new("start"),
                    OsStr::new("--pgdata"),
                    self.pgdata.as_os_str(),
                    OsStr::new("--wait"),
                    OsStr::new("--timeout=60"),
                    OsStr::new("--silent"),
                    OsStr::new("--log"),
                    log.as_os_str(),
                ],
            )
            .await;
        match result {
            Ok(_) => Ok(()),
            // pg_ctl only says "Examine the log output": name the log and quote
            // its end, which holds Postgres's own reason.
            Err(KeeperError::Tool {
                tool,
                status,
                output,
            }) => Err(KeeperError::Tool {
                tool,
                status,
                output: format!(
                    "{output}\nthe server log {} ends with:\n{}",
                    log.display(),
                    log_tail(&log, 8)
                ),
            }),
            Err(e) => Err(e),
        }
    }

    /// Undoes a `create` that failed part-way: stops the Postgres it may have
    /// started, keeps its server log beside the data directory
    /// (`<pgdata>.postgres.log`, returned when there was one), then removes
    /// what initdb wrote, and the data directory itself unless it `existed`
    /// (empty) before.
    pub async fn remove_failed(&self, existed: bool) -> Result<Option<PathBuf>, KeeperError> {
        if self.postmaster_pid().is_some() {
            self.stop(StopMode::Immediate).await?;
        }
        let log = self.pgdata.join(LOG_FILE);
        let kept = log.exists().then(|| {
            let mut name = self.pgdata.as_os_str().to_owned();
            name.push(".postgres.log");
            PathBuf::from(name)
        });
        if let Some(kept) = &kept {
            std::fs::rename(&log, kept).map_err(|e| KeeperError::io(kept, e))?;
        }
        self.empty_or_remove(existed)?;
        Ok(kept)
    }

    fn empty_or_remove(&self, existed: bool) -> Result<(), KeeperError> {
        if !existed {
            return std::fs::remove_dir_all(&self.pgdata)
                .map_err(|e| KeeperError::io(&self.pgdata, e));
        }
        let entries =
            std::fs::read_dir(&self.pgdata).map_err(|e| KeeperError::io(&self.pgdata, e))?;
        for entry in entries {
            let path = entry.map_err(|e| KeeperError::io(&self.pgdata, e))?.path();
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.map_err(|e| KeeperError::io(&path, e))?;
        }
        Ok(())
    }

    /// Stops Postgres and waits until it is down.
    pub async fn stop(&self, mode: StopMode) -> Result<(), KeeperError> {
        if self.postmaster_pid().is_none() {
            return Ok(());
        }
        let result = self
            .run_tool(
                "pg_ctl",
                [
                    OsStr::new("stop"),
                    OsStr::new("--pgdata"),
                    self.pgdata.as_os_str(),
                    OsStr::new("--wait"),
                    OsStr::new("--timeout=60"),
                    OsStr::new("--silent"),
                    OsStr::new("--mode"),
                    OsStr::new(mode.as_str()),
                ],
            )
            .await;
        match result {
            Ok(_) => Ok(()),
            // pg_ctl complains when the server vanished between our check and its own.
            Err(_) if self.postmaster_pid().is_none() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// A superuser connection to the local instance over its Unix socket.
    pub async fn connect(&self) -> Result<Client, KeeperError> {
        self.connect_to("postgres").await
    }

    /// A superuser connection to database `dbname`.
    pub async fn connect_to(&self, dbname: &str) -> Result<Client, KeeperError> {
        let mut config = Config::new();
        config
            .host_path(SOCKET_DIR)
            .port(self.port)
            .user(&self.username)
            .dbname(dbname)
            .application_name("hapg keeper");
        let connection = pgconn::connect(config, Duration::from_secs(2)).await?;
        Ok(connection.client)
    }

    /// Observes the running instance; `running: false` when it does not answer.
    pub async fn observe(&self) -> Observation {
        match self.try_observe().await {
            Ok(o) => o,
            Err(e) => {
                tracing::debug!(error = %e, "local postgres does not answer");
                Observation::default()
            }
        }
    }

    async fn try_observe(&self) -> Result<Observation, KeeperError> {
        let client = self.connect().await?;
        let row = client
            .query_one(
                "SELECT pg_is_in_recovery(),
                        (CASE WHEN pg_is_in_recovery()
                              THEN greatest(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())
                              ELSE pg_current_wal_flush_lsn() END)::text,
                        CASE WHEN pg_is_in_recovery()
                             THEN (SELECT received_tli FROM pg_stat_wal_receiver
                                    WHERE received_tli > 0)
                             ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int
                        END,
                        (SELECT timeline_id FROM pg_control_checkpoint()),
                        coalesce((SELECT status = 'streaming' FROM pg_stat_wal_receiver), false),
                        coalesce((SELECT sync_state FROM pg_stat_replication
                                   WHERE application_name LIKE 'pgautofailover_standby_%'
                                   ORDER BY CASE sync_state WHEN 'quorum' THEN 0 WHEN 'sync' THEN 1
                                                            WHEN 'potential' THEN 2 ELSE 3 END
                                   LIMIT 1), ''),
                        -- When a standby was last heard from (it replies at least
                        -- every wal_receiver_status_interval, 1 s): a walsender
                        -- whose standby is cut off lingers until wal_sender_timeout.
                        (SELECT extract(epoch FROM clock_timestamp()
                                        - max(coalesce(reply_time, backend_start)))::float8
                           FROM pg_stat_replication WHERE usename = $1),
                        current_setting('synchronous_standby_names'),
                        -- last_msg_receipt_time is stamped on every message from
                        -- the walsender, keepalives included (pg_stat_wal_receiver).
                        (SELECT extract(epoch FROM clock_timestamp() - last_msg_receipt_time)::float8
                           FROM pg_stat_wal_receiver WHERE status = 'streaming'),
                        -- For the health endpoints' ?lag= (docs/operations.md).
                        (SELECT greatest(latest_end_lsn - pg_last_wal_replay_lsn(), 0)::float8
                           FROM pg_stat_wal_receiver WHERE status = 'streaming'),
                        CASE WHEN pg_is_in_recovery() THEN
                             CASE WHEN pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() THEN 0
                                  ELSE extract(epoch FROM clock_timestamp()
                                               - pg_last_xact_replay_timestamp())::float8 END
                        END",
                &[&REPLICATION_ROLE],
            )
            .await?;
        let lsn: Option<String> = row.try_get(1)?;
        let exact_tli: Option<i32> = row.try_get(2)?;
        let checkpoint_tli: Option<i32> = row.try_get(3)?;
        Ok(Observation {
            running: true,
            in_recovery: row.try_get(0)?,
            lsn: lsn.as_deref().and_then(parse_lsn).unwrap_or(0),
            tli: exact_tli.or(checkpoint_tli).unwrap_or(1),
            tli_is_exact: exact_tli.is_some(),
            upstream_streaming: row.try_get(4)?,
            rep_state: row.try_get(5)?,
            standby_reply_age: row
                .try_get::<_, Option<f64>>(6)?
                .map(|seconds| Duration::from_secs_f64(seconds.max(0.0))),
            synchronous_standby_names: row.try_get(7)?,
            upstream_silence: row
                .try_get::<_, Option<f64>>(8)?
                .map(|seconds| Duration::from_secs_f64(seconds.max(0.0))),
            replay_lag_bytes: row
                .try_get::<_, Option<f64>>(9)?
                .map(|bytes| bytes.max(0.0) as u64),
            replay_delay: row
                .try_get::<_, Option<f64>>(10)?
                .map(|seconds| Duration::from_secs_f64(seconds.max(0.0))),
        })
    }

    /// `synchronous_standby_names` (empty: commits wait for no standby).
    pub async fn set_synchronous_standby_names(&self, names: &str) -> Result<(), KeeperError> {
        self.set_system(SystemSetting::SynchronousStandbyNames, names)
            .await
    }

    /// `default_transaction_read_only`.
    pub async fn set_default_read_only(&self, read_only: bool) -> Result<(), KeeperError> {
        let value = if read_only { "on" } else { "off" };
        self.set_system(SystemSetting::DefaultTransactionReadOnly, value)
            .await
    }

    /// `ALTER SYSTEM SET setting = value` and reload.
    async fn set_system(&self, setting: SystemSetting, value: &str) -> Result<(), KeeperError> {
        let key = setting.name();
        let client = self.connect().await?;
        let current: String = client
            .query_one("SELECT current_setting($1)", &[&key])
            .await?
            .try_get(0)?;
        if current == value {
            return Ok(());
        }
        // ALTER SYSTEM refuses to run in the implicit transaction of a multi-statement query.
        client
            .batch_execute(&format!(
                "ALTER SYSTEM SET {key} = '{}'",
                value.replace('\'', "''")
            ))
            .await?;
        client.batch_execute("SELECT pg_reload_conf()").await?;
        // The reload is asynchronous: wait until this backend's successors see it.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let fresh = self.connect().await?;
            let now: String = fresh
                .query_one("SELECT current_setting($1)", &[&key])
                .await?
                .try_get(0)?;
            if now == value {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(KeeperError::Timeout(format!(
                    "{key} did not change to {value:?} after a reload"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Reloads the configuration files.
    pub async fn reload(&self) -> Result<(), KeeperError> {
        self.connect()
            .await?
            .batch_execute("SELECT pg_reload_conf()")
            .await?;
        Ok(())
    }

    /// Creates the roles hapg needs and the application database (primary only).
    pub async fn create_roles_and_database(&self) -> Result<(), KeeperError> {
        let client = self.connect().await?;
        let password = match &self.replication_password {
            Some(p) => format!(" PASSWORD '{}'", p.replace('\'', "''")),
            None => String::new(),
        };
        client
            .batch_execute(&format!(
                "DO $$ BEGIN
                   IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{REPLICATION_ROLE}') THEN
                     CREATE ROLE {REPLICATION_ROLE} WITH LOGIN SUPERUSER REPLICATION{password};
                   END IF;
                   IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{HEALTH_CHECK_ROLE}') THEN
                     CREATE ROLE {HEALTH_CHECK_ROLE} WITH LOGIN CONNECTION LIMIT 5;
                   END IF;
                 END $$;"
            ))
            .await?;
        if !password.is_empty() {
            client
                .batch_execute(&format!("ALTER ROLE {REPLICATION_ROLE} WITH{password}"))
                .await?;
        }
        let exists = client
            .query_opt(
                "SELECT 1 FROM pg_database WHERE datname = $1",
                &[&self.dbname],
            )
            .await?
            .is_some();
        if !exists {
            client
                .batch_execute(&format!(
                    "CREATE DATABASE {}",
                    postgres_escape_identifier(&self.dbname)
                ))
                .await?;
        }
        Ok(())
    }

    /// Makes sure a physical replication slot exists for each name, and drops
    /// other hapg slots (a node that left must not hold WAL forever).
    pub async fn sync_replication_slots(&self, wanted: &[String]) -> Result<(), KeeperError> {
        let client = self.connect().await?;
        let rows = client
            .query(
                "SELECT slot_name, active FROM pg_replication_slots
                  WHERE slot_name LIKE 'pgautofailover_standby_%'",
                &[],
            )
            .await?;
        for row in &rows {
            let name: String = row.try_get(0)?;
            let active: bool = row.try_get(1)?;
            if !wanted.contains(&name) && !active {
                client
                    .execute("SELECT pg_drop_replication_slot($1)", &[&name])
                    .await?;
            }
        }
        for name in wanted {
            let exists = rows
                .iter()
                .any(|r| r.try_get::<_, String>(0).is_ok_and(|n| &n == name));
            if !exists {
                client
                    .execute(
                        "SELECT pg_create_physical_replication_slot($1, true)",
                        &[name],
                    )
                    .await?;
            }
        }
        Ok(())
    }

    /// pg_basebackup from `upstream` into a fresh directory beside the data
    /// directory, which then replaces it; a half-done copy never stands in its place.
    pub async fn basebackup(&self, upstream: &Upstream, slot: &str) -> Result<(), KeeperError> {
        let staging = self.pgdata.with_extension("hapg-basebackup");
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(|e| KeeperError::io(&staging, e))?;
        }
        std::fs::create_dir_all(&staging).map_err(|e| KeeperError::io(&staging, e))?;
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| KeeperError::io(&staging, e))?;
        self.chown(&staging)?;
        let port = upstream.port.to_string();
        let dbname = self.ssl.libpq_params();
        let args: Vec<&OsStr> = vec![
            OsStr::new("--pgdata"),
            staging.as_os_str(),
            OsStr::new("--host"),
            OsStr::new(&upstream.host),
            OsStr::new("--port"),
            OsStr::new(&port),
            OsStr::new("--username"),
            OsStr::new(REPLICATION_ROLE),
            OsStr::new("--dbname"),
            OsStr::new(&dbname),
            OsStr::new("--wal-method=stream"),
            OsStr::new("--checkpoint=fast"),
            OsStr::new("--no-password"),
            OsStr::new("--slot"),
            OsStr::new(slot),
        ];
        self.run_tool("pg_basebackup", args).await?;
        if self.pgdata.exists() {
            let old = self.pgdata.with_extension("hapg-old");
            if old.exists() {
                std::fs::remove_dir_all(&old).map_err(|e| KeeperError::io(&old, e))?;
            }
            std::fs::rename(&self.pgdata, &old).map_err(|e| KeeperError::io(&self.pgdata, e))?;
            std::fs::rename(&staging, &self.pgdata).map_err(|e| KeeperError::io(&staging, e))?;
            std::fs::remove_dir_all(&old).map_err(|e| KeeperError::io(&old, e))?;
        } else {
            std::fs::rename(&staging, &self.pgdata).map_err(|e| KeeperError::io(&staging, e))?;
        }
        Ok(())
    }

    /// pg_rewind from `upstream` (Postgres must be stopped). pg_rewind itself runs
    /// crash recovery first when the instance was not shut down cleanly.
    pub async fn rewind(&self, upstream: &Upstream) -> Result<(), KeeperError> {
        let source = format!(
            "host={} port={} user={REPLICATION_ROLE} dbname=postgres {} connect_timeout=5",
            upstream.host,
            upstream.port,
            self.ssl.libpq_params()
        );
        self.run_tool(
            "pg_rewind",
            [
                OsStr::new("--target-pgdata"),
                self.pgdata.as_os_str(),
                OsStr::new("--source-server"),
                OsStr::new(&source),
            ],
        )
        .await?;
        Ok(())
    }

    /// The "Database cluster state" line of pg_controldata.
    pub async fn cluster_state(&self) -> Result<String, KeeperError> {
        let out = self
            .run_tool("pg_controldata", [self.pgdata.as_os_str()])
            .await?;
        Ok(out
            .lines()
            .find_map(|l| l.strip_prefix("Database cluster state:"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default())
    }

    /// The last FATAL or ERROR line of the server log (for error messages).
    pub fn last_log_error(&self) -> String {
        let path = self.pgdata.join(LOG_FILE);
        let text = std::fs::read(&path).unwrap_or_default();
        let tail = &text[text.len().saturating_sub(64 * 1024)..];
        String::from_utf8_lossy(tail)
            .lines()
            .rev()
            .find(|l| l.contains("FATAL:") || l.contains("ERROR:"))
            .map(str::to_string)
            .unwrap_or_else(|| "nothing".to_string())
    }

    /// pg_controldata of the (stopped) data directory.
    pub async fn control_data(&self) -> Result<ControlData, KeeperError> {
        let out = self
            .run_tool("pg_controldata", [self.pgdata.as_os_str()])
            .await?;
        Ok(ControlData::parse(&out))
    }

    /// Brings a stopped data directory to a clean shutdown so that pg_rewind
    /// needs no crash recovery of its own: pg_rewind runs that in single-user
    /// mode, which refuses a standby ("standby mode is not supported by
    /// single-user servers"). A crashed standby is started as a standby that
    /// streams from nobody and stopped again (`shut down in recovery`: no WAL
    /// of its own is written); a crashed primary is crash-recovered by
    /// pg_rewind itself, as a primary, so a standby.signal left by hapg goes.
    pub async fn prepare_for_rewind(&self, application_name: &str) -> Result<(), KeeperError> {
        self.stop(StopMode::Fast).await?;
        let control = self.control_data().await?;
        if control.shut_down_cleanly() {
            return Ok(());
        }
        if control.in_recovery() {
            tracing::info!(state = %control.state, "finishing crash recovery as a standby before pg_rewind");
            self.write_standby_config(None, application_name, false)?;
            self.start().await?;
            return self.stop(StopMode::Fast).await;
        }
        let signal = self.pgdata.join("standby.signal");
        if signal.exists() {
            std::fs::remove_file(&signal).map_err(|e| KeeperError::io(&signal, e))?;
        }
        Ok(())
    }

    /// The timeline of the primary at `upstream` and its history file, read
    /// with psql as the replication role (a superuser): what decides whether
    /// this node's WAL is a prefix of the primary's.
    pub async fn primary_history(
        &self,
        upstream: &Upstream,
    ) -> Result<PrimaryHistory, KeeperError> {
        let sslmode = if self.ssl.active { "require" } else { "prefer" };
        let source = format!(
            "host={} port={} user={REPLICATION_ROLE} dbname=postgres sslmode={sslmode} connect_timeout=5 application_name=hapg_keeper",
            upstream.host, upstream.port
        );
        // The timeline from the WAL position (the checkpoint's can lag right
        // after a promotion), then its history file (none on timeline 1; a
        // missing one leaves no ancestor known, so the node is rewound).
        let query = "WITH t AS (SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int AS tli)
                     SELECT t.tli || E'\n' || CASE WHEN t.tli > 1
                              THEN coalesce(pg_read_file('pg_wal/' || lpad(upper(to_hex(t.tli)), 8, '0') || '.history',
                                                         0, 1048576, true), '')
                              ELSE '' END
                       FROM t";
        let out = self
            .run_tool(
                "psql",
                [
                    "-X",
                    "--no-align",
                    "--tuples-only",
                    "--no-password",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "--dbname",
                    &source,
                    "--command",
                    query,
                ],
            )
            .await?;
        let (tli, history) = out.split_once('\n').unwrap_or((out.as_str(), ""));
        let tli: u32 = tli.trim().parse().map_err(|_| KeeperError::Tool {
            tool: "psql".into(),
            status: "unexpected output".into(),
            output: out.clone(),
        })?;
        Ok(PrimaryHistory::parse(Timeline(tli), history))
    }
}

/// What pg_controldata says about a stopped data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlData {
    /// "Database cluster state", such as `in archive recovery` or `shut down`.
    pub state: String,
    /// Latest checkpoint location.
    pub checkpoint: u64,
    /// Latest checkpoint's timeline.
    pub checkpoint_tli: u32,
    /// Minimum recovery ending location (0 on a primary).
    pub min_recovery: u64,
    /// Its timeline (0 on a primary).
    pub min_recovery_tli: u32,
}

impl ControlData {
    /// Parses pg_controldata's output.
    pub fn parse(text: &str) -> ControlData {
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.strip_prefix(':'))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        ControlData {
            state: field("Database cluster state"),
            checkpoint: parse_lsn(&field("Latest checkpoint location")).unwrap_or(0),
            checkpoint_tli: field("Latest checkpoint's TimeLineID").parse().unwrap_or(0),
            min_recovery: parse_lsn(&field("Minimum recovery ending location")).unwrap_or(0),
            min_recovery_tli: field("Min recovery ending loc's timeline")
                .parse()
                .unwrap_or(0),
        }
    }

    /// The data directory was last a standby: it crashed or stopped in recovery.
    pub fn in_recovery(&self) -> bool {
        matches!(
            self.state.as_str(),
            "in archive recovery" | "shut down in recovery"
        )
    }

    /// Stopped cleanly, so pg_rewind needs no crash recovery first.
    pub fn shut_down_cleanly(&self) -> bool {
        matches!(self.state.as_str(), "shut down" | "shut down in recovery")
    }
}

/// Quotes an SQL identifier.
pub fn postgres_escape_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The Postgres binaries: `$HAPG_PG_BINDIR`, else `pg_config --bindir` on PATH,
/// else Debian's PostgreSQL 15 location.
pub fn default_bindir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HAPG_PG_BINDIR") {
        return PathBuf::from(dir);
    }
    if let Ok(out) = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
    {
        if out.status.success() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if dir.join("pg_ctl").exists() && dir.join("initdb").exists() {
                return dir;
            }
        }
    }
    PathBuf::from("/usr/lib/postgresql/15/bin")
}

/// A host as pg_hba.conf takes it: an IP address needs a mask (Postgres
/// refuses the whole file otherwise), a host name stays as it is.
fn hba_address(host: &str) -> String {
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => format!("{ip}/32"),
        Ok(std::net::IpAddr::V6(ip)) => format!("{ip}/128"),
        Err(_) => host.to_string(),
    }
}

#[cfg(test)]
mod hba_tests {
    #[test]
    fn hba_addresses_get_a_mask() {
        assert_eq!(super::hba_address("10.0.0.5"), "10.0.0.5/32");
        assert_eq!(super::hba_address("::1"), "::1/128");
        assert_eq!(super::hba_address("db-1.example.com"), "db-1.example.com");
    }
}

#[cfg(test)]
mod lock_tests {
    use std::time::{Duration, Instant};

    #[test]
    fn only_a_zombie_postmaster_leaves_a_stale_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lock = dir.path().join("postmaster.pid");
        let write = |pid: u32| std::fs::write(&lock, format!("{pid}\n/data\n")).expect("write");

        // A child that exited and that nobody reaped yet is a zombie.
        let mut exited = std::process::Command::new("true").spawn().expect("spawn");
        let pid = exited.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        while crate::pidfile::process_alive(pid as i32) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        write(pid);
        assert_eq!(super::zombie_lock(&lock), Some(pid as i32));

        // Reaped: the pid is gone, which Postgres handles by itself.
        exited.wait().expect("reap");
        assert_eq!(super::zombie_lock(&lock), None);

        // A live process is never taken for a stale lock.
        let mut live = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn");
        write(live.id());
        assert_eq!(super::zombie_lock(&lock), None);
        live.kill().expect("kill");
        live.wait().expect("reap");
    }
}
