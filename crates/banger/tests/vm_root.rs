//! Real VMs and their root filesystems: the overlay root (the default)
//! shares one read-only image between VMs, each writing to its own layer;
//! the other root modes still boot; an image's file outlives its name while
//! VMs use it.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use banger_testkit::images::busybox_layer;
use banger_testkit::layer::{self, Compression};
use banger_testkit::layout::Layout;
use banger_testkit::registry::Registry;
use common::{Banger, Mounted};

fn vm_info(banger: &Banger, name: &str) -> serde_json::Value {
    let out = banger.ok(&["vm", "inspect", name]);
    serde_json::from_str::<serde_json::Value>(&out).unwrap()[0].clone()
}

/// Bytes the host really allocated for a VM's files.
fn allocated(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.blocks() * 512)
        .sum()
}

fn exec(banger: &Banger, vm: &str, script: &str) -> String {
    banger.ok(&["vm", "exec", vm, "--", "sh", "-c", script])
}

/// Mode, owner and group of each file and directory in a tar, by absolute path.
fn tar_attrs(tar: &Path) -> BTreeMap<String, (u32, u64, u64)> {
    let mut archive = tar::Archive::new(std::fs::File::open(tar).unwrap());
    let mut attrs = BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        let header = entry.header();
        if !matches!(
            header.entry_type(),
            tar::EntryType::Regular | tar::EntryType::Directory
        ) {
            continue;
        }
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let path = format!("/{}", path.trim_start_matches("./").trim_end_matches('/'));
        let path = if path == "/" {
            path
        } else {
            path.replace("//", "/")
        };
        attrs.insert(
            path,
            (
                header.mode().unwrap() & 0o7777,
                header.uid().unwrap(),
                header.gid().unwrap(),
            ),
        );
    }
    attrs
}

fn show(attrs: Option<&(u32, u64, u64)>) -> String {
    match attrs {
        Some((mode, uid, gid)) => format!("{mode:o} {uid}:{gid}"),
        None => "missing".into(),
    }
}

/// A .deb holding one script, built on the host.
fn hello_deb(dir: &Path) -> PathBuf {
    let root = dir.join("pkg");
    std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::write(
        root.join("DEBIAN/control"),
        "Package: banger-hello\nVersion: 1.0\nArchitecture: all\n\
         Maintainer: banger tests <tests@example.invalid>\n\
         Description: a package the root tests install\n",
    )
    .unwrap();
    let bin = root.join("usr/bin/banger-hello");
    std::fs::write(&bin, "#!/bin/sh\necho hello from a package\n").unwrap();
    common::must(&format!("chmod 755 {}", bin.display()));
    let deb = dir.join("banger-hello.deb");
    common::must(&format!(
        "dpkg-deb --root-owner-group -Zgzip --build {} {} >/dev/null",
        root.display(),
        deb.display()
    ));
    deb
}

