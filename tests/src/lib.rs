//! Helpers for the integration tests in `tests/tests/`: start a real `kindling serve` on a
//! free port with its own data dir, build function zips, and call Lambda's API.

pub mod servers;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

/// The workspace's target directory (honours `CARGO_TARGET_DIR`).
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
    }
}

/// A binary built from this workspace (`kindling`, `echo-rust`), from `target/debug`.
pub fn workspace_bin(name: &str) -> PathBuf {
    let var = format!("KINDLING_TEST_{}", name.to_uppercase().replace('-', "_"));
    if let Some(p) = std::env::var_os(var) {
        return PathBuf::from(p);
    }
    let p = target_dir().join("debug").join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the workspace first (`cargo build --workspace`)",
        p.display()
    );
    p
}

/// Whether this host's /dev/kvm can run VMs; when not, says loudly that `what` is skipped.
pub fn have_kvm(what: &str) -> bool {
    match vmm::host::kvm_usable() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("SKIPPED {what}: /dev/kvm is not usable here ({e})");
            false
        }
    }
}

/// A static binary of this workspace for microVM guests (built on first use into
/// `target/static`, then cached).
pub fn static_bin(package: &str, bin: &str) -> PathBuf {
    rootfs::static_bin::build(package, bin).unwrap_or_else(|e| panic!("static {bin}: {e}"))
}

/// An agent on the microvm backend with the workspace's static guest-init and an init limit
/// of 120 s (the agent raises it further where the host emulates guest kernel code).
pub fn microvm_agent() -> Agent {
    microvm_agent_with(&[])
}

/// [`microvm_agent`] with more `kindling serve` arguments.
pub fn microvm_agent_with(more: &[&str]) -> Agent {
    let guest_init = static_bin("guest-init", "guest-init");
    let mut extra_args: Vec<String> = vec![
        "--backend".into(),
        "microvm".into(),
        "--guest-init".into(),
        guest_init.display().to_string(),
        "--init-timeout".into(),
        "120".into(),
    ];
    extra_args.extend(more.iter().map(|a| a.to_string()));
    Agent::start_with(AgentOptions {
        extra_args,
        ..Default::default()
    })
}

/// The Python interpreter with awslambdaric: `$KINDLING_PYTHON`, else the repo's `.venv`.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("KINDLING_PYTHON") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python")
}

/// A running agent, stopped (SIGKILL) on drop unless [`Agent::stop`] was called.
pub struct Agent {
    child: Option<Child>,
    pub url: String,
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    http: reqwest::blocking::Client,
    log_path: PathBuf,
}

#[derive(Default)]
pub struct AgentOptions {
    pub examples: bool,
    pub max_environments: Option<usize>,
    /// `--init-timeout` in seconds.
    pub init_timeout: Option<u64>,
    /// More `kindling serve` arguments.
    pub extra_args: Vec<String>,
    pub data_dir: Option<PathBuf>,
}

impl Agent {
    pub fn start() -> Agent {
        Agent::start_with(AgentOptions::default())
    }

