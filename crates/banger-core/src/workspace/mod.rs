//! Workspaces: a host directory mirrored into a VM's work disk. This module
//! is the host side's pure part: which directories may be one, what a sync
//! takes from them (git's view of a repository, less `.bangerignore`), and
//! what changed since the last sync (a manifest of stat fields, with content
//! hashes taken only when stat says a file changed).

pub mod manifest;
pub mod plan;
pub mod scan;
pub mod validate;
pub mod watch;

crate::error::message_error! {
    /// A directory that cannot be a workspace, or a tree that cannot be read.
    WorkspaceError
}
