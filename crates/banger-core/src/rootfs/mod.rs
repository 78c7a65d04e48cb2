//! From layer blobs to a bootable ext4 root filesystem.

pub mod ext4;
pub mod extract;
pub mod layer;
pub mod meta;
pub mod path_safety;
pub mod whiteout;

pub use extract::{EntryError, Flattener};

#[cfg(test)]
mod tests;
