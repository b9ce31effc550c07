//! Drives the real state machines of nbd-proto from fuzz input, checking
//! invariants as it goes. Shared by the fuzz targets (`fuzz/fuzz_targets/`)
//! and by `nbd-proto/tests/fuzz_corpus.rs`, which includes this file by
//! path and replays `fuzz/seeds/*/` under `cargo test`; so nothing here may
//! depend on libFuzzer.
//!
//! Every target takes raw bytes. The byte targets read a little
//! configuration with [`arbitrary`] and treat the rest as what the peer
//! sends; the `structured` target builds a [`Scenario`] of legal-looking
//! messages with corrupted fields and serialises them.
//!
//! The payload of READ replies and WRITE requests (and payloads the server
//! discards) is not put on the simulated wire: the machines never see
//! those bytes, they only announce them ([`ReceiveNext::Data`],
//! [`ServerReceive::Payload`], [`ServerReceive::Discard`]), so the drivers
//! acknowledge them at once.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use arbitrary::{Arbitrary, Unstructured};
use nbd_proto::client::{
    ClientConfig, ClientHandshake, ClientTransmission, Cookie, Extent, HandshakeStep, MetaContext, Mode, Negotiated,
    OptionOutcome, ReceiveNext, ReplyEvent, Request, ServerError, TlsMode,
};
use nbd_proto::server::{
    ContextSelection, ExportDetails, ExportListing, MAX_OPTION_DATA, ReplyEncoder, RequestEvent, ServerConfig,
    ServerHandshake, ServerHandshakeError, ServerNegotiated, ServerReceive, ServerRequest, ServerStep,
    ServerTransmission, ServerTransmissionError, TlsPolicy,
};
use nbd_proto::uri::NbdUri;
use nbd_proto::wire::*;
use zerocopy::FromBytes;

/// The fuzz targets, by name (the directories of `fuzz/seeds/`).
pub const TARGETS: &[&str] = &[
    "client_handshake",
    "server_handshake",
    "client_transmission",
    "server_transmission",
    "uri",
    "structured",
];

/// Runs the target called `name` on `data`; false for an unknown name.
pub fn run(name: &str, data: &[u8]) -> bool {
    match name {
        "client_handshake" => client_handshake(data),
        "server_handshake" => server_handshake(data),
        "client_transmission" => client_transmission(data),
        "server_transmission" => server_transmission(data),
        "uri" => uri(data),
        "structured" => structured(data),
        _ => return false,
    }
    true
}

/// Iterations one pump may take without the input running out: more means
/// the machine is going round in circles (a hang).
const MAX_STEPS: usize = 1 << 20;

/// The largest option reply payload the client accepts (a name and a
/// description of 4096 bytes each in `NBD_REP_SERVER`, plus slack).
const MAX_OPTION_REPLY: usize = 4 + 2 * MAX_STRING_LEN + 64;

// ---------------------------------------------------------------------------
// The simulated wire
// ---------------------------------------------------------------------------

/// Bytes sent by the peer and not read yet.
#[derive(Debug, Default)]
struct Wire {
    buf: Vec<u8>,
    pos: usize,
}

impl Wire {
    fn push(&mut self, bytes: &[u8]) {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    fn available(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The range of the next `n` bytes, if they have arrived.
    fn take(&mut self, n: usize) -> Option<Range<usize>> {
        if self.available() < n {
            return None;
        }
        let r = self.pos..self.pos + n;
        self.pos += n;
        Some(r)
    }

    fn rest(&self) -> &[u8] {
        &self.buf[self.pos..]
    }
}

/// Feeds what a machine asks for from the byte targets' input: exactly the
/// `missing` bytes if there are enough, else nothing (the run is over).
fn feed_from<'a>(u: &mut Unstructured<'a>, missing: usize) -> Option<&'a [u8]> {
    if missing == 0 || u.len() < missing {
        return None;
    }
    u.bytes(missing).ok()
}

// ---------------------------------------------------------------------------
// Choices shared by the targets
// ---------------------------------------------------------------------------

/// A string the fuzzer can pick: export names, descriptions, messages.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum Name {
    /// `""`, the default export.
    Default,
    /// `disk`
    Disk,
    /// `other`
    Other,
    /// Multibyte UTF-8.
    Unicode,
    /// 4097 bytes: too long for an NBD string.
    TooLong,
    /// Exactly 4096 bytes.
    Longest,
    /// Contains a NUL.
    WithNul,
}

impl Name {
    /// The value this stands for.
    pub fn get(self) -> String {
        match self {
            Name::Default => String::new(),
            Name::Disk => "disk".into(),
            Name::Other => "other".into(),
            Name::Unicode => "d\u{e9}j\u{e0} vu \u{1f4be}".into(),
            Name::TooLong => "x".repeat(MAX_STRING_LEN + 1),
            Name::Longest => "y".repeat(MAX_STRING_LEN),
            Name::WithNul => "a\0b".into(),
        }
    }
}

/// A metadata context query or name.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum Query {
    /// `base:allocation`
    BaseAllocation,
    /// `base:` (a wildcard in list queries)
    Base,
    /// `qemu:allocation-depth`
    QemuDepth,
    /// `qemu:dirty-bitmap:` (a wildcard)
    QemuBitmaps,
    /// `qemu:dirty-bitmap:b0`
    QemuBitmap,
    /// `x-vendor:wide`, a context with 64-bit status values.
    Vendor,
    /// No namespace: invalid.
    NoNamespace,
    /// Contains a NUL: invalid.
    WithNul,
    /// Not valid UTF-8 on the wire (as a name sent by a peer).
    NotUtf8,
}

impl Query {
    /// The value this stands for.
    pub fn get(self) -> &'static str {
        match self {
            Query::BaseAllocation => CONTEXT_BASE_ALLOCATION,
            Query::Base => "base:",
            Query::QemuDepth => CONTEXT_QEMU_ALLOCATION_DEPTH,
            Query::QemuBitmaps => CONTEXT_QEMU_DIRTY_BITMAP_PREFIX,
            Query::QemuBitmap => "qemu:dirty-bitmap:b0",
            Query::Vendor => "x-vendor:wide",
            Query::NoNamespace => "nonamespace",
            Query::WithNul => "a:\0",
            Query::NotUtf8 => "base:\u{fffd}",
        }
    }

    fn wire(self) -> Vec<u8> {
        match self {
            Query::NotUtf8 => b"base:\xff\xfe".to_vec(),
            q => q.get().as_bytes().to_vec(),
        }
    }
}

fn queries(q: &[Query]) -> Vec<&'static str> {
    q.iter().take(4).map(|q| q.get()).collect()
}

/// An export size.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum Size {
    /// 0
    Zero,
    /// A small size, not block aligned.
    Small(u16),
    /// Whole 4096-byte blocks.
    Blocks(u16),
    /// 1 MiB
    Mega,
    /// 1 TiB
    Huge,
    /// `u64::MAX`
    Max,
    /// Anything.
    Raw(u64),
}

impl Size {
    /// The value this stands for.
    pub fn get(self) -> u64 {
        match self {
            Size::Zero => 0,
            Size::Small(v) => v as u64,
            Size::Blocks(v) => v as u64 * 4096,
            Size::Mega => 1 << 20,
            Size::Huge => 1 << 40,
            Size::Max => u64::MAX,
            Size::Raw(v) => v,
        }
    }
}

/// Valid block-size constraints, as a handshake would have validated them.
fn block_size(sel: u8) -> Option<BlockSizeConstraints> {
    let (minimum, preferred, maximum) = match sel % 7 {
        0 => return None,
        1 => (1, 4096, DEFAULT_MAX_PAYLOAD),
        2 => (512, 4096, 65536),
        3 => (4096, 4096, 4096),
        4 => (65536, 65536, DEFAULT_MAX_PAYLOAD),
        5 => (512, 512, 1024),
        _ => (1, 512, u32::MAX),
    };
    let c = BlockSizeConstraints {
        minimum,
        preferred,
        maximum,
    };
    debug_assert!(c.validate().is_ok());
    Some(c)
}

/// The contexts a negotiation may have selected (bit `i` of `mask` picks
/// the `i`th), with ids from `ids`, never twice the same id.
fn contexts(mask: u8, ids: [u32; 4]) -> Vec<MetaContext> {
    const NAMES: [&str; 4] = [
        CONTEXT_BASE_ALLOCATION,
        CONTEXT_QEMU_ALLOCATION_DEPTH,
        "qemu:dirty-bitmap:b0",
        "x-vendor:wide",
    ];
    let mut out: Vec<MetaContext> = Vec::new();
    for (i, name) in NAMES.iter().enumerate() {
        if mask & (1 << i) != 0 && !out.iter().any(|c| c.id == ids[i]) {
            out.push(MetaContext {
                id: ids[i],
                name: (*name).into(),
            });
        }
    }
    out
}

fn mode(sel: u8) -> Mode {
    match sel % 5 {
        0 => Mode::Oldstyle,
        1 => Mode::ExportNameOnly,
        2 => Mode::Simple,
        3 => Mode::Structured,
        _ => Mode::Extended,
    }
}

/// An offset or a length in a request or a reply.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum Num {
    /// 0
    Zero,
    /// A small value.
    Small(u16),
    /// Whole blocks of max(minimum block size, 512).
    Blocks(u8),
    /// So many bytes before the end of the export.
    FromEnd(u16),
    /// Anything.
    Raw(u64),
}

impl Num {
    /// The value this stands for, in an export of `size` with blocks of `block`.
    pub fn get(self, size: u64, block: u64) -> u64 {
        match self {
            Num::Zero => 0,
            Num::Small(v) => v as u64,
            Num::Blocks(v) => v as u64 * block,
            Num::FromEnd(v) => size.saturating_sub(v as u64),
            Num::Raw(v) => v,
        }
    }
}

/// The command a selector byte stands for.
pub fn command(sel: u8) -> Command {
    match sel % 12 {
        0 | 1 => Command::READ,
        2 => Command::WRITE,
        3 => Command::FLUSH,
        4 => Command::TRIM,
        5 => Command::CACHE,
        6 => Command::WRITE_ZEROES,
        7 | 8 => Command::BLOCK_STATUS,
        9 => Command::DISC,
        10 => Command::RESIZE,
        _ => Command(sel as u16 + 0x100),
    }
}

/// A request the client driver issues.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub struct ReqSpec {
    pub cmd: u8,
    pub flags: u8,
    pub offset: Num,
    pub length: Num,
}

impl ReqSpec {
    /// The value this stands for.
    pub fn request(&self, size: u64, minimum: u32) -> Request {
        let block = (minimum as u64).max(512);
        let command = command(self.cmd);
        let flags = CommandFlags::from_bits_retain(self.flags as u16);
        let (offset, length) = if matches!(command, Command::FLUSH | Command::DISC) && self.flags & 0x80 == 0 {
            (0, 0)
        } else {
            (self.offset.get(size, block), self.length.get(size, block))
        };
        Request {
            command,
            flags,
            offset,
            length,
        }
    }
}

// ---------------------------------------------------------------------------
// Client handshake
// ---------------------------------------------------------------------------

/// How the client is configured.
#[derive(Debug, Clone, Arbitrary)]
pub struct ClientSpec {
    pub tls: u8,
    pub opt_mode: bool,
    pub structured: bool,
    pub extended: bool,
    pub request_block_size: bool,
    pub export: Name,
    pub contexts: Vec<Query>,
}

impl ClientSpec {
    /// The value this stands for.
    pub fn config(&self) -> ClientConfig {
        ClientConfig {
            export_name: self.export.get(),
            tls: match self.tls % 3 {
                0 => TlsMode::Off,
                1 => TlsMode::Allow,
                _ => TlsMode::Require,
            },
            structured_replies: self.structured,
            extended_headers: self.extended,
            meta_contexts: queries(&self.contexts).into_iter().map(String::from).collect(),
            request_block_size: self.request_block_size,
            opt_mode: self.opt_mode,
            ..ClientConfig::default()
        }
    }
}

