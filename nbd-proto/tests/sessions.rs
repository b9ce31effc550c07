//! The two sessions against each other, in memory: every way of taking
//! input (exact counts with payloads moved by the driver, whatever arrived
//! in pieces of any size, one byte at a time) must give the same
//! conversation, and a random sequence of requests must leave the export
//! as a model of it says. STARTTLS is never over-read, option mode works
//! through the session, and arbitrary bytes never make a session panic.

use std::collections::HashMap;
use std::time::Duration;

use nbd_proto::client::{
    ClientConfig, ClientEvent, ClientNeed, ClientSession, ClientSessionError, Cookie, OptionOutcome, Request,
    RequestError, TlsMode,
};
use nbd_proto::common::Mode;
use nbd_proto::server::{
    ExportDetails, ExportListing, ExportLookup, ServerConfig, ServerEvent, ServerNeed, ServerRequest, ServerSession,
    TlsPolicy,
};
use nbd_proto::time::{Deadline, TimedOut, Timestamp};
use nbd_proto::wire::{CONTEXT_BASE_ALLOCATION, Command, CommandFlags, ErrorCode, TransmissionFlags};
use proptest::prelude::*;

const SIZE: u64 = 256 * 1024;
const BLOCK: u64 = 4096;

/// Two exports: "disk" (the default, writable) and "ro" (read-only).
struct Exports;

impl ExportLookup for Exports {
    type Export = &'static str;
    fn lookup(&self, name: &str) -> Option<(ExportDetails, &'static str)> {
        let mut d = ExportDetails::new(name, SIZE);
        d.flags |= TransmissionFlags::SEND_TRIM | TransmissionFlags::SEND_WRITE_ZEROES;
        match name {
            "disk" => Some((d, "disk")),
            "ro" => {
                d.flags |= TransmissionFlags::READ_ONLY;
                Some((d, "ro"))
            }
            _ => None,
        }
    }
    fn default_export(&self) -> Option<(ExportDetails, &'static str)> {
        self.lookup("disk")
    }
    fn list(&self, each: &mut dyn FnMut(ExportListing<'_>)) {
        each(ExportListing {
            name: "disk",
            description: "the disk",
            tls_only: false,
        });
        each(ExportListing {
            name: "ro",
            description: "",
            tls_only: false,
        });
    }
}

/// How a driver takes its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Feeding {
    /// Exactly the counts `need` gives; payloads moved by the driver.
    Exact,
    /// Whatever arrived, in pieces of at most this many bytes, all fed.
    Chunks(usize),
}

fn feeding() -> impl Strategy<Value = Feeding> {
    prop_oneof![
        Just(Feeding::Exact),
        Just(Feeding::Chunks(1)),
        (2usize..64).prop_map(Feeding::Chunks),
        (64usize..20_000).prop_map(Feeding::Chunks),
    ]
}

/// A server event with its data copied out of the session's borrow.
#[derive(Debug)]
enum Srv {
    Ready,
    Aborted,
    Request(ServerRequest),
    WriteData(ServerRequest, u64, Vec<u8>, bool),
    Reject(ServerRequest, ErrorCode, &'static str),
    Disconnect,
}

fn own_server(ev: ServerEvent<'_>) -> Srv {
    match ev {
        ServerEvent::Ready => Srv::Ready,
        ServerEvent::Aborted => Srv::Aborted,
        ServerEvent::Request(r) => Srv::Request(r),
        ServerEvent::WriteData {
            request,
            offset,
            data,
            last,
        } => Srv::WriteData(request, offset, data.to_vec(), last),
        ServerEvent::Reject { request, error, reason } => Srv::Reject(request, error, reason),
        ServerEvent::Disconnect => Srv::Disconnect,
        other => panic!("unexpected server event {other:?}"),
    }
}

/// A client event with its data copied out of the session's borrow.
#[derive(Debug)]
enum Cli {
    Connected,
    OptionDone(OptionOutcome),
    Aborted,
    Data(Cookie, u64, Vec<u8>),
    Hole(Cookie, u64, u64),
    Status(Cookie, u32, Vec<(u64, u64)>),
    Done(Cookie, Result<(), ErrorCode>),
}

fn own_client(ev: ClientEvent<'_>) -> Cli {
    match ev {
        ClientEvent::Connected => Cli::Connected,
        ClientEvent::OptionDone(o) => Cli::OptionDone(o),
        ClientEvent::Aborted => Cli::Aborted,
        ClientEvent::Data {
            cookie,
            buf_offset,
            data,
            ..
        } => Cli::Data(cookie, buf_offset, data.to_vec()),
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
        ClientEvent::Done { cookie, result, .. } => Cli::Done(cookie, result.map_err(|e| e.code)),
        other => panic!("unexpected client event {other:?}"),
    }
}

/// The server's driver: storage is a Vec; blocks never written are holes.
struct ServerSide {
    session: ServerSession<Exports>,
    data: Vec<u8>,
    written: Vec<bool>,
    feeding: Feeding,
    inbox: Vec<u8>,
    out: Vec<u8>,
    tls_started: bool,
    disconnected: bool,
}

impl ServerSide {
    fn new(config: ServerConfig, feeding: Feeding) -> ServerSide {
        ServerSide {
            session: ServerSession::new(config, Exports),
            data: vec![0; SIZE as usize],
            written: vec![false; (SIZE / BLOCK) as usize],
            feeding,
            inbox: Vec::new(),
            out: Vec::new(),
            tls_started: false,
            disconnected: false,
        }
    }

