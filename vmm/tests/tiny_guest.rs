//! The VMM end to end with tiny hand-written guests (assembled at test time with binutils):
//! the 64-bit boot path, port I/O to the serial console, the i8042 reset that ends the VM, the
//! control socket, and the report of an emulation failure. No Linux kernel needed; each test
//! takes milliseconds even on an emulating host.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn vmm_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kindling-vmm"))
}

fn have_kvm() -> bool {
    match vmm::host::kvm_usable() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("SKIPPED: /dev/kvm is not usable here ({e}); these tests need KVM");
            false
        }
    }
}

/// Assembles `asm` (AT&T syntax, 64-bit) into an ELF loaded at 16 MiB.
fn guest_elf(dir: &Path, name: &str, asm: &str) -> PathBuf {
    let src = dir.join(format!("{name}.S"));
    let obj = dir.join(format!("{name}.o"));
    let elf = dir.join(format!("{name}.elf"));
    std::fs::write(&src, format!(".code64\n.globl _start\n_start:\n{asm}\n")).unwrap();
    let ok = Command::new("as")
        .arg("-o")
        .arg(&obj)
        .arg(&src)
        .status()
        .expect("binutils `as`");
    assert!(ok.success());
    let ok = Command::new("ld")
        .args([
            "-static",
            "-nostdlib",
            "-Ttext=0x1000000",
            "-e",
            "_start",
            "-o",
        ])
        .arg(&elf)
        .arg(&obj)
        .status()
        .expect("binutils `ld`");
    assert!(ok.success());
    elf
}

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

fn wait_with_timeout(mut child: std::process::Child, limit: Duration) -> Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("kindling-vmm did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
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
