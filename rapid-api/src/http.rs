//! The HTTP front of the Runtime API: `/2018-06-01/runtime/...` over a [`RuntimeCore`], with
//! the Extensions, Telemetry and Logs APIs (see `http_ext`) on the same router.

use std::future::Future;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::json;
use tokio::net::TcpListener;

use crate::core::{ApiError, RuntimeCore};
use crate::invocation::ErrorReport;
use crate::{error_type, headers, http_ext, Invocation, MAX_RESPONSE_BYTES, MAX_XRAY_CAUSE_BYTES};

/// Path prefix of the Runtime API.
pub const PREFIX: &str = "/2018-06-01";
/// Path prefix of the Extensions API.
pub const EXTENSION_PREFIX: &str = "/2020-01-01";
/// Path prefix of the Telemetry API.
pub const TELEMETRY_PREFIX: &str = "/2022-07-01";
/// Path prefix of the Logs API.
pub const LOGS_PREFIX: &str = "/2020-08-15";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = Json(json!({ "errorMessage": self.message, "errorType": self.error_type }));
        (status, body).into_response()
    }
}

/// The Runtime API routes for one environment.
pub fn router(core: Arc<RuntimeCore>) -> Router {
    Router::new()
        .route(&format!("{PREFIX}/runtime/invocation/next"), get(next))
        .route(
            &format!("{PREFIX}/runtime/invocation/{{id}}/response"),
            post(response),
        )
        .route(
            &format!("{PREFIX}/runtime/invocation/{{id}}/error"),
            post(error),
        )
        .route(&format!("{PREFIX}/runtime/init/error"), post(init_error))
        .route(
            &format!("{PREFIX}/runtime/restore/next"),
            get(http_ext::restore_next),
        )
        .route(
            &format!("{PREFIX}/runtime/restore/error"),
            post(http_ext::restore_error),
        )
        .route(
            &format!("{EXTENSION_PREFIX}/extension/register"),
            post(http_ext::register),
        )
        .route(
            &format!("{EXTENSION_PREFIX}/extension/event/next"),
            get(http_ext::event_next),
        )
        .route(
            &format!("{EXTENSION_PREFIX}/extension/init/error"),
            post(http_ext::init_error),
        )
        .route(
            &format!("{EXTENSION_PREFIX}/extension/exit/error"),
            post(http_ext::exit_error),
        )
        .route(
            &format!("{TELEMETRY_PREFIX}/telemetry"),
            put(http_ext::telemetry),
        )
        .route(&format!("{LOGS_PREFIX}/logs"), put(http_ext::logs))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Bodies are read through `read_limited`, which enforces Lambda's own limit.
        .layer(DefaultBodyLimit::disable())
        .with_state(core)
}

/// Serves the Runtime API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    core: Arc<RuntimeCore>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt as _;
    // Every answer is one small write that the runtime waits for: never hold it back for
    // Nagle's algorithm.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(core))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn method_not_allowed() -> ApiError {
    ApiError {
        status: 405,
        error_type: "MethodNotAllowed",
        message: "This Runtime API endpoint does not take that method".into(),
    }
}

async fn not_found() -> ApiError {
    ApiError {
        status: 404,
        error_type: "NotFound",
        message: "No such Runtime API endpoint".into(),
    }
}

async fn next(State(core): State<Arc<RuntimeCore>>) -> Result<Response, ApiError> {
    let inv = core.next().await?;
    Ok(next_response(inv))
}

fn next_response(inv: Invocation) -> Response {
    let mut res = Response::new(Body::from(inv.payload));
    let h = res.headers_mut();
    let mut put = |name: &'static str, value: &str| {
        // Values come from the platform; one that is not a valid header value is dropped
        // rather than failing the whole invocation.
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(name, v);
        }
    };
    put(headers::REQUEST_ID, &inv.request_id);
    put(headers::INVOCATION_ID, &inv.invocation_id);
    put(headers::DEADLINE_MS, &inv.deadline_ms.to_string());
    put(headers::INVOKED_FUNCTION_ARN, &inv.function_arn);
    if let Some(v) = &inv.trace_id {
        put(headers::TRACE_ID, v);
    }
    if let Some(v) = &inv.client_context {
        put(headers::CLIENT_CONTEXT, v);
    }
    if let Some(v) = &inv.cognito_identity {
        put(headers::COGNITO_IDENTITY, v);
    }
    if let Some(v) = &inv.tenant_id {
        put(headers::TENANT_ID, v);
    }
    put("content-type", &inv.content_type);
    res
}

pub(crate) fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

pub(crate) enum ReadError {
    TooLarge,
    Truncated,
}

/// A request body read whole, with its trailers (streamed responses report errors there).
pub(crate) struct ReadBody {
    pub(crate) bytes: Bytes,
    trailers: Option<HeaderMap>,
}

pub(crate) async fn read_limited(body: Body, limit: usize) -> Result<ReadBody, ReadError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => {
            let trailers = collected.trailers().cloned();
            Ok(ReadBody {
                bytes: collected.to_bytes(),
                trailers,
            })
        }
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ReadError::TooLarge),
        Err(_) => Err(ReadError::Truncated),
    }
}

