//! What a client is told when the router fails something for it: one type,
//! [`ClientError`] (SQLSTATE, message, hint, and whether the session ends),
//! made from each internal reason by a `From` next to that reason (an
//! attach that failed, `session/attach.rs`; a lost server connection,
//! `session/loss.rs`; a refused message, [`Refusal`]; a refused login,
//! `startup.rs`), and written by [`ClientError::write`] alone.

use std::borrow::Cow;

use bytes::BytesMut;

use crate::protocol::backend::{self, sqlstate, Severity};
use crate::protocol::ProtocolError;

/// An error the router sends a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClientError {
    /// SQLSTATE: the router's own (`sqlstate`) or a server's.
    pub code: Cow<'static, str>,
    pub message: String,
    pub hint: Option<&'static str>,
    /// FATAL: the session ends after it. Else ERROR: the statement or
    /// transaction failed and the session goes on.
    pub fatal: bool,
}

impl ClientError {
    /// An ERROR: the session goes on.
    pub fn error(
        code: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
        hint: Option<&'static str>,
    ) -> ClientError {
        ClientError {
            code: code.into(),
            message: message.into(),
            hint,
            fatal: false,
        }
    }

    /// A FATAL: the session ends.
    pub fn fatal(
        code: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
        hint: Option<&'static str>,
    ) -> ClientError {
        ClientError {
            fatal: true,
            ..ClientError::error(code, message, hint)
        }
    }

    /// The router is stopping: what every session still open is told.
    pub fn stopping() -> ClientError {
        ClientError::fatal(
            sqlstate::ADMIN_SHUTDOWN,
            "the hapg router is shutting down",
            Some("Reconnect; another router or the restarted one will serve you."),
        )
    }

    /// Writes the ErrorResponse into `out`.
    pub fn write(&self, out: &mut BytesMut) {
        let severity = if self.fatal {
            Severity::Fatal
        } else {
            Severity::Error
        };
        backend::error(out, severity, &self.code, &self.message, self.hint);
    }
}

/// A client message the router refuses during a session: the session ends
/// (FATAL), after the answers to what came before.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// A message type the protocol does not have.
    UnknownType(u8),
    /// A header the router cannot accept (a length out of range, too large).
    Frame(ProtocolError),
    /// A message larger than the router buffers, of a type that may not be
    /// large (only Query, Parse, Bind, FunctionCall and COPY's may).
    NotStreamable { tag: u8, frame_len: usize },
    /// A named prepared statement too large to keep in transaction mode.
    LargeNamedStatement { frame_len: usize, keeps: usize },
}

impl Refusal {
    /// Read and discard what the client still sends (for a few seconds)
    /// before closing, so that a client still writing a large message is
    /// not reset before it reads the reason.
    pub fn drain(&self) -> bool {
        !matches!(self, Refusal::UnknownType(_))
    }
}

impl From<Refusal> for ClientError {
    fn from(refusal: Refusal) -> ClientError {
        match refusal {
            Refusal::UnknownType(tag) => ClientError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                format!("invalid frontend message type {tag}"),
                None,
            ),
            Refusal::Frame(e @ ProtocolError::TooLarge { .. }) => ClientError::fatal(
                sqlstate::PROGRAM_LIMIT_EXCEEDED,
                e.to_string(),
                Some("Raise router.max_message_size if this is intended."),
            ),
            Refusal::Frame(e) => {
                ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string(), None)
            }
            Refusal::NotStreamable { tag, frame_len } => ClientError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                format!(
                    "invalid message length {} for a message of type {}",
                    frame_len - 1,
                    tag as char
                ),
                None,
            ),
            Refusal::LargeNamedStatement { frame_len, keeps } => ClientError::fatal(
                sqlstate::PROGRAM_LIMIT_EXCEEDED,
                format!("a named prepared statement of {frame_len} bytes is larger than the router keeps in transaction mode ({keeps} bytes)"),
                Some("Use the unnamed statement for it, or session mode."),
            ),
        }
    }
}
