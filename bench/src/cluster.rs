//! The Postgres under test: a real hapg monitor and one hapg node (state
//! `single`), so the router follows the monitor exactly as in production.
//! Direct runs and every proxy use this same node.

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
        "127.0.0.1",
        "--auth",
        "trust",
        "--no-ssl",
        "--run",
    ]);
    sup.spawn("monitor", cmd, &hapg.dir.join("monitor.log"), STOP)?;
    eprintln!("waiting for the monitor (port {monitor_port})");
    poll(sup, "monitor", "the monitor to answer", START, || {
        Ok(hapg
            .run(&["show", "state", "--pgdata", "./monitor"])?
            .is_some())
    })?;
    let Some(uri) = hapg.run(&["show", "uri", "--pgdata", "./monitor", "--monitor-uri"])? else {
        bail!("hapg show uri --monitor-uri failed");
    };
    let monitor_uri = uri.trim().to_string();

    let node_port = free_port()?;
    let port = node_port.to_string();
    sup.watch_data_dir(&hapg.dir.join("node1"));
    let cmd = hapg.cmd(&[
        "create",
        "postgres",
        "--pgdata",
        "./node1",
        "--pgport",
        &port,
        "--hostname",
        "localhost",
        "--listen",
        "127.0.0.1",
        "--name",
        "node1",
        "--dbname",
        dbname,
        "--auth",
        "trust",
        "--no-ssl",
        "--monitor",
        &monitor_uri,
        "--run",
    ]);
    sup.spawn("node1", cmd, &hapg.dir.join("node1.log"), STOP)?;
    eprintln!("waiting for node1 (port {node_port}) to be single");
    poll(sup, "node1", "node1 to reach state single", START, || {
        let Some(json) = hapg.run(&["show", "state", "--pgdata", "./monitor", "--json"])? else {
            return Ok(false);
        };
        Ok(is_single(&json, "node1"))
    })?;
    Ok(Cluster {
        monitor_uri,
        node_port,
    })
}

/// Time allowed for `hapg ... --run` to stop Postgres after SIGTERM.
const STOP: Duration = Duration::from_secs(60);
/// Time allowed for initdb, start and registration.
const START: Duration = Duration::from_secs(180);

/// Whether `show state --json` says `name` is reported and assigned `single`.
fn is_single(json: &str, name: &str) -> bool {
    let value: Value = serde_json::from_str(json).unwrap_or(Value::Null);
    value.as_array().is_some_and(|nodes| {
        nodes.iter().any(|n| {
            n["name"] == name && n["reported_state"] == "single" && n["assigned_state"] == "single"
        })
    })
}

/// Calls `check` every 250 ms until it holds; fails on timeout or if `service` exits.
fn poll(
    sup: &mut Supervisor,
    service: &str,
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        sup.check_alive(service)?;
        if check()? {
            return Ok(());
        }
        procs::sleep(Duration::from_millis(250))?;
    }
    let log = sup
        .log_of(service)
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
        assert!(is_single(json, "node1"));
        let json = r#"[{"name":"node1","reported_state":"init","assigned_state":"single"}]"#;
        assert!(!is_single(json, "node1"));
        assert!(!is_single("not json", "node1"));
    }
}
