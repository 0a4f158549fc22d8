//! The relay: after startup, client and server messages are forwarded as raw
//! bytes, frame by frame (only the five-byte header is looked at, plus the
//! bodies of the few messages the router tracks). ReadyForQuery's status byte
//! marks transaction boundaries; only there does the router pause (no
//! writable primary), re-attach the client to a new server connection (the
//! primary moved), and restore its session.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use hapg_config::router::PoolMode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cancel::CancelKey;
use crate::gated::Gated;
use crate::lost::{self, LostTransaction, Step};
use crate::net::{self, Stream};
use crate::pool::{CheckoutError, PoolId};
use crate::protocol::backend::{
    self, parse_error, parse_parameter_status, sqlstate, ErrorFields, Severity,
};
use crate::protocol::{cstr, frame, ProtocolError};
use crate::routing::{Busy, Cut, CutReason};
use crate::server::{
    same_params, set_param, set_shared_param, Login, Params, ServerConn, ServerError,
};
use crate::session::{ClientConn, Ended, Ready};
use crate::tracking::{self, SessionState};
use crate::Shared;

/// Delay between two connection attempts to a primary that does not answer.
const RETRY_DELAY: Duration = Duration::from_millis(250);
/// Reported parameters a client may change with SET or set_config and the
/// router restores on a new server connection.
pub(crate) const SETTABLE: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "standard_conforming_strings",
    "default_transaction_read_only",
    "search_path",
];

/// Why a server connection could not be attached at a transaction boundary.
enum AttachError {
    /// No writable primary within the pause timeout.
    NoPrimary(String),
    /// The primary refused the router's login or a restore statement.
    Refused(ErrorFields),
    /// Session state cannot move to the new server.
    StateLost(String),
    /// Every connection of the pool stayed in use until the pause timeout.
    PoolFull(String),
    /// The router is stopping.
    Stopping,
}

/// Why a server connection is dropped while the session is on it.
enum Loss<'a> {
    /// The connection broke or the server ended it.
    Lost(&'a str),
    /// A switchover drain ran out of time: the router cuts the statement or
    /// transaction still open on the primary being drained.
    Switchover,
    /// The monitor named another primary (epoch `to`) while the session had
    /// a statement or transaction open on the old one (epoch `from`): the
    /// router stops waiting for it, since a primary that lost its place may
    /// never answer (frozen, cut off, or powered off with the socket open).
    PrimaryChanged { from: i64, to: i64 },
}

/// Named prepared statements in transaction mode: the router re-prepares a
/// client's statement on whichever server connection runs its transaction,
/// by putting a Parse (after a Close, when the name is taken there) in front
/// of the client's Bind or Describe. The server's answers to those messages
/// (ParseComplete, CloseComplete) are not passed on. Each Parse and Close
/// sent is queued, with the number of ReadyForQuery-bringing messages sent
/// before it, to match the answers in order.
#[derive(Default)]
struct Statements {
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
    fn reset(&mut self) {
        self.parses.clear();
        self.closes.clear();
        self.seen = self.sent;
        self.parsed.clear();
    }

