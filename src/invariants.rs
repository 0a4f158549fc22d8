//! The invariants every fault drill checks, whatever the fault (after
//! reliability.md section 8): no two nodes accept writes at once (a probe
//! writes to each node directly), every acknowledged write is on the final
//! primary, nothing is written that no client sent, and every write ran on
//! the node the monitor named writable at that moment. (That the group
//! converges back to a primary and secondaries is the drill's own wait.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hapg_monitor::state::NodeState;
use hapg_monitor::{MonitorClient, MonitorError};

use crate::drill::{connect, WriterReport};

/// The table the probe writes to, on the primary before the fault.
pub const PROBE_TABLE: &str = "hapg_probe";

/// Writes to every node directly, one INSERT every `PROBE_PERIOD` per node, as
/// a client that ignores the monitor would, and records which nodes took them.
pub struct WriteProbe {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<ProbeWrite>>>,
}

/// A write a node acknowledged to the probe.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeWrite {
    pub node: String,
    pub id: i64,
    /// When the node ran it (server clock, seconds since the Unix epoch).
    pub at: f64,
}

/// Every write the nodes acknowledged to the probe, in the order they ran.
#[derive(Debug, Clone, Default)]
pub struct ProbeReport {
    pub writes: Vec<ProbeWrite>,
    /// Probe tasks that failed (panicked): their writes are unknown, so the
    /// checks that read this report cannot pass.
    pub failures: Vec<String>,
}

const PROBE_PERIOD: Duration = Duration::from_millis(100);
/// A write that takes longer is given up (a frozen node, or a primary
/// waiting for a standby that is gone); its connection is dropped.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

impl WriteProbe {
    /// Creates the probe table through `primary_uri` (it replicates to the
    /// standbys), then probes each `(name, uri)` until [`WriteProbe::finish`].
    pub async fn start(
        primary_uri: &str,
        nodes: &[(String, String)],
    ) -> Result<WriteProbe, tokio_postgres::Error> {
        connect(primary_uri)
            .await?
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {PROBE_TABLE} (id bigint PRIMARY KEY, node text NOT NULL)"
            ))
            .await?;
        let stop = Arc::new(AtomicBool::new(false));
        let next_id = Arc::new(AtomicI64::new(1));
        let tasks = nodes
            .iter()
            .cloned()
            .map(|(name, uri)| tokio::spawn(probe_node(name, uri, stop.clone(), next_id.clone())))
            .collect();
        Ok(WriteProbe { stop, tasks })
    }

    /// Stops probing; what the nodes acknowledged.
    pub async fn finish(self) -> ProbeReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut writes = Vec::new();
        let mut failures = Vec::new();
        for task in self.tasks {
            match task.await {
                Ok(done) => writes.extend(done),
                Err(e) => failures.push(format!("a probe task failed: {e}")),
            }
        }
        writes.sort_by(|a, b| a.at.total_cmp(&b.at));
        ProbeReport { writes, failures }
    }
}

async fn probe_node(
    node: String,
    uri: String,
    stop: Arc<AtomicBool>,
    next_id: Arc<AtomicI64>,
) -> Vec<ProbeWrite> {
    let insert = format!(
        "INSERT INTO {PROBE_TABLE} (id, node) VALUES ($1, $2) \
         RETURNING extract(epoch FROM clock_timestamp())::float8"
    );
    let mut writes = Vec::new();
    let mut client: Option<tokio_postgres::Client> = None;
    while !stop.load(Ordering::Relaxed) {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = tokio::time::timeout(PROBE_TIMEOUT, connect(&uri))
                .await
                .ok()
                .and_then(Result::ok);
        }
        if let Some(c) = &client {
            let id = next_id.fetch_add(1, Ordering::Relaxed);
            match tokio::time::timeout(PROBE_TIMEOUT, c.query_one(&insert, &[&id, &node])).await {
                Ok(Ok(row)) => writes.push(ProbeWrite {
                    node: node.clone(),
                    id,
                    at: row.get(0),
                }),
                // Read-only (a standby), or refused: not writable now.
                Ok(Err(_)) => {}
                Err(_) => client = None,
            }
        }
        tokio::time::sleep(PROBE_PERIOD).await;
    }
    writes
}

