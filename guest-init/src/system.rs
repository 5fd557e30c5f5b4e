//! What only PID 1 does: console, mounts, boot timer, loopback, host name, power-off.
//!
//! Nothing here runs in [`crate::Mode::Process`]; the binary calls [`boot`] and
//! [`power_off`] only as PID 1.
//!
//! Kernel command-line parameters (from /proc/cmdline), all optional:
//! - `kindling.boot_timer=0xC0000000` | `off`: where to write the boot-timer byte
//! - `kindling.port=9999`: the host vsock port to connect to
//! - `kindling.connect_timeout=10`: seconds to keep trying to reach the host
//! - `kindling.hostname=localhost`: the host name until Configure sets another

use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::Duration;

use crate::proto::HOST_PORT;

/// What guest-init writes to the VMM's boot timer, as the test init does.
pub const BOOT_TIMER_VALUE: u8 = 123;

/// The boot timer's default guest physical address (`vmm/src/layout.rs`).
pub const BOOT_TIMER_ADDR: u64 = 0xC000_0000;

/// Boot parameters from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootParams {
    pub boot_timer: Option<u64>,
    pub port: u32,
    pub connect_timeout: Duration,
    pub hostname: String,
}

impl Default for BootParams {
    fn default() -> Self {
        BootParams {
            boot_timer: Some(BOOT_TIMER_ADDR),
            port: HOST_PORT,
            connect_timeout: Duration::from_secs(10),
            hostname: "localhost".into(),
        }
    }
}

fn parse_num(v: &str) -> Option<u64> {
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16).ok(),
        None => v.replace('_', "").parse().ok(),
    }
}

/// Parses `kindling.*` parameters; everything else is ignored.
pub fn parse_cmdline(cmdline: &str) -> Result<BootParams, String> {
    let mut p = BootParams::default();
    for word in cmdline.split_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        let num = || parse_num(value).ok_or_else(|| format!("bad number in {word}"));
        match key {
            "kindling.boot_timer" if value == "off" => p.boot_timer = None,
            "kindling.boot_timer" => p.boot_timer = Some(num()?),
            "kindling.port" => {
                p.port = u32::try_from(num()?).map_err(|_| format!("port out of range: {word}"))?
            }
            "kindling.connect_timeout" => p.connect_timeout = Duration::from_secs(num()?.max(1)),
            "kindling.hostname" if !value.is_empty() => p.hostname = value.to_string(),
            _ => {}
        }
    }
    Ok(p)
}

/// One line on the console. Sparingly: on an emulating host each costs ~10 ms.
pub fn say(msg: impl std::fmt::Display) {
    let mut err = io::stderr().lock();
    let _ = writeln!(err, "guest-init: {msg}");
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a string"))
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Mounts `fstype` at `target` (created if missing).
pub fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let _ = fs::create_dir_all(target);
    let (src, tgt, ty, data) = (
        cstring(source)?,
        cstring(target)?,
        cstring(fstype)?,
        cstring(data)?,
    );
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call; the
    // file systems mounted here take their options as a string.
    check(unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            ty.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    })
    .map(|_| ())
}

fn mounted_at(mounts: &str, target: &str) -> bool {
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(target))
}

/// Makes sure fds 0-2 are open (on the console when the kernel found none).
fn console_fds() {
    let open = |fd| {
        // SAFETY: F_GETFD only queries the descriptor table.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        flags != -1
    };
    if (0..3).all(open) {
        return;
    }
    let console = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
        .or_else(|_| OpenOptions::new().read(true).write(true).open("/dev/null"));
    if let Ok(console) = console {
        for fd in 0..3 {
            if !open(fd) {
                // SAFETY: dup2 onto a standard descriptor that is closed; `console` stays
                // open during the call.
                unsafe { libc::dup2(console.as_raw_fd(), fd) };
            }
        }
    }
}

/// Writes the boot-timer byte with one user-mode store through a /dev/mem mapping (or a
/// pwrite on /dev/mem when the mapping is refused).
pub fn write_boot_timer(addr: u64) -> io::Result<()> {
    let mem = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_SYNC | libc::O_CLOEXEC)
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
        return Ok(());
    }
    // SAFETY: p is a live page-sized mapping and offset < 4096; the store is volatile because
    // it is MMIO the VMM observes. The mapping is ours alone and is unmapped right after.
    unsafe {
        std::ptr::write_volatile(p.cast::<u8>().add(offset), BOOT_TIMER_VALUE);
        libc::munmap(p, page as usize);
    }
    Ok(())
}

