//! The read pool: which standbys the read-only port (`router.listen_read_only`)
//! may send sessions to, and how many of this router's read sessions each one
//! has. A standby is eligible when the monitor sees it healthy, assigned and
//! reporting `secondary`, streaming, and when it is within `[read_only]
//! max_lag_bytes` and `max_lag_ms` of the primary, by the router's own check
//! of the node when there is one (see `read_watch.rs`), else by the
//! monitor's reports.
//!
//! Each standby gets a route of its own: a [`RoutingTable`] naming the
//! standby (its target is there while the standby is eligible, gone while it
//! is not) and its own [`Pools`], so that sessions attach, pause and move on
//! a read route with the same code as on the primary's. A route's epochs
//! start at [`READ_EPOCH_BASE`], far above any primary epoch, so that the
//! primary's cut orders (which cut every epoch up to theirs) never reach a
//! session busy on a standby.

// Connections stay boxed as the pools hold them (see pool/mod.rs).
#![allow(clippy::vec_box)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use hapg_monitor::store::NodeRow;
use hapg_monitor::{Health, NodeState};
use rand::Rng;
use tokio::sync::watch;

use crate::pool::Pools;
use crate::routing::{Primary, RoutingTable};
use crate::server::{ServerConn, READ_EPOCH_BASE};

/// The lag bounds of `[read_only]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LagLimits {
    pub max_bytes: u64,
    pub max_time: Duration,
}

/// What the router itself read on a standby (and on the primary) in its
/// last check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReplayCheck {
    /// `pg_is_in_recovery()` on the standby.
    pub in_recovery: bool,
    /// `pg_last_wal_replay_lsn()` on the standby.
    pub replay_lsn: u64,
    /// How long the standby has been behind: since the router's earliest
    /// reading of the primary's LSN that it has not replayed yet (see
    /// [`PrimaryHistory`]).
    pub behind_for: Option<Duration>,
    /// `pg_current_wal_lsn()` on the primary, read in the same round.
    pub primary_lsn: Option<u64>,
}

/// Why a standby is not in the read pool (logged, and told to a session that
/// cannot move off it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ineligible {
    /// The monitor's health check fails it.
    Unhealthy,
    /// Assigned or reporting another state than `secondary` (promoted,
    /// maintenance, catching up, dropped...).
    State {
        goal: NodeState,
        reported: NodeState,
    },
    /// Its WAL receiver does not stream from the primary.
    NotStreaming,
    /// The node says it is not in recovery (it was promoted).
    NotInRecovery,
    /// Further behind the primary than `max_lag_bytes`.
    LagBytes { behind: u64, max: u64 },
    /// Its last replayed transaction is older than `max_lag_ms` while the
    /// primary has WAL it has not replayed.
    LagTime { behind: Duration, max: Duration },
}

impl std::fmt::Display for Ineligible {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ineligible::Unhealthy => write!(f, "the monitor reports it unhealthy"),
            Ineligible::State { goal, reported } => {
                write!(f, "its state is {reported} (goal {goal}), not secondary")
            }
            Ineligible::NotStreaming => write!(f, "it does not stream from the primary"),
            Ineligible::NotInRecovery => write!(f, "it is no longer in recovery"),
            Ineligible::LagBytes { behind, max } => {
                write!(
                    f,
                    "it is {behind} bytes behind the primary (max_lag_bytes {max})"
                )
            }
            Ineligible::LagTime { behind, max } => write!(
                f,
                "its last replayed transaction is {} ms old (max_lag_ms {})",
                behind.as_millis(),
                max.as_millis()
            ),
        }
    }
}

