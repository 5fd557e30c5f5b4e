use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::devices::virtio::test_utils::*;
use crate::devices::virtio::{ActivateError, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};

const FULL: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
const FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | (1 << 3);

struct Dummy {
    irq: Arc<IrqTrigger>,
    evts: Vec<EventFd>,
    acked: u64,
    queues: Option<Vec<Queue>>,
    resets: usize,
    fail: bool,
    config: [u8; 8],
}

impl Dummy {
    fn new() -> Self {
        Dummy {
            irq: Arc::new(IrqTrigger::new().unwrap()),
            evts: (0..2)
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect(),
            acked: 0,
            queues: None,
            resets: 0,
            fail: false,
            config: [1, 2, 3, 4, 5, 6, 7, 8],
        }
    }
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn avail_features(&self) -> u64 {
        FEATURES
    }
    fn acked_features(&self) -> u64 {
        self.acked
    }
    fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::devices::virtio::read_config_bytes(&self.config, offset, data)
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, _mem: GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), ActivateError> {
        if self.fail {
            return Err(ActivateError::QueueNotReady(1));
        }
        self.queues = Some(queues);
        Ok(())
    }
    fn reset(&mut self) {
        self.queues = None;
        self.resets += 1;
    }
    fn is_activated(&self) -> bool {
        self.queues.is_some()
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.evts
    }
    fn interrupt(&self) -> &Arc<IrqTrigger> {
        &self.irq
    }
    fn save_state(&self) -> crate::snapshot::persist::VirtioDeviceState {
        crate::snapshot::persist::VirtioDeviceState {
            device_type: 42,
            acked_features: self.acked,
            activated: self.queues.is_some(),
            broken: false,
            queues: self
                .queues
                .as_ref()
                .map(crate::devices::virtio::save_queues)
                .unwrap_or_default(),
            guest_cid: None,
        }
    }
    fn restore_state(
        &mut self,
        mem: GuestMemoryMmap,
        state: &crate::snapshot::persist::VirtioDeviceState,
    ) -> Result<(), crate::snapshot::persist::PersistError> {
        self.acked = state.acked_features;
        self.queues = None;
        if state.activated {
            let q = crate::devices::virtio::restore_queues("dummy", state, 42, &[16, 8], &mem)?;
            self.queues = Some(q);
        }
        Ok(())
    }
}

struct Fixture {
    mem: GuestMemoryMmap,
    dev: Arc<Mutex<Dummy>>,
    t: MmioTransport,
}

fn fixture() -> Fixture {
    let mem = test_mem();
    let dev = Arc::new(Mutex::new(Dummy::new()));
    let t = MmioTransport::new(mem.clone(), dev.clone());
    Fixture { mem, dev, t }
}

fn layouts(mem: &GuestMemoryMmap) -> [QueueLayout; 2] {
    let a = TestQueue::new(mem, 0x1_0000, 16);
    let b = TestQueue::new(mem, 0x2_0000, 8);
    [a.layout(), b.layout()]
}

#[test]
fn identification_registers() {
    let mut f = fixture();
    assert_eq!(r32(&mut f.t, 0x0), 0x7472_6976);
    assert_eq!(r32(&mut f.t, 0x4), 2);
    assert_eq!(r32(&mut f.t, 0x8), 42);
    assert_eq!(r32(&mut f.t, 0xc), VENDOR_ID);
    w32(&mut f.t, 0x14, 0);
    assert_eq!(r32(&mut f.t, 0x10), FEATURES as u32);
    w32(&mut f.t, 0x14, 1);
    assert_eq!(r32(&mut f.t, 0x10), (FEATURES >> 32) as u32);
    w32(&mut f.t, 0x14, 7);
    assert_eq!(r32(&mut f.t, 0x10), 0);
    assert_eq!(r32(&mut f.t, 0xb0), u32::MAX);
    assert_eq!(r32(&mut f.t, 0xfc), 0);
    w32(&mut f.t, 0x30, 1);
    assert_eq!(r32(&mut f.t, 0x34), 8);
    w32(&mut f.t, 0x30, 2);
    assert_eq!(r32(&mut f.t, 0x34), 0);
    assert_eq!(r32(&mut f.t, 0x44), 0);
}

