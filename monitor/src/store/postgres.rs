//! The monitor store on the monitor's Postgres database: every statement
//! against the `hapg` schema. Conditioned writes lock the formation's row
//! (`FOR UPDATE`, which also orders them with every other decider), compare
//! the group with the version the writer read, and write in the same
//! transaction; LISTEN/NOTIFY is the change feed.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, GenericClient, Row, Transaction};

use super::{
    Assigned, Change, ChangeFeed, Channel, EventRow, FormationRow, GoalEvent, GroupSnapshot,
    GroupVersion, GroupWrite, MonitorStore, NewRequest, NodeReport, NodeRow, NodeVersion,
    PendingRequest, PrimaryChange, Registered, Registration, RequestAnswer, RequestStatus,
    RoutedNode, RouterRegistration, RouterRow, Routing, Written,
};
use crate::error::MonitorError;
use crate::fsm::{Assignment, Setting, SwitchoverDrain};
use crate::pgconn::{self, format_lsn, parse_lsn, redact_uri};
use crate::schema::{self, CHANNEL_DRAIN, CHANNEL_REPORT, CHANNEL_REQUEST, CHANNEL_STATE};
use crate::state::Health;

/// Connection timeout of one attempt to reach the monitor.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The columns [`node_from_row`] reads, in order.
const NODE_COLUMNS: &str =
    "n.node_id, n.formation_id, n.group_id, n.node_name, n.node_host, n.node_port, \
     n.goal_state::text, n.reported_state::text, n.reported_pg_running, n.reported_rep_state, \
     n.reported_tli, n.reported_lsn::text, n.upstream_streaming, \
     (extract(epoch FROM clock_timestamp() - n.report_time) * 1000)::float8, \
     n.health, n.candidate_priority, n.replication_quorum, n.reported_in_recovery, \
     n.upstream_silence_ms";

/// SQL expression building a [`super::StateNotification`] payload from `n`
/// (node) and `f` (formation).
const STATE_PAYLOAD_SQL: &str = "json_build_object(\
    'type', 'state', 'formation', n.formation_id, 'groupId', n.group_id, 'nodeId', n.node_id, \
    'name', n.node_name, 'host', n.node_host, 'port', n.node_port, \
    'reportedState', n.reported_state, 'goalState', n.goal_state, \
    'health', CASE n.health WHEN 1 THEN 'good' WHEN 0 THEN 'bad' ELSE 'unknown' END, \
    'epoch', f.primary_epoch)::text";

/// The formation's columns a [`GroupVersion`] holds, then the drain's age and
/// the routers that have not acknowledged it yet ([`formation_part`] reads them).
const FORMATION_VERSION_SQL: &str =
    "SELECT f.primary_epoch, f.primary_node_id, f.number_sync_standbys,
        (extract(epoch FROM f.switchover_requested_at) * 1000000)::bigint::text,
        f.switchover_target,
        (extract(epoch FROM now() - f.switchover_requested_at) * 1000)::float8,
        (SELECT count(*) FROM hapg.router r
          WHERE r.formation_id = f.formation_id
            AND r.last_seen > now() - interval '3 seconds'
            AND (r.drained_at IS NULL OR r.drained_at < f.switchover_requested_at)),
        f.xmin::text::bigint
   FROM hapg.formation f WHERE f.formation_id = $1";

