//! A registry session for one reference: manifest resolution (through indexes,
//! to the wanted platform) and blob streams. Built on oci-client, which handles
//! the token dance; banger verifies every digest itself.

use std::path::Path;

use futures_util::stream::BoxStream;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};

use super::digest;
use super::manifest::{self, Descriptor, Parsed};
use super::reference::{is_plain_http, Platform};
use crate::error::OpError;

pub struct Registry {
    client: Client,
    auth: RegistryAuth,
    reference: Reference,
    /// Manifests are fetched here rather than through oci-client, which
    /// reads any size of response into memory.
    http: reqwest::Client,
    plain_http: bool,
}

/// Manifests and indexes are small JSON documents (Docker Hub's largest
/// indexes are tens of KiB); a registry sending more is refused before it
/// can fill the daemon's memory.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;

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
        let plain_http = is_plain_http(&registry, insecure);
        let protocol = if plain_http {
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
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(15))
            .read_timeout(std::time::Duration::from_secs(120))
            .build()
            .unwrap_or_default();
        Registry {
            client,
            auth: super::auth::for_registry(docker_config, &registry),
            reference: reference.clone(),
            http,
            plain_http,
        }
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> OpError {
        let registry = self.reference.registry();
        let text = e.to_string();
        OpError::registry(format!(
            "{what} {} from {registry}: {text}{}",
            self.reference.whole(),
            next_step(registry, &text)
        ))
    }

    async fn manifest(&self, reference: &Reference) -> Result<(Vec<u8>, String), OpError> {
        let bytes = self.fetch_manifest(reference).await?;
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

    /// GET of a manifest, at most [`MAX_MANIFEST_BYTES`]. oci-client does
    /// the token dance; the request is ours so its size can be bounded.
    async fn fetch_manifest(&self, reference: &Reference) -> Result<Vec<u8>, OpError> {
        use futures_util::StreamExt;
        let what = "fetching the manifest of";
        let token = self
            .client
            .auth(reference, &self.auth, RegistryOperation::Pull)
            .await
            .map_err(|e| self.err(what, e))?;
        let scheme = if self.plain_http { "http" } else { "https" };
        let name = reference.digest().or(reference.tag()).unwrap_or("latest");
        let ns = reference
            .namespace()
            .map(|ns| format!("?ns={ns}"))
            .unwrap_or_default();
        let url = format!(
            "{scheme}://{}/v2/{}/manifests/{name}{ns}",
            reference.resolve_registry(),
            reference.repository()
        );
        let mut request = self
            .http
            .get(&url)
            .header(reqwest::header::ACCEPT, manifest::ACCEPTED.join(", "));
        request = match (token, &self.auth) {
            (Some(token), _) => request.bearer_auth(token),
            (None, RegistryAuth::Basic(user, password)) => request.basic_auth(user, Some(password)),
            (None, _) => request,
        };
        let response = request.send().await.map_err(|e| self.err(what, e))?;
        let status = response.status();
        if !status.is_success() {
            let reason = match status.as_u16() {
                401 | 403 => "not authorized".to_string(),
                404 => "manifest unknown (no such image or tag)".to_string(),
                _ => format!("the registry answered {status}"),
            };
            return Err(self.err(what, reason));
        }
        let too_big = || {
            OpError::bad_content(format!(
                "the manifest of {} is larger than {} MiB; banger refuses it",
                reference.whole(),
                MAX_MANIFEST_BYTES >> 20
            ))
        };
        if response
            .content_length()
            .is_some_and(|n| n > MAX_MANIFEST_BYTES)
        {
            return Err(too_big());
        }
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.err(what, e))?;
            if (body.len() + chunk.len()) as u64 > MAX_MANIFEST_BYTES {
                return Err(too_big());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    pub async fn resolve(&self, platform: &Platform) -> Result<Resolved, OpError> {
        let (bytes, top_digest) = self.manifest(&self.reference).await?;
        let parsed = manifest::parse(&bytes).map_err(OpError::from)?;
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
                digest::validate(&entry.digest).map_err(OpError::from)?;
                let by_digest = Reference::with_digest(
                    self.reference.registry().to_string(),
                    self.reference.repository().to_string(),
                    entry.digest.clone(),
                );
                let (bytes, digest) = self.manifest(&by_digest).await?;
                (manifest::parse(&bytes).map_err(OpError::from)?, digest)
            }
        };
        match parsed {
            Parsed::Image { config, layers } => {
                for d in std::iter::once(&config).chain(&layers) {
                    digest::validate(&d.digest).map_err(OpError::from)?;
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

/// What to do about a registry's failure, when the words say: log in, or
/// get the image some other way.
fn next_step(registry: &str, text: &str) -> String {
    let lower = text.to_lowercase();
    let says = |words: &[&str]| words.iter().any(|w| lower.contains(w));
    if says(&["not authorized", "authentication", "unauthorized"]) {
        format!("; log in with `docker login {registry}` (banger reads docker's config.json)")
    } else if says(&["error sending request", "connect", "timed out", "dns"]) {
        format!(
            "; is {registry} reachable from here? Without a registry, `banger image import` \
             takes a `docker save`/`podman save` or OCI archive"
        )
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn failures_name_the_next_step() {
        let r = "docker.io";
        assert!(super::next_step(r, "401 Unauthorized").contains("docker login docker.io"));
        let offline = super::next_step(r, "error sending request for url (https://x/v2/)");
        assert!(offline.contains("banger image import"), "{offline}");
        assert_eq!(
            super::next_step(r, "manifest unknown (no such image or tag)"),
            ""
        );
    }
}
