//! `banger image pull` against a real registry, compared with umoci, and
//! `banger image import` of the same image saved as archives.

mod common;

use banger_testkit::layer::{
    self, dir, file, hardlink, owned_file, symlink, whiteout, Compression, Entry,
};
use banger_testkit::layout::Layout;
use banger_testkit::registry::Registry;
use banger_testkit::tree::{diff, snapshot, LoopMount};
use common::{entries, Banger};

/// Three layers exercising every flatten rule.
fn rule_layers() -> Vec<Vec<u8>> {
    let l1 = layer::tar(&[
        dir("etc/", 0o755),
        file("etc/passwd", "root:x:0:0::/root:/bin/sh\n", 0o644),
        file("etc/hosts", "127.0.0.1 localhost\n", 0o644),
        owned_file("etc/shadow", "root:*:1::::::\n", 0o640, 0, 42),
        Entry::File {
            path: "etc/xattr-file".into(),
            data: b"x".to_vec(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            xattrs: vec![("user.banger.test".into(), b"hello".to_vec())],
        },
        dir("opt/", 0o755),
        file("opt/old", "old", 0o644),
        dir("opt/sub/", 0o755),
        file("opt/sub/deep", "deep", 0o644),
        Entry::Dir {
            path: "home/".into(),
            mode: 0o755,
            uid: 0,
            gid: 0,
        },
        Entry::Dir {
            path: "home/user/".into(),
            mode: 0o750,
            uid: 1000,
            gid: 1000,
        },
        owned_file("home/user/old-file", "mine", 0o600, 1000, 1000),
        dir("bin/", 0o755),
        file("bin/busybox", "#!busybox\n", 0o755),
        hardlink("bin/sh", "bin/busybox"),
        hardlink("bin/ls", "bin/busybox"),
        dir("usr/", 0o755),
        dir("usr/bin/", 0o755),
        file("usr/bin/passwd", "suid", 0o4755),
        owned_file("usr/bin/wall", "sgid", 0o2755, 0, 5),
        dir("usr/lib/", 0o755),
        symlink("lib", "usr/lib"),
        symlink("abs-link", "/etc/passwd"),
        symlink("dangling", "/nonexistent/target"),
        Entry::Dir {
            path: "tmp/".into(),
            mode: 0o1777,
            uid: 0,
            gid: 0,
        },
        dir("was-dir/", 0o755),
        file("was-dir/x", "x", 0o644),
        file("was-file", "f", 0o644),
        dir("dev/", 0o755),
        Entry::Char {
            path: "dev/null".into(),
            major: 1,
            minor: 3,
            mode: 0o666,
        },
        dir("run/", 0o755),
        Entry::Fifo {
            path: "run/fifo".into(),
            mode: 0o600,
        },
        dir("ro/", 0o555),
        file("ro/inside", "ro", 0o444),
        file("name with spaces and \"quotes\"", "q", 0o644),
    ]);
    let l2 = layer::tar(&[
        whiteout("etc/.wh.hosts"),
        file("etc/passwd", "root:x:0:0::/root:/bin/ash\n", 0o600),
        whiteout("opt/.wh..wh..opq"),
        file("opt/new", "new", 0o644),
        dir("opt/sub/", 0o700),
        file("opt/sub/fresh", "fresh", 0o644),
        file("was-dir", "now a file", 0o644),
        dir("was-file/", 0o755),
        file("was-file/y", "y", 0o644),
        whiteout("bin/.wh.ls"),
        file("usr/lib/libx.so", "elf", 0o755),
    ]);
    let l3 = layer::tar(&[
        file("ro/added-later", "late", 0o644),
        Entry::Dir {
            path: "home/user/".into(),
            mode: 0o750,
            uid: 1000,
            gid: 1000,
        },
        whiteout("home/user/.wh..wh..opq"),
        owned_file("home/user/new-file", "new", 0o644, 1000, 1000),
    ]);
    vec![l1, l2, l3]
}

fn push_rules(
    registry: &Registry,
    tmp: &std::path::Path,
    compressions: [Compression; 3],
    repo_tag: &str,
    opts: &[&str],
) -> Layout {
    let mut layout = Layout::new(tmp);
    let layers: Vec<(Compression, Vec<u8>)> = compressions.into_iter().zip(rule_layers()).collect();
    let image = layout.image(&layers, "amd64");
    layout.tag("v1", &image);
    registry.push(&layout.dir, "v1", repo_tag, opts);
    layout
}

#[test]
fn pull_flattens_like_umoci_and_records_the_image() {
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let layout = push_rules(
        &registry,
        &tmp.path().join("oci"),
        [Compression::Gzip, Compression::Gzip, Compression::None],
        "rules:v1",
        &[],
    );
    let banger = Banger::start();
    let reference = registry.reference("rules:v1");
    let out = banger.ok(&["image", "pull", &reference]);
    assert!(
        out.contains("pulled") && out.contains("`rules:v1`"),
        "{out}"
    );

    let info = banger.inspect("rules:v1");
    assert_eq!(info["ref"], reference);
    assert!(info["digest"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(info["config"]["cmd"][0], "/bin/sh");
    assert_eq!(
        info["config"]["env"][0],
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin"
    );
    let rootfs = std::path::PathBuf::from(info["rootfs_path"].as_str().unwrap());
    assert!(rootfs.is_absolute() && rootfs.is_file());
    assert_eq!(
        std::fs::metadata(&rootfs).unwrap().len(),
        info["size_bytes"].as_u64().unwrap()
    );
    assert!(info["created_at"].as_str().unwrap().ends_with('Z'));

    let ls = banger.ok(&["image", "ls"]);
    let header = ls.lines().next().unwrap();
    for col in ["NAME", "REF", "DIGEST", "SIZE", "CREATED"] {
        assert!(header.contains(col), "{ls}");
    }
    assert!(ls.contains("rules:v1") && ls.contains("just now"), "{ls}");
    let json: serde_json::Value =
        serde_json::from_str(&banger.ok(&["image", "ls", "--json"])).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 1);

    // Re-pulling an unchanged reference is a no-op that says so.
    let again = banger.ok(&["image", "pull", &reference]);
    assert!(again.contains("up to date"), "{again}");
    assert_eq!(
        banger.inspect("rules:v1")["rootfs_path"],
        info["rootfs_path"]
    );

    // The image no longer needs the blob cache.
    banger.ok(&["image", "cache", "prune"]);
    assert!(rootfs.is_file());

    if !banger_testkit::is_root() {
        eprintln!("not root: skipping the umoci comparison (needs mount and mknod)");
        return;
    }
    banger_testkit::require_tool("umoci");
    let bundle = tmp.path().join("bundle");
    let umoci = std::process::Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:v1", layout.dir.display()))
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(
        umoci.status.success(),
        "umoci: {}",
        String::from_utf8_lossy(&umoci.stderr)
    );
    let mount = LoopMount::new(&rootfs);
    let ours = snapshot(mount.path());
    let theirs = snapshot(&bundle.join("rootfs"));
    let differences = diff(&ours, &theirs);
    assert!(
        differences.is_empty(),
        "flattened tree differs from umoci:\n{}",
        differences.join("\n")
    );
    // Spot checks, so an empty comparison cannot pass vacuously.
    assert!(
        !ours.contains_key("etc/hosts")
            && !ours.contains_key("opt/old")
            && !ours.contains_key("bin/ls")
    );
    assert_eq!(ours["usr/bin/passwd"].mode, 0o4755);
    assert_eq!(
        (ours["home/user/new-file"].uid, ours["etc/shadow"].gid),
        (1000, 42)
    );
    assert_eq!(ours["bin/sh"].hardlink_of.as_deref(), Some("bin/busybox"));
    assert_eq!(ours["dev/null"].kind, "char");
    assert_eq!(ours["etc/xattr-file"].xattrs.len(), 1);
    assert!(ours.contains_key("usr/lib/libx.so"));
    assert!(!ours.contains_key("home/user/old-file"));
}

#[test]
fn zstd_uncompressed_and_docker_schema2_flatten_identically() {
    if !banger_testkit::is_root() {
        eprintln!("not root: skipping (needs loop mounts)");
        return;
    }
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    push_rules(
        &registry,
        &tmp.path().join("gz"),
        [Compression::Gzip; 3],
        "gz:v1",
        &[],
    );
    push_rules(
        &registry,
        &tmp.path().join("zst"),
        [Compression::Zstd, Compression::None, Compression::Zstd],
        "zst:v1",
        &[],
    );
    push_rules(
        &registry,
        &tmp.path().join("v2s2"),
        [Compression::Gzip; 3],
        "docker:v1",
        &["--format", "v2s2"],
    );
    let banger = Banger::start();
    let mut snaps = Vec::new();
    for (repo, name) in [("gz:v1", "gz"), ("zst:v1", "zst"), ("docker:v1", "docker")] {
        banger.ok(&["image", "pull", &registry.reference(repo), "--name", name]);
        let rootfs = banger.inspect(name)["rootfs_path"]
            .as_str()
            .unwrap()
            .to_string();
        let mount = LoopMount::new(std::path::Path::new(&rootfs));
        snaps.push(snapshot(mount.path()));
    }
    assert!(snaps[0].len() > 20);
    assert!(
        diff(&snaps[0], &snaps[1]).is_empty(),
        "zstd: {:?}",
        diff(&snaps[0], &snaps[1])
    );
    assert!(
        diff(&snaps[0], &snaps[2]).is_empty(),
        "v2s2: {:?}",
        diff(&snaps[0], &snaps[2])
    );
}

#[test]
fn multi_arch_index_picks_the_host_platform_unless_told() {
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&tmp.path().join("oci"));
    let amd = layout.image(
        &[(
            Compression::Gzip,
            layer::tar(&[file("arch", "amd64", 0o644)]),
        )],
        "amd64",
    );
    let arm = layout.image(
        &[(
            Compression::Gzip,
            layer::tar(&[file("arch", "arm64", 0o644)]),
        )],
        "arm64",
    );
    let index = layout.index(&[(arm.clone(), "arm64"), (amd.clone(), "amd64")]);
    layout.tag("multi", &index);
    registry.push(&layout.dir, "multi", "multi:latest", &["--all"]);
    let banger = Banger::start();
    let reference = registry.reference("multi:latest");

    banger.ok(&["image", "pull", &reference]);
    assert_eq!(banger.inspect("multi")["digest"], amd.digest);
    banger.ok(&[
        "image",
        "pull",
        &reference,
        "--platform",
        "linux/arm64",
        "--name",
        "multi-arm",
    ]);
    let arm_info = banger.inspect("multi-arm");
    assert_eq!(arm_info["digest"], arm.digest);
    assert_eq!(arm_info["config"]["architecture"], "arm64");

    let err = banger.fails(&[
        "image",
        "pull",
        &reference,
        "--platform",
        "linux/s390x",
        "--name",
        "nope",
    ]);
    assert!(
        err.contains("linux/s390x") && err.contains("linux/amd64") && err.contains("--platform"),
        "{err}"
    );
    let err = banger.fails(&["image", "pull", &reference, "--platform", "linux"]);
    assert!(err.contains("os/arch"), "{err}");
}

#[test]
fn remove_inspect_and_name_errors() {
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&tmp.path().join("oci"));
    let img = layout.image(
        &[(Compression::Gzip, layer::tar(&[file("hello", "hi", 0o644)]))],
        "amd64",
    );
    layout.tag("t", &img);
    registry.push(&layout.dir, "t", "tiny:latest", &[]);
    let banger = Banger::start();
    let reference = registry.reference("tiny:latest");
    banger.ok(&["image", "pull", &reference]);
    let rootfs = std::path::PathBuf::from(banger.inspect("tiny")["rootfs_path"].as_str().unwrap());

    let err = banger.fails(&["image", "inspect", "tinyy"]);
    assert!(err.contains("did you mean `tiny`"), "{err}");
    let err = banger.fails(&["image", "pull", &reference, "--name", "Bad Name"]);
    assert!(err.contains("invalid image name"), "{err}");
    let err = banger.fails(&["image", "pull", "not a ref!"]);
    assert!(err.contains("invalid image reference"), "{err}");
    // A taken name with another reference is a conflict that changes nothing.
    let err = banger.fails(&[
        "image",
        "pull",
        &registry.reference("other:latest"),
        "--name",
        "tiny",
    ]);
    assert!(err.contains("taken"), "{err}");

    let err = banger.fails(&["image", "rm", "tiny", "ghost"]);
    assert!(err.contains("ghost"), "{err}");
    assert!(rootfs.is_file(), "a refused rm removes nothing");
    assert_eq!(banger.ok(&["image", "rm", "tiny"]).trim(), "tiny: removed");
    assert!(!rootfs.exists() && !rootfs.parent().unwrap().exists());
    assert_eq!(
        banger.ok(&["image", "rm", "-f", "tiny", "ghost"]).trim(),
        ""
    );
    assert!(entries(&banger.path("state/images")).is_empty());
}

