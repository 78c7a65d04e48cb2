//! Network instances whose state directory is gone. Every instance's
//! gateway device carries, as its alias, the path of a file in its state
//! directory that holds the instance's id (the owner file). When that file
//! is gone, or now names another instance, and no process holds one of the
//! instance's taps open, nothing will ever use or remove its objects: the
//! next setup of any instance removes them. Without this, each thrown-away
//! state directory left a gateway, taps and an nft table behind, and after
//! a few dozen no default subnet was free.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::net::Instance;

/// What a gateway device's alias starts with; the owner file's path follows.
pub const OWNER_ALIAS: &str = "banger-owner:";
/// The kernel keeps at most this many bytes of an alias.
const MAX_ALIAS: usize = 255;
/// An owner file holds an id and a newline; anything longer is not one.
const MAX_OWNER_BYTES: u64 = 64;

/// Refuses an owner path that cannot be an alias: relative, not UTF-8,
/// with control characters (one line of `ip` output each), or too long.
pub fn check_owner(path: &Path) -> Result<&str, String> {
    let text = path
        .to_str()
        .filter(|t| path.is_absolute() && !t.chars().any(char::is_control))
        .ok_or_else(|| {
            format!(
                "network owner file {} must be an absolute path without control characters",
                path.display()
            )
        })?;
    if OWNER_ALIAS.len() + text.len() > MAX_ALIAS {
        return Err(format!(
            "network owner file {text} is longer than an interface alias allows"
        ));
    }
    Ok(text)
}

/// Whether the owner file at `path` still wants `instance`: `Some(true)`
/// when it holds the id, `Some(false)` when it is gone or holds another,
/// `None` when that cannot be told (kept, to be safe). Read without
/// following a link or blocking on a FIFO: the path is the daemon's word.
pub fn owner_wants(path: &Path, instance: &Instance) -> Option<bool> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path);
    let file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Some(false),
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => return Some(false),
        Err(_) => return None,
    };
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut text = String::new();
    file.take(MAX_OWNER_BYTES).read_to_string(&mut text).ok()?;
    Some(text.trim() == instance.id())
}

/// One line of `ip -o link show`, as much as the orphan check needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    /// `LOWER_UP`: it has carrier; for a tap, a process holds it open.
    pub carrier: bool,
    /// The device is up (a tap's carrier shows only then).
    pub up: bool,
    pub alias: Option<String>,
}

/// Links from `ip -o link show` ("3: bgx: <NO-CARRIER,UP> … \    alias A").
pub fn parse_links(text: &str) -> Vec<Link> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ": ");
            parts.next()?;
            let name = parts.next()?.split('@').next()?.trim().to_string();
            let rest = parts.next()?;
            let flags = rest
                .strip_prefix('<')
                .and_then(|r| r.split_once('>'))
                .map(|(f, _)| f.split(',').collect::<Vec<_>>())
                .unwrap_or_default();
            let alias = rest
                .split_once("\\    alias ")
                .map(|(_, a)| a.split("\\    ").next().unwrap_or(a).to_string());
            Some(Link {
                name,
                carrier: flags.contains(&"LOWER_UP"),
                up: flags.contains(&"UP"),
                alias,
            })
        })
        .collect()
}

