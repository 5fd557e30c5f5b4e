//! The VM configuration document `kindling-vmm` reads (JSON, from a file or stdin).
//! Config types only: the runtime objects built from them live elsewhere.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The whole microVM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Uncompressed ELF `vmlinux`.
    pub kernel: PathBuf,
    /// Optional initramfs (uncompressed cpio is fastest on an emulating host).
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line. The VMM appends its device announcements and, on an emulating
    /// host, the CPU feature switches that host needs (see `host`). Default: [`DEFAULT_CMDLINE`].
    #[serde(default)]
    pub cmdline: Option<String>,
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    #[serde(default = "default_mem")]
    pub mem_mib: u32,
    #[serde(default)]
    pub block: Vec<BlockDeviceConfig>,
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    #[serde(default)]
    pub serial: SerialConfig,
    /// Track dirty guest pages (KVM dirty log + the VMM's own writes) so that diff snapshots
    /// can be taken. Costs a write-protect fault on each page's first write per snapshot.
    #[serde(default)]
    pub track_dirty_pages: bool,
}

/// Firecracker's default command line, which its users know.
pub const DEFAULT_CMDLINE: &str =
    "reboot=k panic=1 nomodule 8250.nr_uarts=0 i8042.noaux i8042.nomux i8042.dumbkbd swiotlb=noforce";

fn default_vcpus() -> u8 {
    1
}

fn default_mem() -> u32 {
    128
}

/// A virtio-blk device on a raw file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BlockDeviceConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// Serial id the guest reads with VIRTIO_BLK_T_GET_ID (at most 20 bytes).
    #[serde(default)]
    pub serial: Option<String>,
    /// A chunked image read lazily from a chunk server; `path` is then its manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunked: Option<ChunkedImageConfig>,
}

/// Where a chunked image's chunks come from and where its writes go.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ChunkedImageConfig {
    /// The agent's chunk server (`kindling image chunk-server --socket`).
    pub socket: PathBuf,
    /// Copy-on-write file for the guest's writes (required unless `read_only`); emptied
    /// when the VM starts.
    #[serde(default)]
    pub overlay: Option<PathBuf>,
    /// Bound on fetched chunks kept in the VMM's memory.
    #[serde(default = "default_chunk_cache_mib")]
    pub cache_mib: u32,
}

fn default_chunk_cache_mib() -> u32 {
    64
}

/// A virtio-vsock device, exposed on the host as a Unix socket (Firecracker's hybrid vsock).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id (>= 3).
    pub guest_cid: u64,
    /// Host side: connect here and send `CONNECT <port>\n` to reach a guest listener; guest
    /// connections to port P arrive at a listener on `<uds_path>_P`.
    pub uds_path: PathBuf,
}

/// Where the 8250 serial console goes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SerialConfig {
    /// No serial device output (the device still exists so the kernel can probe it).
    #[default]
    None,
    Stdout,
    File(PathBuf),
}