    fn store(&mut self, offset: u64, bytes: &[u8]) {
        let o = offset as usize;
        self.data[o..o + bytes.len()].copy_from_slice(bytes);
        for b in offset / BLOCK..(offset + bytes.len() as u64).div_ceil(BLOCK) {
            self.written[b as usize] = true;
        }
    }

    fn execute(&mut self, req: ServerRequest) {
        let enc = self.session.encoder().expect("an encoder in transmission");
        let (o, l) = (req.offset as usize, req.length as usize);
        match req.command {
            Command::READ => {
                if enc.mode().structured() && !req.flags.contains(CommandFlags::DF) && l > 0 {
                    // Holes as OFFSET_HOLE and data as OFFSET_DATA, a block at a time.
                    let end = req.offset + req.length;
                    let mut off = req.offset;
                    while off < end {
                        let n = (BLOCK - off % BLOCK).min(end - off);
                        if self.written[(off / BLOCK) as usize] {
                            let h = enc.offset_data_header(&req, off, n, false).unwrap();
                            self.out.extend_from_slice(h.as_bytes());
                            self.out.extend_from_slice(&self.data[off as usize..(off + n) as usize]);
                        } else {
                            let h = enc.hole_chunk(&req, off, n, false).unwrap();
                            self.out.extend_from_slice(h.as_bytes());
                        }
                        off += n;
                    }
                    self.out.extend_from_slice(enc.reply_ok(&req).as_bytes());
                } else {
                    let h = enc.read_reply_header(&req).unwrap();
                    self.out.extend_from_slice(h.as_bytes());
                    self.out.extend_from_slice(&self.data[o..o + l]);
                }
            }
            Command::WRITE => self.out.extend_from_slice(enc.reply_ok(&req).as_bytes()),
            Command::WRITE_ZEROES | Command::TRIM => {
                self.data[o..o + l].fill(0);
                self.out.extend_from_slice(enc.reply_ok(&req).as_bytes());
            }
            Command::FLUSH | Command::CACHE => self.out.extend_from_slice(enc.reply_ok(&req).as_bytes()),
            Command::BLOCK_STATUS => {
                let ids: Vec<u32> = self.session.selected_contexts(&req).map(|(_, c)| c.id).collect();
                for (k, id) in ids.iter().enumerate() {
                    let first = (req.offset / BLOCK) as usize;
                    let written = self.written.clone();
                    let extents = (first..written.len()).map(|b| {
                        let start = (b as u64 * BLOCK).max(req.offset);
                        (b as u64 * BLOCK + BLOCK - start, if written[b] { 0 } else { 3 })
                    });
                    enc.block_status_chunk(&req, *id, extents, k + 1 == ids.len(), &mut self.out)
                        .unwrap();
                }
            }
            c => panic!("unexpected command {c}"),
        }
    }

    fn handle(&mut self, ev: Srv) {
        match ev {
            Srv::Ready | Srv::Aborted => {}
            Srv::Request(r) if r.command == Command::WRITE && r.length > 0 => {} // payload follows
            Srv::Request(r) => self.execute(r),
            Srv::WriteData(req, off, data, last) => {
                self.store(req.offset + off, &data);
                if last {
                    self.write_done(req);
                }
            }
            Srv::Reject(req, error, reason) => {
                let enc = self.session.encoder().unwrap();
                enc.reply_error(&req, error, reason, &mut self.out);
            }
            Srv::Disconnect => self.disconnected = true,
        }
    }

    fn write_done(&mut self, req: ServerRequest) {
        let enc = self.session.encoder().unwrap();
        self.out.extend_from_slice(enc.reply_ok(&req).as_bytes());
    }

    /// Takes what it can from the inbox.
    fn pump(&mut self) {
        loop {
            while self.session.poll_transmit(&mut self.out).is_some() {}
            match (self.session.need(), self.feeding) {
                (ServerNeed::StartTls(t), _) => {
                    // The transport stays the same in this test; what matters
                    // is that nothing after STARTTLS was consumed.
                    t.established().unwrap();
                    self.tls_started = true;
                }
                (ServerNeed::Closed, _) => return,
                (
                    ServerNeed::Payload {
                        request,
                        offset,
                        length,
                    },
                    Feeding::Exact,
                ) => {
                    let n = (length as usize).min(self.inbox.len());
                    if n == 0 {
                        return;
                    }
                    let bytes: Vec<u8> = self.inbox.drain(..n).collect();
                    self.store(request.offset + offset, &bytes);
                    if self.session.payload_received(n as u64).unwrap() {
                        self.write_done(request);
                    }
                }
                (ServerNeed::Discard(n), Feeding::Exact) => {
                    let n = (n as usize).min(self.inbox.len());
                    if n == 0 {
                        return;
                    }
                    self.inbox.drain(..n);
                    self.session.discarded(n as u64).unwrap();
                }
                (ServerNeed::Bytes(n), Feeding::Exact) => {
                    if self.inbox.len() < n || n == 0 {
                        return;
                    }
                    let unit: Vec<u8> = self.inbox.drain(..n).collect();
                    // An exact count is consumed whole (Ready may come first).
                    let mut used = 0;
                    loop {
                        let (k, ev) = self.session.feed(&unit[used..]).unwrap();
                        used += k;
                        match ev.map(own_server) {
                            Some(ev) => self.handle(ev),
                            None if k == 0 => break,
                            None => {}
                        }
                    }
                    assert_eq!(used, n, "an exact count is consumed whole");
                }
                (_, Feeding::Chunks(k)) => {
                    if self.inbox.is_empty() {
                        return;
                    }
                    let chunk: Vec<u8> = self.inbox.drain(..k.min(self.inbox.len())).collect();
                    let mut rest: &[u8] = &chunk;
                    loop {
                        let (used, ev) = self.session.feed(rest).unwrap();
                        rest = &rest[used..];
                        match ev.map(own_server) {
                            Some(ev) => self.handle(ev),
                            None if used == 0 => break,
                            None => {}
                        }
                        while self.session.poll_transmit(&mut self.out).is_some() {}
                    }
                    if !rest.is_empty() {
                        // Stopped at STARTTLS: the rest belongs to the next layer.
                        let mut back = rest.to_vec();
                        back.extend_from_slice(&self.inbox);
                        self.inbox = back;
                        if !matches!(self.session.need(), ServerNeed::StartTls(_)) {
                            return;
                        }
                    }
                }
                (other, _) => panic!("unexpected need {other:?}"),
            }
        }
    }
}

/// The client's driver: a buffer per cookie, moved by hand on the exact path.
struct ClientSide {
    session: ClientSession,
    feeding: Feeding,
    inbox: Vec<u8>,
    out: Vec<u8>,
    /// READ destinations and WRITE sources by cookie.
    bufs: HashMap<Cookie, Vec<u8>>,
    done: HashMap<Cookie, Result<(), ErrorCode>>,
    status: HashMap<Cookie, Vec<(u64, u64)>>,
    outcomes: Vec<OptionOutcome>,
    connected: bool,
    aborted: bool,
    tls_started: bool,
}

impl ClientSide {
    fn new(config: ClientConfig, feeding: Feeding) -> ClientSide {
        ClientSide {
            session: ClientSession::new(config),
            feeding,
            inbox: Vec::new(),
            out: Vec::new(),
            bufs: HashMap::new(),
            done: HashMap::new(),
            status: HashMap::new(),
            outcomes: Vec::new(),
            connected: false,
            aborted: false,
            tls_started: false,
        }
    }

