//! The guest memory file: writing it (all pages, or only dirty ones), mapping it for a
//! restore (`MAP_PRIVATE`, so pages load lazily and the file is never written), and merging a
//! diff onto its base.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestMemoryBackend, GuestMemoryRegion};

use super::{read_state, MemoryLayout, MemoryRegionState, SnapshotError, SnapshotKind};
use crate::memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

pub const PAGE_SIZE: u64 = 4096;
/// Pages are copied through a buffer this large.
const CHUNK: u64 = 1 << 20;

/// The memory file layout of `mem`: its regions back to back.
pub fn layout_of(mem: &GuestMemoryMmap, dirty: Option<Vec<Vec<u64>>>) -> MemoryLayout {
    let mut offset = 0;
    let regions = mem
        .iter()
        .map(|r| {
            let s = MemoryRegionState {
                guest_addr: r.start_addr().0,
                size: r.len(),
                file_offset: offset,
            };
            offset += r.len();
            s
        })
        .collect();
    MemoryLayout {
        page_size: PAGE_SIZE,
        regions,
        dirty,
    }
}

fn werr(path: &Path) -> impl Fn(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Write {
        path: path.to_path_buf(),
        source,
    }
}

fn is_set(bitmap: &[u64], page: u64) -> bool {
    bitmap
        .get((page / 64) as usize)
        .is_some_and(|w| w & (1 << (page % 64)) != 0)
}

/// Writes guest memory to `path` as laid out in `layout`: every non-zero page when
/// `layout.dirty` is `None` (zero pages stay holes), else only the dirty pages. The file is
/// created (or truncated) at the full size, so its size always identifies the layout.
///
/// A full snapshot of anonymous memory reads only the pages this process has mapped
/// ([`super::prefetch::mapped_pages`]): the rest are zero, and reading them would map the
/// shared zero page into every untouched guest page (work for nothing, and the guest's first
/// write to each such page would then have to replace a mapping the VMM made).
pub fn write_memory(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    path: &Path,
) -> Result<(), SnapshotError> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(werr(path))?;
    file.set_len(layout.total_size()).map_err(werr(path))?;
    let mut buf = vec![0u8; CHUNK as usize];
    let mapped = match layout.dirty {
        None => super::prefetch::mapped_pages(mem),
        Some(_) => Vec::new(),
    };
    for (i, r) in layout.regions.iter().enumerate() {
        let dirty = layout.dirty.as_ref().and_then(|d| d.get(i));
        // The pages to read: the dirty ones (diff), the mapped ones (full, anonymous memory),
        // or all of them.
        let wanted = dirty.or(mapped.get(i).and_then(Option::as_ref));
        let mut off = 0;
        while off < r.size {
            let n = CHUNK.min(r.size - off);
            let first_page = off / PAGE_SIZE;
            let pages = first_page..first_page + n / PAGE_SIZE;
            off += n;
            let chunk = &mut buf[..n as usize];
            match wanted {
                None => read_guest(mem, chunk, r.guest_addr + first_page * PAGE_SIZE)?,
                // A chunk without wanted pages is skipped without reading guest memory.
                Some(w) if !pages.clone().any(|p| is_set(w, p)) => continue,
                // Page by page: a page that is not wanted is never read.
                Some(w) => {
                    for (p, page) in pages.clone().zip(chunk.chunks_mut(PAGE_SIZE as usize)) {
                        if is_set(w, p) {
                            read_guest(mem, page, r.guest_addr + p * PAGE_SIZE)?;
                        } else {
                            page.fill(0);
                        }
                    }
                }
            }
            for (p, page) in pages.zip(chunk.chunks(PAGE_SIZE as usize)) {
                let keep = match dirty {
                    Some(d) => is_set(d, p),
                    None => page.iter().any(|b| *b != 0),
                };
                if keep {
                    file.write_all_at(page, r.file_offset + p * PAGE_SIZE)
                        .map_err(werr(path))?;
                }
            }
        }
    }
    file.sync_all().map_err(werr(path))
}

fn read_guest(mem: &GuestMemoryMmap, buf: &mut [u8], addr: u64) -> Result<(), SnapshotError> {
    mem.read_slice(buf, GuestAddress(addr))
        .map_err(|e| SnapshotError::Invalid(format!("reading guest memory: {e}")))
}

