//! [`ChunkCache`]: reads a chunk from the first tier that has a good copy (L1 -> L2 -> L3),
//! copies it into the tiers above, and counts what each tier served.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;

use crate::tier::{ChunkTier, TierError};
use crate::ChunkHash;

/// Latency samples kept per tier (enough for percentiles of one benchmark).
const MAX_SAMPLES: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("chunk {0} is in no tier")]
    NotFound(ChunkHash),
    #[error("chunk {hash} is corrupt or unreadable in every tier that has it ({tiers})")]
    Unusable { hash: ChunkHash, tiers: String },
}

#[derive(Default)]
struct Counters {
    hits: u64,
    misses: u64,
    corrupt: u64,
    errors: u64,
    bytes: u64,
    hit_latency_us: Vec<u64>,
}

struct Slot {
    tier: Arc<dyn ChunkTier>,
    counters: Mutex<Counters>,
}

/// What one tier served.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct TierReport {
    pub tier: String,
    pub hits: u64,
    pub misses: u64,
    pub corrupt: u64,
    pub errors: u64,
    pub bytes: u64,
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
}

pub struct ChunkCache {
    slots: Vec<Slot>,
}

fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted.get(idx).copied()
}

impl ChunkCache {
    /// Tiers from the fastest (tried first) to the durable one.
    pub fn new(tiers: Vec<Arc<dyn ChunkTier>>) -> ChunkCache {
        ChunkCache {
            slots: tiers
                .into_iter()
                .map(|tier| Slot {
                    tier,
                    counters: Mutex::new(Counters::default()),
                })
                .collect(),
        }
    }

    fn count(&self, i: usize, f: impl FnOnce(&mut Counters)) {
        if let Some(Ok(mut c)) = self.slots.get(i).map(|s| s.counters.lock()) {
            f(&mut c);
        }
    }

    /// The chunk `hash`, checked. A corrupt copy is dropped from its tier and the next tier
    /// is tried; a tier that fails counts as a miss. A chunk no tier can supply intact is an
    /// error (logged).
    pub async fn get(&self, hash: &ChunkHash) -> Result<Bytes, CacheError> {
        let mut problems: Vec<String> = Vec::new();
        for (i, slot) in self.slots.iter().enumerate() {
            let start = Instant::now();
            match slot.tier.get(hash).await {
                Ok(Some(data)) => {
                    let us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
                    self.count(i, |c| {
                        c.hits += 1;
                        c.bytes += data.len() as u64;
                        if c.hit_latency_us.len() < MAX_SAMPLES {
                            c.hit_latency_us.push(us);
                        }
                    });
                    self.fill_above(i, hash, &data).await;
                    return Ok(data);
                }
                Ok(None) => self.count(i, |c| c.misses += 1),
                Err(e @ TierError::Corrupt { .. }) => {
                    tracing::warn!("{e}; dropping it and trying the next tier");
                    self.count(i, |c| c.corrupt += 1);
                    if let Err(e) = slot.tier.remove(hash).await {
                        tracing::warn!("cannot drop the corrupt copy: {e}");
                    }
                    problems.push(format!("{}: corrupt", slot.tier.name()));
                }
                Err(e) => {
                    tracing::warn!("chunk {hash}: {e}; trying the next tier");
                    self.count(i, |c| c.errors += 1);
                    problems.push(format!("{}: {e}", slot.tier.name()));
                }
            }
        }
        if problems.is_empty() {
            tracing::error!("chunk {hash} is in no tier");
            Err(CacheError::NotFound(*hash))
        } else {
            let tiers = problems.join("; ");
            tracing::error!("chunk {hash} has no intact copy in any tier ({tiers})");
            Err(CacheError::Unusable { hash: *hash, tiers })
        }
    }

    async fn fill_above(&self, i: usize, hash: &ChunkHash, data: &Bytes) {
        for slot in self.slots.iter().take(i) {
            if let Err(e) = slot.tier.put(hash, data.clone()).await {
                // A failed fill only costs a later miss.
                tracing::debug!("fill of chunk {hash}: {e}");
            }
        }
    }

    /// The tiers, fastest first.
    pub fn tiers(&self) -> Vec<Arc<dyn ChunkTier>> {
        self.slots.iter().map(|s| s.tier.clone()).collect()
    }

