//! What `vm stats` asks the guest: memory and load from /proc, and how full
//! each filesystem is (statfs). Read in-process: the image needs nothing.

use banger_proto::agent::{GuestFs, GuestStats};

pub fn read(paths: &[String]) -> std::io::Result<GuestStats> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let kib = |key: &str| -> u64 {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let loadavg = std::fs::read_to_string("/proc/loadavg")?;
    let mut load = [0.0; 3];
    for (slot, field) in load.iter_mut().zip(loadavg.split_whitespace()) {
        *slot = field.parse().unwrap_or(0.0);
    }
    let filesystems = paths
        .iter()
        .filter_map(|path| {
            // A path that is not there (no work disk) is left out.
            let st = nix::sys::statvfs::statvfs(path.as_str()).ok()?;
            let frag = st.fragment_size();
            let total = st.blocks() * frag;
            Some(GuestFs {
                path: path.clone(),
                total_bytes: total,
                used_bytes: total.saturating_sub(st.blocks_free() * frag),
                available_bytes: st.blocks_available() * frag,
            })
        })
        .collect();
    Ok(GuestStats {
        mem_total_bytes: kib("MemTotal") << 10,
        mem_available_bytes: kib("MemAvailable") << 10,
        load,
        filesystems,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_this_machine() {
        let s = super::read(&["/".into(), "/no/such/dir".into()]).unwrap();
        assert!(s.mem_total_bytes > s.mem_available_bytes && s.mem_available_bytes > 0);
        assert_eq!(s.filesystems.len(), 1);
        let root = &s.filesystems[0];
        assert!(root.total_bytes >= root.used_bytes && root.total_bytes > 0);
    }
}
