//! The Extensions API end to end: a real extension process (a shell script using curl) and
//! extensions driven over HTTP, with the runtime side driven over real HTTP too.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use rapid_api::{CoreError, InitializationType, InvokeOutcome, ShutdownReason};
use serde_json::{json, Value};

/// Registers for INVOKE and SHUTDOWN, then waits for `go-init` before its first `event/next`;
/// each event is appended to `events`; after the n-th event it waits for `release-n` before
/// asking for the next one; it exits after SHUTDOWN.
const EXTENSION_SCRIPT: &str = r#"#!/bin/sh
set -eu
DIR="$1"
API="http://$AWS_LAMBDA_RUNTIME_API/2020-01-01/extension"
curl -sS -D "$DIR/reg.h" -o "$DIR/reg.body" -X POST "$API/register" \
  -H "Lambda-Extension-Name: ext1" -d '{"events":["INVOKE","SHUTDOWN"]}'
ID=$(grep -i '^lambda-extension-identifier:' "$DIR/reg.h" | cut -d' ' -f2 | tr -d '\r')
echo "$ID" > "$DIR/id"
while [ ! -e "$DIR/go-init" ]; do sleep 0.02; done
n=0
while true; do
  EV=$(curl -sS -H "Lambda-Extension-Identifier: $ID" "$API/event/next")
  echo "$EV" >> "$DIR/events"
  case "$EV" in *SHUTDOWN*) exit 0 ;; esac
  n=$((n+1))
  while [ ! -e "$DIR/release-$n" ]; do sleep 0.02; done
done
"#;

