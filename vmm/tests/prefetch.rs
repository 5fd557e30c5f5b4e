//! Working-set recording and prefetch on restore, with a tiny hand-written guest that keeps
//! touching 2 MiB of memory (reading half its pages, writing the other half). A restore records
//! what the guest touched (`working_set`), a second restore loads that set with `--prefetch`,
//! and the page faults the VMM takes once its vCPUs run must be fewer (counts, not times).

mod common;

use common::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Fills 512 pages at 4 MiB once, then forever: reads each even page, increments a word in
/// each odd page, counts passes at 0x300000 and reports each on port 0x80 (an I/O exit the
/// VMM counts, so the test sees progress without reading guest memory).
const TOUCHER: &str = r#"
  mov $0x400000, %rdi
1: movq $1, (%rdi)
  add $0x1000, %rdi
  cmp $0x600000, %rdi
  jb 1b
2: mov $0x400000, %rdi
3: mov (%rdi), %rax
  incq 0x1000(%rdi)
  add $0x2000, %rdi
  cmp $0x600000, %rdi
  jb 3b
  incq 0x300000
  out %al, $0x80
  jmp 2b
"#;
const PASSES_AT: usize = 0x300000;
const TOUCHED_PAGES: u64 = 512;

fn passes(mem: &Path) -> u64 {
    let m = std::fs::read(mem).unwrap();
    u64::from_le_bytes(m[PASSES_AT..PASSES_AT + 8].try_into().unwrap())
}

