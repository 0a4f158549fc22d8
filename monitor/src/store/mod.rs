//! The monitor's store: the one place that knows how the cluster state is
//! kept. [`MonitorStore`] is the boundary every component goes through (the
//! monitor service, keepers, routers and the CLI, by way of
//! [`crate::MonitorClient`]); [`postgres::PgStore`] implements it on the
//! monitor's Postgres database (schema in [`crate::schema`]), and a second
//! backend (etcd, issue 26) implements the same methods.
//!
//! Writes that decide (goal assignments, their event and the primary epoch;
//! the answer to an operator request) are one atomic step conditioned on what
//! the writer read ([`GroupVersion`]): when another writer changed the group
//! meanwhile the store refuses with [`Written::Stale`], and the writer reads
//! again. Two writers can never both apply a decision.

pub mod etcd;
pub mod postgres;
pub mod rows;

use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::error::MonitorError;
use crate::fsm::{Assignment, Setting, SwitchoverDrain};
use crate::state::{Health, NodeState};

pub use rows::{
    Assigned, EventRow, FormationRow, NodeReport, NodeRow, Registered, Registration, RequestKind,
    StateNotification,
};

/// The change feed's channels (today Postgres NOTIFY channels, see
/// [`crate::schema`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// A goal, a reported state or a health changed (payload: a
    /// [`StateNotification`] in JSON).
    State,
    /// A keeper reported or registered, or a setting changed (wakes the
    /// monitor service; payload: node id or formation).
    Report,
    /// An operator request was filed or answered (payload: request id).
    Request,
    /// A switchover asks routers to drain the primary, or was abandoned
    /// (payload: formation).
    Drain,
}

impl Channel {
    /// Every channel.
    pub const ALL: [Channel; 4] = [
        Channel::State,
        Channel::Report,
        Channel::Request,
        Channel::Drain,
    ];

    /// The channel's name (the NOTIFY channel of the Postgres store).
    pub fn name(self) -> &'static str {
        match self {
            Channel::State => crate::schema::CHANNEL_STATE,
            Channel::Report => crate::schema::CHANNEL_REPORT,
            Channel::Request => crate::schema::CHANNEL_REQUEST,
            Channel::Drain => crate::schema::CHANNEL_DRAIN,
        }
    }

    /// The channel named `name`.
    pub fn from_name(name: &str) -> Option<Channel> {
        Channel::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// One change on the feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Where it was published.
    pub channel: Channel,
    /// What it says (see [`Channel`]).
    pub payload: String,
}

impl Change {
    /// The state notification this change carries, if it is one.
    pub fn state(&self) -> Option<StateNotification> {
        if self.channel != Channel::State {
            return None;
        }
        serde_json::from_str(&self.payload).ok()
    }
}

/// The changes a store connection receives on the channels it listens to, in
/// order; it ends when the connection is gone.
pub struct ChangeFeed {
    changes: mpsc::UnboundedReceiver<Change>,
}

impl ChangeFeed {
    /// A feed fed by `changes`.
    pub fn new(changes: mpsc::UnboundedReceiver<Change>) -> ChangeFeed {
        ChangeFeed { changes }
    }

    /// Waits up to `timeout` for the next change; `None` on timeout or when
    /// the connection is gone.
    pub async fn next(&mut self, timeout: Duration) -> Option<Change> {
        tokio::time::timeout(timeout, self.changes.recv())
            .await
            .ok()
            .flatten()
    }

    /// A change already received, without waiting.
    pub fn try_next(&mut self) -> Option<Change> {
        self.changes.try_recv().ok()
    }
}