/// An option the caller issues in option mode.
#[derive(Debug, Clone, Arbitrary)]
pub enum UserOpt {
    /// `opt_list`
    List,
    /// `opt_info`
    Info(Name),
    /// `opt_go`
    Go(Option<Name>),
    /// `opt_list_meta_context`
    ListMetaContext(Name, Vec<Query>),
    /// `opt_set_meta_context`
    SetMetaContext(Name, Vec<Query>),
    /// `opt_structured_reply`
    StructuredReply,
    /// `opt_extended_headers`
    ExtendedHeaders,
    /// `opt_abort`
    Abort,
}

/// Where the client handshake stopped.
#[derive(Debug)]
pub enum ClientHsStatus {
    /// This many more bytes from the server are needed.
    NeedBytes(usize),
    /// Option mode: issue an option.
    Negotiating,
    /// The handshake is complete.
    Done(Box<Negotiated>),
    /// The handshake failed or was aborted.
    Over,
}

/// Drives a [`ClientHandshake`].
#[derive(Debug)]
pub struct ClientHs {
    hs: Option<ClientHandshake>,
    wire: Wire,
    config: ClientConfig,
    /// The option the client sent last, from the bytes it sent.
    last_option: Option<OptionType>,
}

impl ClientHs {
    /// A client handshake with this configuration.
    pub fn new(spec: &ClientSpec) -> Self {
        let config = spec.config();
        ClientHs {
            hs: Some(ClientHandshake::new(config.clone())),
            wire: Wire::default(),
            config,
            last_option: None,
        }
    }

    /// The server sent these bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.wire.push(bytes);
    }

    /// Runs the machine as far as it goes.
    pub fn pump(&mut self) -> ClientHsStatus {
        for _ in 0..MAX_STEPS {
            let Some(hs) = self.hs.as_mut() else {
                return ClientHsStatus::Over;
            };
            match hs.step() {
                HandshakeStep::Send(b) => {
                    if let Some(o) = check_client_send(b) {
                        self.last_option = Some(o);
                    }
                    hs.sent();
                }
                HandshakeStep::Receive(n) => {
                    assert!(n > 0 && n <= MAX_OPTION_REPLY, "client asked for {n} bytes");
                    let Some(r) = self.wire.take(n) else {
                        return ClientHsStatus::NeedBytes(n - self.wire.available());
                    };
                    if hs.received(&self.wire.buf[r]).is_err() {
                        assert_eq!(hs.step(), HandshakeStep::Aborted, "a failed handshake must stop");
                        self.hs = None;
                    }
                }
                HandshakeStep::StartTls => {
                    // Pretend the TLS handshake succeeded.
                    if hs.tls_established().is_err() {
                        self.hs = None;
                    }
                }
                HandshakeStep::Negotiating => return ClientHsStatus::Negotiating,
                HandshakeStep::OptionDone => {
                    let outcome = hs.take_outcome().expect("OptionDone without an outcome");
                    check_outcome(&outcome);
                    assert!(!matches!(hs.step(), HandshakeStep::OptionDone));
                }
                HandshakeStep::Done => {
                    let hs = self.hs.take().expect("machine present");
                    let n = hs.finish().expect("Done, yet finish() failed");
                    check_negotiated(&n, &self.config);
                    return ClientHsStatus::Done(Box::new(n));
                }
                HandshakeStep::Aborted => self.hs = None,
            }
        }
        panic!("client handshake makes no progress");
    }

    /// Issues an option (the machine must be [`ClientHsStatus::Negotiating`]).
    pub fn issue(&mut self, opt: &UserOpt) {
        let Some(hs) = self.hs.as_mut() else {
            return;
        };
        let r = match opt {
            UserOpt::List => hs.opt_list(),
            UserOpt::Info(n) => hs.opt_info(&n.get()),
            UserOpt::Go(n) => hs.opt_go(n.map(Name::get).as_deref()),
            UserOpt::ListMetaContext(n, q) => hs.opt_list_meta_context(&n.get(), &queries(q)),
            UserOpt::SetMetaContext(n, q) => hs.opt_set_meta_context(&n.get(), &queries(q)),
            UserOpt::StructuredReply => hs.opt_structured_reply(),
            UserOpt::ExtendedHeaders => hs.opt_extended_headers(),
            UserOpt::Abort => hs.opt_abort(),
        };
        if r.is_err() {
            // A refused call changes nothing.
            assert_eq!(hs.step(), HandshakeStep::Negotiating, "{opt:?} refused: {r:?}");
        }
    }
}

/// Checks what the client sends: optionally the 4 client flags, then one
/// option whose length field matches its data. Returns the option.
fn check_client_send(b: &[u8]) -> Option<OptionType> {
    assert!(!b.is_empty(), "empty Send");
    assert!(
        b.len() <= 4 + OPTION_HEADER_LEN + 8 + 5 * (4 + MAX_STRING_LEN),
        "client sends {} bytes",
        b.len()
    );
    let mut rest = b;
    if rest.get(..8) != Some(&IHAVEOPT.to_be_bytes()[..]) {
        let (flags, r) = rest.split_at(4.min(rest.len()));
        assert_eq!(flags.len(), 4, "client flags");
        let flags = u32::from_be_bytes([flags[0], flags[1], flags[2], flags[3]]);
        assert!(ClientFlags::all().contains(ClientFlags::from_bits_retain(flags)));
        rest = r;
    }
    if rest.is_empty() {
        return None;
    }
    let (h, data) = OptionHeader::read_from_prefix(rest).expect("an option header");
    assert_eq!(h.magic.get(), IHAVEOPT);
    assert_eq!(h.length.get() as usize, data.len(), "option length field");
    Some(OptionType(h.option.get()))
}

fn check_outcome(o: &OptionOutcome) {
    match o {
        OptionOutcome::Ack => {}
        OptionOutcome::List(l) => {
            for e in l {
                assert!(e.name.len() <= 3 * MAX_STRING_LEN);
            }
        }
        OptionOutcome::Info(i) => {
            if let Some(f) = i.flags {
                assert!(f.contains(TransmissionFlags::HAS_FLAGS));
            }
            if let Some(b) = i.block_size {
                b.validate().expect("validated block sizes");
            }
        }
        OptionOutcome::MetaContexts(c) => {
            for m in c {
                assert!(m.name.contains(':'));
            }
        }
        OptionOutcome::Refused(e) => assert!(e.reply.is_error()),
    }
}

fn check_negotiated(n: &Negotiated, config: &ClientConfig) {
    assert!(n.flags.contains(TransmissionFlags::HAS_FLAGS));
    if let Some(b) = n.block_size {
        b.validate().expect("validated block sizes");
    }
    let ids: HashSet<u32> = n.contexts.iter().map(|c| c.id).collect();
    assert_eq!(ids.len(), n.contexts.len(), "context ids are unique");
    if config.tls == TlsMode::Require {
        assert!(n.tls, "TLS required but not running");
    }
    if n.mode == Mode::Oldstyle {
        assert!(!n.tls && n.contexts.is_empty() && n.export_name.is_empty());
    }
}

/// The `client_handshake` target: the first bytes configure the client,
/// the rest is what the server sends, with the options to issue in option
/// mode read from the same stream when the machine asks. After a
/// successful handshake the rest drives transmission.
pub fn client_handshake(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(spec) = ClientSpec::arbitrary(&mut u) else {
        return;
    };
    let mut c = ClientHs::new(&spec);
    let mut options = 0;
    loop {
        match c.pump() {
            ClientHsStatus::NeedBytes(k) => match feed_from(&mut u, k) {
                Some(b) => c.feed(b),
                None => return,
            },
            ClientHsStatus::Negotiating => {
                options += 1;
                let Ok(opt) = UserOpt::arbitrary(&mut u) else {
                    return;
                };
                if u.is_empty() || options > 64 {
                    return;
                }
                c.issue(&opt);
            }
            ClientHsStatus::Done(n) => {
                assert_eq!(c.wire.available(), 0, "the client read exactly the handshake");
                return client_transmission_bytes(&n, &mut u);
            }
            ClientHsStatus::Over => return,
        }
    }
}

// ---------------------------------------------------------------------------
// Client transmission
// ---------------------------------------------------------------------------

/// What a client handshake could have negotiated.
#[derive(Debug, Clone, Arbitrary)]
pub struct NegSpec {
    pub mode: u8,
    pub size: Size,
    pub flags: u16,
    pub block: u8,
    pub contexts: u8,
    pub ids: [u32; 4],
    pub tls: bool,
}

impl NegSpec {
    /// The value this stands for.
    pub fn negotiated(&self) -> Negotiated {
        Negotiated {
            mode: mode(self.mode),
            tls: self.tls,
            export_name: "disk".into(),
            description: None,
            size: self.size.get(),
            flags: TransmissionFlags::from_bits_retain(self.flags) | TransmissionFlags::HAS_FLAGS,
            block_size: block_size(self.block),
            contexts: contexts(self.contexts, self.ids),
        }
    }
}

/// How the client transmission machine is set up.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub struct TxSpec {
    pub capacity: u8,
    pub strict: bool,
    pub manual_release: bool,
}

/// A request in flight, as the driver tracks it.
#[derive(Debug)]
struct Live {
    req: Request,
    /// Bytes of data and holes received.
    covered: u64,
    /// Data and hole chunks received.
    chunks: u32,
    /// Block-status chunks received.
    statuses: u32,
}

/// Drives a [`ClientTransmission`].
#[derive(Debug)]
pub struct ClientTx {
    tx: ClientTransmission,
    neg: Negotiated,
    wire: Wire,
    live: HashMap<u64, Live>,
    /// Completed requests whose slot is held (manual release).
    held: Vec<Cookie>,
    manual_release: bool,
    dead: bool,
}

impl ClientTx {
    /// A transmission machine for `neg`.
    pub fn new(neg: &Negotiated, spec: TxSpec) -> Self {
        let mut tx = ClientTransmission::new(neg, spec.capacity as usize % 8 + 1);
        tx.set_strict(spec.strict);
        tx.set_manual_release(spec.manual_release);
        ClientTx {
            tx,
            neg: neg.clone(),
            wire: Wire::default(),
            live: HashMap::new(),
            held: Vec::new(),
            manual_release: spec.manual_release,
            dead: false,
        }
    }

    /// The cookies in flight, in order.
    fn cookies(&self) -> Vec<u64> {
        let mut c: Vec<u64> = self.live.keys().copied().collect();
        c.sort_unstable();
        c
    }

    fn check_counts(&self) {
        assert!(self.tx.in_flight() <= self.tx.capacity(), "in flight beyond capacity");
        assert_eq!(self.tx.in_flight(), self.live.len(), "in-flight count");
    }

