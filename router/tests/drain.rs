//! The switchover drain, router side, against real Postgres 15 instances with
//! the monitor's rows played by the tests (see support/mod.rs): the router
//! holds new transactions, lets open ones finish, cuts what outlives
//! `router.drain_timeout_ms`, acknowledges with `hapg.router.drained_at`, and
//! resumes on the new primary, or on the old one when the request is withdrawn.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// How long an acknowledgement may take when nothing holds the drain: far
/// more than a busy machine needs, far less than the drain timeout (120 s)
/// the tests that use it set, so that an ack within it is not the timeout's.
const ACK_BOUND: Duration = Duration::from_secs(30);

fn code(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("no sqlstate: {e}"))
}

/// Waits until no backend of `pg` is idle in a transaction.
async fn no_open_transaction(admin: &tokio_postgres::Client) {
    let start = Instant::now();
    loop {
        let open: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if open == 0 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "a transaction stayed open on the old primary"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until a statement matching `pattern` runs on `pg`.
async fn wait_active(admin: &tokio_postgres::Client, pattern: &str) {
    let start = Instant::now();
    loop {
        let running: bool = admin
            .query_one(
                "SELECT count(*) > 0 FROM pg_stat_activity
                  WHERE state = 'active' AND query LIKE $1 AND pid <> pg_backend_pid()",
                &[&pattern],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if running {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the statement never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_routed_epoch(monitor: &Monitor, epoch: i64) {
    let start = Instant::now();
    while monitor.routed_epoch().await != Some(epoch) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "routed_epoch never became {epoch}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_waits_for_an_open_transaction_to_commit_before_acknowledging() {
    // A drain timeout far beyond the bound below: an ack within the bound
    // comes from the commit, never from the timeout's cut.
    let c = Cluster::start(
        true,
        "pause_timeout_ms = 60000\ndrain_timeout_ms = 120000",
        "",
    )
    .await;
    let b_port = c.b.as_ref().expect("b").port;
    let admin = c.a.connect("postgres").await;
    admin
        .batch_execute("CREATE TABLE drained (id int)")
        .await
        .expect("create table");
    let open = connect(&c.router.url("postgres")).await.expect("connect");
    open.batch_execute("BEGIN; INSERT INTO drained VALUES (1)")
        .await
        .expect("open a transaction");
    let other = connect(&c.router.url("postgres")).await.expect("connect");
    assert_eq!(server_port(&other).await.expect("query"), c.a.port);

    c.monitor.request_switchover().await;
    c.router.wait_routing("draining", |r| r.draining()).await;
    let waiting = tokio::spawn(async move {
        let port = server_port(&other).await;
        (port, other)
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !c.monitor.drain_acked().await,
        "acknowledged while a transaction is open"
    );
    assert!(!waiting.is_finished(), "a new transaction must wait");
    // The open transaction goes on during the drain, and commits.
    open.batch_execute("INSERT INTO drained VALUES (2)")
        .await
        .expect("the open transaction goes on during the drain");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!c.monitor.drain_acked().await);
    open.batch_execute("COMMIT")
        .await
        .expect("commit during the drain");
    let acked_after = c.monitor.wait_drain_acked(ACK_BOUND).await;
    eprintln!("drain acknowledged {acked_after:?} after the commit");
    let count: i64 = admin
        .query_one("SELECT count(*) FROM drained", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 2, "the transaction committed on the old primary");
    assert!(!waiting.is_finished(), "still held after the ack");

    // The monitor goes on: A stops, B is the primary of epoch 2.
    c.monitor.proceed_with_switchover(c.node_a).await;
    c.move_primary_to_b().await;
    let (port, _other) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("resumes")
        .expect("task");
    assert_eq!(port.expect("the held statement ran"), b_port);
    assert_eq!(
        server_port(&open).await.expect("idle session rerouted"),
        b_port
    );
    wait_routed_epoch(&c.monitor, 2).await;
    c.router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_transactions_wait_during_the_drain_and_resume_on_the_new_primary() {
    // As above: an ack within ACK_BOUND is not the drain timeout's.
    let c = Cluster::start(
        true,
        "pause_timeout_ms = 60000\ndrain_timeout_ms = 120000",
        "",
    )
    .await;
    let b_port = c.b.as_ref().expect("b").port;
    let simple = connect(&c.router.url("postgres")).await.expect("connect");
    let extended = connect(&c.router.url("postgres")).await.expect("connect");
    assert_eq!(server_port(&simple).await.expect("query"), c.a.port);
    assert_eq!(server_port(&extended).await.expect("query"), c.a.port);

    c.monitor.request_switchover().await;
    // Nothing is open: the router acknowledges without waiting for anything.
    let acked_after = c.monitor.wait_drain_acked(ACK_BOUND).await;
    eprintln!("idle router acknowledged the drain in {acked_after:?}");
    assert!(c.router.router.routing().draining());

    let simple_wait = tokio::spawn(async move {
        let r = simple
            .simple_query("SELECT current_setting('port')")
            .await
            .map(|m| {
                m.iter()
                    .find_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                        _ => None,
                    })
                    .unwrap_or_default()
            });
        (r, simple)
    });
    let extended_wait = tokio::spawn(async move {
        let r = extended.query_one("SELECT $1::int + 1", &[&41i32]).await;
        (r.map(|row| row.get::<_, i32>(0)), extended)
    });
    // A client that logs in during the drain completes its login.
    let late = tokio::time::timeout(Duration::from_secs(3), connect(&c.router.url("postgres")))
        .await
        .expect("startup completes during the drain")
        .expect("login during the drain");
    let late_wait = tokio::spawn(async move {
        let port = server_port(&late).await;
        (port, late)
    });
    // last_seen goes on while paused, and routed_epoch stays the drained one.
    let (seen, epoch) = c.monitor.router_row().await.expect("registered");
    assert_eq!(epoch, 1);
    let start = Instant::now();
    loop {
        let (seen_later, epoch_later) = c.monitor.router_row().await.expect("registered");
        assert_eq!(epoch_later, 1);
        if seen_later > seen + 0.5 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "last_seen did not advance while paused ({seen} -> {seen_later})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (what, done) in [
        ("simple", simple_wait.is_finished()),
        ("extended", extended_wait.is_finished()),
        ("late", late_wait.is_finished()),
    ] {
        assert!(!done, "the {what} statement must wait during the drain");
    }
    // The monitor stops A: still paused.
    c.monitor.proceed_with_switchover(c.node_a).await;
    c.router
        .wait_routing("request cleared, primary draining", |r| {
            !r.draining() && r.paused()
        })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!simple_wait.is_finished(), "A is not writable: must wait");
    // B becomes the writable primary of epoch 2: everyone resumes there.
    let resumed_at = Instant::now();
    c.move_primary_to_b().await;
    let (port, _s) = tokio::time::timeout(Duration::from_secs(10), simple_wait)
        .await
        .expect("resumes")
        .expect("task");
    assert_eq!(port.expect("simple statement ran"), b_port.to_string());
    let (value, _e) = tokio::time::timeout(Duration::from_secs(10), extended_wait)
        .await
        .expect("resumes")
        .expect("task");
    assert_eq!(value.expect("extended statement ran"), 42);
    let (port, _l) = tokio::time::timeout(Duration::from_secs(10), late_wait)
        .await
        .expect("resumes")
        .expect("task");
    assert_eq!(port.expect("late client's statement ran"), b_port);
    eprintln!(
        "resumed {:?} after epoch 2 was published",
        resumed_at.elapsed()
    );
    wait_routed_epoch(&c.monitor, 2).await;
    c.router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_longer_than_the_drain_timeout_is_cut_and_the_session_goes_on() {
    let c = Cluster::start(true, "pause_timeout_ms = 20000\ndrain_timeout_ms = 700", "").await;
    let b_port = c.b.as_ref().expect("b").port;
    let admin = c.a.connect("postgres").await;
    admin
        .batch_execute("CREATE TABLE cut_rows (id int)")
        .await
        .expect("create table");
    // One session idle in a transaction, one running a long statement.
    let idle_tx = connect(&c.router.url("postgres")).await.expect("connect");
    idle_tx
        .batch_execute("BEGIN; INSERT INTO cut_rows VALUES (1)")
        .await
        .expect("open a transaction");
    let running = connect(&c.router.url("postgres")).await.expect("connect");
    let long = tokio::spawn(async move {
        let r = running.simple_query("SELECT pg_sleep(20)").await;
        (r, running)
    });
    wait_active(&admin, "%pg_sleep(20)%").await;

    let requested = Instant::now();
    c.monitor.request_switchover().await;
    let (result, running) = tokio::time::timeout(Duration::from_secs(10), long)
        .await
        .expect("the long statement is cut well before it ends")
        .expect("task");
    let cut_after = requested.elapsed();
    let err = result.expect_err("cut by the drain");
    assert_eq!(code(&err), "57P01", "{err:?}");
    let db = err.as_db_error().expect("db error");
    assert_eq!(db.severity(), "ERROR");
    assert!(
        db.message()
            .contains("switchover interrupted this statement")
            && db.message().contains("may or may not have completed"),
        "{}",
        db.message()
    );
    assert!(
        cut_after >= Duration::from_millis(600),
        "cut before the drain timeout: {cut_after:?}"
    );
    c.monitor.wait_drain_acked(Duration::from_secs(5)).await;
    eprintln!(
        "cut after {cut_after:?}, acknowledged {:?} after the request",
        requested.elapsed()
    );

    // The idle transaction was rolled back on A; its next statement says so.
    no_open_transaction(&admin).await;
    let count: i64 = admin
        .query_one("SELECT count(*) FROM cut_rows", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 0, "the cut transaction must not commit");
    let err = idle_tx
        .batch_execute("INSERT INTO cut_rows VALUES (2)")
        .await
        .expect_err("the transaction was cut");
    assert_eq!(code(&err), "57P01", "{err:?}");
    let db = err.as_db_error().expect("db error");
    assert_eq!(db.severity(), "ERROR");
    assert!(
        db.message()
            .contains("switchover interrupted this transaction")
            && db.message().contains("rolled back"),
        "{}",
        db.message()
    );

    // The cut transaction stays failed until the client ends it; the
    // router answers the ROLLBACK itself, without a primary.
    let err = idle_tx
        .batch_execute("SELECT 1")
        .await
        .expect_err("still failed");
    assert_eq!(code(&err), "57P01", "{err:?}");
    idle_tx.batch_execute("ROLLBACK").await.expect("rollback");

    // Both sessions go on: their next statements wait for the new primary.
    let next_idle = tokio::spawn(async move {
        let port = server_port(&idle_tx).await;
        (port, idle_tx)
    });
    let next_running = tokio::spawn(async move {
        let port = server_port(&running).await;
        (port, running)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!next_idle.is_finished() && !next_running.is_finished());
    c.monitor.proceed_with_switchover(c.node_a).await;
    c.move_primary_to_b().await;
    for task in [next_idle, next_running] {
        let (port, _client) = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("resumes")
            .expect("task");
        assert_eq!(port.expect("the session goes on"), b_port);
    }
    c.router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_switchover_resumes_on_the_old_primary() {
    let c = Cluster::start(true, "pause_timeout_ms = 20000", "").await;
    let client = connect(&c.router.url("postgres")).await.expect("connect");
    let pid = |client: tokio_postgres::Client| async move {
        let r = client
            .query_one("SELECT current_setting('port')::int, pg_backend_pid()", &[])
            .await
            .map(|r| (r.get::<_, i32>(0) as u16, r.get::<_, i32>(1)));
        (r, client)
    };
    let (first, client) = pid(client).await;
    let (port, backend) = first.expect("query");
    assert_eq!(port, c.a.port);

    let mut client = client;
    for round in 0..2 {
        c.monitor.request_switchover().await;
        c.monitor.wait_drain_acked(Duration::from_secs(5)).await;
        let waiting = tokio::spawn(pid(client));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !waiting.is_finished(),
            "round {round}: must wait during the drain"
        );
        // The monitor gives up: no epoch change, no notification; the
        // router's periodic re-read notices.
        let abandoned = Instant::now();
        c.monitor.abandon_switchover().await;
        // Resumed, not failed: a statement still waiting at pause_timeout_ms
        // (20 s) would end with 57P03. The timeout only bounds a hang.
        let (r, back) = tokio::time::timeout(Duration::from_secs(60), waiting)
            .await
            .expect("resumes")
            .expect("task");
        let resumed = abandoned.elapsed();
        eprintln!("round {round}: resumed {resumed:?} after the switchover was abandoned");
        assert_eq!(
            r.expect("resumed on the old primary"),
            (c.a.port, backend),
            "round {round}: same server connection"
        );
        assert!(!c.router.router.routing().draining());
        client = back;
    }
    assert_eq!(c.monitor.routed_epoch().await, Some(1));
    c.router.stop().await;
}
