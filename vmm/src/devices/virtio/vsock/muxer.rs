//! Connections between guest stream sockets and host Unix sockets (Firecracker's hybrid
//! model), with their state machines, credit accounting and epoll interests.
//!
//! A connection is keyed by (host-side port, guest port). Host-initiated ones start as a
//! [`Handshake`] on an accepted Unix stream until its `CONNECT <port>\n` line, then send a
//! REQUEST and wait (at most [`CONNECT_TIMEOUT`]) for the guest's RESPONSE, which writes
//! `OK <host port>\n` to the client. Guest-initiated ones connect (non-blocking) to
//! `<uds_path>_<port>` and answer RESPONSE, or RST when nothing accepts.
//!
//! Flow control, both ways:
//! - guest -> host: we advertise `buf_alloc` = [`CONN_BUF_SIZE`] and count in `fwd_cnt` what
//!   reached the host socket; what the socket does not take at once waits in a per-connection
//!   buffer that the guest's credit bounds. A guest that sends past its credit is reset.
//!   CREDIT_UPDATE goes out when a quarter of the buffer was forwarded since the guest last
//!   heard, or when asked (CREDIT_REQUEST).
//! - host -> guest: bytes go straight from the Unix socket into a guest rx buffer, at most the
//!   guest's credit (`buf_alloc - (tx_cnt - fwd_cnt)`), so nothing from the host is ever
//!   buffered here. The socket is not polled for input while the guest has no credit, no rx
//!   buffer was available for it, or the guest shut its receive side down.
//!
//! Closing: guest RST drops the connection; guest SHUTDOWN(SEND) half-closes the host socket
//! once the pending bytes are written; SHUTDOWN(RCV|SEND) flushes (at most [`CLOSE_TIMEOUT`])
//! then answers RST. Host EOF sends SHUTDOWN(SEND) (plus RCV when the host closed both ways);
//! a host socket error resets the connection.
//!
//! File descriptors leave epoll before they are closed: dropped streams wait in `retired`
//! until [`Muxer::sync`] (run at the end of each event) removes them.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events};

use super::packet::*;
use crate::devices::virtio::chain::{SegCursor, Segment};
use crate::devices::virtio::GuestErrorLog;
use crate::memory::GuestMemoryMmap;

/// Connections (established or being set up) at once.
pub const MAX_CONNECTIONS: usize = 128;
/// Accepted host clients that have not sent their `CONNECT` line yet.
pub const MAX_HANDSHAKES: usize = 32;
/// Our receive buffer per connection (`buf_alloc`): the most guest bytes buffered for a host
/// socket that does not read.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// The largest payload accepted in, or sent in, one packet.
pub const MAX_PKT_PAYLOAD: u32 = 64 * 1024;
/// RSTs for unknown connections waiting for rx buffers; more are dropped.
pub const RST_QUEUE_CAP: usize = 256;
/// How long a host-initiated connection waits for the guest's RESPONSE.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an accepted host client has to send its `CONNECT` line.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a guest-closed connection may take to flush to the host.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

const MAX_ACCEPTS_PER_EVENT: usize = 16;
const HANDSHAKE_LINE_MAX: usize = 32;
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 4;
/// Host-side ports of host-initiated connections are allocated from here up.
const HOST_PORT_BASE: u32 = 1 << 30;
const NAME: &str = "virtio-vsock";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ConnKey {
    /// The host side's port (the guest's destination port for guest-initiated connections).
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Host-initiated: REQUEST sent (or queued), waiting for RESPONSE.
    LocalInit,
    Established,
    /// The guest shut both directions down: flushing to the host, then RST.
    Closing,
}

// Control packets owed to the guest.
const P_REQUEST: u8 = 1;
const P_RESPONSE: u8 = 2;
const P_SHUTDOWN: u8 = 4;
const P_CREDIT_UPDATE: u8 = 8;

