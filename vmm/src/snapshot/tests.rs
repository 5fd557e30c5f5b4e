use super::memory::{layout_of, map_memory, merge, write_memory};
use super::persist::{DevicesState, I8042State, SerialState};
use super::*;
use crate::config::SerialConfig;
use crate::memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn sample(kind: SnapshotKind, mem: &GuestMemoryMmap) -> Snapshot {
    let dirty = match kind {
        SnapshotKind::Full => None,
        SnapshotKind::Diff => Some(vec![vec![0b101u64; 4]]),
    };
    let regs = kvm_regs {
        rip: 0x100_0042,
        rax: 7,
        ..Default::default()
    };
    Snapshot {
        kind,
        config: VmConfig {
            kernel: "/k".into(),
            initrd: None,
            cmdline: None,
            vcpus: 1,
            mem_mib: 16,
            block: vec![],
            vsock: None,
            serial: SerialConfig::None,
            track_dirty_pages: kind == SnapshotKind::Diff,
        },
        cmdline: "console=ttyS0".into(),
        vm: VmState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
        },
        vcpus: vec![VcpuState {
            id: 0,
            cpuid: vec![kvm_cpuid_entry2 {
                function: 1,
                eax: 0x800f12,
                ..Default::default()
            }],
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                data: 12345,
                ..Default::default()
            }],
            regs,
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            debugregs: Default::default(),
            lapic: Default::default(),
            mp_state: Default::default(),
            events: Default::default(),
            tsc_khz: Some(2_000_000),
        }],
        devices: DevicesState {
            serial: SerialState::from(vm_superio::serial::SerialState::default()),
            i8042: I8042State::default(),
            virtio: vec![],
        },
        memory: layout_of(mem, dirty),
    }
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 256 * 4096)]).unwrap()
}

fn encoded() -> Vec<u8> {
    encode(&sample(SnapshotKind::Full, &mem())).unwrap()
}

fn err_of(bytes: &[u8]) -> SnapshotError {
    decode(Path::new("/snap/state"), bytes).unwrap_err()
}

#[test]
fn round_trip_through_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    for kind in [SnapshotKind::Full, SnapshotKind::Diff] {
        let s = sample(kind, &mem());
        write_state(&path, &s).unwrap();
        let (h, back) = read_state(&path).unwrap();
        assert_eq!(h.kind, kind);
        assert_eq!(h.vmm_version, VMM_VERSION);
        assert_eq!(back.kind, kind);
        assert_eq!(back.config, s.config);
        assert_eq!(back.vcpus[0].regs.rip, 0x100_0042);
        assert_eq!(back.vcpus[0].regs.rax, 7);
        assert_eq!(back.vcpus[0].msrs[0].data, 12345);
        assert_eq!(back.vcpus[0].cpuid[0].eax, 0x800f12);
        assert_eq!(back.vcpus[0].tsc_khz, Some(2_000_000));
        assert_eq!(back.memory, s.memory);
        assert_eq!(back.devices.serial, s.devices.serial);
    }
}

#[test]
fn bad_magic_is_refused() {
    let mut b = encoded();
    b[0] = b'X';
    let e = err_of(&b);
    assert!(matches!(e, SnapshotError::BadMagic { .. }), "{e}");
    assert!(
        e.to_string().contains("not a Kindling snapshot state file"),
        "{e}"
    );
    let e = err_of(b"{\"json\": true}");
    assert!(matches!(e, SnapshotError::BadMagic { .. }), "{e}");
    let e = err_of(b"");
    assert!(matches!(e, SnapshotError::Truncated { .. }), "{e}");
}

#[test]
fn another_format_version_is_refused_naming_both() {
    let mut b = encoded();
    b[8..12].copy_from_slice(&7u32.to_le_bytes());
    let e = err_of(&b);
    assert!(
        matches!(
            e,
            SnapshotError::VersionMismatch {
                found: 7,
                expected: FORMAT_VERSION,
                ..
            }
        ),
        "{e}"
    );
    let msg = e.to_string();
    assert!(msg.contains("format version 7"), "{msg}");
    assert!(
        msg.contains(&format!("reads format version {FORMAT_VERSION}")),
        "{msg}"
    );
}

