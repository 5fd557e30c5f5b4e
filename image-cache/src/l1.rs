//! L1, per host: a byte-bounded LRU in memory in front of a byte-bounded LRU directory on
//! local disk. Chunks that leave memory stay on disk; a disk hit is checked and promoted.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;
use lru::LruCache;

use crate::tier::{ChunkTier, TierError};
use crate::ChunkHash;

const NAME: &str = "L1";

/// An LRU of values with sizes, evicting least recently used entries past `max_bytes`.
struct SizedLru<V> {
    map: LruCache<ChunkHash, (V, u64)>,
    bytes: u64,
    max_bytes: u64,
}

impl<V: Clone> SizedLru<V> {
    fn new(max_bytes: u64) -> Self {
        SizedLru {
            map: LruCache::unbounded(),
            bytes: 0,
            max_bytes,
        }
    }

    fn get(&mut self, k: &ChunkHash) -> Option<V> {
        self.map.get(k).map(|(v, _)| v.clone())
    }

    /// Inserts and returns what was evicted to make room (the entry itself if it can never
    /// fit).
    fn insert(&mut self, k: ChunkHash, v: V, size: u64) -> Vec<(ChunkHash, V)> {
        let mut evicted = Vec::new();
        if size > self.max_bytes {
            evicted.push((k, v));
            return evicted;
        }
        if let Some((_, old)) = self.map.put(k, (v, size)) {
            self.bytes -= old;
        }
        self.bytes += size;
        while self.bytes > self.max_bytes {
            let Some((ek, (ev, es))) = self.map.pop_lru() else {
                break;
            };
            self.bytes -= es;
            evicted.push((ek, ev));
        }
        evicted
    }

    fn remove(&mut self, k: &ChunkHash) -> Option<V> {
        let (v, s) = self.map.pop(k)?;
        self.bytes -= s;
        Some(v)
    }
}

/// L1 sizes and place.
#[derive(Debug, Clone)]
pub struct L1Config {
    pub mem_bytes: u64,
    /// None: memory only.
    pub disk_dir: Option<PathBuf>,
    pub disk_bytes: u64,
}

pub struct L1Cache {
    mem: Mutex<SizedLru<Bytes>>,
    disk: Option<DiskLru>,
}

struct DiskLru {
    dir: PathBuf,
    /// Which chunk files exist, and their sizes; the files themselves hold the data.
    index: Mutex<SizedLru<()>>,
}

fn io_err(source: std::io::Error) -> TierError {
    TierError::Io {
        tier: NAME.into(),
        source,
    }
}

impl L1Cache {
    /// Opens L1; chunk files already in the disk directory are kept (oldest first to go).
    pub fn open(cfg: &L1Config) -> Result<L1Cache, TierError> {
        let disk = match &cfg.disk_dir {
            None => None,
            Some(dir) => Some(DiskLru::open(dir, cfg.disk_bytes)?),
        };
        Ok(L1Cache {
            mem: Mutex::new(SizedLru::new(cfg.mem_bytes)),
            disk,
        })
    }

    /// Bytes held in memory and on disk.
    pub fn usage(&self) -> (u64, u64) {
        let mem = self.mem.lock().map(|m| m.bytes).unwrap_or(0);
        let disk = self
            .disk
            .as_ref()
            .and_then(|d| d.index.lock().ok().map(|i| i.bytes))
            .unwrap_or(0);
        (mem, disk)
    }

    /// Where the disk copy of `hash` lives (tests corrupt it there).
    pub fn disk_path(&self, hash: &ChunkHash) -> Option<PathBuf> {
        self.disk.as_ref().map(|d| d.path(hash))
    }

    fn mem_insert(&self, hash: ChunkHash, data: Bytes) {
        let size = data.len() as u64;
        if let Ok(mut m) = self.mem.lock() {
            m.insert(hash, data, size);
        }
    }
}

impl DiskLru {
    fn open(dir: &Path, max_bytes: u64) -> Result<DiskLru, TierError> {
        std::fs::create_dir_all(dir).map_err(io_err)?;
        let mut found = Vec::new();
        for e in std::fs::read_dir(dir).map_err(io_err)? {
            let e = e.map_err(io_err)?;
            let name = e.file_name();
            let Some(hash) = name.to_str().and_then(|n| n.parse::<ChunkHash>().ok()) else {
                // Temporary files of an interrupted write, or strangers: leave them.
                continue;
            };
            let Ok(meta) = e.metadata() else { continue };
            let mtime = meta.modified().ok();
            found.push((mtime, hash, meta.len()));
        }
        found.sort_by_key(|(t, _, _)| *t);
        let mut index = SizedLru::new(max_bytes);
        for (_, hash, len) in found {
            for (gone, ()) in index.insert(hash, (), len) {
                let _ = std::fs::remove_file(dir.join(gone.to_hex()));
            }
        }
        Ok(DiskLru {
            dir: dir.to_path_buf(),
            index: Mutex::new(index),
        })
    }

    fn path(&self, hash: &ChunkHash) -> PathBuf {
        self.dir.join(hash.to_hex())
    }

