//! Server connection pooling against real Postgres 15: session reuse with
//! DISCARD ALL, transaction mode on fewer server connections, prepared
//! statements across server connections, pools emptied when the primary
//! changes, and the pool's limits (LIFO reuse, idle timeout down to
//! `min_idle`, lifetime). No timing is asserted; waits are bounded loops.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use support::*;

/// Creates the login role `app` on a node.
async fn create_app_role(pg: &Pg) {
    pg.connect("postgres")
        .await
        .batch_execute("CREATE ROLE app LOGIN")
        .await
        .expect("create role app");
}

/// One node with the login role `app`, and a router with the `[pool]`
/// section `pool`.
async fn app_cluster(pool: &str) -> Cluster {
    let c = Cluster::start(false, "", pool).await;
    create_app_role(&c.a).await;
    c
}

/// Server connections of user `app` on a node, as pg_stat_activity counts them.
async fn app_backends(pg: &Pg) -> i64 {
    pg.connect("postgres")
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'",
            &[],
        )
        .await
        .expect("count backends")
        .get(0)
}

/// Waits (bounded) until `done` holds.
async fn wait_for<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !done().await {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn backend_pid(client: &tokio_postgres::Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pg_backend_pid")
        .get(0)
}

async fn show(client: &tokio_postgres::Client, sql: &str) -> String {
    let messages = client.simple_query(sql).await.expect("query");
    messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => {
                Some(row.get(0).unwrap_or_default().to_string())
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("no row from {sql}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_reuses_the_server_connection_after_discard_all() {
    let c = app_cluster("[pool]\npool_size = 1\n").await;
    let first = connect(&c.router.url("app")).await.expect("connect");
    let pid = backend_pid(&first).await;
    first
        .batch_execute(
            "SET search_path = nowhere;
             CREATE TEMP TABLE scratch (x int);
             SELECT set_config('application_name', 'dirty', false);
             SELECT pg_advisory_lock(42);",
        )
        .await
        .expect("dirty the session");
    let stmt = first.prepare("SELECT 1").await.expect("prepare");
    drop(stmt);
    drop(first);
    wait_for("the connection is back in the pool", || async {
        c.router.router.pool_stats("app", "postgres").idle == 1
    })
    .await;
    let second = connect(&c.router.url("app")).await.expect("connect again");
    assert_eq!(
        backend_pid(&second).await,
        pid,
        "the pooled server connection is reused"
    );
    assert_eq!(show(&second, "SHOW search_path").await, "\"$user\", public");
    assert_eq!(show(&second, "SHOW application_name").await, "");
    assert_eq!(
        show(&second, "SELECT to_regclass('pg_temp.scratch') IS NULL").await,
        "t",
        "the temporary table is gone"
    );
    assert_eq!(
        show(
            &second,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
        )
        .await,
        "0",
        "advisory locks are released"
    );
    assert_eq!(app_backends(&c.a).await, 1);
    c.router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_mode_runs_many_clients_on_fewer_server_connections() {
    let c = app_cluster("[pool]\nmode = \"transaction\"\npool_size = 2\n").await;
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(connect(&c.router.url("app")).await.expect("connect"));
    }
    // One client changes a reported setting; it must follow that client only.
    let default_zone = show(&clients[1], "SHOW TimeZone").await;
    clients[0]
        .batch_execute("SET TimeZone = 'Asia/Tokyo'")
        .await
        .expect("set");
    let clients: Vec<_> = clients.into_iter().map(std::sync::Arc::new).collect();
    let mut tasks = Vec::new();
    for (i, client) in clients.iter().enumerate() {
        let client = client.clone();
        let default_zone = default_zone.clone();
        tasks.push(tokio::spawn(async move {
            let mut pids = HashSet::new();
            for round in 0..10 {
                let rows = client
                    .simple_query(&format!(
                        "BEGIN; SELECT pg_sleep(0.01); SELECT pg_backend_pid()::text || ' ' || current_setting('TimeZone') || ' ' || {round}; COMMIT"
                    ))
                    .await
                    .expect("transaction");
                let line = rows
                    .iter()
                    .find_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r)
                            if r.get(0).is_some_and(|v| v.ends_with(&format!(" {round}"))) =>
                        {
                            r.get(0).map(str::to_string)
                        }
                        _ => None,
                    })
                    .expect("a row");
                let mut parts = line.split(' ');
                let pid: i32 = parts.next().expect("pid").parse().expect("int");
                let zone = parts.next().expect("zone").to_string();
                let expected = if i == 0 { "Asia/Tokyo" } else { default_zone.as_str() };
                assert_eq!(zone, expected, "client {i} round {round}");
                pids.insert(pid);
            }
            pids
        }));
    }
    let mut all = HashSet::new();
    for task in tasks {
        all.extend(task.await.expect("client task"));
    }
    assert!(
        all.len() <= 2,
        "6 clients ran on {} server connections: {all:?}",
        all.len()
    );
    assert!(app_backends(&c.a).await <= 2);
    // All six clients are still connected and usable.
    for client in &clients {
        backend_pid(client).await;
    }
    assert!(c.router.router.pool_stats("app", "postgres").open <= 2);
    c.router.stop().await;
}

