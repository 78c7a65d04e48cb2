//! POSIX ACL entries for one uid, read and written as the kernel's
//! `system.posix_acl_*` extended attributes. A jailed Firecracker runs as a
//! uid of its own: the VM's files stay the user's, and that uid is granted
//! access to each for the jail's life (and revoked at teardown), so neither
//! side has to own the other's files.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

const ACCESS: &str = "system.posix_acl_access\0";
const DEFAULT: &str = "system.posix_acl_default\0";
const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;
const UNDEFINED: u32 = u32::MAX;

/// Read, write, execute: an ACL entry's permission bits.
pub const RWX: u16 = 0o7;
pub const RW: u16 = 0o6;
pub const R: u16 = 0o4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    tag: u16,
    id: u32,
    perm: u16,
}

/// An ACL as the kernel keeps it: entries sorted by tag, then id.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Acl(Vec<Entry>);

impl Acl {
    /// The ACL a plain mode stands for.
    fn from_mode(mode: u32) -> Acl {
        let bits = |shift: u32| ((mode >> shift) & 0o7) as u16;
        Acl(vec![
            Entry {
                tag: USER_OBJ,
                id: UNDEFINED,
                perm: bits(6),
            },
            Entry {
                tag: GROUP_OBJ,
                id: UNDEFINED,
                perm: bits(3),
            },
            Entry {
                tag: OTHER,
                id: UNDEFINED,
                perm: bits(0),
            },
        ])
    }

    fn decode(bytes: &[u8]) -> Option<Acl> {
        let version = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?);
        if version != VERSION || !(bytes.len() - 4).is_multiple_of(8) {
            return None;
        }
        let entries = bytes[4..]
            .chunks_exact(8)
            .map(|c| Entry {
                tag: u16::from_le_bytes([c[0], c[1]]),
                perm: u16::from_le_bytes([c[2], c[3]]),
                id: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect();
        Some(Acl(entries))
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = VERSION.to_le_bytes().to_vec();
        for e in &self.0 {
            out.extend(e.tag.to_le_bytes());
            out.extend(e.perm.to_le_bytes());
            out.extend(e.id.to_le_bytes());
        }
        out
    }

    /// With `uid`'s entry set to `perm` (`None`: removed), the mask then
    /// made the union of the group class, as setfacl makes it; without
    /// named entries the mask goes, so the ACL is a plain mode again.
    fn with_user(mut self, uid: u32, perm: Option<u16>) -> Acl {
        self.0
            .retain(|e| !(e.tag == USER && e.id == uid) && e.tag != MASK);
        if let Some(perm) = perm {
            self.0.push(Entry {
                tag: USER,
                id: uid,
                perm,
            });
        }
        let named = self.0.iter().any(|e| e.tag == USER || e.tag == GROUP);
        if named {
            let mask = self
                .0
                .iter()
                .filter(|e| matches!(e.tag, USER | GROUP | GROUP_OBJ))
                .fold(0, |m, e| m | e.perm);
            self.0.push(Entry {
                tag: MASK,
                id: UNDEFINED,
                perm: mask,
            });
        }
        self.0.sort();
        self
    }

    fn has_user(&self, uid: u32) -> bool {
        self.0.iter().any(|e| e.tag == USER && e.id == uid)
    }
}

/// An ACL as `get` (one of the getxattr calls, into the buffer given)
/// reads it; `None` when the file has none.
fn read_with(get: impl FnOnce(&mut [u8]) -> isize) -> std::io::Result<Option<Acl>> {
    let mut buf = vec![0u8; 4 + 8 * 64];
    let n = get(&mut buf);
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA) => Ok(None),
            _ => Err(e),
        };
    }
    buf.truncate(n as usize);
    Acl::decode(&buf)
        .map(Some)
        .ok_or_else(|| std::io::Error::other("an ACL this kernel wrote cannot be read"))
}

fn read(fd: i32, name: &str) -> std::io::Result<Option<Acl>> {
    // SAFETY: fgetxattr into a buffer of the length given; the name is
    // NUL-terminated.
    read_with(|buf| unsafe {
        libc::fgetxattr(fd, name.as_ptr().cast(), buf.as_mut_ptr().cast(), buf.len())
    })
}

