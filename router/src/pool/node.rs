//! The router-wide budget of server connections to one node
//! ([`NodeBudget`]), as the pools open connections: the epoch's first
//! connection reads the node's `max_connections` and
//! `superuser_reserved_connections`; past the budget an idle connection of
//! any pool to the node is closed, or the caller waits; a node that answers
//! `53300 too many clients` has the router's idle connections to it closed.

// Connections are boxed (see `ServerConn::connect`): handing one between a
// session and its pool moves a pointer, not the struct.
#![allow(clippy::vec_box)]

use std::sync::Arc;
use std::time::Duration;

use hapg_config::router::{server_connection_limit, NodeConnectionLimits};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::{close_all, CheckoutError, Opener, Pools};
use crate::server::{Login, ServerConn, ServerError, Target};
use crate::server_list::Listing;
use crate::slots::{NodeBudget, NodeLimit, NodeSlot, PoolId};

/// Reads the node's connection settings on a fresh connection: one query per
/// primary epoch, never per transaction.
async fn read_node_limits(conn: &mut ServerConn) -> Result<NodeConnectionLimits, ServerError> {
    let rows = conn
        .simple_query(
            "SELECT current_setting('max_connections') || ' ' || current_setting('superuser_reserved_connections')",
        )
        .await?;
    let parsed = rows.first().and_then(|row| {
        let (max, reserved) = row.split_once(' ')?;
        Some(NodeConnectionLimits {
            max_connections: max.parse().ok()?,
            superuser_reserved_connections: reserved.parse().ok()?,
        })
    });
    parsed.ok_or(ServerError::Protocol(
        crate::protocol::ProtocolError::Malformed {
            what: "the answer to the connection settings query",
        },
    ))
}

/// True for Postgres' `53300 too many clients` (and the reserved-slots
/// variant, same code): the node is up and full.
fn node_is_full(e: &ServerError) -> bool {
    matches!(e, ServerError::Refused(fields) if fields.code == crate::protocol::backend::sqlstate::TOO_MANY_CONNECTIONS)
}

impl Pools {
    /// Why a pool whose slots all stayed in use is full: when the router's
    /// budget for the node is used up too, the node's limit is what holds
    /// the pool's slots (their holders wait for it), and the client is told
    /// that rather than the pool size.
    pub(super) fn full(&self, epoch: i64, size: u32) -> CheckoutError {
        match self.budget(epoch) {
            Some(budget) if budget.permits.available_permits() == 0 => {
                CheckoutError::NodeFull(budget.limit)
            }
            _ => CheckoutError::Full { size },
        }
    }

    /// The budget of `epoch`'s primary, when known.
    pub(super) fn budget(&self, epoch: i64) -> Option<Arc<NodeBudget>> {
        let budget = self.budget.lock().unwrap_or_else(|e| e.into_inner());
        budget.as_ref().filter(|b| b.epoch == epoch).cloned()
    }

