//! Reading OCI images: an OCI image layout directory (`oci-layout`, `index.json` ->
//! manifest -> config + layers under `blobs/sha256/`), or a `docker save` tarball
//! (`manifest.json` + config + layer tars; newer Docker writes both formats in one tar).
//! Blobs are verified against their sha256 digests before they are used; layers may be
//! plain tar or tar+gzip.

use std::fs;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::layer::{apply_layer, clean_path, LayerStats};
use super::ImageError;

/// Largest JSON document (index, manifest, config) read into memory.
const MAX_JSON_BYTES: u64 = 4 * 1024 * 1024;
/// Largest total of file contents unpacked from all layers (Lambda's container image limit).
pub const MAX_IMAGE_BYTES: u64 = 10 * 1024 * 1024 * 1024;

/// The parts of an image config that decide how the function starts.
#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
pub struct RunConfig {
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: Option<String>,
    #[serde(rename = "User", default)]
    pub user: Option<String>,
}

#[derive(Deserialize)]
struct ConfigFile {
    #[serde(default)]
    config: Option<RunConfig>,
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct DockerManifest {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// What unpacking an image did.
#[derive(Debug, Default, Clone)]
pub struct OciStats {
    pub layers: usize,
    pub whiteouts: u64,
    pub bytes: u64,
    pub skipped: Vec<String>,
    /// "oci-layout" or "docker-save".
    pub format: &'static str,
}

/// Unpacks the image at `path` (layout directory or tarball) onto `root`; returns its run
/// config. `scratch` is an empty directory for unpacking a tarball. `progress` gets a line
/// per layer.
pub fn unpack_image(
    path: &Path,
    root: &Path,
    scratch: &Path,
    progress: &mut dyn FnMut(String),
) -> Result<(RunConfig, OciStats), ImageError> {
    let meta = fs::metadata(path).map_err(|e| ImageError::io(path, e))?;
    let dir = if meta.is_dir() {
        path.to_path_buf()
    } else {
        progress(format!("unpacking {}", path.display()));
        unpack_outer_tar(path, scratch)?;
        scratch.to_path_buf()
    };
    if dir.join("index.json").is_file() {
        unpack_layout(&dir, root, progress)
    } else if dir.join("manifest.json").is_file() {
        unpack_docker(&dir, root, progress)
    } else {
        Err(ImageError::BadOci(format!(
            "{}: no index.json (OCI layout) or manifest.json (docker save)",
            path.display()
        )))
    }
}

fn unpack_layout(
    dir: &Path,
    root: &Path,
    progress: &mut dyn FnMut(String),
) -> Result<(RunConfig, OciStats), ImageError> {
    let index: Index = read_json(&dir.join("index.json"), None)?;
    let mut desc = pick(&index.manifests)?;
    // An index may point at another index (multi-platform image): follow it, once.
    let mut manifest_json = read_blob_json(dir, &desc.digest)?;
    if desc.media_type.contains("index") || manifest_json.get("manifests").is_some() {
        let inner: Index = serde_json::from_value(manifest_json)
            .map_err(|e| ImageError::BadOci(format!("nested index: {e}")))?;
        desc = pick(&inner.manifests)?;
        manifest_json = read_blob_json(dir, &desc.digest)?;
        if manifest_json.get("manifests").is_some() {
            return Err(ImageError::BadOci("index nested more than twice".into()));
        }
        return finish_layout(dir, root, manifest_json, progress);
    }
    finish_layout(dir, root, manifest_json, progress)
}

fn finish_layout(
    dir: &Path,
    root: &Path,
    manifest_json: serde_json::Value,
    progress: &mut dyn FnMut(String),
) -> Result<(RunConfig, OciStats), ImageError> {
    let manifest: Manifest = serde_json::from_value(manifest_json)
        .map_err(|e| ImageError::BadOci(format!("manifest: {e}")))?;
    let config: ConfigFile = serde_json::from_value(read_blob_json(dir, &manifest.config.digest)?)
        .map_err(|e| ImageError::BadOci(format!("image config: {e}")))?;
    let mut stats = OciStats {
        format: "oci-layout",
        ..Default::default()
    };
    let n = manifest.layers.len();
    for (i, layer) in manifest.layers.iter().enumerate() {
        let path = blob_path(dir, &layer.digest)?;
        progress(format!("layer {}/{n} {}", i + 1, short(&layer.digest)));
        verify_digest(&path, &layer.digest)?;
        if layer.media_type.contains("zstd") {
            return Err(ImageError::BadOci(format!(
                "layer {}: zstd layers are not supported",
                layer.digest
            )));
        }
        let s = apply_file(&path, root, &layer.digest, MAX_IMAGE_BYTES - stats.bytes)?;
        add(&mut stats, s);
    }
    Ok((config.config.unwrap_or_default(), stats))
}

fn unpack_docker(
    dir: &Path,
    root: &Path,
    progress: &mut dyn FnMut(String),
) -> Result<(RunConfig, OciStats), ImageError> {
    let manifests: Vec<DockerManifest> = read_json(&dir.join("manifest.json"), None)?;
    let m = manifests
        .into_iter()
        .next()
        .ok_or_else(|| ImageError::BadOci("manifest.json lists no image".into()))?;
    let config_path = inside(dir, &m.config)?;
    let config: ConfigFile = read_json(&config_path, None)?;
    let diff_ids = config
        .rootfs
        .as_ref()
        .map(|r| r.diff_ids.clone())
        .unwrap_or_default();
    let mut stats = OciStats {
        format: "docker-save",
        ..Default::default()
    };
    let n = m.layers.len();
    for (i, layer) in m.layers.iter().enumerate() {
        let path = inside(dir, layer)?;
        progress(format!("layer {}/{n} {layer}", i + 1));
        // docker save writes layers uncompressed: their sha256 is the config's diff_id.
        if let Some(id) = diff_ids.get(i) {
            if !is_gzip(&path)? {
                verify_digest(&path, id)?;
            }
        }
        let s = apply_file(&path, root, layer, MAX_IMAGE_BYTES - stats.bytes)?;
        add(&mut stats, s);
    }
    Ok((config.config.unwrap_or_default(), stats))
}

fn add(stats: &mut OciStats, s: LayerStats) {
    stats.layers += 1;
    stats.whiteouts += s.whiteouts;
    stats.bytes += s.bytes;
    stats.skipped.extend(s.skipped);
}

fn short(digest: &str) -> &str {
    digest.get(..19).unwrap_or(digest)
}

/// Prefers linux/amd64 when platforms are given, else the first manifest.
fn pick(manifests: &[Descriptor]) -> Result<&Descriptor, ImageError> {
    manifests
        .iter()
        .find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
        })
        .or_else(|| manifests.first())
        .ok_or_else(|| ImageError::BadOci("index.json lists no manifest".into()))
}

