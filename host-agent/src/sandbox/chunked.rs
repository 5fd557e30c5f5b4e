//! Chunked root images for the microvm backend (issue 8): with an L3 configured
//! (`kindling serve --l3 URL`), a function revision's root image is pushed to the image store
//! once and VMs boot from it lazily, through this agent's chunk server and cache tiers
//! (L1 memory + disk, L2 memcached, L3 object store), instead of from a local ext4 file.
//!
//! - Image names are derived from what the image is built from (package type, runtime,
//!   CodeSha256, the guest-init binary, the kindling version): a second agent with the same
//!   function and store finds the image already there and builds nothing.
//! - `<data-dir>/chunked/`: `chunks.sock` (the chunk server, one per agent, on a tokio task),
//!   `<image>.manifest` (the only local copy of an image), `<image>.prefetch` (the chunk
//!   indices the first cold start's VM fetched, in order), `l1/` (the default L1 disk
//!   directory), `stats.json` (what each tier served, rewritten after each cold start).
//! - Prefetch: a cold start whose image has a prefetch list warms those chunks into L1
//!   (memory) on background tasks while the VMM boots, so the guest's reads find them there.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use image_cache::l3::StoreError;
use image_cache::{ChunkCache, ChunkHash, ImageStore, Manifest, TierConfig, TierReport};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Chunks fetched at once while warming a prefetch list.
const PREFETCH_CONCURRENCY: usize = 8;
/// How long the VMM's control socket may take to answer `fetched_chunks`.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ChunkedError {
    #[error("image cache: {0}")]
    Config(#[from] image_cache::config::ConfigError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image store: {0}")]
    Store(#[from] StoreError),
    #[error("pushing image {name}: {source}")]
    Push {
        name: String,
        #[source]
        source: image_cache::ops::OpError,
    },
    #[error("manifest of {name}: {source}")]
    Manifest {
        name: String,
        #[source]
        source: image_cache::ManifestError,
    },
    #[error("building the root image: {0}")]
    Build(String),
    #[error("VMM control socket {path}: {message}")]
    Control { path: PathBuf, message: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ChunkedError + '_ {
    move |source| ChunkedError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The prefetch list of an image: chunk indices in the order a cold start's VM fetched them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PrefetchList {
    pub image: String,
    pub chunks: Vec<u64>,
}

/// What `stats.json` holds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CacheStats {
    pub store: String,
    pub tiers: Vec<TierReport>,
    pub images: Vec<ImageStats>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ImageStats {
    pub name: String,
    pub image_bytes: u64,
    /// Chunks the image spans, zero ones included.
    pub chunks: u64,
    /// Chunks with data (the rest read as zeros and are never fetched).
    pub stored_chunks: u64,
    /// Chunks the last recorded cold start's VM fetched.
    pub fetched_chunks: Option<u64>,
    /// Whether a prefetch list was warmed for the last cold start.
    pub prefetched: bool,
}

/// The agent's chunked-image service: store, cache, chunk server and local manifests.
pub struct ChunkedImages {
    store: ImageStore,
    cache: Arc<ChunkCache>,
    dir: PathBuf,
    socket: PathBuf,
    /// One build-and-push at a time per image name.
    building: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    images: Mutex<HashMap<String, ImageStats>>,
}

impl std::fmt::Debug for ChunkedImages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkedImages")
            .field("store", &self.store.location)
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

/// The image name for a function revision's root image, from what it is built from.
pub fn image_name(f: &crate::functions::Function, guest_init_digest: &str) -> String {
    let c = &f.config;
    let mut h = Sha256::new();
    for part in [
        "kindling-function-image/1",
        env!("CARGO_PKG_VERSION"),
        &c.package_type,
        &c.runtime,
        &c.code_sha256,
        guest_init_digest,
        rootfs::base::AWSLAMBDARIC,
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    let hex: String = h
        .finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("fn-{hex}")
}

/// SHA-256 (hex) of a file, e.g. the guest-init binary that goes into every image.
pub fn file_digest(path: &Path) -> Result<String, ChunkedError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    Ok(Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

impl ChunkedImages {
    /// Opens the tiers (`l1_dir` defaults to `<data-dir>/chunked/l1`), binds the chunk
    /// server's socket and serves it on a tokio task for the agent's life.
    pub fn start(tiers: &TierConfig, data_dir: &Path) -> Result<Arc<ChunkedImages>, ChunkedError> {
        let dir = data_dir.join("chunked");
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let mut tiers = tiers.clone();
        if tiers.l1_dir.is_none() {
            tiers.l1_dir = Some(dir.join("l1"));
        }
        let (store, _l1, cache) = tiers.open()?;
        let cache = Arc::new(cache);
        let socket = dir.join("chunks.sock");
        let listener = image_cache::server::bind(&socket).map_err(io_err(&socket))?;
        {
            let cache = cache.clone();
            tokio::spawn(async move {
                if let Err(e) = image_cache::server::serve(listener, cache).await {
                    tracing::error!("the chunk server stopped: {e}");
                }
            });
        }
        tracing::info!(store = %store.location, l2 = ?tiers.l2, socket = %socket.display(),
            "microvm root images are chunked: served lazily through the image cache");
        Ok(Arc::new(ChunkedImages {
            store,
            cache,
            dir,
            socket,
            building: Mutex::new(HashMap::new()),
            images: Mutex::new(HashMap::new()),
        }))
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    pub fn manifest_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.manifest"))
    }

    fn prefetch_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.prefetch"))
    }

    fn lock_for(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.building.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(name.to_string()).or_default().clone()
    }

    /// The local manifest of image `name`: kept from before, else read from the store, else
    /// (when `build` is given) built as an ext4 file by `build`, pushed, and the file removed.
    pub async fn ensure(
        &self,
        name: &str,
        build: Option<Box<dyn FnOnce() -> Result<PathBuf, String> + Send>>,
    ) -> Result<(PathBuf, Manifest), ChunkedError> {
        let lock = self.lock_for(name);
        let _held = lock.lock().await;
        let path = self.manifest_path(name);
        if let Ok(bytes) = tokio::fs::read(&path).await {
            match Manifest::decode(&bytes) {
                Ok(m) => {
                    self.note_image(name, &m);
                    return Ok((path, m));
                }
                Err(e) => tracing::warn!("{}: {e}; fetching it again", path.display()),
            }
        }
        let bytes = match (self.store.manifest_bytes(name).await, build) {
            (Ok(b), _) => b,
            (Err(StoreError::NoImage(_)), Some(build)) => {
                let file = tokio::task::spawn_blocking(build)
                    .await
                    .map_err(|e| ChunkedError::Build(e.to_string()))?
                    .map_err(ChunkedError::Build)?;
                let pushed = image_cache::ops::push(&self.store, &file, name, &|_| {}).await;
                // Only the manifest is kept here: the image lives in the store.
                let _ = tokio::fs::remove_file(&file).await;
                let r = pushed.map_err(|source| ChunkedError::Push {
                    name: name.into(),
                    source,
                })?;
                tracing::info!(
                    image = name,
                    bytes = r.image_bytes,
                    chunks = r.chunks,
                    new_chunks = r.new_chunks,
                    new_bytes = r.new_bytes,
                    "root image pushed to {}",
                    self.store.location
                );
                self.store.manifest_bytes(name).await?
            }
            (Err(e), _) => return Err(e.into()),
        };
        let m = Manifest::decode(&bytes).map_err(|source| ChunkedError::Manifest {
            name: name.into(),
            source,
        })?;
        let tmp = path.with_extension(format!("manifest.tmp-{}", std::process::id()));
        tokio::fs::write(&tmp, &bytes).await.map_err(io_err(&tmp))?;
        tokio::fs::rename(&tmp, &path)
            .await
            .map_err(io_err(&path))?;
        self.note_image(name, &m);
        Ok((path, m))
    }

    fn note_image(&self, name: &str, m: &Manifest) {
        let mut images = self.images.lock().unwrap_or_else(|e| e.into_inner());
        images
            .entry(name.to_string())
            .or_insert_with(|| ImageStats {
                name: name.into(),
                image_bytes: m.image_size,
                chunks: m.total_chunks(),
                stored_chunks: m.chunks.len() as u64,
                fetched_chunks: None,
                prefetched: false,
            });
    }

    /// Warms the chunks of the image's prefetch list (if it has one) into the cache on
    /// background tasks, in the recorded order. Returns whether there was a list.
    pub fn warm(&self, name: &str, m: &Manifest) -> bool {
        let Ok(text) = std::fs::read(self.prefetch_path(name)) else {
            return false;
        };
        let list: PrefetchList = match serde_json::from_slice(&text) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(image = name, "bad prefetch list ({e}); not warming");
                return false;
            }
        };
        let cs = u64::from(m.chunk_size);
        let hashes: Vec<ChunkHash> = list
            .chunks
            .iter()
            .filter_map(|&i| m.chunk_at(i.checked_mul(cs)?).map(|e| e.hash))
            .collect();
        if let Ok(mut images) = self.images.lock() {
            if let Some(s) = images.get_mut(name) {
                s.prefetched = true;
            }
        }
        let (cache, name) = (self.cache.clone(), name.to_string());
        tokio::spawn(async move {
            let n = hashes.len();
            let t0 = std::time::Instant::now();
            futures_util::stream::iter(hashes)
                .for_each_concurrent(PREFETCH_CONCURRENCY, |h| {
                    let cache = cache.clone();
                    async move {
                        // A failure here only means the VM fetches it itself later.
                        let _ = cache.get(&h).await;
                    }
                })
                .await;
            tracing::debug!(image = %name, chunks = n, "prefetch warmed in {:.0} ms",
                t0.elapsed().as_secs_f64() * 1e3);
        });
        true
    }

    /// After a cold start's first invocation: asks the VMM (control socket `api_sock`) which
    /// chunks it fetched, keeps that order as the image's prefetch list (when it has none
    /// yet), and rewrites `stats.json`.
    pub async fn record_cold_start(
        &self,
        name: &str,
        manifest: &Path,
        api_sock: &Path,
    ) -> Result<(), ChunkedError> {
        let chunks = tokio::time::timeout(CONTROL_TIMEOUT, fetched_chunks(api_sock, manifest))
            .await
            .map_err(|_| ChunkedError::Control {
                path: api_sock.into(),
                message: "no answer".into(),
            })??;
        if let Ok(mut images) = self.images.lock() {
            if let Some(s) = images.get_mut(name) {
                s.fetched_chunks = Some(chunks.len() as u64);
            }
        }
        let pf = self.prefetch_path(name);
        if !pf.exists() && !chunks.is_empty() {
            let list = PrefetchList {
                image: name.into(),
                chunks,
            };
            let text = serde_json::to_vec(&list).unwrap_or_default();
            let tmp = pf.with_extension(format!("prefetch.tmp-{}", std::process::id()));
            tokio::fs::write(&tmp, text).await.map_err(io_err(&tmp))?;
            tokio::fs::rename(&tmp, &pf).await.map_err(io_err(&pf))?;
        }
        self.write_stats().await
    }

    pub fn stats(&self) -> CacheStats {
        let mut images: Vec<ImageStats> = self
            .images
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        images.sort_by(|a, b| a.name.cmp(&b.name));
        CacheStats {
            store: self.store.location.clone(),
            tiers: self.cache.report(),
            images,
        }
    }

    async fn write_stats(&self) -> Result<(), ChunkedError> {
        let s = self.stats();
        let path = self.dir.join("stats.json");
        let tmp = self
            .dir
            .join(format!("stats.json.tmp-{}", std::process::id()));
        let text = serde_json::to_vec_pretty(&s).unwrap_or_default();
        tokio::fs::write(&tmp, text).await.map_err(io_err(&tmp))?;
        tokio::fs::rename(&tmp, &path)
            .await
            .map_err(io_err(&path))?;
        let line: Vec<String> = s
            .tiers
            .iter()
            .map(|t| format!("{} {} chunks/{} B", t.tier, t.hits, t.bytes))
            .collect();
        tracing::info!("image cache: {}", line.join(", "));
        Ok(())
    }
}

/// Asks a VMM for the chunks its disk on `manifest` fetched (`{"action":"fetched_chunks"}`).
pub async fn fetched_chunks(api_sock: &Path, manifest: &Path) -> Result<Vec<u64>, ChunkedError> {
    let fail = |message: String| ChunkedError::Control {
        path: api_sock.into(),
        message,
    };
    let mut s = tokio::net::UnixStream::connect(api_sock)
        .await
        .map_err(|e| fail(e.to_string()))?;
    s.write_all(b"{\"action\":\"fetched_chunks\"}\n")
        .await
        .map_err(|e| fail(e.to_string()))?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let v: serde_json::Value =
        serde_json::from_str(&line).map_err(|e| fail(format!("bad answer: {e}")))?;
    if v["ok"] != true {
        return Err(fail(format!("refused: {}", v["error"])));
    }
    let disks = v["disks"].as_array().cloned().unwrap_or_default();
    let disk = disks
        .iter()
        .find(|d| d["manifest"].as_str().map(Path::new) == Some(manifest))
        .ok_or_else(|| fail("no chunked disk on that manifest".into()))?;
    Ok(disk["chunks"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn builds_once_pushes_and_keeps_only_the_manifest() {
        let tmp = tempfile::tempdir().unwrap();
        let tiers = TierConfig {
            l3: Some(format!("file://{}", tmp.path().join("store").display())),
            l1_disk_mib: 0,
            ..Default::default()
        };
        let c = ChunkedImages::start(&tiers, &tmp.path().join("data")).unwrap();
        let img = tmp.path().join("img.ext4");
        let mut data = vec![0u8; 3 << 20];
        data[..5].copy_from_slice(b"hello");
        data[(2 << 20) + 7] = 1;
        std::fs::write(&img, &data).unwrap();
        let built = img.clone();
        let (path, m) = c
            .ensure("fn-test", Some(Box::new(move || Ok(built))))
            .await
            .unwrap();
        assert!(
            path.is_file() && !img.exists(),
            "the ext4 is removed after the push"
        );
        assert_eq!((m.total_chunks(), m.chunks.len()), (6, 2));
        // Present now: no build asked for.
        let (_, m2) = c.ensure("fn-test", None).await.unwrap();
        assert_eq!(m, m2);
        // Not in the store and nothing to build from: the store's error.
        assert!(matches!(
            c.ensure("fn-none", None).await,
            Err(ChunkedError::Store(StoreError::NoImage(_)))
        ));
        // A prefetch list warms the cache (L1 is filled from L3).
        std::fs::write(
            c.prefetch_path("fn-test"),
            serde_json::to_vec(&PrefetchList {
                image: "fn-test".into(),
                chunks: vec![4, 0, 1],
            })
            .unwrap(),
        )
        .unwrap();
        assert!(c.warm("fn-test", &m));
        for _ in 0..100 {
            if c.cache.report()[0].misses >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let r = c.cache.report();
        // Chunk 1 is all zeros: not stored, not fetched.
        assert_eq!((r[0].misses, r[1].hits), (2, 2), "{r:?}");
    }
}
