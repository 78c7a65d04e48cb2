//! The conventions every command keeps, without booting a VM: `--json`
//! always prints JSON (errors too), `-q` on lists, `vm ls --filter`,
//! several names at once, shell completion with names from the daemon,
//! man pages, `daemon status|stop`.

mod common;

use banger_testkit::registry::Registry;
use common::Banger;

fn json(banger: &Banger, args: &[&str]) -> serde_json::Value {
    let out = banger.ok(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("banger {args:?}: {e}: {out}"))
}

/// What the shell's Tab offers for `words` (the last one being completed).
fn complete(banger: &Banger, words: &[&str]) -> Vec<String> {
    let out = banger
        .cmd(&[&["--", "banger"], words].concat())
        .env("COMPLETE", "bash")
        .env("_CLAP_IFS", "\n")
        .env("_CLAP_COMPLETE_INDEX", words.len().to_string())
        .env("_CLAP_COMPLETE_COMP_TYPE", "9")
        .env("_CLAP_COMPLETE_SPACE", "true")
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.starts_with('-'))
        .collect()
}

#[test]
fn every_command_keeps_the_conventions() {
    let registry = Registry::start();
    let banger = Banger::start();
    common::busybox_and_fake_kernel(&banger, &registry);
    for vm in ["web-1", "web-2", "db"] {
        banger.ok(&["vm", "create", vm, "--image", "busybox", "--kernel", "k"]);
    }

    // Lists: names only, filtered.
    assert_eq!(banger.ok(&["vm", "ls", "-q"]), "db\nweb-1\nweb-2\n");
    assert_eq!(banger.ok(&["image", "ls", "-q"]), "busybox\n");
    assert_eq!(banger.ok(&["kernel", "ls", "--quiet"]), "k\n");
    assert_eq!(banger.ok(&["snapshot", "ls", "-q"]), "");
    assert_eq!(
        banger.ok(&[
            "vm",
            "ls",
            "-q",
            "--filter",
            "name=web",
            "--filter",
            "state=stopped"
        ]),
        "web-1\nweb-2\n"
    );
    assert_eq!(
        banger.ok(&["vm", "ls", "-q", "--filter", "state=running"]),
        ""
    );
    let filtered = json(
        &banger,
        &["vm", "ls", "--json", "--filter", "image=busybox"],
    );
    assert_eq!(filtered.as_array().unwrap().len(), 3);
    let bad = banger.fails(&["vm", "ls", "--filter", "colour=red"]);
    assert!(bad.contains("state=running"), "{bad}");

    // Every result as JSON.
    for args in [
        &["vm", "ls", "--json"][..],
        &["vm", "inspect", "db", "--json"],
        &["image", "ls", "--json"],
        &["image", "inspect", "busybox", "--json"],
        &["kernel", "ls", "--json"],
        &["kernel", "inspect", "k", "--json"],
        &["snapshot", "ls", "--json"],
        &["daemon", "status", "--json"],
        &["ssh-config", "--json"],
        &["image", "cache", "prune", "--dry-run", "--json"],
    ] {
        json(&banger, args);
    }
    let made = json(
        &banger,
        &[
            "vm", "create", "spare", "--image", "busybox", "--kernel", "k", "--json",
        ],
    );
    assert_eq!(
        (made["name"].as_str(), made["state"].as_str()),
        (Some("spare"), Some("stopped"))
    );
    let set = json(&banger, &["vm", "set", "spare", "--vcpus", "2", "--json"]);
    assert_eq!(set["vcpus"], 2, "{set}");
    assert_eq!(
        json(&banger, &["vm", "rm", "spare", "--json"])["removed"][0],
        "spare"
    );
    let stopped = json(&banger, &["vm", "stop", "db", "--json"]);
    assert_eq!(stopped["state"], "stopped");
    let logs = json(&banger, &["vm", "logs", "db", "--json"]);
    assert!(logs["text"].is_string(), "{logs}");

    // Errors under --json: JSON on stdout too, with the daemon's code.
    let out = banger.run(&["vm", "stop", "nope", "--json"]);
    assert!(!out.status.success());
    let err: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(err["error"]["code"], "not_found", "{err}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));

    // Several names: each reported, one failure does not stop the others.
    let out = banger.run(&["vm", "stop", "web-1", "nope", "web-2", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let each: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(each[0]["name"], "web-1");
    assert_eq!(each[0]["vm"]["state"], "stopped");
    assert_eq!(each[1]["error"]["code"], "not_found");
    assert_eq!(each[2]["vm"]["state"], "stopped");
    let text = banger.run(&["vm", "stop", "web-1", "web-2"]);
    assert!(text.status.success());
    assert_eq!(
        String::from_utf8_lossy(&text.stdout),
        "web-1: stopped\nweb-2: stopped\n"
    );
    // A guest command without `--` before it: the fix is named.
    let out = banger.run(&["vm", "exec", "web-1", "ls", "-la"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("as in `banger vm exec web-1 -- ls -la`"),
        "{out:?}"
    );
    // `banger man` is listed.
    assert!(banger.ok(&["--help"]).contains("man "));
    // One name, the same line (red team round 3, item 24).
    assert_eq!(banger.ok(&["vm", "stop", "web-1"]), "web-1: stopped\n");

    // Completion: the script registers with bash; names come from the daemon.
    let script = banger.ok(&["completion", "bash"]);
    let file = banger.path("completion.bash");
    std::fs::write(&file, script).unwrap();
    let registered = common::must(&format!(
        "bash -c 'source {} && complete -p banger'",
        file.display()
    ));
    assert!(registered.contains("banger"), "{registered}");
    for shell in ["zsh", "fish"] {
        assert!(!banger.ok(&["completion", shell]).is_empty());
    }
    assert_eq!(
        complete(&banger, &["vm", "stop", ""]),
        ["db", "web-1", "web-2"]
    );
    assert_eq!(complete(&banger, &["vm", "exec", "we"]), ["web-1", "web-2"]);
    assert!(complete(&banger, &["vm", "run", "x", "--image", ""]).contains(&"busybox".into()));
    assert_eq!(complete(&banger, &["kernel", "rm", ""]), ["k"]);
    assert!(complete(&banger, &["vm", "st"]).contains(&"start".into()));

    // Man pages, one per command.
    let man = banger.path("man");
    banger.ok(&["man", man.to_str().unwrap()]);
    for page in ["banger.1", "banger-vm-run.1", "banger-image-import.1"] {
        let text = std::fs::read_to_string(man.join(page)).unwrap_or_default();
        assert!(text.contains(".TH"), "{page}");
    }

    // Several to remove, one unknown: the rest go, the unknown is said.
    banger.ok(&["vm", "create", "gone", "--image", "busybox"]);
    let out = banger.run(&["vm", "rm", "gone", "nosuch"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "gone: removed\n");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nosuch: error:"),
        "{out:?}"
    );
    assert!(banger.run(&["vm", "inspect", "gone"]).status.code() != Some(0));

    // Removals as JSON.
    let removed = json(&banger, &["vm", "rm", "db", "--json"]);
    assert_eq!(removed["removed"][0], "db");
    let removed = json(&banger, &["vm", "rm", "-f", "db", "--json"]);
    assert_eq!(removed["removed"].as_array().unwrap().len(), 0);

    // Autopull: a reference no local image has is pulled (missing, the
    // default); a local one is used as is, or pulled again (always);
    // never pulls nothing.
    let reference = registry.reference("busybox:latest");
    let out = banger.run(&[
        "vm", "create", "auto", "--image", &reference, "--kernel", "k",
    ]);
    assert!(out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !said.contains("pulling"),
        "busybox is local by reference: {said}"
    );
    banger_testkit::images::push_busybox(&registry, &banger.path("fixtures/oci2"), "other/bb:1");
    let fresh = registry.reference("other/bb:1");
    let refused = banger.fails(&[
        "vm", "create", "n1", "--image", &fresh, "--kernel", "k", "--pull", "never",
    ]);
    assert!(refused.contains("banger image pull"), "{refused}");
    assert_eq!(banger.ok(&["image", "ls", "-q"]), "busybox\n");
    let out = banger.run(&["vm", "create", "n1", "--image", &fresh, "--kernel", "k"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("pulled"), "{said}");
    assert_eq!(banger.ok(&["image", "ls", "-q"]), "bb:1\nbusybox\n");
    assert_eq!(
        json(&banger, &["vm", "inspect", "n1", "--json"])[0]["image"],
        "bb:1"
    );
    let out = banger.run(&[
        "vm", "create", "n2", "--image", "bb:1", "--kernel", "k", "--pull", "always",
    ]);
    assert!(out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("bb:1 is up to date"), "{said}");
    let ls = banger.ok(&["image", "ls"]);
    assert!(ls.contains("n1,n2"), "image ls shows the users: {ls}");

    // Prune: stopped VMs (asked, or -f), then the images nothing uses.
    let dry = banger.ok(&["vm", "prune", "--dry-run"]);
    assert_eq!(dry, "would remove auto\nwould remove n1\nwould remove n2\nwould remove web-1\nwould remove web-2\n");
    let refused = banger.fails(&["vm", "prune"]);
    assert!(refused.contains("-f"), "{refused}");
    let pruned = json(&banger, &["vm", "prune", "-f", "--json"]);
    assert_eq!(pruned["removed"].as_array().unwrap().len(), 5);
    assert_eq!(banger.ok(&["vm", "ls", "-q"]), "");
    let dry = json(&banger, &["image", "prune", "--dry-run", "--json"]);
    assert_eq!(dry["unused"], serde_json::json!(["bb:1", "busybox"]));
    assert_eq!(banger.ok(&["image", "ls", "-q"]), "bb:1\nbusybox\n");
    assert_eq!(banger.ok(&["image", "prune"]), "bb:1\nbusybox\n");
    assert_eq!(banger.ok(&["image", "ls", "-q"]), "");
    json(&banger, &["kernel", "rm", "-f", "k", "--json"]);

    // The daemon: stopped cleanly, reported absent, started again on use.
    let stopped = json(&banger, &["daemon", "stop", "--json"]);
    assert_eq!(stopped["stopped"], true);
    let out = banger.run(&["daemon", "status"]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(banger.ok(&["vm", "ls", "-q"]), "");
    let st = json(&banger, &["daemon", "status", "--json"]);
    assert_eq!(st["running"], true);
    banger.ok(&["daemon", "stop"]);
}

/// A reader that closed before banger wrote (`| head -c 0`, the end of
/// `| head -1`) ends the command quietly, as it ends `ls`: no panic, no
/// "Broken pipe" (red team round 3, item 21).
#[test]
fn a_reader_that_closes_early_ends_the_command_quietly() {
    use std::os::fd::{FromRawFd, OwnedFd};
    let banger = Banger::start();
    for args in [
        &["doctor"][..],
        &["doctor", "--json"],
        &["image", "ls", "--json"],
        &["completion", "bash"],
    ] {
        let mut fds = [0; 2];
        // SAFETY: pipe(2) into an array of two descriptors.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both descriptors were just made and are owned here.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        drop(read);
        let out = banger
            .cmd(args)
            .stdout(std::process::Stdio::from(write))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "{args:?}: {err}"
        );
        assert_eq!(out.status.code(), Some(141), "{args:?}: {out:?}");
    }
}
