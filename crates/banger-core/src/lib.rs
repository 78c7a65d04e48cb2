//! banger's operations core: every transport (the daemon's socket today) calls
//! into [`ops::Core`], which owns the services and the state store.

pub mod config;
pub mod error;
pub mod paths;
pub mod rootfs;
pub mod store;
