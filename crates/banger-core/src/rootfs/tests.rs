//! Flatten rules on layers built in memory.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::meta::{S_IFCHR, S_IFDIR, S_IFLNK, S_IFREG};
use super::Flattener;

enum E<'a> {
    Dir(&'a str, u32),
    File(&'a str, &'a str, u32),
    Owned(&'a str, &'a str, u32, u32),
    Link(&'a str, &'a str),
    Hard(&'a str, &'a str),
    Chr(&'a str, u32, u32),
    /// A raw header name, bypassing the tar crate's own path checks.
    Raw(&'a [u8], tar::EntryType, &'a [u8]),
}

fn layer(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        match e {
            E::Dir(p, m) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*m);
                h.set_size(0);
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
            E::File(p, c, m) => {
                h.set_mode(*m);
                h.set_size(c.len() as u64);
                b.append_data(&mut h, p, c.as_bytes()).unwrap();
            }
            E::Owned(p, c, uid, gid) => {
                h.set_mode(0o644);
                h.set_uid(*uid as u64);
                h.set_gid(*gid as u64);
                h.set_size(c.len() as u64);
                b.append_data(&mut h, p, c.as_bytes()).unwrap();
            }
            E::Link(p, t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, p, t).unwrap();
            }
            E::Hard(p, t) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_size(0);
                b.append_link(&mut h, p, t).unwrap();
            }
            E::Chr(p, maj, min) => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_mode(0o666);
                h.set_device_major(*maj).unwrap();
                h.set_device_minor(*min).unwrap();
                h.set_size(0);
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
            E::Raw(name, kind, link) => {
                h.set_entry_type(*kind);
                h.set_size(0);
                h.set_mode(0o644);
                h.as_old_mut().name[..name.len()].copy_from_slice(name);
                h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

fn flatten(
    layers: &[Vec<u8>],
) -> (
    tempfile::TempDir,
    Result<super::meta::MetaTable, super::EntryError>,
) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let mut f = Flattener::new(&root).unwrap();
    for l in layers {
        if let Err(e) = f.apply_layer(&l[..]) {
            return (dir, Err(e));
        }
    }
    let meta = f.finish();
    (dir, meta)
}

fn exists(dir: &Path, rel: &str) -> bool {
    fs::symlink_metadata(dir.join("root").join(rel)).is_ok()
}

#[test]
fn whiteouts_opaque_dirs_and_replacements() {
    let base = layer(&[
        E::Dir("etc/", 0o755),
        E::File("etc/passwd", "root", 0o644),
        E::File("etc/hosts", "h", 0o644),
        E::Dir("opt/", 0o755),
        E::File("opt/old", "o", 0o644),
        E::Dir("opt/sub/", 0o755),
        E::File("opt/sub/deep", "d", 0o644),
        E::Dir("was-dir/", 0o755),
        E::File("was-dir/x", "x", 0o644),
        E::File("was-file", "f", 0o644),
    ]);
    let top = layer(&[
        E::File("etc/.wh.hosts", "", 0o644),
        E::File("opt/new", "n", 0o644),
        E::File("opt/.wh..wh..opq", "", 0o644),
        E::Dir("opt/sub/", 0o755),
        E::File("opt/sub/fresh", "f", 0o644),
        E::File("was-dir", "now a file", 0o600),
        E::Dir("was-file/", 0o700),
        E::File("was-file/y", "y", 0o644),
    ]);
    let (dir, meta) = flatten(&[base, top]);
    let meta = meta.unwrap();
    assert!(exists(dir.path(), "etc/passwd"));
    assert!(
        !exists(dir.path(), "etc/hosts"),
        "whiteout removes the lower file"
    );
    assert!(
        !exists(dir.path(), "etc/.wh.hosts"),
        "markers are not materialised"
    );
    assert!(
        exists(dir.path(), "opt/new"),
        "opaque keeps this layer's entries"
    );
    assert!(!exists(dir.path(), "opt/old"), "opaque hides lower entries");
    assert!(exists(dir.path(), "opt/sub/fresh"));
    assert!(
        !exists(dir.path(), "opt/sub/deep"),
        "opaque hides lower entries in re-declared dirs"
    );
    let root = dir.path().join("root");
    assert_eq!(
        fs::read_to_string(root.join("was-dir")).unwrap(),
        "now a file"
    );
    assert!(root.join("was-file").is_dir() && root.join("was-file/y").is_file());
    assert!(
        meta.get(Path::new("was-dir/x")).is_none(),
        "metadata of replaced trees is dropped"
    );
    assert_eq!(
        meta.get(Path::new("was-file")).unwrap().mode,
        S_IFDIR | 0o700
    );
    assert_eq!(
        meta.get(Path::new("was-dir")).unwrap().mode,
        S_IFREG | 0o600
    );
}

