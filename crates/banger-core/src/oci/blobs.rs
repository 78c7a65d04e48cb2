//! The blob cache: `<cache>/oci/blobs/sha256/<hex>`, each file verified before
//! it is published. Downloads go to an unnamed `O_TMPFILE` inode and are linked
//! into place only when complete, so a pull holds its data through its own file
//! descriptor and survives `image cache prune` renaming the cache away mid-pull.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::locks::{KeyGuard, KeyedLocks};

use sha2::{Digest, Sha256};

use super::digest;

pub struct BlobCache {
    root: PathBuf,
    /// One lock per digest so concurrent pulls download a shared blob once.
    locks: KeyedLocks,
}

impl BlobCache {
    pub fn new(root: PathBuf) -> BlobCache {
        BlobCache {
            root,
            locks: KeyedLocks::default(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dir(&self) -> PathBuf {
        self.root.join("blobs/sha256")
    }

    pub fn path(&self, digest: &str) -> Result<PathBuf, super::ContentError> {
        Ok(self.dir().join(digest::validate(digest)?))
    }

    /// The cached blob, opened, if present. Content is verified by whoever reads it.
    pub fn open(&self, digest: &str) -> Option<File> {
        File::open(self.path(digest).ok()?).ok()
    }

    /// Drops a cached blob found to be corrupt.
    pub fn evict(&self, digest: &str) {
        if let Ok(path) = self.path(digest) {
            let _ = fs::remove_file(path);
        }
    }

    pub async fn lock(&self, digest: &str) -> KeyGuard {
        self.locks.lock(digest).await
    }

    pub fn writer(&self) -> io::Result<BlobWriter> {
        let dir = self.dir();
        fs::create_dir_all(&dir)?;
        let tmpfile = OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE)
            .open(&dir);
        let (file, named) = match tmpfile {
            Ok(file) => (file, None),
            // Filesystems without O_TMPFILE get a named temporary file.
            Err(_) => {
                let path = dir.join(format!(".tmp-{}", crate::ids::random_hex(8)));
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)?;
                (file, Some(path))
            }
        };
        Ok(BlobWriter {
            file,
            named,
            hasher: Sha256::new(),
            written: 0,
        })
    }
}

pub struct BlobWriter {
    file: File,
    named: Option<PathBuf>,
    hasher: Sha256,
    written: u64,
}

impl BlobWriter {
    pub fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        self.hasher.update(chunk);
        self.written += chunk.len() as u64;
        self.file.write_all(chunk)
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// The digest of what was written so far.
    pub fn digest(&self) -> String {
        format!("sha256:{}", hex::encode(self.hasher.clone().finalize()))
    }

    /// Verifies the content, makes it durable and publishes it in the cache
    /// (best effort: the returned file, rewound, is what the pull uses).
    pub fn finish(
        mut self,
        cache: &BlobCache,
        want: &str,
        size: Option<u64>,
    ) -> Result<File, super::ContentError> {
        let actual = format!("sha256:{}", hex::encode(self.hasher.clone().finalize()));
        let fail = |why: String| {
            if let Some(path) = &self.named {
                let _ = fs::remove_file(path);
            }
            Err(super::ContentError(why))
        };
        if let Some(size) = size {
            if size != self.written {
                return fail(format!("expected {size} bytes, received {}", self.written));
            }
        }
        if actual != want {
            return fail(format!("content does not match its digest (got {actual})"));
        }
        if let Err(e) = self.file.sync_all() {
            return fail(format!("syncing the blob: {e}"));
        }
        let dest = cache.path(want)?;
        if let Err(e) = self.publish(&dest) {
            tracing::warn!(digest = want, error = %e, "could not add blob to the cache");
        }
        self.file.rewind().map_err(|e| e.to_string())?;
        Ok(self.file)
    }

    fn publish(&self, dest: &Path) -> io::Result<()> {
        // The cache may have been pruned since the download began.
        fs::create_dir_all(dest.parent().expect("blob paths have a parent"))?;
        match &self.named {
            Some(path) => {
                let result = fs::rename(path, dest);
                if result.is_err() {
                    let _ = fs::remove_file(path);
                }
                result
            }
            None => {
                let proc_path = format!("/proc/self/fd/{}\0", self.file.as_raw_fd());
                let mut dest_c = dest.as_os_str().as_bytes().to_vec();
                dest_c.push(0);
                // SAFETY: both paths are NUL-terminated buffers that outlive the call.
                let rc = unsafe {
                    libc::linkat(
                        libc::AT_FDCWD,
                        proc_path.as_ptr().cast(),
                        libc::AT_FDCWD,
                        dest_c.as_ptr().cast(),
                        libc::AT_SYMLINK_FOLLOW,
                    )
                };
                if rc == 0 {
                    return Ok(());
                }
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::AlreadyExists {
                    return Ok(());
                }
                Err(err)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn verified_blobs_are_published_and_bad_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::new(dir.path().join("oci"));
        let good = digest::sha256_of(b"hello");
        let mut w = cache.writer().unwrap();
        w.write(b"hel").unwrap();
        w.write(b"lo").unwrap();
        let mut f = w.finish(&cache, &good, Some(5)).unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
        assert_eq!(fs::read(cache.path(&good).unwrap()).unwrap(), b"hello");

        let other = digest::sha256_of(b"other");
        let mut w = cache.writer().unwrap();
        w.write(b"tampered").unwrap();
        let err = w.finish(&cache, &other, None).unwrap_err();
        assert!(err.contains("does not match"), "{err}");
        assert!(cache.open(&other).is_none());
        let names: Vec<_> = fs::read_dir(cache.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary files left: {names:?}");
    }

    #[test]
    fn a_download_survives_the_cache_being_renamed_away() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::new(dir.path().join("oci"));
        let want = digest::sha256_of(b"data");
        let mut w = cache.writer().unwrap();
        w.write(b"da").unwrap();
        fs::rename(dir.path().join("oci"), dir.path().join(".pruning")).unwrap();
        fs::remove_dir_all(dir.path().join(".pruning")).unwrap();
        w.write(b"ta").unwrap();
        let mut f = w.finish(&cache, &want, Some(4)).unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "data");
        assert!(
            cache.open(&want).is_some(),
            "published into the fresh cache"
        );
    }
}
