//! Reading the login shell ahead of the first command. A binary's first run
//! pages it in from the root disk one fault at a time, each a synchronous
//! read; read sequentially in a background thread while the boot finishes,
//! it is in the page cache when `vm ssh` starts the shell or, in busybox and
//! alpine images where every command is that one binary, when the first
//! `vm exec` arrives. Its ELF interpreter and libraries come along, since
//! every dynamically linked command needs those too.

use std::io::Read;
use std::path::{Path, PathBuf};

use banger_proto::elf::{program_headers, read_u64, PT_DYNAMIC, PT_INTERP, PT_LOAD};

/// Directories searched for the shell's libraries (no ld.so.cache parsing:
/// these hold libc everywhere that matters).
const LIB_DIRS: [&str; 6] = [
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

/// Larger files are not worth memory nobody asked for.
const MAX_FILE: u64 = 16 << 20;

/// Starts the read in a low-priority thread; the boot never waits for it.
pub fn start() {
    let _ = std::thread::Builder::new()
        .name("prefetch".into())
        .spawn(|| {
            // SAFETY: setpriority on this thread only (0 = the caller).
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
            let shell = crate::exec::account(None)
                .map(|a| a.shell)
                .unwrap_or_default();
            let shell = if shell.is_empty() {
                "/bin/sh".into()
            } else {
                shell
            };
            let Some(bytes) = read(Path::new(&shell)) else {
                return;
            };
            let mut chunk = vec![0u8; 256 << 10];
            for dep in dependencies(&bytes) {
                let Some(mut file) = open(&dep) else { continue };
                while matches!(file.read(&mut chunk), Ok(n) if n > 0) {}
            }
        });
}

/// A regular file of a sensible size, opened for reading. Checked before
/// opening: the path comes from the image, and opening a FIFO would block.
fn open(path: &Path) -> Option<std::fs::File> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() || meta.len() > MAX_FILE {
        return None;
    }
    std::fs::File::open(path).ok()
}

/// The whole file, read through the page cache; `None` when it cannot be.
fn read(path: &Path) -> Option<Vec<u8>> {
    let mut bytes = Vec::new();
    open(path)?.read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

/// The interpreter and the libraries a 64-bit little-endian ELF names,
/// found on disk; nothing for anything else.
fn dependencies(elf: &[u8]) -> Vec<PathBuf> {
    let Some(parsed) = parse(elf) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = parsed.interp.map(PathBuf::from).into_iter().collect();
    for lib in parsed.needed {
        if let Some(path) = LIB_DIRS
            .iter()
            .map(|d| Path::new(d).join(&lib))
            .find(|p| p.is_file())
        {
            found.push(path);
        }
    }
    found
}

#[derive(Debug, Default, PartialEq)]
struct Parsed {
    interp: Option<String>,
    needed: Vec<String>,
}

const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;

fn parse(elf: &[u8]) -> Option<Parsed> {
    let headers = program_headers(elf)?;
    let find = |kind: u32| headers.iter().find(|h| h.kind == kind);
    let c_string = |o: usize| -> Option<String> {
        let rest = elf.get(o..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        String::from_utf8(rest[..end].to_vec()).ok()
    };
    let mut parsed = Parsed::default();
    if let Some(interp) = find(PT_INTERP) {
        parsed.interp = c_string(interp.offset as usize).filter(|p| p.starts_with('/'));
    }
    let Some(dynamic) = find(PT_DYNAMIC) else {
        return Some(parsed);
    };
    let entries: Vec<(u64, u64)> = (0..dynamic.filesz as usize / 16)
        .map_while(|i| {
            let e = (dynamic.offset as usize).checked_add(i * 16)?;
            Some((read_u64(elf, e)?, read_u64(elf, e.checked_add(8)?)?))
        })
        .take_while(|(tag, _)| *tag != DT_NULL)
        .collect();
    // DT_STRTAB is an address: the loadable segment holding it maps it to
    // a file offset.
    let strtab = entries
        .iter()
        .find(|(tag, _)| *tag == DT_STRTAB)
        .and_then(|&(_, addr)| {
            headers
                .iter()
                .find(|h| h.kind == PT_LOAD && addr >= h.vaddr && addr - h.vaddr < h.filesz)
                .and_then(|h| (addr - h.vaddr).checked_add(h.offset))
        });
    if let Some(strtab) = strtab {
        parsed.needed = entries
            .iter()
            .filter(|(tag, _)| *tag == DT_NEEDED)
            .filter_map(|&(_, name)| c_string(strtab.checked_add(name)? as usize))
            // A name is a file name, never a path out of the library dirs.
            .filter(|n| !n.is_empty() && !n.contains('/'))
            .collect();
    }
    Some(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_dynamic_binarys_interpreter_and_libraries() {
        // The test binary itself is a dynamically linked x86-64 ELF.
        let exe = std::fs::read("/proc/self/exe").unwrap();
        let parsed = parse(&exe).unwrap();
        if cfg!(target_feature = "crt-static") {
            assert_eq!(parsed.interp, None);
        } else {
            let interp = parsed.interp.unwrap();
            assert!(
                interp.starts_with('/') && interp.contains("ld-linux"),
                "{interp}"
            );
            assert!(
                parsed.needed.iter().any(|n| n.starts_with("libc.so")),
                "{:?}",
                parsed.needed
            );
        }
    }

    #[test]
    fn finds_the_libraries_on_disk() {
        let exe = std::fs::read("/proc/self/exe").unwrap();
        if cfg!(target_feature = "crt-static") {
            return;
        }
        let deps = dependencies(&exe);
        assert!(
            deps.iter().all(|p| p.is_absolute() && p.is_file()),
            "{deps:?}"
        );
        assert!(
            deps.iter().any(|p| p.to_string_lossy().contains("libc.so")),
            "{deps:?}"
        );
    }

    #[test]
    fn anything_not_a_64_bit_elf_has_no_dependencies() {
        assert_eq!(parse(b"#!/bin/sh\necho hi\n"), None);
        assert_eq!(parse(b""), None);
        let mut elf32 = b"\x7fELF\x01\x01".to_vec();
        elf32.resize(64, 0);
        assert_eq!(parse(&elf32), None);
        assert!(dependencies(b"\x7fELF").is_empty());
    }

    #[test]
    fn corrupt_headers_never_panic() {
        let exe = std::fs::read("/proc/self/exe").unwrap();
        // Every 8-byte field of the ELF and program headers set to extremes.
        for at in (0x18..0x40).chain(64..64 + 56 * 8).step_by(8) {
            for value in [0u64, u64::MAX, u64::MAX / 2, 1 << 40] {
                let mut bad = exe[..exe.len().min(1 << 20)].to_vec();
                bad[at..at + 8].copy_from_slice(&value.to_le_bytes());
                let _ = parse(&bad);
            }
        }
    }

    #[test]
    fn only_regular_files_are_opened() {
        let dir = std::env::temp_dir().join(format!("banger-prefetch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let _ = std::fs::remove_file(&fifo);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Opening a FIFO for reading would block until a writer came.
        assert!(open(&fifo).is_none());
        assert!(open(&dir).is_none());
        assert!(open(&dir.join("missing")).is_none());
        std::fs::write(dir.join("shell"), b"#!/bin/sh\n").unwrap();
        assert_eq!(read(&dir.join("shell")).unwrap(), b"#!/bin/sh\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_truncated_header_table_is_refused() {
        let exe = std::fs::read("/proc/self/exe").unwrap();
        // The program headers start just past the ELF header.
        assert_eq!(parse(&exe[..70]), None);
    }
}
