//! A load test of the agent as a platform (process backend): 10,000 invocations across four
//! functions (two `lambda_runtime` functions and one `awslambdaric` function invoked
//! synchronously, and a Python function receiving asynchronous `Event` invocations that
//! records each event it gets), at a bounded client concurrency, with a cap on environments.
//! It asserts zero errors and zero lost events, and prints throughput and latency (for the
//! record, never asserted: timing depends on the machine).

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kindling_tests::{workspace_bin, zip, Agent, AgentOptions};
use serde_json::json;

const TOTAL: usize = 10_000;
/// One invocation in four is asynchronous.
const EVENTS: usize = TOTAL / 4;
const CLIENTS: usize = 8;
const ASYNC_WORKERS: usize = 4;
const MAX_ENVS: usize = 16;

const RECORDER: &str = r#"import os

def handler(event, context):
    # One short O_APPEND write per event: lines from concurrent environments never interleave.
    with open(os.environ["RECORD_FILE"], "a") as f:
        f.write(event["id"] + "\n")
    return {"recorded": event["id"]}
"#;

const PY_ECHO: &str = r#"def handler(event, context):
    return {"echo": event, "requestId": context.aws_request_id}
"#;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[test]
fn ten_thousand_invocations_across_four_functions() {
    // Bounded: 8 clients plus 4 event workers never need more than the 16 environments.
    let agent = Agent::start_with(AgentOptions {
        max_environments: Some(MAX_ENVS),
        extra_args: vec!["--async-concurrency".into(), ASYNC_WORKERS.to_string()],
        ..Default::default()
    });
    let t = tempfile::tempdir().unwrap();
    let record = t.path().join("events.txt");
    let rust = std::fs::read(workspace_bin("echo-rust")).unwrap();
    let rust_zip = zip(&[("bootstrap", &rust, 0o755)]);
    for name in ["load-rust-a", "load-rust-b"] {
        agent.create_ok(
            name,
            "provided.al2023",
            "bootstrap",
            &rust_zip,
            json!({"Timeout": 30}),
        );
    }
    agent.create_ok(
        "load-py",
        "python3.11",
        "app.handler",
        &zip(&[("app.py", PY_ECHO.as_bytes(), 0o644)]),
        json!({"Timeout": 30}),
    );
    agent.create_ok(
        "load-events",
        "python3.11",
        "app.handler",
        &zip(&[("app.py", RECORDER.as_bytes(), 0o644)]),
        json!({"Timeout": 30, "Environment": {"Variables": {"RECORD_FILE": record.display().to_string()}}}),
    );

    let next = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(TOTAL)));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let started = Instant::now();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (next, latencies, errors) = (next.clone(), latencies.clone(), errors.clone());
            let url = agent.url.clone();
            std::thread::spawn(move || {
                let http = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(120))
                    .build()
                    .unwrap();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= TOTAL {
                        break;
                    }
                    // Every fourth invocation is an event; the rest rotate over the three
                    // synchronous functions.
                    let (name, event) = match i % 4 {
                        0 => ("load-events", true),
                        1 => ("load-rust-a", false),
                        2 => ("load-rust-b", false),
                        _ => ("load-py", false),
                    };
                    let payload = json!({"id": format!("ev-{i}"), "i": i}).to_string();
                    let mut req = http
                        .post(format!("{url}/2015-03-31/functions/{name}/invocations"))
                        .body(payload);
                    if event {
                        req = req.header("X-Amz-Invocation-Type", "Event");
                    }
                    let t0 = Instant::now();
                    let res = req.send();
                    let took = t0.elapsed();
                    let problem = match res {
                        Err(e) => Some(format!("{name} #{i}: {e}")),
                        Ok(r) => {
                            let status = r.status().as_u16();
                            let fe = r.headers().get("x-amz-function-error").is_some();
                            let body = r.text().unwrap_or_default();
                            let want = if event { 202 } else { 200 };
                            if status != want || fe {
                                Some(format!("{name} #{i}: {status} {body}"))
                            } else if !event && !body.contains(&format!("ev-{i}")) {
                                Some(format!("{name} #{i}: wrong answer {body}"))
                            } else {
                                None
                            }
                        }
                    };
                    match problem {
                        Some(p) => errors.lock().unwrap().push(p),
                        None => latencies.lock().unwrap().push((event, took)),
                    }
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    let sent_in = started.elapsed();
    let errors = errors.lock().unwrap().clone();
    assert!(
        errors.is_empty(),
        "{} failed invocations, first: {:?}\n{}",
        errors.len(),
        &errors[..errors.len().min(5)],
        agent.log()
    );

    // Every accepted event runs (at least once).
    let want: HashSet<String> = (0..TOTAL)
        .filter(|i| i % 4 == 0)
        .map(|i| format!("ev-{i}"))
        .collect();
    assert_eq!(want.len(), EVENTS);
    let deadline = Instant::now() + Duration::from_secs(300);
    let (seen, lines) = loop {
        let text = std::fs::read_to_string(&record).unwrap_or_default();
        let lines = text.lines().count();
        let seen: HashSet<String> = text.lines().map(str::to_string).collect();
        if want.is_subset(&seen) || Instant::now() > deadline {
            break (seen, lines);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let all_done = started.elapsed();
    let lost: Vec<_> = want.difference(&seen).take(5).collect();
    assert!(
        lost.is_empty(),
        "{} events lost, e.g. {lost:?}\n{}",
        want.difference(&seen).count(),
        agent.log()
    );
    assert!(seen.is_subset(&want), "recorded events nobody sent");

    let lat = latencies.lock().unwrap();
    let mut sync: Vec<Duration> = lat.iter().filter(|(e, _)| !e).map(|(_, d)| *d).collect();
    let mut accept: Vec<Duration> = lat.iter().filter(|(e, _)| *e).map(|(_, d)| *d).collect();
    sync.sort();
    accept.sort();
    eprintln!(
        "LOAD: {TOTAL} invocations ({} sync over 3 functions, {EVENTS} events) with {CLIENTS} clients, \
         {ASYNC_WORKERS} event workers, max {MAX_ENVS} environments: all answered in {:.2} s ({:.0} req/s); all events run after {:.2} s \
         ({} deliveries for {EVENTS} events); sync p50 {:.2} ms p99 {:.2} ms; event accept p50 {:.2} ms \
         p99 {:.2} ms; 0 errors, 0 lost",
        sync.len(),
        sent_in.as_secs_f64(),
        TOTAL as f64 / sent_in.as_secs_f64(),
        all_done.as_secs_f64(),
        lines,
        percentile(&sync, 50.0).as_secs_f64() * 1e3,
        percentile(&sync, 99.0).as_secs_f64() * 1e3,
        percentile(&accept, 50.0).as_secs_f64() * 1e3,
        percentile(&accept, 99.0).as_secs_f64() * 1e3,
    );
    assert_eq!(sync.len(), TOTAL - EVENTS);
}
