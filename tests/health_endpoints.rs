//! The HTTP health checks and metrics of `hapg run` (docs/operations.md) on a
//! running two-node formation with real PostgreSQL 15: `/primary` and
//! `/replica` name the right node before and after a switchover, `?lag=`
//! bounds a standby whose replay is paused, bad parameters get 400, `/state`
//! carries its fields, and every `/metrics` passes `promtool check metrics`,
//! with the monitor's failover counter moving on the switchover.

mod http_support;
mod support;

use std::io::Write;
use std::time::Duration;

use http_support::{promtool, sample, HttpFormation};
use support::{connect, direct_uri};

const STEP: Duration = Duration::from_secs(90);

fn check_metrics(f: &HttpFormation, name: &str) -> String {
    let (status, body) = f.get(name, "/metrics");
    assert_eq!(status, 200, "{name} /metrics: {body}");
    let (ok, said) = promtool(&body);
    assert!(
        ok,
        "promtool check metrics on {name}'s /metrics: {said}\n{body}"
    );
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_follow_the_primary_and_metrics_pass_promtool() {
    let f = HttpFormation::start(&["node_a", "node_b"], &[], STEP);
    let c = &f.cluster;

    // The primary and the standby, as the keepers last saw them.
    f.wait_status("node_a", "/primary", 200, STEP);
    f.wait_status("node_b", "/replica", 200, STEP);
    for (name, path, want) in [
        ("node_a", "/primary", 200),
        ("node_a", "/read-write", 200),
        ("node_a", "/replica", 503),
        ("node_a", "/read-only", 200),
        ("node_a", "/health", 200),
        ("node_a", "/liveness", 200),
        ("node_b", "/primary", 503),
        ("node_b", "/replica", 200),
        ("node_b", "/read-only", 200),
        ("node_b", "/health", 200),
        ("node_b", "/liveness", 200),
        ("node_b", "/replica?lag=16MB", 200),
        ("node_b", "/replica?lag=1h", 200),
        ("monitor", "/health", 200),
        ("monitor", "/liveness", 200),
    ] {
        assert_eq!(f.get(name, path).0, want, "{name} {path}");
    }

    // Bad input: 400 naming the parameter; unknown paths 404; no body read.
    for (name, path, named) in [
        ("node_b", "/replica?lag=abc", "lag"),
        ("node_b", "/replica?lag=5parsecs", "lag"),
        ("node_b", "/replica?lag=16MB&since=1", "since"),
        ("node_a", "/primary?lag=1", "lag"),
        ("monitor", "/health?verbose=1", "verbose"),
    ] {
        let (status, body) = f.get(name, path);
        assert_eq!(status, 400, "{name} {path}: {body}");
        assert!(body.contains(named), "{name} {path}: {body}");
    }
    assert_eq!(f.get("node_a", "/nope").0, 404);

    // http.listen is a setting like the others.
    assert_eq!(
        c.ok(&["config", "get", "--pgdata", "./node_a", "http.listen"])
            .trim(),
        f.addr("node_a").to_string()
    );
    let err = c.fails(&[
        "config",
        "set",
        "--pgdata",
        "./node_a",
        "http.listen",
        "nowhere",
    ]);
    assert!(err.contains("http.listen"), "{err}");
    // Prometheus, which asks for OpenMetrics, gets it.
    let (status, body) = http_support::get_with(
        f.addr("node_a"),
        "/metrics",
        "Accept: application/openmetrics-text; version=1.0.0\r\n",
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.trim_end().ends_with("# EOF"), "{body}");
    hostile_clients_are_bounded(&f);

    // /state: the keeper's view as JSON.
    for (name, state) in [("node_a", "primary"), ("node_b", "secondary")] {
        let (status, body) = f.get(name, "/state");
        assert_eq!(status, 200, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).expect("/state is JSON");
        assert_eq!(json["name"], name, "{body}");
        assert_eq!(json["reported_state"], state, "{body}");
        assert_eq!(json["assigned_state"], state, "{body}");
        assert!(
            json["lsn"].as_str().is_some_and(|l| l.contains('/')),
            "{body}"
        );
        assert!(json["timeline"].as_i64().is_some_and(|t| t >= 1), "{body}");
        assert!(json.get("lag_bytes").is_some(), "{body}");
        assert!(json.get("lag_seconds").is_some(), "{body}");
        assert_eq!(json["primary"], name == "node_a", "{body}");
    }
    let (_, monitor_state) = f.get("monitor", "/state");
    let json: serde_json::Value = serde_json::from_str(&monitor_state).expect("JSON");
    assert_eq!(
        json["nodes"].as_array().map(Vec::len),
        Some(2),
        "{monitor_state}"
    );

    // ?lag= bounds a standby that falls behind: pause its replay, write on
    // the primary, and it is no replica within 1 kB or 1 s, still within 1 GB.
    let standby = connect(&direct_uri(c, "node_b")).await.expect("standby");
    let primary = connect(&direct_uri(c, "node_a")).await.expect("primary");
    standby
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .expect("pause replay");
    primary
        .batch_execute(
            "CREATE TABLE filler AS SELECT g, repeat('x', 100) AS pad FROM generate_series(1, 20000) g",
        )
        .await
        .expect("write on the primary");
    f.wait_status("node_b", "/replica?lag=1kB", 503, STEP);
    f.wait_status("node_b", "/replica?lag=1s", 503, STEP);
    assert_eq!(f.get("node_b", "/replica?lag=1GB").0, 200);
    assert_eq!(f.get("node_b", "/read-only?lag=1kB").0, 503);
    assert_eq!(
        f.get("node_b", "/replica").0,
        200,
        "no bound, still a replica"
    );
    let (_, body) = f.get("node_b", "/state");
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert!(
        json["lag_bytes"].as_u64().is_some_and(|b| b > 1024),
        "{body}"
    );
    standby
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .expect("resume replay");
    f.wait_status("node_b", "/replica?lag=1kB", 200, STEP);

    // Every /metrics passes promtool, and says what the endpoints say.
    let a = check_metrics(&f, "node_a");
    assert_eq!(
        sample(&a, "hapg_node_reported_state", &["state=\"primary\""]),
        Some(1.0),
        "{a}"
    );
    assert_eq!(sample(&a, "hapg_node_primary", &[]), Some(1.0), "{a}");
    assert!(
        sample(&a, "hapg_node_lsn_bytes", &[]).is_some_and(|l| l > 0.0),
        "{a}"
    );
    let b = check_metrics(&f, "node_b");
    assert_eq!(sample(&b, "hapg_node_replica", &[]), Some(1.0), "{b}");
    assert!(
        sample(&b, "hapg_node_replay_lag_bytes", &[]).is_some(),
        "{b}"
    );
    // The monitor's health verdict reaches the node's metrics.
    let mut seen = String::new();
    c.eventually(
        "node_b's metrics to carry the monitor's health",
        STEP,
        || {
            seen = f.get("node_b", "/metrics").1;
            sample(&seen, "hapg_node_monitor_health", &["health=\"good\""]) == Some(1.0)
        },
    );
    let m = check_metrics(&f, "monitor");
    let failovers = |body: &str| {
        sample(
            body,
            "hapg_monitor_failovers_total",
            &["formation=\"default\""],
        )
        .unwrap_or(0.0)
    };
    let before = failovers(&m);
    assert_eq!(
        sample(
            &m,
            "hapg_monitor_node_reported_state",
            &["node=\"node_a\"", "state=\"primary\""]
        ),
        Some(1.0),
        "{m}"
    );

    // A switchover: the endpoints follow, and the monitor counts it.
    c.ok(&[
        "perform",
        "switchover",
        "--pgdata",
        "./monitor",
        "--formation",
        "default",
    ]);
    c.wait_states(&[("node_a", "secondary"), ("node_b", "primary")], STEP);
    f.wait_status("node_b", "/primary", 200, STEP);
    f.wait_status("node_a", "/replica", 200, STEP);
    assert_eq!(f.get("node_a", "/primary").0, 503);
    assert_eq!(f.get("node_b", "/replica").0, 503);
    let (_, body) = f.get("node_b", "/state");
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(json["reported_state"], "primary", "{body}");
    let mut m = String::new();
    c.eventually("the monitor's failover counter to move", STEP, || {
        m = f.get("monitor", "/metrics").1;
        failovers(&m) == before + 1.0
    });
    let m = check_metrics(&f, "monitor");
    assert!(
        sample(
            &m,
            "hapg_monitor_failover_duration_seconds_count",
            &["formation=\"default\""]
        ) == Some(before + 1.0),
        "{m}"
    );
    let last = sample(
        &m,
        "hapg_monitor_last_failover_duration_seconds",
        &["formation=\"default\""],
    )
    .expect("a duration");
    assert!(last > 0.0 && last < 60.0, "{m}");
    eprintln!("health_endpoints: the monitor measured the switchover at {last:.3} s");
    check_metrics(&f, "node_a");
    check_metrics(&f, "node_b");

    // A hapg.toml written before [http] existed: config get shows the
    // default and config set adds the key (for the next hapg run).
    let file = c.path().join("xdg/config/hapg").join(
        c.path()
            .join("node_a")
            .strip_prefix("/")
            .expect("absolute")
            .join("hapg.toml"),
    );
    let text = std::fs::read_to_string(&file).expect("hapg.toml");
    let old = text
        .split("\n[")
        .filter(|section| !section.starts_with("http]"))
        .collect::<Vec<_>>()
        .join("\n[");
    assert!(!old.contains("[http]"), "{old}");
    std::fs::write(&file, &old).expect("write the old file");
    assert_eq!(
        c.ok(&["config", "get", "--pgdata", "./node_a", "http.listen"])
            .trim(),
        ""
    );
    c.ok(&[
        "config",
        "set",
        "--pgdata",
        "./node_a",
        "http.listen",
        "127.0.0.1:18008",
    ]);
    assert_eq!(
        c.ok(&["config", "get", "--pgdata", "./node_a", "http.listen"])
            .trim(),
        "127.0.0.1:18008"
    );
}

/// A hostile client: the server closes a connection that never sends its
/// headers, refuses a request line larger than its buffer and other methods
/// than GET and HEAD, and still answers afterwards.
fn hostile_clients_are_bounded(f: &HttpFormation) {
    let addr = f.addr("node_a");

    // Silent: closed after the header timeout (5 s), not held forever.
    let started = std::time::Instant::now();
    let mut silent = std::net::TcpStream::connect(addr).expect("connect");
    silent
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    silent
        .write_all(b"GET /primary HTTP/1.1\r\n")
        .expect("partial");
    let mut buf = [0u8; 512];
    let n = std::io::Read::read(&mut silent, &mut buf).unwrap_or(0);
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(15),
        "a silent client was held for {waited:?}"
    );
    let _ = n;

    // Huge headers: refused (431 or the connection closed), never served.
    let mut big = std::net::TcpStream::connect(addr).expect("connect");
    big.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let header = format!(
        "GET /primary HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let _ = big.write_all(header.as_bytes());
    let mut response = Vec::new();
    let _ = std::io::Read::read_to_end(&mut big, &mut response);
    let text = String::from_utf8_lossy(&response);
    assert!(!text.starts_with("HTTP/1.1 200"), "{text}");

    // Other methods are refused; the server still answers afterwards.
    let mut post = std::net::TcpStream::connect(addr).expect("connect");
    post.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    post.write_all(
        b"POST /primary HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    )
    .expect("post");
    let mut response = Vec::new();
    let _ = std::io::Read::read_to_end(&mut post, &mut response);
    assert!(
        String::from_utf8_lossy(&response).starts_with("HTTP/1.1 405"),
        "{}",
        String::from_utf8_lossy(&response)
    );
    assert_eq!(f.get("node_a", "/primary").0, 200);
}
