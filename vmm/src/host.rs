//! What kind of KVM this host has: one that runs guest kernel code in hardware, or one that
//! emulates it (nested "PVM" hosts like our development machines, ~1000x slower in ring 0 and
//! unable to run some instructions there). Detected by timing a short ring-0 loop in a
//! throwaway VM, with `/sys/module/kvm_pvm` as a hint. The guest command line is chosen to match.

use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VcpuExit};
use serde::Serialize;

use crate::boot::write_boot_tables;
use crate::cpu::regs::{boot_regs, boot_sregs};
use crate::memory::{Bytes, GuestAddress, GuestMemoryMmap};
use crate::vm::{create_vm, VmError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KvmKind {
    /// Guest kernel code runs natively.
    Hardware,
    /// Guest kernel code is emulated instruction by instruction.
    Emulated,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostKvm {
    pub kind: KvmKind,
    /// Measured cost of one guest ring-0 instruction.
    pub ring0_ns_per_instruction: f64,
    /// `/sys/module/kvm_pvm` exists.
    pub pvm_module: bool,
    /// The host TSC frequency KVM reports (kHz), when it does.
    pub tsc_khz: Option<u32>,
}

/// Whether `/dev/kvm` can be opened for reading and writing (what the VMM needs).
pub fn kvm_usable() -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
}

const PROBE_ITERATIONS: u32 = 2_000;
/// Instructions the probe loop executes (a `dec` and a `jnz` per iteration).
const PROBE_INSTRUCTIONS: u32 = PROBE_ITERATIONS * 2;
/// Above this per-instruction cost the host is emulating (native ~1 ns plus the VM entry and
/// exit spread over the loop, emulated ~600 ns).
const EMULATED_THRESHOLD_NS: f64 = 50.0;
const PROBE_CODE_ADDR: u64 = 0x1000;
const PROBE_PORT: u16 = 0x80;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("probe VM: {0}")]
    Kvm(#[from] kvm_ioctls::Error),
    #[error("probe VM: {0}")]
    Memory(String),
    #[error("probe VM stopped unexpectedly: {0}")]
    UnexpectedExit(String),
    #[error("probe VM did not finish")]
    Timeout,
}

/// Runs the probe: about 3 ms on an emulating host, microseconds on hardware KVM (it runs at
/// every VMM start, so it is kept short).
pub fn detect(kvm: &Kvm) -> Result<HostKvm, ProbeError> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)])
        .map_err(|e| ProbeError::Memory(e.to_string()))?;
    write_boot_tables(&mem).map_err(|e| ProbeError::Memory(e.to_string()))?;
    // mov ecx, N; 1: dec ecx; jnz 1b; out 0x80, al
    let n = PROBE_ITERATIONS.to_le_bytes();
    let code = [
        0xb9,
        n[0],
        n[1],
        n[2],
        n[3],
        0xff,
        0xc9,
        0x75,
        0xfc,
        0xe6,
        PROBE_PORT as u8,
    ];
    mem.write_slice(&code, GuestAddress(PROBE_CODE_ADDR))
        .map_err(|e| ProbeError::Memory(e.to_string()))?;

    let vm = create_vm(kvm, &mem)?;
    let mut vcpu = vm.create_vcpu(0)?;
    let cpuid = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)?;
    vcpu.set_cpuid2(&cpuid)?;
    let sregs = boot_sregs(vcpu.get_sregs()?);
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&boot_regs(PROBE_CODE_ADDR))?;
    let tsc_khz = vcpu.get_tsc_khz().ok();

    let start = Instant::now();
    // A handful of unrelated exits (none expected) are tolerated before giving up.
    for _ in 0..16 {
        match vcpu.run()? {
            VcpuExit::IoOut(PROBE_PORT, _) => {
                let elapsed = start.elapsed();
                return Ok(classify(elapsed, tsc_khz));
            }
            VcpuExit::IoOut(..) | VcpuExit::IoIn(..) | VcpuExit::Intr => {}
            other => return Err(ProbeError::UnexpectedExit(format!("{other:?}"))),
        }
        if start.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    Err(ProbeError::Timeout)
}

