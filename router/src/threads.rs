//! The threads a router runs on: how many tokio workers, and how Linux
//! schedules them (`router.worker_threads`, `router.cpu_scheduling`).

use std::sync::atomic::{AtomicBool, Ordering};

use hapg_config::router::{CpuScheduling, RouterSection};

/// The name every router thread carries (`/proc/<pid>/task/*/comm`, `top -H`).
pub const THREAD_NAME: &str = "hapg-router";

/// Builds the multi-threaded tokio runtime `hapg router run` serves on: the
/// configured number of workers (default one per CPU), each thread scheduled
/// as `cpu_scheduling` says. A policy the kernel refuses is logged once and the
/// router goes on with the normal one.
pub fn build_runtime(config: &RouterSection) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name(THREAD_NAME);
    if let Some(threads) = config.worker_threads {
        builder.worker_threads(threads.max(1) as usize);
    }
    if config.cpu_scheduling == CpuScheduling::Batch {
        static WARNED: AtomicBool = AtomicBool::new(false);
        builder.on_thread_start(|| {
            if let Err(e) = schedule_this_thread_as_batch() {
                if !WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "router.cpu_scheduling = \"batch\" refused by the kernel; the router's threads stay normal");
                }
            }
        });
    }
    builder.build()
}

/// Puts the calling thread under SCHED_BATCH, leaving its nice value alone.
/// Lowering a thread's own policy to batch needs no privilege.
#[allow(unsafe_code)]
fn schedule_this_thread_as_batch() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `sched_setscheduler` only reads `param`, a valid value on this
    // stack for the whole call; pid 0 is the calling thread.
    let ret = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if ret == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The policy of the calling thread, from `/proc/thread-self/stat` (field 41).
    fn policy_of_this_thread() -> u32 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("read stat");
        // The command name (field 2) may hold spaces; count from after it.
        let after_name = &stat[stat.rfind(')').expect("comm") + 2..];
        after_name
            .split(' ')
            .nth(38)
            .expect("policy")
            .parse()
            .expect("number")
    }

    #[test]
    fn batch_scheduling_applies_to_the_calling_thread_only() {
        let before = policy_of_this_thread();
        let inside = std::thread::spawn(|| {
            schedule_this_thread_as_batch().expect("SCHED_BATCH");
            policy_of_this_thread()
        })
        .join()
        .expect("thread");
        assert_eq!(inside, libc::SCHED_BATCH as u32);
        assert_eq!(policy_of_this_thread(), before);
    }
}
