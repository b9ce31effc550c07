//! Drives the production server connection, `nbd_server::ServeConnection`
//! with its `ReplyWriter`, over memory exports, exactly as the runtimes do
//! (see "The loop a runtime runs" in nbd-server's docs): the fuzz input is
//! what a client sends, cut into reads of fuzzer-chosen sizes. Shared by the
//! `serve_connection` fuzz target and by the workspace's
//! `tests/tests/fuzz_corpus.rs` (which includes this file by path), so
//! nothing here may depend on libFuzzer.
//!
//! Input layout:
//!
//! - byte 0: bit 0 structured replies, 1 extended headers, 2 `support_go`,
//!   3 oldstyle, 4 `no_zeroes`, 5 a second, empty export `"ro"`, 6 the
//!   first export read-only, 7 `allow_list`;
//! - byte 1: bits 0-1 the TLS policy (none, forced, selective; the upgrade
//!   is pretended: the bytes stay plain), bits 2-4 `max_in_flight` (from
//!   [`IN_FLIGHT`]), bits 5-6 the payload budget (1, 2, 3 or 4 MiB), bit 7
//!   a small `reply_high_water` (64 KiB);
//! - then chunks, each a selector byte and the bytes it takes (see
//!   [`chunk_len`]): what one read from the socket gives. Selector
//!   [`SHUTDOWN`] shuts the server down instead.
//!
//! Between chunks the writer takes and writes every reply that is ready.
//! At the end, the client's EOF: `input_closed`, then the writer runs to
//! its end.
//!
//! Checked: no panic; no stall (a connection that says Read takes bytes,
//! one that says Blocked is freed by the writer, and wakes the waker it
//! was given; a writer that has replies to give wakes its waker); bounded
//! memory (the replies waiting in the writer stay within the reply high
//! water mark plus the payload budget plus one reply's headers; the bytes
//! the server writes are bounded by the input: per request, at most the
//! largest export plus its chunk headers; per handshake byte, a bounded
//! amount); after `input_closed` the connection is Closed and the writer
//! ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use nbd_proto::common::Mode;
use nbd_proto::server::{ServerConfig, TlsPolicy};
use nbd_server::{Export, HandshakeProgress, Limits, ReplyWriter, ServeConnection, ServeContext, Status};
use nbd_storage::MemoryStorage;

/// The first export's size.
pub const DISK_SIZE: u64 = 1 << 20;

/// The selector byte that shuts the server down (`ServeContext::shutdown`).
pub const SHUTDOWN: u8 = 0xfe;

/// The selector byte that takes the rest of the input.
pub const REST: u8 = 0xff;

/// `max_in_flight` choices.
pub const IN_FLIGHT: [usize; 8] = [1, 2, 3, 4, 8, 16, 64, 128];

/// A small reply high water mark.
pub const SMALL_HIGH_WATER: usize = 64 << 10;

/// The most bytes a reply may add to its payload (headers of the chunks of
/// a READ cut at every 4 KiB block, 48 bytes each at most, a BLOCK_STATUS
/// reply's extents, an error message): generous.
const REPLY_OVERHEAD: u64 = 64 << 10;

/// The smallest request header (compact): 28 bytes.
const MIN_REQUEST: u64 = 28;

/// Handshake bytes the server may write per byte it read (an option of a
/// few bytes may be answered with the export list or meta contexts), and
/// once (the greeting, oldstyle's 152 bytes).
const HANDSHAKE_PER_BYTE: u64 = 256;
const HANDSHAKE_BASE: u64 = 4096;

/// Loop turns with neither input used nor a reply written nor a state
/// change: more than this is a stall.
const MAX_IDLE_TURNS: usize = 2;

/// What a run reached (for the seed generator, which checks that each seed
/// goes where it was made for).
#[derive(Debug, Default, Clone)]
pub struct ServeSummary {
    /// The mode of transmission, if reached.
    pub mode: Option<Mode>,
    /// A (pretended) TLS upgrade happened.
    pub tls: bool,
    /// Handshake bytes written.
    pub handshake_bytes: u64,
    /// Reply bytes written.
    pub reply_bytes: u64,
    /// Times the connection said Blocked.
    pub blocked: usize,
    /// The connection ended with an error.
    pub error: bool,
    /// Input bytes the connection used.
    pub used: u64,
}

