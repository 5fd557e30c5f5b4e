//! Snapshots: the state file format, what it holds, and the guest memory file.
//!
//! # State file
//! ```text
//! magic      8 bytes   "KNDLSNAP"
//! version    u32 LE    FORMAT_VERSION
//! header_len u32 LE    <= MAX_HEADER_LEN
//! header     JSON      {"vmm_version", "kind": "full"|"diff", "created_unix_ms"}
//! body_len   u64 LE    <= MAX_BODY_LEN
//! body       JSON      [`Snapshot`]: VM config, VM state, vCPU states, device states, memory layout
//! sha256     32 bytes  over everything before it
//! ```
//! Reading checks, in order: the magic, the format version (a mismatch names both versions),
//! the lengths (never allocating from a length before checking it against its cap and the
//! file's size), the checksum, then the body's decoding. Each failure is its own
//! [`SnapshotError`] variant with a message that says what is wrong.
//!
//! # Memory file
//! The guest RAM regions concatenated, each at the `file_offset` recorded in
//! [`MemoryLayout`]. A full snapshot writes every non-zero page (zero pages stay holes in a
//! sparse file); a diff snapshot writes only the pages dirtied since the previous snapshot (or
//! since restore/boot) and records them in [`MemoryLayout::dirty`]. See [`memory`] for
//! writing, mapping (`MAP_PRIVATE`) and merging a diff onto its base.

pub mod memory;
pub mod persist;
pub mod prefetch;

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::VmConfig;
use persist::DevicesState;

/// First bytes of every state file.
pub const MAGIC: [u8; 8] = *b"KNDLSNAP";
/// The state file format this VMM writes and reads. Bump on any incompatible body change.
pub const FORMAT_VERSION: u32 = 1;
/// The VMM that wrote a snapshot (recorded in the header, shown in errors).
pub const VMM_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Caps on the length fields, so a corrupt file cannot make us allocate without bound.
pub const MAX_HEADER_LEN: u32 = 4096;
pub const MAX_BODY_LEN: u64 = 64 << 20;
const CHECKSUM_LEN: usize = 32;
/// magic + version + header_len.
const PREFIX_LEN: usize = 8 + 4 + 4;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot read the snapshot state file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a Kindling snapshot state file (bad magic bytes)")]
    BadMagic { path: PathBuf },
    #[error(
        "snapshot state file {path} has format version {found}, but this kindling-vmm \
         ({vmm}) reads format version {expected}; take a new snapshot with this VMM"
    )]
    VersionMismatch {
        path: PathBuf,
        found: u32,
        expected: u32,
        vmm: &'static str,
    },
    #[error("snapshot state file {path} is truncated ({len} bytes; {what} is cut off)")]
    Truncated {
        path: PathBuf,
        len: u64,
        what: &'static str,
    },
    #[error("snapshot state file {path}: {what} of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        path: PathBuf,
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("snapshot state file {path} is corrupt: SHA-256 checksum mismatch")]
    Checksum { path: PathBuf },
    #[error("snapshot state file {path} does not decode: {msg}")]
    Decode { path: PathBuf, msg: String },
    #[error("snapshot memory file {path} is missing or unreadable: {source}")]
    MemoryMissing {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("snapshot memory file {path} is {found} bytes, but the snapshot's guest memory is {expected} bytes")]
    MemorySize {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("mapping the snapshot memory file {path}: {msg}")]
    MemoryMap { path: PathBuf, msg: String },
    #[error("{0}")]
    Invalid(String),
}

/// Full or diff.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKind {
    /// The memory file holds all of guest memory.
    Full,
    /// The memory file holds only the pages in [`MemoryLayout::dirty`]; merge it onto its
    /// base (see [`memory::merge`]) before restoring.
    Diff,
}

impl std::str::FromStr for SnapshotKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "full" => Ok(SnapshotKind::Full),
            "diff" => Ok(SnapshotKind::Diff),
            other => Err(format!(
                "snapshot kind must be \"full\" or \"diff\", not {other:?}"
            )),
        }
    }
}

/// The state file's header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub vmm_version: String,
    pub kind: SnapshotKind,
    pub created_unix_ms: u64,
}