enum Produced {
    Packet(u32),
    Nothing,
    Kill,
}

/// What handling a guest packet left the connection as.
enum Outcome {
    Keep,
    /// Closed normally: RST to the guest (the answer to its full SHUTDOWN), host socket closed.
    Close,
    /// Reset on an error or a protocol violation: RST to the guest, host socket closed.
    Kill,
}

struct Connection {
    stream: UnixStream,
    state: State,
    deadline: Option<Instant>,
    pending: u8,
    /// In `Muxer::rx_pending`.
    queued: bool,
    // guest -> host
    ok_line: Vec<u8>,
    to_host: VecDeque<u8>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    guest_shut_send: bool,
    guest_shut_rcv: bool,
    host_write_shut: bool,
    // host -> guest
    tx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    host_readable: bool,
    host_eof: bool,
    hup: bool,
}

impl Connection {
    fn new(stream: UnixStream, state: State) -> Self {
        Connection {
            stream,
            state,
            deadline: None,
            pending: 0,
            queued: false,
            ok_line: Vec::new(),
            to_host: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            guest_shut_send: false,
            guest_shut_rcv: false,
            host_write_shut: false,
            tx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            // Data may already wait on the socket (sent right after `CONNECT`).
            host_readable: true,
            host_eof: false,
            hup: false,
        }
    }

