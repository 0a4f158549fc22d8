//! One cluster harness for `hapg demo`, the end-to-end tests and the
//! benchmarks: a monitor, nodes and routers as real `hapg` processes on free
//! loopback ports under one directory, every command and every wait bounded,
//! everything stopped (and the directory removed unless kept) on drop.
//!
//! It is synchronous (threads and child processes), so that tests, the
//! benchmarks' blocking code and async callers can all use it; its waits read
//! the monitor through `hapg show state --json`, as a user would.

pub mod ports;
pub mod process;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub use ports::free_port;
pub use process::{check_interrupted, interrupt, log_tail, output_within, sleep, Session, Stop};
use process::{end_postmaster, Supervisor};

/// What can go wrong while starting, driving or stopping a cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A file, directory or process operation failed.
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    /// A short `hapg` command could not run, hung past its timeout or was interrupted.
    #[error("hapg {args}: {error}")]
    Command { args: String, error: std::io::Error },
    /// A short `hapg` command that had to succeed failed.
    #[error("hapg {args} failed ({status}):\nstdout: {stdout}\nstderr: {stderr}")]
    Failed {
        args: String,
        status: ExitStatus,
        stdout: String,
        stderr: String,
    },
    /// A process that should run has exited.
    #[error("{name} exited ({status}); last lines of {log}:\n{tail}", log = log.display())]
    Exited {
        name: String,
        status: ExitStatus,
        log: PathBuf,
        tail: String,
    },
    /// A bounded wait ran out.
    #[error("timed out after {timeout:?} waiting for {what}{last}")]
    Timeout {
        what: String,
        timeout: Duration,
        /// What was seen last, if the wait knows (starts with "; ").
        last: String,
    },
    /// Every port tried was taken before the process could listen on it.
    #[error(
        "{what}: every port tried ({} attempts) was taken meanwhile",
        ports::ATTEMPTS
    )]
    NoFreePort { what: String },
    /// A directory given for the cluster holds files already.
    #[error("{} is not empty: the cluster is created in a new directory", .0.display())]
    NotEmpty(PathBuf),
    /// [`interrupt`] was called (a signal).
    #[error("interrupted")]
    Interrupted,
}

/// Where the cluster lives.
#[derive(Debug, Clone)]
pub enum Workdir {
    /// A new directory `<prefix>XXXXXX` in `parent`, removed when the cluster
    /// ends unless [`Cluster::keep`] was called.
    Temp { parent: PathBuf, prefix: String },
    /// This directory (created if missing, refused unless empty), always kept.
    Given(PathBuf),
}

/// TLS of the monitor and the nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    /// `--ssl-self-signed`, as the tutorial runs them.
    SelfSigned,
    /// `--no-ssl`, as pgbench direct measures Postgres.
    Off,
}

/// How a cluster is made and run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `hapg` binary to run.
    pub bin: PathBuf,
    pub dir: Workdir,
    pub tls: Tls,
    /// The application database of every node (`--dbname`).
    pub dbname: String,
    /// `--os-user` for Postgres when running as root (None: hapg's default).
    pub os_user: Option<String>,
    /// The monitor's `--listen` (None: hapg's default).
    pub monitor_listen: Option<String>,
    /// Every node's `--listen` unless its [`NodeSpec`] says (None: hapg's default).
    pub node_listen: Option<String>,
    /// How what still runs is ended when the cluster is dropped.
    pub stop: Stop,
    /// Each process in a process group of its own, so that a terminal's
    /// Ctrl-C reaches only the program, which stops them in order (the demo,
    /// the benchmarks). Without, they stay in the program's group and die
    /// with it when a supervisor (CI's `timeout`) kills that group (tests).
    pub own_process_groups: bool,
    /// Whether a wait fails at once when a process it waits on has exited
    /// (the tests stop nodes on purpose and wait for the monitor to notice).
    pub exits_fail_waits: bool,
    /// The longest a short `hapg` command may take before it is killed.
    pub command_timeout: Duration,
    /// The longest a monitor or node may take to start (initdb included).
    pub start_timeout: Duration,
    /// Say on stderr what is stopped.
    pub verbose: bool,
}

