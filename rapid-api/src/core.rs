//! The transport-neutral Runtime API state machine.
//!
//! One [`RuntimeCore`] serves one execution environment: one runtime, one invocation at a
//! time. The platform calls [`RuntimeCore::invoke`] and awaits the outcome; the runtime (through
//! any front, usually [`crate::http`]) calls `next`, `respond`, `error` and `init_error`.
//!
//! States: `Init` (runtime starting, before its first `/next`) -> `Idle` (runtime waiting for
//! work) <-> `Invoking` (runtime holds one invocation). `InitFailed` and `Closed` are terminal.
//! Snap-start adds `RestoreReady` (runtime in `/restore/next`) -> `Restoring` -> `Idle`, or
//! `RestoreFailed`.
//!
//! Extensions (Extensions API) take part: registration is open until the runtime's first
//! `/next`; init is over when the runtime and every registered extension are in their `next`;
//! an invocation goes to the runtime and, as an INVOKE event, to every extension subscribed to
//! INVOKE; its invoke phase ends when the runtime has answered and every extension is back in
//! `event/next`, and only then is the next invocation delivered. Telemetry records for all of
//! this go to the [`crate::telemetry`] hub.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{oneshot, watch, Notify};

use crate::extensions::{
    invoke_event, parse_register, shutdown_event, ShutdownReason, ShutdownReport, MAX_EXTENSIONS,
};
use crate::invocation::{ErrorReport, Invocation, InvokeOutcome};
use crate::stream::{StreamLimits, StreamSink, StreamWriter};
use crate::telemetry::{Api, Event, Hub, InvokeMetrics};
use crate::MAX_RESPONSE_BYTES;

/// What the platform can observe of the runtime's life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lifecycle {
    /// Started, not yet in its first `/next`.
    Initializing,
    /// Has called `/next` at least once: init is over.
    Ready,
    /// Posted `/runtime/init/error`.
    InitFailed(ErrorReport),
    /// The platform closed the core.
    Closed,
}

/// Errors the platform side sees.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("an invocation is already in progress in this environment")]
    Busy,
    #[error("the runtime reported an init error: {}", .0.error_type)]
    InitFailed(ErrorReport),
    #[error("the environment is closed")]
    Closed,
    #[error("the runtime's restore hooks failed: {}", .0.error_type)]
    RestoreFailed(ErrorReport),
    #[error("the environment failed and must be reset: {}", .0.error_type)]
    Failed(ErrorReport),
    #[error("init is not over yet")]
    NotReady,
}

/// An error answered to the runtime: an HTTP status and Lambda's `{errorMessage, errorType}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {error_type}: {message}")]
pub struct ApiError {
    pub status: u16,
    pub error_type: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn invalid_state(from: &str, to: &str) -> Self {
        ApiError {
            status: 403,
            error_type: "InvalidStateTransition",
            message: format!(
                "State transition from {from} to {to} failed for runtime. Error: State transition is not allowed"
            ),
        }
    }

    pub fn invalid_request_id() -> Self {
        ApiError {
            status: 400,
            error_type: "InvalidRequestID",
            message: "Invalid request ID".into(),
        }
    }

    pub fn too_large() -> Self {
        Self::too_large_for(MAX_RESPONSE_BYTES as u64)
    }

    /// A body over `limit` bytes (a streamed response's cap differs from the buffered one).
    pub fn too_large_for(limit: u64) -> Self {
        ApiError {
            status: 413,
            error_type: "RequestEntityTooLarge",
            message: format!("Exceeded maximum allowed payload size ({limit} bytes)."),
        }
    }

    pub fn container_error() -> Self {
        ApiError {
            status: 500,
            error_type: "ContainerError",
            message: "Container error. Non-recoverable state. Runtime should exit promptly.".into(),
        }
    }

    pub fn bad_request(error_type: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            error_type,
            message: message.into(),
        }
    }
}

/// How the environment was initialised: `AWS_LAMBDA_INITIALIZATION_TYPE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InitializationType {
    #[default]
    OnDemand,
    ProvisionedConcurrency,
    /// The runtime may call `GET /runtime/restore/next` instead of its first `/next`, and is
    /// answered when the platform calls [`RuntimeCore::restore`].
    SnapStart,
}

impl InitializationType {
    pub fn as_str(self) -> &'static str {
        match self {
            InitializationType::OnDemand => "on-demand",
            InitializationType::ProvisionedConcurrency => "provisioned-concurrency",
            InitializationType::SnapStart => "snap-start",
        }
    }
}

/// What the core tells extensions (register answer) and telemetry subscribers.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub function_name: String,
    pub function_version: String,
    pub handler: String,
    /// Given to extensions that ask for it (`Lambda-Extension-Accept-Feature: accountId`).
    pub account_id: String,
    /// `memorySizeMB` of `platform.report`, when known.
    pub memory_size_mb: Option<u32>,
    pub initialization_type: InitializationType,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            function_name: String::new(),
            function_version: "$LATEST".into(),
            handler: String::new(),
            account_id: String::new(),
            memory_size_mb: None,
            initialization_type: InitializationType::OnDemand,
        }
    }
}

/// The answer to `POST /extension/register`.
#[derive(Debug, Clone)]
pub struct Registration {
    /// `Lambda-Extension-Identifier`.
    pub id: String,
    pub body: serde_json::Value,
}

