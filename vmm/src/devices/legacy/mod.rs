//! Legacy devices: the 8250 serial port, the i8042 (reset only) and the boot timer.
