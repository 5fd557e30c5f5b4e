//! InvokeWithResponseStream: `POST /2021-11-15/functions/{name}/response-streaming-invocations`.
//!
//! The answer is `200` with an `application/vnd.amazon.eventstream` body (see
//! [`super::eventstream`]): `PayloadChunk` events with the function's bytes as they come, then
//! one `InvokeComplete` (`ErrorCode`/`ErrorDetails` when the invocation failed, `LogResult`
//! with `X-Amz-Log-Type: Tail`). Errors before the function runs (not found, throttled, bad
//! request) are ordinary Lambda errors. A runtime that answers buffered (no streaming response
//! mode) gets its whole body sent as one `PayloadChunk`, as Lambda does.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use rapid_api::{InvokeOutcome, StreamEvent};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::eventstream::{self, Completion};
use super::functions::lookup;
use super::invoke::{
    client_context, header, log_type, new_trace_id, read_payload, with_request_id,
};
use super::{LambdaError, SharedState};
use crate::logs::TailRequest;
use crate::pool::PoolError;
use crate::sandbox::{InvokeRequest, StartError};

type Invocation = JoinHandle<Result<InvokeOutcome, PoolError>>;

pub async fn invoke_stream(
    State(state): State<SharedState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let request_id = uuid::Uuid::new_v4().to_string();
    let result = handle(state, &name, &q, &headers, body, &request_id).await;
    with_request_id(&request_id, result)
}

async fn handle(
    state: SharedState,
    name: &str,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Body,
    request_id: &str,
) -> Result<Response, LambdaError> {
    let function = lookup(&state.registry, name, q)?;
    let invocation_type = header(headers, "x-amz-invocation-type").unwrap_or("RequestResponse");
    if !matches!(invocation_type, "RequestResponse" | "DryRun") {
        return Err(LambdaError::validation(format!(
            "1 validation error detected: Value '{invocation_type}' at 'invocationType' failed to satisfy constraint: \
             Member must satisfy enum value set: [RequestResponse, DryRun]"
        )));
    }
    let log_type = log_type(headers)?;
    let client_context = client_context(headers)?;
    let payload = read_payload(body).await?;
    if invocation_type == "DryRun" {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }

    let (sink, mut events) = rapid_api::stream_channel();
    let req = InvokeRequest {
        request_id: request_id.to_string(),
        payload,
        client_context,
        trace_id: new_trace_id(),
        stream: Some(sink),
    };
    let tail = (log_type == Some("Tail")).then(|| state.logs.want_tail(request_id));
    let fname = function.config.function_name.clone();
    // Its own task, as in Invoke: a caller that hangs up does not cut the function short
    // (Lambda runs a streaming function to its end too).
    let pool = state.pool.clone();
    let mut task: Invocation = tokio::spawn(async move { pool.invoke(function, req).await });

    // Either the runtime starts a stream, or the invocation ends without one.
    let mut ended = None;
    let first = tokio::select! {
        biased;
        ev = events.recv() => ev,
        r = &mut task => {
            ended = Some(r);
            events.try_recv().ok()
        }
    };
    let end = Ending {
        state: state.clone(),
        function: fname,
        tail,
    };
    if first.is_some() {
        // Started (it always comes before any chunk): the response begins now.
        return Ok(event_stream(relay(events, task, ended, end)));
    }
    let result = match ended {
        Some(r) => r,
        None => task.await,
    };
    let result =
        result.map_err(|e| LambdaError::service(format!("invocation task failed: {e}")))?;
    state.metrics.record_result(&end.function, &result);
    let outcome = pool_outcome(result)?;
    let mut frames = BytesMut::new();
    let completion = match outcome {
        InvokeOutcome::Response { body, .. } => {
            for piece in body.chunks(eventstream::MAX_CHUNK) {
                frames.extend_from_slice(&eventstream::payload_chunk(piece));
            }
            Completion::default()
        }
        InvokeOutcome::Error(report) => failure(&report),
    };
    frames.extend_from_slice(&eventstream::invoke_complete(&end.complete(completion)));
    Ok(event_stream(futures_util::stream::iter([Ok::<
        _,
        std::convert::Infallible,
    >(
        frames.freeze(),
    )])))
}

/// What the last event needs once the invocation is over.
struct Ending {
    state: SharedState,
    function: String,
    tail: Option<TailRequest>,
}

impl Ending {
    fn complete(self, mut c: Completion) -> Completion {
        if let Some(log) = self.tail.and_then(TailRequest::take) {
            c.log_result = Some(base64::engine::general_purpose::STANDARD.encode(log));
        }
        c
    }
}