/// The error a streamed response reported in its trailers, if any.
fn trailer_error(trailers: Option<&HeaderMap>) -> Option<ErrorReport> {
    let t = trailers?;
    let error_type = header(t, headers::FUNCTION_ERROR_TYPE)?;
    let body = header(t, headers::FUNCTION_ERROR_BODY)
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .unwrap_or_default();
    Some(ErrorReport::from_runtime(
        error_type::normalise(Some(error_type)),
        &body,
        None,
    ))
}

pub(crate) fn truncated() -> ApiError {
    ApiError::bad_request("TruncatedHTTPRequest", "The request body was cut short")
}

/// Whether the runtime streams its response (`Lambda-Runtime-Function-Response-Mode`).
fn is_streaming(h: &HeaderMap) -> Result<bool, ApiError> {
    match h.get(headers::RESPONSE_MODE) {
        None => Ok(false),
        Some(v) if v.as_bytes().eq_ignore_ascii_case(b"streaming") => Ok(true),
        Some(_) => Err(ApiError::bad_request(
            "InvalidFunctionResponseMode",
            "Invalid function response mode: the only valid value is 'streaming'",
        )),
    }
}

async fn response(
    State(core): State<Arc<RuntimeCore>>,
    Path(id): Path<String>,
    h: HeaderMap,
    body: Body,
) -> Result<axum::response::Response, ApiError> {
    if is_streaming(&h)? {
        return streamed_response(core, &id, &h, body).await;
    }
    let invocation_id = header(&h, headers::INVOCATION_ID);
    let read = match read_limited(body, MAX_RESPONSE_BYTES).await {
        Ok(b) => b,
        Err(ReadError::TooLarge) => {
            core.respond_too_large(&id, invocation_id)?;
            return Err(ApiError::too_large());
        }
        Err(ReadError::Truncated) => {
            // The caller learns at once rather than waiting for the timeout.
            let report = ErrorReport::platform(
                "Runtime.TruncatedResponse",
                "The runtime's response was cut short",
            );
            core.error(&id, invocation_id, report)?;
            return Err(truncated());
        }
    };
    if let Some(report) = trailer_error(read.trailers.as_ref()) {
        core.error(&id, invocation_id, report)?;
        return Ok(accepted());
    }
    let content_type = header(&h, "content-type").map(str::to_string);
    core.respond(&id, invocation_id, read.bytes, content_type)?;
    Ok(accepted())
}

/// A streamed response: the body's chunks go to the platform as they arrive (bounded by
/// its size cap and paced by its bandwidth cap); the trailers may report an error.
async fn streamed_response(
    core: Arc<RuntimeCore>,
    id: &str,
    h: &HeaderMap,
    mut body: Body,
) -> Result<Response, ApiError> {
    let content_type = header(h, "content-type").map(str::to_string);
    let mut writer = core.begin_stream(id, header(h, headers::INVOCATION_ID), content_type)?;
    let mut trailers = None;
    loop {
        match body.frame().await {
            None => break,
            Some(Err(_)) => {
                // The caller learns at once rather than waiting for the timeout.
                writer.fail_truncated();
                return Err(truncated());
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    if writer.write(data).await.is_err() {
                        let limit = writer.limit();
                        writer.fail_too_large();
                        return Err(ApiError::too_large_for(limit));
                    }
                }
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers = Some(t);
                    }
                }
            },
        }
    }
    writer.finish(trailer_error(trailers.as_ref()));
    Ok(accepted())
}

fn accepted() -> Response {
    (StatusCode::ACCEPTED, Json(json!({ "status": "OK" }))).into_response()
}

pub(crate) async fn read_error_report(h: &HeaderMap, body: Body) -> Result<ErrorReport, ApiError> {
    let error_type = error_type::normalise(header(h, headers::FUNCTION_ERROR_TYPE));
    let xray_cause = header(h, headers::XRAY_ERROR_CAUSE)
        .filter(|c| c.len() <= MAX_XRAY_CAUSE_BYTES)
        .map(str::to_string);
    let read = match read_limited(body, MAX_RESPONSE_BYTES).await {
        Ok(b) => b,
        Err(ReadError::TooLarge) => return Err(ApiError::too_large()),
        Err(ReadError::Truncated) => return Err(truncated()),
    };
    Ok(ErrorReport::from_runtime(
        error_type,
        &read.bytes,
        xray_cause,
    ))
}

async fn error(
    State(core): State<Arc<RuntimeCore>>,
    Path(id): Path<String>,
    h: HeaderMap,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let report = read_error_report(&h, body).await?;
    core.error(&id, header(&h, headers::INVOCATION_ID), report)?;
    Ok(accepted())
}

async fn init_error(
    State(core): State<Arc<RuntimeCore>>,
    h: HeaderMap,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let report = read_error_report(&h, body).await?;
    core.init_error(report)?;
    Ok(accepted())
}
