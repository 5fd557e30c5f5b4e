//! virtio devices over the virtio-mmio transport.
//!
//! - [`mmio`]: the virtio-mmio (version 2) register interface, one 4 KiB slot per device. It owns
//!   the driver-facing state (status, feature negotiation, queue configuration) and hands the
//!   configured queues to the device when the driver sets DRIVER_OK.
//! - [`block`]: virtio-blk on a raw file.
//! - [`vsock`]: virtio-vsock, exposed on the host as Firecracker-style hybrid Unix sockets.
//!
//! # Threads and wiring
//! A device lives in an `Arc<Mutex<..>>` shared by the transport (called from vCPU threads on
//! MMIO exits) and the VMM's event loop (the device is an `event_manager::MutEventSubscriber`).
//! Queue notifications reach the device through one eventfd per queue
//! ([`VirtioDevice::queue_events`]) that the VMM registers with KVM as an ioeventfd on the
//! slot's `QueueNotify` register ([`NOTIFY_REG_OFFSET`], datamatch = queue index); a direct
//! write to `QueueNotify` (no ioeventfd) signals the same eventfd. Interrupts go out through one
//! eventfd per device ([`VirtioDevice::interrupt_evt`]) that the VMM registers as an irqfd on
//! the slot's IRQ; [`IrqTrigger`] keeps the `InterruptStatus` bits the guest reads and ACKs.
//!
//! # The guest is an attacker
//! Every descriptor chain is parsed into a bounded list of segments first ([`chain`]): chains
//! longer than a cap, cut short (loops, bad `next` indices, unreadable descriptors, length
//! overflow), with device-readable descriptors after device-writable ones, or pointing outside
//! guest memory are refused before any data moves. Refused requests are completed with an
//! error status where the request format allows it, or returned with a used length of 0. An
//! available ring index that runs more than a queue size ahead, or a used ring that cannot be
//! written, marks the device broken (`DEVICE_NEEDS_RESET` plus a configuration interrupt); the
//! device then ignores the queues until the driver resets it. Nothing a guest writes can make
//! the VMM panic or allocate without a bound.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::memory::GuestMemoryMmap;
use crate::snapshot::persist::{PersistError, QueueSnapshot, VirtioDeviceState};

pub mod block;
pub(crate) mod chain;
pub mod mmio;
pub mod vsock;

#[cfg(test)]
pub(crate) mod test_utils;

pub use mmio::{MmioTransport, NOTIFY_REG_OFFSET};

/// virtio device IDs (virtio 1.2, section 5).
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_VSOCK: u32 = 19;

/// Device-independent feature bits.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// `InterruptStatus` bits.
pub const VIRTIO_MMIO_INT_VRING: u32 = 1;
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 2;

/// Device status bits (virtio 1.2, section 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// The interrupt line of one device, shared by the device (which raises it) and the transport
/// (where the guest reads `InterruptStatus` and writes `InterruptACK`).
///
/// Raising sets a bit in the status and signals the irqfd; the VMM registers
/// [`IrqTrigger::evt`] with KVM as an irqfd on the device's IRQ.
#[derive(Debug)]
pub struct IrqTrigger {
    status: AtomicU32,
    needs_reset: AtomicBool,
    evt: EventFd,
}

impl IrqTrigger {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// The eventfd to register as an irqfd.
    pub fn evt(&self) -> &EventFd {
        &self.evt
    }

    /// The current `InterruptStatus`.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Sets `bits` ([`VIRTIO_MMIO_INT_VRING`] and/or [`VIRTIO_MMIO_INT_CONFIG`]) and signals the
    /// interrupt.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            tracing::warn!("virtio: cannot signal the interrupt eventfd: {e}");
        }
    }

    /// The guest's `InterruptACK`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Marks the device broken: `DEVICE_NEEDS_RESET` shows in the status register and the
    /// driver gets a configuration change interrupt (once).
    pub fn set_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            self.trigger(VIRTIO_MMIO_INT_CONFIG);
        }
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// Sets the saved status and needs-reset flag (snapshot restore), without signalling:
    /// an interrupt that was pending is in the restored irqchip state.
    pub fn restore(&self, status: u32, needs_reset: bool) {
        self.status.store(status, Ordering::SeqCst);
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
    }

    /// Back to the power-on state (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }
}

/// Why a device refused activation. The transport then sets `DEVICE_NEEDS_RESET`.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("expected {expected} queues, got {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("queue {0} is not ready")]
    QueueNotReady(usize),
    #[error("queue {0} is not valid in guest memory")]
    QueueInvalid(usize),
    #[error("the device is already active")]
    AlreadyActive,
    #[error("device I/O: {0}")]
    Io(#[from] io::Error),
}

