//! `vm port-forward` with `--host`: the port opens on this machine. The
//! remote daemon forwards a port on its own loopback to the VM (as for a
//! local user), and each connection to the local port is carried there by
//! `ssh -W` over the shared SSH connection.

use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::mpsc;

use banger_proto::rpc::m;
use banger_proto::vm::{ForwardEvent, PortForwardParams};

use super::report;
use crate::client::Client;
use crate::remote::Remote;

pub fn run(
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
                |event: ForwardEvent| {
                    let _ = ready.send(event.listening);
                },
                |_writer| {},
            )
        });
        // The remote end is listening, or the call ended (with its error).
        let Ok(there) = listening.recv() else {
            return match forwarding.join().expect("the forwarding thread") {
                Ok(_) => Ok(0),
                Err(e) => Ok(report(e)),
            };
        };
        let event = ForwardEvent {
            listening: local.to_string(),
            guest_port,
        };
        if json {
            println!("{}", serde_json::to_string(&event)?);
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
        match forwarding.join().expect("the forwarding thread") {
            Ok(_) => Ok(0),
            Err(e) => Ok(report(e)),
        }
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
