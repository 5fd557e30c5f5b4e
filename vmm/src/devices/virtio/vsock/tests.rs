use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

use super::packet::*;
use super::*;
use crate::devices::virtio::status;
use crate::devices::virtio::test_utils::*;
use crate::devices::virtio::{MmioTransport, VIRTIO_MMIO_INT_CONFIG};

const CID: u64 = 3;
const QSIZE: u16 = 64;
const RX_BUF: u64 = 0x10_0000;
const RX_BUF_LEN: u32 = 4096 + HDR_LEN as u32;
const RX_SLOT: u64 = 0x2000;
const TX_BUF: u64 = 0x40_0000;
const TX_SLOT: u64 = 0x2_0000;
const EV_BUF: u64 = 0x30_0000;
const W: u16 = VRING_DESC_F_WRITE as u16;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const DRIVER_OK: u32 =
    status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

type Em = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// A guest driver (hand-made packets on test queues), the device in an event loop, and the
/// host side's socket paths.
struct Harness<'a> {
    mem: &'a GuestMemoryMmap,
    dev: Arc<Mutex<Vsock>>,
    em: Em,
    t: MmioTransport,
    rx: TestQueue<'a>,
    tx: TestQueue<'a>,
    ev: TestQueue<'a>,
    rx_posted: u16,
    rx_seen: u16,
    tx_sent: u16,
    uds: PathBuf,
    _dir: tempfile::TempDir,
}

fn hdr(src_port: u32, dst_port: u32, op: u16) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

