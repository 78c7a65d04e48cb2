//! The install routes: the Debian package `scripts/build-deb` makes,
//! unpacked into a clean directory root, boots a VM from its own files
//! only; `scripts/install` lays out the same tree under a prefix; a lone
//! `cargo install`ed banger names the fix for its missing agent.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use banger_testkit::registry::Registry;
use common::Banger;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs a repo script; its stdout.
fn script(name: &str, args: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(repo().join("scripts").join(name))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/{name} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The files every install route lays out under its prefix.
const INSTALLED: [&str; 7] = [
    "bin/banger",
    "lib/banger/banger-agent",
    "lib/banger/banger-root-helper",
    "share/bash-completion/completions/banger",
    "share/fish/vendor_completions.d/banger.fish",
    "share/man/man1/banger.1.gz",
    "share/man/man1/banger-vm-run.1.gz",
];

#[test]
fn the_debian_package_boots_a_vm_from_its_own_files() {
    let Some((kernel, _agent)) = common::vm_assets() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("deb");
    let deb = script(
        "build-deb",
        &[
            "--profile",
            "dev",
            "--no-build",
            "--fast",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    let deb = deb.trim();
    let field = |name: &str| {
        let out = Command::new("dpkg-deb")
            .args(["--field", deb, name])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    let depends = field("Depends");
    for dep in ["libc6", "e2fsprogs", "iproute2", "nftables"] {
        assert!(depends.contains(dep), "Depends: {depends}");
    }
    assert!(field("Recommends").contains("qemu-system-x86"));

    let root = tmp.path().join("root");
    let status = Command::new("dpkg-deb")
        .args(["-x", deb])
        .arg(&root)
        .status()
        .unwrap();
    assert!(status.success());
    for rel in INSTALLED
        .iter()
        .map(|r| format!("usr/{r}"))
        .chain(["usr/share/zsh/vendor-completions/_banger".into()])
        .chain(["usr/lib/systemd/user/banger.service".into()])
    {
        assert!(root.join(&rel).is_file(), "the package lacks /{rel}");
    }
    let unit = std::fs::read_to_string(root.join("usr/lib/systemd/user/banger.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/banger daemon"), "{unit}");
    let bash =
        std::fs::read_to_string(root.join("usr/share/bash-completion/completions/banger")).unwrap();
    assert!(bash.contains("/usr/bin/banger"), "{bash}");

    // The unpacked banger, with nothing from the build tree: it finds its
    // agent in /usr/lib/banger beside itself and boots a VM with it.
    let installed = root.join("usr/bin/banger");
    let mut banger = Banger::without_daemon();
    banger.use_installed(&installed);
    let doctor = String::from_utf8(banger.run(&["doctor"]).stdout).unwrap();
    let agent_line = doctor.lines().find(|l| l.contains("agent")).unwrap_or("");
    let packaged_agent = root
        .join("usr/lib/banger/banger-agent")
        .canonicalize()
        .unwrap();
    assert!(
        agent_line.contains(&packaged_agent.display().to_string()),
        "{doctor}"
    );
    let home = banger.path("user-home");
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    banger.add_env("HOME", &home);
    banger.start_daemon();
    let registry = Registry::start();
    common::add_busybox_and_kernel(&banger, &registry, tmp.path(), &kernel);
    banger.ok(&["vm", "run", "p1", "--image", "bb"]);
    let said = banger.ok(&["vm", "exec", "p1", "--", "echo", "from the package"]);
    assert_eq!(said.trim(), "from the package");
    banger.ok(&["vm", "rm", "-f", "p1"]);
}

#[test]
fn scripts_install_lays_out_a_prefix_and_a_lone_banger_names_the_fix() {
    let Some((_kernel, agent)) = common::vm_assets() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("prefix");
    let listed = script(
        "install",
        &[
            "--prefix",
            prefix.to_str().unwrap(),
            "--profile",
            "dev",
            "--no-build",
        ],
    );
    for rel in INSTALLED {
        assert!(prefix.join(rel).is_file(), "no {rel} in:\n{listed}");
    }
    assert!(prefix.join("share/zsh/site-functions/_banger").is_file());
    assert_eq!(
        std::fs::read(prefix.join("lib/banger/banger-agent")).unwrap(),
        std::fs::read(&agent).unwrap()
    );
    let mut banger = Banger::without_daemon();
    banger.use_installed(&prefix.join("bin/banger"));
    let doctor = String::from_utf8(banger.run(&["doctor"]).stdout).unwrap();
    assert!(
        doctor
            .lines()
            .any(|l| l.starts_with("ok") && l.contains("lib/banger/banger-agent")),
        "{doctor}"
    );

    // With CARGO_TARGET_DIR set, what cargo built there is what installs
    // (red team round 3, item 16: the scripts looked in target/ only).
    let moved = tmp.path().join("elsewhere");
    std::fs::create_dir_all(moved.join("debug")).unwrap();
    let wrapper = |real: &Path| {
        format!(
            "#!/bin/sh\n# built in CARGO_TARGET_DIR\nexec {} \"$@\"\n",
            real.display()
        )
    };
    let helper = Path::new(common::exe()).with_file_name("banger-root-helper");
    for (name, real) in [
        ("banger", Path::new(common::exe())),
        ("banger-root-helper", &helper),
    ] {
        let path = moved.join("debug").join(name);
        std::fs::write(&path, wrapper(real)).unwrap();
        common::must(&format!("chmod 755 {}", path.display()));
    }
    let prefix2 = tmp.path().join("prefix2");
    let out = Command::new("bash")
        .arg(repo().join("scripts/install"))
        .args([
            "--prefix",
            prefix2.to_str().unwrap(),
            "--profile",
            "dev",
            "--no-build",
        ])
        .env("CARGO_TARGET_DIR", &moved)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let installed = std::fs::read_to_string(prefix2.join("bin/banger")).unwrap_or_default();
    assert!(installed.contains("built in CARGO_TARGET_DIR"), "{out:?}");

    // What `cargo install` leaves: banger alone in a bin directory.
    let lone = tmp.path().join("cargo/bin/banger");
    std::fs::create_dir_all(lone.parent().unwrap()).unwrap();
    std::fs::copy(common::exe(), &lone).unwrap();
    let mut banger = Banger::without_daemon();
    banger.use_installed(&lone);
    let doctor = String::from_utf8(banger.run(&["doctor"]).stdout).unwrap();
    let line = doctor.lines().find(|l| l.contains("agent")).unwrap_or("");
    assert!(
        line.starts_with("FAIL")
            && line.contains("scripts/install")
            && line.contains("cargo install"),
        "{doctor}"
    );
}
