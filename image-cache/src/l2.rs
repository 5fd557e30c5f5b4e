//! L2, shared between hosts: a memcached cluster. Each chunk belongs to the node with the
//! highest rendezvous score (SHA-256 of node address and chunk hash), among the nodes that
//! are not marked down. A node that errors or times out is marked down for
//! [`DOWN_FOR`] and the request moves to the next node in score order; L2 never fails a
//! read: when no node answers it is a miss and the chunk comes from L3.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_memcached::{AsciiProtocol, Client};
use async_trait::async_trait;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::tier::{ChunkTier, TierError};
use crate::ChunkHash;

const NAME: &str = "L2";
/// How long a failed node is skipped before it is tried again.
pub const DOWN_FOR: Duration = Duration::from_secs(5);
/// Connect and per-operation limit: a hung node must not stall a guest's read for long.
pub const OP_TIMEOUT: Duration = Duration::from_millis(500);
/// Idle connections kept per node.
const POOL_MAX: usize = 8;

struct Node {
    addr: String,
    pool: Mutex<Vec<Client>>,
    down_until: Mutex<Option<Instant>>,
}

pub struct MemcachedTier {
    nodes: Vec<Node>,
    /// Expiry for stored chunks in seconds (0: none; memcached's LRU evicts).
    ttl: i64,
}

#[derive(Debug, thiserror::Error)]
enum NodeError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Memcached(#[from] async_memcached::Error),
}

impl Node {
    fn is_down(&self) -> bool {
        let mut d = match self.down_until.lock() {
            Ok(d) => d,
            Err(_) => return false,
        };
        match *d {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                *d = None;
                false
            }
            None => false,
        }
    }

    fn mark_down(&self, why: &NodeError) {
        tracing::warn!(
            "L2: memcached {} failed ({why}); skipping it for {DOWN_FOR:?}",
            self.addr
        );
        if let Ok(mut d) = self.down_until.lock() {
            *d = Some(Instant::now() + DOWN_FOR);
        }
        if let Ok(mut p) = self.pool.lock() {
            p.clear();
        }
    }

    async fn client(&self) -> Result<Client, NodeError> {
        if let Some(c) = self.pool.lock().ok().and_then(|mut p| p.pop()) {
            return Ok(c);
        }
        let dsn = format!("tcp://{}", self.addr);
        Ok(tokio::time::timeout(OP_TIMEOUT, Client::new(dsn))
            .await
            .map_err(|_| NodeError::Timeout(OP_TIMEOUT))??)
    }

    fn give_back(&self, c: Client) {
        if let Ok(mut p) = self.pool.lock() {
            if p.len() < POOL_MAX {
                p.push(c);
            }
        }
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, NodeError> {
        let mut c = self.client().await?;
        let v = tokio::time::timeout(OP_TIMEOUT, c.get(key))
            .await
            .map_err(|_| NodeError::Timeout(OP_TIMEOUT))??;
        self.give_back(c);
        Ok(v.and_then(|v| v.data))
    }

    async fn set(&self, key: &str, data: &[u8], ttl: i64) -> Result<(), NodeError> {
        let mut c = self.client().await?;
        tokio::time::timeout(OP_TIMEOUT, c.set(key, data, Some(ttl), None))
            .await
            .map_err(|_| NodeError::Timeout(OP_TIMEOUT))??;
        self.give_back(c);
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<(), NodeError> {
        let mut c = self.client().await?;
        let r = tokio::time::timeout(OP_TIMEOUT, c.delete(key))
            .await
            .map_err(|_| NodeError::Timeout(OP_TIMEOUT))?;
        match r {
            Ok(()) | Err(async_memcached::Error::Protocol(async_memcached::Status::NotFound)) => {
                self.give_back(c);
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }
}

fn key(hash: &ChunkHash) -> String {
    format!("kindling:chunk:{}", hash.to_hex())
}

/// The rendezvous score of `node` for `hash`.
fn score(node: &str, hash: &ChunkHash) -> u64 {
    let mut h = Sha256::new();
    h.update(node.as_bytes());
    h.update([0u8]);
    h.update(hash.0);
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(d.get(..8).unwrap_or(&[0; 8]));
    u64::from_be_bytes(b)
}

impl MemcachedTier {
    /// `nodes`: `host:port` addresses. Connections are made on first use.
    pub fn new(nodes: &[String]) -> MemcachedTier {
        MemcachedTier {
            nodes: nodes
                .iter()
                .map(|a| Node {
                    addr: a.clone(),
                    pool: Mutex::new(Vec::new()),
                    down_until: Mutex::new(None),
                })
                .collect(),
            ttl: 0,
        }
    }

    /// The node addresses in rendezvous order for `hash` (the owner first).
    pub fn ranking(&self, hash: &ChunkHash) -> Vec<&str> {
        self.ranked(hash).iter().map(|n| n.addr.as_str()).collect()
    }

    fn ranked(&self, hash: &ChunkHash) -> Vec<&Node> {
        let mut v: Vec<&Node> = self.nodes.iter().collect();
        v.sort_by_key(|n| std::cmp::Reverse(score(&n.addr, hash)));
        v
    }

    /// Nodes to try, owner first, skipping those marked down.
    fn live(&self, hash: &ChunkHash) -> impl Iterator<Item = &Node> {
        self.ranked(hash).into_iter().filter(|n| !n.is_down())
    }
}

#[async_trait]
impl ChunkTier for MemcachedTier {
    fn name(&self) -> &str {
        NAME
    }

    async fn get_raw(&self, hash: &ChunkHash) -> Result<Option<Bytes>, TierError> {
        let k = key(hash);
        for node in self.live(hash) {
            match node.get(&k).await {
                Ok(v) => return Ok(v.map(Bytes::from)),
                // The chunk's owner is gone: its successor owns it now.
                Err(e) => node.mark_down(&e),
            }
        }
        Ok(None)
    }

    async fn put(&self, hash: &ChunkHash, data: Bytes) -> Result<(), TierError> {
        let k = key(hash);
        for node in self.live(hash) {
            match node.set(&k, &data, self.ttl).await {
                Ok(()) => return Ok(()),
                Err(e) => node.mark_down(&e),
            }
        }
        Err(TierError::Unavailable {
            tier: NAME.into(),
            message: "no memcached node accepted the chunk".into(),
        })
    }

    async fn remove(&self, hash: &ChunkHash) -> Result<(), TierError> {
        let k = key(hash);
        // Only the live owner is consulted on reads, so that is the copy to drop.
        if let Some(node) = self.live(hash).next() {
            if let Err(e) = node.delete(&k).await {
                node.mark_down(&e);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_moves_only_the_lost_nodes_chunks() {
        let nodes: Vec<String> = (0..3).map(|i| format!("127.0.0.1:{}", 11211 + i)).collect();
        let all = MemcachedTier::new(&nodes);
        let two = MemcachedTier::new(&nodes[..2]);
        let mut owners = [0usize; 3];
        for i in 0..300u32 {
            let h = ChunkHash::of(&i.to_le_bytes());
            let owner = all.ranking(&h)[0].to_string();
            let idx = nodes.iter().position(|n| *n == owner).unwrap();
            owners[idx] += 1;
            if idx < 2 {
                // Chunks of surviving nodes keep their owner.
                assert_eq!(two.ranking(&h)[0], owner);
            } else {
                // Chunks of the lost node go to its runner-up.
                assert_eq!(two.ranking(&h)[0], all.ranking(&h)[1]);
            }
        }
        assert!(owners.iter().all(|&n| n > 50), "spread: {owners:?}");
    }
}
