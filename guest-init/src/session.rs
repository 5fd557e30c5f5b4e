//! The carrying loop: one host connection on one side, one [`RuntimeCore`] and its runtime
//! process on the other.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rapid_api::{CoreError, ErrorReport, Invocation, InvokeOutcome, Lifecycle, RuntimeCore};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::proto::{
    self, expect_hello, read_message_async, Configure, Decoder, Fatal, FunctionError, Hello,
    InitError, InitTimeout, Message, Pong, ProtoError, Ready, Response, Role, RuntimeExit, Stream,
};
use crate::runtime::{self, ExitInfo, ExitRx, Reaper};
use crate::Mode;

/// Where the Runtime API listens inside the VM.
pub const RUNTIME_API_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9001));

/// Messages queued for the host before producers (log pumps) wait.
const OUT_QUEUE: usize = 64;

/// Queued messages are gathered into one write up to this size.
const WRITE_BATCH: usize = 64 * 1024;

/// How long queued messages may take to reach the host once the session has ended.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// After SIGKILL, how long to wait for the runtime's exit before going on regardless.
const KILL_WAIT: Duration = Duration::from_secs(1);

/// How a session ended without error: the host asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEnd {
    /// The Shutdown's reason.
    pub reason: String,
}

/// Why a session ended otherwise. Either way the runtime has been killed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Reading from the host failed: the connection broke or closed, or a frame was bad.
    #[error("host connection: {0}")]
    Host(#[from] ProtoError),
    /// Writing to the host failed.
    #[error("writing to the host: {0}")]
    HostWrite(ProtoError),
    /// A well-formed message that has no place here.
    #[error("protocol violation: {got} {state}")]
    Unexpected {
        got: &'static str,
        state: &'static str,
    },
    #[error("cannot serve the Runtime API on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot start the runtime {program}: {source}")]
    Spawn { program: String, source: io::Error },
}

impl SessionError {
    /// The host connection broke or closed (as it does when the VM is snapshotted).
    pub fn connection_lost(&self) -> bool {
        matches!(
            self,
            SessionError::Host(ProtoError::Io(_) | ProtoError::Closed | ProtoError::Truncated)
                | SessionError::HostWrite(_)
        )
    }

    /// Whether the host can still be told ([`Message::Fatal`]): not when the connection
    /// itself is what failed.
    pub fn reportable(&self) -> bool {
        match self {
            SessionError::Host(e) => !matches!(
                e,
                ProtoError::Io(_) | ProtoError::Closed | ProtoError::Truncated
            ),
            SessionError::HostWrite(_) => false,
            _ => true,
        }
    }
}

/// guest-init's logic, PID 1 or not.
#[derive(Debug, Clone)]
pub struct GuestInit {
    mode: Mode,
    api_addr: SocketAddr,
    max_log_line: usize,
}

impl GuestInit {
    /// `Mode::Pid1` in the VM; `Mode::Process` to run as an ordinary process (tests, or
    /// `guest-init --unix PATH` on a host): no reaping of foreign children, runtimes die with
    /// the thread that started them.
    pub fn new(mode: Mode) -> Self {
        GuestInit {
            mode,
            api_addr: RUNTIME_API_ADDR,
            max_log_line: runtime::MAX_LOG_LINE,
        }
    }

    /// Where to serve the Runtime API (default 127.0.0.1:9001; port 0 picks a free one).
    pub fn with_api_addr(mut self, addr: SocketAddr) -> Self {
        self.api_addr = addr;
        self
    }

