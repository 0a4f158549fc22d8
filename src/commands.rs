//! What each command does: thin glue between the command line and the library crates.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use hapg_config::{MonitorTimings, NodeConfig, Role, SslConfig};
use hapg_keeper::create::{self, InstanceOptions, NodeOptions};
use hapg_keeper::keeper::{self, Exit, RunMode, Shutdown};
use hapg_keeper::{pidfile, postgres, NodePaths};
use hapg_monitor::client::{NodeRow, RequestKind};
use hapg_monitor::{MonitorClient, NodeState};
use tokio::signal::unix::{signal, SignalKind};
use tracing::Instrument;

use crate::show;
use crate::{
    Command, ConfigCommand, CreateCommand, CreateMonitorArgs, CreatePostgresArgs, DisableCommand,
    DropCommand, EnableCommand, InstanceArgs, MaintenanceArgs, MonitorArgs, MonitorCommand,
    PerformArgs, PerformCommand, RouterCommand, SetCommand, SetFormationCommand, SetNodeCommand,
    ShowCommand,
};

/// Runs one command.
pub async fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Create(create) => match *create {
            CreateCommand::Monitor(args) => {
                create_monitor(args)
                    .instrument(tracing::info_span!("hapg", component = "monitor"))
                    .await
            }
            CreateCommand::Postgres(args) => {
                let span = tracing::info_span!(
                    "hapg",
                    component = "keeper",
                    formation = %args.formation,
                    node = %args.name
                );
                create_postgres(args).instrument(span).await
            }
        },
        Command::Run(args) => run(&args.pgdata).await,
        Command::Stop(args) => stop(&args.pgdata, args.fast, args.immediate).await,
        Command::Show(cmd) => show_command(cmd).await,
        Command::Perform(PerformCommand::Switchover(args) | PerformCommand::Failover(args)) => {
            perform_switchover(args, None).await
        }
        Command::Perform(PerformCommand::Promotion { perform, name }) => {
            perform_switchover(perform, Some(name)).await
        }
        Command::Set(cmd) => set_command(cmd).await,
        Command::Enable(EnableCommand::Maintenance(args)) => maintenance(args, true).await,
        Command::Disable(DisableCommand::Maintenance(args)) => maintenance(args, false).await,
        Command::Drop(DropCommand::Node {
            monitor,
            name,
            destroy,
            wait,
        }) => drop_node(monitor, name, destroy, wait).await,
        Command::Config(cmd) => config_command(cmd),
        Command::Router(RouterCommand::Run { config, .. }) => router_run(config).await,
        Command::Demo(args) => {
            crate::demo::run(args)
                .instrument(tracing::info_span!("hapg", component = "demo"))
                .await
        }
        Command::Monitor(MonitorCommand::Run {
            monitor,
            http_listen,
        }) => monitor_run(&monitor, http_listen).await,
        Command::Watch(args) => {
            let t = target(&args)?;
            crate::watch::run(&t.conninfo, &t.formation, args.json).await
        }
    }
}

fn instance_options(args: &InstanceArgs) -> Result<InstanceOptions> {
    let auth = match (&args.auth, args.skip_pg_hba) {
        (Some(auth), _) => auth.clone(),
        (None, true) => "trust".to_string(),
        (None, false) => bail!("--auth is required (or --skip-pg-hba): it is the method written into the pg_hba rules hapg adds, for instance --auth trust or --auth scram-sha-256"),
    };
    if !hapg_config::AUTH_METHODS.contains(&auth.as_str()) {
        bail!(
            "--auth {auth:?} is not supported: use one of {}",
            hapg_config::AUTH_METHODS.join(", ")
        );
    }
    let ssl = match (&args.server_cert, &args.server_key) {
        (Some(cert), Some(key)) => SslConfig::files(
            args.ssl_ca_file
                .as_deref()
                .map(|ca| tls_file("--ssl-ca-file", ca))
                .transpose()?,
            tls_file("--server-cert", cert)?,
            tls_file("--server-key", key)?,
        ),
        _ => match (args.ssl_self_signed, args.no_ssl) {
            (true, _) => SslConfig::self_signed(),
            (false, true) => SslConfig::off(),
            (false, false) => bail!(
                "choose --ssl-self-signed, --server-cert and --server-key (with --ssl-ca-file to verify certificates), or --no-ssl"
            ),
        },
    };
    if args.hostname.trim().is_empty() {
        bail!("--hostname must not be empty");
    }
    check_resolves(&args.hostname, args.pgport)?;
    Ok(InstanceOptions {
        pgdata: args.pgdata.clone(),
        port: args.pgport,
        hostname: args.hostname.clone(),
        listen_addresses: args.listen.clone(),
        auth_method: auth,
        ssl,
        skip_pg_hba: args.skip_pg_hba,
        os_user: args.os_user.clone(),
        bindir: args.pgctl.clone().unwrap_or_else(postgres::default_bindir),
        username: args.username.clone(),
        http_listen: args
            .http_listen
            .map(|addr| addr.to_string())
            .unwrap_or_default(),
    })
}

