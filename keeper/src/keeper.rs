//! The keeper's main loop and the executor of its transitions: observe the local
//! Postgres, report to the monitor, carry out the goal it assigns (one
//! idempotent action from [`crate::transitions`]), keep the current state
//! enforced, and fence a primary cut off from the monitor and its standbys.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hapg_config::NodeConfig;
use hapg_monitor::client::{NodeReport, NodeRow};
use hapg_monitor::fsm::{self, GroupView};
use hapg_monitor::{MonitorClient, MonitorError, NodeState};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::KeeperError;
use crate::liveness::Liveness;
use crate::node_status::NodeStatus;
use crate::paths::NodePaths;
use crate::postgres::{LocalPostgres, Observation, StopMode, Upstream};
use crate::rejoin::{self, Failed, LocalRole, LocalWal, Lsn, Rejoin, Timeline};
use crate::state_file::{unix_now, KeeperState};
use crate::transitions::{expectation, transition, Action, Expectation};

/// How `hapg run` ends.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Cancelled when the keeper should stop.
    pub token: CancellationToken,
    /// Stop Postgres with `immediate` instead of `fast`.
    pub immediate: Arc<AtomicBool>,
    /// Leave Postgres running (used when a test or `create` hands over to `run`).
    pub keep_postgres: Arc<AtomicBool>,
}

/// How long the keeper runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunMode {
    /// Until shut down (`hapg run`).
    Forever,
    /// Until the node has finished initialising (`hapg create` without `--run`).
    UntilInitialized,
}

/// Why the keeper loop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Shut down on request.
    Stopped,
    /// The node finished its first transition (RunMode::UntilInitialized).
    Initialized,
    /// The monitor dropped this node.
    Dropped,
    /// The node's initialisation kept failing for [`INIT_GIVE_UP`]
    /// (RunMode::UntilInitialized): `hapg create` undoes it and says why.
    InitFailed(String),
}

/// How long `hapg create` (without `--run`) retries a failing
/// initialisation (initdb, pg_basebackup, the first start) before giving up:
/// long enough for what passes by itself (a primary restarting to apply the
/// new standby's pg_hba entry), short enough that a wrong password or an
/// unreachable host is reported rather than retried forever.
pub const INIT_GIVE_UP: Duration = Duration::from_secs(15);

/// Monitor calls from the keeper's loop give up after this long: a monitor that
/// does not answer is treated like one that is gone.
const MONITOR_CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// A node rejoining by streaming must stream within this long, or it is rewound.
const REJOIN_STREAMING_TIMEOUT: Duration = Duration::from_secs(30);
/// The time a primary near its fence gives its last report to the monitor
/// (a report to a monitor that is there takes milliseconds).
const LAST_REPORT_BEFORE_FENCE: Duration = Duration::from_millis(250);
/// How long a primary about to fence itself may take to look at its
/// standbys once more: well within the half second between its fence (2.5 s)
/// and the earliest failover (3 s).
const RECHECK_STANDBY: Duration = Duration::from_millis(200);

/// Runs the keeper for the node at `paths` until `shutdown`.
pub async fn run(paths: NodePaths, mode: RunMode, shutdown: Shutdown) -> Result<Exit, KeeperError> {
    let config = NodeConfig::load(&paths.config)?;
    let pg = LocalPostgres::from_config(&config)?;
    let state = KeeperState::load(&paths.state)?;
    // The HTTP server runs with `hapg run` only, and fails its start when
    // its address is taken: a health check that never answers would look
    // like a node that is down.
    let http_listen = match mode {
        RunMode::Forever => config.http.listen_addr()?,
        RunMode::UntilInitialized => None,
    };
    let status = match http_listen {
        Some(addr) => {
            let listener = crate::http::bind(addr).await?;
            let (sender, receiver) = watch::channel(NodeStatus::starting(
                config.timeout.network_partition_timeout(),
                liveness_deadline(&config),
            ));
            tokio::spawn(
                crate::http::serve(
                    listener,
                    crate::http::Endpoints::Node(receiver),
                    shutdown.token.clone(),
                )
                .in_current_span(),
            );
            tokio::spawn(
                poll_monitor_health(
                    config.node.monitor.clone(),
                    state.node_id,
                    sender.clone(),
                    shutdown.token.clone(),
                )
                .in_current_span(),
            );
            Some(sender)
        }
        None => None,
    };
    let mut keeper = Keeper {
        status,
        last_report: None,
        observed_at: Instant::now(),
        config,
        paths,
        pg,
        state,
        monitor: None,
        confirmed: false,
        restart_failing_since: None,
        last_tli: 0,
        last_lsn: 0,
        last_error: None,
        monitor_heard: Instant::now(),
        standby_heard: Instant::now(),
        rejoin_failed: Failed::Nothing,
        init_failing_since: None,
        transition_error: None,
    };
    let span = tracing::info_span!("keeper", node_id = keeper.state.node_id);
    let exit = keeper.main_loop(mode, &shutdown).instrument(span).await?;
    if exit != Exit::Initialized && !shutdown.keep_postgres.load(Ordering::Relaxed) {
        let how = if shutdown.immediate.load(Ordering::Relaxed) {
            StopMode::Immediate
        } else {
            StopMode::Fast
        };
        if keeper.pg.postmaster_pid().is_some() {
            tracing::info!(mode = how.as_str(), "stopping postgres");
            keeper.pg.stop(how).await?;
        }
    }
    Ok(exit)
}

