//! Executing requests against storage: in place for storage that never
//! blocks, on the I/O pool for storage that may, through completions for
//! asynchronous storage. Every path ends by queueing the reply in the
//! connection's [`Shared`] state.

use std::io;
use std::sync::{Arc, Mutex};
use std::task::Waker;

use nbd_proto::common::MAX_HOLE_CHUNK;
use nbd_proto::server::{ReplyEncoder, ServerRequest};
use nbd_proto::wire::{AllocationFlags, CONTEXT_BASE_ALLOCATION, Command, CommandFlags, ErrorCode};

use crate::pool::{Task, Workers};
use crate::replies::{Data, Reply, Shared};
use nbd_storage::{AsyncStorage, Completion, CompletionSink, Done, Extent, SparseReads, Storage, ZeroFlags};

/// Reads of at least this many bytes are sent sparsely (holes as
/// `NBD_REPLY_TYPE_OFFSET_HOLE`) when structured replies are in use.
pub const SPARSE_READ_THRESHOLD: u64 = 64 * 1024;

/// Storage that finds holes by their contents ([`SparseReads::Contents`])
/// is looked at in blocks of this many bytes, aligned to the export's
/// offsets: a run of all-zero blocks goes as a hole chunk.
pub const HOLE_GRAIN: u64 = 4096;

/// WRITE payloads reach blocking or asynchronous storage in pieces of at
/// most this many bytes, each taken from the payload budget only once its
/// first bytes arrived.
pub const WRITE_PIECE: usize = 1 << 20;

/// Where an export's requests run.
#[derive(Clone)]
pub enum Backend {
    /// Synchronous storage: run in place when it never blocks
    /// ([`Storage::never_blocks`]), else on the I/O pool.
    Sync(Arc<dyn Storage>),
    /// Asynchronous storage: submitted, completed by the storage.
    Async(Arc<dyn AsyncStorage>),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Sync(_) => f.write_str("Backend::Sync"),
            Backend::Async(_) => f.write_str("Backend::Async"),
        }
    }
}

fn errno_of(e: &io::Error) -> ErrorCode {
    ErrorCode::from_errno(e.raw_os_error().unwrap_or(libc::EIO))
}

/// What a connection's requests need to run.
#[derive(Clone)]
pub(crate) struct Env {
    pub(crate) shared: Arc<Shared>,
    pub(crate) enc: ReplyEncoder,
    pub(crate) structured: bool,
    /// The id of `base:allocation` if selected.
    pub(crate) allocation_id: Option<u32>,
    /// Every selected context: (id, name).
    pub(crate) contexts: Arc<[(u32, String)]>,
}

/// A fixed set of threads that run storage calls which may block (file
/// I/O, `fdatasync`, a backend waiting on the network), so that a slow
/// call never delays other connections' requests, nor the reading of this
/// connection's next requests. Jobs wait in one queue (no allocation per
/// job once the queue has grown); threads start on first use.
#[derive(Debug, Clone)]
pub struct IoPool {
    workers: Workers<Job>,
}

impl IoPool {
    /// A pool of at most `threads` threads (at least 1).
    pub fn new(threads: usize) -> IoPool {
        IoPool {
            workers: Workers::new(threads),
        }
    }

    /// The most threads it runs.
    pub fn threads(&self) -> usize {
        self.workers.threads()
    }

    fn submit(&self, job: Job) {
        self.workers.submit(job);
    }
}

/// One request (or WRITE piece) for the I/O pool.
struct Job {
    env: Env,
    storage: Arc<dyn Storage>,
    op: Op,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Job")
    }
}

enum Op {
    /// A READ; the job takes its buffer when it runs, so that READs
    /// queued behind busy I/O threads hold budget but no memory.
    Read {
        req: ServerRequest,
        budget: u64,
    },
    WritePiece {
        req: ServerRequest,
        slot: usize,
        at: u64,
        buf: Vec<u8>,
        budget: u64,
    },
    Other(ServerRequest),
}

impl Task for Job {
    fn run(self) {
        let Job { env, storage, op } = self;
        match op {
            Op::Read { req, budget } => {
                let buf = env.shared.take_buf(req.length as usize);
                read(&env, &*storage, &req, buf, budget)
            }
            Op::WritePiece {
                req,
                slot,
                at,
                buf,
                budget,
            } => {
                let r = storage.write_at(&buf, at, req.fua());
                piece_done(&env, &req, slot, buf, budget, r);
            }
            Op::Other(req) => other(&env, &*storage, &req),
        }
    }
}