#[test]
fn unreachable_registry_fails_with_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let banger = Banger::start();
    let err = banger.fails(&["image", "pull", &format!("127.0.0.1:{port}/nothing:latest")]);
    assert!(
        err.contains(&format!("127.0.0.1:{port}")) && err.contains("op-"),
        "{err}"
    );
    assert!(entries(&banger.path("state/tmp")).is_empty());
}

#[test]
fn registries_that_require_a_login_use_docker_config_credentials() {
    use base64::Engine;
    let registry = Registry::start_with_login("ci", "s3cret");
    let tmp = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&tmp.path().join("oci"));
    let img = layout.image(
        &[(Compression::Gzip, layer::tar(&[file("secret", "s", 0o644)]))],
        "amd64",
    );
    layout.tag("t", &img);
    registry.push(&layout.dir, "t", "private:latest", &[]);
    let reference = registry.reference("private:latest");

    let no_creds = tmp.path().join("empty");
    std::fs::create_dir_all(&no_creds).unwrap();
    let anonymous = Banger::start_with_env(&[("DOCKER_CONFIG", &no_creds)]);
    let err = anonymous.fails(&["image", "pull", &reference]);
    assert!(
        err.contains(&registry.addr) && err.contains("docker login"),
        "{err}"
    );

    let with_creds = tmp.path().join("docker");
    std::fs::create_dir_all(&with_creds).unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode("ci:s3cret");
    std::fs::write(
        with_creds.join("config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, registry.addr),
    )
    .unwrap();
    let banger = Banger::start_with_env(&[("DOCKER_CONFIG", &with_creds)]);
    banger.ok(&["image", "pull", &reference]);
    assert_eq!(banger.inspect("private")["digest"], img.digest);
}

