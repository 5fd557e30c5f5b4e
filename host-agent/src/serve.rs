//! `kindling serve`: the daemon.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::api::{self, AppState};
use crate::functions::Registry;
use crate::logs::{LogStore, DEFAULT_MAX_FILE_BYTES};
use crate::metrics::Metrics;
use crate::pool::{Pool, PoolConfig};
use crate::sandbox::cpus::{self, CpuPool};
use crate::sandbox::process::ProcessBackend;
use crate::sandbox::{envs_dir, Backend};

/// Which sandbox backend to run functions in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// microvm where /dev/kvm works, else process (logged either way).
    Auto,
    /// Child processes on the host (development and tests; isolates nothing).
    Process,
    /// A microVM per environment (needs /dev/kvm).
    Microvm,
}

/// Settings of a running agent (from the command line).
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub backend: BackendKind,
    pub data_dir: PathBuf,
    pub python: PathBuf,
    pub region: String,
    pub account_id: String,
    pub max_environments: usize,
    pub init_timeout: Duration,
    pub deploy_examples: bool,
    /// microvm backend: `kindling-vmm` (default: beside this executable).
    pub vmm: Option<PathBuf>,
    /// microvm backend: a static guest-init (default: built from the workspace).
    pub guest_init: Option<PathBuf>,
    /// microvm backend: from VMM start to the guest's connection.
    pub boot_timeout: Duration,
    /// An idle environment is stopped after this long.
    pub idle_timeout: Duration,
    /// Invocations in flight at once, host-wide (default: `max_environments`).
    pub max_concurrency: Option<usize>,
    /// Concurrency that reservations must leave unreserved.
    pub min_unreserved: usize,
    /// MiB of functions' `MemorySize` over all environments (default: 80 % of MemTotal).
    pub memory_budget_mib: Option<u64>,
    /// At shutdown, how long invocations in flight may take to finish.
    pub shutdown_timeout: Duration,
    /// Asynchronous invocations running at once (default: half of `max_environments`).
    pub async_concurrency: Option<usize>,
    /// Delay before the first retry of a failed asynchronous invocation (Lambda: ~1 min).
    pub async_retry_base: Duration,
    /// Size and bandwidth caps of streamed responses (InvokeWithResponseStream).
    pub stream_limits: rapid_api::StreamLimits,
    /// microvm backend: root images pushed to this image store and booted lazily through
    /// the chunk cache (`--l3` given); `None`: local ext4 files.
    pub image_tiers: Option<image_cache::TierConfig>,
    /// microvm backend: snapshot cold starts (`--snapshots on`, the default).
    pub snapshots: bool,
    /// process backend: the CPUs an environment runs on.
    pub environment_cpus: EnvironmentCpus,
}

/// Which host CPUs a process backend environment runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EnvironmentCpus {
    /// Lambda's vCPU count for the function's memory, on the least used CPUs.
    Memory,
    /// Every CPU the agent may use.
    All,
}

