//! Base root trees the microVM images sit on, built from Debian packages and cached.
//!
//! `python3.11`: Debian bookworm's minimal base (`debootstrap --variant=minbase`) with
//! `python3.11`, plus `awslambdaric` (the manylinux wheel for CPython 3.11) in `/var/runtime`,
//! which the runtime gets on `PYTHONPATH`, as in Lambda's own Python images. Cached under
//! `<cache>/base/python3.11-<hash of the recipe>/root`, built in a temporary directory and
//! renamed into place. Needs root (debootstrap chroots) and the network to Debian's mirror and
//! PyPI.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::kernel::{cache_root, KernelError};

/// Bump when the recipe changes in a way the inputs below do not show.
const RECIPE_VERSION: u32 = 1;
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
const PACKAGES: &str = "python3.11";
pub const AWSLAMBDARIC: &str = "awslambdaric==4.2.2";
/// Where awslambdaric lives in the image (on the runtime's PYTHONPATH).
pub const RUNTIME_DIR: &str = "/var/runtime";
/// The interpreter in the image.
pub const PYTHON: &str = "/usr/bin/python3.11";

#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    #[error(transparent)]
    Cache(#[from] KernelError),
    #[error("{tool} not found: {hint}")]
    MissingTool {
        tool: &'static str,
        hint: &'static str,
    },
    #[error("{step} failed ({status}); log: {log}")]
    Step {
        step: &'static str,
        status: String,
        log: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BaseError {
    let context = context.into();
    move |source| BaseError::Io { context, source }
}

fn run(step: &'static str, cmd: &mut Command, log: &Path) -> Result<(), BaseError> {
    let out = std::fs::File::create(log).map_err(io(log.display().to_string()))?;
    let err = out.try_clone().map_err(io("log"))?;
    let status = cmd
        .stdout(out)
        .stderr(err)
        .status()
        .map_err(io(format!("running {step}")))?;
    if !status.success() {
        return Err(BaseError::Step {
            step,
            status: status.to_string(),
            log: log.display().to_string(),
        });
    }
    Ok(())
}

/// The python3.11 base tree, built when missing. `progress` gets phase lines.
pub fn python311(mut progress: impl FnMut(&str)) -> Result<PathBuf, BaseError> {
    let hash: String = Sha256::digest(
        format!("{RECIPE_VERSION}|{SUITE}|{MIRROR}|{PACKAGES}|{AWSLAMBDARIC}").as_bytes(),
    )
    .iter()
    .take(8)
    .map(|b| format!("{b:02x}"))
    .collect();
    let dir = cache_root()?
        .join("base")
        .join(format!("python3.11-{hash}"));
    let root = dir.join("root");
    if root.join("usr/bin/python3.11").is_file() {
        return Ok(root);
    }
    for (tool, hint) in [
        ("debootstrap", "apt-get install debootstrap"),
        ("python3", "apt-get install python3 python3-pip"),
    ] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            return Err(BaseError::MissingTool { tool, hint });
        }
    }
    std::fs::create_dir_all(&dir).map_err(io(dir.display().to_string()))?;
    let work = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(&dir)
        .map_err(io(dir.display().to_string()))?;
    let tree = work.path().join("root");
    progress("debootstrap (Debian bookworm minbase + python3.11)");
    run(
        "debootstrap",
        Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={PACKAGES}"), SUITE])
            .arg(&tree)
            .arg(MIRROR),
        &work.path().join("debootstrap.log"),
    )?;
    progress("installing awslambdaric");
    let target = tree.join(RUNTIME_DIR.trim_start_matches('/'));
    run(
        "pip install awslambdaric",
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-compile",
                "--only-binary=:all:",
                "--platform",
                "manylinux2014_x86_64",
                "--python-version",
                "3.11",
                "--implementation",
                "cp",
                "--target",
            ])
            .arg(&target)
            .arg(AWSLAMBDARIC),
        &work.path().join("pip.log"),
    )?;
    // What a runtime never reads: package caches and documentation.
    for d in [
        "var/cache/apt/archives",
        "var/lib/apt/lists",
        "usr/share/doc",
        "usr/share/man",
        "usr/share/locale",
    ] {
        let _ = std::fs::remove_dir_all(tree.join(d));
    }
    if root.exists() {
        let _ = std::fs::remove_dir_all(&root);
    }
    std::fs::rename(&tree, &root).map_err(io(root.display().to_string()))?;
    Ok(root)
}
