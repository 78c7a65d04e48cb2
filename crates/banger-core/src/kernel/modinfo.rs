//! The `.modinfo` section of a kernel module: its name and dependencies,
//! for kernels shipped without `modules.dep` (Debian generates it at install).

/// `depends=` of a module, from its (uncompressed) ELF bytes.
pub fn depends(ko: &[u8]) -> Result<Vec<String>, super::KernelError> {
    let info = section(ko, ".modinfo").ok_or("no .modinfo section")?;
    Ok(info
        .split(|b| *b == 0)
        .filter_map(|entry| entry.strip_prefix(b"depends="))
        .flat_map(|list| list.split(|b| *b == b','))
        .filter(|d| !d.is_empty())
        .map(|d| normalize(&String::from_utf8_lossy(d)))
        .collect())
}

/// Module names compare with `-` and `_` as one.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// The bytes of a named section of a 64-bit little-endian ELF file.
fn section<'a>(elf: &'a [u8], wanted: &str) -> Option<&'a [u8]> {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return None;
    }
    let u16_at = |at: usize| -> Option<usize> {
        Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?) as usize)
    };
    let u64_at = |at: usize| -> Option<usize> {
        Some(u64::from_le_bytes(elf.get(at..at + 8)?.try_into().ok()?) as usize)
    };
    let u32_at = |at: usize| -> Option<usize> {
        Some(u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?) as usize)
    };
    let shoff = u64_at(0x28)?;
    let shentsize = u16_at(0x3a)?;
    let shnum = u16_at(0x3c)?;
    let shstrndx = u16_at(0x3e)?;
    let header = |i: usize| shoff.checked_add(i.checked_mul(shentsize)?);
    let strtab_off = u64_at(header(shstrndx)? + 0x18)?;
    for i in 0..shnum {
        let h = header(i)?;
        let name_off = strtab_off.checked_add(u32_at(h)?)?;
        let name_end = elf.get(name_off..)?.iter().position(|b| *b == 0)? + name_off;
        if &elf[name_off..name_end] == wanted.as_bytes() {
            let off = u64_at(h + 0x18)?;
            let size = u64_at(h + 0x20)?;
            return elf.get(off..off.checked_add(size)?);
        }
    }
    None
}

#[cfg(test)]
pub use tests::fake_module;

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 with a section string table and a .modinfo section.
    pub fn fake_module(depends: &str) -> Vec<u8> {
        let modinfo = format!("license=GPL\0depends={depends}\0name=x\0").into_bytes();
        let shstr = b"\0.shstrtab\0.modinfo\0".to_vec();
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1]);
        let modinfo_off = elf.len();
        elf.extend_from_slice(&modinfo);
        let shstr_off = elf.len();
        elf.extend_from_slice(&shstr);
        let shoff = elf.len();
        let sh = |name: u32, off: usize, size: usize| {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            h
        };
        let headers = [
            sh(0, 0, 0),
            sh(1, shstr_off, shstr.len()),
            sh(11, modinfo_off, modinfo.len()),
        ]
        .concat();
        elf.extend_from_slice(&headers);
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        elf
    }

    #[test]
    fn reads_depends() {
        assert_eq!(
            depends(&fake_module("virtio,virtio_ring")).unwrap(),
            ["virtio", "virtio_ring"]
        );
        assert!(depends(&fake_module("")).unwrap().is_empty());
        assert!(depends(b"not elf").is_err());
    }
}
