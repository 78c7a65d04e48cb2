//! `banger snapshot …`, and `banger vm snapshot|pause|resume`'s output.

use banger_proto::human_bytes;
use banger_proto::image::NamesParams;
use banger_proto::rpc::{m, NoParams};
use banger_proto::vm::{SnapshotParams, VmEvent};

use super::report;
use crate::cli::SnapshotCommand;
use crate::client::{CallError, Client};
use crate::output::{relative_time, table};

pub fn run(client: &Client, cmd: SnapshotCommand) -> anyhow::Result<i32> {
    match cmd {
        SnapshotCommand::Ls(flags) => {
            let snaps = match client.call::<m::SnapshotList>(NoParams {}, |_| {}) {
                Ok(v) => v,
                Err(e) => return Ok(report(e)),
            };
            if flags.json {
                super::println_json(&snaps)?;
                return Ok(0);
            }
            if flags.quiet {
                for item in &snaps {
                    outln!("{}", item.name);
                }
                return Ok(0);
            }
            let rows: Vec<Vec<String>> = snaps
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        s.vm.clone(),
                        s.image.clone(),
                        s.kernel.clone(),
                        s.vcpus.to_string(),
                        human_bytes(s.memory_mib << 20),
                        match (&s.template, s.memory) {
                            (Some(image), _) => format!("template of {image}"),
                            (None, true) => "memory+disks".into(),
                            (None, false) => "disks".into(),
                        },
                        human_bytes(s.size_bytes),
                        relative_time(&s.created_at),
                    ]
                })
                .collect();
            out!(
                "{}",
                table(
                    &[
                        "NAME", "VM", "IMAGE", "KERNEL", "CPUS", "MEMORY", "HOLDS", "SIZE",
                        "CREATED"
                    ],
                    &rows
                )
            );
            Ok(0)
        }
        SnapshotCommand::Inspect { names, .. } => {
            super::print_json::<m::SnapshotInspect>(client, NamesParams { names })
        }
        SnapshotCommand::Rm(args) => super::print_removed::<m::SnapshotRemove>(client, args),
    }
}

/// `vm snapshot NAME SNAP [--stop]`, with its steps on stderr.
pub fn take(
    client: &Client,
    name: String,
    snapshot: String,
    stop: bool,
    json: bool,
) -> anyhow::Result<i32> {
    let params = SnapshotParams {
        name: name.clone(),
        snapshot,
        stop,
    };
    let shown = crate::output::progress_shown();
    let progress = |event: VmEvent| {
        if !shown {
            return;
        }
        if let VmEvent::Step { step, n, of } = event {
            let what = match step.as_str() {
                "hold" => "holding the guest agent",
                "memory" => "saving memory and devices",
                "disks" => "copying disks",
                "resume" => "resuming",
                other => other,
            };
            eprintln!("{name}: {what} ({n}/{of})");
        }
    };
    match client.call::<m::VmSnapshot>(params, progress) {
        Ok(info) if json => {
            super::println_json(&info)?;
            Ok(0)
        }
        Ok(info) => {
            outln!(
                "snapshot {} of {} ({}, {}); `banger vm restore {} {}` goes back to it, \
                 `banger vm run NEW --from {}` forks it",
                info.name,
                info.vm,
                if info.memory {
                    "memory and disks"
                } else {
                    "disks only"
                },
                human_bytes(info.size_bytes),
                info.vm,
                info.name,
                info.name
            );
            Ok(0)
        }
        Err(e) => Ok(report(e)),
    }
}

/// A VM command's result: the VM as JSON, or one line.
pub fn said(
    result: Result<banger_proto::vm::VmInfo, CallError>,
    json: bool,
    line: impl FnOnce() -> String,
) -> anyhow::Result<i32> {
    match result {
        Ok(info) if json => {
            super::println_json(&info)?;
            Ok(0)
        }
        Ok(_) => {
            outln!("{}", line());
            Ok(0)
        }
        Err(e) => Ok(report(e)),
    }
}
