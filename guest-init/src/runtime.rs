//! Starting the function's runtime, reaping children, and forwarding the runtime's output.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rapid_api::ErrorReport;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};

use crate::proto::{Configure, Log, Message, RuntimeKind, Stream};
use crate::{image, Mode};

/// Longest log line forwarded as one message (Lambda cuts lines at 256 KiB).
pub const MAX_LOG_LINE: usize = 256 * 1024;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl ExitInfo {
    /// Neither code nor signal known (someone else reaped it).
    pub const UNKNOWN: ExitInfo = ExitInfo {
        code: None,
        signal: None,
    };

    /// From a `waitpid` status.
    pub fn from_wait_status(status: libc::c_int) -> Self {
        if libc::WIFEXITED(status) {
            ExitInfo {
                code: Some(libc::WEXITSTATUS(status)),
                signal: None,
            }
        } else if libc::WIFSIGNALED(status) {
            ExitInfo {
                code: None,
                signal: Some(libc::WTERMSIG(status)),
            }
        } else {
            ExitInfo::UNKNOWN
        }
    }

    /// Lambda's wording, as in `Runtime exited with error: exit status 42`.
    pub fn describe(&self) -> String {
        match (self.code, self.signal) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(libc::SIGKILL)) => "signal: killed".into(),
            (None, Some(libc::SIGSEGV)) => "signal: segmentation fault".into(),
            (None, Some(libc::SIGABRT)) => "signal: aborted".into(),
            (None, Some(libc::SIGTERM)) => "signal: terminated".into(),
            (None, Some(sig)) => format!("signal: {sig}"),
            (None, None) => "unknown exit".into(),
        }
    }
}

type ExitTx = watch::Sender<Option<ExitInfo>>;
pub(crate) type ExitRx = watch::Receiver<Option<ExitInfo>>;

/// Waits for children and routes the exit of the ones we track to their watchers.
///
/// As PID 1 (`all`), it reaps every child, orphans included (`waitpid(-1)`); as an ordinary
/// process it reaps only the pids it spawned, so that it never steals another part of the
/// process's children (the tests run many sessions in one process).
pub(crate) struct Reaper {
    all: bool,
    tracked: Mutex<HashMap<libc::pid_t, ExitTx>>,
}

