//! Talking to OCI distribution registries and caching what they serve.

pub mod archive;
pub mod auth;
pub mod blobs;
pub mod digest;
pub mod manifest;
pub mod prune;
pub mod reference;
pub mod registry;

crate::error::message_error! {
    /// What a registry served is not what it claims or not usable: a bad
    /// digest, a manifest or config that does not parse, a blob that does
    /// not match its digest.
    ContentError
}
