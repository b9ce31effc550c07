//! Unit tests of the server handshake: every option path, byte for byte.

use super::*;
use std::string::ToString;
use std::vec;
use std::vec::Vec;

fn opt(option: OptionType, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&option.0.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn rep(option: OptionType, reply: ReplyType, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.0.to_be_bytes());
    v.extend_from_slice(&reply.0.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn info_data(name: &str, infos: &[InfoType]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.0.to_be_bytes());
    }
    v
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

fn info_export(size: u64, flags: TransmissionFlags) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0u16.to_be_bytes());
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.bits().to_be_bytes());
    v
}

fn info_string(t: InfoType, s: &str) -> Vec<u8> {
    let mut v = t.0.to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

fn meta_reply(id: u32, name: &str) -> Vec<u8> {
    let mut v = id.to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v
}

fn disk() -> ExportDetails {
    let mut d = ExportDetails::new("disk", 1 << 20);
    d.description = "a test disk".to_string();
    d
}

const BASE_FLAGS: TransmissionFlags = TransmissionFlags::HAS_FLAGS
    .union(TransmissionFlags::SEND_FLUSH)
    .union(TransmissionFlags::SEND_FUA);

/// Drives a server handshake from the test's side.
struct H {
    hs: ServerHandshake,
}

impl H {
    /// Greeting checked, client flags sent.
    fn new(config: ServerConfig, client_flags: ClientFlags) -> Self {
        let no_zeroes = config.no_zeroes;
        let mut hs = ServerHandshake::new(config);
        let mut greeting = Vec::new();
        greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
        greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
        greeting.extend_from_slice(&(if no_zeroes { 3u16 } else { 1u16 }).to_be_bytes());
        assert_eq!(hs.step(), ServerStep::Send(&greeting));
        hs.sent();
        assert_eq!(hs.step(), ServerStep::Receive(4));
        hs.received(&client_flags.bits().to_be_bytes()).unwrap();
        assert_eq!(hs.step(), ServerStep::Receive(16));
        H { hs }
    }

    fn fixed() -> Self {
        H::new(
            ServerConfig::default(),
            ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES,
        )
    }

    /// Feeds an option (header, then data as asked). Returns how the data
    /// was consumed: `Some(true)` received, `Some(false)` discarded.
    fn option(&mut self, option: OptionType, data: &[u8]) -> Result<Option<bool>, ServerHandshakeError> {
        let bytes = opt(option, data);
        assert_eq!(self.hs.step(), ServerStep::Receive(16));
        self.hs.received(&bytes[..16])?;
        match self.hs.step() {
            ServerStep::Receive(n) => {
                assert_eq!(n, data.len());
                self.hs.received(data)?;
                Ok(Some(true))
            }
            ServerStep::Discard(n) => {
                assert_eq!(n, data.len());
                self.hs.discarded()?;
                Ok(Some(false))
            }
            _ => Ok(None),
        }
    }

    fn sends(&mut self) -> Vec<u8> {
        match self.hs.step() {
            ServerStep::Send(b) => {
                let v = b.to_vec();
                self.hs.sent();
                v
            }
            other => panic!("expected Send, got {other:?}"),
        }
    }

    fn lookup(&mut self, name: &str, answer: Option<ExportDetails>) -> Result<(), ServerHandshakeError> {
        assert_eq!(self.hs.step(), ServerStep::LookupExport { name });
        self.hs.answer_export(answer)
    }

    /// An option answered by a single reply without lookup.
    fn simple(&mut self, option: OptionType, data: &[u8], reply: ReplyType) {
        self.option(option, data).unwrap();
        let got = self.sends();
        assert_eq!(&got[..16], &rep(option, reply, &[])[..16], "{option} → {reply}");
        let h = OptionReplyHeader::read_from_prefix(&got).unwrap().0;
        assert_eq!(ReplyType(h.reply_type.get()), reply, "{option}");
        assert_eq!(h.length.get() as usize, got.len() - 20);
        assert_eq!(self.hs.step(), ServerStep::Receive(16));
    }

    fn structured(&mut self) {
        self.simple(OptionType::STRUCTURED_REPLY, &[], ReplyType::ACK);
    }
}

#[test]
fn greeting_without_no_zeroes() {
    let cfg = ServerConfig {
        no_zeroes: false,
        ..ServerConfig::default()
    };
    let h = H::new(cfg, ClientFlags::FIXED_NEWSTYLE);
    assert_eq!(h.hs.client_flags(), ClientFlags::FIXED_NEWSTYLE);
}

#[test]
fn unknown_client_flags_close() {
    let mut hs = ServerHandshake::new(ServerConfig::default());
    hs.sent();
    let e = hs.received(&0x0000_0007u32.to_be_bytes()).unwrap_err();
    assert_eq!(e, ClientViolation::UnknownClientFlags(Hex(7)).into());
    assert_eq!(hs.step(), ServerStep::Closed);
}

#[test]
fn no_zeroes_not_advertised_closes() {
    let mut hs = ServerHandshake::new(ServerConfig {
        no_zeroes: false,
        ..ServerConfig::default()
    });
    hs.sent();
    let e = hs.received(&3u32.to_be_bytes()).unwrap_err();
    assert_eq!(e, ClientViolation::NoZeroesNotAdvertised.into());
    assert_eq!(hs.step(), ServerStep::Closed);
}

#[test]
fn bad_option_magic_closes() {
    let mut h = H::fixed();
    let mut bytes = opt(OptionType::LIST, &[]);
    bytes[0] ^= 1;
    let e = h.hs.received(&bytes).unwrap_err();
    assert!(matches!(
        e,
        ServerHandshakeError::Violation(ClientViolation::BadOptionMagic(_))
    ));
    assert_eq!(h.hs.step(), ServerStep::Closed);
}

#[test]
fn misuse_changes_nothing() {
    let mut h = H::fixed();
    assert!(matches!(h.hs.received(&[0; 3]), Err(ServerHandshakeError::Misuse(_))));
    assert!(matches!(h.hs.discarded(), Err(ServerHandshakeError::Misuse(_))));
    assert!(matches!(h.hs.answer_export(None), Err(ServerHandshakeError::Misuse(_))));
    assert!(matches!(h.hs.answer_list(&[]), Err(ServerHandshakeError::Misuse(_))));
    assert!(matches!(h.hs.tls_established(), Err(ServerHandshakeError::Misuse(_))));
    assert_eq!(h.hs.step(), ServerStep::Receive(16));
    h.simple(OptionType::LIST, &[1], ReplyType::ERR_INVALID);
}

#[test]
fn abort_is_acknowledged() {
    let mut h = H::fixed();
    h.option(OptionType::ABORT, &[]).unwrap();
    assert_eq!(h.sends(), rep(OptionType::ABORT, ReplyType::ACK, &[]));
    assert_eq!(h.hs.step(), ServerStep::Aborted);

    // Data is ignored (discarded), not rejected.
    let mut h = H::fixed();
    assert_eq!(h.option(OptionType::ABORT, b"bye").unwrap(), Some(false));
    assert_eq!(h.sends(), rep(OptionType::ABORT, ReplyType::ACK, &[]));
    assert_eq!(h.hs.step(), ServerStep::Aborted);
}

#[test]
fn list_exports() {
    let mut h = H::fixed();
    h.option(OptionType::LIST, &[]).unwrap();
    assert_eq!(h.hs.step(), ServerStep::ListExports);
    assert_eq!(h.hs.current_option(), OptionType::LIST);
    h.hs.answer_list(&[
        ExportListing {
            name: "a",
            description: "",
            tls_only: false,
        },
        ExportListing {
            name: "bb",
            description: "second",
            tls_only: true,
        },
    ])
    .unwrap();
    let mut want = rep(OptionType::LIST, ReplyType::SERVER, b"\0\0\0\x01a");
    want.extend(rep(OptionType::LIST, ReplyType::SERVER, b"\0\0\0\x02bbsecond"));
    want.extend(rep(OptionType::LIST, ReplyType::ACK, &[]));
    assert_eq!(h.sends(), want);
    assert_eq!(h.hs.step(), ServerStep::Receive(16));
}

#[test]
fn list_with_data_or_forbidden() {
    let mut h = H::fixed();
    assert_eq!(h.option(OptionType::LIST, &[1, 2]).unwrap(), Some(false));
    let got = h.sends();
    assert_eq!(
        &got[..20],
        &rep(
            OptionType::LIST,
            ReplyType::ERR_INVALID,
            b"NBD_OPT_LIST must not carry data"
        )[..20]
    );
    assert_eq!(&got[20..], b"NBD_OPT_LIST must not carry data");

    let mut h = H::new(
        ServerConfig {
            allow_list: false,
            ..ServerConfig::default()
        },
        ClientFlags::FIXED_NEWSTYLE,
    );
    h.simple(OptionType::LIST, &[], ReplyType::ERR_POLICY);
}

#[test]
fn list_hides_tls_only_exports_under_selective_tls() {
    let mut h = H::new(
        ServerConfig {
            tls: TlsPolicy::SelectiveTls,
            ..ServerConfig::default()
        },
        ClientFlags::FIXED_NEWSTYLE,
    );
    let exports = [
        ExportListing {
            name: "open",
            description: "",
            tls_only: false,
        },
        ExportListing {
            name: "secret",
            description: "",
            tls_only: true,
        },
    ];
    h.option(OptionType::LIST, &[]).unwrap();
    h.hs.answer_list(&exports).unwrap();
    let mut want = rep(OptionType::LIST, ReplyType::SERVER, b"\0\0\0\x04open");
    want.extend(rep(OptionType::LIST, ReplyType::ACK, &[]));
    assert_eq!(h.sends(), want);

    h.option(OptionType::STARTTLS, &[]).unwrap();
    assert_eq!(h.sends(), rep(OptionType::STARTTLS, ReplyType::ACK, &[]));
    assert_eq!(h.hs.step(), ServerStep::StartTls);
    h.hs.tls_established().unwrap();
    h.option(OptionType::LIST, &[]).unwrap();
    h.hs.answer_list(&exports).unwrap();
    let mut want = rep(OptionType::LIST, ReplyType::SERVER, b"\0\0\0\x04open");
    want.extend(rep(OptionType::LIST, ReplyType::SERVER, b"\0\0\0\x06secret"));
    want.extend(rep(OptionType::LIST, ReplyType::ACK, &[]));
    assert_eq!(h.sends(), want);
}

#[test]
fn answer_list_rejects_invalid_strings() {
    let mut h = H::fixed();
    h.option(OptionType::LIST, &[]).unwrap();
    let long = "x".repeat(4097);
    let e = h.hs.answer_list(&[ExportListing {
        name: &long,
        description: "",
        tls_only: false,
    }]);
    assert!(matches!(e, Err(ServerHandshakeError::Misuse(_))));
    assert_eq!(h.hs.step(), ServerStep::ListExports);
    h.hs.answer_list(&[]).unwrap();
    assert_eq!(h.sends(), rep(OptionType::LIST, ReplyType::ACK, &[]));
}

#[test]
fn starttls_refused_without_tls() {
    let mut h = H::fixed();
    h.simple(OptionType::STARTTLS, &[], ReplyType::ERR_POLICY);
    assert_eq!(h.option(OptionType::STARTTLS, b"x").unwrap(), Some(false));
    let got = h.sends();
    assert_eq!(
        ReplyType(OptionReplyHeader::read_from_prefix(&got).unwrap().0.reply_type.get()),
        ReplyType::ERR_INVALID
    );
}

#[test]
fn starttls_forgets_negotiated_state() {
    let mut h = H::new(
        ServerConfig {
            tls: TlsPolicy::SelectiveTls,
            ..ServerConfig::default()
        },
        ClientFlags::FIXED_NEWSTYLE,
    );
    h.structured();
    h.simple(OptionType::EXTENDED_HEADERS, &[], ReplyType::ACK);
    h.option(OptionType::SET_META_CONTEXT, &meta_data("disk", &["base:allocation"]))
        .unwrap();
    h.lookup("disk", Some(disk())).unwrap();
    h.sends();
    assert!(h.hs.structured_replies() && h.hs.extended_headers());

    // Data with STARTTLS is invalid.
    assert_eq!(h.option(OptionType::STARTTLS, &[0]).unwrap(), Some(false));
    h.sends();
    // The ACK goes out, and only then TLS starts: nothing over-read.
    h.option(OptionType::STARTTLS, &[]).unwrap();
    assert_eq!(h.sends(), rep(OptionType::STARTTLS, ReplyType::ACK, &[]));
    assert_eq!(h.hs.step(), ServerStep::StartTls);
    h.hs.tls_established().unwrap();
    assert!(h.hs.tls());
    assert!(!h.hs.structured_replies() && !h.hs.extended_headers());
    // A second STARTTLS is invalid.
    h.simple(OptionType::STARTTLS, &[], ReplyType::ERR_INVALID);
    // Meta contexts need structured replies again.
    h.simple(
        OptionType::SET_META_CONTEXT,
        &meta_data("disk", &["base:allocation"]),
        ReplyType::ERR_INVALID,
    );
    // The old selection is gone: GO gets no contexts and simple replies.
    h.option(OptionType::GO, &info_data("disk", &[])).unwrap();
    h.lookup("disk", Some(disk())).unwrap();
    h.sends();
    assert_eq!(h.hs.step(), ServerStep::Done);
    let n = h.hs.finish().unwrap();
    assert_eq!(n.mode, Mode::Simple);
    assert!(n.tls);
    assert!(n.contexts.is_empty());
    assert!(!n.flags.contains(TransmissionFlags::SEND_DF));
}

#[test]
fn forced_tls() {
    let cfg = ServerConfig {
        tls: TlsPolicy::ForcedTls,
        ..ServerConfig::default()
    };
    let mut h = H::new(cfg.clone(), ClientFlags::FIXED_NEWSTYLE);
    // Every option but STARTTLS and ABORT: TLS_REQD, data discarded unread.
    assert_eq!(h.option(OptionType::GO, &info_data("disk", &[])).unwrap(), Some(false));
    let got = h.sends();
    assert_eq!(
        ReplyType(OptionReplyHeader::read_from_prefix(&got).unwrap().0.reply_type.get()),
        ReplyType::ERR_TLS_REQD
    );
    for o in [
        OptionType::LIST,
        OptionType::INFO,
        OptionType::STRUCTURED_REPLY,
        OptionType::EXTENDED_HEADERS,
        OptionType::LIST_META_CONTEXT,
        OptionType(1000),
    ] {
        h.simple(o, &[], ReplyType::ERR_TLS_REQD);
    }
    // EXPORT_NAME cannot be refused: the session ends.
    let e = h.option(OptionType::EXPORT_NAME, b"disk").unwrap_err();
    assert!(matches!(e, ServerHandshakeError::TlsRequired(_)));
    assert_eq!(h.hs.step(), ServerStep::Closed);

    // After TLS everything works, and TLS_REQD is never sent again.
    let mut h = H::new(cfg.clone(), ClientFlags::FIXED_NEWSTYLE);
    h.option(OptionType::STARTTLS, &[]).unwrap();
    h.sends();
    h.hs.tls_established().unwrap();
    h.structured();
    h.option(OptionType::GO, &info_data("disk", &[])).unwrap();
    h.lookup("disk", Some(disk())).unwrap();
    h.sends();
    let n = h.hs.finish().unwrap();
    assert!(n.tls);
    assert_eq!(n.mode, Mode::Structured);

    // ABORT is allowed before TLS.
    let mut h = H::new(cfg.clone(), ClientFlags::FIXED_NEWSTYLE);
    h.option(OptionType::ABORT, &[]).unwrap();
    h.sends();
    assert_eq!(h.hs.step(), ServerStep::Aborted);

    // A client without fixed newstyle keeps the server in NOTLS mode: no
    // TLS_REQD is ever sent (ERR_POLICY instead).
    let mut h = H::new(cfg, ClientFlags::empty());
    h.simple(OptionType::STARTTLS, &[], ReplyType::ERR_POLICY);
    h.simple(OptionType::LIST, &[], ReplyType::ERR_POLICY);
}

#[test]
fn selective_tls_refuses_tls_only_exports_in_clear() {
    let cfg = ServerConfig {
        tls: TlsPolicy::SelectiveTls,
        ..ServerConfig::default()
    };
    let mut secret = disk();
    secret.tls_only = true;
    let mut h = H::new(cfg.clone(), ClientFlags::FIXED_NEWSTYLE);
    h.structured();
    for o in [OptionType::INFO, OptionType::GO] {
        h.option(o, &info_data("disk", &[])).unwrap();
        h.lookup("disk", Some(secret.clone())).unwrap();
        let got = h.sends();
        assert_eq!(got, rep(o, ReplyType::ERR_TLS_REQD, b"export requires TLS"));
    }
    // Meta-context options may not answer TLS_REQD.
    h.option(OptionType::LIST_META_CONTEXT, &meta_data("disk", &[]))
        .unwrap();
    h.lookup("disk", Some(secret.clone())).unwrap();
    assert_eq!(
        h.sends(),
        rep(
            OptionType::LIST_META_CONTEXT,
            ReplyType::ERR_POLICY,
            b"export requires TLS"
        )
    );
    // Non-TLS-only exports work in clear.
    h.option(OptionType::INFO, &info_data("disk", &[])).unwrap();
    h.lookup("disk", Some(disk())).unwrap();
    assert!(h.sends().ends_with(&rep(OptionType::INFO, ReplyType::ACK, &[])));
    // EXPORT_NAME of a TLS-only export in clear closes.
    let e = h.option(OptionType::EXPORT_NAME, b"disk").unwrap();
    assert_eq!(e, Some(true));
    let e = h.lookup("disk", Some(secret.clone())).unwrap_err();
    assert_eq!(e, ServerHandshakeError::TlsRequired("disk".to_string()));
    assert_eq!(h.hs.step(), ServerStep::Closed);
}

#[test]
fn info_and_go_reply_bytes() {
    let mut h = H::fixed();
    h.structured();
    let mut d = disk();
    d.block_size = Some(BlockSizeConstraints {
        minimum: 512,
        preferred: 4096,
        maximum: 1 << 20,
    });
    h.option(
        OptionType::INFO,
        &info_data("", &[InfoType::NAME, InfoType::DESCRIPTION, InfoType(77)]),
    )
    .unwrap();
    h.lookup("", Some(d.clone())).unwrap();
    let flags = BASE_FLAGS | TransmissionFlags::SEND_DF;
    let mut want = rep(OptionType::INFO, ReplyType::INFO, &info_export(1 << 20, flags));
    want.extend(rep(
        OptionType::INFO,
        ReplyType::INFO,
        &info_string(InfoType::NAME, "disk"),
    ));
    want.extend(rep(
        OptionType::INFO,
        ReplyType::INFO,
        &info_string(InfoType::DESCRIPTION, "a test disk"),
    ));
    // Non-default constraints are always sent.
    let mut bs = 3u16.to_be_bytes().to_vec();
    bs.extend_from_slice(&512u32.to_be_bytes());
    bs.extend_from_slice(&4096u32.to_be_bytes());
    bs.extend_from_slice(&(1u32 << 20).to_be_bytes());
    want.extend(rep(OptionType::INFO, ReplyType::INFO, &bs));
    want.extend(rep(OptionType::INFO, ReplyType::ACK, &[]));
    assert_eq!(h.sends(), want);
    assert_eq!(h.hs.step(), ServerStep::Receive(16));

    h.option(OptionType::GO, &info_data("", &[InfoType::BLOCK_SIZE]))
        .unwrap();
    h.lookup("", Some(d)).unwrap();
    let mut want = rep(OptionType::GO, ReplyType::INFO, &info_export(1 << 20, flags));
    want.extend(rep(OptionType::GO, ReplyType::INFO, &bs));
    want.extend(rep(OptionType::GO, ReplyType::ACK, &[]));
    assert_eq!(h.sends(), want);
    assert_eq!(h.hs.step(), ServerStep::Done);
    let n = h.hs.finish().unwrap();
    assert_eq!(
        n,
        ServerNegotiated {
            mode: Mode::Structured,
            export_name: "disk".to_string(),
            requested_name: String::new(),
            size: 1 << 20,
            flags,
            block_size: Some(BlockSizeConstraints {
                minimum: 512,
                preferred: 4096,
                maximum: 1 << 20
            }),
            contexts: Vec::new(),
            tls: false,
            client_requested_block_size: true,
        }
    );
}

#[test]
fn info_block_size_defaults_when_asked() {
    let mut h = H::fixed();
    h.option(OptionType::INFO, &info_data("disk", &[InfoType::BLOCK_SIZE]))
        .unwrap();
    h.lookup("disk", Some(disk())).unwrap();
    let mut bs = 3u16.to_be_bytes().to_vec();
    bs.extend_from_slice(&1u32.to_be_bytes());
    bs.extend_from_slice(&4096u32.to_be_bytes());
    bs.extend_from_slice(&(1u32 << 25).to_be_bytes());
    let mut want = rep(OptionType::INFO, ReplyType::INFO, &info_export(1 << 20, BASE_FLAGS));
    want.extend(rep(OptionType::INFO, ReplyType::INFO, &bs));
    want.extend(rep(OptionType::INFO, ReplyType::ACK, &[]));
    assert_eq!(h.sends(), want);
}

#[test]
fn info_malformed() {
    let mut h = H::fixed();
    // Shorter than 6 bytes.
    h.simple(OptionType::INFO, &[0, 0, 0, 0, 0], ReplyType::ERR_INVALID);
    // Name length beyond optlen - 6.
    let mut d = info_data("abc", &[]);
    d[3] = 4;
    h.simple(OptionType::GO, &d, ReplyType::ERR_INVALID);
    // Request count disagreeing with the remaining length (both ways).
    let mut d = info_data("abc", &[InfoType::NAME]);
    d[8] = 2;
    h.simple(OptionType::GO, &d, ReplyType::ERR_INVALID);
    let mut d = info_data("abc", &[InfoType::NAME]);
    d.push(0);
    h.simple(OptionType::GO, &d, ReplyType::ERR_INVALID);
    // Duplicate request.
    h.simple(
        OptionType::GO,
        &info_data("abc", &[InfoType::NAME, InfoType::NAME]),
        ReplyType::ERR_INVALID,
    );
    // Names must be valid strings.
    h.simple(OptionType::INFO, &info_data("a\0b", &[]), ReplyType::ERR_INVALID);
    let mut d = info_data("ab", &[]);
    d[4] = 0xff;
    h.simple(OptionType::INFO, &d, ReplyType::ERR_INVALID);
    h.simple(
        OptionType::INFO,
        &info_data(&"n".repeat(4097), &[]),
        ReplyType::ERR_INVALID,
    );
    // Still negotiating.
    assert_eq!(h.hs.step(), ServerStep::Receive(16));
}

#[test]
fn info_unknown_export() {
    let mut h = H::fixed();
    for o in [OptionType::INFO, OptionType::GO] {
        h.option(o, &info_data("nope", &[])).unwrap();
        h.lookup("nope", None).unwrap();
        assert_eq!(h.sends(), rep(o, ReplyType::ERR_UNKNOWN, b"unknown export"));
    }
    assert_eq!(h.hs.step(), ServerStep::Receive(16));
}

#[test]
fn go_block_size_required() {
    let mut h = H::fixed();
    let mut d = disk();
    d.block_size_required = true;
    d.block_size = Some(BlockSizeConstraints {
        minimum: 4096,
        preferred: 4096,
        maximum: 1 << 16,
    });
    h.option(OptionType::GO, &info_data("disk", &[])).unwrap();
    h.lookup("disk", Some(d.clone())).unwrap();
    let got = h.sends();
    // BLOCK_SIZE is sent first to save a round trip, then the error.
    let mut bs = 3u16.to_be_bytes().to_vec();
    bs.extend_from_slice(&4096u32.to_be_bytes());
    bs.extend_from_slice(&4096u32.to_be_bytes());
    bs.extend_from_slice(&(1u32 << 16).to_be_bytes());
    let mut want = rep(OptionType::GO, ReplyType::INFO, &info_export(1 << 20, BASE_FLAGS));
    want.extend(rep(OptionType::GO, ReplyType::INFO, &bs));
    want.extend(rep(
        OptionType::GO,
        ReplyType::ERR_BLOCK_SIZE_REQD,
        b"export requires NBD_INFO_BLOCK_SIZE to be requested",
    ));
    assert_eq!(got, want);
    // INFO is not refused (it does not enter transmission).
    h.option(OptionType::INFO, &info_data("disk", &[])).unwrap();
    h.lookup("disk", Some(d.clone())).unwrap();
    assert!(h.sends().ends_with(&rep(OptionType::INFO, ReplyType::ACK, &[])));
    // EXPORT_NAME cannot promise anything: closed.
    let mut h2 = H::fixed();
    h2.option(OptionType::EXPORT_NAME, b"disk").unwrap();
    let e = h2.lookup("disk", Some(d.clone())).unwrap_err();
    assert_eq!(e, ServerHandshakeError::BlockSizeRequired("disk".to_string()));
    // GO asking for it succeeds.
    h.option(OptionType::GO, &info_data("disk", &[InfoType::BLOCK_SIZE]))
        .unwrap();
    h.lookup("disk", Some(d)).unwrap();
    h.sends();
    let n = h.hs.finish().unwrap();
    assert!(n.client_requested_block_size);
    assert_eq!(n.constraints().minimum, 4096);
}

#[test]
fn answer_export_validates_details() {
    let mut h = H::fixed();
    h.option(OptionType::INFO, &info_data("disk", &[])).unwrap();
    let mut bad = disk();
    bad.block_size = Some(BlockSizeConstraints {
        minimum: 3,
        preferred: 4096,
        maximum: 4096,
    });
    assert!(matches!(
        h.hs.answer_export(Some(bad)),
        Err(ServerHandshakeError::Misuse(_))
    ));
    let mut bad = disk();
    bad.meta_contexts = vec!["nonamespace".to_string()];
    assert!(matches!(
        h.hs.answer_export(Some(bad)),
        Err(ServerHandshakeError::Misuse(_))
    ));
    // Still waiting for a valid answer.
    h.lookup("disk", Some(disk())).unwrap();
    assert!(h.sends().ends_with(&rep(OptionType::INFO, ReplyType::ACK, &[])));
}

#[test]
fn structured_reply_option() {
    let mut h = H::fixed();
    assert_eq!(h.option(OptionType::STRUCTURED_REPLY, &[9]).unwrap(), Some(false));
    let got = h.sends();
    assert_eq!(
        ReplyType(OptionReplyHeader::read_from_prefix(&got).unwrap().0.reply_type.get()),
        ReplyType::ERR_INVALID
    );
    assert!(!h.hs.structured_replies());
    h.option(OptionType::STRUCTURED_REPLY, &[]).unwrap();
    assert_eq!(h.sends(), rep(OptionType::STRUCTURED_REPLY, ReplyType::ACK, &[]));
    assert!(h.hs.structured_replies());
    h.simple(OptionType::STRUCTURED_REPLY, &[], ReplyType::ERR_INVALID);
    h.simple(OptionType::EXTENDED_HEADERS, &[], ReplyType::ACK);
    h.simple(OptionType::STRUCTURED_REPLY, &[], ReplyType::ERR_EXT_HEADER_REQD);
}

#[test]
fn extended_headers_option() {
    let mut h = H::fixed();
    assert_eq!(h.option(OptionType::EXTENDED_HEADERS, &[1]).unwrap(), Some(false));
    h.sends();
    assert!(!h.hs.extended_headers());
    h.option(OptionType::EXTENDED_HEADERS, &[]).unwrap();
    assert_eq!(h.sends(), rep(OptionType::EXTENDED_HEADERS, ReplyType::ACK, &[]));
    assert!(h.hs.extended_headers());
    h.simple(OptionType::EXTENDED_HEADERS, &[], ReplyType::ERR_INVALID);
    // EXPORT_NAME is now forbidden: close.
    let e = h.option(OptionType::EXPORT_NAME, b"").unwrap_err();
    assert_eq!(e, ClientViolation::ExportNameWithExtendedHeaders.into());
    assert_eq!(h.hs.step(), ServerStep::Closed);
}

#[test]
fn extended_go_flags() {
    let mut h = H::fixed();
    h.simple(OptionType::EXTENDED_HEADERS, &[], ReplyType::ACK);
    let mut d = disk();
    d.flags |= TransmissionFlags::BLOCK_STATUS_PAYLOAD
        | TransmissionFlags::SEND_FAST_ZERO
        | TransmissionFlags::SEND_RESIZE
        | TransmissionFlags::from_bits_retain(1 << 15);
    // Without contexts: no BLOCK_STATUS_PAYLOAD; FAST_ZERO needs
    // WRITE_ZEROES; RESIZE and unknown bits never.
    h.option(OptionType::INFO, &info_data("disk", &[])).unwrap();
    h.lookup("disk", Some(d.clone())).unwrap();
    let flags = BASE_FLAGS | TransmissionFlags::SEND_DF;
    assert!(
        h.sends()
            .starts_with(&rep(OptionType::INFO, ReplyType::INFO, &info_export(1 << 20, flags)))
    );
    h.option(OptionType::SET_META_CONTEXT, &meta_data("disk", &["base:allocation"]))
        .unwrap();
    h.lookup("disk", Some(d.clone())).unwrap();
    h.sends();
    d.flags |= TransmissionFlags::SEND_WRITE_ZEROES;
    h.option(OptionType::GO, &info_data("disk", &[])).unwrap();
    h.lookup("disk", Some(d)).unwrap();
    let flags = flags
        | TransmissionFlags::SEND_WRITE_ZEROES
        | TransmissionFlags::SEND_FAST_ZERO
        | TransmissionFlags::BLOCK_STATUS_PAYLOAD;
    assert!(
        h.sends()
            .starts_with(&rep(OptionType::GO, ReplyType::INFO, &info_export(1 << 20, flags)))
    );
    let n = h.hs.finish().unwrap();
    assert_eq!(n.mode, Mode::Extended);
    assert_eq!(n.flags, flags);
    assert_eq!(n.contexts.len(), 1);
}

#[test]
fn meta_context_requires_structured() {
    let mut h = H::fixed();
    for o in [OptionType::LIST_META_CONTEXT, OptionType::SET_META_CONTEXT] {
        assert_eq!(h.option(o, &meta_data("disk", &[])).unwrap(), Some(false));
        let got = h.sends();
        assert_eq!(
            ReplyType(OptionReplyHeader::read_from_prefix(&got).unwrap().0.reply_type.get()),
            ReplyType::ERR_INVALID
        );
    }
}

#[test]
fn list_meta_context() {
    let mut h = H::fixed();
    h.structured();
    let mut d = disk();
    d.meta_contexts = vec![
        "base:allocation".to_string(),
        "qemu:allocation-depth".to_string(),
        "qemu:dirty-bitmap:b0".to_string(),
    ];
    let cases: &[(&[&str], &[&str])] = &[
        (
            &[],
            &["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"],
        ),
        (&["base:"], &["base:allocation"]),
        (&["base:allocation"], &["base:allocation"]),
        (&["qemu:dirty-bitmap:"], &["qemu:dirty-bitmap:b0"]),
        (&["qemu:"], &["qemu:allocation-depth", "qemu:dirty-bitmap:b0"]),
        (&["x-unknown:foo", "base:nosuchleaf"], &[]),
        (&["base:", "base:allocation"], &["base:allocation"]),
    ];
    for (queries, expected) in cases {
        h.option(OptionType::LIST_META_CONTEXT, &meta_data("disk", queries))
            .unwrap();
        h.lookup("disk", Some(d.clone())).unwrap();
        let mut want = Vec::new();
        for e in *expected {
            want.extend(rep(
                OptionType::LIST_META_CONTEXT,
                ReplyType::META_CONTEXT,
                &meta_reply(0, e),
            ));
        }
        want.extend(rep(OptionType::LIST_META_CONTEXT, ReplyType::ACK, &[]));
        assert_eq!(h.sends(), want, "queries {queries:?}");
    }
    h.option(OptionType::LIST_META_CONTEXT, &meta_data("nope", &[]))
        .unwrap();
    h.lookup("nope", None).unwrap();
    assert_eq!(
        h.sends(),
        rep(OptionType::LIST_META_CONTEXT, ReplyType::ERR_UNKNOWN, b"unknown export")
    );
}

#[test]
fn set_meta_context_and_go() {
    let mut h = H::fixed();
    h.structured();
    let mut d = disk();
    d.meta_contexts.push("qemu:allocation-depth".to_string());
    // `base:` selects nothing in SET; unknown namespaces are ignored;
    // duplicates select once; ids are unique.
    h.option(
        OptionType::SET_META_CONTEXT,
        &meta_data(
            "disk",
            &[
                "base:",
                "x-foo:bar",
                "qemu:allocation-depth",
                "base:allocation",
                "base:allocation",
            ],
        ),
    )
    .unwrap();
    h.lookup("disk", Some(d.clone())).unwrap();
    let mut want = rep(
        OptionType::SET_META_CONTEXT,
        ReplyType::META_CONTEXT,
        &meta_reply(1, "base:allocation"),
    );
    want.extend(rep(
        OptionType::SET_META_CONTEXT,
        ReplyType::META_CONTEXT,
        &meta_reply(2, "qemu:allocation-depth"),
    ));
    want.extend(rep(OptionType::SET_META_CONTEXT, ReplyType::ACK, &[]));
    assert_eq!(h.sends(), want);

    // GO for another export: the selection does not apply.
    let mut h2 = H::fixed();
    h2.structured();
    h2.option(OptionType::SET_META_CONTEXT, &meta_data("disk", &["base:allocation"]))
        .unwrap();
    h2.lookup("disk", Some(d.clone())).unwrap();
    h2.sends();
    h2.option(OptionType::GO, &info_data("", &[])).unwrap();
    h2.lookup("", Some(d.clone())).unwrap();
    h2.sends();
    assert!(h2.hs.finish().unwrap().contexts.is_empty());

    // GO for the same name: it does.
    h.option(OptionType::GO, &info_data("disk", &[])).unwrap();
    h.lookup("disk", Some(d)).unwrap();
    h.sends();
    let n = h.hs.finish().unwrap();
    assert_eq!(
        n.contexts,
        vec![
            MetaContext {
                id: 1,
                name: "base:allocation".to_string()
            },
            MetaContext {
                id: 2,
                name: "qemu:allocation-depth".to_string()
            }
        ]
    );
}

#[test]
fn set_meta_context_zero_queries_and_failure_clear_selection() {
    let mut h = H::fixed();
    h.structured();
    h.option(OptionType::SET_META_CONTEXT, &meta_data("disk", &["base:allocation"]))
        .unwrap();
    h.lookup("disk", Some(disk())).unwrap();
    h.sends();
    // A failing SET (unknown export) still replaces the selection.
    h.option(OptionType::SET_META_CONTEXT, &meta_data("nope", &["base:allocation"]))
        .unwrap();
    h.lookup("nope", None).unwrap();
    h.sends();
    h.option(OptionType::GO, &info_data("disk", &[])).unwrap();
    h.lookup("disk", Some(disk())).unwrap();
    h.sends();
    assert!(h.hs.finish().unwrap().contexts.is_empty());

    let mut h = H::fixed();
    h.structured();
    h.option(OptionType::SET_META_CONTEXT, &meta_data("disk", &[])).unwrap();
    h.lookup("disk", Some(disk())).unwrap();
    assert_eq!(h.sends(), rep(OptionType::SET_META_CONTEXT, ReplyType::ACK, &[]));
}

#[test]
fn meta_context_malformed() {
    let mut h = H::fixed();
    h.structured();
    for o in [OptionType::LIST_META_CONTEXT, OptionType::SET_META_CONTEXT] {
        // Too short for name length + count.
        h.simple(o, &[0, 0, 0, 0], ReplyType::ERR_INVALID);
        h.simple(o, &[], ReplyType::ERR_INVALID);
        // Name length past the end.
        let mut d = meta_data("disk", &[]);
        d[3] = 200;
        h.simple(o, &d, ReplyType::ERR_INVALID);
        // Query count larger than the data can hold.
        let mut d = meta_data("disk", &["base:allocation"]);
        d[11] = 2;
        h.simple(o, &d, ReplyType::ERR_INVALID);
        // Query length past the end.
        let mut d = meta_data("disk", &["base:allocation"]);
        d[15] = 100;
        h.simple(o, &d, ReplyType::ERR_INVALID);
        // Trailing garbage.
        let mut d = meta_data("disk", &["base:allocation"]);
        d.push(0);
        h.simple(o, &d, ReplyType::ERR_INVALID);
        // No namespace.
        h.simple(o, &meta_data("disk", &["allocation"]), ReplyType::ERR_INVALID);
        h.simple(o, &meta_data("disk", &[":allocation"]), ReplyType::ERR_INVALID);
        // Strings over 4096 bytes.
        let long = std::format!("base:{}", "x".repeat(4092));
        h.simple(o, &meta_data("disk", &[&long]), ReplyType::ERR_INVALID);
        // Too many queries.
        let many: Vec<&str> = (0..129).map(|_| "base:allocation").collect();
        h.simple(o, &meta_data("disk", &many), ReplyType::ERR_TOO_BIG);
        // Count field claiming 2^32-1 queries: invalid, and nothing sized from it.
        let mut d = meta_data("disk", &[]);
        d[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        h.simple(o, &d, ReplyType::ERR_INVALID);
    }
    let ok: Vec<&str> = (0..128).map(|_| "base:allocation").collect();
    h.option(OptionType::SET_META_CONTEXT, &meta_data("disk", &ok)).unwrap();
    h.lookup("disk", Some(disk())).unwrap();
    assert!(
        h.sends()
            .ends_with(&rep(OptionType::SET_META_CONTEXT, ReplyType::ACK, &[]))
    );
}

#[test]
fn unknown_and_oversized_options_are_discarded() {
    let mut h = H::fixed();
    assert_eq!(h.option(OptionType::PEEK_EXPORT, b"12345").unwrap(), Some(false));
    assert_eq!(
        h.sends(),
        rep(OptionType::PEEK_EXPORT, ReplyType::ERR_UNSUP, b"option not supported")
    );
    // A 4 GiB unknown option: discarded, never buffered.
    let mut header = opt(OptionType(0x1234), &[]);
    header[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
    h.hs.received(&header).unwrap();
    assert_eq!(h.hs.step(), ServerStep::Discard(u32::MAX as usize));
    h.hs.discarded().unwrap();
    h.sends();
    // An INFO larger than MAX_OPTION_DATA: discarded, TOO_BIG.
    for o in [OptionType::INFO, OptionType::GO, OptionType::LIST_META_CONTEXT] {
        if o == OptionType::LIST_META_CONTEXT {
            h.structured();
        }
        let mut header = opt(o, &[]);
        header[12..16].copy_from_slice(&(MAX_OPTION_DATA + 1).to_be_bytes());
        h.hs.received(&header).unwrap();
        assert_eq!(h.hs.step(), ServerStep::Discard(MAX_OPTION_DATA as usize + 1));
        h.hs.discarded().unwrap();
        assert_eq!(h.sends(), rep(o, ReplyType::ERR_TOO_BIG, b"option data too large"));
    }
    // EXPORT_NAME longer than a string: closed without reading it.
    let mut header = opt(OptionType::EXPORT_NAME, &[]);
    header[12..16].copy_from_slice(&4097u32.to_be_bytes());
    let e = h.hs.received(&header).unwrap_err();
    assert!(matches!(
        e,
        ServerHandshakeError::Violation(ClientViolation::BadExportName(_))
    ));
    assert_eq!(h.hs.step(), ServerStep::Closed);
}

#[test]
fn option_limit() {
    let mut h = H::new(
        ServerConfig {
            max_options: 3,
            ..ServerConfig::default()
        },
        ClientFlags::FIXED_NEWSTYLE,
    );
    for _ in 0..3 {
        h.simple(OptionType(99), &[], ReplyType::ERR_UNSUP);
    }
    assert_eq!(h.hs.options_received(), 3);
    let e = h.option(OptionType(99), &[]).unwrap_err();
    assert_eq!(e, ServerHandshakeError::TooManyOptions(3));
    assert_eq!(h.hs.step(), ServerStep::Closed);
}

#[test]
fn export_name() {
    // NO_ZEROES negotiated: 10 bytes.
    let mut h = H::fixed();
    assert_eq!(h.option(OptionType::EXPORT_NAME, b"disk").unwrap(), Some(true));
    assert_eq!(h.hs.current_option(), OptionType::EXPORT_NAME);
    h.lookup("disk", Some(disk())).unwrap();
    let mut want = (1u64 << 20).to_be_bytes().to_vec();
    want.extend_from_slice(&BASE_FLAGS.bits().to_be_bytes());
    assert_eq!(h.sends(), want);
    assert_eq!(h.hs.step(), ServerStep::Done);
    let n = h.hs.finish().unwrap();
    assert_eq!(n.mode, Mode::ExportNameOnly);
    assert_eq!(n.requested_name, "disk");

    // Without NO_ZEROES: 124 zeroes follow.
    let mut h = H::new(ServerConfig::default(), ClientFlags::FIXED_NEWSTYLE);
    h.option(OptionType::EXPORT_NAME, b"").unwrap();
    h.lookup("", Some(disk())).unwrap();
    let mut want2 = want.clone();
    want2.extend_from_slice(&[0; 124]);
    assert_eq!(h.sends(), want2);

    // Unknown export: the session is terminated.
    let mut h = H::fixed();
    h.option(OptionType::EXPORT_NAME, b"nope").unwrap();
    assert_eq!(
        h.lookup("nope", None).unwrap_err(),
        ServerHandshakeError::UnknownExport("nope".to_string())
    );
    assert_eq!(h.hs.step(), ServerStep::Closed);

    // Invalid names close too.
    let mut h = H::fixed();
    let e = h.option(OptionType::EXPORT_NAME, b"a\xffb").unwrap_err();
    assert_eq!(e, ClientViolation::BadExportName("not UTF-8").into());

    // After STRUCTURED_REPLY, EXPORT_NAME keeps structured replies and the
    // contexts selected for that name.
    let mut h = H::fixed();
    h.structured();
    h.option(OptionType::SET_META_CONTEXT, &meta_data("disk", &["base:allocation"]))
        .unwrap();
    h.lookup("disk", Some(disk())).unwrap();
    h.sends();
    h.option(OptionType::EXPORT_NAME, b"disk").unwrap();
    h.lookup("disk", Some(disk())).unwrap();
    let got = h.sends();
    assert_eq!(
        &got[8..10],
        &(BASE_FLAGS | TransmissionFlags::SEND_DF).bits().to_be_bytes()
    );
    let n = h.hs.finish().unwrap();
    assert_eq!(n.mode, Mode::Structured);
    assert_eq!(n.contexts.len(), 1);
}

#[test]
fn oldstyle() {
    let mut hs = ServerHandshake::new(ServerConfig {
        oldstyle: true,
        ..ServerConfig::default()
    });
    assert_eq!(hs.step(), ServerStep::LookupExport { name: "" });
    let mut d = disk();
    d.flags |= TransmissionFlags::READ_ONLY;
    hs.answer_export(Some(d)).unwrap();
    let mut want = Vec::new();
    want.extend_from_slice(&NBDMAGIC.to_be_bytes());
    want.extend_from_slice(&CLISERV_MAGIC.to_be_bytes());
    want.extend_from_slice(&(1u64 << 20).to_be_bytes());
    want.extend_from_slice(&((BASE_FLAGS | TransmissionFlags::READ_ONLY).bits() as u32).to_be_bytes());
    want.extend_from_slice(&[0; 124]);
    assert_eq!(hs.step(), ServerStep::Send(&want));
    hs.sent();
    assert_eq!(hs.step(), ServerStep::Done);
    let n = hs.finish().unwrap();
    assert_eq!(n.mode, Mode::Oldstyle);
    assert_eq!(n.export_name, "disk");

    let mut hs = ServerHandshake::new(ServerConfig {
        oldstyle: true,
        ..ServerConfig::default()
    });
    assert_eq!(
        hs.answer_export(None),
        Err(ServerHandshakeError::UnknownExport(String::new()))
    );
    assert_eq!(hs.step(), ServerStep::Closed);
}

#[test]
fn go_unsupported() {
    let mut h = H::new(
        ServerConfig {
            support_go: false,
            ..ServerConfig::default()
        },
        ClientFlags::FIXED_NEWSTYLE,
    );
    // Extended headers would oblige the server to support GO.
    h.simple(OptionType::EXTENDED_HEADERS, &[], ReplyType::ERR_UNSUP);
    assert_eq!(h.option(OptionType::GO, &info_data("disk", &[])).unwrap(), Some(false));
    assert_eq!(
        h.sends(),
        rep(OptionType::GO, ReplyType::ERR_UNSUP, b"option not supported")
    );
    h.option(OptionType::INFO, &info_data("disk", &[])).unwrap();
    h.sends();
    h.option(OptionType::EXPORT_NAME, b"disk").unwrap();
    h.lookup("disk", Some(disk())).unwrap();
    h.sends();
    assert_eq!(h.hs.finish().unwrap().mode, Mode::ExportNameOnly);
}

#[test]
fn shutting_down() {
    let mut h = H::fixed();
    h.hs.shutdown();
    h.simple(OptionType::LIST, &[], ReplyType::ERR_SHUTDOWN);
    assert_eq!(h.option(OptionType::GO, &info_data("x", &[])).unwrap(), Some(false));
    h.sends();
    let mut h2 = H::fixed();
    h2.hs.shutdown();
    assert_eq!(
        h2.option(OptionType::EXPORT_NAME, b"x").unwrap_err(),
        ServerHandshakeError::ShuttingDown
    );
    h.option(OptionType::ABORT, &[]).unwrap();
    h.sends();
    assert_eq!(h.hs.step(), ServerStep::Aborted);
}

mod props {
    use super::*;
    use proptest::prelude::*;

    fn drive(config: ServerConfig, input: &[u8]) {
        let mut hs = ServerHandshake::new(config);
        let mut pos = 0usize;
        for _ in 0..10_000 {
            match hs.step() {
                ServerStep::Send(b) => {
                    assert!(!b.is_empty());
                    hs.sent();
                }
                ServerStep::Receive(n) => {
                    let Some(chunk) = input.get(pos..pos + n) else { return };
                    pos += n;
                    if hs.received(chunk).is_err() {
                        assert_eq!(hs.step(), ServerStep::Closed);
                        return;
                    }
                }
                ServerStep::Discard(n) => {
                    if input.len() - pos < n {
                        return;
                    }
                    pos += n;
                    hs.discarded().unwrap();
                }
                ServerStep::StartTls => hs.tls_established().unwrap(),
                ServerStep::LookupExport { name } => {
                    let answer = if name.len() % 2 == 0 {
                        let mut d = ExportDetails::new(name, 4096);
                        d.block_size_required = name.len() % 4 == 0;
                        Some(d)
                    } else {
                        None
                    };
                    let _ = hs.answer_export(answer);
                }
                ServerStep::ListExports => hs.answer_list(&[]).unwrap(),
                ServerStep::Done => {
                    hs.finish().unwrap();
                    return;
                }
                ServerStep::Aborted | ServerStep::Closed => return,
            }
        }
    }

    /// Plausible option streams: valid framing, random options and data.
    fn option_stream() -> impl Strategy<Value = Vec<u8>> {
        let one = (
            prop_oneof![0u32..14, any::<u32>()],
            proptest::collection::vec(any::<u8>(), 0..64),
            any::<bool>(),
        )
            .prop_map(|(o, data, bad_len)| {
                let mut v = opt(OptionType(o), &data);
                if bad_len {
                    v[12..16].copy_from_slice(&((data.len() as u32) ^ 0x0000_0101).to_be_bytes());
                }
                v
            });
        proptest::collection::vec(one, 0..12).prop_map(|opts| {
            let mut v = 3u32.to_be_bytes().to_vec();
            for o in opts {
                v.extend(o);
            }
            v
        })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..512), tls in 0u8..3) {
            let tls = [TlsPolicy::NoTls, TlsPolicy::ForcedTls, TlsPolicy::SelectiveTls][tls as usize];
            drive(ServerConfig { tls, ..ServerConfig::default() }, &input);
        }

        #[test]
        fn option_streams_never_panic(input in option_stream(), tls in 0u8..3, go in any::<bool>()) {
            let tls = [TlsPolicy::NoTls, TlsPolicy::ForcedTls, TlsPolicy::SelectiveTls][tls as usize];
            drive(ServerConfig { tls, support_go: go, max_options: 8, ..ServerConfig::default() }, &input);
        }
    }
}
