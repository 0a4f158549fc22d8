//! Child processes: each in its own process group (so a terminal's Ctrl-C
//! reaches only hapg-bench, which then stops everything in order) or its own
//! session, output in log files or captured, every wait bounded.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

/// Which session a service runs in. Under the kernel's autogroup scheduling
/// (`/proc/sys/kernel/sched_autogroup_enabled`) every session is a
/// scheduling group with an equal share of the CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Session {
    /// hapg-bench's session (and so pgbench's), in a process group of its own.
    Shared,
    /// A session of its own (`setsid`), as a daemon runs.
    Own,
}

/// Makes `cmd` start a session of its own. A new session is also a new
/// process group led by the child, as `process_group(0)` makes it, so the
/// service is stopped the same way.
#[allow(unsafe_code)]
fn in_new_session(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and calls only
    // setsid(2), which is async-signal-safe and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
}

/// Set by the signal thread on SIGINT, SIGTERM or SIGHUP.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Marks the run as interrupted: every wait gives up at its next poll.
pub fn interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Fails if the run was interrupted.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps `d`, waking early (with an error) if the run is interrupted.
pub fn sleep(d: Duration) -> Result<()> {
    let deadline = Instant::now() + d;
    loop {
        check_interrupted()?;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

fn pid_of(child: &Child) -> Pid {
    Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX))
}

/// Waits for `child` up to `timeout`; `None` if it still runs.
fn wait_bounded(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            // Not our child any more (already reaped): treat as gone.
            Err(_) => return ExitStatus::default().into(),
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGKILLs the process group led by `child` and reaps the leader (bounded).
fn kill_group(child: &mut Child) {
    let _ = killpg(pid_of(child), Signal::SIGKILL);
    let _ = child.kill();
    let _ = wait_bounded(child, Duration::from_secs(10));
}

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
pub fn run_capture(mut cmd: Command, timeout: Duration) -> Result<Captured> {
    let what = format!("{:?}", cmd.get_program());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let out = child.stdout.take().map(reader);
    let err = child.stderr.take().map(reader);
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = wait_bounded(&mut child, Duration::from_millis(50)) {
            break status;
        }
        if check_interrupted().is_err() || Instant::now() >= deadline {
            kill_group(&mut child);
            check_interrupted()?;
            bail!("{what} did not finish within {timeout:?}; killed");
        }
    };
    let join = |h: Option<std::thread::JoinHandle<String>>| {
        h.map(|h| h.join().unwrap_or_default()).unwrap_or_default()
    };
    Ok(Captured {
        status,
        stdout: join(out),
        stderr: join(err),
    })
}

