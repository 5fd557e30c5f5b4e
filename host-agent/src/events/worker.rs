//! The workers: take due events from the queue and run them through the scheduler, with
//! Lambda's retry policy.
//!
//! - function error (the runtime's error, a crash, a timeout, an init failure): retried
//!   `MaximumRetryAttempts` times (default 2), after `retry_base`, then twice that (Lambda:
//!   about 1 and 2 minutes); then `RetriesExhausted`.
//! - throttle or service error (no environment could be had or started): retried with
//!   exponential backoff from `throttle_base` up to `throttle_max` (Lambda: 1 s to 5 min)
//!   for as long as the event is younger than `MaximumEventAgeInSeconds`; then
//!   `EventAgeExceeded`. Throttles do not use up retry attempts.
//! - the outcome goes to the OnSuccess / OnFailure destination, if there is one, in the
//!   transaction that removes the event.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rapid_api::InvokeOutcome;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use super::config::{self, Effective};
use super::destination::{record, Condition, Destination};
use super::queue::{now_ms, EventQueue, EventRecord, Followup, LastResponse, QueueError, Take};
use crate::functions::{Function, Registry};
use crate::metrics::Metrics;
use crate::pool::{Pool, PoolError};
use crate::sandbox::{InvokeRequest, StartError};

/// How the workers run.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Events running at once (kept below the environment cap so synchronous invokes are
    /// never starved).
    pub concurrency: usize,
    /// Delay before the first retry after a function error; the second waits twice as long.
    pub retry_base: Duration,
    /// First delay after a throttle or service error; doubles each time.
    pub throttle_base: Duration,
    /// Longest delay after a throttle or service error.
    pub throttle_max: Duration,
}

impl WorkerSettings {
    /// Lambda's delays: retries after 1 and 2 minutes; throttles from 1 s to 5 minutes.
    pub fn new(concurrency: usize, retry_base: Duration) -> Self {
        WorkerSettings {
            concurrency: concurrency.max(1),
            retry_base,
            throttle_base: Duration::from_secs(1),
            throttle_max: Duration::from_secs(300),
        }
    }

    /// The default worker count for an environment cap: half of it, at least one.
    pub fn default_concurrency(max_environments: usize) -> usize {
        (max_environments / 2).max(1)
    }
}

/// What one attempt came to.
enum Attempt {
    Success(Bytes),
    FunctionError(Bytes),
    /// Throttled, or the platform failed: not the function's fault.
    Retryable(String),
}

struct Worker {
    queue: Arc<EventQueue>,
    registry: Arc<Registry>,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    settings: WorkerSettings,
}

/// Starts the dispatcher; it stops taking events once `stop` turns true. Events still running
/// then are cut short and stay in the queue (redelivered at the next start).
pub fn spawn(
    queue: Arc<EventQueue>,
    registry: Arc<Registry>,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    settings: WorkerSettings,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let w = Arc::new(Worker {
        queue,
        registry,
        pool,
        metrics,
        settings,
    });
    tokio::spawn(dispatch(w, stop))
}

async fn dispatch(w: Arc<Worker>, mut stop: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(w.settings.concurrency));
    let mut running = JoinSet::new();
    tracing::info!(
        concurrency = w.settings.concurrency,
        "asynchronous invocation workers started"
    );
    loop {
        // Reap finished tasks so the set does not grow.
        while running.try_join_next().is_some() {}
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = stop.wait_for(|s| *s) => break,
        };
        let id = loop {
            let wait = match w.queue.take_due(now_ms()) {
                Take::Ready(id) => break Some(id),
                Take::Wait(d) => d,
                // Nothing queued: sleep until something is (a long timer keeps it simple).
                Take::Empty => Duration::from_secs(3600),
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = w.queue.changed() => {}
                _ = stop.wait_for(|s| *s) => break None,
            }
        };
        let Some(id) = id else { break };
        let w2 = w.clone();
        running.spawn(async move {
            w2.run(id).await;
            drop(permit);
        });
    }
    let left = running.len();
    running.abort_all();
    while running.join_next().await.is_some() {}
    tracing::info!(
        running = left,
        "asynchronous invocation workers stopped; unfinished events stay queued"
    );
}

/// Runs blocking queue work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, QueueError> + Send + 'static,
) -> Result<T, QueueError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| QueueError::Io(std::io::Error::other(e)))?
}

impl Worker {
    async fn run(self: Arc<Self>, id: u64) {
        if let Err(e) = self.clone().process(id).await {
            // The database failed: keep the event and try again later.
            tracing::error!(id, error = %e, "asynchronous event could not be processed; will retry");
            self.queue.release(id, Duration::from_secs(5));
        }
    }

