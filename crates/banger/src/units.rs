//! What `banger system install` writes: the root helper's system unit, the
//! daemon's user unit, and where the root-owned binary they run lives.
//! `doctor` renders the same text to report drift.

use std::path::{Path, PathBuf};

use banger_core::agent_bin::{INSTALLED_AGENT, INSTALLED_HELPER};

pub const GROUP: &str = "banger";
pub const HELPER_UNIT: &str = "etc/systemd/system/banger-helper.service";
pub const DAEMON_UNIT: &str = "etc/systemd/user/banger.service";
/// Where `system install` copies banger's binaries (root-owned copies:
/// never binaries their user could rewrite) when it does not already run
/// from an install.
pub const COPY_PREFIX: &str = "usr/local";
/// Installs whose own files the units may run: the Debian package's `/usr`
/// and `sudo scripts/install`'s `/usr/local` (root-owned either way).
pub const INSTALL_PREFIXES: [&str; 2] = ["usr", "usr/local"];
/// What `system install` wrote, so that `system uninstall` removes exactly that.
pub const MANIFEST: &str = "var/lib/banger/system-install.json";
pub const HELPER_STATE: &str = "/run/banger/helper";

/// Who the install is for and where it goes.
#[derive(Debug, Clone)]
pub struct Install {
    /// `/` normally; a scratch directory in tests.
    pub root: PathBuf,
    pub user: String,
    pub home: PathBuf,
    /// The prefix (relative to `root`) holding `bin/banger`, `lib/banger/…`.
    pub prefix: String,
}

