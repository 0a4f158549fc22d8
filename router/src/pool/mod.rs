//! Server connection pools, one per server user and database.
//!
//! Every server connection holds one slot of its pool (a semaphore permit),
//! whether a client uses it or it waits idle; `pool.pool_size` slots exist per
//! pool. A client takes an idle connection to the current primary that was
//! opened with the same startup parameters, or a free slot to open one, or
//! waits. Connections go back idle at the end of a client session (session
//! mode, after `DISCARD ALL`) or of a transaction (transaction mode).
//!
//! Every pool's connections to one node also share a router-wide limit
//! ([`NodeBudget`]): read once per primary epoch from the node's
//! `max_connections` and `superuser_reserved_connections` on the first
//! connection opened to it, it keeps the router off the slots Postgres keeps
//! for superusers, and off the node's last ones (`pool.max_server_connections`).
//! A new connection past it first closes an idle connection of any pool to
//! that node, else waits. A node that answers `53300 too many clients` has
//! the router's idle connections to it closed, and is tried once more.
//!
//! Idle connections to an older epoch's primary are closed as soon as the
//! routing changes; idle connections past `pool.idle_timeout_ms` or
//! `pool.lifetime_ms` are closed by the maintenance task, which also keeps
//! `pool.min_idle` connections open.

// Connections are boxed (see `ServerConn::connect`): handing one between a
// session and its pool moves a pointer, not the struct.
#![allow(clippy::vec_box)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hapg_config::router::RouterConfig;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

mod node;

use self::node::warn_if_oversubscribed;

use crate::params::LastParams;
use crate::server::{Login, ServerConn, ServerError, Target};
use crate::server_list::ServerRegistry;
use crate::slots::{NodeBudget, NodeLimit, PoolId};

/// What opening a server connection takes: the configuration in force (pool
/// sizes, lifetimes, socket liveness), TLS toward servers, and the router's
/// last-seen parameter list that new connections share when they agree.
pub(crate) struct Opener<'a> {
    pub config: &'a RouterConfig,
    pub tls: &'a Arc<rustls::ClientConfig>,
    pub params: &'a LastParams,
}

/// The pools, and their places by server user, then database. Looked up
/// with the login's own strings (a `String` key answers to a `&str`), so
/// that a checkout allocates nothing, and not at all when the caller knows
/// the place.
#[derive(Default)]
struct PoolMap {
    ids: HashMap<String, HashMap<String, PoolId>>,
    pools: Vec<Pool>,
}

impl PoolMap {
    fn get(&self, user: &str, database: &str) -> Option<&Pool> {
        let id = self.ids.get(user)?.get(database)?;
        self.pools.get(id.0)
    }

    /// The pool of `login`, made with `new` first if absent: at `hint` when
    /// that is its place (one comparison of each name instead of hashing
    /// them).
    fn find_or_insert_with(
        &mut self,
        login: &Login,
        hint: Option<PoolId>,
        new: impl FnOnce() -> Pool,
    ) -> (PoolId, &mut Pool) {
        let hinted = hint.filter(|id| {
            self.pools.get(id.0).is_some_and(|pool| {
                pool.login.user == login.user && pool.login.database == login.database
            })
        });
        let id = match hinted {
            Some(id) => id,
            None => {
                let next = PoolId(self.pools.len());
                let by_database = slot(&mut self.ids, &login.user, HashMap::new);
                let id = *slot(by_database, &login.database, || next);
                if id == next {
                    self.pools.push(new());
                }
                id
            }
        };
        (id, &mut self.pools[id.0])
    }
}

struct Idle {
    conn: Box<ServerConn>,
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
    /// `RECONNECT [db]` on the admin console: connections opened before
    /// this close when they come back instead of going idle.
    reconnect_before: Option<std::time::Instant>,
}