fn node_from_row(row: &Row) -> Result<NodeRow, MonitorError> {
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

/// The formation's part of a group's version, and its drain.
struct FormationPart {
    version: GroupVersion,
    switchover: Option<SwitchoverDrain>,
}

/// Reads [`FORMATION_VERSION_SQL`] (with `FOR UPDATE` when `lock`).
async fn formation_part(
    client: &impl GenericClient,
    formation: &str,
    lock: bool,
) -> Result<FormationPart, MonitorError> {
    let sql = if lock {
        format!("{FORMATION_VERSION_SQL} FOR UPDATE")
    } else {
        FORMATION_VERSION_SQL.to_string()
    };
    let row = client
        .query_opt(&sql, &[&formation])
        .await?
        .ok_or_else(|| MonitorError::NoSuchFormation(formation.to_string()))?;
    let drain_age: Option<f64> = row.try_get(5)?;
    let routers_pending: i64 = row.try_get(6)?;
    Ok(FormationPart {
        version: GroupVersion {
            revision: row.try_get(7)?,
            primary_epoch: row.try_get(0)?,
            primary_node_id: row.try_get(1)?,
            number_sync_standbys: row.try_get(2)?,
            switchover_requested: row.try_get(3)?,
            switchover_target: row.try_get(4)?,
            nodes: Vec::new(),
        },
        switchover: drain_age.map(|ms| SwitchoverDrain {
            age: Duration::from_millis(ms.max(0.0) as u64),
            routers_pending: usize::try_from(routers_pending).unwrap_or(usize::MAX),
        }),
    })
}

async fn group_nodes(
    client: &impl GenericClient,
    formation: &str,
    group: i32,
) -> Result<Vec<NodeRow>, MonitorError> {
    let rows = client
        .query(
            &format!(
                "SELECT {NODE_COLUMNS} FROM hapg.node n
                  WHERE n.formation_id = $1 AND n.group_id = $2 ORDER BY n.node_id"
            ),
            &[&formation, &group],
        )
        .await?;
    rows.iter().map(node_from_row).collect()
}

fn node_versions(nodes: &[NodeRow]) -> Vec<NodeVersion> {
    nodes
        .iter()
        .map(|n| NodeVersion {
            node_id: n.node_id,
            goal: n.goal,
            candidate_priority: n.candidate_priority,
            replication_quorum: n.replication_quorum,
        })
        .collect()
}

/// Advances the formation's revision (the row's `xmin`: any update writes a
/// new row version), so that a writer that read it before this write is
/// refused even if this write changes nothing it compares.
async fn advance_revision(tx: &Transaction<'_>, formation: &str) -> Result<(), MonitorError> {
    tx.execute(
        "UPDATE hapg.formation SET primary_epoch = primary_epoch WHERE formation_id = $1",
        &[&formation],
    )
    .await?;
    Ok(())
}

/// Locks the formation's row and tells whether the group is still at `expected`.
async fn still_at(
    tx: &Transaction<'_>,
    formation: &str,
    group: i32,
    expected: &GroupVersion,
) -> Result<bool, MonitorError> {
    let mut current = formation_part(tx, formation, true).await?.version;
    current.nodes = node_versions(&group_nodes(tx, formation, group).await?);
    Ok(current == *expected)
}

/// Writes one goal: the node's row, the formation's epoch when a different node
/// becomes writable, an event with the reason, and the state notification.
async fn write_assignment(tx: &Transaction<'_>, a: &Assignment) -> Result<(), MonitorError> {
    let row = tx
        .query_one(
            "UPDATE hapg.node SET goal_state = $2::text::hapg.replication_state,
                                  state_change_time = now()
              WHERE node_id = $1 RETURNING formation_id",
            &[&a.node_id, &a.goal.as_str()],
        )
        .await?;
    let formation: String = row.try_get(0)?;
    if a.goal.can_take_writes() {
        // A different node becomes writable: a new epoch, and a promotion
        // target, if any, has been served.
        tx.execute(
            "UPDATE hapg.formation SET primary_epoch = primary_epoch + 1, primary_node_id = $2,
                                      switchover_target = NULL, switchover_requested_at = NULL
              WHERE formation_id = $1 AND primary_node_id IS DISTINCT FROM $2",
            &[&formation, &a.node_id],
        )
        .await?;
    }
    tx.execute(
        "INSERT INTO hapg.event (formation_id, group_id, node_id, node_name, node_host, node_port,
                                 reported_state, goal_state, reported_tli, reported_lsn, health,
                                 primary_epoch, description)
         SELECT n.formation_id, n.group_id, n.node_id, n.node_name, n.node_host, n.node_port,
                n.reported_state, n.goal_state, n.reported_tli, n.reported_lsn, n.health,
                f.primary_epoch, $2
           FROM hapg.node n JOIN hapg.formation f USING (formation_id)
          WHERE n.node_id = $1",
        &[&a.node_id, &a.reason],
    )
    .await?;
    tx.execute(
        &format!(
            "SELECT pg_notify('{CHANNEL_STATE}', {STATE_PAYLOAD_SQL})
               FROM hapg.node n JOIN hapg.formation f USING (formation_id)
              WHERE n.node_id = $1"
        ),
        &[&a.node_id],
    )
    .await?;
    Ok(())
}

