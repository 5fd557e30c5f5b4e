//! The CPUID a vCPU sees: KVM's supported list, with the topology made to match the VM and
//! the hypervisor bit set.
//!
//! On an emulating host (see `crate::host`) the guest kernel's CPUID returns the host's values
//! whatever we set here, so features are hidden on the kernel command line instead.

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_AMD_EXT_APIC: u32 = 0x8000_001e;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Adjusts `cpuid` (KVM's supported list) for vCPU `id` of `count`.
pub fn for_vcpu(mut cpuid: CpuId, id: u8, count: u8) -> CpuId {
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                // EBX: initial APIC id in 31:24, logical processor count in 23:16.
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_EXT_TOPOLOGY => {
                // Every subleaf reports this vCPU's x2APIC id.
                e.edx = u32::from(id);
            }
            LEAF_AMD_EXT_APIC => {
                e.eax = u32::from(id);
            }
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn apic_ids_and_hypervisor_bit() {
        let entries = [
            kvm_cpuid_entry2 {
                function: LEAF_FEATURES,
                ebx: 0xffff_ffff,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: LEAF_EXT_TOPOLOGY,
                index: 1,
                ..Default::default()
            },
        ];
        let c = CpuId::from_entries(&entries).unwrap();
        let c = for_vcpu(c, 3, 4);
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0xffff);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_eq!(e[1].edx, 3);
    }
}
