//! `hapg-bench throughput`: pgbench against Postgres directly and through each
//! proxy, in one run, on one node, and one table of TPS, latency and ratio to
//! direct.
//!
//! Order: direct, then `--rounds` times (default 1): the router rows,
//! PgBouncer session, PgBouncer transaction, HAProxy, direct again; each
//! round rotates the proxies by one place. Each
//! target runs its tests back to back and is the only proxy running
//! meanwhile. A target's runs are averaged and their spread shown; direct's
//! spread bounds the drift over the run (the machine is shared, TPC-B tables
//! grow). Before each run, straight to the node and
//! untimed: `CHECKPOINT`, and before TPC-B also what pgbench does without
//! `-n` (vacuum branches and tellers, truncate history), so every target's
//! TPC-B starts from the same state.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;

use hapg::cluster::Cluster;

use crate::cluster::{self, DBNAME};
use crate::machine::{self, RunInfo};
use crate::pgbench::{self, Measured, Shape, Test};
use crate::procs;
use crate::targets::{self, BouncerMode, Env, RouterPool, Target, NO_POOL};

/// Options of `hapg-bench throughput`.
#[derive(Args, Debug)]
pub struct ThroughputArgs {
    /// pgbench clients (-c).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub clients: u32,
    /// Seconds per pgbench run (-T).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub duration: u64,
    /// pgbench scale factor (-i -s).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub scale: u32,
    /// pgbench threads (-j), at most the client count.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub threads: u32,
    /// Server connections per pool: the router's `pool_size` and PgBouncer's
    /// `default_pool_size` (default: the client count). Fewer than the
    /// clients shows pooling at work: 256 clients over a pool of 16 is a row
    /// of docs/performance.md (direct then needs `max_connections` above the
    /// client count, which the bench node does not have: compare with
    /// PgBouncer there).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub pool_size: Option<u32>,
    /// pgbench query mode (-M).
    #[arg(long, default_value = "simple", value_parser = ["simple", "extended", "prepared"])]
    pub query_mode: String,
    /// Tests to run: select (select-only), connect (select-only -C), tpcb.
    #[arg(long, value_delimiter = ',', default_value = "select,connect,tpcb")]
    pub tests: Vec<String>,
    /// Targets to run: direct, router, pgbouncer (both modes), pgbouncer-session,
    /// pgbouncer-transaction, haproxy, read-port. Default: all but
    /// read-port. Ratios need direct. read-port adds two standbys to the run
    /// (the node becomes a primary with synchronous standbys, which slows
    /// TPC-B for every row) and two select-only rows: the router's read-only
    /// port over both standbys, and direct to one standby.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Router rows: session, transaction (`[pool] mode` and `pool_size` =
    /// clients in router.toml, as PgBouncer's pool), none (no `[pool]`
    /// section: the router's defaults). Default: session,transaction, or
    /// none when the router has no pooling (it refuses a `[pool]` section).
    #[arg(long, value_delimiter = ',')]
    pub router_pool_mode: Vec<String>,
    /// `router.worker_threads` of the router rows; 0 leaves it out (one
    /// worker per CPU, the router's default). One worker, like PgBouncer's one
    /// thread, suits a router that shares a small machine with Postgres.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=1024))]
    pub router_worker_threads: u32,
    /// `router.cpu_scheduling` of the router rows: normal (the router's
    /// default) or batch.
    #[arg(long, default_value = "batch", value_parser = ["normal", "batch"])]
    pub router_cpu_scheduling: String,
    /// Whether the router rows serve `/metrics` (`[metrics] listen` in
    /// router.toml): on makes every session count its transactions, queries
    /// and bytes; run once with each to see what the counting costs.
    #[arg(long, default_value = "off", value_parser = ["on", "off"])]
    pub router_metrics: String,
    /// How the proxies reach the node: tcp (127.0.0.1, as pgbench's direct
    /// runs) or unix (the node's Unix socket: the router's
    /// `server.unix_socket_dir`, PgBouncer's `host=<dir>`, HAProxy's socket
    /// path), as a proxy on the database's own machine would be set up.
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "unix"])]
    pub proxy_to_node: String,
    /// Where each proxy runs: own (its own session, as a daemon started by
    /// systemd or with -d: the kernel's autogroup scheduling then gives it
    /// its own share of the CPUs, as Postgres has under the keeper) or
    /// shared (pgbench's session: proxy and pgbench share one share).
    #[arg(long, default_value = "own", value_parser = ["own", "shared"])]
    pub proxy_session: String,
    /// How many times to run the proxies (direct runs first and after each
    /// round); the table shows means and the spread between runs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
    /// Seconds of untimed select-only load on the node before the first run.
    #[arg(long, default_value_t = 5)]
    pub warmup: u64,
    /// Print the result as Markdown (for docs/performance.md).
    #[arg(long)]
    pub markdown: bool,
    /// Keep the run directory (data directories, configs, logs).
    #[arg(long)]
    pub keep: bool,
    /// The hapg binary (default: `hapg` next to hapg-bench).
    #[arg(long)]
    pub hapg: Option<PathBuf>,
    /// Directory of the PostgreSQL 15 programs (pgbench, psql).
    #[arg(long, default_value = "/usr/lib/postgresql/15/bin")]
    pub pg_bindir: PathBuf,
    /// The pgbouncer binary (default /usr/sbin/pgbouncer when installed).
    #[arg(long)]
    pub pgbouncer: Option<PathBuf>,
    /// The haproxy binary (default /usr/sbin/haproxy when installed).
    #[arg(long)]
    pub haproxy: Option<PathBuf>,
}

