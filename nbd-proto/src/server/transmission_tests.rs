//! Unit tests of server transmission: request validation and reply encoding.

use super::*;
use std::string::{String, ToString};
use std::vec;
use std::vec::Vec;

const ALL_FLAGS: TransmissionFlags = TransmissionFlags::HAS_FLAGS
    .union(TransmissionFlags::SEND_FLUSH)
    .union(TransmissionFlags::SEND_FUA)
    .union(TransmissionFlags::SEND_TRIM)
    .union(TransmissionFlags::SEND_WRITE_ZEROES)
    .union(TransmissionFlags::SEND_FAST_ZERO)
    .union(TransmissionFlags::SEND_CACHE);

fn neg(mode: Mode, flags: TransmissionFlags) -> ServerNegotiated {
    let mut flags = flags;
    if mode.structured() {
        flags |= TransmissionFlags::SEND_DF;
    }
    ServerNegotiated {
        mode,
        export_name: "disk".to_string(),
        requested_name: String::new(),
        size: 1 << 20,
        flags,
        block_size: None,
        contexts: if mode.structured() {
            vec![MetaContext {
                id: 7,
                name: CONTEXT_BASE_ALLOCATION.to_string(),
            }]
        } else {
            Vec::new()
        },
        tls: false,
        client_requested_block_size: false,
    }
}

fn hdr(extended: bool, flags: CommandFlags, cmd: Command, cookie: u64, offset: u64, length: u64) -> Vec<u8> {
    if extended {
        ExtendedRequestHeader {
            magic: EXTENDED_REQUEST_MAGIC.into(),
            flags: flags.bits().into(),
            command: cmd.0.into(),
            cookie: cookie.into(),
            offset: offset.into(),
            length: length.into(),
        }
        .as_bytes()
        .to_vec()
    } else {
        RequestHeader {
            magic: REQUEST_MAGIC.into(),
            flags: flags.bits().into(),
            command: cmd.0.into(),
            cookie: cookie.into(),
            offset: offset.into(),
            length: (length as u32).into(),
        }
        .as_bytes()
        .to_vec()
    }
}

/// Feeds one header; returns the event.
fn feed(t: &mut ServerTransmission, flags: CommandFlags, cmd: Command, offset: u64, length: u64) -> RequestEvent {
    let ext = t.mode().extended();
    assert_eq!(t.next(), ServerReceive::Bytes(if ext { 32 } else { 28 }));
    t.handle_bytes(&hdr(ext, flags, cmd, 42, offset, length)).unwrap()
}

