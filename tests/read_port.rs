//! The router's read-only port in front of a real three-node formation (real
//! hapg monitor, keepers and PostgreSQL 15): 40 read sessions spread over the
//! two standbys; a standby whose replay is paused while writes go on leaves
//! the read pool past `max_lag_bytes` (its idle sessions move, new ones go
//! elsewhere) and comes back after `pg_wal_replay_resume()`; with both
//! standbys out, each `[read_only] fallback` does what it says; and reads
//! during a switchover are never served by a node outside the read pool and
//! never fail.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{connect, direct_uri, free_port, wait_writable, Cluster};

const STEP: Duration = Duration::from_secs(90);

/// Where a read session's statement ran: (in recovery, the node's port).
async fn where_served(
    client: &tokio_postgres::Client,
) -> Result<(bool, i32), tokio_postgres::Error> {
    let row = client
        .query_one("SELECT pg_is_in_recovery(), inet_server_port()", &[])
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// A new read session and where its first statement ran.
async fn new_read(uri: &str) -> (tokio_postgres::Client, (bool, i32)) {
    let client = connect(uri).await.expect("connect to the read port");
    let at = where_served(&client)
        .await
        .expect("read through the read port");
    (client, at)
}

/// Waits (bounded) until new read sessions land on every one of `ports`.
async fn wait_pool(uri: &str, ports: &[i32], what: &str) -> Result<(), String> {
    let deadline = Instant::now() + STEP;
    loop {
        let mut seen = Vec::new();
        let mut held = Vec::new();
        // Beyond the sessions already held: new ones go to the least
        // loaded standby first.
        for _ in 0..ports.len() * 2 + 12 {
            let (c, (rec, port)) = new_read(uri).await;
            if rec {
                seen.push(port);
            }
            held.push(c);
        }
        if ports.iter().all(|p| seen.contains(p)) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{what}: new read sessions went to {seen:?}, not to all of {ports:?}"
            ));
        }
        drop(held);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A read session through `read_uri` whose statements run on the node at
/// `port`, with its connection's task (what it ended with).
async fn session_on(
    read_uri: &str,
    port: i32,
) -> (
    tokio_postgres::Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    for _ in 0..20 {
        let (client, connection) = tokio_postgres::connect(read_uri, tokio_postgres::NoTls)
            .await
            .expect("connect to the read port");
        let task = tokio::spawn(connection);
        if where_served(&client).await.expect("read").1 == port {
            return (client, task);
        }
    }
    panic!("no read session landed on port {port} in 20 tries");
}

/// The router's sessions on a node (its client backends on `appdb` other
/// than the asking one), with `application_name` `app` if not empty.
async fn router_backends(node: &tokio_postgres::Client, app: &str) -> i64 {
    node.query_one(
        "SELECT count(*) FROM pg_stat_activity
          WHERE datname = 'appdb' AND backend_type = 'client backend'
            AND pid <> pg_backend_pid() AND ($1 = '' OR application_name = $1)",
        &[&app],
    )
    .await
    .expect("pg_stat_activity")
    .get(0)
}

/// Writes about `mb` MB of WAL on the primary.
async fn write_wal(primary_uri: &str, table: &str, mb: i64) {
    let c = connect(primary_uri).await.expect("connect to the primary");
    c.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {table} (g int, pad text);
         INSERT INTO {table} SELECT g, repeat('x', 1000) FROM generate_series(1, {}) g;",
        mb * 900
    ))
    .await
    .expect("write on the primary");
}

