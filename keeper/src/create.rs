//! `hapg create monitor` and `hapg create postgres`: check the input, touch
//! nothing when it is wrong, then set up the node and write its configuration.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hapg_config::{
    HttpSection, KeeperTimings, NodeConfig, NodeSection, PostgresSection, ReplicationSection, Role,
    SslConfig,
};
use hapg_monitor::client::{Registration, RequestKind};
use hapg_monitor::schema::{self, MONITOR_DBNAME, MONITOR_ROLE};
use hapg_monitor::MonitorClient;

use crate::error::KeeperError;
use crate::keeper::{self, Exit, RunMode, Shutdown};
use crate::paths::NodePaths;
use crate::postgres::{postgres_escape_identifier, LocalPostgres, OsUser};
use crate::state_file::KeeperState;

/// What every `create` command is given about the local instance.
#[derive(Debug, Clone)]
pub struct InstanceOptions {
    /// Data directory.
    pub pgdata: PathBuf,
    /// Port.
    pub port: u16,
    /// Host name others use to reach this node.
    pub hostname: String,
    /// `listen_addresses`.
    pub listen_addresses: String,
    /// Method for the pg_hba rules hapg adds.
    pub auth_method: String,
    /// TLS.
    pub ssl: SslConfig,
    /// Leave pg_hba.conf alone.
    pub skip_pg_hba: bool,
    /// OS user for Postgres when running as root.
    pub os_user: String,
    /// Postgres binaries.
    pub bindir: PathBuf,
    /// Superuser name.
    pub username: String,
    /// `http.listen`: where `hapg run` serves health checks and metrics
    /// (empty: nowhere).
    pub http_listen: String,
}

/// The node-specific part of `create postgres`.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Node name (empty: the monitor names it).
    pub name: String,
    /// Formation.
    pub formation: String,
    /// Monitor URI.
    pub monitor: String,
    /// Application database.
    pub dbname: String,
    /// Candidate priority.
    pub candidate_priority: i32,
    /// Replication quorum.
    pub replication_quorum: bool,
    /// Replication user's password.
    pub replication_password: Option<String>,
    /// How long to keep trying to reach the monitor.
    pub monitor_timeout: Duration,
}

/// Refuses a data directory or port that is in use, before anything is created.
fn check_instance(opts: &InstanceOptions, paths: &NodePaths) -> Result<(), KeeperError> {
    for tool in ["initdb", "pg_ctl", "postgres"] {
        if !opts.bindir.join(tool).exists() {
            return Err(KeeperError::Refused(format!(
                "{} not found: install PostgreSQL 15 (apt-get install postgresql-15) or set --pgctl/HAPG_PG_BINDIR",
                opts.bindir.join(tool).display()
            )));
        }
    }
    if paths.config.exists() {
        return Err(KeeperError::Refused(format!(
            "{} is already a hapg node (configuration {} exists): start it with `hapg run --pgdata {}`",
            paths.pgdata.display(),
            paths.config.display(),
            paths.pgdata.display()
        )));
    }
    check_pgdata_free(&paths.pgdata)?;
    check_port_free(opts.port)?;
    Ok(())
}

