//! The server's driver and the `server_session` target.

use super::*;

// ---------------------------------------------------------------------------
// The server's driver
// ---------------------------------------------------------------------------

/// What [`ServerNeed`] says, without the borrow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SNeed {
    Bytes(usize),
    Payload(ServerRequest, u64, u64),
    Discard(u64),
    StartTls,
    Closed,
}

/// A server event copied out of the session's borrow.
#[derive(Debug)]
pub(super) enum Srv {
    Ready,
    Aborted,
    Request(ServerRequest),
    WriteData(ServerRequest, u64, Vec<u8>, bool),
    Reject(ServerRequest, ErrorCode, &'static str),
    Disconnect,
}

pub(super) fn own_server(ev: ServerEvent<'_>, consumed: &[u8]) -> Srv {
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
pub(super) struct EncoderCalls(Option<EncSpec>, usize);

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
    pub(super) s: ServerSession<Exports>,
    pub(super) config: ServerConfig,
    pub(super) x: X,
    pub(super) inbox: Inbox,
    pub(super) check: ServerOut,
    /// Bytes for the client (replies included).
    pub(super) out: Vec<u8>,
    pub(super) tls_mark: Option<usize>,
    /// The WRITE whose payload is coming, and what arrived of it.
    pub(super) write: Option<(ServerRequest, Vec<u8>)>,
    pub(super) ready: bool,
    pub(super) shut: bool,
    pub(super) disconnected: bool,
    pub(super) over: bool,
    pub(super) tls: bool,
    pub(super) error: Option<ServerSessionError>,
    /// Requests the session refused (`conversation`: none may be).
    pub(super) rejects: Vec<(ServerRequest, &'static str)>,
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
        // The handshake's deadline starts when the session learns the time
        // (never advanced here: the fuzzed peer has all the time it wants).
        d.s.handle_timeout(nbd_proto::time::Timestamp::ORIGIN);
        assert!(
            d.s.is_closed()
                || d.s.poll_timeout().is_some() == (!d.config.oldstyle && d.config.handshake_timeout.is_some())
        );
        d.transmit();
        d
    }

    pub(super) fn need(&mut self) -> SNeed {
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

    pub(super) fn transmit(&mut self) {
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

    pub(super) fn settle(&mut self) {
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

    pub(super) fn feed_inbox(&mut self) {
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

    pub(super) fn event(&mut self, ev: Srv) {
        match ev {
            Srv::Ready => {
                assert!(!self.ready, "ready twice");
                self.ready = true;
                let n = self.s.negotiated().expect("negotiated once ready").clone();
                check_server_negotiated(&n, &self.config);
                assert_eq!(n.tls, self.tls, "TLS as the driver upgraded");
                assert!(self.s.encoder().is_some() && self.s.poll_timeout().is_none());
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
    pub(super) fn payload(&mut self, r: ServerRequest, offset: u64, data: &[u8], last: bool) {
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

    pub(super) fn failed(&mut self, e: ServerSessionError) {
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

    pub(super) fn lose(&mut self) {
        if self.over {
            return;
        }
        self.transmit();
        self.s.connection_lost();
        self.over = true;
        assert!(matches!(self.s.need(), ServerNeed::Closed));
        assert!(self.s.is_closed() && !self.s.has_output());
    }

    pub(super) fn exact(&mut self, src: &mut dyn Source) -> bool {
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

    pub(super) fn chunk(&mut self, src: &mut dyn Source, k: usize) -> bool {
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
    pub(super) fn move_bytes(&mut self, src: &mut dyn Source, k: u64) -> bool {
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

    pub(super) fn misuse(&mut self) {
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
