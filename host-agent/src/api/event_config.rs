//! Asynchronous invocation on the API:
//! - the `Event` branch of Invoke: the event is stored durably, then 202;
//! - Put/Update/Get/Delete/ListFunctionEventInvokeConfig(s) under
//!   `/2019-09-25/functions/{name}/event-invoke-config`;
//! - Kindling's own routes to read the local queues that destinations write to:
//!   `GET /kindling/v1/queues`, `GET|DELETE /kindling/v1/queues/{queue}/messages`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::json;

use super::functions::lookup;
use super::{LambdaError, SharedState};
use crate::events::config::{self, ConfigError, ConfigRequest};
use crate::events::destination::is_queue_name;
use crate::events::{EventRecord, QueueError, MAX_ASYNC_PAYLOAD};
use crate::functions::Function;

impl From<ConfigError> for LambdaError {
    fn from(e: ConfigError) -> Self {
        match e {
            ConfigError::Constraint(m) => LambdaError::validation(m),
            ConfigError::Invalid(m) => LambdaError::invalid_parameter(m),
            e @ (ConfigError::Io(_) | ConfigError::Corrupt(_)) => {
                tracing::error!(error = %e, "event invoke config store");
                LambdaError::service(e.to_string())
            }
        }
    }
}

impl From<QueueError> for LambdaError {
    fn from(e: QueueError) -> Self {
        tracing::error!(error = %e, "event queue");
        LambdaError::service(e.to_string())
    }
}

/// Runs blocking file or database work off the async threads.
async fn blocking<T: Send + 'static, E: Into<LambdaError> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, LambdaError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| LambdaError::service(e.to_string()))?
        .map_err(Into::into)
}

/// The `Event` invocation type: reads the payload (at most 1 MiB, JSON), stores the event
/// (committed to disk) and answers 202 with an empty body.
pub(super) async fn enqueue(
    state: &SharedState,
    function: &Function,
    client_context: Option<String>,
    body: Body,
    request_id: &str,
) -> Result<Response, LambdaError> {
    let bytes = match Limited::new(body, MAX_ASYNC_PAYLOAD).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(LambdaError::too_large(format!(
                "Request must be smaller than {MAX_ASYNC_PAYLOAD} bytes for the InvokeFunction \
                 operation with InvocationType Event"
            )))
        }
        Err(e) => {
            return Err(LambdaError::invalid_content(format!(
                "Could not read the request body: {e}"
            )))
        }
    };
    let payload = if bytes.iter().all(u8::is_ascii_whitespace) {
        "{}".to_string()
    } else {
        serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).map_err(|e| {
            LambdaError::invalid_content(format!("Could not parse request body into json: {e}"))
        })?;
        // Valid JSON is valid UTF-8.
        String::from_utf8_lossy(&bytes).into_owned()
    };
    let record = EventRecord::new(
        request_id.to_string(),
        function.config.function_name.clone(),
        payload,
        client_context,
    );
    let queue = state.events.clone();
    blocking(move || queue.enqueue(&record)).await?;
    tracing::debug!(function = %function.config.function_name, request_id, "event queued");
    Ok(StatusCode::ACCEPTED.into_response())
}

fn no_config(function: &Function) -> LambdaError {
    LambdaError::not_found(format!(
        "The function {}:$LATEST doesn't have an EventInvokeConfig",
        function.config.function_arn
    ))
}

async fn read_request(body: Body) -> Result<ConfigRequest, LambdaError> {
    let bytes = Limited::new(body, 64 * 1024)
        .collect()
        .await
        .map_err(|_| LambdaError::invalid_content("The request body is too large or unreadable"))?
        .to_bytes();
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(ConfigRequest::default());
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        LambdaError::invalid_content(format!("Could not parse request body into json: {e}"))
    })
}

/// Put (`replace`) or Update (merge into the existing config, which must exist).
async fn write_config(
    state: SharedState,
    name: String,
    q: HashMap<String, String>,
    body: Body,
    replace: bool,
) -> Result<Response, LambdaError> {
    let function = lookup(&state.registry, &name, &q)?;
    let req = read_request(body).await?;
    let registry = state.registry.clone();
    let f = function.clone();
    let saved = blocking(move || -> Result<_, LambdaError> {
        let previous = config::load(&f)?;
        if !replace && previous.is_none() {
            return Err(no_config(&f));
        }
        let base = if replace { None } else { previous.as_ref() };
        let cfg = config::apply(req, base, &f.config.function_name, |n| {
            registry.get(n).is_some()
        })?;
        config::store(&f, &cfg)?;
        Ok(cfg)
    })
    .await?;
    tracing::info!(function = %function.config.function_name, "event invoke config saved");
    Ok(Json(saved.to_response(&function.config.function_arn)).into_response())
}