    /// Longest runtime output line sent as one Log message.
    pub fn with_max_log_line(mut self, bytes: usize) -> Self {
        self.max_log_line = bytes.max(1);
        self
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Runs one host session to its end: handshake, Configure, then invocations until a
    /// Shutdown (`Ok`) or a failure (`Err`). On a failure the host can still hear of, a
    /// [`Message::Fatal`] is sent first. The runtime is always dead when this returns; in
    /// [`Mode::Pid1`] the caller then powers off.
    pub async fn run_session<S>(&self, stream: S) -> Result<SessionEnd, SessionError>
    where
        S: AsyncRead + AsyncWrite,
    {
        self.run_session_with(stream, crate::restore::no_reconnect::<S>)
            .await
    }

    /// [`run_session`](Self::run_session) for a VM that may be snapshotted: once the host's
    /// PrepareSnapshot has been answered, a lost connection means "snapshotted", and
    /// `reconnect` is called (with backoff, see [`crate::restore`]) for a new connection, on
    /// which the same environment carries on after the host's Restored.
    pub async fn run_session_with<S, F, Fut>(
        &self,
        stream: S,
        mut reconnect: F,
    ) -> Result<SessionEnd, SessionError>
    where
        S: AsyncRead + AsyncWrite,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = io::Result<S>>,
    {
        let (tx, mut rx) = mpsc::channel::<Message>(OUT_QUEUE);
        let reaper = Reaper::new(self.mode);
        let _reaping = AbortOnDrop(tokio::spawn(reaper.clone().run()));
        // The environment outlives a connection lost to a snapshot.
        let mut kept: Option<Env> = None;
        let mut stream = stream;
        loop {
            let (mut rd, mut wr) = tokio::io::split(stream);
            let rx = &mut rx;
            // On a connection made after a snapshot the Hello goes first, before whatever
            // was queued while there was no connection.
            let hello = kept.as_ref().map(|_| Message::Hello(Hello::resumed()));
            let writer = async move {
                if let Some(h) = hello {
                    wr.write_all(&proto::encode(&h)?).await?;
                }
                // Whatever is queued goes out in one write: on an emulating host every guest
                // syscall counts.
                let mut buf = Vec::new();
                while let Some(m) = rx.recv().await {
                    buf.clear();
                    buf.extend_from_slice(&proto::encode(&m)?);
                    while buf.len() < WRITE_BATCH {
                        match rx.try_recv() {
                            Ok(m) => buf.extend_from_slice(&proto::encode(&m)?),
                            Err(_) => break,
                        }
                    }
                    wr.write_all(&buf).await?;
                    wr.flush().await?;
                }
                Ok::<(), ProtoError>(())
            };
            tokio::pin!(writer);
            let mut writer_failed = false;
            let result = {
                let session = self.session(&mut rd, Out(tx.clone()), &reaper, &mut kept);
                tokio::pin!(session);
                tokio::select! {
                    r = &mut session => r,
                    w = &mut writer => {
                        let e = w.err().unwrap_or(ProtoError::Closed);
                        writer_failed = true;
                        Err(SessionError::HostWrite(e))
                    }
                }
            };
            if let Err(e) = &result {
                if kept.as_ref().is_some_and(|env| env.prepared) && e.connection_lost() {
                    match crate::restore::reconnect(&mut reconnect).await {
                        Ok(s) => {
                            stream = s;
                            continue;
                        }
                        Err(e) => crate::system::say(format!("cannot reach the host again: {e}")),
                    }
                }
            }
            // The runtime is sent SIGKILL here.
            drop(kept.take());
            if let Err(e) = &result {
                if e.reportable() {
                    let fatal = Message::Fatal(Fatal {
                        message: e.to_string(),
                    });
                    // Bounded: a host that stopped reading must not keep the VM up.
                    let _ = tokio::time::timeout(FLUSH_TIMEOUT, tx.send(fatal)).await;
                }
            }
            drop(tx);
            if !writer_failed {
                // Log pumps hold senders until the killed runtime's pipes close.
                let _ = tokio::time::timeout(FLUSH_TIMEOUT, &mut writer).await;
            }
            reaper.settle(KILL_WAIT).await;
            return result;
        }
    }

    async fn session<R: AsyncRead + Unpin>(
        &self,
        rd: &mut R,
        out: Out,
        reaper: &Arc<Reaper>,
        kept: &mut Option<Env>,
    ) -> Result<SessionEnd, SessionError> {
        if let Some(env) = kept.as_mut() {
            return env.resume(self.mode, rd, &out).await;
        }
        out.send(Message::Hello(Hello::new(Role::Guest))).await?;
        let mut dec = Decoder::new();
        expect_hello(read_message_async(rd, &mut dec).await?, Role::Host)?;
        let cfg = loop {
            match read_message_async(rd, &mut dec).await? {
                Message::Configure(cfg) => break cfg,
                Message::Ping(p) => out.send(Message::Pong(Pong { seq: p.seq })).await?,
                Message::Shutdown(s) => return Ok(SessionEnd { reason: s.reason }),
                other => {
                    return Err(SessionError::Unexpected {
                        got: other.kind().name(),
                        state: "before Configure",
                    })
                }
            }
        };
        let env = kept.insert(self.start(&cfg, &out, reaper).await?);
        env.run(rd, &mut dec, &out).await
    }

    /// Serves the Runtime API and starts the runtime. A runtime that cannot be started for
    /// reasons of its own (no bootstrap, not executable) is an init error, not a failure.
    async fn start(
        &self,
        cfg: &Configure,
        out: &Out,
        reaper: &Arc<Reaper>,
    ) -> Result<Env, SessionError> {
        if self.mode == Mode::Pid1 {
            if let Some(ms) = cfg.host_time_ms {
                if let Err(e) = crate::system::sync_clock(ms) {
                    crate::system::say(format!("setting the clock: {e}"));
                }
            }
            if let Some(name) = &cfg.hostname {
                if let Err(e) = crate::system::set_hostname(name) {
                    crate::system::say(format!("setting the host name {name:?}: {e}"));
                }
            }
            if let Some(hex) = &cfg.entropy_hex {
                let seeded = crate::proto::from_hex(hex)
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not hex"))
                    .and_then(|bytes| crate::restore::add_entropy(&bytes));
                if let Err(e) = seeded {
                    crate::system::say(format!(
                        "mixing the host's entropy into the kernel RNG: {e}"
                    ));
                }
            }
        }
        let bind_err = |source| SessionError::Bind {
            addr: self.api_addr,
            source,
        };
        let listener = TcpListener::bind(self.api_addr).await.map_err(bind_err)?;
        let api_addr = listener.local_addr().map_err(bind_err)?;
        let core = RuntimeCore::with_config(crate::restore::core_config(cfg));
        let lifecycle = core.lifecycle();
        let (stop_api, api_stopped) = oneshot::channel::<()>();
        tokio::spawn(rapid_api::http::serve(listener, core.clone(), async {
            let _ = api_stopped.await;
        }));
        let mut env = Env {
            core,
            _stop_api: stop_api,
            lifecycle,
            pgid: None,
            exit: None,
            exited: None,
            start_failure: None,
            started: Instant::now(),
            init_timeout: Duration::from_millis(cfg.init_timeout_ms),
            init_reported: false,
            current: None,
            prepared: false,
            extensions: None,
            stream_fwd: None,
        };
        let mut launch = match runtime::runtime_command(cfg) {
            Ok(launch) => launch,
            Err(report) => {
                env.fail_start(report, out).await?;
                return Ok(env);
            }
        };
        runtime::prepare(&mut launch, cfg, &api_addr.to_string(), self.mode);
        // Extension init (each registers) comes before the runtime starts.
        let ext_launch = crate::extensions::Launch {
            task_root: &cfg.task_root,
            env: &launch.env,
            api_addr: &api_addr.to_string(),
            run_as: cfg.run_as,
            mode: self.mode,
            reaper,
            out: out.0.clone(),
            core: &env.core,
            max_log_line: self.max_log_line,
            deadline: (!env.init_timeout.is_zero()).then(|| env.started + env.init_timeout),
            init_timeout: env.init_timeout,
        };
        match crate::extensions::start(ext_launch).await {
            Ok(x) => env.extensions = x,
            Err(e) => {
                env.fail_extensions(e, out).await?;
                return Ok(env);
            }
        }
        let program = launch.command.get_program().to_string_lossy().into_owned();
        let (mut child, exit) = match reaper.spawn(&mut launch.command) {
            Ok(spawned) => spawned,
            Err(e) if runtime::is_entrypoint_error(&e) => {
                let report = ErrorReport::platform(
                    "Runtime.InvalidEntrypoint",
                    format!("Error: fork/exec {program}: {e}"),
                );
                env.fail_start(report, out).await?;
                return Ok(env);
            }
            Err(source) => return Err(SessionError::Spawn { program, source }),
        };
        if let Some(x) = &env.extensions {
            x.set_runtime(child.id() as libc::pid_t);
        } else {
            // With extensions, init (and Init Duration) began with theirs.
            env.started = Instant::now();
        }
        env.pgid = Some(child.id() as libc::pid_t);
        env.exit = Some(exit);
        if let Some(o) = child.stdout.take() {
            tokio::spawn(runtime::pump_logs(
                OwnedFd::from(o),
                Stream::Stdout,
                out.0.clone(),
                self.max_log_line,
                env.log_tap(),
            ));
        }
        if let Some(e) = child.stderr.take() {
            tokio::spawn(runtime::pump_logs(
                OwnedFd::from(e),
                Stream::Stderr,
                out.0.clone(),
                self.max_log_line,
                env.log_tap(),
            ));
        }
        // Dropping a std Child neither kills nor waits: the reaper collects it.
        drop(child);
        Ok(env)
    }
}

/// The queue to the host's writer.
#[derive(Clone)]
struct Out(mpsc::Sender<Message>);

impl Out {
    async fn send(&self, m: Message) -> Result<(), SessionError> {
        self.0
            .send(m)
            .await
            .map_err(|_| SessionError::HostWrite(ProtoError::Closed))
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type Current = Option<(String, oneshot::Receiver<InvokeOutcome>)>;

/// One execution environment: the core, its HTTP front, the runtime process.
struct Env {
    core: Arc<RuntimeCore>,
    /// Dropping it stops the Runtime API server.
    _stop_api: oneshot::Sender<()>,
    lifecycle: watch::Receiver<Lifecycle>,
    /// The runtime's process group (its pid), once started.
    pgid: Option<libc::pid_t>,
    exit: Option<ExitRx>,
    exited: Option<ExitInfo>,
    /// Why the runtime could not be started at all.
    start_failure: Option<ErrorReport>,
    started: Instant,
    init_timeout: Duration,
    /// Ready, InitError or InitTimeout has been sent (or init can no longer end).
    init_reported: bool,
    /// The invocation the runtime holds or will get.
    current: Current,
    /// SnapshotReady has been sent: a lost host connection now means "snapshotted".
    prepared: bool,
    /// The external extensions (`None`: the function has none).
    extensions: Option<crate::extensions::Extensions>,
    /// Carries the current invocation's streamed response to the host; its outcome goes
    /// only after this has finished (the chunks come first).
    stream_fwd: Option<JoinHandle<()>>,
}

enum Event {
    Lifecycle,
    Outcome(Result<InvokeOutcome, oneshot::error::RecvError>),
    Exit(ExitInfo),
    InitTimedOut,
    Host(Result<Message, ProtoError>),
}

async fn wait_current(current: &mut Current) -> Result<InvokeOutcome, oneshot::error::RecvError> {
    match current {
        Some((_, rx)) => rx.await,
        None => std::future::pending().await,
    }
}

async fn wait_exit(exit: &mut Option<ExitRx>) -> ExitInfo {
    match exit {
        Some(rx) => match rx.wait_for(Option::is_some).await {
            Ok(v) => v.unwrap_or(ExitInfo::UNKNOWN),
            Err(_) => ExitInfo::UNKNOWN,
        },
        None => std::future::pending().await,
    }
}

fn outcome_message(request_id: String, outcome: InvokeOutcome) -> Message {
    match outcome {
        InvokeOutcome::Response { body, content_type } => Message::Response(Response {
            request_id,
            content_type,
            payload: body,
        }),
        InvokeOutcome::Error(report) => error_message(request_id, report),
    }
}

fn error_message(request_id: String, report: ErrorReport) -> Message {
    Message::FunctionError(FunctionError {
        request_id,
        error_type: report.error_type,
        xray_cause: report.xray_cause,
        body: report.body,
    })
}

fn exit_message(request_id: Option<String>, info: ExitInfo) -> Message {
    Message::RuntimeExit(RuntimeExit {
        request_id,
        exit_code: info.code,
        signal: info.signal,
        description: info.describe(),
    })
}

impl Env {
    async fn fail_start(&mut self, report: ErrorReport, out: &Out) -> Result<(), SessionError> {
        self.init_reported = true;
        self.start_failure = Some(report.clone());
        self.core.close();
        out.send(Message::InitError(InitError {
            error_type: report.error_type,
            body: report.body,
        }))
        .await
    }

    async fn run<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        dec: &mut Decoder,
        out: &Out,
    ) -> Result<SessionEnd, SessionError> {
        loop {
            let init_pending = !self.init_reported && self.exit.is_some();
            let init_deadline = self.started + self.init_timeout;
            let event = tokio::select! {
                biased;
                // Order matters: Ready before the first Response, a Response before the
                // runtime's exit.
                _ = self.lifecycle.changed(), if init_pending => Event::Lifecycle,
                r = wait_current(&mut self.current), if self.current.is_some() => Event::Outcome(r),
                info = wait_exit(&mut self.exit), if self.exited.is_none() => Event::Exit(info),
                _ = tokio::time::sleep_until(init_deadline.into()),
                    if init_pending && !self.init_timeout.is_zero() => Event::InitTimedOut,
                m = read_message_async(rd, dec) => Event::Host(m),
            };
            match event {
                Event::Lifecycle => self.report_lifecycle(out).await?,
                Event::Outcome(r) => {
                    let Some((id, _)) = self.current.take() else {
                        continue;
                    };
                    if let Some(fwd) = self.stream_fwd.take() {
                        let _ = fwd.await;
                    }
                    let msg = match r {
                        Ok(outcome) => outcome_message(id, outcome),
                        Err(_) => error_message(
                            id.clone(),
                            ErrorReport::platform(
                                "Runtime.Unknown",
                                format!("RequestId: {id} Error: the environment was closed"),
                            ),
                        ),
                    };
                    out.send(msg).await?;
                }
                Event::Exit(info) => self.report_exit(info, out).await?,
                Event::InitTimedOut => {
                    self.init_reported = true;
                    if let Some(pgid) = self.pgid {
                        runtime::signal_group(pgid, libc::SIGKILL);
                    }
                    let after_ms = u64::try_from(self.init_timeout.as_millis()).unwrap_or(u64::MAX);
                    out.send(Message::InitTimeout(InitTimeout { after_ms }))
                        .await?;
                }
                Event::Host(m) => match m? {
                    Message::Invoke(inv) => self.invoke(*inv, out).await?,
                    Message::Ping(p) => out.send(Message::Pong(Pong { seq: p.seq })).await?,
                    Message::PrepareSnapshot(p) => self.prepare_snapshot(p, out).await?,
                    Message::Shutdown(s) => {
                        self.shutdown_for(&s).await;
                        return Ok(SessionEnd { reason: s.reason });
                    }
                    other => {
                        return Err(SessionError::Unexpected {
                            got: other.kind().name(),
                            state: "after Configure",
                        })
                    }
                },
            }
        }
    }

    /// Reports init's end once: Ready at the first `/next`, InitError at `/init/error`.
    async fn report_lifecycle(&mut self, out: &Out) -> Result<(), SessionError> {
        let state = self.lifecycle.borrow_and_update().clone();
        match state {
            Lifecycle::Initializing => Ok(()),
            Lifecycle::Ready => {
                self.init_reported = true;
                let init_duration_us =
                    u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
                out.send(Message::Ready(Ready { init_duration_us })).await
            }
            Lifecycle::InitFailed(report) => {
                self.init_reported = true;
                out.send(Message::InitError(InitError {
                    error_type: report.error_type,
                    body: report.body,
                }))
                .await
            }
            Lifecycle::Closed => {
                self.init_reported = true;
                Ok(())
            }
        }
    }

    /// The runtime exited: whatever it said before goes first, then RuntimeExit (naming the
    /// invocation it held, if any). The environment is dead from here on.
    async fn report_exit(&mut self, info: ExitInfo, out: &Out) -> Result<(), SessionError> {
        self.exited = Some(info);
        if !self.init_reported {
            self.report_lifecycle(out).await?;
            self.init_reported = true;
        }
        let mut held = None;
        if let Some((id, mut rx)) = self.current.take() {
            if let Some(fwd) = self.stream_fwd.take() {
                // Bounded: the stream ends when the dead runtime's connection does.
                let _ = tokio::time::timeout(KILL_WAIT, fwd).await;
            }
            match rx.try_recv() {
                Ok(outcome) => out.send(outcome_message(id, outcome)).await?,
                Err(_) => held = Some(id),
            }
        }
        self.core.close();
        out.send(exit_message(held, info)).await
    }

    async fn invoke(&mut self, inv: proto::Invoke, out: &Out) -> Result<(), SessionError> {
        let request_id = inv.request_id.clone();
        let streamed = inv.stream;
        if let Some(info) = self.exited {
            return out.send(exit_message(Some(request_id), info)).await;
        }
        if let Some(report) = &self.start_failure {
            return out.send(error_message(request_id, report.clone())).await;
        }
        if self.extensions.is_some() {
            // The previous invoke phase lasts until every extension is back in event/next
            // (the host's deadline bounds the wait); an error shows in `invoke` below.
            let _ = self.core.wait_idle().await;
        }
        let invocation = Invocation {
            request_id: inv.request_id,
            invocation_id: inv.invocation_id,
            deadline_ms: inv.deadline_ms,
            function_arn: inv.function_arn,
            trace_id: inv.trace_id,
            client_context: inv.client_context,
            cognito_identity: inv.cognito_identity,
            tenant_id: inv.tenant_id,
            content_type: inv.content_type,
            payload: inv.payload,
        };
        let sink = streamed.then(|| {
            let (sink, events) = rapid_api::stream_channel();
            let fwd = tokio::spawn(forward_stream(request_id.clone(), events, out.clone()));
            self.stream_fwd = Some(fwd);
            sink
        });
        match self.core.invoke_with_stream(invocation, sink) {
            Ok(rx) => {
                self.current = Some((request_id, rx));
                Ok(())
            }
            Err(CoreError::InitFailed(report)) => out.send(error_message(request_id, report)).await,
            Err(CoreError::Failed(report)) => out.send(error_message(request_id, report)).await,
            Err(e) => {
                let report = ErrorReport::platform(
                    "Runtime.Unknown",
                    format!("RequestId: {request_id} Error: {e}"),
                );
                out.send(error_message(request_id, report)).await
            }
        }
    }

    /// SIGTERM to the runtime's process group, SIGKILL when `grace` has passed.
    async fn shutdown(&mut self, grace: Duration) {
        self.core.close();
        let Some(pgid) = self.pgid else {
            return;
        };
        if self.exited.is_none() {
            runtime::signal_group(pgid, libc::SIGTERM);
            if let Ok(info) = tokio::time::timeout(grace, wait_exit(&mut self.exit)).await {
                self.exited = Some(info);
            }
        }
        // Also whatever the runtime left behind in its group.
        runtime::signal_group(pgid, libc::SIGKILL);
        if self.exited.is_none() {
            if let Ok(info) = tokio::time::timeout(KILL_WAIT, wait_exit(&mut self.exit)).await {
                self.exited = Some(info);
            }
        }
    }
}

/// Snapshots (the logic is in [`crate::restore`]).
impl Env {
    async fn prepare_snapshot(
        &mut self,
        p: proto::PrepareSnapshot,
        out: &Out,
    ) -> Result<(), SessionError> {
        let state = crate::restore::EnvState {
            core: &self.core,
            init_reported: self.init_reported,
            busy: self.current.is_some(),
            exited: self.exited.is_some(),
            start_failed: self.start_failure.is_some(),
        };
        let ready = crate::restore::prepare(state, Duration::from_millis(p.idle_timeout_ms)).await;
        self.prepared = ready.refused.is_none();
        out.send(Message::SnapshotReady(ready)).await
    }