    pub fn start_with(opts: AgentOptions) -> Agent {
        let (tmp, data_dir) = match opts.data_dir {
            Some(d) => (None, d),
            None => {
                let t = tempfile::tempdir().expect("tempdir");
                let d = t.path().join("data");
                (Some(t), d)
            }
        };
        std::fs::create_dir_all(&data_dir).expect("data dir");
        let log_path = data_dir.with_extension(format!("log-{}", std::process::id()));
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut cmd = Command::new(workspace_bin("kindling"));
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data_dir)
            .arg("--python")
            .arg(python())
            .env("KINDLING_ECHO_RUST", workspace_bin("echo-rust"))
            .env("KINDLING_LOG", "info,kindling::function=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        if !opts.examples {
            cmd.arg("--no-examples");
        }
        // The agent's default backend is the microvm one where /dev/kvm works; tests that
        // want it say `--backend microvm`, the others run on processes.
        if !opts.extra_args.iter().any(|a| a == "--backend") {
            cmd.args(["--backend", "process"]);
        }
        cmd.args(&opts.extra_args);
        if let Some(n) = opts.init_timeout {
            cmd.args(["--init-timeout", &n.to_string()]);
        }
        if let Some(n) = opts.max_environments {
            cmd.args(["--max-environments", &n.to_string()]);
        }
        let mut child = cmd.spawn().expect("spawn kindling");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let url = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(u) = line.strip_prefix("kindling: listening on ") {
                        break u.trim().to_string();
                    }
                }
                _ => {
                    let _ = child.kill();
                    panic!(
                        "kindling exited before listening; log:\n{}",
                        std::fs::read_to_string(&log_path).unwrap_or_default()
                    );
                }
            }
        };
        // Keep draining stdout so the agent never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Agent {
            child: Some(child),
            url,
            data_dir,
            _tmp: tmp,
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .expect("http client"),
            log_path,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Invokes the echo function `function` with `{"n": 0}` .. `{"n": count - 1}`, checks that
    /// each comes back (status 200, echoed event), and returns their request ids.
    pub fn invoke_echoes(&self, function: &str, count: usize) -> Vec<String> {
        (0..count)
            .map(|n| {
                let r = self.invoke(function, json!({ "n": n }).to_string().as_bytes());
                assert_eq!(r.status, 200, "{}; log:\n{}", r.text(), self.log());
                assert_eq!(r.json()["echo"], json!({ "n": n }), "log:\n{}", self.log());
                r.header("x-amzn-requestid")
                    .expect("x-amzn-requestid")
                    .to_string()
            })
            .collect()
    }

    /// Waits up to `limit` until `function`'s log file has every one of `lines` (extensions
    /// write concurrently with the invocation: their lines may land after its END); returns
    /// the log.
    pub fn wait_log_lines(&self, function: &str, lines: &[String], limit: Duration) -> String {
        let path = self.data_dir.join(format!("logs/{function}.log"));
        let deadline = std::time::Instant::now() + limit;
        loop {
            let log = std::fs::read_to_string(&path).unwrap_or_default();
            if lines.iter().all(|l| log.contains(l.as_str())) {
                return log;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "missing some of {lines:?} in:\n{log}\nagent log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Sends SIGINT (Ctrl-C) and waits for the agent to exit.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("agent already stopped");
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGINT);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "kindling did not stop within 20 s of SIGINT; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the agent without waiting.
    pub fn signal(&self, signal: i32) {
        if let Some(c) = &self.child {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe {
                libc::kill(c.id() as i32, signal);
            }
        }
    }

    /// Waits up to `timeout` for the agent to exit (after [`Agent::signal`]); panics with its
    /// log if it does not.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("agent already stopped");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "kindling did not exit within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn create(&self, body: &Value) -> Response {
        let res = self
            .http
            .post(format!("{}/2015-03-31/functions", self.url))
            .json(body)
            .send()
            .expect("create request");
        Response::from(res)
    }

    /// Creates a function and panics with the agent's answer if that fails.
    pub fn create_ok(&self, name: &str, runtime: &str, handler: &str, zip: &[u8], extra: Value) {
        let mut body = json!({
            "FunctionName": name, "Runtime": runtime, "Handler": handler,
            "Code": {"ZipFile": base64::engine::general_purpose::STANDARD.encode(zip)},
        });
        if let (Some(b), Value::Object(e)) = (body.as_object_mut(), extra) {
            b.extend(e);
        }
        let r = self.create(&body);
        assert_eq!(r.status, 201, "create {name}: {}", r.text());
    }

    pub fn invoke(&self, name: &str, payload: &[u8]) -> Response {
        self.invoke_with(name, payload, &[])
    }

    pub fn invoke_with(&self, name: &str, payload: &[u8], headers: &[(&str, &str)]) -> Response {
        let mut req = self
            .http
            .post(format!(
                "{}/2015-03-31/functions/{name}/invocations",
                self.url
            ))
            .body(payload.to_vec());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = req.send().unwrap_or_else(|e| {
            // The agent's side of a lost request is what explains it.
            let log = self.log();
            let tail = &log[log.len().saturating_sub(6000)..];
            panic!("invoke request: {e}; agent log (tail):\n{tail}")
        });
        Response::from(res)
    }

    pub fn get(&self, path: &str) -> Response {
        Response::from(
            self.http
                .get(format!("{}{path}", self.url))
                .send()
                .expect("get request"),
        )
    }

    /// Any request to the agent: `method` (GET, PUT, POST, DELETE, ...) on `path`, with an
    /// optional JSON body.
    pub fn send(&self, method: &str, path: &str, body: Option<&Value>) -> Response {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("HTTP method");
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(b) = body {
            req = req.json(b);
        }
        Response::from(req.send().expect("request"))
    }

    pub fn delete(&self, name: &str) -> Response {
        Response::from(
            self.http
                .delete(format!("{}/2015-03-31/functions/{name}", self.url))
                .send()
                .expect("delete request"),
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // KINDLING_TEST_KEEP=1 keeps the data dir of a failed test (VM logs, snapshots, the
        // function logs) and says where it is.
        if std::thread::panicking() && std::env::var_os("KINDLING_TEST_KEEP").is_some() {
            if let Some(t) = self._tmp.take() {
                eprintln!(
                    "KINDLING_TEST_KEEP: kept {} (agent log {})",
                    t.keep().display(),
                    self.log_path.display()
                );
            }
        }
    }
}

/// A response read fully.
pub struct Response {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl From<reqwest::blocking::Response> for Response {
    fn from(mut r: reqwest::blocking::Response) -> Self {
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let mut body = Vec::new();
        r.read_to_end(&mut body).expect("read body");
        Response {
            status,
            headers,
            body,
        }
    }
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Builds a zip from `(name, contents, unix mode)` entries.
pub fn zip(entries: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    let mut w = zip::ZipWriter::new(&mut buf);
    for (name, data, mode) in entries {
        w.start_file(
            *name,
            zip::write::SimpleFileOptions::default().unix_permissions(*mode),
        )
        .expect("zip entry");
        w.write_all(data).expect("zip write");
    }
    w.finish().expect("zip finish");
    buf.into_inner()
}

/// A `provided.al2023` shell bootstrap: the Runtime API loop in sh + curl, with `handle`
/// (shell code reading the event from `$EVENT` and the request id from `$RID`) answering each
/// invocation; `handle` posts the response itself.
pub fn shell_bootstrap(handle: &str) -> Vec<u8> {
    let script = format!(
        r#"#!/bin/sh
set -u
API="http://$AWS_LAMBDA_RUNTIME_API/2018-06-01/runtime"
HDRS="$TMPDIR/headers"
respond() {{ curl -sf -X POST "$API/invocation/$RID/response" -d "$1" >/dev/null; }}
while true; do
  EVENT=$(curl -sf -D "$HDRS" "$API/invocation/next") || exit 3
  RID=$(grep -i '^lambda-runtime-aws-request-id:' "$HDRS" | cut -d' ' -f2 | tr -d '\r')
  {handle}
done
"#
    );
    zip(&[("bootstrap", script.as_bytes(), 0o755)])
}

/// Whether process `pid` is running. A zombie (exited, not yet reaped by init in a
/// container) counts as gone.
pub fn process_alive(pid: i64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// One entry of an image layer made by [`oci_layout`].
pub enum LayerEntry<'a> {
    /// A regular file: path (relative, no leading `/`), contents, mode.
    File(&'a str, &'a [u8], u32),
    /// A whiteout: deletes `path` of the layers below (`dir/.wh.name`).
    Whiteout(&'a str),
}

/// Writes an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/...`) to `dir`: one
/// uncompressed tar layer per element of `layers`, in order, and `config` as the image
/// config's `config` object (Entrypoint, Cmd, Env, WorkingDir). What `skopeo copy` or
/// `docker buildx --output type=oci` would produce, without needing either.
pub fn oci_layout(dir: &Path, layers: &[Vec<LayerEntry<'_>>], config: Value) {
    use sha2::{Digest, Sha256};
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| -> (String, usize) {
        let hex = format!("{:x}", Sha256::digest(bytes));
        std::fs::write(blobs.join(&hex), bytes).unwrap();
        (format!("sha256:{hex}"), bytes.len())
    };
    let mut layer_descs = Vec::new();
    let mut diff_ids = Vec::new();
    for layer in layers {
        let mut b = tar::Builder::new(Vec::new());
        for entry in layer {
            let (path, data, mode): (String, &[u8], u32) = match entry {
                LayerEntry::File(p, d, m) => (p.to_string(), d, *m),
                LayerEntry::Whiteout(p) => {
                    let (parent, name) = p.rsplit_once('/').unwrap_or(("", p));
                    let wh = if parent.is_empty() {
                        format!(".wh.{name}")
                    } else {
                        format!("{parent}/.wh.{name}")
                    };
                    (wh, &[][..], 0o644)
                }
            };
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(mode);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_cksum();
            b.append_data(&mut h, &path, data).unwrap();
        }
        let bytes = b.into_inner().unwrap();
        let (digest, size) = put(&bytes);
        diff_ids.push(digest.clone());
        layer_descs.push(json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": digest, "size": size,
        }));
    }
    let cfg = json!({
        "architecture": "amd64", "os": "linux", "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let (cfg_digest, cfg_size) = put(cfg.to_string().as_bytes());
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": cfg_digest, "size": cfg_size},
        "layers": layer_descs,
    });
    let (m_digest, m_size) = put(manifest.to_string().as_bytes());
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": m_digest, "size": m_size,
                       "platform": {"architecture": "amd64", "os": "linux"}}],
    });
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
}
