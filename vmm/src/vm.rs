//! The KVM VM: guest memory registered with KVM, the in-kernel irqchip and PIT.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS, MMIO_GAP_END, MMIO_GAP_START};
use crate::memory::{GuestAddress, GuestMemoryMmap};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}")]
    Kvm(kvm_ioctls::Error),
    #[error("KVM API version {0} (12 is required)")]
    ApiVersion(i32),
    #[error("KVM_CREATE_VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("guest memory of {0} MiB: {1}")]
    Memory(u32, String),
    #[error("registering guest memory with KVM: {0}")]
    SetMemory(kvm_ioctls::Error),
    #[error("setting up the VM ({what}): {source}")]
    Setup {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

/// Guest RAM ranges for `mem_size` bytes: below the MMIO gap, and the rest above 4 GiB.
pub fn memory_ranges(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    let low = mem_size.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if mem_size > MMIO_GAP_START {
        ranges.push((
            GuestAddress(MMIO_GAP_END),
            (mem_size - MMIO_GAP_START) as usize,
        ));
    }
    ranges
}

/// Anonymous guest memory of `mem_mib` MiB.
pub fn create_memory(mem_mib: u32) -> Result<GuestMemoryMmap, VmError> {
    if mem_mib < 16 {
        return Err(VmError::Memory(mem_mib, "at least 16 MiB is needed".into()));
    }
    GuestMemoryMmap::from_ranges(&memory_ranges(u64::from(mem_mib) << 20))
        .map_err(|e| VmError::Memory(mem_mib, e.to_string()))
}

/// Opens /dev/kvm and checks the API version.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(VmError::Kvm)?;
    let v = kvm.get_api_version();
    if v != 12 {
        return Err(VmError::ApiVersion(v));
    }
    Ok(kvm)
}

/// Creates a VM with `mem` registered.
pub fn create_vm(kvm: &Kvm, mem: &GuestMemoryMmap) -> Result<VmFd, VmError> {
    let vm = kvm.create_vm().map_err(VmError::CreateVm)?;
    register_memory(&vm, mem)?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(|source| VmError::Setup {
            what: "TSS address",
            source,
        })?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(|source| VmError::Setup {
            what: "identity map address",
            source,
        })?;
    Ok(vm)
}

/// Adds the in-kernel PIC/IOAPIC/LAPIC and the PIT (speaker port ignored).
pub fn create_irqchip_and_pit(vm: &VmFd) -> Result<(), VmError> {
    vm.create_irq_chip().map_err(|source| VmError::Setup {
        what: "irqchip",
        source,
    })?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(|source| VmError::Setup {
        what: "PIT",
        source,
    })
}

fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| VmError::Memory(0, e.to_string()))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which outlives the VM (the
        // builder keeps both in the same `Vmm`); KVM only accesses it through this slot.
        unsafe { vm.set_user_memory_region(r) }.map_err(VmError::SetMemory)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_around_the_gap() {
        assert_eq!(memory_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
        let r = memory_ranges(5 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(r[1], (GuestAddress(MMIO_GAP_END), (2usize << 30)));
    }
}
