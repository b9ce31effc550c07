//! Our clients facing servers that misbehave.
//!
//! A fake server in a thread of the test listens on a Unix socket and
//! writes raw protocol bytes: an honest handshake (or a broken one), then
//! replies for unknown cookies, chunks outside their request, block status
//! for contexts never negotiated, lengths of gigabytes that never come,
//! replies cut off by the server's death, or nothing at all.
//!
//! Both clients must answer with a clear, typed error (the rule the server
//! broke, from `nbd_proto`), never panic, never hang (every blocking call
//! runs under [`within`], every async one under [`block_on_within`]), and
//! never allocate a buffer sized from a length the server claimed: this
//! test binary's global allocator records the largest allocation, which
//! the tests with huge lengths check.

use std::alloc::{GlobalAlloc, Layout, System};
use std::future::Future;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nbd_blocking::client::{Client, Error, Negotiation};
use nbd_proto::client::{ClientConfig, HandshakeError, HandshakeViolation, ReplyViolation};
use nbd_proto::uri::NbdUri;
use nbd_proto::wire::{
    BlockDescriptor, BlockDescriptorExt, BlockStatusExtHeader, CONTEXT_BASE_ALLOCATION, Command, CommandFlags,
    EXTENDED_REPLY_MAGIC, EXTENDED_REQUEST_MAGIC, ErrorCode, ExtendedReplyHeader, ExtendedRequestHeader, Hex, IHAVEOPT,
    NBDMAGIC, OPTION_REPLY_MAGIC, OptionHeader, OptionReplyHeader, OptionType, REQUEST_MAGIC, ReplyChunkType,
    ReplyFlags, ReplyType, RequestHeader, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, SimpleReplyHeader,
    StructuredReplyHeader, TransmissionFlags,
};
use nbd_smol::client::{Client as AsyncClient, Error as AsyncError};
use nbd_tests::*;
use zerocopy::{FromBytes, IntoBytes};

// ---------------------------------------------------------------------------
// The largest allocation this process made
// ---------------------------------------------------------------------------

/// The system allocator, recording the largest single allocation.
struct RecordingAllocator;

static LARGEST_ALLOCATION: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for RecordingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: RecordingAllocator = RecordingAllocator;

/// No test in this binary allocates more than a few MiB on purpose; a
/// buffer sized from one of the fake servers' lengths would be 2 GiB or
/// more. (Block-status chunks may legitimately be read into a buffer of
/// up to 16 MiB: 2^20 extents.)
const ALLOCATION_LIMIT: usize = 64 << 20;

fn assert_no_huge_allocation(what: &str) {
    let largest = LARGEST_ALLOCATION.load(Ordering::Relaxed);
    assert!(
        largest < ALLOCATION_LIMIT,
        "{what}: an allocation of {largest} bytes was made"
    );
}

// ---------------------------------------------------------------------------
// Time limits
// ---------------------------------------------------------------------------

/// How long a client may take to notice what a server did wrong.
const LIMIT: Duration = Duration::from_secs(5);

/// Runs `f` (a blocking client's calls) in a thread and returns its
/// result; panics if it does not finish within `limit`.
fn within<T: Send + 'static>(what: &str, limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: the client hung for {limit:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: the client panicked"),
    }
}

/// Runs an async client's future; panics if it does not finish within
/// `limit`.
fn block_on_within<T>(what: &str, limit: Duration, fut: impl Future<Output = T>) -> T {
    smol::block_on(async {
        let done = async { Some(fut.await) };
        let timeout = async {
            smol::Timer::after(limit).await;
            None
        };
        smol::future::or(done, timeout).await
    })
    .unwrap_or_else(|| panic!("{what}: the async client hung for {limit:?}"))
}

// ---------------------------------------------------------------------------
// A fake server
// ---------------------------------------------------------------------------

/// What the fake server offers in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Offer {
    /// Neither structured replies nor extended headers.
    Simple,
    /// Structured replies and `base:allocation` (id [`CONTEXT_ID`]).
    Structured,
    /// Extended headers too.
    Extended,
}

/// The id the fake server gives `base:allocation`.
const CONTEXT_ID: u32 = 7;

/// Size of the fake export.
const SIZE: u64 = 1 << 30;

/// A request as the fake server read it.
#[derive(Debug, Clone, Copy)]
struct Req {
    command: Command,
    cookie: u64,
    offset: u64,
    length: u64,
}

/// The server's end of one connection.
struct Conn {
    s: UnixStream,
    structured: bool,
    extended: bool,
}

impl Conn {
    fn send(&mut self, bytes: &[u8]) {
        // The client may already have hung up on us: that is its right.
        let _ = self.s.write_all(bytes);
    }

    fn recv(&mut self, n: usize) -> Vec<u8> {
        assert!(n <= 64 << 20);
        let mut b = vec![0u8; n];
        self.s
            .read_exact(&mut b)
            .unwrap_or_else(|e| panic!("fake server: reading {n} bytes: {e}"));
        b
    }

    /// The greeting: fixed newstyle, no zeroes.
    fn greet(&mut self) {
        let mut g = NBDMAGIC.to_be_bytes().to_vec();
        g.extend_from_slice(&IHAVEOPT.to_be_bytes());
        g.extend_from_slice(&3u16.to_be_bytes());
        self.send(&g);
        let flags = self.recv(4);
        assert_eq!(flags, [0, 0, 0, 3], "client flags");
    }

    /// Reads one option: its type and data.
    fn option(&mut self) -> (OptionType, Vec<u8>) {
        let (h, _) = OptionHeader::read_from_prefix(&self.recv(16)).unwrap();
        assert_eq!(h.magic.get(), IHAVEOPT);
        let data = self.recv(h.length.get() as usize);
        (OptionType(h.option.get()), data)
    }

    fn option_reply(&mut self, option: OptionType, reply: ReplyType, data: &[u8]) {
        self.option_reply_header(option, reply, data.len() as u32);
        self.send(data);
    }

    fn option_reply_header(&mut self, option: OptionType, reply: ReplyType, length: u32) {
        let h = OptionReplyHeader {
            magic: OPTION_REPLY_MAGIC.into(),
            option: option.0.into(),
            reply_type: reply.0.into(),
            length: length.into(),
        };
        self.send(h.as_bytes());
    }

