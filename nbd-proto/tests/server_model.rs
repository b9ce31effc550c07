//! Model test: the client state machines of this crate against its server
//! state machines, in memory, in every mode (oldstyle, EXPORT_NAME only,
//! simple, structured, extended), over random sequences of reads, writes,
//! trims, zeroes, flushes, caches and block-status queries against a
//! `Vec<u8>` model. Replies within a batch leave the server in random
//! order; structured reads are randomly split into data and hole chunks.
//!
//! Checked: both sides agree on what was negotiated; every read returns
//! what the model holds; every error is the one expected; block status
//! never claims zeroes where there is data; every request the client
//! accepts is accepted by the server, and every request the server would
//! refuse is refused by the client first.

use std::collections::{HashMap, VecDeque};

use nbd_proto::client::{
    ClientConfig, ClientHandshake, ClientTransmission, Cookie, HandshakeError, HandshakeStep, MetaContext, Mode,
    Negotiated, OptionOutcome, ReceiveNext, ReplyEvent, Request, RequestError, TlsMode,
};
use nbd_proto::server::{
    ExportDetails, ExportListing, ReplyEncoder, RequestEvent, ServerConfig, ServerHandshake, ServerHandshakeError,
    ServerNegotiated, ServerReceive, ServerRequest, ServerStep, ServerTransmission, TlsPolicy,
};
use nbd_proto::wire::*;
use proptest::prelude::*;
use zerocopy::IntoBytes;

// ---------------------------------------------------------------------------
// In-memory handshake
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Pipe {
    c2s: VecDeque<u8>,
    s2c: VecDeque<u8>,
}

fn take(q: &mut VecDeque<u8>, n: usize) -> Vec<u8> {
    q.drain(..n).collect()
}

/// The driver's export table: `""` and `"disk"` are the same export.
fn lookup(name: &str, export: &ExportDetails) -> Option<ExportDetails> {
    (name.is_empty() || name == export.name).then(|| export.clone())
}

struct Sides {
    client: Option<ClientHandshake>,
    server: Option<ServerHandshake>,
    client_result: Option<Result<Negotiated, HandshakeError>>,
    server_result: Option<Result<ServerNegotiated, ServerHandshakeError>>,
    pipe: Pipe,
}

impl Sides {
    fn new(scfg: ServerConfig, ccfg: ClientConfig) -> Self {
        Sides {
            client: Some(ClientHandshake::new(ccfg)),
            server: Some(ServerHandshake::new(scfg)),
            client_result: None,
            server_result: None,
            pipe: Pipe::default(),
        }
    }

    /// Runs both machines until neither can make progress (or the client
    /// waits for the caller in option mode).
    fn pump(&mut self, export: &ExportDetails) {
        for _ in 0..100_000 {
            let mut progress = false;
            if let Some(s) = self.server.as_mut() {
                match s.step() {
                    ServerStep::Send(b) => {
                        self.pipe.s2c.extend(b);
                        s.sent();
                        progress = true;
                    }
                    ServerStep::Receive(n) if self.pipe.c2s.len() >= n => {
                        let d = take(&mut self.pipe.c2s, n);
                        if let Err(e) = s.received(&d) {
                            self.server_result = Some(Err(e));
                        }
                        progress = true;
                    }
                    ServerStep::Discard(n) if self.pipe.c2s.len() >= n => {
                        take(&mut self.pipe.c2s, n);
                        s.discarded().unwrap();
                        progress = true;
                    }
                    ServerStep::Receive(_) | ServerStep::Discard(_) => {}
                    ServerStep::StartTls => {
                        s.tls_established().unwrap();
                        progress = true;
                    }
                    ServerStep::LookupExport { name } => {
                        let answer = lookup(name, export);
                        if let Err(e) = s.answer_export(answer) {
                            self.server_result = Some(Err(e));
                        }
                        progress = true;
                    }
                    ServerStep::ListExports => {
                        s.answer_list(&[
                            ExportListing {
                                name: &export.name,
                                description: &export.description,
                                tls_only: export.tls_only,
                            },
                            ExportListing {
                                name: "other",
                                description: "",
                                tls_only: false,
                            },
                        ])
                        .unwrap();
                        progress = true;
                    }
                    ServerStep::Done => {
                        let s = self.server.take().unwrap();
                        self.server_result = Some(s.finish());
                        progress = true;
                    }
                    ServerStep::Aborted | ServerStep::Closed => {
                        self.server = None;
                        progress = true;
                    }
                }
            }
            if let Some(c) = self.client.as_mut() {
                match c.step() {
                    HandshakeStep::Send(b) => {
                        self.pipe.c2s.extend(b);
                        c.sent();
                        progress = true;
                    }
                    HandshakeStep::Receive(n) if self.pipe.s2c.len() >= n => {
                        let d = take(&mut self.pipe.s2c, n);
                        if let Err(e) = c.received(&d) {
                            self.client_result = Some(Err(e));
                            self.client = None;
                        }
                        progress = true;
                    }
                    HandshakeStep::Receive(_) => {}
                    HandshakeStep::StartTls => {
                        if let Err(e) = c.tls_established() {
                            self.client_result = Some(Err(e));
                            self.client = None;
                        }
                        progress = true;
                    }
                    HandshakeStep::Negotiating | HandshakeStep::OptionDone => {}
                    HandshakeStep::Done => {
                        let c = self.client.take().unwrap();
                        self.client_result = Some(c.finish());
                        progress = true;
                    }
                    HandshakeStep::Aborted => {
                        self.client = None;
                        progress = true;
                    }
                }
            }
            if !progress {
                return;
            }
        }
        panic!("handshake does not terminate");
    }
}

