//! Connections to a VM's port made from this machine, whatever machine the
//! daemon is on. The daemon forwards a port on its own loopback to the VM
//! (`vm.port_forward`); from here it is a TCP connection, or with `--host`
//! `ssh -W` to that port over the shared SSH connection.
//!
//! - `vm port-forward` with `--host`: the port opens on this machine.
//! - `vm dial NAME PORT`: standard input and output (ssh's ProxyCommand).

use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::mpsc;

use banger_core::vm::ssh_config;
use banger_proto::rpc::m;
use banger_proto::vm::{ForwardEvent, PortForwardParams};

use super::report;
use crate::client::Client;
use crate::remote::Remote;

pub fn forward_remote(
    client: &Client,
    remote: &Remote,
    name: &str,
    host_ip: Option<String>,
    host_port: u16,
    guest_port: u16,
    json: bool,
) -> anyhow::Result<i32> {
    let ip = host_ip.unwrap_or_else(|| "127.0.0.1".into());
    let listener = TcpListener::bind((ip.as_str(), host_port)).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!(
                "{ip}:{host_port} is already in use on this machine; pick another local port"
            )
        } else {
            anyhow::anyhow!("listening on {ip}:{host_port}: {e}")
        }
    })?;
    let local = listener.local_addr()?;
    through_daemon_forward(client, name, guest_port, |there| {
        let event = ForwardEvent {
            listening: local.to_string(),
            guest_port,
            refused: None,
        };
        if json {
            outln!("{}", serde_json::to_string(&event)?);
        } else {
            eprintln!(
                "forwarding {local} -> {name}:{guest_port} on {} (Ctrl-C to stop)",
                remote.host
            );
        }
        let remote = remote.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (remote, there) = (remote.clone(), there.clone());
                std::thread::spawn(move || carry(&remote, conn, &there));
            }
        });
        Ok(())
    })
}

/// Asks the daemon to forward a port on its own loopback to `guest_port`
/// in VM `name`, runs `then` with the address it listens on, and returns
/// when that forward ends (the VM stopped, or the call failed: reported).
fn through_daemon_forward(
    client: &Client,
    name: &str,
    guest_port: u16,
    then: impl FnOnce(String) -> anyhow::Result<()>,
) -> anyhow::Result<i32> {
    let params = PortForwardParams {
        name: name.to_string(),
        host_ip: None,
        host_port: 0,
        guest_port,
    };
    let (ready, listening) = mpsc::channel::<String>();
    std::thread::scope(|scope| {
        let forwarding = scope.spawn(move || {
            client.call_streaming::<m::VmPortForward>(
                params,
                |event: ForwardEvent| match event.refused {
                    Some(why) => eprintln!(
                        "{name}: a connection found nothing listening on guest port {guest_port} ({why})"
                    ),
                    None => {
                        let _ = ready.send(event.listening);
                    }
                },
                |_writer| {},
            )
        });
        // Listening there, unless the call ended first (with its error).
        if let Ok(there) = listening.recv() {
            then(there)?;
        }
        match forwarding.join().expect("the forwarding thread") {
            Ok(_) => Ok(0),
            Err(e) => Ok(report(e)),
        }
    })
}

/// `vm dial NAME PORT`: this process's stdin and stdout, joined to the
/// guest's port until the far end closes.
pub fn dial(client: &Client, name: &str, port: u16) -> anyhow::Result<i32> {
    through_daemon_forward(client, name, port, |there| {
        match client.remote() {
            Some(remote) => {
                let _ = remote.ssh(&["-W", &there]).status();
            }
            None => {
                let conn = TcpStream::connect(&there)?;
                let mut up = conn.try_clone()?;
                std::thread::spawn(move || {
                    crate::remote::pump(&mut std::io::stdin().lock(), &mut up);
                    let _ = up.shutdown(std::net::Shutdown::Write);
                });
                let mut down = conn;
                crate::remote::pump(&mut down, &mut std::io::stdout().lock());
            }
        }
        // The forward lasts while its call's connection is open: ending
        // the process closes it.
        std::process::exit(0)
    })
}

/// One local connection, carried to `there` (the remote daemon's listener)
/// by `ssh -W`; ends when either side does.
fn carry(remote: &Remote, conn: TcpStream, there: &str) {
    let mut ssh = remote.ssh(&["-W", there]);
    ssh.stdin(Stdio::piped()).stdout(Stdio::piped());
    // SAFETY: prctl only sets this process's own death signal.
    unsafe {
        ssh.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let Ok(mut child) = ssh.spawn() else {
        return;
    };
    let (Some(mut to), Some(mut from)) = (child.stdin.take(), child.stdout.take()) else {
        return;
    };
    let (Ok(mut up), mut down) = (conn.try_clone(), conn) else {
        return;
    };
    let sender = std::thread::spawn(move || crate::remote::pump(&mut up, &mut to));
    crate::remote::pump(&mut from, &mut down);
    let _ = down.shutdown(std::net::Shutdown::Both);
    let _ = child.kill();
    let _ = child.wait();
    let _ = sender.join();
}

/// `ssh-config` with `--host`: a config file on this machine whose entries
/// (`NAME.HOST`) reach the remote VMs through `banger --host URL vm dial
/// NAME 22`, with their host keys pinned; written now, from the VMs there
/// now.
pub fn ssh_config_remote(
    client: &Client,
    remote: &Remote,
    paths: &banger_core::paths::Paths,
    json: bool,
) -> anyhow::Result<i32> {
    let vms = match client.call::<m::VmList>(banger_proto::rpc::NoParams {}, |_| {}) {
        Ok(vms) => vms,
        Err(e) => return Ok(report(e)),
    };
    let exe = std::env::current_exe()?;
    let dir = paths.state_dir.join("ssh");
    std::fs::create_dir_all(&dir)?;
    let stem: String = remote
        .url()
        .trim_start_matches("ssh://")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let config = dir.join(format!("remote-{stem}.config"));
    let known = dir.join(format!("remote-{stem}.known_hosts"));
    let mut text = format!(
        "# Written by `banger --host {url} ssh-config` from the VMs there then; run it again \
         after making VMs.\n",
        url = remote.url()
    );
    let mut hosts = String::new();
    // Every path and argument quoted: ssh expands `%` in both and runs the
    // ProxyCommand through a shell.
    let exe_word = exe
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("{} cannot be written into an ssh config", exe.display()))?;
    let known_arg = ssh_config::config_path_arg(&known, true)
        .ok_or_else(|| ssh_config::UnquotablePath(known.clone()))?;
    for vm in &vms {
        let alias = format!("{}.{}", vm.name, remote.host);
        let url = remote.url();
        let proxy =
            ssh_config::proxy_command(&[exe_word, "--host", &url, "vm", "dial", &vm.name, "22"]);
        text.push_str(&format!(
            "\nHost {alias}\n  User root\n  ProxyCommand {proxy}\n  \
             UserKnownHostsFile {known_arg}\n  StrictHostKeyChecking yes\n  HostKeyAlias {alias}\n",
        ));
        if let Some(key) = &vm.host_key {
            hosts.push_str(&format!("{alias} {key}\n"));
        }
    }
    ssh_config::write_whole(&config, &text)?;
    ssh_config::write_whole(&known, &hosts)?;
    let hint = format!(
        "then `ssh NAME.{}`, scp and sftp reach the VMs on {} with the keys you log in there \
         with.",
        remote.host, remote.host
    );
    let aliases = vms
        .iter()
        .map(|v| format!("{}.{}", v.name, remote.host))
        .collect();
    super::print_include(&config, &known, Some(aliases), &hint, json)
}