impl EnvironmentCpus {
    /// The flag's value.
    pub fn as_str(self) -> &'static str {
        match self {
            EnvironmentCpus::Memory => "memory",
            EnvironmentCpus::All => "all",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the microvm backend cannot start: {0}")]
    Microvm(String),
    #[error("data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Registry(#[from] crate::functions::RegistryError),
    #[error(transparent)]
    Lock(#[from] crate::datadir::LockError),
    #[error(transparent)]
    Logs(#[from] crate::logs::LogError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("server error: {0}")]
    Server(std::io::Error),
    #[error(transparent)]
    Events(#[from] crate::events::QueueError),
}

/// The default data dir: `$XDG_DATA_HOME/kindling` or `~/.local/share/kindling`.
pub fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("kindling");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".local/share/kindling")
}

/// The backend to run, and which kind it is (`auto` resolved).
fn choose_backend(
    cfg: &ServeConfig,
    logs: &Arc<LogStore>,
) -> Result<(Arc<dyn Backend>, BackendKind), ServeError> {
    let data_err = |source| ServeError::DataDir {
        path: cfg.data_dir.clone(),
        source,
    };
    let process = || -> Result<(Arc<dyn Backend>, BackendKind), ServeError> {
        tracing::warn!(
            "the process backend isolates nothing: functions run as this user, on this host"
        );
        let mut b = ProcessBackend::new(envs_dir(&cfg.data_dir), cfg.python.clone(), logs.clone())
            .map_err(data_err)?
            .with_stream_limits(cfg.stream_limits);
        if cfg.environment_cpus == EnvironmentCpus::Memory {
            match CpuPool::from_own_affinity() {
                Ok(pool) => {
                    tracing::info!(
                        host_cpus = pool.len(),
                        "process backend: each environment runs on the vCPU count of its \
                         memory size (1 per {} MB), on the least used CPUs",
                        cpus::MB_PER_VCPU
                    );
                    b = b.with_cpu_pool(pool);
                }
                Err(e) => tracing::warn!(
                    "process backend: cannot read this process's CPU affinity ({e}); \
                     environments run on every CPU"
                ),
            }
        }
        Ok((Arc::new(b), BackendKind::Process))
    };
    match cfg.backend {
        BackendKind::Microvm => Ok((microvm_backend(cfg, logs)?, BackendKind::Microvm)),
        BackendKind::Process => process(),
        BackendKind::Auto => match vmm::host::kvm_usable() {
            Ok(()) => match microvm_backend(cfg, logs) {
                Ok(b) => {
                    tracing::info!("backend auto: /dev/kvm works, using microvm");
                    Ok((b, BackendKind::Microvm))
                }
                Err(e) => {
                    tracing::error!(
                        "backend auto: /dev/kvm works but {e}; falling back to the process \
                         backend (pass --backend microvm to make this fatal)"
                    );
                    process()
                }
            },
            Err(e) => {
                tracing::info!("backend auto: /dev/kvm is not usable ({e}); using process");
                process()
            }
        },
    }
}

/// How much longer a runtime may take to initialise in a microVM on a host whose KVM emulates
/// guest kernel code (~1000x slower in ring 0: a Python runtime's init takes 20-40 s there).
const EMULATED_INIT_SCALE: u32 = 10;

/// The init limit for microVM environments: as configured on hardware KVM; scaled up, with a
/// warning, where the host emulates guest kernel code, so that Lambda's 10 s limit does not
/// turn every Python cold start into a timeout and a retry.
fn microvm_init_timeout(configured: Duration) -> Duration {
    let probe = vmm::vm::open_kvm()
        .map_err(|e| e.to_string())
        .and_then(|kvm| vmm::host::detect(&kvm).map_err(|e| e.to_string()));
    match probe {
        Ok(h) if h.kind == vmm::host::KvmKind::Emulated => {
            let scaled = configured * EMULATED_INIT_SCALE;
            tracing::warn!(
                "{}; the microVM init limit is raised from {configured:?} to {scaled:?}",
                h.describe()
            );
            scaled
        }
        Ok(h) => {
            tracing::info!("{}", h.describe());
            configured
        }
        Err(e) => {
            tracing::warn!("could not tell the host's KVM kind ({e}); init limit {configured:?}");
            configured
        }
    }
}

fn microvm_backend(
    cfg: &ServeConfig,
    logs: &Arc<LogStore>,
) -> Result<Arc<dyn Backend>, ServeError> {
    use crate::sandbox::microvm::{MicrovmBackend, MicrovmConfig};
    let fail = |m: String| ServeError::Microvm(m);
    vmm::host::kvm_usable().map_err(|e| fail(format!("/dev/kvm: {e}")))?;
    let vmm = match &cfg.vmm {
        Some(v) => v.clone(),
        None => crate::sibling_binary("kindling-vmm")
            .ok_or_else(|| fail("kindling-vmm not found beside kindling; pass --vmm".into()))?,
    };
    tracing::info!(
        "microvm backend: getting the guest kernel (built on first use, several minutes)"
    );
    // Every environment has one vCPU, so the uniprocessor kernel serves: it boots much faster
    // where guest kernel code is emulated (9.6 s instead of 16.9 s here) and loses nothing on
    // hardware KVM.
    let kernel = rootfs::ensure_kernel(rootfs::KernelOptions {
        flavour: rootfs::Flavour::Up,
        ..Default::default()
    })
    .map_err(|e| fail(format!("guest kernel: {e}")))?;
    let guest_init = match &cfg.guest_init {
        Some(g) => g.clone(),
        None => rootfs::static_bin::build("guest-init", "guest-init")
            .map_err(|e| fail(format!("guest-init: {e}")))?,
    };
    let b = MicrovmBackend::new(
        MicrovmConfig {
            vmm,
            kernel,
            guest_init,
            envs_dir: cfg.data_dir.join("vms"),
            images_dir: cfg.data_dir.join("images"),
            boot_timeout: cfg.boot_timeout,
            chunked: match &cfg.image_tiers {
                Some(t) => Some(
                    crate::sandbox::chunked::ChunkedImages::start(t, &cfg.data_dir)
                        .map_err(|e| fail(e.to_string()))?,
                ),
                None => None,
            },
            snapshots: if cfg.snapshots {
                Some(
                    crate::sandbox::snapshot::Snapshots::open(&cfg.data_dir)
                        .map_err(|e| fail(format!("snapshots: {e}")))?,
                )
            } else {
                None
            },
        },
        logs.clone(),
    )
    .map_err(|e| fail(e.to_string()))?;
    Ok(Arc::new(b))
}

/// The default memory budget: 80 % of the host's RAM (`MemTotal` in /proc/meminfo); if that
/// cannot be read, no bound (with a warning).
pub fn default_memory_budget_mib() -> u64 {
    let total_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    });
    match total_kib {
        Some(kib) => kib / 1024 * 8 / 10,
        None => {
            tracing::warn!("cannot read MemTotal from /proc/meminfo; no memory budget");
            u64::MAX
        }
    }
}

