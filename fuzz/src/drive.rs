//! Drives nbd-proto's sessions ([`ClientSession`], [`ServerSession`]) from
//! fuzz input exactly as a user's driver does, checking invariants as it
//! goes. Shared by the fuzz targets (`fuzz/fuzz_targets/`) and by
//! the workspace's `tests/tests/fuzz_corpus.rs` (in the `nbd-tests` crate),
//! which includes this file as a module by path and replays
//! `fuzz/seeds/*/` under `cargo test`; so nothing here may depend on
//! libFuzzer.
//!
//! - `client_session`: a client configuration, then a script of driver
//!   actions interleaved with the bytes the server sends (see
//!   [`client_session`] for the layout): feeds of any size, exact counts,
//!   READ data moved by the driver, option-mode calls, requests, misuse
//!   probes, the loss of the connection.
//! - `server_session`: the same for a server, its configuration and its
//!   exports ([`ExportLookup`]) first, then the client's bytes.
//! - `conversation`: an `arbitrary` [`Scenario`]: a client session talks to
//!   a server session (both configured by the fuzzer) over an in-memory
//!   connection, with requests, option-mode calls, cuts, reconnections and
//!   injected storage errors; reads must return what a model of the disk
//!   says.
//! - `uri`: NBD URIs parse, format and parse back to the same value.

use std::collections::{BTreeMap, HashMap, HashSet};

use arbitrary::{Arbitrary, Unstructured};
use nbd_proto::client::{
    ClientConfig, ClientEvent, ClientNeed, ClientSession, ClientSessionError, Cookie, Negotiated, OptionOutcome,
    Request, RequestError, ServerError, TlsMode, Transmit,
};
use nbd_proto::common::Mode;
use nbd_proto::server::{
    ContextSelection, ExportDetails, ExportListing, ExportLookup, ReplyEncoder, ServerConfig, ServerEvent, ServerNeed,
    ServerNegotiated, ServerRequest, ServerSession, ServerSessionError, TlsPolicy,
};
use nbd_proto::uri::NbdUri;
use nbd_proto::wire::*;
use zerocopy::FromBytes;

/// The fuzz targets, by name (the directories of `fuzz/seeds/`).
pub const TARGETS: &[&str] = &["client_session", "server_session", "conversation", "uri"];

/// Runs the target called `name` on `data`; false for an unknown name.
pub fn run(name: &str, data: &[u8]) -> bool {
    match name {
        "client_session" => {
            client_session(data);
        }
        "server_session" => {
            server_session(data);
        }
        "conversation" => {
            conversation(data);
        }
        "uri" => uri(data),
        _ => return false,
    }
    true
}

/// Calls a loop may make without running out of input: more means a
/// session is going round in circles (a hang).
const MAX_STEPS: usize = 1 << 16;

// ---------------------------------------------------------------------------
// Input
// ---------------------------------------------------------------------------

/// The fuzz input, read front to back.
#[derive(Debug)]
pub struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    /// Reads `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data, pos: 0 }
    }

    fn left(&self) -> usize {
        self.data.len() - self.pos
    }

    /// Up to `n` bytes.
    fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.left());
        let b = &self.data[self.pos..self.pos + n];
        self.pos += n;
        b
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).first().copied()
    }

    fn be<const N: usize>(&mut self) -> Option<[u8; N]> {
        let b = self.take(N);
        b.try_into().ok()
    }

    fn u16(&mut self) -> Option<u16> {
        self.be().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.be().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.be().map(u64::from_be_bytes)
    }

    /// A length byte, then an `arbitrary` value decoded from so many bytes.
    fn arbitrary<T: for<'b> Arbitrary<'b>>(&mut self) -> Option<T> {
        let n = self.u8()?;
        T::arbitrary_take_rest(Unstructured::new(self.take(n as usize))).ok()
    }
}

// ---------------------------------------------------------------------------
// Choices shared by the targets
// ---------------------------------------------------------------------------

/// A string the fuzzer picks by number: export names, descriptions.
pub fn name(sel: u8) -> String {
    match sel % 8 {
        0 => String::new(),
        1 => "disk".into(),
        2 => "ro".into(),
        3 => "other".into(),
        4 => "d\u{e9}j\u{e0} vu \u{1f4be}".into(),
        5 => "x".repeat(MAX_STRING_LEN + 1),
        6 => "y".repeat(MAX_STRING_LEN),
        _ => "a\0b".into(),
    }
}

/// Metadata context queries and names, picked by the bits of a mask.
pub const QUERIES: [&str; 8] = [
    CONTEXT_BASE_ALLOCATION,
    "base:",
    CONTEXT_QEMU_ALLOCATION_DEPTH,
    CONTEXT_QEMU_DIRTY_BITMAP_PREFIX,
    "qemu:dirty-bitmap:b0",
    "x-vendor:wide",
    "nonamespace",
    "a:\0",
];

fn queries(mask: u8) -> Vec<&'static str> {
    QUERIES
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, q)| *q)
        .collect()
}

/// Valid block-size constraints (or none), picked by number.
pub fn block_size(sel: u8) -> Option<BlockSizeConstraints> {
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

// ---------------------------------------------------------------------------
// Client configuration and option-mode calls
// ---------------------------------------------------------------------------

/// Four bytes: the client's configuration. Byte 0: bits 0-1 TLS (off,
/// allow, require, require), 2 option mode, 3 structured replies, 4
/// extended headers, 5 ask for block sizes, 6 strict, 7 manual release.
/// Byte 1: the export name ([`name`]). Byte 2: requests in flight (1 to 8).
/// Byte 3: the metadata contexts asked for ([`QUERIES`] by bit).
pub fn client_config(b: [u8; 4]) -> (ClientConfig, bool) {
    let config = ClientConfig::default()
        .export_name(name(b[1]))
        .tls(match b[0] & 3 {
            0 => TlsMode::Off,
            1 => TlsMode::Allow,
            _ => TlsMode::Require,
        })
        .opt_mode(b[0] & 4 != 0)
        .structured_replies(b[0] & 8 != 0)
        .extended_headers(b[0] & 16 != 0)
        .request_block_size(b[0] & 32 != 0)
        .strict(b[0] & 64 != 0)
        .meta_contexts(queries(b[3]).into_iter().map(String::from).collect())
        .max_in_flight(b[2] as usize % 8 + 1);
    (config, b[0] & 128 != 0)
}

/// An option-mode call, from three bytes: which, a name ([`name`]), the
/// queries of the meta-context options ([`QUERIES`] by bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptCall {
    /// `opt_list`
    List,
    /// `opt_info`
    Info(u8),
    /// `opt_go` with the configured export
    Go,
    /// `opt_go` with this one
    GoNamed(u8),
    /// `opt_list_meta_context`
    ListMeta(u8, u8),
    /// `opt_set_meta_context`
    SetMeta(u8, u8),
    /// `opt_structured_reply`
    Structured,
    /// `opt_extended_headers`
    Extended,
    /// `opt_abort`
    Abort,
}

impl OptCall {
    /// The call three bytes stand for.
    pub fn decode(which: u8, n: u8, q: u8) -> OptCall {
        match which % 9 {
            0 => OptCall::List,
            1 => OptCall::Info(n),
            2 => OptCall::Go,
            3 => OptCall::GoNamed(n),
            4 => OptCall::ListMeta(n, q),
            5 => OptCall::SetMeta(n, q),
            6 => OptCall::Structured,
            7 => OptCall::Extended,
            _ => OptCall::Abort,
        }
    }

    /// Makes the call on `s`.
    pub fn call(self, s: &mut ClientSession) -> Result<(), ClientSessionError> {
        match self {
            OptCall::List => s.opt_list(),
            OptCall::Info(n) => s.opt_info(&name(n)),
            OptCall::Go => s.opt_go(None),
            OptCall::GoNamed(n) => s.opt_go(Some(&name(n))),
            OptCall::ListMeta(n, q) => s.opt_list_meta_context(&name(n), &queries(q)),
            OptCall::SetMeta(n, q) => s.opt_set_meta_context(&name(n), &queries(q)),
            OptCall::Structured => s.opt_structured_reply(),
            OptCall::Extended => s.opt_extended_headers(),
            OptCall::Abort => s.opt_abort(),
        }
    }
}

// ---------------------------------------------------------------------------
// Server configuration and exports
// ---------------------------------------------------------------------------

/// Three bytes: the server's configuration. Byte 0: bit 0 oldstyle, bits
/// 1-2 TLS (none, forced, selective, selective), 3 allow `NBD_OPT_LIST`, 4
/// no zeroes, 5 `NBD_OPT_GO`, 6 structured replies, 7 extended headers.
/// Byte 1: most options (below 16, else the default). Byte 2: bit 0 a
/// small payload limit for clients that negotiated no block sizes.
pub fn server_config(b: [u8; 3]) -> ServerConfig {
    ServerConfig::default()
        .oldstyle(b[0] & 1 != 0)
        .tls(match (b[0] >> 1) & 3 {
            0 => TlsPolicy::NoTls,
            1 => TlsPolicy::ForcedTls,
            _ => TlsPolicy::SelectiveTls,
        })
        .allow_list(b[0] & 8 != 0)
        .no_zeroes(b[0] & 16 != 0)
        .support_go(b[0] & 32 != 0)
        .structured_replies(b[0] & 64 != 0)
        .extended_headers(b[0] & 128 != 0)
        .max_options(if b[1] < 16 {
            b[1] as u32
        } else {
            ServerConfig::default().max_options
        })
        .unnegotiated_max_payload(if b[2] & 1 != 0 {
            65536
        } else {
            ServerConfig::default().unnegotiated_max_payload
        })
}

/// An export, from seven bytes: name ([`name`]), description ([`name`], 7
/// for none), size (a table), flags (2 bytes), block sizes ([`block_size`],
/// 255 for invalid ones, which the session must refuse), then bits 0-4 the
/// contexts offered, 5 block sizes required, 6 TLS only, 7 the default.
#[derive(Debug, Clone)]
pub struct ExportSpec {
    /// The name clients use.
    pub name: String,
    /// The details the handshake gives.
    pub details: ExportDetails,
    /// The export a client gets when it names none.
    pub default: bool,
}

const EXPORT_CONTEXTS: [&str; 5] = [
    CONTEXT_BASE_ALLOCATION,
    CONTEXT_QEMU_ALLOCATION_DEPTH,
    "qemu:dirty-bitmap:b0",
    "x-vendor:wide",
    "nonamespace",
];

impl ExportSpec {
    /// The export seven bytes stand for.
    pub fn decode(b: [u8; 7]) -> ExportSpec {
        let name = name(b[0]);
        let size = match b[2] % 8 {
            0 => 0,
            1 => 1 << 20,
            2 => (1 << 20) + 1,
            3 => 512,
            4 => 1 << 40,
            5 => u64::MAX,
            6 => 255 * 4096,
            _ => i64::MAX as u64,
        };
        let mut details = ExportDetails::new(name.clone(), size);
        details.description = if b[1] % 8 == 7 { String::new() } else { self::name(b[1]) };
        details.flags = TransmissionFlags::from_bits_retain(u16::from_be_bytes([b[3], b[4]]));
        details.block_size = if b[5] == u8::MAX {
            Some(BlockSizeConstraints {
                minimum: 3,
                preferred: 4096,
                maximum: 4096,
            })
        } else {
            block_size(b[5])
        };
        details.meta_contexts = EXPORT_CONTEXTS
            .iter()
            .enumerate()
            .filter(|(i, _)| b[6] & (1 << i) != 0)
            .map(|(_, c)| (*c).to_owned())
            .collect();
        details.block_size_required = b[6] & 32 != 0;
        details.tls_only = b[6] & 64 != 0;
        ExportSpec {
            name,
            details,
            default: b[6] & 128 != 0,
        }
    }
}

/// The exports of the `server_session` target; an export is known by its
/// index.
#[derive(Debug, Clone, Default)]
pub struct Exports(pub Vec<ExportSpec>);

impl Exports {
    /// The export the session must choose for `name`.
    pub fn resolve(&self, name: &str) -> Option<usize> {
        self.0.iter().position(|e| e.name == name).or_else(|| {
            if name.is_empty() {
                self.0.iter().position(|e| e.default)
            } else {
                None
            }
        })
    }
}