/// Runs requests for one connection.
pub(crate) struct Executor {
    pub(crate) env: Env,
    /// Operations in flight on asynchronous storage.
    ops: Arc<AsyncOps>,
    backend: Backend,
    inline: bool,
    pool: IoPool,
    /// A READ waiting for payload budget.
    parked: Option<ServerRequest>,
    /// The WRITE whose payload is arriving (pieces path).
    write: Option<PendingWrite>,
}

struct PendingWrite {
    req: ServerRequest,
    slot: usize,
    /// The piece being filled: its first byte's offset in the payload.
    piece_at: u64,
    piece: Vec<u8>,
    piece_budget: u64,
    /// In place: the first error writing the payload.
    error: Option<io::Error>,
}

impl Executor {
    pub(crate) fn new(env: Env, backend: Backend, pool: IoPool) -> Executor {
        let inline = match &backend {
            Backend::Sync(s) => s.never_blocks(),
            Backend::Async(_) => false,
        };
        Executor {
            ops: AsyncOps::new(env.clone()),
            env,
            backend,
            inline,
            pool,
            parked: None,
            write: None,
        }
    }

    /// Requests received whose execution has not started: a WRITE whose
    /// payload is still arriving, a READ waiting for budget.
    pub(crate) fn not_started(&self) -> usize {
        self.write.is_some() as usize + self.parked.is_some() as usize
    }

    /// Whether the executor waits for payload budget (registering `waker`
    /// with it when given).
    pub(crate) fn parked(&mut self, waker: Option<&Waker>) -> bool {
        let Some(req) = self.parked else {
            return false;
        };
        let budget = &self.env.shared.budget;
        let got = match waker {
            Some(w) => budget.acquire_or_wait(req.length, w),
            None => budget.try_acquire(req.length),
        };
        if !got {
            return true;
        }
        self.parked = None;
        self.dispatch_read(req, budget.cost(req.length));
        false
    }

    /// A valid request (a WRITE's payload follows through
    /// [`Executor::write_data`]).
    pub(crate) fn request(&mut self, req: ServerRequest) {
        self.env.shared.started();
        match req.command {
            Command::WRITE if req.length > 0 => {
                let slot = if self.inline {
                    usize::MAX
                } else {
                    Shared::new_write_slot(&mut self.env.shared.lock())
                };
                self.write = Some(PendingWrite {
                    req,
                    slot,
                    piece_at: 0,
                    piece: Vec::new(),
                    piece_budget: 0,
                    error: None,
                });
            }
            Command::READ if req.length > 0 => {
                let budget = &self.env.shared.budget;
                if budget.try_acquire(req.length) {
                    self.dispatch_read(req, budget.cost(req.length));
                } else {
                    self.parked = Some(req);
                }
            }
            _ => match &self.backend {
                Backend::Sync(s) if self.inline => other(&self.env, &**s, &req),
                Backend::Sync(s) => self.pool.submit(Job {
                    env: self.env.clone(),
                    storage: s.clone(),
                    op: Op::Other(req),
                }),
                Backend::Async(a) => submit_other(&self.ops, &**a, req),
            },
        }
    }

    fn dispatch_read(&mut self, req: ServerRequest, budget: u64) {
        match &self.backend {
            Backend::Sync(s) if self.inline => {
                let buf = self.env.shared.take_buf(req.length as usize);
                read(&self.env, &**s, &req, buf, budget)
            }
            Backend::Sync(s) if !needs_lookup(&self.env, &req, s.sparse_reads()) || in_known_data(&self.env, &req) => {
                let mut buf = self.env.shared.take_buf(req.length as usize);
                match s.try_read_at(&mut buf, req.offset) {
                    // In the cache: answered here, without the pool's hand-offs.
                    Some(r) => {
                        let scan = sparse(&self.env, &req) && by_contents(s.sparse_reads());
                        read_done(&self.env, &req, buf, budget, r, scan)
                    }
                    None => {
                        // The job takes a buffer when it runs.
                        Shared::give_buf(&mut self.env.shared.lock(), buf);
                        self.pool.submit(Job {
                            env: self.env.clone(),
                            storage: s.clone(),
                            op: Op::Read { req, budget },
                        })
                    }
                }
            }
            Backend::Sync(s) => self.pool.submit(Job {
                env: self.env.clone(),
                storage: s.clone(),
                op: Op::Read { req, budget },
            }),
            Backend::Async(a) => {
                let buf = self.env.shared.take_buf(req.length as usize);
                a.read(req.offset, buf, self.ops.completion(Ticket::Read { req, budget }))
            }
        }
    }

