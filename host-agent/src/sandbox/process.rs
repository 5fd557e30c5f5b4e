//! The process backend: each environment is a child process tree on this host.
//!
//! It is the development and test backend and **isolates nothing**: the runtime runs as the
//! agent's user, sees the host's file system and network, and shares the kernel. What it does
//! give each environment: its own Runtime API listener on a free loopback port (served by
//! `rapid-api` inside the agent), its own working directory `<data-dir>/envs/<id>/` holding a
//! hard-linked copy of the code as the task root plus a private `tmp/`, Lambda's environment
//! variables, its own process group (killed as a whole), and one invocation at a time.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rapid_api::{CoreError, ErrorReport, Invocation, InvokeOutcome, RuntimeCore};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::sync::{mpsc, oneshot, watch, OnceCell};

use super::{Backend, EnvSpec, InvokeRequest, Sandbox, StartError};
use crate::functions::{Function, Runtime};
use crate::logs::{EnvLog, InvocationEnd, LogStore};

/// Longest log line forwarded as one record (Lambda cuts lines at 256 KiB).
const MAX_LOG_LINE: usize = 256 * 1024;
/// How long an invocation's end waits for the output pumps to catch up.
const LOG_SYNC_LIMIT: Duration = Duration::from_secs(1);

pub struct ProcessBackend {
    envs_dir: PathBuf,
    python: PathBuf,
    /// Result of checking once that `python` can import `awslambdaric`.
    python_check: OnceCell<Result<(), String>>,
    logs: Arc<LogStore>,
}

impl ProcessBackend {
    /// `envs_dir` is emptied: environments do not survive the agent.
    pub fn new(envs_dir: PathBuf, python: PathBuf, logs: Arc<LogStore>) -> std::io::Result<Self> {
        if envs_dir.exists() {
            std::fs::remove_dir_all(&envs_dir)?;
        }
        std::fs::create_dir_all(&envs_dir)?;
        Ok(ProcessBackend {
            envs_dir,
            python,
            python_check: OnceCell::new(),
            logs,
        })
    }

    async fn check_python(&self) -> Result<(), StartError> {
        let result = self
            .python_check
            .get_or_init(|| async {
                let out = Command::new(&self.python)
                    .args(["-c", "import awslambdaric"])
                    .stdin(Stdio::null())
                    .output()
                    .await;
                match out {
                    Ok(o) if o.status.success() => Ok(()),
                    Ok(o) => Err(format!(
                        "the Python interpreter {} cannot import awslambdaric ({}); install it with \
                         `{0} -m pip install awslambdaric` or point `kindling serve --python` at one that can",
                        self.python.display(),
                        String::from_utf8_lossy(&o.stderr).trim().lines().last().unwrap_or("")
                    )),
                    Err(e) => Err(format!(
                        "cannot run the Python interpreter {}: {e}; pass `kindling serve --python PATH`",
                        self.python.display()
                    )),
                }
            })
            .await;
        result.clone().map_err(StartError::Host)
    }

    fn runtime_command(&self, f: &Function, task_root: &Path) -> Result<Command, StartError> {
        let runtime = Runtime::parse(&f.config.runtime)
            .ok_or_else(|| StartError::Host(format!("unsupported runtime {}", f.config.runtime)))?;
        match runtime {
            Runtime::Provided => {
                let bootstrap = task_root.join("bootstrap");
                if !bootstrap.is_file() {
                    return Err(StartError::Function(ErrorReport::platform(
                        "Runtime.InvalidEntrypoint",
                        format!(
                            "Couldn't find valid bootstrap(s): [{}]",
                            bootstrap.display()
                        ),
                    )));
                }
                Ok(Command::new(bootstrap))
            }
            Runtime::Python311 => {
                let mut cmd = Command::new(&self.python);
                cmd.args(["-m", "awslambdaric", &f.config.handler]);
                Ok(cmd)
            }
        }
    }
}

