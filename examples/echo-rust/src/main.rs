//! `echo-rust`: answers with the event it got, the request id and the function name, so a
//! caller can see the whole round trip through the `lambda_runtime` client.
//!
//! The answer also carries the runtime's process id, so a caller can tell a warm answer from
//! one after a re-init.
//!
//! Knobs in the event, to exercise the platform's error paths:
//! - `"fail": "<message>"`: the handler returns an error of type `EchoFailure`;
//! - `"panic": "<message>"`: the handler panics (`lambda_runtime` catches it and reports
//!   `Lambda panicked: <message>`; the process lives on);
//! - `"exit": <code>`: the process exits with that code mid-invocation (`Runtime.ExitError`);
//! - `"sleep_ms": <n>`: the handler sleeps first (past the timeout: `Sandbox.Timedout`);
//! - `"probe": {"env": [NAME...], "paths": [PATH...]}`: the answer also carries a `probe`
//!   object with those environment variables, whether those paths exist, the working
//!   directory and the command line (to check how a platform started the runtime);
//! - `"random": <n>`: the answer also carries `random`, n (at most 1024) bytes from the
//!   kernel's `getrandom`, hex-encoded (to check that snapshot clones do not share RNG
//!   state).

use lambda_runtime::{service_fn, Diagnostic, Error, LambdaEvent};
use serde_json::{json, Value};

async fn handler(event: LambdaEvent<Value>) -> Result<Value, Diagnostic> {
    let (payload, ctx) = event.into_parts();
    if let Some(ms) = payload.get("sleep_ms").and_then(Value::as_u64) {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    if let Some(code) = payload.get("exit").and_then(Value::as_i64) {
        std::process::exit(code as i32);
    }
    if let Some(msg) = payload.get("panic").and_then(Value::as_str) {
        panic!("{msg}");
    }
    if let Some(msg) = payload.get("fail").and_then(Value::as_str) {
        return Err(Diagnostic {
            error_type: "EchoFailure".into(),
            error_message: msg.into(),
        });
    }
    let probe = payload.get("probe").map(probe);
    let random = match payload.get("random").and_then(Value::as_u64) {
        Some(n) => Some(random_hex(n.min(1024) as usize).map_err(|e| Diagnostic {
            error_type: "EchoRandomFailure".into(),
            error_message: e.to_string(),
        })?),
        None => None,
    };
    Ok(json!({
        "probe": probe,
        "random": random,
        "echo": payload,
        "requestId": ctx.request_id,
        "functionName": ctx.env_config.function_name,
        // Which runtime process answered: a caller sees re-inits.
        "pid": std::process::id(),
        "runtime": "lambda_runtime (Rust)",
    }))
}

fn probe(what: &Value) -> Value {
    let names = |key: &str| -> Vec<String> {
        what.get(key)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    };
    let env: serde_json::Map<String, Value> = names("env")
        .into_iter()
        .map(|n| {
            let v = std::env::var(&n).map_or(Value::Null, Value::String);
            (n, v)
        })
        .collect();
    let paths: serde_json::Map<String, Value> = names("paths")
        .into_iter()
        .map(|p| {
            let exists = std::path::Path::new(&p).exists();
            (p, Value::Bool(exists))
        })
        .collect();
    json!({
        "env": env,
        "paths": paths,
        "cwd": std::env::current_dir().ok().map(|d| d.display().to_string()),
        "args": std::env::args().collect::<Vec<_>>(),
    })
}

/// `n` bytes from getrandom(2), straight from the kernel (no user-space generator whose
/// state a snapshot would copy), as lowercase hex.
fn random_hex(n: usize) -> std::io::Result<String> {
    let mut buf = vec![0u8; n];
    let mut got = 0;
    while got < n {
        // SAFETY: getrandom writes at most `n - got` bytes into `buf` from offset `got`.
        let r = unsafe { libc::getrandom(buf[got..].as_mut_ptr().cast(), n - got, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            got += r as usize;
        }
    }
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::run(service_fn(handler)).await
}
