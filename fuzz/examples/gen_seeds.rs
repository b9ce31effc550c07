//! Writes the starting inputs of the fuzz targets into `fuzz/seeds/TARGET/`
//! (files `seed-*`; other files there, minimised corpora, are left alone):
//! conversations between nbd-proto's own client and server sessions (for
//! `serve_connection`, what the client sends to nbd-server's
//! `ServeConnection`), in the byte layout each target reads (see
//! `src/drive/` and `src/serve.rs`), so that fuzzing
//! starts deep in every phase: transmission in every mode, TLS, option
//! mode, READ data and WRITE payloads moved by the driver or fed.
//!
//! `cargo run --release --manifest-path fuzz/Cargo.toml --example gen_seeds`
//! (from the repository root). Every seed is run through its target, which
//! must reach what the seed was made for.

use std::fs;
use std::path::Path;

use nbd_proto::client::{ClientConfig, ClientEvent, ClientNeed, ClientSession, Request};
use nbd_proto::common::Mode;
use nbd_proto::server::{ServerConfig, ServerEvent, ServerNeed, ServerRequest, ServerSession};
use nbd_proto::wire::{Command, TransmissionFlags};
use nbd_proto_fuzz::drive::*;
use nbd_proto_fuzz::{pump, serve};

struct Rng(u64);

impl Rng {
    /// splitmix64
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn dir(target: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds").join(target)
}

fn write(target: &str, name: &str, data: &[u8]) {
    fs::write(dir(target).join(format!("seed-{name}")), data).expect("write seed");
}

/// The export every peer offers: 1 MiB, writable, every command, four
/// metadata contexts, block sizes 512/4096/64 KiB; the default export.
/// (The layout of [`ExportSpec::decode`].)
const DISK: [u8; 7] = {
    let f = TransmissionFlags::HAS_FLAGS.bits()
        | TransmissionFlags::SEND_FLUSH.bits()
        | TransmissionFlags::SEND_FUA.bits()
        | TransmissionFlags::SEND_TRIM.bits()
        | TransmissionFlags::SEND_WRITE_ZEROES.bits()
        | TransmissionFlags::SEND_CACHE.bits()
        | TransmissionFlags::SEND_FAST_ZERO.bits()
        | TransmissionFlags::BLOCK_STATUS_PAYLOAD.bits();
    [1, 3, 1, (f >> 8) as u8, f as u8, 2, 0x8f]
};

/// A read-only export named "ro".
const RO: [u8; 7] = [2, 7, 6, 0, 3, 0, 0x01];

fn peer_exports() -> Exports {
    Exports(vec![ExportSpec::decode(DISK), ExportSpec::decode(RO)])
}

/// What the scripted side does when its session waits for it.
#[derive(Debug, Clone, Copy)]
enum Act {
    /// An option-mode call (client) — `OptCall::decode` bytes.
    Opt(u8, u8, u8),
    /// A request (client): command selector, flags, offset, length.
    Req(u8, u8, u64, u32),
    /// `disconnect` (client).
    Disc,
    /// A misuse probe.
    Misuse,
    /// Release completed requests' slots (client).
    Release,
    /// `shutdown` (server).
    Shutdown,
    /// New encoder arguments (server): so many random bytes.
    Encoder(usize),
}

/// How the scripted side reads: `None` exact counts, else pieces of this size.
type Feed = Option<usize>;

// ---------------------------------------------------------------------------
// The peer server (for client_session seeds)
// ---------------------------------------------------------------------------

/// Our server session with a simple executor: zeroes for READs, one
/// extent per context for BLOCK_STATUS.
struct PeerServer {
    s: ServerSession<Exports>,
    out: Vec<u8>,
    inbox: Vec<u8>,
}

impl PeerServer {
    fn new(config: ServerConfig) -> Self {
        PeerServer {
            s: ServerSession::new(config, peer_exports()),
            out: Vec::new(),
            inbox: Vec::new(),
        }
    }

    fn reply(&mut self, r: &ServerRequest) {
        let enc = self.s.encoder().expect("encoder");
        match r.command {
            Command::READ if r.length > 0 => {
                let h = enc.read_reply_header(r).expect("read reply");
                self.out.extend_from_slice(h.as_bytes());
                self.out.extend((0..r.length).map(|i| i as u8));
            }
            Command::BLOCK_STATUS => {
                let ids: Vec<u32> = self.s.selected_contexts(r).map(|(_, c)| c.id).collect();
                for (k, id) in ids.iter().enumerate() {
                    enc.block_status_chunk(r, *id, [(r.length, 0u64)], k + 1 == ids.len(), &mut self.out)
                        .expect("status");
                }
            }
            _ => self.out.extend_from_slice(enc.reply_ok(r).as_bytes()),
        }
    }