/// The instances among `links` to remove: a gateway with an owner alias
/// whose owner no longer wants it, and none of whose taps is held open (a
/// VMM of a deleted state directory may still run; a tap that is down
/// cannot say, and counts as held).
pub fn orphans(
    links: &[Link],
    wants: impl Fn(&Path, &Instance) -> Option<bool>,
) -> Vec<(Instance, PathBuf)> {
    let mut found = Vec::new();
    for link in links {
        let Some(id) = link
            .name
            .strip_prefix("bg")
            .and_then(|n| n.strip_suffix("gw"))
        else {
            continue;
        };
        let Ok(instance) = Instance::parse(id) else {
            continue;
        };
        let Some(owner) = link
            .alias
            .as_deref()
            .and_then(|a| a.strip_prefix(OWNER_ALIAS))
        else {
            continue; // Made before owners were recorded: left for the hand.
        };
        let owner = PathBuf::from(owner);
        if wants(&owner, &instance) != Some(false) {
            continue;
        }
        let held = links
            .iter()
            .any(|l| instance.owns_tap(&l.name) && (l.carrier || !l.up));
        if !held {
            found.push((instance, owner));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINKS: &str = "\
1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN\\    link/loopback 00:00:00:00:00:00 brd 00:00:00:00:00:00
2: bgaaaaaagw: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 state UNKNOWN\\    link/ether 9e:b1 brd ff:ff\\    alias banger-owner:/gone/state/network.instance
3: bgaaaaaat0: <NO-CARRIER,BROADCAST,MULTICAST,UP> mtu 1500 state DOWN\\    link/ether 6e:6a brd ff:ff
4: bgbbbbbbgw: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500\\    link/ether 9e:b2 brd ff:ff\\    alias banger-owner:/gone too/network.instance
5: bgbbbbbbt0: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 state UP\\    link/ether 6e:6b brd ff:ff
6: bgccccccgw: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500\\    link/ether 9e:b3 brd ff:ff\\    alias banger-owner:/here/network.instance
7: bgddddddgw: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500\\    link/ether 9e:b4 brd ff:ff
8: veth0@if5: <BROADCAST,UP,LOWER_UP> mtu 1500\\    link/ether 9e:b5 brd ff:ff
";

    #[test]
    fn links_are_read_with_their_carrier_and_alias() {
        let links = parse_links(LINKS);
        assert_eq!(links.len(), 8);
        assert_eq!(
            links[1],
            Link {
                name: "bgaaaaaagw".into(),
                carrier: true,
                up: true,
                alias: Some("banger-owner:/gone/state/network.instance".into()),
            }
        );
        assert!(!links[2].carrier && links[2].up && links[2].alias.is_none());
        assert_eq!(
            links[3].alias.as_deref(),
            Some("banger-owner:/gone too/network.instance")
        );
        assert_eq!(links[7].name, "veth0");
    }

    /// Only an instance whose owner is gone and whose taps nobody holds:
    /// not one whose VMM still runs, whose owner is there, or that has no
    /// owner recorded.
    #[test]
    fn orphans_are_unwanted_and_idle() {
        let links = parse_links(LINKS);
        let wants =
            |p: &Path, _: &Instance| Some(!p.starts_with("/gone") && !p.starts_with("/gone too"));
        let found = orphans(&links, wants);
        assert_eq!(
            found,
            vec![(
                Instance::parse("aaaaaa").unwrap(),
                PathBuf::from("/gone/state/network.instance")
            )]
        );
        assert!(orphans(&links, |_, _| None).is_empty(), "unknown is kept");
        let mut down = links.clone();
        down[2].up = false;
        let found = orphans(&down, |_, _| Some(false));
        let ids: Vec<&str> = found.iter().map(|(i, _)| i.id()).collect();
        assert_eq!(ids, ["cccccc"], "a tap that is down may be held");
    }

    #[test]
    fn an_owner_file_wants_its_own_id_only() {
        let dir = tempfile::tempdir().unwrap();
        let a = Instance::parse("aaaaaa").unwrap();
        let file = dir.path().join("network.instance");
        assert_eq!(owner_wants(&file, &a), Some(false), "gone");
        std::fs::write(&file, "aaaaaa\n").unwrap();
        assert_eq!(owner_wants(&file, &a), Some(true));
        std::fs::write(&file, "bbbbbb\n").unwrap();
        assert_eq!(owner_wants(&file, &a), Some(false), "another instance's");
        assert_eq!(owner_wants(&file.join("x"), &a), Some(false), "not a dir");
        // Neither followed nor waited on: a link or a FIFO cannot tell.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(owner_wants(&link, &a), None);
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert_eq!(owner_wants(&fifo, &a), None);
    }

    #[test]
    fn owner_paths_must_fit_an_alias() {
        assert!(check_owner(Path::new("/home/me/.local/state/banger/network.instance")).is_ok());
        assert!(check_owner(Path::new("state/network.instance")).is_err());
        assert!(check_owner(Path::new("/a\nb")).is_err());
        assert!(check_owner(&PathBuf::from(format!("/{}", "x".repeat(250)))).is_err());
    }
}
