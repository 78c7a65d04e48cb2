//! Reading the login shell ahead of the first command. A binary's first run
//! pages it in from the root disk one fault at a time, each a synchronous
//! read; read sequentially in a background thread while the boot finishes,
//! it is in the page cache when `vm ssh` starts the shell or, in busybox and
//! alpine images where every command is that one binary, when the first
//! `vm exec` arrives. Its ELF interpreter and libraries come along, since
//! every dynamically linked command needs those too.

use std::io::Read;
use std::path::{Path, PathBuf};

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
            for dep in dependencies(&bytes) {
                let Some(mut file) = open(&dep) else { continue };
                let mut chunk = vec![0u8; 256 << 10];
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

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;

fn parse(elf: &[u8]) -> Option<Parsed> {
    // ELFCLASS64, ELFDATA2LSB.
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    // Offsets come from the file: every sum is checked.
    let bytes = |o: usize, n: usize| elf.get(o..o.checked_add(n)?);
    let u16_at = |o: usize| Some(u16::from_le_bytes(bytes(o, 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(bytes(o, 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(bytes(o, 8)?.try_into().ok()?));
    let phoff = u64_at(0x20)? as usize;
    let phentsize = u16_at(0x36)? as usize;
    let phnum = u16_at(0x38)? as usize;
    // (type, offset, vaddr, filesz) of each program header.
    let headers: Vec<(u32, u64, u64, u64)> = (0..phnum)
        .map(|i| {
            let h = phoff.checked_add(i.checked_mul(phentsize)?)?;
            let at = |delta: usize| h.checked_add(delta);
            Some((
                u32_at(h)?,
                u64_at(at(8)?)?,
                u64_at(at(16)?)?,
                u64_at(at(32)?)?,
            ))
        })
        .collect::<Option<_>>()?;
    let c_string = |o: usize| -> Option<String> {
        let rest = elf.get(o..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        String::from_utf8(rest[..end].to_vec()).ok()
    };
    let mut parsed = Parsed::default();
    if let Some(&(_, off, _, _)) = headers.iter().find(|h| h.0 == PT_INTERP) {
        parsed.interp = c_string(off as usize).filter(|p| p.starts_with('/'));
    }
    let Some(&(_, dyn_off, _, dyn_size)) = headers.iter().find(|h| h.0 == PT_DYNAMIC) else {
        return Some(parsed);
    };
    let entries: Vec<(u64, u64)> = (0..dyn_size as usize / 16)
        .map_while(|i| {
            let e = (dyn_off as usize).checked_add(i * 16)?;
            Some((u64_at(e)?, u64_at(e.checked_add(8)?)?))
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
                .find(|&&(t, _, vaddr, filesz)| {
                    t == PT_LOAD && addr >= vaddr && addr - vaddr < filesz
                })
                .and_then(|&(_, off, vaddr, _)| (addr - vaddr).checked_add(off))
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
