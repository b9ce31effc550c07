//! The sparse in-memory backend.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::{
    Capabilities, Extent, SharedBytes, Storage, ZeroFlags, check_range, clamp_status_range, errno_error, push_extent,
};

/// log2 of [`MemoryStorage::PAGE_SIZE`].
const PAGE_SHIFT: u32 = 15;
/// Page size as a `u64`.
const PAGE: u64 = 1 << PAGE_SHIFT;
/// log2 of the number of shards.
const SHARD_BITS: u32 = 6;
/// Number of shards: comfortably more than the number of requests in flight
/// on typical hosts, so two requests rarely meet on one shard lock.
const SHARDS: usize = 1 << SHARD_BITS;
/// Work budget of one `block_status` call, in shard-lock acquisitions
/// (probing one page costs 1, finding the end of a hole costs `SHARDS`).
const STATUS_BUDGET: u32 = 1 << 16;

/// One allocated page and its lock.
type Page = RwLock<PageBuf>;

/// The bytes of a page, always exactly `PAGE_SIZE` long: reference counted
/// so that a READ reply can send them without copying
/// ([`Storage::read_shared`]). A write to a page a reply still holds copies
/// it first. Whether the page was ever lent is kept beside the pointer, in
/// the cache line the lock is in, so that writes to pages never lent do
/// not touch the reference count's (a cache miss per random write).
struct PageBuf {
    bytes: Arc<[u8]>,
    /// The page was lent since it was last known to be the only
    /// reference. Set under the page's read lock, cleared under its write
    /// lock.
    lent: AtomicBool,
}

impl PageBuf {
    fn new(bytes: Arc<[u8]>) -> PageBuf {
        PageBuf {
            bytes,
            lent: AtomicBool::new(false),
        }
    }

    /// A reference to the bytes for a reply.
    fn lend(&self) -> Arc<[u8]> {
        self.lent.store(true, Ordering::Relaxed);
        Arc::clone(&self.bytes)
    }

    /// The bytes to write, copied first if a reply still holds them.
    fn bytes_mut(&mut self) -> &mut [u8] {
        let lent = self.lent.get_mut();
        if *lent {
            *lent = false;
            return Arc::make_mut(&mut self.bytes);
        }
        // SAFETY: a page never lent has no other reference: references
        // are only made by `lend`, which sets `lent` first, under the
        // page's read lock, which excludes `&mut self` (the write lock or
        // the map's exclusive lock); and none is ever weak.
        unsafe { &mut *Arc::as_ptr(&self.bytes).cast_mut() }
    }
}

impl std::ops::Deref for PageBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

/// One shard of the page directory, padded to its own cache lines so that
/// locking one shard does not slow down its neighbours.
#[repr(align(128))]
struct Shard {
    pages: RwLock<BTreeMap<u64, Page>>,
}

/// A sparse, volatile, in-memory export, like nbdkit's `memory` plugin.
///
/// # Layout
///
/// The export is divided into pages of [`PAGE_SIZE`](Self::PAGE_SIZE)
/// bytes. A page is allocated the first time non-zero data is written to it;
/// pages never written read as zeroes, are reported as `HOLE | ZERO` by
/// [`Storage::block_status`] and cost no memory, so exports of up to 2^64
/// bytes can be created instantly. TRIM and WRITE_ZEROES free every page
/// they cover entirely and zero partly covered pages, which are freed too
/// if they end up all zero; writing an all-zero buffer frees a page in the
/// same way. [`allocated_bytes`](Self::allocated_bytes) tells how much page
/// memory is held.
///
/// # Concurrency
///
/// Pages are kept in 64 ordered maps ("shards") chosen by a hash of the page
/// index, each behind its own `RwLock`, and each page has its own `RwLock`.
/// Reading or overwriting an allocated page takes its shard's lock shared
/// and the page's lock shared (read) or exclusive (write), so requests on
/// different pages proceed in parallel and requests on one shard only
/// serialise while a page is being allocated or freed. Reading a hole takes
/// no exclusive lock at all. The ordered maps let `block_status` find the
/// end of a hole with one range query per shard instead of probing every
/// page, and let TRIM over a huge range visit only the allocated pages.
///
/// FLUSH and FUA are no-ops; CACHE does nothing; several connections can
/// share the export (`can_multi_conn`).
pub struct MemoryStorage {
    size: u64,
    read_only: bool,
    shards: Box<[Shard]>,
    allocated_pages: AtomicU64,
}

