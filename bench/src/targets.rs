//! What pgbench connects to: Postgres itself, the hapg router, PgBouncer in
//! each pool mode, HAProxy in TCP mode. Each proxy gets a generated config
//! in the run directory and listens on a free loopback port.

use std::fmt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use hapg::cluster::Cluster;

use crate::procs;

/// The router's `[pool]` section. `Default` writes none (the router's own
/// defaults: session pooling, or one server connection per client for a
/// router older than pooling); `Session` and `Transaction` write the mode and
/// `pool_size` (the client count unless `--pool-size`), as PgBouncer's
/// `default_pool_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouterPool {
    Default,
    Session,
    Transaction,
}

impl RouterPool {
    /// Parses a `--router-pool-mode` entry.
    pub fn from_key(key: &str) -> Result<RouterPool> {
        Ok(match key {
            "none" | "default" => RouterPool::Default,
            "session" => RouterPool::Session,
            "transaction" => RouterPool::Transaction,
            _ => bail!("unknown router pool mode {key:?}: use none, session or transaction"),
        })
    }

    /// The `[pool]` section for router.toml, if any.
    fn toml(self, pool_size: u32) -> String {
        let mode = match self {
            RouterPool::Default => return String::new(),
            RouterPool::Session => "session",
            RouterPool::Transaction => "transaction",
        };
        format!("\n[pool]\nmode = \"{mode}\"\npool_size = {pool_size}\n")
    }
}

/// How a router row fails when the router predates pooling.
pub const NO_POOL: &str = "this router has no connection pool";

/// PgBouncer's `pool_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BouncerMode {
    Session,
    Transaction,
}

/// One thing pgbench runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Direct,
    Router(RouterPool),
    PgBouncer(BouncerMode),
    HaProxy,
    /// The router's read-only port (`router.listen_read_only`, session
    /// pooling), spreading the sessions over two standbys.
    ReadPort,
    /// Direct to one standby: what the read port is compared with.
    DirectStandby,
}

impl Target {
    /// Serves reads only (a standby): select-only runs, no TPC-B.
    pub fn read_only(self) -> bool {
        matches!(self, Target::ReadPort | Target::DirectStandby)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Target::Direct => "direct",
            Target::Router(RouterPool::Default) => "router",
            Target::Router(RouterPool::Session) => "router session",
            Target::Router(RouterPool::Transaction) => "router transaction",
            Target::PgBouncer(BouncerMode::Session) => "pgbouncer session",
            Target::PgBouncer(BouncerMode::Transaction) => "pgbouncer transaction",
            Target::HaProxy => "haproxy tcp",
            Target::ReadPort => "router read port",
            Target::DirectStandby => "direct standby",
        })
    }
}

/// A free TCP port on loopback.
pub fn free_port() -> Result<u16> {
    Ok(hapg::cluster::free_port()?)
}

/// Fixed facts of the run every target needs.
pub struct Env {
    /// The run directory (0755: Postgres, PgBouncer and HAProxy run as `postgres`).
    pub dir: PathBuf,
    /// Postgres client programs (psql).
    pub pg_bindir: PathBuf,
    pub hapg: PathBuf,
    pub pgbouncer: Option<PathBuf>,
    pub haproxy: Option<PathBuf>,
    /// uid/gid of the `postgres` OS user when hapg-bench runs as root.
    pub run_as: Option<(u32, u32)>,
    pub monitor_uri: String,
    pub node_port: u16,
    /// The first standby's port, when the run has standbys (read-port rows).
    pub standby_port: Option<u16>,
    pub dbname: String,
    pub clients: u32,
    /// Server connections per pool (router `pool_size`, PgBouncer `default_pool_size`).
    pub pool_size: u32,
    /// Lines added to router.toml's `[router]` section (worker threads, CPU scheduling).
    pub router_settings: String,
    /// The node's Unix socket directory, when the proxies reach the node
    /// through it instead of TCP.
    pub node_socket_dir: Option<PathBuf>,
    /// Start each proxy in a session of its own (`setsid`), as a daemon is.
    /// With the kernel's autogroup scheduling a session is a scheduling
    /// group: in pgbench's session a proxy would share pgbench's CPU share,
    /// which no deployment does and which moved select-only by 20%.
    pub proxy_own_session: bool,
    /// The router rows serve `/metrics` (`[metrics] listen` on a free
    /// port), so that the cost of the router's counting can be measured.
    pub router_metrics: bool,
}

