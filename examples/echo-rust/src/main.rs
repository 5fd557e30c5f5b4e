//! `echo-rust`: answers with the event it got, the request id and the function name, so a
//! caller can see the whole round trip through the `lambda_runtime` client.
//!
//! An event with `"fail": "<message>"` makes the handler return an error, to exercise
//! Lambda's function-error path.

use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde_json::{json, Value};

async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
    let (payload, ctx) = event.into_parts();
    if let Some(msg) = payload.get("fail").and_then(Value::as_str) {
        return Err(msg.to_string().into());
    }
    Ok(json!({
        "echo": payload,
        "requestId": ctx.request_id,
        "functionName": ctx.env_config.function_name,
        "runtime": "lambda_runtime (Rust)",
    }))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::run(service_fn(handler)).await
}