type ClientOutcome = Option<Result<Negotiated, HandshakeError>>;
type ServerOutcome = Option<Result<ServerNegotiated, ServerHandshakeError>>;

/// Runs a whole handshake; `None` for a side that never finished (it was
/// waiting for bytes when the other side hung up).
fn handshake(scfg: ServerConfig, ccfg: ClientConfig, export: &ExportDetails) -> (ClientOutcome, ServerOutcome) {
    let mut sides = Sides::new(scfg, ccfg);
    sides.pump(export);
    if matches!((&sides.client_result, &sides.server_result), (Some(Ok(_)), Some(Ok(_)))) {
        assert!(
            sides.pipe.c2s.is_empty() && sides.pipe.s2c.is_empty(),
            "bytes left over"
        );
    }
    (sides.client_result, sides.server_result)
}

// ---------------------------------------------------------------------------
// Setups
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavour {
    Oldstyle,
    ExportNameOnly,
    Simple,
    Structured,
    Extended,
}

#[derive(Debug, Clone)]
struct Setup {
    flavour: Flavour,
    blocks: u64,
    min_block: Option<u32>,
    max_payload: u32,
    read_only: bool,
    flush: bool,
    fua: bool,
    trim: bool,
    zeroes: bool,
    fast_zero: bool,
    cache: bool,
    no_zeroes: bool,
    tls: bool,
    request_block_size: bool,
    block_size_required: bool,
    fast_zero_works: bool,
    bad_block: Option<u64>,
    seed: u64,
}

impl Setup {
    fn granule(&self) -> u64 {
        self.min_block.unwrap_or(512).max(512) as u64
    }
    fn size(&self) -> u64 {
        self.blocks * self.granule()
    }
    fn negotiates_block_size(&self) -> bool {
        !matches!(self.flavour, Flavour::Oldstyle | Flavour::ExportNameOnly)
    }
    fn bad_range(&self) -> Option<(u64, u64)> {
        self.bad_block
            .filter(|b| *b < self.blocks)
            .map(|b| (b * self.granule(), self.granule()))
    }

    fn export(&self) -> ExportDetails {
        let mut d = ExportDetails::new("disk", self.size());
        d.description = "model disk".to_string();
        let mut f = TransmissionFlags::HAS_FLAGS;
        for (on, flag) in [
            (self.read_only, TransmissionFlags::READ_ONLY),
            (self.flush, TransmissionFlags::SEND_FLUSH),
            (self.fua, TransmissionFlags::SEND_FUA),
            (self.trim, TransmissionFlags::SEND_TRIM),
            (self.zeroes, TransmissionFlags::SEND_WRITE_ZEROES),
            (self.fast_zero, TransmissionFlags::SEND_FAST_ZERO),
            (self.cache, TransmissionFlags::SEND_CACHE),
        ] {
            if on {
                f |= flag;
            }
        }
        d.flags = f;
        if self.negotiates_block_size() {
            d.block_size = self.min_block.map(|m| {
                let preferred = m.max(4096);
                BlockSizeConstraints {
                    minimum: m,
                    preferred,
                    maximum: self.max_payload.max(preferred),
                }
            });
            d.block_size_required = self.block_size_required;
        }
        d
    }

    fn configs(&self) -> (ServerConfig, ClientConfig) {
        let mut s = ServerConfig::default().no_zeroes(self.no_zeroes);
        let mut c = ClientConfig::default().request_block_size(self.request_block_size);
        if self.tls && self.flavour != Flavour::Oldstyle {
            s.tls = TlsPolicy::ForcedTls;
            c.tls = TlsMode::Require;
        }
        match self.flavour {
            Flavour::Oldstyle => s.oldstyle = true,
            Flavour::ExportNameOnly => {
                s.support_go = false;
                c.structured_replies = false;
                c.extended_headers = false;
            }
            Flavour::Simple => {
                c.structured_replies = false;
                c.extended_headers = false;
            }
            Flavour::Structured => c.extended_headers = false,
            Flavour::Extended => {}
        }
        (s, c)
    }

    fn expected_mode(&self) -> Mode {
        match self.flavour {
            Flavour::Oldstyle => Mode::Oldstyle,
            Flavour::ExportNameOnly => Mode::ExportNameOnly,
            Flavour::Simple => Mode::Simple,
            Flavour::Structured => Mode::Structured,
            Flavour::Extended => Mode::Extended,
        }
    }
}

