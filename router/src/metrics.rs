//! The router's `/metrics` on `metrics.listen`: Prometheus text (or
//! OpenMetrics when asked) through `prometheus-client`, rendered at each
//! scrape from the router's atomics, pools, client registry and recorded
//! primary changes (a fresh registry each time, as the nodes' endpoints do).
//! Names follow the PgBouncer exporter's where they overlap; every name is
//! documented in docs/operations.md. Served by the bounded server the
//! nodes' endpoints use too (`hapg_monitor::http_server`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hapg_monitor::http_server::{self, Answer, Asked, Limits};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::error::RouterError;
use crate::shared::Shared;

const LIMITS: Limits = Limits::with_connections(16);

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;
type FloatCounter = Counter<f64, AtomicU64>;

fn gauge(registry: &mut Registry, name: &str, help: &str, value: f64) {
    let g = FloatGauge::default();
    g.set(value);
    registry.register(name, help, g);
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let c: Counter = Counter::default();
    c.inc_by(value);
    registry.register(name, help, c);
}

fn seconds_counter(registry: &mut Registry, name: &str, help: &str, us: u64) {
    let c = FloatCounter::default();
    c.inc_by(us as f64 / 1e6);
    registry.register(name, help, c);
}

/// Counters under the PgBouncer exporter's names, labelled `database` as
/// its are: one series per database clients logged in to.
fn pgbouncer_counter(
    registry: &mut Registry,
    name: &str,
    help: &str,
    per_database: &[(String, f64)],
) {
    let family = Family::<Labels, FloatCounter>::default();
    for (database, value) in per_database {
        family
            .get_or_create(&vec![("database".to_string(), database.clone())])
            .inc_by(*value);
    }
    registry.register(name, help, family);
}