impl Install {
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Each binary the units need, relative to the root, and the file name
    /// it is built as. The helper is its own small binary: what runs as
    /// root links no OCI client, TLS, SQLite or SSH; the agent goes into
    /// every VM's initramfs.
    pub fn binaries(&self) -> [(String, &'static str); 3] {
        let p = &self.prefix;
        [
            (format!("{p}/bin/banger"), "banger"),
            (format!("{p}/{INSTALLED_HELPER}"), "banger-root-helper"),
            (format!("{p}/{INSTALLED_AGENT}"), "banger-agent"),
        ]
    }

    /// The binary as the units name it (on the real system).
    fn exe(&self) -> String {
        format!("/{}/bin/banger", self.prefix)
    }

    fn helper_exe(&self) -> String {
        format!("/{}/{INSTALLED_HELPER}", self.prefix)
    }

    /// Where the binary installed as `built` comes from: this binary, the
    /// helper beside it (a build) or in its install, the agent where banger
    /// finds it.
    pub fn source(built: &str) -> std::io::Result<PathBuf> {
        let exe = std::env::current_exe()?;
        Ok(match built {
            "banger" => exe,
            "banger-agent" => {
                banger_core::agent_bin::locate(std::env::var("BANGER_AGENT_BIN").ok().as_deref())
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::NotFound, e.to_string()))?
            }
            _ => {
                let beside = exe.with_file_name(built);
                let installed = exe
                    .parent()
                    .and_then(Path::parent)
                    .map(|prefix| prefix.join(INSTALLED_HELPER));
                match installed {
                    Some(p) if !beside.is_file() && p.is_file() => p,
                    _ => beside,
                }
            }
        })
    }

    /// The install prefix under `root` this very binary runs from, when the
    /// helper and agent are installed there too: its files are used in
    /// place rather than copied.
    pub fn running_prefix(root: &Path) -> Option<&'static str> {
        let exe = std::env::current_exe().ok()?.canonicalize().ok()?;
        INSTALL_PREFIXES.into_iter().find(|p| {
            let prefix = root.join(p);
            prefix.join("bin/banger").canonicalize().ok().as_ref() == Some(&exe)
                && prefix.join(INSTALLED_HELPER).is_file()
                && prefix.join(INSTALLED_AGENT).is_file()
        })
    }

    /// Where the user's daemon keeps VMs and images (its default paths).
    pub fn allowed_dirs(&self) -> [PathBuf; 2] {
        [
            self.home.join(".local/state/banger"),
            self.home.join(".cache/banger"),
        ]
    }

    pub fn helper_unit(&self) -> String {
        let [state, cache] = self.allowed_dirs();
        format!(
            "# Written by `banger system install`; `banger doctor` reports drift from it.
[Unit]
Description=banger root helper (taps, NAT and loop devices for banger VMs)
After=network.target

[Service]
Type=simple
ExecStart={helper} --socket {socket} --group {GROUP} --owner {user} --allow-dir {state} --allow-dir {cache} --state-dir {HELPER_STATE}
Restart=on-failure
RuntimeDirectory=banger
RuntimeDirectoryMode=0755
RuntimeDirectoryPreserve=yes
Environment=RUST_LOG=info
NoNewPrivileges=yes
ProtectSystem=full
PrivateTmp=yes

[Install]
WantedBy=multi-user.target
",
            helper = self.helper_exe(),
            socket = banger_proto::helper::DEFAULT_HELPER_SOCKET,
            user = self.user,
            state = state.display(),
            cache = cache.display(),
        )
    }

    pub fn daemon_unit(&self) -> String {
        format!(
            "# Written by `banger system install`; `banger doctor` reports drift from it.
[Unit]
Description=banger daemon (VMs, images and their DNS names)

[Service]
Type=simple
ExecStart={exe} daemon
Environment=BANGER_HELPER_SOCKET={socket}
Restart=on-failure

[Install]
WantedBy=default.target
",
            exe = self.exe(),
            socket = banger_proto::helper::DEFAULT_HELPER_SOCKET,
        )
    }

    /// Whether any part of a system install is present.
    pub fn present(root: &Path) -> bool {
        [HELPER_UNIT, DAEMON_UNIT]
            .iter()
            .any(|u| root.join(u).exists())
    }

    /// The install found under `root`, for the user its helper unit serves,
    /// with the binaries its helper unit runs.
    pub fn found(root: &Path) -> Result<Install, String> {
        let unit = std::fs::read_to_string(root.join(HELPER_UNIT))
            .map_err(|e| format!("{HELPER_UNIT}: {e}"))?;
        let user = unit
            .split_whitespace()
            .skip_while(|w| *w != "--owner")
            .nth(1)
            .ok_or_else(|| format!("{HELPER_UNIT} names no --owner"))?
            .to_string();
        let home = crate::commands::passwd_home(root, &user)
            .ok()
            .flatten()
            .ok_or_else(|| format!("the unit's user `{user}` does not exist"))?;
        let prefix = unit
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart=/"))
            .and_then(|cmd| cmd.split_whitespace().next())
            .and_then(|helper| helper.strip_suffix(&format!("/{INSTALLED_HELPER}")))
            .unwrap_or(COPY_PREFIX)
            .to_string();
        Ok(Install {
            root: root.to_path_buf(),
            user,
            home,
            prefix,
        })
    }

    /// How the files on disk differ from what `system install` would write
    /// now (with this binary); empty when they match.
    pub fn drift(&self) -> Vec<String> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let mut out = Vec::new();
        for (rel, want) in [
            (HELPER_UNIT, self.helper_unit()),
            (DAEMON_UNIT, self.daemon_unit()),
        ] {
            match std::fs::read_to_string(self.path(rel)) {
                Ok(have) if have == want => {}
                Ok(_) => out.push(format!("/{rel} was changed")),
                Err(_) => out.push(format!("/{rel} is missing")),
            }
        }
        for (rel, built) in self.binaries() {
            let binary = self.path(&rel);
            match std::fs::metadata(&binary) {
                Err(_) => out.push(format!("/{rel} is missing")),
                Ok(m) if m.uid() != 0 || m.permissions().mode() & 0o022 != 0 => out.push(format!(
                    "/{rel} is writable by others than root (owner uid {}, mode {:o})",
                    m.uid(),
                    m.permissions().mode() & 0o777
                )),
                Ok(_) => {
                    let same = Install::source(built)
                        .and_then(std::fs::read)
                        .ok()
                        .zip(std::fs::read(&binary).ok())
                        .is_some_and(|(a, b)| a == b);
                    if !same {
                        out.push(format!("/{rel} is not this banger's {built}"));
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_name_the_user_its_dirs_and_the_root_owned_binary() {
        let i = Install {
            root: "/".into(),
            user: "alice".into(),
            home: "/home/alice".into(),
            prefix: COPY_PREFIX.into(),
        };
        let helper = i.helper_unit();
        assert!(
            helper.contains(
                "ExecStart=/usr/local/lib/banger/banger-root-helper --socket /run/banger/helper.sock \
             --group banger --owner alice --allow-dir /home/alice/.local/state/banger \
             --allow-dir /home/alice/.cache/banger"
            ),
            "{helper}"
        );
        assert!(i
            .daemon_unit()
            .contains("ExecStart=/usr/local/bin/banger daemon"));
    }

    #[test]
    fn drift_names_changed_missing_and_foreign_files() {
        let tmp = tempfile::tempdir().unwrap();
        let i = Install {
            root: tmp.path().to_path_buf(),
            user: "alice".into(),
            home: "/home/alice".into(),
            prefix: COPY_PREFIX.into(),
        };
        let all = i.drift();
        assert_eq!(all.len(), 5, "two units and three binaries: {all:?}");
        for (rel, text) in [
            (HELPER_UNIT, i.helper_unit()),
            (DAEMON_UNIT, i.daemon_unit()),
        ] {
            std::fs::create_dir_all(i.path(rel).parent().unwrap()).unwrap();
            std::fs::write(i.path(rel), text).unwrap();
        }
        for (rel, built) in i.binaries() {
            std::fs::create_dir_all(i.path(&rel).parent().unwrap()).unwrap();
            std::fs::write(i.path(&rel), format!("not {built}")).unwrap();
        }
        let drift = i.drift();
        assert_eq!(drift.len(), 3, "{drift:?}");
        assert!(
            drift.iter().all(|d| d.contains("is not this banger's")),
            "{drift:?}"
        );
        std::fs::write(i.path(HELPER_UNIT), "edited").unwrap();
        let drift = i.drift();
        assert!(drift.iter().any(|d| d.contains("was changed")), "{drift:?}");
    }
}
