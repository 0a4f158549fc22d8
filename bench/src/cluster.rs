//! The Postgres under test: a real hapg monitor and hapg nodes, so the
//! router follows the monitor exactly as in production. The throughput bench
//! uses one node (state `single`) for direct runs and every proxy; the
//! failover bench a primary and a standby. Started with the `hapg`
//! library's harness (`hapg::cluster`), configured here as the benchmarks
//! need it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hapg::cluster::{Cluster, Options, Stop, Tls, Workdir};

use crate::procs;

/// The database pgbench and the writers use on every node.
pub const DBNAME: &str = "bench";

/// A new run directory in /tmp (0755: Postgres, PgBouncer and HAProxy run
/// as `postgres`) for a cluster of `hapg` (trust auth and no TLS, as pgbench
/// direct; the monitor listening on `monitor_listen`), stopped in order when
/// it ends, its directory removed unless kept.
pub fn create(hapg: &Path, monitor_listen: &str) -> Result<Cluster> {
    let mut options = Options::new(
        hapg.to_path_buf(),
        Workdir::Temp {
            parent: "/tmp".into(),
            prefix: "hapg-bench-".into(),
        },
    );
    options.tls = Tls::Off;
    options.dbname = DBNAME.into();
    options.monitor_listen = Some(monitor_listen.into());
    options.node_listen = Some("127.0.0.1".into());
    options.stop = Stop::Graceful;
    options.exits_fail_waits = true;
    options.command_timeout = Duration::from_secs(30);
    options.start_timeout = START;
    options.verbose = true;
    let cluster = Cluster::create(options).context("creating the run directory")?;
    eprintln!("run directory {}", cluster.path().display());
    Ok(cluster)
}

/// Time allowed for initdb, start and registration.
pub const START: Duration = Duration::from_secs(180);

/// Creates and runs the monitor and one node, `node1`, and waits until it
/// is `single`; the monitor's URI and the node's port.
pub fn start_single(cluster: &mut Cluster) -> Result<(String, u16)> {
    eprintln!("starting the monitor");
    cluster.start_monitor()?;
    let monitor_uri = cluster.monitor_uri()?;
    let node = cluster.start_node("node1")?;
    eprintln!("waiting for node1 (port {}) to be single", node.port);
    cluster.wait_states(&[("node1", "single")], START)?;
    Ok((monitor_uri, node.port))
}

/// Adds two standbys, `node2` and `node3`, to `node1` (a copy of its data,
/// pgbench's tables included) and waits until they are `secondary`; the
/// first one's port.
pub fn add_standbys(cluster: &mut Cluster) -> Result<u16> {
    eprintln!("adding two standbys for the read-port rows");
    let node2 = cluster.start_node("node2")?;
    cluster.start_node("node3")?;
    cluster.wait_states(
        &[
            ("node1", "primary"),
            ("node2", "secondary"),
            ("node3", "secondary"),
        ],
        START,
    )?;
    Ok(node2.port)
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
