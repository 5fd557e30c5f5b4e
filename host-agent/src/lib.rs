//! The Kindling host agent: the `kindling` daemon and CLI.
//!
//! - [`api`]: Lambda's function and Invoke API over HTTP.
//! - [`functions`]: the function registry and code store.
//! - [`pool`]: the scheduler (one invocation per environment).
//! - [`events`]: asynchronous invocations: the durable queue, retries, destinations.
//! - [`sandbox`]: execution environments and their backends.
//! - [`logs`]: function logs (START/END/REPORT, per-function files, Tail).
//! - [`metrics`]: the Prometheus metrics on `GET /metrics`.
//! - [`serve`]: wiring it all up for `kindling serve`.
//! - [`cli`]: the thin client commands (`kindling invoke`, `kindling function ...`).

pub mod api;
pub mod bench;
pub mod cli;
pub mod datadir;
pub mod events;
pub mod examples;
pub mod functions;
pub mod logs;
pub mod metrics;
pub mod pool;
pub mod sandbox;
pub mod serve;

/// A binary built beside the running `kindling` (one `cargo build` makes them all):
/// `kindling-vmm`, the `echo-rust` example. `None` when it is not there.
pub fn sibling_binary(name: &str) -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.join(name);
    p.is_file().then_some(p)
}
