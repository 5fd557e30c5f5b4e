//! `kindling bench invoke`: warm invoke latency and throughput of the `echo-rust` example
//! (`lambda_runtime`) through Kindling (a `kindling serve --backend process` child: the
//! agent's Invoke API, the pool, rapid-api) and through `cargo lambda watch` (its own
//! Runtime API emulator and Invoke API), one after the other in the same run, with the same
//! HTTP client, payload, request count and concurrency.
//!
//! Kindling starts one environment per concurrent invocation (as Lambda does); cargo-lambda
//! gets `--concurrency C` so that it, too, runs C instances instead of queueing requests
//! behind one.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;

use super::load::{Endpoint, Run};
use crate::serve::EnvironmentCpus;
use bytes::Bytes;
use serde::Serialize;
use serde_json::json;

/// The function's name on both systems (cargo-lambda routes by binary name).
const FUNCTION: &str = "echo-rust";
/// Longest one measured request may take (the function answers in microseconds).
const REQUEST_LIMIT: Duration = Duration::from_secs(30);
/// How long a stopping agent or cargo-lambda gets before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// The throughput ratio the issue asks Kindling to reach over cargo-lambda.
pub const TARGET_THROUGHPUT_RATIO: f64 = 2.0;

/// Which cargo profile cargo-lambda builds echo-rust with (Kindling gets the binary itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    Debug,
    Release,
}

#[derive(Debug, Clone)]
pub struct InvokeBenchArgs {
    /// Measured requests per system, over all rounds.
    pub requests: usize,
    /// Measurement rounds, alternating between the systems.
    pub rounds: usize,
    /// The CPUs Kindling's environments run on.
    pub environment_cpus: EnvironmentCpus,
    pub concurrency: usize,
    pub warmup: usize,
    /// The event sent with every request (JSON).
    pub payload: String,
    /// The `kindling` binary to serve with. Default: this executable.
    pub kindling: Option<PathBuf>,
    /// The echo-rust binary uploaded to Kindling. Default: `$KINDLING_ECHO_RUST`, else
    /// beside this executable.
    pub echo_rust: Option<PathBuf>,
    /// The `cargo-lambda` executable. Default: on `PATH`, else the workspace's `.venv/bin`.
    pub cargo_lambda: Option<PathBuf>,
    /// The echo-rust package directory cargo-lambda runs in. Default: the workspace's
    /// `examples/echo-rust`.
    pub function_dir: Option<PathBuf>,
    /// Default: release when the echo-rust binary lives in a `release` directory.
    pub profile: Option<Profile>,
    pub skip_cargo_lambda: bool,
    /// Longest a system may take to answer its first invocation (cargo-lambda compiles then).
    pub start_timeout: Duration,
}