/// The text of `/metrics` (OpenMetrics).
pub(crate) fn render(shared: &Shared) -> String {
    let mut registry = Registry::default();
    gauge(
        &mut registry,
        "pgbouncer_up",
        "1: the router answers (the PgBouncer exporter's name)",
        1.0,
    );
    // Pools, by server user and database, with their clients.
    let pool_gauges = [
        (
            "pgbouncer_pools_client_active_connections",
            "Clients linked to a pool and not waiting",
        ),
        (
            "pgbouncer_pools_client_waiting_connections",
            "Clients waiting for a server connection or for a pause to end",
        ),
        (
            "pgbouncer_pools_server_active_connections",
            "Server connections in use by a client",
        ),
        (
            "pgbouncer_pools_server_idle_connections",
            "Server connections idle in the pool",
        ),
        (
            "pgbouncer_pools_client_maxwait_seconds",
            "How long the client waiting longest has waited",
        ),
    ];
    let families: Vec<Family<Labels, FloatGauge>> = pool_gauges
        .iter()
        .map(|(name, help)| {
            let family = Family::<Labels, FloatGauge>::default();
            registry.register(*name, *help, family.clone());
            family
        })
        .collect();
    let pools = crate::pool_counts::pool_rows(shared);
    for row in &pools {
        let labels = vec![
            ("database".to_string(), row.database.clone()),
            ("user".to_string(), row.user.clone()),
        ];
        let values = [
            row.cl_active as f64,
            row.cl_waiting as f64,
            row.sv_active as f64,
            row.sv_idle as f64,
            row.maxwait_us as f64 / 1e6,
        ];
        for (family, value) in families.iter().zip(values) {
            family.get_or_create(&labels).set(value);
        }
    }
    let databases: Vec<(String, crate::stats::Totals)> = shared
        .databases
        .list()
        .iter()
        .map(|db| (db.name.clone(), db.counters.totals()))
        .collect();
    type Pick = fn(&crate::stats::Totals) -> f64;
    let counters: [(&str, &str, Pick); 7] = [
        (
            "pgbouncer_stats_sql_transactions_pooled",
            "Transactions relayed",
            |t| t.xact_count as f64,
        ),
        (
            "pgbouncer_stats_queries_pooled",
            "Queries relayed (each answered by a ReadyForQuery)",
            |t| t.query_count as f64,
        ),
        (
            "pgbouncer_stats_received_bytes",
            "Bytes received from clients",
            |t| t.received as f64,
        ),
        ("pgbouncer_stats_sent_bytes", "Bytes sent to clients", |t| {
            t.sent as f64
        }),
        (
            "pgbouncer_stats_sql_transactions_duration_seconds",
            "Time spent in transactions",
            |t| t.xact_time_us as f64 / 1e6,
        ),
        (
            "pgbouncer_stats_queries_duration_seconds",
            "Time spent in queries",
            |t| t.query_time_us as f64 / 1e6,
        ),
        (
            "pgbouncer_stats_client_wait_seconds",
            "Time clients waited for a server connection",
            |t| t.wait_time_us as f64 / 1e6,
        ),
    ];
    for (name, help, pick) in counters {
        let values: Vec<(String, f64)> = databases
            .iter()
            .map(|(database, totals)| (database.clone(), pick(totals)))
            .collect();
        pgbouncer_counter(&mut registry, name, help, &values);
    }
    let stats = &shared.stats;
    gauge(
        &mut registry,
        "hapg_router_clients",
        "Clients logged in now (console clients included)",
        shared.registry.list().len() as f64,
    );
    gauge(
        &mut registry,
        "hapg_router_clients_waiting",
        "Sessions held now by a pause (switchover, failover, PAUSE)",
        stats.waiting.load(Ordering::Relaxed) as f64,
    );
    for (name, help, histogram) in [
        (
            "hapg_router_transaction_duration_seconds",
            "Time from a transaction's first statement to its end",
            &stats.xact_time,
        ),
        (
            "hapg_router_query_duration_seconds",
            "Time from a query sent to its ReadyForQuery",
            &stats.query_time,
        ),
        (
            "hapg_router_client_wait_seconds",
            "Time a session waited for a server connection (slow attaches only)",
            &stats.wait_time,
        ),
        (
            "hapg_router_pause_hold_seconds",
            "Time a session was held by a pause before its transaction could start",
            &stats.pause_hold,
        ),
    ] {
        registry.register(name, help, histogram.snapshot());
    }
    // The read port: its sessions per standby, and its moves.
    let read_sessions = Family::<Labels, FloatGauge>::default();
    for route in shared.read_pool.routes() {
        read_sessions
            .get_or_create(&vec![
                ("node_id".to_string(), route.node_id.to_string()),
                (
                    "address".to_string(),
                    format!("{}:{}", route.host, route.port),
                ),
            ])
            .set(route.sessions() as f64);
    }
    registry.register(
        "hapg_router_read_sessions",
        "Read port sessions on each standby now",
        read_sessions,
    );
    counter(
        &mut registry,
        "hapg_router_read_moves",
        "Read port sessions taken off a standby that left the read pool",
        stats.read_moves.load(Ordering::Relaxed),
    );
    let routing = shared.routing.load();
    gauge(
        &mut registry,
        "hapg_router_epoch",
        "The formation's primary epoch as the router last read it",
        routing.epoch as f64,
    );
    gauge(
        &mut registry,
        "hapg_router_paused",
        "1 while new transactions are held (no writable primary, a drain, PAUSE)",
        if routing.paused() { 1.0 } else { 0.0 },
    );
    gauge(
        &mut registry,
        "hapg_router_monitor_reachable",
        "1 when the router's last exchange with the monitor succeeded",
        if shared.routing.monitor_reachable() {
            1.0
        } else {
            0.0
        },
    );
    counter(
        &mut registry,
        "hapg_router_statements_cut",
        "Statements or transactions the router cut on an old primary (new epoch, drain timeout)",
        shared.routing.cut_total(),
    );
    seconds_counter(
        &mut registry,
        "hapg_router_uptime_seconds",
        "Time since the router started",
        u64::try_from(stats.started.elapsed().as_micros()).unwrap_or(u64::MAX),
    );
    {
        let recorder = shared.events.lock();
        counter(
            &mut registry,
            "hapg_router_primary_changes",
            "Primary changes the router lived through (new work went to a new epoch's primary)",
            recorder.changes,
        );
        registry.register(
            "hapg_router_failover_pause_seconds",
            "How long new work was held, per primary change",
            recorder.held_histogram.snapshot(),
        );
        registry.register(
            "hapg_router_failover_clients_cut",
            "Statements or transactions cut, per primary change",
            recorder.cut_histogram.snapshot(),
        );
        registry.register(
            "hapg_router_failover_clients_waited",
            "Sessions that waited during the pause, per primary change",
            recorder.waited_histogram.snapshot(),
        );
    }
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut text, &registry);
    text
}

/// Binds `metrics.listen` (an address in use is reported naming the key).
pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener, RouterError> {
    TcpListener::bind(addr).await.map_err(|e| {
        RouterError::Config(hapg_config::ConfigError::Invalid {
            key: "metrics.listen".to_string(),
            message: format!("cannot listen on {addr}: {e}"),
        })
    })
}

/// Serves `/metrics` until `stop`: 16 connections at once, 5 s for the
/// headers, 30 s per connection, 8 kB of headers.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving router metrics over HTTP");
    }
    let respond = move |asked: Asked<'_>| {
        if asked.path == "/metrics" {
            Answer::metrics_as_asked(render(&shared), &asked)
        } else {
            Answer::text(404, "only /metrics\n")
        }
    };
    http_server::serve(listener, LIMITS, respond, stop).await;
}
