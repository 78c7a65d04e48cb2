//! The `sftp` subsystem, so `sftp`, `scp` (which speaks sftp since OpenSSH 9)
//! and editors work against any image, with or without an sftp-server of its
//! own. Paths are the guest's; relative ones start at root's home.

use std::collections::HashMap;
use std::fs::{File as FsFile, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use russh_sftp::protocol::{
    Attrs, Data, File, FileAttributes, Handle, Name, OpenFlags, Status, StatusCode, Version,
};
use russh_sftp::server::StatusReply;

/// Entries per READDIR reply.
const DIR_CHUNK: usize = 128;
/// Largest READ reply (clients ask for 32–256 KiB).
const MAX_READ: u32 = 256 * 1024;

/// The sftp channel's stream; when the server lets go of it, the client
/// gets exit status 0 before the channel closes (scp checks it).
pub struct Ending {
    inner: Option<russh::ChannelStream<russh::server::Msg>>,
    handle: russh::server::Handle,
    channel: russh::ChannelId,
}

impl Ending {
    pub fn new(
        inner: russh::ChannelStream<russh::server::Msg>,
        handle: russh::server::Handle,
        channel: russh::ChannelId,
    ) -> Ending {
        Ending {
            inner: Some(inner),
            handle,
            channel,
        }
    }

    fn inner(&mut self) -> &mut russh::ChannelStream<russh::server::Msg> {
        self.inner.as_mut().expect("present until drop")
    }
}

impl Drop for Ending {
    fn drop(&mut self) {
        let (inner, handle, channel) = (self.inner.take(), self.handle.clone(), self.channel);
        tokio::spawn(async move {
            let _ = handle.exit_status_request(channel, 0).await;
            let _ = handle.eof(channel).await;
            drop(inner);
            let _ = handle.close(channel).await;
        });
    }
}

impl tokio::io::AsyncRead for Ending {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(self.inner()).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Ending {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(self.inner()).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(self.inner()).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(self.inner()).poll_shutdown(cx)
    }
}

enum Open {
    File(FsFile),
    /// Entries not yet sent.
    Dir(Vec<File>),
}

pub struct Sftp {
    home: PathBuf,
    handles: HashMap<String, Open>,
    next: u64,
}

impl Sftp {
    pub fn new() -> Sftp {
        let home = PathBuf::from("/root");
        Sftp {
            home: if home.is_dir() {
                home
            } else {
                PathBuf::from("/")
            },
            handles: HashMap::new(),
            next: 0,
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        if p.is_empty() {
            self.home.clone()
        } else {
            self.home.join(p) // An absolute `p` replaces the home.
        }
    }

    fn add(&mut self, open: Open) -> String {
        self.next += 1;
        let handle = self.next.to_string();
        self.handles.insert(handle.clone(), open);
        handle
    }

    fn file(&self, handle: &str) -> Result<&FsFile, StatusReply> {
        match self.handles.get(handle) {
            Some(Open::File(f)) => Ok(f),
            _ => Err(StatusReply::new(StatusCode::Failure).with_message("bad handle")),
        }
    }
}

fn ok(id: u32) -> Status {
    Status {
        id,
        status_code: StatusCode::Ok,
        error_message: "Ok".into(),
        language_tag: "en-US".into(),
    }
}

fn io(e: std::io::Error) -> StatusReply {
    let code = match e.kind() {
        std::io::ErrorKind::NotFound => StatusCode::NoSuchFile,
        std::io::ErrorKind::PermissionDenied => StatusCode::PermissionDenied,
        _ => StatusCode::Failure,
    };
    StatusReply::new(code).with_message(e.to_string())
}

/// `.` and `..` resolved without touching the disk (the path may not exist yet).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(part) => out.push(part),
            _ => {}
        }
    }
    out
}

