//! The copying engine behind `nbd-copy`: sparse-aware, parallel copies
//! between NBD exports, local files or block devices, `null:`, and
//! streams (stdin, stdout, pipes, sockets, character devices); and from
//! disks on web servers (`http://`, `https://`, read with range requests
//! through [`nbd_storage::http::HttpStorage`]).
//!
//! The source is walked with block status (`base:allocation` over NBD,
//! SEEK_DATA/SEEK_HOLE for files; not with [`CopyOptions::extents`]
//! off); holes and zero extents are never read and become WRITE_ZEROES
//! (or holes, or nothing when the destination is known to be zero) on the
//! destination, as do requests whose data is all zeroes. Data is copied by
//! `connections × requests` workers, each with one reusable buffer, so the
//! copy allocates nothing per request. With [`CopyOptions::allocated`]
//! zeroes are written allocated instead of as holes.
//!
//! A stream is read or written in order, with reads of the other side
//! running ahead in parallel (see the `stream` submodule); its size is
//! what it holds when it ends.
//!
//! With [`CopyOptions::dirty_bitmap`], the copy is incremental, as backup
//! tools make them from a QEMU dirty bitmap: the source (an NBD export)
//! must offer the `qemu:dirty-bitmap:NAME` context, negotiated with
//! `base:allocation`; only the extents it marks dirty are copied (their
//! holes and zero extents as WRITE_ZEROES, so the destination ends equal
//! to the source), onto a destination that already exists and is at
//! least the source's size. The destination is never created, truncated
//! or resized, and nothing outside the dirty extents is written. The
//! progress total is the dirty bytes.
//!
//! With [`CopyOptions::blkhash`] (random-access sides only, not with a
//! dirty bitmap), the copy also computes the source's blkhash (see
//! [`crate::blkhash`]) as it goes: the planner cuts the work on block
//! boundaries (a block that is partly a hole is read whole), the workers
//! hash the blocks they read (on the blocking thread pool, in parallel)
//! and hand holes and zero extents over as zero blocks, never read; a
//! [`Combiner`] puts the runs in order, and a worker waits for new work
//! only when [`Combiner::PENDING_LIMIT`] runs wait for a slower one.

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use nbd_proto::client::ClientConfig;
use nbd_proto::uri::NbdUri;
use nbd_proto::wire::{
    AllocationFlags, CONTEXT_BASE_ALLOCATION, CONTEXT_QEMU_DIRTY_BITMAP_PREFIX, CommandFlags, TransmissionFlags,
};
use nbd_storage::http::{HttpLayers, HttpOptions, HttpStorage, is_http_url};
use nbd_storage::image::remote;
use nbd_storage::image::{ImageFormat, ImageOptions};
use nbd_storage::{FileStorage, Storage, ZeroFlags};
use smol::lock::Mutex;

use crate::blkhash::{BlkhashSpec, Combiner, Run};

use nbd_smol::client::{ConnectOptions, Reconnect, Timeouts};
use nbd_smol::pool::Pool;

mod stream;

/// The error of a copy whose stream destination was closed by its reader
/// (`EPIPE`, e.g. `nbd-copy URI - | head -c 512`): nbd-copy then ends as
/// the other programs of a pipeline do, by SIGPIPE, without a message.
pub const BROKEN_PIPE: &str = "the destination stream was closed by its reader (broken pipe)";

/// One side of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// An NBD URI.
    Nbd(NbdUri),
    /// A local file or block device; or anything else that can be opened
    /// (a pipe, a FIFO, a character device), which is then a stream.
    File(PathBuf),
    /// `-`: stdin as the source, stdout as the destination (random access
    /// when it is a regular file, a stream otherwise).
    Stdio,
    /// `null:`: discard everything (destination only).
    Null,
    /// An `http://` or `https://` URL: a disk on a web server, read with
    /// range requests (source only).
    Http(String),
}

impl Location {
    /// Parses a command-line argument: `null:`, `-`, an `http://` or
    /// `https://` URL, an NBD URI (anything else with `://`), or a path.
    pub fn parse(s: &str) -> Result<Location, String> {
        if s == "null:" {
            return Ok(Location::Null);
        }
        if s == "-" {
            return Ok(Location::Stdio);
        }
        if is_http_url(s) {
            return Ok(Location::Http(s.to_string()));
        }
        if s.contains("://") {
            return NbdUri::parse(s).map(Location::Nbd).map_err(|e| format!("{s}: {e}"));
        }
        Ok(Location::File(PathBuf::from(s)))
    }
}

