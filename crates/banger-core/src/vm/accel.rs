//! Which accelerator QEMU gets. `auto` does not trust that /dev/kvm opens:
//! under nested virtualization KVM can open and still fail to set a vCPU up
//! (QEMU aborts: `failed to set MSR 0x10a`), or run firmware and then kill
//! a real kernel (`KVM internal error` at `lock cmpxchg16b` on kvm-pvm).
//! Two checks decide, each once per boot of the host and QEMU binary
//! (`<state>/kvm-probe.json`):
//! - a short-lived QEMU with banger's CPU model runs its firmware on KVM
//!   for a moment and is told to quit; anything but a clean exit is TCG;
//! - the first VM booted on KVM is the kernel's test: one whose guest dies
//!   of a KVM internal error marks KVM unusable and boots again under TCG
//!   at once (`boot.rs`), and one that reaches its agent marks it proven.
//!
//! A probe's QEMU dies with the thread that started it (`PR_SET_PDEATHSIG`),
//! so a daemon killed mid-probe leaves none behind.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How long the probe's guest runs before it is told to quit.
const RUN_FOR: Duration = Duration::from_millis(300);
/// A probe that has not ended by then is killed and counts as unusable.
const PROBE_LIMIT: Duration = Duration::from_secs(10);

/// Whether KVM can run banger's guests here, and if not why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub usable: bool,
    /// Why not, in a few words (`nested virtualization: MSR 0x10a`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A guest kernel reached its agent on KVM here (not only firmware).
    #[serde(default)]
    pub kernel_ran: bool,
}

/// What QEMU prints when KVM cannot go on running a vCPU (the guest
/// stops; QEMU stays up with it halted).
pub const KVM_INTERNAL_ERROR: &str = "KVM internal error";

/// What a cached verdict was made for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Cached {
    boot_id: String,
    qemu: String,
    verdict: Verdict,
}

static MEMO: Mutex<Option<(PathBuf, Verdict)>> = Mutex::new(None);

/// KVM's verdict for `qemu`: remembered for the daemon's life and, in
/// `state_dir`, for this boot of the host and this binary.
pub fn kvm_verdict(qemu: &str, state_dir: &Path) -> Verdict {
    let mut memo = MEMO.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((dir, verdict)) = memo.as_ref() {
        if dir == state_dir {
            return verdict.clone();
        }
    }
    let key = Cached {
        boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .unwrap_or_default()
            .trim()
            .to_string(),
        qemu: binary_identity(qemu),
        verdict: Verdict {
            usable: false,
            reason: None,
            kernel_ran: false,
        },
    };
    let file = state_dir.join(PROBE_FILE);
    let cached = std::fs::read(&file)
        .ok()
        .and_then(|b| serde_json::from_slice::<Cached>(&b).ok())
        .filter(|c| c.boot_id == key.boot_id && c.qemu == key.qemu);
    let verdict = match cached {
        Some(c) => c.verdict,
        None => {
            let verdict = if super::vmm::kvm_usable() {
                probe(qemu)
            } else {
                unusable("/dev/kvm cannot be opened")
            };
            let record = Cached {
                verdict: verdict.clone(),
                ..key
            };
            if let Ok(bytes) = serde_json::to_vec(&record) {
                let _ = std::fs::write(&file, bytes);
            }
            verdict
        }
    };
    *memo = Some((state_dir.to_path_buf(), verdict.clone()));
    verdict
}

const PROBE_FILE: &str = "kvm-probe.json";

fn unusable(reason: impl Into<String>) -> Verdict {
    Verdict {
        usable: false,
        reason: Some(reason.into()),
        kernel_ran: false,
    }
}

/// A guest kernel died on KVM (`why`, from QEMU): KVM is unusable here for
/// the rest of this host boot, kept as the probe's verdict is.
pub fn mark_unusable(state_dir: &Path, why: &str) {
    update(state_dir, |v| {
        *v = unusable(format!("a guest kernel died on KVM: {why}"))
    });
}

/// A guest kernel reached its agent on KVM: the verdict is proven.
pub fn mark_kernel_ran(state_dir: &Path) {
    update(state_dir, |v| v.kernel_ran = v.usable);
}

/// Changes the remembered verdict of `state_dir`, in memory and on disk.
fn update(state_dir: &Path, change: impl Fn(&mut Verdict)) {
    let mut memo = MEMO.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((dir, verdict)) = memo.as_mut() {
        if dir == state_dir {
            change(verdict);
        }
    }
    let file = state_dir.join(PROBE_FILE);
    let Some(mut cached) = std::fs::read(&file)
        .ok()
        .and_then(|b| serde_json::from_slice::<Cached>(&b).ok())
    else {
        return;
    };
    let before = cached.verdict.clone();
    change(&mut cached.verdict);
    // Every boot on KVM marks it proven: written once, not each time.
    if cached.verdict == before {
        return;
    }
    if let Ok(bytes) = serde_json::to_vec(&cached) {
        let _ = std::fs::write(&file, bytes);
    }
}

/// The binary's path, size and change time: another QEMU is probed anew.
fn binary_identity(qemu: &str) -> String {
    let path = crate::config::which(qemu).unwrap_or_else(|| PathBuf::from(qemu));
    match std::fs::metadata(&path) {
        Ok(m) => {
            use std::os::unix::fs::MetadataExt;
            format!("{} {} {}", path.display(), m.len(), m.mtime())
        }
        Err(_) => path.display().to_string(),
    }
}

