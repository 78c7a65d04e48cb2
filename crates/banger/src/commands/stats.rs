//! `banger vm stats [NAME…] [--watch] [--json]`.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use banger_proto::human_bytes;
use banger_proto::rpc::m;
use banger_proto::vm::{DiskStats, StatsParams, VmStats};

use super::report;
use crate::client::Client;
use crate::output::table;

pub fn run(client: &Client, names: Vec<String>, watch: bool, json: bool) -> anyhow::Result<i32> {
    let tty = std::io::stdout().is_terminal();
    loop {
        let round = Instant::now();
        let params = StatsParams {
            names: names.clone(),
        };
        let stats = match client.call::<m::VmStats>(params, |_| {}) {
            Ok(s) => s,
            Err(e) => return Ok(report(e)),
        };
        let mut out = std::io::stdout().lock();
        if json && watch {
            writeln!(out, "{}", serde_json::to_string(&stats)?)?;
        } else if json {
            drop(out);
            super::println_json(&stats)?;
        } else {
            if watch && tty {
                // Home and clear: the table redrawn in place, as `docker stats`.
                write!(out, "\x1b[H\x1b[2J")?;
            }
            write!(out, "{}", render(&stats))?;
        }
        if !watch {
            return Ok(0);
        }
        let _ = std::io::stdout().flush();
        std::thread::sleep(Duration::from_secs(1).saturating_sub(round.elapsed()));
    }
}

fn render(stats: &[VmStats]) -> String {
    let rows: Vec<Vec<String>> = stats
        .iter()
        .map(|s| {
            let dash = || "-".to_string();
            vec![
                s.name.clone(),
                s.state.to_string(),
                s.cpu_percent
                    .map(|c| format!("{c:.1}%"))
                    .unwrap_or_else(dash),
                s.guest_memory
                    .map(|m| {
                        format!(
                            "{} / {}",
                            human_bytes(m.used_bytes),
                            human_bytes(m.total_bytes)
                        )
                    })
                    .unwrap_or_else(dash),
                s.vmm_rss_bytes.map(human_bytes).unwrap_or_else(dash),
                s.load
                    .map(|l| format!("{:.2} {:.2} {:.2}", l[0], l[1], l[2]))
                    .unwrap_or_else(dash),
                disk(s.disks.iter().find(|d| d.disk == "root")),
                disk(s.disks.iter().find(|d| d.disk == "work")),
                s.net
                    .map(|n| format!("{} / {}", human_bytes(n.rx_bytes), human_bytes(n.tx_bytes)))
                    .unwrap_or_else(dash),
                s.uptime_secs.map(uptime).unwrap_or_else(dash),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "STATE",
            "CPU",
            "MEM USED",
            "VMM RSS",
            "LOAD",
            "ROOT",
            "WORK",
            "NET RX/TX",
            "UPTIME",
        ],
        &rows,
    )
}

/// `used / size (allocated on the host)`; the guest's figures only while it runs.
fn disk(d: Option<&DiskStats>) -> String {
    let Some(d) = d else {
        return "-".into();
    };
    match (d.fs_used_bytes, d.fs_total_bytes) {
        (Some(used), Some(total)) => format!(
            "{} / {} ({} on host)",
            human_bytes(used),
            human_bytes(total),
            human_bytes(d.allocated_bytes)
        ),
        _ => format!(
            "{} ({} on host)",
            human_bytes(d.size_bytes),
            human_bytes(d.allocated_bytes)
        ),
    }
}

fn uptime(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{}s", secs / 60, secs % 60),
        3600..=86_399 => format!("{}h{}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{}h", secs / 86_400, secs % 86_400 / 3600),
    }
}
