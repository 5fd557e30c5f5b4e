//! The VM integration tests' guest: the static `guest-test-init` binary
//! (`tests/guest-test-init`) packed as `/init` in an uncompressed initramfs.
//!
//! ```no_run
//! let init = rootfs::build_test_init().unwrap();
//! rootfs::test_initramfs(&init, std::path::Path::new("/tmp/test.cpio")).unwrap();
//! // boot with: -initrd /tmp/test.cpio, cmdline "... kindling.test=boot-only"
//! ```

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::initramfs::Initramfs;
use crate::static_bin::{self, StaticBuildError};

/// Packs `init_binary` as `/init` with the directories and device nodes an init needs
/// before it can mount anything: `/dev/console` (the kernel opens it for init's stdio
/// before running `/init`; devtmpfs is not automounted on an initramfs), `/dev/null`,
/// `/proc`, `/sys`, `/tmp`, `/root`.
pub fn test_initramfs(init_binary: &Path, out: &Path) -> io::Result<()> {
    let init = fs::read(init_binary)?;
    let mut fs = Initramfs::new();
    fs.dir("/dev", 0o755)
        .char_dev("/dev/console", 0o600, 5, 1)
        .char_dev("/dev/null", 0o666, 1, 3)
        .dir("/proc", 0o555)
        .dir("/sys", 0o555)
        .dir("/tmp", 0o1777)
        .dir("/root", 0o700)
        .file("/init", 0o755, init);
    fs.write_file(out)
}

/// Builds `tests/guest-test-init` statically (see [`crate::static_bin`]) and returns its path.
pub fn build_test_init() -> Result<PathBuf, StaticBuildError> {
    static_bin::build("guest-test-init", "guest-test-init")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::initramfs::parse;

    #[test]
    fn test_initramfs_has_init_console_and_mount_points() {
        let dir = tempfile::tempdir().unwrap();
        let init = dir.path().join("init-bin");
        fs::write(&init, b"\x7fELF fake init").unwrap();
        let out = dir.path().join("test.cpio");
        test_initramfs(&init, &out).unwrap();
        let parsed = parse(&fs::read(&out).unwrap()).unwrap();
        let get = |n: &str| {
            parsed
                .iter()
                .find(|p| p.name == n)
                .unwrap_or_else(|| panic!("{n} missing"))
        };
        assert_eq!(get("init").data, b"\x7fELF fake init");
        assert_eq!(get("init").mode, 0o100755);
        assert_eq!(get("dev/console").rdev, (5, 1));
        assert_eq!(get("dev/console").mode & 0o170000, 0o020000);
        for d in ["dev", "proc", "sys", "tmp"] {
            assert_eq!(get(d).mode & 0o170000, 0o040000, "{d} is a directory");
        }
    }
}
