//! Long-lived VMM processes: started in their own session so they outlive the
//! daemon, and identified by pid plus start time so a recycled pid is never
//! mistaken for (or signalled as) ours.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::process::HostError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSpec {
    pub program: String,
    pub args: Vec<String>,
    /// Where the process's stdout and stderr go (appended).
    pub log: PathBuf,
    pub cwd: Option<PathBuf>,
    /// Run as this uid and gid, with no supplementary groups (the root
    /// helper launches as its caller); `None` runs as ourselves.
    pub user: Option<(u32, u32)>,
}

/// A process we started: pid and its start time in clock ticks since boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessId {
    pub pid: u32,
    pub start_time: u64,
}

pub trait ProcessLauncher: Send + Sync {
    /// Starts a detached process (own session, stdin from /dev/null).
    fn launch(&self, spec: &LaunchSpec) -> Result<ProcessId, HostError>;
    /// Whether that very process is still alive (not a zombie, same start time).
    fn alive(&self, id: ProcessId) -> bool;
    /// Sends a signal to that very process; a process that is gone is not an error.
    fn signal(&self, id: ProcessId, signal: i32) -> Result<(), HostError>;
    /// Live processes whose command line contains `needle`: how a VMM that
    /// a killed daemon launched but never recorded is found again.
    fn find_naming(&self, needle: &str) -> Vec<ProcessId>;
}

/// Every live process whose command line contains `needle`, from /proc
/// (readable by anyone, so the same for every launcher).
pub fn processes_naming(needle: &str) -> Vec<ProcessId> {
    let needle = needle.as_bytes();
    processes_where(|pid| {
        let mut cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        // Arguments are NUL-separated; read as one line, as ps shows it.
        for b in cmdline.iter_mut().filter(|b| **b == 0) {
            *b = b' ';
        }
        cmdline.windows(needle.len()).any(|w| w == needle)
    })
}

/// Every live process but this one for which `wanted(pid)` holds, from /proc.
pub fn processes_where(wanted: impl Fn(u32) -> bool) -> Vec<ProcessId> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != std::process::id())
        .filter(|&pid| wanted(pid))
        .filter_map(|pid| match stat(pid)? {
            (_, true) => None,
            (start_time, false) => Some(ProcessId { pid, start_time }),
        })
        .collect()
}

/// Whether that very process lives: not a zombie, and the same start time
/// (a recycled pid is someone else).
pub fn is_alive(id: ProcessId) -> bool {
    id.pid != 0
        && matches!(stat(id.pid), Some((start, zombie)) if start == id.start_time && !zombie)
}

/// Start time (field 22 of /proc/PID/stat) and whether it is a zombie.
pub fn stat(pid: u32) -> Option<(u64, bool)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: parse after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = *fields.first()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((start, state == "Z" || state == "X"))
}

/// A spawned child as a long-lived process: reaped by a thread of its own,
/// so it never lingers as a zombie of its parent (after the parent's
/// restart, init reaps it), and known by pid and start time.
pub fn detach(child: std::process::Child) -> ProcessId {
    let pid = child.id();
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    let start_time = stat(pid).map(|(t, _)| t).unwrap_or(0);
    ProcessId { pid, start_time }
}

#[derive(Debug, Default, Clone)]
pub struct RealLauncher;

impl ProcessLauncher for RealLauncher {
    fn launch(&self, spec: &LaunchSpec) -> Result<ProcessId, HostError> {
        use std::os::unix::fs::OpenOptionsExt;
        use std::os::unix::process::CommandExt;
        // Never through a symlink: the log lives in a directory its user controls.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&spec.log)
            .map_err(|source| HostError::Spawn {
                program: spec.program.clone(),
                source,
            })?;
        let err_log = log.try_clone().map_err(|source| HostError::Spawn {
            program: spec.program.clone(),
            source,
        })?;
        let mut cmd = std::process::Command::new(&spec.program);
        cmd.args(&spec.args)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(err_log);
        if let Some(cwd) = &spec.cwd {
            cmd.current_dir(cwd);
        }
        if let Some((uid, gid)) = spec.user {
            // std drops supplementary groups when it changes the uid.
            cmd.uid(uid).gid(gid);
        }
        // Its own process group keeps a terminal's Ctrl-C (sent to the
        // foreground group of a `banger daemon` run by hand) away from the
        // VMs. Unlike setsid in a pre_exec hook it lets std spawn with
        // posix_spawn (vfork) instead of forking the whole daemon.
        cmd.process_group(0);
        let child = cmd
            .spawn()
            .map_err(|e| HostError::spawn(&spec.program, e))?;
        Ok(detach(child))
    }