impl<'a> Harness<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        let h = Self::inactive(mem);
        h.activated()
    }

    fn inactive(mem: &'a GuestMemoryMmap) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let dev = Arc::new(Mutex::new(
            Vsock::new(&VsockConfig {
                guest_cid: CID,
                uds_path: uds.clone(),
            })
            .unwrap(),
        ));
        let mut em = Em::new().unwrap();
        em.add_subscriber(dev.clone());
        let t = MmioTransport::new(mem.clone(), dev.clone());
        Harness {
            mem,
            dev,
            em,
            t,
            rx: TestQueue::new(mem, 0x1_0000, QSIZE),
            tx: TestQueue::new(mem, 0x2_0000, QSIZE),
            ev: TestQueue::new(mem, 0x3_0000, QSIZE),
            rx_posted: 0,
            rx_seen: 0,
            tx_sent: 0,
            uds,
            _dir: dir,
        }
    }

    fn activated(mut self) -> Self {
        let layouts = [self.rx.layout(), self.tx.layout(), self.ev.layout()];
        assert_eq!(
            drive_to_driver_ok(&mut self.t, VIRTIO_F_VERSION_1, &layouts),
            DRIVER_OK
        );
        self.pump();
        self
    }

    /// Runs the event loop until it goes idle.
    fn pump(&mut self) {
        for _ in 0..1000 {
            if self.em.run_with_timeout(0).unwrap() == 0 {
                return;
            }
        }
        panic!("the event loop does not go idle");
    }

    fn kick(&self, q: usize) {
        self.dev.lock().unwrap().queue_events()[q].write(1).unwrap();
    }

    /// Offers `n` rx buffers of 4 KiB + header.
    fn post_rx(&mut self, n: u16) {
        for _ in 0..n {
            let slot = self.rx_posted % QSIZE;
            self.rx.set_descs(
                slot,
                &[(RX_BUF + u64::from(slot) * RX_SLOT, RX_BUF_LEN, W, 0)],
            );
            self.rx.push_avail(&[slot]);
            self.rx_posted = self.rx_posted.wrapping_add(1);
        }
        self.kick(0);
    }

    /// The packets the device delivered since the last call.
    fn rx_packets(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        while self.rx_seen != self.rx.used_idx() {
            let (id, len) = self.rx.used_elem(self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            if len == 0 {
                out.push((Header::default(), Vec::new()));
                continue;
            }
            let addr = RX_BUF + u64::from(id) * RX_SLOT;
            let mut hb = [0u8; HDR_LEN];
            self.mem.read_slice(&mut hb, GuestAddress(addr)).unwrap();
            let h = Header::from_bytes(&hb);
            assert_eq!(
                len,
                HDR_LEN as u32 + h.len,
                "used length matches the header"
            );
            let mut data = vec![0u8; h.len as usize];
            self.mem
                .read_slice(&mut data, GuestAddress(addr + HDR_LEN as u64))
                .unwrap();
            out.push((h, data));
        }
        out
    }

    /// Pumps until at least one rx packet arrives (or 2 s pass).
    fn wait_rx(&mut self) -> Vec<(Header, Vec<u8>)> {
        let deadline = Instant::now() + Duration::from_secs(2);
        self.pump();
        loop {
            let p = self.rx_packets();
            if !p.is_empty() || Instant::now() > deadline {
                return p;
            }
            self.em.run_with_timeout(10).unwrap();
        }
    }

    fn assert_no_rx(&mut self) {
        self.pump();
        let p = self.rx_packets();
        assert!(p.is_empty(), "unexpected packets {p:?}");
    }

    /// Tops the rx ring up to full.
    fn refill_rx(&mut self) {
        let outstanding = self.rx_posted.wrapping_sub(self.rx.used_idx());
        self.post_rx(QSIZE - outstanding);
    }

    fn one_rx(&mut self) -> (Header, Vec<u8>) {
        let mut p = self.wait_rx();
        assert_eq!(p.len(), 1, "expected exactly one packet, got {p:?}");
        p.remove(0)
    }

    /// Queues a tx chain of raw descriptors (addr, len, flags) and kicks.
    fn send_descs(&mut self, descs: &[(u64, u32, u16)]) {
        let first = (self.tx_sent % (QSIZE / 4)) * 4;
        assert!(descs.len() <= 4);
        let table: Vec<_> = descs
            .iter()
            .enumerate()
            .map(|(i, &(a, l, f))| {
                let last = i + 1 == descs.len();
                (a, l, if last { f } else { f | NEXT }, first + i as u16 + 1)
            })
            .collect();
        self.tx.set_descs(first, &table);
        self.tx.push_avail(&[first]);
        self.tx_sent = self.tx_sent.wrapping_add(1);
        self.kick(1);
    }

    /// Sends a packet: header and payload in two descriptors (one if no payload).
    fn send(&mut self, mut h: Header, payload: &[u8]) {
        if h.op == OP_RW && h.len == 0 {
            h.len = payload.len() as u32;
        }
        let base = TX_BUF + u64::from(self.tx_sent % (QSIZE / 4)) * TX_SLOT;
        self.mem
            .write_slice(&h.to_bytes(), GuestAddress(base))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(base + 0x100))
            .unwrap();
        if payload.is_empty() {
            self.send_descs(&[(base, HDR_LEN as u32, 0)]);
        } else {
            self.send_descs(&[
                (base, HDR_LEN as u32, 0),
                (base + 0x100, payload.len() as u32, 0),
            ]);
        }
        self.pump();
    }

    fn counts(&self) -> (usize, usize, usize, usize) {
        self.dev.lock().unwrap().muxer.counts()
    }

    fn assert_healthy(&mut self) {
        assert!(!self.dev.lock().unwrap().is_broken());
        assert_eq!(r32(&mut self.t, 0x70), DRIVER_OK);
    }

    /// Opens a guest-initiated connection from guest port `gport` to host port `hport`
    /// (listener at `<uds>_<hport>`); returns the host side. Needs an rx buffer.
    fn guest_connect(&mut self, listener: &UnixListener, gport: u32, hport: u32) -> UnixStream {
        self.send(hdr(gport, hport, OP_REQUEST), &[]);
        let (h, _) = self.one_rx();
        assert_eq!(
            (h.op, h.src_port, h.dst_port),
            (OP_RESPONSE, hport, gport),
            "{h:?}"
        );
        let (s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s
    }

    /// Connects a host client to guest port `gport`; returns the client and the host port
    /// the device allocated (the guest has answered RESPONSE). Needs an rx buffer.
    fn host_connect(&mut self, gport: u32) -> (UnixStream, u32) {
        let mut c = UnixStream::connect(&self.uds).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        c.write_all(format!("CONNECT {gport}\n").as_bytes())
            .unwrap();
        let (h, _) = self.one_rx();
        assert_eq!(
            (h.op, h.dst_port, h.src_cid, h.dst_cid, h.type_),
            (OP_REQUEST, gport, HOST_CID, CID, TYPE_STREAM)
        );
        assert_eq!(h.buf_alloc, CONN_BUF_SIZE);
        let local = h.src_port;
        self.send(hdr(gport, local, OP_RESPONSE), &[]);
        let mut line = [0u8; 64];
        let expect = format!("OK {local}\n");
        c.read_exact(&mut line[..expect.len()]).unwrap();
        assert_eq!(&line[..expect.len()], expect.as_bytes());
        (c, local)
    }

    fn listen(&self, port: u32) -> UnixListener {
        UnixListener::bind(format!("{}_{port}", self.uds.display())).unwrap()
    }
}

fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).unwrap();
    b
}

fn assert_eof(s: &mut UnixStream) {
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => {}
        Ok(n) => panic!("expected EOF, got {n} bytes"),
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
    }
}