/// The server's configuration and limits from the first two bytes.
pub fn config(b0: u8, b1: u8) -> (ServerConfig, Limits, bool, bool) {
    let config = ServerConfig::default()
        .structured_replies(b0 & 1 != 0)
        .extended_headers(b0 & 2 != 0)
        .support_go(b0 & 4 != 0)
        .oldstyle(b0 & 8 != 0)
        .no_zeroes(b0 & 16 != 0)
        .allow_list(b0 & 128 != 0)
        .tls(match b1 & 3 {
            0 => TlsPolicy::NoTls,
            1 => TlsPolicy::ForcedTls,
            _ => TlsPolicy::SelectiveTls,
        });
    let limits = Limits::default()
        .max_in_flight(IN_FLIGHT[(b1 >> 2) as usize & 7])
        .payload_budget((1 + ((b1 >> 5) & 3) as u64) << 20)
        .io_threads(1)
        .reply_high_water(if b1 & 0x80 != 0 {
            SMALL_HIGH_WATER
        } else {
            Limits::default().reply_high_water
        });
    (config, limits, b0 & 32 != 0, b0 & 64 != 0)
}

/// The exports: a 1 MiB memory disk `""` (read-only if asked), and an
/// empty read-only one, `"ro"`, if asked.
pub fn exports(second: bool, read_only: bool) -> Vec<Export> {
    let mut v = vec![Export::new(
        "",
        "disk",
        Arc::new(MemoryStorage::with_options(DISK_SIZE, read_only)),
    )];
    if second {
        v.push(Export::new("ro", "", Arc::new(MemoryStorage::with_options(0, true))));
    }
    v
}

/// How many bytes a chunk selector takes: 1 to 128, then multiples of
/// 512 up to 56 KiB, then multiples of 64 KiB up to 896 KiB; [`REST`] takes
/// the rest, [`SHUTDOWN`] none.
pub fn chunk_len(sel: u8) -> usize {
    match sel {
        0..=0x7f => sel as usize + 1,
        0x80..=0xef => (sel as usize - 0x7f) * 512,
        0xf0..=0xfd => (sel as usize - 0xef) * 65536,
        SHUTDOWN => 0,
        REST => usize::MAX,
    }
}

/// Appends `data` as chunks of at most `max` bytes each (the seed
/// generator's encoding; `max` 0 for the largest chunks).
pub fn encode_chunks(out: &mut Vec<u8>, mut data: &[u8], max: usize) {
    while !data.is_empty() {
        let want = if max == 0 { data.len() } else { data.len().min(max) };
        let (sel, n) = if want >= 65536 {
            let k = (want / 65536).min(14);
            (0xef + k as u8, k * 65536)
        } else if want >= 512 {
            let k = want / 512;
            (0x7f + k as u8, k * 512)
        } else {
            let k = want.min(128);
            (k as u8 - 1, k)
        };
        out.push(sel);
        out.extend_from_slice(&data[..n]);
        data = &data[n..];
    }
}

/// A waker that counts its wakes.
struct Counter(AtomicUsize);

