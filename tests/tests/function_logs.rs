//! Function logs end to end (process backend): START/END/REPORT in `<data-dir>/logs/<fn>.log`
//! with the runtime's own lines (init lines before the first START), `Init Duration` on the
//! cold invocation only, the platform's timeout and crash lines, `X-Amz-Log-Type: Tail`, and
//! `kindling logs` (plain, `--json`, `-f`).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use base64::Engine as _;
use kindling_tests::{workspace_bin, zip, Agent};
use serde_json::{json, Value};

/// A shell runtime that logs during init and per invocation; the event picks what it does:
/// `big` prints 200 lines, `sleep` outlives any timeout, `crash` exits, `fail` posts an error.
fn logging_bootstrap() -> Vec<u8> {
    let script = r#"#!/bin/sh
set -u
API="http://$AWS_LAMBDA_RUNTIME_API/2018-06-01/runtime"
HDRS="$TMPDIR/headers"
echo "init: warming up"
echo "init: on stderr" >&2
while true; do
  EVENT=$(curl -sf -D "$HDRS" "$API/invocation/next") || exit 3
  RID=$(grep -i '^lambda-runtime-aws-request-id:' "$HDRS" | cut -d' ' -f2 | tr -d '\r')
  echo "handled $RID"
  case "$EVENT" in
    *big*) i=0; while [ $i -lt 200 ]; do echo "filler line $i ......................................"; i=$((i+1)); done
           echo "last line of $RID" ;;
    *sleep*) sleep 10 ;;
    *crash*) echo "crashing $RID"; exit 1 ;;
    *fail*) curl -sf -X POST "$API/invocation/$RID/error" -H 'Lambda-Runtime-Function-Error-Type: Function.Boom' \
              -d '{"errorMessage":"boom","errorType":"Boom"}' >/dev/null; continue ;;
  esac
  curl -sf -X POST "$API/invocation/$RID/response" -d '{"ok":true}' >/dev/null
done
"#;
    zip(&[("bootstrap", script.as_bytes(), 0o755)])
}

fn agent_with(name: &str, extra: Value) -> Agent {
    let agent = Agent::start();
    agent.create_ok(
        name,
        "provided.al2023",
        "bootstrap",
        &logging_bootstrap(),
        extra,
    );
    agent
}

