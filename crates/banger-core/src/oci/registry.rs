//! A registry session for one reference: manifest resolution (through indexes,
//! to the wanted platform) and blob streams. Built on oci-client, which handles
//! the token dance; banger verifies every digest itself.

use std::path::Path;

use futures_util::stream::BoxStream;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::digest;
use super::manifest::{self, Descriptor, Parsed};
use super::reference::{is_plain_http, Platform};
use crate::error::OpError;

pub struct Registry {
    client: Client,
    auth: RegistryAuth,
    reference: Reference,
}

/// A reference resolved to one image manifest.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Digest of the image manifest (not of the index that led to it).
    pub digest: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

impl Registry {
    pub fn new(
        reference: &Reference,
        insecure: &[String],
        docker_config: Option<&Path>,
    ) -> Registry {
        let registry = reference.registry().to_string();
        let protocol = if is_plain_http(&registry, insecure) {
            ClientProtocol::HttpsExcept(vec![
                registry.clone(),
                reference.resolve_registry().to_string(),
            ])
        } else {
            ClientProtocol::Https
        };
        let client = Client::new(ClientConfig {
            protocol,
            connect_timeout: Some(std::time::Duration::from_secs(15)),
            read_timeout: Some(std::time::Duration::from_secs(120)),
            ..Default::default()
        });
        Registry {
            client,
            auth: super::auth::for_registry(docker_config, &registry),
            reference: reference.clone(),
        }
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> OpError {
        let registry = self.reference.registry();
        let text = e.to_string();
        let lower = text.to_lowercase();
        let hint = if lower.contains("not authorized")
            || lower.contains("authentication")
            || lower.contains("unauthorized")
        {
            format!("; log in with `docker login {registry}` (banger reads docker's config.json)")
        } else {
            String::new()
        };
        OpError::registry(format!(
            "{what} {} from {registry}: {text}{hint}",
            self.reference.whole()
        ))
    }

    async fn manifest(&self, reference: &Reference) -> Result<(Vec<u8>, String), OpError> {
        let (bytes, _) = self
            .client
            .pull_manifest_raw(reference, &self.auth, manifest::ACCEPTED)
            .await
            .map_err(|e| self.err("fetching the manifest of", e))?;
        let actual = digest::sha256_of(&bytes);
        if let Some(want) = reference.digest() {
            if want != actual {
                return Err(OpError::bad_content(format!(
                    "manifest of {} does not match its digest (got {actual})",
                    reference.whole()
                )));
            }
        }
        Ok((bytes.to_vec(), actual))
    }

    pub async fn resolve(&self, platform: &Platform) -> Result<Resolved, OpError> {
        let (bytes, top_digest) = self.manifest(&self.reference).await?;
        let parsed = manifest::parse(&bytes).map_err(OpError::bad_content)?;
        let (parsed, digest) = match parsed {
            Parsed::Image { .. } => (parsed, top_digest),
            Parsed::Index(entries) => {
                let entry = manifest::select(&entries, platform).ok_or_else(|| {
                    OpError::invalid(format!(
                        "{} has no image for {platform} (it has: {}); pick one with --platform",
                        self.reference.whole(),
                        manifest::available(&entries)
                    ))
                })?;
                digest::validate(&entry.digest).map_err(OpError::bad_content)?;
                let by_digest = Reference::with_digest(
                    self.reference.registry().to_string(),
                    self.reference.repository().to_string(),
                    entry.digest.clone(),
                );
                let (bytes, digest) = self.manifest(&by_digest).await?;
                (
                    manifest::parse(&bytes).map_err(OpError::bad_content)?,
                    digest,
                )
            }
        };
        match parsed {
            Parsed::Image { config, layers } => {
                for d in std::iter::once(&config).chain(&layers) {
                    digest::validate(&d.digest).map_err(OpError::bad_content)?;
                }
                Ok(Resolved {
                    digest,
                    config,
                    layers,
                })
            }
            Parsed::Index(_) => Err(OpError::bad_content(format!(
                "{} is an index of indexes, which banger does not follow",
                self.reference.whole()
            ))),
        }
    }

    pub async fn blob(
        &self,
        desc: &Descriptor,
    ) -> Result<BoxStream<'static, Result<bytes::Bytes, std::io::Error>>, OpError> {
        let oci_desc = OciDescriptor {
            media_type: desc.media_type.clone(),
            digest: desc.digest.clone(),
            size: desc.size,
            ..Default::default()
        };
        let sized = self
            .client
            .pull_blob_stream(&self.reference, &oci_desc)
            .await
            .map_err(|e| self.err(&format!("fetching blob {} of", desc.digest), e))?;
        Ok(sized.stream)
    }
}
