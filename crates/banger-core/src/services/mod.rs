//! The services the operations core is made of.

pub mod images;
pub mod kernels;
pub mod pull;
pub mod vms;