    fn contains(&self, hash: &ChunkHash) -> bool {
        self.index
            .lock()
            .map(|mut i| i.get(hash).is_some())
            .unwrap_or(false)
    }

    async fn get(&self, hash: &ChunkHash) -> Result<Option<Bytes>, TierError> {
        if !self.contains(hash) {
            return Ok(None);
        }
        match tokio::fs::read(self.path(hash)).await {
            Ok(v) => Ok(Some(Bytes::from(v))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Removed behind our back: forget it.
                if let Ok(mut i) = self.index.lock() {
                    i.remove(hash);
                }
                Ok(None)
            }
            Err(e) => Err(io_err(e)),
        }
    }

    async fn put(&self, hash: &ChunkHash, data: &Bytes) -> Result<(), TierError> {
        if self.contains(hash) {
            return Ok(());
        }
        // Write then rename, so a reader never sees a partial chunk.
        let tmp = self
            .dir
            .join(format!(".{}.{}.tmp", hash.to_hex(), std::process::id()));
        tokio::fs::write(&tmp, data).await.map_err(io_err)?;
        tokio::fs::rename(&tmp, self.path(hash))
            .await
            .map_err(io_err)?;
        let evicted = match self.index.lock() {
            Ok(mut i) => i.insert(*hash, (), data.len() as u64),
            Err(_) => Vec::new(),
        };
        for (gone, ()) in evicted {
            if let Err(e) = tokio::fs::remove_file(self.path(&gone)).await {
                tracing::debug!("L1: cannot remove evicted chunk {gone}: {e}");
            }
        }
        Ok(())
    }

    async fn remove(&self, hash: &ChunkHash) -> Result<(), TierError> {
        if let Ok(mut i) = self.index.lock() {
            i.remove(hash);
        }
        match tokio::fs::remove_file(self.path(hash)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(e)),
        }
    }
}

#[async_trait]
impl ChunkTier for L1Cache {
    fn name(&self) -> &str {
        NAME
    }

    async fn get_raw(&self, hash: &ChunkHash) -> Result<Option<Bytes>, TierError> {
        let hit = self.mem.lock().ok().and_then(|mut m| m.get(hash));
        if hit.is_some() {
            return Ok(hit);
        }
        let Some(disk) = &self.disk else {
            return Ok(None);
        };
        let data = disk.get(hash).await?;
        if let Some(d) = &data {
            // Only a good copy moves up to memory; a bad one goes back to the caller, whose
            // check drops it from both levels.
            if hash.verify(d) {
                self.mem_insert(*hash, d.clone());
            }
        }
        Ok(data)
    }

    async fn put(&self, hash: &ChunkHash, data: Bytes) -> Result<(), TierError> {
        if let Some(disk) = &self.disk {
            disk.put(hash, &data).await?;
        }
        self.mem_insert(*hash, data);
        Ok(())
    }

    async fn remove(&self, hash: &ChunkHash) -> Result<(), TierError> {
        if let Ok(mut m) = self.mem.lock() {
            m.remove(hash);
        }
        if let Some(disk) = &self.disk {
            disk.remove(hash).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(i: u8) -> (ChunkHash, Bytes) {
        let d = Bytes::from(vec![i; 1000]);
        (ChunkHash::of(&d), d)
    }

    #[tokio::test]
    async fn memory_and_disk_are_bounded_lru() {
        let dir = tempfile::tempdir().unwrap();
        let l1 = L1Cache::open(&L1Config {
            mem_bytes: 2000,
            disk_dir: Some(dir.path().to_path_buf()),
            disk_bytes: 3000,
        })
        .unwrap();
        for i in 0..4 {
            let (h, d) = chunk(i);
            l1.put(&h, d).await.unwrap();
        }
        assert_eq!(l1.usage(), (2000, 3000));
        // Chunk 0 fell out of both; chunk 1 is on disk only and comes back, checked.
        assert!(l1.get(&chunk(0).0).await.unwrap().is_none());
        assert!(!dir.path().join(chunk(0).0.to_hex()).exists());
        assert_eq!(l1.get(&chunk(1).0).await.unwrap(), Some(chunk(1).1));
        // A reopened L1 finds the disk chunks again.
        drop(l1);
        let l1 = L1Cache::open(&L1Config {
            mem_bytes: 0,
            disk_dir: Some(dir.path().to_path_buf()),
            disk_bytes: 3000,
        })
        .unwrap();
        assert_eq!(l1.usage(), (0, 3000));
        assert_eq!(l1.get(&chunk(3).0).await.unwrap(), Some(chunk(3).1));
    }

    #[tokio::test]
    async fn corrupt_disk_copy_is_reported_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = L1Config {
            mem_bytes: 0,
            disk_dir: Some(dir.path().to_path_buf()),
            disk_bytes: 1 << 20,
        };
        let l1 = L1Cache::open(&cfg).unwrap();
        let (h, d) = chunk(9);
        l1.put(&h, d).await.unwrap();
        std::fs::write(l1.disk_path(&h).unwrap(), b"garbage").unwrap();
        assert!(matches!(l1.get(&h).await, Err(TierError::Corrupt { .. })));
        l1.remove(&h).await.unwrap();
        assert!(l1.get(&h).await.unwrap().is_none());
    }
}
