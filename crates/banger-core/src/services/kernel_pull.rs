//! `kernel pull`: a kernel published as an OCI image (/boot/vmlinux* or
//! /boot/vmlinuz*, and /lib/modules/*) goes through the image pipeline, is
//! copied out of the flattened root filesystem, and imported like a file.

use std::path::{Path, PathBuf};

use banger_host::{CommandSpec, ProcessRunner};
use banger_proto::image::{PullEvent, PullParams as ImagePull};
use banger_proto::kernel::{ImportParams, KernelInfo, PullParams};

use crate::error::{OpError, OpResult};
use crate::events::Events;
use crate::ids;
use crate::paths::Paths;
use crate::services::images::ImageService;
use crate::services::kernels::KernelService;

pub async fn pull(
    images: &ImageService,
    kernels: &KernelService,
    runner: &dyn ProcessRunner,
    paths: &Paths,
    params: PullParams,
    events: Events<PullEvent>,
) -> OpResult<KernelInfo> {
    // A scratch image, removed whatever happens.
    let scratch_name = format!("kernel-pull-{}", ids::random_hex(6));
    let pulled = images
        .pull(
            ImagePull {
                reference: params.reference.clone(),
                name: Some(scratch_name.clone()),
                platform: None,
            },
            events,
        )
        .await?;
    let work = paths
        .tmp_dir()
        .join(format!("kernel-pull-{}", ids::random_hex(6)));
    let result =
        extract_and_import(kernels, runner, &pulled.image.rootfs_path, &work, &params).await;
    let _ = std::fs::remove_dir_all(&work);
    let _ = images.remove(&[scratch_name], true).await;
    result
}

async fn extract_and_import(
    kernels: &KernelService,
    runner: &dyn ProcessRunner,
    rootfs: &str,
    work: &Path,
    params: &PullParams,
) -> OpResult<KernelInfo> {
    std::fs::create_dir_all(work)?;
    // debugfs copies files out of the ext4 without mounting it (no privilege).
    for dir in ["/boot", "/lib/modules", "/usr/lib/modules"] {
        let dest = work.join(dir.trim_start_matches('/').replace('/', "_"));
        std::fs::create_dir_all(&dest)?;
        let _ = runner.run(
            &CommandSpec::new("debugfs")
                .arg("-R")
                .arg(format!("rdump {dir} {}", dest.display()))
                .arg(rootfs),
        );
    }
    let boot = work.join("boot/boot");
    let image = std::fs::read_dir(&boot)
        .map_err(|_| OpError::bad_content(format!("{} has no /boot directory", params.reference)))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            name.starts_with("vmlinux") || name.starts_with("vmlinuz")
        })
        .min()
        .ok_or_else(|| {
            OpError::bad_content(format!(
                "{} has no /boot/vmlinux* or /boot/vmlinuz*",
                params.reference
            ))
        })?;
    let modules = ["lib_modules/modules", "usr_lib_modules/modules"]
        .iter()
        .map(|d| work.join(d))
        .filter_map(|d| std::fs::read_dir(&d).ok())
        .flat_map(|rd| rd.flatten().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .min();
    kernels
        .import(ImportParams {
            path: abs(&image),
            name: params.name.clone(),
            modules: modules.map(|m| abs(&m)),
            default: params.default,
        })
        .await
}

fn abs(p: &Path) -> String {
    std::fs::canonicalize(p)
        .unwrap_or_else(|_| PathBuf::from(p))
        .display()
        .to_string()
}
