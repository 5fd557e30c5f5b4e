//! Static binaries for the guest (`guest-init`, the VM tests' init, example functions): built
//! with `-C target-feature=+crt-static` for an explicit `--target`, so that build scripts and
//! proc macros stay dynamic, into one target directory of their own (`target/static`), so the
//! flag change does not invalidate the workspace's normal build.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Rust target guest binaries are built for.
pub const TARGET: &str = "x86_64-unknown-linux-gnu";

#[derive(Debug, thiserror::Error)]
pub enum StaticBuildError {
    #[error("cannot run cargo ({cargo}): {source}")]
    Spawn { cargo: String, source: io::Error },
    #[error("building {bin} failed ({status}); run: {command}")]
    Build {
        bin: String,
        status: String,
        command: String,
    },
    #[error("{} is not a static executable (it has an ELF interpreter)", .0.display())]
    NotStatic(PathBuf),
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
}

/// The workspace this crate was built in.
pub fn workspace_dir() -> PathBuf {
    let me = Path::new(env!("CARGO_MANIFEST_DIR"));
    me.parent().unwrap_or(me).to_path_buf()
}

/// Builds binary `bin` of workspace package `package` statically (release, stripped: the
/// guest kernel copies every byte of an initramfs, emulated on some hosts) and returns its
/// path, after checking it has no ELF interpreter. Slow the first time.
pub fn build(package: &str, bin: &str) -> Result<PathBuf, StaticBuildError> {
    let workspace = workspace_dir();
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("static");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let command = format!(
        "RUSTFLAGS='-C target-feature=+crt-static -C strip=symbols' {cargo} build --release -p {package} \
         --bin {bin} --target {TARGET} --target-dir {}",
        target_dir.display()
    );
    let status = Command::new(&cargo)
        .current_dir(&workspace)
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            package,
            "--bin",
            bin,
            "--target",
            TARGET,
            "--target-dir",
        ])
        .arg(&target_dir)
        // CARGO_ENCODED_RUSTFLAGS wins over RUSTFLAGS and config; set both consistently.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Ctarget-feature=+crt-static\x1f-Cstrip=symbols",
        )
        .env("RUSTFLAGS", "-Ctarget-feature=+crt-static -Cstrip=symbols")
        .status()
        .map_err(|source| StaticBuildError::Spawn {
            cargo: cargo.clone(),
            source,
        })?;
    if !status.success() {
        return Err(StaticBuildError::Build {
            bin: bin.to_string(),
            status: status.to_string(),
            command,
        });
    }
    let path = target_dir.join(TARGET).join("release").join(bin);
    let bytes = fs::read(&path).map_err(|source| StaticBuildError::Io {
        context: format!("read {}", path.display()),
        source,
    })?;
    if elf_has_interpreter(&bytes) != Some(false) {
        return Err(StaticBuildError::NotStatic(path));
    }
    Ok(path)
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

    #[test]
    fn interpreter_detection() {
        // This test binary is dynamically linked (the workspace does not use crt-static).
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(elf_has_interpreter(&me), Some(true));
        assert_eq!(elf_has_interpreter(b"not an elf"), None);
        assert_eq!(elf_has_interpreter(b"\x7fELF\x02\x01 truncated"), None);
    }

    /// A nested cargo build: slow the first time. The VM tests run it for real.
    #[test]
    #[ignore = "runs a nested cargo build"]
    fn builds_a_static_binary() {
        let bin = build("guest-test-init", "guest-test-init").unwrap();
        assert_eq!(elf_has_interpreter(&fs::read(bin).unwrap()), Some(false));
    }
}
