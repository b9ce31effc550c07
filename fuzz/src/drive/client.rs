//! The client's driver and the `client_session` target.

use super::*;

// ---------------------------------------------------------------------------
// The client's driver
// ---------------------------------------------------------------------------

/// What [`ClientNeed`] says, without the borrow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CNeed {
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
pub(super) enum Cli {
    Connected,
    OptionDone(OptionOutcome),
    Aborted,
    Data(Cookie, u64, u64, Option<Vec<u8>>),
    Hole(Cookie, u64, u64),
    Status(Cookie, u32, Vec<(u64, u64)>),
    Done(Cookie, Command, Result<(), ServerError>),
}

/// Copies an event; READ data must be the last bytes consumed.
pub(super) fn own_client(ev: ClientEvent<'_>, consumed: &[u8], keep: bool) -> Cli {
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
pub(super) struct Live {
    pub(super) req: Request,
    /// Bytes of data and holes received.
    pub(super) covered: u64,
    /// Content chunks received.
    pub(super) chunks: u32,
    /// Block-status chunks received.
    pub(super) statuses: u32,
    /// READ destination (`conversation` only).
    pub(super) buf: Option<Vec<u8>>,
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
    pub(super) s: ClientSession,
    pub(super) config: ClientConfig,
    pub(super) manual_release: bool,
    /// Copy READ data and send WRITE payloads (`conversation`).
    pub(super) keep: bool,
    pub(super) inbox: Inbox,
    pub(super) check: ClientOut,
    /// Bytes for the server (kept with `keep` only).
    pub(super) out: Vec<u8>,
    /// Where in `out` the bytes sent over TLS start.
    pub(super) tls_mark: Option<usize>,
    pub(super) live: BTreeMap<u64, Live>,
    pub(super) writes: HashMap<u64, Vec<u8>>,
    pub(super) held: Vec<Cookie>,
    /// READ data being received: (cookie, next buffer offset).
    pub(super) span: Option<(u64, u64)>,
    pub(super) opt_pending: Option<OptCall>,
    pub(super) connected: bool,
    pub(super) disconnecting: bool,
    pub(super) over: bool,
    pub(super) tls: bool,
    pub(super) error: Option<ClientSessionError>,
    pub(super) outcomes: Vec<OptionOutcome>,
    pub(super) completions: Vec<Completion>,
    /// Requests failed by the loss of the connection, by cookie.
    pub(super) lost: Vec<(u64, Live)>,
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

    pub(super) fn need(&mut self) -> CNeed {
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

    pub(super) fn check_counts(&self) {
        if self.over {
            return;
        }
        assert_eq!(self.s.in_flight(), self.live.len(), "in-flight count");
        assert!(self.s.in_flight() <= self.s.capacity(), "in flight beyond capacity");
    }

    /// Sends what the session has to send.
    pub(super) fn transmit(&mut self) {
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
    pub(super) fn settle(&mut self) {
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
    pub(super) fn feed_inbox(&mut self) {
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

    pub(super) fn event(&mut self, ev: Cli) {
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
    pub(super) fn content(&mut self, cookie: Cookie, at: u64, length: u64) {
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
    pub(super) fn failed(&mut self, e: ClientSessionError) {
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
    pub(super) fn lose(&mut self) {
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
    pub(super) fn exact(&mut self, src: &mut dyn Source) -> bool {
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
    pub(super) fn chunk(&mut self, src: &mut dyn Source, k: usize) -> bool {
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
    pub(super) fn move_data(&mut self, src: &mut dyn Source, k: u64) -> bool {
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
    pub(super) fn request(&mut self, r: Request, data: Option<Vec<u8>>) -> Option<Cookie> {
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
    pub(super) fn opt(&mut self, call: OptCall) {
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
    pub(super) fn release(&mut self) {
        for c in self.held.drain(..) {
            self.s.release(c);
        }
        self.check_counts();
    }

    /// Calls that the session's state does not allow: refused, and nothing
    /// changes.
    pub(super) fn misuse(&mut self) {
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