    /// Takes what the client sent.
    fn pump(&mut self) {
        for _ in 0..100_000 {
            while self.s.poll_transmit(&mut self.out).is_some() {}
            if let ServerNeed::StartTls(t) = self.s.need() {
                t.established().expect("tls");
                continue;
            }
            let input = std::mem::take(&mut self.inbox);
            let mut rest: &[u8] = &input;
            let mut events = Vec::new();
            while let Ok((n, ev)) = self.s.feed(rest) {
                rest = &rest[n..];
                match ev {
                    Some(ServerEvent::Request(r)) if !(r.command == Command::WRITE && r.length > 0) => events.push(r),
                    Some(ServerEvent::WriteData {
                        request, last: true, ..
                    }) => events.push(request),
                    Some(_) => {}
                    None if n == 0 => break,
                    None => {}
                }
                while self.s.poll_transmit(&mut self.out).is_some() {}
            }
            self.inbox = rest.to_vec();
            for r in &events {
                self.reply(r);
            }
            if events.is_empty() && !matches!(self.s.need(), ServerNeed::StartTls(_)) {
                return;
            }
        }
    }
}

/// A client_session seed: the client (configured by `config`, the four
/// bytes of `client_config`) against our server, reading as `feed` says;
/// `acts` are done in turn whenever the client waits for its caller.
fn client_seed(name: &str, config: [u8; 4], server: ServerConfig, feed: &[Feed], acts: &[Act]) -> Summary {
    let (cfg, manual) = client_config(config);
    let mut c = ClientSession::new(cfg);
    c.set_manual_release(manual);
    let mut p = PeerServer::new(server);
    let mut seed = config.to_vec();
    let mut inbox: Vec<u8> = Vec::new();
    let mut wire: Vec<u8> = Vec::new();
    let mut acts = acts.iter();
    let mut round = 0;
    let mut writes = std::collections::HashMap::new();
    for _ in 0..10_000 {
        // Client output to the server, server output to the wire.
        let mut out = Vec::new();
        while let Some(t) = c.poll_transmit(&mut out) {
            if let Some(pl) = t.payload {
                out.extend_from_slice(&writes.remove(&pl.cookie).unwrap_or_else(|| vec![7; pl.length as usize]));
            }
        }
        p.inbox.extend_from_slice(&out);
        p.pump();
        wire.append(&mut p.out);
        // The client's turn, as the target's driver does it.
        match c.need() {
            ClientNeed::Pending => {
                feed_client(&mut c, &mut inbox);
                continue;
            }
            ClientNeed::StartTls(t) => {
                t.established().expect("tls");
                feed_client(&mut c, &mut inbox);
                continue;
            }
            ClientNeed::Closed => break,
            ClientNeed::Negotiating | ClientNeed::Idle => {
                match acts.next() {
                    None => break,
                    Some(Act::Opt(w, n, q)) => {
                        seed.extend_from_slice(&[client_op::OPT, *w, *n, *q]);
                        let _ = OptCall::decode(*w, *n, *q);
                        call_opt(&mut c, OptCall::decode(*w, *n, *q));
                    }
                    Some(Act::Req(cmd, flags, offset, length)) => {
                        seed.push(client_op::REQUEST);
                        seed.extend_from_slice(&[*cmd, *flags]);
                        seed.extend_from_slice(&offset.to_be_bytes());
                        seed.extend_from_slice(&length.to_be_bytes());
                        let r = Request {
                            command: command(*cmd),
                            flags: nbd_proto::wire::CommandFlags::from_bits_retain(*flags as u16),
                            offset: *offset,
                            length: *length as u64,
                        };
                        if let Ok(cookie) = c.start_request(r) {
                            writes.insert(cookie, (0..*length).map(|i| (i * 7) as u8).collect());
                        }
                    }
                    Some(Act::Disc) => {
                        seed.push(client_op::DISCONNECT);
                        let _ = c.disconnect();
                    }
                    Some(Act::Misuse) => seed.push(client_op::MISUSE),
                    Some(Act::Release) => seed.push(client_op::RELEASE),
                    Some(_) => {}
                }
                continue;
            }
            _ => {}
        }
        if wire.is_empty() && inbox.is_empty() {
            break;
        }
        round += 1;
        let mode = feed[round % feed.len()];
        if wire.is_empty() {
            break;
        }
        match (c.need(), mode) {
            (ClientNeed::Data { length, .. }, None) if inbox.is_empty() && wire.len() as u64 >= length => {
                seed.push(client_op::EXACT);
                seed.extend(wire.drain(..length as usize));
                if let Ok(Some(ClientEvent::Done { cookie, .. })) = c.data_received(length) {
                    c.release(cookie);
                }
            }
            (ClientNeed::Bytes(n), None) if inbox.is_empty() && n > 0 && wire.len() >= n => {
                seed.push(client_op::EXACT);
                let unit: Vec<u8> = wire.drain(..n).collect();
                seed.extend_from_slice(&unit);
                inbox = unit;
                feed_client(&mut c, &mut inbox);
            }
            (_, k) => {
                let piece = piece(&mut seed, &mut wire, k);
                inbox.extend_from_slice(&piece);
                feed_client(&mut c, &mut inbox);
            }
        }
    }
    write("client_session", name, &seed);
    client_session(&seed)
}

/// Records a piece of `k` bytes (at most what is on the wire) and returns it.
fn piece(seed: &mut Vec<u8>, wire: &mut Vec<u8>, k: Feed) -> Vec<u8> {
    let k = k.unwrap_or(1).clamp(1, wire.len());
    if k <= 0x7f {
        seed.push(k as u8);
    } else {
        let k = k.min(0xffff);
        seed.push(client_op::CHUNK16);
        seed.extend_from_slice(&(k as u16).to_be_bytes());
    }
    let piece: Vec<u8> = wire.drain(..k.min(0xffff)).collect();
    seed.extend_from_slice(&piece);
    piece
}

fn call_opt(c: &mut ClientSession, call: OptCall) {
    let _ = call.call(c);
}

/// Feeds what was read until the session takes no more; releases the
/// slots of completed requests (the target releases them on
/// [`client_op::RELEASE`]; releasing early changes nothing it sees).
fn feed_client(c: &mut ClientSession, inbox: &mut Vec<u8>) {
    loop {
        let Ok((n, ev)) = c.feed(inbox) else { return };
        let event = ev.is_some();
        let done = match ev {
            Some(ClientEvent::Done { cookie, .. }) => Some(cookie),
            _ => None,
        };
        inbox.drain(..n);
        if let Some(cookie) = done {
            c.release(cookie);
        }
        if n == 0 && !event {
            return;
        }
    }
}

// ---------------------------------------------------------------------------
// The peer client (for server_session seeds)
// ---------------------------------------------------------------------------

/// A server_session seed: the server (its three configuration bytes and
/// the exports [`DISK`] and [`RO`]) against our client configured by
/// `client`, with `acts` for the client (options, requests) and the server
/// (shutdown, encoder arguments) in turn.
fn server_seed(
    rng: &mut Rng,
    name: &str,
    config: [u8; 3],
    client: ClientConfig,
    feed: &[Feed],
    acts: &[Act],
) -> Summary {
    let mut s = ServerSession::new(server_config(config), peer_exports());
    let mut c = ClientSession::new(client);
    let mut seed = config.to_vec();
    seed.push(2);
    seed.extend_from_slice(&DISK);
    seed.extend_from_slice(&RO);
    let mut wire: Vec<u8> = Vec::new();
    let mut inbox: Vec<u8> = Vec::new();
    let mut to_client: Vec<u8> = Vec::new();
    let mut acts = acts.iter();
    let mut round = 0;
    for _ in 0..10_000 {
        // The client's side: take replies, then send.
        let mut client_moved = false;
        loop {
            let mut progress = false;
            match c.need() {
                ClientNeed::Pending => {
                    let _ = c.feed(&[]);
                    progress = true;
                }
                ClientNeed::StartTls(t) => {
                    t.established().expect("tls");
                    progress = true;
                }
                ClientNeed::Data { length, .. } if !to_client.is_empty() => {
                    let n = (length as usize).min(to_client.len());
                    to_client.drain(..n);
                    let _ = c.data_received(n as u64);
                    progress = true;
                }
                ClientNeed::Bytes(n) if n > 0 && to_client.len() >= n => {
                    let unit: Vec<u8> = to_client.drain(..n).collect();
                    let _ = c.feed(&unit);
                    progress = true;
                }
                ClientNeed::Negotiating | ClientNeed::Idle => match acts.next() {
                    Some(Act::Opt(w, n, q)) => {
                        call_opt(&mut c, OptCall::decode(*w, *n, *q));
                        progress = true;
                    }
                    Some(Act::Req(cmd, flags, offset, length)) => {
                        let r = Request {
                            command: command(*cmd),
                            flags: nbd_proto::wire::CommandFlags::from_bits_retain(*flags as u16),
                            offset: *offset,
                            length: *length as u64,
                        };
                        let _ = c.start_request(r);
                        progress = true;
                    }
                    Some(Act::Disc) => {
                        let _ = c.disconnect();
                        progress = true;
                    }
                    Some(Act::Shutdown) => {
                        seed.push(server_op::SHUTDOWN);
                        s.shutdown();
                        progress = true;
                    }
                    Some(Act::Misuse) => {
                        seed.push(server_op::MISUSE);
                        progress = true;
                    }
                    Some(Act::Encoder(n)) => {
                        seed.extend_from_slice(&[server_op::ENCODER, *n as u8, 1]);
                        seed.extend((1..*n).map(|_| rng.next() as u8));
                        progress = true;
                    }
                    Some(Act::Release) | None => {}
                },
                _ => {}
            }
            let mut out = Vec::new();
            while let Some(t) = c.poll_transmit(&mut out) {
                if let Some(p) = t.payload {
                    out.extend((0..p.length).map(|i| (i * 13) as u8));
                }
            }
            if !out.is_empty() {
                progress = true;
            }
            wire.extend_from_slice(&out);
            if !progress {
                break;
            }
            client_moved = true;
        }
        // The server's turn, as the target's driver does it.
        while s.poll_transmit(&mut to_client).is_some() {}
        if let ServerNeed::StartTls(t) = s.need() {
            t.established().expect("tls");
            feed_server(&mut s, &mut inbox, &mut to_client);
            continue;
        }
        if matches!(s.need(), ServerNeed::Closed) {
            break;
        }
        if wire.is_empty() {
            if !client_moved && to_client.is_empty() {
                break;
            }
            continue;
        }
        round += 1;
        let mode = feed[round % feed.len()];
        match (s.need(), mode) {
            (ServerNeed::Payload { request, length, .. }, None) if inbox.is_empty() && wire.len() as u64 >= length => {
                seed.push(server_op::EXACT);
                seed.extend(wire.drain(..length as usize));
                if s.payload_received(length) == Ok(true) {
                    to_client.extend_from_slice(s.encoder().unwrap().reply_ok(&request).as_bytes());
                }
            }
            (ServerNeed::Discard(length), None) if inbox.is_empty() && wire.len() as u64 >= length => {
                seed.push(server_op::EXACT);
                seed.extend(wire.drain(..length as usize));
                let _ = s.discarded(length);
            }
            (ServerNeed::Bytes(n), None) if inbox.is_empty() && n > 0 && wire.len() >= n => {
                seed.push(server_op::EXACT);
                let unit: Vec<u8> = wire.drain(..n).collect();
                seed.extend_from_slice(&unit);
                inbox = unit;
                feed_server(&mut s, &mut inbox, &mut to_client);
            }
            (_, k) => {
                let piece = piece(&mut seed, &mut wire, k);
                inbox.extend_from_slice(&piece);
                feed_server(&mut s, &mut inbox, &mut to_client);
            }
        }
    }
    write("server_session", name, &seed);
    server_session(&seed)
}

/// Feeds what was read until the session takes no more; answers requests.
fn feed_server(s: &mut ServerSession<Exports>, inbox: &mut Vec<u8>, to_client: &mut Vec<u8>) {
    loop {
        let Ok((n, ev)) = s.feed(inbox) else { return };
        let event = ev.is_some();
        let req = match ev {
            Some(ServerEvent::Request(r)) if !(r.command == Command::WRITE && r.length > 0) => Some((r, None)),
            Some(ServerEvent::WriteData {
                request, last: true, ..
            }) => Some((request, None)),
            Some(ServerEvent::Reject { request, error, .. }) => Some((request, Some(error))),
            _ => None,
        };
        inbox.drain(..n);
        while s.poll_transmit(to_client).is_some() {}
        if let Some((r, error)) = req {
            let enc = s.encoder().expect("encoder");
            match error {
                Some(e) => enc.reply_error(&r, e, "refused", to_client),
                None => match r.command {
                    Command::READ if r.length > 0 => {
                        let h = enc.read_reply_header(&r).expect("read reply");
                        to_client.extend_from_slice(h.as_bytes());
                        to_client.extend((0..r.length).map(|i| i as u8));
                    }
                    Command::BLOCK_STATUS => {
                        let ids: Vec<u32> = s.selected_contexts(&r).map(|(_, c)| c.id).collect();
                        for (k, id) in ids.iter().enumerate() {
                            enc.block_status_chunk(&r, *id, [(r.length, 0u64)], k + 1 == ids.len(), to_client)
                                .expect("status");
                        }
                    }
                    _ => to_client.extend_from_slice(enc.reply_ok(&r).as_bytes()),
                },
            }
        }
        if n == 0 && !event {
            return;
        }
    }
}

// ---------------------------------------------------------------------------
// The seeds
// ---------------------------------------------------------------------------

/// Requests of every kind within the first 1 MiB, 4 KiB aligned.
fn requests() -> Vec<Act> {
    vec![
        Act::Req(2, 0, 0, 8192),       // WRITE
        Act::Req(0, 0, 0, 8192),       // READ
        Act::Req(0, 4, 4096, 4096),    // READ with DF
        Act::Req(7, 0, 0, 65536),      // BLOCK_STATUS
        Act::Req(7, 8, 0, 65536),      // BLOCK_STATUS, REQ_ONE
        Act::Req(6, 0, 4096, 4096),    // WRITE_ZEROES
        Act::Req(4, 0, 8192, 4096),    // TRIM
        Act::Req(3, 0, 0, 0),          // FLUSH
        Act::Req(5, 0, 0, 4096),       // CACHE
        Act::Req(2, 1, 65536, 4096),   // WRITE with FUA
        Act::Req(0, 0, 1 << 20, 4096), // READ past the end (refused)
        Act::Misuse,
        Act::Disc,
    ]
}

fn main() {
    let mut rng = Rng(0x5eed);
    for t in TARGETS.iter().chain(&["serve_connection", "client_pump"]) {
        let d = dir(t);
        fs::create_dir_all(&d).expect("seed dir");
        for e in fs::read_dir(&d).expect("seed dir") {
            let p = e.expect("entry").path();
            if p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("seed-")) {
                fs::remove_file(p).expect("remove old seed");
            }
        }
    }