/// Reads the memory high-water mark of the environment (MB) for `platform.report`.
pub type MemoryProbe = Box<dyn Fn() -> Option<u64> + Send + Sync>;

struct Pending {
    invocation: Invocation,
    responder: oneshot::Sender<InvokeOutcome>,
    /// Where a streamed response goes; `None`: it is buffered.
    sink: Option<StreamSink>,
}

struct Active {
    request_id: String,
    invocation_id: String,
    responder: oneshot::Sender<InvokeOutcome>,
    sink: Option<StreamSink>,
}

enum Phase {
    Init,
    /// Snap-start: the runtime is in `/restore/next`, waiting for [`RuntimeCore::restore`].
    RestoreReady,
    /// Snap-start: restored; the runtime runs its hooks until its `/next`.
    Restoring,
    Idle,
    Invoking(Active),
    InitFailed,
    RestoreFailed,
    /// An extension reported `exit/error` after init: the environment must be reset.
    Failed,
    Closed,
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Init => "Init",
            Phase::RestoreReady => "RestoreReady",
            Phase::Restoring => "RestoreRunning",
            Phase::Idle => "Ready",
            Phase::Invoking(_) => "Invoking",
            Phase::InitFailed => "InitError",
            Phase::RestoreFailed => "RestoreError",
            Phase::Failed => "Failed",
            Phase::Closed => "Closed",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExtState {
    /// Registered, not yet in `event/next`.
    Registered,
    /// In `event/next` (or about to be), with no event to work on.
    Ready,
    /// Holds an event (INVOKE or SHUTDOWN), queued or taken, until its next `event/next`.
    Running,
    InitError,
    ExitError,
}

impl ExtState {
    fn name(self) -> &'static str {
        match self {
            ExtState::Registered => "Registered",
            ExtState::Ready => "Ready",
            ExtState::Running => "Running",
            ExtState::InitError => "InitError",
            ExtState::ExitError => "ExitError",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ShutdownAck {
    None,
    Queued,
    Taken,
    Done,
}

struct Extension {
    id: String,
    name: String,
    invoke: bool,
    shutdown: bool,
    state: ExtState,
    /// The event waiting to be taken by its `event/next`.
    event: Option<serde_json::Value>,
    shutdown_ack: ShutdownAck,
}

/// The invocation whose invoke phase is running (the runtime may have answered already).
struct Current {
    request_id: String,
    trace_id: Option<String>,
    started: std::time::Instant,
    /// Set when the runtime answered: (metrics of `platform.runtimeDone`).
    runtime_done: Option<InvokeMetrics>,
}

struct State {
    phase: Phase,
    pending: Option<Pending>,
    /// Request id of the invocation answered last: a second answer to it is a 403, an answer
    /// to an id never seen is a 400.
    last_answered: Option<String>,
    extensions: Vec<Extension>,
    /// Registration closes at the runtime's first `/next` (or `/restore/next`).
    registration_open: bool,
    /// The runtime and every extension have reached `next`: init is over.
    init_done: bool,
    init_started: std::time::Instant,
    /// `initDurationMs` for the first `platform.report` after an on-demand init.
    init_duration_for_report: Option<f64>,
    restore_started: Option<std::time::Instant>,
    current: Option<Current>,
    /// Why the environment can no longer be used (init, restore or extension failure).
    failure: Option<ErrorReport>,
    shutting_down: bool,
}

/// The Runtime API state machine of one execution environment.
pub struct RuntimeCore {
    config: CoreConfig,
    state: Mutex<State>,
    /// Wakes everything that waits on the state: runtime and extension `next` calls, the
    /// platform's `wait_idle`, `restore` and `shutdown`.
    wake: Notify,
    lifecycle: watch::Sender<Lifecycle>,
    telemetry: Hub,
    memory_probe: Mutex<Option<MemoryProbe>>,
    stream_limits: Mutex<StreamLimits>,
}

fn elapsed_ms(since: std::time::Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

fn epoch_ms(deadline: std::time::Instant) -> u64 {
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    (SystemTime::now() + left)
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl RuntimeCore {
    /// A core with default function metadata (on-demand init).
    pub fn new() -> Arc<Self> {
        Self::with_config(CoreConfig::default())
    }

    /// A core for a function: its metadata is what extensions and telemetry see.
    pub fn with_config(config: CoreConfig) -> Arc<Self> {
        let telemetry = Hub::new();
        telemetry.emit(Event::InitStart {
            init_type: config.initialization_type.as_str(),
            function_name: config.function_name.clone(),
            function_version: config.function_version.clone(),
        });
        Arc::new(RuntimeCore {
            config,
            state: Mutex::new(State {
                phase: Phase::Init,
                pending: None,
                last_answered: None,
                extensions: Vec::new(),
                registration_open: true,
                init_done: false,
                init_started: std::time::Instant::now(),
                init_duration_for_report: None,
                restore_started: None,
                current: None,
                failure: None,
                shutting_down: false,
            }),
            wake: Notify::new(),
            lifecycle: watch::channel(Lifecycle::Initializing).0,
            telemetry,
            memory_probe: Mutex::new(None),
            stream_limits: Mutex::new(StreamLimits::default()),
        })
    }

    pub fn config(&self) -> &CoreConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock is a bug elsewhere; the state itself stays
        // consistent because every transition is a single assignment.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ---- platform side ----

    /// Watch the runtime's lifecycle (init done, init failed, closed).
    pub fn lifecycle(&self) -> watch::Receiver<Lifecycle> {
        self.lifecycle.subscribe()
    }

    /// Waits until init is over (the runtime in its first `/next` or `/restore/next` and
    /// every registered extension in `event/next`) or init failed (runtime or extension).
    pub async fn wait_ready(&self) -> Result<(), CoreError> {
        let mut rx = self.lifecycle.subscribe();
        let state = rx
            .wait_for(|l| !matches!(l, Lifecycle::Initializing))
            .await
            .map(|l| l.clone())
            .unwrap_or(Lifecycle::Closed);
        match state {
            Lifecycle::Ready => Ok(()),
            Lifecycle::InitFailed(report) => Err(CoreError::InitFailed(report)),
            Lifecycle::Closed | Lifecycle::Initializing => Err(CoreError::Closed),
        }
    }

    /// Sets the source of `maxMemoryUsedMB` for `platform.report`. It is called with the
    /// core's lock held: it must be quick and must not call into the core.
    pub fn set_memory_probe(&self, probe: MemoryProbe) {
        *self.memory_probe.lock().unwrap_or_else(|e| e.into_inner()) = Some(probe);
    }

    /// Sets the size and bandwidth caps of streamed responses (default: Lambda's).
    pub fn set_stream_limits(&self, limits: StreamLimits) {
        *self.stream_limits.lock().unwrap_or_else(|e| e.into_inner()) = limits;
    }

    pub fn stream_limits(&self) -> StreamLimits {
        *self.stream_limits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A line the function (runtime process) wrote: a `function` telemetry record.
    pub fn function_log(&self, line: impl Into<String>) {
        self.telemetry.emit(Event::FunctionLog(line.into()));
    }

    /// A line an extension process wrote: an `extension` telemetry record.
    pub fn extension_log(&self, name: &str, line: impl Into<String>) {
        let _ = name; // Text-format records are the bare line, as Lambda sends them.
        self.telemetry.emit(Event::ExtensionLog(line.into()));
    }

    fn unusable(&self, st: &State) -> Option<CoreError> {
        if st.shutting_down {
            return Some(CoreError::Closed);
        }
        match st.phase {
            Phase::Closed => Some(CoreError::Closed),
            Phase::InitFailed => {
                Some(CoreError::InitFailed(st.failure.clone().unwrap_or_else(
                    || ErrorReport::platform("Runtime.Unknown", "init failed"),
                )))
            }
            Phase::RestoreFailed => st.failure.clone().map(CoreError::RestoreFailed),
            Phase::Failed => st.failure.clone().map(CoreError::Failed),
            _ => None,
        }
    }

    /// Queues one invocation. The receiver yields the outcome as soon as the runtime answers
    /// (Lambda answers the caller then); it errors if the core is closed first. The invocation
    /// reaches the runtime once init is over and the previous invoke phase has ended (runtime
    /// answered and every extension back in `event/next`); see [`RuntimeCore::wait_idle`].
    pub fn invoke(
        &self,
        invocation: Invocation,
    ) -> Result<oneshot::Receiver<InvokeOutcome>, CoreError> {
        self.invoke_with_stream(invocation, None)
    }

    /// [`RuntimeCore::invoke`] for a caller that takes a streamed response as a stream: if
    /// the runtime streams its answer, `sink` gets it (see [`crate::stream`]) and the outcome
    /// comes when the stream has ended. A buffered answer only goes to the outcome.
    pub fn invoke_with_stream(
        &self,
        invocation: Invocation,
        sink: Option<StreamSink>,
    ) -> Result<oneshot::Receiver<InvokeOutcome>, CoreError> {
        let mut st = self.lock();
        if let Some(e) = self.unusable(&st) {
            return Err(e);
        }
        if matches!(st.phase, Phase::Invoking(_)) || st.pending.is_some() {
            return Err(CoreError::Busy);
        }
        let (tx, rx) = oneshot::channel();
        st.pending = Some(Pending {
            invocation,
            responder: tx,
            sink,
        });
        drop(st);
        self.wake.notify_waiters();
        Ok(rx)
    }

    /// Waits until no invocation is queued or in its invoke phase: the runtime has answered
    /// the last one and every extension is back in `event/next`. The environment is then
    /// ready for the next invocation. Errors when the environment became unusable.
    pub async fn wait_idle(&self) -> Result<(), CoreError> {
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.lock();
                if let Some(e) = self.unusable(&st) {
                    return Err(e);
                }
                if st.init_done && st.current.is_none() && st.pending.is_none() {
                    return Ok(());
                }
            }
            notified.await;
        }
    }

    /// Names of the extensions registered so far, in registration order.
    pub fn registered_extensions(&self) -> Vec<String> {
        self.lock()
            .extensions
            .iter()
            .map(|e| e.name.clone())
            .collect()
    }

    /// Waits until at least `count` extensions have registered. Lambda's init runs the
    /// extensions' init (each registers) before it starts the runtime, whose first `/next`
    /// closes registration: an embedding that starts extension processes waits here before
    /// starting the runtime. Errors when init failed or the core was closed first.
    pub async fn wait_registered(&self, count: usize) -> Result<(), CoreError> {
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.lock();
                if let Some(e) = self.unusable(&st) {
                    return Err(e);
                }
                if st.extensions.len() >= count {
                    return Ok(());
                }
                if !st.registration_open {
                    return Err(CoreError::Closed);
                }
            }
            notified.await;
        }
    }

    /// Why the environment can no longer serve invocations, if it cannot.
    pub fn failure(&self) -> Option<ErrorReport> {
        self.lock().failure.clone()
    }

    /// Snap-start: resumes a runtime waiting in `/restore/next` and waits for its restore
    /// hooks: `Ok` at its next `/next`, the error it posted to `/restore/error` otherwise. A
    /// runtime that went straight to `/next` has nothing to run: `Ok` at once.
    pub async fn restore(&self) -> Result<(), CoreError> {
        {
            let mut st = self.lock();
            match st.phase {
                Phase::RestoreReady => {
                    st.phase = Phase::Restoring;
                    st.restore_started = Some(std::time::Instant::now());
                    self.telemetry.emit(Event::RestoreStart {
                        function_name: self.config.function_name.clone(),
                        function_version: self.config.function_version.clone(),
                    });
                }
                Phase::Init => return Err(CoreError::NotReady),
                _ => {}
            }
        }
        self.wake.notify_waiters();
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.lock();
                if let Some(e) = self.unusable(&st) {
                    return Err(e);
                }
                if !matches!(st.phase, Phase::Restoring | Phase::RestoreReady) {
                    return Ok(());
                }
            }
            notified.await;
        }
    }