    /// A request refused by the protocol machine.
    pub(crate) fn reject(&mut self, req: ServerRequest, error: ErrorCode, reason: &str) {
        self.env.shared.started();
        let enc = self.env.enc;
        self.env
            .shared
            .reply_head(|out| enc.reply_error(&req, error, reason, out));
    }

    /// Whether the next `want` bytes of WRITE payload can be taken now (a
    /// new piece needs budget); registers `waker` with the budget if not.
    pub(crate) fn payload_ready(&mut self, waker: Option<&Waker>) -> bool {
        let Some(w) = &mut self.write else {
            return true;
        };
        if self.inline || w.piece_budget > 0 {
            return true;
        }
        let left = w.req.length - w.piece_at;
        let want = left.min(WRITE_PIECE as u64);
        let budget = &self.env.shared.budget;
        let got = match waker {
            Some(k) => budget.acquire_or_wait(want, k),
            None => budget.try_acquire(want),
        };
        if got {
            w.piece_budget = budget.cost(want);
            w.piece = self.env.shared.take_piece();
        }
        got
    }

    /// How many bytes of WRITE payload the executor takes next (the room
    /// left in the current piece; unlimited in place).
    pub(crate) fn payload_room(&self) -> usize {
        match &self.write {
            Some(w) if !self.inline => {
                if w.piece_budget == 0 {
                    0
                } else {
                    WRITE_PIECE - w.piece.len()
                }
            }
            _ => usize::MAX,
        }
    }

    /// Bytes of the announced WRITE's payload: `data` belongs `offset`
    /// bytes into it; `last` when it completes the payload. Returns how
    /// many bytes were taken (fewer when a piece is full and the next one
    /// must wait for budget: call again with the rest).
    pub(crate) fn write_data(&mut self, req: &ServerRequest, offset: u64, data: &[u8], last: bool) -> usize {
        let Some(w) = &mut self.write else {
            return data.len();
        };
        if w.req.cookie != req.cookie {
            return data.len();
        }
        if self.inline {
            // Straight from the receive buffer into storage.
            if let Backend::Sync(s) = &self.backend
                && w.error.is_none()
                && let Err(e) = s.write_at(data, req.offset + offset, req.fua())
            {
                w.error = Some(e);
            }
            if last {
                let error = self.write.take().and_then(|w| w.error);
                finish(&self.env, req, error.map_or(Ok(()), Err));
            }
            return data.len();
        }
        // Pieces: fill the current one, send it when full or last.
        let room = WRITE_PIECE - w.piece.len();
        let take = room.min(data.len());
        w.piece.extend_from_slice(&data[..take]);
        let whole = take == data.len();
        let full = w.piece.len() == WRITE_PIECE;
        let done = last && whole;
        if full || done {
            let buf = std::mem::take(&mut w.piece);
            let at = req.offset + w.piece_at;
            w.piece_at += buf.len() as u64;
            let budget = std::mem::replace(&mut w.piece_budget, 0);
            let slot = w.slot;
            {
                let mut g = self.env.shared.lock();
                g.writes[slot].pieces += 1;
                if done {
                    g.writes[slot].complete = true;
                }
            }
            if done {
                self.write = None;
            }
            self.submit_piece(*req, slot, at, buf, budget);
        }
        take
    }

    fn submit_piece(&self, req: ServerRequest, slot: usize, at: u64, buf: Vec<u8>, budget: u64) {
        match &self.backend {
            Backend::Sync(s) if !req.fua() => match s.try_write_at(&buf, at) {
                // Taken by the page cache without waiting: done here.
                Some(r) => piece_done(&self.env, &req, slot, buf, budget, r),
                None => self.pool.submit(Job {
                    env: self.env.clone(),
                    storage: s.clone(),
                    op: Op::WritePiece {
                        req,
                        slot,
                        at,
                        buf,
                        budget,
                    },
                }),
            },
            Backend::Sync(s) => self.pool.submit(Job {
                env: self.env.clone(),
                storage: s.clone(),
                op: Op::WritePiece {
                    req,
                    slot,
                    at,
                    buf,
                    budget,
                },
            }),
            Backend::Async(a) => a.write(
                at,
                buf,
                req.fua(),
                self.ops.completion(Ticket::WritePiece { req, slot, budget }),
            ),
        }
    }

