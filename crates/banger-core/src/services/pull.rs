//! `image pull`: resolve, download layers in parallel into the blob cache while
//! flattening them in order, build the ext4, then record the image atomically.

use std::fs::File;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_proto::image::{ImageInfo, LayerSummary, PullEvent, PullParams, PullResult};
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use tracing::Instrument;

use super::images::ImageService;
use crate::error::{OpError, OpResult};
use crate::events::Events;
use crate::ids;
use crate::oci::blobs::BlobCache;
use crate::oci::manifest::{self, Descriptor};
use crate::oci::reference::{self, Platform};
use crate::oci::registry::{Registry, Resolved};
use crate::phases::PhaseClock;
use crate::rootfs::extract::Limits;
use crate::rootfs::layer::{apply_blob, Check, LayerFailure};
use crate::rootfs::staging::{self, Staging};
use crate::rootfs::{ext4, Flattener};

/// Test seams: awaited at fixed points of a pull.
#[derive(Clone, Default)]
pub struct PullHooks {
    /// Awaited once per downloaded blob, after its first chunk is written.
    pub mid_download: Option<Arc<dyn Fn(String) -> BoxFuture<'static, ()> + Send + Sync>>,
    /// Stages every pull in memory, allowed only this many bytes of it.
    pub memory_share: Option<u64>,
}