/// The messages of a function's log file (timestamp and stream cut off), checking that every
/// line has both.
fn log_messages(agent: &Agent, name: &str) -> Vec<String> {
    let path = agent.data_dir.join("logs").join(format!("{name}.log"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}\n{}", path.display(), agent.log()));
    text.lines()
        .map(|l| {
            let (ts, rest) = l.split_once(' ').expect("timestamp");
            assert_eq!(ts.len(), 24, "timestamp {ts:?} in {l:?}");
            assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{l:?}");
            let (stream, message) = rest.split_once(' ').expect("stream");
            assert!(stream.contains("/[$LATEST]"), "stream {stream:?}");
            message.to_string()
        })
        .collect()
}

fn invoke_tail(agent: &Agent, name: &str, payload: &[u8]) -> (String, String) {
    let r = agent.invoke_with(name, payload, &[("X-Amz-Log-Type", "Tail")]);
    assert_eq!(r.status, 200, "{}", r.text());
    let rid = r.header("x-amzn-requestid").unwrap().to_string();
    let b64 = r
        .header("x-amz-log-result")
        .unwrap_or_else(|| panic!("no X-Amz-Log-Result\n{}", agent.log()));
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    assert!(raw.len() <= 4096, "tail of {} bytes", raw.len());
    (rid, String::from_utf8(raw).unwrap())
}

/// The fields of a REPORT line, checked against Lambda's layout.
fn report_fields(line: &str, rid: &str) -> Vec<(String, String)> {
    let rest = line
        .strip_prefix(&format!("REPORT RequestId: {rid}\t"))
        .unwrap_or_else(|| panic!("not the REPORT of {rid}: {line:?}"));
    assert!(rest.ends_with('\t'), "REPORT ends with a tab: {line:?}");
    rest.trim_end_matches('\t')
        .split('\t')
        .map(|f| {
            let (k, v) = f.split_once(": ").expect("key: value");
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn field<'a>(fields: &'a [(String, String)], key: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn ms(v: &str) -> f64 {
    v.strip_suffix(" ms").expect("ms").parse().expect("number")
}

#[test]
fn start_end_report_init_lines_and_tail() {
    let agent = agent_with("logger", json!({"MemorySize": 256}));
    let (cold, tail1) = invoke_tail(&agent, "logger", b"{}");
    let (warm, tail2) = invoke_tail(&agent, "logger", b"{}");

    // Tail: exactly this invocation's lines, START to REPORT.
    for (rid, other, tail) in [(&cold, &warm, &tail1), (&warm, &cold, &tail2)] {
        let lines: Vec<&str> = tail.lines().collect();
        assert_eq!(
            lines[0],
            format!("START RequestId: {rid} Version: $LATEST"),
            "{tail}"
        );
        assert_eq!(lines[1], format!("handled {rid}"), "{tail}");
        assert_eq!(lines[2], format!("END RequestId: {rid}"), "{tail}");
        assert!(lines[3].starts_with(&format!("REPORT RequestId: {rid}\t")));
        assert_eq!(lines.len(), 4, "{tail}");
        assert!(
            !tail.contains(other.as_str()) && !tail.contains("init:"),
            "{tail}"
        );
    }

    let log = log_messages(&agent, "logger");
    // Init output (both streams) comes before the first START.
    let first_start = log.iter().position(|l| l.starts_with("START")).unwrap();
    assert!(first_start >= 2, "{log:#?}");
    for init in ["init: warming up", "init: on stderr"] {
        let at = log.iter().position(|l| l == init).expect(init);
        assert!(at < first_start, "{log:#?}");
    }
    for (rid, is_cold) in [(&cold, true), (&warm, false)] {
        let start = log
            .iter()
            .position(|l| *l == format!("START RequestId: {rid} Version: $LATEST"))
            .unwrap();
        assert_eq!(log[start + 1], format!("handled {rid}"));
        assert_eq!(log[start + 2], format!("END RequestId: {rid}"));
        let f = report_fields(&log[start + 3], rid);
        let keys: Vec<&str> = f.iter().map(|(k, _)| k.as_str()).collect();
        let mut want = vec![
            "Duration",
            "Billed Duration",
            "Memory Size",
            "Max Memory Used",
        ];
        if is_cold {
            want.push("Init Duration");
        }
        assert_eq!(keys, want, "{}", log[start + 3]);
        let duration = ms(field(&f, "Duration").unwrap());
        let billed = ms(field(&f, "Billed Duration").unwrap());
        assert!(duration > 0.0);
        // Billed: rounded up to the millisecond.
        assert_eq!(billed, duration.ceil().max(1.0), "{}", log[start + 3]);
        assert_eq!(field(&f, "Memory Size"), Some("256 MB"));
        let mem: u64 = field(&f, "Max Memory Used")
            .unwrap()
            .strip_suffix(" MB")
            .unwrap()
            .parse()
            .unwrap();
        assert!(mem >= 1, "a shell runtime uses some memory");
        if is_cold {
            assert!(ms(field(&f, "Init Duration").unwrap()) > 0.0);
        }
    }

    // A long output: the tail is the last 4 KB, ending with the REPORT line.
    let (rid, tail) = invoke_tail(&agent, "logger", br#"{"big":true}"#);
    assert!(tail.len() > 3000, "{}", tail.len());
    assert!(!tail.contains("START RequestId"), "cut from the front");
    assert!(tail.contains(&format!("last line of {rid}\nEND RequestId: {rid}\n")));
    assert!(tail
        .trim_end()
        .lines()
        .last()
        .unwrap()
        .starts_with("REPORT RequestId"));
    let log = log_messages(&agent, "logger");
    assert!(log.contains(&"filler line 0 ......................................".to_string()));
}

#[test]
fn timeout_and_crash_lines_come_before_end() {
    let agent = agent_with("fragile", json!({"Timeout": 1}));
    let r = agent.invoke("fragile", br#"{"sleep":true}"#);
    assert_eq!(r.header("x-amz-function-error"), Some("Unhandled"));
    let slow = r.header("x-amzn-requestid").unwrap().to_string();
    let (crash, tail) = invoke_tail(&agent, "fragile", br#"{"crash":true}"#);
    let log = log_messages(&agent, "fragile");

    let end = log
        .iter()
        .position(|l| *l == format!("END RequestId: {slow}"))
        .unwrap();
    let (ts, rest) = log[end - 1].split_once(' ').unwrap();
    assert_eq!(ts.len(), 24, "{}", log[end - 1]);
    assert_eq!(rest, format!("{slow} Task timed out after 1.00 seconds"));
    assert_eq!(log[end - 2], format!("handled {slow}"));
    let f = report_fields(&log[end + 1], &slow);
    assert!(ms(field(&f, "Duration").unwrap()) >= 1000.0);
    assert_eq!(field(&f, "Status"), Some("timeout"));

    // The crash: the runtime's last line, then Lambda's two lines, then END (the environment
    // is new after the timeout, so this is a cold start again).
    let lines: Vec<&str> = tail.lines().collect();
    assert_eq!(
        lines[0],
        format!("START RequestId: {crash} Version: $LATEST")
    );
    assert_eq!(lines[1], format!("handled {crash}"));
    assert_eq!(lines[2], format!("crashing {crash}"));
    assert_eq!(
        lines[3],
        format!("RequestId: {crash} Error: Runtime exited with error: exit status 1")
    );
    assert_eq!(lines[4], "Runtime.ExitError");
    assert_eq!(lines[5], format!("END RequestId: {crash}"));
    let f = report_fields(lines[6], &crash);
    assert!(field(&f, "Init Duration").is_some(), "{}", lines[6]);
    assert_eq!(field(&f, "Status"), Some("error"));
    assert_eq!(field(&f, "Error Type"), Some("Runtime.ExitError"));
}

fn kindling_logs(agent: &Agent, args: &[&str]) -> String {
    let out = Command::new(workspace_bin("kindling"))
        .arg("logs")
        .args(args)
        .args(["--endpoint", &agent.url])
        .output()
        .expect("kindling logs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn kindling_logs_prints_filters_and_follows() {
    let agent = agent_with("tailed", json!({}));
    let first = agent.invoke("tailed", b"{}");
    let first = first.header("x-amzn-requestid").unwrap().to_string();

    let text = kindling_logs(&agent, &["tailed"]);
    assert!(text.contains(&format!(" START RequestId: {first} Version: $LATEST\n")));
    assert!(text.contains("init: warming up"), "{text}");
    let json_lines = kindling_logs(&agent, &["tailed", "--json"]);
    let records: Vec<Value> = json_lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(records
        .iter()
        .any(|r| r["message"] == format!("END RequestId: {first}")
            && r["logStream"].as_str().unwrap().contains("[$LATEST]")
            && r["timestamp"].as_str().unwrap().ends_with('Z')));

    // --since: older lines are left out.
    std::thread::sleep(Duration::from_millis(2100));
    let second = agent.invoke("tailed", b"{}");
    let second = second.header("x-amzn-requestid").unwrap().to_string();
    let recent = kindling_logs(&agent, &["tailed", "--since", "2s"]);
    assert!(
        recent.contains(&format!("END RequestId: {second}")),
        "{recent}"
    );
    assert!(!recent.contains(&first), "{recent}");

    // Unknown function: an error, not an empty log.
    let out = Command::new(workspace_bin("kindling"))
        .args(["logs", "nope", "--endpoint", &agent.url])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ResourceNotFoundException"));

    // -f: prints what is there, then new invocations as they happen.
    let mut child = Command::new(workspace_bin("kindling"))
        .args(["logs", "tailed", "-f", "--endpoint", &agent.url])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let wait_for = |needle: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return,
                Ok(_) => {}
                Err(_) => panic!("kindling logs -f never printed {needle:?}"),
            }
        }
    };
    wait_for(&format!("END RequestId: {second}"));
    let third = agent.invoke("tailed", b"{}");
    let third = third.header("x-amzn-requestid").unwrap().to_string();
    wait_for(&format!("handled {third}"));
    wait_for(&format!("REPORT RequestId: {third}"));
    let _ = child.kill();
    let _ = child.wait();
}
