//! Bad input a user will try (tutorial.md, "Bad input"): each gets a clear
//! error that names the problem, and touches nothing.

mod support;

use std::time::{Duration, Instant};

use support::{free_port, Cluster};

const STEP: Duration = Duration::from_secs(90);

fn create_args<'a>(
    pgdata: &'a str,
    port: &'a str,
    name: &'a str,
    monitor: &'a str,
) -> Vec<&'a str> {
    vec![
        "create",
        "postgres",
        "--pgdata",
        pgdata,
        "--pgport",
        port,
        "--hostname",
        "localhost",
        "--name",
        name,
        "--dbname",
        "appdb",
        "--auth",
        "trust",
        "--no-ssl",
        "--monitor",
        monitor,
    ]
}

#[test]
fn monitor_that_does_not_answer_is_named_after_bounded_retries() {
    let cluster = Cluster::new();
    let dead_port = free_port();
    let uri = format!("postgres://autoctl_node@127.0.0.1:{dead_port}/pg_auto_failover");
    let port = free_port().to_string();
    let mut args = create_args("./node_x", &port, "node_x", &uri);
    args.extend(["--monitor-timeout", "2"]);
    let started = Instant::now();
    let err = cluster.fails(&args);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    assert!(err.contains(&format!("127.0.0.1:{dead_port}")), "{err}");
    assert!(err.contains("does not answer"), "{err}");
    assert!(
        !cluster.path().join("node_x").exists(),
        "nothing may be created"
    );

    let err = cluster.fails(&["show", "state", "--monitor", &uri]);
    assert!(err.contains(&format!("127.0.0.1:{dead_port}")), "{err}");
}

#[test]
fn wrong_commands_and_flags_are_refused_clearly() {
    let cluster = Cluster::new();
    let err = cluster.fails(&["run", "--pgdata", "./never_created"]);
    assert!(
        err.contains("not a hapg node") && err.contains("hapg create"),
        "{err}"
    );

    let port = free_port().to_string();
    let err = cluster.fails(&[
        "create",
        "monitor",
        "--pgdata",
        "./m",
        "--pgport",
        &port,
        "--hostname",
        "localhost",
        "--no-ssl",
    ]);
    assert!(err.contains("--auth"), "{err}");
    let err = cluster.fails(&[
        "create",
        "monitor",
        "--pgdata",
        "./m",
        "--pgport",
        &port,
        "--hostname",
        "localhost",
        "--auth",
        "trust",
    ]);
    assert!(
        err.contains("--ssl-self-signed") && err.contains("--no-ssl"),
        "{err}"
    );
    let err = cluster.fails(&[
        "create",
        "monitor",
        "--pgdata",
        "./m",
        "--pgport",
        &port,
        "--hostname",
        "localhost",
        "--auth",
        "bogus",
        "--no-ssl",
    ]);
    assert!(err.contains("bogus"), "{err}");
    assert!(!cluster.path().join("m").exists(), "nothing may be created");

    // Postgres refusing to start: the error quotes the server log and names
    // where it is kept, and no half-initialised data directory stays behind.
    let err = cluster.fails(&[
        "create",
        "monitor",
        "--pgdata",
        "./m",
        "--pgport",
        &port,
        "--hostname",
        "localhost",
        "--auth",
        "trust",
        "--no-ssl",
        "--listen",
        "999.999.999.999",
    ]);
    assert!(
        err.contains("could not create any TCP/IP sockets") && err.contains("m.postgres.log"),
        "{err}"
    );
    assert!(
        !cluster.path().join("m").exists(),
        "initdb's files are removed"
    );
    assert!(
        cluster.path().join("m.postgres.log").exists(),
        "the log is kept"
    );

    // A hostname that does not resolve is refused before anything is made or
    // registered (the monitor here is not even asked: it does not exist).
    let dead = format!(
        "postgres://autoctl_node@127.0.0.1:{}/pg_auto_failover",
        free_port()
    );
    let mut args = create_args("./node_x", &port, "node_x", &dead);
    let at = args
        .iter()
        .position(|a| *a == "--hostname")
        .expect("--hostname")
        + 1;
    args[at] = "nonexistent.invalid";
    let err = cluster.fails(&args);
    assert!(
        err.contains("--hostname") && err.contains("nonexistent.invalid"),
        "{err}"
    );
    assert!(!err.contains("does not answer"), "checked first: {err}");
    assert!(
        !cluster.path().join("node_x").exists(),
        "nothing may be created"
    );

    // A router whose monitor is not a connection string does not start.
    let listen = format!("127.0.0.1:{}", free_port());
    std::fs::write(
        cluster.path().join("router.toml"),
        format!(
            "[router]\nlisten = \"{listen}\"\nmonitor = \"garbage\"\n\n[auth]\ntype = \"trust\"\n"
        ),
    )
    .expect("write router.toml");
    let err = cluster.fails(&["router", "run", "--config", "router.toml"]);
    assert!(err.contains("router.monitor"), "{err}");
    assert_eq!(err.matches("router.monitor").count(), 1, "said once: {err}");
}