impl Wake for Counter {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn counter() -> (Arc<Counter>, Waker) {
    let c = Arc::new(Counter(AtomicUsize::new(0)));
    (c.clone(), Waker::from(c))
}

/// The writer side: the replies taken and written, with its waker's
/// bookkeeping.
struct Writer {
    writer: ReplyWriter,
    waker: Waker,
    wakes: Arc<Counter>,
    /// The wake count when `poll_batch` last said Pending.
    pending_at: Option<usize>,
    /// The writer said it is done (`Ready(false)`).
    done: bool,
    bytes: u64,
    /// The most the writer may hold at once.
    max_held: u64,
    /// Write sizes: a cycle of partial writes.
    write_sizes: [usize; 4],
    turn: usize,
}

impl Writer {
    /// Takes and writes every reply ready; returns the bytes written.
    fn drain(&mut self) -> u64 {
        let mut cx = Context::from_waker(&self.waker);
        let mut wrote = 0;
        loop {
            if self.done {
                // Done stays done.
                assert_eq!(
                    self.writer.poll_batch(&mut cx),
                    Poll::Ready(false),
                    "the writer came back"
                );
                return wrote;
            }
            match self.writer.poll_batch(&mut cx) {
                Poll::Ready(true) => {
                    if let Some(at) = self.pending_at.take() {
                        assert!(
                            self.wakes.0.load(Ordering::SeqCst) > at,
                            "replies came without waking the writer"
                        );
                    }
                    let held = self.writer.pending_bytes() as u64;
                    assert!(held <= self.max_held, "the writer holds {held} bytes");
                    assert!(!self.writer.is_empty(), "Ready(true) with nothing to write");
                    while !self.writer.is_empty() {
                        let size = self.write_sizes[self.turn % self.write_sizes.len()];
                        self.turn += 1;
                        let n = self.writer.with_slices(|slices| {
                            assert!(!slices.is_empty(), "no slices to write");
                            let mut n = 0;
                            for s in slices {
                                let take = s.len().min(size - n);
                                n += take;
                                if n == size {
                                    break;
                                }
                            }
                            n
                        });
                        assert!(n > 0, "empty slices");
                        self.writer.advance(n);
                        wrote += n as u64;
                        self.bytes += n as u64;
                    }
                }
                Poll::Ready(false) => {
                    self.done = true;
                    return wrote;
                }
                Poll::Pending => {
                    self.pending_at = Some(self.wakes.0.load(Ordering::SeqCst));
                    return wrote;
                }
            }
        }
    }
}

/// What the loop does next.
enum Next {
    /// The chunk is used up: read the next one.
    Read,
    /// The connection reads no more.
    Closed,
}

/// The connection and its runtime's state.
struct Runtime {
    conn: ServeConnection,
    w: Writer,
    reader_wakes: Arc<Counter>,
    reader_waker: Waker,
    /// The reader's wake count when status last said Blocked.
    blocked_at: Option<usize>,
    out: Vec<u8>,
    s: ServeSummary,
}

impl Runtime {
    /// Sends the handshake bytes queued.
    fn transmit(&mut self) -> u64 {
        let before = self.out.len();
        while self.conn.poll_transmit(&mut self.out).is_some() {}
        let n = (self.out.len() - before) as u64;
        self.out.clear();
        self.s.handshake_bytes += n;
        n
    }

