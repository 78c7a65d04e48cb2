//! Talking to a running guest for a caller: exec with streamed output and
//! stdin, the console log (tail and follow), and TCP port forwards.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use banger_proto::agent::ExecRequest;
use banger_proto::vm::{
    ExecEvent, ExecInput, ExecParams, ExecResult, ForwardEvent, LogEvent, LogsResult,
    PortForwardParams, PortForwardResult,
};
use base64::Engine;

use super::error::VmError;
use super::registry::VmRegistry;
use super::sessions::AgentSessions;
use crate::error::{OpError, OpResult};
use crate::events::Events;
use crate::services::images::ImageService;
use crate::services::workspace::WorkspaceService;
use crate::vm::agent_client::{self, Input, Output};
use crate::vm::console;

pub struct GuestIo {
    registry: Arc<VmRegistry>,
    sessions: Arc<AgentSessions>,
    images: Arc<ImageService>,
    workspaces: Arc<WorkspaceService>,
}

impl GuestIo {
    pub fn new(
        registry: Arc<VmRegistry>,
        sessions: Arc<AgentSessions>,
        images: Arc<ImageService>,
        workspaces: Arc<WorkspaceService>,
    ) -> GuestIo {
        GuestIo {
            registry,
            sessions,
            images,
            workspaces,
        }
    }

