//! Unpacking a Lambda ZIP, treating the archive as hostile: no paths outside the target,
//! no symlinks pointing out, a cap on the entries and on the bytes actually written (not
//! the sizes the archive claims). The agent's code store (`host-agent`'s
//! `functions::extract_zip`) and the image builder share this one copy.

use std::fs;
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

/// Largest unpacked code size (Lambda's limit for a .zip package).
pub const MAX_UNZIPPED_BYTES: u64 = 250 * 1024 * 1024;
/// Most entries in one archive.
pub const MAX_ENTRIES: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum ZipError {
    /// Not a ZIP, or an entry that breaks the rules (unsafe path, symlink pointing out).
    #[error("{0}")]
    Invalid(String),
    /// More than the allowed bytes would be written.
    #[error("unzipped size must be smaller than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("writing code to disk: {0}")]
    Io(#[from] io::Error),
}

impl From<zip::result::ZipError> for ZipError {
    fn from(e: zip::result::ZipError) -> Self {
        ZipError::Invalid(e.to_string())
    }
}

/// Extracts the ZIP read from `zip` into `dest` (which must exist), writing at most
/// `max_bytes` bytes of file contents. Returns the bytes written.
pub fn extract_zip<R: Read + Seek>(zip: R, dest: &Path, max_bytes: u64) -> Result<u64, ZipError> {
    let mut archive = zip::ZipArchive::new(zip)?;
    if archive.len() > MAX_ENTRIES {
        return Err(ZipError::Invalid(format!(
            "more than {MAX_ENTRIES} entries"
        )));
    }
    let mut written: u64 = 0;
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i)?;
        let rel = entry
            .enclosed_name()
            .ok_or_else(|| ZipError::Invalid(format!("unsafe path {:?}", entry.name())))?;
        let path = dest.join(&rel);
        let mode = entry.unix_mode();
        if entry.is_dir() {
            fs::create_dir_all(&path)?;
            continue;
        }
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        if mode.is_some_and(|m| m & 0o170000 == 0o120000) {
            let mut target = String::new();
            (&mut entry)
                .take(4096)
                .read_to_string(&mut target)
                .map_err(|_| ZipError::Invalid("symlink target is not UTF-8".into()))?;
            if !link_stays_inside(&rel, Path::new(&target)) {
                return Err(ZipError::Invalid(format!(
                    "symlink {} points outside the archive",
                    rel.display()
                )));
            }
            std::os::unix::fs::symlink(&target, &path)?;
            continue;
        }
        let mut out = fs::File::create(&path)?;
        let budget = max_bytes.saturating_sub(written);
        // Read one byte past the budget to tell "exactly at the limit" from "over it".
        let n = copy_limited(&mut entry, &mut out, budget.saturating_add(1))?;
        if n > budget {
            return Err(ZipError::TooLarge { limit: max_bytes });
        }
        written += n;
        // Keep the permission bits (a `bootstrap` must stay executable) but never
        // setuid/setgid/sticky. Archives made without Unix modes get 0644.
        let perm = mode.map(|m| m & 0o777).unwrap_or(0o644) | 0o400;
        fs::set_permissions(&path, fs::Permissions::from_mode(perm))?;
    }
    Ok(written)
}

fn copy_limited(r: &mut impl Read, w: &mut impl Write, limit: u64) -> io::Result<u64> {
    io::copy(&mut r.take(limit), w)
}

/// Whether a symlink at `link` (relative to the root) with `target` resolves inside the root.
pub fn link_stays_inside(link: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth: i64 = 0;
    let base: PathBuf = link.parent().map(Path::to_path_buf).unwrap_or_default();
    for c in base.components().chain(target.components()) {
        match c {
            Component::Normal(_) => depth += 1,
            Component::ParentDir => depth -= 1,
            Component::CurDir => {}
            _ => return false,
        }
        if depth < 0 {
            return false;
        }
    }
    true
}