impl Pool {
    /// Moves the idle connections `doomed` picks into `victims`, keeping the
    /// others in their order.
    fn take_idle_where(
        &mut self,
        victims: &mut Vec<Box<ServerConn>>,
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
    /// The router's connections to the node reached its limit for that node
    /// and stayed in use until the deadline.
    NodeFull(NodeLimit),
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

/// What one look in a pool found (see [`Pools::look`]).
struct Look {
    id: PoolId,
    /// An idle connection to hand out.
    found: Option<Box<ServerConn>>,
    /// Else a free slot to open one in.
    permit: Option<OwnedSemaphorePermit>,
    /// Idle connections to close.
    victims: Vec<Box<ServerConn>>,
    slots: Arc<Semaphore>,
    returned: Arc<Notify>,
    size: u32,
    /// The pool was made by this look.
    created: bool,
}

/// All pools.
#[derive(Default)]
pub(crate) struct Pools {
    pools: Mutex<PoolMap>,
    /// The budget of the newest epoch's primary, once known.
    budget: Mutex<Option<Arc<NodeBudget>>>,
    /// Held while the first connection of an epoch reads the node's limits,
    /// so that a burst of logins waits for them instead of racing past.
    learning: tokio::sync::Mutex<()>,
    /// Every connection of these pools (`SHOW SERVERS`).
    pub servers: Arc<ServerRegistry>,
}

/// Counts of one pool (for tests and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Idle connections.
    pub idle: usize,
    /// Connections open (in use and idle).
    pub open: usize,
}

pub(crate) async fn close_all(conns: Vec<Box<ServerConn>>) {
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
    /// does not wait for a slot. `hint` is where the pool of `login` was
    /// last time (a connection's [`ServerConn::pool`]), if known.
    pub async fn checkout(
        &self,
        opener: &Opener<'_>,
        target: &Target,
        login: &Login,
        hint: Option<PoolId>,
        connect_timeout: Duration,
        deadline: Option<Instant>,
    ) -> Result<Box<ServerConn>, CheckoutError> {
        let (size, lifetime) = (opener.config.pool.pool_size, opener.config.pool_lifetime());
        loop {
            let Look {
                id,
                found,
                permit,
                victims,
                slots,
                returned,
                size,
                created,
            } = self.look(target, login, hint, size, lifetime);
            if created {
                if let Some(budget) = self.budget(target.epoch) {
                    warn_if_oversubscribed(self.pool_count(), size, &budget.limit);
                }
            }
            let freed = !victims.is_empty();
            close_all(victims).await;
            if let Some(conn) = found {
                return Ok(conn);
            }
            let permit = match permit {
                Some(permit) => permit,
                None if freed => continue,
                None => {
                    let Some(deadline) = deadline else {
                        return Err(self.full(target.epoch, size));
                    };
                    let got = tokio::time::timeout_at(deadline, async {
                        tokio::select! {
                            p = slots.acquire_owned() => p.ok(),
                            _ = returned.notified() => None,
                        }
                    })
                    .await;
                    match got {
                        Err(_) => return Err(self.full(target.epoch, size)),
                        Ok(Some(permit)) => permit,
                        Ok(None) => continue,
                    }
                }
            };
            let opened = self
                .open_counted(
                    opener,
                    target,
                    login,
                    connect_timeout,
                    (id, permit),
                    deadline,
                )
                .await?;
            if let Some(conn) = opened {
                return Ok(conn);
            }
        }
    }

    /// One look in the pool of `login` (made, with `size` slots, if it is
    /// new), under its lock: an idle connection it can hand out, else a free
    /// slot; stale or dead idle connections taken out on the way.
    fn look(
        &self,
        target: &Target,
        login: &Login,
        hint: Option<PoolId>,
        size: u32,
        lifetime: Option<Duration>,
    ) -> Look {
        let mut victims = Vec::new();
        let mut found = None;
        let mut permit = None;
        let mut created = false;
        let mut pools = self.lock();
        let (id, pool) = pools.find_or_insert_with(login, hint, || {
            created = true;
            Pool {
                slots: Arc::new(Semaphore::new(size as usize)),
                size,
                idle: Vec::new(),
                returned: Arc::new(Notify::new()),
                login: login.clone(),
                reconnect_before: None,
            }
        });
        if pool.login != *login {
            pool.login = login.clone();
        }
        // The most recently returned connection first (LIFO, as PgBouncer
        // does by default): the connections in use stay warm, and a surplus
        // stays idle long enough for `pool.idle_timeout_ms` to close it.
        // The search stops at the first connection it can hand out: the
        // maintenance task closes stale ones the search did not reach (at
        // once when the routing changes).
        let now = std::time::Instant::now();
        let mut i = pool.idle.len();
        while i > 0 && found.is_none() {
            i -= 1;
            let c = &pool.idle[i].conn;
            let stale = c.epoch != target.epoch || past(c, lifetime, now);
            let candidate = !stale && c.startup == login.params;
            // Only the connection about to be handed out is probed; the
            // others are when their turn comes.
            if stale || (candidate && !c.looks_alive()) {
                victims.push(pool.idle.remove(i).conn);
            } else if candidate {
                found = Some(pool.idle.remove(i).conn);
            }
        }
        if found.is_none() {
            match pool.slots.clone().try_acquire_owned() {
                Ok(p) => permit = Some(p),
                // Full: an idle connection opened for other startup
                // parameters gives its slot up.
                Err(_) if !pool.idle.is_empty() => victims.push(pool.idle.remove(0).conn),
                Err(_) => {}
            }
        }
        Look {
            id,
            found,
            permit,
            victims,
            slots: pool.slots.clone(),
            returned: pool.returned.clone(),
            size: pool.size,
            created,
        }
    }

    /// Pools that exist now.
    fn pool_count(&self) -> usize {
        self.lock().pools.len()
    }

    /// The most recently returned idle connection of pool `id`, when it can
    /// serve `login` as it is: opened with the same startup parameters,
    /// within `pool.lifetime_ms`, and alive. The quick checkout of a
    /// transaction-mode session between two transactions (the caller checks
    /// the connection's epoch); anything less goes through
    /// [`Pools::checkout`].
    pub fn take_ready(
        &self,
        id: PoolId,
        login: &Login,
        lifetime: Option<Duration>,
    ) -> Option<Box<ServerConn>> {
        let mut pools = self.lock();
        let pool = pools.pools.get_mut(id.0)?;
        let conn = &pool.idle.last()?.conn;
        let ready = pool.login.user == login.user
            && pool.login.database == login.database
            && conn.startup == login.params
            && !past(conn, lifetime, std::time::Instant::now())
            && conn.looks_alive();
        if !ready {
            return None;
        }
        pool.idle.pop().map(|idle| idle.conn)
    }

    /// Puts a connection back idle, or returns it to be closed (its pool is
    /// gone, it belongs to another epoch than `epoch`, the routing's when
    /// known, or it is past `lifetime`, `pool.lifetime_ms`).
    pub fn checkin(
        &self,
        conn: Box<ServerConn>,
        epoch: Option<i64>,
        lifetime: Option<Duration>,
    ) -> Option<Box<ServerConn>> {
        conn.set_link(0);
        if conn.permit.is_none() {
            return Some(conn);
        }
        if epoch.is_some_and(|epoch| conn.epoch != epoch) {
            return Some(conn);
        }
        let now = Instant::now();
        if past(&conn, lifetime, now.into_std()) {
            return Some(conn);
        }
        let Some(id) = conn.pool else {
            return Some(conn);
        };
        let mut pools = self.lock();
        let Some(pool) = pools.pools.get_mut(id.0) else {
            return Some(conn);
        };
        if pool.reconnect_before.is_some_and(|t| conn.born < t) {
            return Some(conn);
        }
        let budget_used_up = conn
            .node_slot
            .as_ref()
            .filter(|slot| slot.budget.permits.available_permits() == 0)
            .map(|slot| slot.budget.clone());
        pool.idle.push(Idle { conn, since: now });
        pool.returned.notify_one();
        drop(pools);
        if let Some(budget) = budget_used_up {
            // Clients of other pools may be waiting for room on the node.
            budget.idle.notify_waiters();
        }
        None
    }

    /// Takes out the idle connections opened in `epoch`: one of them was just
    /// lost, and the others, to the same server, most likely went the same
    /// way (over TLS an idle connection does not show it until it is read),
    /// so a session must not be given one.
    pub fn discard_epoch(&self, epoch: i64) -> Vec<Box<ServerConn>> {
        let mut victims = Vec::new();
        let mut pools = self.lock();
        for pool in pools.pools.iter_mut() {
            pool.take_idle_where(&mut victims, |conn| conn.epoch == epoch);
        }
        victims
    }

    /// Takes out the idle connections that must close now: to an older
    /// epoch's primary, too old, or idle too long. Idleness alone does not
    /// take a pool below `min_idle` (as PgBouncer's `server_idle_timeout`
    /// stops at `min_pool_size`): closing those only to open them again a
    /// second later would churn backends for nothing.
    pub fn expired(
        &self,
        epoch: Option<i64>,
        idle_timeout: Option<Duration>,
        lifetime: Option<Duration>,
        min_idle: u32,
    ) -> Vec<Box<ServerConn>> {
        let mut victims = Vec::new();
        let mut pools = self.lock();
        for pool in pools.pools.iter_mut() {
            let now = std::time::Instant::now();
            pool.take_idle_where(&mut victims, |conn| {
                epoch.is_some_and(|e| conn.epoch != e) || past(conn, lifetime, now)
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
    pub fn short(&self, min_idle: u32) -> Vec<(Login, (PoolId, OwnedSemaphorePermit))> {
        if min_idle == 0 {
            return Vec::new();
        }
        self.lock()
            .pools
            .iter()
            .enumerate()
            .filter(|(_, p)| p.idle.len() < min_idle as usize)
            .filter_map(|(i, p)| {
                let permit = p.slots.clone().try_acquire_owned().ok()?;
                Some((p.login.clone(), (PoolId(i), permit)))
            })
            .collect()
    }
}

/// One pool as the admin console shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PoolRow {
    pub user: String,
    pub database: String,
    pub size: u32,
    pub idle: usize,
    pub open: usize,
}

/// An idle server connection as the admin console shows it (the rest is
/// in its [`crate::server_list::ServerEntry`]).
#[derive(Debug, Clone)]
pub(crate) struct IdleRow {
    pub addr: std::net::SocketAddr,
    pub pid: i32,
    pub since: Instant,
}

/// What the admin console reads and does (cold: one lock per command).
impl Pools {
    /// Every pool's counts.
    pub fn rows(&self) -> Vec<PoolRow> {
        self.lock()
            .pools
            .iter()
            .map(|p| PoolRow {
                user: p.login.user.clone(),
                database: p.login.database.clone(),
                size: p.size,
                idle: p.idle.len(),
                open: p.size as usize - p.slots.available_permits(),
            })
            .collect()
    }

    /// Every idle connection.
    pub fn idle_rows(&self) -> Vec<IdleRow> {
        self.lock()
            .pools
            .iter()
            .flat_map(|p| {
                p.idle.iter().map(|idle| IdleRow {
                    addr: idle.conn.addr,
                    pid: idle.conn.pid,
                    since: idle.since,
                })
            })
            .collect()
    }

    /// The router's connections to the primary, all pools together, and its
    /// limit for that node when known.
    pub fn node_limit(&self, epoch: i64) -> Option<u32> {
        self.budget(epoch).map(|b| b.limit.limit)
    }

    /// `RECONNECT` (`database` none) or `RECONNECT db`: takes out every
    /// idle connection (of that database's pools), and makes the ones in
    /// use close when they come back.
    pub fn reconnect(&self, database: Option<&str>) -> Vec<Box<ServerConn>> {
        let mut victims = Vec::new();
        let mut pools = self.lock();
        let now = std::time::Instant::now();
        for pool in pools.pools.iter_mut() {
            if database.is_some_and(|db| pool.login.database != db) {
                continue;
            }
            pool.reconnect_before = Some(now);
            pool.take_idle_where(&mut victims, |_| true);
        }
        victims
    }
}

/// True when `conn` has lived `lifetime` (`pool.lifetime_ms`) by `now`.
fn past(conn: &ServerConn, lifetime: Option<Duration>, now: std::time::Instant) -> bool {
    lifetime.is_some_and(|l| now.saturating_duration_since(conn.born) >= l)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login(user: &str, database: &str) -> Login {
        Login {
            user: user.to_string(),
            password: None,
            database: database.to_string(),
            params: Vec::new(),
            sslmode: hapg_config::router::ServerSslMode::Disable,
            unix_socket_dir: None,
        }
    }

    fn pool(login: &Login) -> Pool {
        Pool {
            slots: Arc::new(Semaphore::new(1)),
            size: 1,
            idle: Vec::new(),
            returned: Arc::new(Notify::new()),
            login: login.clone(),
            reconnect_before: None,
        }
    }

    #[test]
    fn a_pool_is_found_at_its_place_and_a_wrong_hint_is_not_followed() {
        let mut map = PoolMap::default();
        let (app, reports) = (login("app", "db"), login("reports", "db"));
        let (app_id, _) = map.find_or_insert_with(&app, None, || pool(&app));
        let (reports_id, _) = map.find_or_insert_with(&reports, None, || pool(&reports));
        assert_ne!(app_id, reports_id);
        // Found again by name, and at the hinted place.
        for hint in [None, Some(app_id)] {
            let (id, found) = map.find_or_insert_with(&app, hint, || unreachable!("no new pool"));
            assert_eq!((id, found.login.user.as_str()), (app_id, "app"));
        }
        // A hint to another pool's place, or past the end, is checked against
        // the login's names and ignored.
        for hint in [Some(app_id), Some(PoolId(7))] {
            let (id, found) =
                map.find_or_insert_with(&reports, hint, || unreachable!("no new pool"));
            assert_eq!((id, found.login.user.as_str()), (reports_id, "reports"));
        }
        let other_db = login("app", "other");
        let (id, found) = map.find_or_insert_with(&other_db, Some(app_id), || pool(&other_db));
        assert!(id != app_id && id != reports_id);
        assert_eq!(found.login.database, "other");
        assert_eq!(map.pools.len(), 3);
        assert!(map.get("app", "other").is_some());
    }
}
