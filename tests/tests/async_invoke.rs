//! Asynchronous invocations (`X-Amz-Invocation-Type: Event`) against a real agent: the durable
//! queue, Lambda's retry policy, destinations (a function, a local SQS-style queue), throttles,
//! a SIGKILL in the middle, and the event-invoke-config API.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kindling_tests::{shell_bootstrap, workspace_bin, Agent, AgentOptions};
use serde_json::{json, Value};

const ACCOUNT: &str = "000000000000";

fn arn(name: &str) -> String {
    format!("arn:aws:lambda:us-east-1:{ACCOUNT}:function:{name}")
}

fn sqs(queue: &str) -> String {
    format!("arn:aws:sqs:us-east-1:{ACCOUNT}:{queue}")
}

/// An agent whose retries come after 0.5 s and 1 s instead of Lambda's minutes.
fn agent_with(extra: &[&str], data_dir: Option<PathBuf>) -> Agent {
    let mut args = vec!["--backend", "process", "--async-retry-base", "0.5"];
    args.extend_from_slice(extra);
    Agent::start_with(AgentOptions {
        extra_args: args.into_iter().map(String::from).collect(),
        data_dir,
        ..Default::default()
    })
}

/// Creates a shell function whose `$OUT` is `out`; `handle` runs for each invocation.
fn create_sh(agent: &Agent, name: &str, out: &Path, handle: &str, timeout: u32) {
    agent.create_ok(
        name,
        "provided.al2023",
        "bootstrap",
        &shell_bootstrap(handle),
        json!({"Timeout": timeout, "Environment": {"Variables": {"OUT": out.to_str().unwrap()}}}),
    );
}

/// Appends "<request id> <event>" to `$OUT`, then succeeds.
const RECORD: &str = r#"printf '%s %s\n' "$RID" "$EVENT" >> "$OUT"; respond '{"recorded":true}'"#;
/// Appends the request id to `$OUT`, then fails with a function error.
const FAIL: &str = r#"printf '%s\n' "$RID" >> "$OUT"
  curl -sf -X POST "$API/invocation/$RID/error" -H 'Lambda-Runtime-Function-Error-Type: Function.Boom' \
    -d '{"errorMessage":"boom","errorType":"Boom"}' >/dev/null"#;

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Polls `cond` until it holds or `limit` passes; returns whether it held.
fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn invoke_event(agent: &Agent, name: &str, payload: &[u8]) -> String {
    let r = agent.invoke_with(name, payload, &[("X-Amz-Invocation-Type", "Event")]);
    assert_eq!(r.status, 202, "{}", r.text());
    assert!(r.body.is_empty(), "202 carries no body: {}", r.text());
    r.header("x-amzn-requestid")
        .expect("x-amzn-RequestId")
        .to_string()
}

