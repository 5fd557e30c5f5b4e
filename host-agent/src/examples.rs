//! The bundled example functions, deployed into a data dir on first start.
//!
//! `<data-dir>/examples-deployed` lists the examples already deployed once, so an example the
//! user deletes stays deleted, and one that could not be deployed yet (echo-rust before it is
//! built) is tried again at the next start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::functions::{build_zip, NewFunction, Registry, ZipEntry};

const HELLO_PYTHON: &str = include_str!("../../examples/hello-python/lambda_function.py");

struct Example {
    name: &'static str,
    runtime: &'static str,
    handler: &'static str,
    description: &'static str,
}

const EXAMPLES: &[Example] = &[
    Example {
        name: "hello-python",
        runtime: "python3.11",
        handler: "lambda_function.handler",
        description: "Kindling example: Python 3 handler served by awslambdaric",
    },
    Example {
        name: "echo-rust",
        runtime: "provided.al2023",
        handler: "bootstrap",
        description: "Kindling example: Rust function on the lambda_runtime crate",
    },
];

/// Where the `echo-rust` binary is looked for: `$KINDLING_ECHO_RUST`, else beside the
/// `kindling` executable (both come out of one `cargo build` of the workspace).
fn echo_rust_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KINDLING_ECHO_RUST") {
        return Some(PathBuf::from(p));
    }
    crate::sibling_binary("echo-rust")
}

fn code_for(example: &Example) -> Result<Vec<u8>, String> {
    let entries = match example.name {
        "hello-python" => vec![ZipEntry {
            name: "lambda_function.py".into(),
            data: HELLO_PYTHON.as_bytes().to_vec(),
            mode: 0o644,
        }],
        "echo-rust" => {
            let path = echo_rust_binary().ok_or("cannot locate the kindling executable")?;
            let data = std::fs::read(&path).map_err(|e| {
                format!(
                    "{}: {e}; build it with `cargo build --release -p echo-rust` (or set KINDLING_ECHO_RUST)",
                    path.display()
                )
            })?;
            vec![ZipEntry {
                name: "bootstrap".into(),
                data,
                mode: 0o755,
            }]
        }
        other => return Err(format!("unknown example {other}")),
    };
    build_zip(&entries).map_err(|e| e.to_string())
}

/// Deploys every example not deployed before. Failures are logged, never fatal.
pub fn deploy(registry: &Registry, data_dir: &Path) {
    let marker = data_dir.join("examples-deployed");
    let mut done: Vec<String> = std::fs::read_to_string(&marker)
        .map(|s| s.lines().map(str::to_string).collect())
        .unwrap_or_default();
    for ex in EXAMPLES {
        if done.iter().any(|d| d == ex.name) {
            continue;
        }
        if registry.get(ex.name).is_some() {
            done.push(ex.name.to_string());
            continue;
        }
        let zip = match code_for(ex) {
            Ok(z) => z,
            Err(e) => {
                tracing::warn!(example = ex.name, "example not deployed: {e}");
                continue;
            }
        };
        let new = NewFunction {
            name: ex.name.into(),
            runtime: ex.runtime.into(),
            handler: ex.handler.into(),
            role: String::new(),
            description: ex.description.into(),
            timeout: 30,
            memory_size: 128,
            variables: BTreeMap::new(),
            architecture: "x86_64".into(),
            image: None,
        };
        match registry.create(new, &zip) {
            Ok(_) => {
                tracing::info!(example = ex.name, "deployed example function");
                done.push(ex.name.to_string());
            }
            Err(e) => tracing::warn!(example = ex.name, error = %e, "example not deployed"),
        }
    }
    if let Err(e) = std::fs::write(&marker, done.join("\n") + "\n") {
        tracing::warn!(path = %marker.display(), error = %e, "cannot record deployed examples");
    }
}
