//! The primary changes this router lived through (`SHOW FAILOVERS`, the
//! failover metrics) and the pause and drain it is in or was last in
//! (`SHOW ROUTING`): a pure [`Recorder`] fed every version of the routing
//! table by a watcher task, off the hot path.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use super::{Histogram, WAIT_BUCKETS};
use crate::routing::Routing;

/// A primary as the router routed to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Routed {
    pub epoch: i64,
    pub node_id: i64,
    pub address: String,
}

impl Routed {
    fn of(routing: &Routing) -> Option<Routed> {
        let primary = routing.primary.as_ref()?;
        Some(Routed {
            epoch: routing.epoch,
            node_id: primary.node_id,
            address: format!("{}:{}", primary.host, primary.port),
        })
    }
}

/// One primary change: new work went from `from` to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failover {
    /// When new work went to `to`.
    pub at: SystemTime,
    pub from: Routed,
    pub to: Routed,
    /// How long new work was held before it went to `to` (zero when the
    /// router saw no pause: the change came in one step).
    pub held: Duration,
    /// Sessions that waited during the pause.
    pub clients_waited: u64,
    /// Statements or transactions the router cut on the old primary.
    pub cut: u64,
}

/// A pause of new work: since when, and the counters then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pause {
    pub since: SystemTime,
    pub started: Instant,
    held_total: u64,
    cut_total: u64,
}

/// A switchover drain: the epoch it held, when it began, and how long it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Drain {
    pub epoch: i64,
    pub since: SystemTime,
    started: Instant,
    /// Set once the drain ended.
    pub took: Option<Duration>,
}

/// The counters a change is measured with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    /// Sessions that ever waited on a pause ([`crate::stats::Stats::held_total`]).
    pub held_total: u64,
    /// Statements cut ([`crate::routing::RoutingTable::cut_total`]).
    pub cut_total: u64,
}

/// What the router lived through, from the routing tables it was given.
#[derive(Debug)]
pub(crate) struct Recorder {
    keep: usize,
    /// The primary new work last went to.
    pub routed: Option<Routed>,
    pub pause: Option<Pause>,
    pub drain: Option<Drain>,
    /// The latest last.
    pub failovers: VecDeque<Failover>,
    /// Every primary change since start (`failovers` keeps the last `keep`).
    pub changes: u64,
    /// Cut counter when the router last routed (for a change seen in one step).
    cut_seen: u64,
    /// Per change: seconds held, statements cut, sessions that waited.
    pub held_histogram: Histogram,
    pub cut_histogram: Histogram,
    pub waited_histogram: Histogram,
}

/// Bounds of the per-change count histograms (statements cut, sessions
/// that waited).
const COUNT_BUCKETS: &[f64] = &[
    0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0,
];

impl Recorder {
    /// Keeps the last `keep` primary changes (at least one) from now on.
    pub fn set_keep(&mut self, keep: usize) {
        self.keep = keep.max(1);
    }

    pub fn new(keep: usize) -> Recorder {
        Recorder {
            keep: keep.max(1),
            routed: None,
            pause: None,
            drain: None,
            failovers: VecDeque::new(),
            changes: 0,
            cut_seen: 0,
            held_histogram: Histogram::new(WAIT_BUCKETS),
            cut_histogram: Histogram::new(COUNT_BUCKETS),
            waited_histogram: Histogram::new(COUNT_BUCKETS),
        }
    }

    /// Takes in a routing table seen at `now` (wall clock `wall`).
    pub fn on_routing(
        &mut self,
        routing: &Routing,
        now: Instant,
        wall: SystemTime,
        counters: Counters,
    ) {
        match (routing.drain, self.drain) {
            (Some(epoch), current)
                if current.is_none_or(|d| d.took.is_some() || d.epoch != epoch) =>
            {
                self.drain = Some(Drain {
                    epoch,
                    since: wall,
                    started: now,
                    took: None,
                });
            }
            (None, Some(d)) if d.took.is_none() => {
                self.drain = Some(Drain {
                    took: Some(now.saturating_duration_since(d.started)),
                    ..d
                });
            }
            _ => {}
        }
        if !routing.known {
            return;
        }
        if routing.paused() {
            if self.pause.is_none() {
                self.pause = Some(Pause {
                    since: wall,
                    started: now,
                    held_total: counters.held_total,
                    cut_total: self.cut_seen.min(counters.cut_total),
                });
            }
            return;
        }
        let Some(current) = Routed::of(routing) else {
            return;
        };
        let pause = self.pause.take();
        if let Some(from) = self.routed.take().filter(|r| r.epoch != current.epoch) {
            let (held, clients_waited, cut_from) = match pause {
                Some(p) => (
                    now.saturating_duration_since(p.started),
                    counters.held_total.saturating_sub(p.held_total),
                    p.cut_total,
                ),
                None => (Duration::ZERO, 0, self.cut_seen),
            };
            let cut = counters.cut_total.saturating_sub(cut_from);
            self.changes += 1;
            self.held_histogram
                .observe_us(u64::try_from(held.as_micros()).unwrap_or(u64::MAX));
            self.cut_histogram.observe_value(cut);
            self.waited_histogram.observe_value(clients_waited);
            self.failovers.push_back(Failover {
                at: wall,
                from,
                to: current.clone(),
                held,
                clients_waited,
                cut,
            });
            while self.failovers.len() > self.keep {
                self.failovers.pop_front();
            }
        }
        self.cut_seen = counters.cut_total;
        self.routed = Some(current);
    }
}

