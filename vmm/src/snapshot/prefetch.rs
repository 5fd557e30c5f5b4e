//! Working-set prefetch for restores (after REAP, ASPLOS'21).
//!
//! A restored VM maps guest memory `MAP_PRIVATE` from the snapshot's memory file, so every page
//! the guest touches after the restore costs a host page fault (a minor one when the file is in
//! the page cache, a major one when it is read from disk). Most restores of one snapshot touch
//! the same pages to answer their first request. So:
//! - [`record`] lists the guest pages present in this process's page tables, i.e. what the
//!   guest (and the VMM on its behalf) touched since the restore, and [`WorkingSet::write`]
//!   saves that list (control action `working_set`);
//! - [`prefetch`] (`kindling-vmm --restore .. --prefetch FILE`) populates those pages before the
//!   vCPUs start, so the guest finds them mapped.
//!
//! # Why `/proc/self/pagemap`, not `mincore`
//! For a file mapping, `mincore(2)` reports whether a page is in the *page cache*, not whether
//! this process touched it: after one restore (or after writing the snapshot), every page of the
//! memory file is cached and `mincore` reports all of them for every later restore. Pagemap's
//! present bit is per page table entry of this mapping, so it is what this process touched. Its
//! "file page" bit (61) also tells the two kinds apart: a page the guest only read is the page
//! cache's page (bit set), a page it wrote was copied on write into an anonymous page (bit
//! clear). Kernel fault-around maps up to 16 neighbouring cached pages on a read fault, so the
//! read set can be slightly larger than what the guest read; prefetching those is harmless.
//!
//! # Populating
//! Written pages get `MADV_POPULATE_WRITE` (the copy-on-write happens now, not on the guest's
//! first write), read pages `MADV_POPULATE_READ` (Linux 5.14+), after `MADV_WILLNEED` over all
//! of them so that a cold page cache is read ahead in bulk. Where the kernel lacks the populate
//! advice (`EINVAL`), each page is touched instead (read, or read and written back unchanged).
//! It runs on the main thread before the vCPUs start: the restore's "VMM start -> vCPUs
//! running" includes it, and the guest never races it.
//!
//! # File format
//! JSON: `{"version": 1, "page_size": 4096, "memory_size": BYTES, "read": [[first, count], ..],
//! "written": [[first, count], ..]}`, page runs in memory-file page numbers (the memory file
//! holds the guest RAM regions back to back), sorted, not overlapping.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::memory::GuestMemoryMmap;

/// The working-set file format this VMM writes and reads.
pub const WORKING_SET_VERSION: u32 = 1;
const PAGE_SIZE: u64 = 4096;
/// A working-set file larger than this is refused before it is read.
const MAX_FILE_LEN: u64 = 64 << 20;
/// Pagemap entries read per `pread`.
const PAGEMAP_BATCH: u64 = 16 * 1024;
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;

#[derive(Debug, thiserror::Error)]
pub enum PrefetchError {
    #[error("reading /proc/self/pagemap: {0}")]
    Pagemap(std::io::Error),
    #[error("cannot read the working-set file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the working-set file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("working-set file {path} is invalid: {msg}")]
    Invalid { path: PathBuf, msg: String },
    #[error(
        "working-set file {path} is for {found} bytes of guest memory, this VM has {expected}"
    )]
    SizeMismatch {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("guest memory region at {0:#x} has no host mapping")]
    Unmapped(u64),
}

/// Guest pages touched since the mapping was made, in memory-file page numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkingSet {
    pub version: u32,
    pub page_size: u64,
    /// Total guest memory (the memory file's size).
    pub memory_size: u64,
    /// Runs `[first page, page count]` the guest only read (mapped from the file).
    pub read: Vec<[u64; 2]>,
    /// Runs the guest (or the VMM) wrote (private copies).
    pub written: Vec<[u64; 2]>,
}

fn pages_in(runs: &[[u64; 2]]) -> u64 {
    runs.iter().map(|r| r[1]).sum()
}

impl WorkingSet {
    pub fn read_pages(&self) -> u64 {
        pages_in(&self.read)
    }

    pub fn written_pages(&self) -> u64 {
        pages_in(&self.written)
    }

    /// Writes the file (to a temporary name, renamed into place).
    pub fn write(&self, path: &Path) -> Result<(), PrefetchError> {
        let werr = |source| PrefetchError::Write {
            path: path.to_path_buf(),
            source,
        };
        let bytes = serde_json::to_vec(self).map_err(|e| werr(std::io::Error::other(e)))?;
        let tmp = path.with_extension("tmp-kindling");
        std::fs::write(&tmp, bytes).map_err(werr)?;
        std::fs::rename(&tmp, path).map_err(werr)
    }

