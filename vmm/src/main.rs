//! `kindling-vmm`: runs one microVM described by a JSON config.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use vmm::config::VmConfig;

const USAGE: &str =
    "usage: kindling-vmm --config FILE|- [--api-sock PATH] [--no-start] [--metrics-file PATH]

  --config FILE   the VM configuration (JSON); - reads it from stdin
  --api-sock PATH serve the control socket there (JSON lines: start, shutdown, metrics, status)
  --no-start      build the VM but wait for {\"action\":\"start\"} on the control socket
  --metrics-file PATH  write the final metrics (JSON) there when the VM ends

Logs go to stderr (KINDLING_LOG sets the level). Exit status: 0 when the guest powered off or
reset, or on a shutdown request; 1 when the VM failed; 2 on bad usage or configuration.";

struct Args {
    config: String,
    api_sock: Option<PathBuf>,
    no_start: bool,
    metrics_file: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let (mut config, mut api_sock, mut no_start, mut metrics_file) = (None, None, false, None);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" => config = Some(args.next().ok_or("--config needs a value")?),
            "--api-sock" => {
                api_sock = Some(PathBuf::from(
                    args.next().ok_or("--api-sock needs a value")?,
                ))
            }
            "--no-start" => no_start = true,
            "--metrics-file" => {
                metrics_file = Some(PathBuf::from(
                    args.next().ok_or("--metrics-file needs a value")?,
                ))
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let config = config.ok_or("--config is required")?;
    if no_start && api_sock.is_none() {
        return Err("--no-start needs --api-sock".into());
    }
    Ok(Args {
        config,
        api_sock,
        no_start,
        metrics_file,
    })
}

fn main() -> ExitCode {
    let start = Instant::now();
    let filter = tracing_subscriber::EnvFilter::try_from_env("KINDLING_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("kindling-vmm: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let text = if args.config == "-" {
        let mut s = String::new();
        if let Err(e) = std::io::stdin().read_to_string(&mut s) {
            eprintln!("kindling-vmm: reading the config from stdin: {e}");
            return ExitCode::from(2);
        }
        s
    } else {
        match std::fs::read_to_string(&args.config) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("kindling-vmm: {}: {e}", args.config);
                return ExitCode::from(2);
            }
        }
    };
    let config: VmConfig = match serde_json::from_str(&text) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kindling-vmm: invalid config: {e}");
            return ExitCode::from(2);
        }
    };
    let mut vmm = match vmm::builder::build(&config, start, args.api_sock.as_deref()) {
        Ok(v) => v,
        Err(e @ vmm::builder::BuildError::Config(_)) => {
            eprintln!("kindling-vmm: {e}");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("kindling-vmm: cannot build the VM: {e}");
            return ExitCode::FAILURE;
        }
    };
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
