//! The services the operations core is made of.

pub mod images;
pub mod import;
pub mod kernel_pull;
pub mod kernels;
pub mod network;
pub mod pull;
pub mod vms;
pub mod workspace;