/// A certificate or key file given on the command line, as the absolute path
/// Postgres and the connection strings will name; it must exist.
fn tls_file(flag: &str, path: &std::path::Path) -> Result<PathBuf> {
    std::fs::canonicalize(path).with_context(|| format!("{flag} {}", path.display()))
}

/// Refuses a `--hostname` that does not resolve, before anything is created:
/// the monitor would register it and then health-check whatever address the
/// name later points at, or nothing.
fn check_resolves(hostname: &str, port: u16) -> Result<()> {
    use std::net::ToSocketAddrs;
    match (hostname, port).to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => bail!("--hostname {hostname:?} resolves to no address; give a name or address the other nodes and the monitor can reach"),
        Err(e) => bail!("--hostname {hostname:?} does not resolve ({e}); give a name or address the other nodes and the monitor can reach"),
    }
}

/// A password given on the command line or in a file (first line, trimmed).
fn password(value: &Option<String>, file: &Option<PathBuf>, flag: &str) -> Result<Option<String>> {
    Ok(match (value, file) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(file)) => Some(
            std::fs::read_to_string(file)
                .with_context(|| format!("reading --{flag}-file {}", file.display()))?
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    })
}

async fn create_monitor(args: CreateMonitorArgs) -> Result<()> {
    let opts = instance_options(&args.instance)?;
    let monitor_password = password(
        &args.monitor_password,
        &args.monitor_password_file,
        "monitor-password",
    )?;
    if monitor_password.is_none() && !matches!(opts.auth_method.as_str(), "trust" | "peer" | "cert")
    {
        bail!(
            "--auth {} needs a password for the autoctl_node role: give --monitor-password or --monitor-password-file",
            opts.auth_method
        );
    }
    let pgdata = NodePaths::for_pgdata(&opts.pgdata)?.pgdata;
    let paths = stop_postgres_on_interrupt(
        &pgdata,
        "the monitor",
        create::create_monitor(opts, monitor_password),
    )
    .await?;
    let config = NodeConfig::load(&paths.config)?;
    println!("{}", pgconn_redacted(&create::monitor_uri(&config)));
    if args.instance.run {
        run(&paths.pgdata).await?;
    }
    Ok(())
}

fn pgconn_redacted(uri: &str) -> String {
    hapg_monitor::pgconn::redact_uri(uri)
}

async fn create_postgres(args: CreatePostgresArgs) -> Result<()> {
    let opts = instance_options(&args.instance)?;
    let replication_password = password(
        &args.replication_password,
        &args.replication_password_file,
        "replication-password",
    )?;
    let node = NodeOptions {
        name: args.name.clone(),
        formation: args.formation.clone(),
        monitor: args.monitor.clone(),
        dbname: args.dbname.clone(),
        candidate_priority: args.candidate_priority,
        replication_quorum: args.replication_quorum,
        replication_password,
        monitor_timeout: Duration::from_secs(args.monitor_timeout),
    };
    let existed = opts.pgdata.exists();
    let paths = create::create_node(opts, node).await?;
    if args.instance.run {
        run(&paths.pgdata).await
    } else {
        let _pid = pidfile::PidFile::acquire(&paths.pid)?;
        // Once initialised, the keeper leaves Postgres running for `hapg run`
        // to take over; interrupted before that, it stops it.
        let shutdown = shutdown_on_signals()?;
        match keeper::run(paths.clone(), RunMode::UntilInitialized, shutdown).await? {
            Exit::Initialized => Ok(()),
            Exit::Stopped => bail!(
                "interrupted while initialising the node in {pgdata}; its Postgres is stopped. \
                 Run `hapg run --pgdata {pgdata}` to finish",
                pgdata = args.instance.pgdata.display()
            ),
            Exit::Dropped => bail!(
                "the node in {} was dropped from the formation while it was being created",
                args.instance.pgdata.display()
            ),
            Exit::InitFailed(error) => Err(undo_failed_create(&paths, existed, &error).await),
        }
    }
}

/// The error of a `create postgres` whose initialisation kept failing, after
/// undoing it: what failed, and either that nothing is left (run the same
/// command again) or exactly what is left and how to finish or remove it.
async fn undo_failed_create(paths: &NodePaths, existed: bool, error: &str) -> anyhow::Error {
    let pgdata = paths.pgdata.display();
    let failed = format!(
        "could not initialise the node in {pgdata} within {} s: {error}",
        keeper::INIT_GIVE_UP.as_secs()
    );
    match create::undo_node(paths, existed).await {
        Ok(kept) => anyhow!(
            "{failed}\nthe monitor dropped the node and what this command wrote was removed{}; \
             fix the cause and run the same command again",
            kept.map(|log| format!(" (the server log is kept as {})", log.display()))
                .unwrap_or_default()
        ),
        Err(undo) => anyhow!(
            "{failed}\nundoing it failed too: {undo}\nleft behind: the node's registration on \
             the monitor, its configuration {config}, its state {state} and the data directory \
             {pgdata}. Finish it with `hapg run --pgdata {pgdata}` once the cause is fixed, or \
             remove it with `hapg drop node --pgdata {pgdata} --destroy` while that runs",
            config = paths.config.display(),
            state = paths.state.display(),
        ),
    }
}

