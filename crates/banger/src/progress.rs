//! Pull progress: one bar per layer on a terminal; nothing otherwise (a
//! script's stderr gets results and errors only).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Instant;

use banger_proto::human_bytes;
use banger_proto::image::PullEvent;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct PullProgress {
    tty: bool,
    /// Not a terminal, but asked for (`BANGER_PROGRESS=always`): lines.
    plain: bool,
    multi: MultiProgress,
    bars: HashMap<String, ProgressBar>,
    started: Instant,
    cached: usize,
    verb: &'static str,
}

impl PullProgress {
    pub fn new() -> PullProgress {
        let tty = std::io::stderr().is_terminal();
        let target = if tty {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        PullProgress {
            tty,
            plain: !tty && crate::output::progress_shown(),
            multi: MultiProgress::with_draw_target(target),
            bars: HashMap::new(),
            started: Instant::now(),
            cached: 0,
            verb: "pulling",
        }
    }

    /// The same display for `image import`.
    pub fn importing() -> PullProgress {
        PullProgress {
            verb: "importing",
            ..PullProgress::new()
        }
    }

    pub fn handle(&mut self, event: PullEvent) {
        match event {
            PullEvent::Resolved {
                r#ref,
                digest,
                layers,
            } => {
                let total: u64 = layers.iter().map(|l| l.size).sum();
                let line = format!(
                    "{} {} ({}, {} layer(s), {})",
                    self.verb,
                    r#ref,
                    short(&digest),
                    layers.len(),
                    human_bytes(total)
                );
                if self.tty {
                    let _ = self.multi.println(line);
                    let style = ProgressStyle::with_template(
                        "{prefix:.bold} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}",
                    )
                    .expect("valid template")
                    .progress_chars("=> ");
                    for layer in layers {
                        let bar = self.multi.add(ProgressBar::new(layer.size));
                        bar.set_style(style.clone());
                        bar.set_prefix(short(&layer.digest).to_string());
                        self.bars.insert(layer.digest, bar);
                    }
                } else if self.plain {
                    eprintln!("{line}");
                }
            }
            PullEvent::LayerProgress { digest, done, .. } => {
                if let Some(bar) = self.bars.get(&digest) {
                    bar.set_position(done);
                }
            }
            PullEvent::LayerDone { digest, cached } => {
                if cached {
                    self.cached += 1;
                }
                if let Some(bar) = self.bars.get(&digest) {
                    bar.set_position(bar.length().unwrap_or(0));
                    bar.finish();
                }
            }
            PullEvent::Step { step } => {
                let line = match step.as_str() {
                    "flatten" => "layers flattened; building the ext4 root filesystem".to_string(),
                    "ext4" => return,
                    other => other.to_string(),
                };
                let detail = if self.cached > 0 {
                    format!(", {} layer(s) from cache", self.cached)
                } else {
                    String::new()
                };
                let line = format!(
                    "downloaded in {:.1}s{detail}; {line}",
                    self.started.elapsed().as_secs_f64()
                );
                if self.tty {
                    let _ = self.multi.println(line);
                } else if self.plain {
                    eprintln!("{line}");
                }
            }
            PullEvent::UpToDate { .. } => {}
        }
    }

    pub fn finish(&self) {
        let _ = self.multi.clear();
    }
}

fn short(digest: &str) -> &str {
    banger_core::oci::digest::short(digest)
}
