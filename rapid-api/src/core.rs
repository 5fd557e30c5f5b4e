//! The transport-neutral Runtime API state machine.
//!
//! One [`RuntimeCore`] serves one execution environment: one runtime, one invocation at a
//! time. The platform calls [`RuntimeCore::invoke`] and awaits the outcome; the runtime (through
//! any front, usually [`crate::http`]) calls `next`, `respond`, `error` and `init_error`.
//!
//! States: `Init` (runtime starting, before its first `/next`) -> `Idle` (runtime waiting for
//! work) <-> `Invoking` (runtime holds one invocation). `InitFailed` and `Closed` are terminal.

use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::{oneshot, watch, Notify};

use crate::invocation::{ErrorReport, Invocation, InvokeOutcome};
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
        ApiError {
            status: 413,
            error_type: "RequestEntityTooLarge",
            message: format!("Exceeded maximum allowed payload size ({MAX_RESPONSE_BYTES} bytes)."),
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

struct Pending {
    invocation: Invocation,
    responder: oneshot::Sender<InvokeOutcome>,
}

struct Active {
    request_id: String,
    invocation_id: String,
    responder: oneshot::Sender<InvokeOutcome>,
}

enum Phase {
    Init,
    Idle,
    Invoking(Active),
    InitFailed,
    Closed,
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Init => "Init",
            Phase::Idle => "Ready",
            Phase::Invoking(_) => "Invoking",
            Phase::InitFailed => "InitError",
            Phase::Closed => "Closed",
        }
    }
}

struct State {
    phase: Phase,
    pending: Option<Pending>,
    /// Request id of the invocation answered last: a second answer to it is a 403, an answer
    /// to an id never seen is a 400.
    last_answered: Option<String>,
}

/// The Runtime API state machine of one execution environment.
pub struct RuntimeCore {
    state: Mutex<State>,
    /// Wakes runtimes blocked in `/next`.
    wake: Notify,
    lifecycle: watch::Sender<Lifecycle>,
}

impl RuntimeCore {
    pub fn new() -> Arc<Self> {
        Arc::new(RuntimeCore {
            state: Mutex::new(State {
                phase: Phase::Init,
                pending: None,
                last_answered: None,
            }),
            wake: Notify::new(),
            lifecycle: watch::channel(Lifecycle::Initializing).0,
        })
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

    /// Waits until the runtime has finished init (its first `/next`) or reported an init error.
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

    /// Queues one invocation for the runtime. The receiver yields the outcome; it errors if the
    /// core is closed before the runtime answers.
    pub fn invoke(
        &self,
        invocation: Invocation,
    ) -> Result<oneshot::Receiver<InvokeOutcome>, CoreError> {
        let mut st = self.lock();
        match st.phase {
            Phase::Closed => return Err(CoreError::Closed),
            Phase::InitFailed => {
                if let Lifecycle::InitFailed(report) = &*self.lifecycle.borrow() {
                    return Err(CoreError::InitFailed(report.clone()));
                }
                return Err(CoreError::Closed);
            }
            Phase::Invoking(_) => return Err(CoreError::Busy),
            Phase::Init | Phase::Idle if st.pending.is_some() => return Err(CoreError::Busy),
            Phase::Init | Phase::Idle => {}
        }
        let (tx, rx) = oneshot::channel();
        st.pending = Some(Pending {
            invocation,
            responder: tx,
        });
        drop(st);
        self.wake.notify_waiters();
        Ok(rx)
    }

    /// Ends this environment: blocked and future `/next` calls get the container error, and a
    /// pending or running invocation's receiver sees the sender dropped.
    pub fn close(&self) {
        let mut st = self.lock();
        st.phase = Phase::Closed;
        st.pending = None;
        drop(st);
        self.lifecycle.send_replace(Lifecycle::Closed);
        self.wake.notify_waiters();
    }

    /// Whether the runtime currently holds an invocation or one is queued.
    pub fn is_busy(&self) -> bool {
        let st = self.lock();
        st.pending.is_some() || matches!(st.phase, Phase::Invoking(_))
    }

    // ---- runtime side ----

    /// `GET /runtime/invocation/next`: blocks until an invocation is queued. Cancel-safe: if the
    /// caller goes away while waiting, nothing is lost.
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
                    Phase::Closed => return Err(ApiError::container_error()),
                    Phase::InitFailed | Phase::Invoking(_) => {
                        return Err(ApiError::invalid_state(st.phase.name(), "Ready"))
                    }
                    Phase::Init => {
                        st.phase = Phase::Idle;
                        self.lifecycle.send_replace(Lifecycle::Ready);
                    }
                    Phase::Idle => {}
                }
                if let Some(p) = st.pending.take() {
                    st.phase = Phase::Invoking(Active {
                        request_id: p.invocation.request_id.clone(),
                        invocation_id: p.invocation.invocation_id.clone(),
                        responder: p.responder,
                    });
                    return Ok(p.invocation);
                }
            }
            notified.await;
        }
    }

    /// `POST /runtime/invocation/{id}/response`.
    pub fn respond(
        &self,
        request_id: &str,
        invocation_id: Option<&str>,
        body: Bytes,
        content_type: Option<String>,
    ) -> Result<(), ApiError> {
        let active = self.take_active(request_id, invocation_id, "InvocationResponse")?;
        let _ = active
            .responder
            .send(InvokeOutcome::Response { body, content_type });
        Ok(())
    }

    /// A response over [`MAX_RESPONSE_BYTES`]: the invocation fails with
    /// `Function.ResponseSizeTooLarge` and the runtime gets a 413.
    pub fn respond_too_large(
        &self,
        request_id: &str,
        invocation_id: Option<&str>,
    ) -> Result<(), ApiError> {
        let active = self.take_active(request_id, invocation_id, "InvocationResponse")?;
        let report = ErrorReport::platform(
            "Function.ResponseSizeTooLarge",
            format!("Response payload size exceeded maximum allowed payload size ({MAX_RESPONSE_BYTES} bytes)."),
        );
        let _ = active.responder.send(InvokeOutcome::Error(report));
        Err(ApiError::too_large())
    }

    /// `POST /runtime/invocation/{id}/error`.
    pub fn error(
        &self,
        request_id: &str,
        invocation_id: Option<&str>,
        report: ErrorReport,
    ) -> Result<(), ApiError> {
        let active = self.take_active(request_id, invocation_id, "InvocationErrorResponse")?;
        let _ = active.responder.send(InvokeOutcome::Error(report));
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
        st.phase = Phase::InitFailed;
        let pending = st.pending.take();
        drop(st);
        self.lifecycle
            .send_replace(Lifecycle::InitFailed(report.clone()));
        if let Some(p) = pending {
            let _ = p.responder.send(InvokeOutcome::Error(report));
        }
        Ok(())
    }

    fn take_active(
        &self,
        request_id: &str,
        invocation_id: Option<&str>,
        to: &str,
    ) -> Result<Active, ApiError> {
        let mut st = self.lock();
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
}
