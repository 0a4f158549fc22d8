//! Following the monitor: read the formation's primary, epoch and pending
//! switchover request, LISTEN for state changes and drain requests, re-read on
//! every notification, every second, and whenever the monitor connection comes
//! back; register the router (id, address, last seen, routed epoch) about once
//! a second. While the monitor is unreachable the routing table keeps its last
//! value.
//!
//! A switchover request (`hapg.formation.switchover_requested_at`) starts a
//! drain: new transactions on the current primary wait, open ones get up to
//! `router.drain_timeout_ms` to finish, what is left is cut, and the router
//! acknowledges with `hapg.router.drained_at`. New transactions keep waiting
//! until the monitor names a new writable primary, or withdraws the request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hapg_monitor::store::{Channel, RouterRegistration};
use hapg_monitor::{MonitorClient, MonitorError};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::routing::{Primary, RoutingTable};

/// How often the routing is re-read without a notification, and the router
/// row refreshed.
const TICK: Duration = Duration::from_secs(1);
/// Budget of one connection attempt round to the monitor.
const CONNECT_BUDGET: Duration = Duration::from_secs(3);
/// Limit on any single monitor statement.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// After a drain's cut order, how long sessions get to drop their server
/// connection before the router acknowledges the drain anyway.
const CUT_GRACE: Duration = Duration::from_secs(1);
/// How long a drain holds new transactions while the monitor cannot be read;
/// after that the router goes back to its last known routing. The monitor
/// itself gives up on a switchover after three times its 10 s drain timeout.
const DRAIN_HOLD_WITHOUT_MONITOR: Duration = Duration::from_secs(30);

/// What the follower needs to know; re-read on every reconnection, and when a
/// drain starts (for its timeout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FollowerSettings {
    /// Monitor URI.
    pub monitor: String,
    /// Formation.
    pub formation: String,
    /// Router id registered with the monitor.
    pub router_id: String,
    /// Address registered with the monitor.
    pub address: String,
    /// Address of the read-only port registered with the monitor, if any.
    pub read_only_address: Option<String>,
    /// How long a switchover drain lets open transactions finish.
    pub drain_timeout: Duration,
}

/// What the monitor says about a formation, read in one statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorView {
    /// `primary_epoch`.
    pub epoch: i64,
    /// The node named by `primary_node_id`, if any.
    pub primary: Option<Primary>,
    /// `switchover_requested_at` (as text: it only identifies the request).
    pub switchover_requested: Option<String>,
}

/// Reads the routing of `formation`, and its pending switchover request, at
/// once.
pub async fn read_routing(
    client: &MonitorClient,
    formation: &str,
) -> Result<MonitorView, MonitorError> {
    let routing = client.routing(formation).await?;
    Ok(MonitorView {
        epoch: routing.epoch,
        primary: routing.primary.map(|p| Primary {
            node_id: p.node_id,
            host: p.host.into(),
            port: p.port,
            goal: p.goal,
            reported: p.reported,
        }),
        switchover_requested: routing.switchover_requested,
    })
}

/// What the router registers with the monitor.
fn registration(settings: &FollowerSettings, routed_epoch: i64) -> RouterRegistration {
    RouterRegistration {
        router_id: settings.router_id.clone(),
        formation: settings.formation.clone(),
        address: settings.address.clone(),
        read_only_address: settings.read_only_address.clone(),
        routed_epoch,
    }
}

async fn timed<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, MonitorError>>,
) -> Result<T, String> {
    match tokio::time::timeout(QUERY_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {QUERY_TIMEOUT:?}")),
    }
}

/// How a drain of the sessions went.
#[derive(Debug, Clone, Copy, Default)]
struct DrainOutcome {
    /// Time until every transaction ended, or until the cut.
    waited: Duration,
    /// Sessions still busy at the drain timeout, told to cut.
    cut: usize,
    /// Sessions still busy after the cut grace.
    left: usize,
}

