//! The host-guest protocol: one vsock stream between the host agent and `guest-init`.
//!
//! # Transport
//! The guest connects out to the host (CID 2) on port [`HOST_PORT`] as soon as guest-init is
//! up. With Firecracker's hybrid vsock (our VMM's model), that connection arrives at the Unix
//! listener `<uds_path>_<HOST_PORT>` the agent bound before starting the VM. Guest-initiated
//! because the connection itself says "init is up": the host never polls or retries a
//! `CONNECT` into a guest that may still be booting, and it needs no timer other than "boot
//! took too long".
//!
//! # Framing
//! ```text
//! +----------------+--------+----------------+----------------+------------------+
//! | len: u32 LE    | kind   | hlen: u32 LE   | header         | payload          |
//! | bytes after    | u8     | header bytes   | JSON (UTF-8)   | raw bytes        |
//! | this field     |        |                | hlen bytes     | len - 5 - hlen   |
//! +----------------+--------+----------------+----------------+------------------+
//! ```
//! `len` counts kind + hlen + header + payload, so it is at least 5 and at most
//! [`MAX_FRAME_BYTES`]; a larger value is a protocol error, detected before anything is
//! allocated. Headers are at most [`MAX_HEADER_BYTES`], payloads at most
//! [`MAX_PAYLOAD_BYTES`]. Event, response, error and log bodies travel as the payload, raw
//! (never base64); a message kind without a body must have an empty payload. Header JSON
//! fields unknown to the reader are ignored (additions within one protocol version must be
//! optional); anything else that does not parse is [`ProtoError::BadHeader`].
//!
//! # Handshake and versions
//! The first frame each way is [`Message::Hello`] (kind 1, whose layout never changes):
//! the guest sends its Hello right after connecting, the host answers with its own. Each side
//! checks the other's [`Hello::protocol_version`] equals [`PROTOCOL_VERSION`] and its role
//! ([`Hello::check`]); a mismatch is [`ProtoError::VersionMismatch`], after which the guest
//! reports [`Message::Fatal`] and powers off.
//!
//! # Conversation
//! ```text
//! guest                                   host
//!   Hello ------------------------------>
//!   <------------------------------ Hello
//!   <-------------------------- Configure        (exactly once)
//!   Log* ...                                     (runtime output, any time)
//!   Ready | InitError | InitTimeout ---->        (once; RuntimeExit may follow InitError)
//!   <----------------------------- Invoke        (one at a time)
//!   [StreamStart StreamChunk*] ----------->      (only if the Invoke says `stream`)
//!   Response | FunctionError | RuntimeExit ->    (one per Invoke, same request_id)
//!   <---------------------------- Shutdown       (guest stops the runtime and powers off)
//!   <- Ping / Pong ->                            (any time after the handshake)
//!   Fatal ------------------------------>        (guest-init's own failure; it powers off)
//!   <---------------------- PrepareSnapshot      (between invocations)
//!   SnapshotReady ---------------------->        (then the VM is paused and snapshotted)
//!   ... connection lost; guest-init reconnects (each resumed or restored copy):
//!   Hello (resumed) -------------------->
//!   <------------------------------ Hello
//!   <--------------------------- Restored        (clock, host name, entropy payload)
//!   Ready | InitError ------------------>        (then invocations as before)
//! ```

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use bytes::{Buf, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Version of this protocol; both Hellos must carry the same.
pub const PROTOCOL_VERSION: u32 = 1;

/// The host vsock port guest-init connects to (on the host: the Unix socket
/// `<uds_path>_9999`).
pub const HOST_PORT: u32 = 9999;

/// The host's vsock context id.
pub const HOST_CID: u32 = 2;

/// Largest payload: Lambda's 6 MB events and 6 MiB + 100 B responses, with room to spare.
pub const MAX_PAYLOAD_BYTES: usize = 8 * 1024 * 1024;

/// Largest JSON header (a Configure with a full environment is the biggest).
pub const MAX_HEADER_BYTES: usize = 1024 * 1024;

/// How much room an async read asks for at a time.
const READ_CHUNK: usize = 64 * 1024;

/// Bytes between the length field and the header: kind (1) + header length (4).
const FIXED_BYTES: usize = 5;

/// Largest value of the length field.
pub const MAX_FRAME_BYTES: usize = FIXED_BYTES + MAX_HEADER_BYTES + MAX_PAYLOAD_BYTES;

/// What went wrong with a frame or the stream carrying it.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the stream between frames.
    #[error("the peer closed the connection")]
    Closed,
    /// The stream ended inside a frame.
    #[error("the connection ended in the middle of a frame")]
    Truncated,
    #[error("frame length {len} is over the limit of {max} bytes")]
    FrameTooLarge { len: u64, max: usize },
    #[error("frame length {0} is under the minimum of 5 bytes")]
    FrameTooShort(u32),
    #[error(
        "header length {header_len} does not fit a frame of {frame_len} bytes (header limit {max})"
    )]
    BadHeaderLength {
        header_len: u32,
        frame_len: usize,
        max: usize,
    },
    #[error("payload of {len} bytes is over the limit of {max} bytes")]
    PayloadTooLarge { len: usize, max: usize },
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("bad {kind} header: {source}")]
    BadHeader {
        kind: &'static str,
        source: serde_json::Error,
    },
    #[error("encoding a {kind} header: {source}")]
    Encode {
        kind: &'static str,
        source: serde_json::Error,
    },
    #[error("a {kind} message carries no payload, got {len} bytes")]
    UnexpectedPayload { kind: &'static str, len: usize },
    #[error(
        "protocol version mismatch: we speak {ours}, the peer ({peer_software}) speaks {theirs}"
    )]
    VersionMismatch {
        ours: u32,
        theirs: u32,
        peer_software: String,
    },
    #[error("expected a Hello from the {expected}, got one from the {got}")]
    WrongRole { expected: Role, got: Role },
    #[error("expected {expected}, got {got}")]
    UnexpectedMessage {
        expected: &'static str,
        got: &'static str,
    },
}

