//! Named prepared statements in transaction mode ([`Statements`]): the
//! client's statements follow it from one server connection to the next.

use std::collections::{HashMap, VecDeque};

use bytes::{BufMut, Bytes, BytesMut};

use crate::protocol::cstr;
use crate::protocol::tag::frontend;
use crate::server::ServerConn;
use crate::tracking::{self, SessionState};

use super::failed::ends_transaction;

/// Named prepared statements in transaction mode: the router re-prepares a
/// client's statement on whichever server connection runs its transaction,
/// by putting a Parse (after a Close, when the name is taken there) in front
/// of the client's Bind or Describe. The server's answers to those messages
/// (ParseComplete, CloseComplete) are not passed on. Each Parse and Close
/// sent is queued, with the number of ReadyForQuery-bringing messages sent
/// before it, to match the answers in order.
#[derive(Default)]
pub(crate) struct Statements {
    /// One entry per Parse sent: (segment, answer to be swallowed).
    parses: VecDeque<(u64, bool)>,
    /// One entry per Close sent.
    closes: VecDeque<(u64, bool)>,
    /// Query, Sync and FunctionCall messages sent on this server connection.
    sent: u64,
    /// ReadyForQuery messages received on this server connection.
    seen: u64,
    /// Named statements parsed since the session was last idle on the
    /// server: if an error comes, they may not exist.
    parsed: Vec<Box<[u8]>>,
}

impl Statements {
    #[inline]
    pub fn reset(&mut self) {
        self.parses.clear();
        self.closes.clear();
        self.seen = self.sent;
        self.parsed.clear();
    }

    #[inline]
    pub fn on_ready(&mut self, idle: bool) {
        self.seen += 1;
        while self.parses.front().is_some_and(|(seg, _)| *seg < self.seen) {
            self.parses.pop_front();
        }
        while self.closes.front().is_some_and(|(seg, _)| *seg < self.seen) {
            self.closes.pop_front();
        }
        if idle {
            self.parsed.clear();
        }
    }

    /// A message the server answers with ReadyForQuery was sent.
    #[inline]
    pub fn on_sent_ready(&mut self) {
        self.sent += 1;
    }

    /// The client parses the unnamed statement in a message too large to
    /// keep: only its answer is counted.
    pub fn on_large_unnamed_parse(&mut self) {
        self.parses.push_back((self.sent, false));
    }

    /// A ParseComplete (`close`: false) or CloseComplete from the server:
    /// whether it answers the router's own message, and is not for the client.
    #[inline]
    pub fn swallows(&mut self, close: bool) -> bool {
        let queue = if close {
            &mut self.closes
        } else {
            &mut self.parses
        };
        queue.pop_front().is_some_and(|(_, swallow)| swallow)
    }

    /// Answers of the statement's own messages are swallowed.
    fn close(&mut self, out: &mut BytesMut, name: &[u8], swallow: bool) {
        out.put_u8(frontend::CLOSE);
        out.put_u32((4 + 1 + name.len() + 1) as u32);
        out.put_u8(b'S');
        out.put_slice(name);
        out.put_u8(0);
        self.closes.push_back((self.sent, swallow));
    }

    /// Makes sure the server has the client's statement `name` before a
    /// message that uses it.
    pub fn ensure(
        &mut self,
        server: &mut ServerConn,
        out: &mut BytesMut,
        state: &SessionState,
        name: &[u8],
    ) {
        if name.is_empty() {
            return;
        }
        let Some(frame) = state.prepared_frame(name) else {
            return;
        };
        match server.prepared.get(name) {
            Some(have) if have == frame => return,
            Some(_) => self.close(out, name, true),
            None => {}
        }
        out.extend_from_slice(frame);
        self.parses.push_back((self.sent, true));
        server.prepared.insert(name.into(), frame.clone());
        self.parsed.push(name.into());
    }

    /// The client parses `name` (the whole frame given).
    pub fn on_parse(&mut self, server: &mut ServerConn, out: &mut BytesMut, frame: &[u8]) {
        let Some((name, rest)) = frame.get(5..).and_then(cstr) else {
            return;
        };
        if cstr(rest)
            .is_some_and(|(sql, _)| tracking::interesting(sql) && mentions_deallocation(sql))
        {
            forget_all(server);
        }
        if !name.is_empty() {
            if server.prepared.contains_key(name) {
                self.close(out, name, true);
            }
            server
                .prepared
                .insert(name.into(), Bytes::copy_from_slice(frame));
            self.parsed.push(name.into());
        }
        self.parses.push_back((self.sent, false));
    }

    /// The client closes a statement or portal (Close body given).
    pub fn on_close(&mut self, server: &mut ServerConn, body: &[u8]) {
        if let [b'S', rest @ ..] = body {
            if let Some((name, _)) = cstr(rest) {
                if let Some(frame) = server.prepared.get_mut(name) {
                    // Unknown until the Close ran; a later Parse closes first.
                    *frame = Bytes::new();
                }
            }
        }
        self.closes.push_back((self.sent, false));
    }

    /// An error: the statements parsed in this batch may not exist.
    pub fn on_error_in(&mut self, prepared: &mut HashMap<Box<[u8]>, Bytes>) {
        for name in &self.parsed {
            if let Some(frame) = prepared.get_mut(name) {
                *frame = Bytes::new();
            }
        }
    }
}

/// What a Bind (body given) binds, for the tracker: `None`, the unnamed
/// statement; else whether the named statement ends the transaction.
pub(crate) fn bound_ends(state: &SessionState, body: &[u8]) -> Option<bool> {
    let Some((statement, _)) = cstr(body).and_then(|(_portal, rest)| cstr(rest)) else {
        return Some(false);
    };
    if statement.is_empty() {
        return None;
    }
    let query = state
        .prepared_frame(statement)
        .and_then(|frame| cstr(frame.get(5..)?))
        .and_then(|(_name, rest)| cstr(rest));
    Some(query.is_some_and(|(sql, _)| ends_transaction(sql)))
}

/// After SQL that may deallocate statements, what the server has is unknown.
pub(crate) fn forget_all(server: &mut ServerConn) {
    for frame in server.prepared.values_mut() {
        *frame = Bytes::new();
    }
}

/// Whether `sql` names DEALLOCATE or DISCARD anywhere. Callers ask only of
/// SQL that [`tracking::interesting`] let through: one plain DML or
/// transaction-control statement cannot be either (a function it calls
/// could, and no reading of the text would see that).
pub(crate) fn mentions_deallocation(sql: &[u8]) -> bool {
    tracking::contains_ci(sql, "deallocate") || tracking::contains_ci(sql, "discard")
}
