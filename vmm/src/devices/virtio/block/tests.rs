use std::io::Write;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::status;
use crate::devices::virtio::test_utils::*;
use crate::devices::virtio::MmioTransport;

const W: u16 = VRING_DESC_F_WRITE as u16;
const R: u16 = 0;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const QBASE: u64 = 0x1_0000;
const QSIZE: u16 = 16;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const SECTORS: u64 = 8;
const FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH;
const DRIVER_OK: u32 =
    status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

/// A disk of `SECTORS` sectors, sector i filled with byte i.
fn disk_file() -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    for i in 0..SECTORS {
        f.write_all(&[i as u8; 512]).unwrap();
    }
    f.flush().unwrap();
    f
}

fn new_block(path: &std::path::Path, read_only: bool, serial: Option<&str>) -> Arc<Mutex<Block>> {
    let cfg = BlockDeviceConfig {
        path: path.to_path_buf(),
        read_only,
        serial: serial.map(String::from),
        chunked: None,
    };
    Arc::new(Mutex::new(Block::new(&cfg).unwrap()))
}

/// The driver side: a split queue and descriptor bookkeeping.
struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    vq: TestQueue<'a>,
    next_desc: u16,
    seen_used: u16,
}

impl<'a> Driver<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        Driver {
            mem,
            vq: TestQueue::new(mem, QBASE, QSIZE),
            next_desc: 0,
            seen_used: 0,
        }
    }

    fn layout(&self) -> QueueLayout {
        self.vq.layout()
    }

    /// Chains `descs` (addr, len, R/W) and offers the chain; returns its head.
    fn submit(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let n = descs.len() as u16;
        if self.next_desc + n > QSIZE {
            self.next_desc = 0;
        }
        let first = self.next_desc;
        let table: Vec<_> = descs
            .iter()
            .enumerate()
            .map(|(i, &(a, l, f))| {
                let last = i + 1 == descs.len();
                (a, l, if last { f } else { f | NEXT }, first + i as u16 + 1)
            })
            .collect();
        self.vq.set_descs(first, &table);
        self.vq.push_avail(&[first]);
        self.next_desc += n;
        first
    }

    fn header(&self, addr: u64, req_type: u32, sector: u64) {
        self.mem.write_obj(req_type, GuestAddress(addr)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(addr + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(addr + 8)).unwrap();
    }

    /// The next completion, if any: (head, used len).
    fn completion(&mut self) -> Option<(u32, u32)> {
        if self.vq.used_idx() == self.seen_used {
            return None;
        }
        let e = self.vq.used_elem(self.seen_used);
        self.seen_used = self.seen_used.wrapping_add(1);
        Some(e)
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    /// A standard 3-descriptor request; returns (status, used len).
    fn request(
        &mut self,
        blk: &Arc<Mutex<Block>>,
        req_type: u32,
        sector: u64,
        data_len: u32,
        data_flags: u16,
    ) -> (u8, u32) {
        self.header(HDR, req_type, sector);
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let head = self.submit(&[(HDR, 16, R), (DATA, data_len, data_flags), (STATUS, 1, W)]);
        blk.lock().unwrap().process_queue();
        let (id, len) = self.completion().expect("request completed");
        assert_eq!(id, u32::from(head));
        (self.status(), len)
    }

    /// A read of sector 0 works: the device is still usable.
    fn assert_usable(&mut self, blk: &Arc<Mutex<Block>>) {
        assert!(!blk.lock().unwrap().is_broken());
        assert_eq!(
            self.request(blk, VIRTIO_BLK_T_IN, 3, 512, W),
            (VIRTIO_BLK_S_OK, 513)
        );
        let mut buf = [0u8; 512];
        self.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        assert_eq!(buf, [3u8; 512]);
    }
}

fn activate(
    mem: &GuestMemoryMmap,
    blk: &Arc<Mutex<Block>>,
    d: &Driver,
    features: u64,
) -> MmioTransport {
    let mut t = MmioTransport::new(mem.clone(), blk.clone());
    assert_eq!(
        drive_to_driver_ok(&mut t, features, &[d.layout()]),
        DRIVER_OK
    );
    assert!(blk.lock().unwrap().is_activated());
    t
}

#[test]
fn config_features_and_bad_configs() {
    let f = disk_file();
    let blk = new_block(f.path(), false, None);
    let b = blk.lock().unwrap();
    assert_eq!(b.capacity(), SECTORS);
    let mut c = [0u8; 8];
    b.read_config(0, &mut c);
    assert_eq!(u64::from_le_bytes(c), SECTORS);
    let mut s = [0u8; 4];
    b.read_config(12, &mut s);
    assert_eq!(u32::from_le_bytes(s), u32::from(QUEUE_SIZE) - 2);
    assert_eq!(b.avail_features() & VIRTIO_BLK_F_RO, 0);
    assert_ne!(b.avail_features() & VIRTIO_BLK_F_FLUSH, 0);
    drop(b);
    let ro = new_block(f.path(), true, None);
    assert_ne!(ro.lock().unwrap().avail_features() & VIRTIO_BLK_F_RO, 0);

    let bad = BlockDeviceConfig {
        path: f.path().to_path_buf(),
        read_only: false,
        serial: Some("x".repeat(21)),
        chunked: None,
    };
    assert!(matches!(
        Block::new(&bad),
        Err(BlockError::SerialTooLong(_))
    ));
    let missing = BlockDeviceConfig {
        path: "/nonexistent/disk.img".into(),
        read_only: true,
        serial: None,
        chunked: None,
    };
    assert!(matches!(Block::new(&missing), Err(BlockError::Open { .. })));
}

#[test]
fn write_then_read_round_trip() {
    let mem = test_mem();
    let f = disk_file();
    let blk = new_block(f.path(), false, None);
    let mut d = Driver::new(&mem);
    let irq = blk.lock().unwrap().interrupt().clone();
    let _t = activate(&mem, &blk, &d, FEATURES);

    // Write 2 sectors at sector 5, split across two data descriptors.
    let payload: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
    mem.write_slice(&payload[..300], GuestAddress(DATA))
        .unwrap();
    mem.write_slice(&payload[300..], GuestAddress(DATA + 0x1000))
        .unwrap();
    d.header(HDR, VIRTIO_BLK_T_OUT, 5);
    d.submit(&[
        (HDR, 16, R),
        (DATA, 300, R),
        (DATA + 0x1000, 724, R),
        (STATUS, 1, W),
    ]);
    blk.lock().unwrap().process_queue();
    assert_eq!(d.completion().unwrap().1, 1);
    assert_eq!(d.status(), VIRTIO_BLK_S_OK);
    assert_eq!(irq.status() & VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_INT_VRING);
    let on_disk = std::fs::read(f.path()).unwrap();
    assert_eq!(&on_disk[5 * 512..7 * 512], &payload[..]);

    // Read them back, with header and status sharing descriptors with the data.
    mem.write_slice(&[0u8; 2048], GuestAddress(DATA)).unwrap();
    d.header(HDR, VIRTIO_BLK_T_IN, 5);
    d.submit(&[(HDR, 16, R), (DATA, 1025, W)]);
    blk.lock().unwrap().process_queue();
    assert_eq!(d.completion().unwrap().1, 1025);
    let mut back = vec![0u8; 1024];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, payload);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(DATA + 1024)).unwrap(),
        VIRTIO_BLK_S_OK
    );

    // Flush.
    assert_eq!(
        d.request(&blk, VIRTIO_BLK_T_FLUSH, 0, 0, R).0,
        VIRTIO_BLK_S_OK
    );
}

