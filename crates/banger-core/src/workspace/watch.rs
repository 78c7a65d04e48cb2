//! Which workspace paths changed since the last sync, from inotify: a sync
//! before an exec then stats only those paths instead of listing the whole
//! tree (and asking git about it). Anything the paths alone cannot say (a
//! directory made, moved or removed, an ignore file or git's index changed,
//! lost events) asks for a full listing instead.
//!
//! Every directory under the workspace is watched (`.git` itself but not
//! its insides); a directory made later is watched as soon as its creation
//! is seen, and then walked, so nothing made inside it meanwhile is missed.

use std::collections::{BTreeSet, HashMap};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};

use super::scan::IGNORE_FILE;

/// More changed paths than this and a full listing is cheaper.
const MAX_PATHS: usize = 2000;

/// What changed since the last [`Watcher::take`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    Paths(BTreeSet<String>),
    Everything,
}

impl Changes {
    fn add(&mut self, path: String) {
        if let Changes::Paths(paths) = self {
            paths.insert(path);
            if paths.len() > MAX_PATHS {
                *self = Changes::Everything;
            }
        }
    }
}

struct State {
    changes: Changes,
    /// Events were lost or the workspace itself went: start a new watcher.
    broken: bool,
}

/// Watches one workspace for as long as it lives.
pub struct Watcher {
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Watcher {
    /// Starts watching `root` (a canonical directory). The first
    /// [`take`](Self::take) says `Everything`: what happened before the
    /// watches were in place is not known.
    pub fn start(root: &Path) -> std::io::Result<Watcher> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        let mut dirs = Dirs {
            root: root.to_path_buf(),
            by_wd: HashMap::new(),
        };
        dirs.watch_tree(&inotify, root)?;
        let state = Arc::new(Mutex::new(State {
            changes: Changes::Everything,
            broken: false,
        }));
        // SAFETY: `Fd` owns the inotify descriptor and always returns it.
        let fd = unsafe { tokio::io::unix::AsyncFd::register(Fd(inotify)) }
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let task = tokio::spawn(run(fd, dirs, state.clone()));
        Ok(Watcher { state, task })
    }

    /// The changes since the last take (or since the start).
    pub fn take(&self) -> Changes {
        let mut state = self.lock();
        std::mem::replace(&mut state.changes, Changes::Paths(BTreeSet::new()))
    }

    /// Puts paths back for the next take: a sync that did not finish, or
    /// left conflicts, must look at them again.
    pub fn requeue(&self, changes: Changes) {
        let mut state = self.lock();
        match changes {
            Changes::Everything => state.changes = Changes::Everything,
            Changes::Paths(paths) => {
                for path in paths {
                    state.changes.add(path);
                }
            }
        }
    }

    pub fn is_broken(&self) -> bool {
        self.lock().broken || self.task.is_finished()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Fd(Inotify);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// The watched directories, by watch descriptor.
struct Dirs {
    root: PathBuf,
    by_wd: HashMap<WatchDescriptor, PathBuf>,
}

const DIR_EVENTS: AddWatchFlags = AddWatchFlags::IN_CREATE
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_MODIFY)
    .union(AddWatchFlags::IN_ATTRIB)
    .union(AddWatchFlags::IN_CLOSE_WRITE)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_MOVE_SELF)
    .union(AddWatchFlags::IN_DONT_FOLLOW)
    .union(AddWatchFlags::IN_ONLYDIR);