/// Which end of the connection a Hello comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Host,
    Guest,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Host => "host",
            Role::Guest => "guest",
        })
    }
}

/// Both ways, first frame. Kind 1 and these three fields are the same in every version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    pub role: Role,
    /// Free text for logs, e.g. `guest-init 0.1.0`.
    pub software: String,
    /// Guest only: this connection replaces one lost after [`SnapshotReady`] (the VM was
    /// snapshotted and is now a resumed or restored copy); the host answers with
    /// [`Restored`] instead of [`Configure`]. Absent (false) from older peers.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resumed: bool,
}

impl Hello {
    /// This build's Hello for `role`.
    pub fn new(role: Role) -> Self {
        let name = match role {
            Role::Host => "kindling",
            Role::Guest => "guest-init",
        };
        Hello {
            protocol_version: PROTOCOL_VERSION,
            role,
            software: format!("{name} {}", env!("CARGO_PKG_VERSION")),
            resumed: false,
        }
    }

    /// The guest's Hello on a connection made after a snapshot.
    pub fn resumed() -> Self {
        Hello {
            resumed: true,
            ..Hello::new(Role::Guest)
        }
    }

    /// Checks a peer's Hello: same protocol version, the expected role.
    pub fn check(&self, expected: Role) -> Result<(), ProtoError> {
        if self.protocol_version != PROTOCOL_VERSION {
            return Err(ProtoError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: self.protocol_version,
                peer_software: self.software.clone(),
            });
        }
        if self.role != expected {
            return Err(ProtoError::WrongRole {
                expected,
                got: self.role,
            });
        }
        Ok(())
    }
}

/// Takes the first message of a connection: it must be a Hello from `expected` that passes
/// [`Hello::check`].
pub fn expect_hello(message: Message, expected: Role) -> Result<Hello, ProtoError> {
    match message {
        Message::Hello(h) => {
            h.check(expected)?;
            Ok(h)
        }
        other => Err(ProtoError::UnexpectedMessage {
            expected: "Hello",
            got: other.kind().name(),
        }),
    }
}

/// How guest-init starts the function's runtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum RuntimeKind {
    /// `provided.*`: `<task_root>/bootstrap`, else `/opt/bootstrap`.
    Provided,
    /// `pythonX.Y`: `<interpreter> -m awslambdaric <handler>`.
    Python {
        #[serde(default = "default_python")]
        interpreter: String,
    },
    /// A container image: its start-up config at `config_path` (see [`crate::image`]), each
    /// part replaced by the function's `ImageConfig` override when given.
    Image {
        #[serde(default = "default_image_config")]
        config_path: String,
        #[serde(default)]
        entrypoint: Option<Vec<String>>,
        #[serde(default)]
        command: Option<Vec<String>>,
        #[serde(default)]
        working_dir: Option<String>,
    },
}

fn default_image_config() -> String {
    crate::image::IMAGE_CONFIG_PATH.into()
}

fn default_python() -> String {
    "python3".into()
}

/// The user the runtime runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    /// Lambda's `sbx_user1051`: uid 993, gid 990.
    pub const LAMBDA: RunAs = RunAs { uid: 993, gid: 990 };
}

/// Host -> guest, once, after the Hellos: what to run and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Configure {
    pub function_name: String,
    pub function_version: String,
    pub handler: String,
    pub memory_mb: u32,
    /// The function timeout (the host enforces it; informational in the guest).
    pub timeout_ms: u64,
    pub region: String,
    pub runtime: RuntimeKind,
    /// The runtime's cwd and where `bootstrap` is looked for, e.g. `/var/task`.
    pub task_root: String,
    /// The complete environment of the runtime: Lambda's variables and the function's own
    /// (see [`crate::env::lambda_variables`]). guest-init adds only `AWS_LAMBDA_RUNTIME_API`,
    /// which it always sets itself.
    pub environment: BTreeMap<String, String>,
    /// How long the runtime may take to reach its first `/next`; 0 = no limit in the guest
    /// (the host keeps its own limit either way). When it passes, guest-init kills the
    /// runtime and sends [`InitTimeout`].
    pub init_timeout_ms: u64,
    /// Who the runtime runs as; `None` = guest-init's own user (tests, debugging).
    #[serde(default)]
    pub run_as: Option<RunAs>,
    /// Host name to set in the guest (PID 1 mode only).
    #[serde(default)]
    pub hostname: Option<String>,
    /// The host's wall clock when it sent this, milliseconds since the Unix epoch. A guest
    /// clock more than a second off is set to it (PID 1 mode only): runtimes compute the
    /// time left from `Invoke::deadline_ms` and the guest's clock.
    #[serde(default)]
    pub host_time_ms: Option<u64>,
    /// Random bytes from the host, hex-encoded, credited to the guest kernel's RNG before
    /// anything starts (PID 1 mode only). Without a hardware RNG the kernel may not have
    /// seeded its CRNG yet at this point of boot, and a process calling getrandom(2) (an
    /// extension's client making a UUID, guest-init registering it) would block.
    #[serde(default)]
    pub entropy_hex: Option<String>,
}

