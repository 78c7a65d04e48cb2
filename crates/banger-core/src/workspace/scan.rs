//! What a sync takes from a workspace: in a git repository, what
//! `git ls-files --cached --others --exclude-standard` lists (tracked files,
//! and untracked ones not ignored); in a plain directory, everything. Either
//! way less what `.bangerignore` files (gitignore syntax) exclude. Regular
//! files and symlinks (as links, never followed) are taken; anything else is
//! skipped and named.

use std::collections::HashSet;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use banger_host::{CommandSpec, ProcessRunner};
use banger_treecopy::names;
use ignore::gitignore::{Gitignore, GitignoreBuilder};

use super::WorkspaceError;

/// The ignore files a workspace may hold, in any directory.
pub const IGNORE_FILE: &str = ".bangerignore";

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    File,
    Symlink,
}

/// One file as stat saw it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Found {
    /// Relative to the workspace, `/`-separated.
    pub path: String,
    pub kind: Kind,
    pub size: u64,
    pub mtime_ns: i64,
    /// Permission bits (with setuid, setgid, sticky).
    pub mode: u32,
    pub ino: u64,
    /// A symlink's target, as written.
    pub target: Option<String>,
}

#[derive(Debug, Default)]
pub struct Listing {
    /// Sorted by path.
    pub found: Vec<Found>,
    /// Paths that are neither files nor symlinks (sockets, FIFOs, devices).
    pub skipped: Vec<String>,
}

/// Lists `dir` (a canonical workspace directory).
pub fn list(dir: &Path, runner: &dyn ProcessRunner) -> Result<Listing, WorkspaceError> {
    let paths = match git_paths(dir, runner) {
        Some(paths) => paths,
        None => walk(dir)?,
    };
    let ignores = IgnoreFiles::load(dir, &paths);
    let mut listing = Listing::default();
    for path in paths {
        if ignores.excludes(&path) {
            continue;
        }
        let name = path.rsplit('/').next().unwrap_or_default();
        if name.starts_with(banger_treecopy::sync::PULL_TEMP_PREFIX) {
            // Half of a pull a killed daemon left: never the user's.
            let _ = std::fs::remove_file(dir.join(names::decode(&path)));
            continue;
        }
        match found(dir, path)? {
            Seen::Found(f) => listing.found.push(f),
            Seen::Special(path) => listing.skipped.push(path),
            Seen::Nothing => {}
        }
    }
    listing.found.sort_by(|a, b| a.path.cmp(&b.path));
    listing.found.dedup_by(|a, b| a.path == b.path);
    Ok(listing)
}

enum Seen {
    Found(Found),
    Special(String),
    Nothing,
}

/// `path` under `dir` as stat sees it now.
fn found(dir: &Path, path: String) -> Result<Seen, WorkspaceError> {
    let full = dir.join(names::decode(&path));
    // Listed by git but gone from the disk (deleted, not yet staged).
    let Ok(meta) = std::fs::symlink_metadata(&full) else {
        return Ok(Seen::Nothing);
    };
    let kind = if meta.file_type().is_symlink() {
        Kind::Symlink
    } else if meta.is_file() {
        Kind::File
    } else if meta.is_dir() {
        return Ok(Seen::Nothing);
    } else {
        return Ok(Seen::Special(path));
    };
    let target = match kind {
        Kind::Symlink => Some(
            std::fs::read_link(&full)
                .map_err(|e| format!("{}: {e}", full.display()))?
                .to_string_lossy()
                .into_owned(),
        ),
        Kind::File => None,
    };
    Ok(Seen::Found(Found {
        path,
        kind,
        size: meta.len(),
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        mode: meta.mode() & 0o7777,
        ino: meta.ino(),
        target,
    }))
}

/// The file or link at `path` under `dir`, as stat sees it now.
pub fn stat(dir: &Path, path: &str) -> Result<Option<Found>, WorkspaceError> {
    Ok(match found(dir, path.to_string())? {
        Seen::Found(f) => Some(f),
        _ => None,
    })
}

/// Which of `new` (paths the guest made) a sync would take from the host
/// too: not ignored by git or a `.bangerignore` of `dir` (whose own files
/// are among `known`), and never inside a `.git` directory, where a file is
/// a command git runs on the host.
pub fn wanted_new(
    dir: &Path,
    runner: &dyn ProcessRunner,
    known: &[String],
    new: &[String],
) -> HashSet<String> {
    let ignores = IgnoreFiles::load(dir, known);
    let mut wanted: HashSet<String> = new
        .iter()
        .filter(|p| !p.split('/').any(|part| part == ".git") && !ignores.excludes(p))
        .cloned()
        .collect();
    if wanted.is_empty() || !in_work_tree(dir, runner) {
        return wanted;
    }
    let mut input = Vec::new();
    for path in &wanted {
        input.extend_from_slice(names::decode(path).as_os_str().as_bytes());
        input.push(0);
    }
    let spec = CommandSpec::new("git")
        .arg("-C")
        .arg(dir)
        .args(["check-ignore", "--stdin", "-z"])
        .stdin(input);
    // Exit 1 with nothing printed: none of them is ignored.
    if let Ok(out) = runner.run(&spec) {
        for ignored in out.stdout.split(|b| *b == 0).filter(|p| !p.is_empty()) {
            wanted.remove(&names::encode(ignored));
        }
    }
    wanted
}