/// Restores the snapshot, runs the guest until it has made a whole pass over its pages, and
/// returns (minor faults since the vCPUs started, the working set answer, metrics). `extra`
/// goes on the command line.
fn restore_and_run(dir: &Path, tag: &str, extra: &[&str]) -> (u64, Value, Value) {
    let state = dir.join("s.state");
    let mem = dir.join("s.mem");
    let mut args = vec![
        "--restore",
        state.to_str().unwrap(),
        "--mem",
        mem.to_str().unwrap(),
        "--no-start",
    ];
    args.extend_from_slice(extra);
    let mut vm = Vm::spawn(&args, &dir.join(format!("{tag}.sock")));
    vm.ok(json!({"action": "start"}));
    // Two pass reports since the restore: at least one whole pass over every page.
    let start = Instant::now();
    loop {
        let m = vm.ok(json!({"action": "metrics"}));
        if m["metrics"]["vcpus"][0]["io"].as_u64().unwrap() >= 2 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the guest never finished a pass: {m}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    vm.ok(json!({"action": "pause"}));
    let m = vm.ok(json!({"action": "metrics"}))["metrics"].clone();
    // What the guest touched since the restore, from pagemap (no guest memory is read).
    let ws_path = dir.join(format!("{tag}.ws"));
    let ws = vm.ok(json!({"action": "working_set", "path": ws_path}));
    let minor = m["page_faults"]["since_vcpus_started"]["minor"]
        .as_u64()
        .unwrap_or_else(|| panic!("no fault counts: {m}"));
    // The restored guest runs on from the snapshot (checked in a snapshot of it, taken after
    // the fault counts because writing it reads all of guest memory).
    let (rs, rm) = (
        dir.join(format!("{tag}.state")),
        dir.join(format!("{tag}.mem")),
    );
    vm.ok(json!({"action": "snapshot", "state_path": rs, "mem_path": rm}));
    assert!(
        passes(&rm) > passes(&mem),
        "{tag}: the guest did not run on"
    );
    vm.shutdown();
    (minor, ws, m)
}

#[test]
fn working_set_prefetch_cuts_faults_after_restore() {
    if !have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    let elf = guest_elf(dir.path(), "toucher", TOUCHER);
    std::fs::write(
        d("cfg.json"),
        format!(r#"{{"kernel": "{}", "mem_mib": 32}}"#, elf.display()),
    )
    .unwrap();
    let mut vm = Vm::spawn(&["--config", d("cfg.json").to_str().unwrap()], &d("a.sock"));
    std::thread::sleep(Duration::from_millis(300));
    vm.ok(json!({"action": "pause"}));
    vm.ok(json!({"action": "snapshot", "state_path": d("s.state"), "mem_path": d("s.mem")}));
    vm.shutdown();
    assert!(passes(&d("s.mem")) > 0, "the guest ran before the snapshot");

    // Record: a plain restore's working set holds the loop's pages, the written half as
    // written pages (private copies), the others as read (mapped from the file).
    let (plain, ws, m) = restore_and_run(dir.path(), "plain", &[]);
    assert!(m["prefetch"].is_null(), "{m}");
    assert!(
        ws["read_pages"].as_u64().unwrap() >= TOUCHED_PAGES / 2,
        "{ws}"
    );
    assert!(
        ws["written_pages"].as_u64().unwrap() >= TOUCHED_PAGES / 2,
        "{ws}"
    );
    let file: Value = serde_json::from_slice(&std::fs::read(d("plain.ws")).unwrap()).unwrap();
    assert_eq!(file["version"], 1);
    assert_eq!(file["memory_size"], 32 << 20);
    let written: Vec<[u64; 2]> = serde_json::from_value(file["written"].clone()).unwrap();
    let odd_page = 0x401000 / 4096;
    assert!(
        written.iter().any(|[f, n]| (*f..f + n).contains(&odd_page)),
        "page {odd_page} was written: {written:?}"
    );

    // Replay: with the working set loaded before the vCPUs start, they fault less.
    let ws_file = d("plain.ws");
    let (prefetched, _, m) = restore_and_run(
        dir.path(),
        "prefetch",
        &["--prefetch", ws_file.to_str().unwrap()],
    );
    let p = &m["prefetch"];
    assert!(
        p["written_pages"].as_u64().unwrap() >= TOUCHED_PAGES / 2,
        "{p}"
    );
    assert!(
        ["populate", "touch"].contains(&p["method"].as_str().unwrap()),
        "{p}"
    );
    eprintln!("minor faults after restore: {plain} without prefetch, {prefetched} with ({p})");
    assert!(
        prefetched < plain,
        "prefetch did not cut faults: {prefetched} with, {plain} without"
    );
}

#[test]
fn bad_prefetch_files_and_usage_are_refused() {
    if !have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    let elf = guest_elf(dir.path(), "spin", "1: pause\n jmp 1b\n");
    std::fs::write(
        d("cfg.json"),
        format!(r#"{{"kernel": "{}", "mem_mib": 32}}"#, elf.display()),
    )
    .unwrap();
    let mut vm = Vm::spawn(&["--config", d("cfg.json").to_str().unwrap()], &d("a.sock"));
    vm.ok(json!({"action": "pause"}));
    vm.ok(json!({"action": "snapshot", "state_path": d("s"), "mem_path": d("m")}));
    vm.ok(json!({"action": "working_set", "path": d("boot.ws")}));
    vm.shutdown();

    let run = |args: &[&str]| {
        let out = Command::new(vmm_bin()).args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (s, m) = (d("s"), d("m"));
    let restore = |ws: &Path| {
        run(&[
            "--restore",
            s.to_str().unwrap(),
            "--mem",
            m.to_str().unwrap(),
            "--prefetch",
            ws.to_str().unwrap(),
        ])
    };
    // A working set of another memory size, garbage, a missing file.
    let mut other: Value = serde_json::from_slice(&std::fs::read(d("boot.ws")).unwrap()).unwrap();
    other["memory_size"] = json!(64 << 20);
    std::fs::write(d("other.ws"), other.to_string()).unwrap();
    std::fs::write(d("junk.ws"), b"not json").unwrap();
    for (ws, needle) in [
        (d("other.ws"), "this VM has 33554432"),
        (d("junk.ws"), "is invalid"),
        (d("none.ws"), "cannot read the working-set file"),
    ] {
        let (code, stderr) = restore(&ws);
        assert_eq!(code, Some(2), "{stderr}");
        assert!(stderr.contains(needle), "{needle}: {stderr}");
    }
    // --prefetch belongs to --restore.
    let (code, stderr) = run(&[
        "--config",
        d("cfg.json").to_str().unwrap(),
        "--prefetch",
        d("boot.ws").to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("go with --restore"), "{stderr}");
}