fn write(fd: i32, name: &str, acl: &Acl) -> std::io::Result<()> {
    let bytes = acl.encode();
    // SAFETY: fsetxattr of a buffer of the length given; the name is
    // NUL-terminated.
    let r = unsafe {
        libc::fsetxattr(
            fd,
            name.as_ptr().cast(),
            bytes.as_ptr().cast(),
            bytes.len(),
            0,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn access_acl(file: &File) -> std::io::Result<Acl> {
    use std::os::unix::fs::MetadataExt;
    match read(file.as_raw_fd(), ACCESS)? {
        Some(acl) => Ok(acl),
        None => Ok(Acl::from_mode(file.metadata()?.mode())),
    }
}

/// Grants `uid` `perm` on the open file (or directory), keeping every other
/// entry. The kernel keeps the mode's group bits as the new mask.
pub fn grant(file: &File, uid: u32, perm: u16) -> std::io::Result<()> {
    let acl = access_acl(file)?.with_user(uid, Some(perm));
    write(file.as_raw_fd(), ACCESS, &acl)
}

/// Takes `uid`'s entry away again; a file left with no named entry is
/// given back its plain mode (its group bits those it had before).
pub fn revoke(file: &File, uid: u32) -> std::io::Result<()> {
    let Some(acl) = read(file.as_raw_fd(), ACCESS)? else {
        return Ok(());
    };
    if !acl.has_user(uid) {
        return Ok(());
    }
    write(file.as_raw_fd(), ACCESS, &acl.with_user(uid, None))
}

/// [`grant`] on a path that cannot be opened (a socket), never through a
/// link (`lsetxattr` on a link is refused).
pub fn grant_at(path: &Path, uid: u32, perm: u16) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("a path with a NUL byte"))?;
    // SAFETY: lgetxattr into a buffer of the length given; both strings
    // are NUL-terminated.
    let read = read_with(|buf| unsafe {
        libc::lgetxattr(
            c.as_ptr(),
            ACCESS.as_ptr().cast(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })?;
    let acl = match read {
        Some(acl) => acl,
        None => Acl::from_mode(std::fs::symlink_metadata(path)?.mode()),
    };
    let bytes = acl.with_user(uid, Some(perm)).encode();
    // SAFETY: lsetxattr of a buffer of the length given, as above.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            ACCESS.as_ptr().cast(),
            bytes.as_ptr().cast(),
            bytes.len(),
            0,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// [`revoke`] on a path, not following a link; a missing path is nothing.
pub fn revoke_at(path: &Path, uid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::ELOOP | libc::ENXIO)
            ) =>
        {
            return Ok(())
        }
        Err(e) => return Err(e),
    };
    revoke(&file, uid)
}

/// Makes what is created in the directory `dir` from now on reachable by
/// each of `uids` (read, write, and search), whoever creates it: a
/// default ACL, which a new file takes as its own, masked by its mode.
pub fn inherit(dir: &File, uids: &[u32]) -> std::io::Result<()> {
    let mut acl = Acl(vec![
        Entry {
            tag: USER_OBJ,
            id: UNDEFINED,
            perm: RWX,
        },
        Entry {
            tag: GROUP_OBJ,
            id: UNDEFINED,
            perm: 0,
        },
        Entry {
            tag: OTHER,
            id: UNDEFINED,
            perm: 0,
        },
    ]);
    for &uid in uids {
        acl = acl.with_user(uid, Some(RWX));
    }
    write(dir.as_raw_fd(), DEFAULT, &acl)
}

/// The permission `uid`'s own entry in the file's access ACL holds.
pub fn user_perm(path: &Path, uid: u32) -> Option<u16> {
    let file = File::open(path).ok()?;
    read(file.as_raw_fd(), ACCESS)
        .ok()
        .flatten()?
        .0
        .iter()
        .find(|e| e.tag == USER && e.id == uid)
        .map(|e| e.perm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn entries_round_trip_and_the_mask_follows_the_group_class() {
        let acl = Acl::from_mode(0o640).with_user(7, Some(RW));
        assert_eq!(Acl::decode(&acl.encode()), Some(acl.clone()));
        let tags: Vec<u16> = acl.0.iter().map(|e| e.tag).collect();
        assert_eq!(tags, [USER_OBJ, USER, GROUP_OBJ, MASK, OTHER]);
        assert_eq!(acl.0[3].perm, RW, "mask = rw (user 7) | r (group)");
        let back = acl.with_user(7, None);
        assert_eq!(back, Acl::from_mode(0o640), "no mask without named entries");
        assert!(Acl::decode(&[1, 0, 0, 0]).is_none());
    }

    /// A file the caller owns gains, then loses, a uid's access; its mode
    /// comes back exactly (ext4 and tmpfs keep ACLs; a filesystem without
    /// them says so and the test says why it stops).
    #[test]
    fn a_grant_is_revoked_and_the_mode_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, b"x").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let file = File::open(&path).unwrap();
        match grant(&file, 4_000_007, RW) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                eprintln!("skipping: no ACLs on {}", dir.path().display());
                return;
            }
            Err(e) => panic!("{e}"),
        }
        assert_eq!(user_perm(&path, 4_000_007), Some(RW));
        assert_eq!(
            std::fs::metadata(&path).unwrap().mode() & 0o777,
            0o660,
            "mask shows"
        );
        revoke_at(&path, 4_000_007).unwrap();
        assert_eq!(user_perm(&path, 4_000_007), None);
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o640);
        // Nothing granted: nothing to do.
        revoke_at(&path, 4_000_007).unwrap();
        revoke_at(&dir.path().join("gone"), 4_000_007).unwrap();
    }
}
