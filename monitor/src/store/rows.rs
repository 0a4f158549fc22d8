//! The rows of the monitor's state as every component sees them, whatever
//! store holds them: nodes, formations, events, registrations, reports and
//! their answers, state notifications and operator request kinds.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::fsm::NodeView;
use crate::state::{Health, NodeState};

/// One node as the monitor knows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeRow {
    /// Node id.
    pub node_id: i64,
    /// Formation.
    pub formation: String,
    /// Group within the formation.
    pub group_id: i32,
    /// Node name.
    pub name: String,
    /// Host other nodes and clients use.
    pub host: String,
    /// Postgres port.
    pub port: u16,
    /// Assigned state.
    pub goal: NodeState,
    /// Reported state.
    pub reported: NodeState,
    /// Keeper says Postgres runs.
    pub pg_running: bool,
    /// Best sync_state of the primary's standbys, as the keeper reported it.
    pub rep_state: String,
    /// Reported timeline.
    pub tli: i32,
    /// Reported LSN.
    pub lsn: u64,
    /// A standby still hears from its primary.
    pub upstream_streaming: bool,
    /// The keeper last saw Postgres in recovery (`None`: not running, or not said).
    pub in_recovery: Option<bool>,
    /// How long the standby's WAL receiver had heard nothing from the
    /// primary when it last reported (`None`: not streaming, or not said).
    pub upstream_silence: Option<Duration>,
    /// Time since the last report.
    pub report_age: Option<Duration>,
    /// Health check verdict.
    pub health: Health,
    /// Candidate priority.
    pub candidate_priority: i32,
    /// Replication quorum.
    pub replication_quorum: bool,
}

impl NodeRow {
    /// The node as the state machine sees it.
    pub fn view(&self) -> NodeView {
        NodeView {
            id: self.node_id,
            name: self.name.clone(),
            reported: self.reported,
            goal: self.goal,
            pg_running: self.pg_running,
            tli: self.tli,
            lsn: self.lsn,
            upstream_streaming: self.upstream_streaming,
            in_recovery: self.in_recovery,
            upstream_silence: self.upstream_silence,
            health: self.health,
            report_age: self.report_age,
            candidate_priority: self.candidate_priority,
            replication_quorum: self.replication_quorum,
        }
    }

    /// `host:port`.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// A formation's settings and routing epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FormationRow {
    /// Formation id.
    pub formation: String,
    /// Database applications use.
    pub dbname: String,
    /// `number_sync_standbys`.
    pub number_sync_standbys: i32,
    /// Increases each time a different node becomes writable.
    pub primary_epoch: i64,
    /// The node writable in this epoch.
    pub primary_node_id: Option<i64>,
}

/// One row of `show events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventRow {
    /// Event id.
    pub event_id: i64,
    /// When, as `YYYY-MM-DD HH:MM:SS.ffffff`.
    pub event_time: String,
    /// Formation.
    pub formation: String,
    /// Group.
    pub group_id: Option<i32>,
    /// Node.
    pub node_id: Option<i64>,
    /// Node name.
    pub node_name: Option<String>,
    /// The node's reported state at the time.
    pub reported_state: Option<String>,
    /// The node's goal state at the time.
    pub goal_state: Option<String>,
    /// Primary epoch at the time.
    pub primary_epoch: Option<i64>,
    /// What happened and why.
    pub description: String,
}

/// What a keeper registers.
#[derive(Debug, Clone)]
pub struct Registration {
    /// Formation to join.
    pub formation: String,
    /// Node name; `node_<id>` when empty.
    pub name: String,
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Application database (fixed by the formation's first node).
    pub dbname: String,
    /// Candidate priority 0..100.
    pub candidate_priority: i32,
    /// Replication quorum.
    pub replication_quorum: bool,
}

/// The monitor's answer to a registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// Assigned node id.
    pub node_id: i64,
    /// Assigned group.
    pub group_id: i32,
    /// Name, as given or assigned.
    pub name: String,
}

/// What a keeper reports every round.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeReport {
    /// Reporting node.
    pub node_id: i64,
    /// Its current state.
    pub state: NodeState,
    /// Postgres runs (or, for a primary, is being restarted in place).
    pub pg_running: bool,
    /// Timeline.
    pub tli: i32,
    /// LSN (flush on a primary, receive or replay on a standby).
    pub lsn: u64,
    /// Best sync_state among the primary's standbys.
    pub rep_state: String,
    /// A standby still hears from its primary.
    pub upstream_streaming: bool,
    /// Postgres is in recovery (`None` when it does not answer).
    pub in_recovery: Option<bool>,
    /// While streaming: how long ago the standby last received a message
    /// (WAL or keepalive) from its primary.
    pub upstream_silence: Option<Duration>,
}

/// The monitor's answer to a report: the node's goal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assigned {
    /// Goal state.
    pub goal: NodeState,
    /// Group.
    pub group_id: i32,
    /// Formation's primary epoch.
    pub primary_epoch: i64,
}

/// The JSON payload of a `hapg_state` notification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StateNotification {
    /// Always `state`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Formation.
    pub formation: String,
    /// Group.
    pub group_id: i32,
    /// Node.
    pub node_id: i64,
    /// Node name.
    pub name: String,
    /// Host.
    pub host: String,
    /// Port.
    pub port: i32,
    /// Reported state.
    pub reported_state: NodeState,
    /// Goal state.
    pub goal_state: NodeState,
    /// `good`, `bad` or `unknown`.
    pub health: String,
    /// The formation's primary epoch.
    pub epoch: i64,
}

/// Operator requests the CLI files for the monitor service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// `perform switchover`.
    Switchover,
    /// `perform failover` (same as a switchover in a healthy group).
    Failover,
    /// `enable maintenance`.
    EnableMaintenance,
    /// `disable maintenance`.
    DisableMaintenance,
    /// `drop node`.
    Drop,
    /// `perform promotion --name`.
    Promotion,
    /// `set node candidate-priority` (value: 0..100).
    SetCandidatePriority,
    /// `set node replication-quorum` (value: true/false).
    SetReplicationQuorum,
    /// `set formation number-sync-standbys` (value: n).
    SetNumberSyncStandbys,
}

impl RequestKind {
    /// Name stored in `hapg.request.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Switchover => "switchover",
            RequestKind::Failover => "failover",
            RequestKind::EnableMaintenance => "enable_maintenance",
            RequestKind::DisableMaintenance => "disable_maintenance",
            RequestKind::Drop => "drop",
            RequestKind::Promotion => "promotion",
            RequestKind::SetCandidatePriority => "set_candidate_priority",
            RequestKind::SetReplicationQuorum => "set_replication_quorum",
            RequestKind::SetNumberSyncStandbys => "set_number_sync_standbys",
        }
    }

    /// Parses a stored name.
    pub fn parse(text: &str) -> Option<RequestKind> {
        [
            RequestKind::Switchover,
            RequestKind::Failover,
            RequestKind::EnableMaintenance,
            RequestKind::DisableMaintenance,
            RequestKind::Drop,
            RequestKind::Promotion,
            RequestKind::SetCandidatePriority,
            RequestKind::SetReplicationQuorum,
            RequestKind::SetNumberSyncStandbys,
        ]
        .into_iter()
        .find(|k| k.as_str() == text)
    }
}
