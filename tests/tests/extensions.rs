//! Lambda extensions on the process backend: external extensions (shell scripts with curl in
//! the ZIP's `extensions/`, Kindling's `/opt/extensions`, and the `echo-extension` example on
//! the `lambda-extension` crate) register, receive INVOKE and SHUTDOWN events, hold the next
//! invocation while they work, crash, overflow the limit, and subscribe to the Telemetry API. Everything is observed through the Invoke API, the files
//! the extensions write and an HTTP server the telemetry subscriber posts to.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kindling_tests::{shell_bootstrap, workspace_bin, zip, Agent, AgentOptions};
use serde_json::{json, Value};

/// Registers for INVOKE and SHUTDOWN, appends every event to `$KT_DIR/events`, then, after
/// an INVOKE, does its "post-processing": with `KT_HOLD` set it waits for the test to create
/// `$KT_DIR/release-<request id>`; then it appends `{"done": <request id>}`.
const RECORDER: &str = r#"#!/bin/sh
set -u
API="http://$AWS_LAMBDA_RUNTIME_API/2020-01-01/extension"
OUT="$KT_DIR/events"
HDRS="$TMPDIR/recorder.h"
curl -sf -D "$HDRS" -o /dev/null -X POST "$API/register" -H "Lambda-Extension-Name: recorder" \
  -d '{"events":["INVOKE","SHUTDOWN"]}' || exit 1
ID=$(grep -i '^lambda-extension-identifier:' "$HDRS" | cut -d' ' -f2 | tr -d '\r')
echo "recorder: registered"
while true; do
  EV=$(curl -sf -H "Lambda-Extension-Identifier: $ID" "$API/event/next") || exit 0
  echo "$EV" >> "$OUT"
  case "$EV" in *SHUTDOWN*) exit 0;; esac
  RID=$(echo "$EV" | sed 's/.*"requestId":"\([^"]*\)".*/\1/')
  while [ -n "${KT_HOLD:-}" ] && [ ! -e "$KT_DIR/release-$RID" ]; do sleep 0.02; done
  echo "{\"done\":\"$RID\"}" >> "$OUT"
done
"#;

/// The runtime: answers `{"pid", "done"}` (`done`: post-processing lines the recorder had
/// written when this invocation was delivered), logs a line; `{"sleep":..}` sleeps past any
/// timeout, `{"waitext":..}` waits until the crasher extension has exited.
fn runtime() -> Vec<u8> {
    let handle = r#"echo "function says hi $RID"
  case "$EVENT" in *sleep*) sleep 5;; esac
  case "$EVENT" in *waitext*)
    while kill -0 "$(cat "$KT_DIR/crasher.pid")" 2>/dev/null; do sleep 0.02; done; sleep 0.3;;
  esac
  N=$(grep -c '"done"' "$KT_DIR/events" 2>/dev/null); N=${N:-0}
  respond "{\"pid\":$$,\"done\":$N}""#;
    let bootstrap = shell_bootstrap(handle);
    // shell_bootstrap returns a ZIP; take the script back out of it.
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(bootstrap)).unwrap();
    let mut script = Vec::new();
    z.by_name("bootstrap")
        .unwrap()
        .read_to_end(&mut script)
        .unwrap();
    script
}

/// A function ZIP: the runtime plus `extensions/<name>` scripts.
fn function_zip(extensions: &[(&str, &str)]) -> Vec<u8> {
    let rt = runtime();
    let mut entries: Vec<(String, Vec<u8>, u32)> = vec![("bootstrap".into(), rt, 0o755)];
    for (name, script) in extensions {
        entries.push((
            format!("extensions/{name}"),
            script.as_bytes().to_vec(),
            0o755,
        ));
    }
    let refs: Vec<(&str, &[u8], u32)> = entries
        .iter()
        .map(|(n, d, m)| (n.as_str(), d.as_slice(), *m))
        .collect();
    zip(&refs)
}

fn create(agent: &Agent, name: &str, zip: &[u8], dir: &Path, timeout: u32, vars: Value) {
    let mut variables = json!({"KT_DIR": dir.to_str().unwrap()});
    if let (Some(v), Value::Object(extra)) = (variables.as_object_mut(), vars) {
        v.extend(extra);
    }
    agent.create_ok(
        name,
        "provided.al2023",
        "bootstrap",
        zip,
        json!({"Timeout": timeout, "Environment": {"Variables": variables}}),
    );
}

