//! The microVM backend: each environment is a `kindling-vmm` process booting our guest kernel
//! with `guest-init` as PID 1, the function's code at `/var/task`, and one vsock stream that
//! carries the host-guest protocol (`guest_init::proto`).
//!
//! Start: build (once per function revision) a read-only ext4 root image (guest-init at
//! /sbin/init, the code at /var/task), attached as virtio-blk `/dev/vda`;
//! bind the vsock listener `<env>/v.sock_9999`; spawn the VMM; accept the guest's connection
//! (the boot limit covers a slow, emulating host); Hello both ways; Configure; wait for Ready,
//! InitError or InitTimeout. Invoke: one Invoke frame, then frames until the answer for that
//! request (runtime output arrives as Log frames on the way), bounded by the deadline: past it
//! the VM is killed and the caller gets `Sandbox.Timedout`. Stop: Shutdown, then the VMM
//! process is killed if it is still there, and the environment directory removed.
//!
//! Runtimes: `python3.11` on the python3.11 base (`rootfs::base`), and `provided.*` functions
//! whose `bootstrap` is statically linked (no base with a C library yet). With snapshots on
//! (the default), cold starts after the first of a function revision restore a snapshot taken
//! after Init instead of booting (see `super::snapshot`).

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use guest_init::proto::{self, Configure, Decoder, Hello, Message, Role, RunAs, RuntimeKind};
use rapid_api::{ErrorReport, InvokeOutcome, StreamEvent, StreamSink};
use tokio::net::{UnixListener, UnixStream};
use tokio::process::{Child, Command};

use super::snapshot::Plan;
use super::{Backend, EnvSpec, InvokeRequest, Sandbox, StartError};
use crate::functions::{Function, Runtime};
use crate::logs::{EnvLog, InvocationEnd, LogStore};

/// Where the function's code is inside the guest.
const TASK_ROOT: &str = "/var/task";
/// The unprivileged user the runtime runs as (Lambda's sbx_user1051 has uid 993).
const RUNTIME_UID: u32 = 993;
const RUNTIME_GID: u32 = 990;
/// The guest CID every environment uses (each VM has its own vsock device and socket).
const GUEST_CID: u64 = 3;

/// Shutdown grace of a function with external extensions (Lambda's shutdown phase: 2 s for
/// the runtime's SIGTERM and the extensions' SHUTDOWN); without, the runtime gets 500 ms.
const EXTENSION_SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
const PLAIN_SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

/// What the backend needs from the host.
#[derive(Debug, Clone)]
pub struct MicrovmConfig {
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    /// A static `guest-init`.
    pub guest_init: PathBuf,
    /// Per-environment directories (emptied at start).
    pub envs_dir: PathBuf,
    /// Root images per function revision.
    pub images_dir: PathBuf,
    /// From VMM spawn to the guest's connection.
    pub boot_timeout: Duration,
    /// Chunked root images through the image cache (`--l3`); `None`: local ext4 files.
    pub chunked: Option<Arc<super::chunked::ChunkedImages>>,
    /// Snapshot cold starts (`--snapshots on`); `None`: every cold start boots.
    pub snapshots: Option<Arc<super::snapshot::Snapshots>>,
}

pub struct MicrovmBackend {
    cfg: MicrovmConfig,
    logs: Arc<LogStore>,
    /// SHA-256 of guest-init (part of chunked image names), computed once.
    guest_init_digest: std::sync::OnceLock<String>,
}

/// A VM booting from a chunked image.
struct ChunkedBoot {
    images: Arc<super::chunked::ChunkedImages>,
    name: String,
    manifest: PathBuf,
    init: &'static str,
}

impl MicrovmBackend {
    /// Empties the environment and image directories: environments do not outlive the
    /// agent, and images are rebuilt on demand (about a second each), so images of deleted
    /// functions or old revisions do not pile up across restarts.
    pub fn new(cfg: MicrovmConfig, logs: Arc<LogStore>) -> std::io::Result<Self> {
        for dir in [&cfg.envs_dir, &cfg.images_dir] {
            if dir.exists() {
                std::fs::remove_dir_all(dir)?;
            }
            std::fs::create_dir_all(dir)?;
        }
        Ok(MicrovmBackend {
            cfg,
            logs,
            guest_init_digest: std::sync::OnceLock::new(),
        })
    }

