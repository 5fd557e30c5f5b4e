//! Boots our real guest kernel (built by `rootfs`, cached under ~/.cache/kindling) with the
//! static test init as /init, and checks each device end to end: the boot timer, a block
//! device read, vsock in both directions (guest -> host `<uds>_1234`, host `CONNECT 5000` ->
//! guest echo), and the i8042 power-off that makes the VMM exit 0.
//!
//! Slow on an emulating host (guest kernel code runs ~1000x slower: ~10-25 s per boot), so
//! one boot covers everything.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

fn have_kvm() -> bool {
    match vmm::host::kvm_usable() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("SKIPPED: /dev/kvm is not usable here ({e}); this test needs KVM");
            false
        }
    }
}

fn kernel() -> PathBuf {
    rootfs::ensure_kernel(rootfs::KernelOptions::default())
        .expect("guest kernel (rootfs::ensure_kernel)")
}

#[test]
fn linux_boots_and_uses_block_vsock_and_powers_off() {
    if !have_kvm() {
        return;
    }
    let vmlinux = kernel();
    let init = rootfs::build_test_init().expect("static guest-test-init");
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("init.cpio");
    rootfs::test_initramfs(&init, &initrd).unwrap();

    // A disk with known contents; the guest reports the SHA-256 of its first 4 KiB.
    let disk = dir.path().join("disk.img");
    let contents: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&disk, &contents).unwrap();
    let want_sha: String = Sha256::digest(&contents[..4096])
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();

    // Guest -> host: the guest connects to CID 2 port 1234, i.e. `<uds>_1234` here.
    let uds = dir.path().join("v.sock");
    let out_listener = UnixListener::bind(format!("{}_1234", uds.display())).unwrap();
    let (hello_tx, hello_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut c, _) = out_listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(c.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        c.write_all(b"hello from host\n").unwrap();
        let _ = hello_tx.send(line);
        std::thread::sleep(Duration::from_millis(500));
    });

    let serial = dir.path().join("serial.log");
    let metrics = dir.path().join("metrics.json");
    let cfg = serde_json::json!({
        "kernel": vmlinux,
        "initrd": initrd,
        "cmdline": "reboot=k panic=1 nomodule i8042.noaux i8042.nomux i8042.dumbkbd swiotlb=noforce \
                    console=ttyS0 kindling.timeout=120",
        "vcpus": 1,
        "mem_mib": 128,
        "block": [{"path": disk, "read_only": true, "serial": "test-disk"}],
        "vsock": {"guest_cid": 3, "uds_path": uds},
        "serial": {"file": serial},
    });
    let mut child = Command::new(env!("CARGO_BIN_EXE_kindling-vmm"))
        .args(["--config", "-", "--metrics-file", metrics.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(cfg.to_string().as_bytes())
        .unwrap();
    let start = Instant::now();
    let limit = Duration::from_secs(300);
    let log = || std::fs::read_to_string(&serial).unwrap_or_default();

    // Host -> guest: once the guest listens on port 5000, CONNECT and have lines echoed.
    let echoed = loop {
        assert!(
            start.elapsed() < limit,
            "guest never listened on vsock 5000; serial:\n{}",
            log()
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("VMM exited early ({status}); serial:\n{}", log());
        }
        if log().contains("vsock listening on port 5000") {
            let mut s = UnixStream::connect(&uds).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
            s.write_all(b"CONNECT 5000\n").unwrap();
            let mut ok = Vec::new();
            let mut byte = [0u8];
            while !ok.ends_with(b"\n") {
                s.read_exact(&mut byte).unwrap();
                ok.push(byte[0]);
            }
            let ok = String::from_utf8(ok).unwrap();
            assert!(ok.starts_with("OK "), "handshake answer {ok:?}");
            let payload: Vec<u8> = (0..300)
                .flat_map(|i| format!("line {i} {}\n", "x".repeat(i * 7 % 500)).into_bytes())
                .collect();
            let mut reader = s.try_clone().unwrap();
            let expected = payload.len();
            let r = std::thread::spawn(move || {
                let mut got = Vec::new();
                let _ = reader.read_to_end(&mut got);
                got
            });
            s.write_all(&payload).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let got = r.join().unwrap();
            assert_eq!(got.len(), expected);
            break got == payload;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(echoed, "the guest echoed different bytes");

    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("VMM did not exit; serial:\n{}", log());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let serial_log = log();
    assert_eq!(
        status.code(),
        Some(0),
        "VMM failed:\n{stderr}\nserial:\n{serial_log}"
    );
    assert!(serial_log.contains("] result ok"), "{serial_log}");
    assert!(
        serial_log.contains(&format!("first 4096 bytes sha256={want_sha}")),
        "block contents differ:\n{serial_log}"
    );
    let hello = hello_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("guest never connected out");
    assert_eq!(hello.trim(), format!("hello from guest {want_sha}"));
    assert!(
        serial_log.contains("vsock reply: hello from host"),
        "{serial_log}"
    );
    assert!(stderr.contains("reset through the i8042"), "{stderr}");

    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&metrics).unwrap()).unwrap();
    let boot_us = m["boot"]["wall_us"].as_u64().expect("the boot timer fired");
    eprintln!(
        "boot to init: {:.1} ms wall, {:.1} ms VMM CPU; VMM overhead {:.1} MiB; host KVM {}",
        boot_us as f64 / 1e3,
        m["boot"]["vmm_cpu_us"].as_u64().unwrap_or(0) as f64 / 1e3,
        m["memory"]["vmm_overhead_bytes"].as_u64().unwrap_or(0) as f64 / 1048576.0,
        m["host_kvm"]["kind"]
    );
}