/// Opens the memory file and checks its size against the layout.
fn open_checked(path: &Path, layout: &MemoryLayout) -> Result<File, SnapshotError> {
    let file = File::open(path).map_err(|source| SnapshotError::MemoryMissing {
        path: path.to_path_buf(),
        source,
    })?;
    let found = file
        .metadata()
        .map_err(|source| SnapshotError::MemoryMissing {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let expected = layout.total_size();
    if found != expected {
        return Err(SnapshotError::MemorySize {
            path: path.to_path_buf(),
            found,
            expected,
        });
    }
    Ok(file)
}

/// Guest memory mapped `MAP_PRIVATE` from the memory file: pages are read from the file on
/// first touch, and the guest's writes stay in this process.
pub fn map_memory(path: &Path, layout: &MemoryLayout) -> Result<GuestMemoryMmap, SnapshotError> {
    let file = Arc::new(open_checked(path, layout)?);
    let map_err = |msg: String| SnapshotError::MemoryMap {
        path: path.to_path_buf(),
        msg,
    };
    let mut regions = Vec::with_capacity(layout.regions.len());
    for r in &layout.regions {
        let size = usize::try_from(r.size).map_err(|e| map_err(e.to_string()))?;
        let mapping = MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
            .with_file_offset(FileOffset::from_arc(file.clone(), r.file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| map_err(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr))
            .ok_or_else(|| map_err(format!("region at {:#x} overflows", r.guest_addr)))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| map_err(e.to_string()))
}

/// Copies the pages of the diff snapshot (`diff_mem`, described by `diff_state`) onto the
/// memory file of its base (`base_mem`), in place. The base plus the merged pages then
/// restore (with `diff_state`) to the guest state at the diff snapshot. Returns the number of
/// pages copied.
pub fn merge(base_mem: &Path, diff_mem: &Path, diff_state: &Path) -> Result<u64, SnapshotError> {
    let (_, snap) = read_state(diff_state)?;
    if snap.kind != SnapshotKind::Diff {
        return Err(SnapshotError::Invalid(format!(
            "{} is a full snapshot, not a diff: there is nothing to merge",
            diff_state.display()
        )));
    }
    let layout = &snap.memory;
    let dirty = layout.dirty.as_ref().ok_or_else(|| {
        SnapshotError::Invalid("the diff snapshot has no dirty page bitmap".into())
    })?;
    let diff = open_checked(diff_mem, layout)?;
    // The base must have the same layout.
    drop(open_checked(base_mem, layout)?);
    let base = OpenOptions::new()
        .write(true)
        .open(base_mem)
        .map_err(werr(base_mem))?;
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut copied = 0;
    for (r, bitmap) in layout.regions.iter().zip(dirty) {
        for p in 0..r.size / PAGE_SIZE {
            if !is_set(bitmap, p) {
                continue;
            }
            let at = r.file_offset + p * PAGE_SIZE;
            diff.read_exact_at(&mut page, at)
                .map_err(|source| SnapshotError::Read {
                    path: diff_mem.to_path_buf(),
                    source,
                })?;
            base.write_all_at(&page, at).map_err(werr(base_mem))?;
            copied += 1;
        }
    }
    base.sync_all().map_err(werr(base_mem))?;
    Ok(copied)
}

/// The VMM's own writes since the last reset, per region (vm-memory's dirty bitmap), as
/// bitmaps in the snapshot's word format; the bitmaps are reset.
pub fn take_vmm_dirty(mem: &GuestMemoryMmap) -> Vec<Vec<u64>> {
    mem.iter()
        .map(|r| {
            let mapping: &vm_memory::MmapRegion<AtomicBitmap> = r;
            let bitmap = mapping.bitmap();
            let pages = r.len() / PAGE_SIZE;
            let mut words = vec![0u64; pages.div_ceil(64) as usize];
            for p in 0..pages {
                if bitmap.is_bit_set(p as usize) {
                    words[(p / 64) as usize] |= 1 << (p % 64);
                }
            }
            bitmap.reset();
            words
        })
        .collect()
}

/// Pages set in the bitmaps.
pub fn count_pages(bitmaps: &[Vec<u64>]) -> u64 {
    bitmaps
        .iter()
        .flatten()
        .map(|w| u64::from(w.count_ones()))
        .sum()
}
