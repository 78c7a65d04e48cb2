//! `banger daemon [run|stop|status]`.

use std::time::{Duration, Instant};

use banger_core::paths::Paths;
use banger_proto::rpc::{m, NoParams};

use crate::cli::DaemonCommand;
use crate::client::{call_on, Client};

/// Exit status of `daemon status` when no daemon runs (as `systemctl
/// status` answers for a stopped unit).
const NOT_RUNNING: i32 = 3;

pub fn run(paths: Paths, cmd: Option<DaemonCommand>) -> anyhow::Result<i32> {
    match cmd.unwrap_or(DaemonCommand::Run) {
        DaemonCommand::Run => {
            super::init_daemon_logging();
            banger_daemon::run(paths)?;
            Ok(0)
        }
        DaemonCommand::Status(flags) => status(&paths, flags.json),
        DaemonCommand::Stop(flags) => stop(&paths, flags.json),
        DaemonCommand::DialStdio => crate::remote::dial_stdio(Client::new(paths).connect()?),
    }
}

/// The running daemon's status; none when no daemon answers (never
/// starts one).
fn running(paths: &Paths) -> Option<banger_proto::status::DaemonStatus> {
    let stream = Client::new(paths.clone()).connect_existing().ok()?;
    call_on::<m::DaemonStatus>(stream, NoParams {}, |_| {}).ok()
}

fn status(paths: &Paths, json: bool) -> anyhow::Result<i32> {
    let answer = running(paths);
    let Some(st) = answer else {
        if json {
            super::println_json(&serde_json::json!({
                "running": false,
                "socket": paths.socket(),
            }))?;
        } else {
            outln!(
                "no daemon is running (socket {}); any banger command starts one",
                paths.socket().display()
            );
        }
        return Ok(NOT_RUNNING);
    };
    if json {
        let mut value = serde_json::to_value(&st)?;
        value["running"] = true.into();
        super::println_json(&value)?;
    } else {
        outln!(
            "running: pid {}, version {}, socket {}, state {}",
            st.pid,
            st.version,
            st.socket,
            st.state_dir
        );
    }
    Ok(0)
}

/// SIGTERM, then wait for the process to go: the daemon stops serving and
/// leaves every VMM running (they are in process groups of their own).
fn stop(paths: &Paths, json: bool) -> anyhow::Result<i32> {
    let answer = running(paths);
    let Some(st) = answer else {
        if json {
            super::println_json(&serde_json::json!({"stopped": false, "running": false}))?;
        } else {
            outln!("no daemon is running");
        }
        return Ok(0);
    };
    let pid = nix::unistd::Pid::from_raw(st.pid as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
        .map_err(|e| anyhow::anyhow!("cannot signal the daemon (pid {}): {e}", st.pid))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(st.pid) {
        if Instant::now() > deadline {
            anyhow::bail!(
                "the daemon (pid {}) is still running 30 s after SIGTERM; see {}",
                st.pid,
                paths.daemon_log().display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if json {
        super::println_json(&serde_json::json!({"stopped": true, "pid": st.pid}))?;
    } else {
        outln!(
            "stopped the daemon (pid {}); running VMs keep running, and the next banger command \
             starts a daemon that takes them back",
            st.pid
        );
    }
    Ok(0)
}

/// Whether the process runs (a zombie, left for a parent that started it
/// to reap, has stopped).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}