/// Lowercase hex of `bytes` (for [`Configure::entropy_hex`]).
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of a hex string; `None` when it is not hex.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Host -> guest: one invocation. The payload is the event, raw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invoke {
    pub request_id: String,
    pub invocation_id: String,
    /// Deadline, milliseconds since the Unix epoch (passed to the runtime as is).
    pub deadline_ms: u64,
    pub function_arn: String,
    #[serde(default)]
    pub trace_id: Option<String>,
    #[serde(default)]
    pub client_context: Option<String>,
    #[serde(default)]
    pub cognito_identity: Option<String>,
    #[serde(default)]
    pub tenant_id: Option<String>,
    pub content_type: String,
    /// The caller takes a streamed response (InvokeWithResponseStream): a runtime that
    /// streams is answered with [`StreamStart`], [`StreamChunk`]s, then the usual Response
    /// (empty payload) or FunctionError. Absent (false) from older hosts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
    #[serde(skip)]
    pub payload: Bytes,
}

/// Host -> guest: stop the runtime and power off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shutdown {
    /// `spindown`, `timeout`, `failure`, ... (for logs).
    pub reason: String,
    /// Time the runtime gets between SIGTERM and SIGKILL. Relative, because the guest's
    /// clock is not to be trusted.
    pub grace_ms: u64,
}

/// Liveness probe, answered by a [`Pong`] with the same `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    pub seq: u64,
}

/// Guest -> host: the answer to a [`Ping`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    pub seq: u64,
}

/// Guest -> host: the runtime reached its first `/next`; init is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    /// From spawning the runtime to its first `/next`.
    pub init_duration_us: u64,
}

/// Guest -> host: init failed (`/init/error`, or the runtime could not be started). The
/// payload is the JSON error document for the caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitError {
    /// Normalised type, e.g. `Runtime.InvalidEntrypoint`, `Runtime.ImportModuleError`.
    pub error_type: String,
    #[serde(skip)]
    pub body: Bytes,
}

/// Guest -> host: the runtime did not reach `/next` within `Configure::init_timeout_ms`; it
/// has been killed (a [`RuntimeExit`] follows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitTimeout {
    pub after_ms: u64,
}

/// Guest -> host: the runtime's response to an invocation; the payload is the body, raw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub request_id: String,
    #[serde(default)]
    pub content_type: Option<String>,
    #[serde(skip)]
    pub payload: Bytes,
}

/// Guest -> host: the invocation failed (the runtime's `/error`, or a platform error such as
/// `Function.ResponseSizeTooLarge`). The payload is the JSON error document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionError {
    pub request_id: String,
    pub error_type: String,
    #[serde(default)]
    pub xray_cause: Option<String>,
    #[serde(skip)]
    pub body: Bytes,
}

/// Guest -> host: the runtime process exited. `request_id` is the invocation it held (which
/// gets no other answer), if any. After this the environment is dead: Invokes are answered
/// with another RuntimeExit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeExit {
    #[serde(default)]
    pub request_id: Option<String>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub signal: Option<i32>,
    /// `exit status 42`, `signal: killed`, ... (Lambda's wording for `Runtime.ExitError`).
    pub description: String,
}

/// Which output stream a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Guest -> host: one line of the runtime's output, raw, without its newline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Log {
    pub stream: Stream,
    /// The line was cut at the length limit (or at the end of the stream): the rest, if
    /// any, follows in the next Log of this stream.
    #[serde(default)]
    pub partial: bool,
    /// The line comes from this external extension, not the runtime. Absent for runtime
    /// lines (and from older guests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extension: Option<String>,
    #[serde(skip)]
    pub line: Bytes,
}

/// Guest -> host: the runtime started a streamed response to `request_id` (only when the
/// Invoke asked for `stream`). [`StreamChunk`]s follow, then a Response (empty payload) or a
/// FunctionError for the same request ends the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamStart {
    pub request_id: String,
    #[serde(default)]
    pub content_type: Option<String>,
}

/// Guest -> host: the next piece of a streamed response, raw, at most
/// [`MAX_STREAM_CHUNK_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamChunk {
    pub request_id: String,
    #[serde(skip)]
    pub payload: Bytes,
}

/// Largest [`StreamChunk`] payload a guest sends (bigger body pieces are split): bounds what
/// the guest's output queue holds.
pub const MAX_STREAM_CHUNK_BYTES: usize = 256 * 1024;

/// Guest -> host: guest-init itself failed; it powers off after sending this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fatal {
    pub message: String,
}

/// Host -> guest, between invocations after Ready: the VM is about to be snapshotted. The
/// guest makes sure the runtime is idle (in `/next`, or `/restore/next` for snap-start),
/// lets queued logs out and answers [`SnapshotReady`]; from then on a lost host connection
/// means "snapshotted", and guest-init reconnects (see `guest_init::restore`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareSnapshot {
    /// How long the guest may wait for the runtime to become idle.
    pub idle_timeout_ms: u64,
}

/// Guest -> host: the answer to [`PrepareSnapshot`]. `refused` says why the VM must not be
/// snapshotted (the runtime is busy, has exited, init failed); nothing changed then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotReady {
    #[serde(default)]
    pub refused: Option<String>,
}

/// Host -> guest, first after the Hellos on a resumed connection: this copy of the VM gets
/// its own clock, identity and entropy before it serves. The payload is the entropy: raw
/// random bytes from the host, mixed into the guest kernel's RNG (PID 1 mode only). The
/// guest answers Ready (`init_duration_us` = its restore time) or InitError (the runtime's
/// after-restore hook failed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restored {
    /// The host's wall clock, ms since the Unix epoch: the guest clock is set to it.
    pub host_time_ms: u64,
    /// The new host name (identity) of this copy.
    #[serde(default)]
    pub hostname: Option<String>,
    /// This environment's log stream (informational: the runtime keeps its environment).
    #[serde(default)]
    pub log_stream: Option<String>,
    #[serde(skip)]
    pub entropy: Bytes,
}

