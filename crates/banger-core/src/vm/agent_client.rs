//! The daemon's side of the guest agent: waiting for its readiness report,
//! and one pinned SSH connection per running VM over which commands run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_proto::agent::{
    AgentReport, ExecRequest, HostMessage, Identity, AGENT_PROTOCOL, EXEC_PREFIX, FLOW_ACK, HOLD,
    SET_USER_KEYS,
};
use russh::client::{self, Handle};
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, Sig};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

/// Key exchange for the daemon's own link, which is local (a socket the VMM
/// serves, never a network): plain X25519. The post-quantum hybrid russh
/// prefers costs the guest's CPU (emulated, before KVM) a good part of the
/// boot for protection against recorded traffic that never crosses a wire.
const LOCAL_KEX: &[russh::kex::Name] = &[
    russh::kex::CURVE25519,
    russh::kex::EXTENSION_SUPPORT_AS_CLIENT,
    russh::kex::EXTENSION_OPENSSH_STRICT_KEX_AS_CLIENT,
];

/// Bytes of one command's output the agent may send ahead of the caller,
/// and of its stdin the daemon may send ahead of the command.
pub const FLOW_WINDOW: u32 = 1 << 20;

/// Largest stdin chunk sent at once (it must fit the flow window).
const STDIN_CHUNK: usize = 32 * 1024;

/// The command the agent treats as "power off cleanly".
pub const POWEROFF: &str = "banger-poweroff";

/// Where readiness reports come from: a socket to connect to, or one we
/// listen on for the guest's connection.
pub enum Ctl {
    Connect(std::path::PathBuf),
    Listener(tokio::net::UnixListener),
}

#[derive(Debug)]
pub struct BootFailure {
    /// The last stage the agent reported, or where the host was waiting.
    pub stage: String,
    pub message: String,
}

/// Reads agent reports from the control socket until `ready`. Fails when the
/// agent reports a failure, the VMM dies, or `timeout` passes.
pub async fn wait_ready(
    ctl: Ctl,
    timeout: Duration,
    vmm_alive: impl Fn() -> bool,
    on_stage: impl FnMut(&str),
) -> Result<(), BootFailure> {
    wait_ready_as(ctl, Give::Nothing, timeout, vmm_alive, on_stage).await
}

/// Whether [`wait_ready_as`] gives the agent an identity.
#[derive(Clone, Copy)]
pub enum Give<'a> {
    Nothing,
    /// A restored guest: whatever the agent says first, it is sent this.
    Always(&'a Identity),
    /// A running guest: sent only if a snapshot left it held (a guest that
    /// is not would see its network bounced for nothing).
    IfHeld(&'a Identity),
}

/// [`wait_ready`] with an identity to give: once the agent's first report is
/// in, the identity is sent, and only a `ready` given after the agent took
/// it counts (the first report is what it said before the snapshot).
pub async fn wait_ready_as(
    ctl: Ctl,
    give: Give<'_>,
    timeout: Duration,
    vmm_alive: impl Fn() -> bool,
    mut on_stage: impl FnMut(&str),
) -> Result<(), BootFailure> {
    let deadline = Instant::now() + timeout;
    let mut stage = "launch".to_string();
    let fail = |stage: &str, message: String| BootFailure {
        stage: stage.to_string(),
        message,
    };
    let stream = match ctl {
        Ctl::Connect(path) => loop {
            let short = crate::vm::sockpath::SockPath::new(&path);
            let connected = match &short {
                Ok(short) => tokio::net::UnixStream::connect(short.path()).await,
                Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
            };
            match connected {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline && vmm_alive() => {
                    tokio::time::sleep(Duration::from_millis(2)).await
                }
                Err(e) if vmm_alive() => {
                    return Err(fail(
                        &stage,
                        format!("cannot reach the agent's control channel: {e}"),
                    ))
                }
                Err(_) => {
                    return Err(fail(
                        &stage,
                        "the VMM exited before the guest agent started".into(),
                    ))
                }
            }
        },
        Ctl::Listener(listener) => {
            let remaining = deadline.saturating_duration_since(Instant::now());
            tokio::select! {
                accepted = tokio::time::timeout(remaining, listener.accept()) => match accepted {
                    Ok(Ok((s, _))) => s,
                    Ok(Err(e)) => return Err(fail(&stage, format!("accepting the agent's control connection: {e}"))),
                    Err(_) => return Err(fail("kernel", format!("the guest agent was not ready after {}s", timeout.as_secs()))),
                },
                _ = wait_dead(&vmm_alive) => return Err(fail("kernel", "the VMM exited during boot".into())),
            }
        }
    };
    stage = "kernel".into();
    let (reader, mut writer) = stream.into_split();
    let mut lines = BufReader::new(reader).lines();
    // With an identity to give: the count of identities the agent must
    // report past, once its first report says where it stands.
    let mut past: Option<u32> = None;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let line = tokio::select! {
            line = tokio::time::timeout(remaining, lines.next_line()) => line,
            _ = wait_dead(&vmm_alive) => {
                return Err(fail(&stage, "the VMM exited during boot".into()));
            }
        };
        let line = match line {
            Err(_) => {
                return Err(fail(
                    &stage,
                    format!("the guest agent was not ready after {}s", timeout.as_secs()),
                ))
            }
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) | Ok(Err(_)) => {
                return Err(fail(
                    &stage,
                    "the agent's control channel closed during boot".into(),
                ));
            }
        };
        let Ok(report) = serde_json::from_str::<AgentReport>(&line) else {
            continue;
        };
        if report.protocol != AGENT_PROTOCOL {
            return Err(fail(
                &stage,
                format!(
                    "the guest agent speaks protocol {} but banger needs {AGENT_PROTOCOL}",
                    report.protocol
                ),
            ));
        }
        tracing::debug!(stage = %report.stage, "agent report");
        let identity = match give {
            Give::Always(identity) => Some(identity),
            Give::IfHeld(identity) if report.stage == "held" => Some(identity),
            Give::IfHeld(_) if past.is_none() => return Ok(()),
            _ => None,
        };
        if let (Some(identity), None) = (identity, past) {
            past = Some(report.identities);
            let mut line =
                serde_json::to_vec(&HostMessage::Identity(identity.clone())).expect("serialises");
            line.push(b'\n');
            if let Err(e) = writer.write_all(&line).await {
                return Err(fail(
                    "identity",
                    format!("sending the VM its identity: {e}"),
                ));
            }
            stage = "identity".into();
        }
        if report.stage == "ready" && past.is_some_and(|n| report.identities <= n) {
            continue;
        }
        match report.stage.as_str() {
            "ready" => return Ok(()),
            "failed" => {
                return Err(fail(
                    &stage,
                    report.error.unwrap_or_else(|| "unknown error".into()),
                ))
            }
            other => {
                stage = other.to_string();
                on_stage(other);
            }
        }
    }
}

