//! `/metrics` of a node and of the monitor, in the OpenMetrics text format
//! through `prometheus-client`, rendered from a snapshot at each scrape
//! (a fresh registry, so a node or state that is gone leaves no stale
//! series). Every name is documented in docs/operations.md.

use std::sync::atomic::AtomicU64;
use std::time::Instant;

use hapg_monitor::state::Health;
use hapg_monitor::NodeState;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::monitor_status::MonitorStatus;
use crate::node_status::NodeStatus;

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// Buckets of the failover duration histogram, in seconds: hapg's own
/// switchovers take under a second, its failovers about 3 s.
const FAILOVER_BUCKETS: [f64; 12] = [
    0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0, 30.0, 60.0,
];

const HEALTHS: [Health; 3] = [Health::Good, Health::Bad, Health::Unknown];

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn with(base: &Labels, key: &str, value: &str) -> Labels {
    let mut l = base.clone();
    l.push((key.to_string(), value.to_string()));
    l
}

/// A gauge family registered under `name`.
fn gauges(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, FloatGauge> {
    let family = Family::<Labels, FloatGauge>::default();
    registry.register(name, help, family.clone());
    family
}

/// One series per state, 1 for `current` and 0 for the others (a state set).
fn state_set(family: &Family<Labels, FloatGauge>, base: &Labels, current: NodeState) {
    for state in NodeState::ALL {
        family
            .get_or_create(&with(base, "state", state.as_str()))
            .set(if state == current { 1.0 } else { 0.0 });
    }
}

fn health_set(family: &Family<Labels, FloatGauge>, base: &Labels, current: Health) {
    for health in HEALTHS {
        family
            .get_or_create(&with(base, "health", health.as_str()))
            .set(if health == current { 1.0 } else { 0.0 });
    }
}

fn flag(value: bool) -> f64 {
    if value {
        1.0
    } else {
        0.0
    }
}

fn render(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut text, registry);
    text
}

/// A node's `/metrics`.
pub fn node(status: &NodeStatus, now: Instant) -> String {
    let mut registry = Registry::default();
    let base = labels(&[
        ("formation", &status.formation),
        ("node", &status.name),
        ("node_id", &status.node_id.to_string()),
    ]);
    state_set(
        &gauges(
            &mut registry,
            "hapg_node_reported_state",
            "The state the keeper last reached and reported (1 for the current state)",
        ),
        &base,
        status.reported,
    );
    state_set(
        &gauges(
            &mut registry,
            "hapg_node_assigned_state",
            "The goal state the monitor last assigned (1 for the current goal)",
        ),
        &base,
        status.assigned,
    );
    let single = [
        (
            "hapg_node_postgres_running",
            "1 when Postgres runs (what /health answers)",
            Some(flag(status.postgres_running)),
        ),
        (
            "hapg_node_primary",
            "1 when /primary answers 200: assigned and writable now",
            Some(flag(status.is_primary(now))),
        ),
        (
            "hapg_node_replica",
            "1 when /replica answers 200: a streaming standby",
            Some(flag(status.is_replica(None))),
        ),
        (
            "hapg_node_lsn_bytes",
            "Flush LSN of a primary, receive or replay LSN of a standby, as a byte position",
            (status.lsn > 0).then_some(status.lsn as f64),
        ),
        (
            "hapg_node_timeline",
            "Postgres timeline",
            (status.timeline > 0).then_some(f64::from(status.timeline)),
        ),
        (
            "hapg_node_replay_lag_bytes",
            "A standby's replay distance behind the primary's end of WAL, in bytes",
            status.lag_bytes.map(|b| b as f64),
        ),
        (
            "hapg_node_replay_lag_seconds",
            "A standby's replay delay (or its upstream's silence, if longer), in seconds",
            status.lag.map(|d| d.as_secs_f64()),
        ),
        (
            "hapg_node_last_report_age_seconds",
            "Time since the monitor last answered this keeper's report",
            status
                .last_report
                .map(|at| now.saturating_duration_since(at).as_secs_f64()),
        ),
        (
            "hapg_node_observation_age_seconds",
            "Time since the keeper last observed its Postgres (its loop's last round)",
            Some(
                now.saturating_duration_since(status.observed_at)
                    .as_secs_f64(),
            ),
        ),
    ];
    for (name, help, value) in single {
        let family = gauges(&mut registry, name, help);
        if let Some(value) = value {
            family.get_or_create(&base).set(value);
        }
    }
    let health = gauges(
        &mut registry,
        "hapg_node_monitor_health",
        "This node's health as the monitor's checks last concluded (1 for the current verdict)",
    );
    if let Some(current) = status.monitor_health {
        health_set(&health, &base, current);
    }
    render(&registry)
}

