//! Short-lived commands of a run and what the benchmarks measure of
//! processes. Long-running ones (hapg, the proxies) are started and stopped
//! by the `hapg` library's harness (`hapg::cluster`), whose waits give up
//! when the run is interrupted.

use std::process::{Command, ExitStatus};
use std::time::Duration;

use anyhow::{bail, Context, Result};

pub use hapg::cluster::{check_interrupted, interrupt, sleep, Session};

/// What a finished short-lived command printed.
#[derive(Debug)]
pub struct Captured {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Captured {
    /// Stdout and stderr together, for error messages.
    pub fn both(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `cmd` to completion, capturing its output. Kills it (and its process
/// group) after `timeout` or when the run is interrupted.
pub fn run_capture(cmd: Command, timeout: Duration) -> Result<Captured> {
    let what = format!("{:?}", cmd.get_program());
    match hapg::cluster::output_within(cmd, timeout) {
        Ok(out) => Ok(Captured {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => bail!("interrupted"),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
            bail!("{what} did not finish within {timeout:?}; killed")
        }
        Err(e) => Err(e).with_context(|| format!("starting {what}")),
    }
}

/// CPU time (user + system, all threads) `pid` has used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name: state, ppid, ..., utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // /proc reports in USER_HZ, which is 100 on Linux.
    Some(ticks as f64 / 100.0)
}