fn rejected(ev: RequestEvent) -> ErrorCode {
    match ev {
        RequestEvent::Reject { error, request, .. } => {
            assert_eq!(request.cookie, 42);
            error
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
}

fn accepted(ev: RequestEvent) -> ServerRequest {
    match ev {
        RequestEvent::Request(r) => r,
        other => panic!("expected a request, got {other:?}"),
    }
}

fn check(t: &mut ServerTransmission, flags: CommandFlags, cmd: Command, offset: u64, length: u64) -> Option<ErrorCode> {
    let ev = feed(t, flags, cmd, offset, length);
    // Leave the machine ready for the next header.
    match t.next() {
        ServerReceive::Payload { .. } => t.payload_received().unwrap(),
        ServerReceive::Discard(_) => t.discarded().unwrap(),
        _ => {}
    }
    match ev {
        RequestEvent::Request(_) => None,
        RequestEvent::Reject { error, .. } => Some(error),
        other => panic!("unexpected {other:?}"),
    }
}

const NONE: CommandFlags = CommandFlags::empty();

#[test]
fn valid_requests_compact() {
    let mut t = ServerTransmission::new(&neg(Mode::Structured, ALL_FLAGS));
    let r = accepted(feed(
        &mut t,
        CommandFlags::DF | CommandFlags::FUA,
        Command::READ,
        4096,
        512,
    ));
    assert_eq!(
        r,
        ServerRequest {
            cookie: 42,
            command: Command::READ,
            flags: CommandFlags::DF | CommandFlags::FUA,
            offset: 4096,
            length: 512,
            contexts: ContextSelection::All,
        }
    );
    assert!(r.fua());
    assert_eq!(t.next(), ServerReceive::Bytes(28));
    // WRITE: the payload is announced, then the header again.
    let r = accepted(feed(&mut t, NONE, Command::WRITE, 0, 100));
    assert_eq!(r.length, 100);
    assert_eq!(
        t.next(),
        ServerReceive::Payload {
            cookie: 42,
            length: 100
        }
    );
    assert!(matches!(
        t.handle_bytes(&[0; 28]),
        Err(ServerTransmissionError::Misuse(_))
    ));
    t.payload_received().unwrap();
    assert_eq!(t.next(), ServerReceive::Bytes(28));
    // A zero-length write has no payload.
    accepted(feed(&mut t, NONE, Command::WRITE, 0, 0));
    assert_eq!(t.next(), ServerReceive::Bytes(28));
    for (f, c, o, l) in [
        (NONE, Command::FLUSH, 0, 0),
        (CommandFlags::FUA, Command::TRIM, 0, 1 << 20),
        (
            CommandFlags::NO_HOLE | CommandFlags::FAST_ZERO,
            Command::WRITE_ZEROES,
            512,
            512,
        ),
        (NONE, Command::CACHE, 0, 1),
        (CommandFlags::REQ_ONE, Command::BLOCK_STATUS, 0, 1 << 20),
        (NONE, Command::READ, (1 << 20) - 1, 1),
    ] {
        assert_eq!(check(&mut t, f, c, o, l), None, "{c} {f:?}");
    }
}

#[test]
fn bad_magic_is_fatal() {
    let mut t = ServerTransmission::new(&neg(Mode::Simple, ALL_FLAGS));
    let mut h = hdr(false, NONE, Command::READ, 1, 0, 1);
    h[3] ^= 1;
    let e = t.handle_bytes(&h).unwrap_err();
    assert_eq!(e, RequestViolation::BadMagic(Hex(REQUEST_MAGIC ^ 1)).into());
    assert_eq!(t.next(), ServerReceive::Closed);
    assert!(t.is_closed());
    assert_eq!(t.handle_bytes(&h), Err(ServerTransmissionError::Closed));

    // Compact magic with extended headers.
    let mut t = ServerTransmission::new(&neg(Mode::Extended, ALL_FLAGS));
    let mut h = hdr(false, NONE, Command::READ, 1, 0, 1);
    h.extend_from_slice(&[0; 4]);
    assert_eq!(
        t.handle_bytes(&h).unwrap_err(),
        RequestViolation::BadMagic(Hex(REQUEST_MAGIC)).into()
    );
}

#[test]
fn wrong_length_is_misuse() {
    let mut t = ServerTransmission::new(&neg(Mode::Simple, ALL_FLAGS));
    assert!(matches!(
        t.handle_bytes(&[0; 27]),
        Err(ServerTransmissionError::Misuse(_))
    ));
    assert!(matches!(t.payload_received(), Err(ServerTransmissionError::Misuse(_))));
    assert!(matches!(t.discarded(), Err(ServerTransmissionError::Misuse(_))));
    assert_eq!(t.next(), ServerReceive::Bytes(28));
}

#[test]
fn disconnect() {
    let mut t = ServerTransmission::new(&neg(Mode::Simple, ALL_FLAGS));
    assert_eq!(feed(&mut t, NONE, Command::DISC, 0, 0), RequestEvent::Disconnect);
    assert_eq!(t.next(), ServerReceive::Closed);
}

#[test]
fn errors_per_spec() {
    let mut t = ServerTransmission::new(&neg(Mode::Simple, ALL_FLAGS));
    let einval = Some(ErrorCode::EINVAL);
    // Unknown command and RESIZE (not implemented).
    assert_eq!(check(&mut t, NONE, Command(99), 0, 0), einval);
    assert_eq!(check(&mut t, NONE, Command::RESIZE, 0, 0), einval);
    // Unknown flag bits, and flags not valid for the command.
    assert_eq!(
        check(&mut t, CommandFlags::from_bits_retain(1 << 9), Command::READ, 0, 1),
        einval
    );
    assert_eq!(check(&mut t, CommandFlags::NO_HOLE, Command::READ, 0, 1), einval);
    assert_eq!(check(&mut t, CommandFlags::REQ_ONE, Command::TRIM, 0, 1), einval);
    // PAYLOAD_LEN is never valid with compact headers; the WRITE payload
    // is still consumed.
    assert_eq!(check(&mut t, CommandFlags::PAYLOAD_LEN, Command::WRITE, 0, 1), einval);
    // DF needs structured replies (SEND_DF).
    assert_eq!(check(&mut t, CommandFlags::DF, Command::READ, 0, 1), einval);
    // Block status needs contexts.
    assert_eq!(check(&mut t, NONE, Command::BLOCK_STATUS, 0, 1), einval);
    // Past the end: ENOSPC for writes, EINVAL otherwise; overflow too.
    let end = 1u64 << 20;
    assert_eq!(check(&mut t, NONE, Command::WRITE, end, 1), Some(ErrorCode::ENOSPC));
    assert_eq!(
        check(&mut t, NONE, Command::WRITE_ZEROES, end - 1, 2),
        Some(ErrorCode::ENOSPC)
    );
    assert_eq!(check(&mut t, NONE, Command::READ, end, 1), einval);
    assert_eq!(check(&mut t, NONE, Command::TRIM, u64::MAX, 2), einval);
    assert_eq!(check(&mut t, NONE, Command::CACHE, end + 1, 0), einval);
    // A zero-length read at the very end is in range.
    assert_eq!(check(&mut t, NONE, Command::READ, end, 0), None);
    // FLUSH must have zero offset and length.
    assert_eq!(check(&mut t, NONE, Command::FLUSH, 1, 0), einval);
    assert_eq!(check(&mut t, NONE, Command::FLUSH, 0, 1), einval);
    // READ larger than the maximum payload, simple mode: EINVAL.
    let mut big = neg(Mode::Simple, ALL_FLAGS);
    big.size = 1 << 30;
    let mut t = ServerTransmission::new(&big);
    assert_eq!(check(&mut t, NONE, Command::READ, 0, (1 << 25) + 1), einval);
    assert_eq!(check(&mut t, NONE, Command::READ, 0, 1 << 25), None);
    // ... structured: EOVERFLOW.
    big.mode = Mode::Structured;
    let mut t = ServerTransmission::new(&big);
    assert_eq!(
        check(&mut t, NONE, Command::READ, 0, (1 << 25) + 1),
        Some(ErrorCode::EOVERFLOW)
    );
    // Commands without payload may exceed it.
    assert_eq!(check(&mut t, NONE, Command::TRIM, 0, 1 << 30), None);
}

#[test]
fn not_advertised() {
    let mut t = ServerTransmission::new(&neg(Mode::Structured, TransmissionFlags::HAS_FLAGS));
    let einval = Some(ErrorCode::EINVAL);
    assert_eq!(check(&mut t, NONE, Command::FLUSH, 0, 0), einval);
    assert_eq!(check(&mut t, NONE, Command::TRIM, 0, 1), einval);
    assert_eq!(check(&mut t, NONE, Command::WRITE_ZEROES, 0, 1), einval);
    assert_eq!(check(&mut t, NONE, Command::CACHE, 0, 1), einval);
    assert_eq!(check(&mut t, CommandFlags::FUA, Command::WRITE, 0, 1), einval);
    let mut n = neg(
        Mode::Structured,
        TransmissionFlags::HAS_FLAGS | TransmissionFlags::SEND_WRITE_ZEROES,
    );
    n.flags.remove(TransmissionFlags::SEND_DF);
    let mut t = ServerTransmission::new(&n);
    assert_eq!(
        check(&mut t, CommandFlags::FAST_ZERO, Command::WRITE_ZEROES, 0, 1),
        einval
    );
    assert_eq!(check(&mut t, CommandFlags::DF, Command::READ, 0, 1), einval);
    assert_eq!(check(&mut t, CommandFlags::NO_HOLE, Command::WRITE_ZEROES, 0, 1), None);
}

#[test]
fn read_only() {
    let mut t = ServerTransmission::new(&neg(Mode::Simple, ALL_FLAGS | TransmissionFlags::READ_ONLY));
    let ev = feed(&mut t, NONE, Command::WRITE, 0, 4096);
    assert_eq!(rejected(ev), ErrorCode::EPERM);
    // The payload is consumed before the next request.
    assert_eq!(t.next(), ServerReceive::Discard(4096));
    t.discarded().unwrap();
    assert_eq!(check(&mut t, NONE, Command::TRIM, 0, 1), Some(ErrorCode::EPERM));
    assert_eq!(check(&mut t, NONE, Command::WRITE_ZEROES, 0, 1), Some(ErrorCode::EPERM));
    assert_eq!(check(&mut t, NONE, Command::READ, 0, 1), None);
    assert_eq!(check(&mut t, NONE, Command::FLUSH, 0, 0), None);
}

/// A read-only export advertises no TRIM, WRITE_ZEROES or FUA; modifying
/// commands sent anyway still get `NBD_EPERM` (as the spec asks), not
/// the `NBD_EINVAL` of an unadvertised command.
#[test]
fn read_only_without_write_flags() {
    let flags = TransmissionFlags::HAS_FLAGS | TransmissionFlags::READ_ONLY | TransmissionFlags::SEND_FLUSH;
    let mut t = ServerTransmission::new(&neg(Mode::Structured, flags));
    assert_eq!(check(&mut t, NONE, Command::TRIM, 0, 1), Some(ErrorCode::EPERM));
    assert_eq!(check(&mut t, NONE, Command::WRITE_ZEROES, 0, 1), Some(ErrorCode::EPERM));
    assert_eq!(
        check(&mut t, CommandFlags::NO_HOLE, Command::WRITE_ZEROES, 0, 1),
        Some(ErrorCode::EPERM)
    );
    let ev = feed(&mut t, CommandFlags::FUA, Command::WRITE, 0, 512);
    assert_eq!(rejected(ev), ErrorCode::EPERM);
    assert_eq!(t.next(), ServerReceive::Discard(512));
    t.discarded().unwrap();
    // Flags invalid for the command stay NBD_EINVAL.
    assert_eq!(
        check(&mut t, CommandFlags::DF, Command::TRIM, 0, 1),
        Some(ErrorCode::EINVAL)
    );
    // CACHE is not a write: unadvertised, it is NBD_EINVAL.
    assert_eq!(check(&mut t, NONE, Command::CACHE, 0, 1), Some(ErrorCode::EINVAL));
    assert_eq!(check(&mut t, NONE, Command::READ, 0, 1), None);
}

#[test]
fn alignment() {
    let mut n = neg(Mode::Simple, ALL_FLAGS);
    n.size = 10 * 512 + 100; // not a multiple of the minimum
    n.block_size = Some(BlockSizeConstraints {
        minimum: 512,
        preferred: 4096,
        maximum: 1 << 16,
    });
    let mut t = ServerTransmission::new(&n);
    let einval = Some(ErrorCode::EINVAL);
    assert_eq!(check(&mut t, NONE, Command::READ, 512, 1024), None);
    assert_eq!(check(&mut t, NONE, Command::READ, 1, 512), einval);
    assert_eq!(check(&mut t, NONE, Command::TRIM, 512, 100), einval);
    // The partial last block is addressable.
    assert_eq!(check(&mut t, NONE, Command::READ, 10 * 512, 100), None);
    assert_eq!(check(&mut t, NONE, Command::WRITE, 9 * 512, 612), None);
    // Maximum payload: a compact WRITE over it (but within 2^25) is
    // consumed and refused.
    n.size = 1 << 20;
    let mut t = ServerTransmission::new(&n);
    let ev = feed(&mut t, NONE, Command::WRITE, 0, (1 << 16) + 512);
    assert_eq!(rejected(ev), ErrorCode::EINVAL);
    assert_eq!(t.next(), ServerReceive::Discard((1 << 16) + 512));
    t.discarded().unwrap();
    // Beyond 2^25: a hard disconnect.
    let h = hdr(false, NONE, Command::WRITE, 1, 0, (1 << 25) + 1);
    assert_eq!(
        t.handle_bytes(&h).unwrap_err(),
        RequestViolation::PayloadTooLarge {
            command: Command::WRITE,
            length: (1 << 25) + 1,
            limit: 1 << 25
        }
        .into()
    );
    assert_eq!(t.next(), ServerReceive::Closed);
}

#[test]
fn extended_framing() {
    let mut n = neg(Mode::Extended, ALL_FLAGS);
    n.block_size = Some(BlockSizeConstraints {
        minimum: 1,
        preferred: 4096,
        maximum: 1 << 16,
    });
    let mut t = ServerTransmission::new(&n);
    // WRITE should carry PAYLOAD_LEN, but QEMU's client leaves it out:
    // the data follows all the same, as QEMU's server assumes.
    let r = accepted(feed(&mut t, NONE, Command::WRITE, 0, 512));
    assert_eq!(r.length, 512);
    assert_eq!(
        t.next(),
        ServerReceive::Payload {
            cookie: 42,
            length: 512
        }
    );
    t.payload_received().unwrap();
    let r = accepted(feed(&mut t, CommandFlags::PAYLOAD_LEN, Command::WRITE, 0, 512));
    assert_eq!(r.length, 512);
    assert_eq!(
        t.next(),
        ServerReceive::Payload {
            cookie: 42,
            length: 512
        }
    );
    t.payload_received().unwrap();
    // A payload on a command that takes none: consumed, then EINVAL.
    let ev = feed(&mut t, CommandFlags::PAYLOAD_LEN, Command::READ, 0, 16);
    assert_eq!(rejected(ev), ErrorCode::EINVAL);
    assert_eq!(t.next(), ServerReceive::Discard(16));
    t.discarded().unwrap();
    // 64-bit effect lengths for commands without payload.
    let mut big = n.clone();
    big.size = 1 << 40;
    let mut t2 = ServerTransmission::new(&big);
    assert_eq!(check(&mut t2, NONE, Command::TRIM, 0, 1 << 36), None);
    assert_eq!(
        check(&mut t2, NONE, Command::READ, 0, 1 << 36),
        Some(ErrorCode::EOVERFLOW)
    );
    // PAYLOAD_LEN beyond the advertised maximum: hard disconnect.
    let h = hdr(true, CommandFlags::PAYLOAD_LEN, Command::WRITE, 1, 0, (1 << 16) + 1);
    assert!(matches!(
        t.handle_bytes(&h),
        Err(ServerTransmissionError::Violation(
            RequestViolation::PayloadTooLarge { .. }
        ))
    ));
    assert_eq!(t.next(), ServerReceive::Closed);
}

#[test]
fn block_status_checks() {
    let mut t = ServerTransmission::new(&neg(Mode::Structured, ALL_FLAGS));
    assert_eq!(
        check(&mut t, NONE, Command::BLOCK_STATUS, 0, 0),
        Some(ErrorCode::EINVAL)
    );
    assert_eq!(check(&mut t, NONE, Command::BLOCK_STATUS, 0, 1), None);
    assert_eq!(
        check(&mut t, CommandFlags::PAYLOAD_LEN, Command::BLOCK_STATUS, 0, 1),
        Some(ErrorCode::EINVAL)
    );
    let mut n = neg(Mode::Structured, ALL_FLAGS);
    n.contexts.clear();
    let mut t = ServerTransmission::new(&n);
    assert_eq!(
        check(&mut t, NONE, Command::BLOCK_STATUS, 0, 1),
        Some(ErrorCode::EINVAL)
    );
}

fn bs_payload(effect: u64, ids: &[u32]) -> Vec<u8> {
    let mut v = effect.to_be_bytes().to_vec();
    for id in ids {
        v.extend_from_slice(&id.to_be_bytes());
    }
    v
}

#[test]
fn block_status_payload_form() {
    let mut n = neg(Mode::Extended, ALL_FLAGS | TransmissionFlags::BLOCK_STATUS_PAYLOAD);
    n.contexts.push(MetaContext {
        id: 9,
        name: "qemu:allocation-depth".to_string(),
    });
    let mut t = ServerTransmission::new(&n);
    let pl = CommandFlags::PAYLOAD_LEN;
    // Valid: only context 9.
    let p = bs_payload(4096, &[9]);
    assert_eq!(
        feed(&mut t, pl, Command::BLOCK_STATUS, 512, p.len() as u64),
        RequestEvent::Continue
    );
    assert_eq!(t.next(), ServerReceive::Bytes(12));
    let r = accepted(t.handle_bytes(&p).unwrap());
    assert_eq!(r.length, 4096);
    assert_eq!(r.offset, 512);
    assert_eq!(r.contexts, ContextSelection::Only(0b10));
    let names: Vec<&str> = t.selected_contexts(&r).map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["qemu:allocation-depth"]);
    // Duplicate and unknown ids: consumed, EINVAL.
    for ids in [&[7u32, 7][..], &[8][..]] {
        let p = bs_payload(4096, ids);
        assert_eq!(
            feed(&mut t, pl, Command::BLOCK_STATUS, 0, p.len() as u64),
            RequestEvent::Continue
        );
        assert_eq!(rejected(t.handle_bytes(&p).unwrap()), ErrorCode::EINVAL);
        assert_eq!(t.next(), ServerReceive::Bytes(32));
    }
    // Ragged, too short, or more ids than contexts: discarded unread.
    for len in [8u64, 13, 8 + 4 * 3] {
        let ev = feed(&mut t, pl, Command::BLOCK_STATUS, 0, len);
        assert_eq!(rejected(ev), ErrorCode::EINVAL);
        assert_eq!(t.next(), ServerReceive::Discard(len));
        t.discarded().unwrap();
    }
    // The effect length from the payload is range-checked.
    let p = bs_payload(2 << 20, &[7]);
    feed(&mut t, pl, Command::BLOCK_STATUS, 0, p.len() as u64);
    assert_eq!(rejected(t.handle_bytes(&p).unwrap()), ErrorCode::EINVAL);
    // Without BLOCK_STATUS_PAYLOAD advertised, the flag is invalid.
    let mut t = ServerTransmission::new(&neg(Mode::Extended, ALL_FLAGS));
    let ev = feed(&mut t, pl, Command::BLOCK_STATUS, 0, 12);
    assert_eq!(rejected(ev), ErrorCode::EINVAL);
    assert_eq!(t.next(), ServerReceive::Discard(12));
}

/// Found by fuzzing (`server_transmission`): a payload-form BLOCK_STATUS
/// whose payload length is 0 was rejected with `ServerReceive::Discard(0)`
/// announced; nothing is to be discarded, the next header follows.
#[test]
fn block_status_payload_form_of_length_zero() {
    let n = neg(Mode::Extended, ALL_FLAGS | TransmissionFlags::BLOCK_STATUS_PAYLOAD);
    let mut t = ServerTransmission::new(&n);
    let ev = feed(&mut t, CommandFlags::PAYLOAD_LEN, Command::BLOCK_STATUS, 0, 0);
    assert_eq!(rejected(ev), ErrorCode::EINVAL);
    assert_eq!(t.next(), ServerReceive::Bytes(32));
}

#[test]
fn shutdown_refuses_everything() {
    let mut t = ServerTransmission::new(&neg(Mode::Simple, ALL_FLAGS));
    t.shutdown();
    assert_eq!(check(&mut t, NONE, Command::READ, 0, 1), Some(ErrorCode::ESHUTDOWN));
    let ev = feed(&mut t, NONE, Command::WRITE, 0, 10);
    assert_eq!(rejected(ev), ErrorCode::ESHUTDOWN);
    assert_eq!(t.next(), ServerReceive::Discard(10));
    t.discarded().unwrap();
    assert_eq!(feed(&mut t, NONE, Command::DISC, 0, 0), RequestEvent::Disconnect);
}

// ----- encoders -------------------------------------------------------------

fn req(command: Command, flags: CommandFlags, offset: u64, length: u64) -> ServerRequest {
    ServerRequest {
        cookie: 0x0102_0304_0506_0708,
        command,
        flags,
        offset,
        length,
        contexts: ContextSelection::All,
    }
}

fn encoder(mode: Mode) -> ReplyEncoder {
    ServerTransmission::new(&neg(mode, ALL_FLAGS)).encoder()
}

fn structured_header(flags: u16, chunk: ReplyChunkType, length: u32) -> Vec<u8> {
    let mut v = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&chunk.0.to_be_bytes());
    v.extend_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
    v.extend_from_slice(&length.to_be_bytes());
    v
}

