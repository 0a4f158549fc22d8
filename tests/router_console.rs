//! The router's admin console and `/metrics` in front of a real two-node
//! formation (real hapg monitor, keepers and PostgreSQL 15, the router as a
//! `hapg router run` process): `hapg perform switchover` under a writer
//! through the router shows in SHOW FAILOVERS (from node A to node B, with
//! how long new work was held) and in SHOW ROUTING's last drain, and moves
//! the failover metrics; `/metrics` passes `promtool check metrics` before
//! and after.

mod http_support;
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use http_support::{get, promtool, sample};
use support::{connect, free_port, wait_writable, Cluster, Writer};
use tokio_postgres::SimpleQueryMessage;

const STEP: Duration = Duration::from_secs(90);

fn scrape(addr: SocketAddr) -> String {
    let (status, body) = get(addr, "/metrics");
    assert_eq!(status, 200, "router /metrics: {body}");
    let (ok, said) = promtool(&body);
    assert!(
        ok,
        "promtool check metrics on the router's /metrics: {said}\n{body}"
    );
    body
}

/// A SHOW's rows as column name to value.
async fn show(
    client: &tokio_postgres::Client,
    command: &str,
) -> Vec<Vec<(String, Option<String>)>> {
    let mut rows = Vec::new();
    for m in client.simple_query(command).await.expect(command) {
        if let SimpleQueryMessage::Row(row) = m {
            rows.push(
                row.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_string(), row.get(i).map(str::to_string)))
                    .collect(),
            );
        }
    }
    rows
}

fn value<'a>(row: &'a [(String, Option<String>)], column: &str) -> Option<&'a str> {
    row.iter()
        .find(|(name, _)| name == column)
        .and_then(|(_, v)| v.as_deref())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_shows_in_the_routers_console_and_metrics() {
    let cluster = Cluster::formation(&["node_a", "node_b"], STEP);
    let metrics_port = free_port();
    let router = cluster.start_router(
        "router",
        &format!(
            "pause_timeout_ms = 30000\n\n[admin]\nadmin_users = [\"postgres\"]\n\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics_port}\""
        ),
    );
    let metrics: SocketAddr = format!("127.0.0.1:{metrics_port}").parse().expect("addr");
    let uri = router.uri("appdb");
    wait_writable(&uri, STEP).await;
    connect(&uri)
        .await
        .expect("connect through the router")
        .batch_execute("CREATE TABLE writes (id bigint PRIMARY KEY)")
        .await
        .expect("create table");
    let before = scrape(metrics);
    assert_eq!(
        sample(&before, "hapg_router_primary_changes_total", &[]),
        Some(0.0)
    );
    assert_eq!(
        sample(&before, "hapg_router_monitor_reachable", &[]),
        Some(1.0)
    );
    let epoch_before = sample(&before, "hapg_router_epoch", &[]).expect("epoch");

    let writer = Writer::start(uri.clone(), "writes", Duration::from_secs(300));
    cluster.eventually("writes through the router", STEP, || {
        sample(
            &scrape(metrics),
            "pgbouncer_stats_sql_transactions_pooled_total",
            &[],
        )
        .is_some_and(|n| n > 20.0)
    });
    cluster.ok(&["perform", "switchover", "--pgdata", "./monitor"]);
    cluster.wait_states(&[("node_a", "secondary"), ("node_b", "primary")], STEP);
    cluster.eventually("the router to count the change", STEP, || {
        sample(&scrape(metrics), "hapg_router_primary_changes_total", &[]) == Some(1.0)
    });
    let report = writer.finish().await;
    assert!(!report.acked.is_empty(), "the writer wrote");

    let admin = connect(&format!(
        "postgres://postgres@127.0.0.1:{}/pgbouncer",
        router.port
    ))
    .await
    .expect("console login");
    let failovers = show(&admin, "SHOW FAILOVERS").await;
    assert_eq!(failovers.len(), 1, "one primary change: {failovers:?}");
    let f = &failovers[0];
    let (a, b) = (cluster.node("node_a"), cluster.node("node_b"));
    let ends = |column: &str, port: u16| {
        value(f, column).is_some_and(|v| v.ends_with(&format!(":{port}")))
    };
    assert!(
        ends("from_address", a.port) && ends("to_address", b.port),
        "{f:?}"
    );
    let held: f64 = value(f, "held_seconds")
        .and_then(|v| v.parse().ok())
        .expect("held");
    assert!(
        held > 0.0 && held < 30.0,
        "new work was held a while: {held} s"
    );
    let routing = show(&admin, "SHOW ROUTING").await;
    assert_eq!(value(&routing[0], "paused"), Some("false"));
    assert!(
        value(&routing[0], "last_drain_epoch").is_some(),
        "{routing:?}"
    );

    let after = scrape(metrics);
    assert_eq!(
        sample(&after, "hapg_router_primary_changes_total", &[]),
        Some(1.0)
    );
    assert!(sample(&after, "hapg_router_epoch", &[]).expect("epoch") > epoch_before);
    assert_eq!(
        sample(&after, "hapg_router_failover_pause_seconds_count", &[]),
        Some(1.0)
    );
    let sum = sample(&after, "hapg_router_failover_pause_seconds_sum", &[]).expect("sum");
    assert!(
        (sum - held).abs() < 0.01,
        "the metric and the console agree: {sum} vs {held}"
    );
    println!(
        "switchover seen by the router: new work held {held:.3} s, writer: {} acked, {} errors, longest wait {:?}",
        report.acked.len(),
        report.errors,
        report.longest_wait
    );
}

