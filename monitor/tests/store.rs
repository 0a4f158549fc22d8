//! The store boundary against a real monitor database: conditioned writes
//! (two writers racing on the same decision: exactly one applies), requests
//! answered once, reports and the change feed. The suite takes
//! `&mut dyn MonitorStore` connections so that every backend runs it.

mod support;

use std::time::Duration;

use hapg_monitor::client::{NodeReport, Registration, RequestKind};
use hapg_monitor::fsm::{Assignment, Setting};
use hapg_monitor::store::{
    ChangeFeed, Channel, GroupWrite, NewRequest, RequestAnswer, RequestStatus, RouterRegistration,
    Written,
};
use hapg_monitor::{MonitorStore, NodeState};
use support::{Etcd, PgMonitor};

const FORMATION: &str = "default";

async fn register(store: &dyn MonitorStore, name: &str, port: u16) -> (i64, i32) {
    let registered = store
        .register(&Registration {
            formation: FORMATION.to_string(),
            name: name.to_string(),
            host: "127.0.0.1".to_string(),
            port,
            dbname: "postgres".to_string(),
            candidate_priority: 50,
            replication_quorum: true,
        })
        .await
        .expect("register");
    (registered.node_id, registered.group_id)
}

fn goal(node_id: i64, goal: NodeState, reason: String) -> Assignment {
    Assignment {
        node_id,
        goal,
        reason,
    }
}

/// The report of a running, writable single node (timeline 1), as a keeper
/// sends it before the monitor assigned it any goal.
fn single_report(node_id: i64) -> NodeReport {
    NodeReport {
        node_id,
        state: NodeState::Single,
        pg_running: true,
        tli: 1,
        lsn: 0x0300_0000,
        rep_state: String::new(),
        upstream_streaming: false,
        in_recovery: Some(false),
        upstream_silence: None,
    }
}

/// How many of the formation's events contain `marker`.
async fn events_with(store: &dyn MonitorStore, marker: &str) -> usize {
    store
        .events(FORMATION, 10_000)
        .await
        .expect("events")
        .iter()
        .filter(|e| e.description.contains(marker))
        .count()
}

/// Two writers read the same group and decide differently (each makes a
/// different node the one writable node); both write at once, conditioned on
/// what they read. Exactly one decision applies, whole: its goals, its events
/// and at most one new epoch; the other writer is told its read is stale.
async fn racing_writers_apply_one_decision(a: &mut dyn MonitorStore, b: &mut dyn MonitorStore) {
    let (n1, group) = register(a, "race_1", 15001).await;
    let (n2, _) = register(a, "race_2", 15002).await;
    for round in 0..10 {
        let read_a = a.group_snapshot(FORMATION, group).await.expect("read a");
        let read_b = b.group_snapshot(FORMATION, group).await.expect("read b");
        assert_eq!(read_a.version, read_b.version, "both read the same group");
        let epoch_before = read_a.version.primary_epoch;
        let decision = |winner: i64, loser: i64, who: &str| GroupWrite::Assign {
            assignments: vec![
                goal(
                    winner,
                    NodeState::Single,
                    format!("round {round}: {who} promotes"),
                ),
                goal(
                    loser,
                    NodeState::Demoted,
                    format!("round {round}: {who} demotes"),
                ),
            ],
            end_drain: false,
        };
        let (wa, wb) = tokio::join!(
            a.apply(
                FORMATION,
                group,
                &read_a.version,
                decision(n1, n2, "writer a")
            ),
            b.apply(
                FORMATION,
                group,
                &read_b.version,
                decision(n2, n1, "writer b")
            ),
        );
        let (wa, wb) = (wa.expect("writer a"), wb.expect("writer b"));
        let applied = [wa, wb].iter().filter(|w| **w == Written::Applied).count();
        assert_eq!(
            applied, 1,
            "round {round}: exactly one writer applies ({wa:?}, {wb:?})"
        );
        let (winner, who) = if wa == Written::Applied {
            (n1, "writer a")
        } else {
            (n2, "writer b")
        };
        let after = a
            .group_snapshot(FORMATION, group)
            .await
            .expect("read after");
        let writable: Vec<i64> = after
            .nodes
            .iter()
            .filter(|n| n.goal.can_take_writes())
            .map(|n| n.node_id)
            .collect();
        assert_eq!(
            writable,
            vec![winner],
            "round {round}: one writable node, the winner's"
        );
        assert_eq!(after.version.primary_node_id, Some(winner));
        let new_epochs = after.version.primary_epoch - epoch_before;
        let changed_primary = read_a.version.primary_node_id != Some(winner);
        assert_eq!(
            new_epochs,
            i64::from(changed_primary),
            "round {round}: one epoch per new primary"
        );
        assert_eq!(
            events_with(a, &format!("round {round}: ")).await,
            2,
            "round {round}: the winner's two events only"
        );
        assert_eq!(events_with(a, &format!("round {round}: {who}")).await, 2);
    }
}

