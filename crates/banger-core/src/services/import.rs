//! `image import`: an image from a docker archive, an OCI archive or an
//! OCI layout directory, through the pull's own pipeline: layers into the
//! blob cache (hashed as they are copied), the same flattener with the
//! same rules for hostile content, the same ext4 build and record.

use std::io::Read;
use std::path::PathBuf;

use banger_proto::image::{ImageImportParams, LayerSummary, PullEvent, PullResult};

use super::images::ImageService;
use super::pull::{self, Recorded, Scratch};
use crate::error::{OpError, OpResult};
use crate::events::Events;
use crate::ids;
use crate::oci::archive::{Plan, PlannedLayer, Source};
use crate::oci::manifest::{self, Descriptor};
use crate::oci::reference::{self, Platform};
use crate::rootfs::layer::Check;

pub async fn import(
    svc: &ImageService,
    params: ImageImportParams,
    events: Events<PullEvent>,
) -> OpResult<PullResult> {
    let path = PathBuf::from(&params.path);
    if !path.is_absolute() {
        return Err(OpError::invalid(format!(
            "`{}` is not an absolute path",
            params.path
        )));
    }
    let platform = match params.platform.as_deref() {
        Some(p) => Platform::parse(p).map_err(OpError::from)?,
        None => Platform::host(),
    };
    let opened = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || -> Result<(Source, Plan), String> {
            let source = Source::open(&path).map_err(String::from)?;
            let plan = source.plan(&platform).map_err(String::from)?;
            Ok((source, plan))
        })
        .await
        .map_err(|e| OpError::internal(e.to_string()))?
    };
    let (source, plan) = opened
        .map_err(|e| OpError::bad_content(format!("cannot import {}: {e}", path.display())))?;
    let config = manifest::parse_config(&plan.config).map_err(OpError::from)?;
    let tag = plan.tags.iter().find_map(|t| reference::parse(t).ok());
    let name = match (params.name, &tag) {
        (Some(name), _) => name,
        (None, Some(tag)) => reference::default_name(tag),
        (None, None) => {
            return Err(OpError::invalid(format!(
                "{} names no image tag; name it: `banger image import {} --name NAME`",
                path.display(),
                path.display()
            )))
        }
    };
    reference::validate_name(&name).map_err(OpError::from)?;
    // Found as `vm run --image REF` finds a pulled image, when it has a tag.
    let whole = match &tag {
        Some(tag) => tag.whole(),
        None => format!("{}:{}", plan.format, path.display()),
    };
    let _name_guard = svc.lock_name(&name).await;
    let existing = svc.store.get_image(&name)?;
    if let Some(done) = pull::up_to_date(existing.as_ref(), &plan.digest, &events) {
        return Ok(done);
    }
    pull::name_free_for(existing.as_ref(), &name, &whole)?;
    events.emit(&PullEvent::Resolved {
        r#ref: whole.clone(),
        digest: plan.digest.clone(),
        layers: plan
            .layers
            .iter()
            .map(|l| LayerSummary {
                digest: l.digest.clone().unwrap_or_else(|| l.name.clone()),
                size: l.size,
            })
            .collect(),
    });
    let declared: Vec<Descriptor> = plan
        .layers
        .iter()
        .map(|l| Descriptor {
            media_type: l.media_type.clone(),
            digest: l.digest.clone().unwrap_or_default(),
            size: l.size as i64,
            platform: None,
        })
        .collect();
    pull::check_room(svc, &declared)?;

    // Into the cache, in order (the archive is one file on one disk).
    let source = std::sync::Arc::new(source);
    let mut layers = Vec::new();
    let mut receivers = Vec::new();
    for planned in plan.layers.clone() {
        let cached = cache_layer(svc, &source, planned, &events).await?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = tx.send(Ok((cached.1, Check::AlreadyVerified)));
        receivers.push(rx);
        layers.push(cached.0);
    }
    let scratch = Scratch(
        svc.paths
            .tmp_dir()
            .join(format!("import-{}", ids::random_hex(6))),
    );
    std::fs::create_dir_all(&scratch.0)?;
    let built = pull::build(svc, layers, receivers, &scratch.0, &events).await?;
    let image = pull::record(
        svc,
        Recorded {
            name,
            r#ref: whole,
            digest: plan.digest,
            config,
        },
        &built,
        &scratch.0,
        existing,
    )?;
    tracing::info!(name = %image.name, format = plan.format, size = image.size_bytes, "image imported");
    Ok(PullResult {
        image,
        up_to_date: false,
    })
}

/// Copies one layer into the blob cache (unless there already), checking
/// it against the digest that names it; returns its descriptor (digest
/// now known) and the open file.
async fn cache_layer(
    svc: &ImageService,
    source: &std::sync::Arc<Source>,
    planned: PlannedLayer,
    events: &Events<PullEvent>,
) -> OpResult<(Descriptor, std::fs::File)> {
    if let Some(d) = &planned.digest {
        let _lock = svc.blobs.lock(d).await;
        if let Some(file) = svc.blobs.open(d) {
            events.emit(&PullEvent::LayerDone {
                digest: d.clone(),
                cached: true,
            });
            return Ok((descriptor(&planned, d), file));
        }
    }
    let (source, blobs) = (source.clone(), svc.blobs.clone());
    let name = planned.name.clone();
    let want = planned.digest.clone();
    let copied = tokio::task::spawn_blocking(move || -> Result<(String, std::fs::File), String> {
        let (mut reader, size) = source.open_file(&name).map_err(String::from)?;
        let mut writer = blobs.writer().map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(|e| format!("reading `{name}`: {e}"))?;
            if n == 0 {
                break;
            }
            writer.write(&buf[..n]).map_err(|e| e.to_string())?;
        }
        let digest = want.unwrap_or_else(|| writer.digest());
        let file = writer
            .finish(&blobs, &digest, Some(size))
            .map_err(|e| format!("layer `{name}`: {e}"))?;
        Ok((digest, file))
    })
    .await
    .map_err(|e| OpError::internal(e.to_string()))?;
    let (digest, file) = copied.map_err(OpError::bad_content)?;
    events.emit(&PullEvent::LayerDone {
        digest: digest.clone(),
        cached: false,
    });
    Ok((descriptor(&planned, &digest), file))
}

fn descriptor(planned: &PlannedLayer, digest: &str) -> Descriptor {
    Descriptor {
        media_type: planned.media_type.clone(),
        digest: digest.to_string(),
        size: planned.size as i64,
        platform: None,
    }
}
