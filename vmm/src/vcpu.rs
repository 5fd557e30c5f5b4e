//! vCPUs: boot configuration and the run loop (one thread each).
//!
//! Exits for port I/O and MMIO go to the buses. A guest shutdown (triple fault, system event)
//! or a KVM failure stops the VM: the thread reports why and wakes the main loop. An emulation
//! failure (which an emulating host raises for instructions it cannot run in ring 0) is
//! reported with the guest RIP and the instruction bytes there, never left hanging.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;

use kvm_bindings::{CpuId, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

use crate::cpu::{cpuid, msrs, regs};
use crate::devices::Bus;
use crate::memory::{Bytes, GuestAddress, GuestMemoryMmap};

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("configuring vCPU {id} ({what}): {source}")]
    Configure {
        id: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("building the MSR list: {0:?}")]
    Msrs(vmm_sys_util::fam::Error),
    #[error("KVM accepted only {set} of {wanted} boot MSRs on vCPU {id}")]
    PartialMsrs { id: u8, set: usize, wanted: usize },
}

/// Why a vCPU stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest shut down or reset (triple fault, or a KVM system event).
    GuestShutdown(String),
    /// KVM could not run the guest: the message says why and where.
    Failed(String),
}

/// Exit counters, shared with the metrics endpoint.
#[derive(Debug, Default)]
pub struct VcpuCounters {
    pub exits: AtomicU64,
    pub io: AtomicU64,
    pub mmio: AtomicU64,
}

pub struct Vcpu {
    pub id: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    mem: GuestMemoryMmap,
    counters: Arc<VcpuCounters>,
}

impl Vcpu {
    pub fn new(
        id: u8,
        fd: VcpuFd,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        mem: GuestMemoryMmap,
        counters: Arc<VcpuCounters>,
    ) -> Self {
        Vcpu {
            id,
            fd,
            pio,
            mmio,
            mem,
            counters,
        }
    }

    /// Sets CPUID, MSRs, registers, FPU and LAPIC for the 64-bit entry at `entry`.
    /// Every vCPU gets the same state; the kernel parks the secondaries until it wakes them.
    pub fn configure_boot(
        &mut self,
        supported: &CpuId,
        count: u8,
        entry: u64,
    ) -> Result<(), VcpuError> {
        let id = self.id;
        let err = |what| move |source| VcpuError::Configure { id, what, source };
        // CPUID first: KVM checks MSRs against it.
        self.fd
            .set_cpuid2(&cpuid::for_vcpu(supported.clone(), id, count))
            .map_err(err("cpuid"))?;
        let msrs = msrs::boot_msrs().map_err(VcpuError::Msrs)?;
        let set = self.fd.set_msrs(&msrs).map_err(err("msrs"))?;
        if set != msrs.as_slice().len() {
            return Err(VcpuError::PartialMsrs {
                id,
                set,
                wanted: msrs.as_slice().len(),
            });
        }
        self.fd
            .set_regs(&regs::boot_regs(entry))
            .map_err(err("regs"))?;
        let sregs = self.fd.get_sregs().map_err(err("get sregs"))?;
        self.fd
            .set_sregs(&regs::boot_sregs(sregs))
            .map_err(err("sregs"))?;
        self.fd.set_fpu(&regs::boot_fpu()).map_err(err("fpu"))?;
        regs::setup_lapic(&self.fd).map_err(err("lapic"))?;
        Ok(())
    }

    /// Runs until the guest stops or KVM fails; reports the reason and wakes the main loop.
    pub fn run(mut self, stops: Sender<(u8, VcpuStop)>, wake: EventFd) {
        let stop = self.run_loop();
        tracing::info!(vcpu = self.id, "vCPU stopped: {stop:?}");
        let _ = stops.send((self.id, stop));
        let _ = wake.write(1);
    }

