//! Reserved and provisioned concurrency:
//! - `PUT /2017-10-31/functions/{name}/concurrency` (PutFunctionConcurrency),
//!   `GET /2019-09-30/functions/{name}/concurrency` (GetFunctionConcurrency),
//!   `DELETE /2017-10-31/functions/{name}/concurrency` (DeleteFunctionConcurrency);
//! - `PUT|GET|DELETE /2019-09-30/functions/{name}/provisioned-concurrency?Qualifier=$LATEST`
//!   and `GET ...?List=ALL`. Lambda refuses provisioned concurrency on `$LATEST` (it wants a
//!   published version or an alias); Kindling has only `$LATEST`, so that is the qualifier it
//!   takes.
//!
//! Changes are checked against the pool's limits, stored with the function
//! (`concurrency.json`), then applied, all under the pool's settings lock so that two changes
//! cannot both pass a check that only one of them fits.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::functions::lookup;
use super::{LambdaError, SharedState};
use crate::functions::{parse_function_ref, ConcurrencySettings, Function, ProvisionedSetting};
use crate::pool::LimitError;

impl From<LimitError> for LambdaError {
    fn from(e: LimitError) -> Self {
        LambdaError::invalid_parameter(e.to_string())
    }
}

/// Reads an integer member of a JSON body with Lambda's model checks (required, minimum).
fn int_member(body: &[u8], member: &str, field: &str, min: i64) -> Result<u32, LambdaError> {
    let v: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(body).map_err(|e| {
            LambdaError::invalid_content(format!("Could not parse request body into json: {e}"))
        })?
    };
    let n = match v.get(member) {
        None | Some(Value::Null) => {
            return Err(LambdaError::validation(format!(
                "1 validation error detected: Value null at '{field}' failed to satisfy \
                 constraint: Member must not be null"
            )))
        }
        Some(n) => n.as_i64().ok_or_else(|| {
            LambdaError::invalid_content(format!(
                "Could not parse request body into json: {member} must be an integer"
            ))
        })?,
    };
    if n < min {
        return Err(LambdaError::validation(format!(
            "1 validation error detected: Value '{n}' at '{field}' failed to satisfy \
             constraint: Member must have value greater than or equal to {min}"
        )));
    }
    // Anything this large is over every limit; the limit check words the refusal.
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

/// Checks, stores and applies new settings for `f`.
async fn change(
    state: &SharedState,
    f: Arc<Function>,
    edit: impl FnOnce(&mut ConcurrencySettings),
) -> Result<ConcurrencySettings, LambdaError> {
    let _serialised = state.pool.lock_settings().await;
    let name = f.config.function_name.clone();
    let mut settings = state.pool.settings(&name);
    edit(&mut settings);
    state.pool.validate(&f, &settings)?;
    let (registry, stored) = (state.registry.clone(), settings.clone());
    tokio::task::spawn_blocking(move || registry.set_concurrency(&name, &stored))
        .await
        .map_err(|e| LambdaError::service(e.to_string()))??;
    state.pool.apply(f, &settings);
    Ok(settings)
}

pub async fn put_reserved(
    State(state): State<SharedState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, LambdaError> {
    let f = lookup(&state.registry, &name, &HashMap::new())?;
    let n = int_member(
        &body,
        "ReservedConcurrentExecutions",
        "reservedConcurrentExecutions",
        0,
    )?;
    change(&state, f, |s| s.reserved_concurrent_executions = Some(n)).await?;
    Ok(Json(json!({ "ReservedConcurrentExecutions": n })).into_response())
}

pub async fn get_reserved(
    State(state): State<SharedState>,
    Path(name): Path<String>,
) -> Result<Response, LambdaError> {
    let f = lookup(&state.registry, &name, &HashMap::new())?;
    let body = match state.pool.reserved(&f.config.function_name) {
        Some(n) => json!({ "ReservedConcurrentExecutions": n }),
        None => json!({}),
    };
    Ok(Json(body).into_response())
}

pub async fn delete_reserved(
    State(state): State<SharedState>,
    Path(name): Path<String>,
) -> Result<Response, LambdaError> {
    let f = lookup(&state.registry, &name, &HashMap::new())?;
    change(&state, f, |s| s.reserved_concurrent_executions = None).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The function named by `{name}` and `?Qualifier=` (required, `$LATEST`).
fn provisioned_target(
    state: &SharedState,
    name: &str,
    q: &HashMap<String, String>,
) -> Result<Arc<Function>, LambdaError> {
    let has_qualifier = q.contains_key("Qualifier")
        || parse_function_ref(name).is_some_and(|r| r.qualifier.is_some());
    if !has_qualifier {
        return Err(LambdaError::validation(
            "1 validation error detected: Value null at 'qualifier' failed to satisfy \
             constraint: Member must not be null",
        ));
    }
    lookup(&state.registry, name, q)
}

fn status_json(state: &SharedState, f: &Function) -> Option<Value> {
    let s = state.pool.provisioned_status(&f.config.function_name)?;
    let mut v = json!({
        "RequestedProvisionedConcurrentExecutions": s.requested,
        "AvailableProvisionedConcurrentExecutions": s.available,
        "AllocatedProvisionedConcurrentExecutions": s.allocated,
        "Status": s.status,
        "LastModified": s.last_modified,
    });
    if let Some(r) = s.status_reason {
        v["StatusReason"] = json!(r);
    }
    Some(v)
}

pub async fn put_provisioned(
    State(state): State<SharedState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Result<Response, LambdaError> {
    let f = provisioned_target(&state, &name, &q)?;
    let n = int_member(
        &body,
        "ProvisionedConcurrentExecutions",
        "provisionedConcurrentExecutions",
        1,
    )?;
    let last_modified = chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S+0000")
        .to_string();
    change(&state, f.clone(), |s| {
        s.provisioned = Some(ProvisionedSetting {
            requested_provisioned_concurrent_executions: n,
            last_modified,
        })
    })
    .await?;
    let body = status_json(&state, &f).unwrap_or_else(|| json!({}));
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// GetProvisionedConcurrencyConfig, or ListProvisionedConcurrencyConfigs with `?List=ALL`.
pub async fn get_provisioned(
    State(state): State<SharedState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, LambdaError> {
    if q.get("List").map(String::as_str) == Some("ALL") {
        let f = lookup(&state.registry, &name, &HashMap::new())?;
        let configs: Vec<Value> = status_json(&state, &f)
            .map(|mut v| {
                v["FunctionArn"] = json!(format!("{}:$LATEST", f.config.function_arn));
                v
            })
            .into_iter()
            .collect();
        return Ok(Json(json!({ "ProvisionedConcurrencyConfigs": configs })).into_response());
    }
    let f = provisioned_target(&state, &name, &q)?;
    let body = status_json(&state, &f).ok_or_else(|| {
        LambdaError::provisioned_config_not_found(
            "No Provisioned Concurrency Config found for this function",
        )
    })?;
    Ok(Json(body).into_response())
}

pub async fn delete_provisioned(
    State(state): State<SharedState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, LambdaError> {
    let f = provisioned_target(&state, &name, &q)?;
    change(&state, f, |s| s.provisioned = None).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
