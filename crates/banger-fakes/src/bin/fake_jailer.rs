//! A stand-in for Firecracker's `jailer`, for tests on machines without a
//! Firecracker build. It does what the real jailer 1.16 does with the
//! arguments banger gives it, in the same order, and fails where it fails:
//!
//! - `--id` (letters, digits, `-`, at most 64), `--exec-file` (canonical,
//!   a file), `--chroot-base-dir` (canonical, a directory); the jail is
//!   `<base>/<exec file name>/<id>/root`, created as needed.
//! - The exec file is copied in (never through a link, never onto a file
//!   with other links) and owned by `--uid`/`--gid`.
//! - `--netns PATH` is joined; cgroups (`--cgroup-version 1|2`,
//!   `--parent-cgroup`, `--cgroup FILE=VALUE`) are made at
//!   `<hierarchy>/<parent>/<id>`, written, and the process moved in.
//! - A new mount namespace, the jail bind-mounted on itself and
//!   `pivot_root`ed into; `/`, `/dev`, `/dev/net`, `/run` made 0700 and
//!   given to the uid; `/dev/net/tun`, `/dev/kvm`, `/dev/urandom` made as
//!   device nodes of the uid (and `/dev/userfaultfd` where the host has
//!   it); `/<name>.pid` holds the pid, root's.
//! - The copy is exec'd as the uid and gid, with no supplementary groups,
//!   as `/<name> --id ID --start-time-us N --start-time-cpu-us N
//!   --parent-cpu-time-us N <arguments after -->`: the same process.
//!
//! `--daemonize` and `--new-pid-ns` are refused: banger never asks for them.

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

struct Args {
    id: String,
    exec_file: PathBuf,
    uid: u32,
    gid: u32,
    base: PathBuf,
    netns: Option<PathBuf>,
    cgroup_version: u8,
    parent_cgroup: Option<String>,
    cgroups: Vec<String>,
    extra: Vec<String>,
}

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("{msg}");
    std::process::exit(1)
}

fn parse() -> Args {
    let mut argv = std::env::args().skip(1);
    let (mut id, mut exec_file, mut uid, mut gid, mut base) = (None, None, None, None, None);
    let (mut netns, mut parent_cgroup, mut cgroups, mut extra) =
        (None, None, Vec::new(), Vec::new());
    let mut cgroup_version = 1u8;
    while let Some(arg) = argv.next() {
        let mut value = || {
            argv.next()
                .unwrap_or_else(|| fail(format!("Argument `{}` requires a value", &arg[2..])))
        };
        match arg.as_str() {
            "--id" => id = Some(value()),
            "--exec-file" => exec_file = Some(value()),
            "--uid" => uid = Some(value()),
            "--gid" => gid = Some(value()),
            "--chroot-base-dir" => base = Some(value()),
            "--netns" => netns = Some(PathBuf::from(value())),
            "--cgroup-version" => {
                let v = value();
                cgroup_version = v
                    .parse()
                    .ok()
                    .filter(|v| *v == 1 || *v == 2)
                    .unwrap_or_else(|| fail(format!("Invalid cgroup version: {v}")));
            }
            "--parent-cgroup" => parent_cgroup = Some(value()),
            "--cgroup" => cgroups.push(value()),
            "--daemonize" | "--new-pid-ns" => fail(format!("the fake jailer does not {arg}")),
            "--" => {
                extra.extend(argv.by_ref());
                break;
            }
            other => fail(format!("Found argument '{other}' which wasn't expected")),
        }
    }
    let need = |v: Option<String>, name: &str| {
        v.unwrap_or_else(|| fail(format!("Missing argument: {name}")))
    };
    let id = need(id, "id");
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        fail(format!("Invalid instance ID: {id}"));
    }
    let number = |v: String, what: &str| {
        v.parse::<u32>()
            .unwrap_or_else(|_| fail(format!("Invalid {what}: {v}")))
    };
    Args {
        id,
        exec_file: PathBuf::from(need(exec_file, "exec-file")),
        uid: number(need(uid, "uid"), "uid"),
        gid: number(need(gid, "gid"), "gid"),
        base: PathBuf::from(need(base, "chroot-base-dir")),
        netns,
        cgroup_version,
        parent_cgroup,
        cgroups,
        extra,
    }
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap_or_else(|_| fail("a path with a NUL byte"))
}

fn check(rc: i32, what: &str) {
    if rc != 0 {
        fail(format!("{what}: {}", std::io::Error::last_os_error()));
    }
}

