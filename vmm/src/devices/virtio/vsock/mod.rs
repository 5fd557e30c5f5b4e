//! virtio-vsock (virtio 1.2, section 5.10) with Firecracker's hybrid host side.
//!
//! # Guest side
//! Three queues of [`QUEUE_SIZE`]: rx (device -> driver packets), tx (driver -> device) and
//! event. Features: VIRTIO_F_VERSION_1 only (no SEQPACKET: stream sockets only; no EVENT_IDX:
//! the driver notifies every buffer). The configuration space is the guest CID (le64).
//!
//! # Host side
//! A Unix listener at `uds_path`. A host client connects and writes `CONNECT <port>\n`; the
//! device sends a REQUEST to that guest port and, on the guest's RESPONSE, writes
//! `OK <host port>\n` to the client; from then on the Unix stream is the guest connection.
//! A guest connecting to CID 2 port P makes the device connect to the Unix socket
//! `<uds_path>_P`; RST when nothing listens there. The socket file is created by
//! [`Vsock::new`] (which fails if the path exists) and removed when the device is dropped.
//! The listener is polled only while the device is active: clients that connect earlier wait
//! in the backlog.
//!
//! # Behaviour and limits (see [`muxer`] for the connection state machine)
//! - At most [`muxer::MAX_CONNECTIONS`] connections and [`muxer::MAX_HANDSHAKES`] host
//!   clients still owing their `CONNECT` line (for [`muxer::HANDSHAKE_TIMEOUT`]); a guest
//!   that does not answer a REQUEST within [`muxer::CONNECT_TIMEOUT`] gets RST and the client
//!   is closed.
//! - Credit-based flow control both ways; host data is never buffered in the VMM (it moves
//!   from the Unix socket straight into guest rx buffers, within the guest's credit), guest
//!   data at most [`muxer::CONN_BUF_SIZE`] per connection.
//! - Every tx packet is checked: its chain must be device-readable only and hold the 44-byte
//!   header plus `len` bytes (`len` <= [`muxer::MAX_PKT_PAYLOAD`]); `src_cid` must be the
//!   guest's CID and `dst_cid` the host's (2); otherwise the packet is dropped (and its
//!   connection reset when the length is bogus). A non-stream type gets RST; unknown ops are
//!   dropped; packets for unknown connections get RST (queued, at most
//!   [`muxer::RST_QUEUE_CAP`]); RW before the connection is established, or past the
//!   guest's credit, resets the connection.
//! - rx buffers must be device-writable and hold at least a header; others are returned
//!   unused (length 0).
//! - [`Vsock::send_transport_reset`] drops every connection and queues
//!   VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue (after a snapshot restore).
//! - Each queue kick handles at most 4 × the queue size chains before yielding.

mod muxer;
pub mod packet;

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::chain::{self, add_used, parse_chain, pop_chain, QueueBroken, SegCursor};
use super::{
    drain_evt, read_config_bytes, ActivateError, IrqTrigger, VirtioDevice, TYPE_VSOCK,
    VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_VRING,
};
use crate::config::VsockConfig;
use crate::memory::GuestMemoryMmap;
use crate::snapshot::persist::{Persist, PersistError, VirtioDeviceState};
use muxer::Muxer;
pub use muxer::{
    CONNECT_TIMEOUT, CONN_BUF_SIZE, HANDSHAKE_TIMEOUT, MAX_CONNECTIONS, MAX_HANDSHAKES,
    MAX_PKT_PAYLOAD, RST_QUEUE_CAP,
};
use packet::{Header, EVENT_TRANSPORT_RESET, HDR_LEN};

/// Entries in each queue.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
const MAX_CHAINS_PER_EVENT: usize = 4 * QUEUE_SIZE as usize;
const TIMER_PERIOD: Duration = Duration::from_millis(250);
const NAME: &str = "virtio-vsock";

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is invalid (must be >= 3 and < 2^32 - 1)")]
    InvalidCid(u64),
    #[error("cannot listen on {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("vsock device: {0}")]
    Io(#[from] io::Error),
    #[error("the vsock device is not active")]
    NotActivated,
}

