//! `guest-test-init`: PID 1 of the VM integration tests' guest (see `rootfs::test_initramfs`).
//!
//! In order: mount devtmpfs (unless mounted), proc and sysfs; write 123 to the VMM's boot timer
//! through /dev/mem; read the first 4 KiB of the block device and print its SHA-256; connect
//! over vsock to the host (CID 2), send `hello from guest <sha>` and print the reply line;
//! listen on a vsock port, accept one connection and echo everything back until EOF; then
//! restart the machine (`reboot=k` on the command line turns that into the i8042 reset the
//! VMM ends on). Every step prints `kindling-test-init: ...` lines on the console, and the
//! last line before the reset is `kindling-test-init: result ok` or
//! `kindling-test-init: result FAILED: <steps>`.
//!
//! Kernel command-line parameters (read from /proc/cmdline):
//! - `kindling.test=all` (default) | `boot-only` | a comma list of `block`, `vsock-out`,
//!   `vsock-in`
//! - `kindling.boot_timer=0xC0000000`: the boot timer's guest physical address
//! - `kindling.block=/dev/vda`: the device whose first 4 KiB are hashed
//! - `kindling.vsock_port=1234`: the host port `vsock-out` connects to
//! - `kindling.listen_port=5000`: the guest port `vsock-in` listens on
//! - `kindling.timeout=120`: seconds any one network wait may take
//!
//! Run as anything but PID 1 (e.g. on the host) it exits instead of resetting the machine.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

const PREFIX: &str = "kindling-test-init:";
const BOOT_TIMER_VALUE: u8 = 123;
const VMADDR_CID_HOST: u32 = 2;
const VMADDR_CID_ANY: u32 = u32::MAX;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Config {
    block: bool,
    vsock_out: bool,
    vsock_in: bool,
    boot_timer: u64,
    block_dev: String,
    vsock_port: u32,
    listen_port: u32,
    timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            block: true,
            vsock_out: true,
            vsock_in: true,
            boot_timer: 0xC000_0000,
            block_dev: "/dev/vda".into(),
            vsock_port: 1234,
            listen_port: 5000,
            timeout: Duration::from_secs(120),
        }
    }
}

fn parse_num(v: &str) -> Option<u64> {
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16).ok(),
        None => v.replace('_', "").parse().ok(),
    }
}

fn parse_cmdline(cmdline: &str) -> Result<Config, String> {
    let mut c = Config::default();
    for word in cmdline.split_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        let num = || parse_num(value).ok_or_else(|| format!("bad number in {word}"));
        let port = || {
            num().and_then(|n| u32::try_from(n).map_err(|_| format!("port out of range: {word}")))
        };
        match key {
            "kindling.test" => {
                c.block = false;
                c.vsock_out = false;
                c.vsock_in = false;
                for step in value.split(',') {
                    match step {
                        "all" => (c.block, c.vsock_out, c.vsock_in) = (true, true, true),
                        "boot-only" => {}
                        "block" => c.block = true,
                        "vsock-out" => c.vsock_out = true,
                        "vsock-in" => c.vsock_in = true,
                        other => return Err(format!("unknown kindling.test step {other:?}")),
                    }
                }
            }
            "kindling.boot_timer" => c.boot_timer = num()?,
            "kindling.block" => c.block_dev = value.to_string(),
            "kindling.vsock_port" => c.vsock_port = port()?,
            "kindling.listen_port" => c.listen_port = port()?,
            "kindling.timeout" => c.timeout = Duration::from_secs(num()?.max(1)),
            _ => {}
        }
    }
    Ok(c)
}

fn say(msg: impl std::fmt::Display) {
    let uptime = fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{PREFIX} [{uptime}] {msg}");
    let _ = out.flush();
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL in a literal path")
}