/// Copies the exec file into the jail, as the real jailer does.
fn copy_exec(exec: &Path, root: &Path, uid: u32, gid: u32) -> PathBuf {
    let name = exec
        .file_name()
        .unwrap_or_else(|| fail("no exec file name"));
    let dst = root.join(name);
    let mode = std::fs::metadata(exec)
        .unwrap_or_else(|e| {
            fail(format!(
                "Failed to get metadata for {}: {e}",
                exec.display()
            ))
        })
        .mode();
    let mut src = std::fs::File::open(exec)
        .unwrap_or_else(|e| fail(format!("Failed to open {}: {e}", exec.display())));
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&dst)
        .unwrap_or_else(|e| fail(format!("Failed to open {}: {e}", dst.display())));
    if out.metadata().map(|m| m.nlink()).unwrap_or(1) > 1 {
        fail(format!("{} is a hard link", dst.display()));
    }
    std::os::unix::fs::fchown(&out, Some(uid), Some(gid))
        .unwrap_or_else(|e| fail(format!("Failed to change owner of {}: {e}", dst.display())));
    std::io::copy(&mut src, &mut out)
        .unwrap_or_else(|e| fail(format!("Failed to copy {}: {e}", exec.display())));
    PathBuf::from("/").join(name)
}

/// The mount point of the v1 hierarchy holding `controller`, or the v2 one.
fn hierarchy(version: u8, controller: &str) -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 {
            continue;
        }
        match (version, f[2]) {
            (2, "cgroup2") => return PathBuf::from(f[1]),
            (1, "cgroup") if f[3].split(',').any(|o| o == controller) => {
                return PathBuf::from(f[1])
            }
            _ => {}
        }
    }
    fail(format!("Controller {controller} is unavailable"))
}

fn setup_cgroups(args: &Args) {
    let parent = args.parent_cgroup.clone().unwrap_or_else(|| {
        args.exec_file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let mut joined = Vec::new();
    for cg in &args.cgroups {
        let Some((file, value)) = cg.split_once('=').filter(|(_, v)| !v.is_empty()) else {
            fail(format!("Invalid format for cgroups: {cg}"));
        };
        let controller = file.split('.').next().unwrap_or_default();
        let dir = hierarchy(args.cgroup_version, controller)
            .join(&parent)
            .join(&args.id);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| fail(format!("Failed to create directory {}: {e}", dir.display())));
        if args.cgroup_version == 2 {
            // Each level above must hand the controller down.
            let root = hierarchy(2, controller);
            let mut at = dir.parent().map(Path::to_path_buf);
            let mut chain = Vec::new();
            while let Some(p) = at.filter(|p| p.starts_with(&root)) {
                chain.push(p.clone());
                at = p.parent().map(Path::to_path_buf);
            }
            for p in chain.iter().rev() {
                let _ = std::fs::write(p.join("cgroup.subtree_control"), format!("+{controller}"));
            }
        }
        std::fs::write(dir.join(file), format!("{value}\n")).unwrap_or_else(|e| {
            fail(format!(
                "Failed to write to {}: {e}",
                dir.join(file).display()
            ))
        });
        if !joined.contains(&dir) {
            joined.push(dir);
        }
    }
    let pid = std::process::id().to_string();
    for dir in joined {
        let procs = if args.cgroup_version == 2 {
            "cgroup.procs"
        } else {
            "tasks"
        };
        std::fs::write(dir.join(procs), &pid).unwrap_or_else(|e| {
            fail(format!(
                "Failed to write to {}: {e}",
                dir.join(procs).display()
            ))
        });
    }
}

fn pivot_into(root: &Path) {
    // SAFETY: plain system calls on paths built here; this process is
    // single-threaded.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS), "unshare");
        let slash = cstr(Path::new("/"));
        check(
            libc::mount(
                std::ptr::null(),
                slash.as_ptr(),
                std::ptr::null(),
                libc::MS_SLAVE | libc::MS_REC,
                std::ptr::null(),
            ),
            "making mounts slaves",
        );
        let r = cstr(root);
        check(
            libc::mount(
                r.as_ptr(),
                r.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ),
            "bind-mounting the jail",
        );
        std::env::set_current_dir(root).unwrap_or_else(|e| fail(format!("chdir: {e}")));
        let old = cstr(Path::new("old_root"));
        check(libc::mkdir(old.as_ptr(), 0o600), "mkdir old_root");
        let dot = cstr(Path::new("."));
        check(
            libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), old.as_ptr()) as i32,
            "pivot_root",
        );
        check(libc::chdir(slash.as_ptr()), "chdir /");
        check(
            libc::umount2(old.as_ptr(), libc::MNT_DETACH),
            "umount old_root",
        );
        check(libc::rmdir(old.as_ptr()), "rmdir old_root");
    }
}

