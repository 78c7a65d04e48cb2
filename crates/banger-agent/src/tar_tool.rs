//! `banger-tar`: the guest end of `banger vm cp` and of workspace syncs, run
//! from the agent's own binary so it works in images without tar.

use std::path::PathBuf;

pub fn main(args: Vec<String>) -> i32 {
    let result = match args.split_first() {
        Some((cmd, paths)) if cmd == "create" && !paths.is_empty() => {
            let paths: Vec<PathBuf> = paths.iter().map(PathBuf::from).collect();
            banger_treecopy::pack(&paths, std::io::stdout().lock())
        }
        Some((cmd, [dst])) if cmd == "extract" => {
            banger_treecopy::unpack(std::io::stdin().lock(), &PathBuf::from(dst), true).map(|_| ())
        }
        // A workspace sync: files to write and paths to remove, in one stream.
        Some((cmd, [dst])) if cmd == "sync" => {
            banger_treecopy::sync::apply(std::io::stdin().lock(), &PathBuf::from(dst)).map(|a| {
                println!("{} {}", a.written, a.removed);
            })
        }
        _ => {
            eprintln!(
                "usage: banger-tar create PATH… | banger-tar extract DST | banger-tar sync DST"
            );
            return 2;
        }
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("banger-tar: {e}");
            1
        }
    }
}