fn classify(elapsed: Duration, tsc_khz: Option<u32>) -> HostKvm {
    let ns = elapsed.as_nanos() as f64 / f64::from(PROBE_INSTRUCTIONS);
    HostKvm {
        kind: if ns > EMULATED_THRESHOLD_NS {
            KvmKind::Emulated
        } else {
            KvmKind::Hardware
        },
        ring0_ns_per_instruction: ns,
        pvm_module: std::path::Path::new("/sys/module/kvm_pvm").exists(),
        tsc_khz,
    }
}

impl HostKvm {
    /// Kernel command-line switches for this host. On an emulating host: hide the CPU features
    /// its emulator cannot run in ring 0 and skip calibrations that cost seconds there
    /// (`dev-kvm.md`). On hardware KVM: nothing, as these would only cost performance.
    /// `base` is the rest of the command line: a console verbosity it sets (`loglevel=`,
    /// `quiet`, `debug`) is left alone.
    pub fn guest_cmdline_extra(&self, base: &str) -> String {
        match self.kind {
            KvmKind::Hardware => String::new(),
            KvmKind::Emulated => {
                let mut s = String::from(
                    "noxsave nofsgsbase nopku \
                     clearcpuid=smap,smep,pcid,invpcid,rdrand,rdseed,popcnt,rdpid,umip,erms,fsrm \
                     no_timer_check lpj=5000000 tsc=reliable rodata=off mitigations=off",
                );
                // Every console line costs ~10 ms of emulated kernel time here.
                let sets_verbosity = base
                    .split_whitespace()
                    .any(|w| w == "quiet" || w == "debug" || w.starts_with("loglevel="));
                if !sets_verbosity {
                    s.push_str(" quiet");
                }
                if let Some(khz) = self.tsc_khz {
                    s.push_str(&format!(" tsc_early_khz={khz}"));
                }
                s
            }
        }
    }

    /// What the guest must be told about its vCPUs here. On an emulating host a secondary vCPU
    /// never comes up (the kernel hangs at "Booting SMP configuration"; QEMU does the same on
    /// such hosts), so only the boot vCPU is brought online (`maxcpus=1`) and the VMM warns.
    pub fn smp_cmdline(&self, vcpus: u8) -> Option<&'static str> {
        (self.kind == KvmKind::Emulated && vcpus > 1).then_some("maxcpus=1")
    }

    pub fn describe(&self) -> String {
        match self.kind {
            KvmKind::Hardware => format!(
                "hardware KVM (ring-0 instruction ~{:.1} ns)",
                self.ring0_ns_per_instruction
            ),
            KvmKind::Emulated => format!(
                "EMULATING KVM: guest kernel code is emulated (~{:.0} ns per ring-0 instruction{}); \
                 VM timings here are not bare-metal figures",
                self.ring0_ns_per_instruction,
                if self.pvm_module { ", kvm_pvm loaded" } else { "" }
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_thresholds() {
        let fast = classify(Duration::from_micros(30), Some(2_000_000));
        assert_eq!(fast.kind, KvmKind::Hardware);
        assert!(fast.guest_cmdline_extra("").is_empty());
        let slow = classify(Duration::from_millis(12), Some(2_000_000));
        assert_eq!(slow.kind, KvmKind::Emulated);
        let extra = slow.guest_cmdline_extra("console=ttyS0");
        assert!(extra.contains("tsc_early_khz=2000000"));
        assert!(extra.contains("clearcpuid="));
        assert!(extra.split_whitespace().any(|w| w == "quiet"));
        assert!(!slow.guest_cmdline_extra("loglevel=8").contains("quiet"));
        assert_eq!(slow.smp_cmdline(2), Some("maxcpus=1"));
        assert_eq!(slow.smp_cmdline(1), None);
        assert_eq!(fast.smp_cmdline(4), None);
    }

    /// Runs the real probe when this machine has /dev/kvm (it does on our CI machines).
    #[test]
    fn probe_runs_on_this_host() {
        let kvm = match Kvm::new() {
            Ok(k) => k,
            Err(e) => {
                eprintln!("SKIPPED probe_runs_on_this_host: no usable /dev/kvm here ({e})");
                return;
            }
        };
        let h = detect(&kvm).expect("probe");
        eprintln!("{}", h.describe());
        assert!(h.ring0_ns_per_instruction > 0.0);
    }
}
