//! Property tests of the client machines: header round trips, and
//! arbitrary server bytes never panic, never make the machine ask for more
//! than a bounded amount, and always end in a value.

use nbd_proto::client::*;
use nbd_proto::wire::*;
use proptest::prelude::*;
use zerocopy::{FromBytes, IntoBytes};

/// Feeds `server` bytes to a handshake, answering every Send; returns the
/// final step's kind or the error.
fn run_handshake(config: ClientConfig, server: &[u8]) -> Result<&'static str, HandshakeError> {
    let mut hs = ClientHandshake::new(config);
    let mut pos = 0;
    for _ in 0..10_000 {
        match hs.step() {
            HandshakeStep::Send(b) => {
                assert!(b.len() <= 16 + 8 + 2 * 4100, "client sends bounded options");
                hs.sent();
            }
            HandshakeStep::Receive(n) => {
                // Never asks for more than the largest valid reply.
                assert!(n <= 4 + 2 * MAX_STRING_LEN + 64 + 200, "asked for {n} bytes");
                if pos + n > server.len() {
                    return Ok("eof");
                }
                hs.received(&server[pos..pos + n])?;
                pos += n;
            }
            HandshakeStep::StartTls => return Ok("starttls"),
            HandshakeStep::Negotiating => {
                hs.opt_list()?;
            }
            HandshakeStep::OptionDone => {
                hs.take_outcome();
            }
            HandshakeStep::Done => {
                hs.finish()?;
                return Ok("done");
            }
            HandshakeStep::Aborted => return Ok("aborted"),
        }
    }
    Ok("loop")
}

fn newstyle_greeting(flags: HandshakeFlags) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&NBDMAGIC.to_be_bytes());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&flags.bits().to_be_bytes());
    v
}

fn opt_reply(option: OptionType, reply: ReplyType, data: &[u8]) -> Vec<u8> {
    let h = OptionReplyHeader {
        magic: OPTION_REPLY_MAGIC.into(),
        option: option.0.into(),
        reply_type: reply.0.into(),
        length: (data.len() as u32).into(),
    };
    let mut v = h.as_bytes().to_vec();
    v.extend_from_slice(data);
    v
}

fn info_export(size: u64, flags: TransmissionFlags) -> Vec<u8> {
    InfoExport {
        info_type: InfoType::EXPORT.0.into(),
        size: size.into(),
        flags: flags.bits().into(),
    }
    .as_bytes()
    .to_vec()
}

/// A complete, valid server side of an automatic handshake that accepts
/// extended headers, one context and GO.
fn good_server(extended: bool) -> Vec<u8> {
    let mut s = newstyle_greeting(HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES);
    if extended {
        s.extend(opt_reply(OptionType::EXTENDED_HEADERS, ReplyType::ACK, &[]));
    } else {
        s.extend(opt_reply(OptionType::EXTENDED_HEADERS, ReplyType::ERR_UNSUP, b"no"));
        s.extend(opt_reply(OptionType::STRUCTURED_REPLY, ReplyType::ACK, &[]));
    }
    let mut ctx = 7u32.to_be_bytes().to_vec();
    ctx.extend_from_slice(b"base:allocation");
    s.extend(opt_reply(OptionType::SET_META_CONTEXT, ReplyType::META_CONTEXT, &ctx));
    s.extend(opt_reply(OptionType::SET_META_CONTEXT, ReplyType::ACK, &[]));
    let flags = TransmissionFlags::HAS_FLAGS | TransmissionFlags::SEND_FLUSH | TransmissionFlags::SEND_DF;
    s.extend(opt_reply(OptionType::GO, ReplyType::INFO, &info_export(1 << 20, flags)));
    s.extend(opt_reply(OptionType::GO, ReplyType::ACK, &[]));
    s
}

