//! The client's messages in the relay: framed, checked, told to the
//! [`Tracker`](super::tracker::Tracker), and forwarded to the server (or
//! answered by the router itself: a failed batch, a lost transaction).

use crate::client::Ended;
use crate::client_error::{ClientError, Refusal};
use crate::protocol::backend::{self, sqlstate, TxStatus};
use crate::protocol::tag::frontend;
use crate::protocol::{cstr, frame};
use crate::server::ServerConn;
use crate::tracking::{self, LargeSql, SessionState};

use super::failed::{ends_transaction, Step};
use super::forward::Forward;
use super::statements::{bound_ends, forget_all, mentions_deallocation};
use super::tracker::ClientMsg;
use super::Session;

/// Client messages up to this size are buffered whole before they are
/// handled; a larger one of a type Postgres allows to be large (Query, Parse,
/// Bind, FunctionCall, CopyData, CopyDone, CopyFail) is streamed to the server
/// as it arrives, so that a session holds about this much memory whatever
/// the size of its messages (`router.max_message_size` is the limit).
const WHOLE_MAX: usize = 256 * 1024;
/// Bytes of a streamed message the router looks at before it streams the
/// rest: enough for a Bind's portal and statement names (Postgres truncates
/// names to 63 bytes) and the first words of a statement.
const PREFIX: usize = 4096;

/// The next client message in the read buffer, as far as it has arrived.
#[derive(Clone, Copy)]
struct Incoming {
    msg: ClientMsg,
    tag: u8,
    /// Bytes handled now: all of it, or, for a large one, what has arrived
    /// (at least its prefix); the rest follows through the tracker's
    /// `client_rest`.
    len: usize,
    /// Bytes still to come.
    more: usize,
    /// Its whole length, tag included.
    frame_len: usize,
}

/// What became of a message the session looked at before forwarding it.
enum Handled {
    /// Consumed here (answered or dropped): on to the next one.
    Next,
    /// On to the server.
    Forward,
}

impl Session {
    /// Handles every complete client message buffered; what goes on to the
    /// server ends up in `swbuf`, without a copy when it can (see [`Forward`]).
    pub(super) async fn on_client_bytes(&mut self) -> Result<(), Ended> {
        let mut forward = Forward::default();
        // Bytes of `rbuf` dealt with so far.
        let mut pos = 0;
        let result = self.on_client_frames(&mut forward, &mut pos).await;
        if result.is_ok() {
            forward.finish(&mut self.client.rbuf, &mut self.swbuf, pos);
        }
        // An error ends the session: what is left in the buffers goes nowhere.
        result
    }

    async fn on_client_frames(
        &mut self,
        forward: &mut Forward,
        pos: &mut usize,
    ) -> Result<(), Ended> {
        loop {
            if self.proto.client_rest() > 0 {
                if !self.stream_client_rest(forward, pos) {
                    return Ok(());
                }
                continue;
            }
            let Some(m) = self.next_message(*pos) else {
                return Ok(());
            };
            if let Handled::Next = self.answered_here(m, pos) {
                continue;
            }
            if m.msg.starts_work() && self.proto.at_boundary() {
                // What came before this transaction goes first.
                forward.spill(&self.client.rbuf, &mut self.swbuf);
                if let Some(error) = self.begin_work().await? {
                    *pos += m.len;
                    self.discard_rest(m.more);
                    self.fail_batch(m.msg, &error);
                    continue;
                }
            }
            if self.server.is_none() {
                *pos += m.len;
                self.discard_rest(m.more);
                if m.msg.starts_work() {
                    let error = ClientError::error(
                        sqlstate::CONNECTION_FAILURE,
                        "no server connection for this statement",
                        None,
                    );
                    self.fail_batch(m.msg, &error);
                }
                continue;
            }
            if m.more > 0 && m.tag == frontend::PARSE && self.tx_mode {
                let named = cstr(&self.client.rbuf[*pos + 5..*pos + m.len])
                    .is_some_and(|(name, _)| !name.is_empty());
                if named {
                    // Its frame would have to be kept to prepare it again
                    // on the next transaction's connection.
                    self.close_after_answers(Some(Refusal::LargeNamedStatement {
                        frame_len: m.frame_len,
                        keeps: WHOLE_MAX,
                    }));
                    return Ok(());
                }
            }
            self.track_client(forward, *pos, m);
            if matches!(m.tag, frontend::QUERY | frontend::PARSE) {
                self.pin_if_sticky();
            }
            forward.pass(&self.client.rbuf, &mut self.swbuf, *pos, m.len);
            *pos += m.len;
            if m.more > 0 {
                self.proto.client_streaming(m.more);
            }
        }
    }

