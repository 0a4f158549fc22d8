//! A read-only port session's standby: the route it is on (or none, when
//! `[read_only] fallback = "primary"` sent it to the primary), picking a
//! route again (each transaction in transaction mode, and whenever its
//! standby left the read pool), and the fallback when no standby is
//! eligible. The rest of the session works on whichever routing table and
//! pools [`Session::routing`] and [`Session::pools`] name.
//!
//! A session does not wait for its next statement to learn that its standby
//! left the read pool: the relay loop wakes on every change of the pool
//! ([`Session::follow_read_pool`]), moves an idle session at once (its SETs
//! restored, as on the main port), a busy one at the end of its transaction,
//! cuts a transaction still open there after `router.drain_timeout_ms`, and
//! ends with a FATAL a session whose state cannot move.

use std::sync::Arc;
use std::time::Duration;

use hapg_config::router::ReadFallback;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::pool::Pools;
use crate::read_pool::Lease;
use crate::routing::RoutingTable;
use crate::server::ServerConn;

use crate::client::Ended;
use crate::client_error::ClientError;
use crate::read_pool::ReadRoute;

use super::attach::{AttachError, Repicked};
use super::loss::Loss;
use super::Session;

/// The next change of the read pool's membership (never, for a session of
/// the main port), and the receiver to wait for the one after.
pub(super) async fn next_pool_change(
    changes: Option<watch::Receiver<u64>>,
) -> Option<watch::Receiver<u64>> {
    let Some(mut changes) = changes else {
        return std::future::pending().await;
    };
    if changes.changed().await.is_err() {
        // The read pool is gone: no change will ever come.
        return std::future::pending().await;
    }
    Some(changes)
}

/// How long a read session may stay busy on a standby that left the read
/// pool: a frozen or cut-off standby never answers.
pub(super) type LeftDeadline = Option<Instant>;

/// A read-only port session's place.
#[derive(Default)]
pub(crate) struct ReadState {
    /// The standby route the session is on; none while on the primary.
    pub lease: Option<Lease>,
    /// Session mode: the standby (node id) the session gave its connection
    /// up on when it left the read pool with no other standby eligible; the
    /// session moves as soon as one is.
    pub stranded_from: Option<i64>,
}

impl Session {
    /// Makes the session a read-only port session.
    pub fn read_only(mut self) -> Session {
        self.read = Some(ReadState::default());
        self
    }

    /// The routing table the session follows: its standby's, else the primary's.
    #[inline]
    pub(super) fn routing(&self) -> &Arc<RoutingTable> {
        match self.read.as_ref().and_then(|r| r.lease.as_ref()) {
            Some(lease) => &lease.route.table,
            None => &self.shared.routing,
        }
    }

    /// The pools of the session's route.
    #[inline]
    pub(super) fn pools(&self) -> &Pools {
        match self.read.as_ref().and_then(|r| r.lease.as_ref()) {
            Some(lease) => &lease.route.pools,
            None => &self.shared.pools,
        }
    }

    /// Puts a connection back in the pools of the session's route; returns
    /// it when it is to be closed instead.
    #[inline]
    pub(super) fn checkin(&self, conn: Box<ServerConn>) -> Option<Box<ServerConn>> {
        match self.read.as_ref().and_then(|r| r.lease.as_ref()) {
            // A standby out of the read pool keeps no idle connection.
            Some(lease) if !lease.route.open_now() => Some(conn),
            Some(lease) => {
                let routing = lease.route.table.load();
                let epoch = routing.known.then_some(routing.epoch);
                let lifetime = self.shared.runtime.load().config.pool_lifetime();
                lease.route.pools.checkin(conn, epoch, lifetime)
            }
            None => self.shared.checkin(conn),
        }
    }

    /// Transaction mode, between transactions (no server attached): the
    /// transaction goes to the eligible standby with the fewest sessions.
    /// Session mode: a session without a route yet gets one.
    pub(super) fn pick_for_transaction(&mut self) {
        if self.server.is_some() {
            return;
        }
        let tx_mode = self.tx_mode;
        let Some(read) = self.read.as_mut() else {
            return;
        };
        if !tx_mode && read.lease.as_ref().is_some_and(|l| l.route.open_now()) {
            return;
        }
        let old = read.lease.take().map(|l| l.route.node_id);
        read.lease = self.shared.read_pool.pick();
        if read.lease.as_ref().map(|l| l.route.node_id) != old {
            // A pool id is an index into one route's pools.
            self.pool = None;
        }
    }

    /// The session's route is closed (its standby left the read pool) or it
    /// has none: gives up its server connection there and takes another
    /// eligible standby, else does what `[read_only] fallback` says.
    pub(super) async fn repick(&mut self) -> Result<Repicked, AttachError> {
        if let Some(server) = self.server.take() {
            tracing::info!(old = %server.addr, "the standby left the read pool; moving the read session");
            self.shared.stats.count_read_move();
            self.cancel.set_target(None);
            self.busy = None;
            self.pinned = None;
            server.terminate().await;
        }
        let Some(read) = self.read.as_mut() else {
            return Ok(Repicked::Wait);
        };
        let on_route = read.lease.is_some();
        if let Some(lease) = self.shared.read_pool.pick() {
            read.lease = Some(lease);
            self.pool = None;
            return Ok(Repicked::Moved);
        }
        match self.shared.runtime.load().config.read_only.fallback {
            ReadFallback::Primary => {
                if on_route {
                    tracing::info!("no standby is eligible: the read session goes to the primary (read_only.fallback = primary)");
                    read.lease = None;
                    self.pool = None;
                    return Ok(Repicked::Moved);
                }
                // Already on the primary: wait for it as the main port does.
                Ok(Repicked::Wait)
            }
            ReadFallback::Wait => {
                read.lease = None;
                Ok(Repicked::Wait)
            }
            ReadFallback::Error => Err(AttachError::NoStandby),
        }
    }

