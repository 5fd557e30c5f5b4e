//! The agent's microvm backend end to end: a `provided.al2023` function built on the
//! `lambda_runtime` crate (statically linked) answers from inside a microVM booted by
//! `kindling-vmm`, with `guest-init` as PID 1; a function error, a runtime crash and a timeout
//! inside the VM reach the caller as they do with the process backend; an external extension
//! on the `lambda-extension` crate gets its events inside the VM.
//!
//! Slow on an emulating host (each cold start boots a guest kernel: ~10-15 s here, and a
//! Python runtime's init adds more), so each test walks several paths, reusing the
//! environment where Lambda would.

use base64::Engine as _;
use kindling_tests::{have_kvm, microvm_agent, static_bin, zip, Agent, AgentOptions};
use serde_json::json;

#[test]
fn lambda_runtime_function_in_a_microvm() {
    if !have_kvm("microvm backend test") {
        return;
    }
    let bootstrap = static_bin("echo-rust", "echo-rust");
    let agent = microvm_agent();
    let code = std::fs::read(&bootstrap).unwrap();
    let z = zip(&[("bootstrap", &code, 0o755)]);
    agent.create_ok(
        "echo-vm",
        "provided.al2023",
        "bootstrap",
        &z,
        json!({"Timeout": 5}),
    );

    // Cold start, then a warm invoke in the same VM.
    let r = agent.invoke("echo-vm", br#"{"hello":"vm"}"#);
    assert_eq!(r.status, 200, "{}\n{}", r.text(), agent.log());
    let body = r.json();
    assert_eq!(body["echo"], json!({"hello": "vm"}), "{}", agent.log());
    assert_eq!(body["functionName"], "echo-vm");
    assert_eq!(body["requestId"].as_str(), r.header("x-amzn-requestid"));
    let cold = r.header("x-amzn-requestid").unwrap().to_string();
    let r = agent.invoke_with("echo-vm", br#"{"n":2}"#, &[("X-Amz-Log-Type", "Tail")]);
    assert_eq!(r.json()["echo"], json!({"n": 2}));
    let warm = r.header("x-amzn-requestid").unwrap().to_string();

    // The function log: START/END/REPORT from inside the VM, Init Duration (the guest's
    // measure) on the cold invocation only, no Max Memory Used (not measurable from the host).
    let log = std::fs::read_to_string(agent.data_dir.join("logs/echo-vm.log")).unwrap();
    let report = |rid: &str| {
        log.lines()
            .find_map(|l| {
                l.split_once(&format!("REPORT RequestId: {rid}\t"))
                    .map(|x| x.1)
            })
            .unwrap_or_else(|| panic!("no REPORT for {rid}:\n{log}"))
            .to_string()
    };
    assert!(
        log.contains(&format!("START RequestId: {cold} Version: $LATEST")),
        "{log}"
    );
    assert!(log.contains(&format!("END RequestId: {cold}")), "{log}");
    let (cold_report, warm_report) = (report(&cold), report(&warm));
    assert!(cold_report.starts_with("Duration: ") && cold_report.contains("\tMemory Size: 128 MB"));
    assert!(cold_report.contains("\tInit Duration: "), "{cold_report}");
    assert!(!warm_report.contains("Init Duration") && !warm_report.contains("Max Memory Used"));
    let tail = r.header("x-amz-log-result").expect("X-Amz-Log-Result");
    let tail = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(tail)
            .unwrap(),
    )
    .unwrap();
    assert!(
        tail.starts_with(&format!("START RequestId: {warm}")),
        "{tail}"
    );
    assert!(
        tail.contains(&format!("REPORT RequestId: {warm}\t")),
        "{tail}"
    );

    // A function error.
    let r = agent.invoke("echo-vm", br#"{"fail":"nope"}"#);
    assert_eq!(
        r.header("x-amz-function-error"),
        Some("Unhandled"),
        "{}",
        r.text()
    );
    assert_eq!(r.json()["errorType"], "EchoFailure");
    assert_eq!(r.json()["errorMessage"], "nope");

    // A crash mid-invocation.
    let r = agent.invoke("echo-vm", br#"{"exit":42}"#);
    assert_eq!(
        r.header("x-amz-function-error"),
        Some("Unhandled"),
        "{}",
        r.text()
    );
    assert_eq!(r.json()["errorType"], "Runtime.ExitError", "{}", r.text());
    assert!(r.text().contains("exit status 42"), "{}", r.text());

    // A timeout (function timeout 5 s): the VM is killed, the caller told.
    let r = agent.invoke("echo-vm", br#"{"sleep_ms":60000}"#);
    assert_eq!(r.json()["errorType"], "Sandbox.Timedout", "{}", r.text());
    assert!(
        r.text().contains("Task timed out after 5.00 seconds"),
        "{}",
        r.text()
    );

    // And a fresh environment serves the next one.
    let r = agent.invoke("echo-vm", br#"{"after":"timeout"}"#);
    assert_eq!(
        r.json()["echo"],
        json!({"after": "timeout"}),
        "{}",
        agent.log()
    );
}

/// An external extension (`echo-extension`, on the `lambda-extension` crate) next to the
/// `lambda_runtime` function in a microVM: registered before the runtime starts, it gets each
/// INVOKE (its lines travel to the function log as Log frames).
#[test]
fn lambda_extension_in_a_microvm() {
    if !have_kvm("microvm backend test") {
        return;
    }
    let code = std::fs::read(static_bin("echo-rust", "echo-rust")).unwrap();
    let ext = std::fs::read(static_bin("echo-rust", "echo-extension")).unwrap();
    let agent = microvm_agent();
    agent.create_ok(
        "ext-vm",
        "provided.al2023",
        "bootstrap",
        &zip(&[
            ("bootstrap", &code, 0o755),
            ("extensions/echo-extension", &ext, 0o755),
        ]),
        json!({"Timeout": 10}),
    );
    let invokes: Vec<String> = agent
        .invoke_echoes("ext-vm", 2)
        .iter()
        .map(|rid| format!(" echo-extension: INVOKE {rid}\n"))
        .collect();
    agent.wait_log_lines("ext-vm", &invokes, std::time::Duration::from_secs(30));
}

/// The bundled hello-python example, served by awslambdaric on the python3.11 base image
/// (Debian bookworm + awslambdaric, built once and cached), from inside a microVM, with the
/// agent's default init limit (which the agent raises on an emulating host).
#[test]
fn hello_python_in_a_microvm() {
    if !have_kvm("microvm backend test") {
        return;
    }
    let guest_init =
        rootfs::static_bin::build("guest-init", "guest-init").expect("static guest-init");
    let agent = Agent::start_with(AgentOptions {
        examples: true,
        extra_args: vec![
            "--backend".into(),
            "microvm".into(),
            "--guest-init".into(),
            guest_init.display().to_string(),
        ],
        ..Default::default()
    });
    let r = agent.invoke("hello-python", br#"{"name":"microvm"}"#);
    assert_eq!(r.status, 200, "{}\n{}", r.text(), agent.log());
    let body = r.json();
    assert_eq!(
        body["message"],
        "Hello, microvm!",
        "{body}\n{}",
        agent.log()
    );
    assert_eq!(body["functionName"], "hello-python");
    assert_eq!(body["requestId"].as_str(), r.header("x-amzn-requestid"));
    // A Python exception comes back as Lambda's function error, from the same warm VM.
    let r = agent.invoke("hello-python", br#"{"fail":"from python"}"#);
    assert_eq!(
        r.header("x-amz-function-error"),
        Some("Unhandled"),
        "{}",
        r.text()
    );
    assert_eq!(r.json()["errorType"], "ValueError");
    assert_eq!(r.json()["errorMessage"], "from python");
}
