//! Process sandboxes: warm reuse, crashes, timeouts, init failures, oversized responses,
//! concurrency and throttling, each with a real runtime (a shell bootstrap).

use std::collections::HashSet;

use kindling_tests::{process_alive, shell_bootstrap, zip, Agent, AgentOptions};
use serde_json::{json, Value};

fn expect_function_error(r: &kindling_tests::Response, error_type: &str) -> Value {
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("x-amz-function-error"),
        Some("Unhandled"),
        "{}",
        r.text()
    );
    let body = r.json();
    assert_eq!(body["errorType"], error_type, "{body}");
    body
}

#[test]
fn warm_environment_is_reused() {
    let agent = Agent::start();
    // Counts invocations in its private TMPDIR and reports its pid.
    let zip = shell_bootstrap(
        r#"N=$(( $(cat "$TMPDIR/n" 2>/dev/null || echo 0) + 1 )); echo $N > "$TMPDIR/n"
  respond "{\"n\":$N,\"pid\":$$}""#,
    );
    agent.create_ok("counter", "provided.al2023", "bootstrap", &zip, json!({}));
    let a = agent.invoke("counter", b"{}").json();
    let b = agent.invoke("counter", b"{}").json();
    assert_eq!(a["n"], 1);
    assert_eq!(
        b["n"], 2,
        "second invoke should land in the same warm environment"
    );
    assert_eq!(a["pid"], b["pid"]);
}

#[test]
fn function_error_from_runtime() {
    let agent = Agent::start();
    let zip = shell_bootstrap(
        r#"curl -sf -X POST "$API/invocation/$RID/error" -H 'Lambda-Runtime-Function-Error-Type: Function.MyError' \
    -d '{"errorMessage":"it broke","errorType":"MyError","stackTrace":["a"],"errorCause":{"x":1}}' >/dev/null"#,
    );
    agent.create_ok("fails", "provided.al2023", "bootstrap", &zip, json!({}));
    let body = expect_function_error(&agent.invoke("fails", b"{}"), "MyError");
    assert_eq!(body["errorMessage"], "it broke");
    assert_eq!(body["stackTrace"], json!(["a"]));
    assert!(
        body.get("errorCause").is_none(),
        "errorCause is dropped: {body}"
    );
}

