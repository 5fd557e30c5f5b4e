//! The Telemetry API (`PUT /2022-07-01/telemetry`) and the older Logs API
//! (`PUT /2020-08-15/logs`): subscriptions from registered extensions, per-subscriber buffers,
//! and delivery as JSON arrays POSTed to the subscriber's URI.
//!
//! Memory is bounded per subscriber: a batch holds at most `maxItems` records and `maxBytes`
//! bytes, and the buffer at most two batches (one filling while one is being POSTed). Records that arrive while it is full (the subscriber is slow, dead, or a POST is in
//! flight) are dropped and counted; the next batch starts with a `platform.logsDropped` record.
//! Emitting never waits on a subscriber, so invocations are never held up by one.
//!
//! Events emitted before a subscription exists (the init phase: `platform.initStart`, early
//! log lines, ...) are kept in a bounded backlog until subscriptions close at the end of init,
//! and replayed to each subscriber when it subscribes, as Lambda buffers them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Map, Value};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::core::ApiError;

/// How long one POST to a subscriber may take before its batch counts as dropped.
const POST_TIMEOUT: Duration = Duration::from_secs(5);
/// Backlog kept for subscribers that subscribe later during init.
const BACKLOG_ITEMS: usize = 10_000;
const BACKLOG_BYTES: usize = 1024 * 1024;

const DROPPED_REASON: &str =
    "Consumer seems to have fallen behind as it has not acknowledged receipt of logs.";

/// Which API a subscription came through: the records differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `PUT /2022-07-01/telemetry`.
    Telemetry,
    /// `PUT /2020-08-15/logs`.
    Logs,
}

impl Api {
    fn closed_error(self) -> ApiError {
        match self {
            Api::Telemetry => ApiError {
                status: 403,
                error_type: "Telemetry.SubscriptionClosed",
                message: "Telemetry API subscription is closed already".into(),
            },
            Api::Logs => ApiError {
                status: 403,
                error_type: "Logs.SubscriptionClosed",
                message: "Logs API subscription is closed already".into(),
            },
        }
    }
}

/// The three kinds a subscriber picks from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Category {
    Platform,
    Function,
    Extension,
}

/// Timings and outcome of one invocation, for `platform.runtimeDone` and `platform.report`.
#[derive(Debug, Clone)]
pub(crate) struct InvokeMetrics {
    pub request_id: String,
    pub status: &'static str,
    pub error_type: Option<String>,
    pub trace_id: Option<String>,
    pub duration_ms: f64,
    pub produced_bytes: Option<usize>,
    pub billed_ms: Option<u64>,
    pub memory_size_mb: Option<u32>,
    pub max_memory_used_mb: Option<u64>,
    pub init_duration_ms: Option<f64>,
}

/// Something that happened, before it is rendered for an API.
#[derive(Debug, Clone)]
pub(crate) enum Event {
    InitStart {
        init_type: &'static str,
        function_name: String,
        function_version: String,
    },
    InitRuntimeDone {
        init_type: &'static str,
        status: &'static str,
        error_type: Option<String>,
    },
    InitReport {
        init_type: &'static str,
        status: &'static str,
        error_type: Option<String>,
        duration_ms: f64,
    },
    RestoreStart {
        function_name: String,
        function_version: String,
    },
    RestoreRuntimeDone {
        status: &'static str,
        error_type: Option<String>,
    },
    RestoreReport {
        status: &'static str,
        duration_ms: f64,
    },
    Extension {
        name: String,
        events: Vec<String>,
    },
    Subscription {
        api: Api,
        name: String,
        types: Vec<String>,
    },
    Start {
        request_id: String,
        version: String,
        trace_id: Option<String>,
    },
    RuntimeDone(InvokeMetrics),
    Report(InvokeMetrics),
    FunctionLog(String),
    ExtensionLog(String),
}

fn ms(v: f64) -> Value {
    json!((v * 1000.0).round() / 1000.0)
}

