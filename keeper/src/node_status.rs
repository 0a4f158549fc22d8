//! What a node's HTTP endpoints answer, decided from the keeper's latest
//! observations only: a snapshot the keeper loop publishes (never a query
//! made for the request), and the pure rules of `/primary`, `/replica`,
//! `/read-only`, `/health` and `/liveness` over it (Patroni's names and
//! semantics, docs/operations.md).

use std::time::{Duration, Instant};

use hapg_monitor::state::Health;
use hapg_monitor::NodeState;
use serde::Serialize;

/// What the keeper last saw and was told, as of `observed_at`.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeStatus {
    /// Node id the monitor assigned (0 before registration).
    pub node_id: i64,
    /// Node name.
    pub name: String,
    /// Formation.
    pub formation: String,
    /// The state the keeper last reached (and reports).
    pub reported: NodeState,
    /// The goal the monitor last assigned.
    pub assigned: NodeState,
    /// Postgres runs (the postmaster lives, or it answered).
    pub postgres_running: bool,
    /// Postgres answered and is in recovery (`None`: it did not answer).
    pub in_recovery: Option<bool>,
    /// A standby's WAL receiver is streaming.
    pub streaming: bool,
    /// Flush LSN on a primary, receive (or replay) LSN on a standby.
    pub lsn: u64,
    /// Timeline.
    pub timeline: i32,
    /// A standby's replay distance behind the primary's end of WAL as its
    /// walsender last told it, in bytes.
    pub lag_bytes: Option<u64>,
    /// A standby's delay: how long ago the last transaction it has not yet
    /// replayed past was committed, or its upstream's silence, whichever is longer.
    pub lag: Option<Duration>,
    /// When the keeper made this observation.
    pub observed_at: Instant,
    /// When the monitor last answered a report.
    pub last_report: Option<Instant>,
    /// The monitor's verdict on this node, as last read from the monitor.
    pub monitor_health: Option<Health>,
    /// A primary's fence timeout (`timeout.network_partition_timeout_ms`):
    /// an observation older than this no longer vouches for a primary.
    pub fence_timeout: Duration,
    /// `/liveness` fails when the keeper's loop has not run for this long.
    pub liveness_deadline: Duration,
}

impl NodeStatus {
    /// A node whose keeper has not looked yet: every check fails.
    pub fn starting(fence_timeout: Duration, liveness_deadline: Duration) -> NodeStatus {
        NodeStatus {
            node_id: 0,
            name: String::new(),
            formation: String::new(),
            reported: NodeState::Init,
            assigned: NodeState::Init,
            postgres_running: false,
            in_recovery: None,
            streaming: false,
            lsn: 0,
            timeline: 0,
            lag_bytes: None,
            lag: None,
            observed_at: Instant::now(),
            last_report: None,
            monitor_health: None,
            fence_timeout,
            liveness_deadline,
        }
    }

    /// The monitor names this node writable and it is writable now: its
    /// keeper reached a writable state, Postgres runs out of recovery, and
    /// the observation is recent enough that the node cannot have been
    /// fenced or demoted since without the keeper seeing it.
    pub fn is_primary(&self, now: Instant) -> bool {
        self.assigned.can_take_writes()
            && self.reported.can_take_writes()
            && self.postgres_running
            && self.in_recovery == Some(false)
            && now.saturating_duration_since(self.observed_at) < self.fence_timeout
    }

    /// A standby that streams from the primary, within `bound` if given.
    pub fn is_replica(&self, bound: Option<LagBound>) -> bool {
        let standby = self.postgres_running
            && self.in_recovery == Some(true)
            && self.streaming
            && self.reported.is_standby()
            && !self.assigned.can_take_writes();
        standby
            && match bound {
                None => true,
                Some(LagBound::Bytes(max)) => self.lag_bytes.is_some_and(|lag| lag <= max),
                Some(LagBound::Time(max)) => self.lag.is_some_and(|lag| lag <= max),
            }
    }