/// Waits until no session is busy on `epoch`, or until `deadline`; true when
/// none is.
async fn wait_idle(
    table: &RoutingTable,
    idle: &mut tokio::sync::watch::Receiver<u64>,
    epoch: i64,
    deadline: tokio::time::Instant,
) -> bool {
    loop {
        idle.mark_unchanged();
        if table.busy(epoch) == 0 {
            return true;
        }
        tokio::select! {
            r = idle.changed() => if r.is_err() { return table.busy(epoch) == 0 },
            _ = tokio::time::sleep_until(deadline) => return table.busy(epoch) == 0,
        }
    }
}

/// Waits until no session is busy on `epoch`, at most `timeout`; then orders
/// the sessions still busy to cut, and waits for them at most [`CUT_GRACE`].
async fn drain_sessions(table: Arc<RoutingTable>, epoch: i64, timeout: Duration) -> DrainOutcome {
    let start = tokio::time::Instant::now();
    let mut idle = table.subscribe_idle();
    if wait_idle(&table, &mut idle, epoch, start + timeout).await {
        return DrainOutcome {
            waited: start.elapsed(),
            ..DrainOutcome::default()
        };
    }
    let waited = start.elapsed();
    let cut = table.busy(epoch);
    table.cut(epoch);
    wait_idle(
        &table,
        &mut idle,
        epoch,
        tokio::time::Instant::now() + CUT_GRACE,
    )
    .await;
    DrainOutcome {
        waited,
        cut,
        left: table.busy(epoch),
    }
}

/// The switchover drain the router is carrying out.
struct Drain {
    /// The request (`switchover_requested_at`) it answers.
    request: String,
    /// The epoch whose primary is drained.
    epoch: i64,
    /// Waits for the sessions, while it runs.
    task: Option<JoinHandle<DrainOutcome>>,
    /// The sessions are drained: `drained_at` is due.
    done: bool,
    /// `drained_at` was written.
    acked: bool,
}

/// Drain bookkeeping kept across monitor connections.
#[derive(Default)]
struct DrainState {
    current: Option<Drain>,
    /// The last request answered (drained, or overtaken by a new primary):
    /// never drained twice.
    handled: Option<String>,
    /// When the monitor was last read.
    last_read: Option<Instant>,
}

impl DrainState {
    /// Ends the drain in force, if any: new transactions go on.
    fn release(&mut self, table: &RoutingTable, why: &str) {
        if let Some(drain) = self.current.take() {
            if let Some(task) = drain.task {
                task.abort();
            }
            tracing::info!(
                epoch = drain.epoch,
                acknowledged = drain.acked,
                "switchover drain over: {why}"
            );
            self.handled = Some(drain.request);
            table.set_drain(None);
        }
    }

    /// Applies what the monitor says now: publishes the routing, ends a drain
    /// that is over, starts one for a new request.
    fn on_view(
        &mut self,
        table: &Arc<RoutingTable>,
        view: MonitorView,
        drain_timeout: impl FnOnce() -> Duration,
    ) {
        self.last_read = Some(Instant::now());
        table.publish(view.epoch, view.primary);
        if let Some(drain) = &self.current {
            if view.switchover_requested.as_deref() != Some(drain.request.as_str()) {
                self.release(
                    table,
                    "the monitor withdrew the request or stopped the primary",
                );
            } else if table.load().target().is_some_and(|t| t.epoch > drain.epoch) {
                self.release(table, "a new primary is writable");
            }
        }
        let Some(request) = view.switchover_requested else {
            return;
        };
        if self.current.is_some() || self.handled.as_ref() == Some(&request) {
            return;
        }
        let epoch = view.epoch;
        let timeout = drain_timeout();
        table.set_drain(Some(epoch));
        tracing::info!(
            epoch,
            busy = table.busy(epoch),
            ?timeout,
            "switchover requested: holding new transactions, draining the primary"
        );
        let task = tokio::spawn(drain_sessions(table.clone(), epoch, timeout));
        self.current = Some(Drain {
            request,
            epoch,
            task: Some(task),
            done: false,
            acked: false,
        });
    }
}

