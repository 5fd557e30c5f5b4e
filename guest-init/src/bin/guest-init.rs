//! `guest-init`: PID 1 of Kindling's microVM guests (see the library's docs).
//!
//! As PID 1: set the system up (mounts, boot timer, loopback, host name), connect to the host
//! over vsock (CID 2, port `kindling.port`, default 9999), run the session, power off. It
//! never exits while the VM lives: every end (Shutdown, its own failure, a broken host
//! connection, a panic) is a power-off.
//!
//! With `KINDLING_GUEST_UNIX=PATH` in its environment, PID 1 connects to that Unix socket
//! instead (PID 1 of a pid namespace, for tests: see `tests/pid1.rs`).
//!
//! As an ordinary process, for debugging a host against it without a VM:
//! `guest-init --unix PATH [--api 127.0.0.1:9001]` connects to a Unix socket instead and
//! exits when the session ends (status 0 after a Shutdown, 1 otherwise).

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::process::ExitCode;

use guest_init::proto::HOST_CID;
use guest_init::system::{self, say};
use guest_init::vsock::{self, FdStream};
use guest_init::{GuestInit, Mode};

/// As PID 1, connect to this Unix socket instead of the host's vsock port (for running as
/// PID 1 of a pid namespace; the kernel also turns an unknown `NAME=value` on its command line
/// into an environment variable of init).
const UNIX_ENV: &str = "KINDLING_GUEST_UNIX";

fn main() -> ExitCode {
    if std::process::id() == 1 {
        pid1()
    }
    match process_mode(std::env::args().skip(1).collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("guest-init: {e}");
            ExitCode::FAILURE
        }
    }
}

fn pid1() -> ! {
    std::panic::set_hook(Box::new(|info| {
        say(format!("panic: {info}"));
        system::power_off();
    }));
    let params = system::boot();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say(format!("cannot start the async runtime: {e}"));
            system::power_off();
        }
    };
    let connected = match std::env::var_os(UNIX_ENV) {
        // PID 1 of a container (pid namespace) rather than a VM: tests and debugging.
        Some(path) => std::os::unix::net::UnixStream::connect(&path)
            .map(OwnedFd::from)
            .map_err(|e| format!("cannot connect to {}: {e}", path.to_string_lossy())),
        None => vsock::connect(HOST_CID, params.port, params.connect_timeout).map_err(|e| {
            format!(
                "cannot connect to the host (vsock {HOST_CID}:{}): {e}",
                params.port
            )
        }),
    };
    let fd = match connected {
        Ok(fd) => fd,
        Err(e) => {
            say(e);
            system::power_off();
        }
    };
    let unix = std::env::var_os(UNIX_ENV);
    // After a snapshot the host connection is made again (one try per call; the session
    // retries with backoff).
    let reconnect = || {
        let connected = match &unix {
            Some(path) => std::os::unix::net::UnixStream::connect(path).map(OwnedFd::from),
            None => vsock::connect(HOST_CID, params.port, std::time::Duration::ZERO),
        };
        std::future::ready(connected.and_then(FdStream::new))
    };
    let result = runtime.block_on(async {
        let stream = FdStream::new(fd).map_err(|e| e.to_string())?;
        GuestInit::new(Mode::Pid1)
            .run_session_with(stream, reconnect)
            .await
            .map_err(|e| e.to_string())
    });
    match result {
        Ok(end) => say(format!("shutting down ({})", end.reason)),
        Err(e) => say(format!("session ended: {e}")),
    }
    system::power_off()
}

fn process_mode(args: Vec<String>) -> Result<(), String> {
    const USAGE: &str =
        "usage: guest-init --unix PATH [--api ADDR]  (as PID 1 it takes no arguments)";
    let mut unix = None;
    let mut api: Option<SocketAddr> = None;
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--unix" => unix = it.next(),
            "--api" => {
                let v = it.next().ok_or(USAGE)?;
                api = Some(v.parse().map_err(|e| format!("--api {v}: {e}"))?);
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let path = unix.ok_or(USAGE)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let stream = tokio::net::UnixStream::connect(&path)
            .await
            .map_err(|e| format!("connecting to {path}: {e}"))?;
        let mut init = GuestInit::new(Mode::Process);
        if let Some(addr) = api {
            init = init.with_api_addr(addr);
        }
        let reconnect = || tokio::net::UnixStream::connect(&path);
        let end = init
            .run_session_with(stream, reconnect)
            .await
            .map_err(|e| e.to_string())?;
        eprintln!("guest-init: shut down ({})", end.reason);
        Ok(())
    })
}
