//! The monitor's state in etcd (issue 26, first part): a real one-member etcd
//! on loopback, one `hapg monitor run --monitor etcd://...` service, two real
//! nodes whose keepers report to etcd: the group forms (single, then primary
//! and secondary), a switchover swaps the roles, and writes go to the node
//! the store names; the service's `--http-listen` endpoints read the same
//! store.

mod http_support;
mod support;

use std::time::{Duration, Instant};

use hapg::etcd::EtcdCluster;
use hapg_monitor::client::NodeRow;
use hapg_monitor::MonitorClient;
use support::{connect, free_port, Cluster};

const STEP: Duration = Duration::from_secs(120);

/// A one-member etcd (`hapg::etcd::EtcdCluster`) in the cluster's
/// directory, and the monitor URI of a prefix in it.
fn start_etcd(cluster: &Cluster) -> (EtcdCluster, String) {
    let dir = cluster.path().join("etcd");
    std::fs::create_dir_all(&dir).expect("etcd directory");
    let etcd = EtcdCluster::start(&dir, 1).expect("a one-member etcd");
    let uri = etcd.uri("hapg-e2e");
    (etcd, uri)
}

fn roles(nodes: &[NodeRow]) -> Vec<(String, String, String)> {
    nodes
        .iter()
        .map(|n| {
            (
                n.name.clone(),
                n.reported.as_str().to_string(),
                n.goal.as_str().to_string(),
            )
        })
        .collect()
}

fn settled(nodes: &[NodeRow], want: &[(&str, &str)]) -> bool {
    want.iter().all(|(name, state)| {
        nodes
            .iter()
            .any(|n| n.name == *name && n.reported.as_str() == *state && n.goal.as_str() == *state)
    })
}

