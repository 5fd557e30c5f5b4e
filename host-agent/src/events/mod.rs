//! Asynchronous invocations (`X-Amz-Invocation-Type: Event`).
//!
//! - [`queue`]: the durable queue (redb, `<data-dir>/events/queue.redb`): pending events and
//!   the local SQS-style queues that destinations write to.
//! - [`config`]: a function's `FunctionEventInvokeConfig` (retries, maximum age, destinations).
//! - [`destination`]: destination ARNs and Lambda's invocation record.
//! - [`worker`]: the workers that run due events through the scheduler with Lambda's retry
//!   policy.

pub mod config;
pub mod destination;
pub mod queue;
pub mod worker;

pub use queue::{EventQueue, EventRecord, QueueError, QueueMessage, QueueStats, QueueSummary};
pub use worker::WorkerSettings;

/// Largest asynchronous invoke payload: 1 MiB (Lambda raised it from 256 KB).
pub const MAX_ASYNC_PAYLOAD: usize = 1024 * 1024;

/// Where the queue lives in a data dir.
pub fn queue_path(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("events").join("queue.redb")
}

/// An X-Ray trace header for one attempt: `Root=1-<epoch hex>-<24 hex>;Parent=..;Sampled=0`.
fn new_trace_id() -> String {
    let secs = chrono::Utc::now().timestamp();
    let rand = uuid::Uuid::new_v4().simple().to_string();
    format!(
        "Root=1-{secs:08x}-{};Parent={};Sampled=0",
        &rand[..24],
        &rand[16..32]
    )
}