/// How to copy.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// Connections per NBD side (used when the server allows multi-conn).
    pub connections: usize,
    /// Requests in flight per connection.
    pub requests: usize,
    /// Bytes per request.
    pub request_size: usize,
    /// The destination already reads as zeroes: zero extents are skipped.
    pub destination_is_zero: bool,
    /// Flush the destination at the end.
    pub flush: bool,
    /// Write zeroes allocated (NBD_CMD_FLAG_NO_HOLE, zeroing a file's
    /// range without punching a hole) rather than as holes; a fresh file
    /// is then not taken to be zero already (nbdcopy's `--allocated`).
    pub allocated: bool,
    /// Walk the source's allocation map (default); off, everything is
    /// read (nbdcopy's `--no-extents`).
    pub extents: bool,
    /// Deadlines of the NBD connections.
    pub timeouts: Timeouts,
    /// Reconnection of the NBD connections when they break (the copy goes
    /// on across a restart of a server; see `nbd_net::resilience` for
    /// what is sent again).
    pub reconnect: Option<Reconnect>,
    /// How an `http://` or `https://` source is read.
    pub http: HttpOptions,
    /// The format of an `http://` or `https://` source; `None` probes it
    /// (a qcow2 image is copied as its guest disk, with its backing chain
    /// from the same server; a format that cannot be read is refused).
    pub format: Option<ImageFormat>,
    /// Copy only the extents this metadata context (a QEMU dirty bitmap,
    /// `qemu:dirty-bitmap:NAME`; see [`dirty_bitmap_context`]) marks dirty
    /// (status bit 0), onto an existing destination: an incremental
    /// backup.
    pub dirty_bitmap: Option<String>,
    /// Compute the source's blkhash while copying (see
    /// [`copy_hashed`]).
    pub blkhash: Option<BlkhashSpec>,
}

/// The metadata context of a dirty bitmap given as `NAME` or as the full
/// `qemu:dirty-bitmap:NAME`.
pub fn dirty_bitmap_context(name: &str) -> Result<String, String> {
    let bare = name.strip_prefix(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX).unwrap_or(name);
    if bare.is_empty() {
        return Err("--dirty-bitmap: the bitmap name is empty".into());
    }
    Ok(format!("{CONTEXT_QEMU_DIRTY_BITMAP_PREFIX}{bare}"))
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            connections: 4,
            requests: 64,
            request_size: 256 * 1024,
            destination_is_zero: false,
            flush: false,
            allocated: false,
            extents: true,
            timeouts: Timeouts::default(),
            reconnect: None,
            dirty_bitmap: None,
            http: HttpOptions::default(),
            format: None,
            blkhash: None,
        }
    }
}

/// Live counters of a copy, for progress reporting.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes of the source dealt with (copied or zeroed).
    pub done: AtomicU64,
    /// Size of the source.
    pub total: AtomicU64,
    /// Bytes actually read and written (data, not zeroes).
    pub data: AtomicU64,
    /// Connections re-established after a break (both sides, once a copy
    /// between random-access sides ended).
    pub reconnects: AtomicU64,
    /// Requests sent again after a reconnect (likewise).
    pub resent: AtomicU64,
}

enum Side {
    Nbd(Pool),
    /// Random-access storage read or written in place (a file, a block
    /// device, an HTTP source); with `true`, a file this copy created.
    File(Arc<dyn Storage>, bool),
    Null,
}

