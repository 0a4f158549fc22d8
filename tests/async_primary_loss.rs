//! A primary that replicated asynchronously is never failed over when it is
//! powered off (docs/failover.md, "Why nothing acknowledged is lost"): its
//! standby may lack writes it acknowledged, so writes stay unavailable until
//! it is back, rather than lost. Two real nodes, both ways a primary ends up
//! asynchronous: its only standby leaves the replication quorum, or its
//! standby is lost and it runs in `wait_primary`.

mod support;

use std::time::{Duration, Instant};

use support::{connect, Cluster};

const STEP: Duration = Duration::from_secs(90);

/// States in which a node takes, or is about to take, writes.
const WRITABLE: &[&str] = &[
    "single",
    "wait_primary",
    "primary",
    "join_primary",
    "apply_settings",
    "prepare_promotion",
    "stop_replication",
];

async fn write_rows(cluster: &Cluster, port: u16, ids: std::ops::Range<i64>) {
    let client = connect(&format!("postgres://postgres@localhost:{port}/appdb"))
        .await
        .expect("connect to the primary");
    for id in ids {
        client
            .execute("INSERT INTO t VALUES ($1)", &[&id])
            .await
            .unwrap_or_else(|e| panic!("write {id}: {e}; states {:?}", cluster.states()));
    }
}

/// Watches for `hold` that `name` is never assigned a writable state.
fn never_promoted(cluster: &Cluster, name: &str, hold: Duration) {
    let start = Instant::now();
    while start.elapsed() < hold {
        let states = cluster.states();
        if let Some((_, goal)) = states.get(name) {
            assert!(
                !WRITABLE.contains(&goal.as_str()),
                "{name} was assigned {goal} though the primary replicated asynchronously: {states:?}\n{}",
                cluster.ok(&["show", "events", "--pgdata", "./monitor", "--count", "20"])
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_asynchronous_primary_powered_off_is_not_failed_over() {
    let cluster = Cluster::formation(&["node_a", "node_b"], STEP);
    let a = cluster.node("node_a").port;
    connect(&format!("postgres://postgres@localhost:{a}/appdb"))
        .await
        .expect("connect")
        .batch_execute("CREATE TABLE t (id bigint PRIMARY KEY)")
        .await
        .expect("create table");

    // 1. The standby outside the quorum: the primary commits without it.
    cluster.ok(&[
        "set",
        "node",
        "replication-quorum",
        "--pgdata",
        "./node_b",
        "false",
    ]);
    cluster.eventually("synchronous_standby_names to empty", STEP, || {
        cluster
            .ok(&["show", "standby-names", "--pgdata", "./monitor"])
            .trim()
            == "''"
    });
    write_rows(&cluster, a, 0..20).await;
    cluster.power_off("node_a");
    cluster.eventually("the monitor to hold the failover", STEP, || {
        cluster
            .ok(&["show", "events", "--pgdata", "./monitor", "--count", "20"])
            .contains("is not promoted: the primary was primary with no synchronous replication")
    });
    never_promoted(&cluster, "node_b", Duration::from_secs(5));
    cluster.spawn("node_a", &["run", "--pgdata", "./node_a"]);
    cluster.wait_states(&[("node_a", "primary"), ("node_b", "secondary")], STEP);
    cluster.ok(&[
        "set",
        "node",
        "replication-quorum",
        "--pgdata",
        "./node_b",
        "true",
    ]);

    // 2. The standby lost first: the primary goes on alone in wait_primary,
    // then is powered off itself while the standby comes back.
    cluster.power_off("node_b");
    cluster.wait_states(&[("node_a", "wait_primary")], STEP);
    write_rows(&cluster, a, 20..40).await;
    cluster.power_off("node_a");
    cluster.spawn("node_b", &["run", "--pgdata", "./node_b"]);
    // The standby is back but behind what the primary acknowledged alone: no
    // rule may promote it, for well past the unhealthy timeout (3 s).
    never_promoted(&cluster, "node_b", Duration::from_secs(10));

    // The old primary back: it is the primary again and nothing it
    // acknowledged is missing.
    cluster.spawn("node_a", &["run", "--pgdata", "./node_a"]);
    cluster.wait_states(&[("node_a", "primary"), ("node_b", "secondary")], STEP);
    let count: i64 = connect(&cluster.app_uri())
        .await
        .expect("connect")
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 40, "every acknowledged write is there");
}
