//! The invariant checker (`hapg::invariants`) catches what it claims to,
//! against a real monitor and a real Postgres: an acknowledged write that is
//! missing, a row no client sent, a node writable again after another one
//! was (a probe that sees a, b, a), a write on a node the monitor never named
//! writable, and a check with no evidence at all. Each case is also shown
//! passing when nothing is wrong, so a check that always complains would
//! fail here too.

mod support;

use std::time::Duration;

use hapg::drill::{connect, Ack, WriterReport};
use hapg::invariants::{Drill, ProbeReport, WriteProbe, PROBE_TABLE};
use support::Cluster;

const STEP: Duration = Duration::from_secs(120);

fn node_uri(cluster: &Cluster) -> String {
    format!(
        "postgres://postgres@127.0.0.1:{}/appdb",
        cluster.node("node_a").port
    )
}

/// A writer that sent ids 1..=attempted and was acknowledged `acked`.
fn report(attempted: i64, acked: &[i64]) -> WriterReport {
    WriterReport {
        acked: acked.to_vec(),
        attempted,
        ..WriterReport::default()
    }
}

async fn violations(
    cluster: &Cluster,
    writers: Vec<(&str, &WriterReport)>,
    probe: Option<&ProbeReport>,
    through_router: bool,
) -> Vec<String> {
    let monitor_uri = cluster.monitor_uri();
    let primary_uri = node_uri(cluster);
    Drill {
        monitor_uri: &monitor_uri,
        primary_uri: &primary_uri,
        writers,
        probe,
        through_router,
    }
    .violations()
    .await
    .expect("the checker runs")
}

fn has(violations: &[String], text: &str) -> bool {
    violations.iter().any(|v| v.contains(text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_what_it_claims() {
    let cluster = Cluster::formation(&["node_a"], STEP);
    let uri = node_uri(&cluster);
    let client = connect(&uri).await.expect("connect to node_a");
    client
        .batch_execute(
            "CREATE TABLE acked (id bigint PRIMARY KEY);
             INSERT INTO acked SELECT generate_series(1, 5);
             CREATE TABLE unsent (id bigint PRIMARY KEY);
             INSERT INTO unsent SELECT generate_series(1, 5);
             INSERT INTO unsent VALUES (9);",
        )
        .await
        .expect("create the tables");

    // Every acknowledged write is there: nothing to say.
    let all_there = report(5, &[1, 2, 3, 4, 5]);
    let found = violations(&cluster, vec![("acked", &all_there)], None, false).await;
    assert!(found.is_empty(), "{found:?}");

    // Id 6 was acknowledged but is not on the primary.
    let lost = report(6, &[1, 2, 3, 4, 5, 6]);
    let found = violations(&cluster, vec![("acked", &lost)], None, false).await;
    assert!(
        has(
            &found,
            "acked: 1 acknowledged writes are not on the final primary: [6]"
        ),
        "{found:?}"
    );

    // Id 9 is on the primary, but the writer never sent more than 5.
    let sent_five = report(5, &[1, 2, 3, 4, 5]);
    let found = violations(&cluster, vec![("unsent", &sent_five)], None, false).await;
    assert!(
        has(&found, "unsent: rows no client sent") && has(&found, "[9]"),
        "{found:?}"
    );
    let sent_nine = report(9, &[1, 2, 3, 4, 5]);
    let found = violations(&cluster, vec![("unsent", &sent_nine)], None, false).await;
    assert!(
        found.is_empty(),
        "id 9 was sent, if not acknowledged: {found:?}"
    );

    // A write on a port the monitor never named writable (through a router,
    // every write must run where the monitor said), next to one on node_a,
    // which is `single`.
    let now = client
        .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
        .await
        .expect("clock")
        .get::<_, f64>(0);
    let port = cluster.node("node_a").port;
    let mut routed = report(5, &[1, 2, 3, 4, 5]);
    routed.acks = vec![Ack {
        id: 1,
        port: Some(port),
        at: now,
    }];
    let found = violations(&cluster, vec![("acked", &routed)], None, true).await;
    assert!(found.is_empty(), "{found:?}");
    routed.acks.push(Ack {
        id: 2,
        port: Some(1),
        at: now,
    });
    let found = violations(&cluster, vec![("acked", &routed)], None, true).await;
    assert!(
        has(&found, "a write ran on the node on port 1"),
        "{found:?}"
    );

    // The probe writes to "a" and "b", two names for the same writable
    // Postgres: it sees a, b, a, which is two writable nodes.
    let nodes = vec![
        ("a".to_string(), uri.clone()),
        ("b".to_string(), uri.clone()),
    ];
    let probe = WriteProbe::start(&uri, &nodes).await.expect("probe");
    let deadline = std::time::Instant::now() + STEP;
    loop {
        let counts: Vec<i64> = client
            .query(
                &format!("SELECT count(*) FROM {PROBE_TABLE} GROUP BY node"),
                &[],
            )
            .await
            .expect("count the probe's rows")
            .iter()
            .map(|r| r.get(0))
            .collect();
        if counts.len() == 2 && counts.iter().all(|n| *n >= 3) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the probe did not write: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let probe = probe.finish().await;
    assert!(probe.failures.is_empty(), "{:?}", probe.failures);
    let found = violations(&cluster, vec![], Some(&probe), false).await;
    assert!(has(&found, "two writable nodes"), "{found:?}");
    // The same writes, all from one name: one writable node, nothing wrong.
    let mut one_node = probe.clone();
    for write in &mut one_node.writes {
        write.node = "a".to_string();
    }
    let found = violations(&cluster, vec![], Some(&one_node), false).await;
    assert!(found.is_empty(), "{found:?}");

    // No evidence is not a pass: a probe that recorded nothing, a writer
    // that sent nothing (a task that failed returns such empty reports).
    let found = violations(
        &cluster,
        vec![("acked", &WriterReport::default())],
        Some(&ProbeReport::default()),
        false,
    )
    .await;
    assert!(
        has(&found, "the probe recorded no write on any node")
            && has(&found, "acked: the writer sent nothing"),
        "{found:?}"
    );
}
