//! The monitor client: what keepers, routers and the CLI read from and write to
//! the monitor database. Keepers report and register; everyone reads state; the
//! CLI files operator requests that the monitor service alone decides on.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Notification, Row};

use crate::error::MonitorError;
use crate::fsm::{GroupView, NodeView, Thresholds};
use crate::pgconn::{self, format_lsn, parse_lsn, redact_uri};
use crate::schema::{self, CHANNEL_REPORT, CHANNEL_REQUEST, CHANNEL_STATE};
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

/// The columns [`NodeRow::from_row`] reads, in order.
pub(crate) const NODE_COLUMNS: &str =
    "n.node_id, n.formation_id, n.group_id, n.node_name, n.node_host, n.node_port, \
     n.goal_state::text, n.reported_state::text, n.reported_pg_running, n.reported_rep_state, \
     n.reported_tli, n.reported_lsn::text, n.upstream_streaming, \
     (extract(epoch FROM clock_timestamp() - n.report_time) * 1000)::float8, \
     n.health, n.candidate_priority, n.replication_quorum, n.reported_in_recovery, \
     n.upstream_silence_ms";

impl NodeRow {
    pub(crate) fn from_row(row: &Row) -> Result<NodeRow, MonitorError> {
        let port: i32 = row.try_get(5)?;
        let goal: String = row.try_get(6)?;
        let reported: String = row.try_get(7)?;
        let lsn: String = row.try_get(11)?;
        let age_ms: Option<f64> = row.try_get(13)?;
        Ok(NodeRow {
            node_id: row.try_get(0)?,
            formation: row.try_get(1)?,
            group_id: row.try_get(2)?,
            name: row.try_get(3)?,
            host: row.try_get(4)?,
            port: u16::try_from(port)
                .map_err(|_| MonitorError::Corrupt(format!("node port {port}")))?,
            goal: goal.parse()?,
            reported: reported.parse()?,
            pg_running: row.try_get(8)?,
            rep_state: row.try_get(9)?,
            tli: row.try_get(10)?,
            lsn: parse_lsn(&lsn).ok_or_else(|| MonitorError::Corrupt(format!("lsn {lsn}")))?,
            upstream_streaming: row.try_get(12)?,
            report_age: age_ms.map(|ms| Duration::from_millis(ms.max(0.0) as u64)),
            health: Health::from_db(row.try_get(14)?),
            candidate_priority: row.try_get(15)?,
            replication_quorum: row.try_get(16)?,
            in_recovery: row.try_get(17)?,
            upstream_silence: row
                .try_get::<_, Option<i64>>(18)?
                .map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0))),
        })
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

/// SQL expression building a [`StateNotification`] payload from `n` (node) and `f` (formation).
pub(crate) const STATE_PAYLOAD_SQL: &str = "json_build_object(\
    'type', 'state', 'formation', n.formation_id, 'groupId', n.group_id, 'nodeId', n.node_id, \
    'name', n.node_name, 'host', n.node_host, 'port', n.node_port, \
    'reportedState', n.reported_state, 'goalState', n.goal_state, \
    'health', CASE n.health WHEN 1 THEN 'good' WHEN 0 THEN 'bad' ELSE 'unknown' END, \
    'epoch', f.primary_epoch)::text";

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

/// A connection to the monitor database.
pub struct MonitorClient {
    client: tokio_postgres::Client,
    notifications: mpsc::UnboundedReceiver<Notification>,
    uri: String,
}

/// Connection timeout of one attempt to reach the monitor.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

impl MonitorClient {
    /// Connects once, and checks the schema version.
    pub async fn connect(uri: &str) -> Result<MonitorClient, MonitorError> {
        let parsed = hapg_config::conninfo::parse(uri).map_err(|reason| MonitorError::BadUri {
            uri: redact_uri(uri),
            reason,
        })?;
        let tls = pgconn::client_config(&parsed.cert_check).map_err(|e| MonitorError::BadUri {
            uri: redact_uri(uri),
            reason: e.to_string(),
        })?;
        let connection = pgconn::connect_with(
            parsed.config,
            tokio_postgres_rustls::MakeRustlsConnect::new(tls),
            CONNECT_TIMEOUT,
        )
        .await
        .map_err(|e| {
            if pgconn::certificate_refused(&e) {
                MonitorError::CertificateRefused {
                    uri: redact_uri(uri),
                    reason: crate::error::describe(&e),
                }
            } else {
                e.into()
            }
        })?;
        let client = MonitorClient {
            client: connection.client,
            notifications: connection.notifications,
            uri: redact_uri(uri),
        };
        schema::check(&client.client).await?;
        Ok(client)
    }

