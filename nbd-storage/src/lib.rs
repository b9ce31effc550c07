//! Storage backends shared by the NBD servers: what a server serves, and
//! nothing of the server itself (that is the `nbd-server` crate).
//!
//! Both NBD runtimes (the blocking one and the `smol` one) serve exports
//! through one of two abstractions:
//!
//! * [`Storage`]: synchronous and positional (`read_at`/`write_at` with an
//!   explicit offset, all methods taking `&self`), normally held as an
//!   `Arc<dyn Storage>` that every connection to the export shares. Storage
//!   that says it never blocks ([`Storage::never_blocks`]: the memory
//!   export) is called in place, on the thread that reads the connection;
//!   any other is called on the server's I/O pool (`nbd_server::IoPool`), so a
//!   slow call (an `fdatasync` on a real disk) never delays other
//!   connections' requests.
//! * [`AsyncStorage`]: for storage that is asynchronous by nature (a
//!   network block store with completion callbacks): every operation
//!   returns at once and reports its end through a [`Completion`]; no
//!   thread waits on it.
//!
//! Every backend uses interior mutability and must tolerate many
//! concurrent callers; [`Capabilities::can_multi_conn`] states whether writes
//! made through one connection are visible (and flushed) through every other.
//!
//! # Errors
//!
//! Failures are reported as [`std::io::Error`]s carrying a raw OS error
//! number wherever one is meaningful, because the servers translate errno
//! values into NBD error codes: `EPERM`/`EROFS` for writes to read-only
//! exports, `EINVAL` for out-of-range requests, `ENOSPC`, `EIO`,
//! `EOPNOTSUPP` for a refused fast zero, and so on. No backend panics on any
//! input: ranges are validated with overflow-checked arithmetic (see
//! [`check_range`]) even though the servers validate requests earlier.
//!
//! # Backends
//!
//! * [`MemoryStorage`]: a sparse in-memory disk in the spirit of nbdkit's
//!   `memory` plugin. Pages are allocated on first write and released by
//!   TRIM/WRITE_ZEROES, so an export of 2^62 bytes costs nothing until it is
//!   written to. Pages live in hash-sharded ordered maps with a lock per
//!   shard and a lock per page, so concurrent reads and writes of different
//!   pages almost never contend.
//! * [`FileStorage`]: a regular file or a block device served with
//!   positional I/O on one shared file descriptor; holes are discovered with
//!   `lseek(SEEK_DATA/SEEK_HOLE)`, TRIM and WRITE_ZEROES use `fallocate`, and
//!   FLUSH/FUA use `fdatasync`. It is Linux-specific.
//! * [`image`]: disk images as QEMU opens them: raw files and qcow2 images
//!   (through the `imago` crate) with their backing chains, format probing
//!   that never serves an image as raw by accident, QEMU's image locks,
//!   snapshot mode, and the metadata contexts `qemu:allocation-depth` and
//!   `qemu:dirty-bitmap:NAME`. [`image::open`] is the entry point, and
//!   [`image::ImageSet`] opens one file once for several exports;
//!   [`image::remote`] reads a qcow2 chain through any other storage (a
//!   web server's, say).
//! * [`cow::CowStorage`]: copy-on-write over any other storage (writes go
//!   to a temporary overlay), as nbdkit's `cow` filter.
//! * `http::HttpStorage` (feature `http`, off by default): a read-only
//!   disk on a web server, read with HTTP range requests, as nbdkit's
//!   `curl` plugin.
//! * `rbd::RbdStorage` (feature `rbd`, off by default; links librbd): a
//!   Ceph RBD image, an [`AsyncStorage`] on librbd's asynchronous API.
//!
//! # Metadata contexts
//!
//! Every backend says which metadata contexts it offers
//! ([`Storage::meta_contexts`], `base:allocation` by default) and answers
//! block status for each: `base:allocation` through
//! [`Storage::block_status`], any other through [`Storage::context_status`].
#![warn(missing_docs)]

