//! The keeper's state file: its current state (the last goal it reached), the
//! goal it last received, and the timestamps network-split fencing relies on.
//! Written atomically after every transition, so a keeper killed at any point
//! restarts from the last state it truly reached.

use std::path::Path;

use hapg_monitor::NodeState;
use serde::{Deserialize, Serialize};

use crate::error::KeeperError;
use crate::paths::write_atomic;

/// What the keeper persists between runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeeperState {
    /// Node id assigned by the monitor.
    pub node_id: i64,
    /// Group id assigned by the monitor.
    pub group_id: i32,
    /// The state this node is in: the last goal whose transition completed.
    pub current: NodeState,
    /// The goal last received from the monitor.
    pub assigned: NodeState,
    /// Unix time (s) of the last successful report; 0 if never.
    pub last_monitor_contact: u64,
    /// Unix time (s) a standby was last seen streaming from this primary; 0 if never.
    pub last_standby_contact: u64,
}

impl KeeperState {
    /// A freshly registered node.
    pub fn new(node_id: i64, group_id: i32) -> KeeperState {
        KeeperState {
            node_id,
            group_id,
            current: NodeState::Init,
            assigned: NodeState::Init,
            last_monitor_contact: 0,
            last_standby_contact: 0,
        }
    }

    /// Reads the state file.
    pub fn load(path: &Path) -> Result<KeeperState, KeeperError> {
        let text = std::fs::read_to_string(path).map_err(|e| KeeperError::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| KeeperError::StateFile {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Writes the state file atomically.
    pub fn save(&self, path: &Path) -> Result<(), KeeperError> {
        let text = serde_json::to_string_pretty(self).map_err(|e| KeeperError::StateFile {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        write_atomic(path, text.as_bytes())
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hapg.state");
        let mut state = KeeperState::new(3, 0);
        state.current = NodeState::Secondary;
        state.save(&path).expect("save");
        assert_eq!(KeeperState::load(&path).expect("load"), state);
    }
}