    /// Issues a request; returns its cookie if the machine accepted it.
    pub fn request(&mut self, r: Request) -> Option<Cookie> {
        let before = self.tx.in_flight();
        let Ok((cookie, hdr)) = self.tx.start_request(r) else {
            assert_eq!(self.tx.in_flight(), before, "a refused request takes no slot");
            return None;
        };
        let b = hdr.as_bytes();
        let extended = self.neg.mode.extended();
        let (magic, flags, cmd, ck, offset, length) = if extended {
            let (h, rest) = ExtendedRequestHeader::read_from_prefix(b).expect("extended header");
            assert!(rest.is_empty());
            let (m, f, c, k, o, l) = (h.magic, h.flags, h.command, h.cookie, h.offset, h.length);
            (m.get(), f.get(), c.get(), k.get(), o.get(), l.get())
        } else {
            let (h, rest) = RequestHeader::read_from_prefix(b).expect("compact header");
            assert!(rest.is_empty());
            let (m, f, c, k, o, l) = (h.magic, h.flags, h.command, h.cookie, h.offset, h.length);
            (m.get(), f.get(), c.get(), k.get(), o.get(), l.get() as u64)
        };
        assert_eq!(
            magic,
            if extended {
                EXTENDED_REQUEST_MAGIC
            } else {
                REQUEST_MAGIC
            }
        );
        assert_eq!((cmd, ck, offset, length), (r.command.0, cookie.0, r.offset, r.length));
        let mut want = r.flags;
        if extended && r.command == Command::WRITE {
            want |= CommandFlags::PAYLOAD_LEN;
        }
        assert_eq!(flags, want.bits());
        // What the client lets through, the server must be able to accept.
        if matches!(r.command, Command::FLUSH | Command::DISC) {
            assert_eq!((r.offset, r.length), (0, 0));
        } else {
            let end = r.offset.checked_add(r.length).expect("request end overflows");
            assert!(end <= self.neg.size, "request past the end of the export");
        }
        if r.command == Command::BLOCK_STATUS {
            assert!(self.neg.mode.structured() && !self.neg.contexts.is_empty());
        }
        if r.command == Command::DISC {
            assert_eq!(self.tx.in_flight(), before, "NBD_CMD_DISC takes no slot");
        } else {
            assert!(cookie.slot() < self.tx.capacity());
            let fresh = self.live.insert(
                cookie.0,
                Live {
                    req: r,
                    covered: 0,
                    chunks: 0,
                    statuses: 0,
                },
            );
            assert!(fresh.is_none(), "cookie {cookie:?} issued twice");
        }
        self.check_counts();
        Some(cookie)
    }

    /// Forgets the `which`th request in flight as if its header could not be sent.
    pub fn cancel(&mut self, which: u8) {
        let c = self.cookies();
        if c.is_empty() {
            return;
        }
        let cookie = c[which as usize % c.len()];
        self.tx.cancel_unsent(Cookie(cookie));
        self.live.remove(&cookie);
        self.check_counts();
    }

    /// Releases the slots held after completion (manual release).
    pub fn release(&mut self) {
        for c in self.held.drain(..) {
            self.tx.release(c);
        }
    }

    /// The server sent these bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.wire.push(bytes);
    }

    fn die(&mut self) {
        assert!(self.tx.is_failed(), "an error must fail the connection");
        assert_eq!(self.tx.next(), ReceiveNext::Bytes(0));
        self.dead = true;
        let mut failed: Vec<u64> = self.tx.fail_all().map(|c| c.0).collect();
        failed.sort_unstable();
        assert_eq!(
            failed,
            self.cookies(),
            "fail_all() returns exactly the requests in flight"
        );
        self.live.clear();
        self.check_counts();
    }

    fn event(&mut self, ev: Event) {
        match ev {
            Event::Nothing => {}
            Event::Hole {
                cookie,
                buf_offset,
                length,
            } => {
                assert!(length > 0, "empty hole");
                self.content(cookie, buf_offset, length);
            }
            Event::Status {
                cookie,
                context_id,
                extents,
            } => {
                let l = self
                    .live
                    .get_mut(&cookie.0)
                    .expect("block status for a request in flight");
                assert_eq!(l.req.command, Command::BLOCK_STATUS);
                assert!(self.neg.contexts.iter().any(|c| c.id == context_id), "unknown context");
                l.statuses += 1;
                assert!(
                    l.statuses as usize <= self.neg.contexts.len(),
                    "a context answered twice"
                );
                let mut n = 0u64;
                let mut sum = 0u64;
                for e in extents {
                    assert!(e.length > 0, "extent of length 0");
                    n += 1;
                    sum = sum.saturating_add(e.length);
                }
                assert!(n > 0, "block status without extents");
                if l.req.flags.contains(CommandFlags::REQ_ONE) {
                    assert!(n == 1 && sum <= l.req.length, "REQ_ONE violated");
                }
            }
            Event::Done {
                cookie,
                command,
                result,
            } => {
                let l = self
                    .live
                    .remove(&cookie.0)
                    .expect("Done for a request not in flight (or twice)");
                assert_eq!(l.req.command, command);
                if result.is_ok() {
                    if command == Command::READ {
                        assert_eq!(l.covered, l.req.length, "successful read not covered");
                    }
                    if command == Command::BLOCK_STATUS {
                        assert!(l.statuses > 0, "successful block status without status");
                    }
                } else if let Err(e) = &result {
                    if let Some(o) = e.offset {
                        assert!(o >= l.req.offset && o < l.req.offset.saturating_add(l.req.length.max(1)));
                    }
                    assert!(e.message.len() <= 3 * MAX_STRING_LEN);
                }
                if self.manual_release {
                    self.held.push(cookie);
                }
            }
        }
        self.check_counts();
    }

    /// Data or a hole for `cookie`: within the request's buffer.
    fn content(&mut self, cookie: Cookie, buf_offset: u64, length: u64) {
        let l = self.live.get_mut(&cookie.0).expect("content for a request in flight");
        assert_eq!(l.req.command, Command::READ, "content for {:?}", l.req.command);
        let end = buf_offset.checked_add(length).expect("span overflows");
        assert!(
            end <= l.req.length,
            "span {buf_offset}+{length} beyond the buffer of {}",
            l.req.length
        );
        l.chunks += 1;
        // "At most one content chunk" (it may be short if an error follows).
        assert!(
            l.chunks == 1 || !l.req.flags.contains(CommandFlags::DF),
            "DF read fragmented"
        );
        l.covered += length;
        assert!(l.covered <= l.req.length, "content beyond the request");
    }

    /// Runs the machine over the bytes that arrived; returns how many more
    /// bytes it needs (0: none, or the connection is dead).
    pub fn pump(&mut self) -> usize {
        for _ in 0..MAX_STEPS {
            if self.dead {
                return 0;
            }
            match self.tx.next() {
                ReceiveNext::Bytes(0) => {
                    self.die();
                    return 0;
                }
                ReceiveNext::Bytes(k) => {
                    assert!(k <= 8 + 16 * MAX_BLOCK_STATUS_EXTENTS, "asked for {k} bytes");
                    let Some(r) = self.wire.take(k) else {
                        return k - self.wire.available();
                    };
                    match self.tx.handle_bytes(&self.wire.buf[r]).map(own) {
                        Ok(ev) => self.event(ev),
                        Err(_) => self.die(),
                    }
                }
                ReceiveNext::Data {
                    cookie,
                    buf_offset,
                    length,
                } => {
                    // The payload itself is not on the simulated wire.
                    self.content(cookie, buf_offset, length);
                    match self.tx.data_received().map(own) {
                        Ok(ev) => self.event(ev),
                        Err(_) => self.die(),
                    }
                }
                ReceiveNext::Complete => match self.tx.complete_pending().map(own) {
                    Ok(ev) => {
                        assert!(matches!(ev, Event::Done { .. }), "Complete must complete");
                        self.event(ev);
                    }
                    Err(_) => self.die(),
                },
            }
        }
        panic!("client transmission makes no progress");
    }
}

/// A [`ReplyEvent`] copied out of the driver's buffer.
#[derive(Debug)]
enum Event {
    Nothing,
    Hole {
        cookie: Cookie,
        buf_offset: u64,
        length: u64,
    },
    Status {
        cookie: Cookie,
        context_id: u32,
        extents: Vec<Extent>,
    },
    Done {
        cookie: Cookie,
        command: Command,
        result: Result<(), ServerError>,
    },
}

fn own(ev: ReplyEvent<'_>) -> Event {
    match ev {
        ReplyEvent::Nothing => Event::Nothing,
        ReplyEvent::Hole {
            cookie,
            buf_offset,
            length,
        } => Event::Hole {
            cookie,
            buf_offset,
            length,
        },
        ReplyEvent::BlockStatus {
            cookie,
            context_id,
            extents,
        } => Event::Status {
            cookie,
            context_id,
            extents: extents.collect(),
        },
        ReplyEvent::Done {
            cookie,
            command,
            result,
        } => Event::Done {
            cookie,
            command,
            result,
        },
    }
}

/// Runs client transmission for `neg` from the byte targets' input: the
/// machine's set-up, a few requests, then the server's replies.
fn client_transmission_bytes(neg: &Negotiated, u: &mut Unstructured<'_>) {
    let Ok(spec) = TxSpec::arbitrary(u) else {
        return;
    };
    let mut c = ClientTx::new(neg, spec);
    let Ok(count) = u8::arbitrary(u) else {
        return;
    };
    let minimum = neg.constraints().minimum;
    for _ in 0..count % 9 {
        let Ok(r) = ReqSpec::arbitrary(u) else {
            return;
        };
        c.request(r.request(neg.size, minimum));
    }
    let Ok(rest) = u.bytes(u.len()) else {
        return;
    };
    c.feed(rest);
    c.pump();
    c.release();
}

/// The `client_transmission` target: what was negotiated, the machine's
/// set-up and the requests come first, the rest is the server's replies.
pub fn client_transmission(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(neg) = NegSpec::arbitrary(&mut u) else {
        return;
    };
    client_transmission_bytes(&neg.negotiated(), &mut u);
}

// ---------------------------------------------------------------------------
// Server handshake
// ---------------------------------------------------------------------------

/// How the server is configured.
#[derive(Debug, Clone, Arbitrary)]
pub struct ServerSpec {
    pub oldstyle: u8,
    pub tls: u8,
    pub allow_list: bool,
    pub max_options: u8,
    pub no_zeroes: bool,
    pub support_go: bool,
    pub structured: bool,
    pub extended: bool,
}

impl ServerSpec {
    /// The value this stands for.
    pub fn config(&self) -> ServerConfig {
        ServerConfig {
            oldstyle: self.oldstyle % 8 == 7,
            tls: match self.tls % 3 {
                0 => TlsPolicy::NoTls,
                1 => TlsPolicy::ForcedTls,
                _ => TlsPolicy::SelectiveTls,
            },
            allow_list: self.allow_list,
            max_options: if self.max_options < 16 {
                self.max_options as u32
            } else {
                ServerConfig::default().max_options
            },
            no_zeroes: self.no_zeroes,
            support_go: self.support_go,
            structured_replies: self.structured,
            extended_headers: self.extended,
            ..ServerConfig::default()
        }
    }
}

/// The driver's answer to a lookup.
#[derive(Debug, Clone, Arbitrary)]
pub struct ExportSpec {
    pub canonical: Option<Name>,
    pub description: Option<Name>,
    pub size: Size,
    pub flags: u16,
    pub block: u8,
    pub block_size_required: bool,
    pub contexts: u8,
    pub tls_only: bool,
}

impl ExportSpec {
    /// The value this stands for.
    pub fn details(&self, requested: &str) -> ExportDetails {
        const CONTEXTS: [&str; 5] = [
            CONTEXT_BASE_ALLOCATION,
            CONTEXT_QEMU_ALLOCATION_DEPTH,
            "qemu:dirty-bitmap:b0",
            "x-vendor:wide",
            "nonamespace",
        ];
        ExportDetails {
            name: self.canonical.map_or_else(|| requested.to_owned(), Name::get),
            description: self.description.map(Name::get).unwrap_or_default(),
            size: self.size.get(),
            flags: TransmissionFlags::from_bits_retain(self.flags),
            block_size: if self.block == u8::MAX {
                // Invalid constraints: the machine refuses them as misuse.
                Some(BlockSizeConstraints {
                    minimum: 3,
                    preferred: 4096,
                    maximum: 4096,
                })
            } else {
                block_size(self.block)
            },
            block_size_required: self.block_size_required,
            meta_contexts: CONTEXTS
                .iter()
                .enumerate()
                .filter(|(i, _)| self.contexts & (1 << i) != 0)
                .map(|(_, c)| (*c).to_owned())
                .collect(),
            tls_only: self.tls_only,
        }
    }
}