    /// Reads and checks a file.
    pub fn read(path: &Path) -> Result<WorkingSet, PrefetchError> {
        let rerr = |source| PrefetchError::Read {
            path: path.to_path_buf(),
            source,
        };
        let invalid = |msg: String| PrefetchError::Invalid {
            path: path.to_path_buf(),
            msg,
        };
        let len = std::fs::metadata(path).map_err(rerr)?.len();
        if len > MAX_FILE_LEN {
            return Err(invalid(format!(
                "{len} bytes, more than the limit of {MAX_FILE_LEN}"
            )));
        }
        let bytes = std::fs::read(path).map_err(rerr)?;
        let ws: WorkingSet = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
        ws.validate().map_err(invalid)?;
        Ok(ws)
    }

    /// Checks the version, the page size and that the runs are sorted, disjoint and inside
    /// the memory (the file comes from outside).
    fn validate(&self) -> Result<(), String> {
        if self.version != WORKING_SET_VERSION {
            return Err(format!(
                "format version {}, this kindling-vmm reads {WORKING_SET_VERSION}",
                self.version
            ));
        }
        if self.page_size != PAGE_SIZE {
            return Err(format!(
                "page size {} ({PAGE_SIZE} expected)",
                self.page_size
            ));
        }
        let pages = self.memory_size / PAGE_SIZE;
        let mut all: Vec<[u64; 2]> = self.read.iter().chain(&self.written).copied().collect();
        all.sort_unstable();
        let mut end = 0u64;
        for [first, count] in all {
            let stop = first
                .checked_add(count)
                .filter(|s| count > 0 && *s <= pages)
                .ok_or_else(|| {
                    format!("run [{first}, {count}] is empty or outside {pages} pages")
                })?;
            if first < end {
                return Err(format!("run [{first}, {count}] overlaps another"));
            }
            end = stop;
        }
        Ok(())
    }
}

/// Appends page `p` to sorted runs.
fn push_page(runs: &mut Vec<[u64; 2]>, p: u64) {
    match runs.last_mut() {
        Some(last) if last[0] + last[1] == p => last[1] += 1,
        _ => runs.push([p, 1]),
    }
}

/// Per page of `len` bytes at `addr` (page aligned), its pagemap entry, batch by batch.
fn pagemap_entries(
    pagemap: &std::fs::File,
    addr: u64,
    len: u64,
    mut each: impl FnMut(u64, u64),
) -> Result<(), PrefetchError> {
    use std::os::unix::fs::FileExt;
    let pages = len / PAGE_SIZE;
    let mut buf = vec![0u8; (PAGEMAP_BATCH * 8) as usize];
    let mut done = 0;
    while done < pages {
        let n = PAGEMAP_BATCH.min(pages - done);
        let bytes = &mut buf[..(n * 8) as usize];
        let at = (addr / PAGE_SIZE + done) * 8;
        pagemap
            .read_exact_at(bytes, at)
            .map_err(PrefetchError::Pagemap)?;
        for (i, e) in bytes.chunks_exact(8).enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(e);
            each(done + i as u64, u64::from_le_bytes(w));
        }
        done += n;
    }
    Ok(())
}

/// Each guest region's host address, size and offset in the memory file (regions back to
/// back, as [`super::memory::layout_of`] lays them out).
fn regions(mem: &GuestMemoryMmap) -> Result<Vec<(u64, u64, u64)>, PrefetchError> {
    let mut offset = 0;
    let mut out = Vec::new();
    for r in mem.iter() {
        let host = r
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| PrefetchError::Unmapped(r.start_addr().0))?;
        out.push((host as u64, r.len(), offset));
        offset += r.len();
    }
    Ok(out)
}

/// The guest pages present in this process's page tables (see the module comment).
pub fn record(mem: &GuestMemoryMmap) -> Result<WorkingSet, PrefetchError> {
    let pagemap = std::fs::File::open("/proc/self/pagemap").map_err(PrefetchError::Pagemap)?;
    let mut ws = WorkingSet {
        version: WORKING_SET_VERSION,
        page_size: PAGE_SIZE,
        ..Default::default()
    };
    for (host, len, offset) in regions(mem)? {
        let first = offset / PAGE_SIZE;
        pagemap_entries(&pagemap, host, len, |i, e| {
            if e & (PM_PRESENT | PM_SWAPPED) == 0 {
                return;
            }
            if e & PM_FILE != 0 {
                push_page(&mut ws.read, first + i);
            } else {
                push_page(&mut ws.written, first + i);
            }
        })?;
        ws.memory_size = offset + len;
    }
    Ok(ws)
}

