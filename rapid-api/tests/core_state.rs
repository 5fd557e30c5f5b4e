//! Tests of the transport-neutral `RuntimeCore` state machine: the platform side (`invoke`,
//! `wait_ready`, `close`, `lifecycle`) against the runtime side (`next`, `respond`, `error`,
//! `init_error`, `respond_too_large`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rapid_api::{
    ApiError, CoreError, ErrorReport, Invocation, InvokeOutcome, Lifecycle, RuntimeCore,
    MAX_RESPONSE_BYTES,
};
use tokio::sync::oneshot;

/// Upper bound for anything that is expected to complete.
const LIMIT: Duration = Duration::from_secs(5);
/// How long to wait to conclude that something stays blocked.
const SHORT: Duration = Duration::from_millis(100);

fn inv(request_id: &str) -> Invocation {
    Invocation {
        request_id: request_id.to_string(),
        invocation_id: format!("inv-{request_id}"),
        deadline_ms: 1_700_000_000_000,
        function_arn: "arn:aws:lambda:us-east-1:123456789012:function:f".to_string(),
        trace_id: Some("Root=1-00000000-000000000000000000000000".to_string()),
        client_context: None,
        cognito_identity: None,
        tenant_id: None,
        content_type: "application/json".to_string(),
        payload: Bytes::from_static(br#"{"hello":"world"}"#),
    }
}

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f)
        .await
        .expect("operation did not complete in time")
}

async fn outcome(rx: oneshot::Receiver<InvokeOutcome>) -> InvokeOutcome {
    within(rx).await.expect("outcome sender was dropped")
}

fn response_body(o: &InvokeOutcome) -> &Bytes {
    match o {
        InvokeOutcome::Response { body, .. } => body,
        other => panic!("expected a response outcome, got {other:?}"),
    }
}

fn error_report(o: InvokeOutcome) -> ErrorReport {
    match o {
        InvokeOutcome::Error(r) => r,
        other => panic!("expected an error outcome, got {other:?}"),
    }
}

fn assert_api_error(e: ApiError, status: u16, error_type: &str) {
    assert_eq!(e.status, status, "unexpected status for {e:?}");
    assert_eq!(e.error_type, error_type, "unexpected error type for {e:?}");
}

/// Brings the core to `Invoking` with the given request id; returns the outcome receiver.
async fn start(core: &RuntimeCore, id: &str) -> oneshot::Receiver<InvokeOutcome> {
    let rx = core.invoke(inv(id)).expect("invoke");
    let got = within(core.next()).await.expect("next");
    assert_eq!(got.request_id, id);
    rx
}

fn report(error_type: &str, message: &str) -> ErrorReport {
    ErrorReport::platform(error_type, message)
}

// ---- init and delivery ----

