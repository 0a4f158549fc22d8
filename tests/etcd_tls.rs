//! The monitor's state in an etcd that serves TLS only (issue 26): a real
//! etcd member with certificates of a test CA and client certificates
//! required; a monitor service, a node's keeper and the CLI reach it with
//! `etcd://...?cacert=&cert=&key=`. A CA that did not sign the member's
//! certificate, and plain `etcd://` against the TLS-only member, are refused
//! at once with errors that name the cause.

mod support;

use std::time::{Duration, Instant};

use hapg::etcd::EtcdCluster;
use hapg_monitor::MonitorClient;
use support::Cluster;

const STEP: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monitor_service_and_a_node_work_over_tls_to_etcd() {
    let mut cluster = Cluster::new();
    let etcd =
        EtcdCluster::start_tls(&cluster.path().join("etcd"), 1, true).expect("TLS etcd member");
    let uri = etcd.uri("hapg-tls");
    assert!(uri.contains("?cacert="), "{uri}");
    cluster.spawn("monitor", &["monitor", "run", "--monitor", &uri]);
    let mut monitor = MonitorClient::connect_with_retry(&uri, STEP)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.all_logs()));

    cluster.start_node_at("node_a", "localhost", &uri, &[]);
    monitor
        .wait_until("default", "node_a single", STEP, |nodes| {
            nodes
                .iter()
                .any(|n| n.name == "node_a" && n.reported.as_str() == "single")
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.all_logs()));
    let state = cluster.ok(&["show", "state", "--monitor", &uri]);
    assert!(state.contains("node_a"), "{state}");

    // A CA that did not sign the member's certificate: refused at once
    // (not retried as if etcd were down), naming the certificate and the file.
    let tls = etcd.tls().expect("tls files");
    let wrong_ca = format!(
        "{}?{}",
        etcd.plain_uri("hapg-tls"),
        tls.query(&tls.other_ca)
    );
    let started = Instant::now();
    let error = match MonitorClient::connect_with_retry(&wrong_ca, Duration::from_secs(30)).await {
        Ok(_) => panic!("a member whose certificate the CA did not sign was accepted"),
        Err(e) => e.to_string(),
    };
    eprintln!("wrong CA: {error}");
    assert!(
        error.contains("certificate is not accepted")
            && error.contains(&tls.other_ca.display().to_string()),
        "{error}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "a refused certificate is not retried: {:?}",
        started.elapsed()
    );
    let stderr = cluster.fails(&["show", "state", "--monitor", &wrong_ca]);
    assert!(stderr.contains("certificate is not accepted"), "{stderr}");
    // A monitor service started with it stops at once, saying why.
    let stderr = cluster.fails(&["monitor", "run", "--monitor", &wrong_ca]);
    assert!(stderr.contains("certificate is not accepted"), "{stderr}");

    // Plain etcd:// against the TLS-only member: told to give the CA.
    let plain = etcd.plain_uri("hapg-tls");
    let error = match MonitorClient::connect(&plain).await {
        Ok(_) => panic!("plain http to a TLS-only member was accepted"),
        Err(e) => e.to_string(),
    };
    eprintln!("plain: {error}");
    assert!(error.contains("?cacert=FILE"), "{error}");

    // The member requires a client certificate: without one, refused.
    let no_client_cert = format!("{}?cacert={}", plain, tls.ca.display());
    let error = match MonitorClient::connect(&no_client_cert).await {
        Ok(_) => panic!("a client without a certificate was accepted"),
        Err(e) => e.to_string(),
    };
    eprintln!("no client certificate: {error}");
    assert!(error.contains("give cert=FILE&key=FILE"), "{error}");
}
