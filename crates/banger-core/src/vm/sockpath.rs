//! Unix socket paths are limited to 107 bytes (`sun_path`), and a VM's
//! directory deep in a long BANGER_HOME, named by a 63-character VM name,
//! goes past that. The VMM is given socket paths relative to its working
//! directory (the VM's) when the absolute ones are too long; the daemon
//! reaches them through `/proc/self/fd/N/NAME` on a handle to the directory.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// The longest path `bind`/`connect` take (sun_path less its NUL).
pub const SUN_PATH_MAX: usize = 107;

/// A path to a socket that fits `sun_path`, valid while this lives.
pub struct SockPath {
    path: PathBuf,
    _dir: Option<OwnedFd>,
}

impl SockPath {
    pub fn new(socket: &Path) -> std::io::Result<SockPath> {
        if socket.as_os_str().len() <= SUN_PATH_MAX {
            return Ok(SockPath {
                path: socket.to_path_buf(),
                _dir: None,
            });
        }
        let (Some(dir), Some(name)) = (socket.parent(), socket.file_name()) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} is not a socket path", socket.display()),
            ));
        };
        let dir = nix::fcntl::open(
            dir,
            nix::fcntl::OFlag::O_PATH
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(std::io::Error::from)?;
        let path = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
        Ok(SockPath {
            path,
            _dir: Some(dir),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// How to name `dir/name` to a VMM whose working directory is `dir`: the
/// absolute path when it fits `sun_path`, else just the name.
pub fn for_vmm(dir: &Path, name: &str) -> PathBuf {
    let full = dir.join(name);
    if full.as_os_str().len() <= SUN_PATH_MAX {
        full
    } else {
        PathBuf::from(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_deep_in_long_paths_bind_and_connect() {
        let tmp = tempfile::tempdir().unwrap();
        let deep = tmp.path().join("d".repeat(90)).join("e".repeat(63));
        std::fs::create_dir_all(&deep).unwrap();
        let socket = deep.join("ctl.sock");
        assert!(socket.as_os_str().len() > SUN_PATH_MAX);
        assert!(std::os::unix::net::UnixListener::bind(&socket).is_err());
        let listener =
            std::os::unix::net::UnixListener::bind(SockPath::new(&socket).unwrap().path()).unwrap();
        assert!(socket.exists(), "made where it belongs");
        std::os::unix::net::UnixStream::connect(SockPath::new(&socket).unwrap().path()).unwrap();
        listener.accept().unwrap();
        assert_eq!(for_vmm(&deep, "ctl.sock"), Path::new("ctl.sock"));
        assert_eq!(for_vmm(tmp.path(), "ctl.sock"), tmp.path().join("ctl.sock"));
    }
}
