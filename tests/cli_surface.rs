//! The CLI's less travelled commands on a two-node group, with real
//! PostgreSQL 15: `--json` of `show events|uri|settings|standby-names`,
//! `show systemd` for a node, `set node replication-quorum`, `perform
//! failover`, `stop --fast` and `--immediate`, and `drop node` without
//! `--destroy`. Each is checked for what it does, not only for exit 0.

mod support;

use std::time::Duration;

use hapg_keeper::pidfile::process_alive;
use support::{postmaster_pid, Cluster};

const STEP: Duration = Duration::from_secs(90);

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The lines of a node's server log that say which shutdown it received.
fn shutdown_requests(cluster: &Cluster, name: &str) -> Vec<String> {
    let log = std::fs::read_to_string(cluster.node(name).pgdata.join("postgres.log"))
        .expect("read the server log");
    log.lines()
        .filter(|l| l.contains("shutdown request"))
        .map(str::to_string)
        .collect()
}

#[test]
fn json_outputs_settings_failover_stop_modes_and_drop() {
    let cluster = Cluster::formation(&["node_a", "node_b"], STEP);

    // --json of the show commands: parseable, with the fields scripts read.
    let events = json(&cluster.ok(&["show", "events", "--pgdata", "./monitor", "--json"]));
    let events = events.as_array().expect("events are a list");
    assert!(!events.is_empty(), "registration and promotions are events");
    assert!(
        events.iter().any(|e| e["description"]
            .as_str()
            .is_some_and(|d| d.contains("node_b"))),
        "{events:?}"
    );
    let uris = json(&cluster.ok(&["show", "uri", "--pgdata", "./monitor", "--json"]));
    let uris = uris.as_array().expect("uris are a list");
    let formation = uris
        .iter()
        .find(|u| u["type"] == "formation")
        .unwrap_or_else(|| panic!("a formation URI: {uris:?}"));
    let node_a_port = cluster.node("node_a").port.to_string();
    assert!(
        formation["uri"]
            .as_str()
            .is_some_and(|u| u.contains(&node_a_port) && u.contains("read-write")),
        "{formation}"
    );
    let settings = json(&cluster.ok(&["show", "settings", "--pgdata", "./monitor", "--json"]));
    let settings = settings.as_array().expect("settings are a list");
    assert!(
        settings.iter().any(|s| s["name"] == "node_b"
            && s["setting"] == "replication quorum"
            && s["value"] == "true"),
        "{settings:?}"
    );
    let names = json(&cluster.ok(&["show", "standby-names", "--pgdata", "./monitor", "--json"]));
    assert!(
        names["synchronous_standby_names"]
            .as_str()
            .is_some_and(|n| n.contains("pgautofailover_standby_")),
        "{names}"
    );

    // show systemd for a node runs that node.
    let unit = cluster.ok(&["show", "systemd", "--pgdata", "./node_a"]);
    let pgdata = cluster.node("node_a").pgdata;
    assert!(
        unit.contains(&format!("run --pgdata {}", pgdata.display())),
        "{unit}"
    );

    // set node replication-quorum: the monitor records it and the primary
    // stops waiting for that standby's acknowledgement.
    cluster.ok(&[
        "set",
        "node",
        "replication-quorum",
        "--pgdata",
        "./node_b",
        "false",
    ]);
    let settings = json(&cluster.ok(&["show", "settings", "--pgdata", "./monitor", "--json"]));
    assert!(
        settings
            .as_array()
            .expect("list")
            .iter()
            .any(|s| s["name"] == "node_b"
                && s["setting"] == "replication quorum"
                && s["value"] == "false"),
        "{settings}"
    );
    let names = cluster.ok(&["show", "standby-names", "--pgdata", "./monitor"]);
    assert_eq!(names.trim(), "''", "no standby in the quorum");
    cluster.ok(&[
        "set",
        "node",
        "replication-quorum",
        "--pgdata",
        "./node_b",
        "true",
    ]);
    cluster.wait_states(&[("node_a", "primary"), ("node_b", "secondary")], STEP);

    // The monitor validates settings: one standby cannot carry
    // number_sync_standbys 1, nor can it leave the quorum while 1 is asked.
    let err = cluster.fails(&[
        "set",
        "formation",
        "number-sync-standbys",
        "--pgdata",
        "./monitor",
        "1",
    ]);
    assert!(
        err.contains("number_sync_standbys 1 needs at least 2 quorum standbys"),
        "{err}"
    );
    let settings = cluster.ok(&["show", "settings", "--pgdata", "./monitor"]);
    assert!(
        settings
            .lines()
            .any(|l| l.contains("number_sync_standbys") && l.trim_end().ends_with('0')),
        "a refused setting is not written:\n{settings}"
    );

    // perform failover (pg_autoctl's name for a switchover).
    cluster.ok(&["perform", "failover", "--pgdata", "./monitor"]);
    cluster.wait_states(&[("node_a", "secondary"), ("node_b", "primary")], STEP);

    // stop --fast and --immediate: the keeper exits and its Postgres receives
    // that shutdown; run again, the node rejoins.
    for (flag, request) in [
        ("--fast", "received fast shutdown request"),
        ("--immediate", "received immediate shutdown request"),
    ] {
        let before = shutdown_requests(&cluster, "node_a").len();
        let keeper = cluster.keeper_pid("node_a").expect("node_a's keeper");
        cluster.ok(&["stop", "--pgdata", "./node_a", flag]);
        assert!(!process_alive(keeper), "{flag}: keeper gone");
        assert_eq!(postmaster_pid(&pgdata), None, "{flag}: Postgres stopped");
        let requests = shutdown_requests(&cluster, "node_a");
        assert_eq!(requests.len(), before + 1, "{flag}: {requests:?}");
        assert!(
            requests.last().is_some_and(|l| l.contains(request)),
            "{flag}: {requests:?}"
        );
        cluster.spawn("node_a", &["run", "--pgdata", "./node_a"]);
        cluster.wait_states(&[("node_a", "secondary"), ("node_b", "primary")], STEP);
    }

    // drop node without --destroy: gone from the formation, its keeper exits,
    // its data directory stays.
    let keeper = cluster.keeper_pid("node_a").expect("node_a's keeper");
    cluster.ok(&["drop", "node", "--pgdata", "./node_a"]);
    cluster.wait_states(&[("node_b", "single")], STEP);
    assert!(!cluster.states().contains_key("node_a"));
    cluster.eventually("the dropped node's keeper to exit", STEP, || {
        !process_alive(keeper)
    });
    assert!(
        pgdata.join("PG_VERSION").exists(),
        "the data directory stays"
    );
}
