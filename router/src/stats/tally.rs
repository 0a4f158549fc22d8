//! One session's own counts between two transaction ends: plain integers
//! the relay adds to without any synchronisation, handed to its database's
//! counters and the router-wide histograms of [`Stats`] once per
//! transaction (a handful of relaxed atomic adds).
//! A router with neither `[metrics]` nor console users counts nothing.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::{Database, Stats};

/// A session's counts not yet added to [`Stats`] and its database's counters.
#[derive(Debug)]
pub(crate) struct Tally {
    /// Counting is on (`[metrics]` or `[admin]` configured at login).
    pub on: bool,
    /// The session's database, whose counters it adds to.
    db: Arc<Database>,
    received: u64,
    sent: u64,
    queries: u64,
    query_time_us: u64,
    xact_started: Option<Instant>,
    query_started: Option<Instant>,
    /// The clock as read at the last ReadyForQuery: the end of a
    /// transaction that ends there (one clock read less per transaction).
    ready_at: Option<Instant>,
}

fn micros(since: Instant, now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(since).as_micros()).unwrap_or(u64::MAX)
}

impl Tally {
    pub fn new(on: bool, db: Arc<Database>) -> Tally {
        Tally {
            on,
            db,
            received: 0,
            sent: 0,
            queries: 0,
            query_time_us: 0,
            xact_started: None,
            query_started: None,
            ready_at: None,
        }
    }

    #[inline]
    pub fn received(&mut self, n: usize) {
        self.received += n as u64;
    }

    #[inline]
    pub fn sent(&mut self, n: usize) {
        self.sent += n as u64;
    }

    /// The relay's state after a step: `busy` (a transaction is open on a
    /// server) and `owing` (the server owes answers). Starts and ends the
    /// transaction's clock, and starts a query's.
    pub fn step(&mut self, stats: &Stats, busy: bool, owing: bool) {
        let started = self.xact_started.is_some();
        if busy == started && (!owing || self.query_started.is_some()) {
            return;
        }
        let now = match self.ready_at.take() {
            Some(at) if !busy => at,
            _ => Instant::now(),
        };
        if owing && self.query_started.is_none() {
            self.query_started = Some(now);
        }
        match (busy, self.xact_started) {
            (true, None) => self.xact_started = Some(now),
            (false, Some(since)) => {
                self.xact_started = None;
                let us = micros(since, now);
                let counters = &self.db.counters;
                counters.xact_count.fetch_add(1, Ordering::Relaxed);
                counters.xact_time_us.fetch_add(us, Ordering::Relaxed);
                stats.xact_time.observe_us(us);
                self.flush();
            }
            _ => {}
        }
    }

    /// The server said ReadyForQuery: one query answered.
    pub fn on_ready(&mut self, stats: &Stats) {
        if let Some(since) = self.query_started.take() {
            let now = Instant::now();
            self.ready_at = Some(now);
            let us = micros(since, now);
            self.queries += 1;
            self.query_time_us += us;
            stats.query_time.observe_us(us);
        }
    }

    /// Adds what is counted so far to the database's counters.
    pub fn flush(&mut self) {
        let counters = &self.db.counters;
        for (total, mine) in [
            (&counters.received, &mut self.received),
            (&counters.sent, &mut self.sent),
            (&counters.query_count, &mut self.queries),
            (&counters.query_time_us, &mut self.query_time_us),
        ] {
            if *mine > 0 {
                total.fetch_add(std::mem::take(mine), Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transaction_is_counted_once_at_its_end_with_its_queries_and_bytes() {
        let stats = Stats::default();
        let dbs = super::super::Databases::default();
        let db = dbs.get("app");
        let mut tally = Tally::new(true, db.clone());
        tally.received(10);
        tally.step(&stats, true, true);
        tally.sent(100);
        tally.on_ready(&stats);
        tally.step(&stats, true, true);
        tally.on_ready(&stats);
        assert_eq!(db.counters.totals().xact_count, 0, "still open");
        tally.step(&stats, false, false);
        let t = db.counters.totals();
        assert_eq!(
            (t.xact_count, t.query_count, t.received, t.sent),
            (1, 2, 10, 100)
        );
        assert_eq!(stats.query_time.snapshot().count, 2);
        assert_eq!(stats.xact_time.snapshot().count, 1);
        // Nothing open: nothing more.
        tally.step(&stats, false, false);
        assert_eq!(db.counters.totals().xact_count, 1);
        assert!(dbs.get("other").counters.totals() == crate::stats::Totals::default());
    }
}
