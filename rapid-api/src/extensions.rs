//! Types of the Extensions API (`/2020-01-01/extension/...`): events, shutdown reasons and the
//! errors Lambda answers extensions with.

use serde_json::{json, Value};

use crate::core::ApiError;
use crate::Invocation;

/// Lambda allows at most this many extensions per function.
pub const MAX_EXTENSIONS: usize = 10;

/// Why the environment is shutting down, as the SHUTDOWN event says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownReason {
    /// The environment was idle and is being reclaimed.
    Spindown,
    /// An invocation overran its timeout; the environment is reset.
    Timeout,
    /// The runtime or an extension failed; the environment is reset.
    Failure,
}

impl ShutdownReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ShutdownReason::Spindown => "spindown",
            ShutdownReason::Timeout => "timeout",
            ShutdownReason::Failure => "failure",
        }
    }
}

/// What [`crate::RuntimeCore::shutdown`] observed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Extensions (by name) that took the SHUTDOWN event and came back to `event/next`, or
    /// reported `exit/error`, before the deadline.
    pub acknowledged: Vec<String>,
    /// Extensions subscribed to SHUTDOWN that had not come back at the deadline.
    pub timed_out: Vec<String>,
}

/// The INVOKE event body an extension receives for `inv`.
pub(crate) fn invoke_event(inv: &Invocation) -> Value {
    let mut ev = json!({
        "eventType": "INVOKE",
        "deadlineMs": inv.deadline_ms,
        "requestId": inv.request_id,
        "invokedFunctionArn": inv.function_arn,
    });
    if let Some(t) = &inv.trace_id {
        ev["tracing"] = json!({ "type": "X-Amzn-Trace-Id", "value": t });
    }
    ev
}

pub(crate) fn shutdown_event(reason: ShutdownReason, deadline_ms: u64) -> Value {
    json!({
        "eventType": "SHUTDOWN",
        "shutdownReason": reason.as_str(),
        "deadlineMs": deadline_ms,
    })
}

/// The Extensions API's error answers (all 403 but the container error), with Lambda's types
/// and messages.
impl ApiError {
    fn forbidden(error_type: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status: 403,
            error_type,
            message: message.into(),
        }
    }

    pub fn extension_id_missing() -> Self {
        Self::forbidden(
            "Extension.MissingExtensionIdentifier",
            "Missing Lambda-Extension-Identifier header",
        )
    }

    pub fn extension_id_invalid() -> Self {
        Self::forbidden(
            "Extension.InvalidExtensionIdentifier",
            "Invalid Lambda-Extension-Identifier",
        )
    }

    /// `event/next`, `/telemetry` and `/logs` name the identifier; `init/error` and
    /// `exit/error` do not (as Lambda answers).
    pub fn extension_unknown(id: Option<&str>) -> Self {
        match id {
            Some(id) => Self::forbidden(
                "Extension.UnknownExtensionIdentifier",
                format!("Unknown extension {id}"),
            ),
            None => Self::forbidden(
                "Extension.UnknownExtensionIdentifier",
                "Unknown Lambda-Extension-Identifier",
            ),
        }
    }

    pub fn extension_state(from: &str, to: &str, id: &str) -> Self {
        Self::forbidden(
            "Extension.InvalidExtensionState",
            format!(
                "State transition from {from} to {to} failed for extension {id}. Error: State transition is not allowed"
            ),
        )
    }

    pub fn extension_name_invalid() -> Self {
        Self::forbidden("Extension.InvalidExtensionName", "Empty extension name")
    }

    pub fn extension_name_taken() -> Self {
        Self::forbidden(
            "Extension.InvalidExtensionState",
            "Extension with this name already registered",
        )
    }

    pub fn registration_closed() -> Self {
        Self::forbidden(
            "Extension.RegistrationClosed",
            "Extension registration closed already",
        )
    }

    pub fn too_many_extensions() -> Self {
        Self::forbidden(
            "Extension.TooManyExtensions",
            format!("Extension limit ({MAX_EXTENSIONS}) reached"),
        )
    }

    pub fn invalid_event_type(event: &str) -> Self {
        Self::forbidden(
            "Extension.InvalidEventType",
            format!("{event}: event type is not INVOKE or SHUTDOWN"),
        )
    }

    pub fn invalid_request_format(message: impl Into<String>) -> Self {
        Self::forbidden("InvalidRequestFormat", message)
    }

    pub fn extension_missing_error_type() -> Self {
        Self::forbidden(
            "Extension.MissingHeader",
            "Lambda-Extension-Function-Error-Type not found",
        )
    }
}

/// Parses a `register` body: `{"events": [...]}` with INVOKE and/or SHUTDOWN. Returns
/// (invoke, shutdown) subscriptions.
pub(crate) fn parse_register(body: &[u8]) -> Result<(bool, bool, Vec<String>), ApiError> {
    #[derive(serde::Deserialize)]
    struct Req {
        #[serde(default)]
        events: Vec<String>,
        #[serde(default, rename = "configurationKeys")]
        configuration_keys: Vec<String>,
    }
    let req: Req = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid_request_format(e.to_string()))?;
    if !req.configuration_keys.is_empty() {
        return Err(ApiError::invalid_request_format(
            "configurationKeys are deprecated; use environment variables instead",
        ));
    }
    let (mut invoke, mut shutdown) = (false, false);
    for e in &req.events {
        match e.as_str() {
            "INVOKE" => invoke = true,
            "SHUTDOWN" => shutdown = true,
            other => return Err(ApiError::invalid_event_type(other)),
        }
    }
    Ok((invoke, shutdown, req.events))
}