    /// The keeper's loop ran within its deadline.
    pub fn is_live(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.observed_at) < self.liveness_deadline
    }

    /// The JSON of `/state`.
    pub fn to_json(&self, now: Instant) -> StateJson {
        StateJson {
            node_id: self.node_id,
            name: self.name.clone(),
            formation: self.formation.clone(),
            reported_state: self.reported,
            assigned_state: self.assigned,
            postgres_running: self.postgres_running,
            in_recovery: self.in_recovery,
            streaming: self.streaming,
            lsn: format_lsn(self.lsn),
            timeline: self.timeline,
            lag_bytes: self.lag_bytes,
            lag_seconds: self.lag.map(|d| d.as_secs_f64()),
            monitor_health: self.monitor_health.map(Health::as_str),
            observed_seconds_ago: now
                .saturating_duration_since(self.observed_at)
                .as_secs_f64(),
            last_report_seconds_ago: self
                .last_report
                .map(|at| now.saturating_duration_since(at).as_secs_f64()),
            primary: self.is_primary(now),
            replica: self.is_replica(None),
        }
    }
}

/// The body of `GET /state`.
#[derive(Debug, Clone, Serialize)]
pub struct StateJson {
    /// Node id.
    pub node_id: i64,
    /// Node name.
    pub name: String,
    /// Formation.
    pub formation: String,
    /// State the keeper last reached.
    pub reported_state: NodeState,
    /// Goal the monitor assigned.
    pub assigned_state: NodeState,
    /// Postgres runs.
    pub postgres_running: bool,
    /// In recovery (null: Postgres did not answer).
    pub in_recovery: Option<bool>,
    /// The WAL receiver streams.
    pub streaming: bool,
    /// LSN, as Postgres writes it.
    pub lsn: String,
    /// Timeline.
    pub timeline: i32,
    /// Replay lag in bytes (standbys).
    pub lag_bytes: Option<u64>,
    /// Replay delay in seconds (standbys).
    pub lag_seconds: Option<f64>,
    /// good, bad or unknown, as the monitor last said.
    pub monitor_health: Option<&'static str>,
    /// Age of this observation.
    pub observed_seconds_ago: f64,
    /// Time since the monitor last answered a report.
    pub last_report_seconds_ago: Option<f64>,
    /// What `/primary` answers now.
    pub primary: bool,
    /// What `/replica` answers now.
    pub replica: bool,
}

fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// The `lag` parameter of `/replica` and `/read-only`: a distance in bytes
/// (`16MB`, `1048576`) or a delay (`5s`, `500ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LagBound {
    /// At most this many bytes behind.
    Bytes(u64),
    /// At most this long behind.
    Time(Duration),
}

impl std::str::FromStr for LagBound {
    type Err = String;

    /// Units as Postgres spells them: `B`, `kB`, `MB`, `GB`, `TB` (powers of
    /// 1024; a bare number is bytes) and `ms`, `s`, `min`, `h`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let wrong = || {
            format!(
                "{text:?} is not a lag: give bytes (16MB, 1048576; units B, kB, MB, GB, TB) or a delay (5s; units ms, s, min, h)"
            )
        };
        let number: u64 = number.parse().map_err(|_| wrong())?;
        let bytes = |factor: u64| number.checked_mul(factor).map(LagBound::Bytes);
        let time = |ms: u64| {
            number
                .checked_mul(ms)
                .map(|ms| LagBound::Time(Duration::from_millis(ms)))
        };
        match unit.trim() {
            "" | "B" => bytes(1),
            "kB" => bytes(1 << 10),
            "MB" => bytes(1 << 20),
            "GB" => bytes(1 << 30),
            "TB" => bytes(1 << 40),
            "ms" => time(1),
            "s" => time(1_000),
            "min" => time(60_000),
            "h" => time(3_600_000),
            _ => None,
        }
        .ok_or_else(wrong)
    }
}

pub use hapg_monitor::http_server::Answer;

