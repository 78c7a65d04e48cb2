//! The root helper (`banger-root-helper`): the few operations that need
//! root (taps, NAT, device-mapper), each a typed request the helper checks
//! against its own policy before touching the host. VMMs are not among
//! them: they run as the daemon's user.

pub mod handler;
pub mod networks;
pub mod policy;
pub mod server;

pub use handler::{Helper, JailSetup};
pub use policy::{Caller, Policy};
