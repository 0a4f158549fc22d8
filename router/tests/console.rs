//! The admin console and `/metrics` against a running router and real
//! PostgreSQL 15 (the monitor's rows played by the tests, see
//! support/mod.rs): every console command answers with PgBouncer's columns
//! (or hapg's own for ROUTING and FAILOVERS); PAUSE, RESUME, RECONNECT and
//! KILL_CLIENT are seen from a client; stats users are refused what is not
//! a SHOW, other users the console; a switchover shows in SHOW FAILOVERS
//! with its pause and moves the failover metrics, and `/metrics` passes
//! `promtool check metrics`.

#[path = "../../tests/http_support/metrics_text.rs"]
mod metrics_text;
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use metrics_text::{promtool, sample};
use support::*;
use tokio_postgres::SimpleQueryMessage;

/// Users: `postgres` is an admin, `stats` a stats user; transaction pooling.
fn sections(metrics: Option<u16>) -> String {
    let mut s = String::from(
        "[admin]\nadmin_users = [\"postgres\"]\nstats_users = [\"stats\"]\n\n[pool]\nmode = \"transaction\"\n",
    );
    if let Some(port) = metrics {
        s.push_str(&format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"));
    }
    s
}

async fn console(
    router: &RouterHandle,
    user: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    connect(&format!(
        "host=127.0.0.1 port={} user={user} dbname=pgbouncer",
        router.addr.port()
    ))
    .await
}

/// A SHOW's column names and rows.
async fn show(
    client: &tokio_postgres::Client,
    command: &str,
) -> (Vec<String>, Vec<Vec<Option<String>>>) {
    let messages = client
        .simple_query(command)
        .await
        .unwrap_or_else(|e| panic!("{command}: {e}"));
    let mut columns = Vec::new();
    let mut rows = Vec::new();
    for m in messages {
        match m {
            SimpleQueryMessage::RowDescription(cols) => {
                columns = cols.iter().map(|c| c.name().to_string()).collect();
            }
            SimpleQueryMessage::Row(row) => {
                rows.push(
                    (0..row.len())
                        .map(|i| row.get(i).map(str::to_string))
                        .collect(),
                );
            }
            _ => {}
        }
    }
    (columns, rows)
}

/// The value of `column` in `row` of a SHOW.
fn cell<'a>(columns: &[String], row: &'a [Option<String>], column: &str) -> Option<&'a str> {
    let i = columns.iter().position(|c| c == column)?;
    row[i].as_deref()
}

fn code(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("no sqlstate: {e}"))
}

