//! The image service: pull, list, inspect, remove, and the blob cache prune.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::locks::{KeyGuard, KeyedLocks};

use banger_host::ProcessRunner;
use banger_proto::image::{
    ImageInfo, PruneResult, PullEvent, PullParams, PullResult, RemoveResult,
};

use crate::config::Config;
use crate::error::{OpError, OpResult};
use crate::events::Events;
use crate::oci::blobs::BlobCache;
use crate::oci::prune;
use crate::paths::Paths;
use crate::store::Store;
use crate::suggest;

pub use super::pull::PullHooks;

/// Tells which VMs use an image; `image rm` refuses those without `--force`.
pub type ImageUsers = Arc<dyn Fn(&str) -> Vec<String> + Send + Sync>;

pub struct ImageService {
    pub(super) paths: Paths,
    pub(super) config: Config,
    pub(super) store: Arc<Store>,
    pub(super) runner: Arc<dyn ProcessRunner>,
    pub(super) blobs: Arc<BlobCache>,
    name_locks: KeyedLocks,
    pub(super) hooks: PullHooks,
    users: ImageUsers,
}

impl ImageService {
    pub fn new(
        paths: Paths,
        config: Config,
        store: Arc<Store>,
        runner: Arc<dyn ProcessRunner>,
    ) -> ImageService {
        ImageService {
            blobs: Arc::new(BlobCache::new(paths.oci_cache())),
            paths,
            config,
            store,
            runner,
            name_locks: KeyedLocks::default(),
            hooks: PullHooks::default(),
            users: Arc::new(|_| Vec::new()),
        }
    }

    pub fn with_hooks(mut self, hooks: PullHooks) -> Self {
        self.hooks = hooks;
        self
    }

    pub fn with_users(mut self, users: ImageUsers) -> Self {
        self.users = users;
        self
    }

    /// Clears what a killed daemon may have left: pull scratch dirs, prune
    /// aside dirs, and image dirs no record points at.
    pub fn recover(&self) -> anyhow::Result<()> {
        let tmp = self.paths.tmp_dir();
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        prune::clean_leftovers(&self.paths.oci_cache());
        crate::rootfs::staging::clean_leftovers(&self.paths.state_dir.display().to_string());
        // Images' root filesystems, and those snapshot VMs layer over.
        let origins: Vec<String> = self
            .store
            .list_vms()?
            .into_iter()
            .filter_map(|v| v.origin)
            .collect();
        let known: Vec<PathBuf> = self
            .store
            .list_images()?
            .into_iter()
            .map(|i| i.rootfs_path)
            .chain(origins)
            .filter_map(|p| Path::new(&p).parent().map(Path::to_path_buf))
            .collect();
        if let Ok(entries) = std::fs::read_dir(self.paths.images_dir()) {
            for entry in entries.flatten() {
                if !known.contains(&entry.path()) {
                    tracing::info!(dir = %entry.path().display(), "removing orphaned image directory");
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        Ok(())
    }

    pub(crate) async fn lock_name(&self, name: &str) -> KeyGuard {
        self.name_locks.lock(name).await
    }

    pub async fn pull(
        &self,
        params: PullParams,
        events: Events<PullEvent>,
    ) -> OpResult<PullResult> {
        super::pull::pull(self, params, events).await
    }

    pub async fn import(
        &self,
        params: banger_proto::image::ImageImportParams,
        events: Events<PullEvent>,
    ) -> OpResult<PullResult> {
        super::import::import(self, params, events).await
    }

    pub fn list(&self) -> OpResult<Vec<ImageInfo>> {
        Ok(self
            .store
            .list_images()?
            .into_iter()
            .map(|i| self.with_vms(i))
            .collect())
    }

    fn with_vms(&self, mut image: ImageInfo) -> ImageInfo {
        image.vms = (self.users)(&image.name);
        image
    }

    fn not_found(&self, name: &str) -> OpError {
        let all = self.store.list_images().unwrap_or_default();
        let hint = match suggest::closest(name, all.iter().map(|i| i.name.as_str())) {
            Some(near) => format!("; did you mean `{near}`?"),
            None => "; `banger image ls` lists images, `banger image pull REF` adds one".into(),
        };
        OpError::not_found(format!("no image named `{name}`{hint}"))
    }

    pub fn inspect(&self, names: &[String]) -> OpResult<Vec<ImageInfo>> {
        names
            .iter()
            .map(|name| {
                self.store
                    .get_image(name)?
                    .map(|i| self.with_vms(i))
                    .ok_or_else(|| self.not_found(name))
            })
            .collect()
    }

    /// Removes records and their root filesystems. Every name is checked before
    /// anything is removed, so a refusal changes nothing.
    pub async fn remove(&self, names: &[String], force: bool) -> OpResult<RemoveResult> {
        let mut guards = Vec::new();
        let mut doomed = Vec::new();
        for name in names {
            guards.push(self.lock_name(name).await);
            match self.store.get_image(name)? {
                None if force => {}
                None => return Err(self.not_found(name)),
                Some(image) => {
                    let users = (self.users)(name);
                    if !users.is_empty() && !force {
                        return Err(OpError::conflict(format!(
                            "image `{name}` is used by VM(s) {}; remove them first or pass -f",
                            users.join(", ")
                        )));
                    }
                    doomed.push(image);
                }
            }
        }
        let mut removed = Vec::new();
        for image in doomed {
            self.store.delete_image(&image.name)?;
            self.drop_rootfs(&image.rootfs_path);
            removed.push(image.name);
        }
        Ok(RemoveResult { removed })
    }

    /// Deletes an image's directory, only ever inside the images dir.
    /// Removes an image's rootfs unless a dm-snapshot VM layers over it;
    /// that VM's removal drops it later ([`release_origin`](Self::release_origin)).
    pub(super) fn drop_rootfs(&self, rootfs_path: &str) {
        match self.store.vms_with_origin(rootfs_path) {
            Ok(users) if users.is_empty() => self.remove_rootfs(rootfs_path),
            Ok(users) => tracing::info!(
                rootfs = rootfs_path,
                vms = %users.join(", "),
                "keeping the old root filesystem: snapshot VMs layer over it"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "keeping a root filesystem: cannot tell who uses it")
            }
        }
    }

    /// A snapshot VM that layered over `rootfs` is gone: the rootfs goes too
    /// when no image and no other VM still names it.
    pub fn release_origin(&self, rootfs: &str) {
        let named = self
            .store
            .list_images()
            .map(|images| images.iter().any(|i| i.rootfs_path == rootfs))
            .unwrap_or(true);
        if !named {
            self.drop_rootfs(rootfs);
        }
    }

    pub(super) fn remove_rootfs(&self, rootfs_path: &str) {
        let Some(dir) = Path::new(rootfs_path).parent() else {
            return;
        };
        if dir.parent() == Some(self.paths.images_dir().as_path()) {
            if let Err(e) = std::fs::remove_dir_all(dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "could not remove image directory");
            }
        }
    }

    pub async fn prune_cache(&self, dry_run: bool) -> OpResult<PruneResult> {
        let dir = self.blobs.root().to_path_buf();
        tokio::task::spawn_blocking(move || prune::prune(&dir, dry_run))
            .await
            .map_err(|e| OpError::internal(e.to_string()))?
            .map_err(|e| OpError::internal(format!("pruning the blob cache: {e}")))
    }
}