impl ExportLookup for Exports {
    type Export = usize;
    fn lookup(&self, name: &str) -> Option<(ExportDetails, usize)> {
        let i = self.0.iter().position(|e| e.name == name)?;
        Some((self.0[i].details.clone(), i))
    }
    fn default_export(&self) -> Option<(ExportDetails, usize)> {
        let i = self.0.iter().position(|e| e.default)?;
        Some((self.0[i].details.clone(), i))
    }
    fn list(&self, each: &mut dyn FnMut(ExportListing<'_>)) {
        for e in &self.0 {
            each(ExportListing {
                name: &e.name,
                description: &e.details.description,
                tls_only: e.details.tls_only,
            });
        }
    }
}

// ---------------------------------------------------------------------------
// What a client sends
// ---------------------------------------------------------------------------

/// Checks the client session's output: the client flags and whole options
/// during the handshake; in transmission, exactly the request headers the
/// driver started, in order, with a WRITE's payload announced right after
/// its header.
#[derive(Debug, Default)]
struct ClientOut {
    transmission: bool,
    extended: bool,
    flags_seen: bool,
    /// Options sent, by type.
    options: Vec<OptionType>,
    /// Headers queued and not sent yet: (cookie, request); no cookie for DISC.
    expected: std::collections::VecDeque<(Option<u64>, Request)>,
}

impl ClientOut {
    fn check(&mut self, bytes: &[u8], t: Transmit) {
        assert!(!bytes.is_empty() || t.payload.is_some(), "poll_transmit gave nothing");
        if !self.transmission {
            assert!(t.payload.is_none(), "a payload in the handshake");
            let mut rest = bytes;
            if !self.flags_seen {
                self.flags_seen = true;
                let (flags, r) = rest.split_at(4.min(rest.len()));
                assert_eq!(flags.len(), 4, "client flags");
                let flags = u32::from_be_bytes([flags[0], flags[1], flags[2], flags[3]]);
                assert!(ClientFlags::all().contains(ClientFlags::from_bits_retain(flags)));
                rest = r;
            }
            while !rest.is_empty() {
                let (h, data) = OptionHeader::read_from_prefix(rest).expect("a whole option header");
                assert_eq!(h.magic.get(), IHAVEOPT);
                let len = h.length.get() as usize;
                assert!(len <= data.len(), "a partial option");
                assert!(len <= 8 + 5 * (4 + MAX_STRING_LEN), "option of {len} bytes");
                self.options.push(OptionType(h.option.get()));
                rest = &data[len..];
            }
            return;
        }
        let hlen = if self.extended {
            EXTENDED_REQUEST_HEADER_LEN
        } else {
            REQUEST_HEADER_LEN
        };
        assert_eq!(bytes.len() % hlen, 0, "whole request headers");
        let mut last = None;
        for h in bytes.chunks_exact(hlen) {
            let (magic, flags, cmd, cookie, offset, length) = if self.extended {
                let (h, _) = ExtendedRequestHeader::read_from_prefix(h).expect("header");
                let (m, f, c, k, o, l) = (h.magic, h.flags, h.command, h.cookie, h.offset, h.length);
                (m.get(), f.get(), c.get(), k.get(), o.get(), l.get())
            } else {
                let (h, _) = RequestHeader::read_from_prefix(h).expect("header");
                let (m, f, c, k, o, l) = (h.magic, h.flags, h.command, h.cookie, h.offset, h.length);
                (m.get(), f.get(), c.get(), k.get(), o.get(), l.get() as u64)
            };
            let want = if self.extended {
                EXTENDED_REQUEST_MAGIC
            } else {
                REQUEST_MAGIC
            };
            assert_eq!(magic, want);
            assert!(last.is_none(), "a header after a WRITE's, before its payload");
            let (c, r) = self.expected.pop_front().expect("a header nobody started");
            assert_eq!((cmd, offset, length), (r.command.0, r.offset, r.length));
            if let Some(c) = c {
                assert_eq!(cookie, c);
            }
            let mut f = r.flags;
            if self.extended && r.command == Command::WRITE {
                f |= CommandFlags::PAYLOAD_LEN;
            }
            assert_eq!(flags, f.bits());
            if r.command == Command::WRITE && r.length > 0 {
                last = Some((cookie, r.length));
            }
        }
        match (last, t.payload) {
            (Some((c, l)), Some(p)) => assert_eq!((c, l), (p.cookie.0, p.length), "payload of another WRITE"),
            (None, None) => {}
            (l, p) => panic!("WRITE header {l:?} and payload {p:?} disagree"),
        }
    }
}

// ---------------------------------------------------------------------------
// What a server sends during the handshake
// ---------------------------------------------------------------------------

/// Checks the server session's handshake output: the greeting, then option
/// replies (each well formed, one final reply ending each option's), then
/// possibly the `NBD_OPT_EXPORT_NAME` answer.
#[derive(Debug)]
struct ServerOut {
    config: ServerConfig,
    greeted: bool,
    /// The option of the last reply, and whether it was final.
    last: Option<(u32, bool)>,
    /// The handshake output is over.
    done: bool,
}

impl ServerOut {
    fn new(config: &ServerConfig) -> Self {
        ServerOut {
            config: config.clone(),
            greeted: false,
            last: None,
            done: false,
        }
    }

    /// Whether the server may wait for the client now.
    fn at_rest(&self) -> bool {
        self.last.is_none_or(|(_, fin)| fin)
    }

    fn check(&mut self, b: &[u8], negotiated: Option<&ServerNegotiated>) {
        assert!(!b.is_empty(), "poll_transmit gave nothing");
        assert!(!self.done, "handshake output after the handshake");
        let mut rest = b;
        if !self.greeted {
            self.greeted = true;
            assert_eq!(rest[..8], NBDMAGIC.to_be_bytes());
            if self.config.oldstyle {
                assert_eq!(rest.len(), 16 + 8 + 4 + ZERO_PAD_LEN, "oldstyle greeting");
                assert_eq!(rest[8..16], CLISERV_MAGIC.to_be_bytes());
                let flags = u16::from_be_bytes([rest[26], rest[27]]);
                assert!(TransmissionFlags::from_bits_retain(flags).contains(TransmissionFlags::HAS_FLAGS));
                self.done = true;
                return;
            }
            assert!(rest.len() >= 18, "newstyle greeting");
            assert_eq!(rest[8..16], IHAVEOPT.to_be_bytes());
            let flags = HandshakeFlags::from_bits_retain(u16::from_be_bytes([rest[16], rest[17]]));
            assert!(flags.contains(HandshakeFlags::FIXED_NEWSTYLE));
            assert_eq!(flags.contains(HandshakeFlags::NO_ZEROES), self.config.no_zeroes);
            rest = &rest[18..];
        }
        while !rest.is_empty() {
            if let Some(n) = negotiated
                && (rest.len() == 10 || rest.len() == 10 + ZERO_PAD_LEN)
            {
                // The NBD_OPT_EXPORT_NAME answer ends the handshake.
                if rest[..8] == n.size.to_be_bytes() && rest[8..10] == n.flags.bits().to_be_bytes() {
                    assert!(rest[10..].iter().all(|&z| z == 0));
                    assert!(self.at_rest(), "export-name answer within an option's replies");
                    self.done = true;
                    return;
                }
            }
            let (h, r) = OptionReplyHeader::read_from_prefix(rest).expect("an option reply header");
            assert_eq!(h.magic.get(), OPTION_REPLY_MAGIC);
            let option = h.option.get();
            if let Some((o, false)) = self.last {
                assert_eq!(o, option, "replies of two options interleaved");
            }
            let len = h.length.get() as usize;
            assert!(len <= r.len(), "reply length beyond what is sent");
            let (payload, r) = r.split_at(len);
            let reply = ReplyType(h.reply_type.get());
            let fin = match reply {
                ReplyType::ACK => {
                    assert!(payload.is_empty());
                    true
                }
                ReplyType::SERVER => {
                    let n = u32::from_be_bytes(payload[..4].try_into().expect("4 bytes")) as usize;
                    assert!(4 + n <= payload.len() && n <= MAX_STRING_LEN);
                    assert!(payload.len() - 4 - n <= MAX_STRING_LEN);
                    false
                }
                ReplyType::INFO => {
                    assert!(payload.len() >= 2 && payload.len() <= 2 + MAX_STRING_LEN);
                    false
                }
                ReplyType::META_CONTEXT => {
                    assert!(payload.len() > 4 && payload.len() <= 4 + MAX_STRING_LEN);
                    let name = std::str::from_utf8(&payload[4..]).expect("context name is UTF-8");
                    assert!(name.contains(':'));
                    false
                }
                e if e.is_error() => {
                    assert!(e.name().is_some(), "unknown error reply {e}");
                    assert!(payload.len() <= MAX_STRING_LEN);
                    if e == ReplyType::ERR_TLS_REQD {
                        assert_ne!(self.config.tls, TlsPolicy::NoTls, "NBD_REP_ERR_TLS_REQD without TLS");
                    }
                    true
                }
                other => panic!("unknown reply type {other}"),
            };
            self.last = Some((option, fin));
            rest = r;
        }
        if negotiated.is_some() {
            assert!(self.at_rest(), "transmission within an option's replies");
            self.done = true;
        }
    }
}

// ---------------------------------------------------------------------------
// Checks of what the sessions report
// ---------------------------------------------------------------------------

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
    if config.tls == TlsMode::Off {
        assert!(!n.tls, "TLS without being asked");
    }
    if n.mode == Mode::Oldstyle {
        assert!(!n.tls && n.contexts.is_empty() && n.export_name.is_empty());
    }
    if !n.mode.structured() {
        assert!(n.contexts.is_empty(), "contexts without structured replies");
    }
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

/// Every request a server session lets through obeys the spec's rules.
fn check_request<E: ExportLookup>(s: &ServerSession<E>, r: &ServerRequest) {
    let n = s.negotiated().expect("requests in transmission only");
    let f = n.flags;
    let c = s.constraints();
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
    assert!(r.length.is_multiple_of(min) || end == n.size, "unaligned length");
    if r.command == Command::WRITE {
        assert!(r.length <= s.max_payload(), "write beyond the maximum payload");
    }
    if r.command == Command::READ {
        assert!(r.length <= s.max_payload() || n.mode.structured());
        assert!(ext || r.length <= u32::MAX as u64 - 8);
    }
}

// ---------------------------------------------------------------------------
// The reply encoder
// ---------------------------------------------------------------------------

/// An offset or a length relative to a request.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum Num {
    /// 0
    Zero,
    /// A small value.
    Small(u16),
    /// Whole blocks of max(minimum block size, 512).
    Blocks(u8),
    /// So many bytes before the end.
    FromEnd(u16),
    /// Anything.
    Raw(u64),
}

