//! `vm stats`: what each VM uses. From the host: the VMM process's CPU time
//! and resident memory (/proc), its disk files (size, allocated) and its
//! tap's counters; from the guest, through the agent (in-process, so any
//! image answers): memory, load and how full the root and work filesystems
//! are. Guests are asked in the background, all at once, and a round waits
//! for their answers only briefly: one that answers later is shown by the
//! next round, with its age, so a round's cost stays bounded however busy
//! the guests are (20 TCG guests on two host CPUs take seconds to answer).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use banger_proto::agent::GuestStats;

use banger_proto::vm::{DiskStats, GuestMemory, NetStats, VmStats};

use super::lifecycle::VmLifecycle;
use crate::error::OpResult;
use crate::store::VmRecord;
use crate::vm::disk;

/// A VMM's CPU time at an instant.
#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    pid: u32,
    ticks: u64,
    at: Instant,
}

/// A guest's last answer, and whether it is being asked now.
#[derive(Debug, Default)]
struct GuestSample {
    latest: Option<(u32, GuestStats, Instant)>,
    asking: bool,
}

/// What `vm stats` remembers between rounds.
#[derive(Debug, Default)]
pub struct StatsCache {
    cpu: Mutex<HashMap<String, CpuSample>>,
    guests: Mutex<HashMap<String, GuestSample>>,
}

/// How long a round waits for guests it asked.
const GUEST_WAIT: Duration = Duration::from_millis(250);
/// A guest's answer older than this is not shown.
const GUEST_STALE: Duration = Duration::from_secs(15);

/// Shorter than this since the last sample, and CPU use is measured over a
/// fresh interval of this length instead (a first `vm stats`, or two
/// callers close together).
const MIN_INTERVAL: Duration = Duration::from_millis(250);
/// Older than this and the last sample says little about now.
const MAX_INTERVAL: Duration = Duration::from_secs(10);
/// The guest has this long to answer before it is asked again.
const GUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl VmLifecycle {
    pub async fn stats(&self, names: &[String]) -> OpResult<Vec<VmStats>> {
        let vms = if names.is_empty() {
            self.registry.store.list_vms()?
        } else {
            names
                .iter()
                .map(|n| self.registry.record(n))
                .collect::<OpResult<Vec<_>>>()?
        };
        // CPU time is a rate: VMs without a recent sample get one, then one
        // shared wait, then all are read again.
        let mut fresh = false;
        let mut asked = Vec::new();
        for vm in &vms {
            if let Some(rt) = self.registry.live(&vm.name)? {
                if !rt.paused {
                    asked.extend(self.ask_guest(vm, rt.pid));
                }
                let stale = self
                    .last_sample(&vm.name, rt.pid)
                    .is_none_or(|s| s.at.elapsed() < MIN_INTERVAL || s.at.elapsed() > MAX_INTERVAL);
                if stale {
                    self.sample(&vm.name, rt.pid);
                    fresh = true;
                }
            }
        }
        let waiting = tokio::time::timeout(GUEST_WAIT, futures_util::future::join_all(asked));
        if fresh {
            let _ = tokio::join!(tokio::time::sleep(MIN_INTERVAL), waiting);
        } else {
            let _ = waiting.await;
        }
        vms.iter().map(|vm| self.one(vm)).collect()
    }

    fn one(&self, vm: &VmRecord) -> OpResult<VmStats> {
        let rt = self.registry.live(&vm.name)?;
        let info = self.registry.info_with(vm, rt.clone())?;
        let dir = Path::new(&vm.dir);
        let root_file = dir.join(disk::own_root_file(vm.root_mode));
        let mut disks = vec![
            disk_stats("root", &root_file, "/"),
            disk_stats("work", &dir.join(disk::WORK_FILE), &info.work_mount),
        ];
        let mut stats = VmStats {
            name: vm.name.clone(),
            state: info.state,
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            uptime_secs: None,
            cpu_percent: None,
            vmm_rss_bytes: None,
            guest_memory: None,
            guest_age_ms: None,
            load: None,
            disks: Vec::new(),
            net: None,
        };
        if let Some(rt) = &rt {
            let before = self.last_sample(&vm.name, rt.pid);
            let now = self.sample(&vm.name, rt.pid);
            if let (Some(a), Some(b)) = (before, now) {
                let secs = b.at.duration_since(a.at).as_secs_f64();
                if secs > 0.0 {
                    let used = (b.ticks.saturating_sub(a.ticks)) as f64 / clock_ticks() as f64;
                    stats.cpu_percent =
                        Some((used / secs / f64::from(vm.vcpus.max(1)) * 1000.0).round() / 10.0);
                }
            }
            stats.uptime_secs = uptime_secs(rt.start_time);
            stats.vmm_rss_bytes = rss_bytes(rt.pid);
            stats.net = rt.tap.as_deref().and_then(tap_counters);
        }
        if let Some((guest, age)) = rt
            .as_ref()
            .and_then(|rt| self.guest_answer(&vm.name, rt.pid))
        {
            stats.guest_age_ms = Some(age.as_millis() as u64);
            stats.guest_memory = Some(GuestMemory {
                total_bytes: guest.mem_total_bytes,
                available_bytes: guest.mem_available_bytes,
                used_bytes: guest
                    .mem_total_bytes
                    .saturating_sub(guest.mem_available_bytes),
            });
            stats.load = Some(guest.load);
            for d in &mut disks {
                if let Some(fs) = guest.filesystems.iter().find(|f| f.path == d.guest_path) {
                    d.fs_total_bytes = Some(fs.total_bytes);
                    d.fs_used_bytes = Some(fs.used_bytes);
                }
            }
        }
        stats.disks = disks;
        Ok(stats)
    }

    /// Asks a guest for its figures in the background, unless it is being
    /// asked already; the task ends when it has answered (or given up).
    fn ask_guest(&self, vm: &VmRecord, pid: u32) -> Option<tokio::task::JoinHandle<()>> {
        let cache = self.stats_cache.clone();
        {
            let mut guests = cache.guests.lock().unwrap_or_else(|p| p.into_inner());
            let entry = guests.entry(vm.name.clone()).or_default();
            if entry.asking {
                return None;
            }
            entry.asking = true;
        }
        let (sessions, vm) = (self.sessions.clone(), vm.clone());
        let work_mount = super::registry::WORK_MOUNT;
        Some(tokio::spawn(async move {
            let asked = async {
                let session = sessions.session(&vm).await.map_err(|e| e.message)?;
                crate::services::workspace::guest::stats(&session, &["/", work_mount]).await
            };
            let answer = tokio::time::timeout(GUEST_TIMEOUT, asked).await;
            let mut guests = cache.guests.lock().unwrap_or_else(|p| p.into_inner());
            let entry = guests.entry(vm.name.clone()).or_default();
            entry.asking = false;
            match answer {
                Ok(Ok(stats)) => entry.latest = Some((pid, stats, Instant::now())),
                Ok(Err(e)) => tracing::debug!(vm = %vm.name, error = %e, "no guest stats"),
                Err(_) => tracing::debug!(vm = %vm.name, "the guest did not answer for stats"),
            }
        }))
    }

    /// The guest's last answer from this VMM, and its age, if recent.
    fn guest_answer(&self, name: &str, pid: u32) -> Option<(GuestStats, Duration)> {
        let guests = self
            .stats_cache
            .guests
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (from, stats, at) = guests.get(name)?.latest.as_ref()?;
        let age = at.elapsed();
        (*from == pid && age < GUEST_STALE).then(|| (stats.clone(), age))
    }

    fn last_sample(&self, name: &str, pid: u32) -> Option<CpuSample> {
        let samples = self
            .stats_cache
            .cpu
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        samples.get(name).copied().filter(|s| s.pid == pid)
    }

    /// Reads the VMM's CPU time now and keeps it as the VM's last sample.
    fn sample(&self, name: &str, pid: u32) -> Option<CpuSample> {
        let sample = CpuSample {
            pid,
            ticks: cpu_ticks(pid)?,
            at: Instant::now(),
        };
        let mut samples = self
            .stats_cache
            .cpu
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        samples.insert(name.to_string(), sample);
        Some(sample)
    }
}