impl Options {
    /// The defaults: self-signed TLS, database `appdb`, processes ended
    /// gracefully, a hung command killed after 180 s (several times what the
    /// slowest one, a switchover that waits for the new states, needs on a
    /// busy 2-core machine).
    pub fn new(bin: PathBuf, dir: Workdir) -> Options {
        Options {
            bin,
            dir,
            tls: Tls::SelfSigned,
            dbname: "appdb".into(),
            os_user: None,
            monitor_listen: None,
            node_listen: None,
            stop: Stop::Graceful,
            own_process_groups: true,
            exits_fail_waits: true,
            command_timeout: Duration::from_secs(180),
            start_timeout: Duration::from_secs(180),
            verbose: false,
        }
    }
}

/// One node of the cluster.
#[derive(Debug, Clone)]
pub struct Node {
    /// Node name, also its process's name and its data directory's (`./name`).
    pub name: String,
    /// Data directory.
    pub pgdata: PathBuf,
    /// Postgres port.
    pub port: u16,
}

/// How a node is created.
#[derive(Debug, Clone)]
pub struct NodeSpec<'a> {
    pub name: &'a str,
    /// The address others reach it at (`--hostname`).
    pub hostname: &'a str,
    /// `--listen` (None: [`Options::node_listen`]).
    pub listen: Option<&'a str>,
    /// The monitor as the node reaches it (None: `show uri --monitor-uri`).
    pub monitor_uri: Option<&'a str>,
    /// A command prefix its `hapg` runs under, such as `ip netns exec NS`
    /// (it must exec the program, so that the process stays the one signalled).
    pub wrapper: &'a [&'a str],
}