    // client_session: every mode, feeding exact and in pieces, TLS, option mode.
    let newstyle = ServerConfig::default;
    let base_alloc = 1; // QUERIES bit 0
    let exact: &[Feed] = &[None];
    let pieces: &[Feed] = &[Some(5), None, Some(0x7f), Some(1)];
    for (name, c0, server, feed, want) in [
        ("extended-exact", 0x18u8, newstyle(), exact, Mode::Extended),
        ("extended-pieces", 0x18, newstyle(), pieces, Mode::Extended),
        ("structured-exact", 0x08, newstyle(), exact, Mode::Structured),
        ("structured-pieces", 0x48, newstyle(), pieces, Mode::Structured),
        ("simple-exact", 0x00, newstyle(), exact, Mode::Simple),
        ("simple-pieces", 0x00, newstyle(), pieces, Mode::Simple),
        ("oldstyle", 0x00, newstyle().oldstyle(true), exact, Mode::Oldstyle),
        (
            "export-name-only",
            0x00,
            newstyle().support_go(false).structured_replies(false),
            pieces,
            Mode::ExportNameOnly,
        ),
        (
            "tls-extended",
            0x1a,
            newstyle().tls(nbd_proto::server::TlsPolicy::ForcedTls),
            pieces,
            Mode::Extended,
        ),
        ("manual-release", 0x98 | 0x20, newstyle(), exact, Mode::Extended),
    ] {
        // An oldstyle server has no names: ask for the default export.
        let export = if name == "oldstyle" { 0 } else { 1 };
        let mut acts = requests();
        if name == "manual-release" {
            acts = acts.into_iter().flat_map(|a| [a, Act::Release]).collect();
        }
        let s = client_seed(name, [c0, export, 3, base_alloc | 4], server, feed, &acts);
        assert!(s.modes.contains(&want), "client_session {name}: {s:?}");
        assert!(
            s.ok >= if want.structured() { 8 } else { 6 },
            "client_session {name}: {s:?}"
        );
        if name.starts_with("tls") {
            assert!(s.tls, "client_session {name}: {s:?}");
        }
    }
    // Option mode: list, info, meta contexts, GO, then requests; and abort.
    let mut acts = vec![
        Act::Opt(0, 0, 0),
        Act::Opt(1, 1, 0),
        Act::Opt(1, 3, 0),
        Act::Opt(4, 1, 1),
        Act::Opt(5, 1, 5),
        Act::Opt(6, 0, 0),
        Act::Opt(7, 0, 0),
        Act::Opt(3, 1, 0),
    ];
    acts.extend(requests());
    let s = client_seed("opt-mode", [0x1c, 1, 7, 1], newstyle(), pieces, &acts);
    assert!(
        s.opt_mode && s.options >= 5 && s.ok >= 8,
        "client_session opt-mode: {s:?}"
    );
    let s = client_seed(
        "opt-abort",
        [0x04, 1, 0, 0],
        newstyle(),
        exact,
        &[Act::Opt(0, 0, 0), Act::Opt(8, 0, 0)],
    );
    assert!(s.options >= 1, "client_session opt-abort: {s:?}");

