//! Our servers facing clients that misbehave.
//!
//! Each test talks to `nbd-serve` (and, where it is cheap, to the blocking
//! server `nbd_blocking::server::Server`) over a raw Unix socket, writing
//! the bytes of a client that breaks the protocol: bad magics, unknown
//! flags, option and payload lengths that lie, requests out of range or for
//! commands that were not advertised, writes to read-only exports, clients
//! that stop reading their replies, never finish the handshake, or come a
//! thousand at once.
//!
//! Every case asserts what the server did (an option error reply, a reply
//! with the right NBD error value, or a hard disconnect with the broken rule
//! in its log) and that it kept its promises: no panic, no hang (every
//! socket read here has a timeout), no memory sized from an unchecked
//! length (the server's `VmHWM` is checked where a length is huge), and a
//! well-behaved client on another connection is still served afterwards.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use nbd_blocking::client::Client;
use nbd_blocking::server::{Server as BlockingServer, ServerOptions};
use nbd_proto::wire::{
    ClientFlags, Command, CommandFlags, EXTENDED_REPLY_MAGIC, EXTENDED_REQUEST_MAGIC, ErrorCode, ExtendedRequestHeader,
    HandshakeFlags, IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC, OptionHeader, OptionType, REQUEST_MAGIC, ReplyChunkType,
    ReplyFlags, ReplyType, RequestHeader, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, TransmissionFlags,
};
use nbd_server::Export;
use nbd_storage::MemoryStorage;
use nbd_tests::*;
use zerocopy::IntoBytes;

const MIB: u64 = 1 << 20;

/// Size of every export here: sparse, larger than 32 bits so that huge
/// reads are in range and must be refused for their size alone.
const SIZE: u64 = 6 << 30;

/// Every socket operation of a raw client gives up after this long, so a
/// server that hangs fails the test instead of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a server may take to hang up on a client that broke a rule.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Peak resident memory nbd-serve may reach in the tests that make it face
/// huge lengths (it needs a few MiB; a buffer sized from one of those
/// lengths would be 2 GiB or more).
const HWM_LIMIT_KIB: u64 = 256 * 1024;

