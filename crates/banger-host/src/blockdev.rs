//! Copy-on-write block devices: a device-mapper snapshot of an image's ext4
//! (read-only loop device) over a per-VM COW file. Privileged: in production
//! these go through the root helper; a root daemon runs them in-process.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::process::{CommandSpec, HostError, ProcessRunner};

/// Whose a snapshot device is: VM `vm` of the state directory `home`
/// (its short id) of `uid`. Its name comes from all three, so two users'
/// VMs called `web` never collide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotOwner {
    pub uid: u32,
    pub home: String,
    pub vm: String,
}

impl SnapshotOwner {
    /// The device-mapper name (`/dev/mapper/<name>`).
    pub fn name(&self) -> String {
        banger_proto::helper::snapshot_device_name(self.uid, &self.home, &self.vm)
    }
}

pub trait BlockDevices: Send + Sync {
    /// Whether device-mapper snapshots can be made here.
    fn snapshot_supported(&self) -> bool;
    /// Makes `owner`'s device: `origin` (never written) under `cow`.
    /// Records what it attached in `state` so teardown touches nothing else.
    fn setup_snapshot(
        &self,
        owner: &SnapshotOwner,
        origin: &Path,
        cow: &Path,
        state: &Path,
    ) -> Result<PathBuf, HostError>;
    /// Removes the snapshot and detaches its loop devices. Idempotent.
    fn teardown_snapshot(&self, owner: &SnapshotOwner, state: &Path) -> Result<(), HostError>;
}

pub struct RealBlockDevices {
    pub runner: Arc<dyn ProcessRunner>,
}

impl RealBlockDevices {
    fn attach(&self, file: &Path, read_only: bool) -> Result<String, HostError> {
        let mut spec = CommandSpec::new("losetup").args(["--find", "--show"]);
        if read_only {
            spec = spec.arg("--read-only");
        }
        let out = self.runner.run(&spec.arg(file))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn detach(&self, dev: &str) {
        let _ = self
            .runner
            .run(&CommandSpec::new("losetup").arg("-d").arg(dev));
    }
}

impl BlockDevices for RealBlockDevices {
    fn snapshot_supported(&self) -> bool {
        Path::new("/dev/mapper/control").exists()
            && self.runner.run(&CommandSpec::new("dmsetup").arg("version")).is_ok()
            // SAFETY: geteuid has no preconditions.
            && unsafe { libc::geteuid() } == 0
    }

    fn setup_snapshot(
        &self,
        owner: &SnapshotOwner,
        origin: &Path,
        cow: &Path,
        state: &Path,
    ) -> Result<PathBuf, HostError> {
        let name = &owner.name();
        let sectors = std::fs::metadata(origin)
            .map(|m| m.len() / 512)
            .unwrap_or(0);
        let origin_dev = self.attach(origin, true)?;
        let cow_dev = match self.attach(cow, false) {
            Ok(d) => d,
            Err(e) => {
                self.detach(&origin_dev);
                return Err(e);
            }
        };
        let _ = std::fs::write(state, format!("{origin_dev}\n{cow_dev}\n"));
        let table = format!("0 {sectors} snapshot {origin_dev} {cow_dev} P 8");
        if let Err(e) = self.runner.run(
            &CommandSpec::new("dmsetup")
                .args(["create", name, "--table"])
                .arg(table),
        ) {
            self.detach(&cow_dev);
            self.detach(&origin_dev);
            let _ = std::fs::remove_file(state);
            return Err(e);
        }
        Ok(PathBuf::from(format!("/dev/mapper/{name}")))
    }

