//! What a connection's reader, its storage jobs and its writer share: the
//! replies waiting to be sent, reusable buffers, the count of requests in
//! flight, and the wakers of the reader and the writer.

use std::io::IoSlice;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use nbd_storage::SharedBytes;

use super::budget::PayloadBudget;

/// Replies ready to be written: header bytes (and small payloads such as
/// error messages and block-status descriptors) in `head`, READ data in
/// `datas` (read into buffers) and `pieces` (lent by the storage),
/// interleaved as `segs` says.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub(crate) head: Vec<u8>,
    pub(crate) datas: Vec<Data>,
    pieces: Vec<SharedBytes>,
    segs: Vec<Seg>,
    /// `head` bytes up to here are described by `segs`.
    head_done: usize,
    /// Bytes of head and data in the batch.
    pub(crate) bytes: usize,
}

/// A READ data buffer and the budget it holds.
#[derive(Debug)]
pub(crate) struct Data {
    pub(crate) buf: Vec<u8>,
    pub(crate) budget: u64,
}

#[derive(Debug, Clone, Copy)]
enum Seg {
    /// `head[start..end]`.
    Head(usize, usize),
    /// `datas[index].buf[start..end]`.
    Data(usize, usize, usize),
    /// `pieces[index]`, whole.
    Piece(usize),
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.head.is_empty() && self.datas.is_empty() && self.pieces.is_empty()
    }

    /// Closes the run of head bytes written since the last segment.
    fn seal_head(&mut self) {
        if self.head.len() > self.head_done {
            self.segs.push(Seg::Head(self.head_done, self.head.len()));
            self.head_done = self.head.len();
        }
    }

    /// Appends a reply built elsewhere.
    fn append(&mut self, r: &mut Reply, data: Option<Data>) {
        let base = self.head.len();
        let index = self.datas.len();
        self.bytes += r.head.len();
        for seg in &r.segs {
            match *seg {
                Seg::Head(a, b) => {
                    self.head.extend_from_slice(&r.head[a..b]);
                    self.segs.push(Seg::Head(base + a, base + b));
                    self.head_done = base + b;
                }
                Seg::Data(_, a, b) => {
                    self.segs.push(Seg::Data(index, a, b));
                    self.bytes += b - a;
                }
                Seg::Piece(i) => {
                    self.segs.push(Seg::Piece(self.pieces.len() + i));
                    self.bytes += r.pieces[i].len();
                }
            }
        }
        self.pieces.append(&mut r.pieces);
        if let Some(d) = data {
            self.datas.push(d);
        }
        r.head.clear();
        r.segs.clear();
    }

    fn clear(&mut self) {
        self.head.clear();
        self.segs.clear();
        self.pieces.clear();
        self.head_done = 0;
        self.bytes = 0;
    }
}

/// A reply being built by one storage job: header bytes and where the
/// data of its (single) data buffer, or the pieces the storage lent, go
/// between them.
#[derive(Debug, Default)]
pub(crate) struct Reply {
    pub(crate) head: Vec<u8>,
    segs: Vec<Seg>,
    /// Pieces lent by the storage ([`Reply::lent`]).
    pub(crate) pieces: Vec<SharedBytes>,
    sealed: usize,
    /// Working space for extents (reused with the reply).
    pub(crate) extents: Vec<nbd_storage::Extent>,
}

impl Reply {
    fn seal(&mut self) {
        if self.head.len() > self.sealed {
            self.segs.push(Seg::Head(self.sealed, self.head.len()));
            self.sealed = self.head.len();
        }
    }

    /// The data buffer's bytes `start..end` go here.
    pub(crate) fn data(&mut self, start: usize, end: usize) {
        self.seal();
        if end > start {
            self.segs.push(Seg::Data(0, start, end));
        }
    }

    /// The pieces from `first` on (appended to `pieces` by the storage)
    /// go here.
    pub(crate) fn lent(&mut self, first: usize) {
        self.seal();
        for i in first..self.pieces.len() {
            if !self.pieces[i].is_empty() {
                self.segs.push(Seg::Piece(i));
            }
        }
    }

