//! Attaching a server connection to a session at a transaction boundary,
//! restoring the session on it, and handing it back: the quick path of a
//! transaction-mode session between transactions ([`Session::take_ready`]),
//! the slow one that waits while paused and moves the session when the
//! primary changed ([`Session::attach`]), and what a client is told when
//! no connection could be attached ([`AttachError`]).

use std::sync::Arc;
use std::time::Duration;

use hapg_config::router::RouterConfig;
use tokio::time::Instant;

use crate::client_error::ClientError;
use crate::params::{same_params, set_config_sql, set_shared_param, SETTABLE};
use crate::pool::CheckoutError;
use crate::protocol::backend::{self, sqlstate, ErrorFields};
use crate::routing::Routing;
use crate::server::{ServerConn, ServerError, Target};
use crate::shared::{Runtime, Shared};
use crate::slots::NodeLimit;
use crate::stats::ClientEntry;
use std::sync::atomic::Ordering;

use super::Session;

/// What a read session does when its route is closed.
pub(super) enum Repicked {
    /// It is on a route with a target now (or on the primary): try again.
    Moved,
    /// No standby is eligible and the fallback is to wait.
    Wait,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A session held by a pause, from its first wait to the end of its
/// attach: marked waiting in the registry and the totals, and its hold
/// timed, whatever way the attach ends.
struct Held {
    shared: Arc<Shared>,
    entry: Arc<ClientEntry>,
    started: Instant,
}

impl Held {
    fn start(shared: &Arc<Shared>, entry: &Arc<ClientEntry>) -> Held {
        let stats = &shared.stats;
        stats.waiting.fetch_add(1, Ordering::Relaxed);
        stats.held_total.fetch_add(1, Ordering::Relaxed);
        entry.set_waiting(Some(micros(stats.started.elapsed())));
        Held {
            shared: shared.clone(),
            entry: entry.clone(),
            started: Instant::now(),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let stats = &self.shared.stats;
        stats.waiting.fetch_sub(1, Ordering::Relaxed);
        self.entry.set_waiting(None);
        stats.record_hold(micros(self.started.elapsed()));
    }
}

/// Delay between two connection attempts to a primary that does not answer.
const RETRY_DELAY: Duration = Duration::from_millis(250);

/// Why a server connection could not be attached at a transaction boundary.
#[derive(Debug)]
pub(crate) enum AttachError {
    /// No writable primary within the pause timeout (`waited`); the last
    /// attempt's error, if one was made.
    NoPrimary {
        formation: String,
        waited: Duration,
        last_error: Option<String>,
    },
    /// The primary refused the router's login or a restore statement.
    Refused(ErrorFields),
    /// Session state cannot move to the new server.
    StateLost(String),
    /// Every connection of the pool stayed in use until the pause timeout.
    PoolFull {
        size: u32,
        user: String,
        database: String,
        waited: Duration,
    },
    /// The router's connections to the primary reached its limit for the
    /// node and stayed in use until the pause timeout.
    NodeFull { limit: NodeLimit, waited: Duration },
    /// A read-only port session found no eligible standby, and
    /// `[read_only] fallback = "error"`.
    NoStandby,
    /// `PAUSE db` held the session's database past the pause timeout.
    DatabasePaused { database: String, waited: Duration },
    /// The router is stopping.
    Stopping,
}

impl From<AttachError> for ClientError {
    fn from(e: AttachError) -> ClientError {
        match e {
            AttachError::NoPrimary {
                formation,
                waited,
                last_error,
            } => {
                let mut message = format!(
                    "no primary is available for formation \"{formation}\": waited {} ms for a writable primary",
                    waited.as_millis()
                );
                if let Some(e) = last_error {
                    message.push_str(&format!(" (last attempt: {e})"));
                }
                ClientError::error(
                    sqlstate::NO_PRIMARY,
                    message,
                    Some("The formation has no writable primary at the moment; retry later."),
                )
            }
            AttachError::Refused(fields) => ClientError::error(
                fields.code,
                format!(
                    "the primary refused the router's connection: {}",
                    fields.message
                ),
                None,
            ),
            AttachError::PoolFull {
                size,
                user,
                database,
                waited,
            } => ClientError::error(
                sqlstate::TOO_MANY_CONNECTIONS,
                format!(
                    "all {size} server connections of the pool of user \"{user}\" and database \"{database}\" stayed in use for {} ms (pool.pool_size, router.pause_timeout_ms)",
                    waited.as_millis()
                ),
                Some("Raise pool.pool_size, or hold server connections for less time."),
            ),
            AttachError::NodeFull { limit, waited } => ClientError::error(
                sqlstate::TOO_MANY_CONNECTIONS,
                format!(
                    "all {} server connections the router may open to the primary stayed in use for {} ms (pool.max_server_connections = {}; the node has max_connections = {}, superuser_reserved_connections = {}; router.pause_timeout_ms)",
                    limit.limit,
                    waited.as_millis(),
                    limit.configured,
                    limit.node.max_connections,
                    limit.node.superuser_reserved_connections,
                ),
                Some("The router keeps its server connections below the node's max_connections - superuser_reserved_connections; raise max_connections on the nodes, or hold server connections for less time."),
            ),
            AttachError::StateLost(message) => ClientError::fatal(
                sqlstate::CONNECTION_FAILURE,
                message,
                Some("Reconnect to start a new session on the new primary."),
            ),
            AttachError::NoStandby => ClientError::error(
                sqlstate::NO_PRIMARY,
                "no standby is eligible for read-only sessions (read_only.fallback = error)",
                Some("Every standby is unhealthy, not in the secondary state, or further behind the primary than read_only.max_lag_bytes or read_only.max_lag_ms; retry later, or use the read-write port."),
            ),
            AttachError::DatabasePaused { database, waited } => ClientError::error(
                sqlstate::NO_PRIMARY,
                format!(
                    "database \"{database}\" is paused on the router (PAUSE {database}): waited {} ms (router.pause_timeout_ms)",
                    waited.as_millis()
                ),
                Some("An operator paused this database on the router's admin console; retry after RESUME."),
            ),
            AttachError::Stopping => ClientError::stopping(),
        }
    }
}

/// What the failed attempts of one attach saw, for the client's error at
/// the deadline.
#[derive(Default)]
struct Attempts {
    last_error: Option<String>,
    /// The node answered that it is full (it is up).
    node_full: Option<ErrorFields>,
}

impl Attempts {
    fn failed(&mut self, target: &Target, e: ServerError) {
        self.last_error = Some(format!("{}:{}: {e}", target.host, target.port));
        // The node is up and full: if it still is at the deadline, that is
        // what the client is told.
        self.node_full = match e {
            ServerError::Refused(fields) if fields.code == sqlstate::TOO_MANY_CONNECTIONS => {
                Some(fields)
            }
            _ => None,
        };
    }