#[test]
fn conflicts_with_a_running_formation_touch_nothing() {
    let mut cluster = Cluster::new();
    cluster.start_monitor();
    let uri = cluster.monitor_uri();
    cluster.start_node("node_a");
    cluster.wait_states(&[("node_a", "single")], STEP);
    let node_a = cluster.node("node_a");
    let conf = node_a.pgdata.join("postgresql.conf");
    let before = std::fs::read(&conf).expect("read postgresql.conf");

    // A data directory a running Postgres uses.
    let port = free_port().to_string();
    let err = cluster.fails(&create_args("./node_a", &port, "other", &uri));
    assert!(
        err.contains("in use") || err.contains("already a hapg node"),
        "{err}"
    );

    // A port in use.
    let busy = node_a.port.to_string();
    let err = cluster.fails(&create_args("./node_c", &busy, "node_c", &uri));
    assert!(
        err.contains(&format!("port {busy}")) && err.contains("in use"),
        "{err}"
    );
    assert!(!cluster.path().join("node_c").exists());

    // A duplicate name in the formation.
    let port = free_port().to_string();
    let err = cluster.fails(&create_args("./node_d", &port, "node_a", &uri));
    assert!(
        err.contains("node_a") && err.contains("already exists"),
        "{err}"
    );
    assert!(!cluster.path().join("node_d").exists());

    // A switchover without a secondary.
    let err = cluster.fails(&[
        "perform",
        "switchover",
        "--pgdata",
        "./monitor",
        "--wait",
        "10",
    ]);
    assert!(err.contains("no healthy secondary"), "{err}");

    // Maintenance of the primary needs --allow-failover.
    let err = cluster.fails(&["enable", "maintenance", "--pgdata", "./node_a"]);
    assert!(err.contains("--allow-failover"), "{err}");

    // A bad configuration value names its key and leaves the file as it was.
    let config_before = cluster.ok(&["config", "get", "--pgdata", "./node_a"]);
    let err = cluster.fails(&[
        "config",
        "set",
        "--pgdata",
        "./node_a",
        "postgresql.auth_method",
        "bogus",
    ]);
    assert!(err.contains("postgresql.auth_method"), "{err}");
    let err = cluster.fails(&[
        "config",
        "set",
        "--pgdata",
        "./node_a",
        "postgresql.port",
        "x",
    ]);
    assert!(err.contains("postgresql.port"), "{err}");
    // Keys that identify the node are read-only; the monitor URI is checked.
    for (key, value) in [
        ("node.node_id", "99"),
        ("node.name", "node_b"),
        ("postgresql.pgdata", "/etc"),
        ("node.monitor", "garbage"),
        ("postgresql.bindir", "/etc"),
    ] {
        let err = cluster.fails(&["config", "set", "--pgdata", "./node_a", key, value]);
        assert!(err.contains(key), "{key}: {err}");
    }
    assert_eq!(
        cluster.ok(&["config", "get", "--pgdata", "./node_a"]),
        config_before
    );
    // A good value is written and read back.
    assert_eq!(
        cluster
            .ok(&[
                "config",
                "set",
                "--pgdata",
                "./node_a",
                "timeout.report_interval_ms",
                "600"
            ])
            .trim(),
        "600"
    );
    assert_eq!(
        cluster
            .ok(&[
                "config",
                "get",
                "--pgdata",
                "./node_a",
                "timeout.report_interval_ms"
            ])
            .trim(),
        "600"
    );
    cluster.ok(&[
        "config",
        "set",
        "--pgdata",
        "./node_a",
        "timeout.report_interval_ms",
        "500",
    ]);

    // A router whose formation the monitor does not have does not start.
    let listen = format!("127.0.0.1:{}", free_port());
    std::fs::write(
        cluster.path().join("router.toml"),
        format!("[router]\nlisten = \"{listen}\"\nmonitor = \"{uri}\"\nformation = \"nope\"\n\n[auth]\ntype = \"trust\"\n"),
    )
    .expect("write router.toml");
    let err = cluster.fails(&["router", "run", "--config", "router.toml"]);
    assert!(
        err.contains("router.formation") && err.contains("nope"),
        "{err}"
    );

    // The running node saw none of it.
    assert_eq!(std::fs::read(&conf).expect("read postgresql.conf"), before);
    assert_eq!(
        cluster.states()["node_a"],
        ("single".into(), "single".into())
    );
    assert_eq!(cluster.states().len(), 1, "no node was registered");
}

