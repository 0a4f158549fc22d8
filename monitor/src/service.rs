//! The monitor service: migrates the schema, health-checks every node, and is the
//! only writer of goal states. It wakes on keeper reports and operator requests
//! (LISTEN) and on a short tick, runs the pure state machine for each group, and
//! writes each decision as one transaction: goals, events and NOTIFY together.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hapg_config::MonitorTimings;
use tokio_postgres::Config;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::MonitorError;
use crate::fsm::{self, Decision, GroupView, Request, Setting, Thresholds};
use crate::pgconn;
use crate::schema;
use crate::state::{Health, NodeState};
use crate::store::etcd::EtcdStore;
use crate::store::postgres::PgStore;
use crate::store::{
    ChangeFeed, Channel, GroupSnapshot, GroupWrite, MonitorStore, PendingRequest, RequestAnswer,
    RequestKind, Written,
};

/// Requests not answered within this long are refused as expired: the CLI that
/// filed them has given up, and acting late would surprise the operator.
const REQUEST_EXPIRY_SECS: f64 = 30.0;
/// Decisions applied per group per wake-up at most (a guard against a rule loop).
const MAX_DECISIONS_PER_ROUND: usize = 16;

/// Where the service keeps the monitor's state.
#[derive(Clone)]
enum Backend {
    /// The monitor database (a superuser connection on the monitor host).
    Postgres(Box<Config>),
    /// The leading service's own etcd connection (its writes are fenced on
    /// its leadership), shared with its health checks.
    EtcdLeader(Arc<EtcdStore>),
}

impl Backend {
    async fn open(&self) -> Result<(Box<dyn MonitorStore>, ChangeFeed), MonitorError> {
        match self {
            Backend::Postgres(config) => {
                let connection =
                    pgconn::connect(config.as_ref().clone(), Duration::from_secs(2)).await?;
                let (store, feed) = PgStore::from_connection(connection);
                Ok((Box::new(store), feed))
            }
            Backend::EtcdLeader(store) => {
                let (_, nothing) = tokio::sync::mpsc::unbounded_channel();
                Ok((Box::new(store.share()), ChangeFeed::new(nothing)))
            }
        }
    }
}

/// Runs the monitor service until `shutdown` is cancelled, against the
/// monitor database at `conninfo` (a superuser connection on the monitor
/// host), or against the etcd cluster an `etcd://` URI names.
pub async fn run(
    conninfo: &str,
    timings: MonitorTimings,
    shutdown: CancellationToken,
) -> Result<(), MonitorError> {
    let backend = if conninfo.starts_with("etcd://") {
        crate::store::etcd::parse_uri(conninfo)?;
        return run_etcd(conninfo, timings, shutdown).await;
    } else {
        Backend::Postgres(Box::new(conninfo.parse().map_err(
            |e: tokio_postgres::Error| MonitorError::BadUri {
                uri: pgconn::redact_uri(conninfo),
                reason: e.to_string(),
            },
        )?))
    };
    let started = Instant::now();
    let (mut store, mut feed) = connect_until(&backend, &shutdown).await?;
    store.migrate().await?;

    let health = tokio::spawn(
        health_checks(backend.clone(), timings.clone(), shutdown.clone())
            .instrument(tracing::info_span!("health_checks")),
    );

    let mut decider = Decider {
        thresholds: thresholds(&timings),
        started,
        holds: HashMap::new(),
    };
    tracing::info!("monitor service running");
    while !shutdown.is_cancelled() {
        if store.is_closed() {
            tracing::warn!("lost the monitor database connection, reconnecting");
            (store, feed) = connect_until(&backend, &shutdown).await?;
        }
        let round = async {
            store.listen(&[Channel::Report, Channel::Request]).await?;
            decider.round(store.as_mut()).await
        };
        if let Err(e) = round.await {
            tracing::warn!(error = %e, "monitor round failed");
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = feed.next(timings.tick) => {}
        }
        while feed.try_next().is_some() {}
    }
    health.abort();
    tracing::info!("monitor service stopped");
    Ok(())
}

fn thresholds(timings: &MonitorTimings) -> Thresholds {
    Thresholds {
        unhealthy_timeout: timings.unhealthy_timeout,
        startup_grace: timings.startup_grace,
        catchup_threshold: timings.wal_threshold_bytes,
        promote_threshold: timings.wal_threshold_bytes,
        router_drain_timeout: timings.router_drain_timeout,
        upstream_silence_timeout: timings.upstream_silence_timeout,
    }
}

/// How long the leading service's lease lasts without renewal: a service
/// that stops (killed, paused, cut off) is replaced about this long after.
pub const LEADER_TTL: Duration = Duration::from_secs(2);

