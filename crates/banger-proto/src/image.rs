//! Params, results and progress events of the `image.*` methods.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PullParams {
    /// Image reference as the user typed it (`alpine`, `ghcr.io/o/r:tag`, `r@sha256:…`).
    pub reference: String,
    /// Record name; derived from the reference when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// `os/arch[/variant]`; the host platform when absent.
    #[serde(default)]
    pub platform: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PullResult {
    pub image: ImageInfo,
    /// True when the recorded image already matched the registry and nothing was done.
    pub up_to_date: bool,
}

/// The parts of an OCI image config a VM needs to run the image's process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub workdir: String,
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
}

/// One recorded image, as `image.list` and `image.inspect` return it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub name: String,
    /// Fully qualified reference (`docker.io/library/alpine:latest`).
    pub r#ref: String,
    /// Digest of the image manifest that was flattened.
    pub digest: String,
    /// Absolute path of the image's ext4 root filesystem.
    pub rootfs_path: String,
    /// Size of the ext4 file in bytes.
    pub size_bytes: u64,
    /// Bytes of file content in the flattened tree.
    pub content_bytes: u64,
    pub config: ImageConfig,
    /// RFC 3339 UTC time of the pull that produced this rootfs.
    pub created_at: String,
    /// The VMs made from this image (under its name, from this pull or an
    /// earlier one they still keep): `image rm` refuses while any are left.
    #[serde(default)]
    pub vms: Vec<String>,
}

/// `image.import`: an image from a file instead of a registry.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ImageImportParams {
    /// Absolute path of a docker archive (`docker save`), an OCI archive or
    /// an OCI layout directory.
    pub path: String,
    /// Name to record it under (default: from the tag the archive names).
    #[serde(default)]
    pub name: Option<String>,
    /// os/arch[/variant] to take from a multi-platform layout.
    #[serde(default)]
    pub platform: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NamesParams {
    pub names: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RemoveParams {
    pub names: Vec<String>,
    /// Also remove images that are in use, and ignore names that do not exist.
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RemoveResult {
    pub removed: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PruneParams {
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PruneResult {
    pub bytes_freed: u64,
    pub blobs_freed: u64,
    pub dry_run: bool,
    pub cache_dir: String,
}

/// Progress of an `image.pull`, streamed as events before its result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PullEvent {
    /// The reference resolved to a manifest with these layers.
    Resolved {
        r#ref: String,
        digest: String,
        layers: Vec<LayerSummary>,
    },
    /// Bytes of a layer arrived (sent at most a few times a second per layer).
    LayerProgress {
        digest: String,
        done: u64,
        total: u64,
    },
    /// A layer is complete; `cached` when it came from the blob cache.
    LayerDone { digest: String, cached: bool },
    /// A step after the downloads: `flatten`, `ext4`, `ownership`.
    Step { step: String },
    /// The recorded image already matches the registry.
    UpToDate { digest: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerSummary {
    pub digest: String,
    pub size: u64,
}
