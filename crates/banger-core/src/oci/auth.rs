//! Registry credentials from docker's `config.json` (`$DOCKER_CONFIG` or
//! `~/.docker`). Only inline `auths` entries are read; credential helpers are not
//! run by the daemon.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

pub fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(Path::new(&dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|home| Path::new(&home).join(".docker/config.json"))
}

/// Credentials for `registry` (as in a reference: `docker.io`, `ghcr.io`,
/// `host:port`), or anonymous access.
pub fn for_registry(config_file: Option<&Path>, registry: &str) -> RegistryAuth {
    let Some(text) = config_file.and_then(|p| std::fs::read_to_string(p).ok()) else {
        return RegistryAuth::Anonymous;
    };
    let Ok(config) = serde_json::from_str::<DockerConfig>(&text) else {
        tracing::warn!("ignoring unreadable docker config.json");
        return RegistryAuth::Anonymous;
    };
    let wanted: &[&str] = if matches!(
        registry,
        "docker.io" | "index.docker.io" | "registry-1.docker.io"
    ) {
        &[
            "https://index.docker.io/v1/",
            "index.docker.io",
            "docker.io",
            "registry-1.docker.io",
        ]
    } else {
        &[registry]
    };
    for (key, entry) in &config.auths {
        let host = key
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/');
        if !wanted
            .iter()
            .any(|w| *w == key || *w == host || host.strip_suffix("/v1") == Some(w))
        {
            continue;
        }
        if let Some(token) = &entry.identitytoken {
            if !token.is_empty() {
                let user = entry.username.clone().unwrap_or_else(|| "<token>".into());
                return RegistryAuth::Basic(user, token.clone());
            }
        }
        if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
            return RegistryAuth::Basic(u.clone(), p.clone());
        }
        if let Some(encoded) = &entry.auth {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok());
            if let Some((u, p)) = decoded.as_deref().and_then(|d| d.split_once(':')) {
                return RegistryAuth::Basic(u.to_string(), p.to_string());
            }
        }
    }
    RegistryAuth::Anonymous
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_inline_auths_for_hub_and_private_registries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let hub = base64::engine::general_purpose::STANDARD.encode("me:secret");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{hub}"}},
                "reg.example:5000":{{"username":"u","password":"p"}}}}}}"#
            ),
        )
        .unwrap();
        let basic = |a: RegistryAuth| match a {
            RegistryAuth::Basic(u, p) => format!("{u}:{p}"),
            other => format!("{other:?}"),
        };
        assert_eq!(basic(for_registry(Some(&path), "docker.io")), "me:secret");
        assert_eq!(basic(for_registry(Some(&path), "reg.example:5000")), "u:p");
        assert_eq!(basic(for_registry(Some(&path), "ghcr.io")), "Anonymous");
        assert_eq!(basic(for_registry(None, "ghcr.io")), "Anonymous");
    }
}
