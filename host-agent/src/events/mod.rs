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
