//! `kindling bench snapshot`: snapshot create and restore against cold boot, per guest memory
//! size and vCPU count.
//!
//! The guest is the real guest kernel with the VM tests' static init (`tests/guest-test-init`)
//! told to do one thing: listen on vsock port 5000 and echo what a connection sends
//! (`kindling.test=vsock-in`). "Answered" means a host client went through the VMM's hybrid
//! vsock (`CONNECT 5000` -> `OK`), sent `ping\n` and read `ping\n` back from the guest's user
//! space: the guest kernel and init ran, the vsock device and its interrupts work, and the
//! answer crossed the host-guest boundary both ways, which is what a restored function needs
//! to answer its first invocation (without the runtime's own work, which is the same for
//! both paths).
//!
//! Per configuration:
//! 1. N cold boots: VMM spawn -> vCPUs running, -> the first answer (the console says when the
//!    guest listens; the host connects then);
//! 2. one boot to the listening point, `pause`, `snapshot` (create time as the client saw it and
//!    as the VMM measured it; state file size, memory file size and its allocated blocks: zero
//!    pages are holes);
//! 3. a recording restore: answer, then `working_set` (the pages touched from restore to the
//!    answer) for `--prefetch`;
//! 4. N restores without and N with `--prefetch`, interleaved: VMM spawn -> vCPUs running,
//!    -> the first answer, page faults of the VMM process since its vCPUs started, and the VMM's
//!    memory overhead (RSS minus guest pages mapped) at the answer.
//!
//! The memory file stays in the page cache between restores (a host restoring one snapshot
//! again and again), so the faults are minor ones; `--cold-cache` evicts the file's pages before
//! each restore (`POSIX_FADV_DONTNEED`) to measure restores from disk.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

