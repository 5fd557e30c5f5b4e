//! The `guest-init` binary itself, run as an ordinary process (`--unix PATH`): the same
//! session as in the VM, minus PID 1's system setup.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use guest_init::proto::{
    self, read_message_async, write_message_async, Configure, Decoder, Hello, Invoke, Message,
    Role, RuntimeKind, Shutdown,
};
use tokio::net::UnixListener;

const WAIT: Duration = Duration::from_secs(30);

async fn recv(s: &mut tokio::net::UnixStream, d: &mut Decoder) -> Message {
    loop {
        let m = tokio::time::timeout(WAIT, read_message_async(s, d))
            .await
            .expect("guest-init said nothing for 30 s")
            .unwrap();
        if !matches!(m, Message::Log(_)) {
            return m;
        }
    }
}

#[tokio::test]
async fn binary_serves_a_session_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let task = dir.path().join("task");
    let tmp = dir.path().join("tmp");
    std::fs::create_dir_all(&task).unwrap();
    std::fs::create_dir_all(&tmp).unwrap();
    let bootstrap = task.join("bootstrap");
    std::fs::write(
        &bootstrap,
        r#"#!/bin/sh
API="http://$AWS_LAMBDA_RUNTIME_API/2018-06-01/runtime"
while true; do
  curl -sf -D "$TMPDIR/h" -o "$TMPDIR/e" "$API/invocation/next" || exit 3
  RID=$(grep -i '^lambda-runtime-aws-request-id:' "$TMPDIR/h" | cut -d' ' -f2 | tr -d '\r')
  curl -sf -X POST --data-binary "got $(cat "$TMPDIR/e")" "$API/invocation/$RID/response" >/dev/null
done
"#,
    )
    .unwrap();
    std::fs::set_permissions(&bootstrap, std::fs::Permissions::from_mode(0o755)).unwrap();

    let sock = dir.path().join("v.sock_9999");
    let listener = UnixListener::bind(&sock).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_guest-init"))
        .arg("--unix")
        .arg(&sock)
        .args(["--api", "127.0.0.1:0"])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (mut s, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .unwrap()
        .unwrap();
    let mut d = Decoder::new();
    proto::expect_hello(recv(&mut s, &mut d).await, Role::Guest).unwrap();
    write_message_async(&mut s, &Message::Hello(Hello::new(Role::Host)))
        .await
        .unwrap();
    let mut cfg = Configure {
        function_name: "bin".into(),
        function_version: "$LATEST".into(),
        handler: "h".into(),
        memory_mb: 128,
        timeout_ms: 3000,
        region: "us-east-1".into(),
        runtime: RuntimeKind::Provided,
        task_root: task.display().to_string(),
        environment: BTreeMap::new(),
        init_timeout_ms: 20_000,
        run_as: None,
        hostname: None,
        host_time_ms: None,
        entropy_hex: None,
    };
    cfg.environment = guest_init::env::lambda_variables(&cfg, &tmp.display().to_string(), "s");
    write_message_async(&mut s, &Message::Configure(Box::new(cfg)))
        .await
        .unwrap();
    assert!(matches!(recv(&mut s, &mut d).await, Message::Ready(_)));
    let invoke = Invoke {
        request_id: "r1".into(),
        invocation_id: "i1".into(),
        deadline_ms: 4_000_000_000_000,
        function_arn: "arn:aws:lambda:us-east-1:000000000000:function:bin".into(),
        trace_id: None,
        client_context: None,
        cognito_identity: None,
        tenant_id: None,
        content_type: "application/json".into(),
        stream: false,
        payload: "{\"n\":1}".into(),
    };
    write_message_async(&mut s, &Message::Invoke(Box::new(invoke)))
        .await
        .unwrap();
    match recv(&mut s, &mut d).await {
        Message::Response(r) => assert_eq!(&r.payload[..], b"got {\"n\":1}"),
        other => panic!("expected a Response, got {other:?}"),
    }
    let shutdown = Shutdown {
        reason: "spindown".into(),
        grace_ms: 1000,
    };
    write_message_async(&mut s, &Message::Shutdown(shutdown))
        .await
        .unwrap();
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}
