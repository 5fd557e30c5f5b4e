//! The protocol table: raw HTTP against the Runtime and Extensions APIs for every endpoint x
//! state x bad input, each row asserting the exact status and body. This is the one place
//! that lists them all.

mod common;

use std::sync::Arc;

use common::*;
use rapid_api::{CoreConfig, ErrorReport, InitializationType, InvokeOutcome, RuntimeCore};
use serde_json::{json, Value};
use tokio::sync::oneshot;

#[derive(Debug, Clone, Copy)]
enum St {
    /// Fresh: the runtime has not called `/next`.
    Init,
    /// Init, one extension `e1` registered (INVOKE), not yet in `event/next`.
    InitExt,
    /// Ten extensions registered.
    TenExt,
    /// The runtime in `/next`, init over; extension `e1` in `event/next`.
    Idle,
    /// The runtime holds invocation `r1`.
    Invoking,
    /// `r1` answered.
    Answered,
    /// The runtime posted `/init/error`.
    InitFailed,
    Closed,
    /// `e1` posted `exit/error` after init.
    ExtExited,
    /// Snap-start, runtime restoring (after `/restore/next` returned).
    Restoring,
}

struct Ctx {
    srv: Server,
    ext: String,
    rx: Option<oneshot::Receiver<InvokeOutcome>>,
}