/// Starts QEMU on KVM with banger's machine and CPU model, lets its
/// firmware run, then asks it to quit through its monitor.
pub fn probe(qemu: &str) -> Verdict {
    let mut command = Command::new(qemu);
    command
        .args([
            "-M",
            "microvm,x-option-roms=off",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-m",
            "64",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "none",
            "-monitor",
            "stdio",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: prctl(2) only, between fork and exec: the probe ends with
    // this thread, whatever kills it (a daemon SIGKILLed mid-probe left
    // QEMUs running for good).
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let spawned = command.spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => return unusable(format!("{qemu} cannot be run: {e}")),
    };
    std::thread::sleep(RUN_FOR);
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"quit\n");
    }
    let deadline = Instant::now() + PROBE_LIMIT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut stderr);
    }
    verdict(status.map(|s| s.success()), &stderr)
}

/// The verdict from how the probe ended (`None`: it had to be killed) and
/// what it said.
fn verdict(clean_exit: Option<bool>, stderr: &str) -> Verdict {
    let said = stderr
        .lines()
        .find(|l| l.contains("error") || l.contains("Assertion") || l.contains("failed"))
        .map(|l| {
            l.trim_start_matches("qemu-system-x86_64: ")
                .trim()
                .to_string()
        });
    match (clean_exit, said) {
        (Some(true), None) => Verdict {
            usable: true,
            reason: None,
            kernel_ran: false,
        },
        (_, Some(line)) if line.contains("MSR") => unusable(format!(
            "nested virtualization: {}",
            line.split("failed to set ")
                .nth(1)
                .and_then(|m| m.split(" to ").next())
                .unwrap_or(&line)
        )),
        (_, Some(line)) => unusable(line),
        (None, None) => unusable("a KVM guest did not stop when told (KVM hangs here)"),
        (Some(false), None) => unusable("QEMU failed on KVM"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_how_the_probe_ended() {
        assert!(verdict(Some(true), "").usable);
        let msr = verdict(
            Some(false),
            "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\nqemu-system-x86_64: \
             ../kvm.c:3183: kvm_buf_set_msrs: Assertion `ret == n' failed.\n",
        );
        assert_eq!(
            msr.reason.as_deref(),
            Some("nested virtualization: MSR 0x10a")
        );
        assert!(!msr.usable);
        let internal = verdict(Some(false), "KVM internal error. Suberror: 1\n");
        assert!(!internal.usable, "{internal:?}");
        assert!(!verdict(None, "").usable);
    }

    /// A kernel's death marks KVM unusable, with QEMU's words; a boot that
    /// reached its agent marks it proven. Kept on disk for the next daemon.
    #[test]
    fn a_boot_changes_the_kept_verdict() {
        let dir = tempfile::tempdir().unwrap();
        let clean = dir.path().join("clean");
        std::fs::write(&clean, "#!/bin/sh\nread line; [ \"$line\" = quit ]\n").unwrap();
        std::fs::set_permissions(&clean, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        let first = kvm_verdict(clean.to_str().unwrap(), &state);
        let kept = || -> Verdict {
            serde_json::from_slice::<Cached>(&std::fs::read(state.join(PROBE_FILE)).unwrap())
                .unwrap()
                .verdict
        };
        if first.usable {
            assert!(!first.kernel_ran, "firmware is not a kernel");
            mark_kernel_ran(&state);
            assert!(kept().kernel_ran);
        }
        mark_unusable(&state, "KVM internal error. Suberror: 1");
        let v = kept();
        assert!(!v.usable && !v.kernel_ran);
        assert_eq!(
            v.reason.as_deref(),
            Some("a guest kernel died on KVM: KVM internal error. Suberror: 1")
        );
        // Unusable stays so: a later boot on TCG proves nothing of KVM.
        mark_kernel_ran(&state);
        assert!(!kept().kernel_ran);
    }

    #[test]
    fn a_fake_qemu_is_probed_and_its_verdict_kept() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("qemu");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho 'qemu: error: failed to set MSR 0x10a to 0x69' >&2\nexit 134\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let v = probe(fake.to_str().unwrap());
        assert_eq!(
            v.reason.as_deref(),
            Some("nested virtualization: MSR 0x10a")
        );
        let clean = dir.path().join("clean");
        std::fs::write(&clean, "#!/bin/sh\nread line; [ \"$line\" = quit ]\n").unwrap();
        std::fs::set_permissions(&clean, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        assert!(probe(clean.to_str().unwrap()).usable);

        // Kept in the state directory for this boot and this binary.
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        let first = kvm_verdict(fake.to_str().unwrap(), &state);
        assert!(!first.usable);
        let kept: Cached =
            serde_json::from_slice(&std::fs::read(state.join("kvm-probe.json")).unwrap()).unwrap();
        assert_eq!(kept.verdict, first);
        assert!(
            kept.qemu.starts_with(fake.to_str().unwrap()),
            "{}",
            kept.qemu
        );
        assert_eq!(
            kvm_verdict(clean.to_str().unwrap(), &state),
            first,
            "remembered"
        );
    }
}