fn default_export() -> ExportSpec {
    ExportSpec {
        canonical: None,
        description: Some(Name::Other),
        size: Size::Mega,
        flags: 0xffff,
        block: 2,
        block_size_required: false,
        contexts: 0x0f,
        tls_only: false,
    }
}

/// One export of the driver's answer to `NBD_OPT_LIST`.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub struct ListEntry {
    pub name: Name,
    pub description: Option<Name>,
    pub tls_only: bool,
}

/// Where the server handshake stopped.
#[derive(Debug)]
pub enum ServerHsStatus {
    /// This many more bytes from the client are needed.
    NeedBytes(usize),
    /// Look this export up.
    Lookup(String),
    /// List the exports.
    List,
    /// The handshake is complete.
    Done(Box<ServerNegotiated>),
    /// The handshake failed or was aborted.
    Over,
}

/// Drives a [`ServerHandshake`].
#[derive(Debug)]
pub struct ServerHs {
    hs: Option<ServerHandshake>,
    wire: Wire,
    config: ServerConfig,
}

impl ServerHs {
    /// A server handshake with this configuration.
    pub fn new(spec: &ServerSpec) -> Self {
        let config = spec.config();
        ServerHs {
            hs: Some(ServerHandshake::new(config.clone())),
            wire: Wire::default(),
            config,
        }
    }

    /// The client sent these bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.wire.push(bytes);
    }

    /// Runs the machine as far as it goes.
    pub fn pump(&mut self) -> ServerHsStatus {
        for _ in 0..MAX_STEPS {
            let Some(hs) = self.hs.as_mut() else {
                return ServerHsStatus::Over;
            };
            match hs.step() {
                ServerStep::Send(b) => {
                    check_server_send(b, hs.current_option(), &self.config);
                    hs.sent();
                }
                ServerStep::Receive(n) => {
                    assert!(n > 0 && n <= MAX_OPTION_DATA as usize, "server asked for {n} bytes");
                    let Some(r) = self.wire.take(n) else {
                        return ServerHsStatus::NeedBytes(n - self.wire.available());
                    };
                    if let Err(e) = hs.received(&self.wire.buf[r]) {
                        assert!(!matches!(e, ServerHandshakeError::Misuse(_)), "{e}");
                        assert_eq!(hs.step(), ServerStep::Closed, "a failed handshake must close");
                        self.hs = None;
                    }
                }
                ServerStep::Discard(n) => {
                    assert!(n > 0, "discard nothing");
                    if self.wire.take(n).is_none() {
                        return ServerHsStatus::NeedBytes(n - self.wire.available());
                    }
                    hs.discarded().expect("discarded() after Discard");
                }
                ServerStep::StartTls => {
                    assert_ne!(self.config.tls, TlsPolicy::NoTls, "STARTTLS accepted without TLS");
                    hs.tls_established().expect("tls_established() after StartTls");
                }
                ServerStep::LookupExport { name } => {
                    assert!(name.len() <= MAX_STRING_LEN && !name.contains('\0'));
                    return ServerHsStatus::Lookup(name.to_owned());
                }
                ServerStep::ListExports => return ServerHsStatus::List,
                ServerStep::Done => {
                    let hs = self.hs.take().expect("machine present");
                    let n = hs.finish().expect("Done, yet finish() failed");
                    check_server_negotiated(&n, &self.config);
                    return ServerHsStatus::Done(Box::new(n));
                }
                ServerStep::Aborted | ServerStep::Closed => self.hs = None,
            }
        }
        panic!("server handshake makes no progress");
    }

    /// Answers a lookup.
    pub fn answer_export(&mut self, name: &str, spec: Option<&ExportSpec>) {
        let Some(hs) = self.hs.as_mut() else {
            return;
        };
        let mut r = hs.answer_export(spec.map(|s| s.details(name)));
        if matches!(r, Err(ServerHandshakeError::Misuse(_))) {
            // Invalid details change nothing: answer again.
            assert!(matches!(hs.step(), ServerStep::LookupExport { .. }), "{r:?}");
            r = hs.answer_export(None);
        }
        if let Err(e) = r {
            assert!(!matches!(e, ServerHandshakeError::Misuse(_)), "{e}");
            assert_eq!(hs.step(), ServerStep::Closed);
            self.hs = None;
        }
    }

    /// Answers `NBD_OPT_LIST`.
    pub fn answer_list(&mut self, entries: &[ListEntry]) {
        let Some(hs) = self.hs.as_mut() else {
            return;
        };
        let owned: Vec<(String, String, bool)> = entries
            .iter()
            .take(4)
            .map(|e| {
                (
                    e.name.get(),
                    e.description.map(Name::get).unwrap_or_default(),
                    e.tls_only,
                )
            })
            .collect();
        let list: Vec<ExportListing<'_>> = owned
            .iter()
            .map(|(name, description, tls_only)| ExportListing {
                name,
                description,
                tls_only: *tls_only,
            })
            .collect();
        if hs.answer_list(&list).is_err() {
            assert_eq!(hs.step(), ServerStep::ListExports, "invalid listings change nothing");
            hs.answer_list(&[]).expect("an empty list is valid");
        }
    }
}

/// Checks what the server sends: a greeting, an `NBD_OPT_EXPORT_NAME`
/// answer, or the option replies to one option, ending with one final
/// reply (an ACK or an error).
fn check_server_send(b: &[u8], option: OptionType, config: &ServerConfig) {
    if b.get(..8) == Some(&NBDMAGIC.to_be_bytes()[..]) {
        if config.oldstyle {
            assert_eq!(b.len(), 16 + 8 + 4 + ZERO_PAD_LEN, "oldstyle greeting");
            assert_eq!(b[8..16], CLISERV_MAGIC.to_be_bytes());
            let flags = u16::from_be_bytes([b[26], b[27]]);
            assert!(TransmissionFlags::from_bits_retain(flags).contains(TransmissionFlags::HAS_FLAGS));
        } else {
            assert_eq!(b.len(), 18, "newstyle greeting");
            assert_eq!(b[8..16], IHAVEOPT.to_be_bytes());
            let flags = HandshakeFlags::from_bits_retain(u16::from_be_bytes([b[16], b[17]]));
            assert!(flags.contains(HandshakeFlags::FIXED_NEWSTYLE));
            assert_eq!(flags.contains(HandshakeFlags::NO_ZEROES), config.no_zeroes);
        }
        return;
    }
    if option == OptionType::EXPORT_NAME {
        assert!(
            b.len() == 10 || b.len() == 10 + ZERO_PAD_LEN,
            "NBD_OPT_EXPORT_NAME answer"
        );
        let flags = u16::from_be_bytes([b[8], b[9]]);
        assert!(TransmissionFlags::from_bits_retain(flags).contains(TransmissionFlags::HAS_FLAGS));
        return;
    }
    let mut rest = b;
    let mut finals = 0;
    while !rest.is_empty() {
        assert_eq!(finals, 0, "replies after the final reply");
        let (h, r) = OptionReplyHeader::read_from_prefix(rest).expect("an option reply header");
        assert_eq!(h.magic.get(), OPTION_REPLY_MAGIC);
        assert_eq!(OptionType(h.option.get()), option, "reply for another option");
        let len = h.length.get() as usize;
        assert!(len <= r.len(), "reply length beyond what is sent");
        let (payload, r) = r.split_at(len);
        let reply = ReplyType(h.reply_type.get());
        match reply {
            ReplyType::ACK => {
                assert!(payload.is_empty());
                finals += 1;
            }
            ReplyType::SERVER => {
                let n = u32::from_be_bytes(payload[..4].try_into().expect("4 bytes")) as usize;
                assert!(4 + n <= payload.len() && n <= MAX_STRING_LEN);
                assert!(payload.len() - 4 - n <= MAX_STRING_LEN);
            }
            ReplyType::INFO => assert!(payload.len() >= 2 && payload.len() <= 2 + MAX_STRING_LEN),
            ReplyType::META_CONTEXT => {
                assert!(payload.len() > 4 && payload.len() <= 4 + MAX_STRING_LEN);
                let name = std::str::from_utf8(&payload[4..]).expect("context name is UTF-8");
                assert!(name.contains(':'));
            }
            e if e.is_error() => {
                assert!(e.name().is_some(), "unknown error reply {e}");
                assert!(payload.len() <= MAX_STRING_LEN);
                if e == ReplyType::ERR_TLS_REQD {
                    assert_ne!(config.tls, TlsPolicy::NoTls, "NBD_REP_ERR_TLS_REQD in NOTLS mode");
                }
                finals += 1;
            }
            other => panic!("unknown reply type {other}"),
        }
        rest = r;
    }
    assert_eq!(finals, 1, "one final reply per option");
}

fn check_server_negotiated(n: &ServerNegotiated, config: &ServerConfig) {
    let f = n.flags;
    assert!(f.contains(TransmissionFlags::HAS_FLAGS));
    assert!(
        (TransmissionFlags::all() - TransmissionFlags::SEND_RESIZE).contains(f),
        "flags {f:?} beyond what the server implements"
    );
    if f.contains(TransmissionFlags::SEND_FAST_ZERO) {
        assert!(f.contains(TransmissionFlags::SEND_WRITE_ZEROES));
    }
    if f.contains(TransmissionFlags::BLOCK_STATUS_PAYLOAD) {
        assert!(n.mode == Mode::Extended && !n.contexts.is_empty() && n.contexts.len() <= 64);
    }
    assert_eq!(f.contains(TransmissionFlags::SEND_DF), n.mode.structured());
    assert_eq!(config.oldstyle, n.mode == Mode::Oldstyle);
    if n.mode == Mode::Extended {
        assert!(config.extended_headers && config.support_go);
    }
    if n.mode == Mode::Structured {
        assert!(config.structured_replies);
    }
    if n.tls {
        assert_ne!(config.tls, TlsPolicy::NoTls);
    }
    if config.tls == TlsPolicy::ForcedTls {
        assert!(n.tls, "FORCEDTLS reached transmission without TLS");
    }
    if !n.mode.structured() {
        assert!(n.contexts.is_empty());
    }
    let ids: HashSet<u32> = n.contexts.iter().map(|c| c.id).collect();
    assert_eq!(ids.len(), n.contexts.len(), "context ids are unique");
    assert!(!ids.contains(&0));
    if let Some(b) = n.block_size {
        b.validate().expect("valid block sizes");
    }
}

/// The `server_handshake` target: the first bytes configure the server,
/// the rest is what the client sends, with the driver's answers to lookups
/// and lists read from the same stream when the machine asks. After a
/// successful handshake the rest drives transmission.
pub fn server_handshake(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(spec) = ServerSpec::arbitrary(&mut u) else {
        return;
    };
    let mut s = ServerHs::new(&spec);
    loop {
        match s.pump() {
            ServerHsStatus::NeedBytes(k) => match feed_from(&mut u, k) {
                Some(b) => s.feed(b),
                None => return,
            },
            ServerHsStatus::Lookup(name) => {
                let Ok(a) = Option::<ExportSpec>::arbitrary(&mut u) else {
                    return;
                };
                s.answer_export(&name, a.as_ref());
            }
            ServerHsStatus::List => {
                let Ok(l) = Vec::<ListEntry>::arbitrary(&mut u) else {
                    return;
                };
                s.answer_list(&l);
            }
            ServerHsStatus::Done(n) => {
                assert_eq!(s.wire.available(), 0, "the server read exactly the handshake");
                return server_transmission_bytes(&n, &mut u);
            }
            ServerHsStatus::Over => return,
        }
    }
}

// ---------------------------------------------------------------------------
// Server transmission
// ---------------------------------------------------------------------------

