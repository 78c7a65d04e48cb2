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

/// A path as one ssh_config argument: `%` doubled where ssh expands
/// tokens, double-quoted when it holds a space, a tab or `#`. ssh has no
/// escape for `"` or a line break inside an argument, so a path with one
/// cannot be written (`None`).
pub fn config_path_arg(path: &Path, tokens: bool) -> Option<String> {
    let text = path.to_str()?;
    if text.chars().any(|c| c == '"' || c.is_control()) {
        return None;
    }
    let text = if tokens {
        text.replace('%', "%%")
    } else {
        text.to_string()
    };
    Some(if text.contains([' ', '\t', '#']) {
        format!("\"{text}\"")
    } else {
        text
    })
}

/// `word` as one word for a POSIX shell: as it is when only safe
/// characters are in it, else single-quoted.
pub fn shell_word(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@+,".contains(c))
    {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// A `ProxyCommand` value running `words`: ssh expands `%` tokens in it and
/// hands it to `sh -c`, so each word is shell-quoted and every `%` doubled.
pub fn proxy_command(words: &[&str]) -> String {
    words
        .iter()
        .map(|w| shell_word(w).replace('%', "%%"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A path no ssh_config argument can hold.
#[derive(Debug, thiserror::Error)]
#[error("{} cannot be written into an ssh config (a `\"`, a line break or a name that is not UTF-8 is in it)", .0.display())]
pub struct UnquotablePath(pub PathBuf);

fn arg(path: &Path, tokens: bool) -> Result<String, UnquotablePath> {
    config_path_arg(path, tokens).ok_or_else(|| UnquotablePath(path.to_path_buf()))
}

/// (config, known_hosts) for `entries`.
pub fn render(
    entries: &[Entry],
    domain: &str,
    state_dir: &Path,
) -> Result<(String, String), UnquotablePath> {
    let key = arg(&state_dir.join("ssh/id_ed25519"), true)?;
    let known = arg(&known_hosts_path(state_dir), true)?;
    let mut config = format!(
        "# Written by banger whenever a VM is created or removed; do not edit.\n\
         # Use it from ~/.ssh/config (near the top):  Include {}\n",
        arg(&config_path(state_dir), false)?
    );
    let mut hosts = String::new();
    for e in entries {
        config.push_str(&format!(
            "\nHost {name} {name}.{domain}\n  HostName {ip}\n  User root\n  \
             IdentityFile {key}\n  UserKnownHostsFile {known}\n  \
             StrictHostKeyChecking yes\n  HostKeyAlias {name}.{domain}\n",
            name = e.name,
            ip = e.ip,
        ));
        // The alias pins the key to the VM, not to an address a later VM may reuse.
        hosts.push_str(&format!("{}.{domain} {}\n", e.name, e.host_key.trim()));
    }
    Ok((config, hosts))
}

/// Writes both files whole (temp file then rename).
pub fn write(entries: &[Entry], domain: &str, state_dir: &Path) -> std::io::Result<()> {
    let (config, hosts) = render(entries, domain, state_dir).map_err(std::io::Error::other)?;
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
        let (config, hosts) = render(&entries, "vm", Path::new("/s")).unwrap();
        assert!(config.contains("Include /s/ssh/config"), "{config}");
        assert!(config.contains(
            "Host web web.vm\n  HostName 10.213.0.2\n  User root\n  IdentityFile /s/ssh/id_ed25519\n  \
             UserKnownHostsFile /s/ssh/known_hosts\n  StrictHostKeyChecking yes\n  HostKeyAlias web.vm\n"
        ), "{config}");
        assert_eq!(hosts, "web.vm ssh-ed25519 AAAAkey\n");
        // A home with a space and a `%`: one argument each, no token.
        let (config, _) = render(&entries, "vm", Path::new("/home/a b/100%")).unwrap();
        assert!(
            config.contains("IdentityFile \"/home/a b/100%%/ssh/id_ed25519\"")
                && config.contains("Include \"/home/a b/100%/ssh/config\""),
            "{config}"
        );
        assert!(render(&entries, "vm", Path::new("/x\"y")).is_err());
    }

    /// What ssh does with a ProxyCommand (`%%` → `%`, then `sh -c "exec …"`)
    /// gives back the very words, whatever is in them (red team round 3,
    /// item 12: a `$(cmd)` ran at the next plain `ssh`).
    #[test]
    fn a_proxy_command_is_the_words_it_was_made_of() {
        let words = [
            "/opt/my tools/banger",
            "--host",
            "ssh://dev@box",
            "it's $(touch /tmp/owned) `x` ; | & 100%",
        ];
        let line = proxy_command(&words);
        let expanded = line.replace("%%", "%");
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("exec printf '%s\\n' {}", &expanded))
            .output()
            .unwrap();
        let got: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        assert_eq!(got, words);
        assert!(!Path::new("/tmp/owned").exists());
    }
}