impl<'a> NodeSpec<'a> {
    /// Node `name` at `localhost`, on this machine.
    pub fn new(name: &'a str) -> NodeSpec<'a> {
        NodeSpec {
            name,
            hostname: "localhost",
            listen: None,
            monitor_uri: None,
            wrapper: &[],
        }
    }
}

/// How a router is configured.
#[derive(Debug, Clone, Default)]
pub struct RouterSpec {
    /// Its process name (log `<name>.log`, configuration `<name>.toml`).
    pub name: String,
    /// The id it registers with (None: `<name>-<port>`).
    pub id: Option<String>,
    /// Lines appended to the `[router]` section.
    pub router_lines: String,
    /// Sections appended after `[auth]` (trust).
    pub sections: String,
}

impl RouterSpec {
    /// Router `name` with trust authentication and the router's defaults.
    pub fn new(name: &str) -> RouterSpec {
        RouterSpec {
            name: name.into(),
            ..RouterSpec::default()
        }
    }
}

/// A `hapg router run` process.
#[derive(Debug, Clone)]
pub struct Router {
    /// The process name in the cluster (its log is `<name>.log`).
    pub name: String,
    /// The router id registered with the monitor.
    pub id: String,
    /// The loopback port clients connect to.
    pub port: u16,
    /// Its configuration file.
    pub config: PathBuf,
}

impl Router {
    /// A client URI through the router, as user `postgres`, to `dbname`.
    pub fn uri(&self, dbname: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{dbname}", self.port)
    }
}

/// How long a `hapg ... --run` may take to stop Postgres after SIGTERM (and
/// a router to drain).
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a process may take to get past its port check.
const PORT_CHECK: Duration = Duration::from_secs(15);
/// How long a router may take to listen.
const ROUTER_START: Duration = Duration::from_secs(30);

/// A monitor, nodes and routers run by real `hapg` processes in one directory.
pub struct Cluster {
    options: Options,
    path: PathBuf,
    temp: Option<tempfile::TempDir>,
    kept: AtomicBool,
    procs: Mutex<Supervisor>,
    /// The monitor's Postgres port (0 before it is started).
    pub monitor_port: u16,
    /// A monitor store the cluster does not run itself (an `etcd://` URI
    /// served by `hapg monitor run` services): what every command, node and
    /// router is given instead of the monitor of `./monitor`.
    store_uri: Option<String>,
    /// The nodes created, in order.
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Makes the cluster's directory (readable by the `postgres` OS user,
    /// which runs Postgres when the caller is root); nothing runs yet.
    pub fn create(options: Options) -> Result<Cluster, ClusterError> {
        let io = |what: &str, path: &Path| {
            let what = format!("{what} {}", path.display());
            move |error| ClusterError::Io { what, error }
        };
        let (path, temp) = match &options.dir {
            Workdir::Temp { parent, prefix } => {
                std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
                let temp = tempfile::Builder::new()
                    .prefix(prefix)
                    .tempdir_in(parent)
                    .map_err(io("creating a directory in", parent))?;
                (temp.path().to_path_buf(), Some(temp))
            }
            Workdir::Given(dir) => {
                std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
                let path = hapg_keeper::paths::absolute(dir)
                    .map_err(|e| std::io::Error::other(e.to_string()))
                    .map_err(io("resolving", dir))?;
                let mut entries = std::fs::read_dir(&path).map_err(io("reading", &path))?;
                if entries.next().is_some() {
                    return Err(ClusterError::NotEmpty(path));
                }
                (path, None)
            }
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .map_err(io("chmod", &path))?;
        Ok(Cluster {
            kept: AtomicBool::new(temp.is_none()),
            procs: Mutex::new(Supervisor::new(options.own_process_groups, options.verbose)),
            options,
            path,
            temp,
            monitor_port: 0,
            store_uri: None,
            nodes: Vec::new(),
        })
    }

    /// The cluster's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How the cluster was made.
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// Keeps the directory when the cluster ends (to read its logs).
    pub fn keep(&self) {
        self.kept.store(true, Ordering::SeqCst);
    }

    /// Whether the directory stays when the cluster ends.
    pub fn is_kept(&self) -> bool {
        self.kept.load(Ordering::SeqCst)
    }

    fn procs(&self) -> MutexGuard<'_, Supervisor> {
        // A panic elsewhere while holding it leaves the list usable.
        self.procs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A `hapg` command in this cluster's directory, with its configuration
    /// kept there too and no `PGDATA`, `PGPORT` or monitor from the caller.
    pub fn hapg(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.options.bin);
        cmd.args(args)
            .current_dir(&self.path)
            .env("XDG_CONFIG_HOME", self.path.join("xdg/config"))
            .env("XDG_DATA_HOME", self.path.join("xdg/data"))
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .env_remove("PG_AUTOCTL_MONITOR");
        cmd
    }

    /// Runs `hapg args` to completion within [`Options::command_timeout`]
    /// (killed after it: a hung command fails its caller instead of holding it).
    pub fn run(&self, args: &[&str]) -> Result<Output, ClusterError> {
        let (timeout, own_group) = (
            self.options.command_timeout,
            self.options.own_process_groups,
        );
        process::run_within(self.hapg(args), timeout, own_group).map_err(|error| {
            if error.kind() == std::io::ErrorKind::Interrupted {
                return ClusterError::Interrupted;
            }
            ClusterError::Command {
                args: args.join(" "),
                error,
            }
        })
    }

