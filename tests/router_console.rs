//! The router's admin console and `/metrics` in front of a real two-node
//! formation (real hapg monitor, keepers and PostgreSQL 15, the router as a
//! `hapg router run` process): `hapg perform switchover` under a writer
//! through the router shows in SHOW FAILOVERS (from node A to node B, with
//! how long new work was held) and in SHOW ROUTING's last drain, and moves
//! the failover metrics; `/metrics` passes `promtool check metrics` before
//! and after.

mod http_support;
mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use http_support::{get, sample};
use support::{connect, free_port, wait_writable, Cluster, Writer};
use tokio_postgres::SimpleQueryMessage;

const STEP: Duration = Duration::from_secs(90);

fn promtool(body: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package, installed by .ci/install)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

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
