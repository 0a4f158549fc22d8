//! [`Router`]: the service one `hapg router run` is. It loads the
//! configuration (and reloads it on SIGHUP), follows the monitor, keeps the
//! pools, and accepts clients: each accepted connection goes through the
//! startup handshake ([`crate::startup`]) and then the session's relay
//! ([`crate::session`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use bytes::BytesMut;
use hapg_config::router::RouterConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::mock::MockKey;
use crate::client_error::ClientError;
use crate::error::RouterError;
use crate::follower::{self, FollowerSettings};
use crate::maintenance;
use crate::net;
use crate::pool::PoolStats;
use crate::protocol::backend::sqlstate;
use crate::routing::Routing;
use crate::session::Session;
use crate::shared::{Runtime, Shared};
use crate::startup::{self, Started};
use crate::stats::ClientEntry;
use crate::{console, metrics, stats};

/// How long a reload may spend asking the monitor whether it has the new
/// formation (SIGHUP waits for it, so it stays short).
const RELOAD_FORMATION_CHECK: Duration = Duration::from_secs(3);

/// Refuses a router whose formation the monitor does not have: it would
/// follow nothing and hold every client. A monitor that does not answer
/// within `budget` (unreachable, still starting) is no reason to refuse: the
/// router follows it once it answers (logged). Used at `hapg router run`
/// and by [`Router::reload`] when the monitor or formation changed.
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

/// A router: configuration, routing table and sessions.
#[derive(Clone)]
pub struct Router {
    shared: Arc<Shared>,
}

