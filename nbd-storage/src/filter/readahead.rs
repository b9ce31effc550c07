//! The `readahead` filter: a sequential reader's small reads become a few
//! large reads of the storage below (nbdkit's `readahead` filter, which
//! takes no parameters).
//!
//! The filter remembers where the previous read ended. A read that starts
//! there continues a sequential scan: when the bytes are not already in
//! the filter's buffer, it reads a window from the storage below (the
//! request, or more), keeps the window in the buffer and serves the
//! following reads from it. Each sequential read that misses the buffer
//! doubles the window, from [`MIN_WINDOW`] up to [`MAX_WINDOW`]; a read
//! anywhere else (random access) shrinks it back to [`MIN_WINDOW`] and
//! reads only what it asked for. A write, trim or zero invalidates the
//! buffer where it overlaps. Memory is one buffer of at most
//! [`MAX_WINDOW`] bytes, whatever the size of the export.
//!
//! nbdkit 1.32 prefetches with `NBD_CMD_CACHE`-like hints below, which
//! only help a plugin that caches; the buffer here helps any storage.

use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{FilterError, unknown_param};
use crate::{Capabilities, Extent, SparseReads, StatusExtent, Storage, ZeroFlags, check_range};

/// The window after a random read, and the first one.
pub const MIN_WINDOW: u64 = 64 * 1024;

/// The largest window (and so the largest buffer) a sequential scan grows
/// to.
pub const MAX_WINDOW: u64 = 4 << 20;

/// Read-ahead over any storage (nbdkit's `readahead` filter): a read that
/// starts where the previous one ended and misses the buffer reads a
/// window from below (doubling from [`MIN_WINDOW`] to [`MAX_WINDOW`] with
/// each such miss) and keeps it for the reads that follow; any other read
/// resets the window and reads only what it asks. Writes, trims and zeroes
/// drop the buffer where they overlap it. Memory: one buffer of at most
/// [`MAX_WINDOW`] bytes.
pub struct ReadAhead {
    inner: Arc<dyn Storage>,
    state: Mutex<State>,
}

struct State {
    /// Where the previous read ended.
    last_end: u64,
    /// The next window to read on a sequential miss.
    window: u64,
    /// The bytes of `buffer_offset..buffer_offset + buffer.len()`.
    buffer: Vec<u8>,
    buffer_offset: u64,
    /// Bumped by every change of the export, so that a window read while
    /// a write ran is not kept.
    generation: u64,
}

impl fmt::Debug for ReadAhead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadAhead").finish_non_exhaustive()
    }
}

impl ReadAhead {
    /// Read-ahead over `inner`.
    pub fn new(inner: Arc<dyn Storage>) -> ReadAhead {
        ReadAhead {
            inner,
            state: Mutex::new(State {
                last_end: 0,
                window: MIN_WINDOW,
                buffer: Vec::new(),
                buffer_offset: 0,
                generation: 0,
            }),
        }
    }

    /// The filter from nbdkit's parameters (it has none).
    pub fn from_params(inner: Arc<dyn Storage>, params: &[(String, String)]) -> Result<ReadAhead, FilterError> {
        if let Some((k, _)) = params.first() {
            return Err(unknown_param("readahead", k));
        }
        Ok(ReadAhead::new(inner))
    }

    /// The storage below.
    pub fn inner(&self) -> &Arc<dyn Storage> {
        &self.inner
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state is only a hint plus a buffer that is replaced whole:
        // a panic elsewhere cannot leave it inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a change of `offset..offset + length`, then drops the buffer
    /// where it overlaps (after, so that no read can keep the old bytes).
    fn changing(&self, offset: u64, length: u64, call: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let r = call();
        let mut st = self.state();
        st.generation = st.generation.wrapping_add(1);
        let end = offset.saturating_add(length);
        let buf_end = st.buffer_offset + st.buffer.len() as u64;
        if offset < buf_end && st.buffer_offset < end {
            st.buffer.clear();
        }
        r
    }
}

impl Storage for ReadAhead {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let size = self.inner.size();
        check_range(size, offset, buf.len() as u64)?;
        let len = buf.len() as u64;
        let end = offset + len;
        let (fetch, generation) = {
            let mut st = self.state();
            let sequential = offset == st.last_end;
            st.last_end = end;
            let buf_end = st.buffer_offset + st.buffer.len() as u64;
            if offset >= st.buffer_offset && end <= buf_end {
                let at = (offset - st.buffer_offset) as usize;
                buf.copy_from_slice(&st.buffer[at..at + buf.len()]);
                return Ok(());
            }
            if sequential {
                let w = st.window;
                st.window = (w * 2).min(MAX_WINDOW);
                (w.max(len).min(size - offset), st.generation)
            } else {
                st.window = MIN_WINDOW;
                (len, st.generation)
            }
        };
        if fetch <= len || fetch > MAX_WINDOW {
            return self.inner.read_at(buf, offset);
        }
        let mut window = vec![0u8; fetch as usize];
        self.inner.read_at(&mut window, offset)?;
        buf.copy_from_slice(&window[..buf.len()]);
        let mut st = self.state();
        if st.generation == generation {
            st.buffer = window;
            st.buffer_offset = offset;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.changing(offset, buf.len() as u64, || self.inner.write_at(buf, offset, fua))
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        self.changing(offset, length, || self.inner.trim(offset, length, fua))
    }

    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> io::Result<()> {
        self.changing(offset, length, || self.inner.write_zeroes(offset, length, flags))
    }

    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        self.inner.cache(offset, length)
    }

