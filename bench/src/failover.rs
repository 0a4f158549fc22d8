//! `hapg-bench failover`: rows of the fault matrix injected for real into a
//! monitor, a primary and a standby while clients write through the hapg
//! router, each fault `--runs` times; one table of what the clients saw per
//! fault: write unavailability, client errors, acknowledged writes lost, and
//! the invariant checker's verdict (`hapg::invariants`).
//!
//! One cluster serves every run: each run starts from a converged primary and
//! secondary (whichever node is primary by then), writes into fresh tables,
//! injects the fault, waits until the group converged back with the lost node
//! restarted, lets the writers go on for a moment, and checks.
//!
//! With `--monitor-store etcd` the monitor's state is in a real three-member
//! etcd on loopback (`hapg::etcd::EtcdCluster`) and two `hapg monitor run`
//! services share it (one leads); the `monitor-leader-loss` row kills the
//! leading service while the clients write.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use hapg::drill::{self, Writer, WriterReport};
use hapg::invariants::{Drill, WriteProbe, PROBE_TABLE};
use hapg_monitor::client::{NodeRow, RequestKind};
use hapg_monitor::{MonitorClient, NodeState};
use nix::sys::signal::Signal;

use hapg::cluster::{Cluster, NodeSpec, RouterSpec};
use hapg::etcd::EtcdCluster;

use crate::cluster::{self, DBNAME};
use crate::machine::RunInfo;
use crate::netns::Net;

/// Options of `hapg-bench failover`.
#[derive(Args, Debug)]
pub struct FailoverArgs {
    /// Faults to inject, each `--runs` times: power-off (keeper and Postgres
    /// of the primary SIGKILLed together), switchover (`perform switchover`),
    /// postgres-kill (the primary's Postgres SIGKILLed, its keeper alive),
    /// short-freeze (the primary node SIGSTOPped for 1.9 s), long-freeze
    /// (SIGSTOPped until the standby took over and every client wrote on it),
    /// network-cut (the primary's network namespace cut off until the
    /// standby took over; every node then runs in a namespace of its own,
    /// which needs root: run it under `flock /tmp/hapg-netns.lock`),
    /// monitor-leader-loss (with `--monitor-store etcd` only: the leading
    /// monitor service SIGKILLed). Default: power-off, switchover,
    /// postgres-kill, and monitor-leader-loss with etcd.
    #[arg(long, value_delimiter = ',')]
    pub faults: Vec<String>,
    /// Where the monitor's state lives: `postgres` (one monitor, the
    /// default) or `etcd` (a three-member etcd on loopback and two monitor
    /// services; needs Debian's etcd-server and etcd-client).
    #[arg(long, value_enum, default_value_t = MonitorStore::Postgres)]
    pub monitor_store: MonitorStore,
    /// Clients writing through the router, each on its own connection and table.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub clients: u32,
    /// Runs per fault; the table shows the median and the maximum.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub runs: u32,
    /// Print the result as Markdown (for docs/failover.md).
    #[arg(long)]
    pub markdown: bool,
    /// Keep the run directory (data directories, configs, logs).
    #[arg(long)]
    pub keep: bool,
    /// The hapg binary (default: `hapg` next to hapg-bench).
    #[arg(long)]
    pub hapg: Option<PathBuf>,
    /// Directory of the PostgreSQL 15 programs.
    #[arg(long, default_value = "/usr/lib/postgresql/15/bin")]
    pub pg_bindir: PathBuf,
}

/// Where the monitor's state lives during the bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MonitorStore {
    /// One monitor with its own Postgres (`hapg create monitor`).
    Postgres,
    /// A three-member etcd and two monitor services.
    Etcd,
}

/// A row of the fault matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    PowerOff,
    Switchover,
    PostgresKill,
    ShortFreeze,
    LongFreeze,
    NetworkCut,
    MonitorLeaderLoss,
}

/// Every fault, in table order.
const FAULTS: [Fault; 7] = [
    Fault::PowerOff,
    Fault::Switchover,
    Fault::PostgresKill,
    Fault::ShortFreeze,
    Fault::LongFreeze,
    Fault::NetworkCut,
    Fault::MonitorLeaderLoss,
];

/// The faults run when `--faults` is not given.
fn default_faults(store: MonitorStore) -> Vec<Fault> {
    let mut faults = vec![Fault::PowerOff, Fault::Switchover, Fault::PostgresKill];
    if store == MonitorStore::Etcd {
        faults.push(Fault::MonitorLeaderLoss);
    }
    faults
}

/// The faults asked for, checked against the monitor store.
fn chosen_faults(keys: &[String], store: MonitorStore) -> Result<Vec<Fault>> {
    if keys.is_empty() {
        return Ok(default_faults(store));
    }
    let faults: Vec<Fault> = keys
        .iter()
        .map(|f| Fault::from_key(f.trim()))
        .collect::<Result<_>>()?;
    if store == MonitorStore::Postgres && faults.contains(&Fault::MonitorLeaderLoss) {
        bail!("monitor-leader-loss needs --monitor-store etcd: the Postgres monitor is one service, it has no leader to lose");
    }
    if store == MonitorStore::Etcd && faults.contains(&Fault::NetworkCut) {
        bail!("network-cut is not run with --monitor-store etcd yet: the bench's etcd members listen on loopback only, which the nodes' namespaces do not reach");
    }
    Ok(faults)
}

