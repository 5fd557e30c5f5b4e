//! Root images for the microVMs (issue #5): a staging tree assembled in a temporary
//! directory, written out as a read-only ext4 image by `mkfs.ext4 -d` (see [`ext4`]).
//!
//! Sources ([`Source`]):
//! - a directory or a Lambda ZIP: the function's code at `/var/task` on the `provided` base
//!   (a static guest-init at `/sbin/init`, mount points `/proc /sys /dev /tmp /var/task /opt`);
//! - an OCI image ([`oci`]): an OCI layout directory or a `docker save` tarball, layers
//!   applied in order with whiteouts ([`layer`]); guest-init, when given, goes to
//!   [`OCI_INIT_PATH`] so the image's own files stay as they are.
//!
//! Every image carries [`IMAGE_CONFIG_PATH`] (`/etc/kindling/image.json`, [`ImageConfig`]):
//! how its function starts, the way Lambda treats a container image's config.
//!
//! Ownership: `mkfs.ext4 -d` copies uid/gid/mode from the staging files. Layers are
//! chowned to their tar owners when the builder runs as root (CI does); otherwise files
//! belong to the building user and only the root directory is forced to 0:0.

pub mod ext4;
pub mod layer;
pub mod oci;
#[cfg(test)]
mod tests;
pub mod zip;

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use oci::RunConfig;

/// Where the image's start-up config lives inside every image.
pub const IMAGE_CONFIG_PATH: &str = "etc/kindling/image.json";
/// guest-init in a `provided`-based image.
pub const PROVIDED_INIT_PATH: &str = "sbin/init";
/// guest-init in an image built from OCI (outside /sbin, often a symlink in Debian images).
pub const OCI_INIT_PATH: &str = "var/kindling/init";
/// The function's code in dir and ZIP images (`LAMBDA_TASK_ROOT`).
pub const TASK_ROOT: &str = "/var/task";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{tool} not found: {hint}")]
    MissingTool {
        tool: &'static str,
        hint: &'static str,
    },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("bad source: {0}")]
    BadSource(String),
    #[error("ZIP: {0}")]
    Zip(#[from] zip::ZipError),
    #[error("layer {layer}: {reason}")]
    BadLayer { layer: String, reason: String },
    #[error("layer {layer}: path {path:?} escapes the image root")]
    PathEscapes { layer: String, path: String },
    #[error("blob {blob}: digest mismatch (content is {actual})")]
    DigestMismatch { blob: String, actual: String },
    #[error("OCI image: {0}")]
    BadOci(String),
    #[error("image contents exceed {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("a {0} image needs a guest-init binary")]
    MissingGuestInit(&'static str),
    #[error("mkfs.ext4 failed: {0}")]
    Mkfs(String),
}

impl ImageError {
    pub(crate) fn io(path: &Path, source: io::Error) -> Self {
        ImageError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// What the image is built from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A directory of function code (becomes `/var/task`).
    Dir(PathBuf),
    /// A Lambda ZIP (unpacked into `/var/task`, hostile-archive rules).
    Zip(PathBuf),
    /// An OCI layout directory or a `docker save` tarball (becomes `/`).
    Oci(PathBuf),
}

impl Source {
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Dir(_) => "dir",
            Source::Zip(_) => "zip",
            Source::Oci(_) => "oci",
        }
    }
    pub fn path(&self) -> &Path {
        match self {
            Source::Dir(p) | Source::Zip(p) | Source::Oci(p) => p,
        }
    }
}

/// Progress lines from [`build`].
#[derive(Debug, Clone)]
pub enum Progress {
    Phase(String),
    Warning(String),
}

/// A progress callback.
pub type ProgressFn = Box<dyn FnMut(&Progress) + Send>;