fn extended_header(flags: u16, chunk: ReplyChunkType, offset: u64, length: u64) -> Vec<u8> {
    let mut v = EXTENDED_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&chunk.0.to_be_bytes());
    v.extend_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&length.to_be_bytes());
    v
}

fn simple_header(error: u32) -> Vec<u8> {
    let mut v = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
    v
}

#[test]
fn simple_mode_replies() {
    let e = encoder(Mode::Simple);
    let r = req(Command::READ, NONE, 512, 100);
    assert_eq!(e.reply_ok(&r).as_bytes(), simple_header(0));
    assert_eq!(e.read_reply_header(&r).unwrap().as_bytes(), simple_header(0));
    let mut out = Vec::new();
    e.reply_error(&r, ErrorCode::EIO, "ignored in simple mode", &mut out);
    assert_eq!(out, simple_header(5));
    assert_eq!(e.hole_chunk(&r, 512, 1, true), Err(ReplyError::NotStructured));
    assert_eq!(
        e.encode_chunk_header(1, 0, ReplyFlags::DONE, ReplyChunkType::NONE, 0),
        Err(ReplyError::NotStructured)
    );
    let bs = req(Command::BLOCK_STATUS, NONE, 0, 1);
    assert_eq!(
        e.block_status_chunk(&bs, 1, [(1, 0)], true, &mut out),
        Err(ReplyError::NotStructured)
    );
}

