//! The router never runs a client's statement on a server in recovery, even
//! when the monitor names it as the primary (a stale or wrong routing row): the
//! session waits for a writable primary, then fails with the reason; once a
//! writable primary is named, it runs there. Real PostgreSQL 15.

mod support;

use support::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_in_recovery_is_refused() {
    let cluster = Cluster::start(true, "pause_timeout_ms = 1500", "").await;
    let b = cluster.b.as_ref().expect("two nodes");
    b.restart_in_recovery();
    let direct = b.connect("postgres").await;
    let in_recovery: bool = direct
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .expect("ask node_b")
        .get(0);
    assert!(in_recovery, "setup: node_b is a standby");

    // The monitor names node_b, in recovery, writable in epoch 2.
    cluster.move_primary_to_b().await;
    cluster.router.wait_epoch(2).await;
    let client = support::connect(&cluster.router.url("postgres"))
        .await
        .expect("login is answered from the router's own settings");
    let err = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .expect_err("a standby never runs a session's statement");
    let db = err.as_db_error().expect("an error the router sends");
    assert_eq!(db.code().code(), "57P03", "{db:?}");
    assert!(
        db.message().contains("no primary") && db.detail().unwrap_or("").contains("in recovery")
            || db.message().contains("in recovery"),
        "the reason is given: {db:?}"
    );

    // A writable primary named again: the next session runs there.
    cluster
        .monitor
        .set_states(cluster.node_a, "wait_primary", "wait_primary")
        .await;
    cluster.monitor.set_primary(cluster.node_a, 3).await;
    cluster.router.wait_epoch(3).await;
    let client = support::connect(&cluster.router.url("postgres"))
        .await
        .expect("connect");
    let in_recovery: bool = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .expect("runs on node_a")
        .get(0);
    assert!(!in_recovery);
}
