//! The scheduler: hands each invocation a warm idle environment of its function, or starts a
//! new one. One invocation per environment at a time; concurrent invocations of one function
//! get separate environments.
//!
//! Limits, with Lambda's semantics (the host plays the account):
//! - concurrency: invocations in flight, host-wide at most `max_concurrency`. A function with
//!   reserved concurrency R runs at most R at once (R = 0 throttles every invoke) and no one
//!   else can use its R; functions without a reservation share what is left (the unreserved
//!   pool). Over a limit: [`PoolError::Throttled`] with Lambda's reason.
//! - environments: at most `max_environments` exist, and together at most `memory_budget_mib`
//!   of their functions' `MemorySize`. To start one over either bound, idle on-demand
//!   environments of any function are stopped, least recently used first; if that is not
//!   enough the invocation is throttled (`ConcurrentInvocationLimitExceeded`).
//! - provisioned concurrency: N environments per function started in the background (with
//!   `AWS_LAMBDA_INITIALIZATION_TYPE=provisioned-concurrency`), preferred by invokes, never
//!   reaped or evicted, replaced when one dies. They count against the environment and memory
//!   bounds; a function's N counts against its reservation, or against the unreserved pool.
//!
//! Locking: one `std::sync::Mutex` over the bookkeeping, never held across an `.await`; a
//! cold start runs outside it, so it never delays other invocations. Environments that stop
//! are dropped after the lock is released.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rapid_api::{ErrorReport, InvokeOutcome};
use tokio::sync::{watch, Notify};

use crate::functions::{ConcurrencySettings, Function, ProvisionedSetting};
use crate::sandbox::{Backend, EnvSpec, InitializationType, InvokeRequest, Sandbox, StartError};

/// Settings of the pool (from `kindling serve`'s flags).
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub region: String,
    pub init_timeout: Duration,
    /// Most environments at once (initialising, idle, busy, provisioned).
    pub max_environments: usize,
    /// Most invocations in flight at once, host-wide (Lambda's account concurrency limit).
    pub max_concurrency: usize,
    /// Reservations and provisioned concurrency of unreserved functions must leave at least
    /// this much of `max_concurrency` to the unreserved pool.
    pub min_unreserved: usize,
    /// Most MiB of `MemorySize` over all environments that exist.
    pub memory_budget_mib: u64,
}

/// Lambda's `Reason` of a 429 `TooManyRequestsException`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThrottleReason {
    /// The function is at its reserved concurrency.
    ReservedFunctionConcurrentInvocationLimitExceeded,
    /// The unreserved pool (or the host's environments or memory) is exhausted.
    ConcurrentInvocationLimitExceeded,
}

impl ThrottleReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ThrottleReason::ReservedFunctionConcurrentInvocationLimitExceeded => {
                "ReservedFunctionConcurrentInvocationLimitExceeded"
            }
            ThrottleReason::ConcurrentInvocationLimitExceeded => {
                "ConcurrentInvocationLimitExceeded"
            }
        }
    }
}

impl std::fmt::Display for ThrottleReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which bound throttled an invocation (for counters and logs; the caller sees only
/// [`ThrottleReason`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    Reserved = 0,
    Concurrency = 1,
    Environments = 2,
    Memory = 3,
}

impl Cause {
    fn reason(self) -> ThrottleReason {
        match self {
            Cause::Reserved => ThrottleReason::ReservedFunctionConcurrentInvocationLimitExceeded,
            _ => ThrottleReason::ConcurrentInvocationLimitExceeded,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("Rate Exceeded ({0})")]
    Throttled(ThrottleReason),
    /// The agent is stopping and takes no new invocations.
    #[error("the agent is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Start(#[from] StartError),
}

/// A concurrency setting that the host's limits cannot honour (Lambda's
/// `InvalidParameterValueException`).
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("Specified ReservedConcurrentExecutions for function decreases account's UnreservedConcurrentExecution below its minimum value of [{0}].")]
    ReservedOverLimit(usize),
    #[error("Specified ReservedConcurrentExecutions for function is less than the function's provisioned concurrency of [{0}].")]
    ReservedBelowProvisioned(u32),
    #[error("Requested Provisioned Concurrency should not be greater than the reservedConcurrentExecution for function: [{0}].")]
    ProvisionedOverReserved(u32),
    #[error("Requested Provisioned Concurrency decreases account's UnreservedConcurrentExecution below its minimum value of [{0}].")]
    ProvisionedOverLimit(usize),
    #[error("Requested Provisioned Concurrency needs {needed} environments of {memory} MB: over this host's limits ({max_envs} environments, a memory budget of {budget} MiB).")]
    ProvisionedOverHost {
        needed: u32,
        memory: u32,
        max_envs: usize,
        budget: u64,
    },
}

/// Provisioned concurrency as GetProvisionedConcurrencyConfig reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionedStatus {
    pub requested: u32,
    /// Initialised environments (idle or busy).
    pub allocated: u32,
    /// Initialised environments idle, ready for an invocation.
    pub available: u32,
    /// `IN_PROGRESS`, `READY` or `FAILED`.
    pub status: &'static str,
    pub status_reason: Option<String>,
    pub last_modified: String,
}

