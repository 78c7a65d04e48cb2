//! Image references as users type them, and the names banger records them under.

use oci_client::Reference;

pub fn parse(input: &str) -> Result<Reference, BadReference> {
    input
        .trim()
        .parse::<Reference>()
        .map_err(|e| format!("invalid image reference `{input}`: {e}"))
        .map_err(Into::into)
}

/// `docker.io/library/alpine:latest` → `alpine`; `ghcr.io/o/tool:1.2` →
/// `tool:1.2`; a digest-only reference gets `@` and the digest's first 12 digits.
pub fn default_name(reference: &Reference) -> String {
    let last = reference
        .repository()
        .rsplit('/')
        .next()
        .unwrap_or(reference.repository());
    match (reference.tag(), reference.digest()) {
        (Some(tag), _) if tag != "latest" => format!("{last}:{tag}"),
        (None, Some(digest)) => format!("{last}@{}", super::digest::short(digest)),
        _ => last.to_string(),
    }
}

/// Image names: lowercase letters, digits and `._:@-`, starting with a letter or
/// digit, at most 128 bytes.
pub fn validate_name(name: &str) -> Result<(), BadReference> {
    let ok_first = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let ok_rest = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._:@-".contains(&b));
    if !ok_first || !ok_rest || name.len() > 128 {
        return Err(format!(
            "invalid image name `{name}`: use lowercase letters, digits and `._:@-`, \
             starting with a letter or digit (at most 128 characters)"
        )
        .into());
    }
    Ok(())
}

/// A registry is spoken to over plain HTTP when it is on loopback (as docker
/// does) or listed in `insecure_registries`.
pub fn is_plain_http(registry: &str, insecure: &[String]) -> bool {
    if insecure.iter().any(|r| r == registry) {
        return true;
    }
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => registry
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(registry),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `os/arch[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    pub fn host() -> Platform {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform {
            os: "linux".into(),
            architecture: architecture.into(),
            variant: None,
        }
    }

    pub fn parse(text: &str) -> Result<Platform, BadReference> {
        let parts: Vec<&str> = text.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, variant] if !os.is_empty() && !arch.is_empty() && !variant.is_empty() => {
                Ok(Platform {
                    os: os.to_string(),
                    architecture: arch.to_string(),
                    variant: Some(variant.to_string()),
                })
            }
            _ => Err(format!(
                "invalid platform `{text}`: expected os/arch[/variant], e.g. linux/amd64"
            )
            .into()),
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_shorthand_expands_and_names_are_derived() {
        let r = parse("alpine").unwrap();
        assert_eq!(r.whole(), "docker.io/library/alpine:latest");
        assert_eq!(default_name(&r), "alpine");
        assert_eq!(
            default_name(&parse("ghcr.io/o/tool:1.2").unwrap()),
            "tool:1.2"
        );
        let d = format!("quay.io/x/y@sha256:{}", "b".repeat(64));
        assert_eq!(default_name(&parse(&d).unwrap()), "y@bbbbbbbbbbbb");
        assert!(parse("UPPER/Case").is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("alpine:3.19").is_ok());
        for bad in ["", "-x", "A", "a/b", "a b", &"a".repeat(129)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plain_http_only_for_loopback_and_configured_registries() {
        assert!(is_plain_http("127.0.0.1:5000", &[]));
        assert!(is_plain_http("localhost:5000", &[]));
        assert!(is_plain_http("[::1]:5000", &[]));
        assert!(!is_plain_http("docker.io", &[]));
        assert!(!is_plain_http("10.0.0.1:5000", &[]));
        assert!(is_plain_http("reg.lan:5000", &["reg.lan:5000".into()]));
    }

    #[test]
    fn platforms_parse() {
        assert_eq!(
            Platform::parse("linux/arm64/v8").unwrap().to_string(),
            "linux/arm64/v8"
        );
        assert!(Platform::parse("linux").is_err());
        assert_eq!(Platform::host().os, "linux");
    }
}

crate::error::message_error! {
    /// An image reference, name or platform the user typed that cannot be.
    BadReference
}
