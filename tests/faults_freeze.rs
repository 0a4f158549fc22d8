//! A primary node frozen for long (SIGSTOP of its keeper and every Postgres
//! process): the standby takes over; on thaw the old primary never
//! acknowledges a write, and it rejoins as a standby.

mod support;

use std::time::Duration;

use nix::sys::signal::Signal;
use support::{connect, postmaster_pid, Cluster, Writer};

const STEP: Duration = Duration::from_secs(120);

/// The node's hapg process, its postmaster and the postmaster's children.
fn node_pids(cluster: &Cluster, name: &str) -> Vec<i32> {
    let mut pids: Vec<i32> = cluster.keeper_pid(name).into_iter().collect();
    if let Some(postmaster) = postmaster_pid(&cluster.node(name).pgdata) {
        pids.extend(hapg::drill::process_tree(postmaster));
    }
    pids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_freeze_fails_over_and_the_thawed_primary_never_takes_a_write() {
    let cluster = Cluster::formation(&["node_a", "node_b"], STEP);
    let uri = cluster.app_uri();
    connect(&uri)
        .await
        .expect("connect")
        .batch_execute("CREATE TABLE t (id bigint PRIMARY KEY)")
        .await
        .expect("create table");
    let writer = Writer::start(uri.clone(), "t", Duration::from_secs(600));
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Connect to node_a directly before the freeze, as a client that does not
    // follow the monitor would.
    let node_a = cluster.node("node_a");
    let stale = connect(&format!(
        "postgres://postgres@localhost:{}/appdb",
        node_a.port
    ))
    .await
    .expect("connect to node_a");

    let pids = node_pids(&cluster, "node_a");
    hapg::drill::signal_all(&pids, Signal::SIGSTOP);
    cluster.wait_states(&[("node_b", "wait_primary")], STEP);

    // Thaw: the old primary runs again for a moment before its keeper hears it
    // was demoted. A write sent to it now must never be acknowledged.
    hapg::drill::signal_all(&pids, Signal::SIGCONT);
    let attempt = tokio::time::timeout(
        Duration::from_secs(10),
        stale.execute("INSERT INTO t VALUES (-1)", &[]),
    )
    .await;
    assert!(
        !matches!(attempt, Ok(Ok(_))),
        "the thawed old primary acknowledged a write"
    );
    cluster.wait_states(&[("node_b", "primary"), ("node_a", "secondary")], STEP);

    let report = writer.finish().await;
    let lost = hapg::drill::lost_writes(&uri, "t", &report.acked)
        .await
        .expect("read rows");
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    let stray: i64 = connect(&uri)
        .await
        .expect("connect")
        .query_one("SELECT count(*) FROM t WHERE id = -1", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        stray, 0,
        "the write sent to the thawed old primary is not on the new primary"
    );
    eprintln!(
        "long freeze: {} writes acknowledged, {} errors, longest gap {:?}",
        report.acked.len(),
        report.errors,
        report.longest_gap
    );
}
