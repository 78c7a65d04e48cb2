//! `banger image …`.

use banger_proto::human_bytes;
use banger_proto::image::{NamesParams, PruneParams, PruneResult, PullParams};
use banger_proto::rpc::{m, NoParams};

use super::report;
use crate::cli::{CacheCommand, ImageCommand};
use crate::client::Client;
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
                    println!(
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
            crate::interrupt::note(&format!(
                "the daemon finishes pulling {reference} in the background (`banger image ls` \
                 shows it; `banger image rm NAME` removes it)"
            ));
            let mut progress = PullProgress::new();
            let params = PullParams {
                reference: reference.clone(),
                name,
                platform,
            };
            let result = client.call::<m::ImagePull>(params, |e| progress.handle(e));
            progress.finish();
            let r = match result {
                Ok(r) => r,
                Err(e) => return Ok(report(e)),
            };
            if json {
                super::println_json(&r)?;
            } else if r.up_to_date {
                println!("{} is up to date ({})", r.image.name, r.image.digest);
            } else {
                println!(
                    "pulled {} as `{}` ({}, rootfs {})",
                    r.image.r#ref,
                    r.image.name,
                    r.image.digest,
                    human_bytes(r.image.size_bytes)
                );
            }
            Ok(0)
        }
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
                    println!("{}", item.name);
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
                        i.vms.len().to_string(),
                        relative_time(&i.created_at),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(&["NAME", "REF", "DIGEST", "SIZE", "VMS", "CREATED"], &rows)
            );
            Ok(0)
        }
        ImageCommand::Inspect { names, .. } => {
            super::print_json::<m::ImageInspect>(client, NamesParams { names })
        }
        ImageCommand::Rm(args) => super::print_removed::<m::ImageRemove>(client, args),
        ImageCommand::Cache(CacheCommand::Prune { dry_run, json }) => {
            match client.call::<m::ImageCachePrune>(PruneParams { dry_run }, |_| {}) {
                Ok(r) => {
                    if json {
                        super::println_json(&r)?;
                    } else {
                        println!("{}", prune_line(&r));
                    }
                    Ok(0)
                }
                Err(e) => Ok(report(e)),
            }
        }
    }
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
