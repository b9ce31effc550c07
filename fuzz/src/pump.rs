//! Drives the client pump both client runtimes run, nbd-net's handshake
//! (`negotiate::handshake` over a transport, run with its `block_on`, as
//! the blocking client runs it) and transmission's receive side as the
//! runtimes drive the session (`need`, `feed`, `data_received`, each
//! `ClientEvent` handled in one `match`), with the server's bytes from the
//! fuzz input. Shared by the `client_pump` fuzz
//! target, by `examples/gen_seeds.rs` (which records what a real
//! `ServeConnection` answers) and by the workspace's
//! `tests/tests/fuzz_corpus.rs` (which includes this file by path), so
//! nothing here may depend on libFuzzer.
//!
//! Input layout: byte 0: bits 0-1 TLS (off, allow, require; the upgrade is
//! pretended), 2 option mode (the pump then sends `NBD_OPT_GO`), 3
//! structured replies, 4 extended headers, 5 block sizes, 6 strict, 7 the
//! export `"ro"` instead of `""`; byte 1: bits 0-2 the meta contexts asked
//! for ([`QUERIES`]), 4-6 `max_in_flight` - 1; byte 2: the number of
//! requests (at most [`MAX_REQUESTS`]), then four bytes each (command,
//! flags, offset in 4 KiB, length in 512 bytes), started as soon as
//! transmission starts; then the server's bytes, read exactly where the
//! pump asks for a count and in pieces for READ data.
//!
//! Checked: no panic; every step of the pump does what its docs say (it
//! sends something, receives into a buffer to fill, starts TLS that the
//! session accepts; no `Error::Misuse`); READ data and holes land inside the request's buffer;
//! every request started completes exactly once, or is returned by
//! `connection_lost`; the loops end (a bound on turns per input byte).

use std::collections::{HashMap, HashSet};
use std::io;

use nbd_net::LazyClientTls;
use nbd_net::client::{Error, add_block_status, data_range, in_flight_error, reason};
use nbd_net::negotiate::{Stalled, Stop, Transport, block_on, handshake};
use nbd_proto::client::{ClientConfig, ClientEvent, ClientNeed, ClientSession, Cookie, Request, TlsMode};
use nbd_proto::common::{MetaContext, Mode};
use nbd_proto::time::Timestamp;
use nbd_proto::wire::{Command, CommandFlags};

/// The meta contexts a client may ask for, by bit of byte 1.
pub const QUERIES: [&str; 3] = ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"];

/// The most requests started.
pub const MAX_REQUESTS: usize = 16;

/// Where the server's bytes come from, and where the client's go.
pub trait Peer: Send {
    /// The client sends `bytes`.
    fn send(&mut self, bytes: &[u8]);
    /// Fills `buf` (all of it if `exact`, else at least one byte) and
    /// returns how many bytes it got: fewer means the end of the stream.
    fn read(&mut self, buf: &mut [u8], exact: bool) -> usize;
}

/// The fuzz input as the server.
#[derive(Debug)]
pub struct InputPeer<'a> {
    /// What the server has not sent yet.
    pub rest: &'a [u8],
}

impl Peer for InputPeer<'_> {
    fn send(&mut self, _bytes: &[u8]) {}

    fn read(&mut self, buf: &mut [u8], _exact: bool) -> usize {
        let n = buf.len().min(self.rest.len());
        buf[..n].copy_from_slice(&self.rest[..n]);
        self.rest = &self.rest[n..];
        n
    }
}

/// The peer as the handshake's transport (TLS is pretended).
struct PeerTransport<'a, P> {
    peer: &'a mut P,
    tls: bool,
}

impl<P: Peer> Transport for PeerTransport<'_, P> {
    async fn send(&mut self, bytes: &[u8], _by: Option<Timestamp>) -> Result<(), Stalled> {
        assert!(!bytes.is_empty(), "sending nothing");
        self.peer.send(bytes);
        Ok(())
    }

    async fn receive(&mut self, buf: &mut [u8], _by: Option<Timestamp>) -> Result<(), Stalled> {
        assert!(!buf.is_empty(), "receiving into nothing");
        if self.peer.read(buf, true) < buf.len() {
            return Err(Stalled::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        Ok(())
    }

    async fn start_tls(&mut self, _tls: &LazyClientTls, _by: Option<Timestamp>) -> Result<(), Stalled> {
        self.tls = true;
        Ok(())
    }
}

/// What a run reached.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PumpSummary {
    /// Transmission started, in this mode.
    pub mode: Option<Mode>,
    /// A (pretended) TLS upgrade happened.
    pub tls: bool,
    /// Requests started.
    pub started: usize,
    /// Requests completed, and of them successfully.
    pub done: usize,
    /// Requests completed successfully.
    pub ok: usize,
    /// Requests returned by `connection_lost`.
    pub lost: usize,
    /// READ data bytes received.
    pub data: u64,
    /// Block-status extents received.
    pub extents: usize,
    /// Why the pump stopped, if on an error.
    pub error: Option<String>,
}