/// `kindling bench invoke`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct InvokeCli {
    /// Measured requests per system (over all rounds).
    #[arg(long, default_value_t = 10000)]
    pub requests: usize,
    /// Measurement rounds: the systems take turns (K, C, K, C, ...) so that drift in the
    /// host's load affects both alike; each system's figures pool its rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// The `kindling serve --environment-cpus` setting Kindling runs with.
    #[arg(long, value_enum, default_value = "memory")]
    pub environment_cpus: EnvironmentCpus,
    /// Requests in flight at once (Kindling then runs that many environments; cargo-lambda
    /// gets `--concurrency` with the same number).
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Unmeasured requests first, at the same concurrency (cargo-lambda starts instances
    /// as it goes: give it time to reach its steady state).
    #[arg(long, default_value_t = 1000)]
    pub warmup: usize,
    /// The event sent with every request (JSON).
    #[arg(long, default_value = r#"{"bench":"kindling"}"#)]
    pub payload: String,
    /// The echo-rust binary given to Kindling (default: beside this executable).
    #[arg(long, env = "KINDLING_ECHO_RUST")]
    pub echo_rust: Option<PathBuf>,
    /// The cargo-lambda executable (default: on PATH, else the workspace's .venv/bin).
    #[arg(long, env = "KINDLING_CARGO_LAMBDA")]
    pub cargo_lambda: Option<PathBuf>,
    /// The echo-rust package directory for cargo-lambda (default: examples/echo-rust).
    #[arg(long)]
    pub function_dir: Option<PathBuf>,
    /// The profile cargo-lambda builds echo-rust with (default: that of --echo-rust).
    #[arg(long, value_enum)]
    pub profile: Option<Profile>,
    /// Only measure Kindling.
    #[arg(long)]
    pub skip_cargo_lambda: bool,
    /// Seconds a system may take to answer its first invocation (cargo-lambda compiles
    /// the function then).
    #[arg(long, default_value_t = 600)]
    pub start_timeout: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `kindling bench invoke` from a blocking thread of the CLI's tokio runtime: progress
/// on stderr, the report on stdout. Fails when the benchmark cannot run or a request failed.
pub fn run_cli(cli: InvokeCli) -> std::process::ExitCode {
    use std::io::IsTerminal as _;
    use std::process::ExitCode;
    let args = InvokeBenchArgs {
        requests: cli.requests,
        rounds: cli.rounds,
        environment_cpus: cli.environment_cpus,
        concurrency: cli.concurrency,
        warmup: cli.warmup,
        payload: cli.payload,
        kindling: None,
        echo_rust: cli.echo_rust,
        cargo_lambda: cli.cargo_lambda,
        function_dir: cli.function_dir,
        profile: cli.profile,
        skip_cargo_lambda: cli.skip_cargo_lambda,
        start_timeout: Duration::from_secs(cli.start_timeout.max(1)),
    };
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        eprintln!("kindling: bench invoke: no async runtime");
        return ExitCode::FAILURE;
    };
    let bar = indicatif::ProgressBar::new(0);
    if std::io::stderr().is_terminal() {
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} requests [{elapsed}]")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let result = handle.block_on(invoke(&args, |p| match p {
        InvokeProgress::Phase(m) => {
            bar.reset();
            bar.set_length(0);
            bar.suspend(|| eprintln!("kindling bench: {m}"));
        }
        InvokeProgress::Requests { done, total } => {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
    }));
    bar.finish_and_clear();
    match result {
        Ok(r) => {
            if cli.json {
                println!("{}", serde_json::to_string(&r).unwrap_or_default());
            } else {
                print!("{}", render(&r));
            }
            if r.cargo_lambda_skipped {
                eprintln!("kindling bench: --skip-cargo-lambda: only Kindling was measured");
            }
            match r.total_errors() {
                0 => ExitCode::SUCCESS,
                n => {
                    eprintln!("kindling: bench invoke: {n} requests failed");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("kindling: bench invoke: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What the benchmark reports while it runs.
#[derive(Debug, Clone)]
pub enum InvokeProgress {
    Phase(String),
    Requests { done: usize, total: usize },
}

/// One system's measured run.
#[derive(Debug, Clone, Serialize)]
pub struct SystemResult {
    /// `kindling` or `cargo-lambda`.
    pub system: String,
    pub requests: usize,
    pub concurrency: usize,
    /// Successful requests per second of the measured phase.
    pub throughput_rps: f64,
    pub elapsed_s: f64,
    pub min_ms: f64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Transport failures, non-200 answers, function errors and unexpected bodies.
    pub errors: usize,
    pub first_error: Option<String>,
    /// CPU time (user + system) of the platform process alone (the agent; cargo-lambda's
    /// emulator), excluding the function instances (the same binary on both), per measured
    /// request, in microseconds. `None` where /proc cannot tell.
    pub platform_cpu_us_per_request: Option<f64>,
    /// Each round's throughput, in order.
    pub rounds_rps: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    /// Kindling's throughput / cargo-lambda's (higher is better for Kindling).
    pub throughput: f64,
    /// Kindling's p50 / cargo-lambda's (lower is better for Kindling).
    pub p50: f64,
    /// Throughput ratio >= 2 and a lower p50.
    pub target_met: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct InvokeReport {
    pub function: String,
    pub profile: Profile,
    pub echo_rust: PathBuf,
    pub requests: usize,
    pub rounds: usize,
    pub concurrency: usize,
    pub warmup: usize,
    pub payload_bytes: usize,
    /// Kindling's `--environment-cpus`.
    pub environment_cpus: EnvironmentCpus,
    pub cpus: usize,
    /// `/proc/loadavg` (1, 5, 15 min) before and after: other work on the host skews numbers.
    pub load_average_start: Option<[f64; 3]>,
    pub load_average_end: Option<[f64; 3]>,
    /// Kindling first, then cargo-lambda (unless skipped).
    pub systems: Vec<SystemResult>,
    pub cargo_lambda_skipped: bool,
    pub ratios: Option<Ratios>,
}

impl InvokeReport {
    pub fn total_errors(&self) -> usize {
        self.systems.iter().map(|s| s.errors).sum()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InvokeBenchError {
    #[error("bad arguments: {0}")]
    Args(String),
    #[error("echo-rust binary {path}: {msg} (build it: `cargo build -p echo-rust`, or pass --echo-rust)")]
    EchoRust { path: PathBuf, msg: String },
    #[error("kindling serve: {0}")]
    Kindling(String),
    #[error(
        "cargo-lambda: {0} (install it: `.venv/bin/pip install -r scripts/requirements-bench.txt`, \
         or pass --skip-cargo-lambda)"
    )]
    CargoLambda(String),
    #[error("{0}")]
    Io(String),
}

type Result<T> = std::result::Result<T, InvokeBenchError>;

/// The workspace this binary was built from (for the defaults that point into it).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// User + system CPU time of one process so far, in milliseconds (`/proc/PID/stat`).
fn process_cpu_ms(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: fields are counted after its ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11); // field 14 = utime, 15 = stime
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    // SAFETY: sysconf(3) only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then(|| (utime + stime) * 1e3 / ticks as f64)
}

fn load_average() -> Option<[f64; 3]> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = s.split_whitespace().map(|w| w.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// Nearest-rank percentile of sorted values (0 when empty).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn locate_cargo_lambda(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(InvokeBenchError::CargoLambda(format!(
                "{} does not exist",
                p.display()
            )))
        };
    }
    find_on_path("cargo-lambda")
        .or_else(|| {
            let venv = workspace_root().join(".venv/bin/cargo-lambda");
            venv.is_file().then_some(venv)
        })
        .ok_or_else(|| {
            InvokeBenchError::CargoLambda(
                "`cargo-lambda` is neither on PATH nor in the workspace's .venv/bin".into(),
            )
        })
}

