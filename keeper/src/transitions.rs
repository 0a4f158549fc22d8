//! The keeper's transition table: a pure function from (current state, goal
//! state) to the local action that reaches the goal. The executor in
//! [`crate::keeper`] carries the actions out; every action is idempotent, so a
//! keeper killed in the middle simply runs it again.

use hapg_monitor::NodeState;

/// A local step that moves a node from one state to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing to do locally: record the new state.
    Record,
    /// initdb (if needed), configure, start, create roles and the database.
    InitPrimary,
    /// pg_basebackup from the primary with its replication slot, then start streaming.
    InitStandby,
    /// Become a standby of the current primary: stream if its WAL is a prefix
    /// of the primary's history, else pg_rewind, falling back to a fresh
    /// pg_basebackup ([`crate::rejoin::plan`] decides).
    RewindOrInit,
    /// Cut the WAL receiver and wait until it is gone, so the LSN stays put.
    DetachFromPrimary,
    /// Fetch missing WAL from the election's most advanced standby, then detach.
    FastForward,
    /// Promote the standby; with `read_only`, keep it from taking writes.
    Promote {
        /// Hold writes off with `default_transaction_read_only`.
        read_only: bool,
    },
    /// Serve alone: start if needed, promote if a standby, no synchronous replication.
    BecomeSingle,
    /// Lift `default_transaction_read_only` after a held promotion.
    SetReadWrite,
    /// Apply the monitor's `synchronous_standby_names` and wait until a quorum
    /// standby has flushed everything committed so far.
    EnableSyncRep,
    /// Clear `synchronous_standby_names`.
    DisableSyncRep,
    /// Re-apply the monitor's settings.
    ApplySettings,
    /// Stop Postgres (fast shutdown) and keep it stopped.
    StopPostgres,
    /// CHECKPOINT, then stop Postgres.
    CheckpointAndStop,
    /// Stop, and set the data directory up as a standby with no upstream.
    StopAsStandby,
    /// Start Postgres again as a primary (a fence lifted after a false alarm).
    StartAsPrimary,
    /// Leave Postgres to the operator: the keeper stops supervising it.
    StartMaintenance,
}

/// The action from `current` to `goal`, or `None` when the keeper has no edge
/// (the caller treats `current == goal` as "keep the current state").
pub fn transition(current: NodeState, goal: NodeState) -> Option<Action> {
    use NodeState::*;
    if current == goal {
        return None;
    }
    let primary_like = matches!(
        current,
        Single | Primary | WaitPrimary | ApplySettings | JoinPrimary
    );
    let standby_like = matches!(
        current,
        Secondary
            | Catchingup
            | PreparePromotion
            | StopReplication
            | ReportLsn
            | FastForward
            | JoinSecondary
            | WaitMaintenance
    );
    let fenced = matches!(current, Draining | DemoteTimeout | Demoted);
    let action = match goal {
        Init | JoinPrimary | JoinSecondary => return None,
        ReportLsn => match current {
            Secondary | Catchingup | PreparePromotion | FastForward | JoinSecondary
            | WaitMaintenance => Action::DetachFromPrimary,
            _ => return None,
        },
        FastForward => match current {
            ReportLsn => Action::FastForward,
            _ => return None,
        },
        Single => match current {
            Init => Action::InitPrimary,
            _ => Action::BecomeSingle,
        },
        WaitPrimary => match current {
            Single | Primary | ApplySettings | JoinPrimary => Action::DisableSyncRep,
            PreparePromotion | Secondary | Catchingup | ReportLsn | FastForward => {
                Action::Promote { read_only: false }
            }
            StopReplication => Action::SetReadWrite,
            Draining | DemoteTimeout => Action::StartAsPrimary,
            _ => return None,
        },
        Primary => match current {
            WaitPrimary | ApplySettings | JoinPrimary | Single => Action::EnableSyncRep,
            Draining | DemoteTimeout => Action::StartAsPrimary,
            _ => return None,
        },
        ApplySettings if primary_like => Action::ApplySettings,
        ApplySettings => return None,
        Draining | DemoteTimeout | Demoted | Dropped => Action::StopPostgres,
        Catchingup => match current {
            Init | WaitStandby => Action::InitStandby,
            _ if primary_like || standby_like || fenced => Action::RewindOrInit,
            Maintenance | PrepareMaintenance | Dropped => Action::RewindOrInit,
            _ => return None,
        },
        Secondary => match current {
            Catchingup => Action::Record,
            ReportLsn | JoinSecondary => Action::RewindOrInit,
            _ => return None,
        },
        PreparePromotion => match current {
            Secondary | Catchingup | ReportLsn => Action::DetachFromPrimary,
            FastForward => Action::Record,
            _ => return None,
        },
        StopReplication => match current {
            PreparePromotion => Action::Promote { read_only: true },
            _ => return None,
        },
        WaitStandby => match current {
            Init => Action::Record,
            _ => return None,
        },
        Maintenance => match current {
            Secondary | Catchingup | WaitMaintenance => Action::StartMaintenance,
            PrepareMaintenance | Primary | WaitPrimary | ApplySettings => Action::StopAsStandby,
            _ => return None,
        },
        PrepareMaintenance => match current {
            Primary | WaitPrimary | ApplySettings | JoinPrimary => Action::CheckpointAndStop,
            _ => return None,
        },
        WaitMaintenance => match current {
            Secondary | Catchingup => Action::Record,
            _ => return None,
        },
    };
    Some(action)
}