#[test]
fn records_owners_special_modes_links_and_devices() {
    let l = layer(&[
        E::Owned("home/u/file", "data", 1000, 100),
        E::File("bin/su", "suid", 0o4755),
        E::Dir("tmp/", 0o1777),
        E::Dir("ro/", 0o555),
        E::File("ro/inside", "i", 0o444),
        E::Link("bin/sh", "/bin/su"),
        E::Hard("bin/su2", "bin/su"),
        E::Chr("dev/null", 1, 3),
    ]);
    let (dir, meta) = flatten(&[l]);
    let meta = meta.unwrap();
    let root = dir.path().join("root");
    let m = |p: &str| meta.get(Path::new(p)).unwrap().clone();
    assert_eq!((m("home/u/file").uid, m("home/u/file").gid), (1000, 100));
    assert_eq!(m("home").mode, S_IFDIR | 0o755, "implicit parents are 0755");
    assert_eq!(m("bin/su").mode, S_IFREG | 0o4755);
    assert_eq!(m("tmp").mode, S_IFDIR | 0o1777);
    assert_eq!(m("ro").mode, S_IFDIR | 0o555);
    assert_eq!(m("bin/sh").mode & 0o170000, S_IFLNK);
    assert_eq!(
        fs::read_link(root.join("bin/sh")).unwrap(),
        PathBuf::from("/bin/su")
    );
    let a = fs::metadata(root.join("bin/su")).unwrap();
    let b = fs::metadata(root.join("bin/su2")).unwrap();
    assert_eq!(a.ino(), b.ino(), "hardlinks share an inode");
    assert_eq!(m("dev/null").mode, S_IFCHR | 0o666);
    assert_eq!(m("dev/null").rdev, Some((1, 3)));
    // Staging copies never carry setuid bits and stay writable for the daemon.
    assert_eq!(a.mode() & 0o7000, 0);
    assert_eq!(fs::metadata(root.join("ro")).unwrap().mode() & 0o700, 0o700);
    assert_eq!(
        fs::metadata(root.join("home/u/file")).unwrap().mtime(),
        1_700_000_000
    );
}

#[test]
fn refuses_hostile_entries_naming_the_path() {
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (
            layer(&[E::Raw(b"/etc/evil", tar::EntryType::Regular, b"")]),
            "/etc/evil",
            "absolute",
        ),
        (
            layer(&[E::Raw(b"../evil", tar::EntryType::Regular, b"")]),
            "../evil",
            "..",
        ),
        (
            layer(&[
                E::Link("esc", "../../../../tmp"),
                E::Raw(b"esc/evil", tar::EntryType::Regular, b""),
            ]),
            "esc/evil",
            "outside",
        ),
        (
            layer(&[E::Raw(b"hl", tar::EntryType::Link, b"../../etc/passwd")]),
            "hl",
            "hardlink target",
        ),
        (
            layer(&[E::Raw(b"hl", tar::EntryType::Link, b"/etc/passwd")]),
            "hl",
            "absolute",
        ),
        (
            layer(&[E::Raw(b"dir/.wh...", tar::EntryType::Regular, b"")]),
            "dir/.wh...",
            "whiteout",
        ),
    ];
    for (bytes, path, why) in cases {
        let (dir, result) = flatten(&[bytes]);
        let err = result.unwrap_err();
        assert_eq!(err.path, path, "{err}");
        assert!(err.reason.contains(why), "{path}: {err}");
        // Nothing escaped the staging root.
        assert!(!dir.path().join("evil").exists());
        assert!(!dir.path().parent().unwrap().join("evil").exists());
    }
}

#[test]
fn writes_through_in_root_symlinks_land_inside_the_root() {
    let l1 = layer(&[E::Dir("usr/lib/", 0o755), E::Link("lib", "usr/lib")]);
    let l2 = layer(&[E::File("lib/libx.so", "x", 0o644)]);
    let (dir, meta) = flatten(&[l1, l2]);
    let meta = meta.unwrap();
    assert!(dir.path().join("root/usr/lib/libx.so").is_file());
    assert!(meta.get(Path::new("usr/lib/libx.so")).is_some());
}