    fn block_status(&self, offset: u64, length: u64, out: &mut Vec<Extent>) -> io::Result<()> {
        self.inner.block_status(offset, length, out)
    }

    fn meta_contexts(&self) -> Vec<String> {
        self.inner.meta_contexts()
    }

    fn context_status(&self, context: &str, offset: u64, length: u64, out: &mut Vec<StatusExtent>) -> io::Result<()> {
        self.inner.context_status(context, offset, length, out)
    }

    fn extent_at(&self, offset: u64, scratch: &mut Vec<Extent>) -> io::Result<Extent> {
        self.inner.extent_at(offset, scratch)
    }

    fn sparse_reads(&self) -> SparseReads {
        self.inner.sparse_reads()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStorage;
    use crate::filter::testing::Counting;

    #[test]
    fn sequential_small_reads_become_few_large_ones() {
        let mem = Arc::new(MemoryStorage::new(1 << 20));
        mem.write_at(&crate::filter::testing::pattern(1 << 20), 0, false)
            .unwrap();
        let counting = Arc::new(Counting::new(mem.clone()));
        let ra = ReadAhead::new(counting.clone());
        let mut got = vec![0u8; 1 << 20];
        for (i, chunk) in got.chunks_mut(4096).enumerate() {
            ra.read_at(chunk, i as u64 * 4096).unwrap();
        }
        let mut want = vec![0u8; 1 << 20];
        mem.read_at(&mut want, 0).unwrap();
        assert!(got == want);
        // 64K, 128K, 256K, 512K, then the last 64K: 5 reads for 256.
        assert_eq!(counting.reads(), vec![65536, 131072, 262144, 524288, 65536]);
    }

    #[test]
    fn random_reads_shrink_the_window_and_read_only_what_they_ask() {
        let counting = Arc::new(Counting::new(Arc::new(MemoryStorage::new(8 << 20))));
        let ra = ReadAhead::new(counting.clone());
        let mut b = [0u8; 4096];
        for i in 0..40u64 {
            ra.read_at(&mut b, i * 4096).unwrap();
        }
        let before = counting.reads().len();
        ra.read_at(&mut b, 7 << 20).unwrap();
        ra.read_at(&mut b, 3 << 20).unwrap();
        assert_eq!(counting.reads()[before..], [4096, 4096]);
        // The scan starts again from the smallest window.
        ra.read_at(&mut b, (3 << 20) + 4096).unwrap();
        assert_eq!(counting.reads().last(), Some(&MIN_WINDOW));
    }

    #[test]
    fn writes_invalidate_the_window() {
        let mem = Arc::new(MemoryStorage::new(1 << 20));
        let ra = ReadAhead::new(mem);
        let mut b = [0u8; 4096];
        ra.read_at(&mut b, 0).unwrap();
        ra.write_at(&[7; 4096], 4096, false).unwrap();
        ra.read_at(&mut b, 4096).unwrap();
        assert_eq!(b, [7; 4096]);
        ra.write_zeroes(4096, 4096, ZeroFlags::default()).unwrap();
        ra.read_at(&mut b, 4096).unwrap();
        assert_eq!(b, [0; 4096]);
    }

    #[test]
    fn parameters_are_refused() {
        let m: Arc<dyn Storage> = Arc::new(MemoryStorage::new(4096));
        let e = ReadAhead::from_params(m, &[("window".into(), "1M".into())]).unwrap_err();
        assert_eq!(e.to_string(), "filter readahead: window: unknown parameter");
    }
}
