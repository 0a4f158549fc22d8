//! `hapg`: one binary with pg_autoctl's command tree, plus `router run` and `demo`.
//! This file only parses the command line; the work is in the library crates.

mod commands;
mod demo;
mod log_format;
mod show;
mod watch;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "hapg", version, about = "PostgreSQL with automatic failover, and a router that pauses instead of failing", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a monitor or a Postgres node.
    #[command(subcommand)]
    Create(Box<CreateCommand>),
    /// Run the monitor or the keeper of a data directory (supervises Postgres).
    Run(RunArgs),
    /// Stop a running `hapg run` (and its Postgres).
    Stop(StopArgs),
    /// Show the formation's state, events, URIs, settings, or a systemd unit.
    #[command(subcommand)]
    Show(ShowCommand),
    /// Operator actions: switchover, failover.
    #[command(subcommand)]
    Perform(PerformCommand),
    /// Enable maintenance on a node.
    #[command(subcommand)]
    Enable(EnableCommand),
    /// Disable maintenance on a node.
    #[command(subcommand)]
    Disable(DisableCommand),
    /// Remove a node from its formation.
    #[command(subcommand)]
    Drop(DropCommand),
    /// Change node or formation settings (the monitor validates them).
    #[command(subcommand)]
    Set(SetCommand),
    /// Read or change a node's configuration file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// The router: Postgres protocol on port 6432, always to the current primary.
    #[command(subcommand)]
    Router(RouterCommand),
    /// Create a monitor and two nodes on free ports, and keep them running.
    Demo(DemoArgs),
    /// The monitor service alone, on a store it does not run itself (etcd).
    #[command(subcommand)]
    Monitor(MonitorCommand),
    /// A live view of the formation, like top: nodes, lag, latest events (q quits).
    Watch(MonitorArgs),
}

/// Options shared by `create monitor` and `create postgres`.
#[derive(Args, Debug, Clone)]
struct InstanceArgs {
    /// Postgres data directory.
    #[arg(long, env = "PGDATA")]
    pgdata: PathBuf,
    /// Postgres port.
    #[arg(long, env = "PGPORT", default_value_t = 5432)]
    pgport: u16,
    /// Host name or address the other nodes and clients use to reach this node.
    #[arg(long)]
    hostname: String,
    /// Postgres `listen_addresses`.
    #[arg(long, default_value = "*")]
    listen: String,
    /// Authentication method for the pg_hba rules hapg writes (trust, md5, scram-sha-256).
    #[arg(long, env = "PG_AUTOCTL_AUTH_METHOD")]
    auth: Option<String>,
    /// Do not edit pg_hba.conf.
    #[arg(long)]
    skip_pg_hba: bool,
    /// Generate a self-signed certificate and turn ssl on.
    #[arg(long, conflicts_with = "no_ssl")]
    ssl_self_signed: bool,
    /// Turn ssl off.
    #[arg(long)]
    no_ssl: bool,
    /// CA certificate (PEM) that signed the nodes' and the monitor's
    /// certificates: Postgres' ssl_ca_file, and the sslrootcert of the
    /// connection strings hapg builds, which then verify the server's
    /// certificate and host name (sslmode=verify-full).
    #[arg(long, requires_all = ["server_cert", "server_key"])]
    ssl_ca_file: Option<PathBuf>,
    /// This node's certificate (PEM), for its --hostname: Postgres' ssl_cert_file; turns ssl on.
    #[arg(long, requires = "server_key", conflicts_with_all = ["ssl_self_signed", "no_ssl"])]
    server_cert: Option<PathBuf>,
    /// The private key of --server-cert (PEM, readable by --os-user only): Postgres' ssl_key_file.
    #[arg(long, requires = "server_cert")]
    server_key: Option<PathBuf>,
    /// OS user that runs Postgres when hapg runs as root.
    #[arg(long, default_value = "postgres")]
    os_user: String,
    /// Directory of the Postgres binaries (default: pg_config --bindir, else /usr/lib/postgresql/15/bin).
    #[arg(long)]
    pgctl: Option<PathBuf>,
    /// Postgres superuser name.
    #[arg(long, default_value = "postgres")]
    username: String,
    /// Serve health checks (/primary, /replica, /read-only, /health,
    /// /liveness, /state) and /metrics over HTTP on this ip:port while
    /// `hapg run` runs (http.listen in hapg.toml; docs/operations.md).
    #[arg(long, value_name = "ADDR")]
    http_listen: Option<std::net::SocketAddr>,
    /// Keep running after creation (as `hapg run` would).
    #[arg(long)]
    run: bool,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Subcommand, Debug)]