/// What a decision was made on: the formation's revision, which every
/// conditioned write advances (so that a second writer that read the same
/// state is refused even when the first one's write changed no value), and
/// the parts of a group that deciders and registrations change (goals,
/// epoch, settings, the switchover request, the set of nodes). A conditioned
/// write applies only while all of it is as read. Reports and health are
/// not in it: they change every round, and no decision is written over
/// another because of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupVersion {
    /// The formation's revision (Postgres: its row's `xmin`; etcd: its
    /// key's `mod_revision`). Only equality means anything.
    pub revision: i64,
    /// The formation's primary epoch.
    pub primary_epoch: i64,
    /// The node writable in this epoch.
    pub primary_node_id: Option<i64>,
    /// `number_sync_standbys`.
    pub number_sync_standbys: i32,
    /// The pending switchover request's time (it identifies the request).
    pub switchover_requested: Option<String>,
    /// The node a promotion asked for.
    pub switchover_target: Option<i64>,
    /// The group's nodes, by id.
    pub nodes: Vec<NodeVersion>,
}

/// One node's part of a [`GroupVersion`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeVersion {
    /// Node id.
    pub node_id: i64,
    /// Goal state.
    pub goal: NodeState,
    /// Candidate priority.
    pub candidate_priority: i32,
    /// Replication quorum.
    pub replication_quorum: bool,
}

/// A group as a decider reads it, with the version its writes are
/// conditioned on.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupSnapshot {
    /// The group's nodes, by id.
    pub nodes: Vec<NodeRow>,
    /// `number_sync_standbys` of the formation.
    pub number_sync_standbys: i32,
    /// A switchover drain in progress.
    pub switchover: Option<SwitchoverDrain>,
    /// The node a promotion asked for.
    pub preferred_candidate: Option<i64>,
    /// What a write made from this snapshot is conditioned on.
    pub version: GroupVersion,
}

/// A decision on a group, written atomically with its events, epoch and
/// notifications.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupWrite {
    /// New goals, each with its event. A node that becomes writable starts
    /// a new primary epoch (and serves a pending promotion target).
    /// `end_drain`: the switchover's drain phase is over (the primary is
    /// told to stop).
    Assign {
        /// The goals.
        assignments: Vec<Assignment>,
        /// Clear the switchover request.
        end_drain: bool,
    },
    /// A node leaves the formation (dropped), with an event.
    Remove {
        /// The node.
        node_id: i64,
        /// Why.
        reason: String,
    },
    /// The formation's `number_sync_standbys` changes, with an event.
    SetNumberSyncStandbys {
        /// New value.
        value: i32,
        /// Why.
        reason: String,
    },
    /// The switchover request is withdrawn (routers resume), with an event.
    AbandonSwitchover {
        /// Why.
        reason: String,
    },
}

/// Whether a conditioned write applied.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// It did, atomically.
    Applied,
    /// What it was conditioned on changed (another writer decided first):
    /// nothing was written; read again.
    Stale,
}

/// An operator request waiting for the monitor service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRequest {
    /// Request id.
    pub id: i64,
    /// Formation.
    pub formation: String,
    /// Group.
    pub group_id: i32,
    /// Node it is about.
    pub node_id: Option<i64>,
    /// Kind, as stored (parsed by the service, which refuses unknown ones).
    pub kind: String,
    /// Value of a settings request.
    pub value: Option<String>,
    /// Time since it was filed, on the store's clock.
    pub age: Duration,
}

/// A new operator request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRequest {
    /// Formation.
    pub formation: String,
    /// Group.
    pub group_id: i32,
    /// Node it is about.
    pub node_id: Option<i64>,
    /// What is asked.
    pub kind: RequestKind,
    /// Value of a settings request.
    pub value: Option<String>,
}

/// The monitor service's answer to a request, with its effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestAnswer {
    /// Refused, saying why; nothing else changes.
    Refuse(String),
    /// A setting changes, with an event; keepers are woken to re-read it.
    Setting {
        /// The setting.
        setting: Setting,
        /// Reply and event text.
        reply: String,
    },
    /// A switchover starts: routers are asked to drain, with an event.
    StartSwitchover {
        /// The node a promotion asked for.
        target: Option<i64>,
        /// Reply and event text.
        reason: String,
    },
    /// Goals, as for [`GroupWrite::Assign`].
    Assign {
        /// The goals.
        assignments: Vec<Assignment>,
        /// Reply.
        reply: String,
    },
}

