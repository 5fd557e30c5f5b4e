//! Legacy devices: the 8250 serial port, the i8042 (reset only) and the boot timer.

mod boot_timer;
mod i8042;
mod serial;

pub use boot_timer::{BootTimer, BootTimerReading};
pub use i8042::I8042;
pub use serial::{EventFdTrigger, SerialDevice, SerialOutput};
