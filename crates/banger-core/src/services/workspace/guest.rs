//! The guest end of workspace syncs, through the agent's `banger-tar`:
//! applying a sync stream, listing the tree, and sending paths back. The
//! guest is untrusted: what it sends back is applied with
//! `ApplyOptions::only`, which takes nothing the host did not ask for.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use banger_proto::vm::SyncProgress;

use banger_proto::agent::{ExecRequest, TAR_TOOL};
use banger_treecopy::stat::Stat;
use banger_treecopy::sync::{self, ApplyOptions, Item, Outcome};
use tokio::sync::{mpsc, oneshot};

use crate::vm::agent_client::{self, AgentSession, Input, Output};

/// Told how far a sync has got.
pub type Progress = Arc<dyn Fn(SyncProgress) + Send + Sync>;

/// Streams `items` (written from `host_dir`) into the guest's `dst`; what
/// became of each. `owner`: the guest user that owns what is written;
/// `progress`, if any, hears twice a second how much of `total_bytes` went.
pub async fn push(
    session: &AgentSession,
    host_dir: &Path,
    dst: &str,
    owner: Option<&str>,
    items: Vec<Item>,
    total_bytes: u64,
    progress: Option<Progress>,
) -> Result<Vec<Outcome>, String> {
    let count = items.len();
    let (tx, rx) = mpsc::channel(16);
    // Held until the command ends: a closed stdin channel reads as a caller
    // that hung up (the command would get SIGHUP).
    let _open = tx.clone();
    let host_dir = host_dir.to_path_buf();
    let sent = Arc::new(AtomicU64::new(0));
    let report = move |done: u64| SyncProgress {
        done_bytes: done,
        total_bytes,
        files: count as u64,
    };
    let ticker = progress.clone().map(|told| {
        let sent = sent.clone();
        tokio::spawn(async move {
            let every = std::time::Duration::from_millis(500);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tick.tick().await;
                told(report(sent.load(Ordering::Relaxed)));
            }
        })
    });
    let counted = sent.clone();
    let packing = tokio::task::spawn_blocking(move || {
        let writer = ChannelWriter(tx.clone(), counted);
        let mut out = std::io::BufWriter::with_capacity(256 << 10, writer);
        let packed = sync::pack(&host_dir, &items, &mut out).and_then(|()| out.flush());
        drop(out);
        let _ = tx.blocking_send(Input::StdinEof);
        packed
    });
    let mut argv = vec![TAR_TOOL.into(), "sync".into(), dst.into()];
    if let Some(user) = owner {
        argv.extend(["--owner".into(), user.into()]);
    }
    let stdout = run(session, argv, rx).await;
    if let Some(ticker) = ticker {
        ticker.abort();
    }
    let stdout = stdout?;
    packing
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("reading the workspace: {e}"))?;
    let outcomes = parse_lines::<Outcome>(&stdout)?;
    if outcomes.len() != count {
        return Err(format!(
            "the guest answered for {} of {count} entries",
            outcomes.len()
        ));
    }
    Ok(outcomes)
}

/// The guest's tree under `dir`.
pub async fn list(session: &AgentSession, dir: &str) -> Result<Vec<Stat>, String> {
    let (tx, rx) = mpsc::channel(1);
    tx.send(Input::StdinEof).await.map_err(|e| e.to_string())?;
    let stdout = run(
        session,
        vec![TAR_TOOL.into(), "list".into(), dir.into()],
        rx,
    )
    .await?;
    parse_lines(&stdout)
}

/// The guest's memory, load and the filesystems at `paths` (`vm stats`),
/// read by the agent in-process.
pub async fn stats(
    session: &AgentSession,
    paths: &[&str],
) -> Result<banger_proto::agent::GuestStats, String> {
    let (tx, rx) = mpsc::channel(1);
    tx.send(Input::StdinEof).await.map_err(|e| e.to_string())?;
    let mut argv = vec![TAR_TOOL.to_string(), "stats".into()];
    argv.extend(paths.iter().map(|p| p.to_string()));
    let stdout = run(session, argv, rx).await?;
    parse_lines(&stdout)?
        .pop()
        .ok_or_else(|| "the guest sent no stats".to_string())
}