    /// The pause timeout passed without a connection.
    fn give_up(self, config: &RouterConfig) -> AttachError {
        if let Some(fields) = self.node_full {
            return AttachError::Refused(fields);
        }
        AttachError::NoPrimary {
            formation: config.router.formation.clone(),
            waited: config.pause_timeout(),
            last_error: self.last_error,
        }
    }
}

impl Session {
    /// Transaction mode: the transaction is over, the connection goes back
    /// to the pool.
    pub(super) fn release(&mut self) {
        let Some(server) = self.server.take() else {
            return;
        };
        self.cancel.set_target(None);
        self.busy = None;
        self.stmts.reset();
        if let Some(conn) = self.checkin(server) {
            tokio::spawn(conn.terminate());
        }
    }

    /// Attaches a server connection to the current primary (see
    /// [`Session::attach`]) and marks the session busy on its epoch; if a
    /// switchover drain started in between, waits again.
    pub(super) async fn attach_and_begin(&mut self) -> Result<(), AttachError> {
        // The common case, attached to the current primary and nothing
        // paused, needs neither a deadline nor the slow path's subscriptions
        // (`begin` allows only the current epoch of a writable primary).
        if self.read.is_some() {
            self.pick_for_transaction();
        }
        if let Some(server) = &self.server {
            if let Some(busy) = self.routing().begin(server.epoch, self.db.gate()) {
                self.busy = Some(busy);
                return Ok(());
            }
        } else if self.tx_mode && self.take_ready() {
            return Ok(());
        }
        let started = Instant::now();
        let deadline = started + self.shared.runtime.load().config.pause_timeout();
        let result = self.attach_waiting(deadline).await;
        if self.tally.on {
            self.shared
                .stats
                .record_wait(&self.db, micros(started.elapsed()));
        }
        result
    }

    async fn attach_waiting(&mut self, deadline: Instant) -> Result<(), AttachError> {
        loop {
            self.attach(deadline).await?;
            let Some(server) = &self.server else {
                return Ok(());
            };
            if let Some(busy) = self.routing().begin(server.epoch, self.db.gate()) {
                self.busy = Some(busy);
                return Ok(());
            }
        }
    }

