//! Real VMs with a workspace: a git repository mirrored into the guest at
//! start, and every later host change synced before each `vm exec`.

mod common;

use std::path::Path;

use banger_testkit::images::push_busybox;
use banger_testkit::registry::Registry;
use common::Banger;

fn write(dir: &Path, rel: &str, data: &[u8]) {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

/// A repository: ignored files, symlinks in and out, an executable, a 10 MB
/// file and 5,000 small ones.
fn project(dir: &Path) -> Vec<String> {
    banger_testkit::git(dir, &["init", "-q"]);
    write(dir, ".gitignore", b"*.o\ntarget/\n");
    write(dir, "build.sh", b"#!/bin/sh\necho built\n");
    common::must(&format!("chmod 755 {}", dir.join("build.sh").display()));
    write(dir, "big.bin", &vec![7u8; 10 << 20]);
    for i in 0..5000 {
        write(
            dir,
            &format!("src/m{}/f{i}.txt", i % 50),
            format!("{i}\n").as_bytes(),
        );
    }
    write(dir, "main.o", b"ignored");
    write(dir, "target/debug/app", b"ignored");
    std::os::unix::fs::symlink("build.sh", dir.join("run")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", dir.join("outside")).unwrap();
    banger_testkit::git(dir, &["add", "."]);
    banger_testkit::git(dir, &["commit", "-qm", "start"]);
    write(dir, "notes.md", b"untracked, not ignored\n");
    let listed = banger_testkit::git(
        dir,
        &["ls-files", "--cached", "--others", "--exclude-standard"],
    );
    let mut listed: Vec<String> = listed.lines().map(|l| format!("/work/{l}")).collect();
    listed.sort();
    listed
}

#[test]
fn a_workspace_is_mirrored_and_kept_current_before_each_exec() {
    let Some((kernel, agent)) = common::vm_assets() else {
        return;
    };
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    push_busybox(&registry, &tmp.path().join("oci"), "busybox:latest");
    let dir = tmp.path().join("app");
    std::fs::create_dir(&dir).unwrap();
    let listed = project(&dir);
    let mut banger = Banger::without_daemon();
    common::start_vm_daemon(&mut banger, &agent);
    banger.ok(&["kernel", "import", kernel.to_str().unwrap()]);
    banger.ok(&["image", "pull", &registry.reference("busybox:latest")]);

    // Refused, with nothing made.
    let ws = dir.to_str().unwrap();
    for (args, why) in [
        (vec!["--workspace", "/"], "cannot be `/`"),
        (vec!["--workspace", "/no/such/dir"], "No such file"),
        (
            vec!["--workspace", ws, "--workspace-path", "/etc"],
            "on the work disk",
        ),
        (vec!["--workspace-path", "/work/x"], "needs --workspace"),
    ] {
        let mut create = vec!["vm", "create", "bad", "--image", "busybox"];
        create.extend(args);
        let err = banger.fails(&create);
        assert!(err.contains(why), "{err}");
        assert!(banger.run(&["vm", "inspect", "bad"]).status.code() != Some(0));
    }

    banger.ok(&[
        "vm",
        "run",
        "ws",
        "--image",
        "busybox",
        "--memory",
        "256M",
        "--workspace",
        ws,
    ]);
    let exec = |args: &[&str]| {
        let mut all = vec!["vm", "exec", "ws"];
        all.extend(args);
        let out = banger.run(&all);
        assert!(out.status.success(), "{out:?}");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // What git lists, and nothing else, is there before the first command.
    let (found, synced) = exec(&["--", "sh", "-c", "find /work -type f -o -type l | sort"]);
    assert_eq!(synced, "", "nothing changed since the start's sync");
    let found: Vec<&str> = found.lines().collect();
    assert_eq!(found, listed.iter().map(String::as_str).collect::<Vec<_>>());
    let (out, _) = exec(&[
        "--",
        "sh",
        "-c",
        "pwd; ./run; readlink outside; wc -c < big.bin",
    ]);
    assert_eq!(out, "/work\nbuilt\n/etc/passwd\n10485760\n");
    let info: serde_json::Value =
        serde_json::from_str(&banger.ok(&["vm", "inspect", "ws"])).unwrap();
    assert_eq!(info[0]["workspace"]["host_dir"], ws);
    assert_eq!(info[0]["workspace"]["guest_path"], "/work");
    assert!(info[0]["workspace"]["last_sync"].is_string());

    // Edit, add, chmod and delete on the host: the next exec sees it all.
    write(&dir, "src/m1/f1.txt", b"edited\n");
    write(&dir, "added.txt", b"new\n");
    common::must(&format!("chmod 700 {}", dir.join("notes.md").display()));
    std::fs::remove_file(dir.join("src/m2/f2.txt")).unwrap();
    let (out, synced) = exec(&[
        "--",
        "sh",
        "-c",
        "cat src/m1/f1.txt added.txt; stat -c %a notes.md; ls src/m2/f2.txt 2>&1 || true",
    ]);
    assert_eq!(
        synced.trim(),
        "synced 3 changed file(s), 1 removed (34 B) into ws:/work"
    );
    assert!(out.starts_with("edited\nnew\n700\n"), "{out}");
    assert!(out.contains("No such file"), "{out}");

    // --no-sync runs on what is there; `vm sync` sends it after.
    write(&dir, "added.txt", b"newer\n");
    let (out, synced) = exec(&["--no-sync", "--", "cat", "added.txt"]);
    assert_eq!((out.as_str(), synced.as_str()), ("new\n", ""));
    assert_eq!(
        banger.ok(&["vm", "sync", "ws"]).trim(),
        "synced 1 changed file(s), 0 removed (6 B) into ws:/work"
    );
    assert_eq!(
        banger.ok(&["vm", "sync", "ws"]).trim(),
        "ws:/work is up to date"
    );
    let (out, synced) = exec(&["--", "cat", "added.txt"]);
    assert_eq!((out.as_str(), synced.as_str()), ("newer\n", ""));
    banger.ok(&["vm", "rm", "-f", "ws"]);
}
