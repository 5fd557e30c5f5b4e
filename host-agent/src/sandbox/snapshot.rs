//! Snapshot cold starts for the microvm backend (issue 6).
//!
//! Per function revision and VM recipe (the snapshot *key*): the first cold start boots as
//! usual with `AWS_LAMBDA_INITIALIZATION_TYPE=snap-start`, runs Init, and once the guest
//! answered PrepareSnapshot the VM is paused and snapshotted (full), then resumed and kept as
//! the first warm environment: the agent drops the guest connection, guest-init reconnects,
//! and gets a Restored (fresh entropy, clock, identity) like every clone. Later cold starts
//! restore the snapshot in a new `kindling-vmm --restore` process (memory mapped
//! MAP_PRIVATE from the file, so clones share its page cache) with their own vsock socket and
//! serial file, accept the guest's reconnection on `<uds>_9999`, send Restored and wait for
//! Ready. Any problem with a snapshot (missing or corrupt files, the VMM refuses it, the guest
//! does not come back in time) deletes it, is logged with the reason, and the cold start
//! boots instead.
//!
//! Files: `<data-dir>/snapshots/<function>/<key>/{state,mem,rootfs.ext4,meta.json}`; the root
//! image is kept beside the memory (a hard link when possible) because the guest's page cache
//! in the snapshot describes exactly that file, and `images/` is emptied at agent start. A new
//! key (any input changed) replaces the function's older key directories when it is written.
//! Snapshots survive agent restarts.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use guest_init::proto::{self, Hello, Message, Role};
use rapid_api::ErrorReport;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::microvm::{MicrovmConfig, MicrovmSandbox};
use super::StartError;
use crate::functions::Function;