#[test]
fn config_and_construction_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let v = Vsock::new(&VsockConfig {
        guest_cid: 42,
        uds_path: path.clone(),
    })
    .unwrap();
    let mut c = [0u8; 8];
    v.read_config(0, &mut c);
    assert_eq!(u64::from_le_bytes(c), 42);
    let mut c = [0u8; 4];
    v.read_config(4, &mut c);
    assert_eq!(c, [0; 4]);
    v.read_config(6, &mut c);
    assert_eq!(c, [0; 4]);
    assert_eq!(v.avail_features(), VIRTIO_F_VERSION_1);
    assert!(matches!(
        Vsock::new(&VsockConfig {
            guest_cid: 43,
            uds_path: path.clone()
        }),
        Err(VsockError::Bind { .. })
    ));
    drop(v);
    assert!(!path.exists(), "the socket file goes with the device");
    for bad in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        assert!(matches!(
            Vsock::new(&VsockConfig {
                guest_cid: bad,
                uds_path: dir.path().join("w.sock")
            }),
            Err(VsockError::InvalidCid(_))
        ));
    }
}

#[test]
fn host_initiated_connection_exchanges_data_both_ways() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    h.post_rx(8);
    let (mut c, local) = h.host_connect(1234);
    assert!(local >= 1 << 30);

    // Data the client sent right behind its CONNECT line would flow too; now host -> guest.
    c.write_all(b"hello from the host").unwrap();
    let (p, data) = h.one_rx();
    assert_eq!(
        (p.op, p.src_port, p.dst_port, p.len),
        (OP_RW, local, 1234, 19)
    );
    assert_eq!(data, b"hello from the host");

    // guest -> host.
    h.send(hdr(1234, local, OP_RW), b"hello from the guest");
    assert_eq!(read_n(&mut c, 20), b"hello from the guest");

    // A CREDIT_REQUEST gets a CREDIT_UPDATE carrying what was forwarded.
    h.send(hdr(1234, local, OP_CREDIT_REQUEST), &[]);
    let (p, _) = h.one_rx();
    assert_eq!(
        (p.op, p.fwd_cnt, p.buf_alloc),
        (OP_CREDIT_UPDATE, 20, CONN_BUF_SIZE)
    );

    // The guest closes: the host sees EOF, the guest gets its RST.
    let mut s = hdr(1234, local, OP_SHUTDOWN);
    s.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    h.send(s, &[]);
    let (p, _) = h.one_rx();
    assert_eq!((p.op, p.src_port, p.dst_port), (OP_RST, local, 1234));
    assert_eof(&mut c);
    assert_eq!(h.counts(), (0, 0, 0, 0));
    h.assert_healthy();
}

#[test]
fn data_sent_with_the_connect_line_is_delivered() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    h.post_rx(8);
    let mut c = UnixStream::connect(&h.uds).unwrap();
    c.write_all(b"CONNECT 77\nearly bytes").unwrap();
    let (p, _) = h.one_rx();
    assert_eq!(p.op, OP_REQUEST);
    h.send(hdr(77, p.src_port, OP_RESPONSE), &[]);
    let (d, data) = h.one_rx();
    assert_eq!(d.op, OP_RW);
    assert_eq!(data, b"early bytes");
}

#[test]
fn guest_initiated_connection_and_half_close() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let l = h.listen(5000);
    h.post_rx(8);
    let mut s = h.guest_connect(&l, 40000, 5000);

    h.send(hdr(40000, 5000, OP_RW), b"ping");
    assert_eq!(read_n(&mut s, 4), b"ping");
    s.write_all(b"pong").unwrap();
    let (p, data) = h.one_rx();
    assert_eq!(
        (p.op, p.src_port, p.dst_port, p.src_cid, p.dst_cid),
        (OP_RW, 5000, 40000, HOST_CID, CID)
    );
    assert_eq!(data, b"pong");

    // The host half-closes: SHUTDOWN(SEND); the guest may still send.
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let (p, _) = h.one_rx();
    assert_eq!((p.op, p.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    h.send(hdr(40000, 5000, OP_RW), b"late");
    assert_eq!(read_n(&mut s, 4), b"late");

    // The guest half-closes too: the host reads EOF.
    let mut sh = hdr(40000, 5000, OP_SHUTDOWN);
    sh.flags = SHUTDOWN_SEND;
    h.send(sh, &[]);
    assert_eof(&mut s);
    // Then RST from the guest drops the connection.
    h.send(hdr(40000, 5000, OP_RST), &[]);
    assert_eq!(h.counts().0, 0);
    h.assert_no_rx();
    h.assert_healthy();
}

#[test]
fn host_close_sends_a_full_shutdown() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let l = h.listen(5001);
    h.post_rx(8);
    let mut s = h.guest_connect(&l, 1, 5001);
    s.write_all(b"last words").unwrap();
    drop(s);
    let mut got = h.wait_rx();
    if got.len() < 2 {
        got.extend(h.wait_rx());
    }
    assert_eq!(got[0].0.op, OP_RW);
    assert_eq!(got[0].1, b"last words");
    assert_eq!(
        (got[1].0.op, got[1].0.flags),
        (OP_SHUTDOWN, SHUTDOWN_SEND | SHUTDOWN_RCV)
    );
    // Guest data for a closed host peer resets the connection.
    h.send(hdr(1, 5001, OP_RW), b"anyone?");
    let (p, _) = h.one_rx();
    assert_eq!(p.op, OP_RST);
    assert_eq!(h.counts().0, 0);
}