    /// Forwards a host port to a guest port until the caller hangs up or
    /// the VM stops.
    pub async fn port_forward(
        &self,
        p: PortForwardParams,
        events: Events<ForwardEvent>,
        input: crate::ops::Input,
    ) -> OpResult<PortForwardResult> {
        let (vm, _) = self.sessions.running(&p.name).await?;
        let ip: std::net::IpAddr = p
            .host_ip
            .as_deref()
            .unwrap_or("127.0.0.1")
            .parse()
            .map_err(|_| {
                OpError::invalid(format!(
                    "`{}` is not an IP address",
                    p.host_ip.as_deref().unwrap_or_default()
                ))
            })?;
        let listener = tokio::net::TcpListener::bind((ip, p.host_port))
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AddrInUse => OpError::conflict(format!(
                    "{ip}:{} is already in use on the host; pick another host port",
                    p.host_port
                )),
                _ => OpError::invalid(format!("cannot listen on {ip}:{}: {e}", p.host_port)),
            })?;
        let local = listener.local_addr()?;
        tracing::info!(vm = %vm.name, listen = %local, guest_port = p.guest_port, "forwarding");
        events.emit(&ForwardEvent {
            listening: local.to_string(),
            guest_port: p.guest_port,
            refused: None,
        });
        let gone = caller_gone(&input);
        tokio::pin!(gone);
        let mut connections = 0;
        // Not reset by each accepted connection: a busy forward still
        // notices a stopped VM within a second.
        let mut check = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = &mut gone => break,
                accepted = listener.accept() => {
                    let Ok((tcp, _)) = accepted else { continue };
                    connections += 1;
                    let session = self.sessions.session(&vm).await?;
                    let port = p.guest_port;
                    let (events, listening) = (events.clone(), local.to_string());
                    tokio::spawn(async move {
                        match session.open_tcp(port).await {
                            Ok(channel) => {
                                let _ = tcp.set_nodelay(true);
                                banger_sshflow::forward(channel, tcp, banger_sshflow::WINDOW).await;
                            }
                            // Said to the caller: a forward to a port nothing
                            // serves looked like it worked, and just hung up.
                            Err(e) => {
                                tracing::info!(error = %e, "nothing answered in the guest");
                                events.emit(&ForwardEvent {
                                    listening,
                                    guest_port: port,
                                    refused: Some(e.to_string()),
                                });
                            }
                        }
                    });
                }
                _ = check.tick() => {
                    if self.registry.live(&vm.name)?.is_none() {
                        return Err(VmError::StoppedMeanwhile(vm.name).into());
                    }
                }
            }
        }
        Ok(PortForwardResult { connections })
    }

    pub async fn logs(
        &self,
        name: &str,
        tail: Option<usize>,
        follow: bool,
        events: Events<LogEvent>,
        input: crate::ops::Input,
    ) -> OpResult<LogsResult> {
        let vm = self.registry.record(name)?;
        let dir = PathBuf::from(&vm.dir);
        let path = console::path(&dir);
        // The log is streamed in chunks, each sent once the one before it
        // reached the caller: a big log costs the daemon one chunk.
        let send = |bytes: &[u8]| {
            events.emit_tracked(&LogEvent {
                text: String::from_utf8_lossy(bytes).into_owned(),
            })
        };
        match tail {
            Some(n) => {
                let _ = send(&console::tail(&dir, n)?).await;
            }
            None => {
                let mut pending = None;
                for chunk in console::chunks(&dir) {
                    if let Some(before) = pending.replace(send(&chunk?)) {
                        let _ = before.await;
                    }
                }
                if let Some(last) = pending {
                    let _ = last.await;
                }
            }
        }
        if !follow {
            return Ok(LogsResult {
                text: String::new(),
            });
        }
        let mut offset = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        loop {
            tokio::select! {
                _ = caller_gone(&input) => return Ok(LogsResult { text: String::new() }),
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if len < offset {
                offset = 0; // Rotated: the new log starts from nothing.
            }
            if len > offset {
                use std::io::{Read, Seek, SeekFrom};
                let mut f = std::fs::File::open(&path)?;
                f.seek(SeekFrom::Start(offset))?;
                let mut chunk = Vec::new();
                f.take(len - offset).read_to_end(&mut chunk)?;
                offset = len;
                events.emit(&LogEvent {
                    text: String::from_utf8_lossy(&chunk).into_owned(),
                });
            }
            if self.registry.live(name)?.is_none() {
                return Ok(LogsResult {
                    text: String::new(),
                });
            }
        }
    }

    pub async fn exec(
        &self,
        params: ExecParams,
        events: Events<ExecEvent>,
        input: crate::ops::Input,
    ) -> OpResult<ExecResult> {
        if params.argv.is_empty() && params.tty.is_none() {
            return Err(OpError::invalid(
                "no command given: `banger vm exec NAME -- CMD ARGS…`",
            ));
        }
        let (vm, session) = self.sessions.running(&params.name).await?;
        let workspace = self.workspaces.record(&vm.name)?;
        if let Some(ws) = workspace.as_ref().filter(|_| !params.no_sync) {
            let synced = self
                .workspaces
                .sync_with(&vm, ws, &session, Default::default(), None)
                .await
                .map_err(|mut e| {
                    e.message
                        .push_str("; `vm exec --no-sync` runs the command without syncing");
                    e
                })?;
            for line in synced.summary(&vm.name) {
                events.emit(&ExecEvent::Stderr(
                    base64::engine::general_purpose::STANDARD.encode(format!("{line}\n")),
                ));
            }
        }
        // The image's configuration is the default, as `docker exec` has
        // it: its User and WorkingDir unless the caller names them (a
        // workspace is the working directory before the image's); its Env
        // the agent puts under every command's from the boot config.
        let image = self
            .images
            .inspect(std::slice::from_ref(&vm.image))
            .ok()
            .map(|mut i| i.remove(0).config)
            .unwrap_or_default();
        let cwd = params
            .cwd
            .or(workspace.map(|w| w.guest_path))
            .or(Some(image.workdir).filter(|d| !d.is_empty()));
        let request = ExecRequest {
            argv: params.argv,
            env: params.env,
            cwd,
            user: params.user.or(Some(image.user).filter(|u| !u.is_empty())),
            flow: Some(agent_client::FLOW_WINDOW),
            detach: params.detach,
        };
        // Small and bounded: stdin moves at the pace the command reads it.
        let (tx, rx) = tokio::sync::mpsc::channel(crate::caller::QUEUED_LINES);
        let gone = input.as_ref().map(|i| i.gone());
        // Without a caller stream, stdin is empty; the sender lives until the
        // command ends so its absence is not taken for a vanished caller.
        let mut _no_input = None;
        if let Some(mut input) = input {
            tokio::spawn(async move {
                while let Some(value) = input.lines.recv().await {
                    let Ok(msg) = serde_json::from_value::<ExecInput>(value) else {
                        continue;
                    };
                    let translated = match msg {
                        ExecInput::Stdin(b64) => {
                            match base64::engine::general_purpose::STANDARD.decode(b64) {
                                Ok(bytes) => Input::Stdin(bytes),
                                Err(_) => continue,
                            }
                        }
                        ExecInput::StdinEof => Input::StdinEof,
                        ExecInput::Signal(name) => Input::Signal(name),
                        ExecInput::Resize(c, r) => Input::Resize(c, r),
                    };
                    if tx.send(translated).await.is_err() {
                        return;
                    }
                }
            });
        } else {
            let _ = tx.send(Input::StdinEof).await;
            _no_input = Some(tx);
        }
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        // A detached start answers with one line, the result's, not output.
        let mut answer = Vec::new();
        let status = session
            .exec(&request, params.tty, rx, gone, |out| match out {
                Output::Stdout(b) if params.detach => {
                    answer.extend_from_slice(&b);
                    let (taken, delivered) = tokio::sync::oneshot::channel();
                    let _ = taken.send(());
                    delivered
                }
                Output::Stdout(b) => events.emit_tracked(&ExecEvent::Stdout(b64(&b))),
                Output::Stderr(b) => events.emit_tracked(&ExecEvent::Stderr(b64(&b))),
            })
            .await
            .map_err(|why| VmError::Agent {
                name: vm.name.clone(),
                why: why.to_string(),
            })?;
        let detached = match params.detach && status.code == 0 {
            true => Some(serde_json::from_slice(&answer).map_err(|e| VmError::Agent {
                name: vm.name.clone(),
                why: format!("its answer to a detached start: {e}"),
            })?),
            false => None,
        };
        Ok(ExecResult {
            exit_code: status.code,
            signal: status.signal,
            detached,
        })
    }
}

/// Resolves when the caller hangs up; never without a caller stream.
async fn caller_gone(input: &crate::ops::Input) {
    match input {
        Some(input) => input.hung_up().await,
        None => std::future::pending::<()>().await,
    }
}