#[async_trait]
impl Backend for ProcessBackend {
    fn name(&self) -> &'static str {
        "process"
    }

    async fn start(&self, spec: EnvSpec) -> Result<Box<dyn Sandbox>, StartError> {
        let f = spec.function.clone();
        if f.image_source().is_some() {
            // An image is a whole root file system: it needs its own (a microVM).
            return Err(StartError::Host(format!(
                "{} is a container image function: the process backend cannot run images; \
                 serve with --backend microvm",
                f.config.function_name
            )));
        }
        if Runtime::parse(&f.config.runtime) == Some(Runtime::Python311) {
            self.check_python().await?;
        }
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let env_dir = self.envs_dir.join(&id);
        let task_root = env_dir.join("task");
        let tmp = env_dir.join("tmp");
        {
            let (code, task_root, tmp) = (f.code_dir.clone(), task_root.clone(), tmp.clone());
            tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&tmp)?;
                link_tree(&code, &task_root)
            })
            .await
            .map_err(|e| StartError::Host(e.to_string()))?
            .map_err(|e| StartError::Host(format!("preparing {}: {e}", env_dir.display())))?;
        }
        // From here on, `env` cleans up (kills, removes the directory) when dropped.
        let core = RuntimeCore::new();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| StartError::Host(format!("binding a Runtime API port: {e}")))?;
        let api_addr = listener
            .local_addr()
            .map_err(|e| StartError::Host(e.to_string()))?;
        let (stop_api, api_stopped) = oneshot::channel::<()>();
        tokio::spawn(rapid_api::http::serve(listener, core.clone(), async {
            let _ = api_stopped.await;
        }));
        let (exit_tx, exit_rx) = watch::channel(None);
        let cfg = &f.config;
        let now = chrono::Utc::now();
        let stream_name = format!("{}/[{}]{id}", now.format("%Y/%m/%d"), cfg.version);
        let log = self
            .logs
            .env_log(
                &cfg.function_name,
                cfg.memory_size,
                stream_name.clone(),
                spec.initialization_type == super::InitializationType::ProvisionedConcurrency,
            )
            .map_err(|e| StartError::Host(e.to_string()))?;
        let mut env = ProcessSandbox {
            id: id.clone(),
            function: f.clone(),
            core,
            pgid: None,
            exit: exit_rx,
            stop_api: Some(stop_api),
            env_dir,
            broken: false,
            log: log.clone(),
            log_sync: Vec::new(),
            peak_kb: 0,
        };

        let mut cmd = match self.runtime_command(&f, &task_root) {
            Ok(c) => c,
            Err(e) => return Err(e),
        };
        cmd.current_dir(&task_root)
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
            )
            .env("LANG", "en_US.UTF-8")
            .env("TZ", ":UTC")
            .env("HOME", &tmp)
            .env("TMPDIR", &tmp)
            .env("AWS_LAMBDA_RUNTIME_API", api_addr.to_string())
            .env("_HANDLER", &cfg.handler)
            .env("LAMBDA_TASK_ROOT", &task_root)
            .env("LAMBDA_RUNTIME_DIR", &task_root)
            .env("AWS_REGION", &spec.region)
            .env("AWS_DEFAULT_REGION", &spec.region)
            .env("AWS_LAMBDA_FUNCTION_NAME", &cfg.function_name)
            .env(
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
                cfg.memory_size.to_string(),
            )
            .env("AWS_LAMBDA_FUNCTION_VERSION", &cfg.version)
            .env(
                "AWS_LAMBDA_LOG_GROUP_NAME",
                format!("/aws/lambda/{}", cfg.function_name),
            )
            .env("AWS_LAMBDA_LOG_STREAM_NAME", &stream_name)
            .env(
                "AWS_LAMBDA_INITIALIZATION_TYPE",
                spec.initialization_type.as_str(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if Runtime::parse(&cfg.runtime) == Some(Runtime::Python311) {
            cmd.env("AWS_EXECUTION_ENV", "AWS_Lambda_python3.11")
                .env("PYTHONUNBUFFERED", "1");
        }
        if let Some(vars) = &cfg.environment {
            cmd.envs(&vars.variables);
        }
        // Its own process group, so that stopping kills the whole tree.
        super::own_group_dying_with_agent(&mut cmd);
        let spawned_at = Instant::now();
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return Err(spawn_error(&cmd, e)),
        };
        env.pgid = child.id().map(|p| p as i32);
        let fname = cfg.function_name.clone();
        if let Some(out) = child.stdout.take() {
            let (tx, rx) = mpsc::unbounded_channel();
            let fd = out.as_raw_fd();
            env.log_sync.push(tx);
            tokio::spawn(pump_logs(
                out,
                fd,
                rx,
                log.clone(),
                fname.clone(),
                id.clone(),
            ));
        }
        if let Some(err) = child.stderr.take() {
            let (tx, rx) = mpsc::unbounded_channel();
            let fd = err.as_raw_fd();
            env.log_sync.push(tx);
            tokio::spawn(pump_logs(err, fd, rx, log.clone(), fname, id.clone()));
        }
        tokio::spawn(async move {
            let status = child.wait().await.ok();
            let _ = exit_tx.send(Some(status));
        });

        let mut exit = env.exit.clone();
        tokio::select! {
            biased;
            ready = env.core.wait_ready() => match ready {
                Ok(()) => {
                    tracing::debug!(function = %cfg.function_name, env = %id, "runtime ready");
                    log.ready(spawned_at.elapsed());
                    Ok(Box::new(env))
                }
                Err(CoreError::InitFailed(report)) => Err(StartError::Function(report)),
                Err(e) => Err(StartError::Host(e.to_string())),
            },
            status = wait_exit(&mut exit) => Err(StartError::Function(ErrorReport::platform(
                "Runtime.ExitError",
                format!("Error: Runtime exited with error: {}", describe_exit(status)),
            ))),
            _ = tokio::time::sleep(spec.init_timeout) => Err(StartError::InitTimeout(spec.init_timeout)),
        }
    }
}