    fn teardown_snapshot(&self, owner: &SnapshotOwner, state: &Path) -> Result<(), HostError> {
        let name = &owner.name();
        if Path::new(&format!("/dev/mapper/{name}")).exists() {
            self.runner
                .run(&CommandSpec::new("dmsetup").args(["remove", "--retry", name]))?;
        }
        if let Ok(text) = std::fs::read_to_string(state) {
            for dev in text.lines().filter(|l| l.starts_with("/dev/loop")) {
                self.detach(dev);
            }
            let _ = std::fs::remove_file(state);
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockCall {
    Setup {
        name: String,
        origin: PathBuf,
        cow: PathBuf,
    },
    Teardown {
        name: String,
    },
}

/// Records snapshot setups and teardowns; "devices" live until torn down.
#[derive(Clone, Default)]
pub struct FakeBlockDevices {
    pub supported: bool,
    calls: Arc<Mutex<Vec<BlockCall>>>,
    live: Arc<Mutex<Vec<String>>>,
}

impl FakeBlockDevices {
    pub fn supported() -> FakeBlockDevices {
        FakeBlockDevices {
            supported: true,
            ..Default::default()
        }
    }
    pub fn calls(&self) -> Vec<BlockCall> {
        self.calls.lock().unwrap().clone()
    }
    pub fn live(&self) -> Vec<String> {
        self.live.lock().unwrap().clone()
    }
}

impl BlockDevices for FakeBlockDevices {
    fn snapshot_supported(&self) -> bool {
        self.supported
    }
    fn setup_snapshot(
        &self,
        owner: &SnapshotOwner,
        origin: &Path,
        cow: &Path,
        state: &Path,
    ) -> Result<PathBuf, HostError> {
        let name = &owner.name();
        self.calls.lock().unwrap().push(BlockCall::Setup {
            name: name.into(),
            origin: origin.into(),
            cow: cow.into(),
        });
        let _ = std::fs::write(state, "/dev/loop-fake-origin\n/dev/loop-fake-cow\n");
        self.live.lock().unwrap().push(name.into());
        Ok(PathBuf::from(format!("/dev/mapper/{name}")))
    }
    fn teardown_snapshot(&self, owner: &SnapshotOwner, state: &Path) -> Result<(), HostError> {
        let name = &owner.name();
        self.calls
            .lock()
            .unwrap()
            .push(BlockCall::Teardown { name: name.into() });
        self.live.lock().unwrap().retain(|n| n != name);
        let _ = std::fs::remove_file(state);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::{FakeRunner, Output};

    #[test]
    fn real_snapshot_commands_in_order_and_teardown_detaches_only_its_loops() {
        let dir = std::env::temp_dir().join(format!("banger-blockdev-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let origin = dir.join("rootfs.ext4");
        std::fs::write(&origin, vec![0u8; 1024 * 1024]).unwrap();
        let cow = dir.join("cow.img");
        std::fs::write(&cow, b"").unwrap();
        let next = Arc::new(Mutex::new(0));
        let runner = FakeRunner::new(move |spec| {
            let mut n = next.lock().unwrap();
            let stdout = if spec.program == "losetup" && spec.args.iter().any(|a| a == "--show") {
                *n += 1;
                format!("/dev/loop{}\n", *n).into_bytes()
            } else {
                Vec::new()
            };
            Ok(Output {
                stdout,
                stderr: Vec::new(),
            })
        });
        let real = RealBlockDevices {
            runner: Arc::new(runner.clone()),
        };
        let state = dir.join("dm.state");
        let web = SnapshotOwner {
            uid: 1000,
            home: "0a1b".into(),
            vm: "web".into(),
        };
        let dev = real.setup_snapshot(&web, &origin, &cow, &state).unwrap();
        assert_eq!(dev, PathBuf::from("/dev/mapper/banger-1000-0a1b-web"));
        real.teardown_snapshot(&web, &state).unwrap();
        let lines: Vec<String> = runner.calls().iter().map(|c| c.display()).collect();
        assert_eq!(
            lines[0],
            format!("losetup --find --show --read-only {}", origin.display())
        );
        assert_eq!(lines[1], format!("losetup --find --show {}", cow.display()));
        assert_eq!(
            lines[2],
            "dmsetup create banger-1000-0a1b-web --table 0 2048 snapshot /dev/loop1 /dev/loop2 P 8"
        );
        assert_eq!(
            &lines[3..],
            ["losetup -d /dev/loop1", "losetup -d /dev/loop2"]
        );
        // Idempotent: nothing left to do, nothing done.
        real.teardown_snapshot(&web, &state).unwrap();
        assert_eq!(runner.calls().len(), 5);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