/// Runs the benchmark: Kindling, then cargo-lambda (each alone on the host, so neither
/// competes with the other for the CPUs).
pub async fn invoke(
    args: &InvokeBenchArgs,
    mut progress: impl FnMut(InvokeProgress),
) -> Result<InvokeReport> {
    if args.requests == 0 || args.concurrency == 0 {
        return Err(InvokeBenchError::Args(
            "--requests and --concurrency must be at least 1".into(),
        ));
    }
    serde_json::from_str::<serde_json::Value>(&args.payload)
        .map_err(|e| InvokeBenchError::Args(format!("--payload is not JSON: {e}")))?;
    let echo_rust = args
        .echo_rust
        .clone()
        .or_else(|| std::env::var_os("KINDLING_ECHO_RUST").map(PathBuf::from))
        .or_else(|| crate::sibling_binary("echo-rust"))
        .unwrap_or_else(|| PathBuf::from("echo-rust"));
    let code = std::fs::read(&echo_rust).map_err(|e| InvokeBenchError::EchoRust {
        path: echo_rust.clone(),
        msg: e.to_string(),
    })?;
    let profile = args.profile.unwrap_or_else(|| {
        if echo_rust.parent().and_then(Path::file_name) == Some("release".as_ref()) {
            Profile::Release
        } else {
            Profile::Debug
        }
    });
    // Find cargo-lambda before spending minutes on Kindling: a missing one fails at once.
    let cargo_lambda = if args.skip_cargo_lambda {
        None
    } else {
        let bin = locate_cargo_lambda(args.cargo_lambda.as_deref())?;
        let dir = args
            .function_dir
            .clone()
            .unwrap_or_else(|| workspace_root().join("examples/echo-rust"));
        let dir = dir.canonicalize().unwrap_or(dir);
        if !dir.join("Cargo.toml").is_file() {
            return Err(InvokeBenchError::CargoLambda(format!(
                "{} is not the echo-rust package directory (pass --function-dir)",
                dir.display()
            )));
        }
        Some((bin, dir))
    };

    let load_average_start = load_average();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .tcp_nodelay(true)
        .build()
        .map_err(|e| InvokeBenchError::Io(format!("HTTP client: {e}")))?;
    let payload = Bytes::from(args.payload.clone().into_bytes());
    let tmp = tempfile::tempdir().map_err(|e| InvokeBenchError::Io(format!("temp dir: {e}")))?;

    // Both systems run side by side (the idle one costs nothing) and take turns.
    progress(InvokeProgress::Phase(
        "kindling: starting `kindling serve --backend process`".into(),
    ));
    let kindling = match &args.kindling {
        Some(k) => k.clone(),
        None => std::env::current_exe()
            .map_err(|e| InvokeBenchError::Kindling(format!("own executable: {e}")))?,
    };
    let agent = Agent::start(
        &kindling,
        tmp.path(),
        args.concurrency,
        args.environment_cpus,
        args.start_timeout,
    )?;
    let zip = crate::functions::build_zip(&[crate::functions::ZipEntry {
        name: "bootstrap".into(),
        data: code,
        mode: 0o755,
    }])
    .map_err(|e| InvokeBenchError::Io(format!("zipping echo-rust: {e}")))?;
    agent.create_function(&client, &zip).await?;
    let kindling_target = Target {
        system: "kindling",
        url: format!("{}/2015-03-31/functions/{FUNCTION}/invocations", agent.url),
        platform_pid: agent.pid,
        watch: None,
    };
    let kindling_err =
        |e: String| InvokeBenchError::Kindling(format!("{e}; agent log: {}", agent.log_tail()));
    prepare(&kindling_target, &payload, args, &mut progress)
        .await
        .map_err(kindling_err)?;

    let watch = match &cargo_lambda {
        Some((bin, dir)) => {
            progress(InvokeProgress::Phase(format!(
                "cargo-lambda: starting `cargo lambda watch --concurrency {}{}` in {}",
                args.concurrency,
                if profile == Profile::Release {
                    " --release"
                } else {
                    ""
                },
                dir.display()
            )));
            Some(CargoLambda::start(
                bin,
                dir,
                tmp.path(),
                args.concurrency,
                profile,
            )?)
        }
        None => None,
    };
    let cargo_target = watch.as_ref().map(|w| Target {
        system: "cargo-lambda",
        url: format!("{}/2015-03-31/functions/{FUNCTION}/invocations", w.url),
        platform_pid: w.pid,
        watch: Some(w),
    });
    let cargo_err = |e: String| {
        let log = watch.as_ref().map(|w| w.log_tail()).unwrap_or_default();
        InvokeBenchError::CargoLambda(format!("{e}; its log: {log}"))
    };
    if let Some(t) = &cargo_target {
        prepare(t, &payload, args, &mut progress)
            .await
            .map_err(cargo_err)?;
    }

    let rounds = args.rounds.clamp(1, args.requests);
    let mut kindling_runs = Vec::new();
    let mut cargo_runs = Vec::new();
    for round in 0..rounds {
        // The requests split evenly; the last round takes the remainder.
        let n = args.requests / rounds
            + if round + 1 == rounds {
                args.requests % rounds
            } else {
                0
            };
        let label = format!("round {}/{rounds}", round + 1);
        kindling_runs
            .push(measure_round(&kindling_target, &payload, n, args, &label, &mut progress).await);
        if let Some(t) = &cargo_target {
            cargo_runs.push(measure_round(t, &payload, n, args, &label, &mut progress).await);
        }
    }
    agent.stop();
    if let Some(w) = &watch {
        w.stop();
    }
    let mut systems = vec![summarize("kindling", args, kindling_runs)];
    if cargo_target.is_some() {
        systems.push(summarize("cargo-lambda", args, cargo_runs));
    }
    for sys in &systems {
        progress(InvokeProgress::Phase(format!(
            "{}: {:.0} req/s, p50 {:.3} ms, {} errors",
            sys.system, sys.throughput_rps, sys.p50_ms, sys.errors
        )));
    }

    let ratios = match systems.as_slice() {
        [k, c] if c.throughput_rps > 0.0 && c.p50_ms > 0.0 => {
            let throughput = k.throughput_rps / c.throughput_rps;
            let p50 = k.p50_ms / c.p50_ms;
            Some(Ratios {
                throughput,
                p50,
                target_met: throughput >= TARGET_THROUGHPUT_RATIO && p50 < 1.0,
            })
        }
        _ => None,
    };
    Ok(InvokeReport {
        function: FUNCTION.into(),
        profile,
        echo_rust,
        requests: args.requests,
        rounds: args.rounds.clamp(1, args.requests),
        concurrency: args.concurrency,
        warmup: args.warmup,
        environment_cpus: args.environment_cpus,
        payload_bytes: payload.len(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        load_average_start,
        load_average_end: load_average(),
        systems,
        cargo_lambda_skipped: cargo_lambda.is_none(),
        ratios,
    })
}

/// One system under test.
struct Target<'a> {
    system: &'static str,
    /// Its Invoke URL for the function.
    url: String,
    /// The platform process (whose CPU time is measured).
    platform_pid: u32,
    /// Watched for an early exit while waiting for the first answer.
    watch: Option<&'a CargoLambda>,
}