/// Git's list when `dir` is in a work tree; `None` for a plain directory
/// (one call: outside a work tree `ls-files` fails).
fn git_paths(dir: &Path, runner: &dyn ProcessRunner) -> Option<Vec<String>> {
    let out = runner
        .run(&CommandSpec::new("git").arg("-C").arg(dir).args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ]))
        .ok()?;
    Some(
        out.stdout
            .split(|b| *b == 0)
            .filter(|p| !p.is_empty())
            .map(names::encode)
            .collect(),
    )
}

fn in_work_tree(dir: &Path, runner: &dyn ProcessRunner) -> bool {
    let spec = CommandSpec::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "--is-inside-work-tree"]);
    runner
        .run(&spec)
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "true")
}

/// Every file, symlink and special file under `dir`, without following links.
fn walk(dir: &Path) -> Result<Vec<String>, WorkspaceError> {
    let mut paths = Vec::new();
    let walker = ignore::WalkBuilder::new(dir)
        .standard_filters(false)
        .follow_links(false)
        .build();
    for entry in walker {
        let entry = entry.map_err(|e| format!("reading the workspace: {e}"))?;
        if entry.depth() == 0 || entry.file_type().is_some_and(|t| t.is_dir()) {
            continue;
        }
        if let Ok(rel) = entry.path().strip_prefix(dir) {
            paths.push(names::encode_path(rel));
        }
    }
    Ok(paths)
}

/// The `.bangerignore` files of a workspace, each applying under its directory.
struct IgnoreFiles(Vec<(String, Gitignore)>);

impl IgnoreFiles {
    fn load(dir: &Path, paths: &[String]) -> IgnoreFiles {
        let mut files = Vec::new();
        let mut candidates: Vec<&str> = paths
            .iter()
            .filter(|p| p.rsplit('/').next() == Some(IGNORE_FILE))
            .map(|p| p.as_str())
            .collect();
        // The top one even when git ignores it or does not list it.
        if !candidates.contains(&IGNORE_FILE) {
            candidates.push(IGNORE_FILE);
        }
        for rel in candidates {
            let base = rel.strip_suffix(IGNORE_FILE).unwrap_or("");
            let root = dir.join(names::decode(base));
            let mut builder = GitignoreBuilder::new(&root);
            if builder.add(dir.join(names::decode(rel))).is_some() {
                continue; // Missing or unreadable: nothing to apply.
            }
            if let Ok(gitignore) = builder.build() {
                files.push((base.to_string(), gitignore));
            }
        }
        IgnoreFiles(files)
    }

    /// Whether a `.bangerignore` excludes `path` (or a directory above it).
    fn excludes(&self, path: &str) -> bool {
        self.0.iter().any(|(base, gitignore)| {
            path.strip_prefix(base.as_str()).is_some_and(|rel| {
                gitignore
                    .matched_path_or_any_parents(rel, false)
                    .is_ignore()
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_host::RealRunner;

    fn write(dir: &Path, rel: &str, data: &str) {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    }

    fn paths(listing: &Listing) -> Vec<&str> {
        listing.found.iter().map(|f| f.path.as_str()).collect()
    }

    #[test]
    fn a_plain_directory_gives_everything_but_what_bangerignore_excludes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write(dir, "src/main.rs", "fn main() {}");
        write(dir, ".hidden", "kept");
        write(dir, "target/debug/big", "build output");
        write(dir, "sub/.bangerignore", "*.log\n");
        write(dir, "sub/run.log", "noise");
        write(dir, "run.log", "kept: the rule is sub's");
        write(dir, ".bangerignore", "target/\n");
        std::os::unix::fs::symlink("/etc/passwd", dir.join("outside")).unwrap();
        nix::unistd::mkfifo(
            &dir.join("pipe"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let listing = list(dir, &RealRunner).unwrap();
        assert_eq!(
            paths(&listing),
            [
                ".bangerignore",
                ".hidden",
                "outside",
                "run.log",
                "src/main.rs",
                "sub/.bangerignore"
            ]
        );
        let link = listing.found.iter().find(|f| f.path == "outside").unwrap();
        assert_eq!(
            (link.kind, link.target.as_deref()),
            (Kind::Symlink, Some("/etc/passwd"))
        );
        assert_eq!(listing.skipped, ["pipe"]);
    }

    #[test]
    fn a_git_repository_gives_what_git_lists() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let git = |args: &[&str]| banger_testkit::git(dir, args);
        git(&["init", "-q"]);
        write(dir, ".gitignore", "*.o\nbuild/\n");
        write(dir, "tracked.c", "int x;");
        write(dir, "forced.o", "tracked though ignored");
        git(&["add", "-f", ".gitignore", "tracked.c", "forced.o"]);
        git(&["commit", "-qm", "one"]);
        write(dir, "new.c", "untracked, not ignored");
        write(dir, "junk.o", "ignored");
        write(dir, "build/out", "ignored");
        write(dir, ".bangerignore", "secret.txt\n");
        write(dir, "secret.txt", "tracked but not for the VM");
        git(&["add", "secret.txt"]);
        std::fs::remove_file(dir.join("tracked.c")).unwrap();
        let listing = list(dir, &RealRunner).unwrap();
        assert_eq!(
            paths(&listing),
            [".bangerignore", ".gitignore", "forced.o", "new.c"]
        );

        // Of what a guest made, only what a sync would have taken.
        let known: Vec<String> = paths(&listing).iter().map(|p| p.to_string()).collect();
        let made = [
            "guest.c",
            "out.o",
            "build/x",
            ".git/hooks/pre-commit",
            "secret.txt",
        ]
        .map(String::from);
        let wanted = wanted_new(dir, &RealRunner, &known, &made);
        assert_eq!(wanted, HashSet::from(["guest.c".to_string()]));
    }
}