/// `/liveness` fails when the keeper's loop has not observed Postgres for
/// this long: several report intervals, and never under 10 s (a transition
/// such as a rewind holds the loop for a while).
fn liveness_deadline(config: &NodeConfig) -> Duration {
    (config.timeout.report_interval() * 4).max(Duration::from_secs(10))
}

/// How often the HTTP server asks the monitor for this node's health.
const MONITOR_HEALTH_POLL: Duration = Duration::from_secs(1);

/// Reads this node's health as the monitor last concluded, for `/metrics`
/// and `/state`, on a connection of its own: never on the keeper's loop.
async fn poll_monitor_health(
    uri: String,
    node_id: i64,
    status: watch::Sender<NodeStatus>,
    token: CancellationToken,
) {
    let mut client: Option<MonitorClient> = None;
    while !token.is_cancelled() {
        let read = tokio::time::timeout(MONITOR_CALL_TIMEOUT, async {
            if client.as_ref().is_none_or(MonitorClient::is_closed) {
                client = Some(MonitorClient::connect(&uri).await?);
            }
            match &client {
                Some(c) => c.node(node_id).await.map(|row| row.health),
                None => Err(MonitorError::NoSuchNode(node_id)),
            }
        })
        .await;
        let health = match read {
            Ok(Ok(health)) => Some(health),
            _ => {
                client = None;
                None
            }
        };
        status.send_modify(|s| s.monitor_health = health);
        tokio::select! {
            _ = token.cancelled() => {}
            _ = tokio::time::sleep(MONITOR_HEALTH_POLL) => {}
        }
    }
}

struct Keeper {
    /// Where the HTTP endpoints read the latest observation (`http.listen`).
    status: Option<watch::Sender<NodeStatus>>,
    /// When the monitor last answered a report.
    last_report: Option<Instant>,
    /// When the latest observation of Postgres was made.
    observed_at: Instant,
    config: NodeConfig,
    paths: NodePaths,
    pg: LocalPostgres,
    state: KeeperState,
    monitor: Option<MonitorClient>,
    /// The monitor answered at least once since this keeper started: until then
    /// a primary is not restarted (a failover may have happened while we were gone).
    confirmed: bool,
    restart_failing_since: Option<Instant>,
    last_tli: i32,
    last_lsn: u64,
    /// Last transition error, logged once per distinct message.
    last_error: Option<String>,
    /// When the monitor last answered (or the keeper started).
    monitor_heard: Instant,
    /// When Postgres last saw a standby reply (or the keeper started).
    standby_heard: Instant,
    /// What failed in the current attempt to rejoin the primary: the next try
    /// escalates (streaming, then pg_rewind, then pg_basebackup).
    rejoin_failed: Failed,
    /// Since when the initialisation has been failing (`hapg create`).
    init_failing_since: Option<Instant>,
    /// The last transition's error, if it failed.
    transition_error: Option<String>,
}

impl Keeper {
    /// After a transition of a node being created: the error to give up
    /// with once its initialisation has failed for [`INIT_GIVE_UP`].
    fn init_gave_up(&mut self, moved: bool) -> Option<String> {
        let failed = match &self.transition_error {
            Some(error) if !moved => error.clone(),
            _ => {
                self.init_failing_since = None;
                return None;
            }
        };
        let since = *self.init_failing_since.get_or_insert_with(Instant::now);
        (since.elapsed() >= INIT_GIVE_UP).then_some(failed)
    }

    async fn main_loop(&mut self, mode: RunMode, shutdown: &Shutdown) -> Result<Exit, KeeperError> {
        let interval = self.config.timeout.report_interval();
        tracing::info!(state = %self.state.current, "keeper started");
        loop {
            if shutdown.token.is_cancelled() {
                return Ok(Exit::Stopped);
            }
            let observation = self.pg.observe().await;
            self.observed_at = Instant::now();
            if observation.running {
                // A detached standby keeps the timeline it last streamed on:
                // its checkpoint's timeline can lag behind.
                if observation.tli_is_exact || self.last_tli == 0 {
                    self.last_tli = observation.tli;
                }
                if observation.lsn > 0 {
                    self.last_lsn = observation.lsn;
                }
                self.note_standby_contact(&observation);
            }
            self.publish(&observation);
            let goal = match self.report_until_fence(&observation).await {
                Ok(goal) => Some(goal),
                Err(KeeperError::Monitor(MonitorError::NoSuchNode(_)))
                    if self.state.current == NodeState::Dropped =>
                {
                    tracing::info!("the monitor removed this node: it is dropped");
                    return Ok(Exit::Dropped);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot report to the monitor");
                    self.monitor = None;
                    self.check_network_partition().await?;
                    None
                }
            };

            // The goal just received: a primary told to stop taking writes
            // fails /primary now, before the transition runs.
            self.publish(&observation);
            let mut moved = false;
            if let Some(goal) = goal {
                if goal != self.state.current {
                    moved = self.transition_to(goal).await;
                    if mode == RunMode::UntilInitialized {
                        if let Some(error) = self.init_gave_up(moved) {
                            return Ok(Exit::InitFailed(error));
                        }
                    }
                } else if let Err(e) = self.ensure_current_state(&observation).await {
                    self.log_error(format!("keeping {} failed: {e}", self.state.current));
                }
            } else if self.confirmed {
                // The monitor is away: keep what we have running, without moving.
                if let Err(e) = self.ensure_current_state(&observation).await {
                    self.log_error(format!("keeping {} failed: {e}", self.state.current));
                }
            }
            self.state.save(&self.paths.state)?;
            self.publish(&observation);

            if mode == RunMode::UntilInitialized
                && !matches!(self.state.current, NodeState::Init | NodeState::WaitStandby)
            {
                // A stop asked for while the last step ran wins: only a
                // create that ends by itself leaves Postgres running.
                if shutdown.token.is_cancelled() {
                    return Ok(Exit::Stopped);
                }
                return Ok(Exit::Initialized);
            }
            if moved {
                // Report the new state at once: the monitor is waiting for it.
                continue;
            }
            let next = self.next_round_in(&observation, interval);
            self.wait(next, shutdown).await;
        }
    }

