//! The HTTP front of the Extensions API (`/2020-01-01/extension/...`), the Telemetry API
//! (`/2022-07-01/telemetry`), the Logs API (`/2020-08-15/logs`) and the snap-start restore
//! calls of the Runtime API. Mounted by [`crate::http::router`].

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::core::{ApiError, RuntimeCore};
use crate::http::{header, read_error_report, read_limited, ReadError};
use crate::telemetry::Api;

/// Header names of the Extensions API.
pub const EXTENSION_NAME: &str = "lambda-extension-name";
pub const EXTENSION_IDENTIFIER: &str = "lambda-extension-identifier";
pub const EXTENSION_EVENT_IDENTIFIER: &str = "lambda-extension-event-identifier";
pub const EXTENSION_ERROR_TYPE: &str = "lambda-extension-function-error-type";
pub const EXTENSION_ACCEPT_FEATURE: &str = "lambda-extension-accept-feature";

/// Largest body the Extensions, Telemetry and Logs APIs read.
const MAX_BODY: usize = 1024 * 1024;

async fn read_body(body: Body) -> Result<bytes::Bytes, ApiError> {
    match read_limited(body, MAX_BODY).await {
        Ok(b) => Ok(b.bytes),
        Err(ReadError::TooLarge) => Err(ApiError {
            status: 413,
            error_type: "RequestEntityTooLarge",
            message: format!("Exceeded maximum allowed payload size ({MAX_BODY} bytes)."),
        }),
        Err(ReadError::Truncated) => Err(crate::http::truncated()),
    }
}

/// The extension's identifier from its header, in canonical form, or Lambda's 403.
fn extension_id(h: &HeaderMap) -> Result<String, ApiError> {
    let raw = match h.get(EXTENSION_IDENTIFIER) {
        None => return Err(ApiError::extension_id_missing()),
        Some(v) if v.is_empty() => return Err(ApiError::extension_id_missing()),
        Some(v) => v,
    };
    raw.to_str()
        .ok()
        .and_then(|s| uuid::Uuid::parse_str(s.trim()).ok())
        .map(|u| u.to_string())
        .ok_or_else(ApiError::extension_id_invalid)
}

pub async fn register(
    State(core): State<Arc<RuntimeCore>>,
    h: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let name = header(&h, EXTENSION_NAME).unwrap_or("").trim().to_string();
    if name.is_empty() {
        return Err(ApiError::extension_name_invalid());
    }
    let with_account = header(&h, EXTENSION_ACCEPT_FEATURE)
        .is_some_and(|v| v.split(',').any(|f| f.trim() == "accountId"));
    let body = read_body(body).await?;
    let reg = core.register(&name, &body, with_account)?;
    let mut res = (StatusCode::OK, Json(reg.body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&reg.id) {
        res.headers_mut().insert(EXTENSION_IDENTIFIER, v);
    }
    Ok(res)
}

pub async fn event_next(
    State(core): State<Arc<RuntimeCore>>,
    h: HeaderMap,
) -> Result<Response, ApiError> {
    let id = extension_id(&h)?;
    let event = core.extension_next(&id).await?;
    let mut res = (StatusCode::OK, Json(event)).into_response();
    if let Ok(v) = HeaderValue::from_str(&uuid::Uuid::new_v4().to_string()) {
        res.headers_mut().insert(EXTENSION_EVENT_IDENTIFIER, v);
    }
    Ok(res)
}

fn error_type_header(h: &HeaderMap) -> Result<String, ApiError> {
    match header(h, EXTENSION_ERROR_TYPE).map(str::trim) {
        Some(t) if !t.is_empty() => Ok(t.to_string()),
        _ => Err(ApiError::extension_missing_error_type()),
    }
}

fn accepted() -> Response {
    (StatusCode::ACCEPTED, Json(json!({ "status": "OK" }))).into_response()
}

pub async fn init_error(
    State(core): State<Arc<RuntimeCore>>,
    h: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let id = extension_id(&h)?;
    let error_type = error_type_header(&h)?;
    let body = read_body(body).await?;
    core.extension_init_error(&id, &error_type, &body)?;
    Ok(accepted())
}

pub async fn exit_error(
    State(core): State<Arc<RuntimeCore>>,
    h: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let id = extension_id(&h)?;
    let error_type = error_type_header(&h)?;
    let body = read_body(body).await?;
    core.extension_exit_error(&id, &error_type, &body)?;
    Ok(accepted())
}

async fn subscribe(
    core: &RuntimeCore,
    api: Api,
    h: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let id = extension_id(h)?;
    let body = read_body(body).await?;
    core.subscribe(api, &id, &body)?;
    Ok((StatusCode::OK, Json(json!("OK"))).into_response())
}

pub async fn telemetry(
    State(core): State<Arc<RuntimeCore>>,
    h: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    subscribe(&core, Api::Telemetry, &h, body).await
}

pub async fn logs(
    State(core): State<Arc<RuntimeCore>>,
    h: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    subscribe(&core, Api::Logs, &h, body).await
}

pub async fn restore_next(State(core): State<Arc<RuntimeCore>>) -> Result<Response, ApiError> {
    core.restore_next().await?;
    Ok(StatusCode::OK.into_response())
}

/// The restore hook's error type: the header's, normalised like any runtime error type;
/// without one, `Runtime.AfterRestoreError`.
pub async fn restore_error(
    State(core): State<Arc<RuntimeCore>>,
    h: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let mut report = read_error_report(&h, body).await?;
    if header(&h, crate::headers::FUNCTION_ERROR_TYPE).is_none() {
        let raw = report.body.clone();
        report = crate::ErrorReport::from_runtime("Runtime.AfterRestoreError".into(), &raw, None);
    }
    core.restore_error(report)?;
    Ok(accepted())
}
