//! Hostile layers fail the pull with an error naming the layer and the path,
//! write nothing outside the staging directory, and leave no image behind.

mod common;

use banger_testkit::layer::{self, file, raw, symlink, Compression};
use banger_testkit::layout::Layout;
use banger_testkit::registry::Registry;
use common::{entries, Banger};

fn pax_named(path: &[u8]) -> Vec<u8> {
    // A PAX `path` record can carry bytes a ustar name field cannot.
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("path", path)]).unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_path("placeholder").unwrap();
    h.set_size(1);
    h.set_mode(0o644);
    h.set_cksum();
    b.append(&h, &b"x"[..]).unwrap();
    b.into_inner().unwrap()
}

#[test]
fn hostile_layers_are_refused_and_change_nothing() {
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let sentinel = tmp.path().join("escaped");
    let sentinel_str = sentinel.display().to_string();
    let climb = format!(
        "{}{}",
        "../".repeat(12),
        sentinel_str.trim_start_matches('/')
    );
    let long_name = format!("dir/{}", "n".repeat(300));

    let cases: Vec<(&str, Vec<u8>, String, &str)> = vec![
        (
            "absolute",
            pax_named(sentinel_str.as_bytes()),
            sentinel_str.clone(),
            "absolute path",
        ),
        (
            "traversal",
            pax_named(climb.as_bytes()),
            climb.clone(),
            "`..`",
        ),
        (
            "symlink-escape",
            layer::tar(&[
                symlink("esc", &climb.replace("/escaped", "")),
                raw(b"esc/escaped", tar::EntryType::Regular, b""),
            ]),
            "esc/escaped".into(),
            "outside the image root",
        ),
        (
            "hardlink-out",
            layer::tar(&[raw(
                b"passwd",
                tar::EntryType::Link,
                b"../../../../etc/passwd",
            )]),
            "passwd".into(),
            "hardlink target",
        ),
        (
            "hardlink-abs",
            layer::tar(&[raw(b"passwd", tar::EntryType::Link, b"/etc/passwd")]),
            "passwd".into(),
            "absolute path",
        ),
        ("nul-name", pax_named(b"a\0b"), "a\u{0}b".into(), "NUL"),
        (
            "long-name",
            pax_named(long_name.as_bytes()),
            long_name.clone(),
            "255 bytes",
        ),
    ];

    let banger = Banger::start();
    for (repo, tar, path, why) in cases {
        let mut layout = Layout::new(&tmp.path().join(repo));
        let ok_layer = layer::tar(&[file("fine", "fine", 0o644)]);
        let image = layout.image(
            &[(Compression::Gzip, ok_layer), (Compression::Gzip, tar)],
            "amd64",
        );
        layout.tag("t", &image);
        registry.push(&layout.dir, "t", &format!("{repo}:t"), &[]);
        let err = banger.fails(&["image", "pull", &registry.reference(&format!("{repo}:t"))]);
        assert!(
            err.contains(&image.layers[1]),
            "{repo}: error does not name the layer: {err}"
        );
        assert!(
            err.contains(&path),
            "{repo}: error does not name `{path}`: {err}"
        );
        assert!(
            err.contains(why),
            "{repo}: error does not say `{why}`: {err}"
        );
        assert!(
            !sentinel.exists(),
            "{repo}: wrote outside the staging directory"
        );
    }
    assert_eq!(banger.ok(&["image", "ls", "--json"]).trim(), "[]");
    assert!(
        entries(&banger.path("state/tmp")).is_empty(),
        "no staging left behind"
    );
    assert!(
        entries(&banger.path("state/images")).is_empty(),
        "no half-made image"
    );
}

#[test]
fn a_layer_whose_digest_does_not_match_fails_the_pull() {
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&tmp.path().join("oci"));
    let image = layout.image(
        &[(
            Compression::Gzip,
            layer::tar(&[file("a", &"x".repeat(4096), 0o644)]),
        )],
        "amd64",
    );
    layout.tag("t", &image);
    registry.push(&layout.dir, "t", "tampered:t", &[]);
    // Same length, different bytes: only the digest can tell.
    let data = registry.blob_data(&image.layers[0]);
    let mut bytes = std::fs::read(&data).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&data, bytes).unwrap();

    let banger = Banger::start();
    let err = banger.fails(&["image", "pull", &registry.reference("tampered:t")]);
    assert!(
        err.contains(&image.layers[0]) && err.contains("does not match its digest"),
        "{err}"
    );
    assert_eq!(banger.ok(&["image", "ls", "--json"]).trim(), "[]");
    assert!(entries(&banger.path("state/tmp")).is_empty());
    assert!(entries(&banger.path("state/images")).is_empty());
    let cached = entries(&banger.path("cache/oci/blobs/sha256"));
    let hex = image.layers[0].trim_start_matches("sha256:").to_string();
    assert!(
        !cached.contains(&hex),
        "a corrupt blob never enters the cache"
    );
}