/// A docker archive by hand: `manifest.json`, a config, layer files.
fn docker_archive(
    config: &serde_json::Value,
    layers: &[(&str, Vec<u8>)],
    manifest: serde_json::Value,
) -> Vec<u8> {
    let mut entries = vec![file("config.json", &config.to_string(), 0o644)];
    for (name, data) in layers {
        entries.push(Entry::File {
            path: (*name).into(),
            data: data.clone(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            xattrs: vec![],
        });
    }
    entries.push(file("manifest.json", &manifest.to_string(), 0o644));
    layer::tar(&entries)
}

#[test]
fn import_takes_docker_and_oci_archives_and_layouts_like_a_pull() {
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let layout = push_rules(
        &registry,
        &tmp.path().join("oci"),
        [Compression::Gzip, Compression::Gzip, Compression::None],
        "rules:v1",
        &[],
    );
    let banger = Banger::start();
    banger.ok(&[
        "image",
        "pull",
        &registry.reference("rules:v1"),
        "--name",
        "pulled",
    ]);
    let skopeo = |dest: String| {
        common::must(&format!(
            "skopeo copy --quiet oci:{}:v1 {dest}",
            layout.dir.display()
        ));
    };
    let docker_tar = tmp.path().join("docker.tar");
    skopeo(format!("docker-archive:{}:rules:v1", docker_tar.display()));
    let oci_tar = tmp.path().join("oci.tar");
    skopeo(format!("oci-archive:{}:rules:v1", oci_tar.display()));

    // A docker archive: named by its tag, found by its reference.
    let said = banger.ok(&["image", "import", docker_tar.to_str().unwrap()]);
    assert!(said.contains("imported `rules:v1`"), "{said}");
    let da = banger.inspect("rules:v1");
    assert_eq!(da["config"]["cmd"][0], "/bin/sh");
    assert_eq!(da["ref"], "docker.io/library/rules:v1");
    // An OCI archive, from stdin, as `podman save … | banger image import -`.
    let mut cmd = banger.cmd(&["image", "import", "-", "--name", "oa", "--json"]);
    let out = common::with_stdin(&mut cmd, &std::fs::read(&oci_tar).unwrap());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["image"]["name"], "oa");
    assert_eq!(
        r["image"]["digest"],
        banger.inspect("pulled")["digest"],
        "the same manifest"
    );
    assert!(
        entries(&banger.path("state/tmp")).is_empty(),
        "the spooled stdin is gone"
    );
    // The layout directory itself; its `v1` tag names no image, so a name is needed.
    let refused = banger.fails(&["image", "import", layout.dir.to_str().unwrap()]);
    assert!(refused.contains("--name"), "{refused}");
    banger.ok(&[
        "image",
        "import",
        layout.dir.to_str().unwrap(),
        "--name",
        "dir",
    ]);
    let again = banger.ok(&[
        "image",
        "import",
        layout.dir.to_str().unwrap(),
        "--name",
        "dir",
    ]);
    assert!(again.contains("up to date"), "{again}");

    // Hostile archives: refused, nothing recorded, nothing written outside.
    let hostile = tmp.path().join("hostile.tar");
    let config = serde_json::json!({"architecture": "amd64", "os": "linux", "config": {}});
    let escape = layer::tar(&[layer::raw(b"../../escaped", tar::EntryType::Regular, b"")]);
    std::fs::write(
        &hostile,
        docker_archive(
            &config,
            &[("l/layer.tar", escape)],
            serde_json::json!([{"Config": "config.json", "RepoTags": ["evil:1"], "Layers": ["l/layer.tar"]}]),
        ),
    )
    .unwrap();
    let refused = banger.fails(&["image", "import", hostile.to_str().unwrap()]);
    assert!(refused.contains("refusing"), "{refused}");
    let outside = tmp.path().join("outside.tar");
    std::fs::write(
        &outside,
        docker_archive(
            &config,
            &[],
            serde_json::json!([{"Config": "../../../etc/passwd", "RepoTags": ["evil:2"], "Layers": []}]),
        ),
    )
    .unwrap();
    let refused = banger.fails(&["image", "import", outside.to_str().unwrap()]);
    assert!(refused.contains("no `../../../etc/passwd`"), "{refused}");
    let garbage = tmp.path().join("garbage.tar");
    std::fs::write(&garbage, b"not an archive at all").unwrap();
    let refused = banger.fails(&["image", "import", garbage.to_str().unwrap()]);
    assert!(
        refused.contains("not a tar archive") || refused.contains("neither"),
        "{refused}"
    );
    assert_eq!(
        banger.ok(&["image", "ls", "-q"]),
        "dir\noa\npulled\nrules:v1\n"
    );

    if !banger_testkit::is_root() {
        eprintln!("not root: skipping the tree comparison (needs mount)");
        return;
    }
    let tree = |name: &str| {
        let rootfs =
            std::path::PathBuf::from(banger.inspect(name)["rootfs_path"].as_str().unwrap());
        let mount = LoopMount::new(&rootfs);
        snapshot(mount.path())
    };
    let pulled = tree("pulled");
    assert!(pulled.contains_key("usr/bin/passwd"));
    for name in ["rules:v1", "oa", "dir"] {
        let differences = diff(&tree(name), &pulled);
        assert!(
            differences.is_empty(),
            "`{name}` differs from the pulled tree:\n{}",
            differences.join("\n")
        );
    }
}