    /// Answers options as an honest server offering `offer` would, until
    /// `NBD_OPT_GO`.
    fn handshake(&mut self, offer: Offer) {
        self.greet();
        loop {
            let (option, _) = self.option();
            match option {
                OptionType::EXTENDED_HEADERS if offer == Offer::Extended => {
                    self.extended = true;
                    self.structured = true;
                    self.option_reply(option, ReplyType::ACK, &[]);
                }
                OptionType::STRUCTURED_REPLY if offer != Offer::Simple && !self.structured => {
                    self.structured = true;
                    self.option_reply(option, ReplyType::ACK, &[]);
                }
                OptionType::SET_META_CONTEXT if self.structured => {
                    let mut reply = CONTEXT_ID.to_be_bytes().to_vec();
                    reply.extend_from_slice(CONTEXT_BASE_ALLOCATION.as_bytes());
                    self.option_reply(option, ReplyType::META_CONTEXT, &reply);
                    self.option_reply(option, ReplyType::ACK, &[]);
                }
                OptionType::GO | OptionType::INFO => {
                    let flags = TransmissionFlags::HAS_FLAGS
                        | TransmissionFlags::SEND_FLUSH
                        | TransmissionFlags::SEND_TRIM
                        | TransmissionFlags::SEND_WRITE_ZEROES;
                    let mut info = vec![0, 0];
                    info.extend_from_slice(&SIZE.to_be_bytes());
                    info.extend_from_slice(&flags.bits().to_be_bytes());
                    self.option_reply(option, ReplyType::INFO, &info);
                    self.option_reply(option, ReplyType::ACK, &[]);
                    if option == OptionType::GO {
                        return;
                    }
                }
                _ => self.option_reply(option, ReplyType::ERR_UNSUP, &[]),
            }
        }
    }

    /// Reads one request (and drops a WRITE's payload).
    fn request(&mut self) -> Req {
        let req = if self.extended {
            let (h, _) = ExtendedRequestHeader::read_from_prefix(&self.recv(32)).unwrap();
            assert_eq!(h.magic.get(), EXTENDED_REQUEST_MAGIC);
            Req {
                command: Command(h.command.get()),
                cookie: h.cookie.get(),
                offset: h.offset.get(),
                length: h.length.get(),
            }
        } else {
            let (h, _) = RequestHeader::read_from_prefix(&self.recv(28)).unwrap();
            assert_eq!(h.magic.get(), REQUEST_MAGIC);
            Req {
                command: Command(h.command.get()),
                cookie: h.cookie.get(),
                offset: h.offset.get(),
                length: h.length.get().into(),
            }
        };
        if req.command == Command::WRITE {
            self.recv(req.length as usize);
        }
        req
    }

    fn simple_reply(&mut self, cookie: u64, error: u32, data: &[u8]) {
        let h = SimpleReplyHeader {
            magic: SIMPLE_REPLY_MAGIC.into(),
            error: error.into(),
            cookie: cookie.into(),
        };
        self.send(h.as_bytes());
        self.send(data);
    }

    /// A structured (or extended) chunk header announcing `length` bytes
    /// of payload, whatever follows.
    fn chunk_header(&mut self, req: &Req, flags: ReplyFlags, chunk: ReplyChunkType, length: u64) {
        if self.extended {
            let h = ExtendedReplyHeader {
                magic: EXTENDED_REPLY_MAGIC.into(),
                flags: flags.bits().into(),
                chunk_type: chunk.0.into(),
                cookie: req.cookie.into(),
                offset: req.offset.into(),
                length: length.into(),
            };
            self.send(h.as_bytes());
        } else {
            let h = StructuredReplyHeader {
                magic: STRUCTURED_REPLY_MAGIC.into(),
                flags: flags.bits().into(),
                chunk_type: chunk.0.into(),
                cookie: req.cookie.into(),
                length: u32::try_from(length).expect("a 32-bit chunk length").into(),
            };
            self.send(h.as_bytes());
        }
    }

    fn chunk(&mut self, req: &Req, flags: ReplyFlags, chunk: ReplyChunkType, payload: &[u8]) {
        self.chunk_header(req, flags, chunk, payload.len() as u64);
        self.send(payload);
    }

    /// An `NBD_REPLY_TYPE_OFFSET_DATA` chunk.
    fn data_chunk(&mut self, req: &Req, flags: ReplyFlags, offset: u64, data: &[u8]) {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(data);
        self.chunk(req, flags, ReplyChunkType::OFFSET_DATA, &p);
    }

    /// A complete, correct reply to a READ of `data`.
    fn read_reply(&mut self, req: &Req, data: &[u8]) {
        assert_eq!(data.len() as u64, req.length);
        if self.structured {
            self.data_chunk(req, ReplyFlags::DONE, req.offset, data);
        } else {
            self.simple_reply(req.cookie, 0, data);
        }
    }

    /// Waits (up to 10 s) until the client closes the connection.
    fn wait_closed(&mut self) {
        self.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 4096];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return,
                Err(e) => panic!("fake server: the client did not hang up: {e}"),
            }
        }
    }
}

/// A fake server running `script` on the first connection, in a thread.
struct Fake {
    uri: String,
    socket: PathBuf,
    thread: Option<thread::JoinHandle<()>>,
    _dir: TempDir,
}

impl Fake {
    fn start(script: impl FnOnce(&mut Conn) + Send + 'static) -> Fake {
        let dir = TempDir::new();
        let socket: PathBuf = dir.socket_path("fake");
        let listener = UnixListener::bind(&socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let uri = Endpoint::Unix(socket.clone()).uri("");
        let thread = thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            let s = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                        thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("fake server: no client came: {e}"),
                }
            };
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut conn = Conn {
                s,
                structured: false,
                extended: false,
            };
            script(&mut conn);
        });
        Fake {
            uri,
            socket,
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// Waits for the script to end; its panics fail the test.
    fn finish(mut self) {
        if let Some(t) = self.thread.take()
            && let Err(p) = t.join()
        {
            std::panic::resume_unwind(p);
        }
    }
}