pub struct BuildOptions {
    pub source: Source,
    /// The image file to write (replaced atomically).
    pub out: PathBuf,
    /// A static guest-init binary: required for dir and ZIP sources, optional for OCI.
    pub guest_init: Option<PathBuf>,
    /// For dir and ZIP sources: a base root tree (e.g. [`crate::base::python311`]) copied in
    /// first, named by `base_name`; guest-init then goes to [`OCI_INIT_PATH`] so the base's
    /// own `/sbin` stays as it is. `None`: the `provided` base.
    pub base: Option<(String, PathBuf)>,
    pub progress: Option<ProgressFn>,
}

/// `/etc/kindling/image.json`: how the image's function starts. Written by every build;
/// guest-init may read it. Lists are empty and strings empty when the source gave none.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageConfig {
    /// Format version: 1.
    pub version: u32,
    /// "dir", "zip" or "oci".
    pub source: String,
    /// The base the code sits on ("provided"), or null for OCI images.
    pub base: Option<String>,
    /// guest-init's path in the image, or null when none was installed.
    pub init: Option<String>,
    /// The function's code directory (`LAMBDA_TASK_ROOT`): /var/task.
    pub task_root: String,
    /// The image config's Entrypoint (OCI), else empty.
    pub entrypoint: Vec<String>,
    /// The image config's Cmd (OCI; Lambda passes it as the handler), else empty.
    pub cmd: Vec<String>,
    /// KEY=VALUE environment from the image config, else empty.
    pub env: Vec<String>,
    /// The working directory: WorkingDir for OCI (empty when unset), /var/task otherwise.
    pub working_dir: String,
    /// The image config's User, else empty (Lambda ignores it; recorded for reference).
    pub user: String,
}

/// What [`build`] made.
#[derive(Debug, Clone, Serialize)]
pub struct BuildReport {
    pub image: PathBuf,
    pub bytes: u64,
    pub files: u64,
    pub source: String,
    pub config: ImageConfig,
    pub warnings: Vec<String>,
}