use std::io;

pub use nbd_proto::wire::{AllocationFlags, BlockSizeConstraints};

pub mod completion;
pub mod cow;
mod file;
pub mod filter;
#[cfg(feature = "http")]
pub mod http;
pub mod image;
pub mod lent;
mod memory;
#[cfg(feature = "rbd")]
pub mod rbd;

pub use completion::{Completion, CompletionSink, Done};
pub use file::FileStorage;
pub use lent::SharedBytes;
pub use memory::{MemoryStorage, is_zero};

/// What an export supports; the servers turn it into the NBD transmission
/// flags and the `NBD_INFO_BLOCK_SIZE` reply.
///
/// `Default` gives the most conservative set: a writable export that
/// supports nothing beyond READ and WRITE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Capabilities {
    /// The export refuses every modifying command (`NBD_FLAG_READ_ONLY`).
    pub read_only: bool,
    /// [`Storage::flush`] does something useful (`NBD_FLAG_SEND_FLUSH`).
    pub can_flush: bool,
    /// Writes honour the `fua` argument (`NBD_FLAG_SEND_FUA`).
    pub can_fua: bool,
    /// [`Storage::trim`] may release storage (`NBD_FLAG_SEND_TRIM`).
    pub can_trim: bool,
    /// [`Storage::write_zeroes`] is efficient (`NBD_FLAG_SEND_WRITE_ZEROES`).
    pub can_zero: bool,
    /// [`Storage::write_zeroes`] honours [`ZeroFlags::fast`]
    /// (`NBD_FLAG_SEND_FAST_ZERO`).
    pub can_fast_zero: bool,
    /// [`Storage::cache`] does something useful (`NBD_FLAG_SEND_CACHE`).
    pub can_cache: bool,
    /// Several connections may safely share the export and see each other's
    /// writes, and a flush on one flushes all (`NBD_FLAG_CAN_MULTI_CONN`).
    pub can_multi_conn: bool,
    /// The export is backed by a rotational medium (`NBD_FLAG_ROTATIONAL`).
    pub rotational: bool,
    /// Block-size constraints to advertise; `None` means the protocol
    /// defaults (no alignment requirement).
    pub block_size: Option<BlockSizeConstraints>,
}

/// Chainable setters, one per field (the struct is `#[non_exhaustive]`:
/// other crates build it from [`Capabilities::default`]).
impl Capabilities {
    /// Sets whether the export refuses every modifying command.
    pub const fn read_only(mut self, v: bool) -> Self {
        self.read_only = v;
        self
    }

    /// Sets whether [`Storage::flush`] does something useful.
    pub const fn can_flush(mut self, v: bool) -> Self {
        self.can_flush = v;
        self
    }

    /// Sets whether writes honour the `fua` argument.
    pub const fn can_fua(mut self, v: bool) -> Self {
        self.can_fua = v;
        self
    }

    /// Sets whether [`Storage::trim`] may release storage.
    pub const fn can_trim(mut self, v: bool) -> Self {
        self.can_trim = v;
        self
    }

    /// Sets whether [`Storage::write_zeroes`] is efficient.
    pub const fn can_zero(mut self, v: bool) -> Self {
        self.can_zero = v;
        self
    }

    /// Sets whether [`Storage::write_zeroes`] honours [`ZeroFlags::fast`].
    pub const fn can_fast_zero(mut self, v: bool) -> Self {
        self.can_fast_zero = v;
        self
    }

    /// Sets whether [`Storage::cache`] does something useful.
    pub const fn can_cache(mut self, v: bool) -> Self {
        self.can_cache = v;
        self
    }

    /// Sets whether several connections may safely share the export.
    pub const fn can_multi_conn(mut self, v: bool) -> Self {
        self.can_multi_conn = v;
        self
    }

    /// Sets whether the export is backed by a rotational medium.
    pub const fn rotational(mut self, v: bool) -> Self {
        self.rotational = v;
        self
    }

