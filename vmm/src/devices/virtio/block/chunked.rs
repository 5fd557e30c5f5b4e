//! A virtio-blk backend for chunked images (issue 8): the image is read lazily, chunk by
//! chunk, from the agent's chunk server over a Unix socket ([`image_format::wire`]), so a
//! guest boots after fetching only the chunks it touches.
//!
//! - The manifest (a local file, `path` in the block config) says which chunk holds which
//!   part of the image; chunks it leaves out read as zeros.
//! - Every fetched chunk is checked against its SHA-256 here, whatever the server did; a
//!   chunk that cannot be had intact fails that read (IOERR in the guest) and is logged.
//! - Fetched chunks stay in memory, least recently used dropped past `cache_mib`.
//! - Chunks are immutable: writes go to a local sparse overlay file, and a bitmap (one bit
//!   per sector, in memory) sends reads of written sectors there. The overlay lives as long
//!   as the VM: it is emptied when the device is built.
//!
//! No async runtime: blocking socket I/O on the event loop, like the raw-file backend's
//! `pread`.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use image_format::wire::{ChunkClient, WireError};
use image_format::{Manifest, ManifestError};

use super::{DiskBackend, SECTOR_SIZE};
use crate::config::ChunkedImageConfig;

/// How long one chunk fetch may take before the read fails.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ChunkedError {
    #[error("cannot read the manifest {path}: {source}")]
    ReadManifest { path: PathBuf, source: io::Error },
    #[error("manifest {path}: {source}")]
    Manifest {
        path: PathBuf,
        source: ManifestError,
    },
    #[error("a writable chunked disk needs an overlay file")]
    NoOverlay,
    #[error("cannot prepare the overlay {path}: {source}")]
    Overlay { path: PathBuf, source: io::Error },
}

/// First-fetch orders of the chunked disks alive in this process, by manifest path: the
/// control socket's `fetched_chunks` action reads them (the agent saves the order after a cold
/// start and warms those chunks first on the next one). Weak: a dropped disk leaves the list.
type FetchLog = Arc<Mutex<Vec<u64>>>;
type FetchLogRef = (PathBuf, Weak<Mutex<Vec<u64>>>);
static FETCH_LOGS: Mutex<Vec<FetchLogRef>> = Mutex::new(Vec::new());

/// Every live chunked disk's manifest path and the chunk indices it fetched, in first-fetch
/// order.
pub fn fetched_chunks_by_disk() -> Vec<(PathBuf, Vec<u64>)> {
    let Ok(mut logs) = FETCH_LOGS.lock() else {
        return Vec::new();
    };
    logs.retain(|(_, w)| w.strong_count() > 0);
    logs.iter()
        .filter_map(|(p, w)| {
            let log = w.upgrade()?;
            let v = log.lock().ok()?.clone();
            Some((p.clone(), v))
        })
        .collect()
}

/// Fetched chunks by chunk index, bounded, least recently used out first.
struct ChunkLru {
    map: HashMap<u64, Vec<u8>>,
    order: VecDeque<u64>,
    max: usize,
}

impl ChunkLru {
    fn touch(&mut self, idx: u64) {
        if let Some(pos) = self.order.iter().position(|&i| i == idx) {
            self.order.remove(pos);
        }
        self.order.push_back(idx);
    }

    fn insert(&mut self, idx: u64, data: Vec<u8>) {
        while self.map.len() >= self.max.max(1) {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.map.remove(&old);
        }
        self.map.insert(idx, data);
        self.touch(idx);
    }
}

pub struct ChunkedDisk {
    manifest: Manifest,
    client: ChunkClient,
    cache: ChunkLru,
    overlay: Option<File>,
    /// Bit per sector: written by the guest (the overlay holds it).
    written: Vec<u64>,
    /// Chunks fetched from the server so far (each distinct index counted once), shared with
    /// [`FETCH_LOGS`].
    fetched: FetchLog,
    fetched_set: std::collections::HashSet<u64>,
}

