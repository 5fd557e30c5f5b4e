//! virtio-blk on a chunked image: a hand-made manifest and a chunk server thread in the
//! test speak the real wire protocol; the device is driven through its queue.

use std::collections::HashMap;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use image_format::{wire, ChunkEntry, ChunkHash, Manifest};

use super::*;
use crate::config::ChunkedImageConfig;
use crate::devices::virtio::block::chunked::ChunkedError;

const CS: usize = 4096;
/// Chunk 0 and 2 hold data, chunk 1 is all zeros (left out of the manifest), chunk 3's
/// server copy is corrupt.
const NCHUNKS: usize = 4;

fn chunk(i: usize) -> Vec<u8> {
    (0..CS).map(|b| (b * 31 + i * 7 + 1) as u8).collect()
}

struct Server {
    dir: tempfile::TempDir,
    socket: PathBuf,
    manifest: PathBuf,
    requests: Arc<AtomicUsize>,
}

/// Starts a chunk server thread; the returned paths live in a temp dir.
fn server() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("chunks.sock");
    let mut store: HashMap<ChunkHash, Vec<u8>> = HashMap::new();
    let mut chunks = Vec::new();
    for i in [0usize, 2, 3] {
        let data = chunk(i);
        let hash = ChunkHash::of(&data);
        let served = if i == 3 { vec![0xee; CS] } else { data };
        store.insert(hash, served);
        chunks.push(ChunkEntry {
            offset: (i * CS) as u64,
            hash,
        });
    }
    let m = Manifest {
        chunk_size: CS as u32,
        image_size: (NCHUNKS * CS) as u64,
        chunks,
    };
    let manifest = dir.path().join("image.manifest");
    std::fs::write(&manifest, m.encode()).unwrap();
    let listener = UnixListener::bind(&socket).unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let count = requests.clone();
    let store = Arc::new(store);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let (store, count) = (store.clone(), count.clone());
            // One thread per connection: each device keeps its connection open.
            std::thread::spawn(move || {
                let mut req = [0u8; wire::REQUEST_LEN];
                while std::io::Read::read_exact(&mut conn, &mut req).is_ok() {
                    count.fetch_add(1, Ordering::SeqCst);
                    let hash = wire::parse_request(&req).unwrap();
                    let (status, body) = match store.get(&hash) {
                        Some(d) => (wire::STATUS_OK, d.clone()),
                        None => (wire::STATUS_NOT_FOUND, b"no such chunk".to_vec()),
                    };
                    let _ = conn.write_all(&wire::response_header(status, body.len() as u32));
                    let _ = conn.write_all(&body);
                }
            });
        }
    });
    Server {
        dir,
        socket,
        manifest,
        requests,
    }
}

fn chunked_block(s: &Server, read_only: bool) -> Arc<Mutex<Block>> {
    let cfg = BlockDeviceConfig {
        path: s.manifest.clone(),
        read_only,
        serial: None,
        chunked: Some(ChunkedImageConfig {
            socket: s.socket.clone(),
            overlay: (!read_only).then(|| s.dir.path().join("overlay")),
            cache_mib: 1,
        }),
    };
    Arc::new(Mutex::new(Block::new(&cfg).unwrap()))
}

/// Reads `sectors` sectors from `sector` into DATA; returns (status, bytes).
fn read(d: &mut Driver, blk: &Arc<Mutex<Block>>, sector: u64, sectors: u32) -> (u8, Vec<u8>) {
    let len = sectors * 512;
    let (status, _) = d.request(blk, VIRTIO_BLK_T_IN, sector, len, W);
    let mut buf = vec![0u8; len as usize];
    d.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    (status, buf)
}

fn expected(from: usize, len: usize) -> Vec<u8> {
    let img: Vec<u8> = (0..NCHUNKS)
        .flat_map(|i| if i == 1 { vec![0; CS] } else { chunk(i) })
        .collect();
    img[from..from + len].to_vec()
}

#[test]
fn reads_lazily_chunk_by_chunk() {
    let s = server();
    let mem = test_mem();
    let blk = chunked_block(&s, true);
    assert_eq!(blk.lock().unwrap().capacity(), (NCHUNKS * CS / 512) as u64);
    assert_eq!(
        s.requests.load(Ordering::SeqCst),
        0,
        "nothing fetched at open"
    );
    let mut d = Driver::new(&mem);
    let _t = activate(&mem, &blk, &d, FEATURES);

    // One sector of chunk 0: one fetch.
    assert_eq!(
        read(&mut d, &blk, 1, 1),
        (VIRTIO_BLK_S_OK, expected(512, 512))
    );
    assert_eq!(s.requests.load(Ordering::SeqCst), 1);
    // The zero chunk costs no fetch.
    assert_eq!(read(&mut d, &blk, 8, 8), (VIRTIO_BLK_S_OK, vec![0; CS]));
    assert_eq!(s.requests.load(Ordering::SeqCst), 1);
    // Across chunks 0..2: chunk 0 comes from memory, chunk 2 is fetched.
    assert_eq!(
        read(&mut d, &blk, 6, 12),
        (VIRTIO_BLK_S_OK, expected(6 * 512, 12 * 512))
    );
    assert_eq!(s.requests.load(Ordering::SeqCst), 2);
    let b = blk.lock().unwrap();
    assert!(!b.is_broken());
}

