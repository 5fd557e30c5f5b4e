//! The image manifest: which chunk holds which part of the image.
//!
//! Binary, little-endian, checksummed:
//! ```text
//! 0    8  magic "KNDLMANI"
//! 8    4  format version (1)
//! 12   4  chunk size in bytes
//! 16   8  image size in bytes
//! 24   4  n = number of stored (non-zero) chunks
//! 28   40 × n  entries: offset (u64, a multiple of the chunk size, strictly increasing),
//!              SHA-256 of the chunk (32 bytes)
//! end  32 SHA-256 of every byte before it
//! ```
//! A chunk that is not listed reads as zeros. The last chunk may be shorter than the chunk
//! size (the image size need not be a multiple of it).

use std::io::{self, Read};

use sha2::{Digest, Sha256};

use crate::{is_zero, ChunkHash, CHUNK_SIZE};

pub const MAGIC: &[u8; 8] = b"KNDLMANI";
pub const VERSION: u32 = 1;
const HEADER_LEN: usize = 28;
const ENTRY_LEN: usize = 40;
const SUM_LEN: usize = 32;
/// Chunk sizes a manifest may declare (4 KiB ..= 64 MiB): bounds what a reader allocates.
pub const MIN_CHUNK_SIZE: u32 = 4096;
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest truncated: {got} bytes, at least {need} needed")]
    Truncated { need: usize, got: usize },
    #[error("not a Kindling image manifest (bad magic)")]
    BadMagic,
    #[error("manifest format version {0} is not supported (this build reads version {VERSION})")]
    UnsupportedVersion(u32),
    #[error("manifest checksum mismatch: the manifest is corrupt")]
    Checksum,
    #[error("manifest has {0} bytes after its checksum")]
    TrailingBytes(usize),
    #[error("invalid manifest: {0}")]
    Invalid(String),
}

/// One stored chunk of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEntry {
    pub offset: u64,
    pub hash: ChunkHash,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub chunk_size: u32,
    pub image_size: u64,
    /// Non-zero chunks, by increasing offset.
    pub chunks: Vec<ChunkEntry>,
}

impl Manifest {
    /// Chunks the image covers, zero ones included.
    pub fn total_chunks(&self) -> u64 {
        self.image_size.div_ceil(u64::from(self.chunk_size))
    }

    /// The stored chunk that starts at `offset`, if any (None: zeros).
    pub fn chunk_at(&self, offset: u64) -> Option<&ChunkEntry> {
        self.chunks
            .binary_search_by_key(&offset, |c| c.offset)
            .ok()
            .and_then(|i| self.chunks.get(i))
    }

    /// Length of the chunk starting at `offset` (the last one may be short).
    pub fn chunk_len(&self, offset: u64) -> u32 {
        let left = self.image_size.saturating_sub(offset);
        u32::try_from(left.min(u64::from(self.chunk_size))).unwrap_or(self.chunk_size)
    }

    /// Distinct chunk hashes, sorted.
    pub fn unique_hashes(&self) -> Vec<ChunkHash> {
        let mut v: Vec<ChunkHash> = self.chunks.iter().map(|c| c.hash).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + ENTRY_LEN * self.chunks.len() + SUM_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&self.image_size.to_le_bytes());
        let n = u32::try_from(self.chunks.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&n.to_le_bytes());
        for c in self.chunks.iter().take(n as usize) {
            out.extend_from_slice(&c.offset.to_le_bytes());
            out.extend_from_slice(&c.hash.0);
        }
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        out
    }

    /// Parses and checks a manifest: framing, version, checksum, then that the entries
    /// describe the image (aligned, increasing, inside it).
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let need = HEADER_LEN + SUM_LEN;
        if bytes.len() < 12 {
            // Enough to tell the magic and version apart from a short read.
            if bytes.len() >= 8 && bytes.get(..8) != Some(MAGIC.as_slice()) {
                return Err(ManifestError::BadMagic);
            }
            return Err(ManifestError::Truncated {
                need,
                got: bytes.len(),
            });
        }
        if bytes.get(..8) != Some(MAGIC.as_slice()) {
            return Err(ManifestError::BadMagic);
        }
        let version = le_u32(bytes, 8);
        if version != VERSION {
            return Err(ManifestError::UnsupportedVersion(version));
        }
        if bytes.len() < need {
            return Err(ManifestError::Truncated {
                need,
                got: bytes.len(),
            });
        }
        let chunk_size = le_u32(bytes, 12);
        let image_size = le_u64(bytes, 16);
        let n = le_u32(bytes, 24) as usize;
        let total = n
            .checked_mul(ENTRY_LEN)
            .and_then(|e| e.checked_add(need))
            .ok_or_else(|| ManifestError::Invalid(format!("{n} entries")))?;
        if bytes.len() < total {
            return Err(ManifestError::Truncated {
                need: total,
                got: bytes.len(),
            });
        }
        if bytes.len() > total {
            return Err(ManifestError::TrailingBytes(bytes.len() - total));
        }
        let body_len = total - SUM_LEN;
        let (body, sum) = bytes.split_at(body_len);
        if Sha256::digest(body).as_slice() != sum {
            return Err(ManifestError::Checksum);
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(ManifestError::Invalid(format!(
                "chunk size {chunk_size} outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}"
            )));
        }
        let mut chunks = Vec::with_capacity(n);
        let mut prev: Option<u64> = None;
        for i in 0..n {
            let at = HEADER_LEN + i * ENTRY_LEN;
            let offset = le_u64(bytes, at);
            let mut hash = [0u8; 32];
            if let Some(h) = bytes.get(at + 8..at + ENTRY_LEN) {
                hash.copy_from_slice(h);
            }
            if !offset.is_multiple_of(u64::from(chunk_size)) {
                return Err(ManifestError::Invalid(format!(
                    "entry {i}: offset {offset} is not a multiple of the chunk size"
                )));
            }
            if offset >= image_size {
                return Err(ManifestError::Invalid(format!(
                    "entry {i}: offset {offset} past the image size {image_size}"
                )));
            }
            if prev.is_some_and(|p| p >= offset) {
                return Err(ManifestError::Invalid(format!(
                    "entry {i}: offsets not strictly increasing"
                )));
            }
            prev = Some(offset);
            chunks.push(ChunkEntry {
                offset,
                hash: ChunkHash(hash),
            });
        }
        Ok(Manifest {
            chunk_size,
            image_size,
            chunks,
        })
    }
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

