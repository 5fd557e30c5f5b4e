//! guest-init's logic as an ordinary process, no VM: the test plays the host over a Unix
//! socket pair, the runtime is a shell `bootstrap` that drives the Runtime API with curl.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use bytes::Bytes;
use guest_init::proto::{
    self, read_message_async, write_message_async, Configure, Decoder, Hello, Invoke, Log, Message,
    Ping, PrepareSnapshot, ProtoError, Restored, Role, RunAs, RuntimeKind, Shutdown, Stream,
};
use guest_init::{GuestInit, Mode, SessionEnd, SessionError};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(30);

/// A function environment on disk: the task root with its bootstrap, and a tmp dir.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    /// `prelude` runs once before the loop; `handle` for every event (`$RID` is the request
    /// id, `$EVENT` the file holding the event).
    fn shell(prelude: &str, handle: &str) -> Self {
        let script = format!(
            r#"#!/bin/sh
set -u
API="http://$AWS_LAMBDA_RUNTIME_API/2018-06-01/runtime"
HDRS="$TMPDIR/headers"
EVENT="$TMPDIR/event"
{prelude}
while true; do
  curl -sf -D "$HDRS" -o "$EVENT" "$API/invocation/next" || exit 3
  RID=$(grep -i '^lambda-runtime-aws-request-id:' "$HDRS" | cut -d' ' -f2 | tr -d '\r')
  {handle}
done
"#
        );
        let f = Self::empty();
        std::fs::write(f.task().join("bootstrap"), script).unwrap();
        std::fs::set_permissions(
            f.task().join("bootstrap"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        f
    }

    fn empty() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("task")).unwrap();
        std::fs::create_dir(dir.path().join("tmp")).unwrap();
        Fixture { dir }
    }

    fn task(&self) -> std::path::PathBuf {
        self.dir.path().join("task")
    }

    fn tmp(&self) -> std::path::PathBuf {
        self.dir.path().join("tmp")
    }

    fn configure(&self) -> Configure {
        let mut cfg = Configure {
            function_name: "test-fn".into(),
            function_version: "$LATEST".into(),
            handler: "handler".into(),
            memory_mb: 128,
            timeout_ms: 3000,
            region: "us-east-1".into(),
            runtime: RuntimeKind::Provided,
            task_root: self.task().display().to_string(),
            environment: BTreeMap::new(),
            init_timeout_ms: 20_000,
            run_as: None,
            hostname: None,
            host_time_ms: None,
            entropy_hex: None,
        };
        cfg.environment =
            guest_init::env::lambda_variables(&cfg, &self.tmp().display().to_string(), "s");
        cfg.environment.insert("MY_VAR".into(), "from-user".into());
        cfg
    }
}

const ECHO: &str = r#"curl -sf -X POST --data-binary @"$EVENT" -H 'Content-Type: application/octet-stream' "$API/invocation/$RID/response" >/dev/null"#;

/// The test's side of the connection.
struct Host {
    stream: UnixStream,
    dec: Decoder,
    /// Every message received, Logs included, in order.
    seen: Vec<Message>,
}

impl Host {
    async fn send(&mut self, m: Message) {
        write_message_async(&mut self.stream, &m).await.unwrap();
    }

    /// The next message that is not a Log.
    async fn recv(&mut self) -> Message {
        loop {
            let m = self.recv_any().await.unwrap();
            if !matches!(m, Message::Log(_)) {
                return m;
            }
        }
    }

    async fn recv_any(&mut self) -> Result<Message, ProtoError> {
        let m = tokio::time::timeout(WAIT, read_message_async(&mut self.stream, &mut self.dec))
            .await
            .expect("guest-init said nothing for 30 s")?;
        self.seen.push(m.clone());
        Ok(m)
    }

    /// Reads until the guest closes the connection.
    async fn drain(&mut self) {
        while self.recv_any().await.is_ok() {}
    }

    async fn handshake(&mut self) {
        let hello = self.recv().await;
        proto::expect_hello(hello, Role::Guest).unwrap();
        self.send(Message::Hello(Hello::new(Role::Host))).await;
    }

    fn logs(&self, stream: Stream) -> Vec<String> {
        self.seen
            .iter()
            .filter_map(|m| match m {
                Message::Log(l) if l.stream == stream => {
                    Some(String::from_utf8_lossy(&l.line).into_owned())
                }
                _ => None,
            })
            .collect()
    }
}

type Session = JoinHandle<Result<SessionEnd, SessionError>>;

