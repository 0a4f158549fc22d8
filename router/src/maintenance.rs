//! The pools' maintenance task: closes idle connections to an old primary
//! as soon as the routing changes, idle connections past
//! `pool.idle_timeout_ms` or `pool.lifetime_ms`, and keeps `pool.min_idle`
//! connections open.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::pool::close_all;
use crate::shared::Shared;

/// How often the maintenance task looks at idle connections.
const MAINTAIN_EVERY: Duration = Duration::from_secs(1);

/// Closes idle connections to an old primary as soon as the routing changes,
/// expires idle connections, and keeps `pool.min_idle` open, until `stop`.
pub(crate) async fn maintain(shared: Arc<Shared>, stop: CancellationToken) {
    let mut changes = shared.routing.subscribe();
    loop {
        let routing = shared.routing.load();
        // The whole configuration in force, shared (cloning it every second
        // would copy each of its strings).
        let runtime = shared.runtime.load_full();
        let config = &runtime.config;
        let epoch = routing.known.then_some(routing.epoch);
        let victims = shared.pools.expired(
            epoch,
            config.pool_idle_timeout(),
            config.pool_lifetime(),
            config.pool.min_idle,
        );
        if !victims.is_empty() {
            tracing::info!(
                closed = victims.len(),
                epoch = routing.epoch,
                "closing idle pooled server connections"
            );
            close_all(victims).await;
        }
        if let Some(target) = routing.target() {
            // One connection per pool per round: min_idle fills up over a
            // few rounds without a burst of logins.
            for (login, permit) in shared.pools.short(config.pool.min_idle) {
                let opener = shared.opener(&runtime);
                match shared
                    .pools
                    .open_spare(&opener, &target, &login, config.connect_timeout(), permit)
                    .await
                {
                    Ok(None) => {}
                    Ok(Some(conn)) => {
                        if let Some(conn) = shared.checkin(conn) {
                            conn.terminate().await;
                        }
                    }
                    Err(e) => tracing::debug!(error = ?e, "could not open a min_idle connection"),
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = changes.changed() => {}
            _ = tokio::time::sleep(MAINTAIN_EVERY) => {}
        }
    }
    let victims = shared.pools.expired(None, Some(Duration::ZERO), None, 0);
    close_all(victims).await;
}
