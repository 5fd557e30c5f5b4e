//! External extensions inside the guest: found, started and registered before the runtime,
//! their output forwarded, their exits reported to the core, and Lambda's shutdown phase.
//!
//! Where they are: the executable regular files (by name) in [`OPT_EXTENSIONS`] (what a
//! layer or a container image puts there) and in `<task root>/extensions` (a directory or ZIP
//! function's `extensions/` directory lands at `/var/task/extensions` in its root image:
//! Kindling has no layers, so that directory plays the part of `/opt/extensions`, as in the
//! process backend). A name found in both is taken from `/opt/extensions`. At most
//! [`MAX_EXTENSIONS`]; more is an `Extension.InitError` and nothing is started.
//!
//! Each runs with the runtime's environment (incl. `AWS_LAMBDA_RUNTIME_API`), user and working
//! directory, in a process group of its own (so SIGTERM to the runtime's group spares it: an
//! extension hears of shutdown through its SHUTDOWN event).

use std::collections::BTreeMap;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rapid_api::{CoreError, ErrorReport, RuntimeCore, ShutdownReason, MAX_EXTENSIONS};
use tokio::sync::mpsc;

use crate::proto::{Message, RunAs, Stream};
use crate::runtime::{self, Reaper};
use crate::Mode;

/// Where layers (and container images) put external extensions.
pub const OPT_EXTENSIONS: &str = "/opt/extensions";

/// Why the extensions' init failed.
#[derive(Debug, thiserror::Error)]
pub enum ExtensionError {
    #[error("Too many extensions: {count} executables in {dirs}; Lambda allows at most {MAX_EXTENSIONS}")]
    TooMany { count: usize, dirs: String },
    #[error("cannot read {dir}: {source}")]
    Scan { dir: String, source: io::Error },
    #[error("Extension {name} could not be started: {source}")]
    Launch { name: String, source: io::Error },
    #[error("Extension {name} exited before it registered")]
    ExitedEarly { name: String },
    /// An extension reported `init/error`, or a registered one exited.
    #[error("{}", .0.error_type)]
    Init(ErrorReport),
    /// The init limit passed before every extension registered.
    #[error("the extensions did not register within {0:?}")]
    Timeout(Duration),
    #[error("the environment was closed during extension init")]
    Closed,
}

impl ExtensionError {
    /// The error document the caller gets, as Lambda reports it.
    pub fn report(&self) -> ErrorReport {
        match self {
            ExtensionError::Init(r) => r.clone(),
            ExtensionError::TooMany { .. } | ExtensionError::Scan { .. } => {
                ErrorReport::platform("Extension.InitError", self.to_string())
            }
            ExtensionError::Launch { .. } => {
                ErrorReport::platform("Extension.LaunchError", self.to_string())
            }
            ExtensionError::ExitedEarly { .. } => {
                ErrorReport::platform("Extension.Crash", self.to_string())
            }
            ExtensionError::Timeout(_) | ExtensionError::Closed => {
                ErrorReport::platform("Extension.InitError", self.to_string())
            }
        }
    }
}

/// Where extensions are looked for, in order.
pub fn dirs(task_root: &str) -> Vec<PathBuf> {
    vec![
        PathBuf::from(OPT_EXTENSIONS),
        Path::new(task_root).join("extensions"),
    ]
}

/// The external extensions in `dirs`: executable regular files (symlinks followed), by name,
/// sorted within each directory; a name already found is skipped. A missing directory has none.
pub fn find(dirs: &[PathBuf]) -> Result<Vec<(String, PathBuf)>, ExtensionError> {
    let mut found: Vec<(String, PathBuf)> = Vec::new();
    for dir in dirs {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                continue
            }
            Err(source) => {
                return Err(ExtensionError::Scan {
                    dir: dir.display().to_string(),
                    source,
                })
            }
        };
        let mut here = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                here.push((entry.file_name().to_string_lossy().into_owned(), path));
            }
        }
        here.sort();
        for (name, path) in here {
            if !found.iter().any(|(n, _)| *n == name) {
                found.push((name, path));
            }
        }
    }
    Ok(found)
}