impl Fault {
    fn key(self) -> &'static str {
        match self {
            Fault::PowerOff => "power-off",
            Fault::Switchover => "switchover",
            Fault::PostgresKill => "postgres-kill",
            Fault::ShortFreeze => "short-freeze",
            Fault::LongFreeze => "long-freeze",
            Fault::NetworkCut => "network-cut",
            Fault::MonitorLeaderLoss => "monitor-leader-loss",
        }
    }

    fn from_key(key: &str) -> Result<Fault> {
        FAULTS
            .into_iter()
            .find(|f| f.key() == key)
            .with_context(|| {
                let known: Vec<&str> = FAULTS.iter().map(|f| f.key()).collect();
                format!(
                    "unknown fault {key:?} in --faults: use {}",
                    known.join(", ")
                )
            })
    }

    /// What the table calls it.
    fn describe(self) -> &'static str {
        match self {
            Fault::PowerOff => "power-off of the primary node (keeper and Postgres SIGKILLed)",
            Fault::Switchover => "switchover under write load",
            Fault::PostgresKill => "Postgres of the primary SIGKILLed, keeper alive",
            Fault::ShortFreeze => "primary node frozen (SIGSTOP) for 1.9 s",
            Fault::LongFreeze => {
                "primary node frozen until every client wrote on the standby that took over"
            }
            Fault::NetworkCut => {
                "primary node's network cut (namespace link down) until the standby took over"
            }
            Fault::MonitorLeaderLoss => {
                "leading monitor service SIGKILLed (etcd store, two services)"
            }
        }
    }

    /// Whether the standby ends up primary.
    fn moves_primary(self) -> bool {
        match self {
            Fault::PowerOff | Fault::Switchover | Fault::LongFreeze | Fault::NetworkCut => true,
            Fault::PostgresKill | Fault::ShortFreeze | Fault::MonitorLeaderLoss => false,
        }
    }
}

/// Time allowed for one step: a failover, a rejoin, a start.
const STEP: Duration = Duration::from_secs(120);
/// Writes before the fault and after the group converged again.
const STEADY: Duration = Duration::from_secs(2);
/// The short freeze: under the 2 s within which hapg must not fail over.
const SHORT_FREEZE: Duration = Duration::from_millis(1900);
/// Router pause timeout: long enough that a failover is a pause, not an error.
const PAUSE_TIMEOUT_MS: u64 = 30_000;

/// What one run of one fault measured.
#[derive(Debug, Clone, Default, PartialEq)]
struct RunResult {
    /// The longest any client went without an acknowledged write.
    unavailable: Duration,
    /// Errors seen by the clients, in all.
    errors: u64,
    /// The most errors one client saw.
    max_client_errors: u64,
    /// The longest one statement waited for its answer (success or error).
    longest_wait: Duration,
    acked: usize,
    /// Acknowledged writes missing from the final primary.
    lost: usize,
    /// Invariants the checker found broken, a sentence each.
    violations: Vec<String>,
    /// For a network cut: when the primary fenced itself and the standby was promoted.
    cut: Option<CutTimes>,
    /// For a monitor leader loss: from the kill until the other service led.
    takeover: Option<Duration>,
}

/// When, after a silent loss of the primary (a network cut, a freeze), the
/// isolated primary began to stop Postgres (its fence) and the monitor
/// promoted the standby.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct CutTimes {
    /// The primary could fence itself (a network cut; a frozen node cannot).
    fence_expected: bool,
    /// From the cut to the first sight of the old primary's postmaster stopping.
    fenced_after: Option<Duration>,
    /// From the cut to the monitor's assignment of `wait_primary` to the standby.
    promoted_after: Option<Duration>,
}

impl CutTimes {
    /// The safety argument's order was broken: no fence, or a fence after the promotion.
    fn violation(&self) -> Option<String> {
        if !self.fence_expected {
            return None;
        }
        match (self.fenced_after, self.promoted_after) {
            (Some(fence), Some(promotion)) if fence < promotion => None,
            (Some(fence), Some(promotion)) => Some(format!(
                "the isolated primary began to stop {:.2} s after the cut, not before the \
                 standby's promotion at {:.2} s",
                fence.as_secs_f64(),
                promotion.as_secs_f64()
            )),
            (None, _) => Some("the isolated primary never fenced itself".to_string()),
            (Some(_), None) => Some("no promotion event found for the standby".to_string()),
        }
    }
}

impl RunResult {
    fn from_reports(reports: &[WriterReport]) -> RunResult {
        RunResult {
            unavailable: reports
                .iter()
                .map(|r| r.longest_gap)
                .max()
                .unwrap_or_default(),
            errors: reports.iter().map(|r| r.errors).sum(),
            max_client_errors: reports.iter().map(|r| r.errors).max().unwrap_or(0),
            longest_wait: reports
                .iter()
                .map(|r| r.longest_wait)
                .max()
                .unwrap_or_default(),
            acked: reports.iter().map(|r| r.acked.len()).sum(),
            lost: 0,
            violations: Vec::new(),
            cut: None,
            takeover: None,
        }
    }
}

/// The running cluster: monitor, two nodes, router.
struct Bench {
    cluster: Cluster,
    monitor_uri: String,
    /// Node name and port.
    nodes: Vec<(String, u16)>,
    router_uri: String,
    /// Every node in a network namespace of its own (for `network-cut`).
    net: Option<Net>,
    /// What the last network cut measured, for `one_run` to collect.
    last_cut: Option<CutTimes>,
    /// The etcd store and its monitor services, with `--monitor-store etcd`.
    etcd: Option<EtcdMonitors>,
    /// What the last monitor leader loss measured, for `one_run` to collect.
    last_takeover: Option<Duration>,
}

