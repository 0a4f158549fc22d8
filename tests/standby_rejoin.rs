//! How a node comes back into its group (issue 29), with real monitor,
//! keepers, router and PostgreSQL 15 processes:
//!
//! * `standby_restarts_by_streaming`: a standby powered off (keeper and
//!   Postgres SIGKILLed) under write load, then stopped cleanly with `hapg
//!   stop`, comes back each time by streaming from where it stopped: no
//!   pg_rewind, no pg_basebackup (its data directory is the same one), and it
//!   catches up.
//! * `standby_promoted_by_hand_is_rewound`: a standby promoted with `pg_ctl
//!   promote` behind the monitor's back: the monitor's events name the
//!   divergence within seconds, `show state` marks it, the router keeps
//!   sending everything to the primary, and the node is rewound back into the
//!   group, without the write it took while diverged.
//! * `old_primary_with_lost_writes_is_rewound`: an old primary with a commit
//!   its standby never received comes back after a failover by pg_rewind,
//!   and the commit is gone from it.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use hapg::drill::{connect, Writer};
use support::{direct_uri, rows, wait_writable, Cluster};

const STEP: Duration = Duration::from_secs(90);

/// The monitor's newest event id.
async fn last_event_id(monitor_uri: &str) -> i64 {
    connect(monitor_uri)
        .await
        .expect("connect to the monitor")
        .query_one("SELECT coalesce(max(event_id), 0) FROM hapg.event", &[])
        .await
        .expect("read events")
        .get(0)
}