    /// The connection ended with a WRITE's payload incomplete: its pieces
    /// in flight finish, no reply goes out for it.
    pub(crate) fn abandon(&mut self) {
        // Neither the WRITE nor a parked READ will be answered: they are no
        // longer in flight.
        let mut unanswered = 0;
        if let Some(w) = self.write.take() {
            self.env.shared.budget.release(w.piece_budget);
            let mut g = self.env.shared.lock();
            if w.slot != usize::MAX {
                // Pieces in flight finish; the slot is never answered.
                let slot = &mut g.writes[w.slot];
                slot.complete = false;
            }
            Shared::give_buf(&mut g, w.piece);
            unanswered += 1;
        }
        if self.parked.take().is_some() {
            unanswered += 1;
        }
        if unanswered > 0 {
            let mut g = self.env.shared.lock();
            g.in_flight = g.in_flight.saturating_sub(unanswered);
        }
        self.env.shared.wake_writer();
    }
}

/// A piece of a WRITE finished: reply once every piece did and the payload
/// was complete.
fn piece_done(env: &Env, req: &ServerRequest, slot: usize, buf: Vec<u8>, budget: u64, r: io::Result<()>) {
    let shared = &env.shared;
    shared.budget.release(budget);
    let finished = {
        let mut g = shared.lock();
        Shared::give_buf(&mut g, buf);
        let w = &mut g.writes[slot];
        w.pieces -= 1;
        if let Err(e) = r {
            w.error.get_or_insert(e);
        }
        if w.pieces == 0 && w.complete {
            let e = w.error.take();
            Shared::free_write_slot(&mut g, slot);
            Some(e)
        } else {
            None
        }
    };
    if let Some(e) = finished {
        finish(env, req, e.map_or(Ok(()), Err));
    }
}

fn finish(env: &Env, req: &ServerRequest, r: io::Result<()>) {
    let enc = env.enc;
    env.shared.reply_head(|out| match r {
        Ok(()) => out.extend_from_slice(enc.reply_ok(req).as_bytes()),
        Err(e) => enc.reply_error(req, errno_of(&e), &e.to_string(), out),
    });
}

/// FLUSH, TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS, zero-length requests.
fn other(env: &Env, st: &dyn Storage, req: &ServerRequest) {
    let r = match req.command {
        Command::FLUSH => st.flush(),
        Command::TRIM => st.trim(req.offset, req.length, req.fua()),
        Command::WRITE_ZEROES => st.write_zeroes(req.offset, req.length, zero_flags(req)),
        Command::CACHE => st.cache(req.offset, req.length),
        Command::BLOCK_STATUS => return block_status(env, st, req),
        Command::READ | Command::WRITE => Ok(()), // length 0
        _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
    };
    finish(env, req, r);
}

fn zero_flags(req: &ServerRequest) -> ZeroFlags {
    ZeroFlags {
        no_hole: req.flags.contains(CommandFlags::NO_HOLE),
        fast: req.flags.contains(CommandFlags::FAST_ZERO),
        fua: req.fua(),
    }
}

/// Whether a READ is sent sparsely (holes as hole chunks).
fn sparse(env: &Env, req: &ServerRequest) -> bool {
    env.structured && !req.flags.contains(CommandFlags::DF) && req.length >= SPARSE_READ_THRESHOLD
}

/// Whether the READ lies in the run of data learnt last (its bytes need no
/// hole lookup: a plain reply does).
fn in_known_data(env: &Env, req: &ServerRequest) -> bool {
    let (start, end) = env.shared.lock().known_data;
    req.offset >= start && req.offset.saturating_add(req.length) <= end
}

/// Replies to a READ whose data `buf` holds (if `r` is a success): plain,
/// or with `scan` sparse by its contents (the storage read it whole).
fn read_done(env: &Env, req: &ServerRequest, buf: Vec<u8>, budget: u64, r: io::Result<()>, scan: bool) {
    let mut reply = env.shared.take_reply();
    let r = r.and_then(|()| {
        if scan {
            contents_reply(env, req, &buf, &mut reply)
        } else {
            let header = env.enc.read_reply_header(req).map_err(invalid)?;
            reply.head.extend_from_slice(header.as_bytes());
            reply.data(0, buf.len());
            Ok(())
        }
    });
    match r {
        Ok(()) => env.shared.reply(reply, Some(Data { buf, budget })),
        Err(e) => {
            reply.reset();
            reply_without_data(env, req, reply, buf, budget, &e);
        }
    }
}