/// Feeds output lines to the core's Telemetry API: runtime lines as `function` records,
/// extension lines as `extension` records (and names the extension in the Log frames).
#[derive(Clone)]
pub(crate) struct LogTap {
    pub core: Arc<RuntimeCore>,
    pub extension: Option<String>,
}

impl LogTap {
    pub(crate) fn record(&self, line: &[u8]) {
        let text = String::from_utf8_lossy(line).into_owned();
        match &self.extension {
            Some(name) => self.core.extension_log(name, text),
            None => self.core.function_log(text),
        }
    }
}

/// What an extension start needs from the session.
pub(crate) struct Launch<'a> {
    pub task_root: &'a str,
    /// The runtime's environment (without `AWS_LAMBDA_RUNTIME_API`).
    pub env: &'a BTreeMap<String, String>,
    pub api_addr: &'a str,
    pub run_as: Option<RunAs>,
    pub mode: Mode,
    pub reaper: &'a Arc<Reaper>,
    pub out: mpsc::Sender<Message>,
    pub core: &'a Arc<RuntimeCore>,
    pub max_log_line: usize,
    /// When init must be over (`None`: no limit in the guest), and the limit itself.
    pub deadline: Option<Instant>,
    pub init_timeout: Duration,
}

/// The running extensions of an environment. Dropping it SIGKILLs their process groups.
pub(crate) struct Extensions {
    names: Vec<String>,
    pgids: Vec<libc::pid_t>,
    /// Set once the shutdown phase began: exits are acknowledgements, not crashes.
    shutting_down: Arc<AtomicBool>,
    /// The runtime's process group, once started (0 before): an extension crash after init
    /// kills it, so the host sees the environment die and replaces it (Lambda resets it).
    runtime_pgid: Arc<AtomicI32>,
}

impl Extensions {
    pub(crate) fn count(&self) -> usize {
        self.names.len()
    }

    /// The runtime has been started in process group `pgid`.
    pub(crate) fn set_runtime(&self, pgid: libc::pid_t) {
        self.runtime_pgid.store(pgid, Ordering::SeqCst);
    }

    /// Lambda's shutdown phase for the extensions: SHUTDOWN (with the host's reason) to each
    /// subscriber, until each is back in `event/next`, has exited, or `deadline` passed. The
    /// caller has sent the runtime SIGTERM and SIGKILLs everything afterwards.
    pub(crate) async fn shutdown(&self, core: &RuntimeCore, reason: &str, deadline: Instant) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let reason = match reason {
            "timeout" => ShutdownReason::Timeout,
            "failure" => ShutdownReason::Failure,
            _ => ShutdownReason::Spindown,
        };
        let report = core.shutdown(reason, deadline).await;
        if !report.timed_out.is_empty() {
            crate::system::say(format!(
                "extensions not done at the shutdown deadline: {}",
                report.timed_out.join(", ")
            ));
        }
    }

    fn kill(&self) {
        for &pgid in &self.pgids {
            runtime::signal_group(pgid, libc::SIGKILL);
        }
    }
}

impl Drop for Extensions {
    fn drop(&mut self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.kill();
    }
}