/// What a server handshake could have negotiated.
#[derive(Debug, Clone, Arbitrary)]
pub struct ServerNegSpec {
    pub mode: u8,
    pub size: Size,
    pub flags: u16,
    pub block: u8,
    pub contexts: u8,
    pub ids: [u32; 4],
    pub client_requested_block_size: bool,
}

impl ServerNegSpec {
    /// The value this stands for.
    pub fn negotiated(&self) -> ServerNegotiated {
        let mode = mode(self.mode);
        let block_size = block_size(self.block);
        ServerNegotiated {
            mode,
            export_name: "disk".into(),
            requested_name: String::new(),
            size: self.size.get(),
            flags: TransmissionFlags::from_bits_retain(self.flags) | TransmissionFlags::HAS_FLAGS,
            block_size,
            contexts: contexts(self.contexts, self.ids),
            tls: false,
            client_requested_block_size: self.client_requested_block_size && block_size.is_some(),
        }
    }
}

/// A message for [`ReplyEncoder`] calls.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum Msg {
    /// Nothing.
    Empty,
    /// A short message.
    Short,
    /// Over 4096 bytes of 3-byte characters.
    Long,
    /// With a NUL.
    Nul,
}

impl Msg {
    /// The value this stands for.
    pub fn get(self) -> String {
        match self {
            Msg::Empty => String::new(),
            Msg::Short => "no such luck".into(),
            Msg::Long => "\u{20ac}".repeat(1400),
            Msg::Nul => "before\0after".into(),
        }
    }
}

/// A request as a driver might give it to the encoder, valid or not.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub struct RawRequest {
    cookie: u64,
    cmd: u8,
    flags: u16,
    offset: u64,
    length: u64,
    mask: Option<u64>,
}

/// Arguments for the [`ReplyEncoder`] calls made for a request.
#[derive(Debug, Clone, Arbitrary)]
pub struct EncSpec {
    error: u32,
    message: Msg,
    offset: Num,
    length: Num,
    done: bool,
    context: u32,
    extents: Vec<(Num, u64)>,
    chunk: u16,
    flags: u16,
    payload_len: u64,
    raw: Option<RawRequest>,
}

/// Drives a [`ServerTransmission`] and its [`ReplyEncoder`].
#[derive(Debug)]
pub struct ServerTx {
    st: ServerTransmission,
    neg: ServerNegotiated,
    wire: Wire,
    enc: Vec<EncSpec>,
    next_enc: usize,
    out: Vec<u8>,
    shut: bool,
}

impl ServerTx {
    /// A transmission machine for `neg`; `enc` gives the encoder calls'
    /// arguments, used in turn for each request.
    pub fn new(neg: &ServerNegotiated, enc: Vec<EncSpec>) -> Self {
        ServerTx {
            st: ServerTransmission::new(neg),
            neg: neg.clone(),
            wire: Wire::default(),
            enc,
            next_enc: 0,
            out: Vec::new(),
            shut: false,
        }
    }

    /// The driver shuts down.
    pub fn shutdown(&mut self) {
        self.st.shutdown();
        self.shut = true;
    }

    /// The client sent these bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.wire.push(bytes);
    }

    fn header_len(&self) -> usize {
        if self.neg.mode.extended() {
            EXTENDED_REQUEST_HEADER_LEN
        } else {
            REQUEST_HEADER_LEN
        }
    }

    /// Runs the machine over the bytes that arrived; returns how many more
    /// bytes it needs (0: none, or the connection is closed).
    pub fn pump(&mut self) -> usize {
        for _ in 0..MAX_STEPS {
            match self.st.next() {
                ServerReceive::Bytes(n) => {
                    assert!(
                        n == self.header_len() || (12..=8 + 4 * 64).contains(&n),
                        "asked for {n} bytes"
                    );
                    let Some(r) = self.wire.take(n) else {
                        return n - self.wire.available();
                    };
                    match self.st.handle_bytes(&self.wire.buf[r]) {
                        Ok(ev) => self.event(ev),
                        Err(ServerTransmissionError::Violation(_)) => {
                            assert!(self.st.is_closed());
                            assert_eq!(self.st.next(), ServerReceive::Closed);
                            return 0;
                        }
                        Err(e) => panic!("driver followed next() yet: {e}"),
                    }
                }
                ServerReceive::Payload { length, .. } => {
                    assert!(length > 0 && length <= self.st.constraints().maximum as u64);
                    self.st.payload_received().expect("payload_received() after Payload");
                }
                ServerReceive::Discard(n) => {
                    assert!(n > 0);
                    self.st.discarded().expect("discarded() after Discard");
                }
                ServerReceive::Closed => {
                    assert!(self.st.is_closed());
                    return 0;
                }
            }
        }
        panic!("server transmission makes no progress");
    }

    fn event(&mut self, ev: RequestEvent) {
        match ev {
            RequestEvent::Continue => {
                assert!(matches!(self.st.next(), ServerReceive::Bytes(n) if n != self.header_len()));
            }
            RequestEvent::Request(r) => {
                assert!(!self.shut, "a request accepted after shutdown");
                self.check_request(&r);
                let next = self.st.next();
                if r.command == Command::WRITE && r.length > 0 {
                    assert_eq!(
                        next,
                        ServerReceive::Payload {
                            cookie: r.cookie,
                            length: r.length
                        }
                    );
                } else {
                    assert_eq!(next, ServerReceive::Bytes(self.header_len()));
                }
                self.encode(&r);
            }
            RequestEvent::Reject { request, error, reason } => {
                assert_ne!(error.0, 0, "rejected with error 0");
                assert!(!reason.is_empty());
                assert!(matches!(
                    self.st.next(),
                    ServerReceive::Discard(_) | ServerReceive::Bytes(_)
                ));
                self.encode(&request);
            }
            RequestEvent::Disconnect => assert_eq!(self.st.next(), ServerReceive::Closed),
        }
    }

    /// Every request the machine lets through obeys the spec's rules.
    fn check_request(&self, r: &ServerRequest) {
        let n = &self.neg;
        let f = n.flags;
        let c = self.st.constraints();
        let ext = n.mode.extended();
        let mut allowed = CommandFlags::FUA;
        match r.command {
            Command::READ => allowed |= CommandFlags::DF,
            Command::WRITE if ext => allowed |= CommandFlags::PAYLOAD_LEN,
            Command::WRITE | Command::FLUSH | Command::TRIM | Command::CACHE => {}
            Command::WRITE_ZEROES => allowed |= CommandFlags::NO_HOLE | CommandFlags::FAST_ZERO,
            Command::BLOCK_STATUS => {
                allowed |= CommandFlags::REQ_ONE;
                if ext && f.contains(TransmissionFlags::BLOCK_STATUS_PAYLOAD) {
                    allowed |= CommandFlags::PAYLOAD_LEN;
                }
            }
            other => panic!("accepted unknown command {other}"),
        }
        assert!(allowed.contains(r.flags), "flags {:?} for {}", r.flags, r.command);
        for (flag, needs) in [
            (CommandFlags::FUA, TransmissionFlags::SEND_FUA),
            (CommandFlags::DF, TransmissionFlags::SEND_DF),
            (CommandFlags::FAST_ZERO, TransmissionFlags::SEND_FAST_ZERO),
        ] {
            if r.flags.contains(flag) {
                assert!(f.contains(needs));
            }
        }
        let needs = match r.command {
            Command::FLUSH => TransmissionFlags::SEND_FLUSH,
            Command::TRIM => TransmissionFlags::SEND_TRIM,
            Command::WRITE_ZEROES => TransmissionFlags::SEND_WRITE_ZEROES,
            Command::CACHE => TransmissionFlags::SEND_CACHE,
            _ => TransmissionFlags::HAS_FLAGS,
        };
        assert!(f.contains(needs), "{} not advertised", r.command);
        if f.contains(TransmissionFlags::READ_ONLY) {
            assert!(!matches!(
                r.command,
                Command::WRITE | Command::TRIM | Command::WRITE_ZEROES
            ));
        }
        if r.command == Command::FLUSH {
            assert_eq!((r.offset, r.length), (0, 0));
            return;
        }
        if r.command == Command::BLOCK_STATUS {
            assert!(n.mode.structured() && !n.contexts.is_empty() && r.length > 0);
            if let ContextSelection::Only(mask) = r.contexts {
                assert_ne!(mask, 0);
                let count = n.contexts.len().min(64);
                assert!(count == 64 || mask >> count == 0, "selection of unknown contexts");
            }
        } else {
            assert_eq!(r.contexts, ContextSelection::All);
        }
        let end = r.offset.checked_add(r.length).expect("offset + length overflows");
        assert!(end <= n.size, "request past the end of the export");
        let min = c.minimum.max(1) as u64;
        assert_eq!(r.offset % min, 0, "unaligned offset");
        assert!(r.length % min == 0 || end == n.size, "unaligned length");
        let maximum = c.maximum as u64;
        if r.command == Command::WRITE {
            assert!(r.length <= maximum, "write beyond the maximum payload");
        }
        if r.command == Command::READ {
            assert!(r.length <= maximum || n.mode.structured());
            assert!(ext || r.length <= u32::MAX as u64 - 8);
        }
    }

    /// Calls every encoder function for this request (and for a fuzzed
    /// one) and checks what they produce.
    fn encode(&mut self, decoded: &ServerRequest) {
        let Some(e) = (!self.enc.is_empty()).then(|| self.enc[self.next_enc % self.enc.len()].clone()) else {
            return;
        };
        self.next_enc += 1;
        self.encode_for(decoded, &e);
        if let Some(raw) = e.raw {
            let r = ServerRequest {
                cookie: raw.cookie,
                command: command(raw.cmd),
                flags: CommandFlags::from_bits_retain(raw.flags),
                offset: raw.offset,
                length: raw.length,
                contexts: raw.mask.map_or(ContextSelection::All, ContextSelection::Only),
            };
            self.encode_for(&r, &e);
        }
    }

    fn encode_for(&mut self, r: &ServerRequest, e: &EncSpec) {
        let enc: ReplyEncoder = self.st.encoder();
        let mode = self.neg.mode;
        let ext = mode.extended();
        let block = (self.st.constraints().minimum as u64).max(512);
        let message = e.message.get();
        let code = ErrorCode(e.error);

        let h = enc.encode_simple_reply(r.cookie, code);
        let (s, _) = SimpleReplyHeader::read_from_prefix(h.as_bytes()).expect("simple reply");
        assert_eq!((h.as_bytes().len(), s.magic.get()), (16, SIMPLE_REPLY_MAGIC));

        let flags = ReplyFlags::from_bits_retain(e.flags);
        match enc.encode_chunk_header(r.cookie, r.offset, flags, ReplyChunkType(e.chunk), e.payload_len) {
            Ok(h) => {
                assert!(mode.structured());
                assert!(ext || e.payload_len <= u32::MAX as u64);
                let c = parse_chunk(h.as_bytes(), ext, true);
                assert_eq!((c.flags, c.chunk.0, c.cookie), (e.flags, e.chunk, r.cookie));
            }
            Err(_) => assert!(!mode.structured() || (!ext && e.payload_len > u32::MAX as u64)),
        }

        let h = enc.reply_ok(r);
        if mode.structured() {
            let c = parse_chunk(h.as_bytes(), ext, false);
            assert_eq!((c.chunk, c.flags, c.payload.len()), (ReplyChunkType::NONE, 1, 0));
        } else {
            assert_eq!(h.as_bytes().len(), SIMPLE_REPLY_HEADER_LEN);
        }

        self.out.clear();
        enc.reply_error(r, code, &message, &mut self.out);
        if mode.structured() {
            let c = parse_chunk(&self.out, ext, false);
            assert_eq!(c.chunk, ReplyChunkType::ERROR);
            check_error_payload(c.payload, false);
        } else {
            let (s, rest) = SimpleReplyHeader::read_from_prefix(&self.out).expect("simple reply");
            assert!(rest.is_empty() && s.error.get() != 0);
        }

        let offset = r.offset.wrapping_add(e.offset.get(r.length, block));
        let length = e.length.get(r.length, block);

        self.out.clear();
        match enc.reply_error_offset(r, code, &message, offset, e.done, &mut self.out) {
            Ok(()) => {
                assert!(mode.structured());
                assert!(offset >= r.offset && offset < r.offset.saturating_add(r.length.max(1)));
                let c = parse_chunk(&self.out, ext, false);
                assert_eq!(c.chunk, ReplyChunkType::ERROR_OFFSET);
                check_error_payload(c.payload, true);
            }
            Err(_) => assert!(self.out.is_empty()),
        }

        if let Ok(h) = enc.read_reply_header(r) {
            assert_eq!(r.command, Command::READ);
            if mode.structured() && r.length > 0 {
                let c = parse_chunk(h.as_bytes(), ext, true);
                assert_eq!(c.chunk, ReplyChunkType::OFFSET_DATA);
                assert_eq!(c.length, r.length + 8);
            }
        }

        let within = |offset: u64, length: u64| {
            length > 0
                && offset >= r.offset
                && offset
                    .checked_add(length)
                    .is_some_and(|end| end <= r.offset.saturating_add(r.length))
                && (!r.flags.contains(CommandFlags::DF) || (offset == r.offset && length == r.length))
        };
        if let Ok(h) = enc.offset_data_header(r, offset, length, e.done) {
            assert!(mode.structured() && r.command == Command::READ && within(offset, length));
            let c = parse_chunk(h.as_bytes(), ext, true);
            assert_eq!((c.chunk, c.length), (ReplyChunkType::OFFSET_DATA, length + 8));
            assert_eq!(c.payload, offset.to_be_bytes());
        }
        if let Ok(h) = enc.hole_chunk(r, offset, length, e.done) {
            assert!(mode.structured() && r.command == Command::READ && within(offset, length));
            assert!(length <= u32::MAX as u64);
            let c = parse_chunk(h.as_bytes(), ext, false);
            assert_eq!((c.chunk, c.payload.len()), (ReplyChunkType::OFFSET_HOLE, 12));
        }

        // Block status, appended after something already in `out`.
        self.out.clear();
        self.out.extend_from_slice(b"xyz");
        let extents: Vec<(u64, u64)> = e
            .extents
            .iter()
            .take(16)
            .map(|(n, s)| (n.get(r.length, block), *s))
            .collect();
        match enc.block_status_chunk(r, e.context, extents.iter().copied(), e.done, &mut self.out) {
            Ok(sum) => {
                assert!(mode.structured() && r.command == Command::BLOCK_STATUS);
                let c = parse_chunk(&self.out[3..], ext, false);
                assert_eq!(c.flags & 1 != 0, e.done);
                self.check_status(r, e.context, c, sum);
            }
            Err(_) => assert_eq!(self.out, b"xyz", "a refused chunk leaves out as it was"),
        }
    }

    fn check_status(&self, r: &ServerRequest, context: u32, c: Chunk<'_>, sum: u64) {
        let ext = self.neg.mode.extended();
        let p = c.payload;
        assert!(p.len() >= 4 && p[..4] == context.to_be_bytes());
        let (each, descriptors) = if ext {
            assert_eq!(c.chunk, ReplyChunkType::BLOCK_STATUS_EXT);
            let count = u32::from_be_bytes(p[4..8].try_into().expect("count"));
            assert_eq!(count as usize * 16, p.len() - 8, "descriptor count");
            (16, &p[8..])
        } else {
            assert_eq!(c.chunk, ReplyChunkType::BLOCK_STATUS);
            (8, &p[4..])
        };
        assert_eq!(descriptors.len() % each, 0);
        let lengths: Vec<u64> = descriptors
            .chunks_exact(each)
            .map(|d| {
                if ext {
                    u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
                } else {
                    u32::from_be_bytes(d[..4].try_into().expect("4 bytes")) as u64
                }
            })
            .collect();
        assert!(!lengths.is_empty() && lengths.len() <= MAX_BLOCK_STATUS_EXTENTS);
        assert!(lengths.iter().all(|l| *l > 0), "extent of length 0");
        let total = lengths
            .iter()
            .try_fold(0u64, |a, l| a.checked_add(*l))
            .expect("sum overflows");
        assert_eq!(total, sum);
        assert!(sum <= self.neg.size.saturating_sub(r.offset), "extents past the end");
        if r.flags.contains(CommandFlags::REQ_ONE) {
            assert!(lengths.len() == 1 && sum <= r.length, "REQ_ONE");
        }
        if lengths.len() > 1 {
            let last = lengths[lengths.len() - 1];
            assert!(sum - last < r.length, "extents continue after the request is covered");
        }
    }
}

