//! Just enough of QEMU's machine protocol (QMP) to ask whether a running VM
//! is paused and why: QEMU stops a guest whose disk write hit ENOSPC
//! (`werror=enospc`, its default) rather than fail the write, and the
//! process then looks alive while nothing in the guest runs.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How long one status question may take: `vm ls` asks every running VM.
const TIMEOUT: Duration = Duration::from_millis(500);

/// The VM's run status (`running`, `paused`, `io-error`, …), or None when
/// QMP does not answer.
pub fn status(socket: &Path) -> Option<String> {
    let short = super::sockpath::SockPath::new(socket).ok()?;
    let stream = UnixStream::connect(short.path()).ok()?;
    stream.set_read_timeout(Some(TIMEOUT)).ok()?;
    stream.set_write_timeout(Some(TIMEOUT)).ok()?;
    let mut writer = stream.try_clone().ok()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?; // The greeting.
    writer
        .write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-status\"}\n")
        .ok()?;
    let mut answers = 0;
    for _ in 0..16 {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let value: serde_json::Value = serde_json::from_str(&line).ok()?;
        // Events may arrive between the answers.
        let Some(ret) = value.get("return") else {
            continue;
        };
        answers += 1;
        if answers == 2 {
            return ret.get("status")?.as_str().map(str::to_string);
        }
    }
    None
}

/// What a status other than running means for the user, if anything.
pub fn problem(status: &str) -> Option<&'static str> {
    match status {
        "running" | "prelaunch" | "inmigrate" | "finish-migrate" | "postmigrate" => None,
        "io-error" => Some("paused: a disk write failed, most likely because the filesystem holding the VM's disks is full"),
        "internal-error" | "guest-panicked" => Some("stopped by an internal error or a guest panic"),
        _ => Some("paused"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asks_for_the_status_past_events() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qmp.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut w = stream.try_clone().unwrap();
            w.write_all(b"{\"QMP\": {\"version\": {}}}\n").unwrap();
            let mut r = BufReader::new(stream);
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            w.write_all(b"{\"return\": {}}\n").unwrap();
            r.read_line(&mut l).unwrap();
            w.write_all(b"{\"event\": \"BLOCK_IO_ERROR\"}\n{\"return\": {\"status\": \"io-error\", \"running\": false}}\n").unwrap();
        });
        assert_eq!(status(&socket).as_deref(), Some("io-error"));
        server.join().unwrap();
        assert!(problem("io-error").unwrap().contains("full"));
        assert!(problem("running").is_none());
        assert_eq!(status(&dir.path().join("none.sock")), None);
    }
}
