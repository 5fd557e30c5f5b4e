//! The virtio-vsock packet header (`struct virtio_vsock_hdr`, 44 bytes, little endian).

/// Size of the header on the wire.
pub const HDR_LEN: usize = 44;
/// The host's context id.
pub const HOST_CID: u64 = 2;
/// The only socket type supported.
pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive no more / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// The event-queue event telling the driver to drop all connections (after a restore).
pub const EVENT_TRANSPORT_RESET: u32 = 0;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

fn get<const N: usize>(b: &[u8; HDR_LEN], off: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(s) = b.get(off..off + N) {
        out.copy_from_slice(s);
    }
    out
}

fn put(b: &mut [u8; HDR_LEN], off: usize, v: &[u8]) {
    if let Some(d) = b.get_mut(off..off + v.len()) {
        d.copy_from_slice(v);
    }
}

impl Header {
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        Header {
            src_cid: u64::from_le_bytes(get(b, 0)),
            dst_cid: u64::from_le_bytes(get(b, 8)),
            src_port: u32::from_le_bytes(get(b, 16)),
            dst_port: u32::from_le_bytes(get(b, 20)),
            len: u32::from_le_bytes(get(b, 24)),
            type_: u16::from_le_bytes(get(b, 28)),
            op: u16::from_le_bytes(get(b, 30)),
            flags: u32::from_le_bytes(get(b, 32)),
            buf_alloc: u32::from_le_bytes(get(b, 36)),
            fwd_cnt: u32::from_le_bytes(get(b, 40)),
        }
    }

    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        put(&mut b, 0, &self.src_cid.to_le_bytes());
        put(&mut b, 8, &self.dst_cid.to_le_bytes());
        put(&mut b, 16, &self.src_port.to_le_bytes());
        put(&mut b, 20, &self.dst_port.to_le_bytes());
        put(&mut b, 24, &self.len.to_le_bytes());
        put(&mut b, 28, &self.type_.to_le_bytes());
        put(&mut b, 30, &self.op.to_le_bytes());
        put(&mut b, 32, &self.flags.to_le_bytes());
        put(&mut b, 36, &self.buf_alloc.to_le_bytes());
        put(&mut b, 40, &self.fwd_cnt.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_layout() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1122_3344,
            dst_port: 5,
            len: 6,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 9,
            buf_alloc: 10,
            fwd_cnt: 11,
        };
        let b = h.to_bytes();
        assert_eq!(Header::from_bytes(&b), h);
        assert_eq!(&b[16..20], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(&b[28..32], &[1, 0, 5, 0]);
        assert_eq!(&b[40..44], &[11, 0, 0, 0]);
    }
}
