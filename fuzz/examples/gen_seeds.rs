//! Writes starting inputs for the fuzz targets into `fuzz/corpus/TARGET/`:
//! conversations between nbd-proto's own client and server machines, in
//! the byte layout the targets read (see `src/drive.rs`), so fuzzing
//! starts from deep states instead of rediscovering every magic number.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --example gen_seeds`
//! (from the repository root), then fuzz and `cargo fuzz cmin`.
//!
//! The configuration prefixes are `arbitrary` encodings, found by trying
//! random byte strings until one decodes to a value with the wanted
//! properties.

use std::collections::VecDeque;
use std::fs;
use std::path::Path;

use arbitrary::{Arbitrary, Unstructured};
use nbd_proto::client::{ClientHandshake, ClientTransmission, HandshakeStep, Negotiated, Request};
use nbd_proto::server::{
    ReplyEncoder, RequestEvent, ServerHandshake, ServerNegotiated, ServerReceive, ServerRequest, ServerStep,
    ServerTransmission,
};
use nbd_proto::wire::*;
use nbd_proto_fuzz::drive::*;

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

/// Bytes that decode (with `arbitrary`) to a `T` satisfying `pred`, and
/// the value. Only values decoded without running out of bytes count, so
/// the bytes mean the same whatever follows them.
fn find<T: for<'a> Arbitrary<'a>>(rng: &mut Rng, pred: impl Fn(&T) -> bool) -> (T, Vec<u8>) {
    for _ in 0..50_000_000 {
        let len = 1 + (rng.next() % 48) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let mut u = Unstructured::new(&bytes);
        if let Ok(v) = T::arbitrary(&mut u) {
            if !u.is_empty() && pred(&v) {
                let used = bytes.len() - u.len();
                return (v, bytes[..used].to_vec());
            }
        }
    }
    panic!("no encoding found for {}", std::any::type_name::<T>());
}

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    fs::create_dir_all(&dir).expect("corpus dir");
    fs::write(dir.join(format!("seed-{name}")), data).expect("write seed");
    // Every seed must run cleanly.
    run(target, data);
}

fn export_ok(e: &Option<ExportSpec>) -> bool {
    matches!(e, Some(e) if e.canonical.is_none()
        && matches!(e.size, Size::Mega | Size::Blocks(64..))
        && e.block % 7 < 3
        && !e.block_size_required
        && e.contexts & 0x10 == 0
        && e.contexts & 1 != 0
        && matches!(e.description, None | Some(Name::Disk | Name::Other | Name::Unicode))
        && !e.tls_only)
}

/// A client handshake against our server: the seed is the client
/// configuration, then exactly what the client reads, with the options of
/// `opts` encoded where the client waits in option mode.
fn client_handshake_seed(
    rng: &mut Rng,
    name: &str,
    cpred: impl Fn(&ClientSpec) -> bool,
    spred: impl Fn(&ServerSpec) -> bool,
    opts: &[&str],
) {
    let (cspec, mut out) = find::<ClientSpec>(rng, cpred);
    let (sspec, _) = find::<ServerSpec>(rng, spred);
    let (export, _) = find::<Option<ExportSpec>>(rng, export_ok);
    let mut client = ClientHandshake::new(cspec.config());
    let mut server = ServerHandshake::new(sspec.config());
    let (mut c2s, mut s2c) = (VecDeque::new(), VecDeque::new());
    let mut opts = opts.iter();
    for _ in 0..10_000 {
        match client.step() {
            HandshakeStep::Send(b) => {
                c2s.extend(b.iter().copied());
                client.sent();
            }
            HandshakeStep::Receive(n) => {
                pump_server(&mut server, &mut c2s, &mut s2c, export.as_ref(), n);
                if s2c.len() < n {
                    break;
                }
                let d: Vec<u8> = s2c.drain(..n).collect();
                out.extend_from_slice(&d);
                if client.received(&d).is_err() {
                    break;
                }
            }
            HandshakeStep::StartTls => {
                pump_server(&mut server, &mut c2s, &mut s2c, export.as_ref(), 0);
                client.tls_established().expect("tls");
            }
            HandshakeStep::Negotiating => {
                let Some(want) = opts.next() else { break };
                let (opt, bytes) = find::<UserOpt>(rng, |o| format!("{o:?}") == *want);
                out.extend_from_slice(&bytes);
                issue(&mut client, &opt);
            }
            HandshakeStep::OptionDone => {
                client.take_outcome();
            }
            HandshakeStep::Done | HandshakeStep::Aborted => break,
        }
    }
    write("client_handshake", name, &out);
}

