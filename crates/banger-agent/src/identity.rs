//! Who this VM is, and taking a new identity after a restore. Before a
//! snapshot the host holds the agent ([`HOLD`](banger_proto::agent::HOLD)):
//! commands then wait until an [`Identity`] arrives on the control channel,
//! so a fork never runs anything under its parent's name, address, host
//! key, clock or random state.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

use banger_proto::agent::Identity;
use russh::keys::PrivateKey;
use tokio::sync::watch;

pub struct State {
    held: watch::Sender<bool>,
    host_key: RwLock<PrivateKey>,
    /// Identities taken since boot (see `AgentReport::identities`).
    taken: AtomicU32,
}

impl State {
    pub fn new(host_key: PrivateKey) -> Arc<State> {
        Arc::new(State {
            held: watch::Sender::new(false),
            host_key: RwLock::new(host_key),
            taken: AtomicU32::new(0),
        })
    }

    /// From now on commands wait for [`State::apply`].
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    /// Waits while the agent is held.
    pub async fn released(&self) {
        let mut held = self.held.subscribe();
        let _ = held.wait_for(|h| !*h).await;
    }

    pub fn taken(&self) -> u32 {
        self.taken.load(Ordering::SeqCst)
    }

    /// The host key new SSH connections are served with.
    pub fn host_key(&self) -> PrivateKey {
        self.host_key
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Becomes `identity`, then lets held commands run. On an error the
    /// agent stays held: better no command than one run as someone else.
    pub fn apply(&self, identity: &Identity) -> Result<(), String> {
        let key = PrivateKey::from_openssh(identity.host_key.as_bytes())
            .map_err(|e| format!("host key: {e}"))?;
        set_clock(identity.unix_time_ns)?;
        reseed(&identity.entropy)?;
        nix::unistd::sethostname(&identity.hostname)
            .map_err(|e| format!("setting the hostname: {e}"))?;
        if let Some(net) = &identity.network {
            crate::net::readdress(net, identity.mac.as_deref())?;
            crate::net::write_resolv_conf(net)?;
        }
        *self.host_key.write().unwrap_or_else(|p| p.into_inner()) = key;
        self.taken.fetch_add(1, Ordering::SeqCst);
        self.held.send_replace(false);
        Ok(())
    }
}

fn set_clock(unix_time_ns: u64) -> Result<(), String> {
    let now = libc::timespec {
        tv_sec: (unix_time_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_time_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: a valid timespec for the realtime clock.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &now) } < 0 {
        return Err(format!(
            "setting the clock: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// `RNDADDENTROPY` and `RNDRESEEDCRNG` from linux/random.h.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Credits the host's bytes to the kernel's pool and makes the CRNG draw
/// from it at once, rather than at its next scheduled reseed: until then
/// two forks would read the same `/dev/urandom` bytes.
fn reseed(entropy_hex: &str) -> Result<(), String> {
    let bytes = decode_hex(entropy_hex).ok_or("the entropy is not hex")?;
    if bytes.len() < 32 {
        return Err("fewer than 32 bytes of entropy".into());
    }
    let device = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&device);
    // struct rand_pool_info { int entropy_count; int buf_size; u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    info.extend_from_slice(&bytes);
    // SAFETY: the buffer is a rand_pool_info of the size it declares.
    if unsafe { libc::ioctl(fd, RNDADDENTROPY as _, info.as_ptr()) } < 0 {
        return Err(format!(
            "adding entropy: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: an argument-less ioctl on the random device.
    if unsafe { libc::ioctl(fd, RNDRESEEDCRNG as _) } < 0 {
        return Err(format!(
            "reseeding the RNG: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEST_KEY: &str = "-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
QyNTUxOQAAACBpKfsDpq5LX3uJuctQVf12oLO6Hr4cTuJJkL7jdyjRogAAAIjAuFuVwLhb
lQAAAAtzc2gtZWQyNTUxOQAAACBpKfsDpq5LX3uJuctQVf12oLO6Hr4cTuJJkL7jdyjRog
AAAECnWNAD9MgNACol9YhlfoiHyPp9y8ezfSJzErjKx+9tk2kp+wOmrktfe4m5y1BV/Xag
s7oevhxO4kmQvuN3KNGiAAAABHRlc3QB
-----END OPENSSH PRIVATE KEY-----
";

    #[test]
    fn hex_decodes_or_refuses() {
        assert_eq!(decode_hex("00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(decode_hex("0"), None);
        assert_eq!(decode_hex("zz"), None);
    }

    #[tokio::test]
    async fn a_held_agent_waits_for_its_identity() {
        // A throwaway key, made for this test.
        let key = PrivateKey::from_openssh(TEST_KEY).unwrap();
        let state = State::new(key);
        state.released().await; // Not held: at once.
        state.hold();
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), state.released());
        assert!(waiting.await.is_err(), "held until released");
        state.held.send_replace(false);
        state.released().await;
    }
}
