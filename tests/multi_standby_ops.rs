//! Three nodes, continued: on equal priority the most advanced standby wins,
//! maintenance of the primary moves the primary away and back, and a
//! switchover with a node powered off does not wait for that node.

mod support;

use std::time::Duration;

use support::{connect, Cluster};

const STEP: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn most_advanced_wins_and_primary_maintenance() {
    let cluster = Cluster::formation(&["node_a", "node_b", "node_c"], STEP);
    let uri = cluster.app_uri();
    connect(&uri)
        .await
        .expect("connect")
        .batch_execute("CREATE TABLE t (id bigint PRIMARY KEY)")
        .await
        .expect("create table");

    // Maintenance on the primary: a standby takes over; back from maintenance,
    // the old primary follows; promoted again, it is the primary again.
    cluster.ok(&[
        "enable",
        "maintenance",
        "--pgdata",
        "./node_a",
        "--allow-failover",
    ]);
    cluster.wait_states(&[("node_a", "maintenance")], STEP);
    let states = cluster.states();
    let new_primary = ["node_b", "node_c"]
        .into_iter()
        .find(|n| states[*n].1 == "wait_primary" || states[*n].1 == "primary")
        .unwrap_or_else(|| panic!("no standby took over: {states:?}"));
    cluster.ok(&["disable", "maintenance", "--pgdata", "./node_a"]);
    cluster.wait_states(&[("node_a", "secondary"), (new_primary, "primary")], STEP);
    cluster.ok(&[
        "perform",
        "promotion",
        "--pgdata",
        "./monitor",
        "--name",
        "node_a",
    ]);
    cluster.wait_states(
        &[
            ("node_a", "primary"),
            ("node_b", "secondary"),
            ("node_c", "secondary"),
        ],
        STEP,
    );

    // Equal priorities: node_b stops receiving WAL, node_c gets more; the
    // primary fails; node_c, the most advanced, wins.
    let node_b = cluster.node("node_b");
    let client = connect(&format!(
        "postgres://postgres@localhost:{}/postgres",
        node_b.port
    ))
    .await
    .expect("connect to node_b");
    let receiver: i32 = client
        .query_one("SELECT pid FROM pg_stat_wal_receiver", &[])
        .await
        .expect("node_b streams")
        .get(0);
    let pid = nix::unistd::Pid::from_raw(receiver);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("stop the receiver");
    let writer = connect(&uri).await.expect("connect to the primary");
    for id in 0..100_i64 {
        writer
            .execute("INSERT INTO t VALUES ($1)", &[&id])
            .await
            .expect("write acknowledged by node_c");
    }
    // More WAL than socket buffers hold, so node_b cannot catch up from
    // what the kernel buffered for its stopped receiver.
    writer
        .batch_execute(
            "CREATE TABLE filler AS SELECT repeat('x', 1000) AS pad FROM generate_series(1, 30000)",
        )
        .await
        .expect("filler acknowledged by node_c");
    cluster.power_off("node_a");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("resume the receiver");
    cluster.wait_states(&[("node_c", "primary"), ("node_b", "secondary")], STEP);
    let events = cluster.ok(&["show", "events", "--pgdata", "./monitor", "--count", "60"]);
    assert!(events.contains("(node_c) is elected"), "{events}");
    let count: i64 = connect(&uri)
        .await
        .expect("connect to node_c")
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 100, "every acknowledged write is on the new primary");

    // A switchover while node_a is still powered off: it succeeds once the new
    // primary is in place and node_c follows it, and says it did not wait for
    // node_a, which can neither report nor converge.
    let out = cluster.ok(&[
        "perform",
        "switchover",
        "--pgdata",
        "./monitor",
        "--wait",
        "60",
    ]);
    assert!(out.contains("did not wait for node_a"), "{out}");
    let states = cluster.states();
    assert_eq!(
        states["node_b"],
        ("primary".into(), "primary".into()),
        "{states:?}"
    );
    assert_eq!(
        states["node_c"],
        ("secondary".into(), "secondary".into()),
        "{states:?}"
    );
}
