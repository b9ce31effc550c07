//! The reply encoder: calls from fuzz input, and checks of what it writes.

use super::*;

// ---------------------------------------------------------------------------
// The reply encoder
// ---------------------------------------------------------------------------

/// An offset or a length relative to a request.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum Num {
    /// 0
    Zero,
    /// A small value.
    Small(u16),
    /// Whole blocks of max(minimum block size, 512).
    Blocks(u8),
    /// So many bytes before the end.
    FromEnd(u16),
    /// Anything.
    Raw(u64),
}

impl Num {
    /// The value this stands for, relative to `size` with blocks of `block`.
    pub fn get(self, size: u64, block: u64) -> u64 {
        match self {
            Num::Zero => 0,
            Num::Small(v) => v as u64,
            Num::Blocks(v) => v as u64 * block,
            Num::FromEnd(v) => size.saturating_sub(v as u64),
            Num::Raw(v) => v,
        }
    }
}

/// A request as a driver might give it to the encoder, valid or not.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub struct RawRequest {
    pub(super) cookie: u64,
    pub(super) cmd: u8,
    pub(super) flags: u16,
    pub(super) offset: u64,
    pub(super) length: u64,
    pub(super) mask: Option<u64>,
}

/// Arguments of the [`ReplyEncoder`] calls a server driver makes for each
/// request (the `server_session` target calls them all).
#[derive(Debug, Clone, Arbitrary)]
pub struct EncSpec {
    pub(super) error: u32,
    pub(super) message: u8,
    pub(super) offset: Num,
    pub(super) length: Num,
    pub(super) done: bool,
    pub(super) context: u32,
    pub(super) extents: Vec<(Num, u64)>,
    pub(super) chunk: u16,
    pub(super) flags: u16,
    pub(super) payload_len: u64,
    pub(super) raw: Option<RawRequest>,
}

pub(super) fn message(sel: u8) -> String {
    match sel % 4 {
        0 => String::new(),
        1 => "no such luck".into(),
        2 => "\u{20ac}".repeat(1400),
        _ => "before\0after".into(),
    }
}

/// Calls every encoder function for `decoded` (and for a fuzzed request)
/// and checks what they produce.
pub(super) fn encode_all(enc: ReplyEncoder, size: u64, minimum: u32, decoded: &ServerRequest, e: &EncSpec) {
    encode_for(enc, size, minimum, decoded, e);
    if let Some(raw) = e.raw {
        let r = ServerRequest {
            cookie: raw.cookie,
            command: command(raw.cmd),
            flags: CommandFlags::from_bits_retain(raw.flags),
            offset: raw.offset,
            length: raw.length,
            contexts: raw.mask.map_or(ContextSelection::All, ContextSelection::Only),
        };
        encode_for(enc, size, minimum, &r, e);
    }
}