/// `blobs/sha256/<hex>` for a digest; anything but a well-formed sha256 digest is refused
/// (it would otherwise name a path).
fn blob_path(dir: &Path, digest: &str) -> Result<PathBuf, ImageError> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| ImageError::BadOci(format!("unsupported digest {digest:?}")))?;
    let path = dir.join("blobs").join("sha256").join(hex);
    if !path.is_file() {
        return Err(ImageError::BadOci(format!("missing blob {digest}")));
    }
    Ok(path)
}

fn read_blob_json(dir: &Path, digest: &str) -> Result<serde_json::Value, ImageError> {
    let path = blob_path(dir, digest)?;
    read_json(&path, Some(digest))
}

/// Reads a bounded JSON document, checking its digest when one is given.
fn read_json<T: serde::de::DeserializeOwned>(
    path: &Path,
    digest: Option<&str>,
) -> Result<T, ImageError> {
    let f = fs::File::open(path).map_err(|e| ImageError::io(path, e))?;
    let mut buf = Vec::new();
    f.take(MAX_JSON_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| ImageError::io(path, e))?;
    if buf.len() as u64 > MAX_JSON_BYTES {
        return Err(ImageError::BadOci(format!(
            "{}: larger than {MAX_JSON_BYTES} bytes",
            path.display()
        )));
    }
    if let Some(d) = digest {
        let got = format!("sha256:{:x}", Sha256::digest(&buf));
        if !got.eq_ignore_ascii_case(d) {
            return Err(ImageError::DigestMismatch {
                blob: d.to_string(),
                actual: got,
            });
        }
    }
    serde_json::from_slice(&buf).map_err(|e| ImageError::BadOci(format!("{}: {e}", path.display())))
}

/// Streams the file through sha256 and compares.
fn verify_digest(path: &Path, digest: &str) -> Result<(), ImageError> {
    let mut f = fs::File::open(path).map_err(|e| ImageError::io(path, e))?;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h).map_err(|e| ImageError::io(path, e))?;
    let got = format!("sha256:{:x}", h.finalize());
    if !got.eq_ignore_ascii_case(digest) {
        return Err(ImageError::DigestMismatch {
            blob: digest.to_string(),
            actual: got,
        });
    }
    Ok(())
}

