//! `--log-format json` (docs/operations.md): every line a real monitor's and
//! keeper's `hapg create ... --run` writes to stderr is a JSON object with
//! time, level, component and message, and the keeper's name its formation
//! and node.

mod http_support;
mod support;

use std::time::Duration;

use http_support::HttpFormation;

const STEP: Duration = Duration::from_secs(90);

/// The log's lines as JSON objects; panics naming a line that is not one.
/// `skip` are lines the command prints on stdout (its result, not its log).
fn json_lines(log: &str, skip: &[&str]) -> Vec<serde_json::Value> {
    log.lines()
        .filter(|l| !l.trim().is_empty() && !skip.contains(&l.trim()))
        .map(|l| {
            let value: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}\n{log}"));
            assert!(value.is_object(), "{l}");
            for field in ["time", "level", "component", "message", "target"] {
                assert!(
                    value.get(field).is_some_and(|v| !v.is_null()),
                    "no {field}: {l}"
                );
            }
            let time = value["time"].as_str().unwrap_or_default();
            assert!(
                time.ends_with('Z') && time.contains('T'),
                "time {time:?}: {l}"
            );
            assert!(
                ["error", "warn", "info", "debug", "trace"]
                    .contains(&value["level"].as_str().unwrap_or_default()),
                "{l}"
            );
            value
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_is_json_with_the_fields() {
    let f = HttpFormation::start(&["node_a"], &["--log-format", "json"], STEP);
    let c = &f.cluster;
    f.wait_status("node_a", "/primary", 200, STEP);
    // Something from a transition and something from the monitor service.
    c.eventually("the logs to show the node's start", STEP, || {
        c.log("node_a").contains("reached single")
    });

    let uri = c.monitor_uri();
    let monitor = json_lines(&c.log("monitor"), &[uri.as_str()]);
    assert!(
        monitor
            .iter()
            .any(|l| l["component"] == "monitor" && l["message"] == "monitor service running"),
        "{monitor:#?}"
    );
    let node = json_lines(&c.log("node_a"), &[]);
    assert!(node.len() > 3, "{node:#?}");
    let reached = node
        .iter()
        .find(|l| l["message"] == "reached single")
        .unwrap_or_else(|| panic!("no 'reached single' line: {node:#?}"));
    assert_eq!(reached["component"], "keeper", "{reached}");
    assert_eq!(reached["formation"], "default", "{reached}");
    assert_eq!(reached["node"], "node_a", "{reached}");
    assert_eq!(reached["level"], "info", "{reached}");
    // Span fields of the transition come along at the top level.
    assert_eq!(reached["to"], "single", "{reached}");
    // Every keeper line of `hapg run` names its node.
    for line in node.iter().filter(|l| l["component"] == "keeper") {
        assert_eq!(line["node"], "node_a", "{line}");
    }
}
