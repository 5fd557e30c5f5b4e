//! Descriptor chains, parsed defensively.
//!
//! `virtio_queue::DescriptorChain` stops silently on a loop, a `next` index past the table, an
//! unreadable descriptor or a total length past 4 GiB. [`parse_chain`] turns a chain into a
//! bounded list of device-readable segments followed by device-writable ones and refuses
//! anything malformed: empty chains, more than `max` descriptors, chains cut short (the last
//! descriptor still says NEXT), a readable descriptor after a writable one, or a descriptor
//! outside guest memory. [`SegCursor`] then reads or writes across the segments.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use crate::memory::GuestMemoryMmap;

/// The most descriptors the devices accept in one chain (direct chains are bounded by the queue
/// size already; this bounds indirect tables too).
pub(crate) const MAX_CHAIN_DESCRIPTORS: usize = 1024;

/// One guest buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A parsed chain: the readable and writable segments in order.
#[derive(Debug, Default)]
pub(crate) struct Chain {
    pub readable: Vec<Segment>,
    pub writable: Vec<Segment>,
    pub readable_len: u64,
    pub writable_len: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum ChainError {
    #[error("empty descriptor chain (or an invalid head index)")]
    Empty,
    #[error("descriptor chain longer than {0} descriptors")]
    TooLong(usize),
    #[error("descriptor chain cut short (a loop, a bad next index, an unreadable descriptor or a length overflow)")]
    Truncated,
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("descriptor {addr:#x}+{len:#x} lies outside guest memory")]
    OutOfBounds { addr: u64, len: u32 },
}

