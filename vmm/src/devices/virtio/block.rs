//! virtio-blk on a raw file or a chunked image (virtio 1.2, section 5.2).
//!
//! # Backends
//! The device reads and writes through a [`DiskBackend`]: a raw file (`pread`/`pwrite`), or
//! a chunked image fetched lazily from a chunk server with a copy-on-write overlay
//! ([`chunked`], when the config has `chunked`).
//!
//! # Features
//! VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX
//! (`seg_max` = queue size - 2) and VIRTIO_BLK_F_RO for a read-only disk. One request queue of
//! [`QUEUE_SIZE`] entries.
//!
//! # Requests
//! - `IN` / `OUT`: data length must be a multiple of 512 and the whole range must lie inside the
//!   disk (`capacity` = file size / 512, rounded down: a trailing partial sector is not
//!   reachable); otherwise `IOERR`. `OUT` on a read-only disk is `IOERR`. When the driver did
//!   not accept FLUSH, every write is followed by `fdatasync` (write-through, as the spec asks).
//! - `FLUSH`: `fdatasync` (a no-op on a read-only disk).
//! - `GET_ID`: the configured serial, NUL-padded to 20 bytes; a buffer shorter than 20 bytes
//!   is `IOERR`.
//! - Any other type: `UNSUPP`.
//!
//! The request layout is not assumed (ANY_LAYOUT): the 16-byte header is read from the
//! device-readable buffers, the status is the last byte of the device-writable ones.
//!
//! # Limits and behaviour towards a bad driver
//! I/O is synchronous (`pread`/`pwrite`) in the event loop, through a 128 KiB bounce buffer, so
//! no allocation depends on a request's size. A queue kick processes at most 4 × the queue
//! size requests before yielding to the other event sources (the rest follow at the next loop
//! turn). Malformed chains (see [`super::chain`]) are returned with a used length of 0, or with
//! `IOERR` when a status byte can be found; a head index past the ring is skipped; a broken
//! available or used ring marks the device `DEVICE_NEEDS_RESET` until the driver resets it.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::chain::{self, add_used, parse_chain, pop_chain, QueueBroken, SegCursor, Segment};
use super::{
    drain_evt, read_config_bytes, ActivateError, GuestErrorLog, IrqTrigger, VirtioDevice,
    TYPE_BLOCK, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_VRING, VIRTIO_RING_F_EVENT_IDX,
};
use crate::config::BlockDeviceConfig;
use crate::memory::GuestMemoryMmap;
use crate::snapshot::persist::{Persist, PersistError, VirtioDeviceState};

/// Entries in the request queue.
pub const QUEUE_SIZE: u16 = 256;
pub const SECTOR_SIZE: u64 = 512;
/// Length of the serial id GET_ID returns.
pub const SERIAL_LEN: usize = 20;

pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
const REQ_HDR_LEN: usize = 16;
/// Config space: capacity (le64), size_max (le32), seg_max (le32), geometry, blk_size.
const CONFIG_LEN: usize = 24;
const BOUNCE_LEN: usize = 128 * 1024;
const MAX_CHAINS_PER_EVENT: usize = 4 * QUEUE_SIZE as usize;
const NAME: &str = "virtio-blk";

/// What a disk's bytes live in. Offsets and lengths are whole sectors inside [`size`].
///
/// [`size`]: DiskBackend::size
pub trait DiskBackend: Send {
    /// The disk size in bytes.
    fn size(&self) -> u64;
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes written data durable (FLUSH).
    fn flush(&mut self) -> io::Result<()>;
}

/// A raw disk image file.
struct RawFile {
    file: File,
    size: u64,
}

impl DiskBackend for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot size disk image {path}: {source}")]
    Size { path: PathBuf, source: io::Error },
    #[error("serial id {0:?} is longer than {SERIAL_LEN} bytes")]
    SerialTooLong(String),
    #[error("eventfd: {0}")]
    EventFd(io::Error),
    #[error("chunked image: {0}")]
    Chunked(#[from] chunked::ChunkedError),
}

/// The backing store and what requests need of it.
struct Disk {
    backend: Box<dyn DiskBackend>,
    nsectors: u64,
    read_only: bool,
    /// Set at activation when the driver did not accept FLUSH.
    write_through: bool,
    serial: [u8; SERIAL_LEN],
    bounce: Vec<u8>,
}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    broken: bool,
}

/// A virtio-blk device.
pub struct Block {
    disk: Disk,
    avail_features: u64,
    acked_features: u64,
    config: [u8; CONFIG_LEN],
    queue_evts: [EventFd; 1],
    irq: Arc<IrqTrigger>,
    active: Option<Active>,
    errors: GuestErrorLog,
}

