//! A real HAProxy in front of a two-node formation, routing to the primary
//! by the nodes' `/primary` health checks (`option httpchk GET /primary`,
//! `http-check expect status 200`, as docs/operations.md configures it),
//! without the router: a writer through it follows the primary across a
//! switchover and a power-off of the primary (SIGKILL of its keeper and its
//! Postgres process tree), and no acknowledged write is lost. A second
//! listener checks `/replica?lag=16MB` and reaches the standby only.

mod http_support;
mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use hapg::drill::{lost_writes, unix_now, Writer};
use http_support::HttpFormation;
use support::{connect, direct_uri, free_port, output_within};

const STEP: Duration = Duration::from_secs(90);

fn haproxy_bin() -> PathBuf {
    [
        "/usr/sbin/haproxy",
        "/usr/local/sbin/haproxy",
        "/usr/bin/haproxy",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("haproxy (Debian's haproxy package, installed by .ci/install)")
}

/// The configuration docs/operations.md gives, with quicker checks so the
/// test is short: a read-write port on `/primary`, a read-only port on
/// `/replica?lag=16MB`.
fn haproxy_config(f: &HttpFormation, write_port: u16, read_port: u16) -> String {
    let servers = |indent: &str| {
        ["node_a", "node_b"]
            .iter()
            .map(|name| {
                let node = f.cluster.node(name);
                format!(
                    "{indent}server {name} 127.0.0.1:{} check port {}\n",
                    node.port,
                    f.addr(name).port()
                )
            })
            .collect::<String>()
    };
    format!(
        "global\n    maxconn 200\n\
         defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 60s\n    timeout server 60s\n    timeout check 2s\n\
         listen primary\n    bind 127.0.0.1:{write_port}\n    option httpchk GET /primary\n    http-check expect status 200\n    default-server inter 300ms fall 2 rise 1 on-marked-down shutdown-sessions\n{}\
         listen replicas\n    bind 127.0.0.1:{read_port}\n    balance roundrobin\n    option httpchk GET /replica?lag=16MB\n    http-check expect status 200\n    default-server inter 300ms fall 2 rise 1 on-marked-down shutdown-sessions\n{}",
        servers("    "),
        servers("    ")
    )
}

/// Waits (bounded) until the writer has an acknowledged write that ran on
/// `port` after `after` (Unix seconds).
async fn wait_acked_on(f: &HttpFormation, uri: &str, port: u16, after: f64, what: &str) {
    let deadline = Instant::now() + STEP;
    while Instant::now() < deadline {
        if let Ok(client) = connect(uri).await {
            if let Ok(row) = client
                .query_one(
                    "SELECT inet_server_port(), extract(epoch FROM clock_timestamp())::float8",
                    &[],
                )
                .await
            {
                let (p, at): (Option<i32>, f64) = (row.get(0), row.get(1));
                if p == Some(i32::from(port)) && at > after {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{what}: HAProxy did not reach port {port} within {STEP:?}\n{}",
        f.cluster.all_logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_follows_the_primary_through_switchover_and_power_off() {
    let f = HttpFormation::start(&["node_a", "node_b"], &[], STEP);
    let c = &f.cluster;
    let (port_a, port_b) = (c.node("node_a").port, c.node("node_b").port);
    f.wait_status("node_a", "/primary", 200, STEP);
    f.wait_status("node_b", "/replica", 200, STEP);

    let (write_port, read_port) = (free_port(), free_port());
    let config = c.path().join("haproxy.cfg");
    std::fs::write(&config, haproxy_config(&f, write_port, read_port)).expect("haproxy.cfg");
    let mut check = Command::new(haproxy_bin());
    check.arg("-c").arg("-f").arg(&config);
    let out = output_within(check, Duration::from_secs(30)).expect("haproxy -c");
    assert!(
        out.status.success(),
        "haproxy -c: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut haproxy = Command::new(haproxy_bin());
    haproxy.arg("-db").arg("-f").arg(&config);
    c.spawn_command("haproxy", haproxy);

    let through = format!("postgres://postgres@127.0.0.1:{write_port}/appdb");
    let read_only = format!("postgres://postgres@127.0.0.1:{read_port}/appdb");
    connect(&direct_uri(c, "node_a"))
        .await
        .expect("primary")
        .batch_execute("CREATE TABLE t (id bigint PRIMARY KEY)")
        .await
        .expect("create table");
    wait_acked_on(&f, &through, port_a, 0.0, "at start").await;
    wait_acked_on(&f, &read_only, port_b, 0.0, "the read-only port").await;

    let writer = Writer::start(through.clone(), "t", Duration::from_secs(300));
    support::wait_rows(c, &direct_uri(c, "node_a"), "t", 20).await;

    // Switchover: HAProxy's checks move the writes to node_b.
    let switched = unix_now();
    c.ok(&[
        "perform",
        "switchover",
        "--pgdata",
        "./monitor",
        "--formation",
        "default",
    ]);
    c.wait_states(&[("node_a", "secondary"), ("node_b", "primary")], STEP);
    wait_acked_on(&f, &through, port_b, switched, "after the switchover").await;
    wait_acked_on(
        &f,
        &read_only,
        port_a,
        switched,
        "the read-only port after the switchover",
    )
    .await;
    let before_power_off = support::wait_rows(c, &direct_uri(c, "node_b"), "t", 0).await;
    support::wait_rows(c, &direct_uri(c, "node_b"), "t", before_power_off + 20).await;

    // Power-off of the primary: its /primary stops answering, node_a's
    // answers 200 once promoted, and HAProxy follows.
    let powered_off = unix_now();
    c.power_off("node_b");
    c.wait_states(&[("node_a", "wait_primary")], STEP);
    wait_acked_on(&f, &through, port_a, powered_off, "after the power-off").await;
    let after = support::wait_rows(c, &direct_uri(c, "node_a"), "t", 0).await;
    support::wait_rows(c, &direct_uri(c, "node_a"), "t", after + 20).await;

    let report = writer.finish().await;
    let on = |port: u16, from: f64| {
        report
            .acks
            .iter()
            .filter(|a| a.port == Some(port) && a.at > from)
            .count()
    };
    assert!(
        on(port_b, switched) > 0,
        "no write reached node_b: {report:?}"
    );
    assert!(
        on(port_a, powered_off) > 0,
        "no write reached node_a after the power-off: {report:?}"
    );
    // Never on the old primary once the new one took a write.
    let first_on_b = report
        .acks
        .iter()
        .find(|a| a.port == Some(port_b))
        .map(|a| a.at)
        .expect("a write on node_b");
    assert!(
        !report
            .acks
            .iter()
            .any(|a| a.port == Some(port_a) && a.at > first_on_b && a.at < powered_off),
        "a write ran on the old primary after the switchover: {report:?}"
    );
    let lost = lost_writes(&direct_uri(c, "node_a"), "t", &report.acked)
        .await
        .expect("read the new primary");
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost through HAProxy: {lost:?}",
        lost.len()
    );
    let first_after = |port: u16, from: f64| {
        report
            .acks
            .iter()
            .find(|a| a.port == Some(port) && a.at > from)
            .map_or(f64::NAN, |a| a.at - from)
    };
    eprintln!(
        "haproxy: {} writes acknowledged, {} errors, longest gap {:?}; first write on the new primary {:.2} s after perform switchover began, {:.2} s after the power-off",
        report.acked.len(),
        report.errors,
        report.longest_gap,
        first_after(port_b, switched),
        first_after(port_a, powered_off)
    );
}
