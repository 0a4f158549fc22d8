//! Child processes of a harness: each long-running one in its own process
//! group (so a terminal's Ctrl-C reaches only the program that started them,
//! which then stops everything in order) or its own session, output in log
//! files or captured, every wait bounded, every process stopped on drop.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use super::ClusterError;

/// Which session a service runs in. Under the kernel's autogroup scheduling
/// (`/proc/sys/kernel/sched_autogroup_enabled`) every session is a
/// scheduling group with an equal share of the CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Session {
    /// The starting program's session, in a process group of its own.
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

/// Set by [`interrupt`] (a program's signal handler).
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Marks this process's harness work as interrupted (SIGINT, SIGTERM):
/// every wait of the harness gives up at its next poll, so the program can
/// stop what it started and exit.
pub fn interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Fails if [`interrupt`] was called.
pub fn check_interrupted() -> Result<(), ClusterError> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Err(ClusterError::Interrupted);
    }
    Ok(())
}

/// Sleeps `d`, waking early (with an error) if the work is interrupted.
pub fn sleep(d: Duration) -> Result<(), ClusterError> {
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

/// Runs `cmd` to completion with its output captured, like
/// [`Command::output`], in a process group of its own. If it has not ended
/// within `timeout` it is killed with its process group and the error
/// (kind [`std::io::ErrorKind::TimedOut`]) says what it printed; if the work
/// is interrupted meanwhile, the kind is `Interrupted`.
pub fn output_within(mut cmd: Command, timeout: Duration) -> std::io::Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn()?;
    // Read both pipes while waiting, so a chatty command cannot fill one and block.
    let stdout = child.stdout.take().map(reader);
    let stderr = child.stderr.take().map(reader);
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = wait_bounded(&mut child, Duration::from_millis(20)) {
            break Ok(status);
        }
        if check_interrupted().is_err() {
            kill_group(&mut child);
            break Err(std::io::ErrorKind::Interrupted);
        }
        if Instant::now() >= deadline {
            kill_group(&mut child);
            break Err(std::io::ErrorKind::TimedOut);
        }
    };
    let join = |h: Option<std::thread::JoinHandle<Vec<u8>>>| {
        h.map(|h| h.join().unwrap_or_default()).unwrap_or_default()
    };
    let (stdout, stderr) = (join(stdout), join(stderr));
    match status {
        Ok(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        Err(kind) => Err(std::io::Error::new(
            kind,
            format!(
                "{:?} {:?} did not end within {timeout:?} and was killed\nstdout: {}\nstderr: {}",
                cmd.get_program(),
                cmd.get_args().collect::<Vec<_>>(),
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            ),
        )),
    }
}

fn reader(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// The last `n` lines of a log file.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// How the processes still running are ended when the harness is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM, newest first, each given its stop timeout before its process
    /// group is killed; Postgres left behind gets an immediate shutdown. For
    /// the demo and the benchmarks, which end cleanly.
    Graceful,
    /// SIGKILL of every process group and Postgres left behind at once: the
    /// tests only need everything gone, fast.
    Kill,
}

/// A long-running process started by the harness.
struct Service {
    name: String,
    child: Child,
    log: PathBuf,
    /// How long it may take to stop after SIGTERM before it is killed.
    stop_timeout: Duration,
}

/// Owns every long-running process of a harness and stops them all when
/// dropped (normal end, error, panic or interrupt).
pub(crate) struct Supervisor {
    services: Vec<Service>,
    /// A running process whose name was taken by a newer one: still ours to stop.
    replaced: usize,
    verbose: bool,
}

impl Supervisor {
    pub(crate) fn new(verbose: bool) -> Supervisor {
        Supervisor {
            services: Vec::new(),
            replaced: 0,
            verbose,
        }
    }

