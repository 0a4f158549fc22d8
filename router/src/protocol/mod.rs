//! The PostgreSQL v3 wire protocol as far as the router needs it: framing
//! (check-then-parse with a size limit), the unauthenticated first packets,
//! and the backend messages the router writes or inspects itself.
//! Everything else is relayed as raw bytes.

pub mod backend;
pub mod frame;
pub mod startup;
pub mod tag;

/// A client or server broke the protocol.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// A length field is below the minimum for its message.
    #[error("invalid message length {0}")]
    BadLength(u32),
    /// A message is longer than `router.max_message_size` (or the startup limit).
    #[error("message of {len} bytes is larger than the limit of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The startup packet asks for a protocol version the router does not speak.
    #[error("unsupported frontend protocol {major}.{minor}: the router speaks 3.0")]
    UnsupportedVersion {
        /// Major version asked for.
        major: u16,
        /// Minor version asked for.
        minor: u16,
    },
    /// A message's body does not have the layout its type requires.
    #[error("malformed {what}")]
    Malformed {
        /// Which message.
        what: &'static str,
    },
    /// A message type that is not expected at this point.
    #[error("unexpected message type {tag:?} {during}")]
    Unexpected {
        /// Its tag byte, as a character.
        tag: char,
        /// What the router was waiting for.
        during: &'static str,
    },
}

/// Reads a NUL-terminated string from the start of `buf`; returns it and the rest.
pub fn cstr(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = memchr::memchr(0, buf)?;
    Some((&buf[..end], &buf[end + 1..]))
}