#[test]
fn structured_replies() {
    let e = encoder(Mode::Structured);
    let r = req(Command::READ, NONE, 512, 100);
    assert_eq!(e.reply_ok(&r).as_bytes(), structured_header(1, ReplyChunkType::NONE, 0));
    let mut want = structured_header(1, ReplyChunkType::OFFSET_DATA, 108);
    want.extend_from_slice(&512u64.to_be_bytes());
    assert_eq!(e.read_reply_header(&r).unwrap().as_bytes(), want);
    // A read of length 0 is a NONE chunk.
    assert_eq!(
        e.read_reply_header(&req(Command::READ, NONE, 0, 0)).unwrap().as_bytes(),
        structured_header(1, ReplyChunkType::NONE, 0)
    );
    // Errors are chunks with the message, even for READ.
    let mut out = Vec::new();
    e.reply_error(&r, ErrorCode::EIO, "disk on fire", &mut out);
    let mut want = structured_header(1, ReplyChunkType::ERROR, 6 + 12);
    want.extend_from_slice(&5u32.to_be_bytes());
    want.extend_from_slice(&12u16.to_be_bytes());
    want.extend_from_slice(b"disk on fire");
    assert_eq!(out, want);
    // Error 0 becomes EINVAL; messages are clipped to valid strings.
    out.clear();
    let long = std::format!("é{}", "x".repeat(5000));
    e.reply_error(&r, ErrorCode(0), &long, &mut out);
    assert_eq!(&out[20..24], &22u32.to_be_bytes());
    let mlen = u16::from_be_bytes([out[24], out[25]]) as usize;
    assert_eq!(mlen, 4096);
    assert!(core::str::from_utf8(&out[26..]).is_ok());
    out.clear();
    e.reply_error(&r, ErrorCode::EIO, "a\0b", &mut out);
    assert_eq!(&out[26..], b"a");
}