/// Issues a [`UserOpt`] on a bare client machine.
fn issue(c: &mut ClientHandshake, opt: &UserOpt) {
    let q = |q: &[Query]| q.iter().map(|q| q.get()).collect::<Vec<_>>();
    let r = match opt {
        UserOpt::List => c.opt_list(),
        UserOpt::Info(n) => c.opt_info(&n.get()),
        UserOpt::Go(n) => c.opt_go(n.map(Name::get).as_deref()),
        UserOpt::ListMetaContext(n, qs) => c.opt_list_meta_context(&n.get(), &q(qs)),
        UserOpt::SetMetaContext(n, qs) => c.opt_set_meta_context(&n.get(), &q(qs)),
        UserOpt::StructuredReply => c.opt_structured_reply(),
        UserOpt::ExtendedHeaders => c.opt_extended_headers(),
        UserOpt::Abort => c.opt_abort(),
    };
    r.expect("option issued");
}

/// Runs the server until it has sent `want` bytes or needs more input.
fn pump_server(
    s: &mut ServerHandshake,
    c2s: &mut VecDeque<u8>,
    s2c: &mut VecDeque<u8>,
    export: Option<&ExportSpec>,
    want: usize,
) {
    for _ in 0..10_000 {
        if want > 0 && s2c.len() >= want {
            return;
        }
        match s.step() {
            ServerStep::Send(b) => {
                s2c.extend(b.iter().copied());
                s.sent();
            }
            ServerStep::Receive(n) | ServerStep::Discard(n) if c2s.len() < n => return,
            ServerStep::Receive(n) => {
                let d: Vec<u8> = c2s.drain(..n).collect();
                if s.received(&d).is_err() {
                    return;
                }
            }
            ServerStep::Discard(n) => {
                c2s.drain(..n);
                s.discarded().expect("discard");
            }
            ServerStep::StartTls => {
                s.tls_established().expect("tls");
                if want == 0 {
                    return;
                }
            }
            ServerStep::LookupExport { name } => {
                let d = export.map(|e| e.details(name));
                if s.answer_export(d).is_err() {
                    return;
                }
            }
            ServerStep::ListExports => s.answer_list(&[]).expect("list"),
            ServerStep::Done | ServerStep::Aborted | ServerStep::Closed => return,
        }
    }
}

