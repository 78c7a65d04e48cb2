//! `banger system install|uninstall` into a scratch root: the real
//! groupadd/usermod/groupdel (with --prefix) and the files the units need,
//! idempotent both ways, refusing root as the daemon's user; uninstall
//! leaves the root exactly as it found it, and a package's own files (used
//! in place) untouched.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

fn banger(root: &Path, args: &[&str]) -> std::process::Output {
    banger_at(Path::new(common::exe()), root, args)
}

fn banger_at(exe: &Path, root: &Path, args: &[&str]) -> std::process::Output {
    Command::new(exe)
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

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "system install tests need root"
    );
    false
}

/// A root with this machine's account files (and their backups, which the
/// shadow tools rewrite) plus a user `alice`, and `extra_group` lines.
fn scratch_root(extra_group: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    for f in ["passwd", "group", "shadow", "gshadow"] {
        for name in [f.to_string(), format!("{f}-")] {
            if Path::new("/etc").join(&name).exists() {
                std::fs::copy(Path::new("/etc").join(&name), root.join("etc").join(&name)).unwrap();
            }
        }
    }
    let append = |file: &str, line: &str| {
        let path = root.join("etc").join(file);
        let mut text = std::fs::read_to_string(&path).unwrap_or_default();
        text.push_str(line);
        std::fs::write(&path, text).unwrap();
    };
    append("passwd", "alice:x:4245:4245::/home/alice:/bin/sh\n");
    append("group", &format!("alice:x:4245:\n{extra_group}"));
    tmp
}

/// Every path under `root` with its contents (directories as empty). The
/// shadow tools' backups (`etc/group-`) hold the version before the last
/// change, whoever made it: listed, their contents not compared.
fn tree(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            if rel.starts_with("banger-home") {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
                out.insert(rel, Vec::new());
            } else if rel.starts_with("etc") && rel.to_string_lossy().ends_with('-') {
                out.insert(rel, Vec::new());
            } else {
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

/// The root holds what `before` listed, nothing more, nothing changed.
fn assert_as_before(before: &BTreeMap<PathBuf, Vec<u8>>, root: &Path) {
    let after = tree(root);
    let changed: Vec<_> = before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k))
        .collect();
    assert!(
        changed.is_empty(),
        "uninstall left the root changed: {changed:?}"
    );
}

fn assert_root_owned_copy(installed: &Path, of: &Path) {
    let meta = std::fs::metadata(installed).unwrap();
    assert_eq!(
        (meta.uid(), meta.permissions().mode() & 0o777),
        (0, 0o755),
        "{}",
        installed.display()
    );
    assert!(
        std::fs::read(installed).unwrap() == std::fs::read(of).unwrap(),
        "{} is not a copy of {}",
        installed.display(),
        of.display()
    );
}

#[test]
fn install_copies_the_binaries_writes_units_and_group_and_uninstall_leaves_the_root_as_found() {
    if !is_root() {
        return;
    }
    let Some((_, agent)) = common::vm_assets() else {
        return;
    };
    let tmp = scratch_root("");
    let root = tmp.path();
    let before = tree(root);

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
    // A build is copied, root-owned, where the units run it: banger, its
    // small root helper and the static agent every VM boots.
    let bin = root.join("usr/local/bin/banger");
    assert_root_owned_copy(&bin, Path::new(common::exe()));
    let helper_bin = root.join("usr/local/lib/banger/banger-root-helper");
    assert_root_owned_copy(&helper_bin, &common::helper_exe());
    assert_root_owned_copy(&root.join("usr/local/lib/banger/banger-agent"), &agent);
    assert!(
        unit.contains("ExecStart=/usr/local/lib/banger/banger-root-helper --socket"),
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
    assert_as_before(&before, root);
}

#[test]
fn a_packaged_banger_is_used_in_place_and_kept_by_uninstall() {
    if !is_root() {
        return;
    }
    let Some((_, agent)) = common::vm_assets() else {
        return;
    };
    // The group exists already (another admin made it): alice joins it,
    // and leaves it at uninstall; the group stays.
    let tmp = scratch_root("banger:x:997:bob\n");
    let root = tmp.path();
    for (rel, from) in [
        ("usr/bin/banger", PathBuf::from(common::exe())),
        ("usr/lib/banger/banger-root-helper", common::helper_exe()),
        ("usr/lib/banger/banger-agent", agent),
    ] {
        std::fs::create_dir_all(root.join(rel).parent().unwrap()).unwrap();
        std::fs::copy(from, root.join(rel)).unwrap();
    }
    let before = tree(root);
    let packaged = root.join("usr/bin/banger");
    let out = banger_at(
        &packaged,
        root,
        &["install", "--user", "alice", "--no-start"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !root.join("usr/local").exists(),
        "nothing copied: {}",
        text(&out)
    );
    let unit =
        std::fs::read_to_string(root.join("etc/systemd/system/banger-helper.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/lib/banger/banger-root-helper --socket"),
        "{unit}"
    );
    let user_unit = std::fs::read_to_string(root.join("etc/systemd/user/banger.service")).unwrap();
    assert!(
        user_unit.contains("ExecStart=/usr/bin/banger daemon"),
        "{user_unit}"
    );
    let group = std::fs::read_to_string(root.join("etc/group")).unwrap();
    assert!(
        group.lines().any(|l| l == "banger:x:997:bob,alice"),
        "{group}"
    );

    let out = banger_at(&packaged, root, &["uninstall", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let report = text(&out);
    assert!(
        report.contains("removed alice from group banger"),
        "{report}"
    );
    assert_as_before(&before, root);
}
