//! The few words the protocol, the store and the core share: a VM's state,
//! its VMM, how its root disk shares blocks with its image. Each reads and
//! writes as the same lowercase word it always had on the wire and in the
//! database, and compares equal to that word.

use serde::{Deserialize, Serialize};

macro_rules! word_enum {
    ($(#[$doc:meta])* $name:ident, $what:literal { $($(#[$vdoc:meta])* $variant:ident = $word:literal),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $( $(#[$vdoc])* #[serde(rename = $word)] $variant, )*
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $word, )*
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $( $word => Ok($name::$variant), )*
                    other => Err(format!(
                        concat!("unknown ", $what, " `{}` (use {})"),
                        other,
                        [$($word),*].join(" or ")
                    )),
                }
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.as_str() == other
            }
        }
    };
}

word_enum! {
    /// What a VM's VMM process really is now.
    VmState, "VM state" {
        Running = "running",
        /// The VMM lives but runs no guest (QEMU stopped it on a full disk).
        Paused = "paused",
        Stopped = "stopped",
    }
}

word_enum! {
    /// The virtual machine monitor a VM runs on.
    VmmKind, "VMM" {
        Qemu = "qemu",
        Firecracker = "firecracker",
    }
}

word_enum! {
    /// How a VM's root filesystem is made from its image (`--root-mode`).
    RootMode, "root mode" {
        /// The image attached read-only to every VM made from it, under an
        /// overlay whose writes land on the VM's own sparse disk: constant
        /// time and space per VM, on any host.
        Overlay = "overlay",
        /// Blocks shared with the image until written (FICLONE: btrfs, xfs).
        Reflink = "reflink",
        /// A sparse full copy: works everywhere, costs the image's size.
        Copy = "copy",
        /// A device-mapper snapshot through the privileged helper.
        DmSnapshot = "dm-snapshot",
    }
}

word_enum! {
    /// How VMs get a network (`network.mode`).
    NetworkMode, "network mode" {
        /// `bridged` when banger may make taps (root or the root helper),
        /// else `user`.
        Auto = "auto",
        /// A tap per VM on banger's subnet: an address, NAT, `NAME.vm`
        /// names, VM↔VM within isolation rules. Needs root or the helper.
        Bridged = "bridged",
        /// The VMM's own user-mode NAT (QEMU `-netdev user`): outbound only,
        /// needs no privilege.
        User = "user",
        None = "none",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_the_wire_and_database_form() {
        for kind in VmmKind::ALL {
            let json = serde_json::to_string(kind).unwrap();
            assert_eq!(json, format!("\"{kind}\""));
            assert_eq!(kind.as_str().parse::<VmmKind>().unwrap(), *kind);
        }
        assert_eq!(
            serde_json::to_value(RootMode::DmSnapshot).unwrap(),
            "dm-snapshot"
        );
        assert_eq!(VmState::Paused, "paused");
    }

    #[test]
    fn an_unknown_word_is_refused_with_the_choices() {
        assert_eq!(
            "kvmtool".parse::<VmmKind>().unwrap_err(),
            "unknown VMM `kvmtool` (use qemu or firecracker)"
        );
    }
}