    fn transmit(&mut self) {
        while let Some(t) = self.session.poll_transmit(&mut self.out) {
            if let Some(p) = t.payload {
                let data = &self.bufs[&p.cookie];
                assert_eq!(data.len() as u64, p.length);
                self.out.extend_from_slice(data);
            }
        }
    }

    fn handle(&mut self, ev: Cli) {
        match ev {
            Cli::Connected => self.connected = true,
            Cli::OptionDone(o) => self.outcomes.push(o),
            Cli::Aborted => self.aborted = true,
            Cli::Data(c, at, data) => {
                let b = self.bufs.get_mut(&c).expect("data for a known cookie");
                b[at as usize..at as usize + data.len()].copy_from_slice(&data);
            }
            Cli::Hole(c, at, len) => {
                let b = self.bufs.get_mut(&c).expect("a hole for a known cookie");
                b[at as usize..(at + len) as usize].fill(0);
            }
            Cli::Status(c, id, ext) => {
                let known = self.session.contexts().iter().any(|m| m.id == id);
                assert!(known, "extents for a negotiated context");
                self.status.entry(c).or_default().extend(ext)
            }
            Cli::Done(c, r) => {
                assert!(self.done.insert(c, r).is_none(), "one completion per cookie");
            }
        }
    }

    fn pump(&mut self) {
        loop {
            self.transmit();
            match (self.session.need(), self.feeding) {
                (ClientNeed::StartTls(t), _) => {
                    t.established().unwrap();
                    self.tls_started = true;
                }
                (ClientNeed::Closed | ClientNeed::Negotiating, _) => return,
                (ClientNeed::Pending, _) => {
                    let (used, ev) = self.session.feed(&[]).unwrap();
                    assert_eq!(used, 0);
                    let ev = ev.map(own_client).expect("Pending gives an event");
                    self.handle(ev);
                }
                (
                    ClientNeed::Data {
                        cookie,
                        buf_offset,
                        length,
                        ..
                    },
                    Feeding::Exact,
                ) => {
                    let n = (length as usize).min(self.inbox.len());
                    if n == 0 {
                        return;
                    }
                    let at = buf_offset as usize;
                    let b = self.bufs.get_mut(&cookie).unwrap();
                    b[at..at + n].copy_from_slice(&self.inbox[..n]);
                    self.inbox.drain(..n);
                    if let Some(ev) = self.session.data_received(n as u64).unwrap() {
                        let ev = own_client(ev);
                        self.handle(ev);
                    }
                }
                (ClientNeed::Bytes(n), Feeding::Exact) => {
                    if self.inbox.len() < n || n == 0 {
                        return;
                    }
                    let unit: Vec<u8> = self.inbox.drain(..n).collect();
                    let (used, ev) = self.session.feed(&unit).unwrap();
                    assert_eq!(used, n, "an exact count is consumed whole");
                    if let Some(ev) = ev.map(own_client) {
                        self.handle(ev);
                    }
                }
                (ClientNeed::Idle, Feeding::Exact) => return,
                (_, Feeding::Chunks(k)) => {
                    if self.inbox.is_empty() {
                        return;
                    }
                    let chunk: Vec<u8> = self.inbox.drain(..k.min(self.inbox.len())).collect();
                    let mut rest: &[u8] = &chunk;
                    loop {
                        let (used, ev) = self.session.feed(rest).unwrap();
                        rest = &rest[used..];
                        match ev.map(own_client) {
                            Some(ev) => self.handle(ev),
                            None if used == 0 => break,
                            None => {}
                        }
                    }
                    if !rest.is_empty() {
                        let mut back = rest.to_vec();
                        back.extend_from_slice(&self.inbox);
                        self.inbox = back;
                        if !matches!(self.session.need(), ClientNeed::StartTls(_)) {
                            return;
                        }
                    }
                }
                (other, _) => panic!("unexpected need {other:?}"),
            }
        }
    }
}

/// Moves bytes both ways until neither side makes progress.
fn run(c: &mut ClientSide, s: &mut ServerSide) {
    for _ in 0..100_000 {
        c.pump();
        s.pump();
        let moved = !c.out.is_empty() || !s.out.is_empty();
        s.inbox.append(&mut c.out);
        c.inbox.append(&mut s.out);
        if !moved {
            c.pump();
            s.pump();
            if c.out.is_empty() && s.out.is_empty() {
                return;
            }
        }
    }
    panic!("the conversation did not settle");
}

fn connect(cfg: ClientConfig, cf: Feeding, scfg: ServerConfig, sf: Feeding) -> (ClientSide, ServerSide) {
    let mut c = ClientSide::new(cfg, cf);
    let mut s = ServerSide::new(scfg, sf);
    run(&mut c, &mut s);
    (c, s)
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, Vec<u8>),
    Read(u64, u64),
    Zero(u64, u64),
    Trim(u64, u64),
    Flush,
    Status(u64, u64),
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..SIZE / 512, 1u64..64).prop_map(|(b, n)| (b * 512, (n * 512).min(SIZE - b * 512)));
    prop_oneof![
        (range.clone(), any::<u8>()).prop_map(|((o, l), seed)| {
            Op::Write(
                o,
                (0..l).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect(),
            )
        }),
        range.clone().prop_map(|(o, l)| Op::Read(o, l)),
        range.clone().prop_map(|(o, l)| Op::Zero(o, l)),
        range.clone().prop_map(|(o, l)| Op::Trim(o, l)),
        Just(Op::Flush),
        range.prop_map(|(o, l)| Op::Status(o, l)),
    ]
}

