//! `banger image …`.

use banger_proto::image::{ImageInfo, PruneResult, PullResult};
use banger_proto::{human_bytes, methods};
use serde_json::json;

use super::report;
use crate::cli::{CacheCommand, ImageCommand};
use crate::client::Client;
use crate::output::{relative_time, table};
use crate::progress::PullProgress;

pub fn run(client: &Client, cmd: ImageCommand) -> anyhow::Result<i32> {
    match cmd {
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
            let params = json!({ "reference": reference, "name": name, "platform": platform });
            let result = client.call(methods::IMAGE_PULL, params, |e| progress.handle(e));
            progress.finish();
            let value = match result {
                Ok(v) => v,
                Err(e) => return Ok(report(e)),
            };
            let r: PullResult = serde_json::from_value(value.clone())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
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
            let value = match client.call(methods::IMAGE_LIST, json!({}), |_| {}) {
                Ok(v) => v,
                Err(e) => return Ok(report(e)),
            };
            if flags.json {
                println!("{}", serde_json::to_string_pretty(&value)?);
                return Ok(0);
            }
            let images: Vec<ImageInfo> = serde_json::from_value(value)?;
            let rows: Vec<Vec<String>> = images
                .iter()
                .map(|i| {
                    vec![
                        i.name.clone(),
                        i.r#ref.clone(),
                        banger_core::oci::digest::short(&i.digest).to_string(),
                        human_bytes(i.size_bytes),
                        relative_time(&i.created_at),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(&["NAME", "REF", "DIGEST", "SIZE", "CREATED"], &rows)
            );
            Ok(0)
        }
        ImageCommand::Inspect { names, .. } => {
            super::print_json(client, methods::IMAGE_INSPECT, json!({ "names": names }))
        }
        ImageCommand::Rm { names, force } => {
            super::print_removed(client, methods::IMAGE_REMOVE, &names, force)
        }
        ImageCommand::Cache(CacheCommand::Prune { dry_run, json }) => {
            match client.call(
                methods::IMAGE_CACHE_PRUNE,
                json!({ "dry_run": dry_run }),
                |_| {},
            ) {
                Ok(v) => {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&v)?);
                    } else {
                        let r: PruneResult = serde_json::from_value(v)?;
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
