//! The SSH server: public-key auth against the keys the host handed over,
//! session channels running commands (argv, env, cwd, user, stdin, PTY,
//! signals, exit status), and a `poweroff` request from the host.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use banger_proto::agent::{ExecRequest, EXEC_PREFIX, FLOW_ACK, HOLD, SET_USER_KEYS};
use banger_sshflow::Credit;
use russh::keys::PublicKey;
use russh::server::{
    Auth, ChannelOpenHandle, Handle, Msg, PublicKeyOffer, Session, VerifiedPublicKey,
};
use russh::{Channel, ChannelId, ChannelOpenFailure, Pty, Sig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::exec::{self, Io, Spec};
use crate::reaper::Exit;
use crate::transport::FdStream;

/// The request banger's host sends to power the VM off cleanly.
pub const POWEROFF: &str = "banger-poweroff";

pub struct Shared {
    /// banger's keys, fixed at boot.
    pub authorized: Vec<PublicKey>,
    /// The user's keys, replaced while running.
    pub user_keys: std::sync::RwLock<Vec<PublicKey>>,
    pub image_env: Vec<(String, String)>,
    /// Becomes true once the root disk is `/`; commands wait for it.
    pub root: tokio::sync::watch::Receiver<bool>,
    /// The host key, and whether commands wait for a new identity.
    pub identity: Arc<crate::identity::State>,
    /// Where the host learns that the agent is held.
    pub control: crate::init::Control,
}

impl Shared {
    /// Commands wait for the root switch, and while the agent is held for
    /// a new identity.
    async fn root_ready(&self) {
        let mut root = self.root.clone();
        let _ = root.wait_for(|ready| *ready).await;
        self.identity.released().await;
    }

    /// The server's settings for a new connection, with the current host key.
    pub fn ssh_config(&self) -> Arc<russh::server::Config> {
        Arc::new(russh::server::Config {
            keys: vec![self.identity.host_key()],
            auth_rejection_time: std::time::Duration::from_millis(200),
            auth_rejection_time_initial: Some(std::time::Duration::ZERO),
            inactivity_timeout: None,
            keepalive_interval: None,
            nodelay: true,
            ..Default::default()
        })
    }
}

#[derive(Default)]
struct ChannelState {
    env: Vec<(String, String)>,
    pty: Option<(String, u16, u16)>,
    stdin: Option<tokio::sync::mpsc::UnboundedSender<Option<Vec<u8>>>>,
    pid: Option<i32>,
    master: Option<Arc<OwnedFd>>,
    /// With flow control (see [`ExecRequest::flow`]; never for plain SSH
    /// clients): room for output the host has not acknowledged.
    room: Option<Arc<Credit>>,
}

pub struct Handler {
    shared: Arc<Shared>,
    channels: HashMap<ChannelId, ChannelState>,
    /// Session channels not yet given a purpose; a subsystem takes its
    /// channel, a command drops it (its data reaches `data` instead).
    unclaimed: HashMap<ChannelId, Channel<Msg>>,
}

impl Handler {
    pub fn new(shared: Arc<Shared>) -> Handler {
        Handler {
            shared,
            channels: HashMap::new(),
            unclaimed: HashMap::new(),
        }
    }

    fn authorized(&self, key: &PublicKey) -> bool {
        let users = self
            .shared
            .user_keys
            .read()
            .unwrap_or_else(|p| p.into_inner());
        self.shared
            .authorized
            .iter()
            .chain(users.iter())
            .any(|k| k.key_data() == key.key_data())
    }

    fn start(
        &mut self,
        channel: ChannelId,
        mut spec: Spec,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let state = self.channels.entry(channel).or_default();
        let mut env = self.shared.image_env.clone();
        env.extend(state.env.iter().cloned());
        env.append(&mut spec.env);
        spec.env = env;
        spec.pty = state.pty.clone();
        session.channel_success(channel)?;
        let handle = session.handle();
        let flow = state.room.clone();
        match exec::spawn(spec) {
            Err(e) => {
                let message = format!("banger: {}\r\n", e.message).into_bytes();
                tokio::spawn(answer(handle, channel, Some(1), message, e.code));
            }
            Ok(started) => {
                state.pid = started.pid;
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                state.stdin = Some(tx);
                match started.io {
                    Io::Pipes {
                        stdin,
                        stdout,
                        stderr,
                    } => {
                        let acks = flow.is_some().then(|| (handle.clone(), channel));
                        tokio::spawn(feed_stdin(stdin, rx, acks));
                        tokio::spawn(run_pipes(
                            handle,
                            channel,
                            stdout,
                            stderr,
                            started.exit,
                            flow,
                        ));
                    }
                    Io::Detached { log } => {
                        let said = banger_proto::agent::Detached {
                            pid: started.pid.unwrap_or(0) as u32,
                            log,
                        };
                        let mut line = serde_json::to_vec(&said).expect("serialises");
                        line.push(b'\n');
                        tokio::spawn(answer(handle, channel, None, line, 0));
                    }
                    Io::Pty { master } => {
                        let master = Arc::new(master);
                        state.master = Some(master.clone());
                        let writer = master.try_clone().map_err(russh::Error::IO)?;
                        let acks = flow.is_some().then(|| (handle.clone(), channel));
                        tokio::spawn(feed_stdin(writer, rx, acks));
                        tokio::spawn(run_pty(handle, channel, master, started.exit, flow));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Writes the host's stdin to the command; with flow control, tells the
/// host each chunk was taken, so it may send more.
async fn feed_stdin(
    fd: OwnedFd,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Option<Vec<u8>>>,
    acks: Option<(Handle, ChannelId)>,
) {
    let Ok(mut w) = FdStream::new(fd) else { return };
    while let Some(Some(chunk)) = rx.recv().await {
        if w.write_all(&chunk).await.is_err() {
            return;
        }
        if let Some((handle, channel)) = &acks {
            let _ = handle
                .extended_data(*channel, FLOW_ACK, banger_sshflow::ack(chunk.len()))
                .await;
        }
    }
    // EOF from the client (or the channel went away): the child sees stdin close.
}

async fn pump(
    fd: OwnedFd,
    handle: Handle,
    channel: ChannelId,
    ext: Option<u32>,
    flow: Option<Arc<Credit>>,
) {
    let Ok(mut r) = FdStream::new(fd) else { return };
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                // Not ahead of the host by more than its window: a reader
                // that stops holds this command, and nothing else.
                if let Some(room) = &flow {
                    room.take(n).await;
                }
                let data = buf[..n].to_vec();
                let sent = match ext {
                    Some(ext) => handle.extended_data(channel, ext, data).await.is_ok(),
                    None => handle.data(channel, data).await.is_ok(),
                };
                if !sent {
                    return;
                }
            }
        }
    }
}

/// The OpenSSH public keys among `lines`; anything else is skipped.
pub fn parse_keys<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<PublicKey> {
    lines
        .filter_map(|k| PublicKey::from_openssh(k.trim()).ok())
        .collect()
}

/// A request the agent answers itself: `bytes` on stdout (or the extended
/// stream `ext`), then `code` as the exit status, and the channel closes.
async fn answer(handle: Handle, channel: ChannelId, ext: Option<u32>, bytes: Vec<u8>, code: u32) {
    let _ = match ext {
        Some(ext) => handle.extended_data(channel, ext, bytes).await,
        None => handle.data(channel, bytes).await,
    };
    let _ = handle.exit_status_request(channel, code).await;
    let _ = handle.eof(channel).await;
    let _ = handle.close(channel).await;
}

async fn finish(
    handle: Handle,
    channel: ChannelId,
    exit: Result<Exit, tokio::sync::oneshot::error::RecvError>,
) {
    match exit {
        Ok(Exit::Code(code)) => {
            let _ = handle.exit_status_request(channel, code as u32).await;
        }
        Ok(Exit::Signal(sig)) => {
            let _ = handle
                .exit_signal_request(
                    channel,
                    signal_name(sig),
                    false,
                    String::new(),
                    String::new(),
                )
                .await;
        }
        Err(_) => {
            let _ = handle
                .exit_status_request(channel, banger_proto::agent::exit::BANGER_FAILED)
                .await;
        }
    }
    let _ = handle.eof(channel).await;
    let _ = handle.close(channel).await;
}

async fn run_pipes(
    handle: Handle,
    channel: ChannelId,
    stdout: OwnedFd,
    stderr: OwnedFd,
    exit: tokio::sync::oneshot::Receiver<Exit>,
    flow: Option<Arc<Credit>>,
) {
    let out = tokio::spawn(pump(stdout, handle.clone(), channel, None, flow.clone()));
    let err = tokio::spawn(pump(stderr, handle.clone(), channel, Some(1), flow));
    let status = exit.await;
    // Output written before exit is delivered before the status.
    let _ = out.await;
    let _ = err.await;
    finish(handle, channel, status).await;
}

async fn run_pty(
    handle: Handle,
    channel: ChannelId,
    master: Arc<OwnedFd>,
    exit: tokio::sync::oneshot::Receiver<Exit>,
    flow: Option<Arc<Credit>>,
) {
    let reader = match master.try_clone() {
        Ok(fd) => fd,
        Err(_) => return finish(handle, channel, exit.await).await,
    };
    let out = tokio::spawn(pump(reader, handle.clone(), channel, None, flow));
    let status = exit.await;
    // The pty master reads EIO once the last slave holder is gone.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), out).await;
    finish(handle, channel, status).await;
}

fn signal_name(sig: i32) -> Sig {
    match sig {
        libc::SIGABRT => Sig::ABRT,
        libc::SIGALRM => Sig::ALRM,
        libc::SIGFPE => Sig::FPE,
        libc::SIGHUP => Sig::HUP,
        libc::SIGILL => Sig::ILL,
        libc::SIGINT => Sig::INT,
        libc::SIGKILL => Sig::KILL,
        libc::SIGPIPE => Sig::PIPE,
        libc::SIGQUIT => Sig::QUIT,
        libc::SIGSEGV => Sig::SEGV,
        libc::SIGTERM => Sig::TERM,
        libc::SIGUSR1 => Sig::USR1,
        other => Sig::Custom(format!("SIG{other}")),
    }
}

fn signal_number(sig: &Sig) -> Option<i32> {
    Some(match sig {
        Sig::ABRT => libc::SIGABRT,
        Sig::ALRM => libc::SIGALRM,
        Sig::FPE => libc::SIGFPE,
        Sig::HUP => libc::SIGHUP,
        Sig::ILL => libc::SIGILL,
        Sig::INT => libc::SIGINT,
        Sig::KILL => libc::SIGKILL,
        Sig::PIPE => libc::SIGPIPE,
        Sig::QUIT => libc::SIGQUIT,
        Sig::SEGV => libc::SIGSEGV,
        Sig::TERM => libc::SIGTERM,
        Sig::USR1 => libc::SIGUSR1,
        Sig::Custom(_) => return None,
    })
}

/// The account's shell when it exists in the image, else /bin/sh.
fn login_shell(user: Option<&str>) -> String {
    let shell = exec::account(user)
        .map(|a| a.shell)
        .unwrap_or_else(|_| "/bin/sh".into());
    if std::path::Path::new(&shell).exists() {
        shell
    } else {
        "/bin/sh".into()
    }
}

/// A plain `ssh host cmd` gets `/bin/sh -c cmd`, as sshd would run it.
fn shell_argv(command: &str) -> Vec<String> {
    if std::path::Path::new("/bin/sh").exists() {
        vec!["/bin/sh".into(), "-c".into(), command.into()]
    } else {
        command.split_whitespace().map(str::to_owned).collect()
    }
}

impl russh::server::Handler for Handler {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(if self.authorized(offer.public_key) {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn auth_publickey(
        &mut self,
        _user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(if self.authorized(key.public_key) {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.insert(channel.id(), ChannelState::default());
        self.unclaimed.insert(channel.id(), channel);
        reply.accept().await;
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match (name, self.unclaimed.remove(&channel)) {
            ("sftp", Some(chan)) => {
                session.channel_success(channel)?;
                let root = self.shared.clone();
                let stream =
                    crate::sftp::Ending::new(chan.into_stream(), session.handle(), channel);
                tokio::spawn(async move {
                    root.root_ready().await;
                    russh_sftp::server::run(stream, crate::sftp::Sftp::new()).await;
                });
            }
            _ => session.channel_failure(channel)?,
        }
        Ok(())
    }

    /// `ssh -L` and editors' port forwards: a TCP connection made from
    /// inside the guest, piped through the channel.
    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host: &str,
        port: u32,
        originator: &str,
        originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Ok(port) = u16::try_from(port) else {
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return Ok(());
        };
        // A static binary resolves no names but these (no NSS).
        let host = match host {
            "localhost" | "ip6-localhost" => "127.0.0.1".to_string(),
            other => other.trim_matches(|c| c == '[' || c == ']').to_string(),
        };
        // banger's daemon asks for flow control (its forwards share the one
        // connection every command runs on); other clients get a plain copy.
        let flow = (originator == banger_sshflow::ORIGINATOR)
            .then(|| banger_sshflow::clamp_window(originator_port));
        tokio::spawn(async move {
            match tokio::net::TcpStream::connect((host.as_str(), port)).await {
                Ok(mut tcp) => {
                    let _ = tcp.set_nodelay(true);
                    reply.accept().await;
                    match flow {
                        Some(window) => banger_sshflow::forward(channel, tcp, window).await,
                        None => {
                            let mut stream = channel.into_stream();
                            let _ = tokio::io::copy_bidirectional(&mut stream, &mut tcp).await;
                        }
                    }
                }
                Err(_) => reply.reject(ChannelOpenFailure::ConnectFailed).await,
            }
        });
        Ok(())
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        _: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels
            .entry(channel)
            .or_default()
            .env
            .push((name.to_string(), value.to_string()));
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        cols: u32,
        rows: u32,
        _pw: u32,
        _ph: u32,
        _modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.entry(channel).or_default().pty =
            Some((term.to_string(), cols.max(1) as u16, rows.max(1) as u16));
        session.channel_success(channel)?;
        Ok(())
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        cols: u32,
        rows: u32,
        _pw: u32,
        _ph: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(master) = self.channels.get(&channel).and_then(|s| s.master.clone()) {
            exec::resize(&master, cols as u16, rows as u16);
        }
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.unclaimed.remove(&channel);
        let command = String::from_utf8_lossy(data).into_owned();
        if command == POWEROFF {
            session.channel_success(channel)?;
            std::thread::spawn(|| crate::power::shutdown());
            return Ok(());
        }
        if let Some(keys) = command.strip_prefix(SET_USER_KEYS) {
            let keys = parse_keys(keys.lines());
            let count = keys.len();
            *self
                .shared
                .user_keys
                .write()
                .unwrap_or_else(|p| p.into_inner()) = keys;
            session.channel_success(channel)?;
            let reply = format!("{count}\n").into_bytes();
            tokio::spawn(answer(session.handle(), channel, None, reply, 0));
            return Ok(());
        }
        self.shared.root_ready().await;
        if command == HOLD {
            // Answered once held: the host snapshots the VM right after.
            self.shared.identity.hold();
            self.shared.control.report("held", None);
            session.channel_success(channel)?;
            tokio::spawn(answer(session.handle(), channel, None, Vec::new(), 0));
            return Ok(());
        }
        let request = command
            .strip_prefix(EXEC_PREFIX)
            .map(serde_json::from_str::<ExecRequest>);
        if let Some(Ok(ExecRequest {
            flow: Some(window), ..
        })) = &request
        {
            let window = banger_sshflow::clamp_window(*window);
            self.channels.entry(channel).or_default().room = Some(Arc::new(Credit::new(window)));
        }
        let spec = match request {
            Some(parsed) => match parsed {
                // No command: the user's login shell (`banger vm ssh`).
                Ok(req) if req.argv.is_empty() => Spec {
                    argv: vec![login_shell(req.user.as_deref()), "-l".into()],
                    env: req.env,
                    cwd: req.cwd,
                    user: req.user,
                    pty: None,
                    detach: req.detach,
                },
                Ok(req) => Spec {
                    argv: req.argv,
                    env: req.env,
                    cwd: req.cwd,
                    user: req.user,
                    pty: None,
                    detach: req.detach,
                },
                Err(e) => {
                    session.channel_failure(channel)?;
                    crate::console::log(&format!("malformed exec request: {e}"));
                    return Ok(());
                }
            },
            None => Spec {
                argv: shell_argv(&command),
                env: vec![],
                cwd: None,
                user: None,
                pty: None,
                detach: false,
            },
        };
        self.start(channel, spec, session)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.unclaimed.remove(&channel);
        self.shared.root_ready().await;
        let shell = login_shell(None);
        let spec = Spec {
            argv: vec![shell, "-l".into()],
            env: vec![],
            cwd: None,
            user: None,
            pty: None,
            detach: false,
        };
        self.start(channel, spec, session)
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(tx) = self.channels.get(&channel).and_then(|s| s.stdin.as_ref()) {
            let _ = tx.send(Some(data.to_vec()));
        }
        Ok(())
    }

    /// Flow-control acknowledgements from banger's host; other extended
    /// data from a client means nothing here.
    async fn extended_data(
        &mut self,
        channel: ChannelId,
        code: u32,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if code == FLOW_ACK {
            if let Some(room) = self.channels.get(&channel).and_then(|s| s.room.as_ref()) {
                room.grant(data);
            }
        }
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(state) = self.channels.get_mut(&channel) {
            // With a terminal, EOF is a keystroke; without, it closes stdin.
            if state.master.is_none() {
                if let Some(tx) = state.stdin.take() {
                    let _ = tx.send(None);
                }
            }
        }
        Ok(())
    }

    async fn signal(
        &mut self,
        channel: ChannelId,
        sig: Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let (Some(pid), Some(num)) = (
            self.channels.get(&channel).and_then(|s| s.pid),
            signal_number(&sig),
        ) {
            // The whole session: the process leads its own process group.
            // SAFETY: kill(2) on a process group we started.
            unsafe { libc::kill(-pid, num) };
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.remove(&channel);
        self.unclaimed.remove(&channel);
        Ok(())
    }
}