    /// The read-only ext4 root image for this function revision, built when missing: the
    /// `provided` base (guest-init at /sbin/init) or the python3.11 base (Debian + awslambdaric,
    /// guest-init at /var/kindling/init), with the code at /var/task. Returns the image and
    /// the guest's init path.
    fn ensure_image(
        cfg: &MicrovmConfig,
        f: &Function,
    ) -> Result<(PathBuf, &'static str), StartError> {
        let dir = cfg.images_dir.join(&f.config.function_name);
        let path = dir.join(format!("{}.ext4", f.config.revision_id));
        if let Some(source) = f.image_source() {
            // A container image: its layers are the root; guest-init goes beside them.
            let init = "/var/kindling/init";
            if !path.is_file() {
                std::fs::create_dir_all(&dir).map_err(|e| StartError::Host(e.to_string()))?;
                rootfs::image::build(rootfs::image::BuildOptions {
                    base: None,
                    source: rootfs::image::Source::Oci(source),
                    out: path.clone(),
                    guest_init: Some(cfg.guest_init.clone()),
                    progress: None,
                })
                .map_err(|e| {
                    StartError::Host(format!("root image for {}: {e}", f.config.function_name))
                })?;
            }
            return Ok((path, init));
        }
        let runtime = Runtime::parse(&f.config.runtime)
            .ok_or_else(|| StartError::Host(format!("unsupported runtime {}", f.config.runtime)))?;
        let init = match runtime {
            Runtime::Provided => "/sbin/init",
            Runtime::Python311 => "/var/kindling/init",
        };
        if path.is_file() {
            return Ok((path, init));
        }
        let base = match runtime {
            Runtime::Provided => {
                check_static_bootstrap(f)?;
                None
            }
            Runtime::Python311 => {
                let tree = rootfs::base::python311(|phase| {
                    tracing::info!("python3.11 base image: {phase} (once; cached)")
                })
                .map_err(|e| StartError::Host(format!("python3.11 base image: {e}")))?;
                Some(("python3.11".to_string(), tree))
            }
        };
        std::fs::create_dir_all(&dir).map_err(|e| StartError::Host(e.to_string()))?;
        rootfs::image::build(rootfs::image::BuildOptions {
            base,
            source: rootfs::image::Source::Dir(f.code_dir.clone()),
            out: path.clone(),
            guest_init: Some(cfg.guest_init.clone()),
            progress: None,
        })
        .map_err(|e| StartError::Host(format!("root image for {}: {e}", f.config.function_name)))?;
        Ok((path, init))
    }

    /// With chunked images: the revision's image name, its local manifest (built and pushed
    /// once when the store lacks it) and the guest's init path. The cache starts warming the
    /// image's prefetch list, if it has one.
    async fn ensure_chunked(
        &self,
        c: &Arc<super::chunked::ChunkedImages>,
        f: &Arc<Function>,
    ) -> Result<ChunkedBoot, StartError> {
        let init = if f.image_source().is_some() {
            "/var/kindling/init"
        } else {
            match Runtime::parse(&f.config.runtime) {
                Some(Runtime::Provided) => {
                    check_static_bootstrap(f)?;
                    "/sbin/init"
                }
                Some(Runtime::Python311) => "/var/kindling/init",
                None => {
                    return Err(StartError::Host(format!(
                        "unsupported runtime {}",
                        f.config.runtime
                    )))
                }
            }
        };
        let digest = match self.guest_init_digest.get() {
            Some(d) => d.clone(),
            None => {
                let d = super::chunked::file_digest(&self.cfg.guest_init)
                    .map_err(|e| StartError::Host(format!("guest-init: {e}")))?;
                self.guest_init_digest.get_or_init(|| d).clone()
            }
        };
        let name = super::chunked::image_name(f, &digest);
        let (cfg, func) = (self.cfg.clone(), f.clone());
        let build: Box<dyn FnOnce() -> Result<PathBuf, String> + Send> = Box::new(move || {
            MicrovmBackend::ensure_image(&cfg, &func)
                .map(|(path, _)| path)
                .map_err(|e| e.to_string())
        });
        let (manifest, m) = c.ensure(&name, Some(build)).await.map_err(|e| {
            StartError::Host(format!(
                "chunked root image for {}: {e}",
                f.config.function_name
            ))
        })?;
        c.warm(&name, &m);
        Ok(ChunkedBoot {
            images: c.clone(),
            name,
            manifest,
            init,
        })
    }
}

/// A `provided` function's bootstrap must exist and, until a base with a C library exists,
/// be statically linked.
fn check_static_bootstrap(f: &Function) -> Result<(), StartError> {
    match std::fs::read(f.code_dir.join("bootstrap")) {
        Err(_) => Err(StartError::Function(ErrorReport::platform(
            "Runtime.InvalidEntrypoint",
            format!("Couldn't find valid bootstrap(s): [{TASK_ROOT}/bootstrap]"),
        ))),
        Ok(bytes) if rootfs::static_bin::elf_has_interpreter(&bytes) == Some(true) => {
            Err(StartError::Function(ErrorReport::platform(
                "Runtime.InvalidEntrypoint",
                "the bootstrap is dynamically linked, and the microVM has no base image with a C library \
                 yet: build it statically (e.g. RUSTFLAGS='-C target-feature=+crt-static')",
            )))
        }
        Ok(_) => Ok(()),
    }
}

fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn proto_err(what: &str) -> impl Fn(proto::ProtoError) -> StartError + '_ {
    move |e| StartError::Host(format!("guest {what}: {e}"))
}

#[async_trait]
impl Backend for MicrovmBackend {
    fn name(&self) -> &'static str {
        "microvm"
    }

    async fn start(&self, spec: EnvSpec) -> Result<Box<dyn Sandbox>, StartError> {
        let f = spec.function.clone();
        let (block, init, chunked) = self.root_disk(&f).await?;
        let vm = serde_json::json!({
            "kernel": self.cfg.kernel,
            "cmdline": format!(
                "reboot=k panic=1 nomodule i8042.noaux i8042.nomux i8042.dumbkbd swiotlb=noforce \
                 console=ttyS0 root=/dev/vda ro rootfstype=ext4 init={init}"
            ),
            "vcpus": 1,
            "mem_mib": f.config.memory_size.max(128),
            "block": [block],
        });
        // Snapshots: local root images only (not chunked ones yet), and not for provisioned
        // concurrency (Lambda's SnapStart and provisioned concurrency exclude each other).
        let mut making = None;
        let snapshots = match (&self.cfg.snapshots, &chunked, spec.initialization_type) {
            (Some(s), None, super::InitializationType::OnDemand) => Some(s.clone()),
            _ => None,
        };
        if let Some(snaps) = &snapshots {
            // Twice at most: a snapshot that cannot be used is deleted, and the second plan
            // makes a new one.
            for _ in 0..2 {
                match snaps.plan(&self.cfg, &f, &vm).await {
                    Ok(Plan::Restore(files)) => match self.restore(&spec, &files).await {
                        Ok(env) => return Ok(Box::new(env)),
                        Err(StartError::Host(reason)) => snaps.discard(&files, &reason),
                        Err(e) => return Err(e),
                    },
                    Ok(Plan::Make(m)) => {
                        making = Some(m);
                        break;
                    }
                    Ok(Plan::Boot) => break,
                    Err(e) => {
                        tracing::warn!(function = %f.config.function_name,
                            "snapshots: {e}; booting");
                        break;
                    }
                }
            }
        }
        let image = PathBuf::from(vm["block"][0]["path"].as_str().unwrap_or_default());
        let Some(making) = making else {
            let (env, _, _) = self.boot(&spec, vm, chunked, false).await?;
            return Ok(Box::new(env));
        };
        let (mut env, listener, api_sock) = self.boot(&spec, vm.clone(), None, true).await?;
        match super::snapshot::make(&mut env, &listener, &api_sock, &image, making).await {
            Ok(_) => Ok(Box::new(env)),
            Err(e) => {
                // The VM's state is unknown: another one boots, without snapshots.
                tracing::warn!(function = %f.config.function_name, env = %env.id,
                    "{e}; booting another environment");
                drop(env);
                let (env, _, _) = self.boot(&spec, vm, None, false).await?;
                Ok(Box::new(env))
            }
        }
    }
}

impl MicrovmBackend {
    /// The function revision's root disk (block device config) and the guest's init path.
    async fn root_disk(
        &self,
        f: &Arc<Function>,
    ) -> Result<(serde_json::Value, &'static str, Option<ChunkedBoot>), StartError> {
        let chunked = match &self.cfg.chunked {
            Some(c) => Some(self.ensure_chunked(c, f).await?),
            None => None,
        };
        Ok(match chunked {
            Some(b) => (
                serde_json::json!({"path": b.manifest, "read_only": true, "serial": "rootfs",
                    "chunked": {"socket": b.images.socket(), "cache_mib": 64}}),
                b.init,
                Some(b),
            ),
            None => {
                let (cfg, f) = (self.cfg.clone(), f.clone());
                let (image, init) =
                    tokio::task::spawn_blocking(move || MicrovmBackend::ensure_image(&cfg, &f))
                        .await
                        .map_err(|e| StartError::Host(e.to_string()))??;
                (
                    serde_json::json!({"path": image, "read_only": true, "serial": "rootfs"}),
                    init,
                    None,
                )
            }
        })
    }