fn modes() -> impl Strategy<Value = (bool, bool)> {
    // (structured replies, extended headers) asked by the client
    prop_oneof![Just((false, false)), Just((true, false)), Just((true, true))]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Random requests in flight at once, every way of feeding on both
    /// sides, every protocol flavour: the export ends up as the model
    /// says and every read returns what the model holds.
    #[test]
    fn requests_against_a_model(
        ops in proptest::collection::vec(op(), 1..24),
        cf in feeding(),
        sf in feeding(),
        (structured, extended) in modes(),
        batch in 1usize..8,
    ) {
        let cfg = ClientConfig::default().export_name(String::new()).structured_replies(structured).extended_headers(extended);
        let (mut c, mut s) = connect(cfg, cf, ServerConfig::default(), sf);
        prop_assert!(c.connected, "client connected");
        prop_assert_eq!(s.session.export(), Some(&"disk"));
        let mode = c.session.mode().unwrap();
        let expected_mode = match (structured, extended) {
            (_, true) => Mode::Extended,
            (true, false) => Mode::Structured,
            _ => Mode::Simple,
        };
        prop_assert_eq!(mode, expected_mode);
        prop_assert_eq!(s.session.mode(), Some(mode));

        let mut model = vec![0u8; SIZE as usize];
        for group in ops.chunks(batch) {
            let mut reads = Vec::new();
            for op in group {
                let cookie = match op {
                    Op::Write(o, data) => {
                        let c2 = c.session.start_request(Request::new(Command::WRITE, *o, data.len() as u64)).unwrap();
                        c.bufs.insert(c2, data.clone());
                        model[*o as usize..*o as usize + data.len()].copy_from_slice(data);
                        c2
                    }
                    Op::Read(o, l) => {
                        let c2 = c.session.start_request(Request::new(Command::READ, *o, *l)).unwrap();
                        c.bufs.insert(c2, vec![0xee; *l as usize]);
                        // The server executes requests in order: the read
                        // sees every request issued before it.
                        reads.push((c2, model[*o as usize..(*o + *l) as usize].to_vec()));
                        c2
                    }
                    Op::Zero(o, l) => {
                        model[*o as usize..(*o + *l) as usize].fill(0);
                        c.session.start_request(Request::new(Command::WRITE_ZEROES, *o, *l)).unwrap()
                    }
                    Op::Trim(o, l) => {
                        model[*o as usize..(*o + *l) as usize].fill(0);
                        c.session.start_request(Request::new(Command::TRIM, *o, *l)).unwrap()
                    }
                    Op::Flush => c.session.start_request(Request::new(Command::FLUSH, 0, 0)).unwrap(),
                    Op::Status(o, l) => {
                        match c.session.start_request(Request::new(Command::BLOCK_STATUS, *o, *l)) {
                            Ok(c2) => c2,
                            Err(RequestError::NoMetaContext) => {
                                prop_assert!(!structured);
                                continue;
                            }
                            Err(e) => panic!("{e}"),
                        }
                    }
                };
                prop_assert!(c.session.in_flight() <= c.session.capacity());
                prop_assert!(c.bufs.contains_key(&cookie) || !matches!(op, Op::Write(..) | Op::Read(..)));
            }
            run(&mut c, &mut s);
            prop_assert_eq!(c.session.in_flight(), 0, "every request was answered");
            for (cookie, expected) in reads {
                prop_assert_eq!(c.done.get(&cookie), Some(&Ok(())));
                prop_assert!(c.bufs[&cookie] == expected, "a read returned other bytes than the model");
            }
            prop_assert_eq!(&s.data, &model, "the export holds what the model says");
        }
        // Reads after everything: the whole disk, in one request per 64 KiB.
        for o in (0..SIZE).step_by(65536) {
            let cookie = c.session.start_request(Request::new(Command::READ, o, 65536)).unwrap();
            c.bufs.insert(cookie, vec![0xee; 65536]);
            run(&mut c, &mut s);
            prop_assert_eq!(c.done.get(&cookie), Some(&Ok(())));
            prop_assert!(c.bufs[&cookie] == model[o as usize..o as usize + 65536], "read at {} differs", o);
        }
        c.session.disconnect().unwrap();
        run(&mut c, &mut s);
        prop_assert!(s.disconnected);
        prop_assert!(matches!(s.session.need(), ServerNeed::Closed));
    }

    /// Bytes of any kind, cut anywhere, never make a server session panic.
    #[test]
    fn server_session_never_panics(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..20)) {
        let mut s = ServerSession::new(ServerConfig::default(), Exports);
        let mut out = Vec::new();
        for chunk in chunks {
            let _ = s.poll_transmit(&mut out);
            let mut rest: &[u8] = &chunk;
            for _ in 0..1000 {
                match s.feed(rest) {
                    Ok((n, ev)) => {
                        rest = &rest[n..];
                        if ev.is_none() && n == 0 { break; }
                    }
                    Err(_) => break,
                }
            }
            let _ = s.need();
        }
    }

    /// ... nor a client session, in transmission or not.
    #[test]
    fn client_session_never_panics(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..20),
        opt_mode in any::<bool>(),
    ) {
        let mut c = ClientSession::new(ClientConfig::default().opt_mode(opt_mode));
        let mut out = Vec::new();
        for chunk in chunks {
            let _ = c.poll_transmit(&mut out);
            let mut rest: &[u8] = &chunk;
            for _ in 0..1000 {
                match c.feed(rest) {
                    Ok((n, ev)) => {
                        rest = &rest[n..];
                        if ev.is_none() && n == 0 { break; }
                    }
                    Err(_) => break,
                }
            }
            if let ClientNeed::Data { .. } = c.need() {
                let _ = c.data_received(1);
            }
        }
    }
}