/// A field of `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`, ...).
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_else(|e| panic!("/proc/{pid}: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Number of open file descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

// ---------------------------------------------------------------------------
// A raw client
// ---------------------------------------------------------------------------

/// Which reply style a raw connection negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    /// `NBD_OPT_GO` alone: simple replies, compact requests.
    Simple,
    /// `NBD_OPT_STRUCTURED_REPLY`, then `NBD_OPT_GO`.
    Structured,
    /// `NBD_OPT_EXTENDED_HEADERS`, then `NBD_OPT_GO`: 64-bit requests.
    Extended,
}

/// A complete reply to one request.
#[derive(Debug)]
struct Reply {
    /// The NBD error value (0: success).
    error: u32,
    /// The error chunk's message, if any.
    message: String,
    /// The data of a READ, assembled from its chunks.
    data: Vec<u8>,
}

impl Reply {
    fn code(&self) -> ErrorCode {
        ErrorCode(self.error)
    }
}

/// A client writing raw protocol bytes on a Unix socket, with timeouts on
/// every read and write.
struct Raw {
    /// The server under test (or the case), for messages.
    who: String,
    s: UnixStream,
    style: Style,
    next_cookie: u64,
    /// Offset, length and command of each request sent and not answered.
    in_flight: HashMap<u64, (u64, u64, Command)>,
}

impl Raw {
    fn new(s: UnixStream) -> Raw {
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        Raw {
            who: "server".to_owned(),
            s,
            style: Style::Simple,
            next_cookie: 1,
            in_flight: HashMap::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.s
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("{}: sending {} bytes to the server: {e}", self.who, bytes.len()));
    }

    /// Sends what the server may no longer want (it may have hung up).
    fn try_send(&mut self, bytes: &[u8]) {
        let _ = self.s.write_all(bytes);
    }

    fn recv(&mut self, n: usize) -> Vec<u8> {
        assert!(n <= 64 << 20, "the server announced {n} bytes");
        let mut b = vec![0u8; n];
        self.s
            .read_exact(&mut b)
            .unwrap_or_else(|e| panic!("{}: reading {n} bytes from the server: {e}", self.who));
        b
    }

    fn recv_u16(&mut self) -> u16 {
        u16::from_be_bytes(self.recv(2).try_into().unwrap())
    }

    fn recv_u32(&mut self) -> u32 {
        u32::from_be_bytes(self.recv(4).try_into().unwrap())
    }

    fn recv_u64(&mut self) -> u64 {
        u64::from_be_bytes(self.recv(8).try_into().unwrap())
    }

    /// Reads the newstyle greeting; returns the handshake flags.
    fn greeting(&mut self) -> HandshakeFlags {
        assert_eq!(self.recv_u64(), NBDMAGIC, "NBDMAGIC");
        assert_eq!(self.recv_u64(), IHAVEOPT, "IHAVEOPT (fixed newstyle)");
        HandshakeFlags::from_bits_retain(self.recv_u16())
    }

    /// Connects over `s`, reads the greeting and answers with the client
    /// flags a good client sends: ready for options.
    fn newstyle(s: UnixStream) -> Raw {
        let mut raw = Raw::new(s);
        let hs = raw.greeting();
        assert!(hs.contains(HandshakeFlags::FIXED_NEWSTYLE), "{hs:?}");
        let mut flags = ClientFlags::FIXED_NEWSTYLE;
        if hs.contains(HandshakeFlags::NO_ZEROES) {
            flags |= ClientFlags::NO_ZEROES;
        }
        raw.send(&flags.bits().to_be_bytes());
        raw
    }

    fn option_header(&mut self, magic: u64, option: OptionType, length: u32) {
        let h = OptionHeader {
            magic: magic.into(),
            option: option.0.into(),
            length: length.into(),
        };
        self.send(h.as_bytes());
    }

    fn option(&mut self, option: OptionType, data: &[u8]) {
        self.option_header(IHAVEOPT, option, data.len().try_into().unwrap());
        self.send(data);
    }

    /// One option reply: the option it answers, its type and its data.
    fn option_reply(&mut self) -> (OptionType, ReplyType, Vec<u8>) {
        assert_eq!(self.recv_u64(), OPTION_REPLY_MAGIC, "option reply magic");
        let option = OptionType(self.recv_u32());
        let reply = ReplyType(self.recv_u32());
        let len = self.recv_u32();
        assert!(len <= 1 << 20, "option reply of {len} bytes");
        let data = self.recv(len as usize);
        (option, reply, data)
    }

    /// Expects an error reply `expected` to `option`; returns its message.
    fn expect_option_error(&mut self, option: OptionType, expected: ReplyType) -> String {
        let (o, r, data) = self.option_reply();
        assert_eq!((o, r), (option, expected), "{}", String::from_utf8_lossy(&data));
        String::from_utf8_lossy(&data).into_owned()
    }

    /// Negotiates `style` and enters transmission on the default export;
    /// returns the export size and transmission flags.
    fn go(&mut self, style: Style) -> (u64, TransmissionFlags) {
        let extra = match style {
            Style::Simple => None,
            Style::Structured => Some(OptionType::STRUCTURED_REPLY),
            Style::Extended => Some(OptionType::EXTENDED_HEADERS),
        };
        if let Some(option) = extra {
            self.option(option, &[]);
            let (o, r, _) = self.option_reply();
            assert_eq!((o, r), (option, ReplyType::ACK));
        }
        // Name length 0 (the default export), no information requests.
        self.option(OptionType::GO, &[0, 0, 0, 0, 0, 0]);
        let mut export = None;
        loop {
            let (o, r, data) = self.option_reply();
            assert_eq!(o, OptionType::GO);
            match r {
                ReplyType::INFO if data.len() == 12 && data[..2] == [0, 0] => {
                    let size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                    let flags = u16::from_be_bytes(data[10..12].try_into().unwrap());
                    export = Some((size, TransmissionFlags::from_bits_retain(flags)));
                }
                ReplyType::INFO => {}
                ReplyType::ACK => break,
                r => panic!("NBD_OPT_GO answered with {r}: {}", String::from_utf8_lossy(&data)),
            }
        }
        self.style = style;
        export.expect("NBD_INFO_EXPORT")
    }

    /// Sends a request header (compact or extended, as negotiated) with a
    /// raw command and flags; returns its cookie.
    fn request(&mut self, command: Command, flags: CommandFlags, offset: u64, length: u64) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        self.request_with_magic(None, command, flags, cookie, offset, length);
        self.in_flight.insert(cookie, (offset, length, command));
        cookie
    }

    fn request_with_magic(
        &mut self,
        magic: Option<u32>,
        command: Command,
        flags: CommandFlags,
        cookie: u64,
        offset: u64,
        length: u64,
    ) {
        if self.style == Style::Extended {
            let h = ExtendedRequestHeader {
                magic: magic.unwrap_or(EXTENDED_REQUEST_MAGIC).into(),
                flags: flags.bits().into(),
                command: command.0.into(),
                cookie: cookie.into(),
                offset: offset.into(),
                length: length.into(),
            };
            self.send(h.as_bytes());
        } else {
            let h = RequestHeader {
                magic: magic.unwrap_or(REQUEST_MAGIC).into(),
                flags: flags.bits().into(),
                command: command.0.into(),
                cookie: cookie.into(),
                offset: offset.into(),
                length: u32::try_from(length).expect("compact length").into(),
            };
            self.send(h.as_bytes());
        }
    }

    /// Reads the complete reply to `cookie` (which must come next).
    fn reply(&mut self, cookie: u64) -> Reply {
        let (req_offset, req_len, command) = self.in_flight.remove(&cookie).expect("a request in flight");
        let is_read = command == Command::READ;
        let mut reply = Reply {
            error: 0,
            message: String::new(),
            // Sized from our own request, not from the server's reply (a
            // hostile request may claim gigabytes: then no data is kept).
            data: if is_read && req_len <= 64 * MIB {
                vec![0xa5; req_len as usize]
            } else {
                Vec::new()
            },
        };
        loop {
            let magic = self.recv_u32();
            if magic == SIMPLE_REPLY_MAGIC {
                assert_ne!(self.style, Style::Extended, "simple reply with extended headers");
                reply.error = self.recv_u32();
                assert_eq!(self.recv_u64(), cookie, "cookie of the simple reply");
                if reply.error == 0 && is_read {
                    reply.data = self.recv(req_len as usize);
                }
                return reply;
            }
            let extended = match magic {
                STRUCTURED_REPLY_MAGIC if self.style == Style::Structured => false,
                EXTENDED_REPLY_MAGIC if self.style == Style::Extended => true,
                m => panic!("reply magic {m:#x} in {:?} style", self.style),
            };
            let flags = ReplyFlags::from_bits_retain(self.recv_u16());
            let chunk = ReplyChunkType(self.recv_u16());
            assert_eq!(self.recv_u64(), cookie, "cookie of the {chunk} chunk");
            let len = if extended {
                assert_eq!(self.recv_u64(), req_offset, "offset of the extended {chunk} chunk");
                self.recv_u64()
            } else {
                u64::from(self.recv_u32())
            };
            let payload = self.recv(usize::try_from(len).unwrap());
            match chunk {
                ReplyChunkType::NONE => assert!(payload.is_empty()),
                ReplyChunkType::OFFSET_DATA | ReplyChunkType::OFFSET_HOLE => {
                    assert!(is_read, "{chunk} in reply to {command}");
                    let at = u64::from_be_bytes(payload[..8].try_into().unwrap());
                    let start = usize::try_from(at - req_offset).unwrap();
                    if chunk == ReplyChunkType::OFFSET_DATA {
                        reply.data[start..start + payload.len() - 8].copy_from_slice(&payload[8..]);
                    } else {
                        let n = u32::from_be_bytes(payload[8..12].try_into().unwrap()) as usize;
                        reply.data[start..start + n].fill(0);
                    }
                }
                ReplyChunkType::ERROR | ReplyChunkType::ERROR_OFFSET => {
                    reply.error = u32::from_be_bytes(payload[..4].try_into().unwrap());
                    let n = u16::from_be_bytes(payload[4..6].try_into().unwrap()) as usize;
                    reply.message = String::from_utf8_lossy(&payload[6..6 + n]).into_owned();
                }
                ReplyChunkType::BLOCK_STATUS | ReplyChunkType::BLOCK_STATUS_EXT => {}
                other => panic!("unexpected chunk {other}"),
            }
            if flags.contains(ReplyFlags::DONE) {
                return reply;
            }
        }
    }

    /// Sends a request and reads its reply.
    fn roundtrip(&mut self, command: Command, flags: CommandFlags, offset: u64, length: u64, payload: &[u8]) -> Reply {
        let cookie = self.request(command, flags, offset, length);
        self.send(payload);
        self.reply(cookie)
    }

    /// Expects the reply to a request to be error `code`.
    fn expect_error(&mut self, code: ErrorCode, command: Command, flags: CommandFlags, offset: u64, length: u64) {
        let payload = if command == Command::WRITE && length < (64 << 20) {
            vec![0x5a; length as usize]
        } else {
            Vec::new()
        };
        let r = self.roundtrip(command, flags, offset, length, &payload);
        assert_eq!(
            r.code(),
            code,
            "{command} flags {flags:?} offset {offset} length {length} in {:?} style: {r:?}",
            self.style
        );
    }

    /// A write and a read that must work: the connection is still in
    /// step with the server.
    fn assert_in_sync(&mut self, offset: u64) {
        let data = pattern(4096, offset);
        let w = self.roundtrip(Command::WRITE, CommandFlags::empty(), offset, 4096, &data);
        assert_eq!(w.error, 0, "write after the hostile request: {w:?}");
        let r = self.roundtrip(Command::READ, CommandFlags::empty(), offset, 4096, &[]);
        assert_eq!(r.error, 0, "read after the hostile request: {r:?}");
        assert!(r.data == data, "read back other data than written");
    }

    /// Reads (and drops) whatever the server still sends until it closes
    /// the connection; panics if it does not within [`CLOSE_TIMEOUT`].
    /// Returns how long that took and how many bytes came.
    fn expect_closed(&mut self) -> (Duration, usize) {
        expect_closed(&mut self.s, Instant::now() + CLOSE_TIMEOUT, &self.who)
    }
}