    // server_session: the same against our client.
    let client = |structured: bool, extended: bool| {
        ClientConfig::default()
            .structured_replies(structured)
            .extended_headers(extended)
            .meta_contexts(vec!["base:allocation".into(), "qemu:dirty-bitmap:b0".into()])
            .request_block_size(true)
    };
    // Byte 0: bit 3 LIST, 5 GO, 6 structured, 7 extended.
    let all = 0x08 | 0x20 | 0x40 | 0x80;
    for (name, b0, cc, feed, want) in [
        ("extended-exact", all, client(true, true), exact, Mode::Extended),
        ("extended-pieces", all, client(true, true), pieces, Mode::Extended),
        ("structured-exact", all, client(true, false), exact, Mode::Structured),
        ("structured-pieces", all, client(true, false), pieces, Mode::Structured),
        ("simple-exact", all, client(false, false), exact, Mode::Simple),
        ("simple-pieces", all, client(false, false), pieces, Mode::Simple),
        ("oldstyle", all | 1, client(false, false), exact, Mode::Oldstyle),
        (
            "tls-extended",
            all | 2,
            (client(true, true)).tls(nbd_proto::client::TlsMode::Require),
            pieces,
            Mode::Extended,
        ),
    ] {
        let mut acts = vec![Act::Encoder(64)];
        acts.extend(requests());
        let s = server_seed(&mut rng, name, [b0, 0xff, 0], cc, feed, &acts);
        assert!(s.modes.contains(&want), "server_session {name}: {s:?}");
        assert!(
            s.ok >= if want.structured() { 8 } else { 6 },
            "server_session {name}: {s:?}"
        );
        if name.starts_with("tls") {
            assert!(s.tls, "server_session {name}: {s:?}");
        }
    }
    let mut acts = vec![
        Act::Opt(0, 0, 0),
        Act::Opt(1, 2, 0),
        Act::Opt(4, 1, 1),
        Act::Opt(5, 1, 1),
        Act::Opt(3, 1, 0),
        Act::Encoder(80),
    ];
    acts.extend(requests());
    acts.insert(10, Act::Shutdown);
    let s = server_seed(
        &mut rng,
        "opt-mode-shutdown",
        [all, 0xff, 1],
        (client(true, true)).opt_mode(true),
        pieces,
        &acts,
    );
    assert!(s.ok >= 3 && s.failed >= 1, "server_session opt-mode-shutdown: {s:?}");

