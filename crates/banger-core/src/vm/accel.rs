//! Which accelerator QEMU gets. `auto` does not trust that /dev/kvm opens:
//! under nested virtualization KVM can open and still fail to set a vCPU up
//! (QEMU aborts: `failed to set MSR 0x10a`) or to run it. A short-lived
//! QEMU with the CPU model banger uses is started on KVM, runs its firmware
//! for a moment and is told to quit; only a clean exit makes KVM the
//! choice. The verdict is kept for this boot of the host and this QEMU
//! binary (`<state>/kvm-probe.json`), so it is paid once (about 0.2 s).

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
}

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
        },
    };
    let file = state_dir.join("kvm-probe.json");
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
                Verdict {
                    usable: false,
                    reason: Some("/dev/kvm cannot be opened".into()),
                }
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
    let spawned = Command::new(qemu)
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
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            return Verdict {
                usable: false,
                reason: Some(format!("{qemu} cannot be run: {e}")),
            }
        }
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
        },
        (_, Some(line)) if line.contains("MSR") => Verdict {
            usable: false,
            reason: Some(format!(
                "nested virtualization: {}",
                line.split("failed to set ")
                    .nth(1)
                    .and_then(|m| m.split(" to ").next())
                    .unwrap_or(&line)
            )),
        },
        (_, Some(line)) => Verdict {
            usable: false,
            reason: Some(line),
        },
        (None, None) => Verdict {
            usable: false,
            reason: Some("a KVM guest did not stop when told (KVM hangs here)".into()),
        },
        (Some(false), None) => Verdict {
            usable: false,
            reason: Some("QEMU failed on KVM".into()),
        },
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
