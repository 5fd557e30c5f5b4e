//! The scheduler's limits end to end, on the process backend: reserved concurrency, the
//! unreserved pool, the memory budget, provisioned concurrency, cold starts that do not block
//! other functions, and graceful shutdown.
//!
//! The functions block until the test releases them (a gate file in their state directory),
//! so the counts are exact: every "N in flight" is observed through marker files, never
//! assumed from timing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kindling_tests::{process_alive, shell_bootstrap, zip, Agent, AgentOptions, Response};
use serde_json::{json, Value};

/// A function whose runtime records its init (`<state>/inits`: "pid type" per line), waits
/// for `$INIT_GATE` (when set) before its first `/next`, marks each invocation
/// (`<state>/started-<request id>`), and then:
/// - payload `"gate-name"`: waits for `<state>/gate-name`, then answers;
/// - payload `"die"`: exits (the environment is lost);
/// - anything else: answers at once.
///
/// The answer is `{"pid": runtime pid, "init": AWS_LAMBDA_INITIALIZATION_TYPE}`.
fn gated_function() -> Vec<u8> {
    let init = b"#!/bin/sh\n\
        echo \"$$ $AWS_LAMBDA_INITIALIZATION_TYPE\" >> \"$STATE/inits\"\n\
        if [ -n \"${INIT_GATE:-}\" ]; then\n\
          while [ ! -e \"$INIT_GATE\" ]; do sleep 0.05; done\n\
        fi\n\
        exec \"$LAMBDA_TASK_ROOT/loop\"\n";
    let looped = shell_bootstrap(
        r#"touch "$STATE/started-$RID"
  GATE=$(printf '%s' "$EVENT" | tr -d '"{} ')
  if [ "$GATE" = die ]; then exit 1; fi
  if [ -n "$GATE" ]; then
    while [ ! -e "$STATE/$GATE" ]; do sleep 0.05; done
  fi
  respond "{\"pid\":$$,\"init\":\"$AWS_LAMBDA_INITIALIZATION_TYPE\"}""#,
    );
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(looped)).unwrap();
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut archive.by_name("bootstrap").unwrap(), &mut body).unwrap();
    zip(&[("bootstrap", init, 0o755), ("loop", &body, 0o755)])
}

fn create(agent: &Agent, name: &str, state: &Path, extra_env: Value) {
    let mut vars = json!({ "STATE": state.display().to_string() });
    if let (Some(v), Value::Object(e)) = (vars.as_object_mut(), extra_env) {
        v.extend(e);
    }
    agent.create_ok(
        name,
        "provided.al2023",
        "bootstrap",
        &gated_function(),
        json!({"Timeout": 60, "Environment": {"Variables": vars}}),
    );
}

fn wait_until(what: &str, agent: &Agent, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn started(state: &Path) -> usize {
    std::fs::read_dir(state)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("started-")
        })
        .count()
}

/// `(pid, initialization type)` of every init so far.
fn inits(state: &Path) -> Vec<(i64, String)> {
    std::fs::read_to_string(state.join("inits"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (pid, kind) = l.split_once(' ')?;
            Some((pid.parse().ok()?, kind.to_string()))
        })
        .collect()
}

fn alive_runtimes(state: &Path) -> usize {
    inits(state)
        .iter()
        .filter(|(pid, _)| process_alive(*pid))
        .count()
}

fn release(state: &Path, gate: &str) {
    std::fs::write(state.join(gate), b"").unwrap();
}

fn assert_throttled(r: &Response, reason: &str) {
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(
        r.header("x-amzn-errortype"),
        Some("TooManyRequestsException")
    );
    assert_eq!(
        r.json(),
        json!({"Type": "User", "message": "Rate Exceeded.", "Reason": reason})
    );
}

fn put_reserved(agent: &Agent, name: &str, n: Value) -> Response {
    agent.send(
        "PUT",
        &format!("/2017-10-31/functions/{name}/concurrency"),
        Some(&json!({ "ReservedConcurrentExecutions": n })),
    )
}