/// The reply to a sparse READ whose bytes `buf` holds: runs of all-zero
/// [`HOLE_GRAIN`] blocks as hole chunks, the rest as data chunks; a read
/// without a zero block gets the plain one-chunk reply. Costs a look at
/// each block (stopping at its first non-zero bytes), nothing more.
fn contents_reply(env: &Env, req: &ServerRequest, buf: &[u8], reply: &mut Reply) -> io::Result<()> {
    let blocks = || grain_blocks(req.offset, buf.len());
    if !blocks().any(|(a, b)| nbd_storage::is_zero(&buf[a..b])) {
        let header = env.enc.read_reply_header(req).map_err(invalid)?;
        reply.head.extend_from_slice(header.as_bytes());
        reply.data(0, buf.len());
        return Ok(());
    }
    let mut run: Option<(usize, bool)> = None;
    for (a, b) in blocks() {
        let zero = nbd_storage::is_zero(&buf[a..b]);
        match run {
            Some((start, z)) if z != zero => {
                content_chunk(env, req, reply, start, a, z)?;
                run = Some((a, zero));
            }
            Some(_) => {}
            None => run = Some((a, zero)),
        }
    }
    if let Some((start, zero)) = run {
        content_chunk(env, req, reply, start, buf.len(), zero)?;
    }
    reply.head.extend_from_slice(env.enc.reply_ok(req).as_bytes());
    Ok(())
}

/// Hole chunks for `len` bytes at `off`, split at the protocol's largest
/// hole ([`MAX_HOLE_CHUNK`]).
fn hole_chunks(env: &Env, req: &ServerRequest, reply: &mut Reply, off: u64, len: u64) -> io::Result<()> {
    let mut o = off;
    while o < off + len {
        let piece = (off + len - o).min(MAX_HOLE_CHUNK);
        let h = env.enc.hole_chunk(req, o, piece, false).map_err(invalid)?;
        reply.head.extend_from_slice(h.as_bytes());
        o += piece;
    }
    Ok(())
}

/// One chunk of [`contents_reply`]: bytes `a..b` of the read.
fn content_chunk(env: &Env, req: &ServerRequest, reply: &mut Reply, a: usize, b: usize, zero: bool) -> io::Result<()> {
    let off = req.offset + a as u64;
    let len = (b - a) as u64;
    if zero {
        hole_chunks(env, req, reply, off, len)?;
    } else {
        let h = env.enc.offset_data_header(req, off, len, false).map_err(invalid)?;
        reply.head.extend_from_slice(h.as_bytes());
        reply.data(a, b);
    }
    Ok(())
}

/// The [`HOLE_GRAIN`] blocks of a read of `len` bytes at `offset`, as
/// ranges of its buffer (the first and last may be partial).
fn grain_blocks(offset: u64, len: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        if at >= len {
            return None;
        }
        let into = ((offset + at as u64) % HOLE_GRAIN) as usize;
        let end = (at + HOLE_GRAIN as usize - into).min(len);
        let r = (at, end);
        at = end;
        Some(r)
    })
}

/// Most runs of data and holes a READ of a
/// [`SparseReads::ContentsUnlessHole`] storage is sent by, its data read
/// run by run; with more it is read whole.
const MAX_READ_RUNS: usize = 8;

/// Whether a READ needs a look at the storage's map before its bytes are
/// read (else it may be read in place, from the page cache).
fn needs_lookup(env: &Env, req: &ServerRequest, mode: SparseReads) -> bool {
    match mode {
        SparseReads::Contents => false,
        // Reading a hole from the cache, even a small read, would put its
        // zeroes there (a buffered read of an unwritten extent does not
        // wait, so it is not refused), where `lseek` then sees data.
        SparseReads::ContentsUnlessHole => holes_ok(env, req),
        _ => sparse(env, req),
    }
}

/// Whether a READ may be answered with hole chunks.
fn holes_ok(env: &Env, req: &ServerRequest) -> bool {
    env.structured && !req.flags.contains(CommandFlags::DF)
}

/// Whether a storage's sparse reads find holes in the bytes read.
fn by_contents(mode: SparseReads) -> bool {
    matches!(mode, SparseReads::Contents | SparseReads::ContentsUnlessHole)
}

