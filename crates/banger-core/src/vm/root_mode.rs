//! Which root mode a new VM gets: the one asked for, refused with the reason
//! when the host or kernel cannot give it, or else the best they support.

use std::path::Path;

use banger_proto::domain::RootMode;
use banger_proto::kernel::KernelInfo;

/// What the host and the VM's kernel can do, as far as root modes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Support {
    /// The guest kernel has overlayfs (built in or as a module).
    pub overlay: bool,
    /// Device-mapper snapshots through the root helper.
    pub snapshot: bool,
    /// The VMs' directory shares blocks between files (btrfs, xfs).
    pub reflink: bool,
}

impl Support {
    /// What this host and `kernel` (none yet: taken to have overlayfs) can
    /// do, as far as choosing `asked` (or the default) goes. The reflink
    /// probe writes files in `dir`: it runs only when its answer can matter.
    pub fn probe(
        asked: Option<RootMode>,
        kernel: Option<&KernelInfo>,
        blockdevs: &dyn banger_host::BlockDevices,
        dir: &Path,
    ) -> std::io::Result<Support> {
        let overlay = kernel.is_none_or(kernel_has_overlay);
        let snapshot = blockdevs.snapshot_supported();
        let reflink = match asked {
            Some(RootMode::Reflink) => true,
            Some(_) => false,
            None => !overlay && !snapshot,
        } && {
            std::fs::create_dir_all(dir)?;
            crate::vm::disk::reflink_supported(dir)
        };
        Ok(Support {
            overlay,
            snapshot,
            reflink,
        })
    }
}

/// A mode asked for that this host or kernel cannot give.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unsupported(String);

/// The mode a new VM gets. Overlay first: constant time and space per VM
/// and nothing needed from the host. Then a snapshot (constant too, but it
/// needs device-mapper and the root helper), then a copy, sharing blocks
/// when the filesystem can.
pub fn choose(asked: Option<RootMode>, support: Support) -> Result<RootMode, Unsupported> {
    let Some(mode) = asked else {
        return Ok(if support.overlay {
            RootMode::Overlay
        } else if support.snapshot {
            RootMode::DmSnapshot
        } else if support.reflink {
            RootMode::Reflink
        } else {
            RootMode::Copy
        });
    };
    let why = match mode {
        RootMode::Overlay if !support.overlay => {
            "the VM's kernel has no overlayfs (CONFIG_OVERLAY_FS)"
        }
        RootMode::DmSnapshot if !support.snapshot => {
            "device-mapper snapshots need the root helper (`banger system install`) and a host kernel with dm-snapshot"
        }
        RootMode::Reflink if !support.reflink => {
            "the VMs' directory is on a filesystem that cannot share blocks (reflinks need btrfs or xfs)"
        }
        _ => return Ok(mode),
    };
    let other = choose(None, support).unwrap_or(RootMode::Copy);
    Err(Unsupported(format!(
        "--root-mode {mode} is not available here: {why}; use --root-mode {other}, or leave it out for the best this host supports"
    )))
}

/// Whether `kernel` has overlayfs: its config says so, or failing a config,
/// it ships the module. A kernel with neither (a bare vmlinux) is taken to
/// have it built in, as Firecracker's guest kernels do; if it has not, the
/// boot fails naming `--root-mode copy`.
pub fn kernel_has_overlay(kernel: &KernelInfo) -> bool {
    if let Some(config) = kernel
        .config_path
        .as_deref()
        .and_then(|p| std::fs::read_to_string(p).ok())
    {
        return config_has_overlay(&config);
    }
    match kernel.modules_dir.as_deref() {
        Some(dir) => has_module(Path::new(dir), "overlay"),
        None => true,
    }
}

fn config_has_overlay(config: &str) -> bool {
    config
        .lines()
        .any(|l| matches!(l.trim(), "CONFIG_OVERLAY_FS=y" | "CONFIG_OVERLAY_FS=m"))
}

fn has_module(dir: &Path, name: &str) -> bool {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let file = entry.file_name();
            let file = file.to_string_lossy();
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(entry.path());
            } else if file
                .strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(".ko"))
            {
                return true;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Support = Support {
        overlay: true,
        snapshot: true,
        reflink: true,
    };
    const NONE: Support = Support {
        overlay: false,
        snapshot: false,
        reflink: false,
    };

    #[test]
    fn the_default_is_the_best_supported() {
        assert_eq!(choose(None, ALL), Ok(RootMode::Overlay));
        let no_overlay = Support {
            overlay: false,
            ..ALL
        };
        assert_eq!(choose(None, no_overlay), Ok(RootMode::DmSnapshot));
        let reflink_only = Support {
            reflink: true,
            ..NONE
        };
        assert_eq!(choose(None, reflink_only), Ok(RootMode::Reflink));
        assert_eq!(choose(None, NONE), Ok(RootMode::Copy));
    }

    #[test]
    fn a_mode_asked_for_is_given_or_refused_naming_one_that_works() {
        assert_eq!(choose(Some(RootMode::Copy), ALL), Ok(RootMode::Copy));
        assert_eq!(choose(Some(RootMode::Copy), NONE), Ok(RootMode::Copy));
        let err = choose(Some(RootMode::DmSnapshot), NONE).unwrap_err();
        assert!(
            err.0.contains("--root-mode dm-snapshot is not available")
                && err.0.contains("use --root-mode copy"),
            "{err}"
        );
        let overlay_only = Support {
            overlay: true,
            ..NONE
        };
        let err = choose(Some(RootMode::Reflink), overlay_only).unwrap_err();
        assert!(err.0.contains("btrfs or xfs") && err.0.contains("use --root-mode overlay"));
        let err = choose(Some(RootMode::Overlay), NONE).unwrap_err();
        assert!(err.0.contains("CONFIG_OVERLAY_FS"), "{err}");
    }

    #[test]
    fn overlay_support_is_read_from_the_config_then_the_modules() {
        assert!(config_has_overlay("# x\nCONFIG_OVERLAY_FS=m\n"));
        assert!(config_has_overlay("CONFIG_OVERLAY_FS=y"));
        assert!(!config_has_overlay("# CONFIG_OVERLAY_FS is not set\n"));
        let dir = tempfile::tempdir().unwrap();
        let fs = dir.path().join("kernel/fs/overlayfs");
        std::fs::create_dir_all(&fs).unwrap();
        assert!(!has_module(dir.path(), "overlay"));
        std::fs::write(fs.join("overlay.ko.xz"), b"").unwrap();
        assert!(has_module(dir.path(), "overlay"));
        assert!(!has_module(dir.path(), "over"));
    }
}