/// The outcome of the running drain task; pending while there is none.
async fn drain_finished(current: &mut Option<Drain>) -> DrainOutcome {
    let Some(task) = current.as_mut().and_then(|d| d.task.as_mut()) else {
        return std::future::pending().await;
    };
    match task.await {
        Ok(outcome) => outcome,
        Err(e) => {
            tracing::error!(error = %e, "the drain task failed; acknowledging the drain anyway (new transactions stay held)");
            DrainOutcome::default()
        }
    }
}

/// Follows the monitor until `shutdown`; `settings` is called on every
/// (re)connection and when a drain starts, and `restart` makes the follower
/// reconnect (after a reload).
pub async fn follow(
    table: Arc<RoutingTable>,
    settings: impl Fn() -> FollowerSettings,
    restart: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut failures = 0u32;
    let mut drain = DrainState::default();
    while !shutdown.is_cancelled() {
        let session = follow_once(&table, &settings, &mut drain, &restart, &shutdown);
        match session.await {
            Ok(()) => failures = 0,
            Err(e) => {
                table.set_monitor_reachable(false);
                failures += 1;
                if failures == 1 || failures.is_multiple_of(30) {
                    tracing::warn!(error = %e, "monitor unreachable; routing to the last known primary");
                } else {
                    tracing::debug!(error = %e, "monitor still unreachable");
                }
                if drain.current.is_some()
                    && drain
                        .last_read
                        .is_none_or(|t| t.elapsed() >= DRAIN_HOLD_WITHOUT_MONITOR)
                {
                    drain.release(&table, "the monitor has been unreachable for too long");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = restart.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    }
    if let Some(task) = drain.current.and_then(|d| d.task) {
        task.abort();
    }
}

/// One monitor connection's life; `Ok` when asked to restart or stop.
async fn follow_once(
    table: &Arc<RoutingTable>,
    settings_fn: &impl Fn() -> FollowerSettings,
    drain: &mut DrainState,
    restart: &Notify,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let settings = settings_fn();
    let mut client = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        c = MonitorClient::connect_with_retry(&settings.monitor, CONNECT_BUDGET) => c.map_err(|e| e.to_string())?,
    };
    timed("LISTEN", client.listen(&[Channel::State, Channel::Drain])).await?;
    tracing::info!(monitor = client.uri(), formation = %settings.formation, "following the monitor");
    let mut last_register: Option<(Instant, i64)> = None;
    loop {
        let view = timed(
            "reading the routing",
            read_routing(&client, &settings.formation),
        )
        .await?;
        table.set_monitor_reachable(true);
        drain.on_view(table, view, || settings_fn().drain_timeout);
        let routed = table.load().routed_epoch;
        if let Some(d) = drain.current.as_mut().filter(|d| d.done && !d.acked) {
            timed(
                "acknowledging the drain",
                client.acknowledge_drain(&registration(&settings, routed)),
            )
            .await?;
            d.acked = true;
            tracing::info!(
                epoch = d.epoch,
                "switchover drain acknowledged to the monitor"
            );
            last_register = Some((Instant::now(), routed));
        }
        if last_register.is_none_or(|(t, epoch)| t.elapsed() >= TICK || epoch != routed) {
            timed(
                "registering the router",
                client.register_router(&registration(&settings, routed)),
            )
            .await?;
            last_register = Some((Instant::now(), routed));
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = restart.notified() => return Ok(()),
            _ = client.next_change(TICK) => {}
            outcome = drain_finished(&mut drain.current) => {
                if let Some(d) = drain.current.as_mut() {
                    d.task = None;
                    d.done = true;
                    if outcome.cut == 0 {
                        tracing::info!(epoch = d.epoch, waited = ?outcome.waited, "switchover drain: every open transaction ended");
                    } else {
                        tracing::warn!(epoch = d.epoch, waited = ?outcome.waited, cut = outcome.cut, still_busy = outcome.left, "switchover drain timeout: cut the transactions still open");
                    }
                }
            }
        }
        while client.try_change().is_some() {}
        if client.is_closed() {
            return Err("the monitor connection closed".into());
        }
    }
}