#[test]
fn event_idx_and_many_requests() {
    let mem = test_mem();
    let f = disk_file();
    let blk = new_block(f.path(), false, None);
    let mut d = Driver::new(&mem);
    let _t = activate(&mem, &blk, &d, FEATURES | VIRTIO_RING_F_EVENT_IDX);
    // More requests than the ring holds, over several rounds: indices wrap.
    for round in 0..40u64 {
        assert_eq!(
            d.request(&blk, VIRTIO_BLK_T_IN, round % SECTORS, 512, W),
            (VIRTIO_BLK_S_OK, 513)
        );
    }
}

#[test]
fn get_id() {
    let mem = test_mem();
    let f = disk_file();
    let blk = new_block(f.path(), false, Some("kindling-disk-0"));
    let mut d = Driver::new(&mem);
    let _t = activate(&mem, &blk, &d, FEATURES);
    assert_eq!(
        d.request(&blk, VIRTIO_BLK_T_GET_ID, 0, 20, W),
        (VIRTIO_BLK_S_OK, 21)
    );
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..15], b"kindling-disk-0");
    assert_eq!(&id[15..], &[0; 5]);
    // A short buffer is an error and nothing is written.
    mem.write_slice(&[0xaa; 20], GuestAddress(DATA)).unwrap();
    assert_eq!(
        d.request(&blk, VIRTIO_BLK_T_GET_ID, 0, 10, W),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(id, [0xaa; 20]);
    d.assert_usable(&blk);
}

