//! Turning a staging directory into an ext4 image with `mkfs.ext4 -d` (e2fsprogs): no root,
//! no loop device, no mount. Ownership and modes come from the staging files as they are
//! (`-E root_owner=0:0` for the root directory only); the builder runs as root in CI, so
//! the uid/gid it gives files is what the guest sees.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::ImageError;

/// Fixed filesystem UUID and directory hash seed, so two builds of the same tree differ only
/// in timestamps.
const FS_UUID: &str = "6b696e64-6c69-6e67-2d72-6f6f74667331";

/// What a staging tree holds.
#[derive(Debug, Default, Clone, Copy)]
pub struct TreeStats {
    /// Inodes: files, directories, symlinks (each hard link counted once per name).
    pub entries: u64,
    /// Regular files.
    pub files: u64,
    /// 4 KiB blocks the contents need.
    pub blocks: u64,
}

/// Finds `mkfs.ext4` (PATH, then /sbin and /usr/sbin), or says how to install it.
pub fn find_mkfs() -> Result<PathBuf, ImageError> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push("/usr/sbin".into());
    dirs.push("/sbin".into());
    dirs.into_iter()
        .map(|d| d.join("mkfs.ext4"))
        .find(|p| p.is_file())
        .ok_or(ImageError::MissingTool {
            tool: "mkfs.ext4",
            hint: "apt-get install e2fsprogs",
        })
}

/// Walks the tree (no symlinks followed) and counts what the image must hold.
pub fn tree_stats(root: &Path) -> Result<TreeStats, ImageError> {
    let mut st = TreeStats::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        st.entries += 1;
        st.blocks += 1;
        for entry in fs::read_dir(&dir).map_err(|e| ImageError::io(&dir, e))? {
            let entry = entry.map_err(|e| ImageError::io(&dir, e))?;
            let path = entry.path();
            let meta = fs::symlink_metadata(&path).map_err(|e| ImageError::io(&path, e))?;
            let ft = meta.file_type();
            if ft.is_dir() {
                stack.push(path);
            } else {
                st.entries += 1;
                if ft.is_file() {
                    st.files += 1;
                    st.blocks += meta.size().div_ceil(4096);
                } else if ft.is_symlink() && meta.size() >= 60 {
                    st.blocks += 1;
                }
            }
        }
    }
    Ok(st)
}

/// The image size for a tree: contents plus a quarter, plus inode tables and fixed
/// metadata, rounded up to whole MiB.
pub fn image_size(st: &TreeStats, attempt: u32) -> u64 {
    let data = st.blocks * 4096;
    let inodes = inode_count(st) * 256;
    let size = data + data / 4 + inodes + 8 * 1024 * 1024;
    let size = size << attempt.min(4);
    size.div_ceil(1 << 20) << 20
}

fn inode_count(st: &TreeStats) -> u64 {
    (st.entries + st.entries / 8 + 64).max(256)
}

/// Writes `root` into a fresh ext4 image at `out` (replaced if present) and returns its
/// size in bytes. No journal, 4 KiB blocks, no reserved blocks, and the `read-only`
/// feature set by `tune2fs` afterwards (the kernel then mounts it read-only even when
/// asked for read-write). A "no space" failure retries with a larger image (the estimate
/// is generous; this is a backstop).
pub fn make_ext4(root: &Path, out: &Path, st: &TreeStats) -> Result<u64, ImageError> {
    let mkfs = find_mkfs()?;
    let mut last = String::new();
    for attempt in 0..3 {
        let size = image_size(st, attempt);
        match fs::remove_file(out) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ImageError::io(out, e)),
        }
        let file = fs::File::create(out).map_err(|e| ImageError::io(out, e))?;
        file.set_len(size).map_err(|e| ImageError::io(out, e))?;
        drop(file);
        let output = Command::new(&mkfs)
            .args([
                "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0",
            ])
            .args(["-N", &inode_count(st).to_string()])
            .args(["-O", "^has_journal,^resize_inode"])
            .args(["-U", FS_UUID])
            .arg("-E")
            .arg(format!("root_owner=0:0,hash_seed={FS_UUID}"))
            .args(["-L", "kindling-root"])
            .arg("-d")
            .arg(root)
            .arg(out)
            .env("E2FSPROGS_FAKE_TIME", "1")
            .output()
            .map_err(|e| ImageError::io(&mkfs, e))?;
        if output.status.success() {
            // mke2fs cannot populate a read-only filesystem: set the flag afterwards.
            let tune = mkfs.with_file_name("tune2fs");
            let tune = if tune.is_file() {
                tune
            } else {
                PathBuf::from("tune2fs")
            };
            let t = Command::new(&tune)
                .args(["-O", "read-only"])
                .arg(out)
                .output()
                .map_err(|e| ImageError::io(&tune, e))?;
            if !t.status.success() {
                let _ = fs::remove_file(out);
                return Err(ImageError::Mkfs(format!(
                    "tune2fs -O read-only: {}",
                    String::from_utf8_lossy(&t.stderr).trim()
                )));
            }
            return Ok(size);
        }
        last = String::from_utf8_lossy(&output.stderr).trim().to_string();
        let no_space = last.contains("No space")
            || last.contains("Could not allocate")
            || last.contains("ext2fs_mkdir")
            || last.contains("inode");
        if !no_space {
            break;
        }
    }
    let _ = fs::remove_file(out);
    Err(ImageError::Mkfs(last))
}
