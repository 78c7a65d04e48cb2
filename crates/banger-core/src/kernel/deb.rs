//! Kernels from Debian packages (`linux-image-*.deb`): the image from
//! /boot/vmlinuz-*, its config, and /lib/modules/* (or /usr/lib/modules/*).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek};
use std::path::{Path, PathBuf};

use crate::rootfs::path_safety::normalize_entry_path;

pub struct DebKernel {
    pub image: Vec<u8>,
    pub config: Option<String>,
    /// `lib/modules/<version>` as unpacked under the destination.
    pub modules_dir: Option<PathBuf>,
    pub version: Option<String>,
}

pub fn is_deb(head: &[u8]) -> bool {
    head.starts_with(b"!<arch>\ndebian-binary")
}

/// The largest kernel image or config a package may hold.
const MAX_MEMBER: u64 = 256 << 20;
/// The largest data.tar a kernel package may unpack to (Debian's cloud
/// kernel's is ~350 MiB, mostly modules).
const MAX_DATA_TAR: u64 = 4 << 30;

/// Unpacks the kernel parts of `deb`; modules go under `modules_dest`.
pub fn unpack(
    deb: &Path,
    modules_dest: &Path,
    scratch: &Path,
) -> Result<DebKernel, super::KernelError> {
    let file = File::open(deb).map_err(|e| format!("{}: {e}", deb.display()))?;
    let mut archive = ar::Archive::new(file);
    while let Some(entry) = archive.next_entry() {
        let mut entry = entry.map_err(|e| format!("reading the package: {e}"))?;
        let id = String::from_utf8_lossy(entry.header().identifier()).into_owned();
        if !id.starts_with("data.tar") {
            continue;
        }
        // Decompress to a scratch file: xz has no streaming reader here.
        let tar_path = scratch.join("data.tar");
        {
            let file = File::create(&tar_path).map_err(|e| e.to_string())?;
            let mut out = BufWriter::new(CappedFile {
                file,
                left: MAX_DATA_TAR,
            });
            match id.as_str() {
                "data.tar.xz" => lzma_rs::xz_decompress(&mut BufReader::new(&mut entry), &mut out)
                    .map_err(|e| format!("data.tar.xz: {e}"))?,
                "data.tar.zst" => {
                    let mut d =
                        zstd::stream::read::Decoder::new(&mut entry).map_err(|e| e.to_string())?;
                    std::io::copy(&mut d, &mut out).map_err(|e| format!("data.tar.zst: {e}"))?;
                }
                "data.tar.gz" => {
                    std::io::copy(&mut flate2::read::GzDecoder::new(&mut entry), &mut out)
                        .map_err(|e| format!("data.tar.gz: {e}"))?;
                }
                "data.tar" => {
                    std::io::copy(&mut entry, &mut out).map_err(|e| e.to_string())?;
                }
                other => return Err(format!("unsupported package member {other}").into()),
            }
        }
        let mut tar_file = File::open(&tar_path).map_err(|e| e.to_string())?;
        tar_file.rewind().map_err(|e| e.to_string())?;
        let result = from_data_tar(tar_file, modules_dest);
        let _ = std::fs::remove_file(&tar_path);
        return result.map_err(super::KernelError);
    }
    Err("the package has no data.tar member".into())
}

/// A file that refuses writes past a size: a package's data.tar that keeps
/// expanding is a bomb, not a kernel.
struct CappedFile {
    file: File,
    left: u64,
}

impl std::io::Write for CappedFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() as u64 > self.left {
            return Err(std::io::Error::other(format!(
                "the package unpacks to more than {} MiB",
                MAX_DATA_TAR >> 20
            )));
        }
        let n = self.file.write(buf)?;
        self.left -= n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

fn from_data_tar(tar: impl Read, modules_dest: &Path) -> Result<DebKernel, String> {
    let mut kernel = DebKernel {
        image: Vec::new(),
        config: None,
        modules_dir: None,
        version: None,
    };
    let mut archive = tar::Archive::new(tar);
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        let raw = entry.path_bytes().into_owned();
        let rel = normalize_entry_path(&raw)
            .map_err(|e| format!("`{}`: {e}", String::from_utf8_lossy(&raw)))?;
        let text = rel.to_string_lossy().into_owned();
        if let Some(name) = text.strip_prefix("boot/vmlinuz-") {
            (&mut entry)
                .take(MAX_MEMBER + 1)
                .read_to_end(&mut kernel.image)
                .map_err(|e| e.to_string())?;
            if kernel.image.len() as u64 > MAX_MEMBER {
                return Err(format!("{text} is larger than {} MiB", MAX_MEMBER >> 20));
            }
            kernel.version.get_or_insert_with(|| name.to_string());
        } else if text.starts_with("boot/config-") {
            let mut s = String::new();
            (&mut entry)
                .take(MAX_MEMBER)
                .read_to_string(&mut s)
                .map_err(|e| e.to_string())?;
            kernel.config = Some(s);
        } else if let Some(under) = text
            .strip_prefix("usr/lib/modules/")
            .or_else(|| text.strip_prefix("lib/modules/"))
        {
            let version = under.split('/').next().unwrap_or_default().to_string();
            if version.is_empty() {
                continue;
            }
            let dest = modules_dest.join(under);
            match entry.header().entry_type() {
                tar::EntryType::Directory => {
                    std::fs::create_dir_all(&dest).map_err(|e| e.to_string())?
                }
                tar::EntryType::Regular => {
                    if let Some(parent) = dest.parent() {
                        std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
                    }
                    let mut out = File::create(&dest).map_err(|e| e.to_string())?;
                    std::io::copy(&mut entry, &mut out).map_err(|e| e.to_string())?;
                }
                _ => {}
            }
            kernel
                .modules_dir
                .get_or_insert_with(|| modules_dest.join(&version));
        }
    }
    if kernel.image.is_empty() {
        return Err("the package has no /boot/vmlinuz-*".into());
    }
    Ok(kernel)
}
