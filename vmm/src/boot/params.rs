//! The zero page (`boot_params`): setup header, command line pointer, initrd and the e820 map.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};

use super::BootError;
use crate::layout::*;
use crate::memory::{GuestAddress, GuestMemoryMmap};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

/// An initrd placed in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct InitrdPlacement {
    pub addr: u64,
    pub size: u64,
}

/// The e820 map for `mem_size` bytes of RAM laid out around the MMIO gap.
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    let low_end = mem_size.min(MMIO_GAP_START);
    if low_end > HIMEM_START {
        map.push((HIMEM_START, low_end - HIMEM_START, E820_RAM));
    }
    if mem_size > MMIO_GAP_START {
        map.push((MMIO_GAP_END, mem_size - MMIO_GAP_START, E820_RAM));
    }
    map
}

/// Writes the zero page.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    loader_header: Option<setup_header>,
    cmdline_size: usize,
    initrd: Option<InitrdPlacement>,
    mem_size: u64,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = loader_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    if let Some(i) = initrd {
        params.hdr.ramdisk_image = i.addr as u32;
        params.hdr.ramdisk_size = i.size as u32;
    }
    let map = e820_map(mem_size);
    if map.len() > params.e820_table.len() {
        return Err(BootError::E820);
    }
    for (i, (addr, size, type_)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::ZeroPage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_skips_the_mmio_gap() {
        let small = e820_map(128 << 20);
        assert_eq!(
            small.last().unwrap(),
            &(HIMEM_START, (128 << 20) - HIMEM_START, E820_RAM)
        );
        let big = e820_map(4 << 30);
        assert_eq!(
            big[2],
            (HIMEM_START, MMIO_GAP_START - HIMEM_START, E820_RAM)
        );
        assert_eq!(
            big[3],
            (MMIO_GAP_END, (4u64 << 30) - MMIO_GAP_START, E820_RAM)
        );
        let total: u64 = big.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(total, (4u64 << 30) - HIMEM_START + EBDA_START);
    }
}
