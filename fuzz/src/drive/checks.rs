//! What each side sends, parsed and checked, and the checks of what the sessions report.

use super::*;

// ---------------------------------------------------------------------------
// What a client sends
// ---------------------------------------------------------------------------

/// Checks the client session's output: the client flags and whole options
/// during the handshake; in transmission, exactly the request headers the
/// driver started, in order, with a WRITE's payload announced right after
/// its header.
#[derive(Debug, Default)]
pub(super) struct ClientOut {
    pub(super) transmission: bool,
    pub(super) extended: bool,
    pub(super) flags_seen: bool,
    /// Options sent, by type.
    pub(super) options: Vec<OptionType>,
    /// Headers queued and not sent yet: (cookie, request); no cookie for DISC.
    pub(super) expected: std::collections::VecDeque<(Option<u64>, Request)>,
}

impl ClientOut {
    pub(super) fn check(&mut self, bytes: &[u8], t: Transmit) {
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
pub(super) struct ServerOut {
    pub(super) config: ServerConfig,
    pub(super) greeted: bool,
    /// The option of the last reply, and whether it was final.
    pub(super) last: Option<(u32, bool)>,
    /// The handshake output is over.
    pub(super) done: bool,
}

impl ServerOut {
    pub(super) fn new(config: &ServerConfig) -> Self {
        ServerOut {
            config: config.clone(),
            greeted: false,
            last: None,
            done: false,
        }
    }

    /// Whether the server may wait for the client now.
    pub(super) fn at_rest(&self) -> bool {
        self.last.is_none_or(|(_, fin)| fin)
    }

    pub(super) fn check(&mut self, b: &[u8], negotiated: Option<&ServerNegotiated>) {
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

pub(super) fn check_outcome(o: &OptionOutcome) {
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

pub(super) fn check_negotiated(n: &Negotiated, config: &ClientConfig) {
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

pub(super) fn check_server_negotiated(n: &ServerNegotiated, config: &ServerConfig) {
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
pub(super) fn check_request<E: ExportLookup>(s: &ServerSession<E>, r: &ServerRequest) {
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
