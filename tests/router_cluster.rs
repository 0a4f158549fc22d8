//! The router in front of a real two-node cluster (real hapg monitor, keepers
//! and PostgreSQL 15): a live writer through the router during a switchover
//! (the hitless drain: no client error, the monitor does not wait out its
//! drain timeout) and during a power-off of the primary; `show uri` lists the
//! router. The nodes run on this machine and the router has
//! `server.unix_socket_dir`: every primary is reached through its Unix socket,
//! and a cancel request still finds its query.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use support::{connect, wait_writable, Cluster, RouterProcess, Writer, WriterReport};

const STEP: Duration = Duration::from_secs(90);

/// Acknowledged ids missing from `table` at `uri`.
async fn lost(uri: &str, table: &str, acked: &[i64]) -> Vec<i64> {
    let client = connect(uri).await.expect("connect to check the writes");
    let present: HashSet<i64> = client
        .query(&format!("SELECT id FROM {table}"), &[])
        .await
        .expect("read the writes")
        .iter()
        .map(|r| r.get(0))
        .collect();
    acked
        .iter()
        .copied()
        .filter(|id| !present.contains(id))
        .collect()
}

/// Seconds between the newest event whose description contains `from` and the
/// first later one that contains `to`, read from the monitor database.
async fn event_gap(monitor_uri: &str, from: &str, to: &str) -> Option<f64> {
    connect(monitor_uri)
        .await
        .expect("connect to the monitor")
        .query_one(
            "WITH a AS (SELECT max(event_id) AS id, max(event_time) AS t FROM hapg.event
                         WHERE description LIKE '%' || $1 || '%')
             SELECT extract(epoch FROM (SELECT min(e.event_time) FROM hapg.event e, a
                                         WHERE e.event_id > a.id
                                           AND e.description LIKE '%' || $2 || '%') - a.t)::float8
               FROM a",
            &[&from, &to],
        )
        .await
        .expect("read events")
        .get(0)
}