/// A reply chunk as encoded.
#[derive(Debug)]
struct Chunk<'a> {
    flags: u16,
    chunk: ReplyChunkType,
    cookie: u64,
    /// The length field.
    length: u64,
    payload: &'a [u8],
}

/// Parses an encoded chunk; with `header_only` the payload that follows
/// the header in `b` (if any) may be shorter than the length field says
/// (the driver sends the data after it).
fn parse_chunk(b: &[u8], ext: bool, header_only: bool) -> Chunk<'_> {
    let (flags, chunk, cookie, length, rest) = if ext {
        let (h, rest) = ExtendedReplyHeader::read_from_prefix(b).expect("extended reply header");
        assert_eq!(h.magic.get(), EXTENDED_REPLY_MAGIC);
        (h.flags.get(), h.chunk_type.get(), h.cookie.get(), h.length.get(), rest)
    } else {
        let (h, rest) = StructuredReplyHeader::read_from_prefix(b).expect("structured reply header");
        assert_eq!(h.magic.get(), STRUCTURED_REPLY_MAGIC);
        (
            h.flags.get(),
            h.chunk_type.get(),
            h.cookie.get(),
            h.length.get() as u64,
            rest,
        )
    };
    if !header_only {
        assert_eq!(length, rest.len() as u64, "chunk length field");
    }
    Chunk {
        flags,
        chunk: ReplyChunkType(chunk),
        cookie,
        length,
        payload: rest,
    }
}

fn check_error_payload(p: &[u8], with_offset: bool) {
    let (h, rest) = ErrorPayloadHeader::read_from_prefix(p).expect("error payload");
    assert_ne!(h.error.get(), 0, "error chunk with error 0");
    let mlen = h.message_length.get() as usize;
    assert_eq!(rest.len(), mlen + if with_offset { 8 } else { 0 });
    let m = std::str::from_utf8(&rest[..mlen]).expect("message is UTF-8");
    assert!(m.len() <= MAX_STRING_LEN && !m.contains('\0'));
}

/// Runs server transmission for `neg` from the byte targets' input: the
/// encoder calls' arguments, then the client's requests.
fn server_transmission_bytes(neg: &ServerNegotiated, u: &mut Unstructured<'_>) {
    let Ok(count) = u8::arbitrary(u) else {
        return;
    };
    let mut enc = Vec::new();
    for _ in 0..count % 4 {
        let Ok(e) = EncSpec::arbitrary(u) else {
            return;
        };
        enc.push(e);
    }
    let mut s = ServerTx::new(neg, enc);
    if count >= 0xf0 {
        s.shutdown();
    }
    let Ok(rest) = u.bytes(u.len()) else {
        return;
    };
    s.feed(rest);
    s.pump();
}

/// The `server_transmission` target: what was negotiated and the encoder
/// arguments come first, the rest is the client's requests.
pub fn server_transmission(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(neg) = ServerNegSpec::arbitrary(&mut u) else {
        return;
    };
    server_transmission_bytes(&neg.negotiated(), &mut u);
}

// ---------------------------------------------------------------------------
// URIs
// ---------------------------------------------------------------------------

/// The `uri` target: a parsed URI formats back to a string that parses to
/// the same value.
pub fn uri(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    let Ok(parsed) = NbdUri::parse(&s) else {
        return;
    };
    let again = parsed.to_uri_string();
    let back = NbdUri::parse(&again).unwrap_or_else(|e| panic!("{s:?} formats as {again:?}, which fails: {e}"));
    assert_eq!(back, parsed, "{s:?} formats as {again:?}");
}

// ---------------------------------------------------------------------------
// Structured scenarios
// ---------------------------------------------------------------------------

/// A length field: right, a little off, or anything.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum LenFix {
    /// The true length.
    Exact,
    /// The true length plus or minus a little.
    Delta(i8),
    /// Anything.
    Raw(u32),
}

impl LenFix {
    fn apply(self, actual: u64) -> u64 {
        match self {
            LenFix::Exact => actual,
            LenFix::Delta(d) => actual.saturating_add_signed(d as i64),
            LenFix::Raw(v) => v as u64,
        }
    }
}

/// Which option an option reply names.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum OptSel {
    /// The option the client sent last.
    Current,
    /// Anything.
    Raw(u32),
}

/// An option reply type.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum RepSel {
    /// `NBD_REP_ACK`
    Ack,
    /// `NBD_REP_SERVER`
    Server,
    /// `NBD_REP_INFO`
    Info,
    /// `NBD_REP_META_CONTEXT`
    MetaContext,
    /// One of the errors (or an unknown one).
    Error(u8),
    /// Anything.
    Raw(u32),
}

impl RepSel {
    fn get(self) -> ReplyType {
        match self {
            RepSel::Ack => ReplyType::ACK,
            RepSel::Server => ReplyType::SERVER,
            RepSel::Info => ReplyType::INFO,
            RepSel::MetaContext => ReplyType::META_CONTEXT,
            RepSel::Error(e) => ReplyType(REP_ERR_BIT + (e % 12) as u32),
            RepSel::Raw(v) => ReplyType(v),
        }
    }
}

/// The payload of an option reply.
#[derive(Debug, Clone, Arbitrary)]
pub enum RepPayload {
    /// Nothing.
    Empty,
    /// `NBD_REP_SERVER`
    Server {
        /// Export name.
        name: Name,
        /// Its description.
        description: Option<Name>,
        /// The name length field.
        name_len: LenFix,
    },
    /// `NBD_INFO_EXPORT`
    InfoExport {
        /// Export size.
        size: Size,
        /// Transmission flags.
        flags: u16,
    },
    /// `NBD_INFO_NAME`
    InfoName(Name),
    /// `NBD_INFO_DESCRIPTION`
    InfoDescription(Name),
    /// `NBD_INFO_BLOCK_SIZE`, valid or anything.
    InfoBlockSize {
        /// Valid constraints (index).
        sel: u8,
        /// Or these.
        raw: Option<(u32, u32, u32)>,
    },
    /// An unknown information type.
    InfoUnknown(u16),
    /// `NBD_REP_META_CONTEXT`
    MetaContext {
        /// Context id.
        id: u32,
        /// Context name.
        name: Query,
    },
    /// An error message.
    Message(Name),
    /// Anything.
    Raw(Vec<u8>),
}