/// Reads from `s` until EOF (or a reset) before `deadline`.
fn expect_closed(s: &mut UnixStream, deadline: Instant, who: &str) -> (Duration, usize) {
    let started = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "{who}: the server kept the connection open for {:?}",
            started.elapsed()
        );
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return (started.elapsed(), total),
            Ok(n) => total += n,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return (started.elapsed(), total),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!(
                "{who}: the server kept the connection open for {:?} ({e})",
                started.elapsed()
            ),
        }
    }
}

// ---------------------------------------------------------------------------
// The servers under test
// ---------------------------------------------------------------------------

enum Kind {
    /// `nbd-serve` in a child process.
    Serve(Peer),
    /// The blocking server in a thread of the test.
    Blocking {
        server: BlockingServer,
        thread: Option<thread::JoinHandle<io::Result<()>>>,
    },
}

/// A server under test.
struct Target {
    name: &'static str,
    socket: PathBuf,
    kind: Kind,
}

/// A hostile connection: the raw client, and for the blocking server the
/// result of its `serve_connection`.
struct Hostile {
    raw: Raw,
    result: Option<mpsc::Receiver<io::Result<()>>>,
    /// For nbd-serve: the length of its log when the connection was made.
    log_from: usize,
}

impl Target {
    /// `nbd-serve --socket SOCKET ARGS...` serving a 6 GiB memory export.
    fn serve(dir: &TempDir, args: &[&str]) -> Target {
        let socket = dir.socket_path("nbd-serve");
        let socket_arg = socket.to_str().expect("UTF-8 path").to_owned();
        let mut full = vec!["--socket", socket_arg.as_str(), "--memory", "6G"];
        full.extend_from_slice(args);
        let peer = Peer::start(dir, &our_bin("nbd-serve"), &full, Endpoint::Unix(socket.clone()));
        Target {
            name: "nbd-serve",
            socket,
            kind: Kind::Serve(peer),
        }
    }

    /// The blocking server on a 6 GiB memory export, in a thread.
    fn blocking(dir: &TempDir, read_only: bool, handshake_timeout: Duration) -> Target {
        let socket = dir.socket_path("blocking");
        let listener = UnixListener::bind(&socket).unwrap();
        let storage = Arc::new(MemoryStorage::with_options(SIZE, read_only));
        let options = ServerOptions::default()
            .config(nbd_proto::server::ServerConfig::default().handshake_timeout(Some(handshake_timeout)));
        let server = BlockingServer::new(vec![Export::new("", "", storage)], options);
        let thread = {
            let server = server.clone();
            Some(thread::spawn(move || server.serve_unix(listener)))
        };
        Target {
            name: "blocking server",
            socket,
            kind: Kind::Blocking { server, thread },
        }
    }

    /// Both servers, read-write or read-only, with a handshake timeout of
    /// `timeout_secs`.
    fn both(dir: &TempDir, read_only: bool, timeout_secs: u64) -> [Target; 2] {
        let secs = timeout_secs.to_string();
        let mut args = vec!["--handshake-timeout", secs.as_str()];
        if read_only {
            args.push("-r");
        }
        [
            Target::serve(dir, &args),
            Target::blocking(dir, read_only, Duration::from_secs(timeout_secs)),
        ]
    }

    fn uri(&self) -> String {
        Endpoint::Unix(self.socket.clone()).uri("")
    }

    fn pid(&self) -> u32 {
        match &self.kind {
            Kind::Serve(peer) => peer.pid(),
            Kind::Blocking { .. } => std::process::id(),
        }
    }

    /// A new connection for a hostile client. For the blocking server the
    /// connection is served by `serve_connection` (what its accept loop
    /// runs per client) in a thread, so the test sees the error it ends
    /// with.
    fn open(&self) -> Hostile {
        match &self.kind {
            Kind::Serve(_) => {
                let log_from = self.log().len();
                let mut raw = Raw::new(UnixStream::connect(&self.socket).unwrap());
                raw.who = self.name.to_owned();
                Hostile {
                    raw,
                    result: None,
                    log_from,
                }
            }
            Kind::Blocking { server, .. } => {
                let (ours, theirs) = UnixStream::pair().unwrap();
                let (tx, rx) = mpsc::channel();
                let server = server.clone();
                thread::spawn(move || {
                    let _ = tx.send(server.serve_connection(theirs));
                });
                let mut raw = Raw::new(ours);
                raw.who = self.name.to_owned();
                Hostile {
                    raw,
                    result: Some(rx),
                    log_from: 0,
                }
            }
        }
    }

    /// A hostile connection that has done the greeting and client flags.
    fn open_newstyle(&self) -> Hostile {
        let h = self.open();
        let mut raw = Raw::newstyle(h.raw.s);
        raw.who = self.name.to_owned();
        Hostile { raw, ..h }
    }

    /// A hostile connection in transmission with `style`.
    fn open_transmission(&self, style: Style) -> Hostile {
        let mut h = self.open_newstyle();
        let (size, _) = h.raw.go(style);
        assert_eq!(size, SIZE);
        h
    }

    /// Asserts that the server ended connection `h` because of an error
    /// whose text contains `needle`: nbd-serve logs it, the blocking
    /// server's `serve_connection` returns it.
    fn assert_failed(&self, h: Hostile, needle: &str) {
        match (&self.kind, h.result) {
            (Kind::Serve(_), _) => self.assert_logged_after(h.log_from, needle),
            (Kind::Blocking { .. }, Some(rx)) => {
                let r = rx
                    .recv_timeout(CLOSE_TIMEOUT)
                    .expect("the blocking server still serves the hostile connection");
                let e = r.expect_err("the blocking server ended the hostile connection without an error");
                assert!(
                    e.to_string().contains(needle),
                    "blocking server: {e}, expected {needle:?}"
                );
            }
            (Kind::Blocking { .. }, None) => unreachable!(),
        }
    }

    /// nbd-serve's log (empty for the blocking server).
    fn log(&self) -> String {
        match &self.kind {
            Kind::Serve(peer) => peer.stderr(),
            Kind::Blocking { .. } => String::new(),
        }
    }

    /// nbd-serve's log contains `needle` (within [`CLOSE_TIMEOUT`]).
    fn assert_logged(&self, needle: &str) {
        self.assert_logged_after(0, needle);
    }