/// The monitor services on etcd.
struct EtcdMonitors {
    cluster: EtcdCluster,
    /// Reads the leader key (members are never stopped during the bench).
    client: etcd_client::Client,
    /// The key prefix of the monitor's state.
    prefix: String,
}

/// The monitor services' process names in the cluster.
const MONITOR_SERVICES: [&str; 2] = ["monitor_a", "monitor_b"];
/// The key prefix the bench's monitor state lives under.
const ETCD_PREFIX: &str = "hapg-bench";

impl EtcdMonitors {
    /// Starts a three-member etcd in `dir`, and the two monitor services on
    /// it; waits (bounded) until one leads.
    async fn start(cluster: &mut Cluster, dir: &Path) -> Result<EtcdMonitors> {
        eprintln!("starting a three-member etcd");
        let etcd = EtcdCluster::start(dir, 3).context("starting etcd")?;
        let client = etcd_client::Client::connect(etcd.endpoints(), None)
            .await
            .context("connecting to etcd")?;
        let monitors = EtcdMonitors {
            cluster: etcd,
            client,
            prefix: ETCD_PREFIX.to_string(),
        };
        let uri = monitors.uri();
        cluster.use_store(&uri);
        for name in MONITOR_SERVICES {
            eprintln!("starting monitor service {name}");
            monitors.spawn(cluster, name)?;
        }
        monitors.wait_leader(cluster, None).await?;
        Ok(monitors)
    }

    fn uri(&self) -> String {
        self.cluster.uri(&self.prefix)
    }

    fn spawn(&self, cluster: &Cluster, name: &str) -> Result<()> {
        Ok(cluster.spawn(name, &["monitor", "run", "--monitor", &self.uri()])?)
    }

    /// The process name of the leading service, from the leader key (its
    /// value names the service's pid); None while no service leads.
    async fn leader(&self, cluster: &Cluster) -> Result<Option<&'static str>> {
        let key = format!("/{}/leader", self.prefix);
        let response = self.client.clone().get(key, None).await?;
        let value = response
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).to_string());
        let pid = value
            .as_deref()
            .and_then(|v| v.rsplit(' ').next())
            .and_then(|p| p.parse::<u32>().ok());
        Ok(pid.and_then(|pid| {
            MONITOR_SERVICES
                .into_iter()
                .find(|name| cluster.pid(name) == Some(pid))
        }))
    }

    /// Waits (bounded) until a service other than `not` leads; its name.
    async fn wait_leader(&self, cluster: &Cluster, not: Option<&str>) -> Result<&'static str> {
        let deadline = Instant::now() + STEP;
        loop {
            crate::procs::check_interrupted()?;
            // etcd may answer slowly while a member restarts: ask again.
            if let Ok(Some(name)) = self.leader(cluster).await {
                if Some(name) != not {
                    return Ok(name);
                }
            }
            if Instant::now() > deadline {
                bail!("no monitor service took the lead within {STEP:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Bench {
    fn direct_uri(&self, name: &str) -> String {
        let port = self
            .nodes
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, p)| *p);
        let host = self
            .net
            .as_ref()
            .and_then(|net| net.node(name).ok())
            .map_or("127.0.0.1", |n| n.ip.as_str());
        format!("postgres://postgres@{host}:{port}/{DBNAME}?sslmode=disable&connect_timeout=2")
    }

    /// The command prefix that runs a program where node `name` runs.
    fn wrapper(&self, name: &str) -> Vec<String> {
        self.net
            .as_ref()
            .and_then(|net| net.node(name).ok())
            .map(|n| n.wrapper().iter().map(|s| s.to_string()).collect())
            .unwrap_or_default()
    }

    /// Runs node `name` again after it was killed, where it ran before.
    fn restart_node(&mut self, name: &str) -> Result<()> {
        let wrapper = self.wrapper(name);
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        Ok(self.cluster.run_node(name, &wrapper)?)
    }

    fn pgdata(&self, name: &str) -> PathBuf {
        self.cluster.path().join(name)
    }

    /// The node's keeper, its postmaster and the postmaster's children.
    fn node_pids(&self, name: &str) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .cluster
            .pid(name)
            .and_then(|p| i32::try_from(p).ok())
            .into_iter()
            .collect();
        if let Some(postmaster) = drill::postmaster_pid(&self.pgdata(name)) {
            pids.extend(drill::process_tree(postmaster));
        }
        pids
    }
}

