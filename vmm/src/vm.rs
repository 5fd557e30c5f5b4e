//! The KVM VM: guest memory registered with KVM, the in-kernel irqchip and PIT.

use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, kvm_userspace_memory_region, KVM_CLOCK_REALTIME,
    KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS, MMIO_GAP_END, MMIO_GAP_START};
use crate::memory::{GuestAddress, GuestMemoryMmap};
use crate::snapshot::VmState;

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
    #[error("saving the VM state ({what}): {source}")]
    Save {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("restoring the VM state ({what}): {source}")]
    Restore {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("invalid VM state in the snapshot: {0}")]
    BadState(String),
    #[error("this host's KVM lacks what snapshots need: {0}")]
    MissingCapability(String),
    #[error("reading the KVM dirty log of memory slot {slot}: {source}")]
    DirtyLog {
        slot: u32,
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
    create_vm_with(kvm, mem, false)
}

/// Creates a VM with `mem` registered, with KVM dirty page logging when `track_dirty`.
pub fn create_vm_with(
    kvm: &Kvm,
    mem: &GuestMemoryMmap,
    track_dirty: bool,
) -> Result<VmFd, VmError> {
    let vm = kvm.create_vm().map_err(VmError::CreateVm)?;
    register_memory(&vm, mem, track_dirty)?;
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

fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap, track_dirty: bool) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| VmError::Memory(0, e.to_string()))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if track_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
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

/// Checks that KVM has what saving and restoring VM and vCPU state needs.
pub fn check_snapshot_caps(vm: &VmFd) -> Result<(), VmError> {
    let needed = [
        (Cap::Irqchip, "IRQCHIP"),
        (Cap::Pit2, "PIT2"),
        (Cap::AdjustClock, "ADJUST_CLOCK"),
        (Cap::VcpuEvents, "VCPU_EVENTS"),
        (Cap::Debugregs, "DEBUGREGS"),
        (Cap::Xsave, "XSAVE"),
        (Cap::Xcrs, "XCRS"),
        (Cap::MpState, "MP_STATE"),
        (Cap::ImmediateExit, "IMMEDIATE_EXIT"),
    ];
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(c, _)| !vm.check_extension(*c))
        .map(|(_, n)| *n)
        .collect();
    if !missing.is_empty() {
        return Err(VmError::MissingCapability(format!(
            "KVM_CAP_{}",
            missing.join(", KVM_CAP_")
        )));
    }
    // KVM_GET_XSAVE returns the legacy 4 KiB area; a larger one (AMX) would be cut short.
    let xsave2 = vm.check_extension_int(Cap::Xsave2);
    if xsave2 > 4096 {
        return Err(VmError::MissingCapability(format!(
            "the host's XSAVE area is {xsave2} bytes; only the 4096-byte KVM_GET_XSAVE area \
             is saved"
        )));
    }
    Ok(())
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, VmError> {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c).map_err(|source| VmError::Save {
        what: "irqchip",
        source,
    })?;
    Ok(c)
}

/// Reads the VM-wide state (the vCPUs must be paused).
pub fn save_state(vm: &VmFd) -> Result<VmState, VmError> {
    let save = |what| move |source| VmError::Save { what, source };
    let mut clock = vm.get_clock().map_err(save("clock"))?;
    // TSC_STABLE is informational and refused by KVM_SET_CLOCK on some kernels.
    clock.flags &= !KVM_CLOCK_TSC_STABLE;
    Ok(VmState {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(save("PIT"))?,
        clock,
    })
}

/// Applies a saved VM-wide state to a fresh VM (irqchip and PIT created).
///
/// The KVM clock: when the snapshot recorded host real time with it (KVM_CLOCK_REALTIME),
/// KVM advances the guest's clock by the real time elapsed since the snapshot, so a
/// kvmclock guest's time is right after restore; otherwise it continues from the saved value.
pub fn restore_state(vm: &VmFd, s: &VmState) -> Result<(), VmError> {
    let restore = |what| move |source| VmError::Restore { what, source };
    let chips = [
        (KVM_IRQCHIP_PIC_MASTER, &s.pic_master),
        (KVM_IRQCHIP_PIC_SLAVE, &s.pic_slave),
        (KVM_IRQCHIP_IOAPIC, &s.ioapic),
    ];
    for (id, chip) in chips {
        if chip.chip_id != id {
            return Err(VmError::BadState(format!(
                "snapshot irqchip {} where chip {id} was expected",
                chip.chip_id
            )));
        }
        vm.set_irqchip(chip).map_err(restore("irqchip"))?;
    }
    vm.set_pit2(&s.pit).map_err(restore("PIT"))?;
    let mut clock = s.clock;
    let supported = vm.check_extension_int(Cap::AdjustClock) as u32;
    if clock.flags & KVM_CLOCK_REALTIME != 0 && supported & KVM_CLOCK_REALTIME == 0 {
        clock.flags &= !KVM_CLOCK_REALTIME;
    }
    if clock.flags & KVM_CLOCK_REALTIME != 0 {
        tracing::info!("guest clock advanced by the real time since the snapshot");
    } else {
        tracing::info!("guest clock continues from the snapshot (no KVM_CLOCK_REALTIME)");
    }
    vm.set_clock(&clock).map_err(restore("clock"))
}

/// KVM's dirty page log for each memory slot (read-and-clear), as bitmaps of u64 words.
pub fn take_kvm_dirty(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<Vec<Vec<u64>>, VmError> {
    mem.iter()
        .enumerate()
        .map(|(slot, r)| {
            vm.get_dirty_log(slot as u32, r.len() as usize)
                .map_err(|source| VmError::DirtyLog {
                    slot: slot as u32,
                    source,
                })
        })
        .collect()
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
