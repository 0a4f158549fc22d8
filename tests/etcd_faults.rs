//! Faults of the monitor on etcd (issue 26, "How it is shown"), injected for
//! real while clients write through the hapg router: a three-member etcd on
//! loopback (`hapg::etcd::EtcdCluster`), two `hapg monitor run` services,
//! two nodes and the router, all real processes. Every fault is one phase
//! (`support::phase`, as in tests/fault_matrix.rs): a probe writing to every
//! node directly and two writers through the router run across it, and
//! afterwards the invariant checker finds no split brain, no acknowledged
//! write lost, no row no client sent, and every write on the node the store
//! named writable at that moment.
//!
//! The phases share one cluster, each starting from the converged group the
//! previous one left:
//!
//! 1. kill -9 of the leading monitor service: no client error, no failover,
//!    the other service leads within the lease;
//! 2. the leading service killed and the primary powered off at once: writes
//!    resume on the standby once the new leader has its own health verdict
//!    (its store answered all along, so not the whole startup grace);
//! 3. one etcd member killed: nothing changes; then two of three frozen
//!    (SIGSTOP: their sockets stay open and silent) for 30 s, then two
//!    killed for 10 s, so etcd has no quorum: the primary stays writable
//!    through the router, nothing is failed over or demoted, and once etcd
//!    is back no event claims a failure;
//! 4. the leading service frozen past its lease while the other takes over,
//!    then thawed: it writes nothing (checked in etcd's revisions);
//! 5. the tutorial's switchover and power-off, as for the Postgres monitor.

mod support;

use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use hapg::drill::unix_now;
use hapg::etcd::EtcdCluster;
use hapg_monitor::MonitorClient;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::phase::{assert_no_failover, assert_steady, show_events, Phase, PhaseResult};
use support::{connect, direct_uri, rows, wait_rows, wait_writable, Cluster, RouterProcess};

const STEP: Duration = Duration::from_secs(90);
const PREFIX: &str = "hapg-e2e";
/// The leader key of the monitor services (`P/leader`).
const LEADER_KEY: &str = "/hapg-e2e/leader";
const SERVICES: [&str; 2] = ["monitor_1", "monitor_2"];
/// `hapg_monitor::service::LEADER_TTL`.
const LEASE: Duration = Duration::from_secs(2);
/// Takeover bound: the lease, plus a campaign round (a quarter of it) and
/// the renewal period a kill may fall into, with room for a busy machine.
const TAKEOVER_LIMIT: Duration = Duration::from_secs(4);
/// How long etcd has no quorum in phase 3.
const NO_QUORUM: Duration = Duration::from_secs(30);
/// How long etcd has no quorum with two members killed (refusing at once:
/// the easier case, shorter).
const NO_QUORUM_KILLED: Duration = Duration::from_secs(10);
/// The longest a writer through the router may wait for an acknowledged
/// write while etcd has no quorum (a write is a few milliseconds).
const GAP_WITHOUT_QUORUM: Duration = Duration::from_secs(2);
/// A keeper reports every 0.5 s: a report older than this was missed.
const REPORT_FRESH: Duration = Duration::from_secs(2);
const ROUTER_CONFIG: &str = "pause_timeout_ms = 30000";
const CONVERGED_A: [(&str, &str); 2] = [("node_a", "primary"), ("node_b", "secondary")];
const CONVERGED_B: [(&str, &str); 2] = [("node_b", "primary"), ("node_a", "secondary")];

/// The group under test: etcd, the monitor services, two nodes, the router.
struct Group {
    cluster: Cluster,
    etcd: EtcdCluster,
    uri: String,
    router: RouterProcess,
    /// The test's own etcd client, to read the leader key and revisions.
    kv: Client,
}