/// Waits (bounded) until `writer`-style progress is visible: `count` more rows
/// acknowledged in `table` at `uri` than `before`.
async fn wait_rows(uri: &str, table: &str, more_than: i64, limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(c) = connect(uri).await {
            if let Ok(row) = c
                .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await
            {
                if row.get::<_, i64>(0) > more_than {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no new rows in {table} within {limit:?}");
}

/// The router's server connection for a client at `uri` is on the primary's
/// Unix socket: Postgres shows no client address for it.
async fn assert_reached_through_unix_socket(uri: &str, primary: &str) {
    let client = connect(uri).await.expect("connect through the router");
    let row = client
        .query_one(
            "SELECT client_addr IS NULL, coalesce(host(client_addr), 'none')
               FROM pg_stat_activity WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("read the router's server connection");
    let address: String = row.get(1);
    assert!(
        row.get::<_, bool>(0),
        "{primary}: the router reached the primary over TCP from {address}, not through its Unix socket"
    );
}

/// A cancel request sent to the router stops a query running on the primary
/// (the router forwards it to the primary's TCP address).
async fn assert_cancel_reaches_the_query(uri: &str) {
    let client = connect(uri).await.expect("connect through the router");
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(60)").await });
    // Bounded: the query must be running on the server before it is cancelled.
    let checker = connect(uri).await.expect("connect through the router");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let running: i64 = checker
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'",
                &[],
            )
            .await
            .expect("look for the query")
            .get(0);
        if running > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "pg_sleep(60) never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("send the cancel request to the router");
    let result = tokio::time::timeout(Duration::from_secs(20), sleeper)
        .await
        .expect("the cancelled query did not end within 20 s")
        .expect("join the query");
    let error = result.expect_err("pg_sleep(60) finished instead of being cancelled");
    assert_eq!(
        error.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{error}"
    );
}

fn summary(what: &str, reports: &[WriterReport]) -> String {
    reports
        .iter()
        .enumerate()
        .map(|(i, r)| {
            format!(
                "{what} writer {i}: {} acked, {} errors, longest gap {:?}",
                r.acked.len(),
                r.errors,
                r.longest_gap
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_in_front_of_a_cluster_switchover_and_power_off() {
    let cluster = Cluster::formation(&["node_a", "node_b"], STEP);
    let monitor_uri = cluster.monitor_uri();

    // One worker under batch scheduling, as hapg-bench runs it: the
    // current-thread scheduler carries the switchover and the power-off too.
    let router = cluster.start_router(
        "router",
        &format!(
            "pause_timeout_ms = 30000\nworker_threads = 1\ncpu_scheduling = \"batch\"\n\n\
             [server]\nunix_socket_dir = \"{}\"",
            hapg_keeper::postgres::SOCKET_DIR
        ),
    );
    let uri = router.uri("appdb");
    wait_writable(&uri, STEP).await;
    assert_reached_through_unix_socket(&uri, "node A, the first primary").await;
    assert_cancel_reaches_the_query(&uri).await;

    // (c) `show uri` lists the router (it registers about once a second).
    let address = format!("postgres://127.0.0.1:{}/appdb", router.port);
    cluster.eventually("show uri to list the router", STEP, || {
        let table = cluster.ok(&["show", "uri", "--pgdata", "./monitor"]);
        table
            .lines()
            .any(|l| l.contains("router") && l.contains(&router.id) && l.contains(&address))
    });

    let client = connect(&uri).await.expect("connect through the router");
    client
        .batch_execute(
            "CREATE TABLE writes (id bigint PRIMARY KEY);
             CREATE TABLE failover_writes_0 (id bigint PRIMARY KEY);
             CREATE TABLE failover_writes_1 (id bigint PRIMARY KEY);",
        )
        .await
        .expect("create tables");
    drop(client);

    // (a) Switchover under a live writer through the router.
    let writer = Writer::start(uri.clone(), "writes", Duration::from_secs(300));
    wait_rows(&uri, "writes", 20, STEP).await;
    let started = Instant::now();
    cluster.ok(&["perform", "switchover", "--pgdata", "./monitor"]);
    let switchover_time = started.elapsed();
    cluster.wait_states(&[("node_a", "secondary"), ("node_b", "primary")], STEP);
    // Writes go on on the new primary.
    let before: i64 = connect(&uri)
        .await
        .expect("connect")
        .query_one("SELECT count(*) FROM writes", &[])
        .await
        .expect("count")
        .get(0);
    wait_rows(&uri, "writes", before + 20, STEP).await;
    assert_reached_through_unix_socket(&uri, "node B, primary after the switchover").await;
    let report = writer.finish().await;
    let node_b = cluster.node("node_b");
    let on_b = format!("postgres://postgres@127.0.0.1:{}/appdb", node_b.port);
    let lost_switchover = lost(&on_b, "writes", &report.acked).await;
    let events = cluster.ok(&["show", "events", "--pgdata", "./monitor", "--count", "200"]);
    let drain_phase = event_gap(
        &monitor_uri,
        "Switchover requested",
        "every router drained it",
    )
    .await;
    eprintln!(
        "switchover through the router: `perform switchover` took {switchover_time:?}, \
         request to primary-stop {drain_phase:?} s\n{}",
        summary("switchover", std::slice::from_ref(&report))
    );
    assert!(
        events.contains("every router drained it"),
        "the monitor did not see the router drain:\n{events}\n{}",
        cluster.log(&router.name)
    );
    assert!(
        drain_phase.is_some_and(|s| s < 10.0),
        "drain phase {drain_phase:?} s"
    );
    assert!(
        switchover_time < Duration::from_secs(10),
        "switchover took {switchover_time:?}"
    );
    assert_eq!(
        report.errors,
        0,
        "client errors during the switchover; router log:\n{}",
        cluster.log(&router.name)
    );
    assert!(
        lost_switchover.is_empty(),
        "acknowledged writes lost: {lost_switchover:?}"
    );
    assert!(report.acked.len() > 40, "{report:?}");

    // (b) Power-off of the primary (node B now) with writers through the router.
    // Each writer has its own table: the ids of a writer start at 1.
    let writers: Vec<Writer> = (0..2)
        .map(|i| {
            Writer::start(
                uri.clone(),
                &format!("failover_writes_{i}"),
                Duration::from_secs(300),
            )
        })
        .collect();
    wait_rows(&uri, "failover_writes_1", 20, STEP).await;
    let powered_off = Instant::now();
    cluster.power_off("node_b");
    cluster.wait_states(&[("node_a", "wait_primary")], STEP);
    let promoted = powered_off.elapsed();
    let node_a = cluster.node("node_a");
    let on_a = format!("postgres://postgres@127.0.0.1:{}/appdb", node_a.port);
    let before: i64 = connect(&on_a)
        .await
        .expect("connect to node A")
        .query_one("SELECT count(*) FROM failover_writes_0", &[])
        .await
        .expect("count")
        .get(0);
    wait_rows(&on_a, "failover_writes_0", before + 20, STEP).await;
    let mut reports = Vec::new();
    for w in writers {
        reports.push(w.finish().await);
    }
    eprintln!(
        "power-off through the router: node A wait_primary {promoted:?} after the power-off\n{}",
        summary("power-off", &reports)
    );
    for (i, r) in reports.iter().enumerate() {
        assert!(
            r.errors <= 1,
            "writer {i} saw {} errors; router log:\n{}",
            r.errors,
            cluster.log(&router.name)
        );
        let missing = lost(&on_a, &format!("failover_writes_{i}"), &r.acked).await;
        assert!(
            missing.is_empty(),
            "writer {i}: acknowledged writes lost: {missing:?}"
        );
        assert!(r.acked.len() > 20, "writer {i}: {r:?}");
    }
    // Writes resumed on the new primary through the router.
    let c = connect(&uri).await.expect("connect through the router");
    let port: i32 = c
        .query_one("SELECT current_setting('port')::int", &[])
        .await
        .expect("query")
        .get(0);
    assert_eq!(port as u16, node_a.port);
    assert_reached_through_unix_socket(&uri, "node A, primary after the power-off").await;

    // SIGHUP to the router process: a good file takes effect for new logins,
    // a bad one is refused and the last good one stays in force.
    sighup_reloads_and_a_bad_file_keeps_the_old_one(&cluster, &router).await;
    cluster.terminate(&router.name);
}

/// Logs in through the router as `postgres`, with `password` if given.
async fn logs_in(router: &RouterProcess, password: Option<&str>) -> bool {
    let uri = match password {
        Some(p) => format!("postgres://postgres:{p}@127.0.0.1:{}/appdb", router.port),
        None => router.uri("appdb"),
    };
    match connect(&uri).await {
        Ok(client) => client.simple_query("SELECT 1").await.is_ok(),
        Err(_) => false,
    }
}

async fn sighup_reloads_and_a_bad_file_keeps_the_old_one(
    cluster: &Cluster,
    router: &RouterProcess,
) {
    let pid = nix::unistd::Pid::from_raw(cluster.keeper_pid(&router.name).expect("router pid"));
    let hangup = || nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    let trusting = std::fs::read_to_string(&router.config).expect("read router config");
    assert!(logs_in(router, None).await, "trust before the reload");
    std::fs::write(
        cluster.path().join("users.txt"),
        "\"postgres\" \"s3cret\"\n",
    )
    .expect("write the user list");
    let md5 = trusting.replace(
        "[auth]\ntype = \"trust\"\n",
        "[auth]\ntype = \"md5\"\nfile = \"users.txt\"\n",
    );
    assert_ne!(md5, trusting, "the [auth] section was found");
    std::fs::write(&router.config, &md5).expect("write router config");
    hangup();
    let deadline = Instant::now() + Duration::from_secs(30);
    while logs_in(router, None).await && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!logs_in(router, None).await, "md5 in force after SIGHUP");
    assert!(
        logs_in(router, Some("s3cret")).await,
        "the password logs in"
    );

    // A bad value: refused, logged, and md5 stays in force.
    std::fs::write(
        &router.config,
        md5.replace("[auth]", "[pool]\npool_size = 0\n\n[auth]"),
    )
    .expect("write router config");
    hangup();
    cluster.eventually("the router to refuse the bad file", STEP, || {
        cluster.log(&router.name).contains("reload refused")
    });
    assert!(
        cluster.log(&router.name).contains("pool.pool_size"),
        "the refusal names the key"
    );
    assert!(!logs_in(router, None).await, "still md5 after the bad file");
    assert!(
        logs_in(router, Some("s3cret")).await,
        "still the same users"
    );
}
