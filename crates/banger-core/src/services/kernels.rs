//! The kernel service: import, list, inspect, remove, the default kernel,
//! and each kernel's cached initramfs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use banger_proto::kernel::{ImportParams, KernelInfo};

use crate::error::{OpError, OpResult};
use crate::ids;
use crate::kernel::{bzimage, deb, initramfs, KernelError};
use crate::paths::Paths;
use crate::store::Store;
use crate::suggest;

pub struct KernelService {
    paths: Paths,
    store: Arc<Store>,
    /// Serialises imports and initramfs builds; both are rare and short.
    lock: tokio::sync::Mutex<()>,
    /// The agent binary's digest, by what identifies the file on disk, so a
    /// `vm start` does not read and hash it again.
    agent_tags: std::sync::Mutex<Option<(AgentFile, String)>>,
}

/// An agent binary as the file system sees it; any change makes a new one.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AgentFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl AgentFile {
    fn of(path: &Path) -> std::io::Result<AgentFile> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(AgentFile {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
        })
    }
}

/// The cached base initramfs for an agent. The name carries the layout's
/// version too: a daemon that lays archives out differently must not reuse
/// one an older daemon built for the same agent.
fn cached_initramfs(dir: &Path, agent_tag: &str) -> PathBuf {
    dir.join(format!(
        "initramfs-{agent_tag}-v{}.cpio",
        initramfs::LAYOUT_VERSION
    ))
}