fn nbd_uri(uri: &str) -> NbdUri {
    NbdUri::parse(uri).unwrap()
}

/// A client configuration asking for what `offer` gives.
fn config(offer: Offer) -> ClientConfig {
    let mut c = ClientConfig::default();
    if offer == Offer::Simple {
        c.structured_replies = false;
        c.extended_headers = false;
    }
    c
}

fn blocking_connect(uri: &str, offer: Offer) -> Client {
    Client::connect_uri(&nbd_uri(uri), config(offer)).unwrap_or_else(|e| panic!("handshake with the fake: {e}"))
}

// ---------------------------------------------------------------------------
// Transmission: replies that break the rules
// ---------------------------------------------------------------------------

/// A broken reply the fake server sends to the client's first request.
type Misbehaviour = fn(&mut Conn, &Req);

/// Runs one misbehaviour against both clients: the first request (made by
/// `request` below) gets the broken reply; the client must fail with a
/// protocol violation for which `check` returns true, fail later requests
/// at once, and hang up.
fn against_both_clients(
    what: &str,
    offer: Offer,
    command: Command,
    misbehave: Misbehaviour,
    check: fn(&ReplyViolation) -> bool,
) {
    // The blocking client.
    let fake = Fake::start(move |conn| {
        conn.handshake(offer);
        let req = conn.request();
        misbehave(conn, &req);
        conn.wait_closed();
    });
    let uri = fake.uri.clone();
    let label = format!("blocking client, {what}");
    let (first, second) = within(&label, LIMIT, move || {
        let mut c = blocking_connect(&uri, offer);
        let first = request_blocking(&mut c, command);
        let second = request_blocking(&mut c, Command::READ);
        (first, second)
    });
    match &first {
        Err(Error::Protocol(v)) if check(v) => eprintln!("{label}: {}", first.as_ref().unwrap_err()),
        other => panic!("{label}: {other:?}"),
    }
    assert!(
        matches!(&second, Err(Error::Disconnected(why)) if why.contains("protocol violation by server")),
        "{label}: a request after the violation: {second:?}"
    );
    fake.finish();

    // The async client, with a second request in flight that fails too.
    let fake = Fake::start(move |conn| {
        conn.handshake(offer);
        // The two requests may come in either order: misbehave in reply
        // to the one of the command under test.
        let (a, b) = (conn.request(), conn.request());
        let first = if a.command == command { a } else { b };
        assert_eq!(first.command, command);
        misbehave(conn, &first);
        conn.wait_closed();
    });
    let label = format!("async client, {what}");
    let uri = fake.uri.clone();
    block_on_within(&label, LIMIT, async {
        let c = AsyncClient::connect_uri(&nbd_uri(&uri), config(offer).max_in_flight(8))
            .await
            .unwrap();
        let first = smol::spawn(request_async(c.clone(), command));
        let second = smol::spawn(request_async(c.clone(), Command::READ));
        let (first, second) = (first.await, second.await);
        let violation = match &first {
            Err(AsyncError::Protocol(v)) if check(v) => {
                eprintln!("{label}: {v}");
                v.clone()
            }
            other => panic!("{label}: first request: {other:?}"),
        };
        assert!(
            matches!(&second, Err(AsyncError::Protocol(w)) if *w == violation),
            "{label}: the request in flight with it: {second:?}"
        );
        // Later requests fail at once, saying why.
        let later = c.flush().await;
        assert!(
            matches!(&later, Err(AsyncError::Disconnected(why)) if why.contains("protocol violation by server")),
            "{label}: a request after the violation: {later:?}"
        );
        assert!(c.is_closed());
        drop(c);
    });
    fake.finish();
    assert_no_huge_allocation(what);
}

fn request_blocking(c: &mut Client, command: Command) -> Result<(), Error> {
    match command {
        Command::READ => c.read(&mut [0u8; 4096], 4096),
        Command::WRITE => c.write(&[1u8; 4096], 4096),
        Command::BLOCK_STATUS => c.block_status(4096, 4096, CommandFlags::empty()).map(|_| ()),
        Command::FLUSH => c.flush(),
        other => panic!("{other}"),
    }
}

async fn request_async(c: AsyncClient, command: Command) -> Result<(), AsyncError> {
    match command {
        Command::READ => c.read(vec![0u8; 4096], 4096).await.0,
        Command::WRITE => c.write(vec![1u8; 4096], 4096).await.0,
        Command::BLOCK_STATUS => c.block_status(4096, 4096, CommandFlags::empty()).await.map(|_| ()),
        Command::FLUSH => c.flush().await,
        other => panic!("{other}"),
    }
}

#[test]
fn reply_for_an_unknown_cookie() {
    for offer in [Offer::Simple, Offer::Structured, Offer::Extended] {
        against_both_clients(
            &format!("{offer:?}: reply for an unknown cookie"),
            offer,
            Command::READ,
            |conn, req| {
                let bogus = Req {
                    cookie: req.cookie ^ 0x5a5a_0000_0000,
                    ..*req
                };
                if conn.structured {
                    conn.chunk(&bogus, ReplyFlags::DONE, ReplyChunkType::NONE, &[]);
                } else {
                    conn.simple_reply(bogus.cookie, 0, &[0; 4096]);
                }
            },
            |v| matches!(v, ReplyViolation::UnknownCookie(_)),
        );
    }
}

#[test]
fn bad_reply_magic() {
    for offer in [Offer::Simple, Offer::Structured, Offer::Extended] {
        against_both_clients(
            &format!("{offer:?}: bad reply magic"),
            offer,
            Command::READ,
            |conn, _| {
                // As long as the longest reply header: 32 bytes.
                let mut h = vec![0x12, 0x34, 0x56, 0x78];
                h.resize(32, 0);
                conn.send(&h);
            },
            |v| matches!(v, ReplyViolation::BadMagic(Hex(0x1234_5678))),
        );
    }
    // The magic of a reply style that was not negotiated.
    against_both_clients(
        "structured reply without structured replies",
        Offer::Simple,
        Command::READ,
        |conn, req| {
            conn.structured = true;
            conn.chunk(req, ReplyFlags::DONE, ReplyChunkType::NONE, &[]);
        },
        |v| matches!(v, ReplyViolation::BadMagic(Hex(STRUCTURED_REPLY_MAGIC))),
    );
    against_both_clients(
        "simple reply with extended headers",
        Offer::Extended,
        Command::FLUSH,
        |conn, req| {
            // Two of them: the client reads 32-byte headers.
            conn.simple_reply(req.cookie, 0, &[]);
            conn.simple_reply(req.cookie, 0, &[]);
        },
        |v| matches!(v, ReplyViolation::SimpleReplyNotAllowed(_)),
    );
}