fn tracing(trace: &Option<String>) -> Option<Value> {
    trace
        .as_ref()
        .map(|t| json!({ "type": "X-Amzn-Trace-Id", "value": t }))
}

fn with_error(mut v: Value, error_type: &Option<String>) -> Value {
    if let Some(e) = error_type {
        v["errorType"] = json!(e);
    }
    v
}

impl Event {
    /// The `(category, type, record)` triples this event is, for `api`.
    fn render(&self, api: Api) -> Vec<(Category, &'static str, Value)> {
        use Category::*;
        let p = |t: &'static str, r: Value| vec![(Platform, t, r)];
        match (self, api) {
            (Event::FunctionLog(l), _) => vec![(Function, "function", json!(l))],
            (Event::ExtensionLog(l), _) => vec![(Extension, "extension", json!(l))],
            (Event::Extension { name, events }, _) => p(
                "platform.extension",
                json!({ "name": name, "state": "Ready", "events": events }),
            ),
            (
                Event::Subscription {
                    api: a,
                    name,
                    types,
                },
                _,
            ) if *a == api => p(
                match api {
                    Api::Telemetry => "platform.telemetrySubscription",
                    Api::Logs => "platform.logsSubscription",
                },
                json!({ "name": name, "state": "Subscribed", "types": types }),
            ),
            (Event::Subscription { .. }, _) => vec![],
            // The Logs API has no init or restore records.
            (
                Event::InitStart { .. }
                | Event::InitRuntimeDone { .. }
                | Event::InitReport { .. }
                | Event::RestoreStart { .. }
                | Event::RestoreRuntimeDone { .. }
                | Event::RestoreReport { .. },
                Api::Logs,
            ) => vec![],
            (
                Event::InitStart {
                    init_type,
                    function_name,
                    function_version,
                },
                Api::Telemetry,
            ) => p(
                "platform.initStart",
                json!({
                    "initializationType": init_type,
                    "phase": "init",
                    "functionName": function_name,
                    "functionVersion": function_version,
                }),
            ),
            (
                Event::InitRuntimeDone {
                    init_type,
                    status,
                    error_type,
                },
                Api::Telemetry,
            ) => p(
                "platform.initRuntimeDone",
                with_error(
                    json!({ "initializationType": init_type, "phase": "init", "status": status }),
                    error_type,
                ),
            ),
            (
                Event::InitReport {
                    init_type,
                    status,
                    error_type,
                    duration_ms,
                },
                Api::Telemetry,
            ) => p(
                "platform.initReport",
                with_error(
                    json!({
                        "initializationType": init_type,
                        "phase": "init",
                        "status": status,
                        "metrics": { "durationMs": ms(*duration_ms) },
                    }),
                    error_type,
                ),
            ),
            (
                Event::RestoreStart {
                    function_name,
                    function_version,
                },
                Api::Telemetry,
            ) => p(
                "platform.restoreStart",
                json!({ "functionName": function_name, "functionVersion": function_version }),
            ),
            (Event::RestoreRuntimeDone { status, error_type }, Api::Telemetry) => p(
                "platform.restoreRuntimeDone",
                with_error(json!({ "status": status }), error_type),
            ),
            (
                Event::RestoreReport {
                    status,
                    duration_ms,
                },
                Api::Telemetry,
            ) => p(
                "platform.restoreReport",
                json!({ "status": status, "metrics": { "durationMs": ms(*duration_ms) } }),
            ),
            (
                Event::Start {
                    request_id,
                    version,
                    trace_id,
                },
                _,
            ) => {
                let mut r = json!({ "requestId": request_id, "version": version });
                if let (Some(t), Api::Telemetry) = (tracing(trace_id), api) {
                    r["tracing"] = t;
                }
                p("platform.start", r)
            }
            (Event::RuntimeDone(m), Api::Telemetry) => {
                let mut metrics = json!({ "durationMs": ms(m.duration_ms) });
                if let Some(b) = m.produced_bytes {
                    metrics["producedBytes"] = json!(b);
                }
                let mut r = with_error(
                    json!({ "requestId": m.request_id, "status": m.status, "metrics": metrics }),
                    &m.error_type,
                );
                if let Some(t) = tracing(&m.trace_id) {
                    r["tracing"] = t;
                }
                p("platform.runtimeDone", r)
            }
            (Event::RuntimeDone(m), Api::Logs) => vec![
                (
                    Platform,
                    "platform.runtimeDone",
                    json!({ "requestId": m.request_id, "status": m.status }),
                ),
                (
                    Platform,
                    "platform.end",
                    json!({ "requestId": m.request_id }),
                ),
            ],
            (Event::Report(m), _) => {
                let mut metrics = Map::new();
                metrics.insert("durationMs".into(), ms(m.duration_ms));
                if let Some(b) = m.billed_ms {
                    metrics.insert("billedDurationMs".into(), json!(b));
                }
                if let Some(v) = m.memory_size_mb {
                    metrics.insert("memorySizeMB".into(), json!(v));
                }
                if let Some(v) = m.max_memory_used_mb {
                    metrics.insert("maxMemoryUsedMB".into(), json!(v));
                }
                if let Some(v) = m.init_duration_ms {
                    metrics.insert("initDurationMs".into(), ms(v));
                }
                let mut r = json!({ "requestId": m.request_id, "metrics": metrics });
                if api == Api::Telemetry {
                    r["status"] = json!(m.status);
                    r = with_error(r, &m.error_type);
                    if let Some(t) = tracing(&m.trace_id) {
                        r["tracing"] = t;
                    }
                }
                p("platform.report", r)
            }
        }
    }
}

