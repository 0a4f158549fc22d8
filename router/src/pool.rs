//! Server connection pools, one per server user and database.
//!
//! Every server connection holds one slot of its pool (a semaphore permit),
//! whether a client uses it or it waits idle; `pool.pool_size` slots exist per
//! pool. A client takes an idle connection to the current primary that was
//! opened with the same startup parameters, or a free slot to open one, or
//! waits. Connections go back idle at the end of a client session (session
//! mode, after `DISCARD ALL`) or of a transaction (transaction mode).
//!
//! Idle connections to an older epoch's primary are closed as soon as the
//! routing changes; idle connections past `pool.idle_timeout_ms` or
//! `pool.lifetime_ms` are closed by the maintenance task, which also keeps
//! `pool.min_idle` connections open.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::server::{Login, ServerConn, ServerError, Target};
use crate::Shared;

/// How often the maintenance task looks at idle connections.
const MAINTAIN_EVERY: Duration = Duration::from_secs(1);

/// The pools by server user, then database. Looked up with the login's own
/// strings (a `String` key answers to a `&str`), so that a checkout or a
/// checkin allocates nothing.
#[derive(Default)]
struct PoolMap(HashMap<String, HashMap<String, Pool>>);

impl PoolMap {
    fn get(&self, user: &str, database: &str) -> Option<&Pool> {
        self.0.get(user)?.get(database)
    }

    fn get_mut(&mut self, user: &str, database: &str) -> Option<&mut Pool> {
        self.0.get_mut(user)?.get_mut(database)
    }

    fn get_or_insert_with(
        &mut self,
        user: &str,
        database: &str,
        new: impl FnOnce() -> Pool,
    ) -> &mut Pool {
        slot(slot(&mut self.0, user, HashMap::new), database, new)
    }

    fn values(&self) -> impl Iterator<Item = &Pool> {
        self.0.values().flat_map(HashMap::values)
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut Pool> {
        self.0.values_mut().flat_map(HashMap::values_mut)
    }
}

struct Idle {
    conn: ServerConn,
    since: Instant,
}

struct Pool {
    slots: Arc<Semaphore>,
    size: u32,
    /// In the order they were returned: the longest idle first.
    idle: Vec<Idle>,
    /// A connection went back idle.
    returned: Arc<Notify>,
    /// The login of the last client, to open `min_idle` connections with.
    login: Login,
}

impl Pool {
    /// Moves the idle connections `doomed` picks into `victims`, keeping the
    /// others in their order.
    fn take_idle_where(
        &mut self,
        victims: &mut Vec<ServerConn>,
        mut doomed: impl FnMut(&ServerConn) -> bool,
    ) {
        let (gone, kept): (Vec<Idle>, Vec<Idle>) = std::mem::take(&mut self.idle)
            .into_iter()
            .partition(|idle| doomed(&idle.conn));
        self.idle = kept;
        victims.extend(gone.into_iter().map(|idle| idle.conn));
    }
}

/// Why no connection could be checked out.
#[derive(Debug)]
pub(crate) enum CheckoutError {
    /// Opening a connection failed.
    Server(ServerError),
    /// Every slot of the pool stayed in use until the deadline.
    Full { size: u32 },
}

/// `map[key]`, made with `new` first if absent; finding it allocates nothing.
fn slot<'a, V>(map: &'a mut HashMap<String, V>, key: &str, new: impl FnOnce() -> V) -> &'a mut V {
    if !map.contains_key(key) {
        map.insert(key.to_string(), new());
    }
    match map.get_mut(key) {
        Some(value) => value,
        None => unreachable!("{key} was just inserted"),
    }
}

/// All pools.
#[derive(Default)]
pub(crate) struct Pools {
    pools: Mutex<PoolMap>,
}

/// Counts of one pool (for tests and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Idle connections.
    pub idle: usize,
    /// Connections open (in use and idle).
    pub open: usize,
}

async fn close_all(conns: Vec<ServerConn>) {
    for conn in conns {
        conn.terminate().await;
    }
}

impl Pools {
    fn lock(&self) -> MutexGuard<'_, PoolMap> {
        self.pools.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts of the pool of `user` and `database`.
    pub fn stats(&self, user: &str, database: &str) -> PoolStats {
        let pools = self.lock();
        match pools.get(user, database) {
            Some(p) => PoolStats {
                idle: p.idle.len(),
                open: p.size as usize - p.slots.available_permits(),
            },
            None => PoolStats { idle: 0, open: 0 },
        }
    }