/// Reads see what the requests before them wrote, byte for byte, whatever
/// the feeding, including holes (unwritten blocks, OFFSET_HOLE chunks).
#[test]
fn reads_see_earlier_writes_and_holes() {
    for (cf, sf) in [
        (Feeding::Exact, Feeding::Exact),
        (Feeding::Chunks(1), Feeding::Chunks(1)),
        (Feeding::Chunks(7), Feeding::Exact),
        (Feeding::Exact, Feeding::Chunks(100_000)),
    ] {
        let (mut c, mut s) = connect(ClientConfig::default(), cf, ServerConfig::default(), sf);
        assert_eq!(c.session.mode(), Some(Mode::Extended));
        let data: Vec<u8> = (0..3 * BLOCK).map(|i| (i % 251) as u8).collect();
        let w = c
            .session
            .start_request(Request::new(Command::WRITE, BLOCK, 3 * BLOCK))
            .unwrap();
        c.bufs.insert(w, data.clone());
        // Pipelined behind the write: a read over a hole, the data and a hole.
        let r = c
            .session
            .start_request(Request::new(Command::READ, 0, 6 * BLOCK))
            .unwrap();
        c.bufs.insert(r, vec![0xee; 6 * BLOCK as usize]);
        let st = c
            .session
            .start_request(Request::new(Command::BLOCK_STATUS, 0, 6 * BLOCK))
            .unwrap();
        run(&mut c, &mut s);
        assert_eq!(c.done[&w], Ok(()));
        assert_eq!(c.done[&r], Ok(()));
        assert_eq!(c.done[&st], Ok(()));
        let got = &c.bufs[&r];
        assert!(
            got[..BLOCK as usize].iter().all(|&b| b == 0),
            "{cf:?}/{sf:?}: hole reads as zeroes"
        );
        assert!(
            got[BLOCK as usize..4 * BLOCK as usize] == data[..],
            "{cf:?}/{sf:?}: data"
        );
        assert!(got[4 * BLOCK as usize..].iter().all(|&b| b == 0));
        let ext = &c.status[&st];
        assert_eq!(ext[0], (BLOCK, 3), "first block is a hole");
        assert_eq!(ext[1], (BLOCK, 0), "second block is data");
        assert_eq!(c.session.contexts()[0].name, CONTEXT_BASE_ALLOCATION);
    }
}

/// A refused request (a write to a read-only export, checked by the server
/// because the client is told to skip its own checks... our client refuses
/// it before the wire) and an error reply travel as values.
#[test]
fn refusals_are_values() {
    let cfg = ClientConfig::default().export_name("ro");
    let (mut c, mut s) = connect(cfg, Feeding::Chunks(3), ServerConfig::default(), Feeding::Exact);
    assert_eq!(s.session.export(), Some(&"ro"));
    assert!(c.session.flags().contains(TransmissionFlags::READ_ONLY));
    assert_eq!(
        c.session.start_request(Request::new(Command::WRITE, 0, 512)),
        Err(RequestError::ReadOnly(Command::WRITE))
    );
    // Out of range: refused before the wire too.
    assert!(matches!(
        c.session.start_request(Request::new(Command::READ, SIZE, 512)),
        Err(RequestError::OutOfRange { .. })
    ));
    // Nothing was queued by the refusals.
    assert!(!c.session.has_output());
    run(&mut c, &mut s);
}