/// An event with the time it happened (RFC 3339, milliseconds, UTC).
#[derive(Debug, Clone)]
struct Stamped {
    time: String,
    event: Event,
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A validated subscription request.
#[derive(Debug, Clone)]
struct Spec {
    api: Api,
    uri: reqwest::Url,
    platform: bool,
    function: bool,
    extension: bool,
    types: Vec<String>,
    max_items: usize,
    max_bytes: usize,
    timeout: Duration,
}

impl Spec {
    fn wants(&self, c: Category) -> bool {
        match c {
            Category::Platform => self.platform,
            Category::Function => self.function,
            Category::Extension => self.extension,
        }
    }
}

fn validation(message: String) -> ApiError {
    ApiError {
        status: 400,
        error_type: "ValidationError",
        message,
    }
}

/// Validates a subscription body; every problem found is listed, `; `-separated, as Lambda
/// does ("URI port is not provided; types should not be empty").
fn parse_spec(api: Api, body: &[u8]) -> Result<Spec, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| validation(format!("request body is not valid JSON: {e}")))?;
    let Value::Object(obj) = v else {
        return Err(validation("request body must be a JSON object".into()));
    };
    let mut errs: Vec<String> = Vec::new();

    let versions: &[&str] = match api {
        Api::Telemetry => &["2022-07-01", "2022-12-13", "2025-01-29"],
        Api::Logs => &["2020-08-15", "2021-03-18"],
    };
    match obj.get("schemaVersion") {
        None if api == Api::Logs => {}
        None => errs.push("schemaVersion is required".into()),
        Some(Value::String(s)) if versions.contains(&s.as_str()) => {}
        Some(_) => errs.push(format!(
            "schemaVersion must be one of {}",
            versions.join(", ")
        )),
    }

    let mut uri = None;
    match obj.get("destination") {
        Some(Value::Object(d)) => {
            match d.get("protocol").and_then(Value::as_str) {
                Some("HTTP") => {}
                Some("TCP") => {
                    errs.push("destination protocol TCP is not supported; use HTTP".into())
                }
                _ => errs.push("destination protocol must be HTTP".into()),
            }
            match d.get("URI").and_then(Value::as_str) {
                None => errs.push("URI is required".into()),
                Some(s) => match reqwest::Url::parse(s) {
                    Err(e) => errs.push(format!("URI is not valid: {e}")),
                    Ok(u) if u.scheme() != "http" => errs.push("URI scheme must be http".into()),
                    Ok(u) if u.host_str().is_none() => errs.push("URI host is not provided".into()),
                    Ok(u) if u.port().is_none() => errs.push("URI port is not provided".into()),
                    Ok(u) => uri = Some(u),
                },
            }
        }
        _ => errs.push("destination is required".into()),
    }

    let (mut platform, mut function, mut extension) = (false, false, false);
    let mut types = Vec::new();
    match obj.get("types") {
        Some(Value::Array(a)) if !a.is_empty() => {
            for t in a {
                match t.as_str() {
                    Some("platform") => platform = true,
                    Some("function") => function = true,
                    Some("extension") => extension = true,
                    _ => {
                        errs.push(format!(
                            "types: {t} is not one of platform, function, extension"
                        ));
                        continue;
                    }
                }
                types.push(t.as_str().unwrap_or_default().to_string());
            }
        }
        Some(Value::Array(_)) | None => errs.push("types should not be empty".into()),
        Some(_) => errs.push("types must be an array".into()),
    }

    let defaults = match api {
        Api::Telemetry => (1000, 262_144, 1000),
        Api::Logs => (10_000, 262_144, 1000),
    };
    let (mut max_items, mut max_bytes, mut timeout_ms) = defaults;
    match obj.get("buffering") {
        None | Some(Value::Null) => {}
        Some(Value::Object(b)) => {
            let mut range = |key: &str, lo: u64, hi: u64, slot: &mut u64| match b.get(key) {
                None => {}
                Some(v) => match v.as_u64() {
                    Some(n) if (lo..=hi).contains(&n) => *slot = n,
                    _ => errs.push(format!(
                        "buffering.{key} must be an integer between {lo} and {hi}"
                    )),
                },
            };
            let (mut i, mut by, mut t) = (max_items, max_bytes, timeout_ms);
            range("maxItems", 1000, 10_000, &mut i);
            range("maxBytes", 262_144, 1_048_576, &mut by);
            range("timeoutMs", 25, 30_000, &mut t);
            (max_items, max_bytes, timeout_ms) = (i, by, t);
        }
        Some(_) => errs.push("buffering must be an object".into()),
    }

    if !errs.is_empty() {
        return Err(validation(errs.join("; ")));
    }
    let mut uri = uri.ok_or_else(|| validation("URI is required".into()))?;
    // Inside Lambda these names resolve to the sandbox itself; here that is this host.
    if matches!(
        uri.host_str(),
        Some("sandbox") | Some("sandbox.localdomain")
    ) {
        let _ = uri.set_host(Some("127.0.0.1"));
    }
    Ok(Spec {
        api,
        uri,
        platform,
        function,
        extension,
        types,
        max_items: max_items as usize,
        max_bytes: max_bytes as usize,
        timeout: Duration::from_millis(timeout_ms),
    })
}

