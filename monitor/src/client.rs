//! The monitor client: what keepers, routers and the CLI read from and write to
//! the monitor. Keepers report and register; everyone reads state; the CLI
//! files operator requests that the monitor service alone decides on; routers
//! follow the routing and acknowledge drains. Every statement is the store's
//! ([`crate::store`]): the client holds a [`MonitorStore`] and its change feed.

use std::time::{Duration, Instant};

use crate::error::MonitorError;
use crate::fsm::{GroupView, Thresholds};
use crate::pgconn::redact_uri;
use crate::store::etcd::EtcdStore;
use crate::store::postgres::PgStore;
use crate::store::{
    Change, ChangeFeed, Channel, GoalEvent, MonitorStore, NewRequest, PrimaryChange, RequestStatus,
    RouterRegistration, RouterRow, Routing,
};

pub use crate::store::rows::{
    Assigned, EventRow, FormationRow, NodeReport, NodeRow, Registered, Registration, RequestKind,
    StateNotification,
};

/// A connection to the monitor: a [`MonitorStore`] and its change feed.
pub struct MonitorClient {
    store: Box<dyn MonitorStore>,
    feed: ChangeFeed,
    uri: String,
}

impl MonitorClient {
    /// Connects once, and checks the store's layout version: `etcd://...`
    /// selects the etcd store, anything else is a Postgres connection string.
    pub async fn connect(uri: &str) -> Result<MonitorClient, MonitorError> {
        if uri.starts_with("etcd://") {
            let (store, feed) = EtcdStore::connect(uri).await?;
            return Ok(MonitorClient::with_store(
                Box::new(store),
                feed,
                uri.to_string(),
            ));
        }
        let (store, feed) = PgStore::connect(uri).await?;
        Ok(MonitorClient::with_store(
            Box::new(store),
            feed,
            redact_uri(uri),
        ))
    }

    /// A client on a store already connected (`uri`: how to name it, with
    /// no password).
    pub fn with_store(
        store: Box<dyn MonitorStore>,
        feed: ChangeFeed,
        uri: String,
    ) -> MonitorClient {
        MonitorClient { store, feed, uri }
    }