/// Bytes of host entropy each restored copy gets.
pub const ENTROPY_BYTES: usize = 64;
/// How long the guest may take to become idle for a snapshot.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(10);
/// One control-socket request (a full snapshot writes all of guest memory).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(120);
/// From resume or restore to the guest's Ready (a guest reconnects within a second even where
/// its kernel is emulated; past this the snapshot is given up).
pub const RECONNECT_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the VMM's control socket: {0}")]
    Control(String),
    #[error("the guest: {0}")]
    Guest(String),
    #[error("the guest would not be snapshotted: {0}")]
    Refused(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Digests of the host-side inputs, computed once.
#[derive(Debug, Clone)]
struct HostInputs {
    kernel: String,
    guest_init: String,
    vmm: String,
}

fn sha256_file(path: &Path) -> Result<String, SnapshotError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    Ok(hex(&Sha256::digest(&bytes)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One snapshot's directory.
#[derive(Debug, Clone)]
pub struct SnapshotFiles {
    pub function: String,
    pub key: String,
    pub dir: PathBuf,
}

impl SnapshotFiles {
    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }
    pub fn mem(&self) -> PathBuf {
        self.dir.join("mem")
    }
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs.ext4")
    }
    pub fn meta(&self) -> PathBuf {
        self.dir.join("meta.json")
    }
    /// The guest pages the first restored clone touched up to the end of its first
    /// invocation (the VMM's `working_set` file): later restores prefetch them.
    pub fn working_set(&self) -> PathBuf {
        self.dir.join("working-set.json")
    }
}

/// Asks a restored VMM for the pages its guest touched since the restore and keeps them as
/// the snapshot's working set (written to a temporary name, then renamed: a restore never
/// sees half a file). The first restored clone does this after its first invocation.
pub(super) async fn record_working_set(api_sock: &Path, dest: &Path) -> Result<(), SnapshotError> {
    let tmp = dest.with_extension(format!("tmp-{}", std::process::id()));
    control(
        api_sock,
        json!({"action": "working_set", "path": tmp.display().to_string()}),
    )
    .await?;
    std::fs::rename(&tmp, dest)
        .map_err(|e| SnapshotError::Control(format!("{}: {e}", dest.display())))
}

/// What a cold start does with snapshots.
pub enum Plan {
    /// Restore this snapshot.
    Restore(SnapshotFiles),
    /// Boot, and snapshot the VM after Init (this start holds the key's claim).
    Make(Making),
    /// Boot without snapshotting (another start is making the snapshot, or making it failed).
    Boot,
}

/// The claim on making one key's snapshot; released on drop.
pub struct Making {
    pub files: SnapshotFiles,
    snapshots: Arc<Snapshots>,
}

impl Drop for Making {
    fn drop(&mut self) {
        self.snapshots.state().making.remove(&self.files.key);
    }
}

#[derive(Debug, Default)]
struct State {
    making: HashSet<String>,
    /// Keys whose making failed: booted normally until the agent restarts, rather than
    /// paying for a failed snapshot on every cold start.
    failed: HashSet<String>,
}

/// The snapshot store of one agent (`<data-dir>/snapshots`).
#[derive(Debug)]
pub struct Snapshots {
    root: PathBuf,
    inputs: tokio::sync::OnceCell<HostInputs>,
    state: Mutex<State>,
}

impl Snapshots {
    /// Opens `<data-dir>/snapshots`, removing snapshots left half-written.
    pub fn open(data_dir: &Path) -> Result<Arc<Snapshots>, SnapshotError> {
        let root = data_dir.join("snapshots");
        std::fs::create_dir_all(&root).map_err(io_err(&root))?;
        if let Ok(functions) = std::fs::read_dir(&root) {
            for f in functions.flatten() {
                for k in std::fs::read_dir(f.path()).into_iter().flatten().flatten() {
                    if k.file_name().to_string_lossy().starts_with(".tmp-") {
                        let _ = std::fs::remove_dir_all(k.path());
                    }
                }
            }
        }
        Ok(Arc::new(Snapshots {
            root,
            inputs: tokio::sync::OnceCell::new(),
            state: Mutex::new(State::default()),
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn host_inputs(&self, cfg: &MicrovmConfig) -> Result<HostInputs, SnapshotError> {
        let cfg = cfg.clone();
        self.inputs
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || {
                    Ok(HostInputs {
                        kernel: sha256_file(&cfg.kernel)?,
                        guest_init: sha256_file(&cfg.guest_init)?,
                        vmm: sha256_file(&cfg.vmm)?,
                    })
                })
                .await
                .map_err(|e| SnapshotError::Control(e.to_string()))?
            })
            .await
            .cloned()
    }

    /// The key: SHA-256 over everything the snapshot's memory depends on.
    async fn key(
        &self,
        cfg: &MicrovmConfig,
        f: &Function,
        vm: &Value,
    ) -> Result<(String, Value), SnapshotError> {
        let host = self.host_inputs(cfg).await?;
        let c = &f.config;
        let inputs = json!({
            "kindling": env!("CARGO_PKG_VERSION"),
            "function": {
                "name": c.function_name,
                "revision_id": c.revision_id,
                "code_sha256": c.code_sha256,
                "runtime": c.runtime,
                "handler": c.handler,
                "memory_size": c.memory_size,
                "timeout": c.timeout,
                "environment": c.environment.as_ref().map(|e| &e.variables),
                "image_config": serde_json::to_value(&c.image_config_response).unwrap_or(Value::Null),
            },
            "kernel": {"path": cfg.kernel, "sha256": host.kernel},
            "guest_init_sha256": host.guest_init,
            "vmm_sha256": host.vmm,
            "vm": {"mem_mib": vm["mem_mib"], "vcpus": vm["vcpus"], "cmdline": vm["cmdline"]},
        });
        let key = hex(&Sha256::digest(inputs.to_string().as_bytes()))[..32].to_string();
        Ok((key, inputs))
    }

    /// Decides what a cold start of `f` with VM config `vm` does.
    pub async fn plan(
        self: &Arc<Self>,
        cfg: &MicrovmConfig,
        f: &Function,
        vm: &Value,
    ) -> Result<Plan, SnapshotError> {
        let (key, _) = self.key(cfg, f, vm).await?;
        let files = SnapshotFiles {
            function: f.config.function_name.clone(),
            dir: self.root.join(&f.config.function_name).join(&key),
            key: key.clone(),
        };
        if files.meta().is_file() {
            return Ok(Plan::Restore(files));
        }
        if files.dir.exists() {
            // A directory without its meta.json is not a snapshot.
            let _ = std::fs::remove_dir_all(&files.dir);
        }
        let mut st = self.state();
        if st.failed.contains(&key) || !st.making.insert(key) {
            return Ok(Plan::Boot);
        }
        Ok(Plan::Make(Making {
            files,
            snapshots: self.clone(),
        }))
    }

    /// A snapshot that cannot be used: removed, with the reason in the agent's log. Its key
    /// then boots without snapshots until the agent restarts (a snapshot that failed once
    /// would likely fail again, and each failure costs a cold start its wait).
    pub fn discard(&self, files: &SnapshotFiles, reason: &str) {
        tracing::warn!(function = %files.function, key = %files.key,
            "snapshot cannot be used, deleted; booting instead: {reason}");
        let _ = std::fs::remove_dir_all(&files.dir);
        self.state().failed.insert(files.key.clone());
    }

    /// Making `key` failed: that key boots without snapshots until the agent restarts.
    fn failed(&self, making: &Making, reason: &str) {
        tracing::warn!(function = %making.files.function, key = %making.files.key,
            "cannot snapshot the environment; this revision boots without snapshots: {reason}");
        self.state().failed.insert(making.files.key.clone());
    }
}

/// One request on the VMM's control socket.
async fn control(api_sock: &Path, request: Value) -> Result<Value, SnapshotError> {
    let call = async {
        let s = UnixStream::connect(api_sock)
            .await
            .map_err(|e| SnapshotError::Control(format!("{}: {e}", api_sock.display())))?;
        let (rd, mut wr) = s.into_split();
        let mut line = request.to_string();
        line.push('\n');
        wr.write_all(line.as_bytes())
            .await
            .map_err(|e| SnapshotError::Control(e.to_string()))?;
        let mut answer = String::new();
        BufReader::new(rd)
            .read_line(&mut answer)
            .await
            .map_err(|e| SnapshotError::Control(e.to_string()))?;
        let v: Value = serde_json::from_str(&answer)
            .map_err(|e| SnapshotError::Control(format!("bad answer {answer:?}: {e}")))?;
        if v["ok"] != json!(true) {
            return Err(SnapshotError::Control(format!(
                "{} failed: {}",
                request["action"], v["error"]
            )));
        }
        Ok(v)
    };
    tokio::time::timeout(CONTROL_TIMEOUT, call)
        .await
        .map_err(|_| SnapshotError::Control(format!("{} timed out", request["action"])))?
}

/// Fresh random bytes from the host kernel.
pub(crate) fn host_entropy() -> Result<Vec<u8>, SnapshotError> {
    let mut buf = vec![0u8; ENTROPY_BYTES];
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: getrandom writes at most `len - got` bytes into the buffer from `got`.
        let n = unsafe { libc::getrandom(buf[got..].as_mut_ptr().cast(), buf.len() - got, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(SnapshotError::Io {
                    path: "getrandom".into(),
                    source: e,
                });
            }
        } else {
            got += n as usize;
        }
    }
    Ok(buf)
}

fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The guest's side after a resume or restore, on a new connection: its Hello (resumed),
/// ours, Restored (entropy, clock, identity), then Ready; Log frames on the way are logged.
/// A failed after-restore hook is the function's error.
pub(super) async fn restored_handshake(env: &mut MicrovmSandbox) -> Result<(), StartError> {
    let host = |e: String| StartError::Host(format!("restored guest: {e}"));
    let hello = env.recv().await.map_err(|e| host(e.to_string()))?;
    let hello = proto::expect_hello(hello, Role::Guest).map_err(|e| host(e.to_string()))?;
    if !hello.resumed {
        return Err(host("the guest's Hello does not say it was resumed".into()));
    }
    let restored = proto::Restored {
        host_time_ms: epoch_ms(),
        hostname: Some(format!("kindling-{}", env.id)),
        log_stream: Some(env.log.stream().to_string()),
        entropy: host_entropy().map_err(|e| host(e.to_string()))?.into(),
    };
    for m in [
        Message::Hello(Hello::new(Role::Host)),
        Message::Restored(Box::new(restored)),
    ] {
        env.send(&m).await.map_err(|e| host(e.to_string()))?;
    }
    loop {
        match env.recv().await.map_err(|e| host(e.to_string()))? {
            Message::Ready(_) => return Ok(()),
            Message::Log(l) => env.log_line(&l),
            Message::InitError(e) => {
                return Err(StartError::Function(ErrorReport::from_runtime(
                    e.error_type,
                    &e.body,
                    None,
                )))
            }
            Message::Fatal(f) => return Err(host(format!("guest-init: {}", f.message))),
            other => return Err(host(format!("sent {:?} before Ready", other.kind()))),
        }
    }
}

/// Waits (bounded) for the guest's new connection on `listener`; an early VMM exit is an
/// error that says where its log is.
pub(super) async fn accept_guest(
    env: &mut MicrovmSandbox,
    listener: &UnixListener,
    limit: Duration,
) -> Result<(), String> {
    let stream = tokio::select! {
        accepted = listener.accept() => accepted.map_err(|e| format!("vsock accept: {e}"))?.0,
        status = env.child.wait() => {
            return Err(super::microvm::exit_note(status, &env.env_dir));
        }
        _ = tokio::time::sleep(limit) => {
            return Err(format!("the guest did not reconnect within {limit:?}"));
        }
    };
    env.stream = Some(stream);
    env.decoder = proto::Decoder::new();
    env.pending.clear();
    Ok(())
}

/// Snapshots a freshly initialised VM (booted with snap-start) and keeps it: PrepareSnapshot,
/// pause, full snapshot into a temporary directory (then renamed into place, older keys of
/// the function removed), resume, and the same reconnection + Restored as a clone. `Ok(true)`
/// when the snapshot was written; `Ok(false)` when the guest refused (the VM is untouched and
/// serves); `Err` when the VM is in an unknown state and must be discarded.
pub(super) async fn make(
    env: &mut MicrovmSandbox,
    listener: &UnixListener,
    api_sock: &Path,
    image: &Path,
    making: Making,
) -> Result<bool, StartError> {
    match make_inner(env, listener, api_sock, image, &making).await {
        Ok(()) => Ok(true),
        Err(SnapshotError::Refused(why)) => {
            making.snapshots.failed(&making, &why);
            Ok(false)
        }
        Err(e) => {
            making.snapshots.failed(&making, &e.to_string());
            Err(StartError::Host(format!(
                "snapshotting the environment: {e}"
            )))
        }
    }
}

async fn make_inner(
    env: &mut MicrovmSandbox,
    listener: &UnixListener,
    api_sock: &Path,
    image: &Path,
    making: &Making,
) -> Result<(), SnapshotError> {
    let started = Instant::now();
    let prepare = Message::PrepareSnapshot(proto::PrepareSnapshot {
        idle_timeout_ms: PREPARE_TIMEOUT.as_millis() as u64,
    });
    env.send(&prepare)
        .await
        .map_err(|e| SnapshotError::Guest(e.to_string()))?;
    let ready = tokio::time::timeout(PREPARE_TIMEOUT * 2, async {
        loop {
            match env.recv().await {
                Ok(Message::SnapshotReady(r)) => return Ok(r),
                Ok(Message::Log(l)) => env.log_line(&l),
                Ok(other) => {
                    return Err(SnapshotError::Guest(format!(
                        "sent {:?} instead of SnapshotReady",
                        other.kind()
                    )))
                }
                Err(e) => return Err(SnapshotError::Guest(e.to_string())),
            }
        }
    })
    .await
    .map_err(|_| SnapshotError::Guest("no SnapshotReady in time".into()))??;
    if let Some(why) = ready.refused {
        return Err(SnapshotError::Refused(why));
    }
    control(api_sock, json!({"action": "pause"})).await?;
    let files = &making.files;
    let parent = files.dir.parent().unwrap_or(&files.dir).to_path_buf();
    let tmp = parent.join(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    let result = async {
        control(
            api_sock,
            json!({"action": "snapshot", "state_path": tmp.join("state"),
                   "mem_path": tmp.join("mem"), "kind": "full"}),
        )
        .await?;
        let rootfs = tmp.join("rootfs.ext4");
        if std::fs::hard_link(image, &rootfs).is_err() {
            std::fs::copy(image, &rootfs).map_err(io_err(image))?;
        }
        let meta = json!({
            "function": files.function,
            "key": files.key,
            "revision_id": env.function.config.revision_id,
            "created_ms": epoch_ms(),
            "snapshot_ms": started.elapsed().as_millis() as u64,
        });
        let meta_path = tmp.join("meta.json");
        std::fs::write(
            &meta_path,
            serde_json::to_vec_pretty(&meta).unwrap_or_default(),
        )
        .map_err(io_err(&meta_path))?;
        // Older keys of this function are stale (code, image, kernel or config changed).
        for old in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
            let name = old.file_name();
            if old.path() != tmp && !name.to_string_lossy().starts_with(".tmp-") {
                let _ = std::fs::remove_dir_all(old.path());
            }
        }
        std::fs::rename(&tmp, &files.dir).map_err(io_err(&files.dir))
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result?;
    tracing::info!(function = %files.function, key = %files.key,
        "snapshot written in {:.0} ms", started.elapsed().as_secs_f64() * 1000.0);
    // The original carries on as the first warm environment, as a copy: its connection is
    // dropped, guest-init reconnects and gets its own Restored.
    env.stream = None;
    control(api_sock, json!({"action": "resume"})).await?;
    accept_guest(env, listener, RECONNECT_TIMEOUT)
        .await
        .map_err(SnapshotError::Guest)?;
    restored_handshake(env)
        .await
        .map_err(|e| SnapshotError::Guest(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_entropy_differs_between_calls() {
        let (a, b) = (host_entropy().unwrap(), host_entropy().unwrap());
        assert_eq!(a.len(), ENTROPY_BYTES);
        assert_ne!(a, b);
    }

    #[test]
    fn half_written_snapshots_are_removed_at_open() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("snapshots/fn");
        std::fs::create_dir_all(f.join(".tmp-abc")).unwrap();
        std::fs::create_dir_all(f.join("key1")).unwrap();
        Snapshots::open(d.path()).unwrap();
        assert!(!f.join(".tmp-abc").exists());
        assert!(f.join("key1").exists());
    }
}