fn mount(source: &str, target: &str, fstype: &str) -> io::Result<()> {
    let _ = fs::create_dir_all(target);
    let (src, tgt, ty) = (cstr(source), cstr(target), cstr(fstype));
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call; no data.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            ty.as_ptr(),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn is_mounted(target: &str) -> bool {
    fs::read_to_string("/proc/mounts")
        .map(|m| {
            m.lines()
                .any(|l| l.split_whitespace().nth(1) == Some(target))
        })
        .unwrap_or(false)
}

/// Mounts /proc, /dev (devtmpfs) and /sys, and makes sure fds 0-2 are the console.
fn setup() {
    if !is_mounted("/proc") {
        if let Err(e) = mount("proc", "/proc", "proc") {
            say(format!("mount proc: {e}"));
        }
    }
    if !is_mounted("/dev") {
        if let Err(e) = mount("devtmpfs", "/dev", "devtmpfs") {
            say(format!("mount devtmpfs: {e}"));
        }
    }
    if !is_mounted("/sys") {
        if let Err(e) = mount("sysfs", "/sys", "sysfs") {
            say(format!("mount sysfs: {e}"));
        }
    }
    // SAFETY: F_GETFD only queries the descriptor table.
    let stdout_ok = unsafe { libc::fcntl(1, libc::F_GETFD) } != -1;
    if !stdout_ok {
        // The kernel found no /dev/console in the initramfs; devtmpfs has one.
        if let Ok(console) = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/console")
        {
            for fd in 0..3 {
                // SAFETY: dup2 onto the standard descriptors; `console` stays open meanwhile.
                unsafe { libc::dup2(console.as_raw_fd(), fd) };
            }
        }
    }
}

/// Writes the boot-timer byte with a single user-mode store through a /dev/mem mapping
/// (falling back to pwrite on /dev/mem when the mapping is refused).
fn write_boot_timer(addr: u64) -> io::Result<&'static str> {
    let mem = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_SYNC)
        .open("/dev/mem")?;
    let page: u64 = 4096;
    let base = addr & !(page - 1);
    let offset = (addr - base) as usize;
    let off = libc::off_t::try_from(base)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "address out of range"))?;
    // SAFETY: a fresh shared mapping of one page of /dev/mem; the result is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            page as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            mem.as_raw_fd(),
            off,
        )
    };
    if p == libc::MAP_FAILED {
        mem.write_all_at(&[BOOT_TIMER_VALUE], addr)?;
        return Ok("pwrite");
    }
    // SAFETY: p is a live page-sized mapping and offset < 4096; the store is volatile because
    // it is MMIO the VMM observes. The mapping is ours alone and is unmapped right after.
    unsafe {
        std::ptr::write_volatile(p.cast::<u8>().add(offset), BOOT_TIMER_VALUE);
        libc::munmap(p, page as usize);
    }
    Ok("mmap")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn block_sha(dev: &str) -> io::Result<String> {
    let mut buf = vec![0u8; 4096];
    File::open(dev)?.read_exact(&mut buf)?;
    Ok(hex(&Sha256::digest(&buf)))
}

fn vsock_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

const VM_ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn set_timeout(fd: &OwnedFd, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: tv is a valid timeval for the duration of the call, and the length matches.
        check(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        })?;
    }
    Ok(())
}

/// Connects to the host, retrying while nobody listens yet (up to `timeout`).
fn vsock_connect(port: u32, timeout: Duration) -> io::Result<File> {
    let start = Instant::now();
    loop {
        let fd = vsock_socket()?;
        set_timeout(&fd, timeout)?;
        let addr = vsock_addr(VMADDR_CID_HOST, port);
        // SAFETY: addr is a valid sockaddr_vm and VM_ADDR_LEN is its size.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                VM_ADDR_LEN,
            )
        };
        if rc == 0 {
            return Ok(File::from(fd));
        }
        let e = io::Error::last_os_error();
        let retry = matches!(
            e.raw_os_error(),
            Some(libc::ECONNRESET | libc::ECONNREFUSED | libc::ETIMEDOUT | libc::EINTR)
        );
        if !retry || start.elapsed() >= timeout {
            return Err(e);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn read_line(f: &mut File) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match f.read(&mut byte)? {
            0 => break,
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0]),
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

fn vsock_out(c: &Config, sha: &str) -> io::Result<()> {
    let mut s = vsock_connect(c.vsock_port, c.timeout)?;
    say(format!(
        "vsock connected to host port {}, sending hello",
        c.vsock_port
    ));
    s.write_all(format!("hello from guest {sha}\n").as_bytes())?;
    let reply = read_line(&mut s)?;
    say(format!("vsock reply: {reply}"));
    Ok(())
}

fn vsock_in(c: &Config) -> io::Result<()> {
    let fd = vsock_socket()?;
    set_timeout(&fd, c.timeout)?;
    let addr = vsock_addr(VMADDR_CID_ANY, c.listen_port);
    // SAFETY: addr is a valid sockaddr_vm and VM_ADDR_LEN is its size.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            VM_ADDR_LEN,
        )
    })?;
    // SAFETY: listen(2) on a bound socket we own.
    check(unsafe { libc::listen(fd.as_raw_fd(), 1) })?;
    // The host connects once it has seen this line.
    say(format!("vsock listening on port {}", c.listen_port));
    // SAFETY: accept(2) without a peer address (both pointers null is allowed).
    let conn = check(unsafe {
        libc::accept4(
            fd.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    })?;
    // SAFETY: conn was just returned by accept4 and is owned by nobody else.
    let conn = unsafe { OwnedFd::from_raw_fd(conn) };
    set_timeout(&conn, c.timeout)?;
    let mut s = File::from(conn);
    say("vsock accepted a connection, echoing");
    let (mut bytes, mut lines) = (0usize, 0usize);
    let mut buf = [0u8; 4096];
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        s.write_all(&buf[..n])?;
        bytes += n;
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count();
    }
    say(format!("vsock echo done: {lines} lines, {bytes} bytes"));
    Ok(())
}

