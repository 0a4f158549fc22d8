//! hapg router: a PostgreSQL protocol front door that follows the monitor,
//! relays each client to the formation's current writable primary, pauses new
//! transactions while the primary moves, and re-attaches idle sessions to the
//! new primary (see docs/router.md).
//!
//! [`run`] is the entry point the CLI uses; [`Router`] exposes the same service
//! with an in-process [`Router::reload`] for tests.

pub mod auth;
pub mod cancel;
pub mod follower;
pub mod net;
pub mod pool;
pub mod protocol;
pub mod routing;
pub mod server;
pub mod threads;
pub mod tls;
pub mod tracking;

mod gated;
mod lost;
mod relay;
mod session;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::BytesMut;
use hapg_config::router::{AuthType, RouterConfig};
use hapg_config::ConfigError;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::mock::MockKey;
use crate::auth::userlist::UserlistError;
use crate::auth::Userlist;
use crate::cancel::CancelRegistry;
use crate::follower::FollowerSettings;
use crate::protocol::backend::{self, sqlstate, Severity};
use crate::routing::{Routing, RoutingTable};
use crate::tls::TlsError;

/// Errors that stop the router or refuse a reload.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The configuration file is unreadable or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The auth file is unreadable or invalid. Its text is in this one's and
    /// it is no `source()`, so that a printed chain says it once.
    #[error("auth.file: {0}")]
    Userlist(UserlistError),
    /// The TLS certificate or key is unusable.
    #[error("tls: {0}")]
    Tls(TlsError),
    /// Listening or accepting failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl From<UserlistError> for RouterError {
    fn from(e: UserlistError) -> Self {
        RouterError::Userlist(e)
    }
}

impl From<TlsError> for RouterError {
    fn from(e: TlsError) -> Self {
        RouterError::Tls(e)
    }
}

/// The configuration in force and what was loaded from it.
pub(crate) struct Runtime {
    pub config: RouterConfig,
    pub users: Userlist,
    pub tls: Option<TlsAcceptor>,
    /// The key of mock salts and secrets (the same across reloads).
    pub mock_key: Arc<MockKey>,
}

impl Runtime {
    fn load(path: &Path, mock_key: Arc<MockKey>) -> Result<Runtime, RouterError> {
        let config = RouterConfig::load(path)?;
        let mut users = match &config.auth.file {
            Some(file) => Userlist::load(file)?,
            None => Userlist::default(),
        };
        if config.auth.kind == AuthType::ScramSha256 {
            users.prepare_scram(&mock_key);
        }
        let tls = match (&config.tls.cert, &config.tls.key) {
            (Some(cert), Some(key)) => Some(TlsAcceptor::from(tls::server_config(cert, key)?)),
            _ => None,
        };
        Ok(Runtime {
            config,
            users,
            tls,
            mock_key,
        })
    }
}

/// State shared by the accept loop, the follower and every session.
pub(crate) struct Shared {
    config_path: PathBuf,
    pub runtime: ArcSwap<Runtime>,
    pub routing: Arc<RoutingTable>,
    pub cancels: Arc<CancelRegistry>,
    pub server_tls: Arc<rustls::ClientConfig>,
    /// ParameterStatus of the newest server connection, told to clients that
    /// log in while no server connection can be opened.
    pub last_params: ArcSwap<Vec<(String, String)>>,
    /// The server's own values of the parameters a client may set in its
    /// startup packet (`application_name`, `TimeZone`, ...), as server
    /// connections opened without them reported them at login: what a client
    /// that sets none is told when no server connection can be opened at its
    /// login. Unlike `last_params`, never a previous client's session-level SET.
    pub server_defaults: Mutex<Vec<(String, String)>>,
    /// Server connection pools.
    pub pools: pool::Pools,
    clients: AtomicUsize,
    restart_follower: Arc<Notify>,
    /// `router.address` as registered: set when serving starts.
    registered_address: Mutex<String>,
}