/// The client's configuration from the first two bytes.
pub fn config(b0: u8, b1: u8) -> ClientConfig {
    ClientConfig::default()
        .export_name(if b0 & 128 != 0 { "ro" } else { "" })
        .tls(match b0 & 3 {
            0 => TlsMode::Off,
            1 => TlsMode::Allow,
            _ => TlsMode::Require,
        })
        .opt_mode(b0 & 4 != 0)
        .structured_replies(b0 & 8 != 0)
        .extended_headers(b0 & 16 != 0)
        .request_block_size(b0 & 32 != 0)
        .strict(b0 & 64 != 0)
        .meta_contexts(
            QUERIES
                .iter()
                .enumerate()
                .filter(|(i, _)| b1 >> i & 1 != 0)
                .map(|(_, q)| q.to_string())
                .collect(),
        )
        .max_in_flight(((b1 >> 4) & 7) as usize + 1)
}

/// A request from four bytes.
pub fn request(b: [u8; 4]) -> Request {
    let command = match b[0] % 8 {
        0 | 1 => Command::READ,
        2 => Command::WRITE,
        3 => Command::FLUSH,
        4 => Command::TRIM,
        5 => Command::CACHE,
        6 => Command::WRITE_ZEROES,
        _ => Command::BLOCK_STATUS,
    };
    Request::new(command, b[2] as u64 * 4096, b[3] as u64 * 512).with_flags(CommandFlags::from_bits_retain(b[1] as u16))
}

/// The requests' buffers and completions: the runtime's side.
#[derive(Debug, Default)]
struct Books {
    bufs: HashMap<Cookie, Vec<u8>>,
    started: HashSet<Cookie>,
    done: HashSet<Cookie>,
    contexts: Vec<MetaContext>,
    statuses: HashMap<Cookie, Vec<nbd_net::client::BlockStatus>>,
    s: PumpSummary,
}

impl Books {
    /// A reply event of the session, handled as the runtimes do.
    fn reply(&mut self, ev: ClientEvent<'_>) {
        match ev {
            ClientEvent::Hole {
                cookie,
                buf_offset,
                length,
                ..
            } => {
                assert!(!self.done.contains(&cookie), "a hole after completion");
                let buf = self.bufs.get_mut(&cookie).expect("a hole for a READ");
                let range = data_range(buf.len(), buf_offset, length).expect("a hole inside the buffer");
                buf[range].fill(0);
            }
            ClientEvent::BlockStatus {
                cookie,
                context_id,
                extents,
            } => {
                assert!(self.started.contains(&cookie) && !self.done.contains(&cookie));
                let out = self.statuses.entry(cookie).or_default();
                let before: usize = out.iter().map(|b| b.extents.len()).sum();
                add_block_status(out, &self.contexts, context_id, extents);
                let after: usize = out.iter().map(|b| b.extents.len()).sum();
                self.s.extents += after - before;
            }
            ClientEvent::Done { cookie, result, .. } => {
                assert!(self.started.contains(&cookie), "completion of a request not started");
                assert!(self.done.insert(cookie), "a request completed twice");
                self.s.done += 1;
                self.s.ok += result.is_ok() as usize;
            }
            // READ data comes as ClientNeed::Data (moved above), as in
            // the runtimes.
            _ => {}
        }
    }
}

/// Feeds the session `input` (all of it), each event to `books`.
fn feed(s: &mut ClientSession, mut input: &[u8], books: &mut Books) -> Result<(), Error> {
    loop {
        let (n, ev) = s.feed(input)?;
        input = &input[n..];
        match ev {
            Some(ev) => books.reply(ev),
            None if n == 0 => return Ok(()),
            None => {}
        }
    }
}

/// Sends what the session queued, WRITE payloads after their headers.
fn transmit(s: &mut ClientSession, peer: &mut impl Peer) {
    let mut out = Vec::new();
    while let Some(t) = s.poll_transmit(&mut out) {
        if let Some(p) = t.payload {
            peer.send(&out);
            out.clear();
            peer.send(&vec![0x5a; p.length as usize]);
        }
    }
    peer.send(&out);
}

/// Starts the requests waiting, as far as the session has room (what the
/// runtimes do as completions free slots), and sends them.
fn start_more(
    s: &mut ClientSession,
    queue: &mut std::collections::VecDeque<Request>,
    books: &mut Books,
    peer: &mut impl Peer,
) {
    while s.can_start_request() {
        let Some(r) = queue.pop_front() else { break };
        if let Ok(c) = s.start_request(r) {
            books.started.insert(c);
            books.s.started += 1;
            if r.command == Command::READ {
                books.bufs.insert(c, vec![0xee; r.length as usize]);
            }
        }
    }
    transmit(s, peer);
}

/// Ends on an error: the errors the runtimes derive from it must work, and
/// a runtime that follows the pump's docs never hears that it misused it.
fn failed(e: &Error, s: &mut PumpSummary) {
    assert!(!matches!(e, Error::Misuse(_)), "the pump followed its docs, yet: {e}");
    let why = reason(e);
    let _ = in_flight_error(e, &why);
    let _ = e.errno();
    s.error = Some(why.to_string());
}

