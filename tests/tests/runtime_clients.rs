//! The lifecycle paths through the agent's Invoke API with the two real runtime clients,
//! `lambda_runtime` (the `echo-rust` example) and `awslambdaric` (a Python handler), on the
//! process backend. Each path is asserted on both sides: what the caller got (status,
//! `X-Amz-Function-Error`, the error document) and what the runtime saw (the event and
//! request id it echoes, and its process id, which tells a warm answer from a re-init).
//!
//! Streaming through `lambda_runtime` is covered by `streaming.rs`, extensions by
//! `extensions.rs`, init errors and the suppressed init by `invoke_api.rs` and the boto3
//! suite.

use std::time::{Duration, Instant};

use kindling_tests::{workspace_bin, zip, Agent, Response};
use serde_json::{json, Value};

/// Function timeout of the test functions (seconds).
const TIMEOUT_S: u64 = 1;

const PY_HANDLER: &str = r#"import os, time

def handler(event, context):
    if "sleep_ms" in event:
        time.sleep(event["sleep_ms"] / 1000)
    if "exit" in event:
        os._exit(event["exit"])
    if "fail" in event:
        raise ValueError(event["fail"])
    return {"echo": event, "requestId": context.aws_request_id, "pid": os.getpid()}
"#;

fn agent_with_clients() -> Agent {
    let agent = Agent::start();
    let rust = std::fs::read(workspace_bin("echo-rust")).expect("echo-rust is built");
    agent.create_ok(
        "rust",
        "provided.al2023",
        "bootstrap",
        &zip(&[("bootstrap", &rust, 0o755)]),
        json!({"Timeout": TIMEOUT_S}),
    );
    agent.create_ok(
        "python",
        "python3.11",
        "app.handler",
        &zip(&[("app.py", PY_HANDLER.as_bytes(), 0o644)]),
        json!({"Timeout": TIMEOUT_S}),
    );
    agent
}

fn invoke(agent: &Agent, name: &str, event: Value) -> (Response, Value) {
    let r = agent.invoke(name, event.to_string().as_bytes());
    let body = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    (r, body)
}

/// A good answer: the runtime saw this event under the request id the caller got. Returns
/// the runtime's pid.
fn answered(agent: &Agent, name: &str, event: Value) -> i64 {
    let (r, body) = invoke(agent, name, event.clone());
    assert_eq!(r.status, 200, "{name}: {}; log:\n{}", r.text(), agent.log());
    assert_eq!(r.header("x-amz-function-error"), None, "{name}: {body}");
    assert_eq!(body["echo"], event, "{name}");
    let rid = r.header("x-amzn-requestid").expect("request id header");
    assert_eq!(
        body["requestId"], rid,
        "{name}: the runtime saw another request id"
    );
    body["pid"].as_i64().expect("pid")
}

/// A function error: 200, `Unhandled`, this error document.
fn unhandled(agent: &Agent, name: &str, event: Value) -> Value {
    let (r, body) = invoke(agent, name, event);
    assert_eq!(r.status, 200, "{name}: {}", r.text());
    assert_eq!(
        r.header("x-amz-function-error"),
        Some("Unhandled"),
        "{name}: {body}"
    );
    body
}

#[test]
fn handler_errors_keep_the_environment() {
    let agent = agent_with_clients();
    for name in ["rust", "python"] {
        let pid = answered(&agent, name, json!({"n": 1}));
        let body = unhandled(&agent, name, json!({"fail": "boom"}));
        let expected_type = if name == "rust" {
            "EchoFailure"
        } else {
            "ValueError"
        };
        assert_eq!(body["errorType"], expected_type, "{name}: {body}");
        assert_eq!(body["errorMessage"], "boom", "{name}: {body}");
        // An error the runtime reported is not a crash: the same process answers next.
        assert_eq!(answered(&agent, name, json!({"n": 2})), pid, "{name}");
    }
}

#[test]
fn a_panicking_rust_handler_is_reported_and_the_runtime_lives_on() {
    let agent = agent_with_clients();
    let pid = answered(&agent, "rust", json!({"n": 1}));
    let body = unhandled(&agent, "rust", json!({"panic": "kaboom"}));
    // lambda_runtime catches the panic and posts it to /invocation/{id}/error.
    assert_eq!(body["errorMessage"], "Lambda panicked: kaboom", "{body}");
    assert!(
        body["errorType"].as_str().is_some_and(|t| !t.is_empty()),
        "{body}"
    );
    assert_eq!(answered(&agent, "rust", json!({"n": 2})), pid);
    // The panic message reached the function's log (stderr of the runtime).
    let log = std::fs::read_to_string(agent.data_dir.join("logs/rust.log")).unwrap();
    assert!(log.contains("kaboom"), "{log}");
}

#[test]
fn a_slow_handler_times_out_promptly_and_the_next_invoke_re_inits() {
    let agent = agent_with_clients();
    for name in ["rust", "python"] {
        let pid = answered(&agent, name, json!({"n": 1}));
        let started = Instant::now();
        let body = unhandled(&agent, name, json!({"sleep_ms": 20_000}));
        let took = started.elapsed();
        assert_eq!(body["errorType"], "Sandbox.Timedout", "{name}: {body}");
        assert!(
            body["errorMessage"]
                .as_str()
                .is_some_and(|m| m.ends_with("Task timed out after 1.00 seconds")),
            "{name}: {body}"
        );
        // The caller hears at the timeout, not when the handler would have finished.
        assert!(
            took < Duration::from_secs(10),
            "{name}: timeout reported after {took:?}"
        );
        // The environment was reset: a new runtime process answers.
        let again = answered(&agent, name, json!({"n": 2}));
        assert_ne!(again, pid, "{name}: the timed-out runtime was reused");
    }
}

#[test]
fn a_runtime_that_exits_mid_invoke_is_an_exit_error_then_re_inits() {
    let agent = agent_with_clients();
    for name in ["rust", "python"] {
        let pid = answered(&agent, name, json!({"n": 1}));
        let body = unhandled(&agent, name, json!({"exit": 42}));
        assert_eq!(body["errorType"], "Runtime.ExitError", "{name}: {body}");
        assert!(
            body["errorMessage"]
                .as_str()
                .is_some_and(|m| m.contains("exit status 42")),
            "{name}: {body}"
        );
        let again = answered(&agent, name, json!({"n": 2}));
        assert_ne!(again, pid, "{name}: the dead runtime's pid answered");
    }
}