/// A server handshake against our client: the seed is the server
/// configuration, then exactly what the server reads, with the driver's
/// answers encoded where the server asks; then, after the handshake, a few
/// requests for transmission.
fn server_handshake_seed(
    rng: &mut Rng,
    name: &str,
    spred: impl Fn(&ServerSpec) -> bool,
    cpred: impl Fn(&ClientSpec) -> bool,
) {
    let (sspec, mut out) = find::<ServerSpec>(rng, spred);
    let (cspec, _) = find::<ClientSpec>(rng, cpred);
    let mut server = ServerHandshake::new(sspec.config());
    let mut client = ClientHandshake::new(cspec.config());
    let (mut c2s, mut s2c) = (VecDeque::<u8>::new(), VecDeque::<u8>::new());
    let mut negotiated = None;
    for _ in 0..10_000 {
        // Let the client run as far as it can.
        loop {
            match client.step() {
                HandshakeStep::Send(b) => {
                    c2s.extend(b.iter().copied());
                    client.sent();
                }
                HandshakeStep::Receive(n) if s2c.len() >= n => {
                    let d: Vec<u8> = s2c.drain(..n).collect();
                    if client.received(&d).is_err() {
                        break;
                    }
                }
                HandshakeStep::StartTls => {
                    client.tls_established().expect("tls");
                }
                HandshakeStep::OptionDone => {
                    client.take_outcome();
                }
                _ => break,
            }
        }
        match server.step() {
            ServerStep::Send(b) => {
                s2c.extend(b.iter().copied());
                server.sent();
            }
            ServerStep::Receive(n) | ServerStep::Discard(n) if c2s.len() < n => break,
            ServerStep::Receive(n) => {
                let d: Vec<u8> = c2s.drain(..n).collect();
                out.extend_from_slice(&d);
                if server.received(&d).is_err() {
                    break;
                }
            }
            ServerStep::Discard(n) => {
                out.extend(c2s.drain(..n));
                server.discarded().expect("discard");
            }
            ServerStep::StartTls => server.tls_established().expect("tls"),
            ServerStep::LookupExport { name } => {
                let (e, bytes) = find::<Option<ExportSpec>>(rng, export_ok);
                out.extend_from_slice(&bytes);
                let d = e.as_ref().map(|e| e.details(name));
                server.answer_export(d).expect("answer");
            }
            ServerStep::ListExports => {
                let (l, bytes) = find::<Vec<ListEntry>>(rng, |l| {
                    l.len() == 2 && l.iter().all(|e| matches!(e.name, Name::Disk | Name::Other))
                });
                out.extend_from_slice(&bytes);
                let owned: Vec<String> = l.iter().map(|e| e.name.get()).collect();
                let list: Vec<_> = owned
                    .iter()
                    .map(|n| nbd_proto::server::ExportListing {
                        name: n,
                        description: "",
                        tls_only: false,
                    })
                    .collect();
                server.answer_list(&list).expect("list");
            }
            ServerStep::Done => {
                negotiated = Some(server.finish().expect("finish"));
                break;
            }
            ServerStep::Aborted | ServerStep::Closed => break,
        }
    }
    if let Some(sn) = negotiated {
        // One set of encoder arguments, then requests.
        let (_, bytes) = find::<u8>(rng, |c| c % 4 == 1 && *c < 0xf0);
        out.extend_from_slice(&bytes);
        let (_, bytes) = find::<EncSpec>(rng, |_| true);
        out.extend_from_slice(&bytes);
        out.extend_from_slice(&requests_for(&client_view(&sn)).1);
    }
    write("server_handshake", name, &out);
}

/// What the client would have negotiated for a server's result.
fn client_view(sn: &ServerNegotiated) -> Negotiated {
    Negotiated {
        mode: sn.mode,
        tls: sn.tls,
        export_name: sn.export_name.clone(),
        description: None,
        size: sn.size,
        flags: sn.flags,
        block_size: sn.block_size,
        contexts: sn.contexts.clone(),
    }
}

/// Valid requests of every kind the export allows, as (request, header bytes).
fn requests_for(n: &Negotiated) -> (Vec<Request>, Vec<u8>) {
    let mut tx = ClientTransmission::new(n, 64);
    let mut reqs = Vec::new();
    let mut out = Vec::new();
    let block = n.constraints().minimum.max(512) as u64;
    let mut candidates = vec![
        Request::new(Command::READ, 0, 4 * block),
        Request::new(Command::READ, block, 2 * block).with_flags(CommandFlags::DF),
        Request::new(Command::WRITE, 0, block).with_flags(CommandFlags::FUA),
        Request::new(Command::FLUSH, 0, 0),
        Request::new(Command::TRIM, block, block),
        Request::new(Command::WRITE_ZEROES, 0, 2 * block).with_flags(CommandFlags::NO_HOLE),
        Request::new(Command::CACHE, 0, block),
        Request::new(Command::BLOCK_STATUS, 0, 8 * block),
        Request::new(Command::BLOCK_STATUS, 0, 8 * block).with_flags(CommandFlags::REQ_ONE),
    ];
    for r in candidates.drain(..) {
        if let Ok((_, h)) = tx.start_request(r) {
            reqs.push(r);
            out.extend_from_slice(h.as_bytes());
        }
    }
    (reqs, out)
}