async fn remove_node(tx: &Transaction<'_>, node_id: i64, reason: &str) -> Result<(), MonitorError> {
    tx.execute(
        "INSERT INTO hapg.event (formation_id, group_id, node_id, node_name, node_host, node_port,
                                 reported_state, goal_state, description)
         SELECT formation_id, group_id, node_id, node_name, node_host, node_port,
                reported_state, goal_state, $2
           FROM hapg.node WHERE node_id = $1",
        &[&node_id, &reason],
    )
    .await?;
    tx.execute(
        "UPDATE hapg.formation SET primary_node_id = NULL WHERE primary_node_id = $1",
        &[&node_id],
    )
    .await?;
    tx.execute("DELETE FROM hapg.node WHERE node_id = $1", &[&node_id])
        .await?;
    Ok(())
}

async fn write_group_event(
    client: &impl GenericClient,
    formation: &str,
    group: i32,
    description: &str,
) -> Result<(), MonitorError> {
    client
        .execute(
            "INSERT INTO hapg.event (formation_id, group_id, node_id, primary_epoch, description)
             SELECT $1, $2, NULL::bigint, primary_epoch, $3 FROM hapg.formation WHERE formation_id = $1",
            &[&formation, &group, &description],
        )
        .await?;
    Ok(())
}

async fn clear_switchover(tx: &Transaction<'_>, formation: &str) -> Result<(), MonitorError> {
    tx.execute(
        "UPDATE hapg.formation SET switchover_requested_at = NULL WHERE formation_id = $1",
        &[&formation],
    )
    .await?;
    Ok(())
}

async fn notify(tx: &Transaction<'_>, channel: &str, payload: &str) -> Result<(), MonitorError> {
    tx.execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
        .await?;
    Ok(())
}

/// A connection to the monitor database, as a [`MonitorStore`].
pub struct PgStore {
    client: Client,
}

impl PgStore {
    /// Connects to the monitor database at `uri` as keepers, routers and the
    /// CLI do (TLS as the URI says), and checks the schema version.
    pub async fn connect(uri: &str) -> Result<(PgStore, ChangeFeed), MonitorError> {
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
        let (store, feed) = PgStore::from_connection(connection);
        schema::check(&store.client).await?;
        Ok((store, feed))
    }

    /// A store on an open connection (the monitor service's own, which
    /// migrates the schema rather than checks it).
    pub fn from_connection(connection: pgconn::Connection) -> (PgStore, ChangeFeed) {
        let pgconn::Connection {
            client,
            mut notifications,
        } = connection;
        let (sender, changes) = mpsc::unbounded_channel();
        // Ends with the connection's notification stream, which ends the feed.
        tokio::spawn(async move {
            while let Some(n) = notifications.recv().await {
                let Some(channel) = Channel::from_name(n.channel()) else {
                    continue;
                };
                let change = Change {
                    channel,
                    payload: n.payload().to_string(),
                };
                if sender.send(change).is_err() {
                    return;
                }
            }
        });
        (PgStore { client }, ChangeFeed::new(changes))
    }

    async fn write_group(
        tx: &Transaction<'_>,
        formation: &str,
        group: i32,
        write: &GroupWrite,
    ) -> Result<(), MonitorError> {
        match write {
            GroupWrite::Assign {
                assignments,
                end_drain,
            } => {
                for a in assignments {
                    write_assignment(tx, a).await?;
                }
                if *end_drain {
                    clear_switchover(tx, formation).await?;
                }
            }
            GroupWrite::Remove { node_id, reason } => remove_node(tx, *node_id, reason).await?,
            GroupWrite::SetNumberSyncStandbys { value, reason } => {
                tx.execute(
                    "UPDATE hapg.formation SET number_sync_standbys = $2 WHERE formation_id = $1",
                    &[&formation, value],
                )
                .await?;
                write_group_event(tx, formation, group, reason).await?;
            }
            GroupWrite::AbandonSwitchover { reason } => {
                clear_switchover(tx, formation).await?;
                // Routers holding transactions for the drain resume at once.
                notify(tx, CHANNEL_DRAIN, formation).await?;
                write_group_event(tx, formation, group, reason).await?;
            }
        }
        Ok(())
    }