#[test]
fn crash_mid_invoke_is_runtime_exit_error_and_recovers() {
    let agent = Agent::start();
    // Crashes on {"crash":true}, answers otherwise.
    let zip = shell_bootstrap(
        r#"case "$EVENT" in *crash*) exit 42;; esac
  respond "{\"pid\":$$}""#,
    );
    agent.create_ok("crashy", "provided.al2023", "bootstrap", &zip, json!({}));
    let before = agent.invoke("crashy", b"{}").json();
    let r = agent.invoke("crashy", br#"{"crash":true}"#);
    let body = expect_function_error(&r, "Runtime.ExitError");
    let msg = body["errorMessage"].as_str().unwrap();
    assert!(msg.contains("exit status 42"), "{msg}");
    assert!(msg.contains(r.header("x-amzn-requestid").unwrap()), "{msg}");
    // The next invoke gets a fresh environment.
    let after = agent.invoke("crashy", b"{}");
    assert_eq!(after.status, 200, "{}", after.text());
    assert_ne!(before["pid"], after.json()["pid"]);
}

#[test]
fn timeout_kills_the_runtime_and_recovers() {
    let agent = Agent::start();
    let zip = shell_bootstrap(
        r#"case "$EVENT" in *slow*) echo $$ > "$TMPDIR/../slow.pid"; sleep 30;; esac
  respond '{"ok":true}'"#,
    );
    agent.create_ok(
        "slow",
        "provided.al2023",
        "bootstrap",
        &zip,
        json!({"Timeout": 1}),
    );
    let r = agent.invoke("slow", br#"{"slow":1}"#);
    let body = expect_function_error(&r, "Sandbox.Timedout");
    assert!(
        body["errorMessage"]
            .as_str()
            .unwrap()
            .contains("Task timed out after 1.00 seconds"),
        "{body}"
    );
    let r = agent.invoke("slow", b"{}");
    assert_eq!(r.json(), json!({"ok": true}));
}

#[test]
fn init_failures_reach_the_caller() {
    let agent = Agent::start();

    // The runtime reports an init error, then exits.
    let init_err = b"#!/bin/sh\ncurl -sf -X POST \"http://$AWS_LAMBDA_RUNTIME_API/2018-06-01/runtime/init/error\" \
        -H 'Lambda-Runtime-Function-Error-Type: Runtime.ConfigError' \
        -d '{\"errorMessage\":\"missing config\",\"errorType\":\"Runtime.ConfigError\"}'\nexit 1\n";
    let z = zip(&[("bootstrap", init_err, 0o755)]);
    agent.create_ok("init-err", "provided.al2023", "bootstrap", &z, json!({}));
    let body = expect_function_error(&agent.invoke("init-err", b"{}"), "Runtime.ConfigError");
    assert_eq!(body["errorMessage"], "missing config");

    // Exits before ever asking for work.
    let z = zip(&[("bootstrap", b"#!/bin/sh\nexit 7\n", 0o755)]);
    agent.create_ok("exits", "provided.al2023", "bootstrap", &z, json!({}));
    let body = expect_function_error(&agent.invoke("exits", b"{}"), "Runtime.ExitError");
    assert!(
        body["errorMessage"]
            .as_str()
            .unwrap()
            .contains("exit status 7"),
        "{body}"
    );

    // No bootstrap at all, and one that is not executable.
    let z = zip(&[("main.sh", b"#!/bin/sh\n", 0o755)]);
    agent.create_ok(
        "no-bootstrap",
        "provided.al2023",
        "bootstrap",
        &z,
        json!({}),
    );
    expect_function_error(
        &agent.invoke("no-bootstrap", b"{}"),
        "Runtime.InvalidEntrypoint",
    );
    let z = zip(&[("bootstrap", b"#!/bin/sh\n", 0o644)]);
    agent.create_ok("not-exec", "provided.al2023", "bootstrap", &z, json!({}));
    let body = expect_function_error(
        &agent.invoke("not-exec", b"{}"),
        "Runtime.InvalidEntrypoint",
    );
    assert!(
        body["errorMessage"]
            .as_str()
            .unwrap()
            .contains("ermission denied"),
        "{body}"
    );
}

#[test]
fn oversized_response_is_a_function_error() {
    let agent = Agent::start();
    let zip = shell_bootstrap(
        r#"head -c 6291557 /dev/zero | tr '\0' 'a' > "$TMPDIR/big"
  CODE=$(curl -s -o /dev/null -w '%{http_code}' -X POST "$API/invocation/$RID/response" --data-binary @"$TMPDIR/big")
  echo "runtime got $CODE" >&2"#,
    );
    agent.create_ok("big", "provided.al2023", "bootstrap", &zip, json!({}));
    let body = expect_function_error(&agent.invoke("big", b"{}"), "Function.ResponseSizeTooLarge");
    assert!(
        body["errorMessage"].as_str().unwrap().contains("6291556"),
        "{body}"
    );
    // The caller's answer can come back before the runtime has logged its own.
    let saw_413 = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        agent.log().contains("runtime got 413")
    });
    assert!(saw_413, "runtime should see 413:\n{}", agent.log());
}