/// Fetches `paths` from the guest's `dir` into `host_dir`, taking nothing
/// else; what became of each, in the order asked.
pub async fn fetch(
    session: &AgentSession,
    dir: &str,
    paths: &[String],
    host_dir: &Path,
) -> Result<Vec<Outcome>, String> {
    let (tx, rx) = mpsc::channel(4);
    let mut names = Vec::new();
    for p in paths {
        names.extend_from_slice(p.as_bytes());
        names.push(0);
    }
    tx.send(Input::Stdin(names))
        .await
        .map_err(|e| e.to_string())?;
    tx.send(Input::StdinEof).await.map_err(|e| e.to_string())?;
    // Unbounded, but never ahead of the applier by more than the flow window.
    let (chunks, reader) = std::sync::mpsc::channel::<(Vec<u8>, oneshot::Sender<()>)>();
    let options = ApplyOptions {
        owner: None,
        only: Some(paths.iter().cloned().collect::<HashSet<_>>()),
    };
    let into = host_dir.to_path_buf();
    let applying = tokio::task::spawn_blocking(move || {
        sync::apply(ChannelReader::new(reader), &into, &options)
    });
    let request = tar_request(vec![TAR_TOOL.into(), "send".into(), dir.into()]);
    let mut stderr = Vec::new();
    let status = session
        .exec(&request, None, rx, None, |out| {
            let (done, delivered) = oneshot::channel();
            match out {
                Output::Stdout(b) => {
                    // With the applier gone (it refused the stream) the
                    // rest is dropped, and so acknowledged.
                    let _ = chunks.send((b, done));
                }
                Output::Stderr(b) => {
                    stderr.extend_from_slice(&b);
                    let _ = done.send(());
                }
            }
            delivered
        })
        .await
        .map_err(|e| e.to_string());
    drop(chunks);
    let applied = applying.await.map_err(|e| e.to_string())?;
    let status = status?;
    if status.code != 0 {
        return Err(failed(status.code, &stderr));
    }
    let outcomes = applied.map_err(|e| format!("taking files from the guest: {e}"))?;
    if outcomes.len() != paths.len() {
        return Err(format!(
            "the guest sent {} of the {} paths asked for",
            outcomes.len(),
            paths.len()
        ));
    }
    Ok(outcomes)
}

/// `banger-tar` as root in the guest.
fn tar_request(argv: Vec<String>) -> ExecRequest {
    ExecRequest {
        argv,
        env: Vec::new(),
        cwd: None,
        user: Some("0".into()),
        // Credit-based, as `vm cp`: without it the stream piles up in the
        // guest faster than it is applied (a third slower for 20,000 files).
        flow: Some(agent_client::FLOW_WINDOW),
        detach: false,
    }
}

/// Runs `banger-tar` as root in the guest; its stdout.
async fn run(
    session: &AgentSession,
    argv: Vec<String>,
    stdin: mpsc::Receiver<Input>,
) -> Result<Vec<u8>, String> {
    let request = tar_request(argv);
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let status = session
        .exec(&request, None, stdin, None, |out| {
            match out {
                Output::Stdout(b) => stdout.extend_from_slice(&b),
                Output::Stderr(b) => stderr.extend_from_slice(&b),
            }
            let (done, delivered) = oneshot::channel();
            let _ = done.send(());
            delivered
        })
        .await
        .map_err(|e| e.to_string())?;
    if status.code != 0 {
        return Err(failed(status.code, &stderr));
    }
    Ok(stdout)
}

fn failed(code: i32, stderr: &[u8]) -> String {
    format!(
        "the guest's banger-tar exited with {code}: {}",
        String::from_utf8_lossy(stderr).trim()
    )
}

fn parse_lines<T: serde::de::DeserializeOwned>(out: &[u8]) -> Result<Vec<T>, String> {
    out.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            serde_json::from_slice(l)
                .map_err(|e| format!("an unreadable answer from the guest: {e}"))
        })
        .collect()
}

/// Stdin for the guest command, as the agent client takes it, counted.
struct ChannelWriter(mpsc::Sender<Input>, Arc<AtomicU64>);

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Input::Stdin(buf.to_vec()))
            .map_err(|_| std::io::Error::other("the guest stopped reading"))?;
        self.1.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The guest command's stdout as a reader; each chunk is acknowledged once
/// read, so the guest sends no further ahead than the flow window.
struct ChannelReader {
    chunks: std::sync::mpsc::Receiver<(Vec<u8>, oneshot::Sender<()>)>,
    current: std::io::Cursor<Vec<u8>>,
}

impl ChannelReader {
    fn new(chunks: std::sync::mpsc::Receiver<(Vec<u8>, oneshot::Sender<()>)>) -> ChannelReader {
        ChannelReader {
            chunks,
            current: Default::default(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let n = self.current.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            match self.chunks.recv() {
                Ok((chunk, done)) => {
                    let _ = done.send(());
                    self.current = std::io::Cursor::new(chunk);
                }
                Err(_) => return Ok(0),
            }
        }
    }
}