/// One pgbench run's outcome.
struct Sample {
    target: Target,
    test: Test,
    outcome: Result<Measured, String>,
    /// CPU the proxy used during the run, in cores (1.0 = one core busy).
    proxy_cpu: Option<f64>,
    /// Busy CPU time of the whole machine during the run, in seconds.
    machine_cpu: Option<f64>,
}

/// The `[router]` lines the router rows add to router.toml, one per line.
fn router_settings(args: &ThroughputArgs) -> String {
    let mut lines = String::new();
    if args.router_worker_threads > 0 {
        lines.push_str(&format!(
            "worker_threads = {}\n",
            args.router_worker_threads
        ));
    }
    if args.router_cpu_scheduling != "normal" {
        lines.push_str(&format!(
            "cpu_scheduling = \"{}\"\n",
            args.router_cpu_scheduling
        ));
    }
    lines
}

/// Runs the benchmark and prints its table.
pub fn run(args: ThroughputArgs) -> Result<()> {
    let tests: Vec<Test> = args
        .tests
        .iter()
        .map(|t| Test::from_key(t.trim()))
        .collect::<Result<_>>()?;
    let order = schedule(&args)?;
    let shape = Shape {
        clients: args.clients,
        threads: args.threads,
        duration_s: args.duration,
        query_mode: args.query_mode.clone(),
    };
    let pg_bindir = args.pg_bindir.clone();
    machine::check_pg_bindir(&pg_bindir, &["pgbench", "psql", "initdb"])?;
    let hapg_bin = machine::hapg_binary(&args.hapg)?;
    let pgbouncer = installed(&args.pgbouncer, "/usr/sbin/pgbouncer");
    let haproxy = installed(&args.haproxy, "/usr/sbin/haproxy");
    if pgbouncer.is_none() || haproxy.is_none() {
        eprintln!(
            "note: {} missing; those rows are skipped. Install with: apt-get install -y pgbouncer haproxy",
            [
                pgbouncer.is_none().then_some("pgbouncer"),
                haproxy.is_none().then_some("haproxy")
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" and ")
        );
    }
    let run_as = postgres_ids()?;

    let mut context = RunInfo::now();
    context
        .versions
        .push(machine::version(&hapg_bin, "--version"));
    context
        .versions
        .push(machine::version(&pg_bindir.join("pgbench"), "--version"));
    if let Some(p) = &pgbouncer {
        context.versions.push(machine::version(p, "--version"));
    }
    if let Some(p) = &haproxy {
        context.versions.push(machine::version(p, "-v"));
    }

    // Everything started from here is stopped when `cluster` drops, whatever happens.
    let mut cluster = cluster::create(&hapg_bin, "127.0.0.1")?;
    let tools = Tools {
        pgbouncer,
        haproxy,
        run_as,
    };
    let result = measure(&mut cluster, &tools, &args, &shape, &tests, order);
    cluster.stop_all();
    context.load_after = machine::load_average();
    if args.keep {
        cluster.keep();
        eprintln!("keeping {}", cluster.path().display());
    } else if result.is_err() {
        eprintln!("(run with --keep to look at the logs in the run directory)");
    }
    drop(cluster);
    let Outcomes {
        samples,
        skipped,
        order,
        notes,
    } = result?;
    let report = Report {
        samples,
        skipped,
        tests,
        order,
        notes,
    };
    let text = if args.markdown {
        report.markdown(&context, &shape, args.scale)
    } else {
        report.plain(&context, &shape, args.scale)
    };
    print!("{text}");
    Ok(())
}