impl MemoryStorage {
    /// Size of a page in bytes: 32 KiB.
    ///
    /// The trade-offs: a write into a hole allocates and zeroes a whole
    /// page, so smaller pages make first writes cheaper (a 4 KiB random
    /// write into fresh memory costs a 32 KiB allocation rather than 64
    /// KiB) and let TRIM/WRITE_ZEROES release memory at a finer grain,
    /// while larger pages reduce bookkeeping. At 32 KiB the per-page
    /// overhead (map slot, lock, boxed-slice header: well under 100 bytes)
    /// is below 0.3 % of the data, and `block_status` over a fully
    /// allocated gigabyte needs 32768 probes, which is still fast. It is
    /// also the page size of nbdkit's sparse allocator, so memory use and
    /// block-status granularity are directly comparable with nbdkit's
    /// `memory` plugin.
    pub const PAGE_SIZE: usize = 1 << PAGE_SHIFT;

    /// A writable export of `size` bytes, all zero and unallocated.
    pub fn new(size: u64) -> MemoryStorage {
        MemoryStorage::with_options(size, false)
    }

    /// An export of `size` bytes, all zero and unallocated; with
    /// `read_only` it refuses every modification with `EPERM`.
    pub fn with_options(size: u64, read_only: bool) -> MemoryStorage {
        let shards = (0..SHARDS)
            .map(|_| Shard {
                pages: RwLock::new(BTreeMap::new()),
            })
            .collect();
        MemoryStorage {
            size,
            read_only,
            shards,
            allocated_pages: AtomicU64::new(0),
        }
    }

