//! The chunk server's protocol on a Unix stream socket: the VMM asks for chunks by hash, the
//! agent's chunk server answers from its cache tiers.
//!
//! Request: `b'G'` followed by the 32-byte chunk hash (33 bytes). Response: a status byte
//! ([`STATUS_OK`], [`STATUS_NOT_FOUND`], [`STATUS_ERROR`]), the payload length (u32 LE), then
//! the payload: the chunk for OK, a UTF-8 message otherwise. Requests on one connection are
//! answered in order.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::manifest::MAX_CHUNK_SIZE;
use crate::ChunkHash;

pub const REQ_GET: u8 = b'G';
pub const REQUEST_LEN: usize = 33;
pub const STATUS_OK: u8 = 0;
pub const STATUS_NOT_FOUND: u8 = 1;
pub const STATUS_ERROR: u8 = 2;
/// Largest payload either side accepts.
pub const MAX_PAYLOAD: u32 = MAX_CHUNK_SIZE;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("chunk server {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("chunk {0} not found in any tier")]
    NotFound(ChunkHash),
    #[error("chunk server error for {hash}: {message}")]
    Server { hash: ChunkHash, message: String },
    #[error("chunk {0}: the server sent bytes that do not match the hash")]
    Corrupt(ChunkHash),
    #[error("chunk server sent a bad response: {0}")]
    Protocol(String),
}

/// Encodes a request for `hash`.
pub fn request(hash: &ChunkHash) -> [u8; REQUEST_LEN] {
    let mut r = [0u8; REQUEST_LEN];
    r[0] = REQ_GET;
    r[1..].copy_from_slice(&hash.0);
    r
}

/// Decodes a request; None if it is not a GET.
pub fn parse_request(r: &[u8; REQUEST_LEN]) -> Option<ChunkHash> {
    let (&kind, rest) = r.split_first()?;
    if kind != REQ_GET {
        return None;
    }
    let mut h = [0u8; 32];
    h.copy_from_slice(rest);
    Some(ChunkHash(h))
}

/// The 5-byte response header for a payload of `len` bytes.
pub fn response_header(status: u8, len: u32) -> [u8; 5] {
    let l = len.to_le_bytes();
    [status, l[0], l[1], l[2], l[3]]
}

/// A blocking client with one connection, reopened after an error.
pub struct ChunkClient {
    path: PathBuf,
    timeout: Duration,
    conn: Option<UnixStream>,
}

impl ChunkClient {
    pub fn new(path: &Path, timeout: Duration) -> ChunkClient {
        ChunkClient {
            path: path.to_path_buf(),
            timeout,
            conn: None,
        }
    }

    /// Fetches and verifies one chunk. An I/O failure is retried once on a fresh connection
    /// (the server may have restarted).
    pub fn fetch(&mut self, hash: &ChunkHash) -> Result<Vec<u8>, WireError> {
        match self.try_fetch(hash) {
            Err(WireError::Io { .. }) => {
                self.conn = None;
                self.try_fetch(hash)
            }
            r => r,
        }
        .inspect_err(|e| {
            if matches!(e, WireError::Io { .. } | WireError::Protocol(_)) {
                self.conn = None;
            }
        })
    }

    fn try_fetch(&mut self, hash: &ChunkHash) -> Result<Vec<u8>, WireError> {
        let io_err = |source| WireError::Io {
            path: self.path.clone(),
            source,
        };
        if self.conn.is_none() {
            let s = UnixStream::connect(&self.path).map_err(io_err)?;
            s.set_read_timeout(Some(self.timeout)).map_err(io_err)?;
            s.set_write_timeout(Some(self.timeout)).map_err(io_err)?;
            self.conn = Some(s);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(WireError::Protocol("no connection".into()));
        };
        let io_err = |source| WireError::Io {
            path: self.path.clone(),
            source,
        };
        conn.write_all(&request(hash)).map_err(io_err)?;
        let mut hdr = [0u8; 5];
        conn.read_exact(&mut hdr).map_err(io_err)?;
        let [status, l0, l1, l2, l3] = hdr;
        let len = u32::from_le_bytes([l0, l1, l2, l3]);
        if len > MAX_PAYLOAD {
            return Err(WireError::Protocol(format!("payload of {len} bytes")));
        }
        let mut payload = vec![0u8; len as usize];
        conn.read_exact(&mut payload).map_err(io_err)?;
        match status {
            STATUS_OK => {
                if !hash.verify(&payload) {
                    return Err(WireError::Corrupt(*hash));
                }
                Ok(payload)
            }
            STATUS_NOT_FOUND => Err(WireError::NotFound(*hash)),
            STATUS_ERROR => Err(WireError::Server {
                hash: *hash,
                message: String::from_utf8_lossy(&payload).into_owned(),
            }),
            s => Err(WireError::Protocol(format!("status byte {s}"))),
        }
    }
}
