//! The VMM's main-thread side: the stop signal from vCPUs and devices, the control socket, and
//! metrics. Everything here runs on the event loop (event-manager), never on a vCPU thread.
//!
//! Control socket protocol: newline-delimited JSON over a Unix stream socket. Each request is
//! one line `{"action": "start" | "shutdown" | "metrics" | "status" | "pause" | "resume" |
//! "snapshot" | "fetched_chunks" | "working_set"}`; each answer one line, `{"ok": true, ...}` or
//! `{"ok": false, "error": "..."}`.
//! Lines are capped at 64 KiB and at most 16 connections are served at once.
//!
//! `snapshot` takes `"state_path"`, `"mem_path"` and `"kind"` (`"full"`, the default, or
//! `"diff"`, which needs `track_dirty_pages` in the VM config) and needs a paused VM. It runs
//! on the event loop, so no device works while it is taken: device state and guest memory
//! are one consistent point in time. Devices keep serving host events while the VM is paused
//! (their writes to guest memory are tracked and go into the next diff).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde_json::{json, Value};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::EventFd;

use kvm_ioctls::VmFd;

use crate::config::VmConfig;
use crate::devices::legacy::{BootTimerReading, SerialDevice, I8042};
use crate::devices::lock;
use crate::devices::virtio::MmioTransport;
use crate::host::HostKvm;
use crate::memory::GuestMemoryMmap;
use crate::snapshot::persist::{DevicesState, Persist};
use crate::snapshot::{self, Snapshot, SnapshotKind};
use crate::vcpu::{Vcpu, VcpuCommand, VcpuCounters, VcpuHandle, VcpuResponse, VcpuStop};

const MAX_LINE: usize = 64 * 1024;
const MAX_CONNECTIONS: usize = 16;

/// How the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest reset through the i8042 (Linux `reboot=k`), or shut down.
    GuestStopped(String),
    /// Stopped on request (control socket).
    Shutdown,
    /// KVM or the VMM failed.
    Failed(String),
}

impl Outcome {
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::GuestStopped(_) | Outcome::Shutdown => 0,
            Outcome::Failed(_) => 1,
        }
    }
}

/// What metrics are read from.
pub struct MetricsSources {
    pub start: Instant,
    pub boot: Arc<Mutex<Option<BootTimerReading>>>,
    pub counters: Vec<Arc<VcpuCounters>>,
    pub mem: GuestMemoryMmap,
    pub host: HostKvm,
}

/// How long a vCPU may take to answer a pause, resume or save.
const VCPU_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// What taking a snapshot reads from.
pub struct SnapshotSources {
    pub vm: Arc<VmFd>,
    pub mem: GuestMemoryMmap,
    pub config: VmConfig,
    pub cmdline: String,
    pub track_dirty: bool,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub virtio: Vec<Arc<Mutex<MmioTransport>>>,
}

struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
}

pub struct Controller {
    stop_evt: EventFd,
    stops: Receiver<(u8, VcpuStop)>,
    listener: Option<UnixListener>,
    conns: HashMap<RawFd, Conn>,
    /// vCPUs not yet started, and how to start them.
    pending: Option<Box<dyn FnOnce() -> Vec<VcpuHandle> + Send>>,
    vcpus: Vec<VcpuHandle>,
    paused: bool,
    /// When the vCPUs were started, from VMM start.
    started: Option<std::time::Duration>,
    metrics: MetricsSources,
    snapshot: Option<SnapshotSources>,
    /// Set by a restore: where from and how long its steps took (for metrics).
    pub restore_info: Option<Value>,
    /// Set by a restore with `--prefetch`: what was loaded (for metrics).
    pub prefetch_info: Option<Value>,
    /// The process's (minor, major) page faults when the vCPUs started.
    faults_at_start: Option<(u64, u64)>,
    pub outcome: Option<Outcome>,
}

impl Controller {
    pub fn new(
        stop_evt: EventFd,
        stops: Receiver<(u8, VcpuStop)>,
        listener: Option<UnixListener>,
        metrics: MetricsSources,
    ) -> Self {
        Controller {
            stop_evt,
            stops,
            listener,
            conns: HashMap::new(),
            pending: None,
            vcpus: Vec::new(),
            paused: false,
            started: None,
            metrics,
            snapshot: None,
            restore_info: None,
            prefetch_info: None,
            faults_at_start: None,
            outcome: None,
        }
    }