#[test]
fn chunks_outside_the_request() {
    for offer in [Offer::Structured, Offer::Extended] {
        // Data after the end of the request (the client reads 4 KiB at 4 KiB).
        against_both_clients(
            &format!("{offer:?}: data chunk after the request"),
            offer,
            Command::READ,
            |conn, req| conn.data_chunk(req, ReplyFlags::DONE, req.offset + 4096, &[9; 4096]),
            |v| matches!(v, ReplyViolation::OutsideRequest { offset: 8192, .. }),
        );
        // Data starting before the request.
        against_both_clients(
            &format!("{offer:?}: data chunk before the request"),
            offer,
            Command::READ,
            |conn, req| conn.data_chunk(req, ReplyFlags::DONE, 0, &[9; 4096]),
            |v| matches!(v, ReplyViolation::OutsideRequest { offset: 0, .. }),
        );
        // A hole whose offset + length wraps around 64 bits.
        against_both_clients(
            &format!("{offer:?}: hole chunk wrapping around"),
            offer,
            Command::READ,
            |conn, req| {
                let mut p = (u64::MAX - 10).to_be_bytes().to_vec();
                p.extend_from_slice(&4096u32.to_be_bytes());
                conn.chunk(req, ReplyFlags::DONE, ReplyChunkType::OFFSET_HOLE, &p);
            },
            |v| matches!(v, ReplyViolation::OutsideRequest { .. }),
        );
        // The same bytes twice.
        against_both_clients(
            &format!("{offer:?}: overlapping data chunks"),
            offer,
            Command::READ,
            |conn, req| {
                conn.data_chunk(req, ReplyFlags::empty(), req.offset, &[9; 4096]);
                conn.data_chunk(req, ReplyFlags::DONE, req.offset, &[9; 4096]);
            },
            |v| matches!(v, ReplyViolation::Overlap),
        );
        // A successful reply that covers only half the request.
        against_both_clients(
            &format!("{offer:?}: short read"),
            offer,
            Command::READ,
            |conn, req| conn.data_chunk(req, ReplyFlags::DONE, req.offset, &[9; 2048]),
            |v| {
                matches!(
                    v,
                    ReplyViolation::ShortRead {
                        got: 2048,
                        expected: 4096
                    }
                )
            },
        );
        // Read data in reply to a write.
        against_both_clients(
            &format!("{offer:?}: data chunk for a write"),
            offer,
            Command::WRITE,
            |conn, req| conn.data_chunk(req, ReplyFlags::DONE, req.offset, &[9; 4096]),
            |v| matches!(v, ReplyViolation::UnexpectedChunk { .. }),
        );
    }
}

#[test]
fn block_status_for_a_context_not_negotiated() {
    for offer in [Offer::Structured, Offer::Extended] {
        against_both_clients(
            &format!("{offer:?}: block status for context 99"),
            offer,
            Command::BLOCK_STATUS,
            |conn, req| {
                if conn.extended {
                    let mut p = BlockStatusExtHeader {
                        context_id: 99u32.into(),
                        count: 1u32.into(),
                    }
                    .as_bytes()
                    .to_vec();
                    let d = BlockDescriptorExt {
                        length: 4096u64.into(),
                        status: 0u64.into(),
                    };
                    p.extend_from_slice(d.as_bytes());
                    conn.chunk(req, ReplyFlags::DONE, ReplyChunkType::BLOCK_STATUS_EXT, &p);
                } else {
                    let mut p = 99u32.to_be_bytes().to_vec();
                    let d = BlockDescriptor {
                        length: 4096u32.into(),
                        status: 0u32.into(),
                    };
                    p.extend_from_slice(d.as_bytes());
                    conn.chunk(req, ReplyFlags::DONE, ReplyChunkType::BLOCK_STATUS, &p);
                }
            },
            |v| matches!(v, ReplyViolation::UnknownContext(99)),
        );
    }
    // The right context twice.
    against_both_clients(
        "block status for the same context twice",
        Offer::Structured,
        Command::BLOCK_STATUS,
        |conn, req| {
            let mut p = CONTEXT_ID.to_be_bytes().to_vec();
            p.extend_from_slice(&[0, 0, 16, 0, 0, 0, 0, 0]);
            conn.chunk(req, ReplyFlags::empty(), ReplyChunkType::BLOCK_STATUS, &p);
            conn.chunk(req, ReplyFlags::DONE, ReplyChunkType::BLOCK_STATUS, &p);
        },
        |v| matches!(v, ReplyViolation::DuplicateContext(CONTEXT_ID)),
    );
}

