//! What `banger system install` writes: the root helper's system unit, the
//! daemon's user unit, and where the root-owned binary they run lives.
//! `doctor` renders the same text to report drift.

use std::path::{Path, PathBuf};

pub const GROUP: &str = "banger";
pub const HELPER_UNIT: &str = "etc/systemd/system/banger-helper.service";
pub const DAEMON_UNIT: &str = "etc/systemd/user/banger.service";
/// Root-owned copies: never binaries their user could rewrite.
pub const BINARY: &str = "usr/local/bin/banger";
/// The helper is its own small binary: what runs as root links no OCI
/// client, TLS, SQLite or SSH.
pub const HELPER_BINARY: &str = "usr/local/bin/banger-root-helper";
/// Each installed binary and the file name it is built as.
pub const BINARIES: [(&str, &str); 2] = [(BINARY, "banger"), (HELPER_BINARY, "banger-root-helper")];
pub const HELPER_STATE: &str = "/run/banger/helper";

/// Who the install is for and where it goes.
#[derive(Debug, Clone)]
pub struct Install {
    /// `/` normally; a scratch directory in tests.
    pub root: PathBuf,
    pub user: String,
    pub home: PathBuf,
}

impl Install {
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// The binary as the units name it (on the real system).
    fn exe(&self) -> String {
        format!("/{BINARY}")
    }

    /// Where the binary installed as `built` comes from: beside this one.
    pub fn source(built: &str) -> std::io::Result<PathBuf> {
        Ok(std::env::current_exe()?.with_file_name(built))
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
ExecStart=/{HELPER_BINARY} --socket {socket} --group {GROUP} --owner {user} --allow-dir {state} --allow-dir {cache} --state-dir {HELPER_STATE}
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

    /// The install found under `root`, for the user its helper unit serves.
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
        Ok(Install {
            root: root.to_path_buf(),
            user,
            home,
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
        for (rel, built) in BINARIES {
            let binary = self.path(rel);
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
        };
        let helper = i.helper_unit();
        assert!(
            helper.contains(
                "ExecStart=/usr/local/bin/banger-root-helper --socket /run/banger/helper.sock \
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
        };
        let all = i.drift();
        assert_eq!(all.len(), 4, "two units and two binaries: {all:?}");
        for (rel, text) in [
            (HELPER_UNIT, i.helper_unit()),
            (DAEMON_UNIT, i.daemon_unit()),
        ] {
            std::fs::create_dir_all(i.path(rel).parent().unwrap()).unwrap();
            std::fs::write(i.path(rel), text).unwrap();
        }
        std::fs::create_dir_all(i.path(BINARY).parent().unwrap()).unwrap();
        std::fs::write(i.path(BINARY), b"not banger").unwrap();
        std::fs::write(i.path(HELPER_BINARY), b"not the helper").unwrap();
        let drift = i.drift();
        assert_eq!(drift.len(), 2, "{drift:?}");
        assert!(
            drift.iter().all(|d| d.contains("is not this banger's")),
            "{drift:?}"
        );
        std::fs::write(i.path(HELPER_UNIT), "edited").unwrap();
        let drift = i.drift();
        assert!(drift.iter().any(|d| d.contains("was changed")), "{drift:?}");
    }
}