fn finish(failed: &[&str]) -> ! {
    if failed.is_empty() {
        say("result ok");
    } else {
        say(format!("result FAILED: {}", failed.join(", ")));
    }
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } != 1 {
        say("not PID 1: exiting instead of resetting the machine");
        std::process::exit(if failed.is_empty() { 0 } else { 1 });
    }
    say("restarting (reboot=k: i8042 reset, the VMM exits)");
    // SAFETY: sync and reboot take no pointers; reboot only returns on failure.
    unsafe {
        libc::sync();
        libc::reboot(libc::LINUX_REBOOT_CMD_RESTART);
    }
    say(format!("reboot failed: {}", io::Error::last_os_error()));
    // PID 1 exiting panics the kernel; with panic=1 that restarts it too.
    std::process::exit(1);
}

fn main() {
    say("starting");
    setup();
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let mut failed = Vec::new();
    let c = match parse_cmdline(&cmdline) {
        Ok(c) => c,
        Err(e) => {
            say(format!("bad command line: {e}"));
            failed.push("cmdline");
            Config::default()
        }
    };
    match write_boot_timer(c.boot_timer) {
        Ok(how) => say(format!(
            "boot timer written ({BOOT_TIMER_VALUE} at {:#x} via {how})",
            c.boot_timer
        )),
        Err(e) => {
            say(format!("boot timer at {:#x}: {e}", c.boot_timer));
            failed.push("boot-timer");
        }
    }
    let mut sha = "none".to_string();
    if c.block {
        match block_sha(&c.block_dev) {
            Ok(s) => {
                say(format!("block {} first 4096 bytes sha256={s}", c.block_dev));
                sha = s;
            }
            Err(e) => {
                say(format!("block {}: {e}", c.block_dev));
                failed.push("block");
            }
        }
    }
    if c.vsock_out {
        if let Err(e) = vsock_out(&c, &sha) {
            say(format!("vsock-out to host port {}: {e}", c.vsock_port));
            failed.push("vsock-out");
        }
    }
    if c.vsock_in {
        if let Err(e) = vsock_in(&c) {
            say(format!("vsock-in on port {}: {e}", c.listen_port));
            failed.push("vsock-in");
        }
    }
    finish(&failed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_run_everything() {
        let c = parse_cmdline("console=ttyS0 reboot=k panic=1").unwrap();
        assert_eq!(c, Config::default());
        assert!(c.block && c.vsock_out && c.vsock_in);
        assert_eq!(c.boot_timer, 0xC000_0000);
    }

    #[test]
    fn boot_only_and_step_lists() {
        let c = parse_cmdline("quiet kindling.test=boot-only").unwrap();
        assert!(!c.block && !c.vsock_out && !c.vsock_in);
        let c = parse_cmdline("kindling.test=block,vsock-in").unwrap();
        assert!(c.block && !c.vsock_out && c.vsock_in);
        let c = parse_cmdline("kindling.test=all").unwrap();
        assert!(c.block && c.vsock_out && c.vsock_in);
        assert!(parse_cmdline("kindling.test=bogus").is_err());
    }

    #[test]
    fn parameters() {
        let c = parse_cmdline(
            "kindling.boot_timer=0xd000_0000 kindling.block=/dev/vdb kindling.vsock_port=52 \
             kindling.listen_port=0x10 kindling.timeout=5 virtio_mmio.device=4K@0xc0001000:5",
        )
        .unwrap();
        assert_eq!(c.boot_timer, 0xD000_0000);
        assert_eq!(c.block_dev, "/dev/vdb");
        assert_eq!(c.vsock_port, 52);
        assert_eq!(c.listen_port, 16);
        assert_eq!(c.timeout, Duration::from_secs(5));
        assert!(parse_cmdline("kindling.vsock_port=x").is_err());
        assert!(parse_cmdline("kindling.listen_port=0x100000000").is_err());
    }

    #[test]
    fn vsock_address_layout() {
        let a = vsock_addr(VMADDR_CID_HOST, 1234);
        assert_eq!(a.svm_family, libc::AF_VSOCK as libc::sa_family_t);
        assert_eq!((a.svm_cid, a.svm_port), (2, 1234));
        assert_eq!(VM_ADDR_LEN, 16);
    }
}
