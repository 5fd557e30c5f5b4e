//! `kindling bench image`: what a cold start from a chunked root image fetches, and from
//! where. Each run starts a fresh `kindling serve --backend microvm --l3 file://<scratch>`
//! (own data dir, so an empty L1), creates a function (python3.11 by default, or a `provided`
//! function from `--dir`), invokes it once and reads the agent's `chunked/stats.json`: the
//! image's size and chunks, the chunks the VM fetched, and per tier the chunks, bytes and
//! read latency (p50/p99) the cache served. The first run builds and pushes the image; later
//! runs get the first run's prefetch list (the chunk order its VM fetched). Then the dedup
//! ratio of two python3.11 functions' images sharing the base, pushed into one store.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use image_cache::ops::PushReport;
use serde::Serialize;
use serde_json::{json, Value};

const FUNCTION: &str = "bench-image";
/// Longest one cold start may take (an emulating host boots a Python function in 20-40 s;
/// the first run also builds the image).
const COLD_LIMIT: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum ImageBenchError {
    #[error("{0}")]
    Io(String),
    #[error("kindling: {0}")]
    Agent(String),
    #[error("root image: {0}")]
    Build(String),
    #[error("push: {0}")]
    Push(String),
}

type Result<T> = std::result::Result<T, ImageBenchError>;