    /// Sets the block-size constraints to advertise (`None`: the defaults).
    pub const fn block_size(mut self, v: Option<BlockSizeConstraints>) -> Self {
        self.block_size = v;
        self
    }
}

/// Flags of a [`Storage::write_zeroes`] request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZeroFlags {
    /// `NBD_CMD_FLAG_NO_HOLE`: do not deallocate. Afterwards the range reads
    /// back as zeroes and storage that was allocated in it stays allocated.
    pub no_hole: bool,
    /// `NBD_CMD_FLAG_FAST_ZERO`: if the backend cannot zero the range faster
    /// than by writing zeroes, fail at once with `EOPNOTSUPP` (see
    /// [`fast_zero_unsupported`]) without changing any data.
    pub fast: bool,
    /// `NBD_CMD_FLAG_FUA`: the zeroes are durable before the call returns.
    pub fua: bool,
}

/// One run of bytes with the same allocation status, as reported by
/// [`Storage::block_status`] for the `base:allocation` metadata context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length of the run in bytes (never zero).
    pub length: u64,
    /// `HOLE | ZERO` for unallocated ranges, `ZERO` for allocated ranges
    /// known to read as zeroes, empty for data.
    pub flags: AllocationFlags,
}

impl Extent {
    /// An extent of allocated data.
    pub const fn data(length: u64) -> Extent {
        Extent {
            length,
            flags: AllocationFlags::empty(),
        }
    }

    /// An unallocated extent that reads as zeroes (`HOLE | ZERO`).
    pub const fn hole(length: u64) -> Extent {
        Extent {
            length,
            flags: AllocationFlags::HOLE.union(AllocationFlags::ZERO),
        }
    }
}

/// One run of bytes with the same status in some metadata context, as
/// reported by [`Storage::context_status`]: the 32-bit status value is the
/// context's own (for `qemu:allocation-depth` the depth, for
/// `qemu:dirty-bitmap:NAME` 1 for dirty).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    /// Length of the run in bytes (never zero).
    pub length: u64,
    /// The status of the run.
    pub status: u32,
}

/// The storage behind one NBD export.
///
/// Implementations use interior mutability: one instance is shared (as
/// `Arc<dyn Storage>`) by every connection and called concurrently from
/// several threads. The servers validate requests before calling, but
/// implementations must still reject out-of-range requests with `EINVAL`
/// rather than panic, and refuse modifications of read-only exports with
/// `EPERM` (or `EROFS`).
///
/// The provided methods are correct, conservative defaults for backends
/// that have nothing better to offer; such backends should leave the
/// matching [`Capabilities`] flags off.
pub trait Storage: Send + Sync {
    /// Size of the export in bytes. Constant for the lifetime of the object.
    fn size(&self) -> u64;

    /// What the export supports.
    fn capabilities(&self) -> Capabilities;

    /// Fills the whole of `buf` with the bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes the whole of `buf` at `offset`; with `fua` the data is durable
    /// before the call returns.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()>;