/// Whether Postgres should be running in a state the keeper has reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expectation {
    /// Running and writable.
    RunningPrimary,
    /// Running in recovery.
    RunningStandby,
    /// Stopped.
    Stopped,
    /// Not the keeper's business (maintenance, or nothing set up yet).
    Unmanaged,
}

/// What the keeper enforces while it stays in `state`.
pub fn expectation(state: NodeState) -> Expectation {
    use NodeState::*;
    match state {
        Single | Primary | WaitPrimary | ApplySettings | JoinPrimary | StopReplication => {
            Expectation::RunningPrimary
        }
        Secondary | Catchingup | PreparePromotion | ReportLsn | FastForward | WaitMaintenance => {
            Expectation::RunningStandby
        }
        Draining | DemoteTimeout | Demoted | Dropped | PrepareMaintenance | JoinSecondary => {
            Expectation::Stopped
        }
        Init | WaitStandby | Maintenance => Expectation::Unmanaged,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use NodeState::*;

    /// One row per edge the two-node tutorial walks through.
    #[test]
    fn table_of_edges() {
        let rows: &[(NodeState, NodeState, Option<Action>)] = &[
            (Init, Single, Some(Action::InitPrimary)),
            (Init, WaitStandby, Some(Action::Record)),
            (Single, WaitPrimary, Some(Action::DisableSyncRep)),
            (WaitStandby, Catchingup, Some(Action::InitStandby)),
            (Catchingup, Secondary, Some(Action::Record)),
            (WaitPrimary, Primary, Some(Action::EnableSyncRep)),
            (Primary, WaitPrimary, Some(Action::DisableSyncRep)),
            (Primary, Draining, Some(Action::StopPostgres)),
            (Secondary, PreparePromotion, Some(Action::DetachFromPrimary)),
            (
                PreparePromotion,
                WaitPrimary,
                Some(Action::Promote { read_only: false }),
            ),
            (Draining, Demoted, Some(Action::StopPostgres)),
            (Primary, Demoted, Some(Action::StopPostgres)),
            (Demoted, Catchingup, Some(Action::RewindOrInit)),
            (Secondary, WaitMaintenance, Some(Action::Record)),
            (WaitMaintenance, Maintenance, Some(Action::StartMaintenance)),
            (Maintenance, Catchingup, Some(Action::RewindOrInit)),
            (Primary, PrepareMaintenance, Some(Action::CheckpointAndStop)),
            (PrepareMaintenance, Maintenance, Some(Action::StopAsStandby)),
            (Secondary, Single, Some(Action::BecomeSingle)),
            (Secondary, Dropped, Some(Action::StopPostgres)),
            (Primary, ApplySettings, Some(Action::ApplySettings)),
            (ApplySettings, Primary, Some(Action::EnableSyncRep)),
            (DemoteTimeout, Primary, Some(Action::StartAsPrimary)),
            (Primary, Primary, None),
            (Demoted, Secondary, None),
        ];
        for (current, goal, expected) in rows {
            assert_eq!(
                transition(*current, *goal),
                *expected,
                "{current} -> {goal}"
            );
        }
    }

    #[test]
    fn fenced_states_stop_postgres() {
        for state in [Draining, DemoteTimeout, Demoted, Dropped] {
            assert_eq!(expectation(state), Expectation::Stopped);
        }
    }
}

/// Every (reported state, goal) pair the monitor's state machine can assign to a
/// node of a one- or two-node group has a keeper transition: the monitor never
/// assigns a goal the keeper does not know how to reach.
#[cfg(test)]
mod reachability {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use hapg_monitor::fsm::{self, Decision, GroupView, NodeView, Request, Thresholds};
    use hapg_monitor::{Health, NodeState};

    use super::transition;

    fn node(id: i64, reported: NodeState, goal: NodeState, alive: bool) -> NodeView {
        NodeView {
            id,
            name: format!("node_{id}"),
            reported,
            goal,
            pg_running: alive,
            tli: 1,
            lsn: 0x3000000,
            upstream_streaming: false,
            in_recovery: None,
            upstream_silence: None,
            health: if alive { Health::Good } else { Health::Bad },
            report_age: Some(if alive {
                Duration::from_millis(100)
            } else {
                Duration::from_secs(60)
            }),
            candidate_priority: 50,
            replication_quorum: true,
        }
    }

    /// A node last heard from `age` ago, its health checks failing or not.
    fn aged(
        id: i64,
        reported: NodeState,
        goal: NodeState,
        age: Duration,
        healthy: bool,
    ) -> NodeView {
        NodeView {
            health: if healthy { Health::Good } else { Health::Bad },
            report_age: Some(age),
            pg_running: healthy,
            ..node(id, reported, goal, true)
        }
    }

    /// Writable goals after `goals` are applied to `view`.
    fn writable_after(view: &GroupView, goals: &[(i64, NodeState)]) -> usize {
        view.nodes
            .iter()
            .map(|n| {
                goals
                    .iter()
                    .find(|(id, _)| *id == n.id)
                    .map_or(n.goal, |(_, g)| *g)
            })
            .filter(|g| g.can_take_writes())
            .count()
    }

    /// No decision and no accepted request ever leaves two nodes of a group
    /// with a writable goal, whatever the states, with the report ages on
    /// both sides of the unhealthy timeout (3 s: a 2 s stall leaves a report
    /// at most 2.5 s old) and a failing or passing health check.
    #[test]
    fn no_group_ever_gets_two_writable_goals() {
        let states = NodeState::ALL;
        let ages = [
            (Duration::from_millis(100), true),
            (Duration::from_millis(2_900), false),
            (Duration::from_millis(3_100), false),
            (Duration::from_millis(3_100), true),
            (Duration::from_secs(60), false),
        ];
        // One node fresh, the other at each age (both ways round).
        let fresh = ages[0];
        let pairs = ages
            .iter()
            .map(|a| (fresh, *a))
            .chain(ages[1..].iter().map(|a| (*a, fresh)));
        let mut checked = 0_usize;
        for ((age1, healthy1), (age2, healthy2)) in pairs {
            {
                for r1 in states {
                    for g1 in states {
                        for r2 in states {
                            for g2 in states {
                                let view = GroupView {
                                    nodes: vec![
                                        aged(1, r1, g1, age1, healthy1),
                                        aged(2, r2, g2, age2, healthy2),
                                    ],
                                    number_sync_standbys: 0,
                                    monitor_uptime: Duration::from_secs(3600),
                                    thresholds: Thresholds::default(),
                                    switchover: None,
                                    preferred_candidate: None,
                                };
                                if writable_after(&view, &[]) > 1 {
                                    continue;
                                }
                                let mut outcomes = Vec::new();
                                if let Some(Decision::Assign(a)) = fsm::decide(&view) {
                                    outcomes.push(a);
                                }
                                if let Ok(a) = fsm::on_request(&view, Request::Switchover) {
                                    outcomes.push(a);
                                }
                                for assignments in outcomes {
                                    let goals: Vec<(i64, NodeState)> =
                                        assignments.iter().map(|a| (a.node_id, a.goal)).collect();
                                    checked += 1;
                                    assert!(
                                        writable_after(&view, &goals) <= 1,
                                        "two writable goals: {goals:?} applied to {view:#?}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
        assert!(checked > 1_000, "too few decisions checked: {checked}");
    }

    fn record(
        view: &GroupView,
        goals: &[(i64, NodeState)],
        seen: &mut BTreeSet<(NodeState, NodeState)>,
    ) {
        for (id, goal) in goals {
            let Some(n) = view.nodes.iter().find(|n| n.id == *id) else {
                continue;
            };
            if n.reported != *goal {
                seen.insert((n.reported, *goal));
            }
        }
    }

    #[test]
    fn every_assignable_pair_has_a_transition() {
        let mut seen = BTreeSet::new();
        let states = NodeState::ALL;
        let views = |alive1: bool, alive2: bool| {
            let mut out = Vec::new();
            for r1 in states {
                for g1 in states {
                    out.push(GroupView {
                        nodes: vec![node(1, r1, g1, alive1)],
                        number_sync_standbys: 0,
                        monitor_uptime: Duration::from_secs(3600),
                        thresholds: Thresholds::default(),
                        switchover: None,
                        preferred_candidate: None,
                    });
                    for r2 in states {
                        for g2 in states {
                            out.push(GroupView {
                                nodes: vec![node(1, r1, g1, alive1), node(2, r2, g2, alive2)],
                                number_sync_standbys: 0,
                                monitor_uptime: Duration::from_secs(3600),
                                thresholds: Thresholds::default(),
                                switchover: None,
                                preferred_candidate: None,
                            });
                        }
                    }
                }
            }
            out
        };
        for (alive1, alive2) in [(true, true), (false, true), (true, false)] {
            for view in views(alive1, alive2) {
                if let Some(Decision::Assign(assignments)) = fsm::decide(&view) {
                    let goals: Vec<(i64, NodeState)> =
                        assignments.iter().map(|a| (a.node_id, a.goal)).collect();
                    record(&view, &goals, &mut seen);
                }
                for request in [
                    Request::Switchover,
                    Request::EnableMaintenance(1),
                    Request::EnableMaintenance(2),
                    Request::DisableMaintenance(1),
                    Request::DisableMaintenance(2),
                    Request::Drop(1),
                    Request::Drop(2),
                ] {
                    if let Ok(assignments) = fsm::on_request(&view, request) {
                        let goals: Vec<(i64, NodeState)> =
                            assignments.iter().map(|a| (a.node_id, a.goal)).collect();
                        record(&view, &goals, &mut seen);
                    }
                }
            }
        }
        // Three-node groups: every node in a converged state or in a pair found
        // above, with number_sync_standbys 1 (elections, fast-forward).
        let mut pairs: Vec<(NodeState, NodeState)> = seen.iter().copied().collect();
        pairs.extend(states.iter().map(|s| (*s, *s)));
        for alive in [[true, true, true], [false, true, true], [true, false, true]] {
            for p1 in &pairs {
                for p2 in &pairs {
                    for p3 in &pairs {
                        let view = GroupView {
                            nodes: vec![
                                node(1, p1.0, p1.1, alive[0]),
                                node(2, p2.0, p2.1, alive[1]),
                                NodeView {
                                    lsn: 0x2000000,
                                    candidate_priority: 90,
                                    ..node(3, p3.0, p3.1, alive[2])
                                },
                            ],
                            number_sync_standbys: 1,
                            monitor_uptime: Duration::from_secs(3600),
                            thresholds: Thresholds::default(),
                            switchover: None,
                            preferred_candidate: None,
                        };
                        if let Some(Decision::Assign(assignments)) = fsm::decide(&view) {
                            let goals: Vec<(i64, NodeState)> =
                                assignments.iter().map(|a| (a.node_id, a.goal)).collect();
                            record(&view, &goals, &mut seen);
                        }
                    }
                }
            }
        }
        let missing: Vec<String> = seen
            .iter()
            .filter(|(from, to)| transition(*from, *to).is_none())
            .map(|(from, to)| format!("{from} -> {to}"))
            .collect();
        assert!(
            seen.len() > 20,
            "the enumeration found too few pairs: {seen:?}"
        );
        assert!(missing.is_empty(), "no keeper transition for: {missing:#?}");
    }
}