impl Reaper {
    pub(crate) fn new(mode: Mode) -> Arc<Self> {
        Arc::new(Reaper {
            all: mode == Mode::Pid1,
            tracked: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<libc::pid_t, ExitTx>> {
        self.tracked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawns `cmd` and tracks its pid. The table stays locked across the spawn, so the
    /// child cannot be reaped before it is tracked.
    pub(crate) fn spawn(&self, cmd: &mut Command) -> io::Result<(std::process::Child, ExitRx)> {
        let mut tracked = self.lock();
        let child = cmd.spawn()?;
        let (tx, rx) = watch::channel(None);
        tracked.insert(child.id() as libc::pid_t, tx);
        Ok((child, rx))
    }

    /// Collects every child that has exited.
    pub(crate) fn reap(&self) {
        let mut tracked = self.lock();
        if self.all {
            loop {
                let mut status = 0;
                // SAFETY: waitpid writes only to `status`, a live local.
                let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
                if pid <= 0 {
                    break;
                }
                if let Some(tx) = tracked.remove(&pid) {
                    tx.send_replace(Some(ExitInfo::from_wait_status(status)));
                }
            }
        } else {
            tracked.retain(|&pid, tx| {
                let mut status = 0;
                // SAFETY: as above; `pid` is a child we spawned.
                let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
                if r == pid {
                    tx.send_replace(Some(ExitInfo::from_wait_status(status)));
                    false
                } else if r < 0 {
                    // ECHILD: it is gone and someone else collected it.
                    tx.send_replace(Some(ExitInfo::UNKNOWN));
                    false
                } else {
                    true
                }
            });
        }
    }

    /// Reaps until every tracked child has been collected or `timeout` has passed (after
    /// the runtime was killed: no zombie is left behind in a long-lived process).
    pub(crate) async fn settle(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.reap();
            if self.lock().is_empty() || tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Reaps on every SIGCHLD until dropped (as PID 1, for the VM's whole life). An ordinary
    /// process also polls now and then: SIGCHLD is shared with the rest of the process.
    pub(crate) async fn run(self: Arc<Self>) {
        let mut sigchld = signal(SignalKind::child()).ok();
        let poll = match (&sigchld, self.all) {
            (None, _) => Duration::from_millis(200),
            (Some(_), true) => Duration::from_secs(60),
            (Some(_), false) => Duration::from_millis(500),
        };
        loop {
            self.reap();
            match &mut sigchld {
                Some(s) => {
                    tokio::select! {
                        _ = s.recv() => {}
                        _ = tokio::time::sleep(poll) => {}
                    }
                }
                None => tokio::time::sleep(poll).await,
            }
        }
    }
}

/// How the runtime starts: its command (program and arguments), working directory and
/// environment.
pub(crate) struct RuntimeLaunch {
    pub command: Command,
    pub working_dir: String,
    pub env: BTreeMap<String, String>,
}

/// The runtime's program and arguments, or the init error when there is nothing to run.
pub(crate) fn runtime_command(cfg: &Configure) -> Result<RuntimeLaunch, ErrorReport> {
    let plain = |command: Command| RuntimeLaunch {
        command,
        working_dir: cfg.task_root.clone(),
        env: cfg.environment.clone(),
    };
    match &cfg.runtime {
        RuntimeKind::Provided => {
            let candidates = [
                Path::new(&cfg.task_root).join("bootstrap"),
                PathBuf::from("/opt/bootstrap"),
            ];
            match candidates.iter().find(|p| p.is_file()) {
                Some(bootstrap) => Ok(plain(Command::new(bootstrap))),
                None => Err(ErrorReport::platform(
                    "Runtime.InvalidEntrypoint",
                    format!(
                        "Couldn't find valid bootstrap(s): [{} {}]",
                        candidates[0].display(),
                        candidates[1].display()
                    ),
                )),
            }
        }
        RuntimeKind::Python { interpreter } => {
            let mut cmd = Command::new(interpreter);
            cmd.args(["-m", "awslambdaric", &cfg.handler]);
            Ok(plain(cmd))
        }
        RuntimeKind::Image {
            config_path,
            entrypoint,
            command,
            working_dir,
        } => {
            let start = image::read(Path::new(config_path))?;
            let overrides = image::Overrides {
                entrypoint: entrypoint.as_deref(),
                command: command.as_deref(),
                working_dir: working_dir.as_deref(),
            };
            let launch = image::launch(&start, &overrides, &cfg.environment)?;
            let mut cmd = Command::new(&launch.argv[0]);
            cmd.args(&launch.argv[1..]);
            Ok(RuntimeLaunch {
                command: cmd,
                working_dir: launch.working_dir,
                env: launch.env,
            })
        }
    }
}

/// Adds what every runtime gets: cwd, environment, user, its own process group, piped output.
pub(crate) fn prepare(launch: &mut RuntimeLaunch, cfg: &Configure, api_addr: &str, mode: Mode) {
    let cmd = &mut launch.command;
    cmd.current_dir(&launch.working_dir)
        .env_clear()
        .envs(&launch.env)
        .env("AWS_LAMBDA_RUNTIME_API", api_addr)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that stopping reaches the whole tree.
        .process_group(0);
    if let Some(user) = cfg.run_as {
        // std drops supplementary groups, then sets the gid, then the uid.
        cmd.gid(user.gid).uid(user.uid);
    }
    if mode == Mode::Process {
        // SAFETY: the closure runs in the forked child before exec and only calls prctl,
        // which is async-signal-safe. It runs after std's setuid, which would clear the
        // setting. The runtime then dies with the thread that spawned it (a test's thread).
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

/// Whether a spawn error is the function's fault (`Runtime.InvalidEntrypoint`): not there,
/// not executable, not a valid executable.
pub(crate) fn is_entrypoint_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT | libc::EACCES | libc::ENOEXEC | libc::ENOTDIR)
    )
}

/// Sends a signal to a process group; a group that is already gone is fine.
pub(crate) fn signal_group(pgid: libc::pid_t, sig: libc::c_int) {
    if pgid <= 1 {
        return;
    }
    // SAFETY: kill(2) with a negative pid signals the process group the runtime leads
    // (`process_group(0)` made its pid the group id); it touches no memory of ours.
    unsafe {
        libc::kill(-pgid, sig);
    }
}

/// Forwards one output stream of the runtime as [`Log`] messages, a line at a time, lines
/// cut at `max_line` bytes. Ends at end of stream or when the host side is gone. With a
/// `tap`, each line also goes to the core's Telemetry API (and Logs name the extension).
pub(crate) async fn pump_logs(
    fd: OwnedFd,
    stream: Stream,
    tx: mpsc::Sender<Message>,
    max_line: usize,
    tap: Option<crate::extensions::LogTap>,
) {
    let Ok(pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
        return;
    };
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader)
            .take(max_line as u64)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let partial = line.last() != Some(&b'\n');
                if !partial {
                    line.pop();
                }
                if let Some(t) = &tap {
                    t.record(&line);
                }
                let msg = Message::Log(Log {
                    stream,
                    partial,
                    extension: tap.as_ref().and_then(|t| t.extension.clone()),
                    line: Bytes::copy_from_slice(&line),
                });
                if tx.send(msg).await.is_err() {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_descriptions_match_lambda() {
        let d = |code, signal| ExitInfo { code, signal }.describe();
        assert_eq!(d(Some(42), None), "exit status 42");
        assert_eq!(d(None, Some(libc::SIGKILL)), "signal: killed");
        assert_eq!(d(None, Some(libc::SIGSEGV)), "signal: segmentation fault");
        assert_eq!(d(None, Some(libc::SIGHUP)), "signal: 1");
        assert_eq!(ExitInfo::UNKNOWN.describe(), "unknown exit");
        // waitpid status encoding: exit code in bits 8-15, signal in the low 7 bits.
        assert_eq!(ExitInfo::from_wait_status(3 << 8).code, Some(3));
        assert_eq!(
            ExitInfo::from_wait_status(libc::SIGTERM).signal,
            Some(libc::SIGTERM)
        );
    }
}