/// A virtio device behind a transport.
///
/// The transport calls these from vCPU threads; the device's queue processing runs in the event
/// loop (the device is also an `event_manager::MutEventSubscriber`), under the same mutex.
pub trait VirtioDevice: Send {
    /// The virtio device ID ([`TYPE_BLOCK`], [`TYPE_VSOCK`]).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue (their number is the number of queues).
    fn queue_max_sizes(&self) -> &[u16];
    /// The features the device offers.
    fn avail_features(&self) -> u64;
    /// The features the driver accepted (a subset of [`VirtioDevice::avail_features`]).
    fn acked_features(&self) -> u64;
    /// Called by the transport at FEATURES_OK; `features` is already masked with the offer.
    fn set_acked_features(&mut self, features: u64);
    /// Reads the device configuration space; bytes past its end read as zeros.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space (ignored where read-only).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the driver's queues (all of them, in order; the transport has
    /// checked that every ready queue is valid in `mem`).
    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), ActivateError>;
    /// Back to the pre-activation state (the driver wrote 0 to Status).
    fn reset(&mut self);
    fn is_activated(&self) -> bool;
    /// One eventfd per queue, signalled when the driver notifies that queue.
    fn queue_events(&self) -> &[EventFd];
    /// The device's interrupt, shared with its transport.
    fn interrupt(&self) -> &Arc<IrqTrigger>;
    /// The eventfd to register as an irqfd on the device's IRQ.
    fn interrupt_evt(&self) -> &EventFd {
        self.interrupt().evt()
    }
    /// `ConfigGeneration`: changes when the configuration space changes under the driver.
    fn config_generation(&self) -> u32 {
        0
    }
    /// The device's own state for a snapshot (the device's `Persist` impl).
    fn save_state(&self) -> VirtioDeviceState;
    /// Applies a saved state to this freshly built device (activating it on its saved
    /// queues when it was active).
    fn restore_state(
        &mut self,
        mem: GuestMemoryMmap,
        state: &VirtioDeviceState,
    ) -> Result<(), PersistError>;
}

/// The queues of a saved, activated device, checked against the device and guest memory.
pub(crate) fn restore_queues(
    device: &'static str,
    state: &VirtioDeviceState,
    device_type: u32,
    max_sizes: &[u16],
    mem: &GuestMemoryMmap,
) -> Result<Vec<Queue>, PersistError> {
    if state.device_type != device_type {
        return Err(PersistError::invalid(
            device,
            format!(
                "the snapshot has device type {} in this slot, not {device_type}",
                state.device_type
            ),
        ));
    }
    if state.queues.len() != max_sizes.len() {
        return Err(PersistError::invalid(
            device,
            format!(
                "{} saved queues, the device has {}",
                state.queues.len(),
                max_sizes.len()
            ),
        ));
    }
    state
        .queues
        .iter()
        .zip(max_sizes)
        .map(|(q, &max)| q.to_queue(device, max, Some(mem)))
        .collect()
}

/// The saved form of a device's active queues.
pub(crate) fn save_queues<'a>(queues: impl IntoIterator<Item = &'a Queue>) -> Vec<QueueSnapshot> {
    queues.into_iter().map(QueueSnapshot::of).collect()
}

/// Copies `config[offset..]` into `data`, zero-filling whatever lies past the end.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        if let (Some(d), Some(s)) = (data.get_mut(..n), src.get(..n)) {
            d.copy_from_slice(s);
        }
    }
}

/// Logs the first few guest-caused problems of a device at `warn`, the rest at `debug`, so
/// that a guest cannot flood the VMM's log.
#[derive(Debug, Default)]
pub(crate) struct GuestErrorLog {
    count: u32,
}

impl GuestErrorLog {
    const LOUD: u32 = 32;

    pub(crate) fn log(&mut self, device: &str, msg: std::fmt::Arguments<'_>) {
        self.count = self.count.saturating_add(1);
        if self.count <= Self::LOUD {
            tracing::warn!("{device}: {msg}");
            if self.count == Self::LOUD {
                tracing::warn!("{device}: further guest errors are logged at debug level");
            }
        } else {
            tracing::debug!("{device}: {msg}");
        }
    }
}

/// Drains an eventfd (non-blocking); errors (EAGAIN when nothing was pending) do not matter.
pub(crate) fn drain_evt(evt: &EventFd) {
    let _ = evt.read();
}