/// A request is answered once, by one of two services answering at once;
/// a decision read before a setting changed is refused.
async fn requests_are_answered_once(a: &mut dyn MonitorStore, b: &mut dyn MonitorStore) {
    let (n1, group) = register(a, "req_1", 15011).await;
    let id = a
        .file_request(&NewRequest {
            formation: FORMATION.to_string(),
            group_id: group,
            node_id: Some(n1),
            kind: RequestKind::SetCandidatePriority,
            value: Some("10".to_string()),
        })
        .await
        .expect("file");
    assert_eq!(
        a.request_status(id).await.expect("status"),
        RequestStatus::Pending
    );
    let pending_a = a.pending_requests().await.expect("pending a");
    let pending_b = b.pending_requests().await.expect("pending b");
    let request_a = pending_a
        .iter()
        .find(|r| r.id == id)
        .expect("a sees it")
        .clone();
    let request_b = pending_b
        .iter()
        .find(|r| r.id == id)
        .expect("b sees it")
        .clone();
    let read = a.group_snapshot(FORMATION, group).await.expect("read");
    let (wa, wb) = tokio::join!(
        a.answer_request(
            &request_a,
            Some(&read.version),
            RequestAnswer::Setting {
                setting: Setting::CandidatePriority(n1, 10),
                reply: "priority set by a".to_string(),
            },
        ),
        b.answer_request(
            &request_b,
            None,
            RequestAnswer::Refuse("refused by b".to_string())
        ),
    );
    let (wa, wb) = (wa.expect("a answers"), wb.expect("b answers"));
    assert_eq!(
        [wa, wb].iter().filter(|w| **w == Written::Applied).count(),
        1,
        "one answer ({wa:?}, {wb:?})"
    );
    let status = a.request_status(id).await.expect("status");
    let priority = a.node(n1).await.expect("node").candidate_priority;
    if wa == Written::Applied {
        assert_eq!(
            status,
            RequestStatus::Accepted("priority set by a".to_string())
        );
        assert_eq!(priority, 10);
        // The setting changed the group: a decision read before it is stale.
        let late = a
            .apply(
                FORMATION,
                group,
                &read.version,
                GroupWrite::SetNumberSyncStandbys {
                    value: 0,
                    reason: "late".to_string(),
                },
            )
            .await
            .expect("late write");
        assert_eq!(late, Written::Stale);
    } else {
        assert_eq!(status, RequestStatus::Refused("refused by b".to_string()));
        assert_eq!(priority, 50);
    }
    assert!(
        a.pending_requests()
            .await
            .expect("pending")
            .iter()
            .all(|r| r.id != id),
        "answered requests are not pending"
    );
}

