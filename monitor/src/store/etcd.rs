//! The monitor store on etcd (v3 API): what is a table in the Postgres store
//! is a set of keys under a prefix, one JSON document each. Every write is
//! one etcd transaction; a decision (goals, their events, the epoch) is
//! conditioned on the formation key's `mod_revision` the writer read, and
//! every such write puts the formation key, so a second writer that read the
//! same state is refused. The change feed is a watch on `notify/<channel>`
//! keys, each write putting the payloads it publishes there.
//!
//! Key layout under the prefix `P` (`etcd://host:port/P`):
//!
//! * `P/formation/<id>`: the formation (settings, primary epoch, switchover);
//! * `P/node/<id>`: a node's identity, goal and settings (deciders write it);
//! * `P/report/<id>`: its keeper's last report (the keeper writes it);
//! * `P/health/<id>`: the health checks' verdict;
//! * `P/event/<time>-<writer>`: events, the oldest trimmed past [`MAX_EVENTS`];
//! * `P/request/<id>`: operator requests and their answers;
//! * `P/router/<id>`: routers and their drain acknowledgements;
//! * `P/seq/node`, `P/seq/request`: id counters;
//! * `P/notify/<channel>`: the payloads the last write published.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, DeleteOptions, GetOptions, Identity, KeyValue,
    TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use hapg_config::monitor_uri::{self, EtcdLocation, EtcdTls, MonitorLocation};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{
    Assigned, Change, ChangeFeed, Channel, EventRow, FormationRow, GoalEvent, GroupSnapshot,
    GroupVersion, GroupWrite, MonitorStore, NewRequest, NodeReport, NodeRow, NodeVersion,
    PendingRequest, PrimaryChange, Registered, Registration, RequestAnswer, RequestStatus,
    RoutedNode, RouterRegistration, RouterRow, Routing, StateNotification, Written,
};
use crate::error::MonitorError;
use crate::fsm::{Assignment, Setting, SwitchoverDrain};
use crate::state::{Health, NodeState};

