//! The processes this helper launched, kept on disk so a restarted helper
//! still knows them. A signal reaches a process only if it is in this table
//! with the same pid, start time and executable, and belongs to the caller.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use banger_host::vmm_process::stat;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launched {
    pub pid: u32,
    pub start_time: u64,
    pub exe: PathBuf,
    /// Who asked for it.
    pub uid: u32,
}

impl Launched {
    /// Whether this very process still runs.
    pub fn running(&self) -> bool {
        matches!(stat(self.pid), Some((start, zombie)) if start == self.start_time && !zombie)
    }

    /// Whether the running process is still the program we started.
    pub fn same_exe(&self) -> bool {
        std::fs::read_link(format!("/proc/{}/exe", self.pid)).is_ok_and(|e| e == self.exe)
    }
}

pub struct Table {
    path: PathBuf,
    entries: Mutex<Vec<Launched>>,
}

impl Table {
    pub fn load(path: &Path) -> Table {
        let entries = std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Table {
            path: path.to_path_buf(),
            entries: Mutex::new(entries),
        }
    }

    pub fn add(&self, entry: Launched) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(Launched::running);
        entries.push(entry);
        self.save(&entries);
    }

    pub fn find(&self, pid: u32, start_time: u64) -> Option<Launched> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .iter()
            .find(|e| e.pid == pid && e.start_time == start_time)
            .cloned()
    }

    fn save(&self, entries: &[Launched]) {
        let tmp = self.path.with_extension("tmp");
        let written = serde_json::to_vec(entries)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            tracing::warn!(error = %e, path = %self.path.display(), "cannot save the launched-process table");
        }
    }
}