    fn alive(&self, id: ProcessId) -> bool {
        is_alive(id)
    }

    fn signal(&self, id: ProcessId, signal: i32) -> Result<(), HostError> {
        if !self.alive(id) {
            return Ok(());
        }
        // SAFETY: kill(2) on a pid we verified is the process we started.
        unsafe { libc::kill(id.pid as i32, signal) };
        Ok(())
    }

    fn find_naming(&self, needle: &str) -> Vec<ProcessId> {
        processes_naming(needle)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LauncherCall {
    Launch(LaunchSpec),
    Signal(ProcessId, i32),
}

/// Records launches and signals; processes "live" until signalled with SIGKILL
/// or SIGTERM, or until [`FakeLauncher::exit`].
#[derive(Clone, Default)]
pub struct FakeLauncher {
    calls: Arc<Mutex<Vec<LauncherCall>>>,
    alive: Arc<Mutex<Vec<ProcessId>>>,
    fail_launch: Arc<Mutex<bool>>,
    /// The command line each process was launched with.
    argv: Arc<Mutex<Vec<(ProcessId, String)>>>,
}

impl FakeLauncher {
    pub fn calls(&self) -> Vec<LauncherCall> {
        self.calls.lock().unwrap().clone()
    }
    pub fn running(&self) -> Vec<ProcessId> {
        self.alive.lock().unwrap().clone()
    }
    pub fn exit(&self, id: ProcessId) {
        self.alive.lock().unwrap().retain(|p| *p != id);
    }
    /// A process started elsewhere (a fake jail) that this launcher
    /// reports alive.
    pub fn adopt(&self, id: ProcessId) {
        self.alive.lock().unwrap().push(id);
    }
    pub fn fail_next_launch(&self) {
        *self.fail_launch.lock().unwrap() = true;
    }
}

impl ProcessLauncher for FakeLauncher {
    fn launch(&self, spec: &LaunchSpec) -> Result<ProcessId, HostError> {
        self.calls
            .lock()
            .unwrap()
            .push(LauncherCall::Launch(spec.clone()));
        if std::mem::take(&mut *self.fail_launch.lock().unwrap()) {
            return Err(HostError::NotFound {
                program: spec.program.clone(),
            });
        }
        let id = ProcessId {
            pid: 100_000 + self.calls.lock().unwrap().len() as u32,
            start_time: 42,
        };
        self.alive.lock().unwrap().push(id);
        let argv = format!("{} {}", spec.program, spec.args.join(" "));
        self.argv.lock().unwrap().push((id, argv));
        Ok(id)
    }
    fn alive(&self, id: ProcessId) -> bool {
        self.alive.lock().unwrap().contains(&id)
    }
    fn signal(&self, id: ProcessId, signal: i32) -> Result<(), HostError> {
        self.calls
            .lock()
            .unwrap()
            .push(LauncherCall::Signal(id, signal));
        if signal == libc::SIGKILL || signal == libc::SIGTERM {
            self.exit(id);
        }
        Ok(())
    }
    fn find_naming(&self, needle: &str) -> Vec<ProcessId> {
        let argv = self.argv.lock().unwrap();
        argv.iter()
            .filter(|(id, line)| self.alive(*id) && line.contains(needle))
            .map(|(id, _)| *id)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_launcher_tracks_identity_and_signals() {
        let dir = std::env::temp_dir().join(format!("banger-launch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let spec = LaunchSpec {
            program: "sh".into(),
            args: vec!["-c".into(), "echo started; exec sleep 30".into()],
            log: dir.join("log"),
            cwd: None,
            user: None,
        };
        let id = RealLauncher.launch(&spec).unwrap();
        assert!(RealLauncher.alive(id));
        assert!(
            !RealLauncher.alive(ProcessId {
                pid: id.pid,
                start_time: id.start_time + 1
            }),
            "a recycled pid is not ours"
        );
        // Both before and after the shell execs sleep, its command line
        // holds "sleep 30"; it is read until seen (exec replaces it).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !RealLauncher.find_naming("sleep 30").contains(&id) {
            assert!(
                std::time::Instant::now() < deadline,
                "found by its command line"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let marker = dir.join("log").display().to_string();
        assert!(!RealLauncher.find_naming(&marker).contains(&id));
        RealLauncher.signal(id, libc::SIGKILL).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while RealLauncher.alive(id) {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