#[test]
fn request_to_a_port_nobody_listens_on_gets_rst() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    h.post_rx(4);
    h.send(hdr(1000, 6000, OP_REQUEST), &[]);
    let (p, _) = h.one_rx();
    assert_eq!(
        (p.op, p.src_port, p.dst_port, p.dst_cid),
        (OP_RST, 6000, 1000, CID)
    );
    // A socket file that is not a listener: refused too.
    std::fs::write(format!("{}_6001", h.uds.display()), b"").unwrap();
    h.send(hdr(1000, 6001, OP_REQUEST), &[]);
    assert_eq!(h.one_rx().0.op, OP_RST);
    assert_eq!(h.counts(), (0, 0, 0, 0));
    h.assert_healthy();
}

#[test]
fn packets_before_a_connection_get_rst() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    h.post_rx(16);
    for op in [
        OP_RW,
        OP_RESPONSE,
        OP_SHUTDOWN,
        OP_CREDIT_UPDATE,
        OP_CREDIT_REQUEST,
    ] {
        h.send(hdr(1, 7000, op), b"x");
        let (p, _) = h.one_rx();
        assert_eq!((p.op, p.dst_port), (OP_RST, 1), "op {op}");
    }
    // An RST for nothing gets no answer.
    h.send(hdr(1, 7000, OP_RST), &[]);
    h.assert_no_rx();

    // RW on a host-initiated connection still waiting for RESPONSE: reset, client closed.
    let mut c = UnixStream::connect(&h.uds).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    c.write_all(b"CONNECT 90\n").unwrap();
    let (p, _) = h.one_rx();
    assert_eq!(p.op, OP_REQUEST);
    h.send(hdr(90, p.src_port, OP_RW), b"too early");
    assert_eq!(h.one_rx().0.op, OP_RST);
    assert_eof(&mut c);
    h.assert_healthy();
}

#[test]
fn guest_refusing_a_host_connection() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    h.post_rx(4);
    let mut c = UnixStream::connect(&h.uds).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    c.write_all(b"CONNECT 91\n").unwrap();
    let (p, _) = h.one_rx();
    h.send(hdr(91, p.src_port, OP_RST), &[]);
    assert_eof(&mut c);
    assert_eq!(h.counts().0, 0);
}

