//! The process backend: each environment is a child process tree on this host.
//!
//! It is the development and test backend and **isolates nothing**: the runtime runs as the
//! agent's user, sees the host's file system and network, and shares the kernel. What it does
//! give each environment: its own Runtime API listener on a free loopback port (served by
//! `rapid-api` inside the agent), its own working directory `<data-dir>/envs/<id>/` holding a
//! hard-linked copy of the code as the task root plus a private `tmp/`, Lambda's environment
//! variables, its own process group (killed as a whole), and one invocation at a time.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rapid_api::{CoreError, ErrorReport, Invocation, InvokeOutcome, RuntimeCore};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::sync::{oneshot, watch, OnceCell};

use super::{Backend, EnvSpec, InvokeRequest, Sandbox, StartError};
use crate::functions::{Function, Runtime};

/// Longest log line forwarded as one record (Lambda cuts lines at 256 KiB).
const MAX_LOG_LINE: u64 = 256 * 1024;

pub struct ProcessBackend {
    envs_dir: PathBuf,
    python: PathBuf,
    /// Result of checking once that `python` can import `awslambdaric`.
    python_check: OnceCell<Result<(), String>>,
}

impl ProcessBackend {
    /// `envs_dir` is emptied: environments do not survive the agent.
    pub fn new(envs_dir: PathBuf, python: PathBuf) -> std::io::Result<Self> {
        if envs_dir.exists() {
            std::fs::remove_dir_all(&envs_dir)?;
        }
        std::fs::create_dir_all(&envs_dir)?;
        Ok(ProcessBackend {
            envs_dir,
            python,
            python_check: OnceCell::new(),
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
        let mut env = ProcessSandbox {
            id: id.clone(),
            function: f.clone(),
            core,
            pgid: None,
            exit: exit_rx,
            stop_api: Some(stop_api),
            env_dir,
            broken: false,
        };

        let mut cmd = match self.runtime_command(&f, &task_root) {
            Ok(c) => c,
            Err(e) => return Err(e),
        };
        let cfg = &f.config;
        let now = chrono::Utc::now();
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
            .env(
                "AWS_LAMBDA_LOG_STREAM_NAME",
                format!("{}/[{}]{id}", now.format("%Y/%m/%d"), cfg.version),
            )
            .env("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand")
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
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return Err(spawn_error(&cmd, e)),
        };
        env.pgid = child.id().map(|p| p as i32);
        let fname = cfg.function_name.clone();
        if let Some(out) = child.stdout.take() {
            tokio::spawn(pump_logs(out, fname.clone(), id.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(pump_logs(err, fname, id.clone()));
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

/// Forwards a runtime's output to the agent's log, a line at a time, with lines capped.
async fn pump_logs(stream: impl AsyncRead + Unpin, function: String, env: String) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader)
            .take(MAX_LOG_LINE)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                tracing::info!(target: "kindling::function", function = %function, env = %env, "{}", text.trim_end());
            }
        }
    }
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
}

impl ProcessSandbox {
    fn exited(&self) -> bool {
        self.exit.borrow().is_some()
    }
}

#[async_trait]
impl Sandbox for ProcessSandbox {
    fn id(&self) -> &str {
        &self.id
    }

    async fn invoke(&mut self, req: InvokeRequest, deadline: Instant) -> InvokeOutcome {
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

    fn is_reusable(&self) -> bool {
        !self.broken && !self.exited()
    }

    async fn stop(self: Box<Self>) {
        // Dropping does the work; see `Drop`.
        drop(self);
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
