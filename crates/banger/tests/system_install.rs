//! `banger system install|uninstall` into a scratch root: the real
//! groupadd/usermod/groupdel (with --prefix) and the files the units need,
//! idempotent both ways, refusing root as the daemon's user.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

fn banger(root: &Path, args: &[&str]) -> std::process::Output {
    Command::new(common::exe())
        .args(["system"])
        .args(args)
        .arg("--root")
        .arg(root)
        .env("BANGER_HOME", root.join("banger-home"))
        .output()
        .unwrap()
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn install_writes_units_group_and_a_root_owned_binary_and_uninstall_removes_them() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var_os("CI").is_none(),
            "system install tests need root"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    for f in ["passwd", "group", "shadow", "gshadow"] {
        if Path::new("/etc").join(f).exists() {
            std::fs::copy(Path::new("/etc").join(f), root.join("etc").join(f)).unwrap();
        }
    }
    let append = |file: &str, line: &str| {
        let path = root.join("etc").join(file);
        let mut text = std::fs::read_to_string(&path).unwrap_or_default();
        text.push_str(line);
        std::fs::write(&path, text).unwrap();
    };
    append("passwd", "alice:x:4245:4245::/home/alice:/bin/sh\n");
    append("group", "alice:x:4245:\n");

    let out = banger(root, &["install", "--user", "root", "--no-start"]);
    assert!(
        !out.status.success() && text(&out).contains("must not run as root"),
        "{}",
        text(&out)
    );
    let out = banger(root, &["install", "--user", "mallory", "--no-start"]);
    assert!(
        !out.status.success() && text(&out).contains("no user named"),
        "{}",
        text(&out)
    );

    for round in 0..2 {
        let out = banger(
            root,
            &["install", "--user", "alice", "--no-start", "--json"],
        );
        assert!(out.status.success(), "{}", text(&out));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let created = report["done"].to_string().contains("created group");
        assert_eq!(created, round == 0, "the group is created once: {report}");
    }
    let unit =
        std::fs::read_to_string(root.join("etc/systemd/system/banger-helper.service")).unwrap();
    assert!(unit.contains("--group banger --owner alice"), "{unit}");
    assert!(
        unit.contains("--allow-dir /home/alice/.local/state/banger"),
        "{unit}"
    );
    let user_unit = std::fs::read_to_string(root.join("etc/systemd/user/banger.service")).unwrap();
    assert!(
        user_unit.contains("ExecStart=/usr/local/bin/banger daemon"),
        "{user_unit}"
    );
    let group = std::fs::read_to_string(root.join("etc/group")).unwrap();
    assert!(
        group
            .lines()
            .any(|l| l.starts_with("banger:") && l.ends_with(":alice")),
        "{group}"
    );
    let bin = root.join("usr/local/bin/banger");
    let meta = std::fs::metadata(&bin).unwrap();
    assert_eq!(meta.uid(), 0);
    assert_eq!(meta.permissions().mode() & 0o777, 0o755);
    assert_eq!(
        std::fs::read(&bin).unwrap(),
        std::fs::read(common::exe()).unwrap()
    );
    // The helper runs its own small binary, root-owned too.
    let helper_bin = root.join("usr/local/bin/banger-root-helper");
    let meta = std::fs::metadata(&helper_bin).unwrap();
    assert_eq!((meta.uid(), meta.permissions().mode() & 0o777), (0, 0o755));
    assert_eq!(
        std::fs::read(&helper_bin).unwrap(),
        std::fs::read(common::helper_exe()).unwrap()
    );
    assert!(
        unit.contains("ExecStart=/usr/local/bin/banger-root-helper --socket"),
        "{unit}"
    );

    for round in 0..2 {
        let out = banger(root, &["uninstall"]);
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(
            text(&out).contains("nothing to remove"),
            round == 1,
            "{}",
            text(&out)
        );
    }
    assert!(!root
        .join("etc/systemd/system/banger-helper.service")
        .exists());
    assert!(!root.join("etc/systemd/user/banger.service").exists());
    assert!(!bin.exists());
    assert!(!helper_bin.exists());
    let group = std::fs::read_to_string(root.join("etc/group")).unwrap();
    assert!(!group.lines().any(|l| l.starts_with("banger:")), "{group}");
}
