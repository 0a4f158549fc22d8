//! Cancel routing. Each client session gets a router-made BackendKeyData; a
//! CancelRequest carrying it is forwarded to the server connection that session
//! uses at that moment, with that server's own key, and never anywhere else.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use rand::Rng;

/// Where a session's queries run now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CancelTarget {
    /// Server address.
    pub addr: SocketAddr,
    /// The server's BackendKeyData process id.
    pub pid: i32,
    /// The server's BackendKeyData secret.
    pub secret: i32,
}

struct Slot {
    secret: i32,
    target: Mutex<Option<CancelTarget>>,
}

/// Every live session's cancel key.
#[derive(Default)]
pub struct CancelRegistry {
    slots: Mutex<HashMap<i32, Arc<Slot>>>,
}

/// A session's key; unregistered on drop.
pub struct CancelKey {
    registry: Arc<CancelRegistry>,
    slot: Arc<Slot>,
    /// The process id the client was given.
    pub pid: i32,
}

impl CancelKey {
    /// The secret the client was given.
    pub fn secret(&self) -> i32 {
        self.slot.secret
    }

    /// Points cancels at a server connection (or nowhere).
    pub fn set_target(&self, target: Option<CancelTarget>) {
        if let Ok(mut slot) = self.slot.target.lock() {
            *slot = target;
        }
    }
}

impl Drop for CancelKey {
    fn drop(&mut self) {
        if let Ok(mut slots) = self.registry.slots.lock() {
            slots.remove(&self.pid);
        }
    }
}

impl CancelRegistry {
    /// Gives a new session a unique key.
    pub fn register(self: &Arc<Self>) -> CancelKey {
        let mut rng = rand::thread_rng();
        let slot = Arc::new(Slot {
            secret: rng.gen(),
            target: Mutex::new(None),
        });
        let mut slots = match self.slots.lock() {
            Ok(slots) => slots,
            Err(poisoned) => poisoned.into_inner(),
        };
        let pid = loop {
            let pid = rng.gen_range(1..i32::MAX);
            if !slots.contains_key(&pid) {
                break pid;
            }
        };
        slots.insert(pid, slot.clone());
        CancelKey {
            registry: self.clone(),
            slot,
            pid,
        }
    }

    /// The server target for a client's (pid, secret), if the key is valid.
    pub fn lookup(&self, pid: i32, secret: &[u8]) -> Option<CancelTarget> {
        let slot = self.slots.lock().ok()?.get(&pid)?.clone();
        let given: [u8; 4] = secret.try_into().ok()?;
        if i32::from_be_bytes(given) != slot.secret {
            return None;
        }
        let target = *slot.target.lock().ok()?;
        target
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_right_secret_reaches_the_target() {
        let registry = Arc::new(CancelRegistry::default());
        let a = registry.register();
        let b = registry.register();
        assert_ne!(a.pid, b.pid);
        let target = CancelTarget {
            addr: "127.0.0.1:5432".parse().expect("addr"),
            pid: 42,
            secret: 7,
        };
        a.set_target(Some(target));
        assert_eq!(
            registry.lookup(a.pid, &a.secret().to_be_bytes()),
            Some(target)
        );
        assert_eq!(
            registry.lookup(a.pid, &a.secret().wrapping_add(1).to_be_bytes()),
            None
        );
        assert_eq!(registry.lookup(b.pid, &b.secret().to_be_bytes()), None);
        let pid = a.pid;
        let secret = a.secret();
        drop(a);
        assert_eq!(registry.lookup(pid, &secret.to_be_bytes()), None);
    }
}