#[test]
fn overlay_roots_are_private_exact_and_persistent() {
    let Some(vms) = common::DebianVms::start() else {
        return;
    };
    let (banger, debian) = (&vms.banger, &vms.tar);
    let tmp = tempfile::tempdir().unwrap();

    // A workspace works on Debian as on busybox: the agent is the guest side.
    let ws = tmp.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    std::fs::write(ws.join("hello.txt"), "hello debian\n").unwrap();
    let ws_arg = ws.to_str().unwrap();
    for (vm, extra) in [("a", vec!["--workspace", ws_arg]), ("b", vec![])] {
        let mut create = vec!["vm", "create", vm, "--image", "debian", "--memory", "256M"];
        create.extend(extra);
        banger.ok(&create);
        let info = vm_info(banger, vm);
        assert_eq!(info["root_mode"], "overlay");
        let bytes = allocated(Path::new(info["dir"].as_str().unwrap()));
        assert!(bytes < 16 << 20, "{vm} allocates {bytes} bytes on the host");
    }
    std::thread::scope(|s| {
        for vm in ["a", "b"] {
            let banger = &banger;
            s.spawn(move || banger.ok(&["vm", "start", vm]));
        }
    });
    assert_eq!(exec(banger, "a", "cat hello.txt"), "hello debian\n");
    exec(banger, "a", "echo back > /work/back.txt");
    let pulled = banger.ok(&["vm", "sync", "a", "--pull"]);
    assert!(pulled.contains("pulled 1 changed file(s)"), "{pulled}");
    assert_eq!(
        std::fs::read_to_string(ws.join("back.txt")).unwrap(),
        "back\n"
    );

    // Every file and directory of the image, seen from the guest, keeps
    // the image's mode (setuid included), owner and group.
    let listing = exec(
        banger,
        "b",
        "find / -xdev \\( -type f -o -type d \\) -printf '%m %U %G %p\\n'",
    );
    let mut seen = BTreeMap::new();
    for line in listing.lines() {
        let mut f = line.splitn(4, ' ');
        let (m, u, g, p) = (f.next(), f.next(), f.next(), f.next());
        let (Some(m), Some(u), Some(g), Some(p)) = (m, u, g, p) else {
            continue;
        };
        let mode = u32::from_str_radix(m, 8).unwrap();
        seen.insert(
            p.to_string(),
            (mode, u.parse().unwrap(), g.parse().unwrap()),
        );
    }
    // Mount points show (and hide what is under them) the mounted
    // filesystem; the agent writes resolv.conf.
    let changed_at_boot = ["/proc", "/sys", "/dev", "/run", "/work", "/etc/resolv.conf"];
    let expected = tar_attrs(debian);
    let mut compared = 0;
    let mut wrong = Vec::new();
    for (path, attrs) in &expected {
        let hidden = changed_at_boot
            .iter()
            .any(|m| path == m || path.starts_with(&format!("{m}/")));
        if hidden {
            continue;
        }
        compared += 1;
        match seen.get(path) {
            Some(got) if got == attrs => {}
            got => wrong.push(format!(
                "{path}: image {}, guest {}",
                show(Some(attrs)),
                show(got)
            )),
        }
    }
    assert!(compared > 3000, "only {compared} entries compared");
    assert!(
        wrong.is_empty(),
        "{} differ: {:#?}",
        wrong.len(),
        &wrong[..wrong.len().min(20)]
    );
    assert_eq!(seen["/usr/bin/su"].0, 0o4755, "setuid survives");

    // Each VM writes its own `/`; neither sees the other's files.
    exec(banger, "a", "echo a > /etc/only-a");
    exec(banger, "b", "echo b > /etc/only-b");
    assert_eq!(exec(banger, "a", "ls /etc/only-*"), "/etc/only-a\n");
    assert_eq!(exec(banger, "b", "ls /etc/only-*"), "/etc/only-b\n");
    let df = exec(banger, "a", "df -k / | tail -1");
    let size_kib: u64 = df.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(
        (3_500_000..4_300_000).contains(&size_kib),
        "`df /` shows the VM's writable room (4 GiB): {df}"
    );

    // A package installed with dpkg stays installed across a stop/start.
    let deb = hello_deb(tmp.path());
    banger.ok(&["vm", "cp", deb.to_str().unwrap(), "a:/tmp/hello.deb"]);
    exec(banger, "a", "dpkg -i /tmp/hello.deb >/dev/null");
    banger.ok(&["vm", "stop", "a"]);
    banger.ok(&["vm", "start", "a"]);
    assert_eq!(exec(banger, "a", "banger-hello"), "hello from a package\n");
    let status = exec(
        banger,
        "a",
        "dpkg-query -W -f='${Status}' banger-hello; cat /etc/only-a",
    );
    assert_eq!(status, "install ok installeda\n");
    assert_eq!(
        exec(banger, "b", "command -v banger-hello || echo none"),
        "none\n"
    );

    // The image is in use: refused without -f, and `image ls` says by whom.
    let err = banger.fails(&["image", "rm", "debian"]);
    assert!(err.contains("used by VM(s) a, b"), "{err}");
    let images: serde_json::Value =
        serde_json::from_str(&banger.ok(&["image", "ls", "--json"])).unwrap();
    assert_eq!(images[0]["vms"], serde_json::json!(["a", "b"]));
    banger.ok(&["vm", "rm", "-f", "a", "b"]);
    banger.ok(&["image", "rm", "debian"]);
    assert!(common::entries(&banger.path("state/images")).is_empty());
}

