//! SCRAM-SHA-256 everywhere: the monitor's role and the replication role have
//! passwords (given in files), pg_hba says scram-sha-256, and a formation
//! still joins, replicates and switches over; a client without the password is
//! refused.

mod support;

use std::time::Duration;

use support::{connect, free_port, Cluster};

const STEP: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_monitor_and_replication_passwords() {
    let mut cluster = Cluster::new();
    let dir = cluster.path().to_path_buf();
    std::fs::write(dir.join("monitor.pass"), "m0nitor secret/:@\n").expect("write password");
    std::fs::write(dir.join("replication.pass"), "repl-s3cret\n").expect("write password");

    cluster.monitor_port = free_port();
    let mport = cluster.monitor_port.to_string();
    cluster.spawn(
        "monitor",
        &[
            "create",
            "monitor",
            "--pgdata",
            "./monitor",
            "--pgport",
            &mport,
            "--hostname",
            "localhost",
            "--auth",
            "scram-sha-256",
            "--ssl-self-signed",
            "--monitor-password-file",
            "monitor.pass",
            "--run",
        ],
    );
    cluster.eventually("the monitor to answer", STEP, || {
        cluster
            .run(&["show", "state", "--pgdata", "./monitor"])
            .status
            .success()
    });
    let uri = cluster.monitor_uri();
    assert!(
        uri.contains("autoctl_node:m0nitor%20secret%2F%3A%40@"),
        "{uri}"
    );

    // Without the password the monitor refuses a client.
    let bare =
        format!("postgres://autoctl_node@localhost:{mport}/pg_auto_failover?sslmode=require");
    let err = cluster.fails(&["show", "state", "--monitor", &bare]);
    assert!(err.contains("password"), "{err}");
    // With it, it answers; and the table never prints the password.
    cluster.ok(&["show", "state", "--monitor", &uri]);
    let table = cluster.ok(&["show", "uri", "--pgdata", "./monitor"]);
    assert!(
        !table.contains("m0nitor") && table.contains("****"),
        "{table}"
    );

    for name in ["node_a", "node_b"] {
        let port = free_port();
        let pgdata = format!("./{name}");
        let port_s = port.to_string();
        cluster.spawn(
            name,
            &[
                "create",
                "postgres",
                "--pgdata",
                &pgdata,
                "--pgport",
                &port_s,
                "--hostname",
                "localhost",
                "--name",
                name,
                "--dbname",
                "appdb",
                "--auth",
                "scram-sha-256",
                "--ssl-self-signed",
                "--monitor",
                &uri,
                "--replication-password-file",
                "replication.pass",
                "--run",
            ],
        );
        cluster.nodes.push(support::Node {
            name: name.to_string(),
            pgdata: dir.join(name),
            port,
        });
        if name == "node_a" {
            cluster.wait_states(&[("node_a", "single")], STEP);
        }
    }
    cluster.wait_states(&[("node_a", "primary"), ("node_b", "secondary")], STEP);
    let hba = std::fs::read_to_string(dir.join("node_a/pg_hba.conf")).expect("pg_hba.conf");
    assert!(
        hba.contains("replication  pgautofailover_replicator") && hba.contains("scram-sha-256"),
        "{hba}"
    );

    // Switchover: pg_rewind and streaming authenticate with the replication password.
    cluster.ok(&["perform", "switchover", "--pgdata", "./monitor"]);
    cluster.wait_states(&[("node_a", "secondary"), ("node_b", "primary")], STEP);

    // The application user has no password: over TCP it is refused.
    let node_b = cluster.node("node_b");
    let app = format!("postgres://postgres@localhost:{}/appdb", node_b.port);
    let err = connect(&app).await.expect_err("no password, no entry");
    assert!(format!("{err:?}").contains("password"), "{err:?}");

    // The keeper logs never print the monitor password.
    assert!(!cluster.all_logs().contains("m0nitor secret"));
}