/// Message kinds: the byte after the frame length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Configure = 0x10,
    Invoke = 0x11,
    Shutdown = 0x12,
    Ping = 0x13,
    Ready = 0x20,
    InitError = 0x21,
    InitTimeout = 0x22,
    Response = 0x23,
    FunctionError = 0x24,
    RuntimeExit = 0x25,
    Log = 0x26,
    Pong = 0x27,
    Fatal = 0x28,
    PrepareSnapshot = 0x14,
    Restored = 0x15,
    SnapshotReady = 0x29,
    StreamStart = 0x2a,
    StreamChunk = 0x2b,
}

impl Kind {
    const ALL: [Kind; 19] = [
        Kind::Hello,
        Kind::Configure,
        Kind::Invoke,
        Kind::Shutdown,
        Kind::Ping,
        Kind::Ready,
        Kind::InitError,
        Kind::InitTimeout,
        Kind::Response,
        Kind::FunctionError,
        Kind::RuntimeExit,
        Kind::Log,
        Kind::Pong,
        Kind::Fatal,
        Kind::PrepareSnapshot,
        Kind::Restored,
        Kind::SnapshotReady,
        Kind::StreamStart,
        Kind::StreamChunk,
    ];

    pub fn from_u8(b: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| *k as u8 == b)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Hello => "Hello",
            Kind::Configure => "Configure",
            Kind::Invoke => "Invoke",
            Kind::Shutdown => "Shutdown",
            Kind::Ping => "Ping",
            Kind::Ready => "Ready",
            Kind::InitError => "InitError",
            Kind::InitTimeout => "InitTimeout",
            Kind::Response => "Response",
            Kind::FunctionError => "FunctionError",
            Kind::RuntimeExit => "RuntimeExit",
            Kind::Log => "Log",
            Kind::Pong => "Pong",
            Kind::Fatal => "Fatal",
            Kind::PrepareSnapshot => "PrepareSnapshot",
            Kind::Restored => "Restored",
            Kind::SnapshotReady => "SnapshotReady",
            Kind::StreamStart => "StreamStart",
            Kind::StreamChunk => "StreamChunk",
        }
    }
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    // both ways
    Hello(Hello),
    // host -> guest
    Configure(Box<Configure>),
    Invoke(Box<Invoke>),
    Shutdown(Shutdown),
    Ping(Ping),
    // guest -> host
    Ready(Ready),
    InitError(InitError),
    InitTimeout(InitTimeout),
    Response(Response),
    FunctionError(FunctionError),
    RuntimeExit(RuntimeExit),
    Log(Log),
    Pong(Pong),
    Fatal(Fatal),
    // snapshots (see `PrepareSnapshot`)
    PrepareSnapshot(PrepareSnapshot),
    Restored(Box<Restored>),
    SnapshotReady(SnapshotReady),
    // response streaming (see `StreamStart`)
    StreamStart(StreamStart),
    StreamChunk(StreamChunk),
}

impl Message {
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::Configure(_) => Kind::Configure,
            Message::Invoke(_) => Kind::Invoke,
            Message::Shutdown(_) => Kind::Shutdown,
            Message::Ping(_) => Kind::Ping,
            Message::Ready(_) => Kind::Ready,
            Message::InitError(_) => Kind::InitError,
            Message::InitTimeout(_) => Kind::InitTimeout,
            Message::Response(_) => Kind::Response,
            Message::FunctionError(_) => Kind::FunctionError,
            Message::RuntimeExit(_) => Kind::RuntimeExit,
            Message::Log(_) => Kind::Log,
            Message::Pong(_) => Kind::Pong,
            Message::Fatal(_) => Kind::Fatal,
            Message::PrepareSnapshot(_) => Kind::PrepareSnapshot,
            Message::Restored(_) => Kind::Restored,
            Message::SnapshotReady(_) => Kind::SnapshotReady,
            Message::StreamStart(_) => Kind::StreamStart,
            Message::StreamChunk(_) => Kind::StreamChunk,
        }
    }

    /// The header JSON and the payload of this message.
    fn header_and_payload(&self) -> Result<(Vec<u8>, &[u8]), ProtoError> {
        fn json<T: Serialize>(kind: Kind, v: &T) -> Result<Vec<u8>, ProtoError> {
            serde_json::to_vec(v).map_err(|source| ProtoError::Encode {
                kind: kind.name(),
                source,
            })
        }
        let k = self.kind();
        let none: &[u8] = &[];
        Ok(match self {
            Message::Hello(m) => (json(k, m)?, none),
            Message::Configure(m) => (json(k, m)?, none),
            Message::Invoke(m) => (json(k, m)?, &m.payload[..]),
            Message::Shutdown(m) => (json(k, m)?, none),
            Message::Ping(m) => (json(k, m)?, none),
            Message::Ready(m) => (json(k, m)?, none),
            Message::InitError(m) => (json(k, m)?, &m.body[..]),
            Message::InitTimeout(m) => (json(k, m)?, none),
            Message::Response(m) => (json(k, m)?, &m.payload[..]),
            Message::FunctionError(m) => (json(k, m)?, &m.body[..]),
            Message::RuntimeExit(m) => (json(k, m)?, none),
            Message::Log(m) => (json(k, m)?, &m.line[..]),
            Message::Pong(m) => (json(k, m)?, none),
            Message::Fatal(m) => (json(k, m)?, none),
            Message::PrepareSnapshot(m) => (json(k, m)?, none),
            Message::Restored(m) => (json(k, m)?, &m.entropy[..]),
            Message::SnapshotReady(m) => (json(k, m)?, none),
            Message::StreamStart(m) => (json(k, m)?, none),
            Message::StreamChunk(m) => (json(k, m)?, &m.payload[..]),
        })
    }

    /// The frame split in two: everything up to the payload, and the payload (so that a
    /// large body can be written without copying it).
    pub fn frame_parts(&self) -> Result<(Vec<u8>, &[u8]), ProtoError> {
        let (header, payload) = self.header_and_payload()?;
        if header.len() > MAX_HEADER_BYTES {
            return Err(ProtoError::BadHeaderLength {
                header_len: u32::try_from(header.len()).unwrap_or(u32::MAX),
                frame_len: FIXED_BYTES + header.len() + payload.len(),
                max: MAX_HEADER_BYTES,
            });
        }
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(ProtoError::PayloadTooLarge {
                len: payload.len(),
                max: MAX_PAYLOAD_BYTES,
            });
        }
        // Both fit in u32: they are under the limits checked above.
        let len = (FIXED_BYTES + header.len() + payload.len()) as u32;
        let mut head = Vec::with_capacity(4 + FIXED_BYTES + header.len());
        head.extend_from_slice(&len.to_le_bytes());
        head.push(self.kind() as u8);
        head.extend_from_slice(&(header.len() as u32).to_le_bytes());
        head.extend_from_slice(&header);
        Ok((head, payload))
    }
}