    /// Runs `hapg args`, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> Result<String, ClusterError> {
        let out = self.run(args)?;
        if !out.status.success() {
            return Err(ClusterError::Failed {
                args: args.join(" "),
                status: out.status,
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The log file of process `name`.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.path.join(format!("{name}.log"))
    }

    /// The log of process `name` (empty if it has none).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    /// The last 40 lines of every running process's log, for failure messages.
    pub fn all_logs(&self) -> String {
        let names = self.procs().names();
        names
            .iter()
            .map(|n| format!("--- {n}\n{}", log_tail(&self.log_path(n), 40)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Starts `hapg args` in the background as `name`, logging to `<name>.log`.
    pub fn spawn(&self, name: &str, args: &[&str]) -> Result<(), ClusterError> {
        self.spawn_command(name, self.hapg(args))
    }

    /// Starts `cmd` (a `hapg` command, possibly wrapped) in the background as
    /// `name`, logging to `<name>.log` at level info. A process already
    /// called `name` is not stopped: it is only renamed.
    pub fn spawn_command(&self, name: &str, mut cmd: Command) -> Result<(), ClusterError> {
        cmd.env("HAPG_LOG", "info");
        self.spawn_service(name, cmd, STOP_TIMEOUT, Session::Shared)
    }

    /// Starts any program in the background as `name` (logging to
    /// `<name>.log`), to be stopped with the cluster: a proxy measured
    /// beside the router, for example.
    pub fn spawn_service(
        &self,
        name: &str,
        cmd: Command,
        stop_timeout: Duration,
        session: Session,
    ) -> Result<(), ClusterError> {
        let log = self.log_path(name);
        self.procs().spawn(name, cmd, &log, stop_timeout, session)
    }

    /// The pid of process `name`, if it was started and not stopped.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.procs().pid(name)
    }

    /// Fails (with the end of its log) if process `name` was started and has exited.
    pub fn check_alive(&self, name: &str) -> Result<(), ClusterError> {
        let exited = self.procs().exited(name);
        match exited {
            None => Ok(()),
            Some((status, log)) => Err(ClusterError::Exited {
                name: name.into(),
                status,
                tail: log_tail(&log, 30),
                log,
            }),
        }
    }

    /// Calls `check` every `every` until it holds; fails after `timeout`, on
    /// an error of `check`, on interrupt, or (with
    /// [`Options::exits_fail_waits`]) when a process of `watch` has exited.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        every: Duration,
        watch: &[&str],
        mut check: impl FnMut() -> Result<bool, ClusterError>,
    ) -> Result<(), ClusterError> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.options.exits_fail_waits {
                for name in watch {
                    self.check_alive(name)?;
                }
            }
            if check()? {
                return Ok(());
            }
            sleep(every)?;
        }
        Err(ClusterError::Timeout {
            what: what.into(),
            timeout,
            last: String::new(),
        })
    }

    /// Starts the listener `name` (data directory `./name` if it has one) on
    /// a free port, with `command` for a port; tries another port when the
    /// one handed out was taken meanwhile. Returns the port.
    fn start_on_free_port(
        &self,
        name: &str,
        command: impl Fn(u16) -> Command,
        listening: impl Fn(u16) -> bool,
    ) -> Result<u16, ClusterError> {
        for _ in 0..ports::ATTEMPTS {
            let port = free_port()?;
            self.spawn_command(name, command(port))?;
            if !self.refused_its_port(name, || listening(port))? {
                return Ok(port);
            }
        }
        Err(ClusterError::NoFreePort {
            what: format!("starting {name}"),
        })
    }

    /// Whether process `name`, just started, ended at once because its port
    /// was taken (hapg checks before it writes anything, so trying again
    /// with another port is clean). Waits (bounded) until it is past that
    /// check: it ended, or `started` holds.
    fn refused_its_port(
        &self,
        name: &str,
        started: impl Fn() -> bool,
    ) -> Result<bool, ClusterError> {
        let deadline = Instant::now() + PORT_CHECK;
        while Instant::now() < deadline {
            if self.procs().exited(name).is_some() {
                if !self.log(name).contains("already in use") {
                    return Ok(false);
                }
                eprintln!("{name}: its port was taken meanwhile, trying another");
                self.procs().forget_if_exited(name);
                let _ = std::fs::remove_file(self.log_path(name));
                return Ok(true);
            }
            if started() {
                return Ok(false);
            }
            sleep(Duration::from_millis(20))?;
        }
        Ok(false)
    }

    fn tls_flag(&self) -> &'static str {
        match self.options.tls {
            Tls::SelfSigned => "--ssl-self-signed",
            Tls::Off => "--no-ssl",
        }
    }