impl Group {
    async fn start() -> Group {
        let mut cluster = Cluster::new();
        let dir = cluster.path().join("etcd");
        std::fs::create_dir_all(&dir).expect("etcd directory");
        let etcd = EtcdCluster::start(&dir, 3).expect("a three-member etcd");
        let uri = etcd.uri(PREFIX);
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_timeout(Duration::from_secs(2));
        let kv = Client::connect(etcd.endpoints(), Some(options))
            .await
            .expect("connect to etcd");
        cluster.use_store(&uri);
        let mut group = Group {
            cluster,
            etcd,
            uri,
            router: RouterProcess {
                name: String::new(),
                id: String::new(),
                port: 0,
                config: Default::default(),
            },
            kv,
        };
        group.spawn_service("monitor_1");
        let (first, _) = group.wait_leader(None, STEP).await;
        assert_eq!(first, "monitor_1");
        group.spawn_service("monitor_2");
        let uri = group.uri.clone();
        group
            .cluster
            .start_node_at("node_a", "localhost", &uri, &[]);
        group.cluster.wait_states(&[("node_a", "single")], STEP);
        group
            .cluster
            .start_node_at("node_b", "localhost", &uri, &[]);
        group.cluster.wait_states(&CONVERGED_A, STEP);
        group.router = group.cluster.start_router("router", ROUTER_CONFIG);
        wait_writable(&group.router.uri("appdb"), STEP).await;
        group
    }

    fn spawn_service(&self, name: &str) {
        self.cluster
            .spawn(name, &["monitor", "run", "--monitor", &self.uri]);
    }

    /// The leader key now: the leading service's pid and the key's
    /// create_revision (what its writes are fenced on); `None` without a
    /// leader or without an answer from etcd within a second.
    async fn leader(&self) -> Option<(u32, i64)> {
        let mut kv = self.kv.clone();
        let got = tokio::time::timeout(Duration::from_secs(1), kv.get(LEADER_KEY, None))
            .await
            .ok()?
            .ok()?;
        let kv = got.kvs().first()?;
        // The value is "monitor service pid N".
        let pid = String::from_utf8_lossy(kv.value())
            .rsplit(' ')
            .next()?
            .parse()
            .ok()?;
        Some((pid, kv.create_revision()))
    }

    fn service_of(&self, pid: u32) -> Option<&'static str> {
        SERVICES
            .into_iter()
            .find(|s| self.cluster.pid(s) == Some(pid))
    }

    /// The service leading now (there must be one).
    async fn leading(&self) -> (&'static str, u32) {
        let (name, _) = self.wait_leader(None, STEP).await;
        let pid = self.cluster.pid(name).expect("the leader runs");
        (name, pid)
    }

    /// Waits (bounded) until a service other than `not` (a pid) leads;
    /// which one, and how long it took.
    async fn wait_leader(&self, not: Option<u32>, limit: Duration) -> (&'static str, Duration) {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Some(name) = self
                .leader()
                .await
                .filter(|(pid, _)| Some(*pid) != not)
                .and_then(|(pid, _)| self.service_of(pid))
            {
                return (name, started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "no monitor service (other than pid {not:?}) led within {limit:?}\n{}",
            self.cluster.all_logs()
        );
    }

    /// etcd's current revision.
    async fn revision(&self) -> i64 {
        let mut kv = self.kv.clone();
        tokio::time::timeout(Duration::from_secs(5), kv.get(LEADER_KEY, None))
            .await
            .expect("etcd answers")
            .expect("etcd answers")
            .header()
            .map(|h| h.revision())
            .expect("a header")
    }

    /// Keys only the leading monitor service writes (health verdicts, goals,
    /// the formation) last written after revision `after`.
    async fn service_writes_since(&self, after: i64) -> Vec<(String, i64)> {
        let mut written = Vec::new();
        for kind in ["health/", "node/", "formation/"] {
            let mut kv = self.kv.clone();
            let prefix = format!("/{PREFIX}/{kind}");
            let got = tokio::time::timeout(
                Duration::from_secs(5),
                kv.get(prefix, Some(GetOptions::new().with_prefix())),
            )
            .await
            .expect("etcd answers")
            .expect("etcd answers");
            written.extend(
                got.kvs()
                    .iter()
                    .filter(|kv| kv.mod_revision() > after)
                    .map(|kv| {
                        (
                            String::from_utf8_lossy(kv.key()).into_owned(),
                            kv.mod_revision(),
                        )
                    }),
            );
        }
        written
    }

    async fn epoch(&self) -> i64 {
        MonitorClient::connect(&self.uri)
            .await
            .expect("connect to the store")
            .formation("default")
            .await
            .expect("the formation")
            .primary_epoch
    }

    async fn start_phase(&self, primary: &str, name: &str) -> Phase {
        Phase::start(&self.cluster, &self.router, primary, name, &self.uri).await
    }

    async fn finish(&self, phase: Phase, primary: &str) -> PhaseResult {
        phase
            .finish(&self.cluster, &self.router, primary, &self.uri)
            .await
    }
}