/// The programs a run uses besides pgbench and psql.
struct Tools {
    pgbouncer: Option<PathBuf>,
    haproxy: Option<PathBuf>,
    /// uid/gid of the `postgres` OS user when running as root.
    run_as: Option<(u32, u32)>,
}

/// Every run's outcome, the targets that could not run (with why), and
/// the order they ran in.
struct Outcomes {
    samples: Vec<Sample>,
    skipped: Vec<(Target, String)>,
    order: Vec<Target>,
    notes: Vec<String>,
}

fn measure(
    cluster: &mut Cluster,
    tools: &Tools,
    args: &ThroughputArgs,
    shape: &Shape,
    tests: &[Test],
    mut order: Vec<Target>,
) -> Result<Outcomes> {
    let (monitor_uri, node_port) = cluster::start_single(cluster)?;
    eprintln!("pgbench -i -s {}", args.scale);
    cluster::initialize(&args.pg_bindir, node_port, DBNAME, args.scale)?;
    let standby_port = if order.iter().any(|t| t.read_only()) {
        Some(cluster::add_standbys(cluster)?)
    } else {
        None
    };
    let cluster: &Cluster = cluster;
    let env = Env {
        dir: cluster.path().to_path_buf(),
        pg_bindir: args.pg_bindir.clone(),
        hapg: cluster.options().bin.clone(),
        pgbouncer: tools.pgbouncer.clone(),
        haproxy: tools.haproxy.clone(),
        run_as: tools.run_as,
        monitor_uri,
        node_port,
        standby_port,
        dbname: DBNAME.into(),
        clients: args.clients,
        pool_size: args.pool_size.unwrap_or(args.clients),
        router_settings: router_settings(args),
        node_socket_dir: (args.proxy_to_node == "unix")
            .then(|| PathBuf::from(hapg_keeper::postgres::SOCKET_DIR)),
        proxy_own_session: args.proxy_session == "own",
        router_metrics: args.router_metrics == "on",
    };
    if args.warmup > 0 {
        eprintln!("warm-up: {} s select-only on the node", args.warmup);
        let warm = Shape {
            duration_s: args.warmup,
            ..shape.clone()
        };
        if let Err(e) = pgbench_run(&env, Test::SelectOnly, &warm, env.node_port, "warmup")? {
            bail!("warm-up against the node failed: {e}");
        }
    }

    let mut notes = Vec::new();
    if order.iter().any(|t| !matches!(t, Target::Direct)) {
        notes.push(match &env.node_socket_dir {
            Some(dir) => format!(
                "Proxies reach the node through its Unix socket in {} (--proxy-to-node unix); pgbench reaches every target over TCP.",
                dir.display()
            ),
            None => "Proxies reach the node over TCP on 127.0.0.1, as pgbench does (--proxy-to-node tcp).".to_string(),
        });
        notes.push(if env.proxy_own_session {
            "Each proxy runs in its own session, as a daemon does, and Postgres in another (the keeper starts it so); pgbench runs in hapg-bench's (--proxy-session own).".to_string()
        } else {
            "Each proxy runs in pgbench's session (hapg-bench's), Postgres in its own (--proxy-session shared).".to_string()
        });
    }
    if order.iter().any(|t| matches!(t, Target::Router(_))) {
        let settings = env.router_settings.trim().replace('\n', ", ");
        notes.push(format!(
            "Router rows: {} (--router-worker-threads, --router-cpu-scheduling).",
            if settings.is_empty() {
                "the router's defaults"
            } else {
                &settings
            }
        ));
    }
    if args.router_pool_mode.is_empty() && !router_pools(&env, cluster)? {
        notes.push(format!(
            "{NO_POOL}: one router row, without a [pool] section"
        ));
        eprintln!("{NO_POOL}: running one router row, without a [pool] section");
        order = order
            .into_iter()
            .filter(|t| *t != Target::Router(RouterPool::Transaction))
            .map(|t| match t {
                Target::Router(_) => Target::Router(RouterPool::Default),
                t => t,
            })
            .collect();
    }

    let mut samples = Vec::new();
    let mut skipped: Vec<(Target, String)> = Vec::new();
    for (pass, &target) in order.iter().enumerate() {
        if skipped.iter().any(|(t, _)| *t == target) {
            continue;
        }
        if let Some(why) = targets::unavailable(target, &env) {
            eprintln!("skipping {target}: {why}");
            skipped.push((target, why));
            continue;
        }
        eprintln!("starting {target}");
        let running = match targets::start(target, &env, cluster) {
            Ok(r) => r,
            Err(e) => {
                procs::check_interrupted()?;
                eprintln!("skipping {target}: {e:#}");
                skipped.push((target, format!("{e:#}")));
                continue;
            }
        };
        for &test in tests {
            if target.read_only() && test == Test::TpcB {
                continue;
            }
            prepare(&env, test)?;
            let label = format!("{pass}-{}", target.to_string().replace(' ', "-"));
            eprint!("{target:<24} {test:<15}");
            let cpu_before = running.pid.and_then(procs::cpu_seconds);
            let machine_before = machine::busy_cpu_seconds();
            let started = std::time::Instant::now();
            let outcome = pgbench_run(&env, test, shape, running.port, &label)?;
            let wall = started.elapsed().as_secs_f64();
            let machine_after = machine::busy_cpu_seconds();
            let cpu_after = running.pid.and_then(procs::cpu_seconds);
            let proxy_cpu = match (cpu_before, cpu_after) {
                (Some(a), Some(b)) if wall > 0.0 => Some((b - a) / wall),
                _ => None,
            };
            let machine_cpu = match (machine_before, machine_after) {
                (Some(a), Some(b)) => Some(b - a),
                _ => None,
            };
            match &outcome {
                Ok(m) => eprintln!(
                    " {:>10.0} tps {:>8.3} ms{}",
                    m.tps,
                    m.latency_ms,
                    proxy_cpu.map_or(String::new(), |c| format!(", proxy CPU {:.0}%", c * 100.0))
                ),
                Err(e) => eprintln!(" failed: {e}"),
            }
            samples.push(Sample {
                target,
                test,
                outcome,
                proxy_cpu,
                machine_cpu,
            });
        }
        running.stop(cluster);
    }
    Ok(Outcomes {
        samples,
        skipped,
        order,
        notes,
    })
}

