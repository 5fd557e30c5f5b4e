//! `kindling image push|pull|ls|gc|chunk-server`: the arguments and what they run. The agent
//! binary only routes its `image` subcommands here.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::{ops, TierConfig};

#[derive(Debug, Clone, clap::Args)]
pub struct PushArgs {
    /// The image file (e.g. an ext4 root image).
    pub file: PathBuf,
    #[arg(long)]
    pub name: String,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub tiers: TierConfig,
}

#[derive(Debug, Clone, clap::Args)]
pub struct PullArgs {
    pub name: String,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub tiers: TierConfig,
}

#[derive(Debug, Clone, clap::Args)]
pub struct LsArgs {
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub tiers: TierConfig,
}

#[derive(Debug, Clone, clap::Args)]
pub struct GcArgs {
    /// Keep unreferenced chunks younger than this (a push may still be writing them).
    #[arg(long, default_value_t = 600)]
    pub min_age_secs: u64,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub tiers: TierConfig,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ChunkServerArgs {
    /// The Unix socket to serve chunks on.
    #[arg(long)]
    pub socket: PathBuf,
    #[command(flatten)]
    pub tiers: TierConfig,
}

fn fail(what: &str, e: impl std::fmt::Display) -> ExitCode {
    eprintln!("kindling image {what}: {e}");
    ExitCode::FAILURE
}

fn bar(len: u64, bytes: bool) -> ProgressBar {
    let pb = ProgressBar::new(len);
    let tmpl = if bytes {
        "{msg} [{bar:30}] {bytes}/{total_bytes} ({eta})"
    } else {
        "{msg} [{bar:30}] {pos}/{len} chunks ({eta})"
    };
    if let Ok(s) = ProgressStyle::with_template(tmpl) {
        pb.set_style(s.progress_chars("=> "));
    }
    pb
}

fn print_json(v: &impl serde::Serialize) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("kindling image: cannot print JSON: {e}"),
    }
}

pub async fn push(a: PushArgs) -> ExitCode {
    let store = match a.tiers.store() {
        Ok(s) => s,
        Err(e) => return fail("push", e),
    };
    let len = std::fs::metadata(&a.file).map(|m| m.len()).unwrap_or(0);
    let pb = bar(len, true);
    pb.set_message(format!("pushing {}", a.name));
    let r = ops::push(&store, &a.file, &a.name, &|done| pb.set_position(done)).await;
    pb.finish_and_clear();
    match r {
        Ok(r) if a.json => {
            print_json(&r);
            ExitCode::SUCCESS
        }
        Ok(r) => {
            println!(
                "pushed {} to {}: {} bytes, {} chunks ({} zero, {} unique), {} new ({} bytes)",
                r.name,
                store.location,
                r.image_bytes,
                r.chunks,
                r.zero_chunks,
                r.unique_chunks,
                r.new_chunks,
                r.new_bytes
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail("push", e),
    }
}

pub async fn pull(a: PullArgs) -> ExitCode {
    let (store, _l1, cache) = match a.tiers.open() {
        Ok(t) => t,
        Err(e) => return fail("pull", e),
    };
    let pb = bar(0, false);
    pb.set_message(format!("pulling {}", a.name));
    let r = ops::pull(&store, &cache, &a.name, &a.out, &|done, total| {
        pb.set_length(total);
        pb.set_position(done);
    })
    .await;
    pb.finish_and_clear();
    match r {
        Ok(r) if a.json => {
            print_json(&serde_json::json!({ "pull": r, "tiers": cache.report() }));
            ExitCode::SUCCESS
        }
        Ok(r) => {
            println!(
                "pulled {} into {}: {} bytes, {} chunks",
                r.name,
                a.out.display(),
                r.image_bytes,
                r.chunks_read
            );
            for t in cache.report() {
                println!("  {}: {} chunks, {} bytes", t.tier, t.hits, t.bytes);
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail("pull", e),
    }
}

pub async fn ls(a: LsArgs) -> ExitCode {
    let store = match a.tiers.store() {
        Ok(s) => s,
        Err(e) => return fail("ls", e),
    };
    match ops::list(&store).await {
        Ok(v) if a.json => {
            print_json(&v);
            ExitCode::SUCCESS
        }
        Ok(v) => {
            println!(
                "{:<40} {:>14} {:>8} {:>8}",
                "NAME", "BYTES", "CHUNKS", "STORED"
            );
            for i in v {
                println!(
                    "{:<40} {:>14} {:>8} {:>8}",
                    i.name, i.image_bytes, i.chunks, i.unique_chunks
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail("ls", e),
    }
}

pub async fn gc(a: GcArgs) -> ExitCode {
    let store = match a.tiers.store() {
        Ok(s) => s,
        Err(e) => return fail("gc", e),
    };
    let pb = ProgressBar::new_spinner();
    pb.set_message("collecting unreferenced chunks");
    pb.enable_steady_tick(Duration::from_millis(200));
    let r = ops::gc(&store, Duration::from_secs(a.min_age_secs)).await;
    pb.finish_and_clear();
    match r {
        Ok(r) if a.json => {
            print_json(&r);
            ExitCode::SUCCESS
        }
        Ok(r) => {
            println!(
                "{} images; kept {} chunks, deleted {} ({} bytes), {} unreferenced but younger than {} s",
                r.images, r.kept_chunks, r.deleted_chunks, r.deleted_bytes, r.young_chunks, a.min_age_secs
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail("gc", e),
    }
}

/// Serves chunks until killed.
pub async fn chunk_server(a: ChunkServerArgs) -> ExitCode {
    let (_store, _l1, cache) = match a.tiers.open() {
        Ok(t) => t,
        Err(e) => return fail("chunk-server", e),
    };
    let listener = match crate::server::bind(&a.socket) {
        Ok(l) => l,
        Err(e) => return fail("chunk-server", format!("{}: {e}", a.socket.display())),
    };
    eprintln!(
        "kindling image chunk-server: serving on {}",
        a.socket.display()
    );
    match crate::server::serve(listener, Arc::new(cache)).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail("chunk-server", e),
    }
}