/// Everything needed to rebuild the VM (guest memory aside).
#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub kind: SnapshotKind,
    /// The configuration the VM was built from (the restore overrides apply on top).
    pub config: VmConfig,
    /// The kernel command line the guest booted with (informational; not rewritten).
    pub cmdline: String,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
    pub memory: MemoryLayout,
}

/// VM-wide KVM state: the in-kernel irqchip, the PIT and the KVM clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// One vCPU's KVM state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub tsc_khz: Option<u32>,
}

/// Where each guest RAM region lives in the memory file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    pub page_size: u64,
    pub regions: Vec<MemoryRegionState>,
    /// Diff snapshots: per region, a bitmap of the pages in the memory file (bit `i % 64` of
    /// word `i / 64` is page `i`). `None` for a full snapshot.
    pub dirty: Option<Vec<Vec<u64>>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegionState {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

impl MemoryLayout {
    /// The memory file's size.
    pub fn total_size(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.file_offset.saturating_add(r.size))
            .max()
            .unwrap_or(0)
    }

    /// Checks that the layout is self-consistent (it comes from a file).
    pub fn validate(&self) -> Result<(), SnapshotError> {
        let bad = |m: String| {
            Err(SnapshotError::Invalid(format!(
                "snapshot memory layout: {m}"
            )))
        };
        if self.page_size != 4096 {
            return bad(format!("page size {} (4096 expected)", self.page_size));
        }
        let mut offset = 0u64;
        for r in &self.regions {
            if r.size == 0 || r.size % self.page_size != 0 || r.guest_addr % self.page_size != 0 {
                return bad(format!(
                    "region {:#x}+{:#x} is not page aligned",
                    r.guest_addr, r.size
                ));
            }
            if r.file_offset != offset {
                return bad(format!(
                    "region {:#x} at file offset {:#x}, {offset:#x} expected",
                    r.guest_addr, r.file_offset
                ));
            }
            offset = offset.saturating_add(r.size);
        }
        if let Some(d) = &self.dirty {
            if d.len() != self.regions.len() {
                return bad("dirty bitmap count differs from the region count".into());
            }
            for (b, r) in d.iter().zip(&self.regions) {
                let words = (r.size / self.page_size).div_ceil(64);
                if b.len() as u64 != words {
                    return bad(format!(
                        "dirty bitmap of region {:#x} has {} words, {words} expected",
                        r.guest_addr,
                        b.len()
                    ));
                }
            }
        }
        Ok(())
    }
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Encodes a snapshot as a state file's bytes.
pub fn encode(snapshot: &Snapshot) -> Result<Vec<u8>, SnapshotError> {
    let header = Header {
        vmm_version: VMM_VERSION.to_string(),
        kind: snapshot.kind,
        created_unix_ms: now_unix_ms(),
    };
    let enc = |e: serde_json::Error| SnapshotError::Invalid(format!("encoding the snapshot: {e}"));
    let header = serde_json::to_vec(&header).map_err(enc)?;
    let body = serde_json::to_vec(snapshot).map_err(enc)?;
    if header.len() as u64 > u64::from(MAX_HEADER_LEN) || body.len() as u64 > MAX_BODY_LEN {
        return Err(SnapshotError::Invalid(format!(
            "the snapshot state is too large ({} bytes, at most {MAX_BODY_LEN})",
            body.len()
        )));
    }
    let mut out = Vec::with_capacity(PREFIX_LEN + header.len() + 8 + body.len() + CHECKSUM_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    Ok(out)
}

/// Decodes a state file's bytes (`path` only names the file in errors).
pub fn decode(path: &Path, bytes: &[u8]) -> Result<(Header, Snapshot), SnapshotError> {
    let p = || path.to_path_buf();
    let len = bytes.len() as u64;
    let truncated = |what| SnapshotError::Truncated {
        path: p(),
        len,
        what,
    };
    // A file shorter than the magic that still matches its start is a truncated snapshot;
    // anything else is not a snapshot at all.
    let magic_len = bytes.len().min(MAGIC.len());
    if bytes.get(..magic_len) != MAGIC.get(..magic_len) {
        return Err(SnapshotError::BadMagic { path: p() });
    }
    let word = |at: usize, what| -> Result<u32, SnapshotError> {
        let b = bytes.get(at..at + 4).ok_or_else(|| truncated(what))?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if bytes.len() < MAGIC.len() {
        return Err(truncated("the magic"));
    }
    let version = word(8, "the format version")?;
    if version != FORMAT_VERSION {
        return Err(SnapshotError::VersionMismatch {
            path: p(),
            found: version,
            expected: FORMAT_VERSION,
            vmm: VMM_VERSION,
        });
    }
    let header_len = word(12, "the header length")?;
    if header_len > MAX_HEADER_LEN {
        return Err(SnapshotError::TooLarge {
            path: p(),
            what: "the header",
            len: u64::from(header_len),
            max: u64::from(MAX_HEADER_LEN),
        });
    }
    let header_end = PREFIX_LEN + header_len as usize;
    let header_bytes = bytes
        .get(PREFIX_LEN..header_end)
        .ok_or_else(|| truncated("the header"))?;
    let body_len_bytes = bytes
        .get(header_end..header_end + 8)
        .ok_or_else(|| truncated("the body length"))?;
    let mut b8 = [0u8; 8];
    b8.copy_from_slice(body_len_bytes);
    let body_len = u64::from_le_bytes(b8);
    if body_len > MAX_BODY_LEN {
        return Err(SnapshotError::TooLarge {
            path: p(),
            what: "the body",
            len: body_len,
            max: MAX_BODY_LEN,
        });
    }
    let body_start = header_end + 8;
    let body_end = body_start + body_len as usize;
    let body = bytes
        .get(body_start..body_end)
        .ok_or_else(|| truncated("the body"))?;
    let sum = bytes
        .get(body_end..body_end + CHECKSUM_LEN)
        .ok_or_else(|| truncated("the checksum"))?;
    if bytes.len() != body_end + CHECKSUM_LEN {
        return Err(SnapshotError::Decode {
            path: p(),
            msg: format!(
                "{} unexpected bytes after the checksum",
                bytes.len() - body_end - CHECKSUM_LEN
            ),
        });
    }
    let covered = bytes.get(..body_end).ok_or_else(|| truncated("the body"))?;
    if Sha256::digest(covered).as_slice() != sum {
        return Err(SnapshotError::Checksum { path: p() });
    }
    let dec = |what: &str, e: serde_json::Error| SnapshotError::Decode {
        path: p(),
        msg: format!("{what}: {e}"),
    };
    let header: Header = serde_json::from_slice(header_bytes).map_err(|e| dec("header", e))?;
    let snapshot: Snapshot = serde_json::from_slice(body).map_err(|e| dec("body", e))?;
    if header.kind != snapshot.kind {
        return Err(SnapshotError::Decode {
            path: p(),
            msg: "the header and the body disagree on the snapshot kind".into(),
        });
    }
    snapshot.memory.validate()?;
    if (snapshot.kind == SnapshotKind::Diff) != snapshot.memory.dirty.is_some() {
        return Err(SnapshotError::Invalid(
            "snapshot: a diff snapshot needs a dirty page bitmap (and a full one none)".into(),
        ));
    }
    Ok((header, snapshot))
}

/// Writes a state file (to a temporary name first, renamed into place).
pub fn write_state(path: &Path, snapshot: &Snapshot) -> Result<(), SnapshotError> {
    let bytes = encode(snapshot)?;
    let werr = |source| SnapshotError::Write {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp-kindling");
    let mut f = File::create(&tmp).map_err(werr)?;
    f.write_all(&bytes).map_err(werr)?;
    f.sync_all().map_err(werr)?;
    std::fs::rename(&tmp, path).map_err(werr)
}

/// Reads and checks a state file.
pub fn read_state(path: &Path) -> Result<(Header, Snapshot), SnapshotError> {
    let rerr = |source| SnapshotError::Read {
        path: path.to_path_buf(),
        source,
    };
    let f = File::open(path).map_err(rerr)?;
    let len = f.metadata().map_err(rerr)?.len();
    let max =
        PREFIX_LEN as u64 + u64::from(MAX_HEADER_LEN) + 8 + MAX_BODY_LEN + CHECKSUM_LEN as u64;
    if len > max {
        return Err(SnapshotError::TooLarge {
            path: path.to_path_buf(),
            what: "the file",
            len,
            max,
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(max).read_to_end(&mut bytes).map_err(rerr)?;
    decode(path, &bytes)
}

#[cfg(test)]
mod tests;