/// Throttled invocations since start, by the bound that refused them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ThrottleCounts {
    /// A function at its reserved concurrency.
    pub reserved_function: u64,
    /// The unreserved pool exhausted.
    pub concurrency: u64,
    /// `max_environments` reached with no idle environment to stop.
    pub environments: u64,
    /// The memory budget reached with no idle environment to stop.
    pub memory: u64,
}

/// A point-in-time view of the pool, for metrics and status.
#[derive(Debug, Clone, Default)]
pub struct PoolSnapshot {
    /// Environments starting (on demand or provisioned).
    pub initialising: usize,
    /// On-demand environments idle (warm).
    pub idle: usize,
    /// Environments running an invocation (on-demand or provisioned).
    pub busy: usize,
    /// Provisioned environments initialised and idle.
    pub provisioned: usize,
    /// All environments that exist.
    pub environments: usize,
    pub memory_used_mib: u64,
    pub memory_budget_mib: u64,
    pub max_environments: usize,
    pub max_concurrency: usize,
    /// `max_concurrency` minus the reservations.
    pub unreserved_concurrency: usize,
    /// Invocations in flight per function (functions with none are left out).
    pub in_flight: BTreeMap<String, usize>,
    pub throttles: ThrottleCounts,
}

/// Counters shared with every environment's [`Capacity`], so that giving capacity back
/// needs no lock.
struct Counters {
    envs: AtomicUsize,
    memory_mib: AtomicU64,
    initialising: AtomicUsize,
    busy: AtomicUsize,
    /// Wakes the provisioner (a provisioned environment went away, settings changed).
    provision: Notify,
}

/// One provisioned configuration's environments, shared with their [`Capacity`].
#[derive(Default)]
struct ProvCounters {
    starting: AtomicUsize,
    ready: AtomicUsize,
}

impl ProvCounters {
    fn existing(&self) -> usize {
        self.starting.load(Ordering::SeqCst) + self.ready.load(Ordering::SeqCst)
    }
}

/// An environment's share of the environment cap and the memory budget (and of its
/// provisioned configuration's count); given back on drop.
struct Capacity {
    counters: Arc<Counters>,
    memory_mib: u64,
    prov: Option<Arc<ProvCounters>>,
    ready: bool,
}

impl Capacity {
    fn mark_ready(&mut self) {
        if let (Some(p), false) = (&self.prov, self.ready) {
            p.starting.fetch_sub(1, Ordering::SeqCst);
            p.ready.fetch_add(1, Ordering::SeqCst);
        }
        self.ready = true;
    }
}

impl Drop for Capacity {
    fn drop(&mut self) {
        self.counters.envs.fetch_sub(1, Ordering::SeqCst);
        self.counters
            .memory_mib
            .fetch_sub(self.memory_mib, Ordering::SeqCst);
        if let Some(p) = &self.prov {
            let c = if self.ready { &p.ready } else { &p.starting };
            c.fetch_sub(1, Ordering::SeqCst);
            self.counters.provision.notify_one();
        }
    }
}

/// An environment and its share of the host's capacity. No `Drop`: the sandbox is dropped
/// (stopped) by whoever holds it, outside the pool's lock.
struct Slot {
    sandbox: Box<dyn Sandbox>,
    /// The function revision it runs: an environment of an older revision is never reused.
    revision: String,
    /// When it last went idle (for the idle timeout).
    idle_since: Instant,
    /// LRU clock value of when it last went idle (for eviction across functions).
    last_used: u64,
    cap: Capacity,
}

struct Provisioned {
    function: Arc<Function>,
    requested: u32,
    last_modified: String,
    counters: Arc<ProvCounters>,
    failed: Option<String>,
}

#[derive(Default)]
struct FnState {
    in_flight: usize,
    reserved: Option<u32>,
    provisioned: Option<Provisioned>,
    /// Idle on-demand environments, least recently used first.
    idle: Vec<Slot>,
    /// Idle provisioned environments.
    prov_idle: Vec<Slot>,
}

impl FnState {
    fn provisioned_n(&self) -> usize {
        self.provisioned
            .as_ref()
            .map_or(0, |p| p.requested as usize)
    }
}

#[derive(Default)]
struct State {
    functions: HashMap<String, FnState>,
    /// LRU clock.
    clock: u64,
}

impl State {
    fn reserved_sum(&self) -> usize {
        self.functions
            .values()
            .filter_map(|f| f.reserved)
            .map(|r| r as usize)
            .sum()
    }
}

struct Inner {
    backend: Arc<dyn Backend>,
    cfg: PoolConfig,
    state: Mutex<State>,
    counters: Arc<Counters>,
    closed: AtomicBool,
    /// When the pool was closed (the grace period counts from there).
    closed_at: std::sync::OnceLock<Instant>,
    /// Set at the end of shutdown: running invocations and starts are cut.
    kill: watch::Sender<bool>,
    throttles: [AtomicU64; 4],
    /// Serialises changes of concurrency settings (check, store, apply).
    settings_lock: tokio::sync::Mutex<()>,
}

pub struct Pool {
    inner: Arc<Inner>,
}

