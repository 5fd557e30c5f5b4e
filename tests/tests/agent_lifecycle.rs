//! The agent as a whole: the examples, persistence across restarts, clean shutdown, the CLI.

use std::process::Command;

use kindling_tests::{process_alive, shell_bootstrap, workspace_bin, Agent, AgentOptions};
use serde_json::{json, Value};

#[test]
fn bundled_examples_answer() {
    let agent = Agent::start_with(AgentOptions {
        examples: true,
        ..Default::default()
    });
    let r = agent.invoke("hello-python", br#"{"name":"kindling"}"#);
    assert_eq!(r.status, 200, "{}\n{}", r.text(), agent.log());
    assert_eq!(r.json()["message"], "Hello, kindling!");
    let r = agent.invoke("echo-rust", br#"{"x":1}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["echo"], json!({"x": 1}));
    assert_eq!(r.json()["functionName"], "echo-rust");
    let r = agent.invoke("echo-rust", br#"{"fail":"no"}"#);
    assert_eq!(r.header("x-amz-function-error"), Some("Unhandled"));
    assert_eq!(r.json()["errorType"], "EchoFailure");
}

#[test]
fn deleted_example_stays_deleted_after_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    let opts = || AgentOptions {
        examples: true,
        data_dir: Some(data.clone()),
        ..Default::default()
    };
    let mut agent = Agent::start_with(opts());
    assert_eq!(agent.delete("hello-python").status, 204);
    assert!(agent.stop().success());
    let agent = Agent::start_with(opts());
    assert_eq!(agent.invoke("hello-python", b"{}").status, 404);
    assert_eq!(agent.invoke("echo-rust", b"{}").status, 200);
}

#[test]
fn functions_persist_across_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    let opts = || AgentOptions {
        data_dir: Some(data.clone()),
        ..Default::default()
    };
    let mut agent = Agent::start_with(opts());
    let zip = shell_bootstrap(r#"respond "{\"greeting\":\"$GREETING\"}""#);
    agent.create_ok(
        "keeper",
        "provided.al2",
        "bootstrap",
        &zip,
        json!({"Environment": {"Variables": {"GREETING": "hej"}}, "MemorySize": 256}),
    );
    assert!(agent.stop().success());

    let agent = Agent::start_with(opts());
    let cfg = agent.get("/2015-03-31/functions/keeper").json();
    assert_eq!(cfg["Configuration"]["MemorySize"], 256);
    assert_eq!(
        agent.invoke("keeper", b"{}").json(),
        json!({"greeting": "hej"})
    );
}

#[test]
fn sigint_stops_cleanly_and_kills_runtimes() {
    let mut agent = Agent::start();
    let zip = shell_bootstrap(r#"respond "{\"pid\":$$}""#);
    agent.create_ok("pidder", "provided.al2023", "bootstrap", &zip, json!({}));
    let pid = agent.invoke("pidder", b"{}").json()["pid"]
        .as_i64()
        .unwrap();
    assert!(process_alive(pid), "warm runtime should be running");
    let status = agent.stop();
    assert!(status.success(), "exit status {status}");
    // Give the kernel a moment to deliver SIGKILL to the process group.
    for _ in 0..50 {
        if !process_alive(pid) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(!process_alive(pid), "runtime {pid} survived the agent");
}

#[test]
fn cli_create_list_invoke_delete() {
    let agent = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("app.py"),
        "def handler(event, context):\n    return {'doubled': event['n'] * 2}\n",
    )
    .unwrap();
    let kindling = |args: &[&str]| {
        let out = Command::new(workspace_bin("kindling"))
            .args(args)
            .env("KINDLING_ENDPOINT", &agent.url)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let dir_s = dir.path().to_str().unwrap();
    let (code, out, err) = kindling(&[
        "function",
        "create",
        "doubler",
        "--runtime",
        "python3.11",
        "--handler",
        "app.handler",
        "--dir",
        dir_s,
        "--env",
        "AB=c",
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["FunctionName"],
        "doubler"
    );

    let (code, out, _) = kindling(&["function", "list", "--json"]);
    assert_eq!(code, Some(0));
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list[0]["FunctionName"], "doubler");

    let (code, out, err) = kindling(&["invoke", "doubler", "--payload", r#"{"n":21}"#]);
    assert_eq!(code, Some(0), "{err}\n{}", agent.log());
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap(),
        json!({"doubled": 42})
    );

    // A function error: printed, and a non-zero exit.
    let (code, out, err) = kindling(&["invoke", "doubler", "--payload", r#"{}"#]);
    assert_eq!(code, Some(1));
    assert!(out.contains("KeyError"), "{out}");
    assert!(err.contains("Unhandled"), "{err}");
    let (code, out, _) = kindling(&["invoke", "doubler", "--payload", r#"{}"#, "--json"]);
    assert_eq!(code, Some(0));
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["FunctionError"],
        "Unhandled"
    );

    let (code, _, _) = kindling(&["function", "delete", "doubler"]);
    assert_eq!(code, Some(0));
    let (code, _, err) = kindling(&["invoke", "doubler"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("ResourceNotFoundException"), "{err}");

    // No agent at the endpoint: a clear error.
    let out = Command::new(workspace_bin("kindling"))
        .args(["function", "list", "--endpoint", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is `kindling serve` running?"));
}

#[test]
fn a_second_agent_on_the_same_data_dir_is_refused() {
    let agent = Agent::start();
    let out = Command::new(workspace_bin("kindling"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--no-examples",
            "--data-dir",
        ])
        .arg(&agent.data_dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("in use by another kindling (pid {})", agent.pid())),
        "{err}"
    );
    // The first agent is unharmed.
    let r = agent.get("/2015-03-31/functions/");
    assert_eq!(r.status, 200);
}
