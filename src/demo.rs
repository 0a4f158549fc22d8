//! `hapg demo`: a monitor, two nodes and the router on free ports under one
//! directory, as the tutorial builds them; `--drill` then runs the tutorial's
//! switchover and node failure under a live writer and reports what a user
//! would want to know.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hapg::cluster::{Cluster, NodeSpec, Options, RouterSpec, Workdir};
use hapg::drill::{self, Writer};
use hapg_monitor::client::{NodeRow, RequestKind};
use hapg_monitor::{MonitorClient, NodeState};

use crate::show;
use crate::DemoArgs;

/// How long each step of the demo may take.
const STEP: Duration = Duration::from_secs(120);

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

/// The demo's cluster: in `--dir` (kept, refused unless empty) or in a new
/// temporary directory; processes stopped in order when it ends.
fn demo_cluster(args: &DemoArgs) -> Result<Cluster> {
    let dir = match &args.dir {
        Some(dir) => Workdir::Given(dir.clone()),
        None => Workdir::Temp {
            parent: std::env::temp_dir(),
            prefix: "hapg-demo-".into(),
        },
    };
    let mut options = Options::new(std::env::current_exe()?, dir);
    options.os_user = Some(args.os_user.clone());
    options.start_timeout = STEP;
    Ok(Cluster::create(options)?)
}

/// Runs the demo. A temporary directory the demo made for itself is removed
/// once everything stopped cleanly; a `--dir` of the user's, or any
/// directory after a failure, is kept for its logs.
pub async fn run(args: DemoArgs) -> Result<()> {
    let mut cluster = demo_cluster(&args)?;
    let result = run_in(&args, &mut cluster).await;
    if result.is_err() {
        cluster.keep();
    }
    let dir = cluster.path().to_path_buf();
    let kept = cluster.is_kept();
    cluster
        .close()
        .with_context(|| format!("removing the demo's directory {}", dir.display()))?;
    if kept {
        println!("The demo's data and logs stay in {}", dir.display());
    }
    result
}

/// The demo in `cluster`'s directory.
async fn run_in(args: &DemoArgs, cluster: &mut Cluster) -> Result<()> {
    let dir = cluster.path().to_path_buf();
    println!("hapg demo in {}", dir.display());

    cluster.start_monitor().with_context(|| {
        format!(
            "the monitor did not start; see {}",
            dir.join("monitor.log").display()
        )
    })?;
    let monitor_uri = cluster.monitor_uri()?;
    let mut monitor = MonitorClient::connect_with_retry(&monitor_uri, STEP).await?;

    println!("creating node_a and node_b...");
    cluster.start_node_with(&NodeSpec {
        monitor_uri: Some(&monitor_uri),
        ..NodeSpec::new("node_a")
    })?;
    wait_for(&mut monitor, "node_a to be single", |n| {
        converged(n, "node_a", NodeState::Single)
    })
    .await?;
    cluster.start_node_with(&NodeSpec {
        monitor_uri: Some(&monitor_uri),
        ..NodeSpec::new("node_b")
    })?;
    wait_for(&mut monitor, "node_a primary and node_b secondary", |n| {
        converged(n, "node_a", NodeState::Primary) && converged(n, "node_b", NodeState::Secondary)
    })
    .await?;

    let router = cluster.start_router(&RouterSpec::new("router"))?;
    let router_uri = router.uri("appdb");
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
        let result = drill(cluster, &mut monitor, &router_uri).await;
        cluster.stop_all();
        return result;
    }
    println!("\nRunning until interrupted (Ctrl-C).");
    tokio::signal::ctrl_c().await?;
    println!("stopping...");
    cluster.stop_all();
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
async fn drill(cluster: &Cluster, monitor: &mut MonitorClient, router_uri: &str) -> Result<()> {
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
    cluster.power_off("node_b");
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
    cluster.run_node("node_b", &[])?;
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