    /// Forgets everything built so far (to answer with an error instead).
    pub(crate) fn reset(&mut self) {
        self.head.clear();
        self.segs.clear();
        self.pieces.clear();
        self.sealed = 0;
    }

    fn finish(&mut self) {
        self.seal();
        self.sealed = 0;
    }
}

/// State shared by a connection's reader, its jobs and its writer.
#[derive(Debug)]
pub(crate) struct Shared {
    inner: Mutex<Inner>,
    pub(crate) budget: Arc<PayloadBudget>,
}

#[derive(Debug, Default)]
pub(crate) struct Inner {
    pub(crate) batch: Batch,
    /// Requests received and not yet answered.
    pub(crate) in_flight: usize,
    /// Reusable data buffers (their capacity is not counted in the budget).
    free_bufs: Vec<Vec<u8>>,
    free_bytes: usize,
    /// Reusable reply builders.
    free_replies: Vec<Reply>,
    writer: Option<Waker>,
    reader: Option<Waker>,
    /// No more requests will be read.
    pub(crate) reader_done: bool,
    /// The writer failed (the client went away): replies are dropped.
    pub(crate) writer_failed: bool,
    /// A run of data `[start, end)` learnt from the storage: sparse reads
    /// inside it skip the hole lookup.
    pub(crate) known_data: (u64, u64),
    /// WRITEs whose payload goes to storage in pieces.
    pub(crate) writes: Vec<WriteSlot>,
    free_write_slots: Vec<usize>,
}

/// A WRITE being written in pieces.
#[derive(Debug, Default)]
pub(crate) struct WriteSlot {
    /// Pieces submitted and not completed.
    pub(crate) pieces: usize,
    /// The whole payload was received.
    pub(crate) complete: bool,
    /// The first error of a piece.
    pub(crate) error: Option<std::io::Error>,
}

/// Free data buffers kept per connection while it is busy.
const KEEP_FREE_BYTES: usize = 64 << 20;
/// ... and once it went idle.
const KEEP_IDLE_BYTES: usize = 256 << 10;

impl Shared {
    pub(crate) fn new(budget: Arc<PayloadBudget>) -> Shared {
        Shared {
            inner: Mutex::new(Inner::default()),
            budget,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A data buffer of exactly `len` bytes (contents unspecified).
    pub(crate) fn take_buf(&self, len: usize) -> Vec<u8> {
        let mut b = {
            let mut g = self.lock();
            // The smallest free buffer that holds `len`, else the largest.
            let pick = g
                .free_bufs
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= len)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i)
                .or_else(|| (!g.free_bufs.is_empty()).then_some(0));
            match pick {
                Some(i) => {
                    let b = g.free_bufs.swap_remove(i);
                    g.free_bytes -= b.capacity();
                    b
                }
                None => Vec::new(),
            }
        };
        // Contents are unspecified: bytes a reused buffer already holds
        // are not zeroed again (storage overwrites them all); only growth
        // is.
        if b.len() >= len {
            b.truncate(len);
        } else {
            b.resize(len, 0);
        }
        b
    }

    /// An empty buffer to grow (a WRITE piece), reusing a free one.
    pub(crate) fn take_piece(&self) -> Vec<u8> {
        let mut g = self.lock();
        let b = g.free_bufs.pop();
        if let Some(b) = &b {
            g.free_bytes -= b.capacity();
        }
        let mut b = b.unwrap_or_default();
        b.clear();
        b
    }

    pub(crate) fn give_buf(g: &mut Inner, buf: Vec<u8>) {
        if buf.capacity() == 0 || g.free_bytes + buf.capacity() > KEEP_FREE_BYTES {
            return;
        }
        g.free_bytes += buf.capacity();
        g.free_bufs.push(buf);
    }

    /// The connection went idle: keep little memory.
    pub(crate) fn release_idle(&self) {
        let mut g = self.lock();
        let mut kept = 0;
        g.free_bufs.retain(|b| {
            let keep = kept + b.capacity() <= KEEP_IDLE_BYTES;
            if keep {
                kept += b.capacity();
            }
            keep
        });
        g.free_bytes = kept;
        g.free_replies.truncate(4);
        for r in &mut g.free_replies {
            r.head.shrink_to(4096);
        }
        if g.batch.is_empty() {
            g.batch.head.shrink_to(64 << 10);
        }
    }

