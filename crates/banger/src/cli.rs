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
    /// Drive the daemon on another machine, over SSH:
    /// ssh://[user@]host[:port] (or set BANGER_HOST).
    #[arg(long, global = true, value_name = "URL")]
    pub host: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The daemon: run it in the foreground (the default), stop it, or ask
    /// whether one is running.
    Daemon(DaemonArgs),
    /// Manage images: pull OCI images and keep their root filesystems.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Manage guest kernels.
    #[command(subcommand)]
    Kernel(KernelCommand),
    /// Create, run and manage VMs.
    #[command(subcommand)]
    Vm(VmCommand),
    /// List, inspect and remove VM snapshots (taken by `banger vm snapshot`).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Check that this machine can run banger, and say how to fix what is wrong.
    Doctor(JsonFlag),
    /// Print the `Include` line that makes plain `ssh NAME.vm`, scp and sftp work.
    SshConfig(JsonFlag),
    /// Install banger as services: the root helper (system) and the daemon (user).
    #[command(subcommand)]
    System(SystemCommand),
    /// Print the shell completion script: `source <(banger completion bash)`
    /// (VM, image, kernel and snapshot names come from the daemon).
    Completion {
        #[arg(value_enum)]
        shell: CompletionShell,
        /// The banger the script runs for completions (default: this one;
        /// a package names where it installs banger).
        #[arg(long, hide = true)]
        bin: Option<std::path::PathBuf>,
    },
    /// Write banger's man pages (one per command) into DIR.
    Man { dir: std::path::PathBuf },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    #[command(subcommand)]
    pub command: Option<DaemonCommand>,
}

#[derive(Debug, Subcommand)]
pub enum DaemonCommand {
    /// Run the daemon in the foreground (what `banger daemon` alone does).
    Run,
    /// Stop the daemon cleanly; running VMs keep running, and the next
    /// daemon (started by any command) takes them back.
    Stop(JsonFlag),
    /// Whether a daemon is running, and its pid, version and socket.
    /// Exit status 3 when none is.
    Status(JsonFlag),
    /// Join standard input and output to the daemon's socket (starting a
    /// daemon when none runs): how `--host ssh://…` reaches this machine.
    DialStdio,
}
#[derive(Debug, Subcommand)]
pub enum SystemCommand {
    /// Install the root helper's system unit, the daemon's user unit, a
    /// root-owned binary and the `banger` group (run with sudo).
    Install(SystemInstallArgs),
    /// Remove what `system install` wrote; users' VMs and images are kept.
    Uninstall(SystemUninstallArgs),
}