    /// Makes every completed write durable.
    ///
    /// The default does nothing, which is right for volatile backends.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    /// Tells the backend that the range's contents are no longer needed, so
    /// its storage may be released. Trimming is advisory: afterwards the
    /// range holds unspecified data (in practice either its old contents or
    /// zeroes). With `fua` the result is durable before the call returns.
    ///
    /// The default only checks the request and does nothing else.
    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        let _ = fua;
        check_writable_range(self, offset, length)
    }

    /// Makes the range read back as zeroes; see [`ZeroFlags`] for the
    /// meaning of the flags.
    ///
    /// The default writes zero buffers of at most [`ZERO_CHUNK`] bytes with
    /// [`Storage::write_at`], and refuses `fast` requests with `EOPNOTSUPP`.
    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> io::Result<()> {
        check_writable_range(self, offset, length)?;
        if flags.fast {
            return Err(fast_zero_unsupported());
        }
        write_zero_buffers(offset, length, |buf, off| self.write_at(buf, off, false))?;
        if flags.fua { self.flush() } else { Ok(()) }
    }

    /// Hints that the range will be read soon (`NBD_CMD_CACHE`).
    ///
    /// The default only checks the request.
    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        check_range(self.size(), offset, length)
    }

    /// Appends to `out` the allocation status of the range starting at
    /// `offset`, as consecutive extents. The extents cover at least one byte
    /// and at most `length` bytes (the backend may stop early to bound its
    /// work) and never go past the end of the export; adjacent extents in
    /// what is appended never have equal flags.
    ///
    /// `offset` must lie inside the export and `length` must not be zero;
    /// a `length` running past the end of the export is clamped to it.
    /// Existing elements of `out` are left alone, so a caller reusing one
    /// vector (cleared between calls) allocates nothing in steady state.
    ///
    /// The default reports the whole range as data.
    fn block_status(&self, offset: u64, length: u64, out: &mut Vec<Extent>) -> io::Result<()> {
        let length = clamp_status_range(self.size(), offset, length)?;
        out.push(Extent::data(length));
        Ok(())
    }

    /// The metadata contexts this export offers, by full name
    /// (`base:allocation`, `qemu:allocation-depth`,
    /// `qemu:dirty-bitmap:NAME`, ...). The servers offer exactly these in
    /// `NBD_OPT_SET_META_CONTEXT`/`LIST_META_CONTEXT`, and answer
    /// `NBD_CMD_BLOCK_STATUS` for each selected one:
    /// `base:allocation` through [`Storage::block_status`], every other
    /// context through [`Storage::context_status`].
    ///
    /// The default offers `base:allocation` only.
    fn meta_contexts(&self) -> Vec<String> {
        vec![nbd_proto::wire::CONTEXT_BASE_ALLOCATION.to_string()]
    }

    /// Appends to `out` the status of the range starting at `offset` in the
    /// metadata context `context` (one of [`Storage::meta_contexts`]), with
    /// the same rules as [`Storage::block_status`]: at least one byte and at
    /// most `length` bytes (clamped to the end of the export), adjacent
    /// runs with different statuses.
    ///
    /// The default answers `base:allocation` from
    /// [`Storage::block_status`] and refuses every other context with
    /// `EINVAL` (see [`default_context_status`]).
    fn context_status(&self, context: &str, offset: u64, length: u64, out: &mut Vec<StatusExtent>) -> io::Result<()> {
        default_context_status(self, context, offset, length, out)
    }

    /// The extent that starts at `offset`, as far as the backend can tell
    /// cheaply (it may end before the real end of the extent, never after
    /// the end of the export). Servers use it to learn once that a long run
    /// of data has no holes, instead of asking again for every read.
    /// `scratch` is working space the caller reuses (so nothing is
    /// allocated in steady state).
    ///
    /// The default asks [`Storage::block_status`] about at most 64 MiB.
    fn extent_at(&self, offset: u64, scratch: &mut Vec<Extent>) -> io::Result<Extent> {
        let length = clamp_status_range(self.size(), offset, 64 << 20)?;
        scratch.clear();
        self.block_status(offset, length, scratch)?;
        Ok(scratch.first().copied().unwrap_or(Extent::data(length)))
    }

    /// Reads like [`Storage::read_at`] if that can be done without waiting
    /// (the bytes are in memory, the page cache for a file); `None` means
    /// it would have to wait, and the server then calls `read_at` on its
    /// I/O pool. Servers try this in place first, which spares the pool's
    /// thread hand-offs for reads that hit the cache. The default: `None`.
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        let _ = (buf, offset);
        None
    }

    /// Reads `len` bytes at `offset` by lending them instead of copying:
    /// appends pieces (which together hold exactly those bytes, in order)
    /// to `out` and returns `Ok(true)`, or returns `Ok(false)` having
    /// appended nothing when this storage cannot lend (then the caller uses
    /// [`Storage::read_at`]). Servers send the pieces straight to the
    /// socket. A storage that lends must keep what it lent unchanged (a
    /// later write copies first), so a reply is the data at the time of the
    /// read. On an error, pieces may have been appended. The default:
    /// `Ok(false)`.
    fn read_shared(&self, offset: u64, len: usize, out: &mut Vec<SharedBytes>) -> io::Result<bool> {
        let _ = (offset, len, out);
        Ok(false)
    }

    /// Writes like [`Storage::write_at`] (without FUA) if that can be done
    /// without waiting; `None` means it would wait (and nothing was
    /// written). The default: `None`.
    fn try_write_at(&self, buf: &[u8], offset: u64) -> Option<io::Result<()>> {
        let _ = (buf, offset);
        None
    }

    /// How a server finds the holes of a READ it sends sparsely (as
    /// `NBD_REPLY_TYPE_OFFSET_HOLE` chunks). The default,
    /// [`SparseReads::BlockStatus`], asks [`Storage::extent_at`] and
    /// [`Storage::block_status`], which suits backends that keep their own
    /// map of what is allocated (memory, images).
    fn sparse_reads(&self) -> SparseReads {
        SparseReads::BlockStatus
    }

    /// Whether every call returns without waiting on anything (no I/O, no
    /// lock held across I/O): then the servers call it in place, on the
    /// thread that reads the connection, instead of on the I/O pool. The
    /// default, `false`, is right for anything that touches a disk or the
    /// network.
    fn never_blocks(&self) -> bool {
        false
    }
}