enum CreateCommand {
    /// Initialise the monitor's Postgres instance and its cluster-state schema.
    Monitor(CreateMonitorArgs),
    /// Register a Postgres node with the monitor and initialise it.
    Postgres(CreatePostgresArgs),
}

#[derive(Args, Debug)]
struct CreateMonitorArgs {
    #[command(flatten)]
    instance: InstanceArgs,
    /// Password of the autoctl_node role keepers, routers and the CLI log in as
    /// (needed with --auth md5 or scram-sha-256; `show uri --monitor-uri` includes it).
    #[arg(
        long,
        env = "HAPG_MONITOR_PASSWORD",
        conflicts_with = "monitor_password_file"
    )]
    monitor_password: Option<String>,
    /// File holding that password.
    #[arg(long)]
    monitor_password_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct CreatePostgresArgs {
    #[command(flatten)]
    instance: InstanceArgs,
    /// Node name in the formation (default: node_<id>).
    #[arg(long, default_value = "")]
    name: String,
    /// Monitor connection string.
    #[arg(long, env = "PG_AUTOCTL_MONITOR")]
    monitor: String,
    /// Formation to join.
    #[arg(long, default_value = "default")]
    formation: String,
    /// Database created for applications.
    #[arg(long, default_value = "postgres")]
    dbname: String,
    /// Failover candidate priority, 0 (never) to 100.
    #[arg(long, default_value_t = 50)]
    candidate_priority: i32,
    /// Whether this node counts for synchronous replication.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    replication_quorum: bool,
    /// Password of the replication user (for md5 / scram-sha-256).
    #[arg(
        long,
        env = "HAPG_REPLICATION_PASSWORD",
        conflicts_with = "replication_password_file"
    )]
    replication_password: Option<String>,
    /// File holding the replication user's password.
    #[arg(long)]
    replication_password_file: Option<PathBuf>,
    /// How long to keep trying to reach the monitor, in seconds.
    #[arg(long, default_value_t = 15)]
    monitor_timeout: u64,
}

/// How a long-running command writes its log (stderr).
#[derive(Args, Debug, Clone, Default)]
struct LogArgs {
    /// text (for people) or json (one object per line: time, level,
    /// component, formation, node, message, ...; docs/operations.md).
    #[arg(long, value_enum, env = "HAPG_LOG_FORMAT", default_value = "text")]
    log_format: log_format::LogFormat,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Data directory of the node or monitor.
    #[arg(long, env = "PGDATA")]
    pgdata: PathBuf,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Args, Debug)]
struct PgdataArg {
    /// Data directory of the node or monitor.
    #[arg(long, env = "PGDATA")]
    pgdata: PathBuf,
}

#[derive(Args, Debug)]
struct StopArgs {
    /// Data directory of the node or monitor.
    #[arg(long, env = "PGDATA")]
    pgdata: PathBuf,
    /// Stop Postgres with a fast shutdown (SIGINT).
    #[arg(long)]
    fast: bool,
    /// Stop Postgres with an immediate shutdown (SIGQUIT).
    #[arg(long, conflicts_with = "fast")]
    immediate: bool,
}

