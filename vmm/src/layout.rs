//! Guest physical memory layout (x86_64), after Firecracker's conventions so that users
//! and tools that know those find the same addresses here.

/// GDT, then IDT (boot-time, 64-bit).
pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
/// The zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the first 1 GiB (2 MiB pages).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line and its maximum length (with the NUL).
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// MP table (end of conventional RAM below 640 KiB).
pub const MPTABLE_START: u64 = 0x9fc00;
/// Start of the legacy hole (EBDA, VGA, BIOS): RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// Where high memory (and the kernel) starts.
pub const HIMEM_START: u64 = 0x10_0000;

/// The 32-bit MMIO window: 3 GiB .. 4 GiB. Guest RAM never overlaps it.
pub const MMIO_GAP_START: u64 = 0xC000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
pub const MMIO_GAP_SIZE: u64 = MMIO_GAP_END - MMIO_GAP_START;
/// The boot timer: the guest's init writes [`BOOT_TIMER_MAGIC`] here when it starts.
pub const BOOT_TIMER_ADDR: u64 = MMIO_GAP_START;
pub const BOOT_TIMER_SIZE: u64 = 0x1000;
pub const BOOT_TIMER_MAGIC: u8 = 123;
/// virtio-mmio slots, 4 KiB each, after the boot timer.
pub const VIRTIO_MMIO_START: u64 = BOOT_TIMER_ADDR + BOOT_TIMER_SIZE;
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x1000;
/// At most this many virtio-mmio devices (one legacy IRQ each).
pub const VIRTIO_MMIO_MAX_DEVICES: u64 = (IRQ_MAX - IRQ_VIRTIO_FIRST + 1) as u64;

/// TSS for KVM_SET_TSS_ADDR (three pages, inside the MMIO gap's top).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// Identity map page for KVM_SET_IDENTITY_MAP_ADDR, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Legacy I/O ports and IRQs.
pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_PORT_LEN: u16 = 8;
pub const SERIAL_IRQ: u32 = 4;
pub const I8042_PORT: u16 = 0x60;
pub const I8042_PORT_LEN: u16 = 5;
/// First and last legacy IRQ handed to virtio devices.
pub const IRQ_VIRTIO_FIRST: u32 = 5;
pub const IRQ_MAX: u32 = 23;

/// The MMIO address and IRQ of virtio-mmio slot `index`.
pub fn virtio_mmio_slot(index: u64) -> Option<(u64, u32)> {
    if index >= VIRTIO_MMIO_MAX_DEVICES {
        return None;
    }
    Some((
        VIRTIO_MMIO_START + index * VIRTIO_MMIO_SLOT_SIZE,
        IRQ_VIRTIO_FIRST + index as u32,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_stay_in_the_mmio_gap_and_irq_range() {
        let mut n = 0;
        while let Some((addr, irq)) = virtio_mmio_slot(n) {
            assert!(
                addr >= MMIO_GAP_START && addr + VIRTIO_MMIO_SLOT_SIZE <= KVM_IDENTITY_MAP_ADDRESS
            );
            assert!((IRQ_VIRTIO_FIRST..=IRQ_MAX).contains(&irq));
            n += 1;
        }
        assert_eq!(n, 19);
    }
}