    /// Shutdown: SHUTDOWN (with `reason` and `deadline`) to every extension subscribed to it,
    /// then waits until each has come back to `event/next` (or reported `exit/error`), or the
    /// deadline. No invocation is delivered afterwards. An invocation still running is
    /// reported to telemetry with status `timeout` or `failure`. The core stays open for the
    /// extensions' last calls: [`RuntimeCore::close`] it afterwards.
    pub async fn shutdown(
        &self,
        reason: ShutdownReason,
        deadline: std::time::Instant,
    ) -> ShutdownReport {
        {
            let mut st = self.lock();
            st.shutting_down = true;
            st.registration_open = false;
            if let Some(cur) = st.current.take() {
                let status = match reason {
                    ShutdownReason::Timeout => "timeout",
                    _ => "failure",
                };
                // The runtime's own runtimeDone was sent if it answered; otherwise the
                // invocation ends here, with the shutdown's status.
                let m = match cur.runtime_done {
                    Some(m) => m,
                    None => {
                        let m = InvokeMetrics {
                            request_id: cur.request_id.clone(),
                            status,
                            error_type: None,
                            trace_id: cur.trace_id.clone(),
                            duration_ms: elapsed_ms(cur.started),
                            produced_bytes: None,
                            billed_ms: None,
                            memory_size_mb: None,
                            max_memory_used_mb: None,
                            init_duration_ms: None,
                        };
                        self.telemetry.emit(Event::RuntimeDone(m.clone()));
                        m
                    }
                };
                let report = self.report_metrics(&mut st, m, cur.started);
                self.telemetry.emit(Event::Report(report));
            }
            let event = shutdown_event(reason, epoch_ms(deadline));
            for ext in st.extensions.iter_mut() {
                if ext.shutdown && !matches!(ext.state, ExtState::InitError | ExtState::ExitError) {
                    ext.event = Some(event.clone());
                    ext.state = ExtState::Running;
                    ext.shutdown_ack = ShutdownAck::Queued;
                }
            }
        }
        self.wake.notify_waiters();
        let deadline = tokio::time::Instant::from_std(deadline);
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.lock();
                let waiting = st
                    .extensions
                    .iter()
                    .any(|e| matches!(e.shutdown_ack, ShutdownAck::Queued | ShutdownAck::Taken));
                if !waiting || tokio::time::Instant::now() >= deadline {
                    let mut report = ShutdownReport::default();
                    for e in st
                        .extensions
                        .iter()
                        .filter(|e| e.shutdown_ack != ShutdownAck::None)
                    {
                        if e.shutdown_ack == ShutdownAck::Done {
                            report.acknowledged.push(e.name.clone());
                        } else {
                            report.timed_out.push(e.name.clone());
                        }
                    }
                    return report;
                }
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// Ends this environment: blocked and future `/next` calls get the container error, and a
    /// pending or running invocation's receiver sees the sender dropped. Telemetry
    /// subscribers get what is buffered for them once more.
    pub fn close(&self) {
        let mut st = self.lock();
        st.phase = Phase::Closed;
        st.pending = None;
        drop(st);
        self.telemetry.close();
        self.lifecycle.send_replace(Lifecycle::Closed);
        self.wake.notify_waiters();
    }

    /// Whether the runtime currently holds an invocation or one is queued.
    pub fn is_busy(&self) -> bool {
        let st = self.lock();
        st.pending.is_some() || matches!(st.phase, Phase::Invoking(_))
    }

    // ---- internal transitions (state lock held) ----

    /// Init is over once the runtime has reached `/next` (or `/restore/next`) and every
    /// registered extension `event/next`.
    fn check_init_done(&self, st: &mut State) {
        if st.init_done
            || !matches!(
                st.phase,
                Phase::Idle | Phase::RestoreReady | Phase::Restoring
            )
            || st.extensions.iter().any(|e| e.state != ExtState::Ready)
        {
            return;
        }
        st.init_done = true;
        let duration = elapsed_ms(st.init_started);
        if self.config.initialization_type == InitializationType::OnDemand {
            st.init_duration_for_report = Some(duration);
        }
        self.telemetry.close_subscriptions();
        self.telemetry.emit(Event::InitReport {
            init_type: self.config.initialization_type.as_str(),
            status: "success",
            error_type: None,
            duration_ms: duration,
        });
        self.lifecycle.send_replace(Lifecycle::Ready);
        self.wake.notify_waiters();
    }

    fn report_metrics(
        &self,
        st: &mut State,
        runtime: InvokeMetrics,
        started: std::time::Instant,
    ) -> InvokeMetrics {
        let probe = self.memory_probe.lock().unwrap_or_else(|e| e.into_inner());
        InvokeMetrics {
            // Billed: the whole invoke phase, extensions included, in whole milliseconds.
            billed_ms: Some(elapsed_ms(started).ceil().max(1.0) as u64),
            memory_size_mb: self.config.memory_size_mb,
            max_memory_used_mb: probe.as_ref().and_then(|p| p()),
            init_duration_ms: st.init_duration_for_report.take(),
            ..runtime
        }
    }

    /// The invoke phase ends when the runtime has answered and no extension still works on
    /// its INVOKE event.
    fn check_invoke_done(&self, st: &mut State) {
        let done = match &st.current {
            Some(c) => c.runtime_done.is_some(),
            None => false,
        };
        if !done || st.extensions.iter().any(|e| e.state == ExtState::Running) {
            return;
        }
        if let Some(cur) = st.current.take() {
            if let Some(m) = cur.runtime_done {
                let report = self.report_metrics(st, m, cur.started);
                self.telemetry.emit(Event::Report(report));
            }
        }
        self.wake.notify_waiters();
    }

    /// The runtime answered the current invocation.
    fn runtime_done(
        &self,
        st: &mut State,
        status: &'static str,
        error_type: Option<String>,
        produced: Option<usize>,
    ) {
        if let Some(cur) = st.current.as_mut() {
            let m = InvokeMetrics {
                request_id: cur.request_id.clone(),
                status,
                error_type,
                trace_id: cur.trace_id.clone(),
                duration_ms: elapsed_ms(cur.started),
                produced_bytes: produced,
                billed_ms: None,
                memory_size_mb: None,
                max_memory_used_mb: None,
                init_duration_ms: None,
            };
            self.telemetry.emit(Event::RuntimeDone(m.clone()));
            cur.runtime_done = Some(m);
        }
        self.check_invoke_done(st);
    }

    /// The environment cannot continue: a pending invocation and a running one get `report`.
    fn fail(&self, st: &mut State, phase: Phase, report: ErrorReport) {
        if matches!(st.phase, Phase::Closed) {
            return;
        }
        if let Phase::Invoking(active) = std::mem::replace(&mut st.phase, phase) {
            let _ = active.responder.send(InvokeOutcome::Error(report.clone()));
        }
        if let Some(p) = st.pending.take() {
            let _ = p.responder.send(InvokeOutcome::Error(report.clone()));
        }
        st.failure = Some(report);
    }

    // ---- runtime side ----

    /// `GET /runtime/invocation/next`: blocks until an invocation can be delivered. Cancel-safe:
    /// if the caller goes away while waiting, nothing is lost.
    pub async fn next(&self) -> Result<Invocation, ApiError> {
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            // Register before looking at the state so a wake between the check and the
            // await is not lost.
            notified.as_mut().enable();
            {
                let mut st = self.lock();
                match &st.phase {
                    Phase::Closed | Phase::Failed => return Err(ApiError::container_error()),
                    Phase::InitFailed
                    | Phase::RestoreFailed
                    | Phase::Invoking(_)
                    | Phase::RestoreReady => {
                        return Err(ApiError::invalid_state(st.phase.name(), "Ready"))
                    }
                    Phase::Init => {
                        st.phase = Phase::Idle;
                        st.registration_open = false;
                        self.telemetry.emit(Event::InitRuntimeDone {
                            init_type: self.config.initialization_type.as_str(),
                            status: "success",
                            error_type: None,
                        });
                        self.check_init_done(&mut st);
                    }
                    Phase::Restoring => {
                        st.phase = Phase::Idle;
                        self.telemetry.emit(Event::RestoreRuntimeDone {
                            status: "success",
                            error_type: None,
                        });
                        let d = st.restore_started.map(elapsed_ms).unwrap_or(0.0);
                        self.telemetry.emit(Event::RestoreReport {
                            status: "success",
                            duration_ms: d,
                        });
                        self.wake.notify_waiters();
                    }
                    Phase::Idle => {}
                }
                if st.init_done && st.current.is_none() && !st.shutting_down {
                    if let Some(p) = st.pending.take() {
                        return Ok(self.deliver(&mut st, p));
                    }
                }
            }
            notified.await;
        }
    }

