//! Invoke: `POST /2015-03-31/functions/{name}/invocations`.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use rapid_api::InvokeOutcome;

use super::functions::lookup;
use super::{LambdaError, SharedState};
use crate::pool::PoolError;
use crate::sandbox::{InvokeRequest, StartError};

/// Largest synchronous invoke payload (6 MB).
pub const MAX_SYNC_PAYLOAD: usize = 6 * 1024 * 1024;
/// Largest `X-Amz-Client-Context` header (base64).
const MAX_CLIENT_CONTEXT: usize = 3583;

pub(super) fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// `X-Amz-Log-Type`, checked: `None`, `Tail` or absent.
pub(super) fn log_type(headers: &HeaderMap) -> Result<Option<&str>, LambdaError> {
    match header(headers, "x-amz-log-type") {
        Some(t) if t != "None" && t != "Tail" => Err(LambdaError::validation(format!(
            "1 validation error detected: Value '{t}' at 'logType' failed to satisfy constraint: \
             Member must satisfy enum value set: [None, Tail]"
        ))),
        t => Ok(t),
    }
}

/// `X-Amz-Client-Context`, decoded, when the caller sent one.
pub(super) fn client_context(headers: &HeaderMap) -> Result<Option<String>, LambdaError> {
    header(headers, "x-amz-client-context")
        .map(decode_client_context)
        .transpose()
}

/// The answer, success or error, with Lambda's request id header.
pub(super) fn with_request_id(request_id: &str, result: Result<Response, LambdaError>) -> Response {
    let mut res = result.unwrap_or_else(IntoResponse::into_response);
    if let Ok(v) = HeaderValue::from_str(request_id) {
        res.headers_mut().insert("x-amzn-requestid", v);
    }
    res
}

pub async fn invoke(
    State(state): State<SharedState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let request_id = uuid::Uuid::new_v4().to_string();
    let result = handle(state, &name, &q, &headers, body, &request_id).await;
    with_request_id(&request_id, result)
}

async fn handle(
    state: SharedState,
    name: &str,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Body,
    request_id: &str,
) -> Result<Response, LambdaError> {
    let function = lookup(&state.registry, name, q)?;
    let invocation_type = header(headers, "x-amz-invocation-type").unwrap_or("RequestResponse");
    match invocation_type {
        "RequestResponse" | "DryRun" | "Event" => {}
        other => {
            return Err(LambdaError::validation(format!(
                "1 validation error detected: Value '{other}' at 'invocationType' failed to satisfy constraint: \
                 Member must satisfy enum value set: [Event, RequestResponse, DryRun]"
            )))
        }
    }
    let log_type = log_type(headers)?;
    let client_context = client_context(headers)?;
    if invocation_type == "Event" {
        // Queued durably (1 MiB limit), then 202: see api/event_config.rs and events/.
        return super::event_config::enqueue(&state, &function, client_context, body, request_id)
            .await;
    }
    let payload = read_payload(body).await?;
    if invocation_type == "DryRun" {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }

    let req = InvokeRequest {
        request_id: request_id.to_string(),
        payload,
        client_context,
        trace_id: new_trace_id(),
        stream: None,
    };
    // `X-Amz-Log-Type: Tail`: the last 4 KB of this invocation's log, once it has ended.
    let tail = (log_type == Some("Tail")).then(|| state.logs.want_tail(request_id));
    let fname = function.config.function_name.clone();
    // The invocation runs in its own task: a caller that hangs up does not cut it short
    // (Lambda runs it to the end), and the environment is returned or stopped properly.
    let pool = state.pool.clone();
    let outcome = tokio::spawn(async move { pool.invoke(function, req).await })
        .await
        .map_err(|e| LambdaError::service(format!("invocation task failed: {e}")))?;
    state.metrics.record_result(&fname, &outcome);
    let outcome = match outcome {
        Ok(o) => o,
        Err(PoolError::Throttled(reason)) => {
            return Err(LambdaError::throttled_with_reason(
                reason.as_str(),
                "Rate Exceeded.",
            ));
        }
        Err(PoolError::ShuttingDown) => {
            return Err(LambdaError::unavailable(
                "The agent is shutting down and takes no new invocations.",
            ));
        }
        Err(PoolError::Start(StartError::Function(report))) => InvokeOutcome::Error(report),
        Err(PoolError::Start(e @ StartError::InitTimeout(_))) => {
            return Err(LambdaError::service(e.to_string()));
        }
        Err(PoolError::Start(StartError::Host(msg))) => {
            tracing::error!(error = %msg, "cannot start an execution environment");
            return Err(LambdaError::service(msg));
        }
    };
    let mut res = outcome_response(outcome);
    if let Some(log) = tail.and_then(crate::logs::TailRequest::take) {
        let b64 = base64::engine::general_purpose::STANDARD.encode(log);
        if let Ok(v) = HeaderValue::from_str(&b64) {
            res.headers_mut().insert("x-amz-log-result", v);
        }
    }
    Ok(res)
}

fn outcome_response(outcome: InvokeOutcome) -> Response {
    let (body, function_error) = match outcome {
        InvokeOutcome::Response { body, .. } => (body, None),
        InvokeOutcome::Error(report) => (report.body, Some("Unhandled")),
    };
    let mut res = (StatusCode::OK, body).into_response();
    let h = res.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/json"));
    h.insert(
        "x-amz-executed-version",
        HeaderValue::from_static("$LATEST"),
    );
    if let Some(fe) = function_error {
        h.insert("x-amz-function-error", HeaderValue::from_static(fe));
    }
    res
}

pub(super) fn decode_client_context(b64: &str) -> Result<String, LambdaError> {
    if b64.len() > MAX_CLIENT_CONTEXT {
        return Err(LambdaError::invalid_parameter(format!(
            "Client context must be at most {MAX_CLIENT_CONTEXT} bytes"
        )));
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| {
            LambdaError::invalid_content(
                "Client context must be a valid Base64-encoded JSON object.",
            )
        })?;
    match serde_json::from_slice::<serde_json::Value>(&raw) {
        Ok(serde_json::Value::Object(_)) => {}
        _ => {
            return Err(LambdaError::invalid_content(
                "Client context must be a valid Base64-encoded JSON object.",
            ))
        }
    }
    String::from_utf8(raw).map_err(|_| LambdaError::invalid_content("Client context is not UTF-8"))
}

/// Reads the payload: at most 6 MB, and JSON (Lambda refuses anything else). An empty body is
/// the empty JSON object.
pub(super) async fn read_payload(body: Body) -> Result<Bytes, LambdaError> {
    let bytes = match Limited::new(body, MAX_SYNC_PAYLOAD).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(LambdaError::too_large(format!(
                "Request must be smaller than {MAX_SYNC_PAYLOAD} bytes for the InvokeFunction operation"
            )))
        }
        Err(e) => {
            return Err(LambdaError::invalid_content(format!(
                "Could not read the request body: {e}"
            )))
        }
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Bytes::from_static(b"{}"));
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).map_err(|e| {
        LambdaError::invalid_content(format!("Could not parse request body into json: {e}"))
    })?;
    Ok(bytes)
}

/// An X-Ray trace header for the invocation: `Root=1-<epoch hex>-<24 hex>;Sampled=0`.
pub fn new_trace_id() -> String {
    let secs = chrono::Utc::now().timestamp();
    let rand = uuid::Uuid::new_v4().simple().to_string();
    format!(
        "Root=1-{secs:08x}-{};Parent={};Sampled=0",
        &rand[..24],
        &rand[16..32]
    )
}