/// Chunk headers claiming gigabytes of payload that never come: the
/// client refuses them from the header alone (it does not wait for the
/// payload, which would hang, nor allocate it).
#[test]
fn chunks_with_huge_lengths() {
    type Case = (&'static str, Offer, Command, Misbehaviour, fn(&ReplyViolation) -> bool);
    let cases: [Case; 7] = [
        (
            "data chunk of 4 GiB",
            Offer::Structured,
            Command::READ,
            |conn, req| conn.chunk_header(req, ReplyFlags::DONE, ReplyChunkType::OFFSET_DATA, u32::MAX.into()),
            |v| matches!(v, ReplyViolation::ChunkTooLarge { limit: 4104, .. }),
        ),
        (
            "extended data chunk of 2^62 bytes",
            Offer::Extended,
            Command::READ,
            |conn, req| conn.chunk_header(req, ReplyFlags::DONE, ReplyChunkType::OFFSET_DATA, 1 << 62),
            |v| matches!(v, ReplyViolation::ChunkTooLarge { limit: 4104, .. }),
        ),
        (
            "error chunk of 4 GiB",
            Offer::Structured,
            Command::READ,
            |conn, req| conn.chunk_header(req, ReplyFlags::DONE, ReplyChunkType::ERROR, u32::MAX.into()),
            |v| matches!(v, ReplyViolation::ChunkTooLarge { .. }),
        ),
        (
            "extended error chunk of 2^63 bytes",
            Offer::Extended,
            Command::FLUSH,
            |conn, req| conn.chunk_header(req, ReplyFlags::DONE, ReplyChunkType::ERROR, 1 << 63),
            |v| matches!(v, ReplyViolation::ChunkTooLarge { .. }),
        ),
        (
            "block status chunk of 4 GiB",
            Offer::Structured,
            Command::BLOCK_STATUS,
            |conn, req| conn.chunk_header(req, ReplyFlags::DONE, ReplyChunkType::BLOCK_STATUS, 0xffff_fffc),
            |v| matches!(v, ReplyViolation::ChunkTooLarge { .. }),
        ),
        (
            "extended block status chunk of 2^60 bytes",
            Offer::Extended,
            Command::BLOCK_STATUS,
            |conn, req| conn.chunk_header(req, ReplyFlags::DONE, ReplyChunkType::BLOCK_STATUS_EXT, (1 << 60) + 8),
            |v| matches!(v, ReplyViolation::ChunkTooLarge { .. }),
        ),
        (
            "unknown chunk type with 4 GiB",
            Offer::Structured,
            Command::READ,
            |conn, req| conn.chunk_header(req, ReplyFlags::DONE, ReplyChunkType(77), u32::MAX.into()),
            |v| matches!(v, ReplyViolation::UnknownChunk(ReplyChunkType(77))),
        ),
    ];
    for (what, offer, command, misbehave, check) in cases {
        against_both_clients(what, offer, command, misbehave, check);
    }
}

/// An error message longer than its chunk, or than a string may be.
#[test]
fn error_chunks_that_lie() {
    against_both_clients(
        "error message longer than its chunk",
        Offer::Structured,
        Command::READ,
        |conn, req| {
            let mut p = ErrorCode::EIO.0.to_be_bytes().to_vec();
            p.extend_from_slice(&1000u16.to_be_bytes());
            p.extend_from_slice(b"short");
            conn.chunk(req, ReplyFlags::DONE, ReplyChunkType::ERROR, &p);
        },
        |v| matches!(v, ReplyViolation::BadErrorMessage(_)),
    );
    against_both_clients(
        "error chunk with error value 0",
        Offer::Structured,
        Command::READ,
        |conn, req| conn.chunk(req, ReplyFlags::DONE, ReplyChunkType::ERROR, &[0, 0, 0, 0, 0, 0]),
        |v| matches!(v, ReplyViolation::ZeroError),
    );
}

/// A server error with a value the spec does not define is still a typed
/// server error (to be treated as EINVAL), and the connection goes on.
#[test]
fn unknown_error_values_are_server_errors() {
    let fake = Fake::start(|conn| {
        conn.handshake(Offer::Simple);
        let req = conn.request();
        conn.simple_reply(req.cookie, 9999, &[]);
        let req = conn.request();
        conn.read_reply(&req, &[5; 4096]);
        conn.wait_closed();
    });
    let uri = fake.uri.clone();
    within("unknown error value", LIMIT, move || {
        let mut c = blocking_connect(&uri, Offer::Simple);
        match c.read(&mut [0u8; 4096], 0) {
            Err(Error::Server(e)) => {
                assert_eq!(e.code, ErrorCode(9999));
                assert_eq!(Error::Server(e).errno(), Some(22), "unknown values map to EINVAL");
            }
            other => panic!("{other:?}"),
        }
        let mut buf = [0u8; 4096];
        c.read(&mut buf, 0).unwrap();
        assert_eq!(buf, [5; 4096]);
    });
    fake.finish();
}

// ---------------------------------------------------------------------------
// The handshake
// ---------------------------------------------------------------------------

/// A handshake broken by the fake: the blocking and the async client
/// must both fail with a handshake violation for which `check` is true.
fn handshake_against_both(what: &str, script: fn(&mut Conn), check: fn(&HandshakeViolation) -> bool) {
    let fake = Fake::start(move |conn| {
        script(conn);
        conn.wait_closed();
    });
    let uri = fake.uri.clone();
    let r = within(what, LIMIT, move || Client::connect(&uri).map(|_| ()));
    match &r {
        Err(Error::Handshake(HandshakeError::Violation(v))) if check(v) => {
            eprintln!("blocking client, {what}: {}", r.as_ref().unwrap_err());
        }
        other => panic!("blocking client, {what}: {other:?}"),
    }
    fake.finish();

    let fake = Fake::start(move |conn| {
        script(conn);
        conn.wait_closed();
    });
    let r = block_on_within(what, LIMIT, AsyncClient::connect(&fake.uri));
    match &r {
        Err(AsyncError::Handshake(HandshakeError::Violation(v))) if check(v) => {
            eprintln!("async client, {what}: {}", r.as_ref().unwrap_err());
        }
        other => panic!("async client, {what}: {other:?}"),
    }
    drop(r);
    fake.finish();
    assert_no_huge_allocation(what);
}

#[test]
fn option_reply_claiming_4_gib() {
    handshake_against_both(
        "option reply of 4 GiB",
        |conn| {
            conn.greet();
            let (option, _) = conn.option();
            conn.option_reply_header(option, ReplyType::ACK, u32::MAX);
        },
        |v| matches!(v, HandshakeViolation::ReplyTooLarge { length: u32::MAX, .. }),
    );
    handshake_against_both(
        "NBD_REP_INFO of 4 GiB",
        |conn| {
            conn.greet();
            loop {
                let (option, _) = conn.option();
                if option == OptionType::GO {
                    conn.option_reply_header(option, ReplyType::INFO, u32::MAX - 3);
                    return;
                }
                conn.option_reply(option, ReplyType::ERR_UNSUP, &[]);
            }
        },
        |v| matches!(v, HandshakeViolation::ReplyTooLarge { .. }),
    );
    handshake_against_both(
        "error message of 4 GiB",
        |conn| {
            conn.greet();
            let (option, _) = conn.option();
            conn.option_reply_header(option, ReplyType::ERR_UNSUP, u32::MAX);
        },
        |v| matches!(v, HandshakeViolation::ReplyTooLarge { .. }),
    );
}

#[test]
fn broken_greetings_and_option_replies() {
    handshake_against_both(
        "an HTTP server",
        |conn| conn.send(b"HTTP/1.1 400 Bad Request\r\n\r\n"),
        |v| matches!(v, HandshakeViolation::BadInitPasswd(_)),
    );
    handshake_against_both(
        "a bad second magic",
        |conn| {
            let mut g = NBDMAGIC.to_be_bytes().to_vec();
            g.extend_from_slice(&0x1234u64.to_be_bytes());
            conn.send(&g);
        },
        |v| matches!(v, HandshakeViolation::BadMagic(Hex(0x1234))),
    );
    handshake_against_both(
        "a bad option reply magic",
        |conn| {
            conn.greet();
            conn.option();
            conn.send(&[0xee; 20]);
        },
        |v| matches!(v, HandshakeViolation::BadOptionReplyMagic(_)),
    );
    handshake_against_both(
        "a reply for another option",
        |conn| {
            conn.greet();
            conn.option();
            conn.option_reply(OptionType(0x4242), ReplyType::ACK, &[]);
        },
        |v| matches!(v, HandshakeViolation::WrongOption { .. }),
    );
    handshake_against_both(
        "a context reply with a name longer than its reply",
        |conn| {
            conn.greet();
            loop {
                let (option, _) = conn.option();
                match option {
                    OptionType::EXTENDED_HEADERS => conn.option_reply(option, ReplyType::ACK, &[]),
                    OptionType::SET_META_CONTEXT => {
                        // Id, then a name of 4097 bytes (too long for a string).
                        let mut p = 1u32.to_be_bytes().to_vec();
                        p.extend_from_slice(&[b'x'; 4097]);
                        conn.option_reply(option, ReplyType::META_CONTEXT, &p);
                        return;
                    }
                    _ => conn.option_reply(option, ReplyType::ERR_UNSUP, &[]),
                }
            }
        },
        |v| {
            matches!(
                v,
                HandshakeViolation::StringTooLong(_) | HandshakeViolation::ReplyTooLarge { .. }
            )
        },
    );
    handshake_against_both(
        "NBD_REP_ACK to NBD_OPT_GO without NBD_INFO_EXPORT",
        |conn| {
            conn.greet();
            loop {
                let (option, _) = conn.option();
                if option == OptionType::GO {
                    conn.option_reply(option, ReplyType::ACK, &[]);
                    return;
                }
                conn.option_reply(option, ReplyType::ERR_UNSUP, &[]);
            }
        },
        |v| matches!(v, HandshakeViolation::MissingInfoExport(_)),
    );
}

/// `NBD_OPT_LIST` answered with an export whose name length points far
/// past the end of its reply.
#[test]
fn export_list_with_a_lying_name_length() {
    let fake = Fake::start(|conn| {
        conn.greet();
        loop {
            let (option, _) = conn.option();
            if option == OptionType::LIST {
                let mut p = u32::MAX.to_be_bytes().to_vec();
                p.extend_from_slice(b"disk");
                conn.option_reply(option, ReplyType::SERVER, &p);
                break;
            }
            conn.option_reply(option, ReplyType::ERR_UNSUP, &[]);
        }
        conn.wait_closed();
    });
    let uri = fake.uri.clone();
    let r = within("NBD_OPT_LIST", LIMIT, move || {
        let mut n = Negotiation::connect(&nbd_uri(&uri), ClientConfig::default())?;
        n.list()
    });
    match &r {
        Err(Error::Handshake(HandshakeError::Violation(v))) => eprintln!("NBD_OPT_LIST with a lying name: {v}"),
        other => panic!("{other:?}"),
    }
    fake.finish();
    assert_no_huge_allocation("a lying export name length");
}

/// A server that accepts the connection and never says a word (or stops
/// after the greeting).
///
/// The blocking client has no timeout of its own: `Client::connect` would
/// wait forever. A caller that needs a bound connects the socket itself,
/// sets a read timeout, and negotiates over it with `Client::handshake`,
/// which then fails with the timeout's `io::Error`. The async client can
/// be cancelled by dropping its future (here with a timeout around it);
/// the socket is closed and nothing panics.
#[test]
fn a_server_that_never_answers_the_handshake() {
    for greet in [false, true] {
        let what = if greet { "silent after the greeting" } else { "silent" };
        // The blocking client, with a read timeout set by the caller.
        let dir = TempDir::new();
        let socket = dir.socket_path("silent");
        let listener = UnixListener::bind(&socket).unwrap();
        let server = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            if greet {
                s.write_all(&NBDMAGIC.to_be_bytes()).unwrap();
                s.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
                s.write_all(&3u16.to_be_bytes()).unwrap();
            }
            // Wait for the client to give up and hang up.
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut sink = Vec::new();
            s.read_to_end(&mut sink).expect("the client hung up");
        });
        let sock = socket.clone();
        let started = Instant::now();
        let r = within(what, LIMIT, move || {
            let s = UnixStream::connect(&sock).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
            Client::handshake(s, ClientConfig::default()).map(|_| ())
        });
        match r {
            Err(Error::Io(e)) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            other => panic!("blocking client, {what}: {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(2));
        server.join().unwrap();

        // The async client, cancelled by a timeout.
        let listener = UnixListener::bind(dir.socket_path("silent")).unwrap();
        let uri = Endpoint::Unix(listener.local_addr().unwrap().as_pathname().unwrap().to_owned()).uri("");
        let server = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            if greet {
                s.write_all(&NBDMAGIC.to_be_bytes()).unwrap();
                s.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
                s.write_all(&3u16.to_be_bytes()).unwrap();
            }
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut sink = Vec::new();
            s.read_to_end(&mut sink).expect("the client hung up");
        });
        let gave_up = block_on_within(what, LIMIT, async {
            let connect = async { Some(AsyncClient::connect(&uri).await) };
            let timeout = async {
                smol::Timer::after(Duration::from_millis(300)).await;
                None
            };
            smol::future::or(connect, timeout).await.is_none()
        });
        assert!(gave_up, "async client, {what}: the handshake finished?");
        // Dropping the future closed the socket: the server sees EOF.
        server.join().unwrap();
    }
}

