//! The group state machine: a pure function from a view of one group to the goal
//! states the monitor assigns next, each with the reason recorded in events.
//!
//! No I/O happens here. The monitor service loads a [`GroupView`] inside a
//! transaction, calls [`decide`] (or [`on_request`] for an operator request),
//! writes what comes back, and calls again until nothing is left to decide.
//!
//! The rules follow pg_auto_failover 2.2 (reference section 3) for groups of one
//! and two nodes, with one deliberate change that makes failover fast without
//! risking acknowledged writes: a failed primary that was *converged in
//! `primary`* ran synchronous replication to its standby, so once that standby
//! has stopped streaming the old primary cannot acknowledge another commit, and
//! the standby is promoted straight away instead of waiting out a drain timeout.
//! A primary that failed while replicating asynchronously (`wait_primary`, or a
//! standby outside the replication quorum) is never failed over automatically:
//! writes stay unavailable rather than lost. `docs/failover.md` has the argument.

use std::time::Duration;

use crate::state::{Health, NodeState};

/// Timings and thresholds the rules depend on (defaults in `hapg_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    /// A node whose last report is older than this, and whose health check
    /// failed, is unhealthy.
    pub unhealthy_timeout: Duration,
    /// After the monitor starts, no node is declared unhealthy for this long.
    pub startup_grace: Duration,
    /// Largest WAL distance (bytes) at which a standby counts as caught up.
    pub catchup_threshold: u64,
    /// Largest WAL distance (bytes) at which a standby may be promoted.
    pub promote_threshold: u64,
    /// How long a switchover waits for routers to drain before going on without them.
    pub router_drain_timeout: Duration,
    /// A standby whose WAL receiver heard nothing from the primary for this
    /// long no longer counts as streaming from it.
    pub upstream_silence_timeout: Duration,
}

impl Default for Thresholds {
    fn default() -> Self {
        let timings = hapg_config::MonitorTimings::default();
        Thresholds {
            unhealthy_timeout: timings.unhealthy_timeout,
            startup_grace: timings.startup_grace,
            catchup_threshold: timings.wal_threshold_bytes,
            promote_threshold: timings.wal_threshold_bytes,
            router_drain_timeout: timings.router_drain_timeout,
            upstream_silence_timeout: timings.upstream_silence_timeout,
        }
    }
}

/// What the monitor knows about one node when it decides.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    /// Node id.
    pub id: i64,
    /// Node name.
    pub name: String,
    /// State the keeper last reported.
    pub reported: NodeState,
    /// State the monitor last assigned.
    pub goal: NodeState,
    /// Whether the keeper last said Postgres runs.
    pub pg_running: bool,
    /// Timeline the keeper last reported.
    pub tli: i32,
    /// LSN the keeper last reported (bytes).
    pub lsn: u64,
    /// For a standby: its WAL receiver is connected and streaming.
    pub upstream_streaming: bool,
    /// The keeper last saw Postgres in recovery (`None`: down, or not said).
    pub in_recovery: Option<bool>,
    /// For a streaming standby: how long its WAL receiver had heard nothing
    /// from the primary (no WAL, no keepalive) when it last reported; `None`
    /// when it did not say.
    pub upstream_silence: Option<Duration>,
    /// Last health check verdict.
    pub health: Health,
    /// Time since the keeper last reported; `None` if it never did.
    pub report_age: Option<Duration>,
    /// Failover candidate priority, 0 = never promoted.
    pub candidate_priority: i32,
    /// Whether this node counts for synchronous replication.
    pub replication_quorum: bool,
}

impl NodeView {
    /// Reported and assigned states agree, and equal `state`.
    pub fn is_converged(&self, state: NodeState) -> bool {
        self.reported == state && self.goal == state
    }

    /// Reported and assigned states agree and equal one of `states`.
    fn converged_in(&self, states: &[NodeState]) -> bool {
        self.reported == self.goal && states.contains(&self.goal)
    }

    /// The node is converged in a writable state, or moving between two primary states.
    pub fn is_in_primary_state(&self) -> bool {
        (self.reported == self.goal && self.goal.can_take_writes())
            || (matches!(
                self.reported,
                NodeState::Primary | NodeState::ApplySettings | NodeState::WaitPrimary
            ) && matches!(
                self.goal,
                NodeState::Primary | NodeState::ApplySettings | NodeState::WaitPrimary
            ))
    }
}

/// A view of one group at the moment of deciding.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupView {
    /// Nodes of the group, ordered by id.
    pub nodes: Vec<NodeView>,
    /// The formation's `number_sync_standbys`.
    pub number_sync_standbys: i32,
    /// How long the monitor service has been running.
    pub monitor_uptime: Duration,
    /// Thresholds in force.
    pub thresholds: Thresholds,
    /// A requested switchover waiting for the routers to drain, if any.
    pub switchover: Option<SwitchoverDrain>,
    /// The node `perform promotion` asked for, preferred by the election.
    pub preferred_candidate: Option<i64>,
}

/// A switchover that was requested and waits for the routers to drain the primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwitchoverDrain {
    /// Time since the request.
    pub age: Duration,
    /// Live routers that have not acknowledged the drain yet.
    pub routers_pending: usize,
}

/// One goal state to write, with the reason that goes into the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// Node that gets the goal.
    pub node_id: i64,
    /// The new goal state.
    pub goal: NodeState,
    /// Why, in words an operator reads in `show events`.
    pub reason: String,
}

/// What the monitor does next for a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Write these goals (and events) in one transaction.
    Assign(Vec<Assignment>),
    /// Delete a node that finished dropping itself.
    Remove {
        /// The node to delete.
        node_id: i64,
        /// Why.
        reason: String,
    },
    /// Nothing can be done now, for a reason worth one event (written once).
    Hold(String),
    /// Change the formation's `number_sync_standbys`.
    SetNumberSyncStandbys {
        /// The new value.
        value: i32,
        /// Why.
        reason: String,
    },
}

/// An operator request the monitor service decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// `perform switchover` / `perform failover`: move the primary to a standby.
    Switchover,
    /// `enable maintenance` on a node.
    EnableMaintenance(i64),
    /// `disable maintenance` on a node.
    DisableMaintenance(i64),
    /// `drop node`.
    Drop(i64),
    /// `perform promotion --name`: move the primary to this node.
    Promote(i64),
}

/// A setting an operator changes with `hapg set ...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    /// `set node candidate-priority`.
    CandidatePriority(i64, i32),
    /// `set node replication-quorum`.
    ReplicationQuorum(i64, bool),
    /// `set formation number-sync-standbys`.
    NumberSyncStandbys(i32),
}

/// Checks a setting change against the group; the error says why it is refused.
pub fn check_setting(view: &GroupView, setting: Setting) -> Result<String, String> {
    let quorum_standbys = |exclude: Option<i64>, with: Option<(i64, bool)>| {
        let p = view.primary().map(|p| p.id);
        view.members()
            .filter(|n| Some(n.id) != p && Some(n.id) != exclude)
            .filter(|n| match with {
                Some((id, q)) if id == n.id => q,
                _ => n.replication_quorum,
            })
            .count()
    };
    match setting {
        Setting::CandidatePriority(id, value) => {
            let n = view.node(id).ok_or("no such node in this group")?;
            if !(0..=100).contains(&value) {
                return Err(format!(
                    "candidate priority {value} is out of range: use 0 to 100"
                ));
            }
            let others_eligible = view
                .members()
                .filter(|m| m.id != id && m.candidate_priority > 0)
                .count();
            let mut text = format!(
                "Candidate priority of node {} ({}) is now {value}",
                n.id, n.name
            );
            if value == 0 && others_eligible == 0 {
                text.push_str("; no node can be promoted automatically now");
            }
            Ok(text)
        }
        Setting::ReplicationQuorum(id, value) => {
            let n = view.node(id).ok_or("no such node in this group")?;
            let nss = usize::try_from(view.number_sync_standbys).unwrap_or(0);
            if !value && nss > 0 && quorum_standbys(None, Some((id, false))) < nss + 1 {
                return Err(format!(
                    "number_sync_standbys is {nss}: at least {} quorum standbys must remain; lower number_sync_standbys first",
                    nss + 1
                ));
            }
            Ok(format!(
                "Replication quorum of node {} ({}) is now {value}",
                n.id, n.name
            ))
        }
        Setting::NumberSyncStandbys(value) => {
            if value < 0 {
                return Err("number_sync_standbys must be 0 or more".to_string());
            }
            let q = quorum_standbys(None, None);
            let wanted = usize::try_from(value).unwrap_or(0);
            if value > 0 && wanted + 1 > q {
                return Err(format!(
                    "number_sync_standbys {value} needs at least {} quorum standbys, the formation has {q}",
                    wanted + 1
                ));
            }
            Ok(format!("number_sync_standbys is now {value}"))
        }
    }
}