fn socket_inet() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked.
    let fd =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq_for(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data (arrays, integers, a union of those and pointers);
    // all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = src as libc::c_char;
    }
    req
}

fn sockaddr_v4(addr: [u8; 4]) -> libc::sockaddr {
    // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sin.sin_family = libc::AF_INET as libc::sa_family_t;
    sin.sin_addr = libc::in_addr {
        s_addr: u32::from_ne_bytes(addr),
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes; the kernel reads the address
    // through the generic type, which is how the SIOCSIF* ioctls take it.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl(fd: &OwnedFd, request: libc::c_ulong, req: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: the SIOC[GS]IF* requests read and write one ifreq, which `req` is, live for
    // the call.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), request, req as *mut libc::ifreq) }).map(|_| ())
}

/// Brings up `lo` with 127.0.0.1/8 (the Runtime API listens there).
pub fn loopback_up() -> io::Result<()> {
    let fd = socket_inet()?;
    let mut req = ifreq_for("lo");
    req.ifr_ifru.ifru_addr = sockaddr_v4([127, 0, 0, 1]);
    ioctl(&fd, libc::SIOCSIFADDR, &mut req)?;
    let mut req = ifreq_for("lo");
    req.ifr_ifru.ifru_netmask = sockaddr_v4([255, 0, 0, 0]);
    ioctl(&fd, libc::SIOCSIFNETMASK, &mut req)?;
    let mut req = ifreq_for("lo");
    ioctl(&fd, libc::SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    ioctl(&fd, libc::SIOCSIFFLAGS, &mut req)
}

/// Sets the kernel's host name.
pub fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, live for the call.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(|_| ())
}

/// Sets the wall clock to `host_ms` (ms since the epoch) when it is more than a second off;
/// returns whether it was set.
pub fn sync_clock(host_ms: u64) -> io::Result<bool> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    if now_ms.abs_diff(host_ms) <= 1000 {
        return Ok(false);
    }
    let ts = libc::timespec {
        tv_sec: (host_ms / 1000) as libc::time_t,
        tv_nsec: ((host_ms % 1000) * 1_000_000) as libc::c_long,
    };
    // SAFETY: clock_settime reads one timespec, live for the call.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) })?;
    Ok(true)
}

/// Sets the system up as PID 1 and returns the boot parameters. Problems are said on the
/// console and do not stop the boot: the host learns of what matters when the runtime fails.
pub fn boot() -> BootParams {
    console_fds();
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    if let Err(e) = mount("proc", "/proc", "proc", nosuid, "") {
        if e.raw_os_error() != Some(libc::EBUSY) {
            say(format!("mount /proc: {e}"));
        }
    }
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    if !mounted_at(&mounts, "/dev") {
        if let Err(e) = mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755") {
            say(format!("mount /dev: {e}"));
        }
        console_fds();
    }
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let params = parse_cmdline(&cmdline).unwrap_or_else(|e| {
        say(format!("kernel command line: {e}; using defaults"));
        BootParams::default()
    });
    if let Some(addr) = params.boot_timer {
        if let Err(e) = write_boot_timer(addr) {
            say(format!("boot timer at {addr:#x}: {e}"));
        }
    }
    let others: [(&str, &str, &str, libc::c_ulong, &str); 3] = [
        ("sysfs", "/sys", "sysfs", nosuid, ""),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            "mode=0620,ptmxmode=0666",
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=1777,size=512m",
        ),
    ];
    for (source, target, fstype, flags, data) in others {
        if mounted_at(&mounts, target) {
            continue;
        }
        if let Err(e) = mount(source, target, fstype, flags, data) {
            // A kernel without devpts is fine: runtimes need no terminal.
            if fstype != "devpts" {
                say(format!("mount {target}: {e}"));
            }
        }
    }
    if let Err(e) = loopback_up() {
        say(format!("bringing up lo: {e}"));
    }
    if let Err(e) = set_hostname(&params.hostname) {
        say(format!("setting the host name: {e}"));
    }
    params
}