    /// nbd-serve's log, past its first `from` bytes, contains `needle`
    /// (within [`CLOSE_TIMEOUT`]).
    fn assert_logged_after(&self, from: usize, needle: &str) {
        assert!(matches!(self.kind, Kind::Serve(_)), "only nbd-serve has a log");
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        while !self.log().get(from..).unwrap_or("").contains(needle) {
            assert!(
                Instant::now() < deadline,
                "nbd-serve did not log {needle:?}; its log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// A well-behaved client on a new connection is served: it writes
    /// (unless the export is read-only) and reads back.
    fn assert_serving(&self, what: &str) {
        let uri = self.uri();
        let mut c = Client::connect(&uri).unwrap_or_else(|e| panic!("{}, after {what}: connect: {e}", self.name));
        let offset = 40 * MIB + 4096;
        let mut back = vec![0u8; 65536];
        if c.is_read_only() {
            c.read(&mut back, offset)
                .unwrap_or_else(|e| panic!("{}, after {what}: read: {e}", self.name));
        } else {
            let data = pattern(back.len(), what.len() as u64);
            c.write(&data, offset)
                .unwrap_or_else(|e| panic!("{}, after {what}: write: {e}", self.name));
            c.read(&mut back, offset)
                .unwrap_or_else(|e| panic!("{}, after {what}: read: {e}", self.name));
            assert!(back == data, "{}, after {what}: read back other data", self.name);
        }
        c.disconnect().unwrap();
    }

    /// nbd-serve's peak resident memory stays sane.
    fn assert_memory_bounded(&self, what: &str) {
        if let Kind::Serve(peer) = &self.kind {
            let hwm = proc_status_kib(peer.pid(), "VmHWM");
            assert!(
                hwm < HWM_LIMIT_KIB,
                "nbd-serve reached {hwm} KiB of resident memory after {what}"
            );
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Kind::Blocking { server, thread } = &mut self.kind {
            server.shutdown();
            if let Some(t) = thread.take() {
                let r = t.join();
                if !thread::panicking() {
                    r.expect("blocking server thread panicked")
                        .expect("blocking server failed");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------

/// Something that is not an NBD client (an HTTP request) answers the
/// greeting: its first four bytes are client flags with unknown bits,
/// which the spec says the server MUST close the connection for.
#[test]
fn garbage_instead_of_client_flags_closes() {
    let dir = TempDir::new();
    for t in Target::both(&dir, false, 10) {
        let mut h = t.open();
        h.raw.greeting();
        h.raw.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
        let (took, _) = h.raw.expect_closed();
        assert!(took < Duration::from_secs(2), "{}: closed after {took:?}", t.name);
        t.assert_failed(h, "client flags 0x47455420 contain unknown bits");
        t.assert_serving("garbage client flags");
    }
}

/// Unknown client flag bits: hard disconnect.
#[test]
fn unknown_client_flags_close() {
    let dir = TempDir::new();
    for t in Target::both(&dir, false, 10) {
        let mut h = t.open();
        h.raw.greeting();
        h.raw.send(&(ClientFlags::FIXED_NEWSTYLE.bits() | 1 << 7).to_be_bytes());
        h.raw.expect_closed();
        t.assert_failed(h, "client flags 0x00000081 contain unknown bits");
        t.assert_serving("unknown client flags");
    }
}

/// An option header whose magic is not IHAVEOPT: hard disconnect.
#[test]
fn bad_option_magic_closes() {
    let dir = TempDir::new();
    for t in Target::both(&dir, false, 10) {
        let mut h = t.open_newstyle();
        h.raw.option_header(0x4948_4156_454f_5055, OptionType::GO, 6);
        h.raw.send(&[0; 6]);
        h.raw.expect_closed();
        t.assert_failed(h, "bad option magic 0x49484156454f5055");
        t.assert_serving("a bad option magic");
    }
}

/// Options whose data length is 0 where the option needs data, data where
/// it takes none, and inner lengths that point past the end of the option:
/// each is refused with an option error and the haggling goes on.
#[test]
fn option_lengths_zero_and_past_the_end_are_refused() {
    let dir = TempDir::new();
    for t in Target::both(&dir, false, 10) {
        let mut h = t.open_newstyle();
        let raw = &mut h.raw;
        // Length 0 for options that need data.
        for option in [OptionType::GO, OptionType::INFO, OptionType::SET_META_CONTEXT] {
            raw.option(option, &[]);
            raw.expect_option_error(option, ReplyType::ERR_INVALID);
        }
        // Data for options that take none (it is read and dropped).
        raw.option(OptionType::LIST, &[1, 2, 3]);
        raw.expect_option_error(OptionType::LIST, ReplyType::ERR_INVALID);
        raw.option(OptionType::STRUCTURED_REPLY, &[0; 100]);
        raw.expect_option_error(OptionType::STRUCTURED_REPLY, ReplyType::ERR_INVALID);
        // An unknown option with and without data.
        raw.option(OptionType(0x4242), &[]);
        raw.expect_option_error(OptionType(0x4242), ReplyType::ERR_UNSUP);
        raw.option(OptionType(0x4243), &[7; 1000]);
        raw.expect_option_error(OptionType(0x4243), ReplyType::ERR_UNSUP);
        // NBD_OPT_GO whose export name length (2^32-1, then 7) runs past
        // the end of the option.
        let mut go = u32::MAX.to_be_bytes().to_vec();
        go.extend_from_slice(&[0, 0]);
        raw.option(OptionType::GO, &go);
        let msg = raw.expect_option_error(OptionType::GO, ReplyType::ERR_INVALID);
        assert!(msg.contains("exceeds the option length"), "{}: {msg}", t.name);
        raw.option(OptionType::GO, &[0, 0, 0, 7, b'a', 0, 0]);
        raw.expect_option_error(OptionType::GO, ReplyType::ERR_INVALID);
        // An export name of 5000 bytes: longer than a string may be.
        let mut go = 5000u32.to_be_bytes().to_vec();
        go.extend_from_slice(&[b'x'; 5000]);
        go.extend_from_slice(&[0, 0]);
        raw.option(OptionType::GO, &go);
        raw.expect_option_error(OptionType::GO, ReplyType::ERR_INVALID);
        // NBD_OPT_GO claiming more information requests than it carries.
        raw.option(OptionType::GO, &[0, 0, 0, 0, 0xff, 0xff, 0, 1]);
        raw.expect_option_error(OptionType::GO, ReplyType::ERR_INVALID);
        // NBD_OPT_SET_META_CONTEXT with 2^32-1 queries, and with a query
        // length past the end.
        raw.option(OptionType::STRUCTURED_REPLY, &[]);
        assert_eq!(raw.option_reply().1, ReplyType::ACK);
        let mut meta = vec![0, 0, 0, 0];
        meta.extend_from_slice(&u32::MAX.to_be_bytes());
        raw.option(OptionType::SET_META_CONTEXT, &meta);
        raw.expect_option_error(OptionType::SET_META_CONTEXT, ReplyType::ERR_INVALID);
        let mut meta = vec![0, 0, 0, 0, 0, 0, 0, 1];
        meta.extend_from_slice(&1000u32.to_be_bytes());
        meta.extend_from_slice(b"base:allocation");
        raw.option(OptionType::SET_META_CONTEXT, &meta);
        raw.expect_option_error(OptionType::SET_META_CONTEXT, ReplyType::ERR_INVALID);
        // After all that the client can still enter transmission (with the
        // structured replies negotiated above).
        let (size, _) = raw.go(Style::Simple);
        assert_eq!(size, SIZE);
        raw.style = Style::Structured;
        raw.assert_in_sync(4096);
        t.assert_serving("bad option lengths");
    }
}

/// Option data of 2^32-1 bytes, claimed and never sent. The server must
/// neither allocate it nor wait for it forever: nbd-serve and the blocking
/// server read and drop option data they do not keep, so they wait for
/// those bytes, under the handshake timeout. An `NBD_OPT_EXPORT_NAME`
/// that long cannot be refused politely; the connection is closed at once.
#[test]
fn four_gib_options_claimed_and_never_sent() {
    let dir = TempDir::new();
    for t in Target::both(&dir, false, 1) {
        for option in [OptionType::GO, OptionType::LIST, OptionType(0x4242)] {
            let mut h = t.open_newstyle();
            h.raw.option_header(IHAVEOPT, option, u32::MAX);
            h.raw.send(&[0; 4096]);
            let (took, got) = h.raw.expect_closed();
            assert_eq!(got, 0, "{}: {option}: no reply before the data is in", t.name);
            assert!(
                took > Duration::from_millis(500) && took < Duration::from_secs(4),
                "{}: {option}: closed after {took:?}, expected the 1 s handshake timeout",
                t.name
            );
            t.assert_failed(h, "handshake timed out");
        }
        let mut h = t.open_newstyle();
        h.raw.option_header(IHAVEOPT, OptionType::EXPORT_NAME, u32::MAX);
        let (took, _) = h.raw.expect_closed();
        assert!(took < Duration::from_millis(500), "{}: closed after {took:?}", t.name);
        t.assert_failed(h, "NBD_OPT_EXPORT_NAME with an invalid name: longer than 4096 bytes");
        t.assert_memory_bounded("4 GiB options");
        t.assert_serving("4 GiB options");
    }
}

/// A client that announces more option data than it sends and then
/// half-closes: the server sees the end of the stream and hangs up.
#[test]
fn option_cut_short_by_eof_closes() {
    let dir = TempDir::new();
    for t in Target::both(&dir, false, 10) {
        for option in [OptionType::GO, OptionType(0x4242), OptionType::EXPORT_NAME] {
            let mut h = t.open_newstyle();
            h.raw.option_header(IHAVEOPT, option, 100);
            h.raw.send(&[0; 10]);
            h.raw.s.shutdown(std::net::Shutdown::Write).unwrap();
            let (took, _) = h.raw.expect_closed();
            assert!(
                took < Duration::from_secs(1),
                "{}: {option}: closed after {took:?}",
                t.name
            );
        }
        t.assert_serving("options cut short");
    }
}

/// A client looping on options forever is cut off after 1024 of them.
#[test]
fn endless_options_are_cut_off() {
    let dir = TempDir::new();
    for t in Target::both(&dir, false, 10) {
        let mut h = t.open_newstyle();
        let mut batch = Vec::new();
        for _ in 0..1100 {
            let o = OptionHeader {
                magic: IHAVEOPT.into(),
                option: 0x4242u32.into(),
                length: 0u32.into(),
            };
            batch.extend_from_slice(o.as_bytes());
        }
        // The server answers each with ERR_UNSUP (about 40 KiB in all,
        // which fits in the socket buffer) and then hangs up.
        let writer = {
            let mut s = h.raw.s.try_clone().unwrap();
            thread::spawn(move || {
                let _ = s.write_all(&batch);
            })
        };
        let mut refused = 0;
        let mut buf = [0u8; 20];
        while h.raw.s.read_exact(&mut buf).is_ok() {
            assert_eq!(
                u32::from_be_bytes(buf[12..16].try_into().unwrap()),
                ReplyType::ERR_UNSUP.0
            );
            let len = u32::from_be_bytes(buf[16..20].try_into().unwrap());
            h.raw.recv(len as usize);
            refused += 1;
        }
        writer.join().unwrap();
        assert_eq!(refused, 1024, "{}", t.name);
        t.assert_failed(h, "client sent more than 1024 options");
        t.assert_serving("endless options");
    }
}

/// Connections that never finish the handshake, stopped at every stage,
/// are freed by the handshake timeout (1 s here) while other clients are
/// served.
#[test]
fn stalled_handshakes_are_freed_by_the_timeout() {
    let dir = TempDir::new();
    for t in Target::both(&dir, false, 1) {
        let started = Instant::now();
        let mut stalled = Vec::new();
        for stage in 0..5 {
            let mut s = UnixStream::connect(&t.socket).unwrap();
            let mut greeting = [0u8; 18];
            s.read_exact(&mut greeting).unwrap();
            match stage {
                0 => {}                                   // silent after the greeting
                1 => s.write_all(&[0, 0]).unwrap(),       // half the client flags
                2 => s.write_all(&[0, 0, 0, 3]).unwrap(), // flags, then silence
                3 => {
                    // Flags and half an option header.
                    s.write_all(&[0, 0, 0, 3]).unwrap();
                    s.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
                }
                _ => {
                    // Flags and an option with 6 of its 100 bytes.
                    s.write_all(&[0, 0, 0, 3]).unwrap();
                    let o = OptionHeader {
                        magic: IHAVEOPT.into(),
                        option: OptionType::GO.0.into(),
                        length: 100u32.into(),
                    };
                    s.write_all(o.as_bytes()).unwrap();
                    s.write_all(&[0; 6]).unwrap();
                }
            }
            stalled.push(s);
        }
        // Meanwhile a good client is served.
        t.assert_serving("stalled handshakes (while they stall)");
        let deadline = started + Duration::from_secs(4);
        for (stage, s) in stalled.iter_mut().enumerate() {
            let (_, got) = expect_closed(s, deadline, t.name);
            assert_eq!(got, 0, "{}: stage {stage}", t.name);
        }
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(900), "{}: freed after {took:?}", t.name);
        t.assert_serving("stalled handshakes");
    }
}

/// A client that sends its option data one byte at a time, just often
/// enough to defeat a per-read timeout: the handshake timeout bounds the
/// whole handshake.
fn trickled_option_is_cut_off(t: &Target) {
    let mut s = UnixStream::connect(&t.socket).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&[0, 0, 0, 1]).unwrap();
    let o = OptionHeader {
        magic: IHAVEOPT.into(),
        option: 0x4242u32.into(),
        length: 1000u32.into(),
    };
    s.write_all(o.as_bytes()).unwrap();
    let started = Instant::now();
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    loop {
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(4),
            "{}: a trickling client was kept for {took:?} (handshake timeout 1 s)",
            t.name
        );
        match s.read(&mut buf) {
            Ok(0) => break,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Ok(n) => panic!("{}: unexpected {n} bytes", t.name),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{}: {e}", t.name),
        }
        if s.write_all(&[0]).is_err() {
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    assert!(started.elapsed() >= Duration::from_millis(800), "{}", t.name);
}

#[test]
fn trickled_option_data_is_cut_off_by_the_handshake_timeout() {
    let dir = TempDir::new();
    let t = Target::serve(&dir, &["--handshake-timeout", "1"]);
    trickled_option_is_cut_off(&t);
    t.assert_logged("handshake timed out");
    t.assert_serving("a trickling client");
}

/// The same against the blocking server, whose socket read timeout alone
/// would restart with every byte: its handshake deadline must hold across
/// reads (a thread per such client otherwise, for as long as it likes).
#[test]
fn blocking_server_cuts_off_trickled_option_data() {
    let dir = TempDir::new();
    let t = Target::blocking(&dir, false, Duration::from_secs(1));
    trickled_option_is_cut_off(&t);
}

/// A thousand connections at once: the server accepts them all, serves a
/// normal client meanwhile, frees them with the handshake timeout, and
/// serves again afterwards.
#[test]
fn a_thousand_connections_at_once() {
    const WANTED: usize = 1000;
    // The test holds one descriptor per connection and so does the server
    // (which inherits this limit).
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct given.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        let want = (4 * WANTED as libc::rlim_t).min(lim.rlim_max);
        if lim.rlim_cur < want {
            lim.rlim_cur = want;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
    let n = WANTED.min((lim.rlim_cur as usize).saturating_sub(200));
    if n < WANTED {
        eprintln!("note: the descriptor limit allows only {n} connections");
    }
    let dir = TempDir::new();
    let t = Target::serve(&dir, &["--handshake-timeout", "5"]);
    let pid = t.pid();
    let started = Instant::now();
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let s = UnixStream::connect(&t.socket).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        conns.push(s);
    }
    // Every one was accepted and greeted.
    for (i, s) in conns.iter_mut().enumerate() {
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting)
            .unwrap_or_else(|e| panic!("connection {i} got no greeting: {e}"));
        assert_eq!(&greeting[..8], b"NBDMAGIC");
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "greeting {n} clients took {:?}",
        started.elapsed()
    );
    assert!(open_fds(pid) > n, "nbd-serve holds {} descriptors", open_fds(pid));
    t.assert_serving("a thousand connections (while they are open)");
    // The handshake timeout (5 s) frees them all.
    let deadline = started + Duration::from_secs(12);
    for s in &mut conns {
        expect_closed(s, deadline, t.name);
    }
    drop(conns);
    let deadline = Instant::now() + Duration::from_secs(3);
    while open_fds(pid) > 50 {
        assert!(
            Instant::now() < deadline,
            "nbd-serve still holds {} descriptors",
            open_fds(pid)
        );
        thread::sleep(Duration::from_millis(20));
    }
    t.assert_serving("a thousand connections");
    t.assert_memory_bounded("a thousand connections");
}

// ---------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------

/// A request whose magic is wrong (garbage, or the magic of the other
/// header style): hard disconnect.
#[test]
fn bad_request_magic_closes() {
    let dir = TempDir::new();
    for t in Target::both(&dir, false, 10) {
        for (style, magic, text) in [
            (Style::Simple, 0xdead_beef, "bad request magic 0xdeadbeef"),
            (
                Style::Structured,
                EXTENDED_REQUEST_MAGIC,
                "bad request magic 0x21e41c71",
            ),
            (Style::Extended, REQUEST_MAGIC, "bad request magic 0x25609513"),
        ] {
            let mut h = t.open_transmission(style);
            h.raw.assert_in_sync(0);
            h.raw
                .request_with_magic(Some(magic), Command::READ, CommandFlags::empty(), 9, 0, 512);
            let (_, got) = h.raw.expect_closed();
            assert_eq!(got, 0, "{}: {style:?}: no reply to a request with a bad magic", t.name);
            t.assert_failed(h, text);
        }
        t.assert_serving("bad request magics");
    }
}

/// Unknown command flags, and known flags on commands they do not apply
/// to: `NBD_EINVAL`, any payload is consumed, and the connection goes on.
#[test]
fn unknown_command_flags_are_einval() {
    let dir = TempDir::new();
    for t in Target::both(&dir, false, 10) {
        for style in [Style::Simple, Style::Structured, Style::Extended] {
            let mut h = t.open_transmission(style);
            let raw = &mut h.raw;
            let unknown = CommandFlags::from_bits_retain(1 << 15);
            raw.expect_error(ErrorCode::EINVAL, Command::READ, unknown, 0, 4096);
            raw.expect_error(ErrorCode::EINVAL, Command::FLUSH, unknown, 0, 0);
            // A WRITE with an unknown flag: its payload is read and dropped.
            raw.expect_error(
                ErrorCode::EINVAL,
                Command::WRITE,
                CommandFlags::from_bits_retain(1 << 10),
                0,
                4096,
            );
            raw.assert_in_sync(8192);
            raw.expect_error(ErrorCode::EINVAL, Command::TRIM, CommandFlags::NO_HOLE, 0, 4096);
            raw.expect_error(ErrorCode::EINVAL, Command::WRITE, CommandFlags::REQ_ONE, 0, 512);
            raw.assert_in_sync(8192);
            if style == Style::Simple {
                // DF was not advertised without structured replies.
                raw.expect_error(ErrorCode::EINVAL, Command::READ, CommandFlags::DF, 0, 4096);
            }
            if style == Style::Extended {
                // BLOCK_STATUS with a payload (NBD_CMD_FLAG_PAYLOAD_LEN):
                // an unknown context id, then a ragged length. Refused,
                // and the payload is consumed either way.
                let mut payload = 4096u64.to_be_bytes().to_vec();
                payload.extend_from_slice(&99u32.to_be_bytes());
                let r = raw.roundtrip(Command::BLOCK_STATUS, CommandFlags::PAYLOAD_LEN, 0, 12, &payload);
                assert_eq!(r.code(), ErrorCode::EINVAL, "{r:?}");
                let r = raw.roundtrip(Command::BLOCK_STATUS, CommandFlags::PAYLOAD_LEN, 0, 10, &payload[..10]);
                assert_eq!(r.code(), ErrorCode::EINVAL, "{r:?}");
                raw.assert_in_sync(8192);
            }
            raw.request(Command::DISC, CommandFlags::empty(), 0, 0);
            raw.expect_closed();
        }
        t.assert_serving("unknown command flags");
    }
}

/// Offsets and lengths whose sum overflows 64 bits, or that end past the
/// export: `NBD_EINVAL` (`NBD_ENOSPC` for writes), payload consumed.
#[test]
fn offset_length_overflow_is_refused() {
    let dir = TempDir::new();
    for t in Target::both(&dir, false, 10) {
        for style in [Style::Simple, Style::Structured, Style::Extended] {
            let mut h = t.open_transmission(style);
            let raw = &mut h.raw;
            let none = CommandFlags::empty();
            raw.expect_error(ErrorCode::EINVAL, Command::READ, none, u64::MAX, 4096);
            raw.expect_error(ErrorCode::EINVAL, Command::READ, none, u64::MAX - 1000, 4096);
            raw.expect_error(ErrorCode::EINVAL, Command::READ, none, SIZE, 1);
            raw.expect_error(ErrorCode::ENOSPC, Command::WRITE, none, u64::MAX, 4096);
            raw.expect_error(ErrorCode::ENOSPC, Command::WRITE, none, SIZE - 512, 4096);
            raw.expect_error(ErrorCode::ENOSPC, Command::WRITE_ZEROES, none, u64::MAX - 10, 4096);
            raw.expect_error(ErrorCode::EINVAL, Command::TRIM, none, u64::MAX, u32::MAX as u64);
            raw.expect_error(ErrorCode::EINVAL, Command::CACHE, none, 1 << 63, 1 << 20);
            if style == Style::Extended {
                // 64-bit lengths: the sum wraps around.
                raw.expect_error(ErrorCode::EINVAL, Command::READ, none, 4096, u64::MAX);
                raw.expect_error(ErrorCode::EINVAL, Command::TRIM, none, 1, u64::MAX);
                raw.expect_error(ErrorCode::ENOSPC, Command::WRITE_ZEROES, none, SIZE, u64::MAX);
                raw.expect_error(ErrorCode::EINVAL, Command::BLOCK_STATUS, none, u64::MAX, u64::MAX);
            }
            if style != Style::Simple {
                raw.expect_error(ErrorCode::EINVAL, Command::BLOCK_STATUS, none, u64::MAX, 4096);
            }
            raw.assert_in_sync(4096);
        }
        t.assert_serving("offset overflows");
    }
}

/// Requests of length 0 (whose meaning the spec leaves open) each get one
/// reply, success or `NBD_EINVAL`, and the stream stays in step.
#[test]
fn zero_length_requests_are_answered() {
    let dir = TempDir::new();
    for t in Target::both(&dir, false, 10) {
        for style in [Style::Simple, Style::Structured, Style::Extended] {
            let mut h = t.open_transmission(style);
            let raw = &mut h.raw;
            for command in [
                Command::READ,
                Command::WRITE,
                Command::TRIM,
                Command::WRITE_ZEROES,
                Command::CACHE,
                Command::BLOCK_STATUS,
            ] {
                for offset in [0, SIZE] {
                    let r = raw.roundtrip(command, CommandFlags::empty(), offset, 0, &[]);
                    assert!(
                        r.error == 0 || r.code() == ErrorCode::EINVAL,
                        "{}: {style:?}: {command} of length 0 at {offset}: {r:?}",
                        t.name
                    );
                    assert!(r.data.is_empty());
                }
            }
            raw.assert_in_sync(4096);
        }
        t.assert_serving("zero-length requests");
    }
}

/// Commands that were not advertised: unknown command numbers, commands
/// of a read-only export, flags of features not offered.
#[test]
fn unadvertised_commands_are_refused() {
    let dir = TempDir::new();
    for t in Target::both(&dir, true, 10) {
        for style in [Style::Simple, Style::Structured, Style::Extended] {
            let mut h = t.open_newstyle();
            let (_, flags) = h.raw.go(style);
            assert!(flags.contains(TransmissionFlags::READ_ONLY), "{flags:?}");
            assert!(!flags.contains(TransmissionFlags::SEND_TRIM), "{flags:?}");
            assert!(!flags.contains(TransmissionFlags::SEND_FUA), "{flags:?}");
            let raw = &mut h.raw;
            let none = CommandFlags::empty();
            raw.expect_error(ErrorCode::EINVAL, Command(99), none, 0, 4096);
            raw.expect_error(ErrorCode::EINVAL, Command::RESIZE, none, 0, 0);
            raw.expect_error(ErrorCode::EINVAL, Command(0xffff), none, 0, 0);
            // Read-only: EPERM for every kind of write (the spec's SHOULD),
            // with the WRITE payload consumed.
            raw.expect_error(ErrorCode::EPERM, Command::TRIM, none, 0, 4096);
            raw.expect_error(ErrorCode::EPERM, Command::WRITE_ZEROES, none, 0, 4096);
            raw.expect_error(ErrorCode::EPERM, Command::WRITE, none, 0, 65536);
            raw.expect_error(ErrorCode::EPERM, Command::WRITE, none, 0, 1);
            // FUA was not advertised on a read-only export.
            raw.expect_error(ErrorCode::EINVAL, Command::READ, CommandFlags::FUA, 0, 4096);
            if style == Style::Simple {
                // No metadata context was negotiated.
                raw.expect_error(ErrorCode::EINVAL, Command::BLOCK_STATUS, none, 0, 4096);
            }
            // Reads still work, and the stream is in step.
            let r = raw.roundtrip(Command::READ, none, 0, 65536, &[]);
            assert_eq!(r.error, 0, "{r:?}");
            assert!(r.data.iter().all(|&b| b == 0));
        }
        t.assert_serving("unadvertised commands");
    }
}

/// A WRITE claiming a payload of 2^31 bytes (or 2^40 with extended
/// headers) that never comes: the server hangs up at once instead of
/// allocating or waiting for it.
#[test]
fn huge_write_payloads_disconnect() {
    let dir = TempDir::new();
    for t in Target::both(&dir, false, 10) {
        for (style, length, text) in [
            (
                Style::Simple,
                1u64 << 31,
                "NBD_CMD_WRITE payload of 2147483648 bytes exceeds the limit of 67108864",
            ),
            (
                Style::Structured,
                u32::MAX as u64,
                "NBD_CMD_WRITE payload of 4294967295 bytes exceeds the limit",
            ),
            (
                Style::Extended,
                1u64 << 40,
                "NBD_CMD_WRITE payload of 1099511627776 bytes exceeds the limit",
            ),
        ] {
            let mut h = t.open_transmission(style);
            h.raw.request(Command::WRITE, CommandFlags::empty(), 0, length);
            h.raw.try_send(&pattern(65536, 1));
            let (took, _) = h.raw.expect_closed();
            assert!(
                took < Duration::from_secs(1),
                "{}: {style:?}: closed after {took:?}",
                t.name
            );
            t.assert_failed(h, text);
        }
        // Extended headers: a BLOCK_STATUS payload of 2^40 bytes.
        let mut h = t.open_transmission(Style::Extended);
        h.raw
            .request(Command::BLOCK_STATUS, CommandFlags::PAYLOAD_LEN, 0, 1 << 40);
        h.raw.expect_closed();
        t.assert_failed(
            h,
            "NBD_CMD_BLOCK_STATUS payload of 1099511627776 bytes exceeds the limit",
        );
        t.assert_memory_bounded("huge WRITE payloads");
        t.assert_serving("huge WRITE payloads");
    }
}

/// A READ larger than the maximum payload (32 MiB) but inside the
/// export: refused for its size, not allocated.
#[test]
fn huge_reads_are_refused() {
    let dir = TempDir::new();
    for t in Target::both(&dir, false, 10) {
        for (style, code) in [
            (Style::Simple, ErrorCode::EINVAL),
            (Style::Structured, ErrorCode::EOVERFLOW),
            (Style::Extended, ErrorCode::EOVERFLOW),
        ] {
            let mut h = t.open_transmission(style);
            let flags = if style == Style::Simple {
                CommandFlags::empty()
            } else {
                CommandFlags::DF
            };
            h.raw
                .expect_error(code, Command::READ, flags, 0, u32::MAX as u64 & !4095);
            // Past the 64 MiB a client that negotiated no block sizes may
            // ask for (48 MiB is accepted since the limit went up).
            h.raw.expect_error(code, Command::READ, flags, 0, 96 * MIB);
            if style == Style::Extended {
                h.raw.expect_error(code, Command::READ, flags, 0, 5 << 30);
            }
            h.raw.assert_in_sync(0);
        }
        t.assert_memory_bounded("huge READs");
        t.assert_serving("huge READs");
    }
}

/// A client that half-closes its connection in the middle of a request
/// (a header, or a WRITE payload), alone or right after a valid request
/// sent in the same write: the server sees the end of the stream, answers
/// what it can, and hangs up promptly.
#[test]
fn requests_cut_short_by_eof_close() {
    let dir = TempDir::new();
    for t in Target::both(&dir, false, 10) {
        for (after_read, cut_in_payload) in [(false, true), (false, false), (true, true), (true, false)] {
            let what = format!(
                "{} cut in its {}{}",
                t.name,
                if cut_in_payload { "payload" } else { "header" },
                if after_read { ", after a READ" } else { "" }
            );
            let mut h = t.open_transmission(Style::Structured);
            h.raw.who.clone_from(&what);
            if after_read {
                h.raw.request(Command::READ, CommandFlags::empty(), 0, 4096);
            }
            if cut_in_payload {
                h.raw.request(Command::WRITE, CommandFlags::empty(), 0, 1 << 20);
                h.raw.send(&pattern(1000, 3));
            } else {
                h.raw.send(&REQUEST_MAGIC.to_be_bytes());
                h.raw.send(&[0; 6]);
            }
            h.raw.s.shutdown(std::net::Shutdown::Write).unwrap();
            let (took, got) = h.raw.expect_closed();
            assert!(got == 0 || got >= 4096, "{what}: {got} bytes");
            assert!(took < Duration::from_secs(1), "{what}: closed after {took:?}");
        }
        t.assert_serving("requests cut short");
    }
}

/// Bytes after `NBD_CMD_DISC` are never read: the server answers the
/// requests sent before it, then closes.
#[test]
fn garbage_after_disc_is_ignored() {
    let dir = TempDir::new();
    for t in Target::both(&dir, false, 10) {
        for style in [Style::Simple, Style::Structured, Style::Extended] {
            let mut h = t.open_transmission(style);
            // One write: the READ, DISC and garbage reach the server at once.
            let cookie = h.raw.request(Command::READ, CommandFlags::empty(), 0, 4096);
            h.raw.request(Command::DISC, CommandFlags::empty(), 0, 0);
            h.raw.send(&[0xff; 1000]);
            let r = h.raw.reply(cookie);
            assert_eq!(r.error, 0, "{}: {style:?}", t.name);
            let (_, got) = h.raw.expect_closed();
            assert_eq!(got, 0, "{}: {style:?}: nothing after the last reply", t.name);
        }
        t.assert_serving("garbage after NBD_CMD_DISC");
    }
}

/// A valid request followed at once by one with a bad magic: the server
/// may answer the first, and then hangs up (it must not hang).
#[test]
fn bad_magic_right_after_a_request_closes() {
    let dir = TempDir::new();
    for t in Target::both(&dir, false, 10) {
        let mut h = t.open_transmission(Style::Structured);
        h.raw.request(Command::READ, CommandFlags::empty(), 0, 4096);
        h.raw
            .request_with_magic(Some(0xdead_beef), Command::READ, CommandFlags::empty(), 99, 0, 512);
        let (_, got) = h.raw.expect_closed();
        assert!(got == 0 || got >= 4096, "{}: {got} bytes before the close", t.name);
        t.assert_failed(h, "bad request magic 0xdeadbeef");
        t.assert_serving("a bad magic right after a request");
    }
}

/// Writes the READ requests of a client that never reads its replies:
/// `count` requests of `len` bytes, until a write blocks for 2 s (the
/// server stopped reading) or `stop` is set. Returns how many were sent.
fn flood_reads(mut s: UnixStream, count: usize, len: u32, stop: Arc<AtomicBool>) -> usize {
    s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut sent = 0;
    let mut batch = Vec::with_capacity(1000 * 28);
    while sent < count && !stop.load(Ordering::Relaxed) {
        batch.clear();
        let n = (count - sent).min(1000);
        for i in 0..n {
            let h = RequestHeader {
                magic: REQUEST_MAGIC.into(),
                flags: 0u16.into(),
                command: Command::READ.0.into(),
                cookie: ((sent + i) as u64).into(),
                offset: (((sent + i) as u64 * u64::from(len)) % (SIZE - u64::from(len))).into(),
                length: len.into(),
            };
            batch.extend_from_slice(h.as_bytes());
        }
        let mut left = &batch[..];
        while !left.is_empty() {
            match s.write(left) {
                Ok(k) => left = &left[k..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Blocked for the whole timeout, or the server gave up.
                Err(_) => return sent + (batch.len() - left.len()) / 28,
            }
        }
        sent += n;
    }
    sent
}

/// A client that sends 100 000 READs of 1 MiB and never reads a reply: the
/// server must stop reading requests once its replies back up, so its
/// memory stays bounded (here: resident memory under 256 MiB, where
/// buffering the replies would take 100 GiB), and it keeps serving others.
#[test]
fn a_client_that_never_reads_replies_cannot_exhaust_memory() {
    const BOUND_KIB: u64 = 256 * 1024;
    let dir = TempDir::new();
    let t = Target::serve(&dir, &[]);
    let pid = t.pid();
    // Simple replies: every reply carries its 1 MiB of data.
    let h = t.open_transmission(Style::Simple);
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let s = h.raw.s.try_clone().unwrap();
        let stop = stop.clone();
        thread::spawn(move || flood_reads(s, 100_000, 1 << 20, stop))
    };
    let started = Instant::now();
    let mut peak = 0;
    let mut check = |what: &str| {
        let rss = proc_status_kib(pid, "VmRSS");
        peak = peak.max(rss);
        if rss > BOUND_KIB {
            stop.store(true, Ordering::Relaxed);
            let _ = h.raw.s.shutdown(std::net::Shutdown::Both);
            panic!(
                "nbd-serve grew to {rss} KiB of resident memory {what} ({:?} after the flood began): \
                 it buffers replies the client does not read",
                started.elapsed()
            );
        }
    };
    while !flood.is_finished() {
        check("while the client floods it");
        assert!(started.elapsed() < Duration::from_secs(60), "the flood did not stop");
        thread::sleep(Duration::from_millis(10));
    }
    let sent = flood.join().unwrap();
    for _ in 0..50 {
        check("after the client stopped");
        thread::sleep(Duration::from_millis(10));
    }
    assert!(
        sent < 100_000,
        "the server read all {sent} requests although their replies were not read"
    );
    // The blocked connection does not block the others.
    t.assert_serving("a client that never reads (while it is connected)");
    check("while another client is served");
    drop(h);
    t.assert_serving("a client that never reads");
    // The kernel's high-water mark catches a peak between the samples.
    let hwm = proc_status_kib(pid, "VmHWM");
    assert!(hwm < BOUND_KIB, "nbd-serve peaked at {hwm} KiB of resident memory");
    eprintln!("the client sent {sent} requests before the server stopped reading; peak VmRSS {peak} KiB");
}

/// The blocking server faces a client that pipelines 400 READs of 1 MiB in
/// one write (11 KiB of requests, all in the server's read buffer at once)
/// and does not read the replies. The server must not gather all 400 MiB
/// of replies before writing the first (were it to buffer replies for as
/// long as requests are buffered, a pipelining client, hostile or not,
/// would set how much it allocates: with 32 MiB reads, a 64 KiB read
/// buffer of requests is 73 GiB of replies). Measured as the growth of
/// this test process's resident memory, where the blocking server runs.
#[test]
fn blocking_server_bounds_replies_to_a_pipelining_client() {
    const REQUESTS: usize = 400;
    let dir = TempDir::new();
    let t = Target::blocking(&dir, false, Duration::from_secs(10));
    let h = t.open_transmission(Style::Simple);
    let pid = std::process::id();
    let before = proc_status_kib(pid, "VmRSS");
    let mut batch = Vec::new();
    for i in 0..REQUESTS as u64 {
        let r = RequestHeader {
            magic: REQUEST_MAGIC.into(),
            flags: 0u16.into(),
            command: Command::READ.0.into(),
            cookie: i.into(),
            offset: (i * MIB).into(),
            length: (MIB as u32).into(),
        };
        batch.extend_from_slice(r.as_bytes());
    }
    let mut s = h.raw.s.try_clone().unwrap();
    s.write_all(&batch).unwrap();
    thread::sleep(Duration::from_millis(1500));
    let grown = proc_status_kib(pid, "VmRSS").saturating_sub(before);
    drop(h);
    assert!(
        grown < 128 * 1024,
        "the blocking server grew by {grown} KiB buffering replies the client does not read"
    );
}