impl GroupView {
    fn node(&self, id: i64) -> Option<&NodeView> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// Nodes that take part in the group (not being dropped).
    fn members(&self) -> impl Iterator<Item = &NodeView> {
        self.nodes.iter().filter(|n| n.goal != NodeState::Dropped)
    }

    fn others<'a>(&'a self, node: &'a NodeView) -> impl Iterator<Item = &'a NodeView> {
        self.members().filter(move |n| n.id != node.id)
    }

    /// The primary: the node assigned a writable state, else the node that was
    /// the primary and is being demoted.
    pub fn primary(&self) -> Option<&NodeView> {
        self.members()
            .find(|n| n.goal.can_take_writes())
            .or_else(|| {
                self.members().find(|n| {
                    matches!(
                        n.goal,
                        NodeState::Draining
                            | NodeState::DemoteTimeout
                            | NodeState::PrepareMaintenance
                    ) || (n.reported.belongs_to_primary() && n.goal != NodeState::Demoted)
                })
            })
    }

    /// pg_auto_failover's IsUnhealthy: the keeper stopped reporting and the
    /// monitor cannot connect, or the keeper says Postgres is down.
    pub fn is_unhealthy(&self, node: &NodeView) -> bool {
        let stale = node
            .report_age
            .is_none_or(|age| age > self.thresholds.unhealthy_timeout);
        (stale && node.health == Health::Bad && self.monitor_uptime > self.thresholds.startup_grace)
            || !node.pg_running
    }

    /// The standby still hears from the primary: its WAL receiver streams and,
    /// as it last reported, received a message within
    /// `upstream_silence_timeout`. A live primary's walsender sends at least a
    /// keepalive every `wal_sender_timeout / 2`, so a longer silence means the
    /// primary (or the link to it) is gone, even while the receiver process
    /// waits out its own `wal_receiver_timeout`. A standby that does not say
    /// how long it has been silent counts as hearing the primary.
    pub fn hears_primary(&self, node: &NodeView) -> bool {
        node.upstream_streaming
            && node
                .upstream_silence
                .is_none_or(|silence| silence < self.thresholds.upstream_silence_timeout)
    }

    /// The keeper reports recently, Postgres runs, and it has not diverged.
    pub fn is_healthy(&self, node: &NodeView) -> bool {
        node.pg_running
            && node
                .report_age
                .is_some_and(|age| age <= self.thresholds.unhealthy_timeout)
            && self.divergence(node).is_none()
    }

    /// [`divergence`] of `node` from this group's primary.
    pub fn divergence(&self, node: &NodeView) -> Option<String> {
        divergence(node, self.primary())
    }

    /// Failing over from `primary` to `standby` keeps every acknowledged write:
    /// the primary was converged in `primary`, so it committed synchronously to
    /// its quorum standbys, and `standby` is one of them.
    fn failover_is_lossless(&self, primary: &NodeView, standby: &NodeView) -> bool {
        primary.is_converged(NodeState::Primary) && standby.replication_quorum
    }
}

/// Why `node`, assigned and reporting standby states, cannot be trusted as a
/// standby of `primary`: its Postgres is out of recovery (it takes writes), or
/// runs on a timeline newer than the primary's (it was promoted outside hapg:
/// every timeline after the primary's forked from its history). `None` when
/// nothing says so.
pub fn divergence(node: &NodeView, primary: Option<&NodeView>) -> Option<String> {
    use NodeState::*;
    // Reported and assigned states both where Postgres runs in recovery (a
    // node on its way to being promoted is assigned another state first);
    // not only converged ones: while its keeper rewinds it, the node keeps
    // its last report and stays marked.
    let in_recovery_state =
        |s: NodeState| matches!(s, Secondary | Catchingup | ReportLsn | FastForward);
    let standby = in_recovery_state(node.reported) && in_recovery_state(node.goal);
    if !standby || !node.pg_running || node.goal == Dropped {
        return None;
    }
    let primary = primary.filter(|p| p.id != node.id);
    let primary_tli = primary.map(|p| p.tli).unwrap_or(0);
    if node.in_recovery == Some(false) {
        return Some(format!(
            "its Postgres is not in recovery and takes writes (timeline {}{})",
            node.tli,
            match primary {
                Some(p) => format!(", the primary's is {}", p.tli),
                None => String::new(),
            }
        ));
    }
    match primary {
        Some(p) if p.is_in_primary_state() && p.pg_running && node.tli > primary_tli => {
            Some(format!(
                "it runs on timeline {}, which forked from the history of the primary's timeline {}",
                node.tli, p.tli
            ))
        }
        _ => None,
    }
}

fn wal_distance(a: &NodeView, b: &NodeView) -> Option<u64> {
    if a.lsn == 0 || b.lsn == 0 {
        None
    } else {
        Some(a.lsn.abs_diff(b.lsn))
    }
}

fn assign(node: &NodeView, goal: NodeState, reason: impl Into<String>) -> Assignment {
    Assignment {
        node_id: node.id,
        goal,
        reason: reason.into(),
    }
}

/// The next decision for a group, or `None` when there is nothing to do.
///
/// An assignment or removal for any node wins over a hold for another: one node
/// waiting must not keep the monitor from moving the others.
pub fn decide(view: &GroupView) -> Option<Decision> {
    // A node that finished dropping itself goes first: the others' rules must
    // not count it any more.
    if let Some(a) = view
        .nodes
        .iter()
        .find(|n| n.is_converged(NodeState::Dropped))
    {
        return Some(Decision::Remove {
            node_id: a.id,
            reason: format!("Removing node {} ({}): it reported dropped", a.id, a.name),
        });
    }
    // A node that diverged is never trusted as a standby: it goes before the
    // other rules, which would count it as one.
    let mut hold = None;
    for node in &view.nodes {
        match decide_divergence(view, node) {
            Some(Decision::Hold(reason)) => {
                hold.get_or_insert(Decision::Hold(reason));
            }
            Some(decision) => return Some(decision),
            None => {}
        }
    }
    if let Some(decision) = proceed_with_switchover(view) {
        return Some(decision);
    }
    if let Some(decision) = adjust_number_sync_standbys(view) {
        return Some(decision);
    }
    for node in &view.nodes {
        match decide_for(view, node) {
            Some(Decision::Hold(reason)) => {
                hold.get_or_insert(Decision::Hold(reason));
            }
            Some(decision) => return Some(decision),
            None => {}
        }
    }
    hold
}

/// A standby that diverged from the primary (see [`divergence`]) is sent back
/// to `catchingup`: its keeper stops it and rewinds it from the primary. One
/// already in `catchingup` is being brought back by its keeper: the hold
/// records why.
fn decide_divergence(view: &GroupView, a: &NodeView) -> Option<Decision> {
    let why = view.divergence(a)?;
    let p = view.primary().filter(|p| p.id != a.id);
    let from = match p {
        Some(p) => format!("primary {} ({})", p.id, p.name),
        None => "the group".to_string(),
    };
    if a.goal == NodeState::Catchingup {
        return Some(Decision::Hold(format!(
            "Node {} ({}) diverged from {from}: {why}; its keeper rewinds it",
            a.id, a.name
        )));
    }
    Some(Decision::Assign(vec![assign(
        a,
        NodeState::Catchingup,
        format!(
            "Node {} ({}) diverged from {from}: {why}; it is not a standby any more: it is stopped, rewound and rejoins",
            a.id, a.name
        ),
    )]))
}

