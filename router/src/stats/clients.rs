//! The clients logged in now, for `SHOW CLIENTS`, the client counts of
//! `SHOW POOLS` and `KILL_CLIENT`: an entry per client, made at login and
//! removed when its session ends (a lock at login and logout, never per
//! transaction; a session flags its own wait with an atomic).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;

/// One logged-in client.
#[derive(Debug)]
pub(crate) struct ClientEntry {
    /// The id `KILL_CLIENT` takes: the process id the client was given in
    /// its BackendKeyData (what libpq's `PQbackendPID` returns).
    pub id: i32,
    pub user: String,
    /// The server user its pool is for (`server.user`, else `user`).
    pub pool_user: String,
    pub database: String,
    pub peer: SocketAddr,
    pub local: Option<SocketAddr>,
    pub connect_time: SystemTime,
    pub tls: bool,
    pub application_name: String,
    /// An admin console session, not a relayed one.
    pub console: bool,
    /// Since when it waits for a server connection (or for a pause to
    /// end), in microseconds since the router started plus one; 0: not waiting.
    pub waiting_since: AtomicU64,
    /// Cancelled by `KILL_CLIENT`: the session ends.
    pub kill: CancellationToken,
}

impl ClientEntry {
    /// Marks the start (`Some`: microseconds since the router started) or
    /// the end of a wait.
    pub fn set_waiting(&self, since_us: Option<u64>) {
        let value = since_us.map_or(0, |us| us.saturating_add(1));
        self.waiting_since.store(value, Ordering::Relaxed);
    }

    /// Microseconds since the router started when its wait began.
    pub fn waiting_since(&self) -> Option<u64> {
        match self.waiting_since.load(Ordering::Relaxed) {
            0 => None,
            v => Some(v - 1),
        }
    }
}

/// Every logged-in client by id.
#[derive(Default)]
pub(crate) struct ClientRegistry {
    clients: Mutex<BTreeMap<i32, Arc<ClientEntry>>>,
}

/// Removes its client from the registry when dropped (the session's end).
pub(crate) struct Registered {
    registry: Arc<ClientRegistry>,
    pub entry: Arc<ClientEntry>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.entry.id);
    }
}

impl ClientRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<i32, Arc<ClientEntry>>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn register(self: &Arc<Self>, entry: ClientEntry) -> Registered {
        let entry = Arc::new(entry);
        self.lock().insert(entry.id, entry.clone());
        Registered {
            registry: self.clone(),
            entry,
        }
    }

    /// Every client now, by id.
    pub fn list(&self) -> Vec<Arc<ClientEntry>> {
        self.lock().values().cloned().collect()
    }

    /// Ends the session of every client of `database` (not the console's);
    /// returns how many.
    pub fn kill_database(&self, database: &str) -> usize {
        let clients = self.lock();
        let mut killed = 0;
        for entry in clients.values() {
            if !entry.console && entry.database == database {
                entry.kill.cancel();
                killed += 1;
            }
        }
        killed
    }

    /// Ends client `id`'s session; false when there is no such client.
    pub fn kill(&self, id: i32) -> bool {
        match self.lock().get(&id) {
            Some(entry) => {
                entry.kill.cancel();
                true
            }
            None => false,
        }
    }
}