/// The data directory must be missing or empty, and no Postgres may run in it.
pub fn check_pgdata_free(pgdata: &Path) -> Result<(), KeeperError> {
    let pidfile = pgdata.join("postmaster.pid");
    if let Ok(text) = std::fs::read_to_string(&pidfile) {
        if let Some(pid) = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<i32>().ok())
        {
            if crate::pidfile::process_alive(pid) {
                return Err(KeeperError::Refused(format!(
                    "{} is in use by a running Postgres (pid {pid}): choose another --pgdata",
                    pgdata.display()
                )));
            }
        }
    }
    match std::fs::read_dir(pgdata) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(KeeperError::Refused(format!(
                    "{} is not empty: hapg creates a node in a new or empty directory, and leaves this one untouched",
                    pgdata.display()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => Err(KeeperError::Refused(
            format!("{} exists and is not a directory", pgdata.display()),
        )),
        Err(e) => Err(KeeperError::io(pgdata, e)),
    }
}

/// The port must be free on every address.
pub fn check_port_free(port: u16) -> Result<(), KeeperError> {
    for addr in [format!("0.0.0.0:{port}"), format!("127.0.0.1:{port}")] {
        if let Err(e) = TcpListener::bind(&addr) {
            return Err(KeeperError::Refused(format!(
                "port {port} is already in use ({e}): choose another --pgport"
            )));
        }
    }
    Ok(())
}

fn instance(
    opts: &InstanceOptions,
    dbname: &str,
    password: Option<String>,
) -> Result<LocalPostgres, KeeperError> {
    Ok(LocalPostgres {
        pgdata: opts.pgdata.clone(),
        port: opts.port,
        listen_addresses: opts.listen_addresses.clone(),
        bindir: opts.bindir.clone(),
        os_user: OsUser::for_running_as(&opts.os_user)?,
        username: opts.username.clone(),
        dbname: dbname.to_string(),
        ssl: opts.ssl.clone(),
        auth_method: opts.auth_method.clone(),
        skip_pg_hba: opts.skip_pg_hba,
        replication_password: password,
        hostname: opts.hostname.clone(),
        // A new node starts with the default timings (`config_for`).
        wal_sender_timeout: KeeperTimings::default().wal_sender_timeout(),
    })
}

fn config_for(opts: &InstanceOptions, role: Role) -> NodeConfig {
    NodeConfig {
        node: NodeSection {
            role,
            name: String::new(),
            hostname: opts.hostname.clone(),
            formation: "default".to_string(),
            monitor: String::new(),
            os_user: opts.os_user.clone(),
            node_id: 0,
            monitor_password: None,
        },
        postgresql: PostgresSection {
            pgdata: opts.pgdata.clone(),
            port: opts.port,
            listen_addresses: opts.listen_addresses.clone(),
            dbname: "postgres".to_string(),
            username: opts.username.clone(),
            bindir: opts.bindir.clone(),
            auth_method: opts.auth_method.clone(),
            skip_pg_hba: opts.skip_pg_hba,
        },
        ssl: opts.ssl.clone(),
        replication: ReplicationSection::default(),
        timeout: KeeperTimings::default(),
        http: HttpSection {
            listen: opts.http_listen.clone(),
        },
    }
}

/// `hapg create monitor`: initdb, configure and start the monitor's Postgres,
/// create its database, role and schema, and write its configuration.
pub async fn create_monitor(
    mut opts: InstanceOptions,
    password: Option<String>,
) -> Result<NodePaths, KeeperError> {
    let paths = NodePaths::for_pgdata(&opts.pgdata)?;
    opts.pgdata = paths.pgdata.clone();
    check_instance(&opts, &paths)?;
    let pg = instance(&opts, MONITOR_DBNAME, None)?;
    pg.check_access()?;
    let mut config = config_for(&opts, Role::Monitor);
    config.node.monitor_password = password.clone();
    config.validate()?;

    let existed = pg.pgdata.exists();
    pg.initdb().await?;
    if let Err(e) = init_monitor(&pg, password.as_deref()).await {
        // The data directory was missing or empty before initdb: put it back
        // so that the same command can simply be run again.
        return Err(match pg.remove_failed(existed).await {
            Ok(kept) => KeeperError::Refused(format!(
                "{e}\nwhat initdb wrote in {} was removed{}; fix the cause and run the same command again",
                pg.pgdata.display(),
                kept.map(|log| format!(" (the server log is kept as {})", log.display()))
                    .unwrap_or_default()
            )),
            Err(cleanup) => KeeperError::Refused(format!(
                "{e}\n{} is left half-initialised ({cleanup}); remove it before running the same command again",
                pg.pgdata.display()
            )),
        });
    }

    paths.create_dirs()?;
    crate::paths::write_atomic(&paths.config, config.to_toml().as_bytes())?;
    Ok(paths)
}

/// Configures and starts the monitor's Postgres after initdb and creates its
/// role, database and schema.
async fn init_monitor(pg: &LocalPostgres, password: Option<&str>) -> Result<(), KeeperError> {
    pg.write_config(&[("cluster_name", "'hapg monitor'".to_string())])?;
    write_monitor_hba(pg)?;
    pg.start().await?;
    let client = pg.connect().await?;
    client
        .batch_execute(&format!(
            "DO $$ BEGIN
               IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{MONITOR_ROLE}') THEN
                 CREATE ROLE {MONITOR_ROLE} WITH LOGIN;
               END IF;
             END $$;"
        ))
        .await?;
    if let Some(password) = password {
        client
            .batch_execute(&format!(
                "ALTER ROLE {MONITOR_ROLE} WITH PASSWORD '{}'",
                password.replace('\'', "''")
            ))
            .await?;
    }
    if client
        .query_opt(
            "SELECT 1 FROM pg_database WHERE datname = $1",
            &[&MONITOR_DBNAME],
        )
        .await?
        .is_none()
    {
        client
            .batch_execute(&format!(
                "CREATE DATABASE {}",
                postgres_escape_identifier(MONITOR_DBNAME)
            ))
            .await?;
    }
    let mut db = pg.connect_to(MONITOR_DBNAME).await?;
    schema::migrate(&mut db).await?;
    Ok(())
}

/// pg_hba.conf of the monitor: keepers, routers and the CLI connect as
/// `autoctl_node` to the monitor database.
fn write_monitor_hba(pg: &LocalPostgres) -> Result<(), KeeperError> {
    if pg.skip_pg_hba {
        return Ok(());
    }
    let auth = &pg.auth_method;
    let hba = format!(
        "# Written by hapg (--skip-pg-hba to manage this file yourself).\n\
         local   all               all                     trust\n\
         host    {MONITOR_DBNAME}  {MONITOR_ROLE}  all     {auth}\n\
         host    all               all             samenet {auth}\n"
    );
    let path = pg.pgdata.join("pg_hba.conf");
    std::fs::write(&path, hba).map_err(|e| KeeperError::io(&path, e))?;
    pg.chown(&path)
}

/// The URI keepers, routers and the CLI use to reach the monitor.
pub fn monitor_uri(config: &NodeConfig) -> String {
    let credentials = match &config.node.monitor_password {
        Some(password) => format!("{MONITOR_ROLE}:{}", percent_encode(password)),
        None => MONITOR_ROLE.to_string(),
    };
    format!(
        "postgres://{credentials}@{}:{}/{MONITOR_DBNAME}?{}",
        config.node.hostname,
        config.postgresql.port,
        ssl_query(&config.ssl)
    )
}

/// The TLS parameters of the URIs hapg builds: `sslmode`, and `sslrootcert`
/// when certificates are verified against the `--ssl-ca-file`.
pub fn ssl_query(ssl: &SslConfig) -> String {
    ssl_query_with(&ssl.sslmode, ssl.ca_file.as_deref())
}

/// `sslmode=<mode>` and, given a CA file, `&sslrootcert=<file>`, for a URI.
pub fn ssl_query_with(sslmode: &str, ca_file: Option<&Path>) -> String {
    match ca_file {
        Some(ca) => format!(
            "sslmode={sslmode}&sslrootcert={}",
            percent_encode(&ca.display().to_string())
        ),
        None => format!("sslmode={sslmode}"),
    }
}

/// Percent-encodes everything but unreserved URI characters.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A superuser connection string to the monitor database over the local socket.
pub fn monitor_local_conninfo(config: &NodeConfig) -> String {
    format!(
        "host={} port={} user={} dbname={MONITOR_DBNAME} application_name='hapg monitor'",
        crate::postgres::SOCKET_DIR,
        config.postgresql.port,
        config.postgresql.username
    )
}

/// `hapg create postgres`: register with the monitor, then write the node's
/// configuration and state. Nothing is created on disk if registration fails.
pub async fn create_node(
    mut opts: InstanceOptions,
    node: NodeOptions,
) -> Result<NodePaths, KeeperError> {
    let paths = NodePaths::for_pgdata(&opts.pgdata)?;
    opts.pgdata = paths.pgdata.clone();
    check_instance(&opts, &paths)?;
    let pg = instance(&opts, &node.dbname, node.replication_password.clone())?;
    pg.check_access()?;
    let mut config = config_for(&opts, Role::Keeper);
    config.node.name = if node.name.is_empty() {
        "pending".to_string()
    } else {
        node.name.clone()
    };
    config.node.formation = node.formation.clone();
    config.node.monitor = node.monitor.clone();
    config.postgresql.dbname = node.dbname.clone();
    config.replication.password = node.replication_password.clone();
    config.validate()?;
    if !(0..=100).contains(&node.candidate_priority) {
        return Err(KeeperError::Refused(format!(
            "--candidate-priority {} is out of range: use 0 to 100",
            node.candidate_priority
        )));
    }

    let monitor = MonitorClient::connect_with_retry(&node.monitor, node.monitor_timeout).await?;
    let registered = monitor
        .register(&Registration {
            formation: node.formation.clone(),
            name: node.name.clone(),
            host: opts.hostname.clone(),
            port: opts.port,
            dbname: node.dbname.clone(),
            candidate_priority: node.candidate_priority,
            replication_quorum: node.replication_quorum,
        })
        .await?;
    config.node.name = registered.name.clone();
    config.node.node_id = registered.node_id;

    paths.create_dirs()?;
    crate::paths::write_atomic(&paths.config, config.to_toml().as_bytes())?;
    KeeperState::new(registered.node_id, registered.group_id).save(&paths.state)?;
    tracing::info!(node_id = registered.node_id, name = %registered.name, "registered with the monitor");
    Ok(paths)
}

/// How long each step of undoing a failed `create postgres` may take.
const UNDO_TIMEOUT: Duration = Duration::from_secs(30);

/// Undoes a `create postgres` whose initialisation failed ([`Exit::InitFailed`]):
/// the monitor drops the node through the same request and keeper transition
/// as `hapg drop node`, so the rest of the group is put back as after any
/// drop (a primary waiting for this standby returns to `single`); then what
/// the create wrote goes: the data directory (emptied if it `existed` before,
/// its server log kept as `<pgdata>.postgres.log`), pg_basebackup's staging
/// directory, and the node's configuration and state files. Returns the kept
/// log, if there was one.
pub async fn undo_node(paths: &NodePaths, existed: bool) -> Result<Option<PathBuf>, KeeperError> {
    let config = NodeConfig::load(&paths.config)?;
    let mut monitor = MonitorClient::connect_with_retry(&config.node.monitor, UNDO_TIMEOUT).await?;
    let node = monitor.node(config.node.node_id).await?;
    monitor
        .request(
            &node.formation,
            node.group_id,
            Some(node.node_id),
            RequestKind::Drop,
            UNDO_TIMEOUT,
        )
        .await?;
    let shutdown = Shutdown::default();
    let run = keeper::run(paths.clone(), RunMode::Forever, shutdown.clone());
    tokio::pin!(run);
    let exit = tokio::select! {
        exit = &mut run => exit?,
        () = tokio::time::sleep(UNDO_TIMEOUT) => {
            shutdown.token.cancel();
            run.await?;
            return Err(KeeperError::Refused(format!(
                "the monitor did not drop node {} within {} s",
                node.name,
                UNDO_TIMEOUT.as_secs()
            )));
        }
    };
    if exit != Exit::Dropped {
        return Err(KeeperError::Refused(format!(
            "the keeper stopped ({exit:?}) before the monitor dropped node {}",
            node.name
        )));
    }
    let pg = LocalPostgres::from_config(&config)?;
    let kept = if pg.pgdata.exists() {
        pg.remove_failed(existed).await?
    } else {
        None
    };
    for leftover in ["hapg-basebackup", "hapg-old"] {
        let dir = pg.pgdata.with_extension(leftover);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| KeeperError::io(&dir, e))?;
        }
    }
    paths.remove_all();
    Ok(kept)
}
