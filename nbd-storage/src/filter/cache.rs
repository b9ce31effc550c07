//! The `cache` filter: a local cache file in front of slower storage
//! (nbdkit's `cache` filter, with its parameters).
//!
//! The cache is an anonymous temporary file (sparse, the size of the
//! export, in `cachedir=` or `$TMPDIR`, else `/var/tmp`) in blocks of
//! `cache-min-block-size` (64 KiB by default), with two bitmaps: which
//! blocks the file holds, and which of them are dirty (written to the
//! cache and not yet to the storage below). A read of a block the cache
//! holds never reaches the storage below.
//!
//! - Writes go to the cache. With `cache=writeback` (the default) they
//!   reach the storage below only when the client flushes (or with FUA);
//!   with `cache=writethrough` they also go below at once; with
//!   `cache=unsafe` flushes are ignored and dirty blocks reach the storage
//!   below only when the cache evicts them.
//! - `cache-on-read=true` keeps what is read in the cache as well
//!   (`cache-on-read=/PATH`: while PATH exists); by default only writes
//!   and `NBD_CMD_CACHE` fill it.
//! - `cache-max-size=SIZE` bounds the cache: once it holds more than
//!   `cache-high-threshold` percent of SIZE (95 by default), the least
//!   recently used blocks are evicted (dirty ones written back first)
//!   until it holds less than `cache-low-threshold` percent (80).
//!
//! Each block changes state under a lock of its own (one of a fixed set
//! of stripes), so concurrent connections never lose each other's writes.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{FilterError, bad, parse_bool, parse_size, unknown_param};
use crate::{
    Capabilities, Extent, FileStorage, SparseReads, StatusExtent, Storage, ZeroFlags, check_range, clamp_status_range,
    errno_error, fast_zero_unsupported,
};

/// The cache's block size unless `cache-min-block-size` asks otherwise
/// (nbdkit's default).
pub const CACHE_BLOCK_SIZE: u64 = 64 * 1024;

/// Largest number of blocks a cache keeps bitmaps for (2^30: 64 TiB at
/// the default block size).
const MAX_BLOCKS: u64 = 1 << 30;

/// Locks that serialise the state changes of blocks (block number modulo
/// this).
const STRIPES: usize = 64;

/// When writes reach the storage below (`cache=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// `writeback`: on flush, on FUA, or on eviction.
    #[default]
    Writeback,
    /// `writethrough`: at once, as well as to the cache.
    Writethrough,
    /// `unsafe`: only on eviction; flushes are ignored.
    Unsafe,
}

/// Whether reads fill the cache (`cache-on-read=`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CacheOnRead {
    /// `false` (the default): only writes and `NBD_CMD_CACHE` fill it.
    #[default]
    Never,
    /// `true`: every block read from below is kept.
    Always,
    /// `/PATH`: as `true` while the file exists, as `false` otherwise.
    WhileExists(PathBuf),
}

/// The `cache` filter's settings, with nbdkit's parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheOptions {
    /// `cache=writeback|writethrough|unsafe`.
    pub mode: CacheMode,
    /// `cache-on-read=true|false|/PATH`.
    pub on_read: CacheOnRead,
    /// `cache-min-block-size=SIZE`: a power of two from 4096 to 64M.
    pub block_size: u64,
    /// `cache-max-size=SIZE` (none: the cache may grow to the export's size).
    pub max_size: Option<u64>,
    /// `cache-high-threshold=N`: percent of `max_size` above which blocks
    /// are evicted.
    pub high_threshold: u64,
    /// `cache-low-threshold=N`: percent of `max_size` eviction goes down to.
    pub low_threshold: u64,
    /// `cachedir=DIR`: where the cache file goes (none: `$TMPDIR`, else
    /// `/var/tmp`).
    pub dir: Option<PathBuf>,
}

impl Default for CacheOptions {
    fn default() -> CacheOptions {
        CacheOptions {
            mode: CacheMode::Writeback,
            on_read: CacheOnRead::Never,
            block_size: CACHE_BLOCK_SIZE,
            max_size: None,
            high_threshold: 95,
            low_threshold: 80,
            dir: None,
        }
    }
}

