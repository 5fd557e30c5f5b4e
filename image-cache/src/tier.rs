//! The one interface every cache tier implements.

use async_trait::async_trait;
use bytes::Bytes;

use crate::ChunkHash;

#[derive(Debug, thiserror::Error)]
pub enum TierError {
    #[error("{tier}: chunk {hash} does not match its hash")]
    Corrupt { tier: String, hash: ChunkHash },
    #[error("{tier}: {source}")]
    Io {
        tier: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{tier}: {source}")]
    ObjectStore {
        tier: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{tier}: {message}")]
    Unavailable { tier: String, message: String },
}

/// A place chunks can be read from and written to, by hash.
#[async_trait]
pub trait ChunkTier: Send + Sync {
    /// "L1", "L2", "L3": for logs and statistics.
    fn name(&self) -> &str;

    /// The stored bytes, unchecked. `Ok(None)` is a miss.
    async fn get_raw(&self, hash: &ChunkHash) -> Result<Option<Bytes>, TierError>;

    /// Stores `data` under `hash` (the caller has checked it).
    async fn put(&self, hash: &ChunkHash, data: Bytes) -> Result<(), TierError>;

    /// Drops the chunk (a corrupt copy); absent chunks are not an error.
    async fn remove(&self, hash: &ChunkHash) -> Result<(), TierError>;

    /// The chunk, checked against its hash: a mismatch is [`TierError::Corrupt`].
    async fn get(&self, hash: &ChunkHash) -> Result<Option<Bytes>, TierError> {
        match self.get_raw(hash).await? {
            Some(data) if !hash.verify(&data) => Err(TierError::Corrupt {
                tier: self.name().to_string(),
                hash: *hash,
            }),
            other => Ok(other),
        }
    }
}
