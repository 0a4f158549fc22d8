//! A login burst never locks Postgres out (issue 23, item 8), with real
//! PostgreSQL 15 (`max_connections = 50`, `superuser_reserved_connections`
//! 3): the router keeps its server connections to a node under the limit it
//! reads from the node, so a superuser still gets in during a burst; and a
//! node that is full (`53300`) has the router's idle connections closed, or
//! its own reason told to the client, not "no primary".

mod support;

use std::time::Duration;

use support::{connect, Cluster};
use tokio_postgres::error::SqlState;

/// Backends of client connections on `pg`, the asking one left out.
async fn client_backends(admin: &tokio_postgres::Client) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
}

/// What one client of the burst got for its first statement.
enum Outcome {
    /// Served: it holds its transaction (and server connection) until released.
    Served,
    /// Refused, with the SQLSTATE and message.
    Refused(String, String),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_burst_leaves_the_superuser_slots_and_stays_under_the_node_limit() {
    // pool_size asks for more than the node has: the router's limit for the
    // node (50 - 3 reserved, less a tenth: 42) is what holds.
    let c = Cluster::start(
        false,
        "pause_timeout_ms = 2000",
        "[pool]\npool_size = 100\n",
    )
    .await;
    const CLIENTS: usize = 200;
    const LIMIT: i64 = 42;
    let (results, mut outcomes) = tokio::sync::mpsc::channel(CLIENTS);
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let url = c.router.url("postgres");
        let results = results.clone();
        let release = release.clone();
        tasks.push(tokio::spawn(async move {
            let client = match connect(&url).await {
                Ok(client) => client,
                Err(e) => {
                    let code = e.code().map(|c| c.code().to_string()).unwrap_or_default();
                    let _ = results.send(Outcome::Refused(code, e.to_string())).await;
                    return;
                }
            };
            let held = async {
                client.simple_query("BEGIN").await?;
                client.simple_query("SELECT 1").await
            }
            .await;
            match held {
                Ok(_) => {
                    let _ = results.send(Outcome::Served).await;
                    release.notified().await;
                    let _ = client.simple_query("COMMIT").await;
                }
                Err(e) => {
                    let code = e.code().map(|c| c.code().to_string()).unwrap_or_default();
                    let message = e
                        .as_db_error()
                        .map(|d| d.message().to_string())
                        .unwrap_or_else(|| e.to_string());
                    let _ = results.send(Outcome::Refused(code, message)).await;
                }
            }
        }));
    }
    drop(results);

    // During the burst: a superuser connecting directly to the node gets in.
    let admin = tokio::time::timeout(Duration::from_secs(10), c.a.connect("postgres"))
        .await
        .expect("a superuser connects during the burst");

    let mut served = 0;
    let mut refused = Vec::new();
    for _ in 0..CLIENTS {
        match tokio::time::timeout(Duration::from_secs(60), outcomes.recv())
            .await
            .expect("every client has an outcome within 60 s")
        {
            Some(Outcome::Served) => served += 1,
            Some(Outcome::Refused(code, message)) => refused.push((code, message)),
            None => break,
        }
    }
    // The served clients still hold their transactions here.
    let backends = client_backends(&admin).await;
    eprintln!(
        "burst of {CLIENTS}: {served} served at once, {} refused, {backends} client backends on the node",
        refused.len()
    );
    assert!(
        backends <= LIMIT,
        "the router holds {backends} server connections, over its limit {LIMIT}"
    );
    assert!(
        served as i64 <= LIMIT && served >= 10,
        "{served} clients served at once"
    );
    assert_eq!(served + refused.len(), CLIENTS);
    for (code, message) in &refused {
        assert_eq!(code, "53300", "{message}");
        assert!(
            message.contains("max_connections") && message.contains("superuser_reserved"),
            "the error names the node's settings: {message}"
        );
    }
    // Still another superuser connection, with everything held.
    let second = c.a.connect("postgres").await;
    second.simple_query("SELECT 1").await.expect("served");

    // Once the holders let go, a new client is served.
    release.notify_waiters();
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("client ends")
            .expect("client task");
    }
    let late = connect(&c.router.url("postgres")).await.expect("connect");
    late.simple_query("SELECT 1")
        .await
        .expect("served after the burst");
    c.router.stop().await;
}

/// Opens direct superuser connections to the node until it refuses with 53300.
async fn fill(pg: &support::Pg) -> Vec<tokio_postgres::Client> {
    let mut held = Vec::new();
    for _ in 0..60 {
        match connect(&pg.url("postgres", "postgres")).await {
            Ok(client) => held.push(client),
            Err(e) => {
                assert_eq!(e.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{e:?}");
                return held;
            }
        }
    }
    panic!("the node took 60 connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_node_gets_the_routers_idle_connections_and_else_its_reason_is_told() {
    let c = Cluster::start(false, "pause_timeout_ms = 1500", "").await;
    // One idle connection in the pool, opened for the default startup parameters.
    let first = connect(&c.router.url("postgres")).await.expect("connect");
    first.simple_query("SELECT 1").await.expect("served");
    drop(first);
    for _ in 0..250 {
        if c.router.router.pool_stats("postgres", "postgres").idle == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(c.router.router.pool_stats("postgres", "postgres").idle, 1);

    // Everything else of the node is taken from outside.
    let mut outside = fill(&c.a).await;

    // A client with other startup parameters needs a new connection: the
    // node refuses it (53300), the router closes its idle one and retries.
    let other = connect(&format!(
        "{} application_name=other",
        c.router.url("postgres")
    ))
    .await
    .expect("connect");
    other
        .simple_query("SELECT 1")
        .await
        .expect("served once the router's idle connection made room");
    // `other` keeps its server connection (session mode): the router has
    // no idle connection left, and the node is full of others' connections.
    let mut more = fill(&c.a).await;
    outside.append(&mut more);
    assert_eq!(c.router.router.pool_stats("postgres", "postgres").idle, 0);

    // Nothing of the router's to close: the client gets the node's reason.
    let waiter = connect(&c.router.url("postgres")).await.expect("connect");
    let err = waiter
        .simple_query("SELECT 1")
        .await
        .expect_err("the node is full");
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err:?}");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(message.contains("too many clients"), "{message}");
    assert!(!message.contains("no primary"), "{message}");

    // A slot comes free: the same client's next statement is served.
    outside.pop();
    let mut served = false;
    for _ in 0..20 {
        if waiter.simple_query("SELECT 1").await.is_ok() {
            served = true;
            break;
        }
    }
    assert!(served, "served once the node has room");
    drop((outside, other));
    c.router.stop().await;
}