pub(super) fn encode_for(enc: ReplyEncoder, size: u64, minimum: u32, r: &ServerRequest, e: &EncSpec) {
    let mode = enc.mode();
    let ext = mode.extended();
    let block = (minimum as u64).max(512);
    let message = message(e.message);
    let code = ErrorCode(e.error);
    let mut out = Vec::new();

    let h = enc.encode_simple_reply(r.cookie, code);
    let (s, _) = SimpleReplyHeader::read_from_prefix(h.as_bytes()).expect("simple reply");
    assert_eq!((h.as_bytes().len(), s.magic.get()), (16, SIMPLE_REPLY_MAGIC));

    let flags = ReplyFlags::from_bits_retain(e.flags);
    match enc.encode_chunk_header(r.cookie, r.offset, flags, ReplyChunkType(e.chunk), e.payload_len) {
        Ok(h) => {
            assert!(mode.structured());
            assert!(ext || e.payload_len <= u32::MAX as u64);
            let c = parse_chunk(h.as_bytes(), ext, true);
            assert_eq!((c.flags, c.chunk.0, c.cookie), (e.flags, e.chunk, r.cookie));
        }
        Err(_) => assert!(!mode.structured() || (!ext && e.payload_len > u32::MAX as u64)),
    }

    let h = enc.reply_ok(r);
    if mode.structured() {
        let c = parse_chunk(h.as_bytes(), ext, false);
        assert_eq!((c.chunk, c.flags, c.payload.len()), (ReplyChunkType::NONE, 1, 0));
    } else {
        assert_eq!(h.as_bytes().len(), SIMPLE_REPLY_HEADER_LEN);
    }

    enc.reply_error(r, code, &message, &mut out);
    if mode.structured() {
        let c = parse_chunk(&out, ext, false);
        assert_eq!(c.chunk, ReplyChunkType::ERROR);
        check_error_payload(c.payload, false);
    } else {
        let (s, rest) = SimpleReplyHeader::read_from_prefix(&out).expect("simple reply");
        assert!(rest.is_empty() && s.error.get() != 0);
    }

    let offset = r.offset.wrapping_add(e.offset.get(r.length, block));
    let length = e.length.get(r.length, block);

    out.clear();
    match enc.reply_error_offset(r, code, &message, offset, e.done, &mut out) {
        Ok(()) => {
            assert!(mode.structured());
            assert!(offset >= r.offset && offset < r.offset.saturating_add(r.length.max(1)));
            let c = parse_chunk(&out, ext, false);
            assert_eq!(c.chunk, ReplyChunkType::ERROR_OFFSET);
            check_error_payload(c.payload, true);
        }
        Err(_) => assert!(out.is_empty()),
    }

    if let Ok(h) = enc.read_reply_header(r) {
        assert_eq!(r.command, Command::READ);
        if mode.structured() && r.length > 0 {
            let c = parse_chunk(h.as_bytes(), ext, true);
            assert_eq!(c.chunk, ReplyChunkType::OFFSET_DATA);
            assert_eq!(c.length, r.length + 8);
        }
    }

    let within = |offset: u64, length: u64| {
        length > 0
            && offset >= r.offset
            && offset
                .checked_add(length)
                .is_some_and(|end| end <= r.offset.saturating_add(r.length))
            && (!r.flags.contains(CommandFlags::DF) || (offset == r.offset && length == r.length))
    };
    if let Ok(h) = enc.offset_data_header(r, offset, length, e.done) {
        assert!(mode.structured() && r.command == Command::READ && within(offset, length));
        let c = parse_chunk(h.as_bytes(), ext, true);
        assert_eq!((c.chunk, c.length), (ReplyChunkType::OFFSET_DATA, length + 8));
        assert_eq!(c.payload, offset.to_be_bytes());
    }
    if let Ok(h) = enc.hole_chunk(r, offset, length, e.done) {
        assert!(mode.structured() && r.command == Command::READ && within(offset, length));
        assert!(length <= u32::MAX as u64);
        let c = parse_chunk(h.as_bytes(), ext, false);
        assert_eq!((c.chunk, c.payload.len()), (ReplyChunkType::OFFSET_HOLE, 12));
    }

    // Block status, appended after something already in `out`.
    out.clear();
    out.extend_from_slice(b"xyz");
    let extents: Vec<(u64, u64)> = e
        .extents
        .iter()
        .take(16)
        .map(|(n, s)| (n.get(r.length, block), *s))
        .collect();
    match enc.block_status_chunk(r, e.context, extents.iter().copied(), e.done, &mut out) {
        Ok(sum) => {
            assert!(mode.structured() && r.command == Command::BLOCK_STATUS);
            let c = parse_chunk(&out[3..], ext, false);
            assert_eq!(c.flags & 1 != 0, e.done);
            check_status(r, ext, size, e.context, c, sum);
        }
        Err(_) => assert_eq!(out, b"xyz", "a refused chunk leaves out as it was"),
    }
}

