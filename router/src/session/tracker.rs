//! The protocol tracker: where a session stands in the v3 protocol, as a
//! pure state machine. The relay tells it each client message it forwards
//! (a [`ClientMsg`]: the type, plus the one fact some types need, read from
//! a few bytes of the body) and each ReadyForQuery the server sends; the
//! tracker says how many answers are outstanding, whether the session is at
//! a transaction boundary (where the router may pause, move or hand back
//! the server connection), and the transaction status. It also holds what
//! the router does in Postgres' place: skipping the rest of a failed batch
//! up to its Sync, and what was in flight when a server connection was lost.
//!
//! The rules, one per row of the table tests below:
//! * Query, FunctionCall and Sync are each answered by one ReadyForQuery;
//!   anything sent and not yet answered is outstanding.
//! * Parse, Bind, Describe, Execute and Close open a batch that only a Sync
//!   closes (Flush does not); a session with an open batch is not at a
//!   boundary even with nothing outstanding.
//! * The transaction status is ReadyForQuery's: a session in a transaction
//!   block (`T`) or a failed one (`E`) is not at a boundary.
//! * A statement that ends the transaction (COMMIT, ROLLBACK, ...) sent in a
//!   transaction marks the ReadyForQuery that answers it (the next Sync's,
//!   for a Bind): if the server connection is lost before it arrives, the
//!   transaction is over either way.
//! * Pipelined messages are counted; each ReadyForQuery answers the oldest.
//! * COPY data (CopyData, CopyDone, CopyFail) and Flush are answered by
//!   nothing of their own: COPY is inside its Query's answer.
//! * A batch the router fails itself (no primary, ...) is answered as
//!   Postgres answers a failed batch: ReadyForQuery at once for a Query,
//!   FunctionCall or Sync; otherwise the rest of the batch is skipped up to
//!   its Sync, which gets the ReadyForQuery.
//! * A server message or a client message streamed in pieces (large ones)
//!   keeps the session off a boundary until its last byte has passed.
//! * A lost server connection leaves the session idle, or in a failed
//!   transaction (the router then answers for it, see `failed.rs`), with
//!   nothing outstanding; a batch still open is skipped up to its Sync.

use crate::protocol::backend::TxStatus;
use crate::protocol::tag::frontend;

/// A client message, as far as the tracker needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientMsg {
    /// Query. `ends`: one statement that ends the transaction, sent in one
    /// (the relay only reads the text when [`Tracker::in_transaction`]).
    Query { ends: bool },
    /// FunctionCall.
    FunctionCall,
    /// Parse: of the unnamed statement (`Some(ends)`: whether its text ends
    /// a transaction), or of a named one (`None`).
    Parse { unnamed_ends: Option<bool> },
    /// Bind of the unnamed statement (`None`: as its Parse said), or of a
    /// named one (`Some(ends)`, told only in a transaction).
    Bind { named_ends: Option<bool> },
    /// Describe.
    Describe,
    /// Execute.
    Execute,
    /// Close.
    Close,
    /// Sync.
    Sync,
    /// Flush.
    Flush,
    /// CopyData, CopyDone or CopyFail.
    Copy,
}

impl ClientMsg {
    /// The message of type `tag`, with the facts read from its body at
    /// their defaults (the relay fills them in where they matter). `None`
    /// for Terminate and for types the protocol does not have.
    #[inline]
    pub fn of(tag: u8) -> Option<ClientMsg> {
        Some(match tag {
            frontend::QUERY => ClientMsg::Query { ends: false },
            frontend::FUNCTION_CALL => ClientMsg::FunctionCall,
            frontend::PARSE => ClientMsg::Parse { unnamed_ends: None },
            frontend::BIND => ClientMsg::Bind {
                named_ends: Some(false),
            },
            frontend::DESCRIBE => ClientMsg::Describe,
            frontend::EXECUTE => ClientMsg::Execute,
            frontend::CLOSE => ClientMsg::Close,
            frontend::SYNC => ClientMsg::Sync,
            frontend::FLUSH => ClientMsg::Flush,
            frontend::COPY_DATA | frontend::COPY_DONE | frontend::COPY_FAIL => ClientMsg::Copy,
            _ => return None,
        })
    }

