//! Network splits, made for real with a network namespace: one part of the
//! cluster runs in its own namespace, joined to the host by a veth pair, and
//! setting its end of the link down cuts it off (packets to it are dropped,
//! its own sends fail). Writers go through the router, a probe writes to every
//! node directly, and the invariants are checked after each split heals.
//!
//! * The primary isolated: it fences itself (stops Postgres) before the
//!   monitor promotes the standby; the statement each writer had in flight
//!   there is answered with a class 08 error at the promotion (the router's
//!   socket timeouts are off in this test: only the new epoch frees them),
//!   every writer writes on the new primary while the old one is still cut
//!   off; after the heal it rejoins.
//! * A standby isolated: it never promotes itself; the primary goes on alone.
//! * The monitor isolated: nothing fails over and nothing is fenced, because
//!   the nodes still see each other.
//! * A lone primary cut off behind a router, with no standby to promote and
//!   so no new epoch: the router's `TCP_USER_TIMEOUT` and keepalive end the
//!   statement in flight there with a class 08 error within seconds.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hapg::drill::{connect, Writer, WriterReport};
use hapg::invariants::{Drill, ProbeReport, WriteProbe};
use support::{assigned_at, postmaster_pid, rows, wait_writable, Cluster, RouterProcess};

const STEP: Duration = Duration::from_secs(120);
/// How long after the promotion every statement in flight on a cut-off
/// primary must have been answered.
const IN_FLIGHT_BOUND: Duration = Duration::from_secs(2);

/// A network namespace and the veth pair that joins it to the host.
struct Split {
    ns: String,
    host_if: String,
    ns_if: String,
    /// The host's address on the link (reachable from the namespace).
    host_ip: String,
    /// The namespace's address.
    ns_ip: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Split {
    /// A namespace on a /24 of its own chosen for this run, named after
    /// this process and the moment, so that parallel or leftover test runs do
    /// not collide.
    fn create(tag: &str) -> Split {
        let seed = hapg::netns::run_seed();
        let id = seed % 100_000;
        let subnet = hapg::netns::free_subnet(seed).expect("a free /24 in 10.100.0.0/9");
        let split = Split {
            ns: format!("hapg-{id}-{tag}"),
            host_if: format!("h{id}{tag}"),
            ns_if: format!("n{id}{tag}"),
            host_ip: format!("{subnet}.1"),
            ns_ip: format!("{subnet}.2"),
        };
        ip(&["netns", "add", &split.ns]);
        ip(&[
            "link",
            "add",
            &split.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &split.ns_if,
            "netns",
            &split.ns,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", split.host_ip),
            "dev",
            &split.host_if,
        ]);
        ip(&["link", "set", &split.host_if, "up"]);
        split.in_ns(&[
            "addr",
            "add",
            &format!("{}/24", split.ns_ip),
            "dev",
            &split.ns_if,
        ]);
        split.in_ns(&["link", "set", &split.ns_if, "up"]);
        split.in_ns(&["link", "set", "lo", "up"]);
        split
    }

    fn in_ns(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.ns, "ip"];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// The command prefix that runs a program inside the namespace.
    fn wrapper(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.ns]
    }

    /// Cuts the link: the namespace reaches nothing and nothing reaches it.
    fn cut(&self) {
        self.in_ns(&["link", "set", &self.ns_if, "down"]);
    }

    fn heal(&self) {
        self.in_ns(&["link", "set", &self.ns_if, "up"]);
    }

