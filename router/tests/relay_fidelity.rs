//! What a client is told when its session ends, and what it still gets
//! first (issue 23): a session that LISTENs is closed with a FATAL naming
//! the reason when its server connection is lost, even while idle (item 9);
//! a client that half-closes after a Query, or sends garbage after a valid
//! Query, gets the server's answer first, as Postgres gives it (item 11); an
//! 80 MB bytea goes through the router and back (item 2).

mod support;

use std::time::Duration;

use bytes::BufMut;
use support::*;
use tokio::io::AsyncWriteExt;

fn query(sql: &str) -> Vec<u8> {
    let mut m = vec![b'Q'];
    m.put_u32((sql.len() + 5) as u32);
    m.extend_from_slice(sql.as_bytes());
    m.push(0);
    m
}

/// Reads until ReadyForQuery (5 s limit per message).
async fn until_ready(raw: &mut Raw) {
    loop {
        let (tag, body) = raw.recv().await.expect("an answer");
        assert_ne!(tag, b'E', "{}", field(&body, b'M'));
        if tag == b'Z' {
            return;
        }
    }
}

/// A raw client that LISTENs through the router, and its backend's pid.
async fn listener(c: &Cluster) -> (Raw, i32) {
    let mut raw = Raw::login(c.router.addr, "postgres").await;
    raw.send(&query("LISTEN hapg_test_channel")).await;
    until_ready(&mut raw).await;
    let a = c.a.connect("postgres").await;
    let pid: i32 = a
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE query = 'LISTEN hapg_test_channel'",
            &[],
        )
        .await
        .expect("the listening backend")
        .get(0);
    (raw, pid)
}

/// The next message is a FATAL, and then the connection closes; returns its
/// SQLSTATE and message.
async fn fatal_then_closed(raw: &mut Raw) -> (String, String) {
    let (tag, body) = raw.recv().await.expect("a FATAL, not a silent close");
    assert_eq!(tag, b'E', "expected the FATAL, got {:?}", tag as char);
    assert_eq!(field(&body, b'V'), "FATAL", "{}", field(&body, b'M'));
    assert!(raw.closed().await, "the router kept the connection open");
    (sqlstate(&body), field(&body, b'M'))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listening_session_whose_backend_is_terminated_is_closed_with_a_fatal() {
    let c = Cluster::start(false, "", "").await;
    let (mut raw, pid) = listener(&c).await;
    let admin = c.a.connect("postgres").await;
    admin
        .execute("SELECT pg_terminate_backend($1, 5000)", &[&pid])
        .await
        .expect("terminate");
    // Idle, no statement in flight: told at once.
    let (code, message) = fatal_then_closed(&mut raw).await;
    assert_eq!(code, "08006", "{message}");
    assert!(message.contains("LISTEN"), "{message}");
    assert!(
        !message.contains("primary changed"),
        "the primary did not change: {message}"
    );
    c.router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listening_session_is_closed_with_a_fatal_when_the_primary_changes() {
    let c = Cluster::start(true, "", "").await;
    let (mut raw, _) = listener(&c).await;
    c.move_primary_to_b().await;
    let (code, message) = fatal_then_closed(&mut raw).await;
    assert_eq!(code, "08006", "{message}");
    assert!(
        message.starts_with("the primary changed (epoch 1 to 2)"),
        "{message}"
    );
    assert!(message.contains("LISTEN"), "{message}");
    c.router.stop().await;
}

/// Logs in at `addr` (the router or Postgres itself), sends `bytes`, and,
/// with `half_close`, shuts down its writing side; returns the tags of what
/// it reads until the connection closes, and the last ErrorResponse's
/// severity and SQLSTATE.
async fn exchange(
    addr: std::net::SocketAddr,
    bytes: &[u8],
    half_close: bool,
) -> (String, Option<(String, String)>) {
    let mut raw = Raw::login(addr, "postgres").await;
    raw.send(bytes).await;
    if half_close {
        raw.stream.shutdown().await.expect("shutdown for writing");
    }
    let mut tags = String::new();
    let mut error = None;
    while let Some((tag, body)) = raw.recv().await {
        tags.push(tag as char);
        if tag == b'E' {
            error = Some((field(&body, b'V'), sqlstate(&body)));
        }
    }
    (tags, error)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_before_the_end_of_the_session_are_delivered_as_postgres_delivers_them() {
    let c = Cluster::start(false, "", "").await;
    let admin = c.a.connect("postgres").await;
    admin
        .batch_execute("CREATE TABLE half (id int)")
        .await
        .expect("table");
    let direct: std::net::SocketAddr = format!("127.0.0.1:{}", c.a.port).parse().expect("address");

    // (a) A complete Query, then the client shuts down its writing side.
    let sql = query("SELECT pg_sleep(0.3); INSERT INTO half VALUES (1)");
    let expected = exchange(direct, &sql, true).await;
    assert_eq!(expected.0, "TDCCZ", "Postgres itself");
    let through = exchange(c.router.addr, &sql, true).await;
    assert_eq!(through, expected, "half-closed after a Query");
    let rows: i64 = admin
        .query_one("SELECT count(*) FROM half", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 2);

    // (b) A valid Query followed by garbage.
    let mut bytes = query("SELECT 1");
    bytes.extend_from_slice(b"\x01\x00\x00\x00\x08abcd");
    let expected = exchange(direct, &bytes, false).await;
    assert_eq!(expected.0, "TDCZE", "Postgres itself");
    let through = exchange(c.router.addr, &bytes, false).await;
    assert_eq!(through, expected, "a Query, then garbage");
    assert_eq!(through.1, Some(("FATAL".to_string(), "08P01".to_string())));

    // Terminate after a Query: the answer comes first, as from Postgres.
    let mut bytes = query("SELECT pg_sleep(0.3)");
    bytes.extend_from_slice(b"X\x00\x00\x00\x04");
    let expected = exchange(direct, &bytes, false).await;
    let through = exchange(c.router.addr, &bytes, false).await;
    assert_eq!(through, expected, "a Query, then Terminate");
    c.router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_80_mb_bytea_goes_through_the_router_and_back() {
    let c = Cluster::start(false, "", "").await;
    let client = connect(&c.router.url("postgres")).await.expect("connect");
    client
        .batch_execute("CREATE TABLE big (id int, data bytea)")
        .await
        .expect("table");
    let data: Vec<u8> = (0..80_000_000u32).map(|i| (i % 251) as u8).collect();
    tokio::time::timeout(
        Duration::from_secs(120),
        client.execute("INSERT INTO big VALUES (1, $1)", &[&data]),
    )
    .await
    .expect("insert in time")
    .expect("insert of 80 MB through the router");
    let row = tokio::time::timeout(
        Duration::from_secs(120),
        client.query_one("SELECT data FROM big WHERE id = 1", &[]),
    )
    .await
    .expect("select in time")
    .expect("select of 80 MB through the router");
    let back: Vec<u8> = row.get(0);
    assert!(back == data, "the bytea came back different");
    // The session goes on.
    assert_eq!(server_port(&client).await.expect("usable"), c.a.port);
    c.router.stop().await;
}