fn setup_strategy() -> impl Strategy<Value = Setup> {
    let flavour = prop_oneof![
        Just(Flavour::Oldstyle),
        Just(Flavour::ExportNameOnly),
        Just(Flavour::Simple),
        Just(Flavour::Structured),
        Just(Flavour::Extended),
    ];
    let geometry = (
        1u64..48,
        prop_oneof![Just(None), Just(Some(512u32)), Just(Some(4096u32))],
        prop_oneof![Just(4096u32), Just(8192u32), Just(1 << 20)],
    );
    let flags = proptest::collection::vec(prop::bool::weighted(0.8), 7);
    let misc = (
        any::<bool>(),
        prop::bool::weighted(0.3),
        any::<bool>(),
        prop::bool::weighted(0.15),
        any::<bool>(),
        prop::option::weighted(0.3, 0u64..48),
        any::<u64>(),
    );
    (flavour, geometry, flags, misc).prop_map(
        |(flavour, (blocks, min_block, max_payload), f, (no_zeroes, tls, rbs, required, fzw, bad, seed))| Setup {
            flavour,
            blocks,
            min_block,
            max_payload,
            read_only: !f[0] && f[1], // read-only now and then
            flush: f[1],
            fua: f[2],
            trim: f[3],
            zeroes: f[4],
            fast_zero: f[5],
            cache: f[6],
            no_zeroes,
            tls,
            request_block_size: rbs,
            block_size_required: required,
            fast_zero_works: fzw,
            bad_block: bad,
            seed,
        },
    )
}

// ---------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Op {
    kind: u8,
    off: u64,
    len: u64,
    aligned: bool,
    flags: [bool; 4],
    weird: bool,
    fill: u8,
    new_batch: bool,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    (
        (0u8..10, 0u64..(48 * 4096 + 8192), 0u64..24_000),
        (
            prop::bool::weighted(0.85),
            (
                prop::bool::weighted(0.3),
                prop::bool::weighted(0.3),
                prop::bool::weighted(0.4),
                any::<bool>(),
            )
                .prop_map(|(a, b, c, d)| [a, b, c, d]),
        ),
        (prop::bool::weighted(0.06), 1u8..255, prop::bool::weighted(0.3)),
    )
        .prop_map(|((kind, off, len), (aligned, flags), (weird, fill, new_batch))| Op {
            kind,
            off,
            len,
            aligned,
            flags,
            weird,
            fill,
            new_batch,
        })
}

impl Op {
    fn command(&self) -> Command {
        match self.kind {
            0..=2 => Command::READ,
            3..=5 => Command::WRITE,
            6 => Command::TRIM,
            7 => Command::WRITE_ZEROES,
            8 if self.flags[3] => Command::FLUSH,
            8 => Command::CACHE,
            _ => Command::BLOCK_STATUS,
        }
    }

    fn request(&self, setup: &Setup) -> Request {
        let cmd = self.command();
        let g = setup.granule();
        // Mostly requests inside the export, sometimes past it.
        let span = setup.size() + g;
        let (mut off, mut len) = (self.off % span, self.len % (setup.size() / 2 + g));
        if self.aligned {
            off -= off % g;
            len -= len % g;
        }
        let mut flags = CommandFlags::empty();
        if self.flags[0] {
            flags |= CommandFlags::FUA;
        }
        match cmd {
            Command::READ if self.flags[1] => flags |= CommandFlags::DF,
            Command::WRITE_ZEROES => {
                if self.flags[1] {
                    flags |= CommandFlags::NO_HOLE;
                }
                if self.flags[2] {
                    flags |= CommandFlags::FAST_ZERO;
                }
            }
            Command::BLOCK_STATUS if self.flags[1] => flags |= CommandFlags::REQ_ONE,
            _ => {}
        }
        if cmd == Command::FLUSH && !self.weird {
            off = 0;
            len = 0;
        }
        if self.weird && cmd != Command::BLOCK_STATUS {
            // A flag that does not belong to the command.
            flags |= CommandFlags::REQ_ONE;
        }
        Request {
            command: cmd,
            flags,
            offset: off,
            length: len,
        }
    }
}

// ---------------------------------------------------------------------------
// The server driver of the test: executes requests against a Vec<u8>
// ---------------------------------------------------------------------------

struct ServerSide {
    tx: ServerTransmission,
    enc: ReplyEncoder,
    disk: Vec<u8>,
    granule: u64,
    bad: Option<(u64, u64)>,
    fast_zero_works: bool,
    rng: u64,
    out: Vec<u8>,
    pending_write: Option<ServerRequest>,
    rejects: Vec<(u64, ErrorCode, &'static str)>,
    disconnected: bool,
}

fn overlaps(off: u64, len: u64, bad: Option<(u64, u64)>) -> bool {
    bad.is_some_and(|(b, bl)| len > 0 && off < b + bl && b < off + len)
}

impl ServerSide {
    fn rand(&mut self) -> u64 {
        self.rng = self
            .rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.rng >> 33
    }

    /// Runs of (length, status) from `off` to the end of the disk, one
    /// granule at a time (aligned to absolute granule boundaries), merged.
    fn extents(&self, off: u64) -> Vec<(u64, u64)> {
        let size = self.disk.len() as u64;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut pos = off;
        while pos < size {
            let end = ((pos / self.granule) + 1) * self.granule;
            let end = end.min(size);
            let block = &self.disk[(pos - pos % self.granule) as usize..end as usize];
            let status = if block.iter().all(|b| *b == 0) {
                (AllocationFlags::HOLE | AllocationFlags::ZERO).bits() as u64
            } else {
                0
            };
            match runs.last_mut() {
                Some((l, s)) if *s == status => *l += end - pos,
                _ => runs.push((end - pos, status)),
            }
            pos = end;
        }
        runs
    }