pub(super) fn check_status(r: &ServerRequest, ext: bool, size: u64, context: u32, c: Chunk<'_>, sum: u64) {
    let p = c.payload;
    assert!(p.len() >= 4 && p[..4] == context.to_be_bytes());
    let (each, descriptors) = if ext {
        assert_eq!(c.chunk, ReplyChunkType::BLOCK_STATUS_EXT);
        let count = u32::from_be_bytes(p[4..8].try_into().expect("count"));
        assert_eq!(count as usize * 16, p.len() - 8, "descriptor count");
        (16, &p[8..])
    } else {
        assert_eq!(c.chunk, ReplyChunkType::BLOCK_STATUS);
        (8, &p[4..])
    };
    assert_eq!(descriptors.len() % each, 0);
    let lengths: Vec<u64> = descriptors
        .chunks_exact(each)
        .map(|d| {
            if ext {
                u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
            } else {
                u32::from_be_bytes(d[..4].try_into().expect("4 bytes")) as u64
            }
        })
        .collect();
    assert!(!lengths.is_empty() && lengths.len() <= MAX_BLOCK_STATUS_EXTENTS);
    assert!(lengths.iter().all(|l| *l > 0), "extent of length 0");
    let total = lengths
        .iter()
        .try_fold(0u64, |a, l| a.checked_add(*l))
        .expect("sum overflows");
    assert_eq!(total, sum);
    assert!(sum <= size.saturating_sub(r.offset), "extents past the end");
    if r.flags.contains(CommandFlags::REQ_ONE) {
        assert!(lengths.len() == 1 && sum <= r.length, "REQ_ONE");
    }
    if lengths.len() > 1 {
        let last = lengths[lengths.len() - 1];
        assert!(sum - last < r.length, "extents continue after the request is covered");
    }
}

/// A reply chunk as encoded.
#[derive(Debug)]
pub(super) struct Chunk<'a> {
    pub(super) flags: u16,
    pub(super) chunk: ReplyChunkType,
    pub(super) cookie: u64,
    /// The length field.
    pub(super) length: u64,
    pub(super) payload: &'a [u8],
}

/// Parses an encoded chunk; with `header_only` the payload that follows
/// the header in `b` (if any) may be shorter than the length field says.
pub(super) fn parse_chunk(b: &[u8], ext: bool, header_only: bool) -> Chunk<'_> {
    let (flags, chunk, cookie, length, rest) = if ext {
        let (h, rest) = ExtendedReplyHeader::read_from_prefix(b).expect("extended reply header");
        assert_eq!(h.magic.get(), EXTENDED_REPLY_MAGIC);
        (h.flags.get(), h.chunk_type.get(), h.cookie.get(), h.length.get(), rest)
    } else {
        let (h, rest) = StructuredReplyHeader::read_from_prefix(b).expect("structured reply header");
        assert_eq!(h.magic.get(), STRUCTURED_REPLY_MAGIC);
        (
            h.flags.get(),
            h.chunk_type.get(),
            h.cookie.get(),
            h.length.get() as u64,
            rest,
        )
    };
    if !header_only {
        assert_eq!(length, rest.len() as u64, "chunk length field");
    }
    Chunk {
        flags,
        chunk: ReplyChunkType(chunk),
        cookie,
        length,
        payload: rest,
    }
}

pub(super) fn check_error_payload(p: &[u8], with_offset: bool) {
    let (h, rest) = ErrorPayloadHeader::read_from_prefix(p).expect("error payload");
    assert_ne!(h.error.get(), 0, "error chunk with error 0");
    let mlen = h.message_length.get() as usize;
    assert_eq!(rest.len(), mlen + if with_offset { 8 } else { 0 });
    let m = std::str::from_utf8(&rest[..mlen]).expect("message is UTF-8");
    assert!(m.len() <= MAX_STRING_LEN && !m.contains('\0'));
}
