//! One fault as the fault tests run it, whatever keeps the monitor's state
//! (its Postgres, or etcd): a probe that writes to every node directly and
//! writers through the router start before the fault; after it the group
//! has converged, and the invariant checker (`hapg::invariants::Drill`)
//! must find nothing broken. The monitor's events are read through
//! `MonitorClient`, so the same checks hold for both stores.

use std::time::{Duration, Instant};

use hapg::drill::{connect, Writer, WriterReport};
use hapg::invariants::{Drill, WriteProbe};
use hapg_monitor::MonitorClient;

use super::{direct_uri, rows, wait_rows, wait_writable, Cluster, RouterProcess};

/// How long one step of a phase may take.
const STEP: Duration = Duration::from_secs(90);
/// Writers per phase, each on its own table.
pub const WRITERS: usize = 2;
/// Events read back at most (the etcd store keeps 2,000).
const EVENTS: i64 = 5000;

/// An event: (node name, assigned state, description).
pub type Event = (String, String, String);

/// Runs `extra_ddl`, then creates one writer table (`id bigint PRIMARY KEY`)
/// per name in `tables`, in one batch through the router at `uri`.
pub async fn create_tables(uri: &str, tables: &[String], extra_ddl: &str) {
    let mut ddl = extra_ddl.to_string();
    for table in tables {
        ddl.push_str(&format!("CREATE TABLE {table} (id bigint PRIMARY KEY);"));
    }
    connect(uri)
        .await
        .expect("connect through the router")
        .batch_execute(&ddl)
        .await
        .expect("create the tables");
}

/// What [`rows`] counts for the probe's writes on `node`.
pub fn probe_rows_of(node: &str) -> String {
    format!("{} WHERE node = '{node}'", hapg::invariants::PROBE_TABLE)
}

/// The monitor's newest event id (0 without events).
pub async fn last_event_id(monitor_uri: &str) -> i64 {
    MonitorClient::connect(monitor_uri)
        .await
        .expect("connect to the monitor")
        .events("default", 1)
        .await
        .expect("read events")
        .last()
        .map_or(0, |e| e.event_id)
}

/// Events after event id `after`, oldest first.
pub async fn events_since(monitor_uri: &str, after: i64) -> Vec<Event> {
    MonitorClient::connect(monitor_uri)
        .await
        .expect("connect to the monitor")
        .events("default", EVENTS)
        .await
        .expect("read events")
        .into_iter()
        .filter(|e| e.event_id > after)
        .map(|e| {
            (
                e.node_name.unwrap_or_default(),
                e.goal_state.unwrap_or_default(),
                e.description,
            )
        })
        .collect()
}