#[derive(Debug, Args)]
pub struct SystemInstallArgs {
    /// The user who runs banger (default: the user behind sudo).
    #[arg(long)]
    pub user: Option<String>,
    /// Write the files but do not start the helper.
    #[arg(long)]
    pub no_start: bool,
    /// Install into this directory instead of / (for packaging and tests).
    #[arg(long, hide = true)]
    pub root: Option<std::path::PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SystemUninstallArgs {
    #[arg(long, hide = true)]
    pub root: Option<std::path::PathBuf>,
    #[arg(long)]
    pub json: bool,
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
    /// Pull a kernel published as an OCI image (/boot/vmlinu[xz]*, /lib/modules/*).
    Pull {
        reference: String,
        /// Name to record the kernel under (default: its version).
        #[arg(long)]
        name: Option<String>,
        /// Use this kernel when a VM names none.
        #[arg(long)]
        default: bool,
        #[arg(long)]
        json: bool,
    },
    /// List kernels.
    #[command(alias = "list")]
    Ls(LsFlags),
    /// Show kernels in detail, as a JSON array.
    Inspect {
        #[arg(required = true)]
        names: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Remove kernels (`-f`: even kernels VMs or snapshots use).
    #[command(alias = "remove")]
    Rm(RmArgs),
}

#[derive(Debug, Args)]
pub struct JsonFlag {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct LsFlags {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Print names only, one per line.
    #[arg(short, long, conflicts_with = "json")]
    pub quiet: bool,
}

/// `rm NAME… [-f] [--json]`, the same for every kind of thing.
#[derive(Debug, Args)]
pub struct RmArgs {
    #[arg(required = true)]
    pub names: Vec<String>,
    /// Remove even what is in use (see each command's help), and ignore
    /// names that do not exist.
    #[arg(short, long)]
    pub force: bool,
    /// Print the removed names as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Boot an image once and keep the ready VM as its warm template:
    /// `vm run --image IMAGE` with the same settings then forks it instead
    /// of booting (a fraction of a boot; `--cold` boots anyway).
    Warm {
        image: String,
        /// The kernel to boot (default: the default kernel).
        #[arg(long)]
        kernel: Option<String>,
        /// Virtual CPUs (default 2; at most the host's CPUs).
        #[arg(long)]
        vcpus: Option<u32>,
        /// Memory, e.g. 512M or 1G (a bare number is MiB, as `vm ls` shows it).
        #[arg(long)]
        memory: Option<String>,
        #[arg(long)]
        json: bool,
    },
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
    /// Import an image without a registry: a `docker save`/`podman save`
    /// archive, an OCI archive or an OCI layout directory; `-` reads the
    /// archive from stdin (`podman save alpine | banger image import -`).
    Import {
        path: String,
        /// Name to record it under (default: from the archive's tag).
        #[arg(long)]
        name: Option<String>,
        /// Platform to take from a multi-platform layout, as os/arch[/variant].
        #[arg(long)]
        platform: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List images, with the VMs that use each.
    #[command(alias = "list")]
    Ls(LsFlags),
    /// Show images in detail, as a JSON array.
    Inspect {
        #[arg(required = true)]
        names: Vec<String>,
        /// Accepted for symmetry: inspect always prints JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove images and their root filesystems (`-f`: even images VMs use).
    #[command(alias = "remove")]
    Rm(RmArgs),
    /// Remove the images no VM or snapshot uses (warm templates go with them).
    Prune {
        /// Say what would be removed, and remove nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
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

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// List snapshots.
    #[command(alias = "list")]
    Ls(LsFlags),
    /// Show snapshots in detail, as a JSON array.
    Inspect {
        #[arg(required = true)]
        names: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Remove snapshots and their files (`-f`: even snapshots that VMs made
    /// from them have yet to resume; those boot from their disks instead).
    #[command(alias = "remove")]
    Rm(RmArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The VM's name: a DNS label (lowercase letters, digits, `-`).
    pub name: String,
    /// The image to boot (see `banger image ls`).
    #[arg(long, required_unless_present = "from")]
    pub image: Option<String>,
    /// Make the VM from a snapshot (`banger snapshot ls`): a fork with the
    /// snapshot's image, sizes and disks, which resumes where the snapshot
    /// was taken (if its VM was running) as a machine of its own.
    #[arg(long, value_name = "SNAPSHOT", conflicts_with = "image")]
    pub from: Option<String>,
    /// Boot, even when the image has a warm template for these settings
    /// (`banger image warm`).
    #[arg(long)]
    pub cold: bool,
    /// When to pull `--image` from its registry: `missing` (no local image
    /// has that name or reference), `always` (pull, which is quick when
    /// nothing changed) or `never`.
    #[arg(long, value_enum, default_value = "missing", value_name = "WHEN")]
    pub pull: PullPolicy,
    /// The kernel to boot (default: the default kernel).
    #[arg(long)]
    pub kernel: Option<String>,
    /// Virtual CPUs (default 2; at most the host's CPUs).
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Memory, e.g. 512M or 1G (a bare number is MiB, as `vm ls` shows it).
    #[arg(long)]
    pub memory: Option<String>,
    /// Root disk size, e.g. 8G (at least the image's size); with the
    /// overlay root mode, the room for what the VM writes over its image.
    #[arg(long)]
    pub disk: Option<String>,
    /// Work disk size, e.g. 16G (default 8G): the disk at /work, where a
    /// workspace lands.
    #[arg(long, value_name = "SIZE")]
    pub work_disk: Option<String>,
    /// How the root filesystem is made: overlay (the image shared read-only,
    /// writes on the VM's own disk), dm-snapshot, reflink or copy. Default:
    /// the best the host and kernel support (see `banger doctor`).
    #[arg(long, value_name = "MODE")]
    pub root_mode: Option<banger_proto::domain::RootMode>,
    /// qemu or firecracker.
    #[arg(long)]
    pub vmm: Option<banger_proto::domain::VmmKind>,
    /// CPU time the VM may use, as a percentage of one host CPU (150 is one
    /// and a half CPUs); enforced by the jailer's cgroup, so Firecracker
    /// with the jailer only.
    #[arg(long, value_name = "PERCENT")]
    pub cpu_quota: Option<u32>,
    /// A host directory (your project) mirrored into the VM's work disk and
    /// synced before every `vm exec` (see docs/workspaces.md).
    #[arg(long, value_name = "DIR")]
    pub workspace: Option<std::path::PathBuf>,
    /// Where the workspace lands in the guest (default /work).
    #[arg(long, value_name = "PATH")]
    pub workspace_path: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub create: CreateArgs,
    /// Run the image's own command (its Entrypoint and Cmd) once the VM is
    /// ready, as `docker run IMAGE` does.
    #[arg(long, conflicts_with_all = ["command", "json"])]
    pub run_default: bool,
    /// Remove the VM when its command exits (with the command's status).
    #[arg(long)]
    pub rm: bool,
    /// Allocate a terminal for the command (default: when stdin and stdout
    /// are terminals).
    #[arg(short = 't', long = "tty")]
    pub tty: bool,
    /// A command to run once the VM is ready; its output is streamed and
    /// its exit status is banger's. The VM keeps running (unless --rm).
    #[arg(last = true, conflicts_with = "json")]
    pub command: Vec<String>,
}

/// `vm run/create --pull`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PullPolicy {
    Missing,
    Always,
    Never,
}

/// Which side `vm sync --force` lets win.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SyncSideArg {
    Host,
    Guest,
}

impl From<SyncSideArg> for banger_proto::vm::SyncSide {
    fn from(side: SyncSideArg) -> Self {
        match side {
            SyncSideArg::Host => banger_proto::vm::SyncSide::Host,
            SyncSideArg::Guest => banger_proto::vm::SyncSide::Guest,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Create a VM (its disks and keys) without starting it.
    Create(CreateArgs),
    /// Create a VM and start it; with `-- CMD…` (or --run-default) run a
    /// command in it once ready, like `docker run`.
    Run(RunArgs),
    /// Start stopped VMs (several at once, in parallel).
    Start {
        #[arg(required = true)]
        names: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Stop VMs: a clean shutdown through each agent, forced after the timeout.
    Stop {
        #[arg(required = true)]
        names: Vec<String>,
        /// Seconds to wait for the clean shutdown.
        #[arg(short = 't', long = "time", default_value_t = 10)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// Stop then start VMs.
    Restart {
        #[arg(required = true)]
        names: Vec<String>,
        /// Seconds to wait for the clean shutdown.
        #[arg(short = 't', long = "time", default_value_t = 10)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// Remove VMs and everything they own (`-f`: stop running VMs first).
    #[command(alias = "remove")]
    Rm(RmArgs),
    /// Change a stopped VM's vCPUs, memory or disk sizes (disks only grow;
    /// the guest sees them at its next boot).
    Set {
        name: String,
        /// Virtual CPUs (at most the host's CPUs).
        #[arg(long)]
        vcpus: Option<u32>,
        /// Memory, e.g. 1G (a bare number is MiB, as `vm ls` shows it).
        #[arg(long)]
        memory: Option<String>,
        /// The root disk's new size, e.g. 16G (never smaller).
        #[arg(long)]
        disk: Option<String>,
        /// The work disk's new size, e.g. 32G (never smaller).
        #[arg(long, value_name = "SIZE")]
        work_disk: Option<String>,
        /// A new CPU quota, percent of one host CPU (Firecracker with the
        /// jailer); 0 removes it.
        #[arg(long, value_name = "PERCENT")]
        cpu_quota: Option<u32>,
        /// A running VM: stop it, change it, start it again.
        #[arg(long)]
        restart: bool,
        #[arg(long)]
        json: bool,
    },
    /// What VMs use: CPU, memory (host and guest), load, disks, network.
    Stats {
        /// The VMs to show (default: all).
        names: Vec<String>,
        /// Refresh every second until Ctrl-C.
        #[arg(short, long)]
        watch: bool,
        /// One JSON array (with --watch, one per line each round).
        #[arg(long)]
        json: bool,
    },
    /// Remove every stopped VM (asks first unless -f).
    Prune {
        /// Say what would be removed, and remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Do not ask.
        #[arg(short, long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// List VMs.
    #[command(alias = "ps", alias = "list")]
    Ls {
        #[command(flatten)]
        flags: LsFlags,
        /// Only VMs that match: `state=running|paused|stopped`,
        /// `image=NAME`, `name=PREFIX`, `vmm=qemu|firecracker` (repeat to
        /// require several).
        #[arg(long, value_name = "KEY=VALUE")]
        filter: Vec<String>,
    },
    /// Show VMs in detail, as a JSON array.
    Inspect {
        #[arg(required = true)]
        names: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Forward a host port to a port inside a VM, until Ctrl-C.
    PortForward {
        name: String,
        /// `[HOSTIP:]HOSTPORT:GUESTPORT`; HOSTIP defaults to 127.0.0.1,
        /// HOSTPORT 0 picks a free port.
        spec: String,
        #[arg(long)]
        json: bool,
    },
    /// Join standard input and output to a TCP port inside a VM (for ssh's
    /// ProxyCommand; what `ssh-config` with --host writes).
    Dial { name: String, port: u16 },
    /// Show a VM's serial console.
    Logs {
        name: String,
        /// Keep printing new output until the VM stops.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines.
        #[arg(long)]
        tail: Option<usize>,
        /// `{"text": …}`; with --follow, one such object per line as output comes.
        #[arg(long)]
        json: bool,
    },
    /// Copy files and directories between the host and a VM (recursive,
    /// modes kept): `SRC… NAME:DST` or `NAME:SRC DST`; `-` is a tar stream
    /// on stdin or stdout.
    Cp {
        #[arg(required = true, num_args = 2..)]
        paths: Vec<String>,
    },
    /// Pause a running VM: its vCPUs stop; memory and devices stay.
    Pause {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Let a paused VM run again.
    Resume {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Save a VM as a snapshot: a running VM's memory and devices too, all
    /// at one instant; a stopped VM's disks. `banger vm restore` goes back
    /// to it, `banger vm run NEW --from SNAPSHOT` forks it.
    Snapshot {
        name: String,
        snapshot: String,
        /// Stop the VM once the snapshot is written.
        #[arg(long)]
        stop: bool,
        #[arg(long)]
        json: bool,
    },
    /// Take a VM back to one of its snapshots; what it is now is discarded.
    Restore {
        name: String,
        snapshot: String,
        #[arg(long)]
        json: bool,
    },
    /// Sync the VM's workspace now: the host's changes into the guest, or
    /// with --pull the guest's changes back to the host. A path changed on
    /// both sides is a conflict and is left alone unless --force picks a side.
    Sync {
        name: String,
        /// Guest to host: bring back what the guest changed.
        #[arg(long)]
        pull: bool,
        /// Settle conflicts for this side: host or guest.
        #[arg(long, value_name = "SIDE")]
        force: Option<SyncSideArg>,
        #[arg(long)]
        json: bool,
    },
    /// An interactive login shell in a VM.
    Ssh {
        name: String,
        /// User name or uid[:gid] in the guest.
        #[arg(short = 'u', long = "user")]
        user: Option<String>,
    },
    /// Run a command in a VM.
    Exec {
        name: String,
        /// Allocate a terminal (default: when stdin and stdout are terminals).
        #[arg(short = 't', long = "tty", conflicts_with = "no_tty")]
        tty: bool,
        /// Never allocate a terminal.
        #[arg(long = "no-tty")]
        no_tty: bool,
        /// Working directory in the guest.
        #[arg(short = 'w', long = "workdir")]
        workdir: Option<String>,
        /// Environment variables, KEY=VALUE (KEY alone: the host's value).
        #[arg(short = 'e', long = "env")]
        env: Vec<String>,
        /// Environment variables from a file, one KEY=VALUE per line.
        #[arg(long = "env-file", value_name = "FILE")]
        env_file: Vec<std::path::PathBuf>,
        /// User name or uid[:gid] in the guest.
        #[arg(short = 'u', long = "user")]
        user: Option<String>,
        /// Run without first syncing the VM's workspace.
        #[arg(long = "no-sync")]
        no_sync: bool,
        /// Start the command and return: print its pid; its output goes to
        /// a log in the VM (under /var/log/banger).
        #[arg(short = 'd', long, conflicts_with = "tty")]
        detach: bool,
        /// With -d: print `{"pid", "log"}`.
        #[arg(long, requires = "detach")]
        json: bool,
        /// The command and its arguments, passed unchanged.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

/// The command as clap builds it, with the shell completers attached.
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    crate::completion::annotate(describe_json(Cli::command()))
}

/// Every `--json` says the same, written once here.
fn describe_json(cmd: clap::Command) -> clap::Command {
    let bare = cmd
        .get_arguments()
        .any(|a| a.get_id() == "json" && a.get_help().is_none());
    let cmd = if bare {
        cmd.mut_arg("json", |a| {
            a.help("Print the result as JSON (a failure too, as {\"error\": …})")
        })
    } else {
        cmd
    };
    let subs: Vec<String> = cmd
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    subs.into_iter()
        .fold(cmd, |cmd, sub| cmd.mut_subcommand(&sub, describe_json))
}

#[cfg(test)]
mod tests {
    /// The commands whose output is a stream, not a result: a terminal,
    /// bytes for another program, or a script.
    const STREAMS: &[&str] = &[
        "banger daemon run",
        "banger daemon dial-stdio",
        "banger vm dial",
        "banger vm cp",
        "banger vm ssh",
        "banger completion",
        "banger man",
    ];

    fn leaves(cmd: &clap::Command, path: String, out: &mut Vec<(String, clap::Command)>) {
        let path = format!("{path} {}", cmd.get_name()).trim().to_string();
        let subs: Vec<_> = cmd
            .get_subcommands()
            .filter(|s| s.get_name() != "help")
            .collect();
        if subs.is_empty() {
            out.push((path.clone(), cmd.clone()));
        }
        for s in subs {
            leaves(s, path.clone(), out);
        }
    }

    fn has(cmd: &clap::Command, id: &str) -> bool {
        cmd.get_arguments().any(|a| a.get_id() == id)
    }

    #[test]
    fn the_command_line_is_consistent() {
        super::command().debug_assert();
    }

    /// The CLI's conventions hold for every command, new ones included:
    /// each that prints a result takes `--json` (and no stream does), each
    /// `ls` takes `-q`, and every option says what it does.
    #[test]
    fn every_result_has_json_every_list_quiet_and_every_option_help() {
        let mut all = Vec::new();
        leaves(&super::command(), String::new(), &mut all);
        let mut missing = Vec::new();
        for (path, cmd) in &all {
            let streams = STREAMS.contains(&path.as_str());
            if streams == has(cmd, "json") {
                missing.push(format!("{path}: json {}", has(cmd, "json")));
            }
            if cmd.get_name() == "ls" && !has(cmd, "quiet") {
                missing.push(format!("{path}: no -q"));
            }
            for arg in cmd.get_arguments() {
                if !arg.is_positional() && !arg.is_hide_set() && arg.get_help().is_none() {
                    missing.push(format!("{path} --{}: no help", arg.get_id()));
                }
            }
        }
        assert!(missing.is_empty(), "{missing:#?}");
        assert!(all.len() > 40, "{} commands", all.len());
    }
}
