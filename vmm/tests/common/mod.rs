//! What the VMM's integration tests share: the binary, the KVM check, hand-assembled guests,
//! and a VMM process driven over its control socket.
// Each test crate uses a part of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn vmm_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kindling-vmm"))
}

pub fn have_kvm() -> bool {
    match vmm::host::kvm_usable() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("SKIPPED: /dev/kvm is not usable here ({e}); these tests need KVM");
            false
        }
    }
}

/// Assembles `asm` (AT&T syntax, 64-bit) into an ELF loaded at 16 MiB.
pub fn guest_elf(dir: &Path, name: &str, asm: &str) -> PathBuf {
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

pub fn wait_with_timeout(mut child: std::process::Child, limit: Duration) -> Output {
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

/// A VMM process with a control socket.
pub struct Vm {
    pub child: std::process::Child,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Vm {
    pub fn spawn(args: &[&str], sock: &Path) -> Vm {
        let child = Command::new(vmm_bin())
            .args(args)
            .arg("--api-sock")
            .arg(sock)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(_) if start.elapsed() < Duration::from_secs(20) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("control socket never appeared: {e}"),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Vm {
            child,
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        }
    }

    pub fn ask(&mut self, req: Value) -> Value {
        self.writer.write_all(req.to_string().as_bytes()).unwrap();
        self.writer.write_all(b"\n").unwrap();
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    pub fn ok(&mut self, req: Value) -> Value {
        let a = self.ask(req.clone());
        assert_eq!(a["ok"], true, "{req} -> {a}");
        a
    }

    pub fn snapshot(&mut self, state: &Path, mem: &Path, kind: &str) -> Value {
        self.ok(serde_json::json!({
            "action": "snapshot", "state_path": state, "mem_path": mem, "kind": kind,
        }))
    }

    pub fn shutdown(mut self) -> String {
        self.ok(serde_json::json!({"action": "shutdown"}));
        let out = wait_with_timeout(self.child, Duration::from_secs(10));
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        stderr
    }
}