/// The errors Invoke answers with before the function runs; a failed init is the function's
/// error.
fn pool_outcome(result: Result<InvokeOutcome, PoolError>) -> Result<InvokeOutcome, LambdaError> {
    match result {
        Ok(o) => Ok(o),
        Err(PoolError::Throttled(reason)) => Err(LambdaError::throttled_with_reason(
            reason.as_str(),
            "Rate Exceeded.",
        )),
        Err(PoolError::ShuttingDown) => Err(LambdaError::unavailable(
            "The agent is shutting down and takes no new invocations.",
        )),
        Err(PoolError::Start(StartError::Function(report))) => Ok(InvokeOutcome::Error(report)),
        Err(PoolError::Start(e @ StartError::InitTimeout(_))) => {
            Err(LambdaError::service(e.to_string()))
        }
        Err(PoolError::Start(StartError::Host(msg))) => {
            tracing::error!(error = %msg, "cannot start an execution environment");
            Err(LambdaError::service(msg))
        }
    }
}

/// `InvokeComplete` for a failed invocation: `ErrorCode` is the error type (`Function.*`,
/// `Runtime.*`, `Sandbox.Timedout`), `ErrorDetails` the error message (the whole error
/// document when it has none).
fn failure(report: &rapid_api::ErrorReport) -> Completion {
    let details = serde_json::from_slice::<Value>(&report.body)
        .ok()
        .and_then(|v| {
            v.get("errorMessage")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .unwrap_or_else(|| String::from_utf8_lossy(&report.body).into_owned());
    Completion {
        error_code: Some(report.error_type.clone()),
        error_details: Some(details),
        log_result: None,
    }
}

fn event_stream(
    frames: impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static,
) -> Response {
    let mut res = Response::new(Body::from_stream(frames));
    let h = res.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("application/vnd.amazon.eventstream"),
    );
    h.insert(
        "x-amz-executed-version",
        HeaderValue::from_static("$LATEST"),
    );
    res
}

/// Where the relay is.
enum Relay {
    Streaming {
        events: mpsc::Receiver<StreamEvent>,
        task: Invocation,
        ended: Option<Result<Result<InvokeOutcome, PoolError>, tokio::task::JoinError>>,
        end: Ending,
    },
    Done,
}

/// The streamed body: a `PayloadChunk` per chunk as it comes, then `InvokeComplete` once the
/// sink has closed and the invocation has ended.
fn relay(
    events: mpsc::Receiver<StreamEvent>,
    task: Invocation,
    ended: Option<Result<Result<InvokeOutcome, PoolError>, tokio::task::JoinError>>,
    end: Ending,
) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static {
    let start = Relay::Streaming {
        events,
        task,
        ended,
        end,
    };
    futures_util::stream::unfold(start, |relay| async move {
        let Relay::Streaming {
            mut events,
            mut task,
            mut ended,
            end,
        } = relay
        else {
            return None;
        };
        loop {
            let next = if ended.is_some() {
                // The invocation is over: what is left in the channel, without waiting.
                events.try_recv().ok()
            } else {
                tokio::select! {
                    biased;
                    ev = events.recv() => ev,
                    r = &mut task => {
                        ended = Some(r);
                        continue;
                    }
                }
            };
            match next {
                Some(StreamEvent::Chunk(data)) => {
                    let mut frames = BytesMut::new();
                    for piece in data.chunks(eventstream::MAX_CHUNK) {
                        frames.extend_from_slice(&eventstream::payload_chunk(piece));
                    }
                    let state = Relay::Streaming {
                        events,
                        task,
                        ended,
                        end,
                    };
                    return Some((Ok(frames.freeze()), state));
                }
                Some(StreamEvent::Started { .. }) => continue,
                None => {
                    let result = match ended.take() {
                        Some(r) => r,
                        None => task.await,
                    };
                    let completion = match result {
                        Ok(r) => {
                            end.state.metrics.record_result(&end.function, &r);
                            match r {
                                Ok(InvokeOutcome::Response { .. }) => Completion::default(),
                                Ok(InvokeOutcome::Error(report)) => failure(&report),
                                Err(e) => Completion {
                                    error_code: Some("ServiceException".into()),
                                    error_details: Some(e.to_string()),
                                    log_result: None,
                                },
                            }
                        }
                        Err(e) => Completion {
                            error_code: Some("ServiceException".into()),
                            error_details: Some(format!("invocation task failed: {e}")),
                            log_result: None,
                        },
                    };
                    let frame = eventstream::invoke_complete(&end.complete(completion));
                    return Some((Ok(frame), Relay::Done));
                }
            }
        }
    })
}