    /// Boots a VM and runs Init (`snap_start`: `AWS_LAMBDA_INITIALIZATION_TYPE=snap-start`
    /// and a control socket, for a VM about to be snapshotted). Returns the environment, its
    /// vsock listener and its control socket path.
    async fn boot(
        &self,
        spec: &EnvSpec,
        mut vm: serde_json::Value,
        chunked: Option<ChunkedBoot>,
        snap_start: bool,
    ) -> Result<(MicrovmSandbox, UnixListener, PathBuf), StartError> {
        let f = spec.function.clone();
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let env_dir = self.cfg.envs_dir.join(&id);
        std::fs::create_dir_all(&env_dir)
            .map_err(|e| StartError::Host(format!("{}: {e}", env_dir.display())))?;
        let uds = env_dir.join("v.sock");
        let listener = UnixListener::bind(format!("{}_{}", uds.display(), proto::HOST_PORT))
            .map_err(|e| StartError::Host(format!("vsock listener: {e}")))?;
        let serial = env_dir.join("serial.log");
        vm["vsock"] = serde_json::json!({"guest_cid": GUEST_CID, "uds_path": uds});
        vm["serial"] = serde_json::json!({"file": serial});
        let vm_json = env_dir.join("vm.json");
        std::fs::write(&vm_json, vm.to_string()).map_err(|e| StartError::Host(e.to_string()))?;
        let mut cmd = Command::new(&self.cfg.vmm);
        cmd.arg("--config").arg(&vm_json);
        // The control socket: after the first invocation the chunks the VM fetched are read
        // from it (the image's prefetch list).
        let api_sock = env_dir.join("api.sock");
        if chunked.is_some() || snap_start {
            cmd.arg("--api-sock").arg(&api_sock);
        }
        let child = self.spawn_vmm(cmd, &env_dir)?;
        let log = self.env_log(spec, &id)?;
        let mut env = MicrovmSandbox {
            id: id.clone(),
            function: f.clone(),
            child,
            stream: None,
            decoder: Decoder::new(),
            env_dir,
            broken: false,
            reset: None,
            log,
            pending: VecDeque::new(),
            chunked: chunked.map(|b| (b, api_sock.clone())),
            working_set: None,
        };
        let boot_start = Instant::now();

        // The guest's connection means guest-init is up.
        let stream = tokio::select! {
            accepted = listener.accept() => accepted.map_err(|e| StartError::Host(format!("vsock accept: {e}")))?.0,
            status = env.child.wait() => {
                return Err(StartError::Host(format!(
                    "the VMM exited during boot ({}); see {}",
                    status.map(|s| s.to_string()).unwrap_or_default(),
                    env.env_dir.join("vmm.log").display()
                )))
            }
            _ = tokio::time::sleep(self.cfg.boot_timeout) => {
                return Err(StartError::Host(format!(
                    "the guest did not connect within {:?} of boot; see {}",
                    self.cfg.boot_timeout,
                    serial.display()
                )))
            }
        };
        tracing::debug!(function = %f.config.function_name, env = %id,
            "guest connected {:.1} s after VMM start", boot_start.elapsed().as_secs_f64());
        env.stream = Some(stream);
        let init_type = if snap_start {
            "snap-start"
        } else {
            spec.initialization_type.as_str()
        };
        env.handshake(spec, init_type).await?;
        Ok((env, listener, api_sock))
    }

    fn env_log(&self, spec: &EnvSpec, id: &str) -> Result<Arc<EnvLog>, StartError> {
        let f = &spec.function.config;
        let stream_name = format!(
            "{}/[{}]{}",
            chrono::Utc::now().format("%Y/%m/%d"),
            f.version,
            id
        );
        self.logs
            .env_log(
                &f.function_name,
                f.memory_size,
                stream_name,
                spec.initialization_type == super::InitializationType::ProvisionedConcurrency,
            )
            .map_err(|e| StartError::Host(e.to_string()))
    }

