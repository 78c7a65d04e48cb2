//! `banger root-helper`: the few operations that need root (taps, NAT,
//! device-mapper, launching VMMs as their owner), each a typed request the
//! helper checks against its own policy before touching the host.

pub mod handler;
pub mod launched;
pub mod networks;
pub mod policy;
pub mod server;

pub use handler::Helper;
pub use policy::{Caller, Policy};