/// Encodes one message as a complete frame.
pub fn encode(message: &Message) -> Result<Vec<u8>, ProtoError> {
    let (mut head, payload) = message.frame_parts()?;
    head.extend_from_slice(payload);
    Ok(head)
}

/// Writes one frame (blocking).
pub fn write_message(w: &mut impl Write, message: &Message) -> Result<(), ProtoError> {
    let (head, payload) = message.frame_parts()?;
    w.write_all(&head)?;
    w.write_all(payload)?;
    w.flush()?;
    Ok(())
}

/// Writes one frame to an async stream and flushes it.
pub async fn write_message_async<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    message: &Message,
) -> Result<(), ProtoError> {
    let (head, payload) = message.frame_parts()?;
    w.write_all(&head).await?;
    w.write_all(payload).await?;
    w.flush().await?;
    Ok(())
}

fn check_len(len: u32) -> Result<usize, ProtoError> {
    let n = len as usize;
    if n > MAX_FRAME_BYTES {
        return Err(ProtoError::FrameTooLarge {
            len: u64::from(len),
            max: MAX_FRAME_BYTES,
        });
    }
    if n < FIXED_BYTES {
        return Err(ProtoError::FrameTooShort(len));
    }
    Ok(n)
}

/// Reads one frame (blocking). A clean end of stream between frames is
/// [`ProtoError::Closed`]; inside a frame, [`ProtoError::Truncated`].
pub fn read_message(r: &mut impl Read) -> Result<Message, ProtoError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Err(ProtoError::Closed),
            Ok(0) => return Err(ProtoError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let n = check_len(u32::from_le_bytes(len))?;
    // Grown as data arrives: a peer announcing a big frame and sending nothing costs little.
    let mut body = Vec::with_capacity(n.min(64 * 1024));
    r.take(n as u64).read_to_end(&mut body)?;
    if body.len() < n {
        return Err(ProtoError::Truncated);
    }
    parse_body(Bytes::from(body))
}

/// Reads one message from an async stream through `decoder` (which keeps bytes read past the
/// frame for the next call). Cancel-safe: bytes read before a cancellation stay in `decoder`.
pub async fn read_message_async<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    decoder: &mut Decoder,
) -> Result<Message, ProtoError> {
    loop {
        if let Some(m) = decoder.next()? {
            return Ok(m);
        }
        decoder.buf.reserve(READ_CHUNK);
        // Straight into the decoder's buffer; read_buf is cancel-safe.
        let n = r.read_buf(&mut decoder.buf).await?;
        if n == 0 {
            return Err(if decoder.buffered() == 0 {
                ProtoError::Closed
            } else {
                ProtoError::Truncated
            });
        }
    }
}

/// Parses a frame without its length field.
fn parse_body(body: Bytes) -> Result<Message, ProtoError> {
    let frame_len = body.len();
    let kind_byte = body[0];
    let header_len = u32::from_le_bytes([body[1], body[2], body[3], body[4]]);
    let h = header_len as usize;
    if h > MAX_HEADER_BYTES || h > frame_len - FIXED_BYTES {
        return Err(ProtoError::BadHeaderLength {
            header_len,
            frame_len,
            max: MAX_HEADER_BYTES,
        });
    }
    let kind = Kind::from_u8(kind_byte).ok_or(ProtoError::UnknownKind(kind_byte))?;
    let header = body.slice(FIXED_BYTES..FIXED_BYTES + h);
    let payload = body.slice(FIXED_BYTES + h..);
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(ProtoError::PayloadTooLarge {
            len: payload.len(),
            max: MAX_PAYLOAD_BYTES,
        });
    }
    decode(kind, &header, payload)
}