/// How a server finds the holes of a READ it sends sparsely
/// ([`Storage::sparse_reads`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SparseReads {
    /// From the backend's allocation map ([`Storage::extent_at`],
    /// [`Storage::block_status`]): holes are not read at all.
    BlockStatus,
    /// From the bytes read: the whole range is read and runs of all-zero
    /// blocks (`nbd_server::HOLE_GRAIN` bytes, aligned to the export's
    /// offsets) are sent as holes. The cost is that of the read, whatever
    /// the size of the export: for backends whose hole lookups can cost in
    /// proportion to the file (on tmpfs, `lseek(SEEK_DATA)` walks the page
    /// cache from the offset to the next data, which in a fallocated but
    /// unwritten file is its end).
    Contents,
    /// One extent lookup first ([`Storage::extent_at`] at the read's
    /// offset): a read that lies in a hole is sent as a hole without being
    /// read; any other is read whole and its holes found in its bytes, as
    /// with [`SparseReads::Contents`]. For backends whose lookup from an
    /// offset is cheap but whose maps can be fragmented (a file with
    /// unwritten extents that were partly read: each cached page of one is
    /// data to `lseek(SEEK_DATA)`).
    ContentsUnlessHole,
}

/// Storage that is asynchronous by nature (a network block store with its
/// own completion callbacks, say): each operation is started and returns at
/// once, and reports its end through the [`Completion`] it was given,
/// from any thread. The servers never block a thread per request on it.
///
/// Buffers move into the storage and back through the completion, so the
/// storage needs no copies and no lifetimes: a READ's `buf` has exactly the
/// request's length and comes back filled
/// ([`Completion::complete_read`]); a WRITE's comes back for reuse
/// ([`Completion::complete_write`]).
///
/// Like [`Storage`], implementations must refuse out-of-range requests and
/// modifications of read-only exports with an error rather than panic.
pub trait AsyncStorage: Send + Sync {
    /// Size of the export in bytes.
    fn size(&self) -> u64;

    /// What the export supports.
    fn capabilities(&self) -> Capabilities;

    /// Reads `buf.len()` bytes at `offset` into `buf`; ends with
    /// [`Completion::complete_read`].
    fn read(&self, offset: u64, buf: Vec<u8>, done: Completion);

