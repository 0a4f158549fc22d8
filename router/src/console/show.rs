//! The SHOW commands' answers, built from what the router shares: the
//! pools, the client registry, the totals, the routing table and the
//! recorded primary changes. PgBouncer's column names, in its order, where
//! PgBouncer has the command (1.18's set, what Debian 12 ships, which the
//! exporters read); hapg's own for ROUTING and FAILOVERS.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use hapg_config::router::{PoolMode, RouterConfig};

use super::command::Show;
use super::wire::{v, ResultSet, Type};
use crate::pool::IdleRow;
use crate::pool_counts::{pool_rows, read_database};
use crate::server_list::ServerEntry;
use crate::shared::Shared;
use crate::stats::{averages, Totals};

const VERSION: &str = env!("CARGO_PKG_VERSION");

pub(crate) fn answer(shared: &Shared, show: Show) -> ResultSet {
    match show {
        Show::Pools => pools(shared),
        Show::Clients => clients(shared),
        Show::Servers => servers(shared),
        Show::Stats => stats(shared),
        Show::StatsTotals => stats_totals(shared),
        Show::StatsAverages => stats_averages(shared),
        Show::Databases => databases(shared),
        Show::Lists => lists(shared),
        Show::Config => config(shared),
        Show::Version => version(),
        Show::Routing => routing(shared),
        Show::Failovers => failovers(shared),
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC`, as PgBouncer prints times.
pub(crate) fn timestamp(at: SystemTime) -> String {
    let secs = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// The wall-clock time of a monotonic instant in the past.
fn wall(at: Instant) -> SystemTime {
    SystemTime::now() - at.elapsed()
}

fn mode_name(mode: PoolMode) -> &'static str {
    match mode {
        PoolMode::Session => "session",
        PoolMode::Transaction => "transaction",
    }
}

fn pools(shared: &Shared) -> ResultSet {
    let mut set = ResultSet::new(&[
        ("database", Type::Text),
        ("user", Type::Text),
        ("cl_active", Type::Int4),
        ("cl_waiting", Type::Int4),
        ("cl_active_cancel_req", Type::Int4),
        ("cl_waiting_cancel_req", Type::Int4),
        ("sv_active", Type::Int4),
        ("sv_active_cancel", Type::Int4),
        ("sv_being_canceled", Type::Int4),
        ("sv_idle", Type::Int4),
        ("sv_used", Type::Int4),
        ("sv_tested", Type::Int4),
        ("sv_login", Type::Int4),
        ("maxwait", Type::Int4),
        ("maxwait_us", Type::Int4),
        ("pool_mode", Type::Text),
    ]);
    let mode = mode_name(shared.runtime.load().config.pool.mode);
    for p in pool_rows(shared) {
        set.push(vec![
            v(p.database),
            v(p.user),
            v(p.cl_active),
            v(p.cl_waiting),
            v(0),
            v(0),
            v(p.sv_active),
            v(0),
            v(0),
            v(p.sv_idle),
            v(0),
            v(0),
            v(0),
            v(p.maxwait_us / 1_000_000),
            v(p.maxwait_us % 1_000_000),
            v(mode),
        ]);
    }
    set
}

const SOCKET_COLUMNS: &[(&str, Type)] = &[
    ("type", Type::Text),
    ("user", Type::Text),
    ("database", Type::Text),
    ("state", Type::Text),
    ("addr", Type::Text),
    ("port", Type::Int4),
    ("local_addr", Type::Text),
    ("local_port", Type::Int4),
    ("connect_time", Type::Text),
    ("request_time", Type::Text),
    ("wait", Type::Int4),
    ("wait_us", Type::Int4),
    ("close_needed", Type::Int4),
    ("ptr", Type::Text),
    ("link", Type::Text),
    ("remote_pid", Type::Int4),
    ("tls", Type::Text),
    ("application_name", Type::Text),
];

fn clients(shared: &Shared) -> ResultSet {
    let mut set = ResultSet::new(SOCKET_COLUMNS);
    let now_us = shared.stats.started.elapsed().as_micros() as u64;
    let links = server_links(shared);
    for c in shared.registry.list() {
        let waited = c.waiting_since().map(|since| now_us.saturating_sub(since));
        let state = match (c.console, waited) {
            (_, Some(_)) => "waiting",
            _ => "active",
        };
        let waited = waited.unwrap_or(0);
        set.push(vec![
            v("C"),
            v(&c.user),
            v(&c.database),
            v(state),
            v(c.peer.ip()),
            v(c.peer.port()),
            c.local.map(|l| l.ip().to_string()),
            c.local.map(|l| l.port().to_string()),
            v(timestamp(c.connect_time)),
            v(timestamp(c.connect_time)),
            v(waited / 1_000_000),
            v(waited % 1_000_000),
            v(0),
            v(c.id),
            v(links.get(&c.id).cloned().unwrap_or_default()),
            v(0),
            v(if c.tls { "TLS" } else { "" }),
            v(&c.application_name),
        ]);
    }
    set
}

/// One set of pools' server connections: the read port standby's node id
/// (none: the primary's pools), every connection, the idle ones.
type ServerList = (Option<i64>, Vec<Arc<ServerEntry>>, Vec<IdleRow>);

/// Every server registry: the primary's pools', and each read port
/// standby's.
fn server_lists(shared: &Shared) -> Vec<ServerList> {
    let mut lists = vec![(None, shared.pools.servers.list(), shared.pools.idle_rows())];
    for route in shared.read_pool.routes() {
        lists.push((
            Some(route.node_id),
            route.pools.servers.list(),
            route.pools.idle_rows(),
        ));
    }
    lists
}

/// The `ptr` of the server connection each client uses now, by client id.
fn server_links(shared: &Shared) -> BTreeMap<i32, String> {
    server_lists(shared)
        .iter()
        .flat_map(|(_, servers, _)| servers.iter())
        .filter_map(|s| Some((s.link()?, s.ptr())))
        .collect()
}

/// Every server connection of the pools, the read port's too: `active`
/// (used by the client its `link` names), `idle` (in its pool), or `used`
/// (between the two: being opened, reset or closed).
fn servers(shared: &Shared) -> ResultSet {
    let mut set = ResultSet::new(SOCKET_COLUMNS);
    for (node, servers, idle_rows) in server_lists(shared) {
        let idle_since: BTreeMap<(std::net::SocketAddr, i32), Instant> = idle_rows
            .into_iter()
            .map(|idle| ((idle.addr, idle.pid), idle.since.into_std()))
            .collect();
        for s in servers {
            let link = s.link();
            let idle = idle_since.get(&(s.addr, s.pid));
            let state = match (link, idle) {
                (Some(_), _) => "active",
                (None, Some(_)) => "idle",
                (None, None) => "used",
            };
            let database = match node {
                Some(node_id) => read_database(&s.database, node_id),
                None => s.database.clone(),
            };
            set.push(vec![
                v("S"),
                v(&s.user),
                v(database),
                v(state),
                v(s.addr.ip()),
                v(s.addr.port()),
                None,
                None,
                v(timestamp(wall(s.born))),
                v(timestamp(wall(idle.copied().unwrap_or(s.born)))),
                v(0),
                v(0),
                v(0),
                v(s.ptr()),
                v(link.map(|id| id.to_string()).unwrap_or_default()),
                v(s.pid),
                v(""),
                v(""),
            ]);
        }
    }
    set
}

/// Each database's totals and averages (since the router started), by name.
fn totals_rows(shared: &Shared) -> Vec<(String, Totals, Totals)> {
    let seconds = shared.stats.started.elapsed().as_secs();
    shared
        .databases
        .list()
        .iter()
        .map(|db| {
            let totals = db.counters.totals();
            (db.name.clone(), totals, averages(&totals, seconds))
        })
        .collect()
}

fn stats(shared: &Shared) -> ResultSet {
    let mut set = ResultSet::new(&[
        ("database", Type::Text),
        ("total_xact_count", Type::Int8),
        ("total_query_count", Type::Int8),
        ("total_received", Type::Int8),
        ("total_sent", Type::Int8),
        ("total_xact_time", Type::Int8),
        ("total_query_time", Type::Int8),
        ("total_wait_time", Type::Int8),
        ("avg_xact_count", Type::Int8),
        ("avg_query_count", Type::Int8),
        ("avg_recv", Type::Int8),
        ("avg_sent", Type::Int8),
        ("avg_xact_time", Type::Int8),
        ("avg_query_time", Type::Int8),
        ("avg_wait_time", Type::Int8),
    ]);
    for (database, totals, avg) in totals_rows(shared) {
        let mut row = vec![v(database)];
        row.extend(counts(&totals));
        row.extend(counts(&avg));
        set.push(row);
    }
    set
}

/// The seven counts of a STATS row, in PgBouncer's order.
fn counts(t: &Totals) -> [Option<String>; 7] {
    [
        v(t.xact_count),
        v(t.query_count),
        v(t.received),
        v(t.sent),
        v(t.xact_time_us),
        v(t.query_time_us),
        v(t.wait_time_us),
    ]
}

const TOTALS_COLUMNS: &[(&str, Type)] = &[
    ("database", Type::Text),
    ("xact_count", Type::Int8),
    ("query_count", Type::Int8),
    ("bytes_received", Type::Int8),
    ("bytes_sent", Type::Int8),
    ("xact_time", Type::Int8),
    ("query_time", Type::Int8),
    ("wait_time", Type::Int8),
];

/// STATS_TOTALS (`averages` false) or STATS_AVERAGES: a row per database.
fn totals_set(shared: &Shared, averages: bool) -> ResultSet {
    let mut set = ResultSet::new(TOTALS_COLUMNS);
    for (database, totals, avg) in totals_rows(shared) {
        let mut row = vec![v(database)];
        row.extend(counts(if averages { &avg } else { &totals }));
        set.push(row);
    }
    set
}

fn stats_totals(shared: &Shared) -> ResultSet {
    totals_set(shared, false)
}

fn stats_averages(shared: &Shared) -> ResultSet {
    totals_set(shared, true)
}

fn databases(shared: &Shared) -> ResultSet {
    let mut set = ResultSet::new(&[
        ("name", Type::Text),
        ("host", Type::Text),
        ("port", Type::Int4),
        ("database", Type::Text),
        ("force_user", Type::Text),
        ("pool_size", Type::Int4),
        ("min_pool_size", Type::Int4),
        ("reserve_pool", Type::Int4),
        ("pool_mode", Type::Text),
        ("max_connections", Type::Int4),
        ("current_connections", Type::Int4),
        ("paused", Type::Int4),
        ("disabled", Type::Int4),
    ]);
    let rt = shared.runtime.load();
    let routing = shared.routing.load();
    let (host, port) = match &routing.primary {
        Some(p) => (Some(p.host.to_string()), Some(p.port.to_string())),
        None => (None, None),
    };
    let limit = shared.pools.node_limit(routing.epoch).unwrap_or(0);
    let mut open: BTreeMap<String, usize> = BTreeMap::new();
    for p in shared.pools.rows() {
        *open.entry(p.database).or_default() += p.open;
    }
    for (database, current) in open {
        set.push(vec![
            v(&database),
            host.clone(),
            port.clone(),
            v(&database),
            rt.config.server.user.clone(),
            v(rt.config.pool.pool_size),
            v(rt.config.pool.min_idle),
            v(0),
            v(mode_name(rt.config.pool.mode)),
            v(limit),
            v(current),
            v(i32::from(
                routing.held || shared.databases.find(&database).is_some_and(|db| db.held()),
            )),
            v(0),
        ]);
    }
    set
}

fn lists(shared: &Shared) -> ResultSet {
    let mut set = ResultSet::new(&[("list", Type::Text), ("items", Type::Int4)]);
    let pools = shared.pools.rows();
    let clients = shared.registry.list();
    let databases: std::collections::BTreeSet<&str> =
        pools.iter().map(|p| p.database.as_str()).collect();
    let users: std::collections::BTreeSet<&str> = pools.iter().map(|p| p.user.as_str()).collect();
    let open: usize = pools.iter().map(|p| p.open).sum();
    let idle: usize = pools.iter().map(|p| p.idle).sum();
    for (list, items) in [
        ("databases", databases.len()),
        ("users", users.len()),
        ("pools", pools.len()),
        ("free_clients", 0),
        ("used_clients", clients.len()),
        ("login_clients", 0),
        ("free_servers", 0),
        ("used_servers", open.saturating_sub(idle) + idle),
        ("dns_names", 0),
        ("dns_zones", 0),
        ("dns_queries", 0),
        ("dns_pending", 0),
    ] {
        set.push(vec![v(list), v(items)]);
    }
    set
}

/// Keys that need a restart (the rest apply at RELOAD or SIGHUP).
const RESTART_KEYS: &[&str] = &[
    "router.listen",
    "router.worker_threads",
    "router.cpu_scheduling",
    "metrics.listen",
];

/// `section.key` and its value, for every key of `config`.
fn flatten(config: &RouterConfig) -> BTreeMap<String, String> {
    let mut keys = BTreeMap::new();
    let Ok(toml::Value::Table(sections)) = toml::Value::try_from(config) else {
        return keys;
    };
    for (section, table) in sections {
        let toml::Value::Table(table) = table else {
            continue;
        };
        for (key, value) in table {
            let text = match value {
                toml::Value::String(s) => s,
                other => other.to_string(),
            };
            keys.insert(format!("{section}.{key}"), text);
        }
    }
    keys
}

fn config(shared: &Shared) -> ResultSet {
    let mut set = ResultSet::new(&[
        ("key", Type::Text),
        ("value", Type::Text),
        ("default", Type::Text),
        ("changeable", Type::Text),
    ]);
    let rt = shared.runtime.load();
    let values = flatten(&rt.config);
    // The defaults are what a file naming only the required key gives.
    let defaults = RouterConfig::parse(
        std::path::Path::new("defaults"),
        "[router]\nmonitor = \"postgres://monitor/hapg\"\n",
    )
    .map(|c| flatten(&c))
    .unwrap_or_default();
    for (key, value) in values {
        let changeable = if RESTART_KEYS.contains(&key.as_str()) {
            "no"
        } else {
            "yes"
        };
        let default = defaults.get(&key).cloned();
        // Secrets are not shown.
        let value = if key == "server.password" {
            "********".to_string()
        } else {
            value
        };
        set.push(vec![v(&key), v(value), default, v(changeable)]);
    }
    set
}

fn version() -> ResultSet {
    let mut set = ResultSet::new(&[("version", Type::Text)]);
    set.push(vec![v(format!("hapg {VERSION}"))]);
    set
}

fn routing(shared: &Shared) -> ResultSet {
    let mut set = ResultSet::new(&[
        ("formation", Type::Text),
        ("epoch", Type::Int8),
        ("routed_epoch", Type::Int8),
        ("primary_node_id", Type::Int8),
        ("primary", Type::Text),
        ("primary_state", Type::Text),
        ("paused", Type::Text),
        ("paused_by", Type::Text),
        ("paused_since", Type::Text),
        ("monitor_reachable", Type::Text),
        ("busy_sessions", Type::Int8),
        ("last_drain_epoch", Type::Int8),
        ("last_drain_started", Type::Text),
        ("last_drain_seconds", Type::Float8),
    ]);
    let rt = shared.runtime.load();
    let routing = shared.routing.load();
    let recorder = shared.events.lock();
    let paused_by = if !routing.paused() {
        None
    } else if routing.held {
        Some("admin PAUSE")
    } else if routing.draining() {
        Some("switchover drain")
    } else if !routing.known {
        Some("monitor not read yet")
    } else {
        Some("no writable primary")
    };
    let drain = recorder.drain;
    set.push(vec![
        v(&rt.config.router.formation),
        v(routing.epoch),
        v(routing.routed_epoch),
        routing.primary.as_ref().map(|p| p.node_id.to_string()),
        routing
            .primary
            .as_ref()
            .map(|p| format!("{}:{}", p.host, p.port)),
        routing
            .primary
            .as_ref()
            .map(|p| format!("{}/{}", p.reported, p.goal)),
        v(routing.paused()),
        paused_by.map(str::to_string),
        recorder
            .pause
            .filter(|_| routing.paused())
            .map(|p| timestamp(p.since)),
        v(shared.routing.monitor_reachable()),
        v(shared.routing.busy_total()),
        drain.map(|d| d.epoch.to_string()),
        drain.map(|d| timestamp(d.since)),
        drain
            .and_then(|d| d.took)
            .map(|t| format!("{:.3}", t.as_secs_f64())),
    ]);
    set
}

fn failovers(shared: &Shared) -> ResultSet {
    let mut set = ResultSet::new(&[
        ("at", Type::Text),
        ("from_epoch", Type::Int8),
        ("from_node_id", Type::Int8),
        ("from_address", Type::Text),
        ("to_epoch", Type::Int8),
        ("to_node_id", Type::Int8),
        ("to_address", Type::Text),
        ("held_seconds", Type::Float8),
        ("clients_waited", Type::Int8),
        ("statements_cut", Type::Int8),
    ]);
    let recorder = shared.events.lock();
    // The latest first.
    for f in recorder.failovers.iter().rev() {
        set.push(vec![
            v(timestamp(f.at)),
            v(f.from.epoch),
            v(f.from.node_id),
            v(&f.from.address),
            v(f.to.epoch),
            v(f.to.node_id),
            v(&f.to.address),
            v(format!("{:.3}", f.held.as_secs_f64())),
            v(f.clients_waited),
            v(f.cut),
        ]);
    }
    set
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn times_print_as_pgbouncer_prints_them() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_000_000);
        assert_eq!(timestamp(at), "2026-11-30 00:53:20 UTC");
        assert_eq!(timestamp(SystemTime::UNIX_EPOCH), "1970-01-01 00:00:00 UTC");
        // A leap day.
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(timestamp(leap), "2000-02-29 00:00:00 UTC");
    }
}
