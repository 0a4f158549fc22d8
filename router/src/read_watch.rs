//! The task that fills the read pool (`read_pool.rs`) while the read-only
//! port is on: every `[read_only] lag_check_interval_ms`, and at once on a
//! state change the monitor announces, it reads the formation's nodes from
//! the monitor, checks the candidate standbys itself (`pg_is_in_recovery()`,
//! `pg_last_wal_replay_lsn()`) against the primary's `pg_current_wal_lsn()`
//! (its lag in time: since the earliest reading of the primary's LSN it has
//! not replayed, see `PrimaryHistory`), and publishes the eligible set. A
//! standby whose replay is paused is so noticed between the keepers'
//! reports, and one promoted under the router leaves the pool as soon as
//! either the monitor or the node itself says so.
//!
//! The check logs in as `server.user` (default `postgres`) with
//! `server.password` to the `postgres` database, without TLS; a node it
//! cannot check is judged by the monitor's reports alone.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hapg_monitor::store::{Channel, NodeRow};
use hapg_monitor::MonitorClient;
use tokio_util::sync::CancellationToken;

use crate::read_pool::{eligibility, LagLimits, PrimaryHistory, ReplayCheck};
use crate::shared::Shared;

/// Budget of one connection attempt round to the monitor.
const CONNECT_BUDGET: Duration = Duration::from_secs(3);
/// Limit on one check of a node (connect and query).
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Connections of the checks, per node id.
type Checkers = HashMap<i64, tokio_postgres::Client>;

/// Follows the standbys until `stop`.
pub(crate) async fn watch_standbys(shared: Arc<Shared>, stop: CancellationToken) {
    let mut checkers = Checkers::new();
    let mut history = PrimaryHistory::default();
    let mut failures = 0u32;
    while !stop.is_cancelled() {
        match watch_once(&shared, &mut checkers, &mut history, &stop).await {
            Ok(()) => return,
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(30) {
                    tracing::warn!(error = %e, "read pool: monitor unreachable; the read pool keeps its last value");
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    }
}

async fn watch_once(
    shared: &Shared,
    checkers: &mut Checkers,
    history: &mut PrimaryHistory,
    stop: &CancellationToken,
) -> Result<(), String> {
    let monitor = shared.runtime.load().config.router.monitor.clone();
    let mut client = tokio::select! {
        _ = stop.cancelled() => return Ok(()),
        c = MonitorClient::connect_with_retry(&monitor, CONNECT_BUDGET) => c.map_err(|e| e.to_string())?,
    };
    client
        .listen(&[Channel::State])
        .await
        .map_err(|e| e.to_string())?;
    loop {
        let rt = shared.runtime.load_full();
        let config = &rt.config;
        let formation = &config.router.formation;
        let nodes = tokio::time::timeout(CHECK_TIMEOUT * 2, client.nodes(formation, None))
            .await
            .map_err(|_| "reading the nodes: no answer".to_string())?
            .map_err(|e| e.to_string())?;
        let routing = shared.routing.load();
        let primary = routing
            .primary
            .as_ref()
            .and_then(|p| nodes.iter().find(|n| n.node_id == p.node_id));
        let limits = LagLimits {
            max_bytes: config.read_only.max_lag_bytes,
            max_time: config.read_max_lag(),
        };
        let mut eligible = Vec::new();
        let mut left = Vec::new();
        if let Some(primary) = primary {
            let primary_lsn = check_primary(config, checkers, primary).await;
            let now = std::time::Instant::now();
            if let Some(lsn) = primary_lsn {
                history.record(
                    now,
                    lsn,
                    config.read_max_lag() * 2 + Duration::from_secs(10),
                );
            }
            for node in nodes
                .iter()
                .filter(|n| n.group_id == primary.group_id && n.node_id != primary.node_id)
            {
                let check = check_standby(config, checkers, node).await.map(|mut c| {
                    c.primary_lsn = primary_lsn;
                    c.behind_for = history.behind_for(now, c.replay_lsn);
                    c
                });
                match eligibility(node, primary.lsn, check.as_ref(), limits) {
                    Ok(()) => eligible.push((
                        node.node_id,
                        Arc::<str>::from(node.host.as_str()),
                        node.port,
                    )),
                    Err(why) => left.push((node.node_id, why.to_string())),
                }
            }
        }
        let victims = shared.read_pool.publish(&eligible, &left);
        if !victims.is_empty() {
            tokio::spawn(crate::pool::close_all(victims));
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = client.next_change(config.lag_check_interval()) => {}
        }
        while client.try_change().is_some() {}
        if client.is_closed() {
            return Err("the monitor connection closed".into());
        }
    }
}

/// A check connection to `node`, opened if need be.
async fn checker<'a>(
    config: &hapg_config::router::RouterConfig,
    checkers: &'a mut Checkers,
    node: &NodeRow,
) -> Option<&'a tokio_postgres::Client> {
    if checkers.get(&node.node_id).is_none_or(|c| c.is_closed()) {
        checkers.remove(&node.node_id);
        let mut pg = tokio_postgres::Config::new();
        pg.host(&node.host)
            .port(node.port)
            .user(config.server.user.as_deref().unwrap_or("postgres"))
            .dbname("postgres")
            .application_name("hapg-router read pool check")
            .connect_timeout(CHECK_TIMEOUT);
        if let Some(p) = &config.server.password {
            pg.password(p);
        }
        match tokio::time::timeout(CHECK_TIMEOUT, pg.connect(tokio_postgres::NoTls)).await {
            Ok(Ok((client, conn))) => {
                tokio::spawn(conn);
                checkers.insert(node.node_id, client);
            }
            Ok(Err(e)) => {
                tracing::debug!(node_id = node.node_id, error = %e, "read pool check: cannot connect");
                return None;
            }
            Err(_) => return None,
        }
    }
    checkers.get(&node.node_id)
}

/// `pg_current_wal_lsn()` on the primary.
async fn check_primary(
    config: &hapg_config::router::RouterConfig,
    checkers: &mut Checkers,
    primary: &NodeRow,
) -> Option<u64> {
    let client = checker(config, checkers, primary).await?;
    let sql = "SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE (pg_current_wal_lsn() - '0/0')::bigint END";
    let row = tokio::time::timeout(CHECK_TIMEOUT, client.query_one(sql, &[]))
        .await
        .ok()?
        .ok()?;
    let lsn: Option<i64> = row.get(0);
    lsn.and_then(|l| u64::try_from(l).ok())
}

/// The router's own look at a standby's replay.
async fn check_standby(
    config: &hapg_config::router::RouterConfig,
    checkers: &mut Checkers,
    node: &NodeRow,
) -> Option<ReplayCheck> {
    let client = checker(config, checkers, node).await?;
    let sql = "SELECT pg_is_in_recovery(), (pg_last_wal_replay_lsn() - '0/0')::bigint";
    let row = match tokio::time::timeout(CHECK_TIMEOUT, client.query_one(sql, &[])).await {
        Ok(Ok(row)) => row,
        _ => {
            checkers.remove(&node.node_id);
            return None;
        }
    };
    let in_recovery: bool = row.get(0);
    let replay: Option<i64> = row.get(1);
    Some(ReplayCheck {
        in_recovery,
        replay_lsn: replay.and_then(|l| u64::try_from(l).ok()).unwrap_or(0),
        behind_for: None,
        primary_lsn: None,
    })
}
