//! What flows through the core: invocations in, outcomes out.

use bytes::Bytes;
use serde_json::{json, Map, Value};

/// One invocation as the runtime sees it on `/next`.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// `Lambda-Runtime-Aws-Request-Id`: the caller-visible request id.
    pub request_id: String,
    /// `Lambda-Runtime-Invocation-Id`: identifies this attempt; clients echo it back.
    pub invocation_id: String,
    /// Deadline in milliseconds since the Unix epoch.
    pub deadline_ms: u64,
    pub function_arn: String,
    pub trace_id: Option<String>,
    /// Client context JSON (already decoded from the caller's base64).
    pub client_context: Option<String>,
    pub cognito_identity: Option<String>,
    pub tenant_id: Option<String>,
    pub content_type: String,
    pub payload: Bytes,
}

/// An error as a runtime reported it, or as the platform made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReport {
    /// Normalised error type (`Runtime.*` / `Function.*`), from the header or the platform.
    pub error_type: String,
    /// The JSON error document returned to the caller.
    pub body: Bytes,
    /// X-Ray error cause, when the runtime sent one.
    pub xray_cause: Option<String>,
}

impl ErrorReport {
    /// An error the platform itself produced (crash, timeout, oversized response, ...).
    pub fn platform(error_type: &str, message: impl Into<String>) -> Self {
        let body = json!({ "errorMessage": message.into(), "errorType": error_type });
        ErrorReport {
            error_type: error_type.to_string(),
            body: Bytes::from(body.to_string()),
            xray_cause: None,
        }
    }

    /// An error a runtime posted: `header_type` is the already normalised header value and
    /// `raw_body` what the runtime sent. A JSON object body is kept (minus `errorCause`, which
    /// Lambda drops); anything else is wrapped so that the caller always gets a JSON document.
    pub fn from_runtime(header_type: String, raw_body: &[u8], xray_cause: Option<String>) -> Self {
        let body = match serde_json::from_slice::<Value>(raw_body) {
            Ok(Value::Object(mut map)) => {
                map.remove("errorCause");
                Value::Object(map)
            }
            _ => {
                let mut map = Map::new();
                let text = String::from_utf8_lossy(raw_body).into_owned();
                if !text.is_empty() {
                    map.insert("errorMessage".into(), Value::String(text));
                }
                map.insert("errorType".into(), Value::String(header_type.clone()));
                Value::Object(map)
            }
        };
        ErrorReport {
            error_type: header_type,
            body: Bytes::from(body.to_string()),
            xray_cause,
        }
    }
}

/// How an invocation ended, as the platform sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvokeOutcome {
    /// The runtime posted a response.
    Response {
        body: Bytes,
        content_type: Option<String>,
    },
    /// The runtime posted an error, or the core refused its response (too large).
    Error(ErrorReport),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_error_body_drops_error_cause() {
        let r = ErrorReport::from_runtime(
            "Runtime.Unknown".into(),
            br#"{"errorMessage":"boom","errorType":"ValueError","errorCause":{"x":1},"stackTrace":[]}"#,
            None,
        );
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["errorMessage"], "boom");
        assert_eq!(v["errorType"], "ValueError");
        assert!(v.get("errorCause").is_none());
        assert!(v.get("stackTrace").is_some());
    }

    #[test]
    fn non_json_error_body_is_wrapped() {
        let r = ErrorReport::from_runtime("Function.Oops".into(), b"plain text", None);
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["errorMessage"], "plain text");
        assert_eq!(v["errorType"], "Function.Oops");
    }
}