/// Parses `chain` (whose buffers live in `mem`) into at most `max` segments.
pub(crate) fn parse_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    max: usize,
) -> Result<Chain, ChainError> {
    let mut out = Chain::default();
    let mut count = 0usize;
    let mut last_has_next = false;
    for desc in chain {
        count += 1;
        if count > max {
            return Err(ChainError::TooLong(max));
        }
        last_has_next = desc.has_next();
        let seg = Segment {
            addr: desc.addr(),
            len: desc.len(),
        };
        if seg.len > 0 && !GuestMemoryBackend::check_range(mem, seg.addr, seg.len as usize) {
            return Err(ChainError::OutOfBounds {
                addr: seg.addr.0,
                len: seg.len,
            });
        }
        if desc.is_write_only() {
            out.writable_len += u64::from(seg.len);
            out.writable.push(seg);
        } else {
            if !out.writable.is_empty() {
                return Err(ChainError::ReadableAfterWritable);
            }
            out.readable_len += u64::from(seg.len);
            out.readable.push(seg);
        }
    }
    if count == 0 {
        return Err(ChainError::Empty);
    }
    if last_has_next {
        return Err(ChainError::Truncated);
    }
    Ok(out)
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum CursorError {
    #[error("the guest buffers are too short")]
    Short,
    #[error("guest memory: {0}")]
    Memory(#[from] GuestMemoryError),
}

/// A position in a list of segments, for reading or writing across them.
pub(crate) struct SegCursor<'a> {
    mem: &'a GuestMemoryMmap,
    segs: &'a [Segment],
    idx: usize,
    off: u32,
}

impl<'a> SegCursor<'a> {
    pub(crate) fn new(mem: &'a GuestMemoryMmap, segs: &'a [Segment]) -> Self {
        Self {
            mem,
            segs,
            idx: 0,
            off: 0,
        }
    }

    /// Bytes left from the current position.
    pub(crate) fn remaining(&self) -> u64 {
        let mut n = 0u64;
        for (i, s) in self.segs.iter().enumerate().skip(self.idx) {
            let used = if i == self.idx { self.off } else { 0 };
            n += u64::from(s.len.saturating_sub(used));
        }
        n
    }

    /// The next contiguous piece of at most `max` bytes, advancing past it.
    fn next_piece(&mut self, max: usize) -> Option<(GuestAddress, usize)> {
        loop {
            let seg = self.segs.get(self.idx)?;
            let left = seg.len.saturating_sub(self.off) as usize;
            if left == 0 {
                self.idx += 1;
                self.off = 0;
                continue;
            }
            let n = left.min(max);
            let addr = seg.addr.0.checked_add(u64::from(self.off))?;
            // n <= left <= u32::MAX.
            self.off += n as u32;
            return Some((GuestAddress(addr), n));
        }
    }

    /// Fills `buf` from the segments.
    pub(crate) fn read(&mut self, buf: &mut [u8]) -> Result<(), CursorError> {
        let mut done = 0;
        while done < buf.len() {
            let (addr, n) = self
                .next_piece(buf.len() - done)
                .ok_or(CursorError::Short)?;
            let dst = buf.get_mut(done..done + n).ok_or(CursorError::Short)?;
            self.mem.read_slice(dst, addr)?;
            done += n;
        }
        Ok(())
    }

    /// Writes `buf` into the segments.
    pub(crate) fn write(&mut self, buf: &[u8]) -> Result<(), CursorError> {
        let mut done = 0;
        while done < buf.len() {
            let (addr, n) = self
                .next_piece(buf.len() - done)
                .ok_or(CursorError::Short)?;
            let src = buf.get(done..done + n).ok_or(CursorError::Short)?;
            self.mem.write_slice(src, addr)?;
            done += n;
        }
        Ok(())
    }
}

/// Why a queue cannot be used any more: the device must be marked broken.
#[derive(Debug, thiserror::Error)]
pub(crate) enum QueueBroken {
    #[error("available ring: {0}")]
    Avail(virtio_queue::Error),
    #[error("used ring: {0}")]
    Used(virtio_queue::Error),
}

/// Pops the next available chain. `Err` means the driver broke the ring (an available index
/// more than a queue size ahead, or a ring that cannot be read).
pub(crate) fn pop_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, QueueBroken> {
    let mut iter = queue.iter(mem).map_err(QueueBroken::Avail)?;
    Ok(iter.next())
}

/// Puts `head` back on the used ring with `len` bytes written.
pub(crate) fn add_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
) -> Result<(), QueueBroken> {
    queue.add_used(mem, head, len).map_err(QueueBroken::Used)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const N: u16 = VRING_DESC_F_NEXT as u16;

    fn parse_first(mem: &GuestMemoryMmap, vq: &TestQueue) -> Result<Chain, ChainError> {
        let mut q: Queue = vq.create_queue();
        let chain = pop_chain(&mut q, mem).unwrap().unwrap();
        parse_chain(mem, chain, MAX_CHAIN_DESCRIPTORS)
    }

    #[test]
    fn parses_readable_then_writable() {
        let mem = test_mem();
        let vq = TestQueue::new(&mem, 0, 16);
        vq.set_descs(
            0,
            &[
                (0x10_0000, 16, N, 1),
                (0x10_1000, 512, W | N, 2),
                (0x10_2000, 1, W, 0),
            ],
        );
        vq.push_avail(&[0]);
        let c = parse_first(&mem, &vq).unwrap();
        assert_eq!(c.readable.len(), 1);
        assert_eq!(c.writable.len(), 2);
        assert_eq!((c.readable_len, c.writable_len), (16, 513));
    }

    #[test]
    fn refuses_malformed_chains() {
        let mem = test_mem();
        // A loop: 0 -> 1 -> 0.
        let vq = TestQueue::new(&mem, 0, 16);
        vq.set_descs(0, &[(0x10_0000, 16, N, 1), (0x10_1000, 16, N, 0)]);
        vq.push_avail(&[0]);
        assert_eq!(parse_first(&mem, &vq).unwrap_err(), ChainError::Truncated);

        // next index past the table.
        let vq = TestQueue::new(&mem, 0, 16);
        vq.set_descs(0, &[(0x10_0000, 16, N, 99)]);
        vq.push_avail(&[0]);
        assert_eq!(parse_first(&mem, &vq).unwrap_err(), ChainError::Truncated);

        // Head index past the table.
        let vq = TestQueue::new(&mem, 0, 16);
        vq.push_avail(&[40]);
        assert_eq!(parse_first(&mem, &vq).unwrap_err(), ChainError::Empty);

        // Outside guest memory, and an address that overflows.
        let vq = TestQueue::new(&mem, 0, 16);
        vq.set_descs(0, &[(TEST_MEM_SIZE - 8, 16, 0, 0)]);
        vq.push_avail(&[0]);
        assert!(matches!(
            parse_first(&mem, &vq),
            Err(ChainError::OutOfBounds { .. })
        ));
        let vq = TestQueue::new(&mem, 0, 16);
        vq.set_descs(0, &[(u64::MAX - 4, 16, 0, 0)]);
        vq.push_avail(&[0]);
        assert!(matches!(
            parse_first(&mem, &vq),
            Err(ChainError::OutOfBounds { .. })
        ));

        // Readable after writable.
        let vq = TestQueue::new(&mem, 0, 16);
        vq.set_descs(0, &[(0x10_0000, 16, W | N, 1), (0x10_1000, 16, 0, 0)]);
        vq.push_avail(&[0]);
        assert_eq!(
            parse_first(&mem, &vq).unwrap_err(),
            ChainError::ReadableAfterWritable
        );

        // Total length past 4 GiB: the queue crate stops early, which shows as a cut chain.
        let vq = TestQueue::new(&mem, 0, 16);
        vq.set_descs(
            0,
            &[(0x10_0000, 0xffff_fff0, N, 1), (0x10_0000, 0x100, 0, 0)],
        );
        vq.push_avail(&[0]);
        assert!(parse_first(&mem, &vq).is_err());

        // More descriptors than the cap.
        let vq = TestQueue::new(&mem, 0, 16);
        let descs: Vec<_> = (0..8u16)
            .map(|i| (0x10_0000, 16, if i < 7 { N } else { 0 }, i + 1))
            .collect();
        vq.set_descs(0, &descs);
        vq.push_avail(&[0]);
        let mut q: Queue = vq.create_queue();
        let chain = pop_chain(&mut q, &mem).unwrap().unwrap();
        assert_eq!(
            parse_chain(&mem, chain, 4).unwrap_err(),
            ChainError::TooLong(4)
        );
    }

    #[test]
    fn avail_index_far_ahead_breaks_the_queue() {
        let mem = test_mem();
        let vq = TestQueue::new(&mem, 0, 16);
        let mut q: Queue = vq.create_queue();
        vq.set_avail_idx(1000);
        assert!(matches!(
            pop_chain(&mut q, &mem),
            Err(QueueBroken::Avail(_))
        ));
    }

    #[test]
    fn cursor_reads_and_writes_across_segments() {
        let mem = test_mem();
        let segs = [
            Segment {
                addr: GuestAddress(0x10_0000),
                len: 3,
            },
            Segment {
                addr: GuestAddress(0x10_1000),
                len: 0,
            },
            Segment {
                addr: GuestAddress(0x10_2000),
                len: 5,
            },
        ];
        let mut w = SegCursor::new(&mem, &segs);
        assert_eq!(w.remaining(), 8);
        w.write(b"abcdef").unwrap();
        assert_eq!(w.remaining(), 2);
        assert!(w.write(b"xyz").is_err());
        let mut r = SegCursor::new(&mem, &segs);
        let mut one = [0u8; 1];
        r.read(&mut one).unwrap();
        let mut buf = [0u8; 5];
        r.read(&mut buf).unwrap();
        assert_eq!(&buf, b"bcdef");
        assert!(r.read(&mut [0u8; 10]).is_err());
    }
}
