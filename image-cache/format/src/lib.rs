//! The parts of Kindling's chunked root images that both the agent and the VMM need, with no
//! async runtime: chunk hashes ([`ChunkHash`]), the image manifest ([`manifest`]) and the
//! chunk server's framed protocol over a Unix socket ([`wire`]).
//!
//! An image is a flat file cut into fixed [`CHUNK_SIZE`] chunks, each named by the SHA-256
//! of its bytes; all-zero chunks are left out of the manifest (they read as zeros).

pub mod manifest;
pub mod wire;

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

pub use manifest::{ChunkEntry, Manifest, ManifestError};

/// Size of every chunk but possibly the last (512 KiB, as in Lambda's container loading).
pub const CHUNK_SIZE: u32 = 512 * 1024;

/// The SHA-256 of a chunk's bytes: its name in every tier.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    /// The hash of `data`.
    pub fn of(data: &[u8]) -> ChunkHash {
        ChunkHash(Sha256::digest(data).into())
    }

    /// Whether `data` hashes to this name.
    pub fn verify(&self, data: &[u8]) -> bool {
        ChunkHash::of(data) == *self
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        use fmt::Write as _;
        let mut s = String::with_capacity(64);
        for b in self.0 {
            // Writing to a String cannot fail.
            let _ = write!(s, "{b:02x}");
        }
        s
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({})", self.to_hex())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a chunk hash (64 hex digits): {0:?}")]
pub struct BadHash(pub String);

impl FromStr for ChunkHash {
    type Err = BadHash;

    fn from_str(s: &str) -> Result<ChunkHash, BadHash> {
        let bad = || BadHash(s.chars().take(80).collect());
        if s.len() != 64 || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            let pair = s.get(2 * i..2 * i + 2).ok_or_else(bad)?;
            *o = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
        }
        Ok(ChunkHash(out))
    }
}

/// Whether every byte of `data` is zero (such chunks are not stored).
pub fn is_zero(data: &[u8]) -> bool {
    // Compare in word-sized pieces: this runs on every chunk of every push.
    let (head, body, tail) = {
        // SAFETY: u64 has no invalid bit patterns and align_to only reinterprets the aligned
        // middle part of the slice, whose bytes are all initialised.
        unsafe { data.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && body.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let h = ChunkHash::of(b"hello");
        assert_eq!(
            h.to_hex(),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(h.to_hex().parse::<ChunkHash>().unwrap(), h);
        assert!("xyz".parse::<ChunkHash>().is_err());
        assert!("zz".repeat(32).parse::<ChunkHash>().is_err());
        assert!(h.verify(b"hello"));
        assert!(!h.verify(b"hellO"));
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 1001]));
        let mut v = vec![0u8; 1001];
        v[1000] = 1;
        assert!(!is_zero(&v));
        v[1000] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
    }
}