    /// A connection made after a snapshot: Hello (resumed) both ways, the host's Restored,
    /// Ready (or InitError), then invocations as before.
    async fn resume<R: AsyncRead + Unpin>(
        &mut self,
        mode: Mode,
        rd: &mut R,
        out: &Out,
    ) -> Result<SessionEnd, SessionError> {
        // Our Hello (resumed) is already on its way: the writer sends it first.
        let mut dec = Decoder::new();
        expect_hello(read_message_async(rd, &mut dec).await?, Role::Host)?;
        let restored = loop {
            match read_message_async(rd, &mut dec).await? {
                Message::Restored(r) => break r,
                Message::Ping(p) => out.send(Message::Pong(Pong { seq: p.seq })).await?,
                Message::Shutdown(s) => {
                    self.shutdown_for(&s).await;
                    return Ok(SessionEnd { reason: s.reason });
                }
                other => {
                    return Err(SessionError::Unexpected {
                        got: other.kind().name(),
                        state: "before Restored",
                    })
                }
            }
        };
        // Each copy is snapshotted anew only when the host asks again.
        self.prepared = false;
        let answer = crate::restore::apply(mode, &restored, &self.core).await;
        out.send(answer).await?;
        self.run(rd, &mut dec, out).await
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.core.close();
        if let Some(pgid) = self.pgid {
            runtime::signal_group(pgid, libc::SIGKILL);
        }
    }
}

/// External extensions (the logic is in [`crate::extensions`]).
impl Env {
    /// Extension init failed: the runtime is never started; the host hears InitTimeout or
    /// InitError, and later invocations get the error.
    async fn fail_extensions(
        &mut self,
        e: crate::extensions::ExtensionError,
        out: &Out,
    ) -> Result<(), SessionError> {
        crate::system::say(format!("extension init failed: {e}"));
        // Kill whatever extensions run now (dropped), not at the end of the session.
        self.extensions = None;
        if let crate::extensions::ExtensionError::Timeout(after) = e {
            self.init_reported = true;
            self.start_failure = Some(e.report());
            self.core.close();
            let after_ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
            return out
                .send(Message::InitTimeout(InitTimeout { after_ms }))
                .await;
        }
        self.fail_start(e.report(), out).await
    }