    pub(crate) fn take_reply(&self) -> Reply {
        self.lock().free_replies.pop().unwrap_or_default()
    }

    /// Gives back a reply builder taken and not used.
    pub(crate) fn give_reply(&self, r: Reply) {
        self.lock().free_replies.push(r);
    }

    /// A request was received: one more in flight.
    pub(crate) fn started(&self) {
        self.lock().in_flight += 1;
    }

    /// Queues a reply without data (built in `head` by `f`) for a request
    /// that was in flight, and wakes the writer.
    pub(crate) fn reply_head(&self, f: impl FnOnce(&mut Vec<u8>)) {
        let mut g = self.lock();
        if !g.writer_failed {
            let before = g.batch.head.len();
            f(&mut g.batch.head);
            g.batch.bytes += g.batch.head.len() - before;
        }
        Self::answered(g);
    }

    /// Queues a reply built in `r` with its data buffer, and wakes the
    /// writer. The data's budget is released once it is written.
    pub(crate) fn reply(&self, mut r: Reply, data: Option<Data>) {
        r.finish();
        let mut g = self.lock();
        if g.writer_failed {
            if let Some(d) = data {
                self.budget.release(d.budget);
                Self::give_buf(&mut g, d.buf);
            }
            r.reset();
        } else {
            g.batch.seal_head();
            g.batch.append(&mut r, data);
        }
        g.free_replies.push(r);
        Self::answered(g);
    }

    fn answered(mut g: MutexGuard<'_, Inner>) {
        g.in_flight = g.in_flight.saturating_sub(1);
        let writer = g.writer.take();
        let reader = g.reader.take();
        drop(g);
        if let Some(w) = writer {
            w.wake();
        }
        if let Some(w) = reader {
            w.wake();
        }
    }

    /// Registers the reader's waker (woken when a request completes or the
    /// writer takes replies).
    pub(crate) fn register_reader(g: &mut Inner, waker: &Waker) {
        match &g.reader {
            Some(w) if w.will_wake(waker) => {}
            _ => g.reader = Some(waker.clone()),
        }
    }

    /// No more requests will be read; wakes the writer so that it can end
    /// once the requests in flight are answered.
    pub(crate) fn reader_finished(&self) {
        let mut g = self.lock();
        g.reader_done = true;
        let w = g.writer.take();
        drop(g);
        if let Some(w) = w {
            w.wake();
        }
    }

    /// Wakes the writer (something it waits for may have changed).
    pub(crate) fn wake_writer(&self) {
        let w = self.lock().writer.take();
        if let Some(w) = w {
            w.wake();
        }
    }

    /// A WRITE slot for a payload written in pieces.
    pub(crate) fn new_write_slot(g: &mut Inner) -> usize {
        match g.free_write_slots.pop() {
            Some(i) => {
                g.writes[i] = WriteSlot::default();
                i
            }
            None => {
                g.writes.push(WriteSlot::default());
                g.writes.len() - 1
            }
        }
    }

    pub(crate) fn free_write_slot(g: &mut Inner, slot: usize) {
        g.free_write_slots.push(slot);
    }
}

/// The writing side of a connection: takes the replies its requests
/// produced, in batches, and hands them out as I/O slices for vectored
/// writes (READ data is written from the buffers storage filled, or from
/// the pieces it lent; nothing is copied). Both runtimes drive it the same way:
///
/// ```text
/// loop {
///     match writer.poll_batch(cx) {       // or: with a waker that unparks
///         Ready(false) => break,          // nothing more will come
///         Ready(true)  => while !writer.is_empty() {
///             let n = writer.with_slices(|s| socket.write_vectored(s))?;
///             writer.advance(n);
///         }
///         Pending      => wait
///     }
/// }
/// ```
#[derive(Debug)]
pub struct ReplyWriter {
    shared: Arc<Shared>,
    batch: Batch,
    seg: usize,
    offset: usize,
}