/// Where a filed request stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestStatus {
    /// Not answered yet.
    Pending,
    /// Accepted, with the reply.
    Accepted(String),
    /// Refused, with the reason.
    Refused(String),
}

impl RequestStatus {
    /// From a stored request's status (`accepted`, `refused`; anything
    /// else is still pending) and its reply, as both stores keep them.
    pub fn from_stored(status: &str, reply: String) -> RequestStatus {
        match status {
            "accepted" => RequestStatus::Accepted(reply),
            "refused" => RequestStatus::Refused(reply),
            _ => RequestStatus::Pending,
        }
    }
}

/// What a router tells the monitor about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterRegistration {
    /// Router id.
    pub router_id: String,
    /// Formation it routes.
    pub formation: String,
    /// Address clients use.
    pub address: String,
    /// Address of its read-only port (`router.listen_read_only`), if any.
    pub read_only_address: Option<String>,
    /// The primary epoch it routes to.
    pub routed_epoch: i64,
}

/// A router the monitor heard from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouterRow {
    /// Router id.
    pub router_id: String,
    /// Formation.
    pub formation: String,
    /// Address clients use.
    pub address: String,
    /// Address of its read-only port, if it has one.
    pub read_only_address: Option<String>,
}

/// A formation's routing, read at once: its epoch, the node writable in it,
/// and a pending switchover request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    /// `primary_epoch`.
    pub epoch: i64,
    /// The node writable in this epoch.
    pub primary: Option<RoutedNode>,
    /// The switchover request's time, as text (it only identifies the request).
    pub switchover_requested: Option<String>,
}

/// The primary of a [`Routing`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutedNode {
    /// Node id.
    pub node_id: i64,
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Assigned state.
    pub goal: NodeState,
    /// Reported state.
    pub reported: NodeState,
}

/// One goal assignment in the event log, for checkers.
#[derive(Debug, Clone, PartialEq)]
pub struct GoalEvent {
    /// When, in seconds since the Unix epoch on the store's clock.
    pub time: f64,
    /// The node's name.
    pub node_name: Option<String>,
    /// The node's port.
    pub node_port: u16,
    /// The goal.
    pub goal: NodeState,
}

/// One completed change of primary, for the monitor's metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct PrimaryChange {
    /// Formation.
    pub formation: String,
    /// The formation's primary epoch the change started.
    pub epoch: i64,
    /// From the monitor's first step away from the old primary (an old-epoch
    /// event assigning draining, demote_timeout, prepare_promotion,
    /// stop_replication or report_lsn) to the new primary's first report of
    /// a writable state (single, wait_primary or primary) in the new epoch.
    pub duration: Duration,
}

/// The monitor's state, wherever it is kept. Every method is one atomic step
/// of the backend; the conditioned writes ([`MonitorStore::apply`],
/// [`MonitorStore::answer_request`]) are refused when what they were decided on
/// changed. Object safe (`Box<dyn MonitorStore>`), so that a client can hold
/// whichever backend its URI names.
#[async_trait]
pub trait MonitorStore: Send + Sync {
    /// True once the store connection is gone (make a new one).
    fn is_closed(&self) -> bool;

    /// Sets up or upgrades what the store keeps (the monitor service does
    /// this at start); returns the layout version.
    async fn migrate(&mut self) -> Result<i32, MonitorError>;

    // ---- reads ----

