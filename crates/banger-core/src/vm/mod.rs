//! Virtual machines: names, disks, VMM backends and the guest agent link.

pub mod accel;
pub mod agent_client;
pub mod console;
pub mod disk;
pub mod firecracker;
pub mod jailing;
pub mod keys;
pub mod name;
pub mod qmp;
pub mod root_mode;
pub mod sizing;
pub mod sockpath;
pub mod ssh_config;
pub mod user_keys;
pub mod vmm;
