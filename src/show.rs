//! Text and JSON layouts of the `show` commands, as pg_autoctl prints them.

use hapg_monitor::client::{EventRow, NodeRow};
use hapg_monitor::Health;
use serde_json::json;

/// Right-aligned columns separated by ` | `, with a `-+-` dash line under the header.
pub fn table(headers: &[&str], rows: &[Vec<String>], min_widths: &[usize]) -> String {
    let mut widths: Vec<usize> = headers
        .iter()
        .enumerate()
        .map(|(i, h)| h.len().max(min_widths.get(i).copied().unwrap_or(0)))
        .collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| -> String {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:>w$}"))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    out.push('\n');
    out.push_str(
        &widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("-+-"),
    );
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.clone()));
        out.push('\n');
    }
    out
}

/// `read-write`, `read-only` or `none`, with ` !` when unhealthy and ` ?` when unknown.
pub fn connection(node: &NodeRow) -> String {
    let kind = node.reported.connection_type();
    match node.health {
        Health::Good => kind.to_string(),
        Health::Bad => format!("{kind} !"),
        Health::Unknown => format!("{kind} ?"),
    }
}

/// Why `node` cannot be trusted as the standby it is assigned to be (see
/// `hapg_monitor::fsm::divergence`), against the primary of its group in `nodes`.
pub fn divergence(nodes: &[NodeRow], node: &NodeRow) -> Option<String> {
    let primary = nodes
        .iter()
        .find(|p| {
            p.node_id != node.node_id
                && p.formation == node.formation
                && p.group_id == node.group_id
                && p.goal.can_take_writes()
        })
        .map(NodeRow::view);
    hapg_monitor::fsm::divergence(&node.view(), primary.as_ref())
}

/// [`connection`], or `diverged !` for a node that [`divergence`] names.
pub fn connection_in(nodes: &[NodeRow], node: &NodeRow) -> String {
    if divergence(nodes, node).is_some() {
        "diverged !".to_string()
    } else {
        connection(node)
    }
}

fn tli_lsn(node: &NodeRow) -> String {
    format!(
        "{:>3}: {}",
        node.tli,
        hapg_monitor::pgconn::format_lsn(node.lsn)
    )
}

/// The `show state` table.
pub fn state_table(nodes: &[NodeRow]) -> String {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                n.node_id.to_string(),
                n.address(),
                tli_lsn(n),
                connection_in(nodes, n),
                n.reported.to_string(),
                n.goal.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "Name",
            "Node",
            "Host:Port",
            "TLI: LSN",
            "Connection",
            "Reported State",
            "Assigned State",
        ],
        &rows,
        &[4, 5, 10, 9, 12, 19, 19],
    )
}

/// The `show state --json` array.
pub fn state_json(nodes: &[NodeRow]) -> serde_json::Value {
    serde_json::Value::Array(
        nodes
            .iter()
            .map(|n| {
                json!({
                    "name": n.name,
                    "node_id": n.node_id,
                    "group_id": n.group_id,
                    "formation": n.formation,
                    "host": n.host,
                    "port": n.port,
                    "tli": n.tli,
                    "lsn": hapg_monitor::pgconn::format_lsn(n.lsn),
                    "health": n.health.as_str(),
                    "diverged": divergence(nodes, n),
                    "connection": n.reported.connection_type(),
                    "reported_state": n.reported.as_str(),
                    "assigned_state": n.goal.as_str(),
                    "candidate_priority": n.candidate_priority,
                    "replication_quorum": n.replication_quorum,
                })
            })
            .collect(),
    )
}

/// Like [`table`], with the last column left-aligned and unpadded (long text:
/// comments, connection strings), as pg_autoctl prints them.
pub fn table_last_left(headers: &[&str], rows: &[Vec<String>], min_widths: &[usize]) -> String {
    let Some((last_header, first_headers)) = headers.split_last() else {
        return String::new();
    };
    let firsts: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r[..first_headers.len()].to_vec())
        .collect();
    let head = table(first_headers, &firsts, min_widths);
    let mut out = String::new();
    for (i, line) in head.lines().enumerate() {
        out.push_str(line);
        match i {
            0 => out.push_str(&format!(" | {last_header}")),
            1 => out.push_str(&format!("-+-{}", "-".repeat(last_header.len().max(10)))),
            _ => out.push_str(&format!(" | {}", rows[i - 2][first_headers.len()])),
        }
        out.push('\n');
    }
    out
}

/// The `show events` table.
pub fn events_table(events: &[EventRow]) -> String {
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            vec![
                e.event_time.clone(),
                match (e.group_id, e.node_id) {
                    (Some(g), Some(n)) => format!("{g}/{n}"),
                    (Some(g), None) => format!("{g}/-"),
                    _ => String::new(),
                },
                e.reported_state.clone().unwrap_or_default(),
                e.goal_state.clone().unwrap_or_default(),
                e.description.clone(),
            ]
        })
        .collect();
    table_last_left(
        &[
            "Event Time",
            "Node",
            "Current State",
            "Assigned State",
            "Comment",
        ],
        &rows,
        &[30, 6, 19, 19],
    )
}

/// `show events --json`.
pub fn events_json(events: &[EventRow]) -> serde_json::Value {
    serde_json::to_value(events).unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hapg_monitor::NodeState;

    fn node(name: &str, id: i64, port: u16, state: NodeState) -> NodeRow {
        NodeRow {
            node_id: id,
            formation: "default".into(),
            group_id: 0,
            name: name.into(),
            host: "localhost".into(),
            port,
            goal: state,
            reported: state,
            pg_running: true,
            rep_state: String::new(),
            tli: 1,
            lsn: 0x3000148,
            upstream_streaming: false,
            in_recovery: Some(state != NodeState::Primary),
            upstream_silence: None,
            report_age: None,
            health: Health::Good,
            candidate_priority: 50,
            replication_quorum: true,
        }
    }

    #[test]
    fn state_table_matches_the_tutorial() {
        let text = state_table(&[
            node("node_a", 1, 5501, NodeState::Primary),
            node("node_b", 2, 5502, NodeState::Secondary),
        ]);
        let expected = "  Name |  Node |      Host:Port |       TLI: LSN |   Connection |      Reported State |      Assigned State\n\
-------+-------+----------------+----------------+--------------+---------------------+--------------------\n\
node_a |     1 | localhost:5501 |   1: 0/3000148 |   read-write |             primary |             primary\n\
node_b |     2 | localhost:5502 |   1: 0/3000148 |    read-only |           secondary |           secondary\n";
        assert_eq!(text, expected);
    }

    #[test]
    fn unhealthy_nodes_are_marked() {
        let mut n = node("node_a", 1, 5501, NodeState::Primary);
        n.health = Health::Bad;
        assert_eq!(connection(&n), "read-write !");
        n.health = Health::Unknown;
        assert_eq!(connection(&n), "read-write ?");
    }

    #[test]
    fn diverged_nodes_are_marked() {
        let primary = node("node_a", 1, 5501, NodeState::Primary);
        let mut standby = node("node_b", 2, 5502, NodeState::Secondary);
        let nodes = [primary.clone(), standby.clone()];
        assert_eq!(connection_in(&nodes, &standby), "read-only");
        standby.in_recovery = Some(false);
        standby.tli = 2;
        let nodes = [primary, standby.clone()];
        assert_eq!(connection_in(&nodes, &standby), "diverged !");
        let json = state_json(&nodes);
        assert!(json[1]["diverged"]
            .as_str()
            .is_some_and(|why| why.contains("not in recovery")));
        assert!(json[0]["diverged"].is_null());
    }
}