/// The JSON lines of `$KT_DIR/events`.
fn events(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("events"))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Waits (up to 20 s) until `pred` holds for the events file.
fn wait_events(dir: &Path, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let ev = events(dir);
        if pred(&ev) {
            return ev;
        }
        assert!(Instant::now() < until, "no {what} in {ev:#?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_shutdown(e: &Value, reason: &str) -> bool {
    e["eventType"] == "SHUTDOWN" && e["shutdownReason"] == reason
}

fn request_id(r: &kindling_tests::Response) -> String {
    r.header("x-amzn-requestid").unwrap().to_string()
}

#[test]
fn extension_gets_invokes_holds_the_next_one_and_gets_spindown_at_agent_stop() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start();
    let zip = function_zip(&[("recorder", RECORDER)]);
    create(
        &agent,
        "ext-life",
        &zip,
        dir.path(),
        30,
        json!({"KT_HOLD": "1"}),
    );

    // The answer comes back while the extension is still post-processing (it cannot finish
    // before the test releases it), as Lambda answers at the runtime's response.
    let r1 = agent.invoke("ext-life", b"{}");
    assert_eq!(r1.status, 200, "{}", r1.text());
    assert!(r1.header("x-amz-function-error").is_none(), "{}", r1.text());
    let rid1 = request_id(&r1);
    let first = r1.json();
    assert_eq!(first["done"], 0);
    let ev = wait_events(dir.path(), "INVOKE", |e| !e.is_empty());
    assert_eq!(ev[0]["eventType"], "INVOKE", "{ev:?}");
    assert_eq!(ev[0]["requestId"], rid1.as_str());
    assert!(ev[0]["invokedFunctionArn"]
        .as_str()
        .unwrap()
        .ends_with(":function:ext-life"));
    assert!(ev[0]["deadlineMs"].as_u64().unwrap() > 0);
    assert!(!events(dir.path())
        .iter()
        .any(|e| e["done"] == rid1.as_str()));

    // The next invocation waits in the same environment until the extension is done.
    let second = std::thread::scope(|s| {
        let pending = s.spawn(|| agent.invoke("ext-life", br#"{"n":2}"#));
        std::thread::sleep(Duration::from_millis(300));
        std::fs::write(dir.path().join(format!("release-{rid1}")), b"").unwrap();
        pending.join().unwrap()
    });
    assert_eq!(second.status, 200, "{}", second.text());
    let rid2 = request_id(&second);
    let body = second.json();
    assert_eq!(body["pid"], first["pid"], "same warm environment");
    assert_eq!(
        body["done"], 1,
        "delivered only after the extension finished the first invocation"
    );
    std::fs::write(dir.path().join(format!("release-{rid2}")), b"").unwrap();
    let ev = wait_events(dir.path(), "second done", |e| {
        e.iter().any(|x| x["done"] == rid2.as_str())
    });
    let invokes: Vec<&Value> = ev.iter().filter(|e| e["eventType"] == "INVOKE").collect();
    assert_eq!(invokes.len(), 2);
    assert_eq!(invokes[1]["requestId"], rid2.as_str());

    // The extension's output is in the function's log, as the runtime's is.
    let log = agent.get("/kindling/v1/functions/ext-life/logs").text();
    assert!(log.contains(" recorder: registered\n"), "{log}");
    assert!(
        log.contains(&format!(" function says hi {rid1}\n")),
        "{log}"
    );

    // Agent stop: SHUTDOWN with reason spindown before the processes are killed.
    agent.stop();
    let ev = events(dir.path());
    let last = ev.last().unwrap();
    assert!(is_shutdown(last, "spindown"), "{ev:#?}");
    assert!(last["deadlineMs"].as_u64().unwrap() > 0);
}

/// The real Rust extension client (`lambda-extension`, in the `echo-extension` example) next
/// to the real runtime client (`lambda_runtime`, `echo-rust`).
#[test]
fn lambda_extension_crate_gets_invoke_and_shutdown_events() {
    let mut agent = Agent::start();
    let runtime = std::fs::read(workspace_bin("echo-rust")).expect("echo-rust is built");
    let ext = std::fs::read(workspace_bin("echo-extension")).expect("echo-extension is built");
    agent.create_ok(
        "rust-ext",
        "provided.al2023",
        "bootstrap",
        &zip(&[
            ("bootstrap", &runtime, 0o755),
            ("extensions/echo-extension", &ext, 0o755),
        ]),
        json!({"Timeout": 10}),
    );
    let invokes: Vec<String> = agent
        .invoke_echoes("rust-ext", 2)
        .iter()
        .map(|rid| format!(" echo-extension: INVOKE {rid}\n"))
        .collect();
    agent.wait_log_lines("rust-ext", &invokes, Duration::from_secs(20));
    agent.stop();
    agent.wait_log_lines(
        "rust-ext",
        &[" echo-extension: SHUTDOWN spindown\n".to_string()],
        Duration::from_secs(20),
    );
}

#[test]
fn reaped_environment_sends_spindown() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start_with(AgentOptions {
        extra_args: vec!["--idle-timeout".into(), "1".into()],
        ..Default::default()
    });
    let zip = function_zip(&[("recorder", RECORDER)]);
    create(&agent, "ext-reap", &zip, dir.path(), 10, json!({}));
    let r = agent.invoke("ext-reap", b"{}");
    assert_eq!(r.status, 200, "{}", r.text());
    wait_events(dir.path(), "SHUTDOWN spindown", |e| {
        e.iter().any(|x| is_shutdown(x, "spindown"))
    });
}

#[test]
fn function_timeout_sends_shutdown_timeout_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start();
    let zip = function_zip(&[("recorder", RECORDER)]);
    create(&agent, "ext-timeout", &zip, dir.path(), 1, json!({}));
    let r = agent.invoke("ext-timeout", br#"{"sleep":true}"#);
    assert_eq!(r.header("x-amz-function-error"), Some("Unhandled"));
    assert_eq!(r.json()["errorType"], "Sandbox.Timedout", "{}", r.text());
    let ev = wait_events(dir.path(), "SHUTDOWN timeout", |e| {
        e.iter().any(|x| is_shutdown(x, "timeout"))
    });
    assert_eq!(ev[0]["requestId"], request_id(&r).as_str());
    // A fresh environment (with a fresh extension) takes the next invocation.
    let ok = agent.invoke("ext-timeout", b"{}");
    assert_eq!(ok.status, 200);
    assert!(ok.header("x-amz-function-error").is_none(), "{}", ok.text());
}

#[test]
fn more_than_ten_extensions_is_an_init_error() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start();
    let names: Vec<String> = (0..11).map(|i| format!("ext{i:02}")).collect();
    let exts: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), RECORDER)).collect();
    let zip = function_zip(&exts);
    create(&agent, "ext-many", &zip, dir.path(), 10, json!({}));
    let r = agent.invoke("ext-many", b"{}");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-amz-function-error"), Some("Unhandled"));
    let body = r.json();
    assert_eq!(body["errorType"], "Extension.InitError", "{body}");
    assert!(
        body["errorMessage"]
            .as_str()
            .unwrap()
            .contains("at most 10"),
        "{body}"
    );
    assert!(
        events(dir.path()).is_empty(),
        "no extension was started: {:?}",
        events(dir.path())
    );
}

