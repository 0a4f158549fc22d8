//! A server connection lost while a session is on it (it broke, the server
//! ended it) or cut by the router (a switchover drain ran out of time, the
//! primary changed): what was in flight fails, and the client is told why
//! ([`Lost`] into [`ClientError`]). A transaction that was open goes on as a
//! failed one the router answers for (`failed.rs`); a session holding state
//! that cannot move ends.

use crate::client::Ended;
use crate::client_error::ClientError;
use crate::protocol::backend::{self, sqlstate, TxStatus};

use super::failed::LostTransaction;
use super::tracker::InFlight;
use super::Session;

/// Why a server connection is dropped while the session is on it.
#[derive(Clone, Copy, Debug)]
pub(super) enum Loss<'a> {
    /// The connection broke or the server ended it.
    Lost(&'a str),
    /// A switchover drain ran out of time (`router.drain_timeout_ms`): the
    /// router cuts the statement or transaction still open on the primary
    /// being drained.
    Switchover { drain_ms: u64 },
    /// The monitor named another primary (epoch `to`) while the session had
    /// a statement or transaction open on the old one (epoch `from`): the
    /// router stops waiting for it, since a primary that lost its place may
    /// never answer (frozen, cut off, or powered off with the socket open).
    PrimaryChanged { from: i64, to: i64 },
    /// A read-only port session's standby left the read pool while the
    /// session had a statement or transaction open there, still open after
    /// `router.drain_timeout_ms`: the router stops waiting for it (the
    /// standby may be frozen or cut off).
    StandbyLeft { drain_ms: u64 },
}

/// A loss and what it interrupted: what the client's failed statements are
/// told.
pub(super) struct Lost<'a> {
    pub loss: Loss<'a>,
    pub in_flight: InFlight,
}

impl From<Lost<'_>> for ClientError {
    fn from(Lost { loss, in_flight }: Lost<'_>) -> ClientError {
        let InFlight {
            in_tx,
            statement,
            ending,
            ..
        } = in_flight;
        match loss {
            Loss::Lost(reason) => ClientError::error(
                sqlstate::CONNECTION_FAILURE,
                match (in_tx, statement) {
                    _ if ending => format!("lost the connection to the primary while ending the transaction ({reason}); if that was a COMMIT, it may or may not have completed"),
                    (true, false) => format!("lost the connection to the primary during the transaction ({reason}); the transaction was rolled back"),
                    (true, true) => format!("lost the connection to the primary during the transaction ({reason}); the transaction was rolled back, unless the statement in flight was its COMMIT, which may or may not have completed"),
                    (false, _) => format!("lost the connection to the primary during the statement ({reason}); it may or may not have completed"),
                },
                Some("The session is still usable: the next statement runs on the current primary."),
            ),
            Loss::Switchover { drain_ms: ms } => ClientError::error(
                sqlstate::ADMIN_SHUTDOWN,
                match (in_tx, statement) {
                    _ if ending => format!("a switchover interrupted the end of this transaction: it was still running after router.drain_timeout_ms ({ms} ms); if it was a COMMIT, it may or may not have completed"),
                    (true, false) => format!("a switchover interrupted this transaction: it was still open after router.drain_timeout_ms ({ms} ms), and it was rolled back"),
                    (true, true) => format!("a switchover interrupted this transaction: it was still open after router.drain_timeout_ms ({ms} ms); it was rolled back, unless the statement in flight was its COMMIT, which may or may not have completed"),
                    (false, _) => format!("a switchover interrupted this statement: it was still running after router.drain_timeout_ms ({ms} ms), and it may or may not have completed"),
                },
                Some("The session is still usable: the next statement waits for the new primary and runs there."),
            ),
            Loss::PrimaryChanged { from, to } => ClientError::error(
                sqlstate::CONNECTION_FAILURE,
                match (in_tx, statement) {
                    _ if ending => format!("the primary changed (epoch {from} to {to}) while this transaction was ending on the old primary, which did not answer; if it was a COMMIT, it may or may not have completed"),
                    (true, false) => format!("the primary changed (epoch {from} to {to}) during this transaction; the transaction was rolled back"),
                    (true, true) => format!("the primary changed (epoch {from} to {to}) during this transaction, while a statement was running on the old primary, which did not answer; the transaction was rolled back, unless that statement was its COMMIT, which may or may not have completed"),
                    (false, _) => format!("the primary changed (epoch {from} to {to}) while this statement was running on the old primary, which did not answer; it may or may not have completed"),
                },
                Some("The session is still usable: the next statement waits for the new primary and runs there."),
            ),
            Loss::StandbyLeft { drain_ms: ms } => ClientError::error(
                sqlstate::ADMIN_SHUTDOWN,
                match (in_tx, ending) {
                    (_, true) => format!("this session's standby left the read pool and the end of this transaction was still running there after router.drain_timeout_ms ({ms} ms)"),
                    (true, false) => format!("this session's standby left the read pool and this transaction was still open there after router.drain_timeout_ms ({ms} ms); it was rolled back"),
                    (false, false) => format!("this session's standby left the read pool and this statement was still running there after router.drain_timeout_ms ({ms} ms)"),
                },
                Some("The session is still usable: the next statement runs on another standby."),
            ),
        }
    }
}

/// What a client is told to do when its session ended because its state
/// could not move.
const STRANDED_HINT: &str =
    "Reconnect, and set that state up again on the new session (LISTEN again, recreate temporary tables, ...).";

