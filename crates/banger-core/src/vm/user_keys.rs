//! The user's own SSH public keys, authorized in every VM beside banger's:
//! the configured files, else every `~/.ssh/*.pub` and the plain lines of
//! `~/.ssh/authorized_keys` (whoever may log in as the user, as a remote
//! `--host` user does, may log into the user's VMs; a key restricted by
//! options there is left out), plus what the ssh-agent holds when the
//! daemon can reach one.

use std::path::{Path, PathBuf};

use banger_host::{CommandSpec, ProcessRunner};

use crate::config::SshConfig;

/// Valid OpenSSH public keys, deduplicated, in a stable order.
pub fn load(config: &SshConfig, runner: &dyn ProcessRunner) -> Vec<String> {
    let mut keys = Vec::new();
    for file in files(config) {
        if let Ok(text) = std::fs::read_to_string(&file) {
            keys.extend(parse(&text));
        }
    }
    if config.agent_keys.unwrap_or(true) && std::env::var_os("SSH_AUTH_SOCK").is_some() {
        // Exit 1 means "no identities": nothing to add.
        if let Ok(out) = runner.run(&CommandSpec::new("ssh-add").arg("-L")) {
            keys.extend(parse(&String::from_utf8_lossy(&out.stdout)));
        }
    }
    let mut seen = std::collections::HashSet::new();
    keys.retain(|k| seen.insert(key_body(k).to_string()));
    keys
}

fn files(config: &SshConfig) -> Vec<PathBuf> {
    if let Some(list) = &config.user_keys {
        return list.iter().map(|p| expand_home(p)).collect();
    }
    let dir = expand_home("~/.ssh");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "pub"))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.push(dir.join("authorized_keys"));
    found
}

fn expand_home(path: &str) -> PathBuf {
    match path.strip_prefix("~/") {
        Some(rest) => std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/"))
            .join(rest),
        None => Path::new(path).to_path_buf(),
    }
}

/// The lines that are public keys russh understands; comments and junk go.
fn parse(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter(|l| russh::keys::PublicKey::from_openssh(l).is_ok())
        .map(str::to_string)
        .collect()
}

/// "type base64" without the comment, for deduplication.
fn key_body(key: &str) -> &str {
    let mut parts = key.splitn(3, ' ');
    let kind = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default();
    &key[..kind.len() + 1 + body.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_the_listed_files_valid_and_once() {
        let tmp = tempfile::tempdir().unwrap();
        let key = crate::vm::keys::public_openssh(&crate::vm::keys::generate().unwrap()).unwrap();
        let a = tmp.path().join("a.pub");
        std::fs::write(&a, format!("# mine\n{key} me@laptop\nnot a key\n")).unwrap();
        let b = tmp.path().join("b.pub");
        std::fs::write(&b, format!("{key} other-comment\n")).unwrap();
        let config = SshConfig {
            user_keys: Some(vec![
                a.display().to_string(),
                b.display().to_string(),
                "/nonexistent.pub".into(),
            ]),
            agent_keys: Some(false),
        };
        let keys = load(&config, &banger_host::FakeRunner::default());
        assert_eq!(keys, vec![format!("{key} me@laptop")]);
    }

    #[test]
    fn an_authorized_keys_line_with_options_is_left_out() {
        let key = crate::vm::keys::public_openssh(&crate::vm::keys::generate().unwrap()).unwrap();
        let text = format!("command=\"backup\",no-pty {key} restricted\n{key} plain\n");
        assert_eq!(parse(&text), vec![format!("{key} plain")]);
    }
}