impl Block {
    pub fn new(cfg: &BlockDeviceConfig) -> Result<Block, BlockError> {
        let backend: Box<dyn DiskBackend> = match &cfg.chunked {
            Some(c) => Box::new(chunked::ChunkedDisk::open(&cfg.path, c, cfg.read_only)?),
            None => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(!cfg.read_only)
                    .open(&cfg.path)
                    .map_err(|source| BlockError::Open {
                        path: cfg.path.clone(),
                        source,
                    })?;
                let size = (&file)
                    .seek(SeekFrom::End(0))
                    .map_err(|source| BlockError::Size {
                        path: cfg.path.clone(),
                        source,
                    })?;
                Box::new(RawFile { file, size })
            }
        };
        let size = backend.size();
        if size & (SECTOR_SIZE - 1) != 0 {
            tracing::warn!(
                "{NAME}: {} is {size} bytes, not a multiple of {SECTOR_SIZE}; the last partial sector is not visible",
                cfg.path.display()
            );
        }
        let mut serial = [0u8; SERIAL_LEN];
        if let Some(s) = &cfg.serial {
            let b = s.as_bytes();
            let dst = serial
                .get_mut(..b.len())
                .ok_or_else(|| BlockError::SerialTooLong(s.clone()))?;
            dst.copy_from_slice(b);
        }
        let nsectors = size / SECTOR_SIZE;
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&nsectors.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        let mut avail_features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_SEG_MAX;
        if cfg.read_only {
            avail_features |= VIRTIO_BLK_F_RO;
        }
        Ok(Block {
            disk: Disk {
                backend,
                nsectors,
                read_only: cfg.read_only,
                write_through: false,
                serial,
                bounce: vec![0; BOUNCE_LEN],
            },
            avail_features,
            acked_features: 0,
            config,
            queue_evts: [EventFd::new(EFD_NONBLOCK).map_err(BlockError::EventFd)?],
            irq: Arc::new(IrqTrigger::new().map_err(BlockError::EventFd)?),
            active: None,
            errors: GuestErrorLog::default(),
        })
    }

    /// The disk size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.nsectors
    }

    pub fn is_read_only(&self) -> bool {
        self.disk.read_only
    }

    /// Whether the device gave up on its queue (until the driver resets it).
    pub fn is_broken(&self) -> bool {
        self.active.as_ref().is_some_and(|a| a.broken)
    }

    /// Processes the request queue (what a queue kick does).
    pub(crate) fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if active.broken {
            return;
        }
        match run_queue(&mut self.disk, active, &mut self.errors) {
            Ok((used, more)) => {
                if more {
                    // Yield to the other event sources; continue at the next loop turn.
                    if let Err(e) = self.queue_evts[0].write(1) {
                        tracing::warn!("{NAME}: cannot reschedule the queue: {e}");
                    }
                }
                if used {
                    match active.queue.needs_notification(&active.mem) {
                        Ok(false) => {}
                        Ok(true) => self.irq.trigger(VIRTIO_MMIO_INT_VRING),
                        Err(e) => {
                            // Cannot read used_event: notify anyway, it is harmless.
                            tracing::debug!("{NAME}: needs_notification: {e}");
                            self.irq.trigger(VIRTIO_MMIO_INT_VRING);
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!("{NAME}: {e}; the device needs a reset");
                active.broken = true;
                self.irq.set_needs_reset();
            }
        }
    }
}

/// Drains the available ring. Returns (whether used entries were added, whether work remains).
fn run_queue(
    disk: &mut Disk,
    active: &mut Active,
    errors: &mut GuestErrorLog,
) -> Result<(bool, bool), QueueBroken> {
    let Active { mem, queue, .. } = active;
    let mut used = false;
    let mut budget = MAX_CHAINS_PER_EVENT;
    loop {
        queue.disable_notification(mem).map_err(QueueBroken::Used)?;
        while let Some(chain) = pop_chain(queue, mem)? {
            let head = chain.head_index();
            if head >= queue.size() {
                errors.log(
                    NAME,
                    format_args!(
                        "head index {head} past the ring of {}; skipped",
                        queue.size()
                    ),
                );
                continue;
            }
            let len = disk.handle(mem, chain, errors);
            add_used(queue, mem, head, len)?;
            used = true;
            budget -= 1;
            if budget == 0 {
                return Ok((used, true));
            }
        }
        if !queue.enable_notification(mem).map_err(QueueBroken::Used)? {
            return Ok((used, false));
        }
    }
}

/// Splits the writable segments into the data part and the address of the status byte (the
/// last writable byte).
fn split_status(writable: &[Segment]) -> Option<(Vec<Segment>, GuestAddress)> {
    let last = writable.iter().rposition(|s| s.len > 0)?;
    let seg = writable.get(last)?;
    let status = seg.addr.0.checked_add(u64::from(seg.len) - 1)?;
    let mut data: Vec<Segment> = writable.get(..last)?.to_vec();
    if seg.len > 1 {
        data.push(Segment {
            addr: seg.addr,
            len: seg.len - 1,
        });
    }
    Some((data, GuestAddress(status)))
}

impl Disk {
    /// Serves one request; returns the used length (bytes written into guest buffers).
    fn handle(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        errors: &mut GuestErrorLog,
    ) -> u32 {
        let head = chain.head_index();
        let chain = match parse_chain(mem, chain, chain::MAX_CHAIN_DESCRIPTORS) {
            Ok(c) => c,
            Err(e) => {
                errors.log(NAME, format_args!("request {head}: {e}"));
                return 0;
            }
        };
        let Some((data, status_addr)) = split_status(&chain.writable) else {
            errors.log(
                NAME,
                format_args!("request {head}: no device-writable status byte"),
            );
            return 0;
        };
        let (status, written) = self.execute(mem, &chain.readable, &data, head, errors);
        if let Err(e) = mem.write_obj(status, status_addr) {
            errors.log(
                NAME,
                format_args!("request {head}: cannot write the status: {e}"),
            );
            return 0;
        }
        u32::try_from(written.saturating_add(1)).unwrap_or(u32::MAX)
    }

    /// Returns (status, data bytes written to the guest).
    fn execute(
        &mut self,
        mem: &GuestMemoryMmap,
        readable: &[Segment],
        data: &[Segment],
        head: u16,
        errors: &mut GuestErrorLog,
    ) -> (u8, u64) {
        let mut r = SegCursor::new(mem, readable);
        let mut hdr = [0u8; REQ_HDR_LEN];
        if r.read(&mut hdr).is_err() {
            errors.log(
                NAME,
                format_args!("request {head}: header shorter than {REQ_HDR_LEN} bytes"),
            );
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = hdr;
        let req_type = u32::from_le_bytes([t0, t1, t2, t3]);
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        let data_len: u64 = data.iter().map(|s| u64::from(s.len)).sum();
        match req_type {
            VIRTIO_BLK_T_IN => {
                let Some(offset) = self.check_range(sector, data_len, head, errors) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                let mut w = SegCursor::new(mem, data);
                match self.read_to_guest(&mut w, offset, data_len) {
                    Ok(()) => (VIRTIO_BLK_S_OK, data_len),
                    Err(e) => {
                        tracing::warn!("{NAME}: read of {data_len} bytes at {offset}: {e}");
                        (VIRTIO_BLK_S_IOERR, 0)
                    }
                }
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    errors.log(
                        NAME,
                        format_args!("request {head}: write to a read-only disk"),
                    );
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let len = r.remaining();
                let Some(offset) = self.check_range(sector, len, head, errors) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                match self.write_from_guest(&mut r, offset, len) {
                    Ok(()) => (VIRTIO_BLK_S_OK, 0),
                    Err(e) => {
                        tracing::warn!("{NAME}: write of {len} bytes at {offset}: {e}");
                        (VIRTIO_BLK_S_IOERR, 0)
                    }
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                if self.read_only {
                    return (VIRTIO_BLK_S_OK, 0);
                }
                match self.backend.flush() {
                    Ok(()) => (VIRTIO_BLK_S_OK, 0),
                    Err(e) => {
                        tracing::warn!("{NAME}: flush: {e}");
                        (VIRTIO_BLK_S_IOERR, 0)
                    }
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                if data_len < SERIAL_LEN as u64 {
                    errors.log(
                        NAME,
                        format_args!("request {head}: GET_ID buffer of {data_len} bytes"),
                    );
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                match SegCursor::new(mem, data).write(&self.serial) {
                    Ok(()) => (VIRTIO_BLK_S_OK, SERIAL_LEN as u64),
                    Err(e) => {
                        errors.log(NAME, format_args!("request {head}: GET_ID: {e}"));
                        (VIRTIO_BLK_S_IOERR, 0)
                    }
                }
            }
            other => {
                errors.log(
                    NAME,
                    format_args!("request {head}: unsupported type {other}"),
                );
                (VIRTIO_BLK_S_UNSUPP, 0)
            }
        }
    }

    /// The byte offset of `sector` if `len` bytes from there are whole sectors inside the disk.
    fn check_range(
        &self,
        sector: u64,
        len: u64,
        head: u16,
        errors: &mut GuestErrorLog,
    ) -> Option<u64> {
        if len & (SECTOR_SIZE - 1) != 0 {
            errors.log(
                NAME,
                format_args!("request {head}: length {len} is not a multiple of {SECTOR_SIZE}"),
            );
            return None;
        }
        let end = sector.checked_add(len / SECTOR_SIZE);
        if end.is_none_or(|end| end > self.nsectors) {
            errors.log(
                NAME,
                format_args!(
                    "request {head}: sectors {sector}+{} past the disk end {}",
                    len / SECTOR_SIZE,
                    self.nsectors
                ),
            );
            return None;
        }
        // sector < nsectors = size / 512, so this cannot overflow.
        sector.checked_mul(SECTOR_SIZE)
    }

    fn read_to_guest(
        &mut self,
        w: &mut SegCursor<'_>,
        mut offset: u64,
        mut len: u64,
    ) -> io::Result<()> {
        while len > 0 {
            let n = usize::try_from(len)
                .unwrap_or(usize::MAX)
                .min(self.bounce.len());
            let buf = self
                .bounce
                .get_mut(..n)
                .ok_or_else(|| io::Error::other("bounce buffer"))?;
            self.backend.read_at(buf, offset)?;
            w.write(buf).map_err(io::Error::other)?;
            offset += n as u64;
            len -= n as u64;
        }
        Ok(())
    }

    fn write_from_guest(
        &mut self,
        r: &mut SegCursor<'_>,
        mut offset: u64,
        mut len: u64,
    ) -> io::Result<()> {
        while len > 0 {
            let n = usize::try_from(len)
                .unwrap_or(usize::MAX)
                .min(self.bounce.len());
            let buf = self
                .bounce
                .get_mut(..n)
                .ok_or_else(|| io::Error::other("bounce buffer"))?;
            r.read(buf).map_err(io::Error::other)?;
            self.backend.write_at(buf, offset)?;
            offset += n as u64;
            len -= n as u64;
        }
        if self.write_through {
            self.backend.flush()?;
        }
        Ok(())
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            "{NAME}: ignored {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let got = queues.len();
        let Ok([queue]) = <[Queue; 1]>::try_from(queues) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        if !queue.ready() {
            return Err(ActivateError::QueueNotReady(0));
        }
        if !queue.is_valid(&mem) {
            return Err(ActivateError::QueueInvalid(0));
        }
        self.disk.write_through =
            !self.disk.read_only && self.acked_features & VIRTIO_BLK_F_FLUSH == 0;
        self.active = Some(Active {
            mem,
            queue,
            broken: false,
        });
        // Anything the driver queued before DRIVER_OK is served at the next loop turn.
        self.queue_evts[0].write(1)?;
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn interrupt(&self) -> &Arc<IrqTrigger> {
        &self.irq
    }

    fn save_state(&self) -> VirtioDeviceState {
        Persist::save(self)
    }

    fn restore_state(
        &mut self,
        mem: GuestMemoryMmap,
        state: &VirtioDeviceState,
    ) -> Result<(), PersistError> {
        Persist::restore(self, mem, state)
    }
}

/// Snapshot state: acked features, activation with the queue's ring positions, broken flag.
/// The disk itself is the configured file (not part of the snapshot).
impl Persist for Block {
    type State = VirtioDeviceState;
    type Context = GuestMemoryMmap;

    fn save(&self) -> VirtioDeviceState {
        VirtioDeviceState {
            device_type: TYPE_BLOCK,
            acked_features: self.acked_features,
            activated: self.active.is_some(),
            broken: self.is_broken(),
            queues: self
                .active
                .as_ref()
                .map(|a| super::save_queues([&a.queue]))
                .unwrap_or_default(),
            guest_cid: None,
        }
    }

    fn restore(&mut self, mem: GuestMemoryMmap, s: &VirtioDeviceState) -> Result<(), PersistError> {
        if s.acked_features & !self.avail_features != 0 {
            return Err(PersistError::invalid(
                NAME,
                "saved features the device does not offer (read-only disk restored writable?)",
            ));
        }
        self.active = None;
        self.acked_features = s.acked_features;
        if s.activated {
            let queues = super::restore_queues(NAME, s, TYPE_BLOCK, &[QUEUE_SIZE], &mem)?;
            self.activate(mem, queues)
                .map_err(|e| PersistError::invalid(NAME, e.to_string()))?;
            if let Some(a) = self.active.as_mut() {
                a.broken = s.broken;
            }
        }
        Ok(())
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue_evts[0], EventSet::IN)) {
            tracing::error!("{NAME}: cannot register the queue eventfd: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.queue_evts[0].as_raw_fd() {
            drain_evt(&self.queue_evts[0]);
            // Before activation (or after a reset) kicks are drained and ignored.
            self.process_queue();
        } else {
            tracing::warn!(
                "{NAME}: event on unknown fd {}; unregistering it",
                events.fd()
            );
            let _ = ops.remove(events);
        }
    }
}

pub mod chunked;
#[cfg(test)]
mod tests;
