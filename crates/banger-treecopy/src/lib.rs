//! The tar streams behind `banger vm cp`, used on both ends (the CLI on the
//! host, the agent in the guest): pack paths under their own names, and
//! unpack with `docker cp` naming — into `dst` when it is a directory, else
//! as `dst` itself — never writing outside the destination.

use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

pub mod names;
pub mod stat;
pub mod sync;

/// Writes a tar of `paths`, each under its final component; directories
/// recursively, symlinks as links, modes and times kept.
pub fn pack(paths: &[PathBuf], out: impl Write) -> std::io::Result<()> {
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    for path in paths {
        let name = path.file_name().map(PathBuf::from).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} has no name to copy under", path.display()),
            )
        })?;
        let meta = std::fs::symlink_metadata(path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        if meta.is_dir() {
            builder.append_dir_all(&name, path)?;
        } else {
            builder.append_path_with_name(path, &name)?;
        }
    }
    builder.into_inner()?.flush()
}

/// How the archive's top-level names land under `dst`.
enum Target {
    /// `dst` is a directory: entries go inside it as they are.
    Into(PathBuf),
    /// `dst` does not exist: the single top-level entry becomes `dst`.
    As { parent: PathBuf, name: PathBuf },
}

fn target(dst: &Path) -> std::io::Result<Target> {
    if dst.is_dir() {
        return Ok(Target::Into(dst.to_path_buf()));
    }
    let parent = match dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = dst.file_name().map(PathBuf::from).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a path to copy to", dst.display()),
        )
    })?;
    if !parent.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} does not exist", parent.display()),
        ));
    }
    Ok(Target::As { parent, name })
}

/// Unpacks a tar into `dst`. Entries that would leave the destination
/// (absolute, `..`, through a symlink) are refused and nothing further is
/// written. `ownership`: keep the archive's owners (root in the guest).
pub fn unpack(input: impl Read, dst: &Path, ownership: bool) -> std::io::Result<u64> {
    let target = target(dst)?;
    let mut archive = tar::Archive::new(input);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_preserve_ownerships(ownership);
    archive.set_overwrite(true);
    let mut placed = Placed::default();
    let mut count = 0;
    for entry in archive.entries()? {
        write_entry(&mut entry?, &target, &mut placed)?;
        count += 1;
    }
    Ok(count)
}

/// What one unpack has learnt so far.
#[derive(Default)]
struct Placed {
    /// The single top-level name, for `Target::As`.
    first: Option<PathBuf>,
    /// Directories already found (or made) real: not checked again for
    /// every entry under them.
    dirs: std::collections::HashSet<PathBuf>,
}

/// `./` itself (what `tar -C DIR -c .` starts with): the destination is it.
fn is_top<R: Read>(entry: &tar::Entry<'_, R>, path: &Path) -> bool {
    entry.header().entry_type() == tar::EntryType::Directory
        && path.components().all(|c| c == Component::CurDir)
}

/// Writes one entry where `target` places it, refusing any that would leave it.
fn write_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    target: &Target,
    placed: &mut Placed,
) -> std::io::Result<()> {
    let path = entry.path()?.into_owned();
    if is_top(entry, &path) {
        return Ok(());
    }
    let (base, rel) = place(target, &path, &mut placed.first)?;
    let dest = base.join(&rel);
    // Checked before anything is made: no directory of the entry's path
    // may be a symlink (a hostile archive's `x -> /outside` followed by
    // `x/newdir/f` would otherwise make /outside/newdir).
    walk_parents(&base, &rel, &path, true, &mut placed.dirs)?;
    // Whatever is at the destination itself is replaced, never followed.
    if std::fs::symlink_metadata(&dest).is_ok_and(|m| m.file_type().is_symlink()) {
        std::fs::remove_file(&dest)?;
    }
    if entry.header().entry_type() == tar::EntryType::Link {
        // A hard link names another entry of this archive, placed the same way.
        let to = entry
            .link_name()?
            .ok_or_else(|| refuse(format!("{} links to nothing", path.display())))?
            .into_owned();
        let (to_base, to_rel) = place(target, &to, &mut placed.first)?;
        let source = to_base.join(to_rel);
        let inside = base.canonicalize()?;
        let source_dir = source.parent().unwrap_or(&to_base).canonicalize()?;
        if !source_dir.starts_with(&inside) {
            return Err(refuse(format!(
                "{} links out of the destination",
                path.display()
            )));
        }
        let _ = std::fs::remove_file(&dest);
        std::fs::hard_link(&source, &dest)?;
    } else {
        entry.unpack(&dest)?;
    }
    Ok(())
}