fn get_reserved(agent: &Agent, name: &str) -> Value {
    let r = agent.get(&format!("/2019-09-30/functions/{name}/concurrency"));
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn provisioned_path(name: &str) -> String {
    format!("/2019-09-30/functions/{name}/provisioned-concurrency?Qualifier=%24LATEST")
}

fn put_provisioned(agent: &Agent, name: &str, n: Value) -> Response {
    agent.send(
        "PUT",
        &provisioned_path(name),
        Some(&json!({ "ProvisionedConcurrentExecutions": n })),
    )
}

fn wait_provisioned_ready(agent: &Agent, name: &str) -> Value {
    let mut last = Value::Null;
    wait_until("provisioned concurrency READY", agent, || {
        let r = agent.get(&provisioned_path(name));
        assert_eq!(r.status, 200, "{}", r.text());
        last = r.json();
        last["Status"] == "READY"
    });
    last
}

fn state_dir() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().to_path_buf();
    (t, p)
}

fn agent_with(args: &[&str]) -> Agent {
    Agent::start_with(AgentOptions {
        extra_args: args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
}

#[test]
fn reserved_concurrency_caps_a_function_and_delete_restores_it() {
    let agent = Agent::start();
    let (_t, state) = state_dir();
    create(&agent, "res", &state, json!({}));
    assert_eq!(get_reserved(&agent, "res"), json!({}));
    assert!(agent.get("/2015-03-31/functions/res").json()["Concurrency"].is_null());

    let r = put_reserved(&agent, "res", json!(2));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"ReservedConcurrentExecutions": 2}));
    assert_eq!(
        get_reserved(&agent, "res"),
        json!({"ReservedConcurrentExecutions": 2})
    );
    assert_eq!(
        agent.get("/2015-03-31/functions/res").json()["Concurrency"],
        json!({"ReservedConcurrentExecutions": 2})
    );

    // Exactly two run at once; the third is refused while they are in flight.
    std::thread::scope(|s| {
        let running: Vec<_> = (0..2)
            .map(|_| s.spawn(|| agent.invoke("res", br#""g1""#)))
            .collect();
        wait_until("two invocations in flight", &agent, || started(&state) == 2);
        assert_throttled(
            &agent.invoke("res", b"{}"),
            "ReservedFunctionConcurrentInvocationLimitExceeded",
        );
        release(&state, "g1");
        for h in running {
            let r = h.join().unwrap();
            assert_eq!(r.status, 200, "{}", r.text());
        }
    });
    assert_eq!(agent.invoke("res", b"{}").status, 200);

    // A reservation of 0 throttles every invoke.
    assert_eq!(put_reserved(&agent, "res", json!(0)).status, 200);
    assert_throttled(
        &agent.invoke("res", b"{}"),
        "ReservedFunctionConcurrentInvocationLimitExceeded",
    );

    // Delete: no reservation, three at once run again.
    let r = agent.send("DELETE", "/2017-10-31/functions/res/concurrency", None);
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(get_reserved(&agent, "res"), json!({}));
    assert!(agent.get("/2015-03-31/functions/res").json()["Concurrency"].is_null());
    let before = started(&state);
    std::thread::scope(|s| {
        let running: Vec<_> = (0..3)
            .map(|_| s.spawn(|| agent.invoke("res", br#""g2""#)))
            .collect();
        wait_until("three invocations in flight", &agent, || {
            started(&state) == before + 3
        });
        release(&state, "g2");
        for h in running {
            let r = h.join().unwrap();
            assert_eq!(r.status, 200, "{}", r.text());
        }
    });
}

#[test]
fn unreserved_functions_share_what_reservations_leave() {
    // 3 in all, 1 reserved for "reserved": the others share 2.
    let agent = agent_with(&["--max-concurrency", "3"]);
    let (_t, state) = state_dir();
    create(&agent, "shared", &state, json!({}));
    create(&agent, "reserved", &state, json!({}));
    assert_eq!(put_reserved(&agent, "reserved", json!(1)).status, 200);
    std::thread::scope(|s| {
        let running: Vec<_> = (0..2)
            .map(|_| s.spawn(|| agent.invoke("shared", br#""g""#)))
            .collect();
        wait_until("two invocations in flight", &agent, || started(&state) == 2);
        assert_throttled(
            &agent.invoke("shared", b"{}"),
            "ConcurrentInvocationLimitExceeded",
        );
        // The reservation is still there for its function.
        let r = agent.invoke("reserved", b"{}");
        assert_eq!(r.status, 200, "{}", r.text());
        release(&state, "g");
        for h in running {
            assert_eq!(h.join().unwrap().status, 200);
        }
    });
    assert_eq!(agent.invoke("shared", b"{}").status, 200);
}

#[test]
fn concurrency_settings_are_validated() {
    let agent = agent_with(&["--max-concurrency", "4"]);
    let (_t, state) = state_dir();
    create(&agent, "v1", &state, json!({}));
    create(&agent, "v2", &state, json!({}));

    let r = put_reserved(&agent, "v1", json!(-1));
    assert_eq!(r.status, 400);
    assert_eq!(r.header("x-amzn-errortype"), Some("ValidationException"));
    assert!(
        r.text().contains("greater than or equal to 0"),
        "{}",
        r.text()
    );
    let r = agent.send(
        "PUT",
        "/2017-10-31/functions/v1/concurrency",
        Some(&json!({})),
    );
    assert_eq!(r.header("x-amzn-errortype"), Some("ValidationException"));

    // 4 would leave nothing unreserved (at least 1 must stay).
    let r = put_reserved(&agent, "v1", json!(4));
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(
        r.header("x-amzn-errortype"),
        Some("InvalidParameterValueException")
    );
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("UnreservedConcurrentExecution below its minimum value of [1]"),
        "{}",
        r.text()
    );
    assert_eq!(put_reserved(&agent, "v1", json!(3)).status, 200);
    // Together over the limit; changing v1's own reservation is measured without its old one.
    assert_eq!(put_reserved(&agent, "v2", json!(1)).status, 400);
    assert_eq!(put_reserved(&agent, "v1", json!(2)).status, 200);
    assert_eq!(put_reserved(&agent, "v2", json!(1)).status, 200);
    assert_eq!(
        put_reserved(&agent, "nope", json!(1)).header("x-amzn-errortype"),
        Some("ResourceNotFoundException")
    );

    // Provisioned concurrency: a qualifier is required, only $LATEST exists, at least 1, and
    // no more than the reservation.
    let r = agent.send(
        "PUT",
        "/2019-09-30/functions/v1/provisioned-concurrency",
        Some(&json!({"ProvisionedConcurrentExecutions": 1})),
    );
    assert_eq!(r.header("x-amzn-errortype"), Some("ValidationException"));
    let r = agent.send(
        "PUT",
        "/2019-09-30/functions/v1/provisioned-concurrency?Qualifier=7",
        Some(&json!({"ProvisionedConcurrentExecutions": 1})),
    );
    assert_eq!(r.status, 404, "{}", r.text());
    let r = put_provisioned(&agent, "v1", json!(0));
    assert_eq!(r.header("x-amzn-errortype"), Some("ValidationException"));
    let r = put_provisioned(&agent, "v1", json!(3));
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(
        r.header("x-amzn-errortype"),
        Some("InvalidParameterValueException")
    );
    let r = agent.get(&provisioned_path("v2"));
    assert_eq!(r.status, 404);
    assert_eq!(
        r.header("x-amzn-errortype"),
        Some("ProvisionedConcurrencyConfigNotFoundException")
    );
}

#[test]
fn concurrency_settings_survive_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let (_t, state) = state_dir();
    let opts = || AgentOptions {
        data_dir: Some(data.path().join("data")),
        ..Default::default()
    };
    let mut agent = Agent::start_with(opts());
    create(&agent, "off", &state, json!({}));
    create(&agent, "warm", &state, json!({}));
    assert_eq!(put_reserved(&agent, "off", json!(0)).status, 200);
    assert_eq!(put_provisioned(&agent, "warm", json!(1)).status, 202);
    wait_provisioned_ready(&agent, "warm");
    assert!(agent.stop().success());

    let agent = Agent::start_with(opts());
    assert_eq!(
        get_reserved(&agent, "off"),
        json!({"ReservedConcurrentExecutions": 0})
    );
    assert_throttled(
        &agent.invoke("off", b"{}"),
        "ReservedFunctionConcurrentInvocationLimitExceeded",
    );
    let status = wait_provisioned_ready(&agent, "warm");
    assert_eq!(status["RequestedProvisionedConcurrentExecutions"], 1);
    // One provisioned init per agent.
    assert_eq!(inits(&state).len(), 2, "{:?}", inits(&state));
}

#[test]
fn the_memory_budget_bounds_environments() {
    // Room for two environments of 128 MB.
    let agent = agent_with(&["--memory-budget-mib", "256"]);
    let (_t, state) = state_dir();
    for name in ["m1", "m2", "m3"] {
        create(&agent, name, &state, json!({}));
    }
    std::thread::scope(|s| {
        let a = s.spawn(|| agent.invoke("m1", br#""g""#));
        let b = s.spawn(|| agent.invoke("m2", br#""g""#));
        wait_until("two invocations in flight", &agent, || started(&state) == 2);
        // Both environments are busy: nothing to evict, so the third is throttled.
        assert_throttled(
            &agent.invoke("m3", b"{}"),
            "ConcurrentInvocationLimitExceeded",
        );
        release(&state, "g");
        assert_eq!(a.join().unwrap().status, 200);
        assert_eq!(b.join().unwrap().status, 200);
    });
    assert_eq!(alive_runtimes(&state), 2);
    // Now both are idle: the least recently used one is stopped to make room for m3.
    let r = agent.invoke("m3", b"{}");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(inits(&state).len(), 3);
    wait_until("an idle environment stopped", &agent, || {
        alive_runtimes(&state) == 2
    });
}

#[test]
fn provisioned_concurrency_keeps_environments_initialised() {
    // Idle on-demand environments would go after 1 s; provisioned ones stay.
    let agent = agent_with(&["--idle-timeout", "1"]);
    let (_t, state) = state_dir();
    create(&agent, "prov", &state, json!({}));
    let r = put_provisioned(&agent, "prov", json!(2));
    assert_eq!(r.status, 202, "{}", r.text());
    let body = r.json();
    assert_eq!(body["RequestedProvisionedConcurrentExecutions"], 2);
    assert!(["IN_PROGRESS", "READY"].contains(&body["Status"].as_str().unwrap()));
    assert!(body["LastModified"].is_string());

    let status = wait_provisioned_ready(&agent, "prov");
    assert_eq!(status["AllocatedProvisionedConcurrentExecutions"], 2);
    assert_eq!(status["AvailableProvisionedConcurrentExecutions"], 2);
    let first = inits(&state);
    assert_eq!(first.len(), 2);
    assert!(first.iter().all(|(_, t)| t == "provisioned-concurrency"));

    // Past the idle timeout they are still there, and the first invoke is warm.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(alive_runtimes(&state), 2);
    let r = agent.invoke("prov", b"{}");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["init"], "provisioned-concurrency");
    assert_eq!(inits(&state).len(), 2, "no init for the invoke");

    let list = agent.get("/2019-09-30/functions/prov/provisioned-concurrency?List=ALL");
    assert_eq!(list.status, 200, "{}", list.text());
    let configs = list.json()["ProvisionedConcurrencyConfigs"].clone();
    assert_eq!(configs.as_array().unwrap().len(), 1, "{configs}");
    assert!(configs[0]["FunctionArn"]
        .as_str()
        .unwrap()
        .ends_with(":function:prov:$LATEST"));

    // An environment that dies is replaced.
    let r = agent.invoke("prov", br#""die""#);
    assert_eq!(r.header("x-amz-function-error"), Some("Unhandled"));
    wait_until("a replacement environment", &agent, || {
        inits(&state).len() == 3
    });
    wait_provisioned_ready(&agent, "prov");
    assert_eq!(alive_runtimes(&state), 2);

    // Deleting the configuration stops them.
    let r = agent.send("DELETE", &provisioned_path("prov"), None);
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(agent.get(&provisioned_path("prov")).status, 404);
    wait_until("provisioned environments stopped", &agent, || {
        alive_runtimes(&state) == 0
    });
    // On demand again.
    let r = agent.invoke("prov", b"{}");
    assert_eq!(r.json()["init"], "on-demand");
}

#[test]
fn a_cold_start_does_not_block_warm_invokes_of_other_functions() {
    let agent = Agent::start_with(AgentOptions {
        init_timeout: Some(60),
        ..Default::default()
    });
    let (_ta, slow) = state_dir();
    let (_tb, fast) = state_dir();
    let gate = slow.join("init-gate");
    create(
        &agent,
        "slow",
        &slow,
        json!({"INIT_GATE": gate.display().to_string()}),
    );
    create(&agent, "fast", &fast, json!({}));
    assert_eq!(agent.invoke("fast", b"{}").status, 200);
    std::thread::scope(|s| {
        let cold = s.spawn(|| agent.invoke("slow", b"{}"));
        wait_until("the slow init to begin", &agent, || inits(&slow).len() == 1);
        for _ in 0..3 {
            let r = agent.invoke("fast", b"{}");
            assert_eq!(r.status, 200, "{}", r.text());
        }
        assert!(
            !cold.is_finished(),
            "the slow function's init is still held at its gate"
        );
        std::fs::write(&gate, b"").unwrap();
        let r = cold.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    });
    assert_eq!(inits(&fast).len(), 1, "fast stayed warm throughout");
}

#[test]
fn graceful_shutdown_lets_an_invocation_in_flight_finish() {
    let mut agent = Agent::start();
    let (_t, state) = state_dir();
    create(&agent, "busy", &state, json!({}));
    let url = agent.url.clone();
    let in_flight = std::thread::spawn(move || {
        reqwest::blocking::Client::new()
            .post(format!("{url}/2015-03-31/functions/busy/invocations"))
            .body(r#""g""#)
            .timeout(Duration::from_secs(60))
            .send()
            .map(|r| (r.status().as_u16(), r.text().unwrap_or_default()))
    });
    wait_until("the invocation in flight", &agent, || started(&state) == 1);
    agent.signal(libc::SIGTERM);
    // Closed for new invocations: refused (503) or no connection at all.
    wait_until(
        "new invocations refused",
        &agent,
        || match reqwest::blocking::Client::new()
            .post(format!(
                "{}/2015-03-31/functions/busy/invocations",
                agent.url
            ))
            .body("{}")
            .timeout(Duration::from_secs(10))
            .send()
        {
            Ok(r) => r.status().as_u16() == 503,
            Err(_) => true,
        },
    );
    release(&state, "g");
    let (status, body) = in_flight.join().unwrap().expect("the invocation's answer");
    assert_eq!(status, 200, "{body}");
    assert!(agent.wait_exit(Duration::from_secs(20)).success());
    assert_eq!(alive_runtimes(&state), 0, "every environment is stopped");
}

#[test]
fn shutdown_stops_busy_environments_after_the_grace_period() {
    let mut agent = agent_with(&["--shutdown-timeout", "1"]);
    let (_t, state) = state_dir();
    create(&agent, "stuck", &state, json!({}));
    let url = agent.url.clone();
    let in_flight = std::thread::spawn(move || {
        reqwest::blocking::Client::new()
            .post(format!("{url}/2015-03-31/functions/stuck/invocations"))
            .body(r#""never""#)
            .timeout(Duration::from_secs(60))
            .send()
            .map(|r| r.status().as_u16())
    });
    wait_until("the invocation in flight", &agent, || started(&state) == 1);
    agent.signal(libc::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(20)).success());
    // The caller got no answer of the function's (cut off, or a service error).
    assert!(!matches!(in_flight.join().unwrap(), Ok(200)));
    wait_until("the runtime killed", &agent, || alive_runtimes(&state) == 0);
}