    /// A connection to `target` for `login`: an idle one opened with the same
    /// startup parameters, or a new one in a free slot. Without a deadline it
    /// does not wait for a slot.
    pub async fn checkout(
        &self,
        shared: &Shared,
        target: &Target,
        login: &Login,
        connect_timeout: Duration,
        deadline: Option<Instant>,
    ) -> Result<ServerConn, CheckoutError> {
        let size = shared.runtime.load().config.pool.pool_size;
        let lifetime = shared.runtime.load().config.pool_lifetime();
        loop {
            let mut victims = Vec::new();
            let mut found = None;
            let mut permit = None;
            let (slots, returned, size) = {
                let mut pools = self.lock();
                let pool = pools.get_or_insert_with(&login.user, &login.database, || Pool {
                    slots: Arc::new(Semaphore::new(size as usize)),
                    size,
                    idle: Vec::new(),
                    returned: Arc::new(Notify::new()),
                    login: login.clone(),
                });
                if pool.login != *login {
                    pool.login = login.clone();
                }
                // The most recently returned connection first (LIFO, as
                // PgBouncer does by default): the connections in use stay
                // warm, and a surplus stays idle long enough for
                // `pool.idle_timeout_ms` to close it.
                let mut i = pool.idle.len();
                while i > 0 {
                    i -= 1;
                    let c = &pool.idle[i].conn;
                    let stale =
                        c.epoch != target.epoch || lifetime.is_some_and(|l| c.born.elapsed() >= l);
                    let candidate = !stale && found.is_none() && c.startup == login.params;
                    // Only the connection about to be handed out is probed;
                    // the others are when their turn comes.
                    if stale || (candidate && !c.looks_alive()) {
                        victims.push(pool.idle.remove(i).conn);
                    } else if candidate {
                        found = Some(pool.idle.remove(i).conn);
                    }
                }
                if found.is_none() {
                    match pool.slots.clone().try_acquire_owned() {
                        Ok(p) => permit = Some(p),
                        Err(_) => {
                            // Full: an idle connection opened for other startup
                            // parameters gives its slot up.
                            if !pool.idle.is_empty() {
                                victims.push(pool.idle.remove(0).conn);
                            }
                        }
                    }
                }
                (pool.slots.clone(), pool.returned.clone(), pool.size)
            };
            let freed = !victims.is_empty();
            close_all(victims).await;
            if let Some(conn) = found {
                return Ok(conn);
            }
            if let Some(permit) = permit {
                let mut conn =
                    ServerConn::connect(target, login, &shared.server_tls, connect_timeout)
                        .await
                        .map_err(CheckoutError::Server)?;
                conn.permit = Some(permit);
                return Ok(conn);
            }
            if freed {
                continue;
            }
            let Some(deadline) = deadline else {
                return Err(CheckoutError::Full { size });
            };
            let got = tokio::time::timeout_at(deadline, async {
                tokio::select! {
                    p = slots.acquire_owned() => p.ok(),
                    _ = returned.notified() => None,
                }
            })
            .await;
            match got {
                Err(_) => return Err(CheckoutError::Full { size }),
                Ok(Some(permit)) => {
                    let mut conn =
                        ServerConn::connect(target, login, &shared.server_tls, connect_timeout)
                            .await
                            .map_err(CheckoutError::Server)?;
                    conn.permit = Some(permit);
                    return Ok(conn);
                }
                Ok(None) => continue,
            }
        }
    }

    /// Puts a connection back idle, or returns it to be closed (its pool is
    /// gone, it belongs to an older epoch, or it is past `pool.lifetime_ms`).
    pub fn checkin(&self, shared: &Shared, conn: ServerConn) -> Option<ServerConn> {
        if conn.permit.is_none() {
            return Some(conn);
        }
        let routing = shared.routing.load();
        if routing.known && conn.epoch != routing.epoch {
            return Some(conn);
        }
        if shared
            .runtime
            .load()
            .config
            .pool_lifetime()
            .is_some_and(|l| conn.born.elapsed() >= l)
        {
            return Some(conn);
        }
        let mut pools = self.lock();
        let Some(pool) = pools.get_mut(&conn.login_user, &conn.login_database) else {
            return Some(conn);
        };
        pool.idle.push(Idle {
            conn,
            since: Instant::now(),
        });
        pool.returned.notify_one();
        None
    }

    /// Takes out the idle connections opened in `epoch`: one of them was just
    /// lost, and the others, to the same server, most likely went the same
    /// way (over TLS an idle connection does not show it until it is read),
    /// so a session must not be given one.
    pub fn discard_epoch(&self, epoch: i64) -> Vec<ServerConn> {
        let mut victims = Vec::new();
        let mut pools = self.lock();
        for pool in pools.values_mut() {
            pool.take_idle_where(&mut victims, |conn| conn.epoch == epoch);
        }
        victims
    }

    /// Takes out the idle connections that must close now: to an older
    /// epoch's primary, too old, or idle too long. Idleness alone does not
    /// take a pool below `min_idle` (as PgBouncer's `server_idle_timeout`
    /// stops at `min_pool_size`): closing those only to open them again a
    /// second later would churn backends for nothing.
    fn expired(
        &self,
        epoch: Option<i64>,
        idle_timeout: Option<Duration>,
        lifetime: Option<Duration>,
        min_idle: u32,
    ) -> Vec<ServerConn> {
        let mut victims = Vec::new();
        let mut pools = self.lock();
        for pool in pools.values_mut() {
            pool.take_idle_where(&mut victims, |conn| {
                epoch.is_some_and(|e| conn.epoch != e)
                    || lifetime.is_some_and(|l| conn.born.elapsed() >= l)
            });
            if let Some(timeout) = idle_timeout {
                // `idle` is in return order, so the longest idle go first and
                // the ones kept are the freshest.
                let mut closable = pool.idle.len().saturating_sub(min_idle as usize);
                while closable > 0 && pool.idle[0].since.elapsed() >= timeout {
                    victims.push(pool.idle.remove(0).conn);
                    closable -= 1;
                }
            }
        }
        victims
    }

    /// Free slots of pools short of `min_idle` idle connections, with the
    /// login to open a connection with.
    fn short(&self, min_idle: u32) -> Vec<(Login, tokio::sync::OwnedSemaphorePermit)> {
        if min_idle == 0 {
            return Vec::new();
        }
        self.lock()
            .values()
            .filter(|p| p.idle.len() < min_idle as usize)
            .filter_map(|p| {
                let permit = p.slots.clone().try_acquire_owned().ok()?;
                Some((p.login.clone(), permit))
            })
            .collect()
    }
}

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
                match ServerConn::connect(
                    &target,
                    &login,
                    &shared.server_tls,
                    config.connect_timeout(),
                )
                .await
                {
                    Ok(mut conn) => {
                        conn.permit = Some(permit);
                        if let Some(conn) = shared.pools.checkin(&shared, conn) {
                            conn.terminate().await;
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "could not open a min_idle connection"),
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
