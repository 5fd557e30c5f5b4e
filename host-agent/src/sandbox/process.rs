//! The process backend: each environment is a child process tree on this host.
//!
//! It is the development and test backend and **isolates nothing**: the runtime runs as the
//! agent's user, sees the host's file system and network, and shares the kernel. What it does
//! give each environment: its own Runtime API listener on a free loopback port (served by
//! `rapid-api` inside the agent), its own working directory `<data-dir>/envs/<id>/` holding a
//! hard-linked copy of the code as the task root plus a private `tmp/`, Lambda's environment
//! variables, its own process group (killed as a whole), and one invocation at a time.
//!
//! External extensions (Lambda's `/opt/extensions/*`) are the executables in the code's
//! `extensions/` directory: Kindling has no layers, so a ZIP's `extensions/` plays the part of
//! `/opt/extensions`. They start before the runtime, in the environment's process group, and
//! take part in its lifecycle through the Extensions API that `rapid-api` serves.

use std::ffi::OsString;
use std::io::Read as _;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rapid_api::{
    CoreConfig, CoreError, ErrorReport, Invocation, InvokeOutcome, RuntimeCore, ShutdownReason,
    StreamLimits, MAX_EXTENSIONS,
};
use tokio::io::unix::AsyncFd;
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, watch, OnceCell};

use super::cpus::{vcpus_for_memory, CpuLease, CpuPool};
use super::{Backend, EnvSpec, InvokeRequest, Sandbox, StartError};
use crate::functions::{Function, Runtime};
use crate::logs::{EnvLog, InvocationEnd, LogStore};

/// Longest log line forwarded as one record (Lambda cuts lines at 256 KiB).
const MAX_LOG_LINE: usize = 256 * 1024;
/// Most bytes one drain of an output pipe reads before it lets others run.
const DRAIN_LIMIT: usize = 1024 * 1024;
/// Lambda's shutdown phase: SHUTDOWN to the extensions, then SIGKILL at this deadline.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(2);

