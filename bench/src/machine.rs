//! What every benchmark table says about how it was made: the command, the
//! machine, its load and the versions; and the run's setup shared by the
//! benches (the hapg binary, the PostgreSQL programs, the run directory).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::procs;

/// The facts printed with a table.
pub struct RunInfo {
    /// This invocation, as a shell command.
    pub command: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    /// `kernel.sched_autogroup_enabled`: whether each session is a scheduling
    /// group (see `--proxy-session`).
    pub autogroup: &'static str,
    /// Load average (1, 5, 15 min) when the run started and ended.
    pub load_before: String,
    pub load_after: String,
    /// First line of each program's version output.
    pub versions: Vec<String>,
}

impl RunInfo {
    /// The facts as of now; `load_after` and `versions` are filled in later.
    pub fn now() -> RunInfo {
        RunInfo {
            command: command_line(),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model: cpu_model(),
            kernel: read_trim("/proc/sys/kernel/osrelease"),
            autogroup: match read_trim("/proc/sys/kernel/sched_autogroup_enabled").as_str() {
                "1" => "on",
                "0" => "off",
                _ => "absent",
            },
            load_before: load_average(),
            load_after: String::new(),
            versions: Vec::new(),
        }
    }

    /// The machine and its load, as a sentence.
    pub fn machine(&self) -> String {
        format!(
            "Machine: {} CPUs ({}), Linux {}, autogroup scheduling {}; load average (1, 5, 15 min) {} before, {} after.",
            self.cpus, self.cpu_model, self.kernel, self.autogroup, self.load_before, self.load_after
        )
    }
}

/// The hapg binary: `given`, or `hapg` next to hapg-bench.
pub fn hapg_binary(given: &Option<PathBuf>) -> Result<PathBuf> {
    let bin = match given {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(|d| d.join("hapg"))
            .context("no directory for hapg-bench's own binary")?,
    };
    if !bin.exists() {
        bail!(
            "{} not found: build it (cargo build --release -p hapg) or give --hapg PATH",
            bin.display()
        );
    }
    Ok(bin)
}

/// Fails, saying how to install them, unless `tools` are in `pg_bindir`.
pub fn check_pg_bindir(pg_bindir: &Path, tools: &[&str]) -> Result<()> {
    for tool in tools {
        if !pg_bindir.join(tool).exists() {
            bail!(
                "{} not found: install PostgreSQL 15 (apt-get install -y postgresql-15) or give --pg-bindir",
                pg_bindir.join(tool).display()
            );
        }
    }
    Ok(())
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The load average over 1, 5 and 15 minutes.
pub fn load_average() -> String {
    read_trim("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// CPU time the whole machine has spent busy since boot, in seconds: user,
/// nice, system, irq and softirq over every CPU of `/proc/stat`; idle, iowait
/// and steal (time the hypervisor gave to someone else) are not busy.
pub fn busy_cpu_seconds() -> Option<f64> {
    busy_seconds(std::fs::read_to_string("/proc/stat").ok()?.lines().next()?)
}

/// The busy seconds of `/proc/stat`'s `cpu` line (in USER_HZ, 100 on Linux).
fn busy_seconds(line: &str) -> Option<f64> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let ticks: Vec<u64> = fields
        .take(7)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq
    let [user, nice, system, _idle, _iowait, irq, softirq] = ticks[..] else {
        return None;
    };
    Some((user + nice + system + irq + softirq) as f64 / 100.0)
}

fn cpu_model() -> String {
    read_trim("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default()
}

/// The first line of `program flag`.
pub fn version(program: &Path, flag: &str) -> String {
    let mut cmd = Command::new(program);
    cmd.arg(flag);
    procs::run_capture(cmd, Duration::from_secs(10))
        .map(|o| {
            o.both()
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// This invocation, as a shell command.
fn command_line() -> String {
    let mut s = String::from("hapg-bench");
    for a in std::env::args().skip(1) {
        s.push(' ');
        if a.is_empty()
            || a.contains(|c: char| !(c.is_ascii_alphanumeric() || "-_=,./:".contains(c)))
        {
            s.push('\'');
            s.push_str(&a.replace('\'', "'\\''"));
            s.push('\'');
        } else {
            s.push_str(&a);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::busy_seconds;

    #[test]
    fn busy_time_leaves_out_idle_iowait_and_steal() {
        let line = "cpu  1000 10 300 5000 40 5 25 700 0 0";
        assert_eq!(busy_seconds(line), Some(13.4));
        assert_eq!(busy_seconds("cpu0 1 2 3 4 5 6 7 8"), None);
        assert_eq!(busy_seconds("cpu  1 2 x 4 5 6 7"), None);
        assert_eq!(busy_seconds("cpu  1 2 3"), None);
    }
}