/// Misuse is an error value and changes nothing.
#[test]
fn misuse_is_reported() {
    let mut c = ClientSession::new(ClientConfig::default());
    assert!(matches!(c.data_received(1), Err(ClientSessionError::Misuse(_))));
    assert_eq!(c.session_request_before_connect(), Err(RequestError::NotConnected));
    let mut s = ServerSession::new(ServerConfig::default(), Exports);
    assert!(s.payload_received(1).is_err());
    assert!(s.discarded(1).is_err());
    assert!(s.encoder().is_none());
    assert!(s.export().is_none());
    assert_eq!(s.poll_timeout(), None, "no deadline before the session learns the time");
    s.handle_timeout(Timestamp::ORIGIN);
    assert_eq!(
        s.poll_timeout(),
        ServerConfig::default()
            .handshake_timeout
            .map(|t| Timestamp::ORIGIN.saturating_add(t))
    );
}

trait BeforeConnect {
    fn session_request_before_connect(&mut self) -> Result<Cookie, RequestError>;
}

impl BeforeConnect for ClientSession {
    fn session_request_before_connect(&mut self) -> Result<Cookie, RequestError> {
        self.start_request(Request::new(Command::READ, 0, 512))
    }
}

/// STARTTLS: the server session consumes nothing after the option that
/// asks for TLS and the client nothing after the acknowledgement, even
/// when fed everything at once; negotiation then goes on "over TLS".
#[test]
fn starttls_is_never_over_read() {
    for feeding in [Feeding::Chunks(100_000), Feeding::Chunks(1), Feeding::Exact] {
        let cfg = ClientConfig::default().tls(TlsMode::Require);
        let scfg = ServerConfig::default().tls(TlsPolicy::ForcedTls);
        let (c, s) = connect(cfg, feeding, scfg, feeding);
        assert!(c.tls_started && s.tls_started, "{feeding:?}: both sides upgraded");
        assert!(c.connected, "{feeding:?}: connected after TLS");
        assert!(c.session.tls() && s.session.tls());
        assert_eq!(s.session.export(), Some(&"disk"));
    }

    // By hand: the client's STARTTLS plus bytes that follow it at once.
    let mut s = ServerSession::new(ServerConfig::default().tls(TlsPolicy::ForcedTls), Exports);
    let mut out = Vec::new();
    assert!(s.poll_transmit(&mut out).is_some());
    let mut input = Vec::new();
    input.extend_from_slice(&1u32.to_be_bytes()); // client flags: FIXED_NEWSTYLE
    input.extend_from_slice(b"IHAVEOPT");
    input.extend_from_slice(&5u32.to_be_bytes()); // NBD_OPT_STARTTLS
    input.extend_from_slice(&0u32.to_be_bytes());
    let starttls_end = input.len();
    input.extend_from_slice(b"\x16\x03\x01 a TLS ClientHello");
    let mut rest: &[u8] = &input;
    let mut consumed = 0;
    loop {
        let (n, ev) = s.feed(rest).unwrap();
        rest = &rest[n..];
        consumed += n;
        if n == 0 && ev.is_none() {
            break;
        }
    }
    assert_eq!(consumed, starttls_end, "nothing after STARTTLS was consumed");
    assert!(matches!(s.need(), ServerNeed::StartTls(_)));
    out.clear();
    assert!(s.poll_transmit(&mut out).is_some(), "the acknowledgement is queued");
}

/// Option mode through the session: list, info, meta contexts, then go.
#[test]
fn option_mode() {
    for feeding in [Feeding::Exact, Feeding::Chunks(5)] {
        let cfg = ClientConfig::default().opt_mode(true);
        let (mut c, mut s) = connect(cfg, feeding, ServerConfig::default(), feeding);
        assert!(matches!(c.session.need(), ClientNeed::Negotiating));
        c.session.opt_list().unwrap();
        run(&mut c, &mut s);
        c.session.opt_info("ro").unwrap();
        run(&mut c, &mut s);
        c.session.opt_info("nope").unwrap();
        run(&mut c, &mut s);
        c.session.opt_list_meta_context("disk", &[]).unwrap();
        run(&mut c, &mut s);
        assert_eq!(c.outcomes.len(), 4);
        match &c.outcomes[0] {
            OptionOutcome::List(l) => {
                let names: Vec<&str> = l.iter().map(|e| e.name.as_str()).collect();
                assert_eq!(names, ["disk", "ro"]);
                assert_eq!(l[0].description.as_deref(), Some("the disk"));
            }
            o => panic!("{o:?}"),
        }
        match &c.outcomes[1] {
            OptionOutcome::Info(i) => {
                assert_eq!(i.size, SIZE);
                assert!(i.flags.unwrap().contains(TransmissionFlags::READ_ONLY));
            }
            o => panic!("{o:?}"),
        }
        assert!(matches!(&c.outcomes[2], OptionOutcome::Refused(_)));
        match &c.outcomes[3] {
            OptionOutcome::MetaContexts(m) => assert_eq!(m[0].name, CONTEXT_BASE_ALLOCATION),
            o => panic!("{o:?}"),
        }
        assert!(s.session.export().is_none(), "INFO chose nothing");
        c.session.opt_go(Some("ro")).unwrap();
        run(&mut c, &mut s);
        assert!(c.connected);
        assert_eq!(
            s.session.export(),
            Some(&"ro"),
            "the export GO chose, not the last INFO"
        );
        s.session.handle_timeout(Timestamp::ORIGIN);
        assert!(s.session.poll_timeout().is_none());
    }
}

/// NBD_OPT_ABORT ends both sessions.
#[test]
fn abort() {
    let cfg = ClientConfig::default().opt_mode(true);
    let (mut c, mut s) = connect(cfg, Feeding::Exact, ServerConfig::default(), Feeding::Chunks(2));
    c.session.opt_abort().unwrap();
    run(&mut c, &mut s);
    assert!(c.aborted);
    assert!(c.session.is_closed());
    assert!(matches!(s.session.need(), ServerNeed::Closed));
}

