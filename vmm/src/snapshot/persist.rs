//! The [`Persist`] trait devices implement for snapshots, and the device state types.
//!
//! A restored VM is built by the same builder as a booted one, so every device already exists
//! (from the configuration) when its state is applied: `restore` updates a live device in
//! place rather than constructing one.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use crate::memory::GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{device}: {msg}")]
    Invalid { device: &'static str, msg: String },
}

impl PersistError {
    pub fn invalid(device: &'static str, msg: impl Into<String>) -> Self {
        PersistError::Invalid {
            device,
            msg: msg.into(),
        }
    }
}

/// Saving a device's state, and applying a saved state to a freshly built device.
pub trait Persist {
    /// The serialisable state.
    type State: Serialize + DeserializeOwned;
    /// What `restore` needs besides the state (guest memory for virtio devices).
    type Context;
    fn save(&self) -> Self::State;
    fn restore(&mut self, ctx: Self::Context, state: &Self::State) -> Result<(), PersistError>;
}

/// Every device's state, in the builder's device order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevicesState {
    pub serial: SerialState,
    pub i8042: I8042State,
    /// One per virtio-mmio slot (block devices first, then vsock), as the builder attaches them.
    pub virtio: Vec<MmioState>,
}

/// The 8250's registers (vm-superio's `SerialState`, which is not serde).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialState {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialState> for vm_superio::serial::SerialState {
    fn from(s: &SerialState) -> Self {
        vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    pub reset_requested: bool,
}

/// One virtqueue (virtio-queue's `QueueState`, which is not serde).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl QueueSnapshot {
    pub fn of(q: &Queue) -> Self {
        q.state().into()
    }

    /// A queue from a saved state; the state comes from a file, so it is validated
    /// (virtio-queue checks size and alignment) and, when `mem` is given, must fit in it.
    pub fn to_queue(
        self,
        device: &'static str,
        max_size: u16,
        mem: Option<&GuestMemoryMmap>,
    ) -> Result<Queue, PersistError> {
        if self.max_size != max_size {
            return Err(PersistError::invalid(
                device,
                format!(
                    "queue max size {} (the device has {max_size})",
                    self.max_size
                ),
            ));
        }
        let state = QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        };
        let q = Queue::try_from(state)
            .map_err(|e| PersistError::invalid(device, format!("queue state: {e}")))?;
        if let Some(mem) = mem {
            if q.ready() && !q.is_valid(mem) {
                return Err(PersistError::invalid(
                    device,
                    "a saved queue does not fit in guest memory",
                ));
            }
        }
        Ok(q)
    }
}

/// A virtio device's own state (what the transport does not hold).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioDeviceState {
    pub device_type: u32,
    pub acked_features: u64,
    /// Activated by the driver (DRIVER_OK); the queues below are then the device's copies,
    /// with its ring positions.
    pub activated: bool,
    /// Gave up on its queues until a reset.
    pub broken: bool,
    pub queues: Vec<QueueSnapshot>,
    /// vsock: the guest CID (checked against the configuration on restore).
    #[serde(default)]
    pub guest_cid: Option<u64>,
}

/// The virtio-mmio transport's registers, plus its device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub interrupt_status: u32,
    pub needs_reset: bool,
    /// The driver's queue configuration as the transport holds it.
    pub queues: Vec<QueueSnapshot>,
    pub device: VirtioDeviceState,
}