/// The rules, evaluated with `a` as the node under consideration; the first that
/// matches wins (pg_auto_failover's ProceedGroupState order).
fn decide_for(view: &GroupView, a: &NodeView) -> Option<Decision> {
    use NodeState::*;

    // A node being dropped, or in maintenance, is left alone.
    if a.goal == Dropped || a.is_converged(Maintenance) {
        return None;
    }

    let member_count = view.members().count();
    if member_count == 1 && !a.is_converged(Single) {
        // A lone node serves alone, whatever it was: this is how a group starts,
        // and how the last node left after a drop goes on.
        if a.goal == Single {
            return None;
        }
        return Some(Decision::Assign(vec![assign(
            a,
            Single,
            format!(
                "Node {} ({}) is the only node of its group: single",
                a.id, a.name
            ),
        )]));
    }

    if a.is_in_primary_state() {
        return decide_for_primary(view, a);
    }

    let primary = view.primary();

    if a.is_converged(Init) {
        return match primary {
            Some(p) if p.is_converged(Single) || p.is_in_primary_state() => {
                Some(Decision::Assign(vec![assign(
                    a,
                    WaitStandby,
                    format!(
                        "Node {} ({}) joins as a standby of {} ({})",
                        a.id, a.name, p.id, p.name
                    ),
                )]))
            }
            _ => Some(Decision::Hold(format!(
                "Node {} ({}) waits for a writable primary before it can join",
                a.id, a.name
            ))),
        };
    }

    let p = primary?;

    // Joining: the primary got ready for a standby, start the base backup.
    if a.is_converged(WaitStandby) {
        if p.converged_in(&[WaitPrimary, JoinPrimary]) {
            return Some(Decision::Assign(vec![assign(
                a,
                Catchingup,
                format!(
                    "Primary {} ({}) is ready: node {} ({}) takes a base backup and catches up",
                    p.id, p.name, a.id, a.name
                ),
            )]));
        }
        if p.is_converged(Primary) {
            let mut assignments = vec![assign(
                a,
                Catchingup,
                format!(
                    "Node {} ({}) takes a base backup and catches up",
                    a.id, a.name
                ),
            )];
            if a.replication_quorum {
                assignments.push(assign(
                    p,
                    ApplySettings,
                    format!(
                        "Primary {} ({}) applies settings for the new standby {}",
                        p.id, p.name, a.name
                    ),
                ));
            }
            return Some(Decision::Assign(assignments));
        }
        return None;
    }

    // Caught up: same timeline and close enough in WAL.
    if a.is_converged(Catchingup)
        && p.converged_in(&[WaitPrimary, JoinPrimary, Primary])
        && view.is_healthy(a)
        && a.tli == p.tli
        && wal_distance(a, p).is_some_and(|d| d <= view.thresholds.catchup_threshold)
    {
        return Some(Decision::Assign(vec![assign(
            a,
            Secondary,
            format!(
                "Node {} ({}) caught up with primary {} ({}) on timeline {}: secondary",
                a.id, a.name, p.id, p.name, a.tli
            ),
        )]));
    }

    // With two standbys or more, a new primary is elected (see `elect`).
    let election = view.others(p).count() >= 2;

    // Automatic failover.
    if a.is_converged(Secondary) && p.is_in_primary_state() && view.is_unhealthy(p) {
        if election {
            return Some(start_election(view, p, true));
        }
        return Some(failover_decision(view, p, a));
    }

    // A standby that comes back during an election joins it: the election may
    // need its WAL position to be sure no acknowledged write is missing
    // (quorum intersection), and no other rule would ever ask it. Its keeper
    // reports again; its Postgres may still be down (it cannot follow a
    // primary there is none), and detaching starts it.
    if election
        && matches!(p.goal, Draining | DemoteTimeout)
        && matches!(a.reported, Secondary | Catchingup)
        && matches!(a.goal, Secondary | Catchingup)
        && a.report_age
            .is_some_and(|age| age <= view.thresholds.unhealthy_timeout)
        && view.others(p).any(|n| n.goal == ReportLsn)
    {
        return Some(Decision::Assign(vec![assign(
            a,
            ReportLsn,
            format!(
                "Election for a new primary: node {} ({}) is back, stops streaming and reports its WAL position",
                a.id, a.name
            ),
        )]));
    }

    // The old primary stopped cleanly for a switchover or maintenance: promote a standby.
    if a.converged_in(&[Secondary, Catchingup]) && p.converged_in(&[Draining, PrepareMaintenance]) {
        if election {
            return Some(start_election(view, p, false));
        }
        if a.reported == Catchingup {
            return None;
        }
        return Some(Decision::Assign(vec![assign(
            a,
            PreparePromotion,
            format!(
                "Primary {} ({}) stopped: node {} ({}) stops replicating and will be promoted",
                p.id, p.name, a.id, a.name
            ),
        )]));
    }

    if a.is_converged(WaitMaintenance) && (p.is_converged(WaitPrimary) || p.goal != WaitPrimary) {
        return Some(Decision::Assign(vec![assign(
            a,
            Maintenance,
            format!("Node {} ({}) is now in maintenance", a.id, a.name),
        )]));
    }

    if a.is_converged(PreparePromotion) {
        return decide_promotion(view, p, a);
    }

    if a.is_converged(FastForward) {
        return Some(Decision::Assign(vec![assign(
            a,
            PreparePromotion,
            format!(
                "Node {} ({}) has fetched the missing WAL: it will be promoted",
                a.id, a.name
            ),
        )]));
    }

    if a.is_converged(ReportLsn) {
        if p.id != a.id && p.goal.can_take_writes() && p.reported.can_take_writes() {
            return Some(Decision::Assign(vec![assign(
                a,
                Catchingup,
                format!(
                    "Node {} ({}) follows the new primary {} ({})",
                    a.id, a.name, p.id, p.name
                ),
            )]));
        }
        return elect(view, p);
    }

    // An old primary rejoins once the new primary runs.
    if a.is_converged(Demoted)
        && p.id != a.id
        && view.is_healthy(p)
        && matches!(p.reported, WaitPrimary | Primary | JoinPrimary)
        && matches!(p.goal, WaitPrimary | Primary | JoinPrimary)
    {
        return Some(Decision::Assign(vec![assign(
            a,
            Catchingup,
            format!(
                "Node {} ({}) rejoins as a standby of the new primary {} ({})",
                a.id, a.name, p.id, p.name
            ),
        )]));
    }

    None
}

/// `number_sync_standbys` follows the standbys, as pg_auto_failover's does: a
/// node joining as the second quorum standby raises it from 0 to 1 (so losing
/// one standby no longer risks writes), and when too few quorum standbys are
/// left for the value it is lowered so the primary does not wait forever.
fn adjust_number_sync_standbys(view: &GroupView) -> Option<Decision> {
    let p = view.primary()?;
    let quorum: Vec<&NodeView> = view
        .others(p)
        .filter(|n| n.replication_quorum && n.goal != NodeState::Init)
        .collect();
    let joining = view
        .others(p)
        .find(|n| n.is_converged(NodeState::Init) && n.replication_quorum);
    let nss = view.number_sync_standbys;
    if let Some(j) = joining {
        if nss == 0 && quorum.len() + 1 >= 2 {
            return Some(Decision::SetNumberSyncStandbys {
                value: 1,
                reason: format!(
                    "Node {} ({}) joins as the second quorum standby: number_sync_standbys is now 1",
                    j.id, j.name
                ),
            });
        }
    }
    let count = i32::try_from(quorum.len()).unwrap_or(i32::MAX);
    if nss > 0 && nss + 1 > count && joining.is_none() {
        let value = (count - 1).max(0);
        return Some(Decision::SetNumberSyncStandbys {
            value,
            reason: format!(
                "Only {count} quorum standby(s) left: number_sync_standbys is lowered from {nss} to {value}"
            ),
        });
    }
    None
}

/// A switchover stops the primary once every live router has drained it (its
/// transactions finished, new ones paused), or once the drain timeout passed.
fn proceed_with_switchover(view: &GroupView) -> Option<Decision> {
    let drain = view.switchover.as_ref()?;
    let p = view.primary()?;
    if !p.converged_in(&[NodeState::Primary, NodeState::WaitPrimary]) {
        return None;
    }
    let why = if drain.routers_pending == 0 {
        "every router drained it".to_string()
    } else if drain.age >= view.thresholds.router_drain_timeout {
        format!(
            "{} router(s) did not confirm the drain within {} s",
            drain.routers_pending,
            view.thresholds.router_drain_timeout.as_secs()
        )
    } else {
        return None;
    };
    Some(Decision::Assign(vec![assign(
        p,
        NodeState::Draining,
        format!(
            "Switchover: {why}; primary {} ({}) stops so a standby can take over",
            p.id, p.name
        ),
    )]))
}