    async fn process(self: Arc<Self>, id: u64) -> Result<(), QueueError> {
        let q = self.queue.clone();
        let Some(mut ev) = blocking(move || q.get(id)).await? else {
            return Ok(());
        };
        let Some(function) = self.registry.get(&ev.function) else {
            tracing::warn!(function = %ev.function, request_id = %ev.request_id,
                "dropping an asynchronous event: its function no longer exists");
            return self.finish(id, Vec::new()).await;
        };
        let f2 = function.clone();
        let effective = match tokio::task::spawn_blocking(move || config::load(&f2)).await {
            Ok(Ok(c)) => c.map(|c| c.effective()).unwrap_or_default(),
            Ok(Err(e)) => {
                tracing::warn!(function = %ev.function, error = %e,
                    "cannot read the event invoke config; using the defaults");
                Effective::default()
            }
            Err(e) => return Err(QueueError::Io(std::io::Error::other(e))),
        };
        let max_age_ms = effective.max_age.as_millis() as u64;
        if now_ms().saturating_sub(ev.enqueued_at_ms) > max_age_ms {
            return self
                .conclude(id, &ev, &function, &effective, Condition::EventAgeExceeded)
                .await;
        }

        tracing::debug!(function = %ev.function, request_id = %ev.request_id,
            attempt = ev.attempts + 1, "running an asynchronous event");
        let attempt = self.attempt(&function, &ev).await;
        let now = now_ms();
        match attempt {
            Attempt::Success(body) => {
                ev.attempts += 1;
                ev.last_response = Some(LastResponse {
                    function_error: None,
                    body: String::from_utf8_lossy(&body).into_owned(),
                });
                self.conclude(id, &ev, &function, &effective, Condition::Success)
                    .await
            }
            Attempt::FunctionError(body) => {
                ev.attempts += 1;
                ev.throttles = 0;
                ev.last_response = Some(LastResponse {
                    function_error: Some("Unhandled".into()),
                    body: String::from_utf8_lossy(&body).into_owned(),
                });
                if ev.attempts > effective.max_retries {
                    return self
                        .conclude(id, &ev, &function, &effective, Condition::RetriesExhausted)
                        .await;
                }
                let delay = self
                    .settings
                    .retry_base
                    .saturating_mul(2u32.saturating_pow(ev.attempts.min(20) - 1));
                tracing::info!(function = %ev.function, request_id = %ev.request_id,
                    attempt = ev.attempts, "asynchronous invocation failed; retrying in {delay:?}");
                self.retry_after(id, ev, &function, &effective, now, delay)
                    .await
            }
            Attempt::Retryable(why) => {
                ev.throttles = ev.throttles.saturating_add(1);
                let delay = self
                    .settings
                    .throttle_base
                    .saturating_mul(2u32.saturating_pow(ev.throttles.min(20) - 1))
                    .min(self.settings.throttle_max);
                tracing::info!(function = %ev.function, request_id = %ev.request_id,
                    reason = %why, "asynchronous invocation deferred; retrying in {delay:?}");
                self.retry_after(id, ev, &function, &effective, now, delay)
                    .await
            }
        }
    }

    /// One run through the scheduler, classified.
    async fn attempt(&self, function: &Arc<Function>, ev: &EventRecord) -> Attempt {
        let req = InvokeRequest {
            request_id: ev.request_id.clone(),
            payload: Bytes::from(ev.payload.clone()),
            client_context: ev.client_context.clone(),
            trace_id: crate::api::new_trace_id(),
            stream: None,
        };
        let result = self.pool.invoke(function.clone(), req).await;
        // Asynchronous attempts count in the same invocation metrics as synchronous ones.
        self.metrics
            .record_result(&function.config.function_name, &result);
        match result {
            Ok(InvokeOutcome::Response { body, .. }) => Attempt::Success(body),
            Ok(InvokeOutcome::Error(report)) => Attempt::FunctionError(report.body),
            Err(PoolError::Start(StartError::Function(report))) => {
                Attempt::FunctionError(report.body)
            }
            Err(e @ PoolError::Throttled(_)) => Attempt::Retryable(e.to_string()),
            // Host failures, init time-outs and anything the scheduler learns to refuse later.
            #[allow(unreachable_patterns)]
            Err(e) => Attempt::Retryable(e.to_string()),
        }
    }

    /// Schedules the next attempt, unless it would come after the event's maximum age.
    async fn retry_after(
        &self,
        id: u64,
        mut ev: EventRecord,
        function: &Function,
        effective: &Effective,
        now: u64,
        delay: Duration,
    ) -> Result<(), QueueError> {
        let due = now + delay.as_millis() as u64;
        if due.saturating_sub(ev.enqueued_at_ms) > effective.max_age.as_millis() as u64 {
            return self
                .conclude(id, &ev, function, effective, Condition::EventAgeExceeded)
                .await;
        }
        ev.due_at_ms = due;
        let q = self.queue.clone();
        blocking(move || q.reschedule(id, &ev)).await
    }

    /// Ends an event: removes it, and hands the record to the destination for `condition`.
    async fn conclude(
        &self,
        id: u64,
        ev: &EventRecord,
        function: &Function,
        effective: &Effective,
        condition: Condition,
    ) -> Result<(), QueueError> {
        let dest = match condition {
            Condition::Success => effective.on_success.as_ref(),
            Condition::RetriesExhausted | Condition::EventAgeExceeded => {
                effective.on_failure.as_ref()
            }
        };
        if condition != Condition::Success {
            tracing::warn!(function = %ev.function, request_id = %ev.request_id,
                condition = condition.as_str(), attempts = ev.attempts,
                destination = ?dest, "asynchronous invocation failed for good");
        }
        let mut followups = Vec::new();
        if let Some(dest) = dest {
            let body = record(ev, &function.config.function_arn, condition).to_string();
            match dest {
                Destination::Queue(queue) => followups.push(Followup::Message {
                    queue: queue.clone(),
                    body,
                }),
                Destination::Function(name) if self.registry.get(name).is_some() => {
                    followups.push(Followup::Event(EventRecord::new(
                        uuid::Uuid::new_v4().to_string(),
                        name.clone(),
                        body,
                        None,
                    )))
                }
                Destination::Function(name) => {
                    tracing::warn!(destination = %name, request_id = %ev.request_id,
                        "destination function does not exist; the record is dropped")
                }
            }
        }
        self.finish(id, followups).await
    }

    async fn finish(&self, id: u64, followups: Vec<Followup>) -> Result<(), QueueError> {
        let q = self.queue.clone();
        blocking(move || q.finish(id, &followups)).await
    }
}