#[derive(Default)]
struct Buffer {
    items: VecDeque<Bytes>,
    bytes: usize,
    /// When the oldest buffered item arrived: the batch goes out `timeoutMs` later.
    first_at: Option<Instant>,
    dropped_records: u64,
    dropped_bytes: u64,
}

/// One subscriber: an extension's subscription through one API.
struct Subscriber {
    extension_id: String,
    spec: Spec,
    buf: Mutex<Buffer>,
    wake: Notify,
    closed: AtomicBool,
}

impl Subscriber {
    fn lock(&self) -> MutexGuard<'_, Buffer> {
        self.buf.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, stamped: &Stamped) {
        for (cat, ty, record) in stamped.event.render(self.spec.api) {
            if !self.spec.wants(cat) {
                continue;
            }
            let item = json!({ "time": stamped.time, "type": ty, "record": record });
            self.push_item(Bytes::from(item.to_string()));
        }
    }

    fn push_item(&self, item: Bytes) {
        let mut b = self.lock();
        // Room for the batch being filled and one more waiting behind a POST in flight.
        let fits = b.items.len() < 2 * self.spec.max_items
            && (b.items.is_empty() || b.bytes + item.len() <= 2 * self.spec.max_bytes);
        if !fits {
            b.dropped_records += 1;
            b.dropped_bytes += item.len() as u64;
            return;
        }
        b.bytes += item.len();
        b.items.push_back(item);
        if b.first_at.is_none() {
            b.first_at = Some(Instant::now());
        }
        drop(b);
        self.wake.notify_one();
    }

    fn full(&self, b: &Buffer) -> bool {
        b.items.len() >= self.spec.max_items || b.bytes >= self.spec.max_bytes
    }

    /// Takes the buffered batch, led by a `platform.logsDropped` record when records were lost.
    fn take_batch(&self) -> Vec<Bytes> {
        let mut b = self.lock();
        let mut batch = Vec::with_capacity(b.items.len() + 1);
        if b.dropped_records > 0 {
            let rec = json!({
                "time": now_rfc3339(),
                "type": "platform.logsDropped",
                "record": {
                    "reason": DROPPED_REASON,
                    "droppedRecords": b.dropped_records,
                    "droppedBytes": b.dropped_bytes,
                },
            });
            batch.push(Bytes::from(rec.to_string()));
            b.dropped_records = 0;
            b.dropped_bytes = 0;
        }
        // At most maxItems records and maxBytes bytes (but always one) per batch.
        let mut taken = 0usize;
        let mut bytes = 0usize;
        while let Some(front) = b.items.front() {
            if taken == self.spec.max_items
                || (taken > 0 && bytes + front.len() > self.spec.max_bytes)
            {
                break;
            }
            bytes += front.len();
            taken += 1;
            if let Some(item) = b.items.pop_front() {
                batch.push(item);
            }
        }
        b.bytes -= bytes;
        b.first_at = if b.items.is_empty() {
            None
        } else {
            Some(Instant::now())
        };
        batch
    }

    fn count_lost(&self, batch: &[Bytes]) {
        let mut b = self.lock();
        for item in batch {
            // A lost logsDropped record is re-made from the counts, not counted itself.
            if item.windows(21).any(|w| w == b"platform.logsDropped\"") {
                continue;
            }
            b.dropped_records += 1;
            b.dropped_bytes += item.len() as u64;
        }
    }
}

