//! Applying one image layer (a tar stream) onto a staging root, the way overlayfs would
//! have stacked it: `.wh.<name>` deletes `<name>` from the layers below, `.wh..wh..opq`
//! empties its directory of what the layers below put there. Every path is checked: no
//! `..`, nothing written through a symlink (a layer cannot plant `etc -> /etc` and then
//! write `etc/passwd` on the host). Entries are streamed to disk, never held in memory.
//! Symlinks are kept as links (their targets are the guest's business), hard links are
//! made inside the root, device nodes and FIFOs are skipped and counted.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use super::ImageError;

/// What applying a layer did.
#[derive(Debug, Default, Clone)]
pub struct LayerStats {
    pub entries: u64,
    pub bytes: u64,
    pub whiteouts: u64,
    /// Device nodes, FIFOs and other entries not written, by path.
    pub skipped: Vec<String>,
}

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// Applies the tar read from `r` onto `root`. `layer` names it in errors. `max_bytes` caps
/// the file contents written by this layer.
pub fn apply_layer(
    r: impl Read,
    root: &Path,
    layer: &str,
    max_bytes: u64,
) -> Result<LayerStats, ImageError> {
    let bad = |reason: String| ImageError::BadLayer {
        layer: layer.to_string(),
        reason,
    };
    let mut archive = tar::Archive::new(r);
    let mut stats = LayerStats::default();
    // Paths this layer created: an opaque marker hides the layers below, not its own layer.
    let mut created: HashSet<PathBuf> = HashSet::new();
    let chown = unsafe { libc::geteuid() } == 0;
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("bad tar entry: {e}")))?;
        stats.entries += 1;
        let raw = entry
            .path()
            .map_err(|e| bad(format!("bad path: {e}")))?
            .into_owned();
        let rel = clean_path(&raw).ok_or_else(|| ImageError::PathEscapes {
            layer: layer.to_string(),
            path: raw.display().to_string(),
        })?;
        let Some(name) = rel.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            continue; // the root itself ("./")
        };
        let parent_rel = rel.parent().map(Path::to_path_buf).unwrap_or_default();
        let whiteout = name.starts_with(WHITEOUT);
        // A whiteout under a directory the layers below never made has nothing to hide.
        let Some(parent) = safe_dir(root, &parent_rel, layer, !whiteout)? else {
            stats.whiteouts += 1;
            continue;
        };
        if name == OPAQUE {
            stats.whiteouts += 1;
            clear_dir(&parent, &parent_rel, &created).map_err(|e| ImageError::io(&parent, e))?;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT) {
            stats.whiteouts += 1;
            if hidden.is_empty() || hidden == "." || hidden == ".." || hidden.contains('/') {
                return Err(bad(format!("bad whiteout {}", raw.display())));
            }
            remove_any(&parent.join(hidden)).map_err(|e| ImageError::io(&parent, e))?;
            continue;
        }
        let dest = parent.join(&name);
        let header = entry.header();
        let kind = header.entry_type();
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let (uid, gid) = (
            header.uid().ok().and_then(|u| u32::try_from(u).ok()),
            header.gid().ok().and_then(|g| u32::try_from(g).ok()),
        );
        let ioe = |e: io::Error| ImageError::io(&dest, e);
        match kind {
            tar::EntryType::Directory => {
                match fs::symlink_metadata(&dest) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        remove_any(&dest).map_err(ioe)?;
                        fs::create_dir(&dest).map_err(ioe)?;
                    }
                    Err(_) => fs::create_dir(&dest).map_err(ioe)?,
                }
                fs::set_permissions(&dest, fs::Permissions::from_mode(mode)).map_err(ioe)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                remove_any(&dest).map_err(ioe)?;
                let mut f = fs::File::create(&dest).map_err(ioe)?;
                let budget = max_bytes.saturating_sub(stats.bytes);
                let n = io::copy(&mut (&mut entry).take(budget.saturating_add(1)), &mut f)
                    .map_err(|e| bad(format!("reading {}: {e}", raw.display())))?;
                if n > budget {
                    return Err(ImageError::TooLarge { limit: max_bytes });
                }
                stats.bytes += n;
                fs::set_permissions(&dest, fs::Permissions::from_mode(mode)).map_err(ioe)?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| bad(format!("bad link target: {e}")))?
                    .ok_or_else(|| bad(format!("symlink {} has no target", raw.display())))?
                    .into_owned();
                remove_any(&dest).map_err(ioe)?;
                std::os::unix::fs::symlink(&target, &dest).map_err(ioe)?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| bad(format!("bad link target: {e}")))?
                    .ok_or_else(|| bad(format!("hard link {} has no target", raw.display())))?
                    .into_owned();
                let trel = clean_path(&target).ok_or_else(|| ImageError::PathEscapes {
                    layer: layer.to_string(),
                    path: target.display().to_string(),
                })?;
                let tname = trel
                    .file_name()
                    .ok_or_else(|| bad(format!("hard link {} to the root", raw.display())))?;
                let tparent = safe_dir(
                    root,
                    &trel.parent().map(Path::to_path_buf).unwrap_or_default(),
                    layer,
                    false,
                )?
                .ok_or_else(|| {
                    bad(format!(
                        "hard link {} to missing {}",
                        raw.display(),
                        target.display()
                    ))
                })?;
                let source = tparent.join(tname);
                if !fs::symlink_metadata(&source).is_ok_and(|m| m.is_file()) {
                    return Err(bad(format!(
                        "hard link {} to {}, which is not a file in the image",
                        raw.display(),
                        target.display()
                    )));
                }
                if source != dest {
                    remove_any(&dest).map_err(ioe)?;
                    fs::hard_link(&source, &dest).map_err(ioe)?;
                }
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                stats.skipped.push(format!("/{}", rel.display()));
                continue;
            }
            // PAX and GNU long-name headers are consumed by the tar crate; a global PAX
            // header carries nothing for us; anything else (sparse files, vendor types) is
            // skipped and named.
            tar::EntryType::XGlobalHeader => continue,
            _ => {
                stats.skipped.push(format!("/{}", rel.display()));
                continue;
            }
        }
        if chown && kind != tar::EntryType::Link {
            std::os::unix::fs::lchown(&dest, uid, gid).map_err(ioe)?;
        }
        created.insert(rel);
    }
    Ok(stats)
}