impl Dirs {
    /// Watches `dir`, then every directory under it (not following links;
    /// `.git`'s insides are not watched, only `.git` itself).
    fn watch_tree(&mut self, inotify: &Inotify, dir: &Path) -> std::io::Result<()> {
        let wd = inotify.add_watch(dir, DIR_EVENTS)?;
        self.by_wd.insert(wd, dir.to_path_buf());
        if dir.file_name().is_some_and(|n| n == ".git") {
            return Ok(());
        }
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            // Gone already: its removal is an event of its parent.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                self.watch_tree(inotify, &entry.path())?;
            }
        }
        Ok(())
    }

    /// What one event says changed.
    fn apply(&mut self, inotify: &Inotify, event: InotifyEvent, changes: &mut Changes) -> bool {
        let mask = event.mask;
        if mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
            return false;
        }
        if mask.contains(AddWatchFlags::IN_IGNORED) {
            self.by_wd.remove(&event.wd);
            return true;
        }
        let Some(dir) = self.by_wd.get(&event.wd).cloned() else {
            return true;
        };
        if mask.intersects(AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF) {
            *changes = Changes::Everything;
            return dir != self.root;
        }
        let Ok(rel) = dir.strip_prefix(&self.root) else {
            return true;
        };
        let name = event.name.map(PathBuf::from).unwrap_or_default();
        if mask.contains(AddWatchFlags::IN_ISDIR) {
            if mask.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO) {
                // Watched before the listing that follows: nothing made in
                // it from here on goes unseen.
                if self.watch_tree(inotify, &dir.join(&name)).is_err() {
                    return false;
                }
            }
            *changes = Changes::Everything;
            return true;
        }
        let path = rel.join(&name);
        let in_git = path
            .components()
            .next()
            .is_some_and(|c| c.as_os_str() == ".git");
        let rules = name.as_os_str() == IGNORE_FILE || name.as_os_str() == ".gitignore";
        if in_git || rules {
            *changes = Changes::Everything;
        } else {
            changes.add(banger_treecopy::names::encode_path(&path));
        }
        true
    }
}

async fn run(fd: tokio::io::unix::AsyncFd<Fd>, mut dirs: Dirs, state: Arc<Mutex<State>>) {
    loop {
        let Ok(mut ready) = fd.readable().await else {
            break;
        };
        let events = match fd.get_ref().0.read_events() {
            Ok(events) => events,
            Err(nix::errno::Errno::EAGAIN) => {
                ready.clear_ready();
                continue;
            }
            Err(_) => break,
        };
        let mut state_now = state.lock().unwrap_or_else(|p| p.into_inner());
        for event in events {
            let mut changes = std::mem::replace(&mut state_now.changes, Changes::Everything);
            let healthy = dirs.apply(&fd.get_ref().0, event, &mut changes);
            state_now.changes = changes;
            if !healthy {
                state_now.broken = true;
                state_now.changes = Changes::Everything;
                return;
            }
        }
    }
    let mut state_now = state.lock().unwrap_or_else(|p| p.into_inner());
    state_now.broken = true;
    state_now.changes = Changes::Everything;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn settled(w: &Watcher) -> Changes {
        tokio::time::sleep(Duration::from_millis(100)).await;
        w.take()
    }

    fn paths(list: &[&str]) -> Changes {
        Changes::Paths(list.iter().map(|p| p.to_string()).collect())
    }

    #[tokio::test]
    async fn a_watcher_names_changed_files_and_gives_up_on_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("src/deep")).unwrap();
        std::fs::create_dir_all(root.join(".git/objects")).unwrap();
        std::fs::write(root.join("src/deep/a.rs"), "a").unwrap();
        let w = Watcher::start(&root).unwrap();
        assert_eq!(w.take(), Changes::Everything, "nothing known before");
        assert_eq!(settled(&w).await, paths(&[]));

        std::fs::write(root.join("src/deep/a.rs"), "b").unwrap();
        std::fs::write(root.join("top.txt"), "t").unwrap();
        std::fs::remove_file(root.join("top.txt")).unwrap();
        assert_eq!(settled(&w).await, paths(&["src/deep/a.rs", "top.txt"]));

        // Directories, ignore files and git's own files ask for a listing.
        std::fs::create_dir_all(root.join("new/inner")).unwrap();
        assert_eq!(settled(&w).await, Changes::Everything);
        std::fs::write(root.join("new/inner/f"), "f").unwrap();
        assert_eq!(
            settled(&w).await,
            paths(&["new/inner/f"]),
            "watched once made"
        );
        std::fs::write(root.join("src/.gitignore"), "*.o").unwrap();
        assert_eq!(settled(&w).await, Changes::Everything);
        std::fs::write(root.join(".git/index"), "i").unwrap();
        assert_eq!(settled(&w).await, Changes::Everything);
        std::fs::write(root.join(".git/objects/x"), "x").unwrap();
        assert_eq!(
            settled(&w).await,
            paths(&[]),
            "git's insides are not watched"
        );

        w.requeue(paths(&["again"]));
        assert_eq!(w.take(), paths(&["again"]));
        assert!(!w.is_broken());
        std::fs::remove_dir_all(&root).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(w.is_broken(), "the workspace itself went");
    }
}
