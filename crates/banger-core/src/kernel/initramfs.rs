//! The initramfs every VM boots with: the guest agent as `/init` and exactly
//! the modules its devices need, resolved through their dependencies. The
//! per-VM part (the agent's boot config) is a second archive appended to it.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use banger_proto::agent::{driver, MODULES_ORDER_PATH};

use super::cpio::Cpio;
use super::decompress;
use super::modinfo;

/// Drivers banger's VMs use: the virtio-mmio bus, disks, network, the
/// virtio console (QEMU's agent ports), vsock (Firecracker's) and overlayfs
/// (the overlay root mode).
pub const WANTED: &[&str] = &[
    driver::BUS,
    driver::SERIAL,
    driver::VSOCK,
    driver::DISK,
    driver::NET,
    driver::OVERLAY,
];

/// Bumped whenever the base archive's layout, manifest format or set of
/// drivers changes.
pub const LAYOUT_VERSION: u32 = 3;

/// A module to load, already decompressed.
#[derive(Debug, Clone)]
pub struct Module {
    pub name: String,
    pub bytes: Vec<u8>,
    /// The wanted drivers that need it (itself or as a dependency).
    pub drivers: Vec<String>,
}

/// Finds every `.ko`, `.ko.xz`, `.ko.zst` or `.ko.gz` under `root`, by name.
fn index(root: &Path) -> std::io::Result<HashMap<String, PathBuf>> {
    let mut found = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                stack.push(path);
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            for suffix in [".ko", ".ko.xz", ".ko.zst", ".ko.gz"] {
                if let Some(stem) = name.strip_suffix(suffix) {
                    found.insert(modinfo::normalize(stem), path.clone());
                }
            }
        }
    }
    Ok(found)
}

fn read_module(path: &Path) -> Result<Vec<u8>, String> {
    let raw = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    match decompress::sniff(&raw) {
        Some(format) => decompress::decompress(format, &raw).map_err(|e| e.0),
        None => Ok(raw),
    }
}

/// The modules to load for `wanted`, dependencies first. A wanted driver
/// with no module file under `root` is taken to be built into the kernel.
pub fn resolve(root: Option<&Path>, wanted: &[&str]) -> Result<Vec<Module>, super::KernelError> {
    let Some(root) = root else {
        return Ok(Vec::new());
    };
    let index = index(root).map_err(|e| format!("reading modules in {}: {e}", root.display()))?;
    let mut order = Vec::new();
    let mut deps = HashMap::new();
    let mut done = HashSet::new();
    for name in wanted {
        visit(
            &index,
            &modinfo::normalize(name),
            &mut done,
            &mut Vec::new(),
            &mut order,
            &mut deps,
        )?;
    }
    // Each driver's whole closure, so the agent can load any set of them.
    for name in wanted {
        let mut stack = vec![modinfo::normalize(name)];
        let mut seen = HashSet::new();
        while let Some(n) = stack.pop() {
            if !seen.insert(n.clone()) {
                continue;
            }
            stack.extend(deps.get(&n).into_iter().flatten().cloned());
        }
        for m in order.iter_mut().filter(|m| seen.contains(&m.name)) {
            m.drivers.push(name.to_string());
        }
    }
    Ok(order)
}

fn visit(
    index: &HashMap<String, PathBuf>,
    name: &str,
    done: &mut HashSet<String>,
    path: &mut Vec<String>,
    order: &mut Vec<Module>,
    deps: &mut HashMap<String, Vec<String>>,
) -> Result<(), String> {
    if done.contains(name) {
        return Ok(());
    }
    if path.iter().any(|p| p == name) {
        return Err(format!(
            "module dependency cycle: {} -> {name}",
            path.join(" -> ")
        ));
    }
    let Some(file) = index.get(name) else {
        done.insert(name.to_string());
        return Ok(());
    };
    let bytes = read_module(file)?;
    path.push(name.to_string());
    let needs = modinfo::depends(&bytes).map_err(|e| format!("{}: {e}", file.display()))?;
    for dep in &needs {
        visit(index, dep, done, path, order, deps)?;
    }
    path.pop();
    done.insert(name.to_string());
    deps.insert(name.to_string(), needs);
    order.push(Module {
        name: name.to_string(),
        bytes,
        drivers: Vec::new(),
    });
    Ok(())
}

/// The shared part: agent, modules and their load order, and the few nodes
/// init needs before devtmpfs is up.
pub fn base_archive(agent: &[u8], modules: &[Module]) -> Vec<u8> {
    let mut c = Cpio::default();
    for dir in [
        "dev",
        "proc",
        "sys",
        "newroot",
        "banger",
        "lib",
        "lib/banger-modules",
    ] {
        c.dir(dir);
    }
    c.char_device("dev/console", 0o600, 5, 1);
    c.file("init", 0o755, agent);
    let mut order = String::new();
    for m in modules {
        let path = format!("/lib/banger-modules/{}.ko", m.name);
        c.file(&path, 0o644, &m.bytes);
        order.push_str(&format!("{path} {}\n", m.drivers.join(",")));
    }
    if !modules.is_empty() {
        c.file(MODULES_ORDER_PATH, 0o644, order.as_bytes());
    }
    c.finish()
}

/// The per-VM part: the agent's boot config.
pub fn vm_archive(config_json: &[u8]) -> Vec<u8> {
    let mut c = Cpio::default();
    c.dir("banger");
    c.file(banger_proto::agent::BOOT_CONFIG_PATH, 0o600, config_json);
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::super::modinfo::fake_module;
    use super::*;

    #[test]
    fn resolves_dependencies_first_and_skips_builtins() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("kernel/drivers/virtio")).unwrap();
        std::fs::write(
            root.join("kernel/drivers/virtio/virtio_ring.ko"),
            fake_module(""),
        )
        .unwrap();
        std::fs::write(
            root.join("kernel/drivers/virtio/virtio.ko"),
            fake_module("virtio_ring"),
        )
        .unwrap();
        let compressed = zstd::encode_all(&fake_module("virtio,virtio_ring")[..], 3).unwrap();
        std::fs::write(
            root.join("kernel/drivers/virtio/virtio_mmio.ko.zst"),
            compressed,
        )
        .unwrap();
        std::fs::write(
            root.join("kernel/drivers/virtio/virtio-blk.ko"),
            fake_module("virtio"),
        )
        .unwrap();

        let mods = resolve(Some(root), &["virtio_mmio", "virtio_blk", "virtio_console"]).unwrap();
        let names: Vec<_> = mods.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            ["virtio_ring", "virtio", "virtio_mmio", "virtio_blk"]
        );
        assert!(
            mods.iter().all(|m| m.bytes.starts_with(b"\x7fELF")),
            "decompressed"
        );
        let drivers: Vec<_> = mods.iter().map(|m| m.drivers.join(",")).collect();
        assert_eq!(
            drivers,
            [
                "virtio_mmio,virtio_blk",
                "virtio_mmio,virtio_blk",
                "virtio_mmio",
                "virtio_blk"
            ]
        );
        let archive = base_archive(b"agent", &mods);
        let manifest = "/lib/banger-modules/virtio_ring.ko virtio_mmio,virtio_blk\n\
                        /lib/banger-modules/virtio.ko virtio_mmio,virtio_blk\n\
                        /lib/banger-modules/virtio_mmio.ko virtio_mmio\n\
                        /lib/banger-modules/virtio_blk.ko virtio_blk\n";
        assert!(
            archive
                .windows(manifest.len())
                .any(|w| w == manifest.as_bytes()),
            "the manifest names each module's drivers"
        );
        assert!(resolve(None, WANTED).unwrap().is_empty());
    }
}