    /// Enables the `snapshot` action.
    pub fn set_snapshot_sources(&mut self, sources: SnapshotSources) {
        self.snapshot = Some(sources);
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    fn ask_all(&self, cmd: VcpuCommand) -> Result<Vec<VcpuResponse>, String> {
        self.vcpus
            .iter()
            .map(|v| v.request(cmd, VCPU_ANSWER_TIMEOUT))
            .collect()
    }

    /// Pauses every vCPU (they finish their current exit and block).
    pub fn pause(&mut self) -> Result<(), String> {
        if self.pending.is_some() {
            return Err("the VM is not started".into());
        }
        if self.paused {
            return Ok(());
        }
        let r = self.ask_all(VcpuCommand::Pause);
        // Even on a partial failure some vCPUs are paused: count the VM as paused so that
        // `resume` releases them.
        self.paused = true;
        r?;
        tracing::info!("VM paused");
        Ok(())
    }

    pub fn resume(&mut self) -> Result<(), String> {
        if !self.paused {
            return Err("the VM is not paused".into());
        }
        self.ask_all(VcpuCommand::Resume)?;
        self.paused = false;
        tracing::info!("VM resumed");
        Ok(())
    }

    /// Writes a snapshot of the paused VM.
    pub fn snapshot(
        &mut self,
        state_path: &std::path::Path,
        mem_path: &std::path::Path,
        kind: SnapshotKind,
    ) -> Result<Value, String> {
        let t0 = Instant::now();
        if !self.paused {
            return Err(
                "the VM must be paused for a snapshot (send {\"action\":\"pause\"} first)".into(),
            );
        }
        let Some(src) = &self.snapshot else {
            return Err("snapshots are not available for this VM".into());
        };
        if kind == SnapshotKind::Diff && !src.track_dirty {
            return Err("a diff snapshot needs dirty page tracking (\"track_dirty_pages\": true in the VM config)".into());
        }
        crate::vm::check_snapshot_caps(&src.vm).map_err(|e| e.to_string())?;
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for r in self.ask_all(VcpuCommand::Save)? {
            match r {
                VcpuResponse::State(s) => vcpus.push((*s)?),
                other => return Err(format!("unexpected vCPU answer {other:?}")),
            }
        }
        let vm = crate::vm::save_state(&src.vm).map_err(|e| e.to_string())?;
        let devices = DevicesState {
            serial: lock(&src.serial).save(),
            i8042: lock(&src.i8042).save(),
            virtio: src.virtio.iter().map(|t| lock(t).save()).collect(),
        };
        // Dirty pages since the last snapshot (or boot/restore): KVM's log of guest writes
        // plus the VMM's own writes. Read (and so reset) for full snapshots too, so that the
        // next diff is relative to this snapshot.
        let dirty = if src.track_dirty {
            let mut d = crate::vm::take_kvm_dirty(&src.vm, &src.mem).map_err(|e| e.to_string())?;
            let own = snapshot::memory::take_vmm_dirty(&src.mem);
            for (k, v) in d.iter_mut().zip(own) {
                for (a, b) in k.iter_mut().zip(v) {
                    *a |= b;
                }
            }
            Some(d)
        } else {
            None
        };
        let dirty_pages = dirty.as_deref().map(snapshot::memory::count_pages);
        let layout = snapshot::memory::layout_of(
            &src.mem,
            if kind == SnapshotKind::Diff {
                dirty
            } else {
                None
            },
        );
        let snap = Snapshot {
            kind,
            config: src.config.clone(),
            cmdline: src.cmdline.clone(),
            vm,
            vcpus,
            devices,
            memory: layout,
        };
        snapshot::memory::write_memory(&src.mem, &snap.memory, mem_path)
            .map_err(|e| e.to_string())?;
        snapshot::write_state(state_path, &snap).map_err(|e| e.to_string())?;
        let took = t0.elapsed();
        tracing::info!(
            ?kind,
            ?dirty_pages,
            "snapshot written in {:.1} ms",
            took.as_secs_f64() * 1e3
        );
        Ok(json!({
            "ok": true,
            "kind": kind,
            "dirty_pages": dirty_pages,
            "took_us": took.as_micros() as u64,
        }))
    }

    fn handle_snapshot(&mut self, req: &Value) -> Value {
        let path = |k: &str| req.get(k).and_then(Value::as_str).map(PathBuf::from);
        let (Some(state), Some(mem)) = (path("state_path"), path("mem_path")) else {
            return json!({"ok": false, "error": "snapshot needs \"state_path\" and \"mem_path\""});
        };
        let kind = match req
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("full")
            .parse()
        {
            Ok(k) => k,
            Err(e) => return json!({"ok": false, "error": e}),
        };
        match self.snapshot(&state, &mem, kind) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!("snapshot failed: {e}");
                json!({"ok": false, "error": e})
            }
        }
    }

    /// Hands over the vCPUs; they start at [`Controller::start`] or the `start` action.
    pub fn set_vcpus(
        &mut self,
        vcpus: Vec<Vcpu>,
        stops: std::sync::mpsc::Sender<(u8, VcpuStop)>,
        wake: EventFd,
    ) {
        self.pending = Some(Box::new(move || {
            vcpus
                .into_iter()
                .filter_map(|v| {
                    let (tx, wake) = (stops.clone(), wake.try_clone().ok()?);
                    let id = v.id;
                    v.spawn(tx, wake)
                        .map_err(|e| {
                            tracing::error!(vcpu = id, "cannot start the vCPU thread: {e}")
                        })
                        .ok()
                })
                .collect()
        }));
    }

    /// Starts the vCPUs (once).
    pub fn start(&mut self) -> bool {
        match self.pending.take() {
            Some(f) => {
                self.faults_at_start = Some(snapshot::prefetch::page_faults(false));
                self.vcpus = f();
                self.started = Some(self.metrics.start.elapsed());
                tracing::info!(
                    vcpus = self.vcpus.len(),
                    "VM started {:.1} ms after VMM start",
                    self.metrics.start.elapsed().as_secs_f64() * 1e3
                );
                true
            }
            None => false,
        }
    }

    fn on_stop_event(&mut self) {
        let _ = self.stop_evt.read();
        let mut failure = None;
        let mut shutdown = None;
        while let Ok((id, stop)) = self.stops.try_recv() {
            match stop {
                VcpuStop::Failed(m) => failure = Some(format!("vCPU {id}: {m}")),
                VcpuStop::GuestShutdown(m) => shutdown = Some(m),
            }
        }
        if self.outcome.is_some() {
            return;
        }
        self.outcome = Some(match (failure, shutdown) {
            (Some(f), _) => Outcome::Failed(f),
            (None, Some(s)) => Outcome::GuestStopped(s),
            (None, None) => Outcome::GuestStopped("reset through the i8042".into()),
        });
    }

    fn accept(&mut self, ops: &mut EventOps) {
        let Some(listener) = &self.listener else {
            return;
        };
        match listener.accept() {
            Ok((stream, _)) => {
                if self.conns.len() >= MAX_CONNECTIONS {
                    let mut s = stream;
                    let _ = s.write_all(b"{\"ok\":false,\"error\":\"too many connections\"}\n");
                    return;
                }
                let _ = stream.set_nonblocking(true);
                let fd = stream.as_raw_fd();
                if ops
                    .add(Events::new(&stream, EventSet::IN | EventSet::READ_HANG_UP))
                    .is_ok()
                {
                    self.conns.insert(
                        fd,
                        Conn {
                            stream,
                            buf: Vec::new(),
                        },
                    );
                }
            }
            Err(e) => tracing::warn!("control socket accept: {e}"),
        }
    }

    fn on_conn(&mut self, fd: RawFd, set: EventSet, ops: &mut EventOps) {
        let mut close = set.contains(EventSet::READ_HANG_UP) || set.contains(EventSet::ERROR);
        let mut requests = Vec::new();
        if let Some(conn) = self.conns.get_mut(&fd) {
            let mut chunk = [0u8; 4096];
            loop {
                match conn.stream.read(&mut chunk) {
                    Ok(0) => {
                        close = true;
                        break;
                    }
                    Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        close = true;
                        break;
                    }
                }
                if conn.buf.len() > MAX_LINE {
                    break;
                }
            }
            while let Some(pos) = conn.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = conn.buf.drain(..=pos).collect();
                requests.push(line);
            }
            if conn.buf.len() > MAX_LINE {
                let _ = conn
                    .stream
                    .write_all(b"{\"ok\":false,\"error\":\"request line too long\"}\n");
                close = true;
            }
        }
        for line in requests {
            let answer = self.handle(&line);
            if let Some(conn) = self.conns.get_mut(&fd) {
                let mut out = answer.to_string().into_bytes();
                out.push(b'\n');
                // Answers are small; a client that does not read them loses its connection.
                let _ = conn.stream.set_nonblocking(false);
                let _ = conn
                    .stream
                    .set_write_timeout(Some(std::time::Duration::from_secs(1)));
                if conn.stream.write_all(&out).is_err() {
                    close = true;
                }
                let _ = conn.stream.set_nonblocking(true);
            }
        }
        if close {
            if let Some(conn) = self.conns.remove(&fd) {
                let _ = ops.remove(Events::new(
                    &conn.stream,
                    EventSet::IN | EventSet::READ_HANG_UP,
                ));
            }
        }
    }

    /// Answers one request line.
    pub fn handle(&mut self, line: &[u8]) -> Value {
        let req: Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => return json!({"ok": false, "error": format!("invalid JSON: {e}")}),
        };
        match req.get("action").and_then(Value::as_str) {
            Some("start") => {
                if self.start() {
                    json!({"ok": true})
                } else {
                    json!({"ok": false, "error": "the VM is already started"})
                }
            }
            Some("shutdown") => {
                if self.outcome.is_none() {
                    self.outcome = Some(Outcome::Shutdown);
                }
                json!({"ok": true})
            }
            Some("metrics") => json!({"ok": true, "metrics": self.metrics()}),
            Some("status") => json!({
                "ok": true,
                "state": if self.pending.is_some() {
                    "not started"
                } else if self.paused {
                    "paused"
                } else {
                    "running"
                },
            }),
            Some("pause") => match self.pause() {
                Ok(()) => json!({"ok": true}),
                Err(e) => json!({"ok": false, "error": e}),
            },
            Some("resume") => match self.resume() {
                Ok(()) => json!({"ok": true}),
                Err(e) => json!({"ok": false, "error": e}),
            },
            Some("snapshot") => self.handle_snapshot(&req),
            // The guest pages touched since the restore, for `--prefetch` (snapshot/prefetch.rs).
            Some("working_set") => {
                let Some(path) = req.get("path").and_then(Value::as_str) else {
                    return json!({"ok": false, "error": "working_set needs \"path\""});
                };
                match snapshot::prefetch::record(&self.metrics.mem)
                    .and_then(|ws| ws.write(std::path::Path::new(path)).map(|()| ws))
                {
                    Ok(ws) => json!({
                        "ok": true,
                        "read_pages": ws.read_pages(),
                        "written_pages": ws.written_pages(),
                    }),
                    Err(e) => json!({"ok": false, "error": e.to_string()}),
                }
            }
            // Each chunked disk's chunks in first-fetch order (the agent's prefetch list).
            Some("fetched_chunks") => {
                let disks: Vec<Value> =
                    crate::devices::virtio::block::chunked::fetched_chunks_by_disk()
                        .into_iter()
                        .map(|(path, chunks)| json!({"manifest": path, "chunks": chunks}))
                        .collect();
                json!({"ok": true, "disks": disks})
            }
            Some(other) => json!({"ok": false, "error": format!("unknown action {other:?}")}),
            None => json!({"ok": false, "error": "missing \"action\""}),
        }
    }

    pub fn metrics(&self) -> Value {
        let m = &self.metrics;
        let boot = crate::devices::lock(&m.boot).map(|r| {
            json!({
                "wall_us": r.wall.as_micros() as u64,
                "vmm_cpu_us": r.vmm_cpu.as_micros() as u64,
            })
        });
        let exits: Vec<Value> = m
            .counters
            .iter()
            .map(|c| {
                json!({
                    "exits": c.exits.load(Ordering::Relaxed),
                    "io": c.io.load(Ordering::Relaxed),
                    "mmio": c.mmio.load(Ordering::Relaxed),
                })
            })
            .collect();
        let guest_size: u64 = m.mem.iter().map(|r| r.len()).sum();
        let rss = process_rss_bytes();
        let guest_resident = guest_resident_bytes(&m.mem);
        let (minor, major) = snapshot::prefetch::page_faults(false);
        let since_start = self
            .faults_at_start
            .map(|(m0, j0)| json!({"minor": minor.saturating_sub(m0), "major": major.saturating_sub(j0)}));
        json!({
            "uptime_us": m.start.elapsed().as_micros() as u64,
            "vcpus_started_us": self.started.map(|d| d.as_micros() as u64),
            "paused": self.paused,
            "restore": self.restore_info,
            "prefetch": self.prefetch_info,
            "page_faults": {
                "minor": minor,
                "major": major,
                "since_vcpus_started": since_start,
            },
            "boot": boot,
            "vcpus": exits,
            "memory": {
                "guest_size_bytes": guest_size,
                "rss_bytes": rss,
                "guest_resident_bytes": guest_resident,
                "vmm_overhead_bytes": rss.saturating_sub(guest_resident),
            },
            "host_kvm": m.host,
        })
    }
}