/// Events kept; older ones are trimmed.
pub const MAX_EVENTS: usize = 2000;
/// Attempts of a write that races with other writers on a counter.
const CAS_ATTEMPTS: usize = 20;
/// The layout version [`MonitorStore::migrate`] writes.
const LAYOUT_VERSION: i32 = 1;

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// `YYYY-MM-DD HH:MM:SS` (and `.ffffff` with `micros`) in UTC.
fn format_time(secs: f64, micros: bool) -> String {
    let whole = secs.floor() as i64;
    let days = whole.div_euclid(86_400);
    let rest = whole.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let text = format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    );
    if micros {
        let us = ((secs - secs.floor()) * 1_000_000.0) as i64;
        format!("{text}.{us:06}")
    } else {
        text
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FormationDoc {
    formation: String,
    dbname: String,
    number_sync_standbys: i32,
    primary_epoch: i64,
    primary_node_id: Option<i64>,
    switchover_requested_at: Option<f64>,
    switchover_target: Option<i64>,
}

impl FormationDoc {
    fn new(formation: &str) -> FormationDoc {
        FormationDoc {
            formation: formation.to_string(),
            dbname: "postgres".to_string(),
            number_sync_standbys: 0,
            primary_epoch: 0,
            primary_node_id: None,
            switchover_requested_at: None,
            switchover_target: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct NodeDoc {
    node_id: i64,
    formation: String,
    group_id: i32,
    name: String,
    host: String,
    port: u16,
    goal: NodeState,
    candidate_priority: i32,
    replication_quorum: bool,
    state_change_time: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ReportDoc {
    reported: NodeState,
    pg_running: bool,
    tli: i32,
    lsn: u64,
    rep_state: String,
    upstream_streaming: bool,
    in_recovery: Option<bool>,
    upstream_silence_ms: Option<i64>,
    report_time: Option<f64>,
}

impl Default for ReportDoc {
    fn default() -> ReportDoc {
        ReportDoc {
            reported: NodeState::Init,
            pg_running: false,
            tli: 1,
            lsn: 0,
            rep_state: String::new(),
            upstream_streaming: false,
            in_recovery: None,
            upstream_silence_ms: None,
            report_time: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct HealthDoc {
    health: i16,
    time: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct EventDoc {
    time: f64,
    /// Position among the events of one transaction (they share a revision).
    seq: i64,
    formation: String,
    group_id: Option<i32>,
    node_id: Option<i64>,
    node_name: Option<String>,
    node_port: Option<u16>,
    reported_state: Option<NodeState>,
    goal_state: Option<NodeState>,
    primary_epoch: Option<i64>,
    description: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RequestDoc {
    id: i64,
    formation: String,
    group_id: i32,
    node_id: Option<i64>,
    kind: String,
    value: Option<String>,
    status: String,
    reply: Option<String>,
    created_at: f64,
    answered_at: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RouterDoc {
    router_id: String,
    formation: String,
    address: String,
    last_seen: f64,
    routed_epoch: i64,
    drained_at: Option<f64>,
    #[serde(default)]
    read_only_address: Option<String>,
}

fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<T, MonitorError> {
    serde_json::from_slice(kv.value())
        .map_err(|e| MonitorError::Corrupt(format!("{}: {e}", String::from_utf8_lossy(kv.key()))))
}

fn encode<T: Serialize>(doc: &T) -> Result<Vec<u8>, MonitorError> {
    serde_json::to_vec(doc).map_err(|e| MonitorError::Corrupt(format!("cannot encode: {e}")))
}

/// What one consistent read of the cluster's documents holds.
#[derive(Default)]
struct State {
    formations: BTreeMap<String, (FormationDoc, i64)>,
    nodes: BTreeMap<i64, NodeDoc>,
    reports: BTreeMap<i64, ReportDoc>,
    /// When this process saw each node's current report, by its own clock
    /// (see [`ReportClock`]).
    report_seen: BTreeMap<i64, f64>,
    health: BTreeMap<i64, HealthDoc>,
    routers: Vec<RouterDoc>,
}

impl State {
    fn formation(&self, formation: &str) -> Result<&(FormationDoc, i64), MonitorError> {
        self.formations
            .get(formation)
            .ok_or_else(|| MonitorError::NoSuchFormation(formation.to_string()))
    }

    fn row(&self, node: &NodeDoc, at: f64) -> NodeRow {
        let report = self.reports.get(&node.node_id).cloned().unwrap_or_default();
        let health = self
            .health
            .get(&node.node_id)
            .map_or(Health::Unknown, |h| Health::from_db(h.health));
        NodeRow {
            node_id: node.node_id,
            formation: node.formation.clone(),
            group_id: node.group_id,
            name: node.name.clone(),
            host: node.host.clone(),
            port: node.port,
            goal: node.goal,
            reported: report.reported,
            pg_running: report.pg_running,
            rep_state: report.rep_state,
            tli: report.tli,
            lsn: report.lsn,
            upstream_streaming: report.upstream_streaming,
            in_recovery: report.in_recovery,
            upstream_silence: report
                .upstream_silence_ms
                .map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0))),
            report_age: report
                .report_time
                .and(self.report_seen.get(&node.node_id))
                .map(|seen| Duration::from_secs_f64((at - seen).max(0.0))),
            health,
            candidate_priority: node.candidate_priority,
            replication_quorum: node.replication_quorum,
        }
    }

    fn group_rows(&self, formation: &str, group: i32) -> Vec<NodeRow> {
        let at = now();
        self.nodes
            .values()
            .filter(|n| n.formation == formation && n.group_id == group)
            .map(|n| self.row(n, at))
            .collect()
    }

    fn version(&self, formation: &str, group: i32) -> Result<GroupVersion, MonitorError> {
        let (f, revision) = self.formation(formation)?;
        Ok(GroupVersion {
            revision: *revision,
            primary_epoch: f.primary_epoch,
            primary_node_id: f.primary_node_id,
            number_sync_standbys: f.number_sync_standbys,
            switchover_requested: f.switchover_requested_at.map(|t| format!("{t:.6}")),
            switchover_target: f.switchover_target,
            nodes: self
                .nodes
                .values()
                .filter(|n| n.formation == formation && n.group_id == group)
                .map(|n| NodeVersion {
                    node_id: n.node_id,
                    goal: n.goal,
                    candidate_priority: n.candidate_priority,
                    replication_quorum: n.replication_quorum,
                })
                .collect(),
        })
    }

    fn notification(&self, node: &NodeDoc, epoch: i64) -> StateNotification {
        let report = self.reports.get(&node.node_id).cloned().unwrap_or_default();
        let health = self
            .health
            .get(&node.node_id)
            .map_or(Health::Unknown, |h| Health::from_db(h.health));
        StateNotification {
            kind: "state".to_string(),
            formation: node.formation.clone(),
            group_id: node.group_id,
            node_id: node.node_id,
            name: node.name.clone(),
            host: node.host.clone(),
            port: i32::from(node.port),
            reported_state: report.reported,
            goal_state: node.goal,
            health: health.as_str().to_string(),
            epoch,
        }
    }

    /// An event about `node` as it is in this state.
    fn node_event(&self, node: &NodeDoc, epoch: Option<i64>, description: &str) -> EventDoc {
        EventDoc {
            time: now(),
            seq: 0,
            formation: node.formation.clone(),
            group_id: Some(node.group_id),
            node_id: Some(node.node_id),
            node_name: Some(node.name.clone()),
            node_port: Some(node.port),
            reported_state: Some(
                self.reports
                    .get(&node.node_id)
                    .map_or(NodeState::Init, |r| r.reported),
            ),
            goal_state: Some(node.goal),
            primary_epoch: epoch,
            description: description.to_string(),
        }
    }
}

fn group_event(formation: &str, group: i32, epoch: i64, description: &str) -> EventDoc {
    EventDoc {
        time: now(),
        seq: 0,
        formation: formation.to_string(),
        group_id: Some(group),
        node_id: None,
        node_name: None,
        node_port: None,
        reported_state: None,
        goal_state: None,
        primary_epoch: Some(epoch),
        description: description.to_string(),
    }
}

/// The writes of one transaction: documents, events and notifications.
#[derive(Default)]
struct Batch {
    puts: BTreeMap<String, Vec<u8>>,
    deletes: Vec<String>,
    events: Vec<EventDoc>,
    notify: BTreeMap<&'static str, Vec<String>>,
}

impl Batch {
    fn put<T: Serialize>(&mut self, key: String, doc: &T) -> Result<(), MonitorError> {
        self.puts.insert(key, encode(doc)?);
        Ok(())
    }

    fn notify(&mut self, channel: Channel, payload: String) {
        self.notify.entry(channel.name()).or_default().push(payload);
    }

    fn state(&mut self, n: &StateNotification) -> Result<(), MonitorError> {
        let payload = String::from_utf8(encode(n)?)
            .map_err(|e| MonitorError::Corrupt(format!("payload: {e}")))?;
        self.notify(Channel::State, payload);
        Ok(())
    }
}

/// When this process first saw each node's report revision, by its own
/// clock: a report's age is measured from there, not from the time the
/// keeper wrote in it. The keeper's clock is another machine's: with a skew
/// between the two, a healthy node would look silent (keeper behind) or a
/// silent one fresh for as long as the skew (keeper ahead). The Postgres
/// store has one clock (its database's `now()`); here the reader's own clock
/// plays that part. The reader sees a report when it reads it, so the age
/// is short by at most the time between two reads: the leading monitor
/// service reads on every report's notification and at least every tick.
/// A report first seen by this process (its start, a new leader) takes the
/// keeper's time, capped at now, as the best estimate there is; from its
/// next report on, the keeper's clock plays no part.
#[derive(Default)]
struct ReportClock {
    /// Node id to (the report key's `mod_revision`, when it was first seen).
    seen: BTreeMap<i64, (i64, f64)>,
}

impl ReportClock {
    /// When the report at `revision` was first seen, recording it now if
    /// it is new; `written`: the keeper's own time in it.
    fn observe(&mut self, node_id: i64, revision: i64, written: Option<f64>, at: f64) -> f64 {
        let first = match self.seen.get(&node_id) {
            Some((seen_revision, seen_at)) if *seen_revision == revision => return *seen_at,
            Some(_) => at,
            None => written.map_or(at, |t| t.min(at)),
        };
        self.seen.insert(node_id, (revision, first));
        first
    }
}

/// A connection to an etcd cluster holding the monitor's state.
pub struct EtcdStore {
    client: Client,
    prefix: String,
    listening: Arc<Mutex<HashSet<Channel>>>,
    closed: Arc<AtomicBool>,
    writer: u32,
    events_written: Arc<AtomicU32>,
    /// Set while this connection writes as the leading monitor service.
    fence: Arc<Mutex<Option<Fence>>>,
    /// When this process saw each report (shared with [`EtcdStore::share`]).
    report_clock: Arc<Mutex<ReportClock>>,
}

/// The leader key as this service created it: every decision it writes
/// holds only while the key is still that one (its lease not expired, no
/// other service elected since).
#[derive(Debug, Clone)]
struct Fence {
    key: String,
    create_revision: i64,
    lost: Arc<AtomicBool>,
}

/// The leadership of the monitor services on one prefix, held by a lease
/// kept alive in the background; [`Leadership::lost`] once it lapsed.
pub struct Leadership {
    lost: Arc<AtomicBool>,
    keeper: tokio::task::JoinHandle<()>,
}

impl Leadership {
    /// True once the lease lapsed or a write found another leader: stop
    /// deciding, and campaign again.
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

/// Reads an `etcd://host:port[,host:port...]/prefix[?options]` URI (the
/// syntax and its options are `hapg_config::monitor_uri`'s, so the store
/// takes exactly what the configuration checks accept).
pub fn parse_uri(uri: &str) -> Result<EtcdLocation, MonitorError> {
    match monitor_uri::parse("monitor URI", uri) {
        Ok(MonitorLocation::Etcd(location)) => Ok(location),
        Ok(MonitorLocation::Postgres(_)) => Err(MonitorError::BadUri {
            uri: uri.to_string(),
            reason: "an etcd URI starts with etcd://".to_string(),
        }),
        Err(e) => Err(MonitorError::BadUri {
            uri: uri.to_string(),
            reason: e.to_string(),
        }),
    }
}

/// The client's TLS settings from a URI's options: the members are
/// verified against `cacert` only (never the system's roots: an etcd
/// cluster has its own CA), and the client certificate is presented when
/// given. A file that cannot be read is named in the error.
fn tls_options(tls: &EtcdTls) -> Result<TlsOptions, MonitorError> {
    let read = |option: &str, path: &Path| {
        std::fs::read(path).map_err(|e| MonitorError::EtcdTls {
            option: option.to_string(),
            reason: format!("cannot read {}: {e}", path.display()),
        })
    };
    let ca = tls.ca.as_deref().ok_or_else(|| MonitorError::EtcdTls {
        option: "cacert".to_string(),
        reason: "TLS to etcd needs cacert=FILE, the CA that signed the members' certificates"
            .to_string(),
    })?;
    let mut options = TlsOptions::new().ca_certificate(Certificate::from_pem(read("cacert", ca)?));
    if let Some((cert, key)) = &tls.identity {
        options = options.identity(Identity::from_pem(read("cert", cert)?, read("key", key)?));
    }
    Ok(options)
}

/// Why a first request to etcd failed, in words that name the likely
/// cause: the whole chain of sources (tonic's own message is only
/// "transport error"), and a hint for the mistakes that look alike on the
/// wire (a wrong CA, plain http against a TLS-only member).
fn connect_failure(location: &EtcdLocation, error: &etcd_client::Error) -> MonitorError {
    let mut reason = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        let text = e.to_string();
        if !reason.contains(&text) {
            reason.push_str(": ");
            reason.push_str(&text);
        }
        source = e.source();
    }
    let lower = reason.to_lowercase();
    // An alert is the member refusing this client (its certificate, or the
    // lack of one), not this client refusing the member's. With TLS 1.3 a
    // client learns it only after its own Finished, and, by timing, as the
    // alert (BadCertificate, CertificateRequired), a broken pipe or a
    // closed connection.
    let member_alert = lower.contains("received fatal alert");
    // Retrying does not mend a member certificate the CA did not sign.
    let refused = location.tls.is_some()
        && !member_alert
        && (lower.contains("certificate") || lower.contains("unknownissuer"));
    let hint = match &location.tls {
        Some(tls) if refused => {
            let ca = tls
                .ca
                .as_deref()
                .map_or(String::new(), |p| p.display().to_string());
            Some(format!(
                "the members' certificate is not accepted: check that cacert={ca} is the CA that signed it and that it names the host in the URI"
            ))
        }
        // A member that requires a client certificate closes the
        // connection of a client that has none.
        Some(tls) if tls.identity.is_some() && member_alert => Some(
            "the members refused this client's certificate: check that cert= and key= are a pair signed by a CA the members trust".to_string(),
        ),
        Some(tls)
            if tls.identity.is_none()
                && (member_alert
                    || lower.contains("connection closed")
                    || lower.contains("broken pipe")
                    || lower.contains("connection reset")
                    || lower.contains("handshake")) =>
        {
            Some("the members closed the TLS connection: if they require a client certificate, give cert=FILE&key=FILE".to_string())
        }
        None if !lower.contains("refused") => Some(
            "no answer in plain http: if the members serve TLS, give ?cacert=FILE (and cert=&key=)".to_string(),
        ),
        _ => None,
    };
    MonitorError::EtcdConnect {
        endpoints: location.endpoints.join(","),
        reason: match hint {
            Some(hint) => format!("{hint} ({reason})"),
            None => reason,
        },
        transient: !refused,
    }
}

impl EtcdStore {
    /// Connects to the etcd cluster `uri` names, checks that the prefix
    /// holds a monitor's state of this layout, and starts the change feed.
    pub async fn connect(uri: &str) -> Result<(EtcdStore, ChangeFeed), MonitorError> {
        let (store, feed) = EtcdStore::open(uri).await?;
        let response = store.client.clone().get(store.key("layout"), None).await?;
        match response.kvs().first().map(decode::<i32>).transpose()? {
            Some(v) if v == LAYOUT_VERSION => Ok((store, feed)),
            Some(v) if v > LAYOUT_VERSION => Err(MonitorError::SchemaTooNew {
                found: v,
                supported: LAYOUT_VERSION,
            }),
            Some(v) => Err(MonitorError::SchemaTooOld {
                found: v,
                expected: LAYOUT_VERSION,
            }),
            None => Err(MonitorError::NotAMonitor),
        }
    }

    /// [`EtcdStore::connect`] without the layout check: for the monitor
    /// service, which sets the layout up ([`MonitorStore::migrate`]).
    pub async fn open(uri: &str) -> Result<(EtcdStore, ChangeFeed), MonitorError> {
        let location = parse_uri(uri)?;
        let mut options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        if let Some(tls) = &location.tls {
            options = options.with_tls(tls_options(tls)?);
        }
        // Connecting probes the member with a read, so that a wrong CA or
        // plain http against a TLS member is told here, in words.
        let client = connect_member(&location, options).await?;
        let store = EtcdStore {
            client,
            prefix: format!("{}/", location.prefix),
            listening: Arc::new(Mutex::new(HashSet::new())),
            closed: Arc::new(AtomicBool::new(false)),
            writer: std::process::id() ^ (now().fract() * 1e9) as u32,
            events_written: Arc::new(AtomicU32::new(0)),
            fence: Arc::new(Mutex::new(None)),
            report_clock: Arc::new(Mutex::new(ReportClock::default())),
        };
        let feed = store.start_feed().await?;
        Ok((store, feed))
    }

    /// Another handle on the same connection and leadership (for the
    /// health checks, which run beside the decisions).
    pub fn share(&self) -> EtcdStore {
        EtcdStore {
            client: self.client.clone(),
            prefix: self.prefix.clone(),
            listening: Arc::new(Mutex::new(HashSet::new())),
            closed: self.closed.clone(),
            writer: self.writer,
            events_written: self.events_written.clone(),
            fence: self.fence.clone(),
            report_clock: self.report_clock.clone(),
        }
    }

    /// Waits until this service holds the leader key `P/leader` (created
    /// with a lease of `ttl`, kept alive in the background), then fences
    /// every decision this connection writes on it. Returns `None` when
    /// `shutdown` is cancelled first.
    pub async fn campaign(
        &self,
        name: &str,
        ttl: Duration,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<Option<Leadership>, MonitorError> {
        let key = self.key("leader");
        let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(2).max(1);
        let mut client = self.client.clone();
        loop {
            let lease = client.lease_grant(ttl_secs, None).await?.id();
            let put = TxnOp::put(
                key.clone(),
                name.as_bytes().to_vec(),
                Some(etcd_client::PutOptions::new().with_lease(lease)),
            );
            let response = client
                .txn(
                    Txn::new()
                        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                        .and_then([put]),
                )
                .await?;
            if response.succeeded() {
                let create_revision = response
                    .header()
                    .map(|h| h.revision())
                    .ok_or_else(|| MonitorError::Corrupt("txn without header".to_string()))?;
                let lost = Arc::new(AtomicBool::new(false));
                if let Ok(mut fence) = self.fence.lock() {
                    *fence = Some(Fence {
                        key: key.clone(),
                        create_revision,
                        lost: lost.clone(),
                    });
                }
                let keeper = tokio::spawn(keep_lease(client.clone(), lease, ttl, lost.clone()));
                tracing::info!(name, "leading the monitor services");
                return Ok(Some(Leadership { lost, keeper }));
            }
            // Another service leads: the lease we took goes unused (it expires).
            let _ = client.lease_revoke(lease).await;
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(ttl / 4) => {}
            }
        }
    }

    /// The fence's compare, when this connection writes as the leader.
    fn fence_compare(&self) -> Option<(Compare, Fence)> {
        let fence = self.fence.lock().ok()?.clone()?;
        Some((
            Compare::create_revision(fence.key.clone(), CompareOp::Equal, fence.create_revision),
            fence,
        ))
    }

    /// [`EtcdStore::commit`] of a decision: also conditioned on still
    /// leading, when this connection leads. A write refused because another
    /// service leads now marks the leadership lost.
    async fn commit_fenced(
        &self,
        mut compares: Vec<Compare>,
        batch: Batch,
    ) -> Result<bool, MonitorError> {
        let fence = self.fence_compare();
        if let Some((compare, _)) = &fence {
            compares.push(compare.clone());
        }
        let done = self.commit(compares, batch).await?;
        if let (false, Some((_, fence))) = (done, fence) {
            let current = self.client.clone().get(fence.key.clone(), None).await?;
            let still = current
                .kvs()
                .first()
                .is_some_and(|kv| kv.create_revision() == fence.create_revision);
            if !still {
                fence.lost.store(true, Ordering::SeqCst);
                return Err(MonitorError::NotLeader);
            }
        }
        Ok(done)
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    fn node_key(&self, kind: &str, id: i64) -> String {
        self.key(&format!("{kind}/{id:020}"))
    }

    async fn start_feed(&self) -> Result<ChangeFeed, MonitorError> {
        let notify = self.key("notify/");
        let mut stream = self
            .client
            .clone()
            .watch(notify.clone(), Some(WatchOptions::new().with_prefix()))
            .await?;
        let (sender, changes) = mpsc::unbounded_channel();
        let listening = self.listening.clone();
        let closed = self.closed.clone();
        tokio::spawn(async move {
            while let Ok(Some(response)) = stream.message().await {
                for event in response.events() {
                    let Some(kv) = event.kv() else { continue };
                    let key = String::from_utf8_lossy(kv.key());
                    let Some(channel) = key
                        .strip_prefix(notify.as_str())
                        .and_then(Channel::from_name)
                    else {
                        continue;
                    };
                    let wanted = listening
                        .lock()
                        .map(|l| l.contains(&channel))
                        .unwrap_or(false);
                    if !wanted {
                        continue;
                    }
                    let payloads: Vec<String> =
                        serde_json::from_slice(kv.value()).unwrap_or_default();
                    for payload in payloads {
                        if sender.send(Change { channel, payload }).is_err() {
                            return;
                        }
                    }
                }
            }
            closed.store(true, Ordering::SeqCst);
        });
        Ok(ChangeFeed::new(changes))
    }

    /// One consistent read (a read-only transaction) of formations, nodes,
    /// reports, health and routers, with the formations' `mod_revision`.
    async fn read_state(&self) -> Result<State, MonitorError> {
        let kinds = ["formation/", "node/", "report/", "health/", "router/"];
        let ops: Vec<TxnOp> = kinds
            .iter()
            .map(|k| TxnOp::get(self.key(k), Some(GetOptions::new().with_prefix())))
            .collect();
        let response = self.client.clone().txn(Txn::new().and_then(ops)).await?;
        let at = now();
        let mut state = State::default();
        let mut revisions = BTreeMap::new();
        for (i, op) in response.op_responses().into_iter().enumerate() {
            let TxnOpResponse::Get(get) = op else {
                continue;
            };
            for kv in get.kvs() {
                match i {
                    0 => {
                        let f: FormationDoc = decode(kv)?;
                        state
                            .formations
                            .insert(f.formation.clone(), (f, kv.mod_revision()));
                    }
                    1 => {
                        let n: NodeDoc = decode(kv)?;
                        state.nodes.insert(n.node_id, n);
                    }
                    2 | 3 => {
                        let key = String::from_utf8_lossy(kv.key()).to_string();
                        let id: i64 = key
                            .rsplit('/')
                            .next()
                            .and_then(|s| s.parse().ok())
                            .ok_or_else(|| MonitorError::Corrupt(key.clone()))?;
                        if i == 2 {
                            state.reports.insert(id, decode(kv)?);
                            revisions.insert(id, kv.mod_revision());
                        } else {
                            state.health.insert(id, decode(kv)?);
                        }
                    }
                    _ => state.routers.push(decode(kv)?),
                }
            }
        }
        if let Ok(mut clock) = self.report_clock.lock() {
            clock.seen.retain(|id, _| revisions.contains_key(id));
            for (id, revision) in revisions {
                let written = state.reports.get(&id).and_then(|r| r.report_time);
                let seen = clock.observe(id, revision, written, at);
                state.report_seen.insert(id, seen);
            }
        }
        Ok(state)
    }

    /// Runs `batch` as one transaction when `compares` hold; false when they
    /// did not (nothing written).
    async fn commit(&self, compares: Vec<Compare>, batch: Batch) -> Result<bool, MonitorError> {
        let mut ops: Vec<TxnOp> = Vec::new();
        for (key, value) in batch.puts {
            ops.push(TxnOp::put(key, value, None));
        }
        for key in batch.deletes {
            ops.push(TxnOp::delete(key, None));
        }
        let time = now();
        let nanos = (time * 1e9) as u128;
        let counter = self.events_written.fetch_add(1, Ordering::SeqCst);
        let added = batch.events.len();
        for (i, mut event) in batch.events.into_iter().enumerate() {
            event.seq = i64::try_from(i).unwrap_or(0);
            event.time = time;
            let key = self.key(&format!(
                "event/{nanos:024}-{:08x}{counter:08x}-{i:03}",
                self.writer
            ));
            ops.push(TxnOp::put(key, encode(&event)?, None));
        }
        for (channel, payloads) in batch.notify {
            ops.push(TxnOp::put(
                self.key(&format!("notify/{channel}")),
                encode(&payloads)?,
                None,
            ));
        }
        let response = self
            .client
            .clone()
            .txn(Txn::new().when(compares).and_then(ops))
            .await?;
        if response.succeeded() && added > 0 && counter.is_multiple_of(50) {
            self.trim_events().await?;
        }
        Ok(response.succeeded())
    }

    /// Deletes the oldest events past [`MAX_EVENTS`].
    async fn trim_events(&self) -> Result<(), MonitorError> {
        let prefix = self.key("event/");
        let mut client = self.client.clone();
        let count = client
            .get(
                prefix.clone(),
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await?
            .count();
        let excess = usize::try_from(count)
            .unwrap_or(0)
            .saturating_sub(MAX_EVENTS);
        if excess == 0 {
            return Ok(());
        }
        let oldest = client
            .get(
                prefix.clone(),
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_keys_only()
                        .with_limit(i64::try_from(excess).unwrap_or(i64::MAX)),
                ),
            )
            .await?;
        if let (Some(first), Some(last)) = (oldest.kvs().first(), oldest.kvs().last()) {
            let mut end = last.key().to_vec();
            end.push(0);
            client
                .delete(
                    first.key().to_vec(),
                    Some(DeleteOptions::new().with_range(end)),
                )
                .await?;
        }
        Ok(())
    }

    async fn events_all(&self) -> Result<Vec<(i64, EventDoc)>, MonitorError> {
        let response = self
            .client
            .clone()
            .get(self.key("event/"), Some(GetOptions::new().with_prefix()))
            .await?;
        let mut out = Vec::with_capacity(response.kvs().len());
        for kv in response.kvs() {
            let event: EventDoc = decode(kv)?;
            out.push((kv.create_revision() * 1000 + event.seq, event));
        }
        out.sort_by_key(|(id, _)| *id);
        Ok(out)
    }

    /// Adds the writes of `assignments` to `batch`, updating `state` as it
    /// goes (each assignment sees the ones before it, as in one SQL
    /// transaction).
    fn assign(
        &self,
        state: &mut State,
        formation: &str,
        assignments: &[Assignment],
        batch: &mut Batch,
    ) -> Result<(), MonitorError> {
        for a in assignments {
            let mut node = state
                .nodes
                .get(&a.node_id)
                .cloned()
                .ok_or(MonitorError::NoSuchNode(a.node_id))?;
            node.goal = a.goal;
            node.state_change_time = now();
            let (f, revision) = state.formation(formation)?.clone();
            let mut f = f;
            if a.goal.can_take_writes() && f.primary_node_id != Some(a.node_id) {
                f.primary_epoch += 1;
                f.primary_node_id = Some(a.node_id);
                f.switchover_target = None;
                f.switchover_requested_at = None;
            }
            state.nodes.insert(node.node_id, node.clone());
            state
                .formations
                .insert(formation.to_string(), (f.clone(), revision));
            batch.put(self.node_key("node", node.node_id), &node)?;
            batch
                .events
                .push(state.node_event(&node, Some(f.primary_epoch), &a.reason));
            let n = state.notification(&node, f.primary_epoch);
            batch.state(&n)?;
        }
        Ok(())
    }

    /// Puts the formation as `state` has it (which also advances its
    /// revision, see the module doc).
    fn put_formation(
        &self,
        state: &State,
        formation: &str,
        batch: &mut Batch,
    ) -> Result<(), MonitorError> {
        let (f, _) = state.formation(formation)?;
        batch.put(self.key(&format!("formation/{formation}")), f)
    }

    fn formation_mut<'a>(
        state: &'a mut State,
        formation: &str,
    ) -> Result<&'a mut FormationDoc, MonitorError> {
        state
            .formations
            .get_mut(formation)
            .map(|(f, _)| f)
            .ok_or_else(|| MonitorError::NoSuchFormation(formation.to_string()))
    }

    /// Takes the next value of the counter `seq/<name>`, with the compare
    /// that makes the write using it fail if another writer took it first.
    async fn next_id(&self, name: &str) -> Result<(i64, Compare, String), MonitorError> {
        let key = self.key(&format!("seq/{name}"));
        let response = self.client.clone().get(key.clone(), None).await?;
        let (current, compare) = match response.kvs().first() {
            Some(kv) => (
                decode::<i64>(kv)?,
                Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision()),
            ),
            None => (0, Compare::version(key.clone(), CompareOp::Equal, 0)),
        };
        Ok((current + 1, compare, key))
    }
}

/// Where the next [`connect_member`] of this process starts among the
/// endpoints: after the member it last connected to (at first from the
/// pid, so that processes spread).
static NEXT_MEMBER: AtomicUsize = AtomicUsize::new(usize::MAX);
/// How long a member may take to answer the read that picks it.
const MEMBER_PROBE: Duration = Duration::from_secs(1);

/// A client of one member that answers a read needing a quorum, trying the
/// endpoints in turn from the one after the last connected to. etcd-client's
/// balanced channel over all endpoints keeps sending requests to a member
/// that is down (etcd-client issue #39): with one member of three dead,
/// keepers could not report at all. With one member per client, a request
/// that fails makes its caller reconnect (as on any store error), and the
/// new connection goes to another member that answers.
async fn connect_member(
    location: &EtcdLocation,
    options: etcd_client::ConnectOptions,
) -> Result<Client, MonitorError> {
    let endpoints = &location.endpoints;
    let count = endpoints.len().max(1);
    let start = match NEXT_MEMBER.load(Ordering::Relaxed) {
        usize::MAX => std::process::id() as usize,
        next => next,
    };
    let mut last = None;
    for i in 0..count {
        let index = start.wrapping_add(i) % count;
        let Some(endpoint) = endpoints.get(index) else {
            continue;
        };
        let probe = async {
            let mut client = Client::connect([endpoint], Some(options.clone())).await?;
            // A linearizable read: only a member within a quorum answers.
            client
                .get(format!("{}/layout", location.prefix), None)
                .await?;
            Ok::<_, etcd_client::Error>(client)
        };
        match tokio::time::timeout(MEMBER_PROBE, probe).await {
            Ok(Ok(client)) => {
                NEXT_MEMBER.store(index + 1, Ordering::Relaxed);
                return Ok(client);
            }
            Ok(Err(e)) => {
                let failure = connect_failure(location, &e);
                // A certificate refused by one member is refused by all.
                if !failure.is_transient() {
                    return Err(failure);
                }
                last = Some(failure);
            }
            Err(_) => {
                let silent = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("etcd member {endpoint} did not answer within {MEMBER_PROBE:?}"),
                );
                last = Some(MonitorError::Etcd(etcd_client::Error::IoError(silent)));
            }
        }
    }
    Err(last.unwrap_or_else(|| MonitorError::Corrupt("no etcd endpoint".to_string())))
}

/// Keeps `lease` alive every third of `ttl`; marks `lost` when etcd says it
/// expired, or when no renewal got through for a whole `ttl` (the lease may
/// have expired on the servers meanwhile).
async fn keep_lease(mut client: Client, lease: i64, ttl: Duration, lost: Arc<AtomicBool>) {
    let mut renewed = tokio::time::Instant::now();
    let mut channel = None;
    while !lost.load(Ordering::SeqCst) {
        if channel.is_none() {
            channel = client.lease_keep_alive(lease).await.ok();
        }
        if let Some((keeper, stream)) = channel.as_mut() {
            let renewal = async {
                keeper.keep_alive().await?;
                stream.message().await
            };
            match tokio::time::timeout(ttl / 3, renewal).await {
                Ok(Ok(Some(response))) if response.ttl() > 0 => {
                    renewed = tokio::time::Instant::now();
                }
                Ok(Ok(Some(_))) => {
                    tracing::warn!("the leader lease expired");
                    lost.store(true, Ordering::SeqCst);
                }
                _ => channel = None,
            }
        }
        if renewed.elapsed() >= ttl {
            tracing::warn!("the leader lease could not be renewed within its ttl");
            lost.store(true, Ordering::SeqCst);
        }
        tokio::time::sleep(ttl / 3).await;
    }
}

#[async_trait]
impl MonitorStore for EtcdStore {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    async fn migrate(&mut self) -> Result<i32, MonitorError> {
        let key = self.key("formation/default");
        let layout = self.key("layout");
        // Each only when absent: a second service migrating at once changes nothing.
        for (k, v) in [
            (key, encode(&FormationDoc::new("default"))?),
            (layout, encode(&LAYOUT_VERSION)?),
        ] {
            self.client
                .clone()
                .txn(
                    Txn::new()
                        .when([Compare::version(k.clone(), CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(k, v, None)]),
                )
                .await?;
        }
        Ok(LAYOUT_VERSION)
    }

    async fn formation(&self, formation: &str) -> Result<FormationRow, MonitorError> {
        let response = self
            .client
            .clone()
            .get(self.key(&format!("formation/{formation}")), None)
            .await?;
        let kv = response
            .kvs()
            .first()
            .ok_or_else(|| MonitorError::NoSuchFormation(formation.to_string()))?;
        let f: FormationDoc = decode(kv)?;
        Ok(FormationRow {
            formation: f.formation,
            dbname: f.dbname,
            number_sync_standbys: f.number_sync_standbys,
            primary_epoch: f.primary_epoch,
            primary_node_id: f.primary_node_id,
        })
    }

    async fn formations(&self) -> Result<Vec<FormationRow>, MonitorError> {
        let state = self.read_state().await?;
        Ok(state
            .formations
            .into_values()
            .map(|(f, _)| FormationRow {
                formation: f.formation,
                dbname: f.dbname,
                number_sync_standbys: f.number_sync_standbys,
                primary_epoch: f.primary_epoch,
                primary_node_id: f.primary_node_id,
            })
            .collect())
    }

    async fn nodes(
        &self,
        formation: &str,
        group: Option<i32>,
    ) -> Result<Vec<NodeRow>, MonitorError> {
        let state = self.read_state().await?;
        let at = now();
        let mut rows: Vec<NodeRow> = state
            .nodes
            .values()
            .filter(|n| n.formation == formation && group.is_none_or(|g| g == n.group_id))
            .map(|n| state.row(n, at))
            .collect();
        rows.sort_by_key(|n| (n.group_id, n.node_id));
        Ok(rows)
    }

    async fn all_nodes(&self) -> Result<Vec<NodeRow>, MonitorError> {
        let state = self.read_state().await?;
        let at = now();
        let mut rows: Vec<NodeRow> = state.nodes.values().map(|n| state.row(n, at)).collect();
        rows.sort_by(|a, b| {
            (&a.formation, a.group_id, a.node_id).cmp(&(&b.formation, b.group_id, b.node_id))
        });
        Ok(rows)
    }

    async fn node(&self, node_id: i64) -> Result<NodeRow, MonitorError> {
        let state = self.read_state().await?;
        let node = state
            .nodes
            .get(&node_id)
            .ok_or(MonitorError::NoSuchNode(node_id))?;
        Ok(state.row(node, now()))
    }

    async fn node_by_name(&self, formation: &str, name: &str) -> Result<NodeRow, MonitorError> {
        let state = self.read_state().await?;
        let node = state
            .nodes
            .values()
            .find(|n| n.formation == formation && n.name == name)
            .ok_or_else(|| MonitorError::NoSuchNodeName {
                formation: formation.to_string(),
                name: name.to_string(),
            })?;
        Ok(state.row(node, now()))
    }

    async fn group_snapshot(
        &self,
        formation: &str,
        group: i32,
    ) -> Result<GroupSnapshot, MonitorError> {
        let state = self.read_state().await?;
        let version = state.version(formation, group)?;
        let (f, _) = state.formation(formation)?;
        let at = now();
        let switchover = f.switchover_requested_at.map(|requested| {
            let pending = state
                .routers
                .iter()
                .filter(|r| {
                    r.formation == formation
                        && r.last_seen > at - 3.0
                        && r.drained_at.is_none_or(|d| d < requested)
                })
                .count();
            SwitchoverDrain {
                age: Duration::from_secs_f64((at - requested).max(0.0)),
                routers_pending: pending,
            }
        });
        Ok(GroupSnapshot {
            nodes: state.group_rows(formation, group),
            number_sync_standbys: f.number_sync_standbys,
            switchover,
            preferred_candidate: f.switchover_target,
            version,
        })
    }

    async fn events(&self, formation: &str, count: i64) -> Result<Vec<EventRow>, MonitorError> {
        let events: Vec<(i64, EventDoc)> = self
            .events_all()
            .await?
            .into_iter()
            .filter(|(_, e)| e.formation == formation)
            .collect();
        let skip = events
            .len()
            .saturating_sub(usize::try_from(count).unwrap_or(0));
        Ok(events
            .into_iter()
            .skip(skip)
            .map(|(id, e)| EventRow {
                event_id: id,
                event_time: format_time(e.time, true),
                formation: e.formation,
                group_id: e.group_id,
                node_id: e.node_id,
                node_name: e.node_name,
                reported_state: e.reported_state.map(|s| s.as_str().to_string()),
                goal_state: e.goal_state.map(|s| s.as_str().to_string()),
                primary_epoch: e.primary_epoch,
                description: e.description,
            })
            .collect())
    }

    async fn goal_history(&self) -> Result<Vec<GoalEvent>, MonitorError> {
        Ok(self
            .events_all()
            .await?
            .into_iter()
            .filter_map(|(_, e)| {
                Some(GoalEvent {
                    time: e.time,
                    node_name: e.node_name,
                    node_port: e.node_port?,
                    goal: e.goal_state?,
                })
            })
            .collect())
    }

    async fn primary_changes(&self) -> Result<Vec<PrimaryChange>, MonitorError> {
        // As the Postgres store computes it: from the first step away from
        // the old primary (an event of the old epoch assigning one of these
        // goals) to the new primary's first report of a writable state in
        // the new epoch.
        const AWAY: [NodeState; 5] = [
            NodeState::Draining,
            NodeState::DemoteTimeout,
            NodeState::PreparePromotion,
            NodeState::StopReplication,
            NodeState::ReportLsn,
        ];
        const WRITABLE: [NodeState; 3] = [
            NodeState::Single,
            NodeState::WaitPrimary,
            NodeState::Primary,
        ];
        let mut started: BTreeMap<(String, i64), f64> = BTreeMap::new();
        let mut ended: BTreeMap<(String, i64), f64> = BTreeMap::new();
        for (_, e) in self.events_all().await? {
            let Some(epoch) = e.primary_epoch else {
                continue;
            };
            if e.goal_state.is_some_and(|g| AWAY.contains(&g)) {
                let t = started
                    .entry((e.formation.clone(), epoch + 1))
                    .or_insert(e.time);
                *t = t.min(e.time);
            }
            if e.reported_state.is_some_and(|r| WRITABLE.contains(&r))
                && e.description.starts_with("New state is reported by node ")
            {
                let t = ended.entry((e.formation.clone(), epoch)).or_insert(e.time);
                *t = t.min(e.time);
            }
        }
        Ok(started
            .into_iter()
            .filter_map(|((formation, epoch), start)| {
                let end = *ended.get(&(formation.clone(), epoch))?;
                (end >= start).then(|| PrimaryChange {
                    formation,
                    epoch,
                    duration: Duration::from_secs_f64(end - start),
                })
            })
            .collect())
    }

    async fn clock(&self) -> Result<String, MonitorError> {
        Ok(format_time(now(), false))
    }

    async fn routing(&self, formation: &str) -> Result<Routing, MonitorError> {
        let state = self.read_state().await?;
        let (f, _) = state.formation(formation)?;
        let primary = f
            .primary_node_id
            .and_then(|id| state.nodes.get(&id))
            .map(|n| RoutedNode {
                node_id: n.node_id,
                host: n.host.clone(),
                port: n.port,
                goal: n.goal,
                reported: state
                    .reports
                    .get(&n.node_id)
                    .map_or(NodeState::Init, |r| r.reported),
            });
        Ok(Routing {
            epoch: f.primary_epoch,
            primary,
            switchover_requested: f.switchover_requested_at.map(|t| format_time(t, true)),
        })
    }

    async fn routers(&self, within: Duration) -> Result<Vec<RouterRow>, MonitorError> {
        let state = self.read_state().await?;
        let since = now() - within.as_secs_f64();
        let mut rows: Vec<RouterRow> = state
            .routers
            .into_iter()
            .filter(|r| r.last_seen > since)
            .map(|r| RouterRow {
                router_id: r.router_id,
                formation: r.formation,
                address: r.address,
                read_only_address: r.read_only_address,
            })
            .collect();
        rows.sort_by(|a, b| a.router_id.cmp(&b.router_id));
        Ok(rows)
    }

    async fn register(&self, reg: &Registration) -> Result<Registered, MonitorError> {
        if !(0..=100).contains(&reg.candidate_priority) {
            return Err(MonitorError::RegistrationRefused(format!(
                "invalid value: candidate priority {} is not within 0..100",
                reg.candidate_priority
            )));
        }
        for _ in 0..CAS_ATTEMPTS {
            let (node_id, seq_compare, seq_key) = self.next_id("node").await?;
            let mut state = self.read_state().await?;
            let (f, revision) = state.formation(&reg.formation)?.clone();
            let members = state
                .nodes
                .values()
                .filter(|n| n.formation == reg.formation)
                .count();
            if members > 0 && f.dbname != reg.dbname {
                return Err(MonitorError::RegistrationRefused(format!(
                    "formation {:?} uses database {:?}, not {:?}",
                    reg.formation, f.dbname, reg.dbname
                )));
            }
            let name = if reg.name.is_empty() {
                format!("node_{node_id}")
            } else {
                reg.name.clone()
            };
            if state
                .nodes
                .values()
                .any(|n| n.formation == reg.formation && n.name == name)
            {
                return Err(MonitorError::RegistrationRefused(format!(
                    "a node named {:?} already exists in formation {:?}; choose another --name",
                    reg.name, reg.formation
                )));
            }
            if state
                .nodes
                .values()
                .any(|n| n.host == reg.host && n.port == reg.port)
            {
                return Err(MonitorError::RegistrationRefused(format!(
                    "a node at {}:{} is already registered; drop it first or use another --pgport",
                    reg.host, reg.port
                )));
            }
            let node = NodeDoc {
                node_id,
                formation: reg.formation.clone(),
                group_id: 0,
                name: name.clone(),
                host: reg.host.clone(),
                port: reg.port,
                goal: NodeState::Init,
                candidate_priority: reg.candidate_priority,
                replication_quorum: reg.replication_quorum,
                state_change_time: now(),
            };
            if members == 0 {
                EtcdStore::formation_mut(&mut state, &reg.formation)?.dbname = reg.dbname.clone();
            }
            let mut batch = Batch::default();
            // The formation is put too: its revision covers its set of nodes.
            self.put_formation(&state, &reg.formation, &mut batch)?;
            batch.put(seq_key, &node_id)?;
            batch.put(self.node_key("node", node_id), &node)?;
            batch.put(self.node_key("report", node_id), &ReportDoc::default())?;
            batch.notify(Channel::Report, node_id.to_string());
            let formation_key = self.key(&format!("formation/{}", reg.formation));
            let compares = vec![
                seq_compare,
                Compare::mod_revision(formation_key, CompareOp::Equal, revision),
            ];
            if self.commit(compares, batch).await? {
                return Ok(Registered {
                    node_id,
                    group_id: 0,
                    name,
                });
            }
        }
        Err(MonitorError::RegistrationRefused(
            "too many registrations at once; try again".to_string(),
        ))
    }

    async fn report(&self, report: &NodeReport) -> Result<Assigned, MonitorError> {
        let mut state = self.read_state().await?;
        let node = state
            .nodes
            .get(&report.node_id)
            .cloned()
            .ok_or(MonitorError::NoSuchNode(report.node_id))?;
        let epoch = state.formation(&node.formation)?.0.primary_epoch;
        let before = state.reports.get(&node.node_id).map(|r| r.reported);
        let doc = ReportDoc {
            reported: report.state,
            pg_running: report.pg_running,
            tli: report.tli,
            lsn: report.lsn,
            rep_state: report.rep_state.clone(),
            upstream_streaming: report.upstream_streaming,
            in_recovery: report.in_recovery,
            upstream_silence_ms: report
                .upstream_silence
                .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            report_time: Some(now()),
        };
        state.reports.insert(node.node_id, doc.clone());
        let mut batch = Batch::default();
        batch.put(self.node_key("report", node.node_id), &doc)?;
        if before != Some(report.state) {
            let description = format!(
                "New state is reported by node {} ({}): {}",
                node.node_id,
                node.name,
                report.state.as_str()
            );
            batch
                .events
                .push(state.node_event(&node, Some(epoch), &description));
            let n = state.notification(&node, epoch);
            batch.state(&n)?;
        }
        batch.notify(Channel::Report, node.node_id.to_string());
        // Only while the node is registered (not dropped meanwhile).
        let exists = Compare::version(self.node_key("node", node.node_id), CompareOp::Greater, 0);
        if !self.commit(vec![exists], batch).await? {
            return Err(MonitorError::NoSuchNode(report.node_id));
        }
        Ok(Assigned {
            goal: node.goal,
            group_id: node.group_id,
            primary_epoch: epoch,
        })
    }

    async fn node_event(&self, node_id: i64, description: &str) -> Result<(), MonitorError> {
        let state = self.read_state().await?;
        let Some(node) = state.nodes.get(&node_id) else {
            return Ok(());
        };
        let epoch = state.formation(&node.formation)?.0.primary_epoch;
        let mut batch = Batch::default();
        batch
            .events
            .push(state.node_event(node, Some(epoch), description));
        self.commit(Vec::new(), batch).await?;
        Ok(())
    }

    async fn apply(
        &mut self,
        formation: &str,
        group: i32,
        expected: &GroupVersion,
        write: GroupWrite,
    ) -> Result<Written, MonitorError> {
        let mut state = self.read_state().await?;
        if state.version(formation, group)? != *expected {
            return Ok(Written::Stale);
        }
        let mut batch = Batch::default();
        match &write {
            GroupWrite::Assign {
                assignments,
                end_drain,
            } => {
                self.assign(&mut state, formation, assignments, &mut batch)?;
                if *end_drain {
                    EtcdStore::formation_mut(&mut state, formation)?.switchover_requested_at = None;
                }
            }
            GroupWrite::Remove { node_id, reason } => {
                if let Some(node) = state.nodes.get(node_id) {
                    let mut event = state.node_event(node, None, reason);
                    event.primary_epoch = None;
                    batch.events.push(event);
                }
                let f = EtcdStore::formation_mut(&mut state, formation)?;
                if f.primary_node_id == Some(*node_id) {
                    f.primary_node_id = None;
                }
                for kind in ["node", "report", "health"] {
                    batch.deletes.push(self.node_key(kind, *node_id));
                }
            }
            GroupWrite::SetNumberSyncStandbys { value, reason } => {
                let f = EtcdStore::formation_mut(&mut state, formation)?;
                f.number_sync_standbys = *value;
                let epoch = f.primary_epoch;
                batch
                    .events
                    .push(group_event(formation, group, epoch, reason));
            }
            GroupWrite::AbandonSwitchover { reason } => {
                let f = EtcdStore::formation_mut(&mut state, formation)?;
                f.switchover_requested_at = None;
                let epoch = f.primary_epoch;
                batch.notify(Channel::Drain, formation.to_string());
                batch
                    .events
                    .push(group_event(formation, group, epoch, reason));
            }
        }
        self.put_formation(&state, formation, &mut batch)?;
        let formation_key = self.key(&format!("formation/{formation}"));
        let compare = Compare::mod_revision(formation_key, CompareOp::Equal, expected.revision);
        Ok(if self.commit_fenced(vec![compare], batch).await? {
            Written::Applied
        } else {
            Written::Stale
        })
    }

    async fn group_event(
        &self,
        formation: &str,
        group: i32,
        description: &str,
    ) -> Result<(), MonitorError> {
        let epoch = self.formation(formation).await?.primary_epoch;
        let mut batch = Batch::default();
        batch
            .events
            .push(group_event(formation, group, epoch, description));
        self.commit_fenced(Vec::new(), batch).await?;
        Ok(())
    }

    async fn record_health(
        &self,
        node_id: i64,
        health: Health,
        changed: Option<&str>,
    ) -> Result<(), MonitorError> {
        let mut state = self.read_state().await?;
        let Some(node) = state.nodes.get(&node_id).cloned() else {
            return Ok(());
        };
        let doc = HealthDoc {
            health: health.to_db(),
            time: now(),
        };
        state.health.insert(node_id, doc.clone());
        let mut batch = Batch::default();
        batch.put(self.node_key("health", node_id), &doc)?;
        if let Some(description) = changed {
            let epoch = state.formation(&node.formation)?.0.primary_epoch;
            batch
                .events
                .push(state.node_event(&node, Some(epoch), description));
            let n = state.notification(&node, epoch);
            batch.state(&n)?;
        }
        let exists = Compare::version(self.node_key("node", node_id), CompareOp::Greater, 0);
        self.commit_fenced(vec![exists], batch).await?;
        Ok(())
    }

    async fn pending_requests(&self) -> Result<Vec<PendingRequest>, MonitorError> {
        let response = self
            .client
            .clone()
            .get(self.key("request/"), Some(GetOptions::new().with_prefix()))
            .await?;
        let at = now();
        let mut out = Vec::new();
        for kv in response.kvs() {
            let r: RequestDoc = decode(kv)?;
            if r.status == "pending" {
                out.push(PendingRequest {
                    id: r.id,
                    formation: r.formation,
                    group_id: r.group_id,
                    node_id: r.node_id,
                    kind: r.kind,
                    value: r.value,
                    age: Duration::from_secs_f64((at - r.created_at).max(0.0)),
                });
            }
        }
        Ok(out)
    }

    async fn answer_request(
        &mut self,
        request: &PendingRequest,
        expected: Option<&GroupVersion>,
        answer: RequestAnswer,
    ) -> Result<Written, MonitorError> {
        let key = self.node_key("request", request.id);
        let response = self.client.clone().get(key.clone(), None).await?;
        let Some(kv) = response.kvs().first() else {
            return Ok(Written::Stale);
        };
        let mut doc: RequestDoc = decode(kv)?;
        if doc.status != "pending" {
            return Ok(Written::Stale);
        }
        let mut compares = vec![Compare::mod_revision(
            key.clone(),
            CompareOp::Equal,
            kv.mod_revision(),
        )];
        let formation = request.formation.as_str();
        let group = request.group_id;
        let mut batch = Batch::default();
        if !matches!(answer, RequestAnswer::Refuse(_)) {
            let mut state = self.read_state().await?;
            let revision = state.formation(formation)?.1;
            if let Some(expected) = expected {
                if state.version(formation, group)? != *expected {
                    return Ok(Written::Stale);
                }
            }
            let formation_key = self.key(&format!("formation/{formation}"));
            compares.push(Compare::mod_revision(
                formation_key,
                CompareOp::Equal,
                expected.map_or(revision, |v| v.revision),
            ));
            match &answer {
                RequestAnswer::Refuse(_) => {}
                RequestAnswer::Setting { setting, reply } => {
                    match *setting {
                        Setting::CandidatePriority(node, value) => {
                            let mut n = state
                                .nodes
                                .get(&node)
                                .cloned()
                                .ok_or(MonitorError::NoSuchNode(node))?;
                            n.candidate_priority = value;
                            batch.put(self.node_key("node", node), &n)?;
                        }
                        Setting::ReplicationQuorum(node, value) => {
                            let mut n = state
                                .nodes
                                .get(&node)
                                .cloned()
                                .ok_or(MonitorError::NoSuchNode(node))?;
                            n.replication_quorum = value;
                            batch.put(self.node_key("node", node), &n)?;
                        }
                        Setting::NumberSyncStandbys(value) => {
                            EtcdStore::formation_mut(&mut state, formation)?.number_sync_standbys =
                                value;
                        }
                    }
                    let epoch = state.formation(formation)?.0.primary_epoch;
                    batch
                        .events
                        .push(group_event(formation, group, epoch, reply));
                    // Keepers re-read synchronous_standby_names from the new settings.
                    batch.notify(Channel::Report, formation.to_string());
                }
                RequestAnswer::StartSwitchover { target, reason } => {
                    let f = EtcdStore::formation_mut(&mut state, formation)?;
                    f.switchover_requested_at = Some(now());
                    f.switchover_target = *target;
                    let epoch = f.primary_epoch;
                    batch.notify(Channel::Drain, formation.to_string());
                    batch
                        .events
                        .push(group_event(formation, group, epoch, reason));
                }
                RequestAnswer::Assign { assignments, .. } => {
                    self.assign(&mut state, formation, assignments, &mut batch)?;
                }
            }
            self.put_formation(&state, formation, &mut batch)?;
        }
        let (status, reply) = match &answer {
            RequestAnswer::Refuse(reason) => ("refused", reason.clone()),
            RequestAnswer::Setting { reply, .. } | RequestAnswer::Assign { reply, .. } => {
                ("accepted", reply.clone())
            }
            RequestAnswer::StartSwitchover { reason, .. } => ("accepted", reason.clone()),
        };
        doc.status = status.to_string();
        doc.reply = Some(reply);
        doc.answered_at = Some(now());
        batch.put(key, &doc)?;
        batch.notify(Channel::Request, request.id.to_string());
        Ok(if self.commit_fenced(compares, batch).await? {
            Written::Applied
        } else {
            Written::Stale
        })
    }

    async fn file_request(&self, request: &NewRequest) -> Result<i64, MonitorError> {
        for _ in 0..CAS_ATTEMPTS {
            let (id, compare, seq_key) = self.next_id("request").await?;
            let doc = RequestDoc {
                id,
                formation: request.formation.clone(),
                group_id: request.group_id,
                node_id: request.node_id,
                kind: request.kind.as_str().to_string(),
                value: request.value.clone(),
                status: "pending".to_string(),
                reply: None,
                created_at: now(),
                answered_at: None,
            };
            let mut batch = Batch::default();
            batch.put(seq_key, &id)?;
            batch.put(self.node_key("request", id), &doc)?;
            batch.notify(Channel::Request, id.to_string());
            if self.commit(vec![compare], batch).await? {
                return Ok(id);
            }
        }
        Err(MonitorError::Corrupt(
            "could not take a request id: too many requests at once".to_string(),
        ))
    }

    async fn request_status(&self, request_id: i64) -> Result<RequestStatus, MonitorError> {
        let response = self
            .client
            .clone()
            .get(self.node_key("request", request_id), None)
            .await?;
        let kv = response
            .kvs()
            .first()
            .ok_or_else(|| MonitorError::Corrupt(format!("no request {request_id}")))?;
        let doc: RequestDoc = decode(kv)?;
        Ok(RequestStatus::from_stored(
            &doc.status,
            doc.reply.unwrap_or_default(),
        ))
    }

    async fn register_router(
        &self,
        router: &RouterRegistration,
        drained: bool,
    ) -> Result<(), MonitorError> {
        let key = self.key(&format!("router/{}", router.router_id));
        let previous = self.client.clone().get(key.clone(), None).await?;
        let drained_at = if drained {
            Some(now())
        } else {
            match previous.kvs().first() {
                Some(kv) => decode::<RouterDoc>(kv)?.drained_at,
                None => None,
            }
        };
        let doc = RouterDoc {
            router_id: router.router_id.clone(),
            formation: router.formation.clone(),
            address: router.address.clone(),
            last_seen: now(),
            routed_epoch: router.routed_epoch,
            drained_at,
            read_only_address: router.read_only_address.clone(),
        };
        self.client.clone().put(key, encode(&doc)?, None).await?;
        Ok(())
    }

    async fn listen(&self, channels: &[Channel]) -> Result<(), MonitorError> {
        if let Ok(mut listening) = self.listening.lock() {
            listening.extend(channels.iter().copied());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_name_endpoints_and_a_prefix() {
        let location = parse_uri("etcd://10.0.0.1:2379,10.0.0.2:2379/prod/hapg").expect("parses");
        assert_eq!(
            location.endpoints,
            ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        assert_eq!(location.prefix, "/prod/hapg");
        let location = parse_uri("etcd://h:1/p?cacert=/ca.pem").expect("parses");
        assert_eq!(location.endpoints, ["https://h:1"]);
        for (uri, says) in [
            ("postgres://x/y", "starts with etcd://"),
            ("etcd:///p", "empty member"),
            ("etcd://127.0.0.1:2379", "no key prefix"),
            ("etcd://h/p?cert=/c.pem", "give both or neither"),
            ("etcd://h/p?ca=/c.pem", "unknown option \"ca\""),
            ("etcd://h/p?tls=on", "needs cacert=FILE"),
        ] {
            let e = parse_uri(uri).expect_err(uri).to_string();
            assert!(e.contains(says), "{uri}: {e}");
        }
    }

    /// The TLS files are read when connecting: a missing one, or TLS with
    /// no CA to check the members against, is named.
    #[test]
    fn tls_options_name_the_file_or_the_missing_option() {
        let e = tls_options(&EtcdTls::default())
            .expect_err("no cacert")
            .to_string();
        assert!(e.contains("cacert=FILE"), "{e}");
        let location = parse_uri("etcd://h/p?cacert=/nonexistent/ca.pem").expect("parses");
        let e = tls_options(location.tls.as_ref().expect("tls"))
            .expect_err("no file")
            .to_string();
        assert!(
            e.contains("cacert") && e.contains("/nonexistent/ca.pem"),
            "{e}"
        );
    }

    /// A report's age runs from when this process first saw its revision:
    /// a later report counts from its sighting whatever time the keeper
    /// wrote in it; only a first sighting takes the keeper's time (capped).
    #[test]
    fn reports_are_timed_by_the_readers_clock() {
        let mut clock = ReportClock::default();
        assert_eq!(clock.observe(1, 10, Some(95.0), 100.0), 95.0);
        assert_eq!(clock.observe(2, 11, Some(500.0), 100.0), 100.0);
        assert_eq!(clock.observe(1, 10, Some(95.0), 103.0), 95.0);
        // The keeper is an hour behind, or ahead: seen now all the same.
        assert_eq!(clock.observe(1, 12, Some(95.0 - 3600.0), 104.0), 104.0);
        assert_eq!(clock.observe(2, 13, Some(104.0 + 3600.0), 104.5), 104.5);
        assert_eq!(clock.observe(2, 13, Some(104.0 + 3600.0), 110.0), 104.5);
    }

    #[test]
    fn times_are_formatted_in_utc() {
        assert_eq!(format_time(0.0, false), "1970-01-01 00:00:00");
        assert_eq!(
            format_time(951_782_400.5, true),
            "2000-02-29 00:00:00.500000"
        );
        assert_eq!(format_time(1_767_225_599.0, false), "2025-12-31 23:59:59");
    }
}