impl Side {
    fn size(&self) -> Option<u64> {
        match self {
            Side::Nbd(p) => Some(p.size()),
            Side::File(f, _) => Some(f.size()),
            Side::Null => None,
        }
    }
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

async fn open_nbd(uri: &NbdUri, opts: &CopyOptions, contexts: Vec<String>) -> Result<Pool, String> {
    let config = ClientConfig::default()
        .meta_contexts(contexts)
        .max_in_flight(opts.requests.max(1));
    let connect = ConnectOptions::default()
        .timeouts(opts.timeouts)
        .reconnect(opts.reconnect)
        .tls(None);
    Pool::connect_with(uri, config, opts.connections, &connect)
        .await
        .map_err(|e| format!("{}: {e}", uri.to_uri_string()))
}

/// What the planner hands a worker.
#[derive(Debug, Clone, Copy)]
enum Work {
    Data { offset: u64, length: u64 },
    Zero { offset: u64, length: u64 },
}

/// Walks the source's allocation map ahead of the workers.
struct Planner {
    next_offset: u64,
    size: u64,
    queue: VecDeque<Work>,
    request_size: u64,
    /// Walk the allocation map ([`CopyOptions::extents`]).
    extents: bool,
    /// Copy only what this context marks dirty
    /// ([`CopyOptions::dirty_bitmap`]).
    dirty: Option<String>,
    /// Cut the work on boundaries of blocks of this size (for
    /// [`CopyOptions::blkhash`]).
    block: Option<u64>,
}

/// Zero extents are sent in pieces no larger than this.
const ZERO_PIECE: u64 = 1 << 30;
/// How much of a local source one SEEK_DATA/SEEK_HOLE walk covers.
const STATUS_WINDOW: u64 = 1 << 30;

impl Planner {
    async fn refill(&mut self, src: &Side) -> Result<(), String> {
        if self.next_offset >= self.size {
            return Ok(());
        }
        if let (Some(ctx), Side::Nbd(p)) = (&self.dirty, src) {
            return self.refill_dirty(p, &ctx.clone()).await;
        }
        let start = self.next_offset;
        // One query covers as much as the protocol lets it: the rest of the
        // export with extended headers, else what 32 bits can describe.
        let limit = match src {
            Side::Nbd(p) if p.negotiated().mode.extended() => u64::MAX,
            Side::Nbd(p) => {
                let min = p.negotiated().constraints().minimum.max(1) as u64;
                (u32::MAX as u64 / min) * min
            }
            _ => STATUS_WINDOW,
        };
        let window = (self.size - start).min(limit);
        let mut extents: Vec<(u64, bool)> = Vec::new();
        match src {
            _ if !self.extents => extents.push((window.min(STATUS_WINDOW), false)),
            Side::Nbd(p) if p.negotiated().context_id(CONTEXT_BASE_ALLOCATION).is_some() => {
                let id = p.negotiated().context_id(CONTEXT_BASE_ALLOCATION).unwrap_or(0);
                let st = p
                    .block_status(start, window, CommandFlags::empty())
                    .await
                    .map_err(err)?;
                let zero = u64::from(AllocationFlags::ZERO.bits());
                for s in st.into_iter().filter(|s| s.context_id == id) {
                    extents.extend(s.extents.iter().map(|e| (e.length, e.flags & zero != 0)));
                }
            }
            Side::File(f, _) => {
                let f = f.clone();
                let mut out = Vec::new();
                let out = smol::unblock(move || f.block_status(start, window, &mut out).map(|_| out))
                    .await
                    .map_err(err)?;
                extents.extend(out.iter().map(|e| (e.length, e.flags.contains(AllocationFlags::ZERO))));
            }
            _ => extents.push((window, false)),
        }
        if extents.is_empty() {
            extents.push((window, false));
        }
        if let Some(bs) = self.block {
            let (runs, cut) = block_runs(start, &extents, bs, self.size);
            for (o, end, zero) in runs {
                self.push(o, end, zero);
            }
            self.next_offset = cut;
            return Ok(());
        }
        let mut off = start;
        for (len, zero) in extents {
            let len = len.min(self.size - off);
            if len == 0 {
                break;
            }
            let end = off + len;
            self.push(off, end, zero);
            off = end;
        }
        self.next_offset = off.max(start + 1).min(self.size);
        Ok(())
    }
}

/// The extents `(length, zero)` of a window at `start` (block-aligned)
/// as runs `(offset, end, zero)` cut on boundaries of blocks of `bs`
/// bytes, for hashing: a zero run covers whole blocks only (or ends at
/// `size`), what a block holds besides zeroes makes it data. Runs stop at
/// the returned offset, the last block boundary the extents reach (or
/// `size`); an answer shorter than a block makes that block data.
fn block_runs(start: u64, extents: &[(u64, bool)], bs: u64, size: u64) -> (Vec<(u64, u64, bool)>, u64) {
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    let mut add = |o: u64, e: u64, zero: bool| {
        if o >= e {
            return;
        }
        match runs.last_mut() {
            Some(last) if last.1 == o && last.2 == zero => last.1 = e,
            _ => runs.push((o, e, zero)),
        }
    };
    let mut off = start;
    for &(len, zero) in extents {
        let end = off + len.min(size - off);
        if end == off {
            break;
        }
        let (a, b) = (off.div_ceil(bs) * bs, if end == size { end } else { end / bs * bs });
        if zero && a < b {
            add(off, a, false);
            add(a, b, true);
            add(b, end, false);
        } else {
            add(off, end, false);
        }
        off = end;
    }
    let mut cut = if off == size { off } else { off / bs * bs };
    if cut <= start {
        cut = (start + bs).min(size);
        add(off, cut, false);
    }
    runs.retain_mut(|r| {
        r.1 = r.1.min(cut);
        r.0 < r.1
    });
    (runs, cut)
}

/// The largest window one block-status query may cover on `p`: the rest
/// of the export with extended headers, else what 32 bits can describe.
fn status_limit(p: &Pool) -> u64 {
    if p.negotiated().mode.extended() {
        u64::MAX
    } else {
        let min = p.negotiated().constraints().minimum.max(1) as u64;
        (u32::MAX as u64 / min) * min
    }
}

/// One run of a dirty-bitmap walk: its length, whether the bitmap marks
/// it dirty, whether `base:allocation` says it reads as zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DirtyRun {
    length: u64,
    dirty: bool,
    zero: bool,
}

/// The dirty bitmap `ctx` and the allocation map (if negotiated) of
/// `window` bytes at `start`, merged into runs. They cover what both
/// contexts' answers cover (a server may answer for less than asked, and
/// for less with one context than the other); never nothing.
async fn dirty_runs(p: &Pool, ctx: &str, start: u64, window: u64) -> Result<Vec<DirtyRun>, String> {
    let neg = p.negotiated();
    let dirty_id = neg
        .context_id(ctx)
        .ok_or_else(|| format!("the context {ctx} was not negotiated"))?;
    let alloc_id = neg.context_id(CONTEXT_BASE_ALLOCATION);
    let st = p
        .block_status(start, window, CommandFlags::empty())
        .await
        .map_err(|e| format!("block status at {start}: {e}"))?;
    let mut dirty: Vec<(u64, bool)> = Vec::new();
    let mut zero: Vec<(u64, bool)> = Vec::new();
    let zero_bit = u64::from(AllocationFlags::ZERO.bits());
    for s in &st {
        if s.context_id == dirty_id {
            dirty.extend(s.extents.iter().map(|e| (e.length, e.flags & 1 != 0)));
        } else if Some(s.context_id) == alloc_id {
            zero.extend(s.extents.iter().map(|e| (e.length, e.flags & zero_bit != 0)));
        }
    }
    if alloc_id.is_none() {
        zero.push((window, false));
    }
    let runs = merge_runs(&dirty, &zero, window);
    if runs.is_empty() {
        return Err(format!(
            "block status at {start}: the server's answer has no extents of {ctx}{}",
            if alloc_id.is_some() { " or base:allocation" } else { "" }
        ));
    }
    Ok(runs)
}