// ---------------------------------------------------------------------------
// A server that dies, or goes quiet, in transmission
// ---------------------------------------------------------------------------

/// The server dies in the middle of a READ reply. The blocking client
/// returns an error; the async client fails every outstanding request at
/// once (and completes the ones that were answered).
#[test]
fn a_server_that_dies_mid_reply() {
    for offer in [Offer::Simple, Offer::Structured, Offer::Extended] {
        // Blocking.
        let fake = Fake::start(move |conn| {
            conn.handshake(offer);
            let req = conn.request();
            if conn.structured {
                let mut p = req.offset.to_be_bytes().to_vec();
                p.extend_from_slice(&[1; 1000]);
                conn.chunk_header(&req, ReplyFlags::DONE, ReplyChunkType::OFFSET_DATA, 8 + req.length);
                conn.send(&p);
            } else {
                conn.simple_reply(req.cookie, 0, &[1; 1000]);
            }
            // Dies: the connection is dropped.
        });
        let uri = fake.uri.clone();
        let (first, second) = within("dies mid-reply", LIMIT, move || {
            let mut c = blocking_connect(&uri, offer);
            let mut buf = vec![0u8; 65536];
            let first = c.read(&mut buf, 0);
            let second = c.read(&mut buf, 0);
            (first, second)
        });
        match &first {
            Err(e @ Error::Disconnected(_)) => assert!(e.to_string().contains("in the middle of a reply"), "{e}"),
            other => panic!("blocking client, {offer:?}: {other:?}"),
        }
        assert!(second.is_err(), "{second:?}");
        fake.finish();

        // Async: eight reads in flight; two are answered, the third is cut.
        let fake = Fake::start(move |conn| {
            conn.handshake(offer);
            let reqs: Vec<Req> = (0..8).map(|_| conn.request()).collect();
            for req in &reqs[..2] {
                conn.read_reply(req, &vec![req.offset as u8; req.length as usize]);
            }
            if conn.structured {
                conn.chunk_header(
                    &reqs[2],
                    ReplyFlags::DONE,
                    ReplyChunkType::OFFSET_DATA,
                    8 + reqs[2].length,
                );
                conn.send(&reqs[2].offset.to_be_bytes());
                conn.send(&[1; 100]);
            } else {
                conn.simple_reply(reqs[2].cookie, 0, &[1; 100]);
            }
            // Give the client time to take in what was sent.
            thread::sleep(Duration::from_millis(100));
        });
        let uri = fake.uri.clone();
        block_on_within("async, dies mid-reply", LIMIT, async {
            let c = AsyncClient::connect_uri(&nbd_uri(&uri), config(offer).max_in_flight(16))
                .await
                .unwrap();
            let tasks: Vec<_> = (0..8u64)
                .map(|i| {
                    let c = c.clone();
                    smol::spawn(async move { c.read(vec![0u8; 65536], i * 65536).await })
                })
                .collect();
            let mut ok = 0;
            let mut failed = 0;
            for t in tasks {
                match t.await {
                    (Ok(()), buf) => {
                        assert!(buf.iter().all(|&b| b == buf[0]), "{offer:?}: data of an answered read");
                        ok += 1;
                    }
                    (Err(AsyncError::Disconnected(_)), _) => failed += 1,
                    (Err(e), _) => panic!("{offer:?}: {e:?}"),
                }
            }
            assert_eq!((ok, failed), (2, 6), "{offer:?}");
            assert!(matches!(c.flush().await, Err(AsyncError::Disconnected(_))));
        });
        fake.finish();
    }
}

