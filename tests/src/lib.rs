//! Helpers for the integration tests in `tests/tests/`: start a real `kindling serve` on a
//! free port with its own data dir, build function zips, and call Lambda's API.

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
        Response::from(req.send().expect("invoke request"))
    }

    pub fn get(&self, path: &str) -> Response {
        Response::from(
            self.http
                .get(format!("{}{path}", self.url))
                .send()
                .expect("get request"),
        )
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
