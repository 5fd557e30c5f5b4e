//! vCPU state at boot: CPUID, MSRs, registers, FPU and LAPIC.

pub mod cpuid;
pub mod msrs;
pub mod regs;