/// Counts a live client; decrements on drop.
pub(crate) struct ClientSlot(pub(crate) Arc<Shared>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Router {
    /// The router whose state `shared` is (the console's RELOAD).
    pub(crate) fn of(shared: Arc<Shared>) -> Router {
        Router { shared }
    }

    /// Loads the configuration file (and the auth file and TLS material it names).
    pub fn new(config_path: PathBuf) -> Result<Router, RouterError> {
        let runtime = Runtime::load(&config_path, Arc::new(MockKey::generate()))?;
        Ok(Router {
            shared: Arc::new(Shared::new(config_path, runtime)),
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

    /// The read-only port's eligible standbys, with this router's read
    /// sessions on each (node id, sessions).
    pub fn read_pool(&self) -> Vec<(i64, usize)> {
        self.shared.read_pool.sessions()
    }

    /// Client connections open now.
    pub fn client_count(&self) -> usize {
        self.shared.clients.load(Ordering::Relaxed)
    }

    /// Counts of the server connection pool of `user` and `database`.
    pub fn pool_stats(&self, user: &str, database: &str) -> PoolStats {
        self.shared.pools.stats(user, database)
    }

    /// Re-reads the configuration file (what SIGHUP does). A bad file keeps the
    /// configuration in force and returns why. New settings apply to new
    /// connections and new transactions; a changed monitor or formation makes
    /// the follower reconnect; `router.listen`, `router.worker_threads` and
    /// `router.cpu_scheduling` need a restart. A changed monitor or
    /// formation is asked first whether it has the formation
    /// ([`check_formation`], at most a few seconds): a monitor that says no
    /// refuses the reload; one that does not answer does not.
    pub async fn reload(&self) -> Result<(), RouterError> {
        let key = self.shared.runtime.load().mock_key.clone();
        let old = self.shared.runtime.load_full();
        let loaded = match Runtime::load(&self.shared.config_path, key) {
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
                tracing::error!(error = %e, path = %self.shared.config_path.display(), "reload refused; the previous configuration stays in force");
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
        let (host, port) = address.rsplit_once(':').unwrap_or((&address, ""));
        let port = port.to_string();
        // The read-only port, on the host the main one is advertised at.
        let read_only_address = config
            .read_only_addr()
            .ok()
            .flatten()
            .map(|read| format!("{host}:{}", read.port()));
        FollowerSettings {
            monitor: config.router.monitor.clone(),
            formation: config.router.formation.clone(),
            router_id: config
                .router
                .id
                .clone()
                .unwrap_or_else(|| format!("{}:{port}", hostname())),
            read_only_address,
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
        let maintenance = tokio::spawn(maintenance::maintain(
            self.shared.clone(),
            follower_stop.clone(),
        ));
        let events = tokio::spawn(stats::events::watch(
            self.shared.clone(),
            follower_stop.clone(),
        ));
        let metrics = match self.shared.runtime.load().config.metrics_addr()? {
            Some(addr) => Some(tokio::spawn(metrics::serve(
                metrics::bind(addr).await?,
                self.shared.clone(),
                follower_stop.clone(),
            ))),
            None => None,
        };
        if let Ok(mut stop) = self.shared.stop.lock() {
            *stop = Some(shutdown.clone());
        }
        let read_port =
            crate::read_port::start(&self.shared, &tasks, &shutdown, &kill, &follower_stop)?;
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
                serve_client(shared, tcp, peer, s, k, false).await;
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
        let _ = events.await;
        if let Some(metrics) = metrics {
            let _ = metrics.await;
        }
        for task in read_port {
            let _ = task.await;
        }
        Ok(())
    }
}

pub(crate) async fn refuse(mut tcp: TcpStream, max: usize, slot: ClientSlot) {
    let mut buf = BytesMut::new();
    ClientError::fatal(
        sqlstate::TOO_MANY_CONNECTIONS,
        format!("sorry, too many clients already (router.max_client_connections = {max})"),
        None,
    )
    .write(&mut buf);
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

/// Serves one accepted connection to its end: the startup handshake, then
/// the session.
pub(crate) async fn serve_client(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
    kill: CancellationToken,
    read_only: bool,
) {
    if let Err(e) = net::tune(&tcp) {
        tracing::debug!(error = %e, "could not tune client socket");
    }
    let local = tcp.local_addr().ok();
    let connect_time = std::time::SystemTime::now();
    let rt = shared.runtime.load_full();
    let started = tokio::select! {
        // The handshake's log lines name the client (`client` in JSON
        // logs); the relay after it is not instrumented, to keep span
        // enter and exit off the per-message path.
        r = tokio::time::timeout(
            rt.config.login_timeout(),
            startup::start(&shared, &rt, tcp, peer, read_only)
                .instrument(tracing::info_span!("client", client = %peer)),
        ) => r,
        _ = kill.cancelled() => return,
    };
    drop(rt);
    match started {
        Err(_) => tracing::info!(%peer, "client did not complete its startup in time"),
        Ok(Err(crate::client::Ended)) | Ok(Ok(None)) => {}
        Ok(Ok(Some((client, started)))) => {
            // KILL_CLIENT ends this client alone; the router's own kill
            // (end of the shutdown drain) still reaches it.
            let kill = kill.child_token();
            let tls = client.stream.is_tls();
            match started {
                Started::Session(ready) => {
                    let registered = shared.registry.register(ClientEntry {
                        id: ready.cancel.pid,
                        user: ready.client_user.clone(),
                        pool_user: ready.login.user.clone(),
                        database: ready.login.database.clone(),
                        peer,
                        local,
                        connect_time,
                        tls,
                        application_name: application_name(&ready.login.params),
                        console: false,
                        waiting_since: Default::default(),
                        kill: kill.clone(),
                    });
                    let session = Session::new(shared, client, ready, registered, shutdown, kill);
                    if read_only {
                        session.read_only().run().await;
                    } else {
                        session.run().await;
                    }
                }
                Started::Console(login) => {
                    let registered = shared.registry.register(ClientEntry {
                        id: login.cancel.pid,
                        user: login.user.clone(),
                        pool_user: login.user.clone(),
                        database: login.database.clone(),
                        peer,
                        local,
                        connect_time,
                        tls,
                        application_name: login.application_name.clone(),
                        console: true,
                        waiting_since: Default::default(),
                        kill: kill.clone(),
                    });
                    console::serve(shared, client, login, shutdown, kill).await;
                    drop(registered);
                }
            }
        }
    }
}

fn application_name(params: &[(String, String)]) -> String {
    params
        .iter()
        .find(|(k, _)| k == "application_name")
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}
