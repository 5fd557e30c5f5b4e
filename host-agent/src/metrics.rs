//! The agent's Prometheus metrics, served as text on `GET /metrics`.
//!
//! One [`Metrics`] per agent (an `Arc` in the API state and in the backends). Counters and
//! histograms are recorded where things happen: invocations in the Invoke API (and the
//! asynchronous queue once it records them), cold/warm starts and init and invoke durations
//! by each environment's log (`crate::logs::EnvLog`). Values owned elsewhere (environments by
//! state from the scheduler's snapshot, the event queue's depth and oldest age) are gauges set
//! by scrape hooks ([`Metrics::on_scrape`]) that run just before each encoding.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::encode`]'s output (OpenMetrics text, which Prometheus
/// scrapes natively).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FunctionLabel {
    pub function: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub function: String,
    /// `success`, `error` (a function or runtime error: the caller got
    /// `X-Amz-Function-Error`), `throttled` or `service_error` (the agent's fault).
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// `initializing`, `idle`, `busy` or `provisioned` (provisioned and idle).
    pub state: String,
}

/// The states of `kindling_environments`, as the scheduler counts them.
const ENV_STATES: [&str; 4] = ["initializing", "idle", "busy", "provisioned"];

/// How one invocation ended, for [`Metrics::record_invocation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// A function error: the runtime's `/error`, a crash, a timeout or a failed init.
    Error,
    Throttled,
    ServiceError,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Error => "error",
            Outcome::Throttled => "throttled",
            Outcome::ServiceError => "service_error",
        }
    }
}

type Hook = Box<dyn Fn(&Metrics) + Send + Sync>;

fn duration_histogram() -> Histogram {
    // 1 ms .. ~33 min in doublings: covers a warm echo and a 900 s invocation.
    Histogram::new(exponential_buckets(0.001, 2.0, 22))
}