    /// The rest of a large message, as it arrives. False when nothing more
    /// has arrived.
    #[inline]
    fn stream_client_rest(&mut self, forward: &mut Forward, pos: &mut usize) -> bool {
        let n = self.proto.client_rest().min(self.client.rbuf.len() - *pos);
        if n == 0 {
            return false;
        }
        let piece = &self.client.rbuf[*pos..*pos + n];
        if !self.client_discard {
            if let Some(sql) = self.large_sql.as_mut() {
                sql.feed(piece);
            }
            forward.pass(&self.client.rbuf, &mut self.swbuf, *pos, n);
        }
        *pos += n;
        if self.proto.client_passed(n) {
            self.client_discard = false;
            self.end_large_sql();
        }
        true
    }

    /// The next message at `pos`, once enough of it has arrived. A message
    /// the router refuses, and Terminate, close the session (after the
    /// answers to what came before) and give `None`, as does a message not
    /// complete yet.
    #[inline]
    fn next_message(&mut self, pos: usize) -> Option<Incoming> {
        let rest = &self.client.rbuf[pos..];
        // Postgres looks at the type before the length.
        let &tag = rest.first()?;
        let msg = ClientMsg::of(tag);
        if msg.is_none() && tag != frontend::TERMINATE {
            self.close_after_answers(Some(Refusal::UnknownType(tag)));
            return None;
        }
        let header = match frame::peek_header(rest, self.client.max) {
            Ok(Some(h)) => h,
            Ok(None) => return None,
            Err(e) => {
                self.close_after_answers(Some(Refusal::Frame(e)));
                return None;
            }
        };
        let available = rest.len();
        let len = if available >= header.frame_len {
            header.frame_len
        } else if header.frame_len <= WHOLE_MAX || available < PREFIX {
            return None;
        } else if msg.is_some_and(ClientMsg::may_be_large) {
            available
        } else {
            self.close_after_answers(Some(Refusal::NotStreamable {
                tag,
                frame_len: header.frame_len,
            }));
            return None;
        };
        let Some(msg) = msg else {
            // Terminate: Postgres has answered everything before it when it
            // reads it, so are the answers still to come delivered.
            self.close_after_answers(None);
            return None;
        };
        Some(Incoming {
            msg,
            tag,
            len,
            more: header.frame_len - len,
            frame_len: header.frame_len,
        })
    }

    /// A message the router deals with itself: dropped while skipping the
    /// rest of a failed batch, or answered in a lost transaction.
    #[inline]
    fn answered_here(&mut self, m: Incoming, pos: &mut usize) -> Handled {
        if self.proto.skipping() {
            *pos += m.len;
            self.discard_rest(m.more);
            if self.proto.on_skipped(m.msg) {
                backend::ready_for_query(&mut self.client.wbuf, TxStatus::Idle);
            }
            return Handled::Next;
        }
        let Some(failed) = self.failed.as_mut() else {
            return Handled::Forward;
        };
        let frame = &self.client.rbuf[*pos..*pos + m.len];
        let step = failed.on_message(frame, &mut self.state, &mut self.client.wbuf);
        if step != Step::Answered {
            self.failed = None;
            self.proto.on_idle();
        }
        if step == Step::PassOn {
            return Handled::Forward;
        }
        *pos += m.len;
        self.discard_rest(m.more);
        Handled::Next
    }

    /// At a boundary, before the first message of a transaction: a server
    /// connection to the current primary, marked busy. `Some` is the error
    /// the client's batch fails with; an error that ends the session has
    /// been sent.
    async fn begin_work(&mut self) -> Result<Option<ClientError>, Ended> {
        self.busy = None;
        self.flush_server().await?;
        self.check_server().await?;
        let Err(e) = self.attach_and_begin().await else {
            return Ok(None);
        };
        let error = ClientError::from(e);
        if error.fatal {
            return Err(self.client.end_with(error).await);
        }
        Ok(Some(error))
    }

    /// Reports a failed batch to the client, as Postgres would: an error, then
    /// ReadyForQuery at once for a Query, or after the next Sync otherwise.
    fn fail_batch(&mut self, msg: ClientMsg, error: &ClientError) {
        error.write(&mut self.client.wbuf);
        if self.proto.on_refused(msg) {
            backend::ready_for_query(&mut self.client.wbuf, TxStatus::Idle);
        }
    }