pub struct ProcessBackend {
    envs_dir: PathBuf,
    python: PathBuf,
    /// Result of checking once that `python` can import `awslambdaric`.
    python_check: OnceCell<Result<(), String>>,
    logs: Arc<LogStore>,
    /// Size and bandwidth caps of streamed responses.
    stream_limits: StreamLimits,
    /// Where environments are placed (see [`super::cpus`]); `None`: on every CPU.
    cpus: Option<Arc<CpuPool>>,
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
            stream_limits: StreamLimits::default(),
            cpus: None,
        })
    }

    /// Each environment runs on the vCPU count its memory buys on Lambda, placed on the
    /// least used CPUs of `pool`.
    pub fn with_cpu_pool(mut self, pool: Arc<CpuPool>) -> Self {
        self.cpus = Some(pool);
        self
    }

    /// Streamed responses get these caps instead of Lambda's.
    pub fn with_stream_limits(mut self, limits: StreamLimits) -> Self {
        self.stream_limits = limits;
        self
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
        // Init (extensions, then the runtime) has this long, all together.
        let init_deadline = Instant::now() + spec.init_timeout;
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let env_dir = self.envs_dir.join(&id);
        let task_root = env_dir.join("task");
        let tmp = env_dir.join("tmp");
        let extensions = {
            let (code, task_root, tmp) = (f.code_dir.clone(), task_root.clone(), tmp.clone());
            tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&tmp)?;
                link_tree(&code, &task_root)?;
                find_extensions(&task_root)
            })
            .await
            .map_err(|e| StartError::Host(e.to_string()))?
            .map_err(|e| StartError::Host(format!("preparing {}: {e}", env_dir.display())))?
        };
        if extensions.len() > MAX_EXTENSIONS {
            super::remove_dir_in_background(env_dir);
            return Err(StartError::Function(ErrorReport::platform(
                "Extension.InitError",
                format!(
                    "Too many extensions: {} executables in extensions/ (/opt/extensions); \
                     Lambda allows at most {MAX_EXTENSIONS}",
                    extensions.len()
                ),
            )));
        }
        let cfg = &f.config;
        let core = RuntimeCore::with_config(CoreConfig {
            function_name: cfg.function_name.clone(),
            function_version: cfg.version.clone(),
            handler: cfg.handler.clone(),
            account_id: cfg
                .function_arn
                .split(':')
                .nth(4)
                .unwrap_or_default()
                .to_string(),
            memory_size_mb: Some(cfg.memory_size),
            initialization_type: match spec.initialization_type {
                super::InitializationType::OnDemand => rapid_api::InitializationType::OnDemand,
                super::InitializationType::ProvisionedConcurrency => {
                    rapid_api::InitializationType::ProvisionedConcurrency
                }
            },
        });
        core.set_stream_limits(self.stream_limits);
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
        let shared = Arc::new(EnvShared {
            id: id.clone(),
            function_name: cfg.function_name.clone(),
            core: core.clone(),
            pgid: AtomicI32::new(0),
            runtime_pid: AtomicI32::new(0),
            extensions: extensions.len(),
            runtime_exit: exit_rx,
            stopping: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            stop_api: Mutex::new(Some(stop_api)),
            env_dir: Mutex::new(env_dir),
            cpus: Mutex::new(
                self.cpus
                    .as_ref()
                    .map(|p| p.lease(vcpus_for_memory(cfg.memory_size))),
            ),
            down: OnceCell::new(),
        });
        let memory = Arc::new(MemoryTracker::default());
        // From here on, `env` cleans up (kills, removes the directory) when dropped.
        let mut env = ProcessSandbox {
            id: id.clone(),
            function: f.clone(),
            env: shared.clone(),
            log: log.clone(),
            pumps: Vec::new(),
            memory: memory.clone(),
            reset: None,
        };
        // Telemetry of log lines exists only for extensions to subscribe to.
        let telemetry = (!extensions.is_empty()).then(|| core.clone());
        let pump_ctx = PumpCtx {
            log: log.clone(),
            core: telemetry,
            function: cfg.function_name.as_str().into(),
            env: id.as_str().into(),
        };

        // What the runtime and the extensions see (Lambda gives both the same variables).
        let mut vars: Vec<(OsString, OsString)> = vec![
            (
                "PATH".into(),
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
            ),
            ("LANG".into(), "en_US.UTF-8".into()),
            ("TZ".into(), ":UTC".into()),
            ("HOME".into(), tmp.clone().into()),
            ("TMPDIR".into(), tmp.clone().into()),
            ("AWS_LAMBDA_RUNTIME_API".into(), api_addr.to_string().into()),
            ("_HANDLER".into(), cfg.handler.clone().into()),
            ("LAMBDA_TASK_ROOT".into(), task_root.clone().into()),
            ("LAMBDA_RUNTIME_DIR".into(), task_root.clone().into()),
            ("AWS_REGION".into(), spec.region.clone().into()),
            ("AWS_DEFAULT_REGION".into(), spec.region.clone().into()),
            (
                "AWS_LAMBDA_FUNCTION_NAME".into(),
                cfg.function_name.clone().into(),
            ),
            (
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE".into(),
                cfg.memory_size.to_string().into(),
            ),
            (
                "AWS_LAMBDA_FUNCTION_VERSION".into(),
                cfg.version.clone().into(),
            ),
            (
                "AWS_LAMBDA_LOG_GROUP_NAME".into(),
                format!("/aws/lambda/{}", cfg.function_name).into(),
            ),
            ("AWS_LAMBDA_LOG_STREAM_NAME".into(), stream_name.into()),
            (
                "AWS_LAMBDA_INITIALIZATION_TYPE".into(),
                spec.initialization_type.as_str().into(),
            ),
        ];
        if Runtime::parse(&cfg.runtime) == Some(Runtime::Python311) {
            vars.push(("AWS_EXECUTION_ENV".into(), "AWS_Lambda_python3.11".into()));
            vars.push(("PYTHONUNBUFFERED".into(), "1".into()));
        }
        if let Some(fvars) = &cfg.environment {
            vars.extend(fvars.variables.iter().map(|(k, v)| (k.into(), v.into())));
        }
        let spawned_at = Instant::now();

        // Extension init: start each extension, wait until every one has registered.
        let (ext_exit_tx, mut ext_exits) = mpsc::unbounded_channel::<String>();
        for (name, path) in &extensions {
            let mut cmd = Command::new(path);
            cmd.current_dir(&task_root)
                .env_clear()
                .envs(vars.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            env.join_group(&mut cmd);
            let mut child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => {
                    env.reset = Some(ShutdownReason::Failure);
                    return Err(match spawn_error(&cmd, e) {
                        StartError::Function(mut r) => {
                            r.error_type = "Extension.LaunchError".into();
                            StartError::Function(r)
                        }
                        other => other,
                    });
                }
            };
            let pid = child.id().map(|p| p as i32).unwrap_or(0);
            let _ = shared
                .pgid
                .compare_exchange(0, pid, Ordering::SeqCst, Ordering::SeqCst);
            memory.add_leader(pid);
            let source = Source::Extension(name.as_str().into());
            env.pumps.extend(start_pumps(&mut child, &pump_ctx, source));
            let (shared, name, exits) = (shared.clone(), name.clone(), ext_exit_tx.clone());
            tokio::spawn(async move {
                let status = child.wait().await.ok();
                if !shared.stopping.load(Ordering::SeqCst) {
                    shared.failed.store(true, Ordering::SeqCst);
                    tracing::warn!(function = %shared.function_name, env = %shared.id,
                        extension = %name, "extension exited: {}", describe_exit(status));
                }
                // During shutdown this is its acknowledgement; otherwise a crash.
                shared.core.extension_exited(&name);
                let _ = exits.send(name);
            });
        }
        drop(ext_exit_tx);
        if !extensions.is_empty() {
            let registered = loop {
                tokio::select! {
                    biased;
                    r = core.wait_registered(extensions.len()) => break r,
                    Some(name) = ext_exits.recv() => {
                        if !core.registered_extensions().contains(&name) {
                            env.reset = Some(ShutdownReason::Failure);
                            return Err(StartError::Function(ErrorReport::platform(
                                "Extension.Crash",
                                format!("Extension {name} exited before it registered"),
                            )));
                        }
                        // A registered one: the core has failed init with Extension.Crash.
                    }
                    _ = tokio::time::sleep_until(init_deadline.into()) => {
                        env.reset = Some(ShutdownReason::Timeout);
                        return Err(StartError::InitTimeout(spec.init_timeout));
                    }
                }
            };
            if let Err(e) = registered {
                env.reset = Some(ShutdownReason::Failure);
                return Err(match e {
                    CoreError::InitFailed(report) => StartError::Function(report),
                    e => StartError::Host(e.to_string()),
                });
            }
            // The core hears of every exit from here on (a crash fails init).
            drop(ext_exits);
        }

        // Runtime init.
        let mut cmd = match self.runtime_command(&f, &task_root) {
            Ok(c) => c,
            Err(e) => return Err(e),
        };
        cmd.current_dir(&task_root)
            .env_clear()
            .envs(vars.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        env.join_group(&mut cmd);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                env.reset = Some(ShutdownReason::Failure);
                return Err(spawn_error(&cmd, e));
            }
        };
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        let _ = shared
            .pgid
            .compare_exchange(0, pid, Ordering::SeqCst, Ordering::SeqCst);
        shared.runtime_pid.store(pid, Ordering::SeqCst);
        memory.set_runtime(pid);
        env.pumps
            .extend(start_pumps(&mut child, &pump_ctx, Source::Runtime));
        tokio::spawn(async move {
            let status = child.wait().await.ok();
            let _ = exit_tx.send(Some(status));
        });
        if !extensions.is_empty() {
            // The report's maxMemoryUsedMB for telemetry subscribers.
            let m = memory.clone();
            core.set_memory_probe(Box::new(move || m.peak_mb(false)));
        }

        let mut exit = shared.runtime_exit.clone();
        let fname = &cfg.function_name;
        tokio::select! {
            biased;
            ready = core.wait_ready() => match ready {
                Ok(()) => {
                    tracing::debug!(function = %fname, env = %id, extensions = extensions.len(), "runtime ready");
                    log.ready(spawned_at.elapsed());
                    Ok(Box::new(env))
                }
                Err(CoreError::InitFailed(report)) => {
                    env.reset = Some(ShutdownReason::Failure);
                    Err(StartError::Function(report))
                }
                Err(e) => Err(StartError::Host(e.to_string())),
            },
            status = wait_exit(&mut exit) => {
                env.reset = Some(ShutdownReason::Failure);
                Err(StartError::Function(ErrorReport::platform(
                    "Runtime.ExitError",
                    format!("Error: Runtime exited with error: {}", describe_exit(status)),
                )))
            }
            _ = tokio::time::sleep_until(init_deadline.into()) => {
                env.reset = Some(ShutdownReason::Timeout);
                Err(StartError::InitTimeout(spec.init_timeout))
            }
        }
    }
}