fn reader(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// The last `n` lines of a log file.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A long-running process we started.
struct Service {
    name: String,
    child: Child,
    log: PathBuf,
    /// How long it may take to stop after SIGTERM before it is killed.
    stop_timeout: Duration,
}

/// Owns every long-running process of a run and stops them all, newest
/// first, when dropped (normal end, error, panic or interrupt). Postgres
/// instances left behind by a killed keeper are found by their data directory.
#[derive(Default)]
pub struct Supervisor {
    services: Vec<Service>,
    data_dirs: Vec<PathBuf>,
}

impl Supervisor {
    /// Starts `cmd` in the background, its output appended to `log`.
    pub fn spawn(
        &mut self,
        name: &str,
        cmd: Command,
        log: &Path,
        stop_timeout: Duration,
    ) -> Result<()> {
        self.spawn_in(name, cmd, log, stop_timeout, Session::Shared)
    }

    /// Starts a service in `session`, its output appended to `log`.
    pub fn spawn_in(
        &mut self,
        name: &str,
        mut cmd: Command,
        log: &Path,
        stop_timeout: Duration,
        session: Session,
    ) -> Result<()> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        match session {
            Session::Shared => {
                cmd.process_group(0);
            }
            Session::Own => in_new_session(&mut cmd),
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        self.services.push(Service {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            stop_timeout,
        });
        Ok(())
    }

    /// Remembers a Postgres data directory to check for a live postmaster at the end.
    pub fn watch_data_dir(&mut self, dir: &Path) {
        self.data_dirs.push(dir.to_path_buf());
    }

    /// Fails (with the end of its log) if `name` has exited.
    pub fn check_alive(&mut self, name: &str) -> Result<()> {
        let Some(s) = self.services.iter_mut().find(|s| s.name == name) else {
            bail!("{name} is not running");
        };
        if let Ok(Some(status)) = s.child.try_wait() {
            bail!(
                "{name} exited ({status}); last lines of {}:\n{}",
                s.log.display(),
                log_tail(&s.log, 30)
            );
        }
        Ok(())
    }

    /// The pid of `name`, if it was started.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.services
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.child.id())
    }

    /// The log file of `name`.
    pub fn log_of(&self, name: &str) -> Option<PathBuf> {
        self.services
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.log.clone())
    }

    /// Stops `name` (SIGTERM, then SIGKILL of its process group after its stop timeout).
    pub fn stop(&mut self, name: &str) {
        if let Some(i) = self.services.iter().position(|s| s.name == name) {
            let mut s = self.services.remove(i);
            stop_service(&mut s);
        }
    }

    /// SIGKILLs `name` and its process group at once (a power-off) and forgets it.
    pub fn kill(&mut self, name: &str) {
        if let Some(i) = self.services.iter().position(|s| s.name == name) {
            let mut s = self.services.remove(i);
            kill_group(&mut s.child);
        }
    }

    /// Stops everything, newest first, then any postmaster still running in a watched directory.
    pub fn stop_all(&mut self) {
        while let Some(mut s) = self.services.pop() {
            stop_service(&mut s);
        }
        for dir in std::mem::take(&mut self.data_dirs) {
            stop_postmaster(&dir);
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn stop_service(s: &mut Service) {
    if let Ok(Some(_)) = s.child.try_wait() {
        return;
    }
    eprintln!("stopping {}", s.name);
    let _ = kill(pid_of(&s.child), Signal::SIGTERM);
    if wait_bounded(&mut s.child, s.stop_timeout).is_none() {
        eprintln!(
            "{} did not stop within {:?}: killing its process group",
            s.name, s.stop_timeout
        );
        kill_group(&mut s.child);
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

/// The pid in `dir/postmaster.pid`, if that process is alive and is a postgres.
pub fn postmaster_pid(dir: &Path) -> Option<Pid> {
    let text = std::fs::read_to_string(dir.join("postmaster.pid")).ok()?;
    let pid = Pid::from_raw(text.lines().next()?.trim().parse().ok()?);
    kill(pid, None).ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&cmdline)
        .contains("postgres")
        .then_some(pid)
}

/// Immediate shutdown (SIGQUIT) of a postmaster left running, SIGKILL if it lingers.
fn stop_postmaster(dir: &Path) {
    let Some(pid) = postmaster_pid(dir) else {
        return;
    };
    eprintln!("stopping the postgres left running in {}", dir.display());
    let _ = kill(pid, Signal::SIGQUIT);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if kill(pid, None).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = kill(pid, Signal::SIGKILL);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The session and process group of `pid`, from `/proc/<pid>/stat`.
    fn session_and_group(pid: u32) -> (i32, i32) {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        // After the command name: state, ppid, pgrp, session, ...
        let fields: Vec<i32> = stat
            .rsplit_once(')')
            .expect("command name")
            .1
            .split_whitespace()
            .skip(1)
            .take(3)
            .map(|f| f.parse().expect("number"))
            .collect();
        (fields[2], fields[1])
    }

    #[test]
    fn a_service_runs_in_the_session_asked_for() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let log = dir.path().join("sleep.log");
        let mut sup = Supervisor::default();
        let sleep = || {
            let mut cmd = Command::new("sleep");
            cmd.arg("30");
            cmd
        };
        let second = Duration::from_secs(1);
        sup.spawn_in("own", sleep(), &log, second, Session::Own)
            .expect("start");
        sup.spawn_in("shared", sleep(), &log, second, Session::Shared)
            .expect("start");
        let own = sup.pid("own").expect("pid");
        let shared = sup.pid("shared").expect("pid");
        let ours = session_and_group(std::process::id()).0;

        // Its own session: it leads both its session and its process group.
        assert_eq!(session_and_group(own), (own as i32, own as i32));
        // Ours: its own process group (Ctrl-C reaches only hapg-bench), our session.
        assert_eq!(session_and_group(shared), (ours, shared as i32));
        assert_ne!(ours, own as i32);

        // Both are stopped alike.
        sup.stop_all();
        for pid in [own, shared] {
            assert!(
                kill(Pid::from_raw(pid as i32), None).is_err(),
                "{pid} still runs"
            );
        }
    }
}