    /// Runs SQL on a node inside the namespace with psql (the test process
    /// itself is outside it).
    fn psql(&self, port: u16, sql: &str) -> Option<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg("/usr/lib/postgresql/15/bin/psql")
            .args(["-X", "-A", "-t", "-c", sql])
            .arg(format!(
                "postgres://postgres@{}:{port}/appdb?connect_timeout=2",
                self.ns_ip
            ))
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for Split {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// Whether the postmaster of `pgdata` is gone or shutting down: the status
/// line of postmaster.pid says `stopping` from the moment a shutdown begins
/// (new connections refused, sessions ended). A fast shutdown then waits for
/// the walsenders, up to wal_sender_timeout when the standby is cut off.
fn stopping(pgdata: &Path) -> bool {
    if postmaster_pid(pgdata).is_none() {
        return true;
    }
    std::fs::read_to_string(pgdata.join("postmaster.pid"))
        .is_ok_and(|text| text.lines().nth(7).is_some_and(|l| l.trim() == "stopping"))
}

/// Watches a data directory and records when its postmaster began to stop.
struct StopWatch {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Option<f64>>,
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
                    return Some(now());
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            None
        });
        StopWatch { stop, handle }
    }

    /// When the postmaster began to stop, if it did.
    fn finish(self) -> Option<f64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().ok().flatten()
    }
}

/// Writers through the router and a probe against every node.
struct Load {
    writers: Vec<(String, Writer)>,
    probe: WriteProbe,
}

impl Load {
    async fn start(cluster: &Cluster, router: &RouterProcess, phase: &str) -> Load {
        let uri = router.uri("appdb");
        let client = connect(&uri).await.expect("connect through the router");
        let mut writers = Vec::new();
        for i in 0..2 {
            let table = format!("{phase}_{i}");
            client
                .batch_execute(&format!("CREATE TABLE {table} (id bigint PRIMARY KEY)"))
                .await
                .expect("create table");
            writers.push((
                table.clone(),
                Writer::start(uri.clone(), &table, Duration::from_secs(300)),
            ));
        }
        let nodes: Vec<(String, String)> = cluster
            .nodes
            .iter()
            .map(|n| (n.name.clone(), node_uri(cluster, &n.name)))
            .collect();
        let probe = WriteProbe::start(&uri, &nodes).await.expect("probe");
        Load { writers, probe }
    }

    /// Stops the load and checks every invariant against the final primary.
    async fn check(self, cluster: &Cluster, primary: &str, phase: &str) -> Vec<WriterReport> {
        let probe: ProbeReport = self.probe.finish().await;
        let mut reports = Vec::new();
        for (table, writer) in self.writers {
            reports.push((table, writer.finish().await));
        }
        for (table, r) in &reports {
            eprintln!(
                "{phase}: {table}: {} writes acknowledged, {} errors, longest gap {:?}",
                r.acked.len(),
                r.errors,
                r.longest_gap
            );
        }
        let monitor_uri = cluster.monitor_uri();
        let primary_uri = node_uri(cluster, primary);
        let drill = Drill {
            monitor_uri: &monitor_uri,
            primary_uri: &primary_uri,
            writers: reports.iter().map(|(t, r)| (t.as_str(), r)).collect(),
            probe: Some(&probe),
            through_router: true,
        };
        let broken = drill.violations().await.expect("check the invariants");
        assert!(
            broken.is_empty(),
            "{phase}: invariants broken:\n{}\nevents:\n{}",
            broken.join("\n"),
            events(cluster)
        );
        for (table, r) in &reports {
            assert!(
                r.acked.len() > 10,
                "{phase}: {table}: too few writes: {r:?}"
            );
        }
        reports.into_iter().map(|(_, r)| r).collect()
    }
}

/// A node's own address, as the monitor registered it.
fn node_uri(cluster: &Cluster, name: &str) -> String {
    let states: serde_json::Value =
        serde_json::from_str(&cluster.ok(&["show", "state", "--pgdata", "./monitor", "--json"]))
            .expect("json");
    let node = states
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["name"] == name))
        .unwrap_or_else(|| panic!("no node {name}: {states}"));
    format!(
        "postgres://postgres@{}:{}/appdb?connect_timeout=2",
        node["host"].as_str().expect("host"),
        node["port"]
    )
}