/// An invocation's place in its function's in-flight count.
struct Ticket<'a> {
    inner: &'a Inner,
    name: String,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if let Some(f) = self.inner.state().functions.get_mut(&self.name) {
            f.in_flight = f.in_flight.saturating_sub(1);
        }
    }
}

/// Counts one environment in a gauge while it lives.
struct Gauge<'a>(&'a AtomicUsize);

impl<'a> Gauge<'a> {
    fn new(c: &'a AtomicUsize) -> Self {
        c.fetch_add(1, Ordering::SeqCst);
        Gauge(c)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Pool {
    /// Creates the pool; inside a tokio runtime it also starts the provisioner task.
    pub fn new(backend: Arc<dyn Backend>, cfg: PoolConfig) -> Self {
        let (kill, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            backend,
            cfg,
            state: Mutex::new(State::default()),
            counters: Arc::new(Counters {
                envs: AtomicUsize::new(0),
                memory_mib: AtomicU64::new(0),
                initialising: AtomicUsize::new(0),
                busy: AtomicUsize::new(0),
                provision: Notify::new(),
            }),
            closed: AtomicBool::new(false),
            closed_at: std::sync::OnceLock::new(),
            kill,
            throttles: Default::default(),
            settings_lock: tokio::sync::Mutex::new(()),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(provisioner(inner.clone()));
        }
        Pool { inner }
    }

    pub fn backend_name(&self) -> &'static str {
        self.inner.backend.name()
    }

    pub fn config(&self) -> &PoolConfig {
        &self.inner.cfg
    }

    /// Runs one invocation of `function` in an environment of its own.
    pub async fn invoke(
        &self,
        function: Arc<Function>,
        req: InvokeRequest,
    ) -> Result<InvokeOutcome, PoolError> {
        let inner = &*self.inner;
        if inner.closed.load(Ordering::SeqCst) {
            return Err(PoolError::ShuttingDown);
        }
        let name = function.config.function_name.clone();
        let revision = function.config.revision_id.clone();
        let timeout = Duration::from_secs(u64::from(function.config.timeout));
        let _ticket = inner.admit(&name)?;
        let mut kill = inner.kill.subscribe();
        let (mut slot, deadline) = match inner.take_warm(&name, &revision) {
            Some(slot) => (slot, Instant::now() + timeout),
            None => {
                let cap = inner
                    .reserve(u64::from(function.config.memory_size), None)
                    .map_err(|cause| inner.throttle(&name, cause))?;
                let _init = Gauge::new(&inner.counters.initialising);
                let spec = inner.spec(function, InitializationType::OnDemand);
                tokio::select! {
                    r = start_env(&*inner.backend, spec, &req.request_id) => {
                        let (sandbox, deadline) = r?;
                        (inner.slot(sandbox, revision, cap), deadline)
                    }
                    _ = kill.wait_for(|k| *k) => return Err(PoolError::ShuttingDown),
                }
            }
        };
        tracing::debug!(function = %name, env = %slot.sandbox.id(), request_id = %req.request_id, "invoking");
        let outcome = {
            let _busy = Gauge::new(&inner.counters.busy);
            tokio::select! {
                o = slot.sandbox.invoke(req, deadline) => o,
                _ = kill.wait_for(|k| *k) => {
                    // Shutdown's grace period is over: the environment goes with the agent.
                    drop(slot);
                    return Err(PoolError::ShuttingDown);
                }
            }
        };
        inner.put_back(&name, slot);
        Ok(outcome)
    }

    /// Stops the idle environments of a function (deleted or replaced) and forgets its
    /// settings. Busy ones are stopped when their invocation ends, because their revision no
    /// longer matches.
    pub fn forget(&self, name: &str) {
        let removed = self.inner.state().functions.remove(name);
        drop(removed);
    }

    /// Stops the on-demand environments idle for longer than `max_idle`; returns how many.
    /// Provisioned environments are never reaped.
    pub fn reap_idle(&self, max_idle: Duration) -> usize {
        let mut stale = Vec::new();
        {
            let mut st = self.inner.state();
            for f in st.functions.values_mut() {
                let (old, keep): (Vec<Slot>, Vec<Slot>) = std::mem::take(&mut f.idle)
                    .into_iter()
                    .partition(|s| s.idle_since.elapsed() > max_idle);
                f.idle = keep;
                stale.extend(old);
            }
            st.functions.retain(|_, f| !f.is_empty());
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

    /// Takes no new invocations from now on ([`PoolError::ShuttingDown`]) and starts no more
    /// provisioned environments.
    pub fn close(&self) {
        self.inner.closed_at.get_or_init(Instant::now);
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.counters.provision.notify_one();
    }

    /// Graceful shutdown: closes the pool, lets invocations in flight finish until `grace`
    /// after it was closed, then stops every environment (idle, provisioned, and busy ones
    /// still running).
    pub async fn shutdown(&self, grace: Duration) {
        self.close();
        let inner = &*self.inner;
        let until = *inner.closed_at.get_or_init(Instant::now) + grace;
        let mut waited = false;
        while inner.in_flight_total() > 0 && Instant::now() < until {
            if !waited {
                tracing::info!(
                    in_flight = inner.in_flight_total(),
                    "waiting up to {grace:?} for running invocations"
                );
                waited = true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = inner.in_flight_total();
        if left > 0 {
            tracing::warn!(
                in_flight = left,
                "invocations still running after {grace:?}; stopping their environments"
            );
        }
        let _ = inner.kill.send(true);
        let all: Vec<Slot> = {
            let mut st = inner.state();
            st.functions
                .values_mut()
                .flat_map(|f| {
                    f.idle
                        .drain(..)
                        .chain(f.prov_idle.drain(..))
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        for slot in all {
            slot.sandbox.stop().await;
        }
        // Busy environments and starts are dropped by their tasks once they see `kill`.
        let until = Instant::now() + Duration::from_secs(2);
        while inner.counters.envs.load(Ordering::SeqCst) > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Number of idle on-demand environments of a function (for tests and status).
    pub fn idle_count(&self, name: &str) -> usize {
        self.inner
            .state()
            .functions
            .get(name)
            .map_or(0, |f| f.idle.len())
    }

    /// Counters for metrics and status.
    pub fn snapshot(&self) -> PoolSnapshot {
        let inner = &*self.inner;
        let c = &inner.counters;
        let st = inner.state();
        let t = |i: usize| inner.throttles[i].load(Ordering::Relaxed);
        PoolSnapshot {
            initialising: c.initialising.load(Ordering::SeqCst),
            idle: st.functions.values().map(|f| f.idle.len()).sum(),
            busy: c.busy.load(Ordering::SeqCst),
            provisioned: st.functions.values().map(|f| f.prov_idle.len()).sum(),
            environments: c.envs.load(Ordering::SeqCst),
            memory_used_mib: c.memory_mib.load(Ordering::SeqCst),
            memory_budget_mib: inner.cfg.memory_budget_mib,
            max_environments: inner.cfg.max_environments,
            max_concurrency: inner.cfg.max_concurrency,
            unreserved_concurrency: inner.cfg.max_concurrency.saturating_sub(st.reserved_sum()),
            in_flight: st
                .functions
                .iter()
                .filter(|(_, f)| f.in_flight > 0)
                .map(|(n, f)| (n.clone(), f.in_flight))
                .collect(),
            throttles: ThrottleCounts {
                reserved_function: t(Cause::Reserved as usize),
                concurrency: t(Cause::Concurrency as usize),
                environments: t(Cause::Environments as usize),
                memory: t(Cause::Memory as usize),
            },
        }
    }

    /// Held while a concurrency setting is checked, stored and applied.
    pub async fn lock_settings(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.inner.settings_lock.lock().await
    }

    /// A function's reserved concurrency, if it has one.
    pub fn reserved(&self, name: &str) -> Option<u32> {
        self.inner
            .state()
            .functions
            .get(name)
            .and_then(|f| f.reserved)
    }

    /// A function's concurrency settings as the pool holds them.
    pub fn settings(&self, name: &str) -> ConcurrencySettings {
        let st = self.inner.state();
        let Some(f) = st.functions.get(name) else {
            return ConcurrencySettings::default();
        };
        ConcurrencySettings {
            reserved_concurrent_executions: f.reserved,
            provisioned: f.provisioned.as_ref().map(|p| ProvisionedSetting {
                requested_provisioned_concurrent_executions: p.requested,
                last_modified: p.last_modified.clone(),
            }),
        }
    }

    /// The state of a function's provisioned concurrency, if it has some.
    pub fn provisioned_status(&self, name: &str) -> Option<ProvisionedStatus> {
        let st = self.inner.state();
        let f = st.functions.get(name)?;
        let p = f.provisioned.as_ref()?;
        let allocated = p.counters.ready.load(Ordering::SeqCst) as u32;
        let status = if p.failed.is_some() {
            "FAILED"
        } else if allocated >= p.requested {
            "READY"
        } else {
            "IN_PROGRESS"
        };
        Some(ProvisionedStatus {
            requested: p.requested,
            allocated,
            available: f.prov_idle.len() as u32,
            status,
            status_reason: p.failed.clone(),
            last_modified: p.last_modified.clone(),
        })
    }

    /// Checks that `proposed` settings for `function` fit the host's limits, given every
    /// other function's. Callers serialise changes (see `api::concurrency`), so the check
    /// still holds when they apply it.
    pub fn validate(
        &self,
        function: &Function,
        proposed: &ConcurrencySettings,
    ) -> Result<(), LimitError> {
        let cfg = &self.inner.cfg;
        let name = function.config.function_name.as_str();
        let st = self.inner.state();
        let (mut reserved_others, mut prov_unreserved_others) = (0usize, 0usize);
        for (n, f) in &st.functions {
            if n == name {
                continue;
            }
            match f.reserved {
                Some(r) => reserved_others += r as usize,
                None => prov_unreserved_others += f.provisioned_n(),
            }
        }
        let prov = proposed
            .provisioned
            .as_ref()
            .map_or(0, |p| p.requested_provisioned_concurrent_executions);
        let limit = cfg.max_concurrency;
        let unreserved_left = |own_reserved: usize, own_prov: usize| {
            limit as i64
                - (reserved_others + own_reserved) as i64
                - (prov_unreserved_others + own_prov) as i64
        };
        match proposed.reserved_concurrent_executions {
            Some(r) => {
                if unreserved_left(r as usize, 0) < cfg.min_unreserved as i64 {
                    return Err(LimitError::ReservedOverLimit(cfg.min_unreserved));
                }
                if prov > r {
                    // Whichever of the two is being changed, name the right rule.
                    let old = st.functions.get(name).map(FnState::provisioned_n);
                    return Err(if old == Some(prov as usize) {
                        LimitError::ReservedBelowProvisioned(prov)
                    } else {
                        LimitError::ProvisionedOverReserved(r)
                    });
                }
            }
            None => {
                if unreserved_left(0, prov as usize) < cfg.min_unreserved as i64 {
                    return Err(LimitError::ProvisionedOverLimit(cfg.min_unreserved));
                }
            }
        }
        let memory = function.config.memory_size;
        if prov as usize > cfg.max_environments
            || u64::from(prov) * u64::from(memory) > cfg.memory_budget_mib
        {
            return Err(LimitError::ProvisionedOverHost {
                needed: prov,
                memory,
                max_envs: cfg.max_environments,
                budget: cfg.memory_budget_mib,
            });
        }
        Ok(())
    }

    /// Applies a function's concurrency settings (validated and stored by the caller, or
    /// loaded at start). Provisioned environments are started or stopped in the background.
    pub fn apply(&self, function: Arc<Function>, settings: &ConcurrencySettings) {
        let mut surplus = Vec::new();
        {
            let mut st = self.inner.state();
            let f = st
                .functions
                .entry(function.config.function_name.clone())
                .or_default();
            f.reserved = settings.reserved_concurrent_executions;
            match &settings.provisioned {
                None => {
                    f.provisioned = None;
                    surplus.append(&mut f.prov_idle);
                }
                Some(p) => {
                    let requested = p.requested_provisioned_concurrent_executions;
                    let same = f.provisioned.as_ref().is_some_and(|old| {
                        old.function.config.revision_id == function.config.revision_id
                    });
                    if same {
                        if let Some(old) = f.provisioned.as_mut() {
                            old.requested = requested;
                            old.last_modified = p.last_modified.clone();
                            old.failed = None;
                        }
                    } else {
                        surplus.append(&mut f.prov_idle);
                        f.provisioned = Some(Provisioned {
                            function,
                            requested,
                            last_modified: p.last_modified.clone(),
                            counters: Arc::default(),
                            failed: None,
                        });
                    }
                    // Fewer than before: idle ones beyond the new count go now, busy ones
                    // when their invocation ends.
                    if let Some(prov) = &f.provisioned {
                        let over = prov.counters.existing().saturating_sub(requested as usize);
                        let n = over.min(f.prov_idle.len());
                        surplus.extend(f.prov_idle.drain(..n));
                    }
                }
            }
        }
        drop(surplus);
        self.inner.counters.provision.notify_one();
    }
}

impl FnState {
    fn is_empty(&self) -> bool {
        self.in_flight == 0
            && self.reserved.is_none()
            && self.provisioned.is_none()
            && self.idle.is_empty()
            && self.prov_idle.is_empty()
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn throttle(&self, name: &str, cause: Cause) -> PoolError {
        self.throttles[cause as usize].fetch_add(1, Ordering::Relaxed);
        tracing::debug!(function = %name, ?cause, "invocation throttled");
        PoolError::Throttled(cause.reason())
    }

    fn in_flight_total(&self) -> usize {
        self.state().functions.values().map(|f| f.in_flight).sum()
    }

    /// Counts an invocation in flight, or throttles it.
    fn admit(&self, name: &str) -> Result<Ticket<'_>, PoolError> {
        let mut st = self.state();
        let (in_flight, reserved, prov) = match st.functions.get(name) {
            Some(f) => (f.in_flight, f.reserved, f.provisioned_n()),
            None => (0, None, 0),
        };
        match reserved {
            Some(r) if in_flight >= r as usize => {
                drop(st);
                return Err(self.throttle(name, Cause::Reserved));
            }
            Some(_) => {}
            // Within its provisioned concurrency the capacity is already set aside.
            None if in_flight < prov => {}
            None => {
                let pool = self.cfg.max_concurrency.saturating_sub(st.reserved_sum());
                let used: usize = st
                    .functions
                    .values()
                    .filter(|f| f.reserved.is_none())
                    .map(|f| f.in_flight.max(f.provisioned_n()))
                    .sum();
                if used >= pool {
                    drop(st);
                    return Err(self.throttle(name, Cause::Concurrency));
                }
            }
        }
        st.functions.entry(name.to_string()).or_default().in_flight += 1;
        Ok(Ticket {
            inner: self,
            name: name.to_string(),
        })
    }

    /// A warm environment of this revision: a provisioned one first, else the most recently
    /// used on-demand one.
    fn take_warm(&self, name: &str, revision: &str) -> Option<Slot> {
        let mut stale = Vec::new();
        let found = {
            let mut st = self.state();
            let f = st.functions.get_mut(name)?;
            let mut found = None;
            for list in [&mut f.prov_idle, &mut f.idle] {
                while let Some(slot) = list.pop() {
                    if slot.revision == revision && slot.sandbox.is_reusable() {
                        found = Some(slot);
                        break;
                    }
                    stale.push(slot);
                }
                if found.is_some() {
                    break;
                }
            }
            found
        };
        // Stale or dead ones are stopped outside the lock.
        drop(stale);
        found
    }

    /// Takes room for one more environment of `memory_mib`, stopping idle on-demand
    /// environments (least recently used first, any function) if the environment cap or the
    /// memory budget is reached.
    fn reserve(&self, memory_mib: u64, prov: Option<Arc<ProvCounters>>) -> Result<Capacity, Cause> {
        let c = &self.counters;
        let mut evicted = Vec::new();
        let result = {
            let mut st = self.state();
            loop {
                let envs = c.envs.load(Ordering::SeqCst);
                let used = c.memory_mib.load(Ordering::SeqCst);
                let env_ok = envs < self.cfg.max_environments;
                let mem_ok = used + memory_mib <= self.cfg.memory_budget_mib;
                if env_ok && mem_ok {
                    c.envs.fetch_add(1, Ordering::SeqCst);
                    c.memory_mib.fetch_add(memory_mib, Ordering::SeqCst);
                    if let Some(p) = &prov {
                        p.starting.fetch_add(1, Ordering::SeqCst);
                    }
                    break Ok(Capacity {
                        counters: c.clone(),
                        memory_mib,
                        prov,
                        ready: false,
                    });
                }
                match pop_lru_idle(&mut st) {
                    Some(Slot { sandbox, cap, .. }) => {
                        // The capacity is given back now; the process is stopped below.
                        drop(cap);
                        evicted.push(sandbox);
                    }
                    None => {
                        break Err(if env_ok {
                            Cause::Memory
                        } else {
                            Cause::Environments
                        })
                    }
                }
            }
        };
        if !evicted.is_empty() {
            tracing::debug!(
                environments = evicted.len(),
                "stopped idle environments to make room"
            );
        }
        drop(evicted);
        result
    }

    fn spec(&self, function: Arc<Function>, initialization_type: InitializationType) -> EnvSpec {
        EnvSpec {
            function,
            region: self.cfg.region.clone(),
            init_timeout: self.cfg.init_timeout,
            initialization_type,
        }
    }

    fn slot(&self, sandbox: Box<dyn Sandbox>, revision: String, cap: Capacity) -> Slot {
        Slot {
            sandbox,
            revision,
            idle_since: Instant::now(),
            last_used: 0,
            cap,
        }
    }

    /// Returns an environment after an invocation: to its idle list if it is still usable
    /// (and, if provisioned, still wanted), else it is stopped.
    fn put_back(&self, name: &str, mut slot: Slot) {
        if !slot.sandbox.is_reusable() || self.closed.load(Ordering::SeqCst) {
            drop(slot);
            return;
        }
        let rejected = {
            let mut st = self.state();
            st.clock += 1;
            let clock = st.clock;
            match st.functions.get_mut(name) {
                None => Some(slot),
                Some(f) => match &slot.cap.prov {
                    Some(pc) => {
                        let wanted = f.provisioned.as_ref().is_some_and(|p| {
                            Arc::ptr_eq(&p.counters, pc)
                                && p.counters.existing() <= p.requested as usize
                        });
                        if wanted {
                            f.prov_idle.push(slot);
                            None
                        } else {
                            Some(slot)
                        }
                    }
                    None => {
                        slot.idle_since = Instant::now();
                        slot.last_used = clock;
                        f.idle.push(slot);
                        None
                    }
                },
            }
        };
        drop(rejected);
    }

    /// Starts one provisioned environment for `name` (capacity already taken).
    async fn start_provisioned(&self, name: String, function: Arc<Function>, mut cap: Capacity) {
        let revision = function.config.revision_id.clone();
        let mut kill = self.kill.subscribe();
        let spec = self.spec(function, InitializationType::ProvisionedConcurrency);
        let started = {
            let _init = Gauge::new(&self.counters.initialising);
            tokio::select! {
                r = start_env(&*self.backend, spec, "provisioned") => r,
                _ = kill.wait_for(|k| *k) => return,
            }
        };
        let rejected = match started {
            Ok((sandbox, _)) => {
                cap.mark_ready();
                let slot = self.slot(sandbox, revision, cap);
                let mut st = self.state();
                let wanted = st.functions.get_mut(&name).and_then(|f| {
                    let p = f.provisioned.as_ref()?;
                    let ok = slot.cap.prov.as_ref().is_some_and(|pc| {
                        Arc::ptr_eq(pc, &p.counters) && pc.existing() <= p.requested as usize
                    }) && p.function.config.revision_id == slot.revision;
                    ok.then_some(f)
                });
                match wanted {
                    Some(f) if !self.closed.load(Ordering::SeqCst) => {
                        tracing::debug!(function = %name, env = %slot.sandbox.id(), "provisioned environment ready");
                        f.prov_idle.push(slot);
                        None
                    }
                    _ => Some(slot),
                }
            }
            Err(e) => {
                tracing::warn!(function = %name, error = %e, "provisioned environment failed to start");
                let reason = match &e {
                    StartError::Function(r) => {
                        format!("FUNCTION_ERROR_INIT_FAILED: {}", r.error_type)
                    }
                    other => format!("INTERNAL_ERROR: {other}"),
                };
                let mut st = self.state();
                if let Some(p) = st
                    .functions
                    .get_mut(&name)
                    .and_then(|f| f.provisioned.as_mut())
                {
                    if cap
                        .prov
                        .as_ref()
                        .is_some_and(|pc| Arc::ptr_eq(pc, &p.counters))
                    {
                        p.failed = Some(reason);
                    }
                }
                drop(st);
                drop(cap);
                None
            }
        };
        drop(rejected);
    }
}

/// The least recently used idle on-demand environment of any function.
fn pop_lru_idle(st: &mut State) -> Option<Slot> {
    let (_, f) = st
        .functions
        .iter_mut()
        .filter(|(_, f)| !f.idle.is_empty())
        .min_by_key(|(_, f)| f.idle[0].last_used)?;
    Some(f.idle.remove(0))
}

/// Starts an environment; returns it with the deadline of the invocation it was started for.
/// As in Lambda, an init that overruns the init limit is tried once more with the function
/// timeout as its limit, and that retry counts against the invocation's time.
async fn start_env(
    backend: &dyn Backend,
    mut spec: EnvSpec,
    request_id: &str,
) -> Result<(Box<dyn Sandbox>, Instant), StartError> {
    let timeout = Duration::from_secs(u64::from(spec.function.config.timeout));
    match backend.start(spec.clone()).await {
        Ok(s) => Ok((s, Instant::now() + timeout)),
        Err(StartError::InitTimeout(limit)) => {
            tracing::warn!(function = %spec.function.config.function_name, request_id,
                "init did not finish in {limit:?}; retrying it under the function timeout");
            let deadline = Instant::now() + timeout;
            spec.init_timeout = timeout;
            match backend.start(spec).await {
                Ok(s) => Ok((s, deadline)),
                Err(StartError::InitTimeout(_)) => {
                    Err(StartError::Function(ErrorReport::platform(
                        "Sandbox.Timedout",
                        format!(
                            "RequestId: {request_id} Error: Task timed out after {:.2} seconds",
                            timeout.as_secs_f64()
                        ),
                    )))
                }
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// Keeps every function's provisioned environments at their requested number: wakes when
/// one goes away or settings change, and every second while room is lacking.
async fn provisioner(inner: Arc<Inner>) {
    loop {
        if inner.closed.load(Ordering::SeqCst) {
            return;
        }
        let wanted: Vec<(String, Arc<Function>, Arc<ProvCounters>, usize)> = {
            let st = inner.state();
            st.functions
                .iter()
                .filter_map(|(n, f)| {
                    let p = f.provisioned.as_ref()?;
                    let deficit = (p.requested as usize).saturating_sub(p.counters.existing());
                    (p.failed.is_none() && deficit > 0)
                        .then(|| (n.clone(), p.function.clone(), p.counters.clone(), deficit))
                })
                .collect()
        };
        let mut short = false;
        for (name, function, counters, deficit) in wanted {
            for _ in 0..deficit {
                match inner.reserve(
                    u64::from(function.config.memory_size),
                    Some(counters.clone()),
                ) {
                    Ok(cap) => {
                        let (inner, name, function) =
                            (inner.clone(), name.clone(), function.clone());
                        tokio::spawn(async move {
                            inner.start_provisioned(name, function, cap).await;
                        });
                    }
                    Err(_) => {
                        short = true;
                        break;
                    }
                }
            }
        }
        let wait = if short {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(30)
        };
        tokio::select! {
            _ = inner.counters.provision.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use bytes::Bytes;

    /// Environments that answer once `release` is true.
    struct FakeBackend {
        release: watch::Receiver<bool>,
    }

    struct FakeSandbox {
        release: watch::Receiver<bool>,
    }

    #[async_trait]
    impl Sandbox for FakeSandbox {
        fn id(&self) -> &str {
            "fake"
        }
        async fn invoke(&mut self, _req: InvokeRequest, _deadline: Instant) -> InvokeOutcome {
            let _ = self.release.wait_for(|r| *r).await;
            InvokeOutcome::Response {
                body: Bytes::from_static(b"{}"),
                content_type: None,
            }
        }
        fn is_reusable(&self) -> bool {
            true
        }
        async fn stop(self: Box<Self>) {}
    }

    #[async_trait]
    impl Backend for FakeBackend {
        fn name(&self) -> &'static str {
            "fake"
        }
        async fn start(&self, _spec: EnvSpec) -> Result<Box<dyn Sandbox>, StartError> {
            Ok(Box::new(FakeSandbox {
                release: self.release.clone(),
            }))
        }
    }

    fn function(name: &str) -> Arc<Function> {
        let config = serde_json::from_value(serde_json::json!({
            "FunctionName": name, "FunctionArn": format!("arn:aws:lambda:us-east-1:000000000000:function:{name}"),
            "Runtime": "provided.al2023", "Role": "", "Handler": "bootstrap", "CodeSize": 0,
            "Description": "", "Timeout": 3, "MemorySize": 128, "LastModified": "",
            "CodeSha256": "", "Version": "$LATEST", "RevisionId": "r1", "State": "Active",
            "LastUpdateStatus": "Successful", "PackageType": "Zip", "Architectures": ["x86_64"],
            "EphemeralStorage": {"Size": 512},
        }))
        .expect("a function configuration");
        Arc::new(Function {
            config,
            code_dir: std::path::PathBuf::new(),
        })
    }

    fn pool(max_concurrency: usize, budget: u64) -> (Pool, watch::Sender<bool>) {
        let (tx, rx) = watch::channel(false);
        let pool = Pool::new(
            Arc::new(FakeBackend { release: rx }),
            PoolConfig {
                region: "us-east-1".into(),
                init_timeout: Duration::from_secs(1),
                max_environments: 16,
                max_concurrency,
                min_unreserved: 1,
                memory_budget_mib: budget,
            },
        );
        (pool, tx)
    }

    fn req() -> InvokeRequest {
        InvokeRequest {
            request_id: "r".into(),
            payload: Bytes::from_static(b"{}"),
            client_context: None,
            trace_id: String::new(),
            stream: None,
        }
    }

    fn reserved(n: u32) -> ConcurrencySettings {
        ConcurrencySettings {
            reserved_concurrent_executions: Some(n),
            provisioned: None,
        }
    }

    async fn until(pool: &Pool, f: impl Fn(&PoolSnapshot) -> bool) {
        while !f(&pool.snapshot()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn reservations_and_the_unreserved_pool_throttle_with_their_reasons() {
        let (pool, release) = pool(3, u64::MAX);
        let pool = Arc::new(pool);
        let (a, b) = (function("a"), function("b"));
        pool.apply(a.clone(), &reserved(1));
        let mut running = Vec::new();
        for f in [&b, &b, &a] {
            let (p, f) = (pool.clone(), f.clone());
            running.push(tokio::spawn(async move { p.invoke(f, req()).await }));
        }
        until(&pool, |s| s.busy == 3).await;
        assert_eq!(pool.snapshot().in_flight.get("b"), Some(&2));
        assert!(matches!(
            pool.invoke(b.clone(), req()).await,
            Err(PoolError::Throttled(
                ThrottleReason::ConcurrentInvocationLimitExceeded
            ))
        ));
        assert!(matches!(
            pool.invoke(a.clone(), req()).await,
            Err(PoolError::Throttled(
                ThrottleReason::ReservedFunctionConcurrentInvocationLimitExceeded
            ))
        ));
        release.send(true).unwrap();
        for r in running {
            assert!(r.await.unwrap().is_ok());
        }
        let s = pool.snapshot();
        assert_eq!((s.busy, s.idle, s.environments), (0, 3, 3));
        assert_eq!(s.throttles.reserved_function, 1);
        assert_eq!(s.throttles.concurrency, 1);
        assert!(s.in_flight.is_empty());
    }

    #[tokio::test]
    async fn the_memory_budget_evicts_the_least_recently_used_idle_environment() {
        let (pool, release) = pool(10, 256);
        release.send(true).unwrap();
        for name in ["x", "y", "z"] {
            pool.invoke(function(name), req()).await.unwrap();
        }
        assert_eq!(pool.idle_count("x"), 0, "x was the least recently used");
        assert_eq!((pool.idle_count("y"), pool.idle_count("z")), (1, 1));
        let s = pool.snapshot();
        assert_eq!((s.environments, s.memory_used_mib), (2, 256));
    }

    #[tokio::test]
    async fn settings_are_checked_against_the_host_limits() {
        let (pool, _release) = pool(4, 1024);
        let (a, b) = (function("a"), function("b"));
        assert!(matches!(
            pool.validate(&a, &reserved(4)),
            Err(LimitError::ReservedOverLimit(1))
        ));
        pool.validate(&a, &reserved(3)).unwrap();
        pool.apply(a.clone(), &reserved(3));
        assert!(pool.validate(&b, &reserved(1)).is_err());
        let prov = |n| ConcurrencySettings {
            reserved_concurrent_executions: None,
            provisioned: Some(ProvisionedSetting {
                requested_provisioned_concurrent_executions: n,
                last_modified: String::new(),
            }),
        };
        // 4 - 3 reserved leaves 1, which must stay unreserved.
        assert!(matches!(
            pool.validate(&b, &prov(1)),
            Err(LimitError::ProvisionedOverLimit(1))
        ));
        let mut over = reserved(3);
        over.provisioned = prov(4).provisioned;
        assert!(matches!(
            pool.validate(&a, &over),
            Err(LimitError::ProvisionedOverReserved(3))
        ));
        // 9 environments of 128 MB do not fit 1024 MiB.
        let (big, _r) = self::pool(100, 1024);
        assert!(matches!(
            big.validate(&b, &prov(9)),
            Err(LimitError::ProvisionedOverHost { .. })
        ));
    }
}
