//! Operator controls and keeper supervision on a two-node group, with real
//! PostgreSQL 15: maintenance on either node, a keeper killed and restarted,
//! Postgres killed under a live keeper, drop and re-add of a node; clients
//! that wait for a monitor still being created; and a create interrupted
//! while it sets up Postgres.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use hapg_monitor::{MonitorClient, MonitorError};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::{connect, free_port, postmaster_pid, Cluster};

const STEP: Duration = Duration::from_secs(90);

/// Writes one row through the formation's URI, retrying (bounded) while the
/// primary is starting up, as a client of the multi-host URI must.
async fn write_through(cluster: &Cluster, value: i64) {
    let uri = cluster.app_uri();
    let mut last_error = String::new();
    for _ in 0..300 {
        match connect(&uri).await {
            Ok(client) => match client.execute("INSERT INTO t VALUES ($1)", &[&value]).await {
                Ok(_) => return,
                Err(e) => last_error = format!("{e:?}"),
            },
            Err(e) => last_error = format!("{e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("could not write {value} within 30 s: {last_error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_supervision_drop_and_readd() {
    let mut cluster = Cluster::formation(&["node_a", "node_b"], STEP);
    let uri = cluster.app_uri();
    connect(&uri)
        .await
        .expect("connect")
        .batch_execute("CREATE TABLE t (x bigint)")
        .await
        .expect("create table");

    // Maintenance on the standby: the primary goes asynchronous and keeps writing.
    cluster.ok(&["enable", "maintenance", "--pgdata", "./node_b"]);
    cluster.wait_states(
        &[("node_a", "wait_primary"), ("node_b", "maintenance")],
        STEP,
    );
    write_through(&cluster, 1).await;
    cluster.ok(&["disable", "maintenance", "--pgdata", "./node_b"]);
    cluster.wait_states(&[("node_a", "primary"), ("node_b", "secondary")], STEP);

    // Maintenance on the primary: the standby takes over first.
    cluster.ok(&[
        "enable",
        "maintenance",
        "--pgdata",
        "./node_a",
        "--allow-failover",
    ]);
    cluster.wait_states(
        &[("node_a", "maintenance"), ("node_b", "wait_primary")],
        STEP,
    );
    write_through(&cluster, 2).await;
    cluster.ok(&["disable", "maintenance", "--pgdata", "./node_a"]);
    cluster.wait_states(&[("node_a", "secondary"), ("node_b", "primary")], STEP);

    // A keeper killed with its Postgres alive: no failover; restarted, it resumes.
    let standby_postmaster = postmaster_pid(&cluster.node("node_a").pgdata).expect("running");
    cluster.power_off_keeper_only("node_a");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        cluster.states()["node_b"],
        ("primary".into(), "primary".into())
    );
    cluster.spawn("node_a", &["run", "--pgdata", "./node_a"]);
    cluster.wait_states(&[("node_a", "secondary"), ("node_b", "primary")], STEP);
    assert_eq!(
        postmaster_pid(&cluster.node("node_a").pgdata),
        Some(standby_postmaster),
        "the restarted keeper adopts the running Postgres"
    );

    // Postgres of the primary killed under a live keeper: restarted in place.
    let primary = cluster.node("node_b");
    let before = postmaster_pid(&primary.pgdata).expect("primary runs");
    support::kill_tree(before);
    cluster.eventually("the keeper to restart Postgres", STEP, || {
        postmaster_pid(&primary.pgdata).is_some_and(|pid| pid != before)
    });
    write_through(&cluster, 3).await;
    let states = cluster.states();
    assert_eq!(states["node_b"].1, "primary", "no failover: {states:?}");

    // Drop the standby: the primary serves alone; re-add it under the same name.
    cluster.ok(&["drop", "node", "--pgdata", "./node_a", "--destroy"]);
    cluster.wait_states(&[("node_b", "single")], STEP);
    assert!(!cluster.states().contains_key("node_a"));
    assert!(
        !cluster.path().join("node_a").exists(),
        "--destroy removes the data directory"
    );
    cluster.terminate("node_a");
    cluster.start_node("node_a");
    cluster.wait_states(&[("node_b", "primary"), ("node_a", "secondary")], STEP);

    let client = connect(&uri).await.expect("connect");
    let count: i64 = client
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 3);
    let settings = cluster.ok(&["show", "settings", "--pgdata", "./monitor"]);
    assert!(settings.contains("number_sync_standbys"), "{settings}");
    assert!(settings.contains("candidate priority"), "{settings}");
}

/// `hapg create monitor` starts Postgres before it creates the monitor's
/// role, database and schema, so a keeper, router or command started beside
/// it may find Postgres answering "role does not exist" (28000), then
/// "database does not exist" (3D000), then a database without the schema.
/// All mean "not yet": clients retry them within their connect budget, and
/// only if it lasts report the monitor's own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_wait_for_a_monitor_still_being_created() {
    let mut cluster = Cluster::new();
    cluster.start_monitor();
    let port = cluster.monitor_port;
    let admin_uri = format!("postgres://postgres@localhost:{port}/postgres?sslmode=require");
    let admin = connect(&admin_uri).await.expect("connect as postgres");
    let late_uri =
        format!("postgres://late_node@localhost:{port}/monitor_created_late?sslmode=require");

    let waiter = tokio::spawn({
        let uri = late_uri.clone();
        async move { MonitorClient::connect_with_retry(&uri, Duration::from_secs(60)).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !waiter.is_finished(),
        "gave up on a role that does not exist yet: {:?}",
        waiter.await.map(|r| r.err())
    );

    admin
        .batch_execute("CREATE ROLE late_node WITH LOGIN SUPERUSER")
        .await
        .expect("create the role");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !waiter.is_finished(),
        "gave up on a database that does not exist yet: {:?}",
        waiter.await.map(|r| r.err())
    );

    admin
        .batch_execute("CREATE DATABASE monitor_created_late")
        .await
        .expect("create the database");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !waiter.is_finished(),
        "gave up on a database without the monitor schema yet: {:?}",
        waiter.await.map(|r| r.err())
    );

    let mut late = connect(&format!(
        "postgres://postgres@localhost:{port}/monitor_created_late?sslmode=require"
    ))
    .await
    .expect("connect to the new database");
    hapg_monitor::schema::migrate(&mut late)
        .await
        .expect("install the monitor schema");
    let client = tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .expect("the waiting client connects once the schema is there")
        .expect("join")
        .expect("connect to the monitor created late");
    assert!(!client.is_closed());

    // A database that never becomes a monitor: after the budget, the error
    // says what it is, not merely that the monitor was unreachable.
    let error = MonitorClient::connect_with_retry(&admin_uri, Duration::from_secs(1))
        .await
        .err()
        .expect("the postgres database is not a monitor");
    assert!(matches!(error, MonitorError::NotAMonitor), "{error:?}");

    // A role that never comes: after the budget, the error names it.
    let nobody = format!("postgres://nobody_here@localhost:{port}/postgres?sslmode=require");
    let error = MonitorClient::connect_with_retry(&nobody, Duration::from_secs(1))
        .await
        .err()
        .expect("no such role");
    assert!(
        error.is_monitor_not_ready() && error.to_string().contains("nobody_here"),
        "{error}"
    );
}

/// Starts `hapg args` with its output captured, waits until the Postgres it
/// creates in `pgdata` has written its pid file and freezes that Postgres
/// (SIGSTOP), so that hapg is surely still setting it up; then sends hapg
/// SIGTERM, lets Postgres go on, and returns hapg's exit code, its stderr
/// and the postmaster's pid once hapg has ended.
fn interrupt_create(cluster: &Cluster, args: &[&str], pgdata: &str) -> (Option<i32>, String, i32) {
    let mut create = cluster
        .hapg(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start hapg create");
    let hapg = Pid::from_raw(create.id() as i32);
    let pgdata = cluster.path().join(pgdata);
    let deadline = Instant::now() + Duration::from_secs(60);
    let postmaster = loop {
        if let Some(pid) = postmaster_pid(&pgdata) {
            break Pid::from_raw(pid);
        }
        assert!(
            create.try_wait().expect("poll hapg").is_none(),
            "hapg ended before Postgres started"
        );
        assert!(Instant::now() < deadline, "Postgres did not start");
        std::thread::sleep(Duration::from_millis(2));
    };
    kill(postmaster, Signal::SIGSTOP).expect("stop the postmaster");
    kill(hapg, Signal::SIGTERM).expect("signal hapg");
    std::thread::sleep(Duration::from_millis(300));
    kill(postmaster, Signal::SIGCONT).expect("continue the postmaster");

    let deadline = Instant::now() + Duration::from_secs(60);
    while create.try_wait().expect("poll hapg").is_none() {
        if Instant::now() > deadline {
            let _ = create.kill();
            panic!("hapg did not end within 60 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = create.wait_with_output().expect("hapg output");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), stderr, postmaster.as_raw())
}

/// SIGTERM (or Ctrl-C) while `hapg create monitor` sets up its Postgres ends
/// that Postgres too: it runs in a session of its own, so the signal does not
/// reach it, and it would be left running on its port. The error says what to
/// do next.
#[test]
fn an_interrupted_create_leaves_no_postgres_behind() {
    let mut cluster = Cluster::new();
    let port = free_port().to_string();
    let (code, stderr, postmaster) = interrupt_create(
        &cluster,
        &[
            "create",
            "monitor",
            "--pgdata",
            "./interrupted",
            "--pgport",
            &port,
            "--hostname",
            "localhost",
            "--auth",
            "trust",
            "--ssl-self-signed",
        ],
        "interrupted",
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("interrupted by SIGTERM while creating the monitor")
            && stderr.contains("its Postgres is stopped")
            && stderr.contains("remove it and run the same command again"),
        "{stderr}"
    );
    // Dead, or a zombie its new parent has not reaped yet.
    assert!(
        !hapg_keeper::pidfile::process_alive(postmaster),
        "the monitor's Postgres (pid {postmaster}) still runs after the interrupted create"
    );

    // The same for a node that `hapg create postgres` (without --run) is
    // still initialising.
    cluster.start_monitor();
    let uri = cluster.monitor_uri();
    let port = free_port().to_string();
    let (_, stderr, postmaster) = interrupt_create(
        &cluster,
        &[
            "create",
            "postgres",
            "--pgdata",
            "./node_a",
            "--pgport",
            &port,
            "--hostname",
            "localhost",
            "--name",
            "node_a",
            "--auth",
            "trust",
            "--ssl-self-signed",
            "--monitor",
            &uri,
        ],
        "node_a",
    );
    assert!(
        !hapg_keeper::pidfile::process_alive(postmaster),
        "the node's Postgres (pid {postmaster}) still runs after the interrupted create: {stderr}"
    );
    assert!(
        stderr.contains("interrupted while initialising the node")
            && stderr.contains("Run `hapg run --pgdata ./node_a` to finish"),
        "{stderr}"
    );
    // And what it says works: `hapg run` finishes the node.
    cluster.spawn("node_a", &["run", "--pgdata", "./node_a"]);
    let pgdata = cluster.path().join("node_a");
    cluster.nodes.push(support::Node {
        name: "node_a".to_string(),
        pgdata,
        port: port.parse().expect("port"),
    });
    cluster.wait_states(&[("node_a", "single")], STEP);
}
