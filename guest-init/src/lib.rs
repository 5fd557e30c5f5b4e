//! `guest-init`: PID 1 of Kindling's microVM guests, and the host-guest protocol.
//!
//! - [`proto`]: the framed, versioned protocol over vsock that the host agent and guest-init
//!   share (the agent depends on this crate as a library for it).
//! - [`GuestInit`]: the logic that carries invocations between one host connection and the
//!   function's runtime (through `rapid-api`'s [`rapid_api::RuntimeCore`] and its HTTP front
//!   on 127.0.0.1:9001). It runs over any async stream, as PID 1 ([`Mode::Pid1`]) or as an
//!   ordinary process ([`Mode::Process`], for tests and host-side debugging).
//! - [`system`]: what only PID 1 does: mounts, loopback, host name, boot timer, power-off.
//! - [`vsock`]: the guest's connection to the host.
//! - [`image`]: how a container image's config becomes the runtime's command line.
//!
//! The static binary the guest runs is built by `rootfs::static_bin::build`.

pub mod env;
pub mod extensions;
pub mod image;
pub mod proto;
pub mod restore;
pub mod runtime;
mod session;
pub mod system;
pub mod vsock;

pub use session::{GuestInit, SessionEnd, SessionError, RUNTIME_API_ADDR};

/// How guest-init runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// As the VM's init: reaps every child; the caller sets the system up and powers off.
    Pid1,
    /// As an ordinary process: reaps only the runtime it started; runtimes die with the
    /// thread that spawned them. Nothing system-wide is touched.
    Process,
}