    /// Creates and runs the monitor (`create monitor --pgdata ./monitor ...
    /// --run`, trust authentication) and waits until it answers.
    pub fn start_monitor(&mut self) -> Result<(), ClusterError> {
        let pgdata = self.path.join("monitor");
        let port = self.start_on_free_port(
            "monitor",
            |port| {
                let port = port.to_string();
                let mut args = vec![
                    "create",
                    "monitor",
                    "--pgdata",
                    "./monitor",
                    "--pgport",
                    &port,
                    "--hostname",
                    "localhost",
                ];
                if let Some(listen) = &self.options.monitor_listen {
                    args.extend(["--listen", listen]);
                }
                args.extend(["--auth", "trust", self.tls_flag()]);
                if let Some(user) = &self.options.os_user {
                    args.extend(["--os-user", user]);
                }
                args.push("--run");
                self.hapg(&args)
            },
            |_| pgdata.exists(),
        )?;
        self.monitor_port = port;
        self.wait_until(
            "the monitor to answer",
            self.options.start_timeout,
            Duration::from_millis(100),
            &["monitor"],
            || {
                Ok(self
                    .run(&["show", "state", "--pgdata", "./monitor"])?
                    .status
                    .success())
            },
        )
    }

    /// Uses the monitor store at `uri` (an `etcd://` URI whose monitor
    /// services the caller runs) instead of a monitor in `./monitor`: nodes,
    /// routers and the waits go there.
    pub fn use_store(&mut self, uri: &str) {
        self.store_uri = Some(uri.to_string());
    }

    /// How a `hapg` command finds the monitor: `--pgdata ./monitor`, or
    /// `--monitor URI` with [`Cluster::use_store`].
    pub fn monitor_args(&self) -> Vec<&str> {
        match &self.store_uri {
            Some(uri) => vec!["--monitor", uri.as_str()],
            None => vec!["--pgdata", "./monitor"],
        }
    }

    /// The monitor's URI, as `show uri --monitor-uri` prints it (or the
    /// store's, with [`Cluster::use_store`]).
    pub fn monitor_uri(&self) -> Result<String, ClusterError> {
        if let Some(uri) = &self.store_uri {
            return Ok(uri.clone());
        }
        Ok(self
            .ok(&["show", "uri", "--pgdata", "./monitor", "--monitor-uri"])?
            .trim()
            .to_string())
    }

    /// The formation's multi-host URI (`show uri --formation default`).
    pub fn formation_uri(&self) -> Result<String, ClusterError> {
        let mut args = vec!["show", "uri", "--formation", "default"];
        args.extend(self.monitor_args());
        Ok(self.ok(&args)?.trim().to_string())
    }

    /// The formation's multi-host URI with the `postgres` user, as applications use it.
    pub fn app_uri(&self) -> Result<String, ClusterError> {
        Ok(self
            .formation_uri()?
            .replacen("postgres://", "postgres://postgres@", 1))
    }

    /// Creates and runs node `name` on this machine.
    pub fn start_node(&mut self, name: &str) -> Result<Node, ClusterError> {
        self.start_node_with(&NodeSpec::new(name))
    }

