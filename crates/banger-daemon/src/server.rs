//! Accept loop and per-connection request handling.

use std::future::Future;
use std::sync::Arc;

use banger_core::events::Events;
use banger_core::ids;
use banger_core::ops::Core;
use banger_proto::{ErrorBody, ErrorCode, Frame, Request};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::Instrument;

/// Longest request line accepted; requests are small JSON objects.
const MAX_REQUEST_BYTES: u64 = 1024 * 1024;

/// Serves connections until `shutdown` completes.
pub async fn serve(core: Arc<Core>, listener: UnixListener, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let core = core.clone();
                    tokio::spawn(async move { handle(core, stream).await });
                }
                Err(e) => tracing::warn!(error = %e, "accept failed"),
            },
        }
    }
}

async fn handle(core: Arc<Core>, stream: UnixStream) {
    let op_id = format!("op-{}", ids::random_hex(6));
    let (read, mut write) = stream.into_split();
    let peer = super::peer::peer_uid(&write.as_ref());
    let reject = |code, message: String| {
        Frame::Error(ErrorBody {
            code,
            message,
            op_id: op_id.clone(),
        })
    };
    match peer {
        Ok(uid) if super::peer::allowed(uid) => {}
        other => {
            tracing::warn!(op_id = %op_id, peer = ?other.ok(), "refused a connection from another user");
            let frame = reject(
                ErrorCode::PermissionDenied,
                "this banger daemon belongs to another user".into(),
            );
            // Take the request off the wire first (briefly, bounded), so closing
            // does not reset the connection before the caller reads the refusal.
            let mut discard = String::new();
            let mut reader = BufReader::new(read).take(MAX_REQUEST_BYTES);
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(1),
                reader.read_line(&mut discard),
            )
            .await;
            let _ = write.write_all(&frame.to_line()).await;
            return;
        }
    }

    let mut line = String::new();
    let mut reader = BufReader::new(read);
    if (&mut reader)
        .take(MAX_REQUEST_BYTES)
        .read_line(&mut line)
        .await
        .unwrap_or(0)
        == 0
    {
        return;
    }
    let request: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            let frame = reject(ErrorCode::BadRequest, format!("malformed request: {e}"));
            let _ = write.write_all(&frame.to_line()).await;
            return;
        }
    };

    let span = tracing::info_span!("rpc", op_id = %op_id, method = %request.method);
    async move {
        tracing::info!("request");
        let started = std::time::Instant::now();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // Lines after the request (exec stdin, signals) feed the operation;
        // the channel closes when the caller hangs up.
        let (input_tx, input_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = reader.lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<serde_json::Value>(&line) {
                    Ok(v) => {
                        if input_tx.send(v).is_err() {
                            return;
                        }
                    }
                    Err(_) => continue,
                }
            }
        });
        let work = core.dispatch_with_input(
            &request.method,
            request.params,
            Events::new(tx),
            Some(input_rx),
        );
        tokio::pin!(work);
        let mut writable = true;
        let outcome = loop {
            tokio::select! {
                outcome = &mut work => break outcome,
                Some(event) = rx.recv() => {
                    // A caller that went away does not cancel the work.
                    if writable && write.write_all(&Frame::Event(event).to_line()).await.is_err() {
                        writable = false;
                    }
                }
            }
        };
        while let Ok(event) = rx.try_recv() {
            if writable {
                let _ = write.write_all(&Frame::Event(event).to_line()).await;
            }
        }
        let frame = match outcome {
            Ok(value) => {
                tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "done");
                Frame::Result(value)
            }
            Err(e) => {
                tracing::warn!(code = ?e.code, error = %e.message, "failed");
                Frame::Error(ErrorBody {
                    code: e.code,
                    message: e.message,
                    op_id: op_id.clone(),
                })
            }
        };
        let _ = write.write_all(&frame.to_line()).await;
        let _ = write.shutdown().await;
    }
    .instrument(span)
    .await
}

/// Runs the daemon in the foreground until SIGINT or SIGTERM.
pub fn run(paths: banger_core::paths::Paths) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let _lock = super::socket::lock(&paths.runtime_dir)?;
        // Crash tests name a step at which the daemon SIGKILLs itself.
        if let Ok(step) = std::env::var("BANGER_TEST_KILL_AT") {
            banger_core::steps::set_kill_point(&step);
        }
        let runner = Arc::new(banger_host::RealRunner);
        let core = Arc::new(Core::open(paths.clone(), runner, Default::default())?);
        let socket = paths.socket();
        let listener = super::socket::bind(&socket)?;
        tracing::info!(socket = %socket.display(), pid = std::process::id(), "banger daemon listening");
        tokio::spawn(
            core.vms
                .clone()
                .sync_user_keys(std::time::Duration::from_secs(3)),
        );
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("installing a SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        };
        serve(core, listener, shutdown).await;
        let _ = std::fs::remove_file(&socket);
        tracing::info!("banger daemon stopped");
        Ok(())
    })
}
