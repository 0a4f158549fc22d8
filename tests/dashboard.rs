//! The Grafana dashboard (docs/hapg-dashboard.json) against real metrics: a
//! real Prometheus (Debian's package) scrapes a running formation's monitor,
//! nodes and router every second, a writer goes through the router and a
//! switchover happens, and then every query of every panel returns data
//! (`promtool query instant`), so that no panel of the dashboard shows a
//! metric that does not exist or is spelled wrong.
//!
//! With `HAPG_DASHBOARD_SCREENSHOT=DIR` (and Debian's chromium installed)
//! the test also renders each panel's queries in Prometheus' own graph view,
//! headless, one PNG per panel in DIR (docs/operations.md shows them).

mod http_support;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hapg::cluster::RouterSpec;
use hapg::drill::Writer;
use http_support::HttpFormation;
use support::{connect, free_port, output_within};

const STEP: Duration = Duration::from_secs(90);

/// A Prometheus server, stopped when dropped.
struct Prometheus {
    child: Child,
    url: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn prometheus_bin() -> PathBuf {
    ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("prometheus (Debian's prometheus package, installed by .ci/install --tests)")
}

/// Starts Prometheus in `dir`, scraping `targets` (job name, address) every second.
fn start_prometheus(dir: &Path, targets: &[(&str, String)]) -> Prometheus {
    let mut config = String::from(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n",
    );
    for (job, addr) in targets {
        config.push_str(&format!(
            "  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']\n"
        ));
    }
    let config_path = dir.join("prometheus.yml");
    std::fs::write(&config_path, config).expect("write prometheus.yml");
    let port = free_port();
    let log = std::fs::File::create(dir.join("prometheus.log")).expect("prometheus log");
    let child = Command::new(prometheus_bin())
        .arg(format!("--config.file={}", config_path.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start prometheus");
    Prometheus {
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

/// `promtool query instant URL EXPR`: what it printed, or its error.
fn query(url: &str, expr: &str) -> Result<String, String> {
    let mut cmd = Command::new("promtool");
    cmd.args(["query", "instant", url, expr]);
    let out = output_within(cmd, Duration::from_secs(20)).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// Every panel query of the dashboard, with Grafana's variables replaced as
/// Grafana would for "all formations" and a 10-minute range.
fn dashboard_queries() -> Vec<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/hapg-dashboard.json");
    let text = std::fs::read_to_string(&path).expect("docs/hapg-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut queries = Vec::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or_default().to_string();
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            let expr = expr.replace("$formation", ".*").replace("$__range", "10m");
            queries.push((title.clone(), expr));
        }
    }
    queries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_a_real_formation() {
    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "{} queries", queries.len());

    let f = HttpFormation::start(&["node_a", "node_b"], &[], STEP);
    f.cluster
        .wait_states(&[("node_a", "primary"), ("node_b", "secondary")], STEP);
    let metrics = format!("127.0.0.1:{}", free_port());
    let spec = RouterSpec {
        sections: format!("[metrics]\nlisten = \"{metrics}\"\n"),
        ..RouterSpec::new("router")
    };
    let router = hapg::cluster::Cluster::start_router(&f.cluster, &spec)
        .unwrap_or_else(|e| panic!("{e}\n{}", f.cluster.all_logs()));
    let dir = f.cluster.path().join("prometheus");
    std::fs::create_dir_all(&dir).expect("prometheus dir");
    let prometheus = start_prometheus(
        &dir,
        &[
            ("monitor", f.addr("monitor").to_string()),
            ("node_a", f.addr("node_a").to_string()),
            ("node_b", f.addr("node_b").to_string()),
            ("router", metrics.clone()),
        ],
    );

    // Traffic through the router, and a primary change it lives through.
    let uri = format!(
        "postgres://postgres@127.0.0.1:{}/appdb?connect_timeout=5",
        router.port
    );
    connect(&uri)
        .await
        .expect("connect through the router")
        .batch_execute("CREATE TABLE dash (id bigint PRIMARY KEY)")
        .await
        .expect("create the writer's table");
    let writer = Writer::start(uri, "dash", Duration::from_secs(120));
    tokio::time::sleep(Duration::from_secs(3)).await;
    f.cluster
        .ok(&["perform", "switchover", "--pgdata", "./monitor"]);
    f.cluster
        .wait_states(&[("node_a", "secondary"), ("node_b", "primary")], STEP);
    // Every target up, and the router's epoch past the switchover, in
    // Prometheus itself.
    let deadline = Instant::now() + STEP;
    loop {
        let up = query(&prometheus.url, "sum(up)").unwrap_or_default();
        let epoch = query(&prometheus.url, "hapg_router_epoch >= 2").unwrap_or_default();
        if up.contains("=> 4 @") && !epoch.trim().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped all four targets after the switchover: up {up:?}, epoch {epoch:?}\n{}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let report = writer.finish().await;
    assert!(
        !report.acked.is_empty(),
        "the writer wrote nothing: {report:?}"
    );

    let mut empty = Vec::new();
    for (title, expr) in &queries {
        match query(&prometheus.url, expr) {
            Ok(out) if !out.trim().is_empty() => {}
            Ok(_) => empty.push(format!("{title}: {expr} (no data)")),
            Err(e) => empty.push(format!("{title}: {expr} ({e})")),
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without data:\n{}",
        empty.join("\n")
    );

    if let Ok(dir) = std::env::var("HAPG_DASHBOARD_SCREENSHOT") {
        screenshot(&prometheus.url, &queries, Path::new(&dir));
    }
}

/// Renders each panel's queries in Prometheus' graph view with headless
/// Chromium, one PNG per panel in the directory `dir` (named by panel order).
fn screenshot(url: &str, queries: &[(String, String)], dir: &Path) {
    std::fs::create_dir_all(dir).expect("screenshot directory");
    let mut panels: Vec<(String, Vec<String>)> = Vec::new();
    for (title, expr) in queries {
        match panels.last_mut() {
            Some((last, exprs)) if last == title => exprs.push(expr.clone()),
            _ => panels.push((title.clone(), vec![expr.clone()])),
        }
    }
    for (n, (_, exprs)) in panels.iter().enumerate() {
        let mut page = format!("{url}/graph?");
        for (i, expr) in exprs.iter().enumerate() {
            let encoded: String = expr
                .bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect();
            page.push_str(&format!(
                "g{i}.expr={encoded}&g{i}.tab=0&g{i}.range_input=5m&g{i}.stacked=0&"
            ));
        }
        let profile = tempfile::tempdir().expect("chromium profile");
        let png = dir.join(format!("panel-{n:02}.png"));
        let status = Command::new("/usr/bin/chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--virtual-time-budget=10000",
                "--window-size=1200,1100",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(format!("--screenshot={}", png.display()))
            .arg(page)
            .stderr(Stdio::null())
            .status()
            .expect("chromium (Debian's chromium package)");
        assert!(status.success(), "chromium failed");
    }
}
