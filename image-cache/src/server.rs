//! The chunk server: answers [`crate::wire`] requests on a Unix socket from a
//! [`ChunkCache`], so a VMM (which has no async runtime or object-store client) can read an
//! image lazily.

use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::wire::{self, REQUEST_LEN, STATUS_ERROR, STATUS_NOT_FOUND, STATUS_OK};
use crate::{CacheError, ChunkCache};

/// Binds `path` (replacing a stale socket file).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(path)
}

/// Serves connections until the listener fails.
pub async fn serve(listener: UnixListener, cache: Arc<ChunkCache>) -> std::io::Result<()> {
    loop {
        let (conn, _) = listener.accept().await?;
        let cache = cache.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_conn(conn, &cache).await {
                tracing::debug!("chunk server connection: {e}");
            }
        });
    }
}

async fn serve_conn(mut conn: UnixStream, cache: &ChunkCache) -> std::io::Result<()> {
    let mut req = [0u8; REQUEST_LEN];
    loop {
        match conn.read_exact(&mut req).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let Some(hash) = wire::parse_request(&req) else {
            let msg = b"unknown request";
            conn.write_all(&wire::response_header(STATUS_ERROR, msg.len() as u32))
                .await?;
            conn.write_all(msg).await?;
            // The stream is out of step: drop it.
            return Ok(());
        };
        let (status, payload) = match cache.get(&hash).await {
            Ok(data) => (STATUS_OK, data),
            Err(e @ CacheError::NotFound(_)) => (STATUS_NOT_FOUND, e.to_string().into()),
            Err(e) => (STATUS_ERROR, e.to_string().into()),
        };
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        conn.write_all(&wire::response_header(status, len)).await?;
        conn.write_all(&payload).await?;
    }
}
