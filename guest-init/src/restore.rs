//! Snapshots from the guest's side (issue 6): getting ready to be snapshotted, finding the
//! host again afterwards, and making each copy of the VM its own before it serves.
//!
//! The host sends [`PrepareSnapshot`] between invocations; guest-init waits until the runtime
//! is idle in `/next` (or `/restore/next` for snap-start), lets queued log lines out and
//! answers [`SnapshotReady`]. From then on a lost host connection means "snapshotted": the
//! VMM resets the vsock transport on restore (and the host drops the connection before
//! resuming the original), so guest-init reconnects ([`reconnect`]) instead of ending. On
//! the new connection it says Hello with `resumed`, and the host's [`Restored`] gives this
//! copy its clock, host name and fresh entropy ([`apply`]); a snap-start runtime's
//! after-restore hooks then run ([`RuntimeCore::restore`]) before Ready.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rapid_api::{CoreConfig, CoreError, InitializationType, RuntimeCore};

use crate::proto::{Configure, InitError, Message, Ready, Restored, SnapshotReady};
use crate::Mode;

/// First pause between reconnection attempts; doubled after each failure up to
/// [`RECONNECT_MAX_DELAY`].
const RECONNECT_FIRST_DELAY: Duration = Duration::from_millis(20);
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);
/// How long a copy keeps trying to reach the host before giving up (and powering off): the
/// host accepts the reconnection right after it restores or resumes the VM.
pub const RECONNECT_LIMIT: Duration = Duration::from_secs(30);

/// Time given to the log pumps to read what the runtime wrote before going idle, so that
/// those lines reach the host before the snapshot rather than once per copy after it.
const LOG_SETTLE: Duration = Duration::from_millis(50);

/// The core for a runtime started by `cfg`: snap-start when the host asked for it in
/// `AWS_LAMBDA_INITIALIZATION_TYPE` (the runtime may then call `/restore/next`).
pub(crate) fn core_config(cfg: &Configure) -> CoreConfig {
    let initialization_type = match cfg
        .environment
        .get("AWS_LAMBDA_INITIALIZATION_TYPE")
        .map(String::as_str)
    {
        Some("snap-start") => InitializationType::SnapStart,
        Some("provisioned-concurrency") => InitializationType::ProvisionedConcurrency,
        _ => InitializationType::OnDemand,
    };
    CoreConfig {
        function_name: cfg.function_name.clone(),
        function_version: cfg.function_version.clone(),
        handler: cfg.handler.clone(),
        memory_size_mb: Some(cfg.memory_mb),
        initialization_type,
        ..CoreConfig::default()
    }
}

/// What the environment looks like when the host asks to snapshot it.
pub(crate) struct EnvState<'a> {
    pub core: &'a Arc<RuntimeCore>,
    pub init_reported: bool,
    pub busy: bool,
    pub exited: bool,
    pub start_failed: bool,
}

/// Answers a PrepareSnapshot: waits (up to `idle_timeout`) until the runtime is idle, then
/// gives the log pumps a moment. `refused` says why the VM must not be snapshotted.
pub(crate) async fn prepare(env: EnvState<'_>, idle_timeout: Duration) -> SnapshotReady {
    let refuse = |why: &str| SnapshotReady {
        refused: Some(why.to_string()),
    };
    if env.start_failed || env.exited {
        return refuse("the runtime is not running");
    }
    if !env.init_reported {
        return refuse("init has not finished");
    }
    if env.busy {
        return refuse("an invocation is in progress");
    }
    match tokio::time::timeout(idle_timeout, env.core.wait_idle()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return refuse(&format!("the environment cannot serve: {e}")),
        Err(_) => return refuse("the runtime did not become idle in time"),
    }
    tokio::time::sleep(LOG_SETTLE).await;
    SnapshotReady { refused: None }
}

/// Connects to the host again with `connect`, retrying with backoff for up to
/// [`RECONNECT_LIMIT`].
pub async fn reconnect<S, F, Fut>(connect: &mut F) -> io::Result<S>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = io::Result<S>>,
{
    let start = Instant::now();
    let mut delay = RECONNECT_FIRST_DELAY;
    loop {
        match connect().await {
            Ok(s) => return Ok(s),
            Err(e) if start.elapsed() + delay > RECONNECT_LIMIT => return Err(e),
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RECONNECT_MAX_DELAY);
            }
        }
    }
}

/// A reconnector for sessions that cannot reconnect (the connection is all there is).
pub async fn no_reconnect<S>() -> io::Result<S> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "this session cannot reconnect to the host",
    ))
}

