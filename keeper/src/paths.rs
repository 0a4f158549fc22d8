//! Where hapg keeps a node's own files: configuration, state and pid file.
//!
//! They live beside the data directory, not in it, as pg_auto_failover's do:
//! pg_basebackup and pg_rewind rewrite the data directory from another node, and
//! would carry that node's identity and state into this one. The location
//! follows the XDG base directories, keyed by the absolute data directory path:
//! `$XDG_CONFIG_HOME/hapg/<pgdata>/hapg.toml` and
//! `$XDG_DATA_HOME/hapg/<pgdata>/{hapg.state,hapg.pid}`.

use std::path::{Path, PathBuf};

use crate::error::KeeperError;

/// The files of one hapg node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePaths {
    /// The Postgres data directory (absolute).
    pub pgdata: PathBuf,
    /// `hapg.toml`.
    pub config: PathBuf,
    /// `hapg.state`: the keeper's current state, rewritten after every transition.
    pub state: PathBuf,
    /// `hapg.pid`: the pid of `hapg run` while it runs.
    pub pid: PathBuf,
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"))
}

fn base(var: &str, fallback: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => home().join(fallback),
    }
}

/// Makes `path` absolute against the current directory, without touching the disk.
pub fn absolute(path: &Path) -> Result<PathBuf, KeeperError> {
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| KeeperError::io(".", e))?
            .join(path)
    };
    // Normalise `.` and `..` so that ./node_a and node_a name the same node.
    let mut out = PathBuf::new();
    for part in joined.components() {
        match part {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    Ok(out)
}

impl NodePaths {
    /// The paths for the node whose data directory is `pgdata`.
    pub fn for_pgdata(pgdata: &Path) -> Result<NodePaths, KeeperError> {
        let pgdata = absolute(pgdata)?;
        let relative = pgdata.strip_prefix("/").unwrap_or(&pgdata).to_path_buf();
        let config_dir = base("XDG_CONFIG_HOME", ".config")
            .join("hapg")
            .join(&relative);
        let data_dir = base("XDG_DATA_HOME", ".local/share")
            .join("hapg")
            .join(&relative);
        Ok(NodePaths {
            config: config_dir.join("hapg.toml"),
            state: data_dir.join("hapg.state"),
            pid: data_dir.join("hapg.pid"),
            pgdata,
        })
    }

    /// Creates the directories that hold the config and state files.
    pub fn create_dirs(&self) -> Result<(), KeeperError> {
        for file in [&self.config, &self.state] {
            if let Some(dir) = file.parent() {
                std::fs::create_dir_all(dir).map_err(|e| KeeperError::io(dir, e))?;
            }
        }
        Ok(())
    }

    /// Removes hapg's files for this node (after `drop node --destroy`).
    pub fn remove_all(&self) {
        for file in [&self.config, &self.state, &self.pid] {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// Writes `contents` to `path` atomically: a temporary file, fsync, rename.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), KeeperError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    // 0600: configuration files may hold passwords.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| KeeperError::io(&tmp, e))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| KeeperError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| KeeperError::io(path, e))?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_normalises() {
        assert_eq!(
            absolute(Path::new("/a/./b/../c")).expect("absolute"),
            PathBuf::from("/a/c")
        );
    }
}