    /// Bytes of page memory currently allocated (a multiple of
    /// [`PAGE_SIZE`](Self::PAGE_SIZE)).
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated_pages.load(Ordering::Relaxed).saturating_mul(PAGE)
    }

    fn shard(&self, index: u64) -> &RwLock<BTreeMap<u64, Page>> {
        // Fibonacci hashing spreads strided access patterns over the shards.
        let h = (index.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SHARD_BITS)) as usize;
        &self.shards[h % SHARDS].pages
    }

    fn check_writable(&self, offset: u64, length: u64) -> io::Result<()> {
        if self.read_only {
            return Err(errno_error(libc::EPERM));
        }
        check_range(self.size, offset, length)
    }

    /// Writes `data` at `start` within page `index`; the caller guarantees
    /// `start + data.len() <= PAGE_SIZE`.
    fn write_page(&self, index: u64, start: usize, data: &[u8]) -> io::Result<()> {
        let shard = self.shard(index);
        let zero = is_zero(data);
        {
            let map = read(shard);
            match map.get(&index) {
                Some(page) => {
                    let mut page = write(page);
                    page.bytes_mut()[start..start + data.len()].copy_from_slice(data);
                    if !(zero && is_zero(&page)) {
                        return Ok(());
                    }
                }
                // Zeroes into a hole: nothing to do.
                None if zero => return Ok(()),
                None => {}
            }
        }
        if zero {
            // The page became entirely zero: give it back.
            self.zero_partial(index, 0, 0, false);
            return Ok(());
        }
        // Allocate outside the lock to keep the exclusive section short.
        let fresh = new_page();
        let mut map = write(shard);
        let page = match map.entry(index) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                self.allocated_pages.fetch_add(1, Ordering::Relaxed);
                entry.insert(RwLock::new(PageBuf::new(fresh)))
            }
        };
        let page = page.get_mut().unwrap_or_else(PoisonError::into_inner).bytes_mut();
        if let Some(dst) = page.get_mut(start..start + data.len()) {
            dst.copy_from_slice(data);
        }
        Ok(())
    }

    /// Zeroes `len` bytes at `start` within page `index` if it is allocated,
    /// then frees it if it is entirely zero, unless `keep`.
    fn zero_partial(&self, index: u64, start: usize, len: usize, keep: bool) {
        let mut map = write(self.shard(index));
        let Some(page) = map.get_mut(&index) else { return };
        let page = page.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Some(range) = page.bytes_mut().get_mut(start..start + len) {
            range.fill(0);
        }
        if !keep && is_zero(page) {
            map.remove(&index);
            self.allocated_pages.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Frees (or with `keep`, zeroes in place) every allocated page with an
    /// index in `first..last`.
    fn zero_pages(&self, first: u64, last: u64, keep: bool) {
        if first >= last {
            return;
        }
        for shard in self.shards.iter() {
            if keep {
                for page in read(&shard.pages).range(first..last).map(|(_, page)| page) {
                    write(page).bytes_mut().fill(0);
                }
            } else {
                let mut map = write(&shard.pages);
                while let Some(index) = map.range(first..last).next().map(|(&index, _)| index) {
                    map.remove(&index);
                    self.allocated_pages.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Zeroes `offset..offset + length` (already validated); see
    /// [`zero_partial`](Self::zero_partial) for `keep`.
    fn zero_range(&self, offset: u64, length: u64, keep: bool) {
        let end = offset + length;
        let mut pos = offset;
        let head = (pos % PAGE) as usize;
        if head != 0 && pos < end {
            let n = (PAGE - head as u64).min(end - pos);
            self.zero_partial(pos >> PAGE_SHIFT, head, n as usize, keep);
            pos += n;
        }
        if pos < end {
            let (first, last) = (pos >> PAGE_SHIFT, end >> PAGE_SHIFT);
            self.zero_pages(first, last, keep);
            pos = pos.max(last << PAGE_SHIFT);
        }
        if pos < end {
            self.zero_partial(pos >> PAGE_SHIFT, 0, (end - pos) as usize, keep);
        }
    }

    fn is_allocated(&self, index: u64) -> bool {
        read(self.shard(index)).contains_key(&index)
    }

    /// The smallest allocated page index in `from..=last`, if any.
    fn next_allocated(&self, from: u64, last: u64) -> Option<u64> {
        if from > last {
            return None;
        }
        self.shards
            .iter()
            .filter_map(|shard| read(&shard.pages).range(from..=last).next().map(|(&i, _)| i))
            .min()
    }
}

impl fmt::Debug for MemoryStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStorage")
            .field("size", &self.size)
            .field("read_only", &self.read_only)
            .field("allocated_bytes", &self.allocated_bytes())
            .finish()
    }
}

impl Storage for MemoryStorage {
    fn never_blocks(&self) -> bool {
        // Pages in memory, short per-shard locks: never waits on I/O.
        true
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        let writable = !self.read_only;
        Capabilities {
            read_only: self.read_only,
            can_flush: writable,
            can_fua: writable,
            can_trim: writable,
            can_zero: writable,
            can_fast_zero: writable,
            can_cache: true,
            can_multi_conn: true,
            rotational: false,
            block_size: None,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        let mut pos = offset;
        for range in split_pages(buf.len(), offset) {
            let dst = &mut buf[range];
            let index = pos >> PAGE_SHIFT;
            let start = (pos % PAGE) as usize;
            let map = read(self.shard(index));
            match map
                .get(&index)
                .map(read)
                .as_deref()
                .and_then(|page| page.get(start..start + dst.len()))
            {
                Some(src) => dst.copy_from_slice(src),
                None => dst.fill(0),
            }
            pos += dst.len() as u64;
        }
        Ok(())
    }

    /// Lends the pages (holes as zero pieces): nothing is copied.
    fn read_shared(&self, offset: u64, len: usize, out: &mut Vec<SharedBytes>) -> io::Result<bool> {
        check_range(self.size, offset, len as u64)?;
        let mut pos = offset;
        for range in split_pages(len, offset) {
            let n = range.len();
            let index = pos >> PAGE_SHIFT;
            let start = (pos % PAGE) as usize;
            let page = read(self.shard(index)).get(&index).map(|page| read(page).lend());
            match page {
                Some(page) => out.push(SharedBytes::new(page, start..start + n)),
                None => SharedBytes::push_zeroes(out, n),
            }
            pos += n as u64;
        }
        Ok(true)
    }

    fn write_at(&self, buf: &[u8], offset: u64, _fua: bool) -> io::Result<()> {
        self.check_writable(offset, buf.len() as u64)?;
        let mut pos = offset;
        for range in split_pages(buf.len(), offset) {
            let src = &buf[range];
            self.write_page(pos >> PAGE_SHIFT, (pos % PAGE) as usize, src)?;
            pos += src.len() as u64;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    /// Frees the pages the range covers entirely and zeroes the rest.
    fn trim(&self, offset: u64, length: u64, _fua: bool) -> io::Result<()> {
        self.check_writable(offset, length)?;
        self.zero_range(offset, length, false);
        Ok(())
    }

    /// Without `no_hole`, like [`trim`](Storage::trim). With `no_hole`,
    /// allocated pages are zeroed in place and stay allocated, and holes
    /// stay holes: in memory there is no space to reserve, and allocating
    /// zero pages would let one request of up to 2^64 bytes exhaust memory.
    /// Always fast, so `fast` never fails.
    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> io::Result<()> {
        self.check_writable(offset, length)?;
        self.zero_range(offset, length, flags.no_hole);
        Ok(())
    }

    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        check_range(self.size, offset, length)
    }

    fn block_status(&self, offset: u64, length: u64, out: &mut Vec<Extent>) -> io::Result<()> {
        let length = clamp_status_range(self.size, offset, length)?;
        let end = offset + length;
        let last_index = (end - 1) >> PAGE_SHIFT;
        let first = out.len();
        let mut pos = offset;
        let mut budget = STATUS_BUDGET;
        while pos < end && budget > 0 {
            let index = pos >> PAGE_SHIFT;
            if self.is_allocated(index) {
                budget -= 1;
                let page_end = (index + 1).saturating_mul(PAGE).min(end);
                push_extent(out, first, Extent::data(page_end - pos));
                pos = page_end;
            } else {
                budget = budget.saturating_sub(SHARDS as u32);
                let hole_end = match self.next_allocated(index + 1, last_index) {
                    Some(next) => next.saturating_mul(PAGE).min(end),
                    None => end,
                };
                push_extent(out, first, Extent::hole(hole_end - pos));
                pos = hole_end;
            }
        }
        Ok(())
    }
}

/// Splits a buffer of `len` bytes destined for `offset` into ranges that
/// each stay within one page.
fn split_pages(len: usize, offset: u64) -> impl Iterator<Item = std::ops::Range<usize>> {
    let mut done = 0usize;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let in_page = ((offset.wrapping_add(done as u64)) % PAGE) as usize;
        let n = (MemoryStorage::PAGE_SIZE - in_page).min(len - done);
        let range = done..done + n;
        done += n;
        Some(range)
    })
}

/// A zeroed page (zeroed by the allocator: fresh memory from the system
/// is not written twice).
fn new_page() -> Arc<[u8]> {
    let page = Arc::<[u8]>::new_zeroed_slice(MemoryStorage::PAGE_SIZE);
    // SAFETY: all-zero bytes are valid `u8`s.
    unsafe { page.assume_init() }
}

/// Whether `buf` is all zero; vectorises well (servers use it to send
/// the zero blocks of a READ as holes).
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(128);
    for chunk in &mut chunks {
        if chunk.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 1000]));
        for i in [0, 127, 128, 999] {
            let mut buf = [0u8; 1000];
            buf[i] = 1;
            assert!(!is_zero(&buf), "{i}");
        }
    }

    #[test]
    fn page_split() {
        let p = MemoryStorage::PAGE_SIZE;
        let v: Vec<_> = split_pages(2 * p, 10).collect();
        assert_eq!(v, vec![0..p - 10, p - 10..2 * p - 10, 2 * p - 10..2 * p]);
        assert_eq!(split_pages(0, 5).count(), 0);
        assert_eq!(split_pages(p, 0).collect::<Vec<_>>(), vec![0..p]);
    }

    #[test]
    fn lent_pieces_are_the_bytes_and_keep_them() {
        let p = MemoryStorage::PAGE_SIZE;
        let m = MemoryStorage::new(8 * p as u64);
        let data: Vec<u8> = (0..3 * p).map(|i| (i % 251) as u8 + 1).collect();
        m.write_at(&data[..p], p as u64 / 2, false).unwrap();
        m.write_at(&data[p..2 * p], 4 * p as u64, false).unwrap();
        // A read over data, a hole and data again, not page aligned.
        let (offset, len) = (p as u64 / 4, 5 * p);
        let mut expected = vec![0u8; len];
        m.read_at(&mut expected, offset).unwrap();
        let mut pieces = Vec::new();
        assert!(m.read_shared(offset, len, &mut pieces).unwrap());
        let lent: Vec<u8> = pieces.iter().flat_map(|piece| piece.iter().copied()).collect();
        assert_eq!(lent, expected);
        // Writes and a trim after the read leave the lent bytes alone ...
        m.write_at(&vec![0xEE; 3 * p], offset, false).unwrap();
        m.trim(4 * p as u64, p as u64, false).unwrap();
        let after: Vec<u8> = pieces.iter().flat_map(|piece| piece.iter().copied()).collect();
        assert_eq!(after, expected);
        // ... and reach the storage.
        let mut now = vec![0u8; 3 * p];
        m.read_at(&mut now, offset).unwrap();
        assert!(now.iter().all(|&b| b == 0xEE));
        // Out of range: an error, as for read_at.
        assert!(m.read_shared(8 * p as u64 - 1, 2, &mut Vec::new()).is_err());
    }

    #[test]
    fn shards_are_spread() {
        let m = MemoryStorage::new(1 << 40);
        let mut seen = std::collections::HashSet::new();
        for i in 0..SHARDS as u64 * 4 {
            seen.insert(m.shard(i) as *const _ as usize);
        }
        assert!(seen.len() > SHARDS / 2);
    }
}