/// Exits with status 1 on its first INVOKE ever (across environments: `$KT_DIR/crashed`).
const CRASHER: &str = r#"#!/bin/sh
set -u
echo $$ > "$KT_DIR/crasher.pid"
API="http://$AWS_LAMBDA_RUNTIME_API/2020-01-01/extension"
HDRS="$TMPDIR/crasher.h"
curl -sf -D "$HDRS" -o /dev/null -X POST "$API/register" -H "Lambda-Extension-Name: crasher" \
  -d '{"events":["INVOKE"]}' || exit 1
ID=$(grep -i '^lambda-extension-identifier:' "$HDRS" | cut -d' ' -f2 | tr -d '\r')
while true; do
  curl -sf -H "Lambda-Extension-Identifier: $ID" "$API/event/next" >/dev/null || exit 0
  if [ ! -e "$KT_DIR/crashed" ]; then touch "$KT_DIR/crashed"; exit 1; fi
done
"#;

#[test]
fn extension_crash_fails_the_invocation_and_the_environment_is_reinitialised() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start();
    let zip = function_zip(&[("crasher", CRASHER)]);
    create(&agent, "ext-crash", &zip, dir.path(), 10, json!({}));
    // The runtime answers only after the extension has gone.
    let r = agent.invoke("ext-crash", br#"{"waitext":true}"#);
    assert_eq!(
        r.header("x-amz-function-error"),
        Some("Unhandled"),
        "{}",
        r.text()
    );
    let body = r.json();
    assert_eq!(body["errorType"], "Extension.Crash", "{body}");
    let ok = agent.invoke("ext-crash", b"{}");
    assert_eq!(ok.status, 200);
    assert!(ok.header("x-amz-function-error").is_none(), "{}", ok.text());
    let again = agent.invoke("ext-crash", b"{}");
    assert_eq!(
        again.json()["pid"],
        ok.json()["pid"],
        "the new environment is warm"
    );
}