/// Runs a create step that starts Postgres in `pgdata`, until SIGTERM, SIGINT
/// or SIGQUIT. On a signal the step ends (a tool it runs, such as initdb or
/// pg_ctl, is killed with it) and so does the Postgres it started, which has a
/// session of its own and would otherwise outlive the interrupted command:
/// SIGTERM and SIGINT with a fast shutdown, SIGQUIT with an immediate one.
async fn stop_postgres_on_interrupt<T>(
    pgdata: &Path,
    what: &str,
    step: impl std::future::Future<Output = Result<T, hapg_keeper::KeeperError>>,
) -> Result<T> {
    use nix::sys::signal::Signal;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut quit = signal(SignalKind::quit())?;
    let (received, shutdown) = tokio::select! {
        result = step => return Ok(result?),
        _ = term.recv() => ("SIGTERM", Signal::SIGINT),
        _ = int.recv() => ("SIGINT", Signal::SIGINT),
        _ = quit.recv() => ("SIGQUIT", Signal::SIGQUIT),
    };
    let dir = pgdata.display();
    match stop_postmaster(pgdata, shutdown).await {
        Ok(()) => bail!(
            "interrupted by {received} while creating {what} in {dir}; its Postgres is stopped. \
             The directory is incomplete: remove it and run the same command again"
        ),
        Err(pid) => bail!(
            "interrupted by {received} while creating {what} in {dir}, and its Postgres \
             (pid {pid}) is still shutting down; once it is gone, remove the directory and \
             run the same command again"
        ),
    }
}

/// Sends `shutdown` to the postmaster of `pgdata` and waits (at most 30 s)
/// until it is gone; `Err(pid)` if it is still there. A pg_ctl killed while
/// starting Postgres may have launched it an instant before: a postmaster
/// that appears within half a second is stopped too.
async fn stop_postmaster(pgdata: &Path, shutdown: nix::sys::signal::Signal) -> Result<(), i32> {
    let start = std::time::Instant::now();
    let mut signalled = None;
    loop {
        match hapg::drill::postmaster_pid(pgdata) {
            Some(pid) if signalled != Some(pid) => {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), shutdown);
                signalled = Some(pid);
            }
            Some(pid) if start.elapsed() > Duration::from_secs(30) => return Err(pid),
            Some(_) => {}
            None if signalled.is_some() || start.elapsed() > Duration::from_millis(500) => {
                return Ok(())
            }
            None => {}
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM and SIGINT stop with a fast Postgres shutdown, SIGQUIT with an immediate one.
fn shutdown_on_signals() -> Result<Shutdown> {
    let shutdown = Shutdown::default();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut quit = signal(SignalKind::quit())?;
    let s = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = quit.recv() => s.immediate.store(true, Ordering::Relaxed),
        }
        tracing::info!("stopping");
        s.token.cancel();
    });
    Ok(shutdown)
}

fn load_config(pgdata: &Path) -> Result<(NodePaths, NodeConfig)> {
    let paths = NodePaths::for_pgdata(pgdata)?;
    if !paths.config.exists() {
        bail!(
            "{} is not a hapg node: no configuration at {}. Create it first with \
             `hapg create monitor --pgdata {}` or `hapg create postgres --pgdata {}`",
            paths.pgdata.display(),
            paths.config.display(),
            pgdata.display(),
            pgdata.display()
        );
    }
    let config = NodeConfig::load(&paths.config)?;
    Ok((paths, config))
}

async fn run(pgdata: &Path) -> Result<()> {
    let (_, config) = load_config(pgdata)?;
    // Every line this process logs names what it is (`--log-format json`).
    let span = match config.node.role {
        Role::Monitor => tracing::info_span!("hapg", component = "monitor"),
        Role::Keeper => tracing::info_span!(
            "hapg",
            component = "keeper",
            formation = %config.node.formation,
            node = %config.node.name
        ),
    };
    run_node(pgdata).instrument(span).await
}

async fn run_node(pgdata: &Path) -> Result<()> {
    let (paths, config) = load_config(pgdata)?;
    let _pid = pidfile::PidFile::acquire(&paths.pid)?;
    let shutdown = shutdown_on_signals()?;
    match config.node.role {
        Role::Monitor => {
            hapg_keeper::monitor_node::run(paths, MonitorTimings::default(), shutdown).await?;
        }
        Role::Keeper => match keeper::run(paths, RunMode::Forever, shutdown).await? {
            Exit::Dropped => println!("node {} was dropped from the formation", config.node.name),
            // Only `RunMode::UntilInitialized` gives up on an initialisation.
            Exit::Stopped | Exit::Initialized | Exit::InitFailed(_) => {}
        },
    }
    Ok(())
}

