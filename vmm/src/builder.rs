//! Builds a ready-to-run VM from a [`Source`]: a [`VmConfig`] to boot, or a snapshot to
//! restore. Both go through [`build`]: memory, KVM VM, devices, vCPUs. Boot loads the kernel
//! and writes the command line and boot tables; restore maps guest memory from the snapshot's
//! memory file instead and applies the saved device, VM and vCPU state (never reloading the
//! kernel or rewriting boot tables).

use std::fs::OpenOptions;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, mptable, params, BootError};
use crate::config::{SerialConfig, VmConfig, DEFAULT_CMDLINE};
use crate::controller::{Controller, MetricsSources, Outcome, SnapshotSources};
use crate::devices::legacy::{BootTimer, SerialDevice, SerialOutput, I8042};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{VirtioDevice, NOTIFY_REG_OFFSET};
use crate::devices::Bus;
use crate::host::{self, HostKvm};
use crate::layout::*;
use crate::memory::GuestMemoryMmap;
use crate::snapshot::persist::{Persist, PersistError};
use crate::snapshot::{Snapshot, SnapshotError};
use crate::vcpu::{Vcpu, VcpuCounters, VcpuError};
use crate::vm::{self, VmError};

/// What to build the VM from.
pub enum Source<'a> {
    /// Boot the configured kernel.
    Boot(&'a VmConfig),
    /// Restore a snapshot (its `config`, with any overrides already applied), guest memory
    /// mapped from `mem`.
    Snapshot {
        snapshot: &'a Snapshot,
        mem: &'a Path,
    },
}

pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("host KVM probe: {0}")]
    Probe(#[from] host::ProbeError),
    #[error("KVM: {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("event loop: {0:?}")]
    EventManager(event_manager::Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("device {what}: {msg}")]
    Device { what: String, msg: String },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("restoring device state: {0}")]
    Persist(#[from] PersistError),
    #[error("the snapshot does not match its configuration: {0}")]
    Mismatch(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BuildError {
    let what = what.into();
    move |source| BuildError::Io { what, source }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BuildError {
    move |source| BuildError::Kvm { what, source }
}

/// A built VM, not yet running.
pub struct Vmm {
    // Field order is drop order: the VM and its vCPUs go before the memory KVM maps.
    pub event_manager: EventManager<Subscriber>,
    pub controller: Arc<Mutex<Controller>>,
    pub vm: Arc<VmFd>,
    pub kvm: Kvm,
    pub mem: GuestMemoryMmap,
    pub host: HostKvm,
    /// The final kernel command line.
    pub cmdline: String,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
}

/// The guest command line: the configured one (or the default, adjusted for the serial
/// console), the host-specific switches, then the device announcements.
pub fn compose_cmdline(config: &VmConfig, host: &HostKvm, devices: &[String]) -> String {
    let base = match &config.cmdline {
        Some(c) => c.clone(),
        None => match config.serial {
            SerialConfig::None => DEFAULT_CMDLINE.to_string(),
            _ => format!(
                "{} console=ttyS0",
                DEFAULT_CMDLINE.replace(" 8250.nr_uarts=0", "")
            ),
        },
    };
    let mut parts = vec![base];
    let extra = host.guest_cmdline_extra(&parts[0]);
    if !extra.is_empty() {
        parts.push(extra);
    }
    if let Some(smp) = host.smp_cmdline(config.vcpus) {
        tracing::warn!(
            vcpus = config.vcpus,
            "secondary vCPUs do not start on an emulating host; the guest gets `{smp}` and runs on one"
        );
        parts.push(smp.to_string());
    }
    parts.extend(devices.iter().cloned());
    parts.join(" ")
}

fn validate(config: &VmConfig) -> Result<(), BuildError> {
    if config.vcpus == 0 || config.vcpus > mptable::MAX_CPUS {
        return Err(BuildError::Config(format!(
            "vcpus must be 1..={}, got {}",
            mptable::MAX_CPUS,
            config.vcpus
        )));
    }
    if config.mem_mib < 16 {
        return Err(BuildError::Config(format!(
            "mem_mib must be at least 16, got {}",
            config.mem_mib
        )));
    }
    if let Some(v) = &config.vsock {
        if v.guest_cid < 3 || v.guest_cid > u64::from(u32::MAX) {
            return Err(BuildError::Config(format!(
                "vsock guest_cid must be 3..=4294967295, got {}",
                v.guest_cid
            )));
        }
    }
    Ok(())
}

/// Builds the VM. `start` is when the VMM process began (the boot timer counts from it);
/// `api_socket` is where to serve the control socket, if anywhere.
pub fn build(
    source: Source<'_>,
    start: Instant,
    api_socket: Option<&Path>,
) -> Result<Vmm, BuildError> {
    let (config, snapshot) = match &source {
        Source::Boot(c) => (*c, None),
        Source::Snapshot { snapshot, mem } => (&snapshot.config, Some((*snapshot, *mem))),
    };
    validate(config)?;
    crate::vcpu::register_kick_handler().map_err(|msg| BuildError::Device {
        what: "vCPU kick signal".into(),
        msg,
    })?;
    let kvm = vm::open_kvm()?;
    let host = host::detect(&kvm)?;
    tracing::info!("host: {}", host.describe());

    let mem_size = u64::from(config.mem_mib) << 20;
    let mem = match snapshot {
        None => vm::create_memory(config.mem_mib)?,
        Some((snap, path)) => {
            let want: Vec<(u64, u64)> = vm::memory_ranges(mem_size)
                .iter()
                .map(|(a, l)| (a.0, *l as u64))
                .collect();
            let have: Vec<(u64, u64)> = snap
                .memory
                .regions
                .iter()
                .map(|r| (r.guest_addr, r.size))
                .collect();
            if want != have {
                return Err(BuildError::Mismatch(format!(
                    "memory regions {have:x?}, but mem_mib {} lays out {want:x?}",
                    config.mem_mib
                )));
            }
            if snap.vcpus.len() != usize::from(config.vcpus) {
                return Err(BuildError::Mismatch(format!(
                    "{} saved vCPUs for {} configured",
                    snap.vcpus.len(),
                    config.vcpus
                )));
            }
            crate::snapshot::memory::map_memory(path, &snap.memory)?
        }
    };
    let track_dirty = config.track_dirty_pages;
    let vm = vm::create_vm_with(&kvm, &mem, track_dirty)?;
    vm::create_irqchip_and_pit(&vm)?;
    if snapshot.is_some() {
        vm::check_snapshot_caps(&vm)?;
    }

    let boot_image = match snapshot {
        None => {
            let (kernel, setup_header) = boot::load_kernel(&mem, &config.kernel)?;
            let initrd = match &config.initrd {
                Some(p) => Some(boot::load_initrd(&mem, p, mem_size, kernel.end)?),
                None => None,
            };
            Some((kernel, setup_header, initrd))
        }
        Some(_) => None,
    };

    let mut event_manager = EventManager::<Subscriber>::new().map_err(BuildError::EventManager)?;
    let stop_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
    let mut pio = Bus::new();
    let mut mmio = Bus::new();

    // Legacy devices.
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)
        .map_err(kvm_err("serial irqfd"))?;
    let out = match &config.serial {
        SerialConfig::None => SerialOutput::Sink,
        SerialConfig::Stdout => SerialOutput::Stdout(std::io::stdout()),
        SerialConfig::File(p) => SerialOutput::File {
            file: OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(io_err(format!("serial output {}", p.display())))?,
            written: 0,
        },
    };
    let bus_err = |what: &str| {
        let what = what.to_string();
        move |e: crate::devices::BusError| BuildError::Device {
            what,
            msg: e.to_string(),
        }
    };
    let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, out)));
    pio.insert(
        serial.clone(),
        u64::from(SERIAL_PORT),
        u64::from(SERIAL_PORT_LEN),
    )
    .map_err(bus_err("serial"))?;
    let reset_evt = stop_evt.try_clone().map_err(io_err("eventfd"))?;
    let i8042 = Arc::new(Mutex::new(I8042::new(reset_evt)));
    pio.insert(
        i8042.clone(),
        u64::from(I8042_PORT),
        u64::from(I8042_PORT_LEN),
    )
    .map_err(bus_err("i8042"))?;
    let boot_timer = BootTimer::new(start);
    let boot_reading = boot_timer.reading();
    mmio.insert(
        Arc::new(Mutex::new(boot_timer)),
        BOOT_TIMER_ADDR,
        BOOT_TIMER_SIZE,
    )
    .map_err(bus_err("boot timer"))?;

    // virtio devices.
    let virtio = attach_virtio(config, &vm, &mem, &mut mmio, &mut event_manager)?;

    // The kernel entry point (a restore resumes at the saved registers instead).
    let entry = boot_image.as_ref().map_or(0, |(k, _, _)| k.entry);
    let cmdline = match (snapshot, boot_image) {
        (None, Some((_, setup_header, initrd))) => {
            let cmdline = compose_cmdline(config, &host, &virtio.announcements);
            let cmdline_len = boot::write_cmdline(&mem, &cmdline)?;
            params::write_boot_params(&mem, setup_header, cmdline_len, initrd, mem_size)?;
            mptable::setup(&mem, config.vcpus)?;
            boot::write_boot_tables(&mem)?;
            tracing::info!(%cmdline, "guest command line");
            cmdline
        }
        (Some((snap, _)), _) => {
            let d = &snap.devices;
            if d.virtio.len() != virtio.transports.len() {
                return Err(BuildError::Mismatch(format!(
                    "{} saved virtio devices, {} configured",
                    d.virtio.len(),
                    virtio.transports.len()
                )));
            }
            crate::devices::lock(&serial).restore((), &d.serial)?;
            crate::devices::lock(&i8042).restore((), &d.i8042)?;
            for (t, s) in virtio.transports.iter().zip(&d.virtio) {
                crate::devices::lock(t).restore((), s)?;
            }
            snap.cmdline.clone()
        }
        (None, None) => unreachable!("boot always loads a kernel"),
    };

    let pio = Arc::new(pio);
    let mmio = Arc::new(mmio);
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("supported CPUID"))?;
    let msr_candidates = Arc::new(
        kvm.get_msr_index_list()
            .map_err(kvm_err("MSR index list"))?
            .as_slice()
            .to_vec(),
    );
    let mut vcpus = Vec::new();
    let mut counters = Vec::new();
    for id in 0..config.vcpus {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("create vCPU"))?;
        let c = Arc::new(VcpuCounters::default());
        let mut v = Vcpu::new(
            id,
            fd,
            pio.clone(),
            mmio.clone(),
            mem.clone(),
            c.clone(),
            msr_candidates.clone(),
        );
        match snapshot {
            None => v.configure_boot(&supported, config.vcpus, entry)?,
            Some((snap, _)) => v.restore_state(&snap.vcpus[usize::from(id)])?,
        }
        vcpus.push(v);
        counters.push(c);
    }
    if let Some((snap, _)) = snapshot {
        vm::restore_state(&vm, &snap.vm)?;
        // Host connections did not survive: tell the guest driver to drop its sockets.
        if let Some(v) = &virtio.vsock {
            let mut v = crate::devices::lock(v);
            if v.is_activated() {
                if let Err(e) = v.send_transport_reset() {
                    tracing::warn!("vsock transport reset after restore: {e}");
                }
            }
        }
    }

    let listener = match api_socket {
        Some(p) => {
            let _ = std::fs::remove_file(p);
            Some(UnixListener::bind(p).map_err(io_err(format!("control socket {}", p.display())))?)
        }
        None => None,
    };
    let vm = Arc::new(vm);
    let (stops_tx, stops_rx) = mpsc::channel();
    let mut controller = Controller::new(
        stop_evt.try_clone().map_err(io_err("eventfd"))?,
        stops_rx,
        listener,
        MetricsSources {
            start,
            boot: boot_reading,
            counters,
            mem: mem.clone(),
            host: host.clone(),
        },
    );
    controller.set_vcpus(vcpus, stops_tx, stop_evt);
    controller.set_snapshot_sources(SnapshotSources {
        vm: vm.clone(),
        mem: mem.clone(),
        config: config.clone(),
        cmdline: cmdline.clone(),
        track_dirty,
        serial,
        i8042,
        virtio: virtio.transports,
    });
    let controller = Arc::new(Mutex::new(controller));
    event_manager.add_subscriber(controller.clone());

    Ok(Vmm {
        event_manager,
        controller,
        vm,
        kvm,
        mem,
        host,
        cmdline,
        pio,
        mmio,
    })
}