impl Env {
    /// A command that runs as the `postgres` OS user when we are root.
    fn as_postgres(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd.current_dir(&self.dir);
        cmd
    }

    /// `hapg router run` with the config at `config`, in the run directory,
    /// logging warnings only.
    fn router(&self, config: &Path) -> Command {
        let mut cmd = Command::new(&self.hapg);
        cmd.args(["router", "run", "--config"])
            .arg(config)
            .current_dir(&self.dir)
            .env("HAPG_LOG", "warn");
        cmd
    }

    /// A psql command to `port` running `sql` statements, one `-c` each.
    pub fn psql(&self, port: u16, sql: &[&str]) -> Command {
        let mut cmd = Command::new(self.pg_bindir.join("psql"));
        cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-U", "postgres", "-d", &self.dbname])
            .env("PGSSLMODE", "disable")
            .env("PGCONNECT_TIMEOUT", "3");
        for s in sql {
            cmd.args(["-c", s]);
        }
        cmd
    }

    /// Waits (bounded) until `SELECT 1` works through `port`.
    pub fn wait_ready(
        &self,
        cluster: &Cluster,
        service: Option<&str>,
        port: u16,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(name) = service {
                cluster.check_alive(name)?;
            }
            let out = procs::run_capture(self.psql(port, &["SELECT 1"]), Duration::from_secs(10))?;
            if out.status.success() && out.stdout.trim() == "1" {
                return Ok(());
            }
            last = out.both();
            procs::sleep(Duration::from_millis(200))?;
        }
        bail!(
            "port {port} did not answer SELECT 1 within {timeout:?}; last error: {}",
            last.trim()
        )
    }
}

/// A proxy started for one target's runs; stopped by [`Running::stop`].
pub struct Running {
    pub port: u16,
    /// The proxy's pid (none for direct), to measure the CPU it uses.
    pub pid: Option<u32>,
    service: Option<String>,
}

impl Running {
    pub fn stop(self, cluster: &Cluster) {
        if let Some(name) = self.service {
            cluster.terminate(&name);
        }
    }
}

/// Why a target cannot run on this machine, if it cannot.
pub fn unavailable(target: Target, env: &Env) -> Option<String> {
    match target {
        Target::PgBouncer(_) if env.pgbouncer.is_none() => Some(
            "pgbouncer is not installed: apt-get install -y pgbouncer haproxy (or --pgbouncer PATH)"
                .into(),
        ),
        Target::HaProxy if env.haproxy.is_none() => Some(
            "haproxy is not installed: apt-get install -y pgbouncer haproxy (or --haproxy PATH)"
                .into(),
        ),
        _ => None,
    }
}