#[test]
fn malformed_tx_packets_are_dropped() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let l = h.listen(5002);
    h.post_rx(16);
    let mut s = h.guest_connect(&l, 2, 5002);

    // Unknown op: dropped, no reply, connection intact.
    h.send(hdr(2, 5002, 99), &[]);
    h.send(hdr(2, 5002, 0), &[]);
    h.assert_no_rx();
    // Wrong CIDs: dropped silently.
    let mut p = hdr(2, 5002, OP_RW);
    p.dst_cid = 5;
    h.send(p, b"nope");
    let mut p = hdr(2, 5002, OP_RW);
    p.src_cid = 4;
    h.send(p, b"nope");
    let mut p = hdr(2, 5002, OP_RW);
    p.dst_cid = u64::MAX;
    h.send(p, b"nope");
    h.assert_no_rx();
    assert_eq!(h.counts().0, 1);
    // Unsupported type on another port: RST.
    let mut p = hdr(3, 5002, OP_REQUEST);
    p.type_ = 2;
    h.send(p, &[]);
    assert_eq!(h.one_rx().0.op, OP_RST);
    // Chains that are not one readable header (+ payload): dropped.
    let base = TX_BUF + 0x10_0000;
    mem.write_slice(&hdr(2, 5002, OP_RW).to_bytes(), GuestAddress(base))
        .unwrap();
    h.send_descs(&[(base, 20, 0)]); // shorter than a header
    h.send_descs(&[(base, HDR_LEN as u32, W)]); // device-writable
    h.send_descs(&[(base, HDR_LEN as u32, 0), (base + 0x100, 8, W)]);
    h.send_descs(&[(TEST_MEM_SIZE - 10, HDR_LEN as u32, 0)]); // outside memory
    h.pump();
    h.assert_no_rx();
    assert_eq!(h.counts().0, 1);
    s.set_nonblocking(true).unwrap();
    assert_eq!(
        s.read(&mut [0u8; 8]).unwrap_err().kind(),
        ErrorKind::WouldBlock
    );
    s.set_nonblocking(false).unwrap();

    // A header split over two descriptors is fine (no layout assumptions).
    let mut p = hdr(2, 5002, OP_RW);
    p.len = 3;
    mem.write_slice(&p.to_bytes(), GuestAddress(base)).unwrap();
    mem.write_slice(b"abc", GuestAddress(base + 0x200)).unwrap();
    h.send_descs(&[
        (base, 10, 0),
        (base + 10, (HDR_LEN - 10) as u32, 0),
        (base + 0x200, 3, 0),
    ]);
    h.pump();
    assert_eq!(read_n(&mut s, 3), b"abc");

    // A bogus length (more than the buffers hold, or over the packet cap): the connection
    // is reset.
    let mut p = hdr(2, 5002, OP_RW);
    p.len = 1000;
    h.send(p, b"short");
    assert_eq!(h.one_rx().0.op, OP_RST);
    assert_eof(&mut s);
    let mut s = h.guest_connect(&l, 2, 5002);
    let mut p = hdr(2, 5002, OP_RW);
    p.len = u32::MAX;
    h.send(p, b"x");
    assert_eq!(h.one_rx().0.op, OP_RST);
    assert_eof(&mut s);

    // After all that, a new connection works.
    let mut s = h.guest_connect(&l, 4, 5002);
    h.send(hdr(4, 5002, OP_RW), b"ok");
    assert_eq!(read_n(&mut s, 2), b"ok");
    h.assert_healthy();
}

#[test]
fn bad_rx_buffers_are_returned_unused() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    // Too small, device-readable, outside memory; then a good one.
    h.rx.set_descs(0, &[(RX_BUF, 10, W, 0)]);
    h.rx.set_descs(1, &[(RX_BUF + RX_SLOT, RX_BUF_LEN, 0, 0)]);
    h.rx.set_descs(2, &[(TEST_MEM_SIZE - 8, RX_BUF_LEN, W, 0)]);
    h.rx.set_descs(3, &[(RX_BUF + 3 * RX_SLOT, RX_BUF_LEN, W, 0)]);
    h.rx.push_avail(&[0, 1, 2, 3]);
    h.rx_posted = 4;
    h.send(hdr(1, 6000, OP_REQUEST), &[]);
    let got = h.wait_rx();
    assert_eq!(got.len(), 4);
    assert!(got[..3].iter().all(|(p, _)| p.op == 0), "{got:?}");
    assert_eq!(got[3].0.op, OP_RST);
    h.assert_healthy();
}

#[test]
fn a_guest_without_rx_buffers_stays_bounded() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let l = h.listen(5003);
    h.post_rx(1);
    let mut req = hdr(10, 5003, OP_REQUEST);
    req.buf_alloc = 8192;
    h.send(req, &[]);
    assert_eq!(h.one_rx().0.op, OP_RESPONSE);
    let (mut s, _) = l.accept().unwrap();

    // The host floods; the guest offers no rx buffers.
    s.set_nonblocking(true).unwrap();
    let chunk = vec![0x5au8; 16 * 1024];
    let mut sent = 0usize;
    for _ in 0..1000 {
        match s.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
        h.em.run_with_timeout(0).unwrap();
    }
    assert!(sent < 16 * 1024 * 1000, "the host was never pushed back");
    h.pump();
    assert_eq!(h.dev.lock().unwrap().muxer.buffered(), 0);
    // Nothing keeps the event loop busy.
    assert_eq!(h.em.run_with_timeout(50).unwrap(), 0);

    // Packets for unknown connections while the guest gives no buffers: RSTs are capped.
    for i in 0..(RST_QUEUE_CAP as u32 + 50) {
        h.send(hdr(20_000 + i, 7777, OP_RW), b"x");
    }
    assert_eq!(h.counts().2, RST_QUEUE_CAP);

    // Buffers arrive: the RSTs, then the connection's data, at most the guest's credit.
    let mut rst = 0;
    let mut data = 0usize;
    for _ in 0..10 {
        h.refill_rx();
        h.pump();
        for (p, d) in h.rx_packets() {
            match p.op {
                OP_RST => rst += 1,
                OP_RW => data += d.len(),
                other => panic!("unexpected op {other}"),
            }
        }
    }
    assert_eq!(rst, RST_QUEUE_CAP);
    assert_eq!(data, 8192, "host data stops at the guest's credit");
    assert_eq!(
        h.em.run_with_timeout(50).unwrap(),
        0,
        "no busy loop without credit"
    );

    // The guest consumed it: more flows.
    let mut cu = hdr(10, 5003, OP_CREDIT_UPDATE);
    cu.buf_alloc = 8192;
    cu.fwd_cnt = 8192;
    h.send(cu, &[]);
    let mut more = 0;
    for _ in 0..5 {
        for (p, d) in h.rx_packets() {
            assert_eq!(p.op, OP_RW);
            more += d.len();
        }
        h.refill_rx();
        h.pump();
    }
    assert_eq!(more, 8192);
    h.assert_healthy();
}

