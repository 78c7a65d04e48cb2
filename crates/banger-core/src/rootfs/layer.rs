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

/// Bytes handed from the decoding thread to the unpacking one at a time, and
/// how many such chunks may wait between them.
const CHUNK: usize = 1 << 20;
const QUEUED: usize = 8;

/// Applies the layer in `blob` (positioned at its start) and, unless it was
/// just verified, checks that the blob hashes to `digest` (`sha256:<hex>`).
/// Reading, hashing and decompressing run on a thread of their own, beside
/// the unpacking: each is a good part of a pull's time.
pub fn apply_blob(
    flattener: &mut Flattener,
    blob: &File,
    digest: &str,
    check: Check,
) -> Result<(), LayerFailure> {
    let (tx, rx) = std::sync::mpsc::sync_channel(QUEUED);
    let (applied, decoded) = std::thread::scope(|scope| {
        let decoder = scope.spawn(move || decode(blob, check, tx));
        let applied = apply_stream(flattener, ChunkReader::new(rx));
        (applied, decoder.join())
    });
    let decoded =
        decoded.map_err(|_| LayerFailure::Io(io::Error::other("the decoder panicked")))?;
    applied?;
    match decoded.map_err(LayerFailure::Io)? {
        Some(actual) if actual != digest => Err(LayerFailure::Digest { actual }),
        _ => Ok(()),
    }
}

/// Reads, hashes and decompresses `blob` into chunks sent on `tx`; returns
/// the blob's digest when asked to check it. A decoding error is sent on
/// for the unpacker to report where it stopped.
fn decode(
    blob: &File,
    check: Check,
    tx: std::sync::mpsc::SyncSender<io::Result<Vec<u8>>>,
) -> io::Result<Option<String>> {
    let hasher = (check == Check::Digest).then(|| Rc::new(RefCell::new(Sha256::new())));
    let mut reader = BufReader::with_capacity(
        256 * 1024,
        HashingReader {
            file: blob,
            hasher: hasher.clone(),
        },
    );
    let head = reader.fill_buf()?.to_vec();
    let mut stream: Box<dyn Read> = if head.starts_with(GZIP_MAGIC) {
        Box::new(flate2::bufread::MultiGzDecoder::new(reader))
    } else if head.starts_with(ZSTD_MAGIC) {
        Box::new(zstd::stream::read::Decoder::with_buffer(reader)?)
    } else {
        Box::new(reader)
    };
    loop {
        let mut chunk = vec![0u8; CHUNK];
        let mut filled = 0;
        let done = loop {
            match stream.read(&mut chunk[filled..]) {
                Ok(0) => break true,
                Ok(n) => {
                    filled += n;
                    if filled == CHUNK {
                        break false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return Ok(None);
                }
            }
        };
        chunk.truncate(filled);
        if filled > 0 && tx.send(Ok(chunk)).is_err() {
            return Ok(None); // The unpacker stopped.
        }
        if done {
            break;
        }
    }
    drop(stream);
    let Some(hasher) = hasher else {
        return Ok(None);
    };
    // Whatever the decoder left unread still counts towards the digest.
    let mut rest = HashingReader {
        file: blob,
        hasher: Some(hasher.clone()),
    };
    io::copy(&mut rest, &mut io::sink())?;
    let digest = hex::encode(hasher.borrow().clone().finalize());
    Ok(Some(format!("sha256:{digest}")))
}

/// The unpacking side of the channel, as a stream.
struct ChunkReader {
    rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    at: usize,
}

impl ChunkReader {
    fn new(rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>) -> ChunkReader {
        ChunkReader {
            rx,
            chunk: Vec::new(),
            at: 0,
        }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.chunk.len() {
            match self.rx.recv() {
                Ok(chunk) => {
                    self.chunk = chunk?;
                    self.at = 0;
                }
                Err(_) => return Ok(0), // The decoder is done.
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

fn apply_stream<R: Read>(flattener: &mut Flattener, mut stream: R) -> Result<(), LayerFailure> {
    flattener
        .apply_layer(&mut stream)
        .map_err(LayerFailure::Entry)?;
    // Tar ends with zero blocks that the archive reader may not consume.
    io::copy(&mut stream, &mut io::sink()).map_err(LayerFailure::Io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_testkit::layer::{self as fixture, Compression};
    use std::io::{Seek, Write};

    fn blob(bytes: &[u8]) -> (tempfile::TempDir, File, String) {
        let dir = tempfile::tempdir().unwrap();
        let mut file = tempfile::tempfile_in(dir.path()).unwrap();
        file.write_all(bytes).unwrap();
        file.rewind().unwrap();
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
        (dir, file, digest)
    }

    #[test]
    fn layers_apply_and_their_digest_is_checked_when_asked() {
        let tar = fixture::tar(&[fixture::file("etc/motd", &"hi\n".repeat(1 << 20), 0o644)]);
        for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let (dir, file, digest) = blob(&compression.compress(&tar));
            let mut flattener = Flattener::new(&dir.path().join("root")).unwrap();
            apply_blob(&mut flattener, &file, &digest, Check::Digest).unwrap();
            let motd = std::fs::read(dir.path().join("root/etc/motd")).unwrap();
            assert_eq!(motd.len(), 3 << 20, "{compression:?}");

            (&file).rewind().unwrap();
            let mut again = Flattener::new(&dir.path().join("again")).unwrap();
            let wrong = "sha256:00";
            match apply_blob(&mut again, &file, wrong, Check::Digest) {
                Err(LayerFailure::Digest { actual }) => assert_eq!(actual, digest),
                other => panic!("{compression:?}: {other:?}"),
            }
            (&file).rewind().unwrap();
            let mut trusted = Flattener::new(&dir.path().join("trusted")).unwrap();
            apply_blob(&mut trusted, &file, wrong, Check::AlreadyVerified).unwrap();
        }
    }

    #[test]
    fn a_broken_or_hostile_layer_stops_at_once_and_says_why() {
        let tar = fixture::tar(&[fixture::file("big", &"x".repeat(32 << 20), 0o644)]);
        let gz = Compression::Gzip.compress(&tar);
        let (dir, file, digest) = blob(&gz[..gz.len() / 2]);
        let mut flattener = Flattener::new(&dir.path().join("root")).unwrap();
        let err = apply_blob(&mut flattener, &file, &digest, Check::Digest).unwrap_err();
        assert!(
            matches!(err, LayerFailure::Entry(_) | LayerFailure::Io(_)),
            "{err}"
        );

        // The unpacker refuses the first entry while the decoder still has
        // megabytes to hand over: neither waits for the other.
        let hostile = fixture::tar(&[
            fixture::raw(b"../escape", tar::EntryType::Regular, b""),
            fixture::file("big", &"x".repeat(32 << 20), 0o644),
        ]);
        let (dir, file, digest) = blob(&Compression::Gzip.compress(&hostile));
        let mut flattener = Flattener::new(&dir.path().join("root")).unwrap();
        match apply_blob(&mut flattener, &file, &digest, Check::Digest) {
            Err(LayerFailure::Entry(e)) => assert!(e.path.contains("escape"), "{e}"),
            other => panic!("{other:?}"),
        }
    }
}