/// The external extensions of a task root: the executable files in its `extensions/`
/// directory (Kindling's `/opt/extensions`), by name. Anything else there is ignored.
fn find_extensions(task_root: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let dir = task_root.join("extensions");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        // Follows symlinks (kept inside the code by the store).
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
            found.push((entry.file_name().to_string_lossy().into_owned(), path));
        }
    }
    found.sort();
    Ok(found)
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

/// Whose output a pump carries.
#[derive(Clone)]
enum Source {
    Runtime,
    Extension(Arc<str>),
}

/// What every pump of an environment shares.
struct PumpCtx {
    log: Arc<EnvLog>,
    /// Lines also go to the Telemetry API (only when the function has extensions).
    core: Option<Arc<RuntimeCore>>,
    function: Arc<str>,
    env: Arc<str>,
}

/// One output pipe (stdout or stderr) of the runtime or an extension, forwarded a line at a
/// time (lines capped) to the function's log, the agent's log and the Telemetry API.
///
/// Both its own task and the sandbox read it, under one lock, with non-blocking reads: the
/// sandbox drains it before START and after the answer, so that an invocation's lines land
/// between its START and END, without a round trip to the task when nothing was written.
struct Pump {
    pipe: AsyncFd<std::fs::File>,
    state: Mutex<PumpState>,
    source: Source,
    log: Arc<EnvLog>,
    core: Option<Arc<RuntimeCore>>,
    function: Arc<str>,
    env: Arc<str>,
}