#[test]
fn truncation_anywhere_is_reported_as_such() {
    let b = encoded();
    let header_len = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
    let body_at = PREFIX_LEN + header_len + 8;
    for (cut, what) in [
        (4, "the magic"),
        (10, "the format version"),
        (14, "the header length"),
        (PREFIX_LEN + header_len / 2, "the header"),
        (PREFIX_LEN + header_len + 3, "the body length"),
        (body_at + 100, "the body"),
        (b.len() - 1, "the checksum"),
    ] {
        let e = err_of(&b[..cut]);
        assert!(
            matches!(e, SnapshotError::Truncated { .. }),
            "cut at {cut}: {e}"
        );
        let msg = e.to_string();
        assert!(msg.contains("is truncated"), "{msg}");
        assert!(msg.contains(what), "cut at {cut}: {msg}");
    }
}

#[test]
fn a_flipped_byte_fails_the_checksum() {
    let b = encoded();
    let header_len = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
    // In the header, in the middle of the body, and in the checksum itself.
    for at in [PREFIX_LEN + 2, b.len() / 2, b.len() - 5] {
        let mut c = b.clone();
        c[at] ^= 0x40;
        let e = err_of(&c);
        assert!(
            matches!(e, SnapshotError::Checksum { .. }),
            "byte {at}: {e}"
        );
        assert!(e.to_string().contains("checksum mismatch"), "{e}");
    }
    // A length field that claims more than the cap is refused before any allocation.
    let mut c = b.clone();
    c[PREFIX_LEN + header_len..PREFIX_LEN + header_len + 8]
        .copy_from_slice(&u64::MAX.to_le_bytes());
    let e = err_of(&c);
    assert!(matches!(e, SnapshotError::TooLarge { .. }), "{e}");
    assert!(e.to_string().contains("exceeds the limit"), "{e}");
}

#[test]
fn a_body_that_does_not_decode_is_reported() {
    // A correctly framed and checksummed file whose body is not a snapshot.
    let header = br#"{"vmm_version":"0.1.0","kind":"full","created_unix_ms":0}"#;
    let body = br#"{"kind":"full"}"#;
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(header);
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(body);
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    let e = err_of(&out);
    assert!(matches!(e, SnapshotError::Decode { .. }), "{e}");
    assert!(e.to_string().contains("does not decode"), "{e}");
}