    /// True when the session is a read session with nowhere to go but
    /// waiting for an eligible standby (`fallback = "wait"`, or `error`).
    pub(super) fn waits_for_standby(&self) -> bool {
        self.read.as_ref().is_some_and(|r| r.lease.is_none())
            && self.shared.runtime.load().config.read_only.fallback != ReadFallback::Primary
    }
}

impl Session {
    /// The route of the standby the session's server connection is on, when
    /// that standby has left the read pool.
    fn left_route(&self) -> Option<Arc<ReadRoute>> {
        self.server.as_ref()?;
        let lease = self.read.as_ref()?.lease.as_ref()?;
        (!lease.route.open_now()).then(|| lease.route.clone())
    }

    /// Keeps a read session off a standby that left the read pool (called
    /// before the loop waits, and so after every change of the pool and at
    /// the end of every transaction): an idle session moves now; a busy one
    /// gets until `deadline` (set here, `router.drain_timeout_ms` from when
    /// it was first seen busy there), then what it has open is cut.
    pub(super) async fn follow_read_pool(
        &mut self,
        deadline: &mut LeftDeadline,
    ) -> Result<(), Ended> {
        let left = self.left_route();
        let stranded = self.read.as_ref().and_then(|r| r.stranded_from);
        if left.is_none() {
            *deadline = None;
        }
        if self.server.is_some() && left.is_none() {
            if let Some(read) = self.read.as_mut() {
                read.stranded_from = None;
            }
            return Ok(());
        }
        let Some(route) = left else {
            // Stranded: moves once a standby is eligible (and the session idle).
            if let Some(from) = stranded {
                if self.movable_now() && self.shared.read_pool.any_eligible() {
                    return self.move_to_eligible(from).await;
                }
            }
            return Ok(());
        };
        let drain_ms = self.shared.runtime.load().config.router.drain_timeout_ms;
        if !self.movable_now() {
            match deadline {
                Some(at) if Instant::now() >= *at => {
                    *deadline = None;
                    self.shared.read_pool.session_ended(
                        route.node_id,
                        "transaction open past router.drain_timeout_ms",
                    );
                    return self.server_gone(Loss::StandbyLeft { drain_ms });
                }
                Some(_) => {}
                None => *deadline = Some(Instant::now() + Duration::from_millis(drain_ms)),
            }
            return Ok(());
        }
        *deadline = None;
        self.move_off(&route).await
    }

    /// Nothing open, half-sent or pending either way: the session may move.
    fn movable_now(&self) -> bool {
        self.idle()
            && self.proto.reusable()
            && self.swbuf.is_empty()
            && self.client.rbuf.is_empty()
            && self.closing.is_none()
            && self.failed.is_none()
    }

    /// Moves an idle read session off `route` (its standby left the read
    /// pool) to another eligible standby; a session whose state cannot move
    /// ends with a FATAL saying why. With no standby eligible, the session
    /// only gives up its connection (stranded): it moves once one is, or its
    /// next statement waits, fails or goes to the primary as
    /// `[read_only] fallback` says.
    async fn move_off(&mut self, route: &ReadRoute) -> Result<(), Ended> {
        let from = route.node_id;
        if !self.tx_mode {
            if let Some(sticky) = self.state.sticky() {
                let why = route.left_because();
                let error = AttachError::StateLost(format!(
                    "this session's standby (node {from}, {}:{}) left the read pool ({why}), and this session's {} cannot move to another node, so the session ends",
                    route.host,
                    route.port,
                    sticky.describe()
                ));
                self.shared.read_pool.session_ended(from, sticky.describe());
                return Err(self.client.end_with(error.into()).await);
            }
        }
        if !self.shared.read_pool.any_eligible() {
            if let Some(server) = self.server.take() {
                // Taken off now; where it goes next is decided later.
                self.shared.stats.count_read_move();
                self.cancel.set_target(None);
                server.terminate().await;
            }
            if let Some(read) = self.read.as_mut() {
                read.stranded_from = Some(from);
            }
            return Ok(());
        }
        self.move_to_eligible(from).await
    }

    /// Attaches an idle read session that left standby `from` to an
    /// eligible standby, its session state restored.
    async fn move_to_eligible(&mut self, from: i64) -> Result<(), Ended> {
        let rt = self.shared.runtime.load_full();
        let deadline = Instant::now() + rt.config.pause_timeout();
        match self.attach(deadline).await {
            Ok(()) => {
                if let Some(read) = self.read.as_mut() {
                    read.stranded_from = None;
                }
                let to = self
                    .read
                    .as_ref()
                    .and_then(|r| r.lease.as_ref())
                    .map(|l| l.route.node_id);
                self.shared.read_pool.session_moved(from, to);
                Ok(())
            }
            Err(e) => {
                let error = ClientError::from(e);
                if error.fatal {
                    self.shared.read_pool.session_ended(from, &error.message);
                    return Err(self.client.end_with(error).await);
                }
                // No statement to fail: the next one attaches again and
                // is told.
                tracing::info!(error = %error.message, "a read session could not move yet");
                if let Some(server) = self.server.take() {
                    self.cancel.set_target(None);
                    server.terminate().await;
                }
                Ok(())
            }
        }
    }
}
