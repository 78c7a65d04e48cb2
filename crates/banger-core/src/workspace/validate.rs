//! Which host directories may be a workspace: an existing directory that is
//! not `/`, not the user's home, and holds none of banger's own state (a
//! sync would copy the VM's disks into the VM).

use std::path::{Path, PathBuf};

use super::scan::Listing;
use super::WorkspaceError;

/// `dir`, canonical, if it may be a workspace. `home` is the user's home,
/// `state` banger's state directory.
pub fn workspace_dir(
    dir: &Path,
    home: Option<&Path>,
    state: &Path,
) -> Result<PathBuf, WorkspaceError> {
    let shown = dir.display();
    let meta = std::fs::metadata(dir).map_err(|e| format!("workspace {shown}: {e}"))?;
    if !meta.is_dir() {
        return Err(format!("workspace {shown} is not a directory").into());
    }
    let dir = dir
        .canonicalize()
        .map_err(|e| format!("workspace {shown}: {e}"))?;
    if dir == Path::new("/") {
        return Err("the workspace cannot be `/`; name your project's directory".into());
    }
    if let Some(home) = home.and_then(|h| h.canonicalize().ok()) {
        if dir == home {
            return Err(format!(
                "the workspace cannot be your home directory ({}); name your project's directory",
                dir.display()
            )
            .into());
        }
    }
    let state = state.canonicalize().unwrap_or_else(|_| state.to_path_buf());
    if state.starts_with(&dir) {
        return Err(format!(
            "the workspace {} holds banger's own state ({}); name a directory that does not",
            dir.display(),
            state.display()
        )
        .into());
    }
    Ok(dir)
}

/// What a file costs on the work disk beyond its bytes (inode, last block).
const PER_FILE: u64 = 4096;

/// Refuses a workspace that would not fit the work disk of `disk` bytes
/// (with room to spare for what the guest writes).
pub fn fits(dir: &Path, listing: &Listing, disk: u64) -> Result<(), WorkspaceError> {
    let need: u64 = listing.found.iter().map(|f| f.size + PER_FILE).sum();
    let room = disk / 10 * 9;
    if need <= room {
        return Ok(());
    }
    let suggest = (need * 2).div_ceil(1 << 30);
    Err(format!(
        "the workspace {} needs about {} ({} files), more than the {} work disk holds; \
         give the VM a bigger one with `--work-disk {suggest}G`, or leave files out with a {}",
        dir.display(),
        banger_proto::human_bytes(need),
        listing.found.len(),
        banger_proto::human_bytes(disk),
        super::scan::IGNORE_FILE
    )
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_project_directory_may_be_a_workspace() {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().join("home");
        let project = home.join("src/app");
        let state = home.join(".local/state/banger");
        std::fs::create_dir_all(&project).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(project.join("file"), b"x").unwrap();
        let ok = workspace_dir(&project, Some(&home), &state).unwrap();
        assert_eq!(ok, project.canonicalize().unwrap());

        let refused = |dir: &Path| workspace_dir(dir, Some(&home), &state).unwrap_err().0;
        assert!(refused(&project.join("missing")).contains("No such file"));
        assert!(refused(&project.join("file")).contains("not a directory"));
        assert!(refused(Path::new("/")).contains("cannot be `/`"));
        assert!(refused(&home).contains("home directory"));
        assert!(refused(&home.join(".local")).contains("banger's own state"));

        let listing = crate::workspace::scan::list(&project, &banger_host::RealRunner).unwrap();
        fits(&project, &listing, 1 << 20).unwrap();
        let err = fits(&project, &listing, 4096).unwrap_err().0;
        assert!(
            err.contains("more than the 4.0 KiB work disk holds"),
            "{err}"
        );
        assert!(err.contains("--work-disk 1G"), "{err}");
    }
}