/// A spawn failure that is the function's fault (not executable, bad interpreter line) is
/// `Runtime.InvalidEntrypoint`; anything else is the host's.
fn spawn_error(cmd: &Command, e: std::io::Error) -> StartError {
    let program = cmd.as_std().get_program().to_string_lossy().into_owned();
    match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::ENOEXEC) | Some(libc::ENOENT) => {
            StartError::Function(ErrorReport::platform(
                "Runtime.InvalidEntrypoint",
                format!("Error: fork/exec {program}: {e}"),
            ))
        }
        _ => StartError::Host(format!("spawning {program}: {e}")),
    }
}

async fn wait_exit(exit: &mut watch::Receiver<Option<Option<ExitStatus>>>) -> Option<ExitStatus> {
    match exit.wait_for(Option::is_some).await {
        Ok(v) => v.flatten(),
        // The watcher task is gone: treat as exited with unknown status.
        Err(_) => None,
    }
}

fn describe_exit(status: Option<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Some(s) if s.code().is_some() => format!("exit status {}", s.code().unwrap_or_default()),
        Some(s) => match s.signal() {
            Some(libc::SIGKILL) => "signal: killed".into(),
            Some(libc::SIGSEGV) => "signal: segmentation fault".into(),
            Some(libc::SIGABRT) => "signal: aborted".into(),
            Some(libc::SIGTERM) => "signal: terminated".into(),
            Some(sig) => format!("signal: {sig}"),
            None => "unknown exit".into(),
        },
        None => "unknown exit".into(),
    }
}

/// A request to a pump: read everything already in the pipe, then answer.
type SyncRequest = oneshot::Sender<()>;

/// Forwards a runtime's output, a line at a time with lines capped, to the function's log and
/// the agent's log. On a sync request it first drains what the runtime has already written
/// (the bytes in the pipe: FIONREAD on `fd`, which `stream` keeps open), so that an
/// invocation's lines land before its END.
async fn pump_logs(
    mut stream: impl AsyncRead + Unpin,
    fd: RawFd,
    mut sync: mpsc::UnboundedReceiver<SyncRequest>,
    log: Arc<EnvLog>,
    function: String,
    env: String,
) {
    let mut lines = LineBuffer::default();
    let mut buf = vec![0u8; 16 * 1024];
    let mut syncing = true;
    loop {
        tokio::select! {
            biased;
            r = stream.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => lines.push(&buf[..n], |l| emit(&log, &function, &env, l)),
            },
            req = sync.recv(), if syncing => match req {
                Some(ack) => {
                    while pipe_pending(fd) > 0 {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => lines.push(&buf[..n], |l| emit(&log, &function, &env, l)),
                        }
                    }
                    // An unterminated last line belongs to the invocation that wrote it.
                    lines.flush(|l| emit(&log, &function, &env, l));
                    let _ = ack.send(());
                }
                None => syncing = false,
            },
        }
    }
    lines.flush(|l| emit(&log, &function, &env, l));
}