    fn execute(&mut self, r: &ServerRequest, payload: Option<&[u8]>) -> Vec<u8> {
        let mut reply = Vec::new();
        let (off, len) = (r.offset as usize, r.length as usize);
        match r.command {
            Command::READ => {
                if overlaps(r.offset, r.length, self.bad) {
                    self.enc.reply_error(r, ErrorCode::EIO, "bad sector", &mut reply);
                    return reply;
                }
                let data = self.disk[off..off + len].to_vec();
                let sparse = self.enc.mode().structured()
                    && !r.flags.contains(CommandFlags::DF)
                    && self.rand().is_multiple_of(2);
                if !sparse || len == 0 {
                    reply.extend_from_slice(self.enc.read_reply_header(r).unwrap().as_bytes());
                    reply.extend_from_slice(&data);
                    return reply;
                }
                // Sparse: holes for zero granules, data for the rest, sent
                // in reverse order, then a NONE chunk.
                let mut chunks = Vec::new();
                let mut pos = r.offset;
                let end = r.offset + r.length;
                while pos < end {
                    let stop = (((pos / self.granule) + 1) * self.granule).min(end);
                    let zero = self.disk[pos as usize..stop as usize].iter().all(|b| *b == 0);
                    let mut chunk = Vec::new();
                    if zero {
                        chunk.extend_from_slice(self.enc.hole_chunk(r, pos, stop - pos, false).unwrap().as_bytes());
                    } else {
                        chunk.extend_from_slice(
                            self.enc
                                .offset_data_header(r, pos, stop - pos, false)
                                .unwrap()
                                .as_bytes(),
                        );
                        chunk.extend_from_slice(&self.disk[pos as usize..stop as usize]);
                    }
                    chunks.push(chunk);
                    pos = stop;
                }
                for c in chunks.into_iter().rev() {
                    reply.extend(c);
                }
                reply.extend_from_slice(self.enc.reply_ok(r).as_bytes());
            }
            Command::WRITE => {
                if overlaps(r.offset, r.length, self.bad) {
                    self.enc.reply_error(r, ErrorCode::EIO, "bad sector", &mut reply);
                    return reply;
                }
                let payload = payload.unwrap_or(&[]);
                assert_eq!(payload.len(), len);
                self.disk[off..off + len].copy_from_slice(payload);
                reply.extend_from_slice(self.enc.reply_ok(r).as_bytes());
            }
            Command::TRIM => {
                self.disk[off..off + len].fill(0);
                reply.extend_from_slice(self.enc.reply_ok(r).as_bytes());
            }
            Command::WRITE_ZEROES => {
                if r.flags.contains(CommandFlags::FAST_ZERO) && !self.fast_zero_works {
                    self.enc
                        .reply_error(r, ErrorCode::ENOTSUP, "fast zero not possible", &mut reply);
                    return reply;
                }
                self.disk[off..off + len].fill(0);
                reply.extend_from_slice(self.enc.reply_ok(r).as_bytes());
            }
            Command::FLUSH | Command::CACHE => reply.extend_from_slice(self.enc.reply_ok(r).as_bytes()),
            Command::BLOCK_STATUS => {
                let extents = self.extents(r.offset);
                let ids: Vec<u32> = self.tx.selected_contexts(r).map(|c| c.id).collect();
                assert!(!ids.is_empty());
                for (i, id) in ids.iter().enumerate() {
                    self.out.clear();
                    self.enc
                        .block_status_chunk(r, *id, extents.iter().copied(), i + 1 == ids.len(), &mut self.out)
                        .unwrap();
                    reply.extend_from_slice(&self.out);
                }
            }
            other => panic!("server accepted {other}"),
        }
        reply
    }

    /// Serves everything the client sent; returns one reply blob per request.
    fn serve(&mut self, c2s: &mut VecDeque<u8>) -> Vec<Vec<u8>> {
        let mut replies = Vec::new();
        loop {
            match self.tx.next() {
                ServerReceive::Bytes(n) => {
                    if c2s.len() < n {
                        break;
                    }
                    let bytes = take(c2s, n);
                    match self.tx.handle_bytes(&bytes).unwrap() {
                        RequestEvent::Continue => {}
                        RequestEvent::Request(r) => {
                            if r.command == Command::WRITE && r.length > 0 {
                                self.pending_write = Some(r);
                            } else {
                                replies.push(self.execute(&r, None));
                            }
                        }
                        RequestEvent::Reject { request, error, reason } => {
                            self.rejects.push((request.cookie, error, reason));
                            let mut reply = Vec::new();
                            self.enc.reply_error(&request, error, reason, &mut reply);
                            replies.push(reply);
                        }
                        RequestEvent::Disconnect => self.disconnected = true,
                    }
                }
                ServerReceive::Payload { cookie, length } => {
                    let r = self.pending_write.take().unwrap();
                    assert_eq!(r.cookie, cookie);
                    let data = take(c2s, length as usize);
                    self.tx.payload_received().unwrap();
                    replies.push(self.execute(&r, Some(&data)));
                }
                ServerReceive::Discard(n) => {
                    take(c2s, n as usize);
                    self.tx.discarded().unwrap();
                }
                ServerReceive::Closed => break,
            }
        }
        replies
    }

