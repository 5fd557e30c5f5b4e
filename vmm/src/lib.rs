//! The Kindling VMM: one microVM per process, on the rust-vmm crates.
//!
//! - [`layout`]: every guest physical address the VMM uses, in one place.
//! - [`memory`]: guest memory (with a dirty bitmap for the VMM's own writes).
//! - [`devices`]: the MMIO/PIO buses, legacy devices (serial, i8042, boot timer) and virtio
//!   devices (mmio transport, block, vsock).
//!
//! The guest is treated as an attacker: nothing it writes into registers, queues or
//! descriptors may panic the VMM or make it allocate without bound.

pub mod config;
pub mod devices;
pub mod layout;
pub mod memory;