/// Whether the router accepts a `[pool]` section (started once and stopped).
/// Other start failures count as yes: the router rows then report them.
fn router_pools(env: &Env, cluster: &Cluster) -> Result<bool> {
    eprintln!("checking whether the router pools connections");
    match targets::start(Target::Router(RouterPool::Session), env, cluster) {
        Ok(running) => {
            running.stop(cluster);
            Ok(true)
        }
        Err(e) => {
            procs::check_interrupted()?;
            Ok(!format!("{e:#}").contains(NO_POOL))
        }
    }
}

/// The targets in run order: direct first and after every round of the
/// proxies, the proxies rotated by one place each round.
fn schedule(args: &ThroughputArgs) -> Result<Vec<Target>> {
    let known = [
        "direct",
        "router",
        "pgbouncer",
        "pgbouncer-session",
        "pgbouncer-transaction",
        "haproxy",
        "read-port",
    ];
    for o in &args.only {
        if !known.contains(&o.trim()) {
            bail!("unknown target {o:?} in --only: use {}", known.join(", "));
        }
    }
    let want = |name: &str| {
        args.only.is_empty()
            || args.only.iter().any(|o| {
                let o = o.trim();
                o == name || (o == "pgbouncer" && name.starts_with("pgbouncer"))
            })
    };
    let mut order = Vec::new();
    if want("router") {
        let auto = ["session".to_string(), "transaction".to_string()];
        let modes = if args.router_pool_mode.is_empty() {
            &auto[..]
        } else {
            &args.router_pool_mode[..]
        };
        for mode in modes {
            let t = Target::Router(RouterPool::from_key(mode.trim())?);
            if !order.contains(&t) {
                order.push(t);
            }
        }
    }
    if want("pgbouncer-session") {
        order.push(Target::PgBouncer(BouncerMode::Session));
    }
    if want("pgbouncer-transaction") {
        order.push(Target::PgBouncer(BouncerMode::Transaction));
    }
    if want("haproxy") {
        order.push(Target::HaProxy);
    }
    // Not in the default set: it needs standbys, which change the node.
    if args.only.iter().any(|o| o.trim() == "read-port") {
        order.push(Target::DirectStandby);
        order.push(Target::ReadPort);
    }
    let direct = want("direct");
    if order.is_empty() && !direct {
        bail!("nothing to run");
    }
    let mut all = Vec::new();
    if direct {
        all.push(Target::Direct);
    }
    for round in 0..args.rounds as usize {
        // Each round starts one proxy later, so that over rounds every proxy
        // runs in every position (the first after direct tends to score lower).
        let mut this = order.clone();
        if !this.is_empty() {
            let len = this.len();
            this.rotate_left(round % len);
        }
        all.extend(this);
        if direct {
            all.push(Target::Direct);
        }
    }
    Ok(all)
}