#[test]
fn odd_accesses_are_ignored() {
    let mut f = fixture();
    // Wrong sizes and misaligned reads of registers read as zeros.
    for len in [1usize, 2, 8] {
        let mut b = vec![0xffu8; len];
        f.t.read(0x0, &mut b);
        assert!(b.iter().all(|&x| x == 0), "{len}-byte read");
    }
    let mut b = [0xffu8; 4];
    f.t.read(0x2, &mut b);
    assert_eq!(b, [0; 4]);
    // Unknown and write-only registers read as zero.
    for off in [0x18, 0x20, 0x30, 0x50, 0x64, 0xf8] {
        assert_eq!(r32(&mut f.t, off), 0, "offset {off:#x}");
    }
    // Writes to read-only registers change nothing; odd-sized writes are dropped.
    w32(&mut f.t, 0x0, 0);
    w32(&mut f.t, 0x8, 7);
    w32(&mut f.t, 0x60, 0xff);
    assert_eq!(r32(&mut f.t, 0x0), 0x7472_6976);
    assert_eq!(r32(&mut f.t, 0x8), 42);
    f.t.write(0x70, &[1]);
    f.t.write(0x70, &[1, 0]);
    f.t.write(0x70, &[1, 0, 0, 0, 0, 0, 0, 0]);
    f.t.write(0x71, &[1, 0, 0, 0]);
    assert_eq!(r32(&mut f.t, 0x70), 0);
    // Accesses far past the registers go to the configuration space, which zero-fills.
    let mut b = [0xffu8; 8];
    f.t.read(0xff8, &mut b);
    assert_eq!(b, [0; 8]);
    f.t.write(0xff8, &[1; 8]);
}

#[test]
fn config_space_reads_any_size() {
    let mut f = fixture();
    let mut b = [0u8; 1];
    f.t.read(0x101, &mut b);
    assert_eq!(b, [2]);
    let mut b = [0u8; 8];
    f.t.read(0x100, &mut b);
    assert_eq!(b, [1, 2, 3, 4, 5, 6, 7, 8]);
    let mut b = [0xffu8; 4];
    f.t.read(0x106, &mut b);
    assert_eq!(b, [7, 8, 0, 0]);
}

#[test]
fn full_initialisation_activates_the_device() {
    let mut f = fixture();
    let l = layouts(&f.mem);
    let s = drive_to_driver_ok(&mut f.t, FEATURES | (1 << 40), &l);
    assert_eq!(s, FULL);
    let d = f.dev.lock().unwrap();
    assert_eq!(d.acked, FEATURES, "features are masked with the offer");
    let qs = d.queues.as_ref().unwrap();
    assert_eq!(qs.len(), 2);
    assert_eq!(qs[0].size(), 16);
    assert_eq!(qs[0].desc_table(), l[0].desc);
    assert_eq!(qs[1].used_ring(), l[1].used);
    assert!(qs[0].event_idx_enabled());
    assert!(qs[1].ready());
    drop(d);
    assert_eq!(r32(&mut f.t, 0x44), 1);
    // Queue registers are frozen after DRIVER_OK.
    w32(&mut f.t, 0x30, 0);
    w32(&mut f.t, 0x44, 0);
    assert_eq!(r32(&mut f.t, 0x44), 1);
}

#[test]
fn unready_queues_are_passed_along_unready() {
    let mut f = fixture();
    let l = layouts(&f.mem);
    drive_to_features_ok(&mut f.t, FEATURES);
    setup_queue(&mut f.t, 0, l[0]);
    w32(&mut f.t, 0x70, FULL);
    let d = f.dev.lock().unwrap();
    let qs = d.queues.as_ref().unwrap();
    assert!(qs[0].ready() && !qs[1].ready());
}

