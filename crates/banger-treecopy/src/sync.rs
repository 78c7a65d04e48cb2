//! The stream of a workspace sync: one tar carrying the files and links to
//! write and, as empty entries marked with a PAX record, the paths to
//! remove. An entry may say what its destination is expected to be (absent,
//! or the change time it had at the last sync): if the destination changed
//! since, the entry is a conflict and is left alone. Applied into a
//! directory with the same refusals as `unpack`: nothing is written or
//! removed outside it.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::stat::ctime_ns;
use super::{is_top, refuse, relative, walk_parents, write_entry, Placed, Target};

/// What a file being pulled is called beside its destination until it is
/// whole (written, synced, then renamed over the destination). A listing
/// that meets one (a pull killed midway) removes it.
pub const PULL_TEMP_PREFIX: &str = ".banger-pull-";

/// The PAX record marking an entry whose path is to be removed.
pub const REMOVE_KEY: &str = "BANGER.remove";
/// The PAX record carrying an entry's expected destination.
pub const EXPECT_KEY: &str = "BANGER.expect";

/// What the destination of an entry should be for the entry to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Absent,
    /// A file or link with this change time (ns).
    Ctime(i64),
}

impl Expect {
    fn encode(self) -> String {
        match self {
            Expect::Absent => "absent".into(),
            Expect::Ctime(n) => format!("ctime:{n}"),
        }
    }

    fn decode(text: &str) -> Option<Expect> {
        match text.split_once(':') {
            None if text == "absent" => Some(Expect::Absent),
            Some(("ctime", n)) => n.parse().ok().map(Expect::Ctime),
            _ => None,
        }
    }
}

/// One path of a sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub path: String,
    pub remove: bool,
    /// None: applies whatever the destination holds.
    pub expect: Option<Expect>,
}

impl Item {
    pub fn write(path: impl Into<String>, expect: Option<Expect>) -> Item {
        Item {
            path: path.into(),
            remove: false,
            expect,
        }
    }
    pub fn remove(path: impl Into<String>, expect: Option<Expect>) -> Item {
        Item {
            path: path.into(),
            remove: true,
            expect,
        }
    }
}

/// What applying one entry did, in the stream's order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "did")]
pub enum Outcome {
    /// Written; the change time it has now.
    Written {
        ctime_ns: i64,
    },
    Removed,
    /// The destination changed since it was expected: left alone.
    Conflict,
    /// Not applied, for the reason given (only when applying untrusted
    /// input: a link out of the destination).
    Refused {
        why: String,
    },
}

/// How to apply a stream.
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// Owner of what is written and of the directories on its way.
    pub owner: Option<(u32, u32)>,
    /// From an untrusted side: only these paths, only files and links, and
    /// no link pointing out of the destination.
    pub only: Option<HashSet<String>>,
}

/// Writes the sync stream for `items`, taking written paths from `dir`.
pub fn pack(dir: &Path, items: &[Item], out: impl Write) -> std::io::Result<()> {
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    for item in items {
        let mut pax: Vec<(&str, String)> = Vec::new();
        if item.remove {
            pax.push((REMOVE_KEY, "1".into()));
        }
        if let Some(expect) = item.expect {
            pax.push((EXPECT_KEY, expect.encode()));
        }
        if !pax.is_empty() {
            builder.append_pax_extensions(pax.iter().map(|(k, v)| (*k, v.as_bytes())))?;
        }
        // The name on disk (and in the tar) is the bytes the item carries.
        let path = crate::names::decode(&item.path);
        if item.remove {
            let mut header = tar::Header::new_ustar();
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(0);
            header.set_mode(0o600);
            builder.append_data(&mut header, &path, std::io::empty())?;
        } else {
            builder.append_path_with_name(dir.join(&path), &path)?;
        }
    }
    builder.into_inner()?.flush()
}