fn decode(kind: Kind, header: &[u8], payload: Bytes) -> Result<Message, ProtoError> {
    fn hdr<T: DeserializeOwned>(kind: Kind, header: &[u8]) -> Result<T, ProtoError> {
        serde_json::from_slice(header).map_err(|source| ProtoError::BadHeader {
            kind: kind.name(),
            source,
        })
    }
    let bare = |payload: &Bytes| {
        if payload.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::UnexpectedPayload {
                kind: kind.name(),
                len: payload.len(),
            })
        }
    };
    Ok(match kind {
        Kind::Hello => {
            bare(&payload)?;
            Message::Hello(hdr(kind, header)?)
        }
        Kind::Configure => {
            bare(&payload)?;
            Message::Configure(Box::new(hdr(kind, header)?))
        }
        Kind::Invoke => {
            let mut m: Invoke = hdr(kind, header)?;
            m.payload = payload;
            Message::Invoke(Box::new(m))
        }
        Kind::Shutdown => {
            bare(&payload)?;
            Message::Shutdown(hdr(kind, header)?)
        }
        Kind::Ping => {
            bare(&payload)?;
            Message::Ping(hdr(kind, header)?)
        }
        Kind::Ready => {
            bare(&payload)?;
            Message::Ready(hdr(kind, header)?)
        }
        Kind::InitError => {
            let mut m: InitError = hdr(kind, header)?;
            m.body = payload;
            Message::InitError(m)
        }
        Kind::InitTimeout => {
            bare(&payload)?;
            Message::InitTimeout(hdr(kind, header)?)
        }
        Kind::Response => {
            let mut m: Response = hdr(kind, header)?;
            m.payload = payload;
            Message::Response(m)
        }
        Kind::FunctionError => {
            let mut m: FunctionError = hdr(kind, header)?;
            m.body = payload;
            Message::FunctionError(m)
        }
        Kind::RuntimeExit => {
            bare(&payload)?;
            Message::RuntimeExit(hdr(kind, header)?)
        }
        Kind::Log => {
            let mut m: Log = hdr(kind, header)?;
            m.line = payload;
            Message::Log(m)
        }
        Kind::Pong => {
            bare(&payload)?;
            Message::Pong(hdr(kind, header)?)
        }
        Kind::Fatal => {
            bare(&payload)?;
            Message::Fatal(hdr(kind, header)?)
        }
        Kind::PrepareSnapshot => {
            bare(&payload)?;
            Message::PrepareSnapshot(hdr(kind, header)?)
        }
        Kind::Restored => {
            let mut m: Restored = hdr(kind, header)?;
            m.entropy = payload;
            Message::Restored(Box::new(m))
        }
        Kind::SnapshotReady => {
            bare(&payload)?;
            Message::SnapshotReady(hdr(kind, header)?)
        }
        Kind::StreamStart => {
            bare(&payload)?;
            Message::StreamStart(hdr(kind, header)?)
        }
        Kind::StreamChunk => {
            let mut m: StreamChunk = hdr(kind, header)?;
            m.payload = payload;
            Message::StreamChunk(m)
        }
    })
}

