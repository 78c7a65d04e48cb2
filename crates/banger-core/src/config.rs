//! banger's config file (`config.toml` in the config dir). Every key is optional.

use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Registries (`host` or `host:port`) reached over plain HTTP. Loopback
    /// registries always are, as with docker.
    #[serde(default)]
    pub insecure_registries: Vec<String>,
    /// Layers downloaded at once per pull.
    #[serde(default)]
    pub max_concurrent_downloads: Option<usize>,
    /// QEMU settings.
    #[serde(default)]
    pub qemu: QemuConfig,
    /// The firecracker binary (`BANGER_FIRECRACKER_BIN` overrides); the
    /// same as `firecracker.binary`, which wins.
    #[serde(default)]
    pub firecracker_binary: Option<String>,
    /// Firecracker settings.
    #[serde(default)]
    pub firecracker: FirecrackerConfig,
    /// `qemu` or `firecracker`, for VMs created without `--vmm`.
    #[serde(default)]
    pub default_vmm: Option<banger_proto::domain::VmmKind>,
    /// Seconds a VM may take from launch to agent readiness.
    #[serde(default)]
    pub boot_timeout_secs: Option<u64>,
    /// VM networking.
    #[serde(default)]
    pub network: NetworkConfig,
    /// SSH access for the user.
    #[serde(default)]
    pub ssh: SshConfig,
    /// Bounds on what a pull may unpack.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The static guest agent (`BANGER_AGENT_BIN` overrides); by default
    /// `banger-agent` beside the banger executable.
    #[serde(default)]
    pub agent_binary: Option<String>,
    /// Where the root helper listens (`BANGER_HELPER_SOCKET` overrides;
    /// default /run/banger/helper.sock).
    #[serde(default)]
    pub helper_socket: Option<String>,
}

/// A config file the daemon will not start with: which file, and toml's
/// own words (the key or value, its line and column).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}{}: {} (every key: docs/configuration.md)", path.display(), line.map(|l| format!(", line {l}")).unwrap_or_default(), error.message().trim())]
    Invalid {
        path: PathBuf,
        /// Where toml stopped, 1-based.
        line: Option<usize>,
        /// Said in full above (toml's own display is a multi-line
        /// snippet), so not chained as a source.
        error: Box<toml::de::Error>,
    },
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

type SetKey = fn(&mut Config, String);

/// The environment variables that override config keys, each with the key's
/// setter: the only place the core reads its environment.
const ENV_OVERRIDES: &[(&str, SetKey)] = &[
    ("BANGER_NETWORK", |c, v| c.network.mode = Some(v)),
    ("BANGER_FIRECRACKER_BIN", |c, v| {
        c.firecracker_binary = Some(v)
    }),
    ("BANGER_QEMU_ACCEL", |c, v| c.qemu.accel = Some(v)),
    ("BANGER_JAILER_BIN", |c, v| {
        c.firecracker.jailer_binary = Some(v)
    }),
    ("BANGER_JAILER", |c, v| {
        c.firecracker.jailer = Some(!matches!(v.as_str(), "0" | "false" | "no" | "off"))
    }),
    ("BANGER_AGENT_BIN", |c, v| c.agent_binary = Some(v)),
    ("BANGER_HELPER_SOCKET", |c, v| c.helper_socket = Some(v)),
];

/// What one image may expand to, so a hostile or broken layer (an endless
/// stream, a small gzip of zeros) stops with an error instead of filling the
/// disk. Bytes of uncompressed tar stream.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// One layer (default 16 GiB).
    #[serde(default)]
    pub max_layer_bytes: Option<u64>,
    /// All layers of one image together (default 64 GiB).
    #[serde(default)]
    pub max_image_bytes: Option<u64>,
    /// Free space a pull keeps on the state filesystem (default 64 MiB).
    #[serde(default)]
    pub min_free_bytes: Option<u64>,
}