/// Makes this copy of the VM its own: clock, host name, entropy (PID 1 mode only; in
/// process mode each is skipped with a line on stderr), then the runtime's after-restore
/// hooks. Returns the guest's answer: Ready, or InitError when a hook failed.
pub(crate) async fn apply(mode: Mode, restored: &Restored, core: &RuntimeCore) -> Message {
    let started = Instant::now();
    if mode == Mode::Pid1 {
        if let Err(e) = crate::system::sync_clock(restored.host_time_ms) {
            crate::system::say(format!("setting the clock: {e}"));
        }
        if let Some(name) = &restored.hostname {
            if let Err(e) = crate::system::set_hostname(name) {
                crate::system::say(format!("setting the host name {name:?}: {e}"));
            }
        }
        if let Err(e) = add_entropy(&restored.entropy) {
            // Not fatal to serving, but every copy may then share RNG output: say so.
            crate::system::say(format!(
                "mixing the host's entropy into the kernel RNG: {e}"
            ));
        }
    } else {
        eprintln!(
            "guest-init: restored (process mode: clock, host name and {} bytes of entropy \
             not applied)",
            restored.entropy.len()
        );
    }
    match core.restore().await {
        Ok(()) => Message::Ready(Ready {
            init_duration_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        }),
        Err(CoreError::RestoreFailed(report)) | Err(CoreError::InitFailed(report)) => {
            Message::InitError(InitError {
                error_type: report.error_type,
                body: report.body,
            })
        }
        Err(e) => Message::InitError(InitError {
            error_type: "Runtime.Unknown".into(),
            body: serde_json::to_vec(&serde_json::json!({
                "errorMessage": format!("restore: {e}"),
                "errorType": "Runtime.Unknown",
            }))
            .unwrap_or_default()
            .into(),
        }),
    }
}

/// `RNDADDENTROPY` = `_IOW('R', 0x03, int[2])` and `RNDRESEEDCRNG` = `_IO('R', 0x07)`, from
/// Linux's `include/uapi/linux/random.h` (x86: `_IOW` = dir 1 << 30 | size 8 << 16 | 'R' << 8
/// | nr).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Adds `bytes` to the kernel's input pool, credited as full entropy, and reseeds the CRNG so
/// that `getrandom` output changes at once (not at the next periodic reseed). Needs
/// CAP_SYS_ADMIN (PID 1 has it).
pub fn add_entropy(bytes: &[u8]) -> io::Result<()> {
    if bytes.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the host sent no entropy",
        ));
    }
    let count = i32::try_from(bytes.len())
        .ok()
        .filter(|n| *n <= 4096)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "too much entropy"))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }, in u32 words
    // so that the buffer is aligned for the kernel's reading of it.
    let mut info = vec![0u32; 2 + bytes.len().div_ceil(4)];
    info[0] = (count * 8) as u32;
    info[1] = count as u32;
    for (i, b) in bytes.iter().enumerate() {
        let word = &mut info[2 + i / 4];
        let mut w = word.to_ne_bytes();
        w[i % 4] = *b;
        *word = u32::from_ne_bytes(w);
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/urandom")?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    // SAFETY: RNDADDENTROPY reads a rand_pool_info whose buf_size bytes follow the two ints;
    // `info` holds exactly that and lives for the call.
    if unsafe { libc::ioctl(fd, RNDADDENTROPY as _, info.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(fd, RNDRESEEDCRNG as _) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_encoding() {
        // _IOC(dir, type, nr, size) = dir << 30 | size << 16 | type << 8 | nr; _IOC_WRITE = 1.
        let ioc = |dir: u64, ty: u8, nr: u64, size: u64| {
            (dir << 30 | size << 16 | u64::from(ty) << 8 | nr) as libc::c_ulong
        };
        assert_eq!(RNDADDENTROPY, ioc(1, b'R', 0x03, 8));
        assert_eq!(RNDRESEEDCRNG, ioc(0, b'R', 0x07, 0));
    }

    #[test]
    fn snap_start_comes_from_the_environment() {
        let mut cfg = Configure {
            function_name: "f".into(),
            function_version: "$LATEST".into(),
            handler: "h".into(),
            memory_mb: 128,
            timeout_ms: 3000,
            region: "us-east-1".into(),
            runtime: crate::proto::RuntimeKind::Provided,
            task_root: "/var/task".into(),
            environment: Default::default(),
            init_timeout_ms: 0,
            run_as: None,
            hostname: None,
            host_time_ms: None,
            entropy_hex: None,
        };
        assert_eq!(
            core_config(&cfg).initialization_type,
            InitializationType::OnDemand
        );
        cfg.environment
            .insert("AWS_LAMBDA_INITIALIZATION_TYPE".into(), "snap-start".into());
        assert_eq!(
            core_config(&cfg).initialization_type,
            InitializationType::SnapStart
        );
    }

    #[tokio::test]
    async fn reconnect_retries_then_gives_up_or_succeeds() {
        let mut tries = 0;
        let mut connect = || {
            tries += 1;
            let n = tries;
            async move {
                if n < 3 {
                    Err(io::Error::from(io::ErrorKind::ConnectionRefused))
                } else {
                    Ok(n)
                }
            }
        };
        assert_eq!(reconnect(&mut connect).await.unwrap(), 3);
    }
}