fn own_dirs_and_devices(uid: u32, gid: u32, uffd: Option<u32>) {
    for dir in ["/", "/dev", "/dev/net", "/run"] {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| fail(format!("mkdir {dir}: {e}")));
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .unwrap_or_else(|e| fail(format!("chmod {dir}: {e}")));
        std::os::unix::fs::chown(dir, Some(uid), Some(gid))
            .unwrap_or_else(|e| fail(format!("Failed to change owner of {dir}: {e}")));
    }
    let mut devices = vec![
        ("/dev/net/tun", 10, 200, true),
        ("/dev/kvm", 10, 232, true),
        ("/dev/urandom", 1, 9, false),
    ];
    if let Some(minor) = uffd {
        devices.push(("/dev/userfaultfd", 10, minor, true));
    }
    for (dev, major, minor, required) in devices {
        let path = cstr(Path::new(dev));
        // SAFETY: mknod and chown on a NUL-terminated path.
        let made = unsafe {
            libc::mknod(
                path.as_ptr(),
                libc::S_IFCHR | libc::S_IRUSR | libc::S_IWUSR,
                libc::makedev(major, minor),
            ) == 0
                && libc::chown(path.as_ptr(), uid, gid) == 0
        };
        if !made && required {
            fail(format!(
                "Failed to create {dev} via mknod: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
}

/// `/dev/userfaultfd`, when the host has one (its minor is in /proc/misc,
/// read before the pivot).
fn userfaultfd_minor() -> Option<u32> {
    let misc = std::fs::read_to_string("/proc/misc").ok()?;
    misc.lines()
        .find(|l| l.trim_end().ends_with(" userfaultfd"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn micros(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

fn main() {
    let start = micros(libc::CLOCK_MONOTONIC);
    let args = parse();
    let exec = args.exec_file.canonicalize().unwrap_or_else(|e| {
        fail(format!(
            "Failed to canonicalize path {}: {e}",
            args.exec_file.display()
        ))
    });
    if !exec.is_file() {
        fail(format!("{} is not a file", exec.display()));
    }
    let base = args.base.canonicalize().unwrap_or_else(|e| {
        fail(format!(
            "Failed to canonicalize path {}: {e}",
            args.base.display()
        ))
    });
    if !base.is_dir() {
        fail(format!("{} is not a directory", base.display()));
    }
    let root = base
        .join(exec.file_name().unwrap_or_default())
        .join(&args.id)
        .join("root");
    std::fs::create_dir_all(&root).unwrap_or_else(|e| {
        fail(format!(
            "Failed to create directory {}: {e}",
            root.display()
        ))
    });
    let inside = copy_exec(&exec, &root, args.uid, args.gid);
    if let Some(netns) = &args.netns {
        let ns = std::fs::File::open(netns)
            .unwrap_or_else(|e| fail(format!("Failed to open file {}: {e}", netns.display())));
        // SAFETY: setns on a namespace file we hold open.
        check(
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) },
            "Failed to join network namespace",
        );
    }
    if !args.cgroups.is_empty() {
        setup_cgroups(&args);
    }
    let uffd = userfaultfd_minor();
    pivot_into(&root);
    own_dirs_and_devices(args.uid, args.gid, uffd);
    // Its pid, beside the copy (root's, as the real jailer leaves it).
    let pid_file = format!("{}.pid", inside.display());
    std::fs::write(&pid_file, std::process::id().to_string())
        .unwrap_or_else(|e| fail(format!("Failed to write {pid_file}: {e}")));
    let _ = std::io::stdout().flush();
    let err = std::process::Command::new(&inside)
        .args(["--id", &args.id])
        .args(["--start-time-us", &start.to_string()])
        .args([
            "--start-time-cpu-us",
            &micros(libc::CLOCK_PROCESS_CPUTIME_ID).to_string(),
        ])
        .args(["--parent-cpu-time-us", "0"])
        .args(&args.extra)
        .uid(args.uid)
        .gid(args.gid)
        .exec();
    fail(format!("Failed to exec into Firecracker: {err}"))
}