/// The monitor's `/metrics`.
pub fn monitor(status: &MonitorStatus, now: Instant) -> String {
    let mut registry = Registry::default();
    gauges(
        &mut registry,
        "hapg_monitor_up",
        "1 when the monitor database answered the last poll",
    )
    .get_or_create(&Vec::new())
    .set(flag(status.database_up));
    gauges(
        &mut registry,
        "hapg_monitor_poll_age_seconds",
        "Time since the monitor's HTTP server last read the monitor database",
    )
    .get_or_create(&Vec::new())
    .set(
        now.saturating_duration_since(status.polled_at)
            .as_secs_f64(),
    );
    let reported = gauges(
        &mut registry,
        "hapg_monitor_node_reported_state",
        "Each node's reported state (1 for the current state)",
    );
    let assigned = gauges(
        &mut registry,
        "hapg_monitor_node_assigned_state",
        "Each node's assigned goal state (1 for the current goal)",
    );
    let health = gauges(
        &mut registry,
        "hapg_monitor_node_health",
        "Each node's health as the monitor's checks last concluded (1 for the current verdict)",
    );
    let report_age = gauges(
        &mut registry,
        "hapg_monitor_node_report_age_seconds",
        "Time since each node's keeper last reported",
    );
    let lsn = gauges(
        &mut registry,
        "hapg_monitor_node_lsn_bytes",
        "Each node's last reported LSN, as a byte position",
    );
    let timeline = gauges(
        &mut registry,
        "hapg_monitor_node_timeline",
        "Each node's last reported timeline",
    );
    for n in &status.nodes {
        let base = labels(&[
            ("formation", &n.formation),
            ("group", &n.group_id.to_string()),
            ("node", &n.name),
            ("node_id", &n.node_id.to_string()),
        ]);
        state_set(&reported, &base, n.reported);
        state_set(&assigned, &base, n.goal);
        health_set(&health, &base, n.health);
        if let Some(age) = n.report_age {
            report_age.get_or_create(&base).set(age.as_secs_f64());
        }
        lsn.get_or_create(&base).set(n.lsn as f64);
        timeline.get_or_create(&base).set(f64::from(n.tli));
    }
    let failovers = Family::<Labels, Counter>::default();
    registry.register(
        "hapg_monitor_failovers",
        "Completed changes of primary (failovers and switchovers) the monitor's events record",
        failovers.clone(),
    );
    let durations = Family::<Labels, Histogram>::new_with_constructor(|| {
        Histogram::new(FAILOVER_BUCKETS.iter().copied())
    });
    registry.register(
        "hapg_monitor_failover_duration_seconds",
        "Time each change of primary left the formation without a writable primary",
        durations.clone(),
    );
    let last = gauges(
        &mut registry,
        "hapg_monitor_last_failover_duration_seconds",
        "Duration of the formation's latest change of primary",
    );
    for change in &status.changes {
        let base = labels(&[("formation", &change.formation)]);
        failovers.get_or_create(&base).inc();
        durations
            .get_or_create(&base)
            .observe(change.duration.as_secs_f64());
        last.get_or_create(&base).set(change.duration.as_secs_f64());
    }
    render(&registry)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use hapg_monitor::store::PrimaryChange;

    use super::*;

    #[test]
    fn node_metrics_name_the_state_and_skip_unknowns() {
        let mut status = NodeStatus::starting(Duration::from_secs(2), Duration::from_secs(10));
        status.name = "node_a".into();
        status.formation = "default".into();
        status.reported = NodeState::Primary;
        status.assigned = NodeState::Primary;
        status.postgres_running = true;
        status.in_recovery = Some(false);
        status.lsn = 0x1_0000_0000;
        status.timeline = 3;
        let text = node(&status, status.observed_at);
        assert!(
            text.contains(
                "hapg_node_reported_state{formation=\"default\",node=\"node_a\",node_id=\"0\",state=\"primary\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("hapg_node_primary{"), "{text}");
        assert!(
            text.contains(
                "hapg_node_timeline{formation=\"default\",node=\"node_a\",node_id=\"0\"} 3"
            ),
            "{text}"
        );
        assert!(!text.contains("hapg_node_replay_lag_bytes{"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn monitor_counts_failovers_and_their_durations() {
        let mut status = MonitorStatus::starting();
        status.database_up = true;
        status.changes = vec![
            PrimaryChange {
                formation: "default".into(),
                epoch: 2,
                duration: Duration::from_millis(400),
            },
            PrimaryChange {
                formation: "default".into(),
                epoch: 3,
                duration: Duration::from_millis(3_100),
            },
        ];
        let text = monitor(&status, status.polled_at);
        assert!(
            text.contains("hapg_monitor_failovers_total{formation=\"default\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("hapg_monitor_failover_duration_seconds_count{formation=\"default\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("hapg_monitor_last_failover_duration_seconds{formation=\"default\"} 3.1"),
            "{text}"
        );
        assert!(text.contains("hapg_monitor_up{} 1"), "{text}");
        let plain = hapg_monitor::http_server::prometheus_text(&text);
        assert!(
            plain.contains("# TYPE hapg_monitor_failovers_total counter\n"),
            "{plain}"
        );
        assert!(
            plain.contains("# HELP hapg_monitor_failovers_total Completed"),
            "{plain}"
        );
        assert!(!plain.contains("# EOF"), "{plain}");
        assert!(plain.contains("# TYPE hapg_monitor_up gauge\n"), "{plain}");
    }
}
