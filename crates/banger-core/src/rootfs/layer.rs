//! Reads one layer blob (gzip, zstd or plain tar, told apart by magic bytes),
//! verifies its digest while reading, and applies it to a [`Flattener`].

use std::cell::RefCell;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::rc::Rc;

use sha2::{Digest, Sha256};

use super::extract::{EntryError, Flattener};

#[derive(Debug)]
pub enum LayerFailure {
    /// An entry was hostile or could not be applied.
    Entry(EntryError),
    /// The blob's content does not hash to its digest.
    Digest {
        actual: String,
    },
    Io(io::Error),
}

impl std::fmt::Display for LayerFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LayerFailure::Entry(e) => write!(f, "{e}"),
            LayerFailure::Digest { actual } => {
                write!(f, "content does not match its digest (got {actual})")
            }
            LayerFailure::Io(e) => write!(f, "reading the layer: {e}"),
        }
    }
}

/// Hashes every byte pulled from the file, whatever decoder sits on top
/// (when there is a hasher).
struct HashingReader<'a> {
    file: &'a File,
    hasher: Option<Rc<RefCell<Sha256>>>,
}

impl Read for HashingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        if let Some(hasher) = &self.hasher {
            hasher.borrow_mut().update(&buf[..n]);
        }
        Ok(n)
    }
}

/// Whether a blob's bytes must be hashed as they are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// From the cache: it may have changed on disk since it was verified.
    Digest,
    /// Hashed and verified moments ago as it was downloaded.
    AlreadyVerified,
}

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// Applies the layer in `blob` (positioned at its start) and, unless it was
/// just verified, checks that the blob hashes to `digest` (`sha256:<hex>`).
pub fn apply_blob(
    flattener: &mut Flattener,
    blob: &File,
    digest: &str,
    check: Check,
) -> Result<(), LayerFailure> {
    let hasher = (check == Check::Digest).then(|| Rc::new(RefCell::new(Sha256::new())));
    let mut reader = BufReader::with_capacity(
        256 * 1024,
        HashingReader {
            file: blob,
            hasher: hasher.clone(),
        },
    );
    let head = reader.fill_buf().map_err(LayerFailure::Io)?.to_vec();
    if head.starts_with(GZIP_MAGIC) {
        apply_stream(flattener, flate2::bufread::MultiGzDecoder::new(reader))?;
    } else if head.starts_with(ZSTD_MAGIC) {
        let decoder = zstd::stream::read::Decoder::with_buffer(reader).map_err(LayerFailure::Io)?;
        apply_stream(flattener, decoder)?;
    } else {
        apply_stream(flattener, reader)?;
    }
    let Some(hasher) = hasher else {
        return Ok(());
    };
    // Whatever the decoder left unread still counts towards the digest.
    let mut rest = HashingReader {
        file: blob,
        hasher: Some(hasher.clone()),
    };
    io::copy(&mut rest, &mut io::sink()).map_err(LayerFailure::Io)?;
    let actual = format!("sha256:{}", hex::encode(hasher.borrow().clone().finalize()));
    if actual != digest {
        return Err(LayerFailure::Digest { actual });
    }
    Ok(())
}

fn apply_stream<R: Read>(flattener: &mut Flattener, mut stream: R) -> Result<(), LayerFailure> {
    flattener
        .apply_layer(&mut stream)
        .map_err(LayerFailure::Entry)?;
    // Tar ends with zero blocks that the archive reader may not consume.
    io::copy(&mut stream, &mut io::sink()).map_err(LayerFailure::Io)?;
    Ok(())
}