/// Merges the dirty bitmap's extents `(length, dirty)` and the
/// allocation map's `(length, zero)` into runs, over what both cover (at
/// most `window` bytes).
fn merge_runs(dirty: &[(u64, bool)], zero: &[(u64, bool)], window: u64) -> Vec<DirtyRun> {
    let mut runs: Vec<DirtyRun> = Vec::new();
    let (mut a, mut b) = (dirty.iter().copied(), zero.iter().copied());
    let (mut da, mut zb) = (a.next(), b.next());
    let mut covered = 0u64;
    while let (Some((la, fa)), Some((lb, fb))) = (da, zb) {
        let n = la.min(lb).min(window - covered);
        if n == 0 {
            break;
        }
        match runs.last_mut() {
            Some(r) if r.dirty == fa && r.zero == fb => r.length += n,
            _ => runs.push(DirtyRun {
                length: n,
                dirty: fa,
                zero: fb,
            }),
        }
        covered += n;
        da = if la > n { Some((la - n, fa)) } else { a.next() };
        zb = if lb > n { Some((lb - n, fb)) } else { b.next() };
    }
    runs
}

/// The bytes the dirty bitmap `ctx` marks dirty in the whole export (the
/// progress total of an incremental copy).
async fn dirty_bytes(p: &Pool, ctx: &str) -> Result<u64, String> {
    let size = p.size();
    let mut off = 0;
    let mut total = 0;
    while off < size {
        let window = (size - off).min(status_limit(p));
        for r in dirty_runs(p, ctx, off, window).await? {
            if r.dirty {
                total += r.length;
            }
            off += r.length;
        }
    }
    Ok(total)
}

impl Planner {
    /// Queues the dirty runs of the next window; clean ones are skipped.
    async fn refill_dirty(&mut self, p: &Pool, ctx: &str) -> Result<(), String> {
        let start = self.next_offset;
        let window = (self.size - start).min(status_limit(p));
        let mut off = start;
        for r in dirty_runs(p, ctx, start, window).await? {
            let end = off + r.length;
            if r.dirty {
                self.push(off, end, r.zero);
            }
            off = end;
        }
        self.next_offset = off.min(self.size);
        Ok(())
    }

    /// Queues `off..end` as zeroes or data, in pieces.
    fn push(&mut self, off: u64, end: u64, zero: bool) {
        let zero_piece = match self.block {
            Some(bs) => ZERO_PIECE / bs * bs,
            None => ZERO_PIECE,
        };
        let mut o = off;
        while o < end {
            let piece = if zero {
                (end - o).min(zero_piece)
            } else {
                (end - o).min(self.request_size)
            };
            self.queue.push_back(if zero {
                Work::Zero {
                    offset: o,
                    length: piece,
                }
            } else {
                Work::Data {
                    offset: o,
                    length: piece,
                }
            });
            o += piece;
        }
    }
}

/// Copies `src` to `dst`; returns the number of bytes copied (with
/// [`CopyOptions::dirty_bitmap`], the dirty bytes).
pub async fn copy(src: &Location, dst: &Location, opts: &CopyOptions, progress: Arc<Progress>) -> Result<u64, String> {
    copy_hashed(src, dst, opts, progress).await.map(|(n, _)| n)
}

/// Copies `src` to `dst` as [`copy`] does; returns the bytes copied and,
/// with [`CopyOptions::blkhash`], the source's blkhash (its digest
/// bytes; see [`crate::blkhash::hex`]).
pub async fn copy_hashed(
    src: &Location,
    dst: &Location,
    opts: &CopyOptions,
    progress: Arc<Progress>,
) -> Result<(u64, Option<Vec<u8>>), String> {
    if let Some(ctx) = &opts.dirty_bitmap {
        if opts.blkhash.is_some() {
            return Err(
                "--blkhash and --dirty-bitmap cannot go together: an incremental copy reads only \
                        the dirty extents"
                    .into(),
            );
        }
        return copy_dirty(src, dst, ctx, opts, progress).await.map(|n| (n, None));
    }
    let stream_refused = "--blkhash needs a random-access source and destination (an NBD export, a file, \
                          a block device or null:), not a stream";
    let src_side = match open_source(src, opts).await? {
        Source::Random(side) => side,
        Source::Stream(_) if opts.blkhash.is_some() => return Err(stream_refused.into()),
        Source::Stream(input) => return stream::from_stream(input, dst, opts, progress).await.map(|n| (n, None)),
    };
    if let Some(output) = stream::stream_destination(dst)? {
        if opts.blkhash.is_some() {
            return Err(stream_refused.into());
        }
        return stream::to_stream(src_side, output, opts, progress)
            .await
            .map(|n| (n, None));
    }
    let size = src_side.size().unwrap_or(0);
    let dst_side = open_destination(dst, opts, size).await?;
    let dst_is_zero = destination_is_zero(&dst_side, opts);
    progress.total.store(size, Ordering::Relaxed);
    let hash = opts.blkhash.map(|spec| Arc::new(Combiner::new(spec, size)));
    let n = run_workers(
        src_side,
        dst_side,
        dst_is_zero,
        Planner::new(size, opts),
        opts,
        progress,
        hash.clone(),
    )
    .await?;
    let md = hash.map(|h| h.finish()).transpose()?;
    Ok((n, md))
}