    /// Starts `cmd` in `session`, its output appended to `log`. A process
    /// already known by `name` keeps running under another name.
    pub(crate) fn spawn(
        &mut self,
        name: &str,
        mut cmd: Command,
        log: &Path,
        stop_timeout: Duration,
        session: Session,
    ) -> Result<(), ClusterError> {
        let io = |source| ClusterError::Io {
            what: format!("opening {}", log.display()),
            error: source,
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io)?;
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone().map_err(io)?)
            .stderr(file);
        match session {
            Session::Shared => {
                cmd.process_group(0);
            }
            Session::Own => in_new_session(&mut cmd),
        }
        let child = cmd.spawn().map_err(|source| ClusterError::Io {
            what: format!("starting {name} ({:?})", cmd.get_program()),
            error: source,
        })?;
        if let Some(old) = self.services.iter_mut().find(|s| s.name == name) {
            self.replaced += 1;
            old.name = format!("{name} (replaced {})", self.replaced);
        }
        self.services.push(Service {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            stop_timeout,
        });
        Ok(())
    }

    fn find(&mut self, name: &str) -> Option<&mut Service> {
        self.services.iter_mut().find(|s| s.name == name)
    }

    fn take(&mut self, name: &str) -> Option<Service> {
        let i = self.services.iter().position(|s| s.name == name)?;
        Some(self.services.remove(i))
    }

    /// Whether `name` was started and has exited (`None`: unknown or running).
    pub(crate) fn exited(&mut self, name: &str) -> Option<(ExitStatus, PathBuf)> {
        let s = self.find(name)?;
        match s.child.try_wait() {
            Ok(Some(status)) => Some((status, s.log.clone())),
            _ => None,
        }
    }

    /// Forgets `name` if it has exited; whether it had.
    pub(crate) fn forget_if_exited(&mut self, name: &str) -> bool {
        if self.exited(name).is_some() {
            self.take(name);
            return true;
        }
        false
    }

    /// The names of the processes started and not stopped, oldest first.
    pub(crate) fn names(&self) -> Vec<String> {
        self.services.iter().map(|s| s.name.clone()).collect()
    }

    /// The pid of `name`, if it was started and not stopped.
    pub(crate) fn pid(&self, name: &str) -> Option<u32> {
        self.services
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.child.id())
    }

    /// Stops `name`: SIGTERM, then SIGKILL of its process group after its stop timeout.
    pub(crate) fn stop(&mut self, name: &str) {
        if let Some(mut s) = self.take(name) {
            self.stop_service(&mut s);
        }
    }

    /// SIGKILLs `name` and its process group at once and forgets it.
    pub(crate) fn kill_group(&mut self, name: &str) {
        if let Some(mut s) = self.take(name) {
            kill_group(&mut s.child);
        }
    }

    /// SIGKILLs the process `name` only (not what it started) and forgets it.
    pub(crate) fn kill_process(&mut self, name: &str) {
        if let Some(mut s) = self.take(name) {
            let _ = s.child.kill();
            let _ = wait_bounded(&mut s.child, Duration::from_secs(10));
        }
    }

    /// Ends everything, newest first, as `how` says.
    pub(crate) fn stop_all(&mut self, how: Stop) {
        while let Some(mut s) = self.services.pop() {
            match how {
                Stop::Graceful => self.stop_service(&mut s),
                Stop::Kill => kill_group(&mut s.child),
            }
        }
    }

    fn stop_service(&self, s: &mut Service) {
        if let Ok(Some(_)) = s.child.try_wait() {
            return;
        }
        if self.verbose {
            eprintln!("stopping {}", s.name);
        }
        let _ = kill(pid_of(&s.child), Signal::SIGTERM);
        if wait_bounded(&mut s.child, s.stop_timeout).is_none() {
            eprintln!(
                "{} did not stop within {:?}: killing its process group",
                s.name, s.stop_timeout
            );
            kill_group(&mut s.child);
        }
    }
}

/// Ends a postmaster of `pgdata` still running after its keeper is gone
/// (immediate shutdown, or SIGKILL of its tree when `how` is [`Stop::Kill`]
/// or it lingers), then removes the socket it left behind.
pub(crate) fn end_postmaster(pgdata: &Path, how: Stop) {
    if let Some(pid) = crate::drill::postmaster_pid(pgdata) {
        if how == Stop::Graceful {
            let _ = kill(Pid::from_raw(pid), Signal::SIGQUIT);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && hapg_keeper::pidfile::process_alive(pid) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        crate::drill::kill_tree(pid);
    }
    remove_stale_socket(pgdata);
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
        let mut sup = Supervisor::new(false);
        let sleep = || {
            let mut cmd = Command::new("sleep");
            cmd.arg("30");
            cmd
        };
        let second = Duration::from_secs(1);
        sup.spawn("own", sleep(), &log, second, Session::Own)
            .expect("start");
        sup.spawn("shared", sleep(), &log, second, Session::Shared)
            .expect("start");
        let own = sup.pid("own").expect("pid");
        let shared = sup.pid("shared").expect("pid");
        let ours = session_and_group(std::process::id()).0;

        // Its own session: it leads both its session and its process group.
        assert_eq!(session_and_group(own), (own as i32, own as i32));
        // Ours: its own process group (Ctrl-C reaches only the harness's program), our session.
        assert_eq!(session_and_group(shared), (ours, shared as i32));
        assert_ne!(ours, own as i32);

        // Both are stopped alike.
        sup.stop_all(Stop::Graceful);
        for pid in [own, shared] {
            assert!(
                kill(Pid::from_raw(pid as i32), None).is_err(),
                "{pid} still runs"
            );
        }
    }

    #[test]
    fn a_name_started_again_keeps_the_old_process_in_care() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let log = dir.path().join("sleep.log");
        let mut sup = Supervisor::new(false);
        let sleep = || {
            let mut cmd = Command::new("sleep");
            cmd.arg("30");
            cmd
        };
        let second = Duration::from_secs(1);
        sup.spawn("a", sleep(), &log, second, Session::Shared)
            .expect("start");
        let first = sup.pid("a").expect("pid");
        sup.spawn("a", sleep(), &log, second, Session::Shared)
            .expect("start");
        assert_ne!(sup.pid("a"), Some(first), "the name is the newer process's");
        sup.stop_all(Stop::Kill);
        assert!(
            kill(Pid::from_raw(first as i32), None).is_err(),
            "the replaced process still runs"
        );
    }

    #[test]
    fn a_hung_command_is_killed_and_says_what_it_printed() {
        let mut sh = Command::new("sh");
        sh.args(["-c", "echo started; exec sleep 30"]);
        let started = Instant::now();
        let err = output_within(sh, Duration::from_millis(500)).expect_err("cannot end in time");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
        assert!(err.to_string().contains("started"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(20));
    }
}
