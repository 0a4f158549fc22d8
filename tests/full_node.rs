//! A node whose every connection slot is taken, the superuser-reserved ones
//! included, is running, with real PostgreSQL 15 and real `hapg` processes
//! (issue 23, item 8): its keeper cannot log in, and neither restarts
//! Postgres nor reports it down, so the monitor does not take the standby
//! out of its state.

mod support;

use std::time::{Duration, Instant};

use support::{connect, postmaster_pid, Cluster};

const STEP: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_out_of_connection_slots_is_neither_restarted_nor_reported_down() {
    let cluster = Cluster::formation(&["node_a", "node_b"], STEP);
    let b = cluster.node("node_b");
    let postmaster = postmaster_pid(&b.pgdata).expect("node_b's postmaster");
    // Take every slot of node_b, the reserved ones too, as a superuser.
    let uri = format!("postgres://postgres@127.0.0.1:{}/postgres", b.port);
    // Other short connections (the keeper's own observations, the
    // monitor's) come and go: keep taking the slots they give back until
    // none has come free for 2 s (four keeper rounds).
    let mut held = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut full_since: Option<Instant> = None;
    while full_since.is_none_or(|since| since.elapsed() < Duration::from_secs(2)) {
        assert!(Instant::now() < deadline, "node_b never stayed full");
        match connect(&uri).await {
            Ok(client) => {
                held.push(client);
                full_since = None;
            }
            // 53300, or over TLS the refusal can break the handshake first.
            Err(_) => {
                full_since.get_or_insert_with(Instant::now);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        assert!(
            held.len() < 300,
            "node_b took 300 connections: its Postgres restarted? postmaster {:?} (was {postmaster}), states {:?}\n{}",
            postmaster_pid(&b.pgdata),
            cluster.states(),
            cluster.all_logs()
        );
    }
    assert!(
        cluster
            .log("node_b")
            .contains("refuses the keeper's connection: not restarting it"),
        "the keeper says why it does not restart Postgres\n{}",
        cluster.log("node_b")
    );
    // For the next few reports (every 0.5 s), node_b stays a secondary, its
    // postmaster the same, and the keeper never claims it is not running.
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(4) {
        let states = cluster.states();
        let (reported, goal) = states.get("node_b").cloned().unwrap_or_default();
        assert_eq!(
            (reported.as_str(), goal.as_str()),
            ("secondary", "secondary"),
            "{states:?}\n{}",
            cluster.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(postmaster_pid(&b.pgdata), Some(postmaster));
    assert!(
        !cluster.log("node_b").contains("postgres is not running"),
        "{}",
        cluster.log("node_b")
    );
    // Slots free again: the keeper logs in and the group goes on.
    drop(held);
    cluster.wait_states(&[("node_a", "primary"), ("node_b", "secondary")], STEP);
}