/// An incremental copy: what the dirty bitmap `ctx` marks dirty, from an
/// NBD source onto an existing destination (see the module docs).
async fn copy_dirty(
    src: &Location,
    dst: &Location,
    ctx: &str,
    opts: &CopyOptions,
    progress: Arc<Progress>,
) -> Result<u64, String> {
    let uri = match src {
        Location::Nbd(u) => u,
        _ => return Err("--dirty-bitmap: the source must be an NBD export (a URI or [ CMD ARGS ... ])".into()),
    };
    match dst {
        Location::Stdio => {
            return Err(
                "--dirty-bitmap: the destination must be an existing file, block device or NBD export, not -".into(),
            );
        }
        Location::Http(url) => return Err(http_destination(url)),
        Location::Nbd(_) | Location::File(_) | Location::Null => {}
    }
    let mut contexts = Vec::new();
    if opts.extents {
        contexts.push(CONTEXT_BASE_ALLOCATION.to_string());
    }
    contexts.push(ctx.to_string());
    let pool = open_nbd(uri, opts, contexts).await?;
    let bitmap = ctx.strip_prefix(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX).unwrap_or(ctx);
    if pool.negotiated().context_id(ctx).is_none() {
        let export = pool.negotiated().export_name.clone();
        let _ = pool.disconnect().await;
        return Err(format!(
            "{}: export {export:?} has no dirty bitmap {bitmap:?} (the server does not offer the metadata context {ctx})",
            uri.to_uri_string()
        ));
    }
    let size = pool.size();
    let src_side = Side::Nbd(pool);
    let dst_side = match dst {
        Location::File(p) => Side::File(Arc::new(open_existing_file(p, size)?), false),
        Location::Null => Side::Null,
        _ => open_destination(dst, opts, size).await?,
    };
    let total = match &src_side {
        Side::Nbd(p) => dirty_bytes(p, ctx).await?,
        _ => 0,
    };
    progress.total.store(total, Ordering::Relaxed);
    let mut planner = Planner::new(size, opts);
    planner.dirty = Some(ctx.to_string());
    run_workers(src_side, dst_side, false, planner, opts, progress, None).await
}

/// Opens an existing file or block device of at least `size` bytes for
/// writing, as it is: never created, truncated or resized.
fn open_existing_file(p: &PathBuf, size: u64) -> Result<FileStorage, String> {
    let ctx = |e: io::Error| format!("{}: {e}", p.display());
    let m = std::fs::metadata(p).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            format!(
                "{}: the destination does not exist (--dirty-bitmap writes onto an existing copy)",
                p.display()
            )
        } else {
            ctx(e)
        }
    })?;
    use std::os::unix::fs::FileTypeExt;
    let kind = m.file_type();
    if !kind.is_file() && !kind.is_block_device() {
        return Err(format!(
            "{}: --dirty-bitmap needs a file or block device as the destination, not a stream",
            p.display()
        ));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .map_err(ctx)?;
    let f = FileStorage::from_file(f, false).map_err(ctx)?;
    if f.size() < size {
        return Err(format!(
            "{}: the destination ({} bytes) is smaller than the source ({size} bytes)",
            p.display(),
            f.size()
        ));
    }
    Ok(f)
}