#[test]
fn extended_replies_carry_the_request_offset() {
    let e = encoder(Mode::Extended);
    let r = req(Command::READ, NONE, 512, 100);
    assert_eq!(
        e.reply_ok(&r).as_bytes(),
        extended_header(1, ReplyChunkType::NONE, 512, 0)
    );
    let mut want = extended_header(0, ReplyChunkType::OFFSET_DATA, 512, 58);
    want.extend_from_slice(&562u64.to_be_bytes());
    assert_eq!(e.offset_data_header(&r, 562, 50, false).unwrap().as_bytes(), want);
    let mut want = extended_header(1, ReplyChunkType::OFFSET_HOLE, 512, 12);
    want.extend_from_slice(&512u64.to_be_bytes());
    want.extend_from_slice(&50u32.to_be_bytes());
    let h = e.hole_chunk(&r, 512, 50, true).unwrap();
    assert_eq!(h.as_bytes(), want);
    assert_eq!(h.as_bytes().len(), MAX_REPLY_HEADER_LEN);
    let w = req(Command::WRITE, NONE, 512, 100);
    let mut out = Vec::new();
    e.reply_error_offset(&w, ErrorCode::ENOSPC, "", 600, true, &mut out)
        .unwrap();
    let mut want = extended_header(1, ReplyChunkType::ERROR_OFFSET, 512, 14);
    want.extend_from_slice(&28u32.to_be_bytes());
    want.extend_from_slice(&0u16.to_be_bytes());
    want.extend_from_slice(&600u64.to_be_bytes());
    assert_eq!(out, want);
}

