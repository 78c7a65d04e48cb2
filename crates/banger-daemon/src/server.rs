//! Accept loop and per-connection request handling.

use std::future::Future;
use std::os::fd::AsFd;
use std::sync::Arc;

use banger_core::caller::CallerFeed;
use banger_core::error::OpError;
use banger_core::events::{Emitted, Events};
use banger_core::ids;
use banger_core::ops::Core;
use banger_proto::rpc::RawRequest;
use banger_proto::{ErrorBody, ErrorCode, Frame};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
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

    // A second handle on the socket, only to notice the caller hanging up
    // while its input is not being read.
    let hangup_probe = write
        .as_ref()
        .as_fd()
        .try_clone_to_owned()
        .map(std::os::unix::net::UnixStream::from)
        .and_then(|s| {
            s.set_nonblocking(true)?;
            UnixStream::from_std(s)
        });
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
    let raw = match RawRequest::from_json(&line) {
        Ok(r) => r,
        Err(e) => {
            let frame = reject(ErrorCode::BadRequest, e.to_string());
            let _ = write.write_all(&frame.to_line()).await;
            return;
        }
    };
    let span = tracing::info_span!("rpc", op_id = %op_id, method = %raw.method);
    async move {
        tracing::info!("request");
        let started = std::time::Instant::now();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // Lines after the request (exec stdin, signals) feed the operation
        // through a small queue; hanging up is watched apart from it.
        let (feed, input) = banger_core::caller::channel();
        let feed = Arc::new(feed);
        tokio::spawn(watch_hangup(hangup_probe, feed.clone()));
        tokio::spawn(read_input(reader, feed.clone()));
        let work = async {
            let request = raw.typed().map_err(OpError::from)?;
            core.handle(request, Events::new(tx), Some(input)).await
        };
        // Frames are written by their own task, so an operation never waits
        // on a slow or stopped reader (an exec's SSH channel must be
        // drained whatever its caller does).
        let (finished, finish) = tokio::sync::oneshot::channel();
        let writer = tokio::spawn(write_events(write, rx, finish));
        let outcome = work.await;
        let _ = finished.send(());
        let Ok(mut write) = writer.await else {
            return;
        };
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
        // Done: the input reader and the hang-up watch end with the request.
        feed.hang_up();
    }
    .instrument(span)
    .await
}

/// Resolves the caller's hang-up: the socket reports its peer closed
/// (EPOLLRDHUP), whether or not its data has been read.
async fn watch_hangup(probe: std::io::Result<UnixStream>, feed: Arc<CallerFeed>) {
    let Ok(probe) = probe else {
        return;
    };
    loop {
        match probe.ready(Interest::READABLE).await {
            Ok(ready) if ready.is_read_closed() => break,
            Ok(_) => {
                // Data only: clear this handle's readiness and wait for the
                // next change (the reader has its own registration).
                let _ = probe.try_io(Interest::READABLE, || {
                    Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
                });
                tokio::select! {
                    () = feed.hung_up() => return,
                    () = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
                }
            }
            Err(_) => break,
        }
    }
    feed.hang_up();
}

/// Reads the caller's lines into the operation's queue, at the pace the
/// operation takes them.
async fn read_input(reader: BufReader<OwnedReadHalf>, feed: Arc<CallerFeed>) {
    let mut lines = reader.lines();
    loop {
        let line = tokio::select! {
            line = lines.next_line() => line,
            () = feed.hung_up() => return,
        };
        let Ok(Some(line)) = line else {
            feed.hang_up();
            return;
        };
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        tokio::select! {
            sent = feed.lines.send(value) => if sent.is_err() { return },
            () = feed.hung_up() => return,
        }
    }
}

/// Writes event frames as they come; tells each tracked one's sender once
/// it is written (or dropped for a reader that left). Returns the socket
/// once `finished` fires and the queue is empty.
async fn write_events(
    mut write: OwnedWriteHalf,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Emitted>,
    mut finished: tokio::sync::oneshot::Receiver<()>,
) -> OwnedWriteHalf {
    let mut writable = true;
    loop {
        let event = tokio::select! {
            biased;
            event = rx.recv() => match event {
                Some(event) => event,
                None => break,
            },
            _ = &mut finished => {
                while let Ok(event) = rx.try_recv() {
                    put(&mut write, &mut writable, event).await;
                }
                break;
            }
        };
        put(&mut write, &mut writable, event).await;
    }
    write
}

/// Writes one event frame unless the caller already left.
async fn put(write: &mut OwnedWriteHalf, writable: &mut bool, event: Emitted) {
    // A caller that went away does not cancel the work.
    if *writable
        && write
            .write_all(&Frame::Event(event.value).to_line())
            .await
            .is_err()
    {
        *writable = false;
    }
    if let Some(done) = event.delivered {
        let _ = done.send(());
    }
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
        // Tests of what happens meanwhile name a step that takes 5 s.
        if let Ok(step) = std::env::var("BANGER_TEST_SLOW_AT") {
            banger_core::steps::set_slow_point(&step, std::time::Duration::from_secs(5));
        }
        let runner = Arc::new(banger_host::RealRunner);
        let core = Arc::new(Core::open(paths.clone(), runner, Default::default())?);
        // Failure tests name a step of create, start or snapshot to fail.
        if let Ok(step) = std::env::var("BANGER_TEST_FAIL_AT") {
            core.vms.set_fail_point(Some(&step));
        }
        let socket = paths.socket();
        let listener = super::socket::bind(&socket)?;
        tracing::info!(socket = %socket.display(), pid = std::process::id(), "banger daemon listening");
        tokio::spawn(
            core.upkeep
                .clone()
                .sync_user_keys(std::time::Duration::from_secs(3)),
        );
        tokio::spawn(
            core.upkeep
                .clone()
                .cap_console_logs(std::time::Duration::from_secs(5)),
        );
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("installing a SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        };
        serve(core.clone(), listener, shutdown).await;
        let _ = std::fs::remove_file(&socket);
        let exiting = core.clone();
        let _ = tokio::task::spawn_blocking(move || exiting.on_exit()).await;
        tracing::info!("banger daemon stopped");
        Ok(())
    })
}