    fn run_loop(&mut self) -> VcpuStop {
        loop {
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => return VcpuStop::Failed(format!("KVM_RUN failed: {e}")),
            };
            self.counters.exits.fetch_add(1, Ordering::Relaxed);
            let outcome = match exit {
                VcpuExit::IoIn(port, data) => {
                    self.counters.io.fetch_add(1, Ordering::Relaxed);
                    self.pio.read(u64::from(port), data);
                    None
                }
                VcpuExit::IoOut(port, data) => {
                    self.counters.io.fetch_add(1, Ordering::Relaxed);
                    self.pio.write(u64::from(port), data);
                    None
                }
                VcpuExit::MmioRead(addr, data) => {
                    self.counters.mmio.fetch_add(1, Ordering::Relaxed);
                    self.mmio.read(addr, data);
                    None
                }
                VcpuExit::MmioWrite(addr, data) => {
                    self.counters.mmio.fetch_add(1, Ordering::Relaxed);
                    self.mmio.write(addr, data);
                    None
                }
                VcpuExit::Intr | VcpuExit::IrqWindowOpen => None,
                VcpuExit::Hlt => Some(Exit::Shutdown("the vCPU halted with interrupts off".into())),
                VcpuExit::Shutdown => Some(Exit::Shutdown("triple fault or guest shutdown".into())),
                VcpuExit::SystemEvent(kind, _) => Some(Exit::Shutdown(match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => "system event: shutdown".into(),
                    KVM_SYSTEM_EVENT_RESET => "system event: reset".into(),
                    other => format!("system event {other}"),
                })),
                VcpuExit::InternalError => Some(Exit::Internal),
                VcpuExit::FailEntry(reason, cpu) => Some(Exit::Failed(format!(
                    "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on cpu {cpu}"
                ))),
                other => Some(Exit::Failed(format!("unexpected vCPU exit {other:?}"))),
            };
            match outcome {
                None => {}
                Some(Exit::Shutdown(why)) => return VcpuStop::GuestShutdown(why),
                Some(Exit::Failed(why)) => return VcpuStop::Failed(why),
                Some(Exit::Internal) => return VcpuStop::Failed(self.describe_internal_error()),
            }
        }
    }

    /// KVM_EXIT_INTERNAL_ERROR in words: the suberror, the guest RIP and the bytes there.
    fn describe_internal_error(&mut self) -> String {
        // SAFETY: after an INTERNAL_ERROR exit the `internal` member of the kvm_run union is
        // the one KVM filled.
        let (suberror, ndata) = unsafe {
            let run = self.fd.get_kvm_run();
            (
                run.__bindgen_anon_1.internal.suberror,
                run.__bindgen_anon_1.internal.ndata,
            )
        };
        let kind = match suberror {
            1 => "emulation failure",
            2 => "simultaneous exception",
            3 => "delivery event failure",
            4 => "unexpected exit during event delivery",
            _ => "unknown suberror",
        };
        let (rip, bytes) = match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => {
                let bytes = guest_virt_to_phys(&self.mem, s.cr3, r.rip)
                    .and_then(|pa| {
                        let mut buf = [0u8; 15];
                        self.mem.read_slice(&mut buf, GuestAddress(pa)).ok()?;
                        Some(buf)
                    })
                    .map(|b| {
                        b.iter()
                            .map(|x| format!("{x:02x}"))
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_else(|| "<unmapped>".into());
                (format!("{:#x}", r.rip), bytes)
            }
            _ => ("<unknown>".into(), "<unknown>".into()),
        };
        format!(
            "KVM internal error on vCPU {}: {kind} (suberror {suberror}, {ndata} data words) at guest RIP {rip}, \
             instruction bytes: {bytes}. On an emulating host this is an instruction its emulator cannot run \
             in ring 0: hide the feature on the kernel command line (see dev-kvm.md)",
            self.id
        )
    }
}

enum Exit {
    Shutdown(String),
    Failed(String),
    Internal,
}

/// Translates a guest virtual address through 4-level page tables rooted at `cr3`.
/// Handles 1 GiB and 2 MiB pages; returns `None` for anything unmapped or unreadable.
pub fn guest_virt_to_phys(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<u64> {
    const PRESENT: u64 = 1;
    const PAGE_SIZE_BIT: u64 = 1 << 7;
    const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
    let mut table = cr3 & ADDR_MASK;
    for level in (0..4).rev() {
        let shift = 12 + 9 * level;
        let index = (va >> shift) & 0x1ff;
        let entry: u64 = mem.read_obj(GuestAddress(table + index * 8)).ok()?;
        if entry & PRESENT == 0 {
            return None;
        }
        let is_leaf = level == 0 || ((level == 1 || level == 2) && entry & PAGE_SIZE_BIT != 0);
        if is_leaf {
            let page_mask = (1u64 << shift) - 1;
            return Some((entry & ADDR_MASK & !page_mask) | (va & page_mask));
        }
        table = entry & ADDR_MASK;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::write_boot_tables;
    use crate::layout::PML4_START;

    #[test]
    fn walks_the_identity_map_and_refuses_unmapped() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem).unwrap();
        assert_eq!(guest_virt_to_phys(&mem, PML4_START, 0x1234), Some(0x1234));
        assert_eq!(
            guest_virt_to_phys(&mem, PML4_START, 0x3fff_ffff),
            Some(0x3fff_ffff)
        );
        // Beyond the first GiB: the PDPTE is empty.
        assert_eq!(guest_virt_to_phys(&mem, PML4_START, 1 << 30), None);
        // A CR3 pointing outside guest memory.
        assert_eq!(guest_virt_to_phys(&mem, 0xffff_f000, 0x1000), None);
    }
}