    // conversation: random scenarios, kept when they reach something new.
    let mut kept = 0;
    let mut seen = std::collections::HashSet::new();
    for i in 0..40_000 {
        let len = 64 + (rng.next() % 1500) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let s = conversation(&bytes);
        if s.ok == 0 {
            continue;
        }
        let mut key: Vec<String> = s.modes.iter().map(|m| format!("{m:?}")).collect();
        key.sort();
        let key = format!(
            "{key:?} tls={} opt={} reads={} failed={} reconnect={}",
            s.tls,
            s.opt_mode && s.options > 0,
            s.reads > 0,
            s.failed > 0,
            s.connections > 1
        );
        if seen.insert(key.clone()) {
            write("conversation", &format!("{kept:02}"), &bytes);
            println!("conversation seed {kept:02} (try {i}): {key}");
            kept += 1;
            if kept == 48 {
                break;
            }
        }
    }

    serve_seeds();
    pump_seeds();

    // uri: a few of each form.
    for (i, u) in [
        "nbd://example.com/disk",
        "nbd://[::1]:10810/",
        "nbds://host:1234/export?tls-certificates=/etc/pki&tls-verify-peer=false",
        "nbd+unix:///disk?socket=/tmp/s.sock",
        "nbds+unix://alice@/?socket=/run/nbd&tls-psk-file=/k",
        "nbd+vsock://2:10809/x",
        "nbd://h/%2Fabs%20path",
    ]
    .iter()
    .enumerate()
    {
        write("uri", &format!("{i}"), u.as_bytes());
        uri(u.as_bytes());
    }
}