/// A READ into `buf` (exactly the request's length), sparse when
/// structured replies allow.
fn read(env: &Env, st: &dyn Storage, req: &ServerRequest, mut buf: Vec<u8>, budget: u64) {
    let mode = st.sparse_reads();
    // A read of data and holes in a few runs: its data read run by run.
    let mut by_runs = false;
    // Reads of every size are looked up: reading a hole would put its
    // zeroes in the page cache, where `lseek` then sees data.
    if holes_ok(env, req) && mode == SparseReads::ContentsUnlessHole && !in_known_data(env, req) {
        let mut reply = env.shared.take_reply();
        let mut scratch = std::mem::take(&mut reply.extents);
        let extent = st.extent_at(req.offset, &mut scratch);
        scratch.clear();
        reply.extents = scratch;
        match extent {
            Ok(e) if e.flags.contains(AllocationFlags::ZERO) && e.length >= req.length => {
                // All of it a hole: sent unread.
                return match hole_chunks(env, req, &mut reply, req.offset, req.length) {
                    Ok(()) => {
                        reply.head.extend_from_slice(env.enc.reply_ok(req).as_bytes());
                        reply_unread(env, reply, buf, budget);
                    }
                    Err(e) => {
                        reply.reset();
                        reply_without_data(env, req, reply, buf, budget, &e);
                    }
                };
            }
            Ok(e) if !e.flags.contains(AllocationFlags::ZERO) && e.length >= req.length => {
                env.shared.lock().known_data = (req.offset, req.offset.saturating_add(e.length));
            }
            Ok(_) => {
                // Data and holes. Reading the holes too would make the
                // kernel's readahead cache the pages after them, which
                // lseek then calls data: the next reads would read their
                // holes, and so on. Unless the map is fragmented (pages
                // cached here and there), only the data is read.
                let mut runs = std::mem::take(&mut reply.extents);
                runs.clear();
                by_runs = sparse(env, req)
                    && st.block_status(req.offset, req.length, &mut runs).is_ok()
                    && runs.len() <= MAX_READ_RUNS;
                runs.clear();
                reply.extents = runs;
            }
            Err(_) => {}
        }
        env.shared.give_reply(reply);
    }
    if sparse(env, req) && by_contents(mode) && !by_runs {
        let r = st.read_at(&mut buf, req.offset);
        return read_done(env, req, buf, budget, r, true);
    }
    let mut reply = env.shared.take_reply();
    let r = if sparse(env, req) {
        let mut extents = std::mem::take(&mut reply.extents);
        let r = sparse_read(env, st, req, &mut buf, &mut reply, &mut extents);
        reply.extents = extents;
        r
    } else {
        plain_read(env, st, req, &mut buf, &mut reply)
    };
    match r {
        Ok(()) => env.shared.reply(reply, Some(Data { buf, budget })),
        Err(e) => {
            // Nothing of this reply was sent: replace it by the error.
            reply.reset();
            reply_without_data(env, req, reply, buf, budget, &e);
        }
    }
}

fn reply_without_data(env: &Env, req: &ServerRequest, mut reply: Reply, buf: Vec<u8>, budget: u64, e: &io::Error) {
    env.enc.reply_error(req, errno_of(e), &e.to_string(), &mut reply.head);
    reply_unread(env, reply, buf, budget);
}

/// Queues `reply`, which carries no READ data: the data buffer and its
/// budget go back at once.
fn reply_unread(env: &Env, reply: Reply, buf: Vec<u8>, budget: u64) {
    let shared = &env.shared;
    shared.budget.release(budget);
    Shared::give_buf(&mut shared.lock(), buf);
    shared.reply(reply, None);
}

fn plain_read(env: &Env, st: &dyn Storage, req: &ServerRequest, buf: &mut [u8], reply: &mut Reply) -> io::Result<()> {
    let header = env.enc.read_reply_header(req).map_err(invalid)?;
    reply.head.extend_from_slice(header.as_bytes());
    read_into(st, req.offset, buf, 0, buf.len(), reply)
}

/// Reads below this size are copied into the reply's buffer even where the
/// storage could lend its pages: for them, one copy costs less than
/// sharing a page (its reference count's cache line, a copy-on-write for a
/// write that follows).
const LEND_MIN: usize = 32 << 10;

/// Puts the bytes at `offset` that go to `buf[a..b]` in the reply (after
/// what it holds): the storage's own pieces where it lends them
/// ([`Storage::read_shared`]), else read into `buf`.
fn read_into(st: &dyn Storage, offset: u64, buf: &mut [u8], a: usize, b: usize, reply: &mut Reply) -> io::Result<()> {
    if b - a >= LEND_MIN {
        let first = reply.pieces.len();
        if st.read_shared(offset, b - a, &mut reply.pieces)? {
            reply.lent(first);
            return Ok(());
        }
    }
    st.read_at(&mut buf[a..b], offset)?;
    reply.data(a, b);
    Ok(())
}

