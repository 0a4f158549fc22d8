//! The tutorial (../shared/reference/tutorial.md) steps 1-9, end to end, with
//! real hapg processes and real PostgreSQL 15: data and a live writer through
//! the router during the switchover and the node failure (and a second writer
//! on the formation's multi-host URI, as applications without the router use
//! it), and every acknowledged write checked at the end.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use support::{connect, wait_writable, Cluster, Writer};

const STEP: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tutorial_two_nodes_switchover_failure_and_rejoin() {
    let mut cluster = Cluster::new();

    // 1. Monitor.
    cluster.start_monitor();
    let uri_table = cluster.ok(&["show", "uri", "--pgdata", "./monitor"]);
    assert!(uri_table.contains("monitor"), "{uri_table}");
    let unit = cluster.ok(&["show", "systemd", "--pgdata", "./monitor"]);
    assert!(
        unit.contains("ExecStart") && unit.contains("run --pgdata"),
        "{unit}"
    );
    assert!(unit.contains("Restart = always"), "{unit}");

    // 2. Node A: alone, it becomes single.
    cluster.start_node("node_a");
    cluster.wait_states(&[("node_a", "single")], STEP);

    // 3. Node B joins: primary / secondary.
    cluster.start_node("node_b");
    cluster.wait_states(&[("node_a", "primary"), ("node_b", "secondary")], STEP);
    let table = cluster.ok(&["show", "state", "--pgdata", "./monitor"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].contains("Name |  Node |")
            && lines[0].contains("Reported State |      Assigned State"),
        "{table}"
    );
    assert!(
        lines[2].starts_with("node_a |") && lines[2].contains("read-write"),
        "{table}"
    );
    assert!(
        lines[3].starts_with("node_b |") && lines[3].contains("read-only"),
        "{table}"
    );
    let standby_names = cluster.ok(&["show", "standby-names", "--pgdata", "./monitor"]);
    assert!(
        standby_names.contains("ANY 1 (pgautofailover_standby_2)"),
        "{standby_names}"
    );

    let uri = cluster.formation_uri();
    assert!(
        uri.contains("target_session_attrs=read-write") && uri.contains("/appdb?"),
        "{uri}"
    );
    // The URI names no user: applications add theirs, as the tutorial's psql does.
    let multi_host = uri.replacen("postgres://", "postgres://postgres@", 1);

    // 4. Router.
    let router = cluster.start_router("router", "");
    let uri = format!("postgres://postgres@127.0.0.1:{}/appdb", router.port);
    // `show uri` lists the router once it has registered with the monitor,
    // which it does just after it starts listening.
    cluster.eventually(
        "show uri to list the router once it registered",
        Duration::from_secs(30),
        || {
            cluster
                .ok(&["show", "uri", "--pgdata", "./monitor"])
                .contains("router")
        },
    );

    // 5. Data, through the router.
    let client = connect(&uri)
        .await
        .expect("connect through the multi-host URI");
    client
        .batch_execute(
            "CREATE TABLE foo AS SELECT generate_series(1, 1000000) bar;
             CREATE TABLE writes (id bigint PRIMARY KEY);",
        )
        .await
        .expect("create tables");
    drop(client);

    // 6. Switchover under live writers.
    connect(&multi_host)
        .await
        .expect("connect through the multi-host URI")
        .batch_execute("CREATE TABLE direct_writes (id bigint PRIMARY KEY)")
        .await
        .expect("create table");
    let writer = Writer::start(uri.clone(), "writes", Duration::from_secs(600));
    let direct = Writer::start(
        multi_host.clone(),
        "direct_writes",
        Duration::from_secs(600),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    cluster.ok(&["perform", "switchover", "--pgdata", "./monitor"]);
    let switchover_time = started.elapsed();
    cluster.wait_states(&[("node_a", "secondary"), ("node_b", "primary")], STEP);
    let count: i64 = connect(&uri)
        .await
        .expect("connect")
        .query_one("SELECT count(*) FROM foo", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 1_000_000);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 7. Power node B (the primary now) off: A takes over.
    let before_failure = Instant::now();
    cluster.power_off("node_b");
    cluster.wait_states(&[("node_a", "wait_primary")], STEP);
    wait_writable(&uri, STEP).await;
    let failover_time = before_failure.elapsed();
    let states = cluster.states();
    assert_eq!(states["node_b"].1, "demoted", "{states:?}");
    let client = connect(&uri).await.expect("connect to node A");
    client
        .batch_execute("INSERT INTO foo SELECT generate_series(1000001, 2000000)")
        .await
        .expect("insert while B is down");
    drop(client);

    // 8. Resurrect node B: it rewinds, follows A, and A is primary again.
    cluster.spawn("node_b", &["run", "--pgdata", "./node_b"]);
    cluster.wait_states(&[("node_a", "primary"), ("node_b", "secondary")], STEP);

    // 9. Check.
    let report = writer.finish().await;
    let direct_report = direct.finish().await;
    let direct_lost = hapg::drill::lost_writes(&uri, "direct_writes", &direct_report.acked)
        .await
        .expect("read direct writes");
    assert!(
        direct_lost.is_empty(),
        "acknowledged writes lost: {direct_lost:?}"
    );
    let client = connect(&uri).await.expect("connect");
    let count: i64 = client
        .query_one("SELECT count(*) FROM foo", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 2_000_000);
    let present: HashSet<i64> = client
        .query("SELECT id FROM writes", &[])
        .await
        .expect("read writes")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let lost: Vec<&i64> = report
        .acked
        .iter()
        .filter(|id| !present.contains(id))
        .collect();
    assert!(
        lost.is_empty(),
        "acknowledged writes lost: {lost:?} (of {})",
        report.acked.len()
    );
    assert!(
        report.acked.len() > 50,
        "the writer barely wrote: {report:?}"
    );
    // Through the router, the switchover is a pause, not an error; the power-off
    // costs at most the statement in flight.
    assert!(
        report.errors <= 1,
        "client errors through the router: {report:?}"
    );
    eprintln!(
        "switchover {switchover_time:?}, power-off to writable {failover_time:?}; router: \
         {} writes acknowledged, {} client errors, longest gap {:?}; multi-host URI: {} acknowledged, \
         {} errors, longest gap {:?}",
        report.acked.len(),
        report.errors,
        report.longest_gap,
        direct_report.acked.len(),
        direct_report.errors,
        direct_report.longest_gap
    );

    // The events say what happened and why.
    let events = cluster.ok(&["show", "events", "--pgdata", "./monitor", "--count", "200"]);
    assert!(events.contains("Switchover requested"), "{events}");
    assert!(events.contains("is unhealthy: failing over"), "{events}");
    assert!(events.contains("rejoins as a standby"), "{events}");

    // `hapg stop` stops nodes and the monitor cleanly.
    for name in ["node_a", "node_b"] {
        let pgdata = format!("./{name}");
        cluster.ok(&["stop", "--pgdata", &pgdata]);
        assert!(support::postmaster_pid(&cluster.node(name).pgdata).is_none());
    }
    cluster.ok(&["stop", "--pgdata", "./monitor"]);
}