impl ProbeReport {
    /// Split brain: a node that accepted a write after another node had
    /// accepted one following it. Across one fault the writable node changes
    /// at most once, from the old primary to the new one, and never back.
    pub fn split_brain(&self) -> Option<String> {
        let mut runs: Vec<&ProbeWrite> = Vec::new();
        for write in &self.writes {
            if runs.last().is_none_or(|last| last.node != write.node) {
                runs.push(write);
            }
        }
        let mut seen: Vec<&ProbeWrite> = Vec::new();
        for run in runs {
            if let Some(earlier) = seen.iter().find(|w| w.node == run.node) {
                let other = seen.last().map(|w| w.node.as_str()).unwrap_or_default();
                return Some(format!(
                    "two writable nodes: {} accepted a write at {:.3} (and earlier at {:.3}), after {other} had accepted writes",
                    run.node, run.at, earlier.at
                ));
            }
            seen.push(run);
        }
        None
    }
}

/// What a drill checks once the fault healed and the group converged.
pub struct Drill<'a> {
    /// The monitor database (for its event history).
    pub monitor_uri: &'a str,
    /// The final primary, directly.
    pub primary_uri: &'a str,
    /// Each writer's table and what it saw.
    pub writers: Vec<(&'a str, &'a WriterReport)>,
    pub probe: Option<&'a ProbeReport>,
    /// The writers went through a hapg router: each write must have run on
    /// the node the monitor named writable at that moment. (A multi-host URI
    /// may still reach an old primary the monitor already moved away from.)
    pub through_router: bool,
}

impl Drill<'_> {
    /// Every invariant broken, said in a sentence each; empty when all hold.
    pub async fn violations(&self) -> anyhow::Result<Vec<String>> {
        let mut broken = Vec::new();
        let primary = connect(self.primary_uri).await?;
        if let Some(probe) = self.probe {
            // No evidence is not evidence of no split brain.
            broken.extend(probe.failures.iter().cloned());
            if probe.writes.is_empty() {
                broken.push(
                    "the probe recorded no write on any node: a split brain cannot be ruled out"
                        .to_string(),
                );
            }
            broken.extend(probe.split_brain());
            let ids: Vec<i64> = probe.writes.iter().map(|w| w.id).collect();
            broken.extend(missing(&primary, PROBE_TABLE, &ids).await?);
        }
        let history = WritableHistory::read(self.monitor_uri).await?;
        broken.extend(history.two_writable());
        for (table, report) in &self.writers {
            if report.attempted == 0 {
                broken.push(format!(
                    "{table}: the writer sent nothing (did its task fail?): nothing to check"
                ));
            }
            broken.extend(missing(&primary, table, &report.acked).await?);
            let unsent: Vec<i64> = primary
                .query(
                    &format!(
                        "SELECT id FROM {table} WHERE id < 1 OR id > $1
                         UNION ALL
                         SELECT id FROM {table} GROUP BY id HAVING count(*) > 1"
                    ),
                    &[&report.attempted],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            if !unsent.is_empty() {
                broken.push(format!(
                    "{table}: rows no client sent (out of 1..={} or duplicated): {unsent:?}",
                    report.attempted
                ));
            }
            if !self.through_router {
                continue;
            }
            broken.extend(
                report
                    .acks
                    .iter()
                    .filter_map(|ack| history.misrouted(ack.port?, ack.at))
                    .map(|m| format!("{table}: {m}"))
                    .take(5),
            );
        }
        Ok(broken)
    }
}