/// Goes through the directories above `rel` under `base`, refusing any that
/// is not a real directory (a symlink would lead out). A missing one is
/// made when `make`, else the walk stops there: false.
/// `known`: directories already found real (and kept up to date by whoever
/// removes one).
fn walk_parents(
    base: &Path,
    rel: &Path,
    shown: &Path,
    make: bool,
    known: &mut std::collections::HashSet<PathBuf>,
) -> std::io::Result<bool> {
    let Some(parents) = rel.parent() else {
        return Ok(true);
    };
    if parents.as_os_str().is_empty() || known.contains(&base.join(parents)) {
        return Ok(true);
    }
    let mut at = base.to_path_buf();
    for part in parents.components() {
        at.push(part);
        if known.contains(&at) {
            continue;
        }
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {
                known.insert(at.clone());
            }
            Ok(_) => {
                return Err(refuse(format!(
                    "{} leaves the destination (through {}, which is not a directory)",
                    shown.display(),
                    at.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && make => {
                std::fs::create_dir(&at)?;
                known.insert(at.clone());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Where an archive path lands: (base directory, path under it).
fn place(
    target: &Target,
    path: &Path,
    first: &mut Option<PathBuf>,
) -> std::io::Result<(PathBuf, PathBuf)> {
    let rel = relative(path)?;
    Ok(match target {
        Target::Into(dir) => (dir.clone(), rel),
        Target::As { parent, name } => {
            let mut parts = rel.components();
            let top = PathBuf::from(parts.next().map(|c| c.as_os_str()).unwrap_or_default());
            match first {
                None => *first = Some(top.clone()),
                Some(f) if *f != top => {
                    return Err(refuse(format!(
                        "several sources cannot all become {}; copy into an existing directory",
                        parent.join(name).display()
                    )))
                }
                _ => {}
            }
            let rest = parts.as_path();
            // No trailing slash for the entry itself: `name/` would make a
            // single file fail as a directory.
            let rel = if rest.as_os_str().is_empty() {
                name.clone()
            } else {
                name.join(rest)
            };
            (parent.clone(), rel)
        }
    })
}

/// The entry's path as a plain relative path, or a refusal.
fn relative(path: &Path) -> std::io::Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => return Err(refuse(format!("{} leaves the destination", path.display()))),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(refuse("an entry with an empty name".into()));
    }
    Ok(out)
}

fn refuse(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tree(root: &Path) {
        std::fs::create_dir_all(root.join("src/sub")).unwrap();
        std::fs::write(root.join("src/a.sh"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            root.join("src/a.sh"),
            std::fs::Permissions::from_mode(0o750),
        )
        .unwrap();
        std::fs::write(root.join("src/sub/b"), "b").unwrap();
        std::os::unix::fs::symlink("a.sh", root.join("src/link")).unwrap();
    }

    #[test]
    fn into_a_directory_or_as_a_new_name_with_modes_and_links() {
        let tmp = tempfile::tempdir().unwrap();
        tree(tmp.path());
        let mut tar = Vec::new();
        pack(&[tmp.path().join("src")], &mut tar).unwrap();

        let into = tmp.path().join("into");
        std::fs::create_dir(&into).unwrap();
        unpack(&tar[..], &into, false).unwrap();
        let copied = into.join("src");
        assert_eq!(std::fs::read_to_string(copied.join("sub/b")).unwrap(), "b");
        let mode = std::fs::metadata(copied.join("a.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o750);
        assert_eq!(
            std::fs::read_link(copied.join("link")).unwrap(),
            Path::new("a.sh")
        );

        let renamed = tmp.path().join("renamed");
        unpack(&tar[..], &renamed, false).unwrap();
        assert_eq!(std::fs::read_to_string(renamed.join("sub/b")).unwrap(), "b");

        let missing = tmp.path().join("no/such/dir");
        assert!(unpack(&tar[..], &missing, false).is_err());

        // An archive of `.` (tar -C DIR -c .) lands inside the destination.
        let dot = std::process::Command::new("tar")
            .arg("-C")
            .arg(tmp.path().join("src"))
            .args(["-cf", "-", "."])
            .output()
            .unwrap()
            .stdout;
        let from_dot = tmp.path().join("from-dot");
        std::fs::create_dir(&from_dot).unwrap();
        unpack(&dot[..], &from_dot, false).unwrap();
        assert_eq!(
            std::fs::read_to_string(from_dot.join("sub/b")).unwrap(),
            "b"
        );

        // One file, copied as a new name (docker cp semantics).
        let mut one = Vec::new();
        pack(&[tmp.path().join("src/a.sh")], &mut one).unwrap();
        let named = tmp.path().join("new-name");
        unpack(&one[..], &named, false).unwrap();
        assert_eq!(std::fs::read_to_string(&named).unwrap(), "#!/bin/sh\n");
    }

    #[test]
    fn hostile_archives_write_nothing_outside() {
        let tmp = tempfile::tempdir().unwrap();
        let dst = tmp.path().join("dst");
        std::fs::create_dir(&dst).unwrap();
        // A link to the outside, then a file "through" it.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "out", tmp.path()).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        b.append_data(&mut h, "out/escaped", &b"x"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        assert!(unpack(&tar[..], &dst, false).is_err());
        assert!(!tmp.path().join("escaped").exists());
        // `..` in a name (written raw: the builder refuses to).
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../x.txt\0");
        h.set_size(0);
        h.set_cksum();
        let mut raw = h.as_bytes().to_vec();
        raw.extend(std::iter::repeat_n(0, 1024));
        assert!(unpack(&raw[..], &dst, false).is_err());
        assert!(!tmp.path().join("x.txt").exists());
        // A link to the outside, then directories "through" it: nothing is
        // made outside, not even an empty directory.
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "x", &outside).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        b.append_data(&mut h, "x/newdir/deeper/f", &b"x"[..])
            .unwrap();
        let tar = b.into_inner().unwrap();
        let err = unpack(&tar[..], &dst, false).unwrap_err();
        assert!(err.to_string().contains("leaves the destination"), "{err}");
        assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
        // A symlink at the destination is replaced, not written through.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "y", outside.join("target")).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        b.append_data(&mut h, "y", &b"z"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        unpack(&tar[..], &dst, false).unwrap();
        assert!(!outside.join("target").exists());
        assert_eq!(std::fs::read(dst.join("y")).unwrap(), b"z");
    }
}
