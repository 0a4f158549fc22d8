//! `hapg run` on a monitor: keep the monitor's Postgres running, and run the
//! monitor service beside it until shut down.

use std::sync::atomic::Ordering;
use std::time::Duration;

use hapg_config::{MonitorTimings, NodeConfig};
use tokio::sync::watch;
use tracing::Instrument;

use crate::create::monitor_local_conninfo;
use crate::error::KeeperError;
use crate::keeper::Shutdown;
use crate::monitor_status::MonitorStatus;
use crate::paths::NodePaths;
use crate::postgres::{LocalPostgres, StopMode};

/// Runs the monitor node at `paths` until `shutdown`.
pub async fn run(
    paths: NodePaths,
    timings: MonitorTimings,
    shutdown: Shutdown,
) -> Result<(), KeeperError> {
    let config = NodeConfig::load(&paths.config)?;
    // Bound before anything starts: an address in use fails `hapg run` at once.
    let http = match config.http.listen_addr()? {
        Some(addr) => Some(crate::http::bind(addr).await?),
        None => None,
    };
    let pg = LocalPostgres::from_config(&config)?;
    pg.write_config(&[("cluster_name", "'hapg monitor'".to_string())])?;
    pg.start().await?;
    let supervisor = {
        let pg = pg.clone();
        let token = shutdown.token.clone();
        tokio::spawn(async move {
            while !token.is_cancelled() {
                if pg.postmaster_pid().is_none() {
                    tracing::warn!("the monitor's postgres is not running: restarting it");
                    if let Err(e) = pg.start().await {
                        tracing::error!(error = %e, "cannot start the monitor's postgres");
                    }
                }
                tokio::select! {
                    _ = token.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        })
    };
    if let Some(listener) = http {
        let (sender, receiver) = watch::channel(MonitorStatus::starting());
        tokio::spawn(
            crate::monitor_status::poll(
                monitor_local_conninfo(&config),
                sender,
                shutdown.token.clone(),
            )
            .in_current_span(),
        );
        tokio::spawn(
            crate::http::serve(
                listener,
                crate::http::Endpoints::Monitor(receiver),
                shutdown.token.clone(),
            )
            .in_current_span(),
        );
    }
    let result = hapg_monitor::service::run(
        &monitor_local_conninfo(&config),
        timings,
        shutdown.token.clone(),
    )
    .await;
    shutdown.token.cancel();
    let _ = supervisor.await;
    if !shutdown.keep_postgres.load(Ordering::Relaxed) {
        let mode = if shutdown.immediate.load(Ordering::Relaxed) {
            StopMode::Immediate
        } else {
            StopMode::Fast
        };
        pg.stop(mode).await?;
    }
    result.map_err(KeeperError::from)
}