    /// Tells the tracker, the session state and (transaction mode) the
    /// prepared statements about a message about to be forwarded from
    /// `rbuf[at..]`; in transaction mode a Parse the statement needs may be
    /// put in front of it in `swbuf`.
    fn track_client(&mut self, forward: &mut Forward, at: usize, m: Incoming) {
        let frame = &self.client.rbuf[at..at + m.len];
        let body = &frame[5..];
        let pooled = if self.tx_mode {
            self.server.as_deref_mut()
        } else {
            None
        };
        let msg = match m.msg {
            ClientMsg::Query { .. } if m.more > 0 => {
                self.large_sql = Some(LargeSql::new(body));
                ClientMsg::Query { ends: false }
            }
            ClientMsg::Parse { .. } if m.more > 0 => {
                // Too large to keep: a named one cannot be restored
                // elsewhere (transaction mode refused it).
                let mut unnamed_ends = None;
                if let Some((name, rest)) = cstr(body) {
                    if name.is_empty() {
                        // Its text is no COMMIT or ROLLBACK.
                        unnamed_ends = Some(false);
                    } else {
                        self.state.mark_untracked();
                    }
                    self.large_sql = Some(LargeSql::new(rest));
                }
                if pooled.is_some() {
                    // Unnamed: nothing to keep, only its answer to count.
                    self.stmts.on_large_unnamed_parse();
                }
                ClientMsg::Parse { unnamed_ends }
            }
            ClientMsg::Query { .. } => {
                let in_tx = self.proto.in_transaction();
                track_query(&mut self.state, pooled, in_tx, body)
            }
            ClientMsg::Parse { .. } => {
                self.state.on_parse(frame);
                let unnamed_ends = match cstr(body) {
                    Some((b"", rest)) => {
                        Some(cstr(rest).is_some_and(|(sql, _)| ends_transaction(sql)))
                    }
                    _ => None,
                };
                if let Some(server) = pooled {
                    forward.spill(&self.client.rbuf, &mut self.swbuf);
                    self.stmts.on_parse(server, &mut self.swbuf, frame);
                }
                ClientMsg::Parse { unnamed_ends }
            }
            ClientMsg::Close => {
                self.state.on_close(body);
                if let Some(server) = pooled {
                    self.stmts.on_close(server, body);
                }
                ClientMsg::Close
            }
            ClientMsg::Bind { .. } => {
                let named_ends = if self.proto.in_transaction() {
                    bound_ends(&self.state, body)
                } else {
                    Some(false)
                };
                let statement = cstr(body).and_then(|(_portal, rest)| cstr(rest));
                if let (Some(server), Some((name, _))) = (pooled, statement) {
                    forward.spill(&self.client.rbuf, &mut self.swbuf);
                    self.stmts
                        .ensure(server, &mut self.swbuf, &self.state, name);
                }
                ClientMsg::Bind { named_ends }
            }
            ClientMsg::Describe => {
                let statement = match body {
                    [b'S', rest @ ..] => cstr(rest),
                    _ => None,
                };
                if let (Some(server), Some((name, _))) = (pooled, statement) {
                    forward.spill(&self.client.rbuf, &mut self.swbuf);
                    self.stmts
                        .ensure(server, &mut self.swbuf, &self.state, name);
                }
                ClientMsg::Describe
            }
            other => other,
        };
        if msg.brings_ready() {
            self.stmts.on_sent_ready();
        }
        self.proto.on_client(msg);
    }

    /// The rest (`more` bytes) of the message being handled goes nowhere.
    fn discard_rest(&mut self, more: usize) {
        if more > 0 {
            self.proto.client_streaming(more);
            self.client_discard = true;
        }
    }

    /// A large Query or Parse was sent whole: what it may have done to the
    /// session's state (see [`LargeSql`]).
    fn end_large_sql(&mut self) {
        let Some(sql) = self.large_sql.take() else {
            return;
        };
        if sql.may_change_state() {
            self.state.mark_untracked();
            if let Some(server) = self.server.as_mut().filter(|_| self.tx_mode) {
                forget_all(server);
            }
            self.pin_if_sticky();
        }
    }
}

/// A Query (body given) about to be forwarded whole: what it may do to the
/// session's state (and, in transaction mode, to the statements its server
/// connection has), and whether it ends the transaction it is sent in.
#[inline]
fn track_query(
    state: &mut SessionState,
    pooled: Option<&mut ServerConn>,
    in_tx: bool,
    body: &[u8],
) -> ClientMsg {
    let Some((sql, _)) = cstr(body) else {
        return ClientMsg::Query { ends: false };
    };
    // Most statements are plain DML: the quick check spares them the scans
    // for DEALLOCATE and DISCARD, the UTF-8 check and the parser.
    if tracking::interesting(sql) {
        if let Some(server) = pooled {
            if mentions_deallocation(sql) {
                forget_all(server);
            }
        }
        if let Ok(sql) = std::str::from_utf8(sql) {
            state.on_query(sql);
        }
    }
    ClientMsg::Query {
        ends: in_tx && ends_transaction(sql),
    }
}