#[test]
fn every_root_mode_boots_and_a_repull_leaves_running_vms_alone() {
    let Some((kernel, agent)) = common::vm_assets() else {
        return;
    };
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let push = |version: &str| {
        let mut layout = Layout::new(&tmp.path().join(format!("oci-{version}")));
        let marker = layer::tar(&[layer::file("etc/version", &format!("{version}\n"), 0o644)]);
        let image = layout.image(
            &[
                (Compression::Gzip, busybox_layer()),
                (Compression::Gzip, marker),
            ],
            "amd64",
        );
        layout.tag("t", &image);
        registry.push(&layout.dir, "t", "bb:latest", &[]);
    };
    push("1");

    let mut banger = Banger::without_daemon();
    // As root, the state lives on an xfs, where the reflink mode works too.
    let _xfs = common::root_or_skip("the reflink root mode's xfs")
        .then(|| Mounted::xfs(&banger.path("state"), &tmp.path().join("xfs.img"), "1G"));
    common::start_vm_daemon(&mut banger, &agent);
    banger.ok(&["kernel", "import", kernel.to_str().unwrap()]);
    let pull_bb = || {
        banger.ok(&[
            "image",
            "pull",
            &registry.reference("bb:latest"),
            "--name",
            "bb",
        ])
    };
    pull_bb();

    let mut modes = vec![("ov", None), ("cp", Some("copy"))];
    if _xfs.is_some() {
        modes.push(("rf", Some("reflink")));
    } else {
        let err = banger.fails(&[
            "vm",
            "create",
            "rf",
            "--image",
            "bb",
            "--root-mode",
            "reflink",
        ]);
        assert!(err.contains("use --root-mode overlay"), "{err}");
    }
    let err = banger.fails(&[
        "vm",
        "create",
        "dm",
        "--image",
        "bb",
        "--root-mode",
        "dm-snapshot",
    ]);
    assert!(
        err.contains("--root-mode dm-snapshot is not available"),
        "{err}"
    );
    for (vm, mode) in &modes {
        let mut args = vec!["vm", "run", vm, "--image", "bb", "--memory", "256M"];
        if let Some(mode) = mode {
            args.extend(["--root-mode", mode]);
        }
        banger.ok(&args);
        let info = vm_info(&banger, vm);
        assert_eq!(info["root_mode"], mode.unwrap_or("overlay"), "{vm}");
        assert_eq!(exec(&banger, vm, "cat /etc/version"), "1\n", "{vm}");
        exec(&banger, vm, &format!("echo {vm} > /etc/mine"));
    }

    // A newer pull under the same name: running VMs keep the image they were
    // made from, through a restart too; a new VM gets the new one.
    push("2");
    pull_bb();
    assert_eq!(exec(&banger, "ov", "cat /etc/version /etc/mine"), "1\nov\n");
    let restarted: serde_json::Value =
        serde_json::from_str(&banger.ok(&["vm", "restart", "ov", "--json"])).unwrap();
    assert_eq!(restarted["state"], "running", "{restarted}");
    assert_eq!(exec(&banger, "ov", "cat /etc/version /etc/mine"), "1\nov\n");
    banger.ok(&["vm", "run", "ov2", "--image", "bb", "--memory", "256M"]);
    assert_eq!(exec(&banger, "ov2", "cat /etc/version"), "2\n");

    // The guest end of a workspace sync: files written, paths removed, in
    // an image without tar.
    let host = tmp.path().join("ws");
    std::fs::create_dir_all(host.join("src")).unwrap();
    std::fs::write(host.join("src/main.c"), "int main;").unwrap();
    exec(
        &banger,
        "ov2",
        "mkdir -p /work/ws/old && echo x > /work/ws/old/gone",
    );
    let mut stream = Vec::new();
    use banger_treecopy::sync::Item;
    let items = [
        Item::write("src/main.c", None),
        Item::remove("old/gone", None),
    ];
    banger_treecopy::sync::pack(&host, &items, &mut stream).unwrap();
    let mut sync = banger.cmd(&["vm", "exec", "ov2", "--", "banger-tar", "sync", "/work/ws"]);
    let out = common::with_stdin(&mut sync, &stream);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.starts_with("{\"did\":\"written\""), "{out:?}");
    assert!(said.ends_with("{\"did\":\"removed\"}\n"), "{out:?}");
    assert_eq!(
        exec(&banger, "ov2", "cat /work/ws/src/main.c; ls /work/ws"),
        "int main;src\n"
    );
    let images_dir = banger.path("state/images");
    assert_eq!(
        common::entries(&images_dir).len(),
        2,
        "both pulls' files kept"
    );

    // `image rm -f` drops the name; the files stay until their VMs go.
    banger.ok(&["image", "rm", "-f", "bb"]);
    assert_eq!(common::entries(&images_dir).len(), 2);
    banger.ok(&["vm", "restart", "ov"]);
    assert_eq!(exec(&banger, "ov", "cat /etc/version /etc/mine"), "1\nov\n");
    banger.ok(&["vm", "rm", "-f", "ov"]);
    assert_eq!(
        common::entries(&images_dir).len(),
        1,
        "the first pull's file went with ov"
    );
    let mut rm = vec!["vm", "rm", "-f", "ov2"];
    rm.extend(modes.iter().map(|(vm, _)| *vm).filter(|vm| *vm != "ov"));
    banger.ok(&rm);
    assert!(common::entries(&images_dir).is_empty());
}