    /// Whether Postgres lets the message be large (its
    /// `PQ_LARGE_MESSAGE_LIMIT` types): the router streams these.
    pub fn may_be_large(self) -> bool {
        !matches!(
            self,
            ClientMsg::Describe
                | ClientMsg::Execute
                | ClientMsg::Close
                | ClientMsg::Sync
                | ClientMsg::Flush
        )
    }

    /// Whether the message starts work on the server (what needs a server
    /// connection attached at a boundary).
    pub fn starts_work(self) -> bool {
        !matches!(self, ClientMsg::Flush | ClientMsg::Copy)
    }

    /// Whether the server answers the message with a ReadyForQuery.
    pub fn brings_ready(self) -> bool {
        matches!(
            self,
            ClientMsg::Query { .. } | ClientMsg::FunctionCall | ClientMsg::Sync
        )
    }
}

/// What was in flight on a server connection when it was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InFlight {
    /// In a transaction block that was not ending.
    pub in_tx: bool,
    /// A statement was running (answers outstanding or a batch open).
    pub statement: bool,
    /// A statement that ends the transaction was in flight.
    pub ending: bool,
    /// ReadyForQuery messages the client is still owed.
    pub outstanding: u32,
    /// An extended-protocol batch was open (not yet closed by its Sync).
    pub open_batch: bool,
}

/// Where a session stands in the protocol (see the module's rules).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Tracker {
    /// Transaction status from the last ReadyForQuery.
    tx: TxStatus,
    /// Queries, FunctionCalls and Syncs forwarded and not yet answered.
    outstanding: u32,
    /// Extended-protocol messages forwarded since the last Sync.
    open_batch: bool,
    /// After a batch the router failed: drop client messages until Sync.
    skip_until_sync: bool,
    /// A statement that ends the transaction is in flight: the number of
    /// ReadyForQuery still to come up to its own.
    ending: Option<u32>,
    /// The unnamed statement last parsed ends a transaction.
    unnamed_ends: bool,
    /// Bytes of a server message being streamed to the client still to come.
    server_rest: usize,
    /// Bytes of a large client message being streamed (or discarded) still
    /// to come.
    client_rest: usize,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            tx: TxStatus::Idle,
            outstanding: 0,
            open_batch: false,
            skip_until_sync: false,
            ending: None,
            unnamed_ends: false,
            server_rest: 0,
            client_rest: 0,
        }
    }
}

impl Tracker {
    /// The transaction status as the client was last told it.
    #[cfg(test)]
    pub fn tx(&self) -> TxStatus {
        self.tx
    }

    /// In a transaction block (open or failed).
    #[inline]
    pub fn in_transaction(&self) -> bool {
        self.tx != TxStatus::Idle
    }

    /// ReadyForQuery messages the server still owes.
    #[cfg(test)]
    pub fn outstanding(&self) -> u32 {
        self.outstanding
    }

    /// At a transaction boundary: idle, nothing outstanding, no batch open.
    #[inline]
    pub fn at_boundary(&self) -> bool {
        self.tx == TxStatus::Idle && self.outstanding == 0 && !self.open_batch
    }

    /// At a boundary with no message half-relayed either way: the server
    /// connection may be handed back or the session moved.
    #[inline]
    pub fn idle(&self) -> bool {
        self.at_boundary() && self.server_rest == 0 && self.client_rest == 0
    }

    /// Nothing more is to come from the server for what it was sent.
    pub fn owed_nothing(&self) -> bool {
        self.outstanding == 0 && self.server_rest == 0
    }

    /// The connection can go back to a pool: idle, and not in the middle of
    /// skipping a failed batch.
    pub fn reusable(&self) -> bool {
        self.idle() && !self.skip_until_sync
    }

    /// The client's messages are being dropped up to the next Sync.
    #[inline]
    pub fn skipping(&self) -> bool {
        self.skip_until_sync
    }

