//! Function logs, as Lambda writes them to CloudWatch: per invocation `START`, the runtime's
//! lines, `END` and `REPORT` (plus the platform's own lines on a timeout or a crash).
//!
//! - [`LogStore`]: one per agent. Each function's lines go to `<data-dir>/logs/<name>.log`
//!   (rotated to `<name>.log.1` past a size limit), one line per record:
//!   `<RFC 3339 UTC time, ms> <log stream> <message>`, the stream being the environment's
//!   `AWS_LAMBDA_LOG_STREAM_NAME`. The store also hands the last 4 KB of an invocation's log to
//!   an Invoke caller that asked for `X-Amz-Log-Type: Tail` ([`LogStore::want_tail`]).
//! - [`EnvLog`]: one per execution environment, fed by its backend: runtime lines (init lines
//!   land before the first `START`), invocation start and end. It also records the
//!   environment's metrics (cold/warm start, init and invoke durations).
//! - [`stream_log`]: reads a function's log (optionally following it across rotation) for
//!   `GET /kindling/v1/functions/{name}/logs` and `kindling logs`.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rapid_api::InvokeOutcome;
use tokio::io::AsyncReadExt as _;
use tokio::sync::{mpsc, watch};

use crate::metrics::Metrics;

/// The log result of `X-Amz-Log-Type: Tail`: the last 4 KB of the invocation's log.
pub const TAIL_BYTES: usize = 4096;
/// Default size at which a function's log file is rotated to `.1`.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 10 * 1024 * 1024;
/// Longest part of an invocation's log kept in memory for its tail.
const CAPTURE_LIMIT: usize = 64 * 1024;
/// Width of the timestamp that starts every line of a log file.
const TS_LEN: usize = 24;