fn put_config(agent: &Agent, name: &str, body: Value) -> Value {
    let r = agent.send(
        "PUT",
        &format!("/2019-09-25/functions/{name}/event-invoke-config"),
        Some(&body),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn queue_messages(agent: &Agent, queue: &str) -> Vec<Value> {
    let r = agent.get(&format!("/kindling/v1/queues/{queue}/messages"));
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["Messages"].as_array().cloned().unwrap_or_default()
}

#[test]
fn event_is_accepted_with_202_and_runs() {
    let agent = agent_with(&[], None);
    let out = agent.data_dir.with_extension("rec");
    create_sh(&agent, "rec", &out, RECORD, 3);

    let rid = invoke_event(&agent, "rec", br#"{"n":1}"#);
    assert!(
        wait_for(Duration::from_secs(20), || !lines(&out).is_empty()),
        "the event never ran; log:\n{}",
        agent.log()
    );
    // The function saw the request id the caller was given, and the payload as sent.
    assert_eq!(lines(&out), vec![format!(r#"{rid} {{"n":1}}"#)]);

    // An empty body is the empty object, as for synchronous invokes.
    let rid2 = invoke_event(&agent, "rec", b"");
    assert!(wait_for(Duration::from_secs(20), || lines(&out).len() == 2));
    assert_eq!(lines(&out)[1], format!("{rid2} {{}}"));

    // 1 MiB is the asynchronous limit (synchronous invokes take 6 MB).
    let big = format!(r#"{{"data":"{}"}}"#, "x".repeat(1024 * 1024));
    let r = agent.invoke_with("rec", big.as_bytes(), &[("X-Amz-Invocation-Type", "Event")]);
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(
        r.header("x-amzn-errortype"),
        Some("RequestTooLargeException")
    );
    let just_under = format!(r#"{{"data":"{}"}}"#, "y".repeat(1024 * 1024 - 100));
    invoke_event(&agent, "rec", just_under.as_bytes());
    assert!(wait_for(Duration::from_secs(20), || lines(&out).len() == 3));

    // Errors that happen before queueing are the synchronous ones.
    let r = agent.invoke_with("rec", b"{nope", &[("X-Amz-Invocation-Type", "Event")]);
    assert_eq!(r.status, 400);
    assert_eq!(
        r.header("x-amzn-errortype"),
        Some("InvalidRequestContentException")
    );
    let r = agent.invoke_with("missing", b"{}", &[("X-Amz-Invocation-Type", "Event")]);
    assert_eq!(r.status, 404);
}

#[test]
fn function_errors_are_retried_then_recorded_in_a_queue() {
    let agent = agent_with(&[], None);
    let out = agent.data_dir.with_extension("fail");
    create_sh(&agent, "failer", &out, FAIL, 3);
    put_config(
        &agent,
        "failer",
        json!({"DestinationConfig": {"OnFailure": {"Destination": sqs("failures")}}}),
    );

    let rid = invoke_event(&agent, "failer", br#"{"order":42}"#);
    assert!(
        wait_for(Duration::from_secs(30), || !queue_messages(
            &agent, "failures"
        )
        .is_empty()),
        "no failure record; attempts {:?}; log:\n{}",
        lines(&out),
        agent.log()
    );
    // The default: the first attempt and 2 retries, all under the caller's request id.
    assert_eq!(lines(&out), vec![rid.clone(); 3]);

    let msgs = queue_messages(&agent, "failures");
    assert_eq!(msgs.len(), 1);
    assert!(msgs[0]["MessageId"].is_string());
    assert!(msgs[0]["SentTimestamp"].as_u64().unwrap() > 0);
    let rec: Value = serde_json::from_str(msgs[0]["Body"].as_str().unwrap()).unwrap();
    assert_eq!(rec["version"], "1.0");
    assert!(rec["timestamp"].as_str().unwrap().ends_with('Z'));
    let ctx = &rec["requestContext"];
    assert_eq!(ctx["requestId"], rid.as_str());
    assert_eq!(ctx["functionArn"], format!("{}:$LATEST", arn("failer")));
    assert_eq!(ctx["condition"], "RetriesExhausted");
    assert_eq!(ctx["approximateInvokeCount"], 3);
    assert_eq!(rec["requestPayload"], json!({"order": 42}));
    assert_eq!(rec["responseContext"]["statusCode"], 200);
    assert_eq!(rec["responseContext"]["executedVersion"], "$LATEST");
    assert_eq!(rec["responseContext"]["functionError"], "Unhandled");
    assert_eq!(rec["responsePayload"]["errorMessage"], "boom");

    // The CLI reads the same queue.
    let cli = std::process::Command::new(workspace_bin("kindling"))
        .args([
            "dlq",
            "read",
            "failures",
            "--json",
            "--endpoint",
            &agent.url,
        ])
        .output()
        .expect("kindling dlq read");
    assert!(cli.status.success(), "{cli:?}");
    let v: Value = serde_json::from_slice(&cli.stdout).expect("JSON from kindling dlq read");
    assert_eq!(v["Messages"][0]["Body"], msgs[0]["Body"]);
    let cli = std::process::Command::new(workspace_bin("kindling"))
        .args(["dlq", "list", "--json", "--endpoint", &agent.url])
        .output()
        .expect("kindling dlq list");
    let v: Value = serde_json::from_slice(&cli.stdout).expect("JSON from kindling dlq list");
    assert_eq!(v["Queues"], json!([{"Name": "failures", "Messages": 1}]));

    // No attempt after the record was written: the event is gone from the queue.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(lines(&out).len(), 3);
}

#[test]
fn zero_retries_means_one_attempt() {
    let agent = agent_with(&[], None);
    let out = agent.data_dir.with_extension("fail");
    create_sh(&agent, "once", &out, FAIL, 3);
    let cfg = put_config(
        &agent,
        "once",
        json!({"MaximumRetryAttempts": 0,
               "DestinationConfig": {"OnFailure": {"Destination": sqs("once-dlq")}}}),
    );
    assert_eq!(cfg["MaximumRetryAttempts"], 0);

    let rid = invoke_event(&agent, "once", b"{}");
    assert!(
        wait_for(Duration::from_secs(20), || !queue_messages(
            &agent, "once-dlq"
        )
        .is_empty()),
        "log:\n{}",
        agent.log()
    );
    let rec: Value = serde_json::from_str(
        queue_messages(&agent, "once-dlq")[0]["Body"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(rec["requestContext"]["approximateInvokeCount"], 1);
    assert_eq!(rec["requestContext"]["requestId"], rid.as_str());
    // Longer than the retry delay would have been: still one attempt.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(lines(&out), vec![rid]);
}

#[test]
fn destination_functions_get_the_invocation_record() {
    let agent = agent_with(&[], None);
    let fail_out = agent.data_dir.with_extension("fail");
    let sink_out = agent.data_dir.with_extension("sink");
    let ok_out = agent.data_dir.with_extension("ok");
    create_sh(&agent, "sink", &sink_out, RECORD, 3);
    create_sh(&agent, "failer", &fail_out, FAIL, 3);
    create_sh(&agent, "worker", &ok_out, RECORD, 3);
    put_config(
        &agent,
        "failer",
        json!({"MaximumRetryAttempts": 1,
               "DestinationConfig": {"OnFailure": {"Destination": arn("sink")}}}),
    );
    put_config(
        &agent,
        "worker",
        json!({"DestinationConfig": {"OnSuccess": {"Destination": arn("sink")}}}),
    );

    let failed = invoke_event(&agent, "failer", br#"{"job":"a"}"#);
    let succeeded = invoke_event(&agent, "worker", br#"{"job":"b"}"#);
    assert!(
        wait_for(Duration::from_secs(30), || lines(&sink_out).len() == 2),
        "sink got {:?}; log:\n{}",
        lines(&sink_out),
        agent.log()
    );
    // One attempt and one retry.
    assert_eq!(lines(&fail_out), vec![failed.clone(); 2]);

    let records: Vec<Value> = lines(&sink_out)
        .iter()
        .map(|l| serde_json::from_str(l.split_once(' ').unwrap().1).unwrap())
        .collect();
    let by_condition = |c: &str| {
        records
            .iter()
            .find(|r| r["requestContext"]["condition"] == c)
            .unwrap_or_else(|| panic!("no {c} record in {records:?}"))
    };
    let f = by_condition("RetriesExhausted");
    assert_eq!(f["requestContext"]["requestId"], failed.as_str());
    assert_eq!(
        f["requestContext"]["functionArn"],
        format!("{}:$LATEST", arn("failer"))
    );
    assert_eq!(f["requestContext"]["approximateInvokeCount"], 2);
    assert_eq!(f["requestPayload"], json!({"job": "a"}));
    assert_eq!(f["responseContext"]["functionError"], "Unhandled");
    assert_eq!(f["responsePayload"]["errorType"], "Boom");

    let s = by_condition("Success");
    assert_eq!(s["requestContext"]["requestId"], succeeded.as_str());
    assert_eq!(s["requestContext"]["approximateInvokeCount"], 1);
    assert_eq!(s["requestPayload"], json!({"job": "b"}));
    assert_eq!(s["responsePayload"], json!({"recorded": true}));
    assert!(s["responseContext"].get("functionError").is_none());
}

#[test]
fn throttled_events_wait_for_room_and_still_run() {
    let agent = agent_with(&["--max-environments", "1"], None);
    let slow_out = agent.data_dir.with_extension("slow");
    let out = agent.data_dir.with_extension("rec");
    create_sh(
        &agent,
        "slow",
        &slow_out,
        r#"echo started >> "$OUT"; sleep 3; respond '{"slow":true}'"#,
        10,
    );
    create_sh(&agent, "rec", &out, RECORD, 3);

    // The only environment is busy with a synchronous invoke...
    let sync = std::thread::scope(|s| {
        let h = s.spawn(|| agent.invoke("slow", b"{}"));
        assert!(wait_for(Duration::from_secs(20), || !lines(&slow_out).is_empty()));
        // ...so the event is throttled, and waits.
        let rid = invoke_event(&agent, "rec", br#"{"late":true}"#);
        assert!(
            wait_for(Duration::from_secs(10), || agent
                .log()
                .contains("asynchronous invocation deferred")),
            "log:\n{}",
            agent.log()
        );
        assert!(lines(&out).is_empty());
        (h.join().unwrap(), rid)
    });
    let (res, rid) = sync;
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(res.json(), json!({"slow": true}));
    assert!(
        wait_for(Duration::from_secs(30), || lines(&out).len() == 1),
        "the throttled event never ran; log:\n{}",
        agent.log()
    );
    assert_eq!(lines(&out), vec![format!(r#"{rid} {{"late":true}}"#)]);
}

#[test]
fn accepted_events_survive_sigkill() {
    const N: usize = 50;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let out = tmp.path().join("seen");
    let args = ["--async-concurrency", "1"];
    let agent = agent_with(&args, Some(data.clone()));
    // Slow enough that most events are still queued at the kill.
    create_sh(
        &agent,
        "slowrec",
        &out,
        r#"sleep 0.2; printf '%s\n' "$EVENT" >> "$OUT"; respond '{}'"#,
        3,
    );
    let accepted: BTreeSet<String> = (0..N)
        .map(|i| {
            let p = format!(r#"{{"i":{i}}}"#);
            invoke_event(&agent, "slowrec", p.as_bytes());
            p
        })
        .collect();
    drop(agent); // SIGKILL
    let before = lines(&out).len();
    assert!(
        before < N,
        "all {N} events ran before the kill; the test proves nothing"
    );

    let agent = agent_with(&args, Some(data));
    assert!(
        wait_for(Duration::from_secs(90), || {
            let seen: BTreeSet<String> = lines(&out).into_iter().collect();
            accepted.is_subset(&seen)
        }),
        "lost events: {:?}; log:\n{}",
        accepted
            .difference(&lines(&out).into_iter().collect())
            .collect::<Vec<_>>(),
        agent.log()
    );
}

#[test]
fn event_invoke_config_crud_and_validation() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut agent = agent_with(&[], Some(data.clone()));
    let out = agent.data_dir.with_extension("rec");
    create_sh(&agent, "f", &out, RECORD, 3);
    create_sh(&agent, "other", &out, RECORD, 3);
    let path = "/2019-09-25/functions/f/event-invoke-config";
    let err = |r: &kindling_tests::Response, status: u16, code: &str| {
        assert_eq!(r.status, status, "{}", r.text());
        assert_eq!(r.header("x-amzn-errortype"), Some(code), "{}", r.text());
    };

    err(
        &agent.send("GET", path, None),
        404,
        "ResourceNotFoundException",
    );
    assert!(agent.send("GET", path, None).json()["message"]
        .as_str()
        .unwrap()
        .contains("doesn't have an EventInvokeConfig"));
    // Update needs an existing config.
    err(
        &agent.send("POST", path, Some(&json!({"MaximumRetryAttempts": 1}))),
        404,
        "ResourceNotFoundException",
    );

    let c = put_config(
        &agent,
        "f",
        json!({"MaximumRetryAttempts": 1, "MaximumEventAgeInSeconds": 120}),
    );
    assert_eq!(c["FunctionArn"], format!("{}:$LATEST", arn("f")));
    assert_eq!(c["MaximumRetryAttempts"], 1);
    assert_eq!(c["MaximumEventAgeInSeconds"], 120);
    assert!(c["LastModified"].as_f64().unwrap() > 1.6e9);
    assert_eq!(
        c["DestinationConfig"],
        json!({"OnSuccess": {}, "OnFailure": {}})
    );
    assert_eq!(agent.send("GET", path, None).json(), c);

    // Update merges...
    let r = agent.send(
        "POST",
        path,
        Some(
            &json!({"DestinationConfig": {"OnFailure": {"Destination": sqs("q1")},
                                           "OnSuccess": {"Destination": arn("other")}}}),
        ),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let u = r.json();
    assert_eq!(u["MaximumRetryAttempts"], 1);
    assert_eq!(
        u["DestinationConfig"]["OnFailure"]["Destination"],
        sqs("q1")
    );
    assert_eq!(
        u["DestinationConfig"]["OnSuccess"]["Destination"],
        arn("other")
    );
    // ...and Put replaces.
    let p = put_config(&agent, "f", json!({"MaximumEventAgeInSeconds": 60}));
    assert!(p.get("MaximumRetryAttempts").is_none(), "{p}");
    assert_eq!(
        p["DestinationConfig"],
        json!({"OnSuccess": {}, "OnFailure": {}})
    );

    let l = agent.get("/2019-09-25/functions/f/event-invoke-config/list");
    assert_eq!(l.status, 200, "{}", l.text());
    assert_eq!(l.json()["FunctionEventInvokeConfigs"], json!([p]));

    // Validation, as Lambda answers it.
    for (body, code) in [
        (json!({"MaximumRetryAttempts": 3}), "ValidationException"),
        (json!({"MaximumRetryAttempts": -1}), "ValidationException"),
        (
            json!({"MaximumEventAgeInSeconds": 59}),
            "ValidationException",
        ),
        (
            json!({"MaximumEventAgeInSeconds": 21601}),
            "ValidationException",
        ),
        (
            json!({"DestinationConfig": {"OnFailure": {"Destination": "not-an-arn"}}}),
            "ValidationException",
        ),
        (json!({}), "InvalidParameterValueException"),
        (
            json!({"DestinationConfig": {"OnFailure": {"Destination":
                format!("arn:aws:sns:us-east-1:{ACCOUNT}:topic")}}}),
            "InvalidParameterValueException",
        ),
        (
            json!({"DestinationConfig": {"OnFailure": {"Destination": arn("f")}}}),
            "InvalidParameterValueException",
        ),
        (
            json!({"DestinationConfig": {"OnSuccess": {"Destination": arn("nobody")}}}),
            "InvalidParameterValueException",
        ),
    ] {
        let r = agent.send("PUT", path, Some(&body));
        err(&r, 400, code);
        // A refused Put leaves the stored config alone.
        assert_eq!(agent.send("GET", path, None).json(), p, "after {body}");
    }
    err(
        &agent.send(
            "PUT",
            "/2019-09-25/functions/nobody/event-invoke-config",
            Some(&json!({"MaximumRetryAttempts": 1})),
        ),
        404,
        "ResourceNotFoundException",
    );
    err(
        &agent.get("/2019-09-25/functions/nobody/event-invoke-config/list"),
        404,
        "ResourceNotFoundException",
    );

    // The config survives a restart.
    assert!(agent.stop().success());
    let agent = agent_with(&[], Some(data));
    assert_eq!(agent.send("GET", path, None).json(), p);

    let r = agent.send("DELETE", path, None);
    assert_eq!(r.status, 204, "{}", r.text());
    err(
        &agent.send("DELETE", path, None),
        404,
        "ResourceNotFoundException",
    );
    err(
        &agent.send("GET", path, None),
        404,
        "ResourceNotFoundException",
    );
    let l = agent.get("/2019-09-25/functions/f/event-invoke-config/list");
    assert_eq!(l.json()["FunctionEventInvokeConfigs"], json!([]));

    // Deleting the function deletes its config: a new function of that name has none.
    put_config(&agent, "f", json!({"MaximumRetryAttempts": 0}));
    assert_eq!(agent.delete("f").status, 204);
    create_sh(&agent, "f", &out, RECORD, 3);
    err(
        &agent.send("GET", path, None),
        404,
        "ResourceNotFoundException",
    );
}
