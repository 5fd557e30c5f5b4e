//! Unpacking a function's ZIP into its code directory, treating the archive as hostile:
//! no paths outside the target, no symlinks pointing out, and a cap on the bytes actually
//! written (not the sizes the archive claims).

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

/// Largest ZIP accepted in a CreateFunction request (Lambda's direct-upload limit).
pub const MAX_ZIP_BYTES: usize = 50 * 1024 * 1024;
/// Largest unpacked code size (Lambda's limit for a .zip package).
pub const MAX_UNZIPPED_BYTES: u64 = 250 * 1024 * 1024;
/// Most entries in one archive.
const MAX_ENTRIES: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(
        "Could not unzip uploaded file. Please check your file, then try to upload again. ({0})"
    )]
    Invalid(String),
    #[error("Unzipped size must be smaller than {MAX_UNZIPPED_BYTES} bytes")]
    TooLarge,
    #[error("writing code to disk: {0}")]
    Io(#[from] io::Error),
}

impl From<zip::result::ZipError> for ArchiveError {
    fn from(e: zip::result::ZipError) -> Self {
        ArchiveError::Invalid(e.to_string())
    }
}

/// Extracts `zip` into `dest` (which must exist and be empty). Returns the bytes written.
pub fn extract_zip(zip: &[u8], dest: &Path) -> Result<u64, ArchiveError> {
    let mut archive = zip::ZipArchive::new(io::Cursor::new(zip))?;
    if archive.len() > MAX_ENTRIES {
        return Err(ArchiveError::Invalid(format!(
            "more than {MAX_ENTRIES} entries"
        )));
    }
    let mut written: u64 = 0;
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i)?;
        let rel = entry
            .enclosed_name()
            .ok_or_else(|| ArchiveError::Invalid(format!("unsafe path {:?}", entry.name())))?;
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
                .map_err(|_| ArchiveError::Invalid("symlink target is not UTF-8".into()))?;
            if !link_stays_inside(&rel, Path::new(&target)) {
                return Err(ArchiveError::Invalid(format!(
                    "symlink {} points outside the archive",
                    rel.display()
                )));
            }
            std::os::unix::fs::symlink(&target, &path)?;
            continue;
        }
        let mut out = fs::File::create(&path)?;
        let budget = MAX_UNZIPPED_BYTES - written;
        // Read one byte past the budget to tell "exactly at the limit" from "over it".
        let n = copy_limited(&mut entry, &mut out, budget + 1)?;
        if n > budget {
            return Err(ArchiveError::TooLarge);
        }
        written += n;
        // Keep the permission bits (a `bootstrap` must stay executable) but never
        // setuid/setgid/sticky. Archives made without Unix modes get 0644.
        let perm = mode.map(|m| m & 0o777).unwrap_or(0o644) | 0o400;
        fs::set_permissions(&path, fs::Permissions::from_mode(perm))?;
    }
    Ok(written)
}

/// One file of an archive being built: its name, contents and Unix mode.
pub struct ZipEntry {
    pub name: String,
    pub data: Vec<u8>,
    pub mode: u32,
}

/// Builds a ZIP from in-memory entries (deflated, modes kept).
pub fn build_zip(entries: &[ZipEntry]) -> Result<Vec<u8>, ArchiveError> {
    let mut buf = io::Cursor::new(Vec::new());
    let mut w = zip::ZipWriter::new(&mut buf);
    for e in entries {
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .unix_permissions(e.mode);
        w.start_file(e.name.as_str(), opts)?;
        w.write_all(&e.data)?;
    }
    w.finish()?;
    Ok(buf.into_inner())
}

/// Zips a directory tree (regular files only, modes kept); paths use `/`.
pub fn zip_dir(dir: &Path) -> Result<Vec<u8>, ArchiveError> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<ZipEntry>) -> io::Result<()> {
        let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let meta = fs::metadata(&path)?;
            if meta.is_dir() {
                walk(root, &path, out)?;
            } else if meta.is_file() {
                let rel = path.strip_prefix(root).map_err(io::Error::other)?;
                out.push(ZipEntry {
                    name: rel.to_string_lossy().into_owned(),
                    data: fs::read(&path)?,
                    mode: meta.permissions().mode() & 0o777,
                });
            }
        }
        Ok(())
    }
    let mut entries = Vec::new();
    walk(dir, dir, &mut entries)?;
    build_zip(&entries)
}

fn copy_limited(r: &mut impl Read, w: &mut impl Write, limit: u64) -> io::Result<u64> {
    io::copy(&mut r.take(limit), w)
}

/// Whether a symlink at `link` (relative to the root) with `target` resolves inside the root.
fn link_stays_inside(link: &Path, target: &Path) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;
    use zip::write::SimpleFileOptions;

    fn make_zip(entries: &[(&str, &[u8], u32)]) -> Vec<u8> {
        let mut buf = io::Cursor::new(Vec::new());
        let mut w = zip::ZipWriter::new(&mut buf);
        for (name, data, mode) in entries {
            w.start_file(*name, SimpleFileOptions::default().unix_permissions(*mode))
                .unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap();
        buf.into_inner()
    }

    #[test]
    fn extracts_files_with_modes() {
        let dir = tempfile::tempdir().unwrap();
        let zip = make_zip(&[
            ("bootstrap", b"#!/bin/sh\n", 0o755),
            ("lib/a.txt", b"hi", 0o644),
        ]);
        let n = extract_zip(&zip, dir.path()).unwrap();
        assert_eq!(n, 12);
        let mode = fs::metadata(dir.path().join("bootstrap"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(fs::read(dir.path().join("lib/a.txt")).unwrap(), b"hi");
    }

    #[test]
    fn refuses_path_traversal_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let zip = make_zip(&[("../evil", b"x", 0o644)]);
        assert!(matches!(
            extract_zip(&zip, dir.path()),
            Err(ArchiveError::Invalid(_))
        ));
        assert!(matches!(
            extract_zip(b"definitely not a zip", dir.path()),
            Err(ArchiveError::Invalid(_))
        ));
    }

    #[test]
    fn symlinks_must_stay_inside() {
        assert!(link_stays_inside(Path::new("a/link"), Path::new("../b")));
        assert!(!link_stays_inside(
            Path::new("a/link"),
            Path::new("../../etc")
        ));
        assert!(!link_stays_inside(
            Path::new("link"),
            Path::new("/etc/passwd")
        ));
    }
}