// ---------------------------------------------------------------------------
// serve_connection: what nbd-proto's client sends to a served connection
// ---------------------------------------------------------------------------

/// Runs a `ClientSession` against a `ServeConnection` configured by `b0`,
/// `b1` (as the target decodes them) until its requests are answered, and
/// returns what the client sent, one element per round (a STARTTLS ends
/// one: nothing may follow it in the same read).
fn serve_conversation(b0: u8, b1: u8, client: ClientConfig, reqs: &[Request]) -> Vec<Vec<u8>> {
    use nbd_server::{HandshakeProgress, ServeConnection, ServeContext};
    use std::task::{Context, Poll, Wake, Waker};
    struct Noop;
    impl Wake for Noop {
        fn wake(self: std::sync::Arc<Self>) {}
    }
    let waker = Waker::from(std::sync::Arc::new(Noop));
    let (config, limits, second, ro) = serve::config(b0, b1);
    let ctx = std::sync::Arc::new(ServeContext::new(serve::exports(second, ro), config, limits));
    let mut conn = ServeConnection::new(&ctx);
    let mut writer = conn.reply_writer();
    let mut c = ClientSession::new(client);
    let mut rounds = Vec::new();
    let mut started = false;
    let mut disconnected = false;
    let mut inbox = Vec::new();
    for _ in 0..1000 {
        // The server's bytes to the client.
        let mut to_client = Vec::new();
        while conn.poll_transmit(&mut to_client).is_some() {}
        let mut cx = Context::from_waker(&waker);
        while let Poll::Ready(true) = writer.poll_batch(&mut cx) {
            while !writer.is_empty() {
                let n = writer.with_slices(|sl| {
                    sl.iter()
                        .map(|x| {
                            to_client.extend_from_slice(x);
                            x.len()
                        })
                        .sum()
                });
                writer.advance(n);
            }
        }
        let mut rest = &to_client[..];
        loop {
            let Ok((n, ev)) = c.feed(rest) else { break };
            rest = &rest[n..];
            if ev.is_none() && n == 0 {
                break;
            }
        }
        if let ClientNeed::StartTls(t) = c.need() {
            t.established().expect("client TLS");
        }
        if c.is_connected() && !started {
            started = true;
            for r in reqs {
                let _ = c.start_request(*r);
            }
        }
        if started && c.in_flight() == 0 && !disconnected {
            disconnected = true;
            let _ = c.disconnect();
        }
        // The client's bytes to the server.
        let mut to_server = Vec::new();
        while let Some(t) = c.poll_transmit(&mut to_server) {
            if let Some(p) = t.payload {
                to_server.extend((0..p.length).map(|i| (i * 7 + 1) as u8));
            }
        }
        if to_server.is_empty() && inbox.is_empty() {
            if c.is_closed() || disconnected {
                break;
            }
            continue;
        }
        inbox.extend_from_slice(&to_server);
        // What the server takes now; the rest waits for the writer (a
        // connection blocked on budget or requests in flight).
        let mut used = 0;
        while used < inbox.len() {
            let n = conn.input(&inbox[used..]).expect("server accepts");
            if n == 0 {
                break;
            }
            used += n;
        }
        inbox.drain(..used);
        if conn.negotiation() == HandshakeProgress::StartTls {
            conn.tls_established().expect("server TLS");
        }
        if to_server.is_empty() {
            continue;
        }
        rounds.push(to_server);
    }
    rounds
}

