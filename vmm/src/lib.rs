//! The Kindling VMM (issue #4): one microVM per process on the rust-vmm crates.
//!
//! Not built yet. The host agent's `microvm` backend refuses to start until it is, with an
//! error that says so.
