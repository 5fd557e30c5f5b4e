//! Boot MSRs: SYSCALL/SYSENTER cleared, TSC at zero, fast strings on, MTRRs enabled with
//! write-back as the default memory type.

use kvm_bindings::{kvm_msr_entry, Msrs};

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 6;

pub fn boot_msrs() -> Result<Msrs, vmm_sys_util::fam::Error> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ];
    Msrs::from_entries(&entries)
}

/// The TSC-deadline timer's MSR (Intel SDM vol. 3, "TSC-Deadline Mode").
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Orders and fixes saved MSRs for KVM_SET_MSRS on restore:
/// - the TSC before the TSC deadline, because KVM turns a written deadline into a timer
///   relative to the guest TSC it has at that moment;
/// - a deadline of 0 (no timer armed at save time: the timer had fired and its interrupt was
///   still in flight or being handled) becomes the saved TSC, so the timer fires at once after
///   restore. Otherwise a guest whose clockevent believes a timer is armed waits for an
///   interrupt that never comes and all its timers stop.
pub fn order_for_restore(msrs: &[kvm_msr_entry]) -> Vec<kvm_msr_entry> {
    let tsc = msrs
        .iter()
        .find(|m| m.index == MSR_IA32_TSC)
        .map(|m| m.data);
    let (mut deadline, mut rest): (Vec<_>, Vec<_>) = msrs
        .iter()
        .copied()
        .partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
    for d in &mut deadline {
        if d.data == 0 {
            if let Some(t) = tsc {
                d.data = t;
            }
        }
    }
    rest.extend(deadline);
    rest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(index: u32, data: u64) -> kvm_msr_entry {
        kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }
    }

    #[test]
    fn the_deadline_follows_the_tsc_and_a_zero_deadline_fires_at_once() {
        let saved = [
            e(MSR_IA32_TSC_DEADLINE, 0),
            e(0x1a0, 1),
            e(MSR_IA32_TSC, 5000),
        ];
        let out = order_for_restore(&saved);
        let idx: Vec<u32> = out.iter().map(|m| m.index).collect();
        assert_eq!(idx, vec![0x1a0, MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE]);
        assert_eq!(out[2].data, 5000);
        // An armed deadline is kept as it was.
        let out = order_for_restore(&[e(MSR_IA32_TSC_DEADLINE, 9000), e(MSR_IA32_TSC, 5000)]);
        assert_eq!(out[1].data, 9000);
    }
}