fn is_gzip(path: &Path) -> Result<bool, ImageError> {
    let mut f = fs::File::open(path).map_err(|e| ImageError::io(path, e))?;
    let mut magic = [0u8; 2];
    match f.read_exact(&mut magic) {
        Ok(()) => Ok(magic == [0x1f, 0x8b]),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(ImageError::io(path, e)),
    }
}

/// Applies a layer file, gunzipping it when it starts with the gzip magic.
fn apply_file(path: &Path, root: &Path, name: &str, max: u64) -> Result<LayerStats, ImageError> {
    let gz = is_gzip(path)?;
    let f = BufReader::new(fs::File::open(path).map_err(|e| ImageError::io(path, e))?);
    if gz {
        apply_layer(GzDecoder::new(f), root, name, max)
    } else {
        apply_layer(f, root, name, max)
    }
}

/// A path named inside a `docker save` manifest, kept inside `dir`.
fn inside(dir: &Path, rel: &str) -> Result<PathBuf, ImageError> {
    let clean = clean_path(Path::new(rel))
        .filter(|p| !p.as_os_str().is_empty() && !rel.starts_with('/'))
        .ok_or_else(|| ImageError::BadOci(format!("manifest.json names {rel:?}")))?;
    let path = dir.join(clean);
    let meta = fs::symlink_metadata(&path)
        .map_err(|_| ImageError::BadOci(format!("manifest.json names missing {rel}")))?;
    if !meta.is_file() {
        return Err(ImageError::BadOci(format!("{rel} is not a file")));
    }
    Ok(path)
}

/// Unpacks an image tarball: directories and regular files only, paths kept inside.
fn unpack_outer_tar(path: &Path, dest: &Path) -> Result<(), ImageError> {
    let name = path.display().to_string();
    let bad = |reason: String| ImageError::BadLayer {
        layer: name.clone(),
        reason,
    };
    let f = BufReader::new(fs::File::open(path).map_err(|e| ImageError::io(path, e))?);
    let r: Box<dyn Read> = if is_gzip(path)? {
        Box::new(GzDecoder::new(f))
    } else {
        Box::new(f)
    };
    let mut archive = tar::Archive::new(r);
    let mut written: u64 = 0;
    let mut links: Vec<(PathBuf, PathBuf)> = Vec::new();
    for entry in archive
        .entries()
        .map_err(|e| bad(format!("not a tar archive: {e}")))?
    {
        let mut entry = entry.map_err(|e| bad(format!("bad tar entry: {e}")))?;
        let raw = entry
            .path()
            .map_err(|e| bad(format!("bad path: {e}")))?
            .into_owned();
        let rel = clean_path(&raw).ok_or_else(|| ImageError::PathEscapes {
            layer: name.clone(),
            path: raw.display().to_string(),
        })?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let out = dest.join(&rel);
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                fs::create_dir_all(&out).map_err(|e| ImageError::io(&out, e))?
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if let Some(p) = out.parent() {
                    fs::create_dir_all(p).map_err(|e| ImageError::io(p, e))?;
                }
                let mut f = fs::File::create(&out).map_err(|e| ImageError::io(&out, e))?;
                let budget = MAX_IMAGE_BYTES.saturating_sub(written);
                let n = io::copy(&mut (&mut entry).take(budget.saturating_add(1)), &mut f)
                    .map_err(|e| bad(format!("reading {}: {e}", raw.display())))?;
                if n > budget {
                    return Err(ImageError::TooLarge {
                        limit: MAX_IMAGE_BYTES,
                    });
                }
                written += n;
            }
            // docker save links a repeated layer to its first copy with a symlink.
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| bad(format!("bad link target: {e}")))?
                    .map(|t| t.into_owned());
                if let Some(t) = target {
                    if super::zip::link_stays_inside(&rel, &t) {
                        let base = rel.parent().map(Path::to_path_buf).unwrap_or_default();
                        links.push((out, base.join(t)));
                    }
                }
            }
            _ => {}
        }
    }
    for (link, target) in links {
        let Some(target) = clean_resolved(&target) else {
            continue;
        };
        let source = dest.join(target);
        if fs::symlink_metadata(&source).is_ok_and(|m| m.is_file()) {
            if let Some(p) = link.parent() {
                fs::create_dir_all(p).map_err(|e| ImageError::io(p, e))?;
            }
            fs::hard_link(&source, &link).map_err(|e| ImageError::io(&link, e))?;
        }
    }
    Ok(())
}

/// `a/b/../c` as `a/c`; None if it climbs above the start.
fn clean_resolved(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::Normal(n) => out.push(n),
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            _ => return None,
        }
    }
    Some(out)
}
