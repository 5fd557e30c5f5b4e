//! `kindling bench boot`: boots the guest kernel N times with a boot-only init and reports
//! VMM start -> boot timer (wall and VMM CPU time), the VMM's own setup time, and the VMM's
//! memory overhead (RSS minus resident guest memory). Says loudly when the host's KVM
//! emulates guest kernel code, since such figures are not bare-metal ones.
//!
//! `kindling bench invoke` (module [`invoke`]): warm invoke latency and throughput through
//! Kindling and through `cargo lambda watch`, side by side.
//!
//! `kindling bench snapshot` (module [`snapshot`]): snapshot create and restore (with and
//! without working-set prefetch) against cold boot.

pub mod image;
pub mod invoke;
pub mod load;
pub mod snapshot;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde::Serialize;
use serde_json::Value;

/// Longest one boot may take (an emulating host boots in 10-20 s).
const BOOT_LIMIT: std::time::Duration = std::time::Duration::from_secs(180);

#[derive(Debug, Clone)]
pub struct BootBenchArgs {
    pub runs: usize,
    pub mem_mib: u32,
    pub vcpus: u8,
    /// Default: `kindling-vmm` beside this executable.
    pub vmm: Option<PathBuf>,
    /// Default: the cached (or freshly built) guest kernel of `flavour`.
    pub kernel: Option<PathBuf>,
    pub flavour: rootfs::Flavour,
    /// Default: the static test init, built from the workspace.
    pub init: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BootRun {
    /// VMM process start -> the guest init's boot-timer write.
    pub boot_wall_ms: f64,
    /// CPU time of the VMM process (vCPU threads included) by then.
    pub boot_vmm_cpu_ms: f64,
    /// VMM process start -> vCPUs started (the VMM's own setup).
    pub vmm_setup_ms: f64,
    /// RSS minus resident guest memory, at exit.
    pub vmm_overhead_mib: f64,
    /// Wall time of the whole VMM process (spawn to exit).
    pub process_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Stat {
    pub min: f64,
    pub p50: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BootReport {
    pub host_kvm: Value,
    pub kernel: PathBuf,
    pub mem_mib: u32,
    pub vcpus: u8,
    pub runs: Vec<BootRun>,
    pub boot_wall_ms: Stat,
    pub boot_vmm_cpu_ms: Stat,
    pub vmm_setup_ms: Stat,
    pub vmm_overhead_mib: Stat,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("guest kernel: {0}")]
    Kernel(#[from] rootfs::KernelError),
    #[error("test init: {0}")]
    Init(#[from] rootfs::static_bin::StaticBuildError),
    #[error("{0}")]
    Io(String),
    #[error("run {run}: {msg}")]
    Run { run: usize, msg: String },
}

fn stat(values: impl Iterator<Item = f64>) -> Stat {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(|a, b| a.total_cmp(b));
    let pick = |q: f64| {
        v.get(((v.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Stat {
        min: pick(0.0),
        p50: pick(0.5),
        max: pick(1.0),
    }
}

/// `kindling-vmm`: the one given on the command line, else the one beside this executable.
pub(crate) fn vmm_binary(explicit: Option<&PathBuf>) -> Result<PathBuf, String> {
    explicit
        .cloned()
        .or_else(|| crate::sibling_binary("kindling-vmm"))
        .ok_or_else(|| {
            "kindling-vmm not found beside kindling: build the workspace or pass --vmm".into()
        })
}

/// Reads a child agent's stdout on a thread of its own (so a hung agent cannot hang a
/// benchmark past its limit): the receiver gets the address once the agent prints
/// `kindling: listening on ADDR`, and the rest is drained so the agent never blocks on a
/// full pipe.
pub(crate) fn listen_url(stdout: std::process::ChildStdout) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(|l| l.ok())
        {
            if !sent {
                if let Some(u) = line.strip_prefix("kindling: listening on ") {
                    let _ = tx.send(u.trim().to_string());
                    sent = true;
                }
            }
        }
    });
    rx
}

/// Runs the boot benchmark; `progress` is told after each run.
pub fn boot(
    args: &BootBenchArgs,
    mut progress: impl FnMut(usize),
) -> Result<BootReport, BenchError> {
    let vmm = vmm_binary(args.vmm.as_ref()).map_err(BenchError::Io)?;
    let kernel = match &args.kernel {
        Some(k) => k.clone(),
        None => rootfs::ensure_kernel(rootfs::KernelOptions {
            flavour: args.flavour,
            ..Default::default()
        })?,
    };
    let init = match &args.init {
        Some(i) => i.clone(),
        None => rootfs::build_test_init()?,
    };
    let dir = tempfile::tempdir().map_err(|e| BenchError::Io(format!("temp dir: {e}")))?;
    let initrd = dir.path().join("boot-only.cpio");
    rootfs::test_initramfs(&init, &initrd)
        .map_err(|e| BenchError::Io(format!("initramfs: {e}")))?;

    let mut runs = Vec::new();
    let mut host_kvm = Value::Null;
    for run in 0..args.runs {
        let (r, host) = boot_once(&vmm, &kernel, &initrd, args, dir.path(), run)?;
        host_kvm = host;
        runs.push(r);
        progress(run + 1);
    }
    Ok(BootReport {
        host_kvm,
        kernel,
        mem_mib: args.mem_mib,
        vcpus: args.vcpus,
        boot_wall_ms: stat(runs.iter().map(|r| r.boot_wall_ms)),
        boot_vmm_cpu_ms: stat(runs.iter().map(|r| r.boot_vmm_cpu_ms)),
        vmm_setup_ms: stat(runs.iter().map(|r| r.vmm_setup_ms)),
        vmm_overhead_mib: stat(runs.iter().map(|r| r.vmm_overhead_mib)),
        runs,
    })
}

fn boot_once(
    vmm: &Path,
    kernel: &Path,
    initrd: &Path,
    args: &BootBenchArgs,
    dir: &Path,
    run: usize,
) -> Result<(BootRun, Value), BenchError> {
    let err = |msg: String| BenchError::Run { run, msg };
    let cfg_path = dir.join("vm.json");
    let metrics_path = dir.join(format!("metrics-{run}.json"));
    let cfg = serde_json::json!({
        "kernel": kernel,
        "initrd": initrd,
        "cmdline": "reboot=k panic=1 nomodule 8250.nr_uarts=0 i8042.noaux i8042.nomux i8042.dumbkbd \
                    swiotlb=noforce kindling.test=boot-only",
        "vcpus": args.vcpus,
        "mem_mib": args.mem_mib,
    });
    std::fs::write(&cfg_path, cfg.to_string()).map_err(|e| err(e.to_string()))?;
    let start = Instant::now();
    let mut child = Command::new(vmm)
        .arg("--config")
        .arg(&cfg_path)
        .arg("--metrics-file")
        .arg(&metrics_path)
        .env("KINDLING_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(format!("spawning {}: {e}", vmm.display())))?;
    // A guest that never powers off must not hang the benchmark.
    while child.try_wait().map_err(|e| err(e.to_string()))?.is_none() {
        if start.elapsed() > BOOT_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(err(format!(
                "the guest did not power off within {BOOT_LIMIT:?}"
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let out = child.wait_with_output().map_err(|e| err(e.to_string()))?;
    let process = start.elapsed();
    if !out.status.success() {
        return Err(err(format!(
            "kindling-vmm exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let m: Value = std::fs::read(&metrics_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| err("no metrics written".into()))?;
    let us = |v: &Value| v.as_u64().map(|n| n as f64 / 1e3);
    let boot_wall = us(&m["boot"]["wall_us"])
        .ok_or_else(|| err("the guest never wrote the boot timer".into()))?;
    Ok((
        BootRun {
            boot_wall_ms: boot_wall,
            boot_vmm_cpu_ms: us(&m["boot"]["vmm_cpu_us"]).unwrap_or(0.0),
            vmm_setup_ms: us(&m["vcpus_started_us"]).unwrap_or(0.0),
            vmm_overhead_mib: m["memory"]["vmm_overhead_bytes"].as_u64().unwrap_or(0) as f64
                / 1048576.0,
            process_ms: process.as_secs_f64() * 1e3,
        },
        m["host_kvm"].clone(),
    ))
}

/// The report as a table.
pub fn render(r: &BootReport) -> String {
    let mut s = String::new();
    let kind = r.host_kvm["kind"].as_str().unwrap_or("unknown");
    if kind == "emulated" {
        s.push_str(&format!(
            "NOTE: this host's KVM EMULATES guest kernel code (~{:.0} ns per ring-0 instruction): \
             these are not bare-metal figures.\n",
            r.host_kvm["ring0_ns_per_instruction"]
                .as_f64()
                .unwrap_or(0.0)
        ));
    }
    s.push_str(&format!(
        "boot benchmark: {} runs, {} vCPU(s), {} MiB, host KVM: {kind}\nkernel: {}\n\n",
        r.runs.len(),
        r.vcpus,
        r.mem_mib,
        r.kernel.display()
    ));
    s.push_str(&format!(
        "{:>4} {:>14} {:>14} {:>12} {:>14}\n",
        "run", "boot wall ms", "VMM CPU ms", "setup ms", "overhead MiB"
    ));
    for (i, run) in r.runs.iter().enumerate() {
        s.push_str(&format!(
            "{:>4} {:>14.1} {:>14.1} {:>12.2} {:>14.2}\n",
            i + 1,
            run.boot_wall_ms,
            run.boot_vmm_cpu_ms,
            run.vmm_setup_ms,
            run.vmm_overhead_mib
        ));
    }
    for (name, st) in [
        ("boot wall ms", &r.boot_wall_ms),
        ("VMM CPU ms", &r.boot_vmm_cpu_ms),
        ("setup ms", &r.vmm_setup_ms),
        ("overhead MiB", &r.vmm_overhead_mib),
    ] {
        s.push_str(&format!(
            "{name:>14}: min {:.2}  p50 {:.2}  max {:.2}\n",
            st.min, st.p50, st.max
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_pick_min_median_max() {
        let s = stat([5.0, 1.0, 3.0, 2.0, 4.0].into_iter());
        assert_eq!((s.min, s.p50, s.max), (1.0, 3.0, 5.0));
        let one = stat([7.0].into_iter());
        assert_eq!((one.min, one.p50, one.max), (7.0, 7.0, 7.0));
    }
}