    /// Connects, retrying connection failures, and a monitor that is still
    /// being created or started, with backoff for up to `budget`; then fails
    /// with an error that names the URI, or with the monitor's own answer.
    pub async fn connect_with_retry(
        uri: &str,
        budget: Duration,
    ) -> Result<MonitorClient, MonitorError> {
        let start = Instant::now();
        let mut attempts = 0;
        let mut delay = Duration::from_millis(200);
        loop {
            attempts += 1;
            match MonitorClient::connect(uri).await {
                Ok(client) => return Ok(client),
                Err(e)
                    if (e.is_transient() || e.is_monitor_not_ready())
                        && start.elapsed() + delay < budget =>
                {
                    tracing::debug!(attempt = attempts, error = %e, "monitor not reachable yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(e) if e.is_transient() => {
                    return Err(MonitorError::Unreachable {
                        uri: redact_uri(uri),
                        attempts,
                        seconds: start.elapsed().as_secs(),
                        last_error: e.to_string(),
                    })
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The underlying client, for the monitor service's own statements.
    pub fn inner(&self) -> &tokio_postgres::Client {
        &self.client
    }

    /// The URI this client connected to, password removed.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// True once the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// LISTENs on the state-change channel.
    pub async fn listen_state(&self) -> Result<(), MonitorError> {
        self.listen(CHANNEL_STATE).await
    }

    /// LISTENs on `channel`.
    pub(crate) async fn listen(&self, channel: &str) -> Result<(), MonitorError> {
        self.client
            .batch_execute(&format!(
                "LISTEN {}",
                postgres_protocol::escape::escape_identifier(channel)
            ))
            .await?;
        Ok(())
    }

    /// Waits up to `timeout` for the next notification; `None` on timeout or
    /// when the connection is closed (check [`MonitorClient::is_closed`]).
    pub async fn next_notification(&mut self, timeout: Duration) -> Option<Notification> {
        tokio::time::timeout(timeout, self.notifications.recv())
            .await
            .ok()
            .flatten()
    }

    /// A notification already received, without waiting.
    pub fn try_notification(&mut self) -> Option<Notification> {
        self.notifications.try_recv().ok()
    }

    /// Registers a new node; the monitor service assigns its first goal.
    pub async fn register(&self, reg: &Registration) -> Result<Registered, MonitorError> {
        let formation = self.formation(&reg.formation).await?;
        let count: i64 = self
            .client
            .query_one(
                "SELECT count(*) FROM hapg.node WHERE formation_id = $1",
                &[&reg.formation],
            )
            .await?
            .get(0);
        if count > 0 && formation.dbname != reg.dbname {
            return Err(MonitorError::RegistrationRefused(format!(
                "formation {:?} uses database {:?}, not {:?}",
                reg.formation, formation.dbname, reg.dbname
            )));
        }
        let name = if reg.name.is_empty() {
            None
        } else {
            Some(reg.name.clone())
        };
        let result = self
            .client
            .query_one(
                "WITH id AS (SELECT nextval(pg_get_serial_sequence('hapg.node', 'node_id')) AS node_id),
                      f AS (UPDATE hapg.formation SET dbname = $6
                            WHERE formation_id = $1
                              AND NOT EXISTS (SELECT 1 FROM hapg.node WHERE formation_id = $1)
                            RETURNING formation_id),
                      n AS (INSERT INTO hapg.node (node_id, formation_id, node_name, node_host, node_port,
                                                   candidate_priority, replication_quorum)
                            SELECT id.node_id, $1, coalesce($2, 'node_' || id.node_id), $3, $4, $5, $7
                              FROM id
                            RETURNING node_id, group_id, node_name)
                 SELECT n.node_id, n.group_id, n.node_name, pg_notify($8, n.node_id::text),
                        (SELECT count(*) FROM f)
                   FROM n",
                &[
                    &reg.formation,
                    &name,
                    &reg.host,
                    &i32::from(reg.port),
                    &reg.candidate_priority,
                    &reg.dbname,
                    &reg.replication_quorum,
                    &CHANNEL_REPORT,
                ],
            )
            .await;
        match result {
            Ok(row) => Ok(Registered {
                node_id: row.get(0),
                group_id: row.get(1),
                name: row.get(2),
            }),
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                let detail = e
                    .as_db_error()
                    .map(|d| d.message().to_string())
                    .unwrap_or_default();
                Err(MonitorError::RegistrationRefused(
                    if detail.contains("node_name") {
                        format!(
                        "a node named {:?} already exists in formation {:?}; choose another --name",
                        reg.name, reg.formation
                    )
                    } else {
                        format!(
                        "a node at {}:{} is already registered; drop it first or use another --pgport",
                        reg.host, reg.port
                    )
                    },
                ))
            }
            Err(e) if e.code() == Some(&SqlState::CHECK_VIOLATION) => Err(
                MonitorError::RegistrationRefused(format!("invalid value: {e}")),
            ),
            Err(e) => Err(e.into()),
        }
    }

    /// Records a keeper's report and returns its goal. A change of reported
    /// state is logged as an event and published on `hapg_state`; every report
    /// wakes the monitor service.
    pub async fn report(&self, report: &NodeReport) -> Result<Assigned, MonitorError> {
        let sql = format!(
            "WITH old AS (SELECT node_id, reported_state AS before
                            FROM hapg.node WHERE node_id = $1 FOR UPDATE),
                  n AS (UPDATE hapg.node n
                           SET reported_state = $2::text::hapg.replication_state,
                               reported_pg_running = $3, reported_tli = $4,
                               reported_lsn = $5::text::pg_lsn, reported_rep_state = $6,
                               upstream_streaming = $7, reported_in_recovery = $8,
                               upstream_silence_ms = $9,
                               report_time = now()
                          FROM old WHERE n.node_id = old.node_id
                      RETURNING n.*, old.before),
                  changed AS (
                      INSERT INTO hapg.event (formation_id, group_id, node_id, node_name, node_host,
                                              node_port, reported_state, goal_state, reported_tli,
                                              reported_lsn, health, primary_epoch, description)
                      SELECT n.formation_id, n.group_id, n.node_id, n.node_name, n.node_host,
                             n.node_port, n.reported_state, n.goal_state, n.reported_tli,
                             n.reported_lsn, n.health, f.primary_epoch,
                             format('New state is reported by node %s (%s): %s', n.node_id, n.node_name, n.reported_state)
                        FROM n JOIN hapg.formation f USING (formation_id)
                       WHERE n.before IS DISTINCT FROM n.reported_state
                   RETURNING 1)
             SELECT n.goal_state::text, n.group_id, f.primary_epoch,
                    pg_notify('{CHANNEL_REPORT}', n.node_id::text),
                    CASE WHEN n.before IS DISTINCT FROM n.reported_state
                         THEN pg_notify('{CHANNEL_STATE}', {STATE_PAYLOAD_SQL}) END,
                    (SELECT count(*) FROM changed)
               FROM n JOIN hapg.formation f USING (formation_id)"
        );
        let row = self
            .client
            .query_opt(
                &sql,
                &[
                    &report.node_id,
                    &report.state.as_str(),
                    &report.pg_running,
                    &report.tli,
                    &format_lsn(report.lsn),
                    &report.rep_state,
                    &report.upstream_streaming,
                    &report.in_recovery,
                    &report
                        .upstream_silence
                        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
                ],
            )
            .await?
            .ok_or(MonitorError::NoSuchNode(report.node_id))?;
        let goal: String = row.try_get(0)?;
        Ok(Assigned {
            goal: goal.parse()?,
            group_id: row.try_get(1)?,
            primary_epoch: row.try_get(2)?,
        })
    }

    /// Records an event a keeper has to tell about its node (how it rejoined
    /// its primary, and why), with the node's current row.
    pub async fn node_event(&self, node_id: i64, description: &str) -> Result<(), MonitorError> {
        self.client
            .execute(
                "INSERT INTO hapg.event (formation_id, group_id, node_id, node_name, node_host,
                                         node_port, reported_state, goal_state, reported_tli,
                                         reported_lsn, health, primary_epoch, description)
                 SELECT n.formation_id, n.group_id, n.node_id, n.node_name, n.node_host,
                        n.node_port, n.reported_state, n.goal_state, n.reported_tli,
                        n.reported_lsn, n.health, f.primary_epoch, $2
                   FROM hapg.node n JOIN hapg.formation f USING (formation_id)
                  WHERE n.node_id = $1",
                &[&node_id, &description],
            )
            .await?;
        Ok(())
    }

    /// A formation's row.
    pub async fn formation(&self, formation: &str) -> Result<FormationRow, MonitorError> {
        let row = self
            .client
            .query_opt(
                "SELECT formation_id, dbname, number_sync_standbys, primary_epoch, primary_node_id
                   FROM hapg.formation WHERE formation_id = $1",
                &[&formation],
            )
            .await?
            .ok_or_else(|| MonitorError::NoSuchFormation(formation.to_string()))?;
        Ok(FormationRow {
            formation: row.try_get(0)?,
            dbname: row.try_get(1)?,
            number_sync_standbys: row.try_get(2)?,
            primary_epoch: row.try_get(3)?,
            primary_node_id: row.try_get(4)?,
        })
    }

    /// Every formation.
    pub async fn formations(&self) -> Result<Vec<FormationRow>, MonitorError> {
        let rows = self
            .client
            .query(
                "SELECT formation_id FROM hapg.formation ORDER BY formation_id",
                &[],
            )
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.try_get(0)?;
            out.push(self.formation(&id).await?);
        }
        Ok(out)
    }

    /// The nodes of a formation (all groups when `group` is `None`), by group and id.
    pub async fn nodes(
        &self,
        formation: &str,
        group: Option<i32>,
    ) -> Result<Vec<NodeRow>, MonitorError> {
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT {NODE_COLUMNS} FROM hapg.node n
                      WHERE n.formation_id = $1 AND ($2::int IS NULL OR n.group_id = $2)
                      ORDER BY n.group_id, n.node_id"
                ),
                &[&formation, &group],
            )
            .await?;
        rows.iter().map(NodeRow::from_row).collect()
    }

    /// One node by id.
    pub async fn node(&self, node_id: i64) -> Result<NodeRow, MonitorError> {
        let row = self
            .client
            .query_opt(
                &format!("SELECT {NODE_COLUMNS} FROM hapg.node n WHERE n.node_id = $1"),
                &[&node_id],
            )
            .await?
            .ok_or(MonitorError::NoSuchNode(node_id))?;
        NodeRow::from_row(&row)
    }

    /// One node by name.
    pub async fn node_by_name(&self, formation: &str, name: &str) -> Result<NodeRow, MonitorError> {
        let row = self
            .client
            .query_opt(
                &format!(
                    "SELECT {NODE_COLUMNS} FROM hapg.node n WHERE n.formation_id = $1 AND n.node_name = $2"
                ),
                &[&formation, &name],
            )
            .await?
            .ok_or_else(|| MonitorError::NoSuchNodeName {
                formation: formation.to_string(),
                name: name.to_string(),
            })?;
        NodeRow::from_row(&row)
    }

    /// A group as the state machine sees it (thresholds at their defaults).
    pub async fn group_view(&self, formation: &str, group: i32) -> Result<GroupView, MonitorError> {
        Ok(self.group(formation, group).await?.1)
    }

    /// A group's nodes, and the same group as the state machine sees it.
    pub async fn group(
        &self,
        formation: &str,
        group: i32,
    ) -> Result<(Vec<NodeRow>, GroupView), MonitorError> {
        let f = self.formation(formation).await?;
        let nodes = self.nodes(formation, Some(group)).await?;
        let view = GroupView {
            nodes: nodes.iter().map(NodeRow::view).collect(),
            number_sync_standbys: f.number_sync_standbys,
            monitor_uptime: Duration::MAX,
            thresholds: Thresholds::default(),
            switchover: None,
            preferred_candidate: None,
        };
        Ok((nodes, view))
    }

    /// The newest `count` events of a formation, oldest first.
    pub async fn events(&self, formation: &str, count: i64) -> Result<Vec<EventRow>, MonitorError> {
        let rows = self
            .client
            .query(
                "SELECT * FROM (
                    SELECT event_id, to_char(event_time, 'YYYY-MM-DD HH24:MI:SS.US'), formation_id,
                           group_id, node_id, node_name, reported_state::text, goal_state::text,
                           primary_epoch, description
                      FROM hapg.event WHERE formation_id = $1
                     ORDER BY event_id DESC LIMIT $2) e
                 ORDER BY event_id",
                &[&formation, &count],
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(EventRow {
                    event_id: row.try_get(0)?,
                    event_time: row.try_get(1)?,
                    formation: row.try_get(2)?,
                    group_id: row.try_get(3)?,
                    node_id: row.try_get(4)?,
                    node_name: row.try_get(5)?,
                    reported_state: row.try_get(6)?,
                    goal_state: row.try_get(7)?,
                    primary_epoch: row.try_get(8)?,
                    description: row.try_get(9)?,
                })
            })
            .collect()
    }

    /// `synchronous_standby_names` the monitor wants on a group's primary.
    pub async fn synchronous_standby_names(
        &self,
        formation: &str,
        group: i32,
    ) -> Result<String, MonitorError> {
        let view = self.group_view(formation, group).await?;
        Ok(match view.primary() {
            Some(p) => crate::fsm::synchronous_standby_names(&view, p.id),
            None => String::new(),
        })
    }

    /// Files an operator request and waits for the monitor service to accept
    /// or refuse it; a refusal comes back as [`MonitorError::Refused`] with the reason.
    pub async fn request(
        &mut self,
        formation: &str,
        group: i32,
        node_id: Option<i64>,
        kind: RequestKind,
        timeout: Duration,
    ) -> Result<String, MonitorError> {
        self.request_value(formation, group, node_id, kind, None, timeout)
            .await
    }

    /// [`MonitorClient::request`] with a value (for the settings requests).
    pub async fn request_value(
        &mut self,
        formation: &str,
        group: i32,
        node_id: Option<i64>,
        kind: RequestKind,
        value: Option<String>,
        timeout: Duration,
    ) -> Result<String, MonitorError> {
        self.listen(CHANNEL_REQUEST).await?;
        let id: i64 = self
            .client
            .query_one(
                "WITH r AS (INSERT INTO hapg.request (formation_id, group_id, node_id, kind, value)
                            VALUES ($1, $2, $3, $4, $6) RETURNING request_id)
                 SELECT request_id, pg_notify($5, request_id::text) FROM r",
                &[
                    &formation,
                    &group,
                    &node_id,
                    &kind.as_str(),
                    &CHANNEL_REQUEST,
                    &value,
                ],
            )
            .await?
            .get(0);
        let deadline = Instant::now() + timeout;
        loop {
            let row = self
                .client
                .query_one(
                    "SELECT status, coalesce(reply, '') FROM hapg.request WHERE request_id = $1",
                    &[&id],
                )
                .await?;
            let status: String = row.get(0);
            let reply: String = row.get(1);
            match status.as_str() {
                "accepted" => return Ok(reply),
                "refused" => return Err(MonitorError::Refused(reply)),
                _ => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(MonitorError::Timeout {
                    what: format!(
                        "the monitor service to answer the {} request (is `hapg run` running on the monitor?)",
                        kind.as_str()
                    ),
                    seconds: timeout.as_secs(),
                });
            }
            self.next_notification((deadline - now).min(Duration::from_millis(250)))
                .await;
        }
    }

    /// Waits until `done` holds for the formation's nodes, re-reading them on
    /// every state notification (and at least every 250 ms).
    pub async fn wait_until<F>(
        &mut self,
        formation: &str,
        what: &str,
        timeout: Duration,
        mut done: F,
    ) -> Result<Vec<NodeRow>, MonitorError>
    where
        F: FnMut(&[NodeRow]) -> bool,
    {
        self.listen_state().await?;
        let deadline = Instant::now() + timeout;
        loop {
            let nodes = self.nodes(formation, None).await?;
            if done(&nodes) {
                return Ok(nodes);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(MonitorError::Timeout {
                    what: what.to_string(),
                    seconds: timeout.as_secs(),
                });
            }
            self.next_notification((deadline - now).min(Duration::from_millis(250)))
                .await;
            while self.try_notification().is_some() {}
        }
    }
}