impl CacheOptions {
    /// The settings from nbdkit's parameters (and `cachedir=DIR`).
    pub fn from_params(params: &[(String, String)]) -> Result<CacheOptions, FilterError> {
        let mut o = CacheOptions::default();
        let percent = |k: &str, v: &str| {
            v.trim()
                .trim_end_matches('%')
                .parse::<u64>()
                .map_err(|_| bad("cache", k, format!("{v:?} is not an integer percentage")))
        };
        for (k, v) in params {
            match k.as_str() {
                "cache" => {
                    o.mode = match v.as_str() {
                        "writeback" => CacheMode::Writeback,
                        "writethrough" => CacheMode::Writethrough,
                        "unsafe" => CacheMode::Unsafe,
                        _ => {
                            return Err(bad(
                                "cache",
                                k,
                                format!("{v:?}: expected writeback, writethrough or unsafe"),
                            ));
                        }
                    }
                }
                "cache-on-read" => {
                    o.on_read = if v.starts_with('/') {
                        CacheOnRead::WhileExists(PathBuf::from(v))
                    } else {
                        match parse_bool("cache", k, v) {
                            Ok(true) => CacheOnRead::Always,
                            Ok(false) => CacheOnRead::Never,
                            Err(_) => {
                                return Err(bad(
                                    "cache",
                                    k,
                                    format!("{v:?}: expected true, false or an absolute path"),
                                ));
                            }
                        }
                    }
                }
                "cache-min-block-size" => {
                    let n = parse_size("cache", k, v)?;
                    if !n.is_power_of_two() || !(4096..=64 << 20).contains(&n) {
                        return Err(bad(
                            "cache",
                            k,
                            format!("{v:?}: must be a power of two from 4096 to 64M"),
                        ));
                    }
                    o.block_size = n;
                }
                "cache-max-size" => o.max_size = Some(parse_size("cache", k, v)?),
                "cache-high-threshold" => o.high_threshold = percent(k, v)?,
                "cache-low-threshold" => o.low_threshold = percent(k, v)?,
                "cachedir" => o.dir = Some(PathBuf::from(v)),
                _ => return Err(unknown_param("cache", k)),
            }
        }
        if o.low_threshold == 0 || o.low_threshold >= o.high_threshold {
            return Err(bad(
                "cache",
                "cache-low-threshold",
                format!(
                    "{} and high {}: must be 0 < low < high",
                    o.low_threshold, o.high_threshold
                ),
            ));
        }
        if let Some(max) = o.max_size
            && max < o.block_size
        {
            return Err(bad(
                "cache",
                "cache-max-size",
                format!("{max} is less than one block ({})", o.block_size),
            ));
        }
        Ok(o)
    }
}

/// A bitmap of blocks, one bit each, changed atomically.
struct Bits(Box<[AtomicU64]>);