/// Replies to `headers` as our server would (READ data not on the wire).
fn replies_for(sn: &ServerNegotiated, headers: &[u8]) -> Vec<u8> {
    let mut st = ServerTransmission::new(sn);
    let enc: ReplyEncoder = st.encoder();
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        match st.next() {
            ServerReceive::Bytes(n) => {
                if pos + n > headers.len() {
                    break;
                }
                let ev = st.handle_bytes(&headers[pos..pos + n]).expect("valid request");
                pos += n;
                match ev {
                    RequestEvent::Request(r) => reply(&st, &enc, &r, &mut out),
                    RequestEvent::Reject { request, error, reason } => {
                        enc.reply_error(&request, error, reason, &mut out)
                    }
                    _ => {}
                }
            }
            ServerReceive::Payload { .. } => st.payload_received().expect("payload"),
            ServerReceive::Discard(_) => st.discarded().expect("discard"),
            ServerReceive::Closed => break,
        }
    }
    out
}

fn reply(st: &ServerTransmission, enc: &ReplyEncoder, r: &ServerRequest, out: &mut Vec<u8>) {
    match r.command {
        Command::READ if enc.mode().structured() && !r.flags.contains(CommandFlags::DF) && r.length >= 2 => {
            let half = r.length / 2;
            out.extend_from_slice(enc.hole_chunk(r, r.offset, half, false).expect("hole").as_bytes());
            out.extend_from_slice(
                enc.offset_data_header(r, r.offset + half, r.length - half, true)
                    .expect("data")
                    .as_bytes(),
            );
        }
        Command::READ => out.extend_from_slice(enc.read_reply_header(r).expect("read").as_bytes()),
        Command::BLOCK_STATUS => {
            let ctxs: Vec<u32> = st.selected_contexts(r).map(|c| c.id).collect();
            for (i, id) in ctxs.iter().enumerate() {
                let extents = [(r.length / 2, 1u64), (r.length / 2, 3), (r.length, 0)];
                enc.block_status_chunk(r, *id, extents, i + 1 == ctxs.len(), out)
                    .expect("status");
            }
        }
        Command::TRIM => enc.reply_error(r, ErrorCode::EIO, "disk on fire", out),
        _ => out.extend_from_slice(enc.reply_ok(r).as_bytes()),
    }
}

/// The flags our server would send for this mode (everything the storage
/// can do, never read-only).
fn server_flags(mode: u8) -> u16 {
    let mut f = TransmissionFlags::HAS_FLAGS
        | TransmissionFlags::SEND_FLUSH
        | TransmissionFlags::SEND_FUA
        | TransmissionFlags::SEND_TRIM
        | TransmissionFlags::SEND_WRITE_ZEROES
        | TransmissionFlags::SEND_FAST_ZERO
        | TransmissionFlags::SEND_CACHE;
    if mode >= 3 {
        f |= TransmissionFlags::SEND_DF;
    }
    f.bits()
}

/// The fields shared by [`NegSpec`] and [`ServerNegSpec`], encoded one by
/// one (the derive decodes fields in order, so encodings concatenate).
struct Common {
    mode: u8,
    size: Size,
    flags: u16,
    block: u8,
    contexts: u8,
    ids: [u32; 4],
    bytes: Vec<u8>,
}