/// Whether `node` may serve read sessions: the monitor's view of it, the
/// primary's reported LSN, and the router's own check if it has one (which
/// wins over the reports for the LSNs, being newer).
pub(crate) fn eligibility(
    node: &NodeRow,
    primary_reported_lsn: u64,
    check: Option<&ReplayCheck>,
    limits: LagLimits,
) -> Result<(), Ineligible> {
    if node.health == Health::Bad {
        return Err(Ineligible::Unhealthy);
    }
    if node.goal != NodeState::Secondary || node.reported != NodeState::Secondary {
        return Err(Ineligible::State {
            goal: node.goal,
            reported: node.reported,
        });
    }
    if !node.upstream_streaming {
        return Err(Ineligible::NotStreaming);
    }
    let (primary_lsn, standby_lsn) = match check {
        Some(c) => {
            if !c.in_recovery {
                return Err(Ineligible::NotInRecovery);
            }
            (c.primary_lsn.unwrap_or(primary_reported_lsn), c.replay_lsn)
        }
        None => (primary_reported_lsn, node.lsn),
    };
    let behind = primary_lsn.saturating_sub(standby_lsn);
    if behind > limits.max_bytes {
        return Err(Ineligible::LagBytes {
            behind,
            max: limits.max_bytes,
        });
    }
    // Not the age of `pg_last_xact_replay_timestamp()`: that is the
    // primary's commit time, which ages on an idle primary while the
    // standby is current.
    if let Some(age) = check.and_then(|c| c.behind_for) {
        if age > limits.max_time {
            return Err(Ineligible::LagTime {
                behind: age,
                max: limits.max_time,
            });
        }
    }
    Ok(())
}

/// The router's recent readings of the primary's `pg_current_wal_lsn()`:
/// a standby that has not replayed up to a reading taken at `t` has been
/// behind since `t` at least.
#[derive(Debug, Default)]
pub(crate) struct PrimaryHistory {
    /// (when, LSN), oldest first.
    samples: std::collections::VecDeque<(std::time::Instant, u64)>,
}

impl PrimaryHistory {
    /// Notes a reading; readings older than `keep` go (the newest stays).
    pub fn record(&mut self, now: std::time::Instant, lsn: u64, keep: Duration) {
        if self.samples.back().is_some_and(|(_, l)| *l == lsn) {
            // Unchanged: the older reading tells since when.
        } else {
            self.samples.push_back((now, lsn));
        }
        while self.samples.len() > 1
            && self
                .samples
                .front()
                .is_some_and(|(t, _)| now.saturating_duration_since(*t) > keep)
        {
            self.samples.pop_front();
        }
    }

    /// How long a standby that replayed up to `replay` has been behind;
    /// none when it has replayed the newest reading.
    pub fn behind_for(&self, now: std::time::Instant, replay: u64) -> Option<Duration> {
        self.samples
            .iter()
            .find(|(_, lsn)| *lsn > replay)
            .map(|(t, _)| now.saturating_duration_since(*t))
    }
}

/// One standby's route: its routing table, its pools, and the read
/// sessions of this router on it.
pub(crate) struct ReadRoute {
    pub node_id: i64,
    pub host: Arc<str>,
    pub port: u16,
    pub table: Arc<RoutingTable>,
    pub pools: Pools,
    sessions: AtomicUsize,
    /// The epoch published while the standby is in the pool.
    epoch: Mutex<i64>,
    /// Why the standby last left the read pool (told to a session that
    /// cannot move off it).
    left_because: Mutex<Option<String>>,
}

impl ReadRoute {
    fn new(node_id: i64, host: Arc<str>, port: u16) -> ReadRoute {
        ReadRoute {
            node_id,
            host,
            port,
            table: Arc::new(RoutingTable::default()),
            pools: Pools::default(),
            sessions: AtomicUsize::new(0),
            epoch: Mutex::new(READ_EPOCH_BASE),
            left_because: Mutex::new(None),
        }
    }