    /// Connects, retrying connection failures, and a monitor that is still
    /// being created or started, with backoff for up to `budget`; then fails
    /// with an error that names the URI, or with the monitor's own answer.
    pub async fn connect_with_retry(
        uri: &str,
        budget: Duration,
    ) -> Result<MonitorClient, MonitorError> {
        let start = Instant::now();
        let mut attempts = 0;
        let mut delay = Duration::from_millis(200);
        loop {
            attempts += 1;
            match MonitorClient::connect(uri).await {
                Ok(client) => return Ok(client),
                Err(e)
                    if (e.is_transient() || e.is_monitor_not_ready())
                        && start.elapsed() + delay < budget =>
                {
                    tracing::debug!(attempt = attempts, error = %e, "monitor not reachable yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(e) if e.is_transient() => {
                    return Err(MonitorError::Unreachable {
                        uri: redact_uri(uri),
                        attempts,
                        seconds: start.elapsed().as_secs(),
                        last_error: e.to_string(),
                    })
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The URI this client connected to, password removed.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// True once the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.store.is_closed()
    }

    /// Listens to the state changes ([`Channel::State`]).
    pub async fn listen_state(&self) -> Result<(), MonitorError> {
        self.store.listen(&[Channel::State]).await
    }

    /// Listens to `channels`.
    pub async fn listen(&self, channels: &[Channel]) -> Result<(), MonitorError> {
        self.store.listen(channels).await
    }

    /// Waits up to `timeout` for the next change on the channels listened
    /// to; `None` on timeout or when the connection is closed (check
    /// [`MonitorClient::is_closed`]).
    pub async fn next_change(&mut self, timeout: Duration) -> Option<Change> {
        self.feed.next(timeout).await
    }

    /// A change already received, without waiting.
    pub fn try_change(&mut self) -> Option<Change> {
        self.feed.try_next()
    }

    /// Registers a new node; the monitor service assigns its first goal.
    pub async fn register(&self, reg: &Registration) -> Result<Registered, MonitorError> {
        self.store.register(reg).await
    }

    /// Records a keeper's report and returns its goal. A change of reported
    /// state is logged as an event and published on the state channel; every
    /// report wakes the monitor service.
    pub async fn report(&self, report: &NodeReport) -> Result<Assigned, MonitorError> {
        self.store.report(report).await
    }

    /// Records an event a keeper has to tell about its node (how it rejoined
    /// its primary, and why), with the node's current row.
    pub async fn node_event(&self, node_id: i64, description: &str) -> Result<(), MonitorError> {
        self.store.node_event(node_id, description).await
    }

    /// A formation.
    pub async fn formation(&self, formation: &str) -> Result<FormationRow, MonitorError> {
        self.store.formation(formation).await
    }

    /// Every formation.
    pub async fn formations(&self) -> Result<Vec<FormationRow>, MonitorError> {
        self.store.formations().await
    }

    /// The nodes of a formation (all groups when `group` is `None`), by group and id.
    pub async fn nodes(
        &self,
        formation: &str,
        group: Option<i32>,
    ) -> Result<Vec<NodeRow>, MonitorError> {
        self.store.nodes(formation, group).await
    }

    /// One node by id.
    pub async fn node(&self, node_id: i64) -> Result<NodeRow, MonitorError> {
        self.store.node(node_id).await
    }

    /// One node by name.
    pub async fn node_by_name(&self, formation: &str, name: &str) -> Result<NodeRow, MonitorError> {
        self.store.node_by_name(formation, name).await
    }

    /// A group as the state machine sees it (thresholds at their defaults).
    pub async fn group_view(&self, formation: &str, group: i32) -> Result<GroupView, MonitorError> {
        Ok(self.group(formation, group).await?.1)
    }

    /// A group's nodes, and the same group as the state machine sees it.
    pub async fn group(
        &self,
        formation: &str,
        group: i32,
    ) -> Result<(Vec<NodeRow>, GroupView), MonitorError> {
        let f = self.formation(formation).await?;
        let nodes = self.nodes(formation, Some(group)).await?;
        let view = GroupView {
            nodes: nodes.iter().map(NodeRow::view).collect(),
            number_sync_standbys: f.number_sync_standbys,
            monitor_uptime: Duration::MAX,
            thresholds: Thresholds::default(),
            switchover: None,
            preferred_candidate: None,
        };
        Ok((nodes, view))
    }

    /// The newest `count` events of a formation, oldest first.
    pub async fn events(&self, formation: &str, count: i64) -> Result<Vec<EventRow>, MonitorError> {
        self.store.events(formation, count).await
    }

    /// Every goal assignment the monitor logged that names a node's address,
    /// oldest first (for the invariant checker).
    pub async fn goal_history(&self) -> Result<Vec<GoalEvent>, MonitorError> {
        self.store.goal_history().await
    }

    /// Every completed change of primary with its duration, oldest first
    /// (the monitor's `/metrics`).
    pub async fn primary_changes(&self) -> Result<Vec<PrimaryChange>, MonitorError> {
        self.store.primary_changes().await
    }

    /// The monitor's clock, `YYYY-MM-DD HH:MM:SS`.
    pub async fn clock(&self) -> Result<String, MonitorError> {
        self.store.clock().await
    }

    /// A formation's routing: its epoch, the node writable in it and a
    /// pending switchover request, read at once.
    pub async fn routing(&self, formation: &str) -> Result<Routing, MonitorError> {
        self.store.routing(formation).await
    }

    /// Registers a router, or refreshes its registration.
    pub async fn register_router(&self, router: &RouterRegistration) -> Result<(), MonitorError> {
        self.store.register_router(router, false).await
    }

    /// Registers a router and acknowledges the formation's switchover drain,
    /// in one step.
    pub async fn acknowledge_drain(&self, router: &RouterRegistration) -> Result<(), MonitorError> {
        self.store.register_router(router, true).await
    }

    /// Routers heard from within `within`, by id.
    pub async fn routers(&self, within: Duration) -> Result<Vec<RouterRow>, MonitorError> {
        self.store.routers(within).await
    }

    /// `synchronous_standby_names` the monitor wants on a group's primary.
    pub async fn synchronous_standby_names(
        &self,
        formation: &str,
        group: i32,
    ) -> Result<String, MonitorError> {
        let view = self.group_view(formation, group).await?;
        Ok(match view.primary() {
            Some(p) => crate::fsm::synchronous_standby_names(&view, p.id),
            None => String::new(),
        })
    }

    /// Files an operator request and waits for the monitor service to accept
    /// or refuse it; a refusal comes back as [`MonitorError::Refused`] with the reason.
    pub async fn request(
        &mut self,
        formation: &str,
        group: i32,
        node_id: Option<i64>,
        kind: RequestKind,
        timeout: Duration,
    ) -> Result<String, MonitorError> {
        self.request_value(formation, group, node_id, kind, None, timeout)
            .await
    }

    /// [`MonitorClient::request`] with a value (for the settings requests).
    pub async fn request_value(
        &mut self,
        formation: &str,
        group: i32,
        node_id: Option<i64>,
        kind: RequestKind,
        value: Option<String>,
        timeout: Duration,
    ) -> Result<String, MonitorError> {
        self.store.listen(&[Channel::Request]).await?;
        let id = self
            .store
            .file_request(&NewRequest {
                formation: formation.to_string(),
                group_id: group,
                node_id,
                kind,
                value,
            })
            .await?;
        let deadline = Instant::now() + timeout;
        loop {
            match self.store.request_status(id).await? {
                RequestStatus::Accepted(reply) => return Ok(reply),
                RequestStatus::Refused(reason) => return Err(MonitorError::Refused(reason)),
                RequestStatus::Pending => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(MonitorError::Timeout {
                    what: format!(
                        "the monitor service to answer the {} request (is `hapg run` running on the monitor?)",
                        kind.as_str()
                    ),
                    seconds: timeout.as_secs(),
                });
            }
            self.next_change((deadline - now).min(Duration::from_millis(250)))
                .await;
        }
    }

    /// Waits until `done` holds for the formation's nodes, re-reading them on
    /// every state notification (and at least every 250 ms).
    pub async fn wait_until<F>(
        &mut self,
        formation: &str,
        what: &str,
        timeout: Duration,
        mut done: F,
    ) -> Result<Vec<NodeRow>, MonitorError>
    where
        F: FnMut(&[NodeRow]) -> bool,
    {
        self.listen_state().await?;
        let deadline = Instant::now() + timeout;
        loop {
            let nodes = self.nodes(formation, None).await?;
            if done(&nodes) {
                return Ok(nodes);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(MonitorError::Timeout {
                    what: what.to_string(),
                    seconds: timeout.as_secs(),
                });
            }
            self.next_change((deadline - now).min(Duration::from_millis(250)))
                .await;
            while self.try_change().is_some() {}
        }
    }
}
