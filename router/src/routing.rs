//! The routing table: which node is the formation's writable primary in which
//! epoch, as last read from the monitor. The follower task publishes complete
//! new tables; sessions read the current one per decision and wait on the
//! change signal while paused.
//!
//! The table is also the gate of the switchover drain: while a drain holds an
//! epoch, no new transaction starts on that epoch's primary; sessions count
//! themselves busy on an epoch while they have a statement or a transaction
//! open on its server, and the drain waits for that count to reach zero, then
//! asks the sessions still busy to cut their transaction.
//!
//! A new epoch cuts too: once the monitor names another primary, a statement
//! still running on the old one is answered by nobody the router can wait
//! for (that primary may be frozen, cut off, or powered off with its socket
//! still open), so the sessions busy on an older epoch are told to give it up.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use hapg_monitor::NodeState;
use tokio::sync::watch;

use crate::server::Target;

/// The primary the monitor names for an epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Primary {
    /// Node id.
    pub node_id: i64,
    /// Host (shared: every new server connection's target names it).
    pub host: Arc<str>,
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
    /// A switchover drain holds new transactions back on the primary of this
    /// epoch (and of any older one).
    pub drain: Option<i64>,
    /// An operator's `PAUSE` on the admin console holds every new
    /// transaction until `RESUME`.
    pub held: bool,
}

impl Routing {
    /// Where new server connections go, when the primary is writable and not
    /// being drained.
    pub fn target(&self) -> Option<Target> {
        self.target_epoch()?;
        self.primary.as_ref().map(|p| Target {
            host: p.host.clone(),
            port: p.port,
            epoch: self.epoch,
        })
    }

    /// The epoch of [`Routing::target`], without building it (every
    /// transaction asks, and the host name is a String to copy).
    pub fn target_epoch(&self) -> Option<i64> {
        let writable = self.primary.as_ref().is_some_and(|p| p.writable());
        (writable && !self.draining() && !self.held).then_some(self.epoch)
    }

    /// True while new transactions have to wait (the primary is moving,
    /// unknown, or being drained).
    pub fn paused(&self) -> bool {
        self.target_epoch().is_none()
    }

    /// True while a switchover drain holds the current epoch's primary.
    pub fn draining(&self) -> bool {
        self.drain.is_some_and(|d| d >= self.epoch)
    }
}

/// What the drain gate counts: sessions busy per epoch.
#[derive(Default)]
struct Gate {
    busy: BTreeMap<i64, usize>,
    /// Sessions busy per database (by [`DbGate::index`]): what `PAUSE db`
    /// waits for.
    busy_db: Vec<usize>,
    /// Sessions holding state that cannot move (LISTEN, temporary tables...)
    /// on a server of each epoch, idle or not: a new epoch must reach them
    /// at once, so that they end instead of waiting unaware on the old one.
    pinned: BTreeMap<i64, usize>,
}

/// Takes one off `epoch`'s count in `counts`.
fn release(counts: &mut BTreeMap<i64, usize>, epoch: i64) -> bool {
    let last = match counts.get_mut(&epoch) {
        Some(n) => {
            *n = n.saturating_sub(1);
            *n == 0
        }
        None => true,
    };
    if last {
        counts.remove(&epoch);
    }
    last
}

/// Why sessions are told to cut what they have open on a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutReason {
    /// A switchover drain ran out of time (`router.drain_timeout_ms`).
    DrainTimeout,
    /// The monitor named the primary of a newer epoch.
    PrimaryChanged {
        /// The new epoch.
        to: i64,
    },
}

/// An order to the sessions busy on `epoch` or an older one: cut the
/// statement or transaction open there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    /// Sessions busy on this epoch or an older one are cut.
    pub epoch: i64,
    /// Why.
    pub reason: CutReason,
}

impl Cut {
    /// Whether a session busy on `busy_epoch` has to cut.
    pub fn applies_to(&self, busy_epoch: i64) -> bool {
        busy_epoch <= self.epoch
    }
}