/// Per guest region, the pages that may hold data, as a bitmap (bit `p % 64` of word
/// `p / 64`): for anonymous memory, those present or swapped in this process's page tables;
/// the others were never touched (or were discarded) and read as zero. `None` for a region
/// that is a file mapping (a restored VM: untouched pages come from the file) or when pagemap
/// cannot be read: every page may hold data.
pub fn mapped_pages(mem: &GuestMemoryMmap) -> Vec<Option<Vec<u64>>> {
    let Ok(pagemap) = std::fs::File::open("/proc/self/pagemap") else {
        return vec![None; mem.num_regions()];
    };
    mem.iter()
        .map(|r| {
            if r.file_offset().is_some() {
                return None;
            }
            let host = r.get_host_address(MemoryRegionAddress(0)).ok()? as u64;
            let mut bits = vec![0u64; (r.len() / PAGE_SIZE).div_ceil(64) as usize];
            pagemap_entries(&pagemap, host, r.len(), |i, e| {
                if e & (PM_PRESENT | PM_SWAPPED) != 0 {
                    bits[(i / 64) as usize] |= 1 << (i % 64);
                }
            })
            .ok()?;
            Some(bits)
        })
        .collect()
}

/// Bytes of guest memory mapped in this process (pagemap present or swapped), or `None` when
/// pagemap cannot be read. Unlike `mincore`, this does not count page-cache pages of the
/// memory file that this process never touched.
pub fn resident_bytes(mem: &GuestMemoryMmap) -> Option<u64> {
    let pagemap = std::fs::File::open("/proc/self/pagemap").ok()?;
    let mut pages = 0;
    for (host, len, _) in regions(mem).ok()? {
        pagemap_entries(&pagemap, host, len, |_, e| {
            if e & (PM_PRESENT | PM_SWAPPED) != 0 {
                pages += 1;
            }
        })
        .ok()?;
    }
    Some(pages * PAGE_SIZE)
}

/// Minor and major page faults so far, of this thread or of the whole process.
pub fn page_faults(thread: bool) -> (u64, u64) {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    let who = if thread {
        libc::RUSAGE_THREAD
    } else {
        libc::RUSAGE_SELF
    };
    // SAFETY: getrusage only writes the struct we pass, which is large enough.
    let rc = unsafe { libc::getrusage(who, ru.as_mut_ptr()) };
    if rc != 0 {
        return (0, 0);
    }
    // SAFETY: getrusage returned 0, so it filled the (zero-initialised) struct.
    let ru = unsafe { ru.assume_init() };
    (ru.ru_minflt as u64, ru.ru_majflt as u64)
}

/// What [`prefetch`] did.
#[derive(Debug, Clone, Serialize)]
pub struct PrefetchReport {
    pub path: PathBuf,
    pub read_pages: u64,
    pub written_pages: u64,
    /// `populate` (MADV_POPULATE_READ/WRITE) or `touch` (older kernels).
    pub method: &'static str,
    pub took_us: u64,
    /// Faults the prefetch itself took (this thread, during it).
    pub minor_faults: u64,
    pub major_faults: u64,
}

