//! Free loopback ports. A port is free when it is handed out, not when it is
//! used: the harness starts each listener with [`ATTEMPTS`] ports in turn,
//! replacing one that was taken meanwhile.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU16, Ordering};

use super::ClusterError;

/// How many ports a start tries before giving up.
pub const ATTEMPTS: usize = 5;

/// A free TCP port on loopback (bind 0, read it, release it); never the
/// same port twice in a row in one process, which the kernel likes to hand
/// out again at once.
pub fn free_port() -> Result<u16, ClusterError> {
    static LAST: AtomicU16 = AtomicU16::new(0);
    for _ in 0..ATTEMPTS {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|source| ClusterError::Io {
                what: "binding a free loopback port".into(),
                error: source,
            })?;
        if LAST.swap(port, Ordering::SeqCst) != port {
            return Ok(port);
        }
    }
    Err(ClusterError::NoFreePort {
        what: "a loopback listener".into(),
    })
}
