//! A daemon on another machine, reached over SSH the way docker contexts
//! do: each connection is `ssh HOST banger daemon dial-stdio`, which joins
//! its standard input and output to the remote daemon's socket (starting
//! that daemon as a local command would). The CLI sees a Unix stream, so
//! every command speaks the same protocol to it. One SSH master connection
//! (OpenSSH's ControlMaster) is shared by consecutive commands.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context};
use banger_core::vm::ssh_config::shell_word;

/// `ssh://[user@]host[:port]`, from `--host` or `BANGER_HOST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
}

/// A DNS host name (labels of letters, digits and inner `-`) or an IP
/// address: nothing a shell or ssh would read as more than a name.
fn is_host(host: &str) -> bool {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

impl Remote {
    pub fn parse(url: &str) -> anyhow::Result<Remote> {
        let Some(rest) = url.strip_prefix("ssh://") else {
            bail!(
                "--host `{url}`: banger reaches other machines over SSH: ssh://[user@]host[:port]"
            );
        };
        let rest = rest.trim_end_matches('/');
        let (user, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) if !u.is_empty() => (Some(u.to_string()), h),
            Some(_) => bail!("--host `{url}` names an empty user"),
            None => (None, rest),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') || h.starts_with('[') => {
                let port = p
                    .parse::<u16>()
                    .with_context(|| format!("--host `{url}`: `{p}` is not a port"))?;
                (h.trim_start_matches('[').trim_end_matches(']'), Some(port))
            }
            _ => (hostport, None),
        };
        // Strictly a user name and a host name or address: both end up in
        // ssh's arguments and in ssh config files others' shells run.
        if let Some(u) = &user {
            let plain = u.len() <= 64
                && !u.starts_with('-')
                && u.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
            if !plain {
                bail!("--host `{url}`: `{u}` is not a user name (letters, digits, `.`, `_`, `-`)");
            }
        }
        if !is_host(host) {
            bail!("--host `{url}`: `{host}` is not a host name or address");
        }
        if port == Some(0) {
            bail!("--host `{url}`: port 0 is no port");
        }
        Ok(Remote {
            user,
            host: host.to_string(),
            port,
        })
    }

    /// The remote named by `--host`, else `BANGER_HOST`; none means local.
    pub fn chosen(flag: Option<&str>) -> anyhow::Result<Option<Remote>> {
        let env = std::env::var("BANGER_HOST").ok();
        match flag.or(env.as_deref()).filter(|s| !s.is_empty()) {
            Some(url) => Remote::parse(url).map(Some),
            None => Ok(None),
        }
    }

    /// `[user@]host` as ssh takes it (and `-p` for the port).
    pub fn destination(&self) -> String {
        match &self.user {
            Some(u) => format!("{u}@{}", self.host),
            None => self.host.clone(),
        }
    }

    pub fn url(&self) -> String {
        match self.port {
            Some(p) => format!("ssh://{}:{p}", self.destination()),
            None => format!("ssh://{}", self.destination()),
        }
    }

    /// `ssh` (or `BANGER_SSH_COMMAND`, split on spaces, as git's
    /// GIT_SSH_COMMAND) with the options every connection shares, then
    /// `opts`, ending in the destination; the caller adds what to run.
    pub fn ssh(&self, opts: &[&str]) -> Command {
        let words: Vec<String> = std::env::var("BANGER_SSH_COMMAND")
            .ok()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| "ssh".into())
            .split_whitespace()
            .map(String::from)
            .collect();
        let mut cmd = Command::new(&words[0]);
        cmd.args(&words[1..]);
        if let Some(dir) = control_dir() {
            // One authenticated connection serves the commands that follow
            // for a minute: each new command costs a channel, not a login.
            cmd.arg("-o")
                .arg("ControlMaster=auto")
                .arg("-o")
                .arg(format!("ControlPath={}/%C", dir.display()))
                .arg("-o")
                .arg("ControlPersist=60");
        }
        if let Some(port) = self.port {
            cmd.arg("-p").arg(port.to_string());
        }
        cmd.args(opts);
        cmd.arg("--").arg(self.destination());
        cmd
    }

    /// The remote banger command line: `BANGER_REMOTE_COMMAND` (default
    /// `banger`, found on the remote PATH), then `args`.
    pub fn banger_line(args: &[&str]) -> String {
        let banger = std::env::var("BANGER_REMOTE_COMMAND")
            .ok()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| "banger".into());
        let mut line = banger;
        for a in args {
            line.push(' ');
            line.push_str(&shell_word(a));
        }
        line
    }

    /// A connection to the remote daemon.
    pub fn connect(&self) -> anyhow::Result<UnixStream> {
        let mut child = self
            .ssh(&[])
            .arg(Remote::banger_line(&["daemon", "dial-stdio"]))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting ssh to reach {}", self.url()))?;
        let (ours, theirs) = UnixStream::pair().context("a socket pair")?;
        let mut to_ssh = child.stdin.take().expect("piped");
        let mut from_ssh = child.stdout.take().expect("piped");
        let mut up = theirs.try_clone().context("cloning a socket")?;
        let mut down = theirs;
        std::thread::spawn(move || {
            pump(&mut up, &mut to_ssh);
            // Our side finished sending: ssh closes the remote's stdin.
            drop(to_ssh);
        });
        std::thread::spawn(move || {
            pump(&mut from_ssh, &mut down);
            let _ = down.shutdown(std::net::Shutdown::Both);
            reap(child);
        });
        Ok(ours)
    }

    /// Runs `banger ARGS` on the remote host, with this terminal; its exit code.
    pub fn run_there(&self, args: &[&str], tty: bool) -> anyhow::Result<i32> {
        let status = self
            .ssh(if tty { &["-t"] } else { &[] })
            .arg(Remote::banger_line(args))
            .status()
            .with_context(|| format!("running ssh to {}", self.url()))?;
        Ok(status.code().unwrap_or(1))
    }
}

