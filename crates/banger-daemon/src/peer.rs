//! Who is on the other end of a connection (SO_PEERCRED).

use std::os::fd::AsFd;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

/// The peer's uid, as the kernel recorded it when the connection was made.
pub fn peer_uid(stream: &impl AsFd) -> std::io::Result<u32> {
    let creds = getsockopt(stream, PeerCredentials).map_err(std::io::Error::from)?;
    Ok(creds.uid())
}

/// The daemon's own user, and root, may use it.
pub fn allowed(peer: u32) -> bool {
    peer == 0 || peer == nix::unistd::geteuid().as_raw()
}