fn serve_seeds() {
    let contexts = vec!["base:allocation".to_string()];
    let client = |structured: bool, extended: bool| {
        ClientConfig::default()
            .structured_replies(structured)
            .extended_headers(extended)
            .meta_contexts(contexts.clone())
    };
    let reqs = [
        Request::new(Command::WRITE, 0, 8192),
        Request::new(Command::READ, 0, 8192),
        Request::new(Command::BLOCK_STATUS, 0, 1 << 20),
        Request::new(Command::WRITE_ZEROES, 4096, 4096),
        Request::new(Command::TRIM, 8192, 4096),
        Request::new(Command::FLUSH, 0, 0),
        Request::new(Command::CACHE, 0, 4096),
        Request::new(Command::READ, 0, 1 << 20),
        Request::new(Command::WRITE, 65536, 4096).with_flags(nbd_proto::wire::CommandFlags::FUA),
        Request::new(Command::READ, 1 << 20, 4096),
    ];
    // Byte 0: bit 0 structured, 1 extended, 2 GO, 5 second export; byte 1:
    // bits 2-4 in flight, 5-6 budget, 7 small high water.
    for (name, b0, b1, cc, max, want) in [
        ("extended", 0x27u8, 0x1cu8, client(true, true), 0, Mode::Extended),
        ("extended-pieces", 0x27, 0x04, client(true, true), 7, Mode::Extended),
        ("structured", 0x25, 0x9c, client(true, false), 0, Mode::Structured),
        (
            "structured-pieces",
            0x25,
            0x80,
            client(true, false),
            100,
            Mode::Structured,
        ),
        ("simple", 0x04, 0x1c, client(false, false), 0, Mode::Simple),
        ("simple-pieces", 0x04, 0x00, client(false, false), 3, Mode::Simple),
        ("oldstyle", 0x08, 0x1c, client(false, false), 0, Mode::Oldstyle),
        ("export-name", 0x00, 0x1c, client(false, false), 0, Mode::ExportNameOnly),
        (
            "tls-extended",
            0x27,
            0x1d,
            client(true, true).tls(nbd_proto::client::TlsMode::Require),
            0,
            Mode::Extended,
        ),
        ("read-only", 0x67, 0x1c, client(true, true), 0, Mode::Extended),
    ] {
        let rounds = serve_conversation(b0, b1, cc, &reqs);
        let mut seed = vec![b0, b1];
        for r in &rounds {
            serve::encode_chunks(&mut seed, r, max);
        }
        write("serve_connection", name, &seed);
        let s = serve::serve_connection(&seed);
        assert_eq!(s.mode, Some(want), "serve_connection {name}: {s:?}");
        assert!(s.reply_bytes > 0, "serve_connection {name}: {s:?}");
        if name.starts_with("tls") {
            assert!(s.tls, "serve_connection {name}: {s:?}");
        }
        println!("serve_connection {name}: {s:?}");
    }
}

// ---------------------------------------------------------------------------
// client_pump: what a ServeConnection answers nbd-net's client pump
// ---------------------------------------------------------------------------

/// A live server for the pump: a `ServeConnection` over the memory
/// exports, recording every byte the pump reads from it.
struct LiveServer {
    conn: nbd_server::ServeConnection,
    writer: nbd_server::ReplyWriter,
    inbox: Vec<u8>,
    outbox: std::collections::VecDeque<u8>,
    recorded: Vec<u8>,
    closed: bool,
}

impl LiveServer {
    fn new(b0: u8, b1: u8) -> LiveServer {
        let (config, limits, second, ro) = serve::config(b0, b1);
        let ctx = std::sync::Arc::new(nbd_server::ServeContext::new(
            serve::exports(second, ro),
            config,
            limits,
        ));
        let conn = nbd_server::ServeConnection::new(&ctx);
        let writer = conn.reply_writer();
        LiveServer {
            conn,
            writer,
            inbox: Vec::new(),
            outbox: Default::default(),
            recorded: Vec::new(),
            closed: false,
        }
    }