#[test]
fn concurrent_invokes_get_separate_environments() {
    let agent = Agent::start();
    let zip = shell_bootstrap(r#"sleep 1; respond "{\"pid\":$$,\"dir\":\"$PWD\"}""#);
    agent.create_ok("par", "provided.al2023", "bootstrap", &zip, json!({}));
    let answers: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| agent.invoke("par", b"{}")))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                let r = h.join().unwrap();
                assert_eq!(r.status, 200, "{}", r.text());
                r.json()
            })
            .collect()
    });
    let pids: HashSet<_> = answers.iter().map(|a| a["pid"].to_string()).collect();
    let dirs: HashSet<_> = answers.iter().map(|a| a["dir"].to_string()).collect();
    assert_eq!(
        pids.len(),
        4,
        "one environment per concurrent invoke: {answers:?}"
    );
    assert_eq!(
        dirs.len(),
        4,
        "each environment has its own working directory: {answers:?}"
    );
}

#[test]
fn environment_cap_throttles() {
    let agent = Agent::start_with(AgentOptions {
        max_environments: Some(1),
        ..Default::default()
    });
    let zip = shell_bootstrap(r#"sleep 2; respond '{}'"#);
    agent.create_ok("capped", "provided.al2023", "bootstrap", &zip, json!({}));
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| agent.invoke("capped", b"{}"));
        std::thread::sleep(std::time::Duration::from_millis(500));
        let b = s.spawn(|| agent.invoke("capped", b"{}"));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(b.status, 429, "{}", b.text());
    assert_eq!(
        b.header("x-amzn-errortype"),
        Some("TooManyRequestsException")
    );
}

#[test]
fn slow_init_is_retried_under_the_function_timeout() {
    let agent = Agent::start_with(AgentOptions {
        init_timeout: Some(1),
        ..Default::default()
    });
    // Takes 2 s to initialise: over the 1 s init limit, within the 5 s function timeout.
    let slow = b"#!/bin/sh\nsleep 2\nexec \"$LAMBDA_TASK_ROOT/loop\"\n";
    let body = shell_bootstrap(r#"respond '{"ok":true}'"#);
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(body)).unwrap();
    let mut looped = Vec::new();
    std::io::Read::read_to_end(&mut archive.by_name("bootstrap").unwrap(), &mut looped).unwrap();
    let z = zip(&[("bootstrap", slow, 0o755), ("loop", &looped, 0o755)]);
    agent.create_ok(
        "slow-init",
        "provided.al2023",
        "bootstrap",
        &z,
        json!({"Timeout": 5}),
    );
    let r = agent.invoke("slow-init", b"{}");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"ok": true}), "{}", agent.log());
    assert!(agent
        .log()
        .contains("retrying it under the function timeout"));

    // Never initialises: the retry times out as the invocation.
    let z = zip(&[("bootstrap", b"#!/bin/sh\nsleep 60\n", 0o755)]);
    agent.create_ok(
        "stuck-init",
        "provided.al2023",
        "bootstrap",
        &z,
        json!({"Timeout": 2}),
    );
    let body = expect_function_error(&agent.invoke("stuck-init", b"{}"), "Sandbox.Timedout");
    assert!(
        body["errorMessage"]
            .as_str()
            .unwrap()
            .contains("2.00 seconds"),
        "{body}"
    );
}

#[test]
fn idle_environments_are_stopped_after_the_idle_timeout() {
    let agent = Agent::start_with(AgentOptions {
        extra_args: vec!["--idle-timeout".into(), "1".into()],
        ..Default::default()
    });
    let zip = shell_bootstrap(r#"respond "{\"pid\":$$}""#);
    agent.create_ok("idler", "provided.al2023", "bootstrap", &zip, json!({}));
    let first = agent.invoke("idler", b"{}").json()["pid"].as_i64().unwrap();
    // Warm reuse within the timeout.
    assert_eq!(
        agent.invoke("idler", b"{}").json()["pid"].as_i64().unwrap(),
        first
    );
    let gone = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        !process_alive(first)
    });
    assert!(
        gone,
        "the idle runtime {first} was not stopped:\n{}",
        agent.log()
    );
    let second = agent.invoke("idler", b"{}").json()["pid"].as_i64().unwrap();
    assert_ne!(first, second, "a new environment after the idle timeout");
}
