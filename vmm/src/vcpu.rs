//! vCPUs: boot configuration and the run loop (one thread each).
//!
//! Exits for port I/O and MMIO go to the buses. A guest shutdown (triple fault, system event)
//! or a KVM failure stops the VM: the thread reports why and wakes the main loop. An emulation
//! failure (which an emulating host raises for instructions it cannot run in ring 0) is
//! reported with the guest RIP and the instruction bytes there, never left hanging.
//!
//! # Pause, resume and state
//! A running vCPU thread takes [`VcpuCommand`]s from a channel. To make it look, the main
//! thread sends the command, sets `kvm_run.immediate_exit` (so a thread about to enter
//! KVM_RUN returns at once) and signals the thread with [`kick_signal`] (whose handler does
//! nothing: the signal only interrupts KVM_RUN). The thread handles commands whenever KVM_RUN
//! returns EINTR, which also guarantees that a pending port I/O or MMIO exit was completed
//! first (KVM completes it on the re-entry that sees `immediate_exit`). A paused vCPU blocks on
//! its channel. State is read and written with the vCPU's own ioctls: on its thread while
//! running ([`VcpuCommand::Save`]), or before the thread starts (restore).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    kvm_msr_entry, kvm_run, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::cpu::{cpuid, msrs, regs};
use crate::devices::Bus;
use crate::memory::{Bytes, GuestAddress, GuestMemoryMmap};
use crate::snapshot::VcpuState;

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
    #[error("reading vCPU {id} state ({what}): {source}")]
    Save {
        id: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("restoring vCPU {id} ({what}): {source}")]
    Restore {
        id: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("restoring vCPU {id}: KVM refused MSR {index:#x} ({set} of {wanted} MSRs set)")]
    RestoreMsr {
        id: u8,
        index: u32,
        set: usize,
        wanted: usize,
    },
    #[error("vCPU {id} state: {msg}")]
    BadState { id: u8, msg: String },
}

/// The signal that kicks a vCPU thread out of KVM_RUN (the first real-time signal).
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn noop_signal_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (no-op) handler for [`kick_signal`]; without one the signal would kill the
/// process. Idempotent.
pub fn register_kick_handler() -> Result<(), String> {
    static ONCE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        register_signal_handler(kick_signal(), noop_signal_handler)
            .map_err(|e| format!("cannot install the vCPU kick signal handler: {e}"))
    })
    .clone()
}

/// What the main thread asks of a running vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuCommand {
    Pause,
    Resume,
    /// Read the vCPU's state (the vCPU must be paused).
    Save,
}

/// The vCPU thread's answers.
#[derive(Debug)]
pub enum VcpuResponse {
    Paused,
    Resumed,
    State(Box<Result<VcpuState, String>>),
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
    /// KVM's MSR index list (candidates for saving).
    msr_candidates: Arc<Vec<u32>>,
    /// The candidates this vCPU can read, found at the first save.
    saveable_msrs: Option<Vec<u32>>,
}

/// The main thread's handle on a running vCPU thread.
pub struct VcpuHandle {
    pub id: u8,
    commands: Sender<VcpuCommand>,
    responses: Receiver<VcpuResponse>,
    thread: JoinHandle<()>,
    /// The vCPU's `kvm_run` mapping, or 0 once the thread has dropped it.
    run_ptr: Arc<Mutex<usize>>,
}

impl VcpuHandle {
    /// Sends `cmd`, kicks the thread out of KVM_RUN, and waits up to `timeout` for the answer.
    pub fn request(&self, cmd: VcpuCommand, timeout: Duration) -> Result<VcpuResponse, String> {
        // Answers to earlier requests that timed out are stale.
        while self.responses.try_recv().is_ok() {}
        self.commands
            .send(cmd)
            .map_err(|_| format!("vCPU {} has stopped", self.id))?;
        if cmd == VcpuCommand::Pause {
            self.kick();
        }
        match self.responses.recv_timeout(timeout) {
            Ok(r) => Ok(r),
            Err(RecvTimeoutError::Timeout) => Err(format!(
                "vCPU {} did not answer {cmd:?} within {timeout:?}",
                self.id
            )),
            Err(RecvTimeoutError::Disconnected) => Err(format!("vCPU {} has stopped", self.id)),
        }
    }

    fn kick(&self) {
        {
            let ptr = crate::devices::lock(&self.run_ptr);
            if *ptr != 0 {
                let run = *ptr as *mut kvm_run;
                // SAFETY: a non-zero pointer is the vCPU's live kvm_run mapping: the vCPU
                // thread zeroes it under this lock before the mapping goes away. The field is a
                // plain byte KVM reads at KVM_RUN entry; a racing write by the vCPU thread
                // (clearing it) is a benign byte store.
                unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
            }
        }
        if let Err(e) = self.thread.kill(kick_signal()) {
            tracing::debug!(vcpu = self.id, "kick signal: {e}");
        }
    }
}