    /// Feeds `buf` (the runtime's read buffer) as the runtimes do, until it
    /// is used up or the connection stops reading.
    fn feed(&mut self, buf: &mut Vec<u8>) -> Next {
        let mut idle = 0;
        loop {
            let mut progress = self.transmit() > 0;
            if !self.conn.is_transmitting() {
                // The handshake loop (nbd-blocking's `negotiate`).
                match self.conn.negotiation() {
                    HandshakeProgress::Read => {}
                    HandshakeProgress::Transmission => continue,
                    HandshakeProgress::Closed => return Next::Closed,
                    HandshakeProgress::StartTls => {
                        // Pretend the TLS handshake (the bytes stay plain),
                        // after the checks the runtimes make.
                        match self.conn.starting_tls(buf.len(), Some(())) {
                            Ok(()) => {}
                            Err(_) => {
                                assert!(!buf.is_empty(), "STARTTLS refused with nothing buffered");
                                return Next::Closed;
                            }
                        }
                        if self.conn.tls_established().is_err() {
                            self.s.error = true;
                            return Next::Closed;
                        }
                        self.s.tls = true;
                        continue;
                    }
                    _ => return Next::Closed,
                }
            } else {
                let wakes = self.reader_wakes.0.load(Ordering::SeqCst);
                match self.conn.status(Some(&self.reader_waker)) {
                    Status::Closed => return Next::Closed,
                    Status::StartTls(_) => {
                        // A runtime refuses it in transmission.
                        self.s.error = true;
                        return Next::Closed;
                    }
                    Status::Blocked => {
                        self.s.blocked += 1;
                        if self.blocked_at.is_none() {
                            self.blocked_at = Some(wakes);
                        }
                        // What frees it: the writer taking replies.
                        if self.w.drain() > 0 {
                            idle = 0;
                        } else {
                            idle += 1;
                        }
                        assert!(idle <= MAX_IDLE_TURNS, "blocked with nothing for the writer: a stall");
                        continue;
                    }
                    Status::Read => {
                        if let Some(at) = self.blocked_at.take() {
                            assert!(
                                self.reader_wakes.0.load(Ordering::SeqCst) > at,
                                "unblocked without waking the reader"
                            );
                        }
                    }
                    _ => return Next::Closed,
                }
            }
            if buf.is_empty() {
                return Next::Read;
            }
            let used = self.conn.input(buf);
            match used {
                Ok(n) => {
                    assert!(n <= buf.len(), "used more than given");
                    buf.drain(..n);
                    self.s.used += n as u64;
                    progress |= n > 0;
                }
                Err(_) => {
                    // The replies to the options before the one that ended it.
                    self.transmit();
                    self.s.error = true;
                    return Next::Closed;
                }
            }
            if progress {
                idle = 0;
            } else {
                idle += 1;
                assert!(
                    idle <= MAX_IDLE_TURNS,
                    "the connection says Read but takes nothing: a stall"
                );
            }
        }
    }
}

/// The `serve_connection` target: see the module docs.
pub fn serve_connection(data: &[u8]) -> ServeSummary {
    let [b0, b1, rest @ ..] = data else {
        return ServeSummary::default();
    };
    let (config, limits, second, read_only) = config(*b0, *b1);
    let ctx = Arc::new(ServeContext::new(exports(second, read_only), config, limits));
    let conn = ServeConnection::new(&ctx);
    let (wakes, waker) = counter();
    let w = Writer {
        writer: conn.reply_writer(),
        waker,
        wakes,
        pending_at: None,
        done: false,
        bytes: 0,
        max_held: limits.reply_high_water as u64 + ctx.budget().total() + REPLY_OVERHEAD,
        write_sizes: [usize::MAX, 1 + (*b0 as usize % 7), 4096 + *b1 as usize, usize::MAX],
        turn: 0,
    };
    let (reader_wakes, reader_waker) = counter();
    let mut rt = Runtime {
        conn,
        w,
        reader_wakes,
        reader_waker,
        blocked_at: None,
        out: Vec::new(),
        s: ServeSummary::default(),
    };
    let mut buf = Vec::new();
    let mut input = rest;
    let mut open = true;
    while open && !input.is_empty() {
        let sel = input[0];
        input = &input[1..];
        if sel == SHUTDOWN {
            ctx.shutdown();
        }
        let n = chunk_len(sel).min(input.len());
        buf.extend_from_slice(&input[..n]);
        input = &input[n..];
        open = matches!(rt.feed(&mut buf), Next::Read);
        rt.s.mode = rt.conn.mode();
        rt.w.drain();
    }
    // EOF (or the runtime closes after an error or at Closed).
    rt.conn.input_closed();
    assert!(
        matches!(rt.conn.status(None), Status::Closed),
        "not Closed after input_closed"
    );
    assert!(matches!(
        rt.conn.negotiation(),
        HandshakeProgress::Closed | HandshakeProgress::Transmission
    ));
    rt.transmit();
    if rt.conn.is_transmitting() {
        // Memory storage runs in place: every reply is ready, and the
        // writer ends.
        rt.w.drain();
        assert!(rt.w.done, "the writer does not end after input_closed");
    }
    rt.s.reply_bytes = rt.w.bytes;
    // Bounded output: per request read (28 bytes of header at least), one
    // reply of at most the largest export plus its headers; per handshake
    // byte, a bounded answer.
    let used = rt.s.used;
    let replies = (used / MIN_REQUEST + 1) * (DISK_SIZE + REPLY_OVERHEAD);
    assert!(
        rt.s.reply_bytes <= replies,
        "{} reply bytes for {used} input bytes",
        rt.s.reply_bytes
    );
    let handshake = HANDSHAKE_BASE + used * HANDSHAKE_PER_BYTE;
    assert!(
        rt.s.handshake_bytes <= handshake,
        "{} handshake bytes for {used} input bytes",
        rt.s.handshake_bytes
    );
    let summary = rt.s.clone();
    drop(rt);
    assert_eq!(ctx.active_connections(), 0, "the connection is still counted");
    assert_eq!(
        ctx.budget().available(),
        ctx.budget().total(),
        "payload budget not given back"
    );
    summary
}
