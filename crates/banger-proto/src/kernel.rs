//! Params and results of the `kernel.*` methods.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ImportParams {
    /// Absolute path of a `linux-image-*.deb`, a bzImage or an ELF vmlinux.
    pub path: String,
    #[serde(default)]
    pub name: Option<String>,
    /// Absolute path of `lib/modules/<version>` for a bzImage or vmlinux.
    #[serde(default)]
    pub modules: Option<String>,
    /// Make this the kernel VMs use when none is named.
    #[serde(default)]
    pub default: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelInfo {
    pub name: String,
    pub version: String,
    /// `deb`, `bzimage` or `vmlinux`.
    pub source: String,
    /// Absolute path of the uncompressed ELF kernel.
    pub vmlinux_path: String,
    /// Absolute path of `lib/modules/<version>`, when modules came with it.
    pub modules_dir: Option<String>,
    pub config_path: Option<String>,
    pub default: bool,
    pub size_bytes: u64,
    pub created_at: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PullParams {
    /// An OCI image holding /boot/vmlinux* or /boot/vmlinuz*, and /lib/modules/*.
    pub reference: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub default: bool,
}
