//! Talking to OCI distribution registries and caching what they serve.

pub mod auth;
pub mod blobs;
pub mod digest;
pub mod manifest;
pub mod prune;
pub mod reference;
pub mod registry;
