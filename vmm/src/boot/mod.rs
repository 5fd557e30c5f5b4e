//! Booting Linux: loading `vmlinux` (ELF) and an initrd, the command line, the zero page, the
//! MP table, and the boot GDT and identity page tables the 64-bit entry expects.

pub mod gdt;
pub mod mptable;
pub mod params;

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{elf::Elf, load_cmdline, KernelLoader};

use crate::layout::*;
use crate::memory::{Bytes, GuestAddress, GuestMemoryMmap};
pub use params::InitrdPlacement;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot load the kernel (an uncompressed ELF vmlinux is needed): {0}")]
    Kernel(linux_loader::loader::Error),
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("the initrd ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooLarge { size: u64 },
    #[error("cannot write the initrd into guest memory")]
    Initrd,
    #[error("writing the zero page: {0}")]
    ZeroPage(linux_loader::configurator::Error),
    #[error("too many e820 entries")]
    E820,
    #[error("{0} vCPUs: the MP table holds 1 to {max}", max = mptable::MAX_CPUS)]
    TooManyCpus(u8),
    #[error("cannot write the MP table into guest memory")]
    MpTable,
    #[error("cannot write the boot page tables or GDT into guest memory")]
    BootTables,
}

/// Where the kernel landed.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// The 64-bit entry point.
    pub entry: u64,
    /// First byte after the kernel image.
    pub end: u64,
}

/// Loads an ELF `vmlinux` at its physical addresses (at or above 1 MiB).
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
) -> Result<
    (
        LoadedKernel,
        Option<linux_loader::loader::bootparam::setup_header>,
    ),
    BootError,
> {
    let mut f = File::open(path).map_err(|source| BootError::Open {
        path: path.display().to_string(),
        source,
    })?;
    let r =
        Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(BootError::Kernel)?;
    Ok((
        LoadedKernel {
            entry: r.kernel_load.0,
            end: r.kernel_end,
        },
        r.setup_header,
    ))
}

/// Places an initrd at the top of low RAM, page-aligned, above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    mem_size: u64,
    kernel_end: u64,
) -> Result<InitrdPlacement, BootError> {
    let data = std::fs::read(path).map_err(|source| BootError::Open {
        path: path.display().to_string(),
        source,
    })?;
    let size = data.len() as u64;
    let top = mem_size.min(MMIO_GAP_START);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end)
        .ok_or(BootError::InitrdTooLarge { size })?;
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(|_| BootError::Initrd)?;
    Ok(InitrdPlacement { addr, size })
}

/// Writes the command line at [`CMDLINE_START`]; returns its length.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<usize, BootError> {
    let mut c = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    c.insert_str(cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &c)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    Ok(cmdline.len() + 1)
}

/// Writes the boot GDT, an empty IDT, and page tables identity-mapping the first 1 GiB with
/// 2 MiB pages.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|_| BootError::BootTables)
    };
    for (i, entry) in gdt::BOOT_GDT.iter().enumerate() {
        w(*entry, BOOT_GDT_START + i as u64 * 8)?;
    }
    w(0, BOOT_IDT_START)?;
    w(PDPTE_START | 0x03, PML4_START)?;
    w(PDE_START | 0x03, PDPTE_START)?;
    for i in 0..512u64 {
        // Present, writable, 2 MiB page.
        w((i << 21) | 0x83, PDE_START + i * 8)?;
    }
    Ok(())
}
