//! Issue 8 end to end: functions boot in microVMs from chunked root images through the agent's
//! chunk cache. Agent A (`--l3` on moto's S3, `--l2` on a memcached) builds the function's
//! root image, pushes it to S3 and keeps only its manifest; its VM boots lazily and answers,
//! fetching a small part of the image's chunks. Agent B, a second "host" (own data dir, own
//! L1, same L2 and L3), boots the same function: the image is found in S3 (nothing built) and
//! its chunks come from L2, none from S3. Agent B is given A's prefetch list (the chunks A's
//! VM fetched, in order), so its cold start warms them before the guest asks.
//!
//! One VM boot per agent (~10-15 s each on an emulating host). Skips loudly without /dev/kvm.

use std::path::Path;
use std::time::{Duration, Instant};

use kindling_tests::servers::{Memcached, Moto};
use kindling_tests::{have_kvm, workspace_bin, zip, Agent, AgentOptions};
use serde_json::{json, Value};

/// `stats.json` once the cold start's fetched chunks are recorded (written just after the
/// first invocation answers).
fn wait_stats(agent: &Agent) -> Value {
    let path = agent.data_dir.join("chunked/stats.json");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(text) = std::fs::read(&path) {
            let v: Value = serde_json::from_slice(&text).expect("stats.json is JSON");
            if v["images"][0]["fetched_chunks"].is_u64() {
                return v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no stats.json with fetched chunks\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tier(stats: &Value, name: &str) -> Value {
    stats["tiers"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["tier"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("no tier {name} in {stats}"))
}

fn files_with_ext(dir: &Path, ext: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == ext) {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

#[test]
fn function_boots_lazily_from_s3_and_a_second_host_reads_l2() {
    if !have_kvm("chunked-image VM test") {
        return;
    }
    let guest_init =
        rootfs::static_bin::build("guest-init", "guest-init").expect("static guest-init");
    let bootstrap = rootfs::static_bin::build("echo-rust", "echo-rust").expect("static echo-rust");
    let moto = Moto::start();
    moto.create_bucket("kindling-images");
    let memcached = Memcached::start();
    let l3 = "s3://kindling-images/vm-test";
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "--backend",
            "microvm",
            "--guest-init",
            guest_init.to_str().unwrap(),
            "--init-timeout",
            "120",
            "--l3",
            l3,
            "--s3-endpoint",
            &moto.endpoint,
            "--s3-access-key-id",
            "test",
            "--s3-secret-access-key",
            "test",
            "--l2",
            &memcached.addr(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let code = std::fs::read(&bootstrap).unwrap();
    // Plus 8 MiB the function never reads (as a package's unused dependencies): a lazy boot
    // leaves its chunks in the store.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let unused: Vec<u8> = (0..8 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let z = zip(&[("bootstrap", &code, 0o755), ("unused.bin", &unused, 0o644)]);

    // Host A: builds, pushes, boots lazily.
    let a = Agent::start_with(AgentOptions {
        extra_args: args(&[]),
        ..Default::default()
    });
    a.create_ok(
        "echo-l3",
        "provided.al2023",
        "bootstrap",
        &z,
        json!({"Timeout": 5}),
    );
    let r = a.invoke("echo-l3", br#"{"from":"s3"}"#);
    assert_eq!(r.status, 200, "{}\n{}", r.text(), a.log());
    assert_eq!(r.json()["echo"], json!({"from": "s3"}), "{}", a.log());
    let sa = wait_stats(&a);
    let img = &sa["images"][0];
    let name = img["name"].as_str().unwrap().to_string();
    let (chunks, stored, fetched) = (
        img["chunks"].as_u64().unwrap(),
        img["stored_chunks"].as_u64().unwrap(),
        img["fetched_chunks"].as_u64().unwrap(),
    );
    println!(
        "host A: image {name}: {} bytes, {chunks} chunks ({stored} with data); the cold start \
         fetched {fetched} ({:.0} % of all, {:.0} % of those with data); tiers {}",
        img["image_bytes"],
        100.0 * fetched as f64 / chunks as f64,
        100.0 * fetched as f64 / stored as f64,
        sa["tiers"]
    );
    assert!(fetched > 0, "{sa}");
    assert!(
        fetched * 2 < chunks && fetched < stored,
        "the VM should fetch a small part of the image lazily: {fetched} of {chunks} \
         ({stored} with data)"
    );
    // What A's VM read came from S3 (its L1 and the L2 were empty; chunks with the same
    // hash at two places are fetched from S3 once).
    let l3_hits = tier(&sa, "L3")["hits"].as_u64().unwrap();
    assert!(l3_hits > 0 && l3_hits <= fetched, "{sa}");
    assert_eq!(tier(&sa, "L2")["hits"], 0, "{sa}");
    // Only the manifest is kept locally; the image is in S3.
    assert!(
        files_with_ext(&a.data_dir, "ext4").is_empty(),
        "no local ext4 is kept: {:?}",
        files_with_ext(&a.data_dir, "ext4")
    );
    assert!(a
        .data_dir
        .join(format!("chunked/{name}.manifest"))
        .is_file());
    let ls = std::process::Command::new(workspace_bin("kindling"))
        .args([
            "image",
            "ls",
            "--json",
            "--l3",
            l3,
            "--s3-endpoint",
            &moto.endpoint,
        ])
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .output()
        .unwrap();
    let listed: Value = serde_json::from_slice(&ls.stdout).expect("image ls --json");
    assert_eq!(listed[0]["name"], name.as_str(), "{listed}");
    assert_eq!(listed[0]["chunks"], chunks);
    // The cold start's fetch order is the image's prefetch list.
    let prefetch_path = a.data_dir.join(format!("chunked/{name}.prefetch"));
    let prefetch: Value = serde_json::from_slice(&std::fs::read(&prefetch_path).unwrap()).unwrap();
    assert_eq!(prefetch["chunks"].as_array().unwrap().len() as u64, fetched);

    // Host B: its own data dir and L1, the same L2 and S3, and A's prefetch list.
    let tmp = tempfile::tempdir().unwrap();
    let b_dir = tmp.path().join("data-b");
    std::fs::create_dir_all(b_dir.join("chunked")).unwrap();
    std::fs::copy(
        &prefetch_path,
        b_dir.join(format!("chunked/{name}.prefetch")),
    )
    .unwrap();
    let b = Agent::start_with(AgentOptions {
        extra_args: args(&[]),
        data_dir: Some(b_dir),
        ..Default::default()
    });
    b.create_ok(
        "echo-l3",
        "provided.al2023",
        "bootstrap",
        &z,
        json!({"Timeout": 5}),
    );
    let r = b.invoke("echo-l3", br#"{"from":"l2"}"#);
    assert_eq!(r.status, 200, "{}\n{}", r.text(), b.log());
    assert_eq!(r.json()["echo"], json!({"from": "l2"}), "{}", b.log());
    let sb = wait_stats(&b);
    println!("host B: tiers {}", sb["tiers"]);
    let img_b = &sb["images"][0];
    assert_eq!(img_b["name"], name.as_str(), "same content, same image");
    assert_eq!(img_b["prefetched"], true, "{sb}");
    assert!(
        !b.log().contains("root image pushed"),
        "host B found the image in S3 and built nothing\n{}",
        b.log()
    );
    assert_eq!(tier(&sb, "L3")["hits"], 0, "nothing from S3: {sb}");
    assert!(
        tier(&sb, "L2")["hits"].as_u64().unwrap() >= fetched,
        "B's chunks came from L2: {sb}"
    );
}
