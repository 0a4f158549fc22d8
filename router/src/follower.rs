//! Following the monitor: read the formation's primary and epoch, LISTEN for
//! state changes, re-read on every notification, every second, and whenever
//! the monitor connection comes back; register the router (id, address, last
//! seen, routed epoch) about once a second. While the monitor is unreachable
//! the routing table keeps its last value.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hapg_monitor::{MonitorClient, MonitorError, NodeState};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::routing::{Primary, RoutingTable};

/// How often the routing is re-read without a notification, and the router
/// row refreshed.
const TICK: Duration = Duration::from_secs(1);
/// Budget of one connection attempt round to the monitor.
const CONNECT_BUDGET: Duration = Duration::from_secs(3);
/// Limit on any single monitor statement.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// What the follower needs to know; re-read on every reconnection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FollowerSettings {
    /// Monitor URI.
    pub monitor: String,
    /// Formation.
    pub formation: String,
    /// Router id registered with the monitor.
    pub router_id: String,
    /// Address registered with the monitor.
    pub address: String,
}

/// Reads the routing of `formation` in one statement.
pub async fn read_routing(
    client: &MonitorClient,
    formation: &str,
) -> Result<(i64, Option<Primary>), MonitorError> {
    let row = client
        .inner()
        .query_opt(
            "SELECT f.primary_epoch, n.node_id, n.node_host, n.node_port,
                    n.goal_state::text, n.reported_state::text
               FROM hapg.formation f
               LEFT JOIN hapg.node n ON n.node_id = f.primary_node_id
              WHERE f.formation_id = $1",
            &[&formation],
        )
        .await?
        .ok_or_else(|| MonitorError::NoSuchFormation(formation.to_string()))?;
    let epoch: i64 = row.try_get(0)?;
    let node_id: Option<i64> = row.try_get(1)?;
    let primary = match node_id {
        None => None,
        Some(node_id) => {
            let port: i32 = row.try_get(3)?;
            let goal: String = row.try_get(4)?;
            let reported: String = row.try_get(5)?;
            Some(Primary {
                node_id,
                host: row.try_get(2)?,
                port: u16::try_from(port)
                    .map_err(|_| MonitorError::Corrupt(format!("node port {port}")))?,
                goal: goal.parse::<NodeState>()?,
                reported: reported.parse::<NodeState>()?,
            })
        }
    };
    Ok((epoch, primary))
}

async fn register(
    client: &MonitorClient,
    settings: &FollowerSettings,
    routed_epoch: i64,
) -> Result<(), MonitorError> {
    client
        .inner()
        .execute(
            "INSERT INTO hapg.router (router_id, formation_id, address, last_seen, routed_epoch)
             VALUES ($1, $2, $3, now(), $4)
             ON CONFLICT (router_id) DO UPDATE
                SET formation_id = excluded.formation_id, address = excluded.address,
                    last_seen = now(), routed_epoch = excluded.routed_epoch",
            &[
                &settings.router_id,
                &settings.formation,
                &settings.address,
                &routed_epoch,
            ],
        )
        .await?;
    Ok(())
}

async fn timed<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, MonitorError>>,
) -> Result<T, String> {
    match tokio::time::timeout(QUERY_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {QUERY_TIMEOUT:?}")),
    }
}

/// Follows the monitor until `shutdown`; `settings` is called on every
/// (re)connection, and `restart` makes the follower reconnect (after a reload).
pub async fn follow(
    table: Arc<RoutingTable>,
    settings: impl Fn() -> FollowerSettings,
    restart: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut failures = 0u32;
    while !shutdown.is_cancelled() {
        let current = settings();
        let session = follow_once(&table, &current, &restart, &shutdown);
        match session.await {
            Ok(()) => failures = 0,
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(30) {
                    tracing::warn!(error = %e, "monitor unreachable; routing to the last known primary");
                } else {
                    tracing::debug!(error = %e, "monitor still unreachable");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = restart.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    }
}

/// One monitor connection's life; `Ok` when asked to restart or stop.
async fn follow_once(
    table: &RoutingTable,
    settings: &FollowerSettings,
    restart: &Notify,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let mut client = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        c = MonitorClient::connect_with_retry(&settings.monitor, CONNECT_BUDGET) => c.map_err(|e| e.to_string())?,
    };
    timed("LISTEN", client.listen_state()).await?;
    tracing::info!(monitor = client.uri(), formation = %settings.formation, "following the monitor");
    let mut last_register: Option<Instant> = None;
    loop {
        let (epoch, primary) = timed(
            "reading the routing",
            read_routing(&client, &settings.formation),
        )
        .await?;
        table.publish(epoch, primary);
        if last_register.is_none_or(|t| t.elapsed() >= TICK) {
            let routed = table.load().routed_epoch;
            timed(
                "registering the router",
                register(&client, settings, routed),
            )
            .await?;
            last_register = Some(Instant::now());
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = restart.notified() => return Ok(()),
            _ = client.next_notification(TICK) => {}
        }
        while client.try_notification().is_some() {}
        if client.is_closed() {
            return Err("the monitor connection closed".into());
        }
    }
}
