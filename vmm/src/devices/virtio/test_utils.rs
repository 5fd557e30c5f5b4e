//! Helpers for the virtio unit tests: fake guest memory and a driver-side view of split queues
//! (virtio-queue's `mock` module).

use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;

pub(crate) const TEST_MEM_SIZE: u64 = 0x100_0000;

/// 16 MiB of guest memory at 0.
pub(crate) fn test_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), TEST_MEM_SIZE as usize)]).unwrap()
}

/// The driver side of a split queue in test memory: descriptor table at `base`, then the
/// available ring, then the used ring (4-byte aligned), each sized for `size` entries.
///
/// (virtio-queue's `MockSplitQueue` places its used ring over the second half of its available
/// ring: `SplitQueueRing::end` adds the element count, not the byte length. Hence this.)
pub(crate) struct TestQueue<'a> {
    mem: &'a GuestMemoryMmap,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl<'a> TestQueue<'a> {
    pub(crate) fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        let end = used + 6 + 8 * u64::from(size);
        mem.write_slice(&vec![0u8; (end - base) as usize], GuestAddress(base))
            .unwrap();
        TestQueue {
            mem,
            size,
            desc,
            avail,
            used,
        }
    }

    pub(crate) fn layout(&self) -> QueueLayout {
        QueueLayout {
            size: self.size,
            desc: self.desc,
            avail: self.avail,
            used: self.used,
        }
    }

    /// A device-side queue on these rings, ready.
    pub(crate) fn create_queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.try_set_size(self.size).unwrap();
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(self.used))
            .unwrap();
        q.set_ready(true);
        q
    }

    /// Writes descriptors `(addr, len, flags, next)` into the table from index `first`.
    pub(crate) fn set_descs(&self, first: u16, descs: &[(u64, u32, u16, u16)]) {
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            let at = self.desc + 16 * u64::from(first + i as u16);
            self.mem.write_obj(d, GuestAddress(at)).unwrap();
        }
    }

    pub(crate) fn avail_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.avail + 2)).unwrap()
    }

    pub(crate) fn set_avail_idx(&self, v: u16) {
        self.mem.write_obj(v, GuestAddress(self.avail + 2)).unwrap();
    }

    /// Offers chain heads on the available ring (wrapping around it like a driver).
    pub(crate) fn push_avail(&self, heads: &[u16]) {
        for &h in heads {
            let idx = self.avail_idx();
            let slot = self.avail + 4 + 2 * u64::from(idx % self.size);
            self.mem.write_obj(h, GuestAddress(slot)).unwrap();
            self.set_avail_idx(idx.wrapping_add(1));
        }
    }

    /// The used ring's index.
    pub(crate) fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Used ring entry `i` (modulo the ring size) as (head, len).
    pub(crate) fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }
}

use super::mmio::MmioTransport;
use super::status;
use crate::devices::BusDevice;

pub(crate) fn r32(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

pub(crate) fn w32(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// Where a driver put one queue: (size, descriptor table, available ring, used ring).
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueLayout {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// Plays a Linux driver's initialisation up to FEATURES_OK, accepting `features`.
pub(crate) fn drive_to_features_ok(t: &mut MmioTransport, features: u64) {
    w32(t, 0x70, 0);
    w32(t, 0x70, status::ACKNOWLEDGE);
    w32(t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
    w32(t, 0x24, 0);
    w32(t, 0x20, features as u32);
    w32(t, 0x24, 1);
    w32(t, 0x20, (features >> 32) as u32);
    w32(
        t,
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
}

/// Configures queue `i` as the driver would.
pub(crate) fn setup_queue(t: &mut MmioTransport, i: u32, l: QueueLayout) {
    w32(t, 0x30, i);
    w32(t, 0x38, u32::from(l.size));
    w32(t, 0x80, l.desc as u32);
    w32(t, 0x84, (l.desc >> 32) as u32);
    w32(t, 0x90, l.avail as u32);
    w32(t, 0x94, (l.avail >> 32) as u32);
    w32(t, 0xa0, l.used as u32);
    w32(t, 0xa4, (l.used >> 32) as u32);
    w32(t, 0x44, 1);
}

/// Full initialisation: features, queues, DRIVER_OK. Returns the status read back.
pub(crate) fn drive_to_driver_ok(
    t: &mut MmioTransport,
    features: u64,
    queues: &[QueueLayout],
) -> u32 {
    drive_to_features_ok(t, features);
    for (i, l) in queues.iter().enumerate() {
        setup_queue(t, i as u32, *l);
    }
    w32(
        t,
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    r32(t, 0x70)
}