/// Ends the VM: kills every other process, syncs, and restarts the machine, which
/// `reboot=k` on the kernel command line turns into the i8042 reset the VMM ends on. If
/// that fails, exiting makes the kernel panic, which (with `panic=1`) also restarts it.
pub fn power_off() -> ! {
    // SAFETY: kill(-1) signals every process but PID 1; sync and reboot take no pointers;
    // reboot returns only on failure.
    unsafe {
        libc::kill(-1, libc::SIGKILL);
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    say(format!("reboot failed: {}", io::Error::last_os_error()));
    std::process::exit(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_defaults_and_parameters() {
        let p = parse_cmdline("console=ttyS0 reboot=k panic=1 quiet").unwrap();
        assert_eq!(p, BootParams::default());
        assert_eq!(p.port, 9999);
        let p = parse_cmdline(
            "kindling.boot_timer=0xd000_0000 kindling.port=5000 kindling.connect_timeout=3 \
             kindling.hostname=fn-1 virtio_mmio.device=4K@0xc0001000:5",
        )
        .unwrap();
        assert_eq!(p.boot_timer, Some(0xD000_0000));
        assert_eq!(p.port, 5000);
        assert_eq!(p.connect_timeout, Duration::from_secs(3));
        assert_eq!(p.hostname, "fn-1");
        assert_eq!(
            parse_cmdline("kindling.boot_timer=off").unwrap().boot_timer,
            None
        );
        assert!(parse_cmdline("kindling.port=x").is_err());
        assert!(parse_cmdline("kindling.port=0x100000000").is_err());
    }

    #[test]
    fn mount_table_lookup() {
        let m = "proc /proc proc rw 0 0\ndevtmpfs /dev devtmpfs rw 0 0\n";
        assert!(mounted_at(m, "/dev"));
        assert!(!mounted_at(m, "/tmp"));
    }

    #[test]
    fn interface_request_layout() {
        let mut req = ifreq_for("lo");
        assert_eq!(
            &req.ifr_name[..3],
            &[b'l' as libc::c_char, b'o' as libc::c_char, 0]
        );
        req.ifr_ifru.ifru_addr = sockaddr_v4([127, 0, 0, 1]);
        // SAFETY: reading back the member just written.
        let sa = unsafe { req.ifr_ifru.ifru_addr };
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        // sin_port (2 bytes) then the address, in network order.
        assert_eq!(&sa.sa_data[2..6], &[127, 0, 0, 1]);
        assert_eq!(
            std::mem::size_of::<libc::sockaddr_in>(),
            std::mem::size_of::<libc::sockaddr>()
        );
    }
}

/// The loopback and host-name code against a real kernel, in namespaces of a throwaway
/// thread (namespaces are per thread), so the machine's own are untouched. Root only.
#[cfg(test)]
mod namespace_tests {
    use super::*;

    /// Runs `f` on a new thread moved into new namespaces of `flags`; `None` when that is
    /// not allowed here (not root, or a restricted container).
    fn in_namespaces<T: Send + 'static>(
        flags: libc::c_int,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        std::thread::spawn(move || {
            // SAFETY: unshare(2) takes no pointers; it moves this thread alone, which ends
            // when the closure returns.
            if unsafe { libc::unshare(flags) } != 0 {
                eprintln!(
                    "skipped: unshare: {} (needs root)",
                    io::Error::last_os_error()
                );
                return None;
            }
            Some(f())
        })
        .join()
        .unwrap()
    }

    #[test]
    fn loopback_comes_up_in_a_fresh_network_namespace() {
        let r = in_namespaces(libc::CLONE_NEWNET, || {
            // A new namespace's lo is down: binding works, connecting does not.
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let before = std::net::TcpStream::connect(l.local_addr().unwrap()).is_ok();
            drop(l);
            loopback_up().unwrap();
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            let c = std::net::TcpStream::connect(addr).unwrap();
            drop((c, l));
            // Idempotent: guest-init may find lo already up.
            loopback_up().unwrap();
            before
        });
        if let Some(before) = r {
            assert!(!before, "lo was already usable in a new namespace");
        }
    }

    #[test]
    fn host_name_is_set_in_a_fresh_uts_namespace() {
        let r = in_namespaces(libc::CLONE_NEWUTS, || {
            set_hostname("kindling-fn").unwrap();
            let mut buf = [0u8; 65];
            // SAFETY: gethostname writes at most buf.len() bytes into buf.
            let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
            assert_eq!(rc, 0);
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            String::from_utf8_lossy(&buf[..end]).into_owned()
        });
        if let Some(name) = r {
            assert_eq!(name, "kindling-fn");
        }
    }
}