#[test]
fn content_chunk_checks() {
    let e = encoder(Mode::Structured);
    let r = req(Command::READ, NONE, 512, 100);
    assert_eq!(
        e.offset_data_header(&r, 511, 10, false),
        Err(ReplyError::OutsideRequest {
            offset: 511,
            length: 10
        })
    );
    assert!(matches!(
        e.hole_chunk(&r, 600, 13, false),
        Err(ReplyError::OutsideRequest { .. })
    ));
    assert_eq!(e.hole_chunk(&r, 600, 0, false), Err(ReplyError::ZeroLength));
    assert_eq!(
        e.hole_chunk(&req(Command::WRITE, NONE, 0, 1), 0, 1, false),
        Err(ReplyError::WrongCommand(Command::WRITE))
    );
    assert_eq!(
        e.read_reply_header(&req(Command::TRIM, NONE, 0, 1)),
        Err(ReplyError::WrongCommand(Command::TRIM))
    );
    // DF: one content chunk covering everything.
    let df = req(Command::READ, CommandFlags::DF, 512, 100);
    assert_eq!(e.hole_chunk(&df, 512, 50, false), Err(ReplyError::Fragmented));
    assert_eq!(e.offset_data_header(&df, 562, 50, false), Err(ReplyError::Fragmented));
    assert!(e.hole_chunk(&df, 512, 100, true).is_ok());
    assert!(e.read_reply_header(&df).is_ok());
    // Compact chunks cannot exceed 32 bits.
    let huge = req(Command::READ, NONE, 0, 1 << 33);
    assert_eq!(
        e.offset_data_header(&huge, 0, u32::MAX as u64, true),
        Err(ReplyError::TooLarge(u32::MAX as u64 + 8))
    );
    assert_eq!(
        e.hole_chunk(&huge, 0, 1 << 32, true),
        Err(ReplyError::TooLarge(1 << 32))
    );
    let mut out = Vec::new();
    assert_eq!(
        e.reply_error_offset(&r, ErrorCode::EIO, "", 612, true, &mut out),
        Err(ReplyError::OutsideRequest { offset: 612, length: 0 })
    );
    assert_eq!(
        e.reply_error_offset(&req(Command::FLUSH, NONE, 0, 0), ErrorCode::EIO, "", 0, true, &mut out),
        Err(ReplyError::WrongCommand(Command::FLUSH))
    );
    assert!(out.is_empty());
}

