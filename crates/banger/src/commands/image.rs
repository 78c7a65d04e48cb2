//! `banger image …`.

use banger_proto::human_bytes;
use banger_proto::image::{NamesParams, PruneParams, PruneResult, PullParams, PullResult};
use banger_proto::rpc::{m, NoParams};

use super::report;
use crate::cli::{CacheCommand, ImageCommand, PullPolicy};
use crate::client::{CallError, Client};
use crate::output::{relative_time, table};
use crate::progress::PullProgress;

pub fn run(client: &Client, cmd: ImageCommand) -> anyhow::Result<i32> {
    match cmd {
        ImageCommand::Warm {
            image,
            kernel,
            vcpus,
            memory,
            json,
        } => {
            let memory_mib = memory
                .as_deref()
                .map(crate::output::parse_size)
                .transpose()
                .map_err(anyhow::Error::msg)?
                .map(|b| b >> 20);
            let params = banger_proto::vm::WarmParams {
                image: image.clone(),
                kernel,
                vcpus,
                memory_mib,
            };
            let progress = super::vm::boot_progress(&image);
            match client.call::<m::ImageWarm>(params, progress) {
                Ok(info) if json => super::println_json(&info).map(|_| 0),
                Ok(info) => {
                    outln!(
                        "{image} is warm: `banger vm run NAME --image {image}` with {} vCPUs and \
                         {} forks template {} ({}) instead of booting",
                        info.vcpus,
                        banger_proto::human_bytes(info.memory_mib << 20),
                        info.name,
                        banger_proto::human_bytes(info.size_bytes)
                    );
                    Ok(0)
                }
                Err(e) => Ok(report(e)),
            }
        }
        ImageCommand::Pull {
            reference,
            name,
            platform,
            json,
        } => {
            let params = PullParams {
                reference,
                name,
                platform,
            };
            let r = match pull(client, params) {
                Ok(r) => r,
                Err(e) => return Ok(report(e)),
            };
            if json {
                super::println_json(&r)?;
            } else {
                outln!("{}", pulled_line(&r));
            }
            Ok(0)
        }
        ImageCommand::Import {
            path,
            name,
            platform,
            json,
        } => import(client, &path, name, platform, json),
        ImageCommand::Ls(flags) => {
            let images = match client.call::<m::ImageList>(NoParams {}, |_| {}) {
                Ok(v) => v,
                Err(e) => return Ok(report(e)),
            };
            if flags.json {
                super::println_json(&images)?;
                return Ok(0);
            }
            if flags.quiet {
                for item in &images {
                    outln!("{}", item.name);
                }
                return Ok(0);
            }
            let rows: Vec<Vec<String>> = images
                .iter()
                .map(|i| {
                    vec![
                        i.name.clone(),
                        i.r#ref.clone(),
                        banger_core::oci::digest::short(&i.digest).to_string(),
                        human_bytes(i.size_bytes),
                        users(&i.vms),
                        relative_time(&i.created_at),
                    ]
                })
                .collect();
            out!(
                "{}",
                table(
                    &["NAME", "REF", "DIGEST", "SIZE", "USED BY", "CREATED"],
                    &rows
                )
            );
            Ok(0)
        }
        ImageCommand::Inspect { names, .. } => {
            super::print_json::<m::ImageInspect>(client, NamesParams { names })
        }
        ImageCommand::Rm(args) => super::print_removed::<m::ImageRemove>(client, args),
        ImageCommand::Prune { dry_run, json } => prune(client, dry_run, json),
        ImageCommand::Cache(CacheCommand::Prune { dry_run, json }) => {
            match client.call::<m::ImageCachePrune>(PruneParams { dry_run }, |_| {}) {
                Ok(r) => {
                    if json {
                        super::println_json(&r)?;
                    } else {
                        outln!("{}", prune_line(&r));
                    }
                    Ok(0)
                }
                Err(e) => Ok(report(e)),
            }
        }
    }
}

/// The VMs using an image, as a column: a few names, then a count.
fn users(vms: &[String]) -> String {
    match vms.len() {
        0 => "-".into(),
        1..=3 => vms.join(","),
        n => format!("{},… ({n})", vms[..2].join(",")),
    }
}

/// `image prune`: images that no VM and no snapshot (other than the
/// image's own warm templates) uses. The daemon still refuses an image a
/// VM took meanwhile.
fn prune(client: &Client, dry_run: bool, json: bool) -> anyhow::Result<i32> {
    let listed = client
        .call::<m::ImageList>(NoParams {}, |_| {})
        .and_then(|images| {
            let snaps = client.call::<m::SnapshotList>(NoParams {}, |_| {})?;
            Ok((images, snaps))
        });
    let (images, snaps) = match listed {
        Ok(v) => v,
        Err(e) => return Ok(report(e)),
    };
    let unused: Vec<String> = images
        .into_iter()
        .filter(|i| i.vms.is_empty())
        .filter(|i| {
            !snaps
                .iter()
                .any(|s| s.image == i.name && s.template.is_none())
        })
        .map(|i| i.name)
        .collect();
    let code = super::prune::<m::ImageRemove>(client, "unused", &unused, dry_run, json)?;
    if unused.is_empty() && !json {
        eprintln!("banger: every image is in use");
    }
    Ok(code)
}