    /// Runtime lines feed the Telemetry API only when extensions can subscribe to it.
    fn log_tap(&self) -> Option<crate::extensions::LogTap> {
        self.extensions.as_ref().map(|_| crate::extensions::LogTap {
            core: self.core.clone(),
            extension: None,
        })
    }

    /// The host's Shutdown. With extensions, Lambda's shutdown phase: SIGTERM to the runtime,
    /// SHUTDOWN (the host's reason) to the extensions for the grace, then SIGKILL to all.
    async fn shutdown_for(&mut self, s: &proto::Shutdown) {
        let grace = Duration::from_millis(s.grace_ms);
        let Some(exts) = self.extensions.take() else {
            return self.shutdown(grace).await;
        };
        let deadline = Instant::now() + grace;
        if let (Some(pgid), None) = (self.pgid, self.exited) {
            runtime::signal_group(pgid, libc::SIGTERM);
        }
        exts.shutdown(&self.core, &s.reason, deadline).await;
        if self.exited.is_none() && self.pgid.is_some() {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Ok(info) = tokio::time::timeout(left, wait_exit(&mut self.exit)).await {
                self.exited = Some(info);
            }
        }
        // SIGKILL to the extensions' groups, then the runtime's.
        drop(exts);
        self.shutdown(Duration::ZERO).await;
    }
}

/// Sends a streamed response's events to the host as StreamStart and StreamChunk frames
/// (body pieces split at [`proto::MAX_STREAM_CHUNK_BYTES`]). Awaiting the bounded queue to
/// the host is the backpressure that slows the runtime's upload down.
async fn forward_stream(
    request_id: String,
    mut events: mpsc::Receiver<rapid_api::StreamEvent>,
    out: Out,
) {
    while let Some(ev) = events.recv().await {
        let sent = match ev {
            rapid_api::StreamEvent::Started { content_type } => {
                out.send(Message::StreamStart(proto::StreamStart {
                    request_id: request_id.clone(),
                    content_type,
                }))
                .await
            }
            rapid_api::StreamEvent::Chunk(mut body) => {
                let mut r = Ok(());
                while !body.is_empty() && r.is_ok() {
                    let piece = body.split_to(body.len().min(proto::MAX_STREAM_CHUNK_BYTES));
                    r = out
                        .send(Message::StreamChunk(proto::StreamChunk {
                            request_id: request_id.clone(),
                            payload: piece,
                        }))
                        .await;
                }
                r
            }
        };
        if sent.is_err() {
            // The host is gone; the writer reads the rest of the body and drops it.
            return;
        }
    }
}