/// Bytes from `from` to `to` as they come, until either end is done. Not
/// `std::io::copy`: from a socket into a pipe it splices, and a splice from
/// a Unix socket can sit on bytes already there.
pub fn pump(from: &mut impl Read, to: &mut impl Write) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).and_then(|()| to.flush()).is_err() {
                    return;
                }
            }
        }
    }
}

fn reap(mut child: Child) {
    let _ = child.wait();
}

/// Where the SSH master connections' sockets live (short: socket paths are
/// limited to ~100 bytes).
fn control_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    // SAFETY: getuid has no preconditions.
    let dir = base.join(format!("banger-ssh-{}", unsafe { libc::getuid() }));
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => Some(dir),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            use std::os::unix::fs::MetadataExt;
            // Another user's directory of that name is not ours to use.
            let meta = std::fs::symlink_metadata(&dir).ok()?;
            (meta.is_dir() && meta.uid() == unsafe { libc::getuid() }).then_some(dir)
        }
        Err(_) => None,
    }
}

/// `banger daemon dial-stdio`: this process's stdin and stdout joined to
/// the local daemon's socket (started when none runs), until both ends are done.
pub fn dial_stdio(stream: UnixStream) -> anyhow::Result<i32> {
    let mut up = stream.try_clone()?;
    let sender = std::thread::spawn(move || {
        pump(&mut std::io::stdin().lock(), &mut up);
        let _ = up.shutdown(std::net::Shutdown::Write);
    });
    let mut down = stream;
    pump(&mut down, &mut std::io::stdout().lock());
    // The daemon answered and hung up: the caller's remaining input is moot.
    drop(sender);
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_user_host_and_port() {
        let r = Remote::parse("ssh://dev@build.example:2222").unwrap();
        assert_eq!(
            (r.user.as_deref(), r.host.as_str(), r.port),
            (Some("dev"), "build.example", Some(2222))
        );
        assert_eq!(r.url(), "ssh://dev@build.example:2222");
        let r = Remote::parse("ssh://box").unwrap();
        assert_eq!((r.user, r.host.as_str(), r.port), (None, "box", None));
        let r = Remote::parse("ssh://[::1]:22").unwrap();
        assert_eq!((r.host.as_str(), r.port), ("::1", Some(22)));
        for bad in [
            "box",
            "tcp://box",
            "ssh://",
            "ssh://-oProxyCommand=x",
            "ssh://a:b",
            "ssh://@box",
            // Shell and option syntax in each part (red team round 3, item 12).
            "ssh://a$(touch /tmp/x)@box",
            "ssh://a@box$(id)",
            "ssh://a@box;id",
            "ssh://a b@box",
            "ssh://-l@box",
            "ssh://a@-box",
            "ssh://a@box:0",
            "ssh://a@bo`id`x",
            "ssh://a@box%h",
            "ssh://a@[::1;id]:22",
        ] {
            assert!(Remote::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn remote_words_are_quoted_for_the_shell() {
        assert_eq!(shell_word("dial-stdio"), "dial-stdio");
        assert_eq!(shell_word("a b"), "'a b'");
        assert_eq!(shell_word("it's"), "'it'\\''s'");
        assert_eq!(shell_word(""), "''");
    }
}