/// `image import PATH|-`. Standard input is first written to a file in
/// banger's scratch directory (the daemon reads an archive twice: its
/// index, then the layers), removed however the import ends.
fn import(
    client: &Client,
    path: &str,
    name: Option<String>,
    platform: Option<String>,
    json: bool,
) -> anyhow::Result<i32> {
    let mut spooled = None;
    let path = if path == "-" {
        // A daemon first: one starting now would clear its scratch directory.
        if let Err(e) = client.call::<m::DaemonStatus>(NoParams {}, |_| {}) {
            return Ok(report(e));
        }
        let paths = banger_core::paths::Paths::from_env();
        std::fs::create_dir_all(paths.tmp_dir())?;
        let file = paths
            .tmp_dir()
            .join(format!("import-stdin-{}.tar", std::process::id()));
        let spool = Spool(file.clone());
        let mut out = std::fs::File::create(&file)?;
        let copied = std::io::copy(&mut std::io::stdin().lock(), &mut out)?;
        if copied == 0 {
            anyhow::bail!("nothing on stdin: pipe an archive in (`podman save IMAGE | banger image import -`)");
        }
        spooled = Some(spool);
        file.display().to_string()
    } else {
        client.daemon_path("archive", std::path::Path::new(path), true)?
    };
    crate::interrupt::note(
        "the daemon finishes the import in the background (`banger image ls` shows it; \
         `banger image rm NAME` removes it)",
    );
    let params = banger_proto::image::ImageImportParams {
        path,
        name,
        platform,
    };
    let mut progress = PullProgress::importing();
    let result = client.call::<m::ImageImport>(params, |e| progress.handle(e));
    progress.finish();
    drop(spooled);
    match result {
        Ok(r) if json => super::println_json(&r).map(|()| 0),
        Ok(r) if r.up_to_date => {
            outln!("{} is up to date ({})", r.image.name, r.image.digest);
            Ok(0)
        }
        Ok(r) => {
            outln!(
                "imported `{}` ({}, rootfs {})",
                r.image.name,
                r.image.digest,
                human_bytes(r.image.size_bytes)
            );
            Ok(0)
        }
        Err(e) => Ok(report(e)),
    }
}

/// A spooled stdin archive, removed when dropped.
struct Spool(std::path::PathBuf);

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `image.pull` with its progress on stderr.
pub fn pull(client: &Client, params: PullParams) -> Result<PullResult, CallError> {
    crate::interrupt::note(&format!(
        "the daemon finishes pulling {} in the background (`banger image ls` shows it; \
         `banger image rm NAME` removes it)",
        params.reference
    ));
    let mut progress = PullProgress::new();
    let result = client.call::<m::ImagePull>(params, |e| progress.handle(e));
    progress.finish();
    result
}

pub fn pulled_line(r: &PullResult) -> String {
    if r.up_to_date {
        format!("{} is up to date ({})", r.image.name, r.image.digest)
    } else {
        format!(
            "pulled {} as `{}` ({}, rootfs {})",
            r.image.r#ref,
            r.image.name,
            r.image.digest,
            human_bytes(r.image.size_bytes)
        )
    }
}

/// The local image `vm run --image IMAGE --pull WHEN` boots, pulled first
/// when WHEN asks for it: an image is local when its name or its
/// reference (normalised: `alpine` is `docker.io/library/alpine:latest`)
/// is IMAGE. `always` pulls the local image's own reference again.
pub fn for_vm(client: &Client, image: &str, when: PullPolicy) -> Result<String, CallError> {
    if when == PullPolicy::Never {
        return Ok(image.to_string());
    }
    let whole = banger_core::oci::reference::parse(image)
        .ok()
        .map(|r| r.whole());
    let local = client
        .call::<m::ImageList>(NoParams {}, |_| {})?
        .into_iter()
        .find(|i| i.name == image || Some(&i.r#ref) == whole.as_ref());
    let params = match (local, when) {
        (Some(found), PullPolicy::Missing) => return Ok(found.name),
        (Some(found), _) => PullParams {
            reference: found.r#ref,
            name: Some(found.name),
            platform: None,
        },
        (None, _) => {
            eprintln!("banger: no local image `{image}`; pulling it");
            PullParams {
                reference: image.to_string(),
                name: None,
                platform: None,
            }
        }
    };
    let r = pull(client, params)?;
    eprintln!("{}", pulled_line(&r));
    Ok(r.image.name)
}

pub fn prune_line(r: &PruneResult) -> String {
    let verb = if r.dry_run { "would free" } else { "freed" };
    format!(
        "{verb} {} across {} blob(s) in {}",
        human_bytes(r.bytes_freed),
        r.blobs_freed,
        r.cache_dir
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_lines_match_the_documented_shape() {
        let mut r = PruneResult {
            bytes_freed: 1288490189,
            blobs_freed: 47,
            dry_run: false,
            cache_dir: "/var/cache/banger/oci".into(),
        };
        assert_eq!(
            prune_line(&r),
            "freed 1.2 GiB across 47 blob(s) in /var/cache/banger/oci"
        );
        r.dry_run = true;
        assert_eq!(
            prune_line(&r),
            "would free 1.2 GiB across 47 blob(s) in /var/cache/banger/oci"
        );
    }
}