fn start_with(init: GuestInit) -> (Host, Session) {
    let (host, guest) = UnixStream::pair().unwrap();
    let session = tokio::spawn(async move { init.run_session(guest).await });
    let host = Host {
        stream: host,
        dec: Decoder::new(),
        seen: Vec::new(),
    };
    (host, session)
}

fn start() -> (Host, Session) {
    let any_port: SocketAddr = "127.0.0.1:0".parse().unwrap();
    start_with(GuestInit::new(Mode::Process).with_api_addr(any_port))
}

/// Handshake, Configure, and the Ready that follows.
async fn start_ready(f: &Fixture) -> (Host, Session) {
    let (mut host, session) = start();
    host.handshake().await;
    host.send(Message::Configure(Box::new(f.configure()))).await;
    match host.recv().await {
        Message::Ready(r) => assert!(r.init_duration_us > 0),
        other => panic!("expected Ready, got {other:?}"),
    }
    (host, session)
}

fn invoke(request_id: &str, payload: impl Into<Bytes>) -> Message {
    Message::Invoke(Box::new(Invoke {
        request_id: request_id.into(),
        invocation_id: format!("inv-{request_id}"),
        deadline_ms: 4_000_000_000_000,
        function_arn: "arn:aws:lambda:us-east-1:000000000000:function:test-fn".into(),
        trace_id: Some("Root=1-00000000-000000000000000000000000".into()),
        client_context: None,
        cognito_identity: None,
        tenant_id: None,
        content_type: "application/json".into(),
        stream: false,
        payload: payload.into(),
    }))
}

async fn shutdown(mut host: Host, session: Session) -> Host {
    host.send(Message::Shutdown(Shutdown {
        reason: "spindown".into(),
        grace_ms: 2000,
    }))
    .await;
    host.drain().await;
    let end = tokio::time::timeout(WAIT, session)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(end.reason, "spindown");
    host
}

#[tokio::test]
async fn invocations_carry_raw_bytes_both_ways() {
    let f = Fixture::shell(
        r#"echo "init: $MY_VAR $AWS_LAMBDA_FUNCTION_NAME"; echo "to stderr" >&2"#,
        ECHO,
    );
    let (mut host, session) = start_ready(&f).await;
    host.send(Message::Ping(Ping { seq: 41 })).await;
    assert!(matches!(host.recv().await, Message::Pong(p) if p.seq == 41));
    // Every byte value, newlines and NULs included: no base64 anywhere.
    let event: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    for id in ["req-1", "req-2"] {
        host.send(invoke(id, event.clone())).await;
        match host.recv().await {
            Message::Response(r) => {
                assert_eq!(r.request_id, id);
                assert_eq!(r.content_type.as_deref(), Some("application/octet-stream"));
                assert_eq!(r.payload.len(), event.len());
                assert!(r.payload == event);
            }
            other => panic!("expected a Response, got {other:?}"),
        }
    }
    let host = shutdown(host, session).await;
    assert!(host
        .logs(Stream::Stdout)
        .contains(&"init: from-user test-fn".to_string()));
    assert!(host.logs(Stream::Stderr).contains(&"to stderr".to_string()));
}

#[tokio::test]
async fn function_error_is_reported_with_its_type_and_body() {
    let f = Fixture::shell(
        "",
        r#"curl -sf -X POST -H 'Lambda-Runtime-Function-Error-Type: Function.MyError' -d '{"errorMessage":"boom","errorType":"MyError","errorCause":{}}' "$API/invocation/$RID/error" >/dev/null"#,
    );
    let (mut host, session) = start_ready(&f).await;
    host.send(invoke("req-err", "{}")).await;
    match host.recv().await {
        Message::FunctionError(e) => {
            assert_eq!(e.request_id, "req-err");
            assert_eq!(e.error_type, "Function.MyError");
            let body: serde_json::Value = serde_json::from_slice(&e.body).unwrap();
            assert_eq!(body["errorMessage"], "boom");
            assert!(body.get("errorCause").is_none());
        }
        other => panic!("expected a FunctionError, got {other:?}"),
    }
    shutdown(host, session).await;
}

