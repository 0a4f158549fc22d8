//! What SHOW POOLS and the pool metrics count, from what the router
//! shares: every pool (the main port's, and the read port's per standby)
//! with its clients and its server connections. The console and the
//! metrics both read it; neither owns it.

use std::collections::BTreeMap;

use crate::shared::Shared;

/// Clients per pool (server user, database): active, waiting, and the
/// longest wait now (µs).
fn client_counts(shared: &Shared) -> BTreeMap<(String, String), (u64, u64, u64)> {
    let now_us = shared.stats.started.elapsed().as_micros() as u64;
    let mut counts: BTreeMap<(String, String), (u64, u64, u64)> = BTreeMap::new();
    for c in shared.registry.list().iter().filter(|c| !c.console) {
        let entry = counts
            .entry((c.pool_user.clone(), c.database.clone()))
            .or_default();
        match c.waiting_since() {
            Some(since) => {
                entry.1 += 1;
                entry.2 = entry.2.max(now_us.saturating_sub(since));
            }
            None => entry.0 += 1,
        }
    }
    counts
}

/// One row of SHOW POOLS (and of the pool metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PoolCounts {
    pub database: String,
    pub user: String,
    pub cl_active: u64,
    pub cl_waiting: u64,
    pub sv_active: usize,
    pub sv_idle: usize,
    pub maxwait_us: u64,
}

/// Every pool with its clients, by server user and database; clients whose
/// pool has no connection yet (held by a pause) count too.
pub(crate) fn pool_rows(shared: &Shared) -> Vec<PoolCounts> {
    let mut clients = client_counts(shared);
    let mut rows: BTreeMap<(String, String), (usize, usize)> = BTreeMap::new();
    for p in shared.pools.rows() {
        rows.insert(
            (p.user, p.database),
            (p.open.saturating_sub(p.idle), p.idle),
        );
    }
    for key in clients.keys() {
        rows.entry(key.clone()).or_default();
    }
    let mut counts: Vec<PoolCounts> = rows
        .into_iter()
        .map(|((user, database), (sv_active, sv_idle))| {
            let (cl_active, cl_waiting, maxwait_us) = clients
                .remove(&(user.clone(), database.clone()))
                .unwrap_or_default();
            PoolCounts {
                database,
                user,
                cl_active,
                cl_waiting,
                sv_active,
                sv_idle,
                maxwait_us,
            }
        })
        .collect();
    // The read port's pools, per standby: their server connections (its
    // clients are counted with the database they logged in to, above).
    for route in shared.read_pool.routes() {
        for p in route.pools.rows() {
            counts.push(PoolCounts {
                database: read_database(&p.database, route.node_id),
                user: p.user,
                sv_active: p.open.saturating_sub(p.idle),
                sv_idle: p.idle,
                ..PoolCounts::default()
            });
        }
    }
    counts
}

/// The name a read port pool goes by in `database` columns and labels:
/// its own, so that PgBouncer's exporters see one more pool rather than
/// two rows with the same database and user.
pub(crate) fn read_database(database: &str, node_id: i64) -> String {
    format!("{database} (read node {node_id})")
}
