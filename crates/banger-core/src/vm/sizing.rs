//! What a VM may be given: vCPUs, memory and disk checked at create against
//! the host and the VMM, with the allowed range in every refusal.

use banger_proto::domain::VmmKind;

/// The fewest MiB a VM boots in.
pub const MIN_MEMORY_MIB: u64 = 64;
/// The largest disk file (ext4's limit for one file with 4 KiB blocks).
pub const MAX_DISK_BYTES: u64 = 16 << 40;

/// The host's CPUs and memory, as the checks see them.
#[derive(Debug, Clone, Copy)]
pub struct Host {
    pub cpus: u32,
    pub memory_mib: u64,
}

impl Host {
    pub fn probe() -> Host {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))?
                    .split_whitespace()
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .map(|kib| kib / 1024)
            .unwrap_or(u64::MAX);
        Host { cpus, memory_mib }
    }
}

/// A size the VM cannot have, with the range it can.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error(
        "--vcpus {n} is out of range: {vmm} VMs here take 1 to {max} vCPUs (this host has \
         {host_cpus} CPUs)"
    )]
    Vcpus {
        n: u32,
        vmm: VmmKind,
        max: u32,
        host_cpus: u32,
    },
    #[error(
        "--memory {mib}M is out of range: a VM takes {MIN_MEMORY_MIB} MiB to {host_mib} MiB \
         (this host's memory)"
    )]
    Memory { mib: u64, host_mib: u64 },
    #[error(
        "--disk {} is out of range: at least the image's {} MiB, at most {} TiB",
        human(*bytes),
        image_bytes.div_ceil(1 << 20),
        MAX_DISK_BYTES >> 40
    )]
    Disk { bytes: u64, image_bytes: u64 },
    #[error(
        "--work-disk {} is out of range: at least {} MiB, at most {} TiB",
        human(*bytes),
        MIN_WORK_DISK_BYTES >> 20,
        MAX_DISK_BYTES >> 40
    )]
    WorkDisk { bytes: u64 },
}

/// The smallest work disk (ext4 with a journal needs a few MiB).
pub const MIN_WORK_DISK_BYTES: u64 = 64 << 20;

pub fn work_disk_bytes(bytes: u64) -> Result<u64, SizeError> {
    if !(MIN_WORK_DISK_BYTES..=MAX_DISK_BYTES).contains(&bytes) {
        return Err(SizeError::WorkDisk { bytes });
    }
    Ok(bytes)
}

pub fn vcpus(n: u32, vmm: VmmKind, host: Host) -> Result<u32, SizeError> {
    let vmm_max: u32 = match vmm {
        // Firecracker takes fewer than 32 (and 1 or an even count only with
        // SMT, which banger leaves off).
        VmmKind::Firecracker => 31,
        VmmKind::Qemu => 255,
    };
    let max = vmm_max.min(host.cpus.max(1));
    if n == 0 || n > max {
        return Err(SizeError::Vcpus {
            n,
            vmm,
            max,
            host_cpus: host.cpus,
        });
    }
    Ok(n)
}

pub fn memory_mib(mib: u64, host: Host) -> Result<u64, SizeError> {
    if mib < MIN_MEMORY_MIB || mib > host.memory_mib {
        return Err(SizeError::Memory {
            mib,
            host_mib: host.memory_mib,
        });
    }
    Ok(mib)
}

pub fn disk_bytes(bytes: u64, image_bytes: u64) -> Result<u64, SizeError> {
    if bytes < image_bytes || bytes > MAX_DISK_BYTES {
        return Err(SizeError::Disk { bytes, image_bytes });
    }
    Ok(bytes)
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 40 {
        format!("{}T", bytes >> 40)
    } else if bytes >= 1 << 30 {
        format!("{}G", bytes >> 30)
    } else {
        format!("{}M", bytes >> 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: Host = Host {
        cpus: 8,
        memory_mib: 16 * 1024,
    };

    #[test]
    fn sizes_outside_the_host_or_the_vmm_are_refused_with_the_range() {
        assert_eq!(vcpus(1, VmmKind::Qemu, HOST), Ok(1));
        assert_eq!(vcpus(8, VmmKind::Qemu, HOST), Ok(8));
        for bad in [0, 9, 1000] {
            let err = vcpus(bad, VmmKind::Qemu, HOST).unwrap_err().to_string();
            assert!(err.contains("1 to 8"), "{err}");
        }
        assert_eq!(vcpus(3, VmmKind::Firecracker, HOST), Ok(3));
        let big = Host {
            cpus: 64,
            memory_mib: 1,
        };
        assert!(vcpus(31, VmmKind::Firecracker, big).is_ok());
        assert!(vcpus(32, VmmKind::Firecracker, big)
            .unwrap_err()
            .to_string()
            .contains("1 to 31"));
        assert_eq!(memory_mib(512, HOST), Ok(512));
        for bad in [0, 63, 1 << 20] {
            let err = memory_mib(bad, HOST).unwrap_err().to_string();
            assert!(err.contains("64 MiB to 16384 MiB"), "{err}");
        }
        assert_eq!(disk_bytes(4 << 30, 1 << 30), Ok(4 << 30));
        let err = disk_bytes(100 << 40, 1 << 30).unwrap_err().to_string();
        assert!(err.contains("100T") && err.contains("16 TiB"), "{err}");
        let err = disk_bytes(1 << 20, 1 << 30).unwrap_err().to_string();
        assert!(err.contains("1024 MiB"), "{err}");
    }
}