fn failover_decision(view: &GroupView, p: &NodeView, a: &NodeView) -> Decision {
    use NodeState::*;
    let why_not = if !view.is_healthy(a) {
        Some("the standby itself is not healthy".to_string())
    } else if a.candidate_priority == 0 {
        Some("its candidate priority is 0".to_string())
    } else if view.hears_primary(a) {
        Some(format!(
            "the standby heard from the primary {} ago, so the primary is alive",
            a.upstream_silence.map_or_else(
                || "recently".to_string(),
                |d| format!("{} ms", d.as_millis())
            )
        ))
    } else if !view.failover_is_lossless(p, a) {
        Some(format!(
            "the primary was {} with {} replication to it: promoting could lose acknowledged writes",
            p.reported,
            if a.replication_quorum {
                "asynchronous"
            } else {
                "no synchronous"
            }
        ))
    } else {
        match wal_distance(a, p) {
            Some(d) if d <= view.thresholds.promote_threshold => None,
            Some(d) => Some(format!(
                "it is {d} bytes of WAL behind, over the {} byte limit",
                view.thresholds.promote_threshold
            )),
            None => Some("its WAL position is unknown".to_string()),
        }
    };
    match why_not {
        Some(reason) => Decision::Hold(format!(
            "Primary {} ({}) is unhealthy, but node {} ({}) is not promoted: {reason}",
            p.id, p.name, a.id, a.name
        )),
        None => Decision::Assign(vec![
            assign(
                a,
                PreparePromotion,
                format!(
                    "Primary {} ({}) is unhealthy: failing over to node {} ({})",
                    p.id, p.name, a.id, a.name
                ),
            ),
            assign(
                p,
                Draining,
                format!("Primary {} ({}) is unhealthy: draining it", p.id, p.name),
            ),
        ]),
    }
}

/// States of a standby that no longer streams from the old primary during a failover.
const DETACHED: [NodeState; 3] = [
    NodeState::ReportLsn,
    NodeState::FastForward,
    NodeState::PreparePromotion,
];

/// Quorum intersection: the old primary acknowledged a commit once `k` of its
/// `q` quorum standbys had it, so any `q - k + 1` of them include one that has
/// it. When that many quorum standbys have stopped streaming and reported, the
/// most advanced of them holds every acknowledged write. Returns how many are
/// needed, or `None` when the primary ran without synchronous standbys.
fn quorum_needed(view: &GroupView, p: &NodeView) -> Option<usize> {
    let q = view.others(p).filter(|n| n.replication_quorum).count();
    let k = usize::try_from(view.number_sync_standbys.max(1)).unwrap_or(1);
    (q >= 1).then(|| (q + 1).saturating_sub(k).max(1))
}

/// Starts an election: the healthy standbys stop streaming and report their
/// WAL position (`report_lsn`), and the old primary is told to drain.
fn start_election(view: &GroupView, p: &NodeView, primary_lost: bool) -> Decision {
    use NodeState::*;
    if primary_lost {
        if !p.is_converged(Primary) {
            return Decision::Hold(format!(
                "Primary {} ({}) is unhealthy, but it was {}: its standbys may miss acknowledged writes, so none is promoted",
                p.id, p.name, p.reported
            ));
        }
        if let Some(s) = view
            .others(p)
            .find(|n| view.hears_primary(n) && view.is_healthy(n))
        {
            return Decision::Hold(format!(
                "Primary {} ({}) looks unhealthy to the monitor, but node {} ({}) still receives WAL from it: no failover",
                p.id, p.name, s.id, s.name
            ));
        }
    }
    let mut assignments: Vec<Assignment> = view
        .others(p)
        .filter(|n| n.converged_in(&[Secondary, Catchingup]) && view.is_healthy(n))
        .map(|n| {
            assign(
                n,
                ReportLsn,
                format!(
                    "Election for a new primary: node {} ({}) stops streaming and reports its WAL position",
                    n.id, n.name
                ),
            )
        })
        .collect();
    if p.is_in_primary_state() {
        assignments.push(assign(
            p,
            Draining,
            format!("Primary {} ({}) is unhealthy: draining it", p.id, p.name),
        ));
    }
    Decision::Assign(assignments)
}

/// The election: once every healthy standby reported its position, and enough
/// quorum standbys did to be sure no acknowledged write is missing, the
/// candidate with the highest priority wins (the operator's choice first, then
/// ties by WAL position); a winner that lacks WAL first fetches it from the
/// most advanced standby.
fn elect(view: &GroupView, old: &NodeView) -> Option<Decision> {
    use NodeState::*;
    let others: Vec<&NodeView> = view.others(old).collect();
    if others
        .iter()
        .any(|n| matches!(n.goal, FastForward | PreparePromotion | StopReplication))
    {
        return None;
    }
    if others
        .iter()
        .any(|n| n.goal == ReportLsn && n.reported != ReportLsn && view.is_healthy(n))
    {
        return None;
    }
    let reporters: Vec<&NodeView> = others
        .iter()
        .copied()
        .filter(|n| n.is_converged(ReportLsn) && view.is_healthy(n))
        .collect();
    let stopped_cleanly = old.converged_in(&[Draining, PrepareMaintenance]);
    if !stopped_cleanly {
        let Some(needed) = quorum_needed(view, old) else {
            return Some(Decision::Hold(
                "Election cannot complete: the old primary had no synchronous standby".to_string(),
            ));
        };
        let reported = reporters.iter().filter(|n| n.replication_quorum).count();
        if reported < needed {
            return Some(Decision::Hold(format!(
                "Election waits: {reported} quorum standby(s) reported their WAL position, {needed} are needed to be sure no acknowledged write is missing (number_sync_standbys {})",
                view.number_sync_standbys
            )));
        }
    }
    let most_advanced = reporters.iter().max_by_key(|n| (n.tli, n.lsn, -n.id))?;
    if !stopped_cleanly {
        if let Some(behind) = old.lsn.checked_sub(most_advanced.lsn) {
            if most_advanced.lsn > 0 && behind > view.thresholds.promote_threshold {
                return Some(Decision::Hold(format!(
                    "Election cannot complete: the most advanced standby, node {} ({}), is {behind} bytes \
                     of WAL behind the old primary's last report, over the {} byte limit",
                    most_advanced.id, most_advanced.name, view.thresholds.promote_threshold
                )));
            }
        }
    }
    let candidates: Vec<&&NodeView> = reporters
        .iter()
        .filter(|n| n.candidate_priority > 0)
        .collect();
    let preferred = view
        .preferred_candidate
        .and_then(|id| candidates.iter().find(|n| n.id == id).copied());
    let Some(chosen) = preferred.or_else(|| {
        candidates
            .iter()
            .max_by_key(|n| (n.candidate_priority, n.tli, n.lsn, -n.id))
            .copied()
    }) else {
        return Some(Decision::Hold(
            "Election cannot complete: no standby with a candidate priority above 0 reported"
                .to_string(),
        ));
    };
    if (chosen.tli, chosen.lsn) < (most_advanced.tli, most_advanced.lsn) {
        return Some(Decision::Assign(vec![assign(
            chosen,
            FastForward,
            format!(
                "Node {} ({}) is elected (priority {}) but lacks WAL: it fetches it from node {} ({}) first",
                chosen.id, chosen.name, chosen.candidate_priority, most_advanced.id, most_advanced.name
            ),
        )]));
    }
    Some(Decision::Assign(vec![assign(
        chosen,
        PreparePromotion,
        format!(
            "Node {} ({}) is elected: priority {}, WAL position {}",
            chosen.id,
            chosen.name,
            chosen.candidate_priority,
            crate::pgconn::format_lsn(chosen.lsn)
        ),
    )]))
}

/// The candidate `a` stopped replicating; decide whether it may take writes now.
fn decide_promotion(view: &GroupView, p: &NodeView, a: &NodeView) -> Option<Decision> {
    use NodeState::*;
    if p.id == a.id {
        return None;
    }
    let promote = |p_goal: NodeState, why: String| {
        Some(Decision::Assign(vec![
            assign(a, WaitPrimary, why),
            assign(
                p,
                p_goal,
                format!("Node {} ({}) is no longer the primary", p.id, p.name),
            ),
        ]))
    };
    if p.is_converged(PrepareMaintenance) {
        return promote(
            Maintenance,
            format!(
                "Primary {} ({}) stopped for maintenance: promoting node {} ({})",
                p.id, p.name, a.id, a.name
            ),
        );
    }
    if p.converged_in(&[Draining, DemoteTimeout, Demoted]) {
        return promote(
            Demoted,
            format!(
                "Old primary {} ({}) confirmed it stopped: promoting node {} ({})",
                p.id, p.name, a.id, a.name
            ),
        );
    }
    // The old primary cannot confirm. It last reported `primary` with synchronous
    // replication to `a`, and `a` no longer streams from it: the old primary can
    // not acknowledge another commit, so promoting now loses nothing. This
    // needs the WAL receiver gone (`upstream_streaming` false), not only silent
    // (`hears_primary`): a receiver that is merely waiting could still
    // acknowledge the old primary's commits if it came back.
    let detached: Vec<&NodeView> = view
        .others(p)
        .filter(|n| DETACHED.contains(&n.reported) && !n.upstream_streaming)
        .collect();
    let quorum_detached = detached.iter().filter(|n| n.replication_quorum).count();
    let most_advanced = detached.iter().map(|n| (n.tli, n.lsn)).max();
    if p.reported == Primary
        && view.is_unhealthy(p)
        && !a.upstream_streaming
        && quorum_needed(view, p).is_some_and(|needed| quorum_detached >= needed)
        && most_advanced.is_none_or(|top| (a.tli, a.lsn) >= top)
    {
        return promote(
            Demoted,
            format!(
                "Old primary {} ({}) is unreachable and was replicating synchronously to node {} ({}), \
                 which has stopped streaming: promoting it without waiting",
                p.id, p.name, a.id, a.name
            ),
        );
    }
    None
}

