//! Where banger keeps its config, state, cache and sockets.
//!
//! `BANGER_HOME=DIR` puts everything under DIR (tests always set it). Otherwise a
//! root process uses the system layout (`/etc/banger`, `/var/lib/banger`,
//! `/var/cache/banger`, `/run/banger`) and anyone else the XDG base directories.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub config_dir: PathBuf,
    pub state_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub runtime_dir: PathBuf,
}

impl Paths {
    /// Paths for this process, from its environment and uid.
    pub fn from_env() -> Self {
        let var = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        if let Some(home) = var("BANGER_HOME") {
            return Self::under(&home);
        }
        if nix::unistd::geteuid().is_root() {
            return Self::system();
        }
        let home = var("HOME").unwrap_or_else(|| PathBuf::from("/"));
        let uid = nix::unistd::getuid().as_raw();
        Paths {
            config_dir: var("XDG_CONFIG_HOME")
                .unwrap_or_else(|| home.join(".config"))
                .join("banger"),
            state_dir: var("XDG_STATE_HOME")
                .unwrap_or_else(|| home.join(".local/state"))
                .join("banger"),
            cache_dir: var("XDG_CACHE_HOME")
                .unwrap_or_else(|| home.join(".cache"))
                .join("banger"),
            runtime_dir: var("XDG_RUNTIME_DIR")
                .map(|d| d.join("banger"))
                .unwrap_or_else(|| std::env::temp_dir().join(format!("banger-{uid}"))),
        }
    }

    /// Every path under one directory.
    pub fn under(home: &Path) -> Self {
        Paths {
            config_dir: home.join("config"),
            state_dir: home.join("state"),
            cache_dir: home.join("cache"),
            runtime_dir: home.join("run"),
        }
    }

    pub fn system() -> Self {
        Paths {
            config_dir: "/etc/banger".into(),
            state_dir: "/var/lib/banger".into(),
            cache_dir: "/var/cache/banger".into(),
            runtime_dir: "/run/banger".into(),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.runtime_dir.join("banger.sock")
    }
    pub fn config_file(&self) -> PathBuf {
        self.config_dir.join("config.toml")
    }
    pub fn database(&self) -> PathBuf {
        self.state_dir.join("banger.db")
    }
    /// Holds the network instance's id; the host's objects name it as their
    /// owner, so they go once the state directory does.
    pub fn network_owner_file(&self) -> PathBuf {
        self.state_dir.join("network.instance")
    }
    pub fn daemon_log(&self) -> PathBuf {
        self.state_dir.join("daemon.log")
    }
    /// The OCI blob cache; safe to delete at any time.
    pub fn oci_cache(&self) -> PathBuf {
        self.cache_dir.join("oci")
    }
    /// Flattened image root filesystems, one directory per image.
    pub fn images_dir(&self) -> PathBuf {
        self.state_dir.join("images")
    }
    /// Scratch space for work in progress; emptied at daemon start.
    pub fn tmp_dir(&self) -> PathBuf {
        self.state_dir.join("tmp")
    }

    /// Creates the directories the daemon writes to, private to its user.
    pub fn create_all(&self) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        for dir in [
            &self.config_dir,
            &self.state_dir,
            &self.cache_dir,
            &self.runtime_dir,
            &self.images_dir(),
            &self.tmp_dir(),
        ] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banger_home_puts_everything_under_one_dir() {
        let p = Paths::under(Path::new("/x"));
        for path in [
            p.socket(),
            p.database(),
            p.oci_cache(),
            p.config_file(),
            p.images_dir(),
        ] {
            assert!(path.starts_with("/x"), "{path:?}");
        }
        assert_ne!(
            Paths::under(Path::new("/a")).socket(),
            Paths::under(Path::new("/b")).socket()
        );
    }
}