    fn epoch(&self) -> MutexGuard<'_, i64> {
        self.epoch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Read sessions of this router on the standby now.
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Opens the route (a new epoch each time the standby comes back, so
    /// that connections from before it left are never reused).
    fn open(&self) {
        let mut epoch = self.epoch();
        if self.table.load().target().is_some() {
            return;
        }
        *epoch += 1;
        // The table names the standby as the node it serves; `Primary`
        // counts as writable what the route serves, so the standby is
        // described with a state that takes the route's sessions.
        self.table.publish(
            *epoch,
            Some(Primary {
                node_id: self.node_id,
                host: self.host.clone(),
                port: self.port,
                goal: NodeState::Primary,
                reported: NodeState::Primary,
            }),
        );
    }

    /// Closes the route: no new transaction starts there; idle connections
    /// are handed back for closing.
    fn close(&self) -> Vec<Box<ServerConn>> {
        let epoch = *self.epoch();
        self.table.publish(epoch, None);
        self.pools.discard_epoch(epoch)
    }

    /// True while the standby is in the read pool.
    pub fn open_now(&self) -> bool {
        self.table.load().target_epoch().is_some()
    }

    /// Why the standby left the read pool, as last logged.
    pub fn left_because(&self) -> String {
        self.left_because
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| "it is no longer eligible".to_string())
    }
}

/// A read session's place on a route; dropping it gives the place back.
pub(crate) struct Lease {
    pub route: Arc<ReadRoute>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.route.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The standbys the read port may use.
#[derive(Default)]
pub(crate) struct ReadPool {
    routes: Mutex<BTreeMap<i64, Arc<ReadRoute>>>,
    /// The routes of the eligible standbys.
    eligible: ArcSwap<Vec<Arc<ReadRoute>>>,
    changed: watch::Sender<u64>,
}

impl ReadPool {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<i64, Arc<ReadRoute>>> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes the eligible standbys (node id, host, port); the routes of
    /// the others close (`left`: why each is out, for the log). Returns the
    /// idle connections to close.
    pub fn publish(
        &self,
        eligible: &[(i64, Arc<str>, u16)],
        left: &[(i64, String)],
    ) -> Vec<Box<ServerConn>> {
        let mut routes = self.lock();
        let mut victims = Vec::new();
        let mut now = Vec::with_capacity(eligible.len());
        for (id, host, port) in eligible {
            let route = routes
                .entry(*id)
                .or_insert_with(|| Arc::new(ReadRoute::new(*id, host.clone(), *port)));
            if route.host != *host || route.port != *port {
                // The node moved: a new route, connections of the old one go.
                victims.extend(route.close());
                *route = Arc::new(ReadRoute::new(*id, host.clone(), *port));
            }
            route.open();
            now.push(route.clone());
        }
        for (id, route) in routes.iter() {
            if !eligible.iter().any(|(e, _, _)| e == id) && route.open_now() {
                let why = left.iter().find(|(l, _)| l == id).map(|(_, w)| w.clone());
                *route.left_because.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(why.unwrap_or_else(|| "it is no longer in the formation".to_string()));
                victims.extend(route.close());
            }
        }
        let old: Vec<i64> = self.eligible.load().iter().map(|r| r.node_id).collect();
        let new: Vec<i64> = now.iter().map(|r| r.node_id).collect();
        self.eligible.store(Arc::new(now));
        if old != new {
            tracing::info!(standbys = ?new, out = ?left, "read pool changed");
            self.changed.send_modify(|v| *v = v.wrapping_add(1));
        }
        victims
    }

    /// Every standby's route, eligible or not (the console, the metrics).
    pub fn routes(&self) -> Vec<Arc<ReadRoute>> {
        self.lock().values().cloned().collect()
    }

    /// A receiver that wakes up when the eligible set changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Sessions per eligible standby (node id, sessions).
    pub fn sessions(&self) -> Vec<(i64, usize)> {
        self.eligible
            .load()
            .iter()
            .map(|r| (r.node_id, r.sessions()))
            .collect()
    }

    /// True when some standby is eligible now.
    pub fn any_eligible(&self) -> bool {
        !self.eligible.load().is_empty()
    }

