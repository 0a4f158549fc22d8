//! The Postgres under test: a real hapg monitor and hapg nodes, so the
//! router follows the monitor exactly as in production. The throughput bench
//! uses one node (state `single`) for direct runs and every proxy; the
//! failover bench a primary and a standby.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::procs::{self, Supervisor};
use crate::targets::free_port;

/// `hapg` commands with their configuration kept inside the run directory.
pub struct Hapg {
    pub bin: PathBuf,
    pub dir: PathBuf,
}

impl Hapg {
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .current_dir(&self.dir)
            .env("XDG_CONFIG_HOME", self.dir.join("xdg/config"))
            .env("XDG_DATA_HOME", self.dir.join("xdg/data"))
            .env("HAPG_LOG", "info")
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .env_remove("PG_AUTOCTL_MONITOR");
        cmd
    }

    /// Runs a short `hapg` command; its stdout if it succeeded.
    fn run(&self, args: &[&str]) -> Result<Option<String>> {
        let out = procs::run_capture(self.cmd(args), Duration::from_secs(30))?;
        Ok(out.status.success().then_some(out.stdout))
    }
}

/// The monitor and node, running.
pub struct Cluster {
    pub monitor_uri: String,
    pub node_port: u16,
}

/// Creates and runs the monitor and one node, and waits until the node is `single`.
pub fn start(hapg: &Hapg, sup: &mut Supervisor, dbname: &str) -> Result<Cluster> {
    let monitor_uri = start_monitor(hapg, sup)?;
    let node_port = create_node(hapg, sup, "node1", &monitor_uri, dbname)?;
    eprintln!("waiting for node1 (port {node_port}) to be single");
    wait_states(hapg, sup, &[("node1", "single")], START)?;
    Ok(Cluster {
        monitor_uri,
        node_port,
    })
}

/// Creates and runs the monitor (`./monitor`); its URI once it answers.
pub fn start_monitor(hapg: &Hapg, sup: &mut Supervisor) -> Result<String> {
    start_monitor_on(hapg, sup, "127.0.0.1")
}

/// [`start_monitor`], listening on `listen` (Postgres `listen_addresses`).
pub fn start_monitor_on(hapg: &Hapg, sup: &mut Supervisor, listen: &str) -> Result<String> {
    let monitor_port = free_port()?.to_string();
    sup.watch_data_dir(&hapg.dir.join("monitor"));
    let cmd = hapg.cmd(&[
        "create",
        "monitor",
        "--pgdata",
        "./monitor",
        "--pgport",
        &monitor_port,
        "--hostname",
        "localhost",
        "--listen",
        listen,
        "--auth",
        "trust",
        "--no-ssl",
        "--run",
    ]);
    sup.spawn("monitor", cmd, &hapg.dir.join("monitor.log"), STOP)?;
    eprintln!("waiting for the monitor (port {monitor_port})");
    poll(sup, &["monitor"], "the monitor to answer", START, || {
        Ok(hapg
            .run(&["show", "state", "--pgdata", "./monitor"])?
            .is_some())
    })?;
    let Some(uri) = hapg.run(&["show", "uri", "--pgdata", "./monitor", "--monitor-uri"])? else {
        bail!("hapg show uri --monitor-uri failed");
    };
    Ok(uri.trim().to_string())
}

/// Creates and runs node `name` (`./name`, service `name`, log `name.log`)
/// on a free port; the port. Trust auth and no TLS, as pgbench direct.
pub fn create_node(
    hapg: &Hapg,
    sup: &mut Supervisor,
    name: &str,
    monitor_uri: &str,
    dbname: &str,
) -> Result<u16> {
    create_node_at(
        hapg,
        sup,
        name,
        monitor_uri,
        dbname,
        ("localhost", "127.0.0.1"),
        &[],
    )
}

/// [`create_node`] with its `--hostname` and `--listen` address, run
/// through `wrapper` (e.g. `ip netns exec NS`; empty: directly).
pub fn create_node_at(
    hapg: &Hapg,
    sup: &mut Supervisor,
    name: &str,
    monitor_uri: &str,
    dbname: &str,
    (hostname, listen): (&str, &str),
    wrapper: &[&str],
) -> Result<u16> {
    let node_port = free_port()?;
    let port = node_port.to_string();
    let pgdata = format!("./{name}");
    sup.watch_data_dir(&hapg.dir.join(name));
    let cmd = hapg.cmd(&[
        "create",
        "postgres",
        "--pgdata",
        &pgdata,
        "--pgport",
        &port,
        "--hostname",
        hostname,
        "--listen",
        listen,
        "--name",
        name,
        "--dbname",
        dbname,
        "--auth",
        "trust",
        "--no-ssl",
        "--monitor",
        monitor_uri,
        "--run",
    ]);
    let cmd = wrapped(cmd, wrapper);
    sup.spawn(name, cmd, &hapg.dir.join(format!("{name}.log")), STOP)?;
    Ok(node_port)
}

