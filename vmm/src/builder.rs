//! Builds a ready-to-run VM from a [`VmConfig`]: memory, KVM VM, kernel and initrd, devices,
//! command line, boot tables and configured vCPUs. (Restore from a snapshot will go through
//! here too, so that boot and restore share one builder.)

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
use crate::controller::{Controller, MetricsSources, Outcome};
use crate::devices::legacy::{BootTimer, SerialDevice, SerialOutput, I8042};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{VirtioDevice, NOTIFY_REG_OFFSET};
use crate::devices::Bus;
use crate::host::{self, HostKvm};
use crate::layout::*;
use crate::memory::GuestMemoryMmap;
use crate::vcpu::{Vcpu, VcpuCounters, VcpuError};
use crate::vm::{self, VmError};

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
    pub vm: VmFd,
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
    config: &VmConfig,
    start: Instant,
    api_socket: Option<&Path>,
) -> Result<Vmm, BuildError> {
    validate(config)?;
    let kvm = vm::open_kvm()?;
    let host = host::detect(&kvm)?;
    tracing::info!("host: {}", host.describe());

    let mem_size = u64::from(config.mem_mib) << 20;
    let mem = vm::create_memory(config.mem_mib)?;
    let vm = vm::create_vm(&kvm, &mem)?;
    vm::create_irqchip_and_pit(&vm)?;

    let (kernel, setup_header) = boot::load_kernel(&mem, &config.kernel)?;
    let initrd = match &config.initrd {
        Some(p) => Some(boot::load_initrd(&mem, p, mem_size, kernel.end)?),
        None => None,
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
    pio.insert(
        Arc::new(Mutex::new(SerialDevice::new(serial_irq, out))),
        u64::from(SERIAL_PORT),
        u64::from(SERIAL_PORT_LEN),
    )
    .map_err(bus_err("serial"))?;
    let reset_evt = stop_evt.try_clone().map_err(io_err("eventfd"))?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(reset_evt))),
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
    let announcements = attach_virtio(config, &vm, &mem, &mut mmio, &mut event_manager)?;

    let cmdline = compose_cmdline(config, &host, &announcements);
    let cmdline_len = boot::write_cmdline(&mem, &cmdline)?;
    params::write_boot_params(&mem, setup_header, cmdline_len, initrd, mem_size)?;
    mptable::setup(&mem, config.vcpus)?;
    boot::write_boot_tables(&mem)?;
    tracing::info!(%cmdline, "guest command line");

    let pio = Arc::new(pio);
    let mmio = Arc::new(mmio);
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("supported CPUID"))?;
    let mut vcpus = Vec::new();
    let mut counters = Vec::new();
    for id in 0..config.vcpus {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("create vCPU"))?;
        let c = Arc::new(VcpuCounters::default());
        let mut v = Vcpu::new(id, fd, pio.clone(), mmio.clone(), mem.clone(), c.clone());
        v.configure_boot(&supported, config.vcpus, kernel.entry)?;
        vcpus.push(v);
        counters.push(c);
    }

    let listener = match api_socket {
        Some(p) => {
            let _ = std::fs::remove_file(p);
            Some(UnixListener::bind(p).map_err(io_err(format!("control socket {}", p.display())))?)
        }
        None => None,
    };
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

/// Creates the configured virtio devices on virtio-mmio slots (block devices first, then
/// vsock); returns their command-line announcements (`virtio_mmio.device=4K@ADDR:IRQ`).
fn attach_virtio(
    config: &VmConfig,
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    event_manager: &mut EventManager<Subscriber>,
) -> Result<Vec<String>, BuildError> {
    // (name for messages, the device as the transport sees it, the same as a subscriber)
    type Attached = (String, Arc<Mutex<dyn VirtioDevice>>, Subscriber);
    let mut devices: Vec<Attached> = Vec::new();
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
        devices.push((what, dev.clone(), dev));
    }
    let mut announcements = Vec::new();
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
        let transport = MmioTransport::new(mem.clone(), dev);
        mmio.insert(Arc::new(Mutex::new(transport)), addr, VIRTIO_MMIO_SLOT_SIZE)
            .map_err(|e| BuildError::Device {
                what: what.clone(),
                msg: e.to_string(),
            })?;
        event_manager.add_subscriber(subscriber);
        tracing::info!(device = %what, addr = format!("{addr:#x}"), irq, "virtio device");
        announcements.push(format!("virtio_mmio.device=4K@{addr:#x}:{irq}"));
    }
    Ok(announcements)
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