struct Active {
    mem: GuestMemoryMmap,
    queues: [Queue; 3],
    broken: bool,
}

/// A virtio-vsock device.
pub struct Vsock {
    cid: u64,
    uds_path: PathBuf,
    acked_features: u64,
    queue_evts: [EventFd; 3],
    irq: Arc<IrqTrigger>,
    /// Wakes the event loop when connections changed outside it (reset, transport reset,
    /// activation), so that epoll is brought in line.
    control_evt: EventFd,
    timer: TimerFd,
    timer_armed: bool,
    active: Option<Active>,
    muxer: Muxer,
    pending_reset_event: bool,
    /// Set by a transport reset until the driver has handled the event: it re-offers the
    /// event buffer (an event queue kick) only after dropping its sockets, and a host
    /// connection forwarded before that would be dropped with them. Host clients wait in the
    /// listen backlog meanwhile.
    awaiting_reset_ack: bool,
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with integer arguments only; results checked.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Vsock {
    pub fn new(cfg: &VsockConfig) -> Result<Vsock, VsockError> {
        if cfg.guest_cid < 3 || cfg.guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(cfg.guest_cid));
        }
        let bind_err = |source| VsockError::Bind {
            path: cfg.uds_path.clone(),
            source,
        };
        let listener = UnixListener::bind(&cfg.uds_path).map_err(bind_err)?;
        let built = Self::with_listener(cfg, listener);
        if built.is_err() {
            let _ = std::fs::remove_file(&cfg.uds_path);
        }
        built
    }

    fn with_listener(cfg: &VsockConfig, listener: UnixListener) -> Result<Vsock, VsockError> {
        listener.set_nonblocking(true)?;
        let timer = TimerFd::new().map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        set_nonblocking(timer.as_raw_fd())?;
        Ok(Vsock {
            cid: cfg.guest_cid,
            uds_path: cfg.uds_path.clone(),
            acked_features: 0,
            queue_evts: [
                EventFd::new(EFD_NONBLOCK)?,
                EventFd::new(EFD_NONBLOCK)?,
                EventFd::new(EFD_NONBLOCK)?,
            ],
            irq: Arc::new(IrqTrigger::new()?),
            control_evt: EventFd::new(EFD_NONBLOCK)?,
            timer,
            timer_armed: false,
            active: None,
            muxer: Muxer::new(cfg.guest_cid, cfg.uds_path.clone(), listener),
            pending_reset_event: false,
            awaiting_reset_ack: false,
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.cid
    }

    /// Whether the device gave up on its queues (until the driver resets it).
    pub fn is_broken(&self) -> bool {
        self.active.as_ref().is_some_and(|a| a.broken)
    }

    /// Drops every connection and tells the guest driver to do the same
    /// (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue; queued until the driver offers
    /// an event buffer). For use after a snapshot restore.
    pub fn send_transport_reset(&mut self) -> Result<(), VsockError> {
        if self.active.is_none() {
            return Err(VsockError::NotActivated);
        }
        self.muxer.reset_all();
        self.pending_reset_event = true;
        self.awaiting_reset_ack = true;
        self.process_evq();
        self.wake();
        Ok(())
    }

    fn wake(&self) {
        if let Err(e) = self.control_evt.write(1) {
            tracing::warn!("{NAME}: cannot wake the event loop: {e}");
        }
    }

    fn usable(&mut self) -> Option<&mut Active> {
        self.active.as_mut().filter(|a| !a.broken)
    }

    fn mark_broken(&mut self, e: QueueBroken) {
        tracing::warn!("{NAME}: {e}; the device needs a reset");
        if let Some(a) = self.active.as_mut() {
            a.broken = true;
        }
        self.muxer.reset_all();
        self.irq.set_needs_reset();
    }

    fn notify(irq: &IrqTrigger, q: &mut Queue, mem: &GuestMemoryMmap) {
        if q.needs_notification(mem).unwrap_or(true) {
            irq.trigger(VIRTIO_MMIO_INT_VRING);
        }
    }

    /// Moves pending packets into rx buffers.
    pub(crate) fn process_rx(&mut self) {
        let Some(active) = self.active.as_mut().filter(|a| !a.broken) else {
            return;
        };
        let [rxq, _, _] = &mut active.queues;
        let mem = &active.mem;
        let mut used = false;
        let mut budget = MAX_CHAINS_PER_EVENT;
        let res: Result<(), QueueBroken> = loop {
            if !self.muxer.has_rx() {
                break Ok(());
            }
            if budget == 0 {
                let _ = self.queue_evts[RXQ].write(1);
                break Ok(());
            }
            budget -= 1;
            let chain = match pop_chain(rxq, mem) {
                Ok(Some(c)) => c,
                // No buffer: the driver's next rx kick brings us back.
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            let head = chain.head_index();
            if head >= rxq.size() {
                self.muxer.errors.log(
                    NAME,
                    format_args!("rx head index {head} past the ring; skipped"),
                );
                continue;
            }
            let segs = match parse_chain(mem, chain, chain::MAX_CHAIN_DESCRIPTORS) {
                Ok(c) if c.readable.is_empty() && c.writable_len >= HDR_LEN as u64 => c.writable,
                Ok(_) => {
                    self.muxer.errors.log(
                        NAME,
                        format_args!(
                            "rx buffer {head} is not a writable buffer of >= {HDR_LEN} bytes"
                        ),
                    );
                    if let Err(e) = add_used(rxq, mem, head, 0) {
                        break Err(e);
                    }
                    used = true;
                    continue;
                }
                Err(e) => {
                    self.muxer
                        .errors
                        .log(NAME, format_args!("rx buffer {head}: {e}"));
                    if let Err(e) = add_used(rxq, mem, head, 0) {
                        break Err(e);
                    }
                    used = true;
                    continue;
                }
            };
            match self.muxer.fill_rx(mem, &segs) {
                Some(len) => {
                    if let Err(e) = add_used(rxq, mem, head, len) {
                        break Err(e);
                    }
                    used = true;
                }
                None => {
                    // Nothing to send after all: give the buffer back to the ring.
                    rxq.go_to_previous_position();
                    break Ok(());
                }
            }
        };
        if used {
            Self::notify(&self.irq, rxq, mem);
        }
        if let Err(e) = res {
            self.mark_broken(e);
        }
    }

    /// Handles the packets the driver queued.
    pub(crate) fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut().filter(|a| !a.broken) else {
            return;
        };
        let [_, txq, _] = &mut active.queues;
        let mem = &active.mem;
        let mut used = false;
        let mut budget = MAX_CHAINS_PER_EVENT;
        let res: Result<(), QueueBroken> = loop {
            if budget == 0 {
                let _ = self.queue_evts[TXQ].write(1);
                break Ok(());
            }
            budget -= 1;
            let chain = match pop_chain(txq, mem) {
                Ok(Some(c)) => c,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            let head = chain.head_index();
            if head >= txq.size() {
                self.muxer.errors.log(
                    NAME,
                    format_args!("tx head index {head} past the ring; skipped"),
                );
                continue;
            }
            match parse_chain(mem, chain, chain::MAX_CHAIN_DESCRIPTORS) {
                Ok(c) if c.writable.is_empty() => {
                    let mut r = SegCursor::new(mem, &c.readable);
                    let mut hb = [0u8; HDR_LEN];
                    if r.read(&mut hb).is_err() {
                        self.muxer
                            .errors
                            .log(NAME, format_args!("tx packet {head} shorter than a header"));
                    } else {
                        let h = Header::from_bytes(&hb);
                        if h.len > MAX_PKT_PAYLOAD || u64::from(h.len) > r.remaining() {
                            self.muxer.bad_packet(&h);
                        } else {
                            self.muxer.handle_tx(&h, &mut r);
                        }
                    }
                }
                Ok(_) => self.muxer.errors.log(
                    NAME,
                    format_args!("tx packet {head} has device-writable buffers"),
                ),
                Err(e) => self
                    .muxer
                    .errors
                    .log(NAME, format_args!("tx packet {head}: {e}")),
            }
            if let Err(e) = add_used(txq, mem, head, 0) {
                break Err(e);
            }
            used = true;
        };
        if used {
            Self::notify(&self.irq, txq, mem);
        }
        if let Err(e) = res {
            self.mark_broken(e);
        }
    }

    /// Delivers a pending transport-reset event.
    pub(crate) fn process_evq(&mut self) {
        if !self.pending_reset_event {
            return;
        }
        let Some(active) = self.active.as_mut().filter(|a| !a.broken) else {
            return;
        };
        let [_, _, evq] = &mut active.queues;
        let mem = &active.mem;
        let mut used = false;
        let res: Result<(), QueueBroken> = loop {
            let chain = match pop_chain(evq, mem) {
                Ok(Some(c)) => c,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            let head = chain.head_index();
            if head >= evq.size() {
                continue;
            }
            let mut len = 0;
            match parse_chain(mem, chain, chain::MAX_CHAIN_DESCRIPTORS) {
                Ok(c) if c.readable.is_empty() && c.writable_len >= 4 => {
                    if SegCursor::new(mem, &c.writable)
                        .write(&EVENT_TRANSPORT_RESET.to_le_bytes())
                        .is_ok()
                    {
                        len = 4;
                    }
                }
                Ok(_) => self.muxer.errors.log(
                    NAME,
                    format_args!("event buffer {head} is not a writable buffer of >= 4 bytes"),
                ),
                Err(e) => self
                    .muxer
                    .errors
                    .log(NAME, format_args!("event buffer {head}: {e}")),
            }
            if let Err(e) = add_used(evq, mem, head, len) {
                break Err(e);
            }
            used = true;
            if len == 4 {
                self.pending_reset_event = false;
                break Ok(());
            }
        };
        if used {
            Self::notify(&self.irq, evq, mem);
        }
        if let Err(e) = res {
            self.mark_broken(e);
        }
    }

    /// Epoll registrations and the housekeeping timer, after every event.
    fn sync(&mut self, ops: &mut EventOps) {
        let listen = self.usable().is_some() && !self.awaiting_reset_ack;
        self.muxer.sync(ops, listen);
        let need = self.muxer.needs_timer();
        if need != self.timer_armed {
            let r = if need {
                self.timer.reset(TIMER_PERIOD, Some(TIMER_PERIOD))
            } else {
                self.timer.clear()
            };
            match r {
                Ok(()) => self.timer_armed = need,
                Err(e) => tracing::warn!("{NAME}: timer: {e}"),
            }
        }
    }
}

impl Persist for Vsock {
    type State = VirtioDeviceState;
    type Context = GuestMemoryMmap;

    /// Host connections are not part of the state: a restored VM has none, and
    /// [`Vsock::send_transport_reset`] tells the guest so.
    fn save(&self) -> VirtioDeviceState {
        VirtioDeviceState {
            device_type: TYPE_VSOCK,
            acked_features: self.acked_features,
            activated: self.active.is_some(),
            broken: self.is_broken(),
            queues: self
                .active
                .as_ref()
                .map(|a| super::save_queues(&a.queues))
                .unwrap_or_default(),
            guest_cid: Some(self.cid),
        }
    }

    fn restore(&mut self, mem: GuestMemoryMmap, s: &VirtioDeviceState) -> Result<(), PersistError> {
        if let Some(cid) = s.guest_cid {
            if cid != self.cid {
                return Err(PersistError::invalid(
                    NAME,
                    format!(
                        "the snapshot's guest CID is {cid}, the configuration's {}",
                        self.cid
                    ),
                ));
            }
        }
        if s.acked_features & !self.avail_features() != 0 {
            return Err(PersistError::invalid(
                NAME,
                "saved features the device does not offer",
            ));
        }
        self.reset();
        self.acked_features = s.acked_features;
        if s.activated {
            let queues = super::restore_queues(NAME, s, TYPE_VSOCK, &QUEUE_SIZES, &mem)?;
            self.activate(mem, queues)
                .map_err(|e| PersistError::invalid(NAME, e.to_string()))?;
            if s.broken {
                if let Some(a) = self.active.as_mut() {
                    a.broken = true;
                }
            }
        }
        Ok(())
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            "{NAME}: ignored {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let got = queues.len();
        let Ok(queues) = <[Queue; 3]>::try_from(queues) else {
            return Err(ActivateError::QueueCount { expected: 3, got });
        };
        for (i, q) in queues.iter().enumerate() {
            if !q.ready() {
                return Err(ActivateError::QueueNotReady(i));
            }
            if !q.is_valid(&mem) {
                return Err(ActivateError::QueueInvalid(i));
            }
        }
        self.muxer.reset_all();
        self.pending_reset_event = false;
        self.awaiting_reset_ack = false;
        self.active = Some(Active {
            mem,
            queues,
            broken: false,
        });
        // Start listening, and serve whatever the driver queued already.
        self.control_evt.write(1)?;
        self.queue_evts[TXQ].write(1)?;
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.pending_reset_event = false;
        self.awaiting_reset_ack = false;
        self.muxer.reset_all();
        self.wake();
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn interrupt(&self) -> &Arc<IrqTrigger> {
        &self.irq
    }

    fn save_state(&self) -> VirtioDeviceState {
        Persist::save(self)
    }

    fn restore_state(
        &mut self,
        mem: GuestMemoryMmap,
        state: &VirtioDeviceState,
    ) -> Result<(), PersistError> {
        Persist::restore(self, mem, state)
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        let fds = [
            self.queue_evts[RXQ].as_raw_fd(),
            self.queue_evts[TXQ].as_raw_fd(),
            self.queue_evts[EVQ].as_raw_fd(),
            self.control_evt.as_raw_fd(),
            self.timer.as_raw_fd(),
        ];
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                tracing::error!("{NAME}: cannot register fd {fd}: {e:?}");
            }
        }
        self.sync(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let set = events.event_set();
        if fd == self.queue_evts[RXQ].as_raw_fd() {
            drain_evt(&self.queue_evts[RXQ]);
        } else if fd == self.queue_evts[TXQ].as_raw_fd() {
            drain_evt(&self.queue_evts[TXQ]);
            self.process_tx();
        } else if fd == self.queue_evts[EVQ].as_raw_fd() {
            drain_evt(&self.queue_evts[EVQ]);
            // A kick once the reset event is out is the driver re-offering its buffer.
            if !self.pending_reset_event {
                self.awaiting_reset_ack = false;
            }
            self.process_evq();
        } else if fd == self.control_evt.as_raw_fd() {
            drain_evt(&self.control_evt);
        } else if fd == self.timer.as_raw_fd() {
            // Non-blocking: a timer disarmed since epoll reported it reads EAGAIN.
            let _ = self.timer.wait();
            self.muxer.sweep(Instant::now());
        } else if fd == self.muxer.listener_fd() {
            if self.usable().is_some() {
                self.muxer.accept();
            }
        } else {
            self.muxer.socket_event(fd, set);
        }
        // Whatever the event produced for the guest (replies, host data) goes out now.
        self.process_rx();
        self.sync(ops);
    }
}

#[cfg(test)]
mod tests;