#[tokio::test]
async fn init_error_then_runtime_exit() {
    let f = Fixture::shell(
        r#"curl -sf -X POST -H 'Lambda-Runtime-Function-Error-Type: Runtime.ImportModuleError' -d '{"errorMessage":"no module named app"}' "$API/init/error" >/dev/null; exit 1"#,
        ECHO,
    );
    let (mut host, session) = start();
    host.handshake().await;
    host.send(Message::Configure(Box::new(f.configure()))).await;
    match host.recv().await {
        Message::InitError(e) => {
            assert_eq!(e.error_type, "Runtime.ImportModuleError");
            let body: serde_json::Value = serde_json::from_slice(&e.body).unwrap();
            assert_eq!(body["errorMessage"], "no module named app");
        }
        other => panic!("expected InitError, got {other:?}"),
    }
    match host.recv().await {
        Message::RuntimeExit(x) => {
            assert_eq!(x.request_id, None);
            assert_eq!(x.exit_code, Some(1));
            assert_eq!(x.description, "exit status 1");
        }
        other => panic!("expected RuntimeExit, got {other:?}"),
    }
    // The dead environment still answers, and still shuts down cleanly.
    host.send(invoke("late", "{}")).await;
    assert!(
        matches!(host.recv().await, Message::RuntimeExit(x) if x.request_id.as_deref() == Some("late"))
    );
    shutdown(host, session).await;
}

#[tokio::test]
async fn runtime_crash_during_an_invocation() {
    let f = Fixture::shell("", "echo dying; exit 42");
    let (mut host, session) = start_ready(&f).await;
    host.send(invoke("req-crash", "{}")).await;
    match host.recv().await {
        Message::RuntimeExit(x) => {
            assert_eq!(x.request_id.as_deref(), Some("req-crash"));
            assert_eq!(x.exit_code, Some(42));
            assert_eq!(x.description, "exit status 42");
        }
        other => panic!("expected RuntimeExit, got {other:?}"),
    }
    let host = shutdown(host, session).await;
    assert!(host.logs(Stream::Stdout).contains(&"dying".to_string()));
}

