//! Snapshot cold starts on the microvm backend (issue 6): a static `lambda_runtime` function
//! (echo-rust) is snapshotted after Init on its first cold start; later cold starts restore
//! that snapshot, and each restored clone gets fresh entropy from the host (its `getrandom`
//! output differs from every other clone's), answers correctly, and its first REPORT says
//! `Restore Duration`. A corrupted snapshot is deleted, the reason logged, and the cold start
//! boots instead.
//!
//! Needs /dev/kvm (skipped loudly without it). Slow where the host emulates guest kernel code:
//! one boot (~10-15 s) at the start and one for the corrupted snapshot; restores are much
//! quicker because the guest kernel is already up.

use kindling_tests::{have_kvm, microvm_agent, static_bin, zip, Agent, Response};
use serde_json::{json, Value};

const NAME: &str = "echo-snap";

/// Invokes `n` at once, each holding its environment for `sleep_ms`, so the pool needs `n`
/// environments; returns the answers.
fn concurrent(agent: &Agent, n: usize, sleep_ms: u64) -> Vec<Response> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                s.spawn(move || {
                    let event = json!({"i": i, "sleep_ms": sleep_ms, "random": 32});
                    agent.invoke(NAME, event.to_string().as_bytes())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Checks an answer and returns its random bytes (hex).
fn random_of(agent: &Agent, r: &Response, event_i: Option<usize>) -> String {
    assert_eq!(r.status, 200, "{}\n{}", r.text(), agent.log());
    assert_eq!(r.header("x-amz-function-error"), None, "{}", r.text());
    let body: Value = r.json();
    if let Some(i) = event_i {
        assert_eq!(body["echo"]["i"], json!(i), "{body}");
    }
    assert_eq!(body["functionName"], NAME);
    assert_eq!(body["requestId"].as_str(), r.header("x-amzn-requestid"));
    let random = body["random"].as_str().unwrap_or_default().to_string();
    assert_eq!(random.len(), 64, "{body}");
    random
}

fn reports(agent: &Agent) -> Vec<String> {
    let log = std::fs::read_to_string(agent.data_dir.join(format!("logs/{NAME}.log")))
        .unwrap_or_default();
    log.lines()
        .filter_map(|l| l.split_once("REPORT RequestId: ").map(|x| x.1.to_string()))
        .collect()
}

fn snapshot_dirs(agent: &Agent) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(agent.data_dir.join("snapshots").join(NAME))
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.join("meta.json").is_file())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn restored_clones_serve_with_distinct_randomness() {
    if !have_kvm("snapshot restore test") {
        return;
    }
    let bootstrap = static_bin("echo-rust", "echo-rust");
    let agent = microvm_agent();
    let code = std::fs::read(&bootstrap).unwrap();
    agent.create_ok(
        NAME,
        "provided.al2023",
        "bootstrap",
        &zip(&[("bootstrap", &code, 0o755)]),
        json!({"Timeout": 60}),
    );

    // The first cold start boots, runs Init, snapshots the VM and keeps it (as a copy with
    // its own entropy).
    let r = agent.invoke(NAME, br#"{"random": 32}"#);
    let mut randoms = vec![random_of(&agent, &r, None)];
    let snaps = snapshot_dirs(&agent);
    assert_eq!(snaps.len(), 1, "one snapshot per revision\n{}", agent.log());
    for f in ["state", "mem", "rootfs.ext4", "meta.json"] {
        assert!(snaps[0].join(f).is_file(), "{f} in {}", snaps[0].display());
    }
    let first = reports(&agent);
    assert!(first[0].contains("\tInit Duration: "), "{first:?}");

    // Three at once: the warm environment takes one, two cold starts restore the snapshot.
    for (i, r) in concurrent(&agent, 3, 2000).iter().enumerate() {
        randoms.push(random_of(&agent, r, Some(i)));
    }
    let restored: Vec<_> = reports(&agent)
        .into_iter()
        .filter(|l| l.contains("\tRestore Duration: "))
        .collect();
    assert_eq!(restored.len(), 2, "{:?}\n{}", reports(&agent), agent.log());
    assert!(restored.iter().all(|l| !l.contains("Init Duration")));
    // Every copy of the VM draws different random bytes: no two clones share RNG state.
    let mut unique = randoms.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), randoms.len(), "{randoms:?}");

    // The first restored clone recorded the pages it touched up to its first answer; the
    // next restore loads them before its vCPU starts (and still answers, with its own
    // entropy).
    let ws = snaps[0].join("working-set.json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !ws.is_file() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let set: Value = serde_json::from_slice(&std::fs::read(&ws).expect("working set"))
        .expect("working set JSON");
    assert!(set.is_object(), "{set}");
    for (i, r) in concurrent(&agent, 4, 2000).iter().enumerate() {
        randoms.push(random_of(&agent, r, Some(i)));
    }
    let restored = reports(&agent)
        .iter()
        .filter(|l| l.contains("\tRestore Duration: "))
        .count();
    assert_eq!(restored, 3, "{:?}\n{}", reports(&agent), agent.log());
    let mut unique = randoms.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), randoms.len(), "{randoms:?}");

    // A corrupted snapshot: the next cold start cannot use it, deletes it, says why in the
    // agent's log and boots (that revision then boots until the agent restarts).
    let state = snaps[0].join("state");
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 16] {
        *b ^= 0xff;
    }
    std::fs::write(&state, &bytes).unwrap();
    for (i, r) in concurrent(&agent, 5, 2000).iter().enumerate() {
        random_of(&agent, r, Some(i));
    }
    let log = agent.log();
    assert!(
        log.contains("snapshot cannot be used, deleted; booting instead"),
        "{log}"
    );
    let boots = reports(&agent)
        .iter()
        .filter(|l| l.contains("\tInit Duration: "))
        .count();
    assert_eq!(boots, 2, "{:?}", reports(&agent));
    assert!(snapshot_dirs(&agent).is_empty());
}

/// The fallback on a host where restored guests do not come back: the first cold start
/// snapshots (and keeps its VM, which reconnects and serves), the next one tries the
/// snapshot, gives up on it with the reason in the agent's log, deletes it and boots; every
/// answer is right and the copies' random bytes differ.
#[test]
fn unusable_snapshot_falls_back_to_boot() {
    if !have_kvm("snapshot fallback test") {
        return;
    }
    let bootstrap = static_bin("echo-rust", "echo-rust");
    let agent = microvm_agent();
    let code = std::fs::read(&bootstrap).unwrap();
    agent.create_ok(
        NAME,
        "provided.al2023",
        "bootstrap",
        &zip(&[("bootstrap", &code, 0o755)]),
        json!({"Timeout": 60}),
    );
    let r = agent.invoke(NAME, br#"{"random": 32}"#);
    let first = random_of(&agent, &r, None);
    let snaps = snapshot_dirs(&agent);
    assert_eq!(snaps.len(), 1, "{}", agent.log());
    // Corrupt it, so that the fallback is exercised whether or not restores work here.
    let state = snaps[0].join("state");
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&state, &bytes).unwrap();
    let answers = concurrent(&agent, 2, 2000);
    let mut randoms = vec![first];
    for (i, r) in answers.iter().enumerate() {
        randoms.push(random_of(&agent, r, Some(i)));
    }
    randoms.sort();
    randoms.dedup();
    assert_eq!(randoms.len(), 3);
    let log = agent.log();
    assert!(
        log.contains("snapshot cannot be used, deleted; booting instead"),
        "{log}"
    );
    assert!(snapshot_dirs(&agent).is_empty());
}