/// How a command finds the monitor.
#[derive(Args, Debug, Clone, Default)]
struct MonitorArgs {
    /// Data directory of the monitor or of a node.
    #[arg(long, env = "PGDATA")]
    pgdata: Option<PathBuf>,
    /// Monitor connection string, instead of --pgdata.
    #[arg(long, env = "PG_AUTOCTL_MONITOR")]
    monitor: Option<String>,
    /// Formation.
    #[arg(long)]
    formation: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum ShowCommand {
    /// The nodes of the formation with their states.
    State(MonitorArgs),
    /// What the monitor decided and why, newest last.
    Events {
        #[command(flatten)]
        monitor: MonitorArgs,
        /// How many events.
        #[arg(long, default_value_t = 10)]
        count: i64,
    },
    /// Connection strings: monitor, formations, routers.
    Uri {
        #[command(flatten)]
        monitor: MonitorArgs,
        /// Print only the monitor's URI.
        #[arg(long)]
        monitor_uri: bool,
    },
    /// Formation and node settings.
    Settings(MonitorArgs),
    /// synchronous_standby_names the monitor computes for the primary.
    StandbyNames(MonitorArgs),
    /// A systemd unit that runs `hapg run` for this data directory.
    Systemd(PgdataArg),
}

#[derive(Args, Debug)]
struct PerformArgs {
    #[command(flatten)]
    monitor: MonitorArgs,
    /// Seconds to wait for the new primary.
    #[arg(long, default_value_t = 60)]
    wait: u64,
}

#[derive(Subcommand, Debug)]
enum PerformCommand {
    /// Move the primary to a healthy standby, without losing a write.
    Switchover(PerformArgs),
    /// Same as switchover: pg_autoctl's name for it.
    Failover(PerformArgs),
    /// Make a chosen standby the primary.
    Promotion {
        #[command(flatten)]
        perform: PerformArgs,
        /// The node to promote.
        #[arg(long)]
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum SetCommand {
    /// Change a node's failover settings.
    #[command(subcommand)]
    Node(SetNodeCommand),
    /// Change a formation's settings.
    #[command(subcommand)]
    Formation(SetFormationCommand),
}

#[derive(Subcommand, Debug)]
enum SetNodeCommand {
    /// Failover candidate priority, 0 (never promoted) to 100.
    CandidatePriority {
        #[command(flatten)]
        monitor: MonitorArgs,
        /// The node (default: the node of --pgdata).
        #[arg(long)]
        name: Option<String>,
        /// The new priority.
        value: i32,
    },
    /// Whether the node counts for synchronous replication.
    ReplicationQuorum {
        #[command(flatten)]
        monitor: MonitorArgs,
        /// The node (default: the node of --pgdata).
        #[arg(long)]
        name: Option<String>,
        /// true or false.
        #[arg(action = clap::ArgAction::Set)]
        value: bool,
    },
}

#[derive(Subcommand, Debug)]
enum SetFormationCommand {
    /// How many quorum standbys must confirm a commit (0: writes stay available when standbys are lost).
    NumberSyncStandbys {
        #[command(flatten)]
        monitor: MonitorArgs,
        /// The new value.
        value: i32,
    },
}

#[derive(Args, Debug)]
struct MaintenanceArgs {
    /// Data directory of the node.
    #[arg(long, env = "PGDATA")]
    pgdata: PathBuf,
    /// Allow moving the primary away when the node is the primary.
    #[arg(long)]
    allow_failover: bool,
    /// Seconds to wait.
    #[arg(long, default_value_t = 60)]
    wait: u64,
}

#[derive(Subcommand, Debug)]
enum EnableCommand {
    /// Take the node out for maintenance.
    Maintenance(MaintenanceArgs),
}

#[derive(Subcommand, Debug)]
enum DisableCommand {
    /// Bring the node back from maintenance.
    Maintenance(MaintenanceArgs),
}

#[derive(Subcommand, Debug)]
enum DropCommand {
    /// Remove a node (its keeper stops Postgres and exits).
    Node {
        #[command(flatten)]
        monitor: MonitorArgs,
        /// Name of the node to drop (with --monitor); default: the node of --pgdata.
        #[arg(long)]
        name: Option<String>,
        /// Also remove the data directory and hapg's files for it.
        #[arg(long)]
        destroy: bool,
        /// Seconds to wait.
        #[arg(long, default_value_t = 60)]
        wait: u64,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Print one setting (section.key), or the whole file.
    Get {
        /// Data directory.
        #[arg(long, env = "PGDATA")]
        pgdata: PathBuf,
        /// `section.key`.
        key: Option<String>,
    },
    /// Change one setting; the value is validated before the file is written.
    Set {
        /// Data directory.
        #[arg(long, env = "PGDATA")]
        pgdata: PathBuf,
        /// `section.key`.
        key: String,
        /// New value.
        value: String,
    },
}

#[derive(Subcommand, Debug)]
enum RouterCommand {
    /// Run the router with a TOML configuration.
    Run {
        /// Path of router.toml.
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        log: LogArgs,
    },
}

#[derive(Subcommand, Debug)]
enum MonitorCommand {
    /// Run the monitor service (decisions and health checks) on the store
    /// `--monitor` names: `etcd://host:port[,host:port...]/prefix`.
    Run {
        /// The store's URI.
        #[arg(long)]
        monitor: String,
        /// Serve /health, /liveness, /state and /metrics (every node's
        /// state and health, the failovers) over HTTP on this ip:port, as
        /// `hapg create monitor --http-listen` does (docs/operations.md).
        #[arg(long, value_name = "ADDR")]
        http_listen: Option<std::net::SocketAddr>,
    },
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Directory for the demo's data, kept afterwards (default: a new temporary
    /// directory, removed when the demo ends without error).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Run the tutorial's switchover and node failure under a live writer, report, and exit.
    #[arg(long)]
    drill: bool,
    /// OS user that runs Postgres when hapg runs as root.
    #[arg(long, default_value = "postgres")]
    os_user: String,
    #[command(flatten)]
    log: LogArgs,
}

fn init_tracing(default: &str, format: log_format::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HAPG_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        log_format::LogFormat::Text => builder
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        log_format::LogFormat::Json => builder
            .with_ansi(false)
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(log_format::JsonLines)
            .try_init(),
    };
}

/// Runs `command` on its async runtime: `router run` on the threads its
/// configuration file asks for (a file that does not load is reported by the
/// command itself), everything else on tokio's default.
fn run(command: Command) -> std::io::Result<anyhow::Result<()>> {
    if let Command::Router(RouterCommand::Run { config, .. }) = &command {
        if let Ok(config) = hapg_config::router::RouterConfig::load(config) {
            return hapg_router::threads::block_on(&config.router, || commands::dispatch(command));
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    Ok(runtime.block_on(commands::dispatch(command)))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let verbose = matches!(
        cli.command,
        Command::Run(_)
            | Command::Create(_)
            | Command::Router(_)
            | Command::Demo(_)
            | Command::Monitor(_)
    );
    let format = match &cli.command {
        Command::Run(args) => args.log.log_format,
        Command::Create(create) => match create.as_ref() {
            CreateCommand::Monitor(args) => args.instance.log.log_format,
            CreateCommand::Postgres(args) => args.instance.log.log_format,
        },
        Command::Router(RouterCommand::Run { log, .. }) => log.log_format,
        Command::Demo(args) => args.log.log_format,
        _ => log_format::LogFormat::Text,
    };
    init_tracing(if verbose { "info" } else { "warn" }, format);
    if matches!(cli.command, Command::Demo(_)) {
        // The demo's processes log as the demo does: they inherit this.
        // Set before the async runtime starts, while this is the only thread.
        std::env::set_var("HAPG_LOG_FORMAT", format.as_str());
    }
    match run(cli.command) {
        Ok(Ok(())) => std::process::ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("hapg: {e:#}");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("hapg: cannot start the async runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