#[test]
fn a_guest_overrunning_its_credit_is_reset() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let l = h.listen(5004);
    h.post_rx(8);
    let _s = h.guest_connect(&l, 11, 5004); // the host never reads
    let big = vec![7u8; MAX_PKT_PAYLOAD as usize];
    let mut reset = false;
    for _ in 0..64 {
        h.send(hdr(11, 5004, OP_RW), &big);
        assert!(h.dev.lock().unwrap().muxer.buffered() <= CONN_BUF_SIZE as usize);
        if h.rx_packets().iter().any(|(p, _)| p.op == OP_RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "a guest past its credit is reset");
    assert_eq!(h.counts().0, 0);
    h.assert_healthy();
}

#[test]
fn connection_limit() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let l = h.listen(5005);
    l.set_nonblocking(true).unwrap();
    let mut accepted = Vec::new();
    for i in 0..MAX_CONNECTIONS as u32 {
        h.post_rx(1);
        h.send(hdr(100 + i, 5005, OP_REQUEST), &[]);
        let (p, _) = h.one_rx();
        assert_eq!(p.op, OP_RESPONSE, "connection {i}");
        accepted.push(l.accept().unwrap().0);
    }
    h.post_rx(2);
    h.send(hdr(99, 5005, OP_REQUEST), &[]);
    assert_eq!(h.one_rx().0.op, OP_RST);
    // Host clients beyond the limit are closed at once.
    let mut c = UnixStream::connect(&h.uds).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    h.pump();
    assert_eof(&mut c);
    assert_eq!(h.counts().0, MAX_CONNECTIONS);
    // One closes; a new one fits.
    h.send(hdr(100, 5005, OP_RST), &[]);
    h.send(hdr(99, 5005, OP_REQUEST), &[]);
    assert_eq!(h.one_rx().0.op, OP_RESPONSE);
}

#[test]
fn handshake_garbage_and_timeouts() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    h.post_rx(8);
    let open = |h: &Harness| {
        let c = UnixStream::connect(&h.uds).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        c
    };
    let mut bad = open(&h);
    bad.write_all(b"HELLO 5\n").unwrap();
    let mut long = open(&h);
    long.write_all(&[b'C'; 100]).unwrap();
    let mut silent = open(&h);
    h.pump();
    assert_eof(&mut bad);
    assert_eof(&mut long);
    assert_eq!(h.counts().1, 1);
    assert!(h.rx_packets().is_empty());

    // The silent one, and a host connection the guest never answers, expire.
    let mut c = open(&h);
    c.write_all(b"CONNECT 5\n").unwrap();
    let (p, _) = h.one_rx();
    assert_eq!(p.op, OP_REQUEST);
    h.dev
        .lock()
        .unwrap()
        .muxer
        .sweep(Instant::now() + HANDSHAKE_TIMEOUT + Duration::from_secs(1));
    h.dev.lock().unwrap().control_evt.write(1).unwrap();
    h.pump();
    assert_eof(&mut silent);
    assert_eof(&mut c);
    let (p, _) = h.one_rx();
    assert_eq!((p.op, p.dst_port), (OP_RST, 5));
    assert_eq!(h.counts(), (0, 0, 0, 0));
}

#[test]
fn the_housekeeping_timer_fires() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let _c = UnixStream::connect(&h.uds).unwrap();
    h.pump();
    assert_eq!(h.counts().1, 1);
    assert!(h.dev.lock().unwrap().timer_armed);
    // The timer runs (its period is short); the handshake is not due yet.
    assert!(h.em.run_with_timeout(1000).unwrap() >= 1);
    assert_eq!(h.counts().1, 1);
}

