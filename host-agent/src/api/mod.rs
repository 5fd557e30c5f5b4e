//! Lambda's own HTTP API on the agent's listener, so the AWS CLI and SDKs work with an
//! endpoint override. Requests are not authenticated: SigV4 signatures are accepted unchecked.

mod error;
mod functions;
mod invoke;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

pub use error::LambdaError;

use crate::functions::Registry;
use crate::pool::Pool;

/// Everything the API handlers share.
pub struct AppState {
    pub registry: Arc<Registry>,
    pub pool: Arc<Pool>,
}

pub type SharedState = Arc<AppState>;

pub fn router(state: SharedState) -> Router {
    Router::new()
        .route(
            "/2015-03-31/functions",
            post(functions::create).get(functions::list),
        )
        .route(
            "/2015-03-31/functions/",
            post(functions::create).get(functions::list),
        )
        .route(
            "/2015-03-31/functions/{name}",
            get(functions::get).delete(functions::delete),
        )
        .route(
            "/2015-03-31/functions/{name}/configuration",
            get(functions::get_configuration),
        )
        .route(
            "/2015-03-31/functions/{name}/invocations",
            post(invoke::invoke),
        )
        .route("/healthz", get(|| async { "ok" }))
        .fallback(|| async { LambdaError::unknown_operation() })
        // Handlers read bodies through their own limits (Lambda's, with Lambda's errors).
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}