impl ChunkedDisk {
    pub fn open(
        manifest_path: &Path,
        cfg: &ChunkedImageConfig,
        read_only: bool,
    ) -> Result<ChunkedDisk, ChunkedError> {
        let bytes = std::fs::read(manifest_path).map_err(|source| ChunkedError::ReadManifest {
            path: manifest_path.to_path_buf(),
            source,
        })?;
        let manifest = Manifest::decode(&bytes).map_err(|source| ChunkedError::Manifest {
            path: manifest_path.to_path_buf(),
            source,
        })?;
        let overlay = match (&cfg.overlay, read_only) {
            (_, true) => None,
            (None, false) => return Err(ChunkedError::NoOverlay),
            (Some(p), false) => {
                let err = |source| ChunkedError::Overlay {
                    path: p.clone(),
                    source,
                };
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(p)
                    .map_err(err)?;
                // Sparse: only written sectors take space.
                f.set_len(manifest.image_size).map_err(err)?;
                Some(f)
            }
        };
        let sectors = manifest.image_size / SECTOR_SIZE;
        let words = usize::try_from(sectors.div_ceil(64)).unwrap_or(usize::MAX);
        let max_chunks = (u64::from(cfg.cache_mib) << 20) / u64::from(manifest.chunk_size.max(1));
        let fetched: FetchLog = Arc::default();
        if let Ok(mut logs) = FETCH_LOGS.lock() {
            logs.retain(|(_, w)| w.strong_count() > 0);
            logs.push((manifest_path.to_path_buf(), Arc::downgrade(&fetched)));
        }
        Ok(ChunkedDisk {
            client: ChunkClient::new(&cfg.socket, FETCH_TIMEOUT),
            cache: ChunkLru {
                map: HashMap::new(),
                order: VecDeque::new(),
                max: usize::try_from(max_chunks).unwrap_or(usize::MAX),
            },
            written: if overlay.is_some() {
                vec![0; words]
            } else {
                Vec::new()
            },
            overlay,
            manifest,
            fetched,
            fetched_set: Default::default(),
        })
    }

    /// Chunk indices fetched from the chunk server, in first-fetch order (what a prefetch
    /// for the next cold start would ask for).
    pub fn fetched_chunks(&self) -> Vec<u64> {
        self.fetched.lock().map(|v| v.clone()).unwrap_or_default()
    }

    fn is_written(&self, sector: u64) -> bool {
        let (w, b) = ((sector / 64) as usize, sector % 64);
        self.written.get(w).is_some_and(|x| x & (1 << b) != 0)
    }

    fn mark_written(&mut self, sector: u64) {
        let (w, b) = ((sector / 64) as usize, sector % 64);
        if let Some(x) = self.written.get_mut(w) {
            *x |= 1 << b;
        }
    }

    /// Copies `buf.len()` bytes of chunk `idx` from `within` into `buf`.
    fn read_chunk(&mut self, idx: u64, within: usize, buf: &mut [u8]) -> io::Result<()> {
        let cs = u64::from(self.manifest.chunk_size);
        let offset = idx * cs;
        let Some(entry) = self.manifest.chunk_at(offset).copied() else {
            buf.fill(0);
            return Ok(());
        };
        if !self.cache.map.contains_key(&idx) {
            let data = self.client.fetch(&entry.hash).map_err(|e| {
                tracing::error!("virtio-blk: chunk {} at {offset}: {e}", entry.hash);
                match e {
                    WireError::Io { source, .. } => source,
                    other => io::Error::other(other.to_string()),
                }
            })?;
            let want = self.manifest.chunk_len(offset) as usize;
            if data.len() != want {
                tracing::error!(
                    "virtio-blk: chunk {} at {offset} is {} bytes, the manifest says {want}",
                    entry.hash,
                    data.len()
                );
                return Err(io::Error::other("chunk of the wrong length"));
            }
            if self.fetched_set.insert(idx) {
                if let Ok(mut f) = self.fetched.lock() {
                    f.push(idx);
                }
            }
            self.cache.insert(idx, data);
        } else {
            self.cache.touch(idx);
        }
        let src = self
            .cache
            .map
            .get(&idx)
            .and_then(|d| d.get(within..within + buf.len()))
            .ok_or_else(|| io::Error::other("read past the chunk"))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl DiskBackend for ChunkedDisk {
    fn size(&self) -> u64 {
        self.manifest.image_size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let cs = u64::from(self.manifest.chunk_size);
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let idx = pos / cs;
            let within = (pos % cs) as usize;
            let n = (buf.len() - done).min(cs as usize - within);
            let piece = buf
                .get_mut(done..done + n)
                .ok_or_else(|| io::Error::other("read range"))?;
            let first = pos / SECTOR_SIZE;
            let last = (pos + n as u64).div_ceil(SECTOR_SIZE);
            if (first..last).any(|s| self.is_written(s)) {
                // Mixed: sector by sector (requests are whole sectors).
                for (i, sec) in piece.chunks_mut(SECTOR_SIZE as usize).enumerate() {
                    let s = first + i as u64;
                    if self.is_written(s) {
                        if let Some(f) = &self.overlay {
                            f.read_exact_at(sec, s * SECTOR_SIZE)?;
                        }
                    } else {
                        self.read_chunk(idx, within + i * SECTOR_SIZE as usize, sec)?;
                    }
                }
            } else {
                self.read_chunk(idx, within, piece)?;
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let Some(f) = &self.overlay else {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        };
        f.write_all_at(buf, offset)?;
        let first = offset / SECTOR_SIZE;
        let last = (offset + buf.len() as u64).div_ceil(SECTOR_SIZE);
        for s in first..last {
            self.mark_written(s);
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        match &self.overlay {
            Some(f) => f.sync_data(),
            None => Ok(()),
        }
    }
}
