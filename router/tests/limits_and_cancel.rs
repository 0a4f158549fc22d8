//! Router settings and paths no other test reaches, with real PostgreSQL 15:
//! `router.login_timeout_ms`, the pool-full error after
//! `router.pause_timeout_ms`, cancel requests in transaction mode and after a
//! session moved to a new primary, and the router logging into nodes with
//! md5 and SCRAM passwords (`server.user`, `server.password`).

mod support;

use std::time::{Duration, Instant};

use support::{connect, server_port, Cluster, Raw};
use tokio_postgres::error::SqlState;

/// Waits (bounded) until `pg` runs a statement whose text contains `needle`.
async fn wait_running(pg: &support::Pg, needle: &str) {
    let admin = pg.connect("postgres").await;
    for _ in 0..500 {
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()",
                &[&needle],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if n > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no statement with {needle:?} started within 10 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_closed_after_the_login_timeout() {
    let c = Cluster::start(false, "login_timeout_ms = 300", "").await;
    let start = Instant::now();
    let mut raw = Raw::connect(c.router.addr).await;
    // Half a startup packet, then nothing.
    raw.send(&[0, 0, 0, 40]).await;
    assert!(raw.closed().await, "the router closes the connection");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "closed too early: {waited:?}"
    );
    assert!(waited < Duration::from_secs(10), "closed after {waited:?}");
    // A client that logs in normally is served.
    let client = connect(&c.router.url("postgres")).await.expect("connect");
    client.simple_query("SELECT 1").await.expect("served");
    c.router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_fails_the_waiting_statement_after_the_pause_timeout() {
    let c = Cluster::start(false, "pause_timeout_ms = 800", "[pool]\npool_size = 1\n").await;
    let holder = connect(&c.router.url("postgres")).await.expect("connect");
    holder
        .simple_query("SELECT 1")
        .await
        .expect("holds the only server connection");
    let waiter = connect(&c.router.url("postgres")).await.expect("connect");
    let start = Instant::now();
    let err = waiter
        .simple_query("SELECT 1")
        .await
        .expect_err("no server connection is free");
    let waited = start.elapsed();
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err:?}");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(message.contains("pool.pool_size"), "{message}");
    assert!(
        waited >= Duration::from_millis(700),
        "failed before the pause timeout: {waited:?}"
    );
    // Once the holder is gone, the waiter's next statement runs.
    drop(holder);
    let mut served = false;
    for _ in 0..50 {
        if waiter.simple_query("SELECT 1").await.is_ok() {
            served = true;
            break;
        }
    }
    assert!(served, "the freed connection serves the waiting client");
    c.router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_in_transaction_mode_reaches_the_running_statement() {
    let c = Cluster::start(false, "", "[pool]\nmode = \"transaction\"\npool_size = 2\n").await;
    let one = connect(&c.router.url("postgres")).await.expect("connect");
    let two = connect(&c.router.url("postgres")).await.expect("connect");
    let token = one.cancel_token();
    let slow_one = tokio::spawn(async move {
        one.simple_query("SELECT pg_sleep(20) AS one")
            .await
            .map(|_| ())
    });
    let slow_two = tokio::spawn(async move {
        two.simple_query("SELECT pg_sleep(1) AS two")
            .await
            .map(|_| ())
    });
    wait_running(&c.a, "AS one").await;
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("send cancel");
    let err = tokio::time::timeout(Duration::from_secs(10), slow_one)
        .await
        .expect("cancelled in time")
        .expect("task")
        .expect_err("cancelled");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err:?}");
    tokio::time::timeout(Duration::from_secs(10), slow_two)
        .await
        .expect("finishes")
        .expect("task")
        .expect("the other client's statement was not cancelled");
    c.router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_after_the_session_moved_reaches_the_new_primary() {
    let c = Cluster::start(true, "", "").await;
    let b = c.b.as_ref().expect("two nodes");
    let client = connect(&c.router.url("postgres")).await.expect("connect");
    assert_eq!(server_port(&client).await.expect("port"), c.a.port);
    c.move_primary_to_b().await;
    c.router.wait_epoch(2).await;
    assert_eq!(
        server_port(&client).await.expect("the session moved"),
        b.port
    );
    let token = client.cancel_token();
    let slow = tokio::spawn(async move {
        client
            .simple_query("SELECT pg_sleep(20) AS moved")
            .await
            .map(|_| ())
    });
    wait_running(b, "AS moved").await;
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("send cancel");
    let err = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .expect("cancelled in time")
        .expect("task")
        .expect_err("cancelled");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err:?}");
    c.router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_logs_into_nodes_with_md5_and_scram() {
    let c = Cluster::start(false, "", "").await;
    let admin = c.a.connect("postgres").await;
    admin
        .batch_execute(
            "SET password_encryption = 'md5';
             CREATE ROLE md5user LOGIN PASSWORD 'md5-secret';
             SET password_encryption = 'scram-sha-256';
             CREATE ROLE scramuser LOGIN PASSWORD 'scram-secret';
             CREATE ROLE scramother LOGIN PASSWORD 'other-secret';",
        )
        .await
        .expect("create roles");
    // Password rules first: pg_hba.conf is read top-down.
    let hba = c.a.data().join("pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
    std::fs::write(
        &hba,
        format!(
            "host all md5user 127.0.0.1/32 md5\nhost all scramuser,scramother 127.0.0.1/32 scram-sha-256\n{rules}"
        ),
    )
    .expect("write pg_hba.conf");
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .expect("reload");

    for (user, password) in [("md5user", "md5-secret"), ("scramuser", "scram-secret")] {
        // The router's config, with the node credentials, reloaded in place.
        let listen = c.router.addr.to_string();
        std::fs::write(
            &c.router.config_path,
            format!(
                "[router]\nlisten = \"{listen}\"\nmonitor = \"{}\"\nformation = \"default\"\n\n\
                 [server]\nsslmode = \"disable\"\nuser = \"{user}\"\npassword = \"{password}\"\n",
                c.monitor.uri()
            ),
        )
        .expect("write config");
        c.router.router.reload().expect("reload");
        let client = connect(&c.router.url("postgres")).await.expect("connect");
        let row = client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap_or_else(|e| panic!("{user}: {e:?}"));
        assert_eq!(row.get::<_, String>(0), user);
    }

    // A wrong password is the node's refusal, told to the client (a user the
    // pool holds no connection for, so that a new login is needed).
    let listen = c.router.addr.to_string();
    std::fs::write(
        &c.router.config_path,
        format!(
            "[router]\nlisten = \"{listen}\"\nmonitor = \"{}\"\nformation = \"default\"\n\n\
             [server]\nsslmode = \"disable\"\nuser = \"scramother\"\npassword = \"wrong\"\n",
            c.monitor.uri()
        ),
    )
    .expect("write config");
    c.router.router.reload().expect("reload");
    let err = connect(&c.router.url("postgres"))
        .await
        .expect_err("the node refuses the wrong password");
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err:?}");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(message.contains("scramother"), "{message}");
    c.router.stop().await;
}