fn madvise(addr: u64, len: u64, advice: libc::c_int) -> std::io::Result<()> {
    // SAFETY: callers pass a page-aligned range inside one of this process's guest memory
    // mappings, which live as long as the VM; these advices only fault pages in (or start
    // readahead), they never change the mapping's contents.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, advice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Faults each page of the range in by hand (kernels without MADV_POPULATE_*).
fn touch(addr: u64, len: u64, write: bool) {
    let mut p = addr;
    while p < addr + len {
        let ptr = p as *mut u8;
        // SAFETY: `ptr` is inside a live guest memory mapping (see `madvise`); the vCPUs have
        // not started, so nothing else writes the byte between the read and the write-back
        // of the same value.
        unsafe {
            let v = std::ptr::read_volatile(ptr);
            if write {
                std::ptr::write_volatile(ptr, v);
            }
        }
        p += PAGE_SIZE;
    }
}

/// Loads the working set in `path` into guest memory. Call before the vCPUs start.
pub fn prefetch(mem: &GuestMemoryMmap, path: &Path) -> Result<PrefetchReport, PrefetchError> {
    let t0 = Instant::now();
    let (min0, maj0) = page_faults(true);
    let ws = WorkingSet::read(path)?;
    let regions = regions(mem)?;
    let expected = regions.last().map_or(0, |(_, len, off)| off + len);
    if ws.memory_size != expected {
        return Err(PrefetchError::SizeMismatch {
            path: path.to_path_buf(),
            found: ws.memory_size,
            expected,
        });
    }
    // Host address ranges of each run, split at region boundaries.
    let host_ranges = |runs: &[[u64; 2]]| -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for &[first, count] in runs {
            let (start, end) = (first * PAGE_SIZE, (first + count) * PAGE_SIZE);
            for &(host, len, off) in &regions {
                let (s, e) = (start.max(off), end.min(off + len));
                if s < e {
                    out.push((host + (s - off), e - s));
                }
            }
        }
        out
    };
    let read = host_ranges(&ws.read);
    let written = host_ranges(&ws.written);
    // Readahead for everything first: with a cold page cache the reads go out in bulk.
    for &(addr, len) in read.iter().chain(&written) {
        if let Err(e) = madvise(addr, len, libc::MADV_WILLNEED) {
            tracing::debug!("MADV_WILLNEED: {e}");
            break;
        }
    }
    let mut method = "populate";
    for (ranges, advice, write) in [
        (&written, libc::MADV_POPULATE_WRITE, true),
        (&read, libc::MADV_POPULATE_READ, false),
    ] {
        for &(addr, len) in ranges {
            if method == "populate" {
                match madvise(addr, len, advice) {
                    Ok(()) => continue,
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        tracing::info!("MADV_POPULATE_* unsupported here: touching pages instead");
                        method = "touch";
                    }
                    // Anything else (EFAULT, ENOMEM, EINTR...) on one run: touch that run.
                    Err(e) => tracing::debug!("populate {addr:#x}+{len:#x}: {e}"),
                }
            }
            touch(addr, len, write);
        }
    }
    let (min1, maj1) = page_faults(true);
    let report = PrefetchReport {
        path: path.to_path_buf(),
        read_pages: ws.read_pages(),
        written_pages: ws.written_pages(),
        method,
        took_us: t0.elapsed().as_micros() as u64,
        minor_faults: min1.saturating_sub(min0),
        major_faults: maj1.saturating_sub(maj0),
    };
    tracing::info!(
        read = report.read_pages,
        written = report.written_pages,
        method,
        "working set prefetched in {:.1} ms",
        report.took_us as f64 / 1e3
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{Bytes, GuestAddress};

    #[test]
    fn records_written_pages_and_round_trips() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 12)]).unwrap();
        for p in [3u64, 4, 5, 9] {
            mem.write_obj(1u8, GuestAddress(p * PAGE_SIZE)).unwrap();
        }
        let ws = record(&mem).unwrap();
        assert_eq!(ws.memory_size, 64 << 12);
        assert_eq!(ws.written, vec![[3, 3], [9, 1]]);
        assert_eq!(resident_bytes(&mem), Some(4 * PAGE_SIZE));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ws.json");
        ws.write(&path).unwrap();
        assert_eq!(WorkingSet::read(&path).unwrap(), ws);
        // Loading it into another VM of the same size populates those pages.
        let other = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 12)]).unwrap();
        let r = prefetch(&other, &path).unwrap();
        assert_eq!((r.read_pages, r.written_pages), (0, 4));
        assert_eq!(resident_bytes(&other), Some(4 * PAGE_SIZE));
    }

    #[test]
    fn bad_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ws.json");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 12)]).unwrap();
        let ws = |read: Vec<[u64; 2]>, size: u64| WorkingSet {
            version: WORKING_SET_VERSION,
            page_size: PAGE_SIZE,
            memory_size: size,
            read,
            written: vec![[10, 2]],
        };
        for (bad, needle) in [
            (ws(vec![[60, 5]], 64 << 12), "outside"),
            (ws(vec![[11, 1]], 64 << 12), "overlaps"),
            (ws(vec![[0, 0]], 64 << 12), "empty"),
        ] {
            bad.write(&path).unwrap();
            let e = prefetch(&mem, &path).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        ws(vec![], 32 << 12).write(&path).unwrap();
        let e = prefetch(&mem, &path).unwrap_err();
        assert!(matches!(e, PrefetchError::SizeMismatch { .. }), "{e}");
        std::fs::write(&path, b"{").unwrap();
        assert!(matches!(
            prefetch(&mem, &path).unwrap_err(),
            PrefetchError::Invalid { .. }
        ));
        assert!(matches!(
            prefetch(&mem, &dir.path().join("none")).unwrap_err(),
            PrefetchError::Read { .. }
        ));
    }
}