/// Runs the benchmark and prints its table.
pub fn run(args: FailoverArgs) -> Result<()> {
    let faults = chosen_faults(&args.faults, args.monitor_store)?;
    crate::machine::check_pg_bindir(&args.pg_bindir, &["initdb", "pg_ctl", "pg_basebackup"])?;
    let hapg_bin = crate::machine::hapg_binary(&args.hapg)?;
    let mut info = RunInfo::now();
    info.versions
        .push(crate::machine::version(&hapg_bin, "--version"));
    info.versions.push(crate::machine::version(
        &args.pg_bindir.join("postgres"),
        "--version",
    ));

    let net = if faults.contains(&Fault::NetworkCut) {
        Some(
            Net::create(&["node1", "node2"])
                .context("setting up network namespaces (needs root)")?,
        )
    } else {
        None
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut bench = runtime.block_on(start_cluster(&hapg_bin, net, args.monitor_store))?;
    let results = runtime.block_on(run_faults(&mut bench, &faults, &args));
    info.load_after = crate::machine::load_average();
    bench.cluster.stop_all();
    // etcd goes after the monitor services, nodes and router that use it.
    drop(bench.etcd.take());
    // The namespaces go once nothing runs in them.
    drop(bench.net.take());
    if args.keep {
        bench.cluster.keep();
        eprintln!("kept {}", bench.cluster.path().display());
    }
    drop(bench);
    let results = results?;
    let text = if args.markdown {
        markdown(&results, &args, &info)
    } else {
        plain(&results, &args)
    };
    print!("{text}");
    let broken: usize = results
        .iter()
        .flat_map(|(_, runs)| runs)
        .map(|r| r.violations.len())
        .sum();
    if broken > 0 {
        bail!("{broken} invariant violations (listed above): hapg lost or misplaced writes");
    }
    Ok(())
}

/// The monitor (or etcd and two monitor services), node1 (primary), node2
/// (secondary) and the router, running; with `net`, each node in its
/// namespace.
async fn start_cluster(hapg: &Path, net: Option<Net>, store: MonitorStore) -> Result<Bench> {
    let monitor_listen = match &net {
        None => "127.0.0.1".to_string(),
        Some(net) => format!("127.0.0.1,{}", net.host_ip),
    };
    let mut cluster = cluster::create(hapg, &monitor_listen)?;
    let etcd = match store {
        MonitorStore::Postgres => {
            eprintln!("starting the monitor");
            cluster.start_monitor()?;
            None
        }
        MonitorStore::Etcd => {
            let dir = cluster.path().join("etcd");
            Some(EtcdMonitors::start(&mut cluster, &dir).await?)
        }
    };
    let monitor_uri = cluster.monitor_uri()?;
    let create = |cluster: &mut Cluster, name: &str| -> Result<u16> {
        let node = match &net {
            None => cluster.start_node(name)?,
            Some(net) => {
                let node = net.node(name)?;
                // The node reaches the monitor over its link, not the host's loopback.
                let monitor = monitor_uri.replacen("@localhost:", &format!("@{}:", net.host_ip), 1);
                if monitor == monitor_uri {
                    bail!("cannot point {monitor_uri} at the host's bridge address");
                }
                let wrapper = node.wrapper();
                cluster.start_node_with(&NodeSpec {
                    hostname: &node.ip,
                    listen: Some(&node.ip),
                    monitor_uri: Some(&monitor),
                    wrapper: &wrapper,
                    ..NodeSpec::new(name)
                })?
            }
        };
        Ok(node.port)
    };
    let port1 = create(&mut cluster, "node1")?;
    eprintln!("waiting for node1 (port {port1}) to be single");
    cluster.wait_states(&[("node1", "single")], STEP)?;
    let port2 = create(&mut cluster, "node2")?;
    eprintln!("waiting for node2 (port {port2}) to be secondary");
    cluster.wait_states(&[("node1", "primary"), ("node2", "secondary")], STEP)?;
    let router = cluster.start_router(&RouterSpec {
        id: Some("hapg-bench-failover".into()),
        router_lines: format!("pause_timeout_ms = {PAUSE_TIMEOUT_MS}"),
        sections: "\n[server]\nsslmode = \"disable\"\n".into(),
        ..RouterSpec::new("router")
    })?;
    Ok(Bench {
        cluster,
        monitor_uri,
        nodes: vec![("node1".into(), port1), ("node2".into(), port2)],
        router_uri: format!("{}?sslmode=disable", router.uri(DBNAME)),
        net,
        last_cut: None,
        etcd,
        last_takeover: None,
    })
}

async fn run_faults(
    bench: &mut Bench,
    faults: &[Fault],
    args: &FailoverArgs,
) -> Result<Vec<(Fault, Vec<RunResult>)>> {
    let mut monitor = MonitorClient::connect_with_retry(&bench.monitor_uri, STEP).await?;
    wait_connectable(&bench.router_uri).await?;
    let mut results = Vec::new();
    for &fault in faults {
        let mut runs = Vec::new();
        for run in 1..=args.runs {
            crate::procs::check_interrupted()?;
            eprintln!("{} run {run}/{}", fault.key(), args.runs);
            let result = one_run(bench, &mut monitor, fault, run, args.clients).await?;
            if let Some(cut) = &result.cut {
                eprintln!("  {}", cut_text(cut));
            }
            eprintln!(
                "  {:.2} s without writes, {} errors, {} acknowledged, {} lost{}",
                result.unavailable.as_secs_f64(),
                result.errors,
                result.acked,
                result.lost,
                if result.violations.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; INVARIANTS BROKEN:\n    {}",
                        result.violations.join("\n    ")
                    )
                }
            );
            runs.push(result);
        }
        results.push((fault, runs));
    }
    Ok(results)
}

/// Waits (bounded) until `SELECT 1` works at `uri`.
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

/// The node reports the state it is assigned.
fn settled(node: &NodeRow, state: NodeState) -> bool {
    node.reported == state && node.goal == state
}

fn converged(nodes: &[NodeRow], name: &str, state: NodeState) -> bool {
    nodes.iter().any(|n| n.name == name && settled(n, state))
}

