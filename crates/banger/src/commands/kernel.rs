//! `banger kernel …`.

use banger_proto::human_bytes;
use banger_proto::image::NamesParams;
use banger_proto::kernel::{ImportParams, PullParams};
use banger_proto::rpc::{m, NoParams};

use super::report;
use crate::cli::KernelCommand;
use crate::client::Client;
use crate::output::{relative_time, table};

pub fn run(client: &Client, cmd: KernelCommand) -> anyhow::Result<i32> {
    match cmd {
        KernelCommand::Import {
            path,
            name,
            modules,
            default,
            json,
        } => {
            let modules = modules
                .as_deref()
                .map(|m| client.daemon_path("--modules", m, true))
                .transpose()?;
            let params = ImportParams {
                path: client.daemon_path("kernel", &path, true)?,
                name,
                modules,
                default,
            };
            if crate::output::progress_shown() {
                eprintln!("importing {} …", path.display());
            }
            crate::interrupt::note(
                "the daemon finishes the import in the background (`banger kernel ls` shows it; \
                 `banger kernel rm NAME` removes it)",
            );
            match client.call::<m::KernelImport>(params, |_| {}) {
                Ok(k) => {
                    if json {
                        super::println_json(&k)?;
                    } else {
                        let default = if k.default { ", default" } else { "" };
                        outln!(
                            "imported kernel `{}` ({}, {}{default})",
                            k.name,
                            k.version,
                            k.source
                        );
                    }
                    Ok(0)
                }
                Err(e) => Ok(report(e)),
            }
        }
        KernelCommand::Pull {
            reference,
            name,
            default,
            json,
        } => {
            crate::interrupt::note(&format!(
                "the daemon finishes pulling {reference} in the background (`banger kernel ls` \
                 shows it; `banger kernel rm NAME` removes it)"
            ));
            let mut progress = crate::progress::PullProgress::new();
            let params = PullParams {
                reference: reference.clone(),
                name,
                default,
            };
            let result = client.call::<m::KernelPull>(params, |e| progress.handle(e));
            progress.finish();
            match result {
                Ok(k) => {
                    if json {
                        super::println_json(&k)?;
                    } else {
                        outln!("pulled kernel `{}` ({})", k.name, k.version);
                    }
                    Ok(0)
                }
                Err(e) => Ok(report(e)),
            }
        }
        KernelCommand::Ls(flags) => {
            let kernels = match client.call::<m::KernelList>(NoParams {}, |_| {}) {
                Ok(v) => v,
                Err(e) => return Ok(report(e)),
            };
            if flags.json {
                super::println_json(&kernels)?;
                return Ok(0);
            }
            if flags.quiet {
                for item in &kernels {
                    outln!("{}", item.name);
                }
                return Ok(0);
            }
            let rows: Vec<Vec<String>> = kernels
                .iter()
                .map(|k| {
                    vec![
                        k.name.clone(),
                        k.version.clone(),
                        k.source.clone(),
                        if k.default {
                            "yes".into()
                        } else {
                            String::new()
                        },
                        human_bytes(k.size_bytes),
                        relative_time(&k.created_at),
                    ]
                })
                .collect();
            out!(
                "{}",
                table(
                    &["NAME", "VERSION", "SOURCE", "DEFAULT", "SIZE", "CREATED"],
                    &rows
                )
            );
            Ok(0)
        }
        KernelCommand::Inspect { names, .. } => {
            super::print_json::<m::KernelInspect>(client, NamesParams { names })
        }
        KernelCommand::Rm(args) => super::print_removed::<m::KernelRemove>(client, args),
    }
}
