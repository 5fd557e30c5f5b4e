//! The boot timer: the guest's init writes [`BOOT_TIMER_MAGIC`] to it once it runs; the VMM
//! records how long that took since the VMM process started building the VM, and how much CPU
//! time the VMM process had used by then.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::devices::BusDevice;
use crate::layout::BOOT_TIMER_MAGIC;

/// What the boot timer saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BootTimerReading {
    /// Wall time from VMM start to the guest's write.
    pub wall: Duration,
    /// CPU time (user + system) the VMM process had used by then, vCPU threads included.
    pub vmm_cpu: Duration,
}

pub struct BootTimer {
    start: Instant,
    reading: Arc<Mutex<Option<BootTimerReading>>>,
}

impl BootTimer {
    pub fn new(start: Instant) -> Self {
        BootTimer {
            start,
            reading: Arc::new(Mutex::new(None)),
        }
    }

    /// Shared view of the reading, for metrics.
    pub fn reading(&self) -> Arc<Mutex<Option<BootTimerReading>>> {
        self.reading.clone()
    }
}

fn process_cpu_time() -> Duration {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct we pass; RUSAGE_SELF is always valid.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
    if rc != 0 {
        return Duration::ZERO;
    }
    // SAFETY: getrusage returned 0, so the struct is initialised.
    let ru = unsafe { ru.assume_init() };
    let tv =
        |t: libc::timeval| Duration::new(t.tv_sec.max(0) as u64, (t.tv_usec.max(0) as u32) * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.first() != Some(&BOOT_TIMER_MAGIC) {
            return;
        }
        let reading = BootTimerReading {
            wall: self.start.elapsed(),
            vmm_cpu: process_cpu_time(),
        };
        let mut r = crate::devices::lock(&self.reading);
        if r.is_none() {
            tracing::info!(
                "guest boot time: {:.1} ms wall, {:.1} ms VMM CPU",
                reading.wall.as_secs_f64() * 1e3,
                reading.vmm_cpu.as_secs_f64() * 1e3
            );
            *r = Some(reading);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_the_first_magic_write_only() {
        let mut t = BootTimer::new(Instant::now());
        let r = t.reading();
        t.write(0, &[1]);
        t.write(8, &[BOOT_TIMER_MAGIC]);
        assert!(r.lock().unwrap().is_none());
        t.write(0, &[BOOT_TIMER_MAGIC]);
        let first = r.lock().unwrap().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        t.write(0, &[BOOT_TIMER_MAGIC]);
        assert_eq!(r.lock().unwrap().unwrap(), first);
    }
}
