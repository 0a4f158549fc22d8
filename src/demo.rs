//! `hapg demo`: a monitor, two nodes and the router on free ports under one
//! directory, as the tutorial builds them; `--drill` then runs the tutorial's
//! switchover and node failure under a live writer and reports what a user
//! would want to know.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hapg::drill::{self, Writer};
use hapg_monitor::client::{NodeRow, RequestKind};
use hapg_monitor::{MonitorClient, NodeState};

use crate::show;
use crate::DemoArgs;

/// How long each step of the demo may take.
const STEP: Duration = Duration::from_secs(120);

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The demo's processes, stopped (and their Postgres with them) on drop.
struct Demo {
    dir: PathBuf,
    os_user: String,
    /// `--log-format` of the demo, handed to every process it starts.
    log_format: crate::log_format::LogFormat,
    children: BTreeMap<String, Child>,
}

impl Demo {
    fn hapg(&self, args: &[&str]) -> Result<Command> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(args)
            .current_dir(&self.dir)
            .env("XDG_CONFIG_HOME", self.dir.join("xdg/config"))
            .env("XDG_DATA_HOME", self.dir.join("xdg/data"))
            .env_remove("PGDATA")
            .env("HAPG_LOG_FORMAT", self.log_format.as_str())
            .stdin(Stdio::null());
        Ok(cmd)
    }

    fn spawn(&mut self, name: &str, args: &[&str]) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))?;
        let child = self
            .hapg(args)?
            .stdout(log.try_clone()?)
            .stderr(log)
            .env("HAPG_LOG", "info")
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.children.insert(name.to_string(), child);
        Ok(())
    }

    fn create_node(&mut self, name: &str, port: u16, monitor_uri: &str) -> Result<()> {
        let pgdata = self.dir.join(name).display().to_string();
        let port = port.to_string();
        let os_user = self.os_user.clone();
        self.spawn(
            name,
            &[
                "create",
                "postgres",
                "--pgdata",
                &pgdata,
                "--pgport",
                &port,
                "--hostname",
                "localhost",
                "--name",
                name,
                "--dbname",
                "appdb",
                "--auth",
                "trust",
                "--ssl-self-signed",
                "--monitor",
                monitor_uri,
                "--os-user",
                &os_user,
                "--run",
            ],
        )
    }

    /// SIGKILLs a node's hapg and its Postgres together: a power-off.
    fn power_off(&mut self, name: &str) {
        let postmaster = drill::postmaster_pid(&self.dir.join(name));
        if let Some(mut child) = self.children.remove(name) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(pid) = postmaster {
            drill::kill_tree(pid);
        }
    }

    fn stop_all(&mut self) {
        // Nodes first, then the router and the monitor; each `hapg run` stops its Postgres.
        let mut names: Vec<String> = self.children.keys().cloned().collect();
        names.sort_by_key(|n| match n.as_str() {
            "monitor" => 2,
            "router" => 1,
            _ => 0,
        });
        for name in names {
            if let Some(mut child) = self.children.remove(&name) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(child.id() as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
                let deadline = Instant::now() + Duration::from_secs(60);
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = child.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.stop_all();
    }
}

async fn wait_for<F>(monitor: &mut MonitorClient, what: &str, done: F) -> Result<Vec<NodeRow>>
where
    F: FnMut(&[NodeRow]) -> bool,
{
    Ok(monitor.wait_until("default", what, STEP, done).await?)
}

fn converged(nodes: &[NodeRow], name: &str, state: NodeState) -> bool {
    nodes
        .iter()
        .any(|n| n.name == name && n.reported == state && n.goal == state)
}

fn demo_dir(args: &DemoArgs) -> Result<PathBuf> {
    let dir = match &args.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            hapg_keeper::paths::absolute(dir)?
        }
        None => {
            let base = std::env::temp_dir().join(format!("hapg-demo-{}", std::process::id()));
            std::fs::create_dir_all(&base)?;
            base
        }
    };
    if std::fs::read_dir(&dir)?.next().is_some() {
        bail!(
            "{} is not empty: the demo creates its nodes in a new directory",
            dir.display()
        );
    }
    // Postgres runs as another OS user when hapg runs as root: it must reach this.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    Ok(dir)
}

/// Runs the demo. A temporary directory the demo made for itself is removed
/// once everything stopped cleanly; a `--dir` of the user's, or any
/// directory after a failure, is kept for its logs.
pub async fn run(args: DemoArgs) -> Result<()> {
    let dir = demo_dir(&args)?;
    let result = run_in(&args, &dir).await;
    if result.is_ok() && args.dir.is_none() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("removing the demo's directory {}", dir.display()))?;
    } else {
        println!("The demo's data and logs stay in {}", dir.display());
    }
    result
}