/// Waits until `primary` is primary and `standby` secondary, both reported and assigned.
async fn wait_converged(monitor: &mut MonitorClient, primary: &str, standby: &str) -> Result<()> {
    let what = format!("{primary} primary and {standby} secondary");
    monitor
        .wait_until("default", &what, STEP, |n| {
            converged(n, primary, NodeState::Primary) && converged(n, standby, NodeState::Secondary)
        })
        .await?;
    Ok(())
}

/// The current primary and secondary, once the group is converged.
async fn roles(monitor: &mut MonitorClient) -> Result<(String, String)> {
    let nodes = monitor
        .wait_until("default", "a primary and a secondary", STEP, |nodes| {
            [NodeState::Primary, NodeState::Secondary]
                .iter()
                .all(|&state| nodes.iter().any(|n| settled(n, state)))
        })
        .await?;
    let name_of = |state| {
        nodes
            .iter()
            .find(|n| settled(n, state))
            .map(|n| n.name.clone())
            .unwrap_or_default()
    };
    Ok((name_of(NodeState::Primary), name_of(NodeState::Secondary)))
}

/// One run: writers through the router and a probe on every node, the
/// fault, recovery, then the checks.
async fn one_run(
    bench: &mut Bench,
    monitor: &mut MonitorClient,
    fault: Fault,
    run: u32,
    clients: u32,
) -> Result<RunResult> {
    let (primary, standby) = roles(monitor).await?;
    let tag = format!("{}_{run}", fault.key().replace('-', "_"));
    let tables: Vec<String> = (0..clients).map(|i| format!("w_{tag}_{i}")).collect();
    wait_connectable(&bench.router_uri).await?;
    let mut ddl = format!("DROP TABLE IF EXISTS {PROBE_TABLE};");
    for table in &tables {
        let _ = write!(
            ddl,
            "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id bigint PRIMARY KEY);"
        );
    }
    drill::connect(&bench.router_uri)
        .await?
        .batch_execute(&ddl)
        .await
        .context("creating the writers' tables through the router")?;
    let nodes: Vec<(String, String)> = bench
        .nodes
        .iter()
        .map(|(name, _)| (name.clone(), bench.direct_uri(name)))
        .collect();
    let probe = WriteProbe::start(&bench.direct_uri(&primary), &nodes)
        .await
        .context("starting the write probe")?;
    let writers: Vec<Writer> = tables
        .iter()
        .map(|t| Writer::start(bench.router_uri.clone(), t, Duration::from_secs(600)))
        .collect();
    tokio::time::sleep(STEADY).await;

    let injected = inject(bench, monitor, fault, &primary, &standby, &tables).await;
    tokio::time::sleep(STEADY).await;
    let mut reports = Vec::new();
    for writer in writers {
        reports.push(writer.finish().await);
    }
    let probe = probe.finish().await;
    injected?;

    let final_primary = if fault.moves_primary() {
        &standby
    } else {
        &primary
    };
    let primary_uri = bench.direct_uri(final_primary);
    let mut result = RunResult::from_reports(&reports);
    for (table, report) in tables.iter().zip(&reports) {
        result.lost += drill::lost_writes(&primary_uri, table, &report.acked)
            .await?
            .len();
    }
    let check = Drill {
        monitor_uri: &bench.monitor_uri,
        primary_uri: &primary_uri,
        writers: tables.iter().map(String::as_str).zip(&reports).collect(),
        probe: Some(&probe),
        through_router: true,
    };
    result.violations = check.violations().await?;
    result.cut = bench.last_cut.take();
    result.takeover = bench.last_takeover.take();
    if let Some(broken) = result.cut.as_ref().and_then(CutTimes::violation) {
        result.violations.push(broken);
    }
    Ok(result)
}