fn emit(log: &EnvLog, function: &str, env: &str, line: &[u8]) {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches(['\n', '\r']);
    tracing::info!(target: "kindling::function", function = %function, env = %env, "{}", text);
    log.line(text);
}

/// Splits a byte stream into lines of at most `MAX_LOG_LINE` bytes.
#[derive(Default)]
struct LineBuffer {
    partial: Vec<u8>,
}

impl LineBuffer {
    fn push(&mut self, mut data: &[u8], mut out: impl FnMut(&[u8])) {
        while let Some(i) = data.iter().position(|&b| b == b'\n') {
            self.partial.extend_from_slice(&data[..i]);
            self.cut_long(&mut out);
            out(&self.partial);
            self.partial.clear();
            data = &data[i + 1..];
        }
        self.partial.extend_from_slice(data);
        self.cut_long(&mut out);
    }

    fn cut_long(&mut self, out: &mut impl FnMut(&[u8])) {
        while self.partial.len() > MAX_LOG_LINE {
            let rest = self.partial.split_off(MAX_LOG_LINE);
            out(&self.partial);
            self.partial = rest;
        }
    }

    fn flush(&mut self, mut out: impl FnMut(&[u8])) {
        if !self.partial.is_empty() {
            out(&self.partial);
            self.partial.clear();
        }
    }
}

/// Bytes waiting in a pipe.
fn pipe_pending(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which points at `n`; `fd` is
    // the read end of the runtime's pipe, kept open by the pump that calls this.
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    if r < 0 {
        0
    } else {
        usize::try_from(n).unwrap_or(0)
    }
}

/// Peak memory of the runtime's process tree in kB: the leader's high-water mark (VmHWM)
/// plus the current RSS of its descendants (`children` of each process, as far as they
/// still live). None when the leader is gone.
fn tree_memory_kb(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mut total = status_kb(&status, "VmHWM:")?;
    let mut stack = children(pid);
    let mut seen = 0;
    while let Some(child) = stack.pop() {
        seen += 1;
        if seen > 4096 {
            break;
        }
        if let Ok(st) = std::fs::read_to_string(format!("/proc/{child}/status")) {
            total += status_kb(&st, "VmRSS:").unwrap_or(0);
        }
        stack.extend(children(child));
    }
    Some(total)
}

fn status_kb(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

fn children(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Mirrors `src` into `dst` with hard links (copying where linking fails, e.g. across file
/// systems). Symlinks are recreated as they are.
fn link_tree(src: &Path, dst: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dst)?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let (from, to) = (entry.path(), dst.join(entry.file_name()));
        let ft = entry.file_type()?;
        if ft.is_dir() {
            link_tree(&from, &to)?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&from)?, &to)?;
        } else if std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to)?;
        }
    }
    Ok(())
}

fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub struct ProcessSandbox {
    id: String,
    function: Arc<Function>,
    core: Arc<RuntimeCore>,
    /// Process group of the runtime (its pid), once spawned.
    pgid: Option<i32>,
    exit: watch::Receiver<Option<Option<ExitStatus>>>,
    stop_api: Option<oneshot::Sender<()>>,
    env_dir: PathBuf,
    broken: bool,
    log: Arc<EnvLog>,
    /// One per output pump: asks it to drain what the runtime has written so far.
    log_sync: Vec<mpsc::UnboundedSender<SyncRequest>>,
    /// Highest memory use seen, in kB.
    peak_kb: u64,
}

impl ProcessSandbox {
    fn exited(&self) -> bool {
        self.exit.borrow().is_some()
    }

    /// Waits (briefly) until the pumps have logged everything the runtime wrote so far. A
    /// pump that is gone has reached the end of its pipe, so it has nothing left either.
    async fn sync_logs(&self) {
        let mut acks = Vec::new();
        for tx in &self.log_sync {
            let (ack, done) = oneshot::channel();
            if tx.send(ack).is_ok() {
                acks.push(done);
            }
        }
        let _ = tokio::time::timeout(LOG_SYNC_LIMIT, async {
            for a in acks {
                let _ = a.await;
            }
        })
        .await;
    }

    fn sample_memory(&mut self) {
        if let Some(kb) = self.pgid.and_then(tree_memory_kb) {
            self.peak_kb = self.peak_kb.max(kb);
        }
    }

