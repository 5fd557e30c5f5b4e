//! Unpacking a function's ZIP into its code directory, treating the archive as hostile:
//! no paths outside the target, no symlinks pointing out, and a cap on the bytes actually
//! written (not the sizes the archive claims).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rootfs::image::zip::ZipError;

/// Largest ZIP accepted in a CreateFunction request (Lambda's direct-upload limit).
pub const MAX_ZIP_BYTES: usize = 50 * 1024 * 1024;
/// Largest unpacked code size (Lambda's limit for a .zip package).
pub const MAX_UNZIPPED_BYTES: u64 = 250 * 1024 * 1024;

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
/// The rules live in `rootfs::image::zip`, shared with the image builder.
pub fn extract_zip(zip: &[u8], dest: &Path) -> Result<u64, ArchiveError> {
    rootfs::image::zip::extract_zip(io::Cursor::new(zip), dest, MAX_UNZIPPED_BYTES).map_err(|e| {
        match e {
            ZipError::Invalid(m) => ArchiveError::Invalid(m),
            ZipError::TooLarge { .. } => ArchiveError::TooLarge,
            ZipError::Io(e) => ArchiveError::Io(e),
        }
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use rootfs::image::zip::link_stays_inside;
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
