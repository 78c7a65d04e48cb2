//! The stream of a workspace sync: one tar carrying the files and links to
//! write and, as empty entries marked with a PAX record, the paths to
//! remove. Applied into a directory with the same refusals as `unpack`:
//! nothing is written or removed outside it.

use std::io::{Read, Write};
use std::path::Path;

use super::{relative, walk_parents, write_entry, Target};

/// The PAX record marking an entry whose path is to be removed.
pub const REMOVE_KEY: &str = "BANGER.remove";

/// What applying a sync stream did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub written: u64,
    pub removed: u64,
}

/// Writes the sync stream for `changed` (files and symlinks under `dir`, by
/// relative path) and `removed` (relative paths).
pub fn pack(
    dir: &Path,
    changed: &[String],
    removed: &[String],
    out: impl Write,
) -> std::io::Result<()> {
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    for rel in changed {
        builder.append_path_with_name(dir.join(rel), rel)?;
    }
    for rel in removed {
        builder.append_pax_extensions([(REMOVE_KEY, &b"1"[..])])?;
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(0);
        header.set_mode(0o600);
        builder.append_data(&mut header, rel, std::io::empty())?;
    }
    builder.into_inner()?.flush()
}

/// Applies a sync stream into `dst`, a directory (made if missing).
/// Written files keep their modes and times, not their owners.
pub fn apply(input: impl Read, dst: &Path) -> std::io::Result<Applied> {
    std::fs::create_dir_all(dst)?;
    let target = Target::Into(dst.to_path_buf());
    let mut archive = tar::Archive::new(input);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_preserve_ownerships(false);
    archive.set_overwrite(true);
    let mut applied = Applied::default();
    let mut first = None;
    for entry in archive.entries()? {
        let mut entry = entry?;
        if marked_removed(&mut entry)? {
            let path = entry.path()?.into_owned();
            remove(dst, &path)?;
            applied.removed += 1;
        } else {
            write_entry(&mut entry, &target, &mut first)?;
            applied.written += 1;
        }
    }
    Ok(applied)
}

fn marked_removed<R: Read>(entry: &mut tar::Entry<'_, R>) -> std::io::Result<bool> {
    let Some(pax) = entry.pax_extensions()? else {
        return Ok(false);
    };
    for ext in pax {
        if ext?.key() == Ok(REMOVE_KEY) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Removes the file or link at `path` under `dst`, then any directories
/// above it the removal left empty. A directory is left alone, and no
/// directory of the path may be a symlink.
fn remove(dst: &Path, path: &Path) -> std::io::Result<()> {
    let rel = relative(path)?;
    if !walk_parents(dst, &rel, path, false)? {
        return Ok(()); // A directory on the way is missing: so is the file.
    }
    let dest = dst.join(&rel);
    match std::fs::symlink_metadata(&dest) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => std::fs::remove_file(&dest)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    let mut dir = dest.parent();
    while let Some(d) = dir {
        if d == dst || std::fs::remove_dir(d).is_err() {
            break;
        }
        dir = d.parent();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_sync_writes_and_removes_inside_its_directory_only() {
        let tmp = tempfile::tempdir().unwrap();
        let host = tmp.path().join("host");
        std::fs::create_dir_all(host.join("src/deep")).unwrap();
        std::fs::write(host.join("src/deep/new.rs"), "new").unwrap();
        std::fs::write(host.join("run.sh"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(host.join("run.sh"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::os::unix::fs::symlink("/etc/passwd", host.join("link")).unwrap();
        let guest = tmp.path().join("guest");
        std::fs::create_dir_all(guest.join("old/gone")).unwrap();
        std::fs::write(guest.join("old/gone/f"), "f").unwrap();
        std::fs::write(guest.join("kept"), "k").unwrap();

        let mut stream = Vec::new();
        let changed = ["src/deep/new.rs", "run.sh", "link"].map(String::from);
        let removed = ["old/gone/f", "never-was"].map(String::from);
        pack(&host, &changed, &removed, &mut stream).unwrap();
        let applied = apply(&stream[..], &guest).unwrap();
        assert_eq!(
            applied,
            Applied {
                written: 3,
                removed: 2
            }
        );
        assert_eq!(
            std::fs::read_to_string(guest.join("src/deep/new.rs")).unwrap(),
            "new"
        );
        let mode = std::fs::metadata(guest.join("run.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(
            std::fs::read_link(guest.join("link")).unwrap(),
            Path::new("/etc/passwd")
        );
        assert!(!guest.join("old").exists(), "emptied directories go too");
        assert!(guest.join("kept").exists());

        // A removal through a symlink, or with `..`, touches nothing outside.
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("precious"), "p").unwrap();
        std::os::unix::fs::symlink(&outside, guest.join("x")).unwrap();
        let mut hostile = Vec::new();
        pack(&host, &[], &["x/precious".into()], &mut hostile).unwrap();
        let err = apply(&hostile[..], &guest).unwrap_err();
        assert!(err.to_string().contains("leaves the destination"), "{err}");
        assert!(outside.join("precious").exists());
        let mut dotdot = Vec::new();
        pack(&host, &[], &["../outside/precious".into()], &mut dotdot).unwrap_or(());
        let _ = apply(&dotdot[..], &guest);
        assert!(outside.join("precious").exists());
    }
}
