//! `router.worker_threads` and `router.cpu_scheduling` shape the real `hapg
//! router run` process: how many router threads it runs, and the Linux
//! scheduling policy they run under (read back from `/proc`).
//!
//! Each router's monitor is on port 1, where nothing listens: it keeps
//! retrying, which is all this test needs. A monitor named `localhost` makes
//! every attempt resolve the name, which tokio does on a thread for blocking
//! work; one named `127.0.0.1` needs no such thread.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hapg_router::threads::{BLOCKING_THREAD_NAME, THREAD_NAME};
use support::{free_port, hapg_bin};

/// SCHED_OTHER and SCHED_BATCH as `/proc/<pid>/task/<tid>/stat` reports them.
const SCHED_OTHER: u32 = 0;
const SCHED_BATCH: u32 = 3;

/// A `hapg router run` that is killed when the test ends, however it ends.
struct RouterProcess(Child);

impl Drop for RouterProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a router whose monitor on `monitor_host` does not answer, with
/// `settings` in its `[router]` section; returns once it accepts connections.
fn start_router(dir: &Path, name: &str, monitor_host: &str, settings: &str) -> RouterProcess {
    let port = free_port();
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[router]\nlisten = \"127.0.0.1:{port}\"\n\
             monitor = \"postgres://autoctl_node@{monitor_host}:1/pg_auto_failover\"\n{settings}\n"
        ),
    )
    .expect("write router.toml");
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log file");
    let child = Command::new(hapg_bin())
        .args(["router", "run", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .spawn()
        .expect("start hapg router run");
    let router = RouterProcess(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "router {name} did not listen within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    router
}

/// The scheduling policy of each of the router's threads named `name`.
fn thread_policies(router: &RouterProcess, name: &str) -> Vec<u32> {
    let tasks = format!("/proc/{}/task", router.0.id());
    let mut policies = Vec::new();
    for task in std::fs::read_dir(&tasks).expect("read the router's tasks") {
        let path = task.expect("task entry").path();
        let comm = std::fs::read_to_string(path.join("comm")).expect("comm");
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(path.join("stat")).expect("stat");
        // Field 41 is the policy; count from after the command name, which
        // is in parentheses and may hold spaces.
        let after_name = &stat[stat.rfind(')').expect("comm in stat") + 2..];
        let policy = after_name
            .split(' ')
            .nth(38)
            .expect("policy field")
            .parse()
            .expect("policy number");
        policies.push(policy);
    }
    policies
}

#[test]
fn worker_threads_and_cpu_scheduling_shape_the_router_process() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let batch = start_router(
        dir.path(),
        "batch",
        "localhost",
        "worker_threads = 1\ncpu_scheduling = \"batch\"",
    );
    let normal = start_router(dir.path(), "normal", "127.0.0.1", "worker_threads = 3");

    // The one-worker router has resolved its monitor's name at least once.
    let deadline = Instant::now() + Duration::from_secs(20);
    while thread_policies(&batch, BLOCKING_THREAD_NAME).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the one-worker router started no {BLOCKING_THREAD_NAME} thread for name resolution within 20 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    assert_eq!(
        thread_policies(&batch, THREAD_NAME),
        vec![SCHED_BATCH],
        "worker_threads = 1, cpu_scheduling = \"batch\": one thread serves clients, under SCHED_BATCH, \
         and blocking work runs elsewhere"
    );
    let blocking = thread_policies(&batch, BLOCKING_THREAD_NAME);
    assert!(
        blocking.iter().all(|&policy| policy == SCHED_BATCH),
        "the one-worker router's threads for blocking work inherit SCHED_BATCH: {blocking:?}"
    );
    assert_eq!(
        thread_policies(&normal, THREAD_NAME),
        vec![SCHED_OTHER; 3],
        "worker_threads = 3 and the default cpu_scheduling: three router threads, normal"
    );
}