/// Resident set size of this process.
pub fn process_rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * page_size()
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// Bytes of guest memory mapped in this process: pagemap's present bits, else mincore over
/// each region (mincore counts a restored VM's page-cache pages it never touched; see
/// `snapshot::prefetch`).
pub fn guest_resident_bytes(mem: &GuestMemoryMmap) -> u64 {
    if let Some(b) = snapshot::prefetch::resident_bytes(mem) {
        return b;
    }
    let page = page_size();
    let mut total = 0;
    for region in mem.iter() {
        let Ok(ptr) = region.get_host_address(MemoryRegionAddress(0)) else {
            continue;
        };
        let len = region.len();
        let pages = len.div_ceil(page) as usize;
        let mut vec = vec![0u8; pages];
        // SAFETY: `ptr..ptr+len` is the region's own live mapping and `vec` has one byte per
        // page of it, as mincore requires.
        let rc = unsafe { libc::mincore(ptr.cast(), len as usize, vec.as_mut_ptr()) };
        if rc == 0 {
            total += vec.iter().filter(|b| **b & 1 == 1).count() as u64 * page;
        }
    }
    total
}

impl MutEventSubscriber for Controller {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.stop_evt, EventSet::IN)) {
            tracing::error!("cannot watch the stop event: {e:?}");
        }
        if let Some(l) = &self.listener {
            let _ = l.set_nonblocking(true);
            if let Err(e) = ops.add(Events::new(l, EventSet::IN)) {
                tracing::error!("cannot watch the control socket: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.stop_evt.as_raw_fd() {
            self.on_stop_event();
        } else if self.listener.as_ref().is_some_and(|l| l.as_raw_fd() == fd) {
            self.accept(ops);
        } else if self.conns.contains_key(&fd) {
            self.on_conn(fd, events.event_set(), ops);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::KvmKind;
    use crate::memory::GuestAddress;

    fn controller() -> Controller {
        let (_tx, rx) = std::sync::mpsc::channel();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        Controller::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            rx,
            None,
            MetricsSources {
                start: Instant::now(),
                boot: Arc::new(Mutex::new(None)),
                counters: vec![Arc::new(VcpuCounters::default())],
                mem,
                host: HostKvm {
                    kind: KvmKind::Hardware,
                    ring0_ns_per_instruction: 1.0,
                    pvm_module: false,
                    tsc_khz: None,
                },
            },
        )
    }

    #[test]
    fn requests_and_bad_input() {
        let mut c = controller();
        assert_eq!(c.handle(b"not json")["ok"], false);
        assert_eq!(c.handle(b"{}")["ok"], false);
        assert_eq!(c.handle(br#"{"action":"fly"}"#)["ok"], false);
        let m = c.handle(br#"{"action":"metrics"}"#);
        assert_eq!(m["ok"], true);
        assert_eq!(m["metrics"]["memory"]["guest_size_bytes"], 1 << 20);
        assert!(m["metrics"]["boot"].is_null());
        assert_eq!(
            c.handle(br#"{"action":"start"}"#)["ok"],
            false,
            "no vCPUs handed over"
        );
        assert_eq!(c.handle(br#"{"action":"shutdown"}"#)["ok"], true);
        assert_eq!(c.outcome, Some(Outcome::Shutdown));
    }

    #[test]
    fn guest_memory_residency_is_counted() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 12)]).unwrap();
        let before = guest_resident_bytes(&mem);
        use crate::memory::Bytes;
        for i in 0..8u64 {
            mem.write_obj(1u8, GuestAddress(i * 4096)).unwrap();
        }
        assert_eq!(guest_resident_bytes(&mem) - before, 8 * 4096);
    }
}
