//! CreateFunction, ListFunctions, GetFunction, GetFunctionConfiguration, DeleteFunction.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use http_body_util::{BodyExt, Limited};
use serde_json::json;

use super::{LambdaError, SharedState};
use crate::functions::{
    name_constraint, parse_function_ref, CreateFunctionRequest, Function, Registry, RegistryError,
    MAX_ZIP_BYTES,
};

/// A CreateFunction body carries the zip in base64 (4/3 of its size) plus some JSON.
const MAX_CREATE_BODY: usize = MAX_ZIP_BYTES / 3 * 4 + 1024 * 1024;

impl From<RegistryError> for LambdaError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Exists(_) => LambdaError::conflict(e.to_string()),
            RegistryError::NotFound(_) => LambdaError::not_found(e.to_string()),
            RegistryError::Archive(a) => LambdaError::invalid_parameter(a.to_string()),
            RegistryError::BadImage { .. } => LambdaError::invalid_parameter(e.to_string()),
            RegistryError::Io(io) => {
                tracing::error!(error = %io, "function store I/O error");
                LambdaError::service(format!("function store I/O error: {io}"))
            }
        }
    }
}

pub async fn create(State(state): State<SharedState>, body: Body) -> Result<Response, LambdaError> {
    let bytes = match Limited::new(body, MAX_CREATE_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => {
            return Err(LambdaError {
                code: "RequestEntityTooLargeException",
                ..LambdaError::too_large(format!(
                    "Request must be smaller than {MAX_CREATE_BODY} bytes for the CreateFunction operation"
                ))
            })
        }
    };
    let req: CreateFunctionRequest = serde_json::from_slice(&bytes).map_err(|e| {
        LambdaError::invalid_parameter(format!("Could not parse request body: {e}"))
    })?;
    let (new, zip) = req.validate()?;
    if zip.len() > MAX_ZIP_BYTES {
        return Err(LambdaError::invalid_parameter(format!(
            "Zipped code must be at most {MAX_ZIP_BYTES} bytes for direct upload, got {} bytes",
            zip.len()
        )));
    }
    let registry = state.registry.clone();
    let f = tokio::task::spawn_blocking(move || registry.create(new, &zip))
        .await
        .map_err(|e| LambdaError::service(e.to_string()))??;
    // A function of this name may have had idle environments (deleted and recreated).
    state.pool.forget(&f.config.function_name);
    tracing::info!(function = %f.config.function_name, runtime = %f.config.runtime, "function created");
    Ok((StatusCode::CREATED, Json(&f.config)).into_response())
}

pub async fn list(
    State(state): State<SharedState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, LambdaError> {
    let max_items = match q.get("MaxItems") {
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=10_000).contains(n))
            .ok_or_else(|| {
                LambdaError::validation(format!(
                    "1 validation error detected: Value '{v}' at 'maxItems' failed to satisfy \
                     constraint: Member must have value between 1 and 10000"
                ))
            })?,
        None => 50,
    };
    let all = state.registry.list();
    // The marker is the name of the last function of the previous page.
    let start = match q.get("Marker") {
        Some(m) => all.partition_point(|f| f.config.function_name.as_str() <= m.as_str()),
        None => 0,
    };
    let page: Vec<_> = all[start..].iter().take(max_items).collect();
    let next_marker = (start + page.len() < all.len())
        .then(|| page.last().map(|f| f.config.function_name.clone()))
        .flatten();
    let configs: Vec<_> = page.iter().map(|f| &f.config).collect();
    let mut body = json!({ "Functions": configs });
    if let Some(m) = next_marker {
        body["NextMarker"] = json!(m);
    }
    Ok(Json(body).into_response())
}

/// Resolves `{name}` (name, partial or full ARN, optional `:qualifier`) plus `?Qualifier=`.
pub(super) fn lookup(
    registry: &Registry,
    raw: &str,
    query: &HashMap<String, String>,
) -> Result<Arc<Function>, LambdaError> {
    let r = parse_function_ref(raw)
        .ok_or_else(|| LambdaError::from(name_constraint(raw, "functionName")))?;
    let qualifier = r
        .qualifier
        .as_deref()
        .or(query.get("Qualifier").map(String::as_str));
    let f = registry.get(&r.name).ok_or_else(|| {
        LambdaError::not_found(format!("Function not found: {}", registry.arn(&r.name)))
    })?;
    match qualifier {
        None | Some("$LATEST") => Ok(f),
        Some(q) => Err(LambdaError::not_found(format!(
            "Function not found: {}:{q} (Kindling serves only $LATEST)",
            registry.arn(&r.name)
        ))),
    }
}

pub async fn get(
    State(state): State<SharedState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, LambdaError> {
    let f = lookup(&state.registry, &name, &q)?;
    let code = match f.image_source() {
        Some(image) => json!({
            "RepositoryType": "Local",
            "ImageUri": image.display().to_string(),
            "ResolvedImageUri": format!("{}@sha256:{}", image.display(), f.config.code_sha256),
        }),
        None => {
            let zip = f.code_dir.with_file_name("code.zip");
            json!({ "RepositoryType": "Local", "Location": format!("file://{}", zip.display()) })
        }
    };
    let mut body = json!({ "Configuration": f.config, "Code": code });
    if let Some(n) = state.pool.reserved(&f.config.function_name) {
        body["Concurrency"] = json!({ "ReservedConcurrentExecutions": n });
    }
    Ok(Json(body).into_response())
}

pub async fn get_configuration(
    State(state): State<SharedState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, LambdaError> {
    let f = lookup(&state.registry, &name, &q)?;
    Ok(Json(&f.config).into_response())
}

pub async fn delete(
    State(state): State<SharedState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, LambdaError> {
    let f = lookup(&state.registry, &name, &q)?;
    let registry = state.registry.clone();
    let fname = f.config.function_name.clone();
    tokio::task::spawn_blocking(move || registry.delete(&fname))
        .await
        .map_err(|e| LambdaError::service(e.to_string()))??;
    state.pool.forget(&f.config.function_name);
    tracing::info!(function = %f.config.function_name, "function deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}
