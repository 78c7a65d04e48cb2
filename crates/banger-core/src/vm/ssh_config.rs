//! The ssh config file banger keeps for plain OpenSSH: one Host block per VM
//! with an address (`NAME` and `NAME.<domain>`), banger's key, and a
//! known_hosts file holding each VM's pinned host key. The user `Include`s it.

use std::path::{Path, PathBuf};

/// One VM as OpenSSH should see it.
pub struct Entry {
    pub name: String,
    pub ip: String,
    pub host_key: String,
}

pub fn config_path(state_dir: &Path) -> PathBuf {
    state_dir.join("ssh/config")
}

pub fn known_hosts_path(state_dir: &Path) -> PathBuf {
    state_dir.join("ssh/known_hosts")
}

/// (config, known_hosts) for `entries`.
pub fn render(entries: &[Entry], domain: &str, state_dir: &Path) -> (String, String) {
    let key = state_dir.join("ssh/id_ed25519");
    let known = known_hosts_path(state_dir);
    let mut config = format!(
        "# Written by banger whenever a VM is created or removed; do not edit.\n\
         # Use it from ~/.ssh/config (near the top):  Include {}\n",
        config_path(state_dir).display()
    );
    let mut hosts = String::new();
    for e in entries {
        config.push_str(&format!(
            "\nHost {name} {name}.{domain}\n  HostName {ip}\n  User root\n  \
             IdentityFile {key}\n  UserKnownHostsFile {known}\n  \
             StrictHostKeyChecking yes\n  HostKeyAlias {name}.{domain}\n",
            name = e.name,
            ip = e.ip,
            key = key.display(),
            known = known.display(),
        ));
        // The alias pins the key to the VM, not to an address a later VM may reuse.
        hosts.push_str(&format!("{}.{domain} {}\n", e.name, e.host_key.trim()));
    }
    (config, hosts)
}

/// Writes both files whole (temp file then rename).
pub fn write(entries: &[Entry], domain: &str, state_dir: &Path) -> std::io::Result<()> {
    let (config, hosts) = render(entries, domain, state_dir);
    let dir = state_dir.join("ssh");
    std::fs::create_dir_all(&dir)?;
    write_whole(&config_path(state_dir), &config)?;
    write_whole(&known_hosts_path(state_dir), &hosts)
}

/// Replaces a file whole (temp file then rename): ssh never reads half of it.
pub fn write_whole(path: &Path, text: &str) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(".tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_host_block_per_vm_pinned_by_alias() {
        let entries = [Entry {
            name: "web".into(),
            ip: "10.213.0.2".into(),
            host_key: "ssh-ed25519 AAAAkey\n".into(),
        }];
        let (config, hosts) = render(&entries, "vm", Path::new("/s"));
        assert!(config.contains("Include /s/ssh/config"), "{config}");
        assert!(config.contains(
            "Host web web.vm\n  HostName 10.213.0.2\n  User root\n  IdentityFile /s/ssh/id_ed25519\n  \
             UserKnownHostsFile /s/ssh/known_hosts\n  StrictHostKeyChecking yes\n  HostKeyAlias web.vm\n"
        ), "{config}");
        assert_eq!(hosts, "web.vm ssh-ed25519 AAAAkey\n");
    }
}
