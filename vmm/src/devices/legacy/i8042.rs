//! A minimal i8042 keyboard controller: enough for Linux's `reboot=k` path, which polls the
//! status port and writes the reset command 0xFE to port 0x64. That reset ends the VM.

use vmm_sys_util::eventfd::EventFd;

use crate::devices::BusDevice;
use crate::snapshot::persist::{I8042State, Persist, PersistError};

const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xFE;

pub struct I8042 {
    /// Written when the guest asks for a reset.
    reset_evt: EventFd,
    /// Linux writes the reset command several times; it is acted on once.
    reset_requested: bool,
}

impl I8042 {
    pub fn new(reset_evt: EventFd) -> Self {
        I8042 {
            reset_evt,
            reset_requested: false,
        }
    }
}

impl Persist for I8042 {
    type State = I8042State;
    type Context = ();

    fn save(&self) -> I8042State {
        I8042State {
            reset_requested: self.reset_requested,
        }
    }

    fn restore(&mut self, _: (), state: &I8042State) -> Result<(), PersistError> {
        self.reset_requested = state.reset_requested;
        Ok(())
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty, so `kb_wait()` returns at once.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (COMMAND_OFFSET, [CMD_RESET_CPU]) if !self.reset_requested => {
                self.reset_requested = true;
                tracing::info!("guest requested a reset through the i8042; stopping the VM");
                if let Err(e) = self.reset_evt.write(1) {
                    tracing::error!("cannot signal the reset: {e}");
                }
            }
            (DATA_OFFSET, _) | (COMMAND_OFFSET, _) => {}
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_reset_command_signals() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(evt.try_clone().unwrap());
        dev.write(COMMAND_OFFSET, &[0xAA]);
        dev.write(DATA_OFFSET, &[CMD_RESET_CPU]);
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU, 0]);
        assert!(evt.read().is_err(), "nothing signalled yet");
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1, "signalled once");
        let mut status = [0xffu8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status, [0]);
    }
}
