//! Image operations: push (chunk an image file into L3), pull (rebuild it through the cache),
//! list, and garbage-collect unreferenced chunks.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::l3::StoreError;
use crate::{
    is_zero, CacheError, ChunkCache, ChunkEntry, ChunkHash, ImageStore, Manifest, CHUNK_SIZE,
};

#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OpError + '_ {
    move |source| OpError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a push stored.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PushReport {
    pub name: String,
    pub image_bytes: u64,
    /// Chunks the image spans, zero ones included.
    pub chunks: u64,
    pub zero_chunks: u64,
    /// Distinct non-zero chunks.
    pub unique_chunks: u64,
    /// Chunks that were not in the store yet (the rest were shared with other images).
    pub new_chunks: u64,
    pub new_bytes: u64,
}

/// Chunks `path` into the store as image `name`; `progress` gets the bytes read so far.
/// Chunks already stored (from this or another image) are not uploaded again; the manifest
/// is written last, so a failed push leaves no image behind.
pub async fn push(
    store: &ImageStore,
    path: &Path,
    name: &str,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<PushReport, OpError> {
    crate::l3::check_name(name)?;
    let mut f = tokio::fs::File::open(path).await.map_err(io(path))?;
    let mut buf = vec![0u8; CHUNK_SIZE as usize];
    let mut offset = 0u64;
    let mut entries = Vec::new();
    let mut seen = HashSet::new();
    let (mut chunks, mut zero, mut new_chunks, mut new_bytes) = (0u64, 0u64, 0u64, 0u64);
    loop {
        let mut n = 0;
        while n < buf.len() {
            let rest = buf.get_mut(n..).unwrap_or_default();
            let got = f.read(rest).await.map_err(io(path))?;
            if got == 0 {
                break;
            }
            n += got;
        }
        if n == 0 {
            break;
        }
        chunks += 1;
        let data = buf.get(..n).unwrap_or_default();
        if is_zero(data) {
            zero += 1;
        } else {
            let hash = ChunkHash::of(data);
            if seen.insert(hash) && !store.has_chunk(&hash).await? {
                store
                    .put_chunk(&hash, bytes::Bytes::copy_from_slice(data))
                    .await?;
                new_chunks += 1;
                new_bytes += n as u64;
            }
            entries.push(ChunkEntry { offset, hash });
        }
        offset += n as u64;
        progress(offset);
        if n < buf.len() {
            break;
        }
    }
    let m = Manifest {
        chunk_size: CHUNK_SIZE,
        image_size: offset,
        chunks: entries,
    };
    store.put_manifest(name, &m).await?;
    Ok(PushReport {
        name: name.into(),
        image_bytes: offset,
        chunks,
        zero_chunks: zero,
        unique_chunks: seen.len() as u64,
        new_chunks,
        new_bytes,
    })
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PullReport {
    pub name: String,
    pub image_bytes: u64,
    pub chunks_read: u64,
}

/// Rebuilds image `name` into `out` through the cache (zero chunks stay holes); `progress`
/// gets the chunks done and the total.
pub async fn pull(
    store: &ImageStore,
    cache: &ChunkCache,
    name: &str,
    out: &Path,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<PullReport, OpError> {
    let m = store.manifest(name).await?;
    let tmp = out.with_extension(format!("partial-{}", std::process::id()));
    let result = async {
        let mut f = tokio::fs::File::create(&tmp).await.map_err(io(&tmp))?;
        f.set_len(m.image_size).await.map_err(io(&tmp))?;
        let total = m.chunks.len() as u64;
        for (i, c) in m.chunks.iter().enumerate() {
            let data = cache.get(&c.hash).await?;
            f.seek(std::io::SeekFrom::Start(c.offset))
                .await
                .map_err(io(&tmp))?;
            f.write_all(&data).await.map_err(io(&tmp))?;
            progress(i as u64 + 1, total);
        }
        f.sync_all().await.map_err(io(&tmp))?;
        tokio::fs::rename(&tmp, out).await.map_err(io(out))?;
        Ok::<_, OpError>(total)
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    Ok(PullReport {
        name: name.into(),
        image_bytes: m.image_size,
        chunks_read: result?,
    })
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ImageInfo {
    pub name: String,
    pub image_bytes: u64,
    /// Chunks the image spans, zero ones included.
    pub chunks: u64,
    /// Distinct non-zero chunks.
    pub unique_chunks: u64,
}

pub async fn list(store: &ImageStore) -> Result<Vec<ImageInfo>, OpError> {
    let mut out = Vec::new();
    for name in store.list_images().await? {
        let m = store.manifest(&name).await?;
        out.push(ImageInfo {
            image_bytes: m.image_size,
            chunks: m.total_chunks(),
            unique_chunks: m.unique_hashes().len() as u64,
            name,
        });
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GcReport {
    pub images: u64,
    pub kept_chunks: u64,
    pub deleted_chunks: u64,
    pub deleted_bytes: u64,
    /// Unreferenced but younger than the minimum age (a push may be writing them).
    pub young_chunks: u64,
}

/// Deletes chunks no manifest references and older than `min_age` (a push in progress
/// uploads its chunks before its manifest; the age keeps them).
pub async fn gc(store: &ImageStore, min_age: Duration) -> Result<GcReport, OpError> {
    let images = store.list_images().await?;
    let mut live = HashSet::new();
    for name in &images {
        // A manifest that cannot be read stops the collection: its chunks might be live.
        live.extend(store.manifest(name).await?.unique_hashes());
    }
    let now = SystemTime::now();
    let mut r = GcReport {
        images: images.len() as u64,
        kept_chunks: 0,
        deleted_chunks: 0,
        deleted_bytes: 0,
        young_chunks: 0,
    };
    for (hash, size, modified) in store.list_chunks().await? {
        if live.contains(&hash) {
            r.kept_chunks += 1;
        } else if now.duration_since(modified).unwrap_or_default() < min_age {
            r.young_chunks += 1;
        } else {
            store.delete_chunk(&hash).await?;
            r.deleted_chunks += 1;
            r.deleted_bytes += size;
        }
    }
    Ok(r)
}