/// `2024-05-01T12:00:00.123Z`: fixed width, so lines compare by time as strings.
pub fn timestamp(t: chrono::DateTime<chrono::Utc>) -> String {
    // chrono's RFC 3339 writer: the same text as a strftime pattern, without parsing one on
    // every log line.
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("invalid function name {0:?}")]
    BadName(String),
    #[error("no log for function {0}")]
    NotFound(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Function names are `[a-zA-Z0-9-_]{1,64}`: safe as file names.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// One function's log file, shared by all its environments.
pub struct FunctionLog {
    path: PathBuf,
    max_bytes: u64,
    /// The open file and its size.
    file: Mutex<Option<(File, u64)>>,
    /// Bumped after every append, for followers.
    appended: watch::Sender<u64>,
}

impl FunctionLog {
    fn new(path: PathBuf, max_bytes: u64) -> Self {
        FunctionLog {
            path,
            max_bytes,
            file: Mutex::new(None),
            appended: watch::Sender::new(0),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends messages as lines of `stream` with the current time. A failing disk loses log
    /// lines, never an invocation: errors are reported to the agent's log.
    pub fn append(&self, stream: &str, messages: &[&str]) {
        self.append_after(stream, None, messages);
    }

    /// Like [`FunctionLog::append`], with a line `held` back earlier (with its own time) first:
    /// one write for both.
    fn append_after(&self, stream: &str, held: Option<&HeldLine>, messages: &[&str]) {
        let ts = timestamp(chrono::Utc::now());
        let mut text = String::new();
        let mut line = |ts: &str, m: &str| {
            text.push_str(ts);
            text.push(' ');
            text.push_str(stream);
            text.push(' ');
            text.push_str(m);
            text.push('\n');
        };
        if let Some(h) = held {
            line(&h.ts, &h.message);
        }
        for m in messages {
            line(&ts, m);
        }
        if let Err(e) = self.write(text.as_bytes()) {
            tracing::warn!(path = %self.path.display(), "cannot write the function log: {e}");
        }
        self.appended.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn write(&self, text: &[u8]) -> std::io::Result<()> {
        let mut guard = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, size)) = guard.as_ref() {
            if *size > 0 && *size + text.len() as u64 > self.max_bytes {
                // Rotate: the current file becomes `.1` (replacing the older one).
                *guard = None;
                std::fs::rename(&self.path, rotated(&self.path))?;
            }
        }
        if guard.is_none() {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            let size = f.metadata()?.len();
            *guard = Some((f, size));
        }
        if let Some((f, size)) = guard.as_mut() {
            f.write_all(text)?;
            *size += text.len() as u64;
        }
        Ok(())
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.appended.subscribe()
    }
}

fn rotated(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".1");
    PathBuf::from(p)
}

/// The agent's function logs and the metrics the environments feed.
pub struct LogStore {
    dir: PathBuf,
    max_bytes: u64,
    metrics: Arc<Metrics>,
    files: Mutex<HashMap<String, Arc<FunctionLog>>>,
    /// Request ids whose caller wants the tail, with the tail once the invocation ended.
    tails: Mutex<HashMap<String, Option<Vec<u8>>>>,
}

impl LogStore {
    /// Opens (creates) `<data-dir>/logs`. Logs survive restarts and function deletion (as a
    /// CloudWatch log group outlives its function); each is bounded by rotation.
    pub fn open(
        data_dir: &Path,
        max_bytes: u64,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<LogStore>, LogError> {
        let dir = data_dir.join("logs");
        std::fs::create_dir_all(&dir).map_err(|source| LogError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(Arc::new(LogStore {
            dir,
            max_bytes: max_bytes.max(1024),
            metrics,
            files: Mutex::new(HashMap::new()),
            tails: Mutex::new(HashMap::new()),
        }))
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The log of a function (by a valid function name).
    pub fn function(&self, name: &str) -> Result<Arc<FunctionLog>, LogError> {
        if !valid_name(name) {
            return Err(LogError::BadName(name.to_string()));
        }
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        let log = files.entry(name.to_string()).or_insert_with(|| {
            Arc::new(FunctionLog::new(
                self.dir.join(format!("{name}.log")),
                self.max_bytes,
            ))
        });
        Ok(log.clone())
    }

    /// Asks for the tail of invocation `request_id`'s log; take it from the returned handle
    /// once the invocation has ended.
    pub fn want_tail(self: &Arc<Self>, request_id: &str) -> TailRequest {
        self.tails_map().insert(request_id.to_string(), None);
        TailRequest {
            store: self.clone(),
            request_id: request_id.to_string(),
        }
    }

    fn tails_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<Vec<u8>>>> {
        self.tails.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn offer_tail(&self, request_id: &str, log: &[u8]) {
        let mut tails = self.tails_map();
        if let Some(slot) = tails.get_mut(request_id) {
            *slot = Some(last_bytes(log, TAIL_BYTES).to_vec());
        }
    }

    /// The environment log for a new environment of `function` writing as `stream`.
    /// `provisioned`: started ahead of invocations (provisioned concurrency), so its first
    /// invocation is no cold start and its REPORT has no `Init Duration`, as in Lambda.
    pub fn env_log(
        self: &Arc<Self>,
        function: &str,
        memory_mb: u32,
        stream: String,
        provisioned: bool,
    ) -> Result<Arc<EnvLog>, LogError> {
        let log = self.function(function)?;
        Ok(Arc::new(EnvLog {
            store: self.clone(),
            log,
            function: function.to_string(),
            memory_mb,
            stream,
            provisioned,
            state: Mutex::new(EnvLogState {
                invocations: 0,
                start: None,
                init_duration: None,
                restore_duration: None,
                capture: None,
            }),
        }))
    }
}

/// The tail of at most `n` bytes, starting on a UTF-8 character boundary.
fn last_bytes(log: &[u8], n: usize) -> &[u8] {
    let mut start = log.len().saturating_sub(n);
    // Continuation bytes are 10xxxxxx: skip to the next character's first byte.
    while start < log.len() && start > 0 && (log[start] & 0xC0) == 0x80 {
        start += 1;
    }
    &log[start..]
}

/// A caller's wish for an invocation's tail; withdrawn when dropped.
pub struct TailRequest {
    store: Arc<LogStore>,
    request_id: String,
}

impl TailRequest {
    /// The last 4 KB of the invocation's log (`START` .. `REPORT`), if it ran in an
    /// environment (an invocation that failed in init has none).
    pub fn take(self) -> Option<Vec<u8>> {
        self.store.tails_map().get_mut(&self.request_id)?.take()
    }
}

impl Drop for TailRequest {
    fn drop(&mut self) {
        self.store.tails_map().remove(&self.request_id);
    }
}

struct Capture {
    request_id: String,
    started: Instant,
    text: Vec<u8>,
}

struct EnvLogState {
    invocations: u64,
    /// The current invocation's `START`, until the next line is written: most invocations
    /// then need one write to the log file instead of two.
    start: Option<HeldLine>,
    /// Reported on the first invocation's REPORT line only.
    init_duration: Option<Duration>,
    /// Restored from a snapshot (microvm backend) in this long: the first REPORT says
    /// `Restore Duration` instead of `Init Duration`, as Lambda's SnapStart does.
    restore_duration: Option<Duration>,
    capture: Option<Capture>,
}

/// A log line whose time was taken when it happened, written later.
struct HeldLine {
    ts: String,
    message: String,
}

/// How an invocation ended, for its platform lines and REPORT.
pub struct InvocationEnd<'a> {
    pub outcome: &'a InvokeOutcome,
    /// The function timeout (for the "Task timed out" line).
    pub timeout: Duration,
    /// Peak memory of the environment in MB, where the backend can measure it.
    pub max_memory_mb: Option<u64>,
}

/// One execution environment's log and metrics.
pub struct EnvLog {
    store: Arc<LogStore>,
    log: Arc<FunctionLog>,
    function: String,
    memory_mb: u32,
    stream: String,
    provisioned: bool,
    state: Mutex<EnvLogState>,
}

impl EnvLog {
    fn state(&self) -> std::sync::MutexGuard<'_, EnvLogState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The log stream name (`AWS_LAMBDA_LOG_STREAM_NAME`).
    pub fn stream(&self) -> &str {
        &self.stream
    }

    fn write(&self, st: &mut EnvLogState, lines: &[&str]) {
        let start = st.start.take();
        self.log.append_after(&self.stream, start.as_ref(), lines);
        if let Some(c) = st.capture.as_mut() {
            if let Some(h) = &start {
                c.text.extend_from_slice(h.message.as_bytes());
                c.text.push(b'\n');
            }
            for l in lines {
                c.text.extend_from_slice(l.as_bytes());
                c.text.push(b'\n');
            }
            if c.text.len() > CAPTURE_LIMIT {
                let cut = c.text.len() - CAPTURE_LIMIT / 2;
                c.text.drain(..cut);
            }
        }
    }

    /// A line the runtime wrote (stdout or stderr, without its newline).
    pub fn line(&self, message: &str) {
        let mut st = self.state();
        self.write(&mut st, &[message]);
    }

    /// Init finished after `init`: the runtime is waiting for its first invocation.
    pub fn ready(&self, init: Duration) {
        let mut st = self.state();
        st.init_duration = Some(init);
        self.store
            .metrics
            .record_init_duration(&self.function, init);
    }

    /// The environment was restored from a snapshot in `restore` (no Init ran).
    pub fn restored(&self, restore: Duration) {
        self.state().restore_duration = Some(restore);
        self.store
            .metrics
            .record_restore_duration(&self.function, restore);
    }

    /// An invocation starts: writes `START`, counts a cold or warm start.
    pub fn start(&self, request_id: &str) {
        let mut st = self.state();
        let cold = st.invocations == 0 && !self.provisioned;
        st.invocations += 1;
        self.store.metrics.record_start(&self.function, cold);
        st.capture = Some(Capture {
            request_id: request_id.to_string(),
            started: Instant::now(),
            text: Vec::new(),
        });
        // Written with the invocation's first line (at the latest END): a follower sees it
        // when there is something after it.
        st.start = Some(HeldLine {
            ts: timestamp(chrono::Utc::now()),
            message: format!("START RequestId: {request_id} Version: $LATEST"),
        });
    }

    /// The invocation ended (its runtime output already written): the platform's lines for
    /// a timeout or crash, `END`, `REPORT`; the tail goes to a caller that asked for it.
    pub fn finish(&self, end: InvocationEnd<'_>) {
        let mut st = self.state();
        let Some(cap) = st.capture.as_ref() else {
            return;
        };
        let request_id = cap.request_id.clone();
        let duration = cap.started.elapsed();
        let mut lines = Vec::new();
        let mut status = String::new();
        if let InvokeOutcome::Error(report) = end.outcome {
            match report.error_type.as_str() {
                "Sandbox.Timedout" => {
                    lines.push(format!(
                        "{} {request_id} Task timed out after {:.2} seconds",
                        timestamp(chrono::Utc::now()),
                        end.timeout.as_secs_f64()
                    ));
                    status = "\tStatus: timeout".into();
                }
                "Runtime.ExitError" => {
                    let message = serde_json::from_slice::<serde_json::Value>(&report.body)
                        .ok()
                        .and_then(|v| v["errorMessage"].as_str().map(str::to_string))
                        .unwrap_or_else(|| {
                            format!("RequestId: {request_id} Error: Runtime exited")
                        });
                    lines.push(message);
                    lines.push(report.error_type.clone());
                    status = format!("\tStatus: error\tError Type: {}", report.error_type);
                }
                _ => {}
            }
        }
        lines.push(format!("END RequestId: {request_id}"));
        let ms = duration.as_secs_f64() * 1000.0;
        let mut report = format!(
            "REPORT RequestId: {request_id}\tDuration: {ms:.2} ms\tBilled Duration: {} ms\tMemory Size: {} MB",
            ms.ceil().max(1.0) as u64,
            self.memory_mb
        );
        if let Some(mb) = end.max_memory_mb {
            report.push_str(&format!("\tMax Memory Used: {mb} MB"));
        }
        if st.invocations == 1 && !self.provisioned {
            if let Some(restore) = st.restore_duration {
                report.push_str(&format!(
                    "\tRestore Duration: {:.2} ms",
                    restore.as_secs_f64() * 1000.0
                ));
            } else if let Some(init) = st.init_duration {
                report.push_str(&format!(
                    "\tInit Duration: {:.2} ms",
                    init.as_secs_f64() * 1000.0
                ));
            }
        }
        report.push_str(&status);
        // Lambda ends the REPORT line with a tab.
        report.push('\t');
        lines.push(report);
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        self.write(&mut st, &refs);
        if let Some(cap) = st.capture.take() {
            self.store.offer_tail(&request_id, &cap.text);
        }
        self.store
            .metrics
            .record_invoke_duration(&self.function, duration);
    }
}

impl Drop for EnvLog {
    /// An invocation that never finished (its caller went away) still leaves its `START`.
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = st.start.take() {
            self.log.append_after(&self.stream, Some(&h), &[]);
        }
    }
}

/// What to read from a function's log.
#[derive(Debug, Clone, Default)]
pub struct ReadOptions {
    /// Keep reading as lines are appended (across rotation) until the receiver is dropped.
    pub follow: bool,
    /// Only lines at or after this time.
    pub since: Option<chrono::DateTime<chrono::Utc>>,
}

/// Sends complete lines (with their newline) from a function's log to `tx`: the rotated file
/// first, then the current one, then (when following) what is appended, also across
/// rotation. Ends when done, or when `tx`'s receiver is gone.
pub async fn stream_log(
    store: Arc<LogStore>,
    name: &str,
    opts: ReadOptions,
    tx: mpsc::Sender<Bytes>,
) -> Result<(), LogError> {
    let log = store.function(name)?;
    let mut appended = log.subscribe();
    let path = log.path().to_path_buf();
    let mut lines = LineSplitter {
        since: opts.since.map(timestamp),
        partial: Vec::new(),
    };
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LogError::Io { path, source }
    };
    if let Ok(mut old) = tokio::fs::File::open(rotated(&path)).await {
        if !lines.pump(&mut old, &tx).await.map_err(io(&path))? {
            return Ok(());
        }
        lines.partial.clear();
    }
    let mut current = open_with_inode(&path).await;
    loop {
        if let Some((f, _)) = current.as_mut() {
            if !lines.pump(f, &tx).await.map_err(io(&path))? {
                return Ok(());
            }
        }
        if !opts.follow {
            return Ok(());
        }
        // Rotated (or created) since we opened it: finish the old file, then switch.
        let on_disk = tokio::fs::metadata(&path).await.ok().map(|m| m.ino());
        if on_disk.is_some() && on_disk != current.as_ref().map(|c| c.1) {
            if let Some((f, _)) = current.as_mut() {
                if !lines.pump(f, &tx).await.map_err(io(&path))? {
                    return Ok(());
                }
            }
            lines.partial.clear();
            // Rotated twice since we looked: the file in between is `.1` now.
            let ours = current.as_ref().map(|c| c.1);
            if let Some((mut between, ino)) = open_with_inode(&rotated(&path)).await {
                if ours.is_some() && Some(ino) != ours && Some(ino) != on_disk {
                    if !lines.pump(&mut between, &tx).await.map_err(io(&path))? {
                        return Ok(());
                    }
                    lines.partial.clear();
                }
            }
            current = open_with_inode(&path).await;
            continue;
        }
        tokio::select! {
            r = appended.changed() => {
                if r.is_err() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            // A backstop: another writer (a second agent) does not notify us.
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = tx.closed() => return Ok(()),
        }
    }
}

async fn open_with_inode(path: &Path) -> Option<(tokio::fs::File, u64)> {
    let f = tokio::fs::File::open(path).await.ok()?;
    let ino = f.metadata().await.ok()?.ino();
    Some((f, ino))
}

struct LineSplitter {
    since: Option<String>,
    partial: Vec<u8>,
}

impl LineSplitter {
    /// Reads `f` to its end and sends its complete lines; false when the receiver is gone.
    async fn pump(
        &mut self,
        f: &mut tokio::fs::File,
        tx: &mpsc::Sender<Bytes>,
    ) -> std::io::Result<bool> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = f.read(&mut buf).await?;
            if n == 0 {
                return Ok(true);
            }
            self.partial.extend_from_slice(&buf[..n]);
            let Some(last_nl) = self.partial.iter().rposition(|&b| b == b'\n') else {
                continue;
            };
            let rest = self.partial.split_off(last_nl + 1);
            let chunk = std::mem::replace(&mut self.partial, rest);
            let out = self.filter(&chunk);
            if !out.is_empty() && tx.send(Bytes::from(out)).await.is_err() {
                return Ok(false);
            }
        }
    }

    fn filter(&self, chunk: &[u8]) -> Vec<u8> {
        let Some(since) = &self.since else {
            return chunk.to_vec();
        };
        let mut out = Vec::with_capacity(chunk.len());
        for line in chunk.split_inclusive(|&b| b == b'\n') {
            let keep = line.get(..TS_LEN).is_none_or(|ts| ts >= since.as_bytes());
            if keep {
                out.extend_from_slice(line);
            }
        }
        out
    }
}

/// `GET /kindling/v1/functions/{name}/logs[?follow=true][&since_ms=EPOCH_MS]`: the function's
/// log as text, one record a line; with `follow`, the response stays open and carries new
/// lines as they are written. A deleted function's log stays readable.
pub async fn http_get_logs(
    axum::extract::State(state): axum::extract::State<crate::api::SharedState>,
    axum::extract::Path(name): axum::extract::Path<String>,
    axum::extract::Query(q): axum::extract::Query<HashMap<String, String>>,
) -> axum::response::Response {
    use crate::api::LambdaError;
    use axum::response::IntoResponse as _;
    let log = match state.logs.function(&name) {
        Ok(l) => l,
        Err(e) => return LambdaError::validation(e.to_string()).into_response(),
    };
    if state.registry.get(&name).is_none() && !log.path().exists() && !rotated(log.path()).exists()
    {
        return LambdaError::not_found(LogError::NotFound(name).to_string()).into_response();
    }
    let follow = q.get("follow").is_some_and(|v| v == "true" || v == "1");
    let since = match q.get("since_ms").map(|v| v.parse::<i64>()) {
        None => None,
        Some(Ok(ms)) => chrono::DateTime::from_timestamp_millis(ms),
        Some(Err(_)) => {
            return LambdaError::validation("since_ms must be milliseconds since the epoch")
                .into_response()
        }
    };
    let (tx, mut rx) = mpsc::channel::<Bytes>(16);
    let store = state.logs.clone();
    tokio::spawn(async move {
        if let Err(e) = stream_log(store, &name, ReadOptions { follow, since }, tx).await {
            tracing::warn!("reading the log of {name}: {e}");
        }
    });
    let body = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|o| o.map(Ok::<_, std::convert::Infallible>))
    });
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