/// Subscribes to the Telemetry API (platform, function and extension records) with the
/// test's HTTP server (`$KT_PORT`) as destination.
const TELEMETRY: &str = r#"#!/bin/sh
set -u
BASE="http://$AWS_LAMBDA_RUNTIME_API"
HDRS="$TMPDIR/telly.h"
curl -sf -D "$HDRS" -o /dev/null -X POST "$BASE/2020-01-01/extension/register" \
  -H "Lambda-Extension-Name: telly" -d '{"events":["INVOKE"]}' || exit 1
ID=$(grep -i '^lambda-extension-identifier:' "$HDRS" | cut -d' ' -f2 | tr -d '\r')
curl -sf -o /dev/null -X PUT "$BASE/2022-07-01/telemetry" -H "Lambda-Extension-Identifier: $ID" \
  -d "{\"schemaVersion\":\"2022-12-13\",\"types\":[\"platform\",\"function\",\"extension\"],
       \"buffering\":{\"maxItems\":1000,\"maxBytes\":262144,\"timeoutMs\":25},
       \"destination\":{\"protocol\":\"HTTP\",\"URI\":\"http://sandbox.localdomain:$KT_PORT\"}}" \
  || exit 1
echo "telly: subscribed"
while true; do
  curl -sf -H "Lambda-Extension-Identifier: $ID" "$BASE/2020-01-01/extension/event/next" \
    >/dev/null || exit 0
done
"#;

/// A minimal HTTP/1.1 sink: every POSTed JSON array's records are collected.
fn telemetry_sink() -> (u16, Arc<Mutex<Vec<Value>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let records = Arc::new(Mutex::new(Vec::new()));
    let sink = records.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let sink = sink.clone();
            std::thread::spawn(move || {
                let mut w = conn.try_clone().unwrap();
                let mut r = BufReader::new(conn);
                loop {
                    let mut len = 0usize;
                    let mut line = String::new();
                    // Request line and headers.
                    loop {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let l = line.trim_end();
                        if l.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = l.split_once(':') {
                            if k.eq_ignore_ascii_case("content-length") {
                                len = v.trim().parse().unwrap_or(0);
                            }
                        }
                    }
                    let mut body = vec![0u8; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    if let Ok(Value::Array(batch)) = serde_json::from_slice(&body) {
                        sink.lock().unwrap().extend(batch);
                    }
                    if w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (port, records)
}

#[test]
fn telemetry_subscriber_receives_platform_and_log_records() {
    let dir = tempfile::tempdir().unwrap();
    let (port, records) = telemetry_sink();
    let agent = Agent::start();
    let zip = function_zip(&[("telly", TELEMETRY)]);
    create(
        &agent,
        "ext-telemetry",
        &zip,
        dir.path(),
        10,
        json!({"KT_PORT": port.to_string()}),
    );
    let r = agent.invoke("ext-telemetry", b"{}");
    assert_eq!(r.status, 200);
    assert!(r.header("x-amz-function-error").is_none(), "{}", r.text());
    let rid = request_id(&r);
    let has = |recs: &[Value], ty: &str, f: &dyn Fn(&Value) -> bool| {
        recs.iter().any(|x| x["type"] == ty && f(&x["record"]))
    };
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let recs = records.lock().unwrap().clone();
        let of_rid = |rec: &Value| rec["requestId"] == rid.as_str();
        let done = has(&recs, "platform.initStart", &|_| true)
            && has(&recs, "platform.start", &of_rid)
            && has(&recs, "platform.runtimeDone", &|rec| {
                of_rid(rec) && rec["status"] == "success"
            })
            && has(&recs, "platform.report", &|rec| {
                of_rid(rec) && rec["metrics"]["durationMs"].is_number()
            })
            && has(&recs, "function", &|rec| {
                rec.as_str()
                    .is_some_and(|l| l.contains(&format!("function says hi {rid}")))
            })
            && has(&recs, "extension", &|rec| {
                rec.as_str()
                    .is_some_and(|l| l.contains("telly: subscribed"))
            });
        if done {
            break;
        }
        assert!(
            Instant::now() < until,
            "telemetry incomplete: {recs:#?}\nagent log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
