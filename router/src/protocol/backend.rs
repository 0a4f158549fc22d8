//! Backend messages the router writes to clients itself (authentication
//! requests, ParameterStatus, BackendKeyData, ReadyForQuery, ErrorResponse,
//! NegotiateProtocolVersion) and the few server messages it inspects while
//! relaying (ReadyForQuery, ErrorResponse, ParameterStatus, CommandComplete).

use bytes::{BufMut, BytesMut};

use super::cstr;
use super::tag::backend as tag;

/// SQLSTATE codes the router itself reports (docs/router.md lists them).
pub mod sqlstate {
    /// The client broke the protocol.
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    /// The server connection was lost during the client's statement or transaction.
    pub const CONNECTION_FAILURE: &str = "08006";
    /// No writable primary within the pause timeout.
    pub const NO_PRIMARY: &str = "57P03";
    /// The router is shutting down.
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    /// Wrong password or unknown user.
    pub const INVALID_PASSWORD: &str = "28P01";
    /// Authentication method or exchange refused.
    pub const INVALID_AUTHORIZATION: &str = "28000";
    /// `router.max_client_connections` reached.
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    /// A message above `router.max_message_size`.
    pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
    /// Something the router does not support (replication connections, ...).
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
}

/// The transaction status ReadyForQuery carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    /// `I`: not in a transaction block.
    Idle,
    /// `T`: in a transaction block.
    InTransaction,
    /// `E`: in a failed transaction block (statements refused until it ends).
    Failed,
}

impl TxStatus {
    /// The status of a ReadyForQuery's byte; `None` for a byte Postgres never sends.
    #[inline]
    pub fn from_byte(status: u8) -> Option<TxStatus> {
        match status {
            b'I' => Some(TxStatus::Idle),
            b'T' => Some(TxStatus::InTransaction),
            b'E' => Some(TxStatus::Failed),
            _ => None,
        }
    }

    /// The byte ReadyForQuery carries.
    #[inline]
    pub fn as_byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        }
    }
}

/// Severity of an ErrorResponse the router writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The statement failed; the session goes on.
    Error,
    /// The session ends.
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

fn begin(buf: &mut BytesMut, tag: u8) -> usize {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_u32(0);
    at
}

fn finish(buf: &mut BytesMut, at: usize) {
    let len = (buf.len() - at) as u32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(buf: &mut BytesMut, s: &str) {
    buf.put_slice(s.as_bytes());
    buf.put_u8(0);
}

/// ErrorResponse with severity, SQLSTATE, message and an optional hint.
pub fn error(
    buf: &mut BytesMut,
    severity: Severity,
    code: &str,
    message: &str,
    hint: Option<&str>,
) {
    let at = begin(buf, tag::ERROR_RESPONSE);
    for (field, value) in [
        (b'S', severity.as_str()),
        (b'V', severity.as_str()),
        (b'C', code),
        (b'M', message),
    ] {
        buf.put_u8(field);
        put_cstr(buf, value);
    }
    if let Some(hint) = hint {
        buf.put_u8(b'H');
        put_cstr(buf, hint);
    }
    buf.put_u8(0);
    finish(buf, at);
}

/// ReadyForQuery with a transaction status.
pub fn ready_for_query(buf: &mut BytesMut, status: TxStatus) {
    buf.put_slice(&[tag::READY_FOR_QUERY, 0, 0, 0, 5, status.as_byte()]);
}

/// An Authentication message: `code` then `extra` bytes.
pub fn authentication(buf: &mut BytesMut, code: i32, extra: &[u8]) {
    let at = begin(buf, tag::AUTHENTICATION);
    buf.put_i32(code);
    buf.put_slice(extra);
    finish(buf, at);
}

/// AuthenticationOk.
pub fn auth_ok(buf: &mut BytesMut) {
    authentication(buf, 0, &[]);
}

/// AuthenticationSASL offering SCRAM-SHA-256.
pub fn auth_sasl(buf: &mut BytesMut) {
    authentication(buf, 10, b"SCRAM-SHA-256\0\0");
}

/// ParameterStatus.
pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    let at = begin(buf, tag::PARAMETER_STATUS);
    put_cstr(buf, name);
    put_cstr(buf, value);
    finish(buf, at);
}

/// BackendKeyData (protocol 3.0: four-byte secret).
pub fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    buf.put_slice(&[tag::BACKEND_KEY_DATA, 0, 0, 0, 12]);
    buf.put_i32(pid);
    buf.put_i32(secret);
}

/// NegotiateProtocolVersion: the newest minor version the router speaks and
/// the `_pq_.` options it did not recognise.
pub fn negotiate_protocol_version(buf: &mut BytesMut, minor: i32, unrecognised: &[&str]) {
    let at = begin(buf, tag::NEGOTIATE_PROTOCOL_VERSION);
    buf.put_i32(minor);
    buf.put_i32(unrecognised.len() as i32);
    for option in unrecognised {
        put_cstr(buf, option);
    }
    finish(buf, at);
}

/// Severity and SQLSTATE and message of an ErrorResponse body (the non-localised
/// `V` severity when present, else `S`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ErrorFields {
    /// `ERROR`, `FATAL`, `PANIC`, ...
    pub severity: String,
    /// SQLSTATE.
    pub code: String,
    /// Primary message.
    pub message: String,
}

impl ErrorFields {
    /// The server is about to close the connection.
    pub fn is_fatal(&self) -> bool {
        self.severity == "FATAL" || self.severity == "PANIC"
    }

    /// A refusal that may pass: operator intervention (class 57: shutting
    /// down, starting up), insufficient resources (53: too many clients) or a
    /// connection exception (08). Any other refusal of a login (no such
    /// database, role, ...) is the server's definitive answer.
    pub fn is_transient(&self) -> bool {
        ["57", "53", "08"].iter().any(|c| self.code.starts_with(c))
    }
}

/// Reads the fields of an ErrorResponse or NoticeResponse body.
pub fn parse_error(mut body: &[u8]) -> ErrorFields {
    let mut out = ErrorFields::default();
    let mut localized = String::new();
    while let [field, rest @ ..] = body {
        if *field == 0 {
            break;
        }
        let Some((value, rest)) = cstr(rest) else {
            break;
        };
        let value = String::from_utf8_lossy(value).into_owned();
        match field {
            b'S' => localized = value,
            b'V' => out.severity = value,
            b'C' => out.code = value,
            b'M' => out.message = value,
            _ => {}
        }
        body = rest;
    }
    if out.severity.is_empty() {
        out.severity = localized;
    }
    out
}

/// Name and value of a ParameterStatus body.
pub fn parse_parameter_status(body: &[u8]) -> Option<(&str, &str)> {
    let (name, rest) = cstr(body)?;
    let (value, _) = cstr(rest)?;
    Some((
        std::str::from_utf8(name).ok()?,
        std::str::from_utf8(value).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_round_trip() {
        let mut buf = BytesMut::new();
        error(&mut buf, Severity::Fatal, "08P01", "bad", Some("fix it"));
        assert_eq!(buf[0], b'E');
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        assert_eq!(len + 1, buf.len());
        let fields = parse_error(&buf[5..]);
        assert_eq!(fields.severity, "FATAL");
        assert_eq!(fields.code, "08P01");
        assert_eq!(fields.message, "bad");
        assert!(fields.is_fatal());
    }

    #[test]
    fn parameter_status_round_trip() {
        let mut buf = BytesMut::new();
        parameter_status(&mut buf, "TimeZone", "UTC");
        assert_eq!(parse_parameter_status(&buf[5..]), Some(("TimeZone", "UTC")));
    }
}
