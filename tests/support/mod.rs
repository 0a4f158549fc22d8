//! Test harness: real `hapg` processes and real PostgreSQL 15 servers on free
//! loopback ports in a temporary directory, torn down on drop.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The hapg binary built for these tests.
pub fn hapg_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hapg"))
}

/// How many ports a start tries before giving up.
const PORT_ATTEMPTS: usize = 5;

/// A free TCP port on loopback (bind 0, read it, release it).
pub fn free_port() -> u16 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind a free port");
        // Never hand out the same port twice in one process.
        if LAST.swap(u64::from(port), Ordering::SeqCst) != u64::from(port) {
            return port;
        }
    }
}

/// The longest a `hapg` command run by [`Cluster::run`] may take. Several
/// times what the slowest one (a switchover that waits for the new states)
/// needs on a busy 2-core machine.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(180);

/// Runs `cmd` with its output captured, like [`Command::output`], but kills
/// it (SIGKILL) and returns an error saying what it printed if it has not
/// ended within `timeout`.
pub fn output_within(mut cmd: Command, timeout: Duration) -> std::io::Result<Output> {
    use std::io::Read;
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    // Read both pipes while waiting, so a chatty command cannot fill one and block.
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "{:?} did not end within {timeout:?} and was killed\nstdout: {}\nstderr: {}",
                cmd.get_args().collect::<Vec<_>>(),
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            ),
        )),
    }
}

/// One node of the test cluster.
#[derive(Debug, Clone)]
pub struct Node {
    /// Node name.
    pub name: String,
    /// Data directory.
    pub pgdata: PathBuf,
    /// Postgres port.
    pub port: u16,
}

/// A monitor and nodes run by real `hapg` processes in a temporary directory.
pub struct Cluster {
    /// Removed on drop unless HAPG_TEST_KEEP is set (to look at logs after a failure).
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    children: Mutex<BTreeMap<String, Child>>,
    pub monitor_port: u16,
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// An empty cluster directory (no monitor yet).
    pub fn new() -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("hapg-test-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        // Postgres runs as another OS user when the tests run as root: it must
        // be able to reach the data directories.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod temp dir");
        Cluster {
            path: dir.path().to_path_buf(),
            dir: Some(dir),
            children: Mutex::new(BTreeMap::new()),
            monitor_port: 0,
            nodes: Vec::new(),
        }
    }

