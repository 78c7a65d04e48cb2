//! The `banger-root-helper` binary refuses to start without what it needs,
//! saying what to pass. (Serving is tested end to end by the `banger`
//! crate's root_helper and vm_network tests, which run this binary.)

use std::process::Command;

fn helper(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_banger-root-helper"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn it_refuses_to_start_without_root_or_someone_to_serve() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let (ok, err) = helper(&["--socket", "/nonexistent/dir/helper.sock"]);
    assert!(!ok);
    if root {
        assert!(err.contains("--owner USER and/or --group GROUP"), "{err}");
        let (ok, err) = helper(&["--owner", "no-such-banger-user"]);
        assert!(!ok && err.contains("no user named"), "{err}");
        let (ok, err) = helper(&["--group", "0"]);
        assert!(!ok && err.contains("--allow-dir"), "{err}");
    } else {
        assert!(err.contains("must run as root"), "{err}");
    }
}

#[test]
fn it_names_itself_and_its_options() {
    let out = Command::new(env!("CARGO_BIN_EXE_banger-root-helper"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for option in [
        "--socket",
        "--owner",
        "--group",
        "--allow-dir",
        "--state-dir",
    ] {
        assert!(help.contains(option), "{help}");
    }
    assert!(
        !help.contains("--vmm"),
        "the helper launches nothing: {help}"
    );
}
