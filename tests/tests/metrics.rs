//! `GET /metrics` on a real agent (process backend): the text parses as Prometheus/OpenMetrics
//! exposition, and the counters move exactly as invocations, errors, throttles, cold and
//! warm starts happen.

use std::collections::HashMap;
use std::time::Duration;

use kindling_tests::{zip, Agent, AgentOptions};
use serde_json::json;

/// A shell runtime: `sleep` holds the invocation for a while, `fail` posts a function error.
fn bootstrap() -> Vec<u8> {
    let script = r#"#!/bin/sh
set -u
API="http://$AWS_LAMBDA_RUNTIME_API/2018-06-01/runtime"
HDRS="$TMPDIR/headers"
while true; do
  EVENT=$(curl -sf -D "$HDRS" "$API/invocation/next") || exit 3
  RID=$(grep -i '^lambda-runtime-aws-request-id:' "$HDRS" | cut -d' ' -f2 | tr -d '\r')
  case "$EVENT" in
    *sleep*) sleep 3 ;;
    *fail*) curl -sf -X POST "$API/invocation/$RID/error" -d '{"errorMessage":"boom","errorType":"Boom"}' >/dev/null
            continue ;;
  esac
  curl -sf -X POST "$API/invocation/$RID/response" -d '{"ok":true}' >/dev/null
done
"#;
    zip(&[("bootstrap", script.as_bytes(), 0o755)])
}

/// Parses the exposition: every line is a comment (`# HELP`, `# TYPE`, `# EOF`, ...) or
/// `name{labels} value`; returns series -> value.
fn parse(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(c) = line.strip_prefix("# ") {
            let kind = c.split_whitespace().next().unwrap();
            assert!(["HELP", "TYPE", "UNIT", "EOF"].contains(&kind), "{line}");
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect(line);
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "{line:?}");
        }
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        out.insert(series.to_string(), v);
    }
    out
}

fn scrape(agent: &Agent) -> HashMap<String, f64> {
    let r = agent.get("/metrics");
    assert_eq!(r.status, 200);
    let ct = r.header("content-type").unwrap_or("");
    assert!(
        ct.starts_with("application/openmetrics-text") || ct.starts_with("text/plain"),
        "{ct}"
    );
    parse(&r.text())
}

fn get(m: &HashMap<String, f64>, series: &str) -> f64 {
    m.get(series).copied().unwrap_or(0.0)
}

#[test]
fn metrics_count_invocations_errors_throttles_and_starts() {
    // One environment in all: a second function's start evicts the idle one, and a busy one
    // makes the next cold start a throttle.
    let agent = Agent::start_with(AgentOptions {
        max_environments: Some(1),
        ..Default::default()
    });
    let before = scrape(&agent);
    assert_eq!(get(&before, r#"kindling_environments{state="busy"}"#), 0.0);
    assert!(before.contains_key(r#"kindling_environments{state="idle"}"#));
    for name in ["okfn", "errfn", "slowfn"] {
        agent.create_ok(
            name,
            "provided.al2023",
            "bootstrap",
            &bootstrap(),
            json!({"Timeout": 10}),
        );
    }
    for _ in 0..3 {
        let r = agent.invoke("okfn", b"{}");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-amz-function-error"), None);
    }
    let r = agent.invoke("errfn", br#"{"fail":true}"#);
    assert_eq!(r.header("x-amz-function-error"), Some("Unhandled"));

    // slowfn holds the only environment; okfn, whose environment was evicted, is throttled.
    let slow = {
        let url = agent.url.clone();
        std::thread::spawn(move || {
            reqwest::blocking::Client::new()
                .post(format!("{url}/2015-03-31/functions/slowfn/invocations"))
                .body(r#"{"sleep":true}"#)
                .timeout(Duration::from_secs(60))
                .send()
                .unwrap()
                .status()
                .as_u16()
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = scrape(&agent);
        if get(&m, r#"kindling_environments{state="busy"}"#) == 1.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "slowfn never got busy"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = agent.invoke("okfn", b"{}");
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(slow.join().unwrap(), 200);

    let m = scrape(&agent);
    let series = |s: &str| get(&m, s);
    assert_eq!(
        series(r#"kindling_invocations_total{function="okfn",outcome="success"}"#),
        3.0
    );
    assert_eq!(
        series(r#"kindling_invocations_total{function="okfn",outcome="throttled"}"#),
        1.0
    );
    assert_eq!(
        series(r#"kindling_invocations_total{function="errfn",outcome="error"}"#),
        1.0
    );
    assert_eq!(
        series(r#"kindling_invocations_total{function="slowfn",outcome="success"}"#),
        1.0
    );
    assert_eq!(
        series(r#"kindling_function_errors_total{function="errfn"}"#),
        1.0
    );
    assert_eq!(
        series(r#"kindling_function_errors_total{function="okfn"}"#),
        0.0
    );
    assert_eq!(series(r#"kindling_throttles_total{function="okfn"}"#), 1.0);
    assert_eq!(
        series(r#"kindling_cold_starts_total{function="okfn"}"#),
        1.0
    );
    assert_eq!(
        series(r#"kindling_warm_starts_total{function="okfn"}"#),
        2.0
    );
    assert_eq!(
        series(r#"kindling_cold_starts_total{function="errfn"}"#),
        1.0
    );
    assert_eq!(
        series(r#"kindling_warm_starts_total{function="errfn"}"#),
        0.0
    );
    assert_eq!(
        series(r#"kindling_cold_starts_total{function="slowfn"}"#),
        1.0
    );
    assert_eq!(
        series(r#"kindling_init_duration_seconds_count{function="okfn"}"#),
        1.0
    );
    assert_eq!(
        series(r#"kindling_invoke_duration_seconds_count{function="okfn"}"#),
        3.0
    );
    assert!(series(r#"kindling_invoke_duration_seconds_sum{function="slowfn"}"#) >= 3.0);
    // The environments: slowfn's, idle again; nothing else left.
    assert_eq!(series(r#"kindling_environments{state="idle"}"#), 1.0);
    assert_eq!(series(r#"kindling_environments{state="busy"}"#), 0.0);
    assert_eq!(
        series(r#"kindling_environments{state="initializing"}"#),
        0.0
    );
}