/// The shared, hot-swapped routing table.
pub struct RoutingTable {
    current: ArcSwap<Routing>,
    changed: watch::Sender<u64>,
    /// Every change of `current` and of the busy counts happens under this lock.
    gate: Mutex<Gate>,
    /// Bumped each time a session stops being busy.
    idle: watch::Sender<u64>,
    /// The last cut order, with a generation number so that the same order
    /// can be given twice (a watch keeps only the latest value: a later order
    /// covers an earlier one, its epoch being at least as new).
    cut: watch::Sender<(u64, Option<Cut>)>,
    /// Sessions ordered to cut since start (busy when the order was given).
    cut_total: AtomicU64,
    /// The follower's last exchange with the monitor succeeded.
    monitor_reachable: AtomicBool,
}

impl Default for RoutingTable {
    fn default() -> Self {
        RoutingTable {
            current: ArcSwap::from_pointee(Routing::default()),
            changed: watch::Sender::new(0),
            gate: Mutex::new(Gate::default()),
            idle: watch::Sender::new(0),
            cut: watch::Sender::new((0, None)),
            cut_total: AtomicU64::new(0),
            monitor_reachable: AtomicBool::new(false),
        }
    }
}

/// A session's database as the gate sees it: its place among the
/// databases (busy sessions are counted per database) and its `PAUSE db`
/// flag (checked under the gate's lock, so that `PAUSE db` sees every
/// transaction that started before it).
#[derive(Debug, Clone, Copy)]
pub struct DbGate<'a> {
    /// The database's place (see the router's database registry).
    pub index: usize,
    /// Set while `PAUSE db` holds the database's new transactions.
    pub held: &'a AtomicBool,
}

/// A session's mark that it has a statement or transaction open on a server
/// of `epoch`; dropping it ends the mark.
pub struct Busy {
    table: Arc<RoutingTable>,
    epoch: i64,
    db: usize,
}

impl Busy {
    /// The epoch of the server the session is busy on.
    pub fn epoch(&self) -> i64 {
        self.epoch
    }
}

/// A session's mark that it holds state that cannot move (see
/// [`crate::tracking::Sticky`]) on a server of `epoch`; dropping it ends the
/// mark. While a session holds one, a newer epoch sends a cut order even when
/// no session is busy, so that the session learns of the change at once.
pub struct Pinned {
    table: Arc<RoutingTable>,
    epoch: i64,
}

impl Drop for Pinned {
    fn drop(&mut self) {
        release(&mut self.table.lock().pinned, self.epoch);
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut gate = self.table.lock();
        let last = release(&mut gate.busy, self.epoch);
        if let Some(n) = gate.busy_db.get_mut(self.db) {
            *n = n.saturating_sub(1);
        }
        drop(gate);
        // A drain waits for no session busy on its epoch: only the last one
        // ending can be what it waits for (telling it every time cost a
        // notification per transaction).
        if last {
            self.table.idle.send_modify(|v| *v = v.wrapping_add(1));
        }
    }
}

impl RoutingTable {
    fn lock(&self) -> MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current table.
    pub fn load(&self) -> Arc<Routing> {
        self.current.load_full()
    }

    /// A receiver that wakes up on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Stores `next` if it differs (the gate must be held); true when it did.
    fn store(&self, _gate: &MutexGuard<'_, Gate>, next: Routing) -> bool {
        let old = self.current.load();
        if **old == next {
            return false;
        }
        tracing::info!(
            epoch = next.epoch,
            primary = ?next.primary.as_ref().map(|p| format!("{}:{} ({}/{})", p.host, p.port, p.reported, p.goal)),
            paused = next.paused(),
            draining = next.draining(),
            "routing changed"
        );
        self.current.store(Arc::new(next));
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
        true
    }