    /// A read session was moved off standby `from`, whose route closed, to
    /// standby `to` (none: the primary, `fallback = "primary"`), while idle
    /// or at the end of its transaction: the one place a read session moves
    /// (where a counter of moves goes).
    pub fn session_moved(&self, from: i64, to: Option<i64>) {
        tracing::info!(
            from,
            to,
            "read session moved off a standby that left the read pool"
        );
    }

    /// A read session on standby `from`, which left the read pool, was
    /// ended: its state cannot move (`why`), or its transaction outlasted
    /// the drain timeout (where a counter of such ends goes).
    pub fn session_ended(&self, from: i64, why: &str) {
        tracing::info!(
            from,
            why,
            "read session ended: it cannot move off a standby that left the read pool"
        );
    }

    /// A place on the eligible standby with the fewest sessions of this
    /// router (ties at random); none when no standby is eligible.
    pub fn pick(&self) -> Option<Lease> {
        let eligible = self.eligible.load();
        let route = pick_least(&eligible, |r| r.sessions(), &mut rand::thread_rng())?.clone();
        route.sessions.fetch_add(1, Ordering::Relaxed);
        Some(Lease { route })
    }
}

/// The item with the fewest `load`, ties broken at random.
fn pick_least<'a, T>(
    items: &'a [T],
    load: impl Fn(&T) -> usize,
    rng: &mut impl Rng,
) -> Option<&'a T> {
    let least = items.iter().map(&load).min()?;
    let tied: Vec<&T> = items.iter().filter(|i| load(i) == least).collect();
    tied.get(rng.gen_range(0..tied.len())).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(goal: NodeState, reported: NodeState, lsn: u64) -> NodeRow {
        NodeRow {
            node_id: 2,
            formation: "default".into(),
            group_id: 0,
            name: "node_2".into(),
            host: "127.0.0.1".into(),
            port: 5433,
            goal,
            reported,
            pg_running: true,
            rep_state: String::new(),
            tli: 1,
            lsn,
            upstream_streaming: true,
            in_recovery: Some(true),
            upstream_silence: None,
            report_age: None,
            health: Health::Good,
            candidate_priority: 0,
            replication_quorum: true,
        }
    }

    const LIMITS: LagLimits = LagLimits {
        max_bytes: 1000,
        max_time: Duration::from_secs(5),
    };

    fn check(in_recovery: bool, replay: u64, age_s: u64, primary: u64) -> ReplayCheck {
        ReplayCheck {
            in_recovery,
            replay_lsn: replay,
            behind_for: (replay < primary).then_some(Duration::from_secs(age_s)),
            primary_lsn: Some(primary),
        }
    }

    /// (name, node, primary's reported LSN, the router's check, expected: Ok or a word of the reason).
    type Case = (
        &'static str,
        NodeRow,
        u64,
        Option<ReplayCheck>,
        Result<(), &'static str>,
    );

    #[test]
    fn eligibility_table() {
        use NodeState::*;
        let ok = node(Secondary, Secondary, 5000);
        let mut unhealthy = ok.clone();
        unhealthy.health = Health::Bad;
        let mut not_streaming = ok.clone();
        not_streaming.upstream_streaming = false;
        let cases: Vec<Case> = vec![
            ("current by the reports", ok.clone(), 5500, None, Ok(())),
            ("priority 0 is eligible", ok.clone(), 5000, None, Ok(())),
            ("unhealthy", unhealthy, 5000, None, Err("unhealthy")),
            ("not streaming", not_streaming, 5000, None, Err("stream")),
            (
                "maintenance",
                node(Maintenance, Maintenance, 5000),
                5000,
                None,
                Err("state"),
            ),
            (
                "being promoted",
                node(PreparePromotion, Secondary, 5000),
                5000,
                None,
                Err("state"),
            ),
            (
                "catching up",
                node(Secondary, Catchingup, 5000),
                5000,
                None,
                Err("state"),
            ),
            (
                "behind by the reports",
                ok.clone(),
                7000,
                None,
                Err("bytes"),
            ),
            // The router's own check wins over the reports.
            (
                "paused replay seen by the check",
                ok.clone(),
                5000,
                Some(check(true, 5000, 1, 9000)),
                Err("bytes"),
            ),
            (
                "check says current",
                ok.clone(),
                9000,
                Some(check(true, 9000, 60, 9000)),
                Ok(()),
            ),
            (
                "old last transaction, behind",
                ok.clone(),
                5000,
                Some(check(true, 8500, 60, 9000)),
                Err("ms old"),
            ),
            (
                "recent, slightly behind",
                ok.clone(),
                5000,
                Some(check(true, 8500, 1, 9000)),
                Ok(()),
            ),
            (
                "promoted under the monitor's nose",
                ok,
                5000,
                Some(check(false, 9000, 0, 9000)),
                Err("recovery"),
            ),
        ];
        for (name, n, primary, c, want) in cases {
            let got = eligibility(&n, primary, c.as_ref(), LIMITS);
            match (got, want) {
                (Ok(()), Ok(())) => {}
                (Err(e), Err(needle)) => {
                    assert!(e.to_string().contains(needle), "{name}: {e}")
                }
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn the_time_behind_counts_from_the_first_reading_not_replayed() {
        let t0 = std::time::Instant::now();
        let s = Duration::from_secs;
        let mut h = PrimaryHistory::default();
        h.record(t0, 100, s(60));
        h.record(t0 + s(1), 100, s(60));
        assert_eq!(
            h.behind_for(t0 + s(30), 100),
            None,
            "idle primary, current standby"
        );
        h.record(t0 + s(31), 200, s(60));
        h.record(t0 + s(32), 300, s(60));
        assert_eq!(h.behind_for(t0 + s(33), 150), Some(s(2)));
        assert_eq!(h.behind_for(t0 + s(33), 250), Some(s(1)));
        assert_eq!(h.behind_for(t0 + s(33), 300), None);
        h.record(t0 + s(200), 300, s(60));
        assert_eq!(
            h.behind_for(t0 + s(200), 250),
            Some(s(168)),
            "the newest reading stays"
        );
    }

    #[test]
    fn the_least_loaded_is_picked_and_ties_spread() {
        let mut rng = rand::thread_rng();
        let loads = [3usize, 1, 1, 2];
        let mut seen = [0usize; 4];
        for _ in 0..200 {
            let i = pick_least(&[0usize, 1, 2, 3], |i| loads[*i], &mut rng).copied();
            seen[i.expect("one")] += 1;
        }
        assert_eq!(seen[0] + seen[3], 0, "{seen:?}");
        assert!(seen[1] > 40 && seen[2] > 40, "{seen:?}");
        assert!(pick_least(&[] as &[usize], |_| 0, &mut rng).is_none());
    }

    #[test]
    fn sessions_balance_and_a_closed_route_gets_none() {
        let pool = ReadPool::default();
        let a: Arc<str> = "127.0.0.1".into();
        pool.publish(&[(2, a.clone(), 5433), (3, a.clone(), 5434)], &[]);
        let leases: Vec<Lease> = (0..40).filter_map(|_| pool.pick()).collect();
        assert_eq!(pool.sessions(), vec![(2, 20), (3, 20)]);
        let on_2 = leases
            .iter()
            .find(|l| l.route.node_id == 2)
            .map(|l| l.route.clone());
        let on_2 = on_2.expect("some on node 2");
        assert!(on_2.open_now());
        pool.publish(&[(3, a.clone(), 5434)], &[]);
        assert!(!on_2.open_now(), "node 2 left the pool");
        assert!((0..10)
            .filter_map(|_| pool.pick())
            .all(|l| l.route.node_id == 3));
        drop(leases);
        pool.publish(&[(2, a.clone(), 5433), (3, a, 5434)], &[]);
        assert!(on_2.open_now());
        assert!(
            on_2.table.load().epoch > READ_EPOCH_BASE + 1,
            "a new epoch on return"
        );
        pool.publish(&[], &[]);
        assert!(pool.pick().is_none());
    }
}