    /// Spawns a VMM (boot or restore) the way every environment runs one: warnings only,
    /// its log in `<env>/vmm.log`, its own process group dying with the agent, killed on drop.
    fn spawn_vmm(&self, mut cmd: Command, env_dir: &Path) -> Result<Child, StartError> {
        let log = std::fs::File::create(env_dir.join("vmm.log"))
            .map_err(|e| StartError::Host(e.to_string()))?;
        cmd.env("KINDLING_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        super::own_group_dying_with_agent(&mut cmd);
        cmd.spawn()
            .map_err(|e| StartError::Host(format!("spawning {}: {e}", self.cfg.vmm.display())))
    }

    /// A cold start from a snapshot: `kindling-vmm --restore` with this environment's own
    /// vsock socket and serial file, the guest's reconnection, Restored, Ready. A
    /// `StartError::Host` means the snapshot could not be used (its reason says why).
    async fn restore(
        &self,
        spec: &EnvSpec,
        files: &super::snapshot::SnapshotFiles,
    ) -> Result<MicrovmSandbox, StartError> {
        let started = Instant::now();
        for p in [files.state(), files.mem(), files.rootfs()] {
            if !p.is_file() {
                return Err(StartError::Host(format!("{} is missing", p.display())));
            }
        }
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let env_dir = self.cfg.envs_dir.join(&id);
        std::fs::create_dir_all(&env_dir)
            .map_err(|e| StartError::Host(format!("{}: {e}", env_dir.display())))?;
        let uds = env_dir.join("v.sock");
        let listener = UnixListener::bind(format!("{}_{}", uds.display(), proto::HOST_PORT))
            .map_err(|e| StartError::Host(format!("vsock listener: {e}")))?;
        // The working set of an earlier clone, when there is one, is loaded before the vCPUs
        // start; otherwise this clone records it after its first invocation.
        let api_sock = env_dir.join("api.sock");
        let prefetch = files.working_set().is_file();
        let mut cmd = Command::new(&self.cfg.vmm);
        cmd.arg("--api-sock").arg(&api_sock);
        if prefetch {
            cmd.arg("--prefetch").arg(files.working_set());
        }
        cmd.arg("--restore")
            .arg(files.state())
            .arg("--mem")
            .arg(files.mem())
            .arg("--vsock-uds")
            .arg(&uds)
            .arg("--serial")
            .arg(env_dir.join("serial.log"))
            .arg("--block-path")
            .arg(files.rootfs());
        let child = self.spawn_vmm(cmd, &env_dir)?;
        let log = self.env_log(spec, &id)?;
        let mut env = MicrovmSandbox {
            id,
            function: spec.function.clone(),
            child,
            stream: None,
            decoder: Decoder::new(),
            env_dir,
            broken: false,
            reset: None,
            log,
            pending: VecDeque::new(),
            chunked: None,
            working_set: (!prefetch).then(|| (api_sock.clone(), files.working_set())),
        };
        let limit = self
            .cfg
            .boot_timeout
            .min(super::snapshot::RECONNECT_TIMEOUT);
        super::snapshot::accept_guest(&mut env, &listener, limit)
            .await
            .map_err(StartError::Host)?;
        tokio::time::timeout(limit, super::snapshot::restored_handshake(&mut env))
            .await
            .map_err(|_| {
                StartError::Host(format!("the restored guest was not ready within {limit:?}"))
            })??;
        env.log.restored(started.elapsed());
        tracing::debug!(function = %spec.function.config.function_name, env = %env.id,
            "restored in {:.0} ms", started.elapsed().as_secs_f64() * 1000.0);
        Ok(env)
    }
}

pub struct MicrovmSandbox {
    pub(super) id: String,
    pub(super) function: Arc<Function>,
    pub(super) child: Child,
    pub(super) stream: Option<UnixStream>,
    pub(super) decoder: Decoder,
    pub(super) env_dir: PathBuf,
    broken: bool,
    /// Why a broken environment is reset when the guest still listens (`timeout`,
    /// `failure`): its extensions get SHUTDOWN with it.
    reset: Option<&'static str>,
    pub(super) log: Arc<EnvLog>,
    /// Frames read ahead while draining log lines, handed out by `recv` first.
    pub(super) pending: VecDeque<Message>,
    /// Chunked image and the VMM's control socket, until the first invocation records
    /// which chunks the VM fetched.
    chunked: Option<(ChunkedBoot, PathBuf)>,
    /// A restored clone's control socket and where to keep the snapshot's working set,
    /// until its first invocation has recorded it (only when the snapshot has none yet).
    working_set: Option<(PathBuf, PathBuf)>,
}

impl MicrovmSandbox {
    pub(super) async fn send(&mut self, m: &Message) -> Result<(), proto::ProtoError> {
        match self.stream.as_mut() {
            Some(s) => proto::write_message_async(s, m).await,
            None => Err(proto::ProtoError::Closed),
        }
    }

    pub(super) async fn recv(&mut self) -> Result<Message, proto::ProtoError> {
        if let Some(m) = self.pending.pop_front() {
            return Ok(m);
        }
        match self.stream.as_mut() {
            Some(s) => proto::read_message_async(s, &mut self.decoder).await,
            None => Err(proto::ProtoError::Closed),
        }
    }

    pub(super) fn log_line(&self, l: &proto::Log) {
        let text = String::from_utf8_lossy(&l.line);
        let text = text.trim_end_matches(['\n', '\r']);
        match &l.extension {
            Some(ext) => tracing::info!(target: "kindling::function",
                function = %self.function.config.function_name, env = %self.id,
                extension = %ext, "{}", text),
            None => tracing::info!(target: "kindling::function",
                function = %self.function.config.function_name, env = %self.id, "{}", text),
        }
        self.log.line(text);
    }

    /// Logs the Log frames that have already arrived, without waiting for more (reading a
    /// frame is cancel-safe); any other frame is kept for `recv`.
    async fn drain_logs(&mut self) {
        loop {
            let Some(s) = self.stream.as_mut() else {
                return;
            };
            // A zero timeout polls the read once: it yields only frames already here.
            match tokio::time::timeout(
                Duration::ZERO,
                proto::read_message_async(s, &mut self.decoder),
            )
            .await
            {
                Ok(Ok(Message::Log(l))) => self.log_line(&l),
                Ok(Ok(other)) => {
                    self.pending.push_back(other);
                    return;
                }
                Ok(Err(_)) | Err(_) => return,
            }
        }
    }

