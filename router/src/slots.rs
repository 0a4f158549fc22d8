//! What ties a server connection to the limits it counts against: its
//! pool's place ([`PoolId`]) and its slot in the router-wide budget of
//! connections to its node ([`NodeSlot`] of a [`NodeBudget`]). Kept apart
//! from the pools so that a server connection can carry them without the
//! connection code depending on the pool code.

use std::sync::Arc;

use hapg_config::router::NodeConnectionLimits;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// A pool's place in the pool map ([`crate::pool::Pools`]). Pools are never removed, so a
/// connection or a session can keep it and skip the lookup by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PoolId(pub(crate) usize);

/// The router's limit of server connections to one node, and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NodeLimit {
    /// Server connections the router opens to the node, all pools together.
    pub(crate) limit: u32,
    /// The node's settings it was computed from.
    pub(crate) node: NodeConnectionLimits,
    /// `pool.max_server_connections` when it was read (0: computed).
    pub(crate) configured: u32,
}

/// The router-wide budget of server connections to the primary of one epoch.
/// Its size is fixed when it is made (the epoch's first connection); a
/// changed `pool.max_server_connections` applies from the next epoch.
pub(crate) struct NodeBudget {
    pub(crate) epoch: i64,
    pub(crate) limit: NodeLimit,
    pub(crate) permits: Arc<Semaphore>,
    /// A connection to the node went idle while the budget was used up: a
    /// waiter may close it to open its own.
    pub(crate) idle: Notify,
}

/// A server connection's place in its node's [`NodeBudget`], given back when
/// the connection is dropped.
pub(crate) struct NodeSlot {
    pub(crate) budget: Arc<NodeBudget>,
    pub(crate) _permit: OwnedSemaphorePermit,
}

impl std::fmt::Debug for NodeSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeSlot")
            .field("epoch", &self.budget.epoch)
            .finish()
    }
}
