//! Lambda's own HTTP API on the agent's listener, so the AWS CLI and SDKs work with an
//! endpoint override. Requests are not authenticated: SigV4 signatures are accepted unchecked.

mod concurrency;
mod error;
mod event_config;
mod eventstream;
mod functions;
mod invoke;
mod streaming;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};
use axum::Router;

pub use error::LambdaError;
pub use invoke::new_trace_id;

use crate::functions::Registry;
use crate::pool::Pool;

/// Everything the API handlers share.
pub struct AppState {
    pub registry: Arc<Registry>,
    pub pool: Arc<Pool>,
    /// The durable queue of asynchronous invocations (and the local destination queues).
    pub events: Arc<crate::events::EventQueue>,
    /// Function logs (and the per-invocation tails for `X-Amz-Log-Type: Tail`).
    pub logs: Arc<crate::logs::LogStore>,
    pub metrics: Arc<crate::metrics::Metrics>,
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
        .route(
            "/2021-11-15/functions/{name}/response-streaming-invocations",
            post(streaming::invoke_stream),
        )
        .route(
            "/2019-09-25/functions/{name}/event-invoke-config",
            put(event_config::put)
                .post(event_config::update)
                .get(event_config::get)
                .delete(event_config::delete),
        )
        .route(
            "/2019-09-25/functions/{name}/event-invoke-config/list",
            get(event_config::list),
        )
        .route("/kindling/v1/queues", get(event_config::queues))
        .route(
            "/kindling/v1/queues/{queue}/messages",
            get(event_config::messages).delete(event_config::purge),
        )
        .route(
            "/kindling/v1/functions/{name}/logs",
            get(crate::logs::http_get_logs),
        )
        .route("/metrics", get(crate::metrics::http_get_metrics))
        .route(
            "/2017-10-31/functions/{name}/concurrency",
            put(concurrency::put_reserved).delete(concurrency::delete_reserved),
        )
        .route(
            "/2019-09-30/functions/{name}/concurrency",
            get(concurrency::get_reserved),
        )
        .route(
            "/2019-09-30/functions/{name}/provisioned-concurrency",
            put(concurrency::put_provisioned)
                .get(concurrency::get_provisioned)
                .delete(concurrency::delete_provisioned),
        )
        .route("/healthz", get(|| async { "ok" }))
        .fallback(|| async { LambdaError::unknown_operation() })
        // Handlers read bodies through their own limits (Lambda's, with Lambda's errors).
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}