fn reload_with(cluster: &Cluster, router: &support::RouterProcess, from: &str, to: &str) {
    let text = std::fs::read_to_string(&router.config).expect("read the router config");
    assert!(text.contains(from), "{text}");
    std::fs::write(&router.config, text.replace(from, to)).expect("write the router config");
    let pid = cluster.keeper_pid(&router.name).expect("router pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP the router");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_port_balances_follows_lag_falls_back_and_survives_a_switchover() {
    let cluster = Cluster::formation(&["node_a", "node_b", "node_c"], STEP);
    let read_port = free_port();
    let router = cluster.start_router(
        "router",
        &format!(
            "pause_timeout_ms = 5000\nlisten_read_only = \"127.0.0.1:{read_port}\"\n\n\
             [read_only]\nmax_lag_bytes = 1048576\nlag_check_interval_ms = 200\nfallback = \"primary\"\n\n\
             [pool]\npool_size = 80\n"
        ),
    );
    let uri = router.uri("appdb");
    wait_writable(&uri, STEP).await;
    let read_uri = format!("postgres://postgres@127.0.0.1:{read_port}/appdb");
    let (a, b, c) = (
        cluster.node("node_a").port as i32,
        cluster.node("node_b").port as i32,
        cluster.node("node_c").port as i32,
    );
    let on_a = direct_uri(&cluster, "node_a");
    wait_pool(&read_uri, &[b, c], "both standbys in the read pool")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.log(&router.name)));

    // 40 read sessions, held open, spread over the two standbys.
    let mut sessions = Vec::new();
    let mut per_node: BTreeMap<i32, usize> = BTreeMap::new();
    for _ in 0..40 {
        let (client, (rec, port)) = new_read(&read_uri).await;
        assert!(rec, "a read session went to the primary (port {port})");
        *per_node.entry(port).or_default() += 1;
        sessions.push((client, port));
    }
    eprintln!("40 read sessions: {per_node:?}");
    let mut want = vec![b, c];
    want.sort();
    assert_eq!(per_node.keys().copied().collect::<Vec<_>>(), want);
    assert!(
        per_node.values().all(|n| *n >= 14),
        "unbalanced: {per_node:?}"
    );

    // On node B, besides: one idle session with a SET (it must move with it,
    // at once), and one holding state that cannot move (a SQL PREPARE): it
    // must end with a FATAL that says why, without sending anything.
    let (mover, _) = sessions
        .iter()
        .find(|(_, p)| *p == b)
        .expect("a session on node_b");
    mover
        .batch_execute("SET application_name = 'read_mover'")
        .await
        .expect("SET on a read session");
    let stuck = session_on(&read_uri, b).await;
    stuck
        .0
        .batch_execute("PREPARE held AS SELECT 1")
        .await
        .expect("PREPARE on a read session");

    // Node B's replay paused while the primary writes past max_lag_bytes.
    let on_b = connect(&direct_uri(&cluster, "node_b"))
        .await
        .expect("connect to node_b");
    on_b.batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .expect("pause node_b");
    write_wal(&on_a, "lag_1", 4).await;
    let deadline = Instant::now() + STEP;
    loop {
        let mut ports = Vec::new();
        let mut held = Vec::new();
        for _ in 0..6 {
            let (cl, (_, port)) = new_read(&read_uri).await;
            ports.push(port);
            held.push(cl);
        }
        if ports.iter().all(|p| *p == c) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node_b, paused and behind, still gets new sessions: {ports:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Its idle sessions moved before sending anything: node B has no
    // session of the router left, node C has the one with the SET.
    let on_c_direct = connect(&direct_uri(&cluster, "node_c"))
        .await
        .expect("connect to node_c");
    let moved_in = Instant::now();
    loop {
        let left_on_b = router_backends(&on_b, "").await;
        let mover_on_c = router_backends(&on_c_direct, "read_mover").await;
        if left_on_b == 0 && mover_on_c == 1 {
            break;
        }
        assert!(
            moved_in.elapsed() < Duration::from_secs(30),
            "idle sessions not moved off node_b: {left_on_b} left there, the mover on node_c: {mover_on_c}\n{}",
            cluster.log(&router.name)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "idle sessions moved off node_b {:?} after it left the read pool (by the check)",
        moved_in.elapsed()
    );
    // The session that cannot move was ended, by itself, with a FATAL.
    let ended = tokio::time::timeout(Duration::from_secs(30), stuck.1)
        .await
        .expect("the unmovable session ends")
        .expect("connection task");
    let err = ended.expect_err("the unmovable session ends with an error");
    let db = err.as_db_error().expect("the router's FATAL");
    assert_eq!(
        (db.severity(), db.code().code()),
        ("FATAL", "08006"),
        "{db:?}"
    );
    assert!(
        db.message().contains("left the read pool")
            && db.message().contains("SQL PREPAREd statements cannot move")
            && db.message().contains("bytes behind the primary"),
        "{db:?}"
    );
    assert!(stuck.0.is_closed());
    let app = mover
        .query_one("SHOW application_name", &[])
        .await
        .expect("the moved session");
    assert_eq!(app.get::<_, String>(0), "read_mover", "SET restored");
    // Its idle sessions moved: their next statement runs on node C.
    for (client, port) in sessions.iter().filter(|(_, p)| *p == b) {
        let at = where_served(client)
            .await
            .expect("an idle session on node_b moves without error");
        assert_eq!(at, (true, c), "a session of node_b (was {port})");
    }
    // The 40 sessions are all on node C now: new ones would all go to node
    // B (the fewest) and not show node C; without them both get some.
    drop(sessions);
    on_b.batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .expect("resume node_b");
    wait_pool(
        &read_uri,
        &[b, c],
        "node_b back in the read pool after resume",
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.log(&router.name)));

    // Both standbys out of the read pool: each fallback.
    let on_c = connect(&direct_uri(&cluster, "node_c"))
        .await
        .expect("connect to node_c");
    on_b.batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .expect("pause node_b");
    on_c.batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .expect("pause node_c");
    write_wal(&on_a, "lag_2", 4).await;
    let deadline = Instant::now() + STEP;
    loop {
        let (_cl, at) = new_read(&read_uri).await;
        if at == (false, a) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fallback = primary: reads still go to {at:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    reload_with(
        &cluster,
        &router,
        "fallback = \"primary\"",
        "fallback = \"error\"",
    );
    let deadline = Instant::now() + STEP;
    loop {
        let client = connect(&read_uri).await.expect("connect to the read port");
        match where_served(&client).await {
            Err(e) => {
                let db = e.as_db_error().expect("the router's own error");
                assert_eq!(db.code().code(), "57P03", "{db:?}");
                assert!(db.message().contains("no standby is eligible"), "{db:?}");
                break;
            }
            Ok(at) => assert!(
                Instant::now() < deadline,
                "fallback = error: still served at {at:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    reload_with(
        &cluster,
        &router,
        "fallback = \"error\"",
        "fallback = \"wait\"",
    );
    // A read session waits (pause_timeout_ms 5000) and gets node C once it
    // has caught up.
    let deadline = Instant::now() + STEP;
    let waited = loop {
        let client = connect(&read_uri).await.expect("connect to the read port");
        let started = Instant::now();
        let resumer = {
            let on_c = connect(&direct_uri(&cluster, "node_c"))
                .await
                .expect("connect to node_c");
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                on_c.batch_execute("SELECT pg_wal_replay_resume()")
                    .await
                    .expect("resume node_c");
            })
        };
        match where_served(&client).await {
            Ok(at) => {
                assert_eq!(at, (true, c), "fallback = wait: served by the wrong node");
                resumer.await.expect("resumer");
                break started.elapsed();
            }
            Err(e) => {
                // The reload may not have been applied yet (error mode).
                assert!(Instant::now() < deadline, "fallback = wait: {e}");
                resumer.await.expect("resumer");
                on_c.batch_execute("SELECT pg_wal_replay_pause()")
                    .await
                    .expect("pause node_c");
                write_wal(&on_a, "lag_2", 4).await;
            }
        }
    };
    assert!(
        waited >= Duration::from_millis(1000),
        "fallback = wait did not wait: {waited:?}"
    );
    on_b.batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .expect("resume node_b");
    wait_pool(&read_uri, &[b, c], "both standbys back")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.log(&router.name)));

    // Reads during a switchover: never on a node out of the read pool,
    // never an error.
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let (read_uri, stop) = (read_uri.clone(), stop.clone());
            tokio::spawn(async move {
                let client = connect(&read_uri).await.expect("connect to the read port");
                let mut served = Vec::new();
                let mut errors = Vec::new();
                while !stop.load(Ordering::Relaxed) && served.len() + errors.len() < 100_000 {
                    match where_served(&client).await {
                        Ok(at) => served.push(at),
                        Err(e) => errors.push(e.to_string()),
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                (served, errors)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.ok(&["perform", "switchover", "--pgdata", "./monitor"]);
    cluster.eventually("a new primary", STEP, || {
        cluster
            .states()
            .values()
            .filter(|(r, g)| r == "primary" && g == "primary")
            .count()
            == 1
            && cluster
                .states()
                .get("node_a")
                .is_some_and(|(r, _)| r == "secondary")
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for r in readers {
        let (served, errors) = r.await.expect("reader");
        assert!(
            errors.is_empty(),
            "read errors during the switchover: {errors:?}\n{}",
            cluster.log(&router.name)
        );
        let outside: Vec<_> = served.iter().filter(|(rec, _)| !rec).collect();
        assert!(
            outside.is_empty(),
            "reads served by a node out of recovery: {outside:?}"
        );
        total += served.len();
    }
    eprintln!("switchover: {total} reads through the read port, none on a primary, no error");
    assert!(total > 100, "{total} reads");
}

/// Transaction mode: each transaction of one read session picks its standby
/// again (the two are tied at no other session: at random), so one client's
/// transactions reach both standbys. And `show uri` prints the read-only URI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_port_in_transaction_mode_picks_a_standby_per_transaction() {
    let cluster = Cluster::formation(&["node_a", "node_b", "node_c"], STEP);
    let read_port = free_port();
    let router = cluster.start_router(
        "router",
        &format!(
            "listen_read_only = \"127.0.0.1:{read_port}\"\n\n\
             [read_only]\nlag_check_interval_ms = 200\n\n[pool]\nmode = \"transaction\"\n"
        ),
    );
    wait_writable(&router.uri("appdb"), STEP).await;
    let read_uri = format!("postgres://postgres@127.0.0.1:{read_port}/appdb");
    // `show uri` lists the read-only port beside the router's main one (it
    // registers both about once a second).
    let main = format!("postgres://127.0.0.1:{}/appdb", router.port);
    let read_only = format!("postgres://127.0.0.1:{read_port}/appdb");
    cluster.eventually("show uri to list the read-only port", STEP, || {
        let table = cluster.ok(&["show", "uri", "--pgdata", "./monitor"]);
        let lines: Vec<&str> = table.lines().collect();
        lines
            .iter()
            .any(|l| l.contains("read-only") && l.contains(&router.id) && l.contains(&read_only))
            && lines
                .iter()
                .any(|l| l.contains("router") && l.contains(&router.id) && l.contains(&main))
    });
    let (b, c) = (
        cluster.node("node_b").port as i32,
        cluster.node("node_c").port as i32,
    );
    let deadline = Instant::now() + STEP;
    let client = connect(&read_uri).await.expect("connect to the read port");
    let mut seen: BTreeMap<i32, usize> = BTreeMap::new();
    loop {
        seen.clear();
        for _ in 0..30 {
            let (rec, port) = where_served(&client).await.expect("read");
            if rec {
                *seen.entry(port).or_default() += 1;
            }
        }
        if seen.contains_key(&b) && seen.contains_key(&c) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "one session's transactions went to {seen:?}, not to both standbys"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("transaction mode, one session, 30 transactions: {seen:?}");
}

/// What one reader saw: each statement's node (in recovery, port), and each
/// error with the port of the node its session last read from.
#[derive(Default)]
struct Seen {
    served: Vec<(bool, i32)>,
    errors: Vec<(String, Option<i32>)>,
}

/// Readers through the read port, each on one session reading every 20 ms
/// until `stop`.
fn start_readers(
    read_uri: &str,
    n: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Seen>> {
    (0..n)
        .map(|_| {
            let (read_uri, stop) = (read_uri.to_string(), stop.clone());
            tokio::spawn(async move {
                let client = connect(&read_uri).await.expect("connect to the read port");
                let mut seen = Seen::default();
                let mut last = None;
                while !stop.load(Ordering::Relaxed) && seen.served.len() < 100_000 {
                    match where_served(&client).await {
                        Ok(at) => {
                            last = Some(at.1);
                            seen.served.push(at);
                        }
                        Err(e) => seen.errors.push((
                            e.as_db_error().map_or_else(
                                || e.to_string(),
                                |d| format!("{} {}", d.code().code(), d.message()),
                            ),
                            last,
                        )),
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                seen
            })
        })
        .collect()
}

/// The pids of a node's `hapg run` and of its Postgres tree.
fn node_pids(cluster: &Cluster, name: &str) -> Vec<i32> {
    let mut pids: Vec<i32> = cluster.keeper_pid(name).into_iter().collect();
    if let Some(postmaster) = support::postmaster_pid(&cluster.node(name).pgdata) {
        pids.extend(hapg::drill::process_tree(postmaster));
    }
    pids
}

/// Reads through the read port while, in turn, a standby freezes (SIGSTOP of
/// its keeper and Postgres: its sockets stay open and silent, as across a
/// cut link), the same standby powers off (SIGKILL of both), and the
/// primary powers off (a failover). No reader sees an error but for a
/// statement in flight on the frozen or powered-off standby, and no
/// statement is ever served by a node out of recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_through_a_standby_freeze_and_power_offs() {
    use nix::sys::signal::Signal;
    let cluster = Cluster::formation(&["node_a", "node_b", "node_c"], STEP);
    let read_port = free_port();
    let router = cluster.start_router(
        "router",
        &format!(
            "pause_timeout_ms = 60000\ndrain_timeout_ms = 2000\nlisten_read_only = \"127.0.0.1:{read_port}\"\n\n\
             [read_only]\nlag_check_interval_ms = 200\nfallback = \"wait\"\n\n[pool]\npool_size = 80\n"
        ),
    );
    wait_writable(&router.uri("appdb"), STEP).await;
    let read_uri = format!("postgres://postgres@127.0.0.1:{read_port}/appdb");
    let (b, c) = (
        cluster.node("node_b").port as i32,
        cluster.node("node_c").port as i32,
    );
    wait_pool(&read_uri, &[b, c], "both standbys in the read pool")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.log(&router.name)));
    let stop = Arc::new(AtomicBool::new(false));
    let readers = start_readers(&read_uri, 8, &stop);
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 1. node_c freezes until the monitor sees it unhealthy (it leaves the
    // read pool), then thaws and comes back.
    let pids = node_pids(&cluster, "node_c");
    hapg::drill::signal_all(&pids, Signal::SIGSTOP);
    let frozen = Instant::now();
    let monitor_uri = cluster.monitor_uri();
    let mut unhealthy = false;
    while frozen.elapsed() < STEP {
        if let Ok(m) = connect(&monitor_uri).await {
            if let Ok(row) = m
                .query_one(
                    "SELECT health = 0 FROM hapg.node WHERE node_name = 'node_c'",
                    &[],
                )
                .await
            {
                unhealthy = row.get(0);
            }
        }
        if unhealthy {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Once the router took node_c (node id 3) out of its read pool, the
    // drain timeout (2 s) ends what was in flight there.
    cluster.eventually("the router to take frozen node_c out", STEP, || {
        cluster
            .log(&router.name)
            .contains("read pool changed standbys=[2] out=[(3, ")
    });
    tokio::time::sleep(Duration::from_millis(3500)).await;
    hapg::drill::signal_all(&pids, Signal::SIGCONT);
    eprintln!("node_c frozen for {:?}", frozen.elapsed());
    assert!(unhealthy, "the monitor never saw frozen node_c unhealthy");
    wait_pool(&read_uri, &[b, c], "node_c back after its freeze")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.log(&router.name)));

    // 2. node_c powers off, then runs again.
    cluster.power_off("node_c");
    cluster.eventually("node_c out of the read pool", STEP, || {
        cluster
            .states()
            .get("node_c")
            .is_some_and(|(r, _)| r != "secondary")
            || cluster
                .log(&router.name)
                .contains("read pool changed standbys=[2]")
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster
        .run_node("node_c", &[])
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.all_logs()));
    cluster.wait_states(&[("node_c", "secondary")], STEP);
    wait_pool(&read_uri, &[b, c], "node_c back after its power-off")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.log(&router.name)));

    // 3. The primary powers off: a standby is promoted (it leaves the read
    // pool), the other follows it and serves the reads.
    cluster.power_off("node_a");
    cluster.eventually("a new primary", STEP, || {
        cluster
            .states()
            .iter()
            .any(|(n, (r, g))| n != "node_a" && r == "primary" && g == "primary")
    });
    let states = cluster.states();
    let standby = if states.get("node_b").is_some_and(|(r, _)| r == "primary") {
        c
    } else {
        b
    };
    let new_primary = if standby == b { "node_c" } else { "node_b" };
    wait_pool(&read_uri, &[standby], "the other standby serves reads")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.log(&router.name)));
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);

    let mut total = 0;
    let mut on_c_errors = Vec::new();
    for r in readers {
        // A statement left waiting on the frozen standby would hold its
        // reader for good.
        let seen = tokio::time::timeout(Duration::from_secs(30), r)
            .await
            .unwrap_or_else(|_| panic!("a reader is stuck\n{}", cluster.log(&router.name)))
            .expect("reader");
        let outside: Vec<_> = seen.served.iter().filter(|(rec, _)| !rec).collect();
        assert!(
            outside.is_empty(),
            "reads served by a node out of recovery: {outside:?}"
        );
        for (e, last) in seen.errors {
            // Only a statement in flight on node_c (frozen or powered off)
            // may fail.
            assert_eq!(
                last,
                Some(c),
                "a read failed on a session not on node_c: {e}\n{}",
                cluster.log(&router.name)
            );
            on_c_errors.push(e);
        }
        total += seen.served.len();
    }
    eprintln!(
        "freeze and power-off of node_c, power-off of node_a ({new_primary} promoted): \
         {total} reads through the read port, none out of recovery, {} failed, all in flight on node_c: {on_c_errors:?}",
        on_c_errors.len()
    );
    assert!(total > 200, "{total} reads");
    // The readers on node_c each had a statement in flight when it froze:
    // the router cut them (they never ran), before node_c thawed.
    assert!(
        on_c_errors
            .iter()
            .any(|e| e.starts_with("57P01") && e.contains("standby left the read pool")),
        "no statement cut on the frozen standby: {on_c_errors:?}"
    );
}
