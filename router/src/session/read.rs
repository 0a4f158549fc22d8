//! A read-only port session's standby: the route it is on (or none, when
//! `[read_only] fallback = "primary"` sent it to the primary), picking a
//! route again (each transaction in transaction mode, and whenever its
//! standby left the read pool), and the fallback when no standby is
//! eligible. The rest of the session works on whichever routing table and
//! pools [`Session::routing`] and [`Session::pools`] name.

use std::sync::Arc;

use hapg_config::router::ReadFallback;

use crate::pool::Pools;
use crate::read_pool::Lease;
use crate::routing::RoutingTable;
use crate::server::ServerConn;

use super::attach::AttachError;
use super::Session;

/// A read-only port session's place.
#[derive(Default)]
pub(crate) struct ReadState {
    /// The standby route the session is on; none while on the primary.
    pub lease: Option<Lease>,
}

/// What a read session does when its route is closed.
pub(super) enum Repicked {
    /// It is on a route with a target now (or on the primary): try again.
    Moved,
    /// No standby is eligible and the fallback is to wait.
    Wait,
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
            self.cancel.set_target(None);
            self.busy = None;
            self.pinned = None;
            server.terminate().await;
        }
        let Some(read) = self.read.as_mut() else {
            return Ok(Repicked::Wait);
        };
        let on_route = read.lease.is_some();
        self.shared.stats.count_read_move(on_route);
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