    async fn write_answer(
        tx: &Transaction<'_>,
        request: &PendingRequest,
        answer: &RequestAnswer,
    ) -> Result<(), MonitorError> {
        let formation = request.formation.as_str();
        let group = request.group_id;
        match answer {
            RequestAnswer::Refuse(_) => {}
            RequestAnswer::Setting { setting, reply } => {
                match *setting {
                    Setting::CandidatePriority(node, value) => {
                        tx.execute(
                            "UPDATE hapg.node SET candidate_priority = $2 WHERE node_id = $1",
                            &[&node, &value],
                        )
                        .await?;
                    }
                    Setting::ReplicationQuorum(node, value) => {
                        tx.execute(
                            "UPDATE hapg.node SET replication_quorum = $2 WHERE node_id = $1",
                            &[&node, &value],
                        )
                        .await?;
                    }
                    Setting::NumberSyncStandbys(value) => {
                        tx.execute(
                            "UPDATE hapg.formation SET number_sync_standbys = $2 WHERE formation_id = $1",
                            &[&formation, &value],
                        )
                        .await?;
                    }
                }
                write_group_event(tx, formation, group, reply).await?;
                // Keepers re-read synchronous_standby_names from the new settings.
                notify(tx, CHANNEL_REPORT, formation).await?;
            }
            RequestAnswer::StartSwitchover { target, reason } => {
                tx.execute(
                    "UPDATE hapg.formation SET switchover_requested_at = now(), switchover_target = $2
                      WHERE formation_id = $1",
                    &[&formation, target],
                )
                .await?;
                notify(tx, CHANNEL_DRAIN, formation).await?;
                write_group_event(tx, formation, group, reason).await?;
            }
            RequestAnswer::Assign { assignments, .. } => {
                for a in assignments {
                    write_assignment(tx, a).await?;
                }
            }
        }
        let (status, reply) = match answer {
            RequestAnswer::Refuse(reason) => ("refused", reason.as_str()),
            RequestAnswer::Setting { reply, .. } | RequestAnswer::Assign { reply, .. } => {
                ("accepted", reply.as_str())
            }
            RequestAnswer::StartSwitchover { reason, .. } => ("accepted", reason.as_str()),
        };
        tx.execute(
            "UPDATE hapg.request SET status = $2, reply = $3, answered_at = now()
              WHERE request_id = $1",
            &[&request.id, &status, &reply],
        )
        .await?;
        notify(tx, CHANNEL_REQUEST, &request.id.to_string()).await
    }
}

#[async_trait]
impl MonitorStore for PgStore {
    fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    async fn migrate(&mut self) -> Result<i32, MonitorError> {
        schema::migrate(&mut self.client).await
    }

    async fn formation(&self, formation: &str) -> Result<FormationRow, MonitorError> {
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

    async fn formations(&self) -> Result<Vec<FormationRow>, MonitorError> {
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

    async fn nodes(
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
        rows.iter().map(node_from_row).collect()
    }

    async fn all_nodes(&self) -> Result<Vec<NodeRow>, MonitorError> {
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT {NODE_COLUMNS} FROM hapg.node n
                      ORDER BY n.formation_id, n.group_id, n.node_id"
                ),
                &[],
            )
            .await?;
        rows.iter().map(node_from_row).collect()
    }

    async fn node(&self, node_id: i64) -> Result<NodeRow, MonitorError> {
        let row = self
            .client
            .query_opt(
                &format!("SELECT {NODE_COLUMNS} FROM hapg.node n WHERE n.node_id = $1"),
                &[&node_id],
            )
            .await?
            .ok_or(MonitorError::NoSuchNode(node_id))?;
        node_from_row(&row)
    }