/// Oldstyle: the server session is in transmission from the start and
/// reports it with the first input; the client reaches transmission too.
#[test]
fn oldstyle() {
    for feeding in [Feeding::Exact, Feeding::Chunks(3)] {
        let scfg = ServerConfig::default().oldstyle(true);
        let (mut c, mut s) = connect(ClientConfig::default(), feeding, scfg, feeding);
        assert!(c.connected);
        assert_eq!(c.session.mode(), Some(Mode::Oldstyle));
        let r = c.session.start_request(Request::new(Command::READ, 0, 512)).unwrap();
        c.bufs.insert(r, vec![0xee; 512]);
        run(&mut c, &mut s);
        assert_eq!(c.done[&r], Ok(()));
        assert!(c.bufs[&r].iter().all(|&b| b == 0));
        assert_eq!(s.session.export(), Some(&"disk"));
    }
}

/// The empty name is the default export; an unknown name is refused.
#[test]
fn default_and_unknown_exports() {
    let (c, s) = connect(
        ClientConfig::default(),
        Feeding::Exact,
        ServerConfig::default(),
        Feeding::Exact,
    );
    assert!(c.connected);
    assert_eq!(s.session.export(), Some(&"disk"));
    assert_eq!(c.session.size(), SIZE);

    let mut c = ClientSide::new(ClientConfig::default().export_name("nope"), Feeding::Exact);
    let mut s = ServerSide::new(ServerConfig::default(), Feeding::Exact);
    // The client gives up on the refusal: its feed returns the error.
    for _ in 0..20 {
        c.transmit();
        s.pump();
        s.inbox.append(&mut c.out);
        c.inbox.append(&mut s.out);
        if let ClientNeed::Bytes(n) = c.session.need()
            && n > 0
            && c.inbox.len() >= n
        {
            let unit: Vec<u8> = c.inbox.drain(..n).collect();
            if let Err(e) = c.session.feed(&unit) {
                assert!(e.to_string().contains("refused"), "{e}");
                assert!(c.session.is_closed());
                return;
            }
        }
    }
    panic!("the unknown export was not refused");
}

/// After the session failed, requests answer with the failure that ended
/// it, not "not connected": in the handshake (a bad greeting) and in
/// transmission (a reply with a bad magic).
#[test]
fn requests_after_a_failure_name_it() {
    let mut c = ClientSession::new(ClientConfig::default());
    let greeting_err = c.feed(&[0xffu8; 16]).map(|_| ()).unwrap_err();
    match c.start_request(Request::new(Command::READ, 0, 512)) {
        Err(RequestError::SessionFailed(why)) => assert_eq!(*why, greeting_err),
        other => panic!("{other:?}"),
    }
    assert!(matches!(c.disconnect(), Err(RequestError::SessionFailed(_))));

    let (mut c, _s) = connect(
        ClientConfig::default(),
        Feeding::Exact,
        ServerConfig::default(),
        Feeding::Exact,
    );
    c.session.start_request(Request::new(Command::READ, 0, 512)).unwrap();
    let garbage = [0xeeu8; 32];
    let mut at = 0;
    let e = loop {
        match c.session.feed(&garbage[at..]) {
            Ok((n, _)) if n > 0 && at + n < garbage.len() => at += n,
            Ok(r) => panic!("garbage accepted: {r:?}"),
            Err(e) => break e,
        }
    };
    assert!(e.to_string().contains("0xeeeeeeee"), "{e}");
    // Debug prints the magic as the spec writes it too.
    assert!(format!("{e:?}").contains("BadMagic(0xeeeeeeee)"), "{e:?}");
    let r = c.session.start_request(Request::new(Command::READ, 0, 512));
    match r {
        Err(RequestError::SessionFailed(ref why)) => assert_eq!(**why, e),
        other => panic!("{other:?}"),
    }
    assert!(r.unwrap_err().to_string().contains("0xeeeeeeee"));
}

/// A time `ms` milliseconds after the origin.
fn at_ms(ms: u64) -> Timestamp {
    Timestamp::from_origin(Duration::from_millis(ms))
}

fn timed_out(c: &mut ClientSession) -> Option<TimedOut> {
    match c.feed(&[]) {
        Err(ClientSessionError::TimedOut(t)) => Some(t),
        _ => None,
    }
}

/// The handshake's deadline: armed from the first time the session is
/// given, expired exactly at its end, gone once transmission starts.
#[test]
fn the_handshake_deadline_is_the_sessions() {
    let five = Duration::from_secs(5);
    // A server that never says anything.
    let mut c = ClientSession::new(ClientConfig::default().handshake_timeout(Some(five)));
    assert_eq!(c.poll_timeout(), None, "no deadline before the session knows the time");
    c.handle_timeout(at_ms(1_000));
    assert_eq!(c.poll_timeout(), Some(at_ms(6_000)));
    c.handle_timeout(at_ms(5_999));
    assert!(!c.is_closed());
    assert!(timed_out(&mut c).is_none());
    c.handle_timeout(at_ms(6_000));
    assert!(c.is_closed());
    assert!(matches!(c.need(), ClientNeed::Closed));
    let t = timed_out(&mut c).expect("the deadline failed the session");
    assert_eq!((t.deadline, t.after), (Deadline::Handshake, five));
    assert_eq!(c.poll_timeout(), None);
    assert_eq!(
        t.to_string(),
        "timed out after 5s waiting for the peer in the handshake"
    );

    // A handshake that finishes in time leaves no deadline behind.
    let mut c = ClientSide::new(ClientConfig::default().handshake_timeout(Some(five)), Feeding::Exact);
    c.session.handle_timeout(at_ms(0));
    let mut s = ServerSide::new(ServerConfig::default(), Feeding::Exact);
    run(&mut c, &mut s);
    assert!(c.connected);
    assert_eq!(c.session.poll_timeout(), None);
    c.session.handle_timeout(at_ms(60_000));
    assert!(!c.session.is_closed());
}

