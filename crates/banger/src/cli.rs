//! The command line, as clap sees it.

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "banger",
    version,
    about = "Disposable, fast, isolated microVMs from OCI images",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the banger daemon in the foreground.
    Daemon,
    /// Manage images: pull OCI images and keep their root filesystems.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Manage guest kernels.
    #[command(subcommand)]
    Kernel(KernelCommand),
    /// Check that this machine can run banger, and say how to fix what is wrong.
    Doctor(JsonFlag),
}

#[derive(Debug, Subcommand)]
pub enum KernelCommand {
    /// Import a kernel: a linux-image-*.deb, a bzImage or an ELF vmlinux.
    Import {
        path: std::path::PathBuf,
        /// Name to record the kernel under (default: its version).
        #[arg(long)]
        name: Option<String>,
        /// The kernel's lib/modules/VERSION directory (for a bzImage or vmlinux).
        #[arg(long)]
        modules: Option<std::path::PathBuf>,
        /// Use this kernel when a VM names none.
        #[arg(long)]
        default: bool,
        #[arg(long)]
        json: bool,
    },
    /// List kernels.
    #[command(alias = "list")]
    Ls(JsonFlag),
    /// Show kernels in detail, as a JSON array.
    Inspect {
        #[arg(required = true)]
        names: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Remove kernels.
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
        #[arg(short, long)]
        force: bool,
    },
}

#[derive(Debug, Args)]
pub struct JsonFlag {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Pull an image from a registry and flatten it into an ext4 root filesystem.
    Pull {
        /// Image reference, e.g. `alpine`, `ghcr.io/owner/repo:tag`, `repo@sha256:…`.
        reference: String,
        /// Name to record the image under (default: derived from the reference).
        #[arg(long)]
        name: Option<String>,
        /// Platform to pick from a multi-platform image, as os/arch[/variant].
        #[arg(long)]
        platform: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List images.
    #[command(alias = "list")]
    Ls(JsonFlag),
    /// Show images in detail, as a JSON array.
    Inspect {
        #[arg(required = true)]
        names: Vec<String>,
        /// Accepted for symmetry: inspect always prints JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove images and their root filesystems.
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
        /// Remove images even when in use, and ignore names that do not exist.
        #[arg(short, long)]
        force: bool,
    },
    /// Manage the layer blob cache.
    #[command(subcommand)]
    Cache(CacheCommand),
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Delete every cached layer blob (images already pulled do not need them).
    Prune {
        /// Report what would be freed without deleting anything.
        #[arg(long)]
        dry_run: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}
