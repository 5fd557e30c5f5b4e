//! Streamed responses (`Lambda-Runtime-Function-Response-Mode: streaming`).
//!
//! The platform asks for a stream by passing a [`StreamSink`] with the invocation
//! ([`crate::RuntimeCore::invoke_with_stream`]). When the runtime streams its answer, the
//! sink gets [`StreamEvent::Started`] and then the body's chunks as they arrive, through a
//! bounded channel (so a slow caller slows the runtime down instead of the platform
//! buffering up to 200 MB); the invocation's outcome arrives when the body has ended: an
//! empty [`crate::InvokeOutcome::Response`], or an error (error trailers, a truncated body,
//! the size cap). Without a sink (a plain Invoke), a streamed body is buffered up to the
//! buffered limit, 6 MiB + 100 B, as Lambda does.
//!
//! Lambda's limits: at most 200 MB per streamed response; the first 6 MB go at full speed,
//! the rest at most 2 MB/s. Both are [`StreamLimits`], set per core by the embedding.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::core::RuntimeCore;
use crate::invocation::{ErrorReport, InvokeOutcome};
use crate::MAX_RESPONSE_BYTES;

/// Largest streamed response (Lambda: 200 MB).
pub const MAX_STREAM_BYTES: u64 = 200 * 1024 * 1024;
/// How much of a streamed response goes at full speed (Lambda: the first 6 MB).
pub const STREAM_FULL_SPEED_BYTES: u64 = 6 * 1024 * 1024;
/// The rate after that, in bytes per second (Lambda: 2 MB/s).
pub const STREAM_RATE_BYTES_PER_SEC: u64 = 2 * 1024 * 1024;
/// Chunks in flight between the runtime's connection and the caller.
pub const STREAM_CHANNEL_DEPTH: usize = 16;

/// The size cap and bandwidth cap of streamed responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// Bytes a streamed response may have; over it the invocation fails with
    /// `Function.ResponseSizeTooLarge`.
    pub max_bytes: u64,
    /// Bytes sent before the rate applies.
    pub full_speed_bytes: u64,
    /// Bytes per second after `full_speed_bytes`; `None`: no cap.
    pub rate_bytes_per_sec: Option<u64>,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            max_bytes: MAX_STREAM_BYTES,
            full_speed_bytes: STREAM_FULL_SPEED_BYTES,
            rate_bytes_per_sec: Some(STREAM_RATE_BYTES_PER_SEC),
        }
    }
}

/// What the platform's sink receives.
#[derive(Debug)]
pub enum StreamEvent {
    /// The runtime started a streamed response (sent once, before any chunk).
    Started { content_type: Option<String> },
    /// The next piece of the body.
    Chunk(Bytes),
}

/// Where a streamed response goes; see [`stream_channel`].
pub type StreamSink = mpsc::Sender<StreamEvent>;

/// A sink and its receiving end, bounded to [`STREAM_CHANNEL_DEPTH`] events.
pub fn stream_channel() -> (StreamSink, mpsc::Receiver<StreamEvent>) {
    mpsc::channel(STREAM_CHANNEL_DEPTH)
}

/// Paces a stream: full speed for the first `full_speed_bytes`, then `rate_bytes_per_sec`.
#[derive(Debug)]
pub struct Pacer {
    limits: StreamLimits,
    sent: u64,
    /// When the stream crossed `full_speed_bytes`.
    capped_since: Option<Instant>,
}

impl Pacer {
    pub fn new(limits: StreamLimits) -> Self {
        Pacer {
            limits,
            sent: 0,
            capped_since: None,
        }
    }

    /// Records `n` more bytes sent at `now`; returns how long to wait before sending more so
    /// that the bytes past the full-speed allowance average at most the rate.
    pub fn record(&mut self, n: usize, now: Instant) -> Option<Duration> {
        self.sent = self.sent.saturating_add(n as u64);
        let rate = self.limits.rate_bytes_per_sec.filter(|r| *r > 0)?;
        let over = self.sent.checked_sub(self.limits.full_speed_bytes)?;
        if over == 0 {
            return None;
        }
        let since = *self.capped_since.get_or_insert(now);
        let due = since + Duration::from_secs_f64(over as f64 / rate as f64);
        (due > now).then(|| due - now)
    }
}

/// Where the body goes.
enum Target {
    /// To the caller's sink.
    Stream(StreamSink),
    /// The caller went away: the rest is read and dropped (Lambda does not stop a streaming
    /// function when its caller disconnects).
    Discard,
    /// No sink (a plain Invoke): buffered up to the buffered limit.
    Buffer(BytesMut),
}

/// The body was over the limit in [`StreamWriter::limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the streamed response exceeded {limit} bytes")]
pub struct TooLarge {
    pub limit: u64,
}

/// The runtime's side of a streamed response, from [`RuntimeCore::begin_stream`]: the front
/// writes the body's chunks and then finishes it. Dropped unfinished, the invocation fails
/// with `Runtime.TruncatedResponse`.
pub struct StreamWriter {
    core: Arc<RuntimeCore>,
    responder: Option<oneshot::Sender<InvokeOutcome>>,
    target: Target,
    content_type: Option<String>,
    produced: u64,
    limit: u64,
    pacer: Pacer,
}