    async fn handshake(&mut self, spec: &EnvSpec, init_type: &str) -> Result<(), StartError> {
        self.send(&Message::Hello(Hello::new(Role::Host)))
            .await
            .map_err(proto_err("hello"))?;
        let hello = self.recv().await.map_err(proto_err("hello"))?;
        proto::expect_hello(hello, Role::Guest).map_err(proto_err("hello"))?;
        let c = &self.function.config;
        let mut configure = Configure {
            function_name: c.function_name.clone(),
            function_version: c.version.clone(),
            handler: c.handler.clone(),
            memory_mb: c.memory_size,
            timeout_ms: u64::from(c.timeout) * 1000,
            region: spec.region.clone(),
            runtime: match (&c.image_config_response, Runtime::parse(&c.runtime)) {
                (Some(image), _) => RuntimeKind::Image {
                    config_path: guest_init::image::IMAGE_CONFIG_PATH.into(),
                    entrypoint: image.image_config.entry_point.clone(),
                    command: image.image_config.command.clone(),
                    working_dir: image.image_config.working_directory.clone(),
                },
                (None, Some(Runtime::Python311)) => RuntimeKind::Python {
                    interpreter: rootfs::base::PYTHON.into(),
                },
                (None, _) => RuntimeKind::Provided,
            },
            task_root: TASK_ROOT.into(),
            environment: BTreeMap::new(),
            init_timeout_ms: spec.init_timeout.as_millis() as u64,
            run_as: Some(RunAs {
                uid: RUNTIME_UID,
                gid: RUNTIME_GID,
            }),
            hostname: Some(format!("kindling-{}", self.id)),
            host_time_ms: Some(epoch_ms(SystemTime::now())),
            // The guest kernel's RNG may be unseeded this early in boot (no hardware RNG
            // is passed through): seed it, or the first getrandom(2) in the guest blocks.
            entropy_hex: match super::snapshot::host_entropy() {
                Ok(bytes) => Some(guest_init::proto::to_hex(&bytes)),
                Err(e) => {
                    tracing::warn!(env = %self.id, "no host entropy for the guest: {e}");
                    None
                }
            },
        };
        let mut environment =
            guest_init::env::lambda_variables(&configure, "/tmp", self.log.stream());
        environment.insert("AWS_LAMBDA_INITIALIZATION_TYPE".into(), init_type.into());
        if let RuntimeKind::Python { .. } = configure.runtime {
            // Where the base image keeps awslambdaric, as Lambda's /var/runtime.
            environment.insert("PYTHONPATH".into(), rootfs::base::RUNTIME_DIR.into());
        }
        if let Some(vars) = &c.environment {
            environment.extend(vars.variables.clone());
        }
        configure.environment = environment;
        self.send(&Message::Configure(Box::new(configure)))
            .await
            .map_err(proto_err("configure"))?;
        // The host keeps its own init limit (the guest's is a backstop).
        let limit = tokio::time::sleep(spec.init_timeout);
        tokio::pin!(limit);
        loop {
            let msg = tokio::select! {
                m = self.recv() => m.map_err(proto_err("init"))?,
                _ = &mut limit => return Err(StartError::InitTimeout(spec.init_timeout)),
            };
            match msg {
                Message::Ready(r) => {
                    tracing::debug!(env = %self.id, "runtime ready after {} us", r.init_duration_us);
                    // The guest's measure: runtime spawn to its first /next (no VM boot).
                    self.log.ready(Duration::from_micros(r.init_duration_us));
                    return Ok(());
                }
                Message::Log(l) => self.log_line(&l),
                Message::InitError(e) => {
                    return Err(StartError::Function(ErrorReport::from_runtime(
                        e.error_type,
                        &e.body,
                        None,
                    )))
                }
                Message::InitTimeout(_) => return Err(StartError::InitTimeout(spec.init_timeout)),
                Message::RuntimeExit(x) => {
                    return Err(StartError::Function(ErrorReport::platform(
                        "Runtime.ExitError",
                        format!("Error: Runtime exited with error: {}", x.description),
                    )))
                }
                Message::Fatal(f) => {
                    return Err(StartError::Host(format!("guest-init: {}", f.message)))
                }
                other => {
                    return Err(StartError::Host(format!(
                        "guest sent {:?} during init",
                        other.kind()
                    )))
                }
            }
        }
    }
}

#[async_trait]
impl Sandbox for MicrovmSandbox {
    fn id(&self) -> &str {
        &self.id
    }

