//! What a failed boot tells the user: the stage, why, and the end of this
//! boot's console (and of the VMM's own log), found by the marker every
//! boot writes first.

use std::path::Path;

use crate::error::OpError;
use crate::store::VmRecord;

/// Marks the start of this boot's lines in the console log.
pub fn mark_boot(console: &Path) {
    append_marker(
        console,
        &format!("{BOOT_MARKER}{} ---", crate::ids::now_rfc3339()),
    );
}

fn append_marker(path: &Path, line: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    let mut out = lines[start..].join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out
}

/// A boot that failed after launch: the stage, why, and the end of the
/// serial console (and of the VMM's own log) so the cause is on screen.
pub fn boot_failed(vm: &VmRecord, stage: &str, message: impl std::fmt::Display) -> OpError {
    let dir = Path::new(&vm.dir);
    let mut tail = tail_lines(&dir.join("console.log"), 20);
    let vmm_log = tail_lines(&dir.join("vmm.log"), 10);
    if !vmm_log.trim().is_empty() {
        tail.push_str(&format!("--- {} said ---\n{vmm_log}", vm.vmm));
    }
    let name = &vm.name;
    OpError::internal(format!(
        "VM `{name}` failed to boot at stage `{stage}`: {message}\n--- last console lines ---\n{tail}\n--- (all of it: `banger vm logs {name}`)"
    ))
}

/// The last `n` lines of a log, read from its end (a console log may be
/// huge), and only of the latest boot: older boots' lines would point at
/// the wrong cause.
fn tail_lines(path: &Path, n: usize) -> String {
    let text = read_end(path, TAIL_BYTES);
    let text = String::from_utf8_lossy(&text);
    let this_boot = match text.rfind(BOOT_MARKER) {
        Some(at) => &text[at..],
        None => &text,
    };
    last_lines(this_boot, n)
}

/// What a boot failure shows of the logs, at most.
const TAIL_BYTES: u64 = 64 * 1024;
/// Opens every boot's lines in the console log.
const BOOT_MARKER: &str = "--- banger: boot at ";

/// At most the last `limit` bytes of a file.
fn read_end(path: &Path, limit: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(limit)));
    let mut out = Vec::new();
    let _ = file.take(limit).read_to_end(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_boot_failure_shows_only_this_boots_console_lines() {
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console.log");
        append_marker(&console, &format!("{BOOT_MARKER}yesterday ---"));
        append_marker(&console, "old boot: tap bgtap1 busy");
        append_marker(&console, &format!("{BOOT_MARKER}now ---"));
        append_marker(&console, "this boot: no root disk");
        let tail = tail_lines(&console, 20);
        assert!(
            tail.contains("this boot") && !tail.contains("old boot"),
            "{tail}"
        );
        // A huge log is read from its end only.
        let mut big = "x".repeat(200_000);
        big.push_str("\nlast line\n");
        std::fs::write(&console, big).unwrap();
        assert_eq!(tail_lines(&console, 1), "last line\n");
        assert!(read_end(&console, TAIL_BYTES).len() as u64 <= TAIL_BYTES);
    }
}