impl Shared {
    /// Keeps `params` as the newest server connection's; a pooled connection
    /// handed out again shares its list, and storing the same list is skipped.
    pub fn remember_params(&self, params: &server::Params) {
        if !Arc::ptr_eq(&self.last_params.load(), params) {
            self.last_params.store(params.clone());
        }
    }

    /// The router's last-seen list when it holds the same values as
    /// `params` (in any order); else `params`, which becomes the last seen. The connections
    /// of a pool then share one list with the sessions told it, and a
    /// transaction-mode session taking a connection sees by pointer that it
    /// has nothing to set or report.
    pub fn shared_params(&self, params: &server::Params) -> server::Params {
        let last = self.last_params.load();
        if !Arc::ptr_eq(&last, params) && server::same_params(&last, params) {
            return Arc::clone(&last);
        }
        self.remember_params(params);
        params.clone()
    }
}

/// A router: configuration, routing table and sessions.
#[derive(Clone)]
pub struct Router {
    shared: Arc<Shared>,
}

/// Counts a live client; decrements on drop.
struct ClientSlot(Arc<Shared>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Router {
    /// Loads the configuration file (and the auth file and TLS material it names).
    pub fn new(config_path: PathBuf) -> Result<Router, RouterError> {
        let runtime = Runtime::load(&config_path, Arc::new(MockKey::generate()))?;
        Ok(Router {
            shared: Arc::new(Shared {
                config_path,
                runtime: ArcSwap::from_pointee(runtime),
                routing: Arc::new(RoutingTable::default()),
                cancels: Arc::new(CancelRegistry::default()),
                server_tls: tls::client_config(),
                last_params: ArcSwap::from_pointee(Vec::new()),
                server_defaults: Mutex::new(Vec::new()),
                pools: pool::Pools::default(),
                clients: AtomicUsize::new(0),
                restart_follower: Arc::new(Notify::new()),
                registered_address: Mutex::new(String::new()),
            }),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> RouterConfig {
        self.shared.runtime.load().config.clone()
    }

    /// The routing table as last read from the monitor.
    pub fn routing(&self) -> Arc<Routing> {
        self.shared.routing.load()
    }

    /// Client connections open now.
    pub fn client_count(&self) -> usize {
        self.shared.clients.load(Ordering::Relaxed)
    }

    /// Counts of the server connection pool of `user` and `database`.
    pub fn pool_stats(&self, user: &str, database: &str) -> pool::PoolStats {
        self.shared.pools.stats(user, database)
    }

    /// Re-reads the configuration file (what SIGHUP does). A bad file keeps the
    /// configuration in force and returns why. New settings apply to new
    /// connections and new transactions; a changed monitor or formation makes
    /// the follower reconnect; `router.listen`, `router.worker_threads` and
    /// `router.cpu_scheduling` need a restart.
    pub fn reload(&self) -> Result<(), RouterError> {
        let key = self.shared.runtime.load().mock_key.clone();
        let next = match Runtime::load(&self.shared.config_path, key) {
            Ok(next) => next,
            Err(e) => {
                tracing::error!(error = %e, path = %self.shared.config_path.display(), "reload refused; the previous configuration stays in force");
                return Err(e);
            }
        };
        let old = self.shared.runtime.load_full();
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
            || next.config.router.address != old.config.router.address;
        self.shared.runtime.store(Arc::new(next));
        if follow_changed {
            self.shared.restart_follower.notify_one();
        }
        tracing::info!(path = %self.shared.config_path.display(), "configuration reloaded");
        Ok(())
    }

    fn follower_settings(&self) -> FollowerSettings {
        let config = &self.shared.runtime.load().config;
        let address = config.router.address.clone().unwrap_or_else(|| {
            self.shared
                .registered_address
                .lock()
                .map(|a| a.clone())
                .unwrap_or_default()
        });
        let port = address
            .rsplit_once(':')
            .map(|(_, p)| p.to_string())
            .unwrap_or_default();
        FollowerSettings {
            monitor: config.router.monitor.clone(),
            formation: config.router.formation.clone(),
            router_id: config
                .router
                .id
                .clone()
                .unwrap_or_else(|| format!("{}:{port}", hostname())),
            address,
            drain_timeout: config.drain_timeout(),
        }
    }

    /// Serves clients from `listener` and follows the monitor until `shutdown`;
    /// then stops accepting, closes idle sessions, lets sessions in a
    /// transaction finish for up to `router.drain_timeout_ms`, and closes the rest.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), RouterError> {
        // The caller may be `block_on`'s thread, which is not a runtime
        // worker: accepting there would cost two thread wake-ups per
        // connection (the driver wakes that thread, and its spawn wakes a
        // worker). On a worker, the accepted session is queued on the same
        // worker and runs next, with no wake-up.
        let me = self.clone();
        match tokio::spawn(async move { me.accept_loop(listener, shutdown).await }).await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(RouterError::Io(std::io::Error::other(e))),
        }
    }

    async fn accept_loop(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), RouterError> {
        let local = listener.local_addr()?;
        if let Ok(mut a) = self.shared.registered_address.lock() {
            *a = advertised(local);
        }
        let kill = CancellationToken::new();
        let tasks = TaskTracker::new();
        let follower_stop = CancellationToken::new();
        let me = self.clone();
        let follower = tokio::spawn(follower::follow(
            self.shared.routing.clone(),
            move || me.follower_settings(),
            self.shared.restart_follower.clone(),
            follower_stop.clone(),
        ));
        let maintenance = tokio::spawn(pool::maintain(self.shared.clone(), follower_stop.clone()));
        tracing::info!(listen = %local, "router accepting connections");
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
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let max = self
                .shared
                .runtime
                .load()
                .config
                .router
                .max_client_connections as usize;
            let count = self.shared.clients.fetch_add(1, Ordering::Relaxed) + 1;
            let slot = ClientSlot(self.shared.clone());
            if count > max {
                tasks.spawn(refuse(tcp, max, slot));
                continue;
            }
            let shared = self.shared.clone();
            let (s, k) = (shutdown.clone(), kill.clone());
            // Boxed: the session's future is several KB, and the task
            // machinery would otherwise copy it a few times per connection.
            tasks.spawn(Box::pin(async move {
                session::serve(shared, tcp, peer, s, k).await;
                drop(slot);
            }));
        }
        drop(listener);
        tasks.close();
        let drain = self.shared.runtime.load().config.drain_timeout();
        tracing::info!(
            sessions = self.client_count(),
            ?drain,
            "router stopping: draining sessions"
        );
        if tokio::time::timeout(drain, tasks.wait()).await.is_err() {
            tracing::warn!(
                sessions = self.client_count(),
                "drain timeout reached; closing the remaining sessions"
            );
            kill.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
        }
        follower_stop.cancel();
        let _ = follower.await;
        let _ = maintenance.await;
        Ok(())
    }
}

async fn refuse(mut tcp: TcpStream, max: usize, slot: ClientSlot) {
    let mut buf = BytesMut::new();
    backend::error(
        &mut buf,
        Severity::Fatal,
        sqlstate::TOO_MANY_CONNECTIONS,
        &format!("sorry, too many clients already (router.max_client_connections = {max})"),
        None,
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = tcp.write_all(&buf).await;
        let _ = tcp.shutdown().await;
    })
    .await;
    drop(slot);
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// The address to register: the listen address, with a wildcard IP replaced by
/// the host name.
fn advertised(local: SocketAddr) -> String {
    if local.ip().is_unspecified() {
        format!("{}:{}", hostname(), local.port())
    } else {
        local.to_string()
    }
}

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
                    let _ = reloader.reload();
                }
            }
        }
    });
    let result = router.serve(listener, shutdown.clone()).await;
    shutdown.cancel();
    let _ = sighup.await;
    result
}