/// Builds the image described by `opts`.
pub fn build(mut opts: BuildOptions) -> Result<BuildReport, ImageError> {
    let mut warnings = Vec::new();
    let mut progress = opts.progress.take();
    let mut say = |p: Progress| {
        if let Progress::Warning(w) = &p {
            warnings.push(w.clone());
        }
        if let Some(f) = progress.as_mut() {
            f(&p);
        }
    };
    ext4::find_mkfs()?;
    let out_dir = match opts.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&out_dir).map_err(|e| ImageError::io(&out_dir, e))?;
    let staging = tempfile::Builder::new()
        .prefix(".kindling-image-")
        .tempdir_in(&out_dir)
        .map_err(|e| ImageError::io(&out_dir, e))?;
    let root = staging.path().join("root");
    let scratch = staging.path().join("scratch");
    for d in [&root, &scratch] {
        fs::create_dir(d).map_err(|e| ImageError::io(d, e))?;
    }
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755))
        .map_err(|e| ImageError::io(&root, e))?;

    let src = opts.source.path().to_path_buf();
    if !src.exists() {
        return Err(ImageError::BadSource(format!(
            "{} does not exist",
            src.display()
        )));
    }
    let config = match &opts.source {
        Source::Dir(_) | Source::Zip(_) => {
            let init = opts
                .guest_init
                .as_deref()
                .ok_or(ImageError::MissingGuestInit("provided"))?;
            let init_path = match &opts.base {
                None => {
                    say(Progress::Phase("staging the provided base".into()));
                    stage_provided(&root, init)?;
                    PROVIDED_INIT_PATH
                }
                Some((name, tree)) => {
                    say(Progress::Phase(format!("copying the {name} base")));
                    let mut skipped = Vec::new();
                    copy_tree(tree, &root, &mut skipped)?;
                    for (d, mode) in [
                        ("proc", 0o555),
                        ("sys", 0o555),
                        ("dev", 0o755),
                        ("tmp", 0o1777),
                        ("var/task", 0o755),
                        ("opt", 0o755),
                    ] {
                        mkdir_mode(&root.join(d), mode)?;
                    }
                    install_file(&root, OCI_INIT_PATH, init, 0o755)?;
                    OCI_INIT_PATH
                }
            };
            let task = root.join("var/task");
            if let Source::Dir(d) = &opts.source {
                if !d.is_dir() {
                    return Err(ImageError::BadSource(format!(
                        "{} is not a directory",
                        d.display()
                    )));
                }
                say(Progress::Phase(format!("copying {}", d.display())));
                let mut skipped = Vec::new();
                copy_tree(d, &task, &mut skipped)?;
                for s in skipped {
                    say(Progress::Warning(format!(
                        "skipped {s}: not a file, link or directory"
                    )));
                }
            } else {
                say(Progress::Phase(format!("unzipping {}", src.display())));
                let f = fs::File::open(&src).map_err(|e| ImageError::io(&src, e))?;
                zip::extract_zip(io::BufReader::new(f), &task, zip::MAX_UNZIPPED_BYTES)?;
            }
            match fs::symlink_metadata(task.join("bootstrap")) {
                // Only the provided base runs a bootstrap.
                _ if opts.base.is_some() => {}
                Ok(m) if m.file_type().is_symlink() || m.permissions().mode() & 0o111 != 0 => {}
                Ok(_) => say(Progress::Warning(
                    "bootstrap is not executable: a provided runtime will fail at invoke".into(),
                )),
                Err(_) => say(Progress::Warning(
                    "no bootstrap at the code's root: a provided runtime will fail at invoke"
                        .into(),
                )),
            }
            ImageConfig {
                version: 1,
                source: opts.source.kind().into(),
                base: Some(
                    opts.base
                        .as_ref()
                        .map_or("provided".to_string(), |(n, _)| n.clone()),
                ),
                init: Some(format!("/{init_path}")),
                task_root: TASK_ROOT.into(),
                entrypoint: Vec::new(),
                cmd: Vec::new(),
                env: Vec::new(),
                working_dir: TASK_ROOT.into(),
                user: String::new(),
            }
        }
        Source::Oci(p) => {
            let (run, stats) =
                oci::unpack_image(p, &root, &scratch, &mut |l| say(Progress::Phase(l)))?;
            say(Progress::Phase(format!(
                "{} ({} layers, {} whiteouts, {} bytes)",
                stats.format, stats.layers, stats.whiteouts, stats.bytes
            )));
            for s in &stats.skipped {
                say(Progress::Warning(format!(
                    "skipped {s}: device node or special file"
                )));
            }
            for d in ["proc", "sys", "dev", "tmp"] {
                if fs::symlink_metadata(root.join(d)).is_err() {
                    mkdir_mode(&root.join(d), if d == "tmp" { 0o1777 } else { 0o755 })?;
                }
            }
            let init = match &opts.guest_init {
                Some(g) => {
                    install_file(&root, OCI_INIT_PATH, g, 0o755)?;
                    Some(format!("/{OCI_INIT_PATH}"))
                }
                None => None,
            };
            ImageConfig {
                version: 1,
                source: "oci".into(),
                base: None,
                init,
                task_root: TASK_ROOT.into(),
                entrypoint: run.entrypoint.unwrap_or_default(),
                cmd: run.cmd.unwrap_or_default(),
                env: run.env.unwrap_or_default(),
                working_dir: run.working_dir.unwrap_or_default(),
                user: run.user.unwrap_or_default(),
            }
        }
    };
    let json = serde_json::to_vec_pretty(&config).map_err(|e| ImageError::io(&root, e.into()))?;
    write_file(&root, IMAGE_CONFIG_PATH, &json, 0o644)?;

    let stats = ext4::tree_stats(&root)?;
    say(Progress::Phase(format!(
        "writing ext4 ({} files, {} entries)",
        stats.files, stats.entries
    )));
    let tmp = staging.path().join("image.ext4");
    let bytes = ext4::make_ext4(&root, &tmp, &stats)?;
    fs::rename(&tmp, &opts.out).map_err(|e| ImageError::io(&opts.out, e))?;
    Ok(BuildReport {
        image: opts.out.clone(),
        bytes,
        files: stats.files,
        source: opts.source.kind().into(),
        config,
        warnings,
    })
}

