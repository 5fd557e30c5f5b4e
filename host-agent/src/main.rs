//! `kindling`: the Kindling agent and its command-line client.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use host_agent::cli::{create_body, CliError, Client, CreateArgs};
use host_agent::serve::{self, BackendKind, EnvironmentCpus, ServeConfig};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "kindling",
    version,
    about = "A Lambda-compatible serverless runtime for KVM hosts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: Lambda's API on one listener, functions in sandboxes.
    Serve(ServeArgs),
    /// Invoke a function and print its response.
    Invoke {
        /// Function name or ARN.
        name: String,
        /// The event (JSON). Default: {}.
        #[arg(long, default_value = "{}")]
        payload: String,
        #[command(flatten)]
        conn: Conn,
        /// Print {StatusCode, FunctionError, ExecutedVersion, Payload} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a function's log (START/END/REPORT and the runtime's lines), from the agent.
    Logs {
        /// Function name.
        name: String,
        /// Keep printing new lines as they are written (like `tail -f`).
        #[arg(short, long)]
        follow: bool,
        /// Only lines from this far back: 90, 30s, 5m, 2h, 1d, 1h30m.
        #[arg(long)]
        since: Option<String>,
        /// One JSON object per line: {timestamp, logStream, message}.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Manage functions.
    #[command(subcommand)]
    Function(FunctionCmd),
    /// The microVM guest kernel (built from Debian's linux-source-6.1, cached).
    #[command(subcommand)]
    Kernel(KernelCmd),
    /// Root images for microVMs: build (read-only ext4), and chunked storage (push, pull, ls, gc).
    #[command(subcommand)]
    Image(ImageCmd),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Read the local queues that asynchronous invocations' destinations write to
    /// (`arn:aws:sqs:REGION:ACCOUNT:QUEUE`), e.g. the failure records of a dead-letter queue.
    #[command(subcommand)]
    Dlq(DlqCmd),
}

#[derive(Subcommand)]
enum DlqCmd {
    /// List the queues that hold messages, with their message counts.
    List {
        #[command(flatten)]
        conn: Conn,
        /// Print {Queues: [{Name, Messages}]} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a queue's messages, oldest first (they stay in the queue).
    Read {
        queue: String,
        #[command(flatten)]
        conn: Conn,
        /// Print {Queue, Messages: [{MessageId, SentTimestamp, Body}]} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete every message of a queue.
    Purge {
        queue: String,
        #[command(flatten)]
        conn: Conn,
    },
}

async fn run_dlq(cmd: DlqCmd) -> Result<ExitCode, CliError> {
    match cmd {
        DlqCmd::List { conn, json } => {
            let v = Client::new(&conn.endpoint).queues().await?;
            if json {
                println!("{v}");
            } else {
                println!("{:<40} {:>9}", "QUEUE", "MESSAGES");
                for q in v["Queues"].as_array().into_iter().flatten() {
                    println!(
                        "{:<40} {:>9}",
                        q["Name"].as_str().unwrap_or(""),
                        q["Messages"]
                    );
                }
            }
        }
        DlqCmd::Read { queue, conn, json } => {
            let v = Client::new(&conn.endpoint).queue_messages(&queue).await?;
            if json {
                println!("{v}");
            } else {
                // One message body per line (records are JSON documents).
                for m in v["Messages"].as_array().into_iter().flatten() {
                    println!("{}", m["Body"].as_str().unwrap_or(""));
                }
            }
        }
        DlqCmd::Purge { queue, conn } => {
            let v = Client::new(&conn.endpoint).purge_queue(&queue).await?;
            eprintln!("deleted {} messages from {queue}", v["Deleted"]);
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Build a root image: function code (a directory or a Lambda ZIP) on the `provided` base,
    /// or an OCI image (layout directory or `docker save` tarball).
    #[command(group(clap::ArgGroup::new("source").required(true).args(["from_dir", "from_zip", "from_oci"])))]
    Build {
        /// A directory of function code (goes to /var/task).
        #[arg(long)]
        from_dir: Option<PathBuf>,
        /// A Lambda ZIP (unpacked into /var/task).
        #[arg(long)]
        from_zip: Option<PathBuf>,
        /// An OCI layout directory or a `docker save` tarball.
        #[arg(long)]
        from_oci: Option<PathBuf>,
        /// The image file to write.
        #[arg(long)]
        out: PathBuf,
        /// A static guest-init (default for --from-dir/--from-zip: built from the workspace;
        /// for --from-oci: none installed unless given).
        #[arg(long, env = "KINDLING_GUEST_INIT")]
        guest_init: Option<PathBuf>,
        /// Print {image, bytes, files, source, warnings} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Chunk an image file (512 KiB, SHA-256, deduplicated) into the image store (L3).
    Push(image_cache::cli::PushArgs),
    /// Rebuild an image file from the store through the L1/L2/L3 chunk cache.
    Pull(image_cache::cli::PullArgs),
    /// List the images in the store.
    Ls(image_cache::cli::LsArgs),
    /// Delete chunks that no image references.
    Gc(image_cache::cli::GcArgs),
    /// Serve chunks to VMMs on a Unix socket, through the cache.
    ChunkServer(image_cache::cli::ChunkServerArgs),
}

fn run_image(cmd: ImageCmd) -> ExitCode {
    use rootfs::image::{BuildOptions, Progress, Source};
    use std::io::IsTerminal;
    let ImageCmd::Build {
        from_dir,
        from_zip,
        from_oci,
        out,
        guest_init,
        json,
    } = cmd
    else {
        eprintln!("kindling: internal error: chunked image commands run on the async runtime");
        return ExitCode::FAILURE;
    };
    let source = match (from_dir, from_zip, from_oci) {
        (Some(d), _, _) => Source::Dir(d),
        (_, Some(z), _) => Source::Zip(z),
        (_, _, Some(o)) => Source::Oci(o),
        _ => {
            eprintln!("kindling: one of --from-dir, --from-zip, --from-oci is required");
            return ExitCode::from(2);
        }
    };
    let tty = std::io::stderr().is_terminal() && !json;
    let bar = indicatif::ProgressBar::new_spinner();
    if tty {
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed}] {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let guest_init = match (guest_init, &source) {
        (Some(g), _) => Some(g),
        (None, Source::Oci(_)) => None,
        (None, _) => {
            let line = "kindling image: building the static guest-init";
            if tty {
                bar.println(line);
            } else {
                eprintln!("{line}");
            }
            match rootfs::static_bin::build("guest-init", "guest-init") {
                Ok(p) => Some(p),
                Err(e) => {
                    bar.finish_and_clear();
                    eprintln!("kindling: guest-init: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    let pb = bar.clone();
    let progress = move |p: &Progress| {
        let line = match p {
            Progress::Phase(m) => format!("kindling image: {m}"),
            Progress::Warning(w) => format!("kindling image: warning: {w}"),
        };
        if tty {
            pb.println(&line);
            if let Progress::Phase(m) = p {
                pb.set_message(m.clone());
            }
        } else {
            eprintln!("{line}");
        }
    };
    let result = rootfs::image::build(BuildOptions {
        base: None,
        source,
        out,
        guest_init,
        progress: Some(Box::new(progress)),
    });
    bar.finish_and_clear();
    match result {
        Ok(r) if json => {
            let out = json!({
                "image": r.image,
                "bytes": r.bytes,
                "files": r.files,
                "source": r.source,
                "warnings": r.warnings,
            });
            println!("{out}");
            ExitCode::SUCCESS
        }
        Ok(r) => {
            println!(
                "{} ({} bytes, {:.1} MiB, {} files)",
                r.image.display(),
                r.bytes,
                r.bytes as f64 / (1024.0 * 1024.0),
                r.files
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kindling: image build: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Boot the guest kernel N times to a boot-only init: boot time (wall, VMM CPU), VMM setup
    /// time and VMM memory overhead.
    Boot {
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 128)]
        mem: u32,
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        /// Kernel flavour when --kernel is not given: smp or up.
        #[arg(long, default_value = "smp")]
        flavour: rootfs::Flavour,
        /// A vmlinux to boot instead of the cached guest kernel.
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// A static init to boot instead of the test init built from the workspace.
        #[arg(long)]
        init: Option<PathBuf>,
        /// The kindling-vmm binary (default: beside this one).
        #[arg(long)]
        vmm: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Warm invoke latency (p50/p90/p99) and throughput of the echo-rust example through
    /// Kindling (process backend) and through `cargo lambda watch`, side by side.
    Invoke(host_agent::bench::invoke::InvokeCli),
    /// Cold starts from a chunked root image: chunks and bytes fetched per cache tier vs the
    /// image size, read latency per tier, and the dedup ratio of two images on one base.
    Image(host_agent::bench::image::ImageCli),
    /// Snapshot create time and size, restore latency with and without working-set prefetch,
    /// page faults after restore and VMM overhead, against cold boot (guest kernel + test init).
    Snapshot(host_agent::bench::snapshot::SnapshotCli),
}

fn run_bench(cmd: BenchCmd) -> ExitCode {
    match cmd {
        BenchCmd::Invoke(a) => host_agent::bench::invoke::run_cli(a),
        BenchCmd::Image(a) => host_agent::bench::image::run_cli(a),
        BenchCmd::Snapshot(a) => host_agent::bench::snapshot::run_cli(a),
        BenchCmd::Boot {
            runs,
            mem,
            vcpus,
            flavour,
            kernel,
            init,
            vmm,
            json,
        } => {
            let args = host_agent::bench::BootBenchArgs {
                runs: runs.max(1),
                mem_mib: mem,
                vcpus,
                vmm,
                kernel,
                flavour,
                init,
            };
            let bar = indicatif::ProgressBar::new(args.runs as u64);
            if json {
                bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            } else {
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{bar:30} {pos}/{len} boots [{elapsed}]",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
            }
            let result = host_agent::bench::boot(&args, |n| bar.set_position(n as u64));
            bar.finish_and_clear();
            match result {
                Ok(r) if json => {
                    println!("{}", serde_json::to_string(&r).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Ok(r) => {
                    print!("{}", host_agent::bench::render(&r));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("kindling: bench boot: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

#[derive(Subcommand)]
enum KernelCmd {
    /// Build the guest kernel unless it is cached; print the vmlinux path.
    Build {
        /// Rebuild even if it is cached.
        #[arg(long)]
        force: bool,
        /// Print {vmlinux, config, hash, cached} as JSON.
        #[arg(long)]
        json: bool,
        /// smp (default), or up: uniprocessor, for 1-vCPU guests on emulating hosts.
        #[arg(long, default_value = "smp")]
        flavour: rootfs::Flavour,
    },
    /// Print the cached vmlinux path; exit 1 if it has not been built.
    Path {
        /// smp (default) or up.
        #[arg(long, default_value = "smp")]
        flavour: rootfs::Flavour,
    },
}

fn run_kernel(cmd: KernelCmd) -> ExitCode {
    use std::io::IsTerminal;
    match cmd {
        KernelCmd::Build {
            force,
            json,
            flavour,
        } => {
            let bar = indicatif::ProgressBar::new_spinner();
            let tty = std::io::stderr().is_terminal();
            if tty {
                bar.set_style(
                    indicatif::ProgressStyle::with_template("{spinner} [{elapsed}] {msg}")
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
                );
                bar.enable_steady_tick(Duration::from_millis(120));
            }
            let pb = bar.clone();
            let progress = move |p: &rootfs::kernel::Progress| match p {
                rootfs::kernel::Progress::Phase(phase) if tty => {
                    pb.println(format!("kindling kernel: {phase}"));
                    pb.set_message(phase.clone());
                }
                rootfs::kernel::Progress::Phase(phase) => eprintln!("kindling kernel: {phase}"),
                rootfs::kernel::Progress::Make { steps, line } if tty => {
                    pb.set_message(format!("compiling: {steps} steps; {line}"));
                }
                rootfs::kernel::Progress::Make { .. } => {}
            };
            let result = rootfs::ensure_kernel_build(rootfs::KernelOptions {
                force,
                flavour,
                progress: Some(Box::new(progress)),
                ..Default::default()
            });
            bar.finish_and_clear();
            match result {
                Ok(b) if json => {
                    let out = json!({
                        "vmlinux": b.vmlinux,
                        "config": b.config,
                        "hash": b.hash,
                        "cached": b.cached,
                        "source_version": b.source_version,
                        "flavour": b.flavour.name(),
                    });
                    println!("{out}");
                    ExitCode::SUCCESS
                }
                Ok(b) => {
                    println!("{}", b.vmlinux.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("kindling: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        KernelCmd::Path { flavour } => match rootfs::kernel::cached_kernel(None, flavour) {
            Ok(Some(b)) => {
                println!("{}", b.vmlinux.display());
                ExitCode::SUCCESS
            }
            Ok(None) => {
                eprintln!(
                    "kindling: the guest kernel is not built yet (run `kindling kernel build`)"
                );
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("kindling: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

#[derive(clap::Args)]
struct Conn {
    /// The agent's address.
    #[arg(
        long,
        env = "KINDLING_ENDPOINT",
        default_value = "http://127.0.0.1:9000",
        global = true
    )]
    endpoint: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address of Lambda's API.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// Sandbox backend.
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendKind,
    /// Where functions and state live. Default: ~/.local/share/kindling.
    #[arg(long, env = "KINDLING_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Python interpreter with awslambdaric, for python3.11 functions.
    #[arg(long, env = "KINDLING_PYTHON", default_value = "python3")]
    python: PathBuf,
    /// Region reported to functions and in ARNs.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    region: String,
    /// Most execution environments at once (busy and idle); beyond it invokes get 429.
    #[arg(long, default_value_t = 64)]
    max_environments: usize,
    /// Longest a runtime may take to initialise, in seconds.
    #[arg(long, default_value_t = 10)]
    init_timeout: u64,
    /// Do not deploy the bundled example functions.
    #[arg(long)]
    no_examples: bool,
    /// microvm backend: the kindling-vmm binary (default: beside this one).
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// microvm backend: a static guest-init binary (default: built from the workspace).
    #[arg(long, env = "KINDLING_GUEST_INIT")]
    guest_init: Option<PathBuf>,
    /// microvm backend: seconds from VMM start until the guest must have connected.
    #[arg(long, default_value_t = 120)]
    boot_timeout: u64,
    /// Seconds an idle (warm) environment is kept before it is stopped.
    #[arg(long, default_value_t = 600)]
    idle_timeout: u64,
    /// Most invocations in flight at once, host-wide (Lambda's account concurrency limit).
    /// Default: --max-environments.
    #[arg(long)]
    max_concurrency: Option<usize>,
    /// Concurrency that reserved (and unreserved functions' provisioned) concurrency must
    /// leave to functions without a reservation.
    #[arg(long, default_value_t = 1)]
    min_unreserved: usize,
    /// MiB of functions' MemorySize that all environments together may count. Default: 80 %
    /// of the host's RAM.
    #[arg(long)]
    memory_budget_mib: Option<u64>,
    /// Seconds running invocations get to finish after SIGTERM / Ctrl-C.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout: u64,
    /// Asynchronous (Event) invocations running at once. Default: half of
    /// --max-environments (at least 1), so synchronous invokes always find room.
    #[arg(long)]
    async_concurrency: Option<usize>,
    /// Seconds before the first retry of an asynchronous invocation that failed (the second
    /// waits twice as long). Lambda: about 60.
    #[arg(long, default_value_t = 60.0)]
    async_retry_base: f64,
    /// Largest streamed response (InvokeWithResponseStream), in bytes. Lambda: 200 MiB.
    #[arg(long, default_value_t = rapid_api::stream::MAX_STREAM_BYTES)]
    stream_max_bytes: u64,
    /// Bytes of a streamed response sent at full speed before --stream-rate applies.
    /// Lambda: 6 MiB.
    #[arg(long, default_value_t = rapid_api::stream::STREAM_FULL_SPEED_BYTES)]
    stream_full_speed_bytes: u64,
    /// Bytes per second a streamed response gets after that (0: no cap). Lambda: 2 MiB/s.
    #[arg(long, default_value_t = rapid_api::stream::STREAM_RATE_BYTES_PER_SEC)]
    stream_rate: u64,
    /// microvm backend, with --l3: functions' root images are pushed to that image store
    /// once and VMs boot from them lazily through this agent's chunk cache (L1 in
    /// <data-dir>/chunked/l1 unless --l1-dir, L2 from --l2).
    #[command(flatten)]
    image_tiers: image_cache::TierConfig,
    /// microvm backend: snapshot cold starts. The first cold start of a function revision
    /// snapshots its VM after Init; later ones restore it (<data-dir>/snapshots).
    #[arg(long, value_enum, default_value = "on")]
    snapshots: OnOff,
    /// process backend: `memory` runs each environment on as many host CPUs as Lambda gives
    /// its memory size (1 vCPU per 1,769 MB, at least 1, at most 6; the least used CPUs,
    /// through CPU affinity), as a microVM gets vCPUs; `all` lets every environment use
    /// every CPU.
    #[arg(long, value_enum, default_value = "memory")]
    environment_cpus: EnvironmentCpus,
}

// Parsed once per run: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum FunctionCmd {
    /// Create a function from a ZIP, a directory, or a container image.
    Create {
        name: String,
        /// provided.al2023, provided.al2 or python3.11 (not with --image).
        #[arg(long, required_unless_present = "image", conflicts_with = "image")]
        runtime: Option<String>,
        /// Handler (module.function for python3.11).
        #[arg(long)]
        handler: Option<String>,
        /// A ZIP archive of the code.
        #[arg(long, conflicts_with_all = ["dir", "image"])]
        zip: Option<PathBuf>,
        /// A directory to zip up as the code.
        #[arg(long, conflicts_with = "image")]
        dir: Option<PathBuf>,
        /// A container image (PackageType Image): an OCI layout directory or a `docker save`
        /// / OCI archive tarball on the agent's host. Runs on the microvm backend.
        #[arg(long)]
        image: Option<PathBuf>,
        /// Image functions: replaces the image's ENTRYPOINT (repeat for each word).
        #[arg(long, requires = "image")]
        image_entrypoint: Vec<String>,
        /// Image functions: replaces the image's CMD (repeat for each word).
        #[arg(long, requires = "image")]
        image_command: Vec<String>,
        /// Image functions: replaces the image's WORKDIR.
        #[arg(long, requires = "image")]
        image_workdir: Option<String>,
        /// Timeout in seconds (1-900).
        #[arg(long)]
        timeout: Option<u32>,
        /// Memory in MB (128-10240).
        #[arg(long)]
        memory: Option<u32>,
        /// Environment variable KEY=VALUE (repeatable).
        #[arg(long = "env")]
        env: Vec<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// List functions.
    List {
        #[command(flatten)]
        conn: Conn,
        /// Print the configurations as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a function's configuration (JSON).
    Get {
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete a function.
    Delete {
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KINDLING_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = ctrl_c => {},
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {},
    }
    tracing::info!("signal received; stopping (press Ctrl-C again to force)");
    tokio::spawn(async {
        let _ = tokio::signal::ctrl_c().await;
        std::process::exit(130);
    });
}

async fn run_serve(a: ServeArgs) -> Result<(), String> {
    let cfg = ServeConfig {
        listen: a.listen,
        backend: a.backend,
        data_dir: a.data_dir.unwrap_or_else(serve::default_data_dir),
        python: a.python,
        region: a.region,
        account_id: "000000000000".into(),
        max_environments: a.max_environments.max(1),
        init_timeout: Duration::from_secs(a.init_timeout.max(1)),
        deploy_examples: !a.no_examples,
        vmm: a.vmm,
        guest_init: a.guest_init,
        boot_timeout: Duration::from_secs(a.boot_timeout.max(1)),
        idle_timeout: Duration::from_secs(a.idle_timeout.max(1)),
        max_concurrency: a.max_concurrency.map(|n| n.max(1)),
        min_unreserved: a.min_unreserved,
        memory_budget_mib: a.memory_budget_mib,
        shutdown_timeout: Duration::from_secs(a.shutdown_timeout),
        async_concurrency: a.async_concurrency.map(|n| n.max(1)),
        async_retry_base: Duration::try_from_secs_f64(a.async_retry_base)
            .map_err(|e| format!("--async-retry-base: {e}"))?,
        stream_limits: rapid_api::StreamLimits {
            max_bytes: a.stream_max_bytes,
            full_speed_bytes: a.stream_full_speed_bytes,
            rate_bytes_per_sec: (a.stream_rate > 0).then_some(a.stream_rate),
        },
        image_tiers: a.image_tiers.l3.is_some().then_some(a.image_tiers),
        snapshots: a.snapshots == OnOff::On,
        environment_cpus: a.environment_cpus,
    };
    serve::run(
        cfg,
        // Scripts and tests read this line to learn the address (useful with port 0).
        |addr| println!("kindling: listening on http://{addr}"),
        shutdown_signal(),
    )
    .await
    .map_err(|e| e.to_string())
}

async fn run(cmd: Command) -> Result<ExitCode, CliError> {
    match cmd {
        // Blocking (a build takes many minutes): off the async runtime's threads.
        Command::Bench(b) => Ok(tokio::task::spawn_blocking(move || run_bench(b))
            .await
            .unwrap_or(ExitCode::FAILURE)),
        Command::Kernel(k) => Ok(tokio::task::spawn_blocking(move || run_kernel(k))
            .await
            .unwrap_or(ExitCode::FAILURE)),
        Command::Image(ImageCmd::Push(a)) => Ok(image_cache::cli::push(a).await),
        Command::Image(ImageCmd::Pull(a)) => {
            init_tracing();
            Ok(image_cache::cli::pull(a).await)
        }
        Command::Image(ImageCmd::Ls(a)) => Ok(image_cache::cli::ls(a).await),
        Command::Image(ImageCmd::Gc(a)) => Ok(image_cache::cli::gc(a).await),
        Command::Image(ImageCmd::ChunkServer(a)) => {
            init_tracing();
            Ok(image_cache::cli::chunk_server(a).await)
        }
        Command::Image(i) => Ok(tokio::task::spawn_blocking(move || run_image(i))
            .await
            .unwrap_or(ExitCode::FAILURE)),
        Command::Dlq(d) => run_dlq(d).await,
        Command::Serve(a) => {
            init_tracing();
            run_serve(a).await.map_err(CliError::Serve)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Logs {
            name,
            follow,
            since,
            json,
            conn,
        } => {
            let since_ms = match since {
                None => None,
                Some(s) => {
                    let d = host_agent::cli::parse_duration(&s)?;
                    let start = std::time::SystemTime::now()
                        .checked_sub(d)
                        .unwrap_or(std::time::UNIX_EPOCH);
                    let ms = start
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as i64)
                        .unwrap_or(0);
                    Some(ms)
                }
            };
            use std::io::Write as _;
            let mut stdout = std::io::stdout().lock();
            Client::new(&conn.endpoint)
                .logs(&name, follow, since_ms, |line| {
                    if json {
                        let (ts, stream, message) =
                            host_agent::logs::parse_line(line).unwrap_or(("", "", line));
                        let v = json!({"timestamp": ts, "logStream": stream, "message": message});
                        writeln!(stdout, "{v}")?;
                    } else {
                        writeln!(stdout, "{line}")?;
                    }
                    // Followers see each line at once, not when a buffer fills.
                    stdout.flush()
                })
                .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Invoke {
            name,
            payload,
            conn,
            json,
        } => {
            let r = Client::new(&conn.endpoint)
                .invoke(&name, payload.into_bytes())
                .await?;
            if json {
                let payload: Value = serde_json::from_slice(&r.payload).unwrap_or_else(|_| {
                    Value::String(String::from_utf8_lossy(&r.payload).into_owned())
                });
                let out = json!({
                    "StatusCode": r.status,
                    "FunctionError": r.function_error,
                    "ExecutedVersion": r.executed_version,
                    "Payload": payload,
                });
                println!("{out}");
                return Ok(ExitCode::SUCCESS);
            }
            println!("{}", String::from_utf8_lossy(&r.payload));
            if let Some(fe) = r.function_error {
                eprintln!("kindling: the function returned an error ({fe})");
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Function(f) => match f {
            FunctionCmd::Create {
                name,
                runtime,
                handler,
                zip,
                dir,
                image,
                image_entrypoint,
                image_command,
                image_workdir,
                timeout,
                memory,
                env,
                conn,
            } => {
                let body = create_body(CreateArgs {
                    name,
                    runtime,
                    handler,
                    zip,
                    dir,
                    image,
                    image_entrypoint,
                    image_command,
                    image_workdir,
                    timeout,
                    memory,
                    env,
                })?;
                let cfg = Client::new(&conn.endpoint).create(body).await?;
                println!("{}", serde_json::to_string_pretty(&cfg).unwrap_or_default());
                Ok(ExitCode::SUCCESS)
            }
            FunctionCmd::List { conn, json } => {
                let fns = Client::new(&conn.endpoint).list().await?;
                if json {
                    println!("{}", Value::Array(fns));
                } else {
                    println!(
                        "{:<32} {:<16} {:<28} {:>7} {:>8}",
                        "NAME", "RUNTIME", "HANDLER", "MEMORY", "TIMEOUT"
                    );
                    for f in fns {
                        println!(
                            "{:<32} {:<16} {:<28} {:>7} {:>8}",
                            f["FunctionName"].as_str().unwrap_or(""),
                            f["Runtime"].as_str().unwrap_or(""),
                            f["Handler"].as_str().unwrap_or(""),
                            f["MemorySize"],
                            f["Timeout"],
                        );
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            FunctionCmd::Get { name, conn } => {
                let f = Client::new(&conn.endpoint).get(&name).await?;
                println!("{}", serde_json::to_string_pretty(&f).unwrap_or_default());
                Ok(ExitCode::SUCCESS)
            }
            FunctionCmd::Delete { name, conn } => {
                Client::new(&conn.endpoint).delete(&name).await?;
                eprintln!("deleted {name}");
                Ok(ExitCode::SUCCESS)
            }
        },
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kindling: {e}");
            ExitCode::FAILURE
        }
    }
}
