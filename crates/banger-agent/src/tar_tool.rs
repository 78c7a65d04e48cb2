//! `banger-tar`: the guest end of `banger vm cp` and of workspace syncs, run
//! from the agent's own binary so it works in images without tar. The
//! workspace commands (`sync`, `list`, `send`) also run inside the agent
//! itself, sparing a process start on every sync (see `builtin`).

use std::io::{Read, Write};
use std::path::PathBuf;

use banger_treecopy::sync::{self, ApplyOptions, Item};

const USAGE: &str = "usage: banger-tar create PATH… | extract DST | sync DST [--owner USER] | list DIR | send DIR (paths on stdin, NUL-separated) | stats PATH…";

pub fn main(args: Vec<String>) -> i32 {
    run(
        &args,
        std::io::stdin().lock(),
        std::io::stdout().lock(),
        std::io::stderr().lock(),
    )
}

/// Whether `args` is a workspace command (or `stats`, polled every second
/// by `vm stats --watch`), which the agent may run in-process.
pub fn builtin(args: &[String]) -> bool {
    matches!(
        args.first().map(String::as_str),
        Some("sync" | "list" | "send" | "stats")
    )
}

pub fn run(args: &[String], input: impl Read, mut out: impl Write, mut err: impl Write) -> i32 {
    let result = match args.split_first() {
        Some((cmd, paths)) if cmd == "create" && !paths.is_empty() => {
            let paths: Vec<PathBuf> = paths.iter().map(PathBuf::from).collect();
            banger_treecopy::pack(&paths, &mut out)
        }
        Some((cmd, [dst])) if cmd == "extract" => {
            banger_treecopy::unpack(input, &PathBuf::from(dst), true).map(|_| ())
        }
        // Files to write and paths to remove, in one stream; one line of
        // JSON per entry says what became of it.
        Some((cmd, rest)) if cmd == "sync" => match sync_args(rest) {
            Ok((dst, options)) => sync::apply(input, &dst, &options)
                .and_then(|outcomes| json_lines(&mut out, &outcomes)),
            Err(e) => Err(std::io::Error::other(e)),
        },
        // The tree under DIR, one JSON line per file or link.
        Some((cmd, [dir])) if cmd == "list" => banger_treecopy::stat::list(&PathBuf::from(dir))
            .and_then(|stats| json_lines(&mut out, &stats)),
        // The named paths under DIR as a sync stream (guest to host).
        Some((cmd, [dir])) if cmd == "send" => {
            let mut names = Vec::new();
            let mut input = input;
            input.read_to_end(&mut names).and_then(|_| {
                let items: Vec<Item> = names
                    .split(|b| *b == 0)
                    .filter(|p| !p.is_empty())
                    .map(|p| Item::write(String::from_utf8_lossy(p), None))
                    .collect();
                sync::pack(
                    &PathBuf::from(dir),
                    &items,
                    std::io::BufWriter::new(&mut out),
                )
            })
        }
        // The guest's memory, load and the filesystems at PATH… (`vm stats`).
        Some((cmd, paths)) if cmd == "stats" => {
            crate::guest_stats::read(paths).and_then(|stats| json_lines(&mut out, &[stats]))
        }
        _ => {
            let _ = writeln!(err, "{USAGE}");
            return 2;
        }
    };
    match result {
        Ok(()) => 0,
        // Said as every banger failure is (`error:`), with banger's own
        // exit code: the user sees this through `vm cp`, not the tool.
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            banger_proto::agent::exit::BANGER_FAILED as i32
        }
    }
}

/// One line of JSON per item, in one buffer: each write to the pipe is a
/// message to the host, and serde_json writes token by token.
fn json_lines<T: serde::Serialize>(out: &mut impl Write, items: &[T]) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::with_capacity(64 << 10, out);
    for item in items {
        serde_json::to_writer(&mut out, item)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

fn sync_args(rest: &[String]) -> Result<(PathBuf, ApplyOptions), String> {
    match rest {
        [dst] => Ok((dst.into(), ApplyOptions::default())),
        [dst, flag, user] if flag == "--owner" => {
            let acct = crate::exec::account(Some(user))?;
            let owner = (acct.uid != 0 || acct.gid != 0).then_some((acct.uid, acct.gid));
            Ok((dst.into(), ApplyOptions { owner, only: None }))
        }
        _ => Err(USAGE.into()),
    }
}