    /// What each tier served since the start (or the last [`ChunkCache::reset_stats`]).
    pub fn report(&self) -> Vec<TierReport> {
        self.slots
            .iter()
            .map(|s| {
                let Ok(c) = s.counters.lock() else {
                    return TierReport::default();
                };
                let mut lat = c.hit_latency_us.clone();
                lat.sort_unstable();
                TierReport {
                    tier: s.tier.name().to_string(),
                    hits: c.hits,
                    misses: c.misses,
                    corrupt: c.corrupt,
                    errors: c.errors,
                    bytes: c.bytes,
                    p50_us: percentile(&lat, 0.50),
                    p99_us: percentile(&lat, 0.99),
                }
            })
            .collect()
    }

    pub fn reset_stats(&self) {
        for s in &self.slots {
            if let Ok(mut c) = s.counters.lock() {
                *c = Counters::default();
            }
        }
    }
}

/// Formats a latency for tables.
pub fn fmt_us(us: Option<u64>) -> String {
    match us {
        None => "-".into(),
        Some(u) => format!("{:.2} ms", Duration::from_micros(u).as_secs_f64() * 1e3),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use std::collections::HashMap;

    /// A tier in a hash map, for the read-through logic.
    #[derive(Default)]
    struct MapTier {
        name: String,
        map: Mutex<HashMap<ChunkHash, Bytes>>,
    }

    #[async_trait]
    impl ChunkTier for MapTier {
        fn name(&self) -> &str {
            &self.name
        }
        async fn get_raw(&self, h: &ChunkHash) -> Result<Option<Bytes>, TierError> {
            Ok(self.map.lock().unwrap().get(h).cloned())
        }
        async fn put(&self, h: &ChunkHash, d: Bytes) -> Result<(), TierError> {
            self.map.lock().unwrap().insert(*h, d);
            Ok(())
        }
        async fn remove(&self, h: &ChunkHash) -> Result<(), TierError> {
            self.map.lock().unwrap().remove(h);
            Ok(())
        }
    }

    fn tiers() -> Vec<Arc<MapTier>> {
        ["L1", "L2", "L3"]
            .iter()
            .map(|n| {
                Arc::new(MapTier {
                    name: n.to_string(),
                    ..Default::default()
                })
            })
            .collect()
    }

    #[tokio::test]
    async fn reads_through_fills_and_skips_corrupt_copies() {
        let t = tiers();
        let cache = ChunkCache::new(t.iter().map(|t| t.clone() as Arc<dyn ChunkTier>).collect());
        let data = Bytes::from_static(b"chunk data");
        let h = ChunkHash::of(&data);
        t[2].put(&h, data.clone()).await.unwrap();
        assert_eq!(cache.get(&h).await.unwrap(), data);
        assert!(t[0].map.lock().unwrap().contains_key(&h));
        assert!(t[1].map.lock().unwrap().contains_key(&h));
        assert_eq!(cache.get(&h).await.unwrap(), data);
        let r = cache.report();
        assert_eq!((r[0].hits, r[0].misses, r[2].hits), (1, 1, 1));

        // Corrupt in L1 and L2: both dropped, served from L3, refilled good.
        let bad = Bytes::from_static(b"bad");
        t[0].put(&h, bad.clone()).await.unwrap();
        t[1].put(&h, bad.clone()).await.unwrap();
        assert_eq!(cache.get(&h).await.unwrap(), data);
        assert_eq!(t[0].map.lock().unwrap().get(&h), Some(&data));
        assert_eq!(t[1].map.lock().unwrap().get(&h), Some(&data));

        // Corrupt everywhere: an error naming every tier.
        for x in &t {
            x.put(&h, bad.clone()).await.unwrap();
        }
        match cache.get(&h).await {
            Err(CacheError::Unusable { tiers, .. }) => {
                assert!(tiers.contains("L1") && tiers.contains("L3"), "{tiers}")
            }
            other => panic!("{other:?}"),
        }
        let missing = ChunkHash::of(b"nowhere");
        assert!(matches!(
            cache.get(&missing).await,
            Err(CacheError::NotFound(_))
        ));
    }
}