    /// A client message forwarded to the server.
    #[inline]
    pub fn on_client(&mut self, msg: ClientMsg) {
        match msg {
            ClientMsg::Query { ends } => {
                if ends && self.in_transaction() {
                    self.ending = Some(self.outstanding + 1);
                }
                self.outstanding += 1;
            }
            ClientMsg::FunctionCall => self.outstanding += 1,
            ClientMsg::Sync => {
                self.outstanding += 1;
                self.open_batch = false;
            }
            ClientMsg::Parse { unnamed_ends } => {
                if let Some(ends) = unnamed_ends {
                    self.unnamed_ends = ends;
                }
                self.open_batch = true;
            }
            ClientMsg::Bind { named_ends } => {
                let ends = named_ends.unwrap_or(self.unnamed_ends);
                if ends && self.in_transaction() {
                    // Its ReadyForQuery is the next Sync's.
                    self.ending = Some(self.outstanding + 1);
                }
                self.open_batch = true;
            }
            ClientMsg::Describe | ClientMsg::Execute | ClientMsg::Close => {
                self.open_batch = true;
            }
            ClientMsg::Flush | ClientMsg::Copy => {}
        }
    }

    /// A ReadyForQuery from the server. True when it leaves the session idle
    /// on the server with nothing more to come.
    #[inline]
    pub fn on_ready(&mut self, status: TxStatus) -> bool {
        self.tx = status;
        self.ending = self
            .ending
            .and_then(|n| n.checked_sub(1))
            .filter(|n| *n > 0);
        self.outstanding = self.outstanding.saturating_sub(1);
        self.outstanding == 0 && status == TxStatus::Idle
    }

    /// The router failed the client's message itself (nothing was sent to a
    /// server). True when ReadyForQuery is owed at once (a Query,
    /// FunctionCall or Sync); else the rest of the batch is skipped up to
    /// its Sync.
    pub fn on_refused(&mut self, msg: ClientMsg) -> bool {
        self.tx = TxStatus::Idle;
        if msg.brings_ready() {
            true
        } else {
            self.skip_until_sync = true;
            false
        }
    }

    /// A client message dropped while skipping. True at the Sync that ends
    /// the skipping: ReadyForQuery (idle) is owed.
    pub fn on_skipped(&mut self, msg: ClientMsg) -> bool {
        if msg == ClientMsg::Sync {
            self.skip_until_sync = false;
            true
        } else {
            false
        }
    }

    /// The server connection is gone: what was in flight, for the client's
    /// error. Afterwards nothing is outstanding; the session is in a failed
    /// transaction when one was open (and not ending), else idle, skipping
    /// the rest of an open batch.
    pub fn on_loss(&mut self) -> InFlight {
        let ending = self.ending.take().is_some();
        let in_tx = self.in_transaction() && !ending;
        let lost = InFlight {
            in_tx,
            statement: self.outstanding > 0 || self.open_batch,
            ending,
            outstanding: self.outstanding,
            open_batch: self.open_batch,
        };
        if in_tx {
            self.tx = TxStatus::Failed;
        } else {
            self.tx = TxStatus::Idle;
            if self.open_batch {
                self.skip_until_sync = true;
            }
        }
        self.open_batch = false;
        self.outstanding = 0;
        lost
    }

    /// The transaction is over (a lost transaction ended, or a fresh server
    /// connection was attached at a boundary).
    pub fn on_idle(&mut self) {
        self.tx = TxStatus::Idle;
    }

    /// A server message of `len` bytes of which `got` have arrived: the rest
    /// is streamed as it comes.
    #[inline]
    pub fn server_streaming(&mut self, len: usize, got: usize) {
        self.server_rest = len - got;
    }

    /// Bytes of the server message being streamed still to come.
    #[inline]
    pub fn server_rest(&self) -> usize {
        self.server_rest
    }

    /// `n` more bytes of the server message being streamed have passed.
    #[inline]
    pub fn server_passed(&mut self, n: usize) {
        self.server_rest -= n;
    }

    /// The server message being streamed will never end (its connection is gone).
    pub fn server_streaming_mid_message(&self) -> bool {
        self.server_rest > 0
    }

    /// Bytes of the client message being streamed (or discarded) still to come.
    #[inline]
    pub fn client_rest(&self) -> usize {
        self.client_rest
    }

    /// A client message of which `more` bytes are still to come.
    pub fn client_streaming(&mut self, more: usize) {
        self.client_rest = more;
    }

    /// `n` more bytes of the client message being streamed have passed. True
    /// at its last byte.
    #[inline]
    pub fn client_passed(&mut self, n: usize) -> bool {
        self.client_rest -= n;
        self.client_rest == 0
    }

    /// The client message being streamed is abandoned (the session closes).
    pub fn client_abandoned(&mut self) {
        self.client_rest = 0;
    }
}

#[cfg(test)]
#[path = "tracker_tests.rs"]
mod tests;
