//! The monitor service: migrates the schema, health-checks every node, and is the
//! only writer of goal states. It wakes on keeper reports and operator requests
//! (LISTEN) and on a short tick, runs the pure state machine for each group, and
//! writes each decision as one transaction: goals, events and NOTIFY together.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hapg_config::MonitorTimings;
use tokio_postgres::{Client, Config, Transaction};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::client::{NodeRow, RequestKind, NODE_COLUMNS, STATE_PAYLOAD_SQL};
use crate::error::MonitorError;
use crate::fsm::{
    self, Assignment, Decision, GroupView, Request, Setting, SwitchoverDrain, Thresholds,
};
use crate::pgconn;
use crate::schema::{self, CHANNEL_DRAIN, CHANNEL_REPORT, CHANNEL_REQUEST, CHANNEL_STATE};
use crate::state::{Health, NodeState};

/// Requests not answered within this long are refused as expired: the CLI that
/// filed them has given up, and acting late would surprise the operator.
const REQUEST_EXPIRY_SECS: f64 = 30.0;
/// Decisions applied per group per wake-up at most (a guard against a rule loop).
const MAX_DECISIONS_PER_ROUND: usize = 16;

/// Runs the monitor service against the monitor database at `conninfo` (a
/// superuser connection on the monitor host) until `shutdown` is cancelled.
pub async fn run(
    conninfo: &str,
    timings: MonitorTimings,
    shutdown: CancellationToken,
) -> Result<(), MonitorError> {
    let config: Config =
        conninfo
            .parse()
            .map_err(|e: tokio_postgres::Error| MonitorError::BadUri {
                uri: pgconn::redact_uri(conninfo),
                reason: e.to_string(),
            })?;
    let started = Instant::now();
    let mut connection = connect_until(&config, &shutdown).await?;
    schema::migrate(&mut connection.client).await?;

    let health = tokio::spawn(
        health_checks(config.clone(), timings.clone(), shutdown.clone())
            .instrument(tracing::info_span!("health_checks")),
    );

    let thresholds = Thresholds {
        unhealthy_timeout: timings.unhealthy_timeout,
        startup_grace: timings.startup_grace,
        catchup_threshold: timings.wal_threshold_bytes,
        promote_threshold: timings.wal_threshold_bytes,
        router_drain_timeout: timings.router_drain_timeout,
        upstream_silence_timeout: timings.upstream_silence_timeout,
    };
    let mut decider = Decider {
        thresholds,
        started,
        holds: HashMap::new(),
    };
    tracing::info!("monitor service running");
    while !shutdown.is_cancelled() {
        if connection.client.is_closed() {
            tracing::warn!("lost the monitor database connection, reconnecting");
            connection = connect_until(&config, &shutdown).await?;
        }
        let round = async {
            connection
                .client
                .batch_execute(&format!(
                    "LISTEN {CHANNEL_REPORT}; LISTEN {CHANNEL_REQUEST}"
                ))
                .await?;
            decider.round(&mut connection.client).await
        };
        if let Err(e) = round.await {
            tracing::warn!(error = %e, "monitor round failed");
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(timings.tick) => {}
            _ = connection.notifications.recv() => {}
        }
        while connection.notifications.try_recv().is_ok() {}
    }
    health.abort();
    tracing::info!("monitor service stopped");
    Ok(())
}

