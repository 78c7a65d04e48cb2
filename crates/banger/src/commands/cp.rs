//! `banger vm cp`: a tar stream through `vm exec` of the agent's own
//! `banger-tar`, so any image works, tar or not.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use banger_proto::agent::{exit, TAR_TOOL};
use banger_proto::rpc::m;
use banger_proto::vm::{ExecEvent, ExecParams};
use base64::Engine;

use super::report;
use super::vm::StdinLines;
use crate::client::Client;

/// `NAME:PATH` → (NAME, PATH) when NAME is a VM name; local paths with a
/// colon can be written `./a:b`.
fn remote(arg: &str) -> Option<(&str, &str)> {
    let (name, path) = arg.split_once(':')?;
    banger_core::vm::name::validate(name).ok()?;
    Some((name, path))
}

pub fn run(client: &Client, mut paths: Vec<String>) -> anyhow::Result<i32> {
    let dst = paths.pop().expect("clap asks for two paths");
    let usage = "copy between the host and one VM: `banger vm cp SRC… NAME:DST` or `banger vm cp NAME:SRC DST`";
    match (remote(&dst), paths.as_slice()) {
        (Some((name, dir)), srcs) if srcs.iter().all(|s| remote(s).is_none()) => {
            upload(client, name, srcs.to_vec(), dir.to_string())
        }
        (None, [src]) if remote(src).is_some() => {
            let (name, path) = remote(src).expect("checked");
            download(client, name, path.to_string(), dst)
        }
        _ => {
            eprintln!("error: {usage}");
            Ok(exit::BANGER_FAILED as i32)
        }
    }
}

fn upload(client: &Client, name: &str, srcs: Vec<String>, dst: String) -> anyhow::Result<i32> {
    if dst.is_empty() {
        anyhow::bail!("name where to copy to in the VM: `{name}:/path`");
    }
    let from_stdin = srcs == ["-"];
    if !from_stdin {
        for s in &srcs {
            if s == "-" {
                anyhow::bail!("`-` (a tar stream on stdin) must be the only source");
            }
            std::fs::symlink_metadata(s).map_err(|e| anyhow::anyhow!("{s}: {e}"))?;
        }
    }
    let argv = vec![TAR_TOOL.to_string(), "extract".into(), dst];
    exec_piped(
        client,
        name,
        argv,
        move |mut input| {
            let fed = if from_stdin {
                std::io::copy(&mut std::io::stdin().lock(), &mut input).map(|_| ())
            } else {
                let paths: Vec<PathBuf> = srcs.iter().map(PathBuf::from).collect();
                banger_treecopy::pack(&paths, &mut input)
            };
            if let Err(e) = fed {
                eprintln!("error: {e}");
            }
        },
        |_| {},
    )
}

fn download(client: &Client, name: &str, src: String, dst: String) -> anyhow::Result<i32> {
    let argv = vec![TAR_TOOL.to_string(), "create".into(), src];
    if dst == "-" {
        let mut stdout = std::io::stdout().lock();
        return exec_piped(
            client,
            name,
            argv,
            |_| {},
            move |chunk| {
                let _ = stdout.write_all(chunk);
            },
        );
    }
    // The stream is unpacked as it arrives, on its own thread.
    let (mut feed, drain) = UnixStream::pair()?;
    let target = PathBuf::from(&dst);
    let (done, unpacked) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(banger_treecopy::unpack(drain, &target, false));
    });
    let refused = |e: std::io::Error| -> i32 {
        eprintln!("error: unpacking into {dst}: {e}");
        exit::BANGER_FAILED as i32
    };
    let code = exec_piped(
        client,
        name,
        argv,
        |_| {},
        |chunk| {
            if feed.write_all(chunk).is_err() {
                // The unpacker stopped: say why, whatever the guest does
                // next, and leave (the guest's command is hung up).
                if let Ok(Err(e)) = unpacked.recv() {
                    std::process::exit(refused(e));
                }
            }
        },
    )?;
    drop(feed);
    match unpacked.recv() {
        Ok(Err(e)) => Ok(refused(e)),
        _ => Ok(code),
    }
}

/// Runs `argv` in the VM with `feed` writing its stdin and `out` taking its
/// stdout; stderr is passed through. Returns the command's exit status.
fn exec_piped(
    client: &Client,
    name: &str,
    argv: Vec<String>,
    feed: impl FnOnce(&mut StdinLines) + Send + 'static,
    mut out: impl FnMut(&[u8]),
) -> anyhow::Result<i32> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut stderr = std::io::stderr();
    let params = ExecParams {
        name: name.to_string(),
        argv,
        user: Some("0".into()),
        ..Default::default()
    };
    let result = client.call_streaming::<m::VmExec>(
        params,
        |event| match event {
            ExecEvent::Stdout(d) => out(&b64.decode(d).unwrap_or_default()),
            ExecEvent::Stderr(d) => {
                let _ = stderr.write_all(&b64.decode(d).unwrap_or_default());
            }
        },
        move |writer| {
            let mut input = StdinLines(writer);
            feed(&mut input);
        },
    );
    match result {
        Ok(r) => Ok(r.exit_code),
        Err(e) => {
            report(e);
            Ok(banger_proto::agent::exit::BANGER_FAILED as i32)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::remote;

    #[test]
    fn remote_paths_name_a_vm() {
        assert_eq!(remote("web:/tmp/x"), Some(("web", "/tmp/x")));
        assert_eq!(remote("web:"), Some(("web", "")));
        assert_eq!(remote("./a:b"), None);
        assert_eq!(remote("/tmp/x"), None);
        assert_eq!(remote("Web:/x"), None);
    }
}