impl Vcpu {
    pub fn new(
        id: u8,
        fd: VcpuFd,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        mem: GuestMemoryMmap,
        counters: Arc<VcpuCounters>,
        msr_candidates: Arc<Vec<u32>>,
    ) -> Self {
        Vcpu {
            id,
            fd,
            pio,
            mmio,
            mem,
            counters,
            msr_candidates,
            saveable_msrs: None,
        }
    }

    /// The MSRs of KVM's index list that this vCPU can read (each probed once, alone).
    fn saveable_msrs(&mut self) -> Result<Vec<u32>, VcpuError> {
        if let Some(l) = &self.saveable_msrs {
            return Ok(l.clone());
        }
        let mut list = Vec::new();
        for &index in self.msr_candidates.iter() {
            let mut one = Msrs::from_entries(&[kvm_msr_entry {
                index,
                ..Default::default()
            }])
            .map_err(VcpuError::Msrs)?;
            if matches!(self.fd.get_msrs(&mut one), Ok(1)) {
                list.push(index);
            }
        }
        self.saveable_msrs = Some(list.clone());
        Ok(list)
    }

    /// Reads the whole vCPU state. The vCPU must not be in KVM_RUN (paused, or not started).
    pub fn save_state(&mut self) -> Result<VcpuState, VcpuError> {
        let id = self.id;
        let err = |what| move |source| VcpuError::Save { id, what, source };
        let indices = self.saveable_msrs()?;
        let entries: Vec<kvm_msr_entry> = indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Vec::with_capacity(entries.len());
        // Msrs holds at most KVM_MAX_MSR_ENTRIES; read in batches.
        for batch in entries.chunks(256) {
            let mut m = Msrs::from_entries(batch).map_err(VcpuError::Msrs)?;
            let n = self.fd.get_msrs(&mut m).map_err(err("msrs"))?;
            if n != batch.len() {
                return Err(VcpuError::BadState {
                    id,
                    msg: format!("KVM read only {n} of {} MSRs", batch.len()),
                });
            }
            msrs.extend_from_slice(m.as_slice());
        }
        let cpuid = self
            .fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(err("cpuid"))?;
        Ok(VcpuState {
            id,
            cpuid: cpuid.as_slice().to_vec(),
            msrs,
            regs: self.fd.get_regs().map_err(err("regs"))?,
            sregs: self.fd.get_sregs().map_err(err("sregs"))?,
            xsave: self.fd.get_xsave().map_err(err("xsave"))?,
            xcrs: self.fd.get_xcrs().map_err(err("xcrs"))?,
            debugregs: self.fd.get_debug_regs().map_err(err("debug registers"))?,
            lapic: self.fd.get_lapic().map_err(err("lapic"))?,
            mp_state: self.fd.get_mp_state().map_err(err("mp state"))?,
            events: self.fd.get_vcpu_events().map_err(err("events"))?,
            tsc_khz: self.fd.get_tsc_khz().ok(),
        })
    }