/// Process ids of the server connections of user `app` on a node.
async fn app_backend_pids(pg: &Pg) -> Vec<i32> {
    pg.connect("postgres")
        .await
        .query(
            "SELECT pid FROM pg_stat_activity WHERE usename = 'app' ORDER BY pid",
            &[],
        )
        .await
        .expect("list backends")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_most_recently_returned_server_connection_is_reused_first() {
    let c = app_cluster("[pool]\npool_size = 2\n").await;
    let first = connect(&c.router.url("app")).await.expect("connect");
    let second = connect(&c.router.url("app")).await.expect("connect");
    let first_pid = backend_pid(&first).await;
    let second_pid = backend_pid(&second).await;
    assert_ne!(first_pid, second_pid);
    drop(first);
    wait_for("the first connection is back in the pool", || async {
        c.router.router.pool_stats("app", "postgres").idle == 1
    })
    .await;
    drop(second);
    wait_for("the second connection is back in the pool", || async {
        c.router.router.pool_stats("app", "postgres").idle == 2
    })
    .await;
    // LIFO: the connection returned last serves the next client, so the
    // other one stays idle and pool.idle_timeout_ms can retire a surplus.
    let next = connect(&c.router.url("app")).await.expect("connect again");
    assert_eq!(backend_pid(&next).await, second_pid);
    c.router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_surplus_server_connections_down_to_min_idle() {
    let c = app_cluster("[pool]\npool_size = 4\nmin_idle = 1\nidle_timeout_ms = 200\n").await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let client = connect(&c.router.url("app")).await.expect("connect");
        backend_pid(&client).await;
        clients.push(client);
    }
    assert_eq!(app_backends(&c.a).await, 3);
    drop(clients);
    wait_for("idle connections past the timeout are closed", || async {
        app_backends(&c.a).await == 1
    })
    .await;
    let kept = app_backend_pids(&c.a).await;
    // Several maintenance rounds (one a second), each past the idle timeout:
    // the min_idle connection stays the same one, not closed and reopened.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(app_backend_pids(&c.a).await, kept);
    c.router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifetime_retires_a_server_connection_when_it_is_next_idle() {
    let c = app_cluster("[pool]\npool_size = 1\nidle_timeout_ms = 0\nlifetime_ms = 1000\n").await;
    let client = connect(&c.router.url("app")).await.expect("connect");
    let old_pid = backend_pid(&client).await;
    // Past its lifetime while in use: a session is never cut for it.
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    assert_eq!(backend_pid(&client).await, old_pid);
    drop(client);
    wait_for("the old connection is closed, not pooled", || async {
        app_backends(&c.a).await == 0
    })
    .await;
    let client = connect(&c.router.url("app")).await.expect("connect again");
    assert_ne!(backend_pid(&client).await, old_pid);
    c.router.stop().await;
}

// ---- raw extended-protocol messages ----

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    out.put_u8(tag);
    out.put_u32(body.len() as u32 + 4);
    out.put_slice(body);
    out.to_vec()
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(name.as_bytes());
    body.push(0);
    body.extend_from_slice(sql.as_bytes());
    body.push(0);
    body.extend_from_slice(&0u16.to_be_bytes());
    msg(b'P', &body)
}

fn bind_execute(stmt: &str) -> Vec<u8> {
    let mut body = vec![0];
    body.extend_from_slice(stmt.as_bytes());
    body.push(0);
    body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let mut out = msg(b'B', &body);
    out.extend(msg(b'E', &[0, 0, 0, 0, 0]));
    out
}

fn sync() -> Vec<u8> {
    msg(b'S', &[])
}

/// Reads to ReadyForQuery: the tags seen and the first column of each row.
async fn until_ready(raw: &mut Raw) -> (Vec<u8>, Vec<String>) {
    let mut tags = Vec::new();
    let mut values = Vec::new();
    loop {
        let (tag, body) = raw.recv().await.expect("a message");
        if tag == b'E' {
            panic!("error: {}", field(&body, b'M'));
        }
        if tag == b'D' {
            let len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]) as usize;
            values.push(String::from_utf8_lossy(&body[6..6 + len]).into_owned());
        }
        tags.push(tag);
        if tag == b'Z' {
            return (tags, values);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_mode_prepared_statements_follow_the_client_to_any_server_connection() {
    let c = app_cluster("[pool]\nmode = \"transaction\"\npool_size = 2\n").await;
    let a = connect(&c.router.url("app")).await.expect("connect a");
    let b = connect(&c.router.url("app")).await.expect("connect b");
    let stmt = a
        .prepare("SELECT pg_backend_pid(), $1::int + 1")
        .await
        .expect("prepare");
    let row = a.query_one(&stmt, &[&41i32]).await.expect("execute");
    let first_pid: i32 = row.get(0);
    assert_eq!(row.get::<_, i32>(1), 42);
    // B and C take both server connections in a transaction; the one that
    // does not hold the connection A prepared on lets go, so A's next
    // execution has to run on a connection that never saw its Parse.
    let c3 = connect(&c.router.url("app")).await.expect("connect c");
    b.batch_execute("BEGIN").await.expect("begin");
    c3.batch_execute("BEGIN").await.expect("begin");
    let (holder, other) = if backend_pid(&b).await == first_pid {
        (&b, &c3)
    } else {
        (&c3, &b)
    };
    assert_eq!(backend_pid(holder).await, first_pid);
    other.batch_execute("COMMIT").await.expect("commit");
    let row = a.query_one(&stmt, &[&1i32]).await.expect("execute again");
    let second_pid: i32 = row.get(0);
    assert_ne!(second_pid, first_pid, "ran on another server connection");
    assert_eq!(row.get::<_, i32>(1), 2);
    holder.batch_execute("COMMIT").await.expect("commit");
    // Back and forth between the connections.
    for i in 0..10 {
        let row = a.query_one(&stmt, &[&i]).await.expect("execute in loop");
        assert_eq!(row.get::<_, i32>(1), i + 1);
        let rows = b.query("SELECT $1::text", &[&"b"]).await.expect("b");
        assert_eq!(rows.len(), 1);
    }
    // A closes its statement: preparing the name again works anywhere.
    drop(stmt);
    let again = a.prepare("SELECT 7").await.expect("prepare after close");
    assert_eq!(
        a.query_one(&again, &[])
            .await
            .expect("run")
            .get::<_, i32>(0),
        7
    );

    // Two clients using the same statement name for different queries, on
    // the same few server connections: each always gets its own statement.
    let mut r1 = Raw::login(c.router.addr, "app").await;
    let mut r2 = Raw::login(c.router.addr, "app").await;
    r1.send(&[parse("st", "SELECT 1"), sync()].concat()).await;
    let (tags, _) = until_ready(&mut r1).await;
    assert_eq!(tags, b"1Z");
    for round in 0..8 {
        if round == 0 {
            r2.send(&[parse("st", "SELECT 2"), bind_execute("st"), sync()].concat())
                .await;
            let (tags, values) = until_ready(&mut r2).await;
            assert_eq!(tags, b"12DCZ", "r2 parse, bind, execute");
            assert_eq!(values, ["2"]);
        } else {
            r2.send(&[bind_execute("st"), sync()].concat()).await;
            let (tags, values) = until_ready(&mut r2).await;
            assert_eq!(tags, b"2DCZ", "round {round}");
            assert_eq!(values, ["2"]);
        }
        // Hold a connection in a transaction on every other round, so the
        // two raw clients land on different connections in turn.
        let hold = round % 2 == 1;
        if hold {
            b.batch_execute("BEGIN").await.expect("begin");
        }
        r1.send(&[bind_execute("st"), sync()].concat()).await;
        let (tags, values) = until_ready(&mut r1).await;
        assert_eq!(tags, b"2DCZ", "round {round}");
        assert_eq!(values, ["1"]);
        if hold {
            b.batch_execute("COMMIT").await.expect("commit");
        }
    }
    // A pipeline of two batches with a Parse in each.
    r1.send(
        &[
            parse("p1", "SELECT 'p1'"),
            bind_execute("p1"),
            sync(),
            parse("p2", "SELECT 'p2'"),
            bind_execute("p2"),
            bind_execute("st"),
            sync(),
        ]
        .concat(),
    )
    .await;
    let (tags, values) = until_ready(&mut r1).await;
    assert_eq!(tags, b"12DCZ");
    assert_eq!(values, ["p1"]);
    let (tags, values) = until_ready(&mut r1).await;
    assert_eq!(tags, b"12DC2DCZ");
    assert_eq!(values, ["p2", "1"]);
    assert!(c.router.router.pool_stats("app", "postgres").open <= 2);
    c.router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_mode_statements_deallocated_by_sql_are_prepared_again() {
    // One server connection, and two clients sending the same startup
    // parameters, so that both always run on it.
    let c = app_cluster("[pool]\nmode = \"transaction\"\npool_size = 1\n").await;
    let mut raw = Raw::login(c.router.addr, "app").await;
    let mut other = Raw::login(c.router.addr, "app").await;
    raw.send(&[parse("st", "SELECT 1"), bind_execute("st"), sync()].concat())
        .await;
    let (tags, values) = until_ready(&mut raw).await;
    assert_eq!(tags, b"12DCZ");
    assert_eq!(values, ["1"]);
    // The other client drops every prepared statement of the connection,
    // with DEALLOCATE or DISCARD as a statement of its own or behind another
    // one in the same query string. The router cannot know which of its
    // statements survived, and prepares the one used next again.
    for sql in [
        "DEALLOCATE ALL",
        "SELECT 1; DEALLOCATE ALL",
        "discard all",
        "select 1; deallocate prepare all",
    ] {
        other.send(&msg(b'Q', format!("{sql}\0").as_bytes())).await;
        until_ready(&mut other).await;
        raw.send(&[bind_execute("st"), sync()].concat()).await;
        let (tags, values) = until_ready(&mut raw).await;
        assert_eq!(
            tags,
            b"2DCZ",
            "after {sql}: {}",
            String::from_utf8_lossy(&tags)
        );
        assert_eq!(values, ["1"], "after {sql}");
    }
    c.router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_change_empties_the_pools() {
    let c = Cluster::start(true, "", "[pool]\nmin_idle = 1\n").await;
    let b_pg = c.b.as_ref().expect("b");
    create_app_role(&c.a).await;
    create_app_role(b_pg).await;
    let client = connect(&c.router.url("app")).await.expect("connect");
    assert_eq!(server_port(&client).await.expect("query"), c.a.port);
    drop(client);
    wait_for("the connection is idle in the pool", || async {
        c.router.router.pool_stats("app", "postgres").idle >= 1
    })
    .await;
    assert!(app_backends(&c.a).await >= 1);
    c.move_primary_to_b().await;
    c.router.wait_epoch(2).await;
    wait_for("no server connection to the old primary", || async {
        app_backends(&c.a).await == 0
    })
    .await;
    // min_idle refills the pool on the new primary.
    wait_for("min_idle connection on the new primary", || async {
        app_backends(b_pg).await >= 1
    })
    .await;
    let client = connect(&c.router.url("app")).await.expect("connect again");
    assert_eq!(server_port(&client).await.expect("query"), b_pg.port);
    c.router.stop().await;
}