#[test]
fn corrupt_or_unreachable_chunks_fail_the_read_only() {
    let s = server();
    let mem = test_mem();
    let blk = chunked_block(&s, true);
    let mut d = Driver::new(&mem);
    let _t = activate(&mem, &blk, &d, FEATURES);
    // Chunk 3's server copy does not match its hash: IOERR, the device stays usable.
    assert_eq!(read(&mut d, &blk, 24, 1).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(
        read(&mut d, &blk, 0, 1),
        (VIRTIO_BLK_S_OK, expected(0, 512))
    );
    // With the server gone, a chunk not yet fetched fails; a fetched one still reads.
    std::fs::remove_file(&s.socket).unwrap();
    let mem2 = test_mem();
    let blk2 = chunked_block(&s, true);
    let mut d2 = Driver::new(&mem2);
    let _t2 = activate(&mem2, &blk2, &d2, FEATURES);
    assert_eq!(read(&mut d2, &blk2, 16, 1).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(read(&mut d, &blk, 0, 1).0, VIRTIO_BLK_S_OK);
}

#[test]
fn writes_go_to_the_overlay_and_chunks_stay_unchanged() {
    let s = server();
    let mem = test_mem();
    let blk = chunked_block(&s, false);
    let mut d = Driver::new(&mem);
    let _t = activate(&mem, &blk, &d, FEATURES);
    // Write sector 1 (inside chunk 0) and sector 9 (inside the zero chunk).
    for sector in [1u64, 9] {
        mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        assert_eq!(
            d.request(&blk, VIRTIO_BLK_T_OUT, sector, 512, R).0,
            VIRTIO_BLK_S_OK
        );
    }
    let mut want = expected(0, 2 * CS);
    want[512..1024].fill(0xab);
    want[9 * 512..10 * 512].fill(0xab);
    assert_eq!(read(&mut d, &blk, 0, 16), (VIRTIO_BLK_S_OK, want));
    assert_eq!(
        d.request(&blk, VIRTIO_BLK_T_FLUSH, 0, 0, R).0,
        VIRTIO_BLK_S_OK
    );
    // The overlay holds the writes (sparse, image-sized); the served chunk did not change.
    let overlay = std::fs::read(s.dir.path().join("overlay")).unwrap();
    assert_eq!(overlay.len(), NCHUNKS * CS);
    assert_eq!(&overlay[512..1024], &[0xab; 512]);
    let fresh = chunked_block(&s, true);
    let mut d2 = Driver::new(&mem);
    let _t2 = activate(&mem, &fresh, &d2, FEATURES);
    assert_eq!(
        read(&mut d2, &fresh, 1, 1),
        (VIRTIO_BLK_S_OK, expected(512, 512))
    );
    // A read-only chunked disk refuses writes.
    assert_eq!(
        d2.request(&fresh, VIRTIO_BLK_T_OUT, 1, 512, R).0,
        VIRTIO_BLK_S_IOERR
    );
}

#[test]
fn bad_configs_are_typed_errors() {
    let s = server();
    let cfg = |path: PathBuf, read_only: bool, overlay: Option<PathBuf>| BlockDeviceConfig {
        path,
        read_only,
        serial: None,
        chunked: Some(ChunkedImageConfig {
            socket: s.socket.clone(),
            overlay,
            cache_mib: 1,
        }),
    };
    assert!(matches!(
        Block::new(&cfg(s.manifest.clone(), false, None)),
        Err(BlockError::Chunked(ChunkedError::NoOverlay))
    ));
    let bad = s.dir.path().join("bad.manifest");
    std::fs::write(&bad, b"KNDLMANI\x01\0\0\0").unwrap();
    assert!(matches!(
        Block::new(&cfg(bad, true, None)),
        Err(BlockError::Chunked(ChunkedError::Manifest { .. }))
    ));
    assert!(matches!(
        Block::new(&cfg("/nonexistent".into(), true, None)),
        Err(BlockError::Chunked(ChunkedError::ReadManifest { .. }))
    ));
}
