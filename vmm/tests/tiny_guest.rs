//! The VMM end to end with tiny hand-written guests (assembled at test time with binutils):
//! the 64-bit boot path, port I/O to the serial console, the i8042 reset that ends the VM, the
//! control socket, and the report of an emulation failure. No Linux kernel needed; each test
//! takes milliseconds even on an emulating host.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const PRINT_AND_RESET: &str = r#"
  mov $0x3f8, %dx
  mov $'O', %al
  out %al, %dx
  mov $'K', %al
  out %al, %dx
  mov $'\n', %al
  out %al, %dx
  mov $0xfe, %al
  out %al, $0x64
1: hlt
  jmp 1b
"#;

fn run_vmm(config: &str, extra: &[&str]) -> Output {
    let mut child = Command::new(vmm_bin())
        .args(["--config", "-"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(config.as_bytes())
        .unwrap();
    wait_with_timeout(child, Duration::from_secs(30))
}

#[test]
fn boots_prints_on_serial_and_resets_cleanly() {
    if !have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let elf = guest_elf(dir.path(), "ok", PRINT_AND_RESET);
    let metrics = dir.path().join("metrics.json");
    let cfg = format!(
        r#"{{"kernel": "{}", "serial": "stdout", "mem_mib": 32, "vcpus": 2}}"#,
        elf.display()
    );
    let out = run_vmm(&cfg, &["--metrics-file", metrics.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "OK\n");
    assert!(stderr.contains("reset through the i8042"), "{stderr}");
    let m: Value = serde_json::from_slice(&std::fs::read(&metrics).unwrap()).unwrap();
    assert_eq!(m["memory"]["guest_size_bytes"], 32 << 20);
    assert!(m["vcpus"][0]["io"].as_u64().unwrap() >= 4, "{m}");
    assert!(["hardware", "emulated"].contains(&m["host_kvm"]["kind"].as_str().unwrap()));
}

#[test]
fn bad_configs_are_refused_with_status_2() {
    if !have_kvm() {
        return;
    }
    for (cfg, needle) in [
        ("{not json", "invalid config"),
        (r#"{"kernel": "/x", "bogus": 1}"#, "unknown field"),
        (r#"{"kernel": "/x", "vcpus": 0}"#, "vcpus must be"),
        (r#"{"kernel": "/x", "mem_mib": 4}"#, "mem_mib must be"),
    ] {
        let out = run_vmm(cfg, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cfg}: {stderr}");
        assert!(stderr.contains(needle), "{cfg}: {stderr}");
    }
    // A kernel that is not an ELF: a build failure, status 1, with the reason.
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"not a kernel").unwrap();
    let out = run_vmm(&format!(r#"{{"kernel": "{}"}}"#, junk.display()), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot load the kernel"));
}

#[test]
fn control_socket_starts_reports_and_shuts_down() {
    if !have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Spins forever in the guest until shut down from outside.
    let elf = guest_elf(dir.path(), "spin", "1: pause\n jmp 1b\n");
    let sock = dir.path().join("api.sock");
    let cfg = dir.path().join("cfg.json");
    std::fs::write(
        &cfg,
        format!(r#"{{"kernel": "{}", "mem_mib": 32}}"#, elf.display()),
    )
    .unwrap();
    let child = Command::new(vmm_bin())
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "--api-sock",
            sock.to_str().unwrap(),
            "--no-start",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let stream = loop {
        match UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(_) if start.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("control socket never appeared: {e}"),
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut ask = |req: &str| -> Value {
        writer.write_all(req.as_bytes()).unwrap();
        writer.write_all(b"\n").unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    };
    assert_eq!(ask(r#"{"action":"status"}"#)["state"], "not started");
    assert_eq!(ask("garbage")["ok"], false);
    assert_eq!(ask(r#"{"action":"start"}"#)["ok"], true);
    assert_eq!(
        ask(r#"{"action":"start"}"#)["ok"],
        false,
        "second start refused"
    );
    assert_eq!(ask(r#"{"action":"status"}"#)["state"], "running");
    let m = ask(r#"{"action":"metrics"}"#);
    assert_eq!(m["ok"], true);
    assert!(m["metrics"]["memory"]["rss_bytes"].as_u64().unwrap() > 0);
    assert_eq!(ask(r#"{"action":"shutdown"}"#)["ok"], true);
    let out = wait_with_timeout(child, Duration::from_secs(10));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!sock.exists(), "the socket is removed at exit");
}

#[test]
fn emulation_failure_is_reported_with_rip_and_bytes() {
    if !have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // `lock cmpxchg16b` in ring 0: an emulating host's instruction emulator cannot run it
    // (dev-kvm.md); hardware KVM runs it and the guest resets normally.
    let elf = guest_elf(
        dir.path(),
        "cx16",
        "mov $0x2000, %rsi\n xor %eax, %eax\n xor %edx, %edx\n lock cmpxchg16b (%rsi)\n mov $0xfe, %al\n out %al, $0x64\n1: hlt\n jmp 1b\n",
    );
    let out = run_vmm(
        &format!(r#"{{"kernel": "{}", "mem_mib": 32}}"#, elf.display()),
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("EMULATING KVM") {
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("emulation failure"), "{stderr}");
        assert!(stderr.contains("at guest RIP 0x100000b"), "{stderr}");
        assert!(
            stderr.contains("instruction bytes: f0 48 0f c7 0e"),
            "{stderr}"
        );
    } else {
        eprintln!("hardware KVM: cmpxchg16b runs natively; checking the guest completes");
        assert_eq!(out.status.code(), Some(0), "{stderr}");
    }
}

/// Counts in RBX forever, storing the count at 0x300000; counts its own starts at 0x300008.
const COUNTER: &str = r#"
  incq 0x300008
  mov 0x300000, %rbx
1: inc %rbx
  mov %rbx, 0x300000
  jmp 1b
"#;
const COUNT_AT: usize = 0x300000;

fn u64_at(mem: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(mem[at..at + 8].try_into().unwrap())
}

fn rbx_of(state: &Path) -> u64 {
    let (_, s) = vmm::snapshot::read_state(state).unwrap();
    s.vcpus[0].regs.rbx
}

fn pause_run(vm: &mut Vm, ms: u64) {
    vm.ok(serde_json::json!({"action": "resume"}));
    std::thread::sleep(Duration::from_millis(ms));
    vm.ok(serde_json::json!({"action": "pause"}));
}

#[test]
fn pause_snapshot_restore_and_diff_merge() {
    if !have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    let elf = guest_elf(dir.path(), "count", COUNTER);
    std::fs::write(
        d("cfg.json"),
        format!(
            r#"{{"kernel": "{}", "mem_mib": 32, "vcpus": 2, "track_dirty_pages": true}}"#,
            elf.display()
        ),
    )
    .unwrap();
    let mut vm = Vm::spawn(&["--config", d("cfg.json").to_str().unwrap()], &d("a.sock"));
    std::thread::sleep(Duration::from_millis(200));

    // A running VM cannot be snapshotted; pausing shows in the status.
    let a =
        vm.ask(serde_json::json!({"action": "snapshot", "state_path": d("x"), "mem_path": d("y")}));
    assert_eq!(a["ok"], false);
    assert!(
        a["error"].as_str().unwrap().contains("must be paused"),
        "{a}"
    );
    assert_eq!(vm.ask(serde_json::json!({"action": "resume"}))["ok"], false);
    vm.ok(serde_json::json!({"action": "pause"}));
    assert_eq!(
        vm.ok(serde_json::json!({"action": "status"}))["state"],
        "paused"
    );

    // Full snapshot: the counter in memory matches RBX (or trails it by the one store).
    vm.snapshot(&d("full1.state"), &d("full1.mem"), "full");
    let mem1 = std::fs::read(d("full1.mem")).unwrap();
    assert_eq!(mem1.len(), 32 << 20);
    let count1 = u64_at(&mem1, COUNT_AT);
    let rbx1 = rbx_of(&d("full1.state"));
    assert!(count1 > 0, "the guest counted");
    assert!(
        rbx1 == count1 || rbx1 == count1 + 1,
        "rbx {rbx1} count {count1}"
    );
    assert_eq!(u64_at(&mem1, COUNT_AT + 8), 1);

    // Run on, then a diff and a full snapshot of the same paused moment.
    pause_run(&mut vm, 200);
    let diff = vm.snapshot(&d("diff.state"), &d("diff.mem"), "diff");
    let dirty = diff["dirty_pages"].as_u64().unwrap();
    assert!((1..1000).contains(&dirty), "only the touched pages: {diff}");
    vm.snapshot(&d("full2.state"), &d("full2.mem"), "full");
    vm.ok(serde_json::json!({"action": "resume"}));
    assert_eq!(
        vm.ok(serde_json::json!({"action": "status"}))["state"],
        "running"
    );
    vm.shutdown();

    // Base + diff == the full snapshot of the same moment, memory and registers.
    std::fs::copy(d("full1.mem"), d("merged.mem")).unwrap();
    let out = Command::new(vmm_bin())
        .args(["snapshot", "merge", "--base"])
        .arg(d("merged.mem"))
        .arg("--diff")
        .arg(d("diff.mem"))
        .arg("--diff-state")
        .arg(d("diff.state"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let merged = std::fs::read(d("merged.mem")).unwrap();
    let full2 = std::fs::read(d("full2.mem")).unwrap();
    assert!(
        merged == full2,
        "merged diff differs from the full snapshot"
    );
    let count2 = u64_at(&full2, COUNT_AT);
    assert!(count2 > count1);
    let (_, sd) = vmm::snapshot::read_state(&d("diff.state")).unwrap();
    let (_, sf) = vmm::snapshot::read_state(&d("full2.state")).unwrap();
    for (a, b) in sd.vcpus.iter().zip(&sf.vcpus) {
        assert_eq!(a.regs.rip, b.regs.rip);
        assert_eq!(a.regs.rbx, b.regs.rbx);
        assert_eq!(a.sregs.cr3, b.sregs.cr3);
    }
    assert_eq!(sd.vcpus.len(), 2, "every vCPU is saved");

    // Restore the first full snapshot in a new VMM: the guest continues from the saved count
    // (it did not start over: its start counter stays 1).
    let mut r = Vm::spawn(
        &[
            "--restore",
            d("full1.state").to_str().unwrap(),
            "--mem",
            d("full1.mem").to_str().unwrap(),
            "--no-start",
        ],
        &d("b.sock"),
    );
    assert_eq!(
        r.ok(serde_json::json!({"action": "status"}))["state"],
        "not started"
    );
    r.ok(serde_json::json!({"action": "start"}));
    std::thread::sleep(Duration::from_millis(200));
    r.ok(serde_json::json!({"action": "pause"}));
    r.snapshot(&d("r.state"), &d("r.mem"), "full");
    let m = r.ok(serde_json::json!({"action": "metrics"}));
    assert!(
        m["metrics"]["restore"]["build_us"].as_u64().is_some(),
        "{m}"
    );
    assert!(m["metrics"]["vcpus_started_us"].as_u64().is_some(), "{m}");
    let log = r.shutdown();
    eprintln!("restored VMM's log:\n{log}");
    assert!(log.contains("restored in"), "{log}");
    let rm = std::fs::read(d("r.mem")).unwrap();
    assert_eq!(
        u64_at(&rm, COUNT_AT + 8),
        1,
        "the restored guest did not restart"
    );
    assert!(
        u64_at(&rm, COUNT_AT) > count1,
        "the restored guest counted on"
    );
    assert!(rbx_of(&d("r.state")) > rbx1);
    // The memory file was mapped privately: restoring did not change it.
    assert!(std::fs::read(d("full1.mem")).unwrap() == mem1);

    // The diff restored on its merged base runs on from the diff's moment.
    let mut r = Vm::spawn(
        &[
            "--restore",
            d("diff.state").to_str().unwrap(),
            "--mem",
            d("merged.mem").to_str().unwrap(),
        ],
        &d("c.sock"),
    );
    std::thread::sleep(Duration::from_millis(100));
    r.ok(serde_json::json!({"action": "pause"}));
    r.snapshot(&d("r2.state"), &d("r2.mem"), "full");
    r.shutdown();
    let rm = std::fs::read(d("r2.mem")).unwrap();
    assert!(u64_at(&rm, COUNT_AT) > count2);
    assert_eq!(u64_at(&rm, COUNT_AT + 8), 1);
}

#[test]
fn corrupt_truncated_and_mismatched_snapshots_are_refused() {
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
    vm.ok(serde_json::json!({"action": "pause"}));
    vm.snapshot(&d("s"), &d("m"), "full");
    let a = vm.ask(serde_json::json!({"action": "snapshot", "state_path": d("s2"), "mem_path": d("m2"), "kind": "diff"}));
    assert!(
        a["error"].as_str().unwrap().contains("dirty page tracking"),
        "{a}"
    );
    vm.shutdown();
    let good = std::fs::read(d("s")).unwrap();

    let restore = |state: &Path, mem: &Path| -> (Option<i32>, String) {
        let out = Command::new(vmm_bin())
            .arg("--restore")
            .arg(state)
            .arg("--mem")
            .arg(mem)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let mut corrupt = good.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 1;
    std::fs::write(d("corrupt"), &corrupt).unwrap();
    std::fs::write(d("short"), &good[..good.len() / 3]).unwrap();
    let mut old = good.clone();
    old[8..12].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(d("old"), &old).unwrap();
    std::fs::write(d("small.mem"), vec![0u8; 1 << 20]).unwrap();
    for (state, mem, needle) in [
        (d("corrupt"), d("m"), "checksum mismatch"),
        (d("short"), d("m"), "is truncated"),
        (d("old"), d("m"), "has format version 99"),
        (
            d("s"),
            d("small.mem"),
            "but the snapshot's guest memory is 33554432 bytes",
        ),
        (d("s"), d("nothing.mem"), "is missing"),
    ] {
        let (code, stderr) = restore(&state, &mem);
        assert_eq!(code, Some(2), "{stderr}");
        assert!(stderr.contains(needle), "{needle}: {stderr}");
    }
    // And the good one restores.
    let r = Vm::spawn(
        &[
            "--restore",
            d("s").to_str().unwrap(),
            "--mem",
            d("m").to_str().unwrap(),
        ],
        &d("b.sock"),
    );
    r.shutdown();
}
