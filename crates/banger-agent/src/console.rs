//! Lines on the serial console, which the host keeps as the VM's log.

pub fn log(line: &str) {
    // stderr is /dev/console for PID 1.
    eprintln!("banger-agent: {line}");
}