/// Untimed, straight to the node: a checkpoint (so no timed one lands in the
/// run), and for TPC-B the cleanup pgbench does without `-n`.
fn prepare(env: &Env, test: Test) -> Result<()> {
    let mut sql = vec![];
    if test == Test::TpcB {
        sql.extend([
            "VACUUM pgbench_branches",
            "VACUUM pgbench_tellers",
            "TRUNCATE pgbench_history",
        ]);
    }
    sql.push("CHECKPOINT");
    let out = procs::run_capture(env.psql(env.node_port, &sql), Duration::from_secs(300))?;
    if !out.status.success() {
        bail!("preparing the node failed: {}", out.both().trim());
    }
    Ok(procs::sleep(Duration::from_secs(1))?)
}

/// Runs pgbench; `Err` only for an interrupt or a failure to start it. A
/// failed run is `Ok(Err(message))`, and its output is kept in the run directory.
fn pgbench_run(
    env: &Env,
    test: Test,
    shape: &Shape,
    port: u16,
    label: &str,
) -> Result<std::result::Result<Measured, String>> {
    let mut cmd = Command::new(env.pg_bindir.join("pgbench"));
    cmd.args(pgbench::args(test, shape, port, &env.dbname))
        .env("PGSSLMODE", "disable")
        .env("PGCONNECT_TIMEOUT", "10");
    let timeout = Duration::from_secs(shape.duration_s + 120);
    let out = procs::run_capture(cmd, timeout)?;
    let text = out.both();
    let log = env.dir.join(format!("pgbench-{label}-{}.log", test.key()));
    let _ = std::fs::write(&log, &text);
    if !out.status.success() {
        let last = text.lines().rev().find(|l| !l.trim().is_empty());
        return Ok(Err(format!(
            "pgbench exited with {}: {}",
            out.status,
            last.unwrap_or("").trim()
        )));
    }
    Ok(pgbench::parse(&text).map_err(|e| format!("{e:#}")))
}

/// uid and gid of the `postgres` OS user when running as root.
fn postgres_ids() -> Result<Option<(u32, u32)>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    match nix::unistd::User::from_name("postgres")? {
        Some(u) => Ok(Some((u.uid.as_raw(), u.gid.as_raw()))),
        None => {
            bail!("running as root needs an OS user `postgres` to run Postgres and the proxies")
        }
    }
}

fn installed(given: &Option<PathBuf>, default: &str) -> Option<PathBuf> {
    match given {
        Some(p) => Some(p.clone()),
        None => Some(PathBuf::from(default)).filter(|p| p.exists()),
    }
}

/// What one line of the table shows: the mean of a target's runs of a test.
struct Row {
    target: Target,
    test: Test,
    /// The mean of the successful runs, or the first failure if none succeeded.
    outcome: Result<Measured, String>,
    /// (max - min) / mean of TPS, when there were at least two successful runs.
    spread: Option<f64>,
    runs: usize,
    ratio: Option<f64>,
    /// Mean CPU the proxy used, in cores.
    proxy_cpu: Option<f64>,
    /// Busy CPU time of the whole machine per transaction, in microseconds.
    cpu_per_tx_us: Option<f64>,
}

struct Report {
    samples: Vec<Sample>,
    skipped: Vec<(Target, String)>,
    tests: Vec<Test>,
    order: Vec<Target>,
    /// Said during the run, printed under the table.
    notes: Vec<String>,
}

/// The mean of `runs` and the spread of their TPS.
fn aggregate(runs: &[Measured]) -> Option<(Measured, Option<f64>)> {
    if runs.is_empty() {
        return None;
    }
    let n = runs.len() as f64;
    let mean = |f: fn(&Measured) -> f64| runs.iter().map(f).sum::<f64>() / n;
    let connects: Vec<f64> = runs.iter().filter_map(|m| m.connect_ms).collect();
    let m = Measured {
        tps: mean(|m| m.tps),
        latency_ms: mean(|m| m.latency_ms),
        connect_ms: (!connects.is_empty())
            .then(|| connects.iter().sum::<f64>() / connects.len() as f64),
        transactions: runs.iter().map(|m| m.transactions).sum(),
        failed: runs.iter().map(|m| m.failed).sum(),
    };
    let spread = (runs.len() > 1 && m.tps > 0.0).then(|| {
        let max = runs.iter().map(|r| r.tps).fold(f64::MIN, f64::max);
        let min = runs.iter().map(|r| r.tps).fold(f64::MAX, f64::min);
        (max - min) / m.tps
    });
    Some((m, spread))
}

