//! Groups of three nodes with real PostgreSQL 15: elections by priority, a
//! lagging winner that fast-forwards first, priority 0 never promoted, perform
//! promotion, and number_sync_standbys keeping writes blocked rather than
//! silently asynchronous.

mod support;

use std::time::Duration;

use support::{connect, Cluster, Writer};

const STEP: Duration = Duration::from_secs(120);

async fn walreceiver_pid(cluster: &Cluster, name: &str) -> i32 {
    let node = cluster.node(name);
    let client = connect(&format!(
        "postgres://postgres@localhost:{}/postgres",
        node.port
    ))
    .await
    .expect("connect to the standby");
    client
        .query_one("SELECT pid FROM pg_stat_wal_receiver", &[])
        .await
        .expect("the standby streams")
        .get(0)
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).expect("signal");
}

/// Writes one row within `timeout`, or says it could not.
async fn try_write(uri: &str, value: i64, timeout: Duration) -> bool {
    let attempt = async {
        let client = connect(uri).await.ok()?;
        client
            .execute("INSERT INTO t VALUES ($1)", &[&value])
            .await
            .ok()
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elections_priorities_and_sync_standbys() {
    let cluster = Cluster::formation(&["node_a", "node_b", "node_c"], STEP);
    let settings = cluster.ok(&["show", "settings", "--pgdata", "./monitor"]);
    assert!(
        settings
            .lines()
            .any(|l| l.contains("number_sync_standbys") && l.trim_end().ends_with('1')),
        "the second quorum standby raises number_sync_standbys to 1:\n{settings}"
    );
    let names = cluster.ok(&["show", "standby-names", "--pgdata", "./monitor"]);
    assert!(
        names.contains("ANY 1 (pgautofailover_standby_2, pgautofailover_standby_3)"),
        "{names}"
    );
    let uri = cluster.app_uri();
    connect(&uri)
        .await
        .expect("connect")
        .batch_execute("CREATE TABLE t (id bigint PRIMARY KEY)")
        .await
        .expect("create table");

    // Election by priority: node_c (90) wins over node_b (50).
    cluster.ok(&[
        "set",
        "node",
        "candidate-priority",
        "--pgdata",
        "./monitor",
        "--name",
        "node_c",
        "90",
    ]);
    let writer = Writer::start(uri.clone(), "t", Duration::from_secs(600));
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.power_off("node_a");
    cluster.wait_states(&[("node_c", "primary"), ("node_b", "secondary")], STEP);
    cluster.spawn("node_a", &["run", "--pgdata", "./node_a"]);
    cluster.wait_states(
        &[
            ("node_c", "primary"),
            ("node_b", "secondary"),
            ("node_a", "secondary"),
        ],
        STEP,
    );
    let events = cluster.ok(&["show", "events", "--pgdata", "./monitor", "--count", "100"]);
    assert!(events.contains("(node_c) is elected"), "{events}");

    // A lagging high-priority standby fetches the missing WAL, then wins.
    cluster.ok(&[
        "set",
        "node",
        "candidate-priority",
        "--pgdata",
        "./monitor",
        "--name",
        "node_a",
        "95",
    ]);
    let receiver = walreceiver_pid(&cluster, "node_a").await;
    signal(receiver, nix::sys::signal::Signal::SIGSTOP);
    // node_b alone acknowledges these (ANY 1 of node_a, node_b).
    for id in 1_000_000..1_000_200 {
        assert!(
            try_write(&uri, id, Duration::from_secs(10)).await,
            "write {id}"
        );
    }
    // More WAL than socket buffers hold, so node_a cannot catch up from what
    // the kernel buffered for its stopped receiver.
    connect(&uri)
        .await
        .expect("connect")
        .batch_execute(
            "CREATE TABLE filler AS SELECT repeat('x', 1000) AS pad FROM generate_series(1, 30000)",
        )
        .await
        .expect("filler acknowledged by node_b");
    cluster.power_off("node_c");
    signal(receiver, nix::sys::signal::Signal::SIGCONT);
    cluster.wait_states(&[("node_a", "primary"), ("node_b", "secondary")], STEP);
    let events = cluster.ok(&["show", "events", "--pgdata", "./monitor", "--count", "100"]);
    assert!(
        events.lines().any(|l| l.contains("(node_a) is elected")
            && l.contains("lacks WAL")
            && l.contains("(node_b) first")),
        "{events}"
    );
    let report = writer.finish().await;
    let lost = hapg::drill::lost_writes(&uri, "t", &report.acked)
        .await
        .expect("read the rows");
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    let count: i64 = connect(&uri)
        .await
        .expect("connect")
        .query_one("SELECT count(*) FROM t WHERE id >= 1000000", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        count, 200,
        "the rows only node_b had are on the new primary"
    );
    cluster.spawn("node_c", &["run", "--pgdata", "./node_c"]);
    cluster.wait_states(
        &[
            ("node_a", "primary"),
            ("node_b", "secondary"),
            ("node_c", "secondary"),
        ],
        STEP,
    );

    // perform promotion of a chosen node.
    cluster.ok(&[
        "perform",
        "promotion",
        "--pgdata",
        "./monitor",
        "--name",
        "node_b",
    ]);
    cluster.wait_states(
        &[
            ("node_b", "primary"),
            ("node_a", "secondary"),
            ("node_c", "secondary"),
        ],
        STEP,
    );

    // Priority 0 is never promoted: with every standby at 0 the election waits,
    // and completes once an operator gives one a priority.
    cluster.ok(&[
        "set",
        "node",
        "candidate-priority",
        "--pgdata",
        "./monitor",
        "--name",
        "node_a",
        "0",
    ]);
    cluster.ok(&[
        "set",
        "node",
        "candidate-priority",
        "--pgdata",
        "./monitor",
        "--name",
        "node_c",
        "0",
    ]);
    cluster.power_off("node_b");
    cluster.eventually("the election to say no node can be promoted", STEP, || {
        cluster
            .ok(&["show", "events", "--pgdata", "./monitor", "--count", "20"])
            .contains("no standby with a candidate priority above 0")
    });
    cluster.ok(&[
        "set",
        "node",
        "candidate-priority",
        "--pgdata",
        "./monitor",
        "--name",
        "node_c",
        "50",
    ]);
    cluster.wait_states(&[("node_c", "primary"), ("node_a", "secondary")], STEP);

    // number_sync_standbys 1: with every standby gone, writes wait instead of
    // going asynchronous; 0 makes them available again.
    let uri = cluster.app_uri();
    assert!(try_write(&uri, 2_000_000, Duration::from_secs(10)).await);
    cluster.power_off("node_a");
    // The monitor has seen node_a gone (keeper silent past the unhealthy
    // timeout, Postgres unreachable) and decided since: had it made the
    // primary asynchronous, the write below would go through.
    let health = support::wait_monitor_saw_silence(
        &cluster.monitor_uri(),
        "node_a",
        support::UNHEALTHY_TIMEOUT + Duration::from_secs(1),
        STEP,
    )
    .await;
    assert_eq!(health, 0, "node_a is unhealthy for the monitor");
    assert!(
        !try_write(&uri, 2_000_001, Duration::from_secs(3)).await,
        "with number_sync_standbys 1 and no standby a write must wait"
    );
    cluster.ok(&[
        "set",
        "formation",
        "number-sync-standbys",
        "--pgdata",
        "./monitor",
        "0",
    ]);
    cluster.wait_states(&[("node_c", "wait_primary")], STEP);
    assert!(try_write(&uri, 2_000_002, Duration::from_secs(10)).await);
}