    /// How long to wait before the next round. A standby whose WAL receiver
    /// has heard nothing from the primary for two keepalive periods reports
    /// often: the monitor counts that silence from its reports, and starts a
    /// failover as soon as it is long enough. A primary that may have to fence
    /// itself wakes in time to try the monitor one last time before its fence
    /// is due, rather than up to an interval late.
    fn next_round_in(&self, observation: &Observation, interval: Duration) -> Duration {
        let timings = &self.config.timeout;
        let mut next = interval;
        if observation
            .upstream_silence
            .is_some_and(|silence| silence > timings.wal_sender_timeout())
        {
            next = next.min(timings.silent_upstream_report_interval());
        }
        if let Some(fence) = self.time_to_fence() {
            // Never zero: a report refused at once must not make a busy loop
            // of the last moments before the fence.
            let last_report = fence.saturating_sub(LAST_REPORT_BEFORE_FENCE);
            next = next.min(last_report.max(Duration::from_millis(10)));
        }
        next
    }

    /// Hands the HTTP endpoints what the keeper knows now. A state the
    /// keeper reached since `observation` was made (a fence, a demotion)
    /// counts as Postgres no longer trusted writable: `/primary` needs the
    /// observation and the current state to agree.
    fn publish(&self, observation: &Observation) {
        let Some(status) = &self.status else {
            return;
        };
        // What runs, not what is reported: a primary being restarted in
        // place is reported running for a while, but is not up.
        let running = Liveness::of(observation.running, self.pg.postmaster_pid()).running();
        let fresh = NodeStatus {
            node_id: self.state.node_id,
            name: self.config.node.name.clone(),
            formation: self.config.node.formation.clone(),
            reported: self.state.current,
            assigned: self.state.assigned,
            postgres_running: running,
            in_recovery: observation.running.then_some(observation.in_recovery),
            streaming: observation.upstream_streaming,
            lsn: self.last_lsn,
            timeline: self.last_tli,
            lag_bytes: observation.replay_lag_bytes,
            lag: observation
                .replay_delay
                .map(|delay| delay.max(observation.upstream_silence.unwrap_or_default())),
            observed_at: self.observed_at,
            last_report: self.last_report,
            monitor_health: None,
            fence_timeout: self.config.timeout.network_partition_timeout(),
            liveness_deadline: liveness_deadline(&self.config),
        };
        status.send_modify(|s| {
            let health = s.monitor_health;
            *s = NodeStatus {
                monitor_health: health,
                ..fresh
            };
        });
    }

    fn log_error(&mut self, message: String) {
        if self.last_error.as_ref() != Some(&message) {
            tracing::warn!("{message}");
            self.last_error = Some(message);
        }
    }

    /// Sleeps until the next report is due, or a notification about our group arrives.
    async fn wait(&mut self, interval: Duration, shutdown: &Shutdown) {
        let deadline = tokio::time::Instant::now() + interval;
        loop {
            let Some(monitor) = self.monitor.as_mut() else {
                tokio::select! {
                    _ = shutdown.token.cancelled() => {}
                    _ = tokio::time::sleep_until(deadline) => {}
                }
                return;
            };
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() {
                return;
            }
            let notification = tokio::select! {
                _ = shutdown.token.cancelled() => return,
                n = monitor.next_change(remaining) => n,
            };
            let Some(notification) = notification else {
                return;
            };
            let ours = notification.state().is_some_and(|n| {
                n.formation == self.config.node.formation && n.group_id == self.state.group_id
            });
            if ours {
                // Let the monitor's burst of assignments land before we look.
                tokio::time::sleep(Duration::from_millis(10)).await;
                if let Some(monitor) = self.monitor.as_mut() {
                    while monitor.try_change().is_some() {}
                }
                return;
            }
        }
    }

    async fn monitor(&mut self) -> Result<&MonitorClient, KeeperError> {
        if self.monitor.as_ref().is_none_or(MonitorClient::is_closed) {
            // LISTEN within the same limit: a monitor that goes silent just
            // after the connect must not hold the keeper's loop.
            let client = tokio::time::timeout(MONITOR_CALL_TIMEOUT, async {
                let client = MonitorClient::connect(&self.config.node.monitor).await?;
                client.listen_state().await?;
                Ok::<_, KeeperError>(client)
            })
            .await
            .map_err(|_| KeeperError::Timeout("connecting to the monitor".into()))??;
            self.monitor = Some(client);
        }
        self.monitor
            .as_ref()
            .ok_or_else(|| KeeperError::Timeout("connecting to the monitor".into()))
    }

