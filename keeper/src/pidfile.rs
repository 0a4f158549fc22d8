//! The pid file of `hapg run`: one running hapg per data directory, and how
//! `hapg stop` finds it.

use std::path::{Path, PathBuf};

use crate::error::KeeperError;

/// Holds the pid file for as long as `hapg run` lives; removes it on drop.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
}

impl PidFile {
    /// Writes our pid, refusing when another live hapg already holds the file.
    pub fn acquire(path: &Path) -> Result<PidFile, KeeperError> {
        if let Some(pid) = running_pid(path) {
            if pid != std::process::id() as i32 {
                return Err(KeeperError::Refused(format!(
                    "hapg is already running for this data directory (pid {pid}, {})",
                    path.display()
                )));
            }
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| KeeperError::io(dir, e))?;
        }
        crate::paths::write_atomic(path, format!("{}\n", std::process::id()).as_bytes())?;
        Ok(PidFile {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if running_pid(&self.path) == Some(std::process::id() as i32) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The pid in the file, if that process is alive.
pub fn running_pid(path: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(path).ok()?;
    let pid: i32 = text.trim().parse().ok()?;
    process_alive(pid).then_some(pid)
}

/// The process exists and is not a zombie waiting for its parent to reap it.
pub fn process_alive(pid: i32) -> bool {
    if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
        return false;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    state != Some("Z")
}