#[derive(Debug, Clone, clap::Args)]
pub struct ImageCli {
    /// Cold starts to measure (each a real guest boot: 10-40 s on an emulating host).
    #[arg(long, default_value_t = 2)]
    pub runs: usize,
    /// A directory with a statically linked `bootstrap` to run as a provided.al2023 function
    /// instead of the built-in python3.11 handler.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// memcached nodes to use as L2 (host:port,...); none: L1 and L3 only.
    #[arg(long, value_delimiter = ',')]
    pub l2: Vec<String>,
    /// Skip the dedup measurement (it builds two python3.11 images).
    #[arg(long)]
    pub no_dedup: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub run: usize,
    pub prefetch_list: bool,
    /// The cold invocation as the caller saw it (run 1: includes building and pushing).
    pub cold_invoke_ms: f64,
    pub image_bytes: u64,
    pub image_chunks: u64,
    pub stored_chunks: u64,
    pub fetched_chunks: u64,
    /// `tiers` from the agent's stats.json.
    pub tiers: Vec<Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DedupReport {
    pub first: PushReport,
    pub second: PushReport,
    /// Chunks both images reference / chunks the store holds for them.
    pub ratio: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ImageBenchReport {
    pub runtime: String,
    pub runs: Vec<RunReport>,
    pub dedup: Option<DedupReport>,
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> ImageBenchError {
    let what = what.to_string();
    move |e| ImageBenchError::Io(format!("{what}: {e}"))
}

const HANDLER_PY: &str =
    "def handler(event, context):\n    return {\"ok\": True, \"event\": event}\n";

/// A running agent, killed on drop.
struct Agent {
    child: Child,
    url: String,
    data: PathBuf,
    log: PathBuf,
}

impl Agent {
    fn start(
        kindling: &Path,
        data: &Path,
        store: &Path,
        guest_init: &Path,
        l2: &[String],
    ) -> Result<Agent> {
        std::fs::create_dir_all(data).map_err(io(data.display()))?;
        let log = data.with_extension("log");
        let log_file = std::fs::File::create(&log).map_err(io(log.display()))?;
        let mut cmd = Command::new(kindling);
        cmd.args([
            "serve",
            "--backend",
            "microvm",
            "--listen",
            "127.0.0.1:0",
            "--no-examples",
        ])
        .arg("--data-dir")
        .arg(data)
        .arg("--guest-init")
        .arg(guest_init)
        .args(["--init-timeout", "120", "--idle-timeout", "3600"])
        .arg("--l3")
        .arg(format!("file://{}", store.display()))
        .env("KINDLING_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file);
        if !l2.is_empty() {
            cmd.arg("--l2").arg(l2.join(","));
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| ImageBenchError::Agent(format!("{}: {e}", kindling.display())))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| ImageBenchError::Agent("no stdout pipe".into()))?;
        let rx = super::listen_url(stdout);
        match rx.recv_timeout(COLD_LIMIT) {
            Ok(url) => Ok(Agent {
                child,
                url,
                data: data.to_path_buf(),
                log,
            }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(ImageBenchError::Agent(format!(
                    "did not start; see {}",
                    log.display()
                )))
            }
        }
    }

    fn fail(&self, what: &str) -> ImageBenchError {
        ImageBenchError::Agent(format!("{what}; see {}", self.log.display()))
    }

    /// The stats once the cold start's fetched chunks are recorded.
    fn stats(&self) -> Result<Value> {
        let path = self.data.join("chunked/stats.json");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read(&path) {
                if let Ok(v) = serde_json::from_slice::<Value>(&text) {
                    if v["images"][0]["fetched_chunks"].is_u64() {
                        return Ok(v);
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(self.fail("no chunked/stats.json after the cold start"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn cold_start(agent: &Agent, create: &Value) -> Result<f64> {
    let client = reqwest::Client::builder()
        .timeout(COLD_LIMIT)
        .build()
        .map_err(|e| ImageBenchError::Agent(e.to_string()))?;
    let r = client
        .post(format!("{}/2015-03-31/functions", agent.url))
        .json(create)
        .send()
        .await
        .map_err(|e| agent.fail(&format!("CreateFunction: {e}")))?;
    if !r.status().is_success() {
        let text = r.text().await.unwrap_or_default();
        return Err(agent.fail(&format!("CreateFunction: {text}")));
    }
    let t0 = Instant::now();
    let r = client
        .post(format!(
            "{}/2015-03-31/functions/{FUNCTION}/invocations",
            agent.url
        ))
        .body(r#"{"bench":"image"}"#)
        .send()
        .await
        .map_err(|e| agent.fail(&format!("Invoke: {e}")))?;
    let took = t0.elapsed().as_secs_f64() * 1e3;
    let failed = r.headers().contains_key("x-amz-function-error");
    let (status, text) = (r.status(), r.text().await.unwrap_or_default());
    if !status.is_success() || failed {
        return Err(agent.fail(&format!("Invoke: HTTP {status}: {text}")));
    }
    Ok(took)
}

/// Builds two python3.11 functions' images (different handlers, same base) and pushes both
/// into one fresh store.
async fn dedup(scratch: &Path, guest_init: &Path) -> Result<DedupReport> {
    let base = {
        let t = tokio::task::spawn_blocking(|| rootfs::base::python311(|_| {}));
        t.await
            .map_err(|e| ImageBenchError::Build(e.to_string()))?
            .map_err(|e| ImageBenchError::Build(e.to_string()))?
    };
    let store = image_cache::TierConfig {
        l3: Some(format!("file://{}", scratch.join("dedup-store").display())),
        ..Default::default()
    }
    .store()
    .map_err(|e| ImageBenchError::Push(e.to_string()))?;
    let mut reports = Vec::new();
    for (i, body) in ["return event", "return {'n': len(str(event))}"]
        .iter()
        .enumerate()
    {
        let code = scratch.join(format!("dedup-code-{i}"));
        std::fs::create_dir_all(&code).map_err(io(code.display()))?;
        let py = format!("def handler(event, context):\n    {body}\n");
        std::fs::write(code.join("index.py"), py).map_err(io("index.py"))?;
        let out = scratch.join(format!("dedup-{i}.ext4"));
        let opts = rootfs::image::BuildOptions {
            base: Some(("python3.11".to_string(), base.clone())),
            source: rootfs::image::Source::Dir(code),
            out: out.clone(),
            guest_init: Some(guest_init.to_path_buf()),
            progress: None,
        };
        tokio::task::spawn_blocking(move || rootfs::image::build(opts))
            .await
            .map_err(|e| ImageBenchError::Build(e.to_string()))?
            .map_err(|e| ImageBenchError::Build(e.to_string()))?;
        let r = image_cache::ops::push(&store, &out, &format!("dedup-{i}"), &|_| {})
            .await
            .map_err(|e| ImageBenchError::Push(e.to_string()))?;
        let _ = std::fs::remove_file(&out);
        reports.push(r);
    }
    let second = reports
        .pop()
        .ok_or_else(|| ImageBenchError::Push("no report".into()))?;
    let first = reports
        .pop()
        .ok_or_else(|| ImageBenchError::Push("no report".into()))?;
    let referenced = (first.unique_chunks + second.unique_chunks) as f64;
    let stored = (first.new_chunks + second.new_chunks).max(1) as f64;
    Ok(DedupReport {
        ratio: referenced / stored,
        first,
        second,
    })
}

pub async fn run(cli: &ImageCli, progress: &(dyn Fn(&str) + Sync)) -> Result<ImageBenchReport> {
    let kindling = std::env::current_exe().map_err(io("this executable"))?;
    let guest_init =
        tokio::task::spawn_blocking(|| rootfs::static_bin::build("guest-init", "guest-init"))
            .await
            .map_err(|e| ImageBenchError::Build(e.to_string()))?
            .map_err(|e| ImageBenchError::Build(format!("guest-init: {e}")))?;
    let scratch = tempfile::tempdir().map_err(io("scratch dir"))?;
    let store = scratch.path().join("store");
    let (runtime, zip) = match &cli.dir {
        Some(d) => (
            "provided.al2023",
            crate::functions::zip_dir(d).map_err(|e| ImageBenchError::Io(e.to_string()))?,
        ),
        None => (
            "python3.11",
            crate::functions::build_zip(&[crate::functions::ZipEntry {
                name: "index.py".into(),
                data: HANDLER_PY.as_bytes().to_vec(),
                mode: 0o644,
            }])
            .map_err(|e| ImageBenchError::Io(e.to_string()))?,
        ),
    };
    let create = json!({
        "FunctionName": FUNCTION,
        "Runtime": runtime,
        "Handler": if runtime == "python3.11" { "index.handler" } else { "bootstrap" },
        "Timeout": 60,
        "MemorySize": 256,
        "Code": {"ZipFile": base64::engine::general_purpose::STANDARD.encode(&zip)},
    });
    let mut runs = Vec::new();
    let mut prefetch: Option<(String, PathBuf)> = None;
    for run in 1..=cli.runs.max(1) {
        progress(&format!("cold start {run}/{}", cli.runs.max(1)));
        let data = scratch.path().join(format!("run-{run}"));
        if let Some((name, file)) = &prefetch {
            let dir = data.join("chunked");
            std::fs::create_dir_all(&dir).map_err(io(dir.display()))?;
            std::fs::copy(file, dir.join(format!("{name}.prefetch")))
                .map_err(io("prefetch list"))?;
        }
        let agent = Agent::start(&kindling, &data, &store, &guest_init, &cli.l2)?;
        let cold_invoke_ms = cold_start(&agent, &create).await?;
        let stats = agent.stats()?;
        let img = &stats["images"][0];
        let num = |k: &str| img[k].as_u64().unwrap_or(0);
        if prefetch.is_none() {
            if let Some(name) = img["name"].as_str() {
                let file = data.join(format!("chunked/{name}.prefetch"));
                if file.is_file() {
                    prefetch = Some((name.to_string(), file));
                }
            }
        }
        runs.push(RunReport {
            run,
            prefetch_list: img["prefetched"] == true,
            cold_invoke_ms,
            image_bytes: num("image_bytes"),
            image_chunks: num("chunks"),
            stored_chunks: num("stored_chunks"),
            fetched_chunks: num("fetched_chunks"),
            tiers: stats["tiers"].as_array().cloned().unwrap_or_default(),
        });
    }
    let dedup = if cli.no_dedup {
        None
    } else {
        progress("dedup: building two python3.11 images");
        Some(dedup(scratch.path(), &guest_init).await?)
    };
    Ok(ImageBenchReport {
        runtime: runtime.into(),
        runs,
        dedup,
    })
}

fn ms(us: &Value) -> String {
    image_cache::cache::fmt_us(us.as_u64())
}

pub fn render(r: &ImageBenchReport) -> String {
    let mut s = String::new();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    s.push_str(&format!(
        "kindling bench image ({} function, cold starts from a chunked root image)\n",
        r.runtime
    ));
    for run in &r.runs {
        s.push_str(&format!(
            "\nrun {}{}: cold invoke {:.0} ms{}\n  image {:.1} MiB, {} chunks ({} with data); the VM fetched {} chunks ({:.1} MiB): {:.0} % of the image, {:.0} % of its data\n",
            run.run,
            if run.prefetch_list { " (prefetch list)" } else { "" },
            run.cold_invoke_ms,
            if run.run == 1 { " (includes building and pushing the image)" } else { "" },
            mib(run.image_bytes),
            run.image_chunks,
            run.stored_chunks,
            run.fetched_chunks,
            mib(run.fetched_chunks * u64::from(image_cache::CHUNK_SIZE)),
            100.0 * run.fetched_chunks as f64 / run.image_chunks.max(1) as f64,
            100.0 * run.fetched_chunks as f64 / run.stored_chunks.max(1) as f64,
        ));
        s.push_str(&format!(
            "  {:<5} {:>7} {:>10} {:>10} {:>10}\n",
            "TIER", "CHUNKS", "MIB", "P50", "P99"
        ));
        for t in &run.tiers {
            s.push_str(&format!(
                "  {:<5} {:>7} {:>10.1} {:>10} {:>10}\n",
                t["tier"].as_str().unwrap_or("?"),
                t["hits"].as_u64().unwrap_or(0),
                mib(t["bytes"].as_u64().unwrap_or(0)),
                ms(&t["p50_us"]),
                ms(&t["p99_us"]),
            ));
        }
    }
    if let Some(d) = &r.dedup {
        s.push_str(&format!(
            "\ndedup, two python3.11 functions' images in one store: {} + {} chunks referenced, {} + {} stored ({:.1} MiB + {:.1} MiB): ratio {:.2}\n",
            d.first.unique_chunks,
            d.second.unique_chunks,
            d.first.new_chunks,
            d.second.new_chunks,
            mib(d.first.new_bytes),
            mib(d.second.new_bytes),
            d.ratio
        ));
    }
    s
}

pub fn run_cli(cli: ImageCli) -> ExitCode {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        eprintln!("kindling bench image: no async runtime");
        return ExitCode::FAILURE;
    };
    let quiet = cli.json;
    let result = handle.block_on(run(&cli, &|p| {
        if !quiet {
            eprintln!("kindling bench image: {p}");
        }
    }));
    match result {
        Ok(r) if cli.json => match serde_json::to_string_pretty(&r) {
            Ok(t) => {
                println!("{t}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("kindling bench image: {e}");
                ExitCode::FAILURE
            }
        },
        Ok(r) => {
            print!("{}", render(&r));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kindling bench image: {e}");
            ExitCode::FAILURE
        }
    }
}