/// Descriptions of the events after `after`.
async fn events_since(monitor_uri: &str, after: i64) -> Vec<String> {
    connect(monitor_uri)
        .await
        .expect("connect to the monitor")
        .query(
            "SELECT description FROM hapg.event WHERE event_id > $1 ORDER BY event_id",
            &[&after],
        )
        .await
        .expect("read events")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A file hapg and Postgres never write: pg_basebackup (a new data directory)
/// and pg_rewind (which removes what the source lacks) both take it away.
fn mark(pgdata: &Path) {
    std::fs::write(pgdata.join("test-marker"), "kept").expect("write the marker");
}

fn marked(pgdata: &Path) -> bool {
    pgdata.join("test-marker").exists()
}

/// Waits until the standby holds as many rows of `table` as the primary.
async fn wait_caught_up(cluster: &Cluster, primary: &str, standby: &str, table: &str) {
    let want = rows(&direct_uri(cluster, primary), table)
        .await
        .expect("count on the primary");
    let deadline = Instant::now() + STEP;
    let mut last = None;
    while Instant::now() < deadline {
        last = rows(&direct_uri(cluster, standby), table).await;
        if last == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{standby} did not catch up on {table}: {last:?} rows, the primary has {want}\n{}",
        cluster.all_logs()
    );
}

/// Brings `node_b` back with `hapg run` after `stop` and checks it rejoined
/// by streaming, in the same data directory, and caught up.
async fn stop_and_rejoin(
    cluster: &Cluster,
    monitor_uri: &str,
    router_uri: &str,
    what: &str,
    stop: impl FnOnce(),
) {
    let pgdata = cluster.node("node_b").pgdata;
    mark(&pgdata);
    let first = last_event_id(monitor_uri).await;
    let writer = Writer::start(router_uri.to_string(), what, Duration::from_secs(300));
    let deadline = Instant::now() + STEP;
    while rows(router_uri, what).await.unwrap_or(0) < 20 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop();
    cluster.wait_states(&[("node_a", "wait_primary")], STEP);
    let before = rows(router_uri, what).await.unwrap_or(0);
    cluster.eventually("writes to go on without the standby", STEP, || {
        futures_block(rows(router_uri, what)).unwrap_or(0) > before + 20
    });
    let restarted = Instant::now();
    cluster.spawn("node_b", &["run", "--pgdata", "./node_b"]);
    cluster.wait_states(&[("node_a", "primary"), ("node_b", "secondary")], STEP);
    let back = restarted.elapsed();
    let report = writer.finish().await;
    wait_caught_up(cluster, "node_a", "node_b", what).await;
    let events = events_since(monitor_uri, first).await;
    eprintln!(
        "{what}: node_b secondary {back:?} after `hapg run`; writer: {} acknowledged, {} errors\nevents:\n  {}",
        report.acked.len(),
        report.errors,
        events.join("\n  ")
    );
    assert!(
        events
            .iter()
            .any(|e| e.contains("(node_b) rejoins the primary") && e.contains("by streaming")),
        "{what}: no event says node_b rejoined by streaming:\n{}",
        events.join("\n")
    );
    assert!(
        !events
            .iter()
            .any(|e| e.contains("by pg_basebackup") || e.contains("by pg_rewind")),
        "{what}: node_b was rewound or copied:\n{}",
        events.join("\n")
    );
    assert!(
        marked(&pgdata),
        "{what}: node_b's data directory was replaced or rewound"
    );
}

/// Runs a future to completion from inside a synchronous closure on the
/// multi-thread runtime.
fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_restarts_by_streaming() {
    let cluster = Cluster::formation(&["node_a", "node_b"], STEP);
    let monitor_uri = cluster.monitor_uri();
    let router = cluster.start_router("router", "pause_timeout_ms = 30000");
    let uri = router.uri("appdb");
    wait_writable(&uri, STEP).await;
    connect(&uri)
        .await
        .expect("connect through the router")
        .batch_execute(
            "CREATE TABLE power_off (id bigint PRIMARY KEY);
             CREATE TABLE clean_stop (id bigint PRIMARY KEY);",
        )
        .await
        .expect("create tables");

    stop_and_rejoin(&cluster, &monitor_uri, &uri, "power_off", || {
        cluster.power_off("node_b")
    })
    .await;
    stop_and_rejoin(&cluster, &monitor_uri, &uri, "clean_stop", || {
        cluster.ok(&["stop", "--pgdata", "./node_b"]);
        cluster.eventually("node_b's keeper to exit", STEP, || {
            cluster.keeper_pid("node_b").is_none_or(|pid| {
                !hapg_keeper::pidfile::process_alive(pid)
                    || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                        .is_ok_and(|s| s.contains(") Z "))
            })
        });
    })
    .await;
    cluster.terminate(&router.name);
}

/// Runs a Postgres tool as the OS user that owns the data directories.
fn pg_tool(tool: &str, args: &[&str]) -> std::process::Output {
    let bin = hapg_keeper::postgres::default_bindir().join(tool);
    let mut cmd = if nix::unistd::geteuid().is_root() {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&bin);
        c
    } else {
        std::process::Command::new(&bin)
    };
    cmd.args(args).output().expect("run a postgres tool")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_promoted_by_hand_is_rewound() {
    let cluster = Cluster::formation(&["node_a", "node_b"], STEP);
    let monitor_uri = cluster.monitor_uri();
    let router = cluster.start_router("router", "pause_timeout_ms = 30000");
    let uri = router.uri("appdb");
    wait_writable(&uri, STEP).await;
    connect(&uri)
        .await
        .expect("connect through the router")
        .batch_execute("CREATE TABLE t (id bigint PRIMARY KEY); INSERT INTO t VALUES (1)")
        .await
        .expect("create a table");
    wait_caught_up(&cluster, "node_a", "node_b", "t").await;
    let first = last_event_id(&monitor_uri).await;
    let node_a_port = i32::from(cluster.node("node_a").port);

    // Behind the monitor's back: node_b becomes a primary of its own.
    let pgdata = cluster.node("node_b").pgdata;
    let out = pg_tool(
        "pg_ctl",
        &["promote", "--wait", "--pgdata", &pgdata.to_string_lossy()],
    );
    assert!(
        out.status.success(),
        "pg_ctl promote: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let promoted = Instant::now();
    // It takes writes now (unless its keeper already stopped it).
    let diverged_write = match connect(&direct_uri(&cluster, "node_b")).await {
        Ok(c) => c.execute("INSERT INTO t VALUES (-1)", &[]).await.is_ok(),
        Err(_) => false,
    };

    // The monitor names the divergence; the router stays on node_a.
    let mut noticed = None;
    let mut marked_in_show = false;
    let mut routed = 0;
    let deadline = Instant::now() + STEP;
    while Instant::now() < deadline {
        let events = events_since(&monitor_uri, first).await;
        if noticed.is_none() && events.iter().any(|e| e.contains("(node_b) diverged")) {
            noticed = Some(promoted.elapsed());
        }
        let show = cluster.run(&["show", "state", "--pgdata", "./monitor", "--json"]);
        let json: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap_or_default();
        if json
            .as_array()
            .into_iter()
            .flatten()
            .any(|n| n["name"] == "node_b" && n["diverged"].is_string())
        {
            marked_in_show = true;
        }
        if let Ok(client) = connect(&uri).await {
            if let Ok(row) = client
                .query_one("SELECT inet_server_port(), pg_is_in_recovery()", &[])
                .await
            {
                let port: Option<i32> = row.get(0);
                assert_eq!(
                    port,
                    Some(node_a_port),
                    "the router sent a session to the diverged node_b"
                );
                routed += 1;
            }
        }
        let states = cluster.states();
        let back = states
            .get("node_b")
            .is_some_and(|(r, g)| r == "secondary" && g == "secondary");
        if noticed.is_some() && back {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rejoined = promoted.elapsed();
    let events = events_since(&monitor_uri, first).await;
    eprintln!(
        "promoted by hand: divergence in the events after {noticed:?}, marked in show state: {marked_in_show}, \
         node_b secondary again after {rejoined:?}; {routed} sessions through the router, all on node_a; \
         write taken while diverged: {diverged_write}\nevents:\n  {}",
        events.join("\n  ")
    );
    let noticed = noticed.unwrap_or_else(|| {
        panic!(
            "no event names node_b's divergence:\n{}\n{}",
            events.join("\n"),
            cluster.all_logs()
        )
    });
    assert!(
        noticed < Duration::from_secs(5),
        "noticed after {noticed:?}"
    );
    assert!(marked_in_show, "show state never marked node_b diverged");
    cluster.wait_states(&[("node_a", "primary"), ("node_b", "secondary")], STEP);
    assert!(
        events
            .iter()
            .any(|e| e.contains("(node_b) rejoins the primary") && e.contains("by pg_rewind")),
        "node_b was not rewound:\n{}",
        events.join("\n")
    );
    assert!(
        !events.iter().any(|e| e.contains("by pg_basebackup")),
        "node_b was copied again:\n{}",
        events.join("\n")
    );
    // It follows node_a again, without the write it took on its own.
    connect(&uri)
        .await
        .expect("connect through the router")
        .execute("INSERT INTO t VALUES (2)", &[])
        .await
        .expect("write through the router");
    wait_caught_up(&cluster, "node_a", "node_b", "t").await;
    let b = connect(&direct_uri(&cluster, "node_b"))
        .await
        .expect("connect to node_b");
    let row = b
        .query_one(
            "SELECT pg_is_in_recovery(), count(*) FILTER (WHERE id = -1) FROM t",
            &[],
        )
        .await
        .expect("read node_b");
    assert!(row.get::<_, bool>(0), "node_b is not a standby");
    assert_eq!(
        row.get::<_, i64>(1),
        0,
        "node_b kept the write it took while diverged"
    );
    cluster.terminate(&router.name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_primary_with_lost_writes_is_rewound() {
    let cluster = Cluster::formation(&["node_a", "node_b"], STEP);
    let monitor_uri = cluster.monitor_uri();
    let a = connect(&direct_uri(&cluster, "node_a"))
        .await
        .expect("connect to node_a");
    a.batch_execute("CREATE TABLE lost (id bigint PRIMARY KEY); INSERT INTO lost VALUES (1)")
        .await
        .expect("create a table");
    wait_caught_up(&cluster, "node_a", "node_b", "lost").await;

    // node_a's WAL sender to node_b stops sending; a commit that does not
    // wait for the standby is on node_a alone when node_a powers off.
    let sender: i32 = a
        .query_one(
            "SELECT pid FROM pg_stat_replication WHERE application_name LIKE 'pgautofailover_standby_%'",
            &[],
        )
        .await
        .expect("find the WAL sender")
        .get(0);
    hapg::drill::signal_all(&[sender], nix::sys::signal::Signal::SIGSTOP);
    a.batch_execute("SET synchronous_commit = local; INSERT INTO lost VALUES (42)")
        .await
        .expect("commit on node_a alone");
    let first = last_event_id(&monitor_uri).await;
    cluster.power_off("node_a");
    cluster.wait_states(&[("node_b", "wait_primary")], STEP);
    assert_eq!(
        rows(&direct_uri(&cluster, "node_b"), "lost WHERE id = 42").await,
        Some(0),
        "node_b received the commit: the test cannot show a rewind"
    );

    let restarted = Instant::now();
    cluster.spawn("node_a", &["run", "--pgdata", "./node_a"]);
    cluster.wait_states(&[("node_b", "primary"), ("node_a", "secondary")], STEP);
    let back = restarted.elapsed();
    let events = events_since(&monitor_uri, first).await;
    eprintln!(
        "old primary: node_a secondary {back:?} after `hapg run`\nevents:\n  {}",
        events.join("\n  ")
    );
    assert!(
        events
            .iter()
            .any(|e| e.contains("(node_a) rejoins the primary") && e.contains("by pg_rewind")),
        "node_a was not rewound:\n{}",
        events.join("\n")
    );
    assert!(
        !events.iter().any(|e| e.contains("by pg_basebackup")),
        "node_a was copied again:\n{}",
        events.join("\n")
    );
    let b = connect(&direct_uri(&cluster, "node_b"))
        .await
        .expect("connect to node_b");
    b.execute("INSERT INTO lost VALUES (2)", &[])
        .await
        .expect("write on the new primary");
    wait_caught_up(&cluster, "node_b", "node_a", "lost").await;
    assert_eq!(
        rows(&direct_uri(&cluster, "node_a"), "lost WHERE id = 42").await,
        Some(0),
        "node_a kept the commit the new primary never had"
    );
}
