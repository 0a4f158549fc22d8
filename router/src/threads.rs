//! The threads a router runs on: how many tokio workers, and how Linux
//! schedules them (`router.worker_threads`, `router.cpu_scheduling`).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

use hapg_config::router::{CpuScheduling, RouterSection};

/// The name every router thread carries (`/proc/<pid>/task/*/comm`, `top -H`).
pub const THREAD_NAME: &str = "hapg-router";

/// Runs the future `make` returns to completion on the threads `hapg router
/// run` serves on, and returns its output.
///
/// * `worker_threads = 1`: tokio's current-thread scheduler, on one thread of
///   its own. With a single worker, the multi-threaded scheduler's work
///   stealing, its injection queue and its cross-thread wake-ups buy nothing
///   and cost about 3 µs of CPU per select-only transaction (docs/performance.md).
/// * otherwise the multi-threaded scheduler with the configured number of
///   workers (default one per CPU).
///
/// Every thread is named [`THREAD_NAME`] and scheduled as `cpu_scheduling`
/// says; a policy the kernel refuses is logged once and the router goes on
/// with the normal one. The future is made on the thread that runs it, so it
/// need not be `Send`.
pub fn block_on<F, M>(config: &RouterSection, make: M) -> std::io::Result<F::Output>
where
    M: FnOnce() -> F + Send,
    F: Future,
    F::Output: Send,
{
    let scheduling = config.cpu_scheduling;
    if config.worker_threads != Some(1) {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if let Some(threads) = config.worker_threads {
            builder.worker_threads(threads.max(1) as usize);
        }
        builder
            .enable_all()
            .thread_name(THREAD_NAME)
            .on_thread_start(move || apply(scheduling));
        return Ok(builder.build()?.block_on(make()));
    }
    std::thread::scope(|scope| {
        let worker = std::thread::Builder::new()
            .name(THREAD_NAME.to_owned())
            .spawn_scoped(scope, move || {
                // Before the runtime exists, so that the threads it starts for
                // blocking work inherit the policy.
                apply(scheduling);
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .thread_name(BLOCKING_THREAD_NAME)
                    .build()?;
                Ok(runtime.block_on(make()))
            })?;
        worker
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The name of the threads a one-worker router starts for blocking work (name
/// resolution, file reads); they do not serve clients.
pub const BLOCKING_THREAD_NAME: &str = "hapg-router-io";

/// Puts the calling thread under `scheduling`, warning once if refused.
fn apply(scheduling: CpuScheduling) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    match scheduling {
        CpuScheduling::Normal => {}
        CpuScheduling::Batch => {
            if let Err(e) = schedule_this_thread_as_batch() {
                if !WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "router.cpu_scheduling = \"batch\" refused by the kernel; the router's threads stay normal");
                }
            }
        }
    }
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