    /// Writes all of `buf` at `offset` (durably before completing with
    /// `fua`); ends with [`Completion::complete_write`].
    fn write(&self, offset: u64, buf: Vec<u8>, fua: bool, done: Completion);

    /// Makes every completed write durable; ends with
    /// [`Completion::complete`].
    fn flush(&self, done: Completion);

    /// As [`Storage::trim`]; ends with [`Completion::complete`].
    fn trim(&self, offset: u64, length: u64, fua: bool, done: Completion);

    /// As [`Storage::write_zeroes`]; ends with [`Completion::complete`].
    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags, done: Completion);

    /// As [`Storage::cache`]; the default completes at once.
    fn cache(&self, offset: u64, length: u64, done: Completion) {
        done.complete(check_range(self.size(), offset, length));
    }

    /// The allocation status (`base:allocation`) of the range, as
    /// [`Storage::block_status`] describes it; ends with
    /// [`Completion::complete_status`]. The default reports data.
    fn block_status(&self, offset: u64, length: u64, done: Completion) {
        match clamp_status_range(self.size(), offset, length) {
            Ok(length) => done.complete_status(&[Extent::data(length)], Ok(())),
            Err(e) => done.complete_status(&[], Err(e)),
        }
    }
}

/// What [`Storage::context_status`] does by default: `base:allocation`
/// from [`Storage::block_status`] (its flags as the status), `EINVAL` for
/// any other context.
pub fn default_context_status<S: Storage + ?Sized>(
    storage: &S,
    context: &str,
    offset: u64,
    length: u64,
    out: &mut Vec<StatusExtent>,
) -> io::Result<()> {
    if context != nbd_proto::wire::CONTEXT_BASE_ALLOCATION {
        // Not offered by this export.
        return Err(errno_error(libc::EINVAL));
    }
    let mut extents = Vec::new();
    storage.block_status(offset, length, &mut extents)?;
    out.extend(extents.iter().map(|e| StatusExtent {
        length: e.length,
        status: e.flags.bits(),
    }));
    Ok(())
}

/// Size of the zero buffer used when zeroes have to be written out
/// explicitly (1 MiB).
pub const ZERO_CHUNK: usize = 1 << 20;