pub struct Metrics {
    registry: Registry,
    invocations: Family<OutcomeLabels, Counter>,
    function_errors: Family<FunctionLabel, Counter>,
    throttles: Family<FunctionLabel, Counter>,
    cold_starts: Family<FunctionLabel, Counter>,
    warm_starts: Family<FunctionLabel, Counter>,
    init_duration: Family<FunctionLabel, Histogram, fn() -> Histogram>,
    restore_duration: Family<FunctionLabel, Histogram, fn() -> Histogram>,
    invoke_duration: Family<FunctionLabel, Histogram, fn() -> Histogram>,
    environments: Family<StateLabel, Gauge>,
    concurrent_executions: Family<FunctionLabel, Gauge>,
    environment_memory: Gauge,
    environment_memory_budget: Gauge,
    event_queue_depth: Gauge,
    event_queue_oldest_age: Gauge<f64, AtomicU64>,
    hooks: Mutex<Vec<Hook>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kindling");
        let invocations = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "invocations",
            "Invocations by function and outcome (success, error, throttled, service_error)",
            invocations.clone(),
        );
        let function_errors = Family::<FunctionLabel, Counter>::default();
        registry.register(
            "function_errors",
            "Invocations that ended in a function error (runtime /error, crash, timeout, init failure)",
            function_errors.clone(),
        );
        let throttles = Family::<FunctionLabel, Counter>::default();
        registry.register(
            "throttles",
            "Invocations refused with 429 (no execution environment available)",
            throttles.clone(),
        );
        let cold_starts = Family::<FunctionLabel, Counter>::default();
        registry.register(
            "cold_starts",
            "Invocations served by a newly initialised execution environment",
            cold_starts.clone(),
        );
        let warm_starts = Family::<FunctionLabel, Counter>::default();
        registry.register(
            "warm_starts",
            "Invocations served by a reused (warm) execution environment",
            warm_starts.clone(),
        );
        let init_duration: Family<FunctionLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(duration_histogram);
        registry.register(
            "init_duration_seconds",
            "Runtime init (start to the first /next) of environments that became ready",
            init_duration.clone(),
        );
        let restore_duration: Family<FunctionLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(duration_histogram);
        registry.register(
            "restore_duration_seconds",
            "Snapshot restore (VMM start to the restored guest ready) of microVM environments",
            restore_duration.clone(),
        );
        let invoke_duration: Family<FunctionLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(duration_histogram);
        registry.register(
            "invoke_duration_seconds",
            "Invocation duration as in the REPORT line (handler time, without init)",
            invoke_duration.clone(),
        );
        let environments = Family::<StateLabel, Gauge>::default();
        registry.register(
            "environments",
            "Execution environments by state (from the scheduler at scrape time)",
            environments.clone(),
        );
        // Created at zero so that a scrape shows every state from the start.
        for s in ENV_STATES {
            let _ = environments.get_or_create(&StateLabel { state: s.into() });
        }
        let concurrent_executions = Family::<FunctionLabel, Gauge>::default();
        registry.register(
            "concurrent_executions",
            "Invocations in flight, by function",
            concurrent_executions.clone(),
        );
        let environment_memory = Gauge::default();
        registry.register(
            "environment_memory_mib",
            "Sum of the MemorySize of the execution environments that exist",
            environment_memory.clone(),
        );
        let environment_memory_budget = Gauge::default();
        registry.register(
            "environment_memory_budget_mib",
            "Bound on environment_memory_mib",
            environment_memory_budget.clone(),
        );
        let event_queue_depth = Gauge::default();
        registry.register(
            "event_queue_depth",
            "Asynchronous (Event) invocations waiting in the queue",
            event_queue_depth.clone(),
        );
        let event_queue_oldest_age = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "event_queue_oldest_age_seconds",
            "Age of the oldest queued asynchronous invocation",
            event_queue_oldest_age.clone(),
        );
        Metrics {
            registry,
            invocations,
            function_errors,
            throttles,
            cold_starts,
            warm_starts,
            init_duration,
            restore_duration,
            invoke_duration,
            environments,
            concurrent_executions,
            environment_memory,
            environment_memory_budget,
            event_queue_depth,
            event_queue_oldest_age,
            hooks: Mutex::new(Vec::new()),
        }
    }

    fn label(function: &str) -> FunctionLabel {
        FunctionLabel {
            function: function.to_string(),
        }
    }

    /// One finished (or refused) invocation.
    pub fn record_invocation(&self, function: &str, outcome: Outcome) {
        self.invocations
            .get_or_create(&OutcomeLabels {
                function: function.to_string(),
                outcome: outcome.label().into(),
            })
            .inc();
        match outcome {
            Outcome::Error => {
                self.function_errors
                    .get_or_create(&Self::label(function))
                    .inc();
            }
            Outcome::Throttled => {
                self.throttles.get_or_create(&Self::label(function)).inc();
            }
            Outcome::Success | Outcome::ServiceError => {}
        }
    }

    /// Records a finished invocation from what the pool returned.
    pub fn record_result(
        &self,
        function: &str,
        result: &Result<rapid_api::InvokeOutcome, crate::pool::PoolError>,
    ) {
        use crate::pool::PoolError;
        use crate::sandbox::StartError;
        let outcome = match result {
            Ok(rapid_api::InvokeOutcome::Response { .. }) => Outcome::Success,
            Ok(rapid_api::InvokeOutcome::Error(_)) => Outcome::Error,
            Err(PoolError::Throttled(..)) => Outcome::Throttled,
            // A failed init is the function's error, as the caller sees it.
            Err(PoolError::Start(StartError::Function(_))) => Outcome::Error,
            Err(_) => Outcome::ServiceError,
        };
        self.record_invocation(function, outcome);
    }

    /// An invocation reached an environment: its first (`cold`) or a later one.
    pub fn record_start(&self, function: &str, cold: bool) {
        let family = if cold {
            &self.cold_starts
        } else {
            &self.warm_starts
        };
        family.get_or_create(&Self::label(function)).inc();
    }

    pub fn record_init_duration(&self, function: &str, d: Duration) {
        self.init_duration
            .get_or_create(&Self::label(function))
            .observe(d.as_secs_f64());
    }

    pub fn record_restore_duration(&self, function: &str, d: Duration) {
        self.restore_duration
            .get_or_create(&Self::label(function))
            .observe(d.as_secs_f64());
    }

    pub fn record_invoke_duration(&self, function: &str, d: Duration) {
        self.invoke_duration
            .get_or_create(&Self::label(function))
            .observe(d.as_secs_f64());
    }

    /// Sets the scheduler's gauges from its snapshot (from a scrape hook).
    pub fn set_pool(&self, p: &crate::pool::PoolSnapshot) {
        let states = [p.initialising, p.idle, p.busy, p.provisioned];
        for (state, n) in ENV_STATES.iter().zip(states) {
            self.environments
                .get_or_create(&StateLabel {
                    state: (*state).into(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        // Functions with nothing in flight are left out of the snapshot: start from zero.
        self.concurrent_executions.clear();
        for (function, n) in &p.in_flight {
            self.concurrent_executions
                .get_or_create(&Self::label(function))
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        self.environment_memory
            .set(i64::try_from(p.memory_used_mib).unwrap_or(i64::MAX));
        self.environment_memory_budget
            .set(i64::try_from(p.memory_budget_mib).unwrap_or(i64::MAX));
    }

    /// Sets the asynchronous queue's gauges (from a scrape hook).
    pub fn set_event_queue(&self, depth: usize, oldest_age: Duration) {
        self.event_queue_depth
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
        self.event_queue_oldest_age.set(oldest_age.as_secs_f64());
    }

    /// Registers a hook run before every scrape, to set gauges read from elsewhere (the
    /// event queue, a scheduler snapshot).
    pub fn on_scrape(&self, hook: impl Fn(&Metrics) + Send + Sync + 'static) {
        self.hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(hook));
    }

    /// Runs the scrape hooks and encodes everything as OpenMetrics text.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        {
            let hooks = self.hooks.lock().unwrap_or_else(|e| e.into_inner());
            for h in hooks.iter() {
                h(self);
            }
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// `GET /metrics`: Prometheus (OpenMetrics) text.
pub async fn http_get_metrics(
    axum::extract::State(state): axum::extract::State<crate::api::SharedState>,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    match state.metrics.encode() {
        Ok(text) => ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(e) => {
            crate::api::LambdaError::service(format!("encoding metrics: {e}")).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn counters_gauges_and_hooks_encode() {
        let m = Metrics::new();
        m.record_invocation("f", Outcome::Success);
        m.record_invocation("f", Outcome::Error);
        m.record_invocation("f", Outcome::Throttled);
        m.record_start("f", true);
        m.record_start("f", false);
        m.record_start("f", false);
        m.record_init_duration("f", Duration::from_millis(120));
        m.on_scrape(|m| {
            m.set_event_queue(3, Duration::from_millis(1500));
            let mut p = crate::pool::PoolSnapshot {
                idle: 1,
                ..Default::default()
            };
            p.in_flight.insert("f".into(), 2);
            m.set_pool(&p);
        });
        let text = m.encode().unwrap();
        let v = |s| value(&text, s);
        assert_eq!(
            v(r#"kindling_invocations_total{function="f",outcome="success"}"#),
            Some(1.0)
        );
        assert_eq!(
            v(r#"kindling_function_errors_total{function="f"}"#),
            Some(1.0)
        );
        assert_eq!(v(r#"kindling_throttles_total{function="f"}"#), Some(1.0));
        assert_eq!(v(r#"kindling_cold_starts_total{function="f"}"#), Some(1.0));
        assert_eq!(v(r#"kindling_warm_starts_total{function="f"}"#), Some(2.0));
        assert_eq!(
            v(r#"kindling_init_duration_seconds_count{function="f"}"#),
            Some(1.0)
        );
        assert_eq!(v(r#"kindling_environments{state="idle"}"#), Some(1.0));
        assert_eq!(
            v(r#"kindling_environments{state="initializing"}"#),
            Some(0.0)
        );
        assert_eq!(
            v(r#"kindling_concurrent_executions{function="f"}"#),
            Some(2.0)
        );
        assert_eq!(v("kindling_event_queue_depth"), Some(3.0));
        assert_eq!(v("kindling_event_queue_oldest_age_seconds"), Some(1.5));
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }
}
