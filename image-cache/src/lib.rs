//! Cache-backed root images (issue 8), after Lambda's container loading (Brooker et al.,
//! ATC'23): images are cut into 512 KiB chunks named by their SHA-256 ([`image_format`]),
//! stored once in a durable object store (L3, [`l3`]), shared between hosts through a
//! memcached cluster (L2, [`l2`]) and kept per host in memory and on local disk (L1, [`l1`]).
//! [`ChunkCache`] reads through the tiers, checking every chunk against its hash.
//! [`ops`] pushes, pulls, lists and collects images; [`server`] serves chunks to VMMs.

pub mod cache;
pub mod cli;
pub mod config;
pub mod l1;
pub mod l2;
pub mod l3;
pub mod ops;
pub mod server;
pub mod tier;

pub use cache::{CacheError, ChunkCache, TierReport};
pub use config::TierConfig;
pub use image_format::{
    is_zero, manifest, wire, ChunkEntry, ChunkHash, Manifest, ManifestError, CHUNK_SIZE,
};
pub use l3::ImageStore;
pub use tier::{ChunkTier, TierError};