/// The recorder, shared with the console and `/metrics`.
pub(crate) struct Events {
    pub recorder: Mutex<Recorder>,
}

impl Events {
    pub fn new(keep: usize) -> Events {
        Events {
            recorder: Mutex::new(Recorder::new(keep)),
        }
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, Recorder> {
        self.recorder.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use hapg_monitor::NodeState;

    use std::sync::Arc;

    use super::*;
    use crate::routing::Primary;

    fn table(epoch: i64, node: Option<(i64, NodeState)>, drain: Option<i64>) -> Routing {
        Routing {
            epoch,
            primary: node.map(|(id, state)| Primary {
                node_id: id,
                host: Arc::from("127.0.0.1"),
                port: 5432 + id as u16,
                goal: state,
                reported: state,
            }),
            routed_epoch: epoch,
            known: true,
            drain,
            held: false,
        }
    }

    #[test]
    fn a_switchover_is_recorded_with_its_pause_waits_and_cuts() {
        let t0 = Instant::now();
        let wall = SystemTime::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let c = |held_total, cut_total| Counters {
            held_total,
            cut_total,
        };
        let mut r = Recorder::new(2);
        // Steps: (table, ms, counters, failovers recorded after it).
        let steps = [
            (table(1, Some((1, NodeState::Primary)), None), 0, c(0, 0), 0),
            // A drain holds the primary: paused.
            (
                table(1, Some((1, NodeState::Primary)), Some(1)),
                100,
                c(0, 0),
                0,
            ),
            // The old primary demotes; a session waits; one is cut.
            (
                table(1, Some((1, NodeState::Draining)), Some(1)),
                200,
                c(1, 1),
                0,
            ),
            (
                table(2, Some((2, NodeState::StopReplication)), None),
                300,
                c(3, 1),
                0,
            ),
            // The new primary takes writes: the change, held 400 ms.
            (
                table(2, Some((2, NodeState::Primary)), None),
                500,
                c(3, 1),
                1,
            ),
            // Nothing changes: nothing recorded.
            (
                table(2, Some((2, NodeState::Primary)), None),
                600,
                c(3, 1),
                1,
            ),
        ];
        for (routing, ms, counters, expected) in steps {
            r.on_routing(&routing, at(ms), wall, counters);
            assert_eq!(r.failovers.len(), expected, "after {ms} ms");
        }
        let f = &r.failovers[0];
        assert_eq!((f.from.node_id, f.from.epoch), (1, 1));
        assert_eq!((f.to.node_id, f.to.epoch), (2, 2));
        assert_eq!(f.held, Duration::from_millis(400));
        assert_eq!((f.clients_waited, f.cut), (3, 1));
        assert!(r.pause.is_none());
        let drain = r.drain.expect("the drain is remembered");
        assert_eq!(
            (drain.epoch, drain.took),
            (1, Some(Duration::from_millis(200)))
        );
        // A change seen in one step (no pause seen) is recorded with no hold;
        // only the last two are kept.
        r.on_routing(
            &table(3, Some((1, NodeState::Primary)), None),
            at(700),
            wall,
            c(3, 2),
        );
        r.on_routing(
            &table(4, Some((2, NodeState::Primary)), None),
            at(800),
            wall,
            c(3, 2),
        );
        assert_eq!(r.changes, 3);
        assert_eq!(r.failovers.len(), 2);
        assert_eq!(r.failovers[0].held, Duration::ZERO);
        assert_eq!(r.failovers[0].cut, 1);
        assert_eq!(r.failovers[1].to.epoch, 4);
        // The histograms count every change, kept or not.
        assert_eq!(r.held_histogram.snapshot().count, 3);
        assert_eq!(r.cut_histogram.snapshot().sum, 2.0);
    }
}
