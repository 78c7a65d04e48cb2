//! QEMU's machine protocol (QMP): pausing and resuming a guest, saving its
//! state for a snapshot, and asking whether it is stopped and why. QEMU
//! stops a guest whose disk write hit ENOSPC (`werror=enospc`, its default)
//! rather than fail the write, and the process then looks alive while
//! nothing in the guest runs.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

/// How long one status question may take: `vm ls` asks every running VM.
const TIMEOUT: Duration = Duration::from_millis(500);

/// One QMP connection, past the greeting and capability negotiation.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Qmp, String> {
        let short = super::sockpath::SockPath::new(socket).map_err(|e| e.to_string())?;
        // A QEMU just launched may have bound its socket and not yet be
        // listening (refused), or not have bound it yet: asked again, briefly.
        let deadline = std::time::Instant::now() + timeout.min(Duration::from_secs(5));
        let stream = loop {
            match UnixStream::connect(short.path()) {
                Ok(stream) => break stream,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                    ) && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => return Err(format!("connecting to QEMU's QMP socket: {e}")),
            }
        };
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|_| stream.set_write_timeout(Some(timeout)))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let mut greeting = String::new();
        qmp.reader
            .read_line(&mut greeting)
            .map_err(|e| format!("reading QMP's greeting: {e}"))?;
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Runs one command; its `return` value, or QEMU's error text.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, String> {
        let mut request = json!({ "execute": command });
        if let Some(args) = arguments {
            request["arguments"] = args;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| format!("QMP {command}: {e}"))?;
        let mut answer = String::new();
        // Events may arrive before the answer.
        for _ in 0..256 {
            answer.clear();
            if self
                .reader
                .read_line(&mut answer)
                .map_err(|e| format!("QMP {command}: {e}"))?
                == 0
            {
                return Err(format!("QMP {command}: QEMU closed the connection"));
            }
            let value: Value = serde_json::from_str(&answer)
                .map_err(|e| format!("QMP {command}: unreadable answer: {e}"))?;
            if let Some(ret) = value.get("return") {
                return Ok(ret.clone());
            }
            if let Some(error) = value.get("error") {
                let desc = error["desc"].as_str().unwrap_or("unknown error");
                return Err(format!("QEMU refused {command}: {desc}"));
            }
        }
        Err(format!("QMP {command}: no answer"))
    }

    /// The run status (`running`, `paused`, `io-error`, …).
    pub fn status(&mut self) -> Result<String, String> {
        let ret = self.execute("query-status", None)?;
        ret["status"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| "QMP query-status: no status".into())
    }
}

/// The VM's run status, or None when QMP does not answer.
pub fn status(socket: &Path) -> Option<String> {
    Qmp::connect(socket, TIMEOUT).ok()?.status().ok()
}

/// What a status other than running means for the user, if anything.
pub fn problem(status: &str) -> Option<&'static str> {
    match status {
        // Paused by banger (`vm pause`, a snapshot being written): the
        // runtime record says so, not as a problem.
        "running" | "paused" | "prelaunch" | "inmigrate" | "finish-migrate" | "postmigrate"
        | "save-vm" | "restore-vm" => None,
        "io-error" => Some("paused: a disk write failed, most likely because the filesystem holding the VM's disks is full"),
        "internal-error" | "guest-panicked" => Some("stopped by an internal error or a guest panic"),
        _ => Some("stopped by QEMU"),
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