fn events(cluster: &Cluster) -> String {
    cluster.ok(&["show", "events", "--pgdata", "./monitor", "--count", "80"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_primary_fences_itself_and_an_isolated_standby_never_promotes() {
    let split = Split::create("a");
    let mut cluster = Cluster::new();
    cluster.start_monitor();
    let monitor_uri = cluster.monitor_uri();
    // node_a runs in the namespace and reaches the monitor over the link.
    let monitor_from_ns = monitor_uri.replacen("@localhost:", &format!("@{}:", split.host_ip), 1);
    assert_ne!(monitor_from_ns, monitor_uri, "{monitor_uri}");
    let node_a = cluster.start_node_at("node_a", &split.ns_ip, &monitor_from_ns, &split.wrapper());
    cluster.wait_states(&[("node_a", "single")], STEP);
    cluster.start_node_at("node_b", &split.host_ip, &monitor_uri, &[]);
    cluster.wait_states(&[("node_a", "primary"), ("node_b", "secondary")], STEP);
    // No socket timeout on the router's server connections: a statement in
    // flight on the cut-off primary can only be freed by the new epoch.
    let router = cluster.start_router(
        "router",
        "pause_timeout_ms = 30000\n\n[server]\ntcp_user_timeout_ms = 0\ntcp_keepalive_idle_ms = 600000",
    );
    wait_writable(&router.uri("appdb"), STEP).await;

    // The primary is cut off from the monitor and the standby.
    let load = Load::start(&cluster, &router, "primary_cut").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fence = StopWatch::start(&node_a.pgdata);
    let cut_at = now();
    split.cut();
    cluster.wait_states(&[("node_b", "wait_primary")], STEP);
    let fenced_at = fence.finish();
    let promoted_at = assigned_at(&monitor_uri, "node_b", "wait_primary", cut_at)
        .await
        .expect("node_b was promoted");
    eprintln!(
        "primary cut off: fenced after {:?} s, standby promoted after {:.2} s",
        fenced_at.map(|t| t - cut_at),
        promoted_at - cut_at
    );
    let fenced_at = fenced_at.unwrap_or_else(|| {
        panic!(
            "the isolated primary never stopped Postgres; its log:\n{}",
            cluster.log("node_a")
        )
    });
    assert!(
        fenced_at < promoted_at,
        "the isolated primary began to stop Postgres {:.2} s after the standby was promoted",
        fenced_at - promoted_at
    );
    assert!(
        cluster.log("node_a").contains("fencing this primary"),
        "{}",
        cluster.log("node_a")
    );
    // Writes go on through the router on node_b while node_a is cut off:
    // every writer writes there before the heal.
    let node_b_uri = node_uri(&cluster, "node_b");
    for (table, _) in &load.writers {
        let before = rows(&node_b_uri, table).await.unwrap_or(0);
        let deadline = Instant::now() + STEP;
        while rows(&node_b_uri, table).await.unwrap_or(0) <= before {
            assert!(
                Instant::now() < deadline,
                "{table}: no write on node_b within {STEP:?} of its promotion\n{}",
                cluster.log(&router.name)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    split.heal();
    cluster.wait_states(&[("node_b", "primary"), ("node_a", "secondary")], STEP);
    let reports = load.check(&cluster, "node_b", "primary_cut").await;
    let ended = support::assert_in_flight_answered(
        &reports,
        cut_at,
        promoted_at,
        IN_FLIGHT_BOUND,
        cluster.node("node_b").port,
        &|| format!("router log:\n{}", cluster.log(&router.name)),
    );
    eprintln!(
        "primary cut off: the statements in flight were answered {ended:.3?} s from the promotion"
    );

    // Now node_a, in the namespace, is the standby: cut off, it never
    // promotes itself, and the primary goes on alone.
    let load = Load::start(&cluster, &router, "standby_cut").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cut_at = now();
    split.cut();
    cluster.wait_states(&[("node_b", "wait_primary")], STEP);
    let deadline = Instant::now() + Duration::from_secs(8);
    while Instant::now() < deadline {
        assert_eq!(
            split
                .psql(node_a.port, "SELECT pg_is_in_recovery()")
                .as_deref(),
            Some("t"),
            "the isolated standby must stay a standby (or at least answer from inside)"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    split.heal();
    cluster.wait_states(&[("node_b", "primary"), ("node_a", "secondary")], STEP);
    let reports = load.check(&cluster, "node_b", "standby_cut").await;
    for r in &reports {
        assert_eq!(r.errors, 0, "losing the standby costs no write: {r:?}");
    }
    assert_eq!(
        assigned_at(&monitor_uri, "node_a", "wait_primary", cut_at).await,
        None,
        "{}",
        events(&cluster)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_monitor_changes_nothing() {
    let split = Split::create("m");
    let mut cluster = Cluster::new();
    // The monitor runs in the namespace; the nodes and the router outside.
    cluster.monitor_port = support::free_port();
    let port = cluster.monitor_port.to_string();
    let mut create = Command::new(split.wrapper()[0]);
    create.args(&split.wrapper()[1..]);
    let inner = cluster.hapg(&[
        "create",
        "monitor",
        "--pgdata",
        "./monitor",
        "--pgport",
        &port,
        "--hostname",
        &split.ns_ip,
        "--auth",
        "trust",
        "--ssl-self-signed",
        "--run",
    ]);
    create
        .arg(inner.get_program())
        .args(inner.get_args())
        .current_dir(cluster.path())
        .envs(inner.get_envs().filter_map(|(k, v)| Some((k, v?))));
    cluster.spawn_command("monitor", create);
    cluster.eventually("the monitor to answer", STEP, || {
        cluster
            .run(&["show", "state", "--pgdata", "./monitor"])
            .status
            .success()
    });
    let monitor_uri = cluster.monitor_uri();
    assert!(monitor_uri.contains(&split.ns_ip), "{monitor_uri}");
    cluster.start_node_at("node_a", &split.host_ip, &monitor_uri, &[]);
    cluster.wait_states(&[("node_a", "single")], STEP);
    cluster.start_node_at("node_b", &split.host_ip, &monitor_uri, &[]);
    cluster.wait_states(&[("node_a", "primary"), ("node_b", "secondary")], STEP);
    let router = cluster.start_router("router", "pause_timeout_ms = 30000");
    wait_writable(&router.uri("appdb"), STEP).await;

    let load = Load::start(&cluster, &router, "monitor_cut").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let node_a = cluster.node("node_a");
    let fence = StopWatch::start(&node_a.pgdata);
    split.cut();
    // Longer than every timeout involved (the monitor's unhealthy timeout,
    // 3 s; the keepers' network_partition_timeout, 2.5 s;
    // wal_receiver_timeout, 5 s): the monitor checked each node more than 6 s
    // after its keeper's last report. Read through the monitor's Unix
    // socket, which the cut does not reach.
    let monitor_local = format!(
        "host={} port={} user=postgres dbname=pg_auto_failover",
        hapg_keeper::postgres::SOCKET_DIR,
        cluster.monitor_port
    );
    for node in ["node_a", "node_b"] {
        let health =
            support::wait_monitor_saw_silence(&monitor_local, node, Duration::from_secs(6), STEP)
                .await;
        assert_eq!(health, 0, "the cut monitor cannot reach {node}");
    }
    let healed_at = now();
    split.heal();
    cluster.eventually("the monitor to answer again", STEP, || {
        cluster
            .run(&["show", "state", "--pgdata", "./monitor"])
            .status
            .success()
    });
    // The monitor hears the nodes again (each reported and was checked
    // healthy since the heal) and everything is where it was.
    let monitor = connect(&monitor_local)
        .await
        .expect("connect to the monitor");
    let deadline = Instant::now() + STEP;
    loop {
        let heard: bool = monitor
            .query_one(
                "SELECT bool_and(report_time > to_timestamp($1)
                                 AND health_check_time > to_timestamp($1) AND health = 1)
                   FROM hapg.node",
                &[&healed_at],
            )
            .await
            .expect("read the nodes' reports")
            .get(0);
        if heard {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the monitor did not hear from both nodes after the heal"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.wait_states(&[("node_a", "primary"), ("node_b", "secondary")], STEP);
    assert_eq!(
        fence.finish(),
        None,
        "the primary stopped Postgres though its standby still streamed from it:\n{}",
        cluster.log("node_a")
    );
    let events = events(&cluster);
    assert!(!events.contains("Election"), "{events}");
    let reports = load.check(&cluster, "node_a", "monitor_cut").await;
    for r in &reports {
        assert_eq!(
            r.errors, 0,
            "the router keeps routing to the primary it knows: {r:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_ends_the_statement_in_flight_without_an_epoch_change() {
    let split = Split::create("u");
    let mut cluster = Cluster::new();
    cluster.start_monitor();
    let monitor_uri = cluster.monitor_uri();
    let monitor_from_ns = monitor_uri.replacen("@localhost:", &format!("@{}:", split.host_ip), 1);
    // A lone primary: once it is cut off there is nothing to promote, the
    // epoch never moves, and only the socket can tell the router.
    cluster.start_node_at("node_a", &split.ns_ip, &monitor_from_ns, &split.wrapper());
    cluster.wait_states(&[("node_a", "single")], STEP);
    // The defaults, written out: the bound below depends on them.
    let router = cluster.start_router(
        "router",
        "pause_timeout_ms = 2000\n\n[server]\ntcp_user_timeout_ms = 5000\ntcp_keepalive_idle_ms = 3000\ntcp_keepalive_interval_ms = 1000",
    );
    let uri = router.uri("appdb");
    wait_writable(&uri, STEP).await;
    connect(&uri)
        .await
        .expect("connect through the router")
        .batch_execute("CREATE TABLE silent (id bigint PRIMARY KEY)")
        .await
        .expect("create table");
    let writer = Writer::start(uri.clone(), "silent", Duration::from_secs(120));
    let deadline = Instant::now() + STEP;
    while rows(&uri, "silent").await.unwrap_or(0) < 10 {
        assert!(Instant::now() < deadline, "the writer does not write");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cut_at = now();
    split.cut();
    // The first failure after the cut is the statement that was in flight.
    let deadline = Instant::now() + Duration::from_secs(40);
    while now() - cut_at < 40.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if cluster.log(&router.name).contains("server connection lost") {
            break;
        }
    }
    let report = writer.finish().await;
    split.heal();
    let failure = report
        .failures
        .iter()
        .find(|f| f.ended_at > cut_at)
        .unwrap_or_else(|| panic!("no statement failed after the cut: {report:?}"));
    let took = failure.ended_at - cut_at;
    eprintln!(
        "silent server: the statement in flight ended {took:.2} s after the cut: {} {}",
        failure.code.as_deref().unwrap_or("-"),
        failure.message
    );
    let log = cluster.log(&router.name);
    assert!(
        failure.sent_at < cut_at + 0.1,
        "the first failure is not the statement in flight at the cut: {failure:?}"
    );
    assert_eq!(
        failure.code.as_deref(),
        Some("08006"),
        "{failure:?}\nrouter log:\n{log}"
    );
    assert!(
        failure
            .message
            .contains("lost the connection to the primary"),
        "{failure:?}"
    );
    // Keepalive idle (3 s), then a probe a second until the user timeout
    // (5 s) has passed since the server was last heard: about 5 to 6 s.
    assert!(
        took < 10.0,
        "the statement in flight ended {took:.2} s after the cut\nrouter log:\n{log}"
    );
    assert!(
        !log.contains("the primary changed"),
        "the epoch moved: {log}"
    );
}
