//! Guest kernels: importing them (Debian packages, bzImages, ELF vmlinux),
//! and building the initramfs that boots them into banger's agent.

pub mod bzimage;
pub mod cpio;
pub mod deb;
pub mod decompress;
pub mod initramfs;
pub mod modinfo;

crate::error::message_error! {
    /// A kernel file banger cannot use: not a kernel, corrupt, too big, or
    /// missing a part (its image, its modules).
    KernelError
}