    /// Applies a saved state to a fresh vCPU, in the order KVM needs: CPUID first (MSRs are
    /// checked against it), TSC frequency, special then general registers, FPU/XSAVE, XCRs,
    /// debug registers, LAPIC, MSRs (after the LAPIC: TSC deadline), events, MP state.
    pub fn restore_state(&mut self, s: &VcpuState) -> Result<(), VcpuError> {
        let id = self.id;
        if s.id != id {
            return Err(VcpuError::BadState {
                id,
                msg: format!("the saved state is vCPU {}'s", s.id),
            });
        }
        let err = |what| move |source| VcpuError::Restore { id, what, source };
        let cpuid = CpuId::from_entries(&s.cpuid).map_err(|e| VcpuError::BadState {
            id,
            msg: format!("CPUID of {} entries: {e:?}", s.cpuid.len()),
        })?;
        self.fd.set_cpuid2(&cpuid).map_err(err("cpuid"))?;
        if let Some(khz) = s.tsc_khz {
            match self.fd.get_tsc_khz() {
                Ok(now) if now.abs_diff(khz) <= khz / 5000 => {}
                now => {
                    if let Err(e) = self.fd.set_tsc_khz(khz) {
                        tracing::warn!(
                            vcpu = id,
                            "the snapshot's TSC runs at {khz} kHz, this host's at {now:?} kHz,                              and KVM cannot scale it ({e}); guest time may drift"
                        );
                    }
                }
            }
        }
        self.fd.set_sregs(&s.sregs).map_err(err("sregs"))?;
        self.fd.set_regs(&s.regs).map_err(err("regs"))?;
        // SAFETY: `s.xsave` is a whole `kvm_xsave` (the legacy 4 KiB area KVM_SET_XSAVE
        // reads); it was produced by KVM_GET_XSAVE (the builder refuses hosts whose XSAVE
        // area is larger, see `vm::check_snapshot_caps`).
        unsafe { self.fd.set_xsave(&s.xsave) }.map_err(err("xsave"))?;
        self.fd.set_xcrs(&s.xcrs).map_err(err("xcrs"))?;
        self.fd
            .set_debug_regs(&s.debugregs)
            .map_err(err("debug registers"))?;
        self.fd.set_lapic(&s.lapic).map_err(err("lapic"))?;
        let msrs = crate::cpu::msrs::order_for_restore(&s.msrs);
        for batch in msrs.chunks(256) {
            let m = Msrs::from_entries(batch).map_err(VcpuError::Msrs)?;
            let set = self.fd.set_msrs(&m).map_err(err("msrs"))?;
            if set != batch.len() {
                return Err(VcpuError::RestoreMsr {
                    id,
                    index: batch.get(set).map_or(0, |e| e.index),
                    set,
                    wanted: batch.len(),
                });
            }
        }
        self.fd.set_vcpu_events(&s.events).map_err(err("events"))?;
        self.fd.set_mp_state(s.mp_state).map_err(err("mp state"))?;
        Ok(())
    }

    /// Starts the vCPU thread.
    pub fn spawn(
        mut self,
        stops: Sender<(u8, VcpuStop)>,
        wake: EventFd,
    ) -> std::io::Result<VcpuHandle> {
        let id = self.id;
        let (cmd_tx, cmd_rx) = std::sync::mpsc::channel();
        let (resp_tx, resp_rx) = std::sync::mpsc::channel();
        let run_ptr = Arc::new(Mutex::new(self.fd.get_kvm_run() as *mut kvm_run as usize));
        let ptr = run_ptr.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let stop = self.run_loop(&cmd_rx, &resp_tx);
                tracing::info!(vcpu = self.id, "vCPU stopped: {stop:?}");
                let _ = stops.send((self.id, stop));
                let _ = wake.write(1);
                // Nobody may touch kvm_run once the vCPU (and its mapping) goes.
                let mut p = crate::devices::lock(&ptr);
                *p = 0;
                drop(self);
            })?;
        Ok(VcpuHandle {
            id,
            commands: cmd_tx,
            responses: resp_rx,
            thread,
            run_ptr,
        })
    }

    /// Handles queued commands after KVM_RUN returned EINTR; blocks while paused. Returns a
    /// stop when the controller is gone.
    fn handle_commands(
        &mut self,
        cmds: &Receiver<VcpuCommand>,
        resp: &Sender<VcpuResponse>,
    ) -> Option<VcpuStop> {
        let mut paused = false;
        loop {
            let cmd = if paused {
                match cmds.recv() {
                    Ok(c) => c,
                    Err(_) => return Some(VcpuStop::Failed("the VMM controller is gone".into())),
                }
            } else {
                match cmds.try_recv() {
                    Ok(c) => c,
                    Err(TryRecvError::Empty) => return None,
                    Err(TryRecvError::Disconnected) => {
                        return Some(VcpuStop::Failed("the VMM controller is gone".into()))
                    }
                }
            };
            let answer = match cmd {
                VcpuCommand::Pause => {
                    paused = true;
                    VcpuResponse::Paused
                }
                VcpuCommand::Resume => {
                    paused = false;
                    VcpuResponse::Resumed
                }
                VcpuCommand::Save => {
                    VcpuResponse::State(Box::new(self.save_state().map_err(|e| e.to_string())))
                }
            };
            let _ = resp.send(answer);
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

    /// Runs until the guest stops or KVM fails (or the controller goes away).
    fn run_loop(&mut self, cmds: &Receiver<VcpuCommand>, resp: &Sender<VcpuResponse>) -> VcpuStop {
        loop {
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR => {
                    // A kick (or a stray signal): any pending I/O exit is complete now.
                    self.fd.set_kvm_immediate_exit(0);
                    if let Some(stop) = self.handle_commands(cmds, resp) {
                        return stop;
                    }
                    continue;
                }
                Err(e) if e.errno() == libc::EAGAIN => continue,
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