    /// The cluster's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A `hapg` command with this cluster's environment.
    pub fn hapg(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(hapg_bin());
        cmd.args(args)
            .current_dir(self.path())
            .env("XDG_CONFIG_HOME", self.path().join("xdg/config"))
            .env("XDG_DATA_HOME", self.path().join("xdg/data"))
            .env_remove("PGDATA")
            .env_remove("PG_AUTOCTL_MONITOR")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `hapg args` to completion, or kills it and panics after
    /// [`CLI_TIMEOUT`]: a CLI call that hangs fails its test instead of
    /// holding CI.
    pub fn run(&self, args: &[&str]) -> Output {
        output_within(self.hapg(args), CLI_TIMEOUT)
            .unwrap_or_else(|e| panic!("hapg {args:?}: {e}\nlogs:\n{}", self.all_logs()))
    }

    /// Runs `hapg args`, which must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "hapg {args:?} failed:\nstdout: {}\nstderr: {}\nlogs:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.all_logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `hapg args`, which must fail; returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "hapg {args:?} should have failed:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Starts `hapg args` in the background, logging to `<name>.log`.
    pub fn spawn(&self, name: &str, args: &[&str]) {
        self.spawn_command(name, self.hapg(args));
    }

    /// Starts `cmd` (a `hapg` command, possibly wrapped, as in `ip netns
    /// exec`) in the background, logging to `<name>.log`.
    pub fn spawn_command(&self, name: &str, mut cmd: Command) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path().join(format!("{name}.log")))
            .expect("log file");
        let child = cmd
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .env("HAPG_LOG", "info")
            .spawn()
            .expect("spawn hapg");
        self.children
            .lock()
            .expect("children")
            .insert(name.to_string(), child);
    }

    /// The log of a background process, for assertion messages.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Creates and runs the monitor (`create monitor ... --run`), waits until
    /// it answers. A port taken between [`free_port`] and `create` is
    /// replaced by another, as the router's test harness does.
    pub fn start_monitor(&mut self) {
        for _ in 0..PORT_ATTEMPTS {
            self.monitor_port = free_port();
            let port = self.monitor_port.to_string();
            self.spawn(
                "monitor",
                &[
                    "create",
                    "monitor",
                    "--pgdata",
                    "./monitor",
                    "--pgport",
                    &port,
                    "--hostname",
                    "localhost",
                    "--auth",
                    "trust",
                    "--ssl-self-signed",
                    "--run",
                ],
            );
            if !self.refused_its_port("monitor") {
                break;
            }
        }
        self.eventually("the monitor to answer", Duration::from_secs(60), || {
            let out = self.run(&["show", "state", "--pgdata", "./monitor"]);
            out.status.success()
        });
    }

    /// Whether the `create` just spawned as `name` (data directory
    /// `./name`) ended at once because its port was taken: hapg checks
    /// before it writes anything, so trying again with another port is
    /// clean. Waits (bounded) until the process is past that check: it
    /// ended, or it created its data directory (initdb) or registered with
    /// the monitor.
    fn refused_its_port(&self, name: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(15);
        let pgdata = self.path().join(name);
        while Instant::now() < deadline {
            let ended = self
                .children
                .lock()
                .expect("children")
                .get_mut(name)
                .is_none_or(|child| child.try_wait().ok().flatten().is_some());
            let log = self.log(name);
            if ended {
                if !log.contains("is already in use") {
                    return false;
                }
                eprintln!("{name}: its port was taken meanwhile, trying another");
                self.children.lock().expect("children").remove(name);
                let _ = std::fs::remove_file(self.path().join(format!("{name}.log")));
                return true;
            }
            if pgdata.exists() || log.contains("registered with the monitor") {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The monitor's URI, as `show uri --monitor-uri` prints it.
    pub fn monitor_uri(&self) -> String {
        self.ok(&["show", "uri", "--pgdata", "./monitor", "--monitor-uri"])
            .trim()
            .to_string()
    }

    /// Creates and runs a node (`create postgres ... --run`).
    pub fn start_node(&mut self, name: &str) -> Node {
        let uri = self.monitor_uri();
        self.start_node_at(name, "localhost", &uri, &[])
    }

    /// Creates and runs a node that others reach at `hostname` and that
    /// reaches the monitor at `monitor_uri`, its `hapg` command run under
    /// `wrapper` (such as `ip netns exec NS`) when given.
    pub fn start_node_at(
        &mut self,
        name: &str,
        hostname: &str,
        monitor_uri: &str,
        wrapper: &[&str],
    ) -> Node {
        for _ in 1..PORT_ATTEMPTS {
            let node = self.spawn_node_at(name, hostname, monitor_uri, wrapper);
            if !self.refused_its_port(name) {
                return node;
            }
        }
        self.spawn_node_at(name, hostname, monitor_uri, wrapper)
    }

    fn spawn_node_at(
        &mut self,
        name: &str,
        hostname: &str,
        monitor_uri: &str,
        wrapper: &[&str],
    ) -> Node {
        let port = free_port();
        let node = Node {
            name: name.to_string(),
            pgdata: self.path().join(name),
            port,
        };
        let pgdata = format!("./{name}");
        let port_s = port.to_string();
        let args = [
            "create",
            "postgres",
            "--pgdata",
            &pgdata,
            "--pgport",
            &port_s,
            "--hostname",
            hostname,
            "--name",
            name,
            "--dbname",
            "appdb",
            "--auth",
            "trust",
            "--ssl-self-signed",
            "--monitor",
            monitor_uri,
            "--run",
        ];
        let cmd = match wrapper.split_first() {
            None => self.hapg(&args),
            Some((program, wrapper_args)) => {
                let inner = self.hapg(&args);
                let mut cmd = Command::new(program);
                cmd.args(wrapper_args)
                    .arg(inner.get_program())
                    .args(inner.get_args())
                    .current_dir(self.path())
                    .envs(inner.get_envs().filter_map(|(k, v)| Some((k, v?))))
                    .env_remove("PGDATA")
                    .env_remove("PG_AUTOCTL_MONITOR")
                    .stdin(Stdio::null());
                cmd
            }
        };
        self.spawn_command(name, cmd);
        self.nodes.retain(|n| n.name != name);
        self.nodes.push(node.clone());
        node
    }

    /// Kills a node's `hapg` process only (SIGKILL), leaving its Postgres running.
    pub fn power_off_keeper_only(&self, name: &str) {
        if let Some(mut child) = self.children.lock().expect("children").remove(name) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A running formation: the monitor, then `names` in order; the first ends
    /// up primary and the others secondaries.
    pub fn formation(names: &[&str], timeout: Duration) -> Cluster {
        let mut cluster = Cluster::new();
        cluster.start_monitor();
        for (i, name) in names.iter().enumerate() {
            cluster.start_node(name);
            if i == 0 {
                cluster.wait_states(&[(name, "single")], timeout);
            }
        }
        let want: Vec<(&str, &str)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (*n, if i == 0 { "primary" } else { "secondary" }))
            .collect();
        if names.len() > 1 {
            cluster.wait_states(&want, timeout);
        }
        cluster
    }

    /// The formation's multi-host URI with the `postgres` user, as applications use it.
    pub fn app_uri(&self) -> String {
        self.formation_uri()
            .replacen("postgres://", "postgres://postgres@", 1)
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// `show state --json` as (name -> (reported, assigned)).
    pub fn states(&self) -> BTreeMap<String, (String, String)> {
        let out = self.run(&["show", "state", "--pgdata", "./monitor", "--json"]);
        if !out.status.success() {
            return BTreeMap::new();
        }
        let json: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        json.as_array()
            .map(|nodes| {
                nodes
                    .iter()
                    .map(|n| {
                        (
                            n["name"].as_str().unwrap_or_default().to_string(),
                            (
                                n["reported_state"].as_str().unwrap_or_default().to_string(),
                                n["assigned_state"].as_str().unwrap_or_default().to_string(),
                            ),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until every listed node is converged in its listed state.
    pub fn wait_states(&self, want: &[(&str, &str)], timeout: Duration) {
        let what = format!("states {want:?}");
        let mut last = BTreeMap::new();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            last = self.states();
            let done = want.iter().all(|(name, state)| {
                last.get(*name)
                    .is_some_and(|(r, g)| r == state && g == state)
            });
            if done {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "timed out after {timeout:?} waiting for {what}; last seen {last:?}\nevents:\n{}\nlogs:\n{}",
            self.ok(&["show", "events", "--pgdata", "./monitor", "--count", "30"]),
            self.all_logs()
        );
    }

    /// Every background process's log, for failure messages.
    pub fn all_logs(&self) -> String {
        let names: Vec<String> = self
            .children
            .lock()
            .expect("children")
            .keys()
            .cloned()
            .collect();
        names
            .iter()
            .map(|n| {
                let log = self.log(n);
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                format!(
                    "--- {n}\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Polls `check` every 100 ms until it holds, or panics after `timeout`.
    pub fn eventually(&self, what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if check() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "timed out after {timeout:?} waiting for {what}\n{}",
            self.all_logs()
        );
    }

    /// Pid of the `hapg run` of a data directory.
    pub fn keeper_pid(&self, name: &str) -> Option<i32> {
        self.children
            .lock()
            .expect("children")
            .get(name)
            .map(|c| c.id() as i32)
    }

    /// Power-off of a node: SIGKILL its hapg process and its Postgres together.
    pub fn power_off(&self, name: &str) {
        let node = self.node(name);
        let postmaster = postmaster_pid(&node.pgdata);
        if let Some(mut child) = self.children.lock().expect("children").remove(name) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(pid) = postmaster {
            kill_tree(pid);
        }
    }

    /// Stops a background process with SIGTERM and waits for it.
    pub fn terminate(&self, name: &str) {
        if let Some(mut child) = self.children.lock().expect("children").remove(name) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The formation's multi-host URI (`show uri --formation default`).
    pub fn formation_uri(&self) -> String {
        self.ok(&[
            "show",
            "uri",
            "--pgdata",
            "./monitor",
            "--formation",
            "default",
        ])
        .trim()
        .to_string()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let children: Vec<(String, Child)> =
            std::mem::take(&mut *self.children.lock().unwrap_or_else(|e| e.into_inner()))
                .into_iter()
                .collect();
        for (_, mut child) in children {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Postgres outlives its killed keeper: stop every instance we made.
        for entry in std::fs::read_dir(self.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Some(pid) = postmaster_pid(&entry.path()) {
                kill_tree(pid);
            }
            remove_stale_socket(&entry.path());
        }
        if std::env::var_os("HAPG_TEST_KEEP").is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!("keeping {}", dir.keep().display());
            }
        }
    }
}

/// Removes the Unix socket and its lock file (in `/tmp`, shared by every
/// run) that a SIGKILLed postmaster of `pgdata` left behind: Postgres removes
/// them itself only when it shuts down. Only files whose lock names that
/// postmaster, now dead, are touched.
fn remove_stale_socket(pgdata: &Path) {
    // postmaster.pid: pid, data directory, start time, port, socket directory, ...
    let Ok(text) = std::fs::read_to_string(pgdata.join("postmaster.pid")) else {
        return;
    };
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let (Some(pid), Some(port), Some(socket_dir)) = (lines.first(), lines.get(3), lines.get(4))
    else {
        return;
    };
    let Ok(pid_number) = pid.parse::<i32>() else {
        return;
    };
    if socket_dir.is_empty() || hapg_keeper::pidfile::process_alive(pid_number) {
        return;
    }
    let socket = Path::new(socket_dir).join(format!(".s.PGSQL.{port}"));
    let lock = Path::new(socket_dir).join(format!(".s.PGSQL.{port}.lock"));
    let lock_pid = std::fs::read_to_string(&lock).unwrap_or_default();
    if lock_pid.lines().next().map(str::trim) == Some(*pid) {
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(&lock);
    }
}

#[allow(unused_imports)]
pub use hapg::drill::{connect, kill_tree, postmaster_pid, Writer, WriterReport};

/// Waits (bounded) until `uri` accepts a write.
pub async fn wait_writable(uri: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(c) = connect(uri).await {
            if c.batch_execute("CREATE TEMP TABLE probe (x int)")
                .await
                .is_ok()
            {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{uri} did not accept writes within {timeout:?}");
}

/// A `hapg router run` process started by [`Cluster::start_router`].
#[derive(Debug, Clone)]
pub struct RouterProcess {
    /// The process name in the cluster (its log is `<name>.log`).
    pub name: String,
    /// The router id registered with the monitor.
    pub id: String,
    /// The loopback port clients connect to.
    pub port: u16,
    /// Its configuration file.
    pub config: PathBuf,
}

impl RouterProcess {
    /// A client URI through the router, as user `postgres`, to `dbname`.
    pub fn uri(&self, dbname: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{dbname}", self.port)
    }
}

impl Cluster {
    /// Writes `<name>.toml` into the cluster directory (a free loopback port,
    /// the monitor's URI, trust authentication, `extra` appended to the
    /// `[router]` section) and starts `hapg router run --config` on it; waits
    /// (bounded) until the router accepts TCP connections.
    pub fn start_router(&self, name: &str, extra: &str) -> RouterProcess {
        let port = free_port();
        let config = self.path().join(format!("{name}.toml"));
        let id = format!("{name}-{port}");
        let text = format!(
            "[router]\nlisten = \"127.0.0.1:{port}\"\nmonitor = \"{}\"\nformation = \"default\"\nid = \"{id}\"\n{extra}\n\n[auth]\ntype = \"trust\"\n",
            self.monitor_uri()
        );
        std::fs::write(&config, text).expect("write router config");
        let path = config.to_str().expect("utf-8 path").to_string();
        self.spawn(name, &["router", "run", "--config", &path]);
        self.eventually("the router to listen", Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        RouterProcess {
            name: name.to_string(),
            id,
            port,
            config,
        }
    }
}

impl Cluster {
    /// Crash of a router: SIGKILL of its process (its clients see their
    /// connections drop, new connections are refused).
    pub fn kill_router(&self, router: &RouterProcess) {
        self.power_off_keeper_only(&router.name);
    }

    /// Starts a router again with the same configuration (same port and id);
    /// waits (bounded) until it accepts TCP connections.
    pub fn restart_router(&self, router: &RouterProcess) {
        let path = router.config.to_str().expect("utf-8 path").to_string();
        self.spawn(&router.name, &["router", "run", "--config", &path]);
        let port = router.port;
        self.eventually(
            "the restarted router to listen",
            Duration::from_secs(30),
            || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        );
    }
}

/// When the monitor first assigned `node` the state `goal` after `after`
/// (seconds since the Unix epoch, from the event history).
pub async fn assigned_at(monitor_uri: &str, node: &str, goal: &str, after: f64) -> Option<f64> {
    connect(monitor_uri)
        .await
        .expect("connect to the monitor")
        .query_opt(
            "SELECT extract(epoch FROM event_time)::float8 FROM hapg.event
              WHERE node_name = $1 AND goal_state::text = $2
                AND event_time > to_timestamp($3)
              ORDER BY event_id LIMIT 1",
            &[&node, &goal, &after],
        )
        .await
        .expect("events")
        .map(|r| r.get(0))
}

/// The statement each writer had in flight when a primary was lost at
/// `lost_at` ended with an error of class 08 (connection exception) no later
/// than `bound` after `promoted_at`, it was the writer's only failure, and
/// the writer then wrote on the node at `new_port`. Returns, per writer, when
/// the in-flight statement ended, in seconds after `promoted_at` (negative:
/// before the promotion).
pub fn assert_in_flight_answered(
    reports: &[WriterReport],
    lost_at: f64,
    promoted_at: f64,
    bound: Duration,
    new_port: u16,
    logs: &dyn Fn() -> String,
) -> Vec<f64> {
    let mut ended = Vec::new();
    for (i, r) in reports.iter().enumerate() {
        let in_flight: Vec<&hapg::drill::Failure> = r
            .failures
            .iter()
            .filter(|f| f.ended_at >= lost_at)
            .collect();
        assert!(
            in_flight.len() == 1 && r.errors == 1,
            "writer {i}: expected exactly one failed statement (the one in flight), saw {} errors: {:?}\n{}",
            r.errors,
            r.failures,
            logs()
        );
        let f = in_flight[0];
        assert!(
            f.code.as_deref().is_some_and(|c| c.starts_with("08")),
            "writer {i}: the statement in flight did not end with a class 08 error: {f:?}\n{}",
            logs()
        );
        let after = f.ended_at - promoted_at;
        assert!(
            after <= bound.as_secs_f64(),
            "writer {i}: the statement in flight ended {after:.2} s after the promotion (bound {bound:?}): {f:?}\n{}",
            logs()
        );
        let moved = r
            .acks
            .iter()
            .any(|a| a.at > f.ended_at && a.port == Some(new_port));
        assert!(
            moved,
            "writer {i}: no acknowledged write on the new primary (port {new_port}) after the error\n{}",
            logs()
        );
        ended.push(after);
    }
    ended
}

/// A direct connection string to node `name`'s application database.
pub fn direct_uri(cluster: &Cluster, name: &str) -> String {
    format!(
        "postgres://postgres@127.0.0.1:{}/appdb",
        cluster.node(name).port
    )
}

/// Rows in `table` (or a `table WHERE ...`) at `uri`, if it answers within a
/// few seconds.
pub async fn rows(uri: &str, table: &str) -> Option<i64> {
    let client = tokio::time::timeout(Duration::from_secs(5), connect(uri))
        .await
        .ok()?
        .ok()?;
    let row = tokio::time::timeout(
        Duration::from_secs(5),
        client.query_one(&format!("SELECT count(*) FROM {table}"), &[]),
    )
    .await
    .ok()?
    .ok()?;
    Some(row.get(0))
}

/// Waits (at most 90 s) until `table` at `uri` holds more than `more_than`
/// rows, and returns how many it holds; panics with the cluster's logs.
pub async fn wait_rows(cluster: &Cluster, uri: &str, table: &str, more_than: i64) -> i64 {
    let within = Duration::from_secs(90);
    let deadline = Instant::now() + within;
    let mut last = None;
    while Instant::now() < deadline {
        last = rows(uri, table).await;
        if let Some(n) = last.filter(|n| *n > more_than) {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{table} at {uri}: no more than {more_than} rows within {within:?} (last {last:?})\n{}",
        cluster.all_logs()
    );
}
