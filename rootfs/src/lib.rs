//! Guest kernel and root image building (issues #4, #5 and #8).
//!
//! - [`kernel`]: our guest kernel (Debian's linux-source-6.1 + `kernel/patches` +
//!   `kernel/config.fragment`), built on demand and cached by a hash of its inputs:
//!   [`ensure_kernel`].
//! - [`initramfs`]: uncompressed newc cpio archives.
//! - [`static_bin`]: static builds of guest binaries (guest-init, the test init, examples).
//! - [`image`]: root images (ext4) from a directory, a Lambda ZIP or an OCI image.
//! - [`test_init`]: the VM integration tests' static init and its initramfs.

pub mod base;
pub mod image;
pub mod initramfs;
pub mod kernel;
pub mod static_bin;
pub mod test_init;

pub use initramfs::Initramfs;
pub use kernel::{
    ensure_kernel, ensure_kernel_build, Flavour, KernelBuild, KernelError, KernelOptions,
};
pub use test_init::{build_test_init, test_initramfs};
