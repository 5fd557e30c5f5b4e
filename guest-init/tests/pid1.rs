//! The binary as a real PID 1, without a VM: PID 1 of new pid, mount, network and UTS
//! namespaces (root only; skipped elsewhere). What it checks that nothing else can: the
//! system setup (/proc, /sys, /tmp, loopback in an empty network namespace, host name),
//! the boot-timer write (into a sparse file standing in for /dev/mem), reaping of orphans
//! as init, and the power-off at Shutdown (which, in a pid namespace, ends just that
//! namespace).

use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use guest_init::proto::{
    self, read_message_async, write_message_async, Configure, Decoder, Hello, Invoke, Message,
    Role, RuntimeKind, Shutdown,
};
use guest_init::system::{BOOT_TIMER_ADDR, BOOT_TIMER_VALUE};
use tokio::net::UnixListener;

const WAIT: Duration = Duration::from_secs(30);

fn namespaces_available() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return false;
    }
    std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--mount", "--net", "--uts", "true"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The binary under test: this build's, or `GUEST_INIT_TEST_BIN` (e.g. the static build).
fn binary() -> std::ffi::OsString {
    std::env::var_os("GUEST_INIT_TEST_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_guest-init").into())
}

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
async fn runs_as_pid_1_of_a_namespace() {
    if !namespaces_available() {
        eprintln!("SKIPPED: needs root and unshare(1) with pid/mount/net/uts namespaces");
        return;
    }
    // Not under /tmp: guest-init mounts a tmpfs there, which would hide the host socket (the
    // target dir itself is under /tmp when the checkout is).
    let base = [
        Path::new(env!("CARGO_TARGET_TMPDIR")),
        Path::new("/var/tmp"),
        Path::new("/run"),
    ]
    .into_iter()
    .find(|p| !p.starts_with("/tmp") && p.is_dir())
    .expect("a scratch directory outside /tmp");
    let work = tempfile::tempdir_in(base).unwrap();
    let task = work.path().join("task");
    std::fs::create_dir_all(&task).unwrap();
    let bootstrap = task.join("bootstrap");
    std::fs::write(
        &bootstrap,
        r#"#!/bin/sh
API="http://$AWS_LAMBDA_RUNTIME_API/2018-06-01/runtime"
# An orphan: the subshell exits at once, its sleep is left to PID 1.
( sleep 0.2 & )
while true; do
  curl -sf -D "$TMPDIR/h" -o "$TMPDIR/e" "$API/invocation/next" || exit 3
  RID=$(grep -i '^lambda-runtime-aws-request-id:' "$TMPDIR/h" | cut -d' ' -f2 | tr -d '\r')
  sleep 0.5
  Z=$(grep -l '^State:[[:space:]]*Z' /proc/[0-9]*/status 2>/dev/null | wc -l)
  BODY="host=$(cat /proc/sys/kernel/hostname) init=$(cat /proc/1/comm) zombies=$Z tmp=$(stat -f -c %T /tmp)"
  curl -sf -X POST --data-binary "$BODY" "$API/invocation/$RID/response" >/dev/null
done
"#,
    )
    .unwrap();
    std::fs::set_permissions(&bootstrap, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mem = work.path().join("mem");
    let f = std::fs::File::create(&mem).unwrap();
    f.set_len(BOOT_TIMER_ADDR + 4096).unwrap();
    drop(f);
    let sock = work.path().join("host.sock");
    let listener = UnixListener::bind(&sock).unwrap();

    let mut child = tokio::process::Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount",
            "--net",
            "--uts",
            "--propagation",
            "private",
            "sh",
            "-c",
            // A /dev of its own whose `mem` is the sparse file (this host may have no
            // /dev/mem, and must not have its own written).
            "mount -t tmpfs -o mode=755 dev /dev && mknod -m 666 /dev/null c 1 3 && \
             mknod -m 666 /dev/zero c 1 5 && mknod -m 666 /dev/urandom c 1 9 && \
             ln -s \"$1\" /dev/mem && exec \"$2\"",
            "sh",
        ])
        .arg(&mem)
        .arg(binary())
        .env("KINDLING_GUEST_UNIX", &sock)
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
        function_name: "pid1".into(),
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
        hostname: Some("fn-host".into()),
        // Right (this is the host's own clock): checked, not set. A wrong value would set
        // the machine's clock, which namespaces do not separate.
        host_time_ms: Some(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64,
        ),
        entropy_hex: None,
    };
    cfg.environment = guest_init::env::lambda_variables(&cfg, "/tmp", "s");
    write_message_async(&mut s, &Message::Configure(Box::new(cfg)))
        .await
        .unwrap();
    // Ready means the runtime reached the Runtime API on 127.0.0.1:9001 in a network
    // namespace whose loopback guest-init brought up.
    match recv(&mut s, &mut d).await {
        Message::Ready(_) => {}
        other => panic!("expected Ready, got {other:?}"),
    }
    let invoke = Invoke {
        request_id: "r1".into(),
        invocation_id: "i1".into(),
        deadline_ms: 4_000_000_000_000,
        function_arn: "arn:aws:lambda:us-east-1:000000000000:function:pid1".into(),
        trace_id: None,
        client_context: None,
        cognito_identity: None,
        tenant_id: None,
        content_type: "application/json".into(),
        stream: false,
        payload: "{}".into(),
    };
    write_message_async(&mut s, &Message::Invoke(Box::new(invoke)))
        .await
        .unwrap();
    match recv(&mut s, &mut d).await {
        Message::Response(r) => assert_eq!(
            String::from_utf8_lossy(&r.payload),
            "host=fn-host init=guest-init zombies=0 tmp=tmpfs"
        ),
        other => panic!("expected a Response, got {other:?}"),
    }
    let shutdown = Shutdown {
        reason: "spindown".into(),
        grace_ms: 1000,
    };
    write_message_async(&mut s, &Message::Shutdown(shutdown))
        .await
        .unwrap();
    // Power-off in a pid namespace ends the namespace's init, and so unshare.
    tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("guest-init did not power off")
        .unwrap();
    let mut byte = [0u8];
    std::fs::File::open(&mem)
        .unwrap()
        .read_exact_at(&mut byte, BOOT_TIMER_ADDR)
        .unwrap();
    assert_eq!(byte[0], BOOT_TIMER_VALUE, "boot timer not written");
}