    /// Publishes what the monitor says now (epoch and primary); returns true
    /// when that changed the table. A drain in force stays in force. A newer
    /// epoch than the table's orders the sessions busy on an older one to cut.
    pub fn publish(&self, epoch: i64, primary: Option<Primary>) -> bool {
        let gate = self.lock();
        let old = self.current.load();
        // Sessions can only be busy on an epoch that was the target: in the
        // table, never one newer than the one now published.
        if epoch > old.epoch
            && (gate.busy.range(..epoch).next().is_some()
                || gate.pinned.range(..epoch).next().is_some())
        {
            tracing::info!(
                from = old.epoch,
                to = epoch,
                busy = gate.busy.range(..epoch).map(|(_, n)| n).sum::<usize>(),
                "the primary changed: cutting the statements still running on the old one"
            );
            let busy: usize = gate.busy.range(..epoch).map(|(_, n)| n).sum();
            self.cut_total.fetch_add(busy as u64, Ordering::Relaxed);
            self.send_cut(Cut {
                epoch: epoch - 1,
                reason: CutReason::PrimaryChanged { to: epoch },
            });
        }
        let mut next = Routing {
            epoch,
            primary,
            routed_epoch: old.routed_epoch,
            known: true,
            drain: old.drain,
            held: old.held,
        };
        if next.target().is_some() {
            next.routed_epoch = next.routed_epoch.max(epoch);
        }
        self.store(&gate, next)
    }

    /// Holds new transactions back on the primary of `epoch` (and older), or
    /// with `None` lets them go again; returns true when that changed the table.
    pub fn set_drain(&self, drain: Option<i64>) -> bool {
        let gate = self.lock();
        let mut next = Routing::clone(&self.current.load());
        next.drain = drain;
        if next.target().is_some() {
            next.routed_epoch = next.routed_epoch.max(next.epoch);
        }
        self.store(&gate, next)
    }

    /// Holds every new transaction (`PAUSE` on the admin console), or with
    /// `false` lets them go again (`RESUME`); true when that changed the table.
    pub fn set_held(&self, held: bool) -> bool {
        let gate = self.lock();
        let mut next = Routing::clone(&self.current.load());
        next.held = held;
        self.store(&gate, next)
    }

    /// Sessions busy on any epoch now.
    pub fn busy_total(&self) -> usize {
        self.lock().busy.values().sum()
    }

    /// Sessions ordered to cut their statement since start.
    pub fn cut_total(&self) -> u64 {
        self.cut_total.load(Ordering::Relaxed)
    }

    /// Tells whether the follower's last exchange with the monitor succeeded.
    pub fn set_monitor_reachable(&self, reachable: bool) {
        self.monitor_reachable.store(reachable, Ordering::Relaxed);
    }

    /// Whether the follower's last exchange with the monitor succeeded.
    pub fn monitor_reachable(&self) -> bool {
        self.monitor_reachable.load(Ordering::Relaxed)
    }

    /// Marks a session of database `db` busy on `epoch` if a new
    /// transaction may start there now (the epoch is the writable,
    /// undrained target, and `PAUSE db` does not hold the database).
    /// Checked and counted under one lock, so a drain or a `PAUSE db` that
    /// starts after this returns sees the mark.
    pub fn begin(self: &Arc<Self>, epoch: i64, db: DbGate<'_>) -> Option<Busy> {
        let mut gate = self.lock();
        let allowed =
            self.current.load().target_epoch() == Some(epoch) && !db.held.load(Ordering::Relaxed);
        if !allowed {
            return None;
        }
        *gate.busy.entry(epoch).or_default() += 1;
        if gate.busy_db.len() <= db.index {
            gate.busy_db.resize(db.index + 1, 0);
        }
        gate.busy_db[db.index] += 1;
        Some(Busy {
            table: self.clone(),
            epoch,
            db: db.index,
        })
    }

    /// Sets database `db`'s `PAUSE db` flag to `held` under the gate's lock:
    /// a session's [`RoutingTable::begin`] after this returns sees it, one
    /// before it is counted in [`RoutingTable::busy_in`].
    pub fn hold_database(&self, db: DbGate<'_>, held: bool) {
        let _gate = self.lock();
        db.held.store(held, Ordering::Relaxed);
    }

    /// Sessions of database `index` busy now.
    pub fn busy_in(&self, index: usize) -> usize {
        self.lock().busy_db.get(index).copied().unwrap_or(0)
    }

    /// Marks a session as holding state that cannot move on a server of `epoch`.
    pub fn pin(self: &Arc<Self>, epoch: i64) -> Pinned {
        *self.lock().pinned.entry(epoch).or_default() += 1;
        Pinned {
            table: self.clone(),
            epoch,
        }
    }