    /// Opens a connection to `target` in the pool slot `slot`, within the
    /// router's budget for that node: the epoch's first connection reads the
    /// node's limits (the others wait for it); past the budget an idle
    /// connection of any pool to the node is closed, or the caller waits
    /// until `deadline`. `None`: something changed while waiting (a
    /// connection went idle, one was closed): look in the pool again.
    pub(super) async fn open_counted(
        &self,
        opener: &Opener<'_>,
        target: &Target,
        login: &Login,
        timeout: Duration,
        slot: (PoolId, OwnedSemaphorePermit),
        deadline: Option<Instant>,
    ) -> Result<Option<Box<ServerConn>>, CheckoutError> {
        let budget = match self.budget(target.epoch) {
            Some(budget) => budget,
            None => return self.learn(opener, target, login, timeout, slot).await,
        };
        // Registered before looking, so that a connection going idle after
        // the look still wakes this waiter.
        let watched = budget.clone();
        let went_idle = watched.idle.notified();
        tokio::pin!(went_idle);
        went_idle.as_mut().enable();
        let node_permit = match budget.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if let Some(victim) = self.take_longest_idle(target.epoch) {
                    drop(slot);
                    victim.terminate().await;
                    return Ok(None);
                }
                let Some(deadline) = deadline else {
                    return Err(CheckoutError::NodeFull(budget.limit));
                };
                let waited = tokio::time::timeout_at(deadline, async {
                    tokio::select! {
                        p = budget.permits.clone().acquire_owned() => p.ok(),
                        _ = &mut went_idle => None,
                    }
                })
                .await;
                match waited {
                    Err(_) => return Err(CheckoutError::NodeFull(budget.limit)),
                    Ok(None) => return Ok(None),
                    Ok(Some(permit)) => permit,
                }
            }
        };
        let node_slot = NodeSlot {
            budget,
            _permit: node_permit,
        };
        let mut conn = self
            .open_or_make_room(opener, target, login, timeout, slot)
            .await
            .map_err(CheckoutError::Server)?;
        conn.node_slot = Some(node_slot);
        Ok(Some(conn))
    }

    /// The first connection of an epoch: opened alone, it reads the node's
    /// `max_connections` and `superuser_reserved_connections` and sets the
    /// router's budget for the node from them.
    pub(super) async fn learn(
        &self,
        opener: &Opener<'_>,
        target: &Target,
        login: &Login,
        timeout: Duration,
        slot: (PoolId, OwnedSemaphorePermit),
    ) -> Result<Option<Box<ServerConn>>, CheckoutError> {
        let _alone = self.learning.lock().await;
        if self.budget(target.epoch).is_some() {
            // Another connection learnt them meanwhile: count this one in
            // as any other.
            return Ok(None);
        }
        let mut conn = self
            .open_or_make_room(opener, target, login, timeout, slot)
            .await
            .map_err(CheckoutError::Server)?;
        let read = tokio::time::timeout(timeout, read_node_limits(&mut conn)).await;
        let node = match read.unwrap_or(Err(ServerError::Timeout(timeout))) {
            Ok(node) => node,
            Err(e) => {
                conn.terminate().await;
                return Err(CheckoutError::Server(e));
            }
        };
        let (pool_size, configured) = (
            opener.config.pool.pool_size,
            opener.config.pool.max_server_connections,
        );
        let (limit, too_many) = server_connection_limit(node, configured);
        let limit = NodeLimit {
            limit,
            node,
            configured,
        };
        if too_many {
            tracing::warn!(
                pool.max_server_connections = configured,
                max_connections = node.max_connections,
                superuser_reserved_connections = node.superuser_reserved_connections,
                limit = limit.limit,
                "pool.max_server_connections asks for more than the node's max_connections - superuser_reserved_connections: the router opens at most {}",
                limit.limit
            );
        }
        let budget = Arc::new(NodeBudget {
            epoch: target.epoch,
            limit,
            permits: Arc::new(Semaphore::new(limit.limit as usize)),
            idle: Notify::new(),
        });
        let permit = budget
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| CheckoutError::NodeFull(limit))?;
        conn.node_slot = Some(NodeSlot {
            budget: budget.clone(),
            _permit: permit,
        });
        *self.budget.lock().unwrap_or_else(|e| e.into_inner()) = Some(budget);
        tracing::info!(
            epoch = target.epoch,
            server = %format!("{}:{}", target.host, target.port),
            max_connections = node.max_connections,
            superuser_reserved_connections = node.superuser_reserved_connections,
            limit = limit.limit,
            "server connection limit for the primary"
        );
        warn_if_oversubscribed(self.pool_count(), pool_size, &limit);
        Ok(Some(conn))
    }

    /// Opens a connection; when the node answers that it is full (53300),
    /// closes the router's own idle connections to it, in every pool, and
    /// tries once more if that freed any.
    pub(super) async fn open_or_make_room(
        &self,
        opener: &Opener<'_>,
        target: &Target,
        login: &Login,
        timeout: Duration,
        (id, permit): (PoolId, OwnedSemaphorePermit),
    ) -> Result<Box<ServerConn>, ServerError> {
        match open(opener, target, login, timeout).await {
            Err(e) if node_is_full(&e) => {
                let victims = self.discard_epoch(target.epoch);
                if victims.is_empty() {
                    return Err(e);
                }
                tracing::warn!(
                    server = %format!("{}:{}", target.host, target.port),
                    closed = victims.len(),
                    error = %e,
                    "the primary has no connection slot left: closing the router's idle connections to it and trying again"
                );
                close_all(victims).await;
                open(opener, target, login, timeout)
                    .await
                    .map(|conn| self.in_pool(conn, login, id, permit))
            }
            result => result.map(|conn| self.in_pool(conn, login, id, permit)),
        }
    }

    /// A `pool.min_idle` connection: opened only in room the node's budget
    /// has free (never by closing another pool's idle connection).
    pub async fn open_spare(
        &self,
        opener: &Opener<'_>,
        target: &Target,
        login: &Login,
        timeout: Duration,
        slot: (PoolId, OwnedSemaphorePermit),
    ) -> Result<Option<Box<ServerConn>>, CheckoutError> {
        let Some(budget) = self.budget(target.epoch) else {
            return self.learn(opener, target, login, timeout, slot).await;
        };
        let Ok(permit) = budget.permits.clone().try_acquire_owned() else {
            return Ok(None);
        };
        let (id, pool_permit) = slot;
        let mut conn = open(opener, target, login, timeout)
            .await
            .map_err(CheckoutError::Server)?;
        conn = self.in_pool(conn, login, id, pool_permit);
        conn.node_slot = Some(NodeSlot {
            budget,
            _permit: permit,
        });
        Ok(Some(conn))
    }

    /// `conn` in a slot of pool `id` (of `login`), listed in `SHOW SERVERS`.
    fn in_pool(
        &self,
        mut conn: Box<ServerConn>,
        login: &Login,
        id: PoolId,
        permit: OwnedSemaphorePermit,
    ) -> Box<ServerConn> {
        conn.pool = Some(id);
        conn.permit = Some(permit);
        conn.listed = Some(self.servers.register(Listing {
            user: &login.user,
            database: &login.database,
            addr: conn.addr,
            pid: conn.pid,
            epoch: conn.epoch,
            born: conn.born,
        }));
        conn
    }

    /// Takes out the idle connection to `epoch`'s primary that has been idle
    /// longest, whatever its pool.
    pub(super) fn take_longest_idle(&self, epoch: i64) -> Option<Box<ServerConn>> {
        let mut pools = self.lock();
        let (pool, index) = pools
            .pools
            .iter()
            .enumerate()
            .filter_map(|(p, pool)| {
                let i = pool.idle.iter().position(|idle| idle.conn.epoch == epoch)?;
                Some((p, i, pool.idle[i].since))
            })
            .min_by_key(|(_, _, since)| *since)
            .map(|(p, i, _)| (p, i))?;
        Some(pools.pools[pool].idle.remove(index).conn)
    }
}