fn descriptors(out: &[u8], wide: bool) -> Vec<(u64, u64)> {
    let (skip, each) = if wide { (32 + 8, 16) } else { (20 + 4, 8) };
    out[skip..]
        .chunks_exact(each)
        .map(|c| {
            if wide {
                (
                    u64::from_be_bytes(c[..8].try_into().unwrap()),
                    u64::from_be_bytes(c[8..].try_into().unwrap()),
                )
            } else {
                (
                    u32::from_be_bytes(c[..4].try_into().unwrap()) as u64,
                    u32::from_be_bytes(c[4..].try_into().unwrap()) as u64,
                )
            }
        })
        .collect()
}

#[test]
fn block_status_compact() {
    let e = encoder(Mode::Structured);
    let r = req(Command::BLOCK_STATUS, NONE, 4096, 8192);
    let mut out = vec![0xEE]; // appended after existing bytes
    let covered = e
        .block_status_chunk(
            &r,
            7,
            [(0, 3), (4096, 3), (0, 0), (2048, 0), (100_000, 1), (5, 5)],
            false,
            &mut out,
        )
        .unwrap();
    // Zero-length skipped; stops once covered; the last extends past.
    assert_eq!(covered, 4096 + 2048 + 100_000);
    let body = &out[1..];
    let mut want = structured_header(0, ReplyChunkType::BLOCK_STATUS, 4 + 3 * 8);
    want.extend_from_slice(&7u32.to_be_bytes());
    for (l, s) in [(4096u32, 3u32), (2048, 0), (100_000, 1)] {
        want.extend_from_slice(&l.to_be_bytes());
        want.extend_from_slice(&s.to_be_bytes());
    }
    assert_eq!(body, want);
    assert_eq!(out[0], 0xEE);

    // ... but never past the end of the export.
    out.clear();
    let tail = req(Command::BLOCK_STATUS, NONE, (1 << 20) - 512, 512);
    assert_eq!(e.block_status_chunk(&tail, 7, [(1 << 30, 0)], true, &mut out), Ok(512));
    assert_eq!(descriptors(&out, false), [(512, 0)]);

    // REQ_ONE: exactly one, clipped to the request.
    out.clear();
    let one = req(Command::BLOCK_STATUS, CommandFlags::REQ_ONE, 0, 1000);
    assert_eq!(
        e.block_status_chunk(&one, 7, [(0, 1), (5000, 2), (5, 5)], true, &mut out),
        Ok(1000)
    );
    assert_eq!(descriptors(&out, false), [(1000, 2)]);
    assert_eq!(&out[..20], structured_header(1, ReplyChunkType::BLOCK_STATUS, 12));

    // 64-bit status refused, nothing left behind; no extents refused.
    out.clear();
    assert_eq!(
        e.block_status_chunk(&r, 7, [(10, 1), (10, 1 << 32)], true, &mut out),
        Err(ReplyError::StatusTooWide(1 << 32))
    );
    assert!(out.is_empty());
    assert_eq!(
        e.block_status_chunk(&r, 7, [(0, 1)], true, &mut out),
        Err(ReplyError::NoExtents)
    );
    assert_eq!(
        e.block_status_chunk(&r, 7, std::iter::empty(), true, &mut out),
        Err(ReplyError::NoExtents)
    );
    assert!(out.is_empty());
    assert_eq!(
        e.block_status_chunk(&req(Command::READ, NONE, 0, 1), 7, [(1, 0)], true, &mut out),
        Err(ReplyError::WrongCommand(Command::READ))
    );
}

