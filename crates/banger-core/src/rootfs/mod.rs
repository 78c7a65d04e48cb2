//! From layer blobs to a bootable ext4 root filesystem.

pub mod ext4;
pub mod extract;
pub mod layer;
pub mod meta;
pub mod path_safety;
pub mod staging;
pub mod whiteout;

pub use extract::{EntryError, Flattener};

#[cfg(test)]
mod tests;

crate::error::message_error! {
    /// A layer entry whose path or whiteout would reach outside the root,
    /// or that is not a path at all.
    UnsafePath
}