/// Applies a sync stream into `dst`, a directory (made if missing).
/// Written files keep their modes and times; owners come from `options`.
pub fn apply(
    input: impl Read,
    dst: &Path,
    options: &ApplyOptions,
) -> std::io::Result<Vec<Outcome>> {
    // Into an empty directory nothing can be there already: no entry's
    // expectation of an absent path needs checking.
    let fresh = std::fs::read_dir(dst).map_or(true, |mut d| d.next().is_none());
    std::fs::create_dir_all(dst)?;
    chown(dst, options.owner)?;
    let target = Target::Into(dst.to_path_buf());
    let mut archive = tar::Archive::new(input);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_preserve_ownerships(false);
    archive.set_overwrite(true);
    let mut owned = HashSet::new();
    let mut outcomes = Vec::new();
    let mut placed = Placed::default();
    let mut written = HashSet::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let (remove, expect) = marks(&mut entry)?;
        let path = entry.path()?.into_owned();
        if is_top(&entry, &path) && options.only.is_none() {
            continue;
        }
        let rel = relative(&path)?;
        if let Some(only) = &options.only {
            if remove || !only.contains(&crate::names::encode_path(&rel)) {
                return Err(refuse(format!("{} was not asked for", path.display())));
            }
            if let Some(why) = untrusted_refusal(&mut entry, &rel)? {
                outcomes.push(Outcome::Refused { why });
                continue;
            }
        }
        let trivially = fresh && expect == Some(Expect::Absent) && !written.contains(&rel);
        if let Some(expect) = expect.filter(|_| !trivially) {
            if !holds(dst, &rel, expect, remove)? {
                // Changed to just what is being sent (the same edit on both
                // sides, or a sync whose answer was lost): no conflict.
                let dest = dst.join(&rel);
                let outcome = match !remove && same_as(&mut entry, &dest)? {
                    true => written_at(&dest)?,
                    false => Outcome::Conflict,
                };
                outcomes.push(outcome);
                continue;
            }
        }
        if remove {
            remove_known(dst, &rel, &path, &mut placed.dirs)?;
            outcomes.push(Outcome::Removed);
            continue;
        }
        if options.only.is_some() {
            // Pulled into the user's own tree: the destination is either as
            // it was or whole, whatever happens midway (a killed daemon).
            // One whose directory is a link on this side (a host workspace
            // holding a symlinked directory) is that path's refusal alone.
            if let Err(why) = inside_real_dirs(dst, &rel, &path)? {
                outcomes.push(Outcome::Refused { why });
                continue;
            }
            write_whole(&mut entry, dst, &rel, &path, &mut placed)?;
        } else {
            write_entry(&mut entry, &target, &mut placed)?;
        }
        if fresh {
            written.insert(rel.clone());
        }
        let dest = dst.join(&rel);
        if options.owner.is_some() {
            own_parents(dst, &rel, options.owner, &mut owned)?;
            chown(&dest, options.owner)?;
        }
        outcomes.push(written_at(&dest)?);
    }
    Ok(outcomes)
}