/// Restarts node `name` after it was killed: `hapg run --pgdata ./name`.
pub fn run_node(hapg: &Hapg, sup: &mut Supervisor, name: &str) -> Result<()> {
    run_node_in(hapg, sup, name, &[])
}

/// [`run_node`] through `wrapper` (empty: directly).
pub fn run_node_in(hapg: &Hapg, sup: &mut Supervisor, name: &str, wrapper: &[&str]) -> Result<()> {
    let pgdata = format!("./{name}");
    let cmd = wrapped(hapg.cmd(&["run", "--pgdata", &pgdata]), wrapper);
    sup.spawn(name, cmd, &hapg.dir.join(format!("{name}.log")), STOP)
}

/// `cmd` run by `wrapper` (a command prefix such as `ip netns exec NS`, which
/// execs the program: the process stays the one the supervisor signals).
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

/// Waits until each `(node, state)` is reported and assigned; fails with the
/// end of the first node's log on timeout or if a node's process exits.
pub fn wait_states(
    hapg: &Hapg,
    sup: &mut Supervisor,
    want: &[(&str, &str)],
    timeout: Duration,
) -> Result<()> {
    let what = want
        .iter()
        .map(|(name, state)| format!("{name} {state}"))
        .collect::<Vec<_>>()
        .join(", ");
    let names: Vec<&str> = want.iter().map(|(name, _)| *name).collect();
    poll(sup, &names, &what, timeout, || {
        let Some(json) = hapg.run(&["show", "state", "--pgdata", "./monitor", "--json"])? else {
            return Ok(false);
        };
        Ok(want
            .iter()
            .all(|(name, state)| is_in_state(&json, name, state)))
    })
}

/// Time allowed for `hapg ... --run` to stop Postgres after SIGTERM.
const STOP: Duration = Duration::from_secs(60);
/// Time allowed for initdb, start and registration.
const START: Duration = Duration::from_secs(180);

/// Whether `show state --json` says `name` is reported and assigned `state`.
fn is_in_state(json: &str, name: &str, state: &str) -> bool {
    let value: Value = serde_json::from_str(json).unwrap_or(Value::Null);
    value.as_array().is_some_and(|nodes| {
        nodes.iter().any(|n| {
            n["name"] == name && n["reported_state"] == state && n["assigned_state"] == state
        })
    })
}

/// Calls `check` every 250 ms until it holds; fails on timeout or if one of
/// `services` exits.
fn poll(
    sup: &mut Supervisor,
    services: &[&str],
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        for service in services {
            sup.check_alive(service)?;
        }
        if check()? {
            return Ok(());
        }
        procs::sleep(Duration::from_millis(250))?;
    }
    let log = services
        .first()
        .and_then(|service| sup.log_of(service))
        .map(|p| procs::log_tail(&p, 30))
        .unwrap_or_default();
    bail!("timed out after {timeout:?} waiting for {what}; last lines of its log:\n{log}")
}

/// `pgbench -i -s scale` straight into the node.
pub fn initialize(pg_bindir: &Path, port: u16, dbname: &str, scale: u32) -> Result<()> {
    let mut cmd = Command::new(pg_bindir.join("pgbench"));
    cmd.args(["-i", "-q", "-s", &scale.to_string()])
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .arg(dbname)
        .env("PGSSLMODE", "disable");
    // Scale 10 takes seconds; allow for large scales on a busy machine.
    let timeout = Duration::from_secs(120 + 30 * u64::from(scale));
    let out = procs::run_capture(cmd, timeout).context("pgbench -i")?;
    if !out.status.success() {
        bail!("pgbench -i -s {scale} failed:\n{}", out.both().trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_state() {
        let json = r#"[{"name":"node1","reported_state":"single","assigned_state":"single"}]"#;
        assert!(is_in_state(json, "node1", "single"));
        assert!(!is_in_state(json, "node1", "primary"));
        let json = r#"[{"name":"node1","reported_state":"init","assigned_state":"single"}]"#;
        assert!(!is_in_state(json, "node1", "single"));
        assert!(!is_in_state("not json", "node1", "single"));
    }
}
