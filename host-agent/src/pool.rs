//! The scheduler: hands each invocation a warm idle environment of its function, or starts a
//! new one. One invocation per environment at a time; concurrent invocations of one function
//! get separate environments. The total number of environments is capped; at the cap an idle
//! environment of another function is stopped to make room, and if none is idle the
//! invocation is throttled.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rapid_api::{ErrorReport, InvokeOutcome};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::functions::Function;
use crate::sandbox::{Backend, EnvSpec, InvokeRequest, Sandbox, StartError};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("Rate Exceeded: all {0} execution environments are busy")]
    Throttled(usize),
    #[error(transparent)]
    Start(#[from] StartError),
}

/// An environment plus its share of the environment cap.
struct Slot {
    sandbox: Box<dyn Sandbox>,
    /// The function revision it runs: an environment of an older revision is never reused.
    revision: String,
    /// When it last went idle (for the idle timeout).
    idle_since: Instant,
    _permit: OwnedSemaphorePermit,
}

pub struct Pool {
    backend: Arc<dyn Backend>,
    region: String,
    init_timeout: Duration,
    max_envs: usize,
    permits: Arc<Semaphore>,
    /// Idle environments per function name, most recently used last.
    idle: Mutex<HashMap<String, Vec<Slot>>>,
}

impl Pool {
    pub fn new(
        backend: Arc<dyn Backend>,
        region: String,
        max_envs: usize,
        init_timeout: Duration,
    ) -> Self {
        Pool {
            backend,
            region,
            init_timeout,
            max_envs,
            permits: Arc::new(Semaphore::new(max_envs)),
            idle: Mutex::new(HashMap::new()),
        }
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Slot>>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs one invocation of `function` in an environment of its own.
    pub async fn invoke(
        &self,
        function: Arc<Function>,
        req: InvokeRequest,
    ) -> Result<InvokeOutcome, PoolError> {
        let name = function.config.function_name.clone();
        let revision = function.config.revision_id.clone();
        let timeout = Duration::from_secs(u64::from(function.config.timeout));
        let (mut slot, deadline) = match self.take_idle(&name, &revision) {
            Some(slot) => (slot, Instant::now() + timeout),
            None => self.start(function, &req.request_id).await?,
        };
        tracing::debug!(function = %name, env = %slot.sandbox.id(), request_id = %req.request_id, "invoking");
        let outcome = slot.sandbox.invoke(req, deadline).await;
        if slot.sandbox.is_reusable() {
            slot.idle_since = Instant::now();
            self.idle().entry(name).or_default().push(slot);
        } else {
            slot.sandbox.stop().await;
        }
        Ok(outcome)
    }

    fn take_idle(&self, name: &str, revision: &str) -> Option<Slot> {
        let mut idle = self.idle();
        let list = idle.get_mut(name)?;
        while let Some(slot) = list.pop() {
            if slot.revision == revision && slot.sandbox.is_reusable() {
                return Some(slot);
            }
            // Stale or dead: dropping it stops it.
        }
        None
    }

    /// Starts an environment; returns it with the deadline of the invocation it was started
    /// for. As in Lambda, an init that overruns the init limit is tried once more with the
    /// function timeout as its limit, and that retry counts against the invocation's time.
    async fn start(
        &self,
        function: Arc<Function>,
        request_id: &str,
    ) -> Result<(Slot, Instant), PoolError> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.evict_one_idle();
                self.permits
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| PoolError::Throttled(self.max_envs))?
            }
        };
        let revision = function.config.revision_id.clone();
        let timeout = Duration::from_secs(u64::from(function.config.timeout));
        let mut spec = EnvSpec {
            function,
            region: self.region.clone(),
            init_timeout: self.init_timeout,
        };
        let (sandbox, deadline) = match self.backend.start(spec.clone()).await {
            Ok(s) => (s, Instant::now() + timeout),
            Err(StartError::InitTimeout(limit)) => {
                tracing::warn!(function = %spec.function.config.function_name, request_id,
                    "init did not finish in {limit:?}; retrying it under the function timeout");
                let deadline = Instant::now() + timeout;
                spec.init_timeout = timeout;
                match self.backend.start(spec).await {
                    Ok(s) => (s, deadline),
                    Err(StartError::InitTimeout(_)) => {
                        return Err(StartError::Function(ErrorReport::platform(
                            "Sandbox.Timedout",
                            format!(
                                "RequestId: {request_id} Error: Task timed out after {:.2} seconds",
                                timeout.as_secs_f64()
                            ),
                        ))
                        .into())
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        };
        let slot = Slot {
            sandbox,
            revision,
            idle_since: Instant::now(),
            _permit: permit,
        };
        Ok((slot, deadline))
    }

    /// Stops the least recently used idle environment of any function, if there is one.
    fn evict_one_idle(&self) {
        let mut idle = self.idle();
        if let Some(list) = idle.values_mut().find(|l| !l.is_empty()) {
            // Index 0 is the least recently returned of that function.
            drop(list.remove(0));
        }
    }

    /// Stops the idle environments of a function (deleted or replaced). Busy ones are stopped
    /// when their invocation ends, because their revision no longer matches.
    pub fn forget(&self, name: &str) {
        let removed = self.idle().remove(name);
        drop(removed);
    }

    /// Stops the environments idle for longer than `max_idle`; returns how many.
    pub fn reap_idle(&self, max_idle: Duration) -> usize {
        let mut stale = Vec::new();
        {
            let mut idle = self.idle();
            for list in idle.values_mut() {
                let (old, keep): (Vec<Slot>, Vec<Slot>) = std::mem::take(list)
                    .into_iter()
                    .partition(|s| s.idle_since.elapsed() > max_idle);
                *list = keep;
                stale.extend(old);
            }
            idle.retain(|_, l| !l.is_empty());
        }
        let n = stale.len();
        if n > 0 {
            tracing::info!(
                environments = n,
                "stopping environments idle for over {max_idle:?}"
            );
        }
        // Dropping stops them (outside the lock).
        drop(stale);
        n
    }

    /// Stops every idle environment.
    pub fn shutdown(&self) {
        let all: Vec<_> = self.idle().drain().collect();
        drop(all);
    }

    /// Number of idle environments of a function (for tests and status).
    pub fn idle_count(&self, name: &str) -> usize {
        self.idle().get(name).map_or(0, Vec::len)
    }
}