/// Waits for the first good answer, then warms up at full concurrency.
async fn prepare(
    target: &Target<'_>,
    payload: &Bytes,
    args: &InvokeBenchArgs,
    progress: &mut impl FnMut(InvokeProgress),
) -> std::result::Result<(), String> {
    let system = target.system;
    progress(InvokeProgress::Phase(format!(
        "{system}: waiting for the first invocation to succeed"
    )));
    let endpoint = Endpoint::parse(&target.url).await?;
    wait_first_answer(&endpoint, payload, args.start_timeout, target.watch).await?;
    if args.warmup > 0 {
        progress(InvokeProgress::Phase(format!(
            "{system}: warming up ({} requests at concurrency {})",
            args.warmup, args.concurrency
        )));
        let warm = drive(
            &target.url,
            payload,
            args.warmup,
            args.concurrency,
            progress,
        )
        .await;
        if warm.errors > 0 {
            return Err(format!(
                "{} of {} warm-up requests failed; first: {}",
                warm.errors,
                args.warmup,
                warm.first_error.unwrap_or_default()
            ));
        }
    }
    Ok(())
}

/// One measured round of `n` requests, with the platform process's CPU time over it.
struct Round {
    run: Run,
    requests: usize,
    platform_cpu_ms: Option<f64>,
}

