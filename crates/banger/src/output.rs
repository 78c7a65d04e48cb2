//! Tables and times the way people read them.

use std::sync::atomic::{AtomicBool, Ordering};

static JSON_ERRORS: AtomicBool = AtomicBool::new(false);

/// Set once at start when the command line asks for `--json` (before any
/// `--`, after which the words are a guest command's).
/// How a command whose stdout reader went away exits: as a shell reports
/// a process SIGPIPE ended (128 + 13), with nothing said.
pub const BROKEN_PIPE_EXIT: i32 = 141;

/// Writes a result to stdout; a reader that closed early ends the process
/// quietly (`banger doctor | head -1`), any other failure is said once.
pub fn write_out(args: std::fmt::Arguments) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(BROKEN_PIPE_EXIT);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(125);
    }
}

/// A failure of the CLI's own (not the daemon's): `error: …` on stderr, and
/// under `--json` the error object on stdout as well.
pub fn say_error(e: &anyhow::Error) {
    eprintln!("error: {e:#}");
    if json_errors() {
        outln!(
            "{}",
            serde_json::json!({"error": {"code": "invalid_params", "message": format!("{e:#}")}})
        );
    }
}

/// Whether a command failed only because stdout's reader went away: a
/// broken pipe in its error, and stdout's pipe with no reader (a daemon
/// connection that broke is an error to say, not this).
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    let broken = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    });
    broken && stdout_reader_gone()
}

/// A pipe's write end reports POLLERR once its last reader closed.
fn stdout_reader_gone() -> bool {
    let mut fd = libc::pollfd {
        fd: libc::STDOUT_FILENO,
        events: 0,
        revents: 0,
    };
    // SAFETY: poll(2) on one pollfd, without waiting.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    n == 1 && fd.revents & libc::POLLERR != 0
}

pub fn set_json_errors(args: &[String]) {
    let json = args
        .iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "--json");
    JSON_ERRORS.store(json, Ordering::Relaxed);
}

/// Whether progress is shown: only to a person, on a terminal (a script's
/// stderr gets results and errors, never progress), unless
/// `BANGER_PROGRESS=always` (a log that wants it) or `never`.
pub fn progress_shown() -> bool {
    use std::io::IsTerminal;
    match std::env::var("BANGER_PROGRESS").as_deref() {
        Ok("always") => true,
        Ok("never") => false,
        _ => std::io::stderr().is_terminal(),
    }
}

/// Whether errors are to be printed as JSON on stdout too.
pub fn json_errors() -> bool {
    JSON_ERRORS.load(Ordering::Relaxed)
}

/// Left-aligned columns separated by three spaces, header first.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}   "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `512M`, `1G`, `1.5G`, `4096` (bytes) → bytes. Binary units.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = t[i..].to_ascii_uppercase();
            let mult: u64 = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(format!("invalid size `{text}`: use e.g. 512M, 1G, 8G")),
            };
            (&t[..i], mult)
        }
        None => (t, 1),
    };
    let value: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid size `{text}`: use e.g. 512M, 1G, 8G"))?;
    if value <= 0.0 {
        return Err(format!("invalid size `{text}`: must be positive"));
    }
    Ok((value * mult as f64) as u64)
}

/// Seconds since the epoch of an RFC 3339 UTC time as banger writes it.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| text.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, s) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + s)
}

/// `just now`, `42s ago`, `3m ago`, `5h ago`, `2d ago`.
pub fn relative_time(rfc3339: &str) -> String {
    let Some(then) = parse_rfc3339(rfc3339) else {
        return rfc3339.to_string();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let ago = (now - then).max(0);
    match ago {
        0..=4 => "just now".into(),
        5..=59 => format!("{ago}s ago"),
        60..=3599 => format!("{}m ago", ago / 60),
        3600..=86_399 => format!("{}h ago", ago / 3600),
        _ => format!("{}d ago", ago / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["NAME", "SIZE"],
            &[
                vec!["alpine".into(), "1.0 MiB".into()],
                vec!["x".into(), "2 B".into()],
            ],
        );
        assert_eq!(t, "NAME     SIZE\nalpine   1.0 MiB\nx        2 B\n");
    }

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots").is_err() && parse_size("-1G").is_err());
    }

    #[test]
    fn parses_what_the_daemon_writes() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339(&banger_core::ids::rfc3339(951_827_696)),
            Some(951_827_696)
        );
        assert_eq!(relative_time(&banger_core::ids::now_rfc3339()), "just now");
    }
}
