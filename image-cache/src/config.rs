//! Tier configuration from flags or the environment, and building the tiers from it.

use std::path::PathBuf;
use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::ObjectStore;

use crate::l1::{L1Cache, L1Config};
use crate::l2::MemcachedTier;
use crate::tier::{ChunkTier, TierError};
use crate::{ChunkCache, ImageStore};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--l3 {0:?}: expected file:///path, s3://bucket[/prefix] or memory://")]
    BadL3(String),
    #[error("--l3 {url}: {source}")]
    Store {
        url: String,
        #[source]
        source: object_store::Error,
    },
    #[error("--l3 {url}: {source}")]
    Dir {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("L1: {0}")]
    L1(#[from] TierError),
    #[error("--l2 {0:?}: expected host:port")]
    BadL2(String),
}

fn home_dir(sub: &str) -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(sub)
}

/// Where images live and how they are cached.
#[derive(Debug, Clone, clap::Args)]
pub struct TierConfig {
    /// L3, the durable store: file:///path (default ~/.local/share/kindling/image-store),
    /// s3://bucket[/prefix] (see --s3-*), or memory:// (this process only).
    #[arg(long, env = "KINDLING_IMAGE_L3")]
    pub l3: Option<String>,
    /// S3-compatible endpoint, e.g. http://127.0.0.1:9000 (plain http is allowed for it).
    #[arg(long, env = "KINDLING_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    pub s3_region: String,
    #[arg(long, env = "AWS_ACCESS_KEY_ID")]
    pub s3_access_key_id: Option<String>,
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub s3_secret_access_key: Option<String>,
    /// L2: memcached nodes, host:port[,host:port...] (none: no L2).
    #[arg(long, env = "KINDLING_IMAGE_L2", value_delimiter = ',')]
    pub l2: Vec<String>,
    /// L1 disk directory (default ~/.cache/kindling/chunks).
    #[arg(long, env = "KINDLING_IMAGE_L1_DIR")]
    pub l1_dir: Option<PathBuf>,
    /// L1 memory bound.
    #[arg(long, env = "KINDLING_IMAGE_L1_MEM_MIB", default_value_t = 256)]
    pub l1_mem_mib: u64,
    /// L1 disk bound (0: no disk level).
    #[arg(long, env = "KINDLING_IMAGE_L1_DISK_MIB", default_value_t = 4096)]
    pub l1_disk_mib: u64,
}

impl Default for TierConfig {
    fn default() -> Self {
        TierConfig {
            l3: None,
            s3_endpoint: None,
            s3_region: "us-east-1".into(),
            s3_access_key_id: None,
            s3_secret_access_key: None,
            l2: Vec::new(),
            l1_dir: None,
            l1_mem_mib: 256,
            l1_disk_mib: 4096,
        }
    }
}

impl TierConfig {
    /// Opens L3 alone (push, ls and gc need no cache).
    pub fn store(&self) -> Result<ImageStore, ConfigError> {
        let url = self.l3.clone().unwrap_or_else(|| {
            format!(
                "file://{}",
                home_dir(".local/share/kindling/image-store").display()
            )
        });
        let store: Arc<dyn ObjectStore> = if let Some(path) = url.strip_prefix("file://") {
            std::fs::create_dir_all(path).map_err(|source| ConfigError::Dir {
                url: url.clone(),
                source,
            })?;
            Arc::new(LocalFileSystem::new_with_prefix(path).map_err(|source| {
                ConfigError::Store {
                    url: url.clone(),
                    source,
                }
            })?)
        } else if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(ConfigError::BadL3(url));
            }
            let mut b = AmazonS3Builder::new()
                .with_bucket_name(bucket)
                .with_region(&self.s3_region);
            if let Some(e) = &self.s3_endpoint {
                b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
            }
            if let Some(k) = &self.s3_access_key_id {
                b = b.with_access_key_id(k);
            }
            if let Some(s) = &self.s3_secret_access_key {
                b = b.with_secret_access_key(s);
            }
            let s3 = b.build().map_err(|source| ConfigError::Store {
                url: url.clone(),
                source,
            })?;
            let prefix = prefix.trim_matches('/');
            if prefix.is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(object_store::prefix::PrefixStore::new(s3, prefix))
            }
        } else if url == "memory://" {
            Arc::new(InMemory::new())
        } else {
            return Err(ConfigError::BadL3(url));
        };
        Ok(ImageStore::new(store, url))
    }

    pub fn l1_config(&self) -> L1Config {
        L1Config {
            mem_bytes: self.l1_mem_mib << 20,
            disk_dir: (self.l1_disk_mib > 0).then(|| {
                self.l1_dir
                    .clone()
                    .unwrap_or_else(|| home_dir(".cache/kindling/chunks"))
            }),
            disk_bytes: self.l1_disk_mib << 20,
        }
    }

    /// Opens every tier: the store and a cache reading L1 -> L2 (if configured) -> L3.
    pub fn open(&self) -> Result<(ImageStore, Arc<L1Cache>, ChunkCache), ConfigError> {
        let store = self.store()?;
        for n in &self.l2 {
            if n.rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(ConfigError::BadL2(n.clone()));
            }
        }
        let l1 = Arc::new(L1Cache::open(&self.l1_config())?);
        let mut tiers: Vec<Arc<dyn ChunkTier>> = vec![l1.clone()];
        if !self.l2.is_empty() {
            tiers.push(Arc::new(MemcachedTier::new(&self.l2)));
        }
        tiers.push(store.tier());
        Ok((store, l1, ChunkCache::new(tiers)))
    }
}