/// A structured READ that sends holes as `NBD_REPLY_TYPE_OFFSET_HOLE`; a
/// long run of data is learnt once (one lookup) instead of per read.
fn sparse_read(
    env: &Env,
    st: &dyn Storage,
    req: &ServerRequest,
    buf: &mut [u8],
    reply: &mut Reply,
    extents: &mut Vec<Extent>,
) -> io::Result<()> {
    let end = req.offset + req.length;
    if in_known_data(env, req) {
        // Inside a known run of data. (Had another client punched a hole
        // here meanwhile, the zeroes read from it are still the right
        // contents; data is never reported as a hole from this cache.)
        return plain_read(env, st, req, buf, reply);
    }
    if let Ok(e) = st.extent_at(req.offset, extents)
        && !e.flags.contains(AllocationFlags::ZERO)
    {
        let run = (req.offset, req.offset.saturating_add(e.length));
        env.shared.lock().known_data = run;
        if end <= run.1 {
            return plain_read(env, st, req, buf, reply);
        }
    }
    let mut off = req.offset;
    while off < end {
        extents.clear();
        st.block_status(off, end - off, extents)?;
        if extents.is_empty() {
            // A storage that says nothing: the rest is data.
            extents.push(Extent::data(end - off));
        }
        for e in extents.iter() {
            if off >= end {
                break;
            }
            let len = e.length.min(end - off);
            if len == 0 {
                break;
            }
            if e.flags.contains(AllocationFlags::ZERO) {
                hole_chunks(env, req, reply, off, len)?;
            } else {
                let h = env.enc.offset_data_header(req, off, len, false).map_err(invalid)?;
                reply.head.extend_from_slice(h.as_bytes());
                let a = (off - req.offset) as usize;
                let b = a + len as usize;
                read_into(st, off, buf, a, b, reply)?;
            }
            off += len;
        }
    }
    reply.head.extend_from_slice(env.enc.reply_ok(req).as_bytes());
    Ok(())
}

fn block_status(env: &Env, st: &dyn Storage, req: &ServerRequest) {
    let enc = env.enc;
    let mut reply = env.shared.take_reply();
    let mut extents = std::mem::take(&mut reply.extents);
    let n = env.contexts.len();
    let limit = req.length.min(st.size().saturating_sub(req.offset));
    let mut result = Ok(());
    for (k, (id, name)) in env.contexts.iter().enumerate() {
        let done = k + 1 == n;
        let r = if name == CONTEXT_BASE_ALLOCATION && Some(*id) == env.allocation_id {
            extents.clear();
            match st.block_status(req.offset, limit, &mut extents) {
                Ok(()) => {
                    let iter = extents.iter().map(|e| (e.length, e.flags.bits() as u64));
                    enc.block_status_chunk(req, *id, iter, done, &mut reply.head)
                        .map_err(invalid)
                }
                Err(e) => Err(e),
            }
        } else {
            // Any other context the storage offered: it answers. (Its own
            // buffer: such requests are rare, base:allocation stays
            // allocation-free.)
            let mut statuses = Vec::new();
            match st.context_status(name, req.offset, limit, &mut statuses) {
                Ok(()) => {
                    let iter = statuses.iter().map(|e| (e.length, e.status as u64));
                    enc.block_status_chunk(req, *id, iter, done, &mut reply.head)
                        .map_err(invalid)
                }
                Err(e) => Err(e),
            }
        };
        if let Err(e) = r {
            result = Err(e);
            break;
        }
    }
    if n == 0 {
        result = Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no metadata context selected",
        ));
    }
    if let Err(e) = result {
        reply.reset();
        enc.reply_error(req, errno_of(&e), &e.to_string(), &mut reply.head);
    }
    extents.clear();
    reply.extents = extents;
    env.shared.reply(reply, None);
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
}

// ----- asynchronous storage ---------------------------------------------------

fn submit_other(ops: &Arc<AsyncOps>, a: &dyn AsyncStorage, req: ServerRequest) {
    if req.command == Command::BLOCK_STATUS {
        let limit = req.length.min(a.size().saturating_sub(req.offset));
        return a.block_status(req.offset, limit, ops.completion(Ticket::Status { req }));
    }
    let done = ops.completion(Ticket::Other { req });
    match req.command {
        Command::FLUSH => a.flush(done),
        Command::TRIM => a.trim(req.offset, req.length, req.fua(), done),
        Command::WRITE_ZEROES => a.write_zeroes(req.offset, req.length, zero_flags(&req), done),
        Command::CACHE => a.cache(req.offset, req.length, done),
        // Zero-length READ and WRITE.
        _ => done.complete(Ok(())),
    }
}

/// Which request an asynchronous completion belongs to.
pub(crate) enum Ticket {
    Read {
        req: ServerRequest,
        budget: u64,
    },
    WritePiece {
        req: ServerRequest,
        slot: usize,
        budget: u64,
    },
    Other {
        req: ServerRequest,
    },
    Status {
        req: ServerRequest,
    },
}

/// A connection's operations in flight on an [`AsyncStorage`]: what each
/// needs to answer its request, under the token its [`Completion`]
/// carries. Slots are reused, so steady state allocates nothing.
pub(crate) struct AsyncOps {
    env: Env,
    tickets: Mutex<Tickets>,
}