    /// A formation.
    async fn formation(&self, formation: &str) -> Result<FormationRow, MonitorError>;
    /// Every formation, by id.
    async fn formations(&self) -> Result<Vec<FormationRow>, MonitorError>;
    /// The nodes of a formation (every group when `group` is `None`), by
    /// group and id.
    async fn nodes(
        &self,
        formation: &str,
        group: Option<i32>,
    ) -> Result<Vec<NodeRow>, MonitorError>;
    /// Every node of every formation, by formation, group and id.
    async fn all_nodes(&self) -> Result<Vec<NodeRow>, MonitorError>;
    /// One node by id.
    async fn node(&self, node_id: i64) -> Result<NodeRow, MonitorError>;
    /// One node by name.
    async fn node_by_name(&self, formation: &str, name: &str) -> Result<NodeRow, MonitorError>;
    /// A group as a decider reads it, with its version.
    async fn group_snapshot(
        &self,
        formation: &str,
        group: i32,
    ) -> Result<GroupSnapshot, MonitorError>;
    /// The newest `count` events of a formation, oldest first.
    async fn events(&self, formation: &str, count: i64) -> Result<Vec<EventRow>, MonitorError>;
    /// Every goal assignment ever logged that names a node's address, oldest first.
    async fn goal_history(&self) -> Result<Vec<GoalEvent>, MonitorError>;
    /// Every completed change of primary with its duration, oldest first.
    async fn primary_changes(&self) -> Result<Vec<PrimaryChange>, MonitorError>;
    /// The store's clock, `YYYY-MM-DD HH:MM:SS`.
    async fn clock(&self) -> Result<String, MonitorError>;
    /// A formation's routing.
    async fn routing(&self, formation: &str) -> Result<Routing, MonitorError>;
    /// Routers heard from within `within`, by id.
    async fn routers(&self, within: Duration) -> Result<Vec<RouterRow>, MonitorError>;

    // ---- keepers ----

    /// Registers a node (its first goal comes from the monitor service);
    /// wakes the service.
    async fn register(&self, reg: &Registration) -> Result<Registered, MonitorError>;
    /// Records a report and returns the node's goal; a changed reported state
    /// is logged as an event and published on [`Channel::State`]; every report
    /// wakes the service ([`Channel::Report`]).
    async fn report(&self, report: &NodeReport) -> Result<Assigned, MonitorError>;
    /// Logs an event about a node, with its current state.
    async fn node_event(&self, node_id: i64, description: &str) -> Result<(), MonitorError>;

    // ---- the monitor service ----

    /// Writes a decision on a group, with its events, epoch and
    /// notifications, if the group is still at `expected`.
    async fn apply(
        &mut self,
        formation: &str,
        group: i32,
        expected: &GroupVersion,
        write: GroupWrite,
    ) -> Result<Written, MonitorError>;
    /// Logs an event about a group (a reason to wait), unconditionally.
    async fn group_event(
        &self,
        formation: &str,
        group: i32,
        description: &str,
    ) -> Result<(), MonitorError>;
    /// Records a health check's verdict; `changed` is the event to log (and
    /// publish on [`Channel::State`]) when the verdict differs from before.
    async fn record_health(
        &self,
        node_id: i64,
        health: Health,
        changed: Option<&str>,
    ) -> Result<(), MonitorError>;
    /// Requests not answered yet, oldest first.
    async fn pending_requests(&self) -> Result<Vec<PendingRequest>, MonitorError>;
    /// Answers a request and writes its effect, atomically, if it is still
    /// pending and (when `expected` is given) its group still at `expected`;
    /// publishes on [`Channel::Request`].
    async fn answer_request(
        &mut self,
        request: &PendingRequest,
        expected: Option<&GroupVersion>,
        answer: RequestAnswer,
    ) -> Result<Written, MonitorError>;

    // ---- operators ----

    /// Files a request for the monitor service (published on
    /// [`Channel::Request`]); returns its id.
    async fn file_request(&self, request: &NewRequest) -> Result<i64, MonitorError>;
    /// Where a request stands.
    async fn request_status(&self, request_id: i64) -> Result<RequestStatus, MonitorError>;

    // ---- routers ----

    /// Registers a router (or refreshes it); `drained` also acknowledges the
    /// formation's switchover drain.
    async fn register_router(
        &self,
        router: &RouterRegistration,
        drained: bool,
    ) -> Result<(), MonitorError>;

    // ---- the change feed ----

    /// Starts receiving `channels` on this connection's [`ChangeFeed`].
    async fn listen(&self, channels: &[Channel]) -> Result<(), MonitorError>;
}