/// The virtio devices as attached.
struct Attached {
    announcements: Vec<String>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    vsock: Option<Arc<Mutex<Vsock>>>,
}

/// Creates the configured virtio devices on virtio-mmio slots (block devices first, then
/// vsock); returns their command-line announcements (`virtio_mmio.device=4K@ADDR:IRQ`).
fn attach_virtio(
    config: &VmConfig,
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    event_manager: &mut EventManager<Subscriber>,
) -> Result<Attached, BuildError> {
    // (name for messages, the device as the transport sees it, the same as a subscriber)
    type Device = (String, Arc<Mutex<dyn VirtioDevice>>, Subscriber);
    let mut devices: Vec<Device> = Vec::new();
    let mut vsock = None;
    for (i, b) in config.block.iter().enumerate() {
        let what = format!("block{i} ({})", b.path.display());
        let dev = Block::new(b).map_err(|e| BuildError::Device {
            what: what.clone(),
            msg: e.to_string(),
        })?;
        let dev = Arc::new(Mutex::new(dev));
        devices.push((what, dev.clone(), dev));
    }
    if let Some(v) = &config.vsock {
        // A socket file left by an earlier VMM would make the bind fail.
        let _ = std::fs::remove_file(&v.uds_path);
        let what = format!("vsock ({})", v.uds_path.display());
        let dev = Vsock::new(v).map_err(|e| BuildError::Device {
            what: what.clone(),
            msg: e.to_string(),
        })?;
        let dev = Arc::new(Mutex::new(dev));
        vsock = Some(dev.clone());
        devices.push((what, dev.clone(), dev));
    }
    let mut announcements = Vec::new();
    let mut transports = Vec::new();
    for (slot, (what, dev, subscriber)) in devices.into_iter().enumerate() {
        let (addr, irq) = virtio_mmio_slot(slot as u64).ok_or_else(|| BuildError::Device {
            what: what.clone(),
            msg: format!("more than {VIRTIO_MMIO_MAX_DEVICES} virtio devices"),
        })?;
        {
            let d = crate::devices::lock(&dev);
            for (i, evt) in d.queue_events().iter().enumerate() {
                // A u32 datamatch makes KVM match 4-byte writes of the queue index.
                vm.register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(addr + NOTIFY_REG_OFFSET),
                    i as u32,
                )
                .map_err(kvm_err("virtio ioeventfd"))?;
            }
            vm.register_irqfd(d.interrupt_evt(), irq)
                .map_err(kvm_err("virtio irqfd"))?;
        }
        let transport = Arc::new(Mutex::new(MmioTransport::new(mem.clone(), dev)));
        transports.push(transport.clone());
        mmio.insert(transport, addr, VIRTIO_MMIO_SLOT_SIZE)
            .map_err(|e| BuildError::Device {
                what: what.clone(),
                msg: e.to_string(),
            })?;
        event_manager.add_subscriber(subscriber);
        tracing::info!(device = %what, addr = format!("{addr:#x}"), irq, "virtio device");
        announcements.push(format!("virtio_mmio.device=4K@{addr:#x}:{irq}"));
    }
    Ok(Attached {
        announcements,
        transports,
        vsock,
    })
}

impl Vmm {
    /// Starts the vCPUs now (otherwise the control socket's `start` does).
    pub fn start(&self) {
        crate::devices::lock(&self.controller).start();
    }

    /// Runs the event loop until the VM ends; returns how.
    pub fn run(&mut self) -> Outcome {
        loop {
            if let Some(o) = crate::devices::lock(&self.controller).outcome.clone() {
                return o;
            }
            if let Err(e) = self.event_manager.run() {
                return Outcome::Failed(format!("event loop: {e:?}"));
            }
        }
    }
}
