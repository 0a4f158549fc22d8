//! The 16 MiB rule end to end: when the primary of a three-node group is
//! powered off and even the most advanced standby is further behind the old
//! primary's last report than `wal_threshold_bytes`, the monitor does not
//! promote anyone and says why; once the old primary is back, it is the
//! primary again. Real PostgreSQL 15 and `hapg` processes.

mod support;

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::{connect, direct_uri, Cluster};

const STEP: Duration = Duration::from_secs(120);

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

/// The pid of `name`'s WAL receiver.
async fn receiver_pid(cluster: &Cluster, name: &str) -> Pid {
    let client = connect(&direct_uri(cluster, name))
        .await
        .expect("connect to the standby");
    let pid: i32 = client
        .query_one("SELECT pid FROM pg_stat_wal_receiver", &[])
        .await
        .expect("the standby streams")
        .get(0);
    Pid::from_raw(pid)
}

/// `name`'s LSN as the monitor last heard it, in bytes.
fn reported_lsn(cluster: &Cluster, name: &str) -> u64 {
    let out = cluster.ok(&["show", "state", "--pgdata", "./monitor", "--json"]);
    let nodes: serde_json::Value = serde_json::from_str(&out).expect("json");
    let lsn = nodes
        .as_array()
        .and_then(|n| n.iter().find(|n| n["name"] == name))
        .and_then(|n| n["lsn"].as_str())
        .unwrap_or("0/0")
        .to_string();
    let (hi, lo) = lsn.split_once('/').unwrap_or(("0", "0"));
    (u64::from_str_radix(hi, 16).unwrap_or(0) << 32) | u64::from_str_radix(lo, 16).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_standby_far_behind_the_lost_primary_is_promoted() {
    let cluster = Cluster::formation(&["node_a", "node_b", "node_c"], STEP);
    let primary = connect(&direct_uri(&cluster, "node_a"))
        .await
        .expect("connect to the primary");
    primary
        .batch_execute("CREATE TABLE t (id bigint PRIMARY KEY); INSERT INTO t VALUES (1)")
        .await
        .expect("a committed row");

    // Both standbys stop receiving; the primary writes 40 MB of WAL in a
    // transaction that never commits (a commit would wait for a standby),
    // and reports its LSN that far ahead.
    let receivers = [
        receiver_pid(&cluster, "node_b").await,
        receiver_pid(&cluster, "node_c").await,
    ];
    for pid in receivers {
        kill(pid, Signal::SIGSTOP).expect("stop a WAL receiver");
    }
    let before = reported_lsn(&cluster, "node_a");
    primary
        .batch_execute(
            "BEGIN; CREATE TABLE filler AS
               SELECT repeat('x', 1000) AS pad FROM generate_series(1, 40000);",
        )
        .await
        .expect("an open transaction's WAL");
    cluster.eventually("the primary to report its LSN 32 MiB ahead", STEP, || {
        reported_lsn(&cluster, "node_a") > before + 32 * 1024 * 1024
    });

    cluster.power_off("node_a");
    for pid in receivers {
        kill(pid, Signal::SIGCONT).expect("resume a WAL receiver");
    }
    cluster.eventually("the monitor to refuse the election", STEP, || {
        cluster
            .ok(&["show", "events", "--pgdata", "./monitor", "--count", "30"])
            .contains("of WAL behind the old primary's last report, over the")
    });
    // Nobody is promoted while it stays so (past the unhealthy timeout and
    // the monitor's reaction, with margin).
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(8) {
        let states = cluster.states();
        for name in ["node_b", "node_c"] {
            let goal = states.get(name).map(|s| s.1.as_str()).unwrap_or("");
            assert!(
                !WRITABLE.contains(&goal),
                "{name} was assigned {goal} though it is over 16 MiB behind: {states:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    // The old primary back: it takes writes again, and its committed row is there.
    cluster.spawn("node_a", &["run", "--pgdata", "./node_a"]);
    cluster.eventually("a writable primary again", STEP, || {
        cluster.states().values().any(|(reported, goal)| {
            reported == goal && (goal == "primary" || goal == "wait_primary")
        })
    });
    let count: i64 = connect(&cluster.app_uri())
        .await
        .expect("connect")
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 1);
}