/// The async client gives up on a request the server does not answer (the
/// caller's timeout drops its future); when the late reply comes, the
/// client drains it and the connection goes on.
#[test]
fn a_late_reply_to_an_abandoned_request_is_drained() {
    for offer in [Offer::Simple, Offer::Structured, Offer::Extended] {
        let (late_tx, late_rx) = mpsc::channel::<()>();
        let fake = Fake::start(move |conn| {
            conn.handshake(offer);
            let slow = conn.request();
            // Answer only after the client gave up on it.
            late_rx.recv_timeout(Duration::from_secs(10)).unwrap();
            conn.read_reply(&slow, &vec![0xab; slow.length as usize]);
            let next = conn.request();
            conn.read_reply(&next, &vec![0xcd; next.length as usize]);
            conn.wait_closed();
        });
        let uri = fake.uri.clone();
        block_on_within("an abandoned request", LIMIT, async {
            let c = AsyncClient::connect_uri(&nbd_uri(&uri), config(offer).max_in_flight(4))
                .await
                .unwrap();
            let slow = async { Some(c.read(vec![0u8; 1 << 20], 0).await) };
            let timeout = async {
                smol::Timer::after(Duration::from_millis(200)).await;
                None
            };
            assert!(smol::future::or(slow, timeout).await.is_none());
            late_tx.send(()).unwrap();
            let (r, buf) = c.read(vec![0u8; 4096], 1 << 20).await;
            r.unwrap();
            assert!(
                buf.iter().all(|&b| b == 0xcd),
                "{offer:?}: the answer to the second read"
            );
            assert!(!c.is_closed());
        });
        fake.finish();
    }
}

