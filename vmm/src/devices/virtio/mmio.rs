//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2).
//!
//! One [`MmioTransport`] per device, on a 4 KiB MMIO slot. It implements the control registers
//! (0x000..0x100) and forwards the configuration space (0x100..) to the device.
//!
//! Behaviour towards a misbehaving driver:
//! - Control registers accept only aligned 32-bit accesses; anything else reads as zeros and
//!   is ignored on write. Unknown offsets read as zeros; writes to read-only registers and
//!   reads of write-only ones are ignored (zeros).
//! - Status follows the driver state machine ACKNOWLEDGE -> DRIVER -> FEATURES_OK ->
//!   DRIVER_OK, one step per write; FAILED may be set at any time; writing 0 resets the device.
//!   Any other transition (skipping a step, clearing a bit) is ignored. After FAILED only a
//!   reset is accepted.
//! - DriverFeatures is accepted only between DRIVER and FEATURES_OK and is masked with what the
//!   device offers; FEATURES_OK is refused (stays clear when read back) unless the driver
//!   accepted VIRTIO_F_VERSION_1 (no legacy interface).
//! - Queue registers are accepted only between FEATURES_OK and DRIVER_OK, and the size and
//!   addresses only while the selected queue is not ready. A queue size that is zero, not a
//!   power of two or above QueueNumMax is ignored; misaligned ring addresses are ignored.
//! - At DRIVER_OK every ready queue must lie in guest memory (`Queue::is_valid`); otherwise,
//!   or if the device refuses to activate, the device is marked `DEVICE_NEEDS_RESET` (and a
//!   configuration interrupt is sent); it never panics.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};

use super::{status, IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::devices::{lock, BusDevice};
use crate::memory::GuestMemoryMmap;
use crate::snapshot::persist::{MmioState, Persist, PersistError, QueueSnapshot};

/// Offset of the QueueNotify register, where the VMM puts the queues' ioeventfds.
pub const NOTIFY_REG_OFFSET: u64 = 0x50;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
/// "KNDL".
pub const VENDOR_ID: u32 = 0x4c44_4e4b;

mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// The virtio-mmio register interface of one device.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    irq: Arc<IrqTrigger>,
    device_type: u32,
    avail_features: u64,
    /// The driver's configuration of each queue (handed to the device at DRIVER_OK).
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
}

impl MmioTransport {
    /// A transport for `device`, whose queues live in `mem`.
    pub fn new(mem: GuestMemoryMmap, device: Arc<Mutex<dyn VirtioDevice>>) -> MmioTransport {
        let (irq, device_type, avail_features, queues) = {
            let d = lock(&device);
            let queues = d
                .queue_max_sizes()
                .iter()
                .map(|&max| {
                    Queue::new(max).unwrap_or_else(|e| {
                        // A device bug, not a guest one: the queue reads as absent
                        // (QueueNumMax 0) and activation fails.
                        tracing::error!("virtio-mmio: device queue max size {max}: {e}");
                        Queue::default()
                    })
                })
                .collect();
            (
                d.interrupt().clone(),
                d.device_type(),
                d.avail_features(),
                queues,
            )
        };
        MmioTransport {
            device,
            mem,
            irq,
            device_type,
            avail_features,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
        }
    }

