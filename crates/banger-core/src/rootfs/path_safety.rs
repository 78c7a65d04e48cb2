//! Validation of paths found in layers, and symlink resolution that never leaves
//! the root being built.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Longest path Linux accepts (PATH_MAX minus the terminating NUL).
const MAX_PATH_BYTES: usize = 4095;
/// Longest name ext4 (and Linux) accepts for one component.
const MAX_NAME_BYTES: usize = 255;
/// The kernel's own bound on nested symlinks.
const MAX_SYMLINK_HOPS: usize = 40;

/// Turns a layer entry's raw name into a path relative to the root. `./a/b`,
/// `a//b/` and `a/./b` are all `a/b`; the root itself is the empty path.
/// Absolute paths, `..`, NUL bytes and over-long names are refused.
pub fn normalize_entry_path(raw: &[u8]) -> Result<PathBuf, super::UnsafePath> {
    if raw.contains(&0) {
        return Err("name contains a NUL byte".into());
    }
    if raw.len() > MAX_PATH_BYTES {
        return Err(format!("path is longer than {MAX_PATH_BYTES} bytes").into());
    }
    if raw.first() == Some(&b'/') {
        return Err("absolute path".into());
    }
    let mut out = PathBuf::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("path contains a `..` component".into()),
            name if name.len() > MAX_NAME_BYTES => {
                return Err(format!("a name is longer than {MAX_NAME_BYTES} bytes").into())
            }
            name => out.push(OsStr::from_bytes(name)),
        }
    }
    Ok(out)
}

/// Resolves `rel` (a directory path relative to `root`) to a path under `root`
/// whose every existing component is a real directory. Symlinks met on the way
/// are followed as the guest would see them (absolute targets start at `root`);
/// one that would climb above `root` is an error. Missing components are kept
/// as they are: the caller creates them.
pub fn resolve_dir_in_root(root: &Path, rel: &Path) -> Result<PathBuf, super::UnsafePath> {
    let mut pending: VecDeque<OsString> = rel
        .components()
        .map(|c| c.as_os_str().to_os_string())
        .collect();
    let mut resolved = PathBuf::new();
    let mut hops = 0;
    let mut missing = false;
    while let Some(part) = pending.pop_front() {
        if part == ".." {
            if !resolved.pop() {
                return Err("a symlink on the way points outside the image root".into());
            }
            continue;
        }
        if part == "." || part.is_empty() {
            continue;
        }
        resolved.push(&part);
        if missing {
            continue;
        }
        let full = root.join(&resolved);
        match std::fs::symlink_metadata(&full) {
            Ok(meta) if meta.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err("too many levels of symlinks".into());
                }
                let target = std::fs::read_link(&full).map_err(|e| e.to_string())?;
                resolved.pop();
                if target.is_absolute() {
                    resolved = PathBuf::new();
                }
                for comp in target.components().rev() {
                    match comp {
                        Component::RootDir => {}
                        other => pending.push_front(other.as_os_str().to_os_string()),
                    }
                }
            }
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(format!("`{}` is not a directory", resolved.display()).into()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing = true,
            Err(e) => return Err(e.to_string().into()),
        }
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_harmless_spellings() {
        assert_eq!(
            normalize_entry_path(b"./a//b/./c/").unwrap(),
            PathBuf::from("a/b/c")
        );
        assert_eq!(normalize_entry_path(b"./").unwrap(), PathBuf::new());
        assert_eq!(
            normalize_entry_path(b"a b/\xffname")
                .unwrap()
                .as_os_str()
                .len(),
            9
        );
    }

    #[test]
    fn refuses_unsafe_names() {
        for (raw, why) in [
            (&b"/etc/passwd"[..], "absolute"),
            (b"../x", ".."),
            (b"a/../../x", ".."),
            (b"a\0b", "NUL"),
        ] {
            let err = normalize_entry_path(raw).unwrap_err();
            assert!(err.contains(why), "{raw:?}: {err}");
        }
        let long_name = vec![b'a'; 256];
        assert!(normalize_entry_path(&long_name)
            .unwrap_err()
            .contains("255"));
        let long_path = [b"ab/".repeat(1400), b"x".to_vec()].concat();
        assert!(normalize_entry_path(&long_path)
            .unwrap_err()
            .contains("4095"));
    }

    #[test]
    fn follows_symlinks_inside_the_root_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
        std::os::unix::fs::symlink("/usr", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../..", root.join("usr/up")).unwrap();
        std::os::unix::fs::symlink("loop2", root.join("loop1")).unwrap();
        std::os::unix::fs::symlink("loop1", root.join("loop2")).unwrap();
        std::fs::write(root.join("file"), b"").unwrap();

        let r = |p: &str| resolve_dir_in_root(root, Path::new(p));
        assert_eq!(r("lib/x").unwrap(), PathBuf::from("usr/lib/x"));
        assert_eq!(r("abs/lib").unwrap(), PathBuf::from("usr/lib"));
        assert_eq!(r("new/deeper").unwrap(), PathBuf::from("new/deeper"));
        assert!(r("usr/up/etc").unwrap_err().contains("outside"));
        assert!(r("loop1").unwrap_err().contains("symlinks"));
        assert!(r("file/x").unwrap_err().contains("not a directory"));
    }
}
