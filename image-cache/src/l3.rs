//! L3, the durable tier: an object store (a local directory by default, any S3-compatible
//! store by configuration) holding `chunks/<sha256 hex>` and `manifests/<image name>`.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, PutPayload};

use crate::tier::{ChunkTier, TierError};
use crate::{ChunkHash, Manifest, ManifestError};

const NAME: &str = "L3";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),
    #[error("image {0:?} not found")]
    NoImage(String),
    #[error("image name {0:?}: use 1-128 of A-Z a-z 0-9 . _ - (not starting with a dot)")]
    BadName(String),
    #[error("manifest of image {name:?}: {source}")]
    Manifest {
        name: String,
        #[source]
        source: ManifestError,
    },
}

/// The object store, seen as images and chunks.
#[derive(Clone)]
pub struct ImageStore {
    store: Arc<dyn ObjectStore>,
    /// Describes where it is, for messages.
    pub location: String,
}

/// Checks an image name (it becomes an object key).
pub fn check_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadName(name.chars().take(140).collect()))
    }
}

fn chunk_path(hash: &ChunkHash) -> ObjPath {
    ObjPath::from(format!("chunks/{}", hash.to_hex()))
}

fn manifest_path(name: &str) -> ObjPath {
    ObjPath::from(format!("manifests/{name}"))
}

impl ImageStore {
    pub fn new(store: Arc<dyn ObjectStore>, location: String) -> ImageStore {
        ImageStore { store, location }
    }

    pub async fn has_chunk(&self, hash: &ChunkHash) -> Result<bool, StoreError> {
        match self.store.head(&chunk_path(hash)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn put_chunk(&self, hash: &ChunkHash, data: Bytes) -> Result<(), StoreError> {
        self.store
            .put(&chunk_path(hash), PutPayload::from_bytes(data))
            .await?;
        Ok(())
    }

    pub async fn put_manifest(&self, name: &str, m: &Manifest) -> Result<(), StoreError> {
        check_name(name)?;
        self.store
            .put(&manifest_path(name), PutPayload::from(m.encode()))
            .await?;
        Ok(())
    }

    /// The raw manifest bytes (the VMM gets these as a file).
    pub async fn manifest_bytes(&self, name: &str) -> Result<Bytes, StoreError> {
        check_name(name)?;
        match self.store.get(&manifest_path(name)).await {
            Ok(r) => Ok(r.bytes().await?),
            Err(object_store::Error::NotFound { .. }) => Err(StoreError::NoImage(name.into())),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn manifest(&self, name: &str) -> Result<Manifest, StoreError> {
        let b = self.manifest_bytes(name).await?;
        Manifest::decode(&b).map_err(|source| StoreError::Manifest {
            name: name.into(),
            source,
        })
    }

    /// Image names, sorted.
    pub async fn list_images(&self) -> Result<Vec<String>, StoreError> {
        let prefix = ObjPath::from("manifests");
        let metas: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
        let mut names: Vec<String> = metas
            .into_iter()
            .filter_map(|m| m.location.filename().map(str::to_string))
            .filter(|n| check_name(n).is_ok())
            .collect();
        names.sort();
        Ok(names)
    }

    /// Every stored chunk with its size and age.
    pub async fn list_chunks(
        &self,
    ) -> Result<Vec<(ChunkHash, u64, std::time::SystemTime)>, StoreError> {
        let prefix = ObjPath::from("chunks");
        let metas: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let h = m.location.filename()?.parse::<ChunkHash>().ok()?;
                Some((h, m.size, m.last_modified.into()))
            })
            .collect())
    }

    pub async fn delete_chunk(&self, hash: &ChunkHash) -> Result<(), StoreError> {
        match self.store.delete(&chunk_path(hash)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn delete_image(&self, name: &str) -> Result<(), StoreError> {
        check_name(name)?;
        self.store.delete(&manifest_path(name)).await?;
        Ok(())
    }

    /// This store as a cache tier.
    pub fn tier(&self) -> Arc<dyn ChunkTier> {
        Arc::new(ObjectStoreTier {
            store: self.clone(),
        })
    }
}

struct ObjectStoreTier {
    store: ImageStore,
}

fn tier_err(source: object_store::Error) -> TierError {
    TierError::ObjectStore {
        tier: NAME.into(),
        source,
    }
}

#[async_trait]
impl ChunkTier for ObjectStoreTier {
    fn name(&self) -> &str {
        NAME
    }

    async fn get_raw(&self, hash: &ChunkHash) -> Result<Option<Bytes>, TierError> {
        match self.store.store.get(&chunk_path(hash)).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(tier_err)?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(tier_err(e)),
        }
    }

    async fn put(&self, hash: &ChunkHash, data: Bytes) -> Result<(), TierError> {
        self.store
            .store
            .put(&chunk_path(hash), PutPayload::from_bytes(data))
            .await
            .map_err(tier_err)?;
        Ok(())
    }

    /// L3 is the last copy: a bad chunk there is reported, never deleted by a reader (an
    /// operator repairs it by deleting the object and pushing an image that holds it).
    async fn remove(&self, _hash: &ChunkHash) -> Result<(), TierError> {
        Ok(())
    }
}