/// Acknowledged ids missing from `table`, as a violation.
async fn missing(
    primary: &tokio_postgres::Client,
    table: &str,
    acked: &[i64],
) -> Result<Option<String>, tokio_postgres::Error> {
    let present: std::collections::HashSet<i64> = primary
        .query(&format!("SELECT id FROM {table}"), &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let lost: Vec<i64> = acked
        .iter()
        .copied()
        .filter(|id| !present.contains(id))
        .collect();
    Ok((!lost.is_empty()).then(|| {
        format!(
            "{table}: {} acknowledged writes are not on the final primary: {:?}",
            lost.len(),
            &lost[..lost.len().min(20)]
        )
    }))
}

/// The monitor's assignments over time, from its events: which node (by
/// port) was assigned a state that takes writes, when.
#[derive(Debug, Default)]
pub struct WritableHistory {
    /// (time, node port, assigned state), in the order the monitor wrote them.
    assignments: Vec<(f64, u16, NodeState)>,
}

impl WritableHistory {
    pub async fn read(monitor_uri: &str) -> Result<WritableHistory, MonitorError> {
        let assignments = MonitorClient::connect(monitor_uri)
            .await?
            .goal_history()
            .await?
            .into_iter()
            .map(|e| (e.time, e.node_port, e.goal))
            .collect();
        Ok(WritableHistory { assignments })
    }

    /// The state each node was assigned at time `at`.
    fn goals_at(&self, at: f64) -> HashMap<u16, NodeState> {
        let mut goals = HashMap::new();
        for (time, port, state) in &self.assignments {
            if *time > at {
                break;
            }
            goals.insert(*port, *state);
        }
        goals
    }

    /// A write the node on `port` ran at `at` while the monitor did not name
    /// it writable.
    pub fn misrouted(&self, port: u16, at: f64) -> Option<String> {
        let goals = self.goals_at(at);
        match goals.get(&port) {
            Some(state) if state.can_take_writes() => None,
            other => Some(format!(
                "a write ran on the node on port {port} at {at:.3}, when the monitor had assigned it {}",
                other.map_or("nothing", |s| s.as_str())
            )),
        }
    }

    /// A moment at which the monitor named two nodes writable.
    pub fn two_writable(&self) -> Option<String> {
        let mut goals: HashMap<u16, NodeState> = HashMap::new();
        let mut index = 0;
        while index < self.assignments.len() {
            // One decision is one transaction, with one event time: judge
            // after all of it.
            let time = self.assignments[index].0;
            while index < self.assignments.len() && self.assignments[index].0 == time {
                let (_, port, state) = self.assignments[index];
                goals.insert(port, state);
                index += 1;
            }
            let writable: Vec<u16> = goals
                .iter()
                .filter(|(_, s)| s.can_take_writes())
                .map(|(p, _)| *p)
                .collect();
            if writable.len() > 1 {
                return Some(format!(
                    "the monitor named nodes on ports {writable:?} writable at once, at {time:.3}"
                ));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(writes: &[(&str, f64)]) -> ProbeReport {
        ProbeReport {
            writes: writes
                .iter()
                .enumerate()
                .map(|(i, (node, at))| ProbeWrite {
                    node: node.to_string(),
                    id: i as i64,
                    at: *at,
                })
                .collect(),
            ..ProbeReport::default()
        }
    }

    #[test]
    fn split_brain_is_a_node_writable_again_after_another() {
        for (writes, split) in [
            (vec![], false),
            (vec![("a", 1.0), ("a", 2.0)], false),
            (vec![("a", 1.0), ("a", 2.0), ("b", 5.0), ("b", 6.0)], false),
            (vec![("a", 1.0), ("b", 5.0), ("a", 5.1)], true),
            (vec![("a", 1.0), ("b", 2.0), ("c", 3.0), ("b", 4.0)], true),
        ] {
            assert_eq!(probe(&writes).split_brain().is_some(), split, "{writes:?}");
        }
    }

    fn history(rows: &[(f64, u16, NodeState)]) -> WritableHistory {
        WritableHistory {
            assignments: rows.to_vec(),
        }
    }

    #[test]
    fn writes_must_run_where_the_monitor_said() {
        use NodeState::*;
        let h = history(&[
            (1.0, 5001, Single),
            (2.0, 5002, WaitStandby),
            (3.0, 5001, WaitPrimary),
            (4.0, 5001, Primary),
            (10.0, 5001, Draining),
            (11.0, 5002, PreparePromotion),
            (12.0, 5002, WaitPrimary),
            (12.0, 5001, Demoted),
        ]);
        for (port, at, ok) in [
            (5001, 1.5, true),
            (5001, 9.9, true),
            (5001, 10.5, false),
            (5002, 11.5, false),
            (5002, 12.5, true),
            (5001, 13.0, false),
            (5003, 5.0, false),
        ] {
            assert_eq!(h.misrouted(port, at).is_none(), ok, "{port} at {at}");
        }
        assert_eq!(h.two_writable(), None);
        let broken = history(&[(1.0, 5001, Primary), (2.0, 5002, WaitPrimary)]);
        assert!(broken.two_writable().is_some());
    }
}