async fn write_on(uri: &str, id: i32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = async {
            let c = connect(uri).await?;
            c.batch_execute("CREATE TABLE IF NOT EXISTS etcd_e2e (id int PRIMARY KEY)")
                .await?;
            c.execute("INSERT INTO etcd_e2e VALUES ($1)", &[&id]).await
        };
        match attempt.await {
            Ok(_) => return,
            Err(e) if Instant::now() < deadline => {
                eprintln!("write {id} on {uri}: {e}; again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("write {id} on {uri}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_forms_and_switches_over_with_its_state_in_etcd() {
    let mut cluster = Cluster::new();
    let (_etcd, uri) = start_etcd(&cluster);
    let http: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
    cluster.spawn(
        "monitor",
        &[
            "monitor",
            "run",
            "--monitor",
            &uri,
            "--http-listen",
            &http.to_string(),
        ],
    );
    let started = Instant::now();
    let mut monitor = loop {
        match MonitorClient::connect(&uri).await {
            Ok(m) => break m,
            Err(e) if started.elapsed() < STEP => {
                eprintln!("store not ready: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!(
                "the monitor service never set up etcd: {e}\n{}",
                cluster.all_logs()
            ),
        }
    };

    let a = cluster.start_node_at("node_a", "localhost", &uri, &[]);
    monitor
        .wait_until("default", "node_a single", STEP, |n| {
            settled(n, &[("node_a", "single")])
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.all_logs()));
    let b = cluster.start_node_at("node_b", "localhost", &uri, &[]);
    let nodes = monitor
        .wait_until("default", "primary and secondary", STEP, |n| {
            settled(n, &[("node_a", "primary"), ("node_b", "secondary")])
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.all_logs()));
    eprintln!("formed: {:?}", roles(&nodes));
    let uri_of = |port: u16| format!("postgres://postgres@localhost:{port}/appdb?sslmode=require");
    write_on(&uri_of(a.port), 1).await;
    let epoch = monitor
        .formation("default")
        .await
        .expect("formation")
        .primary_epoch;

    cluster.ok(&["perform", "switchover", "--monitor", &uri]);
    let nodes = monitor
        .wait_until("default", "roles swapped", STEP, |n| {
            settled(n, &[("node_a", "secondary"), ("node_b", "primary")])
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.all_logs()));
    eprintln!("after the switchover: {:?}", roles(&nodes));
    let formation = monitor.formation("default").await.expect("formation");
    let b_id = nodes.iter().find(|n| n.name == "node_b").map(|n| n.node_id);
    assert_eq!(
        formation.primary_node_id, b_id,
        "the store names node_b writable"
    );
    assert!(formation.primary_epoch > epoch, "a new epoch");
    write_on(&uri_of(b.port), 2).await;
    let rows: i64 = connect(&uri_of(b.port))
        .await
        .expect("connect to the new primary")
        .query_one("SELECT count(*) FROM etcd_e2e", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        rows, 2,
        "the write before the switchover is on the new primary"
    );
    let changes = monitor.primary_changes().await.expect("primary changes");
    eprintln!("primary changes: {changes:?}");
    assert!(
        changes
            .iter()
            .any(|c| c.epoch == formation.primary_epoch && c.duration < STEP),
        "the switchover is measured as a change of primary: {changes:?}"
    );
    // The service's own endpoints read the store it runs on.
    let (status, body) = http_support::get(http, "/health");
    assert_eq!(status, 200, "/health of the monitor service: {body}");
    let (status, metrics) = http_support::get(http, "/metrics");
    assert_eq!(status, 200, "/metrics of the monitor service: {metrics}");
    let (valid, promtool) = http_support::promtool(&metrics);
    assert!(valid, "promtool check metrics: {promtool}\n{metrics}");
    let poll_deadline = Instant::now() + STEP;
    let mut metrics = metrics;
    // The endpoints poll the store: wait (bounded) for the switchover.
    while http_support::sample(
        &metrics,
        "hapg_monitor_node_reported_state",
        &["node=\"node_b\"", "state=\"primary\""],
    ) != Some(1.0)
        && Instant::now() < poll_deadline
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
        metrics = http_support::get(http, "/metrics").1;
    }
    assert_eq!(
        http_support::sample(
            &metrics,
            "hapg_monitor_node_reported_state",
            &["node=\"node_b\"", "state=\"primary\""]
        ),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        http_support::sample(&metrics, "hapg_monitor_failovers_total", &[]).unwrap_or(0.0) >= 1.0,
        "the switchover is counted: {metrics}"
    );
    let events = monitor.events("default", 200).await.expect("events");
    assert!(
        events
            .iter()
            .any(|e| e.description.contains("Switchover requested")),
        "the switchover is in the event log: {events:?}"
    );
}

/// Waits (bounded) until `name`'s log says it leads; the time it took.
fn wait_leading(cluster: &Cluster, name: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cluster.log(name).contains("leading the monitor services") {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "{name} did not take the lead within {limit:?}\n{}",
        cluster.all_logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_other_monitor_service_takes_over_when_the_leader_is_killed() {
    let mut cluster = Cluster::new();
    let (_etcd, uri) = start_etcd(&cluster);
    cluster.spawn("monitor_1", &["monitor", "run", "--monitor", &uri]);
    wait_leading(&cluster, "monitor_1", STEP);
    cluster.spawn("monitor_2", &["monitor", "run", "--monitor", &uri]);
    let mut monitor = MonitorClient::connect(&uri)
        .await
        .expect("the store is set up");
    cluster.start_node_at("node_a", "localhost", &uri, &[]);
    monitor
        .wait_until("default", "node_a single", STEP, |n| {
            settled(n, &[("node_a", "single")])
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.all_logs()));
    cluster.start_node_at("node_b", "localhost", &uri, &[]);
    monitor
        .wait_until("default", "primary and secondary", STEP, |n| {
            settled(n, &[("node_a", "primary"), ("node_b", "secondary")])
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.all_logs()));
    assert!(
        !cluster
            .log("monitor_2")
            .contains("leading the monitor services"),
        "one leader at a time"
    );

    // kill -9 the leading service: the other leads within the lease.
    cluster.power_off_keeper_only("monitor_1");
    let takeover = wait_leading(&cluster, "monitor_2", Duration::from_secs(30));
    eprintln!("monitor_2 leads {takeover:?} after monitor_1 was killed (lease 2 s)");
    assert!(
        takeover < Duration::from_secs(4),
        "takeover took {takeover:?}"
    );

    // The new leader decides: a switchover goes through.
    cluster.ok(&["perform", "switchover", "--monitor", &uri]);
    monitor
        .wait_until("default", "roles swapped", STEP, |n| {
            settled(n, &[("node_a", "secondary"), ("node_b", "primary")])
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.all_logs()));
}