fn common(rng: &mut Rng, mode: u8, block: u8) -> Common {
    let mut bytes = Vec::new();
    let (m, b) = find::<u8>(rng, |m| m % 5 == mode);
    bytes.extend(b);
    let (size, b) = find::<Size>(rng, |s| matches!(s, Size::Mega));
    bytes.extend(b);
    let want = server_flags(mode);
    let (flags, b) = find::<u16>(rng, |f| *f == want);
    bytes.extend(b);
    let (bl, b) = find::<u8>(rng, |x| x % 7 == block);
    bytes.extend(b);
    let (contexts, b) = find::<u8>(rng, |c| c & 0xf == if mode >= 3 { 0b0011 } else { 0 });
    bytes.extend(b);
    let (ids, b) = find::<[u32; 4]>(rng, |i| i.iter().all(|x| *x != 0) && i[0] != i[1]);
    bytes.extend(b);
    Common {
        mode: m,
        size,
        flags,
        block: bl,
        contexts,
        ids,
        bytes,
    }
}

/// Encodes a [`ReqSpec`] that stands for exactly `r`.
fn req_spec(rng: &mut Rng, r: &Request, size: u64, minimum: u32) -> Vec<u8> {
    let block = (minimum as u64).max(512);
    let mut bytes = Vec::new();
    let (cmd, b) = find::<u8>(rng, |c| command(*c) == r.command);
    bytes.extend(b);
    bytes.push(r.flags.bits() as u8);
    let (offset, b) = find::<Num>(rng, |n| n.get(size, block) == r.offset);
    bytes.extend(b);
    let (length, b) = find::<Num>(rng, |n| n.get(size, block) == r.length);
    bytes.extend(b);
    let spec = ReqSpec {
        cmd,
        flags: r.flags.bits() as u8,
        offset,
        length,
    };
    assert_eq!(spec.request(size, minimum), *r);
    bytes
}

/// Client transmission: negotiation, set-up, requests, then our server's
/// replies to them.
fn client_transmission_seed(rng: &mut Rng, name: &str, mode: u8, block: u8) {
    let c = common(rng, mode, block);
    let mut out = c.bytes;
    out.push(0); // tls: false
    let neg = NegSpec {
        mode: c.mode,
        size: c.size,
        flags: c.flags,
        block: c.block,
        contexts: c.contexts,
        ids: c.ids,
        tls: false,
    };
    let n = neg.negotiated();
    let check = NegSpec::arbitrary(&mut Unstructured::new(&[&out[..], &[0xff; 8]].concat())).expect("decodes");
    assert_eq!(format!("{check:?}"), format!("{neg:?}"));
    let (_, bytes) = find::<TxSpec>(rng, |t| t.capacity % 8 == 7 && t.strict && !t.manual_release);
    out.extend_from_slice(&bytes);
    let (reqs, headers) = requests_for(&n);
    let reqs = &reqs[..reqs.len().min(8)];
    out.push(reqs.len() as u8);
    let minimum = n.constraints().minimum;
    for r in reqs {
        out.extend(req_spec(rng, r, n.size, minimum));
    }
    let sn = ServerNegotiated {
        mode: n.mode,
        export_name: "disk".into(),
        requested_name: String::new(),
        size: n.size,
        flags: n.flags,
        block_size: n.block_size,
        contexts: n.contexts.clone(),
        tls: false,
        client_requested_block_size: n.block_size.is_some(),
    };
    let header_len = if n.mode.extended() { 32 } else { 28 };
    out.extend_from_slice(&replies_for(&sn, &headers[..reqs.len() * header_len]));
    write("client_transmission", name, &out);
}

