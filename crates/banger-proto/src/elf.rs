//! ELF program headers, read at both ends: the daemon checks that the agent
//! binary is static (no `PT_INTERP`), and the agent finds the loader and
//! libraries of an image's login shell. Only 64-bit little-endian files, the
//! only kind banger's x86-64 guests run.

pub const PT_LOAD: u32 = 1;
pub const PT_DYNAMIC: u32 = 2;
pub const PT_INTERP: u32 = 3;

/// Size of the ELF header itself.
pub const HEADER_LEN: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramHeader {
    pub kind: u32,
    pub offset: u64,
    pub vaddr: u64,
    pub filesz: u64,
}

/// (phoff, phentsize, phnum) from the ELF header; `None` for anything but a
/// 64-bit little-endian ELF, or entries too short to hold the fields read.
fn table(elf: &[u8]) -> Option<(usize, usize, usize)> {
    if elf.get(..6)? != b"\x7fELF\x02\x01" || elf.len() < HEADER_LEN {
        return None;
    }
    let phoff = usize::try_from(read_u64(elf, 0x20)?).ok()?;
    let phentsize = usize::from(u16::from_le_bytes(elf[0x36..0x38].try_into().ok()?));
    let phnum = usize::from(u16::from_le_bytes(elf[0x38..0x3a].try_into().ok()?));
    if phnum > 0 && phentsize < 40 {
        return None;
    }
    Some((phoff, phentsize, phnum))
}

/// How many bytes from the start of the file hold the header and the whole
/// program header table, judged from the first [`HEADER_LEN`] bytes: what to
/// read to call [`program_headers`] without reading the rest.
pub fn headers_end(header: &[u8]) -> Option<usize> {
    let (phoff, phentsize, phnum) = table(header)?;
    if phnum == 0 {
        return Some(HEADER_LEN);
    }
    phoff.checked_add(phentsize.checked_mul(phnum)?)
}

/// The program headers of the ELF whose first bytes are `elf`; `None` when
/// it is not a 64-bit little-endian ELF or the table is cut off. Offsets come
/// from the file, so every sum is checked.
pub fn program_headers(elf: &[u8]) -> Option<Vec<ProgramHeader>> {
    let (phoff, phentsize, phnum) = table(elf)?;
    (0..phnum)
        .map(|i| {
            let h = phoff.checked_add(i.checked_mul(phentsize)?)?;
            let at = |delta: usize| read_u64(elf, h.checked_add(delta)?);
            let kind = u32::from_le_bytes(elf.get(h..h.checked_add(4)?)?.try_into().ok()?);
            Some(ProgramHeader {
                kind,
                offset: at(8)?,
                vaddr: at(16)?,
                filesz: at(32)?,
            })
        })
        .collect()
}

/// The little-endian u64 at `at`, when the bytes are there.
pub fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        bytes.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 64-bit ELF header followed by program headers of these types.
    fn elf(types: &[u32]) -> Vec<u8> {
        let mut data = vec![0u8; HEADER_LEN];
        data[..6].copy_from_slice(b"\x7fELF\x02\x01");
        data[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        data[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        data[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for (i, t) in types.iter().enumerate() {
            let mut entry = vec![0u8; 56];
            entry[..4].copy_from_slice(&t.to_le_bytes());
            entry[8..16].copy_from_slice(&(i as u64 * 0x1000).to_le_bytes());
            data.extend(entry);
        }
        data
    }

    #[test]
    fn reads_each_program_header() {
        let data = elf(&[PT_LOAD, PT_INTERP]);
        assert_eq!(headers_end(&data[..HEADER_LEN]), Some(64 + 2 * 56));
        let headers = program_headers(&data).unwrap();
        assert_eq!(
            headers
                .iter()
                .map(|h| (h.kind, h.offset))
                .collect::<Vec<_>>(),
            [(PT_LOAD, 0), (PT_INTERP, 0x1000)]
        );
        assert_eq!(program_headers(&elf(&[])), Some(vec![]));
        assert_eq!(headers_end(&elf(&[])), Some(HEADER_LEN));
    }

    #[test]
    fn refuses_what_is_not_a_whole_64_bit_little_endian_elf() {
        let data = elf(&[PT_LOAD, PT_LOAD]);
        assert_eq!(program_headers(&data[..100]), None, "table cut off");
        let mut big_endian = data.clone();
        big_endian[5] = 2;
        assert_eq!(program_headers(&big_endian), None);
        let mut short_entries = data.clone();
        short_entries[0x36..0x38].copy_from_slice(&4u16.to_le_bytes());
        assert_eq!(program_headers(&short_entries), None);
        assert_eq!(program_headers(b"#!/bin/sh\n"), None);
        assert_eq!(headers_end(b"\x7fELF"), None);
    }

    #[test]
    fn extreme_offsets_never_overflow() {
        let mut data = elf(&[PT_LOAD]);
        data[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(program_headers(&data), None);
        assert_eq!(headers_end(&data[..HEADER_LEN]), None);
        assert_eq!(read_u64(&data, usize::MAX - 2), None);
    }
}
