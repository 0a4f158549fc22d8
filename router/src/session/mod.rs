//! A client session after startup: the relay loop. Client and server
//! messages are forwarded as raw bytes, frame by frame (only the five-byte
//! header is looked at, plus the bodies of the few messages the router
//! tracks). ReadyForQuery's status byte marks transaction boundaries; only
//! there does the router pause (no writable primary), re-attach the client
//! to a new server connection (the primary moved), and restore its session.
//!
//! This file holds the loop and what it waits on; the rest of the session,
//! one responsibility per file:
//! * `from_client.rs`: the client's messages, forwarded or answered;
//! * `from_server.rs`: the server's messages, forwarded and watched;
//! * `tracker.rs`: where the session stands in the protocol (pure);
//! * `attach.rs`: attaching, handing back and restoring server connections;
//! * `loss.rs`: a server connection lost or cut, and what the client is told;
//! * `failed.rs`: the failed transaction the router answers for after a loss;
//! * `statements.rs`: named prepared statements in transaction mode;
//! * `forward.rs`: relaying without copying.

mod attach;
mod failed;
mod forward;
mod from_client;
mod from_server;
mod loss;
mod read;
mod statements;
mod tracker;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use hapg_config::router::PoolMode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use self::attach::give_back;
use self::failed::LostTransaction;
use self::loss::Loss;
use self::statements::Statements;
use self::tracker::Tracker;
use crate::cancel::CancelKey;
use crate::client::{ClientConn, Ended};
use crate::client_error::{ClientError, Refusal};
use crate::gated::Gated;
use crate::net::{self, Stream};
use crate::params::Params;
use crate::routing::{Busy, Cut, CutReason, Pinned};
use crate::server::{Login, ServerConn};
use crate::shared::Shared;
use crate::slots::PoolId;
use crate::startup::Ready;
use crate::stats::clients::Registered;
use crate::stats::Tally;
use crate::tracking::{LargeSql, SessionState};

/// How long the answers the server still owes may take to reach a client
/// whose session is over.
const FINAL_FLUSH: Duration = Duration::from_secs(10);

/// The client sent all it will send: at end of file, at Terminate, or at a
/// message the router refuses. As Postgres answers every message before it
/// reads the next, the session ends only after the server has answered the
/// messages that came before, and the client gets those answers first.
struct Closing {
    /// The refusal that ends the session after them, if any.
    fatal: Option<Refusal>,
}

/// One client session in the relay phase.
pub(crate) struct Session {
    shared: Arc<Shared>,
    client: ClientConn,
    server: Option<Box<ServerConn>>,
    /// Bytes to send to the server.
    swbuf: BytesMut,
    login: Login,
    /// ParameterStatus values the client has seen.
    known: Params,
    /// Settable parameters the client changed during the session (from ParameterStatus).
    changed: Vec<(String, String)>,
    state: SessionState,
    /// Where the session stands in the protocol.
    proto: Tracker,
    /// The server connection was lost (or cut) during a transaction: the
    /// router answers for the failed transaction until the client ends it.
    failed: Option<LostTransaction>,
    /// Set while the session has a statement or transaction open on its
    /// server: what a switchover drain waits for.
    busy: Option<Busy>,
    /// Cut orders: of switchover drains, and of new epochs.
    cuts: watch::Receiver<(u64, Option<Cut>)>,
    /// The rest of the client message being streamed goes nowhere.
    client_discard: bool,
    /// The statement text of a large Query or Parse being streamed.
    large_sql: Option<LargeSql>,
    /// Set while the session holds state that cannot move on its server
    /// (session mode): a new epoch then reaches it even while idle.
    pinned: Option<Pinned>,
    /// The client will send nothing more: the session ends once the server
    /// has answered what it was sent.
    closing: Option<Closing>,
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
    /// This client in the registry (`SHOW CLIENTS`, `KILL_CLIENT`).
    registered: Registered,
    /// Counts not yet added to the router's totals.
    tally: Tally,
    /// Set on the read-only port: the standby the session is on.
    read: Option<read::ReadState>,
    /// The database the client logged in to: its totals, its `PAUSE db`.
    db: Arc<crate::stats::Database>,
}

