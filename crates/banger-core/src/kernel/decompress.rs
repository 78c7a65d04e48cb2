//! The compressions Linux uses for its images and modules, told apart by
//! their magic bytes.

use std::io::Read;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Gzip,
    Xz,
    Lzma,
    Bzip2,
    /// The kernel's legacy LZ4 framing (magic 0x184C2102).
    Lz4Legacy,
    Zstd,
}

pub fn sniff(data: &[u8]) -> Option<Format> {
    if data.starts_with(&[0x1f, 0x8b]) {
        Some(Format::Gzip)
    } else if data.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        Some(Format::Xz)
    } else if data.starts_with(&[0x5d, 0x00, 0x00]) {
        Some(Format::Lzma)
    } else if data.starts_with(b"BZh") {
        Some(Format::Bzip2)
    } else if data.starts_with(&[0x02, 0x21, 0x4c, 0x18]) {
        Some(Format::Lz4Legacy)
    } else if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some(Format::Zstd)
    } else {
        None
    }
}

/// The largest kernel image a payload may decompress to (real ones are
/// 20-60 MiB; a larger output is a bomb, not a kernel).
pub const MAX_VMLINUX: u64 = 512 << 20;

/// Collects at most [`MAX_VMLINUX`] bytes, then fails the write.
struct Capped(Vec<u8>);

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if (self.0.len() + buf.len()) as u64 > MAX_VMLINUX {
            return Err(std::io::Error::other(format!(
                "decompresses to more than {} MiB, which is no kernel",
                MAX_VMLINUX >> 20
            )));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn decompress(format: Format, data: &[u8]) -> Result<Vec<u8>, super::KernelError> {
    let mut out = Capped(Vec::new());
    let copy = |mut r: &mut dyn Read, out: &mut Capped| {
        std::io::copy(&mut r, out)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let result = match format {
        Format::Gzip => copy(&mut flate2::read::MultiGzDecoder::new(data), &mut out),
        Format::Xz => lzma_rs::xz_decompress(&mut std::io::BufReader::new(data), &mut out)
            .map_err(|e| e.to_string()),
        Format::Lzma => lzma_rs::lzma_decompress(&mut std::io::BufReader::new(data), &mut out)
            .map_err(|e| e.to_string()),
        Format::Bzip2 => copy(&mut bzip2::read::MultiBzDecoder::new(data), &mut out),
        Format::Lz4Legacy => lz4_legacy(data, &mut out.0),
        Format::Zstd => match zstd::stream::read::Decoder::new(data) {
            Ok(mut d) => copy(&mut d, &mut out),
            Err(e) => Err(e.to_string()),
        },
    };
    if let Err(e) = &result {
        if e.contains("which is no kernel") {
            return Err(format!("{format:?} data: {e}").into());
        }
    }
    let out = out.0;
    // Kernel payloads often carry trailing bytes (size fields, padding) after
    // the stream; what decoded before them is the image.
    match result {
        Ok(()) => Ok(out),
        Err(_) if !out.is_empty() => Ok(out),
        Err(e) => Err(format!("{format:?} data: {e}").into()),
    }
}

/// Legacy LZ4: a magic, then blocks of `u32 compressed size` + data, each
/// decoding to at most 8 MiB, ended by end of input or a bad size.
fn lz4_legacy(data: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
    const BLOCK_MAX: usize = 8 << 20;
    let mut pos = 4;
    let mut buf = vec![0u8; BLOCK_MAX];
    while pos + 4 <= data.len() {
        let size = u32::from_le_bytes(data[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        // The kernel's own build appends the uncompressed size; stop at
        // anything that cannot be a block.
        if size == 0x184c2102 {
            pos += 4;
            continue;
        }
        if size == 0 || pos + 4 + size > data.len() {
            break;
        }
        let block = &data[pos + 4..pos + 4 + size];
        let n = lz4_flex::block::decompress_into(block, &mut buf)
            .map_err(|e| format!("lz4 block: {e}"))?;
        if (out.len() + n) as u64 > MAX_VMLINUX {
            return Err(format!(
                "decompresses to more than {} MiB, which is no kernel",
                MAX_VMLINUX >> 20
            ));
        }
        out.extend_from_slice(&buf[..n]);
        pos += 4 + size;
    }
    if out.is_empty() {
        return Err("no lz4 blocks".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_payload_that_expands_past_any_kernel_is_refused() {
        // 600 MiB of zeros compress to well under a MiB.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..600 {
            gz.write_all(&zeros).unwrap();
        }
        let bomb = gz.finish().unwrap();
        let err = decompress(Format::Gzip, &bomb).unwrap_err();
        assert!(err.contains("no kernel"), "{err}");
    }

    #[test]
    fn round_trips_what_the_crates_can_write() {
        let text = b"vmlinux payload ".repeat(1000);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&text).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(sniff(&gz), Some(Format::Gzip));
        assert_eq!(decompress(Format::Gzip, &gz).unwrap(), text);

        let zst = zstd::encode_all(&text[..], 3).unwrap();
        assert_eq!(decompress(sniff(&zst).unwrap(), &zst).unwrap(), text);

        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut &text[..], &mut xz).unwrap();
        assert_eq!(decompress(sniff(&xz).unwrap(), &xz).unwrap(), text);

        let mut lz = Vec::new();
        lzma_rs::lzma_compress(&mut &text[..], &mut lz).unwrap();
        assert_eq!(sniff(&lz), Some(Format::Lzma));
        assert_eq!(decompress(Format::Lzma, &lz).unwrap(), text);

        let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
        bz.write_all(&text).unwrap();
        let bz = bz.finish().unwrap();
        assert_eq!(decompress(sniff(&bz).unwrap(), &bz).unwrap(), text);

        let mut legacy = vec![0x02, 0x21, 0x4c, 0x18];
        for chunk in text.chunks(5000) {
            let block = lz4_flex::block::compress(chunk);
            legacy.extend_from_slice(&(block.len() as u32).to_le_bytes());
            legacy.extend_from_slice(&block);
        }
        legacy.extend_from_slice(&(text.len() as u32).to_le_bytes());
        assert_eq!(decompress(sniff(&legacy).unwrap(), &legacy).unwrap(), text);
    }
}
