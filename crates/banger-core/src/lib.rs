//! banger's operations core: every transport (the daemon's socket today) calls
//! into [`ops::Core`], which owns the services and the state store.

pub mod agent_bin;
pub mod caller;
pub mod config;
pub mod error;
pub mod events;
pub mod ids;
pub mod kernel;
pub mod locks;
pub mod network;
pub mod oci;
pub mod ops;
pub mod paths;
pub mod phases;
pub mod rootfs;
pub mod services;
pub mod steps;
pub mod store;
pub mod suggest;
pub mod vm;
pub mod workspace;