pub fn show_events(events: &[Event]) -> String {
    events
        .iter()
        .map(|(node, goal, what)| format!("  [{node} -> {goal}] {what}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The events show no failover and no election: nothing assigned a state of
/// one, no node but `primary` assigned a writable state, and no decision
/// says the primary was unhealthy.
pub fn assert_no_failover(events: &[Event], primary: &str, phase: &str) {
    const FAILOVER_STATES: [&str; 7] = [
        "prepare_promotion",
        "report_lsn",
        "fast_forward",
        "draining",
        "demoted",
        "demote_timeout",
        "stop_replication",
    ];
    const WRITABLE: [&str; 4] = ["single", "wait_primary", "primary", "join_primary"];
    for (node, goal, what) in events {
        let bad = FAILOVER_STATES.contains(&goal.as_str())
            || (node != primary && WRITABLE.contains(&goal.as_str()))
            || what.contains("failing over")
            || what.contains("Election")
            || what.contains("elected")
            || (what.starts_with("Primary") && what.contains("unhealthy"));
        assert!(
            !bad,
            "{phase}: the events show a failover or an election ({node} -> {goal}: {what}):\n{}",
            show_events(events)
        );
    }
}

/// The states stay as they are for `duration` (a standby may pass through
/// catchingup while its upstream restarts; the monitor may be away).
pub fn assert_steady(cluster: &Cluster, primary: &str, standby: &str, duration: Duration) {
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline {
        let states = cluster.states();
        if !states.is_empty() {
            let (reported, goal) = &states[primary];
            assert!(
                goal == "primary" && reported == "primary",
                "{primary} moved: {states:?}"
            );
            let (_, goal) = &states[standby];
            assert!(
                goal == "secondary" || goal == "catchingup",
                "{standby} moved: {states:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn summary(phase: &str, reports: &[WriterReport]) -> String {
    reports
        .iter()
        .enumerate()
        .map(|(i, r)| {
            format!(
                "{phase}: writer {i}: {} acked of {} sent, {} errors, longest gap {:?}",
                r.acked.len(),
                r.attempted,
                r.errors,
                r.longest_gap
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// One fault: writers through the router and a probe on every node, started
/// before the fault and checked after the group converged.
pub struct Phase {
    pub name: String,
    pub tables: Vec<String>,
    pub writers: Vec<Writer>,
    probe: WriteProbe,
    pub first_event: i64,
    started: Instant,
}

impl Phase {
    /// Creates the phase's tables through the router, starts the probe over
    /// every node (the probe table emptied first, so its ids start afresh)
    /// and the writers, and waits until every writer has written.
    pub async fn start(
        cluster: &Cluster,
        router: &RouterProcess,
        primary: &str,
        name: &str,
        monitor_uri: &str,
    ) -> Phase {
        let uri = router.uri("appdb");
        wait_writable(&uri, STEP).await;
        let tables: Vec<String> = (0..WRITERS).map(|i| format!("{name}_{i}")).collect();
        let drop_probe = format!("DROP TABLE IF EXISTS {};", hapg::invariants::PROBE_TABLE);
        create_tables(&uri, &tables, &drop_probe).await;
        let nodes: Vec<(String, String)> = cluster
            .nodes
            .iter()
            .map(|n| (n.name.clone(), direct_uri(cluster, &n.name)))
            .collect();
        let probe = WriteProbe::start(&direct_uri(cluster, primary), &nodes)
            .await
            .expect("start the write probe");
        let writers = tables
            .iter()
            .map(|t| Writer::start(uri.clone(), t, Duration::from_secs(300)))
            .collect();
        for table in &tables {
            wait_rows(cluster, &uri, table, 10).await;
        }
        // The probe reached the primary before the fault: "no split brain"
        // must not pass on a probe that never wrote.
        wait_rows(
            cluster,
            &direct_uri(cluster, primary),
            &probe_rows_of(primary),
            0,
        )
        .await;
        Phase {
            name: name.to_string(),
            tables,
            writers,
            probe,
            first_event: last_event_id(monitor_uri).await,
            started: Instant::now(),
        }
    }

    /// After the group converged on `primary`: the writers go on through the
    /// router, then everything stops and the invariants are checked.
    pub async fn finish(
        self,
        cluster: &Cluster,
        router: &RouterProcess,
        primary: &str,
        monitor_uri: &str,
    ) -> PhaseResult {
        let uri = router.uri("appdb");
        for table in &self.tables {
            let before = rows(&uri, table).await.unwrap_or(0);
            wait_rows(cluster, &uri, table, before + 10).await;
        }
        // ... and it reaches the final primary after it.
        let direct = direct_uri(cluster, primary);
        let probed = rows(&direct, &probe_rows_of(primary)).await.unwrap_or(0);
        wait_rows(cluster, &direct, &probe_rows_of(primary), probed).await;
        let mut reports = Vec::new();
        for writer in self.writers {
            reports.push(writer.finish().await);
        }
        let probe = self.probe.finish().await;
        // The checks below pass on empty evidence: make sure there is some.
        for (table, report) in self.tables.iter().zip(&reports) {
            assert!(
                !report.acked.is_empty(),
                "{}: the writer of {table} acknowledged nothing (its task failed?): {report:?}",
                self.name
            );
        }
        assert!(
            probe.writes.iter().any(|w| w.node == primary),
            "{}: the probe recorded no write on the primary {primary}: {:?}",
            self.name,
            probe.writes.len()
        );
        let mut probed: Vec<(String, usize)> = cluster
            .nodes
            .iter()
            .map(|n| {
                let count = probe.writes.iter().filter(|w| w.node == n.name).count();
                (n.name.clone(), count)
            })
            .collect();
        probed.sort();
        eprintln!(
            "{}\n{}: probe writes acknowledged per node {probed:?}; phase took {:?}",
            summary(&self.name, &reports),
            self.name,
            self.started.elapsed()
        );
        let primary_uri = direct_uri(cluster, primary);
        let drill = Drill {
            monitor_uri,
            primary_uri: &primary_uri,
            writers: self
                .tables
                .iter()
                .map(String::as_str)
                .zip(reports.iter())
                .collect(),
            probe: Some(&probe),
            through_router: true,
        };
        let violations = drill.violations().await.expect("check the invariants");
        let events = events_since(monitor_uri, self.first_event).await;
        assert!(
            violations.is_empty(),
            "{}: invariants broken:\n{}\nevents:\n{}\nrouter log:\n{}\nlogs:\n{}",
            self.name,
            violations.join("\n"),
            show_events(&events),
            cluster.log(&router.name),
            cluster.all_logs()
        );
        PhaseResult {
            reports,
            events,
            probe_writes: probe
                .writes
                .iter()
                .map(|w| (w.node.clone(), w.at))
                .collect(),
        }
    }
}

pub struct PhaseResult {
    pub reports: Vec<WriterReport>,
    pub events: Vec<Event>,
    /// (node, server time) of every probe write acknowledged.
    pub probe_writes: Vec<(String, f64)>,
}