const MAX_CONFIG_BYTES: u64 = 16 * 1024 * 1024;
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Removes a pull's scratch directory however the pull ends.
pub(super) struct Scratch(pub PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub async fn pull(
    svc: &ImageService,
    params: PullParams,
    events: Events<PullEvent>,
) -> OpResult<PullResult> {
    let reference = reference::parse(&params.reference).map_err(OpError::from)?;
    let name = match params.name {
        Some(name) => name,
        None => reference::default_name(&reference),
    };
    reference::validate_name(&name).map_err(OpError::from)?;
    let platform = match params.platform.as_deref() {
        Some(p) => Platform::parse(p).map_err(OpError::from)?,
        None => Platform::host(),
    };
    let whole = reference.whole();
    let mut clock = PhaseClock::default();
    let _name_guard = svc.lock_name(&name).await;

    let existing = svc.store.get_image(&name)?;
    name_free_for(existing.as_ref(), &name, &whole)?;

    let docker_config = crate::oci::auth::docker_config_path();
    let registry = Arc::new(Registry::new(
        &reference,
        &svc.config.insecure_registries,
        docker_config.as_deref(),
    ));
    let resolved = registry.resolve(&platform).await?;
    clock.lap("resolve");
    tracing::info!(reference = %whole, digest = %resolved.digest, layers = resolved.layers.len(), "resolved");

    if let Some(done) = up_to_date(existing.as_ref(), &resolved.digest, &events) {
        return Ok(done);
    }
    events.emit(&PullEvent::Resolved {
        r#ref: whole.clone(),
        digest: resolved.digest.clone(),
        layers: resolved
            .layers
            .iter()
            .map(|l| LayerSummary {
                digest: l.digest.clone(),
                size: l.size.max(0) as u64,
            })
            .collect(),
    });

    check_room(svc, &resolved.layers)?;
    let config = fetch_config(svc, &registry, &resolved).await?;
    clock.lap("config");
    let scratch = Scratch(
        svc.paths
            .tmp_dir()
            .join(format!("pull-{}", ids::random_hex(6))),
    );
    std::fs::create_dir_all(&scratch.0)?;
    crate::steps::kill_point("pull-download");
    let built = download_and_build(svc, &registry, &resolved, &scratch.0, &events).await?;
    clock.absorb(&built.phases);

    let image = record(
        svc,
        Recorded {
            name,
            r#ref: whole,
            digest: resolved.digest.clone(),
            config,
        },
        &built,
        &scratch.0,
        existing,
    )?;
    clock.lap("record");
    tracing::info!(name = %image.name, size = image.size_bytes, "image recorded");
    // One line a benchmark reads: where this pull's time went.
    tracing::info!(phases = %clock.summary(), "pull phases");
    Ok(PullResult {
        image,
        up_to_date: false,
    })
}

/// What an image is recorded as.
pub(super) struct Recorded {
    pub name: String,
    pub r#ref: String,
    pub digest: String,
    pub config: banger_proto::image::ImageConfig,
}

/// Moves a built root filesystem into its image directory and records the
/// image, replacing `existing` (whose file goes once no VM needs it).
pub(super) fn record(
    svc: &ImageService,
    what: Recorded,
    built: &ext4::Built,
    scratch: &Path,
    existing: Option<ImageInfo>,
) -> OpResult<ImageInfo> {
    crate::steps::kill_point("pull-move");
    let image_dir = svc.paths.images_dir().join(ids::random_hex(8));
    std::fs::create_dir_all(&image_dir)?;
    let rootfs = image_dir.join("rootfs.ext4");
    std::fs::rename(scratch.join("rootfs.ext4"), &rootfs)?;
    // Shared by every overlay VM made from it: nothing writes it again.
    std::fs::set_permissions(&rootfs, std::os::unix::fs::PermissionsExt::from_mode(0o444))?;
    crate::steps::kill_point("pull-record");
    let image = ImageInfo {
        name: what.name,
        r#ref: what.r#ref,
        digest: what.digest,
        rootfs_path: rootfs.display().to_string(),
        size_bytes: built.size_bytes,
        content_bytes: built.content_bytes,
        config: what.config,
        created_at: ids::now_rfc3339(),
        vms: Vec::new(),
    };
    if let Err(e) = svc.store.put_image(&image) {
        let _ = std::fs::remove_dir_all(&image_dir);
        return Err(e.into());
    }
    if let Some(old) = existing {
        svc.drop_rootfs(&old.rootfs_path);
    }
    Ok(image)
}

async fn fetch_config(
    svc: &ImageService,
    registry: &Arc<Registry>,
    resolved: &Resolved,
) -> OpResult<banger_proto::image::ImageConfig> {
    let desc = &resolved.config;
    if desc.size as u64 > MAX_CONFIG_BYTES {
        return Err(OpError::bad_content(format!(
            "image config {} is implausibly large",
            desc.digest
        )));
    }
    let (mut file, _) = fetch_blob(
        registry.clone(),
        svc.blobs.clone(),
        desc.clone(),
        Events::none(),
        None,
    )
    .await?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    if crate::oci::digest::sha256_of(&bytes) != desc.digest {
        svc.blobs.evict(&desc.digest);
        return Err(OpError::bad_content(format!(
            "cached image config {} was corrupt and has been dropped; pull again",
            desc.digest
        )));
    }
    manifest::parse_config(&bytes).map_err(OpError::from)
}

/// Refuses a pull whose declared layers cannot fit: the downloads need
/// their compressed size in the cache (the layers not there yet), and the
/// tree needs at least as much again on the state filesystem. What layers
/// really expand to is watched as they unpack.
pub(super) fn check_room(svc: &ImageService, layers: &[Descriptor]) -> OpResult<()> {
    let limits = &svc.config.limits;
    let missing: u64 = layers
        .iter()
        .filter(|l| svc.blobs.open(&l.digest).is_none())
        .map(|l| l.size.max(0) as u64)
        .sum();
    let declared: u64 = layers.iter().map(|l| l.size.max(0) as u64).sum();
    for (dir, need) in [
        (svc.paths.cache_dir.clone(), missing),
        (svc.paths.state_dir.clone(), declared),
    ] {
        let Some(free) = crate::rootfs::extract::free_bytes(&dir) else {
            continue;
        };
        if free < need.saturating_add(limits.min_free()) {
            return Err(OpError::invalid(format!(
                "this image needs at least {} MiB under {} and only {} MiB is free; free space \
                 (or run `banger image cache prune`) and pull again",
                (need + limits.min_free()) >> 20,
                dir.display(),
                free >> 20
            )));
        }
    }
    Ok(())
}

/// Downloads run concurrently (bounded); the flattener, on a blocking thread,
/// takes each layer as soon as it and every layer below it are on hand.
async fn download_and_build(
    svc: &ImageService,
    registry: &Arc<Registry>,
    resolved: &Resolved,
    scratch: &Path,
    events: &Events<PullEvent>,
) -> OpResult<ext4::Built> {
    let permits = Arc::new(tokio::sync::Semaphore::new(
        svc.config.download_concurrency(),
    ));
    let mut downloads = tokio::task::JoinSet::new();
    let mut receivers = Vec::new();
    for layer in &resolved.layers {
        let (tx, rx) = tokio::sync::oneshot::channel();
        receivers.push(rx);
        let (registry, blobs, layer, events, permits) = (
            registry.clone(),
            svc.blobs.clone(),
            layer.clone(),
            events.clone(),
            permits.clone(),
        );
        let hook = svc.hooks.mid_download.clone();
        downloads.spawn(
            async move {
                let _permit = permits.acquire_owned().await;
                let _ = tx.send(fetch_blob(registry, blobs, layer, events, hook).await);
            }
            .instrument(tracing::Span::current()),
        );
    }

    let result = build(svc, resolved.layers.clone(), receivers, scratch, events).await;
    downloads.abort_all();
    result
}

/// Each layer's file, once it is on hand (in order).
pub(super) type LayerFiles = Vec<tokio::sync::oneshot::Receiver<OpResult<(File, Check)>>>;

/// Flattens `layers` (each taken from its receiver as soon as it and every
/// layer below it are on hand) on a blocking thread, then builds the ext4
/// at `scratch/rootfs.ext4`.
pub(super) async fn build(
    svc: &ImageService,
    layers: Vec<Descriptor>,
    receivers: LayerFiles,
    scratch: &Path,
    events: &Events<PullEvent>,
) -> OpResult<ext4::Built> {
    let estimate = staging::estimate(layers.iter().map(|l| {
        let compressed = l.media_type.contains("gzip") || l.media_type.contains("zstd");
        (l.size.max(0) as u64, compressed)
    }));
    let owner = svc.paths.state_dir.display().to_string();
    let memory_share = svc.hooks.memory_share;
    let out = scratch.join("rootfs.ext4");
    let scratch = scratch.to_path_buf();
    let (runner, blobs, events) = (svc.runner.clone(), svc.blobs.clone(), events.clone());
    let limits = crate::rootfs::extract::Limits {
        layer: svc.config.limits.layer(),
        image: svc.config.limits.image(),
        min_free: svc.config.limits.min_free(),
    };
    let span = tracing::Span::current();
    let build = tokio::task::spawn_blocking(move || -> OpResult<ext4::Built> {
        let _span = span.enter();
        // Time blocked on downloads vs time spent flattening: the layers
        // overlap, so the two tell which one a pull waits for.
        let mut phases = PhaseClock::default();
        let mut staging = Staging::choose(&scratch, &owner, estimate, memory_share)?;
        tracing::debug!(
            in_memory = staging.in_memory(),
            estimate,
            "staging the layers"
        );
        let mut flattener = flattener_in(&staging, limits)?;
        let mut applied: Vec<(File, Check, &str)> = Vec::new();
        for (layer, rx) in layers.iter().zip(receivers) {
            let (file, check) = rx
                .blocking_recv()
                .map_err(|_| OpError::internal("a layer download stopped unexpectedly"))??;
            phases.lap("download-wait");
            let mut result = apply_blob(&mut flattener, &file, &layer.digest, check);
            if staging.in_memory() && out_of_room(&flattener, &result) {
                // The image unpacks larger than memory allows: the layers so
                // far are applied again, on disk.
                tracing::info!("the layers outgrew their share of memory; unpacking on disk");
                drop(flattener);
                staging = Staging::on_disk(&scratch)?;
                flattener = flattener_in(&staging, limits)?;
                applied.push((file, check, &layer.digest));
                result = Ok(());
                for (file, check, digest) in &applied {
                    let rewound = (&*file).rewind().map_err(LayerFailure::Io);
                    result =
                        rewound.and_then(|()| apply_blob(&mut flattener, file, digest, *check));
                    if result.is_err() {
                        break;
                    }
                }
                applied.pop();
            } else {
                applied.push((file, check, &layer.digest));
            }
            result.map_err(|failure| layer_error(failure, &layer.digest, &blobs, &scratch))?;
            phases.lap("flatten");
        }
        events.emit(&PullEvent::Step {
            step: "flatten".into(),
        });
        let meta = flattener
            .finish()
            .map_err(|e| OpError::internal(format!("finishing the tree: {e}")))?;
        phases.lap("flatten");
        events.emit(&PullEvent::Step {
            step: "ext4".into(),
        });
        crate::steps::kill_point("pull-ext4");
        let mut built = ext4::build(
            runner.as_ref(),
            &staging.root(),
            &meta,
            &out,
            &scratch,
            limits.min_free,
        )
        .map_err(|e| {
            let message = format!("{e:#}");
            if message.contains("MiB left on the filesystem") {
                OpError::invalid(message)
            } else {
                OpError::writing(message, &scratch)
            }
        })?;
        phases.absorb(&built.phases);
        built.phases = phases;
        tracing::info!(
            size = built.size_bytes,
            content = built.content_bytes,
            "ext4 built"
        );
        Ok(built)
    });
    build
        .await
        .map_err(|e| OpError::internal(format!("flatten task: {e}")))?
}

fn flattener_in(staging: &Staging, limits: Limits) -> OpResult<Flattener> {
    let limits = Limits {
        min_free: limits.min_free.max(staging.keep_free()),
        ..limits
    };
    Ok(Flattener::new(&staging.root())?.with_limits(limits))
}

/// Whether a layer stopped for want of room where it was unpacking.
fn out_of_room(flattener: &Flattener, result: &Result<(), LayerFailure>) -> bool {
    match result {
        Err(LayerFailure::Entry(e)) => {
            flattener.ran_out_of_room() || e.reason.contains("os error 28")
        }
        _ => false,
    }
}

/// A layer that could not be applied, as the pull reports it.
fn layer_error(failure: LayerFailure, digest: &str, blobs: &BlobCache, scratch: &Path) -> OpError {
    match failure {
        LayerFailure::Digest { .. } => {
            blobs.evict(digest);
            OpError::bad_content(format!(
                "layer {digest}: {failure}; it was dropped from the cache, pull again"
            ))
        }
        LayerFailure::Entry(e) if e.reason.contains("os error 28") => {
            OpError::writing(format!("layer {digest}: {e}"), scratch)
        }
        LayerFailure::Entry(e)
            if e.reason.contains("MiB left on the filesystem")
                || e.reason.contains("limits.max_") =>
        {
            OpError::invalid(format!("layer {digest}: {}", e.reason))
        }
        LayerFailure::Entry(e) => {
            OpError::bad_content(format!("layer {digest}: refusing entry {e}"))
        }
        LayerFailure::Io(e) => OpError::internal(format!("layer {digest}: {e}")),
    }
}

/// One blob, from the cache or the registry, as an open file, and whether
/// its content is yet to be checked against its digest.
async fn fetch_blob(
    registry: Arc<Registry>,
    blobs: Arc<BlobCache>,
    desc: Descriptor,
    events: Events<PullEvent>,
    hook: Option<Arc<dyn Fn(String) -> BoxFuture<'static, ()> + Send + Sync>>,
) -> OpResult<(File, Check)> {
    let _lock = blobs.lock(&desc.digest).await;
    if let Some(file) = blobs.open(&desc.digest) {
        events.emit(&PullEvent::LayerDone {
            digest: desc.digest.clone(),
            cached: true,
        });
        return Ok((file, Check::Digest));
    }
    let total = desc.size.max(0) as u64;
    let mut writer = blobs.writer()?;
    let mut stream = registry.blob(&desc).await?;
    let mut last = Instant::now();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            // oci-client checks the digest as the stream ends.
            if e.to_string().to_lowercase().contains("digest") {
                OpError::bad_content(format!(
                    "blob {}: content does not match its digest ({e})",
                    desc.digest
                ))
            } else {
                OpError::registry(format!("downloading {}: {e}", desc.digest))
            }
        })?;
        let first = writer.written() == 0;
        writer.write(&chunk)?;
        if writer.written() > total {
            return Err(OpError::bad_content(format!(
                "blob {} is larger than the {total} bytes its manifest declares",
                desc.digest
            )));
        }
        if first {
            if let Some(hook) = &hook {
                hook(desc.digest.clone()).await;
            }
        }
        if last.elapsed() >= PROGRESS_EVERY {
            last = Instant::now();
            events.emit(&PullEvent::LayerProgress {
                digest: desc.digest.clone(),
                done: writer.written(),
                total,
            });
        }
    }
    let digest = desc.digest.clone();
    let file = tokio::task::spawn_blocking(move || writer.finish(&blobs, &digest, Some(total)))
        .await
        .map_err(|e| OpError::internal(e.to_string()))?
        .map_err(|why| OpError::bad_content(format!("blob {}: {why}", desc.digest)))?;
    events.emit(&PullEvent::LayerProgress {
        digest: desc.digest.clone(),
        done: total,
        total,
    });
    events.emit(&PullEvent::LayerDone {
        digest: desc.digest,
        cached: false,
    });
    Ok((file, Check::AlreadyVerified))
}

/// Refuses to reuse an image's name for a different reference.
pub(crate) fn name_free_for(
    existing: Option<&ImageInfo>,
    name: &str,
    whole: &str,
) -> Result<(), OpError> {
    match existing {
        Some(e) if e.r#ref != whole => Err(OpError::conflict(format!(
            "image name `{name}` is taken by {}; choose another with --name, or run `banger image rm {name}`",
            e.r#ref
        ))),
        _ => Ok(()),
    }
}

/// The existing image as the result, when it already is `digest` with its root file in place.
pub(crate) fn up_to_date(
    existing: Option<&ImageInfo>,
    digest: &str,
    events: &Events<PullEvent>,
) -> Option<PullResult> {
    let e = existing?;
    if e.digest != digest || !Path::new(&e.rootfs_path).is_file() {
        return None;
    }
    events.emit(&PullEvent::UpToDate {
        digest: e.digest.clone(),
    });
    Some(PullResult {
        image: e.clone(),
        up_to_date: true,
    })
}
