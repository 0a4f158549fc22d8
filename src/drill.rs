//! Tools for failure drills, shared by `hapg demo --drill`, the end-to-end
//! tests and the benchmarks: a live writer that records which writes were
//! acknowledged, and a power-off that kills a process tree at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Connects to `uri` the way hapg's own clients do (TLS when offered, the
/// certificate checked with `sslmode=verify-ca` or `verify-full`).
pub async fn connect(uri: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let connection = hapg_monitor::pgconn::connect_uri(uri, Duration::from_secs(2)).await?;
    Ok(connection.client)
}

/// One acknowledged write, as the server that ran it reported it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ack {
    pub id: i64,
    /// The port of the Postgres that ran the INSERT (`inet_server_port()`),
    /// `None` over a Unix socket.
    pub port: Option<u16>,
    /// When it ran, on the server's clock (`clock_timestamp()`), in seconds
    /// since the Unix epoch: the nodes and the monitor share this machine's clock.
    pub at: f64,
}

/// A statement of a writer that failed.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// The id it tried to insert (its outcome is unknown; never reused).
    pub id: i64,
    /// When it was sent and when it ended, in seconds since the Unix epoch on
    /// this machine's clock (the one the servers and the monitor use).
    pub sent_at: f64,
    pub ended_at: f64,
    /// The SQLSTATE of the error the server (or the router) answered with;
    /// `None` when the connection ended or the writer's own timeout fired.
    pub code: Option<String>,
    /// The error as the client saw it.
    pub message: String,
}

/// Seconds since the Unix epoch, on this machine's clock.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// A client that inserts rows with increasing ids in a loop, reconnecting on
/// error, and records which inserts were acknowledged.
pub struct Writer {
    stop: Arc<AtomicBool>,
    /// [`WriterReport::errors`] so far, for a test to wait on.
    errors: Arc<AtomicU64>,
    handle: tokio::task::JoinHandle<WriterReport>,
}

/// What a writer saw.
#[derive(Debug, Clone, Default)]
pub struct WriterReport {
    /// Ids whose INSERT was acknowledged.
    pub acked: Vec<i64>,
    /// Where and when each acknowledged INSERT ran, in the order of `acked`.
    pub acks: Vec<Ack>,
    /// The highest id sent (acknowledged or not): ids run from 1 to this.
    pub attempted: i64,
    /// Statements that failed, and connection attempts that failed.
    pub errors: u64,
    /// Longest time between two acknowledged writes.
    pub longest_gap: Duration,
    /// Longest time one statement waited for its answer (success or error).
    pub longest_wait: Duration,
    /// Every statement that failed, in order (connection attempts not included).
    pub failures: Vec<Failure>,
}

impl Writer {
    /// Starts writing into `table(id bigint)` through `uri`, for at most `limit`.
    pub fn start(uri: String, table: &str, limit: Duration) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let errors = Arc::new(AtomicU64::new(0));
        let error_count = errors.clone();
        // The server says which node ran the write and when, so the drill can
        // check it against the monitor's history (see `invariants`).
        let insert = format!(
            "INSERT INTO {table} (id) VALUES ($1) \
             RETURNING inet_server_port(), extract(epoch FROM clock_timestamp())::float8"
        );
        let handle = tokio::spawn(async move {
            let mut report = WriterReport::default();
            let mut next: i64 = 1;
            let mut last_ack = Instant::now();
            let mut client: Option<tokio_postgres::Client> = None;
            let deadline = Instant::now() + limit;
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                if client.as_ref().is_none_or(|c| c.is_closed()) {
                    match connect(&uri).await {
                        Ok(c) => client = Some(c),
                        Err(_) => {
                            report.errors += 1;
                            error_count.store(report.errors, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    }
                }
                let Some(c) = client.as_ref() else { continue };
                report.attempted = next;
                let sent = Instant::now();
                let sent_at = unix_now();
                let result =
                    tokio::time::timeout(Duration::from_secs(30), c.query_one(&insert, &[&next]))
                        .await;
                report.longest_wait = report.longest_wait.max(sent.elapsed());
                let failure = match &result {
                    Ok(Ok(_)) => None,
                    Ok(Err(e)) => Some((
                        e.code().map(|c| c.code().to_string()),
                        e.as_db_error()
                            .map_or_else(|| e.to_string(), ToString::to_string),
                    )),
                    Err(_) => Some((None, "no answer within 30 s".to_string())),
                };
                if let Some((code, message)) = failure {
                    report.failures.push(Failure {
                        id: next,
                        sent_at,
                        ended_at: unix_now(),
                        code,
                        message,
                    });
                }
                match result {
                    Ok(Ok(row)) => {
                        report.acked.push(next);
                        report.acks.push(Ack {
                            id: next,
                            port: row
                                .get::<_, Option<i32>>(0)
                                .and_then(|p| u16::try_from(p).ok()),
                            at: row.get(1),
                        });
                        report.longest_gap = report.longest_gap.max(last_ack.elapsed());
                        last_ack = Instant::now();
                    }
                    Ok(Err(e)) if e.as_db_error().is_some() && !c.is_closed() => {
                        // The server refused the statement; the session goes on.
                        report.errors += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    _ => {
                        report.errors += 1;
                        client = None;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                error_count.store(report.errors, Ordering::Relaxed);
                // An id whose outcome is unknown is never reused.
                next += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            report
        });
        Writer {
            stop,
            errors,
            handle,
        }
    }

    /// How many statements and connection attempts have failed so far.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Stops the writer and returns what it saw.
    pub async fn finish(self) -> WriterReport {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.await.unwrap_or_default()
    }
}

/// Acknowledged ids missing from `table` on the server at `uri`.
pub async fn lost_writes(
    uri: &str,
    table: &str,
    acked: &[i64],
) -> Result<Vec<i64>, tokio_postgres::Error> {
    let client = connect(uri).await?;
    let present: std::collections::HashSet<i64> = client
        .query(&format!("SELECT id FROM {table}"), &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(acked
        .iter()
        .copied()
        .filter(|id| !present.contains(id))
        .collect())
}

/// A process and its direct children (a postmaster and its backends).
pub fn process_tree(pid: i32) -> Vec<i32> {
    let mut pids = vec![pid];
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        // After the command name: state, then ppid.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(pid) {
            pids.push(child);
        }
    }
    pids
}

/// Sends `signal` to every process of `pids`.
pub fn signal_all(pids: &[i32], signal: nix::sys::signal::Signal) {
    for pid in pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), signal);
    }
}

/// SIGKILLs a process and its direct children at once (a postmaster and its backends).
pub fn kill_tree(pid: i32) {
    signal_all(&process_tree(pid), nix::sys::signal::Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && hapg_keeper::pidfile::process_alive(pid) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The postmaster pid of a data directory, if it runs.
pub fn postmaster_pid(pgdata: &std::path::Path) -> Option<i32> {
    let text = std::fs::read_to_string(pgdata.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    hapg_keeper::pidfile::process_alive(pid).then_some(pid)
}
