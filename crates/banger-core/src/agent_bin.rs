//! Finding the static guest agent binary that goes into every initramfs.

use std::path::PathBuf;

crate::error::message_error! {
    /// The agent binary is missing or unusable; the message says how to fix it.
    AgentBinError
}

/// Where an install puts the agent and the root helper, under the prefix
/// that holds `bin/banger` (`/usr` for the package, `/usr/local` for
/// `scripts/install` and `system install`): files for banger's own use,
/// not commands for users.
pub const INSTALLED_AGENT: &str = "lib/banger/banger-agent";
pub const INSTALLED_HELPER: &str = "lib/banger/banger-root-helper";

/// `explicit` (the `agent_binary` setting, which `BANGER_AGENT_BIN`
/// overrides), else the installed agent beside the running executable
/// (`PREFIX/lib/banger/`, or the same directory), else (in a source
/// checkout) the one `scripts/build-agent` builds.
pub fn locate(explicit: Option<&str>) -> Result<PathBuf, AgentBinError> {
    if let Some(path) = explicit.filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() && is_static_elf(&path) {
            Ok(path)
        } else if path.is_file() {
            Err(format!(
                "BANGER_AGENT_BIN points at {}, which is not a static executable (build it with `scripts/build-agent`)",
                path.display()
            ).into())
        } else {
            Err(format!(
                "BANGER_AGENT_BIN points at {}, which does not exist",
                path.display()
            )
            .into())
        };
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let candidates = candidates(&exe);
    candidates
        .iter()
        .find(|p| p.is_file() && is_static_elf(p))
        .map(|p| p.canonicalize().unwrap_or_else(|_| p.clone()))
        .ok_or_else(|| {
            format!(
                "the static guest agent (banger-agent) is not installed beside {} (looked for \
                 {}); `cargo install` installs banger alone: run `scripts/install` from banger's \
                 checkout, or install its Debian package (docs/install.md)",
                exe.display(),
                candidates[0].display()
            )
        })
        .map_err(Into::into)
}

/// Where the agent may be, for the banger at `exe`: installed, beside it,
/// or built in the checkout whose target directory holds it.
pub fn candidates(exe: &std::path::Path) -> Vec<PathBuf> {
    let dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    let prefix = dir.parent().map(PathBuf::from).unwrap_or_default();
    vec![
        prefix.join(INSTALLED_AGENT),
        dir.join("banger-agent"),
        dir.join("../x86_64-unknown-linux-gnu/agent/banger-agent"),
        dir.join("../../x86_64-unknown-linux-gnu/agent/banger-agent"),
    ]
}

/// A 64-bit ELF executable without an interpreter: it can run as PID 1 in any
/// image, whatever libc the image has (or lacks). Reads only the headers: the
/// check runs on every `vm start`, and the whole binary is megabytes.
pub fn is_static_elf(path: &std::path::Path) -> bool {
    use banger_proto::elf;
    use std::os::unix::fs::FileExt;
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    let mut header = [0u8; elf::HEADER_LEN];
    if file.read_exact_at(&mut header, 0).is_err() {
        return false;
    }
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let Some(end) = elf::headers_end(&header).filter(|&end| end as u64 <= len) else {
        return false;
    };
    let mut headers = vec![0u8; end];
    if file.read_exact_at(&mut headers, 0).is_err() {
        return false;
    }
    // A dynamic loader is needed when there is an interpreter.
    elf::program_headers(&headers)
        .is_some_and(|table| table.iter().all(|h| h.kind != elf::PT_INTERP))
}

#[cfg(test)]
mod tests {
    /// A 64-bit ELF header whose program headers have these types.
    fn elf(types: &[u32]) -> Vec<u8> {
        let mut data = vec![0u8; 64];
        data[..6].copy_from_slice(b"\x7fELF\x02\x01");
        data[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        data[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        data[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for t in types {
            let mut entry = vec![0u8; 56];
            entry[..4].copy_from_slice(&t.to_le_bytes());
            data.extend(entry);
        }
        data
    }

    #[test]
    fn tells_static_from_dynamic_executables() {
        let dir = tempfile::tempdir().unwrap();
        let check = |name: &str, data: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, data).unwrap();
            super::is_static_elf(&path)
        };
        assert!(check("static", &elf(&[1, 1, 4])));
        assert!(!check("dynamic", &elf(&[6, 3, 1])));
        let truncated = elf(&[1, 1]);
        assert!(!check("truncated", &truncated[..100]));
        assert!(!check("short", b"\x7fELF"));
        assert!(!check("script", b"#!/bin/sh\necho hi\n"));
        // /bin/sh on any distribution is dynamically linked.
        assert!(!super::is_static_elf(std::path::Path::new("/bin/sh")));
        assert!(!super::is_static_elf(std::path::Path::new("/nonexistent")));
    }
}
