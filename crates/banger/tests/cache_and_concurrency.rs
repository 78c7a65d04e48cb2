//! `image cache prune` through the CLI, and concurrent pulls.

mod common;

use banger_testkit::layer::{self, file, Compression};
use banger_testkit::layout::{Desc, Layout};
use banger_testkit::registry::Registry;
use common::{entries, Banger};

/// Pushes a two-layer image; the first layer is shared by every call.
fn push(registry: &Registry, dir: &std::path::Path, repo_tag: &str, marker: &str) -> Desc {
    let mut layout = Layout::new(dir);
    let shared = layer::tar(&[file("shared", &"s".repeat(200_000), 0o644)]);
    let own = layer::tar(&[file("marker", marker, 0o644)]);
    let image = layout.image(
        &[(Compression::Gzip, shared), (Compression::Gzip, own)],
        "amd64",
    );
    layout.tag("t", &image);
    registry.push(&layout.dir, "t", repo_tag, &[]);
    image
}

#[test]
fn prune_reports_frees_and_dry_runs() {
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    push(&registry, &tmp.path().join("a"), "a:t", "a");
    let banger = Banger::start();

    // Fresh install: no cache dir at all is a zero result.
    let cache = banger.path("cache/oci");
    assert!(!cache.exists());
    let line = banger.ok(&["image", "cache", "prune"]);
    assert_eq!(
        line.trim(),
        format!("freed 0 B across 0 blob(s) in {}", cache.display())
    );

    banger.ok(&["image", "pull", &registry.reference("a:t"), "--name", "a"]);
    let blobs = entries(&cache.join("blobs/sha256"));
    assert_eq!(blobs.len(), 3, "two layers and a config: {blobs:?}");

    let dry = banger.ok(&["image", "cache", "prune", "--dry-run"]);
    assert!(
        dry.starts_with("would free ") && dry.contains("across 3 blob(s)"),
        "{dry}"
    );
    assert_eq!(
        entries(&cache.join("blobs/sha256")).len(),
        3,
        "dry run keeps blobs"
    );

    let json: serde_json::Value =
        serde_json::from_str(&banger.ok(&["image", "cache", "prune", "--json"])).unwrap();
    assert_eq!(json["blobs_freed"], 3);
    assert_eq!(json["dry_run"], false);
    assert_eq!(json["cache_dir"], cache.display().to_string());
    assert!(json["bytes_freed"].as_u64().unwrap() > 1000);
    assert!(
        cache.is_dir() && entries(&cache).is_empty(),
        "cache recreated empty"
    );
    assert_eq!(
        entries(&banger.path("cache")),
        ["oci"],
        "no aside dir outlives the call"
    );

    // Images do not depend on the cache; a re-pull after a prune is still a no-op.
    assert!(std::path::Path::new(banger.inspect("a")["rootfs_path"].as_str().unwrap()).is_file());
    assert!(banger
        .ok(&["image", "pull", &registry.reference("a:t"), "--name", "a"])
        .contains("up to date"));
}

#[test]
fn concurrent_pulls_download_each_blob_once() {
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let a = push(&registry, &tmp.path().join("a"), "a:t", "a");
    let b = push(&registry, &tmp.path().join("b"), "b:t", "b");
    assert_eq!(a.layers[0], b.layers[0]);
    let banger = Banger::start();

    // The same reference twice, and a different one sharing a layer, at once.
    let children: Vec<_> = [("a:t", "a"), ("a:t", "a"), ("b:t", "b")]
        .iter()
        .map(|(r, n)| {
            banger
                .cmd(&["image", "pull", &registry.reference(r), "--name", n])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<String> = children
        .into_iter()
        .map(|c| {
            let o = c.wait_with_output().unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            String::from_utf8(o.stdout).unwrap()
        })
        .collect();
    let pulled_a = outs[..2].iter().filter(|o| o.starts_with("pulled")).count();
    let fresh_a = outs[..2]
        .iter()
        .filter(|o| o.contains("up to date"))
        .count();
    assert_eq!((pulled_a, fresh_a), (1, 1), "{outs:?}");
    assert!(outs[2].starts_with("pulled"));
    for digest in [&a.layers[0], &a.layers[1], &b.layers[1]] {
        assert_eq!(
            registry.blob_gets(digest),
            1,
            "{digest} fetched more than once:\n{}",
            registry.log_text()
        );
    }
}