    async fn node_by_name(&self, formation: &str, name: &str) -> Result<NodeRow, MonitorError> {
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
        node_from_row(&row)
    }

    async fn group_snapshot(
        &self,
        formation: &str,
        group: i32,
    ) -> Result<GroupSnapshot, MonitorError> {
        let part = formation_part(&self.client, formation, false).await?;
        let nodes = group_nodes(&self.client, formation, group).await?;
        let mut version = part.version;
        version.nodes = node_versions(&nodes);
        Ok(GroupSnapshot {
            nodes,
            number_sync_standbys: version.number_sync_standbys,
            switchover: part.switchover,
            preferred_candidate: version.switchover_target,
            version,
        })
    }

    async fn events(&self, formation: &str, count: i64) -> Result<Vec<EventRow>, MonitorError> {
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

    async fn goal_history(&self) -> Result<Vec<GoalEvent>, MonitorError> {
        let rows = self
            .client
            .query(
                "SELECT extract(epoch FROM event_time)::float8, node_port, goal_state::text, node_name
                   FROM hapg.event
                  WHERE node_port IS NOT NULL AND goal_state IS NOT NULL
                  ORDER BY event_id",
                &[],
            )
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let port: i32 = row.try_get(1)?;
            let goal: String = row.try_get(2)?;
            out.push(GoalEvent {
                time: row.try_get(0)?,
                node_name: row.try_get(3)?,
                node_port: u16::try_from(port)
                    .map_err(|_| MonitorError::Corrupt(format!("node port {port}")))?,
                goal: goal.parse()?,
            });
        }
        Ok(out)
    }