/// `raw` as a relative path of plain components: a leading `/` or `./` is dropped, `..`
/// anywhere refuses it (None).
pub fn clean_path(raw: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// `root/rel` as a directory, created (0755) where missing when `create` (else None); any
/// component that is a symlink refuses the path; a non-directory in the way is replaced.
fn safe_dir(
    root: &Path,
    rel: &Path,
    layer: &str,
    create: bool,
) -> Result<Option<PathBuf>, ImageError> {
    let mut cur = root.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(ImageError::PathEscapes {
                    layer: layer.to_string(),
                    path: format!("{} (through the symlink /{})", rel.display(), {
                        cur.strip_prefix(root).unwrap_or(&cur).display()
                    }),
                })
            }
            Ok(_) if !create => return Ok(None),
            Err(_) if !create => return Ok(None),
            Ok(_) => {
                fs::remove_file(&cur).map_err(|e| ImageError::io(&cur, e))?;
                fs::create_dir(&cur).map_err(|e| ImageError::io(&cur, e))?;
            }
            Err(_) => {
                fs::create_dir(&cur).map_err(|e| ImageError::io(&cur, e))?;
                fs::set_permissions(&cur, fs::Permissions::from_mode(0o755))
                    .map_err(|e| ImageError::io(&cur, e))?;
            }
        }
    }
    Ok(Some(cur))
}

/// Removes a file, link or whole directory; a missing path is fine.
fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Empties `dir` of everything the layers below put there (keeps what this layer made).
fn clear_dir(dir: &Path, rel: &Path, created: &HashSet<PathBuf>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if !created.contains(&rel.join(entry.file_name())) {
            remove_any(&entry.path())?;
        }
    }
    Ok(())
}
