//! A VM's serial console log: capped in size, rotated once, and read from
//! its end, so a guest that prints without pause costs a bounded amount of
//! disk and `vm logs --tail` costs the tail, not the file.
//!
//! The VMM appends to `console.log` (opened with O_APPEND), so the daemon can
//! move its content to `console.log.1` and truncate it while the VM runs:
//! the VMM's next write lands at the new end.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Past this, `console.log` is moved to `console.log.1` (replacing it).
pub const CONSOLE_MAX: u64 = 8 << 20;
/// The most `--tail` returns, however long the lines.
const TAIL_MAX: u64 = 4 << 20;
/// Read size when scanning backwards or streaming.
pub const CHUNK: usize = 64 * 1024;

pub fn path(dir: &Path) -> PathBuf {
    dir.join("console.log")
}

fn rotated(dir: &Path) -> PathBuf {
    dir.join("console.log.1")
}

/// Moves a log grown past [`CONSOLE_MAX`] aside. Lines the VMM writes while
/// the copy runs may be lost; the log is a console, not an audit trail.
pub fn rotate_if_big(dir: &Path) -> io::Result<bool> {
    let log = path(dir);
    if std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0) <= CONSOLE_MAX {
        return Ok(false);
    }
    let tmp = dir.join("console.log.1.tmp");
    std::fs::copy(&log, &tmp)?;
    std::fs::rename(&tmp, rotated(dir))?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)?
        .set_len(0)?;
    Ok(true)
}

/// The files that hold the log, oldest first.
fn parts(dir: &Path) -> Vec<PathBuf> {
    [rotated(dir), path(dir)]
        .into_iter()
        .filter(|p| p.is_file())
        .collect()
}

/// The last `n` lines (at most [`TAIL_MAX`] bytes), read backwards from the
/// end of the log and, if needed, of the rotated part.
pub fn tail(dir: &Path, n: usize) -> io::Result<Vec<u8>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let mut out: Vec<u8> = Vec::new();
    let mut newlines = 0;
    // The log's very last byte: a newline there ends the last line rather
    // than starting one.
    let mut last_byte = true;
    for part in parts(dir).iter().rev() {
        let mut file = File::open(part)?;
        let mut end = file.metadata()?.len();
        while end > 0 {
            let start = end.saturating_sub(CHUNK as u64);
            let mut buf = vec![0u8; (end - start) as usize];
            file.seek(SeekFrom::Start(start))?;
            file.read_exact(&mut buf)?;
            for i in (0..buf.len()).rev() {
                let counts = buf[i] == b'\n' && !last_byte;
                last_byte = false;
                if counts {
                    newlines += 1;
                    if newlines >= n {
                        let mut kept = buf[i + 1..].to_vec();
                        kept.extend_from_slice(&out);
                        return Ok(kept);
                    }
                }
            }
            let mut joined = buf;
            joined.extend_from_slice(&out);
            out = joined;
            if out.len() as u64 >= TAIL_MAX {
                let cut = out.len() - TAIL_MAX as usize;
                return Ok(out.split_off(cut));
            }
            end = start;
        }
    }
    Ok(out)
}

/// The whole log, oldest first, chunk by chunk.
pub fn chunks(dir: &Path) -> Chunks {
    Chunks {
        parts: parts(dir).into_iter().rev().collect(),
        file: None,
    }
}

pub struct Chunks {
    /// Still to read, last first.
    parts: Vec<PathBuf>,
    file: Option<File>,
}

impl Iterator for Chunks {
    type Item = io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.file.is_none() {
                match File::open(self.parts.pop()?) {
                    Ok(f) => self.file = Some(f),
                    Err(e) => return Some(Err(e)),
                }
            }
            let mut buf = vec![0u8; CHUNK];
            match self.file.as_mut()?.read(&mut buf) {
                Ok(0) => self.file = None,
                Ok(n) => {
                    buf.truncate(n);
                    return Some(Ok(buf));
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_read_backwards_across_the_rotation() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(rotated(dir.path()), "a\nb\nc\n").unwrap();
        std::fs::write(path(dir.path()), "d\ne\n").unwrap();
        assert_eq!(tail(dir.path(), 1).unwrap(), b"e\n");
        assert_eq!(tail(dir.path(), 2).unwrap(), b"d\ne\n");
        assert_eq!(tail(dir.path(), 4).unwrap(), b"b\nc\nd\ne\n");
        assert_eq!(tail(dir.path(), 100).unwrap(), b"a\nb\nc\nd\ne\n");
        std::fs::write(path(dir.path()), "d\nno newline").unwrap();
        assert_eq!(tail(dir.path(), 1).unwrap(), b"no newline");
    }

    #[test]
    fn a_big_log_is_rotated_and_the_tail_costs_little() {
        let dir = tempfile::tempdir().unwrap();
        let line = "x".repeat(99) + "\n";
        let big = line.repeat((CONSOLE_MAX as usize / 100) + 1000) + "last\n";
        std::fs::write(path(dir.path()), &big).unwrap();
        assert!(rotate_if_big(dir.path()).unwrap());
        assert_eq!(std::fs::metadata(path(dir.path())).unwrap().len(), 0);
        assert_eq!(tail(dir.path(), 1).unwrap(), b"last\n");
        assert!(!rotate_if_big(dir.path()).unwrap());
        let total: usize = chunks(dir.path()).map(|c| c.unwrap().len()).sum();
        assert_eq!(total, big.len());
    }
}