    /// Sessions busy on `epoch` now.
    pub fn busy(&self, epoch: i64) -> usize {
        self.lock().busy.get(&epoch).copied().unwrap_or(0)
    }

    /// A receiver that wakes up each time the last session busy on an epoch ends.
    pub fn subscribe_idle(&self) -> watch::Receiver<u64> {
        self.idle.subscribe()
    }

    /// A receiver of cut orders (see [`RoutingTable::cut`]).
    pub fn subscribe_cut(&self) -> watch::Receiver<(u64, Option<Cut>)> {
        self.cut.subscribe()
    }

    /// Orders every session busy on `epoch` (or an older one) to cut its
    /// statement or transaction: a switchover drain ran out of time.
    pub fn cut(&self, epoch: i64) {
        let busy: usize = self.lock().busy.range(..=epoch).map(|(_, n)| n).sum();
        self.cut_total.fetch_add(busy as u64, Ordering::Relaxed);
        self.send_cut(Cut {
            epoch,
            reason: CutReason::DrainTimeout,
        });
    }

    fn send_cut(&self, cut: Cut) {
        self.cut.send_modify(|(generation, c)| {
            *generation = generation.wrapping_add(1);
            *c = Some(cut);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database no `PAUSE db` holds.
    fn db() -> DbGate<'static> {
        static FREE: AtomicBool = AtomicBool::new(false);
        DbGate {
            index: 0,
            held: &FREE,
        }
    }

    #[test]
    fn pause_db_holds_that_database_only_and_counts_its_busy_sessions() {
        let table = Arc::new(RoutingTable::default());
        table.publish(1, primary(NodeState::Primary, NodeState::Primary));
        let (app_held, other_held) = (AtomicBool::new(false), AtomicBool::new(false));
        let app = DbGate {
            index: 3,
            held: &app_held,
        };
        let other = DbGate {
            index: 1,
            held: &other_held,
        };
        let open = table.begin(1, app).expect("not paused yet");
        assert_eq!((table.busy_in(3), table.busy_in(1)), (1, 0));
        table.hold_database(app, true);
        assert!(table.begin(1, app).is_none(), "paused");
        let beside = table.begin(1, other).expect("another database runs");
        assert_eq!(table.busy_in(3), 1, "the open one is still counted");
        drop(open);
        assert_eq!(table.busy_in(3), 0);
        drop(beside);
        table.hold_database(app, false);
        assert!(table.begin(1, app).is_some(), "resumed");
    }

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
    fn the_target_epoch_is_the_epoch_of_the_target() {
        let mut r = Routing {
            epoch: 3,
            primary: primary(NodeState::Primary, NodeState::Primary),
            ..Routing::default()
        };
        let agree = |r: &Routing, want: Option<i64>| {
            assert_eq!(r.target_epoch(), want, "{r:?}");
            assert_eq!(r.target().map(|t| t.epoch), want, "{r:?}");
        };
        agree(&r, Some(3));
        r.drain = Some(2);
        agree(&r, Some(3));
        r.drain = Some(3);
        agree(&r, None);
        // An operator's PAUSE holds the writable primary too.
        r.drain = None;
        r.held = true;
        agree(&r, None);
        r.held = false;
        agree(&r, Some(3));
        r.drain = Some(3);
        agree(&r, None);
        r.drain = None;
        r.primary = primary(NodeState::Draining, NodeState::Primary);
        agree(&r, None);
        r.primary = None;
        agree(&r, None);
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

    #[test]
    fn only_the_last_busy_session_of_an_epoch_wakes_a_drain() {
        let table = Arc::new(RoutingTable::default());
        table.publish(1, primary(NodeState::Primary, NodeState::Primary));
        let first = table.begin(1, db()).expect("epoch 1 open");
        let second = table.begin(1, db()).expect("epoch 1 open");
        let mut idle = table.subscribe_idle();
        idle.mark_unchanged();
        drop(first);
        assert_eq!(table.busy(1), 1);
        assert!(!idle.has_changed().expect("open"), "one session still busy");
        drop(second);
        assert_eq!(table.busy(1), 0);
        assert!(idle.has_changed().expect("open"), "the last one ended");
    }

    #[test]
    fn a_new_epoch_cuts_the_sessions_busy_on_older_ones_and_nothing_else_does() {
        let table = Arc::new(RoutingTable::default());
        let mut cuts = table.subscribe_cut();
        table.publish(1, primary(NodeState::Primary, NodeState::Primary));
        let busy = table.begin(1, db()).expect("epoch 1 open");
        // The primary stops taking writes, then comes back: same epoch, no cut.
        table.publish(1, primary(NodeState::Draining, NodeState::Primary));
        table.publish(1, primary(NodeState::Primary, NodeState::Primary));
        assert!(!cuts.has_changed().expect("open"), "same epoch");
        // Another node becomes the primary.
        table.publish(
            2,
            primary(NodeState::WaitPrimary, NodeState::PreparePromotion),
        );
        assert!(cuts.has_changed().expect("open"));
        let cut = cuts.borrow_and_update().1.expect("a cut order");
        assert_eq!(cut.reason, CutReason::PrimaryChanged { to: 2 });
        assert!(cut.applies_to(busy.epoch()));
        assert!(!cut.applies_to(2));
        drop(busy);
        // Nobody busy on an older epoch: nobody is woken.
        let on_two = {
            table.publish(2, primary(NodeState::WaitPrimary, NodeState::WaitPrimary));
            table.begin(2, db()).expect("epoch 2 open")
        };
        table.publish(3, primary(NodeState::WaitPrimary, NodeState::WaitPrimary));
        assert!(cuts.has_changed().expect("open"));
        assert_eq!(
            cuts.borrow_and_update().1.expect("a cut order").reason,
            CutReason::PrimaryChanged { to: 3 }
        );
        drop(on_two);
        table.publish(4, primary(NodeState::WaitPrimary, NodeState::WaitPrimary));
        assert!(!cuts.has_changed().expect("open"), "nobody was busy");
        // An idle session pinned to an older epoch (LISTEN...) is told too.
        let pinned = table.pin(4);
        table.publish(5, primary(NodeState::WaitPrimary, NodeState::WaitPrimary));
        let cut = cuts.borrow_and_update().1.expect("a cut order");
        assert_eq!(cut.reason, CutReason::PrimaryChanged { to: 5 });
        assert!(cut.applies_to(4));
        drop(pinned);
        table.publish(6, primary(NodeState::WaitPrimary, NodeState::WaitPrimary));
        assert!(!cuts.has_changed().expect("open"), "the pin was dropped");
        // A drain's cut names its own epoch.
        table.cut(6);
        let cut = cuts.borrow_and_update().1.expect("a cut order");
        assert_eq!(cut.reason, CutReason::DrainTimeout);
        assert!(cut.applies_to(6) && cut.applies_to(5) && !cut.applies_to(7));
    }

    #[test]
    fn drain_holds_its_epoch_only_and_counts_busy_sessions() {
        let table = Arc::new(RoutingTable::default());
        table.publish(1, primary(NodeState::Primary, NodeState::Primary));
        let busy = table.begin(1, db()).expect("epoch 1 open");
        assert!(table.begin(2, db()).is_none(), "not the target epoch");
        assert_eq!(table.busy(1), 1);
        let idle = table.subscribe_idle();
        assert!(table.set_drain(Some(1)));
        assert!(table.load().paused() && table.load().draining());
        assert!(
            table.begin(1, db()).is_none(),
            "no new transaction while draining"
        );
        drop(busy);
        assert_eq!(table.busy(1), 0);
        assert!(idle.has_changed().expect("open"));
        // The same epoch writable again stays drained; a new epoch is not.
        table.publish(1, primary(NodeState::Primary, NodeState::Primary));
        assert!(table.load().paused());
        table.publish(2, primary(NodeState::WaitPrimary, NodeState::WaitPrimary));
        assert!(!table.load().paused());
        assert_eq!(table.load().routed_epoch, 2);
        assert!(table.begin(2, db()).is_some());
        // Abandoned drain of a writable primary: resume.
        table.set_drain(Some(2));
        assert!(table.load().paused());
        table.set_drain(None);
        assert_eq!(table.load().target().expect("target").epoch, 2);
    }
}