/// The FATAL that ends a session holding state that cannot move (`what`, as
/// [`crate::tracking::Sticky::describe`] says it) when its server connection
/// is gone: `head` says what happened (to the statement in flight, if there
/// was one). Only when the primary changed does it say so: a connection
/// ended by `pg_terminate_backend` on a primary that still is one is lost,
/// not moved.
fn stranded(code: &str, head: &str, what: &str, primary_changed: bool) -> ClientError {
    let message = if primary_changed {
        format!("{head}; this session's {what} cannot move to the new primary, so the session ends")
    } else {
        format!("{head}; this session's {what} cannot be restored on another server connection, so the session ends")
    };
    ClientError::fatal(code.to_string(), message, Some(STRANDED_HINT))
}

/// What happened, for a session that ends with no statement in flight, and
/// whether the primary changed (only then may a FATAL say so).
/// `server_epoch`: the lost connection's; `now`: the routing's epoch now;
/// `draining`: a switchover drain is on.
fn idle_head(loss: Loss<'_>, server_epoch: i64, now: i64, draining: bool) -> (String, bool) {
    match loss {
        Loss::Lost(reason) if now > server_epoch => (
            format!("the primary changed (epoch {server_epoch} to {now}) and the connection to the old primary was lost ({reason})"),
            true,
        ),
        // The old primary is being demoted: it ends its connections before
        // the monitor names the new one.
        Loss::Lost(reason) if draining => (
            format!("lost the connection to the primary during a switchover ({reason})"),
            true,
        ),
        Loss::Lost(reason) => (
            format!("lost the connection to the primary ({reason})"),
            false,
        ),
        Loss::Switchover { .. } => (
            "a switchover drain ended this session's connection to the primary".to_string(),
            true,
        ),
        Loss::PrimaryChanged { from, to } => {
            (format!("the primary changed (epoch {from} to {to})"), true)
        }
        Loss::StandbyLeft { .. } => (
            "this session's standby left the read pool".to_string(),
            false,
        ),
    }
}

impl Session {
    /// The server connection is gone: fail what was in flight (SQLSTATE 08006),
    /// and let the client carry on.
    pub(super) fn server_lost(&mut self, reason: &str) -> Result<(), Ended> {
        self.server_gone(Loss::Lost(reason))
    }

    /// Drops the server connection (closing it rolls back an open transaction
    /// on the server), fails what was in flight, and lets the client carry on.
    pub(super) fn server_gone(&mut self, loss: Loss<'_>) -> Result<(), Ended> {
        let Some(server) = self.server.take() else {
            return Ok(());
        };
        self.cancel.set_target(None);
        self.busy = None;
        self.stmts.reset();
        if self.proto.client_rest() > 0 {
            // The rest of the client's message has nowhere to go.
            self.client_discard = true;
            self.large_sql = None;
        }
        if self.proto.server_streaming_mid_message() {
            // The client holds half a message: its framing cannot be recovered.
            tracing::info!(
                reason = match loss {
                    Loss::Lost(reason) => reason,
                    Loss::Switchover { .. } => "switchover drain timeout",
                    Loss::PrimaryChanged { .. } => "the primary changed",
                    Loss::StandbyLeft { .. } => "the standby left the read pool",
                },
                "server connection dropped in the middle of a message; closing the client"
            );
            return Err(Ended);
        }
        let in_flight = self.proto.on_loss();
        let InFlight {
            in_tx, outstanding, ..
        } = in_flight;
        match loss {
            Loss::Lost(reason) => {
                tracing::info!(server = %server.addr, reason, in_tx, outstanding, "server connection lost");
                // The idle connections to the same server are likely gone too.
                drop(self.pools().discard_epoch(server.epoch));
            }
            Loss::Switchover { .. } => {
                tracing::info!(server = %server.addr, in_tx, outstanding, "switchover drain: cutting the session's transaction on the old primary");
            }
            Loss::PrimaryChanged { from, to } => {
                tracing::info!(server = %server.addr, from, to, in_tx, outstanding, "the primary changed: giving up the session's statement on the old primary");
            }
            Loss::StandbyLeft { .. } => {
                tracing::info!(server = %server.addr, in_tx, outstanding, "the standby left the read pool: cutting the read session's transaction after the drain timeout");
            }
        }
        let error = ClientError::from(Lost { loss, in_flight });
        let server_epoch = server.epoch;
        drop(server);
        self.pinned = None;
        if !self.tx_mode {
            if let Some(sticky) = self.state.sticky() {
                let routing = self.routing().load();
                let (idle, primary_changed) =
                    idle_head(loss, server_epoch, routing.epoch, routing.draining());
                let head = if in_tx || in_flight.statement || in_flight.ending {
                    error.message.clone()
                } else {
                    idle
                };
                let fatal = stranded(&error.code, &head, sticky.describe(), primary_changed);
                tracing::info!(message = %fatal.message, "a session whose state cannot move lost its server connection: ending it");
                fatal.write(&mut self.client.wbuf);
                return Err(Ended);
            }
        }
        self.state.discard_pending();
        self.fail_in_flight(in_flight, error);
        Ok(())
    }

    /// Answers what was in flight with `error`: in a transaction, the
    /// transaction is failed, as on a server after an error, and the client's
    /// statements are refused until it ends it; outside one, each statement
    /// in flight fails and the session is idle.
    fn fail_in_flight(&mut self, in_flight: InFlight, error: ClientError) {
        let out = &mut self.client.wbuf;
        if in_flight.in_tx {
            let mut lost = LostTransaction::new(error);
            for _ in 0..in_flight.outstanding {
                lost.error(out);
                backend::ready_for_query(out, TxStatus::Failed);
            }
            if in_flight.open_batch {
                lost.error(out);
                lost.skip_to_sync();
            }
            self.failed = Some(lost);
        } else {
            for _ in 0..in_flight.outstanding {
                error.write(out);
                backend::ready_for_query(out, TxStatus::Idle);
            }
            if in_flight.open_batch {
                error.write(out);
            }
        }
    }
}