async fn measure_round(
    target: &Target<'_>,
    payload: &Bytes,
    n: usize,
    args: &InvokeBenchArgs,
    label: &str,
    progress: &mut impl FnMut(InvokeProgress),
) -> Round {
    progress(InvokeProgress::Phase(format!(
        "{}: {label}: measuring {n} requests at concurrency {}",
        target.system, args.concurrency
    )));
    let cpu_before = process_cpu_ms(target.platform_pid);
    let run = drive(&target.url, payload, n, args.concurrency, progress).await;
    let platform_cpu_ms = cpu_before
        .zip(process_cpu_ms(target.platform_pid))
        .map(|(a, b)| b - a);
    Round {
        run,
        requests: n,
        platform_cpu_ms,
    }
}

/// One system's figures over all its rounds: latencies pooled, throughput = answered
/// requests / time spent measuring.
fn summarize(system: &str, args: &InvokeBenchArgs, rounds: Vec<Round>) -> SystemResult {
    let mut lat = Vec::with_capacity(args.requests);
    let (mut secs, mut errors, mut first_error) = (0.0, 0, None);
    let mut cpu_ms = Some(0.0);
    let mut requests = 0;
    let mut rounds_rps = Vec::new();
    for r in rounds {
        let elapsed = r.run.elapsed.as_secs_f64();
        rounds_rps.push(if elapsed > 0.0 {
            r.run.latencies_ms.len() as f64 / elapsed
        } else {
            0.0
        });
        secs += elapsed;
        errors += r.run.errors;
        if first_error.is_none() {
            first_error = r.run.first_error;
        }
        lat.extend(r.run.latencies_ms);
        cpu_ms = cpu_ms.zip(r.platform_cpu_ms).map(|(a, b)| a + b);
        requests += r.requests;
    }
    lat.sort_by(f64::total_cmp);
    let ok = lat.len();
    SystemResult {
        system: system.into(),
        requests,
        concurrency: args.concurrency,
        throughput_rps: if secs > 0.0 { ok as f64 / secs } else { 0.0 },
        elapsed_s: secs,
        min_ms: lat.first().copied().unwrap_or(0.0),
        mean_ms: if ok > 0 {
            lat.iter().sum::<f64>() / ok as f64
        } else {
            0.0
        },
        p50_ms: percentile(&lat, 0.50),
        p90_ms: percentile(&lat, 0.90),
        p99_ms: percentile(&lat, 0.99),
        max_ms: lat.last().copied().unwrap_or(0.0),
        errors,
        first_error,
        platform_cpu_us_per_request: cpu_ms
            .filter(|_| requests > 0)
            .map(|ms| ms * 1e3 / requests as f64),
        rounds_rps,
    }
}