#[test]
fn transport_reset_event() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let l = h.listen(5006);
    h.post_rx(4);
    let mut s = h.guest_connect(&l, 12, 5006);
    // No event buffer yet: the event waits.
    h.dev.lock().unwrap().send_transport_reset().unwrap();
    h.pump();
    assert_eof(&mut s);
    assert_eq!(h.counts().0, 0);
    assert_eq!(h.ev.used_idx(), 0);
    mem.write_obj(0xffff_ffffu32, GuestAddress(EV_BUF)).unwrap();
    h.ev.set_descs(0, &[(EV_BUF, 8, W, 0)]);
    h.ev.push_avail(&[0]);
    h.kick(2);
    h.pump();
    assert_eq!(h.ev.used_idx(), 1);
    assert_eq!(h.ev.used_elem(0), (0, 4));
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(EV_BUF)).unwrap(),
        EVENT_TRANSPORT_RESET
    );
    // Only one event per reset; a bad event buffer is returned empty.
    h.ev.set_descs(1, &[(EV_BUF, 2, W, 0)]);
    h.ev.push_avail(&[1]);
    h.dev.lock().unwrap().send_transport_reset().unwrap();
    h.pump();
    assert_eq!(h.ev.used_elem(1), (1, 0));
    let v = Vsock::new(&VsockConfig {
        guest_cid: 9,
        uds_path: h.uds.with_extension("other"),
    })
    .unwrap();
    drop(v);
    let mut v = Vsock::new(&VsockConfig {
        guest_cid: 9,
        uds_path: h.uds.with_extension("other"),
    })
    .unwrap();
    assert!(matches!(
        v.send_transport_reset(),
        Err(VsockError::NotActivated)
    ));
}

#[test]
fn host_connections_wait_for_the_guest_to_handle_a_transport_reset() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    h.post_rx(4);
    h.ev.set_descs(0, &[(EV_BUF, 8, W, 0)]);
    h.ev.push_avail(&[0]);
    h.dev.lock().unwrap().send_transport_reset().unwrap();
    h.pump();
    assert_eq!(h.ev.used_elem(0), (0, 4), "the event is delivered at once");
    // A host client connecting now is not forwarded: the guest would drop it with the
    // sockets the event resets.
    let mut c = UnixStream::connect(&h.uds).unwrap();
    c.write_all(b"CONNECT 33\n").unwrap();
    h.pump();
    h.assert_no_rx();
    // The driver handled the event and re-offers the buffer: the request goes out.
    h.ev.set_descs(1, &[(EV_BUF, 8, W, 0)]);
    h.ev.push_avail(&[1]);
    h.kick(2);
    h.pump();
    let (p, _) = h.one_rx();
    assert_eq!((p.op, p.dst_port), (OP_REQUEST, 33));
}

#[test]
fn a_broken_ring_marks_the_device_and_a_reset_recovers() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let l = h.listen(5007);
    h.post_rx(4);
    let mut s = h.guest_connect(&l, 13, 5007);
    let irq = h.dev.lock().unwrap().interrupt().clone();
    h.tx.set_avail_idx(h.tx.avail_idx().wrapping_add(1000));
    h.kick(1);
    h.pump();
    assert!(h.dev.lock().unwrap().is_broken());
    assert_eq!(r32(&mut h.t, 0x70), DRIVER_OK | status::DEVICE_NEEDS_RESET);
    assert_ne!(irq.status() & VIRTIO_MMIO_INT_CONFIG, 0);
    assert_eof(&mut s);
    // Host clients are not served while broken.
    let mut c = UnixStream::connect(&h.uds).unwrap();
    c.write_all(b"CONNECT 1\n").unwrap();
    h.pump();
    assert_eq!(h.counts().1, 0);

    // The driver resets and starts over; the waiting client is served.
    let rx = TestQueue::new(&mem, 0x1_0000, QSIZE);
    let tx = TestQueue::new(&mem, 0x2_0000, QSIZE);
    let ev = TestQueue::new(&mem, 0x3_0000, QSIZE);
    h.rx_posted = 0;
    h.rx_seen = 0;
    h.tx_sent = 0;
    let layouts = [rx.layout(), tx.layout(), ev.layout()];
    assert_eq!(
        drive_to_driver_ok(&mut h.t, VIRTIO_F_VERSION_1, &layouts),
        DRIVER_OK
    );
    h.post_rx(4);
    let (p, _) = h.one_rx();
    assert_eq!((p.op, p.dst_port), (OP_REQUEST, 1));
    h.assert_healthy();
}