async fn wait_dead(alive: &impl Fn() -> bool) {
    while alive() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Pinned {
    expected: PublicKey,
}

impl client::Handler for Pinned {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(
            matches!(key, PublicKeyOrCertificate::PublicKey { key, .. } if key.key_data() == self.expected.key_data()),
        )
    }
}

/// An authenticated SSH connection to a VM's agent.
#[derive(Clone)]
pub struct AgentSession {
    handle: Arc<Handle<Pinned>>,
}

/// What an exec produced, delivered as it arrives.
pub enum Output {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
}

/// What the caller feeds an exec.
pub enum Input {
    Stdin(Vec<u8>),
    StdinEof,
    Signal(String),
    Resize(u16, u16),
}

/// A session with a guest agent that failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// An SSH step failed: what banger was doing, and what SSH said.
    #[error("{what}: {why}")]
    Ssh { what: String, why: String },
    /// The agent said no, or broke its side of the protocol.
    #[error("{0}")]
    Agent(&'static str),
    #[error("the agent answered {0}")]
    Status(u32),
    #[error(transparent)]
    Key(#[from] crate::vm::keys::KeyError),
    #[error(transparent)]
    Vmm(#[from] crate::vm::vmm::VmmError),
}

fn ssh(what: impl Into<String>) -> impl FnOnce(russh::Error) -> AgentError {
    let what = what.into();
    move |e| AgentError::Ssh {
        what,
        why: e.to_string(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitStatus {
    pub code: i32,
    pub signal: Option<String>,
}

impl AgentSession {
    pub async fn connect<S>(
        stream: S,
        host_key: PublicKey,
        client_key: Arc<PrivateKey>,
    ) -> Result<AgentSession, AgentError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let config = Arc::new(client::Config {
            inactivity_timeout: None,
            nodelay: true,
            preferred: russh::Preferred {
                kex: std::borrow::Cow::Borrowed(LOCAL_KEX),
                ..Default::default()
            },
            ..Default::default()
        });
        let mut handle = client::connect_stream(config, stream, Pinned { expected: host_key })
            .await
            .map_err(ssh("SSH handshake with the agent"))?;
        let auth = handle
            .authenticate_publickey("root", PrivateKeyWithHashAlg::new(client_key, None))
            .await
            .map_err(ssh("SSH authentication"))?;
        if !auth.success() {
            return Err(AgentError::Agent("the agent refused banger's key"));
        }
        Ok(AgentSession {
            handle: Arc::new(handle),
        })
    }

    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    /// Runs a command; output goes to `on_output`, input comes from `input`.
    ///
    /// Flow control (see [`ExecRequest::flow`]): `on_output` answers each
    /// chunk with a receiver that resolves once the caller has it, and only
    /// then is the agent told it may send those bytes again; stdin is sent
    /// only while the agent has room for it. So this loop never waits on
    /// the caller or on the command, and a reader that stops, or a command
    /// that never reads its stdin, holds up nothing but itself: the SSH
    /// connection and every other command on it keep moving.
    pub async fn exec(
        &self,
        request: &ExecRequest,
        tty: Option<(String, u16, u16)>,
        input: tokio::sync::mpsc::Receiver<Input>,
        gone: Option<tokio::sync::watch::Receiver<bool>>,
        mut on_output: impl FnMut(Output) -> tokio::sync::oneshot::Receiver<()>,
    ) -> Result<ExitStatus, AgentError> {
        use futures_util::StreamExt;
        let channel = self
            .handle
            .channel_open_session()
            .await
            .map_err(ssh("opening a channel"))?;
        if let Some((term, cols, rows)) = &tty {
            channel
                .request_pty(false, term, *cols as u32, *rows as u32, 0, 0, &[])
                .await
                .map_err(ssh("requesting a terminal"))?;
        }
        let command = format!(
            "{EXEC_PREFIX}{}",
            serde_json::to_string(request).expect("requests serialise")
        );
        channel
            .exec(true, command)
            .await
            .map_err(ssh("starting the command"))?;
        let flow = request.flow.is_some();
        let window = request.flow.unwrap_or(u32::MAX >> 3) as usize;
        let (mut read, write) = channel.split();
        let write = Arc::new(write);
        let room = Arc::new(banger_sshflow::Credit::new(window as u32));
        // Output not yet with the caller: a guest that ignores the window is
        // cut off rather than buffered without bound.
        let mut outstanding = 0usize;
        let feeder = tokio::spawn(feed(write.clone(), input, gone, room.clone(), flow));
        // Output chunks on their way to the caller, with their sizes.
        let mut in_flight = futures_util::stream::FuturesUnordered::new();
        let mut status: Option<ExitStatus> = None;
        let mut track = |output: Output, len: usize| {
            let delivered = on_output(output);
            async move {
                let _ = delivered.await;
                len
            }
        };
        loop {
            if flow && outstanding > 2 * window {
                feeder.abort();
                let _ = write.signal(Sig::KILL).await;
                let _ = write.close().await;
                return Err(AgentError::Agent("the guest agent sent more output than it was allowed (flow control); the command was cut off"));
            }
            tokio::select! {
                msg = read.wait() => match msg {
                    Some(ChannelMsg::Data { data }) => {
                        outstanding += data.len();
                        in_flight.push(track(Output::Stdout(data.to_vec()), data.len()));
                    }
                    Some(ChannelMsg::ExtendedData { data, ext: 1 }) => {
                        outstanding += data.len();
                        in_flight.push(track(Output::Stderr(data.to_vec()), data.len()));
                    }
                    Some(ChannelMsg::ExtendedData { data, ext: FLOW_ACK }) => room.grant(&data),
                    Some(ChannelMsg::ExitStatus { exit_status }) => {
                        status = Some(ExitStatus { code: exit_status as i32, signal: None });
                    }
                    Some(ChannelMsg::ExitSignal { signal_name, .. }) => {
                        let (name, number) = signal_info(&signal_name);
                        status = Some(ExitStatus { code: 128 + number, signal: Some(name) });
                    }
                    Some(ChannelMsg::Failure) => {
                        feeder.abort();
                        return Err(AgentError::Agent("the agent refused the command"));
                    }
                    Some(_) => {}
                    None => break,
                },
                Some(len) = in_flight.next(), if flow && !in_flight.is_empty() => {
                    outstanding -= len;
                    let _ = write.extended_data_bytes(FLOW_ACK, banger_sshflow::ack(len)).await;
                }
            }
        }
        feeder.abort();
        status.ok_or(AgentError::Agent(
            "the connection to the VM closed before the command finished",
        ))
    }

    /// Replaces the user keys the agent accepts; banger's own stay.
    pub async fn set_user_keys(&self, keys: &[String]) -> Result<(), AgentError> {
        self.request(
            format!("{SET_USER_KEYS}{}", keys.join("\n")),
            "sending the user keys",
        )
        .await
    }

    /// Holds the agent's commands until it is sent an identity (see
    /// [`HOLD`]); answered once it is held.
    pub async fn hold(&self) -> Result<(), AgentError> {
        self.request(HOLD.to_string(), "holding the agent").await
    }

    /// A request the agent answers itself with an exit status.
    async fn request(&self, command: String, what: &'static str) -> Result<(), AgentError> {
        let mut channel = self
            .handle
            .channel_open_session()
            .await
            .map_err(ssh("opening a channel"))?;
        channel.exec(true, command).await.map_err(ssh(what))?;
        while let Some(msg) = channel.wait().await {
            if let ChannelMsg::ExitStatus { exit_status } = msg {
                return match exit_status {
                    0 => Ok(()),
                    n => Err(AgentError::Status(n)),
                };
            }
        }
        Err(AgentError::Agent("the agent closed the channel"))
    }

    /// A TCP connection to `port` on the guest's loopback, made by the
    /// agent, with banger's flow control asked for (see `banger_sshflow`).
    pub async fn open_tcp(&self, port: u16) -> Result<russh::Channel<client::Msg>, AgentError> {
        self.handle
            .channel_open_direct_tcpip(
                "127.0.0.1",
                port as u32,
                banger_sshflow::ORIGINATOR,
                banger_sshflow::WINDOW,
            )
            .await
            .map_err(ssh(format!("guest port {port}")))
    }

    /// Asks the agent to sync, unmount and power off.
    pub async fn poweroff(&self) -> Result<(), AgentError> {
        let channel = self
            .handle
            .channel_open_session()
            .await
            .map_err(ssh("opening a channel"))?;
        channel
            .exec(true, POWEROFF)
            .await
            .map_err(ssh("asking for power-off"))
    }
}

/// Forwards the caller's stdin, signals and resizes to the command. Stdin
/// waits for room at the agent; the caller hanging up ends the command
/// (SIGHUP and end of input) even while stdin is waiting.
async fn feed(
    write: Arc<russh::ChannelWriteHalf<client::Msg>>,
    mut input: tokio::sync::mpsc::Receiver<Input>,
    gone: Option<tokio::sync::watch::Receiver<bool>>,
    room: Arc<banger_sshflow::Credit>,
    flow: bool,
) {
    let hung_up = async move {
        match gone {
            Some(mut gone) => {
                let _ = gone.wait_for(|g| *g).await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    let forward = async {
        while let Some(next) = input.recv().await {
            match next {
                Input::Stdin(bytes) => {
                    for chunk in bytes.chunks(STDIN_CHUNK) {
                        if flow {
                            room.take(chunk.len()).await;
                        }
                        if write.data_bytes(chunk.to_vec()).await.is_err() {
                            return;
                        }
                    }
                }
                Input::StdinEof => {
                    let _ = write.eof().await;
                }
                Input::Signal(name) => {
                    let _ = write.signal(sig_from_name(&name)).await;
                }
                Input::Resize(cols, rows) => {
                    let _ = write.window_change(cols as u32, rows as u32, 0, 0).await;
                }
            }
        }
    };
    let mut hung_up = std::pin::pin!(hung_up);
    tokio::select! {
        () = forward => {
            // The caller's input ended (its stdin was closed or never
            // open): the command runs on, and what it left running in the
            // background (`nohup server &`) outlives it as over ssh. Only
            // the caller going away while it runs ends it.
            hung_up.as_mut().await;
        }
        () = hung_up.as_mut() => {}
    }
    // The caller went away: its command goes with it.
    let _ = write.signal(Sig::HUP).await;
    let _ = write.eof().await;
}

fn signal_info(sig: &Sig) -> (String, i32) {
    let (name, num) = match sig {
        Sig::ABRT => ("ABRT", libc::SIGABRT),
        Sig::ALRM => ("ALRM", libc::SIGALRM),
        Sig::FPE => ("FPE", libc::SIGFPE),
        Sig::HUP => ("HUP", libc::SIGHUP),
        Sig::ILL => ("ILL", libc::SIGILL),
        Sig::INT => ("INT", libc::SIGINT),
        Sig::KILL => ("KILL", libc::SIGKILL),
        Sig::PIPE => ("PIPE", libc::SIGPIPE),
        Sig::QUIT => ("QUIT", libc::SIGQUIT),
        Sig::SEGV => ("SEGV", libc::SIGSEGV),
        Sig::TERM => ("TERM", libc::SIGTERM),
        Sig::USR1 => ("USR1", libc::SIGUSR1),
        Sig::Custom(s) => return (s.clone(), s.trim_start_matches("SIG").parse().unwrap_or(0)),
    };
    (name.to_string(), num)
}

pub fn sig_from_name(name: &str) -> Sig {
    match name.trim_start_matches("SIG") {
        "ABRT" => Sig::ABRT,
        "ALRM" => Sig::ALRM,
        "FPE" => Sig::FPE,
        "HUP" => Sig::HUP,
        "ILL" => Sig::ILL,
        "INT" => Sig::INT,
        "KILL" => Sig::KILL,
        "PIPE" => Sig::PIPE,
        "QUIT" => Sig::QUIT,
        "SEGV" => Sig::SEGV,
        "TERM" => Sig::TERM,
        "USR1" => Sig::USR1,
        other => Sig::Custom(other.to_string()),
    }
}