impl Bits {
    fn new(blocks: u64) -> Bits {
        Bits((0..blocks.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }

    fn get(&self, b: u64) -> bool {
        self.0[(b / 64) as usize].load(Ordering::Acquire) & (1 << (b % 64)) != 0
    }

    fn set(&self, b: u64) {
        self.0[(b / 64) as usize].fetch_or(1 << (b % 64), Ordering::Release);
    }

    fn clear(&self, b: u64) {
        self.0[(b / 64) as usize].fetch_and(!(1 << (b % 64)), Ordering::Release);
    }

    /// The first set bit in `from..to`.
    fn first_set(&self, from: u64, to: u64) -> Option<u64> {
        let mut b = from;
        while b < to {
            let word = self.0[(b / 64) as usize].load(Ordering::Acquire) >> (b % 64);
            if word != 0 {
                let found = b + u64::from(word.trailing_zeros());
                return (found < to).then_some(found);
            }
            b = (b / 64 + 1) * 64;
        }
        None
    }
}

/// A cache in front of the storage below (nbdkit's `cache` filter): a
/// temporary, unlinked cache file in blocks of
/// [`CacheOptions::block_size`], with bitmaps of the blocks it holds and of
/// those not yet written below. Reads of held blocks never reach the
/// storage below; writes go to the cache, and below at once
/// ([`CacheMode::Writethrough`], or with FUA), on flush
/// ([`CacheMode::Writeback`]) or on eviction ([`CacheMode::Unsafe`]);
/// reads fill it as [`CacheOptions::on_read`] says; above
/// [`CacheOptions::max_size`] ✕ the high threshold, least recently used
/// blocks are evicted (dirty ones written back first) down to the low
/// threshold. Each block changes state under a lock of its own, so
/// concurrent connections never lose each other's writes.
pub struct Cache {
    inner: Arc<dyn Storage>,
    file: FileStorage,
    size: u64,
    block: u64,
    options: CacheOptions,
    /// The blocks the cache file holds.
    cached: Bits,
    /// The cached blocks not yet written below.
    dirty: Bits,
    /// Used since the eviction hand last passed (second chance).
    used: Bits,
    /// How many blocks `cached` holds.
    count: AtomicU64,
    stripes: Box<[Mutex<()>]>,
    /// The eviction hand; held by the one thread that evicts.
    hand: Mutex<u64>,
}

impl fmt::Debug for Cache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("size", &self.size)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// What a modifying request puts in the blocks it covers.
#[derive(Clone, Copy)]
enum Change<'a> {
    Data(&'a [u8]),
    Zeroes(ZeroFlags),
}

impl Cache {
    /// A cache over `inner` with `options`; the cache file goes to
    /// `options.dir`, else `temp_dir`, else `$TMPDIR`, else `/var/tmp`.
    pub fn new(inner: Arc<dyn Storage>, temp_dir: Option<&Path>, options: CacheOptions) -> io::Result<Cache> {
        let size = inner.size();
        let block = options.block_size;
        if !block.is_power_of_two() || !(4096..=64 << 20).contains(&block) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cache block size {block}: must be a power of two from 4096 to 64M"),
            ));
        }
        let blocks = size.div_ceil(block);
        if blocks > MAX_BLOCKS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "an export of {size} bytes has too many blocks of {block} bytes for a cache (at most \
                     {MAX_BLOCKS}); use a larger cache-min-block-size"
                ),
            ));
        }
        let dir = options
            .dir
            .clone()
            .or_else(|| temp_dir.map(Path::to_path_buf))
            .unwrap_or_else(crate::image::default_temp_dir);
        let file = crate::image::anonymous_temp_file(&dir)?;
        file.set_len(size).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{}: cannot make a cache file of {size} bytes: {e}", dir.display()),
            )
        })?;
        Ok(Cache {
            inner,
            file: FileStorage::from_file(file, false)?,
            size,
            block,
            options,
            cached: Bits::new(blocks),
            dirty: Bits::new(blocks),
            used: Bits::new(blocks),
            count: AtomicU64::new(0),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            hand: Mutex::new(0),
        })
    }

    /// The storage below.
    pub fn inner(&self) -> &Arc<dyn Storage> {
        &self.inner
    }

    /// How many bytes the cache holds (whole blocks).
    pub fn cached_bytes(&self) -> u64 {
        self.count.load(Ordering::Relaxed) * self.block
    }

    fn blocks(&self) -> u64 {
        self.size.div_ceil(self.block)
    }

    fn lock(&self, b: u64) -> MutexGuard<'_, ()> {
        // The bitmaps change only after the file holds what they say.
        self.stripes[(b % STRIPES as u64) as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn range(&self, b: u64) -> (u64, u64) {
        let start = b * self.block;
        (start, (start + self.block).min(self.size))
    }

    fn caching_reads(&self) -> bool {
        match &self.options.on_read {
            CacheOnRead::Never => false,
            CacheOnRead::Always => true,
            CacheOnRead::WhileExists(p) => p.exists(),
        }
    }

    /// Marks `b` cached (its lock held, the file holding it).
    fn insert(&self, b: u64) {
        if !self.cached.get(b) {
            self.cached.set(b);
            self.count.fetch_add(1, Ordering::Relaxed);
        }
        self.used.set(b);
    }

    /// Reads block `b` from below into the cache (its lock held).
    fn fill(&self, b: u64, scratch: &mut Vec<u8>) -> io::Result<()> {
        let (start, end) = self.range(b);
        scratch.resize((end - start) as usize, 0);
        self.inner.read_at(scratch, start)?;
        self.file.write_at(scratch, start, false)?;
        self.insert(b);
        Ok(())
    }

    /// Writes dirty block `b` below (its lock held).
    fn write_back(&self, b: u64, scratch: &mut Vec<u8>) -> io::Result<()> {
        let (start, end) = self.range(b);
        scratch.resize((end - start) as usize, 0);
        self.file.read_at(scratch, start)?;
        self.inner.write_at(scratch, start, false)?;
        self.dirty.clear(b);
        Ok(())
    }

    /// Evicts least recently used blocks while the cache is above its high
    /// threshold, down to its low one. One thread evicts at a time.
    fn reclaim(&self) -> io::Result<()> {
        let Some(max) = self.options.max_size else {
            return Ok(());
        };
        let high = max.saturating_mul(self.options.high_threshold) / 100;
        let low = max.saturating_mul(self.options.low_threshold) / 100;
        if self.cached_bytes() <= high {
            return Ok(());
        }
        let Ok(mut hand) = self.hand.try_lock() else {
            return Ok(());
        };
        let blocks = self.blocks();
        let mut scratch = Vec::new();
        // Two sweeps: the first may only clear `used` bits.
        let mut steps = 0;
        while self.cached_bytes() > low && steps < 2 * blocks + 1 {
            steps += 1;
            let b = *hand;
            *hand = (b + 1) % blocks;
            if !self.cached.get(b) {
                continue;
            }
            if self.used.get(b) {
                self.used.clear(b);
                continue;
            }
            let _guard = self.lock(b);
            if !self.cached.get(b) {
                continue;
            }
            if self.dirty.get(b) {
                self.write_back(b, &mut scratch)?;
            }
            self.cached.clear(b);
            self.count.fetch_sub(1, Ordering::Relaxed);
            let (start, end) = self.range(b);
            self.file.trim(start, end - start, false)?;
        }
        Ok(())
    }

    /// Writes `change` over `offset..offset + length`, block by block.
    fn modify(&self, offset: u64, length: u64, fua: bool, change: Change<'_>) -> io::Result<()> {
        if self.capabilities().read_only {
            return Err(errno_error(libc::EPERM));
        }
        check_range(self.size, offset, length)?;
        let through = match self.options.mode {
            CacheMode::Writethrough => true,
            CacheMode::Writeback => fua,
            CacheMode::Unsafe => false,
        };
        let zeroes = match change {
            Change::Zeroes(_) => vec![0u8; length.min(self.block) as usize],
            Change::Data(_) => Vec::new(),
        };
        let mut scratch = Vec::new();
        let end = offset + length;
        let mut pos = offset;
        while pos < end {
            let b = pos / self.block;
            let (start, block_end) = self.range(b);
            let piece_end = block_end.min(end);
            let n = (piece_end - pos) as usize;
            let piece: &[u8] = match change {
                Change::Data(buf) => &buf[(pos - offset) as usize..][..n],
                Change::Zeroes(_) => &zeroes[..n],
            };
            let _guard = self.lock(b);
            let whole = pos == start && piece_end == block_end;
            if !self.cached.get(b) && !whole {
                // Read, modify, write: the cache holds whole blocks.
                scratch.resize((block_end - start) as usize, 0);
                self.inner.read_at(&mut scratch, start)?;
                let at = (pos - start) as usize;
                scratch[at..at + n].copy_from_slice(piece);
            }
            if through {
                match change {
                    Change::Data(_) => self.inner.write_at(piece, pos, fua)?,
                    Change::Zeroes(flags) => {
                        self.inner
                            .write_zeroes(pos, piece_end - pos, ZeroFlags { fast: false, ..flags })?
                    }
                }
            }
            if !self.cached.get(b) && !whole {
                self.file.write_at(&scratch, start, false)?;
            } else {
                self.file.write_at(piece, pos, false)?;
            }
            if !through {
                self.dirty.set(b);
            }
            self.insert(b);
            pos = piece_end;
        }
        self.reclaim()
    }
}