/// Cuts `image` into [`CHUNK_SIZE`] chunks: `each` gets every non-zero chunk (offset, hash,
/// bytes) in order; all-zero chunks are skipped. Returns the manifest.
pub fn chunk_image<R: Read, E: From<io::Error>>(
    mut image: R,
    mut each: impl FnMut(u64, ChunkHash, &[u8]) -> Result<(), E>,
) -> Result<Manifest, E> {
    let mut buf = vec![0u8; CHUNK_SIZE as usize];
    let mut offset = 0u64;
    let mut chunks = Vec::new();
    loop {
        let n = read_full(&mut image, &mut buf)?;
        if n == 0 {
            break;
        }
        let data = buf.get(..n).unwrap_or_default();
        if !is_zero(data) {
            let hash = ChunkHash::of(data);
            each(offset, hash, data)?;
            chunks.push(ChunkEntry { offset, hash });
        }
        offset += n as u64;
        if n < buf.len() {
            break;
        }
    }
    Ok(Manifest {
        chunk_size: CHUNK_SIZE,
        image_size: offset,
        chunks,
    })
}

/// Reads until `buf` is full or the end; returns the bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let rest = buf.get_mut(got..).unwrap_or_default();
        match r.read(rest) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> Vec<u8> {
        // Chunk 0: data, chunk 1: zeros, chunk 2: data, then a short tail of data.
        let cs = CHUNK_SIZE as usize;
        let mut v = vec![0u8; 3 * cs + 1000];
        v[..cs].fill(7);
        v[2 * cs + 5] = 1;
        v[3 * cs + 999] = 9;
        v
    }

    #[test]
    fn chunking_skips_zero_chunks_and_round_trips() {
        let img = image();
        let mut seen = Vec::new();
        let m = chunk_image::<_, io::Error>(&img[..], |off, h, data| {
            assert!(h.verify(data));
            seen.push(off);
            Ok(())
        })
        .unwrap();
        let cs = u64::from(CHUNK_SIZE);
        assert_eq!(seen, vec![0, 2 * cs, 3 * cs]);
        assert_eq!(m.image_size, img.len() as u64);
        assert_eq!(m.total_chunks(), 4);
        assert_eq!(m.chunk_len(3 * cs), 1000);
        assert!(m.chunk_at(cs).is_none());
        assert_eq!(m.chunk_at(2 * cs).unwrap().offset, 2 * cs);
        let bytes = m.encode();
        assert_eq!(Manifest::decode(&bytes).unwrap(), m);
    }

    #[test]
    fn typed_errors() {
        let m = chunk_image::<_, io::Error>(&image()[..], |_, _, _| Ok(())).unwrap();
        let good = m.encode();
        for cut in [0, 5, 11, 20, good.len() - 1] {
            assert!(
                matches!(
                    Manifest::decode(&good[..cut]),
                    Err(ManifestError::Truncated { .. })
                ),
                "cut at {cut}"
            );
        }
        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(Manifest::decode(&bad), Err(ManifestError::BadMagic));
        let mut bad = good.clone();
        bad[8] = 2;
        assert_eq!(
            Manifest::decode(&bad),
            Err(ManifestError::UnsupportedVersion(2))
        );
        let mut bad = good.clone();
        bad[40] ^= 1;
        assert_eq!(Manifest::decode(&bad), Err(ManifestError::Checksum));
        let mut bad = good.clone();
        bad.push(0);
        assert_eq!(Manifest::decode(&bad), Err(ManifestError::TrailingBytes(1)));
        // Semantically wrong but correctly checksummed: an unaligned offset.
        let mut m2 = m.clone();
        m2.chunks[1].offset += 1;
        assert!(matches!(
            Manifest::decode(&m2.encode()),
            Err(ManifestError::Invalid(_))
        ));
        let mut m3 = m.clone();
        m3.chunks.swap(0, 1);
        assert!(matches!(
            Manifest::decode(&m3.encode()),
            Err(ManifestError::Invalid(_))
        ));
    }
}
