//! Getting the ELF `vmlinux` out of a bzImage: the setup header says where the
//! compressed payload starts and how long it is.

use super::decompress;

const HEADER_MAGIC_OFFSET: usize = 0x202;
const SETUP_SECTS_OFFSET: usize = 0x1f1;
const PAYLOAD_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH: usize = 0x24c;

pub fn is_bzimage(data: &[u8]) -> bool {
    data.len() > PAYLOAD_LENGTH + 4
        && &data[HEADER_MAGIC_OFFSET..HEADER_MAGIC_OFFSET + 4] == b"HdrS"
}

pub fn is_elf(data: &[u8]) -> bool {
    data.starts_with(b"\x7fELF")
}

fn u32_at(data: &[u8], at: usize) -> usize {
    u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes")) as usize
}

/// The uncompressed ELF image inside a bzImage.
pub fn extract_vmlinux(data: &[u8]) -> Result<Vec<u8>, super::KernelError> {
    if !is_bzimage(data) {
        return Err("not a bzImage (no `HdrS` setup header)".into());
    }
    let setup_sects = match data[SETUP_SECTS_OFFSET] {
        0 => 4,
        n => n as usize,
    };
    let start = (setup_sects + 1) * 512 + u32_at(data, PAYLOAD_OFFSET);
    let end = start + u32_at(data, PAYLOAD_LENGTH);
    let payload = data
        .get(start..end)
        .ok_or("bzImage payload lies outside the file")?;
    let format = decompress::sniff(payload).ok_or("unknown bzImage payload compression")?;
    let image = decompress::decompress(format, payload)?;
    if !is_elf(&image) {
        return Err(format!("the {format:?} payload did not decode to an ELF vmlinux").into());
    }
    Ok(image)
}

/// `6.1.0-56-cloud-amd64` from the `Linux version …` banner inside an image.
pub fn version_of(image: &[u8]) -> Option<String> {
    let needle = b"Linux version ";
    let at = image.windows(needle.len()).position(|w| w == needle)?;
    let rest = &image[at + needle.len()..];
    let end = rest.iter().position(|b| *b == b' ' || *b == 0)?;
    let version = std::str::from_utf8(&rest[..end]).ok()?;
    // The banner format string itself ("%s") is not a version.
    (!version.is_empty() && !version.contains('%')).then(|| version.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A fake bzImage: setup sectors, a header, and a gzip payload of an ELF.
    fn fake_bzimage(elf: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(elf).unwrap();
        let payload = gz.finish().unwrap();
        let mut img = vec![0u8; 5 * 512];
        img[SETUP_SECTS_OFFSET] = 4;
        img[HEADER_MAGIC_OFFSET..HEADER_MAGIC_OFFSET + 4].copy_from_slice(b"HdrS");
        img[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 4].copy_from_slice(&100u32.to_le_bytes());
        img[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4]
            .copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend_from_slice(&[0u8; 100]);
        img.extend_from_slice(&payload);
        img.extend_from_slice(&[0u8; 64]);
        img
    }

    #[test]
    fn extracts_the_payload_and_reads_the_version() {
        let mut elf = b"\x7fELF".to_vec();
        elf.extend_from_slice(b"....Linux version 6.1.0-test (gcc) #1 SMP\0...");
        let img = fake_bzimage(&elf);
        assert!(is_bzimage(&img));
        assert_eq!(extract_vmlinux(&img).unwrap(), elf);
        assert_eq!(version_of(&elf).as_deref(), Some("6.1.0-test"));
        assert!(extract_vmlinux(b"not a kernel at all, just some bytes that are long enough to index into.......................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................").is_err());
    }
}