    async fn primary_changes(&self) -> Result<Vec<PrimaryChange>, MonitorError> {
        let rows = self
            .client
            .query(
                "SELECT s.formation_id, s.epoch,
                        extract(epoch FROM e.ended - s.started)::float8
                   FROM (SELECT formation_id, primary_epoch + 1 AS epoch,
                                min(event_time) AS started
                           FROM hapg.event
                          WHERE goal_state IN ('draining', 'demote_timeout', 'prepare_promotion',
                                               'stop_replication', 'report_lsn')
                          GROUP BY formation_id, primary_epoch) s
                   JOIN (SELECT formation_id, primary_epoch AS epoch, min(event_time) AS ended
                           FROM hapg.event
                          WHERE reported_state IN ('single', 'wait_primary', 'primary')
                            AND description LIKE 'New state is reported by node %'
                          GROUP BY formation_id, primary_epoch) e USING (formation_id, epoch)
                  WHERE e.ended >= s.started
                  ORDER BY s.formation_id, s.epoch",
                &[],
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(PrimaryChange {
                    formation: row.try_get(0)?,
                    epoch: row.try_get(1)?,
                    duration: Duration::from_secs_f64(row.try_get::<_, f64>(2)?.max(0.0)),
                })
            })
            .collect()
    }

    async fn clock(&self) -> Result<String, MonitorError> {
        Ok(self
            .client
            .query_one("SELECT to_char(now(), 'YYYY-MM-DD HH24:MI:SS')", &[])
            .await?
            .try_get(0)?)
    }

    async fn routing(&self, formation: &str) -> Result<Routing, MonitorError> {
        let row = self
            .client
            .query_opt(
                "SELECT f.primary_epoch, n.node_id, n.node_host, n.node_port,
                        n.goal_state::text, n.reported_state::text,
                        f.switchover_requested_at::text
                   FROM hapg.formation f
                   LEFT JOIN hapg.node n ON n.node_id = f.primary_node_id
                  WHERE f.formation_id = $1",
                &[&formation],
            )
            .await?
            .ok_or_else(|| MonitorError::NoSuchFormation(formation.to_string()))?;
        let node_id: Option<i64> = row.try_get(1)?;
        let primary = match node_id {
            None => None,
            Some(node_id) => {
                let port: i32 = row.try_get(3)?;
                let goal: String = row.try_get(4)?;
                let reported: String = row.try_get(5)?;
                Some(RoutedNode {
                    node_id,
                    host: row.try_get(2)?,
                    port: u16::try_from(port)
                        .map_err(|_| MonitorError::Corrupt(format!("node port {port}")))?,
                    goal: goal.parse()?,
                    reported: reported.parse()?,
                })
            }
        };
        Ok(Routing {
            epoch: row.try_get(0)?,
            primary,
            switchover_requested: row.try_get(6)?,
        })
    }

    async fn routers(&self, within: Duration) -> Result<Vec<RouterRow>, MonitorError> {
        let rows = self
            .client
            .query(
                "SELECT router_id, formation_id, address, read_only_address FROM hapg.router
                  WHERE last_seen > now() - make_interval(secs => $1) ORDER BY router_id",
                &[&within.as_secs_f64()],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(RouterRow {
                    router_id: r.try_get(0)?,
                    formation: r.try_get(1)?,
                    address: r.try_get(2)?,
                    read_only_address: r.try_get(3)?,
                })
            })
            .collect()
    }

    async fn register(&self, reg: &Registration) -> Result<Registered, MonitorError> {
        let formation = self.formation(&reg.formation).await?;
        let count: i64 = self
            .client
            .query_one(
                "SELECT count(*) FROM hapg.node WHERE formation_id = $1",
                &[&reg.formation],
            )
            .await?
            .try_get(0)?;
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
                node_id: row.try_get(0)?,
                group_id: row.try_get(1)?,
                name: row.try_get(2)?,
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

    async fn report(&self, report: &NodeReport) -> Result<Assigned, MonitorError> {
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

    async fn node_event(&self, node_id: i64, description: &str) -> Result<(), MonitorError> {
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

    async fn apply(
        &mut self,
        formation: &str,
        group: i32,
        expected: &GroupVersion,
        write: GroupWrite,
    ) -> Result<Written, MonitorError> {
        let tx = self.client.transaction().await?;
        if !still_at(&tx, formation, group, expected).await? {
            tx.rollback().await?;
            return Ok(Written::Stale);
        }
        advance_revision(&tx, formation).await?;
        PgStore::write_group(&tx, formation, group, &write).await?;
        tx.commit().await?;
        Ok(Written::Applied)
    }

    async fn group_event(
        &self,
        formation: &str,
        group: i32,
        description: &str,
    ) -> Result<(), MonitorError> {
        write_group_event(&self.client, formation, group, description).await
    }

    async fn record_health(
        &self,
        node_id: i64,
        health: Health,
        changed: Option<&str>,
    ) -> Result<(), MonitorError> {
        self.client
            .execute(
                "UPDATE hapg.node SET health = $2, health_check_time = now() WHERE node_id = $1",
                &[&node_id, &health.to_db()],
            )
            .await?;
        if let Some(description) = changed {
            self.client
                .execute(
                    &format!(
                        "WITH e AS (INSERT INTO hapg.event (formation_id, group_id, node_id, node_name,
                                         node_host, node_port, reported_state, goal_state, health,
                                         primary_epoch, description)
                                    SELECT n.formation_id, n.group_id, n.node_id, n.node_name,
                                           n.node_host, n.node_port, n.reported_state, n.goal_state,
                                           n.health, f.primary_epoch, $2
                                      FROM hapg.node n JOIN hapg.formation f USING (formation_id)
                                     WHERE n.node_id = $1 RETURNING 1)
                         SELECT pg_notify('{CHANNEL_STATE}', {STATE_PAYLOAD_SQL}), (SELECT count(*) FROM e)
                           FROM hapg.node n JOIN hapg.formation f USING (formation_id)
                          WHERE n.node_id = $1"
                    ),
                    &[&node_id, &description],
                )
                .await?;
        }
        Ok(())
    }

    async fn pending_requests(&self) -> Result<Vec<PendingRequest>, MonitorError> {
        let rows = self
            .client
            .query(
                "SELECT request_id, formation_id, group_id, node_id, kind, value,
                        extract(epoch FROM now() - created_at)::float8
                   FROM hapg.request WHERE status = 'pending'
                  ORDER BY request_id",
                &[],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let age: f64 = row.try_get(6)?;
                Ok(PendingRequest {
                    id: row.try_get(0)?,
                    formation: row.try_get(1)?,
                    group_id: row.try_get(2)?,
                    node_id: row.try_get(3)?,
                    kind: row.try_get(4)?,
                    value: row.try_get(5)?,
                    age: Duration::from_secs_f64(age.max(0.0)),
                })
            })
            .collect()
    }

    async fn answer_request(
        &mut self,
        request: &PendingRequest,
        expected: Option<&GroupVersion>,
        answer: RequestAnswer,
    ) -> Result<Written, MonitorError> {
        let tx = self.client.transaction().await?;
        let pending = tx
            .query_opt(
                "SELECT 1 FROM hapg.request WHERE request_id = $1 AND status = 'pending' FOR UPDATE",
                &[&request.id],
            )
            .await?
            .is_some();
        let current = match expected {
            Some(version) if pending => {
                still_at(&tx, &request.formation, request.group_id, version).await?
            }
            _ => pending,
        };
        if !current {
            tx.rollback().await?;
            return Ok(Written::Stale);
        }
        if !matches!(answer, RequestAnswer::Refuse(_)) {
            advance_revision(&tx, &request.formation).await?;
        }
        PgStore::write_answer(&tx, request, &answer).await?;
        tx.commit().await?;
        Ok(Written::Applied)
    }

    async fn file_request(&self, request: &NewRequest) -> Result<i64, MonitorError> {
        Ok(self
            .client
            .query_one(
                "WITH r AS (INSERT INTO hapg.request (formation_id, group_id, node_id, kind, value)
                            VALUES ($1, $2, $3, $4, $6) RETURNING request_id)
                 SELECT request_id, pg_notify($5, request_id::text) FROM r",
                &[
                    &request.formation,
                    &request.group_id,
                    &request.node_id,
                    &request.kind.as_str(),
                    &CHANNEL_REQUEST,
                    &request.value,
                ],
            )
            .await?
            .try_get(0)?)
    }

    async fn request_status(&self, request_id: i64) -> Result<RequestStatus, MonitorError> {
        let row = self
            .client
            .query_one(
                "SELECT status, coalesce(reply, '') FROM hapg.request WHERE request_id = $1",
                &[&request_id],
            )
            .await?;
        let status: String = row.try_get(0)?;
        let reply: String = row.try_get(1)?;
        Ok(RequestStatus::from_stored(&status, reply))
    }

    async fn register_router(
        &self,
        router: &RouterRegistration,
        drained: bool,
    ) -> Result<(), MonitorError> {
        let sql = if drained {
            "INSERT INTO hapg.router (router_id, formation_id, address, last_seen, routed_epoch, drained_at, read_only_address)
             VALUES ($1, $2, $3, now(), $4, now(), $5)
             ON CONFLICT (router_id) DO UPDATE
                SET formation_id = excluded.formation_id, address = excluded.address,
                    last_seen = now(), routed_epoch = excluded.routed_epoch,
                    drained_at = now(), read_only_address = excluded.read_only_address"
        } else {
            "INSERT INTO hapg.router (router_id, formation_id, address, last_seen, routed_epoch, read_only_address)
             VALUES ($1, $2, $3, now(), $4, $5)
             ON CONFLICT (router_id) DO UPDATE
                SET formation_id = excluded.formation_id, address = excluded.address,
                    last_seen = now(), routed_epoch = excluded.routed_epoch,
                    read_only_address = excluded.read_only_address"
        };
        self.client
            .execute(
                sql,
                &[
                    &router.router_id,
                    &router.formation,
                    &router.address,
                    &router.routed_epoch,
                    &router.read_only_address,
                ],
            )
            .await?;
        Ok(())
    }

    async fn listen(&self, channels: &[Channel]) -> Result<(), MonitorError> {
        let sql: Vec<String> = channels
            .iter()
            .map(|c| {
                format!(
                    "LISTEN {}",
                    postgres_protocol::escape::escape_identifier(c.name())
                )
            })
            .collect();
        self.client.batch_execute(&sql.join("; ")).await?;
        Ok(())
    }
}