/// Applies the attributes a client set (mode, owner, times, size).
fn apply(path: &Path, file: Option<&FsFile>, attrs: &FileAttributes) -> std::io::Result<()> {
    if let Some(size) = attrs.size {
        match file {
            Some(f) => f.set_len(size)?,
            None => OpenOptions::new().write(true).open(path)?.set_len(size)?,
        }
    }
    if let Some(mode) = attrs.permissions {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7777))?;
    }
    if attrs.uid.is_some() || attrs.gid.is_some() {
        std::os::unix::fs::chown(path, attrs.uid, attrs.gid)?;
    }
    if let (Some(atime), Some(mtime)) = (attrs.atime, attrs.mtime) {
        let at = |secs: u32| std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.into());
        let times = std::fs::FileTimes::new()
            .set_accessed(at(atime))
            .set_modified(at(mtime));
        match file {
            Some(f) => f.set_times(times)?,
            None => FsFile::open(path)?.set_times(times)?,
        }
    }
    Ok(())
}

impl russh_sftp::server::Handler for Sftp {
    type Error = StatusReply;

    fn unimplemented(&self) -> StatusReply {
        StatusReply::new(StatusCode::OpUnsupported)
    }

    async fn init(
        &mut self,
        _version: u32,
        _extensions: HashMap<String, String>,
    ) -> Result<Version, StatusReply> {
        Ok(Version::new())
    }

