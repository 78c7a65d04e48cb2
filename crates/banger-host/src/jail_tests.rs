use super::*;
use banger_proto::jail::JailLimits;

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A stand-in jailer that runs as long as it is let: what is checked here
/// is the jail around it, not Firecracker.
fn sleeper(dir: &Path) -> PathBuf {
    let path = dir.join("jailer");
    // It makes the API socket's file where the real one's Firecracker would.
    std::fs::write(
        &path,
        "#!/bin/sh\necho \"jailer $*\"\n\
         while [ $# -gt 0 ]; do case $1 in --id) id=$2;; --chroot-base-dir) base=$2;; \
         --exec-file) exe=$2;; esac; shift; done\n\
         touch \"$base/$(basename \"$exe\")/$id/root/fc.sock\"\nexec sleep 30\n",
    )
    .unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path
}

fn jails(dir: &Path, base: PathBuf) -> RealJails {
    RealJails {
        jailer: sleeper(dir),
        base,
        records: dir.join("records"),
        uid: 4321,
        gid: 4321,
        cgroup_parent: format!("banger-test-{}", std::process::id()),
        ids: crate::jail_ids::JailIds {
            first: 1_500_002_000,
            last: 1_500_002_099,
        },
        ids_lock: dir.join("ids.lock"),
    }
}

fn request(dir: &Path) -> JailRequest {
    let file = |name: &str, writable| {
        let path = dir.join("vm").join(name);
        std::fs::write(&path, name).unwrap();
        JailFile {
            path,
            name: name.to_string(),
            writable,
        }
    };
    std::fs::create_dir_all(dir.join("vm")).unwrap();
    JailRequest {
        home: "0a1b2c3d".into(),
        vm: "web".into(),
        firecracker: dir.join("firecracker"),
        files: vec![file("vmlinux", false), file("root.ext4", true)],
        console: dir.join("vm/console.log"),
        limits: JailLimits::default(),
        tap: None,
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn a_jail_links_the_files_records_the_process_and_teardown_removes_it_all() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let j = jails(tmp.path(), tmp.path().join("jail"));
    let req = request(tmp.path());
    let id = j.launch(&req).unwrap();
    let dir = tmp.path().join("jail/firecracker/web");
    let root_dir = dir.join("root");
    // Hard links: the very files, not copies.
    let inode = |p: &Path| std::fs::metadata(p).unwrap().ino();
    assert_eq!(
        inode(&root_dir.join("root.ext4")),
        inode(&tmp.path().join("vm/root.ext4"))
    );
    // Nobody else's: its group bits are its ACL's mask (the user's entry).
    let mode = std::fs::metadata(&root_dir).unwrap().mode() & 0o707;
    assert_eq!(mode, 0o700, "the root is the jail's and the user's alone");
    assert_eq!(std::fs::metadata(&dir).unwrap().uid(), 0);
    // The jailer ran with the checked arguments, its output in the console.
    wait_until("the jailer's line in the console", || {
        std::fs::read_to_string(tmp.path().join("vm/console.log"))
            .unwrap_or_default()
            .contains("--id web")
    });
    let console = std::fs::read_to_string(tmp.path().join("vm/console.log")).unwrap();
    // Its own uid and gid, from the range: not the user's (4321), not root.
    let jail_uid = j.record("web").unwrap().jail_uid.unwrap();
    assert!(j.ids.contains(jail_uid), "{jail_uid}");
    assert!(
        console.contains(&format!("--uid {jail_uid} --gid {jail_uid}")),
        "{console}"
    );
    // The VM's files stay the user's; the jail's uid is granted each (read
    // where Firecracker reads, write where it writes) and the user the
    // jail's root, where Firecracker's sockets are.
    let vm = tmp.path().join("vm");
    assert_eq!(
        acl::user_perm(&vm.join("root.ext4"), jail_uid),
        Some(acl::RW)
    );
    assert_eq!(acl::user_perm(&vm.join("vmlinux"), jail_uid), Some(acl::R));
    assert_eq!(acl::user_perm(&root_dir, 4321), Some(acl::RWX));
    // A second VM gets another uid.
    let mut other = request(tmp.path());
    other.vm = "db".into();
    j.launch(&other).unwrap();
    let db_uid = j.record("db").unwrap().jail_uid.unwrap();
    assert_ne!(db_uid, jail_uid);
    j.teardown("db").unwrap();
    assert!(
        console.contains("-- --api-sock /fc.sock --log-path /vmm.log"),
        "{console}"
    );
    assert_eq!(j.record("web").unwrap().pid, id.pid);
    // A second launch of a VM whose process runs is refused.
    let err = j.launch(&req).unwrap_err().to_string();
    assert!(err.contains("still runs"), "{err}");
    // Signals reach only the recorded process; unknown VMs are refused.
    assert!(j.signal("db", libc::SIGTERM).is_err());
    j.signal("web", libc::SIGTERM).unwrap();
    wait_until("the process ended", || !alive(id));
    j.teardown("web").unwrap();
    assert!(!dir.exists() && j.record("web").is_none());
    // The grants went with the jail.
    assert_eq!(acl::user_perm(&vm.join("root.ext4"), jail_uid), None);
    assert_eq!(acl::user_perm(&vm.join("vmlinux"), jail_uid), None);
    // The VM's own files are untouched.
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("vm/root.ext4")).unwrap(),
        "root.ext4"
    );
    // Teardown twice, or of a VM never jailed, is fine.
    j.teardown("web").unwrap();
    j.teardown("never").unwrap();
    assert!(j.teardown("../etc").is_err());
}

