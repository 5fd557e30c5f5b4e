//! The Lambda Runtime API, as a library.
//!
//! Two layers:
//! - [`core`]: a transport-neutral state machine ([`RuntimeCore`]) that a platform hands
//!   invocations to and that a runtime drives with `next`/`response`/`error`/`init_error`.
//!   It knows nothing about processes, VMs or sockets.
//! - [`http`]: an axum front that serves the core on `/2018-06-01/runtime/...`, exact to
//!   Lambda's wire behaviour, for real runtime clients (`awslambdaric`, `lambda_runtime`).
//!
//! - [`stream`]: streamed responses (`Lambda-Runtime-Function-Response-Mode: streaming`),
//!   passed to the platform through a bounded channel with Lambda's size and bandwidth caps.
//! - Extensions API (`/2020-01-01/extension/...`), Telemetry API (`/2022-07-01/telemetry`)
//!   and Logs API (`/2020-08-15/logs`) on the same listener, driven by the same core.
//!
//! The platform side (who creates invocations and consumes outcomes) is the caller of
//! [`RuntimeCore::invoke`]: the host agent's process backend, or guest-init over vsock.

pub mod core;
pub mod error_type;
pub mod extensions;
pub mod headers;
pub mod http;
mod http_ext;
pub mod invocation;
pub mod stream;
pub mod telemetry;

pub use crate::core::{
    ApiError, CoreConfig, CoreError, InitializationType, Lifecycle, MemoryProbe, Registration,
    RuntimeCore,
};
pub use crate::extensions::{ShutdownReason, ShutdownReport, MAX_EXTENSIONS};
pub use crate::invocation::{ErrorReport, Invocation, InvokeOutcome};
pub use crate::stream::{
    stream_channel, StreamEvent, StreamLimits, StreamSink, StreamWriter, MAX_STREAM_BYTES,
};
pub use crate::telemetry::Api as TelemetryApi;

/// Largest response body a runtime may post: 6 MiB plus 100 bytes, as Lambda allows.
pub const MAX_RESPONSE_BYTES: usize = 6 * 1024 * 1024 + 100;

/// Largest X-Ray error cause header a runtime may send (bytes).
pub const MAX_XRAY_CAUSE_BYTES: usize = 64 * 1024;
