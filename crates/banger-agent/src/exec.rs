//! Starting a session's process: argv unchanged, its environment, working
//! directory and user, with pipes or a pseudo-terminal.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use crate::reaper::{self, Exit};

pub struct Spec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    /// `(term, cols, rows)` when the client asked for a terminal.
    pub pty: Option<(String, u16, u16)>,
    /// Run on its own: stdin /dev/null, output appended to a log.
    pub detach: bool,
}

pub enum Io {
    Pipes {
        stdin: OwnedFd,
        stdout: OwnedFd,
        stderr: OwnedFd,
    },
    Pty {
        master: OwnedFd,
    },
    /// Detached: nothing to pump; its output goes to `log`.
    Detached {
        log: String,
    },
}

pub struct Started {
    /// None for a command the agent runs itself.
    pub pid: Option<i32>,
    pub io: Io,
    pub exit: tokio::sync::oneshot::Receiver<Exit>,
}

/// Why a process could not be started, mapped to docker's exit codes.
pub struct SpawnError {
    pub code: u32,
    pub message: String,
}

pub struct Account {
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
}

/// Resolves a user name or `uid[:gid]` through the guest's /etc/passwd.
pub fn account(user: Option<&str>) -> Result<Account, String> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let lookup = |pred: &dyn Fn(&[&str]) -> bool| -> Option<Account> {
        passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() >= 7 && pred(f))
            .map(|f| Account {
                uid: f[2].parse().unwrap_or(0),
                gid: f[3].parse().unwrap_or(0),
                home: f[5].to_string(),
                shell: f[6].to_string(),
            })
    };
    let user = user.filter(|u| !u.is_empty()).unwrap_or("0");
    let (name, group) = match user.split_once(':') {
        Some((n, g)) => (n, Some(g)),
        None => (user, None),
    };
    let mut acct = if let Ok(uid) = name.parse::<u32>() {
        lookup(&|f| f[2] == name).unwrap_or(Account {
            uid,
            gid: uid,
            home: "/".into(),
            shell: "/bin/sh".into(),
        })
    } else {
        lookup(&|f| f[0] == name)
            .ok_or_else(|| format!("no user `{name}` in the guest's /etc/passwd"))?
    };
    if let Some(g) = group {
        acct.gid = match g.parse() {
            Ok(gid) => gid,
            Err(_) => {
                group_id(g).ok_or_else(|| format!("no group `{g}` in the guest's /etc/group"))?
            }
        };
    }
    Ok(acct)
}

fn group_id(name: &str) -> Option<u32> {
    std::fs::read_to_string("/etc/group")
        .ok()?
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 3 && f[0] == name)
        .and_then(|f| f[2].parse().ok())
}