impl RepPayload {
    fn bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        match self {
            RepPayload::Empty => {}
            RepPayload::Server {
                name,
                description,
                name_len,
            } => {
                let name = name.get();
                v.extend_from_slice(&(name_len.apply(name.len() as u64) as u32).to_be_bytes());
                v.extend_from_slice(name.as_bytes());
                if let Some(d) = description {
                    v.extend_from_slice(d.get().as_bytes());
                }
            }
            RepPayload::InfoExport { size, flags } => {
                v.extend_from_slice(&InfoType::EXPORT.0.to_be_bytes());
                v.extend_from_slice(&size.get().to_be_bytes());
                v.extend_from_slice(&flags.to_be_bytes());
            }
            RepPayload::InfoName(n) | RepPayload::InfoDescription(n) => {
                let t = if matches!(self, RepPayload::InfoName(_)) {
                    InfoType::NAME
                } else {
                    InfoType::DESCRIPTION
                };
                v.extend_from_slice(&t.0.to_be_bytes());
                v.extend_from_slice(n.get().as_bytes());
            }
            RepPayload::InfoBlockSize { sel, raw } => {
                let c = block_size(*sel).unwrap_or_default();
                let (a, b, c) = raw.unwrap_or((c.minimum, c.preferred, c.maximum));
                v.extend_from_slice(&InfoType::BLOCK_SIZE.0.to_be_bytes());
                for x in [a, b, c] {
                    v.extend_from_slice(&x.to_be_bytes());
                }
            }
            RepPayload::InfoUnknown(t) => {
                v.extend_from_slice(&t.saturating_add(4).to_be_bytes());
                v.extend_from_slice(b"future");
            }
            RepPayload::MetaContext { id, name } => {
                v.extend_from_slice(&id.to_be_bytes());
                v.extend_from_slice(&name.wire());
            }
            RepPayload::Message(n) => v.extend_from_slice(n.get().as_bytes()),
            RepPayload::Raw(r) => v.extend_from_slice(r),
        }
        v
    }
}

/// Something a server sends during the handshake.
#[derive(Debug, Clone, Arbitrary)]
pub enum ServerMsg {
    /// The newstyle greeting.
    Greeting {
        /// Handshake flags.
        flags: u16,
    },
    /// The oldstyle greeting.
    Oldstyle {
        /// Export size.
        size: Size,
        /// Flags (the low 16 bits are the transmission flags).
        flags: u32,
    },
    /// An option reply.
    Reply {
        /// The option named.
        option: OptSel,
        /// The reply type.
        reply: RepSel,
        /// The payload.
        payload: RepPayload,
        /// The length field.
        len: LenFix,
    },
    /// The answer to `NBD_OPT_EXPORT_NAME`.
    ExportName {
        /// Export size.
        size: Size,
        /// Transmission flags.
        flags: u16,
        /// With the 124 zero bytes.
        zeroes: bool,
    },
    /// Anything.
    Raw(Vec<u8>),
}

impl ServerMsg {
    fn bytes(&self, current: Option<OptionType>) -> Vec<u8> {
        let mut v = Vec::new();
        match self {
            ServerMsg::Greeting { flags } => {
                v.extend_from_slice(&NBDMAGIC.to_be_bytes());
                v.extend_from_slice(&IHAVEOPT.to_be_bytes());
                v.extend_from_slice(&flags.to_be_bytes());
            }
            ServerMsg::Oldstyle { size, flags } => {
                v.extend_from_slice(&NBDMAGIC.to_be_bytes());
                v.extend_from_slice(&CLISERV_MAGIC.to_be_bytes());
                v.extend_from_slice(&size.get().to_be_bytes());
                v.extend_from_slice(&flags.to_be_bytes());
                v.extend_from_slice(&[0; ZERO_PAD_LEN]);
            }
            ServerMsg::Reply {
                option,
                reply,
                payload,
                len,
            } => {
                let option = match option {
                    OptSel::Current => current.unwrap_or(OptionType::GO).0,
                    OptSel::Raw(o) => *o,
                };
                let p = payload.bytes();
                v.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
                v.extend_from_slice(&option.to_be_bytes());
                v.extend_from_slice(&reply.get().0.to_be_bytes());
                v.extend_from_slice(&(len.apply(p.len() as u64) as u32).to_be_bytes());
                v.extend_from_slice(&p);
            }
            ServerMsg::ExportName { size, flags, zeroes } => {
                v.extend_from_slice(&size.get().to_be_bytes());
                v.extend_from_slice(&flags.to_be_bytes());
                if *zeroes {
                    v.extend_from_slice(&[0; ZERO_PAD_LEN]);
                }
            }
            ServerMsg::Raw(r) => v.extend_from_slice(r),
        }
        v
    }
}

/// An option type a client sends.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum OptKind {
    /// A known option (index into the `NBD_OPT_*` values 1 to 11).
    Known(u8),
    /// Anything.
    Raw(u32),
}

/// The data of a client option.
#[derive(Debug, Clone, Arbitrary)]
pub enum OptData {
    /// Nothing.
    Empty,
    /// A name (`NBD_OPT_EXPORT_NAME`).
    Name(Name),
    /// `NBD_OPT_INFO`/`NBD_OPT_GO` data.
    InfoRequest {
        /// Export name.
        name: Name,
        /// Information requests.
        infos: Vec<u16>,
        /// The name length field.
        name_len: LenFix,
        /// The request count field.
        count: LenFix,
    },
    /// Meta-context option data.
    MetaContext {
        /// Export name.
        name: Name,
        /// Queries.
        queries: Vec<Query>,
        /// The query count field.
        count: LenFix,
        /// One query length field to corrupt.
        query_len: LenFix,
    },
    /// Anything.
    Raw(Vec<u8>),
}

impl OptData {
    fn bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        match self {
            OptData::Empty => {}
            OptData::Name(n) => v.extend_from_slice(n.get().as_bytes()),
            OptData::InfoRequest {
                name,
                infos,
                name_len,
                count,
            } => {
                let name = name.get();
                v.extend_from_slice(&(name_len.apply(name.len() as u64) as u32).to_be_bytes());
                v.extend_from_slice(name.as_bytes());
                let infos = &infos[..infos.len().min(8)];
                v.extend_from_slice(&(count.apply(infos.len() as u64) as u16).to_be_bytes());
                for i in infos {
                    v.extend_from_slice(&(i % 6).to_be_bytes());
                }
            }
            OptData::MetaContext {
                name,
                queries,
                count,
                query_len,
            } => {
                let name = name.get();
                v.extend_from_slice(&(name.len() as u32).to_be_bytes());
                v.extend_from_slice(name.as_bytes());
                let queries = &queries[..queries.len().min(8)];
                v.extend_from_slice(&(count.apply(queries.len() as u64) as u32).to_be_bytes());
                for (i, q) in queries.iter().enumerate() {
                    let q = q.wire();
                    let len = if i == 0 {
                        query_len.apply(q.len() as u64)
                    } else {
                        q.len() as u64
                    };
                    v.extend_from_slice(&(len as u32).to_be_bytes());
                    v.extend_from_slice(&q);
                }
            }
            OptData::Raw(r) => v.extend_from_slice(r),
        }
        v
    }
}

/// Something a client sends during the handshake.
#[derive(Debug, Clone, Arbitrary)]
pub enum ClientMsg {
    /// Client flags: bit 0 fixed newstyle, bit 1 no zeroes, bit 7 an unknown bit.
    Flags(u8),
    /// An option.
    Option {
        /// Its type.
        option: OptKind,
        /// Its data.
        data: OptData,
        /// The length field.
        len: LenFix,
        /// Keep the magic (else corrupt it).
        magic: bool,
    },
    /// Anything.
    Raw(Vec<u8>),
}

impl ClientMsg {
    fn bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        match self {
            ClientMsg::Flags(f) => {
                let bits = (f & 3) as u32 | if f & 0x80 != 0 { 1 << 7 } else { 0 };
                v.extend_from_slice(&bits.to_be_bytes());
            }
            ClientMsg::Option {
                option,
                data,
                len,
                magic,
            } => {
                let option = match option {
                    OptKind::Known(k) => (k % 11) as u32 + 1,
                    OptKind::Raw(o) => *o,
                };
                let d = data.bytes();
                let m = if *magic { IHAVEOPT } else { IHAVEOPT ^ 1 };
                v.extend_from_slice(&m.to_be_bytes());
                v.extend_from_slice(&option.to_be_bytes());
                v.extend_from_slice(&(len.apply(d.len() as u64) as u32).to_be_bytes());
                v.extend_from_slice(&d);
            }
            ClientMsg::Raw(r) => v.extend_from_slice(r),
        }
        v
    }
}

/// Which cookie a reply names.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum CookieSel {
    /// The `n`th request in flight (by cookie order).
    Live(u8),
    /// Anything.
    Raw(u64),
}

/// Which context a block-status chunk names.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum CtxSel {
    /// The `n`th negotiated context.
    Nth(u8),
    /// Anything.
    Raw(u32),
}

impl CtxSel {
    fn get(self, contexts: &[MetaContext]) -> u32 {
        match self {
            CtxSel::Nth(n) if !contexts.is_empty() => contexts[n as usize % contexts.len()].id,
            CtxSel::Nth(n) => n as u32,
            CtxSel::Raw(v) => v,
        }
    }
}