    /// What the server would say to this request, without the client.
    fn verdict(&self, setup: &Setup, req: &Request) -> Option<Result<(), ErrorCode>> {
        let extended = self.enc.mode().extended();
        let mut flags = req.flags;
        let header = if extended {
            if req.command == Command::WRITE {
                flags |= CommandFlags::PAYLOAD_LEN;
            }
            ExtendedRequestHeader {
                magic: EXTENDED_REQUEST_MAGIC.into(),
                flags: flags.bits().into(),
                command: req.command.0.into(),
                cookie: 1.into(),
                offset: req.offset.into(),
                length: req.length.into(),
            }
            .as_bytes()
            .to_vec()
        } else {
            let length = u32::try_from(req.length).ok()?;
            RequestHeader {
                magic: REQUEST_MAGIC.into(),
                flags: flags.bits().into(),
                command: req.command.0.into(),
                cookie: 1.into(),
                offset: req.offset.into(),
                length: length.into(),
            }
            .as_bytes()
            .to_vec()
        };
        let _ = setup;
        let mut probe = self.tx.clone();
        match probe.handle_bytes(&header) {
            Ok(RequestEvent::Request(_)) => Some(Ok(())),
            Ok(RequestEvent::Reject { error, .. }) => Some(Err(error)),
            Ok(_) => None,
            Err(_) => Some(Err(ErrorCode::EINVAL)),
        }
    }
}

// ---------------------------------------------------------------------------
// The client driver of the test
// ---------------------------------------------------------------------------

#[derive(Debug)]
enum Expect {
    Ok,
    Err(ErrorCode),
    Read(Vec<u8>),
    /// Model bytes from the request offset to the end of the export.
    BlockStatus {
        snapshot: Vec<u8>,
        len: u64,
        req_one: bool,
    },
}

struct Pending {
    command: Command,
    buf: Vec<u8>,
    expect: Expect,
    extents: Vec<(u32, Vec<(u64, u64)>)>,
    done: Option<Result<(), ErrorCode>>,
}

fn client_receive(tx: &mut ClientTransmission, s2c: &mut VecDeque<u8>, pending: &mut HashMap<Cookie, Pending>) {
    fn done(pending: &mut HashMap<Cookie, Pending>, ev: ReplyEvent<'_>) {
        match ev {
            ReplyEvent::Nothing => {}
            ReplyEvent::Hole {
                cookie,
                buf_offset,
                length,
            } => {
                let p = pending.get_mut(&cookie).unwrap();
                p.buf[buf_offset as usize..(buf_offset + length) as usize].fill(0);
            }
            ReplyEvent::BlockStatus {
                cookie,
                context_id,
                extents,
            } => {
                let p = pending.get_mut(&cookie).unwrap();
                p.extents
                    .push((context_id, extents.map(|e| (e.length, e.flags)).collect()));
            }
            ReplyEvent::Done {
                cookie,
                command,
                result,
            } => {
                let p = pending.get_mut(&cookie).unwrap();
                assert_eq!(p.command, command);
                assert!(p.done.is_none(), "completed twice");
                p.done = Some(result.map_err(|e| e.code));
            }
        }
    }
    loop {
        match tx.next() {
            ReceiveNext::Bytes(n) => {
                if s2c.len() < n || (n == 0 && tx.is_failed()) {
                    break;
                }
                let bytes = take(s2c, n);
                let ev = tx.handle_bytes(&bytes).unwrap();
                done(pending, ev);
            }
            ReceiveNext::Data {
                cookie,
                buf_offset,
                length,
            } => {
                let data = take(s2c, length as usize);
                let p = pending.get_mut(&cookie).unwrap();
                p.buf[buf_offset as usize..(buf_offset + length) as usize].copy_from_slice(&data);
                let ev = tx.data_received().unwrap();
                done(pending, ev);
            }
            ReceiveNext::Complete => {
                let ev = tx.complete_pending().unwrap();
                done(pending, ev);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The model run
// ---------------------------------------------------------------------------

fn run(setup: &Setup, ops: &[Op]) {
    let export = setup.export();
    let (scfg, ccfg) = setup.configs();
    let (client, server) = handshake(scfg, ccfg, &export);

    // A GO without NBD_INFO_BLOCK_SIZE for an export that requires it.
    if setup.negotiates_block_size() && setup.block_size_required && !setup.request_block_size {
        match client {
            Some(Err(HandshakeError::Refused(e))) => assert_eq!(e.reply, ReplyType::ERR_BLOCK_SIZE_REQD),
            other => panic!("expected ERR_BLOCK_SIZE_REQD, got {other:?}"),
        }
        assert!(server.is_none());
        return;
    }
    let client = client.expect("client finished").expect("client handshake");
    let server = server.expect("server finished").expect("server handshake");

    // Both sides agree.
    let mode = setup.expected_mode();
    assert_eq!(client.mode, mode);
    assert_eq!(server.mode, mode);
    assert_eq!(client.size, server.size);
    assert_eq!(client.flags, server.flags);
    assert_eq!(client.block_size, server.block_size);
    assert_eq!(client.contexts, server.contexts);
    assert_eq!(client.tls, server.tls);
    assert_eq!(client.tls, setup.tls && setup.flavour != Flavour::Oldstyle);
    if mode.structured() {
        assert_eq!(
            server.contexts,
            vec![MetaContext {
                id: 1,
                name: CONTEXT_BASE_ALLOCATION.to_string()
            }]
        );
        assert!(server.flags.contains(TransmissionFlags::SEND_DF));
    } else {
        assert!(server.contexts.is_empty());
        assert!(!server.flags.contains(TransmissionFlags::SEND_DF));
    }
    assert_eq!(
        server.client_requested_block_size,
        setup.request_block_size && setup.negotiates_block_size()
    );

    let mut ctx = ClientTransmission::new(&client, 64);
    let stx = ServerTransmission::new(&server);
    let mut srv = ServerSide {
        enc: stx.encoder(),
        tx: stx,
        disk: vec![0; setup.size() as usize],
        granule: setup.granule(),
        bad: setup.bad_range(),
        fast_zero_works: setup.fast_zero_works,
        rng: setup.seed,
        out: Vec::new(),
        pending_write: None,
        rejects: Vec::new(),
        disconnected: false,
    };
    let mut model = vec![0u8; setup.size() as usize];
    let mut pipe = Pipe::default();
    let mut rng = setup.seed ^ 0x9e37_79b9_7f4a_7c15;

    let mut batches: Vec<&[Op]> = Vec::new();
    let mut start = 0;
    for i in 1..=ops.len() {
        if i == ops.len() || ops[i].new_batch || i - start >= 16 {
            batches.push(&ops[start..i]);
            start = i;
        }
    }

    for batch in batches {
        let mut pending: HashMap<Cookie, Pending> = HashMap::new();
        for op in batch {
            let req = op.request(setup);
            let verdict = srv.verdict(setup, &req);
            let (cookie, header) = match ctx.start_request(req) {
                Ok(x) => x,
                Err(e) => {
                    // The client refused: the server would have refused too,
                    // except where the client is stricter by design.
                    let stricter = matches!(e, RequestError::ZeroLength(_));
                    if !stricter {
                        assert!(
                            !matches!(verdict, Some(Ok(()))),
                            "client refused {req:?} ({e}) which the server accepts"
                        );
                    }
                    continue;
                }
            };
            // The client accepted: the server must too.
            assert_eq!(verdict, Some(Ok(())), "server refuses {req:?} which the client sent");
            pipe.c2s.extend(header.as_bytes());
            let (off, len) = (req.offset as usize, req.length as usize);
            let bad = overlaps(req.offset, req.length, setup.bad_range());
            let expect = match req.command {
                Command::READ if bad => Expect::Err(ErrorCode::EIO),
                Command::READ => Expect::Read(model[off..off + len].to_vec()),
                Command::WRITE => {
                    let data: Vec<u8> = (0..len).map(|i| op.fill.wrapping_add(i as u8)).collect();
                    pipe.c2s.extend(&data);
                    if bad {
                        Expect::Err(ErrorCode::EIO)
                    } else {
                        model[off..off + len].copy_from_slice(&data);
                        Expect::Ok
                    }
                }
                Command::TRIM => {
                    model[off..off + len].fill(0);
                    Expect::Ok
                }
                Command::WRITE_ZEROES => {
                    if req.flags.contains(CommandFlags::FAST_ZERO) && !setup.fast_zero_works {
                        Expect::Err(ErrorCode::ENOTSUP)
                    } else {
                        model[off..off + len].fill(0);
                        Expect::Ok
                    }
                }
                Command::BLOCK_STATUS => Expect::BlockStatus {
                    snapshot: model[off..].to_vec(),
                    len: req.length,
                    req_one: req.flags.contains(CommandFlags::REQ_ONE),
                },
                _ => Expect::Ok,
            };
            pending.insert(
                cookie,
                Pending {
                    command: req.command,
                    buf: vec![0xA5; len.min(1 << 20)],
                    expect,
                    extents: Vec::new(),
                    done: None,
                },
            );
        }

        // The server answers everything, in a random order.
        let mut replies = srv.serve(&mut pipe.c2s);
        assert!(pipe.c2s.is_empty(), "server left request bytes unread");
        assert!(srv.rejects.is_empty(), "server rejected {:?}", srv.rejects);
        assert_eq!(replies.len(), pending.len());
        for i in (1..replies.len()).rev() {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1);
            replies.swap(i, (rng >> 33) as usize % (i + 1));
        }
        for r in replies {
            pipe.s2c.extend(r);
        }
        client_receive(&mut ctx, &mut pipe.s2c, &mut pending);
        assert!(pipe.s2c.is_empty(), "client left reply bytes unread");
        assert_eq!(ctx.in_flight(), 0);

        for (cookie, p) in pending {
            let result = p.done.unwrap_or_else(|| panic!("{cookie:?} never completed"));
            match p.expect {
                Expect::Ok => assert_eq!(result, Ok(()), "{:?}", p.command),
                Expect::Err(code) => assert_eq!(result, Err(code), "{:?}", p.command),
                Expect::Read(want) => {
                    assert_eq!(result, Ok(()));
                    assert!(p.buf == want, "read returned other data than the model holds");
                }
                Expect::BlockStatus { snapshot, len, req_one } => {
                    assert_eq!(result, Ok(()));
                    assert_eq!(p.extents.len(), 1);
                    let (id, extents) = &p.extents[0];
                    assert_eq!(*id, 1);
                    assert!(!extents.is_empty());
                    if req_one {
                        assert_eq!(extents.len(), 1);
                        assert!(extents[0].0 <= len);
                    }
                    let mut pos = 0u64;
                    for (i, (l, flags)) in extents.iter().enumerate() {
                        assert!(*l > 0);
                        if i + 1 < extents.len() {
                            assert!(pos + l < len || i + 1 == extents.len());
                        }
                        let end = (pos + l).min(snapshot.len() as u64);
                        if flags & AllocationFlags::ZERO.bits() as u64 != 0 {
                            assert!(
                                snapshot[pos as usize..end as usize].iter().all(|b| *b == 0),
                                "block status claims zeroes over data"
                            );
                        }
                        pos += l;
                    }
                    assert!(pos <= snapshot.len() as u64, "extents past the end of the export");
                }
            }
        }
    }

    // Soft disconnect.
    let (_, header) = ctx.start_request(Request::new(Command::DISC, 0, 0)).unwrap();
    pipe.c2s.extend(header.as_bytes());
    assert!(srv.serve(&mut pipe.c2s).is_empty());
    assert!(srv.disconnected);
    assert_eq!(srv.tx.next(), ServerReceive::Closed);
    assert_eq!(srv.disk, model);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn client_against_server(setup in setup_strategy(), ops in proptest::collection::vec(op_strategy(), 0..60)) {
        run(&setup, &ops);
    }
}

// ---------------------------------------------------------------------------
// Handshake interoperation beyond the automatic path
// ---------------------------------------------------------------------------

fn disk() -> ExportDetails {
    let mut d = ExportDetails::new("disk", 1 << 20);
    d.description = "the disk".to_string();
    d.meta_contexts.push("qemu:allocation-depth".to_string());
    d
}

#[test]
fn every_flavour_negotiates() {
    for flavour in [
        Flavour::Oldstyle,
        Flavour::ExportNameOnly,
        Flavour::Simple,
        Flavour::Structured,
        Flavour::Extended,
    ] {
        for tls in [false, true] {
            let setup = Setup {
                flavour,
                blocks: 8,
                min_block: Some(512),
                max_payload: 8192,
                read_only: false,
                flush: true,
                fua: true,
                trim: true,
                zeroes: true,
                fast_zero: true,
                cache: true,
                no_zeroes: tls,
                tls,
                request_block_size: true,
                block_size_required: false,
                fast_zero_works: false,
                bad_block: Some(3),
                seed: 7,
            };
            let ops: Vec<Op> = (0..40u64)
                .map(|i| Op {
                    kind: (i % 10) as u8,
                    off: i * 777,
                    len: 512 * (i % 5),
                    aligned: true,
                    flags: [i % 2 == 0, i % 3 == 0, i % 4 == 0, i % 5 == 0],
                    weird: false,
                    fill: i as u8 + 1,
                    new_batch: i % 7 == 0,
                })
                .collect();
            run(&setup, &ops);
        }
    }
}

#[test]
fn option_mode_interop() {
    let export = disk();
    let ccfg = ClientConfig::default().opt_mode(true);
    let mut sides = Sides::new(ServerConfig::default(), ccfg);
    sides.pump(&export);
    let outcome = |sides: &mut Sides| {
        sides.pump(&export);
        sides.client.as_mut().unwrap().take_outcome().unwrap()
    };

    sides.client.as_mut().unwrap().opt_list().unwrap();
    let got = outcome(&mut sides);
    let OptionOutcome::List(list) = got else {
        panic!("{got:?}")
    };
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].name, "disk");
    assert_eq!(list[0].description.as_deref(), Some("the disk"));
    assert_eq!(list[1].description, None);

    sides.client.as_mut().unwrap().opt_info("disk").unwrap();
    let got = outcome(&mut sides);
    let OptionOutcome::Info(info) = got else {
        panic!("{got:?}")
    };
    assert_eq!(info.size, 1 << 20);
    assert_eq!(info.canonical_name.as_deref(), Some("disk"));
    assert_eq!(info.description.as_deref(), Some("the disk"));
    assert_eq!(info.block_size, Some(BlockSizeConstraints::default()));

    sides.client.as_mut().unwrap().opt_info("nope").unwrap();
    let got = outcome(&mut sides);
    let OptionOutcome::Refused(e) = got else {
        panic!("{got:?}")
    };
    assert_eq!(e.reply, ReplyType::ERR_UNKNOWN);
    assert_eq!(e.message, "unknown export");

    sides
        .client
        .as_mut()
        .unwrap()
        .opt_list_meta_context("disk", &[])
        .unwrap();
    let got = outcome(&mut sides);
    let OptionOutcome::MetaContexts(list) = got else {
        panic!("{got:?}")
    };
    let names: Vec<&str> = list.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["base:allocation", "qemu:allocation-depth"]);

    sides
        .client
        .as_mut()
        .unwrap()
        .opt_list_meta_context("disk", &["base:"])
        .unwrap();
    let got = outcome(&mut sides);
    let OptionOutcome::MetaContexts(list) = got else {
        panic!("{got:?}")
    };
    assert_eq!(list.len(), 1);

    sides
        .client
        .as_mut()
        .unwrap()
        .opt_set_meta_context("disk", &["base:allocation", "qemu:allocation-depth", "x-no:such"])
        .unwrap();
    let got = outcome(&mut sides);
    let OptionOutcome::MetaContexts(list) = got else {
        panic!("{got:?}")
    };
    assert_eq!(list.len(), 2);

    // A repeated EXTENDED_HEADERS is refused, harmlessly.
    sides.client.as_mut().unwrap().opt_extended_headers().unwrap();
    let got = outcome(&mut sides);
    assert!(
        matches!(got, OptionOutcome::Refused(ref e) if e.reply == ReplyType::ERR_INVALID),
        "{got:?}"
    );

    sides.client.as_mut().unwrap().opt_go(Some("disk")).unwrap();
    sides.pump(&export);
    let client = sides.client_result.take().unwrap().unwrap();
    let server = sides.server_result.take().unwrap().unwrap();
    assert_eq!(client.mode, Mode::Extended);
    assert_eq!(client.contexts, server.contexts);
    assert_eq!(server.contexts.len(), 2);
    assert!(server.flags.contains(TransmissionFlags::SEND_DF));
}

#[test]
fn option_mode_abort() {
    let export = disk();
    let mut sides = Sides::new(ServerConfig::default(), ClientConfig::default().opt_mode(true));
    sides.pump(&export);
    sides.client.as_mut().unwrap().opt_abort().unwrap();
    sides.pump(&export);
    assert!(sides.client.is_none() && sides.server.is_none());
    assert!(sides.client_result.is_none() && sides.server_result.is_none());
    assert!(sides.pipe.c2s.is_empty() && sides.pipe.s2c.is_empty());
}

#[test]
fn forced_tls_refuses_clear_clients() {
    let scfg = ServerConfig::default().tls(TlsPolicy::ForcedTls);
    let (client, server) = handshake(scfg, ClientConfig::default(), &disk());
    assert!(
        matches!(client, Some(Err(HandshakeError::TlsRequired(_)))),
        "{client:?}"
    );
    assert!(server.is_none());

    // A client that merely allows TLS gets it.
    let scfg = ServerConfig::default().tls(TlsPolicy::ForcedTls);
    let ccfg = ClientConfig::default().tls(TlsMode::Allow);
    let (client, server) = handshake(scfg, ccfg, &disk());
    assert!(client.unwrap().unwrap().tls);
    assert!(server.unwrap().unwrap().tls);
}

#[test]
fn tls_required_by_client_but_unavailable() {
    let ccfg = ClientConfig::default().tls(TlsMode::Require);
    let (client, server) = handshake(ServerConfig::default(), ccfg, &disk());
    assert!(
        matches!(client, Some(Err(HandshakeError::TlsUnavailable(_)))),
        "{client:?}"
    );
    assert!(server.is_none());
}

#[test]
fn unknown_export_is_refused() {
    let ccfg = ClientConfig::default().export_name("missing");
    let (client, _) = handshake(ServerConfig::default(), ccfg, &disk());
    match client {
        Some(Err(HandshakeError::Refused(e))) => assert_eq!(e.reply, ReplyType::ERR_UNKNOWN),
        other => panic!("{other:?}"),
    }
    // With EXPORT_NAME the server can only hang up.
    let ccfg = ClientConfig::default()
        .export_name("missing")
        .structured_replies(false)
        .extended_headers(false);
    let scfg = ServerConfig::default().support_go(false);
    let (client, server) = handshake(scfg, ccfg, &disk());
    assert!(client.is_none(), "client still waiting for a reply that never comes");
    assert_eq!(
        server,
        Some(Err(ServerHandshakeError::UnknownExport("missing".to_string())))
    );
}

/// The client falls back from GO to EXPORT_NAME after structured replies
/// were negotiated, but then expects simple replies, while the spec makes
/// structured replies mandatory once negotiated (the server follows the
/// spec). See the report: `client/handshake.rs`, `Recv::ExportNameReply`.
#[test]
fn export_name_fallback_keeps_structured_replies() {
    let scfg = ServerConfig::default().support_go(false);
    let ccfg = ClientConfig::default()
        .extended_headers(false)
        .meta_contexts(Vec::new());
    let (client, server) = handshake(scfg, ccfg, &disk());
    let client = client.unwrap().unwrap();
    let server = server.unwrap().unwrap();
    assert_eq!(server.mode, Mode::Structured);
    assert_eq!(client.mode, server.mode);
}