/// Rules for a node that is the writable primary.
fn decide_for_primary(view: &GroupView, p: &NodeView) -> Option<Decision> {
    use NodeState::*;

    if p.is_converged(Single) {
        let joining = view.others(p).find(|n| n.is_converged(WaitStandby))?;
        return Some(Decision::Assign(vec![assign(
            p,
            WaitPrimary,
            format!(
                "Node {} ({}) joins: primary {} ({}) prepares for a standby",
                joining.id, joining.name, p.id, p.name
            ),
        )]));
    }

    if !p.converged_in(&[Primary, WaitPrimary, ApplySettings, JoinPrimary]) {
        return None;
    }
    if p.is_converged(JoinPrimary) {
        return Some(Decision::Assign(vec![assign(
            p,
            Primary,
            "join_primary is deprecated: primary",
        )]));
    }

    // Standbys that fell ill lose their candidacy, and with it synchronous replication.
    let mut assignments: Vec<Assignment> = view
        .others(p)
        .filter(|n| n.goal == Secondary && view.is_unhealthy(n))
        .map(|n| {
            assign(
                n,
                Catchingup,
                format!("Standby {} ({}) is unhealthy: catchingup", n.id, n.name),
            )
        })
        .collect();
    let demoted: Vec<i64> = assignments.iter().map(|x| x.node_id).collect();

    let quorum_count = view.others(p).filter(|n| n.replication_quorum).count();
    let secondaries: Vec<&NodeView> = view
        .others(p)
        .filter(|n| n.is_converged(Secondary) && !demoted.contains(&n.id))
        .collect();
    let secondary_count = secondaries.len();
    let quorum_secondary_count = secondaries.iter().filter(|n| n.replication_quorum).count();

    let target = if quorum_count == 0 {
        if secondary_count == 0 {
            WaitPrimary
        } else {
            Primary
        }
    } else if quorum_secondary_count == 0 && !p.is_converged(WaitPrimary) {
        if view.number_sync_standbys == 0 {
            WaitPrimary
        } else {
            Primary
        }
    } else if p.is_converged(WaitPrimary) && quorum_secondary_count > 0 {
        Primary
    } else if p.is_converged(ApplySettings) {
        if view.number_sync_standbys == 0 && quorum_secondary_count == 0 {
            WaitPrimary
        } else {
            Primary
        }
    } else {
        p.goal
    };

    if target != p.goal {
        let reason = match target {
            WaitPrimary => format!(
                "Primary {} ({}) has no synchronous standby left: wait_primary, replication becomes asynchronous",
                p.id, p.name
            ),
            _ => format!(
                "Primary {} ({}) has a caught-up standby: primary, with synchronous replication",
                p.id, p.name
            ),
        };
        assignments.push(assign(p, target, reason));
    }
    if assignments.is_empty() {
        None
    } else {
        Some(Decision::Assign(assignments))
    }
}

/// Decides on an operator request, or says why it is refused.
pub fn on_request(view: &GroupView, request: Request) -> Result<Vec<Assignment>, String> {
    use NodeState::*;
    match request {
        Request::Switchover => {
            let p = view.primary().ok_or("the group has no primary right now")?;
            if !p.converged_in(&[Primary, WaitPrimary, Single]) {
                return Err(format!(
                    "the primary {} ({}) is {} (assigned {}): wait until it is primary",
                    p.id, p.name, p.reported, p.goal
                ));
            }
            let candidate = view
                .others(p)
                .filter(|n| {
                    n.is_converged(Secondary) && n.candidate_priority > 0 && view.is_healthy(n)
                })
                .max_by_key(|n| (n.candidate_priority, n.lsn));
            let Some(s) = candidate else {
                return Err(
                    "there is no healthy secondary with a candidate priority above 0 to switch over to"
                        .to_string(),
                );
            };
            if !view.failover_is_lossless(p, s) {
                return Err(format!(
                    "the primary {} ({}) does not replicate synchronously to {} yet: wait until it is primary",
                    p.id, p.name, s.name
                ));
            }
            // Accepted: the primary stops once the routers have drained it
            // (see `proceed_with_switchover`).
            Ok(vec![])
        }
        Request::EnableMaintenance(id) => {
            let n = view.node(id).ok_or("no such node in this group")?;
            if matches!(n.goal, Maintenance | WaitMaintenance | PrepareMaintenance) {
                return Ok(vec![]);
            }
            let p = view.primary();
            if p.is_some_and(|p| p.id == n.id) {
                if !n.converged_in(&[Primary, WaitPrimary]) {
                    return Err(format!(
                        "node {} is {} (assigned {}): wait until it is primary",
                        n.name, n.reported, n.goal
                    ));
                }
                let s = view
                    .others(n)
                    .find(|s| {
                        s.is_converged(Secondary) && s.candidate_priority > 0 && view.is_healthy(s)
                    })
                    .ok_or("no healthy secondary can take over: maintenance of the primary would stop all writes")?;
                if !view.failover_is_lossless(n, s) {
                    return Err(format!(
                        "the primary does not replicate synchronously to {} yet: wait until it is primary",
                        s.name
                    ));
                }
                // The standby is promoted once the primary has stopped: its
                // shutdown streams every last WAL record to the standby first.
                return Ok(vec![assign(
                    n,
                    PrepareMaintenance,
                    format!(
                        "Maintenance requested on primary {} ({}): it stops, then {} takes over",
                        n.id, n.name, s.name
                    ),
                )]);
            }
            if !matches!(n.reported, Secondary | Catchingup) {
                return Err(format!(
                    "node {} is {} (assigned {}): only a primary or a standby can go to maintenance",
                    n.name, n.reported, n.goal
                ));
            }
            match p {
                Some(p) if p.is_converged(Primary) && n.replication_quorum => {
                    let other_sync = view
                        .others(p)
                        .any(|o| o.id != n.id && o.is_converged(Secondary) && o.replication_quorum);
                    if other_sync {
                        Ok(vec![assign(
                            n,
                            Maintenance,
                            format!("Maintenance requested on standby {} ({})", n.id, n.name),
                        )])
                    } else {
                        Ok(vec![
                            assign(
                                n,
                                WaitMaintenance,
                                format!("Maintenance requested on standby {} ({})", n.id, n.name),
                            ),
                            assign(
                                p,
                                WaitPrimary,
                                format!(
                                    "Standby {} goes to maintenance: primary {} ({}) replicates asynchronously meanwhile",
                                    n.name, p.id, p.name
                                ),
                            ),
                        ])
                    }
                }
                _ => Ok(vec![assign(
                    n,
                    Maintenance,
                    format!("Maintenance requested on standby {} ({})", n.id, n.name),
                )]),
            }
        }
        Request::DisableMaintenance(id) => {
            let n = view.node(id).ok_or("no such node in this group")?;
            if !n.is_converged(Maintenance) {
                return Err(format!(
                    "node {} is {} (assigned {}), not in maintenance",
                    n.name, n.reported, n.goal
                ));
            }
            if view.members().count() == 1 {
                return Ok(vec![assign(
                    n,
                    Single,
                    format!("Node {} ({}) leaves maintenance: single", n.id, n.name),
                )]);
            }
            match view.primary() {
                Some(p) if p.id != n.id && p.goal.can_take_writes() => Ok(vec![assign(
                    n,
                    Catchingup,
                    format!(
                        "Node {} ({}) leaves maintenance and catches up with {}",
                        n.id, n.name, p.name
                    ),
                )]),
                _ => Err("the group has no primary for this node to follow".to_string()),
            }
        }
        Request::Promote(id) => {
            let n = view.node(id).ok_or("no such node in this group")?;
            if n.goal.can_take_writes() {
                return Err(format!("node {} is already the primary", n.name));
            }
            if !n.is_converged(Secondary) || n.candidate_priority == 0 || !view.is_healthy(n) {
                return Err(format!(
                    "node {} is {} with candidate priority {}: only a healthy secondary with a priority above 0 can be promoted",
                    n.name, n.reported, n.candidate_priority
                ));
            }
            on_request(view, Request::Switchover)
        }
        Request::Drop(id) => {
            let n = view.node(id).ok_or("no such node in this group")?;
            if n.goal == Dropped {
                return Ok(vec![]);
            }
            if n.goal.can_take_writes() && view.others(n).next().is_some() {
                return Err(format!(
                    "node {} is the primary: dropping it could lose writes its standbys do not have; \
                     run `hapg perform switchover` first, then drop it",
                    n.name
                ));
            }
            Ok(vec![assign(
                n,
                Dropped,
                format!("Node {} ({}) is being dropped", n.id, n.name),
            )])
        }
    }
}