    /// What the guest can still take: `buf_alloc - (tx_cnt - fwd_cnt)`; 0 if its counters
    /// make no sense.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn update_peer_credit(&mut self, h: &Header) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = Wrapping(h.fwd_cnt);
    }

    fn wants_host_data(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && !self.guest_shut_rcv
            && self.peer_credit() > 0
    }

    fn has_rx_work(&self) -> bool {
        self.pending != 0 || (self.host_readable && self.wants_host_data())
    }

    /// The epoll interest for the host socket; `None` to leave epoll (after a hang-up, which
    /// epoll would report forever).
    fn interest(&self) -> Option<EventSet> {
        if self.hup {
            return None;
        }
        let mut set = EventSet::empty();
        if !self.host_readable && self.wants_host_data() {
            set |= EventSet::IN;
        }
        if self.state != State::LocalInit && (!self.ok_line.is_empty() || !self.to_host.is_empty())
        {
            set |= EventSet::OUT;
        }
        Some(set)
    }

    fn unflushed(&self) -> bool {
        !self.ok_line.is_empty() || !self.to_host.is_empty()
    }

    /// Writes what waits for the host socket, as far as it takes it.
    fn flush(&mut self) -> io::Result<()> {
        while !self.ok_line.is_empty() {
            match self.stream.write(&self.ok_line) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.ok_line.drain(..n.min(self.ok_line.len()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        while !self.to_host.is_empty() {
            let (a, _) = self.to_host.as_slices();
            match self.stream.write(a) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    let n = n.min(self.to_host.len());
                    self.to_host.drain(..n);
                    self.forwarded(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.to_host.capacity() > MAX_PKT_PAYLOAD as usize {
            // Do not keep up to CONN_BUF_SIZE per idle connection.
            self.to_host.shrink_to(MAX_PKT_PAYLOAD as usize);
        }
        if self.guest_shut_send && !self.host_write_shut {
            self.host_write_shut = true;
            // The host peer may be gone already; then there is nothing to tell it.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Ok(())
    }

    fn forwarded(&mut self, n: usize) {
        // n <= the bytes the guest sent, each packet <= MAX_PKT_PAYLOAD; wrapping is the protocol.
        self.fwd_cnt += Wrapping(n as u32);
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.pending |= P_CREDIT_UPDATE;
        }
    }

    /// Guest payload for the host.
    fn guest_data(&mut self, data: &[u8]) -> Outcome {
        if self.state != State::Established || self.guest_shut_send {
            return Outcome::Kill;
        }
        let buffered = self.to_host.len().saturating_add(data.len());
        if buffered > CONN_BUF_SIZE as usize {
            return Outcome::Kill;
        }
        let mut written = 0;
        if !self.unflushed() {
            loop {
                match self.stream.write(data) {
                    Ok(n) => {
                        written = n.min(data.len());
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Outcome::Kill,
                }
            }
            self.forwarded(written);
        }
        if let Some(rest) = data.get(written..) {
            self.to_host.extend(rest);
        }
        Outcome::Keep
    }

    /// After progress towards the host: a closing connection ends once flushed.
    fn check_closed(&self) -> Outcome {
        if self.state == State::Closing && !self.unflushed() {
            Outcome::Close
        } else {
            Outcome::Keep
        }
    }

    fn header(&mut self, key: ConnKey, cid: u64, op: u16, flags: u32, len: u32) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        Header {
            src_cid: HOST_CID,
            dst_cid: cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    fn emit(
        &mut self,
        key: ConnKey,
        cid: u64,
        op: u16,
        flags: u32,
        w: &mut SegCursor<'_>,
        payload: &[u8],
    ) -> Produced {
        // payload.len() <= MAX_PKT_PAYLOAD.
        let len = payload.len() as u32;
        let h = self.header(key, cid, op, flags, len);
        if w.write(&h.to_bytes()).is_err() || w.write(payload).is_err() {
            return Produced::Kill;
        }
        Produced::Packet(HDR_LEN as u32 + len)
    }

    /// The next packet for the guest, written through `w` (which has room for a header).
    fn next_packet(
        &mut self,
        key: ConnKey,
        cid: u64,
        w: &mut SegCursor<'_>,
        bounce: &mut [u8],
    ) -> Produced {
        if self.pending & P_REQUEST != 0 {
            self.pending &= !P_REQUEST;
            return self.emit(key, cid, OP_REQUEST, 0, w, &[]);
        }
        if self.pending & P_RESPONSE != 0 {
            self.pending &= !P_RESPONSE;
            return self.emit(key, cid, OP_RESPONSE, 0, w, &[]);
        }
        if self.host_readable && self.wants_host_data() {
            let room = w.remaining().saturating_sub(HDR_LEN as u64);
            let max = u64::from(self.peer_credit().min(MAX_PKT_PAYLOAD))
                .min(room)
                .min(bounce.len() as u64) as usize;
            if let Some(buf) = bounce.get_mut(..max).filter(|b| !b.is_empty()) {
                match self.stream.read(buf) {
                    Ok(0) => {
                        self.host_eof = true;
                        self.host_readable = false;
                        self.pending |= P_SHUTDOWN;
                    }
                    Ok(n) => {
                        let n = n.min(buf.len());
                        self.tx_cnt += Wrapping(n as u32);
                        // The header carries our credit too.
                        self.pending &= !P_CREDIT_UPDATE;
                        let data = buf.get(..n).unwrap_or_default();
                        return self.emit(key, cid, OP_RW, 0, w, data);
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                        ) =>
                    {
                        self.host_readable = false;
                    }
                    Err(_) => return Produced::Kill,
                }
            }
        }
        if self.pending & P_SHUTDOWN != 0 {
            self.pending &= !P_SHUTDOWN;
            let flags = if self.hup {
                SHUTDOWN_SEND | SHUTDOWN_RCV
            } else {
                SHUTDOWN_SEND
            };
            return self.emit(key, cid, OP_SHUTDOWN, flags, w, &[]);
        }
        if self.pending & P_CREDIT_UPDATE != 0 {
            self.pending &= !P_CREDIT_UPDATE;
            return self.emit(key, cid, OP_CREDIT_UPDATE, 0, w, &[]);
        }
        Produced::Nothing
    }
}

/// An accepted host client before its `CONNECT <port>\n`.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    s.trim_end_matches('\r')
        .strip_prefix("CONNECT ")?
        .trim()
        .parse()
        .ok()
}

/// Connects to a Unix stream socket without blocking: a listener whose backlog is full
/// refuses (EAGAIN) instead of stalling the event loop.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain syscall with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un that outlives the call and `len` does not exceed
    // its size (checked above); the result is checked.
    let r = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(sock))
}

/// All connections of one vsock device.
pub(crate) struct Muxer {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    conns: HashMap<ConnKey, Connection>,
    fds: HashMap<RawFd, ConnKey>,
    handshakes: HashMap<RawFd, Handshake>,
    /// Connections with something for the guest (deduplicated by `Connection::queued`).
    rx_pending: VecDeque<ConnKey>,
    /// RSTs for connections that do not exist (any more).
    rst_queue: VecDeque<Header>,
    /// Streams dropped but still in epoll.
    retired: Vec<UnixStream>,
    /// What epoll has now.
    registered: HashMap<RawFd, EventSet>,
    next_port: u32,
    bounce: Vec<u8>,
    pub(crate) errors: GuestErrorLog,
}

impl Muxer {
    pub(crate) fn new(cid: u64, uds_path: PathBuf, listener: UnixListener) -> Self {
        Muxer {
            cid,
            uds_path,
            listener,
            conns: HashMap::new(),
            fds: HashMap::new(),
            handshakes: HashMap::new(),
            rx_pending: VecDeque::new(),
            rst_queue: VecDeque::new(),
            retired: Vec::new(),
            registered: HashMap::new(),
            next_port: HOST_PORT_BASE,
            bounce: vec![0; MAX_PKT_PAYLOAD as usize],
            errors: GuestErrorLog::default(),
        }
    }

    pub(crate) fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Whether anything waits for an rx buffer.
    pub(crate) fn has_rx(&self) -> bool {
        !self.rst_queue.is_empty() || !self.rx_pending.is_empty()
    }

    /// Whether a timeout is running (for the housekeeping timer).
    pub(crate) fn needs_timer(&self) -> bool {
        !self.handshakes.is_empty() || self.conns.values().any(|c| c.deadline.is_some())
    }

    #[cfg(test)]
    pub(crate) fn counts(&self) -> (usize, usize, usize, usize) {
        (
            self.conns.len(),
            self.handshakes.len(),
            self.rst_queue.len(),
            self.retired.len(),
        )
    }

    /// Bytes buffered for host sockets, over all connections.
    #[cfg(test)]
    pub(crate) fn buffered(&self) -> usize {
        self.conns.values().map(|c| c.to_host.len()).sum()
    }

    fn schedule(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.queued && c.has_rx_work() {
                c.queued = true;
                self.rx_pending.push_back(key);
            }
        }
    }

    fn push_rst(&mut self, key: ConnKey) {
        if self.rst_queue.len() >= RST_QUEUE_CAP {
            self.errors.log(
                NAME,
                format_args!(
                    "RST queue full; RST to guest port {} dropped",
                    key.peer_port
                ),
            );
            return;
        }
        self.rst_queue.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Header::default()
        });
    }

    /// Drops a connection silently.
    fn retire_conn(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.remove(&key) {
            if c.queued {
                // Keeps `rx_pending` bounded by the live connections, however fast a guest
                // opens and resets them.
                self.rx_pending.retain(|k| *k != key);
            }
            self.fds.remove(&c.stream.as_raw_fd());
            self.retired.push(c.stream);
        }
    }

    /// Resets a connection: RST to the guest, host socket closed.
    fn kill(&mut self, key: ConnKey) {
        self.retire_conn(key);
        self.push_rst(key);
    }

    /// Drops every connection and handshake without telling the guest (device reset,
    /// transport reset).
    pub(crate) fn reset_all(&mut self) {
        for (_, h) in self.handshakes.drain() {
            self.retired.push(h.stream);
        }
        for (_, c) in self.conns.drain() {
            self.retired.push(c.stream);
        }
        self.fds.clear();
        self.rx_pending.clear();
        self.rst_queue.clear();
    }

    /// Writes the next packet for the guest into the rx buffer `segs` (at least a header
    /// long). `None` when there was nothing to send after all.
    pub(crate) fn fill_rx(&mut self, mem: &GuestMemoryMmap, segs: &[Segment]) -> Option<u32> {
        if let Some(h) = self.rst_queue.pop_front() {
            return SegCursor::new(mem, segs)
                .write(&h.to_bytes())
                .ok()
                .map(|()| HDR_LEN as u32);
        }
        let mut skipped = Vec::new();
        let mut result = None;
        while let Some(key) = self.rx_pending.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.queued = false;
            let mut w = SegCursor::new(mem, segs);
            match conn.next_packet(key, self.cid, &mut w, &mut self.bounce) {
                Produced::Packet(len) => {
                    if conn.has_rx_work() {
                        conn.queued = true;
                        self.rx_pending.push_back(key);
                    }
                    result = Some(len);
                    break;
                }
                Produced::Nothing => {
                    // Work that does not fit this buffer (no room for data): keep it queued.
                    if conn.has_rx_work() {
                        conn.queued = true;
                        skipped.push(key);
                    }
                }
                Produced::Kill => {
                    self.kill(key);
                    if let Some(h) = self.rst_queue.pop_front() {
                        result = SegCursor::new(mem, segs)
                            .write(&h.to_bytes())
                            .ok()
                            .map(|()| HDR_LEN as u32);
                        break;
                    }
                }
            }
        }
        self.rx_pending.extend(skipped);
        result
    }

    /// Drops a packet whose header does not match its buffers; resets its connection.
    pub(crate) fn bad_packet(&mut self, h: &Header) {
        self.errors.log(
            NAME,
            format_args!(
                "packet op {} len {} does not fit its buffers; dropped",
                h.op, h.len
            ),
        );
        if h.src_cid == self.cid && h.dst_cid == HOST_CID {
            let key = ConnKey {
                local_port: h.dst_port,
                peer_port: h.src_port,
            };
            if self.conns.contains_key(&key) {
                self.kill(key);
            }
        }
    }

    /// A packet from the guest; `payload` holds exactly `h.len` bytes after the header.
    pub(crate) fn handle_tx(&mut self, h: &Header, payload: &mut SegCursor<'_>) {
        if h.src_cid != self.cid || h.dst_cid != HOST_CID {
            self.errors.log(
                NAME,
                format_args!(
                    "packet from cid {} to cid {} dropped (guest cid {}, host cid {HOST_CID})",
                    h.src_cid, h.dst_cid, self.cid
                ),
            );
            return;
        }
        let key = ConnKey {
            local_port: h.dst_port,
            peer_port: h.src_port,
        };
        if h.type_ != TYPE_STREAM {
            self.errors
                .log(NAME, format_args!("socket type {} not supported", h.type_));
            if h.op != OP_RST {
                self.kill(key);
            }
            return;
        }
        match h.op {
            OP_REQUEST => self.guest_connect(key, h),
            OP_RST => self.retire_conn(key),
            OP_RESPONSE | OP_RW | OP_SHUTDOWN | OP_CREDIT_UPDATE | OP_CREDIT_REQUEST => {
                let Some(conn) = self.conns.get_mut(&key) else {
                    self.push_rst(key);
                    return;
                };
                conn.update_peer_credit(h);
                let outcome = match h.op {
                    OP_RESPONSE => {
                        if conn.state == State::LocalInit {
                            conn.state = State::Established;
                            conn.deadline = None;
                            conn.ok_line = format!("OK {}\n", key.local_port).into_bytes();
                            match conn.flush() {
                                Ok(()) => Outcome::Keep,
                                Err(_) => Outcome::Kill,
                            }
                        } else {
                            Outcome::Kill
                        }
                    }
                    OP_RW => {
                        // h.len <= MAX_PKT_PAYLOAD = bounce.len() (checked by the caller).
                        match self.bounce.get_mut(..h.len as usize) {
                            Some(buf) => match payload.read(buf) {
                                Ok(()) => conn.guest_data(buf),
                                Err(_) => Outcome::Kill,
                            },
                            None => Outcome::Kill,
                        }
                    }
                    OP_SHUTDOWN => {
                        if conn.state == State::LocalInit {
                            Outcome::Kill
                        } else {
                            conn.guest_shut_send |= h.flags & SHUTDOWN_SEND != 0;
                            conn.guest_shut_rcv |= h.flags & SHUTDOWN_RCV != 0;
                            if conn.guest_shut_send
                                && conn.guest_shut_rcv
                                && conn.state != State::Closing
                            {
                                conn.state = State::Closing;
                                conn.deadline = Some(Instant::now() + CLOSE_TIMEOUT);
                            }
                            match conn.flush() {
                                Ok(()) => conn.check_closed(),
                                Err(_) => Outcome::Kill,
                            }
                        }
                    }
                    OP_CREDIT_REQUEST => {
                        if conn.state == State::LocalInit {
                            Outcome::Kill
                        } else {
                            conn.pending |= P_CREDIT_UPDATE;
                            Outcome::Keep
                        }
                    }
                    _ => {
                        // CREDIT_UPDATE: the new credit is in already.
                        if conn.state == State::LocalInit {
                            Outcome::Kill
                        } else {
                            Outcome::Keep
                        }
                    }
                };
                match outcome {
                    Outcome::Keep => self.schedule(key),
                    Outcome::Close => self.kill(key),
                    Outcome::Kill => {
                        self.errors.log(
                            NAME,
                            format_args!(
                                "op {} on port {}->{} resets the connection",
                                h.op, key.peer_port, key.local_port
                            ),
                        );
                        self.kill(key);
                    }
                }
            }
            other => {
                self.errors
                    .log(NAME, format_args!("unknown op {other} dropped"));
            }
        }
    }

    fn port_path(&self, port: u32) -> PathBuf {
        let mut p = self.uds_path.clone().into_os_string();
        p.push(format!("_{port}"));
        PathBuf::from(p)
    }

    fn guest_connect(&mut self, key: ConnKey, h: &Header) {
        if self.conns.contains_key(&key) {
            self.errors.log(
                NAME,
                format_args!(
                    "REQUEST for existing connection {}->{}",
                    key.peer_port, key.local_port
                ),
            );
            self.kill(key);
            return;
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            self.errors.log(
                NAME,
                format_args!(
                    "connection limit ({MAX_CONNECTIONS}) reached; refusing port {}",
                    key.local_port
                ),
            );
            self.push_rst(key);
            return;
        }
        let path = self.port_path(key.local_port);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                let mut c = Connection::new(stream, State::Established);
                c.update_peer_credit(h);
                c.pending = P_RESPONSE;
                self.fds.insert(c.stream.as_raw_fd(), key);
                self.conns.insert(key, c);
                self.schedule(key);
            }
            Err(e) => {
                tracing::debug!("{NAME}: guest connection to {}: {e}; RST", path.display());
                self.push_rst(key);
            }
        }
    }

    /// Accepts host clients (the listener is readable).
    pub(crate) fn accept(&mut self) {
        for _ in 0..MAX_ACCEPTS_PER_EVENT {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.handshakes.len() >= MAX_HANDSHAKES
                        || self.conns.len() >= MAX_CONNECTIONS
                    {
                        tracing::warn!("{NAME}: too many host connections; closing a new one");
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        tracing::warn!("{NAME}: host connection: {e}");
                        continue;
                    }
                    let hs = Handshake {
                        stream,
                        line: Vec::with_capacity(HANDSHAKE_LINE_MAX),
                        deadline: Instant::now() + HANDSHAKE_TIMEOUT,
                    };
                    self.handshakes.insert(hs.stream.as_raw_fd(), hs);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("{NAME}: accept: {e}");
                    break;
                }
            }
        }
    }

    fn alloc_port(&mut self, peer_port: u32) -> u32 {
        let mut p = self.next_port;
        for _ in 0..=MAX_CONNECTIONS {
            p = self.next_port;
            self.next_port = self.next_port.checked_add(1).unwrap_or(HOST_PORT_BASE);
            if !self.conns.contains_key(&ConnKey {
                local_port: p,
                peer_port,
            }) {
                break;
            }
        }
        p
    }

    fn handshake_event(&mut self, fd: RawFd) {
        let Some(hs) = self.handshakes.get_mut(&fd) else {
            return;
        };
        // Byte by byte, so that nothing after the newline is consumed.
        let done = loop {
            let mut b = [0u8; 1];
            match hs.stream.read(&mut b) {
                Ok(0) => break Some(false),
                Ok(_) => {
                    if b[0] == b'\n' {
                        break Some(true);
                    }
                    if hs.line.len() >= HANDSHAKE_LINE_MAX {
                        break Some(false);
                    }
                    hs.line.push(b[0]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break Some(false),
            }
        };
        let Some(complete) = done else {
            return;
        };
        let Some(hs) = self.handshakes.remove(&fd) else {
            return;
        };
        let port = if complete {
            parse_connect(&hs.line)
        } else {
            None
        };
        match port {
            Some(port) if self.conns.len() < MAX_CONNECTIONS => {
                let local = self.alloc_port(port);
                let key = ConnKey {
                    local_port: local,
                    peer_port: port,
                };
                let mut c = Connection::new(hs.stream, State::LocalInit);
                c.deadline = Some(Instant::now() + CONNECT_TIMEOUT);
                c.pending = P_REQUEST;
                self.fds.insert(fd, key);
                self.conns.insert(key, c);
                self.schedule(key);
            }
            _ => {
                if complete {
                    tracing::debug!(
                        "{NAME}: bad handshake line {:?}",
                        String::from_utf8_lossy(&hs.line)
                    );
                }
                self.retired.push(hs.stream);
            }
        }
    }

    /// Readiness of a host socket (handshake or connection).
    pub(crate) fn socket_event(&mut self, fd: RawFd, set: EventSet) {
        if self.handshakes.contains_key(&fd) {
            self.handshake_event(fd);
            return;
        }
        let Some(&key) = self.fds.get(&fd) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if set.contains(EventSet::ERROR) {
            self.kill(key);
            return;
        }
        if set.contains(EventSet::IN) {
            conn.host_readable = true;
        }
        if set.contains(EventSet::HANG_UP) {
            conn.hup = true;
            conn.host_readable = true;
        }
        let mut outcome = Outcome::Keep;
        if set.contains(EventSet::OUT) || conn.hup {
            outcome = match conn.flush() {
                Ok(()) => conn.check_closed(),
                Err(_) => Outcome::Kill,
            };
        }
        match outcome {
            Outcome::Keep => self.schedule(key),
            Outcome::Close | Outcome::Kill => self.kill(key),
        }
    }

    /// Expires handshakes and connections past their deadline.
    pub(crate) fn sweep(&mut self, now: Instant) {
        let stale: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(&fd, _)| fd)
            .collect();
        for fd in stale {
            if let Some(h) = self.handshakes.remove(&fd) {
                tracing::debug!("{NAME}: host client sent no CONNECT line in time");
                self.retired.push(h.stream);
            }
        }
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(&k, _)| k)
            .collect();
        for key in expired {
            tracing::debug!(
                "{NAME}: connection {}->{} timed out",
                key.local_port,
                key.peer_port
            );
            self.kill(key);
        }
    }

    /// Brings epoll in line with the connections: retired streams out (then closed), interest
    /// sets updated. `listen`: whether to accept host clients now.
    pub(crate) fn sync(&mut self, ops: &mut EventOps, listen: bool) {
        for s in self.retired.drain(..) {
            let fd = s.as_raw_fd();
            if self.registered.remove(&fd).is_some() {
                if let Err(e) = ops.remove(Events::empty_raw(fd)) {
                    tracing::debug!("{NAME}: epoll remove {fd}: {e:?}");
                }
            }
            drop(s);
        }
        let mut want: Vec<(RawFd, Option<EventSet>)> =
            Vec::with_capacity(1 + self.handshakes.len() + self.fds.len());
        want.push((self.listener.as_raw_fd(), listen.then_some(EventSet::IN)));
        want.extend(self.handshakes.keys().map(|&fd| (fd, Some(EventSet::IN))));
        want.extend(
            self.fds
                .iter()
                .map(|(&fd, k)| (fd, self.conns.get(k).and_then(Connection::interest))),
        );
        for (fd, w) in want {
            match (self.registered.get(&fd).copied(), w) {
                (None, Some(set)) => match ops.add(Events::new_raw(fd, set)) {
                    Ok(()) => {
                        self.registered.insert(fd, set);
                    }
                    Err(e) => tracing::warn!("{NAME}: epoll add {fd}: {e:?}"),
                },
                (Some(cur), Some(set)) if cur != set => {
                    match ops.modify(Events::new_raw(fd, set)) {
                        Ok(()) => {
                            self.registered.insert(fd, set);
                        }
                        Err(e) => tracing::warn!("{NAME}: epoll modify {fd}: {e:?}"),
                    }
                }
                (Some(_), None) => {
                    if let Err(e) = ops.remove(Events::empty_raw(fd)) {
                        tracing::debug!("{NAME}: epoll remove {fd}: {e:?}");
                    }
                    self.registered.remove(&fd);
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"connect 52"), None);
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(b"\xff\xfe"), None);
    }

    #[test]
    fn credit_is_never_negative() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Connection::new(a, State::Established);
        c.peer_buf_alloc = 100;
        c.tx_cnt = Wrapping(50);
        c.peer_fwd_cnt = Wrapping(10);
        assert_eq!(c.peer_credit(), 60);
        // A guest claiming to have consumed more than was sent.
        c.peer_fwd_cnt = Wrapping(80);
        assert_eq!(c.peer_credit(), 0);
        c.tx_cnt = Wrapping(u32::MAX - 5);
        c.peer_fwd_cnt = Wrapping(u32::MAX - 10);
        assert_eq!(c.peer_credit(), 95);
        c.tx_cnt = Wrapping(3);
        assert_eq!(c.peer_credit(), 86);
    }

    #[test]
    fn churning_connections_keep_rx_pending_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let _host = UnixListener::bind(format!("{}_9", uds.display())).unwrap();
        let mut m = Muxer::new(3, uds.clone(), UnixListener::bind(&uds).unwrap());
        let mem = crate::devices::virtio::test_utils::test_mem();
        let buf = [Segment {
            addr: vm_memory::GuestAddress(0),
            len: 0,
        }; 0];
        let mut empty = SegCursor::new(&mem, &buf);
        let req = |op| Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1,
            dst_port: 9,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 4096,
            ..Header::default()
        };
        // REQUEST then RST, over and over, with no rx buffer ever offered.
        for _ in 0..1000 {
            m.handle_tx(&req(OP_REQUEST), &mut empty);
            m.handle_tx(&req(OP_RST), &mut empty);
            assert!(m.rx_pending.len() <= 1);
            m.retired.clear();
        }
        assert_eq!(m.conns.len(), 0);
    }

    #[test]
    fn connect_refuses_bad_paths() {
        assert!(connect_nonblocking(Path::new(&"x".repeat(200))).is_err());
        assert!(connect_nonblocking(Path::new("/nonexistent/socket")).is_err());
    }
}