struct PumpState {
    lines: LineBuffer,
    buf: Vec<u8>,
    eof: bool,
}

/// What a drain found.
#[derive(Debug, PartialEq, Eq)]
enum Drained {
    /// The pipe is empty now.
    Empty,
    /// It stopped at [`DRAIN_LIMIT`]: there may be more.
    More,
    /// End of stream (every writer has gone).
    Eof,
}

fn start_pumps(child: &mut Child, ctx: &PumpCtx, source: Source) -> Vec<Arc<Pump>> {
    let mut fds: Vec<OwnedFd> = Vec::new();
    if let Some(out) = child.stdout.take().and_then(|o| o.into_owned_fd().ok()) {
        fds.push(out);
    }
    if let Some(err) = child.stderr.take().and_then(|e| e.into_owned_fd().ok()) {
        fds.push(err);
    }
    let mut pumps = Vec::new();
    for fd in fds {
        match Pump::new(fd, ctx, source.clone()) {
            Ok(p) => {
                let p = Arc::new(p);
                tokio::spawn(p.clone().run());
                pumps.push(p);
            }
            Err(e) => {
                tracing::warn!(function = %ctx.function, env = %ctx.env, "cannot forward output: {e}")
            }
        }
    }
    pumps
}

impl Pump {
    fn new(fd: OwnedFd, ctx: &PumpCtx, source: Source) -> std::io::Result<Pump> {
        set_nonblocking(&fd)?;
        Ok(Pump {
            // SAFETY: the `File` owns the descriptor and the `AsyncFd` owns the `File` for its
            // whole life: the descriptor stays open and the same until the `AsyncFd` drops.
            pipe: unsafe {
                AsyncFd::register_with_interest(
                    std::fs::File::from(fd),
                    tokio::io::Interest::READABLE,
                )
            }?,
            state: Mutex::new(PumpState {
                lines: LineBuffer::default(),
                buf: vec![0u8; 16 * 1024],
                eof: false,
            }),
            source,
            log: ctx.log.clone(),
            core: ctx.core.clone(),
            function: ctx.function.clone(),
            env: ctx.env.clone(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, PumpState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads what the pipe holds now, without waiting, and logs its complete lines; with
    /// `flush`, also an unterminated last line (it belongs to the invocation that wrote it).
    fn drain(&self, flush: bool) -> Drained {
        let mut st = self.lock();
        if st.eof {
            return Drained::Eof;
        }
        let PumpState { lines, buf, eof } = &mut *st;
        let mut read = 0;
        let result = loop {
            if read >= DRAIN_LIMIT {
                break Drained::More;
            }
            match self.pipe.get_ref().read(buf) {
                Ok(0) => break Drained::Eof,
                Ok(n) => {
                    read += n;
                    lines.push(&buf[..n], |l| self.emit(l));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break Drained::Empty,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break Drained::Eof,
            }
        };
        if flush || result == Drained::Eof {
            lines.flush(|l| self.emit(l));
        }
        *eof = result == Drained::Eof;
        result
    }

    async fn run(self: Arc<Self>) {
        loop {
            let Ok(mut ready) = self.pipe.readable().await else {
                self.drain(true);
                return;
            };
            match self.drain(false) {
                Drained::Empty => ready.clear_ready(),
                Drained::More => {
                    drop(ready);
                    tokio::task::yield_now().await;
                }
                Drained::Eof => return,
            }
        }
    }

    fn emit(&self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches(['\n', '\r']);
        // Extension lines go to the function's log as they are, as in Lambda; the agent's
        // log names the extension.
        match &self.source {
            Source::Runtime => {
                tracing::info!(target: "kindling::function", function = %self.function,
                    env = %self.env, "{}", text);
                if let Some(core) = &self.core {
                    core.function_log(text);
                }
            }
            Source::Extension(name) => {
                tracing::info!(target: "kindling::function", function = %self.function,
                    env = %self.env, extension = %name, "{}", text);
                if let Some(core) = &self.core {
                    core.extension_log(name, text);
                }
            }
        }
        self.log.line(text);
    }
}

fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, reading then setting its status flags; no
    // memory is passed.
    let r = unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 {
            flags
        } else {
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK)
        }
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
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

/// Peak memory of the environment's processes: for each leader (the runtime, each
/// extension) its high-water mark (VmHWM), plus the current RSS of its descendants.
///
/// The leaders' `/proc` files stay open and are re-read with `pread` at offset 0 (procfs
/// regenerates them), so a sample costs a read per leader, plus its `children` list; the
/// descendants' files are opened only when there are any.
///
/// procfs renders the whole `status` file on every read, which was a tenth of the agent's
/// CPU per warm invocation: invocations shorter than [`MEMORY_SAMPLE_INTERVAL`] that end
/// within that interval of the last sample share it (a high-water mark only grows, so the
/// next sample still sees a peak reached meanwhile).
#[derive(Default)]
struct MemoryTracker {
    files: Mutex<ProcFiles>,
    peak_kb: AtomicU64,
}

#[derive(Default)]
struct ProcFiles {
    /// The runtime first (when started), then the extensions.
    leaders: Vec<Leader>,
    buf: Vec<u8>,
    /// When procfs was last read.
    sampled: Option<Instant>,
}

/// Longest an invocation's REPORT may reuse the previous memory sample (see
/// [`MemoryTracker`]).
const MEMORY_SAMPLE_INTERVAL: Duration = Duration::from_millis(50);

struct Leader {
    status: std::fs::File,
    children: Option<std::fs::File>,
}

impl Leader {
    fn open(pid: i32) -> Option<Leader> {
        Some(Leader {
            status: std::fs::File::open(format!("/proc/{pid}/status")).ok()?,
            children: std::fs::File::open(format!("/proc/{pid}/task/{pid}/children")).ok(),
        })
    }
}

/// The whole of a procfs file, re-read from its start into `buf`.
fn pread_all<'a>(f: &std::fs::File, buf: &'a mut Vec<u8>) -> Option<&'a [u8]> {
    if buf.len() < 8192 {
        buf.resize(8192, 0);
    }
    let mut len = 0;
    loop {
        match f.read_at(&mut buf[len..], len as u64) {
            Ok(0) => break,
            Ok(n) => {
                len += n;
                if len == buf.len() {
                    buf.resize(buf.len() * 2, 0);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    Some(&buf[..len])
}

impl MemoryTracker {
    fn files(&self) -> MutexGuard<'_, ProcFiles> {
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_runtime(&self, pid: i32) {
        if let Some(l) = Leader::open(pid) {
            self.files().leaders.insert(0, l);
        }
    }

    fn add_leader(&self, pid: i32) {
        if let Some(l) = Leader::open(pid) {
            self.files().leaders.push(l);
        }
    }

    /// The peak in MB (rounded up), if ever measured: measured now when `fresh` or when the
    /// last sample is older than [`MEMORY_SAMPLE_INTERVAL`].
    fn peak_mb(&self, fresh: bool) -> Option<u64> {
        let mut files = self.files();
        let due = files
            .sampled
            .is_none_or(|t| t.elapsed() >= MEMORY_SAMPLE_INTERVAL);
        if !fresh && !due {
            let peak = self.peak_kb.load(Ordering::Relaxed);
            return (peak > 0).then(|| peak.div_ceil(1024));
        }
        files.sampled = Some(Instant::now());
        let ProcFiles { leaders, buf, .. } = &mut *files;
        let mut total = 0;
        let mut kids = Vec::new();
        for l in leaders.iter() {
            let Some(status) = pread_all(&l.status, buf) else {
                continue; // gone
            };
            total += status_kb(status, b"VmHWM:").unwrap_or(0);
            if let Some(children) = l.children.as_ref().and_then(|c| pread_all(c, buf)) {
                kids.extend(pids(children));
            }
        }
        // Descendants, as far as they still live.
        let mut seen = 0;
        while let Some(child) = kids.pop() {
            seen += 1;
            if seen > 4096 {
                break;
            }
            if let Ok(st) = std::fs::read(format!("/proc/{child}/status")) {
                total += status_kb(&st, b"VmRSS:").unwrap_or(0);
            }
            if let Ok(c) = std::fs::read(format!("/proc/{child}/task/{child}/children")) {
                kids.extend(pids(&c));
            }
        }
        drop(files);
        let peak = self.peak_kb.fetch_max(total, Ordering::Relaxed).max(total);
        (peak > 0).then(|| peak.div_ceil(1024))
    }
}

fn status_kb(status: &[u8], key: &[u8]) -> Option<u64> {
    let line = status.split(|&b| b == b'\n').find(|l| l.starts_with(key))?;
    std::str::from_utf8(&line[key.len()..])
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn pids(list: &[u8]) -> impl Iterator<Item = i32> + '_ {
    list.split(|b| b.is_ascii_whitespace())
        .filter_map(|p| std::str::from_utf8(p).ok()?.parse().ok())
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

/// What outlives the sandbox value: its processes, core and directory, until shut down (the
/// extensions' shutdown phase runs in a task of its own when the pool drops the sandbox).
struct EnvShared {
    id: String,
    function_name: String,
    core: Arc<RuntimeCore>,
    /// The environment's process group: the first process started in it (0: none yet).
    pgid: AtomicI32,
    runtime_pid: AtomicI32,
    extensions: usize,
    runtime_exit: watch::Receiver<Option<Option<ExitStatus>>>,
    /// Shutting down: an extension's exit is its acknowledgement, not a crash.
    stopping: AtomicBool,
    /// An extension crashed, or the invoke phase failed after the runtime's answer.
    failed: AtomicBool,
    stop_api: Mutex<Option<oneshot::Sender<()>>>,
    env_dir: Mutex<PathBuf>,
    /// The CPUs its processes run on, until it is stopped.
    cpus: Mutex<Option<CpuLease>>,
    /// Set once the environment has been shut down.
    down: OnceCell<()>,
}

impl EnvShared {
    /// Shuts the environment down once (later calls wait for the first): with extensions,
    /// Lambda's shutdown phase (SIGTERM to the runtime, SHUTDOWN with `reason` to the
    /// extensions, up to [`SHUTDOWN_LIMIT`]), then SIGKILL to the whole process group.
    async fn shut_down(self: &Arc<Self>, reason: ShutdownReason) {
        let this = self.clone();
        self.down
            .get_or_init(|| async move {
                this.stopping.store(true, Ordering::SeqCst);
                if this.extensions > 0 {
                    this.shutdown_phase(reason).await;
                }
                this.finish();
            })
            .await;
    }

    async fn shutdown_phase(&self, reason: ShutdownReason) {
        let deadline = Instant::now() + SHUTDOWN_LIMIT;
        let mut exit = self.runtime_exit.clone();
        let pid = self.runtime_pid.load(Ordering::SeqCst);
        // Not yet reaped, so the pid is still the runtime's.
        let running = pid > 0 && exit.borrow().is_none();
        if running {
            // SAFETY: kill(2) on the runtime's pid (see above); no memory is involved.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let report = self.core.shutdown(reason, deadline).await;
        tracing::debug!(function = %self.function_name, env = %self.id, reason = reason.as_str(),
            acknowledged = ?report.acknowledged, timed_out = ?report.timed_out, "extensions shut down");
        if running {
            let _ = tokio::time::timeout_at(deadline.into(), wait_exit(&mut exit)).await;
        }
    }

    /// Kills what is left, closes the core and the listener, removes the directory.
    fn finish(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.core.close();
        let pgid = self.pgid.swap(0, Ordering::SeqCst);
        if pgid > 0 {
            // The group is killed even when its leader has exited: children the runtime left
            // behind are part of the environment. Linux does not reuse a pid while a process
            // group of that id still has members.
            // SAFETY: kill(2) with a negative pid signals the process group we created for
            // this environment; it touches no memory of ours.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
        let stop = self
            .stop_api
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(stop) = stop {
            let _ = stop.send(());
        }
        let dir = std::mem::take(&mut *self.env_dir.lock().unwrap_or_else(|e| e.into_inner()));
        super::remove_dir_in_background(dir);
        // Its processes are gone: the CPUs count as free for the next environment.
        drop(self.cpus.lock().unwrap_or_else(|e| e.into_inner()).take());
        tracing::debug!(function = %self.function_name, env = %self.id, "environment stopped");
    }
}

pub struct ProcessSandbox {
    id: String,
    function: Arc<Function>,
    env: Arc<EnvShared>,
    log: Arc<EnvLog>,
    /// The output pipes of the runtime and the extensions.
    pumps: Vec<Arc<Pump>>,
    memory: Arc<MemoryTracker>,
    /// Why the environment must be reset (shut down with that reason), if it must.
    reset: Option<ShutdownReason>,
}

impl ProcessSandbox {
    fn exited(&self) -> bool {
        self.env.runtime_exit.borrow().is_some()
    }

    /// Makes `cmd` a member of the environment's process group (its first process leads
    /// it), dying with the agent.
    fn join_group(&self, cmd: &mut Command) {
        super::own_group_dying_with_agent(cmd);
        let cpus = self.env.cpus.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(lease) = cpus.as_ref() {
            lease.apply(cmd);
        }
        let pgid = self.env.pgid.load(Ordering::SeqCst);
        if pgid > 0 {
            cmd.process_group(pgid);
        }
    }

    /// Logs everything the runtime and the extensions have written so far.
    fn sync_logs(&self) {
        for p in &self.pumps {
            p.drain(true);
        }
    }

    /// With extensions, the previous invocation's invoke phase may still run after its
    /// answer (they post-process): the next one waits for every extension to be back in
    /// `event/next`. The previous invocation's deadline is enforced by its watcher.
    async fn previous_phase_done(&mut self, request_id: &str) -> Result<(), InvokeOutcome> {
        let mut exit = self.env.runtime_exit.clone();
        tokio::select! {
            biased;
            r = self.env.core.wait_idle() => match r {
                Ok(()) => Ok(()),
                Err(e) => {
                    self.reset = Some(ShutdownReason::Failure);
                    let report = self.env.core.failure().unwrap_or_else(|| ErrorReport::platform(
                        "Runtime.Unknown",
                        format!("RequestId: {request_id} Error: the environment was reset ({e}): \
                                 its extensions did not finish the previous invocation in time"),
                    ));
                    Err(InvokeOutcome::Error(report))
                }
            },
            status = wait_exit(&mut exit) => {
                self.reset = Some(ShutdownReason::Failure);
                Err(exit_error(request_id, status))
            }
        }
    }

    /// After the answer, extensions may still work on the INVOKE event: past `deadline`
    /// (the function timeout) the environment is reset with reason `timeout`; an extension
    /// failing meanwhile resets it with `failure`.
    fn watch_invoke_phase(&self, deadline: Instant) {
        let env = self.env.clone();
        tokio::spawn(async move {
            let reason = tokio::select! {
                r = env.core.wait_idle() => match r {
                    Ok(()) => return,
                    Err(_) => ShutdownReason::Failure,
                },
                _ = tokio::time::sleep_until(deadline.into()) => ShutdownReason::Timeout,
            };
            if env.stopping.load(Ordering::SeqCst) {
                return;
            }
            env.failed.store(true, Ordering::SeqCst);
            tracing::warn!(function = %env.function_name, env = %env.id, reason = reason.as_str(),
                "the extensions did not finish the invocation; resetting the environment");
            env.shut_down(reason).await;
        });
    }
}

fn exit_error(request_id: &str, status: Option<ExitStatus>) -> InvokeOutcome {
    InvokeOutcome::Error(ErrorReport::platform(
        "Runtime.ExitError",
        format!(
            "RequestId: {request_id} Error: Runtime exited with error: {}",
            describe_exit(status)
        ),
    ))
}

#[async_trait]
impl Sandbox for ProcessSandbox {
    fn id(&self) -> &str {
        &self.id
    }

    async fn invoke(&mut self, req: InvokeRequest, deadline: Instant) -> InvokeOutcome {
        let extensions = self.env.extensions > 0;
        let previous = if extensions {
            self.previous_phase_done(&req.request_id).await
        } else {
            Ok(())
        };
        // Lines written since the last invocation (or during init) go before its START.
        self.sync_logs();
        self.log.start(&req.request_id);
        let started = Instant::now();
        let outcome = match previous {
            Ok(()) => self.run_invocation(req, deadline).await,
            Err(o) => o,
        };
        self.sync_logs();
        // VmHWM is a high-water mark: one sample per invocation misses nothing of the
        // runtime's own peak. Short successful invocations may share a sample.
        let fresh = started.elapsed() >= MEMORY_SAMPLE_INTERVAL
            || !matches!(outcome, InvokeOutcome::Response { .. });
        let max_memory_mb = self.memory.peak_mb(fresh);
        self.log.finish(InvocationEnd {
            outcome: &outcome,
            timeout: Duration::from_secs(u64::from(self.function.config.timeout)),
            max_memory_mb,
        });
        if extensions && self.reset.is_none() {
            self.watch_invoke_phase(deadline);
        }
        outcome
    }

    fn is_reusable(&self) -> bool {
        self.reset.is_none() && !self.exited() && !self.env.failed.load(Ordering::SeqCst)
    }

    async fn stop(self: Box<Self>) {
        let reason = self.reset.unwrap_or(ShutdownReason::Spindown);
        self.env.shut_down(reason).await;
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
        if self.exited() {
            self.reset = Some(ShutdownReason::Failure);
            return exit_error(&req.request_id, self.env.runtime_exit.borrow().flatten());
        }
        // Streamed chunks go straight to the caller; the outcome still ends the invocation.
        let rx = match self.env.core.invoke_with_stream(invocation, req.stream) {
            Ok(rx) => rx,
            Err(e) => {
                self.reset = Some(ShutdownReason::Failure);
                return InvokeOutcome::Error(ErrorReport::platform(
                    "Runtime.Unknown",
                    format!("RequestId: {} Error: {e}", req.request_id),
                ));
            }
        };
        let mut exit = self.env.runtime_exit.clone();
        let outcome = tokio::select! {
            biased;
            outcome = rx => match outcome {
                Ok(o) => o,
                Err(_) => {
                    self.reset = Some(ShutdownReason::Failure);
                    InvokeOutcome::Error(ErrorReport::platform(
                        "Runtime.Unknown",
                        format!("RequestId: {} Error: the environment was closed", req.request_id),
                    ))
                }
            },
            status = wait_exit(&mut exit) => {
                self.reset = Some(ShutdownReason::Failure);
                exit_error(&req.request_id, status)
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                self.reset = Some(ShutdownReason::Timeout);
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
        };
        // A response body cut short is most often the runtime dying mid-stream: name the
        // exit when it follows at once (which of the two is seen first is a race).
        const EXIT_AFTER_TRUNCATION: Duration = Duration::from_millis(200);
        let outcome = match outcome {
            InvokeOutcome::Error(r) if r.error_type == "Runtime.TruncatedResponse" => {
                match tokio::time::timeout(EXIT_AFTER_TRUNCATION, wait_exit(&mut exit)).await {
                    Ok(status) => {
                        self.reset = Some(ShutdownReason::Failure);
                        exit_error(&req.request_id, status)
                    }
                    Err(_) => InvokeOutcome::Error(r),
                }
            }
            o => o,
        };
        // An extension that crashed or reported exit/error failed the invocation (or the
        // environment): reset like a runtime crash.
        if self.env.extensions > 0
            && self.reset.is_none()
            && (self.env.failed.load(Ordering::SeqCst) || self.env.core.failure().is_some())
        {
            self.reset = Some(ShutdownReason::Failure);
        }
        outcome
    }
}

impl Drop for ProcessSandbox {
    fn drop(&mut self) {
        let env = self.env.clone();
        if env.down.initialized() {
            return;
        }
        if env.extensions == 0 {
            // Nothing to tell: kill at once (Lambda sends SIGTERM only when extensions exist).
            env.finish();
            return;
        }
        let reason = self.reset.unwrap_or(ShutdownReason::Spindown);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move { env.shut_down(reason).await });
            }
            Err(_) => env.finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_are_re_read_from_the_start() {
        let pid = std::process::id() as i32;
        let t = MemoryTracker::default();
        t.set_runtime(pid);
        let before = t.peak_mb(true).expect("own memory");
        // Touch 64 MiB: the high-water mark must rise on the next read of the same file.
        let big = vec![1u8; 64 << 20];
        std::hint::black_box(&big);
        let after = t.peak_mb(true).expect("own memory");
        assert!(after >= before + 60, "{before} MB -> {after} MB");
    }

    #[test]
    fn status_fields_parse() {
        let st = b"Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(status_kb(st, b"VmHWM:"), Some(2048));
        assert_eq!(status_kb(st, b"VmRSS:"), Some(1000));
        assert_eq!(status_kb(st, b"VmSwap:"), None);
        assert_eq!(pids(b"12 34\n").collect::<Vec<_>>(), vec![12, 34]);
    }

    #[test]
    fn extensions_are_the_executables_in_extensions() {
        let d = tempfile::tempdir().unwrap();
        let ext = d.path().join("extensions");
        std::fs::create_dir_all(ext.join("sub")).unwrap();
        for (name, mode) in [("b", 0o755), ("a", 0o700), ("data.txt", 0o644)] {
            std::fs::write(ext.join(name), "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(ext.join(name), std::fs::Permissions::from_mode(mode))
                .unwrap();
        }
        let found: Vec<String> = find_extensions(d.path())
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(found, vec!["a", "b"]);
        let none = tempfile::tempdir().unwrap();
        assert!(find_extensions(none.path()).unwrap().is_empty());
    }
}