async fn deliver(sub: Arc<Subscriber>, client: reqwest::Client) {
    loop {
        // Wait for something to send.
        let first_at = loop {
            let notified = sub.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let closed = sub.closed.load(Ordering::Acquire);
            {
                let b = sub.lock();
                if let Some(t) = b.first_at {
                    break t;
                }
                if b.dropped_records > 0 && closed {
                    break Instant::now();
                }
            }
            if closed {
                return;
            }
            notified.await;
        };
        // Wait until the buffer is full, the batch times out, or the core closes.
        let due = first_at + sub.spec.timeout;
        loop {
            let notified = sub.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if sub.closed.load(Ordering::Acquire) || sub.full(&sub.lock()) {
                break;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(due) => break,
            }
        }
        let batch = sub.take_batch();
        if batch.is_empty() {
            continue;
        }
        let mut body = Vec::with_capacity(batch.iter().map(|b| b.len() + 1).sum::<usize>() + 2);
        body.push(b'[');
        for (i, item) in batch.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(item);
        }
        body.push(b']');
        let sent = client
            .post(sub.spec.uri.clone())
            .header("content-type", "application/json")
            .body(body)
            .timeout(POST_TIMEOUT)
            .send()
            .await;
        match sent {
            Ok(res) if res.status().is_success() => {}
            Ok(res) => {
                tracing::debug!(uri = %sub.spec.uri, status = %res.status(), "telemetry subscriber refused a batch");
                sub.count_lost(&batch);
            }
            Err(e) => {
                tracing::debug!(uri = %sub.spec.uri, error = %e, "telemetry delivery failed");
                sub.count_lost(&batch);
            }
        }
        if sub.closed.load(Ordering::Acquire) && sub.lock().first_at.is_none() {
            return;
        }
    }
}

