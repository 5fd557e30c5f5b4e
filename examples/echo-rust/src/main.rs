//! `echo-rust`: answers with the event it got, the request id and the function name, so a
//! caller can see the whole round trip through the `lambda_runtime` client.
//!
//! An event with `"fail": "<message>"` makes the handler return an error of type
//! `EchoFailure`, to exercise Lambda's function-error path.

use lambda_runtime::{service_fn, Diagnostic, Error, LambdaEvent};
use serde_json::{json, Value};

async fn handler(event: LambdaEvent<Value>) -> Result<Value, Diagnostic> {
    let (payload, ctx) = event.into_parts();
    if let Some(msg) = payload.get("fail").and_then(Value::as_str) {
        return Err(Diagnostic {
            error_type: "EchoFailure".into(),
            error_message: msg.into(),
        });
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