    async fn open(
        &mut self,
        id: u32,
        filename: String,
        pflags: OpenFlags,
        attrs: FileAttributes,
    ) -> Result<Handle, StatusReply> {
        let path = self.path(&filename);
        let mut opts = OpenOptions::new();
        opts.read(pflags.contains(OpenFlags::READ))
            .write(pflags.contains(OpenFlags::WRITE) || pflags.contains(OpenFlags::APPEND))
            .append(pflags.contains(OpenFlags::APPEND))
            .truncate(pflags.contains(OpenFlags::TRUNCATE))
            .mode(attrs.permissions.map_or(0o644, |m| m & 0o7777));
        if pflags.contains(OpenFlags::CREATE) {
            if pflags.contains(OpenFlags::EXCLUDE) {
                opts.create_new(true);
            } else {
                opts.create(true);
            }
        }
        let file = opts.open(&path).map_err(io)?;
        let handle = self.add(Open::File(file));
        Ok(Handle { id, handle })
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, StatusReply> {
        self.handles.remove(&handle);
        Ok(ok(id))
    }

    async fn read(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        len: u32,
    ) -> Result<Data, StatusReply> {
        let file = self.file(&handle)?;
        let mut data = vec![0u8; len.min(MAX_READ) as usize];
        let n = file.read_at(&mut data, offset).map_err(io)?;
        if n == 0 {
            return Err(StatusReply::new(StatusCode::Eof));
        }
        data.truncate(n);
        Ok(Data { id, data })
    }

    async fn write(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<Status, StatusReply> {
        self.file(&handle)?
            .write_all_at(&data, offset)
            .map_err(io)?;
        Ok(ok(id))
    }

    async fn lstat(&mut self, id: u32, path: String) -> Result<Attrs, StatusReply> {
        let meta = std::fs::symlink_metadata(self.path(&path)).map_err(io)?;
        Ok(Attrs {
            id,
            attrs: FileAttributes::from(&meta),
        })
    }

    async fn stat(&mut self, id: u32, path: String) -> Result<Attrs, StatusReply> {
        let meta = std::fs::metadata(self.path(&path)).map_err(io)?;
        Ok(Attrs {
            id,
            attrs: FileAttributes::from(&meta),
        })
    }

    async fn fstat(&mut self, id: u32, handle: String) -> Result<Attrs, StatusReply> {
        let meta = self.file(&handle)?.metadata().map_err(io)?;
        Ok(Attrs {
            id,
            attrs: FileAttributes::from(&meta),
        })
    }

    async fn setstat(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, StatusReply> {
        apply(&self.path(&path), None, &attrs).map_err(io)?;
        Ok(ok(id))
    }

    async fn fsetstat(
        &mut self,
        id: u32,
        handle: String,
        attrs: FileAttributes,
    ) -> Result<Status, StatusReply> {
        let file = self.file(&handle)?;
        let path = std::fs::read_link(format!("/proc/self/fd/{}", {
            use std::os::fd::AsRawFd;
            file.as_raw_fd()
        }))
        .map_err(io)?;
        apply(&path, Some(file), &attrs).map_err(io)?;
        Ok(ok(id))
    }

    async fn opendir(&mut self, id: u32, path: String) -> Result<Handle, StatusReply> {
        let dir = self.path(&path);
        let mut entries = Vec::new();
        for name in [".", ".."] {
            if let Ok(meta) = std::fs::metadata(dir.join(name)) {
                entries.push(File::new(name, FileAttributes::from(&meta)));
            }
        }
        for entry in std::fs::read_dir(&dir).map_err(io)?.flatten() {
            if let Ok(meta) = entry.path().symlink_metadata() {
                entries.push(File::new(
                    entry.file_name().to_string_lossy(),
                    FileAttributes::from(&meta),
                ));
            }
        }
        entries.reverse(); // Sent from the back.
        let handle = self.add(Open::Dir(entries));
        Ok(Handle { id, handle })
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Result<Name, StatusReply> {
        let Some(Open::Dir(entries)) = self.handles.get_mut(&handle) else {
            return Err(StatusReply::new(StatusCode::Failure).with_message("bad handle"));
        };
        if entries.is_empty() {
            return Err(StatusReply::new(StatusCode::Eof));
        }
        let keep = entries.len().saturating_sub(DIR_CHUNK);
        let files = entries.split_off(keep).into_iter().rev().collect();
        Ok(Name { id, files })
    }

    async fn remove(&mut self, id: u32, filename: String) -> Result<Status, StatusReply> {
        std::fs::remove_file(self.path(&filename)).map_err(io)?;
        Ok(ok(id))
    }

    async fn mkdir(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, StatusReply> {
        let path = self.path(&path);
        std::fs::create_dir(&path).map_err(io)?;
        if let Some(mode) = attrs.permissions {
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777));
        }
        Ok(ok(id))
    }

    async fn rmdir(&mut self, id: u32, path: String) -> Result<Status, StatusReply> {
        std::fs::remove_dir(self.path(&path)).map_err(io)?;
        Ok(ok(id))
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, StatusReply> {
        let full = self.path(&path);
        let real = full.canonicalize().unwrap_or_else(|_| normalize(&full));
        Ok(Name {
            id,
            files: vec![File::dummy(real.to_string_lossy())],
        })
    }

    async fn rename(
        &mut self,
        id: u32,
        oldpath: String,
        newpath: String,
    ) -> Result<Status, StatusReply> {
        std::fs::rename(self.path(&oldpath), self.path(&newpath)).map_err(io)?;
        Ok(ok(id))
    }

    async fn readlink(&mut self, id: u32, path: String) -> Result<Name, StatusReply> {
        let target = std::fs::read_link(self.path(&path)).map_err(io)?;
        Ok(Name {
            id,
            files: vec![File::dummy(target.to_string_lossy())],
        })
    }

    /// OpenSSH sends the link's target first and the new link second (the
    /// reverse of the draft's field names); follow OpenSSH, as clients do.
    async fn symlink(
        &mut self,
        id: u32,
        linkpath: String,
        targetpath: String,
    ) -> Result<Status, StatusReply> {
        std::os::unix::fs::symlink(&linkpath, self.path(&targetpath)).map_err(io)?;
        Ok(ok(id))
    }
}

#[cfg(test)]
mod tests {
    use super::normalize;
    use std::path::Path;

    #[test]
    fn paths_normalize_without_escaping_the_root() {
        assert_eq!(
            normalize(Path::new("/root/../etc/./x")),
            Path::new("/etc/x")
        );
        assert_eq!(normalize(Path::new("/../../a")), Path::new("/a"));
    }
}
