//! Faults that must *not* cause a failover: a primary node frozen for under
//! 2 s (SIGSTOP of its keeper and every Postgres process), and the monitor
//! crashing and coming back. Real processes, real PostgreSQL 15.

mod support;

use std::time::{Duration, Instant};

use hapg::drill::signal_all;
use nix::sys::signal::Signal;
use support::{postmaster_pid, Cluster};

const STEP: Duration = Duration::from_secs(90);

/// The pids of a postmaster and its children.
fn postgres_tree(pgdata: &std::path::Path) -> Vec<i32> {
    postmaster_pid(pgdata).map_or_else(Vec::new, hapg::drill::process_tree)
}

/// The states stay as they are for `duration`.
fn assert_steady(cluster: &Cluster, want: &[(&str, &str)], duration: Duration) {
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline {
        let states = cluster.states();
        if states.is_empty() {
            // The monitor may be restarting; states are checked when it answers.
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        for (name, state) in want {
            let (reported, goal) = &states[*name];
            assert!(
                goal == state && (reported == state || reported == "secondary"),
                "{name} moved: {states:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn short_freeze_and_monitor_restart_do_not_fail_over() {
    let cluster = Cluster::formation(&["node_a", "node_b"], STEP);
    let steady = [("node_a", "primary"), ("node_b", "secondary")];

    // The whole primary node stalls for 1.9 s: keeper and Postgres.
    let keeper = cluster.keeper_pid("node_a").expect("node_a runs");
    let mut pids = postgres_tree(&cluster.node("node_a").pgdata);
    pids.push(keeper);
    signal_all(&pids, Signal::SIGSTOP);
    std::thread::sleep(Duration::from_millis(1900));
    signal_all(&pids, Signal::SIGCONT);
    assert_steady(&cluster, &steady, Duration::from_secs(8));
    let events = cluster.ok(&["show", "events", "--pgdata", "./monitor", "--count", "50"]);
    assert!(!events.contains("failing over"), "{events}");

    // The monitor crashes (its hapg and its Postgres killed) and comes back.
    let monitor_pid = cluster.keeper_pid("monitor").expect("monitor runs");
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(monitor_pid), Signal::SIGKILL);
    if let Some(pid) = postmaster_pid(&cluster.path().join("monitor")) {
        support::kill_tree(pid);
    }
    std::thread::sleep(Duration::from_secs(3));
    cluster.spawn("monitor", &["run", "--pgdata", "./monitor"]);
    cluster.eventually("the monitor to answer again", STEP, || {
        cluster
            .run(&["show", "state", "--pgdata", "./monitor"])
            .status
            .success()
    });
    assert_steady(&cluster, &steady, Duration::from_secs(10));
    let events = cluster.ok(&["show", "events", "--pgdata", "./monitor", "--count", "50"]);
    assert!(!events.contains("failing over"), "{events}");
}
