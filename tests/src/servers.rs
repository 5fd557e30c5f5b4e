//! Helper servers for the image-cache tests: memcached instances (Debian's `memcached`) and
//! an S3-compatible store (`moto_server` from PyPI `moto[server]`), each on a free loopback
//! port and killed on drop. A missing binary fails the test with what to install.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn wait_for_port(port: u16, child: &mut Child, what: &str) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{what} exited before listening on {port}: {st}");
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {port} in 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A memcached on 127.0.0.1.
pub struct Memcached {
    child: Option<Child>,
    pub port: u16,
}

impl Memcached {
    pub fn start() -> Memcached {
        let bin = find_in_path("memcached").unwrap_or_else(|| {
            panic!(
                "\n\n*** memcached is not installed: `apt-get install memcached` \
                 (scripts/lib.sh installs it) ***\n"
            )
        });
        let port = free_port();
        let mut cmd = Command::new(bin);
        cmd.args([
            "-l",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "0",
            "-m",
            "64",
        ]);
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            // memcached refuses to run as root without naming a user.
            cmd.args(["-u", "root"]);
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn memcached");
        wait_for_port(port, &mut child, "memcached");
        Memcached {
            child: Some(child),
            port,
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills it (the node-down case).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sets `key` to `value` with the text protocol (to plant a bad chunk).
    pub fn set_raw(&self, key: &str, value: &[u8]) {
        use std::io::{Read, Write};
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect memcached");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut req = format!("set {key} 0 0 {}\r\n", value.len()).into_bytes();
        req.extend_from_slice(value);
        req.extend_from_slice(b"\r\n");
        s.write_all(&req).unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        assert!(
            buf[..n].starts_with(b"STORED"),
            "memcached: {:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    }

    /// Whether `key` is set.
    pub fn has(&self, key: &str) -> bool {
        use std::io::{Read, Write};
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect memcached");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(format!("mg {key}\r\n").as_bytes()).unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        buf[..n].starts_with(b"HD")
    }
}

impl Drop for Memcached {
    fn drop(&mut self) {
        self.stop();
    }
}

/// moto's S3-compatible server on 127.0.0.1.
pub struct Moto {
    child: Child,
    pub endpoint: String,
}

fn moto_bin() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/moto_server");
    if venv.is_file() {
        return venv;
    }
    find_in_path("moto_server").unwrap_or_else(|| {
        panic!(
            "\n\n*** moto_server is not installed: `.venv/bin/pip install 'moto[server]'` \
             (scripts/test does it from scripts/requirements-test.txt) ***\n"
        )
    })
}

impl Moto {
    pub fn start() -> Moto {
        let port = free_port();
        let mut child = Command::new(moto_bin())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn moto_server");
        wait_for_port(port, &mut child, "moto_server");
        Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Creates a bucket (moto takes unsigned requests).
    pub fn create_bucket(&self, bucket: &str) {
        let r = reqwest::blocking::Client::new()
            .put(format!("{}/{bucket}", self.endpoint))
            .send()
            .expect("create bucket");
        assert!(r.status().is_success(), "create bucket: {}", r.status());
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