/// Removes base archives other than `keep` (built for earlier agents or
/// layouts): VMs boot from their own copies, so nothing still needs them.
fn prune_initramfs(keep: &Path) {
    let Some(dir) = keep.parent() else { return };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("initramfs-") && name.ends_with(".cpio") && entry.path() != keep {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

impl KernelService {
    pub fn new(paths: Paths, store: Arc<Store>) -> KernelService {
        KernelService {
            paths,
            store,
            lock: tokio::sync::Mutex::new(()),
            agent_tags: std::sync::Mutex::new(None),
        }
    }

    fn kernels_dir(&self) -> PathBuf {
        self.paths.state_dir.join("kernels")
    }

    pub fn list(&self) -> OpResult<Vec<KernelInfo>> {
        Ok(self.store.list_kernels()?)
    }

    pub fn get(&self, name: &str) -> OpResult<KernelInfo> {
        self.store.get_kernel(name)?.ok_or_else(|| {
            let all = self.store.list_kernels().unwrap_or_default();
            let hint = match suggest::closest(name, all.iter().map(|k| k.name.as_str())) {
                Some(near) => format!("; did you mean `{near}`?"),
                None => "; `banger kernel ls` lists kernels, `banger kernel import PATH` adds one"
                    .into(),
            };
            OpError::not_found(format!("no kernel named `{name}`{hint}"))
        })
    }

    /// The named kernel, or the default one: the only kernel, or the one marked default.
    pub fn resolve(&self, name: Option<&str>) -> OpResult<KernelInfo> {
        if let Some(name) = name {
            return self.get(name);
        }
        let all = self.store.list_kernels()?;
        if let Some(k) = all.iter().find(|k| k.default) {
            return Ok(k.clone());
        }
        match all.len() {
            1 => Ok(all[0].clone()),
            0 => Err(OpError::not_found(
                "no kernel imported yet; run `banger kernel import /path/to/linux-image-….deb` first",
            )),
            _ => Err(OpError::invalid(format!(
                "several kernels and none is the default ({}); pass --kernel, or re-import one with --default",
                all.iter().map(|k| k.name.as_str()).collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    pub fn inspect(&self, names: &[String]) -> OpResult<Vec<KernelInfo>> {
        names.iter().map(|n| self.get(n)).collect()
    }

    pub async fn remove(&self, names: &[String], force: bool) -> OpResult<Vec<String>> {
        let _guard = self.lock.lock().await;
        let mut doomed = Vec::new();
        for name in names {
            match self.store.get_kernel(name)? {
                Some(k) if !force => {
                    let users = self.store.kernel_users(&k.name)?;
                    if !users.is_empty() {
                        return Err(OpError::conflict(format!(
                            "kernel `{}` is used by {}; remove those first, or pass -f (they \
                             will not start again)",
                            k.name,
                            users.join(", ")
                        )));
                    }
                    doomed.push(k)
                }
                Some(k) => doomed.push(k),
                None if force => {}
                None => return Err(self.get(name).unwrap_err()),
            }
        }
        let mut removed = Vec::new();
        for k in doomed {
            self.store.delete_kernel(&k.name)?;
            if let Some(dir) = Path::new(&k.vmlinux_path).parent() {
                if dir.parent() == Some(self.kernels_dir().as_path()) {
                    let _ = std::fs::remove_dir_all(dir);
                }
            }
            removed.push(k.name);
        }
        Ok(removed)
    }

    pub async fn import(&self, params: ImportParams) -> OpResult<KernelInfo> {
        let source = PathBuf::from(&params.path);
        if !source.is_absolute() {
            return Err(OpError::invalid(format!(
                "kernel path `{}` must be absolute",
                params.path
            )));
        }
        if let Some(name) = &params.name {
            crate::oci::reference::validate_name(name)
                .map_err(|e| OpError::invalid(e.replace("image", "kernel")))?;
        }
        let _guard = self.lock.lock().await;
        let scratch = self
            .paths
            .tmp_dir()
            .join(format!("kernel-{}", ids::random_hex(6)));
        std::fs::create_dir_all(&scratch)?;
        let work = scratch.clone();
        let modules = params.modules.clone().map(PathBuf::from);
        let unpacked =
            tokio::task::spawn_blocking(move || unpack(&source, modules.as_deref(), &work))
                .await
                .map_err(|e| OpError::internal(e.to_string()))?;
        let unpacked = match unpacked {
            Ok(u) => u,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&scratch);
                return Err(OpError::bad_content(format!(
                    "importing {}: {e}",
                    params.path
                )));
            }
        };
        let name = params
            .name
            .clone()
            .unwrap_or_else(|| unpacked.version.clone());
        if let Err(e) = crate::oci::reference::validate_name(&name) {
            let _ = std::fs::remove_dir_all(&scratch);
            return Err(OpError::invalid(format!("{e}; pass --name")));
        }
        if self.store.get_kernel(&name)?.is_some() {
            let _ = std::fs::remove_dir_all(&scratch);
            return Err(OpError::conflict(format!(
                "a kernel named `{name}` exists; pass --name, or run `banger kernel rm {name}` first"
            )));
        }
        let dir = self.kernels_dir().join(ids::random_hex(8));
        std::fs::create_dir_all(self.kernels_dir())?;
        let _ = std::fs::remove_file(scratch.join("data.tar"));
        std::fs::rename(&scratch, &dir)?;
        let first = self.store.list_kernels()?.is_empty();
        let info = KernelInfo {
            name,
            version: unpacked.version,
            source: unpacked.source.to_string(),
            vmlinux_path: dir.join("vmlinux").display().to_string(),
            modules_dir: unpacked
                .modules_rel
                .map(|r| dir.join(r).display().to_string()),
            config_path: unpacked
                .has_config
                .then(|| dir.join("config").display().to_string()),
            default: params.default || first,
            size_bytes: std::fs::metadata(dir.join("vmlinux"))
                .map(|m| m.len())
                .unwrap_or(0),
            created_at: ids::now_rfc3339(),
        };
        if let Err(e) = self.store.put_kernel(&info) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e.into());
        }
        Ok(info)
    }

    /// A short digest of the agent binary (cached by its file's identity):
    /// what names its initramfs, and makes a warm template stale.
    pub async fn agent_tag(&self, agent: &Path) -> OpResult<String> {
        let read_err = |e: std::io::Error| {
            OpError::internal(format!("reading the agent {}: {e}", agent.display()))
        };
        let file = AgentFile::of(agent).map_err(read_err)?;
        let known = self
            .agent_tags
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|(f, _)| *f == file)
            .map(|(_, tag)| tag.clone());
        if let Some(tag) = known {
            return Ok(tag);
        }
        let agent_bytes = tokio::fs::read(agent).await.map_err(read_err)?;
        let tag =
            crate::oci::digest::short(&crate::oci::digest::sha256_of(&agent_bytes)).to_string();
        *self.agent_tags.lock().unwrap_or_else(|p| p.into_inner()) = Some((file, tag.clone()));
        Ok(tag)
    }

    /// The kernel's initramfs for the given agent binary, built once and
    /// cached. Returns its bytes rather than its path: a build for another
    /// agent binary (an upgrade while VMs start) prunes the older file, and
    /// a file already open survives that.
    pub async fn initramfs(&self, kernel: &KernelInfo, agent: &Path) -> OpResult<Vec<u8>> {
        let tag = self.agent_tag(agent).await?;
        let dir = Path::new(&kernel.vmlinux_path)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let path = cached_initramfs(&dir, &tag);
        // Built before; if not (or pruned a moment ago) the slow path builds it.
        if let Ok(bytes) = tokio::fs::read(&path).await {
            return Ok(bytes);
        }
        let agent_bytes = tokio::fs::read(agent).await.map_err(|e| {
            OpError::internal(format!("reading the agent {}: {e}", agent.display()))
        })?;
        // Builds (and their pruning) happen under this lock, so a file read
        // under it stays put.
        let _guard = self.lock.lock().await;
        if let Ok(bytes) = tokio::fs::read(&path).await {
            return Ok(bytes);
        }
        let modules_dir = kernel.modules_dir.clone().map(PathBuf::from);
        tokio::task::spawn_blocking(move || -> Result<Vec<u8>, KernelError> {
            let modules = initramfs::resolve(modules_dir.as_deref(), initramfs::WANTED)?;
            let archive = initramfs::base_archive(&agent_bytes, &modules);
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, &archive).map_err(|e| e.to_string())?;
            std::fs::rename(&tmp, &path).map_err(|e| e.to_string())?;
            prune_initramfs(&path);
            Ok(archive)
        })
        .await
        .map_err(|e| OpError::internal(e.to_string()))?
        .map_err(|e| {
            OpError::internal(format!(
                "building the initramfs for kernel `{}`: {e}",
                kernel.name
            ))
        })
    }
}

struct Unpacked {
    version: String,
    source: &'static str,
    /// `modules/<version>` relative to the kernel dir.
    modules_rel: Option<PathBuf>,
    has_config: bool,
}

/// The largest file `kernel import` reads: a Debian kernel package is
/// ~100 MiB, a bzImage ~10 MiB, a vmlinux with debug info under 1 GiB.
pub const MAX_KERNEL_INPUT: u64 = 1 << 30;

/// The import source, whole: a regular file of a sane size. A device, FIFO
/// or socket (`/dev/zero`) would be read forever, so none is opened for
/// reading (a FIFO is opened non-blocking only to be looked at).
fn read_input(source: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let shown = source.display();
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(source)
        .map_err(|e| format!("{shown}: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("{shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!(
            "{shown} is not a regular file; import a .deb, a bzImage or a vmlinux file"
        ));
    }
    if meta.len() > MAX_KERNEL_INPUT {
        return Err(format!(
            "{shown} is {} MiB; a kernel is at most {} MiB",
            meta.len() >> 20,
            MAX_KERNEL_INPUT >> 20
        ));
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    // Bounded even if the file grows while it is read.
    (&mut file)
        .take(MAX_KERNEL_INPUT + 1)
        .read_to_end(&mut data)
        .map_err(|e| format!("{shown}: {e}"))?;
    if data.len() as u64 > MAX_KERNEL_INPUT {
        return Err(format!("{shown} grew past {} MiB", MAX_KERNEL_INPUT >> 20));
    }
    Ok(data)
}

/// Writes `vmlinux`, `config` and `modules/` into `dir`.
fn unpack(source: &Path, modules: Option<&Path>, dir: &Path) -> Result<Unpacked, KernelError> {
    let data = read_input(source)?;
    let (image, kind, mut version, config, mut modules_rel) = if deb::is_deb(&data) {
        drop(data);
        let k = deb::unpack(source, &dir.join("modules"), dir)?;
        let rel = k
            .modules_dir
            .as_ref()
            .and_then(|m| m.strip_prefix(dir).ok().map(Path::to_path_buf));
        (k.image, "deb", k.version, k.config, rel)
    } else if bzimage::is_bzimage(&data) {
        (data, "bzimage", None, None, None)
    } else if bzimage::is_elf(&data) {
        (data, "vmlinux", None, None, None)
    } else {
        return Err("not a Debian kernel package, a bzImage or an ELF vmlinux".into());
    };
    let vmlinux = if bzimage::is_bzimage(&image) {
        bzimage::extract_vmlinux(&image)?
    } else {
        image
    };
    if !bzimage::is_elf(&vmlinux) {
        return Err("the kernel image is not an ELF vmlinux".into());
    }
    if version.is_none() {
        version = bzimage::version_of(&vmlinux);
    }
    if let Some(src) = modules {
        let name = src
            .file_name()
            .ok_or("--modules must name lib/modules/<version>")?;
        let dest = dir.join("modules").join(name);
        copy_tree(src, &dest)
            .map_err(|e| format!("copying modules from {}: {e}", src.display()))?;
        modules_rel = Some(PathBuf::from("modules").join(name));
        version.get_or_insert_with(|| name.to_string_lossy().into_owned());
    }
    std::fs::write(dir.join("vmlinux"), &vmlinux).map_err(|e| e.to_string())?;
    if let Some(config) = &config {
        std::fs::write(dir.join("config"), config).map_err(|e| e.to_string())?;
    }
    Ok(Unpacked {
        version: version.unwrap_or_else(|| "unknown".into()),
        source: kind,
        modules_rel,
        has_config: config.is_some(),
    })
}

fn copy_tree(src: &Path, dest: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dest)?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let ty = entry.file_type()?;
        let to = dest.join(entry.file_name());
        if ty.is_dir() {
            copy_tree(&entry.path(), &to)?;
        } else if ty.is_file() {
            std::fs::copy(entry.path(), &to)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel_in(dir: &Path) -> KernelInfo {
        std::fs::write(dir.join("vmlinux"), b"not really a kernel").unwrap();
        KernelInfo {
            name: "k".into(),
            version: "6.1".into(),
            source: "vmlinux".into(),
            vmlinux_path: dir.join("vmlinux").to_string_lossy().into_owned(),
            modules_dir: None,
            config_path: None,
            default: true,
            size_bytes: 0,
            created_at: String::new(),
        }
    }

    fn cached(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("initramfs-"))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_new_agent_builds_anew_and_a_pruned_cache_is_rebuilt() {
        let home = tempfile::tempdir().unwrap();
        let kdir = home.path().join("kernel");
        std::fs::create_dir_all(&kdir).unwrap();
        let kernel = kernel_in(&kdir);
        let agent = home.path().join("banger-agent");
        let service = KernelService::new(
            Paths::under(home.path()),
            Arc::new(Store::open_in_memory().unwrap()),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);

        std::fs::write(&agent, b"agent one").unwrap();
        let one = rt.block_on(service.initramfs(&kernel, &agent)).unwrap();
        assert!(contains(&one, b"agent one"));
        let first = cached(&kdir);
        assert_eq!(first.len(), 1, "{first:?}");
        assert_eq!(
            std::fs::read(kdir.join(&first[0])).unwrap(),
            one,
            "the bytes are the cached file's"
        );

        // Another start for the same agent, after something pruned the
        // file it knows (a build for a newer agent): it builds again.
        std::fs::remove_file(kdir.join(&first[0])).unwrap();
        let again = rt.block_on(service.initramfs(&kernel, &agent)).unwrap();
        assert_eq!(again, one);
        assert_eq!(cached(&kdir), first);

        // An upgraded agent: its own archive, and the old one is pruned.
        std::fs::write(&agent, b"agent two, longer").unwrap();
        let two = rt.block_on(service.initramfs(&kernel, &agent)).unwrap();
        assert!(contains(&two, b"agent two, longer") && !contains(&two, b"agent one"));
        let second = cached(&kdir);
        assert_eq!(second.len(), 1, "{second:?}");
        assert_ne!(second, first);
    }
}