fn signal(pid: u32, signal: Signal) {
    let pid = i32::try_from(pid).expect("a pid");
    kill(Pid::from_raw(pid), signal).expect("signal a monitor service");
}

/// Whether the node answers `pg_is_in_recovery()` directly: `None` when it
/// does not answer within a few seconds.
async fn in_recovery(uri: &str) -> Option<bool> {
    let client = tokio::time::timeout(Duration::from_secs(3), connect(uri))
        .await
        .ok()?
        .ok()?;
    let row = tokio::time::timeout(
        Duration::from_secs(3),
        client.query_one("SELECT pg_is_in_recovery()", &[]),
    )
    .await
    .ok()?
    .ok()?;
    Some(row.get(0))
}

/// While etcd has no quorum for `length` (two members `how`): the primary
/// node_b stays read-write and the standby node_a in recovery, each asked
/// directly every 0.5 s, and the writers through the router see no error;
/// they still write at the end.
async fn hold_without_quorum(
    cluster: &Cluster,
    etcd: &EtcdCluster,
    phase: &Phase,
    router: &RouterProcess,
    how: &str,
    length: Duration,
) -> (f64, f64) {
    let started = Instant::now();
    let from = unix_now();
    let errors_before: Vec<u64> = phase.writers.iter().map(|w| w.errors()).collect();
    let (uri_a, uri_b) = (direct_uri(cluster, "node_a"), direct_uri(cluster, "node_b"));
    let mut checks = 0;
    while started.elapsed() < length {
        assert_eq!(
            in_recovery(&uri_b).await,
            Some(false),
            "etcd_quorum ({how}): the primary node_b left read-write {:?} into the quorum loss\n{}",
            started.elapsed(),
            cluster.all_logs()
        );
        assert_eq!(
            in_recovery(&uri_a).await,
            Some(true),
            "etcd_quorum ({how}): the standby node_a left recovery {:?} into the quorum loss",
            started.elapsed()
        );
        let errors: Vec<u64> = phase.writers.iter().map(|w| w.errors()).collect();
        assert_eq!(
            errors,
            errors_before,
            "etcd_quorum ({how}): writers saw errors {:?} into the quorum loss\nrouter log:\n{}",
            started.elapsed(),
            cluster.log(&router.name)
        );
        if checks == 3 {
            let endpoint = [etcd.endpoint(0)];
            assert!(
                !tokio::task::block_in_place(|| etcd.healthy(&endpoint)),
                "etcd_quorum ({how}): setup error: the one member left still has a quorum"
            );
        }
        checks += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let uri = router.uri("appdb");
    for table in &phase.tables {
        let before = rows(&uri, table).await.unwrap_or(0);
        wait_rows(cluster, &uri, table, before + 10).await;
    }
    eprintln!(
        "etcd_quorum: two members {how}, quorum lost for {:?} ({checks} checks)",
        started.elapsed()
    );
    (from, unix_now())
}

/// The longest time without an acknowledged write of `report` within
/// `window` (Unix times), its ends included.
fn longest_gap_within(report: &hapg::drill::WriterReport, window: (f64, f64)) -> f64 {
    let mut times: Vec<f64> = vec![window.0];
    times.extend(
        report
            .acks
            .iter()
            .map(|a| a.at)
            .filter(|at| *at > window.0 && *at < window.1),
    );
    times.push(window.1);
    times.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max)
}

/// After the primary node_a was powered off: waits for node_b's promotion
/// and for every table in `tables` to gain 10 rows through the router at
/// `uri`, runs node_a again, then `meanwhile` (before convergence), and
/// waits until the group converged with node_b the primary.
async fn fail_over_to_node_b(
    cluster: &Cluster,
    uri: &str,
    tables: &[String],
    meanwhile: impl FnOnce(),
) {
    cluster.wait_states(&[("node_b", "wait_primary")], STEP);
    for table in tables {
        let before = rows(uri, table).await.unwrap_or(0);
        wait_rows(cluster, uri, table, before + 10).await;
    }
    cluster
        .run_node("node_a", &[])
        .unwrap_or_else(|e| panic!("{e}"));
    meanwhile();
    cluster.wait_states(&CONVERGED_B, STEP);
}