#[test]
fn requests_beyond_the_disk_fail() {
    let mem = test_mem();
    let f = disk_file();
    let blk = new_block(f.path(), false, None);
    let mut d = Driver::new(&mem);
    let _t = activate(&mem, &blk, &d, FEATURES);
    assert_eq!(
        d.request(&blk, VIRTIO_BLK_T_IN, SECTORS, 512, W).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        d.request(&blk, VIRTIO_BLK_T_IN, SECTORS - 1, 1024, W).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        d.request(&blk, VIRTIO_BLK_T_IN, u64::MAX, 512, W).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        d.request(&blk, VIRTIO_BLK_T_IN, u64::MAX / 512 + 1, 512, W)
            .0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        d.request(&blk, VIRTIO_BLK_T_OUT, SECTORS, 512, R).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        d.request(&blk, VIRTIO_BLK_T_OUT, u64::MAX, 512, R).0,
        VIRTIO_BLK_S_IOERR
    );
    // Not a multiple of the sector size.
    assert_eq!(
        d.request(&blk, VIRTIO_BLK_T_IN, 0, 100, W),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    assert_eq!(
        d.request(&blk, VIRTIO_BLK_T_OUT, 0, 513, R).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(std::fs::read(f.path()).unwrap().len() as u64, SECTORS * 512);
    d.assert_usable(&blk);
}

#[test]
fn writes_to_a_read_only_disk_fail() {
    let mem = test_mem();
    let f = disk_file();
    let before = std::fs::read(f.path()).unwrap();
    let blk = new_block(f.path(), true, None);
    let mut d = Driver::new(&mem);
    let _t = activate(&mem, &blk, &d, FEATURES | VIRTIO_BLK_F_RO);
    mem.write_slice(&[0x55; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(
        d.request(&blk, VIRTIO_BLK_T_OUT, 0, 512, R),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    assert_eq!(std::fs::read(f.path()).unwrap(), before);
    assert_eq!(
        d.request(&blk, VIRTIO_BLK_T_FLUSH, 0, 0, R).0,
        VIRTIO_BLK_S_OK
    );
    d.assert_usable(&blk);
}

#[test]
fn unsupported_request_types() {
    let mem = test_mem();
    let f = disk_file();
    let blk = new_block(f.path(), false, None);
    let mut d = Driver::new(&mem);
    let _t = activate(&mem, &blk, &d, FEATURES);
    for t in [2u32, 11, 13, 14, 0x8000_0000, u32::MAX] {
        assert_eq!(
            d.request(&blk, t, 0, 512, W),
            (VIRTIO_BLK_S_UNSUPP, 1),
            "type {t}"
        );
    }
    d.assert_usable(&blk);
}

#[test]
fn malformed_chains_are_refused_and_the_device_stays_usable() {
    let mem = test_mem();
    let f = disk_file();
    let before = std::fs::read(f.path()).unwrap();
    let blk = new_block(f.path(), false, None);
    let mut d = Driver::new(&mem);
    let _t = activate(&mem, &blk, &d, FEATURES);

    // Too short: a header only, no status byte.
    d.header(HDR, VIRTIO_BLK_T_IN, 0);
    d.submit(&[(HDR, 16, R)]);
    blk.lock().unwrap().process_queue();
    assert_eq!(d.completion().unwrap().1, 0);

    // Header too short (8 bytes): IOERR in the status byte.
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    d.submit(&[(HDR, 8, R), (DATA, 512, W), (STATUS, 1, W)]);
    blk.lock().unwrap().process_queue();
    assert_eq!(d.completion().unwrap().1, 1);
    assert_eq!(d.status(), VIRTIO_BLK_S_IOERR);

    // Wrong directions: header device-writable -> no readable header -> IOERR.
    d.header(HDR, VIRTIO_BLK_T_IN, 0);
    d.submit(&[(HDR, 16, W), (DATA, 512, W), (STATUS, 1, W)]);
    blk.lock().unwrap().process_queue();
    assert_eq!(d.completion().unwrap().1, 1);
    assert_eq!(d.status(), VIRTIO_BLK_S_IOERR);

    // Wrong directions: status device-readable -> no status byte at all.
    d.header(HDR, VIRTIO_BLK_T_OUT, 0);
    d.submit(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, R)]);
    blk.lock().unwrap().process_queue();
    assert_eq!(d.completion().unwrap().1, 0);

    // Wrong directions: readable data after the writable part.
    d.submit(&[(HDR, 16, R), (STATUS, 1, W), (DATA, 512, R)]);
    blk.lock().unwrap().process_queue();
    assert_eq!(d.completion().unwrap().1, 0);

    // An IN whose data buffer is device-readable: no data is written, status OK for 0 bytes.
    mem.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(
        d.request(&blk, VIRTIO_BLK_T_IN, 1, 512, R),
        (VIRTIO_BLK_S_OK, 1)
    );
    assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA)).unwrap(), 0xaa);

    // Buffers outside guest memory, or whose length overflows the address space.
    d.header(HDR, VIRTIO_BLK_T_IN, 0);
    d.submit(&[(HDR, 16, R), (TEST_MEM_SIZE - 256, 512, W), (STATUS, 1, W)]);
    d.submit(&[(HDR, 16, R), (u64::MAX - 100, 512, W), (STATUS, 1, W)]);
    d.submit(&[(HDR, 16, R), (DATA, u32::MAX, W), (STATUS, 1, W)]);
    d.submit(&[(HDR, 16, R), (DATA, 512, W), (0x2000_0000, 1, W)]);
    blk.lock().unwrap().process_queue();
    for _ in 0..4 {
        assert_eq!(d.completion().unwrap().1, 0);
    }

    // A loop: 0 -> 1 -> 0.
    d.next_desc = 0;
    d.vq.set_descs(0, &[(HDR, 16, NEXT, 1), (DATA, 512, W | NEXT, 0)]);
    d.vq.push_avail(&[0]);
    blk.lock().unwrap().process_queue();
    assert_eq!(d.completion().unwrap(), (0, 0));

    // A next index past the table.
    d.vq.set_descs(0, &[(HDR, 16, NEXT, 1000)]);
    d.vq.push_avail(&[0]);
    blk.lock().unwrap().process_queue();
    assert_eq!(d.completion().unwrap(), (0, 0));

    // A head index past the ring: skipped, nothing completes.
    d.vq.push_avail(&[QSIZE + 3]);
    blk.lock().unwrap().process_queue();
    assert!(d.completion().is_none());

    // Too long: an indirect table of 2000 descriptors (the device never offered INDIRECT).
    let table = 0x40_0000u64;
    for i in 0..2000u64 {
        let desc = virtio_queue::desc::RawDescriptor::from(
            virtio_queue::desc::split::Descriptor::new(HDR, 16, NEXT, (i + 1) as u16),
        );
        mem.write_obj(desc, GuestAddress(table + 16 * i)).unwrap();
    }
    d.vq.set_descs(
        0,
        &[(
            table,
            2000 * 16,
            virtio_bindings::bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16,
            0,
        )],
    );
    d.vq.push_avail(&[0]);
    blk.lock().unwrap().process_queue();
    assert_eq!(d.completion().unwrap(), (0, 0));

    assert_eq!(std::fs::read(f.path()).unwrap(), before);
    d.next_desc = 0;
    d.assert_usable(&blk);
}

