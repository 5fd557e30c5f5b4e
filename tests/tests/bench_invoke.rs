//! `kindling bench invoke` end to end with tiny numbers: a real `kindling serve --backend
//! process` and a real `cargo lambda watch` (PyPI `cargo-lambda`, in the repo's .venv via
//! scripts/requirements-bench.txt), both serving the `echo-rust` example. No timing
//! assertions: only that both systems answered every request.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kindling_tests::workspace_bin;
use serde_json::Value;

/// The repo's .venv cargo-lambda, where `scripts/test` installs it; `None` leaves the
/// lookup to the bench (`$KINDLING_CARGO_LAMBDA`, then PATH).
fn venv_cargo_lambda() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/cargo-lambda");
    p.is_file().then_some(p)
}

fn bench(extra: &[&str]) -> Output {
    let mut cmd = Command::new(workspace_bin("kindling"));
    cmd.args(["bench", "invoke", "--json", "--requests", "50"])
        .args(["--concurrency", "2", "--warmup", "10", "--rounds", "2"])
        // cargo-lambda's first invocation runs `cargo run`, which may wait for other builds'
        // lock on target/; echo-rust itself is already built by `cargo build --workspace`.
        .args(["--start-timeout", "600"])
        .arg("--echo-rust")
        .arg(workspace_bin("echo-rust"))
        .args(extra);
    if std::env::var_os("KINDLING_CARGO_LAMBDA").is_none() {
        if let Some(p) = venv_cargo_lambda() {
            cmd.arg("--cargo-lambda").arg(p);
        }
    }
    cmd.output().expect("run kindling bench invoke")
}

fn report(out: &Output) -> Value {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench failed ({}):\n{stderr}",
        out.status
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr:\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn assert_clean_run(system: &Value, name: &str) {
    assert_eq!(system["system"], name, "{system}");
    assert_eq!(system["requests"], 50, "{system}");
    assert_eq!(system["concurrency"], 2, "{system}");
    assert_eq!(system["errors"], 0, "{system}");
    assert!(
        system["throughput_rps"].as_f64().unwrap_or(0.0) > 0.0,
        "{system}"
    );
    let (p50, p99, max) = (
        system["p50_ms"].as_f64().unwrap_or(0.0),
        system["p99_ms"].as_f64().unwrap_or(0.0),
        system["max_ms"].as_f64().unwrap_or(0.0),
    );
    assert!(p50 > 0.0 && p50 <= p99 && p99 <= max, "{system}");
    // Two alternating rounds of 25 requests, each with its own throughput.
    let rounds = system["rounds_rps"].as_array().expect("rounds_rps");
    assert_eq!(rounds.len(), 2, "{system}");
    assert!(
        rounds.iter().all(|r| r.as_f64().unwrap_or(0.0) > 0.0),
        "{system}"
    );
}

#[test]
fn bench_invoke_measures_kindling_and_cargo_lambda() {
    let r = report(&bench(&[]));
    let systems = r["systems"].as_array().expect("systems");
    assert_eq!(systems.len(), 2, "{r}");
    assert_clean_run(&systems[0], "kindling");
    assert_clean_run(&systems[1], "cargo-lambda");
    assert_eq!(r["cargo_lambda_skipped"], false);
    assert_eq!(r["profile"], "debug");
    assert_eq!(r["rounds"], 2, "{r}");
    assert_eq!(r["environment_cpus"], "memory", "{r}");
    assert!(
        r["ratios"]["throughput"].as_f64().unwrap_or(0.0) > 0.0,
        "{r}"
    );
    assert!(r["ratios"]["p50"].as_f64().unwrap_or(0.0) > 0.0, "{r}");
}

#[test]
fn bench_invoke_can_skip_cargo_lambda() {
    let out = bench(&["--skip-cargo-lambda", "--environment-cpus", "all"]);
    let r = report(&out);
    assert_eq!(r["environment_cpus"], "all", "{r}");
    let systems = r["systems"].as_array().expect("systems");
    assert_eq!(systems.len(), 1, "{r}");
    assert_clean_run(&systems[0], "kindling");
    assert_eq!(r["cargo_lambda_skipped"], true);
    assert!(r["ratios"].is_null(), "{r}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("only Kindling was measured"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bench_invoke_fails_loudly_without_cargo_lambda() {
    let out = Command::new(workspace_bin("kindling"))
        .args(["bench", "invoke", "--json", "--requests", "5"])
        .args(["--cargo-lambda", "/nonexistent/cargo-lambda"])
        .arg("--echo-rust")
        .arg(workspace_bin("echo-rust"))
        .output()
        .expect("run kindling bench invoke");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(out.stdout.is_empty(), "no report without cargo-lambda");
    assert!(
        stderr.contains("cargo-lambda") && stderr.contains("/nonexistent/cargo-lambda"),
        "{stderr}"
    );
    assert!(stderr.contains("--skip-cargo-lambda"), "{stderr}");
}
