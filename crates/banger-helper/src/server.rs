//! The helper's socket: who may connect (file mode and SO_PEERCRED), one
//! JSON request per line, one reply per line, one log line per request.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use banger_proto::helper::{HelperReply, HelperRequest};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

use crate::handler::Helper;
use crate::policy::Caller;

/// Longer lines are not requests.
const MAX_LINE: u64 = 64 * 1024;

/// Binds the socket: `root:group 0660` when a group is named, otherwise
/// `owner:root 0600`, so only those callers can even connect.
pub fn bind(
    socket: &Path,
    owner: Option<u32>,
    group: Option<u32>,
) -> std::io::Result<UnixListener> {
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::symlink_metadata(socket) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            std::fs::remove_file(socket)?
        }
        Ok(_) => {
            return Err(std::io::Error::other(format!(
                "{} exists and is not a socket; remove it first",
                socket.display()
            )))
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(socket)?;
    let (uid, gid, mode) = match (group, owner) {
        (Some(g), _) => (0, g, 0o660),
        (None, Some(o)) => (o, 0, 0o600),
        (None, None) => (0, 0, 0o600),
    };
    nix::unistd::chown(socket, Some(uid.into()), Some(gid.into())).map_err(std::io::Error::from)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// Serves connections until the listener fails; each on its own thread.
pub fn serve(helper: Arc<Helper>, listener: UnixListener) -> std::io::Result<()> {
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        let helper = helper.clone();
        std::thread::spawn(move || connection(&helper, conn));
    }
    Ok(())
}

fn connection(helper: &Helper, conn: UnixStream) {
    let caller = match getsockopt(&conn, PeerCredentials) {
        Ok(c) => Caller {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid() as u32,
        },
        Err(e) => {
            tracing::warn!(error = %e, "no peer credentials; closing");
            return;
        }
    };
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    if !helper.policy.admits(&caller) {
        tracing::warn!(uid = caller.uid, pid = caller.pid, "refused a caller");
        let _ = reply(
            &mut writer,
            &HelperReply::Refused(format!(
                "uid {} may not use the banger root helper (ask an admin to add you to its group)",
                caller.uid
            )),
        );
        return;
    }
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        match (&mut reader).take(MAX_LINE).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if !line.ends_with('\n') => {
                tracing::warn!(uid = caller.uid, "request too long; closing");
                let _ = reply(
                    &mut writer,
                    &HelperReply::Refused("request too long".into()),
                );
                return;
            }
            Ok(_) => {}
        }
        let started = Instant::now();
        let (op, answer) = match serde_json::from_str::<HelperRequest>(&line) {
            Ok(request) => {
                let op = request.op();
                (op, helper.handle(&caller, request))
            }
            Err(e) => (
                "malformed",
                HelperReply::Refused(format!("malformed request: {e}")),
            ),
        };
        let outcome = match &answer {
            HelperReply::Ok(_) => "ok".to_string(),
            HelperReply::Refused(m) => format!("refused: {m}"),
            HelperReply::Failed(m) => format!("failed: {m}"),
        };
        tracing::info!(
            uid = caller.uid,
            pid = caller.pid,
            op,
            outcome = %outcome,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "request"
        );
        if reply(&mut writer, &answer).is_err() {
            return;
        }
    }
}

fn reply(writer: &mut UnixStream, answer: &HelperReply) -> std::io::Result<()> {
    let mut text = serde_json::to_string(answer).map_err(std::io::Error::other)?;
    text.push('\n');
    writer.write_all(text.as_bytes())
}
