//! Finding the static guest agent binary that goes into every initramfs.

use std::path::PathBuf;

/// `BANGER_AGENT_BIN`, else `banger-agent` beside the running executable,
/// else (in a source checkout) the one `scripts/build-agent` builds.
pub fn locate() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("BANGER_AGENT_BIN").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() && is_static_elf(&path) {
            Ok(path)
        } else if path.is_file() {
            Err(format!(
                "BANGER_AGENT_BIN points at {}, which is not a static executable (build it with `scripts/build-agent`)",
                path.display()
            ))
        } else {
            Err(format!(
                "BANGER_AGENT_BIN points at {}, which does not exist",
                path.display()
            ))
        };
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    let candidates = [
        dir.join("banger-agent"),
        dir.join("../x86_64-unknown-linux-gnu/agent/banger-agent"),
        dir.join("../../x86_64-unknown-linux-gnu/agent/banger-agent"),
    ];
    candidates
        .iter()
        .find(|p| p.is_file() && is_static_elf(p))
        .map(|p| p.canonicalize().unwrap_or_else(|_| p.clone()))
        .ok_or_else(|| {
            "the static guest agent binary (banger-agent) was not found next to banger; build it \
             with `scripts/build-agent` or set BANGER_AGENT_BIN"
                .to_string()
        })
}

/// A 64-bit ELF executable without an interpreter: it can run as PID 1 in any
/// image, whatever libc the image has (or lacks).
pub fn is_static_elf(path: &std::path::Path) -> bool {
    let Ok(data) = std::fs::read(path) else {
        return false;
    };
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 {
        return false;
    }
    let u16_at = |at: usize| u16::from_le_bytes([data[at], data[at + 1]]) as usize;
    let phoff = u64::from_le_bytes(data[0x20..0x28].try_into().expect("8 bytes")) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let at = phoff + i * phentsize;
        // PT_INTERP = 3: a dynamic loader is needed.
        data.get(at..at + 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().expect("4 bytes")) != 3)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn tells_static_from_dynamic_executables() {
        // /bin/sh on any distribution is dynamically linked.
        assert!(!super::is_static_elf(std::path::Path::new("/bin/sh")));
        assert!(!super::is_static_elf(std::path::Path::new("/nonexistent")));
        if let Ok(busybox) = std::fs::canonicalize("/bin/busybox") {
            if busybox.to_string_lossy().contains("busybox") && std::fs::read(&busybox).is_ok() {
                // busybox-static is static; the dynamic busybox package is not: only assert when known.
                let _ = super::is_static_elf(&busybox);
            }
        }
    }
}
