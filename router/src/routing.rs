//! The routing table: which node is the formation's writable primary in which
//! epoch, as last read from the monitor. The follower task publishes complete
//! new tables; sessions read the current one per decision and wait on the
//! change signal while paused.

use std::sync::Arc;

use arc_swap::ArcSwap;
use hapg_monitor::NodeState;
use tokio::sync::watch;

use crate::server::Target;

/// The primary the monitor names for an epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Primary {
    /// Node id.
    pub node_id: i64,
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Goal the monitor assigned.
    pub goal: NodeState,
    /// State the node last reported.
    pub reported: NodeState,
}

impl Primary {
    /// Goal and reported state both take writes.
    pub fn writable(&self) -> bool {
        self.goal.can_take_writes() && self.reported.can_take_writes()
    }
}

/// One version of the routing table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Routing {
    /// The formation's primary epoch.
    pub epoch: i64,
    /// The node named for the epoch, if any.
    pub primary: Option<Primary>,
    /// The newest epoch whose primary the router has seen writable: the epoch
    /// new transactions go to (registered with the monitor as `routed_epoch`).
    pub routed_epoch: i64,
    /// The table has been read from the monitor at least once.
    pub known: bool,
}

impl Routing {
    /// Where new server connections go, when the primary is writable.
    pub fn target(&self) -> Option<Target> {
        self.primary
            .as_ref()
            .filter(|p| p.writable())
            .map(|p| Target {
                host: p.host.clone(),
                port: p.port,
                epoch: self.epoch,
            })
    }

    /// True while new transactions have to wait (the primary is moving or unknown).
    pub fn paused(&self) -> bool {
        self.target().is_none()
    }
}

/// The shared, hot-swapped routing table.
pub struct RoutingTable {
    current: ArcSwap<Routing>,
    changed: watch::Sender<u64>,
}

impl Default for RoutingTable {
    fn default() -> Self {
        RoutingTable {
            current: ArcSwap::from_pointee(Routing::default()),
            changed: watch::Sender::new(0),
        }
    }
}

impl RoutingTable {
    /// The current table.
    pub fn load(&self) -> Arc<Routing> {
        self.current.load_full()
    }

    /// A receiver that wakes up on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Publishes what the monitor says now (epoch and primary); returns true
    /// when that changed the table.
    pub fn publish(&self, epoch: i64, primary: Option<Primary>) -> bool {
        let old = self.current.load();
        let mut next = Routing {
            epoch,
            primary,
            routed_epoch: old.routed_epoch,
            known: true,
        };
        if next.target().is_some() {
            next.routed_epoch = epoch;
        }
        if **old == next {
            return false;
        }
        tracing::info!(
            epoch,
            primary = ?next.primary.as_ref().map(|p| format!("{}:{} ({}/{})", p.host, p.port, p.reported, p.goal)),
            paused = next.paused(),
            "routing changed"
        );
        self.current.store(Arc::new(next));
        self.changed.send_modify(|v| *v += 1);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn primary(goal: NodeState, reported: NodeState) -> Option<Primary> {
        Some(Primary {
            node_id: 1,
            host: "127.0.0.1".into(),
            port: 5432,
            goal,
            reported,
        })
    }

    #[test]
    fn pause_and_resume() {
        let table = RoutingTable::default();
        assert!(table.load().paused());
        let rx = table.subscribe();
        assert!(table.publish(1, primary(NodeState::Primary, NodeState::Primary)));
        assert!(rx.has_changed().expect("open"));
        assert_eq!(table.load().target().expect("target").epoch, 1);
        assert!(!table.publish(1, primary(NodeState::Primary, NodeState::Primary)));
        table.publish(1, primary(NodeState::Draining, NodeState::Primary));
        assert!(table.load().paused());
        assert_eq!(table.load().routed_epoch, 1);
        table.publish(
            2,
            primary(NodeState::WaitPrimary, NodeState::PreparePromotion),
        );
        assert!(table.load().paused());
        table.publish(2, primary(NodeState::WaitPrimary, NodeState::WaitPrimary));
        assert!(!table.load().paused());
        assert_eq!(table.load().routed_epoch, 2);
    }
}