/// Opens a connection to `target`, its reported parameters shared with the
/// pool's other connections when they agree ([`LastParams::share`]).
async fn open(
    opener: &Opener<'_>,
    target: &Target,
    login: &Login,
    timeout: Duration,
) -> Result<Box<ServerConn>, ServerError> {
    let liveness = crate::net::Liveness::of(opener.config);
    let mut conn = ServerConn::connect(target, login, opener.tls, &liveness, timeout).await?;
    conn.params = opener.params.share(&conn.params);
    Ok(conn)
}

/// Warns when the pools could ask the node for more connections than the
/// router's limit for it (then clients wait for one another, up to
/// `router.pause_timeout_ms`, instead of taking the node's last slots).
pub(super) fn warn_if_oversubscribed(pools: usize, pool_size: u32, limit: &NodeLimit) {
    let wanted = pools as u64 * u64::from(pool_size);
    if wanted > u64::from(limit.limit) {
        tracing::warn!(
            pools,
            pool.pool_size = pool_size,
            pool.max_server_connections = limit.configured,
            max_connections = limit.node.max_connections,
            superuser_reserved_connections = limit.node.superuser_reserved_connections,
            "pool.pool_size x pools ({wanted}) is more than the router's {} server connections to the primary (pool.max_server_connections, else max_connections - superuser_reserved_connections less a tenth): clients wait for one another beyond that",
            limit.limit
        );
    }
}