/// Starts what `target` needs and waits until it answers.
pub fn start(target: Target, env: &Env, cluster: &Cluster) -> Result<Running> {
    let (kind, port, cmd, stop_timeout) = match target {
        Target::Direct => {
            return Ok(Running {
                port: env.node_port,
                pid: None,
                service: None,
            })
        }
        Target::DirectStandby => {
            let Some(port) = env.standby_port else {
                bail!("the run has no standby");
            };
            return Ok(Running {
                port,
                pid: None,
                service: None,
            });
        }
        Target::ReadPort => {
            let main = free_port()?;
            let port = free_port()?;
            let path = env.dir.join(format!("router-{main}.toml"));
            let mut toml = router_toml(env, main, RouterPool::Session, None);
            toml = toml.replacen(
                "[auth]",
                &format!("listen_read_only = \"127.0.0.1:{port}\"\n\n[auth]"),
                1,
            );
            write(&path, &toml)?;
            let cmd = env.router(&path);
            ("router", port, cmd, Duration::from_secs(15))
        }
        Target::Router(pool) => {
            let port = free_port()?;
            let path = env.dir.join(format!("router-{port}.toml"));
            let metrics = if env.router_metrics {
                Some(free_port()?)
            } else {
                None
            };
            write(&path, &router_toml(env, port, pool, metrics))?;
            let cmd = env.router(&path);
            // The router drains for drain_timeout_ms (2 s here) on SIGTERM.
            ("router", port, cmd, Duration::from_secs(15))
        }
        Target::PgBouncer(mode) => {
            let Some(bin) = &env.pgbouncer else {
                bail!("pgbouncer is not installed");
            };
            let port = free_port()?;
            let userlist = env.dir.join("pgbouncer-users.txt");
            write(&userlist, "\"postgres\" \"\"\n")?;
            let path = env.dir.join(format!("pgbouncer-{port}.ini"));
            write(&path, &pgbouncer_ini(env, port, mode, &userlist))?;
            let mut cmd = env.as_postgres(bin);
            cmd.arg(&path);
            ("pgbouncer", port, cmd, Duration::from_secs(10))
        }
        Target::HaProxy => {
            let Some(bin) = &env.haproxy else {
                bail!("haproxy is not installed");
            };
            let port = free_port()?;
            let path = env.dir.join(format!("haproxy-{port}.cfg"));
            write(&path, &haproxy_cfg(env, port))?;
            let mut cmd = env.as_postgres(bin);
            cmd.args(["-db", "-f"]).arg(&path);
            ("haproxy", port, cmd, Duration::from_secs(10))
        }
    };
    let service = format!("{kind}-{port}");
    let log = env.dir.join(format!("{service}.log"));
    let session = if env.proxy_own_session {
        procs::Session::Own
    } else {
        procs::Session::Shared
    };
    cluster.spawn_service(&service, cmd, stop_timeout, session)?;
    if let Err(e) = env.wait_ready(cluster, Some(&service), port, Duration::from_secs(30)) {
        let e = format!("{e:#}");
        if matches!(
            target,
            Target::Router(RouterPool::Session | RouterPool::Transaction)
        ) && e.contains("unknown field `pool`")
        {
            bail!("{NO_POOL} ([pool] section); run with --router-pool-mode none");
        }
        bail!("{target} did not start (log {}): {e}", log.display());
    }
    Ok(Running {
        port,
        pid: cluster.pid(&service),
        service: Some(service),
    })
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// router.toml: trust auth, plain TCP to the node (as pgbench direct) or its
/// Unix socket, limits high enough.
fn router_toml(env: &Env, port: u16, pool: RouterPool, metrics: Option<u16>) -> String {
    let metrics = match metrics {
        Some(port) => format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
        None => String::new(),
    };
    format!(
        "# Written by hapg-bench.\n\
         [router]\n\
         listen = \"127.0.0.1:{port}\"\n\
         monitor = \"{monitor}\"\n\
         formation = \"default\"\n\
         id = \"hapg-bench:{port}\"\n\
         max_client_connections = {max}\n\
         pause_timeout_ms = 5000\n\
         drain_timeout_ms = 2000\n\
         {settings}\
         \n\
         [auth]\n\
         type = \"trust\"\n\
         \n\
         [server]\n\
         sslmode = \"disable\"\n\
         {socket}\
         {pool}\
         {metrics}",
        monitor = env.monitor_uri.replace('\\', "\\\\").replace('"', "\\\""),
        max = (env.clients * 4).max(1000),
        pool = pool.toml(env.pool_size),
        settings = env.router_settings,
        socket = match &env.node_socket_dir {
            Some(dir) => format!("unix_socket_dir = \"{}\"\n", dir.display()),
            None => String::new(),
        },
    )
}

/// pgbouncer.ini: one database, trust auth, a pool of `pool_size`.
fn pgbouncer_ini(env: &Env, port: u16, mode: BouncerMode, userlist: &Path) -> String {
    let mode = match mode {
        BouncerMode::Session => "session",
        BouncerMode::Transaction => "transaction",
    };
    format!(
        ";; Written by hapg-bench.\n\
         [databases]\n\
         {db} = host={host} port={node} dbname={db}\n\
         \n\
         [pgbouncer]\n\
         listen_addr = 127.0.0.1\n\
         listen_port = {port}\n\
         unix_socket_dir =\n\
         auth_type = trust\n\
         auth_file = {userlist}\n\
         pool_mode = {mode}\n\
         default_pool_size = {pool}\n\
         max_client_conn = {max}\n\
         server_tls_sslmode = disable\n\
         ignore_startup_parameters = extra_float_digits\n\
         log_connections = 0\n\
         log_disconnections = 0\n",
        db = env.dbname,
        host = match &env.node_socket_dir {
            Some(dir) => dir.display().to_string(),
            None => "127.0.0.1".to_string(),
        },
        node = env.node_port,
        userlist = userlist.display(),
        pool = env.pool_size,
        max = (env.clients * 4).max(1000),
    )
}

/// haproxy.cfg: a plain TCP listener forwarding to the node (its TCP port or
/// its Unix socket).
fn haproxy_cfg(env: &Env, port: u16) -> String {
    format!(
        "# Written by hapg-bench.\n\
         global\n\
         \x20   maxconn {max}\n\
         \n\
         defaults\n\
         \x20   mode tcp\n\
         \x20   timeout connect 5s\n\
         \x20   timeout client 1h\n\
         \x20   timeout server 1h\n\
         \n\
         listen postgres\n\
         \x20   bind 127.0.0.1:{port}\n\
         \x20   server node {node}\n",
        max = (env.clients * 4).max(1000),
        node = match &env.node_socket_dir {
            Some(dir) => dir
                .join(format!(".s.PGSQL.{}", env.node_port))
                .display()
                .to_string(),
            None => format!("127.0.0.1:{}", env.node_port),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(node_socket_dir: Option<&str>) -> Env {
        Env {
            dir: PathBuf::from("/tmp/run"),
            pg_bindir: PathBuf::from("/usr/lib/postgresql/15/bin"),
            hapg: PathBuf::from("hapg"),
            pgbouncer: None,
            haproxy: None,
            run_as: None,
            monitor_uri: "postgres://autoctl_node@localhost:5000/pg_auto_failover".into(),
            node_port: 5433,
            standby_port: None,
            dbname: "bench".into(),
            clients: 16,
            pool_size: 16,
            router_settings: String::new(),
            node_socket_dir: node_socket_dir.map(PathBuf::from),
            proxy_own_session: true,
            router_metrics: false,
        }
    }

    #[test]
    fn every_proxy_reaches_the_node_the_same_way() {
        let userlist = Path::new("/tmp/run/userlist.txt");
        let tcp = env(None);
        assert!(!router_toml(&tcp, 6432, RouterPool::Session, None).contains("unix_socket_dir"));
        assert!(!router_toml(&tcp, 6432, RouterPool::Session, None).contains("[metrics]"));
        assert!(router_toml(&tcp, 6432, RouterPool::Transaction, Some(9127))
            .ends_with("\n[metrics]\nlisten = \"127.0.0.1:9127\"\n"));
        assert!(pgbouncer_ini(&tcp, 6433, BouncerMode::Session, userlist)
            .contains("bench = host=127.0.0.1 port=5433 dbname=bench"));
        assert!(haproxy_cfg(&tcp, 6434).contains("server node 127.0.0.1:5433"));

        let unix = env(Some("/tmp"));
        assert!(router_toml(&unix, 6432, RouterPool::Session, None)
            .contains("[server]\nsslmode = \"disable\"\nunix_socket_dir = \"/tmp\"\n"));
        assert!(pgbouncer_ini(&unix, 6433, BouncerMode::Session, userlist)
            .contains("bench = host=/tmp port=5433 dbname=bench"));
        assert!(haproxy_cfg(&unix, 6434).contains("server node /tmp/.s.PGSQL.5433"));
    }
}