async fn stop(pgdata: &Path, fast: bool, immediate: bool) -> Result<()> {
    let (paths, _) = load_config(pgdata)?;
    let Some(pid) = pidfile::running_pid(&paths.pid) else {
        bail!(
            "hapg is not running for {} (no live pid in {})",
            paths.pgdata.display(),
            paths.pid.display()
        );
    };
    let sig = if immediate {
        nix::sys::signal::Signal::SIGQUIT
    } else if fast {
        nix::sys::signal::Signal::SIGINT
    } else {
        nix::sys::signal::Signal::SIGTERM
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
        .with_context(|| format!("signalling hapg (pid {pid})"))?;
    for _ in 0..1200 {
        if !pidfile::process_alive(pid) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("hapg (pid {pid}) did not stop within 60 s")
}

/// Where the monitor is, which formation, and the TLS parameters of formation URIs.
struct Target {
    conninfo: String,
    formation: String,
    sslmode: String,
    monitor_config: Option<NodeConfig>,
    node_config: Option<NodeConfig>,
}

fn target(args: &MonitorArgs) -> Result<Target> {
    if let Some(uri) = &args.monitor {
        return Ok(Target {
            conninfo: uri.clone(),
            formation: args.formation.clone().unwrap_or_else(|| "default".into()),
            sslmode: ssl_query_of(uri),
            monitor_config: None,
            node_config: None,
        });
    }
    let Some(pgdata) = &args.pgdata else {
        bail!("give --pgdata (of the monitor or of a node) or --monitor URI");
    };
    let (_, config) = load_config(pgdata)?;
    Ok(match config.node.role {
        Role::Monitor => Target {
            conninfo: create::monitor_local_conninfo(&config),
            formation: args.formation.clone().unwrap_or_else(|| "default".into()),
            sslmode: create::ssl_query(&config.ssl),
            monitor_config: Some(config),
            node_config: None,
        },
        Role::Keeper => Target {
            conninfo: config.node.monitor.clone(),
            formation: args
                .formation
                .clone()
                .unwrap_or_else(|| config.node.formation.clone()),
            sslmode: create::ssl_query(&config.ssl),
            monitor_config: None,
            node_config: Some(config),
        },
    })
}

async fn connect(target: &Target) -> Result<MonitorClient> {
    Ok(MonitorClient::connect_with_retry(&target.conninfo, Duration::from_secs(5)).await?)
}

fn print_json(value: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

async fn show_command(cmd: ShowCommand) -> Result<()> {
    match cmd {
        ShowCommand::State(args) => {
            let t = target(&args)?;
            let monitor = connect(&t).await?;
            monitor.formation(&t.formation).await?;
            let nodes = monitor.nodes(&t.formation, None).await?;
            if args.json {
                print_json(&show::state_json(&nodes))
            } else {
                print!("{}", show::state_table(&nodes));
                Ok(())
            }
        }
        ShowCommand::Events {
            monitor: args,
            count,
        } => {
            let t = target(&args)?;
            let monitor = connect(&t).await?;
            let events = monitor.events(&t.formation, count).await?;
            if args.json {
                print_json(&show::events_json(&events))
            } else {
                print!("{}", show::events_table(&events));
                Ok(())
            }
        }
        ShowCommand::Uri {
            monitor: args,
            monitor_uri,
        } => show_uri(args, monitor_uri).await,
        ShowCommand::Settings(args) => show_settings(args).await,
        ShowCommand::StandbyNames(args) => {
            let t = target(&args)?;
            let monitor = connect(&t).await?;
            let names = monitor.synchronous_standby_names(&t.formation, 0).await?;
            if args.json {
                print_json(
                    &serde_json::json!({"formation": t.formation, "group": 0, "synchronous_standby_names": names}),
                )
            } else {
                println!("'{names}'");
                Ok(())
            }
        }
        ShowCommand::Systemd(args) => {
            let (paths, config) = load_config(&args.pgdata)?;
            print!("{}", systemd_unit(&paths, &config)?);
            Ok(())
        }
    }
}

/// The TLS parameters of formation URIs, as the monitor URI `uri` has them.
fn ssl_query_of(uri: &str) -> String {
    use hapg_config::conninfo::{self, CertCheck};
    match conninfo::parse(uri).map(|c| c.cert_check) {
        Ok(CertCheck::ChainAndHost { root_cert }) => {
            create::ssl_query_with("verify-full", Some(&root_cert))
        }
        Ok(CertCheck::Chain { root_cert }) => create::ssl_query_with("verify-ca", Some(&root_cert)),
        _ if uri.contains("sslmode=require") => "sslmode=require".into(),
        _ => "sslmode=prefer".into(),
    }
}

fn formation_uri(nodes: &[NodeRow], dbname: &str, ssl_query: &str) -> String {
    let hosts: Vec<String> = nodes.iter().map(NodeRow::address).collect();
    format!(
        "postgres://{}/{dbname}?target_session_attrs=read-write&{ssl_query}",
        hosts.join(",")
    )
}

async fn show_uri(args: MonitorArgs, monitor_only: bool) -> Result<()> {
    let t = target(&args)?;
    let monitor_uri = match (&t.monitor_config, &t.node_config) {
        (Some(c), _) => create::monitor_uri(c),
        (None, Some(c)) => c.node.monitor.clone(),
        (None, None) => t.conninfo.clone(),
    };
    if monitor_only {
        println!("{monitor_uri}");
        return Ok(());
    }
    let monitor = connect(&t).await?;
    let mut rows: Vec<(String, String, String)> =
        vec![("monitor".into(), "monitor".into(), monitor_uri)];
    let formations = monitor.formations().await?;
    for f in &formations {
        if args
            .formation
            .as_ref()
            .is_some_and(|only| only != &f.formation)
        {
            continue;
        }
        let nodes = monitor.nodes(&f.formation, Some(0)).await?;
        rows.push((
            "formation".into(),
            f.formation.clone(),
            formation_uri(&nodes, &f.dbname, &t.sslmode),
        ));
    }
    for r in monitor.routers(Duration::from_secs(30)).await? {
        let dbname = formations
            .iter()
            .find(|f| f.formation == r.formation)
            .map_or("postgres".to_string(), |f| f.dbname.clone());
        rows.push((
            "router".into(),
            r.router_id.clone(),
            format!("postgres://{}/{dbname}", r.address),
        ));
        if let Some(read_only) = r.read_only_address {
            rows.push((
                "read-only".into(),
                r.router_id,
                format!("postgres://{read_only}/{dbname}"),
            ));
        }
    }
    if let Some(only) = &args.formation {
        if !args.json {
            let row = rows
                .iter()
                .find(|(kind, name, _)| kind == "formation" && name == only)
                .ok_or_else(|| anyhow!("formation {only:?} does not exist on the monitor"))?;
            println!("{}", row.2);
            return Ok(());
        }
    }
    if args.json {
        return print_json(&serde_json::Value::Array(
            rows.iter()
                .map(
                    |(kind, name, uri)| serde_json::json!({"type": kind, "name": name, "uri": uri}),
                )
                .collect(),
        ));
    }
    let table_rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|(a, b, c)| vec![a, b, pgconn_redacted(&c)])
        .collect();
    print!(
        "{}",
        show::table_last_left(
            &["Type", "Name", "Connection String"],
            &table_rows,
            &[12, 7]
        )
    );
    Ok(())
}

async fn show_settings(args: MonitorArgs) -> Result<()> {
    let t = target(&args)?;
    let monitor = connect(&t).await?;
    let f = monitor.formation(&t.formation).await?;
    let nodes = monitor.nodes(&t.formation, None).await?;
    let names = monitor.synchronous_standby_names(&t.formation, 0).await?;
    let mut rows = vec![
        vec![
            "formation".to_string(),
            f.formation.clone(),
            "number_sync_standbys".to_string(),
            f.number_sync_standbys.to_string(),
        ],
        vec![
            "primary".to_string(),
            nodes
                .iter()
                .find(|n| n.goal.can_take_writes())
                .map_or("-".to_string(), |n| n.name.clone()),
            "synchronous_standby_names".to_string(),
            format!("'{names}'"),
        ],
    ];
    for n in &nodes {
        rows.push(vec![
            "node".into(),
            n.name.clone(),
            "candidate priority".into(),
            n.candidate_priority.to_string(),
        ]);
        rows.push(vec![
            "node".into(),
            n.name.clone(),
            "replication quorum".into(),
            n.replication_quorum.to_string(),
        ]);
    }
    if args.json {
        return print_json(&serde_json::Value::Array(
            rows.iter()
                .map(|r| serde_json::json!({"context": r[0], "name": r[1], "setting": r[2], "value": r[3]}))
                .collect(),
        ));
    }
    print!(
        "{}",
        show::table(
            &["Context", "Name", "Setting", "Value"],
            &rows,
            &[9, 4, 7, 5]
        )
    );
    Ok(())
}

fn systemd_unit(paths: &NodePaths, config: &NodeConfig) -> Result<String> {
    let exe = std::env::current_exe().context("finding the hapg executable")?;
    let user = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map_or_else(|| "root".to_string(), |u| u.name);
    let mut env = format!("Environment = 'PGDATA={}'\n", paths.pgdata.display());
    for var in ["XDG_CONFIG_HOME", "XDG_DATA_HOME", "HAPG_PG_BINDIR"] {
        if let Ok(value) = std::env::var(var) {
            env.push_str(&format!("Environment = '{var}={value}'\n"));
        }
    }
    let what = match config.node.role {
        Role::Monitor => "monitor".to_string(),
        Role::Keeper => format!("node {}", config.node.name),
    };
    Ok(format!(
        "[Unit]\n\
         Description = hapg {what} ({pgdata})\n\
         After = network-online.target\n\
         Wants = network-online.target\n\
         \n\
         [Service]\n\
         # hapg runs as {user}; when that is root it runs Postgres as OS user {os_user}.\n\
         User = {user}\n\
         WorkingDirectory = /\n\
         {env}\
         ExecStart = {exe} run --pgdata {pgdata}\n\
         ExecStop = {exe} stop --pgdata {pgdata}\n\
         Restart = always\n\
         RestartSec = 1\n\
         StartLimitBurst = 0\n\
         TimeoutStopSec = 90\n\
         \n\
         [Install]\n\
         WantedBy = multi-user.target\n",
        pgdata = paths.pgdata.display(),
        exe = exe.display(),
        os_user = config.node.os_user,
    ))
}

/// Prints each node's state change while waiting, as pg_autoctl's notification table does.
struct Progress {
    seen: Vec<(i64, NodeState, NodeState)>,
}

impl Progress {
    fn new() -> Progress {
        println!(
            "{:>8} | {:>8} | {:>5} | {:>20} | {:>19} | {:>19}",
            "Time", "Name", "Node", "Host:Port", "Current State", "Assigned State"
        );
        println!(
            "{}-+-{}-+-{}-+-{}-+-{}-+-{}",
            "-".repeat(8),
            "-".repeat(8),
            "-".repeat(5),
            "-".repeat(20),
            "-".repeat(19),
            "-".repeat(19)
        );
        Progress { seen: Vec::new() }
    }

    fn update(&mut self, nodes: &[NodeRow]) {
        for n in nodes {
            let key = (n.node_id, n.reported, n.goal);
            if !self.seen.contains(&key) {
                self.seen.retain(|(id, _, _)| *id != n.node_id);
                self.seen.push(key);
                println!(
                    "{:>8} | {:>8} | {:>5} | {:>20} | {:>19} | {:>19}",
                    time_of_day(),
                    n.name,
                    n.node_id,
                    n.address(),
                    n.reported.as_str(),
                    n.goal.as_str()
                );
            }
        }
    }
}

fn time_of_day() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "{:02}:{:02}:{:02}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    )
}

async fn perform_switchover(args: PerformArgs, promote: Option<String>) -> Result<()> {
    let t = target(&args.monitor)?;
    let mut monitor = connect(&t).await?;
    let before = monitor.nodes(&t.formation, Some(0)).await?;
    let old_primary = before
        .iter()
        .find(|n| n.goal.can_take_writes())
        .map(|n| n.node_id);
    let timeout = Duration::from_secs(args.wait);
    let wanted = match &promote {
        Some(name) => {
            let node = monitor.node_by_name(&t.formation, name).await?;
            monitor
                .request(
                    &t.formation,
                    node.group_id,
                    Some(node.node_id),
                    RequestKind::Promotion,
                    timeout,
                )
                .await?;
            Some(node.node_id)
        }
        None => {
            monitor
                .request(&t.formation, 0, None, RequestKind::Switchover, timeout)
                .await?;
            None
        }
    };
    let mut progress = Progress::new();
    let silent_after = MonitorTimings::default().unhealthy_timeout;
    let nodes = monitor
        .wait_until(
            &t.formation,
            "the new primary and its standbys",
            timeout,
            |nodes| {
                progress.update(nodes);
                let new_primary = nodes.iter().find(|n| {
                    n.is_converged_primary()
                        && Some(n.node_id) != old_primary
                        && wanted.is_none_or(|w| w == n.node_id)
                });
                new_primary.is_some()
                    && nodes
                        .iter()
                        .filter(|n| !n.is_converged_primary() && !n.is_silent(silent_after))
                        .all(|n| {
                            n.reported == n.goal
                                && matches!(n.goal, NodeState::Secondary | NodeState::Maintenance)
                        })
            },
        )
        .await?;
    let skipped: Vec<&str> = nodes
        .iter()
        .filter(|n| !n.is_converged_primary() && n.is_silent(silent_after))
        .map(|n| n.name.as_str())
        .collect();
    if !skipped.is_empty() {
        println!(
            "did not wait for {}: not reporting to the monitor and failing its health checks; \
             they rejoin as standbys when they are back",
            skipped.join(", ")
        );
    }
    Ok(())
}

async fn set_command(cmd: SetCommand) -> Result<()> {
    let (args, name, kind, value) = match cmd {
        SetCommand::Node(SetNodeCommand::CandidatePriority {
            monitor,
            name,
            value,
        }) => (
            monitor,
            name,
            RequestKind::SetCandidatePriority,
            value.to_string(),
        ),
        SetCommand::Node(SetNodeCommand::ReplicationQuorum {
            monitor,
            name,
            value,
        }) => (
            monitor,
            name,
            RequestKind::SetReplicationQuorum,
            value.to_string(),
        ),
        SetCommand::Formation(SetFormationCommand::NumberSyncStandbys { monitor, value }) => (
            monitor,
            None,
            RequestKind::SetNumberSyncStandbys,
            value.to_string(),
        ),
    };
    let t = target(&args)?;
    let mut monitor = connect(&t).await?;
    let node = match (kind, &name, &t.node_config) {
        (RequestKind::SetNumberSyncStandbys, _, _) => None,
        (_, Some(name), _) => Some(monitor.node_by_name(&t.formation, name).await?),
        (_, None, Some(config)) => Some(monitor.node(config.node.node_id).await?),
        (_, None, None) => bail!("name the node with --name, or give its --pgdata"),
    };
    let reply = monitor
        .request_value(
            &t.formation,
            node.as_ref().map_or(0, |n| n.group_id),
            node.as_ref().map(|n| n.node_id),
            kind,
            Some(value),
            Duration::from_secs(30),
        )
        .await?;
    println!("{reply}");
    Ok(())
}

trait NodeRowExt {
    fn is_converged_primary(&self) -> bool;
    /// Down as far as the monitor can tell: no report for `after` and failing
    /// its health checks (a powered-off node). Commands that wait for a group
    /// to converge do not wait for such a node.
    fn is_silent(&self, after: Duration) -> bool;
}

impl NodeRowExt for NodeRow {
    fn is_converged_primary(&self) -> bool {
        self.reported == NodeState::Primary && self.goal == NodeState::Primary
    }

    fn is_silent(&self, after: Duration) -> bool {
        self.health == hapg_monitor::Health::Bad && self.report_age.is_none_or(|age| age > after)
    }
}

async fn maintenance(args: MaintenanceArgs, enable: bool) -> Result<()> {
    let (_, config) = load_config(&args.pgdata)?;
    if config.node.role != Role::Keeper {
        bail!("maintenance applies to Postgres nodes, not to the monitor");
    }
    let mut monitor =
        MonitorClient::connect_with_retry(&config.node.monitor, Duration::from_secs(5)).await?;
    let node = monitor.node(config.node.node_id).await?;
    if enable && node.goal.can_take_writes() && !args.allow_failover {
        bail!(
            "node {} is the primary: maintenance moves the primary to a standby first; \
             pass --allow-failover to do that",
            node.name
        );
    }
    let kind = if enable {
        RequestKind::EnableMaintenance
    } else {
        RequestKind::DisableMaintenance
    };
    let timeout = Duration::from_secs(args.wait);
    monitor
        .request(
            &node.formation,
            node.group_id,
            Some(node.node_id),
            kind,
            timeout,
        )
        .await?;
    let mut progress = Progress::new();
    let id = node.node_id;
    monitor
        .wait_until(
            &node.formation,
            "the maintenance change",
            timeout,
            |nodes| {
                progress.update(nodes);
                nodes.iter().find(|n| n.node_id == id).is_some_and(|n| {
                    n.reported == n.goal
                        && if enable {
                            n.goal == NodeState::Maintenance
                        } else {
                            matches!(
                                n.goal,
                                NodeState::Secondary | NodeState::Primary | NodeState::Single
                            )
                        }
                })
            },
        )
        .await?;
    Ok(())
}

async fn drop_node(
    args: MonitorArgs,
    name: Option<String>,
    destroy: bool,
    wait: u64,
) -> Result<()> {
    let t = target(&args)?;
    let mut monitor = connect(&t).await?;
    let node = match (&name, &t.node_config) {
        (Some(name), _) => monitor.node_by_name(&t.formation, name).await?,
        (None, Some(config)) => monitor.node(config.node.node_id).await?,
        (None, None) => bail!("give --pgdata of the node to drop, or --name with --monitor"),
    };
    let timeout = Duration::from_secs(wait);
    monitor
        .request(
            &node.formation,
            node.group_id,
            Some(node.node_id),
            RequestKind::Drop,
            timeout,
        )
        .await?;
    let id = node.node_id;
    monitor
        .wait_until(
            &node.formation,
            &format!("node {} to be dropped (is its keeper running?)", node.name),
            timeout,
            |nodes| nodes.iter().all(|n| n.node_id != id),
        )
        .await?;
    println!("node {} ({}) was dropped", node.name, node.address());
    if destroy {
        let Some(pgdata) = &args.pgdata else {
            bail!("--destroy needs --pgdata: the data directory to remove");
        };
        let (paths, config) = load_config(pgdata)?;
        for _ in 0..200 {
            if pidfile::running_pid(&paths.pid).is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let pg = postgres::LocalPostgres::from_config(&config)?;
        pg.stop(hapg_keeper::postgres::StopMode::Fast).await?;
        std::fs::remove_dir_all(&paths.pgdata)
            .with_context(|| format!("removing {}", paths.pgdata.display()))?;
        paths.remove_all();
        println!("removed {}", paths.pgdata.display());
    }
    Ok(())
}

fn config_command(cmd: ConfigCommand) -> Result<()> {
    match cmd {
        ConfigCommand::Get { pgdata, key } => {
            let (paths, config) = load_config(&pgdata)?;
            let text = std::fs::read_to_string(&paths.config)?;
            let Some(key) = key else {
                print!("{text}");
                return Ok(());
            };
            let doc: toml::Value = toml::from_str(&text)?;
            // A key the file does not spell out has its default.
            let defaults = toml::Value::try_from(&config)?;
            let value = lookup(&doc, &key)
                .or_else(|| lookup(&defaults, &key))
                .ok_or_else(|| anyhow!("{key}: no such setting in {}", paths.config.display()))?;
            match value {
                toml::Value::String(s) => println!("{s}"),
                other => println!("{other}"),
            }
            Ok(())
        }
        ConfigCommand::Set { pgdata, key, value } => {
            let (paths, config) = load_config(&pgdata)?;
            if hapg_config::READ_ONLY_KEYS.contains(&key.as_str()) {
                bail!(
                    "{key} cannot be changed: it identifies this node to the monitor and the \
                     other nodes (drop the node and create it again to change it)"
                );
            }
            let text = std::fs::read_to_string(&paths.config)?;
            let mut doc: toml::Value = toml::from_str(&text)?;
            let (section, name) = key
                .split_once('.')
                .ok_or_else(|| anyhow!("{key}: settings are named section.key"))?;
            // A section or key the file does not spell out (written before
            // it existed, or left at its default) takes the type of its default.
            let defaults = toml::Value::try_from(&config)?;
            let old = lookup(&doc, &key)
                .or_else(|| lookup(&defaults, &key))
                .cloned()
                .ok_or_else(|| anyhow!("{key}: no such setting"))?;
            let table = match doc.as_table_mut() {
                Some(root) => root
                    .entry(section)
                    .or_insert_with(|| toml::Value::Table(Default::default()))
                    .as_table_mut()
                    .ok_or_else(|| anyhow!("{key}: no section [{section}]"))?,
                None => bail!("{}: not a TOML table", paths.config.display()),
            };
            let new = match old {
                toml::Value::Integer(_) => toml::Value::Integer(
                    value
                        .parse()
                        .map_err(|_| anyhow!("{key}: {value:?} is not a whole number"))?,
                ),
                toml::Value::Boolean(_) => toml::Value::Boolean(
                    value
                        .parse()
                        .map_err(|_| anyhow!("{key}: {value:?} is not true or false"))?,
                ),
                _ => toml::Value::String(value.clone()),
            };
            table.insert(name.to_string(), new);
            let text = toml::to_string_pretty(&doc)?;
            let config = NodeConfig::parse(&paths.config, &text)?;
            if key == "postgresql.bindir" {
                let pg_ctl = config.postgresql.bindir.join("pg_ctl");
                if !pg_ctl.is_file() {
                    bail!(
                        "{key}: {} has no pg_ctl",
                        config.postgresql.bindir.display()
                    );
                }
            }
            hapg_keeper::paths::write_atomic(&paths.config, text.as_bytes())?;
            println!("{value}");
            Ok(())
        }
    }
}

fn lookup<'a>(doc: &'a toml::Value, key: &str) -> Option<&'a toml::Value> {
    key.split('.').try_fold(doc, |v, part| v.get(part))
}