    fn on_ready(&mut self, idle: bool) {
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

    /// Answers of the statement's own messages are swallowed.
    fn close(&mut self, out: &mut BytesMut, name: &[u8], swallow: bool) {
        out.put_u8(b'C');
        out.put_u32((4 + 1 + name.len() + 1) as u32);
        out.put_u8(b'S');
        out.put_slice(name);
        out.put_u8(0);
        self.closes.push_back((self.sent, swallow));
    }

    /// Makes sure the server has the client's statement `name` before a
    /// message that uses it.
    fn ensure(
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
    fn on_parse(&mut self, server: &mut ServerConn, out: &mut BytesMut, frame: &[u8]) {
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
    fn on_close(&mut self, server: &mut ServerConn, body: &[u8]) {
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
    fn on_error_in(&mut self, prepared: &mut std::collections::HashMap<Box<[u8]>, Bytes>) {
        for name in &self.parsed {
            if let Some(frame) = prepared.get_mut(name) {
                *frame = Bytes::new();
            }
        }
    }
}

/// Whether a Bind (body given) binds a statement that ends the transaction.
fn binds_an_ending(state: &SessionState, unnamed_ends: bool, body: &[u8]) -> bool {
    let Some((statement, _)) = cstr(body).and_then(|(_portal, rest)| cstr(rest)) else {
        return false;
    };
    if statement.is_empty() {
        return unnamed_ends;
    }
    let query = state
        .prepared_frame(statement)
        .and_then(|frame| cstr(frame.get(5..)?))
        .and_then(|(_name, rest)| cstr(rest));
    query.is_some_and(|(sql, _)| lost::ends_transaction(sql))
}

/// After SQL that may deallocate statements, what the server has is unknown.
fn forget_all(server: &mut ServerConn) {
    for frame in server.prepared.values_mut() {
        *frame = Bytes::new();
    }
}

/// Whether `sql` names DEALLOCATE or DISCARD anywhere. Callers ask only of
/// SQL that [`tracking::interesting`] let through: one plain DML or
/// transaction-control statement cannot be either (a function it calls
/// could, and no reading of the text would see that).
fn mentions_deallocation(sql: &[u8]) -> bool {
    tracking::contains_ci(sql, "deallocate") || tracking::contains_ci(sql, "discard")
}

/// One client session in the relay phase.
pub(crate) struct Session {
    shared: Arc<Shared>,
    client: ClientConn,
    server: Option<ServerConn>,
    /// Bytes to send to the server.
    swbuf: BytesMut,
    login: Login,
    /// ParameterStatus values the client has seen.
    known: Params,
    /// Settable parameters the client changed during the session (from ParameterStatus).
    changed: Vec<(String, String)>,
    state: SessionState,
    /// Transaction status from the last ReadyForQuery.
    tx: u8,
    /// Queries and Syncs forwarded and not yet answered by ReadyForQuery.
    outstanding: u32,
    /// Extended-protocol messages forwarded since the last Sync.
    open_batch: bool,
    /// After a failed batch: drop client messages until Sync, as Postgres does.
    skip_until_sync: bool,
    /// The server connection was lost (or cut) during a transaction: the
    /// router answers for the failed transaction until the client ends it.
    lost: Option<LostTransaction>,
    /// A statement that ends the transaction (COMMIT, ROLLBACK, ...) is in
    /// flight: if the connection is lost now, the transaction is over either
    /// way, and the session is idle. The number of ReadyForQuery still to
    /// come up to that statement's.
    ending: Option<u32>,
    /// The unnamed statement last parsed ends a transaction.
    unnamed_ends: bool,
    /// Set while the session has a statement or transaction open on its
    /// server: what a switchover drain waits for.
    busy: Option<Busy>,
    /// Cut orders: of switchover drains, and of new epochs.
    cuts: watch::Receiver<(u64, Option<Cut>)>,
    /// Bytes of a server message being streamed to the client still to come.
    partial: usize,
    /// A server connection was attached once (so a new one is a move).
    had_server: bool,
    /// The pool of the last server connection attached (see
    /// [`crate::pool::Pools::checkout`]).
    pool: Option<PoolId>,
    /// Transaction pooling: the server connection goes back to the pool at
    /// each transaction boundary.
    tx_mode: bool,
    /// Prepared statements in transaction mode.
    stmts: Statements,
    cancel: CancelKey,
    shutdown: CancellationToken,
    kill: CancellationToken,
}

/// Forwards messages from a read buffer (`buf`) to a write buffer (`out`)
/// without copying them when it can: while the forwarded messages are one
/// unbroken stretch of `buf` that started when `out` was empty, the bytes stay
/// where they are, and at the end the two buffers trade places. Anything else
/// (a message swallowed in between, something the router writes itself)
/// breaks the stretch: it is copied to `out` first, in order, and what follows
/// is copied message by message until `out` is empty again.
#[derive(Default)]
struct Forward {
    /// `buf[start..start + run]` is forwarded in place.
    start: usize,
    run: usize,
}

impl Forward {
    /// Forwards `buf[at..at + n]`.
    fn pass(&mut self, buf: &BytesMut, out: &mut BytesMut, at: usize, n: usize) {
        if self.run > 0 && at == self.start + self.run {
            self.run += n;
        } else if self.run == 0 && out.is_empty() {
            self.start = at;
            self.run = n;
        } else {
            self.spill(buf, out);
            out.extend_from_slice(&buf[at..at + n]);
        }
    }

    /// Copies the stretch so far to `out`: call before writing anything else
    /// to `out`, so that it stays in order.
    fn spill(&mut self, buf: &BytesMut, out: &mut BytesMut) {
        if self.run > 0 {
            out.extend_from_slice(&buf[self.start..self.start + self.run]);
            self.run = 0;
        }
    }

    /// `buf[..consumed]` is dealt with: drops it from `buf`, and when a
    /// stretch was forwarded in place, makes it `out` (what follows
    /// `consumed`, an incomplete message, goes back to `buf`).
    fn finish(mut self, buf: &mut BytesMut, out: &mut BytesMut, consumed: usize) {
        if self.run > 0 && out.is_empty() {
            let end = self.start + self.run;
            debug_assert!(end <= consumed);
            std::mem::swap(buf, out);
            buf.extend_from_slice(&out[consumed..]);
            out.truncate(end);
            out.advance(self.start);
        } else {
            debug_assert_eq!(self.run, 0, "something was written over a stretch");
            self.spill(buf, out);
            buf.advance(consumed);
        }
    }
}

async fn read_server(server: &mut Option<ServerConn>) -> std::io::Result<usize> {
    match server {
        Some(s) => {
            net::read_room(&mut s.buf);
            s.stream.read_buf(&mut s.buf).await
        }
        None => std::future::pending().await,
    }
}

async fn read_client(stream: &mut Stream, buf: &mut BytesMut) -> std::io::Result<usize> {
    if buf.capacity() == 0 {
        // An idle client holds no buffer: wait until it sends something.
        if let Stream::Plain(tcp) = stream {
            tcp.readable().await?;
        }
    }
    net::read_room(buf);
    stream.read_buf(buf).await
}

impl Session {
    pub fn new(
        shared: Arc<Shared>,
        client: ClientConn,
        ready: Ready,
        shutdown: CancellationToken,
        kill: CancellationToken,
    ) -> Session {
        let had_server = ready.server.is_some();
        let pool = ready.server.as_ref().and_then(|server| server.pool);
        let tx_mode = shared.runtime.load().config.pool.mode == PoolMode::Transaction;
        let mut cuts = shared.routing.subscribe_cut();
        cuts.mark_unchanged();
        Session {
            shared,
            client,
            server: ready.server,
            swbuf: BytesMut::new(),
            login: ready.login,
            known: ready.known,
            changed: Vec::new(),
            state: SessionState::default(),
            tx: b'I',
            outstanding: 0,
            open_batch: false,
            skip_until_sync: false,
            lost: None,
            ending: None,
            unnamed_ends: false,
            busy: None,
            cuts,
            partial: 0,
            had_server,
            pool,
            tx_mode,
            stmts: Statements::default(),
            cancel: ready.cancel,
            shutdown,
            kill,
        }
    }

    /// Relays until the client leaves or the router stops.
    pub async fn run(mut self) {
        let _ = self.relay().await;
        if let Some(server) = self.server.take() {
            self.cancel.set_target(None);
            let reusable = self.at_boundary()
                && self.partial == 0
                && self.swbuf.is_empty()
                && !self.skip_until_sync;
            if reusable {
                give_back(&self.shared, server, !self.tx_mode).await;
            } else {
                server.terminate().await;
            }
        }
    }

    /// Transaction mode: the transaction is over, the connection goes back
    /// to the pool.
    fn release(&mut self) {
        let Some(server) = self.server.take() else {
            return;
        };
        self.cancel.set_target(None);
        self.busy = None;
        self.stmts.reset();
        if let Some(conn) = self.shared.pools.checkin(&self.shared, server) {
            tokio::spawn(conn.terminate());
        }
    }

    /// A client with no server connection and nothing buffered keeps no
    /// buffers (they are allocated again when it sends something).
    fn shrink(&mut self) {
        for buf in [
            &mut self.client.rbuf,
            &mut self.client.wbuf,
            &mut self.swbuf,
        ] {
            if buf.is_empty() && buf.capacity() > 0 {
                net::give_up(buf);
            }
        }
    }

    fn idle(&self) -> bool {
        self.server.is_none()
            || (self.tx == b'I' && self.outstanding == 0 && !self.open_batch && self.partial == 0)
    }

    fn at_boundary(&self) -> bool {
        self.tx == b'I' && self.outstanding == 0 && !self.open_batch
    }

    /// Ends the busy mark once the session is back at a transaction boundary
    /// (or has no server any more).
    fn sync_busy(&mut self) {
        if self.busy.is_some() && (self.server.is_none() || self.at_boundary()) {
            self.busy = None;
        }
    }

    async fn relay(&mut self) -> Result<(), Ended> {
        // What the loop waits on besides the sockets is made once (made anew
        // each time round, every one of these futures would register with
        // its notifier and unregister again, a lock each, twice per
        // transaction), and gated: polled only after its own wake-up.
        let mut kill = Gated::new(self.kill.clone().cancelled_owned());
        let mut shutdown = Gated::new(self.shutdown.clone().cancelled_owned());
        let mut cut = Gated::new(next_cut(self.cuts.clone()));
        loop {
            self.sync_busy();
            self.on_client_bytes().await?;
            self.flush_server().await?;
            self.client.flush().await?;
            self.sync_busy();
            if self.tx_mode
                && self.server.is_some()
                && self.at_boundary()
                && self.partial == 0
                && self.swbuf.is_empty()
                && !self.skip_until_sync
            {
                self.release();
            }
            if self.server.is_none() {
                self.shrink();
            }
            let idle = self.idle();
            // Server first: a server that went away while the client was idle
            // must be noticed before the client's next statement is sent to it;
            // and a transaction that just ended must not be cut.
            tokio::select! {
                biased;
                _ = &mut kill => return Err(self.stopping().await),
                _ = &mut shutdown, if idle => return Err(self.stopping().await),
                r = read_server(&mut self.server) => self.on_server_read(r)?,
                (order, cuts) = &mut cut => {
                    cut = Gated::new(next_cut(cuts));
                    self.on_cut(order)?;
                }
                r = read_client(&mut self.client.stream, &mut self.client.rbuf) => {
                    if !matches!(r, Ok(n) if n > 0) {
                        return Err(Ended);
                    }
                }
            }
        }
    }

    /// A switchover drain ran out of time, or the primary changed: cut what
    /// this session still has open on the server the order names.
    fn on_cut(&mut self, order: Cut) -> Result<(), Ended> {
        let Some(from) = self
            .busy
            .as_ref()
            .map(Busy::epoch)
            .filter(|e| order.applies_to(*e))
        else {
            return Ok(());
        };
        match order.reason {
            CutReason::DrainTimeout => self.server_gone(Loss::Switchover),
            CutReason::PrimaryChanged { to } => self.server_gone(Loss::PrimaryChanged { from, to }),
        }
    }

    fn on_server_read(&mut self, read: std::io::Result<usize>) -> Result<(), Ended> {
        match read {
            Ok(n) if n > 0 => self.on_server_bytes(),
            Ok(_) => self.server_lost("the server closed the connection"),
            Err(e) => self.server_lost(&e.to_string()),
        }
    }

    /// At a transaction boundary, before reusing the server connection: takes
    /// in what the server already sent (typically the FATAL and end of file of
    /// a server that went away while the client was idle), so that a dead
    /// connection is replaced instead of failing the client's next statement.
    async fn check_server(&mut self) -> Result<(), Ended> {
        let Some(server) = &self.server else {
            return Ok(());
        };
        // The reactor's view first, which costs no system call: a socket it
        // has not seen become readable since the last read is skipped (the
        // common case, a healthy idle server). No read future is pending on
        // the server here, so the no-op waker displaces nobody's.
        let seen_readable = {
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            server.stream.poll_read_ready(&mut cx).is_ready()
        };
        if !seen_readable {
            return Ok(());
        }
        match server.stream.peek_socket() {
            Ok(0) => self.server_lost("the server closed the connection"),
            Ok(_) => match tokio::time::timeout(
                Duration::from_millis(100),
                read_server(&mut self.server),
            )
            .await
            {
                Ok(read) => self.on_server_read(read),
                Err(_) => Ok(()),
            },
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => self.server_lost(&e.to_string()),
        }
    }

    async fn stopping(&mut self) -> Ended {
        self.client
            .fatal(
                sqlstate::ADMIN_SHUTDOWN,
                "the hapg router is shutting down",
                Some("Reconnect; another router or the restarted one will serve you."),
            )
            .await
    }

    async fn flush_server(&mut self) -> Result<(), Ended> {
        if self.swbuf.is_empty() {
            return Ok(());
        }
        let Some(server) = self.server.as_mut() else {
            self.swbuf.clear();
            return Ok(());
        };
        let result = server.stream.write_all(&self.swbuf).await;
        self.swbuf.clear();
        if let Err(e) = result {
            self.server_lost(&e.to_string())?;
        }
        Ok(())
    }

    /// Reports a failed batch to the client, as Postgres would: an error, then
    /// ReadyForQuery at once for a Query, or after the next Sync otherwise.
    fn fail_batch(&mut self, tag: u8, code: &str, message: &str, hint: Option<&str>) {
        backend::error(&mut self.client.wbuf, Severity::Error, code, message, hint);
        self.tx = b'I';
        match tag {
            b'Q' | b'F' | b'S' => backend::ready_for_query(&mut self.client.wbuf, b'I'),
            _ => self.skip_until_sync = true,
        }
    }

    /// Handles every complete client message buffered; what goes on to the
    /// server ends up in `swbuf`, without a copy when it can (see [`Forward`]).
    async fn on_client_bytes(&mut self) -> Result<(), Ended> {
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
            let header = match frame::peek_header(&self.client.rbuf[*pos..], self.client.max) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(()),
                Err(e @ ProtocolError::TooLarge { .. }) => {
                    return Err(self
                        .client
                        .fatal(
                            sqlstate::PROGRAM_LIMIT_EXCEEDED,
                            &e.to_string(),
                            Some("Raise router.max_message_size if this is intended."),
                        )
                        .await)
                }
                Err(e) => {
                    return Err(self
                        .client
                        .fatal(sqlstate::PROTOCOL_VIOLATION, &e.to_string(), None)
                        .await)
                }
            };
            if self.client.rbuf.len() - *pos < header.frame_len {
                return Ok(());
            }
            let tag = header.tag;
            if !matches!(
                tag,
                b'Q' | b'P'
                    | b'B'
                    | b'E'
                    | b'D'
                    | b'C'
                    | b'S'
                    | b'H'
                    | b'F'
                    | b'X'
                    | b'd'
                    | b'c'
                    | b'f'
            ) {
                return Err(self
                    .client
                    .fatal(
                        sqlstate::PROTOCOL_VIOLATION,
                        &format!("invalid frontend message type {}", tag),
                        None,
                    )
                    .await);
            }
            if tag == b'X' {
                return Err(Ended);
            }
            if self.skip_until_sync {
                *pos += header.frame_len;
                if tag == b'S' {
                    self.skip_until_sync = false;
                    backend::ready_for_query(&mut self.client.wbuf, b'I');
                }
                continue;
            }
            if let Some(lost) = self.lost.as_mut() {
                let frame = &self.client.rbuf[*pos..*pos + header.frame_len];
                match lost.on_message(frame, &mut self.state, &mut self.client.wbuf) {
                    Step::Answered => {
                        *pos += header.frame_len;
                        continue;
                    }
                    Step::Ended => {
                        self.lost = None;
                        self.tx = b'I';
                        *pos += header.frame_len;
                        continue;
                    }
                    Step::PassOn => {
                        self.lost = None;
                        self.tx = b'I';
                    }
                }
            }
            let starts_work = matches!(tag, b'Q' | b'P' | b'B' | b'E' | b'D' | b'C' | b'S' | b'F');
            if starts_work && self.at_boundary() {
                self.busy = None;
                // What came before this transaction goes first.
                forward.spill(&self.client.rbuf, &mut self.swbuf);
                self.flush_server().await?;
                self.check_server().await?;
                match self.attach_and_begin().await {
                    Ok(()) => {}
                    Err(AttachError::NoPrimary(message)) => {
                        *pos += header.frame_len;
                        self.fail_batch(
                            tag,
                            sqlstate::NO_PRIMARY,
                            &message,
                            Some(
                                "The formation has no writable primary at the moment; retry later.",
                            ),
                        );
                        continue;
                    }
                    Err(AttachError::Refused(fields)) => {
                        *pos += header.frame_len;
                        let message = format!(
                            "the primary refused the router's connection: {}",
                            fields.message
                        );
                        self.fail_batch(tag, &fields.code, &message, None);
                        continue;
                    }
                    Err(AttachError::PoolFull(message)) => {
                        *pos += header.frame_len;
                        self.fail_batch(
                            tag,
                            sqlstate::TOO_MANY_CONNECTIONS,
                            &message,
                            Some("Raise pool.pool_size, or hold server connections for less time."),
                        );
                        continue;
                    }
                    Err(AttachError::StateLost(message)) => {
                        return Err(self
                            .client
                            .fatal(
                                sqlstate::CONNECTION_FAILURE,
                                &message,
                                Some("Reconnect to start a new session on the new primary."),
                            )
                            .await)
                    }
                    Err(AttachError::Stopping) => return Err(self.stopping().await),
                }
            }
            if self.server.is_none() {
                *pos += header.frame_len;
                if starts_work {
                    self.fail_batch(
                        tag,
                        sqlstate::CONNECTION_FAILURE,
                        "no server connection for this statement",
                        None,
                    );
                }
                continue;
            }
            let frame = &self.client.rbuf[*pos..*pos + header.frame_len];
            let pooled = if self.tx_mode {
                self.server.as_mut()
            } else {
                None
            };
            match tag {
                b'Q' => {
                    if let Some((sql, _)) = cstr(&frame[5..]) {
                        // Most statements are plain DML: the quick check
                        // spares them the scans for DEALLOCATE and DISCARD,
                        // the UTF-8 check and the parser.
                        let interesting = tracking::interesting(sql);
                        if let Some(server) = pooled {
                            if interesting && mentions_deallocation(sql) {
                                forget_all(server);
                            }
                        }
                        if interesting {
                            if let Ok(sql) = std::str::from_utf8(sql) {
                                self.state.on_query(sql);
                            }
                        }
                        if self.tx != b'I' && lost::ends_transaction(sql) {
                            self.ending = Some(self.outstanding + 1);
                        }
                    }
                    self.outstanding += 1;
                    self.stmts.sent += 1;
                }
                b'F' => {
                    self.outstanding += 1;
                    self.stmts.sent += 1;
                }
                b'S' => {
                    self.outstanding += 1;
                    self.stmts.sent += 1;
                    self.open_batch = false;
                }
                b'P' => {
                    self.state.on_parse(frame);
                    if let Some((b"", rest)) = frame.get(5..).and_then(cstr) {
                        self.unnamed_ends =
                            cstr(rest).is_some_and(|(sql, _)| lost::ends_transaction(sql));
                    }
                    if let Some(server) = pooled {
                        forward.spill(&self.client.rbuf, &mut self.swbuf);
                        self.stmts.on_parse(server, &mut self.swbuf, frame);
                    }
                    self.open_batch = true;
                }
                b'C' => {
                    self.state.on_close(&frame[5..]);
                    if let Some(server) = pooled {
                        self.stmts.on_close(server, &frame[5..]);
                    }
                    self.open_batch = true;
                }
                b'B' => {
                    if self.tx != b'I'
                        && binds_an_ending(&self.state, self.unnamed_ends, &frame[5..])
                    {
                        // Its ReadyForQuery is the next Sync's.
                        self.ending = Some(self.outstanding + 1);
                    }
                    if let Some(server) = pooled {
                        if let Some((_portal, rest)) = cstr(&frame[5..]) {
                            if let Some((name, _)) = cstr(rest) {
                                forward.spill(&self.client.rbuf, &mut self.swbuf);
                                self.stmts
                                    .ensure(server, &mut self.swbuf, &self.state, name);
                            }
                        }
                    }
                    self.open_batch = true;
                }
                b'D' => {
                    if let Some(server) = pooled {
                        if let [b'S', rest @ ..] = &frame[5..] {
                            if let Some((name, _)) = cstr(rest) {
                                forward.spill(&self.client.rbuf, &mut self.swbuf);
                                self.stmts
                                    .ensure(server, &mut self.swbuf, &self.state, name);
                            }
                        }
                    }
                    self.open_batch = true;
                }
                b'E' => self.open_batch = true,
                _ => {}
            }
            forward.pass(&self.client.rbuf, &mut self.swbuf, *pos, header.frame_len);
            *pos += header.frame_len;
        }
    }

    /// Forwards what the server sent, watching the messages the router tracks.
    fn on_server_bytes(&mut self) -> Result<(), Ended> {
        let mut fatal: Option<String> = None;
        {
            let Some(server) = self.server.as_mut() else {
                return Ok(());
            };
            let buf = &mut server.buf;
            let out = &mut self.client.wbuf;
            let mut forward = Forward::default();
            // Bytes of `buf` looked at so far.
            let mut pos = 0;
            loop {
                if self.partial > 0 {
                    let n = self.partial.min(buf.len() - pos);
                    if n == 0 {
                        break;
                    }
                    forward.pass(buf, out, pos, n);
                    pos += n;
                    self.partial -= n;
                    continue;
                }
                let header = match frame::peek_header(&buf[pos..], usize::MAX) {
                    Ok(Some(h)) => h,
                    Ok(None) => break,
                    Err(e) => {
                        fatal = Some(format!("the server broke the protocol: {e}"));
                        break;
                    }
                };
                let complete = buf.len() - pos >= header.frame_len;
                match header.tag {
                    b'1' | b'3' => {
                        if !complete {
                            break;
                        }
                        let queue = if header.tag == b'1' {
                            &mut self.stmts.parses
                        } else {
                            &mut self.stmts.closes
                        };
                        let swallow = queue.pop_front().is_some_and(|(_, s)| s);
                        if swallow {
                            forward.spill(buf, out);
                        } else {
                            forward.pass(buf, out, pos, header.frame_len);
                        }
                        pos += header.frame_len;
                    }
                    b'Z' | b'E' | b'S' | b'C' => {
                        if !complete {
                            break;
                        }
                        let body = &buf[pos + 5..pos + header.frame_len];
                        match header.tag {
                            b'Z' => {
                                let Some(&status) = body.first() else {
                                    fatal = Some("malformed ReadyForQuery from the server".into());
                                    break;
                                };
                                self.tx = status;
                                self.ending = self
                                    .ending
                                    .and_then(|n| n.checked_sub(1))
                                    .filter(|n| *n > 0);
                                self.outstanding = self.outstanding.saturating_sub(1);
                                self.state.on_ready(status);
                                self.stmts.on_ready(self.outstanding == 0 && status == b'I');
                            }
                            b'E' => {
                                let fields = parse_error(body);
                                if fields.is_fatal() {
                                    fatal = Some(format!(
                                        "the server ended the session: {}",
                                        fields.message
                                    ));
                                    // Consumed, not forwarded: the loss is reported instead.
                                    forward.spill(buf, out);
                                    pos += header.frame_len;
                                    break;
                                }
                                self.state.on_error();
                                self.stmts.on_error_in(&mut server.prepared);
                            }
                            b'S' => {
                                if let Some((name, value)) = parse_parameter_status(body) {
                                    set_shared_param(&mut self.known, name, value);
                                    if SETTABLE.contains(&name) {
                                        set_param(&mut self.changed, name, value);
                                    }
                                    set_shared_param(&mut server.params, name, value);
                                }
                            }
                            _ => {
                                if let Some((tag, _)) = cstr(body) {
                                    self.state.on_command_complete(tag);
                                }
                            }
                        }
                        forward.pass(buf, out, pos, header.frame_len);
                        pos += header.frame_len;
                    }
                    _ => {
                        // Rows and the rest are not looked into: forwarded as
                        // they arrive, even a frame split across reads.
                        let n = header.frame_len.min(buf.len() - pos);
                        forward.pass(buf, out, pos, n);
                        pos += n;
                        self.partial = header.frame_len - n;
                    }
                }
            }
            forward.finish(buf, out, pos);
        }
        match fatal {
            Some(reason) => self.server_lost(&reason),
            None => Ok(()),
        }
    }

    /// The server connection is gone: fail what was in flight (SQLSTATE 08006),
    /// and let the client carry on.
    fn server_lost(&mut self, reason: &str) -> Result<(), Ended> {
        self.server_gone(Loss::Lost(reason))
    }

    /// Drops the server connection (closing it rolls back an open transaction
    /// on the server), fails what was in flight, and lets the client carry on.
    fn server_gone(&mut self, loss: Loss<'_>) -> Result<(), Ended> {
        let Some(server) = self.server.take() else {
            return Ok(());
        };
        self.cancel.set_target(None);
        self.busy = None;
        self.stmts.reset();
        if self.partial > 0 {
            // The client holds half a message: its framing cannot be recovered.
            tracing::info!(
                reason = match loss {
                    Loss::Lost(reason) => reason,
                    Loss::Switchover => "switchover drain timeout",
                    Loss::PrimaryChanged { .. } => "the primary changed",
                },
                "server connection dropped in the middle of a message; closing the client"
            );
            return Err(Ended);
        }
        let ending = self.ending.take().is_some();
        let in_tx = self.tx != b'I' && !ending;
        let statement = self.outstanding > 0 || self.open_batch;
        let (code, message, hint) = match loss {
            Loss::Lost(reason) => {
                let message = match (in_tx, statement) {
                    _ if ending => format!("lost the connection to the primary while ending the transaction ({reason}); if that was a COMMIT, it may or may not have completed"),
                    (true, false) => format!("lost the connection to the primary during the transaction ({reason}); the transaction was rolled back"),
                    (true, true) => format!("lost the connection to the primary during the transaction ({reason}); the transaction was rolled back, unless the statement in flight was its COMMIT, which may or may not have completed"),
                    (false, _) => format!("lost the connection to the primary during the statement ({reason}); it may or may not have completed"),
                };
                tracing::info!(server = %server.addr, reason, in_tx, outstanding = self.outstanding, "server connection lost");
                // The idle connections to the same server are likely gone too.
                drop(self.shared.pools.discard_epoch(server.epoch));
                (
                    sqlstate::CONNECTION_FAILURE,
                    message,
                    "The session is still usable: the next statement runs on the current primary.",
                )
            }
            Loss::Switchover => {
                let ms = self.shared.runtime.load().config.router.drain_timeout_ms;
                let message = match (in_tx, statement) {
                    _ if ending => format!("a switchover interrupted the end of this transaction: it was still running after router.drain_timeout_ms ({ms} ms); if it was a COMMIT, it may or may not have completed"),
                    (true, false) => format!("a switchover interrupted this transaction: it was still open after router.drain_timeout_ms ({ms} ms), and it was rolled back"),
                    (true, true) => format!("a switchover interrupted this transaction: it was still open after router.drain_timeout_ms ({ms} ms); it was rolled back, unless the statement in flight was its COMMIT, which may or may not have completed"),
                    (false, _) => format!("a switchover interrupted this statement: it was still running after router.drain_timeout_ms ({ms} ms), and it may or may not have completed"),
                };
                tracing::info!(server = %server.addr, in_tx, outstanding = self.outstanding, "switchover drain: cutting the session's transaction on the old primary");
                (
                    sqlstate::ADMIN_SHUTDOWN,
                    message,
                    "The session is still usable: the next statement waits for the new primary and runs there.",
                )
            }
            Loss::PrimaryChanged { from, to } => {
                let message = match (in_tx, statement) {
                    _ if ending => format!("the primary changed (epoch {from} to {to}) while this transaction was ending on the old primary, which did not answer; if it was a COMMIT, it may or may not have completed"),
                    (true, false) => format!("the primary changed (epoch {from} to {to}) during this transaction; the transaction was rolled back"),
                    (true, true) => format!("the primary changed (epoch {from} to {to}) during this transaction, while a statement was running on the old primary, which did not answer; the transaction was rolled back, unless that statement was its COMMIT, which may or may not have completed"),
                    (false, _) => format!("the primary changed (epoch {from} to {to}) while this statement was running on the old primary, which did not answer; it may or may not have completed"),
                };
                tracing::info!(server = %server.addr, from, to, in_tx, outstanding = self.outstanding, "the primary changed: giving up the session's statement on the old primary");
                (
                    sqlstate::CONNECTION_FAILURE,
                    message,
                    "The session is still usable: the next statement waits for the new primary and runs there.",
                )
            }
        };
        drop(server);
        self.state.discard_pending();
        let out = &mut self.client.wbuf;
        if in_tx {
            // The transaction is failed, as on a server after an error: the
            // client's statements are refused until it ends the transaction.
            let mut lost = LostTransaction::new(code, message);
            for _ in 0..self.outstanding {
                lost.error(out);
                backend::ready_for_query(out, b'E');
            }
            if self.open_batch {
                lost.error(out);
                lost.skip_to_sync();
            }
            self.lost = Some(lost);
            self.tx = b'E';
        } else {
            for _ in 0..self.outstanding {
                backend::error(out, Severity::Error, code, &message, Some(hint));
                backend::ready_for_query(out, b'I');
            }
            if self.open_batch {
                backend::error(out, Severity::Error, code, &message, Some(hint));
                self.skip_until_sync = true;
            }
            self.tx = b'I';
        }
        self.open_batch = false;
        self.outstanding = 0;
        Ok(())
    }

    /// Attaches a server connection to the current primary (see
    /// [`Session::attach`]) and marks the session busy on its epoch; if a
    /// switchover drain started in between, waits again.
    async fn attach_and_begin(&mut self) -> Result<(), AttachError> {
        // The common case, attached to the current primary and nothing
        // paused, needs neither a deadline nor the slow path's subscriptions
        // (`begin` allows only the current epoch of a writable primary).
        if let Some(server) = &self.server {
            if let Some(busy) = self.shared.routing.begin(server.epoch) {
                self.busy = Some(busy);
                return Ok(());
            }
        } else if self.tx_mode && self.take_ready() {
            return Ok(());
        }
        let deadline = Instant::now() + self.shared.runtime.load().config.pause_timeout();
        loop {
            self.attach(deadline).await?;
            let Some(server) = &self.server else {
                return Ok(());
            };
            if let Some(busy) = self.shared.routing.begin(server.epoch) {
                self.busy = Some(busy);
                return Ok(());
            }
        }
    }

    /// Transaction mode, between transactions: takes the pool's most recently
    /// returned connection when it is to the current primary and in step
    /// with what the client was told (nothing to set or report), and begins
    /// the transaction on it, without the slow path's deadline, subscription
    /// and checkout machinery. False leaves everything to the slow path.
    fn take_ready(&mut self) -> bool {
        let Some(id) = self.pool else {
            return false;
        };
        let Some(conn) = self.shared.pools.take_ready(&self.shared, id, &self.login) else {
            return false;
        };
        let busy = if Arc::ptr_eq(&self.known, &conn.params) {
            self.shared.routing.begin(conn.epoch)
        } else {
            None
        };
        let Some(busy) = busy else {
            if let Some(conn) = self.shared.pools.checkin(&self.shared, conn) {
                tokio::spawn(conn.terminate());
            }
            return false;
        };
        self.busy = Some(busy);
        self.stmts.reset();
        self.cancel.set_target(Some(conn.cancel_target()));
        self.server = Some(conn);
        self.had_server = true;
        self.tx = b'I';
        true
    }

    /// Makes sure a server connection to the current primary is attached, at a
    /// transaction boundary: waits while paused (up to the pause timeout), moves
    /// the session when the primary changed, and restores it.
    async fn attach(&mut self, deadline: Instant) -> Result<(), AttachError> {
        let rt = self.shared.runtime.load_full();
        let pause = rt.config.pause_timeout();
        let mut changes = self.shared.routing.subscribe();
        let mut last_error: Option<String> = None;
        let mut waited = false;
        loop {
            let routing = self.shared.routing.load();
            if let Some(server) = &self.server {
                match routing.target_epoch() {
                    Some(epoch) if epoch == server.epoch => {
                        if waited {
                            tracing::info!(epoch, "resumed on the same primary");
                        }
                        return Ok(());
                    }
                    Some(_) => {
                        if let Some(server) = self.server.take() {
                            tracing::info!(old = %server.addr, "primary moved; re-attaching the session");
                            self.cancel.set_target(None);
                            server.terminate().await;
                        }
                    }
                    None => {}
                }
            }
            let target = routing.target();
            if self.server.is_none() {
                if let Some(target) = &target {
                    if self.had_server && !self.tx_mode {
                        if let Some(sticky) = self.state.sticky() {
                            return Err(AttachError::StateLost(format!(
                                "the primary changed and this session's {} cannot move to the new primary",
                                sticky.describe()
                            )));
                        }
                    }
                    let connect_timeout = rt.config.connect_timeout().min(
                        deadline
                            .saturating_duration_since(Instant::now())
                            .max(Duration::from_millis(100)),
                    );
                    match self
                        .shared
                        .pools
                        .checkout(
                            &self.shared,
                            target,
                            &self.login,
                            self.pool,
                            connect_timeout,
                            Some(deadline),
                        )
                        .await
                    {
                        Ok(conn) => {
                            if !self.tx_mode {
                                self.shared.remember_params(&conn.params);
                            }
                            self.stmts.reset();
                            self.pool = conn.pool;
                            self.server = Some(conn);
                            self.restore().await?;
                            return Ok(());
                        }
                        Err(CheckoutError::Full { size }) => {
                            return Err(AttachError::PoolFull(format!(
                                "all {size} server connections of the pool of user \"{}\" and database \"{}\" stayed in use for {} ms (pool.pool_size, router.pause_timeout_ms)",
                                self.login.user,
                                self.login.database,
                                pause.as_millis()
                            )))
                        }
                        Err(CheckoutError::Server(ServerError::Refused(fields)))
                            if !["57", "53", "08"]
                                .iter()
                                .any(|c| fields.code.starts_with(c)) =>
                        {
                            return Err(AttachError::Refused(fields))
                        }
                        Err(CheckoutError::Server(e)) => {
                            tracing::info!(server = %format!("{}:{}", target.host, target.port), error = %e, "cannot connect to the primary; retrying until the pause timeout");
                            last_error = Some(format!("{}:{}: {e}", target.host, target.port));
                        }
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline {
                let rt_formation = &rt.config.router.formation;
                let mut message = format!(
                    "no primary is available for formation \"{rt_formation}\": waited {} ms for a writable primary",
                    pause.as_millis()
                );
                if let Some(e) = last_error {
                    message.push_str(&format!(" (last attempt: {e})"));
                }
                return Err(AttachError::NoPrimary(message));
            }
            if !waited {
                waited = true;
                tracing::info!(
                    epoch = routing.epoch,
                    "paused: waiting for a writable primary"
                );
            }
            let wake = if target.is_some() {
                (now + RETRY_DELAY).min(deadline)
            } else {
                deadline
            };
            tokio::select! {
                _ = self.kill.cancelled() => return Err(AttachError::Stopping),
                _ = changes.changed() => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// Restores the session on a fresh server connection: replays SETs,
    /// set_config changes and named prepared statements, then tells the client
    /// about every parameter that differs from what it knew.
    async fn restore(&mut self) -> Result<(), AttachError> {
        let Some(server) = self.server.as_mut() else {
            return Ok(());
        };
        let lost = |what: &str, e: ServerError| {
            AttachError::StateLost(format!(
                "the primary changed and this session's {what} could not be restored on the new primary: {e}"
            ))
        };
        // The client was told exactly this connection's settings (in
        // transaction mode the rule: the pool's connections share one list,
        // see `Shared::shared_params`): nothing to set and nothing to report.
        if self.tx_mode && !Arc::ptr_eq(&self.known, &server.params) {
            // Reported settings the client has and this connection does not
            // (another client changed them here): set them as the client has them.
            let mut fixes = String::new();
            for (name, value) in self.known.iter() {
                if SETTABLE.contains(&name.as_str())
                    && server.param(name).is_some_and(|v| v != value)
                {
                    fixes.push_str(&format!(
                        "SELECT set_config({}, {}, false);",
                        postgres_protocol::escape::escape_literal(name),
                        postgres_protocol::escape::escape_literal(value)
                    ));
                }
            }
            if !fixes.is_empty() {
                server
                    .simple_query(&fixes)
                    .await
                    .map_err(|e| lost("settings", e))?;
            }
        } else if !self.tx_mode && self.had_server {
            let sets: Vec<&str> = self.state.sets().collect();
            if !sets.is_empty() {
                server
                    .simple_query(&sets.join("; "))
                    .await
                    .map_err(|e| lost("settings", e))?;
            }
            let mut fixes = String::new();
            for (name, value) in &self.changed {
                if server.param(name) != Some(value.as_str()) {
                    fixes.push_str(&format!(
                        "SELECT set_config({}, {}, false);",
                        postgres_protocol::escape::escape_literal(name),
                        postgres_protocol::escape::escape_literal(value)
                    ));
                }
            }
            if !fixes.is_empty() {
                server
                    .simple_query(&fixes)
                    .await
                    .map_err(|e| lost("settings", e))?;
            }
            let frames = self.state.prepared_frames();
            if !frames.is_empty() {
                server
                    .replay(&frames)
                    .await
                    .map_err(|e| lost("prepared statements", e))?;
            }
        }
        // Asked again: the SETs replayed above may have changed the
        // connection's settings.
        if !Arc::ptr_eq(&self.known, &server.params) {
            for (name, value) in server.params.iter() {
                if self.known.iter().any(|(k, v)| k == name && v == value) {
                    continue;
                }
                backend::parameter_status(&mut self.client.wbuf, name, value);
                set_shared_param(&mut self.known, name, value);
            }
            // In step again: the client and the connection share the
            // router's list for these values, so that the next restore on
            // this connection or another one like it is quick.
            if same_params(&self.known, &server.params) {
                let shared = self.shared.shared_params(&server.params);
                server.params = shared.clone();
                self.known = shared;
            }
        }
        self.cancel.set_target(Some(server.cancel_target()));
        self.had_server = true;
        self.tx = b'I';
        Ok(())
    }
}

/// Gives a server connection back to the pool at the end of a client
/// session; with `reset`, after `DISCARD ALL`. A connection that cannot be
/// reset or kept is closed.
async fn give_back(shared: &Shared, mut server: ServerConn, reset: bool) {
    if reset {
        let timeout = shared.runtime.load().config.connect_timeout();
        match tokio::time::timeout(timeout, server.simple_query("DISCARD ALL")).await {
            Ok(Ok(_)) => server.prepared.clear(),
            _ => {
                server.terminate().await;
                return;
            }
        }
    }
    if let Some(conn) = shared.pools.checkin(shared, server) {
        conn.terminate().await;
    }
}

/// The next cut ordered on `cuts`, and the receiver to wait for the one after.
async fn next_cut(
    mut cuts: watch::Receiver<(u64, Option<Cut>)>,
) -> (Cut, watch::Receiver<(u64, Option<Cut>)>) {
    loop {
        if cuts.changed().await.is_err() {
            // The routing table is gone: no cut will ever come.
            std::future::pending::<()>().await;
        }
        let order = cuts.borrow_and_update().1;
        if let Some(cut) = order {
            return (cut, cuts);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(s: &[u8]) -> BytesMut {
        BytesMut::from(s)
    }

    #[test]
    fn a_read_forwarded_whole_trades_buffers_without_copying() {
        let mut buf = bytes(b"aaaabbbbcc");
        let data = buf.as_ptr();
        let mut out = BytesMut::with_capacity(64);
        let mut forward = Forward::default();
        forward.pass(&buf, &mut out, 0, 4);
        forward.pass(&buf, &mut out, 4, 4);
        // "cc" is the start of a message not complete yet.
        forward.finish(&mut buf, &mut out, 8);
        assert_eq!(&out[..], b"aaaabbbb");
        assert_eq!(out.as_ptr(), data, "the bytes were copied");
        assert_eq!(&buf[..], b"cc");
    }

    #[test]
    fn a_swallowed_message_breaks_the_run_and_the_rest_is_copied() {
        let mut buf = bytes(b"aaaaXXXXbbbb");
        let mut out = BytesMut::new();
        let mut forward = Forward::default();
        forward.pass(&buf, &mut out, 0, 4);
        forward.spill(&buf, &mut out);
        forward.pass(&buf, &mut out, 8, 4);
        forward.finish(&mut buf, &mut out, 12);
        assert_eq!(&out[..], b"aaaabbbb");
        assert!(buf.is_empty());
    }

    #[test]
    fn pending_output_keeps_its_place_in_front() {
        let mut buf = bytes(b"aaaabb");
        let mut out = bytes(b"Z");
        let mut forward = Forward::default();
        forward.pass(&buf, &mut out, 0, 4);
        forward.finish(&mut buf, &mut out, 4);
        assert_eq!(&out[..], b"Zaaaa");
        assert_eq!(&buf[..], b"bb");
    }

    #[test]
    fn a_stretch_after_a_swallowed_message_is_forwarded_in_place() {
        let mut buf = bytes(b"XXXXaaaabbbbcc");
        let data = buf.as_ptr();
        let mut out = BytesMut::new();
        let mut forward = Forward::default();
        forward.pass(&buf, &mut out, 4, 4);
        forward.pass(&buf, &mut out, 8, 4);
        forward.finish(&mut buf, &mut out, 12);
        assert_eq!(&out[..], b"aaaabbbb");
        assert_eq!(out.as_ptr(), data.wrapping_add(4), "the bytes were copied");
        assert_eq!(&buf[..], b"cc");
    }

    #[test]
    fn what_the_router_writes_itself_goes_after_the_stretch() {
        let mut buf = bytes(b"aaaabbbb");
        let mut out = BytesMut::new();
        let mut forward = Forward::default();
        forward.pass(&buf, &mut out, 0, 4);
        forward.spill(&buf, &mut out);
        out.extend_from_slice(b"P");
        forward.pass(&buf, &mut out, 4, 4);
        forward.finish(&mut buf, &mut out, 8);
        assert_eq!(&out[..], b"aaaaPbbbb");
        assert!(buf.is_empty());
    }

    #[test]
    fn nothing_forwarded_leaves_both_buffers_alone() {
        let mut buf = bytes(b"XXXXbb");
        let mut out = BytesMut::new();
        let mut forward = Forward::default();
        forward.spill(&buf, &mut out);
        forward.finish(&mut buf, &mut out, 4);
        assert!(out.is_empty());
        assert_eq!(&buf[..], b"bb");
    }
}