    /// Transaction mode, between transactions: takes the pool's most recently
    /// returned connection when it is to the current primary and in step
    /// with what the client was told (nothing to set or report), and begins
    /// the transaction on it, without the slow path's deadline, subscription
    /// and checkout machinery. False leaves everything to the slow path.
    fn take_ready(&mut self) -> bool {
        let Some(id) = self.pool else {
            return false;
        };
        let lifetime = self.shared.runtime.load().config.pool_lifetime();
        let Some(conn) = self.pools().take_ready(id, &self.login, lifetime) else {
            return false;
        };
        let busy = if Arc::ptr_eq(&self.known, &conn.params) {
            self.routing().begin(conn.epoch, self.db.gate())
        } else {
            None
        };
        let Some(busy) = busy else {
            if let Some(conn) = self.checkin(conn) {
                tokio::spawn(conn.terminate());
            }
            return false;
        };
        self.busy = Some(busy);
        self.stmts.reset();
        self.cancel.set_target(Some(conn.cancel_target()));
        conn.set_link(self.registered.entry.id);
        self.server = Some(conn);
        self.had_server = true;
        self.proto.on_idle();
        true
    }

    /// Makes sure a server connection to the current primary is attached, at a
    /// transaction boundary: waits while paused (up to the pause timeout), moves
    /// the session when the primary changed, and restores it.
    pub(super) async fn attach(&mut self, deadline: Instant) -> Result<(), AttachError> {
        let rt = self.shared.runtime.load_full();
        let mut changes = self.routing().subscribe();
        let mut read_changes = self.shared.read_pool.subscribe();
        let mut resumed = self.db.subscribe();
        let mut attempts = Attempts::default();
        let mut waited = false;
        // Set while this session is held by a pause: counted, shown.
        let mut _held: Option<Held> = None;
        loop {
            let routing = self.routing().load();
            // `PAUSE db` holds this session's database: wait as in any pause.
            let db_held = self.db.held();
            let standby_wait = self.waits_for_standby();
            if !standby_wait && !db_held && self.on_current_primary(&routing, waited).await {
                return Ok(());
            }
            let target = if standby_wait || db_held {
                None
            } else {
                routing.target()
            };
            if self.read.is_some() && target.is_none() && !db_held {
                read_changes.mark_unchanged();
                if let Repicked::Moved = self.repick().await? {
                    changes = self.routing().subscribe();
                    continue;
                }
            }
            if let (None, Some(target)) = (&self.server, &target) {
                if self.connect(&rt, target, deadline, &mut attempts).await? {
                    return Ok(());
                }
            }
            let now = Instant::now();
            if now >= deadline {
                if db_held {
                    return Err(AttachError::DatabasePaused {
                        database: self.login.database.clone(),
                        waited: rt.config.pause_timeout(),
                    });
                }
                return Err(attempts.give_up(&rt.config));
            }
            if !waited {
                waited = true;
                _held = Some(Held::start(&self.shared, &self.registered.entry));
                tracing::info!(
                    epoch = routing.epoch,
                    "paused: waiting for a writable primary"
                );
            }
            let wake = if target.is_some() {
                (now + RETRY_DELAY).min(deadline)
            } else {
                deadline
            };
            tokio::select! {
                _ = self.kill.cancelled() => return Err(AttachError::Stopping),
                _ = changes.changed() => {}
                _ = resumed.changed() => {}
                _ = read_changes.changed(), if self.read.is_some() => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// True when the attached server connection is to the current primary;
    /// one to a primary that moved is closed.
    async fn on_current_primary(&mut self, routing: &Routing, waited: bool) -> bool {
        let Some(server) = &self.server else {
            return false;
        };
        match routing.target_epoch() {
            Some(epoch) if epoch == server.epoch => {
                if waited {
                    tracing::info!(epoch, "resumed on the same primary");
                }
                true
            }
            Some(_) => {
                if let Some(server) = self.server.take() {
                    tracing::info!(old = %server.addr, "primary moved; re-attaching the session");
                    self.cancel.set_target(None);
                    server.terminate().await;
                }
                false
            }
            None => false,
        }
    }

    /// One checkout of a connection to `target` (the current primary). True
    /// once it is attached and the session restored on it; false after an
    /// attempt worth repeating (noted in `attempts`).
    async fn connect(
        &mut self,
        rt: &Runtime,
        target: &Target,
        deadline: Instant,
        attempts: &mut Attempts,
    ) -> Result<bool, AttachError> {
        if self.had_server && !self.tx_mode {
            if let Some(sticky) = self.state.sticky() {
                let why = if self.read.is_some() {
                    "the session's standby left the read pool (promoted, lagging, unhealthy, or in another state)"
                } else {
                    "the primary changed"
                };
                return Err(AttachError::StateLost(format!(
                    "{why} and this session's {} cannot move to another node",
                    sticky.describe()
                )));
            }
        }
        let connect_timeout = rt.config.connect_timeout().min(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(100)),
        );
        let checkout = self
            .pools()
            .checkout(
                &self.shared.opener(rt),
                target,
                &self.login,
                self.pool,
                connect_timeout,
                Some(deadline),
            )
            .await;
        let waited = rt.config.pause_timeout();
        match checkout {
            Ok(conn) => {
                if !self.tx_mode {
                    self.shared.last_params.remember(&conn.params);
                }
                self.stmts.reset();
                self.pool = conn.pool;
                conn.set_link(self.registered.entry.id);
                self.server = Some(conn);
                self.restore().await?;
                Ok(true)
            }
            Err(CheckoutError::Full { size }) => Err(AttachError::PoolFull {
                size,
                user: self.login.user.clone(),
                database: self.login.database.clone(),
                waited,
            }),
            Err(CheckoutError::Server(ServerError::Refused(fields))) if !fields.is_transient() => {
                Err(AttachError::Refused(fields))
            }
            Err(CheckoutError::NodeFull(limit)) => Err(AttachError::NodeFull { limit, waited }),
            Err(CheckoutError::Server(e)) => {
                tracing::info!(server = %format!("{}:{}", target.host, target.port), error = %e, "cannot connect to the primary; retrying until the pause timeout");
                attempts.failed(target, e);
                Ok(false)
            }
        }
    }

    /// Restores the session on a fresh server connection: replays SETs,
    /// set_config changes and named prepared statements, then tells the client
    /// about every parameter that differs from what it knew.
    async fn restore(&mut self) -> Result<(), AttachError> {
        let Some(server) = self.server.as_mut() else {
            return Ok(());
        };
        let lost = |what: &str, e: ServerError| {
            AttachError::StateLost(format!(
                "the primary changed and this session's {what} could not be restored on the new primary: {e}"
            ))
        };
        // The client was told exactly this connection's settings (in
        // transaction mode the rule: the pool's connections share one list,
        // see `LastParams::share`): nothing to set and nothing to report.
        if self.tx_mode && !Arc::ptr_eq(&self.known, &server.params) {
            // Reported settings the client has and this connection does not
            // (another client changed them here): set them as the client has them.
            let fixes = set_config_sql(self.known.iter().filter(|(name, value)| {
                SETTABLE.contains(&name.as_str()) && server.param(name).is_some_and(|v| v != value)
            }));
            if !fixes.is_empty() {
                server
                    .simple_query(&fixes)
                    .await
                    .map_err(|e| lost("settings", e))?;
            }
        } else if !self.tx_mode && self.had_server {
            let sets: Vec<&str> = self.state.sets().collect();
            if !sets.is_empty() {
                server
                    .simple_query(&sets.join("; "))
                    .await
                    .map_err(|e| lost("settings", e))?;
            }
            let fixes = set_config_sql(
                self.changed
                    .iter()
                    .filter(|(name, value)| server.param(name) != Some(value.as_str())),
            );
            if !fixes.is_empty() {
                server
                    .simple_query(&fixes)
                    .await
                    .map_err(|e| lost("settings", e))?;
            }
            let frames = self.state.prepared_frames();
            if !frames.is_empty() {
                server
                    .replay(&frames)
                    .await
                    .map_err(|e| lost("prepared statements", e))?;
            }
        }
        // Asked again: the SETs replayed above may have changed the
        // connection's settings.
        if !Arc::ptr_eq(&self.known, &server.params) {
            for (name, value) in server.params.iter() {
                if self.known.iter().any(|(k, v)| k == name && v == value) {
                    continue;
                }
                backend::parameter_status(&mut self.client.wbuf, name, value);
                set_shared_param(&mut self.known, name, value);
            }
            // In step again: the client and the connection share the
            // router's list for these values, so that the next restore on
            // this connection or another one like it is quick.
            if same_params(&self.known, &server.params) {
                let shared = self.shared.last_params.share(&server.params);
                server.params = shared.clone();
                self.known = shared;
            }
        }
        self.cancel.set_target(Some(server.cancel_target()));
        self.had_server = true;
        self.proto.on_idle();
        Ok(())
    }
}

/// Readies a server connection to go back to its pool at the end of a
/// client session; with `reset`, after `DISCARD ALL`. A connection that
/// cannot be reset is closed (none returned).
pub(super) async fn give_back(
    shared: &Shared,
    mut server: Box<ServerConn>,
    reset: bool,
) -> Option<Box<ServerConn>> {
    if reset {
        let timeout = shared.runtime.load().config.connect_timeout();
        match tokio::time::timeout(timeout, server.simple_query("DISCARD ALL")).await {
            Ok(Ok(_)) => server.prepared.clear(),
            _ => {
                server.terminate().await;
                return None;
            }
        }
    }
    Some(server)
}