impl Storage for Cache {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        self.inner
            .capabilities()
            .can_flush(true)
            .can_zero(true)
            .can_fast_zero(false)
            .can_cache(true)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        let on_read = self.caching_reads();
        let end = offset + buf.len() as u64;
        let mut scratch = Vec::new();
        let mut filled = false;
        let mut pos = offset;
        while pos < end {
            let b = pos / self.block;
            if !on_read && !self.cached.get(b) {
                // A run of blocks the cache does not hold: one read below.
                let mut run_end = self.range(b).1.min(end);
                while run_end < end && !self.cached.get(run_end / self.block) {
                    run_end = self.range(run_end / self.block).1.min(end);
                }
                let piece = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
                self.inner.read_at(piece, pos)?;
                pos = run_end;
                continue;
            }
            let (start, block_end) = self.range(b);
            let piece_end = block_end.min(end);
            let piece = &mut buf[(pos - offset) as usize..(piece_end - offset) as usize];
            let _guard = self.lock(b);
            if self.cached.get(b) {
                self.file.read_at(piece, pos)?;
                self.used.set(b);
            } else if on_read {
                self.fill(b, &mut scratch)?;
                let at = (pos - start) as usize;
                piece.copy_from_slice(&scratch[at..at + piece.len()]);
                filled = true;
            } else {
                // Evicted since it was looked at.
                self.inner.read_at(piece, pos)?;
            }
            pos = piece_end;
        }
        if filled { self.reclaim() } else { Ok(()) }
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.modify(offset, buf.len() as u64, fua, Change::Data(buf))
    }

    /// Writes the dirty blocks below and flushes it; nothing with
    /// `cache=unsafe`.
    fn flush(&self) -> io::Result<()> {
        if self.options.mode == CacheMode::Unsafe {
            return Ok(());
        }
        let blocks = self.blocks();
        let mut scratch = Vec::new();
        let mut b = 0;
        while let Some(d) = self.dirty.first_set(b, blocks) {
            let _guard = self.lock(d);
            if self.dirty.get(d) {
                self.write_back(d, &mut scratch)?;
            }
            b = d + 1;
        }
        self.inner.flush()
    }

    /// Drops the whole blocks of the range from the cache and trims the
    /// storage below; partly covered blocks the cache holds keep their
    /// bytes (trimming is advisory).
    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        if self.capabilities().read_only {
            return Err(errno_error(libc::EPERM));
        }
        check_range(self.size, offset, length)?;
        let end = offset + length;
        let first = offset.div_ceil(self.block);
        let last_end = if end == self.size {
            self.blocks()
        } else {
            end / self.block
        };
        for b in first..last_end {
            let _guard = self.lock(b);
            if self.cached.get(b) {
                self.dirty.clear(b);
                self.cached.clear(b);
                self.count.fetch_sub(1, Ordering::Relaxed);
                let (start, block_end) = self.range(b);
                self.file.trim(start, block_end - start, false)?;
            }
        }
        if self.inner.capabilities().can_trim {
            self.inner.trim(offset, length, fua)
        } else {
            Ok(())
        }
    }

    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> io::Result<()> {
        if flags.fast {
            return Err(fast_zero_unsupported());
        }
        self.modify(offset, length, flags.fua, Change::Zeroes(flags))
    }

    /// Reads the range into the cache (`NBD_CMD_CACHE`).
    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        check_range(self.size, offset, length)?;
        if length == 0 {
            return Ok(());
        }
        let mut scratch = Vec::new();
        for b in offset / self.block..=(offset + length - 1) / self.block {
            let _guard = self.lock(b);
            if !self.cached.get(b) {
                self.fill(b, &mut scratch)?;
            }
        }
        self.reclaim()
    }

    /// The storage below's answer, except that dirty blocks (which it has
    /// not seen yet) are data.
    fn block_status(&self, offset: u64, length: u64, out: &mut Vec<Extent>) -> io::Result<()> {
        let length = clamp_status_range(self.size, offset, length)?;
        let end = offset + length;
        let first = offset / self.block;
        let last = (end - 1) / self.block + 1;
        if self.dirty.get(first) {
            let mut run_end = first + 1;
            while run_end < last && self.dirty.get(run_end) {
                run_end += 1;
            }
            out.push(Extent::data(self.range(run_end - 1).1.min(end) - offset));
            return Ok(());
        }
        let clean_end = match self.dirty.first_set(first + 1, last) {
            Some(d) => self.range(d).0,
            None => end,
        };
        self.inner.block_status(offset, clean_end - offset, out)
    }

    fn meta_contexts(&self) -> Vec<String> {
        self.inner.meta_contexts()
    }

    fn context_status(&self, context: &str, offset: u64, length: u64, out: &mut Vec<StatusExtent>) -> io::Result<()> {
        if context == nbd_proto::wire::CONTEXT_BASE_ALLOCATION {
            crate::default_context_status(self, context, offset, length, out)
        } else {
            self.inner.context_status(context, offset, length, out)
        }
    }

    fn sparse_reads(&self) -> SparseReads {
        self.inner.sparse_reads()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::MemoryStorage;
    use crate::filter::ReadAhead;
    use crate::filter::testing::{Counting, pattern};

    fn options(params: &[(&str, &str)]) -> CacheOptions {
        let p: Vec<(String, String)> = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        CacheOptions::from_params(&p).unwrap()
    }

    /// A cache with `params` over a counted memory export of `size`
    /// bytes filled with a pattern.
    fn setup(size: usize, params: &[(&str, &str)]) -> (Arc<MemoryStorage>, Arc<Counting>, Cache) {
        let mem = Arc::new(MemoryStorage::new(size as u64));
        mem.write_at(&pattern(size), 0, false).unwrap();
        let counting = Arc::new(Counting::new(mem.clone()));
        let cache = Cache::new(counting.clone(), None, options(params)).unwrap();
        (mem, counting, cache)
    }

    #[test]
    fn a_second_read_never_reaches_the_storage_below() {
        let (_, below, cache) = setup(1 << 20, &[("cache-on-read", "true")]);
        let mut first = vec![0u8; 300_000];
        cache.read_at(&mut first, 10_000).unwrap();
        assert!(first[..] == pattern(1 << 20)[10_000..310_000]);
        let reads = below.reads();
        // Whole blocks of 64 KiB, 0 to 320K.
        assert_eq!(reads, vec![65536; 5]);
        let mut second = vec![0u8; 300_000];
        cache.read_at(&mut second, 10_000).unwrap();
        assert!(first == second);
        assert_eq!(below.reads(), reads, "the second read came from the cache");
        assert_eq!(cache.cached_bytes(), 5 * 65536);
    }

    #[test]
    fn without_cache_on_read_reads_go_below_in_one_piece() {
        let (_, below, cache) = setup(1 << 20, &[]);
        let mut b = vec![0u8; 300_000];
        cache.read_at(&mut b, 10_000).unwrap();
        cache.read_at(&mut b, 10_000).unwrap();
        assert_eq!(below.reads(), vec![300_000, 300_000]);
        assert_eq!(cache.cached_bytes(), 0);
        // NBD_CMD_CACHE fills it all the same.
        cache.cache(0, 65536).unwrap();
        cache.read_at(&mut b[..4096], 0).unwrap();
        assert_eq!(below.reads(), vec![300_000, 300_000, 65536]);
    }

    #[test]
    fn cache_on_read_follows_its_file() {
        let dir = std::env::temp_dir().join(format!("cache-on-read-{}", std::process::id()));
        let (_, below, cache) = setup(1 << 20, &[("cache-on-read", dir.to_str().unwrap())]);
        let mut b = vec![0u8; 4096];
        cache.read_at(&mut b, 0).unwrap();
        assert_eq!(cache.cached_bytes(), 0);
        std::fs::write(&dir, b"").unwrap();
        cache.read_at(&mut b, 0).unwrap();
        std::fs::remove_file(&dir).unwrap();
        cache.read_at(&mut b, 0).unwrap();
        assert_eq!(below.reads(), vec![4096, 65536]);
    }

    #[test]
    fn writeback_writes_dirty_blocks_below_on_flush() {
        let (mem, below, cache) = setup(1 << 20, &[]);
        cache.write_at(&[0xab; 4096], 65536 + 100, false).unwrap();
        cache.write_zeroes(3 * 65536, 65536, ZeroFlags::default()).unwrap();
        assert_eq!(below.writes(), vec![], "nothing below before the flush");
        let mut b = [0u8; 4096];
        cache.read_at(&mut b, 65536 + 100).unwrap();
        assert_eq!(b, [0xab; 4096]);
        // The partial block was read below once, to fill the rest of it.
        assert_eq!(below.reads(), vec![65536]);
        cache.flush().unwrap();
        assert_eq!(below.writes(), vec![(65536, 65536), (3 * 65536, 65536)]);
        mem.read_at(&mut b, 65536 + 100).unwrap();
        assert_eq!(b, [0xab; 4096]);
        mem.read_at(&mut b, 3 * 65536).unwrap();
        assert_eq!(b, [0; 4096]);
        // Clean now: a second flush writes nothing.
        cache.flush().unwrap();
        assert_eq!(below.writes().len(), 2);
    }

    #[test]
    fn writethrough_writes_below_at_once_and_unsafe_never_on_flush() {
        let (mem, below, cache) = setup(1 << 20, &[("cache", "writethrough")]);
        cache.write_at(&[1; 512], 512, false).unwrap();
        assert_eq!(below.writes(), vec![(512, 512)]);
        let mut b = [0u8; 512];
        mem.read_at(&mut b, 512).unwrap();
        assert_eq!(b, [1; 512]);

        let (mem, below, cache) = setup(1 << 20, &[("cache", "unsafe")]);
        cache.write_at(&[1; 512], 512, true).unwrap();
        cache.flush().unwrap();
        assert_eq!(below.writes(), vec![]);
        mem.read_at(&mut b, 512).unwrap();
        assert_ne!(b, [1; 512]);
    }

    #[test]
    fn dirty_blocks_are_data_in_block_status() {
        let mem = Arc::new(MemoryStorage::new(1 << 20));
        let cache = Cache::new(mem, None, CacheOptions::default()).unwrap();
        let mut out = Vec::new();
        cache.block_status(0, 1 << 20, &mut out).unwrap();
        assert!(out[0].flags.contains(crate::AllocationFlags::HOLE), "{out:?}");
        cache.write_at(&[1; 100], 65536 * 2 + 5, false).unwrap();
        out.clear();
        cache.block_status(0, 1 << 20, &mut out).unwrap();
        assert_eq!(out.iter().map(|e| e.length).sum::<u64>(), 2 * 65536, "{out:?}");
        out.clear();
        cache.block_status(2 * 65536, 1 << 20, &mut out).unwrap();
        assert_eq!(out, [Extent::data(65536)]);
    }

    #[test]
    fn the_cache_stays_under_its_maximum() {
        let (mem, below, cache) = setup(
            1 << 20,
            &[
                ("cache-on-read", "true"),
                ("cache-max-size", "256k"),
                ("cache-high-threshold", "95"),
                ("cache-low-threshold", "80"),
            ],
        );
        // Dirty blocks are written back before they go.
        cache.write_at(&[9; 65536], 0, false).unwrap();
        let mut all = vec![0u8; 1 << 20];
        for (i, chunk) in all.chunks_mut(65536).enumerate() {
            cache.read_at(chunk, i as u64 * 65536).unwrap();
            assert!(cache.cached_bytes() <= 256 << 10, "{}", cache.cached_bytes());
        }
        let mut want = pattern(1 << 20);
        want[..65536].fill(9);
        assert!(all == want);
        assert!(below.writes().contains(&(0, 65536)));
        let mut first = vec![0u8; 65536];
        mem.read_at(&mut first, 0).unwrap();
        assert_eq!(first, [9; 65536]);
    }

    #[test]
    fn bad_parameters_are_clear_errors() {
        for (k, v, says) in [
            ("cache", "sometimes", "expected writeback, writethrough or unsafe"),
            ("cache-on-read", "maybe", "expected true, false or an absolute path"),
            ("cache-min-block-size", "1000", "power of two"),
            ("cache-max-size", "1.5M", "not a size"),
            ("cache-max-size", "1k", "less than one block"),
            ("cache-high-threshold", "ninety", "not an integer percentage"),
            ("cache-low-threshold", "99", "0 < low < high"),
            ("cache-colour", "red", "unknown parameter"),
        ] {
            let e = CacheOptions::from_params(&[(k.into(), v.into())]).unwrap_err();
            assert!(e.to_string().contains(says), "{k}={v}: {e}");
        }
    }

    #[test]
    fn concurrent_writers_of_one_block_lose_nothing() {
        // Eight threads write their own 512 bytes of the same blocks
        // (read, modify, write of the cache's 4 KiB blocks) and read
        // through read-ahead, with eviction going on.
        let below = Arc::new(MemoryStorage::new(1 << 20));
        let o = options(&[
            ("cache-min-block-size", "4k"),
            ("cache-max-size", "64k"),
            ("cache-on-read", "true"),
        ]);
        let cache: Arc<dyn Storage> = Arc::new(Cache::new(below.clone(), None, o).unwrap());
        let top: Arc<dyn Storage> = Arc::new(ReadAhead::new(cache));
        std::thread::scope(|scope| {
            for t in 0..8u8 {
                let top = top.clone();
                scope.spawn(move || {
                    let mut b = [0u8; 512];
                    for block in 0..64u64 {
                        let at = block * 4096 + u64::from(t) * 512;
                        top.write_at(&[t + 1; 512], at, false).unwrap();
                        top.read_at(&mut b, at).unwrap();
                        assert_eq!(b, [t + 1; 512]);
                    }
                });
            }
        });
        top.flush().unwrap();
        let mut all = vec![0u8; 64 * 4096];
        below.read_at(&mut all, 0).unwrap();
        for (i, b) in all.iter().enumerate() {
            assert_eq!(*b, (i % 4096 / 512) as u8 + 1, "byte {i}");
        }
    }

    #[derive(Debug, Clone)]
    enum Action {
        Read(u64, u64),
        Write(u64, u64, u8),
        Zero(u64, u64),
        Trim(u64, u64),
        Cache(u64, u64),
        Flush,
    }

    const SIZE: u64 = 64 * 1024 + 1000;

    fn range() -> impl Strategy<Value = (u64, u64)> {
        (0..SIZE).prop_flat_map(|off| (Just(off), 0..=(SIZE - off).min(20_000)))
    }

    fn action() -> impl Strategy<Value = Action> {
        prop_oneof![
            4 => range().prop_map(|(o, l)| Action::Read(o, l)),
            3 => (range(), any::<u8>()).prop_map(|((o, l), v)| Action::Write(o, l, v)),
            1 => range().prop_map(|(o, l)| Action::Zero(o, l)),
            1 => range().prop_map(|(o, l)| Action::Trim(o, l)),
            1 => range().prop_map(|(o, l)| Action::Cache(o, l)),
            1 => Just(Action::Flush),
        ]
    }

    fn mode() -> impl Strategy<Value = &'static str> {
        prop_oneof![Just("writeback"), Just("writethrough"), Just("unsafe")]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the settings, the filters read back what a plain
        /// memory export would (trimmed bytes excepted: they are
        /// unspecified until written again), and after a flush the
        /// storage below holds it too.
        #[test]
        fn data_equals_a_plain_memory_export(
            mode in mode(),
            on_read in any::<bool>(),
            max in prop_oneof![Just(None), Just(Some("16k")), Just(Some("32k"))],
            readahead in any::<bool>(),
            actions in proptest::collection::vec(action(), 1..40),
        ) {
            let below = Arc::new(MemoryStorage::new(SIZE));
            let mut params = vec![
                ("cache", mode),
                ("cache-on-read", if on_read { "true" } else { "false" }),
                ("cache-min-block-size", "4k"),
            ];
            if let Some(m) = max {
                params.push(("cache-max-size", m));
            }
            let cache: Arc<dyn Storage> = Arc::new(Cache::new(below.clone(), None, options(&params)).unwrap());
            let top: Arc<dyn Storage> = if readahead { Arc::new(ReadAhead::new(cache)) } else { cache };
            let mut model = vec![0u8; SIZE as usize];
            let mut known = vec![true; SIZE as usize];
            for a in &actions {
                match *a {
                    Action::Read(o, l) => {
                        let mut buf = vec![0u8; l as usize];
                        top.read_at(&mut buf, o).unwrap();
                        for (i, b) in buf.iter().enumerate() {
                            let at = o as usize + i;
                            prop_assert!(!known[at] || *b == model[at], "{a:?}: byte {at}");
                        }
                    }
                    Action::Write(o, l, v) => {
                        let buf: Vec<u8> = (0..l).map(|i| v.wrapping_add(i as u8)).collect();
                        top.write_at(&buf, o, false).unwrap();
                        model[o as usize..(o + l) as usize].copy_from_slice(&buf);
                        known[o as usize..(o + l) as usize].fill(true);
                    }
                    Action::Zero(o, l) => {
                        top.write_zeroes(o, l, ZeroFlags::default()).unwrap();
                        model[o as usize..(o + l) as usize].fill(0);
                        known[o as usize..(o + l) as usize].fill(true);
                    }
                    Action::Trim(o, l) => {
                        top.trim(o, l, false).unwrap();
                        known[o as usize..(o + l) as usize].fill(false);
                    }
                    Action::Cache(o, l) => top.cache(o, l).unwrap(),
                    Action::Flush => top.flush().unwrap(),
                }
            }
            if mode != "unsafe" {
                top.flush().unwrap();
                let mut all = vec![0u8; SIZE as usize];
                below.read_at(&mut all, 0).unwrap();
                for at in 0..SIZE as usize {
                    prop_assert!(!known[at] || all[at] == model[at], "below, byte {at}");
                }
            }
        }
    }
}