#[derive(Default)]
struct Tickets {
    slots: Vec<Option<Ticket>>,
    free: Vec<usize>,
}

impl AsyncOps {
    pub(crate) fn new(env: Env) -> Arc<AsyncOps> {
        Arc::new(AsyncOps {
            env,
            tickets: Mutex::new(Tickets::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tickets> {
        // A panic elsewhere never leaves the table half-changed.
        self.tickets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A completion for `ticket`'s operation.
    fn completion(self: &Arc<Self>, ticket: Ticket) -> Completion {
        let mut t = self.lock();
        let slot = match t.free.pop() {
            Some(i) => {
                t.slots[i] = Some(ticket);
                i
            }
            None => {
                t.slots.push(Some(ticket));
                t.slots.len() - 1
            }
        };
        drop(t);
        Completion::new(self.clone(), slot as u64)
    }
}

impl CompletionSink for AsyncOps {
    fn finished(&self, token: u64, done: Done<'_>) {
        let ticket = {
            let mut t = self.lock();
            let i = usize::try_from(token).unwrap_or(usize::MAX);
            let ticket = t.slots.get_mut(i).and_then(Option::take);
            if ticket.is_some() {
                t.free.push(i);
            }
            ticket
        };
        if let Some(ticket) = ticket {
            finish_ticket(&self.env, ticket, done);
        }
    }
}

/// Answers the request of `ticket` as its operation ended.
fn finish_ticket(env: &Env, ticket: Ticket, done: Done<'_>) {
    match (ticket, done) {
        (Ticket::Read { req, budget }, Done::Read(buf, result)) => read_completed(env, req, budget, buf, result),
        (Ticket::WritePiece { req, slot, budget }, Done::Written(buf, result)) => {
            piece_done(env, &req, slot, buf, budget, result)
        }
        (Ticket::Status { req }, Done::Status(extents, result)) => status_completed(env, req, extents, result),
        (ticket, done) => {
            let result = match done {
                Done::Finished(r) | Done::Read(_, r) | Done::Written(_, r) | Done::Status(_, r) => r,
                Done::Dropped => Err(io::Error::other("the storage dropped the request")),
                _ => Err(io::Error::other("the storage ended the request in an unknown way")),
            };
            finished(env, ticket, result)
        }
    }
}

/// The operation of `ticket` finished without what its kind gives back
/// (FLUSH, TRIM, WRITE_ZEROES, CACHE; or any that failed).
fn finished(env: &Env, ticket: Ticket, result: io::Result<()>) {
    match ticket {
        Ticket::Other { req } => finish(env, &req, result),
        Ticket::Read { req, budget } => {
            // A read completed without its buffer: answer the error.
            let e = result
                .err()
                .unwrap_or_else(|| io::Error::other("read completed without data"));
            let reply = env.shared.take_reply();
            reply_without_data(env, &req, reply, Vec::new(), budget, &e);
        }
        Ticket::WritePiece { req, slot, budget } => piece_done(env, &req, slot, Vec::new(), budget, result),
        Ticket::Status { req } => finish(env, &req, result.and(Err(io::Error::other("no extents")))),
    }
}

/// A read finished with its buffer.
fn read_completed(env: &Env, req: ServerRequest, budget: u64, buf: Vec<u8>, result: io::Result<()>) {
    let result = result.and_then(|()| {
        if buf.len() as u64 != req.length {
            return Err(io::Error::other("read completed with a buffer of the wrong size"));
        }
        Ok(())
    });
    read_done(env, &req, buf, budget, result, false)
}

/// Block status finished with the extents of `base:allocation`.
fn status_completed(env: &Env, req: ServerRequest, extents: &[Extent], result: io::Result<()>) {
    let enc = env.enc;
    let mut reply = env.shared.take_reply();
    let n = env.contexts.len();
    let r = result.and_then(|()| {
        for (k, (id, name)) in env.contexts.iter().enumerate() {
            let done = k + 1 == n;
            if name == CONTEXT_BASE_ALLOCATION && !extents.is_empty() {
                let iter = extents.iter().map(|e| (e.length, e.flags.bits() as u64));
                enc.block_status_chunk(&req, *id, iter, done, &mut reply.head)
            } else {
                enc.block_status_chunk(&req, *id, [(req.length, 0u64)], done, &mut reply.head)
            }
            .map_err(invalid)?;
        }
        Ok(())
    });
    if let Err(e) = r {
        reply.reset();
        enc.reply_error(&req, errno_of(&e), &e.to_string(), &mut reply.head);
    }
    env.shared.reply(reply, None);
}
