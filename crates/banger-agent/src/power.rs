//! Orderly power-off: stop processes, flush, unmount, then leave the VM.

use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub fn shutdown() -> ! {
    crate::console::log("shutting down");
    // Everyone but us: ask, give them a moment, then insist.
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    nix::unistd::sync();
    for target in ["/work", "/"] {
        let flags = if target == "/" {
            nix::mount::MsFlags::MS_REMOUNT | nix::mount::MsFlags::MS_RDONLY
        } else {
            nix::mount::MsFlags::empty()
        };
        if target == "/" {
            let _ = nix::mount::mount(None::<&str>, "/", None::<&str>, flags, None::<&str>);
        } else {
            let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    nix::unistd::sync();
    // The VMMs run with "reboot means exit" (QEMU -no-reboot; Firecracker exits).
    let _ = reboot(RebootMode::RB_AUTOBOOT);
    let _ = reboot(RebootMode::RB_POWER_OFF);
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// A fatal boot failure: say why on the console, then leave.
pub fn fail(stage: &str, error: &str) -> ! {
    crate::console::log(&format!("boot failed at {stage}: {error}"));
    std::thread::sleep(std::time::Duration::from_millis(200));
    nix::unistd::sync();
    let _ = reboot(RebootMode::RB_AUTOBOOT);
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}