impl Num {
    /// The value this stands for, relative to `size` with blocks of `block`.
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

/// Arguments of the [`ReplyEncoder`] calls a server driver makes for each
/// request (the `server_session` target calls them all).
#[derive(Debug, Clone, Arbitrary)]
pub struct EncSpec {
    error: u32,
    message: u8,
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

fn message(sel: u8) -> String {
    match sel % 4 {
        0 => String::new(),
        1 => "no such luck".into(),
        2 => "\u{20ac}".repeat(1400),
        _ => "before\0after".into(),
    }
}

/// Calls every encoder function for `decoded` (and for a fuzzed request)
/// and checks what they produce.
fn encode_all(enc: ReplyEncoder, size: u64, minimum: u32, decoded: &ServerRequest, e: &EncSpec) {
    encode_for(enc, size, minimum, decoded, e);
    if let Some(raw) = e.raw {
        let r = ServerRequest {
            cookie: raw.cookie,
            command: command(raw.cmd),
            flags: CommandFlags::from_bits_retain(raw.flags),
            offset: raw.offset,
            length: raw.length,
            contexts: raw.mask.map_or(ContextSelection::All, ContextSelection::Only),
        };
        encode_for(enc, size, minimum, &r, e);
    }
}

fn encode_for(enc: ReplyEncoder, size: u64, minimum: u32, r: &ServerRequest, e: &EncSpec) {
    let mode = enc.mode();
    let ext = mode.extended();
    let block = (minimum as u64).max(512);
    let message = message(e.message);
    let code = ErrorCode(e.error);
    let mut out = Vec::new();

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

    enc.reply_error(r, code, &message, &mut out);
    if mode.structured() {
        let c = parse_chunk(&out, ext, false);
        assert_eq!(c.chunk, ReplyChunkType::ERROR);
        check_error_payload(c.payload, false);
    } else {
        let (s, rest) = SimpleReplyHeader::read_from_prefix(&out).expect("simple reply");
        assert!(rest.is_empty() && s.error.get() != 0);
    }

    let offset = r.offset.wrapping_add(e.offset.get(r.length, block));
    let length = e.length.get(r.length, block);

    out.clear();
    match enc.reply_error_offset(r, code, &message, offset, e.done, &mut out) {
        Ok(()) => {
            assert!(mode.structured());
            assert!(offset >= r.offset && offset < r.offset.saturating_add(r.length.max(1)));
            let c = parse_chunk(&out, ext, false);
            assert_eq!(c.chunk, ReplyChunkType::ERROR_OFFSET);
            check_error_payload(c.payload, true);
        }
        Err(_) => assert!(out.is_empty()),
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
    out.clear();
    out.extend_from_slice(b"xyz");
    let extents: Vec<(u64, u64)> = e
        .extents
        .iter()
        .take(16)
        .map(|(n, s)| (n.get(r.length, block), *s))
        .collect();
    match enc.block_status_chunk(r, e.context, extents.iter().copied(), e.done, &mut out) {
        Ok(sum) => {
            assert!(mode.structured() && r.command == Command::BLOCK_STATUS);
            let c = parse_chunk(&out[3..], ext, false);
            assert_eq!(c.flags & 1 != 0, e.done);
            check_status(r, ext, size, e.context, c, sum);
        }
        Err(_) => assert_eq!(out, b"xyz", "a refused chunk leaves out as it was"),
    }
}

fn check_status(r: &ServerRequest, ext: bool, size: u64, context: u32, c: Chunk<'_>, sum: u64) {
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
    assert!(sum <= size.saturating_sub(r.offset), "extents past the end");
    if r.flags.contains(CommandFlags::REQ_ONE) {
        assert!(lengths.len() == 1 && sum <= r.length, "REQ_ONE");
    }
    if lengths.len() > 1 {
        let last = lengths[lengths.len() - 1];
        assert!(sum - last < r.length, "extents continue after the request is covered");
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
/// the header in `b` (if any) may be shorter than the length field says.
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

// ---------------------------------------------------------------------------
// Where a driver reads from
// ---------------------------------------------------------------------------

/// The bytes the peer sent that the driver has not read yet.
pub trait Source {
    /// Reads up to `n` bytes.
    fn read(&mut self, n: usize) -> &[u8];
}

impl Source for Input<'_> {
    fn read(&mut self, n: usize) -> &[u8] {
        self.take(n)
    }
}

/// One direction of the in-memory connection of the `conversation` target.
#[derive(Debug, Default)]
pub struct Pipe {
    buf: Vec<u8>,
    pos: usize,
}

impl Pipe {
    fn push(&mut self, b: &[u8]) {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        self.buf.extend_from_slice(b);
    }

    fn len(&self) -> usize {
        self.buf.len() - self.pos
    }
}

impl Source for Pipe {
    fn read(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.len());
        let b = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        b
    }
}

/// Bytes a driver read and its session has not consumed yet, with the
/// STARTTLS check: before the driver's own TLS upgrade, the session must
/// not consume bytes the peer sent after its upgrade.
#[derive(Debug, Default)]
struct Inbox {
    buf: Vec<u8>,
    pos: usize,
    /// Bytes consumed by the session so far (including READ data and WRITE
    /// payloads the driver moved itself).
    total: u64,
    /// Where in the stream the peer's TLS bytes start, while this side has
    /// not started TLS: the session must not consume past it.
    limit: Option<u64>,
}

impl Inbox {
    fn rest(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    fn len(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn push(&mut self, b: &[u8]) {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        self.buf.extend_from_slice(b);
    }

    /// The session consumed `n` bytes of the inbox.
    fn consumed(&mut self, n: usize) {
        assert!(n <= self.len(), "consumed more than given");
        self.pos += n;
        self.moved(n as u64);
    }

    /// The session took `n` bytes (from the inbox, or moved by the driver
    /// straight from the socket).
    fn moved(&mut self, n: u64) {
        self.total += n;
        if let Some(l) = self.limit {
            assert!(
                self.total <= l,
                "consumed bytes sent after STARTTLS before the TLS upgrade"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// The client's driver
// ---------------------------------------------------------------------------

/// What [`ClientNeed`] says, without the borrow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CNeed {
    Bytes(usize),
    Data(u64, u64, u64),
    Pending,
    StartTls,
    Negotiating,
    Idle,
    Closed,
}

/// A client event copied out of the session's borrow.
#[derive(Debug)]
enum Cli {
    Connected,
    OptionDone(OptionOutcome),
    Aborted,
    Data(Cookie, u64, u64, Option<Vec<u8>>),
    Hole(Cookie, u64, u64),
    Status(Cookie, u32, Vec<(u64, u64)>),
    Done(Cookie, Command, Result<(), ServerError>),
}

/// Copies an event; READ data must be the last bytes consumed.
fn own_client(ev: ClientEvent<'_>, consumed: &[u8], keep: bool) -> Cli {
    match ev {
        ClientEvent::Connected => Cli::Connected,
        ClientEvent::OptionDone(o) => Cli::OptionDone(o),
        ClientEvent::Aborted => Cli::Aborted,
        ClientEvent::Data {
            cookie,
            buf_offset,
            data,
            ..
        } => {
            assert!(!data.is_empty(), "empty READ data");
            assert!(
                consumed.ends_with(data),
                "READ data are not the bytes the session consumed"
            );
            Cli::Data(cookie, buf_offset, data.len() as u64, keep.then(|| data.to_vec()))
        }
        ClientEvent::Hole {
            cookie,
            buf_offset,
            length,
            ..
        } => Cli::Hole(cookie, buf_offset, length),
        ClientEvent::BlockStatus {
            cookie,
            context_id,
            extents,
        } => Cli::Status(cookie, context_id, extents.map(|e| (e.length, e.flags)).collect()),
        ClientEvent::Done {
            cookie,
            command,
            result,
        } => Cli::Done(cookie, command, result),
        other => panic!("unknown client event {other:?}"),
    }
}

/// A request in flight, as the driver tracks it.
#[derive(Debug)]
struct Live {
    req: Request,
    /// Bytes of data and holes received.
    covered: u64,
    /// Content chunks received.
    chunks: u32,
    /// Block-status chunks received.
    statuses: u32,
    /// READ destination (`conversation` only).
    buf: Option<Vec<u8>>,
}

/// A request that completed, for the `conversation` target's model.
#[derive(Debug)]
pub struct Completion {
    /// Its cookie.
    pub cookie: u64,
    /// The request.
    pub req: Request,
    /// The outcome.
    pub result: Result<(), ErrorCode>,
    /// What a READ read.
    pub data: Option<Vec<u8>>,
}

/// Drives a [`ClientSession`] as a user's driver does and checks what it
/// does.
#[derive(Debug)]
pub struct ClientDriver {
    s: ClientSession,
    config: ClientConfig,
    manual_release: bool,
    /// Copy READ data and send WRITE payloads (`conversation`).
    keep: bool,
    inbox: Inbox,
    check: ClientOut,
    /// Bytes for the server (kept with `keep` only).
    out: Vec<u8>,
    /// Where in `out` the bytes sent over TLS start.
    tls_mark: Option<usize>,
    live: BTreeMap<u64, Live>,
    writes: HashMap<u64, Vec<u8>>,
    held: Vec<Cookie>,
    /// READ data being received: (cookie, next buffer offset).
    span: Option<(u64, u64)>,
    opt_pending: Option<OptCall>,
    connected: bool,
    disconnecting: bool,
    over: bool,
    tls: bool,
    error: Option<ClientSessionError>,
    outcomes: Vec<OptionOutcome>,
    completions: Vec<Completion>,
    /// Requests failed by the loss of the connection, by cookie.
    lost: Vec<(u64, Live)>,
}

impl ClientDriver {
    /// A driver of a session with `config`.
    pub fn new(config: ClientConfig, manual_release: bool, keep: bool) -> Self {
        let mut s = ClientSession::new(config.clone());
        s.set_manual_release(manual_release);
        assert!(matches!(s.need(), ClientNeed::Bytes(16)), "the greeting comes first");
        ClientDriver {
            s,
            config,
            manual_release,
            keep,
            inbox: Inbox::default(),
            check: ClientOut::default(),
            out: Vec::new(),
            tls_mark: None,
            live: BTreeMap::new(),
            writes: HashMap::new(),
            held: Vec::new(),
            span: None,
            opt_pending: None,
            connected: false,
            disconnecting: false,
            over: false,
            tls: false,
            error: None,
            outcomes: Vec::new(),
            completions: Vec::new(),
            lost: Vec::new(),
        }
    }

    fn need(&mut self) -> CNeed {
        match self.s.need() {
            ClientNeed::Bytes(n) => CNeed::Bytes(n),
            ClientNeed::Data {
                cookie,
                buf_offset,
                length,
                ..
            } => CNeed::Data(cookie.0, buf_offset, length),
            ClientNeed::Pending => CNeed::Pending,
            ClientNeed::StartTls(_) => CNeed::StartTls,
            ClientNeed::Negotiating => CNeed::Negotiating,
            ClientNeed::Idle => CNeed::Idle,
            ClientNeed::Closed => CNeed::Closed,
            other => panic!("unknown need {other:?}"),
        }
    }

    fn check_counts(&self) {
        if self.over {
            return;
        }
        assert_eq!(self.s.in_flight(), self.live.len(), "in-flight count");
        assert!(self.s.in_flight() <= self.s.capacity(), "in flight beyond capacity");
    }

    /// Sends what the session has to send.
    fn transmit(&mut self) {
        let mut b = Vec::new();
        while let Some(t) = self.s.poll_transmit(&mut b) {
            self.check.check(&b, t);
            if self.keep {
                self.out.extend_from_slice(&b);
                if let Some(p) = t.payload {
                    let data = self.writes.remove(&p.cookie.0).expect("the WRITE's data");
                    assert_eq!(data.len() as u64, p.length);
                    self.out.extend_from_slice(&data);
                }
            }
            b.clear();
        }
        assert!(!self.s.has_output());
    }

    /// Does what the session needs without a choice of the driver's:
    /// sends, takes pending events, upgrades to TLS, closes.
    fn settle(&mut self) {
        for _ in 0..MAX_STEPS {
            if self.over {
                return;
            }
            self.transmit();
            match self.s.need() {
                ClientNeed::Pending => self.feed_inbox(),
                ClientNeed::StartTls(_) => {
                    assert!(self.check.options.last() == Some(&OptionType::STARTTLS));
                    assert_ne!(self.config.tls, TlsMode::Off, "STARTTLS without TLS");
                    assert!(!self.tls, "TLS twice");
                    assert!(!self.s.has_output(), "output left at STARTTLS");
                    if let ClientNeed::StartTls(t) = self.s.need()
                        && let Err(e) = t.established()
                    {
                        self.failed(e);
                        return;
                    }
                    self.tls = true;
                    self.tls_mark = Some(self.out.len());
                    self.inbox.limit = None;
                    assert!(self.s.tls());
                    // What was read past the acknowledgement is TLS's.
                    self.feed_inbox();
                }
                ClientNeed::Closed => {
                    self.lose();
                    return;
                }
                ClientNeed::Bytes(n) if n > 0 && self.inbox.len() > 0 => self.feed_inbox(),
                ClientNeed::Data { .. } if self.inbox.len() > 0 => self.feed_inbox(),
                _ => return,
            }
        }
        panic!("the client session makes no progress");
    }

    /// Feeds what was read, as [`ClientSession::feed`] says.
    fn feed_inbox(&mut self) {
        for _ in 0..1 << 22 {
            if self.over {
                return;
            }
            let input = self.inbox.rest();
            let (n, ev) = match self.s.feed(input) {
                Ok((n, ev)) => {
                    assert!(n <= input.len());
                    (n, ev.map(|e| own_client(e, &input[..n], self.keep)))
                }
                Err(e) => {
                    self.failed(e);
                    return;
                }
            };
            self.inbox.consumed(n);
            // Output queued before the event (an option sent before the
            // handshake ended) is checked as what it was.
            self.transmit();
            match ev {
                Some(ev) => self.event(ev),
                None if n == 0 => {
                    if self.inbox.len() > 0 {
                        let need = self.need();
                        assert!(
                            matches!(need, CNeed::StartTls | CNeed::Negotiating | CNeed::Closed),
                            "feed left {} bytes with {need:?}",
                            self.inbox.len()
                        );
                    } else {
                        assert_ne!(self.need(), CNeed::Pending, "an event left pending");
                    }
                    return;
                }
                None => {}
            }
            self.transmit();
        }
        panic!("feed makes no progress");
    }

    fn event(&mut self, ev: Cli) {
        match ev {
            Cli::Connected => {
                assert!(!self.connected, "connected twice");
                self.connected = true;
                assert!(matches!(
                    self.opt_pending.take(),
                    None | Some(OptCall::Go | OptCall::GoNamed(_))
                ));
                assert!(self.s.is_connected());
                let n = self.s.negotiated().expect("negotiated once connected");
                check_negotiated(n, &self.config);
                assert_eq!(self.s.size(), n.size);
                assert_eq!(self.s.tls(), self.tls, "TLS as the driver upgraded");
                self.check.transmission = true;
                self.check.extended = n.mode.extended();
                assert_eq!(self.s.capacity(), self.config.max_in_flight.max(1));
            }
            Cli::OptionDone(o) => {
                let call = self.opt_pending.take().expect("an outcome without an option");
                assert_ne!(call, OptCall::Abort);
                check_outcome(&o);
                self.outcomes.push(o);
            }
            Cli::Aborted => {
                assert_eq!(self.opt_pending.take(), Some(OptCall::Abort));
                assert!(self.s.is_closed());
            }
            Cli::Data(cookie, at, len, data) => {
                self.content(cookie, at, len);
                if let (Some(d), Some(l)) = (data, self.live.get_mut(&cookie.0))
                    && let Some(b) = &mut l.buf
                {
                    b[at as usize..at as usize + d.len()].copy_from_slice(&d);
                }
            }
            Cli::Hole(cookie, at, len) => {
                assert!(len > 0, "empty hole");
                self.content(cookie, at, len);
                self.span = None;
                if let Some(b) = self.live.get_mut(&cookie.0).and_then(|l| l.buf.as_mut()) {
                    b[at as usize..(at + len) as usize].fill(0);
                }
            }
            Cli::Status(cookie, context_id, extents) => {
                let l = self
                    .live
                    .get_mut(&cookie.0)
                    .expect("block status for a request in flight");
                assert_eq!(l.req.command, Command::BLOCK_STATUS);
                assert!(self.s.contexts().iter().any(|c| c.id == context_id), "unknown context");
                l.statuses += 1;
                assert!(
                    l.statuses as usize <= self.s.contexts().len(),
                    "a context answered twice"
                );
                assert!(!extents.is_empty(), "block status without extents");
                assert!(extents.iter().all(|e| e.0 > 0), "extent of length 0");
                if l.req.flags.contains(CommandFlags::REQ_ONE) {
                    assert!(extents.len() == 1 && extents[0].0 <= l.req.length, "REQ_ONE violated");
                }
            }
            Cli::Done(cookie, command, result) => {
                if self.span.is_some_and(|(c, _)| c == cookie.0) {
                    self.span = None;
                }
                let l = self
                    .live
                    .remove(&cookie.0)
                    .expect("Done for a request not in flight (or twice)");
                assert_eq!(l.req.command, command);
                match &result {
                    Ok(()) => {
                        if command == Command::READ {
                            assert_eq!(l.covered, l.req.length, "successful read not covered");
                        }
                        if command == Command::BLOCK_STATUS {
                            assert!(l.statuses > 0, "successful block status without status");
                        }
                    }
                    Err(e) => {
                        if let Some(o) = e.offset {
                            assert!(o >= l.req.offset && o < l.req.offset.saturating_add(l.req.length.max(1)));
                        }
                        assert!(e.message.len() <= 3 * MAX_STRING_LEN);
                        assert_ne!(e.code.0, 0, "an error of 0");
                    }
                }
                if self.manual_release {
                    self.held.push(cookie);
                }
                self.completions.push(Completion {
                    cookie: cookie.0,
                    req: l.req,
                    result: result.map_err(|e| e.code),
                    data: l.buf,
                });
            }
        }
        self.check_counts();
    }

    /// READ data or a hole for `cookie`: within the request's buffer.
    fn content(&mut self, cookie: Cookie, at: u64, length: u64) {
        let l = self.live.get_mut(&cookie.0).expect("content for a request in flight");
        assert_eq!(l.req.command, Command::READ, "content for {:?}", l.req.command);
        let end = at.checked_add(length).expect("span overflows");
        assert!(
            end <= l.req.length,
            "span {at}+{length} beyond the buffer of {}",
            l.req.length
        );
        if self.span != Some((cookie.0, at)) {
            l.chunks += 1;
        }
        self.span = Some((cookie.0, end));
        // "At most one content chunk" (it may be short if an error follows).
        assert!(
            l.chunks == 1 || !l.req.flags.contains(CommandFlags::DF),
            "DF read fragmented"
        );
        l.covered += length;
        assert!(l.covered <= l.req.length, "content beyond the request");
    }

    /// The session failed: it must say so from now on, and the connection
    /// is closed.
    fn failed(&mut self, e: ClientSessionError) {
        assert!(
            !matches!(e, ClientSessionError::Misuse(_)),
            "the driver followed need(), yet {e}"
        );
        assert!(matches!(self.s.need(), ClientNeed::Closed), "{e}, yet not closed");
        assert!(self.s.is_closed());
        assert!(!self.s.is_connected());
        self.error = Some(e);
        self.lose();
    }

    /// The connection is gone: every request in flight fails, once.
    fn lose(&mut self) {
        if self.over {
            return;
        }
        let mut failed: Vec<u64> = self.s.connection_lost().iter().map(|c| c.0).collect();
        failed.sort_unstable();
        let live: Vec<u64> = self.live.keys().copied().collect();
        assert_eq!(failed, live, "connection_lost() returns exactly the requests in flight");
        self.lost.extend(std::mem::take(&mut self.live));
        self.over = true;
        assert!(matches!(self.s.need(), ClientNeed::Closed));
        assert!(self.s.is_closed() && !self.s.has_output());
        assert!(self.s.start_request(Request::new(Command::FLUSH, 0, 0)).is_err());
        assert_eq!(self.s.in_flight(), 0);
    }

    /// Reads exactly what the session asks for (READ data moved by the
    /// driver); false when there is nothing to read.
    fn exact(&mut self, src: &mut dyn Source) -> bool {
        match self.need() {
            CNeed::Bytes(n) if n > 0 => {
                let had = self.inbox.len();
                let b = src.read(n);
                if b.is_empty() {
                    return false;
                }
                let whole = b.len() == n;
                self.inbox.push(b);
                let before = self.inbox.pos;
                self.feed_inbox();
                if whole && had == 0 && !self.over && self.inbox.limit.is_none() {
                    assert_eq!(self.inbox.pos - before, n, "an exact count is consumed whole");
                }
                true
            }
            CNeed::Data(..) => self.move_data(src, u64::MAX),
            _ => false,
        }
    }

    /// Reads up to `k` bytes and feeds what was read.
    fn chunk(&mut self, src: &mut dyn Source, k: usize) -> bool {
        let b = src.read(k);
        if b.is_empty() {
            return false;
        }
        self.inbox.push(b);
        self.feed_inbox();
        true
    }

    /// Moves up to `k` bytes of announced READ data into the request's
    /// buffer (what was read already first) and reports them.
    fn move_data(&mut self, src: &mut dyn Source, k: u64) -> bool {
        let CNeed::Data(cookie, at, length) = self.need() else {
            return false;
        };
        assert!(length > 0, "READ data of length 0 announced");
        let want = usize::try_from(k.min(length)).unwrap_or(usize::MAX);
        let from_inbox = want.min(self.inbox.len());
        let mut data = self.inbox.rest()[..from_inbox].to_vec();
        self.inbox.consumed(from_inbox);
        data.extend_from_slice(src.read(want - from_inbox));
        if data.is_empty() {
            return false;
        }
        self.inbox.moved((data.len() - from_inbox) as u64);
        let n = data.len() as u64;
        self.content(Cookie(cookie), at, n);
        if let Some(b) = self.live.get_mut(&cookie).and_then(|l| l.buf.as_mut()) {
            b[at as usize..(at + n) as usize].copy_from_slice(&data);
        }
        if n == length {
            self.span = None;
        }
        match self.s.data_received(n) {
            Ok(Some(ev)) => {
                let ev = own_client(ev, &[], self.keep);
                assert!(matches!(ev, Cli::Done(..)), "data_received() gave {ev:?}");
                self.span = None;
                self.event(ev);
            }
            Ok(None) => {}
            Err(e) => self.failed(e),
        }
        true
    }

    /// Starts a request; its cookie if the session took it.
    fn request(&mut self, r: Request, data: Option<Vec<u8>>) -> Option<Cookie> {
        if self.over {
            return None;
        }
        let before = self.s.in_flight();
        let had_output = self.s.has_output();
        let res = self.s.start_request(r);
        let Ok(cookie) = res else {
            assert_eq!(self.s.in_flight(), before, "a refused request takes no slot");
            assert_eq!(self.s.has_output(), had_output, "a refused request sends nothing");
            if !self.connected {
                assert!(matches!(
                    res,
                    Err(RequestError::NotConnected | RequestError::Failed | RequestError::SessionFailed(_))
                ));
            }
            if self.disconnecting {
                assert!(matches!(
                    res,
                    Err(RequestError::Disconnecting | RequestError::SessionFailed(_))
                ));
            }
            return None;
        };
        assert!(self.connected && !self.disconnecting);
        if r.command == Command::DISC {
            assert_eq!(self.s.in_flight(), before, "NBD_CMD_DISC takes no slot");
            self.disconnecting = true;
            self.check.expected.push_back((None, Request::new(Command::DISC, 0, 0)));
            return None;
        }
        // What the client lets through, the server must be able to accept.
        if r.command == Command::FLUSH {
            assert_eq!((r.offset, r.length), (0, 0));
        } else {
            let end = r.offset.checked_add(r.length).expect("request end overflows");
            assert!(end <= self.s.size(), "request past the end of the export");
        }
        if r.command == Command::BLOCK_STATUS {
            assert!(self.s.structured_replies() && !self.s.contexts().is_empty());
        }
        assert!(cookie.slot() < self.s.capacity());
        self.check.expected.push_back((Some(cookie.0), r));
        let buf = (self.keep && r.command == Command::READ).then(|| vec![0xee; r.length as usize]);
        let fresh = self.live.insert(
            cookie.0,
            Live {
                req: r,
                covered: 0,
                chunks: 0,
                statuses: 0,
                buf,
            },
        );
        assert!(fresh.is_none(), "cookie {cookie:?} issued twice");
        if let Some(d) = data {
            assert_eq!(d.len() as u64, r.length);
            if r.length > 0 {
                self.writes.insert(cookie.0, d);
            }
        }
        self.check_counts();
        Some(cookie)
    }

    /// An option-mode call.
    fn opt(&mut self, call: OptCall) {
        if self.over {
            return;
        }
        let before = self.need();
        match call.call(&mut self.s) {
            Ok(()) => {
                assert_eq!(before, CNeed::Negotiating, "{call:?} taken while not negotiating");
                assert!(self.opt_pending.is_none());
                self.opt_pending = Some(call);
            }
            Err(ClientSessionError::Misuse(_)) => {
                assert_eq!(self.need(), before, "a refused call changes nothing");
            }
            Err(e) => self.failed(e),
        }
    }

    /// Releases the slots of completed requests (manual release).
    fn release(&mut self) {
        for c in self.held.drain(..) {
            self.s.release(c);
        }
        self.check_counts();
    }

    /// Calls that the session's state does not allow: refused, and nothing
    /// changes.
    fn misuse(&mut self) {
        if self.over {
            return;
        }
        let before = self.need();
        let r = match before {
            CNeed::Data(_, _, length) => self.s.data_received(length + 1),
            _ => self.s.data_received(1),
        };
        assert!(matches!(r, Err(ClientSessionError::Misuse(_))), "{r:?}");
        if before != CNeed::Negotiating {
            assert!(matches!(self.s.opt_list(), Err(ClientSessionError::Misuse(_))));
        }
        if !self.connected {
            assert!(matches!(
                self.s.start_request(Request::new(Command::READ, 0, 512)),
                Err(RequestError::NotConnected | RequestError::SessionFailed(_))
            ));
        }
        assert_eq!(self.need(), before, "misuse changed the session");
    }
}

// ---------------------------------------------------------------------------
// The `client_session` target
// ---------------------------------------------------------------------------

/// Driver actions of the `client_session` target (the first byte of each
/// step); a byte not listed reads exactly what the session needs.
pub mod client_op {
    /// Read exactly what `need()` asks for (READ data: moved by the driver).
    pub const EXACT: u8 = 0x00;
    /// 0x01 to 0x7f: read so many bytes and feed them.
    pub const CHUNK_MAX: u8 = 0x7f;
    /// Then a big-endian u16: read so many bytes and feed them.
    pub const CHUNK16: u8 = 0x80;
    /// Then command, flags (1 byte each), offset (u64), length (u32):
    /// `start_request`.
    pub const REQUEST: u8 = 0x81;
    /// `disconnect`
    pub const DISCONNECT: u8 = 0x82;
    /// Then three bytes ([`super::OptCall::decode`]): an option-mode call.
    pub const OPT: u8 = 0x83;
    /// `connection_lost`: the end.
    pub const LOST: u8 = 0x84;
    /// Release the slots of completed requests.
    pub const RELEASE: u8 = 0x85;
    /// Then a u16: move up to so many bytes of READ data (`data_received`).
    pub const DATA16: u8 = 0x86;
    /// Calls the state does not allow.
    pub const MISUSE: u8 = 0x87;
}

/// The `client_session` target. Layout: 4 bytes of configuration
/// ([`client_config`]), then steps, each a [`client_op`] byte and its
/// arguments; the bytes the driver reads from the server are taken from
/// the input where a step reads them. At the end of the input the
/// connection is lost. Returns what the session reached.
pub fn client_session(data: &[u8]) -> Summary {
    let mut input = Input::new(data);
    let Some(b) = input.be::<4>() else {
        return Summary::default();
    };
    let (config, manual) = client_config(b);
    let mut d = ClientDriver::new(config, manual, false);
    let mut summary = Summary {
        opt_mode: d.config.opt_mode,
        connections: 1,
        ..Summary::default()
    };
    for _ in 0..MAX_STEPS {
        d.settle();
        summary.options += d.outcomes.len();
        d.outcomes.clear();
        for c in d.completions.drain(..) {
            if c.result.is_ok() {
                summary.ok += 1;
            } else {
                summary.failed += 1;
            }
        }
        if d.connected
            && let Some(m) = d.s.mode()
            && !summary.modes.contains(&m)
        {
            summary.modes.push(m);
        }
        summary.tls |= d.tls;
        if d.over {
            return summary;
        }
        let Some(op) = input.u8() else {
            break;
        };
        let progress = match op {
            client_op::CHUNK16 => match input.u16() {
                Some(k) => d.chunk(&mut input, k as usize),
                None => false,
            },
            1..=client_op::CHUNK_MAX => d.chunk(&mut input, op as usize),
            client_op::REQUEST => {
                let (Some(cmd), Some(flags), Some(offset), Some(length)) =
                    (input.u8(), input.u8(), input.u64(), input.u32())
                else {
                    break;
                };
                let r = Request {
                    command: command(cmd),
                    flags: CommandFlags::from_bits_retain(flags as u16),
                    offset,
                    length: length as u64,
                };
                d.request(r, None);
                true
            }
            client_op::DISCONNECT => {
                d.request(Request::new(Command::DISC, 0, 0), None);
                true
            }
            client_op::OPT => {
                let (Some(w), Some(n), Some(q)) = (input.u8(), input.u8(), input.u8()) else {
                    break;
                };
                d.opt(OptCall::decode(w, n, q));
                true
            }
            client_op::LOST => break,
            client_op::RELEASE => {
                d.release();
                true
            }
            client_op::DATA16 => match input.u16() {
                Some(k) => {
                    d.move_data(&mut input, k as u64);
                    true
                }
                None => false,
            },
            client_op::MISUSE => {
                d.misuse();
                true
            }
            _ => d.exact(&mut input) || input.left() > 0,
        };
        if !progress {
            break;
        }
    }
    d.lose();
    summary
}

// ---------------------------------------------------------------------------
// The server's driver
// ---------------------------------------------------------------------------

/// What [`ServerNeed`] says, without the borrow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SNeed {
    Bytes(usize),
    Payload(ServerRequest, u64, u64),
    Discard(u64),
    StartTls,
    Closed,
}

/// A server event copied out of the session's borrow.
#[derive(Debug)]
enum Srv {
    Ready,
    Aborted,
    Request(ServerRequest),
    WriteData(ServerRequest, u64, Vec<u8>, bool),
    Reject(ServerRequest, ErrorCode, &'static str),
    Disconnect,
}

fn own_server(ev: ServerEvent<'_>, consumed: &[u8]) -> Srv {
    match ev {
        ServerEvent::Ready => Srv::Ready,
        ServerEvent::Aborted => Srv::Aborted,
        ServerEvent::Request(r) => Srv::Request(r),
        ServerEvent::WriteData {
            request,
            offset,
            data,
            last,
        } => {
            assert!(!data.is_empty(), "empty WRITE data");
            assert!(
                consumed.ends_with(data),
                "WRITE data are not the bytes the session consumed"
            );
            Srv::WriteData(request, offset, data.to_vec(), last)
        }
        ServerEvent::Reject { request, error, reason } => Srv::Reject(request, error, reason),
        ServerEvent::Disconnect => Srv::Disconnect,
        other => panic!("unknown server event {other:?}"),
    }
}

/// What the server driver does with requests.
pub trait Executor {
    /// A request to execute and reply to (a WRITE once its payload is in).
    fn execute(&mut self, s: &ServerSession<Exports>, r: &ServerRequest, payload: &[u8], out: &mut Vec<u8>);
    /// A request the session refused: reply with `error`.
    fn reject(
        &mut self,
        s: &ServerSession<Exports>,
        r: &ServerRequest,
        error: ErrorCode,
        reason: &str,
        out: &mut Vec<u8>,
    );
}

/// The `server_session` target's executor: calls every encoder function
/// with fuzzed arguments.
#[derive(Debug, Default)]
struct EncoderCalls(Option<EncSpec>, usize);

impl Executor for EncoderCalls {
    fn execute(&mut self, s: &ServerSession<Exports>, r: &ServerRequest, _: &[u8], _: &mut Vec<u8>) {
        self.1 += 1;
        if let Some(e) = &self.0 {
            let enc = s.encoder().expect("an encoder in transmission");
            encode_all(enc, s.size(), s.constraints().minimum, r, e);
        }
    }
    fn reject(
        &mut self,
        s: &ServerSession<Exports>,
        r: &ServerRequest,
        error: ErrorCode,
        reason: &str,
        out: &mut Vec<u8>,
    ) {
        assert_ne!(error.0, 0, "rejected with error 0");
        assert!(!reason.is_empty());
        let enc = s.encoder().expect("an encoder in transmission");
        enc.reply_error(r, error, reason, out);
        self.execute(s, r, &[], out);
    }
}

/// Drives a [`ServerSession`] as a user's driver does and checks what it
/// does.
pub struct ServerDriver<X: Executor> {
    s: ServerSession<Exports>,
    config: ServerConfig,
    x: X,
    inbox: Inbox,
    check: ServerOut,
    /// Bytes for the client (replies included).
    out: Vec<u8>,
    tls_mark: Option<usize>,
    /// The WRITE whose payload is coming, and what arrived of it.
    write: Option<(ServerRequest, Vec<u8>)>,
    ready: bool,
    shut: bool,
    disconnected: bool,
    over: bool,
    tls: bool,
    error: Option<ServerSessionError>,
    /// Requests the session refused (`conversation`: none may be).
    rejects: Vec<(ServerRequest, &'static str)>,
}

impl<X: Executor> ServerDriver<X> {
    /// A driver of a session with `config` offering `exports`.
    pub fn new(config: ServerConfig, exports: Exports, x: X) -> Self {
        let s = ServerSession::new(config.clone(), exports);
        let mut d = ServerDriver {
            check: ServerOut::new(&config),
            s,
            config,
            x,
            inbox: Inbox::default(),
            out: Vec::new(),
            tls_mark: None,
            write: None,
            ready: false,
            shut: false,
            disconnected: false,
            over: false,
            tls: false,
            error: None,
            rejects: Vec::new(),
        };
        assert!(d.s.is_closed() || d.s.handshake_timeout().is_some() != d.config.oldstyle);
        d.transmit();
        d
    }

    fn need(&mut self) -> SNeed {
        match self.s.need() {
            ServerNeed::Bytes(n) => SNeed::Bytes(n),
            ServerNeed::Payload {
                request,
                offset,
                length,
            } => SNeed::Payload(request, offset, length),
            ServerNeed::Discard(n) => SNeed::Discard(n),
            ServerNeed::StartTls(_) => SNeed::StartTls,
            ServerNeed::Closed => SNeed::Closed,
            other => panic!("unknown need {other:?}"),
        }
    }

    fn transmit(&mut self) {
        let mut b = Vec::new();
        while self.s.poll_transmit(&mut b).is_some() {
            self.check.check(&b, self.s.negotiated());
            self.out.extend_from_slice(&b);
            b.clear();
        }
        assert!(!self.s.has_output());
        if !self.ready && !self.over {
            // The server never waits for the client within an option's replies.
            if matches!(self.need(), SNeed::Bytes(_) | SNeed::Discard(_) | SNeed::StartTls)
                && self.s.negotiated().is_none()
            {
                assert!(
                    self.check.at_rest(),
                    "waiting for the client within an option's replies"
                );
            }
        }
    }

    fn settle(&mut self) {
        for _ in 0..MAX_STEPS {
            if self.over {
                return;
            }
            self.transmit();
            match self.s.need() {
                ServerNeed::StartTls(t) => {
                    assert_ne!(self.config.tls, TlsPolicy::NoTls, "STARTTLS accepted without TLS");
                    assert!(!self.tls, "TLS twice");
                    if let Err(e) = t.established() {
                        self.failed(e);
                        return;
                    }
                    self.tls = true;
                    self.tls_mark = Some(self.out.len());
                    self.inbox.limit = None;
                    assert!(self.s.tls());
                    self.feed_inbox();
                }
                ServerNeed::Closed => {
                    self.lose();
                    return;
                }
                _ if self.inbox.len() > 0 => {
                    let before = self.inbox.pos;
                    self.feed_inbox();
                    if self.inbox.pos == before {
                        return;
                    }
                }
                _ => return,
            }
        }
        panic!("the server session makes no progress");
    }

    fn feed_inbox(&mut self) {
        for _ in 0..1 << 22 {
            if self.over {
                return;
            }
            let input = self.inbox.rest();
            let (n, ev) = match self.s.feed(input) {
                Ok((n, ev)) => {
                    assert!(n <= input.len());
                    (n, ev.map(|e| own_server(e, &input[..n])))
                }
                Err(e) => {
                    self.failed(e);
                    return;
                }
            };
            self.inbox.consumed(n);
            match ev {
                Some(ev) => self.event(ev),
                None if n == 0 => {
                    if self.inbox.len() > 0 {
                        let need = self.need();
                        assert!(
                            matches!(need, SNeed::StartTls | SNeed::Closed),
                            "feed left {} bytes with {need:?}",
                            self.inbox.len()
                        );
                    }
                    return;
                }
                None => {}
            }
            self.transmit();
        }
        panic!("feed makes no progress");
    }

    fn event(&mut self, ev: Srv) {
        match ev {
            Srv::Ready => {
                assert!(!self.ready, "ready twice");
                self.ready = true;
                let n = self.s.negotiated().expect("negotiated once ready").clone();
                check_server_negotiated(&n, &self.config);
                assert_eq!(n.tls, self.tls, "TLS as the driver upgraded");
                assert!(self.s.encoder().is_some() && self.s.handshake_timeout().is_none());
                let want = self.s.exports().resolve(&n.requested_name);
                assert_eq!(self.s.export().copied(), want, "the export chosen");
                let e = &self.s.exports().0[want.expect("an export")];
                assert_eq!(n.size, e.details.size);
                if e.details.tls_only && self.config.tls == TlsPolicy::SelectiveTls {
                    assert!(n.tls, "a TLS-only export without TLS");
                }
                assert!(self.s.max_payload() > 0);
            }
            Srv::Aborted => assert!(matches!(self.s.need(), ServerNeed::Closed)),
            Srv::Request(r) => {
                assert!(self.ready && !self.shut, "a request accepted after shutdown");
                assert!(self.write.is_none());
                check_request(&self.s, &r);
                if r.command == Command::WRITE && r.length > 0 {
                    assert_eq!(self.need(), SNeed::Payload(r, 0, r.length));
                    self.write = Some((r, Vec::new()));
                } else {
                    self.x.execute(&self.s, &r, &[], &mut self.out);
                }
            }
            Srv::WriteData(r, offset, data, last) => self.payload(r, offset, &data, last),
            Srv::Reject(r, error, reason) => {
                assert!(self.write.is_none());
                self.rejects.push((r, reason));
                self.x.reject(&self.s, &r, error, reason, &mut self.out);
            }
            Srv::Disconnect => {
                assert!(self.write.is_none());
                self.disconnected = true;
                assert!(matches!(self.s.need(), ServerNeed::Closed));
            }
        }
    }

    /// A piece of a WRITE payload.
    fn payload(&mut self, r: ServerRequest, offset: u64, data: &[u8], last: bool) {
        let (w, got) = self.write.as_mut().expect("payload without a WRITE");
        assert_eq!(*w, r, "payload of another request");
        assert_eq!(offset, got.len() as u64, "payload out of order");
        got.extend_from_slice(data);
        assert_eq!(last, got.len() as u64 == r.length, "last piece");
        assert!(got.len() as u64 <= r.length);
        if last {
            let (r, got) = self.write.take().expect("the WRITE");
            self.x.execute(&self.s, &r, &got, &mut self.out);
        }
    }

    fn failed(&mut self, e: ServerSessionError) {
        assert!(
            !matches!(e, ServerSessionError::Misuse(_)),
            "the driver followed need(), yet {e}"
        );
        assert!(matches!(self.s.need(), ServerNeed::Closed), "{e}, yet not closed");
        assert!(self.s.is_closed());
        assert_eq!(self.s.feed(&[1]).err(), Some(e.clone()), "the error is repeated");
        self.error = Some(e);
        self.lose();
    }

    fn lose(&mut self) {
        if self.over {
            return;
        }
        self.transmit();
        self.s.connection_lost();
        self.over = true;
        assert!(matches!(self.s.need(), ServerNeed::Closed));
        assert!(self.s.is_closed() && !self.s.has_output());
    }

    fn exact(&mut self, src: &mut dyn Source) -> bool {
        match self.need() {
            SNeed::Bytes(n) if n > 0 => {
                let had = self.inbox.len();
                let b = src.read(n);
                if b.is_empty() {
                    return false;
                }
                let whole = b.len() == n;
                self.inbox.push(b);
                let before = self.inbox.pos;
                self.feed_inbox();
                if whole && had == 0 && !self.over && self.inbox.limit.is_none() {
                    assert_eq!(self.inbox.pos - before, n, "an exact count is consumed whole");
                }
                true
            }
            SNeed::Payload(..) | SNeed::Discard(_) => self.move_bytes(src, u64::MAX),
            _ => false,
        }
    }

    fn chunk(&mut self, src: &mut dyn Source, k: usize) -> bool {
        let b = src.read(k);
        if b.is_empty() {
            return false;
        }
        self.inbox.push(b);
        self.feed_inbox();
        true
    }

    /// Moves up to `k` bytes of a WRITE payload into storage, or drops
    /// them, as announced, and reports them.
    fn move_bytes(&mut self, src: &mut dyn Source, k: u64) -> bool {
        let need = self.need();
        let length = match need {
            SNeed::Payload(_, _, l) | SNeed::Discard(l) => l,
            _ => return false,
        };
        assert!(length > 0, "an empty payload or discard announced");
        let want = usize::try_from(k.min(length)).unwrap_or(usize::MAX);
        let from_inbox = want.min(self.inbox.len());
        let mut data = self.inbox.rest()[..from_inbox].to_vec();
        self.inbox.consumed(from_inbox);
        data.extend_from_slice(src.read(want - from_inbox));
        if data.is_empty() {
            return false;
        }
        self.inbox.moved((data.len() - from_inbox) as u64);
        let n = data.len() as u64;
        match need {
            SNeed::Payload(r, offset, _) => match self.s.payload_received(n) {
                Ok(last) => self.payload(r, offset, &data, last),
                Err(e) => self.failed(e),
            },
            _ => {
                if let Err(e) = self.s.discarded(n) {
                    self.failed(e);
                }
            }
        }
        true
    }

    fn misuse(&mut self) {
        if self.over {
            return;
        }
        let before = self.need();
        let r = match before {
            SNeed::Payload(_, _, l) => self.s.payload_received(l + 1),
            _ => self.s.payload_received(1),
        };
        assert!(matches!(r, Err(ServerSessionError::Misuse(_))), "{r:?}");
        let r = match before {
            SNeed::Discard(l) => self.s.discarded(l + 1),
            _ => self.s.discarded(1),
        };
        assert!(matches!(r, Err(ServerSessionError::Misuse(_))), "{r:?}");
        assert_eq!(self.need(), before, "misuse changed the session");
    }
}

// ---------------------------------------------------------------------------
// The `server_session` target
// ---------------------------------------------------------------------------

/// Driver actions of the `server_session` target (the first byte of each
/// step); a byte not listed reads exactly what the session needs.
pub mod server_op {
    /// Read exactly what `need()` asks for (payloads moved by the driver).
    pub const EXACT: u8 = 0x00;
    /// 0x01 to 0x7f: read so many bytes and feed them.
    pub const CHUNK_MAX: u8 = 0x7f;
    /// Then a big-endian u16: read so many bytes and feed them.
    pub const CHUNK16: u8 = 0x80;
    /// `shutdown`
    pub const SHUTDOWN: u8 = 0x81;
    /// `connection_lost`: the end.
    pub const LOST: u8 = 0x82;
    /// Calls the state does not allow.
    pub const MISUSE: u8 = 0x83;
    /// Then a length byte and so many bytes decoded (`arbitrary`) as an
    /// optional [`super::EncSpec`]: the encoder calls' arguments from now on.
    pub const ENCODER: u8 = 0x84;
    /// Then a u16: move up to so many payload bytes (or drop them).
    pub const MOVE16: u8 = 0x85;
}

/// The `server_session` target. Layout: 3 bytes of configuration
/// ([`server_config`]), a count (modulo 5) of exports and 7 bytes for each
/// ([`ExportSpec::decode`]), then steps, each a [`server_op`] byte and its
/// arguments; the bytes the driver reads from the client are taken from
/// the input where a step reads them. Returns what the session reached.
pub fn server_session(data: &[u8]) -> Summary {
    let mut input = Input::new(data);
    let mut summary = Summary {
        connections: 1,
        ..Summary::default()
    };
    let Some(b) = input.be::<3>() else {
        return summary;
    };
    let config = server_config(b);
    let Some(count) = input.u8() else {
        return summary;
    };
    let mut exports = Exports::default();
    for _ in 0..count % 5 {
        let Some(e) = input.be::<7>() else {
            return summary;
        };
        exports.0.push(ExportSpec::decode(e));
    }
    let mut d = ServerDriver::new(config, exports, EncoderCalls::default());
    for _ in 0..MAX_STEPS {
        d.settle();
        summary.ok = d.x.1;
        summary.failed = d.rejects.len();
        if d.ready
            && let Some(m) = d.s.mode()
            && !summary.modes.contains(&m)
        {
            summary.modes.push(m);
        }
        summary.tls |= d.tls;
        if d.over {
            return summary;
        }
        let Some(op) = input.u8() else {
            break;
        };
        let progress = match op {
            server_op::CHUNK16 => match input.u16() {
                Some(k) => d.chunk(&mut input, k as usize),
                None => false,
            },
            1..=server_op::CHUNK_MAX => d.chunk(&mut input, op as usize),
            server_op::SHUTDOWN => {
                d.s.shutdown();
                d.shut = true;
                true
            }
            server_op::LOST => break,
            server_op::MISUSE => {
                d.misuse();
                true
            }
            server_op::ENCODER => {
                d.x.0 = input.arbitrary();
                true
            }
            server_op::MOVE16 => match input.u16() {
                Some(k) => {
                    d.move_bytes(&mut input, k as u64);
                    true
                }
                None => false,
            },
            _ => d.exact(&mut input) || input.left() > 0,
        };
        if !progress {
            break;
        }
    }
    d.lose();
    summary
}

// ---------------------------------------------------------------------------
// The `conversation` target
// ---------------------------------------------------------------------------

/// How a driver of the `conversation` target reads.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum Feeding {
    /// Exactly the counts `need()` gives; READ data and WRITE payloads
    /// moved by the driver.
    Exact,
    /// Whatever arrived, in pieces of at most this many bytes (plus one).
    Chunks(u16),
    /// Exact counts and pieces of varying sizes, in turn.
    Mixed(u8),
}

/// The disk both exports of the `conversation` target show.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub struct DiskChoice {
    /// Size (a table).
    pub size: u8,
    /// Block sizes ([`block_size`]).
    pub block: u8,
    /// Transmission flags offered.
    pub flags: u16,
    /// Contexts offered (bits of the export contexts), block sizes
    /// required (bit 5), `ro` only over TLS (bit 6).
    pub bits: u8,
}

/// A step of a [`Scenario`].
#[derive(Debug, Clone, Copy)]
pub enum Step {
    /// An option-mode call ([`OptCall::decode`]), if the client negotiates.
    Opt(u8, u8, u8),
    /// A request (after `opt_go` in option mode): [`command`], flags, and
    /// offset and length in 512-byte units (or bytes, when `raw`).
    Request {
        /// Command.
        cmd: u8,
        /// Flags.
        flags: u8,
        /// Offset.
        at: u16,
        /// Length.
        len: u16,
        /// Units of one byte.
        raw: bool,
        /// The WRITE's data.
        seed: u8,
    },
    /// Move bytes until both sides wait.
    Run,
    /// Move bytes once each way.
    Round,
    /// The connection breaks: each side reads at most this many more
    /// bytes, then both see it closed.
    Cut(u16),
    /// After a cut, a new connection to the same disk.
    Reconnect,
    /// The server shuts down.
    Shutdown,
    /// Release completed requests' slots.
    Release,
    /// `NBD_CMD_DISC`
    Disconnect,
}

/// The `conversation` target's input: a client session talks to a server
/// session over memory. (Built by [`Scenario::decode`].)
#[derive(Debug, Clone)]
pub struct Scenario {
    /// [`client_config`]
    pub client: [u8; 4],
    /// How the client reads.
    pub client_feeding: Feeding,
    /// [`server_config`] (oldstyle only with bit 1 of byte 2).
    pub server: [u8; 3],
    /// How the server reads.
    pub server_feeding: Feeding,
    /// Bit `i % 32` of `faults & faults >> 11 & faults >> 21` fails the
    /// `i`th request the server executes.
    pub faults: u32,
    /// The disk.
    pub disk: DiskChoice,
    /// What happens.
    pub steps: Vec<Step>,
}

impl Scenario {
    /// The scenario `data` stands for: the fields with `arbitrary`, then
    /// steps until the data runs out (at most 256).
    pub fn decode(data: &[u8]) -> Option<Scenario> {
        let mut u = Unstructured::new(data);
        let mut sc = Scenario {
            client: u.arbitrary().ok()?,
            client_feeding: u.arbitrary().ok()?,
            server: u.arbitrary().ok()?,
            server_feeding: u.arbitrary().ok()?,
            faults: u.arbitrary().ok()?,
            disk: u.arbitrary().ok()?,
            steps: Vec::new(),
        };
        while !u.is_empty() && sc.steps.len() < 256 {
            sc.steps.push(Step::decode(&mut u)?);
        }
        Some(sc)
    }
}

impl Step {
    /// A step, requests the likeliest.
    fn decode(u: &mut Unstructured<'_>) -> Option<Step> {
        let k: u8 = u.arbitrary().ok()?;
        Some(match k {
            0..=127 => {
                let (cmd, flags, at, len, raw, seed): (u8, u8, u16, u16, u8, u8) = u.arbitrary().ok()?;
                Step::Request {
                    cmd,
                    flags,
                    at,
                    len,
                    raw: raw & 7 == 0,
                    seed,
                }
            }
            128..=143 => Step::Round,
            144..=175 => {
                let (w, n, q) = u.arbitrary().ok()?;
                Step::Opt(w, n, q)
            }
            176..=183 => Step::Cut(u.arbitrary().ok()?),
            184..=191 => Step::Reconnect,
            192..=193 => Step::Shutdown,
            196..=203 => Step::Release,
            204..=207 => Step::Disconnect,
            _ => Step::Run,
        })
    }
}

/// What a `conversation` run reached (for choosing seeds).
#[derive(Debug, Default, Clone)]
pub struct Summary {
    /// Modes of the connections that reached transmission.
    pub modes: Vec<Mode>,
    /// A connection upgraded to TLS.
    pub tls: bool,
    /// The client negotiated in option mode.
    pub opt_mode: bool,
    /// Option outcomes received.
    pub options: usize,
    /// Requests completed successfully.
    pub ok: usize,
    /// Requests that failed (by the server's error or a cut).
    pub failed: usize,
    /// READs whose data was checked against the model.
    pub reads: usize,
    /// Connections made.
    pub connections: usize,
    /// Connections whose handshake failed.
    pub refused: usize,
    /// Why sessions failed.
    pub errors: Vec<String>,
}

const BLOCK: u64 = 4096;

/// The server's storage: blocks never written read as holes.
#[derive(Debug)]
pub struct Disk {
    data: Vec<u8>,
    written: Vec<bool>,
    faults: u32,
    executed: u32,
    /// Cookies of requests failed on purpose.
    failed: HashSet<u64>,
}

impl Disk {
    fn store(&mut self, offset: u64, bytes: &[u8]) {
        let o = offset as usize;
        self.data[o..o + bytes.len()].copy_from_slice(bytes);
        for b in offset / BLOCK..(offset + bytes.len() as u64).div_ceil(BLOCK) {
            self.written[b as usize] = true;
        }
    }
}

impl Executor for Disk {
    fn execute(&mut self, s: &ServerSession<Exports>, r: &ServerRequest, payload: &[u8], out: &mut Vec<u8>) {
        let enc = s.encoder().expect("an encoder in transmission");
        let structured = enc.mode().structured();
        let i = self.executed;
        self.executed += 1;
        let (o, l) = (r.offset as usize, r.length as usize);
        if self.faults >> (i % 32) & 1 != 0 && r.command != Command::DISC {
            self.failed.insert(r.cookie);
            if structured && r.command == Command::READ && l > 512 && !r.flags.contains(CommandFlags::DF) {
                // Some data, then an error at the offset where it stopped.
                let h = enc.offset_data_header(r, r.offset, 512, false).expect("a data chunk");
                out.extend_from_slice(h.as_bytes());
                out.extend_from_slice(&self.data[o..o + 512]);
                enc.reply_error_offset(r, ErrorCode::EIO, "injected", r.offset + 512, true, out)
                    .expect("an error chunk");
            } else {
                enc.reply_error(r, ErrorCode::EIO, "injected", out);
            }
            return;
        }
        match r.command {
            Command::READ if l == 0 => out.extend_from_slice(enc.reply_ok(r).as_bytes()),
            Command::READ if structured && !r.flags.contains(CommandFlags::DF) => {
                // Holes as OFFSET_HOLE and data as OFFSET_DATA, a block at a time.
                let end = r.offset + r.length;
                let mut off = r.offset;
                while off < end {
                    let n = (BLOCK - off % BLOCK).min(end - off);
                    if self.written[(off / BLOCK) as usize] {
                        let h = enc.offset_data_header(r, off, n, false).expect("a data chunk");
                        out.extend_from_slice(h.as_bytes());
                        out.extend_from_slice(&self.data[off as usize..(off + n) as usize]);
                    } else {
                        let h = enc.hole_chunk(r, off, n, false).expect("a hole chunk");
                        out.extend_from_slice(h.as_bytes());
                    }
                    off += n;
                }
                out.extend_from_slice(enc.reply_ok(r).as_bytes());
            }
            Command::READ => {
                let h = enc.read_reply_header(r).expect("a read reply");
                out.extend_from_slice(h.as_bytes());
                out.extend_from_slice(&self.data[o..o + l]);
            }
            Command::WRITE => {
                assert_eq!(payload.len(), l, "the whole payload");
                self.store(r.offset, payload);
                out.extend_from_slice(enc.reply_ok(r).as_bytes());
            }
            Command::WRITE_ZEROES | Command::TRIM => {
                self.data[o..o + l].fill(0);
                out.extend_from_slice(enc.reply_ok(r).as_bytes());
            }
            Command::FLUSH | Command::CACHE => out.extend_from_slice(enc.reply_ok(r).as_bytes()),
            Command::BLOCK_STATUS => {
                let ids: Vec<(u32, bool)> = s
                    .selected_contexts(r)
                    .map(|(_, c)| (c.id, c.name == CONTEXT_BASE_ALLOCATION))
                    .collect();
                assert!(!ids.is_empty(), "block status for no context");
                let size = s.size();
                for (k, (id, alloc)) in ids.iter().enumerate() {
                    let written = &self.written;
                    let extents = (r.offset / BLOCK..size.div_ceil(BLOCK)).take(64).map(|b| {
                        let start = (b * BLOCK).max(r.offset);
                        let end = (b * BLOCK + BLOCK).min(size);
                        let status = match (alloc, written[b as usize]) {
                            (true, false) => 3,
                            (false, true) => 1,
                            _ => 0,
                        };
                        (end - start, status)
                    });
                    enc.block_status_chunk(r, *id, extents, k + 1 == ids.len(), out)
                        .expect("a status chunk");
                }
            }
            c => panic!("executing {c}"),
        }
    }

    fn reject(
        &mut self,
        s: &ServerSession<Exports>,
        r: &ServerRequest,
        error: ErrorCode,
        reason: &str,
        out: &mut Vec<u8>,
    ) {
        let enc = s.encoder().expect("an encoder in transmission");
        enc.reply_error(r, error, reason, out);
    }
}

/// What the disk holds, as the completed requests say.
#[derive(Debug)]
struct Model {
    data: Vec<u8>,
    /// Bytes a request lost with the connection may have changed.
    known: Vec<bool>,
}

impl Model {
    fn forget(&mut self, r: &Request) {
        if matches!(r.command, Command::WRITE | Command::WRITE_ZEROES | Command::TRIM) {
            self.known[r.offset as usize..(r.offset + r.length) as usize].fill(false);
        }
    }
}

/// Both sides of one connection.
struct Link {
    c: ClientDriver,
    s: ServerDriver<Disk>,
    to_server: Pipe,
    to_client: Pipe,
    /// Bytes pushed into each pipe so far, and where TLS bytes start.
    pushed: [u64; 2],
    tls_at: [Option<u64>; 2],
    rounds: usize,
}

struct Conversation<'a> {
    sc: &'a Scenario,
    link: Link,
    model: Model,
    /// Requests started, in order, with a WRITE's data.
    issued: std::collections::VecDeque<(u64, Option<Vec<u8>>)>,
    summary: Summary,
}

fn exports(disk: &DiskChoice, size: u64) -> Exports {
    let mut d = ExportDetails::new("disk", size);
    d.flags = TransmissionFlags::from_bits_retain(disk.flags) - TransmissionFlags::READ_ONLY;
    d.block_size = block_size(disk.block);
    d.block_size_required = disk.bits & 0xe0 == 0xe0;
    d.meta_contexts = EXPORT_CONTEXTS
        .iter()
        .take(4)
        .enumerate()
        .filter(|(i, _)| disk.bits & (1 << i) != 0)
        .map(|(_, c)| (*c).to_owned())
        .collect();
    let mut ro = d.clone();
    ro.name = "ro".into();
    ro.flags |= TransmissionFlags::READ_ONLY;
    ro.tls_only = disk.bits & 64 != 0;
    Exports(vec![
        ExportSpec {
            name: "disk".into(),
            details: d,
            default: true,
        },
        ExportSpec {
            name: "ro".into(),
            details: ro,
            default: false,
        },
    ])
}

impl Link {
    fn new(sc: &Scenario, disk: Disk) -> Link {
        // Mostly names the server knows ("", "disk", "ro"), sometimes not.
        let mut cb = sc.client;
        cb[1] = [0, 1, 2, 1, 0, 1, 3, 5][cb[1] as usize % 8];
        if cb[3] & 0x80 == 0 {
            // Mostly valid queries.
            cb[3] &= 0x3f;
        }
        let (config, manual) = client_config(cb);
        let mut sconfig = server_config(sc.server);
        if sc.server[2] & 2 == 0 {
            sconfig.oldstyle = false;
        }
        let size = disk.data.len() as u64;
        Link {
            c: ClientDriver::new(config, manual, true),
            s: ServerDriver::new(sconfig, exports(&sc.disk, size), disk),
            to_server: Pipe::default(),
            to_client: Pipe::default(),
            pushed: [0; 2],
            tls_at: [None; 2],
            rounds: 0,
        }
    }

    fn over(&self) -> bool {
        self.c.over && self.s.over
    }
}

/// Reads as `f` says, once; false when nothing was read.
fn read_client(c: &mut ClientDriver, f: Feeding, round: usize, src: &mut Pipe) -> bool {
    match feeding_step(f, round) {
        None => c.exact(src),
        Some(k) => c.chunk(src, k),
    }
}

fn read_server(s: &mut ServerDriver<Disk>, f: Feeding, round: usize, src: &mut Pipe) -> bool {
    match feeding_step(f, round) {
        None => s.exact(src),
        Some(k) => s.chunk(src, k),
    }
}

/// `None`: an exact read; else a piece of this many bytes.
fn feeding_step(f: Feeding, round: usize) -> Option<usize> {
    match f {
        Feeding::Exact => None,
        Feeding::Chunks(k) => Some(k as usize + 1),
        Feeding::Mixed(seed) => {
            let v = (round as u64).wrapping_mul(seed as u64 | 1).wrapping_mul(0x9e37_79b9) >> 7;
            match v % 4 {
                0 => None,
                1 => Some(1),
                2 => Some((v % 97) as usize + 1),
                _ => Some((v % 9000) as usize + 1),
            }
        }
    }
}

impl Conversation<'_> {
    /// Moves bytes once each way; whether anything moved.
    fn round(&mut self) -> bool {
        let l = &mut self.link;
        l.rounds += 1;
        let mut moved = false;
        for _ in 0..4096 {
            l.c.settle();
            if l.c.over || !read_client(&mut l.c, self.sc.client_feeding, l.rounds, &mut l.to_client) {
                break;
            }
            moved = true;
            l.rounds += 1;
        }
        for _ in 0..4096 {
            l.s.settle();
            if l.s.over || !read_server(&mut l.s, self.sc.server_feeding, l.rounds, &mut l.to_server) {
                break;
            }
            moved = true;
            l.rounds += 1;
        }
        l.c.settle();
        l.s.settle();
        // Output goes on the wire; TLS bytes are marked.
        for (i, out, mark, peer_tls, inbox) in [
            (0, &mut l.c.out, &mut l.c.tls_mark, l.s.tls, &mut l.s.inbox),
            (1, &mut l.s.out, &mut l.s.tls_mark, l.c.tls, &mut l.c.inbox),
        ] {
            if let Some(m) = mark.take() {
                l.tls_at[i] = Some(l.pushed[i] + m as u64);
            }
            if !out.is_empty() {
                moved = true;
            }
            l.pushed[i] += out.len() as u64;
            if i == 0 {
                l.to_server.push(out);
            } else {
                l.to_client.push(out);
            }
            out.clear();
            if !peer_tls {
                inbox.limit = l.tls_at[i];
            }
        }
        // A side that closed: the other sees the end once it read everything.
        if l.c.over && !l.s.over && l.to_server.len() == 0 {
            l.s.lose();
            moved = true;
        }
        if l.s.over && !l.c.over && l.to_client.len() == 0 {
            l.c.lose();
            moved = true;
        }
        self.account();
        moved
    }

    /// Moves bytes until both sides wait; then neither may wait for the
    /// other.
    fn run(&mut self) {
        for _ in 0..100_000 {
            if !self.round() {
                let l = &mut self.link;
                if !l.c.over {
                    let n = l.c.need();
                    assert!(
                        matches!(n, CNeed::Negotiating | CNeed::Idle),
                        "deadlock: the client waits with {n:?}, the server with {:?}",
                        l.s.need()
                    );
                }
                if !l.s.over {
                    let n = l.s.need();
                    assert!(matches!(n, SNeed::Bytes(_)), "deadlock: the server waits with {n:?}");
                }
                if !l.c.over {
                    assert_eq!(
                        l.to_client.len() + l.c.inbox.len(),
                        0,
                        "bytes for the client nobody reads"
                    );
                }
                if !l.s.over {
                    assert_eq!(
                        l.to_server.len() + l.s.inbox.len(),
                        0,
                        "bytes for the server nobody reads"
                    );
                }
                return;
            }
        }
        panic!("the conversation does not settle");
    }

    /// Checks what completed against the model and the server's errors.
    fn account(&mut self) {
        let l = &mut self.link;
        let shut = l.s.shut;
        for (r, reason) in l.s.rejects.drain(..) {
            // The spec leaves requests of length 0 to the server.
            assert!(
                shut || r.length == 0,
                "the server refused what the client sent ({r:?}: {reason})"
            );
        }
        if let Some(e) = &l.c.error {
            match e {
                ClientSessionError::Handshake(h) if !l.c.connected => {
                    assert!(
                        !matches!(h, nbd_proto::client::HandshakeError::Violation(_)),
                        "our server broke the handshake: {e}"
                    );
                }
                e => panic!("client failed in transmission: {e}"),
            }
        }
        if let Some(e) = &l.s.error {
            match e {
                ServerSessionError::Handshake(h) if !l.s.ready => {
                    assert!(
                        !matches!(h, nbd_proto::server::ServerHandshakeError::Violation(_)),
                        "our client broke the handshake: {e}"
                    );
                }
                e => panic!("server failed in transmission: {e}"),
            }
        }
        for done in l.c.completions.drain(..) {
            let (cookie, data) = self.issued.pop_front().expect("a completion nobody started");
            assert_eq!(cookie, done.cookie, "completions in the order the server executed");
            let r = done.req;
            let (o, n) = (r.offset as usize, r.length as usize);
            match done.result {
                Ok(()) => {
                    self.summary.ok += 1;
                    match r.command {
                        Command::WRITE => {
                            self.model.data[o..o + n].copy_from_slice(&data.expect("the WRITE's data"));
                            self.model.known[o..o + n].fill(true);
                        }
                        Command::WRITE_ZEROES | Command::TRIM => {
                            self.model.data[o..o + n].fill(0);
                            self.model.known[o..o + n].fill(true);
                        }
                        Command::READ => {
                            let got = done.data.expect("a READ buffer");
                            for (i, b) in got.iter().enumerate() {
                                if self.model.known[o + i] {
                                    assert_eq!(*b, self.model.data[o + i], "READ at {o} differs at byte {i}");
                                }
                            }
                            self.summary.reads += 1;
                        }
                        _ => {}
                    }
                }
                Err(code) => {
                    self.summary.failed += 1;
                    let injected = l.s.x_failed(cookie);
                    assert!(
                        injected || (shut && code == ErrorCode::ESHUTDOWN) || r.length == 0,
                        "{r:?} failed with {code:?}, which nothing caused"
                    );
                }
            }
        }
        for (cookie, lost) in l.c.lost.drain(..) {
            self.summary.failed += 1;
            self.model.forget(&lost.req);
            let i = self
                .issued
                .iter()
                .position(|(c, _)| *c == cookie)
                .expect("a lost request was started");
            self.issued.remove(i);
        }
        if l.c.over {
            assert!(self.issued.is_empty(), "requests neither completed nor failed");
        }
        if let Some(n) = l.c.s.negotiated()
            && !self.summary.modes.contains(&n.mode)
            && l.c.connected
        {
            self.summary.modes.push(n.mode);
        }
        self.summary.tls |= l.c.tls;
        self.summary.options += l.c.outcomes.len();
        l.c.outcomes.clear();
    }

    /// Both sessions connected: they agree on what was negotiated.
    fn check_agreement(&self) {
        let l = &self.link;
        let (Some(c), Some(s)) = (l.c.s.negotiated(), l.s.s.negotiated()) else {
            return;
        };
        if !(l.c.connected && l.s.ready) {
            return;
        }
        assert_eq!(c.mode, s.mode, "mode");
        assert_eq!(c.size, s.size, "size");
        assert_eq!(c.flags, s.flags, "flags");
        assert_eq!(c.tls, s.tls, "TLS");
        assert_eq!(c.contexts, s.contexts, "contexts");
        if s.client_requested_block_size {
            assert_eq!(c.block_size, s.block_size, "block sizes");
        }
    }

    /// In option mode, GO once the caller wants transmission.
    fn go(&mut self) {
        if self.link.c.over || self.link.c.connected {
            return;
        }
        if self.link.c.need() == CNeed::Negotiating && self.link.c.opt_pending.is_none() {
            self.link.c.opt(OptCall::Go);
        }
        self.run();
        self.check_agreement();
    }

    fn request(&mut self, cmd: u8, flags: u8, at: u16, len: u16, raw: bool, seed: u8) {
        self.go();
        let l = &mut self.link;
        if l.c.over || !l.c.connected {
            return;
        }
        let size = l.c.s.size();
        let (offset, length) = if raw {
            (at as u64, len as u64)
        } else {
            let blocks = size / 512;
            let o = (at as u64 % (blocks + 1)) * 512;
            (o, ((len as u64 % 64) + 1) * 512)
        };
        let length = if raw {
            length
        } else {
            length.min(size.saturating_sub(offset))
        };
        // Mostly no flags, else mostly known ones.
        let flags = match flags >> 6 {
            0 | 1 => 0,
            2 => flags as u16 & 0x1f,
            _ => flags as u16,
        };
        let r = Request {
            command: command(cmd),
            flags: CommandFlags::from_bits_retain(flags),
            offset,
            length,
        };
        let data = (r.command == Command::WRITE && length <= size).then(|| {
            (0..length)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                .collect::<Vec<u8>>()
        });
        if let Some(cookie) = l.c.request(r, data.clone()) {
            self.issued.push_back((cookie.0, data));
        }
    }

    fn cut(&mut self, deliver: u16) {
        let l = &mut self.link;
        if !l.c.over {
            l.c.chunk(&mut l.to_client, deliver as usize);
            l.c.settle();
        }
        if !l.s.over {
            l.s.chunk(&mut l.to_server, deliver as usize);
            l.s.settle();
        }
        l.c.lose();
        l.s.lose();
        self.account();
    }

    fn reconnect(&mut self) {
        if !self.link.over() {
            return;
        }
        if self.summary.connections >= 8 {
            return;
        }
        self.count_refused();
        let disk = std::mem::replace(
            &mut self.link.s.x,
            Disk {
                data: Vec::new(),
                written: Vec::new(),
                faults: 0,
                executed: 0,
                failed: HashSet::new(),
            },
        );
        self.link = Link::new(self.sc, disk);
        self.summary.connections += 1;
        self.summary.opt_mode |= self.link.c.config.opt_mode;
    }

    fn count_refused(&mut self) {
        if !self.link.c.connected {
            self.summary.refused += 1;
        }
        if let Some(e) = &self.link.c.error {
            self.summary.errors.push(format!("client: {e}"));
        }
        if let Some(e) = &self.link.s.error {
            self.summary.errors.push(format!("server: {e}"));
        }
    }
}

impl ServerDriver<Disk> {
    /// Whether the server failed this request on purpose.
    fn x_failed(&mut self, cookie: u64) -> bool {
        self.x.failed.remove(&cookie)
    }
}

/// The `conversation` target: a [`Scenario`] built with `arbitrary`.
pub fn conversation(data: &[u8]) -> Summary {
    let Some(sc) = Scenario::decode(data) else {
        return Summary::default();
    };
    run_scenario(&sc)
}

/// Runs a scenario and says what it reached.
pub fn run_scenario(sc: &Scenario) -> Summary {
    let size: u64 = match sc.disk.size % 8 {
        0 => 0,
        1 => 512,
        2 => 4096,
        3 => 65536,
        4 => 65536 + 512,
        5 => 262_144,
        6 => 1 << 20,
        _ => 3 * 4096 + 100,
    };
    let disk = Disk {
        data: vec![0; size as usize],
        written: vec![false; size.div_ceil(BLOCK) as usize],
        faults: sc.faults & sc.faults >> 11 & sc.faults >> 21,
        executed: 0,
        failed: HashSet::new(),
    };
    let mut conv = Conversation {
        sc,
        link: Link::new(sc, disk),
        model: Model {
            data: vec![0; size as usize],
            known: vec![true; size as usize],
        },
        issued: Default::default(),
        summary: Summary {
            connections: 1,
            ..Summary::default()
        },
    };
    conv.summary.opt_mode = conv.link.c.config.opt_mode;
    conv.run();
    for step in sc.steps.iter().take(256) {
        match *step {
            Step::Opt(w, n, q) => {
                let c = &mut conv.link.c;
                if !c.over && c.need() == CNeed::Negotiating && c.opt_pending.is_none() {
                    c.opt(OptCall::decode(w, n, q));
                    conv.run();
                }
            }
            Step::Request {
                cmd,
                flags,
                at,
                len,
                raw,
                seed,
            } => conv.request(cmd, flags, at, len, raw, seed),
            Step::Run => {
                conv.run();
                conv.check_agreement();
            }
            Step::Round => {
                conv.round();
            }
            Step::Cut(deliver) => conv.cut(deliver),
            Step::Reconnect => {
                conv.reconnect();
                conv.run();
            }
            Step::Shutdown => {
                let s = &mut conv.link.s;
                if !s.over {
                    s.s.shutdown();
                    s.shut = true;
                }
            }
            Step::Release => conv.link.c.release(),
            Step::Disconnect => {
                conv.go();
                conv.request(9, 0, 0, 0, true, 0);
            }
        }
    }
    conv.go();
    conv.run();
    conv.check_agreement();
    // Every request was answered; then the client says goodbye.
    let l = &mut conv.link;
    if !l.c.over {
        assert!(l.c.live.is_empty(), "requests left unanswered");
        if l.c.connected && !l.c.disconnecting {
            l.c.request(Request::new(Command::DISC, 0, 0), None);
            conv.run();
            assert!(conv.link.s.disconnected || conv.link.s.over);
        }
    }
    let l = &mut conv.link;
    l.c.lose();
    l.s.lose();
    conv.account();
    conv.count_refused();
    assert!(conv.issued.is_empty());
    conv.summary
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