/// A `create postgres` whose initialisation keeps failing (here pg_basebackup,
/// refused for a wrong replication password) gives up with the cause, and
/// undoes itself: the monitor drops the node, its primary goes back to
/// `single`, its files are gone, and the same command with the right password
/// then succeeds.
#[test]
fn a_create_that_cannot_initialise_is_undone() {
    let mut cluster = Cluster::new();
    cluster.start_monitor();
    let uri = cluster.monitor_uri();
    std::fs::write(cluster.path().join("replication.pass"), "right-s3cret\n")
        .expect("write password");
    let scram = |name: &'static str, port: &str, password: &[&'static str]| {
        let mut args = create_args(name, port, &name[2..], &uri)
            .into_iter()
            .map(str::to_string)
            .collect::<Vec<_>>();
        let auth = args.iter().position(|a| a == "trust").expect("--auth");
        args[auth] = "scram-sha-256".to_string();
        args.extend(password.iter().map(|a| a.to_string()));
        args
    };
    let port_a = free_port().to_string();
    let args_a = scram(
        "./node_a",
        &port_a,
        &["--replication-password-file", "replication.pass", "--run"],
    );
    cluster.spawn(
        "node_a",
        &args_a.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let pgdata = cluster.path().join("node_a");
    cluster.nodes.push(support::Node {
        name: "node_a".to_string(),
        pgdata,
        port: port_a.parse().expect("port"),
    });
    cluster.wait_states(&[("node_a", "single")], STEP);

    let port_b = free_port().to_string();
    let wrong = scram("./node_b", &port_b, &["--replication-password", "wrong"]);
    let started = Instant::now();
    let err = cluster.fails(&wrong.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("could not initialise the node"), "{err}");
    assert!(err.contains("pg_basebackup"), "{err}");
    assert!(err.contains("password authentication failed"), "{err}");
    assert!(err.contains("run the same command again"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(80),
        "gave up after {:?}",
        started.elapsed()
    );
    // Nothing left: no registration, no data directory, no configuration.
    let states = cluster.states();
    assert!(!states.contains_key("node_b"), "{states:?}");
    assert!(!cluster.path().join("node_b").exists());
    assert!(!cluster.path().join("node_b.hapg-basebackup").exists());
    let err = cluster.fails(&["config", "get", "--pgdata", "./node_b"]);
    assert!(err.contains("not a hapg node"), "{err}");
    cluster.wait_states(&[("node_a", "single")], STEP);

    // The same command with the right password now succeeds.
    let right = scram(
        "./node_b",
        &port_b,
        &["--replication-password-file", "replication.pass"],
    );
    cluster.ok(&right.iter().map(String::as_str).collect::<Vec<_>>());
    cluster.spawn("node_b", &["run", "--pgdata", "./node_b"]);
    let pgdata = cluster.path().join("node_b");
    cluster.nodes.push(support::Node {
        name: "node_b".to_string(),
        pgdata,
        port: port_b.parse().expect("port"),
    });
    cluster.wait_states(&[("node_a", "primary"), ("node_b", "secondary")], STEP);
}
