//! The read-only port (`router.listen_read_only`): its listener, served with
//! the main port's limits, authentication and pooling (its sessions are
//! marked read-only and go to a standby, see `session/read.rs`), and the task
//! that keeps the read pool (`read_watch.rs`). Off when the key is not set.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept::{refuse, serve_client, ClientSlot};
use crate::error::RouterError;
use crate::shared::Shared;

/// Binds the read-only port if it is configured, and starts its accept loop
/// (on `tasks`, ending at `shutdown`) and the read pool's task (ending at
/// `stop`, whose handle is returned).
pub(crate) fn start(
    shared: &Arc<Shared>,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
    kill: &CancellationToken,
    stop: &CancellationToken,
) -> Result<Vec<JoinHandle<()>>, RouterError> {
    let addr = shared.runtime.load().config.read_only_addr()?;
    let Some(addr) = addr else {
        return Ok(Vec::new());
    };
    let listener = crate::net::bind(addr)?;
    tracing::info!(listen = %addr, "router accepting read-only connections");
    let watch = tokio::spawn(crate::read_watch::watch_standbys(
        shared.clone(),
        stop.clone(),
    ));
    tasks.spawn(accept_read(
        shared.clone(),
        listener,
        tasks.clone(),
        shutdown.clone(),
        kill.clone(),
    ));
    Ok(vec![watch])
}

/// Accepts read-only clients until `shutdown`; they count toward
/// `router.max_client_connections` with the main port's.
async fn accept_read(
    shared: Arc<Shared>,
    listener: TcpListener,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    kill: CancellationToken,
) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => {
                backoff = Duration::from_millis(5);
                accepted
            }
            Err(e) => {
                tracing::warn!(error = %e, "read-only port: accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let max = shared.runtime.load().config.router.max_client_connections as usize;
        let count = shared.clients.fetch_add(1, Ordering::Relaxed) + 1;
        let slot = ClientSlot(shared.clone());
        if count > max {
            tasks.spawn(refuse(tcp, max, slot));
            continue;
        }
        let shared = shared.clone();
        let (s, k) = (shutdown.clone(), kill.clone());
        tasks.spawn(Box::pin(async move {
            serve_client(shared, tcp, peer, s, k, true).await;
            drop(slot);
        }));
    }
}
