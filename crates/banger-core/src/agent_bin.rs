//! Finding the static guest agent binary that goes into every initramfs.

use std::path::PathBuf;

/// `BANGER_AGENT_BIN`, else `banger-agent` beside the running executable,
/// else (in a source checkout) the one `scripts/build-agent` builds.
pub fn locate() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("BANGER_AGENT_BIN").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
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
        .find(|p| p.is_file())
        .map(|p| p.canonicalize().unwrap_or_else(|_| p.clone()))
        .ok_or_else(|| {
            "the guest agent binary (banger-agent) was not found next to banger; build it with \
             `scripts/build-agent` or set BANGER_AGENT_BIN"
                .to_string()
        })
}