    /// Creates and runs a node (`create postgres --pgdata ./name ... --run`,
    /// trust authentication) on a free port; does not wait for its state.
    pub fn start_node_with(&mut self, spec: &NodeSpec<'_>) -> Result<Node, ClusterError> {
        let monitor_uri = match spec.monitor_uri {
            Some(uri) => uri.to_string(),
            None => self.monitor_uri()?,
        };
        let name = spec.name;
        let pgdata = self.path.join(name);
        let listen = spec.listen.or(self.options.node_listen.as_deref());
        let port = self.start_on_free_port(
            name,
            |port| {
                let port = port.to_string();
                let pgdata = format!("./{name}");
                let mut args = vec![
                    "create",
                    "postgres",
                    "--pgdata",
                    &pgdata,
                    "--pgport",
                    &port,
                    "--hostname",
                    spec.hostname,
                ];
                if let Some(listen) = listen {
                    args.extend(["--listen", listen]);
                }
                args.extend([
                    "--name",
                    name,
                    "--dbname",
                    &self.options.dbname,
                    "--auth",
                    "trust",
                    self.tls_flag(),
                    "--monitor",
                    &monitor_uri,
                ]);
                if let Some(user) = &self.options.os_user {
                    args.extend(["--os-user", user]);
                }
                args.push("--run");
                wrapped(self.hapg(&args), spec.wrapper)
            },
            |_| pgdata.exists() || self.log(name).contains("registered with the monitor"),
        )?;
        let node = Node {
            name: name.to_string(),
            pgdata,
            port,
        };
        self.nodes.retain(|n| n.name != name);
        self.nodes.push(node.clone());
        Ok(node)
    }