fn negotiate(extended: bool) -> Negotiated {
    let server = good_server(extended);
    let mut hs = ClientHandshake::new(ClientConfig::default());
    let mut pos = 0;
    loop {
        match hs.step() {
            HandshakeStep::Send(_) => hs.sent(),
            HandshakeStep::Receive(n) => {
                hs.received(&server[pos..pos + n]).unwrap();
                pos += n;
            }
            HandshakeStep::Done => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(pos, server.len());
    hs.finish().unwrap()
}

#[test]
fn automatic_handshake_reaches_extended_and_structured() {
    let n = negotiate(true);
    assert_eq!(n.mode, Mode::Extended);
    assert_eq!(n.size, 1 << 20);
    assert_eq!(n.context_id("base:allocation"), Some(7));
    let n = negotiate(false);
    assert_eq!(n.mode, Mode::Structured);
}

#[test]
fn go_unsupported_falls_back_to_export_name() {
    let mut s = newstyle_greeting(HandshakeFlags::FIXED_NEWSTYLE);
    s.extend(opt_reply(OptionType::EXTENDED_HEADERS, ReplyType::ERR_UNSUP, &[]));
    s.extend(opt_reply(OptionType::STRUCTURED_REPLY, ReplyType::ERR_UNSUP, &[]));
    s.extend(opt_reply(OptionType::GO, ReplyType::ERR_UNSUP, &[]));
    s.extend_from_slice(&(4096u64).to_be_bytes());
    s.extend_from_slice(&(TransmissionFlags::HAS_FLAGS.bits()).to_be_bytes());
    s.extend_from_slice(&[0u8; 124]);
    let mut hs = ClientHandshake::new(ClientConfig::default());
    let mut pos = 0;
    loop {
        match hs.step() {
            HandshakeStep::Send(_) => hs.sent(),
            HandshakeStep::Receive(n) => {
                hs.received(&s[pos..pos + n]).unwrap();
                pos += n;
            }
            HandshakeStep::Done => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    let n = hs.finish().unwrap();
    assert_eq!(n.mode, Mode::ExportNameOnly);
    assert_eq!(n.size, 4096);
}

#[test]
fn server_errors_are_typed() {
    let mut s = good_server(true);
    // Replace the GO part with an ERR_UNKNOWN carrying a message.
    let go_start = s.len() - (20 + 12) - 20;
    s.truncate(go_start);
    s.extend(opt_reply(OptionType::GO, ReplyType::ERR_UNKNOWN, b"no such export"));
    let err = run_handshake(ClientConfig::default(), &s).unwrap_err();
    match err {
        HandshakeError::Refused(e) => {
            assert_eq!(e.option, OptionType::GO);
            assert_eq!(e.reply, ReplyType::ERR_UNKNOWN);
            assert_eq!(e.message, "no such export");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_magic_and_oversized_reply_are_violations() {
    let mut s = Vec::new();
    s.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    assert!(matches!(
        run_handshake(ClientConfig::default(), &s),
        Err(HandshakeError::Violation(HandshakeViolation::BadInitPasswd(_)))
    ));
    let mut s = newstyle_greeting(HandshakeFlags::FIXED_NEWSTYLE);
    let h = OptionReplyHeader {
        magic: OPTION_REPLY_MAGIC.into(),
        option: OptionType::EXTENDED_HEADERS.0.into(),
        reply_type: ReplyType::ACK.0.into(),
        length: u32::MAX.into(),
    };
    s.extend_from_slice(h.as_bytes());
    assert!(matches!(
        run_handshake(ClientConfig::default(), &s),
        Err(HandshakeError::Violation(HandshakeViolation::ReplyTooLarge { .. }))
    ));
}

/// Runs a transmission machine over server bytes after issuing `reqs`.
fn run_replies(n: &Negotiated, reqs: &[Request], server: &[u8]) -> Result<usize, ReplyViolation> {
    let mut tx = ClientTransmission::new(n, 16);
    tx.set_strict(true);
    for r in reqs {
        let _ = tx.start_request(*r);
    }
    let mut pos = 0;
    let mut done = 0;
    for _ in 0..10_000 {
        let ev = match tx.next() {
            ReceiveNext::Bytes(0) => return Ok(done),
            ReceiveNext::Bytes(k) => {
                // Metadata reads are bounded by the largest valid chunk.
                assert!(k <= 8 + 16 * MAX_BLOCK_STATUS_EXTENTS, "asked {k}");
                if pos + k > server.len() {
                    return Ok(done);
                }
                let ev = tx.handle_bytes(&server[pos..pos + k])?;
                pos += k;
                if let ReplyEvent::BlockStatus { extents, .. } = &ev {
                    for e in extents.clone() {
                        assert!(e.length > 0);
                    }
                }
                matches!(ev, ReplyEvent::Done { .. })
            }
            ReceiveNext::Data { length, .. } => {
                let k = length as usize;
                if pos + k > server.len() {
                    return Ok(done);
                }
                pos += k;
                matches!(tx.data_received()?, ReplyEvent::Done { .. })
            }
            ReceiveNext::Complete => matches!(tx.complete_pending()?, ReplyEvent::Done { .. }),
        };
        if ev {
            done += 1;
        }
    }
    Ok(done)
}

fn sreply(flags: u16, ty: ReplyChunkType, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let h = StructuredReplyHeader {
        magic: STRUCTURED_REPLY_MAGIC.into(),
        flags: flags.into(),
        chunk_type: ty.0.into(),
        cookie: cookie.into(),
        length: (payload.len() as u32).into(),
    };
    let mut v = h.as_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

#[test]
fn structured_read_with_hole_and_data() {
    let n = negotiate(false);
    let mut tx = ClientTransmission::new(&n, 4);
    let (cookie, hdr) = tx.start_request(Request::new(Command::READ, 4096, 8192)).unwrap();
    let (h, _) = RequestHeader::read_from_prefix(hdr.as_bytes()).unwrap();
    assert_eq!(h.magic.get(), REQUEST_MAGIC);
    assert_eq!(h.length.get(), 8192);
    let mut hole = (4096u64).to_be_bytes().to_vec();
    hole.extend_from_slice(&4096u32.to_be_bytes());
    let mut wire = sreply(0, ReplyChunkType::OFFSET_HOLE, cookie.0, &hole);
    let mut data = (8192u64).to_be_bytes().to_vec();
    data.extend_from_slice(&[0xaa; 4096]);
    wire.extend(sreply(1, ReplyChunkType::OFFSET_DATA, cookie.0, &data));
    let mut buf = vec![0xffu8; 8192];
    let mut pos = 0;
    let mut result = None;
    while result.is_none() {
        match tx.next() {
            ReceiveNext::Bytes(k) => {
                let ev = tx.handle_bytes(&wire[pos..pos + k]).unwrap();
                pos += k;
                if let ReplyEvent::Hole { buf_offset, length, .. } = ev {
                    buf[buf_offset as usize..(buf_offset + length) as usize].fill(0);
                }
            }
            ReceiveNext::Data { buf_offset, length, .. } => {
                let b = buf_offset as usize;
                buf[b..b + length as usize].copy_from_slice(&wire[pos..pos + length as usize]);
                pos += length as usize;
                if let ReplyEvent::Done { result: r, .. } = tx.data_received().unwrap() {
                    result = Some(r);
                }
            }
            ReceiveNext::Complete => unreachable!(),
        }
    }
    assert_eq!(result, Some(Ok(())));
    assert!(buf[..4096].iter().all(|&b| b == 0));
    assert!(buf[4096..].iter().all(|&b| b == 0xaa));
    assert_eq!(tx.in_flight(), 0);
}

#[test]
fn reply_checks() {
    let n = negotiate(false);
    let read = Request::new(Command::READ, 0, 4096);
    // cookie of the first request in a fresh machine: generation 1, slot 0
    let c0 = 1u64 << 32;
    // Unknown cookie.
    let w = sreply(1, ReplyChunkType::NONE, 12345, &[]);
    assert_eq!(run_replies(&n, &[read], &w), Err(ReplyViolation::UnknownCookie(12345)));
    // Data outside the request.
    let mut d = (4096u64).to_be_bytes().to_vec();
    d.extend_from_slice(&[1; 16]);
    let w = sreply(1, ReplyChunkType::OFFSET_DATA, c0, &d);
    assert!(matches!(
        run_replies(&n, &[read], &w),
        Err(ReplyViolation::OutsideRequest { .. })
    ));
    // Success that does not cover the request.
    let w = sreply(1, ReplyChunkType::NONE, c0, &[]);
    assert!(matches!(
        run_replies(&n, &[read], &w),
        Err(ReplyViolation::ShortRead { .. })
    ));
    // Error chunk: typed error, connection usable.
    let mut e = 5u32.to_be_bytes().to_vec();
    e.extend_from_slice(&4u16.to_be_bytes());
    e.extend_from_slice(b"oops");
    let w = sreply(1, ReplyChunkType::ERROR, c0, &e);
    assert_eq!(run_replies(&n, &[read], &w), Ok(1));
    // Block status for a context never negotiated.
    let bs = Request::new(Command::BLOCK_STATUS, 0, 4096);
    let mut p = 99u32.to_be_bytes().to_vec();
    p.extend_from_slice(&4096u32.to_be_bytes());
    p.extend_from_slice(&0u32.to_be_bytes());
    let w = sreply(1, ReplyChunkType::BLOCK_STATUS, c0, &p);
    assert_eq!(run_replies(&n, &[bs], &w), Err(ReplyViolation::UnknownContext(99)));
    // Hole of size zero.
    let mut h = 0u64.to_be_bytes().to_vec();
    h.extend_from_slice(&0u32.to_be_bytes());
    let w = sreply(1, ReplyChunkType::OFFSET_HOLE, c0, &h);
    assert_eq!(run_replies(&n, &[read], &w), Err(ReplyViolation::ZeroHole));
    // Unknown non-error chunk type.
    let w = sreply(1, ReplyChunkType(77), c0, &[]);
    assert_eq!(
        run_replies(&n, &[read], &w),
        Err(ReplyViolation::UnknownChunk(ReplyChunkType(77)))
    );
}

#[test]
fn requests_refused_before_the_wire() {
    let mut n = negotiate(false);
    n.flags = TransmissionFlags::HAS_FLAGS | TransmissionFlags::READ_ONLY;
    n.block_size = Some(BlockSizeConstraints {
        minimum: 512,
        preferred: 4096,
        maximum: 65536,
    });
    let mut tx = ClientTransmission::new(&n, 2);
    let e = |r: Result<(Cookie, EncodedHeader), RequestError>| r.err();
    assert_eq!(
        e(tx.start_request(Request::new(Command::WRITE, 0, 512))),
        Some(RequestError::ReadOnly(Command::WRITE))
    );
    assert!(matches!(
        e(tx.start_request(Request::new(Command::FLUSH, 0, 0))),
        Some(RequestError::NotAdvertised { .. })
    ));
    assert!(matches!(
        e(tx.start_request(Request::new(Command::TRIM, 0, 512))),
        Some(RequestError::ReadOnly(_))
    ));
    assert!(matches!(
        e(tx.start_request(Request::new(Command::READ, 0, 512).with_flags(CommandFlags::FUA))),
        Some(RequestError::BadFlag { .. })
    ));
    assert!(matches!(
        e(tx.start_request(Request::new(Command::READ, 1 << 20, 512))),
        Some(RequestError::OutOfRange { .. })
    ));
    assert!(matches!(
        e(tx.start_request(Request::new(Command::READ, u64::MAX - 10, 512))),
        Some(RequestError::OutOfRange { .. })
    ));
    assert!(matches!(
        e(tx.start_request(Request::new(Command::READ, 100, 512))),
        Some(RequestError::Unaligned { .. })
    ));
    assert!(matches!(
        e(tx.start_request(Request::new(Command::READ, 0, 131072))),
        Some(RequestError::TooLarge { .. })
    ));
    // Two fit in the table, the third does not.
    tx.start_request(Request::new(Command::READ, 0, 512)).unwrap();
    tx.start_request(Request::new(Command::READ, 0, 512)).unwrap();
    assert_eq!(
        e(tx.start_request(Request::new(Command::READ, 0, 512))),
        Some(RequestError::TooManyInFlight(2))
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn handshake_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..2048), ext in any::<bool>(), cut in 0usize..400) {
        // A valid prefix then garbage, so the fuzzing reaches deep states.
        let mut s = good_server(ext);
        s.truncate(cut.min(s.len()));
        s.extend(tail);
        let _ = run_handshake(ClientConfig::default(), &s);
        let _ = run_handshake(ClientConfig::default().opt_mode(true), &s);
    }

    #[test]
    fn replies_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096), ext in any::<bool>(), cmds in proptest::collection::vec(0u16..8, 1..6)) {
        let n = negotiate(ext);
        let reqs: Vec<Request> = cmds.iter().map(|&c| {
            let cmd = Command(c);
            let len = if cmd == Command::FLUSH || cmd == Command::DISC { 0 } else { 4096 };
            Request::new(cmd, 0, len)
        }).collect();
        // Random bytes, and random bytes after a plausible header.
        let _ = run_replies(&n, &reqs, &bytes);
        let mut w = if ext { EXTENDED_REPLY_MAGIC } else { STRUCTURED_REPLY_MAGIC }.to_be_bytes().to_vec();
        w.extend_from_slice(&bytes);
        let _ = run_replies(&n, &reqs, &w);
    }

    #[test]
    fn request_headers_roundtrip(flags in any::<u16>(), cmd in any::<u16>(), cookie in any::<u64>(), offset in any::<u64>(), len in any::<u64>()) {
        let h = ExtendedRequestHeader { magic: EXTENDED_REQUEST_MAGIC.into(), flags: flags.into(), command: cmd.into(), cookie: cookie.into(), offset: offset.into(), length: len.into() };
        let (back, rest) = ExtendedRequestHeader::read_from_prefix(h.as_bytes()).unwrap();
        prop_assert!(rest.is_empty());
        prop_assert_eq!(back, h);
        let r = ExtendedReplyHeader { magic: EXTENDED_REPLY_MAGIC.into(), flags: flags.into(), chunk_type: cmd.into(), cookie: cookie.into(), offset: offset.into(), length: len.into() };
        prop_assert_eq!(ExtendedReplyHeader::read_from_prefix(r.as_bytes()).unwrap().0, r);
        let o = OptionReplyHeader { magic: OPTION_REPLY_MAGIC.into(), option: (cmd as u32).into(), reply_type: (flags as u32).into(), length: (len as u32).into() };
        prop_assert_eq!(OptionReplyHeader::read_from_prefix(o.as_bytes()).unwrap().0, o);
    }
}