#[tokio::test]
async fn invoke_before_first_next_is_queued_and_delivered() {
    let core = RuntimeCore::new();
    let rx = core.invoke(inv("req-1")).expect("invoke during init");
    assert!(core.is_busy(), "a queued invocation makes the core busy");
    assert_eq!(*core.lifecycle().borrow(), Lifecycle::Initializing);

    let got = within(core.next()).await.expect("next");
    assert_eq!(got.request_id, "req-1");
    assert_eq!(got.invocation_id, "inv-req-1");
    assert_eq!(got.deadline_ms, 1_700_000_000_000);
    assert_eq!(got.payload, Bytes::from_static(br#"{"hello":"world"}"#));
    assert_eq!(got.content_type, "application/json");
    assert_eq!(*core.lifecycle().borrow(), Lifecycle::Ready);

    core.respond(
        "req-1",
        Some("inv-req-1"),
        Bytes::from_static(b"\"ok\""),
        Some("application/json".into()),
    )
    .expect("respond");
    assert_eq!(
        outcome(rx).await,
        InvokeOutcome::Response {
            body: Bytes::from_static(b"\"ok\""),
            content_type: Some("application/json".into()),
        }
    );
    assert!(!core.is_busy());
}

#[tokio::test]
async fn next_blocks_until_invoke() {
    let core = RuntimeCore::new();
    let runtime = {
        let core = core.clone();
        tokio::spawn(async move { core.next().await })
    };
    // The runtime is parked in next; nothing is delivered yet.
    within(core.wait_ready()).await.expect("ready");
    tokio::time::sleep(SHORT).await;
    assert!(
        !runtime.is_finished(),
        "next returned without an invocation"
    );

    let rx = core.invoke(inv("req-2")).expect("invoke");
    let got = within(runtime).await.unwrap().expect("next");
    assert_eq!(got.request_id, "req-2");

    core.respond("req-2", None, Bytes::from_static(b"done"), None)
        .expect("respond without invocation id");
    let o = outcome(rx).await;
    assert_eq!(response_body(&o), &Bytes::from_static(b"done"));
    assert_eq!(
        o,
        InvokeOutcome::Response {
            body: Bytes::from_static(b"done"),
            content_type: None
        }
    );
}

#[tokio::test]
async fn wait_ready_resolves_on_first_next() {
    let core = RuntimeCore::new();
    let waiter = {
        let core = core.clone();
        tokio::spawn(async move { core.wait_ready().await })
    };
    tokio::time::sleep(SHORT).await;
    assert!(!waiter.is_finished(), "wait_ready resolved before any next");

    let runtime = {
        let core = core.clone();
        tokio::spawn(async move { core.next().await })
    };
    within(waiter)
        .await
        .unwrap()
        .expect("wait_ready after first next");
    assert_eq!(*core.lifecycle().borrow(), Lifecycle::Ready);
    // Already ready: resolves at once.
    within(core.wait_ready()).await.expect("second wait_ready");

    core.close();
    assert_api_error(
        within(runtime).await.unwrap().unwrap_err(),
        500,
        "ContainerError",
    );
}

#[tokio::test]
async fn lifecycle_watch_sees_ready_then_closed() {
    let core = RuntimeCore::new();
    let mut watch = core.lifecycle();
    assert_eq!(*watch.borrow_and_update(), Lifecycle::Initializing);

    let _rx = core.invoke(inv("a")).unwrap();
    within(core.next()).await.unwrap();
    within(watch.changed()).await.unwrap();
    assert_eq!(*watch.borrow_and_update(), Lifecycle::Ready);

    core.close();
    within(watch.changed()).await.unwrap();
    assert_eq!(*watch.borrow_and_update(), Lifecycle::Closed);
}

// ---- init errors ----

#[tokio::test]
async fn init_error_before_next_fails_wait_ready_and_pending_invocation() {
    let core = RuntimeCore::new();
    let waiter = {
        let core = core.clone();
        tokio::spawn(async move { core.wait_ready().await })
    };
    let rx = core.invoke(inv("req-init")).expect("invoke during init");

    let rep = report("Runtime.ImportModuleError", "no module named handler");
    core.init_error(rep.clone())
        .expect("init_error during init");

    match within(waiter).await.unwrap() {
        Err(CoreError::InitFailed(r)) => assert_eq!(r, rep),
        other => panic!("expected InitFailed, got {other:?}"),
    }
    assert_eq!(error_report(outcome(rx).await), rep);
    assert_eq!(
        *core.lifecycle().borrow(),
        Lifecycle::InitFailed(rep.clone())
    );
    assert!(!core.is_busy(), "the pending invocation was consumed");

    // Later invocations get the init error right away.
    match core.invoke(inv("req-later")) {
        Err(CoreError::InitFailed(r)) => assert_eq!(r, rep),
        other => panic!("expected InitFailed, got {other:?}"),
    }
    // And the runtime may not go on to next.
    assert_api_error(
        within(core.next()).await.unwrap_err(),
        403,
        "InvalidStateTransition",
    );
    // A second init error is a state error too.
    assert_api_error(
        core.init_error(report("Runtime.Other", "again"))
            .unwrap_err(),
        403,
        "InvalidStateTransition",
    );
}

#[tokio::test]
async fn init_error_without_pending_invocation_goes_to_first_invoke() {
    let core = RuntimeCore::new();
    let rep = report("Runtime.ExitError", "exit status 1");
    core.init_error(rep.clone()).unwrap();
    match within(core.wait_ready()).await {
        Err(CoreError::InitFailed(r)) => assert_eq!(r.error_type, "Runtime.ExitError"),
        other => panic!("expected InitFailed, got {other:?}"),
    }
    match core.invoke(inv("first")) {
        Err(CoreError::InitFailed(r)) => assert_eq!(r, rep),
        other => panic!("expected InitFailed, got {other:?}"),
    }
}

#[tokio::test]
async fn init_error_after_next_is_invalid_state_transition() {
    let core = RuntimeCore::new();
    // Runtime idle in next.
    let runtime = {
        let core = core.clone();
        tokio::spawn(async move { core.next().await })
    };
    within(core.wait_ready()).await.unwrap();
    let e = core
        .init_error(report("Runtime.Late", "too late"))
        .unwrap_err();
    assert_api_error(e.clone(), 403, "InvalidStateTransition");
    assert!(e.message.contains("InitError"), "message: {}", e.message);
    assert_eq!(*core.lifecycle().borrow(), Lifecycle::Ready);

    // The core still works.
    let rx = core.invoke(inv("x")).unwrap();
    let got = within(runtime).await.unwrap().unwrap();
    assert_eq!(got.request_id, "x");

    // And during an invocation, too.
    assert_api_error(
        core.init_error(report("Runtime.Late", "too late"))
            .unwrap_err(),
        403,
        "InvalidStateTransition",
    );
    core.respond("x", None, Bytes::from_static(b"1"), None)
        .unwrap();
    assert_eq!(response_body(&outcome(rx).await), &Bytes::from_static(b"1"));
}

// ---- answering ----

#[tokio::test]
async fn respond_with_unknown_request_id_is_invalid_request_id() {
    let core = RuntimeCore::new();
    // Before any invocation.
    assert_api_error(
        core.respond("nope", None, Bytes::new(), None).unwrap_err(),
        400,
        "InvalidRequestID",
    );
    assert_api_error(
        core.error("nope", None, report("Function.X", "x"))
            .unwrap_err(),
        400,
        "InvalidRequestID",
    );

    let rx = start(&core, "real").await;
    assert_api_error(
        core.respond("other", None, Bytes::new(), None).unwrap_err(),
        400,
        "InvalidRequestID",
    );
    assert_api_error(
        core.error("other", None, report("Function.X", "x"))
            .unwrap_err(),
        400,
        "InvalidRequestID",
    );
    // The real invocation is still held and answerable.
    assert!(core.is_busy());
    core.respond("real", None, Bytes::from_static(b"r"), None)
        .unwrap();
    assert_eq!(response_body(&outcome(rx).await), &Bytes::from_static(b"r"));
}

#[tokio::test]
async fn second_answer_to_same_id_is_invalid_state_transition() {
    let core = RuntimeCore::new();
    let rx = start(&core, "dup").await;
    core.respond("dup", Some("inv-dup"), Bytes::from_static(b"first"), None)
        .unwrap();
    assert_eq!(
        response_body(&outcome(rx).await),
        &Bytes::from_static(b"first")
    );

    assert_api_error(
        core.respond("dup", Some("inv-dup"), Bytes::from_static(b"second"), None)
            .unwrap_err(),
        403,
        "InvalidStateTransition",
    );
    assert_api_error(
        core.error("dup", None, report("Function.Late", "late"))
            .unwrap_err(),
        403,
        "InvalidStateTransition",
    );
    assert_api_error(
        core.respond_too_large("dup", None).unwrap_err(),
        403,
        "InvalidStateTransition",
    );

    // Still refused once the runtime holds the next invocation.
    let rx2 = start(&core, "next-one").await;
    assert_api_error(
        core.respond("dup", None, Bytes::new(), None).unwrap_err(),
        403,
        "InvalidStateTransition",
    );
    core.respond("next-one", None, Bytes::from_static(b"2"), None)
        .unwrap();
    assert_eq!(
        response_body(&outcome(rx2).await),
        &Bytes::from_static(b"2")
    );
}

#[tokio::test]
async fn second_answer_after_error_is_invalid_state_transition() {
    let core = RuntimeCore::new();
    let rx = start(&core, "e").await;
    let rep = ErrorReport::from_runtime(
        "Function.MyError".into(),
        br#"{"errorMessage":"bad","errorType":"MyError"}"#,
        Some("cause".into()),
    );
    core.error("e", Some("inv-e"), rep.clone()).unwrap();
    let got = error_report(outcome(rx).await);
    assert_eq!(got, rep);
    assert_eq!(got.xray_cause.as_deref(), Some("cause"));

    assert_api_error(
        core.respond("e", None, Bytes::new(), None).unwrap_err(),
        403,
        "InvalidStateTransition",
    );
}

#[tokio::test]
async fn mismatching_invocation_id_is_refused_and_invocation_still_answerable() {
    let core = RuntimeCore::new();
    let rx = start(&core, "r1").await;

    let e = core
        .respond("r1", Some("inv-stale"), Bytes::from_static(b"late"), None)
        .unwrap_err();
    assert!(
        (400..500).contains(&e.status),
        "a stale invocation id must be refused with a 4xx, got {e:?}"
    );
    let e = core
        .error("r1", Some("inv-stale"), report("Function.Late", "late"))
        .unwrap_err();
    assert!((400..500).contains(&e.status), "got {e:?}");
    let e = core.respond_too_large("r1", Some("inv-stale")).unwrap_err();
    assert_ne!(
        e.error_type, "RequestEntityTooLarge",
        "a stale too-large response must not fail the live invocation"
    );

    // The refusals did not complete the invocation.
    assert!(core.is_busy());
    let mut rx = rx;
    assert!(matches!(
        rx.try_recv(),
        Err(oneshot::error::TryRecvError::Empty)
    ));

    core.respond("r1", Some("inv-r1"), Bytes::from_static(b"right"), None)
        .expect("answer with the right invocation id");
    assert_eq!(
        response_body(&outcome(rx).await),
        &Bytes::from_static(b"right")
    );
}

#[tokio::test]
async fn error_outcome_reaches_platform() {
    let core = RuntimeCore::new();
    let rx = start(&core, "err").await;
    let rep = report("Function.Boom", "boom");
    core.error("err", Some("inv-err"), rep.clone()).unwrap();
    let got = error_report(outcome(rx).await);
    assert_eq!(got, rep);
    let v: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(v["errorType"], "Function.Boom");
    assert_eq!(v["errorMessage"], "boom");
    assert!(!core.is_busy());
}

#[tokio::test]
async fn respond_too_large_yields_response_size_too_large() {
    let core = RuntimeCore::new();
    let rx = start(&core, "big").await;
    let e = core.respond_too_large("big", Some("inv-big")).unwrap_err();
    assert_api_error(e, 413, "RequestEntityTooLarge");

    let rep = error_report(outcome(rx).await);
    assert_eq!(rep.error_type, "Function.ResponseSizeTooLarge");
    let v: serde_json::Value = serde_json::from_slice(&rep.body).unwrap();
    assert_eq!(v["errorType"], "Function.ResponseSizeTooLarge");
    assert!(
        v["errorMessage"]
            .as_str()
            .unwrap()
            .contains(&MAX_RESPONSE_BYTES.to_string()),
        "message should name the limit: {v}"
    );

    // The invocation is over: a second answer is a state error, and a new invoke works.
    assert_api_error(
        core.respond("big", None, Bytes::new(), None).unwrap_err(),
        403,
        "InvalidStateTransition",
    );
    assert!(!core.is_busy());
    let rx2 = start(&core, "small").await;
    core.respond("small", None, Bytes::from_static(b"ok"), None)
        .unwrap();
    assert_eq!(
        response_body(&outcome(rx2).await),
        &Bytes::from_static(b"ok")
    );
}

#[tokio::test]
async fn respond_too_large_with_unknown_id_is_invalid_request_id() {
    let core = RuntimeCore::new();
    let rx = start(&core, "live").await;
    assert_api_error(
        core.respond_too_large("ghost", None).unwrap_err(),
        400,
        "InvalidRequestID",
    );
    assert!(core.is_busy());
    core.respond("live", None, Bytes::new(), None).unwrap();
    assert!(matches!(outcome(rx).await, InvokeOutcome::Response { .. }));
}

// ---- one invocation at a time ----

#[tokio::test]
async fn next_while_holding_an_invocation_is_forbidden() {
    let core = RuntimeCore::new();
    let rx = start(&core, "held").await;
    let e = within(core.next()).await.unwrap_err();
    assert_api_error(e.clone(), 403, "InvalidStateTransition");
    assert!(e.message.contains("Invoking"), "message: {}", e.message);

    // The held invocation is untouched.
    core.respond("held", None, Bytes::from_static(b"h"), None)
        .unwrap();
    assert_eq!(response_body(&outcome(rx).await), &Bytes::from_static(b"h"));
}

#[tokio::test]
async fn second_invoke_is_busy_while_one_is_queued_or_running() {
    let core = RuntimeCore::new();
    let rx1 = core.invoke(inv("one")).unwrap();
    assert!(matches!(core.invoke(inv("two")), Err(CoreError::Busy)));

    let got = within(core.next()).await.unwrap();
    assert_eq!(
        got.request_id, "one",
        "the first invocation is the one kept"
    );
    assert!(core.is_busy());
    assert!(matches!(core.invoke(inv("two")), Err(CoreError::Busy)));

    core.respond("one", None, Bytes::from_static(b"1"), None)
        .unwrap();
    assert_eq!(
        response_body(&outcome(rx1).await),
        &Bytes::from_static(b"1")
    );
    assert!(!core.is_busy());

    // Idle again: the next invoke is accepted.
    let rx2 = start(&core, "two").await;
    core.respond("two", None, Bytes::from_static(b"2"), None)
        .unwrap();
    assert_eq!(
        response_body(&outcome(rx2).await),
        &Bytes::from_static(b"2")
    );
}

#[tokio::test]
async fn many_invocations_in_sequence() {
    let core = RuntimeCore::new();
    let runtime = {
        let core = core.clone();
        tokio::spawn(async move {
            let mut served = 0;
            while let Ok(inv) = core.next().await {
                let mut body = b"echo:".to_vec();
                body.extend_from_slice(&inv.payload);
                core.respond(&inv.request_id, Some(&inv.invocation_id), body.into(), None)
                    .unwrap();
                served += 1;
            }
            served
        })
    };
    for i in 0..20 {
        let id = format!("seq-{i}");
        let mut invocation = inv(&id);
        invocation.payload = Bytes::from(i.to_string());
        let rx = core.invoke(invocation).unwrap();
        let o = outcome(rx).await;
        assert_eq!(response_body(&o), &Bytes::from(format!("echo:{i}")));
    }
    core.close();
    assert_eq!(within(runtime).await.unwrap(), 20);
}

// ---- close ----

#[tokio::test]
async fn close_fails_blocked_next_with_container_error() {
    let core = RuntimeCore::new();
    let runtime = {
        let core = core.clone();
        tokio::spawn(async move { core.next().await })
    };
    within(core.wait_ready()).await.unwrap();
    core.close();
    let e = within(runtime).await.unwrap().unwrap_err();
    assert_api_error(e.clone(), 500, "ContainerError");
    assert_eq!(
        e.message,
        "Container error. Non-recoverable state. Runtime should exit promptly."
    );
    // Future nexts too.
    assert_api_error(
        within(core.next()).await.unwrap_err(),
        500,
        "ContainerError",
    );
    assert_eq!(*core.lifecycle().borrow(), Lifecycle::Closed);
}

#[tokio::test]
async fn close_drops_pending_invocation_outcome() {
    let core = RuntimeCore::new();
    let rx = core.invoke(inv("pending")).unwrap();
    core.close();
    assert!(
        within(rx).await.is_err(),
        "the receiver of a queued invocation must error on close"
    );
    assert!(!core.is_busy());
    assert!(matches!(core.invoke(inv("after")), Err(CoreError::Closed)));
    assert!(matches!(
        within(core.wait_ready()).await,
        Err(CoreError::Closed)
    ));
}

#[tokio::test]
async fn close_drops_running_invocation_outcome_and_refuses_answers() {
    let core = RuntimeCore::new();
    let rx = start(&core, "running").await;
    core.close();
    assert!(
        within(rx).await.is_err(),
        "the receiver of a running invocation must error on close"
    );
    assert!(!core.is_busy());
    assert_api_error(
        core.respond("running", None, Bytes::new(), None)
            .unwrap_err(),
        500,
        "ContainerError",
    );
    assert_api_error(
        core.error("running", None, report("Function.X", "x"))
            .unwrap_err(),
        500,
        "ContainerError",
    );
    assert_api_error(
        core.init_error(report("Runtime.X", "x")).unwrap_err(),
        500,
        "ContainerError",
    );
}

#[tokio::test]
async fn close_during_init_fails_wait_ready() {
    let core = RuntimeCore::new();
    let waiter = {
        let core = core.clone();
        tokio::spawn(async move { core.wait_ready().await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    core.close();
    assert!(matches!(
        within(waiter).await.unwrap(),
        Err(CoreError::Closed)
    ));
}

// ---- cancel safety ----

#[tokio::test]
async fn next_is_cancel_safe() {
    let core = RuntimeCore::new();
    // A runtime whose /next connection goes away mid-wait.
    let r = tokio::time::timeout(SHORT, core.next()).await;
    assert!(r.is_err(), "next returned without an invocation: {r:?}");

    let rx = core.invoke(inv("after-cancel")).unwrap();
    let got = within(core.next())
        .await
        .expect("next after a cancelled next");
    assert_eq!(got.request_id, "after-cancel");
    core.respond("after-cancel", None, Bytes::from_static(b"ok"), None)
        .unwrap();
    assert_eq!(
        response_body(&outcome(rx).await),
        &Bytes::from_static(b"ok")
    );
}

#[tokio::test]
async fn next_cancelled_after_wake_does_not_lose_invocation() {
    let core = RuntimeCore::new();
    let runtime = {
        let core = core.clone();
        tokio::spawn(async move { core.next().await })
    };
    within(core.wait_ready()).await.unwrap();
    // Abort the waiting next, racing with the wake-up of an invoke.
    let rx = core.invoke(inv("race")).unwrap();
    runtime.abort();
    let first = runtime.await;
    let got = match first {
        // The aborted next won the race and took the invocation: it was delivered.
        Ok(Ok(inv)) => inv,
        // It was cancelled first: the invocation must still be there for the next caller.
        Err(e) if e.is_cancelled() => within(core.next()).await.unwrap(),
        other => panic!("unexpected: {other:?}"),
    };
    assert_eq!(got.request_id, "race");
    core.respond("race", None, Bytes::new(), None).unwrap();
    assert!(matches!(outcome(rx).await, InvokeOutcome::Response { .. }));
}

#[tokio::test]
async fn two_concurrent_nexts_deliver_the_invocation_once() {
    let core: Arc<RuntimeCore> = RuntimeCore::new();
    let a = {
        let core = core.clone();
        tokio::spawn(async move { core.next().await })
    };
    let b = {
        let core = core.clone();
        tokio::spawn(async move { core.next().await })
    };
    within(core.wait_ready()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let rx = core.invoke(inv("once")).unwrap();
    let ra = within(a).await.unwrap();
    let rb = within(b).await.unwrap();
    let delivered = [&ra, &rb].iter().filter(|r| r.is_ok()).count();
    assert_eq!(delivered, 1, "a: {ra:?}, b: {rb:?}");
    let loser = if ra.is_ok() { rb } else { ra };
    assert_api_error(loser.unwrap_err(), 403, "InvalidStateTransition");
    core.respond("once", None, Bytes::new(), None).unwrap();
    assert!(matches!(outcome(rx).await, InvokeOutcome::Response { .. }));
}

// ---- reports ----

#[test]
fn error_report_from_runtime_wraps_non_json_and_keeps_objects() {
    let r = ErrorReport::from_runtime("Runtime.Unknown".into(), b"", None);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v, serde_json::json!({ "errorType": "Runtime.Unknown" }));

    // JSON that is not an object is wrapped as text.
    let r = ErrorReport::from_runtime("Function.Oops".into(), b"[1,2]", None);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["errorMessage"], "[1,2]");
    assert_eq!(v["errorType"], "Function.Oops");

    let r = ErrorReport::from_runtime(
        "Function.Oops".into(),
        br#"{"errorMessage":"m","errorType":"E","stackTrace":["a"],"errorCause":"c"}"#,
        None,
    );
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"errorMessage":"m","errorType":"E","stackTrace":["a"]})
    );
    assert_eq!(r.error_type, "Function.Oops");
}

#[test]
fn error_type_normalisation() {
    use rapid_api::error_type::normalise;
    assert_eq!(
        normalise(Some("Runtime.ImportModuleError")),
        "Runtime.ImportModuleError"
    );
    assert_eq!(normalise(Some("Function.MyError")), "Function.MyError");
    assert_eq!(normalise(Some("Function.Ab")), "Function.Ab");
    assert_eq!(normalise(Some("ValueError")), "Runtime.Unknown");
    assert_eq!(normalise(Some("Function.Bad1")), "Function.Unknown");
    assert_eq!(normalise(Some("Function.")), "Function.Unknown");
    assert_eq!(normalise(Some("Function.A")), "Function.Unknown");
    assert_eq!(normalise(Some("Function.My_Error")), "Function.Unknown");
    assert_eq!(normalise(Some("Function.Fooé")), "Function.Unknown");
    assert_eq!(normalise(Some("Runtime.bad")), "Runtime.Unknown");
    assert_eq!(normalise(Some("Runtime.A.B")), "Runtime.Unknown");
    assert_eq!(normalise(Some("runtime.Foo")), "Runtime.Unknown");
    assert_eq!(normalise(Some("Extension.Crash")), "Runtime.Unknown");
    assert_eq!(normalise(Some("")), "Runtime.Unknown");
    assert_eq!(normalise(None), "Runtime.Unknown");
}