/// PutFunctionEventInvokeConfig: `PUT /2019-09-25/functions/{name}/event-invoke-config`.
pub async fn put(
    State(state): State<SharedState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    body: Body,
) -> Result<Response, LambdaError> {
    write_config(state, name, q, body, true).await
}

/// UpdateFunctionEventInvokeConfig: `POST /2019-09-25/functions/{name}/event-invoke-config`.
pub async fn update(
    State(state): State<SharedState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    body: Body,
) -> Result<Response, LambdaError> {
    write_config(state, name, q, body, false).await
}

async fn load(function: &Arc<Function>) -> Result<Option<config::EventInvokeConfig>, LambdaError> {
    let f = function.clone();
    blocking(move || config::load(&f)).await
}

/// GetFunctionEventInvokeConfig.
pub async fn get(
    State(state): State<SharedState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, LambdaError> {
    let function = lookup(&state.registry, &name, &q)?;
    let cfg = load(&function).await?.ok_or_else(|| no_config(&function))?;
    Ok(Json(cfg.to_response(&function.config.function_arn)).into_response())
}

/// DeleteFunctionEventInvokeConfig: 204.
pub async fn delete(
    State(state): State<SharedState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, LambdaError> {
    let function = lookup(&state.registry, &name, &q)?;
    let f = function.clone();
    if !blocking(move || config::remove(&f)).await? {
        return Err(no_config(&function));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// ListFunctionEventInvokeConfigs: `GET .../event-invoke-config/list` (one qualifier,
/// `$LATEST`, so one page of at most one item).
pub async fn list(
    State(state): State<SharedState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, LambdaError> {
    if let Some(v) = q.get("MaxItems") {
        if !v.parse::<u32>().is_ok_and(|n| (1..=50).contains(&n)) {
            return Err(LambdaError::validation(format!(
                "1 validation error detected: Value '{v}' at 'maxItems' failed to satisfy \
                 constraint: Member must have value between 1 and 50"
            )));
        }
    }
    let function = lookup(&state.registry, &name, &HashMap::new())?;
    let configs: Vec<_> = load(&function)
        .await?
        .map(|c| c.to_response(&function.config.function_arn))
        .into_iter()
        .collect();
    Ok(Json(json!({ "FunctionEventInvokeConfigs": configs })).into_response())
}

fn check_queue(queue: &str) -> Result<(), LambdaError> {
    if is_queue_name(queue) {
        Ok(())
    } else {
        Err(LambdaError::validation(format!(
            "Invalid queue name '{queue}': 1-80 characters of A-Z, a-z, 0-9, '-' and '_'"
        )))
    }
}

/// `GET /kindling/v1/queues`: `{"Queues": [{"Name", "Messages"}]}`.
pub async fn queues(State(state): State<SharedState>) -> Response {
    Json(json!({ "Queues": state.events.queues() })).into_response()
}

/// `GET /kindling/v1/queues/{queue}/messages`: every message, oldest first, left in place:
/// `{"Queue", "Messages": [{"MessageId", "SentTimestamp", "Body"}]}`.
pub async fn messages(
    State(state): State<SharedState>,
    Path(queue): Path<String>,
) -> Result<Response, LambdaError> {
    check_queue(&queue)?;
    let (events, name) = (state.events.clone(), queue.clone());
    let messages = blocking(move || events.messages(&name)).await?;
    Ok(Json(json!({ "Queue": queue, "Messages": messages })).into_response())
}

/// `DELETE /kindling/v1/queues/{queue}/messages`: empties the queue; `{"Deleted": n}`.
pub async fn purge(
    State(state): State<SharedState>,
    Path(queue): Path<String>,
) -> Result<Response, LambdaError> {
    check_queue(&queue)?;
    let events = state.events.clone();
    let n = blocking(move || events.purge(&queue)).await?;
    Ok(Json(json!({ "Deleted": n })).into_response())
}
