//! Devices and the buses that route guest accesses to them.
//!
//! A vCPU exit for an MMIO or port I/O access is looked up on a [`Bus`] and handed to the
//! device owning that range, with the offset into the range. Devices are shared between vCPU
//! threads and the event loop, hence `Arc<Mutex<..>>`.

pub mod legacy;
pub mod virtio;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the start of the device's range; `data` is the
/// access (1, 2, 4 or 8 bytes, as the guest made it). Unknown offsets read as zeros and ignore
/// writes: a guest poking around must not break the VMM.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

pub type SharedBusDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    #[error("bus range of zero length at {0:#x}")]
    Empty(u64),
}

/// An address space (MMIO or port I/O) of non-overlapping device ranges.
#[derive(Default, Clone)]
pub struct Bus {
    /// base -> (len, device)
    devices: BTreeMap<u64, (u64, SharedBusDevice)>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, device: SharedBusDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        let before = self.devices.range(..end).next_back();
        if let Some((&b, &(l, _))) = before {
            if b + l > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    /// The device at `addr` and the offset into its range.
    pub fn resolve(&self, addr: u64) -> Option<(&SharedBusDevice, u64)> {
        let (&base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < *len).then_some((dev, offset))
    }

    /// Routes a read; returns false if no device owns `addr` (the data is then zeroed).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, offset)) => {
                lock(dev).read(offset, data);
                true
            }
            None => {
                data.fill(0);
                false
            }
        }
    }

    /// Routes a write; returns false if no device owns `addr` (the write is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, offset)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned lock: a panic in one device access must not
/// take every later access down with it.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_and_refuses_overlaps() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(a.clone(), 0x1000, 0x100).unwrap();
        assert_eq!(
            bus.insert(a.clone(), 0x10ff, 0x10),
            Err(BusError::Overlap {
                base: 0x10ff,
                len: 0x10
            })
        );
        assert_eq!(
            bus.insert(a.clone(), 0xff0, 0x20),
            Err(BusError::Overlap {
                base: 0xff0,
                len: 0x20
            })
        );
        assert!(bus.insert(a.clone(), u64::MAX, 2).is_err());
        bus.insert(a.clone(), 0x1100, 0x10).unwrap();
        let mut d = [9u8; 4];
        assert!(bus.read(0x1004, &mut d));
        assert_eq!(d, [4; 4]);
        assert!(!bus.read(0x2000, &mut d));
        assert_eq!(d, [0; 4]);
        assert!(bus.write(0x1102, &[1, 2]));
        assert_eq!(lock(&a).0, vec![(2, vec![1, 2])]);
    }
}