/// The body of a reply chunk.
#[derive(Debug, Clone, Arbitrary)]
pub enum ChunkBody {
    /// `NBD_REPLY_TYPE_NONE`
    None,
    /// `NBD_REPLY_TYPE_OFFSET_DATA` (its data is not on the wire).
    Data {
        /// Offset from the request's offset.
        at: Num,
        /// Data length.
        len: Num,
    },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`
    Hole {
        /// Offset from the request's offset.
        at: Num,
        /// Hole length.
        len: Num,
    },
    /// `NBD_REPLY_TYPE_ERROR`, or `_ERROR_OFFSET` with an offset.
    Error {
        /// Error value.
        code: u32,
        /// Message.
        message: Name,
        /// The message length field.
        message_len: LenFix,
        /// The offset (from the request's offset).
        offset: Option<Num>,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`
    Status {
        /// Context.
        ctx: CtxSel,
        /// (length, status) descriptors.
        extents: Vec<(u32, u32)>,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`
    StatusExt {
        /// Context.
        ctx: CtxSel,
        /// The count field.
        count: LenFix,
        /// (length, status) descriptors.
        extents: Vec<(u64, u64)>,
    },
    /// Another chunk type.
    Other {
        /// Chunk type.
        chunk: u16,
        /// Payload.
        payload: Vec<u8>,
    },
}

/// A reply a server sends.
#[derive(Debug, Clone, Arbitrary)]
pub enum ReplyMsg {
    /// A simple reply (the data of a READ is not on the wire).
    Simple {
        /// Error value.
        error: u32,
    },
    /// A structured or extended chunk, as the mode wants.
    Chunk {
        /// `NBD_REPLY_FLAG_DONE`
        done: bool,
        /// Other flag bits.
        flags: u16,
        /// The offset field of an extended header (default: the request's).
        offset: Option<u64>,
        /// The body.
        body: ChunkBody,
        /// The length field.
        len: LenFix,
    },
}

impl ReplyMsg {
    fn bytes(&self, cookie: u64, req: Option<&Request>, neg: &Negotiated) -> Vec<u8> {
        let (req_offset, req_length) = req.map_or((0, 0), |r| (r.offset, r.length));
        let block = (neg.constraints().minimum as u64).max(512);
        let mut v = Vec::new();
        match self {
            ReplyMsg::Simple { error } => {
                v.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
                v.extend_from_slice(&error.to_be_bytes());
                v.extend_from_slice(&cookie.to_be_bytes());
            }
            ReplyMsg::Chunk {
                done,
                flags,
                offset,
                body,
                len,
            } => {
                let mut p = Vec::new();
                // The length the payload claims (data is not on the wire).
                let mut claimed = None;
                let chunk = match body {
                    ChunkBody::None => ReplyChunkType::NONE,
                    ChunkBody::Data { at, len } => {
                        let len = len.get(req_length, block);
                        p.extend_from_slice(&req_offset.wrapping_add(at.get(req_length, block)).to_be_bytes());
                        claimed = Some(len.saturating_add(8));
                        ReplyChunkType::OFFSET_DATA
                    }
                    ChunkBody::Hole { at, len } => {
                        p.extend_from_slice(&req_offset.wrapping_add(at.get(req_length, block)).to_be_bytes());
                        p.extend_from_slice(&(len.get(req_length, block) as u32).to_be_bytes());
                        ReplyChunkType::OFFSET_HOLE
                    }
                    ChunkBody::Error {
                        code,
                        message,
                        message_len,
                        offset,
                    } => {
                        let m = message.get();
                        p.extend_from_slice(&code.to_be_bytes());
                        p.extend_from_slice(&(message_len.apply(m.len() as u64) as u16).to_be_bytes());
                        p.extend_from_slice(m.as_bytes());
                        match offset {
                            Some(o) => {
                                p.extend_from_slice(&req_offset.wrapping_add(o.get(req_length, block)).to_be_bytes());
                                ReplyChunkType::ERROR_OFFSET
                            }
                            None => ReplyChunkType::ERROR,
                        }
                    }
                    ChunkBody::Status { ctx, extents } => {
                        p.extend_from_slice(&ctx.get(&neg.contexts).to_be_bytes());
                        for (l, s) in extents.iter().take(64) {
                            p.extend_from_slice(&l.to_be_bytes());
                            p.extend_from_slice(&s.to_be_bytes());
                        }
                        ReplyChunkType::BLOCK_STATUS
                    }
                    ChunkBody::StatusExt { ctx, count, extents } => {
                        let extents = &extents[..extents.len().min(64)];
                        p.extend_from_slice(&ctx.get(&neg.contexts).to_be_bytes());
                        p.extend_from_slice(&(count.apply(extents.len() as u64) as u32).to_be_bytes());
                        for (l, s) in extents {
                            p.extend_from_slice(&l.to_be_bytes());
                            p.extend_from_slice(&s.to_be_bytes());
                        }
                        ReplyChunkType::BLOCK_STATUS_EXT
                    }
                    ChunkBody::Other { chunk, payload } => {
                        p.extend_from_slice(payload);
                        ReplyChunkType(*chunk)
                    }
                };
                let length = len.apply(claimed.unwrap_or(p.len() as u64));
                let flags = (flags & !1) | *done as u16;
                if neg.mode.extended() {
                    v.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
                    v.extend_from_slice(&flags.to_be_bytes());
                    v.extend_from_slice(&chunk.0.to_be_bytes());
                    v.extend_from_slice(&cookie.to_be_bytes());
                    v.extend_from_slice(&offset.unwrap_or(req_offset).to_be_bytes());
                    v.extend_from_slice(&length.to_be_bytes());
                } else {
                    v.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
                    v.extend_from_slice(&flags.to_be_bytes());
                    v.extend_from_slice(&chunk.0.to_be_bytes());
                    v.extend_from_slice(&cookie.to_be_bytes());
                    v.extend_from_slice(&(length as u32).to_be_bytes());
                }
                v.extend_from_slice(&p);
            }
        }
        v
    }
}

/// A step of a client transmission scenario.
#[derive(Debug, Clone, Arbitrary)]
pub enum ClientTxAction {
    /// Issue a request.
    Request(ReqSpec),
    /// The server replies.
    Reply {
        /// For which request.
        cookie: CookieSel,
        /// The reply.
        reply: ReplyMsg,
    },
    /// Cancel an unsent request.
    Cancel(u8),
    /// Release held slots.
    Release,
    /// The server sends anything.
    Raw(Vec<u8>),
}

/// A request a client sends to the server.
#[derive(Debug, Clone, Arbitrary)]
pub enum ServerTxAction {
    /// A request header (a WRITE's data is not on the wire).
    Request {
        /// Command (see [`command`]).
        cmd: u8,
        /// Command flags.
        flags: u16,
        /// Cookie.
        cookie: u64,
        /// Offset.
        offset: Num,
        /// Length.
        length: Num,
        /// Keep the magic (else corrupt it).
        magic: bool,
    },
    /// A BLOCK_STATUS with a payload (`NBD_CMD_FLAG_PAYLOAD_LEN`).
    StatusPayload {
        /// Cookie.
        cookie: u64,
        /// Offset.
        offset: Num,
        /// Effect length.
        effect: Num,
        /// Context ids.
        ids: Vec<CtxSel>,
        /// The length field.
        len: LenFix,
    },
    /// The driver shuts down.
    Shutdown,
    /// The client sends anything.
    Raw(Vec<u8>),
}

impl ServerTxAction {
    fn bytes(&self, neg: &ServerNegotiated) -> Vec<u8> {
        let block = (neg.constraints().minimum as u64).max(512);
        let size = neg.size;
        let header = |flags: u16, cmd: Command, cookie: u64, offset: u64, length: u64, magic: bool| {
            let mut v = Vec::new();
            let ext = neg.mode.extended();
            let m = if ext { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC };
            v.extend_from_slice(&(if magic { m } else { m ^ 0x100 }).to_be_bytes());
            v.extend_from_slice(&flags.to_be_bytes());
            v.extend_from_slice(&cmd.0.to_be_bytes());
            v.extend_from_slice(&cookie.to_be_bytes());
            v.extend_from_slice(&offset.to_be_bytes());
            if ext {
                v.extend_from_slice(&length.to_be_bytes());
            } else {
                v.extend_from_slice(&(length as u32).to_be_bytes());
            }
            v
        };
        match self {
            ServerTxAction::Request {
                cmd,
                flags,
                cookie,
                offset,
                length,
                magic,
            } => header(
                *flags,
                command(*cmd),
                *cookie,
                offset.get(size, block),
                length.get(size, block),
                *magic,
            ),
            ServerTxAction::StatusPayload {
                cookie,
                offset,
                effect,
                ids,
                len,
            } => {
                let ids = &ids[..ids.len().min(70)];
                let mut p = effect.get(size, block).to_be_bytes().to_vec();
                for id in ids {
                    p.extend_from_slice(&id.get(&neg.contexts).to_be_bytes());
                }
                let flags = CommandFlags::PAYLOAD_LEN.bits();
                let mut v = header(
                    flags,
                    Command::BLOCK_STATUS,
                    *cookie,
                    offset.get(size, block),
                    len.apply(p.len() as u64),
                    true,
                );
                v.extend_from_slice(&p);
                v
            }
            ServerTxAction::Shutdown => Vec::new(),
            ServerTxAction::Raw(r) => r.clone(),
        }
    }
}

/// A scenario of the `structured` target.
#[derive(Debug, Clone, Arbitrary)]
pub enum Scenario {
    /// A client handshake against these server messages, then transmission.
    ClientHandshake {
        /// The client's configuration.
        spec: ClientSpec,
        /// Options to issue in option mode, in turn.
        options: Vec<UserOpt>,
        /// What the server sends.
        script: Vec<ServerMsg>,
        /// Transmission after a successful handshake.
        after: Vec<ClientTxAction>,
        /// Transmission set-up.
        tx: TxSpec,
    },
    /// A server handshake against these client messages, then transmission.
    ServerHandshake {
        /// The server's configuration.
        spec: ServerSpec,
        /// Answers to lookups, in turn.
        answers: Vec<Option<ExportSpec>>,
        /// Answers to `NBD_OPT_LIST`, in turn.
        lists: Vec<Vec<ListEntry>>,
        /// What the client sends.
        script: Vec<ClientMsg>,
        /// Transmission after a successful handshake.
        after: Vec<ServerTxAction>,
        /// Encoder arguments.
        enc: Vec<EncSpec>,
    },
    /// Client transmission.
    ClientTransmission {
        /// What was negotiated.
        neg: NegSpec,
        /// Set-up.
        tx: TxSpec,
        /// Requests and replies.
        script: Vec<ClientTxAction>,
    },
    /// Server transmission.
    ServerTransmission {
        /// What was negotiated.
        neg: ServerNegSpec,
        /// Encoder arguments.
        enc: Vec<EncSpec>,
        /// Requests.
        script: Vec<ServerTxAction>,
    },
}

/// The `structured` target: a [`Scenario`] built with `arbitrary`.
pub fn structured(data: &[u8]) {
    let Ok(s) = Scenario::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    run_scenario(&s);
}

fn run_client_tx(c: &mut ClientTx, script: &[ClientTxAction]) {
    for a in script {
        if c.dead {
            return;
        }
        match a {
            ClientTxAction::Request(r) => {
                let minimum = c.neg.constraints().minimum;
                c.request(r.request(c.neg.size, minimum));
            }
            ClientTxAction::Reply { cookie, reply } => {
                let cookie = match cookie {
                    CookieSel::Live(n) => {
                        let live = c.cookies();
                        if live.is_empty() {
                            1 << 32
                        } else {
                            live[*n as usize % live.len()]
                        }
                    }
                    CookieSel::Raw(v) => *v,
                };
                let bytes = reply.bytes(cookie, c.live.get(&cookie).map(|l| &l.req), &c.neg);
                c.feed(&bytes);
            }
            ClientTxAction::Cancel(n) => c.cancel(*n),
            ClientTxAction::Release => c.release(),
            ClientTxAction::Raw(r) => c.feed(r),
        }
        c.pump();
    }
}

fn run_server_tx(s: &mut ServerTx, script: &[ServerTxAction]) {
    for a in script {
        if s.st.is_closed() {
            return;
        }
        if let ServerTxAction::Shutdown = a {
            s.shutdown();
        }
        let bytes = a.bytes(&s.neg);
        s.feed(&bytes);
        s.pump();
    }
}

fn run_scenario(s: &Scenario) {
    match s {
        Scenario::ClientHandshake {
            spec,
            options,
            script,
            after,
            tx,
        } => {
            let mut c = ClientHs::new(spec);
            let mut options = options.iter();
            let mut status = c.pump();
            let mut script = script.iter();
            loop {
                match status {
                    ClientHsStatus::NeedBytes(_) => {
                        let Some(m) = script.next() else {
                            return;
                        };
                        c.feed(&m.bytes(c.last_option));
                    }
                    ClientHsStatus::Negotiating => {
                        let Some(o) = options.next() else {
                            return;
                        };
                        c.issue(o);
                    }
                    ClientHsStatus::Done(n) => {
                        let mut t = ClientTx::new(&n, *tx);
                        t.feed(c.wire.rest());
                        t.pump();
                        return run_client_tx(&mut t, after);
                    }
                    ClientHsStatus::Over => return,
                }
                status = c.pump();
            }
        }
        Scenario::ServerHandshake {
            spec,
            answers,
            lists,
            script,
            after,
            enc,
        } => {
            let mut s = ServerHs::new(spec);
            let mut script = script.iter();
            let (mut lookups, mut listed) = (0, 0);
            loop {
                match s.pump() {
                    ServerHsStatus::NeedBytes(_) => {
                        let Some(m) = script.next() else {
                            return;
                        };
                        s.feed(&m.bytes());
                    }
                    ServerHsStatus::Lookup(name) => {
                        let answer = match answers.get(lookups % answers.len().max(1)) {
                            Some(a) => a.clone(),
                            None => Some(default_export()),
                        };
                        lookups += 1;
                        s.answer_export(&name, answer.as_ref());
                    }
                    ServerHsStatus::List => {
                        let list = lists.get(listed % lists.len().max(1)).cloned().unwrap_or_default();
                        listed += 1;
                        s.answer_list(&list);
                    }
                    ServerHsStatus::Done(n) => {
                        let mut t = ServerTx::new(&n, enc.clone());
                        t.feed(s.wire.rest());
                        t.pump();
                        return run_server_tx(&mut t, after);
                    }
                    ServerHsStatus::Over => return,
                }
            }
        }
        Scenario::ClientTransmission { neg, tx, script } => {
            let mut c = ClientTx::new(&neg.negotiated(), *tx);
            run_client_tx(&mut c, script);
        }
        Scenario::ServerTransmission { neg, enc, script } => {
            let mut s = ServerTx::new(&neg.negotiated(), enc.clone());
            run_server_tx(&mut s, script);
        }
    }
}
