//! banger-agent: PID 1 of every banger VM.
//!
//! Run by the kernel from banger's initramfs, it loads the virtio modules,
//! mounts the VM's root disk and switches into it, then serves SSH to the host
//! over the transport the VMM offers and reports readiness on a control
//! channel. It reaps orphans like any init and powers the VM off on request.

mod console;
mod exec;
mod guest_stats;
mod identity;
mod init;
mod net;
mod power;
mod prefetch;
mod reaper;
mod sftp;
mod ssh;
mod tar_tool;
mod transport;
mod warm;

/// Names under which the agent's binary runs as one of its own tools (from
/// `/proc/self/exe`, so every image has them).
pub const OWN_TOOLS: [&str; 2] = [banger_proto::agent::TAR_TOOL, warm::TOOL];

fn main() {
    let argv0 = std::env::args().next().unwrap_or_default();
    // By name, wherever it was run from (a copy or link in the guest too).
    let argv0 = argv0.rsplit('/').next().unwrap_or_default().to_string();
    if argv0 == banger_proto::agent::TAR_TOOL {
        std::process::exit(tar_tool::main(std::env::args().skip(1).collect()));
    }
    if argv0 == warm::TOOL {
        return;
    }
    if std::process::id() != 1 {
        eprintln!(
            "banger-agent runs as PID 1 inside a banger VM; it is not meant to be started by hand"
        );
        std::process::exit(2);
    }
    init::main();
}
