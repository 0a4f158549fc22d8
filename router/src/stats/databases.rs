//! The databases clients log in to, each with its own totals (`SHOW STATS`
//! has a row per database, as PgBouncer's) and its own `PAUSE db`: an entry
//! per database name, found once per session at login (a lock then, never
//! per transaction); a session adds its [`super::Tally`] to its database's
//! counters with relaxed atomic adds once per transaction.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::Totals;
use crate::routing::DbGate;

/// One database's totals since the router started.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub xact_count: AtomicU64,
    pub query_count: AtomicU64,
    pub received: AtomicU64,
    pub sent: AtomicU64,
    pub xact_time_us: AtomicU64,
    pub query_time_us: AtomicU64,
    pub wait_time_us: AtomicU64,
}

impl Counters {
    pub fn totals(&self) -> Totals {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Totals {
            xact_count: get(&self.xact_count),
            query_count: get(&self.query_count),
            received: get(&self.received),
            sent: get(&self.sent),
            xact_time_us: get(&self.xact_time_us),
            query_time_us: get(&self.query_time_us),
            wait_time_us: get(&self.wait_time_us),
        }
    }
}

/// `PAUSE db` of one database, on a cache line of its own: every session
/// of the database reads it at each transaction's start, while the
/// counters beside it are written at each transaction's end.
#[derive(Debug, Default)]
#[repr(align(64))]
pub(crate) struct Held(pub AtomicBool);

/// A database clients logged in to.
#[derive(Debug)]
pub(crate) struct Database {
    pub name: String,
    /// Its place among the databases (the routing gate counts the sessions
    /// busy in each database by it, for `PAUSE db`).
    pub index: usize,
    pub held: Held,
    /// Bumped at `RESUME db`: wakes the sessions it held.
    resumed: watch::Sender<u64>,
    pub counters: Counters,
}

impl Database {
    /// What the routing gate checks and counts for a session of this database.
    #[inline]
    pub fn gate(&self) -> DbGate<'_> {
        DbGate {
            index: self.index,
            held: &self.held.0,
        }
    }

    /// Whether `PAUSE db` holds this database now.
    pub fn held(&self) -> bool {
        self.held.0.load(Ordering::Relaxed)
    }

    /// A receiver that wakes up at each `RESUME db` of this database.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.resumed.subscribe()
    }

    /// Wakes the sessions `PAUSE db` held.
    pub fn wake(&self) {
        self.resumed.send_modify(|v| *v = v.wrapping_add(1));
    }
}

/// Every database clients logged in to since the router started, by name.
#[derive(Default)]
pub(crate) struct Databases {
    by_name: Mutex<BTreeMap<String, Arc<Database>>>,
}

impl Databases {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Database>>> {
        self.by_name.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The entry of database `name`, made if new.
    pub fn get(&self, name: &str) -> Arc<Database> {
        let mut map = self.lock();
        if let Some(db) = map.get(name) {
            return db.clone();
        }
        let db = Arc::new(Database {
            name: name.to_string(),
            index: map.len(),
            held: Held::default(),
            resumed: watch::Sender::new(0),
            counters: Counters::default(),
        });
        map.insert(name.to_string(), db.clone());
        db
    }

    /// The entry of database `name`, if a client ever logged in to it.
    pub fn find(&self, name: &str) -> Option<Arc<Database>> {
        self.lock().get(name).cloned()
    }

    /// Every database, by name.
    pub fn list(&self) -> Vec<Arc<Database>> {
        self.lock().values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_database_counts_apart_and_the_totals_add_them() {
        let dbs = Databases::default();
        let app = dbs.get("app");
        let reports = dbs.get("reports");
        assert!(Arc::ptr_eq(&app, &dbs.get("app")), "found again");
        assert_ne!(app.index, reports.index);
        app.counters.xact_count.fetch_add(3, Ordering::Relaxed);
        reports.counters.xact_count.fetch_add(2, Ordering::Relaxed);
        reports.counters.sent.fetch_add(10, Ordering::Relaxed);
        assert_eq!(app.counters.totals().xact_count, 3);
        assert_eq!(reports.counters.totals().sent, 10);
        let names: Vec<String> = dbs.list().iter().map(|d| d.name.clone()).collect();
        assert_eq!(names, ["app", "reports"]);
        assert!(dbs.find("other").is_none());
    }
}