#[test]
fn files_on_another_filesystem_are_bind_mounted_and_unmounted_at_teardown() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("tmpfs");
    std::fs::create_dir(&base).unwrap();
    let c = |s: &Path| std::ffi::CString::new(s.to_str().unwrap()).unwrap();
    let (src, target, fstype) = (c(Path::new("tmpfs")), c(&base), c(Path::new("tmpfs")));
    let options = c(Path::new("mode=0755"));
    // SAFETY: mounting a fresh tmpfs on our own temporary directory.
    let mounted = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            options.as_ptr().cast(),
        )
    };
    if mounted != 0 {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    }
    let j = jails(tmp.path(), base.clone());
    let req = request(tmp.path());
    let id = j.launch(&req).unwrap();
    let root_dir = base.join("firecracker/web/root");
    let kernel = root_dir.join("vmlinux");
    assert_eq!(std::fs::read_to_string(&kernel).unwrap(), "vmlinux");
    assert!(mount_points().contains(&kernel), "bind-mounted");
    // Read-only where Firecracker only reads; writable where it writes.
    assert!(std::fs::OpenOptions::new()
        .write(true)
        .open(&kernel)
        .is_err());
    std::fs::write(root_dir.join("root.ext4"), "written in the jail").unwrap();
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("vm/root.ext4")).unwrap(),
        "written in the jail"
    );
    j.teardown("web").unwrap();
    assert!(!alive(id));
    assert!(!mount_points()
        .iter()
        .any(|p| p.starts_with(base.join("firecracker"))));
    assert!(!base.join("firecracker/web").exists());
    // SAFETY: unmounting the tmpfs mounted above.
    unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
}

#[test]
fn a_jail_path_that_someone_else_could_swap_is_refused() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("jail");
    std::fs::create_dir_all(base.join("firecracker")).unwrap();
    std::fs::set_permissions(
        base.join("firecracker"),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let j = jails(tmp.path(), base.clone());
    let err = j.launch(&request(tmp.path())).unwrap_err().to_string();
    assert!(
        err.contains("owned by root and writable only by it"),
        "{err}"
    );
    assert!(j.record("web").is_none());
}

#[test]
fn cgroup_arguments_follow_the_hosts_hierarchy() {
    let v1 = Cgroups::parse(
        "cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n\
         cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n\
         cgroup2 /nonexistent/unified cgroup2 rw 0 0\n",
    );
    let limits = JailLimits {
        cpu_quota: Some(150),
        memory_mib: Some(640),
    };
    let (args, dirs) = v1.args(&limits, "banger", "web").unwrap();
    assert_eq!(
        args.join(" "),
        "--cgroup-version 1 --parent-cgroup banger --cgroup cpu.cfs_quota_us=150000 \
         --cgroup memory.limit_in_bytes=671088640"
    );
    assert_eq!(
        dirs,
        vec![
            PathBuf::from("/sys/fs/cgroup/cpu/banger/web"),
            PathBuf::from("/sys/fs/cgroup/memory/banger/web")
        ]
    );
    let v2 = Cgroups::V2(
        PathBuf::from("/sys/fs/cgroup"),
        vec!["cpu".into(), "memory".into()],
    );
    let (args, dirs) = v2.args(&limits, "banger", "web").unwrap();
    assert!(
        args.contains(&"cpu.max=150000 100000".to_string()),
        "{args:?}"
    );
    assert!(
        args.contains(&"memory.max=671088640".to_string()),
        "{args:?}"
    );
    assert_eq!(dirs, vec![PathBuf::from("/sys/fs/cgroup/banger/web")]);
    // No limits: no cgroup of its own; a quota the host cannot enforce: an error.
    let (args, dirs) = v2.args(&JailLimits::default(), "banger", "web").unwrap();
    assert_eq!(args.join(" "), "--cgroup-version 2");
    assert!(dirs.is_empty());
    let err = Cgroups::None.args(&limits, "banger", "web").unwrap_err();
    assert!(err.to_string().contains("cpu cgroup controller"), "{err}");
    assert_eq!(unescape_octal("/a\\040b"), "/a b");
}

#[test]
fn a_block_device_reaches_the_jail_as_a_node_of_the_jails_uid() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    // A loop device stands in for a dm snapshot (no device-mapper here):
    // what matters is a block device's numbers, not its kind.
    let tmp = tempfile::tempdir().unwrap();
    let backing = tmp.path().join("backing.img");
    std::fs::write(&backing, vec![0u8; 1 << 20]).unwrap();
    let out = std::process::Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&backing)
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!("skipped: no loop device");
        return;
    }
    let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let target = tmp.path().join("root.disk");
    let opened = Opened {
        file: std::fs::File::open(&dev).unwrap(),
        name: "root.disk".into(),
        writable: true,
    };
    let made = expose(&opened, &target, 4321);
    let _ = std::process::Command::new("losetup")
        .arg("-d")
        .arg(&dev)
        .status();
    made.unwrap();
    let node = std::fs::metadata(&target).unwrap();
    use std::os::unix::fs::FileTypeExt;
    assert!(node.file_type().is_block_device());
    assert_eq!(node.rdev(), std::fs::metadata(&dev).unwrap().rdev());
    assert_eq!(
        (node.uid(), node.gid(), node.mode() & 0o777),
        (4321, 4321, 0o600)
    );
}
