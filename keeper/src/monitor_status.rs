//! What the monitor's HTTP endpoints answer: a snapshot of every node as the
//! monitor database holds it and of the past primary changes, refreshed by
//! a poller beside the monitor service (never by a request).

use std::time::{Duration, Instant};

use hapg_monitor::client::NodeRow;
use hapg_monitor::store::PrimaryChange;
use hapg_monitor::MonitorClient;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::node_status::Answer;

/// How often the poller reads the monitor database.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// One poll gives up after this long.
const POLL_TIMEOUT: Duration = Duration::from_secs(3);
/// `/liveness` fails when no poll has finished for this long.
pub const LIVENESS_DEADLINE: Duration = Duration::from_secs(10);

/// The monitor as its poller last read it.
#[derive(Debug, Clone)]
pub struct MonitorStatus {
    /// When the last poll finished (well or not).
    pub polled_at: Instant,
    /// The monitor database answered the last poll.
    pub database_up: bool,
    /// Every node of every formation, as of the last poll that answered.
    pub nodes: Vec<NodeRow>,
    /// Every completed primary change, oldest first.
    pub changes: Vec<PrimaryChange>,
}

impl MonitorStatus {
    /// Before the first poll.
    pub fn starting() -> MonitorStatus {
        MonitorStatus {
            polled_at: Instant::now(),
            database_up: false,
            nodes: Vec::new(),
            changes: Vec::new(),
        }
    }

    /// The answer of `path` at `now`; `None` for an unknown path.
    pub fn answer(&self, path: &str, query: Option<&str>, now: Instant) -> Option<Answer> {
        if !matches!(path, "/health" | "/liveness" | "/state") {
            return None;
        }
        if let Some(query) = query.filter(|q| !q.is_empty()) {
            let key = query.split(['=', '&']).next().unwrap_or(query);
            return Some(Answer::bad_request(format!(
                "unknown parameter {key:?} (this endpoint takes none)"
            )));
        }
        let check = |ok: bool, what: &str| {
            let mut answer = Answer::json(format!("{{\"{what}\": {ok}}}\n"));
            if !ok {
                answer.status = 503;
            }
            answer
        };
        Some(match path {
            "/health" => check(self.database_up, "database_up"),
            "/liveness" => check(
                now.saturating_duration_since(self.polled_at) < LIVENESS_DEADLINE,
                "live",
            ),
            _ => Answer::json(
                serde_json::to_string_pretty(&StateJson {
                    database_up: self.database_up,
                    polled_seconds_ago: now.saturating_duration_since(self.polled_at).as_secs_f64(),
                    nodes: &self.nodes,
                    primary_changes: self
                        .changes
                        .iter()
                        .map(|c| ChangeJson {
                            formation: &c.formation,
                            epoch: c.epoch,
                            duration_seconds: c.duration.as_secs_f64(),
                        })
                        .collect(),
                })
                .unwrap_or_default()
                    + "\n",
            ),
        })
    }
}

#[derive(Serialize)]
struct StateJson<'a> {
    database_up: bool,
    polled_seconds_ago: f64,
    nodes: &'a [NodeRow],
    primary_changes: Vec<ChangeJson<'a>>,
}

#[derive(Serialize)]
struct ChangeJson<'a> {
    formation: &'a str,
    epoch: i64,
    duration_seconds: f64,
}

async fn read(
    client: &MonitorClient,
) -> Result<(Vec<NodeRow>, Vec<PrimaryChange>), hapg_monitor::MonitorError> {
    let mut nodes = Vec::new();
    for formation in client.formations().await? {
        nodes.extend(client.nodes(&formation.formation, None).await?);
    }
    let changes = client.primary_changes().await?;
    Ok((nodes, changes))
}

/// Reads the monitor database at `conninfo` every [`POLL_INTERVAL`] into
/// `status` until `token` is cancelled.
pub async fn poll(
    conninfo: String,
    status: watch::Sender<MonitorStatus>,
    token: CancellationToken,
) {
    let mut client: Option<MonitorClient> = None;
    while !token.is_cancelled() {
        let round = tokio::time::timeout(POLL_TIMEOUT, async {
            if client.as_ref().is_none_or(MonitorClient::is_closed) {
                client = Some(MonitorClient::connect(&conninfo).await?);
            }
            match &client {
                Some(c) => read(c).await,
                None => Err(hapg_monitor::MonitorError::NotAMonitor),
            }
        })
        .await;
        match round {
            Ok(Ok((nodes, changes))) => status.send_modify(|s| {
                s.polled_at = Instant::now();
                s.database_up = true;
                s.nodes = nodes;
                s.changes = changes;
            }),
            failed => {
                if let Ok(Err(e)) = failed {
                    tracing::debug!(error = %e, "http: cannot read the monitor database");
                }
                client = None;
                status.send_modify(|s| {
                    s.polled_at = Instant::now();
                    s.database_up = false;
                });
            }
        }
        tokio::select! {
            _ = token.cancelled() => {}
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
        }
    }
}