/// In option mode the time the caller takes between options is not the
/// server's: each option has its own deadline, from the first time given
/// after it was issued.
#[test]
fn each_option_has_its_own_deadline() {
    let five = Duration::from_secs(5);
    let cfg = ClientConfig::default().opt_mode(true).handshake_timeout(Some(five));
    let mut c = ClientSide::new(cfg, Feeding::Exact);
    c.session.handle_timeout(at_ms(0));
    let mut s = ServerSide::new(ServerConfig::default(), Feeding::Exact);
    run(&mut c, &mut s);
    assert!(matches!(c.session.need(), ClientNeed::Negotiating));
    assert_eq!(c.session.poll_timeout(), None, "waiting for the caller");
    c.session.handle_timeout(at_ms(1_000_000));
    assert!(!c.session.is_closed());
    c.session.opt_list().unwrap();
    run(&mut c, &mut s);
    assert_eq!(c.outcomes.len(), 1);
    // The next option is lost on the way: the server never answers.
    c.session.opt_info("disk").unwrap();
    assert_eq!(c.session.poll_timeout(), None, "starts at the next time given");
    c.session.handle_timeout(at_ms(2_000_000));
    assert_eq!(c.session.poll_timeout(), Some(at_ms(2_005_000)));
    c.transmit();
    c.out.clear();
    c.session.handle_timeout(at_ms(2_004_999));
    assert!(!c.session.is_closed());
    c.session.handle_timeout(at_ms(2_005_000));
    let t = timed_out(&mut c.session).expect("the option's deadline failed the session");
    assert_eq!(t.deadline, Deadline::Handshake);
}

/// A request's deadline runs from the first time given after it was
/// started (a stale clock never expires it early) to its reply; the
/// oldest request decides; an expired one fails the session, and
/// `connection_lost` gives the requests that were in flight.
#[test]
fn request_deadlines_are_the_sessions() {
    let two = Duration::from_secs(2);
    let cfg = ClientConfig::default().request_timeout(Some(two));
    let (mut c, mut s) = connect(cfg, Feeding::Exact, ServerConfig::default(), Feeding::Exact);
    assert!(c.connected);
    c.session.handle_timeout(at_ms(0));
    assert_eq!(c.session.poll_timeout(), None, "nothing in flight");
    let a = c.session.start_request(Request::new(Command::FLUSH, 0, 0)).unwrap();
    run(&mut c, &mut s);
    assert!(c.done.contains_key(&a));
    c.session.handle_timeout(at_ms(10_000));
    assert_eq!(
        c.session.poll_timeout(),
        None,
        "a request that completed has no deadline"
    );

    // B is lost on the way to the server.
    let b = c.session.start_request(Request::new(Command::FLUSH, 0, 0)).unwrap();
    c.transmit();
    c.out.clear();
    assert_eq!(c.session.poll_timeout(), None, "starts at the next time given");
    c.session.handle_timeout(at_ms(100_000));
    assert_eq!(c.session.poll_timeout(), Some(at_ms(102_000)));
    // C is answered; B still decides.
    c.session.handle_timeout(at_ms(101_000));
    let cc = c.session.start_request(Request::new(Command::FLUSH, 0, 0)).unwrap();
    c.session.handle_timeout(at_ms(101_000));
    run(&mut c, &mut s);
    assert!(c.done.contains_key(&cc));
    assert_eq!(c.session.poll_timeout(), Some(at_ms(102_000)));
    c.session.handle_timeout(at_ms(101_999));
    assert!(!c.session.is_closed());
    c.session.handle_timeout(at_ms(102_000));
    assert!(c.session.is_closed());
    let t = timed_out(&mut c.session).expect("B's deadline failed the session");
    assert_eq!((t.deadline, t.after), (Deadline::Request, two));
    match c.session.start_request(Request::new(Command::FLUSH, 0, 0)) {
        Err(RequestError::SessionFailed(e)) => assert!(matches!(*e, ClientSessionError::TimedOut(_))),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.session.connection_lost(), vec![b]);
}

/// Without a time given, or without timeouts, nothing ever expires.
#[test]
fn no_time_no_deadlines() {
    let cfg = ClientConfig::default().request_timeout(Some(Duration::from_millis(1)));
    let (mut c, mut s) = connect(cfg, Feeding::Chunks(7), ServerConfig::default(), Feeding::Exact);
    let r = c.session.start_request(Request::new(Command::FLUSH, 0, 0)).unwrap();
    assert_eq!(c.session.poll_timeout(), None);
    run(&mut c, &mut s);
    assert!(c.done.contains_key(&r));
    let (mut c, _s) = connect(
        ClientConfig::default(),
        Feeding::Exact,
        ServerConfig::default(),
        Feeding::Exact,
    );
    c.session.start_request(Request::new(Command::FLUSH, 0, 0)).unwrap();
    c.session.handle_timeout(at_ms(0));
    c.session.handle_timeout(at_ms(u64::MAX / 2));
    assert_eq!(c.session.poll_timeout(), None);
    assert!(!c.session.is_closed());
}