    /// The device behind this transport.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The device status as the driver reads it.
    pub fn device_status(&self) -> u32 {
        let mut s = self.status;
        if self.irq.needs_reset() {
            s |= status::DEVICE_NEEDS_RESET;
        }
        s
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    /// The selected queue, if the driver may configure it now.
    fn configurable_queue(&mut self) -> Option<&mut Queue> {
        let s = self.status;
        let allowed = s & status::FEATURES_OK != 0 && s & (status::DRIVER_OK | status::FAILED) == 0;
        if !allowed {
            tracing::debug!("virtio-mmio: queue register written in status {s:#x}");
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// The selected queue, if its size and addresses may change now (configurable, not ready).
    fn unready_queue(&mut self) -> Option<&mut Queue> {
        self.configurable_queue().filter(|q| !q.ready())
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device_type,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.avail_features as u32,
                1 => (self.avail_features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.irq.status(),
            reg::STATUS => self.device_status(),
            // No shared memory regions: length and base read as all ones ("none").
            reg::SHM_LEN_LOW..=reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => lock(&self.device).config_generation(),
            _ => {
                tracing::debug!("virtio-mmio: read of write-only or unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                let s = self.status;
                if s & status::DRIVER == 0 || s & (status::FEATURES_OK | status::FAILED) != 0 {
                    tracing::debug!("virtio-mmio: DriverFeatures written in status {s:#x}");
                    return;
                }
                let (shift, mask) = match self.driver_features_sel {
                    0 => (0, 0xffff_ffffu64),
                    1 => (32, 0xffff_ffff_0000_0000u64),
                    _ => return,
                };
                let bits = (u64::from(v) << shift) & self.avail_features;
                self.driver_features = (self.driver_features & !mask) | bits;
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(q) = self.unready_queue() {
                    let Ok(size) = u16::try_from(v) else {
                        tracing::debug!("virtio-mmio: queue size {v} refused");
                        return;
                    };
                    if let Err(e) = q.try_set_size(size) {
                        tracing::debug!("virtio-mmio: queue size {v} refused: {e}");
                    }
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.configurable_queue() {
                    q.set_ready(v == 1);
                }
            }
            reg::QUEUE_NOTIFY => {
                // Normally caught by the ioeventfd; a direct write signals the same eventfd.
                let d = lock(&self.device);
                match d.queue_events().get(v as usize) {
                    Some(evt) => {
                        if let Err(e) = evt.write(1) {
                            tracing::warn!("virtio-mmio: cannot signal queue {v}: {e}");
                        }
                    }
                    None => tracing::debug!("virtio-mmio: notify for unknown queue {v}"),
                }
            }
            reg::INTERRUPT_ACK => self.irq.ack(v),
            reg::STATUS => self.set_status(v),
            reg::QUEUE_DESC_LOW => self.with_unready(|q| q.set_desc_table_address(Some(v), None)),
            reg::QUEUE_DESC_HIGH => self.with_unready(|q| q.set_desc_table_address(None, Some(v))),
            reg::QUEUE_DRIVER_LOW => self.with_unready(|q| q.set_avail_ring_address(Some(v), None)),
            reg::QUEUE_DRIVER_HIGH => {
                self.with_unready(|q| q.set_avail_ring_address(None, Some(v)))
            }
            reg::QUEUE_DEVICE_LOW => self.with_unready(|q| q.set_used_ring_address(Some(v), None)),
            reg::QUEUE_DEVICE_HIGH => self.with_unready(|q| q.set_used_ring_address(None, Some(v))),
            reg::SHM_SEL => {}
            _ => tracing::debug!("virtio-mmio: write of read-only or unknown register {offset:#x}"),
        }
    }

    fn with_unready(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.unready_queue() {
            f(q);
        }
    }

    fn set_status(&mut self, v: u32) {
        let v = v & !status::DEVICE_NEEDS_RESET;
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if v == old {
            return;
        }
        if old & status::FAILED != 0 {
            tracing::debug!("virtio-mmio: status {v:#x} after FAILED ignored (reset first)");
            return;
        }
        if old & !v != 0 {
            tracing::debug!("virtio-mmio: status regression {old:#x} -> {v:#x} ignored");
            return;
        }
        let added = v & !old;
        if added & status::FAILED != 0 {
            self.status |= status::FAILED;
            return;
        }
        let expected = match old {
            0 => status::ACKNOWLEDGE,
            s if s == status::ACKNOWLEDGE => status::DRIVER,
            s if s == status::ACKNOWLEDGE | status::DRIVER => status::FEATURES_OK,
            s if s == status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK => {
                status::DRIVER_OK
            }
            _ => 0,
        };
        if added != expected {
            tracing::debug!("virtio-mmio: status transition {old:#x} -> {v:#x} ignored");
            return;
        }
        match added {
            status::FEATURES_OK => {
                if self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                    tracing::warn!("virtio-mmio: driver did not accept VIRTIO_F_VERSION_1; FEATURES_OK refused");
                    return;
                }
                lock(&self.device).set_acked_features(self.driver_features);
                self.status = v;
            }
            status::DRIVER_OK => {
                self.status = v;
                self.activate();
            }
            _ => self.status = v,
        }
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                tracing::warn!(
                    "virtio-mmio: queue {i} does not fit in guest memory; device needs reset"
                );
                self.irq.set_needs_reset();
                return;
            }
            match Queue::try_from(q.state()) {
                Ok(mut dq) => {
                    dq.set_event_idx(event_idx);
                    queues.push(dq);
                }
                Err(e) => {
                    tracing::warn!("virtio-mmio: queue {i}: {e}; device needs reset");
                    self.irq.set_needs_reset();
                    return;
                }
            }
        }
        let mut d = lock(&self.device);
        if d.is_activated() {
            tracing::warn!("virtio-mmio: DRIVER_OK on an active device; device needs reset");
            self.irq.set_needs_reset();
            return;
        }
        if let Err(e) = d.activate(self.mem.clone(), queues) {
            tracing::warn!(
                "virtio-mmio: device type {} activation failed: {e}; device needs reset",
                self.device_type
            );
            self.irq.set_needs_reset();
        }
    }

    fn reset(&mut self) {
        {
            let mut d = lock(&self.device);
            if d.is_activated() {
                d.reset();
            }
            d.set_acked_features(0);
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.irq.clear();
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
    }
}

impl Persist for MmioTransport {
    type State = MmioState;
    type Context = ();

    fn save(&self) -> MmioState {
        MmioState {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.irq.status(),
            needs_reset: self.irq.needs_reset(),
            queues: self.queues.iter().map(QueueSnapshot::of).collect(),
            device: lock(&self.device).save_state(),
        }
    }

    /// Applies the registers, then the device's state (which activates it on its saved
    /// queues when it was active). Everything is checked: the state comes from a file.
    fn restore(&mut self, _: (), s: &MmioState) -> Result<(), PersistError> {
        const NAME: &str = "virtio-mmio";
        if s.device.device_type != self.device_type {
            return Err(PersistError::invalid(
                NAME,
                format!(
                    "the snapshot has device type {} in this slot, the configuration {}",
                    s.device.device_type, self.device_type
                ),
            ));
        }
        if s.queues.len() != self.queues.len() {
            return Err(PersistError::invalid(
                NAME,
                format!(
                    "{} saved queues, the device has {}",
                    s.queues.len(),
                    self.queues.len()
                ),
            ));
        }
        let queues = s
            .queues
            .iter()
            .zip(&self.queues)
            .map(|(q, cur)| q.to_queue(NAME, cur.max_size(), None))
            .collect::<Result<Vec<_>, _>>()?;
        if s.driver_features & !self.avail_features != 0 {
            return Err(PersistError::invalid(
                NAME,
                "the saved driver features are not all offered by the device",
            ));
        }
        lock(&self.device).restore_state(self.mem.clone(), &s.device)?;
        self.queues = queues;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.status = s.status;
        self.irq.restore(s.interrupt_status, s.needs_reset);
        Ok(())
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            lock(&self.device).read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || offset & 3 != 0 {
            tracing::debug!(
                "virtio-mmio: {}-byte read at {offset:#x} ignored",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            lock(&self.device).write_config(offset - reg::CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        if offset & 3 != 0 {
            tracing::debug!("virtio-mmio: misaligned write at {offset:#x} ignored");
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests;
