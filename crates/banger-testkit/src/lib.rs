//! Fixtures shared by banger's integration tests: layers built from a small
//! description, OCI image layouts, and a real registry on loopback
//! (Debian's `docker-registry`) that fixtures are pushed to with `skopeo`.

pub mod images;
pub mod layer;
pub mod layout;
pub mod registry;
pub mod tree;

/// Panics with the install hint when a tool the tests need is missing.
pub fn require_tool(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(found, "`{tool}` is not installed; run scripts/install-deps");
}

/// Runs git in `dir` as a throwaway identity; its stdout. Panics on failure.
pub fn git(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.email=t@example.invalid", "-c", "user.name=t"])
        .args(args)
        .output()
        .expect("running git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}