    async fn invoke(&mut self, req: InvokeRequest, deadline: Instant) -> InvokeOutcome {
        // Lines the guest sent since the last invocation go before this one's START.
        if self.pending.is_empty() {
            self.drain_logs().await;
        }
        self.log.start(&req.request_id);
        let outcome = self.run_invocation(req, deadline).await;
        if !self.broken {
            self.drain_logs().await;
        }
        // Max Memory Used is left out: the host cannot see the runtime's memory inside the
        // guest, and the VMM's RSS (guest kernel, page cache) is not that number.
        self.log.finish(InvocationEnd {
            outcome: &outcome,
            timeout: Duration::from_secs(u64::from(self.function.config.timeout)),
            max_memory_mb: None,
        });
        if let Some((api_sock, dest)) = self.working_set.take() {
            tokio::spawn(async move {
                match super::snapshot::record_working_set(&api_sock, &dest).await {
                    Ok(()) => {
                        tracing::info!(path = %dest.display(), "snapshot working set recorded")
                    }
                    Err(e) => tracing::warn!("cannot record the snapshot's working set: {e}"),
                }
            });
        }
        if let Some((boot, api_sock)) = self.chunked.take() {
            // The cold start has answered: what the VM fetched up to now is its boot and
            // first invocation, the next cold start's prefetch list.
            tokio::spawn(async move {
                if let Err(e) = boot
                    .images
                    .record_cold_start(&boot.name, &boot.manifest, &api_sock)
                    .await
                {
                    tracing::warn!(image = %boot.name, "cannot record the fetched chunks: {e}");
                }
            });
        }
        outcome
    }

    fn is_reusable(&self) -> bool {
        !self.broken
    }

