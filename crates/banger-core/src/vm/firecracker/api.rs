//! A minimal client for Firecracker's HTTP API on its Unix socket. Errors come
//! back as `{"fault_message": …}` and are surfaced verbatim. Every request is
//! bounded: a wedged Firecracker fails the call instead of hanging `vm start`
//! or `vm stop`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use banger_proto::http1::HeadReader;

use crate::vm::vmm::VmmError;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// How long a configuration or action request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Writing or loading a snapshot moves the guest's memory at disk speed.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

/// One VM's API socket, named for errors by the VM it serves.
pub struct Api {
    pub socket: PathBuf,
    pub vm: String,
}

impl Api {
    /// The API of the Firecracker serving the VM directory `dir` (whose
    /// name is the VM's).
    pub fn of(dir: &Path, socket: PathBuf) -> Api {
        Api {
            socket,
            vm: dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }

    /// `PUT path` with a JSON body; Ok on a 2xx answer.
    pub async fn put(&self, path: &str, body: &serde_json::Value) -> Result<(), VmmError> {
        self.call("PUT", path, Some(body), REQUEST_TIMEOUT).await
    }

    /// `PATCH path` with a JSON body; Ok on a 2xx answer.
    pub async fn patch(&self, path: &str, body: &serde_json::Value) -> Result<(), VmmError> {
        self.call("PATCH", path, Some(body), REQUEST_TIMEOUT).await
    }

    /// A request allowed `limit` to answer.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        limit: Duration,
    ) -> Result<(), VmmError> {
        match tokio::time::timeout(limit, request(&self.socket, method, path, body)).await {
            Ok(answer) => answer.map(drop).map_err(VmmError::Api),
            Err(_) => Err(VmmError::Api(format!(
                "firecracker of VM `{}` did not answer {method} {path} within {}s",
                self.vm,
                limit.as_secs()
            ))),
        }
    }
}

/// Waits until the API socket accepts connections, or `alive` says the
/// process died, or `timeout` passes.
pub async fn wait_for_socket(
    socket: &Path,
    timeout: Duration,
    alive: impl Fn() -> bool,
) -> Result<(), VmmError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let short = crate::vm::sockpath::SockPath::new(socket)
        .map_err(VmmError::connect("reaching firecracker's API socket"))?;
    loop {
        if UnixStream::connect(short.path()).await.is_ok() {
            return Ok(());
        }
        if !alive() {
            return Err(VmmError::Api(
                "firecracker exited before its API socket was up".into(),
            ));
        }
        if tokio::time::Instant::now() > deadline {
            return Err(VmmError::Api(format!(
                "firecracker's API socket {} did not come up within {}s",
                socket.display(),
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One API call; its answer's body on a 2xx status.
async fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<String, String> {
    let short = crate::vm::sockpath::SockPath::new(socket).map_err(|e| e.to_string())?;
    let mut stream = UnixStream::connect(short.path())
        .await
        .map_err(|e| format!("connecting to firecracker's API: {e}"))?;
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
    if body.is_some() {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            payload.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(&payload);
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    let mut head = HeadReader::default();
    let head = loop {
        let mut line = String::new();
        if reader
            .read_line(&mut line)
            .await
            .map_err(|e| e.to_string())?
            == 0
        {
            return Err("firecracker closed its API connection without answering".into());
        }
        if let Some(head) = head.line(&line) {
            break head;
        }
    };
    let status = head
        .status()
        .ok_or_else(|| format!("bad response from firecracker: {:?}", head.start))?;
    let mut body = vec![0u8; head.content_length];
    reader
        .read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&body).into_owned();
    if (200..300).contains(&status) {
        return Ok(text);
    }
    let fault = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["fault_message"].as_str().map(str::to_owned))
        .unwrap_or(text);
    Err(format!(
        "firecracker refused {method} {path} ({status}): {fault}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_firecracker_that_never_answers_fails_the_call_naming_the_vm_and_request() {
        let dir = tempfile::tempdir().unwrap();
        let vm_dir = dir.path().join("web");
        std::fs::create_dir(&vm_dir).unwrap();
        let socket = vm_dir.join("fc.sock");
        // Accepts and reads, never answers: a wedged VMM.
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let api = Api::of(&vm_dir, socket);
        let err = api
            .call(
                "PUT",
                "/actions",
                Some(&serde_json::json!({"action_type": "InstanceStart"})),
                Duration::from_millis(200),
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("VM `web`") && err.contains("PUT /actions") && err.contains("within"),
            "{err}"
        );
    }
}