    /// What Postgres' liveness is reported as: a primary being restarted in place
    /// still counts as running until restarts have failed for a while, so a
    /// crash that a restart fixes does not cause a failover.
    fn reported_running(&self, observation: &Observation) -> bool {
        // A Postgres that refuses the keeper's login (every slot taken)
        // still runs: never reported down for it.
        if Liveness::of(observation.running, self.pg.postmaster_pid()).running() {
            return true;
        }
        let restart_budget =
            Duration::from_millis(self.config.timeout.postgresql_restart_failure_timeout_ms);
        expectation(self.state.current) == Expectation::RunningPrimary
            && self
                .restart_failing_since
                .is_none_or(|since| since.elapsed() < restart_budget)
    }

    async fn report(&mut self, observation: &Observation) -> Result<NodeState, KeeperError> {
        let report = NodeReport {
            node_id: self.state.node_id,
            state: self.state.current,
            pg_running: self.reported_running(observation),
            tli: self.last_tli.max(1),
            lsn: self.last_lsn,
            rep_state: observation.rep_state.clone(),
            upstream_streaming: observation.upstream_streaming,
            in_recovery: observation.running.then_some(observation.in_recovery),
            upstream_silence: observation.upstream_silence,
        };
        let monitor = self.monitor().await?;
        let assigned = tokio::time::timeout(MONITOR_CALL_TIMEOUT, monitor.report(&report))
            .await
            .map_err(|_| KeeperError::Timeout("reporting to the monitor".into()))??;
        self.confirmed = true;
        self.last_report = Some(Instant::now());
        self.state.last_monitor_contact = unix_now();
        self.monitor_heard = Instant::now();
        self.state.group_id = assigned.group_id;
        if assigned.goal != self.state.assigned {
            tracing::info!(current = %self.state.current, goal = %assigned.goal, "new goal from the monitor");
            self.state.assigned = assigned.goal;
            // What failed while rejoining counts for that attempt only.
            self.rejoin_failed = Failed::Nothing;
        }
        Ok(assigned.goal)
    }

    /// Reports to the monitor. A primary that has heard from neither the
    /// monitor nor a standby for a while gives up on the report when its
    /// fence is due, rather than at the end of a connect timeout: the fence
    /// must come before the monitor could promote a standby.
    async fn report_until_fence(
        &mut self,
        observation: &Observation,
    ) -> Result<NodeState, KeeperError> {
        let Some(left) = self.time_to_fence() else {
            return self.report(observation).await;
        };
        // A keeper that was itself stopped (its whole node frozen) finds the
        // fence due or nearly due when it runs again, though nothing may be
        // wrong with the network: it gets a short last chance to reach the
        // monitor. A keeper cut off from the network is already in this
        // report when the fence falls due (`next_round_in` woke it earlier).
        let left = left.max(LAST_REPORT_BEFORE_FENCE);
        tokio::time::timeout(left, self.report(observation))
            .await
            .unwrap_or_else(|_| {
                Err(KeeperError::Timeout(
                    "reporting to the monitor (the network partition timeout came first)".into(),
                ))
            })
    }

    /// For a primary: how long until it must fence itself if neither the
    /// monitor nor a standby is heard from meanwhile.
    fn time_to_fence(&self) -> Option<Duration> {
        if !matches!(
            self.state.current,
            NodeState::Primary | NodeState::ApplySettings
        ) {
            return None;
        }
        let timeout = self.config.timeout.network_partition_timeout();
        let silent = self
            .monitor_heard
            .elapsed()
            .min(self.standby_heard.elapsed());
        // Just past the timeout, so that the check after the failed report fences.
        Some(timeout.saturating_sub(silent) + Duration::from_millis(10))
    }

    /// Records when a standby last replied, as `observation` saw it.
    fn note_standby_contact(&mut self, observation: &Observation) {
        if let Some(heard) = observation
            .standby_reply_age
            .and_then(|age| Instant::now().checked_sub(age))
        {
            // The standby's own reply time, not when we looked: the
            // fence must count from the moment the standby went silent.
            if heard > self.standby_heard {
                self.standby_heard = heard;
                self.state.last_standby_contact = unix_now();
            }
        }
    }

    /// A primary that reaches neither the monitor nor any standby for longer
    /// than `network_partition_timeout` stops Postgres: the monitor may be
    /// promoting a standby on the other side of the split.
    async fn check_network_partition(&mut self) -> Result<(), KeeperError> {
        if !matches!(
            self.state.current,
            NodeState::Primary | NodeState::ApplySettings
        ) {
            return Ok(());
        }
        let timeout = Duration::from_millis(self.config.timeout.network_partition_timeout_ms);
        let silent =
            |k: &Self| k.monitor_heard.elapsed() > timeout && k.standby_heard.elapsed() > timeout;
        if silent(self) {
            // The standby contact was read before the report, which may have
            // taken all the time left (a store without a quorum answers
            // nothing while the standby streams on): read it again before
            // fencing, briefly (a Postgres that does not answer at once
            // serves no one either).
            if let Ok(observation) = tokio::time::timeout(RECHECK_STANDBY, self.pg.observe()).await
            {
                if observation.running {
                    self.note_standby_contact(&observation);
                    if !silent(self) {
                        tracing::info!(
                            monitor_silent_ms = self.monitor_heard.elapsed().as_millis() as u64,
                            "the monitor is silent but a standby still replies: not fencing"
                        );
                    }
                }
            }
        }
        if silent(self) {
            tracing::warn!(
                monitor_silent_ms = self.monitor_heard.elapsed().as_millis() as u64,
                standby_silent_ms = self.standby_heard.elapsed().as_millis() as u64,
                "cannot reach the monitor nor any standby for timeout.network_partition_timeout_ms ({} ms): fencing this primary (demote_timeout)",
                timeout.as_millis()
            );
            // The health checks stop naming this node the primary before
            // Postgres stops, not after.
            if let Some(status) = &self.status {
                status.send_modify(|s| s.reported = NodeState::DemoteTimeout);
            }
            self.pg.stop(StopMode::Fast).await?;
            self.state.current = NodeState::DemoteTimeout;
            self.state.save(&self.paths.state)?;
        }
        Ok(())
    }

