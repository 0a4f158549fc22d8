//! Loading router.toml again (SIGHUP, the console's RELOAD), and the check
//! a new monitor or formation must pass first, which `hapg router run` also
//! makes before it binds: a bad file or a formation the monitor does not
//! have keeps the configuration in force.

use std::sync::Arc;
use std::time::Duration;

use crate::error::RouterError;
use crate::shared::{Runtime, Shared};

/// How long a reload may spend asking the monitor whether it has the new
/// formation (SIGHUP waits for it, so it stays short).
const RELOAD_FORMATION_CHECK: Duration = Duration::from_secs(3);

/// Refuses a router whose formation the monitor does not have: it would
/// follow nothing and hold every client. A monitor that does not answer
/// within `budget` (unreachable, still starting) is no reason to refuse: the
/// router follows it once it answers (logged). Used at `hapg router run`
/// and by [`reload`] when the monitor or formation changed.
pub async fn check_formation(
    router: &hapg_config::router::RouterSection,
    budget: Duration,
) -> Result<(), RouterError> {
    use hapg_monitor::{MonitorClient, MonitorError};
    let check = async {
        let monitor = match MonitorClient::connect_with_retry(&router.monitor, budget).await {
            Ok(monitor) => monitor,
            Err(e) if e.is_transient() || e.is_monitor_not_ready() => {
                tracing::warn!(error = %e, "monitor not reachable; the router follows it once it answers");
                return Ok(());
            }
            Err(e) => return Err(RouterError::Monitor(e)),
        };
        match monitor.formation(&router.formation).await {
            Ok(_) => Ok(()),
            Err(MonitorError::NoSuchFormation(name)) => Err(RouterError::NoSuchFormation(name)),
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "monitor not reachable; the router follows it once it answers");
                Ok(())
            }
            Err(e) => Err(RouterError::Monitor(e)),
        }
    };
    // connect_with_retry's budget bounds its retries, not the attempt in
    // flight: the whole check gets a bound of its own.
    match tokio::time::timeout(budget + Duration::from_secs(2), check).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(
                ?budget,
                "the monitor did not answer in time; the router follows it once it answers"
            );
            Ok(())
        }
    }
}

/// Re-reads the configuration file (what SIGHUP does). A bad file keeps the
/// configuration in force and returns why. New settings apply to new
/// connections and new transactions; a changed monitor or formation makes
/// the follower reconnect; `router.listen`, `router.worker_threads` and
/// `router.cpu_scheduling` need a restart. A changed monitor or formation is
/// asked first whether it has the formation ([`check_formation`], at most a
/// few seconds): a monitor that says no refuses the reload; one that does
/// not answer does not.
pub(crate) async fn reload(shared: &Shared) -> Result<(), RouterError> {
    let key = shared.runtime.load().mock_key.clone();
    let old = shared.runtime.load_full();
    let loaded = match Runtime::load(&shared.config_path, key) {
        Ok(next) => {
            let moved = next.config.router.monitor != old.config.router.monitor
                || next.config.router.formation != old.config.router.formation;
            if moved {
                check_formation(&next.config.router, RELOAD_FORMATION_CHECK)
                    .await
                    .map(|()| next)
            } else {
                Ok(next)
            }
        }
        Err(e) => Err(e),
    };
    let next = match loaded {
        Ok(next) => next,
        Err(e) => {
            tracing::error!(error = %e, path = %shared.config_path.display(), "reload refused; the previous configuration stays in force");
            return Err(e);
        }
    };
    if next.config.router.listen != old.config.router.listen {
        tracing::warn!("router.listen changed: it takes effect at the next restart");
    }
    if next.config.router.worker_threads != old.config.router.worker_threads
        || next.config.router.cpu_scheduling != old.config.router.cpu_scheduling
    {
        tracing::warn!("router.worker_threads or router.cpu_scheduling changed: it takes effect at the next restart");
    }
    let follow_changed = next.config.router.monitor != old.config.router.monitor
        || next.config.router.formation != old.config.router.formation
        || next.config.router.id != old.config.router.id
        || next.config.router.address != old.config.router.address
        || next.config.router.listen_read_only != old.config.router.listen_read_only;
    shared.runtime.store(Arc::new(next));
    if follow_changed {
        shared.restart_follower.notify_one();
    }
    tracing::info!(path = %shared.config_path.display(), "configuration reloaded");
    Ok(())
}