/// Runs the workers of a copy between random-access sides, `planner`
/// saying what to copy; returns the bytes dealt with.
async fn run_workers(
    src_side: Side,
    dst_side: Side,
    dst_is_zero: bool,
    planner: Planner,
    opts: &CopyOptions,
    progress: Arc<Progress>,
    hash: Option<Arc<Combiner>>,
) -> Result<u64, String> {
    let planner = Mutex::new(planner);
    let workers = match (&src_side, &dst_side) {
        (Side::Nbd(p), _) | (_, Side::Nbd(p)) => p.clients().len() * opts.requests.max(1),
        _ => opts.requests.max(1),
    };
    let shared = Arc::new(Shared {
        src: src_side,
        dst: dst_side,
        planner,
        failed: AtomicBool::new(false),
        first_error: std::sync::Mutex::new(None),
        dst_is_zero,
        allocated: opts.allocated,
        progress: progress.clone(),
        hash,
    });
    // The workers run as tasks beside the connections' reader and writer
    // tasks, so a copy with one executor thread wakes no other thread.
    let tasks: Vec<smol::Task<()>> = (0..workers)
        .map(|_| {
            let shared = shared.clone();
            let bufsize = opts.request_size;
            smol::spawn(async move {
                if let Err(e) = worker(&shared, bufsize).await {
                    shared.failed.store(true, Ordering::SeqCst);
                    let mut g = shared.first_error.lock().unwrap_or_else(|p| p.into_inner());
                    g.get_or_insert(e);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await;
    }
    for side in [&shared.src, &shared.dst] {
        if let Side::Nbd(p) = side {
            let st = p.stats();
            progress.reconnects.fetch_add(st.reconnects, Ordering::Relaxed);
            progress.resent.fetch_add(st.resent, Ordering::Relaxed);
        }
    }
    if let Some(e) = shared.first_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(e);
    }
    finish(&shared.src, &shared.dst, opts).await?;
    Ok(progress.done.load(Ordering::Relaxed))
}

/// The source, opened: random access, or a stream.
enum Source {
    Random(Side),
    Stream(stream::StreamIn),
}

async fn open_source(src: &Location, opts: &CopyOptions) -> Result<Source, String> {
    Ok(match src {
        Location::Nbd(u) => {
            let contexts = if opts.extents {
                vec![CONTEXT_BASE_ALLOCATION.to_string()]
            } else {
                Vec::new()
            };
            Source::Random(Side::Nbd(open_nbd(u, opts, contexts).await?))
        }
        Location::File(p) => {
            let name = p.display().to_string();
            let f = std::fs::File::open(p).map_err(|e| format!("{name}: {e}"))?;
            random_or_stream(f, name, true)?
        }
        Location::Stdio => random_or_stream(stream::dup_stdio(0, "stdin")?, "stdin".into(), true)?,
        Location::Null => return Err("null: can only be a destination".into()),
        Location::Http(url) => {
            let (url, http, format) = (url.clone(), opts.http.clone(), opts.format);
            let s = smol::unblock(move || open_http_source(&url, &http, format))
                .await
                .map_err(err)?;
            Source::Random(Side::File(s, false))
        }
    })
}

/// Opens an `http://` or `https://` source in `format` (`None`: probed):
/// a qcow2 image as its guest disk (read-only, its backing chain from the
/// same server), anything else as raw bytes.
fn open_http_source(url: &str, http: &HttpOptions, format: Option<ImageFormat>) -> io::Result<Arc<dyn Storage>> {
    let s: Arc<dyn Storage> = Arc::new(HttpStorage::open_with(url, http)?);
    if remote::probe_storage(s.as_ref(), url, format)? == ImageFormat::Qcow2 {
        let options = ImageOptions {
            read_only: true,
            ..ImageOptions::default()
        };
        let image = remote::open_qcow2(s, url, &HttpLayers::new(http.clone()), &options)?;
        return Ok(Arc::new(image));
    }
    Ok(s)
}

/// A regular file or a block device is read at random; anything else in
/// order.
fn random_or_stream(f: std::fs::File, name: String, read_only: bool) -> Result<Source, String> {
    let kind = f.metadata().map_err(|e| format!("{name}: {e}"))?.file_type();
    use std::os::unix::fs::FileTypeExt;
    if kind.is_file() || kind.is_block_device() {
        let f = FileStorage::from_file(f, read_only).map_err(|e| format!("{name}: {e}"))?;
        return Ok(Source::Random(Side::File(Arc::new(f), false)));
    }
    if kind.is_dir() {
        return Err(format!("{name}: is a directory"));
    }
    Ok(Source::Stream(stream::StreamIn::new(f, name)))
}

/// Opens a random-access destination for a source of `size` bytes.
async fn open_destination(dst: &Location, opts: &CopyOptions, size: u64) -> Result<Side, String> {
    Ok(match dst {
        Location::Nbd(u) => {
            let p = open_nbd(u, opts, Vec::new()).await?;
            if p.flags().contains(TransmissionFlags::READ_ONLY) {
                return Err(format!("{}: the destination export is read-only", u.to_uri_string()));
            }
            if p.size() < size {
                return Err(format!(
                    "{}: the destination ({} bytes) is smaller than the source ({size} bytes)",
                    u.to_uri_string(),
                    p.size()
                ));
            }
            Side::Nbd(p)
        }
        Location::File(p) => {
            let (f, fresh) = open_destination_file(p, size)?;
            Side::File(Arc::new(f), fresh)
        }
        Location::Stdio => {
            // stream_destination() took stdout unless it is a regular file
            // (or a block device) opened for writing at any offset. A
            // regular file takes the source's size, as a named one does.
            let f = stream::dup_stdio(1, "stdout")?;
            let ctx = |e: io::Error| format!("stdout: {e}");
            let meta = f.metadata().map_err(ctx)?;
            let was_empty = meta.file_type().is_file() && meta.len() == 0;
            if meta.file_type().is_file() {
                f.set_len(size).map_err(ctx)?;
            }
            let f = FileStorage::from_file(f, false).map_err(ctx)?;
            if f.size() < size {
                return Err(format!(
                    "stdout: the destination ({} bytes) is smaller than the source ({size} bytes)",
                    f.size()
                ));
            }
            Side::File(Arc::new(f), was_empty)
        }
        Location::Null => Side::Null,
        Location::Http(url) => return Err(http_destination(url)),
    })
}

/// The error of an HTTP destination.
pub(crate) fn http_destination(url: &str) -> String {
    format!("{url}: an HTTP source is read-only: it cannot be a destination")
}

/// Whether zero extents can be skipped on the destination: it was said to
/// be zero, or it is `null:`, or a file this copy created (unless zeroes
/// are to be written allocated).
fn destination_is_zero(dst: &Side, opts: &CopyOptions) -> bool {
    opts.destination_is_zero || matches!(dst, Side::Null) || (matches!(dst, Side::File(_, true)) && !opts.allocated)
}

impl Planner {
    fn new(size: u64, opts: &CopyOptions) -> Planner {
        Planner {
            next_offset: 0,
            size,
            queue: VecDeque::new(),
            // Hashed requests hold whole blocks.
            request_size: match opts.blkhash {
                Some(h) => (opts.request_size as u64).div_ceil(h.block_size) * h.block_size,
                None => opts.request_size as u64,
            },
            extents: opts.extents,
            dirty: None,
            block: opts.blkhash.map(|h| h.block_size),
        }
    }
}

/// The end of a copy: flush the destination if asked, disconnect.
async fn finish(src: &Side, dst: &Side, opts: &CopyOptions) -> Result<(), String> {
    if opts.flush {
        match dst {
            Side::Nbd(p) if p.flags().contains(TransmissionFlags::SEND_FLUSH) => p.flush().await.map_err(err)?,
            Side::File(f, _) => {
                let f = f.clone();
                smol::unblock(move || f.flush()).await.map_err(err)?
            }
            _ => {}
        }
    }
    if let Side::Nbd(p) = src {
        let _ = p.disconnect().await;
    }
    if let Side::Nbd(p) = dst {
        p.disconnect().await.map_err(err)?;
    }
    Ok(())
}

/// Whether `buf` holds only zeroes.
fn is_zero(buf: &[u8]) -> bool {
    // Blocks of 4 KiB: vectorized comparisons, an early end on data.
    buf.chunks(4096).all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

fn open_destination_file(p: &PathBuf, size: u64) -> Result<(FileStorage, bool), String> {
    let ctx = |e: io::Error| format!("{}: {e}", p.display());
    match std::fs::metadata(p) {
        Ok(m) if m.file_type().is_file() => {
            // Like cp: the destination file takes the source's size. It
            // was not known to be zero, unless it was empty.
            let was_empty = m.len() == 0;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .map_err(ctx)?;
            f.set_len(size).map_err(ctx)?;
            Ok((FileStorage::from_file(f, false).map_err(ctx)?, was_empty))
        }
        Ok(_) => {
            let f = FileStorage::open(p, false).map_err(ctx)?;
            if f.size() < size {
                return Err(format!(
                    "{}: the destination ({} bytes) is smaller than the source ({size} bytes)",
                    p.display(),
                    f.size()
                ));
            }
            Ok((f, false))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((FileStorage::create(p, size).map_err(ctx)?, true)),
        Err(e) => Err(ctx(e)),
    }
}

struct Shared {
    src: Side,
    dst: Side,
    planner: Mutex<Planner>,
    failed: AtomicBool,
    first_error: std::sync::Mutex<Option<String>>,
    dst_is_zero: bool,
    allocated: bool,
    progress: Arc<Progress>,
    /// The blkhash being computed, if asked for.
    hash: Option<Arc<Combiner>>,
}

async fn next_work(s: &Shared) -> Result<Option<Work>, String> {
    let mut p = s.planner.lock().await;
    loop {
        if let Some(w) = p.queue.pop_front() {
            return Ok(Some(w));
        }
        if p.next_offset >= p.size {
            return Ok(None);
        }
        p.refill(&s.src).await?;
    }
}

async fn worker(s: &Shared, bufsize: usize) -> Result<(), String> {
    // Allocated on the first data extent: a worker that only zeroes (or
    // finds nothing to do) costs no memory.
    let mut buf: Vec<u8> = Vec::new();
    while !s.failed.load(Ordering::Relaxed) {
        if let Some(h) = &s.hash {
            h.wait_room().await;
        }
        let Some(w) = next_work(s).await? else {
            return Ok(());
        };
        match w {
            Work::Zero { offset, length } => {
                if !s.dst_is_zero {
                    write_zeroes(&s.dst, offset, length, s.allocated, &mut buf).await?;
                }
                if let Some(h) = &s.hash {
                    h.submit(offset / h.spec().block_size, Run::Zero(length));
                }
                s.progress.done.fetch_add(length, Ordering::Relaxed);
            }
            Work::Data { offset, length } => {
                let len = length as usize;
                if buf.capacity() < bufsize.max(len) {
                    buf.reserve_exact(bufsize.max(len) - buf.len());
                }
                buf.resize(len, 0);
                buf = read(&s.src, offset, buf).await?;
                if let Some(h) = &s.hash {
                    // Hashed on the blocking pool: the workers hash in
                    // parallel whatever the executor's threads.
                    let h = h.clone();
                    buf = smol::unblock(move || {
                        let hashes = h.spec().block_hashes(&buf, h.zero_md());
                        h.submit(offset / h.spec().block_size, Run::Hashes(hashes));
                        buf
                    })
                    .await;
                }
                if !s.allocated && is_zero(&buf) {
                    // Data that reads as zeroes: a hole on the destination.
                    if !s.dst_is_zero {
                        write_zeroes(&s.dst, offset, length, false, &mut buf).await?;
                    }
                } else {
                    buf = write(&s.dst, offset, buf).await?;
                    s.progress.data.fetch_add(length, Ordering::Relaxed);
                }
                s.progress.done.fetch_add(length, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}

async fn read(src: &Side, offset: u64, buf: Vec<u8>) -> Result<Vec<u8>, String> {
    match src {
        Side::Nbd(p) => {
            let (r, b) = p.read(buf, offset).await;
            r.map_err(|e| format!("read at {offset}: {e}"))?;
            Ok(b)
        }
        Side::File(f, _) => {
            let f = f.clone();
            smol::unblock(move || {
                let mut buf = buf;
                f.read_at(&mut buf, offset).map(|_| buf)
            })
            .await
            .map_err(|e| format!("read at {offset}: {e}"))
        }
        Side::Null => Err("null: cannot be read".into()),
    }
}

async fn write(dst: &Side, offset: u64, buf: Vec<u8>) -> Result<Vec<u8>, String> {
    match dst {
        Side::Nbd(p) => {
            let (r, b) = p.write(buf, offset).await;
            r.map_err(|e| format!("write at {offset}: {e}"))?;
            Ok(b)
        }
        Side::File(f, _) => {
            let f = f.clone();
            smol::unblock(move || f.write_at(&buf, offset, false).map(|_| buf))
                .await
                .map_err(|e| format!("write at {offset}: {e}"))
        }
        Side::Null => Ok(buf),
    }
}

/// Zeroes a range of the destination: as a hole, or `allocated`.
async fn write_zeroes(dst: &Side, offset: u64, length: u64, allocated: bool, buf: &mut Vec<u8>) -> Result<(), String> {
    match dst {
        Side::Nbd(p) if p.flags().contains(TransmissionFlags::SEND_WRITE_ZEROES) => p
            .write_zeroes(
                offset,
                length,
                if allocated {
                    CommandFlags::NO_HOLE
                } else {
                    CommandFlags::empty()
                },
            )
            .await
            .map_err(|e| format!("zero at {offset}: {e}")),
        Side::Nbd(_) => {
            // No WRITE_ZEROES: write zero buffers.
            let mut o = offset;
            let end = offset + length;
            while o < end {
                let n = ((end - o) as usize).min(buf.capacity().max(65536));
                let mut b = std::mem::take(buf);
                b.clear();
                b.resize(n, 0);
                b = write(dst, o, b).await?;
                *buf = b;
                o += n as u64;
            }
            Ok(())
        }
        Side::File(f, _) => {
            let f = f.clone();
            let flags = ZeroFlags {
                no_hole: allocated,
                ..ZeroFlags::default()
            };
            smol::unblock(move || f.write_zeroes(offset, length, flags))
                .await
                .map_err(|e| format!("zero at {offset}: {e}"))
        }
        Side::Null => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(length: u64, dirty: bool, zero: bool) -> DirtyRun {
        DirtyRun { length, dirty, zero }
    }

    #[test]
    fn block_runs_cut_on_block_boundaries() {
        // A hole from 100 to 9000 with 4 KiB blocks: only the block
        // 4096..8192 is wholly zero; the window ends at 10000, so the runs
        // stop at 8192.
        let ext = [(100, false), (8900, true), (1000, false)];
        assert_eq!(
            block_runs(0, &ext, 4096, 1 << 20),
            (vec![(0, 4096, false), (4096, 8192, true)], 8192)
        );
        // A zero extent reaching the end of the image keeps its partial
        // last block.
        let ext = [(4096, false), (5000, true)];
        assert_eq!(
            block_runs(8192, &ext, 4096, 8192 + 9096),
            (vec![(8192, 12288, false), (12288, 17288, true)], 17288)
        );
        // An answer shorter than a block: that block is data.
        assert_eq!(
            block_runs(4096, &[(512, true)], 4096, 1 << 20),
            (vec![(4096, 8192, false)], 8192)
        );
        assert_eq!(
            block_runs(4096, &[(512, true)], 4096, 5000),
            (vec![(4096, 5000, false)], 5000)
        );
    }

    #[test]
    fn dirty_runs_merge_both_maps_over_what_both_cover() {
        // Different boundaries; the allocation map covers less.
        let dirty = [(100, false), (50, true), (200, false)];
        let zero = [(120, true), (60, false)];
        assert_eq!(
            merge_runs(&dirty, &zero, 1000),
            vec![
                run(100, false, true),
                run(20, true, true),
                run(30, true, false),
                run(30, false, false)
            ]
        );
        // Equal neighbours are one run; the window bounds everything.
        let dirty = [(10, true), (10, true), (100, false)];
        let zero = [(5, false), (500, false)];
        assert_eq!(
            merge_runs(&dirty, &zero, 50),
            vec![run(20, true, false), run(30, false, false)]
        );
        // One map empty: nothing covered.
        assert!(merge_runs(&dirty, &[], 50).is_empty());
    }
}