#[test]
fn interrupt_status_and_ack() {
    let mut f = fixture();
    let irq = f.dev.lock().unwrap().irq.clone();
    irq.trigger(VIRTIO_MMIO_INT_VRING);
    assert_eq!(irq.evt().read().unwrap(), 1);
    assert_eq!(r32(&mut f.t, 0x60), VIRTIO_MMIO_INT_VRING);
    irq.trigger(VIRTIO_MMIO_INT_CONFIG);
    w32(&mut f.t, 0x64, VIRTIO_MMIO_INT_VRING);
    assert_eq!(r32(&mut f.t, 0x60), VIRTIO_MMIO_INT_CONFIG);
    w32(&mut f.t, 0x64, 0xffff_ffff);
    assert_eq!(r32(&mut f.t, 0x60), 0);
}

#[test]
fn direct_queue_notify_signals_the_queue_eventfd() {
    let mut f = fixture();
    w32(&mut f.t, 0x50, 1);
    assert_eq!(f.dev.lock().unwrap().evts[1].read().unwrap(), 1);
    assert!(f.dev.lock().unwrap().evts[0].read().is_err());
    // Unknown queue: nothing happens.
    w32(&mut f.t, 0x50, 9);
    w32(&mut f.t, 0x50, u32::MAX);
}

