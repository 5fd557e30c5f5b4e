//! The 8250 UART (vm-superio) on port 0x3f8, its interrupt on an irqfd, its output to stdout, a
//! file, or nowhere. Output to a file is capped: a guest printing forever cannot fill the disk.

use std::fs::File;
use std::io::{self, Write};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::BusDevice;
use crate::snapshot::persist::{Persist, PersistError, SerialState};

/// Most bytes written to a serial log file; the rest is dropped (with one marker line).
pub const MAX_SERIAL_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// Raises the serial IRQ through an irqfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where the console goes.
pub enum SerialOutput {
    Sink,
    Stdout(io::Stdout),
    File { file: File, written: u64 },
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SerialOutput::Sink => Ok(buf.len()),
            SerialOutput::Stdout(s) => s.write(buf),
            SerialOutput::File { file, written } => {
                if *written >= MAX_SERIAL_FILE_BYTES {
                    return Ok(buf.len());
                }
                let n = file.write(buf)?;
                *written += n as u64;
                if *written >= MAX_SERIAL_FILE_BYTES {
                    let _ = file
                        .write_all(b"\n[kindling-vmm: serial log cap reached, dropping output]\n");
                }
                Ok(n)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            SerialOutput::Sink => Ok(()),
            SerialOutput::Stdout(s) => s.flush(),
            SerialOutput::File { file, .. } => file.flush(),
        }
    }
}

/// The serial device on the PIO bus.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, vm_superio::serial::NoEvents, SerialOutput>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: SerialOutput) -> Self {
        SerialDevice {
            serial: Serial::new(EventFdTrigger(irq), out),
        }
    }
}

impl Persist for SerialDevice {
    type State = SerialState;
    type Context = ();

    fn save(&self) -> SerialState {
        self.serial.state().into()
    }

    /// Keeps this device's interrupt eventfd and output; takes the registers from `state`.
    fn restore(&mut self, _: (), state: &SerialState) -> Result<(), PersistError> {
        let evt = |e: io::Error| PersistError::invalid("serial", e.to_string());
        let irq = self.serial.interrupt_evt().0.try_clone().map_err(evt)?;
        let placeholder = Serial::new(
            EventFdTrigger(irq.try_clone().map_err(evt)?),
            SerialOutput::Sink,
        );
        let old = std::mem::replace(&mut self.serial, placeholder);
        let out = old.into_writer();
        self.serial = Serial::from_state(
            &state.into(),
            EventFdTrigger(irq),
            vm_superio::serial::NoEvents,
            out,
        )
        .map_err(|e| PersistError::invalid("serial", format!("{e:?}")))?;
        Ok(())
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset > u8::MAX as u64 {
            data.fill(0);
            return;
        }
        data[0] = self.serial.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset > u8::MAX as u64 {
            return;
        }
        if let Err(e) = self.serial.write(offset as u8, data[0]) {
            tracing::debug!("serial write: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_reach_the_file_and_odd_accesses_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let file = File::create(&path).unwrap();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(evt, SerialOutput::File { file, written: 0 });
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        dev.write(0, &[1, 2]); // wrong size: ignored
        let mut d = [0xffu8; 2];
        dev.read(5, &mut d); // wrong size: zeros
        assert_eq!(d, [0, 0]);
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmitter empty");
        assert_eq!(std::fs::read(&path).unwrap(), b"hi\n");
    }
}
