//! The server connections open now, for `SHOW SERVERS` and the `link`
//! columns of `SHOW CLIENTS` and `SHOW SERVERS`: an entry per pooled
//! connection, made when it is opened and removed when it closes (a lock at
//! open and close only). The client a connection serves is one relaxed
//! atomic store when a session takes it and one when it goes back to its
//! pool, which already happen once per transaction in transaction mode.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One server connection of a pool.
#[derive(Debug)]
pub(crate) struct ServerEntry {
    /// The registry's key.
    key: u64,
    /// The pool's server user and database.
    pub user: String,
    pub database: String,
    pub addr: SocketAddr,
    /// The backend's process id.
    pub pid: i32,
    pub epoch: i64,
    pub born: Instant,
    /// The id of the client using it (the client's `ptr` in `SHOW
    /// CLIENTS`); 0 while no client has it.
    link: AtomicI32,
}

impl ServerEntry {
    /// The connection's `ptr` in `SHOW SERVERS`: `pid@epoch` (a backend
    /// pid alone can repeat on another node).
    pub fn ptr(&self) -> String {
        format!("{}@{}", self.pid, self.epoch)
    }

    /// Marks the connection as used by client `client` (0: by none).
    #[inline]
    pub fn set_link(&self, client: i32) {
        self.link.store(client, Ordering::Relaxed);
    }

    /// The client using the connection now, if any.
    pub fn link(&self) -> Option<i32> {
        match self.link.load(Ordering::Relaxed) {
            0 => None,
            id => Some(id),
        }
    }
}

/// Every pooled server connection open now.
#[derive(Debug, Default)]
pub(crate) struct ServerRegistry {
    entries: Mutex<BTreeMap<u64, Arc<ServerEntry>>>,
    next: AtomicU64,
}

/// Removes its connection from the registry when dropped (the connection
/// closes).
#[derive(Debug)]
pub(crate) struct Listed {
    registry: Arc<ServerRegistry>,
    pub entry: Arc<ServerEntry>,
}

impl Drop for Listed {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.entry.key);
    }
}

/// What a connection is listed with.
pub(crate) struct Listing<'a> {
    pub user: &'a str,
    pub database: &'a str,
    pub addr: SocketAddr,
    pub pid: i32,
    pub epoch: i64,
    pub born: Instant,
}

impl ServerRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<ServerEntry>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn register(self: &Arc<Self>, what: Listing<'_>) -> Listed {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(ServerEntry {
            key,
            user: what.user.to_string(),
            database: what.database.to_string(),
            addr: what.addr,
            pid: what.pid,
            epoch: what.epoch,
            born: what.born,
            link: AtomicI32::new(0),
        });
        self.lock().insert(key, entry.clone());
        Listed {
            registry: self.clone(),
            entry,
        }
    }

    /// Every connection now, oldest first.
    pub fn list(&self) -> Vec<Arc<ServerEntry>> {
        self.lock().values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_listed_while_open_with_the_client_it_serves() {
        let registry = Arc::new(ServerRegistry::default());
        let listing = |pid| Listing {
            user: "app",
            database: "db",
            addr: "127.0.0.1:5432".parse().expect("address"),
            pid,
            epoch: 3,
            born: Instant::now(),
        };
        let first = registry.register(listing(100));
        let second = registry.register(listing(101));
        assert_eq!(registry.list().len(), 2);
        assert_eq!(first.entry.ptr(), "100@3");
        assert_eq!(first.entry.link(), None);
        first.entry.set_link(7);
        assert_eq!(registry.list()[0].link(), Some(7));
        first.entry.set_link(0);
        assert_eq!(registry.list()[0].link(), None);
        drop(first);
        let left: Vec<i32> = registry.list().iter().map(|e| e.pid).collect();
        assert_eq!(left, vec![101]);
        drop(second);
        assert!(registry.list().is_empty());
    }
}