#[derive(Default)]
struct HubState {
    backlog: VecDeque<(Arc<Stamped>, usize)>,
    backlog_bytes: usize,
    /// Subscriptions are accepted (and the backlog kept) until init ends.
    open: bool,
    closed: bool,
    subscribers: Vec<Arc<Subscriber>>,
}

/// All subscriptions of one environment.
pub(crate) struct Hub {
    state: Mutex<HubState>,
    client: OnceLock<reqwest::Client>,
}

impl Hub {
    pub fn new() -> Self {
        Hub {
            state: Mutex::new(HubState {
                open: true,
                ..HubState::default()
            }),
            client: OnceLock::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records an event: into every subscriber's buffer, and into the backlog during init.
    pub fn emit(&self, event: Event) {
        let mut st = self.lock();
        if st.closed || (!st.open && st.subscribers.is_empty()) {
            return;
        }
        let stamped = Arc::new(Stamped {
            time: now_rfc3339(),
            event,
        });
        for s in &st.subscribers {
            s.push(&stamped);
        }
        if st.open {
            let size = match &stamped.event {
                Event::FunctionLog(l) | Event::ExtensionLog(l) => l.len() + 64,
                _ => 256,
            };
            // Past the bound the oldest are forgotten: new subscribers miss them.
            while st.backlog.len() >= BACKLOG_ITEMS || st.backlog_bytes + size > BACKLOG_BYTES {
                match st.backlog.pop_front() {
                    Some((_, n)) => st.backlog_bytes = st.backlog_bytes.saturating_sub(n),
                    None => break,
                }
            }
            st.backlog_bytes += size;
            st.backlog.push_back((stamped, size));
        }
    }

    /// Ends the subscription window (end of init): the backlog is dropped.
    pub fn close_subscriptions(&self) {
        let mut st = self.lock();
        st.open = false;
        st.backlog.clear();
        st.backlog_bytes = 0;
    }

    /// Subscribes `extension` (already known to be registered) through `api`.
    pub fn subscribe(
        &self,
        api: Api,
        extension_id: &str,
        extension_name: &str,
        body: &[u8],
    ) -> Result<(), ApiError> {
        let spec = parse_spec(api, body)?;
        let mut st = self.lock();
        if st.closed {
            return Err(ApiError::container_error());
        }
        if !st.open {
            return Err(api.closed_error());
        }
        let client = self
            .client
            .get_or_init(|| {
                reqwest::Client::builder()
                    .no_proxy()
                    .build()
                    .unwrap_or_default()
            })
            .clone();
        // A second subscription of the same extension through the same API replaces the first.
        st.subscribers.retain(|s| {
            let same = s.extension_id == extension_id && s.spec.api == api;
            if same {
                s.closed.store(true, Ordering::Release);
                s.wake.notify_one();
            }
            !same
        });
        let types = spec.types.clone();
        let sub = Arc::new(Subscriber {
            extension_id: extension_id.to_string(),
            spec,
            buf: Mutex::new(Buffer::default()),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
        });
        for (e, _) in &st.backlog {
            sub.push(e);
        }
        st.subscribers.push(sub.clone());
        drop(st);
        tokio::spawn(deliver(sub, client));
        self.emit(Event::Subscription {
            api,
            name: extension_name.to_string(),
            types,
        });
        Ok(())
    }

    /// Stops taking events; each subscriber's delivery sends what it holds once more and ends.
    pub fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        st.backlog.clear();
        for s in st.subscribers.drain(..) {
            s.closed.store(true, Ordering::Release);
            s.wake.notify_one();
        }
    }
}
