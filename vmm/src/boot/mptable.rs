//! The Intel MultiProcessor table (MP spec 1.4): without ACPI it is how Linux learns about
//! more than one CPU, the I/O APIC and the legacy IRQ routing.

use super::BootError;
use crate::layout::{IRQ_MAX, MPTABLE_START};
use crate::memory::{Bytes, GuestAddress, GuestMemoryMmap};

const APIC_DEFAULT_BASE: u32 = 0xfee0_0000;
const IOAPIC_DEFAULT_BASE: u32 = 0xfec0_0000;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
/// The table lives in the 1 KiB below 640 KiB.
const MPTABLE_MAX_SIZE: usize = 0xa0000 - MPTABLE_START as usize;

/// Most vCPUs the table has room for.
pub const MAX_CPUS: u8 = 32;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// The table's bytes for `num_cpus` CPUs, to be placed at [`MPTABLE_START`].
pub fn build(num_cpus: u8) -> Result<Vec<u8>, BootError> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(BootError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus + 1;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        // Processor entry (20 bytes).
        entries.push(0);
        entries.push(cpu);
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 });
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    // Bus entry: bus 0 is ISA.
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    // I/O APIC entry.
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_DEFAULT_BASE.to_le_bytes());
    count += 1;
    // I/O interrupt entries: ISA IRQ n -> I/O APIC pin n.
    for irq in 0..=IRQ_MAX as u8 {
        entries.extend_from_slice(&[3, MP_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: ExtINT on LINT0, NMI on LINT1, for every LAPIC.
    entries.extend_from_slice(&[4, MP_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, MP_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let header_len = 44usize;
    let table_len = header_len + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"KINDLING");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_DEFAULT_BASE.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended checksum
    table.push(0); // reserved
    debug_assert_eq!(table.len(), header_len);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let table_addr = MPTABLE_START as u32 + 16;
    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&table_addr.to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(4); // spec revision
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0; 5]); // features: a configuration table is present
    fp[10] = checksum(&fp);

    let mut out = fp;
    out.extend_from_slice(&table);
    if out.len() > MPTABLE_MAX_SIZE {
        return Err(BootError::TooManyCpus(num_cpus));
    }
    Ok(out)
}

/// Writes the MP table for `num_cpus` into guest memory.
pub fn setup(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), BootError> {
    let bytes = build(num_cpus)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(|_| BootError::MpTable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts_are_right() {
        for n in [1u8, 2, MAX_CPUS] {
            let t = build(n).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            let table = &t[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            let count = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(count as usize, n as usize + 2 + 24 + 2);
            assert!(t.len() <= MPTABLE_MAX_SIZE);
        }
        assert!(build(0).is_err());
        assert!(build(MAX_CPUS + 1).is_err());
    }
}