/// `hapg monitor run --monitor etcd://...`: the monitor service on a store
/// that is not the monitor node's own Postgres.
async fn monitor_run(uri: &str, http_listen: Option<std::net::SocketAddr>) -> Result<()> {
    if !uri.starts_with("etcd://") {
        bail!("hapg monitor run takes an etcd:// URI; a Postgres monitor runs with `hapg run --pgdata`");
    }
    // Bound before anything runs, so an address in use is the first error.
    let http = match http_listen {
        Some(addr) => Some(hapg_keeper::http::bind(addr).await?),
        None => None,
    };
    let shutdown = shutdown_on_signals()?;
    if let Some(listener) = http {
        // The same endpoints as a Postgres monitor's, read from the store
        // this service runs on.
        let (sender, receiver) =
            tokio::sync::watch::channel(hapg_keeper::monitor_status::MonitorStatus::starting());
        tokio::spawn(hapg_keeper::monitor_status::poll(
            uri.to_string(),
            sender,
            shutdown.token.clone(),
        ));
        tokio::spawn(hapg_keeper::http::serve(
            listener,
            hapg_keeper::http::Endpoints::Monitor(receiver),
            shutdown.token.clone(),
        ));
    }
    hapg_monitor::service::run(uri, hapg_config::MonitorTimings::default(), shutdown.token).await?;
    Ok(())
}

async fn router_run(path: PathBuf) -> Result<()> {
    let config = hapg_config::router::RouterConfig::load(&path)?;
    let span = tracing::info_span!(
        "hapg",
        component = "router",
        formation = %config.router.formation
    );
    router_serve(path, config).instrument(span).await
}

async fn router_serve(path: PathBuf, config: hapg_config::router::RouterConfig) -> Result<()> {
    hapg_router::check_formation(&config.router, Duration::from_secs(3))
        .await
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let listener = hapg_router::bind(&config)
        .with_context(|| format!("cannot listen on {}", config.router.listen))?;
    let shutdown = shutdown_on_signals()?;
    // SIGHUP is the router's own: it reloads router.toml.
    hapg_router::run(listener, path, shutdown.token).await?;
    Ok(())
}