/// The machine's busy CPU time per transaction, in microseconds, over the
/// successful runs that measured it.
fn cpu_per_transaction<'a>(samples: impl Iterator<Item = &'a Sample>) -> Option<f64> {
    let (busy, transactions) = samples
        .filter_map(|s| Some((s.machine_cpu?, s.outcome.as_ref().ok()?.transactions)))
        .fold((0.0, 0), |(b, t), (busy, n)| (b + busy, t + n));
    (transactions > 0).then(|| busy * 1e6 / transactions as f64)
}

/// Squeezes a (possibly multi-line) error into one line of at most 400 characters.
fn one_line(s: &str) -> String {
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    match s.char_indices().nth(400) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

impl Report {
    /// The successful runs of `target` for `test`, and the first failure.
    fn runs(&self, target: Target, test: Test) -> (Vec<Measured>, Option<String>) {
        let mut ok = Vec::new();
        let mut err = None;
        for s in self
            .samples
            .iter()
            .filter(|s| s.target == target && s.test == test)
        {
            match &s.outcome {
                Ok(m) => ok.push(*m),
                Err(e) => {
                    err.get_or_insert_with(|| e.clone());
                }
            }
        }
        (ok, err)
    }

    fn rows(&self) -> Vec<Row> {
        let mut targets: Vec<Target> = Vec::new();
        for t in &self.order {
            if !targets.contains(t) {
                targets.push(*t);
            }
        }
        let mut rows = Vec::new();
        for &target in &targets {
            for &test in &self.tests {
                let base = aggregate(&self.runs(Target::Direct, test).0).map(|(m, _)| m.tps);
                let (ok, err) = self.runs(target, test);
                let runs = ok.len();
                let (outcome, spread) = match (aggregate(&ok), err) {
                    (Some((m, spread)), _) => (Ok(m), spread),
                    (None, Some(e)) => (Err(e), None),
                    (None, None) => continue,
                };
                let ratio = match (&outcome, base) {
                    (Ok(m), Some(b)) if b > 0.0 => Some(m.tps / b),
                    _ => None,
                };
                let cpus: Vec<f64> = self
                    .samples
                    .iter()
                    .filter(|s| s.target == target && s.test == test && s.outcome.is_ok())
                    .filter_map(|s| s.proxy_cpu)
                    .collect();
                let proxy_cpu =
                    (!cpus.is_empty()).then(|| cpus.iter().sum::<f64>() / cpus.len() as f64);
                let cpu_per_tx_us = cpu_per_transaction(
                    self.samples
                        .iter()
                        .filter(|s| s.target == target && s.test == test),
                );
                rows.push(Row {
                    target,
                    test,
                    outcome,
                    spread,
                    runs,
                    ratio,
                    proxy_cpu,
                    cpu_per_tx_us,
                });
            }
        }
        rows
    }

    /// Issue 4's goals, checked against this run.
    fn goals(&self, rows: &[Row]) -> Vec<String> {
        let tps = |target: Target, test: Test| {
            rows.iter()
                .find(|r| r.target == target && r.test == test)
                .and_then(|r| r.outcome.as_ref().ok().map(|m| (m.tps, r.ratio)))
        };
        let verdict = |ok: bool| if ok { "met" } else { "not met" };
        let cost = |target: Target, test: Test| {
            rows.iter()
                .find(|r| r.target == target && r.test == test)
                .and_then(|r| r.cpu_per_tx_us)
        };
        // What a goal of `goal` × direct leaves a proxy to spend, when the
        // machine is CPU-bound and TPS is cores / CPU per transaction.
        let budget = |target: Target, test: Test, goal: f64| match (
            cost(target, test),
            cost(Target::Direct, test),
        ) {
            (Some(c), Some(d)) => format!(
                "; machine CPU per transaction {c:.0} µs against direct's {d:.0} µs \
                 ({goal:.2} of direct needs at most {:.0} µs)",
                d / goal
            ),
            _ => String::new(),
        };
        let mut out = Vec::new();
        let mut routers: Vec<Target> = Vec::new();
        for t in self.order.iter().filter(|t| matches!(t, Target::Router(_))) {
            if !routers.contains(t) {
                routers.push(*t);
            }
        }
        for target in routers {
            if let Some((_, Some(r))) = tps(target, Test::SelectOnly) {
                out.push(format!(
                    "{target}, select-only: {r:.2} of direct (goal 0.85): {}{}",
                    verdict(r >= 0.85),
                    budget(target, Test::SelectOnly, 0.85)
                ));
            }
            let bouncer = tps(
                Target::PgBouncer(BouncerMode::Session),
                Test::SelectOnlyConnect,
            );
            if let (Some((t, _)), Some((b, _))) = (tps(target, Test::SelectOnlyConnect), bouncer) {
                out.push(format!(
                    "{target}, select-only -C: {:.2} of PgBouncer session (goal 1.00): {}",
                    t / b,
                    verdict(t >= b)
                ));
            }
            if let Some((_, Some(r))) = tps(target, Test::TpcB) {
                out.push(format!(
                    "{target}, TPC-B: {r:.2} of direct (goal 0.90): {}{}",
                    verdict(r >= 0.9),
                    budget(target, Test::TpcB, 0.9)
                ));
            }
        }
        out
    }

    const HEADER: [&'static str; 9] = [
        "target",
        "test",
        "TPS",
        "latency avg ms",
        "connect avg ms",
        "vs direct",
        "proxy CPU",
        "CPU µs/tx",
        "runs (spread)",
    ];

    fn cells(row: &Row) -> [String; 9] {
        let (tps, lat, conn) = match &row.outcome {
            Ok(m) => (
                format!("{:.0}", m.tps),
                format!("{:.3}", m.latency_ms),
                m.connect_ms.map_or("-".into(), |c| format!("{c:.3}")),
            ),
            Err(_) => ("failed".into(), "-".into(), "-".into()),
        };
        let runs = match row.spread {
            Some(s) => format!("{} ({:.0}%)", row.runs, s * 100.0),
            None => row.runs.to_string(),
        };
        [
            row.target.to_string(),
            row.test.to_string(),
            tps,
            lat,
            conn,
            row.ratio.map_or("-".into(), |r| format!("{r:.2}")),
            row.proxy_cpu
                .map_or("-".into(), |c| format!("{:.0}%", c * 100.0)),
            row.cpu_per_tx_us.map_or("-".into(), |c| format!("{c:.0}")),
            runs,
        ]
    }

    fn failures(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .samples
            .iter()
            .filter_map(|s| {
                s.outcome
                    .as_ref()
                    .err()
                    .map(|e| format!("{} {}: {}", s.target, s.test, one_line(e)))
            })
            .collect();
        out.extend(
            self.skipped
                .iter()
                .map(|(t, why)| format!("{t}: skipped: {}", one_line(why))),
        );
        out
    }

    /// Notes under the table: how direct ran, goals, failures.
    fn notes(&self, rows: &[Row]) -> Vec<String> {
        let mut notes = Vec::new();
        if self.order.first() == Some(&Target::Direct) {
            notes.push(
                "direct ran first and after every round of proxies (rotated by one place \
                 per round); its row is the mean, \
                 ratios are to that mean; spread = (max - min) / mean of TPS over the runs; \
                 proxy CPU = CPU time of the proxy process / run time (100% = one core); \
                 CPU µs/tx = busy CPU time of the whole machine (user and system on every \
                 core; not idle, iowait or steal) / transactions, pgbench, Postgres and the \
                 proxy together: while every core is busy, TPS is about cores / CPU per \
                 transaction, so a proxy's TPS ratio is about direct's CPU µs/tx / its own"
                    .to_string(),
            );
        }
        notes.extend(self.notes.iter().cloned());
        notes.extend(self.goals(rows));
        notes.extend(self.failures());
        notes
    }

    fn plain(&self, cx: &RunInfo, shape: &Shape, scale: u32) -> String {
        let rows = self.rows();
        let cells: Vec<[String; 9]> = rows.iter().map(Self::cells).collect();
        let mut width = Self::HEADER.map(str::len);
        for r in &cells {
            for (w, c) in width.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: [&str; 9]| {
            let mut s = String::new();
            for (i, (c, w)) in cells.iter().zip(width).enumerate() {
                if i < 2 || i == 8 {
                    let _ = write!(s, "{c:<w$}  ");
                } else {
                    let _ = write!(s, "{c:>w$}  ");
                }
            }
            s.trim_end().to_string() + "\n"
        };
        let mut out = format!(
            "\n{}\n{} clients, {} threads, {} s per run, scale {scale}, query mode {}\n\n",
            cx.command,
            shape.clients,
            shape.threads.min(shape.clients),
            shape.duration_s,
            shape.query_mode
        );
        out.push_str(&line(Self::HEADER));
        for r in &cells {
            out.push_str(&line([
                &r[0], &r[1], &r[2], &r[3], &r[4], &r[5], &r[6], &r[7], &r[8],
            ]));
        }
        out.push('\n');
        for n in self.notes(&rows) {
            let _ = writeln!(out, "{n}");
        }
        let _ = writeln!(
            out,
            "machine: {} CPUs ({}), Linux {}, autogroup scheduling {}, load average before {} / after {}",
            cx.cpus, cx.cpu_model, cx.kernel, cx.autogroup, cx.load_before, cx.load_after
        );
        let _ = writeln!(out, "versions: {}", cx.versions.join("; "));
        out
    }

    fn markdown(&self, cx: &RunInfo, shape: &Shape, scale: u32) -> String {
        let rows = self.rows();
        let mut out = format!(
            "```sh\n{}\n```\n\n{} clients, {} pgbench threads, {} s per run, scale {scale}, \
             query mode {}. {}\n\n",
            cx.command,
            shape.clients,
            shape.threads.min(shape.clients),
            shape.duration_s,
            shape.query_mode,
            cx.machine()
        );
        let _ = writeln!(out, "| {} |", Self::HEADER.join(" | "));
        out.push_str("|---|---|---:|---:|---:|---:|---:|---:|---|\n");
        for r in &rows {
            let _ = writeln!(out, "| {} |", Self::cells(r).join(" | "));
        }
        out.push('\n');
        for n in self.notes(&rows) {
            let _ = writeln!(out, "- {n}");
        }
        let _ = writeln!(out, "\nVersions: {}.", cx.versions.join("; "));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ThroughputArgs,
    }

    fn order(argv: &[&str]) -> Vec<String> {
        let cli =
            Cli::try_parse_from(std::iter::once("t").chain(argv.iter().copied())).expect("parse");
        schedule(&cli.args)
            .expect("schedule")
            .iter()
            .map(|t| t.to_string())
            .collect()
    }

    #[test]
    fn direct_first_and_after_each_round() {
        assert_eq!(
            order(&[]),
            [
                "direct",
                "router session",
                "router transaction",
                "pgbouncer session",
                "pgbouncer transaction",
                "haproxy tcp",
                "direct"
            ]
        );
        assert_eq!(
            order(&[
                "--only",
                "router,direct",
                "--rounds",
                "2",
                "--router-pool-mode",
                "none"
            ]),
            ["direct", "router", "direct", "router", "direct"]
        );
        assert_eq!(
            order(&["--only", "direct,pgbouncer", "--rounds", "2"]),
            [
                "direct",
                "pgbouncer session",
                "pgbouncer transaction",
                "direct",
                "pgbouncer transaction",
                "pgbouncer session",
                "direct"
            ]
        );
        assert_eq!(
            order(&[
                "--only",
                "pgbouncer",
                "--router-pool-mode",
                "none,transaction"
            ]),
            ["pgbouncer session", "pgbouncer transaction"]
        );
    }

    #[test]
    fn router_rows_get_the_router_settings_asked_for() {
        let settings = |argv: &[&str]| {
            let cli = Cli::try_parse_from(std::iter::once("t").chain(argv.iter().copied()))
                .expect("parse");
            router_settings(&cli.args)
        };
        assert_eq!(
            settings(&[]),
            "worker_threads = 1\ncpu_scheduling = \"batch\"\n"
        );
        assert_eq!(
            settings(&[
                "--router-worker-threads",
                "0",
                "--router-cpu-scheduling",
                "normal"
            ]),
            ""
        );
        assert!(Cli::try_parse_from(["t", "--router-cpu-scheduling", "fifo"]).is_err());
    }

    #[test]
    fn mean_and_spread() {
        let m = |tps| Measured {
            tps,
            latency_ms: 1.0,
            connect_ms: None,
            transactions: 10,
            failed: 0,
        };
        let (mean, spread) = aggregate(&[m(90.0), m(110.0)]).expect("runs");
        assert_eq!((mean.tps, spread), (100.0, Some(0.2)));
        assert_eq!(aggregate(&[m(5.0)]).map(|(_, s)| s), Some(None));
        assert!(aggregate(&[]).is_none());
    }

    #[test]
    fn cpu_per_transaction_counts_only_runs_that_measured_it() {
        let sample = |outcome: Result<u64, &str>, machine_cpu| Sample {
            target: Target::Direct,
            test: Test::SelectOnly,
            outcome: outcome
                .map(|transactions| Measured {
                    tps: 1.0,
                    latency_ms: 1.0,
                    connect_ms: None,
                    transactions,
                    failed: 0,
                })
                .map_err(str::to_string),
            proxy_cpu: None,
            machine_cpu,
        };
        let runs = [
            sample(Ok(100_000), Some(8.0)),
            sample(Ok(300_000), Some(16.0)),
            sample(Ok(50_000), None),
            sample(Err("failed"), Some(9.0)),
        ];
        assert_eq!(cpu_per_transaction(runs.iter()), Some(60.0));
        assert_eq!(cpu_per_transaction(runs[2..].iter()), None);
    }
}
