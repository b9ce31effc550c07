//! Helpers for the filters' tests: a storage that counts what reaches it.

use std::io;
use std::sync::{Arc, Mutex};

use crate::{Capabilities, Extent, Storage, ZeroFlags};

/// Passes everything to `inner` and records the length of every read and
/// write that reaches it.
pub(crate) struct Counting {
    inner: Arc<dyn Storage>,
    reads: Mutex<Vec<u64>>,
    writes: Mutex<Vec<(u64, u64)>>,
}

impl Counting {
    pub(crate) fn new(inner: Arc<dyn Storage>) -> Counting {
        Counting {
            inner,
            reads: Mutex::new(Vec::new()),
            writes: Mutex::new(Vec::new()),
        }
    }

    /// The lengths of the reads so far.
    pub(crate) fn reads(&self) -> Vec<u64> {
        self.reads.lock().unwrap().clone()
    }

    /// The (offset, length) of the writes so far.
    pub(crate) fn writes(&self) -> Vec<(u64, u64)> {
        self.writes.lock().unwrap().clone()
    }
}

impl Storage for Counting {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.reads.lock().unwrap().push(buf.len() as u64);
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.writes.lock().unwrap().push((offset, buf.len() as u64));
        self.inner.write_at(buf, offset, fua)
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        self.inner.trim(offset, length, fua)
    }

    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> io::Result<()> {
        self.writes.lock().unwrap().push((offset, length));
        self.inner.write_zeroes(offset, length, flags)
    }

    fn block_status(&self, offset: u64, length: u64, out: &mut Vec<Extent>) -> io::Result<()> {
        self.inner.block_status(offset, length, out)
    }
}

/// `len` bytes of a pattern that differs from block to block.
pub(crate) fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i / 512 * 7 + i % 251) as u8).collect()
}
