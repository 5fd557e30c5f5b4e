//! `echo-rust-streaming`: a response-streaming function on the `lambda_runtime` crate
//! (`lambda_runtime::streaming`). It answers with `chunks` chunks, one at a time, so a caller
//! of InvokeWithResponseStream can watch them arrive.
//!
//! The event's knobs (all optional):
//! - `"chunks": <n>` (default 3): how many chunks;
//! - `"chunk_bytes": <n>`: each chunk is that many bytes (`x`s, the last one a newline)
//!   instead of the line `chunk <i>\n`;
//! - `"delay_ms": <n>`: a pause before each chunk after the first;
//! - `"gate": "<path>"`: after the first chunk, wait until that file exists (a caller that
//!   creates it once it holds the first chunk proves the chunk came before the end);
//! - `"exit_after": <k>`: the process exits (status 7) after k chunks, mid-stream.
//!
//! `lambda_runtime` starts every streamed body with its HTTP-integration prelude (a JSON
//! document and eight NUL bytes), which callers of InvokeWithResponseStream see first.

use std::time::Duration;

use lambda_runtime::streaming::{channel, Body, Response};
use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde_json::Value;

async fn handler(event: LambdaEvent<Value>) -> Result<Response<Body>, Error> {
    let p = event.payload;
    let num = |k: &str| p.get(k).and_then(Value::as_u64);
    let chunks = num("chunks").unwrap_or(3);
    let chunk_bytes = num("chunk_bytes").and_then(|n| usize::try_from(n).ok());
    let delay = Duration::from_millis(num("delay_ms").unwrap_or(0));
    let exit_after = num("exit_after");
    let gate = p.get("gate").and_then(Value::as_str).map(String::from);

    let (mut tx, rx) = channel();
    tokio::spawn(async move {
        for i in 0..chunks {
            if exit_after == Some(i) {
                std::process::exit(7);
            }
            if i > 0 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let chunk = match chunk_bytes {
                Some(n) if n > 0 => {
                    let mut c = vec![b'x'; n];
                    c[n - 1] = b'\n';
                    c
                }
                _ => format!("chunk {i}\n").into_bytes(),
            };
            if tx.send_data(chunk.into()).await.is_err() {
                // The platform stopped reading (a size cap): nothing more to send.
                return;
            }
            if i == 0 {
                if let Some(path) = &gate {
                    while !std::path::Path::new(path).exists() {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }
        if exit_after == Some(chunks) {
            std::process::exit(7);
        }
    });
    Ok(Response::from(rx))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::run(service_fn(handler)).await
}
