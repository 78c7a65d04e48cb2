//! The CLI's side of the protocol: connect (starting a daemon when none
//! listens), send one request, read events until the result.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use anyhow::Context;
use banger_core::paths::Paths;
use banger_proto::{ErrorBody, Frame, Method, Request};

use crate::remote::Remote;

#[derive(Debug)]
pub enum CallError {
    /// The daemon answered with an error.
    Daemon(ErrorBody),
    /// Talking to the daemon failed.
    Transport(anyhow::Error),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Daemon(e) => write!(f, "{} (op {})", e.message, e.op_id),
            CallError::Transport(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for CallError {}

pub struct Client {
    paths: Paths,
    /// The daemon is on another machine (`--host`).
    remote: Option<Remote>,
}

impl Client {
    pub fn new(paths: Paths) -> Client {
        Client {
            paths,
            remote: None,
        }
    }

    /// A client of the daemon `remote` names, or of this machine's.
    pub fn with_remote(paths: Paths, remote: Option<Remote>) -> Client {
        Client { paths, remote }
    }

    pub fn remote(&self) -> Option<&Remote> {
        self.remote.as_ref()
    }

    /// A path argument as the daemon must get it: this machine's file,
    /// made absolute (it must exist when `existing`); with `--host`, a
    /// path on that host, which must be absolute already.
    pub fn daemon_path(
        &self,
        what: &str,
        path: &std::path::Path,
        existing: bool,
    ) -> anyhow::Result<String> {
        if let Some(remote) = &self.remote {
            if !path.is_absolute() {
                anyhow::bail!(
                    "{what} {}: with --host it names a path on {}; give it whole (/…)",
                    path.display(),
                    remote.host
                );
            }
            return Ok(path.display().to_string());
        }
        let abs = if existing {
            std::fs::canonicalize(path)
        } else {
            std::path::absolute(path)
        };
        abs.map(|p| p.display().to_string())
            .map_err(|e| anyhow::anyhow!("{what} {}: {e}", path.display()))
    }

    /// Connects to a running daemon only (a remote one is started there
    /// as its own commands would).
    pub fn connect_existing(&self) -> std::io::Result<UnixStream> {
        match &self.remote {
            Some(remote) => remote.connect().map_err(std::io::Error::other),
            None => UnixStream::connect(self.paths.socket()),
        }
    }

    /// Connects, starting a daemon in the background when none is listening.
    pub fn connect(&self) -> anyhow::Result<UnixStream> {
        if let Some(remote) = &self.remote {
            return remote.connect();
        }
        if let Ok(stream) = self.connect_existing() {
            return Ok(stream);
        }
        // A daemon would read this first and exit at once: say why here,
        // instead of waiting for a socket that never comes.
        if let Err(e) = banger_core::config::Config::load_with_env(&self.paths.config_file()) {
            return Err(anyhow::Error::new(e)
                .context("no daemon runs, and none can start until its config file is fixed"));
        }
        self.start_daemon()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.connect_existing() {
                Ok(stream) => return Ok(stream),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => {
                    return Err(anyhow::anyhow!(
                        "the daemon did not start listening on {} ({e}); see {}",
                        self.paths.socket().display(),
                        self.paths.daemon_log().display()
                    ))
                }
            }
        }
    }

    fn start_daemon(&self) -> anyhow::Result<()> {
        self.paths
            .create_all()
            .context("creating banger's directories")?;
        let log_path = self.paths.daemon_log();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let exe = std::env::current_exe().context("finding the banger executable")?;
        let child = std::process::Command::new(exe)
            .arg("daemon")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own session: the daemon outlives this command and its terminal.
            .process_group(0)
            .spawn()
            .context("starting the daemon")?;
        eprintln!(
            "banger: no daemon was running; started one in the background (pid {}, log {})",
            child.id(),
            log_path.display()
        );
        Ok(())
    }

    /// Sends one request of method `M`; `on_event` sees each progress event.
    pub fn call<M: Method>(
        &self,
        params: M::Params,
        on_event: impl FnMut(M::Event),
    ) -> Result<M::Result, CallError> {
        let stream = self.connect().map_err(CallError::Transport)?;
        call_on::<M>(stream, params, on_event).map_err(|e| self.via(e))
    }

    /// A transport failure through `--host` names the host: ssh's own
    /// message (on stderr, just above) says why.
    fn via(&self, e: CallError) -> CallError {
        match (e, &self.remote) {
            // Nothing came back at all: most often ssh itself failed (a
            // refused connection, a failed login), not a daemon.
            (CallError::Transport(e), Some(remote)) if e.downcast_ref::<NoAnswer>().is_some() => {
                CallError::Transport(anyhow::anyhow!(
                    "no answer from {}: ssh could not connect or log in there (its message is \
                     above), or `banger` is not installed on it (BANGER_REMOTE_COMMAND names it)",
                    remote.url()
                ))
            }
            (CallError::Transport(e), Some(remote)) => CallError::Transport(e.context(format!(
                "reaching banger's daemon on {} through ssh (ssh's message, if any, is above)",
                remote.url()
            ))),
            (e, _) => e,
        }
    }

    /// Like [`Client::call`], and once the request is sent `feed` gets a
    /// writer for the lines that follow it (exec stdin, signals), on its own thread.
    pub fn call_streaming<M: Method>(
        &self,
        params: M::Params,
        on_event: impl FnMut(M::Event),
        feed: impl FnOnce(UnixStream) + Send + 'static,
    ) -> Result<M::Result, CallError> {
        let stream = self.connect().map_err(CallError::Transport)?;
        let writer = stream
            .try_clone()
            .context("cloning the daemon connection")
            .map_err(CallError::Transport)?;
        call_inner::<M>(
            stream,
            M::request(params),
            on_event,
            Some(Box::new(move || feed(writer))),
        )
        .map_err(|e| self.via(e))
    }
}

type Feeder = Box<dyn FnOnce() + Send>;

/// Sends one request of method `M` on an open connection.
pub fn call_on<M: Method>(
    stream: UnixStream,
    params: M::Params,
    on_event: impl FnMut(M::Event),
) -> Result<M::Result, CallError> {
    call_inner::<M>(stream, M::request(params), on_event, None)
}

fn call_inner<M: Method>(
    mut stream: UnixStream,
    request: Request,
    mut on_event: impl FnMut(M::Event),
    feeder: Option<Feeder>,
) -> Result<M::Result, CallError> {
    let line = request.to_line();
    // A daemon that refuses the caller answers before reading the request, so a
    // failed write may still be followed by a readable answer.
    let sent = stream.write_all(&line);
    if let (Ok(()), Some(feed)) = (&sent, feeder) {
        std::thread::spawn(feed);
    }
    let reader = BufReader::new(stream);
    for line in reader.lines() {
        let line = match line {
            Ok(line) => line,
            Err(_) if sent.is_err() => break,
            Err(e) => {
                return Err(CallError::Transport(
                    anyhow::Error::new(e).context("reading from the daemon"),
                ))
            }
        };
        let frame: Frame = serde_json::from_str(&line)
            .with_context(|| format!("unreadable reply from the daemon: {line}"))
            .map_err(CallError::Transport)?;
        match frame {
            // An event this CLI does not know (a newer daemon's) is skipped.
            Frame::Event(event) => {
                if let Ok(event) = serde_json::from_value(event) {
                    on_event(event)
                }
            }
            Frame::Result(value) => {
                return serde_json::from_value(value)
                    .with_context(|| format!("unreadable result of {} from the daemon", M::NAME))
                    .map_err(CallError::Transport)
            }
            Frame::Error(body) => return Err(CallError::Daemon(body)),
        }
    }
    if let Err(e) = sent {
        return Err(CallError::Transport(
            anyhow::Error::new(e).context("sending the request to the daemon"),
        ));
    }
    Err(CallError::Transport(anyhow::Error::new(NoAnswer)))
}

/// The connection ended before any answer: a local daemon that died, or
/// (through `--host`) an ssh that never got through.
#[derive(Debug, thiserror::Error)]
#[error("the daemon closed the connection without answering (did it crash? see its log)")]
struct NoAnswer;