#[tokio::test]
async fn missing_or_unusable_bootstrap_is_an_init_error() {
    let f = Fixture::empty();
    let (mut host, session) = start();
    host.handshake().await;
    host.send(Message::Configure(Box::new(f.configure()))).await;
    match host.recv().await {
        Message::InitError(e) => {
            assert_eq!(e.error_type, "Runtime.InvalidEntrypoint");
            assert!(String::from_utf8_lossy(&e.body).contains("bootstrap"));
        }
        other => panic!("expected InitError, got {other:?}"),
    }
    host.send(invoke("r", "{}")).await;
    assert!(
        matches!(host.recv().await, Message::FunctionError(e) if e.error_type == "Runtime.InvalidEntrypoint")
    );
    shutdown(host, session).await;

    // There but not executable.
    let f = Fixture::empty();
    std::fs::write(f.task().join("bootstrap"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(
        f.task().join("bootstrap"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let (mut host, session) = start();
    host.handshake().await;
    host.send(Message::Configure(Box::new(f.configure()))).await;
    match host.recv().await {
        Message::InitError(e) => {
            assert_eq!(e.error_type, "Runtime.InvalidEntrypoint");
            assert!(String::from_utf8_lossy(&e.body).contains("fork/exec"));
        }
        other => panic!("expected InitError, got {other:?}"),
    }
    shutdown(host, session).await;
}

#[tokio::test]
async fn init_timeout_kills_the_runtime() {
    let f = Fixture::shell("sleep 30", ECHO);
    let (mut host, session) = start();
    host.handshake().await;
    let cfg = Configure {
        init_timeout_ms: 300,
        ..f.configure()
    };
    host.send(Message::Configure(Box::new(cfg))).await;
    assert!(matches!(host.recv().await, Message::InitTimeout(t) if t.after_ms == 300));
    match host.recv().await {
        Message::RuntimeExit(x) => assert_eq!(x.description, "signal: killed"),
        other => panic!("expected RuntimeExit, got {other:?}"),
    }
    shutdown(host, session).await;
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

async fn read_pid(f: &Fixture) -> i32 {
    let path = f.tmp().join("pid");
    for _ in 0..100 {
        if let Ok(s) = std::fs::read_to_string(&path) {
            if let Ok(pid) = s.trim().parse() {
                return pid;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the bootstrap wrote no pid");
}

#[tokio::test]
async fn broken_host_connection_ends_the_session_and_kills_the_runtime() {
    let f = Fixture::shell(r#"echo $$ > "$TMPDIR/pid""#, ECHO);
    let (host, session) = start_ready(&f).await;
    let pid = read_pid(&f).await;
    assert!(pid_alive(pid));
    drop(host);
    let result = tokio::time::timeout(WAIT, session).await.unwrap().unwrap();
    match result {
        Err(e @ SessionError::Host(ProtoError::Closed)) => assert!(!e.reportable()),
        other => panic!("expected a closed connection, got {other:?}"),
    }
    assert!(!pid_alive(pid), "the runtime outlived the session");
}

#[tokio::test]
async fn host_vanishing_mid_invocation_does_not_hang() {
    let f = Fixture::shell(r#"echo $$ > "$TMPDIR/pid""#, "sleep 60");
    let (mut host, session) = start_ready(&f).await;
    let pid = read_pid(&f).await;
    host.send(invoke("stuck", "{}")).await;
    // Half a frame, then gone.
    let frame = proto::encode(&Message::Ping(Ping { seq: 1 })).unwrap();
    host.stream.write_all(&frame[..6]).await.unwrap();
    drop(host);
    let result = tokio::time::timeout(WAIT, session).await.unwrap().unwrap();
    assert!(
        matches!(result, Err(SessionError::Host(ProtoError::Truncated))),
        "{result:?}"
    );
    assert!(!pid_alive(pid));
}

#[tokio::test]
async fn shutdown_sends_sigterm_first() {
    let f = Fixture::shell(
        r#"echo $$ > "$TMPDIR/pid"; trap 'echo got-term; exit 0' TERM"#,
        ECHO,
    );
    let (host, session) = start_ready(&f).await;
    let pid = read_pid(&f).await;
    let host = shutdown(host, session).await;
    assert!(
        host.logs(Stream::Stdout).contains(&"got-term".to_string()),
        "{:?}",
        host.seen
    );
    assert!(!pid_alive(pid));
}

#[tokio::test]
async fn version_mismatch_is_reported_as_fatal() {
    let (mut host, session) = start();
    let _ = host.recv().await; // the guest's Hello
    host.send(Message::Hello(Hello {
        protocol_version: 99,
        role: Role::Host,
        software: "kindling 9.0".into(),
        resumed: false,
    }))
    .await;
    match host.recv().await {
        Message::Fatal(f) => {
            assert!(f.message.contains("version mismatch"), "{}", f.message);
            assert!(f.message.contains("kindling 9.0"), "{}", f.message);
        }
        other => panic!("expected Fatal, got {other:?}"),
    }
    let result = tokio::time::timeout(WAIT, session).await.unwrap().unwrap();
    assert!(matches!(
        result,
        Err(SessionError::Host(ProtoError::VersionMismatch {
            theirs: 99,
            ..
        }))
    ));
}

#[tokio::test]
async fn protocol_violations_are_fatal() {
    // An Invoke before Configure.
    let (mut host, session) = start();
    host.handshake().await;
    host.send(invoke("early", "{}")).await;
    assert!(matches!(host.recv().await, Message::Fatal(f) if f.message.contains("Invoke")));
    let result = tokio::time::timeout(WAIT, session).await.unwrap().unwrap();
    assert!(matches!(
        result,
        Err(SessionError::Unexpected { got: "Invoke", .. })
    ));

    // An absurd frame length.
    let (mut host, session) = start();
    host.handshake().await;
    host.stream
        .write_all(&u32::MAX.to_le_bytes())
        .await
        .unwrap();
    assert!(matches!(host.recv().await, Message::Fatal(f) if f.message.contains("over the limit")));
    let result = tokio::time::timeout(WAIT, session).await.unwrap().unwrap();
    assert!(matches!(
        result,
        Err(SessionError::Host(ProtoError::FrameTooLarge { .. }))
    ));
}

#[tokio::test]
async fn shutdown_before_configure() {
    let (mut host, session) = start();
    host.handshake().await;
    host.send(Message::Ping(Ping { seq: 1 })).await;
    assert!(matches!(host.recv().await, Message::Pong(p) if p.seq == 1));
    shutdown(host, session).await;
}

#[tokio::test]
async fn long_log_lines_are_cut() {
    let f = Fixture::shell(
        "printf 'aaaaaaaaaabbbbbbbbbbccccc\\nshort\\nno-newline'",
        ECHO,
    );
    let any_port: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let (mut host, session) = start_with(
        GuestInit::new(Mode::Process)
            .with_api_addr(any_port)
            .with_max_log_line(10),
    );
    host.handshake().await;
    host.send(Message::Configure(Box::new(f.configure()))).await;
    assert!(matches!(host.recv().await, Message::Ready(_)));
    let host = shutdown(host, session).await;
    let lines: Vec<(String, bool)> = host
        .seen
        .iter()
        .filter_map(|m| match m {
            Message::Log(Log {
                stream: Stream::Stdout,
                partial,
                line,
                ..
            }) => Some((String::from_utf8_lossy(line).into_owned(), *partial)),
            _ => None,
        })
        .collect();
    let expect = |s: &str, p| (s.to_string(), p);
    assert_eq!(
        lines,
        vec![
            expect("aaaaaaaaaa", true),
            expect("bbbbbbbbbb", true),
            expect("ccccc", false),
            expect("short", false),
            expect("no-newline", true),
        ]
    );
}

#[tokio::test]
async fn runtime_runs_as_the_configured_user() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to change users");
        return;
    }
    let f = Fixture::shell(r#"echo "ids $(id -u) $(id -g)""#, ECHO);
    for dir in [f.dir.path(), &f.task()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(f.tmp(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let (mut host, session) = start();
    host.handshake().await;
    let cfg = Configure {
        run_as: Some(RunAs::LAMBDA),
        ..f.configure()
    };
    host.send(Message::Configure(Box::new(cfg))).await;
    assert!(matches!(host.recv().await, Message::Ready(_)));
    host.send(invoke("as-user", "{\"a\":1}")).await;
    assert!(matches!(host.recv().await, Message::Response(r) if r.payload == "{\"a\":1}"));
    let host = shutdown(host, session).await;
    assert!(
        host.logs(Stream::Stdout)
            .contains(&"ids 993 990".to_string()),
        "{:?}",
        host.logs(Stream::Stdout)
    );
}

/// A container image function: the command line, working directory and environment come from
/// the image's start-up config, with the function's overrides on top.
#[tokio::test]
async fn image_functions_start_from_the_image_config() {
    let f = Fixture::shell(
        r#"echo "args=$* cwd=$(pwd) handler=$_HANDLER img=$IMG_VAR my=$MY_VAR path=$PATH""#,
        ECHO,
    );
    let app = f.dir.path().join("app");
    std::fs::create_dir(&app).unwrap();
    let config = f.dir.path().join("image.json");
    let image = serde_json::json!({
        "version": 1, "source": "oci", "base": null, "init": null, "task_root": "/var/task",
        "entrypoint": [f.task().join("bootstrap")], "cmd": ["app.handler", "extra"],
        "env": ["IMG_VAR=from-image", "MY_VAR=image-loses", "PATH=/usr/local/bin:/usr/bin:/bin"],
        "working_dir": app, "user": ""
    });
    std::fs::write(&config, image.to_string()).unwrap();
    let mut cfg = f.configure();
    cfg.runtime = RuntimeKind::Image {
        config_path: config.display().to_string(),
        entrypoint: None,
        command: None,
        working_dir: None,
    };
    let (mut host, session) = start();
    host.handshake().await;
    host.send(Message::Configure(Box::new(cfg.clone()))).await;
    assert!(matches!(host.recv().await, Message::Ready(_)));
    host.send(invoke("img-1", "{\"k\":1}")).await;
    assert!(
        matches!(host.recv().await, Message::Response(r) if r.payload == Bytes::from_static(b"{\"k\":1}"))
    );
    let host = shutdown(host, session).await;
    let want = format!(
        "args=app.handler extra cwd={} handler=app.handler img=from-image my=from-user \
         path=/usr/local/bin:/usr/bin:/bin",
        app.display()
    );
    assert!(
        host.logs(Stream::Stdout).contains(&want),
        "{:?}",
        host.logs(Stream::Stdout)
    );

    // The function's ImageConfig overrides each part.
    cfg.runtime = RuntimeKind::Image {
        config_path: config.display().to_string(),
        entrypoint: None,
        command: Some(vec!["other.handler".into()]),
        working_dir: Some(f.tmp().display().to_string()),
    };
    let (mut host, session) = start();
    host.handshake().await;
    host.send(Message::Configure(Box::new(cfg.clone()))).await;
    assert!(matches!(host.recv().await, Message::Ready(_)));
    let host = shutdown(host, session).await;
    let out = host.logs(Stream::Stdout);
    assert!(
        out.iter().any(|l| l.starts_with(&format!(
            "args=other.handler cwd={} handler=other.handler",
            f.tmp().display()
        ))),
        "{out:?}"
    );

    // An image config without any command is an init error, reported to the caller.
    std::fs::write(
        &config,
        r#"{"entrypoint":[],"cmd":[],"env":[],"working_dir":""}"#,
    )
    .unwrap();
    cfg.runtime = RuntimeKind::Image {
        config_path: config.display().to_string(),
        entrypoint: None,
        command: None,
        working_dir: None,
    };
    let (mut host, session) = start();
    host.handshake().await;
    host.send(Message::Configure(Box::new(cfg))).await;
    match host.recv().await {
        Message::InitError(e) => {
            assert_eq!(e.error_type, "Runtime.InvalidEntrypoint");
            assert!(String::from_utf8_lossy(&e.body).contains("neither an ENTRYPOINT nor a CMD"));
        }
        other => panic!("expected InitError, got {other:?}"),
    }
    shutdown(host, session).await;
}

/// Snapshots: PrepareSnapshot, the connection dropped (as a snapshot's restore resets the
/// vsock transport), guest-init reconnects with a resumed Hello, the host's Restored runs the
/// snap-start runtime's after-restore hook, Ready, and invocations carry on in the same
/// runtime. Done twice, as each restored copy of a VM does.
#[tokio::test]
async fn snapshot_prepare_reconnect_restore_then_invoke() {
    let f = Fixture::shell(
        r#"curl -sf "$API/restore/next" >/dev/null || exit 4; echo "after-restore hook ran $$""#,
        ECHO,
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("host.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let any_port: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let init = GuestInit::new(Mode::Process).with_api_addr(any_port);
    let p = path.clone();
    let session = tokio::spawn(async move {
        let first = UnixStream::connect(&p).await.unwrap();
        init.run_session_with(first, || UnixStream::connect(p.clone()))
            .await
    });
    let mut host = accept_host(&listener).await;
    host.handshake().await;
    let mut cfg = f.configure();
    cfg.environment
        .insert("AWS_LAMBDA_INITIALIZATION_TYPE".into(), "snap-start".into());
    host.send(Message::Configure(Box::new(cfg))).await;
    assert!(matches!(host.recv().await, Message::Ready(_)));

    let mut hooks = Vec::new();
    for round in 0..2 {
        host.send(Message::PrepareSnapshot(PrepareSnapshot {
            idle_timeout_ms: 5000,
        }))
        .await;
        match host.recv().await {
            Message::SnapshotReady(r) => assert_eq!(r.refused, None, "round {round}"),
            other => panic!("expected SnapshotReady, got {other:?}"),
        }
        // "Snapshotted": the connection goes away; guest-init must come back.
        drop(host);
        host = accept_host(&listener).await;
        match host.recv().await {
            Message::Hello(h) => {
                h.check(Role::Guest).unwrap();
                assert!(h.resumed, "a reconnection says it is resumed");
            }
            other => panic!("expected a resumed Hello, got {other:?}"),
        }
        host.send(Message::Hello(Hello::new(Role::Host))).await;
        host.send(Message::Restored(Box::new(Restored {
            host_time_ms: 1_700_000_000_000,
            hostname: Some(format!("copy-{round}")),
            log_stream: None,
            entropy: Bytes::from(vec![round as u8; 64]),
        })))
        .await;
        match host.recv().await {
            Message::Ready(_) => {}
            other => panic!("expected Ready after Restored, got {other:?}"),
        }
        let id = format!("after-restore-{round}");
        host.send(invoke(&id, format!("{{\"round\":{round}}}")))
            .await;
        match host.recv().await {
            Message::Response(r) => {
                assert_eq!(r.request_id, id);
                assert_eq!(&r.payload[..], format!("{{\"round\":{round}}}").as_bytes());
            }
            other => panic!("expected a Response, got {other:?}"),
        }
        hooks.extend(host.logs(Stream::Stdout));
    }
    // The after-restore hook ran once (at the first restore), in the runtime started at
    // init: restore/next answers once; later copies find the runtime in /next.
    let host = shutdown(host, session).await;
    hooks.extend(host.logs(Stream::Stdout));
    let ran: Vec<_> = hooks
        .iter()
        .filter(|l| l.starts_with("after-restore hook ran"))
        .collect();
    assert_eq!(ran.len(), 1, "{hooks:?}");
}

/// A PrepareSnapshot is refused while the runtime cannot be snapshotted (here: it exited),
/// and without one a lost connection still ends the session.
#[tokio::test]
async fn prepare_snapshot_is_refused_when_the_runtime_is_gone() {
    let f = Fixture::shell("", "exit 7");
    let (mut host, session) = start_ready(&f).await;
    host.send(invoke("r", "{}")).await;
    assert!(matches!(host.recv().await, Message::RuntimeExit(_)));
    host.send(Message::PrepareSnapshot(PrepareSnapshot {
        idle_timeout_ms: 1000,
    }))
    .await;
    match host.recv().await {
        Message::SnapshotReady(r) => assert!(r.refused.is_some()),
        other => panic!("expected SnapshotReady, got {other:?}"),
    }
    drop(host);
    let result = tokio::time::timeout(WAIT, session).await.unwrap().unwrap();
    assert!(matches!(result, Err(e) if e.connection_lost()));
}

async fn accept_host(listener: &tokio::net::UnixListener) -> Host {
    let (stream, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .unwrap()
        .unwrap();
    Host {
        stream,
        dec: Decoder::new(),
        seen: Vec::new(),
    }
}

// ---- external extensions ----

/// An extension in shell: registers for INVOKE and SHUTDOWN, prints every event, exits after
/// SHUTDOWN.
fn recorder_extension(name: &str) -> String {
    format!(
        r#"#!/bin/sh
BASE="http://$AWS_LAMBDA_RUNTIME_API/2020-01-01/extension"
H="$TMPDIR/{name}-headers"
curl -sf -D "$H" -o /dev/null -X POST -H 'Lambda-Extension-Name: {name}' \
  -d '{{"events":["INVOKE","SHUTDOWN"]}}' "$BASE/register" || exit 5
ID=$(grep -i '^lambda-extension-identifier:' "$H" | cut -d' ' -f2 | tr -d '\r')
echo "registered $(id -u)"
while true; do
  EV=$(curl -sf -H "Lambda-Extension-Identifier: $ID" "$BASE/event/next") || exit 6
  echo "event: $EV"
  case "$EV" in *SHUTDOWN*) exit 0;; esac
done
"#
    )
}

fn add_extension(f: &Fixture, name: &str, script: &str) {
    let dir = f.task().join("extensions");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn extension_lines(host: &Host, name: &str) -> Vec<String> {
    host.seen
        .iter()
        .filter_map(|m| match m {
            Message::Log(l) if l.extension.as_deref() == Some(name) => {
                Some(String::from_utf8_lossy(&l.line).into_owned())
            }
            _ => None,
        })
        .collect()
}

/// The extension registers before the runtime starts, gets each INVOKE with the request id,
/// and the host's Shutdown reaches it as SHUTDOWN with the host's reason; its lines come
/// tagged with its name, the runtime's untagged.
#[tokio::test]
async fn extension_gets_invoke_and_shutdown_events() {
    let f = Fixture::shell(r#"echo "runtime up""#, ECHO);
    add_extension(&f, "recorder", &recorder_extension("recorder"));
    let (mut host, session) = start_ready(&f).await;
    for id in ["ext-req-1", "ext-req-2"] {
        host.send(invoke(id, "{\"x\":1}")).await;
        match host.recv().await {
            Message::Response(r) => {
                assert_eq!(r.request_id, id);
                assert_eq!(&r.payload[..], b"{\"x\":1}");
            }
            other => panic!("expected a Response, got {other:?}"),
        }
    }
    host.send(Message::Shutdown(Shutdown {
        reason: "failure".into(),
        grace_ms: 2000,
    }))
    .await;
    host.drain().await;
    let end = tokio::time::timeout(WAIT, session)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(end.reason, "failure");
    let lines = extension_lines(&host, "recorder");
    assert!(lines[0].starts_with("registered "), "{lines:?}");
    let events: Vec<serde_json::Value> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("event: "))
        .map(|j| serde_json::from_str(j).unwrap())
        .collect();
    assert_eq!(events.len(), 3, "{lines:?}");
    for (ev, id) in events.iter().zip(["ext-req-1", "ext-req-2"]) {
        assert_eq!(ev["eventType"], "INVOKE");
        assert_eq!(ev["requestId"], id);
        assert_eq!(
            ev["invokedFunctionArn"],
            "arn:aws:lambda:us-east-1:000000000000:function:test-fn"
        );
    }
    assert_eq!(events[2]["eventType"], "SHUTDOWN");
    assert_eq!(events[2]["shutdownReason"], "failure");
    // Runtime lines are not tagged.
    assert!(host
        .logs(Stream::Stdout)
        .contains(&"runtime up".to_string()));
    assert!(host.seen.iter().any(|m| matches!(m,
        Message::Log(l) if l.extension.is_none() && &l.line[..] == b"runtime up")));
}

/// More than 10 extensions: init fails with Extension.InitError and nothing runs.
#[tokio::test]
async fn more_than_ten_extensions_is_an_init_error() {
    let f = Fixture::shell(r#"echo "runtime started""#, ECHO);
    for i in 0..11 {
        let name = format!("ext{i:02}");
        add_extension(&f, &name, &recorder_extension(&name));
    }
    let (mut host, session) = start();
    host.handshake().await;
    host.send(Message::Configure(Box::new(f.configure()))).await;
    match host.recv().await {
        Message::InitError(e) => {
            assert_eq!(e.error_type, "Extension.InitError");
            let body = String::from_utf8_lossy(&e.body);
            assert!(body.contains("at most 10"), "{body}");
        }
        other => panic!("expected InitError, got {other:?}"),
    }
    host.send(invoke("r", "{}")).await;
    assert!(
        matches!(host.recv().await, Message::FunctionError(e) if e.error_type == "Extension.InitError")
    );
    let host = shutdown(host, session).await;
    assert!(host.logs(Stream::Stdout).is_empty(), "{:?}", host.seen);
}

/// An extension that exits before it registers fails init with Extension.Crash; the runtime
/// is never started.
#[tokio::test]
async fn extension_exiting_before_register_fails_init() {
    let f = Fixture::shell(r#"echo "runtime started""#, ECHO);
    add_extension(&f, "quitter", "#!/bin/sh\necho bye\nexit 1\n");
    let (mut host, session) = start();
    host.handshake().await;
    host.send(Message::Configure(Box::new(f.configure()))).await;
    match host.recv().await {
        Message::InitError(e) => {
            assert_eq!(e.error_type, "Extension.Crash");
            assert!(String::from_utf8_lossy(&e.body).contains("quitter"));
        }
        other => panic!("expected InitError, got {other:?}"),
    }
    let host = shutdown(host, session).await;
    assert!(!host
        .logs(Stream::Stdout)
        .contains(&"runtime started".to_string()));
}

// ---- response streaming ----

/// A runtime that streams (curl's chunked POST in streaming mode): with `stream` in the
/// Invoke the body arrives as StreamStart + StreamChunks (each at most 256 KiB) and an empty
/// Response ends it; without, the same runtime's answer comes buffered in the Response.
#[tokio::test]
async fn streamed_response_arrives_as_chunks() {
    let f = Fixture::shell(
        "",
        r#"curl -sf -X POST -H 'Lambda-Runtime-Function-Response-Mode: streaming' -H 'Transfer-Encoding: chunked' -H 'Content-Type: text/x-stream' --data-binary @"$EVENT" "$API/invocation/$RID/response" >/dev/null"#,
    );
    let (mut host, session) = start_ready(&f).await;
    let event: Vec<u8> = (0..=255u8).cycle().take(700 * 1024).collect();
    let mut streamed = invoke("stream-1", event.clone());
    if let Message::Invoke(inv) = &mut streamed {
        inv.stream = true;
    }
    host.send(streamed).await;
    let mut body = Vec::new();
    let mut started = false;
    loop {
        match host.recv().await {
            Message::StreamStart(s) => {
                assert!(!started && body.is_empty());
                assert_eq!(s.request_id, "stream-1");
                assert_eq!(s.content_type.as_deref(), Some("text/x-stream"));
                started = true;
            }
            Message::StreamChunk(c) => {
                assert!(started);
                assert_eq!(c.request_id, "stream-1");
                assert!(c.payload.len() <= proto::MAX_STREAM_CHUNK_BYTES);
                body.extend_from_slice(&c.payload);
            }
            Message::Response(r) => {
                assert_eq!(r.request_id, "stream-1");
                assert!(r.payload.is_empty());
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(started);
    assert_eq!(body.len(), event.len());
    assert!(body == event);
    // A caller that does not stream gets the same runtime's answer buffered.
    host.send(invoke("buffered-1", "{\"b\":2}")).await;
    match host.recv().await {
        Message::Response(r) => {
            assert_eq!(r.request_id, "buffered-1");
            assert_eq!(&r.payload[..], b"{\"b\":2}");
        }
        other => panic!("expected a buffered Response, got {other:?}"),
    }
    shutdown(host, session).await;
}

/// An extension that crashes after init resets the environment: the runtime is killed, so
/// the host sees RuntimeExit and replaces the VM (a running invocation may get
/// Extension.Crash first).
#[tokio::test]
async fn extension_crash_after_init_kills_the_runtime() {
    let f = Fixture::shell("", ECHO);
    let crasher = recorder_extension("crasher")
        .replace(r#"case "$EV" in *SHUTDOWN*) exit 0;; esac"#, "exit 9");
    add_extension(&f, "crasher", &crasher);
    let (mut host, session) = start_ready(&f).await;
    host.send(invoke("c1", "{}")).await;
    loop {
        match host.recv().await {
            Message::Response(r) => assert_eq!(r.request_id, "c1"),
            Message::FunctionError(e) => {
                assert_eq!(e.request_id, "c1");
                assert_eq!(e.error_type, "Extension.Crash");
            }
            Message::RuntimeExit(_) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    shutdown(host, session).await;
}