fn assert_no_errors(result: &PhaseResult, phase: &str, cluster: &Cluster, router: &str) {
    for (i, r) in result.reports.iter().enumerate() {
        assert_eq!(
            r.errors,
            0,
            "{phase}: writer {i} saw errors: {:?}\nrouter log:\n{}",
            r.failures,
            cluster.log(router)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_on_etcd_faults_under_write_load() {
    let test_started = Instant::now();
    let mut g = Group::start().await;
    let cluster = &g.cluster;
    let router = &g.router;
    let startup_grace = hapg_config::MonitorTimings::default().startup_grace;
    eprintln!("set up in {:?}", test_started.elapsed());

    // 1. kill -9 of the leading monitor service.
    let phase = g.start_phase("node_a", "leader_kill").await;
    let (old, old_pid) = g.leading().await;
    cluster.power_off_keeper_only(old);
    let (new, took) = g.wait_leader(Some(old_pid), Duration::from_secs(30)).await;
    eprintln!("leader_kill: {new} leads {took:?} after {old} was killed (lease {LEASE:?})");
    assert!(
        took < TAKEOVER_LIMIT,
        "leader_kill: the takeover took {took:?}"
    );
    g.spawn_service(old);
    assert_steady(cluster, "node_a", "node_b", Duration::from_secs(3));
    cluster.wait_states(&CONVERGED_A, STEP);
    let result = g.finish(phase, "node_a").await;
    assert_no_failover(&result.events, "node_a", "leader_kill");
    assert_no_errors(&result, "leader_kill", cluster, &router.name);

    // 2. The leading service killed and the primary powered off at once.
    let phase = g.start_phase("node_a", "leader_and_primary").await;
    let (old, old_pid) = g.leading().await;
    let lost_at = unix_now();
    cluster.power_off_keeper_only(old);
    cluster.power_off("node_a");
    let (new, took) = g.wait_leader(Some(old_pid), Duration::from_secs(30)).await;
    let led_at = unix_now();
    eprintln!("leader_and_primary: {new} leads {took:?} after the loss");
    let uri = router.uri("appdb");
    fail_over_to_node_b(cluster, &uri, &phase.tables, || g.spawn_service(old)).await;
    let result = g.finish(phase, "node_b").await;
    let port_b = cluster.node("node_b").port;
    let resumed: Vec<f64> = result
        .reports
        .iter()
        .map(|r| {
            r.acks
                .iter()
                .find(|a| a.at > lost_at && a.port == Some(port_b))
                .map(|a| a.at - lost_at)
                .expect("a write acknowledged on node_b after the loss")
        })
        .collect();
    // The new leader judges no node before its own health checks reached a
    // verdict (the old leader's stays in the store until then), but its
    // store answered all along, so the keepers' reports in it are fresh: it
    // does not wait a restarted monitor's whole startup grace.
    let promoted_at = MonitorClient::connect(&g.uri)
        .await
        .expect("connect to the store")
        .goal_history()
        .await
        .expect("goal history")
        .iter()
        .find(|e| {
            e.time > lost_at
                && e.node_port == port_b
                && matches!(
                    e.goal.as_str(),
                    "prepare_promotion" | "stop_replication" | "wait_primary"
                )
        })
        .map(|e| e.time)
        .expect("node_b was promoted");
    eprintln!(
        "leader_and_primary: writes resumed through the router {resumed:.2?} s after the loss; \
         the new leader promoted node_b {:.2} s after it led ({:.2} s after the loss)",
        promoted_at - led_at,
        promoted_at - lost_at
    );
    let timings = hapg_config::MonitorTimings::default();
    let verdict = (timings.health_check_period * timings.health_check_failures
        + timings.health_check_timeout)
        .as_secs_f64();
    assert!(
        promoted_at - led_at > verdict - 0.5,
        "leader_and_primary: the new leader failed over {:.2} s after it led, before its own health verdict ({verdict} s)\n{}",
        promoted_at - led_at,
        show_events(&result.events)
    );
    assert!(
        promoted_at - led_at < startup_grace.as_secs_f64() - 0.5,
        "leader_and_primary: the new leader waited {:.2} s, a restarted monitor's startup grace ({startup_grace:?}), though its store answered all along\n{}",
        promoted_at - led_at,
        show_events(&result.events)
    );
    for (i, r) in resumed.iter().enumerate() {
        assert!(
            *r < 30.0,
            "leader_and_primary: writer {i} resumed only {r:.2} s after the loss"
        );
    }
    for (i, r) in result.reports.iter().enumerate() {
        assert!(
            r.errors <= 1,
            "leader_and_primary: writer {i} saw {} errors: {:?}",
            r.errors,
            r.failures
        );
    }

    // 3. One etcd member killed, then two of three frozen: no quorum.
    let phase = g.start_phase("node_b", "etcd_quorum").await;
    let epoch = g.epoch().await;
    g.etcd.kill(0);
    let killed = Instant::now();
    eprintln!("etcd_quorum: member 0 killed");
    assert_steady(cluster, "node_b", "node_a", Duration::from_secs(5));
    // The store still hears every keeper: its clients moved to members
    // that answer (the monitor would otherwise be blind with one member of
    // three down).
    let ages: Vec<(String, Option<Duration>)> = MonitorClient::connect(&g.uri)
        .await
        .expect("connect to the store with one member down")
        .nodes("default", None)
        .await
        .expect("read the nodes with one member down")
        .into_iter()
        .map(|n| (n.name, n.report_age))
        .collect();
    eprintln!(
        "etcd_quorum: {:?} after member 0 was killed, last reports {ages:?} ago",
        killed.elapsed()
    );
    for (name, age) in &ages {
        assert!(
            age.is_some_and(|a| a < REPORT_FRESH),
            "etcd_quorum: {name}'s keeper has not reported for {age:?} with one etcd member of three down\n{}",
            cluster.all_logs()
        );
    }
    let (leader, _) = g.wait_leader(None, Duration::from_secs(10)).await;
    eprintln!("etcd_quorum: {leader} leads with one member down");
    let etcd = &mut g.etcd;
    etcd.restart(0).expect("member 0 back");
    // Two members frozen: their sockets stay open and say nothing.
    etcd.signal(1, Signal::SIGSTOP);
    etcd.signal(2, Signal::SIGSTOP);
    let frozen = hold_without_quorum(cluster, etcd, &phase, router, "frozen", NO_QUORUM).await;
    etcd.signal(1, Signal::SIGCONT);
    etcd.signal(2, Signal::SIGCONT);
    etcd.wait_healthy(&[0, 1, 2], STEP)
        .expect("etcd healthy again");
    // Two members killed: their sockets refuse at once.
    etcd.kill(1);
    etcd.kill(2);
    let killed =
        hold_without_quorum(cluster, etcd, &phase, router, "killed", NO_QUORUM_KILLED).await;
    etcd.restart(1).expect("member 1 back");
    etcd.restart(2).expect("member 2 back");
    etcd.wait_healthy(&[0, 1, 2], STEP)
        .expect("etcd healthy again");
    let (leader, took) = g.wait_leader(None, STEP).await;
    eprintln!("etcd_quorum: {leader} leads {took:?} after etcd was healthy again");
    // Past the new leader's startup grace and the unhealthy timeout: a
    // leader that took the silence for a failure would act now.
    assert_steady(
        cluster,
        "node_b",
        "node_a",
        startup_grace + Duration::from_secs(3),
    );
    cluster.wait_states(&CONVERGED_B, STEP);
    let result = g.finish(phase, "node_b").await;
    assert_no_failover(&result.events, "node_b", "etcd_quorum");
    for (node, goal, what) in &result.events {
        assert!(
            !what.contains("unhealthy") && !what.contains("demot") && !what.contains("fenc"),
            "etcd_quorum: an event claims a failure that did not happen ({node} -> {goal}: {what}):\n{}",
            show_events(&result.events)
        );
    }
    assert_eq!(g.epoch().await, epoch, "etcd_quorum: the epoch moved");
    let (uri_a, uri_b) = (direct_uri(cluster, "node_a"), direct_uri(cluster, "node_b"));
    assert_eq!(in_recovery(&uri_b).await, Some(false));
    assert_eq!(in_recovery(&uri_a).await, Some(true));
    assert_no_errors(&result, "etcd_quorum", cluster, &router.name);
    // Within the windows without a quorum (the restarts of etcd members
    // around them load this small machine's disk and CPU, and are not what
    // is measured here).
    for (i, r) in result.reports.iter().enumerate() {
        for (how, window) in [("frozen", frozen), ("killed", killed)] {
            let gap = longest_gap_within(r, window);
            eprintln!("etcd_quorum: writer {i}: longest gap without a quorum (two members {how}) {gap:.3} s");
            assert!(
                gap < GAP_WITHOUT_QUORUM.as_secs_f64(),
                "etcd_quorum: writer {i} waited {gap:.3} s between two acknowledged writes while two members were {how}"
            );
        }
    }

    // 4. The leading service frozen past its lease, then thawed.
    let phase = g.start_phase("node_b", "leader_freeze").await;
    let (old, old_pid) = g.leading().await;
    let frozen_at = Instant::now();
    signal(old_pid, Signal::SIGSTOP);
    let (new, took) = g.wait_leader(Some(old_pid), Duration::from_secs(30)).await;
    let new_pid = cluster.pid(new).expect("the new leader runs");
    eprintln!("leader_freeze: {new} leads {took:?} after {old} was frozen");
    assert!(
        took < TAKEOVER_LIMIT,
        "leader_freeze: the takeover took {took:?}"
    );
    let freeze = LEASE * 3;
    tokio::time::sleep(freeze.saturating_sub(frozen_at.elapsed())).await;
    // The new leader is frozen too while the old one wakes: whatever a
    // monitor service writes then is the old one's. The new leader's lease
    // outlives the window (it renewed at most a third of the lease before).
    let log_before = cluster.log(old).len();
    signal(new_pid, Signal::SIGSTOP);
    let held = g.leader().await.expect("the new leader's key");
    let woke = g.revision().await;
    signal(old_pid, Signal::SIGCONT);
    let window = Instant::now();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let written = g.service_writes_since(woke).await;
    let still = g.leader().await;
    let window = window.elapsed();
    signal(new_pid, Signal::SIGCONT);
    assert_eq!(
        still,
        Some(held),
        "leader_freeze: setup error: the new leader's lease lapsed within the {window:?} window"
    );
    assert!(
        written.is_empty(),
        "leader_freeze: the old leader wrote after it woke (revision {woke} on): {written:?}\n{}",
        cluster.log(old)
    );
    eprintln!(
        "leader_freeze: {old} frozen {freeze:?}; in the {window:?} after it woke, no monitor write in etcd"
    );
    let stepped_down = Instant::now();
    while !cluster.log(old)[log_before..].contains("no longer leading") {
        assert!(
            stepped_down.elapsed() < Duration::from_secs(10),
            "leader_freeze: {old} did not say it stopped leading\n{}",
            cluster.log(old)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    g.wait_leader(None, STEP).await;
    cluster.wait_states(&CONVERGED_B, STEP);
    let result = g.finish(phase, "node_b").await;
    assert_no_failover(&result.events, "node_b", "leader_freeze");
    assert_no_errors(&result, "leader_freeze", cluster, &router.name);

    // 5. The tutorial's switchover, then the power-off of the new primary.
    let phase = g.start_phase("node_b", "switchover").await;
    let started = Instant::now();
    cluster.ok(&["perform", "switchover", "--monitor", &g.uri]);
    cluster.wait_states(&CONVERGED_A, STEP);
    eprintln!("switchover: done in {:?}", started.elapsed());
    let result = g.finish(phase, "node_a").await;
    assert_no_errors(&result, "switchover", cluster, &router.name);

    let phase = g.start_phase("node_a", "power_off").await;
    let lost_at = unix_now();
    cluster.power_off("node_a");
    fail_over_to_node_b(cluster, &uri, &phase.tables, || {}).await;
    let result = g.finish(phase, "node_b").await;
    let resumed: Vec<f64> = result
        .reports
        .iter()
        .filter_map(|r| {
            r.acks
                .iter()
                .find(|a| a.at > lost_at && a.port == Some(port_b))
                .map(|a| a.at - lost_at)
        })
        .collect();
    eprintln!("power_off: writes resumed through the router {resumed:.2?} s after the power-off");
    for (i, r) in result.reports.iter().enumerate() {
        assert!(
            r.errors <= 1,
            "power_off: writer {i} saw {} errors: {:?}",
            r.errors,
            r.failures
        );
    }
    eprintln!(
        "monitor_on_etcd_faults_under_write_load took {:?}",
        test_started.elapsed()
    );
    cluster.terminate(&router.name);
}