/// The query parameters of a health check: only `lag`, and only where it means something.
fn lag_parameter(query: Option<&str>, accepts_lag: bool) -> Result<Option<LagBound>, Answer> {
    let mut bound = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "lag" if accepts_lag => {
                bound = Some(
                    value
                        .parse::<LagBound>()
                        .map_err(|e| Answer::bad_request(format!("parameter lag: {e}")))?,
                );
            }
            _ => {
                return Err(Answer::bad_request(format!(
                    "unknown parameter {key:?}{}",
                    if accepts_lag {
                        " (this endpoint takes lag)"
                    } else {
                        " (this endpoint takes none)"
                    }
                )))
            }
        }
    }
    Ok(bound)
}

/// The answer of a node's endpoint `path` (with its query string) at `now`;
/// `None` for a path that is not a health check (`/metrics` is served apart).
pub fn answer(
    status: &NodeStatus,
    path: &str,
    query: Option<&str>,
    now: Instant,
) -> Option<Answer> {
    let accepts_lag = matches!(path, "/replica" | "/read-only");
    if matches!(
        path,
        "/primary" | "/read-write" | "/replica" | "/read-only" | "/health" | "/liveness" | "/state"
    ) {
        let bound = match lag_parameter(query, accepts_lag) {
            Ok(bound) => bound,
            Err(answer) => return Some(answer),
        };
        return Some(match path {
            "/primary" | "/read-write" => Answer::check(status.is_primary(now), "primary"),
            "/replica" => Answer::check(status.is_replica(bound), "replica"),
            "/read-only" => Answer::check(
                status.is_primary(now) || status.is_replica(bound),
                "read-only",
            ),
            "/health" => Answer::check(status.postgres_running, "running"),
            "/liveness" => Answer::check(status.is_live(now), "live"),
            _ => Answer::json(
                serde_json::to_string_pretty(&status.to_json(now)).unwrap_or_default() + "\n",
            ),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(reported: NodeState, assigned: NodeState, in_recovery: Option<bool>) -> NodeStatus {
        NodeStatus {
            reported,
            assigned,
            postgres_running: in_recovery.is_some(),
            in_recovery,
            streaming: in_recovery == Some(true),
            lsn: 0x1_0000_0010,
            timeline: 2,
            lag_bytes: Some(1024),
            lag: Some(Duration::from_millis(300)),
            ..NodeStatus::starting(Duration::from_millis(2_500), Duration::from_secs(10))
        }
    }

    fn status_of(n: &NodeStatus, path: &str, query: Option<&str>) -> u16 {
        answer(n, path, query, n.observed_at).map_or(0, |a| a.status)
    }

    use NodeState::*;

    /// One row per rule: (reported, assigned, in recovery) -> /primary, /replica, /read-only.
    #[test]
    fn checks_by_state() {
        let rows = [
            // The primary, and a single node.
            (Primary, Primary, Some(false), 200, 503, 200),
            (Single, Single, Some(false), 200, 503, 200),
            (WaitPrimary, WaitPrimary, Some(false), 200, 503, 200),
            // Assigned away (switchover): no longer the primary, at once.
            (Primary, Draining, Some(false), 503, 503, 503),
            // Fenced (the keeper stopped Postgres itself).
            (DemoteTimeout, Primary, None, 503, 503, 503),
            // The monitor names it writable but Postgres is still in recovery.
            (PreparePromotion, WaitPrimary, Some(true), 503, 503, 503),
            (Primary, Primary, Some(true), 503, 503, 503),
            // Postgres down.
            (Primary, Primary, None, 503, 503, 503),
            // Standbys.
            (Secondary, Secondary, Some(true), 503, 200, 200),
            (Catchingup, Secondary, Some(true), 503, 200, 200),
            // A standby out of recovery is not a replica.
            (Secondary, Secondary, Some(false), 503, 503, 503),
            (Demoted, Demoted, None, 503, 503, 503),
        ];
        for (reported, assigned, recovery, primary, replica, read_only) in rows {
            let n = node(reported, assigned, recovery);
            let row = format!("{reported} / {assigned} / {recovery:?}");
            assert_eq!(status_of(&n, "/primary", None), primary, "{row}");
            assert_eq!(status_of(&n, "/read-write", None), primary, "{row}");
            assert_eq!(status_of(&n, "/replica", None), replica, "{row}");
            assert_eq!(status_of(&n, "/read-only", None), read_only, "{row}");
        }
    }

    #[test]
    fn a_stale_observation_never_vouches_for_a_primary() {
        let n = node(Primary, Primary, Some(false));
        let later = n.observed_at + Duration::from_secs(3);
        assert!(n.is_primary(n.observed_at));
        assert!(!n.is_primary(later));
        assert_eq!(
            answer(&n, "/primary", None, later).map(|a| a.status),
            Some(503)
        );
        assert_eq!(
            answer(&n, "/liveness", None, later).map(|a| a.status),
            Some(200)
        );
        let much_later = n.observed_at + Duration::from_secs(11);
        assert_eq!(
            answer(&n, "/liveness", None, much_later).map(|a| a.status),
            Some(503)
        );
    }

    #[test]
    fn a_standby_not_streaming_is_no_replica() {
        let mut n = node(Secondary, Secondary, Some(true));
        n.streaming = false;
        assert_eq!(status_of(&n, "/replica", None), 503);
        assert_eq!(status_of(&n, "/health", None), 200);
    }

    #[test]
    fn lag_bounds() {
        let n = node(Secondary, Secondary, Some(true));
        assert_eq!(status_of(&n, "/replica", Some("lag=1kB")), 200);
        assert_eq!(status_of(&n, "/replica", Some("lag=1023")), 503);
        assert_eq!(status_of(&n, "/replica", Some("lag=16MB")), 200);
        assert_eq!(status_of(&n, "/replica", Some("lag=1s")), 200);
        assert_eq!(status_of(&n, "/replica", Some("lag=200ms")), 503);
        assert_eq!(status_of(&n, "/read-only", Some("lag=200ms")), 503);
        let mut unknown = n.clone();
        unknown.lag_bytes = None;
        assert_eq!(status_of(&unknown, "/replica", Some("lag=16MB")), 503);
        // The primary is read-only-capable whatever the bound.
        let p = node(Primary, Primary, Some(false));
        assert_eq!(status_of(&p, "/read-only", Some("lag=0")), 200);
    }

    #[test]
    fn bad_parameters_are_400_and_named() {
        let n = node(Secondary, Secondary, Some(true));
        for (path, query, named) in [
            ("/replica", "lag=abc", "lag"),
            ("/replica", "lag=", "lag"),
            ("/replica", "lag=5 parsecs", "lag"),
            ("/replica", "lag=99999999999999999999", "lag"),
            ("/replica", "lag=16MB&foo=1", "foo"),
            ("/primary", "lag=16MB", "lag"),
            ("/health", "x", "x"),
        ] {
            let a = answer(&n, path, Some(query), n.observed_at).expect("answered");
            assert_eq!(a.status, 400, "{path}?{query}");
            assert!(a.body.contains(named), "{path}?{query}: {}", a.body);
        }
        assert!(answer(&n, "/nope", None, n.observed_at).is_none());
    }

    #[test]
    fn lag_units() {
        assert_eq!("16MB".parse(), Ok(LagBound::Bytes(16 << 20)));
        assert_eq!("2kB".parse(), Ok(LagBound::Bytes(2048)));
        assert_eq!("5s".parse(), Ok(LagBound::Time(Duration::from_secs(5))));
        assert_eq!("2min".parse(), Ok(LagBound::Time(Duration::from_secs(120))));
        assert!("-1".parse::<LagBound>().is_err());
        assert!("5S".parse::<LagBound>().is_err());
    }

    #[test]
    fn state_json_has_the_fields() {
        let n = node(Secondary, Secondary, Some(true));
        let a = answer(&n, "/state", None, n.observed_at).expect("answered");
        let v: serde_json::Value = serde_json::from_str(&a.body).expect("json");
        assert_eq!(v["reported_state"], "secondary");
        assert_eq!(v["assigned_state"], "secondary");
        assert_eq!(v["lsn"], "1/10");
        assert_eq!(v["timeline"], 2);
        assert_eq!(v["lag_bytes"], 1024);
        assert_eq!(v["replica"], true);
    }
}