/// Whether every directory above `rel` is a real one (made where missing):
/// `Err(why)` names the one that is not, with nothing written.
fn inside_real_dirs(dst: &Path, rel: &Path, shown: &Path) -> std::io::Result<Result<(), String>> {
    let mut at = dst.to_path_buf();
    for part in rel.parent().into_iter().flat_map(|p| p.components()) {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(m) => {
                let what = if m.file_type().is_symlink() {
                    "a link"
                } else {
                    "not a directory"
                };
                let under = at.strip_prefix(dst).unwrap_or(&at);
                return Ok(Err(format!(
                    "{} is under {}, which is {what} here: not followed",
                    shown.display(),
                    under.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
            Err(e) => return Err(e),
        }
    }
    Ok(Ok(()))
}

/// Writes a file or link entry to a temporary name beside its destination
/// (holes of a sparse entry kept), syncs it, and renames it over the
/// destination, which is replaced, never followed.
fn write_whole<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    dst: &Path,
    rel: &Path,
    shown: &Path,
    placed: &mut Placed,
) -> std::io::Result<()> {
    walk_parents(dst, rel, shown, true, &mut placed.dirs)?;
    let dest = dst.join(rel);
    let parent = dest.parent().unwrap_or(dst);
    // Unique in this process by the counter, among processes by the pid.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = parent.join(format!("{PULL_TEMP_PREFIX}{}-{n}", std::process::id()));
    let written = (|| {
        entry.unpack(&tmp)?;
        if entry.header().entry_type() != tar::EntryType::Symlink {
            std::fs::File::open(&tmp)?.sync_all()?;
        }
        std::fs::rename(&tmp, &dest)?;
        // The rename itself, durable: the directory's entry.
        std::fs::File::open(parent)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// `dest` written, with the change time it has now.
fn written_at(dest: &Path) -> std::io::Result<Outcome> {
    let meta = std::fs::symlink_metadata(dest)?;
    Ok(Outcome::Written {
        ctime_ns: ctime_ns(&meta),
    })
}

/// Whether the destination of `rel` is as `expect` says. Only looked at:
/// a parent that is a symlink is refused when the entry is applied.
fn holds(dst: &Path, rel: &Path, expect: Expect, remove: bool) -> std::io::Result<bool> {
    let now = match std::fs::symlink_metadata(dst.join(rel)) {
        Ok(m) if !m.is_dir() => Some(ctime_ns(&m)),
        Ok(_) => Some(-1), // A directory now: it changed.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        // A parent is a file: the path is not there either.
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => None,
        Err(e) => return Err(e),
    };
    Ok(match expect {
        Expect::Absent => now.is_none(),
        // Gone already is what a removal wanted; a write finds it changed.
        Expect::Ctime(n) => now == Some(n) || (remove && now.is_none()),
    })
}

/// Whether `dest` already holds what `entry` carries: the same link, or a
/// file with the same bytes and permission bits (the entry is read).
fn same_as<R: Read>(entry: &mut tar::Entry<'_, R>, dest: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::symlink_metadata(dest) else {
        return Ok(false);
    };
    let header = entry.header();
    match header.entry_type() {
        tar::EntryType::Symlink if meta.file_type().is_symlink() => {
            let to = entry.link_name()?.map(|t| t.into_owned());
            Ok(to.is_some_and(|t| std::fs::read_link(dest).is_ok_and(|d| d == t)))
        }
        kind if kind.is_file() && meta.is_file() => {
            let mode = header.mode()? & 0o7777;
            if header.size()? != meta.len() || mode != meta.permissions().mode() & 0o7777 {
                return Ok(false);
            }
            let mut file = std::fs::File::open(dest)?;
            let (mut a, mut b) = (vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
            loop {
                let n = read_full(entry, &mut a)?;
                if n == 0 {
                    return Ok(true);
                }
                if read_full(&mut file, &mut b[..n])? != n || a[..n] != b[..n] {
                    return Ok(false);
                }
            }
        }
        _ => Ok(false),
    }
}

fn read_full(from: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match from.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Why an untrusted entry is not applied: only files and links whose
/// target stays inside the destination.
fn untrusted_refusal<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    rel: &Path,
) -> std::io::Result<Option<String>> {
    let kind = entry.header().entry_type();
    if kind == tar::EntryType::Symlink {
        let to = entry
            .link_name()?
            .map(|t| t.into_owned())
            .unwrap_or_default();
        if !stays_inside(rel, &to) {
            return Ok(Some(format!(
                "a link to {} points out of the workspace",
                to.display()
            )));
        }
        return Ok(None);
    }
    // A sparse file (GNU's sparse entry) is a file: its holes are kept.
    if !kind.is_file() && !kind.is_gnu_sparse() {
        return Ok(Some(format!(
            "a {kind:?} entry is neither a file nor a link"
        )));
    }
    Ok(None)
}

/// Whether link `rel` -> `to` resolves (lexically) inside the directory.
fn stays_inside(rel: &Path, to: &Path) -> bool {
    if to.is_absolute() || to.as_os_str().is_empty() {
        return false;
    }
    let mut depth = rel.components().count() as i64 - 1;
    for c in to.components() {
        match c {
            std::path::Component::ParentDir => depth -= 1,
            std::path::Component::Normal(_) => depth += 1,
            std::path::Component::CurDir => {}
            _ => return false,
        }
        if depth < 0 {
            return false;
        }
    }
    true
}

fn marks<R: Read>(entry: &mut tar::Entry<'_, R>) -> std::io::Result<(bool, Option<Expect>)> {
    let (mut remove, mut expect) = (false, None);
    let Some(pax) = entry.pax_extensions()? else {
        return Ok((remove, expect));
    };
    for ext in pax {
        let ext = ext?;
        match ext.key() {
            Ok(REMOVE_KEY) => remove = true,
            Ok(EXPECT_KEY) => {
                let text = ext.value().unwrap_or_default();
                expect = Some(
                    Expect::decode(text)
                        .ok_or_else(|| refuse(format!("an unreadable expectation `{text}`")))?,
                );
            }
            _ => {}
        }
    }
    Ok((remove, expect))
}

/// Removes the file or link `rel` under `dst`, then any directories above
/// it the removal left empty. A directory is left alone, and no directory
/// of the path may be a symlink.
pub fn remove_path(dst: &Path, rel: &Path, shown: &Path) -> std::io::Result<()> {
    remove_known(dst, rel, shown, &mut HashSet::new())
}

/// [`remove_path`] keeping `known` (real directories) true.
fn remove_known(
    dst: &Path,
    rel: &Path,
    shown: &Path,
    known: &mut HashSet<PathBuf>,
) -> std::io::Result<()> {
    if !walk_parents(dst, rel, shown, false, known)? {
        return Ok(()); // A directory on the way is missing: so is the file.
    }
    let dest = dst.join(rel);
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
        known.remove(d);
        dir = d.parent();
    }
    Ok(())
}

/// Gives the directories between `dst` and `rel` to `owner`, once each.
fn own_parents(
    dst: &Path,
    rel: &Path,
    owner: Option<(u32, u32)>,
    owned: &mut HashSet<PathBuf>,
) -> std::io::Result<()> {
    let mut at = dst.to_path_buf();
    for part in rel.parent().into_iter().flat_map(|p| p.components()) {
        at.push(part);
        if owned.insert(at.clone()) {
            chown(&at, owner)?;
        }
    }
    Ok(())
}

fn chown(path: &Path, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    match owner {
        Some((uid, gid)) => std::os::unix::fs::lchown(path, Some(uid), Some(gid)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn ctime(path: &Path) -> i64 {
        ctime_ns(&std::fs::symlink_metadata(path).unwrap())
    }

    fn send(
        from: &Path,
        items: &[Item],
        to: &Path,
        options: &ApplyOptions,
    ) -> std::io::Result<Vec<Outcome>> {
        let mut stream = Vec::new();
        pack(from, items, &mut stream).unwrap();
        apply(&stream[..], to, options)
    }

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

        let items = [
            Item::write("src/deep/new.rs", None),
            Item::write("run.sh", None),
            Item::write("link", None),
            Item::remove("old/gone/f", None),
            Item::remove("never-was", None),
        ];
        let outcomes = send(&host, &items, &guest, &ApplyOptions::default()).unwrap();
        assert_eq!(
            outcomes[..3],
            [
                Outcome::Written {
                    ctime_ns: ctime(&guest.join("src/deep/new.rs"))
                },
                Outcome::Written {
                    ctime_ns: ctime(&guest.join("run.sh"))
                },
                Outcome::Written {
                    ctime_ns: ctime(&guest.join("link"))
                },
            ]
        );
        assert_eq!(outcomes[3..], [Outcome::Removed, Outcome::Removed]);
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
        let err = send(
            &host,
            &[Item::remove("x/precious", None)],
            &guest,
            &ApplyOptions::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("leaves the destination"), "{err}");
        assert!(outside.join("precious").exists());
        let mut dotdot = Vec::new();
        pack(
            &host,
            &[Item::remove("../outside/precious", None)],
            &mut dotdot,
        )
        .unwrap_or(());
        let _ = apply(&dotdot[..], &guest, &ApplyOptions::default());
        assert!(outside.join("precious").exists());
    }

    #[test]
    fn an_entry_whose_destination_changed_is_a_conflict_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let (host, guest) = (tmp.path().join("host"), tmp.path().join("guest"));
        std::fs::create_dir_all(&host).unwrap();
        std::fs::create_dir_all(&guest).unwrap();
        for name in ["same", "edited", "gone", "fresh"] {
            std::fs::write(host.join(name), format!("host {name}")).unwrap();
        }
        std::fs::write(guest.join("same"), "base").unwrap();
        std::fs::write(guest.join("edited"), "base").unwrap();
        std::fs::write(guest.join("rm-same"), "base").unwrap();
        std::fs::write(guest.join("rm-edited"), "base").unwrap();
        let base = |n: &str| Some(Expect::Ctime(ctime(&guest.join(n))));
        let expectations = [
            base("same"),
            base("edited"),
            base("rm-same"),
            base("rm-edited"),
        ];
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(guest.join("edited"), "guest's own").unwrap();
        std::fs::write(guest.join("rm-edited"), "guest's own").unwrap();
        std::fs::write(guest.join("fresh"), "guest made it").unwrap();
        // The same edit on both sides is no conflict.
        std::fs::write(host.join("twin"), "same").unwrap();
        std::fs::write(guest.join("twin"), "same").unwrap();
        let items = [
            Item::write("twin", Some(Expect::Absent)),
            Item::write("same", expectations[0]),
            Item::write("edited", expectations[1]),
            Item::remove("rm-same", expectations[2]),
            Item::remove("rm-edited", expectations[3]),
            Item::write("fresh", Some(Expect::Absent)),
            Item::write("gone", Some(Expect::Ctime(1))),
        ];
        let outcomes = send(&host, &items, &guest, &ApplyOptions::default()).unwrap();
        assert_eq!(
            outcomes[0],
            Outcome::Written {
                ctime_ns: ctime(&guest.join("twin"))
            }
        );
        let outcomes = &outcomes[1..];
        assert!(matches!(outcomes[0], Outcome::Written { .. }));
        assert_eq!(
            outcomes[1..],
            [
                Outcome::Conflict,
                Outcome::Removed,
                Outcome::Conflict,
                Outcome::Conflict,
                Outcome::Conflict
            ]
        );
        assert_eq!(
            std::fs::read_to_string(guest.join("same")).unwrap(),
            "host same"
        );
        assert_eq!(
            std::fs::read_to_string(guest.join("edited")).unwrap(),
            "guest's own"
        );
        assert_eq!(
            std::fs::read_to_string(guest.join("rm-edited")).unwrap(),
            "guest's own"
        );
        assert_eq!(
            std::fs::read_to_string(guest.join("fresh")).unwrap(),
            "guest made it"
        );
        assert!(!guest.join("rm-same").exists() && !guest.join("gone").exists());
    }

    #[test]
    fn untrusted_input_writes_only_what_was_asked_and_no_link_out() {
        let tmp = tempfile::tempdir().unwrap();
        let (guest, host) = (tmp.path().join("guest"), tmp.path().join("host"));
        std::fs::create_dir_all(guest.join("d")).unwrap();
        std::fs::write(guest.join("d/f"), "f").unwrap();
        std::os::unix::fs::symlink("/etc", guest.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../x", guest.join("d/up")).unwrap();
        std::os::unix::fs::symlink("../d/f", guest.join("d/ok")).unwrap();
        std::fs::create_dir_all(&host).unwrap();
        let asked = |paths: &[&str]| ApplyOptions {
            owner: None,
            only: Some(paths.iter().map(|p| p.to_string()).collect()),
        };
        let items: Vec<Item> = ["d/f", "abs", "d/up", "d/ok"]
            .iter()
            .map(|p| Item::write(*p, None))
            .collect();
        let outcomes = send(
            &guest,
            &items,
            &host,
            &asked(&["d/f", "abs", "d/up", "d/ok"]),
        )
        .unwrap();
        assert!(matches!(outcomes[0], Outcome::Written { .. }));
        assert!(matches!(&outcomes[1], Outcome::Refused { why } if why.contains("/etc")));
        assert!(matches!(outcomes[2], Outcome::Refused { .. }));
        assert!(matches!(outcomes[3], Outcome::Written { .. }));
        assert!(
            !host.join("abs").exists() && std::fs::symlink_metadata(host.join("d/up")).is_err()
        );

        // Anything not asked for ends the apply.
        let err = send(&guest, &items[..1], &host, &asked(&["abs"])).unwrap_err();
        assert!(err.to_string().contains("not asked for"), "{err}");
        let err = send(
            &guest,
            &[Item::remove("d/f", None)],
            &host,
            &asked(&["d/f"]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("not asked for"), "{err}");
        assert!(host.join("d/f").exists());

        // A directory the host has as a link: that path alone is refused,
        // nothing is written through it, the rest is pulled (red team
        // round 3, item 23: the whole pull failed).
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, host.join("linked")).unwrap();
        std::fs::create_dir_all(guest.join("linked")).unwrap();
        std::fs::write(guest.join("linked/new.txt"), "new").unwrap();
        std::fs::write(guest.join("plain.txt"), "plain").unwrap();
        let items = [
            Item::write("linked/new.txt", None),
            Item::write("plain.txt", None),
        ];
        let outcomes = send(
            &guest,
            &items,
            &host,
            &asked(&["linked/new.txt", "plain.txt"]),
        )
        .unwrap();
        assert!(
            matches!(&outcomes[0], Outcome::Refused { why } if why.contains("linked, which is a link here")),
            "{outcomes:?}"
        );
        assert!(matches!(outcomes[1], Outcome::Written { .. }));
        assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
        assert_eq!(
            std::fs::read_to_string(host.join("plain.txt")).unwrap(),
            "plain"
        );
    }

    /// A name that is not UTF-8 is carried as its bytes, to the guest and
    /// back from it (red team round 3, item 11: one such name failed every
    /// pull, and such a host file was never sent).
    #[test]
    fn names_that_are_not_utf8_are_carried_as_bytes() {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
        let name = OsStr::from_bytes(b"latin1-\xe9t\xe9.txt");
        std::fs::create_dir_all(src.join("d")).unwrap();
        std::fs::write(src.join("d").join(name), "bytes").unwrap();
        let carried = format!("d/{}", crate::names::encode(name.as_bytes()));
        assert_eq!(carried, "d/latin1-\\xe9t\\xe9.txt");
        let listed = crate::stat::list(&src).unwrap();
        assert_eq!(listed[0].path, carried, "the listing carries the same");
        for only in [None, Some([carried.clone()].into_iter().collect())] {
            let _ = std::fs::remove_dir_all(&dst);
            let options = ApplyOptions { owner: None, only };
            let outcomes =
                send(&src, &[Item::write(carried.clone(), None)], &dst, &options).unwrap();
            assert!(
                matches!(outcomes[0], Outcome::Written { .. }),
                "{outcomes:?}"
            );
            assert_eq!(
                std::fs::read_to_string(dst.join("d").join(name)).unwrap(),
                "bytes"
            );
        }
    }

    /// A pulled file replaces its destination whole, through a temporary
    /// name beside it that is gone after; a sparse one keeps its holes.
    #[test]
    fn a_pulled_file_replaces_its_destination_whole_and_stays_sparse() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let (guest, host) = (tmp.path().join("guest"), tmp.path().join("host"));
        std::fs::create_dir_all(&guest).unwrap();
        std::fs::create_dir_all(&host).unwrap();
        let sparse = std::fs::File::create(guest.join("disk.img")).unwrap();
        sparse.set_len(64 << 20).unwrap();
        std::fs::write(host.join("disk.img"), "old").unwrap();
        let only = ApplyOptions {
            owner: None,
            only: Some(["disk.img".to_string()].into_iter().collect()),
        };
        let outcomes = send(&guest, &[Item::write("disk.img", None)], &host, &only).unwrap();
        assert!(
            matches!(outcomes[0], Outcome::Written { .. }),
            "{outcomes:?}"
        );
        let meta = std::fs::metadata(host.join("disk.img")).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        assert!(
            meta.blocks() * 512 < 1 << 20,
            "holes kept: {} blocks",
            meta.blocks()
        );
        let left: Vec<_> = std::fs::read_dir(&host)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, ["disk.img"]);
    }

    /// A file replaced by a directory of its name, and a directory by a
    /// file, each in one stream with its removal first (red team round 3,
    /// item 5: before, every later sync failed).
    #[test]
    fn a_file_and_a_directory_trade_places_in_one_stream() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
        std::fs::create_dir_all(src.join("foo")).unwrap();
        std::fs::write(src.join("foo/inner"), b"now a dir").unwrap();
        std::fs::write(src.join("bar"), b"now a file").unwrap();
        std::fs::create_dir_all(dst.join("bar")).unwrap();
        std::fs::write(dst.join("foo"), b"was a file").unwrap();
        std::fs::write(dst.join("bar/old"), b"was in a dir").unwrap();
        let expected = |p: &str| Some(Expect::Ctime(ctime(&dst.join(p))));
        let items = [
            Item::remove("foo", expected("foo")),
            Item::remove("bar/old", expected("bar/old")),
            Item::write("foo/inner", Some(Expect::Absent)),
            Item::write("bar", Some(Expect::Absent)),
        ];
        let outcomes = send(&src, &items, &dst, &ApplyOptions::default()).unwrap();
        assert!(
            matches!(
                outcomes[..],
                [
                    Outcome::Removed,
                    Outcome::Removed,
                    Outcome::Written { .. },
                    Outcome::Written { .. }
                ]
            ),
            "{outcomes:?}"
        );
        assert_eq!(std::fs::read(dst.join("foo/inner")).unwrap(), b"now a dir");
        assert_eq!(std::fs::read(dst.join("bar")).unwrap(), b"now a file");
    }

    #[test]
    fn a_directory_emptied_and_filled_in_one_stream_is_made_again() {
        let tmp = tempfile::tempdir().unwrap();
        let (host, guest) = (tmp.path().join("host"), tmp.path().join("guest"));
        std::fs::create_dir_all(host.join("d")).unwrap();
        std::fs::write(host.join("d/new"), "n").unwrap();
        std::fs::write(host.join("d/seen"), "s").unwrap();
        std::fs::create_dir_all(guest.join("d")).unwrap();
        std::fs::write(guest.join("d/only"), "o").unwrap();
        let items = [
            Item::write("d/seen", None),
            Item::remove("d/only", None),
            Item::remove("d/seen", None),
            Item::write("d/new", None),
        ];
        let outcomes = send(&host, &items, &guest, &ApplyOptions::default()).unwrap();
        assert_eq!(outcomes.len(), 4);
        assert_eq!(std::fs::read_to_string(guest.join("d/new")).unwrap(), "n");
        assert!(!guest.join("d/only").exists() && !guest.join("d/seen").exists());

        // `tar -C DIR -c .` output applies too (its `./` entry is the destination).
        let mut tar = Vec::new();
        let mut builder = tar::Builder::new(&mut tar);
        builder.append_dir_all(".", &host).unwrap();
        builder.into_inner().unwrap();
        let fresh = tmp.path().join("fresh");
        let outcomes = apply(&tar[..], &fresh, &ApplyOptions::default()).unwrap();
        assert!(outcomes.len() >= 2, "{outcomes:?}");
        assert_eq!(std::fs::read_to_string(fresh.join("d/seen")).unwrap(), "s");
    }

    #[test]
    fn links_stay_inside_by_their_own_directory() {
        assert!(stays_inside(Path::new("a/b/l"), Path::new("../c")));
        assert!(stays_inside(Path::new("l"), Path::new("./x/../y")));
        assert!(!stays_inside(Path::new("l"), Path::new("../x")));
        assert!(!stays_inside(Path::new("a/l"), Path::new("x/../../../y")));
        assert!(!stays_inside(Path::new("l"), Path::new("/etc")));
    }
}