#[test]
fn status_state_machine_refuses_skips_and_regressions() {
    let mut f = fixture();
    // Skipping steps.
    w32(&mut f.t, 0x70, status::DRIVER_OK);
    assert_eq!(r32(&mut f.t, 0x70), 0);
    w32(&mut f.t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
    assert_eq!(r32(&mut f.t, 0x70), 0);
    w32(&mut f.t, 0x70, status::ACKNOWLEDGE);
    w32(&mut f.t, 0x70, status::ACKNOWLEDGE | status::FEATURES_OK);
    assert_eq!(r32(&mut f.t, 0x70), status::ACKNOWLEDGE);
    // Features written before DRIVER are ignored.
    w32(&mut f.t, 0x20, VIRTIO_F_VERSION_1 as u32);
    w32(&mut f.t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
    // Without VERSION_1, FEATURES_OK does not stick.
    w32(&mut f.t, 0x24, 0);
    w32(&mut f.t, 0x20, 1 << 3);
    w32(
        &mut f.t,
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_eq!(r32(&mut f.t, 0x70), status::ACKNOWLEDGE | status::DRIVER);
    w32(&mut f.t, 0x24, 1);
    w32(&mut f.t, 0x20, 1);
    w32(
        &mut f.t,
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_eq!(
        r32(&mut f.t, 0x70),
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK
    );
    // Features are frozen after FEATURES_OK.
    w32(&mut f.t, 0x24, 0);
    w32(&mut f.t, 0x20, 0);
    assert_eq!(f.dev.lock().unwrap().acked, VIRTIO_F_VERSION_1 | (1 << 3));
    // Clearing a bit is a regression.
    w32(&mut f.t, 0x70, status::ACKNOWLEDGE | status::FEATURES_OK);
    assert_eq!(
        r32(&mut f.t, 0x70),
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK
    );
    // FAILED sticks and blocks everything but a reset.
    w32(
        &mut f.t,
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::FAILED,
    );
    w32(&mut f.t, 0x70, FULL | status::FAILED);
    assert!(!f.dev.lock().unwrap().is_activated());
    assert_eq!(r32(&mut f.t, 0x70) & status::FAILED, status::FAILED);
    w32(&mut f.t, 0x70, 0);
    assert_eq!(r32(&mut f.t, 0x70), 0);
    assert_eq!(f.dev.lock().unwrap().acked, 0);
}

#[test]
fn bad_queue_sizes_are_ignored() {
    let mut f = fixture();
    // Before FEATURES_OK, queue registers are ignored.
    w32(&mut f.t, 0x30, 0);
    w32(&mut f.t, 0x38, 4);
    w32(&mut f.t, 0x44, 1);
    assert_eq!(r32(&mut f.t, 0x44), 0);
    drive_to_features_ok(&mut f.t, FEATURES);
    let mem = f.mem.clone();
    for bad in [0u32, 3, 12, 32, 65536, u32::MAX] {
        w32(&mut f.t, 0x38, bad);
    }
    setup_queue(&mut f.t, 1, layouts(&mem)[1]);
    w32(&mut f.t, 0x30, 0);
    w32(&mut f.t, 0x38, 5);
    w32(&mut f.t, 0x80, 0x1_0003); // misaligned descriptor table
    setup_queue(
        &mut f.t,
        0,
        QueueLayout {
            size: 4,
            ..layouts(&mem)[0]
        },
    );
    // Size and addresses are frozen while the queue is ready.
    w32(&mut f.t, 0x38, 8);
    w32(&mut f.t, 0x80, 0x5000);
    // Out-of-range queue selection.
    w32(&mut f.t, 0x30, 5);
    w32(&mut f.t, 0x38, 4);
    w32(&mut f.t, 0x44, 1);
    w32(&mut f.t, 0x70, FULL);
    let d = f.dev.lock().unwrap();
    let qs = d.queues.as_ref().unwrap();
    assert_eq!(qs[0].size(), 4);
    assert_eq!(qs[0].desc_table(), layouts(&mem)[0].desc);
    assert_eq!(qs[1].size(), 8);
}

#[test]
fn invalid_queue_addresses_mark_the_device_broken() {
    let mut f = fixture();
    let mut l = layouts(&f.mem);
    l[1].used = TEST_MEM_SIZE - 8; // used ring runs past the end of memory
    let irq = f.dev.lock().unwrap().irq.clone();
    let s = drive_to_driver_ok(&mut f.t, FEATURES, &l);
    assert_eq!(s, FULL | status::DEVICE_NEEDS_RESET);
    assert!(!f.dev.lock().unwrap().is_activated());
    assert_eq!(r32(&mut f.t, 0x60), VIRTIO_MMIO_INT_CONFIG);
    assert_eq!(irq.evt().read().unwrap(), 1);
    // Writing the status back with NEEDS_RESET set is harmless; a reset recovers.
    w32(&mut f.t, 0x70, s);
    w32(&mut f.t, 0x70, 0);
    assert_eq!(r32(&mut f.t, 0x70), 0);
    assert_eq!(r32(&mut f.t, 0x60), 0);
    let l = layouts(&f.mem);
    assert_eq!(drive_to_driver_ok(&mut f.t, FEATURES, &l), FULL);
    assert!(f.dev.lock().unwrap().is_activated());
}

#[test]
fn queue_above_4g_or_at_address_overflow_is_refused() {
    let mut f = fixture();
    let mut l = layouts(&f.mem);
    l[0].desc = 0xffff_ffff_ffff_fff0;
    assert_eq!(
        drive_to_driver_ok(&mut f.t, FEATURES, &l),
        FULL | status::DEVICE_NEEDS_RESET
    );
    assert!(!f.dev.lock().unwrap().is_activated());
}

#[test]
fn failed_activation_marks_the_device_broken() {
    let mut f = fixture();
    f.dev.lock().unwrap().fail = true;
    let l = layouts(&f.mem);
    assert_eq!(
        drive_to_driver_ok(&mut f.t, FEATURES, &l),
        FULL | status::DEVICE_NEEDS_RESET
    );
}

#[test]
fn reset_resets_device_and_queues() {
    let mut f = fixture();
    let l = layouts(&f.mem);
    drive_to_driver_ok(&mut f.t, FEATURES, &l);
    f.dev.lock().unwrap().irq.trigger(VIRTIO_MMIO_INT_VRING);
    w32(&mut f.t, 0x70, 0);
    let d = f.dev.lock().unwrap();
    assert_eq!(d.resets, 1);
    assert!(!d.is_activated());
    drop(d);
    assert_eq!(r32(&mut f.t, 0x60), 0);
    w32(&mut f.t, 0x30, 0);
    assert_eq!(r32(&mut f.t, 0x44), 0);
    // A second DRIVER_OK write on an active device is a no-op (same status).
    drive_to_driver_ok(&mut f.t, FEATURES, &l);
    w32(&mut f.t, 0x70, FULL);
    assert_eq!(f.dev.lock().unwrap().resets, 1);
    assert!(f.dev.lock().unwrap().is_activated());
}