#[test]
fn nothing_happens_before_activation() {
    let mem = test_mem();
    let mut h = Harness::inactive(&mem);
    // Kicks and host clients before DRIVER_OK.
    for q in 0..3 {
        h.kick(q);
    }
    let mut c = UnixStream::connect(&h.uds).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    c.write_all(b"CONNECT 8\n").unwrap();
    h.pump();
    assert_eq!(h.counts(), (0, 0, 0, 0));
    assert!(matches!(
        h.dev.lock().unwrap().send_transport_reset(),
        Err(VsockError::NotActivated)
    ));
    // Activation: the waiting client is accepted and its REQUEST goes out.
    let mut h = h.activated();
    h.post_rx(2);
    let (p, _) = h.one_rx();
    assert_eq!((p.op, p.dst_port), (OP_REQUEST, 8));
    h.send(hdr(8, p.src_port, OP_RESPONSE), &[]);
    let mut line = String::new();
    let mut b = [0u8; 1];
    while !line.ends_with('\n') {
        c.read_exact(&mut b).unwrap();
        line.push(b[0] as char);
    }
    assert_eq!(line, format!("OK {}\n", p.src_port));
}

#[test]
fn device_reset_closes_connections() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let l = h.listen(5008);
    h.post_rx(4);
    let mut s = h.guest_connect(&l, 14, 5008);
    w32(&mut h.t, 0x70, 0);
    h.pump();
    assert!(!h.dev.lock().unwrap().is_activated());
    assert_eof(&mut s);
    assert_eq!(h.counts(), (0, 0, 0, 0));
}

#[test]
fn looping_oversized_and_overflowing_chains() {
    let mem = test_mem();
    let mut h = Harness::new(&mem);
    let l = h.listen(5009);
    h.post_rx(1);
    let mut s = h.guest_connect(&l, 15, 5009);
    let base = TX_BUF + 0x10_0000;
    let mut p = hdr(15, 5009, OP_RW);
    p.len = 4;
    mem.write_slice(&p.to_bytes(), GuestAddress(base)).unwrap();

    // tx: a loop (60 -> 61 -> 60), a next index past the table, a length that runs past the
    // end of memory, one that overflows the address space, and an indirect table of 2000.
    h.tx.set_descs(
        60,
        &[
            (base, HDR_LEN as u32, NEXT, 61),
            (base + 0x100, 4, NEXT, 60),
        ],
    );
    h.tx.set_descs(62, &[(base, HDR_LEN as u32, NEXT, 999)]);
    h.tx.set_descs(63, &[(base, u32::MAX, 0, 0)]);
    h.tx.set_descs(59, &[(u64::MAX - 8, HDR_LEN as u32, 0, 0)]);
    let table = 0xC0_0000u64;
    for i in 0..2000u64 {
        let d = virtio_queue::desc::RawDescriptor::from(
            virtio_queue::desc::split::Descriptor::new(base, HDR_LEN as u32, NEXT, (i + 1) as u16),
        );
        mem.write_obj(d, GuestAddress(table + 16 * i)).unwrap();
    }
    let indirect = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
    h.tx.set_descs(58, &[(table, 2000 * 16, indirect, 0)]);
    h.tx.push_avail(&[60, 62, 63, 59, 58]);
    h.kick(1);
    h.assert_no_rx();
    let used = h.tx.used_idx();
    let heads: Vec<u32> = (used - 5..used).map(|i| h.tx.used_elem(i).0).collect();
    assert_eq!(heads, [60, 62, 63, 59, 58], "every bad chain is returned");
    s.set_nonblocking(true).unwrap();
    assert_eq!(
        s.read(&mut [0u8; 8]).unwrap_err().kind(),
        ErrorKind::WouldBlock
    );
    s.set_nonblocking(false).unwrap();

    // rx: a looping buffer chain is returned unused, the next good one is used.
    let slot = h.rx_posted % QSIZE;
    let next = (slot + 1) % QSIZE;
    h.rx.set_descs(
        slot,
        &[(RX_BUF + u64::from(slot) * RX_SLOT, 64, W | NEXT, slot)],
    );
    h.rx.push_avail(&[slot]);
    h.rx_posted += 1;
    h.rx.set_descs(
        next,
        &[(RX_BUF + u64::from(next) * RX_SLOT, RX_BUF_LEN, W, 0)],
    );
    h.rx.push_avail(&[next]);
    h.rx_posted += 1;
    std::io::Write::write_all(&mut s, b"data").unwrap();
    h.kick(0);
    let got = h.wait_rx();
    let ops: Vec<u16> = got.iter().map(|(p, _)| p.op).collect();
    assert!(ops.ends_with(&[0, OP_RW]), "{ops:?}");
    assert_eq!(got.last().unwrap().1, b"data");

    // An rx available index far ahead breaks the device.
    h.rx.set_avail_idx(h.rx.avail_idx().wrapping_add(500));
    s.write_all(b"more").unwrap();
    h.kick(0);
    h.pump();
    assert!(h.dev.lock().unwrap().is_broken());
    assert_eq!(r32(&mut h.t, 0x70), DRIVER_OK | status::DEVICE_NEEDS_RESET);
}
