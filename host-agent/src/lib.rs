//! The Kindling host agent: the `kindling` daemon and CLI.
//!
//! - [`api`]: Lambda's function and Invoke API over HTTP.
//! - [`functions`]: the function registry and code store.
//! - [`pool`]: the scheduler (one invocation per environment).
//! - [`sandbox`]: execution environments and their backends.
//! - [`serve`]: wiring it all up for `kindling serve`.
//! - [`cli`]: the thin client commands (`kindling invoke`, `kindling function ...`).

pub mod api;
pub mod bench;
pub mod cli;
pub mod datadir;
pub mod examples;
pub mod functions;
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