/// Retries until one invocation succeeds while the server is not up yet; fails early when
/// cargo-lambda exits or the server keeps answering with errors (a function that does not
/// build or start would otherwise keep the benchmark waiting for the whole limit).
async fn wait_first_answer(
    endpoint: &Endpoint,
    payload: &Bytes,
    limit: Duration,
    watch: Option<&CargoLambda>,
) -> std::result::Result<(), String> {
    /// Error answers tolerated before giving up (an instance may be restarting).
    const ANSWERED_ERRORS: usize = 3;
    let deadline = Instant::now() + limit;
    let mut answered_errors = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no successful invocation within {limit:?}"));
        }
        let last = match super::load::invoke_once(endpoint, payload, left).await {
            Ok(()) => return Ok(()),
            Err(e) if e.answered => {
                answered_errors += 1;
                if answered_errors >= ANSWERED_ERRORS {
                    return Err(format!(
                        "{answered_errors} invocations failed before any succeeded; last: {}",
                        e.msg
                    ));
                }
                e.msg
            }
            Err(e) => e.msg,
        };
        if let Some(w) = watch {
            if let Some(status) = w.exited() {
                return Err(format!("`cargo lambda watch` exited ({status})"));
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("no successful invocation within {limit:?}: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `total` requests at `concurrency` on the load thread (see [`super::load`]), reporting
/// progress from here.
async fn drive(
    url: &str,
    payload: &Bytes,
    total: usize,
    concurrency: usize,
    progress: &mut impl FnMut(InvokeProgress),
) -> Run {
    let endpoint = match Endpoint::parse(url).await {
        Ok(e) => e,
        Err(e) => {
            return Run {
                latencies_ms: Vec::new(),
                elapsed: Duration::ZERO,
                errors: total,
                first_error: Some(e),
            }
        }
    };
    let done = Arc::new(AtomicUsize::new(0));
    let run = super::load::drive(
        &endpoint,
        payload,
        total,
        concurrency,
        REQUEST_LIMIT,
        done.clone(),
    );
    tokio::pin!(run);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let run = loop {
        tokio::select! {
            run = &mut run => break run,
            _ = tick.tick() => progress(InvokeProgress::Requests {
                done: done.load(Ordering::Relaxed),
                total,
            }),
        }
    };
    progress(InvokeProgress::Requests { done: total, total });
    run
}

fn tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    let from = lines.len().saturating_sub(15);
    format!("\n{}", lines[from..].join("\n"))
}

/// Signals a child's process group (or the child alone), then waits up to the grace
/// period before killing it.
fn stop_child(child: &mut Child, group: bool) {
    let pid = child.id() as libc::pid_t;
    let target = if group { -pid } else { pid };
    // SAFETY: kill(2) on our own unreaped child (or the process group it leads); no memory
    // is involved.
    unsafe {
        libc::kill(target, libc::SIGTERM);
    }
    let deadline = Instant::now() + STOP_GRACE;
    let mut exited = false;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            exited = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if group {
        // SAFETY: as above. The group may hold stragglers after its leader exited; Linux does
        // not hand out a pid that is still some live process group's id, so this cannot hit
        // an unrelated process.
        unsafe {
            libc::kill(target, libc::SIGKILL);
        }
    } else if !exited {
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// A `kindling serve --backend process` child with its own data directory.
struct Agent {
    /// `None` once stopped.
    child: std::sync::Mutex<Option<Child>>,
    url: String,
    pid: u32,
    log: PathBuf,
}

impl Agent {
    fn start(
        kindling: &Path,
        tmp: &Path,
        concurrency: usize,
        environment_cpus: EnvironmentCpus,
        limit: Duration,
    ) -> Result<Agent> {
        let data = tmp.join("kindling-data");
        let log = tmp.join("kindling.log");
        let log_file = std::fs::File::create(&log)
            .map_err(|e| InvokeBenchError::Io(format!("{}: {e}", log.display())))?;
        let mut child = Command::new(kindling)
            .args(["serve", "--backend", "process", "--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(&data)
            .arg("--no-examples")
            .args(["--max-environments", &concurrency.max(64).to_string()])
            .args(["--idle-timeout", "3600"])
            .args(["--environment-cpus", environment_cpus.as_str()])
            // Per-invocation info lines would cost the agent time cargo-lambda does not pay.
            .env("KINDLING_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .map_err(|e| InvokeBenchError::Kindling(format!("{}: {e}", kindling.display())))?;
        let Some(stdout) = child.stdout.take() else {
            stop_child(&mut child, false);
            return Err(InvokeBenchError::Kindling("no stdout pipe".into()));
        };
        let rx = super::listen_url(stdout);
        match rx.recv_timeout(limit) {
            Ok(url) => Ok(Agent {
                pid: child.id(),
                child: std::sync::Mutex::new(Some(child)),
                url,
                log,
            }),
            Err(_) => {
                stop_child(&mut child, false);
                Err(InvokeBenchError::Kindling(format!(
                    "did not start listening within {limit:?}; log: {}",
                    tail(&log)
                )))
            }
        }
    }

    async fn create_function(&self, client: &reqwest::Client, zip: &[u8]) -> Result<()> {
        let body = json!({
            "FunctionName": FUNCTION,
            "Runtime": "provided.al2023",
            "Handler": "bootstrap",
            "Timeout": 30,
            "MemorySize": 128,
            "Code": {"ZipFile": base64::engine::general_purpose::STANDARD.encode(zip)},
        });
        let res = client
            .post(format!("{}/2015-03-31/functions", self.url))
            .json(&body)
            .send()
            .await
            .map_err(|e| InvokeBenchError::Kindling(format!("CreateFunction: {e}")))?;
        let status = res.status();
        if !status.is_success() {
            let text = res.text().await.unwrap_or_default();
            return Err(InvokeBenchError::Kindling(format!(
                "CreateFunction: HTTP {status}: {text}"
            )));
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        tail(&self.log)
    }

    fn stop(&self) {
        if let Some(mut c) = self.child.lock().ok().and_then(|mut c| c.take()) {
            stop_child(&mut c, false);
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(Some(c)) = self.child.get_mut().map(Option::take).as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `cargo lambda watch` in the function's package directory, in its own process group (it
/// starts `cargo run` and the function instances under it).
struct CargoLambda {
    /// `None` once stopped.
    child: std::sync::Mutex<Option<Child>>,
    url: String,
    pid: u32,
    log: PathBuf,
}

impl CargoLambda {
    fn start(
        bin: &Path,
        dir: &Path,
        tmp: &Path,
        concurrency: usize,
        profile: Profile,
    ) -> Result<CargoLambda> {
        use std::os::unix::process::CommandExt as _;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| InvokeBenchError::Io(format!("free port: {e}")))?
            .port();
        let log = tmp.join("cargo-lambda.log");
        let log_file = std::fs::File::create(&log)
            .map_err(|e| InvokeBenchError::Io(format!("{}: {e}", log.display())))?;
        let log_err = log_file
            .try_clone()
            .map_err(|e| InvokeBenchError::Io(e.to_string()))?;
        let mut cmd = Command::new(bin);
        cmd.args(["lambda", "watch", "--invoke-address", "127.0.0.1"])
            .args(["--invoke-port", &port.to_string()])
            // Other edits in the tree must not rebuild and restart the function mid-run.
            .arg("--ignore-changes")
            .args(["--concurrency", &concurrency.to_string()]);
        if profile == Profile::Release {
            cmd.arg("--release");
        }
        cmd.current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .process_group(0);
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
        // which is async-signal-safe; it makes cargo-lambda (which stops its function
        // instances on SIGTERM) go away if the benchmark dies without cleaning up.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| InvokeBenchError::CargoLambda(format!("{}: {e}", bin.display())))?;
        Ok(CargoLambda {
            pid: child.id(),
            child: std::sync::Mutex::new(Some(child)),
            url: format!("http://127.0.0.1:{port}"),
            log,
        })
    }

    /// `Some(status)` once the watch process has exited.
    fn exited(&self) -> Option<String> {
        let mut guard = self.child.lock().ok()?;
        let c = guard.as_mut()?;
        c.try_wait().ok().flatten().map(|s| s.to_string())
    }

    fn log_tail(&self) -> String {
        tail(&self.log)
    }

    fn stop(&self) {
        if let Some(mut c) = self.child.lock().ok().and_then(|mut c| c.take()) {
            stop_child(&mut c, true);
        }
    }
}

impl Drop for CargoLambda {
    fn drop(&mut self) {
        if let Ok(Some(c)) = self.child.get_mut().map(Option::take).as_mut() {
            // SAFETY: kill(2) on the process group our child leads; the child is not reaped
            // yet, so its pid (the group id) cannot have been reused.
            unsafe {
                libc::kill(-(c.id() as libc::pid_t), libc::SIGKILL);
            }
            let _ = c.wait();
        }
    }
}

fn fmt_load(l: Option<[f64; 3]>) -> String {
    l.map_or("unknown".into(), |[a, b, c]| {
        format!("{a:.2} {b:.2} {c:.2}")
    })
}

/// The report as a table.
pub fn render(r: &InvokeReport) -> String {
    let mut s = format!(
        "invoke benchmark: {} (lambda_runtime), {} build, {} requests in {} alternating rounds \
         at concurrency {} after {} warm-up requests, payload {} B; Kindling: process backend, \
         --environment-cpus {}\nhost: {} CPUs, load average {} at the start, {} at the end\n\n",
        r.function,
        match r.profile {
            Profile::Debug => "debug",
            Profile::Release => "release",
        },
        r.requests,
        r.rounds,
        r.concurrency,
        r.warmup,
        r.payload_bytes,
        r.environment_cpus.as_str(),
        r.cpus,
        fmt_load(r.load_average_start),
        fmt_load(r.load_average_end),
    );
    s.push_str(&format!(
        "{:<13} {:>8} {:>5} {:>10} {:>9} {:>9} {:>9} {:>9} {:>7} {:>13}\n",
        "system",
        "requests",
        "conc",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "errors",
        "plat CPU us/r"
    ));
    for x in &r.systems {
        s.push_str(&format!(
            "{:<13} {:>8} {:>5} {:>10.1} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>7} {:>13}\n",
            x.system,
            x.requests,
            x.concurrency,
            x.throughput_rps,
            x.p50_ms,
            x.p90_ms,
            x.p99_ms,
            x.max_ms,
            x.errors,
            x.platform_cpu_us_per_request
                .map_or("-".into(), |c| format!("{c:.1}"))
        ));
    }
    for x in &r.systems {
        let rounds: Vec<String> = x.rounds_rps.iter().map(|r| format!("{r:.0}")).collect();
        s.push_str(&format!(
            "{}: req/s by round: {}\n",
            x.system,
            rounds.join(", ")
        ));
    }
    for x in &r.systems {
        if let Some(e) = &x.first_error {
            s.push_str(&format!("{}: first error: {e}\n", x.system));
        }
    }
    s.push_str(
        "(plat CPU us/r: CPU time of the agent / of cargo-lambda's emulator per request, \
         function instances excluded)\n\n",
    );
    match &r.ratios {
        Some(q) => s.push_str(&format!(
            "kindling / cargo-lambda: throughput x{:.2}, p50 x{:.2} (target: throughput >= \
             x{TARGET_THROUGHPUT_RATIO:.0} and p50 < x1: {})\n",
            q.throughput,
            q.p50,
            if q.target_met { "met" } else { "NOT met" }
        )),
        None if r.cargo_lambda_skipped => {
            s.push_str("cargo-lambda skipped (--skip-cargo-lambda): Kindling's numbers only\n")
        }
        None => s.push_str("no ratios: a system had no successful requests\n"),
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.50), 50.0);
        assert_eq!(percentile(&v, 0.90), 90.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[3.0], 0.5), 3.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn render_shows_ratios_or_says_skipped() {
        let sys = |name: &str, rps: f64, p50: f64| SystemResult {
            system: name.into(),
            requests: 10,
            concurrency: 2,
            throughput_rps: rps,
            elapsed_s: 1.0,
            min_ms: 0.1,
            mean_ms: p50,
            p50_ms: p50,
            p90_ms: p50,
            p99_ms: p50,
            max_ms: p50,
            errors: 0,
            first_error: None,
            platform_cpu_us_per_request: Some(12.5),
            rounds_rps: vec![rps * 0.9, rps * 1.1],
        };
        let mut r = InvokeReport {
            function: FUNCTION.into(),
            profile: Profile::Release,
            echo_rust: "echo-rust".into(),
            requests: 10,
            rounds: 2,
            concurrency: 2,
            warmup: 0,
            environment_cpus: EnvironmentCpus::Memory,
            payload_bytes: 2,
            cpus: 2,
            load_average_start: Some([0.5, 0.25, 0.125]),
            load_average_end: None,
            systems: vec![sys("kindling", 300.0, 1.0), sys("cargo-lambda", 100.0, 2.0)],
            cargo_lambda_skipped: false,
            ratios: Some(Ratios {
                throughput: 3.0,
                p50: 0.5,
                target_met: true,
            }),
        };
        let out = render(&r);
        assert!(out.contains("throughput x3.00, p50 x0.50"), "{out}");
        assert!(out.contains(": met)"), "{out}");
        assert!(out.contains("12.5"), "{out}");
        assert!(out.contains("kindling: req/s by round: 270, 330"), "{out}");
        assert!(out.contains("cargo-lambda"), "{out}");
        r.systems.pop();
        r.ratios = None;
        r.cargo_lambda_skipped = true;
        assert!(render(&r).contains("cargo-lambda skipped"));
    }
}