/// Longest a boot may take to answer (an emulating host boots in 10-45 s).
const BOOT_LIMIT: Duration = Duration::from_secs(240);
/// Longest a restore may take to answer.
const RESTORE_LIMIT: Duration = Duration::from_secs(60);
const GUEST_PORT: u32 = 5000;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotBenchError {
    #[error("guest kernel: {0}")]
    Kernel(#[from] rootfs::KernelError),
    #[error("test init: {0}")]
    Init(#[from] rootfs::static_bin::StaticBuildError),
    #[error("{0}")]
    Io(String),
    #[error("{mem_mib} MiB, {vcpus} vCPU(s), {what}: {msg}")]
    Run {
        mem_mib: u32,
        vcpus: u8,
        what: String,
        msg: String,
    },
}

type Result<T> = std::result::Result<T, SnapshotBenchError>;

#[derive(Debug, Clone, clap::Args)]
pub struct SnapshotCli {
    /// Guest memory sizes in MiB (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "128")]
    pub mem_mib: Vec<u32>,
    /// vCPU counts (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub vcpus: Vec<u8>,
    /// Cold boots, restores and restores with prefetch per configuration (a cold boot takes
    /// 10-45 s on an emulating host).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Evict the memory file from the page cache before each restore.
    #[arg(long)]
    pub cold_cache: bool,
    /// A vmlinux to boot instead of the cached guest kernel (smp flavour).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// The static test init (default: built from the workspace).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// The kindling-vmm binary (default: beside this one).
    #[arg(long)]
    pub vmm: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Nearest-rank percentiles.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Pct {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

fn pct(values: impl Iterator<Item = f64>) -> Pct {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = |q: f64| {
        if v.is_empty() {
            return 0.0;
        }
        let r = (q * v.len() as f64).ceil() as usize;
        v[r.clamp(1, v.len()) - 1]
    };
    Pct {
        p50: rank(0.5),
        p90: rank(0.9),
        p99: rank(0.99),
    }
}

/// One VM start (boot or restore) up to its first answer.
#[derive(Debug, Clone, Serialize)]
pub struct StartRun {
    /// VMM spawn -> vCPUs running (the VMM's `vcpus_started_us`).
    pub vcpus_running_ms: f64,
    /// VMM spawn -> the guest's echo read back.
    pub answer_ms: f64,
    /// Minor and major page faults of the VMM process from the vCPUs' start to the answer.
    pub minor_faults: u64,
    pub major_faults: u64,
    /// RSS minus guest memory mapped, at the answer.
    pub vmm_overhead_mib: f64,
    /// Time the VMM spent loading the working set (prefetch runs).
    pub prefetch_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Series {
    pub runs: Vec<StartRun>,
    pub vcpus_running_ms: Pct,
    pub answer_ms: Pct,
    pub minor_faults: Pct,
    pub major_faults: Pct,
    pub vmm_overhead_mib: Pct,
}

impl Series {
    fn of(runs: Vec<StartRun>) -> Series {
        Series {
            vcpus_running_ms: pct(runs.iter().map(|r| r.vcpus_running_ms)),
            answer_ms: pct(runs.iter().map(|r| r.answer_ms)),
            minor_faults: pct(runs.iter().map(|r| r.minor_faults as f64)),
            major_faults: pct(runs.iter().map(|r| r.major_faults as f64)),
            vmm_overhead_mib: pct(runs.iter().map(|r| r.vmm_overhead_mib)),
            runs,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    /// `pause` + `snapshot` as the client saw them.
    pub create_ms: f64,
    /// The snapshot as the VMM measured it (`took_us`).
    pub vmm_create_ms: f64,
    pub state_bytes: u64,
    pub memory_bytes: u64,
    /// Blocks the sparse memory file occupies on disk.
    pub memory_allocated_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConfigReport {
    pub mem_mib: u32,
    pub vcpus: u8,
    pub snapshot: SnapshotInfo,
    /// Pages the recording restore touched up to its answer.
    pub working_set_read_pages: u64,
    pub working_set_written_pages: u64,
    pub cold_boot: Series,
    pub restore: Series,
    pub restore_prefetch: Series,
    /// Cold boot -> answer p50 over restore -> answer p50 (without, with prefetch).
    pub boot_over_restore: f64,
    pub boot_over_restore_prefetch: f64,
    /// 1 - (minor + major faults with prefetch, p50) / (without, p50), in percent.
    pub prefetch_fault_reduction_pct: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotReport {
    /// The VMM's host KVM probe (`kind`: hardware | emulated).
    pub host_kvm: Value,
    pub emulating_kvm: bool,
    pub kernel: PathBuf,
    pub runs: usize,
    pub cold_cache: bool,
    pub configs: Vec<ConfigReport>,
}

/// A `kindling-vmm` child, killed on drop.
struct VmmProc {
    child: Child,
    api: PathBuf,
    log: PathBuf,
}

impl Drop for VmmProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl VmmProc {
    fn spawn(vmm: &Path, args: &[&std::ffi::OsStr], api: &Path, log: &Path) -> Result<VmmProc> {
        let log_file = std::fs::File::create(log)
            .map_err(|e| SnapshotBenchError::Io(format!("{}: {e}", log.display())))?;
        let child = Command::new(vmm)
            .args(args)
            .arg("--api-sock")
            .arg(api)
            .env("KINDLING_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| SnapshotBenchError::Io(format!("spawning {}: {e}", vmm.display())))?;
        Ok(VmmProc {
            child,
            api: api.to_path_buf(),
            log: log.to_path_buf(),
        })
    }

    /// The VMM's log, for error messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }

    fn check_alive(&mut self) -> std::result::Result<(), String> {
        match self.child.try_wait() {
            Ok(Some(s)) => Err(format!("kindling-vmm exited ({s}): {}", self.log_tail())),
            _ => Ok(()),
        }
    }

    /// One control-socket request; an `"ok": false` answer is an error.
    fn ask(&self, req: Value) -> std::result::Result<Value, String> {
        let s = UnixStream::connect(&self.api).map_err(|e| format!("control socket: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        let mut w = s.try_clone().map_err(|e| e.to_string())?;
        w.write_all(format!("{req}\n").as_bytes())
            .map_err(|e| format!("control socket: {e}"))?;
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .map_err(|e| format!("control socket: {e}"))?;
        let a: Value = serde_json::from_str(&line).map_err(|e| format!("{e}: {line:?}"))?;
        if a["ok"] != true {
            return Err(format!("{req} -> {a}"));
        }
        Ok(a)
    }

    /// Asks for a shutdown and waits for the exit (killed on drop otherwise).
    fn shutdown(mut self) {
        let _ = self.ask(json!({"action": "shutdown"}));
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Waits for `path` to exist.
fn wait_for(path: &Path, vm: &mut VmmProc, limit: Duration) -> std::result::Result<(), String> {
    let t0 = Instant::now();
    while !path.exists() {
        vm.check_alive()?;
        if t0.elapsed() > limit {
            return Err(format!(
                "{} did not appear within {limit:?}",
                path.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Waits until the guest's console says it listens on the vsock port.
fn wait_listening(
    serial: &Path,
    vm: &mut VmmProc,
    limit: Duration,
) -> std::result::Result<(), String> {
    let needle = format!("vsock listening on port {GUEST_PORT}");
    let t0 = Instant::now();
    loop {
        if std::fs::read_to_string(serial).is_ok_and(|s| s.contains(&needle)) {
            return Ok(());
        }
        vm.check_alive()?;
        if t0.elapsed() > limit {
            return Err(format!("the guest did not listen within {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Connects through the VMM's hybrid vsock, sends a line and reads the guest's echo. The
/// connection stays open (the test init powers off once it closes).
fn ping(uds: &Path, limit: Duration) -> std::result::Result<UnixStream, String> {
    let s = UnixStream::connect(uds).map_err(|e| format!("vsock {}: {e}", uds.display()))?;
    s.set_read_timeout(Some(limit)).map_err(|e| e.to_string())?;
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    w.write_all(format!("CONNECT {GUEST_PORT}\n").as_bytes())
        .map_err(|e| format!("vsock CONNECT: {e}"))?;
    let mut line = String::new();
    r.read_line(&mut line)
        .map_err(|e| format!("vsock CONNECT answer: {e}"))?;
    if !line.starts_with("OK ") {
        return Err(format!("vsock CONNECT {GUEST_PORT} answered {line:?}"));
    }
    w.write_all(b"ping\n")
        .map_err(|e| format!("vsock write: {e}"))?;
    line.clear();
    r.read_line(&mut line)
        .map_err(|e| format!("vsock echo: {e}"))?;
    if line != "ping\n" {
        return Err(format!("the guest echoed {line:?}"));
    }
    Ok(s)
}

/// The run's figures from the VMM's metrics at the answer.
fn start_run(m: &Value, answer: Duration) -> std::result::Result<StartRun, String> {
    let faults = &m["page_faults"]["since_vcpus_started"];
    Ok(StartRun {
        vcpus_running_ms: m["vcpus_started_us"]
            .as_u64()
            .ok_or_else(|| format!("no vcpus_started_us in {m}"))? as f64
            / 1e3,
        answer_ms: answer.as_secs_f64() * 1e3,
        minor_faults: faults["minor"]
            .as_u64()
            .ok_or_else(|| format!("no page fault counts in {m}"))?,
        major_faults: faults["major"].as_u64().unwrap_or(0),
        vmm_overhead_mib: m["memory"]["vmm_overhead_bytes"].as_u64().unwrap_or(0) as f64
            / 1048576.0,
        prefetch_ms: m["prefetch"]["took_us"].as_u64().map(|u| u as f64 / 1e3),
    })
}

/// Evicts `path`'s pages from the page cache (those no process maps).
fn evict(path: &Path) -> std::result::Result<(), String> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: fadvise on a file descriptor we own; it only drops clean cached pages.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(format!(
            "posix_fadvise: {}",
            std::io::Error::from_raw_os_error(rc)
        ));
    }
    Ok(())
}

struct Setup {
    vmm: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
}

struct ConfigBench<'a> {
    setup: &'a Setup,
    dir: PathBuf,
    mem_mib: u32,
    vcpus: u8,
    seq: usize,
}

impl ConfigBench<'_> {
    fn err(&self, what: impl Into<String>) -> impl FnOnce(String) -> SnapshotBenchError {
        let (mem_mib, vcpus, what) = (self.mem_mib, self.vcpus, what.into());
        move |msg| SnapshotBenchError::Run {
            mem_mib,
            vcpus,
            what,
            msg,
        }
    }

    fn next(&mut self, name: &str) -> PathBuf {
        self.seq += 1;
        self.dir.join(format!("{name}-{}", self.seq))
    }

    /// Spawns a VMM booting the guest; returns it with its serial log and vsock paths.
    fn boot(&mut self) -> Result<(VmmProc, PathBuf, PathBuf, Instant)> {
        let base = self.next("boot");
        let (cfg, serial, uds) = (
            base.with_extension("json"),
            base.with_extension("serial"),
            base.with_extension("vsock"),
        );
        let config = json!({
            "kernel": self.setup.kernel,
            "initrd": self.setup.initrd,
            // quiet: each console line costs emulated kernel time on an emulating host; the
            // long timeout keeps the guest's accept waiting across snapshot and restore.
            "cmdline": "reboot=k panic=1 nomodule quiet i8042.noaux i8042.nomux i8042.dumbkbd \
                        swiotlb=noforce console=ttyS0 kindling.test=vsock-in \
                        kindling.timeout=31536000",
            "vcpus": self.vcpus,
            "mem_mib": self.mem_mib,
            "vsock": {"guest_cid": 3, "uds_path": uds},
            "serial": {"file": serial},
        });
        std::fs::write(&cfg, config.to_string()).map_err(|e| self.err("boot")(e.to_string()))?;
        let t0 = Instant::now();
        let vm = VmmProc::spawn(
            &self.setup.vmm,
            &["--config".as_ref(), cfg.as_os_str()],
            &base.with_extension("api"),
            &base.with_extension("log"),
        )?;
        Ok((vm, serial, uds, t0))
    }

    fn cold_boot(&mut self) -> Result<StartRun> {
        let err = self.err("cold boot");
        let (mut vm, serial, uds, t0) = self.boot()?;
        let run = (|| {
            wait_listening(&serial, &mut vm, BOOT_LIMIT)?;
            let conn = ping(&uds, BOOT_LIMIT)?;
            let answer = t0.elapsed();
            let m = vm.ask(json!({"action": "metrics"}))?;
            drop(conn);
            start_run(&m["metrics"], answer)
        })()
        .map_err(err)?;
        vm.shutdown();
        Ok(run)
    }

    /// Boots to the listening point and snapshots there.
    fn take_snapshot(&mut self) -> Result<(PathBuf, PathBuf, SnapshotInfo)> {
        let err = self.err("snapshot");
        let (mut vm, serial, _, _) = self.boot()?;
        let (state, mem) = (self.dir.join("snap.state"), self.dir.join("snap.mem"));
        let info = (|| {
            wait_listening(&serial, &mut vm, BOOT_LIMIT)?;
            let t0 = Instant::now();
            vm.ask(json!({"action": "pause"}))?;
            let a = vm.ask(json!({"action": "snapshot", "state_path": state, "mem_path": mem}))?;
            let create_ms = t0.elapsed().as_secs_f64() * 1e3;
            let meta = |p: &Path| std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()));
            let (sm, mm) = (meta(&state)?, meta(&mem)?);
            Ok::<_, String>(SnapshotInfo {
                create_ms,
                vmm_create_ms: a["took_us"].as_u64().unwrap_or(0) as f64 / 1e3,
                state_bytes: sm.len(),
                memory_bytes: mm.len(),
                memory_allocated_bytes: mm.blocks() * 512,
            })
        })()
        .map_err(err)?;
        vm.shutdown();
        Ok((state, mem, info))
    }

    /// Restores the snapshot (with `prefetch`, or recording the working set into `record`)
    /// and measures it up to the first answer.
    fn restore(
        &mut self,
        state: &Path,
        mem: &Path,
        prefetch: Option<&Path>,
        record: Option<&Path>,
        cold_cache: bool,
    ) -> Result<(StartRun, Value)> {
        let err = self.err(if prefetch.is_some() {
            "restore with prefetch"
        } else {
            "restore"
        });
        if cold_cache {
            evict(mem).map_err(self.err("evicting the memory file"))?;
        }
        let base = self.next("restore");
        let uds = base.with_extension("vsock");
        let serial = base.with_extension("serial");
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "--restore".as_ref(),
            state.as_os_str(),
            "--mem".as_ref(),
            mem.as_os_str(),
            "--vsock-uds".as_ref(),
            uds.as_os_str(),
            "--serial".as_ref(),
            serial.as_os_str(),
        ];
        if let Some(p) = prefetch {
            args.extend(["--prefetch".as_ref(), p.as_os_str()]);
        }
        let t0 = Instant::now();
        let mut vm = VmmProc::spawn(
            &self.setup.vmm,
            &args,
            &base.with_extension("api"),
            &base.with_extension("log"),
        )?;
        let out = (|| {
            // The vsock socket is bound while the VM is built; connecting early is fine (the
            // VMM accepts once its event loop runs).
            wait_for(&uds, &mut vm, RESTORE_LIMIT)?;
            let conn = ping(&uds, RESTORE_LIMIT)?;
            let answer = t0.elapsed();
            let m = vm.ask(json!({"action": "metrics"}))?;
            let ws = match record {
                Some(p) => vm.ask(json!({"action": "working_set", "path": p}))?,
                None => Value::Null,
            };
            drop(conn);
            Ok::<_, String>((start_run(&m["metrics"], answer)?, ws))
        })()
        .map_err(err)?;
        vm.shutdown();
        Ok(out)
    }
}

/// [`bench_config_in`] in a temporary directory, kept (and named in the error) on failure.
fn bench_config(
    setup: &Setup,
    cli: &SnapshotCli,
    mem_mib: u32,
    vcpus: u8,
    progress: &dyn Fn(&str),
) -> Result<ConfigReport> {
    let dir = tempfile::tempdir().map_err(|e| SnapshotBenchError::Io(format!("temp dir: {e}")))?;
    match bench_config_in(setup, cli, mem_mib, vcpus, dir.path(), progress) {
        Ok(r) => Ok(r),
        Err(SnapshotBenchError::Run {
            mem_mib,
            vcpus,
            what,
            msg,
        }) => Err(SnapshotBenchError::Run {
            mem_mib,
            vcpus,
            what,
            msg: format!("{msg} (VMM logs kept in {})", dir.keep().display()),
        }),
        Err(e) => Err(e),
    }
}

fn bench_config_in(
    setup: &Setup,
    cli: &SnapshotCli,
    mem_mib: u32,
    vcpus: u8,
    dir: &Path,
    progress: &dyn Fn(&str),
) -> Result<ConfigReport> {
    let mut b = ConfigBench {
        setup,
        dir: dir.to_path_buf(),
        mem_mib,
        vcpus,
        seq: 0,
    };
    let runs = cli.runs.max(1);
    let mut boots = Vec::new();
    for i in 0..runs {
        progress(&format!(
            "{mem_mib} MiB, {vcpus} vCPU(s): cold boot {}/{runs}",
            i + 1
        ));
        boots.push(b.cold_boot()?);
    }
    progress(&format!("{mem_mib} MiB, {vcpus} vCPU(s): snapshot"));
    let (state, mem, snapshot) = b.take_snapshot()?;
    let ws = dir.join("working-set.json");
    let (_, rec) = b.restore(&state, &mem, None, Some(&ws), cli.cold_cache)?;
    let (mut plain, mut pre) = (Vec::new(), Vec::new());
    for i in 0..runs {
        progress(&format!(
            "{mem_mib} MiB, {vcpus} vCPU(s): restores {}/{runs}",
            i + 1
        ));
        plain.push(b.restore(&state, &mem, None, None, cli.cold_cache)?.0);
        pre.push(b.restore(&state, &mem, Some(&ws), None, cli.cold_cache)?.0);
    }
    let (cold_boot, restore, restore_prefetch) =
        (Series::of(boots), Series::of(plain), Series::of(pre));
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let faults = |s: &Series| s.minor_faults.p50 + s.major_faults.p50;
    Ok(ConfigReport {
        mem_mib,
        vcpus,
        snapshot,
        working_set_read_pages: rec["read_pages"].as_u64().unwrap_or(0),
        working_set_written_pages: rec["written_pages"].as_u64().unwrap_or(0),
        boot_over_restore: ratio(cold_boot.answer_ms.p50, restore.answer_ms.p50),
        boot_over_restore_prefetch: ratio(cold_boot.answer_ms.p50, restore_prefetch.answer_ms.p50),
        prefetch_fault_reduction_pct: if faults(&restore) > 0.0 {
            100.0 * (1.0 - faults(&restore_prefetch) / faults(&restore))
        } else {
            0.0
        },
        cold_boot,
        restore,
        restore_prefetch,
    })
}

/// Runs the benchmark; `progress` is told what runs next.
pub fn run(cli: &SnapshotCli, progress: &dyn Fn(&str)) -> Result<SnapshotReport> {
    let vmm = super::vmm_binary(cli.vmm.as_ref()).map_err(SnapshotBenchError::Io)?;
    let kernel = match &cli.kernel {
        Some(k) => k.clone(),
        None => rootfs::ensure_kernel(rootfs::KernelOptions::default())?,
    };
    let init = match &cli.init {
        Some(i) => i.clone(),
        None => rootfs::build_test_init()?,
    };
    let dir = tempfile::tempdir().map_err(|e| SnapshotBenchError::Io(format!("temp dir: {e}")))?;
    let initrd = dir.path().join("test-init.cpio");
    rootfs::test_initramfs(&init, &initrd)
        .map_err(|e| SnapshotBenchError::Io(format!("initramfs: {e}")))?;
    let host_kvm = vmm::vm::open_kvm()
        .ok()
        .and_then(|k| vmm::host::detect(&k).ok())
        .and_then(|h| serde_json::to_value(h).ok())
        .unwrap_or(Value::Null);
    let setup = Setup {
        vmm,
        kernel: kernel.clone(),
        initrd,
    };
    let mut configs = Vec::new();
    for &mem_mib in &cli.mem_mib {
        for &vcpus in &cli.vcpus {
            configs.push(bench_config(&setup, cli, mem_mib, vcpus, progress)?);
        }
    }
    Ok(SnapshotReport {
        emulating_kvm: host_kvm["kind"] == "emulated",
        host_kvm,
        kernel,
        runs: cli.runs.max(1),
        cold_cache: cli.cold_cache,
        configs,
    })
}

/// The report as text: a block per configuration, then a summary table.
pub fn render(r: &SnapshotReport) -> String {
    let mut s = String::new();
    if r.emulating_kvm {
        s.push_str(&format!(
            "NOTE: EMULATING KVM: this host's KVM emulates guest kernel code (~{:.0} ns per \
             ring-0 instruction): guest-side times are not bare-metal figures.\n",
            r.host_kvm["ring0_ns_per_instruction"]
                .as_f64()
                .unwrap_or(0.0)
        ));
    }
    s.push_str(&format!(
        "snapshot benchmark: {} run(s) each, host KVM: {}, page cache: {}\nkernel: {}\n",
        r.runs,
        r.host_kvm["kind"].as_str().unwrap_or("unknown"),
        if r.cold_cache {
            "memory file evicted before each restore"
        } else {
            "warm"
        },
        r.kernel.display()
    ));
    let mib = |b: u64| b as f64 / 1048576.0;
    for c in &r.configs {
        let sn = &c.snapshot;
        s.push_str(&format!(
            "\n== {} MiB, {} vCPU(s)\nsnapshot: create {:.1} ms (VMM {:.1} ms), state {:.1} KiB, \
             memory file {:.1} MiB ({:.1} MiB allocated)\nworking set: {} pages read, {} written \
             ({:.1} MiB)\n",
            c.mem_mib,
            c.vcpus,
            sn.create_ms,
            sn.vmm_create_ms,
            sn.state_bytes as f64 / 1024.0,
            mib(sn.memory_bytes),
            mib(sn.memory_allocated_bytes),
            c.working_set_read_pages,
            c.working_set_written_pages,
            mib((c.working_set_read_pages + c.working_set_written_pages) * 4096),
        ));
        s.push_str(&format!(
            "{:<40} {:>10} {:>10} {:>10}\n",
            "", "p50", "p90", "p99"
        ));
        let mut row = |name: &str, p: &Pct, prec: usize| {
            s.push_str(&format!(
                "{name:<40} {:>10.prec$} {:>10.prec$} {:>10.prec$}\n",
                p.p50, p.p90, p.p99
            ));
        };
        row(
            "cold boot: VMM start -> vCPUs ms",
            &c.cold_boot.vcpus_running_ms,
            2,
        );
        row(
            "cold boot: VMM start -> answer ms",
            &c.cold_boot.answer_ms,
            1,
        );
        row(
            "restore: VMM start -> vCPUs ms",
            &c.restore.vcpus_running_ms,
            2,
        );
        row("restore: VMM start -> answer ms", &c.restore.answer_ms, 1);
        row(
            "prefetch: VMM start -> vCPUs ms",
            &c.restore_prefetch.vcpus_running_ms,
            2,
        );
        row(
            "prefetch: VMM start -> answer ms",
            &c.restore_prefetch.answer_ms,
            1,
        );
        row("restore: minor faults", &c.restore.minor_faults, 0);
        row("restore: major faults", &c.restore.major_faults, 0);
        row(
            "prefetch: minor faults",
            &c.restore_prefetch.minor_faults,
            0,
        );
        row(
            "prefetch: major faults",
            &c.restore_prefetch.major_faults,
            0,
        );
        row(
            "cold boot: VMM overhead MiB",
            &c.cold_boot.vmm_overhead_mib,
            2,
        );
        row("restore: VMM overhead MiB", &c.restore.vmm_overhead_mib, 2);
        row(
            "prefetch: VMM overhead MiB",
            &c.restore_prefetch.vmm_overhead_mib,
            2,
        );
    }
    s.push_str(&format!(
        "\n{:>5} {:>5} {:>10} {:>12} {:>12} {:>12} {:>10} {:>10} {:>8} {:>8} {:>9}\n",
        "MiB",
        "vCPUs",
        "create ms",
        "boot ms",
        "restore ms",
        "prefetch ms",
        "boot/rst",
        "boot/pref",
        "faults",
        "prefetch",
        "fault cut"
    ));
    for c in &r.configs {
        s.push_str(&format!(
            "{:>5} {:>5} {:>10.1} {:>12.1} {:>12.1} {:>12.1} {:>9.1}x {:>9.1}x {:>8.0} {:>8.0} {:>8.0}%\n",
            c.mem_mib,
            c.vcpus,
            c.snapshot.create_ms,
            c.cold_boot.answer_ms.p50,
            c.restore.answer_ms.p50,
            c.restore_prefetch.answer_ms.p50,
            c.boot_over_restore,
            c.boot_over_restore_prefetch,
            c.restore.minor_faults.p50 + c.restore.major_faults.p50,
            c.restore_prefetch.minor_faults.p50 + c.restore_prefetch.major_faults.p50,
            c.prefetch_fault_reduction_pct,
        ));
    }
    s.push_str(
        "(p50s; boot/restore ms: VMM start -> first answer; faults: VMM page faults from vCPU \
         start to the answer)\n",
    );
    s
}

/// `kindling bench snapshot`.
pub fn run_cli(cli: SnapshotCli) -> ExitCode {
    let quiet = cli.json;
    let result = run(&cli, &|p| {
        if !quiet {
            eprintln!("kindling bench snapshot: {p}");
        }
    });
    match result {
        Ok(r) if cli.json => match serde_json::to_string_pretty(&r) {
            Ok(t) => {
                println!("{t}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("kindling bench snapshot: {e}");
                ExitCode::FAILURE
            }
        },
        Ok(r) => {
            print!("{}", render(&r));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kindling bench snapshot: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let p = pct((1..=100).map(f64::from));
        assert_eq!((p.p50, p.p90, p.p99), (50.0, 90.0, 99.0));
        let one = pct([7.0].into_iter());
        assert_eq!((one.p50, one.p90, one.p99), (7.0, 7.0, 7.0));
        let none = pct(std::iter::empty());
        assert_eq!(none.p50, 0.0);
    }
}