/// The demo in `dir`; every process it started is stopped when this returns.
async fn run_in(args: &DemoArgs, dir: &std::path::Path) -> Result<()> {
    let dir = dir.to_path_buf();
    let mut demo = Demo {
        dir: dir.clone(),
        os_user: args.os_user.clone(),
        log_format: args.log.log_format,
        children: BTreeMap::new(),
    };
    println!("hapg demo in {}", dir.display());

    let monitor_port = free_port()?;
    let monitor_pgdata = dir.join("monitor").display().to_string();
    let port = monitor_port.to_string();
    let os_user = args.os_user.clone();
    demo.spawn(
        "monitor",
        &[
            "create",
            "monitor",
            "--pgdata",
            &monitor_pgdata,
            "--pgport",
            &port,
            "--hostname",
            "localhost",
            "--auth",
            "trust",
            "--ssl-self-signed",
            "--os-user",
            &os_user,
            "--run",
        ],
    )?;
    let monitor_uri = format!(
        "postgres://autoctl_node@localhost:{monitor_port}/pg_auto_failover?sslmode=require"
    );
    let mut monitor = MonitorClient::connect_with_retry(&monitor_uri, STEP)
        .await
        .with_context(|| {
            format!(
                "the monitor did not start; see {}",
                dir.join("monitor.log").display()
            )
        })?;

    println!("creating node_a and node_b...");
    demo.create_node("node_a", free_port()?, &monitor_uri)?;
    wait_for(&mut monitor, "node_a to be single", |n| {
        converged(n, "node_a", NodeState::Single)
    })
    .await?;
    demo.create_node("node_b", free_port()?, &monitor_uri)?;
    wait_for(&mut monitor, "node_a primary and node_b secondary", |n| {
        converged(n, "node_a", NodeState::Primary) && converged(n, "node_b", NodeState::Secondary)
    })
    .await?;

    let router_port = free_port()?;
    let router_toml = dir.join("router.toml");
    std::fs::write(
        &router_toml,
        format!(
            "[router]\nlisten = \"127.0.0.1:{router_port}\"\nmonitor = \"{monitor_uri}\"\nformation = \"default\"\n\n[auth]\ntype = \"trust\"\n"
        ),
    )?;
    let router_toml_s = router_toml.display().to_string();
    demo.spawn("router", &["router", "run", "--config", &router_toml_s])?;
    let router_uri = format!("postgres://postgres@127.0.0.1:{router_port}/appdb");
    wait_connectable(&router_uri).await?;

    let nodes = monitor.nodes("default", None).await?;
    print!("\n{}", show::state_table(&nodes));
    let hosts: Vec<String> = nodes.iter().map(NodeRow::address).collect();
    println!("\nmonitor:   {monitor_uri}");
    println!(
        "formation: postgres://{}/appdb?target_session_attrs=read-write&sslmode=require",
        hosts.join(",")
    );
    println!("router:    {router_uri}");
    println!(
        "\nTry: psql \"{router_uri}\"\n     XDG_CONFIG_HOME={0}/xdg/config XDG_DATA_HOME={0}/xdg/data hapg show state --pgdata {0}/monitor",
        dir.display()
    );

    if args.drill {
        let result = drill(&mut demo, &mut monitor, &router_uri).await;
        demo.stop_all();
        return result;
    }
    println!("\nRunning until interrupted (Ctrl-C).");
    tokio::signal::ctrl_c().await?;
    println!("stopping...");
    demo.stop_all();
    Ok(())
}

async fn wait_connectable(uri: &str) -> Result<()> {
    let deadline = Instant::now() + STEP;
    loop {
        match drill::connect(uri).await {
            Ok(client) if client.simple_query("SELECT 1").await.is_ok() => return Ok(()),
            _ if Instant::now() > deadline => bail!("{uri} did not answer within {STEP:?}"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The tutorial's switchover and node failure under a live writer through the router.
async fn drill(demo: &mut Demo, monitor: &mut MonitorClient, router_uri: &str) -> Result<()> {
    let first_event = monitor
        .events("default", 1)
        .await?
        .last()
        .map_or(0, |e| e.event_id);
    drill::connect(router_uri)
        .await?
        .batch_execute("CREATE TABLE IF NOT EXISTS drill (id bigint PRIMARY KEY)")
        .await?;
    println!("\ndrill: a writer inserts through the router while the primary moves twice");
    let writer = Writer::start(router_uri.to_string(), "drill", Duration::from_secs(600));
    tokio::time::sleep(Duration::from_secs(1)).await;

    println!("drill: perform switchover");
    let switchover_started = Instant::now();
    monitor
        .request("default", 0, None, RequestKind::Switchover, STEP)
        .await?;
    wait_for(monitor, "the switchover", |n| {
        converged(n, "node_b", NodeState::Primary) && converged(n, "node_a", NodeState::Secondary)
    })
    .await?;
    println!(
        "drill: switchover done in {:.1} s",
        switchover_started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    println!("drill: power off node_b (SIGKILL its keeper and Postgres)");
    let failure = Instant::now();
    demo.power_off("node_b");
    wait_for(monitor, "node_a to take over", |n| {
        converged(n, "node_a", NodeState::WaitPrimary)
    })
    .await?;
    println!(
        "drill: node_a writable again {:.1} s after the power-off",
        failure.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    println!("drill: restart node_b (hapg run): it rewinds and follows node_a");
    let pgdata = demo.dir.join("node_b").display().to_string();
    demo.spawn("node_b", &["run", "--pgdata", &pgdata])?;
    wait_for(monitor, "node_b to rejoin", |n| {
        converged(n, "node_a", NodeState::Primary) && converged(n, "node_b", NodeState::Secondary)
    })
    .await?;
    let report = writer.finish().await;
    let lost = drill::lost_writes(router_uri, "drill", &report.acked).await?;

    println!("\nTimeline (monitor events):");
    let events: Vec<_> = monitor
        .events("default", 200)
        .await?
        .into_iter()
        .filter(|e| e.event_id > first_event)
        .collect();
    for e in &events {
        let time = e.event_time.get(11..23).unwrap_or(&e.event_time);
        println!("  {time}  {}", e.description);
    }
    println!("\nResult:");
    println!("  writes acknowledged:        {}", report.acked.len());
    println!("  client errors:              {}", report.errors);
    println!(
        "  longest time without writes: {:.2} s",
        report.longest_gap.as_secs_f64()
    );
    println!("  acknowledged writes lost:   {}", lost.len());
    let nodes = monitor.nodes("default", None).await?;
    print!("\n{}", show::state_table(&nodes));
    if !lost.is_empty() {
        bail!("acknowledged writes were lost: {lost:?}");
    }
    Ok(())
}
