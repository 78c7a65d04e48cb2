//! A minimal client for Firecracker's HTTP API on its Unix socket. Errors come
//! back as `{"fault_message": …}` and are surfaced verbatim.

use std::path::Path;
use std::time::Duration;

use banger_proto::http1::HeadReader;

use crate::vm::vmm::VmmError;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

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
                "firecracker's API socket {} did not come up",
                socket.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `PUT path` with a JSON body; Ok on a 2xx answer.
pub async fn put(socket: &Path, path: &str, body: &serde_json::Value) -> Result<(), VmmError> {
    request(socket, "PUT", path, Some(body))
        .await
        .map(|_| ())
        .map_err(VmmError::Api)
}

/// `PATCH path` with a JSON body; Ok on a 2xx answer.
pub async fn patch(socket: &Path, path: &str, body: &serde_json::Value) -> Result<(), VmmError> {
    request(socket, "PATCH", path, Some(body))
        .await
        .map(|_| ())
        .map_err(VmmError::Api)
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