/// `synchronous_standby_names` for the group's primary: `ANY k (...)` over its
/// quorum standbys that are secondaries, by priority, or `''` while it runs
/// asynchronously.
pub fn synchronous_standby_names(view: &GroupView, primary_id: i64) -> String {
    let Some(p) = view.node(primary_id) else {
        return String::new();
    };
    if matches!(p.goal, NodeState::WaitPrimary | NodeState::Single) {
        return String::new();
    }
    // Every quorum standby is listed, caught up or not: with number_sync_standbys
    // above 0, commits wait for enough of them rather than silently going async.
    let mut standbys: Vec<&NodeView> = view
        .others(p)
        .filter(|n| {
            n.replication_quorum
                && (n.goal == NodeState::Secondary || view.number_sync_standbys > 0)
        })
        .collect();
    if standbys.is_empty() {
        return String::new();
    }
    standbys.sort_by_key(|n| (std::cmp::Reverse(n.candidate_priority), n.id));
    let names: Vec<String> = standbys.iter().map(|n| slot_name(n.id)).collect();
    format!(
        "ANY {} ({})",
        view.number_sync_standbys.max(1),
        names.join(", ")
    )
}

/// The replication slot and application name of a node's standby connection.
pub fn slot_name(node_id: i64) -> String {
    format!("pgautofailover_standby_{node_id}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use NodeState::*;

    const FRESH: Option<Duration> = Some(Duration::from_millis(300));
    const STALE: Option<Duration> = Some(Duration::from_secs(10));

    fn node(id: i64, reported: NodeState, goal: NodeState) -> NodeView {
        NodeView {
            id,
            name: format!("node_{id}"),
            reported,
            goal,
            pg_running: true,
            tli: 1,
            lsn: 0x3000000,
            upstream_streaming: false,
            in_recovery: None,
            upstream_silence: None,
            health: Health::Good,
            report_age: FRESH,
            candidate_priority: 50,
            replication_quorum: true,
        }
    }

    fn at(id: i64, state: NodeState) -> NodeView {
        node(id, state, state)
    }

    fn dead(mut n: NodeView) -> NodeView {
        n.report_age = STALE;
        n.health = Health::Bad;
        n
    }

    /// The keeper saw Postgres in recovery.
    fn standby(mut n: NodeView) -> NodeView {
        n.in_recovery = Some(true);
        n
    }

    /// The keeper saw Postgres out of recovery, on a new timeline.
    fn promoted(mut n: NodeView) -> NodeView {
        n.in_recovery = Some(false);
        n.tli += 1;
        n
    }

    fn on_tli(mut n: NodeView, tli: i32) -> NodeView {
        n.tli = tli;
        n
    }

    fn group(nodes: Vec<NodeView>) -> GroupView {
        GroupView {
            nodes,
            number_sync_standbys: 0,
            monitor_uptime: Duration::from_secs(3600),
            thresholds: Thresholds::default(),
            switchover: None,
            preferred_candidate: None,
        }
    }

    /// What a decision boils down to, for comparing with a table row.
    #[derive(Debug, PartialEq)]
    enum Outcome {
        Goals(Vec<(i64, NodeState)>),
        Removed(i64),
        Held,
        SyncStandbys(i32),
        Nothing,
    }

    fn outcome(view: &GroupView) -> Outcome {
        match decide(view) {
            Some(Decision::Assign(a)) => {
                Outcome::Goals(a.iter().map(|a| (a.node_id, a.goal)).collect())
            }
            Some(Decision::Remove { node_id, .. }) => Outcome::Removed(node_id),
            Some(Decision::Hold(_)) => Outcome::Held,
            Some(Decision::SetNumberSyncStandbys { value, .. }) => Outcome::SyncStandbys(value),
            None => Outcome::Nothing,
        }
    }

    /// One row per rule of the group state machine for one and two nodes.
    #[test]
    fn rules_table() {
        use Outcome::*;
        let mut startup = group(vec![dead(at(1, Primary)), at(2, Secondary)]);
        startup.monitor_uptime = Duration::from_secs(1);
        let rows: Vec<(&str, GroupView, Outcome)> = vec![
            (
                "a lone new node becomes single",
                group(vec![at(1, Init)]),
                Goals(vec![(1, Single)]),
            ),
            (
                "a lone single node stays",
                group(vec![at(1, Single)]),
                Nothing,
            ),
            (
                "the last node after a drop serves alone",
                group(vec![at(1, Secondary), node(2, Secondary, Dropped)]),
                Goals(vec![(1, Single)]),
            ),
            (
                "a lone standby is promoted to single",
                group(vec![at(1, Secondary)]),
                Goals(vec![(1, Single)]),
            ),
            (
                "a new node joins a single primary",
                group(vec![at(1, Single), at(2, Init)]),
                Goals(vec![(2, WaitStandby)]),
            ),
            (
                "a new node waits without a primary",
                group(vec![at(1, Demoted), at(2, Init)]),
                Held,
            ),
            (
                "single prepares for a standby",
                group(vec![at(1, Single), at(2, WaitStandby)]),
                Goals(vec![(1, WaitPrimary)]),
            ),
            (
                "the standby copies from wait_primary",
                group(vec![at(1, WaitPrimary), at(2, WaitStandby)]),
                Goals(vec![(2, Catchingup)]),
            ),
            (
                "a quorum standby joining a primary: apply_settings",
                group(vec![at(1, Primary), at(2, Secondary), at(3, WaitStandby)]),
                Goals(vec![(3, Catchingup), (1, ApplySettings)]),
            ),
            (
                "caught up: secondary",
                group(vec![at(1, WaitPrimary), at(2, Catchingup)]),
                Goals(vec![(2, Secondary)]),
            ),
            (
                "not on the primary's timeline: not caught up",
                group(vec![
                    NodeView {
                        tli: 2,
                        ..at(1, WaitPrimary)
                    },
                    at(2, Catchingup),
                ]),
                Nothing,
            ),
            (
                "too far behind: not caught up",
                group(vec![
                    at(1, WaitPrimary),
                    NodeView {
                        lsn: 0x1000,
                        ..at(2, Catchingup)
                    },
                ]),
                Nothing,
            ),
            (
                "a caught-up quorum standby: primary",
                group(vec![at(1, WaitPrimary), at(2, Secondary)]),
                Goals(vec![(1, Primary)]),
            ),
            (
                "apply_settings done: primary",
                group(vec![at(1, ApplySettings), at(2, Secondary)]),
                Goals(vec![(1, Primary)]),
            ),
            (
                "standby lost: catchingup and wait_primary",
                group(vec![at(1, Primary), dead(at(2, Secondary))]),
                Goals(vec![(2, Catchingup), (1, WaitPrimary)]),
            ),
            (
                "primary lost while synchronous: fail over",
                group(vec![dead(at(1, Primary)), at(2, Secondary)]),
                Goals(vec![(2, PreparePromotion), (1, Draining)]),
            ),
            (
                "primary's postgres down: fail over",
                group(vec![
                    NodeView {
                        pg_running: false,
                        ..at(1, Primary)
                    },
                    at(2, Secondary),
                ]),
                Goals(vec![(2, PreparePromotion), (1, Draining)]),
            ),
            (
                "standby still streams from the primary: hold",
                group(vec![
                    dead(at(1, Primary)),
                    NodeView {
                        upstream_streaming: true,
                        ..at(2, Secondary)
                    },
                ]),
                Held,
            ),
            (
                "standby heard the primary 2.9 s ago: hold",
                group(vec![
                    dead(at(1, Primary)),
                    NodeView {
                        upstream_streaming: true,
                        upstream_silence: Some(Duration::from_millis(2_900)),
                        ..at(2, Secondary)
                    },
                ]),
                Held,
            ),
            (
                "standby's receiver still connected but silent for 3 s: fail over",
                group(vec![
                    dead(at(1, Primary)),
                    NodeView {
                        upstream_streaming: true,
                        upstream_silence: Some(Duration::from_millis(3_000)),
                        ..at(2, Secondary)
                    },
                ]),
                Goals(vec![(2, PreparePromotion), (1, Draining)]),
            ),
            (
                "a primary stalled for 2 s (report 2.5 s old) is not failed over, even with a silent standby",
                group(vec![
                    NodeView {
                        report_age: Some(Duration::from_millis(2_500)),
                        health: Health::Bad,
                        ..at(1, Primary)
                    },
                    NodeView {
                        upstream_streaming: true,
                        upstream_silence: Some(Duration::from_millis(3_500)),
                        ..at(2, Secondary)
                    },
                ]),
                Nothing,
            ),
            (
                "candidate's receiver silent but not gone: not promoted yet",
                group(vec![
                    dead(node(1, Primary, Draining)),
                    NodeView {
                        upstream_streaming: true,
                        upstream_silence: Some(Duration::from_secs(10)),
                        ..at(2, PreparePromotion)
                    },
                ]),
                Nothing,
            ),
            (
                "primary lost before it turned synchronous: hold",
                group(vec![dead(node(1, WaitPrimary, Primary)), at(2, Secondary)]),
                Held,
            ),
            (
                "standby outside the quorum: hold",
                group(vec![
                    dead(at(1, Primary)),
                    NodeView {
                        replication_quorum: false,
                        ..at(2, Secondary)
                    },
                ]),
                Held,
            ),
            (
                "candidate priority 0: hold",
                group(vec![
                    dead(at(1, Primary)),
                    NodeView {
                        candidate_priority: 0,
                        ..at(2, Secondary)
                    },
                ]),
                Held,
            ),
            (
                "standby too far behind: hold",
                group(vec![
                    dead(at(1, Primary)),
                    NodeView {
                        lsn: 0x100,
                        ..at(2, Secondary)
                    },
                ]),
                Held,
            ),
            (
                "keeper gone but postgres answers: no failover",
                group(vec![
                    NodeView {
                        report_age: STALE,
                        ..at(1, Primary)
                    },
                    at(2, Secondary),
                ]),
                Nothing,
            ),
            ("monitor just started: no failover", startup, Nothing),
            (
                "switchover: the old primary stopped, promote",
                group(vec![at(1, Draining), at(2, Secondary)]),
                Goals(vec![(2, PreparePromotion)]),
            ),
            (
                "old primary confirmed: promote",
                group(vec![at(1, Draining), at(2, PreparePromotion)]),
                Goals(vec![(2, WaitPrimary), (1, Demoted)]),
            ),
            (
                "old primary unreachable, was synchronous: promote",
                group(vec![
                    dead(node(1, Primary, Draining)),
                    at(2, PreparePromotion),
                ]),
                Goals(vec![(2, WaitPrimary), (1, Demoted)]),
            ),
            (
                "old primary alive and still draining: wait",
                group(vec![node(1, Primary, Draining), at(2, PreparePromotion)]),
                Nothing,
            ),
            (
                "primary stopped for maintenance: promote",
                group(vec![at(1, PrepareMaintenance), at(2, PreparePromotion)]),
                Goals(vec![(2, WaitPrimary), (1, Maintenance)]),
            ),
            (
                "demoted old primary rejoins",
                group(vec![at(1, Demoted), at(2, WaitPrimary)]),
                Goals(vec![(1, Catchingup)]),
            ),
            (
                "demoted waits for the new primary to run",
                group(vec![at(1, Demoted), node(2, PreparePromotion, WaitPrimary)]),
                Nothing,
            ),
            (
                "standby maintenance once async",
                group(vec![at(1, WaitPrimary), at(2, WaitMaintenance)]),
                Goals(vec![(2, Maintenance)]),
            ),
            (
                "maintenance is left alone",
                group(vec![at(1, WaitPrimary), at(2, Maintenance)]),
                Nothing,
            ),
            (
                "a dropped node is removed",
                group(vec![at(1, Primary), at(2, Dropped)]),
                Removed(2),
            ),
            (
                "a second quorum standby joining raises number_sync_standbys",
                group(vec![at(1, Primary), at(2, Secondary), at(3, Init)]),
                SyncStandbys(1),
            ),
            (
                "three nodes: primary lost, the standbys report their LSN",
                GroupView {
                    number_sync_standbys: 1,
                    ..group(vec![
                        dead(at(1, Primary)),
                        at(2, Secondary),
                        at(3, Secondary),
                    ])
                },
                Goals(vec![(2, ReportLsn), (3, ReportLsn), (1, Draining)]),
            ),
            (
                "three nodes: a standby still streams from the primary",
                GroupView {
                    number_sync_standbys: 1,
                    ..group(vec![
                        dead(at(1, Primary)),
                        at(2, Secondary),
                        NodeView {
                            upstream_streaming: true,
                            ..at(3, Secondary)
                        },
                    ])
                },
                Held,
            ),
            (
                "three nodes: a standby heard the primary 1 s ago",
                GroupView {
                    number_sync_standbys: 1,
                    ..group(vec![
                        dead(at(1, Primary)),
                        at(2, Secondary),
                        NodeView {
                            upstream_streaming: true,
                            upstream_silence: Some(Duration::from_secs(1)),
                            ..at(3, Secondary)
                        },
                    ])
                },
                Held,
            ),
            (
                "three nodes: every standby silent for 3 s, elect",
                GroupView {
                    number_sync_standbys: 1,
                    ..group(vec![
                        dead(at(1, Primary)),
                        NodeView {
                            upstream_streaming: true,
                            upstream_silence: Some(Duration::from_millis(3_200)),
                            ..at(2, Secondary)
                        },
                        NodeView {
                            upstream_streaming: true,
                            upstream_silence: Some(Duration::from_millis(3_000)),
                            ..at(3, Secondary)
                        },
                    ])
                },
                Goals(vec![(2, ReportLsn), (3, ReportLsn), (1, Draining)]),
            ),
            (
                "three nodes: switchover, the primary stopped, elect",
                GroupView {
                    number_sync_standbys: 1,
                    ..group(vec![at(1, Draining), at(2, Secondary), at(3, Secondary)])
                },
                Goals(vec![(2, ReportLsn), (3, ReportLsn)]),
            ),
            (
                "election: highest priority wins",
                GroupView {
                    number_sync_standbys: 1,
                    ..group(vec![
                        dead(node(1, Primary, Draining)),
                        at(2, ReportLsn),
                        NodeView {
                            candidate_priority: 90,
                            ..at(3, ReportLsn)
                        },
                    ])
                },
                Goals(vec![(3, PreparePromotion)]),
            ),
            (
                "election: equal priority, the most advanced wins",
                GroupView {
                    number_sync_standbys: 1,
                    ..group(vec![
                        dead(node(1, Primary, Draining)),
                        at(2, ReportLsn),
                        NodeView {
                            lsn: 0x3000100,
                            ..at(3, ReportLsn)
                        },
                    ])
                },
                Goals(vec![(3, PreparePromotion)]),
            ),
            (
                "election: a lagging winner fast-forwards first",
                GroupView {
                    number_sync_standbys: 1,
                    ..group(vec![
                        dead(node(1, Primary, Draining)),
                        at(2, ReportLsn),
                        NodeView {
                            candidate_priority: 90,
                            lsn: 0x2000000,
                            ..at(3, ReportLsn)
                        },
                    ])
                },
                Goals(vec![(3, FastForward)]),
            ),
            (
                "election: priority 0 is never promoted",
                GroupView {
                    number_sync_standbys: 1,
                    ..group(vec![
                        dead(node(1, Primary, Draining)),
                        NodeView {
                            candidate_priority: 0,
                            lsn: 0x3000100,
                            ..at(2, ReportLsn)
                        },
                        at(3, ReportLsn),
                    ])
                },
                Goals(vec![(3, FastForward)]),
            ),
            (
                "election: nobody with a priority",
                GroupView {
                    number_sync_standbys: 1,
                    ..group(vec![
                        dead(node(1, Primary, Draining)),
                        NodeView {
                            candidate_priority: 0,
                            ..at(2, ReportLsn)
                        },
                        NodeView {
                            candidate_priority: 0,
                            ..at(3, ReportLsn)
                        },
                    ])
                },
                Held,
            ),
            (
                "election: waits for a healthy standby still detaching",
                GroupView {
                    number_sync_standbys: 1,
                    ..group(vec![
                        dead(node(1, Primary, Draining)),
                        at(2, ReportLsn),
                        node(3, Secondary, ReportLsn),
                    ])
                },
                Nothing,
            ),
            (
                "election: too few quorum standbys reported",
                GroupView {
                    number_sync_standbys: 1,
                    ..group(vec![
                        dead(node(1, Primary, Draining)),
                        at(2, ReportLsn),
                        dead(at(3, Secondary)),
                        dead(at(4, Secondary)),
                    ])
                },
                Held,
            ),
            (
                "election: a quorum standby that comes back joins it",
                GroupView {
                    number_sync_standbys: 1,
                    ..group(vec![
                        dead(node(1, Primary, Draining)),
                        at(2, ReportLsn),
                        NodeView {
                            pg_running: false,
                            ..node(3, Secondary, Catchingup)
                        },
                    ])
                },
                Goals(vec![(3, ReportLsn)]),
            ),
            (
                "election: the most advanced standby is too far behind",
                GroupView {
                    number_sync_standbys: 1,
                    ..group(vec![
                        dead(NodeView {
                            lsn: 0x9000000,
                            ..node(1, Primary, Draining)
                        }),
                        at(2, ReportLsn),
                        at(3, ReportLsn),
                    ])
                },
                Held,
            ),
            (
                "fast-forwarded: prepare promotion",
                GroupView {
                    number_sync_standbys: 1,
                    ..group(vec![
                        dead(node(1, Primary, Draining)),
                        at(2, ReportLsn),
                        at(3, FastForward),
                    ])
                },
                Goals(vec![(3, PreparePromotion)]),
            ),
            (
                "three nodes: the winner promoted without the old primary",
                GroupView {
                    number_sync_standbys: 1,
                    ..group(vec![
                        dead(node(1, Primary, Draining)),
                        at(2, ReportLsn),
                        at(3, PreparePromotion),
                    ])
                },
                Goals(vec![(3, WaitPrimary), (1, Demoted)]),
            ),
            (
                "the losers follow the new primary",
                GroupView {
                    number_sync_standbys: 1,
                    ..group(vec![
                        dead(node(1, Primary, Demoted)),
                        at(2, ReportLsn),
                        at(3, WaitPrimary),
                    ])
                },
                Goals(vec![(2, Catchingup)]),
            ),
            (
                "a node being dropped no longer counts: the primary serves alone",
                group(vec![at(1, Primary), node(2, Secondary, Dropped)]),
                Goals(vec![(1, Single)]),
            ),
            (
                "a standby in recovery on the primary's timeline is trusted",
                group(vec![at(1, Primary), on_tli(standby(at(2, Secondary)), 1)]),
                Nothing,
            ),
            (
                "a secondary out of recovery diverged: back to catchingup",
                group(vec![at(1, Primary), promoted(at(2, Secondary))]),
                Goals(vec![(2, Catchingup)]),
            ),
            (
                "a secondary out of recovery diverged, even with the primary down",
                group(vec![dead(at(1, Primary)), promoted(at(2, Secondary))]),
                Goals(vec![(2, Catchingup)]),
            ),
            (
                "a secondary on a timeline after the primary's diverged",
                group(vec![
                    on_tli(at(1, Primary), 2),
                    on_tli(standby(at(2, Secondary)), 3),
                ]),
                Goals(vec![(2, Catchingup)]),
            ),
            (
                "a secondary behind the primary's timeline switch is not diverged",
                group(vec![
                    on_tli(at(1, Primary), 3),
                    on_tli(standby(at(2, Secondary)), 2),
                ]),
                Nothing,
            ),
            (
                "a diverged node already catching up: held while its keeper rewinds it",
                group(vec![at(1, WaitPrimary), promoted(at(2, Catchingup))]),
                Held,
            ),
            (
                "a diverged catchingup node does not become secondary",
                group(vec![
                    at(1, WaitPrimary),
                    on_tli(promoted(at(2, Catchingup)), 1),
                ]),
                Held,
            ),
            (
                "a diverged secondary goes before a failover to it",
                group(vec![
                    dead(at(1, Primary)),
                    on_tli(promoted(at(2, Secondary)), 2),
                ]),
                Goals(vec![(2, Catchingup)]),
            ),
            (
                "a diverged secondary sent to catchingup stays marked: held",
                group(vec![
                    at(1, WaitPrimary),
                    promoted(node(2, Secondary, Catchingup)),
                ]),
                Held,
            ),
            (
                "a node being promoted is not diverged",
                group(vec![
                    dead(node(1, Primary, Draining)),
                    promoted(node(2, PreparePromotion, StopReplication)),
                ]),
                Nothing,
            ),
            (
                "a stopped standby's last word is not a divergence",
                group(vec![at(1, WaitPrimary), {
                    let mut n = promoted(at(2, Catchingup));
                    n.pg_running = false;
                    n
                }]),
                Nothing,
            ),
        ];
        for (name, view, expected) in rows {
            assert_eq!(outcome(&view), expected, "rule: {name}");
        }
    }

    #[test]
    fn switchover_waits_for_routers_to_drain() {
        let mut view = group(vec![at(1, Primary), at(2, Secondary)]);
        view.switchover = Some(SwitchoverDrain {
            age: Duration::from_secs(1),
            routers_pending: 1,
        });
        assert_eq!(
            outcome(&view),
            Outcome::Nothing,
            "a router has not drained yet"
        );
        view.switchover = Some(SwitchoverDrain {
            age: Duration::from_secs(1),
            routers_pending: 0,
        });
        assert_eq!(outcome(&view), Outcome::Goals(vec![(1, Draining)]));
        view.switchover = Some(SwitchoverDrain {
            age: Duration::from_secs(60),
            routers_pending: 1,
        });
        assert_eq!(
            outcome(&view),
            Outcome::Goals(vec![(1, Draining)]),
            "drain timeout"
        );
    }

    #[test]
    fn holds_say_why() {
        let view = group(vec![dead(node(1, WaitPrimary, Primary)), at(2, Secondary)]);
        let Some(Decision::Hold(reason)) = decide(&view) else {
            panic!("expected a hold");
        };
        assert!(reason.contains("acknowledged writes"), "{reason}");
    }

    /// One row per operator request, accepted or refused.
    #[test]
    fn requests_table() {
        let healthy = group(vec![at(1, Primary), at(2, Secondary)]);
        let goals = |r: Result<Vec<Assignment>, String>| {
            r.map(|a| a.iter().map(|a| (a.node_id, a.goal)).collect::<Vec<_>>())
        };
        assert_eq!(goals(on_request(&healthy, Request::Switchover)), Ok(vec![]));
        assert!(on_request(&group(vec![at(1, Single)]), Request::Switchover)
            .expect_err("no standby")
            .contains("no healthy secondary"));
        assert!(on_request(
            &group(vec![at(1, WaitPrimary), at(2, Secondary)]),
            Request::Switchover
        )
        .expect_err("async")
        .contains("synchronously"));
        assert!(on_request(
            &group(vec![at(1, Primary), dead(at(2, Secondary))]),
            Request::Switchover
        )
        .is_err());
        assert_eq!(
            goals(on_request(&healthy, Request::EnableMaintenance(2))),
            Ok(vec![(2, WaitMaintenance), (1, WaitPrimary)])
        );
        assert_eq!(
            goals(on_request(&healthy, Request::EnableMaintenance(1))),
            Ok(vec![(1, PrepareMaintenance)])
        );
        assert!(on_request(
            &group(vec![at(1, Primary), at(2, Catchingup)]),
            Request::EnableMaintenance(1)
        )
        .expect_err("no standby to take over")
        .contains("no healthy secondary"));
        assert_eq!(
            goals(on_request(
                &group(vec![at(1, WaitPrimary), at(2, Maintenance)]),
                Request::DisableMaintenance(2)
            )),
            Ok(vec![(2, Catchingup)])
        );
        assert!(on_request(&healthy, Request::DisableMaintenance(2)).is_err());
        assert_eq!(
            goals(on_request(&healthy, Request::Drop(2))),
            Ok(vec![(2, Dropped)])
        );
        assert!(on_request(&healthy, Request::Drop(1))
            .expect_err("the primary")
            .contains("perform switchover"));
        assert_eq!(
            goals(on_request(&group(vec![at(1, Single)]), Request::Drop(1))),
            Ok(vec![(1, Dropped)])
        );
    }

    #[test]
    fn synchronous_standby_names_follow_the_primary_state() {
        let view = group(vec![at(1, Primary), at(2, Secondary)]);
        assert_eq!(
            synchronous_standby_names(&view, 1),
            "ANY 1 (pgautofailover_standby_2)"
        );
        let view = group(vec![at(1, WaitPrimary), at(2, Secondary)]);
        assert_eq!(synchronous_standby_names(&view, 1), "");
        let view = group(vec![at(1, Primary), at(2, Catchingup)]);
        assert_eq!(synchronous_standby_names(&view, 1), "");
    }
}