    /// Peak memory in MB (rounded up), when it was ever measured.
    fn max_memory_mb(&self) -> Option<u64> {
        (self.peak_kb > 0).then(|| self.peak_kb.div_ceil(1024))
    }
}

#[async_trait]
impl Sandbox for ProcessSandbox {
    fn id(&self) -> &str {
        &self.id
    }

    async fn invoke(&mut self, req: InvokeRequest, deadline: Instant) -> InvokeOutcome {
        // Lines written since the last invocation (or during init) go before its START.
        self.sync_logs().await;
        self.log.start(&req.request_id);
        self.sample_memory();
        let outcome = self.run_invocation(req, deadline).await;
        self.sync_logs().await;
        self.sample_memory();
        self.log.finish(InvocationEnd {
            outcome: &outcome,
            timeout: Duration::from_secs(u64::from(self.function.config.timeout)),
            max_memory_mb: self.max_memory_mb(),
        });
        outcome
    }

    fn is_reusable(&self) -> bool {
        !self.broken && !self.exited()
    }

    async fn stop(self: Box<Self>) {
        // Dropping does the work; see `Drop`.
        drop(self);
    }
}

impl ProcessSandbox {
    /// One invocation, without its log lines.
    async fn run_invocation(&mut self, req: InvokeRequest, deadline: Instant) -> InvokeOutcome {
        let timeout = Duration::from_secs(u64::from(self.function.config.timeout));
        let left = deadline.saturating_duration_since(Instant::now());
        let invocation = Invocation {
            request_id: req.request_id.clone(),
            invocation_id: uuid::Uuid::new_v4().to_string(),
            deadline_ms: epoch_ms(SystemTime::now() + left),
            function_arn: self.function.config.function_arn.clone(),
            trace_id: Some(req.trace_id),
            client_context: req.client_context,
            cognito_identity: None,
            tenant_id: None,
            content_type: "application/json".into(),
            payload: req.payload,
        };
        let exit_error = |status| {
            InvokeOutcome::Error(ErrorReport::platform(
                "Runtime.ExitError",
                format!(
                    "RequestId: {} Error: Runtime exited with error: {}",
                    req.request_id,
                    describe_exit(status)
                ),
            ))
        };
        if self.exited() {
            self.broken = true;
            return exit_error(self.exit.borrow().flatten());
        }
        let rx = match self.core.invoke(invocation) {
            Ok(rx) => rx,
            Err(e) => {
                self.broken = true;
                return InvokeOutcome::Error(ErrorReport::platform(
                    "Runtime.Unknown",
                    format!("RequestId: {} Error: {e}", req.request_id),
                ));
            }
        };
        let mut exit = self.exit.clone();
        tokio::select! {
            biased;
            outcome = rx => match outcome {
                Ok(o) => o,
                Err(_) => {
                    self.broken = true;
                    InvokeOutcome::Error(ErrorReport::platform(
                        "Runtime.Unknown",
                        format!("RequestId: {} Error: the environment was closed", req.request_id),
                    ))
                }
            },
            status = wait_exit(&mut exit) => {
                self.broken = true;
                exit_error(status)
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                self.broken = true;
                tracing::warn!(function = %self.function.config.function_name, env = %self.id,
                    request_id = %req.request_id, "invocation timed out; environment will be reset");
                InvokeOutcome::Error(ErrorReport::platform(
                    "Sandbox.Timedout",
                    format!(
                        "RequestId: {} Error: Task timed out after {:.2} seconds",
                        req.request_id,
                        timeout.as_secs_f64()
                    ),
                ))
            }
        }
    }
}

impl Drop for ProcessSandbox {
    fn drop(&mut self) {
        self.core.close();
        if let Some(pgid) = self.pgid.take() {
            // The group is killed even when its leader has exited: children the runtime left
            // behind are part of the environment. Linux does not reuse a pid while a process
            // group of that id still has members.
            // SAFETY: kill(2) with a negative pid signals the process group we created for
            // this runtime (`process_group(0)` made its pid the group id); it touches no
            // memory of ours.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
        if let Some(stop) = self.stop_api.take() {
            let _ = stop.send(());
        }
        super::remove_dir_in_background(std::mem::take(&mut self.env_dir));
        tracing::debug!(function = %self.function.config.function_name, env = %self.id, "environment stopped");
    }
}
