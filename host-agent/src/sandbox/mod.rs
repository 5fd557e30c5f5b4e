//! Execution environments ("sandboxes") and the backends that start them.
//!
//! A sandbox runs one function's runtime and serves one invocation at a time. The pool
//! (`crate::pool`) decides when to start, reuse or stop one; the backend decides how.

pub mod chunked;
pub mod cpus;
pub mod microvm;
pub mod process;
pub mod snapshot;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use rapid_api::{ErrorReport, InvokeOutcome};

use crate::functions::Function;

/// What a backend needs to start an environment for a function.
#[derive(Clone)]
pub struct EnvSpec {
    pub function: Arc<Function>,
    pub region: String,
    /// How long the runtime may take to reach its first `/next`.
    pub init_timeout: Duration,
    /// Why it starts (`AWS_LAMBDA_INITIALIZATION_TYPE`).
    pub initialization_type: InitializationType,
}

/// Why an environment is started, as the runtime sees it in `AWS_LAMBDA_INITIALIZATION_TYPE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitializationType {
    /// For an invocation that found no idle environment.
    OnDemand,
    /// Ahead of invocations, for a function's provisioned concurrency.
    ProvisionedConcurrency,
}

impl InitializationType {
    pub fn as_str(self) -> &'static str {
        match self {
            InitializationType::OnDemand => "on-demand",
            InitializationType::ProvisionedConcurrency => "provisioned-concurrency",
        }
    }
}

/// One invocation, as the agent hands it to a sandbox.
#[derive(Debug, Clone)]
pub struct InvokeRequest {
    pub request_id: String,
    pub payload: Bytes,
    /// Decoded client context JSON, when the caller sent one.
    pub client_context: Option<String>,
    pub trace_id: String,
    /// InvokeWithResponseStream: where a streamed response goes as it comes (the outcome
    /// then ends it); `None`: buffered, as Invoke answers.
    pub stream: Option<rapid_api::StreamSink>,
}

/// Why an environment could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The function's fault (bad entrypoint, init error, crash or timeout in init): the caller
    /// gets this as a function error, as Lambda does.
    #[error("function init failed: {}", .0.error_type)]
    Function(ErrorReport),
    /// Init did not finish within `EnvSpec::init_timeout` (the environment is gone).
    #[error("init did not finish within {0:?}")]
    InitTimeout(Duration),
    /// The host's fault (cannot spawn, bind, ...): a service error.
    #[error("could not start an execution environment: {0}")]
    Host(String),
}

/// A running execution environment.
#[async_trait]
pub trait Sandbox: Send + Sync {
    /// A short id for logs.
    fn id(&self) -> &str;

    /// Runs one invocation to its end: a response, a function error, or a platform error
    /// (crash, timeout) reported as a function error.
    /// `deadline` is when it times out: the function timeout, counted from when it started.
    async fn invoke(&mut self, req: InvokeRequest, deadline: Instant) -> InvokeOutcome;

    /// Whether the environment can take another invocation.
    fn is_reusable(&self) -> bool;

    /// Stops the environment and frees what it holds.
    async fn stop(self: Box<Self>);
}

/// A way to start execution environments.
#[async_trait]
pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;

    /// Starts an environment and waits until its runtime has finished init.
    async fn start(&self, spec: EnvSpec) -> Result<Box<dyn Sandbox>, StartError>;
}

/// Makes a spawned child (runtime or VMM) its own process group and ties its life to the
/// agent's: the kernel SIGKILLs it if the spawning thread dies. Spawns happen on tokio worker
/// threads, which live as long as the agent.
pub fn own_group_dying_with_agent(cmd: &mut tokio::process::Command) {
    cmd.process_group(0);
    // SAFETY: the closure runs in the forked child before exec and only calls prctl, which is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Removes an environment's directory off the async threads (a task root can hold many
/// files); an empty path means there is nothing to remove.
pub fn remove_dir_in_background(dir: PathBuf) {
    if !dir.as_os_str().is_empty() {
        std::thread::spawn(move || {
            let _ = std::fs::remove_dir_all(&dir);
        });
    }
}

/// Where a backend keeps per-environment state.
pub fn envs_dir(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("envs")
}