fn disk_stats(which: &str, file: &Path, guest_path: &str) -> DiskStats {
    DiskStats {
        disk: which.into(),
        file: file.display().to_string(),
        size_bytes: std::fs::metadata(file).map(|m| m.len()).unwrap_or(0),
        allocated_bytes: disk::allocated(file),
        guest_path: guest_path.into(),
        fs_total_bytes: None,
        fs_used_bytes: None,
    }
}

/// The fields of /proc/PID/stat after the command name (which may hold
/// spaces and parentheses).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// utime + stime of the process and its reaped children, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let f = stat_fields(pid)?;
    // After the name: state is field 0, so utime (14th overall) is 11.
    [11, 12, 13, 14]
        .iter()
        .map(|&i| f.get(i)?.parse::<u64>().ok())
        .sum()
}

fn clock_ticks() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map(|t| t as u64)
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

/// Seconds since a process that started `start_time` ticks after boot.
fn uptime_secs(start_time: u64) -> Option<u64> {
    let up: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((up - start_time as f64 / clock_ticks() as f64).max(0.0) as u64)
}

fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib << 10)
}

/// The tap's counters are the host's side: what it received the guest sent.
fn tap_counters(tap: &str) -> Option<NetStats> {
    let read = |what: &str| -> Option<u64> {
        std::fs::read_to_string(format!("/sys/class/net/{tap}/statistics/{what}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    Some(NetStats {
        rx_bytes: read("tx_bytes")?,
        tx_bytes: read("rx_bytes")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(cpu_ticks(me).is_some());
        assert!(rss_bytes(me).unwrap() > 1 << 20);
        let start: u64 = stat_fields(me).unwrap()[19].parse().unwrap();
        assert!(uptime_secs(start).unwrap() < 3600);
        assert!(tap_counters("lo").is_some());
        assert!(tap_counters("no-such-dev").is_none());
    }
}
