//! OCI image layouts written from scratch (what `skopeo copy oci:…` reads).

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::layer::Compression;

#[derive(Debug, Clone)]
pub struct Desc {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    /// For image manifests: the digests of their layers, bottom first.
    pub layers: Vec<String>,
}

impl Desc {
    fn json(&self) -> Value {
        json!({ "mediaType": self.media_type, "digest": self.digest, "size": self.size })
    }
}

/// The `config` section the test images have unless told otherwise.
pub fn default_config(user: &str) -> Value {
    json!({ "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/", "User": user })
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

pub struct Layout {
    pub dir: PathBuf,
    refs: Vec<Value>,
}

impl Layout {
    pub fn new(dir: &Path) -> Layout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let layout = Layout {
            dir: dir.to_path_buf(),
            refs: vec![],
        };
        layout.write_index();
        layout
    }

    pub fn blob(&self, bytes: &[u8]) -> Desc {
        let digest = sha256(bytes);
        let hex = digest.trim_start_matches("sha256:");
        std::fs::write(self.dir.join("blobs/sha256").join(hex), bytes).unwrap();
        Desc {
            media_type: String::new(),
            digest,
            size: bytes.len() as u64,
            layers: vec![],
        }
    }

    /// An image manifest over `layers` (uncompressed tars, compressed here).
    pub fn image(&self, layers: &[(Compression, Vec<u8>)], arch: &str) -> Desc {
        self.image_as(layers, arch, "0:0")
    }

    /// [`image`](Self::image) whose default user is `user`.
    pub fn image_as(&self, layers: &[(Compression, Vec<u8>)], arch: &str, user: &str) -> Desc {
        self.image_with(layers, arch, default_config(user))
    }

    /// An image whose config's `config` section (Env, Cmd, User, …) is `config`.
    pub fn image_with(&self, layers: &[(Compression, Vec<u8>)], arch: &str, config: Value) -> Desc {
        let mut layer_descs = Vec::new();
        let mut diff_ids = Vec::new();
        let mut layer_digests = Vec::new();
        for (compression, tar) in layers {
            diff_ids.push(sha256(tar));
            let mut d = self.blob(&compression.compress(tar));
            d.media_type = compression.media_type().into();
            layer_descs.push(d.json());
            layer_digests.push(d.digest);
        }
        let config = json!({
            "architecture": arch,
            "os": "linux",
            "config": config,
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        });
        let mut config_desc = self.blob(&serde_json::to_vec(&config).unwrap());
        config_desc.media_type = "application/vnd.oci.image.config.v1+json".into();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config_desc.json(),
            "layers": layer_descs,
        });
        let mut d = self.blob(&serde_json::to_vec(&manifest).unwrap());
        d.media_type = "application/vnd.oci.image.manifest.v1+json".into();
        d.layers = layer_digests;
        d
    }

    /// A multi-platform index over `(manifest, arch)` pairs.
    pub fn index(&self, entries: &[(Desc, &str)]) -> Desc {
        let manifests: Vec<Value> = entries
            .iter()
            .map(|(d, arch)| {
                let mut v = d.json();
                v["platform"] = json!({ "os": "linux", "architecture": arch });
                v
            })
            .collect();
        let index = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        });
        let mut d = self.blob(&serde_json::to_vec(&index).unwrap());
        d.media_type = "application/vnd.oci.image.index.v1+json".into();
        d
    }

    pub fn tag(&mut self, tag: &str, desc: &Desc) {
        let mut v = desc.json();
        v["annotations"] = json!({ "org.opencontainers.image.ref.name": tag });
        self.refs.push(v);
        self.write_index();
    }

    fn write_index(&self) {
        let index = json!({ "schemaVersion": 2, "manifests": self.refs });
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
    }
}