/// Gives the pool every function's stored concurrency settings (provisioned environments
/// start in the background). A setting that cannot be read is logged and left out.
async fn load_concurrency_settings(registry: &Arc<Registry>, pool: &Pool) {
    for f in registry.list() {
        let (r, name) = (registry.clone(), f.config.function_name.clone());
        match tokio::task::spawn_blocking(move || r.concurrency(&name)).await {
            Ok(Ok(s)) if s == Default::default() => {}
            Ok(Ok(s)) => pool.apply(f, &s),
            Ok(Err(e)) => {
                tracing::warn!(function = %f.config.function_name, error = %e, "cannot read concurrency settings")
            }
            Err(e) => tracing::warn!(error = %e, "cannot read concurrency settings"),
        }
    }
}

/// Runs the agent until `shutdown` resolves; `on_listen` gets the bound address.
pub async fn run(
    cfg: ServeConfig,
    on_listen: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let _lock = crate::datadir::lock(&cfg.data_dir)?;
    // Bind first: a busy port should fail the start before anything else is touched.
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let metrics = Arc::new(Metrics::new());
    let logs = LogStore::open(&cfg.data_dir, DEFAULT_MAX_FILE_BYTES, metrics.clone())?;
    let (backend, kind) = choose_backend(&cfg, &logs)?;
    let registry = Arc::new(Registry::open(&cfg.data_dir, &cfg.region, &cfg.account_id)?);
    if cfg.deploy_examples {
        let (r, d) = (registry.clone(), cfg.data_dir.clone());
        tokio::task::spawn_blocking(move || crate::examples::deploy(&r, &d))
            .await
            .map_err(|e| ServeError::Server(std::io::Error::other(e)))?;
    }
    let init_timeout = match kind {
        BackendKind::Microvm => microvm_init_timeout(cfg.init_timeout),
        BackendKind::Auto | BackendKind::Process => cfg.init_timeout,
    };
    let pool = Arc::new(Pool::new(
        backend,
        PoolConfig {
            region: cfg.region.clone(),
            init_timeout,
            max_environments: cfg.max_environments,
            max_concurrency: cfg.max_concurrency.unwrap_or(cfg.max_environments),
            min_unreserved: cfg.min_unreserved,
            memory_budget_mib: cfg
                .memory_budget_mib
                .unwrap_or_else(default_memory_budget_mib),
        },
    ));
    load_concurrency_settings(&registry, &pool).await;
    // Warm environments are kept for a while, not forever.
    {
        let (pool, max_idle) = (pool.clone(), cfg.idle_timeout);
        let every = (max_idle / 2).clamp(Duration::from_millis(200), Duration::from_secs(30));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                pool.reap_idle(max_idle);
            }
        });
    }
    let events = {
        let path = crate::events::queue_path(&cfg.data_dir);
        let queue = tokio::task::spawn_blocking(move || crate::events::EventQueue::open(&path))
            .await
            .map_err(|e| ServeError::Server(std::io::Error::other(e)))??;
        Arc::new(queue)
    };
    // Gauges owned by the scheduler and the event queue, read at scrape time.
    {
        let (pool, events) = (pool.clone(), events.clone());
        metrics.on_scrape(move |m| {
            m.set_pool(&pool.snapshot());
            let q = events.stats();
            m.set_event_queue(
                usize::try_from(q.depth).unwrap_or(usize::MAX),
                q.oldest_age.unwrap_or_default(),
            );
        });
    }
    let state = Arc::new(AppState {
        registry: registry.clone(),
        pool: pool.clone(),
        events: events.clone(),
        logs,
        metrics: metrics.clone(),
    });
    let addr = listener.local_addr().map_err(ServeError::Server)?;
    tracing::info!(%addr, backend = pool.backend_name(), data_dir = %cfg.data_dir.display(),
        functions = registry.list().len(), "kindling is serving");
    on_listen(addr);

    // Graceful shutdown: stop accepting, let running invocations finish for a while, then go.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    {
        let pool = pool.clone();
        tokio::spawn(async move {
            shutdown.await;
            // New invocations get 503 from now on; running ones get the grace period.
            pool.close();
            let _ = stop_tx.send(true);
        });
    }
    // Asynchronous invocations: they stop taking events at shutdown; unfinished ones stay queued.
    let workers = crate::events::worker::spawn(
        events,
        registry.clone(),
        pool.clone(),
        metrics,
        crate::events::WorkerSettings::new(
            cfg.async_concurrency.unwrap_or_else(|| {
                crate::events::WorkerSettings::default_concurrency(cfg.max_environments)
            }),
            cfg.async_retry_base,
        ),
        stop_rx.clone(),
    );
    let mut graceful = stop_rx.clone();
    let grace = cfg.shutdown_timeout;
    use axum::serve::ListenerExt as _;
    // Invoke answers are written whole: send them at once (no Nagle delay behind an
    // unacknowledged earlier answer on a keep-alive connection).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let server = axum::serve(listener, api::router(state)).with_graceful_shutdown(async move {
        let _ = graceful.wait_for(|s| *s).await;
        tracing::info!("shutting down: no new requests, waiting up to {grace:?} for running ones");
    });
    let mut deadline = stop_rx;
    tokio::select! {
        r = server => r.map_err(ServeError::Server)?,
        _ = async {
            let _ = deadline.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        } => tracing::warn!("running invocations did not finish in {grace:?}; stopping anyway"),
    }
    let _ = workers.await;
    // Waits out what is left of the grace period (counted from close), then stops every
    // environment: idle, provisioned and any still busy.
    pool.shutdown(grace).await;
    tracing::info!("stopped");
    Ok(())
}