/// Where a read session's statement ran: (in recovery, the node's port).
async fn where_served(client: &tokio_postgres::Client) -> (bool, i32) {
    let row = client
        .query_one("SELECT pg_is_in_recovery(), inet_server_port()", &[])
        .await
        .expect("read");
    (row.get(0), row.get(1))
}

/// The read port's pools in SHOW POOLS and SHOW SERVERS (a database of
/// their own per standby), its sessions per standby in `/metrics`, and a
/// move counted when the standby leaves the read pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_pools_show_in_the_console_and_the_metrics() {
    let cluster = Cluster::formation(&["node_a", "node_b"], STEP);
    let (metrics_port, read_port) = (free_port(), free_port());
    let router = cluster.start_router(
        "router",
        &format!(
            "listen_read_only = \"127.0.0.1:{read_port}\"\n\n\
             [read_only]\nmax_lag_bytes = 1048576\nlag_check_interval_ms = 200\nfallback = \"primary\"\n\n\
             [admin]\nadmin_users = [\"postgres\"]\n\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics_port}\""
        ),
    );
    let metrics: SocketAddr = format!("127.0.0.1:{metrics_port}").parse().expect("addr");
    wait_writable(&router.uri("appdb"), STEP).await;
    let read_uri = format!("postgres://postgres@127.0.0.1:{read_port}/appdb");
    let b = cluster.node("node_b");
    let b_address = format!(":{}\"", b.port);
    // Two read sessions on the standby (session pooling: each keeps its
    // server connection).
    let mut readers = Vec::new();
    cluster.eventually("the standby in the read pool", STEP, || {
        sample(&scrape(metrics), "hapg_router_read_sessions", &[&b_address]).is_some()
    });
    for _ in 0..2 {
        let client = connect(&read_uri).await.expect("read port");
        assert_eq!(where_served(&client).await, (true, i32::from(b.port)));
        readers.push(client);
    }
    let admin = connect(&format!(
        "postgres://postgres@127.0.0.1:{}/pgbouncer",
        router.port
    ))
    .await
    .expect("console login");
    let is_read = |row: &[(String, Option<String>)]| {
        value(row, "database").is_some_and(|d| d.starts_with("appdb (read node "))
    };
    let pools = show(&admin, "SHOW POOLS").await;
    let read_pool = pools
        .iter()
        .find(|r| is_read(r))
        .unwrap_or_else(|| panic!("a read pool row: {pools:?}"));
    assert_eq!(value(read_pool, "sv_active"), Some("2"), "{read_pool:?}");
    let servers = show(&admin, "SHOW SERVERS").await;
    let read_servers: Vec<_> = servers.iter().filter(|r| is_read(r)).collect();
    assert_eq!(read_servers.len(), 2, "{servers:?}");
    for s in &read_servers {
        assert_eq!(value(s, "state"), Some("active"), "{s:?}");
        assert_eq!(value(s, "port"), Some(b.port.to_string().as_str()));
        assert!(value(s, "link").is_some_and(|l| !l.is_empty()), "{s:?}");
    }
    let body = scrape(metrics);
    assert_eq!(
        sample(&body, "hapg_router_read_sessions", &[&b_address]),
        Some(2.0)
    );
    assert_eq!(
        sample(&body, "hapg_router_read_moves_total", &[]),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &body,
            "pgbouncer_pools_server_active_connections",
            &["database=\"appdb (read node "]
        ),
        Some(2.0)
    );

    // The standby's replay paused while the primary writes past
    // max_lag_bytes: it leaves the read pool, each session gives up its
    // connection there at once (a move), and its next statement goes to
    // the primary (the fallback, no other standby being eligible).
    let on_b = connect(&format!("postgres://postgres@127.0.0.1:{}/appdb", b.port))
        .await
        .expect("connect to node_b");
    on_b.batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .expect("pause replay");
    connect(&router.uri("appdb"))
        .await
        .expect("write through the router")
        .batch_execute(
            "CREATE TABLE lag (g int, pad text);
             INSERT INTO lag SELECT g, repeat('x', 1000) FROM generate_series(1, 3000) g;",
        )
        .await
        .expect("write");
    let deadline = std::time::Instant::now() + STEP;
    loop {
        let probe = connect(&read_uri).await.expect("read port");
        if !where_served(&probe).await.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node_b never left the read pool"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for client in &readers {
        assert!(!where_served(client).await.0, "moved to the primary");
    }
    // Both sessions moved (a probe caught between its pick and the
    // standby's leaving would count too).
    let moves = sample(&scrape(metrics), "hapg_router_read_moves_total", &[]).expect("moves");
    assert!(moves >= 2.0, "{moves} moves");
    on_b.batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .expect("resume replay");
}
