//! A statement in flight on a primary that goes silent: the whole primary
//! node (keeper and Postgres) is frozen with SIGSTOP and stays frozen, as a
//! machine that lost power stays off, while clients write through the
//! router. The kernel of a frozen node still acknowledges what is sent to
//! it, so no socket timeout ends those statements: the router gives them up
//! when the monitor names the new primary (a new epoch), answers each with a
//! class 08 error, and the sessions go on on the new primary. The old
//! primary is thawed only once every writer wrote there, and never
//! acknowledges anything afterwards.
//!
//! The same with the primary's network cut off is in tests/netns.rs.

mod support;

use std::time::Duration;

use hapg::drill::{connect, signal_all, unix_now, Writer};
use hapg::invariants::{Drill, WriteProbe};
use nix::sys::signal::Signal;
use support::phase::create_tables;
use support::{
    assert_in_flight_answered, assigned_at, direct_uri, postmaster_pid, rows, wait_rows,
    wait_writable, Cluster,
};

const STEP: Duration = Duration::from_secs(90);
const WRITERS: usize = 3;
/// How long after the promotion (the monitor assigning the standby
/// `wait_primary`, which moves the epoch) every statement in flight on the
/// frozen primary must have been answered.
const BOUND: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_in_flight_on_a_frozen_primary_are_answered_at_the_promotion() {
    let cluster = Cluster::formation(&["node_a", "node_b"], STEP);
    let monitor_uri = cluster.monitor_uri();
    let router = cluster.start_router("router", "pause_timeout_ms = 30000");
    let uri = router.uri("appdb");
    wait_writable(&uri, STEP).await;

    let tables: Vec<String> = (0..WRITERS).map(|i| format!("in_flight_{i}")).collect();
    create_tables(
        &uri,
        &tables,
        "CREATE TABLE frozen_stale (id bigint PRIMARY KEY);",
    )
    .await;
    let nodes: Vec<(String, String)> = ["node_a", "node_b"]
        .iter()
        .map(|n| (n.to_string(), direct_uri(&cluster, n)))
        .collect();
    let probe = WriteProbe::start(&direct_uri(&cluster, "node_a"), &nodes)
        .await
        .expect("start the write probe");
    let writers: Vec<Writer> = tables
        .iter()
        .map(|t| Writer::start(uri.clone(), t, Duration::from_secs(300)))
        .collect();
    for table in &tables {
        wait_rows(&cluster, &uri, table, 10).await;
    }
    // A connection opened before the freeze, straight to the old primary.
    let stale = connect(&direct_uri(&cluster, "node_a"))
        .await
        .expect("connect to node_a directly");

    let node_a = cluster.node("node_a");
    let mut pids: Vec<i32> = cluster.keeper_pid("node_a").into_iter().collect();
    pids.extend(hapg::drill::process_tree(
        postmaster_pid(&node_a.pgdata).expect("node_a's postmaster"),
    ));
    let frozen_at = unix_now();
    signal_all(&pids, Signal::SIGSTOP);
    let run = async {
        cluster.wait_states(&[("node_b", "wait_primary")], STEP);
        let promoted_at = assigned_at(&monitor_uri, "node_b", "wait_primary", frozen_at)
            .await
            .expect("node_b was promoted");
        // Frozen still: every writer writes on the new primary (nothing
        // reaches node_b but through the router once it is promoted).
        let new = direct_uri(&cluster, "node_b");
        for table in &tables {
            let before = rows(&new, table).await.unwrap_or(0);
            wait_rows(&cluster, &new, table, before).await;
        }
        promoted_at
    };
    let promoted_at = run.await;
    let thawed_at = unix_now();
    signal_all(&pids, Signal::SIGCONT);
    eprintln!(
        "frozen: node_b promoted {:.2} s after the freeze; thawed {:.2} s after the promotion",
        promoted_at - frozen_at,
        thawed_at - promoted_at
    );
    let attempt = tokio::time::timeout(
        Duration::from_secs(10),
        stale.execute("INSERT INTO frozen_stale VALUES (-1)", &[]),
    )
    .await;
    assert!(
        !matches!(attempt, Ok(Ok(_))),
        "the thawed old primary acknowledged a write\n{}",
        cluster.log("node_a")
    );
    drop(stale);
    cluster.wait_states(&[("node_b", "primary"), ("node_a", "secondary")], STEP);
    for table in &tables {
        let before = rows(&uri, table).await.unwrap_or(0);
        wait_rows(&cluster, &uri, table, before + 10).await;
    }
    let mut reports = Vec::new();
    for writer in writers {
        reports.push(writer.finish().await);
    }
    let probe = probe.finish().await;

    let node_b_port = cluster.node("node_b").port;
    let ended = assert_in_flight_answered(
        &reports,
        frozen_at,
        promoted_at,
        BOUND,
        node_b_port,
        &|| format!("router log:\n{}", cluster.log(&router.name)),
    );
    for (i, (r, after)) in reports.iter().zip(&ended).enumerate() {
        eprintln!(
            "writer {i}: in-flight statement answered {after:+.3} s from the promotion ({:?}); {} acknowledged, longest wait {:?}, longest gap {:?}",
            r.failures.first().map(|f| &f.message),
            r.acked.len(),
            r.longest_wait,
            r.longest_gap
        );
        // After the thaw, every acknowledged write ran on the new primary.
        let stray: Vec<_> = r
            .acks
            .iter()
            .filter(|a| a.at > thawed_at && a.port != Some(node_b_port))
            .collect();
        assert!(
            stray.is_empty(),
            "writer {i}: writes acknowledged elsewhere than node_b after the thaw: {stray:?}"
        );
    }
    assert!(
        cluster
            .log(&router.name)
            .contains("the primary changed: cutting the statements still running on the old one"),
        "{}",
        cluster.log(&router.name)
    );
    let node_b_uri = direct_uri(&cluster, "node_b");
    let drill = Drill {
        monitor_uri: &monitor_uri,
        primary_uri: &node_b_uri,
        writers: tables
            .iter()
            .map(String::as_str)
            .zip(reports.iter())
            .collect(),
        probe: Some(&probe),
        through_router: true,
    };
    let broken = drill.violations().await.expect("check the invariants");
    assert!(
        broken.is_empty(),
        "invariants broken:\n{}\n{}",
        broken.join("\n"),
        cluster.all_logs()
    );
    assert_eq!(
        rows(&node_b_uri, "frozen_stale").await,
        Some(0),
        "the write sent to the thawed old primary is on the new primary"
    );
    cluster.terminate(&router.name);
}