#[test]
fn memory_file_missing_or_of_the_wrong_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = mem();
    let layout = layout_of(&m, None);
    let path = dir.path().join("mem");
    let e = map_memory(&path, &layout).unwrap_err();
    assert!(matches!(e, SnapshotError::MemoryMissing { .. }), "{e}");
    assert!(e.to_string().contains("missing"), "{e}");
    std::fs::write(&path, vec![0u8; 4096 * 10]).unwrap();
    let e = map_memory(&path, &layout).unwrap_err();
    assert!(matches!(e, SnapshotError::MemorySize { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("is 40960 bytes"), "{msg}");
    assert!(msg.contains(&format!("{} bytes", 256 * 4096)), "{msg}");
}

#[test]
fn memory_round_trip_is_lazy_private_and_diffs_merge() {
    let dir = tempfile::tempdir().unwrap();
    let m = mem();
    m.write_slice(b"first page", GuestAddress(0)).unwrap();
    m.write_slice(b"page 100", GuestAddress(100 * 4096))
        .unwrap();
    let full = layout_of(&m, None);
    let base = dir.path().join("base.mem");
    write_memory(&m, &full, &base).unwrap();
    // Mapped privately: the guest's writes do not reach the file.
    let r = map_memory(&base, &full).unwrap();
    let mut buf = [0u8; 10];
    r.read_slice(&mut buf, GuestAddress(0)).unwrap();
    assert_eq!(&buf, b"first page");
    r.write_slice(b"changed!!!", GuestAddress(0)).unwrap();
    let on_disk = std::fs::read(&base).unwrap();
    assert_eq!(&on_disk[..10], b"first page");
    assert_eq!(&on_disk[100 * 4096..100 * 4096 + 8], b"page 100");

    // A diff of pages 0 and 200, merged onto the base.
    m.write_slice(b"second", GuestAddress(0)).unwrap();
    m.write_slice(b"page 200", GuestAddress(200 * 4096))
        .unwrap();
    let mut bits = vec![0u64; 4];
    bits[0] |= 1;
    bits[200 / 64] |= 1 << (200 % 64);
    let mut snap = sample(SnapshotKind::Diff, &m);
    snap.memory = layout_of(&m, Some(vec![bits]));
    let diff_mem = dir.path().join("diff.mem");
    let diff_state = dir.path().join("diff.state");
    write_memory(&m, &snap.memory, &diff_mem).unwrap();
    write_state(&diff_state, &snap).unwrap();
    // The diff file holds only those pages.
    let d = std::fs::read(&diff_mem).unwrap();
    assert_eq!(&d[100 * 4096..100 * 4096 + 8], &[0u8; 8]);
    assert_eq!(merge(&base, &diff_mem, &diff_state).unwrap(), 2);
    let merged = std::fs::read(&base).unwrap();
    let mut want = vec![0u8; 256 * 4096];
    m.read_slice(&mut want, GuestAddress(0)).unwrap();
    assert!(merged == want, "base + diff equals the current memory");
    // A full snapshot is not a diff.
    let full_state = dir.path().join("full.state");
    write_state(&full_state, &sample(SnapshotKind::Full, &m)).unwrap();
    let e = merge(&base, &diff_mem, &full_state).unwrap_err();
    assert!(e.to_string().contains("not a diff"), "{e}");
}

#[test]
fn full_snapshots_of_anonymous_memory_read_only_its_mapped_pages() {
    let set = |bits: &[u64]| -> Vec<u64> {
        (0..256)
            .filter(|p| bits[(p / 64) as usize] & (1 << (p % 64)) != 0)
            .collect()
    };
    let dir = tempfile::tempdir().unwrap();
    let m = mem();
    m.write_slice(b"touched", GuestAddress(3 * 4096)).unwrap();
    m.write_slice(b"also", GuestAddress(200 * 4096 + 10))
        .unwrap();
    let full = layout_of(&m, None);
    let path = dir.path().join("full.mem");
    write_memory(&m, &full, &path).unwrap();
    let mut want = vec![0u8; 256 * 4096];
    want[3 * 4096..3 * 4096 + 7].copy_from_slice(b"touched");
    want[200 * 4096 + 10..200 * 4096 + 14].copy_from_slice(b"also");
    assert!(std::fs::read(&path).unwrap() == want);
    // Writing the snapshot mapped no page the guest had not touched.
    let mapped = prefetch::mapped_pages(&m);
    let bits = mapped[0]
        .as_deref()
        .expect("anonymous memory has a pagemap");
    assert_eq!(set(bits), vec![3, 200]);

    // A restored VM's memory is a file mapping: untouched pages come from the file, so a full
    // snapshot of it reads every page.
    let restored = map_memory(&path, &full).unwrap();
    assert!(prefetch::mapped_pages(&restored)[0].is_none());
    restored
        .write_slice(b"later", GuestAddress(7 * 4096))
        .unwrap();
    let again = dir.path().join("again.mem");
    write_memory(&restored, &full, &again).unwrap();
    want[7 * 4096..7 * 4096 + 5].copy_from_slice(b"later");
    assert!(std::fs::read(&again).unwrap() == want);
}
