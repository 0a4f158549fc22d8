//! Test harness: the `hapg` library's cluster harness ([`hapg::cluster`]),
//! real `hapg` processes and real PostgreSQL 15 servers on free loopback
//! ports in a temporary directory, torn down on drop; here every failure
//! panics with what the test needs to see (the monitor's events, the logs).

#![allow(dead_code)]

pub mod phase;

use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use hapg::cluster::{self, NodeSpec, Options, RouterSpec, Stop, Workdir};

#[allow(unused_imports)]
pub use hapg::cluster::{output_within, Node, Router as RouterProcess};

/// The hapg binary built for these tests.
pub fn hapg_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hapg"))
}

/// A free TCP port on loopback (bind 0, read it, release it).
pub fn free_port() -> u16 {
    cluster::free_port().expect("a free port")
}

/// The longest a `hapg` command run by [`Cluster::run`] may take. Several
/// times what the slowest one (a switchover that waits for the new states)
/// needs on a busy 2-core machine.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(180);

/// A monitor and nodes run by real `hapg` processes in a temporary directory
/// (kept when HAPG_TEST_KEEP is set, to look at logs after a failure).
pub struct Cluster {
    inner: cluster::Cluster,
}

impl Deref for Cluster {
    type Target = cluster::Cluster;
    fn deref(&self) -> &cluster::Cluster {
        &self.inner
    }
}

impl DerefMut for Cluster {
    fn deref_mut(&mut self) -> &mut cluster::Cluster {
        &mut self.inner
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::env::var_os("HAPG_TEST_KEEP").is_some() {
            self.inner.keep();
            eprintln!("keeping {}", self.inner.path().display());
        }
    }
}

impl Cluster {
    /// An empty cluster directory in /tmp (no monitor yet). Processes are
    /// killed at the end (tests need them gone, not stopped politely) and
    /// stay in the test's process group (CI's timeout kills them with it); a
    /// wait does not give up when a process exits: tests stop nodes on
    /// purpose and wait for the monitor to notice.
    pub fn new() -> Cluster {
        let mut options = Options::new(
            hapg_bin(),
            Workdir::Temp {
                parent: PathBuf::from("/tmp"),
                prefix: "hapg-test-".into(),
            },
        );
        options.stop = Stop::Kill;
        // Killed with the test binary's process group (CI's timeout).
        options.own_process_groups = false;
        options.exits_fail_waits = false;
        options.command_timeout = CLI_TIMEOUT;
        options.start_timeout = Duration::from_secs(60);
        Cluster {
            inner: cluster::Cluster::create(options).expect("the cluster's directory"),
        }
    }

    /// Panics with `e`, the monitor's last events and the logs.
    fn fail(&self, e: impl std::fmt::Display) -> ! {
        let mut args = vec!["show", "events", "--count", "30"];
        args.extend(self.inner.monitor_args());
        let events = self
            .inner
            .ok(&args)
            .unwrap_or_else(|e| format!("(no events: {e})"));
        panic!("{e}\nevents:\n{events}\nlogs:\n{}", self.all_logs())
    }

    /// Runs `hapg args` to completion, or kills it and panics after
    /// [`CLI_TIMEOUT`]: a CLI call that hangs fails its test instead of
    /// holding CI.
    pub fn run(&self, args: &[&str]) -> Output {
        self.inner
            .run(args)
            .unwrap_or_else(|e| panic!("{e}\nlogs:\n{}", self.all_logs()))
    }