/// The `provided` base: guest-init at /sbin/init and the mount points.
fn stage_provided(root: &Path, guest_init: &Path) -> Result<(), ImageError> {
    for (d, mode) in [
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("tmp", 0o1777),
        ("var", 0o755),
        ("var/task", 0o755),
        ("opt", 0o755),
        ("sbin", 0o755),
        ("etc", 0o755),
    ] {
        mkdir_mode(&root.join(d), mode)?;
    }
    install_file(root, PROVIDED_INIT_PATH, guest_init, 0o755)
}

fn mkdir_mode(path: &Path, mode: u32) -> Result<(), ImageError> {
    fs::create_dir_all(path).map_err(|e| ImageError::io(path, e))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|e| ImageError::io(path, e))
}

/// `root/rel`'s parent as a real directory inside the root (no symlinks on the way).
fn parent_in_root(root: &Path, rel: &str) -> Result<PathBuf, ImageError> {
    let rel = Path::new(rel);
    let mut cur = root.to_path_buf();
    if let Some(parent) = rel.parent() {
        for c in parent.components() {
            cur.push(c);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(ImageError::BadSource(format!(
                        "/{} in the image is not a directory",
                        cur.strip_prefix(root).unwrap_or(&cur).display()
                    )))
                }
                Err(_) => mkdir_mode(&cur, 0o755)?,
            }
        }
    }
    Ok(cur)
}

fn install_file(root: &Path, rel: &str, from: &Path, mode: u32) -> Result<(), ImageError> {
    let meta = fs::metadata(from).map_err(|e| ImageError::io(from, e))?;
    if !meta.is_file() {
        return Err(ImageError::BadSource(format!(
            "{} is not a file",
            from.display()
        )));
    }
    let dest = parent_in_root(root, rel)?.join(Path::new(rel).file_name().unwrap_or_default());
    let _ = fs::remove_file(&dest);
    fs::copy(from, &dest).map_err(|e| ImageError::io(&dest, e))?;
    fs::set_permissions(&dest, fs::Permissions::from_mode(mode))
        .map_err(|e| ImageError::io(&dest, e))
}

fn write_file(root: &Path, rel: &str, data: &[u8], mode: u32) -> Result<(), ImageError> {
    let dest = parent_in_root(root, rel)?.join(Path::new(rel).file_name().unwrap_or_default());
    if fs::symlink_metadata(&dest).is_ok() {
        fs::remove_file(&dest).map_err(|e| ImageError::io(&dest, e))?;
    }
    fs::write(&dest, data).map_err(|e| ImageError::io(&dest, e))?;
    fs::set_permissions(&dest, fs::Permissions::from_mode(mode))
        .map_err(|e| ImageError::io(&dest, e))
}

/// Copies a tree: directories and files with their modes, symlinks as links; anything
/// else is skipped and named in `skipped`.
fn copy_tree(src: &Path, dst: &Path, skipped: &mut Vec<String>) -> Result<(), ImageError> {
    let mut entries: Vec<_> = fs::read_dir(src)
        .map_err(|e| ImageError::io(src, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| ImageError::io(src, e))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let meta = fs::symlink_metadata(&from).map_err(|e| ImageError::io(&from, e))?;
        let ft = meta.file_type();
        if ft.is_dir() {
            fs::create_dir_all(&to).map_err(|e| ImageError::io(&to, e))?;
            copy_tree(&from, &to, skipped)?;
            fs::set_permissions(
                &to,
                fs::Permissions::from_mode(meta.permissions().mode() & 0o7777),
            )
            .map_err(|e| ImageError::io(&to, e))?;
        } else if ft.is_file() {
            fs::copy(&from, &to).map_err(|e| ImageError::io(&to, e))?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&from).map_err(|e| ImageError::io(&from, e))?;
            std::os::unix::fs::symlink(target, &to).map_err(|e| ImageError::io(&to, e))?;
        } else {
            skipped.push(from.display().to_string());
        }
    }
    Ok(())
}
