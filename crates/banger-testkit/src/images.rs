//! Small bootable images for the real-VM tests.

use crate::layer::{self, Entry};

/// A root filesystem holding the host's static busybox and its applets.
pub fn busybox_layer() -> Vec<u8> {
    let busybox =
        std::fs::read("/bin/busybox").expect("install busybox-static (scripts/install-deps)");
    let applets = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .expect("running busybox");
    let mut entries = vec![
        layer::dir("bin/", 0o755),
        layer::dir("etc/", 0o755),
        Entry::Dir {
            path: "tmp/".into(),
            mode: 0o1777,
            uid: 0,
            gid: 0,
        },
        layer::dir("root/", 0o700),
        Entry::File {
            path: "bin/busybox".into(),
            data: busybox,
            mode: 0o755,
            uid: 0,
            gid: 0,
            xattrs: vec![],
        },
        layer::file(
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
            0o644,
        ),
        layer::file("etc/group", "root:x:0:\nnogroup:x:65534:\n", 0o644),
    ];
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        if applet != "busybox" && !applet.is_empty() {
            entries.push(layer::symlink(&format!("bin/{applet}"), "busybox"));
        }
    }
    layer::tar(&entries)
}

/// Builds the busybox image into an OCI layout under `dir` and pushes it to
/// `registry` as `repo_tag`; returns the manifest descriptor.
pub fn push_busybox(
    registry: &crate::registry::Registry,
    dir: &std::path::Path,
    repo_tag: &str,
) -> crate::layout::Desc {
    push_busybox_as(registry, dir, repo_tag, "0:0")
}

/// [`push_busybox`] with `user` as the image's default user.
pub fn push_busybox_as(
    registry: &crate::registry::Registry,
    dir: &std::path::Path,
    repo_tag: &str,
    user: &str,
) -> crate::layout::Desc {
    push_busybox_with(registry, dir, repo_tag, crate::layout::default_config(user))
}

/// [`push_busybox`] with `config` as the image config's `config` section
/// (Env, Entrypoint, Cmd, WorkingDir, User).
pub fn push_busybox_with(
    registry: &crate::registry::Registry,
    dir: &std::path::Path,
    repo_tag: &str,
    config: serde_json::Value,
) -> crate::layout::Desc {
    let mut layout = crate::layout::Layout::new(dir);
    let image = layout.image_with(
        &[(crate::layer::Compression::Gzip, busybox_layer())],
        "amd64",
        config,
    );
    layout.tag("t", &image);
    registry.push(&layout.dir, "t", repo_tag, &[]);
    image
}