/// Server transmission: negotiation, encoder arguments, then requests from
/// our client.
fn server_transmission_seed(rng: &mut Rng, name: &str, mode: u8, block: u8) {
    let c = common(rng, mode, block);
    let mut out = c.bytes;
    out.push(1); // client_requested_block_size
    let neg = ServerNegSpec {
        mode: c.mode,
        size: c.size,
        flags: c.flags,
        block: c.block,
        contexts: c.contexts,
        ids: c.ids,
        client_requested_block_size: true,
    };
    let sn = neg.negotiated();
    let (_, bytes) = find::<u8>(rng, |c| c % 4 == 2 && *c < 0xf0);
    out.extend_from_slice(&bytes);
    for _ in 0..2 {
        let (_, bytes) = find::<EncSpec>(rng, |_| true);
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(&requests_for(&client_view(&sn)).1);
    write("server_transmission", name, &out);
}

fn main() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let r = &mut rng;
    let auto = |tls: u8, ext: bool| {
        move |c: &ClientSpec| {
            c.tls % 3 == tls
                && !c.opt_mode
                && c.structured
                && c.extended == ext
                && c.request_block_size
                && matches!(c.export, Name::Default)
                && c.contexts.len() == 2
                && matches!(c.contexts[0], Query::BaseAllocation)
                && matches!(c.contexts[1], Query::QemuDepth)
        }
    };
    let server = |tls: u8, go: bool, structured: bool| {
        move |s: &ServerSpec| {
            s.oldstyle % 8 != 7
                && s.tls % 3 == tls
                && s.allow_list
                && s.max_options >= 16
                && s.no_zeroes
                && s.support_go == go
                && s.structured == structured
                && s.extended
        }
    };
    client_handshake_seed(r, "extended", auto(0, true), server(0, true, true), &[]);
    client_handshake_seed(r, "structured", auto(0, false), server(0, true, true), &[]);
    client_handshake_seed(r, "tls", auto(2, true), server(1, true, true), &[]);
    client_handshake_seed(r, "tls-allow-refused", auto(1, true), server(0, true, true), &[]);
    client_handshake_seed(r, "export-name", auto(0, true), server(0, false, false), &[]);
    client_handshake_seed(
        r,
        "oldstyle",
        auto(0, true),
        |s: &ServerSpec| s.oldstyle % 8 == 7 && s.tls % 3 == 0,
        &[],
    );
    client_handshake_seed(
        r,
        "opt-mode",
        |c: &ClientSpec| c.tls % 3 == 0 && c.opt_mode && c.structured && c.extended && c.contexts.is_empty(),
        server(0, true, true),
        &[
            "List",
            "Info(Disk)",
            "ListMetaContext(Default, [Base])",
            "SetMetaContext(Default, [BaseAllocation, QemuDepth])",
            "Go(None)",
        ],
    );
    client_handshake_seed(
        r,
        "opt-abort",
        |c: &ClientSpec| c.tls % 3 == 0 && c.opt_mode && !c.structured && !c.extended,
        server(0, true, true),
        &["StructuredReply", "Info(Default)", "Abort"],
    );

    server_handshake_seed(r, "extended", server(0, true, true), auto(0, true));
    server_handshake_seed(r, "structured", server(0, true, true), auto(0, false));
    server_handshake_seed(r, "forced-tls", server(1, true, true), auto(2, true));
    server_handshake_seed(r, "selective-tls", server(2, true, true), auto(1, false));
    server_handshake_seed(r, "export-name", server(0, false, false), auto(0, true));
    server_handshake_seed(
        r,
        "oldstyle",
        |s: &ServerSpec| s.oldstyle % 8 == 7 && s.tls % 3 == 0,
        auto(0, true),
    );
    server_handshake_seed(r, "simple", server(0, true, false), |c: &ClientSpec| {
        c.tls % 3 == 0 && !c.opt_mode && !c.structured && !c.extended && c.contexts.is_empty()
    });

    for (mode, block, name) in [
        (1, 0, "export-name"),
        (2, 1, "simple"),
        (3, 2, "structured"),
        (4, 3, "extended"),
        (4, 0, "extended-default-sizes"),
    ] {
        client_transmission_seed(r, name, mode, block);
        server_transmission_seed(r, name, mode, block);
    }

    for (i, u) in [
        "nbd://example.com/disk",
        "nbds://[::1]:10810/e?tls-certificates=/etc/pki&tls-verify-peer=0",
        "nbd+unix:///a%20b?socket=/tmp/x%20y.sock&tls=allow",
        "nbds+unix://user@/?socket=%00abstract&tls-type=psk&tls-hostname=h&x-extra=1#frag",
    ]
    .iter()
    .enumerate()
    {
        write("uri", &i.to_string(), u.as_bytes());
    }
}