    /// Runs `hapg args`, which must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        self.inner
            .ok(args)
            .unwrap_or_else(|e| panic!("{e}\nlogs:\n{}", self.all_logs()))
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
        self.inner.spawn(name, args).expect("spawn hapg");
    }

    /// Starts `cmd` (a `hapg` command, possibly wrapped, as in `ip netns
    /// exec`) in the background, logging to `<name>.log`.
    pub fn spawn_command(&self, name: &str, cmd: Command) {
        self.inner.spawn_command(name, cmd).expect("spawn hapg");
    }

    /// Creates and runs the monitor and waits until it answers; a port taken
    /// meanwhile is replaced by another.
    pub fn start_monitor(&mut self) {
        if let Err(e) = self.inner.start_monitor() {
            self.fail(e);
        }
    }

    /// The monitor's URI, as `show uri --monitor-uri` prints it.
    pub fn monitor_uri(&self) -> String {
        self.inner.monitor_uri().unwrap_or_else(|e| self.fail(e))
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
        let spec = NodeSpec {
            hostname,
            monitor_uri: Some(monitor_uri),
            wrapper,
            ..NodeSpec::new(name)
        };
        match self.inner.start_node_with(&spec) {
            Ok(node) => node,
            Err(e) => self.fail(e),
        }
    }

    /// Kills a node's `hapg` process only (SIGKILL), leaving its Postgres running.
    pub fn power_off_keeper_only(&self, name: &str) {
        self.inner.kill_process(name);
    }

    /// A running formation: the monitor, then `names` in order; the first ends
    /// up primary and the others secondaries.
    pub fn formation(names: &[&str], timeout: Duration) -> Cluster {
        let mut cluster = Cluster::new();
        if let Err(e) = cluster.inner.start_formation(names, timeout) {
            cluster.fail(e);
        }
        cluster
    }

    /// The formation's multi-host URI with the `postgres` user, as applications use it.
    pub fn app_uri(&self) -> String {
        self.inner.app_uri().unwrap_or_else(|e| self.fail(e))
    }

    /// The formation's multi-host URI (`show uri --formation default`).
    pub fn formation_uri(&self) -> String {
        self.inner.formation_uri().unwrap_or_else(|e| self.fail(e))
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Node {
        self.inner
            .node(name)
            .cloned()
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// `show state --json` as (name -> (reported, assigned)); empty if the
    /// monitor does not answer.
    pub fn states(&self) -> BTreeMap<String, (String, String)> {
        self.inner.states().unwrap_or_default()
    }

    /// Waits until every listed node is converged in its listed state.
    pub fn wait_states(&self, want: &[(&str, &str)], timeout: Duration) {
        if let Err(e) = self.inner.wait_states(want, timeout) {
            self.fail(e);
        }
    }

    /// Polls `check` every 100 ms until it holds, or panics after `timeout`.
    pub fn eventually(&self, what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
        let waited = self
            .inner
            .wait_until(what, timeout, Duration::from_millis(100), &[], || {
                Ok(check())
            });
        if let Err(e) = waited {
            panic!("{e}\n{}", self.all_logs());
        }
    }

    /// Pid of the `hapg run` of a data directory.
    pub fn keeper_pid(&self, name: &str) -> Option<i32> {
        self.inner.pid(name).and_then(|p| i32::try_from(p).ok())
    }

    /// Writes `<name>.toml` into the cluster directory (a free loopback port,
    /// the monitor's URI, trust authentication, `extra` appended to the
    /// `[router]` section) and starts `hapg router run --config` on it; waits
    /// (bounded) until the router accepts TCP connections.
    pub fn start_router(&self, name: &str, extra: &str) -> RouterProcess {
        let spec = RouterSpec {
            router_lines: extra.to_string(),
            ..RouterSpec::new(name)
        };
        self.inner
            .start_router(&spec)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.all_logs()))
    }

    /// Crash of a router: SIGKILL of its process (its clients see their
    /// connections drop, new connections are refused).
    pub fn kill_router(&self, router: &RouterProcess) {
        self.inner.kill_process(&router.name);
    }

    /// Starts a router again with the same configuration (same port and id);
    /// waits (bounded) until it accepts TCP connections.
    pub fn restart_router(&self, router: &RouterProcess) {
        self.inner
            .restart_router(router)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.all_logs()))
    }
}

#[allow(unused_imports)]
pub use hapg::drill::{connect, kill_tree, postmaster_pid, Writer, WriterReport};

/// Waits (bounded) until `uri` accepts a write.
pub async fn wait_writable(uri: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        // Each try bounded too: a server that accepts and then hangs must
        // not hold the loop past its deadline.
        let attempt = async {
            let c = connect(uri).await.ok()?;
            c.batch_execute("CREATE TEMP TABLE probe (x int)")
                .await
                .ok()
        };
        if let Ok(Some(())) = tokio::time::timeout(Duration::from_secs(10), attempt).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{uri} did not accept writes within {timeout:?}");
}

/// The monitor's unhealthy timeout (the default of `timeout.unhealthy_timeout_ms`):
/// a node whose keeper has not reported for longer, and whose Postgres the
/// health check does not reach, is unhealthy.
pub const UNHEALTHY_TIMEOUT: Duration = Duration::from_secs(3);

/// Waits (at most `within`) until the monitor at `monitor_uri` checked
/// `node`'s Postgres more than `silent` after that node's keeper last
/// reported: the monitor has seen the keeper silent that long, and decided
/// with it (its decisions run every 200 ms and on every report). Returns the
/// node's health then (1 good, 0 bad).
pub async fn wait_monitor_saw_silence(
    monitor_uri: &str,
    node: &str,
    silent: Duration,
    within: Duration,
) -> i16 {
    let monitor = connect(monitor_uri).await.expect("connect to the monitor");
    let deadline = Instant::now() + within;
    loop {
        let row = monitor
            .query_one(
                "SELECT health_check_time > report_time + make_interval(secs => $2), health
                   FROM hapg.node WHERE node_name = $1",
                &[&node, &silent.as_secs_f64()],
            )
            .await
            .expect("read the node's report and health check times");
        if row.get::<_, Option<bool>>(0) == Some(true) {
            return row.get(1);
        }
        assert!(
            Instant::now() < deadline,
            "the monitor did not see {node}'s keeper silent for {silent:?} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
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