async fn connect_until(
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<pgconn::Connection, MonitorError> {
    let mut delay = Duration::from_millis(100);
    loop {
        match pgconn::connect(config.clone(), Duration::from_secs(2)).await {
            Ok(c) => return Ok(c),
            Err(e) => {
                tracing::debug!(error = %e, "monitor database not reachable yet");
                tokio::select! {
                    _ = shutdown.cancelled() => return Err(e.into()),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Decision-making state kept across rounds.
struct Decider {
    thresholds: Thresholds,
    started: Instant,
    /// Last hold reason written per group, so a waiting group logs it once.
    holds: HashMap<(String, i32), String>,
}

impl Decider {
    async fn round(&mut self, client: &mut Client) -> Result<(), MonitorError> {
        self.answer_requests(client).await?;
        let groups = client
            .query(
                "SELECT DISTINCT formation_id, group_id FROM hapg.node ORDER BY 1, 2",
                &[],
            )
            .await?;
        for row in groups {
            let formation: String = row.try_get(0)?;
            let group: i32 = row.try_get(1)?;
            for _ in 0..MAX_DECISIONS_PER_ROUND {
                if !self.decide_once(client, &formation, group).await? {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Runs the state machine once for a group; true when it changed something.
    async fn decide_once(
        &mut self,
        client: &mut Client,
        formation: &str,
        group: i32,
    ) -> Result<bool, MonitorError> {
        let tx = client.transaction().await?;
        let view = self.load_group(&tx, formation, group).await?;
        let decision = fsm::decide(&view);
        let view = &view;
        let changed = match decision {
            None => false,
            Some(Decision::Assign(assignments)) => {
                for a in &assignments {
                    apply_assignment(&tx, a).await?;
                }
                if view.switchover.is_some()
                    && assignments.iter().any(|a| a.goal == NodeState::Draining)
                {
                    // The primary is told to stop: the switchover left the drain phase.
                    tx.execute(
                        "UPDATE hapg.formation SET switchover_requested_at = NULL WHERE formation_id = $1",
                        &[&formation],
                    )
                    .await?;
                }
                self.holds.remove(&(formation.to_string(), group));
                true
            }
            Some(Decision::Remove { node_id, reason }) => {
                remove_node(&tx, node_id, &reason).await?;
                true
            }
            Some(Decision::SetNumberSyncStandbys { value, reason }) => {
                tracing::info!(formation, "{reason}");
                tx.execute(
                    "UPDATE hapg.formation SET number_sync_standbys = $2 WHERE formation_id = $1",
                    &[&formation, &value],
                )
                .await?;
                write_event(&tx, formation, group, None, &reason).await?;
                true
            }
            Some(Decision::Hold(reason)) => {
                let key = (formation.to_string(), group);
                if self.holds.get(&key) != Some(&reason) {
                    tracing::warn!(formation, group, "{reason}");
                    write_event(&tx, formation, group, None, &reason).await?;
                    self.holds.insert(key, reason);
                }
                false
            }
        };
        if let Some(drain) = &view.switchover {
            let stale = drain.age > self.thresholds.router_drain_timeout * 3;
            if !changed && stale {
                let reason =
                    "Switchover abandoned: the primary did not become ready to stop in time";
                tx.execute(
                    "UPDATE hapg.formation SET switchover_requested_at = NULL WHERE formation_id = $1",
                    &[&formation],
                )
                .await?;
                // Routers holding transactions for the drain resume at once.
                tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL_DRAIN, &formation])
                    .await?;
                write_event(&tx, formation, group, None, reason).await?;
            }
        }
        tx.commit().await?;
        Ok(changed)
    }

    async fn load_group(
        &self,
        tx: &Transaction<'_>,
        formation: &str,
        group: i32,
    ) -> Result<GroupView, MonitorError> {
        // Serialise deciders (a second monitor service, a request) per formation.
        let f = tx
            .query_one(
                "SELECT f.number_sync_standbys,
                        (extract(epoch FROM now() - f.switchover_requested_at) * 1000)::float8,
                        f.switchover_target,
                        (SELECT count(*) FROM hapg.router r
                          WHERE r.formation_id = f.formation_id
                            AND r.last_seen > now() - interval '3 seconds'
                            AND (r.drained_at IS NULL OR r.drained_at < f.switchover_requested_at))
                   FROM hapg.formation f WHERE f.formation_id = $1 FOR UPDATE",
                &[&formation],
            )
            .await?;
        let nss: i32 = f.try_get(0)?;
        let drain_age: Option<f64> = f.try_get(1)?;
        let preferred_candidate: Option<i64> = f.try_get(2)?;
        let routers_pending: i64 = f.try_get(3)?;
        let switchover = drain_age.map(|ms| SwitchoverDrain {
            age: Duration::from_millis(ms.max(0.0) as u64),
            routers_pending: usize::try_from(routers_pending).unwrap_or(usize::MAX),
        });
        let rows = tx
            .query(
                &format!(
                    "SELECT {NODE_COLUMNS} FROM hapg.node n
                      WHERE n.formation_id = $1 AND n.group_id = $2 ORDER BY n.node_id"
                ),
                &[&formation, &group],
            )
            .await?;
        let nodes: Vec<NodeRow> = rows
            .iter()
            .map(NodeRow::from_row)
            .collect::<Result<_, _>>()?;
        Ok(GroupView {
            nodes: nodes.iter().map(NodeRow::view).collect(),
            number_sync_standbys: nss,
            monitor_uptime: self.started.elapsed(),
            thresholds: self.thresholds.clone(),
            switchover,
            preferred_candidate,
        })
    }

    async fn answer_requests(&mut self, client: &mut Client) -> Result<(), MonitorError> {
        let tx = client.transaction().await?;
        let pending = tx
            .query(
                "SELECT request_id, formation_id, group_id, node_id, kind, value,
                        extract(epoch FROM now() - created_at)::float8
                   FROM hapg.request WHERE status = 'pending'
                  ORDER BY request_id FOR UPDATE SKIP LOCKED",
                &[],
            )
            .await?;
        for row in pending {
            let id: i64 = row.try_get(0)?;
            let formation: String = row.try_get(1)?;
            let group: i32 = row.try_get(2)?;
            let node_id: Option<i64> = row.try_get(3)?;
            let kind: String = row.try_get(4)?;
            let value: Option<String> = row.try_get(5)?;
            let age: f64 = row.try_get(6)?;
            let answer = if age > REQUEST_EXPIRY_SECS {
                Err(format!(
                    "the request expired after {REQUEST_EXPIRY_SECS} s without an answer"
                ))
            } else {
                match parse_operation(&kind, node_id, value.as_deref()) {
                    Err(reason) => Err(reason),
                    Ok(operation) => {
                        let view = self.load_group(&tx, &formation, group).await?;
                        self.carry_out(&tx, &formation, group, &view, operation)
                            .await?
                    }
                }
            };
            let (status, reply) = match answer {
                Ok(reply) => ("accepted", reply),
                Err(reason) => {
                    tracing::info!(request = id, kind, "refused: {reason}");
                    ("refused", reason)
                }
            };
            tx.execute(
                "UPDATE hapg.request SET status = $2, reply = $3, answered_at = now()
                  WHERE request_id = $1",
                &[&id, &status, &reply],
            )
            .await?;
            tx.execute(
                "SELECT pg_notify($1, $2)",
                &[&CHANNEL_REQUEST, &id.to_string()],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Decides on one operation and writes its effect; the inner error is a
    /// refusal for the operator, the outer one a database failure.
    async fn carry_out(
        &mut self,
        tx: &Transaction<'_>,
        formation: &str,
        group: i32,
        view: &GroupView,
        operation: Operation,
    ) -> Result<Result<String, String>, MonitorError> {
        match operation {
            Operation::Setting(setting) => {
                let reply = match fsm::check_setting(view, setting) {
                    Ok(reply) => reply,
                    Err(reason) => return Ok(Err(reason)),
                };
                match setting {
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
                write_event(tx, formation, group, None, &reply).await?;
                // Keepers re-read synchronous_standby_names from the new settings.
                tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL_REPORT, &formation])
                    .await?;
                Ok(Ok(reply))
            }
            Operation::Request(request) => {
                let assignments = match fsm::on_request(view, request) {
                    Ok(assignments) => assignments,
                    Err(reason) => return Ok(Err(reason)),
                };
                if let Request::Switchover | Request::Promote(_) = request {
                    let target = match request {
                        Request::Promote(node) => Some(node),
                        _ => None,
                    };
                    tx.execute(
                        "UPDATE hapg.formation SET switchover_requested_at = now(), switchover_target = $2
                          WHERE formation_id = $1",
                        &[&formation, &target],
                    )
                    .await?;
                    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL_DRAIN, &formation])
                        .await?;
                    let reason = "Switchover requested: routers drain the primary, then it stops and a standby takes over";
                    write_event(tx, formation, group, None, reason).await?;
                    return Ok(Ok(reason.to_string()));
                }
                for a in &assignments {
                    apply_assignment(tx, a).await?;
                }
                Ok(Ok(assignments
                    .iter()
                    .map(|a| a.reason.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")))
            }
        }
    }
}

/// What an operator request asks for.
enum Operation {
    Request(Request),
    Setting(Setting),
}

fn parse_operation(
    kind: &str,
    node: Option<i64>,
    value: Option<&str>,
) -> Result<Operation, String> {
    let malformed = || format!("malformed request {kind:?}");
    let node_id = || node.ok_or_else(malformed);
    let value = || value.ok_or_else(malformed);
    let kind = RequestKind::parse(kind).ok_or_else(malformed)?;
    Ok(match kind {
        RequestKind::Switchover | RequestKind::Failover => Operation::Request(Request::Switchover),
        RequestKind::EnableMaintenance => {
            Operation::Request(Request::EnableMaintenance(node_id()?))
        }
        RequestKind::DisableMaintenance => {
            Operation::Request(Request::DisableMaintenance(node_id()?))
        }
        RequestKind::Drop => Operation::Request(Request::Drop(node_id()?)),
        RequestKind::Promotion => Operation::Request(Request::Promote(node_id()?)),
        RequestKind::SetCandidatePriority => Operation::Setting(Setting::CandidatePriority(
            node_id()?,
            value()?.parse().map_err(|_| {
                "candidate priority must be a whole number from 0 to 100".to_string()
            })?,
        )),
        RequestKind::SetReplicationQuorum => Operation::Setting(Setting::ReplicationQuorum(
            node_id()?,
            value()?
                .parse()
                .map_err(|_| "replication quorum must be true or false".to_string())?,
        )),
        RequestKind::SetNumberSyncStandbys => Operation::Setting(Setting::NumberSyncStandbys(
            value()?
                .parse()
                .map_err(|_| "number_sync_standbys must be a whole number".to_string())?,
        )),
    })
}

/// Writes one goal: the node's row, the formation's epoch when a different node
/// becomes writable, an event with the reason, and the state notification.
async fn apply_assignment(tx: &Transaction<'_>, a: &Assignment) -> Result<(), MonitorError> {
    tracing::info!(node_id = a.node_id, goal = %a.goal, "{}", a.reason);
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
    notify_state(tx, a.node_id).await
}

async fn notify_state(tx: &Transaction<'_>, node_id: i64) -> Result<(), MonitorError> {
    tx.execute(
        &format!(
            "SELECT pg_notify('{CHANNEL_STATE}', {STATE_PAYLOAD_SQL})
               FROM hapg.node n JOIN hapg.formation f USING (formation_id)
              WHERE n.node_id = $1"
        ),
        &[&node_id],
    )
    .await?;
    Ok(())
}

async fn remove_node(tx: &Transaction<'_>, node_id: i64, reason: &str) -> Result<(), MonitorError> {
    tracing::info!(node_id, "{reason}");
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

async fn write_event(
    tx: &Transaction<'_>,
    formation: &str,
    group: i32,
    node_id: Option<i64>,
    description: &str,
) -> Result<(), MonitorError> {
    tx.execute(
        "INSERT INTO hapg.event (formation_id, group_id, node_id, primary_epoch, description)
         SELECT $1, $2, $3, primary_epoch, $4 FROM hapg.formation WHERE formation_id = $1",
        &[&formation, &group, &node_id, &description],
    )
    .await?;
    Ok(())
}

/// Health checks: connect to every node each period; a node is `bad` after
/// `health_check_failures` consecutive failures and `good` after one success.
async fn health_checks(config: Config, timings: MonitorTimings, shutdown: CancellationToken) {
    let mut failures: HashMap<i64, u32> = HashMap::new();
    let mut connection: Option<pgconn::Connection> = None;
    while !shutdown.is_cancelled() {
        let round_start = Instant::now();
        if connection.as_ref().is_none_or(|c| c.client.is_closed()) {
            connection = pgconn::connect(config.clone(), Duration::from_secs(2))
                .await
                .ok();
        }
        if let Some(c) = &connection {
            if let Err(e) = health_round(&c.client, &timings, &mut failures).await {
                tracing::warn!(error = %e, "health check round failed");
            }
        }
        let rest = timings
            .health_check_period
            .saturating_sub(round_start.elapsed());
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(rest) => {}
        }
    }
}

async fn health_round(
    client: &Client,
    timings: &MonitorTimings,
    failures: &mut HashMap<i64, u32>,
) -> Result<(), MonitorError> {
    let nodes = client
        .query(
            "SELECT node_id, node_host, node_port, health FROM hapg.node",
            &[],
        )
        .await?;
    let mut checks = Vec::with_capacity(nodes.len());
    for row in &nodes {
        let node_id: i64 = row.try_get(0)?;
        let host: String = row.try_get(1)?;
        let port: i32 = row.try_get(2)?;
        let health = Health::from_db(row.try_get(3)?);
        let timeout = timings.health_check_timeout;
        checks.push(tokio::spawn(async move {
            (node_id, health, check_node(&host, port, timeout).await)
        }));
    }
    for check in checks {
        let Ok((node_id, before, ok)) = check.await else {
            continue;
        };
        let count = failures.entry(node_id).or_insert(0);
        let after = if ok {
            *count = 0;
            Health::Good
        } else {
            *count += 1;
            if *count >= timings.health_check_failures {
                Health::Bad
            } else {
                before
            }
        };
        client
            .execute(
                "UPDATE hapg.node SET health = $2, health_check_time = now() WHERE node_id = $1",
                &[&node_id, &after.to_db()],
            )
            .await?;
        if after != before {
            let description = match after {
                Health::Good => format!("Node {node_id} is marked as healthy by the monitor"),
                _ => format!("Node {node_id} is marked as unhealthy by the monitor"),
            };
            tracing::info!("{description}");
            client
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
    }
    failures.retain(|id, _| {
        nodes
            .iter()
            .any(|row| row.try_get::<_, i64>(0).is_ok_and(|n| n == *id))
    });
    Ok(())
}

/// One health check: the node's Postgres completes a connection handshake, or
/// answers with an error, which also proves it is up and serving.
async fn check_node(host: &str, port: i32, timeout: Duration) -> bool {
    let Ok(port) = u16::try_from(port) else {
        return false;
    };
    let mut config = Config::new();
    config
        .host(host)
        .port(port)
        .user(schema::HEALTH_CHECK_ROLE)
        .dbname("postgres")
        .connect_timeout(timeout);
    // No TLS: a health check sends nothing secret, and it is cheaper without.
    let attempt = tokio::time::timeout(timeout, config.connect(tokio_postgres::NoTls)).await;
    match attempt {
        Ok(Ok((client, connection))) => {
            // Dropping the client lets the connection say goodbye (Terminate)
            // instead of leaving a "connection reset" line in the node's log.
            let closing = tokio::spawn(connection);
            drop(client);
            let _ = tokio::time::timeout(timeout, closing).await;
            true
        }
        // "the database system is starting up" or shutting down: not serving.
        Ok(Err(e)) => e
            .as_db_error()
            .is_some_and(|db| db.code().code().starts_with("28") || db.code().code() == "53300"),
        Err(_) => false,
    }
}
