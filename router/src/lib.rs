//! hapg router: a PostgreSQL protocol front door that follows the monitor,
//! relays each client to the formation's current writable primary, pauses new
//! transactions while the primary moves, and re-attaches idle sessions to the
//! new primary (see docs/router.md, and docs/architecture.md for where each
//! part lives).
//!
//! [`run`] is the entry point the CLI uses; [`Router`] exposes the same service
//! with an in-process [`Router::reload`] for tests.

pub mod protocol;
pub mod routing;
pub mod threads;

pub(crate) mod accept;
pub(crate) mod auth;
pub(crate) mod cancel;
pub(crate) mod client;
pub(crate) mod client_error;
pub(crate) mod console;
pub(crate) mod error;
pub(crate) mod follower;
pub(crate) mod gated;
pub(crate) mod maintenance;
pub(crate) mod metrics;
pub(crate) mod net;
pub(crate) mod params;
pub(crate) mod pool;
pub(crate) mod pool_counts;
pub(crate) mod read_pool;
pub(crate) mod read_port;
pub(crate) mod read_watch;
pub(crate) mod reload;
pub(crate) mod router;
pub(crate) mod server;
pub(crate) mod server_list;
pub(crate) mod session;
pub(crate) mod shared;
pub(crate) mod slots;
pub(crate) mod startup;
pub(crate) mod stats;
pub(crate) mod tls;
pub(crate) mod tracking;

use std::path::PathBuf;

use hapg_config::router::RouterConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use crate::error::RouterError;
pub use crate::pool::PoolStats;
pub use crate::reload::check_formation;
pub use crate::router::Router;

/// Binds the router's listening socket (SO_REUSEADDR, backlog 4096).
pub fn bind(config: &RouterConfig) -> std::io::Result<TcpListener> {
    let addr = config
        .listen_addr()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    net::bind(addr)
}

/// Loads `config_path`, follows the monitor and serves `listener` until
/// `shutdown`; SIGHUP reloads the configuration (a bad file keeps the old one).
pub async fn run(
    listener: TcpListener,
    config_path: PathBuf,
    shutdown: CancellationToken,
) -> Result<(), RouterError> {
    let router = Router::new(config_path)?;
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let reloader = router.clone();
    let stop = shutdown.clone();
    let sighup = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                got = hangups.recv() => {
                    if got.is_none() {
                        return;
                    }
                    // Errors are logged by reload itself.
                    let _ = reloader.reload().await;
                }
            }
        }
    });
    let result = router.serve(listener, shutdown.clone()).await;
    shutdown.cancel();
    let _ = sighup.await;
    result
}
