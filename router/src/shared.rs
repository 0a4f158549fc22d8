//! What the accept loop, the follower, the pool maintenance and every
//! session share: the configuration in force ([`Runtime`], swapped whole on
//! a reload), the routing table, the cancel registry, the pools and the
//! router's last-seen server parameters.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use hapg_config::router::{AuthType, RouterConfig};
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;

use crate::auth::mock::MockKey;
use crate::auth::Userlist;
use crate::cancel::CancelRegistry;
use crate::error::RouterError;
use crate::params::LastParams;
use crate::pool::{Opener, Pools};
use crate::read_pool::ReadPool;
use crate::routing::RoutingTable;
use crate::server::ServerConn;
use crate::stats::events::Events;
use crate::stats::{ClientRegistry, Databases, Stats};
use crate::tls;

/// The configuration in force and what was loaded from it.
pub(crate) struct Runtime {
    pub config: RouterConfig,
    pub users: Userlist,
    pub tls: Option<TlsAcceptor>,
    /// TLS toward servers, as `server.sslmode` and `server.sslrootcert` ask.
    pub server_tls: Arc<rustls::ClientConfig>,
    /// The key of mock salts and secrets (the same across reloads).
    pub mock_key: Arc<MockKey>,
    /// Sessions count their transactions, queries and bytes: `[metrics]`
    /// or console users are configured.
    pub counting: bool,
}

impl Runtime {
    pub fn load(path: &Path, mock_key: Arc<MockKey>) -> Result<Runtime, RouterError> {
        let config = RouterConfig::load(path)?;
        let mut users = match &config.auth.file {
            Some(file) => Userlist::load(file)?,
            None => Userlist::default(),
        };
        if config.auth.kind == AuthType::ScramSha256 {
            users.prepare_scram(&mock_key);
        }
        let tls = match (&config.tls.cert, &config.tls.key) {
            (Some(cert), Some(key)) => Some(TlsAcceptor::from(tls::server_config(cert, key)?)),
            _ => None,
        };
        let server_tls =
            tls::client_config(config.server.sslmode, config.server.sslrootcert.as_deref())?;
        // A console user must be one the router can authenticate: with a
        // user list, one that is in it.
        if config.auth.file.is_some() {
            for (key, list) in [
                ("admin.admin_users", &config.admin.admin_users),
                ("admin.stats_users", &config.admin.stats_users),
            ] {
                if let Some(unknown) = list.iter().find(|u| users.get(u).is_none()) {
                    return Err(RouterError::Config(hapg_config::ConfigError::Invalid {
                        key: key.to_string(),
                        message: format!("{unknown:?} is not in auth.file"),
                    }));
                }
            }
        }
        let counting = config.metrics.listen.is_some()
            || !config.admin.admin_users.is_empty()
            || !config.admin.stats_users.is_empty();
        Ok(Runtime {
            config,
            users,
            tls,
            server_tls,
            mock_key,
            counting,
        })
    }
}

/// State shared by the accept loop, the follower and every session.
pub(crate) struct Shared {
    pub config_path: PathBuf,
    pub runtime: ArcSwap<Runtime>,
    pub routing: Arc<RoutingTable>,
    pub cancels: Arc<CancelRegistry>,
    /// ParameterStatus of the newest server connection, told to clients that
    /// log in while no server connection can be opened.
    pub last_params: LastParams,
    /// The server's own values of the parameters a client may set in its
    /// startup packet (`application_name`, `TimeZone`, ...), as server
    /// connections opened without them reported them at login: what a client
    /// that sets none is told when no server connection can be opened at its
    /// login. Unlike `last_params`, never a previous client's session-level SET.
    pub server_defaults: Mutex<Vec<(String, String)>>,
    /// Server connection pools.
    pub pools: Pools,
    pub clients: AtomicUsize,
    pub restart_follower: Arc<Notify>,
    /// `router.address` as registered: set when serving starts.
    pub registered_address: Mutex<String>,
    /// Totals and histograms (`SHOW STATS`, `/metrics`).
    pub stats: Stats,
    /// The clients logged in now (`SHOW CLIENTS`, `KILL_CLIENT`).
    pub registry: Arc<ClientRegistry>,
    /// The databases clients logged in to: their totals (`SHOW STATS`)
    /// and `PAUSE db`.
    pub databases: Databases,
    /// The primary changes and pauses the router lived through.
    pub events: Events,
    /// Ends the accept loop (`SHUTDOWN` on the console); set when serving starts.
    pub stop: Mutex<Option<tokio_util::sync::CancellationToken>>,
    /// The standbys the read-only port may use (empty while it is off).
    pub read_pool: ReadPool,
}

impl Shared {
    pub fn new(config_path: PathBuf, runtime: Runtime) -> Shared {
        let runtime_keep = runtime.config.admin.failovers_kept as usize;
        Shared {
            config_path,
            runtime: ArcSwap::from_pointee(runtime),
            routing: Arc::new(RoutingTable::default()),
            cancels: Arc::new(CancelRegistry::default()),
            last_params: LastParams::default(),
            server_defaults: Mutex::new(Vec::new()),
            pools: Pools::default(),
            clients: AtomicUsize::new(0),
            restart_follower: Arc::new(Notify::new()),
            registered_address: Mutex::new(String::new()),
            events: Events::new(runtime_keep),
            stats: Stats::default(),
            registry: Arc::new(ClientRegistry::default()),
            databases: Databases::default(),
            stop: Mutex::new(None),
            read_pool: ReadPool::default(),
        }
    }

    /// What the pools need to open a connection under `runtime`.
    pub fn opener<'a>(&'a self, runtime: &'a Runtime) -> Opener<'a> {
        Opener {
            config: &runtime.config,
            tls: &runtime.server_tls,
            params: &self.last_params,
        }
    }

    /// Puts a connection back in its pool, under the routing and the
    /// configuration in force; returns it when it is to be closed instead.
    #[inline]
    pub fn checkin(&self, conn: Box<ServerConn>) -> Option<Box<ServerConn>> {
        let routing = self.routing.load();
        let epoch = routing.known.then_some(routing.epoch);
        let lifetime = self.runtime.load().config.pool_lifetime();
        self.pools.checkin(conn, epoch, lifetime)
    }
}