/// Slices given to one vectored write at most (a 1 MiB READ lent in 32 KiB
/// pages takes 33).
const MAX_SLICES: usize = 128;

impl ReplyWriter {
    pub(crate) fn new(shared: Arc<Shared>) -> ReplyWriter {
        ReplyWriter {
            shared,
            batch: Batch::default(),
            seg: 0,
            offset: 0,
        }
    }

    /// Takes the replies ready to be written: `Ready(true)` when there are
    /// some, `Ready(false)` when the connection is over (no request can be
    /// answered any more), `Pending` (with the waker registered) otherwise.
    #[must_use = "the replies taken must be written"]
    pub fn poll_batch(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        if !self.is_empty() {
            return Poll::Ready(true);
        }
        self.recycle();
        let mut g = self.shared.lock();
        if !g.batch.is_empty() {
            g.batch.seal_head();
            std::mem::swap(&mut g.batch, &mut self.batch);
            let reader = g.reader.take();
            drop(g);
            // The reader may be waiting for the queue to drain.
            if let Some(r) = reader {
                r.wake();
            }
            self.seg = 0;
            self.offset = 0;
            return Poll::Ready(true);
        }
        if g.reader_done && g.in_flight == 0 {
            return Poll::Ready(false);
        }
        match &g.writer {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => g.writer = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Whether everything taken was written.
    pub fn is_empty(&self) -> bool {
        self.seg >= self.batch.segs.len()
    }

    /// Bytes taken and not yet written.
    pub fn pending_bytes(&self) -> usize {
        self.batch.bytes
    }

    /// Calls `f` with the next slices to write (up to 64 of them).
    pub fn with_slices<R>(&self, f: impl FnOnce(&[IoSlice<'_>]) -> R) -> R {
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let mut n = 0;
        let mut offset = self.offset;
        for seg in self.batch.segs.iter().skip(self.seg) {
            if n == MAX_SLICES {
                break;
            }
            let bytes: &[u8] = match *seg {
                Seg::Head(a, b) => &self.batch.head[a..b],
                Seg::Data(i, a, b) => &self.batch.datas[i].buf[a..b],
                Seg::Piece(i) => &self.batch.pieces[i],
            };
            slices[n] = IoSlice::new(&bytes[offset..]);
            offset = 0;
            n += 1;
        }
        f(&slices[..n])
    }

    /// `n` bytes of the slices were written.
    pub fn advance(&mut self, mut n: usize) {
        while n > 0 && self.seg < self.batch.segs.len() {
            let len = match self.batch.segs[self.seg] {
                Seg::Head(a, b) | Seg::Data(_, a, b) => b - a,
                Seg::Piece(i) => self.batch.pieces[i].len(),
            };
            let left = len - self.offset;
            if n < left {
                self.offset += n;
                return;
            }
            n -= left;
            self.seg += 1;
            self.offset = 0;
        }
        if self.is_empty() {
            self.recycle();
        }
    }

    /// Gives the written batch's buffers back.
    fn recycle(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let mut g = self.shared.lock();
        for d in self.batch.datas.drain(..) {
            self.shared.budget.release(d.budget);
            Shared::give_buf(&mut g, d.buf);
        }
        drop(g);
        self.batch.clear();
        self.seg = 0;
        self.offset = 0;
    }

    /// Writing failed (the client went away): replies still to come are
    /// dropped and their buffers freed.
    pub fn failed(&mut self) {
        self.seg = self.batch.segs.len();
        self.recycle();
        let mut g = self.shared.lock();
        g.writer_failed = true;
        let mut batch = std::mem::take(&mut g.batch);
        for d in batch.datas.drain(..) {
            self.shared.budget.release(d.budget);
        }
        let reader = g.reader.take();
        drop(g);
        // The lent pieces go back outside the lock.
        drop(batch);
        if let Some(r) = reader {
            r.wake();
        }
    }
}

impl Drop for ReplyWriter {
    fn drop(&mut self) {
        // Budget held by replies never written goes back.
        self.failed();
    }
}
