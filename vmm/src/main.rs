//! `kindling-vmm`: runs one microVM described by a JSON config.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use vmm::config::{SerialConfig, VmConfig};
use vmm::snapshot::Snapshot;

const USAGE: &str = "usage:
  kindling-vmm --config FILE|- [OPTIONS]
  kindling-vmm --restore STATE --mem FILE [RESTORE OVERRIDES] [OPTIONS]
  kindling-vmm snapshot merge --base MEM --diff MEM --diff-state STATE

  --config FILE   the VM configuration (JSON); - reads it from stdin
  --restore STATE restore the snapshot state file STATE, guest memory mapped (MAP_PRIVATE)
                  from --mem FILE; a diff snapshot's memory must be merged onto its base first
Options:
  --api-sock PATH serve the control socket there (JSON lines: start, shutdown, metrics, status,
                  pause, resume, snapshot, working_set, fetched_chunks)
  --no-start      build the VM but wait for {\"action\":\"start\"} on the control socket
  --metrics-file PATH  write the final metrics (JSON) there when the VM ends
Restore overrides (to place a clone elsewhere):
  --vsock-uds PATH       the vsock device's host socket
  --serial none|stdout|PATH   where the serial console goes
  --block-path PATH      the block devices' files, in configuration order (repeat for each)
  --track-dirty-pages    track dirty pages from the restore on (for diff snapshots)
  --prefetch FILE        load the working set in FILE (written by the control action
                         {\"action\":\"working_set\",\"path\":FILE} of an earlier restore)
                         into guest memory before the vCPUs start
Merge: copies the diff snapshot's pages onto the base memory file in place.

Logs go to stderr (KINDLING_LOG sets the level). Exit status: 0 when the guest powered off or
reset, or on a shutdown request; 1 when the VM failed; 2 on bad usage, configuration or
snapshot files.";

#[derive(Default)]
struct Args {
    config: Option<String>,
    restore: Option<PathBuf>,
    mem: Option<PathBuf>,
    api_sock: Option<PathBuf>,
    no_start: bool,
    metrics_file: Option<PathBuf>,
    vsock_uds: Option<PathBuf>,
    serial: Option<SerialConfig>,
    block_paths: Vec<PathBuf>,
    track_dirty: bool,
    prefetch: Option<PathBuf>,
}

fn parse_args(argv: &[String]) -> Result<Args, String> {
    let mut args = argv.iter().cloned();
    let mut a = Args::default();
    let value = |args: &mut dyn Iterator<Item = String>, name: &str| {
        args.next().ok_or(format!("{name} needs a value"))
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" => a.config = Some(value(&mut args, "--config")?),
            "--restore" => a.restore = Some(value(&mut args, "--restore")?.into()),
            "--mem" => a.mem = Some(value(&mut args, "--mem")?.into()),
            "--api-sock" => a.api_sock = Some(value(&mut args, "--api-sock")?.into()),
            "--no-start" => a.no_start = true,
            "--metrics-file" => a.metrics_file = Some(value(&mut args, "--metrics-file")?.into()),
            "--vsock-uds" => a.vsock_uds = Some(value(&mut args, "--vsock-uds")?.into()),
            "--serial" => {
                a.serial = Some(match value(&mut args, "--serial")?.as_str() {
                    "none" => SerialConfig::None,
                    "stdout" => SerialConfig::Stdout,
                    p => SerialConfig::File(p.into()),
                })
            }
            "--block-path" => a.block_paths.push(value(&mut args, "--block-path")?.into()),
            "--track-dirty-pages" => a.track_dirty = true,
            "--prefetch" => a.prefetch = Some(value(&mut args, "--prefetch")?.into()),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    match (&a.config, &a.restore) {
        (None, None) => return Err("--config or --restore is required".into()),
        (Some(_), Some(_)) => return Err("--config and --restore exclude each other".into()),
        (None, Some(_)) if a.mem.is_none() => return Err("--restore needs --mem".into()),
        (Some(_), None)
            if a.mem.is_some()
                || a.vsock_uds.is_some()
                || a.serial.is_some()
                || !a.block_paths.is_empty()
                || a.track_dirty
                || a.prefetch.is_some() =>
        {
            return Err("--mem and the restore overrides go with --restore".into())
        }
        _ => {}
    }
    if a.no_start && a.api_sock.is_none() {
        return Err("--no-start needs --api-sock".into());
    }
    Ok(a)
}

/// `kindling-vmm snapshot merge --base MEM --diff MEM --diff-state STATE`.
fn merge_main(argv: &[String]) -> ExitCode {
    let mut it = argv.iter();
    let (mut base, mut diff, mut state) = (None, None, None);
    while let Some(a) = it.next() {
        let slot = match a.as_str() {
            "--base" => &mut base,
            "--diff" => &mut diff,
            "--diff-state" => &mut state,
            other => {
                eprintln!("kindling-vmm: unknown argument {other}\n{USAGE}");
                return ExitCode::from(2);
            }
        };
        *slot = it.next().map(PathBuf::from);
    }
    let (Some(base), Some(diff), Some(state)) = (base, diff, state) else {
        eprintln!("kindling-vmm: snapshot merge needs --base, --diff and --diff-state\n{USAGE}");
        return ExitCode::from(2);
    };
    match vmm::snapshot::memory::merge(&base, &diff, &state) {
        Ok(n) => {
            println!("merged {n} pages into {}", base.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kindling-vmm: snapshot merge: {e}");
            ExitCode::from(2)
        }
    }
}

fn read_config(arg: &str) -> Result<VmConfig, String> {
    let text = if arg == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| format!("reading the config from stdin: {e}"))?;
        s
    } else {
        std::fs::read_to_string(arg).map_err(|e| format!("{arg}: {e}"))?
    };
    serde_json::from_str(&text).map_err(|e| format!("invalid config: {e}"))
}

/// Reads a snapshot and applies the overrides to its configuration.
fn read_snapshot(a: &Args, state: &std::path::Path) -> Result<Snapshot, String> {
    let (_, mut snap) = vmm::snapshot::read_state(state).map_err(|e| e.to_string())?;
    let c = &mut snap.config;
    if let Some(p) = &a.vsock_uds {
        match &mut c.vsock {
            Some(v) => v.uds_path = p.clone(),
            None => return Err("--vsock-uds: the snapshot's VM has no vsock device".into()),
        }
    }
    if let Some(s) = &a.serial {
        c.serial = s.clone();
    }
    if !a.block_paths.is_empty() {
        if a.block_paths.len() != c.block.len() {
            return Err(format!(
                "--block-path given {} times; the snapshot's VM has {} block devices",
                a.block_paths.len(),
                c.block.len()
            ));
        }
        for (b, p) in c.block.iter_mut().zip(&a.block_paths) {
            b.path = p.clone();
        }
    }
    if a.track_dirty {
        c.track_dirty_pages = true;
    }
    Ok(snap)
}

fn main() -> ExitCode {
    let start = Instant::now();
    let filter = tracing_subscriber::EnvFilter::try_from_env("KINDLING_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some("snapshot") {
        if argv.get(1).map(String::as_str) == Some("merge") {
            return merge_main(&argv[2..]);
        }
        eprintln!("kindling-vmm: unknown snapshot command\n{USAGE}");
        return ExitCode::from(2);
    }
    let args = match parse_args(&argv) {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("kindling-vmm: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let built = if let Some(state) = &args.restore {
        let t0 = Instant::now();
        let snap = match read_snapshot(&args, state) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("kindling-vmm: cannot restore: {e}");
                return ExitCode::from(2);
            }
        };
        let read_us = t0.elapsed().as_micros() as u64;
        let mem = args.mem.clone().unwrap_or_default();
        let source = vmm::builder::Source::Snapshot {
            snapshot: &snap,
            mem: &mem,
        };
        let t1 = Instant::now();
        let built = vmm::builder::build(source, start, args.api_sock.as_deref());
        if let Ok(v) = &built {
            let info = serde_json::json!({
                "state_path": state,
                "mem_path": mem,
                "kind": snap.kind,
                "read_state_us": read_us,
                "build_us": t1.elapsed().as_micros() as u64,
            });
            tracing::info!(
                "restored in {:.1} ms: {info}",
                start.elapsed().as_secs_f64() * 1e3
            );
            vmm::devices::lock(&v.controller).restore_info = Some(info);
        }
        built
    } else {
        let config = match read_config(args.config.as_deref().unwrap_or("-")) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("kindling-vmm: {e}");
                return ExitCode::from(2);
            }
        };
        vmm::builder::build(
            vmm::builder::Source::Boot(&config),
            start,
            args.api_sock.as_deref(),
        )
    };
    let mut vmm = match built {
        Ok(v) => v,
        Err(
            e @ (vmm::builder::BuildError::Config(_)
            | vmm::builder::BuildError::Snapshot(_)
            | vmm::builder::BuildError::Mismatch(_)),
        ) => {
            eprintln!("kindling-vmm: {e}");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("kindling-vmm: cannot build the VM: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(ws) = &args.prefetch {
        match vmm::snapshot::prefetch::prefetch(&vmm.mem, ws) {
            Ok(r) => {
                vmm::devices::lock(&vmm.controller).prefetch_info = serde_json::to_value(&r).ok();
            }
            Err(e) => {
                eprintln!("kindling-vmm: --prefetch: {e}");
                if let Some(p) = &args.api_sock {
                    let _ = std::fs::remove_file(p);
                }
                return ExitCode::from(2);
            }
        }
    }
    if !args.no_start {
        vmm.start();
    }
    let outcome = vmm.run();
    match &outcome {
        vmm::controller::Outcome::Failed(m) => eprintln!("kindling-vmm: the VM failed: {m}"),
        o => tracing::info!("VM ended: {o:?}"),
    }
    if let Some(p) = &args.metrics_file {
        let mut m = vmm::devices::lock(&vmm.controller).metrics();
        m["outcome"] = serde_json::json!(format!("{outcome:?}"));
        if let Err(e) = std::fs::write(p, m.to_string()) {
            eprintln!("kindling-vmm: writing metrics to {}: {e}", p.display());
        }
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    if let Some(p) = &args.api_sock {
        let _ = std::fs::remove_file(p);
    }
    // vCPU threads may still be inside KVM_RUN; exiting the process ends them.
    std::process::exit(outcome.exit_code())
}