#[test]
fn avail_index_far_ahead_marks_the_device_broken() {
    let mem = test_mem();
    let f = disk_file();
    let blk = new_block(f.path(), false, None);
    let d = Driver::new(&mem);
    let mut t = activate(&mem, &blk, &d, FEATURES);
    d.vq.set_avail_idx(QSIZE * 3);
    blk.lock().unwrap().process_queue();
    assert!(blk.lock().unwrap().is_broken());
    assert_eq!(r32(&mut t, 0x70), DRIVER_OK | status::DEVICE_NEEDS_RESET);
    assert_ne!(
        r32(&mut t, 0x60) & crate::devices::virtio::VIRTIO_MMIO_INT_CONFIG,
        0
    );
    // Further kicks are ignored.
    blk.lock().unwrap().process_queue();
    assert_eq!(d.vq.used_idx(), 0);
    // The driver resets and starts over: the device works again.
    let mut d = Driver::new(&mem);
    assert_eq!(
        drive_to_driver_ok(&mut t, FEATURES, &[d.layout()]),
        DRIVER_OK
    );
    d.assert_usable(&blk);
}

#[test]
fn activation_refuses_bad_queues() {
    let mem = test_mem();
    let f = disk_file();
    let blk = new_block(f.path(), false, None);
    let mut b = blk.lock().unwrap();
    assert!(matches!(
        b.activate(mem.clone(), vec![]),
        Err(ActivateError::QueueCount { .. })
    ));
    let q = Queue::new(16).unwrap();
    assert!(matches!(
        b.activate(mem.clone(), vec![q]),
        Err(ActivateError::QueueNotReady(0))
    ));
    assert!(!b.is_activated());
}

#[test]
fn event_loop_ignores_kicks_before_activation() {
    let mem = test_mem();
    let f = disk_file();
    let blk = new_block(f.path(), false, None);
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    em.add_subscriber(blk.clone());
    let mut d = Driver::new(&mem);
    d.header(HDR, VIRTIO_BLK_T_IN, 2);
    d.submit(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    blk.lock().unwrap().queue_events()[0].write(1).unwrap();
    assert_eq!(em.run_with_timeout(50).unwrap(), 1);
    assert!(d.completion().is_none());
    // Activation serves what was queued at the next loop turn.
    let _t = activate(&mem, &blk, &d, FEATURES);
    assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
    assert_eq!(d.completion().unwrap().1, 513);
    assert_eq!(d.status(), VIRTIO_BLK_S_OK);
    let irq_evt = blk.lock().unwrap().interrupt_evt().try_clone().unwrap();
    assert!(irq_evt.read().unwrap() >= 1);
}

/// The chunked backend, driven through the same queue.
mod chunked;