    /// Runs the transition to `goal`; true when it completed.
    async fn transition_to(&mut self, goal: NodeState) -> bool {
        let from = self.state.current;
        let Some(action) = transition(from, goal) else {
            let error = KeeperError::NoTransition { from, to: goal }.to_string();
            self.log_error(error.clone());
            self.transition_error = Some(error);
            return false;
        };
        let span = tracing::info_span!("transition", %from, to = %goal, ?action);
        let started = Instant::now();
        let result = self.execute(action, goal).instrument(span.clone()).await;
        let _entered = span.enter();
        match result {
            Ok(()) => {
                tracing::info!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "reached {goal}"
                );
                self.state.current = goal;
                self.last_error = None;
                self.transition_error = None;
                self.rejoin_failed = Failed::Nothing;
                if let Err(e) = self.state.save(&self.paths.state) {
                    tracing::error!(error = %e, "cannot write the state file");
                    return false;
                }
                true
            }
            Err(e) => {
                self.log_error(format!(
                    "transition {from} -> {goal} failed, will retry: {e}"
                ));
                self.transition_error = Some(format!("{from} -> {goal}: {e}"));
                false
            }
        }
    }

    /// The group as the monitor has it. Bounded like a report and never past
    /// a primary's fence: a monitor that goes silent in the middle of this
    /// query (a cut network sends nothing back) must not hold the loop that
    /// fences, or the fence would come after the standby's promotion.
    async fn group(&mut self) -> Result<(Vec<NodeRow>, GroupView), KeeperError> {
        let formation = self.config.node.formation.clone();
        let group = self.state.group_id;
        let limit = self
            .time_to_fence()
            .map_or(MONITOR_CALL_TIMEOUT, |left| left.min(MONITOR_CALL_TIMEOUT));
        let read = tokio::time::timeout(limit, async {
            Ok::<_, KeeperError>(self.monitor().await?.group(&formation, group).await?)
        })
        .await;
        match read {
            Ok(result) => result,
            Err(_) => {
                // The connection may be stuck in the middle of the query.
                self.monitor = None;
                Err(KeeperError::Timeout(
                    "reading the group from the monitor".into(),
                ))
            }
        }
    }

    /// The node this one should stream from: the one assigned a writable state.
    async fn upstream(&mut self) -> Result<Upstream, KeeperError> {
        let own = self.state.node_id;
        let (nodes, _) = self.group().await?;
        nodes
            .iter()
            .find(|n| n.node_id != own && n.goal.can_take_writes())
            .map(|n| Upstream {
                host: n.host.clone(),
                port: n.port,
            })
            .ok_or_else(|| {
                KeeperError::Refused("the group has no primary to stream from yet".into())
            })
    }

    async fn other_hosts(&mut self) -> Result<Vec<String>, KeeperError> {
        let own = self.state.node_id;
        let (nodes, _) = self.group().await?;
        let mut hosts: Vec<String> = nodes
            .iter()
            .filter(|n| n.node_id != own)
            .map(|n| n.host.clone())
            .collect();
        hosts.sort();
        hosts.dedup();
        Ok(hosts)
    }

    async fn wanted_synchronous_standby_names(&mut self) -> Result<String, KeeperError> {
        let own = self.state.node_id;
        let (_, view) = self.group().await?;
        // The view is read after the report: if the monitor has meanwhile
        // taken the primary role away from this node (a failover, or a
        // keeper that was frozen), names computed from it would drop the
        // standby being promoted and release the commits waiting for it.
        // Leave synchronous replication as it is; the next round moves on.
        if !view
            .nodes
            .iter()
            .any(|n| n.id == own && n.goal.can_take_writes())
        {
            return Err(KeeperError::Refused(
                "the monitor no longer assigns this node a primary state".into(),
            ));
        }
        Ok(fsm::synchronous_standby_names(&view, own))
    }

    fn slot_name(&self) -> String {
        fsm::slot_name(self.state.node_id)
    }

    async fn prepare_files(&mut self) -> Result<(), KeeperError> {
        self.pg.write_config(&[])?;
        match self.other_hosts().await {
            Ok(hosts) => {
                self.pg.write_hba(&hosts)?;
            }
            Err(e) if self.pg.pgdata.join("pg_hba.conf").exists() => {
                tracing::debug!(error = %e, "keeping pg_hba.conf as it is");
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    async fn execute(&mut self, action: Action, goal: NodeState) -> Result<(), KeeperError> {
        match action {
            Action::Record | Action::StartMaintenance => Ok(()),
            Action::InitPrimary => {
                if !self.pg.is_initialized() {
                    self.pg.initdb().await?;
                }
                self.prepare_files().await?;
                self.pg.start().await?;
                if self.pg.observe().await.in_recovery {
                    self.promote().await?;
                }
                self.pg.create_roles_and_database().await?;
                self.pg.set_synchronous_standby_names("").await?;
                self.pg.set_default_read_only(false).await
            }
            Action::InitStandby => {
                let upstream = self.upstream().await?;
                let slot = self.slot_name();
                let already_copied =
                    self.pg.is_initialized() && self.pg.pgdata.join("standby.signal").exists();
                if !already_copied {
                    self.pg.stop(StopMode::Fast).await?;
                    tracing::info!(host = %upstream.host, port = upstream.port, "pg_basebackup");
                    self.pg.basebackup(&upstream, &slot).await?;
                }
                self.prepare_files().await?;
                self.pg.write_standby_config(Some(&upstream), &slot, true)?;
                self.pg.start().await
            }
            Action::RewindOrInit => self.rewind_or_init().await,
            Action::DetachFromPrimary => self.detach_from_primary().await,
            Action::FastForward => self.fast_forward().await,
            Action::Promote { read_only } => {
                self.ensure_running().await?;
                self.pg.set_synchronous_standby_names("").await?;
                if read_only {
                    self.pg.set_default_read_only(true).await?;
                }
                self.promote().await?;
                if !read_only {
                    self.pg.set_default_read_only(false).await?;
                }
                Ok(())
            }
            Action::BecomeSingle => {
                self.ensure_running().await?;
                if self.pg.observe().await.in_recovery {
                    self.pg.set_synchronous_standby_names("").await?;
                    self.promote().await?;
                }
                self.pg.set_synchronous_standby_names("").await?;
                self.pg.set_default_read_only(false).await
            }
            Action::SetReadWrite => self.pg.set_default_read_only(false).await,
            Action::EnableSyncRep => self.enable_sync_rep().await,
            Action::DisableSyncRep => {
                self.ensure_running().await?;
                self.sync_slots().await?;
                self.pg.set_synchronous_standby_names("").await
            }
            Action::ApplySettings => {
                let names = self.wanted_synchronous_standby_names().await?;
                self.pg.set_synchronous_standby_names(&names).await
            }
            Action::StopPostgres => self.pg.stop(StopMode::Fast).await,
            Action::CheckpointAndStop => {
                if let Ok(client) = self.pg.connect().await {
                    client.batch_execute("CHECKPOINT").await?;
                }
                self.pg.stop(StopMode::Fast).await
            }
            Action::StopAsStandby => {
                self.pg.stop(StopMode::Fast).await?;
                self.pg.write_standby_config(None, &self.slot_name(), false)
            }
            Action::StartAsPrimary => {
                self.prepare_files().await?;
                self.pg.start().await?;
                let names = if goal == NodeState::Primary {
                    self.wanted_synchronous_standby_names().await?
                } else {
                    String::new()
                };
                self.pg.set_synchronous_standby_names(&names).await
            }
        }
    }

    async fn ensure_running(&mut self) -> Result<(), KeeperError> {
        if self.pg.postmaster_pid().is_none() {
            self.prepare_files().await?;
            self.pg.start().await?;
        }
        Ok(())
    }

    async fn promote(&mut self) -> Result<(), KeeperError> {
        let client = self.pg.connect().await?;
        let promoted: bool = client
            .query_one("SELECT pg_promote(true, 60)", &[])
            .await?
            .try_get(0)?;
        if !promoted {
            return Err(KeeperError::Timeout(
                "pg_promote did not finish in 60 s".into(),
            ));
        }
        // Promotion does not wait for its checkpoint, and until it is done the
        // control file still names the old timeline: pg_rewind against this node
        // would then see "the same timeline" and wrongly skip the rewind.
        client.batch_execute("CHECKPOINT").await?;
        self.pg.clear_standby_config()
    }

    /// Streams from the most advanced standby of the election (never from
    /// ourselves) until we have its WAL, then detaches again.
    async fn fast_forward(&mut self) -> Result<(), KeeperError> {
        self.ensure_running().await?;
        let own = self.state.node_id;
        let (nodes, _) = self.group().await?;
        let source = nodes
            .iter()
            .filter(|n| n.node_id != own && n.reported == NodeState::ReportLsn)
            .max_by_key(|n| (n.tli, n.lsn))
            .ok_or_else(|| {
                KeeperError::Refused("no standby reported its WAL position to fetch from".into())
            })?;
        let target = source.lsn;
        let upstream = Upstream {
            host: source.host.clone(),
            port: source.port,
        };
        tracing::info!(from = %source.name, target = %hapg_monitor::pgconn::format_lsn(target), "fetching missing WAL");
        self.pg
            .write_standby_config(Some(&upstream), &self.slot_name(), false)?;
        self.pg.reload().await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let o = self.pg.observe().await;
            if o.lsn >= target {
                break;
            }
            if Instant::now() > deadline {
                return Err(KeeperError::Timeout(format!(
                    "fetching WAL up to {} from {}",
                    hapg_monitor::pgconn::format_lsn(target),
                    source.name
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.detach_from_primary().await
    }

    /// Cuts replication and waits until the WAL receiver is gone, so the LSN we
    /// report is final and the old primary can no longer count us as synchronous.
    async fn detach_from_primary(&mut self) -> Result<(), KeeperError> {
        self.ensure_running().await?;
        self.pg
            .write_standby_config(None, &self.slot_name(), false)?;
        self.pg.reload().await?;
        let timeout = Duration::from_millis(self.config.timeout.walreceiver_stop_timeout_ms);
        let deadline = Instant::now() + timeout;
        loop {
            let client = self.pg.connect().await?;
            let receiving = client
                .query_opt("SELECT pid FROM pg_stat_wal_receiver", &[])
                .await?
                .is_some();
            if !receiving {
                let o = self.pg.observe().await;
                if o.lsn > 0 {
                    self.last_lsn = o.lsn;
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(KeeperError::Timeout(
                    "the WAL receiver did not stop after primary_conninfo was cleared".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn enable_sync_rep(&mut self) -> Result<(), KeeperError> {
        self.ensure_running().await?;
        self.sync_slots().await?;
        let names = self.wanted_synchronous_standby_names().await?;
        self.pg.set_synchronous_standby_names(&names).await?;
        if names.is_empty() {
            return Ok(());
        }
        // Writes committed before this point may not be on the standby yet: wait
        // until a synchronous standby has flushed past them, so that `primary`
        // means every acknowledged write is on a standby.
        let client = self.pg.connect().await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let target: String = client
            .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
            .await?
            .try_get(0)?;
        loop {
            let caught_up: bool = client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_stat_replication
                                     WHERE application_name LIKE 'pgautofailover_standby_%'
                                       AND sync_state IN ('sync', 'quorum')
                                       AND flush_lsn >= $1::text::pg_lsn)",
                    &[&target],
                )
                .await?
                .try_get(0)?;
            if caught_up {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(KeeperError::Timeout(format!(
                    "no synchronous standby flushed up to {target} yet"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn sync_slots(&mut self) -> Result<(), KeeperError> {
        let own = self.state.node_id;
        let (nodes, _) = self.group().await?;
        let wanted: Vec<String> = nodes
            .iter()
            .filter(|n| n.node_id != own && n.goal != NodeState::Dropped)
            .map(|n| fsm::slot_name(n.node_id))
            .collect();
        self.pg.sync_replication_slots(&wanted).await
    }

    /// Becomes a standby of the current primary by the cheapest way that is
    /// safe ([`rejoin::plan`]): stream from where it stopped, pg_rewind, or a
    /// fresh base backup, escalating when one fails. The way and its reason
    /// go into the monitor's events.
    async fn rewind_or_init(&mut self) -> Result<(), KeeperError> {
        let upstream = self.upstream().await?;
        let observation = self.pg.observe().await;
        let local = self.local_wal(&observation).await;
        let primary = self.pg.primary_history(&upstream).await?;
        let mut failed = std::mem::replace(&mut self.rejoin_failed, Failed::Nothing);
        loop {
            let plan = rejoin::plan(local.as_ref(), &primary, &failed);
            let started = Instant::now();
            self.rejoin_event(format!(
                "rejoins the primary at {}:{} by {}: {}",
                upstream.host,
                upstream.port,
                plan.method(),
                plan.reason()
            ))
            .await;
            let result = match &plan {
                Rejoin::Stream(_) => {
                    self.rejoin_by_streaming(&upstream, &observation, primary.tli)
                        .await
                }
                Rejoin::Rewind(_) => self.rejoin_by_rewind(&upstream).await,
                Rejoin::BaseBackup(_) => self.rejoin_by_basebackup(&upstream).await,
            };
            match (result, plan) {
                (Ok(()), plan) => {
                    self.rejoin_event(format!(
                        "rejoined by {} in {} ms",
                        plan.method(),
                        started.elapsed().as_millis()
                    ))
                    .await;
                    return Ok(());
                }
                // pg_rewind left the data directory as it was or unusable:
                // the last resort right away.
                (Err(e), Rejoin::Rewind(_)) => failed = Failed::Rewind(e.to_string()),
                (Err(e), Rejoin::Stream(_)) => {
                    self.rejoin_failed = Failed::Streaming(e.to_string());
                    return Err(e);
                }
                (Err(e), Rejoin::BaseBackup(_)) => return Err(e),
            }
        }
    }

    /// Logs how this node rejoins, and records it as an event of the monitor.
    async fn rejoin_event(&mut self, what: String) {
        let text = format!(
            "Node {} ({}) {what}",
            self.state.node_id, self.config.node.name
        );
        tracing::info!("{text}");
        let node_id = self.state.node_id;
        let recorded = match self.monitor().await {
            Ok(monitor) => monitor
                .node_event(node_id, &text)
                .await
                .map_err(KeeperError::from),
            Err(e) => Err(e),
        };
        if let Err(e) = recorded {
            tracing::warn!(error = %e, "cannot record the event");
        }
    }

    /// The node's WAL as its running Postgres or its control file shows it;
    /// `None` without a usable data directory.
    async fn local_wal(&self, observation: &Observation) -> Option<LocalWal> {
        let tli = |t: i32| Timeline(u32::try_from(t).unwrap_or(0));
        if observation.running {
            let (role, t) = if observation.in_recovery {
                // Without a WAL receiver the checkpoint's timeline can lag.
                (LocalRole::Standby, observation.tli.max(self.last_tli))
            } else {
                (LocalRole::Primary, observation.tli)
            };
            return Some(LocalWal {
                role,
                tli: tli(t),
                end: Lsn(observation.lsn),
            });
        }
        if !self.pg.is_initialized() {
            return None;
        }
        // A postmaster that does not answer (still recovering, or stuck)
        // would change the control file under us.
        if let Err(e) = self.pg.stop(StopMode::Fast).await {
            tracing::warn!(error = %e, "cannot stop postgres to read its control file");
            return None;
        }
        match self.pg.control_data().await {
            Ok(c) => Some(LocalWal {
                role: if c.in_recovery() {
                    LocalRole::Standby
                } else {
                    LocalRole::Primary
                },
                tli: Timeline(c.checkpoint_tli.max(c.min_recovery_tli)),
                end: Lsn(c.checkpoint.max(c.min_recovery)),
            }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the control file");
                None
            }
        }
    }

    /// Restarts (or keeps) Postgres in recovery, streaming from `upstream`,
    /// and waits until its WAL receiver streams on the primary's timeline
    /// `tli`: streaming an older timeline proves nothing (a node whose WAL
    /// forked from it receives that timeline up to the switch, then stops).
    async fn rejoin_by_streaming(
        &mut self,
        upstream: &Upstream,
        observation: &Observation,
        tli: Timeline,
    ) -> Result<(), KeeperError> {
        let slot = self.slot_name();
        self.prepare_files().await?;
        self.pg.write_standby_config(Some(upstream), &slot, true)?;
        if observation.running && observation.in_recovery {
            self.pg.reload().await?;
        } else {
            self.pg.stop(StopMode::Fast).await?;
            self.pg.start().await?;
        }
        let deadline = Instant::now() + REJOIN_STREAMING_TIMEOUT;
        loop {
            let o = self.pg.observe().await;
            if o.upstream_streaming && o.tli_is_exact && u32::try_from(o.tli) == Ok(tli.0) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(KeeperError::Timeout(format!(
                    "no WAL streamed from {}:{} on timeline {tli} within {} s; the server log says: {}",
                    upstream.host,
                    upstream.port,
                    REJOIN_STREAMING_TIMEOUT.as_secs(),
                    self.pg.last_log_error()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops Postgres, rewinds it from `upstream`, and starts it streaming.
    async fn rejoin_by_rewind(&mut self, upstream: &Upstream) -> Result<(), KeeperError> {
        let slot = self.slot_name();
        self.pg.prepare_for_rewind(&slot).await?;
        self.pg.rewind(upstream).await?;
        self.start_streaming_copy(upstream).await
    }

    /// Replaces the data directory by a fresh base backup of `upstream`.
    async fn rejoin_by_basebackup(&mut self, upstream: &Upstream) -> Result<(), KeeperError> {
        self.pg.stop(StopMode::Fast).await?;
        self.pg.basebackup(upstream, &self.slot_name()).await?;
        self.start_streaming_copy(upstream).await
    }

    /// Starts a data directory just copied or rewound from `upstream` as its standby.
    async fn start_streaming_copy(&mut self, upstream: &Upstream) -> Result<(), KeeperError> {
        let slot = self.slot_name();
        self.prepare_files().await?;
        self.pg.write_standby_config(Some(upstream), &slot, true)?;
        self.pg.start().await?;
        // Slots copied from the old primary's time would hold WAL forever here.
        self.pg.sync_replication_slots(&[]).await
    }

    /// True when the keeper could not log in but the postmaster runs
    /// (logged once per reason): nothing to start, and nothing else to keep
    /// until it answers again.
    fn refusing_but_running(&mut self, observation: &Observation) -> bool {
        match Liveness::of(observation.running, self.pg.postmaster_pid()) {
            Liveness::Refusing { postmaster } => {
                self.log_error(format!(
                    "postgres runs (postmaster pid {postmaster}) but refuses the keeper's connection: not restarting it"
                ));
                true
            }
            Liveness::Serving | Liveness::Down => false,
        }
    }

    /// Keeps the current state true: Postgres up or down as the state wants,
    /// replication slots and pg_hba rules for the other nodes, and the
    /// synchronous replication settings the monitor computes.
    async fn ensure_current_state(&mut self, observation: &Observation) -> Result<(), KeeperError> {
        match expectation(self.state.current) {
            Expectation::Unmanaged => Ok(()),
            Expectation::Stopped => {
                if observation.running || self.pg.postmaster_pid().is_some() {
                    tracing::warn!(state = %self.state.current, "postgres runs in a fenced state: stopping it");
                    self.pg.stop(StopMode::Fast).await?;
                }
                Ok(())
            }
            Expectation::RunningStandby => {
                if self.refusing_but_running(observation) {
                    return Ok(());
                }
                if !observation.running {
                    tracing::warn!("postgres is not running: starting it");
                    self.ensure_running().await?;
                } else if !observation.in_recovery && self.state.current == NodeState::Catchingup {
                    // Promoted outside hapg while catching up: the monitor
                    // cannot assign catchingup again, so we rewind it here.
                    tracing::warn!(
                        "postgres is out of recovery in catchingup: it diverged, rewinding it"
                    );
                    self.rewind_or_init().await?;
                }
                Ok(())
            }
            Expectation::RunningPrimary => {
                if self.refusing_but_running(observation) {
                    return Ok(());
                }
                if !observation.running {
                    if !self.confirmed {
                        return Ok(());
                    }
                    tracing::warn!("postgres is not running: restarting it");
                    match self.ensure_running().await {
                        Ok(()) => self.restart_failing_since = None,
                        Err(e) => {
                            self.restart_failing_since.get_or_insert_with(Instant::now);
                            return Err(e);
                        }
                    }
                    return Ok(());
                }
                self.restart_failing_since = None;
                if self.monitor.is_none() {
                    return Ok(());
                }
                self.sync_slots().await?;
                let hosts = self.other_hosts().await?;
                if self.pg.write_hba(&hosts)? {
                    self.pg.reload().await?;
                }
                let names = match self.state.current {
                    NodeState::Primary | NodeState::ApplySettings => {
                        self.wanted_synchronous_standby_names().await?
                    }
                    _ => String::new(),
                };
                if names != observation.synchronous_standby_names {
                    tracing::info!(%names, "applying synchronous_standby_names");
                    self.pg.set_synchronous_standby_names(&names).await?;
                }
                Ok(())
            }
        }
    }
}