async fn setup(st: St) -> Ctx {
    let cfg = match st {
        St::Restoring => CoreConfig {
            initialization_type: InitializationType::SnapStart,
            ..config()
        },
        _ => config(),
    };
    let srv = Server::start(cfg).await;
    let core: Arc<RuntimeCore> = srv.core.clone();
    let mut ext = String::new();
    let mut rx = None;
    match st {
        St::Init => {}
        St::InitExt => ext = srv.register("e1", r#"["INVOKE"]"#).await,
        St::TenExt => {
            for i in 0..10 {
                srv.register(&format!("e{i}"), "[]").await;
            }
        }
        St::Idle | St::Invoking | St::Answered | St::ExtExited => {
            ext = srv.register("e1", r#"["INVOKE"]"#).await;
            let _e = srv.ext_next(&ext);
            let next = srv.runtime_next();
            within(core.wait_ready()).await.unwrap();
            if matches!(st, St::Invoking | St::Answered) {
                rx = Some(core.invoke(inv("r1")).unwrap());
                within(next).await.unwrap();
            }
            if matches!(st, St::Answered) {
                core.respond("r1", None, "x".into(), None).unwrap();
            }
            if matches!(st, St::ExtExited) {
                core.extension_exit_error(&ext, "Extension.X", b"").unwrap();
            }
        }
        St::InitFailed => core
            .init_error(ErrorReport::platform("Runtime.X", "x"))
            .unwrap(),
        St::Closed => core.close(),
        St::Restoring => {
            let c = core.clone();
            let waiting = tokio::spawn(async move { c.restore_next().await });
            within(core.wait_ready()).await.unwrap();
            let c = core.clone();
            tokio::spawn(async move { c.restore().await });
            within(waiting).await.unwrap().unwrap();
        }
    }
    Ctx { srv, ext, rx }
}

enum Body {
    Json(Value),
}

struct Row {
    name: &'static str,
    state: St,
    /// Raw request; `{ext}` is replaced by `e1`'s identifier. `Host` and `Connection: close`
    /// are added.
    request: String,
    /// Half-close after sending (a body cut short).
    cut: bool,
    status: u16,
    body: Body,
    /// The error type the pending invocation ends with, when the row decides it.
    outcome_error: Option<&'static str>,
}

fn req(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> String {
    let mut s = format!("{method} {path} HTTP/1.1\r\n");
    for (k, v) in headers {
        s.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method != "GET" {
        s.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    s.push_str("\r\n");
    s.push_str(body);
    s
}

/// A streamed `POST`: chunked, with the streaming response mode and its trailer
/// announcement; `chunks` is the raw chunked body (with trailers).
fn streamed(path: &str, chunks: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nLambda-Runtime-Function-Response-Mode: streaming\r\n\
         Transfer-Encoding: chunked\r\n\
         Trailer: Lambda-Runtime-Function-Error-Type, Lambda-Runtime-Function-Error-Body\r\n\r\n{chunks}"
    )
}

fn err(t: &str, m: &str) -> Body {
    Body::Json(json!({"errorType": t, "errorMessage": m}))
}

const RT: &str = "/2018-06-01/runtime";
const EXT: &str = "/2020-01-01/extension";
const UNKNOWN_ID: &str = "00000000-0000-4000-8000-000000000000";

fn state_error(from: &str, to: &str) -> Body {
    err(
        "InvalidStateTransition",
        &format!("State transition from {from} to {to} failed for runtime. Error: State transition is not allowed"),
    )
}

fn container() -> Body {
    err(
        "ContainerError",
        "Container error. Non-recoverable state. Runtime should exit promptly.",
    )
}

fn accepted() -> Body {
    Body::Json(json!({"status": "OK"}))
}

fn rows() -> Vec<Row> {
    let row = |name, state, request: String, status, body| Row {
        name,
        state,
        request,
        cut: false,
        status,
        body,
        outcome_error: None,
    };
    let next = format!("{RT}/invocation/next");
    let resp = |id: &str| format!("{RT}/invocation/{id}/response");
    let error = |id: &str| format!("{RT}/invocation/{id}/error");
    let oversized = "x".repeat(rapid_api::MAX_RESPONSE_BYTES + 1);
    let id_h = ("Lambda-Extension-Identifier", "{ext}");
    vec![
        // ---- Runtime API: /next ----
        row("next while invoking", St::Invoking, req("GET", &next, &[], ""), 403, state_error("Invoking", "Ready")),
        row("next after init error", St::InitFailed, req("GET", &next, &[], ""), 403, state_error("InitError", "Ready")),
        row("next after close", St::Closed, req("GET", &next, &[], ""), 500, container()),
        row("next after extension exit error", St::ExtExited, req("GET", &next, &[], ""), 500, container()),
        row("next with a wrong method", St::Idle, req("POST", &next, &[], ""), 405,
            err("MethodNotAllowed", "This Runtime API endpoint does not take that method")),
        // ---- /response ----
        Row { outcome_error: None, ..row("response", St::Invoking, req("POST", &resp("r1"), &[], "ok"), 202, accepted()) },
        row("response to an unknown id", St::Invoking, req("POST", &resp("nope"), &[], "ok"), 400, err("InvalidRequestID", "Invalid request ID")),
        row("response with a stale invocation id", St::Invoking,
            req("POST", &resp("r1"), &[("Lambda-Runtime-Invocation-Id", "inv-old")], "ok"), 400,
            err("InvalidRequestID", "Invocation ID does not match the current invocation")),
        row("second response", St::Answered, req("POST", &resp("r1"), &[], "ok"), 403, state_error("Ready", "InvocationResponse")),
        row("response when idle to a never-seen id", St::Idle, req("POST", &resp("r9"), &[], "ok"), 400, err("InvalidRequestID", "Invalid request ID")),
        row("response after close", St::Closed, req("POST", &resp("r1"), &[], "ok"), 500, container()),
        Row { outcome_error: Some("Function.ResponseSizeTooLarge"),
            ..row("oversized response", St::Invoking, req("POST", &resp("r1"), &[], &oversized), 413,
                err("RequestEntityTooLarge", &format!("Exceeded maximum allowed payload size ({} bytes).", rapid_api::MAX_RESPONSE_BYTES))) },
        Row { cut: true, outcome_error: Some("Runtime.TruncatedResponse"),
            ..row("truncated chunked response", St::Invoking,
                format!("POST {} HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", resp("r1")), 400,
                err("TruncatedHTTPRequest", "The request body was cut short")) },
        // ---- streamed /response (Lambda-Runtime-Function-Response-Mode: streaming) ----
        row("streaming response", St::Invoking, streamed(&resp("r1"), "5\r\nhello\r\n0\r\n\r\n"), 202, accepted()),
        Row { outcome_error: Some("Function.StreamError"),
            ..row("streaming response with error trailers", St::Invoking,
                streamed(&resp("r1"), &format!("5\r\nhello\r\n0\r\nLambda-Runtime-Function-Error-Type: Function.StreamError\r\n\
                    Lambda-Runtime-Function-Error-Body: {}\r\n\r\n", "eyJlcnJvck1lc3NhZ2UiOiJib29tIn0=")), 202, accepted()) },
        Row { outcome_error: Some("Runtime.Unknown"),
            ..row("streaming response with a bad error type trailer", St::Invoking,
                streamed(&resp("r1"), "0\r\nLambda-Runtime-Function-Error-Type: oops\r\n\r\n"), 202, accepted()) },
        Row { cut: true, outcome_error: Some("Runtime.TruncatedResponse"),
            ..row("truncated streaming response", St::Invoking, streamed(&resp("r1"), "5\r\nhello\r\n"), 400,
                err("TruncatedHTTPRequest", "The request body was cut short")) },
        Row { outcome_error: Some("Function.ResponseSizeTooLarge"),
            ..row("oversized streaming response to a plain invoke", St::Invoking,
                streamed(&resp("r1"), &format!("{:x}\r\n{oversized}\r\n0\r\n\r\n", oversized.len())), 413,
                err("RequestEntityTooLarge", &format!("Exceeded maximum allowed payload size ({} bytes).", rapid_api::MAX_RESPONSE_BYTES))) },
        row("streaming response to an unknown id", St::Invoking, streamed(&resp("nope"), "0\r\n\r\n"), 400, err("InvalidRequestID", "Invalid request ID")),
        row("second streaming response", St::Answered, streamed(&resp("r1"), "0\r\n\r\n"), 403, state_error("Ready", "InvocationResponse")),
        row("streaming response after close", St::Closed, streamed(&resp("r1"), "0\r\n\r\n"), 500, container()),
        row("bad response mode", St::Invoking, req("POST", &resp("r1"), &[("Lambda-Runtime-Function-Response-Mode", "buffered")], "ok"), 400,
            err("InvalidFunctionResponseMode", "Invalid function response mode: the only valid value is 'streaming'")),
        // ---- /error ----
        Row { outcome_error: Some("Runtime.Unknown"),
            ..row("error with a bad error type", St::Invoking,
                req("POST", &error("r1"), &[("Lambda-Runtime-Function-Error-Type", "bogus")], r#"{"errorMessage":"m"}"#), 202, accepted()) },
        Row { outcome_error: Some("Function.Bad"),
            ..row("error with malformed JSON", St::Invoking,
                req("POST", &error("r1"), &[("Lambda-Runtime-Function-Error-Type", "Function.Bad")], "{not json"), 202, accepted()) },
        row("error to an unknown id", St::Invoking, req("POST", &error("nope"), &[], "{}"), 400, err("InvalidRequestID", "Invalid request ID")),
        row("error after the response", St::Answered, req("POST", &error("r1"), &[], "{}"), 403, state_error("Ready", "InvocationErrorResponse")),
        // ---- /init/error ----
        row("init error during init", St::Init, req("POST", &format!("{RT}/init/error"), &[], "{}"), 202, accepted()),
        row("init error after init", St::Idle, req("POST", &format!("{RT}/init/error"), &[], "{}"), 403, state_error("Ready", "InitError")),
        row("init error after close", St::Closed, req("POST", &format!("{RT}/init/error"), &[], "{}"), 500, container()),
        // ---- restore ----
        row("restore/next without snap-start", St::Init, req("GET", &format!("{RT}/restore/next"), &[], ""), 403, state_error("Init", "RestoreReady")),
        row("restore/next after init", St::Idle, req("GET", &format!("{RT}/restore/next"), &[], ""), 403, state_error("Ready", "RestoreReady")),
        row("restore/error while restoring", St::Restoring, req("POST", &format!("{RT}/restore/error"), &[], "{}"), 202, accepted()),
        row("restore/error when not restoring", St::Idle, req("POST", &format!("{RT}/restore/error"), &[], "{}"), 403, state_error("Ready", "RestoreError")),
        // ---- unknown paths ----
        row("unknown path", St::Idle, req("GET", "/2018-06-01/nothing", &[], ""), 404, err("NotFound", "No such Runtime API endpoint")),
        row("unknown path under invocation", St::Idle, req("GET", &format!("{RT}/invocation/a/b/response"), &[], ""), 404, err("NotFound", "No such Runtime API endpoint")),
        row("unknown API version", St::Idle, req("GET", "/2019-01-01/runtime/invocation/next", &[], ""), 404, err("NotFound", "No such Runtime API endpoint")),
        row("root path", St::Idle, req("GET", "/", &[], ""), 404, err("NotFound", "No such Runtime API endpoint")),
        row("GET on /response", St::Invoking, req("GET", &resp("r1"), &[], ""), 405,
            err("MethodNotAllowed", "This Runtime API endpoint does not take that method")),
        row("GET on extension register", St::Init, req("GET", &format!("{EXT}/register"), &[], ""), 405,
            err("MethodNotAllowed", "This Runtime API endpoint does not take that method")),
        // ---- Extensions API: register ----
        row("register", St::Init, req("POST", &format!("{EXT}/register"), &[("Lambda-Extension-Name", "e1")], r#"{"events":["INVOKE","SHUTDOWN"]}"#), 200,
            Body::Json(json!({"functionName": "f", "functionVersion": "$LATEST", "handler": "h"}))),
        row("register asking for the account id", St::Init,
            req("POST", &format!("{EXT}/register"), &[("Lambda-Extension-Name", "e1"), ("Lambda-Extension-Accept-Feature", "accountId")], r#"{"events":[]}"#), 200,
            Body::Json(json!({"functionName": "f", "functionVersion": "$LATEST", "handler": "h", "accountId": "123456789012"}))),
        row("register without a name", St::Init, req("POST", &format!("{EXT}/register"), &[], r#"{"events":[]}"#), 403,
            err("Extension.InvalidExtensionName", "Empty extension name")),
        row("register with malformed JSON", St::Init, req("POST", &format!("{EXT}/register"), &[("Lambda-Extension-Name", "e1")], "{"), 403,
            err("InvalidRequestFormat", "EOF while parsing an object at line 1 column 1")),
        row("register with a bad event type", St::Init, req("POST", &format!("{EXT}/register"), &[("Lambda-Extension-Name", "e1")], r#"{"events":["BOGUS"]}"#), 403,
            err("Extension.InvalidEventType", "BOGUS: event type is not INVOKE or SHUTDOWN")),
        row("register a taken name", St::InitExt, req("POST", &format!("{EXT}/register"), &[("Lambda-Extension-Name", "e1")], r#"{"events":[]}"#), 403,
            err("Extension.InvalidExtensionState", "Extension with this name already registered")),
        row("register an eleventh extension", St::TenExt, req("POST", &format!("{EXT}/register"), &[("Lambda-Extension-Name", "e10")], r#"{"events":[]}"#), 403,
            err("Extension.TooManyExtensions", "Extension limit (10) reached")),
        row("register after the runtime's first next", St::Idle, req("POST", &format!("{EXT}/register"), &[("Lambda-Extension-Name", "late")], r#"{"events":[]}"#), 403,
            err("Extension.RegistrationClosed", "Extension registration closed already")),
        row("register after close", St::Closed, req("POST", &format!("{EXT}/register"), &[("Lambda-Extension-Name", "e1")], r#"{"events":[]}"#), 500, container()),
        // ---- event/next ----
        row("event/next without an identifier", St::InitExt, req("GET", &format!("{EXT}/event/next"), &[], ""), 403,
            err("Extension.MissingExtensionIdentifier", "Missing Lambda-Extension-Identifier header")),
        row("event/next with a malformed identifier", St::InitExt, req("GET", &format!("{EXT}/event/next"), &[("Lambda-Extension-Identifier", "not-a-uuid")], ""), 403,
            err("Extension.InvalidExtensionIdentifier", "Invalid Lambda-Extension-Identifier")),
        row("event/next with an unknown identifier", St::InitExt, req("GET", &format!("{EXT}/event/next"), &[("Lambda-Extension-Identifier", UNKNOWN_ID)], ""), 403,
            err("Extension.UnknownExtensionIdentifier", &format!("Unknown extension {UNKNOWN_ID}"))),
        row("event/next after exit/error", St::ExtExited, req("GET", &format!("{EXT}/event/next"), &[id_h], ""), 403,
            err("Extension.InvalidExtensionState", "State transition from ExitError to Ready failed for extension {ext}. Error: State transition is not allowed")),
        row("event/next after close", St::Closed, req("GET", &format!("{EXT}/event/next"), &[("Lambda-Extension-Identifier", UNKNOWN_ID)], ""), 500, container()),
        // ---- init/error ----
        row("extension init/error", St::InitExt, req("POST", &format!("{EXT}/init/error"), &[id_h, ("Lambda-Extension-Function-Error-Type", "Extension.Bad")], ""), 202, accepted()),
        row("extension init/error without an error type", St::InitExt, req("POST", &format!("{EXT}/init/error"), &[id_h], ""), 403,
            err("Extension.MissingHeader", "Lambda-Extension-Function-Error-Type not found")),
        row("extension init/error without an identifier", St::InitExt, req("POST", &format!("{EXT}/init/error"), &[("Lambda-Extension-Function-Error-Type", "Extension.Bad")], ""), 403,
            err("Extension.MissingExtensionIdentifier", "Missing Lambda-Extension-Identifier header")),
        row("extension init/error with an unknown identifier", St::InitExt,
            req("POST", &format!("{EXT}/init/error"), &[("Lambda-Extension-Identifier", UNKNOWN_ID), ("Lambda-Extension-Function-Error-Type", "Extension.Bad")], ""), 403,
            err("Extension.UnknownExtensionIdentifier", "Unknown Lambda-Extension-Identifier")),
        row("extension init/error after init", St::Idle, req("POST", &format!("{EXT}/init/error"), &[id_h, ("Lambda-Extension-Function-Error-Type", "Extension.Bad")], ""), 403,
            err("Extension.InvalidExtensionState", "State transition from Ready to InitError failed for extension {ext}. Error: State transition is not allowed")),
        // ---- exit/error ----
        row("extension exit/error", St::Idle, req("POST", &format!("{EXT}/exit/error"), &[id_h, ("Lambda-Extension-Function-Error-Type", "Extension.Bad")], ""), 202, accepted()),
        row("extension exit/error twice", St::ExtExited, req("POST", &format!("{EXT}/exit/error"), &[id_h, ("Lambda-Extension-Function-Error-Type", "Extension.Bad")], ""), 403,
            err("Extension.InvalidExtensionState", "State transition from ExitError to ExitError failed for extension {ext}. Error: State transition is not allowed")),
        row("extension exit/error without an error type", St::Idle, req("POST", &format!("{EXT}/exit/error"), &[id_h], ""), 403,
            err("Extension.MissingHeader", "Lambda-Extension-Function-Error-Type not found")),
        row("extension exit/error after close", St::Closed,
            req("POST", &format!("{EXT}/exit/error"), &[("Lambda-Extension-Identifier", UNKNOWN_ID), ("Lambda-Extension-Function-Error-Type", "Extension.Bad")], ""), 500, container()),
        // ---- Telemetry / Logs subscription identifiers ----
        row("telemetry without an identifier", St::InitExt, req("PUT", "/2022-07-01/telemetry", &[], "{}"), 403,
            err("Extension.MissingExtensionIdentifier", "Missing Lambda-Extension-Identifier header")),
        row("logs with a malformed identifier", St::InitExt, req("PUT", "/2020-08-15/logs", &[("Lambda-Extension-Identifier", "x")], "{}"), 403,
            err("Extension.InvalidExtensionIdentifier", "Invalid Lambda-Extension-Identifier")),
        row("telemetry with malformed JSON", St::InitExt, req("PUT", "/2022-07-01/telemetry", &[id_h], "{"), 400,
            err("ValidationError", "request body is not valid JSON: EOF while parsing an object at line 1 column 1")),
    ]
}

#[tokio::test]
async fn protocol_table() {
    let mut failures = Vec::new();
    for row in rows() {
        let mut ctx = setup(row.state).await;
        let request = row.request.replace("{ext}", &ctx.ext);
        let (head, body) = request.split_once("\r\n").unwrap();
        let request = format!("{head}\r\nHost: api\r\nConnection: close\r\n{body}");
        let answer = raw_exchange(ctx.srv.addr, request.as_bytes(), row.cut).await;
        let (status, text) = parse_raw(&answer);
        let expected = match &row.body {
            Body::Json(v) => {
                let s = v.to_string().replace("{ext}", &ctx.ext);
                let got: Value = serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
                (got == serde_json::from_str::<Value>(&s).unwrap(), s)
            }
        };
        if status != row.status || !expected.0 {
            failures.push(format!(
                "{}: expected {} {}, got {} {}",
                row.name, row.status, expected.1, status, text
            ));
            continue;
        }
        if let Some(want) = row.outcome_error {
            match within(ctx.rx.take().expect("row needs an invocation")).await {
                Ok(InvokeOutcome::Error(r)) if r.error_type == want => {}
                other => failures.push(format!("{}: outcome {other:?}, expected {want}", row.name)),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
