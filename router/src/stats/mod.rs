//! What the router counts for `SHOW STATS`, `SHOW POOLS` and `/metrics`:
//! per-database counters ([`databases`]) and router-wide histograms of
//! plain atomics (one relaxed add each, never a lock), fed once per
//! transaction from each session's own [`Tally`]; the client registry behind `SHOW CLIENTS` and `KILL_CLIENT`;
//! and the primary changes the router lived through ([`events`]).

pub(crate) mod clients;
pub(crate) mod databases;
pub(crate) mod events;
pub(crate) mod histogram;
pub(crate) mod tally;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

pub(crate) use self::clients::{ClientEntry, ClientRegistry};
pub(crate) use self::databases::{Database, Databases};
pub(crate) use self::histogram::Histogram;
pub(crate) use self::tally::Tally;

/// Bucket bounds of the statement and transaction time histograms, in
/// seconds: a select-only transaction through the router takes about 100 µs.
pub(crate) const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Bucket bounds of the waits (for a server connection, held by a pause):
/// a switchover holds new work well under a second, a failover about 3 s.
pub(crate) const WAIT_BUCKETS: &[f64] = &[
    0.0001, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0,
];

/// Router-wide histograms and gauges since start (the totals PgBouncer's
/// `SHOW STATS` has are per database, in [`Databases`]).
pub(crate) struct Stats {
    /// When the router started (the averages' period).
    pub started: Instant,
    /// Sessions waiting now for a server connection or a pause to end.
    pub waiting: AtomicU64,
    /// Sessions that ever had to wait because new work was held (a pause).
    pub held_total: AtomicU64,
    /// Read port sessions taken off a standby that left the read pool.
    pub read_moves: AtomicU64,
    pub xact_time: Histogram,
    pub query_time: Histogram,
    pub wait_time: Histogram,
    pub pause_hold: Histogram,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Instant::now(),
            waiting: AtomicU64::new(0),
            held_total: AtomicU64::new(0),
            read_moves: AtomicU64::new(0),
            xact_time: Histogram::new(LATENCY_BUCKETS),
            query_time: Histogram::new(LATENCY_BUCKETS),
            wait_time: Histogram::new(WAIT_BUCKETS),
            pause_hold: Histogram::new(WAIT_BUCKETS),
        }
    }
}

/// A consistent-enough copy of the totals (each counter read once).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    pub xact_count: u64,
    pub query_count: u64,
    pub received: u64,
    pub sent: u64,
    pub xact_time_us: u64,
    pub query_time_us: u64,
    pub wait_time_us: u64,
}

impl Stats {
    /// A session of `db` waited `us` microseconds for a server connection.
    pub fn record_wait(&self, db: &Database, us: u64) {
        db.counters.wait_time_us.fetch_add(us, Ordering::Relaxed);
        self.wait_time.observe_us(us);
    }

    /// A read port session was taken off its standby, which left the read
    /// pool (counted when it gives up its connection there, once per move):
    /// `hapg_router_read_moves_total`.
    #[inline]
    pub fn count_read_move(&self) {
        self.read_moves.fetch_add(1, Ordering::Relaxed);
    }

    /// A session was held `us` microseconds by a pause.
    pub fn record_hold(&self, us: u64) {
        self.pause_hold.observe_us(us);
    }
}

/// Per-second averages of `totals` over `seconds` (PgBouncer's
/// `SHOW STATS_AVERAGES`: counts and bytes per second, times per
/// transaction or query, in microseconds).
pub(crate) fn averages(totals: &Totals, seconds: u64) -> Totals {
    let per_second = |v: u64| v / seconds.max(1);
    let per = |v: u64, n: u64| v.checked_div(n).unwrap_or(0);
    Totals {
        xact_count: per_second(totals.xact_count),
        query_count: per_second(totals.query_count),
        received: per_second(totals.received),
        sent: per_second(totals.sent),
        xact_time_us: per(totals.xact_time_us, totals.xact_count),
        query_time_us: per(totals.query_time_us, totals.query_count),
        wait_time_us: per(totals.wait_time_us, totals.xact_count),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averages_are_per_second_for_counts_and_per_item_for_times() {
        let totals = Totals {
            xact_count: 100,
            query_count: 200,
            received: 1000,
            sent: 5000,
            xact_time_us: 10_000,
            query_time_us: 4_000,
            wait_time_us: 500,
        };
        let avg = averages(&totals, 10);
        assert_eq!(
            avg,
            Totals {
                xact_count: 10,
                query_count: 20,
                received: 100,
                sent: 500,
                xact_time_us: 100,
                query_time_us: 20,
                wait_time_us: 5,
            }
        );
        // Nothing counted yet: no division by zero.
        assert_eq!(averages(&Totals::default(), 0), Totals::default());
    }
}