/// One line of a log file, split into its parts (for `kindling logs --json`).
pub fn parse_line(line: &str) -> Option<(&str, &str, &str)> {
    let (ts, rest) = line.split_once(' ')?;
    let (stream, message) = rest.split_once(' ').unwrap_or((rest, ""));
    Some((ts, stream, message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use rapid_api::ErrorReport;

    fn store(max: u64) -> (tempfile::TempDir, Arc<LogStore>) {
        let dir = tempfile::tempdir().unwrap();
        let s = LogStore::open(dir.path(), max, Arc::new(Metrics::new())).unwrap();
        (dir, s)
    }

    async fn read_all(s: &Arc<LogStore>, name: &str, opts: ReadOptions) -> String {
        let (tx, mut rx) = mpsc::channel(16);
        stream_log(s.clone(), name, opts, tx).await.unwrap();
        let mut out = Vec::new();
        while let Some(b) = rx.recv().await {
            out.extend_from_slice(&b);
        }
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn invocation_lines_report_and_tail() {
        let (_d, s) = store(DEFAULT_MAX_FILE_BYTES);
        let env = s
            .env_log("f", 256, "2024/01/01/[$LATEST]abc".into(), false)
            .unwrap();
        env.line("init line");
        env.ready(Duration::from_millis(12));
        let want = s.want_tail("r1");
        env.start("r1");
        env.line("hello from r1");
        let ok = InvokeOutcome::Response {
            body: Bytes::from_static(b"{}"),
            content_type: None,
        };
        env.finish(InvocationEnd {
            outcome: &ok,
            timeout: Duration::from_secs(3),
            max_memory_mb: Some(41),
        });
        let tail = String::from_utf8(want.take().unwrap()).unwrap();
        let lines: Vec<&str> = tail.lines().collect();
        assert_eq!(lines[0], "START RequestId: r1 Version: $LATEST");
        assert_eq!(lines[1], "hello from r1");
        assert_eq!(lines[2], "END RequestId: r1");
        assert!(
            lines[3].starts_with("REPORT RequestId: r1\tDuration: "),
            "{tail}"
        );
        assert!(lines[3]
            .contains("\tMemory Size: 256 MB\tMax Memory Used: 41 MB\tInit Duration: 12.00 ms\t"));

        // The second invocation: a timeout, no Init Duration, nobody wants the tail.
        env.start("r2");
        let timeout = InvokeOutcome::Error(ErrorReport::platform("Sandbox.Timedout", "x"));
        env.finish(InvocationEnd {
            outcome: &timeout,
            timeout: Duration::from_secs(1),
            max_memory_mb: None,
        });
        let file = read_all(&s, "f", ReadOptions::default()).await;
        let messages: Vec<&str> = file.lines().map(|l| parse_line(l).unwrap().2).collect();
        assert_eq!(messages[0], "init line");
        assert!(
            messages[6].ends_with(" r2 Task timed out after 1.00 seconds"),
            "{file}"
        );
        assert_eq!(messages[7], "END RequestId: r2");
        assert!(!messages[8].contains("Init Duration"), "{file}");
        assert!(messages[8].contains("Status: timeout"), "{file}");
        assert!(s.tails_map().is_empty());
    }

    #[tokio::test]
    async fn rotation_keeps_one_old_file_and_follow_crosses_it() {
        let (_d, s) = store(1024);
        let log = s.function("rot").unwrap();
        for i in 0..20 {
            log.append("s", &[&format!("line {i:02} {}", "x".repeat(60))]);
        }
        assert!(rotated(log.path()).is_file());
        assert!(std::fs::metadata(log.path()).unwrap().len() <= 1024);
        let all = read_all(&s, "rot", ReadOptions::default()).await;
        let last: Vec<&str> = all.lines().collect();
        assert!(last.last().unwrap().contains("line 19"));
        // Consecutive: nothing lost between .1 and the current file.
        let nums: Vec<u32> = last
            .iter()
            .map(|l| parse_line(l).unwrap().2[5..7].parse().unwrap())
            .collect();
        assert!(nums.windows(2).all(|w| w[1] == w[0] + 1), "{nums:?}");

        let (tx, mut rx) = mpsc::channel(64);
        let follower = tokio::spawn(stream_log(
            s.clone(),
            "rot",
            ReadOptions {
                follow: true,
                since: None,
            },
            tx,
        ));
        let mut seen = String::new();
        while !seen.contains("line 19") {
            seen.push_str(std::str::from_utf8(&rx.recv().await.unwrap()).unwrap());
        }
        // Enough new lines to rotate again: the follower sees every one.
        for i in 20..40 {
            log.append("s", &[&format!("line {i:02} {}", "y".repeat(60))]);
        }
        while !seen.contains("line 39") {
            let chunk = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("follower is stuck")
                .unwrap();
            seen.push_str(std::str::from_utf8(&chunk).unwrap());
        }
        for i in 20..40 {
            assert!(seen.contains(&format!("line {i:02} ")), "line {i} missing");
        }
        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), follower)
            .await
            .expect("follower ends when the reader goes")
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn since_filters_and_names_are_checked() {
        let (_d, s) = store(DEFAULT_MAX_FILE_BYTES);
        let log = s.function("g").unwrap();
        log.append("s", &["old"]);
        let cut = chrono::Utc::now() + chrono::Duration::milliseconds(5);
        tokio::time::sleep(Duration::from_millis(10)).await;
        log.append("s", &["new"]);
        let text = read_all(
            &s,
            "g",
            ReadOptions {
                follow: false,
                since: Some(cut),
            },
        )
        .await;
        assert!(text.contains(" s new\n") && !text.contains("old"), "{text}");
        assert!(matches!(s.function("../x"), Err(LogError::BadName(_))));
        assert!(matches!(s.function(""), Err(LogError::BadName(_))));
    }

    #[test]
    fn tail_starts_on_a_character() {
        let s = "é".repeat(3000);
        let t = last_bytes(s.as_bytes(), TAIL_BYTES);
        assert!(t.len() <= TAIL_BYTES);
        assert!(std::str::from_utf8(t).is_ok());
    }
}