    async fn stop(mut self: Box<Self>) {
        let extensions = has_extensions(&self.function).await;
        // A broken environment is told only when it has extensions to tell (and the guest
        // still listens); otherwise it is simply killed.
        let reason = match (self.broken, self.reset) {
            (false, _) => Some("spindown"),
            (true, Some(r)) if extensions => Some(r),
            _ => None,
        };
        if let Some(reason) = reason {
            let grace = if extensions {
                EXTENSION_SHUTDOWN_GRACE
            } else {
                PLAIN_SHUTDOWN_GRACE
            };
            let bye = Message::Shutdown(proto::Shutdown {
                reason: reason.into(),
                grace_ms: grace.as_millis() as u64,
            });
            if self.send(&bye).await.is_ok() {
                let wait = grace + Duration::from_millis(1500);
                let _ = tokio::time::timeout(wait, self.child.wait()).await;
            }
        }
        // Drop kills whatever is left.
    }
}

impl MicrovmSandbox {
    /// One invocation, without its START/END/REPORT lines.
    async fn run_invocation(&mut self, req: InvokeRequest, deadline: Instant) -> InvokeOutcome {
        let left = deadline.saturating_duration_since(Instant::now());
        let invoke = proto::Invoke {
            request_id: req.request_id.clone(),
            invocation_id: uuid::Uuid::new_v4().to_string(),
            deadline_ms: epoch_ms(SystemTime::now() + left),
            function_arn: self.function.config.function_arn.clone(),
            trace_id: Some(req.trace_id.clone()),
            client_context: req.client_context.clone(),
            cognito_identity: None,
            tenant_id: None,
            content_type: "application/json".into(),
            stream: req.stream.is_some(),
            payload: req.payload.clone(),
        };
        let failed = |this: &mut Self, kind: &str, msg: String| {
            this.broken = true;
            this.reset = match kind {
                "Sandbox.Timedout" => Some("timeout"),
                "Runtime.ExitError" => Some("failure"),
                _ => None,
            };
            InvokeOutcome::Error(ErrorReport::platform(
                kind,
                format!("RequestId: {} Error: {msg}", req.request_id),
            ))
        };
        if let Err(e) = self.send(&Message::Invoke(Box::new(invoke))).await {
            return failed(
                self,
                "Runtime.Unknown",
                format!("the environment is gone ({e})"),
            );
        }
        let limit = tokio::time::sleep_until(deadline.into());
        tokio::pin!(limit);
        loop {
            let msg = tokio::select! {
                m = self.recv() => m,
                _ = &mut limit => {
                    let timeout = self.function.config.timeout;
                    return failed(self, "Sandbox.Timedout", format!("Task timed out after {timeout}.00 seconds"));
                }
            };
            match msg {
                Ok(Message::Log(l)) => self.log_line(&l),
                // A streamed answer: into the caller's sink as it comes (awaiting it is the
                // backpressure: the guest's queue fills, then the runtime's upload slows). A
                // caller that went away does not stop the function; the body is read on.
                Ok(Message::StreamStart(st)) if st.request_id == req.request_id => {
                    let ev = StreamEvent::Started {
                        content_type: st.content_type,
                    };
                    forward_stream(req.stream.as_ref(), ev, deadline).await;
                }
                Ok(Message::StreamChunk(c)) if c.request_id == req.request_id => {
                    forward_stream(req.stream.as_ref(), StreamEvent::Chunk(c.payload), deadline)
                        .await;
                }
                Ok(Message::Response(r)) if r.request_id == req.request_id => {
                    return InvokeOutcome::Response {
                        body: r.payload,
                        content_type: r.content_type,
                    }
                }
                Ok(Message::FunctionError(e)) if e.request_id == req.request_id => {
                    return InvokeOutcome::Error(ErrorReport::from_runtime(
                        e.error_type,
                        &e.body,
                        e.xray_cause,
                    ))
                }
                Ok(Message::RuntimeExit(x)) => {
                    return failed(
                        self,
                        "Runtime.ExitError",
                        format!("Runtime exited with error: {}", x.description),
                    )
                }
                Ok(Message::Fatal(f)) => {
                    return failed(
                        self,
                        "Runtime.Unknown",
                        format!("guest-init failed: {}", f.message),
                    )
                }
                Ok(Message::Pong(_)) => {}
                Ok(other) => {
                    return failed(
                        self,
                        "Runtime.Unknown",
                        format!("unexpected {:?} from the guest", other.kind()),
                    )
                }
                Err(e) => {
                    let why = self.vmm_exit_note().await;
                    tracing::warn!(function = %self.function.config.function_name, env = %self.id,
                        "the guest connection broke ({e}){why}");
                    return failed(
                        self,
                        "Runtime.Unknown",
                        format!("the guest connection broke ({e}){why}"),
                    );
                }
            }
        }
    }
}

impl MicrovmSandbox {
    /// Why the guest may have gone: when the VMM exits shortly after its connection broke
    /// (a guest panic, an emulation failure on an emulating host), its status, the end of
    /// its log and the guest's last console lines; empty when it still runs.
    pub(super) async fn vmm_exit_note(&mut self) -> String {
        const EXIT_WAIT: Duration = Duration::from_millis(500);
        match tokio::time::timeout(EXIT_WAIT, self.child.wait()).await {
            Ok(status) => format!("; {}", exit_note(status, &self.env_dir)),
            Err(_) => String::new(),
        }
    }
}

/// "the VMM exited (...): <vmm.log tail>; guest console: <serial.log tail>" for a VMM that
/// has exited. The console matters most: a guest kernel panic (`panic=1 reboot=k` turns it
/// into a clean VMM exit) or guest-init's last words are only there.
pub(super) fn exit_note(
    status: std::io::Result<std::process::ExitStatus>,
    env_dir: &Path,
) -> String {
    let status = status
        .map(|s| s.to_string())
        .unwrap_or_else(|e| e.to_string());
    let mut note = format!(
        "the VMM exited ({status}): {}",
        log_tail(&env_dir.join("vmm.log"), 5)
    );
    let console = log_tail(&env_dir.join("serial.log"), 12);
    if !console.is_empty() {
        note.push_str("; guest console: ");
        note.push_str(&console);
    }
    note
}

/// The last `lines` lines of a log file (at most its last 16 KiB), on one line.
fn log_tail(path: &Path, lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    const MAX_TAIL: u64 = 16 * 1024;
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut buf = Vec::new();
    if file
        .seek(SeekFrom::Start(len.saturating_sub(MAX_TAIL)))
        .is_err()
        || file.take(MAX_TAIL).read_to_end(&mut buf).is_err()
    {
        return String::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let tail: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .rev()
        .take(lines)
        .collect();
    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

impl Drop for MicrovmSandbox {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        super::remove_dir_in_background(std::mem::take(&mut self.env_dir));
    }
}

/// Whether the function's code has external extensions (executables in `extensions/`, which
/// lands at `/var/task/extensions` in the guest; see `guest_init::extensions`).
async fn has_extensions(f: &Function) -> bool {
    let dir = f.code_dir.join("extensions");
    tokio::task::spawn_blocking(move || {
        guest_init::extensions::find(&[dir]).is_ok_and(|found| !found.is_empty())
    })
    .await
    .unwrap_or(false)
}

/// Hands one event of a streamed response to the caller's sink, waiting at most until the
/// invocation's deadline (the invocation loop then times it out).
async fn forward_stream(sink: Option<&StreamSink>, ev: StreamEvent, deadline: Instant) {
    if let Some(sink) = sink {
        let _ = tokio::time::timeout_at(deadline.into(), sink.send(ev)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_note_carries_the_guest_console_tail() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("vmm.log"), "starting\nguest reset\n").unwrap();
        let console: String = (0..5000).map(|i| format!("[ {i}] boot line\n")).collect();
        let console = console + "Kernel panic - not syncing: Attempted to kill init!\n\n";
        std::fs::write(d.path().join("serial.log"), console).unwrap();
        let status = std::process::Command::new("true").status();
        let note = exit_note(status, d.path());
        assert!(note.starts_with("the VMM exited (exit status: 0): starting | guest reset; "));
        let console = note.split("; guest console: ").nth(1).unwrap();
        assert_eq!(console.split(" | ").count(), 12);
        assert!(console.ends_with("Kernel panic - not syncing: Attempted to kill init!"));
        assert!(console.starts_with("[ 4989] boot line"));
    }

    #[test]
    fn exit_note_without_logs_says_only_the_status() {
        let d = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("false").status();
        assert_eq!(
            exit_note(status, d.path()),
            "the VMM exited (exit status: 1): "
        );
    }
}
