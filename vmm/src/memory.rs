//! Guest memory.
//!
//! Regions carry an atomic dirty bitmap so that the VMM's own writes into guest memory
//! (devices filling buffers) are tracked for diff snapshots alongside KVM's dirty log.

use vm_memory::bitmap::AtomicBitmap;

/// The guest memory type used throughout the VMM.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// One region of it.
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;

pub use vm_memory::{Address, Bytes, GuestAddress};
