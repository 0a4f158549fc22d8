//! `hapg-bench`: end-to-end benchmarks of hapg against the alternatives, on
//! this machine, with everything started (and stopped) by the command itself.
//!
//! * `throughput` (issue 4): pgbench through the router, PgBouncer and HAProxy,
//!   as ratios to Postgres direct, in one run.
//! * `failover` (issue 6): rows of the fault matrix under clients writing
//!   through the router, several runs each: write unavailability, client
//!   errors, acknowledged writes lost.
//!
//! Not run by `cargo test`: only the small parsing tests are unit tests.

mod cluster;
mod failover;
mod machine;
mod netns;
mod pgbench;
mod procs;
mod targets;
mod throughput;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "hapg-bench",
    version,
    about = "Benchmarks of hapg on this machine: starts its own Postgres, hapg, PgBouncer and HAProxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// pgbench select-only, select-only -C and TPC-B: direct, through the
    /// router, PgBouncer (session, transaction) and HAProxy (TCP), in one run.
    Throughput(Box<throughput::ThroughputArgs>),
    /// Faults injected into a primary and a standby while clients write
    /// through the router: power-off, switchover, Postgres killed, freezes.
    Failover(failover::FailoverArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Err(e) = watch_signals() {
        eprintln!("hapg-bench: cannot watch signals: {e:#}");
        return std::process::ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Throughput(args) => throughput::run(*args),
        Command::Failover(args) => failover::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hapg-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// SIGINT, SIGTERM and SIGHUP mark the run interrupted: the current wait gives
/// up, and everything started is stopped on the way out. Handlers (not a
/// blocked signal mask) so that children start with default signal handling.
fn watch_signals() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let (mut int, mut term, mut hup) = rt.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
            signal(SignalKind::hangup())?,
        ))
    })?;
    std::thread::spawn(move || {
        rt.block_on(async {
            loop {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                    _ = hup.recv() => {}
                }
                eprintln!("\nhapg-bench: interrupted, stopping everything it started");
                procs::interrupt();
            }
        });
    });
    Ok(())
}