/// Starts the extensions found for `launch.task_root` and waits until each has registered
/// (Lambda's extension init, before the runtime starts). `Ok(None)`: there are none. On an
/// error, whatever was started has been killed.
pub(crate) async fn start(launch: Launch<'_>) -> Result<Option<Extensions>, ExtensionError> {
    let dirs = dirs(launch.task_root);
    let found = find(&dirs)?;
    if found.is_empty() {
        return Ok(None);
    }
    if found.len() > MAX_EXTENSIONS {
        let dirs: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        return Err(ExtensionError::TooMany {
            count: found.len(),
            dirs: dirs.join(" and "),
        });
    }
    let mut exts = Extensions {
        names: Vec::new(),
        pgids: Vec::new(),
        shutting_down: Arc::new(AtomicBool::new(false)),
        runtime_pgid: Arc::new(AtomicI32::new(0)),
    };
    let (exit_tx, mut exits) = mpsc::unbounded_channel::<String>();
    for (name, path) in &found {
        let mut cmd = Command::new(path);
        cmd.current_dir(launch.task_root)
            .env_clear()
            .envs(launch.env)
            .env("AWS_LAMBDA_RUNTIME_API", launch.api_addr)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(user) = launch.run_as {
            cmd.gid(user.gid).uid(user.uid);
        }
        if launch.mode == Mode::Process {
            // SAFETY: the closure runs in the forked child before exec and only calls prctl,
            // which is async-signal-safe; it ties the extension's life to the spawning thread.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let (mut child, mut exit) = match launch.reaper.spawn(&mut cmd) {
            Ok(spawned) => spawned,
            Err(source) => {
                return Err(ExtensionError::Launch {
                    name: name.clone(),
                    source,
                })
            }
        };
        exts.pgids.push(child.id() as libc::pid_t);
        exts.names.push(name.clone());
        let tap = LogTap {
            core: launch.core.clone(),
            extension: Some(name.clone()),
        };
        let pipes = [
            (child.stdout.take().map(OwnedFd::from), Stream::Stdout),
            (child.stderr.take().map(OwnedFd::from), Stream::Stderr),
        ];
        for (fd, stream) in pipes {
            if let Some(fd) = fd {
                tokio::spawn(runtime::pump_logs(
                    fd,
                    stream,
                    launch.out.clone(),
                    launch.max_log_line,
                    Some(tap.clone()),
                ));
            }
        }
        // Dropping a std Child neither kills nor waits: the reaper collects it.
        drop(child);
        let core = launch.core.clone();
        let (name, exit_tx) = (name.clone(), exit_tx.clone());
        let (shutting_down, runtime_pgid) = (exts.shutting_down.clone(), exts.runtime_pgid.clone());
        tokio::spawn(async move {
            let _ = exit.wait_for(Option::is_some).await;
            let crashed = !shutting_down.load(Ordering::SeqCst);
            if crashed {
                crate::system::say(format!("extension {name} exited"));
            }
            // During shutdown this is its acknowledgement; otherwise the core fails the
            // environment with Extension.Crash.
            core.extension_exited(&name);
            let _ = exit_tx.send(name);
            if crashed {
                runtime::signal_group(runtime_pgid.load(Ordering::SeqCst), libc::SIGKILL);
            }
        });
    }
    drop(exit_tx);
    let limit = async {
        match launch.deadline {
            Some(d) => tokio::time::sleep_until(d.into()).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(limit);
    let count = exts.count();
    loop {
        tokio::select! {
            biased;
            r = launch.core.wait_registered(count) => {
                return match r {
                    Ok(()) => Ok(Some(exts)),
                    Err(CoreError::InitFailed(report)) => Err(ExtensionError::Init(report)),
                    Err(_) => Err(ExtensionError::Closed),
                };
            }
            Some(name) = exits.recv() => {
                if !launch.core.registered_extensions().contains(&name) {
                    return Err(ExtensionError::ExitedEarly { name });
                }
                // A registered one: the core fails init with Extension.Crash.
            }
            _ = &mut limit => return Err(ExtensionError::Timeout(launch.init_timeout)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_executables_first_dir_wins() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let put = |dir: &Path, name: &str, mode: u32| {
            let p = dir.join(name);
            std::fs::write(&p, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        put(a.path(), "zeta", 0o755);
        put(a.path(), "same", 0o755);
        put(b.path(), "same", 0o755);
        put(b.path(), "alpha", 0o700);
        put(b.path(), "data.txt", 0o644);
        std::fs::create_dir(b.path().join("subdir")).unwrap();
        let dirs = vec![
            a.path().to_path_buf(),
            b.path().to_path_buf(),
            a.path().join("missing"),
        ];
        let found = find(&dirs).unwrap();
        let names: Vec<_> = found.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["same", "zeta", "alpha"]);
        assert!(found[0].1.starts_with(a.path()));
    }
}