/// When a service that just took the lead may judge nodes unhealthy.
///
/// A restarted Postgres monitor waits the whole startup grace because its
/// absence silenced the keepers too (the monitor was their store). On etcd
/// the keepers report to etcd, not to the leader: when this service's store
/// has answered it for the startup grace already, the reports in it are as
/// fresh as they would have been under the old leader, and the only thing
/// the new leader lacks is its own health verdict (the old leader's stays in
/// the store until the first check replaces it). So it waits the time of
/// one verdict (`health_check_failures` rounds and a check's timeout),
/// unless its store came back less than a startup grace ago (etcd without
/// quorum, this service cut off): then the keepers may not have reported
/// either, and it waits what is left of the startup grace.
pub fn takeover_grace_ends(
    timings: &MonitorTimings,
    store_up_since: Instant,
    led_at: Instant,
) -> Instant {
    let verdict =
        timings.health_check_period * timings.health_check_failures + timings.health_check_timeout;
    (store_up_since + timings.startup_grace).max(led_at + verdict)
}

/// The monitor service on etcd: services on the same prefix elect a leader
/// (a lease-held key); only the leader decides and health-checks, and each
/// of its writes holds only while it still leads, so a paused old leader
/// that wakes up writes nothing. A new leader starts from the stored state
/// and judges no node before [`takeover_grace_ends`].
async fn run_etcd(
    uri: &str,
    timings: MonitorTimings,
    shutdown: CancellationToken,
) -> Result<(), MonitorError> {
    let name = format!("monitor service pid {}", std::process::id());
    let mut decider = Decider {
        thresholds: thresholds(&timings),
        started: Instant::now(),
        holds: HashMap::new(),
    };
    let mut ever_opened = false;
    while !shutdown.is_cancelled() {
        let opened = async {
            let (mut store, feed) = EtcdStore::open(uri).await?;
            store.migrate().await?;
            Ok::<_, MonitorError>((store, feed))
        };
        let (store, mut feed) = match opened.await {
            Ok(opened) => {
                ever_opened = true;
                opened
            }
            // At start, a refused certificate or an unreadable TLS file is
            // a mistake in the URI that waiting does not mend: say it and
            // stop. Once running, the service waits as for any outage (a
            // certificate being rotated on the members, for one).
            Err(e @ (MonitorError::EtcdConnect { .. } | MonitorError::EtcdTls { .. }))
                if !ever_opened && !e.is_transient() =>
            {
                return Err(e)
            }
            Err(e) => {
                tracing::warn!(error = %e, "etcd not reachable");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
        };
        // Every error below (a campaign that fails, a lost lease) comes
        // back to the open above: from here on the store has answered.
        let store_up_since = Instant::now();
        let leadership = match store.campaign(&name, LEADER_TTL, &shutdown).await {
            Ok(Some(leadership)) => leadership,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "campaign failed");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let now = Instant::now();
        let grace_ends = takeover_grace_ends(&timings, store_up_since, now);
        // `started` is what the state machine measures the grace from.
        decider.started = grace_ends.checked_sub(timings.startup_grace).unwrap_or(now);
        decider.holds.clear();
        let store = Arc::new(store);
        let health = tokio::spawn(
            health_checks(
                Backend::EtcdLeader(store.clone()),
                timings.clone(),
                shutdown.clone(),
            )
            .instrument(tracing::info_span!("health_checks")),
        );
        let mut writer: Box<dyn MonitorStore> = Box::new(store.share());
        tracing::info!("monitor service running on etcd, leading");
        while !shutdown.is_cancelled() && !leadership.lost() && !writer.is_closed() {
            let round = async {
                // The feed is the leader connection's: listen there.
                store.listen(&[Channel::Report, Channel::Request]).await?;
                decider.round(writer.as_mut()).await
            };
            if let Err(e) = round.await {
                tracing::warn!(error = %e, "monitor round failed");
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = feed.next(timings.tick) => {}
            }
            while feed.try_next().is_some() {}
        }
        health.abort();
        if leadership.lost() {
            tracing::warn!("no longer leading the monitor services: campaigning again");
        }
    }
    tracing::info!("monitor service stopped");
    Ok(())
}

async fn connect_until(
    backend: &Backend,
    shutdown: &CancellationToken,
) -> Result<(Box<dyn MonitorStore>, ChangeFeed), MonitorError> {
    let mut delay = Duration::from_millis(100);
    loop {
        match backend.open().await {
            Ok(c) => return Ok(c),
            Err(e) => {
                tracing::debug!(error = %e, "monitor database not reachable yet");
                tokio::select! {
                    _ = shutdown.cancelled() => return Err(e),
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
    async fn round(&mut self, store: &mut dyn MonitorStore) -> Result<(), MonitorError> {
        self.answer_requests(store).await?;
        let mut groups: Vec<(String, i32)> = store
            .all_nodes()
            .await?
            .into_iter()
            .map(|n| (n.formation, n.group_id))
            .collect();
        groups.dedup();
        for (formation, group) in groups {
            for _ in 0..MAX_DECISIONS_PER_ROUND {
                if !self.decide_once(store, &formation, group).await? {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Runs the state machine once for a group; true when it changed
    /// something, or when another writer did first (read again).
    async fn decide_once(
        &mut self,
        store: &mut dyn MonitorStore,
        formation: &str,
        group: i32,
    ) -> Result<bool, MonitorError> {
        let snapshot = store.group_snapshot(formation, group).await?;
        let view = self.view(&snapshot);
        let expected = &snapshot.version;
        let (write, changed) = match fsm::decide(&view) {
            None => (None, false),
            Some(Decision::Assign(assignments)) => {
                // The primary is told to stop: the switchover left the drain phase.
                let end_drain = view.switchover.is_some()
                    && assignments.iter().any(|a| a.goal == NodeState::Draining);
                (
                    Some(GroupWrite::Assign {
                        assignments,
                        end_drain,
                    }),
                    true,
                )
            }
            Some(Decision::Remove { node_id, reason }) => {
                (Some(GroupWrite::Remove { node_id, reason }), true)
            }
            Some(Decision::SetNumberSyncStandbys { value, reason }) => (
                Some(GroupWrite::SetNumberSyncStandbys { value, reason }),
                true,
            ),
            Some(Decision::Hold(reason)) => {
                let key = (formation.to_string(), group);
                if self.holds.get(&key) != Some(&reason) {
                    tracing::warn!(formation, group, "{reason}");
                    store.group_event(formation, group, &reason).await?;
                    self.holds.insert(key, reason);
                }
                (None, false)
            }
        };
        if let Some(write) = write {
            let log = write.clone();
            if store.apply(formation, group, expected, write).await? == Written::Stale {
                tracing::debug!(
                    formation,
                    group,
                    "the group changed under the decision; reading it again"
                );
                return Ok(true);
            }
            self.log_applied(formation, group, &log);
        }
        if let Some(drain) = &view.switchover {
            let stale = drain.age > self.thresholds.router_drain_timeout * 3;
            if !changed && stale {
                let reason =
                    "Switchover abandoned: the primary did not become ready to stop in time";
                let abandon = GroupWrite::AbandonSwitchover {
                    reason: reason.to_string(),
                };
                if store.apply(formation, group, expected, abandon).await? == Written::Applied {
                    tracing::info!(formation, group, "{reason}");
                }
            }
        }
        Ok(changed)
    }

    fn log_applied(&mut self, formation: &str, group: i32, write: &GroupWrite) {
        match write {
            GroupWrite::Assign { assignments, .. } => {
                for a in assignments {
                    tracing::info!(node_id = a.node_id, goal = %a.goal, "{}", a.reason);
                }
                self.holds.remove(&(formation.to_string(), group));
            }
            GroupWrite::Remove { node_id, reason } => tracing::info!(node_id, "{reason}"),
            GroupWrite::SetNumberSyncStandbys { reason, .. } => {
                tracing::info!(formation, "{reason}")
            }
            GroupWrite::AbandonSwitchover { reason } => tracing::info!(formation, "{reason}"),
        }
    }

    /// The group as the state machine sees it.
    fn view(&self, snapshot: &GroupSnapshot) -> GroupView {
        GroupView {
            nodes: snapshot.nodes.iter().map(|n| n.view()).collect(),
            number_sync_standbys: snapshot.number_sync_standbys,
            monitor_uptime: self.started.elapsed(),
            thresholds: self.thresholds.clone(),
            switchover: snapshot.switchover.clone(),
            preferred_candidate: snapshot.preferred_candidate,
        }
    }

    async fn answer_requests(&mut self, store: &mut dyn MonitorStore) -> Result<(), MonitorError> {
        for request in store.pending_requests().await? {
            let (answer, expected) = if request.age.as_secs_f64() > REQUEST_EXPIRY_SECS {
                (
                    RequestAnswer::Refuse(format!(
                        "the request expired after {REQUEST_EXPIRY_SECS} s without an answer"
                    )),
                    None,
                )
            } else {
                match parse_operation(&request.kind, request.node_id, request.value.as_deref()) {
                    Err(reason) => (RequestAnswer::Refuse(reason), None),
                    Ok(operation) => {
                        let snapshot = store
                            .group_snapshot(&request.formation, request.group_id)
                            .await?;
                        let view = self.view(&snapshot);
                        (carry_out(&view, operation), Some(snapshot.version))
                    }
                }
            };
            let log = answer.clone();
            match store
                .answer_request(&request, expected.as_ref(), answer)
                .await?
            {
                Written::Applied => log_answer(&request, &log),
                Written::Stale => tracing::debug!(
                    request = request.id,
                    "the request was answered elsewhere, or its group changed: next round"
                ),
            }
        }
        Ok(())
    }
}

fn log_answer(request: &PendingRequest, answer: &RequestAnswer) {
    match answer {
        RequestAnswer::Refuse(reason) => {
            tracing::info!(
                request = request.id,
                kind = request.kind,
                "refused: {reason}"
            )
        }
        RequestAnswer::Assign { assignments, .. } => {
            for a in assignments {
                tracing::info!(node_id = a.node_id, goal = %a.goal, "{}", a.reason);
            }
        }
        RequestAnswer::Setting { .. } | RequestAnswer::StartSwitchover { .. } => {}
    }
}

/// Decides on one operation: its effect, or the reason it is refused.
fn carry_out(view: &GroupView, operation: Operation) -> RequestAnswer {
    match operation {
        Operation::Setting(setting) => match fsm::check_setting(view, setting) {
            Ok(reply) => RequestAnswer::Setting { setting, reply },
            Err(reason) => RequestAnswer::Refuse(reason),
        },
        Operation::Request(request) => {
            let assignments = match fsm::on_request(view, request) {
                Ok(assignments) => assignments,
                Err(reason) => return RequestAnswer::Refuse(reason),
            };
            if let Request::Switchover | Request::Promote(_) = request {
                let target = match request {
                    Request::Promote(node) => Some(node),
                    _ => None,
                };
                return RequestAnswer::StartSwitchover {
                    target,
                    reason: "Switchover requested: routers drain the primary, then it stops and a standby takes over".to_string(),
                };
            }
            let reply = assignments
                .iter()
                .map(|a| a.reason.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            RequestAnswer::Assign { assignments, reply }
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

/// Health checks: connect to every node each period; a node is `bad` after
/// `health_check_failures` consecutive failures and `good` after one success.
async fn health_checks(backend: Backend, timings: MonitorTimings, shutdown: CancellationToken) {
    let mut failures: HashMap<i64, u32> = HashMap::new();
    let mut store: Option<Box<dyn MonitorStore>> = None;
    while !shutdown.is_cancelled() {
        let round_start = Instant::now();
        if store.as_ref().is_none_or(|s| s.is_closed()) {
            // This connection listens to nothing: its feed is dropped.
            store = backend.open().await.ok().map(|(store, _)| store);
        }
        if let Some(s) = &store {
            if let Err(e) = health_round(s.as_ref(), &timings, &mut failures).await {
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
    store: &dyn MonitorStore,
    timings: &MonitorTimings,
    failures: &mut HashMap<i64, u32>,
) -> Result<(), MonitorError> {
    let nodes = store.all_nodes().await?;
    let mut checks = Vec::with_capacity(nodes.len());
    for node in &nodes {
        let (node_id, health, host, port) =
            (node.node_id, node.health, node.host.clone(), node.port);
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
        let changed = (after != before).then(|| match after {
            Health::Good => format!("Node {node_id} is marked as healthy by the monitor"),
            _ => format!("Node {node_id} is marked as unhealthy by the monitor"),
        });
        if let Some(description) = &changed {
            tracing::info!("{description}");
        }
        store
            .record_health(node_id, after, changed.as_deref())
            .await?;
    }
    failures.retain(|id, _| nodes.iter().any(|n| n.node_id == *id));
    Ok(())
}

/// One health check: the node's Postgres completes a connection handshake, or
/// answers with an error, which also proves it is up and serving.
async fn check_node(host: &str, port: u16, timeout: Duration) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// When a new leader may judge nodes, by how long its store has answered.
    #[test]
    fn a_new_leader_waits_one_verdict_or_the_rest_of_the_startup_grace() {
        let timings = MonitorTimings::default();
        // 0.5 s rounds, bad after 2, 1 s timeout: one verdict is 2 s.
        let verdict = Duration::from_secs(2);
        assert_eq!(
            timings.health_check_period * timings.health_check_failures
                + timings.health_check_timeout,
            verdict
        );
        let led = Instant::now() + Duration::from_secs(60);
        let secs = Duration::from_secs;
        let table = [
            // (store answering for, may judge after leading for)
            (secs(3600), verdict),                   // a follower all along
            (timings.startup_grace, verdict),        // just long enough
            (secs(4), verdict),                      // 4 + 2 > 5: the verdict still
            (secs(2), secs(3)),                      // store back 2 s ago: 3 s left
            (Duration::ZERO, timings.startup_grace), // store just back
        ];
        for (up_for, waits) in table {
            let ends = takeover_grace_ends(&timings, led - up_for, led);
            assert_eq!(ends - led, waits, "store up for {up_for:?}");
        }
    }
}