    /// Runs node `name` again (`hapg run --pgdata ./name`) after it was
    /// stopped or powered off, under `wrapper` as it was created.
    pub fn run_node(&self, name: &str, wrapper: &[&str]) -> Result<(), ClusterError> {
        let pgdata = format!("./{name}");
        let cmd = wrapped(self.hapg(&["run", "--pgdata", &pgdata]), wrapper);
        self.spawn_command(name, cmd)
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The monitor, then `names` in order, each waited for: the first ends
    /// up primary (`single` while alone) and the others secondaries.
    pub fn start_formation(
        &mut self,
        names: &[&str],
        timeout: Duration,
    ) -> Result<(), ClusterError> {
        self.start_monitor()?;
        for (i, name) in names.iter().enumerate() {
            self.start_node(name)?;
            if i == 0 {
                self.wait_states(&[(name, "single")], timeout)?;
            }
        }
        if names.len() > 1 {
            let want: Vec<(&str, &str)> = names
                .iter()
                .enumerate()
                .map(|(i, n)| (*n, if i == 0 { "primary" } else { "secondary" }))
                .collect();
            self.wait_states(&want, timeout)?;
        }
        Ok(())
    }

    /// `show state --json` as (name -> (reported, assigned)).
    pub fn states(&self) -> Result<BTreeMap<String, (String, String)>, ClusterError> {
        let mut args = vec!["show", "state", "--json"];
        args.extend(self.monitor_args());
        let json = self.ok(&args)?;
        Ok(parse_states(&json))
    }

    /// Waits until every listed node is reported and assigned its listed state.
    pub fn wait_states(
        &self,
        want: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<(), ClusterError> {
        let what = want
            .iter()
            .map(|(name, state)| format!("{name} {state}"))
            .collect::<Vec<_>>()
            .join(", ");
        let names: Vec<&str> = want.iter().map(|(name, _)| *name).collect();
        let mut last = BTreeMap::new();
        let waited = self.wait_until(&what, timeout, Duration::from_millis(200), &names, || {
            // A monitor busy or restarting is asked again at the next poll.
            last = match self.states() {
                Ok(states) => states,
                Err(ClusterError::Interrupted) => return Err(ClusterError::Interrupted),
                Err(_) => BTreeMap::new(),
            };
            Ok(converged(&last, want))
        });
        match waited {
            Err(ClusterError::Timeout { what, timeout, .. }) => Err(ClusterError::Timeout {
                what,
                timeout,
                last: format!("; last seen {last:?}"),
            }),
            other => other,
        }
    }

    /// Writes `<name>.toml` (a free loopback port, the monitor's URI, trust
    /// authentication, the spec's lines) and starts `hapg router run
    /// --config` on it; waits (bounded) until it accepts TCP connections.
    pub fn start_router(&self, spec: &RouterSpec) -> Result<Router, ClusterError> {
        let name = spec.name.as_str();
        let config = self.path.join(format!("{name}.toml"));
        let monitor = self.monitor_uri()?;
        let config_arg = config.display().to_string();
        let id = std::cell::RefCell::new(String::new());
        let write_error = std::cell::RefCell::new(None);
        let port = self.start_on_free_port(
            name,
            |port| {
                let router_id = spec.id.clone().unwrap_or_else(|| format!("{name}-{port}"));
                let text = router_toml(port, &monitor, &router_id, spec);
                if let Err(error) = std::fs::write(&config, text) {
                    write_error.replace(Some(error));
                }
                id.replace(router_id);
                self.hapg(&["router", "run", "--config", &config_arg])
            },
            listening,
        )?;
        if let Some(error) = write_error.into_inner() {
            return Err(ClusterError::Io {
                what: format!("writing {}", config.display()),
                error,
            });
        }
        let router = Router {
            name: name.to_string(),
            id: id.into_inner(),
            port,
            config,
        };
        self.wait_listening(&router)?;
        Ok(router)
    }

    /// Starts a router again with the same configuration (same port and id);
    /// waits (bounded) until it accepts TCP connections.
    pub fn restart_router(&self, router: &Router) -> Result<(), ClusterError> {
        let config = router.config.display().to_string();
        self.spawn(&router.name, &["router", "run", "--config", &config])?;
        self.wait_listening(router)
    }

    fn wait_listening(&self, router: &Router) -> Result<(), ClusterError> {
        let what = format!("{} to listen on port {}", router.name, router.port);
        self.wait_until(
            &what,
            ROUTER_START,
            Duration::from_millis(50),
            &[&router.name],
            || Ok(listening(router.port)),
        )
    }

    /// SIGKILLs process `name` only, leaving what it started (a node's
    /// Postgres) running: a crash of the keeper or of a router.
    pub fn kill_process(&self, name: &str) {
        self.procs().kill_process(name);
    }

    /// Power-off of a node: SIGKILL of its `hapg` process (with its process
    /// group, if it has one) and its Postgres together.
    pub fn power_off(&self, name: &str) {
        let postmaster = crate::drill::postmaster_pid(&self.path.join(name));
        self.procs().kill_group(name);
        if let Some(pid) = postmaster {
            crate::drill::kill_tree(pid);
        }
    }

    /// Stops process `name` with SIGTERM and waits (bounded) for it; its
    /// process group is killed if it does not stop in time.
    pub fn terminate(&self, name: &str) {
        self.procs().stop(name);
    }

    /// Stops every process, newest first (as [`Options::stop`] says), then
    /// any Postgres still running in the cluster's directory.
    pub fn stop_all(&self) {
        let how = self.options.stop;
        self.procs().stop_all(how);
        // Postgres outlives a killed keeper: end every instance the cluster made.
        for entry in std::fs::read_dir(&self.path)
            .into_iter()
            .flatten()
            .flatten()
        {
            end_postmaster(&entry.path(), how);
        }
    }

    /// Stops everything and removes the directory unless it is kept; unlike
    /// drop, says if the removal failed.
    pub fn close(mut self) -> Result<(), ClusterError> {
        self.stop_all();
        if let Some(temp) = self.temp.take() {
            if self.is_kept() {
                let _ = temp.keep();
            } else {
                let path = temp.path().to_path_buf();
                temp.close().map_err(|error| ClusterError::Io {
                    what: format!("removing {}", path.display()),
                    error,
                })?;
            }
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_all();
        if self.is_kept() {
            if let Some(temp) = self.temp.take() {
                let _ = temp.keep();
            }
        }
    }
}

/// Whether something accepts TCP connections on loopback `port`.
fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// The router's configuration file.
fn router_toml(port: u16, monitor: &str, id: &str, spec: &RouterSpec) -> String {
    let quote = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    format!(
        "[router]\nlisten = \"127.0.0.1:{port}\"\nmonitor = \"{}\"\nformation = \"default\"\nid = \"{}\"\n{}\n\n[auth]\ntype = \"trust\"\n{}",
        quote(monitor),
        quote(id),
        spec.router_lines,
        spec.sections
    )
}

/// `cmd` run by `wrapper` (a command prefix such as `ip netns exec NS`, which
/// execs the program: the process stays the one the harness signals).
fn wrapped(cmd: Command, wrapper: &[&str]) -> Command {
    let Some((program, args)) = wrapper.split_first() else {
        return cmd;
    };
    let mut outer = Command::new(program);
    outer
        .args(args)
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .envs(cmd.get_envs().filter_map(|(k, v)| Some((k, v?))));
    for (key, value) in cmd.get_envs() {
        if value.is_none() {
            outer.env_remove(key);
        }
    }
    if let Some(dir) = cmd.get_current_dir() {
        outer.current_dir(dir);
    }
    outer
}

/// `show state --json` as (name -> (reported, assigned)); empty if it is not that.
fn parse_states(json: &str) -> BTreeMap<String, (String, String)> {
    let value: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    value
        .as_array()
        .map(|nodes| {
            nodes
                .iter()
                .map(|n| {
                    (
                        text(&n["name"]),
                        (text(&n["reported_state"]), text(&n["assigned_state"])),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Whether every listed node is reported and assigned its listed state.
fn converged(states: &BTreeMap<String, (String, String)>, want: &[(&str, &str)]) -> bool {
    want.iter().all(|(name, state)| {
        states
            .get(*name)
            .is_some_and(|(reported, goal)| reported == state && goal == state)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converged_needs_reported_and_assigned() {
        let json = r#"[{"name":"node1","reported_state":"single","assigned_state":"single"},
                       {"name":"node2","reported_state":"catchingup","assigned_state":"secondary"}]"#;
        let states = parse_states(json);
        assert!(converged(&states, &[("node1", "single")]));
        assert!(!converged(&states, &[("node1", "primary")]));
        assert!(!converged(&states, &[("node2", "secondary")]));
        assert!(!converged(&states, &[("node3", "single")]));
        assert!(parse_states("not json").is_empty());
    }

    #[test]
    fn a_given_directory_must_be_empty_and_is_kept() {
        let parent = tempfile::tempdir().expect("temporary directory");
        let bin = PathBuf::from("/bin/false");
        let dir = parent.path().join("mine");
        let cluster = Cluster::create(Options::new(bin.clone(), Workdir::Given(dir.clone())))
            .expect("an empty directory");
        assert!(cluster.is_kept());
        std::fs::write(dir.join("x"), "x").expect("a file");
        cluster.close().expect("close");
        assert!(dir.join("x").exists(), "a given directory is kept");
        let refused = Cluster::create(Options::new(bin, Workdir::Given(dir)));
        assert!(matches!(refused, Err(ClusterError::NotEmpty(_))));
    }

    #[test]
    fn a_temporary_directory_goes_unless_kept() {
        let parent = tempfile::tempdir().expect("temporary directory");
        let temp = |prefix: &str| Workdir::Temp {
            parent: parent.path().to_path_buf(),
            prefix: prefix.into(),
        };
        let bin = PathBuf::from("/bin/false");
        let gone = Cluster::create(Options::new(bin.clone(), temp("gone-"))).expect("create");
        let gone_path = gone.path().to_path_buf();
        drop(gone);
        assert!(!gone_path.exists());
        let kept = Cluster::create(Options::new(bin, temp("kept-"))).expect("create");
        kept.keep();
        let kept_path = kept.path().to_path_buf();
        kept.close().expect("close");
        assert!(kept_path.is_dir());
    }
}