/// PgBouncer's documented columns (1.18, Debian 12's), in its order.
const POOLS: &[&str] = &[
    "database",
    "user",
    "cl_active",
    "cl_waiting",
    "cl_active_cancel_req",
    "cl_waiting_cancel_req",
    "sv_active",
    "sv_active_cancel",
    "sv_being_canceled",
    "sv_idle",
    "sv_used",
    "sv_tested",
    "sv_login",
    "maxwait",
    "maxwait_us",
    "pool_mode",
];
const SOCKETS: &[&str] = &[
    "type",
    "user",
    "database",
    "state",
    "addr",
    "port",
    "local_addr",
    "local_port",
    "connect_time",
    "request_time",
    "wait",
    "wait_us",
    "close_needed",
    "ptr",
    "link",
    "remote_pid",
    "tls",
    "application_name",
];
const STATS: &[&str] = &[
    "database",
    "total_xact_count",
    "total_query_count",
    "total_received",
    "total_sent",
    "total_xact_time",
    "total_query_time",
    "total_wait_time",
    "avg_xact_count",
    "avg_query_count",
    "avg_recv",
    "avg_sent",
    "avg_xact_time",
    "avg_query_time",
    "avg_wait_time",
];
const TOTALS: &[&str] = &[
    "database",
    "xact_count",
    "query_count",
    "bytes_received",
    "bytes_sent",
    "xact_time",
    "query_time",
    "wait_time",
];
const DATABASES: &[&str] = &[
    "name",
    "host",
    "port",
    "database",
    "force_user",
    "pool_size",
    "min_pool_size",
    "reserve_pool",
    "pool_mode",
    "max_connections",
    "current_connections",
    "paused",
    "disabled",
];
const LISTS: &[&str] = &["list", "items"];
const CONFIG: &[&str] = &["key", "value", "default", "changeable"];
const VERSION: &[&str] = &["version"];
const ROUTING: &[&str] = &[
    "formation",
    "epoch",
    "routed_epoch",
    "primary_node_id",
    "primary",
    "primary_state",
    "paused",
    "paused_by",
    "paused_since",
    "monitor_reachable",
    "busy_sessions",
    "last_drain_epoch",
    "last_drain_started",
    "last_drain_seconds",
];
const FAILOVERS: &[&str] = &[
    "at",
    "from_epoch",
    "from_node_id",
    "from_address",
    "to_epoch",
    "to_node_id",
    "to_address",
    "held_seconds",
    "clients_waited",
    "statements_cut",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_show_command_answers_with_pgbouncers_columns() {
    let cluster = Cluster::start(false, "", &sections(None)).await;
    let app = connect(&format!(
        "{} application_name=app",
        cluster.router.url("postgres")
    ))
    .await
    .expect("app client");
    for _ in 0..3 {
        app.simple_query("SELECT 1").await.expect("select");
    }
    let admin = console(&cluster.router, "postgres")
        .await
        .expect("console login");
    for (command, want) in [
        ("SHOW POOLS", POOLS),
        ("SHOW CLIENTS", SOCKETS),
        ("SHOW SERVERS", SOCKETS),
        ("SHOW STATS", STATS),
        ("SHOW STATS_TOTALS", TOTALS),
        ("SHOW STATS_AVERAGES", TOTALS),
        ("SHOW DATABASES", DATABASES),
        ("SHOW LISTS", LISTS),
        ("SHOW CONFIG", CONFIG),
        ("SHOW VERSION", VERSION),
        ("SHOW ROUTING", ROUTING),
        ("SHOW FAILOVERS", FAILOVERS),
    ] {
        let (columns, rows) = show(&admin, command).await;
        assert_eq!(columns, want, "{command}");
        if command != "SHOW FAILOVERS" {
            assert!(!rows.is_empty(), "{command} has no row");
        }
    }
    // What the rows say.
    let (c, rows) = show(&admin, "SHOW POOLS").await;
    let pool = rows
        .iter()
        .find(|r| cell(&c, r, "database") == Some("postgres"))
        .expect("the app's pool");
    assert_eq!(cell(&c, pool, "user"), Some("postgres"));
    assert_eq!(cell(&c, pool, "cl_active"), Some("1"));
    assert_eq!(cell(&c, pool, "sv_idle"), Some("1"));
    assert_eq!(cell(&c, pool, "pool_mode"), Some("transaction"));
    let (c, rows) = show(&admin, "SHOW CLIENTS").await;
    assert!(
        rows.iter()
            .any(|r| cell(&c, r, "application_name") == Some("app")
                && cell(&c, r, "database") == Some("postgres")
                && cell(&c, r, "state") == Some("active")),
        "the app client is listed: {rows:?}"
    );
    let (c, rows) = show(&admin, "SHOW STATS_TOTALS").await;
    let xacts: u64 = cell(&c, &rows[0], "xact_count")
        .and_then(|v| v.parse().ok())
        .expect("count");
    assert!(xacts >= 3, "three transactions counted, got {xacts}");
    let (c, rows) = show(&admin, "SHOW SERVERS").await;
    assert_eq!(cell(&c, &rows[0], "state"), Some("idle"));
    let (c, rows) = show(&admin, "SHOW ROUTING").await;
    assert_eq!(cell(&c, &rows[0], "epoch"), Some("1"));
    assert_eq!(cell(&c, &rows[0], "paused"), Some("false"));
    assert_eq!(cell(&c, &rows[0], "monitor_reachable"), Some("true"));
    let (c, rows) = show(&admin, "SHOW CONFIG").await;
    assert!(rows.iter().any(|r| cell(&c, r, "key") == Some("pool.mode")
        && cell(&c, r, "value") == Some("transaction")
        && cell(&c, r, "default") == Some("session")));
    let (_, rows) = show(&admin, "SHOW VERSION").await;
    assert!(rows[0][0]
        .as_deref()
        .is_some_and(|v| v.starts_with("hapg ")));

    // An unknown command: an error with a SQLSTATE naming what is accepted.
    let e = admin.simple_query("SHOW MEM").await.expect_err("unknown");
    assert_eq!(code(&e), "42601");
    let said = format!("{:?}", e.as_db_error().map(|d| d.message()));
    assert!(
        said.contains("SHOW POOLS") && said.contains("KILL_CLIENT"),
        "{said}"
    );
    // The console goes on after an error.
    show(&admin, "SHOW VERSION").await;

    // A stats user: SHOW yes, PAUSE no (42501); a user in neither list: no console.
    let stats = console(&cluster.router, "stats")
        .await
        .expect("stats login");
    show(&stats, "SHOW POOLS").await;
    let e = stats
        .simple_query("PAUSE")
        .await
        .expect_err("a stats user's PAUSE");
    assert_eq!(code(&e), "42501");
    assert!(!cluster.router.router.routing().held, "nothing was paused");
    let e = console(&cluster.router, "app_user")
        .await
        .expect_err("not an admin");
    assert_eq!(code(&e), "28000");
    cluster.router.stop().await;
}

/// The first column of the first row of a simple query's answer.
fn first_value(rows: Vec<SimpleQueryMessage>) -> String {
    rows.into_iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .expect("a row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_servers_lists_connections_in_use_with_the_client_they_serve() {
    let cluster = Cluster::start(false, "", &sections(None)).await;
    let admin = console(&cluster.router, "postgres")
        .await
        .expect("console login");
    let busy = connect(&format!(
        "{} application_name=busy",
        cluster.router.url("postgres")
    ))
    .await
    .expect("busy client");
    let idle = connect(&cluster.router.url("postgres"))
        .await
        .expect("idle client");
    // Two server connections: one stays in a transaction (attached to its
    // client in transaction mode), the other goes back idle.
    busy.simple_query("BEGIN").await.expect("begin");
    let backend = first_value(
        busy.simple_query("SELECT pg_backend_pid()")
            .await
            .expect("pid"),
    );
    idle.simple_query("SELECT 1").await.expect("select");

    let (c, clients) = show(&admin, "SHOW CLIENTS").await;
    let client = clients
        .iter()
        .find(|r| cell(&c, r, "application_name") == Some("busy"))
        .expect("the busy client is listed");
    let client_ptr = cell(&c, client, "ptr").expect("ptr").to_string();
    let (c, servers) = show(&admin, "SHOW SERVERS").await;
    let active: Vec<_> = servers
        .iter()
        .filter(|r| cell(&c, r, "state") == Some("active"))
        .collect();
    assert_eq!(
        active.len(),
        1,
        "the connection in use is listed: {servers:?}"
    );
    let server = active[0];
    assert_eq!(cell(&c, server, "remote_pid"), Some(backend.as_str()));
    assert_eq!(cell(&c, server, "link"), Some(client_ptr.as_str()));
    assert_eq!(cell(&c, server, "database"), Some("postgres"));
    assert!(
        servers
            .iter()
            .any(|r| cell(&c, r, "state") == Some("idle") && cell(&c, r, "link") == Some("")),
        "the idle one too: {servers:?}"
    );
    // And the client names the server back.
    let server_ptr = cell(&c, server, "ptr").expect("ptr");
    assert_eq!(cell(&c, client, "link"), Some(server_ptr));

    // At the transaction's end the connection goes back to the pool: idle,
    // linked to nobody.
    busy.simple_query("COMMIT").await.expect("commit");
    let (c, servers) = show(&admin, "SHOW SERVERS").await;
    assert!(
        servers
            .iter()
            .all(|r| cell(&c, r, "state") == Some("idle") && cell(&c, r, "link") == Some("")),
        "{servers:?}"
    );
    cluster.router.stop().await;
}

/// A client of the router for database `db`, as the superuser.
async fn client_of(router: &RouterHandle, db: &str, name: &str) -> tokio_postgres::Client {
    connect(&format!(
        "host=127.0.0.1 port={} user=postgres dbname={db} application_name={name}",
        router.addr.port()
    ))
    .await
    .unwrap_or_else(|e| panic!("client of {db}: {e}"))
}

/// The `column` of the row of SHOW `command` whose `database` is `db`.
async fn of_database(
    admin: &tokio_postgres::Client,
    command: &str,
    db: &str,
    column: &str,
) -> Option<String> {
    let (c, rows) = show(admin, command).await;
    rows.iter()
        .find(|r| cell(&c, r, "database") == Some(db))
        .and_then(|r| cell(&c, r, column).map(str::to_string))
}

/// Waits (at most 10 s) until the router has ended `client`'s session.
async fn wait_closed(client: &tokio_postgres::Client, what: &str) {
    let start = Instant::now();
    while !client.is_closed() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what} was not ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A router in front of one node that has a second database, `other`.
async fn with_other_database() -> Cluster {
    let cluster = Cluster::start(false, "", &sections(None)).await;
    cluster
        .a
        .connect("postgres")
        .await
        .simple_query("CREATE DATABASE other")
        .await
        .expect("create database");
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_stats_has_a_row_per_database() {
    let cluster = with_other_database().await;
    let admin = console(&cluster.router, "postgres")
        .await
        .expect("console login");
    let main = client_of(&cluster.router, "postgres", "main").await;
    let other = client_of(&cluster.router, "other", "other").await;
    for _ in 0..2 {
        main.simple_query("SELECT 1").await.expect("select");
    }
    for _ in 0..5 {
        other.simple_query("SELECT 1").await.expect("select");
    }
    let count = |v: Option<String>| -> u64 { v.and_then(|v| v.parse().ok()).expect("a count") };
    let main_xacts =
        count(of_database(&admin, "SHOW STATS_TOTALS", "postgres", "xact_count").await);
    let other_xacts = count(of_database(&admin, "SHOW STATS_TOTALS", "other", "xact_count").await);
    // The login's own statements may count; the other database's do not.
    assert!((2..5).contains(&main_xacts), "postgres: {main_xacts}");
    assert!(other_xacts >= 5, "other: {other_xacts}");
    assert_eq!(
        count(of_database(&admin, "SHOW STATS", "other", "total_xact_count").await),
        other_xacts
    );
    assert!(
        of_database(&admin, "SHOW STATS_AVERAGES", "other", "xact_count")
            .await
            .is_some()
    );
    let (_, rows) = show(&admin, "SHOW STATS").await;
    assert_eq!(rows.len(), 2, "one row per database: {rows:?}");
    cluster.router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_db_holds_that_database_only_until_resume_db() {
    let cluster = with_other_database().await;
    let admin = std::sync::Arc::new(
        console(&cluster.router, "postgres")
            .await
            .expect("console login"),
    );
    let main = client_of(&cluster.router, "postgres", "main").await;
    let other = std::sync::Arc::new(client_of(&cluster.router, "other", "other").await);

    // PAUSE other answers once other's open transaction has ended.
    other.simple_query("BEGIN").await.expect("begin");
    let pause = {
        let admin = admin.clone();
        tokio::spawn(async move { admin.simple_query("PAUSE other").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !pause.is_finished(),
        "PAUSE other waits for its transaction"
    );
    other.simple_query("COMMIT").await.expect("commit");
    tokio::time::timeout(Duration::from_secs(10), pause)
        .await
        .expect("PAUSE answered after the commit")
        .expect("task")
        .expect("PAUSE other");
    assert_eq!(
        of_database(&admin, "SHOW DATABASES", "other", "paused")
            .await
            .as_deref(),
        Some("1")
    );
    assert_eq!(
        of_database(&admin, "SHOW DATABASES", "postgres", "paused")
            .await
            .as_deref(),
        Some("0")
    );

    // other's next statement waits; the other database runs meanwhile.
    let held = {
        let other = other.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            other
                .simple_query("SELECT 1")
                .await
                .map(|_| start.elapsed())
        })
    };
    let start = Instant::now();
    while of_database(&admin, "SHOW POOLS", "other", "cl_waiting")
        .await
        .as_deref()
        != Some("1")
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the client of other never waited"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::timeout(Duration::from_secs(5), main.simple_query("SELECT 1"))
        .await
        .expect("postgres is not paused")
        .expect("select on postgres");
    assert!(
        !held.is_finished(),
        "other's statement ran during PAUSE other"
    );
    admin
        .simple_query("RESUME other")
        .await
        .expect("RESUME other");
    tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("resumed in time")
        .expect("task")
        .expect("the held statement succeeds after RESUME other");

    // KILL other: its client is ended, postgres' is not.
    admin.simple_query("KILL other").await.expect("KILL other");
    wait_closed(&other, "the client of other").await;
    main.simple_query("SELECT 1")
        .await
        .expect("postgres still runs");
    admin.simple_query("RESUME").await.expect("RESUME");
    client_of(&cluster.router, "other", "again")
        .await
        .simple_query("SELECT 1")
        .await
        .expect("other runs again after RESUME");
    cluster.router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_reconnect_and_kill_client_are_seen_from_a_client() {
    let cluster = Cluster::start(false, "", &sections(None)).await;
    let router = &cluster.router;
    let admin = console(router, "postgres").await.expect("console login");
    let app = connect(&format!(
        "{} application_name=victim",
        router.url("postgres")
    ))
    .await
    .expect("app client");
    let pid = |rows: Vec<SimpleQueryMessage>| -> String {
        rows.into_iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .expect("a row")
    };
    let first = pid(app
        .simple_query("SELECT pg_backend_pid()")
        .await
        .expect("pid"));
    let again = pid(app
        .simple_query("SELECT pg_backend_pid()")
        .await
        .expect("pid"));
    assert_eq!(first, again, "the pool hands the same connection back");

    // RECONNECT: the next transaction runs on a new server connection.
    admin.simple_query("RECONNECT").await.expect("RECONNECT");
    let after = pid(app
        .simple_query("SELECT pg_backend_pid()")
        .await
        .expect("pid"));
    assert_ne!(after, first, "RECONNECT closed the pooled connection");

    // PAUSE: the client's next statement waits, and is seen waiting.
    admin.simple_query("PAUSE").await.expect("PAUSE");
    let (c, rows) = show(&admin, "SHOW ROUTING").await;
    assert_eq!(cell(&c, &rows[0], "paused_by"), Some("admin PAUSE"));
    let app = std::sync::Arc::new(app);
    let held = {
        let app = app.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            app.simple_query("SELECT 1").await.map(|_| start.elapsed())
        })
    };
    let start = Instant::now();
    loop {
        let (c, rows) = show(&admin, "SHOW POOLS").await;
        let waiting = rows
            .iter()
            .find(|r| cell(&c, r, "database") == Some("postgres"))
            .and_then(|r| cell(&c, r, "cl_waiting"))
            .unwrap_or("0")
            .to_string();
        if waiting == "1" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the client never waited"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "the statement ran during PAUSE");
    admin.simple_query("RESUME").await.expect("RESUME");
    let took = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("resumed in time")
        .expect("task")
        .expect("the held statement succeeds after RESUME");
    assert!(took >= Duration::from_millis(300), "it was held: {took:?}");

    // KILL_CLIENT: the client's session ends.
    let (c, rows) = show(&admin, "SHOW CLIENTS").await;
    let id = rows
        .iter()
        .find(|r| cell(&c, r, "application_name") == Some("victim"))
        .and_then(|r| cell(&c, r, "ptr"))
        .expect("the victim is listed")
        .to_string();
    admin
        .simple_query(&format!("KILL_CLIENT {id}"))
        .await
        .expect("KILL_CLIENT");
    wait_closed(&app, "the client").await;
    assert!(app.simple_query("SELECT 1").await.is_err());
    let e = admin
        .simple_query(&format!("KILL_CLIENT {id}"))
        .await
        .expect_err("gone");
    assert_eq!(code(&e), "42704");

    // RELOAD: a changed file is in force; a bad one is refused and the
    // configuration in force stays.
    let path = &cluster.router.config_path;
    let text = std::fs::read_to_string(path).expect("config");
    std::fs::write(
        path,
        text.replace("mode = \"transaction\"", "mode = \"session\""),
    )
    .expect("write");
    admin.simple_query("RELOAD").await.expect("RELOAD");
    let mode = |rows: &[Vec<Option<String>>], c: &[String]| {
        rows.iter()
            .find(|r| cell(c, r, "key") == Some("pool.mode"))
            .and_then(|r| cell(c, r, "value").map(str::to_string))
    };
    let (c, rows) = show(&admin, "SHOW CONFIG").await;
    assert_eq!(mode(&rows, &c).as_deref(), Some("session"));
    std::fs::write(path, "[router]\nbogus = 1\n").expect("write");
    let e = admin.simple_query("RELOAD").await.expect_err("a bad file");
    let said = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default();
    assert!(
        said.contains("reload refused") && said.contains("bogus"),
        "{said}"
    );
    let (c, rows) = show(&admin, "SHOW CONFIG").await;
    assert_eq!(mode(&rows, &c).as_deref(), Some("session"));

    // SHUTDOWN: the router stops serving.
    admin.simple_query("SHUTDOWN").await.expect("SHUTDOWN");
    let start = Instant::now();
    while !cluster.router.task.is_finished() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the router did not stop"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.router.stop().await;
}

/// `GET /metrics` (Prometheus text): status and body.
fn scrape(addr: SocketAddr) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream
        .write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .expect("request");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_shows_in_show_failovers_and_moves_the_metrics() {
    let port = free_port();
    let cluster = Cluster::start(true, "", &sections(Some(port))).await;
    let metrics: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let app = connect(&cluster.router.url("postgres"))
        .await
        .expect("app client");
    app.simple_query("SELECT 1").await.expect("select");

    let (status, before) = scrape(metrics);
    assert_eq!(status, 200, "{before}");
    let (ok, said) = promtool(&before);
    assert!(ok, "promtool check metrics: {said}\n{before}");
    assert_eq!(
        sample(&before, "hapg_router_primary_changes_total", &[]),
        Some(0.0)
    );
    assert_eq!(sample(&before, "hapg_router_epoch", &[]), Some(1.0));
    assert_eq!(
        sample(&before, "hapg_router_monitor_reachable", &[]),
        Some(1.0)
    );
    assert!(sample(
        &before,
        "pgbouncer_stats_sql_transactions_pooled_total",
        &[]
    )
    .is_some_and(|v| v >= 1.0));
    assert!(sample(&before, "pgbouncer_pools_client_active_connections", &[]).is_some());
    assert!(sample(
        &before,
        "hapg_router_transaction_duration_seconds_count",
        &[]
    )
    .is_some_and(|v| v >= 1.0));

    // The switchover, with a statement held while no primary takes writes.
    cluster
        .monitor
        .set_states(cluster.node_a, "draining", "primary")
        .await;
    cluster.router.wait_routing("paused", |r| r.paused()).await;
    let held = tokio::spawn(async move {
        let r = app.simple_query("SELECT 1").await;
        (r.map(|_| ()), app)
    });
    let waited_start = Instant::now();
    while sample(&scrape(metrics).1, "hapg_router_clients_waiting", &[]) != Some(1.0) {
        assert!(
            waited_start.elapsed() < Duration::from_secs(10),
            "no client waited"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b = cluster.node_b.expect("two nodes");
    cluster.monitor.set_primary(b, 2).await;
    cluster
        .monitor
        .set_states(b, "wait_primary", "wait_primary")
        .await;
    cluster.router.wait_epoch(2).await;
    let (result, _app) = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("in time")
        .expect("task");
    result.expect("the held statement runs on the new primary");

    let admin = console(&cluster.router, "postgres").await.expect("console");
    let (c, rows) = show(&admin, "SHOW FAILOVERS").await;
    assert_eq!(rows.len(), 1, "one primary change: {rows:?}");
    let f = &rows[0];
    assert_eq!(cell(&c, f, "from_epoch"), Some("1"));
    assert_eq!(cell(&c, f, "to_epoch"), Some("2"));
    assert_eq!(cell(&c, f, "to_node_id"), Some(b.to_string().as_str()));
    let held_s: f64 = cell(&c, f, "held_seconds")
        .and_then(|v| v.parse().ok())
        .expect("held");
    assert!(held_s >= 0.2, "the pause lasted at least 200 ms: {held_s}");
    assert_eq!(cell(&c, f, "clients_waited"), Some("1"));

    let (_, after) = scrape(metrics);
    let (ok, said) = promtool(&after);
    assert!(ok, "promtool check metrics: {said}\n{after}");
    assert_eq!(
        sample(&after, "hapg_router_primary_changes_total", &[]),
        Some(1.0)
    );
    assert_eq!(sample(&after, "hapg_router_epoch", &[]), Some(2.0));
    assert_eq!(
        sample(&after, "hapg_router_failover_pause_seconds_count", &[]),
        Some(1.0)
    );
    assert!(
        sample(&after, "hapg_router_failover_pause_seconds_sum", &[]).is_some_and(|s| s >= 0.2)
    );
    assert_eq!(
        sample(&after, "hapg_router_pause_hold_seconds_count", &[]),
        Some(1.0)
    );
    cluster.router.stop().await;
}

#[tokio::test]
async fn a_console_user_missing_from_the_auth_file_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let users = dir.path().join("users.txt");
    std::fs::write(&users, "\"postgres\" \"secret\"\n").expect("userlist");
    let path = dir.path().join("router.toml");
    for (section, key) in [
        ("admin_users = [\"ops\"]", "admin.admin_users"),
        (
            "stats_users = [\"postgres\", \"grafana\"]",
            "admin.stats_users",
        ),
    ] {
        write_config(
            &path,
            "postgres://nobody@127.0.0.1:1/none",
            "",
            &format!(
                "[auth]\ntype = \"md5\"\nfile = \"{}\"\n\n[admin]\n{section}\n",
                users.display()
            ),
        );
        let e = hapg_router::Router::new(path.clone())
            .err()
            .expect("refused");
        let said = e.to_string();
        assert!(said.contains(key) && said.contains("auth.file"), "{said}");
    }
    // With every user in the file, the router starts.
    write_config(
        &path,
        "postgres://nobody@127.0.0.1:1/none",
        "",
        &format!(
            "[auth]\ntype = \"md5\"\nfile = \"{}\"\n\n[admin]\nadmin_users = [\"postgres\"]\n",
            users.display()
        ),
    );
    hapg_router::Router::new(path).expect("known users");
}