/// Incremental decoder for non-blocking readers: [`push`](Decoder::push) the bytes as they
/// arrive, then call [`next`](Decoder::next) until it returns `Ok(None)` (more data needed).
///
/// After an error the stream is out of step and the connection must be dropped.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: BytesMut,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held that do not yet make a whole frame (non-zero at end of stream means the
    /// stream was cut inside a frame).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole message, `Ok(None)` when more bytes are needed.
    #[allow(clippy::should_implement_trait)] // fallible, so not an Iterator
    pub fn next(&mut self) -> Result<Option<Message>, ProtoError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        let n = check_len(len)?;
        if self.buf.len() < 4 + n {
            self.buf.reserve(4 + n - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(4);
        let body = self.buf.split_to(n).freeze();
        parse_body(body).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configure() -> Configure {
        Configure {
            function_name: "f".into(),
            function_version: "$LATEST".into(),
            handler: "app.handler".into(),
            memory_mb: 128,
            timeout_ms: 3000,
            region: "us-east-1".into(),
            runtime: RuntimeKind::Python {
                interpreter: "python3".into(),
            },
            task_root: "/var/task".into(),
            environment: [("A".to_string(), "b=c".to_string())].into(),
            init_timeout_ms: 10_000,
            run_as: Some(RunAs::LAMBDA),
            hostname: Some("h".into()),
            host_time_ms: Some(1_700_000_000_000),
            entropy_hex: Some("00ff7f".into()),
        }
    }

    fn binary() -> Bytes {
        Bytes::from(
            (0..=255u8)
                .chain([0, b'\n', 0xff, 0xfe])
                .collect::<Vec<_>>(),
        )
    }

    fn every_message() -> Vec<Message> {
        vec![
            Message::Hello(Hello::new(Role::Guest)),
            Message::Hello(Hello::new(Role::Host)),
            Message::Configure(Box::new(configure())),
            Message::Configure(Box::new(Configure {
                runtime: RuntimeKind::Provided,
                run_as: None,
                hostname: None,
                host_time_ms: None,
                entropy_hex: None,
                environment: BTreeMap::new(),
                ..configure()
            })),
            Message::Invoke(Box::new(Invoke {
                request_id: "r1".into(),
                invocation_id: "i1".into(),
                deadline_ms: 1_700_000_000_000,
                function_arn: "arn:aws:lambda:us-east-1:000000000000:function:f".into(),
                trace_id: Some("Root=1-abc".into()),
                client_context: Some("{\"custom\":{}}".into()),
                cognito_identity: Some("{}".into()),
                tenant_id: None,
                content_type: "application/json".into(),
                stream: false,
                payload: binary(),
            })),
            Message::Invoke(Box::new(Invoke {
                request_id: "r2".into(),
                invocation_id: "i2".into(),
                deadline_ms: 0,
                function_arn: String::new(),
                trace_id: None,
                client_context: None,
                cognito_identity: None,
                tenant_id: Some("t".into()),
                content_type: "application/json".into(),
                stream: true,
                payload: Bytes::new(),
            })),
            Message::Shutdown(Shutdown {
                reason: "spindown".into(),
                grace_ms: 2000,
            }),
            Message::Ping(Ping { seq: u64::MAX }),
            Message::Ready(Ready {
                init_duration_us: 12345,
            }),
            Message::InitError(InitError {
                error_type: "Runtime.ImportModuleError".into(),
                body: Bytes::from_static(b"{\"errorMessage\":\"no\"}"),
            }),
            Message::InitTimeout(InitTimeout { after_ms: 10_000 }),
            Message::Response(Response {
                request_id: "r1".into(),
                content_type: Some("application/octet-stream".into()),
                payload: binary(),
            }),
            Message::Response(Response {
                request_id: "r1".into(),
                content_type: None,
                payload: Bytes::new(),
            }),
            Message::FunctionError(FunctionError {
                request_id: "r1".into(),
                error_type: "Function.MyError".into(),
                xray_cause: Some("{}".into()),
                body: binary(),
            }),
            Message::RuntimeExit(RuntimeExit {
                request_id: Some("r1".into()),
                exit_code: Some(42),
                signal: None,
                description: "exit status 42".into(),
            }),
            Message::Log(Log {
                stream: Stream::Stderr,
                partial: true,
                extension: None,
                line: binary(),
            }),
            Message::Log(Log {
                stream: Stream::Stdout,
                partial: false,
                extension: Some("ext-a".into()),
                line: binary(),
            }),
            Message::StreamStart(StreamStart {
                request_id: "r1".into(),
                content_type: Some("text/plain".into()),
            }),
            Message::StreamChunk(StreamChunk {
                request_id: "r1".into(),
                payload: binary(),
            }),
            Message::Pong(Pong { seq: 7 }),
            Message::Fatal(Fatal {
                message: "could not mount /proc: ENOENT".into(),
            }),
            Message::Hello(Hello::resumed()),
            Message::PrepareSnapshot(PrepareSnapshot {
                idle_timeout_ms: 5000,
            }),
            Message::SnapshotReady(SnapshotReady { refused: None }),
            Message::SnapshotReady(SnapshotReady {
                refused: Some("busy".into()),
            }),
            Message::Restored(Box::new(Restored {
                host_time_ms: 1_700_000_000_000,
                hostname: Some("kindling-x".into()),
                log_stream: Some("2024/01/01/[$LATEST]x".into()),
                entropy: binary(),
            })),
        ]
    }

    #[test]
    fn hex_round_trips_and_refuses_non_hex() {
        let bytes = [0u8, 0x7f, 0xff, 0x10];
        assert_eq!(to_hex(&bytes), "007fff10");
        assert_eq!(from_hex("007fff10"), Some(bytes.to_vec()));
        assert_eq!(from_hex("007FFF10"), Some(bytes.to_vec()));
        assert_eq!(from_hex(""), Some(Vec::new()));
        assert_eq!(from_hex("0"), None);
        assert_eq!(from_hex("zz"), None);
        assert_eq!(from_hex("é1"), None);
    }

    #[test]
    fn every_message_round_trips_blocking_and_incremental() {
        let all = every_message();
        let mut stream = Vec::new();
        for m in &all {
            let frame = encode(m).unwrap();
            let mut cursor = &frame[..];
            assert_eq!(&read_message(&mut cursor).unwrap(), m);
            assert!(cursor.is_empty());
            write_message(&mut stream, m).unwrap();
        }
        // The whole stream through the decoder, one byte at a time.
        let mut d = Decoder::new();
        let mut got = Vec::new();
        for b in &stream {
            d.push(std::slice::from_ref(b));
            while let Some(m) = d.next().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, all);
        assert_eq!(d.buffered(), 0);
        // And through the blocking reader, back to back, ending cleanly.
        let mut cursor = &stream[..];
        for m in &all {
            assert_eq!(&read_message(&mut cursor).unwrap(), m);
        }
        assert!(matches!(read_message(&mut cursor), Err(ProtoError::Closed)));
    }

    #[test]
    fn kinds_are_stable() {
        for k in Kind::ALL {
            assert_eq!(Kind::from_u8(k as u8), Some(k));
        }
        assert_eq!(Kind::Hello as u8, 1);
        assert_eq!(Kind::from_u8(0), None);
    }

    #[test]
    fn frame_layout_is_as_documented() {
        let m = Message::Log(Log {
            stream: Stream::Stdout,
            partial: false,
            extension: None,
            line: Bytes::from_static(b"hi\x00"),
        });
        let f = encode(&m).unwrap();
        let header = br#"{"stream":"stdout","partial":false}"#;
        let len = u32::from_le_bytes(f[0..4].try_into().unwrap()) as usize;
        assert_eq!(len, f.len() - 4);
        assert_eq!(f[4], 0x26);
        assert_eq!(
            u32::from_le_bytes(f[5..9].try_into().unwrap()) as usize,
            header.len()
        );
        assert_eq!(&f[9..9 + header.len()], header);
        assert_eq!(&f[9 + header.len()..], b"hi\x00");
    }

    #[test]
    fn truncated_frames_need_more_data() {
        let frame = encode(&every_message()[4]).unwrap();
        for cut in 0..frame.len() {
            let mut d = Decoder::new();
            d.push(&frame[..cut]);
            assert!(d.next().unwrap().is_none(), "cut at {cut}");
            assert_eq!(d.buffered(), cut);
            d.push(&frame[cut..]);
            assert!(d.next().unwrap().is_some());
            // The blocking reader sees a cut stream as Truncated (or Closed at 0).
            let mut cursor = &frame[..cut];
            match read_message(&mut cursor) {
                Err(ProtoError::Closed) => assert_eq!(cut, 0),
                Err(ProtoError::Truncated) => assert!(cut > 0),
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    fn frame(kind: u8, header: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&((5 + header.len() + payload.len()) as u32).to_le_bytes());
        f.push(kind);
        f.extend_from_slice(&(header.len() as u32).to_le_bytes());
        f.extend_from_slice(header);
        f.extend_from_slice(payload);
        f
    }

    fn decode_one(bytes: &[u8]) -> Result<Option<Message>, ProtoError> {
        let mut d = Decoder::new();
        d.push(bytes);
        d.next()
    }

    #[test]
    fn oversized_and_undersized_lengths_are_errors_before_allocation() {
        let huge = u32::MAX.to_le_bytes();
        assert!(matches!(
            decode_one(&huge),
            Err(ProtoError::FrameTooLarge { .. })
        ));
        assert!(matches!(
            read_message(&mut &huge[..]),
            Err(ProtoError::FrameTooLarge { .. })
        ));
        let just_over = ((MAX_FRAME_BYTES + 1) as u32).to_le_bytes();
        assert!(matches!(
            decode_one(&just_over),
            Err(ProtoError::FrameTooLarge { .. })
        ));
        let short = 4u32.to_le_bytes();
        assert!(matches!(
            decode_one(&short),
            Err(ProtoError::FrameTooShort(4))
        ));
        // Header length pointing past the frame.
        let mut f = frame(Kind::Ping as u8, b"{\"seq\":1}", b"");
        f[5..9].copy_from_slice(&100u32.to_le_bytes());
        assert!(matches!(
            decode_one(&f),
            Err(ProtoError::BadHeaderLength {
                header_len: 100,
                ..
            })
        ));
        // Encoding refuses what the reader would refuse.
        let big = Message::Response(Response {
            request_id: "r".into(),
            content_type: None,
            payload: Bytes::from(vec![0u8; MAX_PAYLOAD_BYTES + 1]),
        });
        assert!(matches!(
            encode(&big),
            Err(ProtoError::PayloadTooLarge { .. })
        ));
        // A maximal payload is fine.
        let max = Message::Response(Response {
            request_id: "r".into(),
            content_type: None,
            payload: Bytes::from(vec![7u8; MAX_PAYLOAD_BYTES]),
        });
        assert_eq!(decode_one(&encode(&max).unwrap()).unwrap(), Some(max));
    }

    #[test]
    fn unknown_kind_bad_header_and_stray_payload_are_errors() {
        assert!(matches!(
            decode_one(&frame(0x7f, b"{}", b"")),
            Err(ProtoError::UnknownKind(0x7f))
        ));
        assert!(matches!(
            decode_one(&frame(Kind::Ping as u8, b"{not json", b"")),
            Err(ProtoError::BadHeader { kind: "Ping", .. })
        ));
        assert!(matches!(
            decode_one(&frame(Kind::Invoke as u8, b"{\"request_id\":1}", b"x")),
            Err(ProtoError::BadHeader { kind: "Invoke", .. })
        ));
        assert!(matches!(
            decode_one(&frame(Kind::Ping as u8, b"{\"seq\":1}", b"x")),
            Err(ProtoError::UnexpectedPayload {
                kind: "Ping",
                len: 1
            })
        ));
        // Unknown header fields are ignored (additions within a version).
        assert_eq!(
            decode_one(&frame(Kind::Ping as u8, b"{\"seq\":1,\"new\":true}", b"")).unwrap(),
            Some(Message::Ping(Ping { seq: 1 }))
        );
    }

    #[test]
    fn hello_checks_version_and_role() {
        assert!(Hello::new(Role::Host).check(Role::Host).is_ok());
        let old = Hello {
            protocol_version: 0,
            role: Role::Host,
            software: "kindling 0.0.1".into(),
            resumed: false,
        };
        let e = old.check(Role::Host).unwrap_err();
        assert!(matches!(
            e,
            ProtoError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: 0,
                ..
            }
        ));
        assert!(e.to_string().contains("kindling 0.0.1"), "{e}");
        assert!(matches!(
            Hello::new(Role::Guest).check(Role::Host),
            Err(ProtoError::WrongRole {
                expected: Role::Host,
                got: Role::Guest
            })
        ));
        assert!(matches!(
            expect_hello(Message::Ping(Ping { seq: 1 }), Role::Host),
            Err(ProtoError::UnexpectedMessage {
                expected: "Hello",
                got: "Ping"
            })
        ));
        // A future version's Hello still parses (so the mismatch can be reported).
        let future = frame(
            1,
            br#"{"protocol_version":9,"role":"host","software":"x","extra":[1]}"#,
            b"",
        );
        let m = decode_one(&future).unwrap().unwrap();
        assert!(matches!(
            expect_hello(m, Role::Host),
            Err(ProtoError::VersionMismatch { theirs: 9, .. })
        ));
    }

    #[tokio::test]
    async fn async_reader_and_writer() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let all = every_message();
        let sent = all.clone();
        let writer = tokio::spawn(async move {
            for m in &sent {
                write_message_async(&mut a, m).await.unwrap();
            }
            // Half a frame, then EOF.
            let f = encode(&sent[0]).unwrap();
            a.write_all(&f[..3]).await.unwrap();
        });
        let mut d = Decoder::new();
        for m in &all {
            assert_eq!(&read_message_async(&mut b, &mut d).await.unwrap(), m);
        }
        writer.await.unwrap();
        assert!(matches!(
            read_message_async(&mut b, &mut d).await,
            Err(ProtoError::Truncated)
        ));
    }
}