    /// Hands `p` to the runtime and INVOKE events to the extensions subscribed to them.
    fn deliver(&self, st: &mut State, p: Pending) -> Invocation {
        let inv = p.invocation;
        st.phase = Phase::Invoking(Active {
            request_id: inv.request_id.clone(),
            invocation_id: inv.invocation_id.clone(),
            responder: p.responder,
            sink: p.sink,
        });
        st.current = Some(Current {
            request_id: inv.request_id.clone(),
            trace_id: inv.trace_id.clone(),
            started: std::time::Instant::now(),
            runtime_done: None,
        });
        let event = invoke_event(&inv);
        for ext in st.extensions.iter_mut().filter(|e| e.invoke) {
            ext.event = Some(event.clone());
            ext.state = ExtState::Running;
        }
        self.telemetry.emit(Event::Start {
            request_id: inv.request_id.clone(),
            version: self.config.function_version.clone(),
            trace_id: inv.trace_id.clone(),
        });
        self.wake.notify_waiters();
        inv
    }

    /// `GET /runtime/restore/next` (snap-start only, instead of the first `/next`): init is
    /// over; blocks until the platform calls [`RuntimeCore::restore`], then answers 200.
    pub async fn restore_next(&self) -> Result<(), ApiError> {
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.lock();
                match st.phase {
                    Phase::Init
                        if self.config.initialization_type == InitializationType::SnapStart =>
                    {
                        st.phase = Phase::RestoreReady;
                        st.registration_open = false;
                        self.telemetry.emit(Event::InitRuntimeDone {
                            init_type: self.config.initialization_type.as_str(),
                            status: "success",
                            error_type: None,
                        });
                        self.check_init_done(&mut st);
                    }
                    // A second call while waiting (the first went away): wait again.
                    Phase::RestoreReady => {}
                    Phase::Restoring => return Ok(()),
                    Phase::Closed | Phase::Failed => return Err(ApiError::container_error()),
                    _ => return Err(ApiError::invalid_state(st.phase.name(), "RestoreReady")),
                }
            }
            notified.await;
        }
    }

    /// `POST /runtime/restore/error`: the runtime's restore hooks failed. Only while
    /// restoring; the error goes to [`RuntimeCore::restore`] and to every later invocation.
    pub fn restore_error(&self, report: ErrorReport) -> Result<(), ApiError> {
        let mut st = self.lock();
        match st.phase {
            Phase::Restoring => {}
            Phase::Closed => return Err(ApiError::container_error()),
            _ => return Err(ApiError::invalid_state(st.phase.name(), "RestoreError")),
        }
        self.telemetry.emit(Event::RestoreRuntimeDone {
            status: "error",
            error_type: Some(report.error_type.clone()),
        });
        self.fail(&mut st, Phase::RestoreFailed, report);
        drop(st);
        self.wake.notify_waiters();
        Ok(())
    }

    /// `POST /runtime/invocation/{id}/response`.
    pub fn respond(
        &self,
        request_id: &str,
        invocation_id: Option<&str>,
        body: Bytes,
        content_type: Option<String>,
    ) -> Result<(), ApiError> {
        let mut st = self.lock();
        let active = self.take_active(&mut st, request_id, invocation_id, "InvocationResponse")?;
        let produced = body.len();
        let _ = active
            .responder
            .send(InvokeOutcome::Response { body, content_type });
        self.runtime_done(&mut st, "success", None, Some(produced));
        drop(st);
        self.wake.notify_waiters();
        Ok(())
    }

    /// `POST /runtime/invocation/{id}/response` with `Lambda-Runtime-Function-Response-Mode:
    /// streaming`: the response has started. The runtime's answer is over (no second answer
    /// is taken) but its invoke phase lasts until the returned writer is finished; no other
    /// invocation is delivered before that.
    pub fn begin_stream(
        self: &Arc<Self>,
        request_id: &str,
        invocation_id: Option<&str>,
        content_type: Option<String>,
    ) -> Result<StreamWriter, ApiError> {
        let mut st = self.lock();
        let active = self.take_active(&mut st, request_id, invocation_id, "InvocationResponse")?;
        drop(st);
        Ok(StreamWriter::new(
            self.clone(),
            active.responder,
            active.sink,
            content_type,
            self.stream_limits(),
        ))
    }

    /// A streamed response ended (see [`StreamWriter`]).
    pub(crate) fn end_stream(
        &self,
        responder: oneshot::Sender<InvokeOutcome>,
        outcome: InvokeOutcome,
        status: &'static str,
        produced: Option<usize>,
    ) {
        let mut st = self.lock();
        let error_type = match &outcome {
            InvokeOutcome::Error(r) => Some(r.error_type.clone()),
            InvokeOutcome::Response { .. } => None,
        };
        let _ = responder.send(outcome);
        self.runtime_done(&mut st, status, error_type, produced);
        drop(st);
        self.wake.notify_waiters();
    }

    /// A response over [`MAX_RESPONSE_BYTES`]: the invocation fails with
    /// `Function.ResponseSizeTooLarge` and the runtime gets a 413.
    pub fn respond_too_large(
        &self,
        request_id: &str,
        invocation_id: Option<&str>,
    ) -> Result<(), ApiError> {
        let mut st = self.lock();
        let active = self.take_active(&mut st, request_id, invocation_id, "InvocationResponse")?;
        let report = ErrorReport::platform(
            "Function.ResponseSizeTooLarge",
            format!("Response payload size exceeded maximum allowed payload size ({MAX_RESPONSE_BYTES} bytes)."),
        );
        let error_type = report.error_type.clone();
        let _ = active.responder.send(InvokeOutcome::Error(report));
        self.runtime_done(&mut st, "failure", Some(error_type), None);
        drop(st);
        self.wake.notify_waiters();
        Err(ApiError::too_large())
    }

    /// `POST /runtime/invocation/{id}/error`.
    pub fn error(
        &self,
        request_id: &str,
        invocation_id: Option<&str>,
        report: ErrorReport,
    ) -> Result<(), ApiError> {
        let mut st = self.lock();
        let active = self.take_active(
            &mut st,
            request_id,
            invocation_id,
            "InvocationErrorResponse",
        )?;
        let error_type = report.error_type.clone();
        let _ = active.responder.send(InvokeOutcome::Error(report));
        self.runtime_done(&mut st, "error", Some(error_type), None);
        drop(st);
        self.wake.notify_waiters();
        Ok(())
    }

    /// `POST /runtime/init/error`: only before the first `/next`. The error goes to the
    /// pending invocation, or to the next one the platform tries.
    pub fn init_error(&self, report: ErrorReport) -> Result<(), ApiError> {
        let mut st = self.lock();
        match st.phase {
            Phase::Init => {}
            Phase::Closed => return Err(ApiError::container_error()),
            _ => return Err(ApiError::invalid_state(st.phase.name(), "InitError")),
        }
        self.telemetry.emit(Event::InitRuntimeDone {
            init_type: self.config.initialization_type.as_str(),
            status: "error",
            error_type: Some(report.error_type.clone()),
        });
        self.fail_init(&mut st, report);
        drop(st);
        self.wake.notify_waiters();
        Ok(())
    }

    fn fail_init(&self, st: &mut State, report: ErrorReport) {
        st.registration_open = false;
        self.telemetry.emit(Event::InitReport {
            init_type: self.config.initialization_type.as_str(),
            status: "error",
            error_type: Some(report.error_type.clone()),
            duration_ms: elapsed_ms(st.init_started),
        });
        self.telemetry.close_subscriptions();
        self.fail(st, Phase::InitFailed, report.clone());
        self.lifecycle.send_replace(Lifecycle::InitFailed(report));
    }

    fn take_active(
        &self,
        st: &mut State,
        request_id: &str,
        invocation_id: Option<&str>,
        to: &str,
    ) -> Result<Active, ApiError> {
        match std::mem::replace(&mut st.phase, Phase::Idle) {
            Phase::Invoking(active) if active.request_id == request_id => {
                if invocation_id.is_some_and(|given| given != active.invocation_id) {
                    // A late answer from another attempt of this request: refused.
                    st.phase = Phase::Invoking(active);
                    return Err(ApiError::bad_request(
                        "InvalidRequestID",
                        "Invocation ID does not match the current invocation",
                    ));
                }
                st.last_answered = Some(active.request_id.clone());
                Ok(active)
            }
            Phase::Closed => {
                st.phase = Phase::Closed;
                Err(ApiError::container_error())
            }
            Phase::Failed => {
                st.phase = Phase::Failed;
                Err(ApiError::container_error())
            }
            other => {
                let from = other.name();
                st.phase = other;
                if st.last_answered.as_deref() == Some(request_id) {
                    Err(ApiError::invalid_state(from, to))
                } else {
                    Err(ApiError::invalid_request_id())
                }
            }
        }
    }

    // ---- extension side ----

    fn find_ext<'a>(st: &'a mut State, id: &str) -> Option<&'a mut Extension> {
        st.extensions.iter_mut().find(|e| e.id == id)
    }

    /// `POST /extension/register`. `events` as parsed by the front; `with_account` when the
    /// extension sent `Lambda-Extension-Accept-Feature: accountId`.
    pub fn register(
        &self,
        name: &str,
        body: &[u8],
        with_account: bool,
    ) -> Result<Registration, ApiError> {
        if name.is_empty() {
            return Err(ApiError::extension_name_invalid());
        }
        let (invoke, shutdown, events) = parse_register(body)?;
        let mut st = self.lock();
        if matches!(st.phase, Phase::Closed) {
            return Err(ApiError::container_error());
        }
        if !st.registration_open {
            return Err(ApiError::registration_closed());
        }
        if st.extensions.iter().any(|e| e.name == name) {
            return Err(ApiError::extension_name_taken());
        }
        if st.extensions.len() >= MAX_EXTENSIONS {
            return Err(ApiError::too_many_extensions());
        }
        let id = uuid::Uuid::new_v4().to_string();
        st.extensions.push(Extension {
            id: id.clone(),
            name: name.to_string(),
            invoke,
            shutdown,
            state: ExtState::Registered,
            event: None,
            shutdown_ack: ShutdownAck::None,
        });
        self.telemetry.emit(Event::Extension {
            name: name.to_string(),
            events,
        });
        // The embedding may be waiting for this registration to start the runtime.
        self.wake.notify_waiters();
        let mut body = serde_json::json!({
            "functionName": self.config.function_name,
            "functionVersion": self.config.function_version,
            "handler": self.config.handler,
        });
        if with_account {
            body["accountId"] = serde_json::json!(self.config.account_id);
        }
        Ok(Registration { id, body })
    }

    /// `GET /extension/event/next`: blocks until an event is queued for this extension. Its
    /// call also says it is done with the previous event. Cancel-safe.
    pub async fn extension_next(&self, id: &str) -> Result<serde_json::Value, ApiError> {
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.lock();
                if matches!(st.phase, Phase::Closed) {
                    return Err(ApiError::container_error());
                }
                let Some(ext) = Self::find_ext(&mut st, id) else {
                    return Err(ApiError::extension_unknown(Some(id)));
                };
                if let Some(ev) = ext.event.take() {
                    if ext.shutdown_ack == ShutdownAck::Queued {
                        ext.shutdown_ack = ShutdownAck::Taken;
                    }
                    return Ok(ev);
                }
                match ext.state {
                    ExtState::Registered => {
                        ext.state = ExtState::Ready;
                        self.check_init_done(&mut st);
                    }
                    ExtState::Running => {
                        ext.state = ExtState::Ready;
                        if ext.shutdown_ack == ShutdownAck::Taken {
                            ext.shutdown_ack = ShutdownAck::Done;
                        }
                        self.check_invoke_done(&mut st);
                        self.wake.notify_waiters();
                    }
                    ExtState::Ready => {}
                    s @ (ExtState::InitError | ExtState::ExitError) => {
                        return Err(ApiError::extension_state(s.name(), "Ready", id));
                    }
                }
            }
            notified.await;
        }
    }

    /// `POST /extension/init/error`: the extension failed to initialise; init fails with
    /// `Extension.InitError` (the pending or next invocation gets it).
    pub fn extension_init_error(
        &self,
        id: &str,
        error_type: &str,
        body: &[u8],
    ) -> Result<(), ApiError> {
        let mut st = self.lock();
        if matches!(st.phase, Phase::Closed) {
            return Err(ApiError::container_error());
        }
        let init_done = st.init_done;
        let Some(ext) = Self::find_ext(&mut st, id) else {
            return Err(ApiError::extension_unknown(None));
        };
        if init_done || !matches!(ext.state, ExtState::Registered | ExtState::Ready) {
            return Err(ApiError::extension_state(ext.state.name(), "InitError", id));
        }
        ext.state = ExtState::InitError;
        let report = extension_report("Extension.InitError", &ext.name, error_type, body);
        if !matches!(
            st.phase,
            Phase::InitFailed | Phase::RestoreFailed | Phase::Failed
        ) {
            self.fail_init(&mut st, report);
        }
        drop(st);
        self.wake.notify_waiters();
        Ok(())
    }

    /// `POST /extension/exit/error`: the extension is about to exit on an error. During init
    /// this fails the init; afterwards the environment must be reset (a running invocation
    /// fails with `Extension.ExitError`, later ones are refused with [`CoreError::Failed`]).
    pub fn extension_exit_error(
        &self,
        id: &str,
        error_type: &str,
        body: &[u8],
    ) -> Result<(), ApiError> {
        let mut st = self.lock();
        if matches!(st.phase, Phase::Closed) {
            return Err(ApiError::container_error());
        }
        let Some(ext) = Self::find_ext(&mut st, id) else {
            return Err(ApiError::extension_unknown(None));
        };
        if !matches!(
            ext.state,
            ExtState::Registered | ExtState::Ready | ExtState::Running
        ) {
            return Err(ApiError::extension_state(ext.state.name(), "ExitError", id));
        }
        ext.state = ExtState::ExitError;
        ext.event = None;
        if ext.shutdown_ack != ShutdownAck::None {
            ext.shutdown_ack = ShutdownAck::Done;
        }
        let report = extension_report("Extension.ExitError", &ext.name, error_type, body);
        let already_failed = matches!(
            st.phase,
            Phase::InitFailed | Phase::RestoreFailed | Phase::Failed
        );
        if !already_failed && !st.shutting_down {
            if st.init_done {
                self.fail(&mut st, Phase::Failed, report);
            } else {
                self.fail_init(&mut st, report);
            }
        }
        drop(st);
        self.wake.notify_waiters();
        Ok(())
    }

    /// The embedding saw the extension process `name` exit. During a shutdown that is its
    /// acknowledgement; otherwise the extension crashed: the environment fails with
    /// `Extension.Crash` (init fails, a running invocation gets the error).
    pub fn extension_exited(&self, name: &str) {
        let mut st = self.lock();
        let shutting_down = st.shutting_down;
        let Some(ext) = st.extensions.iter_mut().find(|e| e.name == name) else {
            return;
        };
        if ext.shutdown_ack != ShutdownAck::None {
            ext.shutdown_ack = ShutdownAck::Done;
        }
        let crashed =
            !shutting_down && !matches!(ext.state, ExtState::InitError | ExtState::ExitError);
        ext.state = ExtState::ExitError;
        ext.event = None;
        let report = ErrorReport::platform(
            "Extension.Crash",
            format!("Extension {name} exited unexpectedly"),
        );
        let already_failed = matches!(
            st.phase,
            Phase::InitFailed | Phase::RestoreFailed | Phase::Failed | Phase::Closed
        );
        if crashed && !already_failed {
            if st.init_done {
                self.fail(&mut st, Phase::Failed, report);
            } else {
                self.fail_init(&mut st, report);
            }
        }
        drop(st);
        self.wake.notify_waiters();
    }

    /// `PUT /telemetry` or `PUT /logs` from the extension `id`.
    pub fn subscribe(&self, api: Api, id: &str, body: &[u8]) -> Result<(), ApiError> {
        let mut st = self.lock();
        if matches!(st.phase, Phase::Closed) {
            return Err(ApiError::container_error());
        }
        let Some(ext) = Self::find_ext(&mut st, id) else {
            return Err(ApiError::extension_unknown(Some(id)));
        };
        let name = ext.name.clone();
        self.telemetry.subscribe(api, id, &name, body)
    }
}

/// The error the platform records for an extension's `init/error` or `exit/error`.
fn extension_report(kind: &str, name: &str, reported: &str, body: &[u8]) -> ErrorReport {
    let detail = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("errorMessage")
                .and_then(|m| m.as_str())
                .map(str::to_string)
        });
    let message = match detail {
        Some(d) => format!("Extension {name} reported {reported}: {d}"),
        None => format!("Extension {name} reported {reported}"),
    };
    ErrorReport::platform(kind, message)
}