/// A report returns the node's goal; a changed reported state is published
/// on the state channel with the node's state, and wakes the service.
async fn reports_are_published(
    store: &dyn MonitorStore,
    listener: &dyn MonitorStore,
    feed: &mut ChangeFeed,
) {
    let (node_id, group) = register(store, "feed_1", 15021).await;
    listener
        .listen(&[Channel::State, Channel::Report])
        .await
        .expect("listen");
    let report = single_report(node_id);
    let assigned = store.report(&report).await.expect("report");
    assert_eq!(assigned.goal, NodeState::Init, "no goal assigned yet");
    assert_eq!(assigned.group_id, group);
    let mut state = None;
    let mut woke = false;
    for _ in 0..20 {
        let Some(change) = feed.next(Duration::from_secs(5)).await else {
            break;
        };
        match change.channel {
            Channel::Report => woke = true,
            Channel::State => state = change.state(),
            _ => {}
        }
        if woke && state.is_some() {
            break;
        }
    }
    assert!(woke, "the report wakes the service");
    let state = state.expect("the new reported state is published");
    assert_eq!(
        (state.node_id, state.reported_state),
        (node_id, NodeState::Single)
    );
    let row = store.node(node_id).await.expect("node");
    assert_eq!(
        (row.reported, row.lsn, row.pg_running),
        (NodeState::Single, 0x0300_0000, true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_racing_writers_apply_one_decision() {
    let monitor = PgMonitor::start().await;
    let (mut a, _) = monitor.store().await;
    let (mut b, _) = monitor.store().await;
    racing_writers_apply_one_decision(&mut a, &mut b).await;
}

/// Drops the node `name` (so that the next round can register it again).
async fn remove(store: &mut dyn MonitorStore, name: &str) {
    let node = store.node_by_name(FORMATION, name).await.expect("node");
    let read = store
        .group_snapshot(FORMATION, node.group_id)
        .await
        .expect("read");
    let removed = store
        .apply(
            FORMATION,
            node.group_id,
            &read.version,
            GroupWrite::Remove {
                node_id: node.node_id,
                reason: "next round".to_string(),
            },
        )
        .await
        .expect("remove");
    assert_eq!(removed, Written::Applied);
    assert!(
        store.node_by_name(FORMATION, name).await.is_err(),
        "removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_requests_are_answered_once() {
    let monitor = PgMonitor::start().await;
    for _ in 0..5 {
        let (mut a, _) = monitor.store().await;
        let (mut b, _) = monitor.store().await;
        requests_are_answered_once(&mut a, &mut b).await;
        remove(&mut a, "req_1").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_racing_writers_apply_one_decision() {
    let etcd = Etcd::start().await;
    let (mut a, _) = etcd.store().await;
    let (mut b, _) = etcd.store().await;
    racing_writers_apply_one_decision(&mut a, &mut b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_requests_are_answered_once() {
    let etcd = Etcd::start().await;
    for _ in 0..5 {
        let (mut a, _) = etcd.store().await;
        let (mut b, _) = etcd.store().await;
        requests_are_answered_once(&mut a, &mut b).await;
        remove(&mut a, "req_1").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_reports_are_published() {
    let etcd = Etcd::start().await;
    let (store, _) = etcd.store().await;
    let (listener, mut feed) = etcd.store().await;
    reports_are_published(&store, &listener, &mut feed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_reports_are_published() {
    let monitor = PgMonitor::start().await;
    let (store, _) = monitor.store().await;
    let (listener, mut feed) = monitor.store().await;
    reports_are_published(&store, &listener, &mut feed).await;
}

/// The etcd store keeps its event log bounded: the oldest events go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_events_are_bounded() {
    use hapg_monitor::store::etcd::MAX_EVENTS;
    let etcd = Etcd::start().await;
    let (store, _) = etcd.store().await;
    let total = MAX_EVENTS + 120;
    for i in 0..total {
        store
            .group_event(FORMATION, 0, &format!("event number {i:05}"))
            .await
            .expect("event");
    }
    let events = store
        .events(FORMATION, i64::try_from(total).expect("count"))
        .await
        .expect("events");
    assert!(
        events.len() <= MAX_EVENTS + 50,
        "{} events kept, bound {MAX_EVENTS}",
        events.len()
    );
    assert!(
        events.len() >= MAX_EVENTS,
        "no more than the excess trimmed"
    );
    let first = events.first().expect("events").description.clone();
    let last = events.last().expect("events").description.clone();
    assert_eq!(
        last,
        format!("event number {:05}", total - 1),
        "the newest stays"
    );
    assert_ne!(first, "event number 00000", "the oldest went");
    assert!(
        events.windows(2).all(|w| w[0].event_id < w[1].event_id),
        "in order"
    );
}

/// Monitor services on etcd elect a leader with a lease; a leader whose
/// lease lapsed (paused, cut off) and that wakes up writes nothing, even on
/// what it reads afresh; the next leader takes over within the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_a_leader_whose_lease_lapsed_writes_nothing() {
    let etcd = Etcd::start().await;
    let (mut a, _) = etcd.store().await;
    let (mut b, _) = etcd.store().await;
    let (n1, group) = register(&a, "fence_1", 15031).await;
    let ttl = Duration::from_secs(2);
    let token = tokio_util::sync::CancellationToken::new();
    let lead_a = a
        .campaign("a", ttl, &token)
        .await
        .expect("campaign a")
        .expect("a leads");
    assert!(
        tokio::time::timeout(ttl * 2, b.campaign("b", ttl, &token))
            .await
            .is_err(),
        "b does not lead while a's lease is kept alive"
    );
    let decide = |goal_state: NodeState, reason: &str| GroupWrite::Assign {
        assignments: vec![goal(n1, goal_state, reason.to_string())],
        end_drain: false,
    };
    let read = a.group_snapshot(FORMATION, group).await.expect("read");
    let written = a
        .apply(
            FORMATION,
            group,
            &read.version,
            decide(NodeState::Single, "a leading"),
        )
        .await
        .expect("a writes");
    assert_eq!(written, Written::Applied);

    // a stops renewing its lease, as a paused process does.
    let paused = std::time::Instant::now();
    drop(lead_a);
    let lead_b = tokio::time::timeout(ttl * 3, b.campaign("b", ttl, &token))
        .await
        .expect("b takes over within the lease and its polling")
        .expect("campaign b")
        .expect("b leads");
    let takeover = paused.elapsed();
    eprintln!("b leads {takeover:?} after a stopped renewing (ttl {ttl:?})");

    // a wakes up and decides on a fresh read: refused, nothing written.
    let read = a.group_snapshot(FORMATION, group).await.expect("read");
    let late = a
        .apply(
            FORMATION,
            group,
            &read.version,
            decide(NodeState::Demoted, "a after waking"),
        )
        .await;
    assert!(
        matches!(late, Err(_) | Ok(Written::Stale)),
        "the old leader's write is refused: {late:?}"
    );
    assert_eq!(events_with(&a, "a after waking").await, 0);
    assert_eq!(a.node(n1).await.expect("node").goal, NodeState::Single);
    let read = b.group_snapshot(FORMATION, group).await.expect("read");
    let written = b
        .apply(
            FORMATION,
            group,
            &read.version,
            decide(NodeState::Demoted, "b leading"),
        )
        .await
        .expect("b writes");
    assert_eq!(written, Written::Applied);
    assert!(!lead_b.lost());
}

/// Report ages in etcd are the reader's own: a keeper whose clock is an
/// hour behind or ahead of the monitor's (simulated by writing its report
/// document with such a time, under the store's key layout) neither looks
/// silent when it just reported, nor fresh once it stopped reporting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_report_ages_are_measured_by_the_readers_clock() {
    let etcd = Etcd::start().await;
    let (store, _) = etcd.store().await;
    let (monitor, _) = etcd.store().await;
    let (node_id, _) = register(&store, "clock_1", 15041).await;
    let report = single_report(node_id);
    store.report(&report).await.expect("report");
    let age = |row: hapg_monitor::client::NodeRow| row.report_age.expect("a report age");
    assert!(age(monitor.node(node_id).await.expect("node")) < Duration::from_secs(5));

    // The keeper's reports, as its skewed clock would time them.
    let endpoint = etcd
        .uri()
        .trim_start_matches("etcd://")
        .split('/')
        .next()
        .expect("host:port")
        .to_string();
    let client = etcd_client::Client::connect([endpoint], None)
        .await
        .expect("etcd client");
    let key = format!("/hapg-test/report/{node_id:020}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let skewed = |offset: f64| {
        let key = key.clone();
        let mut client = client.clone();
        async move {
            let current = client.get(key.clone(), None).await.expect("get report");
            let kv = current.kvs().first().expect("report key");
            let mut doc: serde_json::Value = serde_json::from_slice(kv.value()).expect("json");
            doc["report_time"] = serde_json::json!(now + offset);
            client
                .put(key, serde_json::to_vec(&doc).expect("json"), None)
                .await
                .expect("put report");
        }
    };

    // An hour behind, just reported: fresh.
    skewed(-3600.0).await;
    let behind = age(monitor.node(node_id).await.expect("node"));
    assert!(
        behind < Duration::from_secs(5),
        "a report just written is fresh whatever the keeper's clock says: {behind:?}"
    );

    // An hour ahead, then silent: its age grows all the same.
    skewed(3600.0).await;
    let start = std::time::Instant::now();
    let mut ahead = age(monitor.node(node_id).await.expect("node"));
    while ahead < Duration::from_millis(1500) && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        ahead = age(monitor.node(node_id).await.expect("node"));
    }
    assert!(
        ahead >= Duration::from_millis(1500),
        "a silent keeper ahead of the monitor's clock ages: {ahead:?} after {:?}",
        start.elapsed()
    );
}

/// A router registers its address and its read-only port's, if it has one,
/// and `routers` gives both back (what `hapg show uri` prints).
async fn routers_register_their_read_only_port(store: &dyn MonitorStore) {
    for (id, read_only) in [
        ("r_main_only", None),
        ("r_with_read", Some("127.0.0.1:6433")),
    ] {
        let registration = RouterRegistration {
            router_id: id.to_string(),
            formation: FORMATION.to_string(),
            address: "127.0.0.1:6432".to_string(),
            read_only_address: read_only.map(str::to_string),
            routed_epoch: 1,
        };
        store
            .register_router(&registration, false)
            .await
            .expect("register the router");
    }
    let routers = store
        .routers(Duration::from_secs(30))
        .await
        .expect("routers");
    let seen: Vec<(&str, Option<&str>)> = routers
        .iter()
        .map(|r| (r.router_id.as_str(), r.read_only_address.as_deref()))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("r_main_only", None),
            ("r_with_read", Some("127.0.0.1:6433"))
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_routers_register_their_read_only_port() {
    let monitor = PgMonitor::start().await;
    let (store, _) = monitor.store().await;
    routers_register_their_read_only_port(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_routers_register_their_read_only_port() {
    let etcd = Etcd::start().await;
    let (store, _) = etcd.store().await;
    routers_register_their_read_only_port(&store).await;
}