impl LimitsConfig {
    pub fn layer(&self) -> u64 {
        self.max_layer_bytes.unwrap_or(16 << 30)
    }
    pub fn image(&self) -> u64 {
        self.max_image_bytes.unwrap_or(64 << 30)
    }
    pub fn min_free(&self) -> u64 {
        self.min_free_bytes.unwrap_or(64 << 20)
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SshConfig {
    /// Public key files authorized in every VM (default: every `~/.ssh/*.pub`).
    #[serde(default)]
    pub user_keys: Option<Vec<String>>,
    /// Also authorize the keys the ssh-agent holds (default true).
    #[serde(default)]
    pub agent_keys: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// `auto` (taps when banger may make them), `tap` or `none`;
    /// `BANGER_NETWORK` overrides.
    #[serde(default)]
    pub mode: Option<String>,
    /// The VMs' IPv4 subnet; by default the first of a few private ranges
    /// that no host route covers, chosen once and remembered.
    #[serde(default)]
    pub subnet: Option<String>,
    /// Domain of VM names (`web.vm`).
    #[serde(default)]
    pub domain: Option<String>,
    /// Port of banger's DNS server at the gateway address.
    #[serde(default)]
    pub dns_port: Option<u16>,
    /// Spare taps kept ready so `vm start` need not make one.
    #[serde(default)]
    pub tap_pool: Option<usize>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FirecrackerConfig {
    /// Default `firecracker` on PATH.
    #[serde(default)]
    pub binary: Option<String>,
    /// Launch Firecracker through its jailer (`BANGER_JAILER` overrides).
    /// Default: when banger may (it runs as root, or the root helper has a
    /// jailer) and a jailer is found.
    #[serde(default)]
    pub jailer: Option<bool>,
    /// The jailer a root daemon runs (`BANGER_JAILER_BIN` overrides); the
    /// root helper runs its own (`banger-root-helper --jailer`).
    #[serde(default)]
    pub jailer_binary: Option<String>,
    /// The uids (each also a gid) a root daemon's jailed Firecrackers run
    /// as, one per VM: `FIRST-LAST`, no user or group of the host in it
    /// (default 1500000000-1500000999; the root helper has `--jail-uids`).
    #[serde(default)]
    pub jail_uids: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QemuConfig {
    /// Default `qemu-system-x86_64`.
    #[serde(default)]
    pub binary: Option<String>,
    /// `auto` (KVM when /dev/kvm is usable), `kvm` or `tcg`; `BANGER_QEMU_ACCEL` overrides.
    #[serde(default)]
    pub accel: Option<String>,
}

impl Config {
    /// Reads the config file; a missing file is the default config.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|error| ConfigError::Invalid {
                path: path.to_path_buf(),
                line: error
                    .span()
                    .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1),
                error: Box::new(error),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// The config file with the environment's overrides applied: what a
    /// daemon reads once at start and hands to every service.
    pub fn load_with_env(path: &Path) -> Result<Config, ConfigError> {
        let mut config = Config::load(path)?;
        config.apply_env(|key| std::env::var(key).ok());
        Ok(config)
    }

    /// Applies the override variables `get` finds set and non-empty.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) {
        for (key, set) in ENV_OVERRIDES {
            if let Some(value) = get(key).filter(|v| !v.is_empty()) {
                set(self, value);
            }
        }
    }

    /// Where the root helper listens.
    pub fn helper_socket(&self) -> std::path::PathBuf {
        self.helper_socket
            .clone()
            .unwrap_or_else(|| banger_proto::helper::DEFAULT_HELPER_SOCKET.into())
            .into()
    }

    /// The Firecracker binary, as an absolute path when it is on PATH (the
    /// jailer needs one, and names the jail after its file name).
    pub fn firecracker(&self) -> String {
        let named = self
            .firecracker
            .binary
            .clone()
            .or_else(|| self.firecracker_binary.clone())
            .unwrap_or_else(|| "firecracker".into());
        match which(&named) {
            Some(path) => path.canonicalize().unwrap_or(path).display().to_string(),
            None => named,
        }
    }

    /// The jailer a root daemon would run, if one is found.
    pub fn jailer_binary(&self) -> Option<std::path::PathBuf> {
        let named = self
            .firecracker
            .jailer_binary
            .clone()
            .unwrap_or_else(|| "jailer".into());
        which(&named).filter(|p| p.is_file())
    }

    pub fn download_concurrency(&self) -> usize {
        self.max_concurrent_downloads.unwrap_or(4).clamp(1, 32)
    }
}

/// A program as exec would find it: a path as given, else the first match
/// on PATH.
pub fn which(program: &str) -> Option<std::path::PathBuf> {
    if program.contains('/') {
        return Some(std::path::PathBuf::from(program));
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_insecure_registries_and_rejects_unknown_keys() {
        let cfg: Config = toml::from_str("insecure_registries = [\"reg.lan:5000\"]").unwrap();
        assert_eq!(cfg.insecure_registries, vec!["reg.lan:5000"]);
        assert!(toml::from_str::<Config>("bogus = 1").is_err());
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            Config::load(&dir.path().join("none.toml")).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn environment_overrides_win_over_the_file_and_empty_ones_do_not() {
        let mut cfg: Config =
            toml::from_str("firecracker_binary = \"/opt/fc\"\n[network]\nmode = \"tap\"").unwrap();
        cfg.apply_env(|key| match key {
            "BANGER_NETWORK" => Some("none".into()),
            "BANGER_FIRECRACKER_BIN" => Some(String::new()),
            "BANGER_HELPER_SOCKET" => Some("/tmp/h.sock".into()),
            _ => None,
        });
        assert_eq!(cfg.network.mode.as_deref(), Some("none"));
        assert_eq!(cfg.firecracker_binary.as_deref(), Some("/opt/fc"));
        assert_eq!(cfg.helper_socket(), std::path::PathBuf::from("/tmp/h.sock"));
        assert_eq!(
            Config::default().helper_socket(),
            std::path::PathBuf::from(banger_proto::helper::DEFAULT_HELPER_SOCKET)
        );
    }
}
