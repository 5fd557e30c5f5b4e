//! The Kindling VMM: one microVM per process, on the rust-vmm crates.
//!
//! - [`layout`]: every guest physical address the VMM uses, in one place.
//! - [`memory`]: guest memory (with a dirty bitmap for the VMM's own writes).
//! - [`boot`]: loading Linux and the tables its 64-bit entry needs.
//! - [`cpu`]: vCPU state at boot (CPUID, MSRs, registers, LAPIC).
//! - [`devices`]: the MMIO/PIO buses, legacy devices (serial, i8042, boot timer) and virtio
//!   devices (mmio transport, block, vsock).
//! - [`config`]: the JSON VM configuration.
//! - [`snapshot`]: pause/resume, snapshot state and memory files, restore.
//!
//! The guest is treated as an attacker: nothing it writes into registers, queues or
//! descriptors may panic the VMM or make it allocate without bound.

pub mod boot;
pub mod builder;
pub mod config;
pub mod controller;
pub mod cpu;
pub mod devices;
pub mod host;
pub mod layout;
pub mod memory;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
