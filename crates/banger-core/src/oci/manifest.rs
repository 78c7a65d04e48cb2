//! OCI and Docker schema-2 manifests, indexes and image configs: just the
//! fields banger uses.

use banger_proto::image::ImageConfig;
use serde::Deserialize;

use super::reference::Platform;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const ACCEPTED: &[&str] = &[OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: i64,
    #[serde(default)]
    pub platform: Option<DescriptorPlatform>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct DescriptorPlatform {
    pub os: String,
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

#[derive(Debug, PartialEq)]
pub enum Parsed {
    Index(Vec<Descriptor>),
    Image {
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
}

pub fn parse(bytes: &[u8]) -> Result<Parsed, super::ContentError> {
    let raw: Raw =
        serde_json::from_slice(bytes).map_err(|e| format!("unreadable manifest: {e}"))?;
    match (raw.manifests, raw.config, raw.layers) {
        (Some(list), _, _) => Ok(Parsed::Index(list)),
        (None, Some(config), layers) => {
            let layers = layers.unwrap_or_default();
            for layer in &layers {
                if layer.media_type.contains("nondistributable")
                    || layer.media_type.contains("foreign")
                {
                    tracing::debug!(digest = %layer.digest, "non-distributable layer");
                }
            }
            Ok(Parsed::Image { config, layers })
        }
        _ => Err(format!(
            "unsupported manifest{}",
            raw.media_type
                .map(|m| format!(" type `{m}`"))
                .unwrap_or_default()
        )
        .into()),
    }
}

/// Picks the entry of an index for `want`. A missing variant matches any.
pub fn select<'a>(entries: &'a [Descriptor], want: &Platform) -> Option<&'a Descriptor> {
    entries.iter().find(|d| {
        d.platform.as_ref().is_some_and(|p| {
            p.os == want.os
                && p.architecture == want.architecture
                && (want.variant.is_none() || p.variant == want.variant)
        })
    })
}

pub fn available(entries: &[Descriptor]) -> String {
    let list: Vec<String> = entries
        .iter()
        .filter_map(|d| d.platform.as_ref())
        .map(|p| match &p.variant {
            Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
            None => format!("{}/{}", p.os, p.architecture),
        })
        .collect();
    list.join(", ")
}

#[derive(Debug, Default, Deserialize)]
struct RawConfigFile {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    config: Option<RawRunConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawRunConfig {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

pub fn parse_config(bytes: &[u8]) -> Result<ImageConfig, super::ContentError> {
    let raw: RawConfigFile =
        serde_json::from_slice(bytes).map_err(|e| format!("unreadable image config: {e}"))?;
    let run = raw.config.unwrap_or_default();
    Ok(ImageConfig {
        env: run.env.unwrap_or_default(),
        entrypoint: run.entrypoint.unwrap_or_default(),
        cmd: run.cmd.unwrap_or_default(),
        workdir: run.working_dir.unwrap_or_default(),
        user: run.user.unwrap_or_default(),
        os: raw.os,
        architecture: raw.architecture,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_indexes_and_selects_platforms() {
        let index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:a","size":1,"platform":{"os":"linux","architecture":"arm64","variant":"v8"}},
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:b","size":1,"platform":{"os":"linux","architecture":"amd64"}}]}"#;
        let Parsed::Index(entries) = parse(index).unwrap() else {
            panic!()
        };
        let amd = select(&entries, &Platform::parse("linux/amd64").unwrap()).unwrap();
        assert_eq!(amd.digest, "sha256:b");
        let arm = select(&entries, &Platform::parse("linux/arm64").unwrap()).unwrap();
        assert_eq!(arm.digest, "sha256:a");
        assert!(select(&entries, &Platform::parse("linux/s390x").unwrap()).is_none());
        assert_eq!(available(&entries), "linux/arm64/v8, linux/amd64");
    }

    #[test]
    fn parses_docker_schema2_and_configs() {
        let m = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",
            "config":{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"sha256:c","size":2},
            "layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"sha256:l","size":3}]}"#;
        let Parsed::Image { config, layers } = parse(m).unwrap() else {
            panic!()
        };
        assert_eq!(config.digest, "sha256:c");
        assert_eq!(layers.len(), 1);
        let cfg = parse_config(br#"{"os":"linux","architecture":"amd64","config":{"Env":["A=1"],"Cmd":["sh"],"WorkingDir":"/w","User":"1:2"}}"#).unwrap();
        assert_eq!(cfg.env, ["A=1"]);
        assert_eq!(cfg.cmd, ["sh"]);
        assert_eq!((cfg.workdir.as_str(), cfg.user.as_str()), ("/w", "1:2"));
        assert!(parse(b"{\"schemaVersion\":1}").is_err());
    }
}