/// Injects `fault` into `primary` and waits until the group converged back,
/// every node running (`tables`: the writers').
async fn inject(
    bench: &mut Bench,
    monitor: &mut MonitorClient,
    fault: Fault,
    primary: &str,
    standby: &str,
    tables: &[String],
) -> Result<()> {
    match fault {
        Fault::PowerOff => {
            let killed_at = SystemTime::now();
            bench.cluster.power_off(primary);
            wait_writable(monitor, standby).await?;
            let promoted_at = assigned_at(&bench.monitor_uri, standby, "wait_primary", killed_at)
                .await
                .context("reading the promotion event")?;
            bench.last_cut = Some(CutTimes {
                promoted_after: promoted_at.and_then(|t| t.duration_since(killed_at).ok()),
                ..CutTimes::default()
            });
            bench.restart_node(primary)?;
            wait_converged(monitor, standby, primary).await
        }
        Fault::Switchover => {
            monitor
                .request("default", 0, None, RequestKind::Switchover, STEP)
                .await?;
            wait_converged(monitor, standby, primary).await
        }
        Fault::PostgresKill => {
            let Some(old) = drill::postmaster_pid(&bench.pgdata(primary)) else {
                bail!("{primary}'s Postgres is not running");
            };
            drill::kill_tree(old);
            let deadline = Instant::now() + STEP;
            while drill::postmaster_pid(&bench.pgdata(primary)).is_none_or(|pid| pid == old) {
                if Instant::now() > deadline {
                    bail!("{primary}'s keeper did not restart Postgres within {STEP:?}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            wait_converged(monitor, primary, standby).await
        }
        Fault::ShortFreeze => {
            let pids = bench.node_pids(primary);
            drill::signal_all(&pids, Signal::SIGSTOP);
            tokio::time::sleep(SHORT_FREEZE).await;
            drill::signal_all(&pids, Signal::SIGCONT);
            wait_converged(monitor, primary, standby).await
        }
        Fault::LongFreeze => {
            let pids = bench.node_pids(primary);
            let frozen_at = SystemTime::now();
            drill::signal_all(&pids, Signal::SIGSTOP);
            // Frozen as a machine without power stays off: until every
            // client wrote on the new primary (the statement each had in
            // flight on the frozen one must not wait for the thaw). Thaw
            // whatever happened: a frozen node left behind is worse than a
            // failed run.
            let took_over = async {
                wait_writable(monitor, standby).await?;
                wait_written(&bench.direct_uri(standby), tables).await
            }
            .await;
            drill::signal_all(&pids, Signal::SIGCONT);
            took_over?;
            let promoted_at = assigned_at(&bench.monitor_uri, standby, "wait_primary", frozen_at)
                .await
                .context("reading the promotion event")?;
            bench.last_cut = Some(CutTimes {
                promoted_after: promoted_at.and_then(|t| t.duration_since(frozen_at).ok()),
                ..CutTimes::default()
            });
            wait_converged(monitor, standby, primary).await
        }
        Fault::NetworkCut => {
            let Some(node) = bench
                .net
                .as_ref()
                .map(|net| net.node(primary))
                .transpose()?
            else {
                bail!("network-cut needs the nodes in network namespaces");
            };
            let fence = StopWatch::start(&bench.pgdata(primary));
            let cut_at = SystemTime::now();
            let cut = node.cut();
            // Heal whatever happened: a node left cut off is worse than a failed run.
            let took_over = match cut {
                Ok(()) => wait_writable(monitor, standby).await,
                Err(e) => Err(e),
            };
            let fenced_at = fence.finish();
            let healed = node.heal();
            took_over?;
            healed?;
            let promoted_at = assigned_at(&bench.monitor_uri, standby, "wait_primary", cut_at)
                .await
                .context("reading the promotion event")?;
            let since_cut = |at: Option<SystemTime>| at.and_then(|t| t.duration_since(cut_at).ok());
            bench.last_cut = Some(CutTimes {
                fence_expected: true,
                fenced_after: since_cut(fenced_at),
                promoted_after: since_cut(promoted_at),
            });
            wait_converged(monitor, standby, primary).await
        }
        Fault::MonitorLeaderLoss => {
            let Some(etcd) = &bench.etcd else {
                bail!("monitor-leader-loss needs --monitor-store etcd");
            };
            let leader = etcd.wait_leader(&bench.cluster, None).await?;
            let killed_at = Instant::now();
            bench.cluster.kill_process(leader);
            let next = etcd.wait_leader(&bench.cluster, Some(leader)).await;
            let takeover = killed_at.elapsed();
            // Run it again whatever happened: the next run needs two services.
            let restarted = etcd.spawn(&bench.cluster, leader);
            let next = next?;
            restarted?;
            eprintln!(
                "  {next} leads {:.2} s after {leader} was killed",
                takeover.as_secs_f64()
            );
            bench.last_takeover = Some(takeover);
            // Nothing changes for the group.
            wait_converged(monitor, primary, standby).await
        }
    }
}

/// Whether the postmaster of `pgdata` is gone or shutting down: the status
/// line of postmaster.pid says `stopping` from the moment a shutdown begins
/// (new connections refused, sessions ended).
fn stopping(pgdata: &Path) -> bool {
    if drill::postmaster_pid(pgdata).is_none() {
        return true;
    }
    std::fs::read_to_string(pgdata.join("postmaster.pid"))
        .is_ok_and(|text| text.lines().nth(7).is_some_and(|l| l.trim() == "stopping"))
}

/// Watches a data directory from a thread of its own and records when its
/// postmaster began to stop.
struct StopWatch {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Option<SystemTime>>,
}

impl StopWatch {
    fn start(pgdata: &Path) -> StopWatch {
        let pgdata = pgdata.to_path_buf();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let deadline = Instant::now() + STEP;
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                if stopping(&pgdata) {
                    return Some(SystemTime::now());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            None
        });
        StopWatch { stop, handle }
    }

    /// When the postmaster began to stop, if it did.
    fn finish(self) -> Option<SystemTime> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().ok().flatten()
    }
}

/// When the monitor first assigned `node` the state `goal` after `after`
/// (the monitor runs on this machine, so its clock is ours).
async fn assigned_at(
    monitor_uri: &str,
    node: &str,
    goal: &str,
    after: SystemTime,
) -> Result<Option<SystemTime>> {
    let after = after
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default();
    let history = MonitorClient::connect(monitor_uri)
        .await?
        .goal_history()
        .await?;
    Ok(history
        .iter()
        .find(|e| e.node_name.as_deref() == Some(node) && e.goal.as_str() == goal && e.time > after)
        .and_then(|e| Duration::try_from_secs_f64(e.time).ok())
        .map(|d| UNIX_EPOCH + d))
}

/// One run's fence and promotion times, in words.
fn cut_text(cut: &CutTimes) -> String {
    let secs = |d: Option<Duration>| {
        d.map_or("never".to_string(), |d| format!("{:.2} s", d.as_secs_f64()))
    };
    if !cut.fence_expected {
        return format!(
            "the standby was promoted {} after the fault",
            secs(cut.promoted_after)
        );
    }
    format!(
        "the isolated primary began to stop {} after the cut, the standby was promoted {} after it",
        secs(cut.fenced_after),
        secs(cut.promoted_after)
    )
}

/// Under the table: the fence and promotion times of every silent loss of
/// the primary, and how long the monitor services went without a leader.
fn cut_summary(results: &[(Fault, Vec<RunResult>)]) -> String {
    let mut out = String::new();
    for (fault, runs) in results {
        let takeovers: Vec<String> = runs
            .iter()
            .filter_map(|r| r.takeover)
            .map(|d| format!("{:.2}", d.as_secs_f64()))
            .collect();
        if !takeovers.is_empty() {
            let _ = writeln!(
                out,
                "\n{}: the other monitor service led {} s after the kill (leader lease {} s).",
                fault.describe(),
                takeovers.join(", "),
                hapg_monitor::service::LEADER_TTL.as_secs()
            );
            continue;
        }
        let cuts: Vec<&CutTimes> = runs.iter().filter_map(|r| r.cut.as_ref()).collect();
        if cuts.is_empty() {
            continue;
        }
        let list = |pick: fn(&CutTimes) -> Option<Duration>| {
            cuts.iter()
                .map(|c| pick(c).map_or("-".to_string(), |d| format!("{:.2}", d.as_secs_f64())))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if cuts.iter().all(|c| !c.fence_expected) {
            let _ = writeln!(
                out,
                "\n{}: the standby was promoted (assigned wait_primary) at {} s after the fault.",
                fault.describe(),
                list(|c| c.promoted_after),
            );
            continue;
        }
        let first = cuts.iter().filter(|c| c.violation().is_none()).count();
        let _ = writeln!(
            out,
            "\n{}: the isolated primary began to stop (fence) at {} s after the cut; \
             the standby was promoted at {} s; fence first in {first} of {} runs.",
            fault.describe(),
            list(|c| c.fenced_after),
            list(|c| c.promoted_after),
            cuts.len()
        );
    }
    out
}

/// Waits (bounded) until every one of `tables` at `uri` (a new primary, which
/// nothing replicates to) has rows it did not have when this began.
async fn wait_written(uri: &str, tables: &[String]) -> Result<()> {
    let client = drill::connect(uri).await?;
    let count = |table: &str| format!("SELECT count(*) FROM {table}");
    let mut before = Vec::new();
    for table in tables {
        let n: i64 = client.query_one(&count(table), &[]).await?.get(0);
        before.push(n);
    }
    let deadline = Instant::now() + STEP;
    for (table, before) in tables.iter().zip(before) {
        loop {
            let n: i64 = client.query_one(&count(table), &[]).await?.get(0);
            if n > before {
                break;
            }
            if Instant::now() > deadline {
                bail!("no client wrote into {table} on the new primary within {STEP:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// Waits until `name` is assigned and reports a writable state.
async fn wait_writable(monitor: &mut MonitorClient, name: &str) -> Result<()> {
    let what = format!("{name} to take over");
    monitor
        .wait_until("default", &what, STEP, |nodes| {
            nodes.iter().any(|n| {
                n.name == name
                    && n.goal == n.reported
                    && matches!(n.goal, NodeState::WaitPrimary | NodeState::Primary)
            })
        })
        .await?;
    Ok(())
}

/// One row of the table: a fault over its runs.
struct Row {
    fault: Fault,
    runs: usize,
    median: Duration,
    max: Duration,
    errors: u64,
    max_client_errors: u64,
    longest_wait: Duration,
    acked: usize,
    lost: usize,
    violations: usize,
}

impl Row {
    fn of(fault: Fault, runs: &[RunResult]) -> Row {
        let mut gaps: Vec<Duration> = runs.iter().map(|r| r.unavailable).collect();
        gaps.sort();
        Row {
            fault,
            runs: runs.len(),
            median: median(&gaps),
            max: gaps.last().copied().unwrap_or_default(),
            errors: runs.iter().map(|r| r.errors).sum(),
            max_client_errors: runs.iter().map(|r| r.max_client_errors).max().unwrap_or(0),
            longest_wait: runs
                .iter()
                .map(|r| r.longest_wait)
                .max()
                .unwrap_or_default(),
            acked: runs.iter().map(|r| r.acked).sum(),
            lost: runs.iter().map(|r| r.lost).sum(),
            violations: runs.iter().map(|r| r.violations.len()).sum(),
        }
    }

    const HEADER: [&'static str; 9] = [
        "fault",
        "runs",
        "writes unavailable, median",
        "max",
        "client errors (all runs)",
        "most errors, one client in one run",
        "longest wait of one statement",
        "acknowledged writes lost (of)",
        "invariants broken",
    ];

    fn cells(&self) -> [String; 9] {
        [
            self.fault.describe().to_string(),
            self.runs.to_string(),
            format!("{:.2} s", self.median.as_secs_f64()),
            format!("{:.2} s", self.max.as_secs_f64()),
            self.errors.to_string(),
            self.max_client_errors.to_string(),
            format!("{:.2} s", self.longest_wait.as_secs_f64()),
            format!("{} (of {})", self.lost, self.acked),
            self.violations.to_string(),
        ]
    }
}

/// The median of sorted `values` (the mean of the middle two for an even count).
fn median(sorted: &[Duration]) -> Duration {
    match sorted.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2,
    }
}

/// The monitor store, in words.
fn store_text(store: MonitorStore) -> &'static str {
    match store {
        MonitorStore::Postgres => "the monitor's state in its Postgres",
        MonitorStore::Etcd => {
            "the monitor's state in a three-member etcd with two monitor services"
        }
    }
}

fn plain(results: &[(Fault, Vec<RunResult>)], args: &FailoverArgs) -> String {
    let rows: Vec<[String; 9]> = results
        .iter()
        .map(|(fault, runs)| Row::of(*fault, runs).cells())
        .collect();
    let mut widths: Vec<usize> = Row::HEADER.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = format!(
        "\n{} clients writing through the router, {} runs per fault, {}\n\n",
        args.clients,
        args.runs,
        store_text(args.monitor_store)
    );
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
    };
    let _ = writeln!(out, "{}", line(Row::HEADER.to_vec()));
    for row in &rows {
        let _ = writeln!(out, "{}", line(row.iter().map(String::as_str).collect()));
    }
    out.push_str(&cut_summary(results));
    out
}

fn markdown(results: &[(Fault, Vec<RunResult>)], args: &FailoverArgs, info: &RunInfo) -> String {
    let mut out = format!(
        "```sh\n{}\n```\n\n{} clients writing through the router, {} runs per fault, {}. {}\n\n",
        info.command,
        args.clients,
        args.runs,
        store_text(args.monitor_store),
        info.machine()
    );
    let _ = writeln!(out, "| {} |", Row::HEADER.join(" | "));
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (fault, runs) in results {
        let _ = writeln!(out, "| {} |", Row::of(*fault, runs).cells().join(" | "));
    }
    let _ = writeln!(
        out,
        "\nWrites unavailable: the longest time one client went without an \
         acknowledged write. Longest wait: the longest one statement waited \
         for its answer, success or error (a statement in flight on a lost \
         primary waits until the router gives it up). Versions: {}.",
        info.versions.join("; ")
    );
    out.push_str(&cut_summary(results));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_by_key_and_refuse_unknown_ones() {
        for fault in FAULTS {
            assert_eq!(Fault::from_key(fault.key()).ok(), Some(fault));
        }
        let err = Fault::from_key("poweroff").err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("\"poweroff\"") && e.contains("power-off, switchover")),
            "{err:?}"
        );
    }

    #[test]
    fn the_leader_loss_row_is_for_etcd_only() {
        let keys = |k: &[&str]| k.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            chosen_faults(&[], MonitorStore::Etcd).ok(),
            Some(vec![
                Fault::PowerOff,
                Fault::Switchover,
                Fault::PostgresKill,
                Fault::MonitorLeaderLoss
            ])
        );
        assert!(!chosen_faults(&[], MonitorStore::Postgres)
            .expect("defaults")
            .contains(&Fault::MonitorLeaderLoss));
        let err = chosen_faults(&keys(&["monitor-leader-loss"]), MonitorStore::Postgres)
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("--monitor-store etcd")),
            "{err:?}"
        );
        assert!(chosen_faults(&keys(&["network-cut"]), MonitorStore::Etcd).is_err());
    }

    #[test]
    fn a_network_cut_needs_the_fence_before_the_promotion() {
        let s = |ms| Some(Duration::from_millis(ms));
        let cut = |fence, promotion| CutTimes {
            fence_expected: true,
            fenced_after: fence,
            promoted_after: promotion,
        };
        assert_eq!(cut(s(2_600), s(3_300)).violation(), None);
        assert!(cut(s(3_400), s(3_300)).violation().is_some());
        assert!(cut(None, s(3_300)).violation().is_some());
        let freeze = CutTimes {
            promoted_after: s(3_300),
            ..CutTimes::default()
        };
        assert_eq!(
            freeze.violation(),
            None,
            "a frozen node cannot fence itself"
        );
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        let ms = Duration::from_millis;
        assert_eq!(median(&[]), Duration::ZERO);
        assert_eq!(median(&[ms(1), ms(2), ms(9)]), ms(2));
        assert_eq!(median(&[ms(1), ms(3), ms(5), ms(9)]), ms(4));
    }

    #[test]
    fn a_row_adds_up_its_runs() {
        let run = |gap_ms, errors, lost| RunResult {
            unavailable: Duration::from_millis(gap_ms),
            errors,
            max_client_errors: errors,
            longest_wait: Duration::from_millis(gap_ms / 2),
            acked: 100,
            lost,
            violations: vec![String::new(); lost],
            ..RunResult::default()
        };
        let row = Row::of(
            Fault::PowerOff,
            &[run(3000, 1, 0), run(5000, 2, 0), run(4000, 0, 1)],
        );
        assert_eq!(row.median, Duration::from_millis(4000));
        assert_eq!(row.max, Duration::from_millis(5000));
        assert_eq!((row.errors, row.max_client_errors), (3, 2));
        assert_eq!((row.acked, row.lost, row.violations), (300, 1, 1));
        assert_eq!(row.longest_wait, Duration::from_millis(2500));
        assert_eq!(row.cells()[6], "2.50 s");
        assert_eq!(row.cells()[7], "1 (of 300)");
    }

    #[test]
    fn a_run_takes_the_worst_client() {
        let report = |gap_ms, errors| WriterReport {
            longest_gap: Duration::from_millis(gap_ms),
            longest_wait: Duration::from_millis(gap_ms / 10),
            errors,
            acked: vec![1, 2],
            ..WriterReport::default()
        };
        let result = RunResult::from_reports(&[report(100, 0), report(2500, 1), report(900, 3)]);
        assert_eq!(result.unavailable, Duration::from_millis(2500));
        assert_eq!(result.longest_wait, Duration::from_millis(250));
        assert_eq!((result.errors, result.max_client_errors), (4, 3));
        assert_eq!(result.acked, 6);
    }
}
