//! [`Router`]: the service one `hapg router run` is. It loads the
//! configuration (and reloads it on SIGHUP), follows the monitor, keeps the
//! pools, and accepts clients: each accepted connection goes through the
//! startup handshake ([`crate::startup`]) and then the session's relay
//! ([`crate::session`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use hapg_config::router::RouterConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept::{refuse, serve_client, ClientSlot};
use crate::auth::mock::MockKey;
use crate::error::RouterError;
use crate::follower::{self, FollowerSettings};
use crate::maintenance;
use crate::pool::PoolStats;
use crate::routing::Routing;
use crate::shared::{Runtime, Shared};
use crate::{metrics, stats};

/// A router: configuration, routing table and sessions.
#[derive(Clone)]
pub struct Router {
    shared: Arc<Shared>,
}

impl Router {
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
        crate::reload::reload(&self.shared).await
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
        let events = tokio::spawn(record_failovers(self.shared.clone(), follower_stop.clone()));
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

/// Feeds every routing table to the primary-change recorder
/// ([`stats::events`]) until `stop`.
async fn record_failovers(shared: Arc<Shared>, stop: CancellationToken) {
    let mut changes = shared.routing.subscribe();
    loop {
        let routing = shared.routing.load();
        let counters = stats::events::Counters {
            held_total: shared.stats.held_total.load(Ordering::Relaxed),
            cut_total: shared.routing.cut_total(),
        };
        {
            let mut recorder = shared.events.lock();
            let keep = shared.runtime.load().config.admin.failovers_kept as usize;
            recorder.set_keep(keep);
            recorder.on_routing(&routing, Instant::now(), SystemTime::now(), counters);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
    }
}