pub fn spawn(spec: Spec) -> Result<Started, SpawnError> {
    let fail = |code, message: String| SpawnError { code, message };
    let Some(program) = spec.argv.first().cloned() else {
        return Err(fail(
            banger_proto::agent::exit::CANNOT_INVOKE,
            "empty command".into(),
        ));
    };
    let acct = account(spec.user.as_deref())
        .map_err(|m| fail(banger_proto::agent::exit::BANGER_FAILED, m))?;
    let tool_args = &spec.argv[1..];
    if program == banger_proto::agent::TAR_TOOL
        && spec.pty.is_none()
        && acct.uid == 0
        && crate::tar_tool::builtin(tool_args)
    {
        return in_process(tool_args.to_vec()).map_err(|e| fail(125, format!("{program}: {e}")));
    }
    let mut cmd = if crate::OWN_TOOLS.contains(&program.as_str()) {
        let mut c = Command::new("/proc/self/exe");
        c.arg0(&program);
        c
    } else {
        Command::new(&program)
    };
    cmd.args(&spec.argv[1..]).env_clear();
    cmd.env("HOME", &acct.home).env(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    for (k, v) in &spec.env {
        cmd.env(k, v);
    }
    let cwd = spec
        .cwd
        .clone()
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| {
            if std::path::Path::new(&acct.home).is_dir() {
                acct.home.clone()
            } else {
                "/".into()
            }
        });
    // Said as what it is: a missing directory is not a missing program.
    if !std::path::Path::new(&cwd).is_dir() {
        return Err(fail(
            banger_proto::agent::exit::CANNOT_INVOKE,
            format!("working directory {cwd} does not exist in the VM (-w)"),
        ));
    }
    cmd.current_dir(&cwd);
    let (uid, gid) = (acct.uid, acct.gid);
    let username = CString::new(
        std::fs::read_to_string("/etc/passwd")
            .unwrap_or_default()
            .lines()
            .find(|l| l.split(':').nth(2) == Some(&uid.to_string()))
            .and_then(|l| l.split(':').next().map(str::to_owned))
            .unwrap_or_default(),
    )
    .unwrap_or_default();

    let mut detached_log = None;
    let (io_parent, pty_slave) = match &spec.pty {
        None if spec.detach => {
            let (path, log) = detached_log_file(uid, gid)
                .map_err(|e| fail(125, format!("the detached command's log: {e}")))?;
            let err = log.try_clone().map_err(|e| fail(125, e.to_string()))?;
            cmd.stdin(Stdio::null())
                .stdout(Stdio::from(log))
                .stderr(Stdio::from(err));
            detached_log = Some(path);
            (None, None)
        }
        Some((term, cols, rows)) => {
            let ws = nix::pty::Winsize {
                ws_row: *rows,
                ws_col: *cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            let pty = nix::pty::openpty(Some(&ws), None)
                .map_err(|e| fail(125, format!("openpty: {e}")))?;
            cmd.env("TERM", term);
            let slave = pty.slave;
            cmd.stdin(Stdio::from(
                slave.try_clone().map_err(|e| fail(125, e.to_string()))?,
            ))
            .stdout(Stdio::from(
                slave.try_clone().map_err(|e| fail(125, e.to_string()))?,
            ))
            .stderr(Stdio::from(
                slave.try_clone().map_err(|e| fail(125, e.to_string()))?,
            ));
            (Some(pty.master), Some(slave))
        }
        None => {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            (None, None)
        }
    };
    let with_tty = pty_slave.is_some();
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if with_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if uid != 0 || gid != 0 {
                if !username.as_bytes().is_empty() {
                    libc::initgroups(username.as_ptr(), gid);
                } else {
                    libc::setgroups(0, std::ptr::null());
                }
                if libc::setgid(gid) < 0 || libc::setuid(uid) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let spawned = reaper::spawn_watched(|| {
        let child = cmd.spawn()?;
        Ok((child.id() as i32, child))
    });
    drop(pty_slave);
    let (mut child, exit) = spawned.map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => fail(
            banger_proto::agent::exit::NOT_FOUND,
            format!("{program}: command not found"),
        ),
        std::io::ErrorKind::PermissionDenied => fail(
            banger_proto::agent::exit::CANNOT_INVOKE,
            format!("{program}: permission denied"),
        ),
        _ => fail(
            banger_proto::agent::exit::CANNOT_INVOKE,
            format!("{program}: {e}"),
        ),
    })?;
    let pid = child.id() as i32;
    let io = match (io_parent, detached_log) {
        (_, Some(log)) => Io::Detached { log },
        (Some(master), None) => Io::Pty { master },
        (None, None) => Io::Pipes {
            stdin: child.stdin.take().expect("piped").into(),
            stdout: child.stdout.take().expect("piped").into(),
            stderr: child.stderr.take().expect("piped").into(),
        },
    };
    Ok(Started {
        pid: Some(pid),
        io,
        exit,
    })
}

/// A new log for a detached command, owned by its user: named by the time
/// it started (the pid is not known before the start).
fn detached_log_file(uid: u32, gid: u32) -> std::io::Result<(String, std::fs::File)> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = banger_proto::agent::DETACHED_LOG_DIR;
    std::fs::create_dir_all(dir)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    for n in 0..100u32 {
        let path = format!(
            "{dir}/exec-{}-{:06}-{n}.log",
            now.as_secs(),
            now.subsec_micros()
        );
        match std::fs::OpenOptions::new()
            .append(true)
            .create_new(true)
            .mode(0o640)
            .open(&path)
        {
            Ok(file) => {
                let _ = std::os::unix::fs::fchown(&file, Some(uid), Some(gid));
                return Ok((path, file));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free log name"))
}

/// Runs one of the agent's own workspace commands on a thread, with pipes
/// as its standard streams: the same to the session as a process.
fn in_process(args: Vec<String>) -> std::io::Result<Started> {
    let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from);
    let (stdin_r, stdin_w) = pipe()?;
    let (stdout_r, stdout_w) = pipe()?;
    let (stderr_r, stderr_w) = pipe()?;
    let (tx, exit) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("banger-tar".into())
        .spawn(move || {
            let code = crate::tar_tool::run(
                &args,
                std::io::BufReader::new(std::fs::File::from(stdin_r)),
                std::fs::File::from(stdout_w),
                std::fs::File::from(stderr_w),
            );
            let _ = tx.send(Exit::Code(code));
        })?;
    Ok(Started {
        pid: None,
        io: Io::Pipes {
            stdin: stdin_w,
            stdout: stdout_r,
            stderr: stderr_r,
        },
        exit,
    })
}

pub fn resize(master: &OwnedFd, cols: u16, rows: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ with a valid winsize on our pty master.
    unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
}