impl StreamWriter {
    pub(crate) fn new(
        core: Arc<RuntimeCore>,
        responder: oneshot::Sender<InvokeOutcome>,
        sink: Option<StreamSink>,
        content_type: Option<String>,
        limits: StreamLimits,
    ) -> Self {
        let (target, limit) = match sink {
            Some(sink) => {
                // The channel is new and this is its first event: it always fits.
                let started = StreamEvent::Started {
                    content_type: content_type.clone(),
                };
                match sink.try_send(started) {
                    Ok(()) => (Target::Stream(sink), limits.max_bytes),
                    Err(_) => (Target::Discard, limits.max_bytes),
                }
            }
            None => (Target::Buffer(BytesMut::new()), MAX_RESPONSE_BYTES as u64),
        };
        StreamWriter {
            core,
            responder: Some(responder),
            target,
            content_type,
            produced: 0,
            limit,
            pacer: Pacer::new(limits),
        }
    }

    /// The size cap that applies to this response.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Whether the body goes to a caller as a stream (rather than being buffered).
    pub fn is_streamed(&self) -> bool {
        !matches!(self.target, Target::Buffer(_))
    }

    /// Passes on one chunk, waiting for the caller to take it and for the bandwidth cap.
    pub async fn write(&mut self, chunk: Bytes) -> Result<(), TooLarge> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.produced = self.produced.saturating_add(chunk.len() as u64);
        if self.produced > self.limit {
            return Err(TooLarge { limit: self.limit });
        }
        let n = chunk.len();
        match &mut self.target {
            Target::Buffer(buf) => buf.extend_from_slice(&chunk),
            Target::Discard => {}
            Target::Stream(sink) => {
                if sink.send(StreamEvent::Chunk(chunk)).await.is_err() {
                    self.target = Target::Discard;
                }
                if let Some(wait) = self.pacer.record(n, Instant::now()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        Ok(())
    }

    /// The body ended: the invocation succeeds, or fails with the error its trailers
    /// reported.
    pub fn finish(mut self, error: Option<ErrorReport>) {
        let (outcome, status) = match error {
            Some(report) => (InvokeOutcome::Error(report), "error"),
            None => {
                let body = match std::mem::replace(&mut self.target, Target::Discard) {
                    Target::Buffer(buf) => buf.freeze(),
                    _ => Bytes::new(),
                };
                let content_type = self.content_type.take();
                (InvokeOutcome::Response { body, content_type }, "success")
            }
        };
        self.end(outcome, status);
    }

    /// The body went over [`StreamWriter::limit`]: `Function.ResponseSizeTooLarge`.
    pub fn fail_too_large(mut self) {
        let report = ErrorReport::platform(
            "Function.ResponseSizeTooLarge",
            format!(
                "Response payload size exceeded maximum allowed payload size ({} bytes).",
                self.limit
            ),
        );
        self.end(InvokeOutcome::Error(report), "failure");
    }

    /// The body was cut short: `Runtime.TruncatedResponse`.
    pub fn fail_truncated(mut self) {
        self.end(InvokeOutcome::Error(truncated_report()), "failure");
    }

    fn end(&mut self, outcome: InvokeOutcome, status: &'static str) {
        if let Some(responder) = self.responder.take() {
            // Closing the sink first lets the caller see the last chunk before the outcome.
            self.target = Target::Discard;
            let produced = usize::try_from(self.produced).unwrap_or(usize::MAX);
            self.core
                .end_stream(responder, outcome, status, Some(produced));
        }
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        self.end(InvokeOutcome::Error(truncated_report()), "failure");
    }
}

pub(crate) fn truncated_report() -> ErrorReport {
    ErrorReport::platform(
        "Runtime.TruncatedResponse",
        "The runtime's response was cut short",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn full_speed_then_capped() {
        let mut p = Pacer::new(StreamLimits {
            max_bytes: 100 * MIB,
            full_speed_bytes: 6 * MIB,
            rate_bytes_per_sec: Some(2 * MIB),
        });
        let t0 = Instant::now();
        assert_eq!(p.record(6 * MIB as usize, t0), None);
        // 1 MiB past the allowance at 2 MiB/s: half a second after crossing.
        assert_eq!(p.record(MIB as usize, t0), Some(Duration::from_millis(500)));
        // Another MiB, asked for 400 ms later: due at 1 s, so 600 ms more.
        let t1 = t0 + Duration::from_millis(400);
        assert_eq!(p.record(MIB as usize, t1), Some(Duration::from_millis(600)));
        // Late enough: no wait.
        assert_eq!(p.record(1, t0 + Duration::from_secs(5)), None);
    }

    #[test]
    fn no_rate_means_no_cap() {
        let mut p = Pacer::new(StreamLimits {
            rate_bytes_per_sec: None,
            ..StreamLimits::default()
        });
        assert_eq!(p.record(usize::MAX / 2, Instant::now()), None);
    }
}