/// An [`io::Error`] carrying `errno`.
pub fn errno_error(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

/// The error a backend returns when a fast zero
/// ([`ZeroFlags::fast`]) cannot be done quickly: `EOPNOTSUPP`.
pub fn fast_zero_unsupported() -> io::Error {
    errno_error(libc::EOPNOTSUPP)
}

/// Checks that `offset..offset + length` lies inside an export of `size`
/// bytes, without overflowing; `EINVAL` otherwise. A zero `length` at any
/// offset up to `size` is accepted.
pub fn check_range(size: u64, offset: u64, length: u64) -> io::Result<()> {
    match offset.checked_add(length) {
        Some(end) if end <= size => Ok(()),
        _ => Err(errno_error(libc::EINVAL)),
    }
}

/// [`check_range`] plus a read-only check (`EPERM`), for modifying commands.
fn check_writable_range<S: Storage + ?Sized>(storage: &S, offset: u64, length: u64) -> io::Result<()> {
    if storage.capabilities().read_only {
        return Err(errno_error(libc::EPERM));
    }
    check_range(storage.size(), offset, length)
}

/// Validates a block-status request and returns the length clamped to the
/// end of the export: `offset` must be inside the export and `length`
/// non-zero, otherwise `EINVAL`.
pub(crate) fn clamp_status_range(size: u64, offset: u64, length: u64) -> io::Result<u64> {
    if length == 0 || offset >= size {
        return Err(errno_error(libc::EINVAL));
    }
    Ok(length.min(size - offset))
}

/// Appends an extent to `out`, merging it into the previous one if that one
/// was appended by the same call (index `>= first`) and has equal flags.
pub(crate) fn push_extent(out: &mut Vec<Extent>, first: usize, extent: Extent) {
    if extent.length == 0 {
        return;
    }
    if out.len() > first
        && let Some(last) = out.last_mut()
        && last.flags == extent.flags
    {
        last.length = last.length.saturating_add(extent.length);
        return;
    }
    out.push(extent);
}

/// Writes `length` zero bytes starting at `offset` through `write`, in
/// buffers of at most [`ZERO_CHUNK`] bytes (one buffer allocated per call).
pub(crate) fn write_zero_buffers(
    offset: u64,
    length: u64,
    mut write: impl FnMut(&[u8], u64) -> io::Result<()>,
) -> io::Result<()> {
    if length == 0 {
        return Ok(());
    }
    let chunk = usize::try_from(length).unwrap_or(usize::MAX).min(ZERO_CHUNK);
    let zeroes = vec![0u8; chunk];
    let mut done = 0u64;
    while done < length {
        let n = usize::try_from(length - done).unwrap_or(usize::MAX).min(chunk);
        write(&zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_checks() {
        assert!(check_range(10, 0, 10).is_ok());
        assert!(check_range(10, 10, 0).is_ok());
        assert_eq!(check_range(10, 5, 6).unwrap_err().raw_os_error(), Some(libc::EINVAL));
        assert_eq!(
            check_range(10, u64::MAX, 2).unwrap_err().raw_os_error(),
            Some(libc::EINVAL)
        );
        assert_eq!(clamp_status_range(10, 4, 100).unwrap(), 6);
        assert!(clamp_status_range(10, 10, 1).is_err());
        assert!(clamp_status_range(10, 0, 0).is_err());
    }

    #[test]
    fn push_extent_merges_only_new_extents() {
        let mut out = vec![Extent::data(5)];
        push_extent(&mut out, 1, Extent::data(3));
        push_extent(&mut out, 1, Extent::data(4));
        push_extent(&mut out, 1, Extent::hole(0));
        push_extent(&mut out, 1, Extent::hole(2));
        assert_eq!(out, vec![Extent::data(5), Extent::data(7), Extent::hole(2)]);
    }

    /// A backend relying on every provided method.
    struct Minimal(std::sync::Mutex<Vec<u8>>);

    impl Storage for Minimal {
        fn size(&self) -> u64 {
            self.0.lock().unwrap().len() as u64
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::default()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            check_range(self.size(), offset, buf.len() as u64)?;
            let o = offset as usize;
            buf.copy_from_slice(&self.0.lock().unwrap()[o..o + buf.len()]);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64, _fua: bool) -> io::Result<()> {
            check_range(self.size(), offset, buf.len() as u64)?;
            let o = offset as usize;
            self.0.lock().unwrap()[o..o + buf.len()].copy_from_slice(buf);
            Ok(())
        }
    }

    #[test]
    fn provided_methods() {
        let len = 3 * ZERO_CHUNK + 17;
        let s: std::sync::Arc<dyn Storage> = std::sync::Arc::new(Minimal(std::sync::Mutex::new(vec![0xaa; len])));
        let fast = ZeroFlags {
            fast: true,
            ..ZeroFlags::default()
        };
        assert_eq!(
            s.write_zeroes(0, 10, fast).unwrap_err().raw_os_error(),
            Some(libc::EOPNOTSUPP)
        );
        s.write_zeroes(1, len as u64 - 2, ZeroFlags::default()).unwrap();
        let mut buf = vec![1u8; len];
        s.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf[0], 0xaa);
        assert_eq!(buf[len - 1], 0xaa);
        assert!(buf[1..len - 1].iter().all(|&b| b == 0));
        let mut out = Vec::new();
        s.block_status(7, u64::MAX, &mut out).unwrap();
        assert_eq!(out, vec![Extent::data(len as u64 - 7)]);
        assert!(s.trim(0, len as u64 + 1, false).is_err());
        s.trim(0, len as u64, false).unwrap();
        s.flush().unwrap();
        s.cache(0, 1).unwrap();
    }
}
