//! The daemon's transport: a Unix socket speaking `banger_proto` frames, with
//! every request's work traced under its own `op_id`.

mod peer;
mod server;
mod socket;

pub use server::{run, serve};
pub use socket::bind;
