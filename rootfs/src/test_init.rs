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
use std::process::Command;

use crate::initramfs::Initramfs;

/// The Rust target the test init is built for (statically, with `+crt-static`).
pub const TEST_INIT_TARGET: &str = "x86_64-unknown-linux-gnu";

#[derive(Debug, thiserror::Error)]
pub enum TestInitError {
    #[error("cannot run cargo ({cargo}): {source}")]
    Spawn { cargo: String, source: io::Error },
    #[error("building guest-test-init failed ({status}); run: {command}")]
    Build { status: String, command: String },
    #[error("{} is not a static executable (it has an ELF interpreter)", .0.display())]
    NotStatic(PathBuf),
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
}

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

/// Builds `tests/guest-test-init` as a static release binary and returns its path.
///
/// The workspace builds the crate normally (dynamically linked, for clippy and unit tests);
/// this builds it again for the guest with `-C target-feature=+crt-static` for an explicit
/// `--target` (so build scripts stay dynamic) into its own target directory
/// (`target/guest-test-init`, so the flag change does not invalidate the main build).
pub fn build_test_init() -> Result<PathBuf, TestInitError> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("rootfs lives in the workspace")
        .to_path_buf();
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("guest-test-init");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&workspace)
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "guest-test-init",
            "--target",
            TEST_INIT_TARGET,
            "--target-dir",
        ])
        .arg(&target_dir)
        // CARGO_ENCODED_RUSTFLAGS wins over RUSTFLAGS and config; set both consistently.
        // Stripped: the kernel copies the whole initramfs, and that copy is emulated on
        // some hosts.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Ctarget-feature=+crt-static\x1f-Cstrip=symbols",
        )
        .env("RUSTFLAGS", "-Ctarget-feature=+crt-static -Cstrip=symbols");
    let command = format!(
        "RUSTFLAGS='-C target-feature=+crt-static -C strip=symbols' {cargo} build --release -p guest-test-init \
         --target {TEST_INIT_TARGET} --target-dir {}",
        target_dir.display()
    );
    let status = cmd.status().map_err(|source| TestInitError::Spawn {
        cargo: cargo.clone(),
        source,
    })?;
    if !status.success() {
        return Err(TestInitError::Build {
            status: status.to_string(),
            command,
        });
    }
    let bin = target_dir
        .join(TEST_INIT_TARGET)
        .join("release")
        .join("guest-test-init");
    let bytes = fs::read(&bin).map_err(|source| TestInitError::Io {
        context: format!("read {}", bin.display()),
        source,
    })?;
    if elf_has_interpreter(&bytes) != Some(false) {
        return Err(TestInitError::NotStatic(bin));
    }
    Ok(bin)
}

/// Whether a 64-bit little-endian ELF has a PT_INTERP program header (is dynamically
/// linked); `None` when it is not such an ELF.
pub fn elf_has_interpreter(elf: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = u16_at(0x36)? as usize;
    let phnum = u16_at(0x38)? as usize;
    for i in 0..phnum {
        if u32_at(phoff.checked_add(i.checked_mul(phentsize)?)?)? == PT_INTERP {
            return Some(true);
        }
    }
    Some(false)
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

    #[test]
    fn interpreter_detection() {
        // This test binary is dynamically linked (the workspace does not use crt-static).
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(elf_has_interpreter(&me), Some(true));
        assert_eq!(elf_has_interpreter(b"not an elf"), None);
    }

    /// Builds the static test init (a nested cargo build: slow the first time).
    #[test]
    #[ignore = "runs a nested cargo build"]
    fn builds_a_static_test_init() {
        let bin = build_test_init().unwrap();
        assert_eq!(elf_has_interpreter(&fs::read(bin).unwrap()), Some(false));
    }
}