async fn wait_for_file(p: &Path) {
    within(async {
        while !p.exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

async fn events_file(dir: &Path, count: usize) -> Vec<Value> {
    within(async {
        loop {
            let text = std::fs::read_to_string(dir.join("events")).unwrap_or_default();
            let lines: Vec<Value> = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            if lines.len() >= count {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

fn touch(p: &Path) {
    std::fs::write(p, b"").unwrap();
}

#[tokio::test]
async fn extension_process_takes_part_in_init_invokes_and_shutdown() {
    let srv = Server::start(config()).await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("ext1");
    std::fs::write(&script, EXTENSION_SCRIPT).unwrap();
    let mut child = tokio::process::Command::new("sh")
        .arg(&script)
        .arg(dir.path())
        .env("AWS_LAMBDA_RUNTIME_API", srv.addr.to_string())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for_file(&dir.path().join("id")).await;
    let reg: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("reg.body")).unwrap()).unwrap();
    assert_eq!(
        reg,
        json!({"functionName": "f", "functionVersion": "$LATEST", "handler": "h"})
    );

    // The runtime is in /next, the extension is not yet: init is not over.
    let mut next1 = srv.runtime_next();
    let mut ready = Box::pin(srv.core.wait_ready());
    stays_pending(&mut ready).await;
    touch(&dir.path().join("go-init"));
    within(ready).await.unwrap();

    // Invocation 1 goes to the runtime and, as INVOKE, to the extension.
    let rx1 = srv.core.invoke(inv("r1")).unwrap();
    let (status, id) = within(&mut next1).await.unwrap();
    assert_eq!((status, id.as_str()), (200, "r1"));
    let ev = &events_file(dir.path(), 1).await[0];
    assert_eq!(
        ev,
        &json!({
            "eventType": "INVOKE",
            "deadlineMs": 1_700_000_123_456u64,
            "requestId": "r1",
            "invokedFunctionArn": "arn:aws:lambda:us-east-1:123456789012:function:f",
            "tracing": {"type": "X-Amzn-Trace-Id", "value": "Root=1-5f35ae12-0c0fec141ab77a00bc047aa2;Sampled=1"},
        })
    );
    let mut next2 = srv.runtime_next();
    assert_eq!(srv.respond("r1", "one").await, 202);
    // The caller has its answer; the invoke phase is not over while the extension works.
    assert!(matches!(outcome(rx1).await, InvokeOutcome::Response { .. }));
    let mut idle = Box::pin(srv.core.wait_idle());
    stays_pending(&mut idle).await;
    drop(idle);
    // Invocation 2 is queued but not delivered until the extension is back in event/next.
    let rx2 = srv.core.invoke(inv("r2")).unwrap();
    stays_pending(&mut next2).await;
    touch(&dir.path().join("release-1"));
    let (status, id) = within(&mut next2).await.unwrap();
    assert_eq!((status, id.as_str()), (200, "r2"));
    assert_eq!(events_file(dir.path(), 2).await[1]["requestId"], "r2");
    assert_eq!(srv.respond("r2", "two").await, 202);
    assert!(matches!(outcome(rx2).await, InvokeOutcome::Response { .. }));
    touch(&dir.path().join("release-2"));
    within(srv.core.wait_idle()).await.unwrap();

    // Shutdown: the embedding reports the process's exit as its acknowledgement.
    let core = srv.core.clone();
    let watcher = tokio::spawn(async move {
        let status = child.wait().await.unwrap();
        core.extension_exited("ext1");
        status
    });
    let before = std::time::SystemTime::now();
    let report = within(srv.core.shutdown(
        ShutdownReason::Spindown,
        Instant::now() + Duration::from_secs(5),
    ))
    .await;
    assert_eq!(report.acknowledged, vec!["ext1".to_string()]);
    assert!(report.timed_out.is_empty());
    assert!(within(watcher).await.unwrap().success());
    let ev = events_file(dir.path(), 3).await[2].clone();
    assert_eq!(ev["eventType"], "SHUTDOWN");
    assert_eq!(ev["shutdownReason"], "spindown");
    let before_ms = before
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let deadline = ev["deadlineMs"].as_u64().unwrap();
    assert!(deadline >= before_ms + 4_000 && deadline <= before_ms + 6_000);
    // No invocation is taken after shutdown.
    assert!(matches!(srv.core.invoke(inv("r3")), Err(CoreError::Closed)));
}

async fn ready_with_extension(srv: &Server, events: &str) -> String {
    let id = srv.register("x", events).await;
    let _ext = srv.ext_next(&id);
    let _rt = srv.runtime_next();
    within(srv.core.wait_ready()).await.unwrap();
    id
}

#[tokio::test]
async fn shutdown_deadline_passes_for_an_extension_that_does_not_come_back() {
    let srv = Server::start(config()).await;
    let id = srv.register("slow", r#"["SHUTDOWN"]"#).await;
    let ext = srv.ext_next(&id);
    let _rt = srv.runtime_next();
    within(srv.core.wait_ready()).await.unwrap();
    let report = within(srv.core.shutdown(
        ShutdownReason::Timeout,
        Instant::now() + Duration::from_millis(300),
    ))
    .await;
    assert_eq!(report.timed_out, vec!["slow".to_string()]);
    assert!(report.acknowledged.is_empty());
    let (status, ev) = within(ext).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(ev["eventType"], "SHUTDOWN");
    assert_eq!(ev["shutdownReason"], "timeout");
}

#[tokio::test]
async fn shutdown_is_acknowledged_by_coming_back_to_event_next() {
    let srv = Server::start(config()).await;
    let id = srv.register("x", r#"["SHUTDOWN"]"#).await;
    let first = srv.ext_next(&id);
    let _rt = srv.runtime_next();
    within(srv.core.wait_ready()).await.unwrap();
    let core = srv.core.clone();
    let mut shutdown = tokio::spawn(async move {
        core.shutdown(
            ShutdownReason::Failure,
            Instant::now() + Duration::from_secs(5),
        )
        .await
    });
    // The event/next pending since init returns SHUTDOWN; shutdown waits for the next call.
    let (status, ev) = within(first).await.unwrap();
    assert_eq!(
        (status, ev["shutdownReason"].as_str()),
        (200, Some("failure"))
    );
    stays_pending(&mut shutdown).await;
    let _back = srv.ext_next(&id);
    let report = within(shutdown).await.unwrap();
    assert_eq!(report.acknowledged, vec!["x".to_string()]);
}

#[tokio::test]
async fn extension_without_invoke_does_not_hold_invocations() {
    let srv = Server::start(config()).await;
    ready_with_extension(&srv, r#"["SHUTDOWN"]"#).await;
    let rx = srv.core.invoke(inv("r1")).unwrap();
    let next = srv.runtime_next();
    let _ = within(next).await;
    assert_eq!(srv.respond("r1", "ok").await, 202);
    assert!(matches!(outcome(rx).await, InvokeOutcome::Response { .. }));
    within(srv.core.wait_idle()).await.unwrap();
}

#[tokio::test]
async fn extension_init_error_fails_init_and_the_pending_invocation() {
    let srv = Server::start(config()).await;
    let id = srv.register("bad", r#"["INVOKE"]"#).await;
    let _rt = srv.runtime_next();
    let rx = srv.core.invoke(inv("r1")).unwrap();
    let res = srv
        .client
        .post(srv.url("/2020-01-01/extension/init/error"))
        .header("Lambda-Extension-Identifier", &id)
        .header(
            "Lambda-Extension-Function-Error-Type",
            "Extension.ConfigInvalid",
        )
        .body(r#"{"errorMessage":"no config","errorType":"ConfigInvalid"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    match within(srv.core.wait_ready()).await {
        Err(CoreError::InitFailed(r)) => {
            assert_eq!(r.error_type, "Extension.InitError");
            let body: Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(
                body["errorMessage"],
                "Extension bad reported Extension.ConfigInvalid: no config"
            );
        }
        other => panic!("expected an init failure, got {other:?}"),
    }
    match outcome(rx).await {
        InvokeOutcome::Error(r) => assert_eq!(r.error_type, "Extension.InitError"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        srv.core.invoke(inv("r2")),
        Err(CoreError::InitFailed(_))
    ));
}

#[tokio::test]
async fn extension_exit_error_during_invoke_fails_it_and_the_environment() {
    let srv = Server::start(config()).await;
    let id = ready_with_extension(&srv, r#"["INVOKE"]"#).await;
    // The runtime's and the extension's `next` calls from init take r1 and its INVOKE.
    let rx = srv.core.invoke(inv("r1")).unwrap();
    let res = srv
        .client
        .post(srv.url("/2020-01-01/extension/exit/error"))
        .header("Lambda-Extension-Identifier", &id)
        .header("Lambda-Extension-Function-Error-Type", "Extension.Panic")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    match outcome(rx).await {
        InvokeOutcome::Error(r) => assert_eq!(r.error_type, "Extension.ExitError"),
        other => panic!("{other:?}"),
    }
    // The runtime's late answer and any later invocation are refused.
    assert_eq!(srv.respond("r1", "late").await, 500);
    assert!(matches!(
        srv.core.invoke(inv("r2")),
        Err(CoreError::Failed(_))
    ));
    assert!(matches!(
        within(srv.core.wait_idle()).await,
        Err(CoreError::Failed(_))
    ));
}

#[tokio::test]
async fn extension_process_exit_outside_shutdown_is_a_crash() {
    let srv = Server::start(config()).await;
    ready_with_extension(&srv, r#"["INVOKE","SHUTDOWN"]"#).await;
    srv.core.extension_exited("x");
    match srv.core.invoke(inv("r1")) {
        Err(CoreError::Failed(r)) => assert_eq!(r.error_type, "Extension.Crash"),
        other => panic!("{other:?}"),
    }
}

/// The embedding starts the runtime only once its extensions have registered (Lambda runs
/// extension init before runtime init): `wait_registered` is how it knows.
#[tokio::test]
async fn wait_registered_returns_once_enough_extensions_registered() {
    let srv = Server::start(config()).await;
    let core = srv.core.clone();
    let mut waiting = tokio::spawn(async move { core.wait_registered(2).await });
    let _a = srv.register("a", r#"["INVOKE"]"#).await;
    stays_pending(&mut waiting).await;
    let _b = srv.register("b", r#"["SHUTDOWN"]"#).await;
    within(waiting).await.unwrap().unwrap();
    assert_eq!(srv.core.registered_extensions(), vec!["a", "b"]);
    // Nothing to wait for.
    within(srv.core.wait_registered(0)).await.unwrap();
    // A closed core ends the wait.
    let core = srv.core.clone();
    let waiting = tokio::spawn(async move { core.wait_registered(3).await });
    srv.core.close();
    assert!(matches!(
        within(waiting).await.unwrap(),
        Err(CoreError::Closed)
    ));
}

#[tokio::test]
async fn snap_start_restore_hooks_run_between_restore_next_and_next() {
    let srv = Server::start(rapid_api::CoreConfig {
        initialization_type: InitializationType::SnapStart,
        ..config()
    })
    .await;
    let restore_next = {
        let req = srv.client.get(srv.url("/2018-06-01/runtime/restore/next"));
        tokio::spawn(async move { req.send().await.unwrap() })
    };
    // In /restore/next, init is over (the snapshot would be taken here).
    within(srv.core.wait_ready()).await.unwrap();
    let rx = srv.core.invoke(inv("r1")).unwrap();
    let core = srv.core.clone();
    let mut restore = tokio::spawn(async move { core.restore().await });
    let res = within(restore_next).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.bytes().await.unwrap().len(), 0);
    stays_pending(&mut restore).await;
    // The runtime's /next ends the restore and takes the queued invocation.
    let (status, id) = within(srv.runtime_next()).await.unwrap();
    assert_eq!((status, id.as_str()), (200, "r1"));
    within(restore).await.unwrap().unwrap();
    assert_eq!(srv.respond("r1", "ok").await, 202);
    assert!(matches!(outcome(rx).await, InvokeOutcome::Response { .. }));
}

#[tokio::test]
async fn snap_start_restore_error_fails_restore_and_invocations() {
    let srv = Server::start(rapid_api::CoreConfig {
        initialization_type: InitializationType::SnapStart,
        ..config()
    })
    .await;
    let restore_next = {
        let req = srv.client.get(srv.url("/2018-06-01/runtime/restore/next"));
        tokio::spawn(async move { req.send().await.unwrap() })
    };
    within(srv.core.wait_ready()).await.unwrap();
    let core = srv.core.clone();
    let restore = tokio::spawn(async move { core.restore().await });
    assert_eq!(within(restore_next).await.unwrap().status(), 200);
    let res = srv
        .client
        .post(srv.url("/2018-06-01/runtime/restore/error"))
        .body(r#"{"errorMessage":"hook failed","errorType":"HookError"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    match within(restore).await.unwrap() {
        Err(CoreError::RestoreFailed(r)) => {
            assert_eq!(r.error_type, "Runtime.AfterRestoreError");
            let body: Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(body["errorMessage"], "hook failed");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        srv.core.invoke(inv("r1")),
        Err(CoreError::RestoreFailed(_))
    ));
}