/// A server that sends a reply nobody asked for while the client is idle
/// (an unknown cookie with no request in flight).
#[test]
fn an_unsolicited_reply() {
    let fake = Fake::start(|conn| {
        conn.handshake(Offer::Structured);
        let req = Req {
            command: Command::READ,
            cookie: 12345,
            offset: 0,
            length: 0,
        };
        conn.chunk(&req, ReplyFlags::DONE, ReplyChunkType::NONE, &[]);
        conn.wait_closed();
    });
    let uri = fake.uri.clone();
    block_on_within("an unsolicited reply", LIMIT, async {
        let c = AsyncClient::connect_uri(&nbd_uri(&uri), config(Offer::Structured).max_in_flight(4))
            .await
            .unwrap();
        // The reader task notices at once and the connection is dead.
        let deadline = Instant::now() + Duration::from_secs(2);
        while !c.is_closed() {
            assert!(Instant::now() < deadline, "the client did not notice");
            smol::Timer::after(Duration::from_millis(10)).await;
        }
        match c.read(vec![0u8; 512], 0).await.0 {
            Err(AsyncError::Disconnected(why)) => assert!(why.contains("unknown cookie 0x3039"), "{why}"),
            other => panic!("{other:?}"),
        }
    });
    fake.finish();
}

/// A server that stops reading requests: the async client's writes back
/// up. The caller's timeout gives up on them; dropping the client then
/// closes the connection (the server sees EOF) without a panic or a hang.
/// (The blocking client has no write timeout: a caller who needs one sets
/// it on the socket and uses `Client::handshake`, as for reads above.)
#[test]
fn a_server_that_stops_reading_requests() {
    let (dropped_tx, dropped_rx) = mpsc::channel::<()>();
    let fake = Fake::start(move |conn| {
        conn.handshake(Offer::Extended);
        // Read nothing until the client is gone, then drain to the EOF.
        dropped_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        conn.wait_closed();
    });
    let uri = fake.uri.clone();
    block_on_within("a server that stops reading", LIMIT, async {
        let c = AsyncClient::connect_uri(&nbd_uri(&uri), config(Offer::Extended).max_in_flight(16))
            .await
            .unwrap();
        let writes: Vec<_> = (0..16u64)
            .map(|i| {
                let c = c.clone();
                smol::spawn(async move { c.write(vec![i as u8; 1 << 20], i << 20).await.0 })
            })
            .collect();
        let all = async {
            for w in writes {
                let _ = w.await;
            }
            Some(())
        };
        let timeout = async {
            smol::Timer::after(Duration::from_millis(500)).await;
            None
        };
        assert!(
            smol::future::or(all, timeout).await.is_none(),
            "16 MiB of writes completed although the server reads nothing"
        );
        assert!(!c.is_closed());
        drop(c);
    });
    dropped_tx.send(()).unwrap();
    fake.finish();
}

/// A server that answers `NBD_OPT_LIST` (or `NBD_OPT_SET_META_CONTEXT`)
/// with replies that never end: the client stops at its limit (65536
/// exports, 4096 contexts) with a clear error instead of collecting them
/// until memory runs out.
#[test]
fn endless_option_replies() {
    // Sends `reply` to `option` until the client hangs up.
    fn endless(conn: &mut Conn, option: OptionType, reply: ReplyType, data: impl Fn(u32) -> Vec<u8>) {
        conn.greet();
        loop {
            let (o, _) = conn.option();
            if o == option {
                break;
            }
            let answer = if o == OptionType::EXTENDED_HEADERS {
                ReplyType::ACK
            } else {
                ReplyType::ERR_UNSUP
            };
            conn.option_reply(o, answer, &[]);
        }
        let mut batch = Vec::new();
        for i in 0u32.. {
            let d = data(i);
            let h = OptionReplyHeader {
                magic: OPTION_REPLY_MAGIC.into(),
                option: option.0.into(),
                reply_type: reply.0.into(),
                length: (d.len() as u32).into(),
            };
            batch.extend_from_slice(h.as_bytes());
            batch.extend_from_slice(&d);
            if batch.len() > 64 * 1024 {
                if conn.s.write_all(&batch).is_err() {
                    return;
                }
                batch.clear();
            }
            assert!(i < 10_000_000, "the client never gave up");
        }
    }

    let fake = Fake::start(|conn| {
        endless(conn, OptionType::LIST, ReplyType::SERVER, |i| {
            let name = format!("export-{i}");
            let mut d = (name.len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(name.as_bytes());
            d
        })
    });
    let uri = fake.uri.clone();
    let r = within("an endless export list", Duration::from_secs(20), move || {
        let mut n = Negotiation::connect(&nbd_uri(&uri), ClientConfig::default())?;
        n.list()
    });
    match &r {
        Err(Error::Handshake(HandshakeError::Violation(v @ HandshakeViolation::TooManyReplies { .. }))) => {
            eprintln!("an endless export list: {v}");
        }
        other => panic!("an endless export list: {:?}", other.as_ref().map(|l| l.len())),
    }
    fake.finish();

    handshake_against_both(
        "endless metadata contexts",
        |conn| {
            endless(conn, OptionType::SET_META_CONTEXT, ReplyType::META_CONTEXT, |i| {
                let mut d = (i + 1).to_be_bytes().to_vec();
                d.extend_from_slice(CONTEXT_BASE_ALLOCATION.as_bytes());
                d
            })
        },
        |v| matches!(v, HandshakeViolation::TooManyReplies { .. }),
    );
    assert_no_huge_allocation("endless option replies");
}

/// The blocking client, with a write timeout set by its caller, against a
/// server that reads nothing: a 16 MiB WRITE times out part-way through
/// its payload. The stream is out of step from then on, so every later
/// request must fail at once (`Error::Disconnected`) rather than send a
/// header into the middle of the old payload.
#[test]
fn blocking_client_fails_for_good_after_a_failed_send() {
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let fake = Fake::start(move |conn| {
        conn.handshake(Offer::Simple);
        go_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        conn.wait_closed();
    });
    let socket = fake.socket.clone();
    within("a send that times out", LIMIT, move || {
        let s = UnixStream::connect(&socket).unwrap();
        s.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut c = Client::handshake(s, config(Offer::Simple)).unwrap();
        match c.write(&vec![1u8; 16 << 20], 0) {
            Err(Error::Io(e)) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            other => panic!("the write: {other:?}"),
        }
        match c.read(&mut [0u8; 512], 0) {
            Err(Error::Disconnected(_)) => {}
            other => panic!("a read after the failed write: {other:?}"),
        }
    });
    go_tx.send(()).unwrap();
    fake.finish();
}