async fn read_server(server: &mut Option<Box<ServerConn>>) -> std::io::Result<usize> {
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

/// Sleeps until `at`; never without one.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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

impl Session {
    pub fn new(
        shared: Arc<Shared>,
        client: ClientConn,
        ready: Ready,
        registered: Registered,
        shutdown: CancellationToken,
        kill: CancellationToken,
    ) -> Session {
        let db = shared.databases.get(&ready.login.database);
        let tally = Tally::new(shared.runtime.load().counting, db.clone());
        let had_server = ready.server.is_some();
        if let Some(server) = &ready.server {
            server.set_link(registered.entry.id);
        }
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
            proto: Tracker::default(),
            failed: None,
            busy: None,
            cuts,
            client_discard: false,
            large_sql: None,
            pinned: None,
            closing: None,
            had_server,
            pool,
            tx_mode,
            stmts: Statements::default(),
            cancel: ready.cancel,
            shutdown,
            kill,
            registered,
            tally,
            read: None,
            db,
        }
    }

    /// Relays until the client leaves or the router stops.
    pub async fn run(mut self) {
        let _ = self.relay().await;
        self.tally.flush();
        // What the client is still owed (a FATAL written last, answers
        // taken in before its end of file) goes out before the close.
        if !self.client.wbuf.is_empty() {
            let _ = tokio::time::timeout(FINAL_FLUSH, self.client.flush()).await;
            let _ = self.client.stream.shutdown().await;
        }
        self.pinned = None;
        if let Some(server) = self.server.take() {
            self.cancel.set_target(None);
            if self.proto.reusable() && self.swbuf.is_empty() {
                if let Some(server) = give_back(&self.shared, server, !self.tx_mode).await {
                    if let Some(conn) = self.checkin(server) {
                        conn.terminate().await;
                    }
                }
            } else {
                server.terminate().await;
            }
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
        // A read-only port session wakes when its standby leaves the read pool.
        let mut pool_change = Gated::new(read::next_pool_change(
            self.read
                .as_ref()
                .map(|_| self.shared.read_pool.subscribe()),
        ));
        let mut left_deadline: read::LeftDeadline = None;
        loop {
            self.sync_busy();
            if self.closing.is_none() {
                self.on_client_bytes().await?;
                if self.closing.is_some() {
                    // What follows the end is never read.
                    self.client.rbuf.clear();
                }
            }
            self.flush_server().await?;
            self.client.flush().await?;
            self.sync_busy();
            if self.tx_mode
                && self.server.is_some()
                && self.proto.reusable()
                && self.swbuf.is_empty()
            {
                self.release();
            }
            if self.closing.is_some() && self.owed_nothing() {
                return Err(self.close().await);
            }
            if self.read.is_some() {
                self.follow_read_pool(&mut left_deadline).await?;
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
                r = read_server(&mut self.server) => {
                    if let Ok(n) = r {
                        self.tally.sent(n);
                    }
                    self.on_server_read(r)?
                }
                (order, cuts) = &mut cut => {
                    cut = Gated::new(next_cut(cuts));
                    self.on_cut(order)?;
                }
                changes = &mut pool_change, if self.read.is_some() => {
                    // Looked at by `follow_read_pool` at the top of the loop.
                    pool_change = Gated::new(read::next_pool_change(changes));
                }
                () = sleep_until_some(left_deadline), if left_deadline.is_some() => {}
                r = read_client(&mut self.client.stream, &mut self.client.rbuf), if self.closing.is_none() => {
                    match r {
                        Ok(n) if n > 0 => self.tally.received(n),
                        // Half-closed (or closed): what was sent before is
                        // still answered, as Postgres answers it.
                        Ok(_) => self.close_after_answers(None),
                        Err(_) => return Err(Ended),
                    }
                }
            }
        }
    }

    /// No server connection, or one with nothing open or half-relayed on it.
    #[inline]
    fn idle(&self) -> bool {
        self.server.is_none() || self.proto.idle()
    }

    /// Nothing more is to come from the server for what it was sent.
    #[inline]
    fn owed_nothing(&self) -> bool {
        self.server.is_none() || self.proto.owed_nothing()
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

    /// The client sent all it will send (see [`Closing`]).
    fn close_after_answers(&mut self, fatal: Option<Refusal>) {
        self.closing = Some(Closing { fatal });
        if self.proto.client_rest() > 0 {
            // The server has half a message it will never get the rest of:
            // what it owes cannot come.
            self.proto.client_abandoned();
            self.large_sql = None;
            if let Some(server) = self.server.take() {
                self.cancel.set_target(None);
                self.busy = None;
                self.pinned = None;
                tokio::spawn(server.terminate());
            }
        }
    }

    /// Ends a closing session: the FATAL it ends with, if any.
    async fn close(&mut self) -> Ended {
        let fatal = self.closing.take().and_then(|c| c.fatal);
        match fatal {
            Some(r) if r.drain() => self.client.refuse(r.into()).await,
            Some(r) => self.client.end_with(r.into()).await,
            None => Ended,
        }
    }

    async fn stopping(&mut self) -> Ended {
        self.client.end_with(ClientError::stopping()).await
    }

    /// Session mode: a session holding state that cannot move is marked on
    /// its server's epoch, so that a new epoch reaches it even while idle.
    fn pin_if_sticky(&mut self) {
        if self.pinned.is_none() && !self.tx_mode && self.state.sticky().is_some() {
            if let Some(server) = &self.server {
                self.pinned = Some(self.routing().pin(server.epoch));
            }
        }
    }

    /// Ends the busy mark once the session is back at a transaction boundary
    /// (or has no server any more).
    #[inline]
    fn sync_busy(&mut self) {
        if self.busy.is_some() && (self.server.is_none() || self.proto.at_boundary()) {
            self.busy = None;
        }
        if self.tally.on {
            let owing = self.server.is_some() && !self.proto.owed_nothing();
            self.tally
                .step(&self.shared.stats, self.busy.is_some(), owing);
        }
    }

    /// A switchover drain ran out of time, or the primary changed: cut what
    /// this session still has open on the server the order names.
    fn on_cut(&mut self, order: Cut) -> Result<(), Ended> {
        let busy = self
            .busy
            .as_ref()
            .map(Busy::epoch)
            .filter(|e| order.applies_to(*e));
        // Idle on the old primary with state that cannot move: the session
        // ends now rather than wait there unaware (a LISTEN would never hear
        // anything again).
        let pinned = || {
            let server = self.server.as_ref()?;
            let stuck = self.pinned.is_some()
                && self.state.sticky().is_some()
                && matches!(order.reason, CutReason::PrimaryChanged { .. })
                && order.applies_to(server.epoch);
            stuck.then_some(server.epoch)
        };
        let Some(from) = busy.or_else(pinned) else {
            if self.state.sticky().is_none() {
                self.pinned = None;
            }
            return Ok(());
        };
        match order.reason {
            CutReason::DrainTimeout => {
                let drain_ms = self.shared.runtime.load().config.router.drain_timeout_ms;
                self.server_gone(Loss::Switchover { drain_ms })
            }
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
}