#[test]
fn block_status_clips_to_32_bits_and_stops() {
    let mut n = neg(Mode::Structured, ALL_FLAGS);
    n.size = 1 << 40;
    n.block_size = Some(BlockSizeConstraints {
        minimum: 4096,
        preferred: 4096,
        maximum: 1 << 20,
    });
    let e = ServerTransmission::new(&n).encoder();
    let r = req(Command::BLOCK_STATUS, NONE, 0, u32::MAX as u64 - 4095);
    let mut out = Vec::new();
    // A 5 GiB extent is clipped (rounded to the minimum block) and nothing
    // follows it, since the next extent would start at the wrong offset.
    let got = e.block_status_chunk(&r, 1, [(5 << 30, 1), (4096, 0)], true, &mut out);
    assert_eq!(got, Ok(u32::MAX as u64 - 4095));
    assert_eq!(descriptors(&out, false), [(u32::MAX as u64 - 4095, 1)]);
}

#[test]
fn block_status_extended() {
    let e = encoder(Mode::Extended);
    let r = req(Command::BLOCK_STATUS, NONE, 512, 1024);
    let mut out = Vec::new();
    e.block_status_chunk(&r, 3, [(512, 1 << 40), (512, 0), (512, 2)], true, &mut out)
        .unwrap();
    let mut want = extended_header(1, ReplyChunkType::BLOCK_STATUS_EXT, 512, 8 + 2 * 16);
    want.extend_from_slice(&3u32.to_be_bytes());
    want.extend_from_slice(&2u32.to_be_bytes());
    for (l, s) in [(512u64, 1u64 << 40), (512, 0)] {
        want.extend_from_slice(&l.to_be_bytes());
        want.extend_from_slice(&s.to_be_bytes());
    }
    assert_eq!(out, want);
}

#[test]
fn block_status_caps_descriptors() {
    let mut n = neg(Mode::Structured, ALL_FLAGS);
    n.size = 1 << 30;
    let e = ServerTransmission::new(&n).encoder();
    let r = req(Command::BLOCK_STATUS, NONE, 0, 1 << 30);
    let mut out = Vec::with_capacity(24 + 8 * MAX_BLOCK_STATUS_EXTENTS);
    let got = e
        .block_status_chunk(&r, 1, std::iter::repeat((1u64, 0u64)), true, &mut out)
        .unwrap();
    assert_eq!(got, MAX_BLOCK_STATUS_EXTENTS as u64);
    assert_eq!(out.len(), 24 + 8 * MAX_BLOCK_STATUS_EXTENTS);
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any header bytes: a value or a violation, never a panic; and a
        /// request is only ever accepted if it is in range.
        #[test]
        fn arbitrary_headers(bytes in proptest::collection::vec(any::<u8>(), 32), mode in 0u8..3, magic in any::<bool>()) {
            let mode = [Mode::Simple, Mode::Structured, Mode::Extended][mode as usize];
            let mut t = ServerTransmission::new(&neg(mode, ALL_FLAGS));
            let mut bytes = bytes;
            if magic {
                let m = if mode.extended() { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC };
                bytes[..4].copy_from_slice(&m.to_be_bytes());
            }
            let n = if mode.extended() { 32 } else { 28 };
            match t.handle_bytes(&bytes[..n]) {
                Ok(RequestEvent::Request(r)) => {
                    if r.command != Command::FLUSH {
                        prop_assert!(r.offset.checked_add(r.length).is_some_and(|e| e <= t.size()));
                    }
                }
                Ok(RequestEvent::Continue) => {
                    if let ServerReceive::Bytes(k) = t.next() {
                        let _ = t.handle_bytes(&vec![0xAB; k]);
                    }
                }
                Ok(_) | Err(_) => {}
            }
        }

        /// The block-status encoder's output always satisfies the client's
        /// rules: nonzero extents, at most one past the request, REQ_ONE
        /// honoured, descriptors counted right.
        #[test]
        fn block_status_shape(
            extents in proptest::collection::vec((0u64..5000, 0u64..4), 0..20),
            offset in 0u64..(1 << 20),
            length in 1u64..10_000,
            req_one in any::<bool>(),
            wide in any::<bool>(),
        ) {
            let e = encoder(if wide { Mode::Extended } else { Mode::Structured });
            let flags = if req_one { CommandFlags::REQ_ONE } else { NONE };
            let r = req(Command::BLOCK_STATUS, flags, offset, length);
            let mut out = Vec::new();
            match e.block_status_chunk(&r, 1, extents.iter().copied(), true, &mut out) {
                Ok(sum) => {
                    let d = descriptors(&out, wide);
                    prop_assert!(!d.is_empty());
                    prop_assert!(d.iter().all(|(l, _)| *l > 0));
                    prop_assert_eq!(d.iter().map(|(l, _)| l).sum::<u64>(), sum);
                    let before_last: u64 = d[..d.len() - 1].iter().map(|(l, _)| l).sum();
                    prop_assert!(before_last < length);
                    prop_assert!(offset + sum <= 1 << 20);
                    if req_one {
                        prop_assert_eq!(d.len(), 1);
                        prop_assert!(sum <= length);
                    }
                }
                Err(err) => {
                    prop_assert_eq!(err, ReplyError::NoExtents);
                    prop_assert!(out.is_empty());
                }
            }
        }
    }
}