/// Runs the pump: `reqs` are started when transmission starts; `turns`
/// bounds the loops.
pub fn pump(config: ClientConfig, reqs: &[Request], peer: &mut impl Peer, turns: usize) -> PumpSummary {
    let mut s = ClientSession::new(config);
    let mut sum = PumpSummary::default();
    let mut gos = 0;
    let mut turn = 0;
    let tls = LazyClientTls::default();
    // The handshake (nbd-net's `negotiate::handshake`).
    loop {
        turn += 1;
        assert!(turn <= turns, "the handshake goes round in circles");
        let mut t = PeerTransport {
            peer: &mut *peer,
            tls: false,
        };
        let stop = block_on(handshake(&mut s, &mut t, &tls));
        sum.tls |= t.tls;
        match stop {
            Err(e) => {
                failed(&e, &mut sum);
                return sum;
            }
            Ok(Stop::Connected) => break,
            Ok(Stop::Negotiating | Stop::Option(_)) => {
                // Option mode: ask for the export (what `go` does), a few
                // times at most.
                gos += 1;
                if gos > 3 || s.opt_go(None).is_err() {
                    return sum;
                }
            }
            Ok(Stop::Aborted) => return sum,
        }
    }
    assert!(s.is_connected(), "Connected without transmission");
    sum.mode = s.mode();
    let mut books = Books {
        contexts: s.contexts().to_vec(),
        ..Books::default()
    };
    let mut queue: std::collections::VecDeque<Request> = reqs.iter().copied().collect();
    start_more(&mut s, &mut queue, &mut books, peer);
    // The receive side, as the runtimes drive the session.
    let mut scratch = Vec::new();
    loop {
        turn += 1;
        assert!(turn <= turns, "the receive loop goes round in circles");
        start_more(&mut s, &mut queue, &mut books, peer);
        let r = match s.need() {
            ClientNeed::Bytes(0) | ClientNeed::Pending => feed(&mut s, &[], &mut books),
            ClientNeed::Bytes(n) => {
                scratch.resize(n, 0);
                if peer.read(&mut scratch, true) < n {
                    books.s.error = Some("EOF".into());
                    break;
                }
                feed(&mut s, &scratch, &mut books)
            }
            ClientNeed::Data {
                cookie,
                buf_offset,
                length,
                ..
            } => {
                assert!(length > 0, "Data of nothing");
                let buf = books.bufs.get_mut(&cookie).expect("READ data for a READ");
                let range = data_range(buf.len(), buf_offset, length).expect("READ data inside the buffer");
                // Pieces of one byte now and then, else what comes.
                let end = if turn % 3 == 0 { range.start + 1 } else { range.end };
                let k = peer.read(&mut buf[range.start..end], false);
                if k == 0 {
                    books.s.error = Some("EOF".into());
                    break;
                }
                books.s.data += k as u64;
                match s.data_received(k as u64) {
                    Ok(ev) => {
                        if let Some(ev) = ev {
                            books.reply(ev);
                        }
                        Ok(())
                    }
                    Err(e) => Err(e.into()),
                }
            }
            ClientNeed::Idle => {
                if queue.is_empty() || !s.can_start_request() {
                    break;
                }
                Ok(())
            }
            ClientNeed::Closed => {
                // Repeats the error that closed it, if any.
                Err(match s.feed(&[]) {
                    Err(e) => e.into(),
                    Ok(_) => Error::disconnected("the session is closed"),
                })
            }
            _ => Err(Error::Misuse("transmission is not running")),
        };
        if let Err(e) = r {
            failed(&e, &mut books.s);
            break;
        }
    }
    if s.is_connected() && s.disconnect().is_ok() {
        transmit(&mut s, peer);
    }
    let lost = s.connection_lost();
    for c in &lost {
        assert!(books.started.contains(c), "lost a request not started");
        assert!(!books.done.contains(c), "lost a request that completed");
    }
    books.s.lost = lost.len();
    assert_eq!(
        books.s.done + books.s.lost,
        books.s.started,
        "every request completes once or is lost"
    );
    books.s.mode = sum.mode;
    books.s.tls = sum.tls;
    books.s.clone()
}

/// Splits the target's input: the configuration, the requests, the
/// server's bytes.
pub fn decode(data: &[u8]) -> Option<(ClientConfig, Vec<Request>, &[u8])> {
    let [b0, b1, n, rest @ ..] = data else {
        return None;
    };
    let n = (*n as usize).min(MAX_REQUESTS).min(rest.len() / 4);
    let reqs = rest[..n * 4]
        .chunks_exact(4)
        .map(|c| request([c[0], c[1], c[2], c[3]]))
        .collect();
    Some((config(*b0, *b1), reqs, &rest[n * 4..]))
}

/// The `client_pump` target: see the module docs.
pub fn client_pump(data: &[u8]) -> PumpSummary {
    let Some((config, reqs, server)) = decode(data) else {
        return PumpSummary::default();
    };
    let mut peer = InputPeer { rest: server };
    // Every turn reads at least a byte, but for a bounded number of turns
    // that read none (completions without input, the option calls).
    let turns = 4 * server.len() + 64 + 4 * MAX_REQUESTS;
    pump(config, &reqs, &mut peer, turns)
}