    /// Moves bytes both ways once; whether anything moved.
    fn turn(&mut self) -> bool {
        use std::task::{Context, Poll, Wake, Waker};
        struct Noop;
        impl Wake for Noop {
            fn wake(self: std::sync::Arc<Self>) {}
        }
        let before = (self.inbox.len(), self.outbox.len());
        if !self.closed && !self.inbox.is_empty() {
            match self.conn.input(&self.inbox) {
                Ok(n) => {
                    self.inbox.drain(..n);
                }
                Err(_) => self.closed = true,
            }
            if self.conn.negotiation() == nbd_server::HandshakeProgress::StartTls {
                self.conn.tls_established().expect("server TLS");
            }
        }
        let mut out = Vec::new();
        while self.conn.poll_transmit(&mut out).is_some() {}
        let waker = Waker::from(std::sync::Arc::new(Noop));
        let mut cx = Context::from_waker(&waker);
        while let Poll::Ready(true) = self.writer.poll_batch(&mut cx) {
            while !self.writer.is_empty() {
                let n = self.writer.with_slices(|sl| {
                    sl.iter()
                        .map(|x| {
                            out.extend_from_slice(x);
                            x.len()
                        })
                        .sum()
                });
                self.writer.advance(n);
            }
        }
        self.outbox.extend(out);
        (self.inbox.len(), self.outbox.len()) != before
    }
}

impl pump::Peer for LiveServer {
    fn send(&mut self, bytes: &[u8]) {
        self.inbox.extend_from_slice(bytes);
    }

    fn read(&mut self, buf: &mut [u8], exact: bool) -> usize {
        let want = if exact { buf.len() } else { 1 };
        while self.outbox.len() < want && self.turn() {}
        let n = buf.len().min(self.outbox.len());
        for (b, x) in buf.iter_mut().zip(self.outbox.drain(..n)) {
            *b = x;
        }
        self.recorded.extend_from_slice(&buf[..n]);
        n
    }
}

fn pump_seeds() {
    // Requests: command, flags, offset (4 KiB), length (512 bytes).
    let reqs: &[[u8; 4]] = &[
        [2, 0, 0, 16],  // WRITE 8 KiB
        [0, 0, 0, 16],  // READ 8 KiB
        [7, 0, 0, 255], // BLOCK_STATUS
        [6, 0, 1, 8],   // WRITE_ZEROES
        [4, 0, 2, 8],   // TRIM
        [3, 0, 0, 0],   // FLUSH
        [5, 0, 0, 8],   // CACHE
        [0, 0, 0, 255], // READ 127.5 KiB (sparse: holes)
        [0, 4, 1, 8],   // READ with DF
        [0, 0, 255, 8], // READ near the end
    ];
    // Server bytes (serve's layout): all modes, GO, the "ro" export, 128 in
    // flight; client bytes (pump's): b0 bits 0-1 TLS, 2 option mode, 3
    // structured, 4 extended; b1 bits 0-2 contexts, 4-6 in flight - 1.
    for (name, server, client, want) in [
        ("extended", [0x27u8, 0x1c], [0x18u8, 0x71], Some(Mode::Extended)),
        ("structured", [0x27, 0x1c], [0x08, 0x71], Some(Mode::Structured)),
        ("simple", [0x27, 0x1c], [0x00, 0x70], Some(Mode::Simple)),
        ("oldstyle", [0x08, 0x1c], [0x00, 0x70], Some(Mode::Oldstyle)),
        ("export-name", [0x00, 0x1c], [0x00, 0x70], Some(Mode::ExportNameOnly)),
        ("opt-mode", [0x27, 0x1c], [0x1c, 0x71], Some(Mode::Extended)),
        ("tls", [0x27, 0x1d], [0x1a, 0x71], Some(Mode::Extended)),
        ("one-in-flight", [0x27, 0x1c], [0x18, 0x01], Some(Mode::Extended)),
        ("read-only", [0x47, 0x1c], [0x18, 0x71], Some(Mode::Extended)),
    ] {
        let mut seed = vec![client[0], client[1], reqs.len() as u8];
        for r in reqs {
            seed.extend_from_slice(r);
        }
        let (config, requests, _) = pump::decode(&seed).expect("a header");
        let mut live = LiveServer::new(server[0], server[1]);
        let live_sum = pump::pump(config, &requests, &mut live, 100_000);
        seed.extend_from_slice(&live.recorded);
        write("client_pump", name, &seed);
        let s = pump::client_pump(&seed);
        println!("client_pump {name}: {s:?}");
        assert_eq!(s.mode, want, "client_pump {name}: {s:?}");
        assert_eq!(
            (s.started, s.done, s.ok, s.data),
            (live_sum.started, live_sum.done, live_sum.ok, live_sum.data),
            "client_pump {name}: the replay differs from the live run"
        );
        assert!(s.started >= 3 && s.ok == s.started, "client_pump {name}: {s:?}");
    }
}
