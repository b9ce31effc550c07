//! Our blocking client against real servers: nbdkit (with its filters),
//! qemu-nbd and nbd-server, all started on Unix sockets in a temporary
//! directory.

use nbd_blocking::client::{Client, Error, Negotiation};
use nbd_proto::client::{ClientConfig, Mode, RequestError};
use nbd_proto::uri::NbdUri;
use nbd_proto::wire::{Command, CommandFlags, ErrorCode, ReplyType, TransmissionFlags};
use nbd_tests::*;

/// Every command against a server that supports them all.
fn exercise_all_commands(c: &mut Client) {
    let size = c.size();
    assert!(size >= 4 << 20);
    let data = pattern(128 * 1024, 7);
    c.write(&data, 1 << 20).unwrap();
    let mut back = vec![0u8; data.len()];
    c.read(&mut back, 1 << 20).unwrap();
    assert_eq!(back, data, "read back what was written");
    if c.flags().contains(TransmissionFlags::SEND_FUA) {
        c.write_with(&data[..4096], 0, CommandFlags::FUA).unwrap();
    }
    if c.flags().contains(TransmissionFlags::SEND_FLUSH) {
        c.flush().unwrap();
    }
    if c.flags().contains(TransmissionFlags::SEND_CACHE) {
        c.cache(0, 65536).unwrap();
    }
    // Zero part of the written range, with NO_HOLE, then trim another part.
    c.write_zeroes((1 << 20) + 4096, 8192, CommandFlags::NO_HOLE).unwrap();
    let mut z = vec![1u8; 8192];
    c.read(&mut z, (1 << 20) + 4096).unwrap();
    assert!(z.iter().all(|&b| b == 0), "write_zeroes reads back as zero");
    if c.flags().contains(TransmissionFlags::SEND_FAST_ZERO) {
        // Either it is fast, or the server says ENOTSUP quickly.
        match c.write_zeroes(2 << 20, 65536, CommandFlags::FAST_ZERO) {
            Ok(()) => {}
            Err(Error::Server(e)) => assert_eq!(e.code, ErrorCode::ENOTSUP),
            Err(e) => panic!("fast zero: {e}"),
        }
    }
    c.trim(3 << 20, 65536, CommandFlags::empty()).unwrap();
    if c.mode().structured() {
        let st = c.block_status(0, size, CommandFlags::empty()).unwrap();
        assert_eq!(st.len(), 1);
        assert_eq!(st[0].context, "base:allocation");
        assert!(!st[0].extents.is_empty());
        // The data region written at 1 MiB must not be reported as a hole.
        let mut off = 0;
        for e in &st[0].extents {
            if off <= (1 << 20) && (1 << 20) < off + e.length {
                assert_eq!(e.flags & 1, 0, "written data reported as a hole: {:?}", st[0].extents);
            }
            off += e.length;
        }
        let one = c.block_status(0, 4096, CommandFlags::REQ_ONE).unwrap();
        assert_eq!(one[0].extents.len(), 1);
        assert!(one[0].extents[0].length <= 4096);
    }
}

#[test]
fn nbdkit_memory_structured() {
    if !require_peer("nbdkit") {
        return;
    }
    let dir = TempDir::new();
    let peer = nbdkit(&dir, &["memory", "64M"]);
    let mut c = Client::connect(&peer.uri("")).unwrap();
    // nbdkit 1.32 has no extended headers: the client falls back.
    assert_eq!(c.mode(), Mode::Structured);
    assert_eq!(c.size(), 64 << 20);
    assert!(c.negotiated().context_id("base:allocation").is_some());
    exercise_all_commands(&mut c);
    c.disconnect().unwrap();
}

#[test]
fn nbdkit_oldstyle() {
    if !require_peer("nbdkit") {
        return;
    }
    let dir = TempDir::new();
    let peer = nbdkit(&dir, &["--oldstyle", "memory", "8M"]);
    let mut c = Client::connect(&peer.uri("")).unwrap();
    assert_eq!(c.mode(), Mode::Oldstyle);
    assert_eq!(c.size(), 8 << 20);
    let data = pattern(256 * 1024, 5);
    c.write(&data, 4096).unwrap();
    let mut back = vec![0u8; data.len()];
    c.read(&mut back, 4096).unwrap();
    assert_eq!(back, data);
    // nbdkit 1.32 advertises FLUSH, FUA, CACHE, TRIM and WRITE_ZEROES in oldstyle
    // but refuses them with EINVAL (libnbd's nbdsh gets the same): the
    // errors come back typed and the connection stays usable.
    for r in [
        c.flush(),
        c.cache(0, 4096),
        c.trim(0, 4096, CommandFlags::empty()),
        c.write_zeroes(0, 4096, CommandFlags::empty()),
        c.write_with(&data[..4096], 0, CommandFlags::FUA),
    ] {
        match r {
            Err(Error::Server(e)) => assert_eq!(e.code, ErrorCode::EINVAL),
            other => panic!("expected nbdkit's EINVAL, got {other:?}"),
        }
    }
    c.read(&mut back, 4096).unwrap();
    assert_eq!(back, data);
    // No metadata contexts in oldstyle: refused before the wire.
    assert!(matches!(
        c.block_status(0, 4096, CommandFlags::empty()),
        Err(Error::Request(RequestError::NoMetaContext))
    ));
    // A named export cannot be selected on an oldstyle server.
    let mut u = NbdUri::parse(&peer.uri("")).unwrap();
    u.export = "named".into();
    assert!(Client::connect_uri(&u, ClientConfig::default()).is_err());
}

#[test]
fn nbdkit_no_structured_replies() {
    if !require_peer("nbdkit") {
        return;
    }
    let dir = TempDir::new();
    let peer = nbdkit(&dir, &["--no-sr", "memory", "8M"]);
    let mut c = Client::connect(&peer.uri("")).unwrap();
    assert_eq!(c.mode(), Mode::Simple);
    assert!(!c.flags().contains(TransmissionFlags::SEND_DF));
    exercise_all_commands(&mut c);
    assert!(matches!(
        c.pread(&mut [0u8; 512], 0, CommandFlags::DF),
        Err(Error::Request(RequestError::BadFlag { .. }))
    ));
}

#[test]
fn nbdkit_read_only_refuses_writes_before_the_wire() {
    if !require_peer("nbdkit") {
        return;
    }
    let dir = TempDir::new();
    let peer = nbdkit(&dir, &["-r", "memory", "8M"]);
    let mut c = Client::connect(&peer.uri("")).unwrap();
    assert!(c.is_read_only());
    for r in [
        c.write(&[1u8; 512], 0),
        c.trim(0, 512, CommandFlags::empty()),
        c.write_zeroes(0, 512, CommandFlags::empty()),
    ] {
        assert!(matches!(r, Err(Error::Request(RequestError::ReadOnly(_)))), "{r:?}");
    }
    let mut buf = [1u8; 4096];
    c.read(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn nbdkit_block_size_policy() {
    if !require_peer("nbdkit") {
        return;
    }
    let dir = TempDir::new();
    let peer = nbdkit(
        &dir,
        &[
            "--filter=blocksize-policy",
            "memory",
            "8M",
            "blocksize-minimum=512",
            "blocksize-preferred=4096",
            "blocksize-maximum=65536",
            "blocksize-error-policy=error",
        ],
    );
    let mut c = Client::connect(&peer.uri("")).unwrap();
    let bs = c.negotiated().block_size.expect("block size advertised");
    assert_eq!((bs.minimum, bs.preferred, bs.maximum), (512, 4096, 65536));
    // Unaligned and oversized requests never reach the server.
    assert!(matches!(
        c.pread(&mut [0u8; 100], 0, CommandFlags::empty()),
        Err(Error::Request(RequestError::Unaligned { .. }))
    ));
    assert!(matches!(
        c.pwrite(&vec![0u8; 131072], 0, CommandFlags::empty()),
        Err(Error::Request(RequestError::TooLarge { .. }))
    ));
    // The splitting helpers respect the maximum.
    let data = pattern(300 * 1024, 3);
    c.write(&data, 4096).unwrap();
    let mut back = vec![0u8; data.len()];
    c.read(&mut back, 4096).unwrap();
    assert_eq!(back, data);
}

#[test]
fn nbdkit_several_exports_list_and_info() {
    if !require_peer("nbdkit") {
        return;
    }
    let dir = TempDir::new();
    let peer = nbdkit(
        &dir,
        &[
            "--filter=exportname",
            "memory",
            "4M",
            "exportname=alpha",
            "exportname=beta",
            "exportname-list=explicit",
            "exportname-strict=true",
            "exportdesc=fixed:a memory disk",
        ],
    );
    let uri = NbdUri::parse(&peer.uri("")).unwrap();
    let mut neg = Negotiation::connect(&uri, ClientConfig::default()).unwrap();
    let list = neg.list().unwrap();
    let names: Vec<&str> = list.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["alpha", "beta"]);
    let info = neg.info("beta").unwrap();
    assert_eq!(info.size, 4 << 20);
    assert_eq!(info.description.as_deref(), Some("a memory disk"));
    let ctxs = neg.list_meta_contexts("beta", &[]).unwrap();
    assert!(ctxs.iter().any(|c| c.name == "base:allocation"));
    // An unknown export is a typed refusal and the session goes on.
    let refused = neg.try_info("gamma").unwrap().unwrap_err();
    assert_eq!(refused.reply, ReplyType::ERR_UNKNOWN);
    let mut c = neg.go("alpha").unwrap();
    assert_eq!(c.negotiated().export_name, "alpha");
    c.write(&[9u8; 4096], 0).unwrap();
    c.disconnect().unwrap();
    // GO for an unknown export fails with the server's error.
    let mut u = uri.clone();
    u.export = "gamma".into();
    match Client::connect_uri(&u, ClientConfig::default()) {
        Err(Error::Handshake(nbd_proto::client::HandshakeError::Refused(e))) => {
            assert_eq!(e.reply, ReplyType::ERR_UNKNOWN)
        }
        other => panic!("expected ERR_UNKNOWN, got {other:?}"),
    }
}

#[test]
fn nbdkit_error_filter_gives_typed_errors_and_connection_survives() {
    if !require_peer("nbdkit") {
        return;
    }
    let dir = TempDir::new();
    let peer = nbdkit(
        &dir,
        &[
            "--filter=error",
            "memory",
            "8M",
            "error-pread=EIO",
            "error-pread-rate=100%",
            "error-zero=ENOSPC",
            "error-zero-rate=100%",
        ],
    );
    let mut c = Client::connect(&peer.uri("")).unwrap();
    for _ in 0..3 {
        match c.read(&mut [0u8; 4096], 0) {
            Err(Error::Server(e)) => assert_eq!(e.code, ErrorCode::EIO, "{e}"),
            other => panic!("expected EIO, got {other:?}"),
        }
        // Writes are unaffected: the connection is still usable.
        c.write(&[5u8; 4096], 0).unwrap();
    }
    match c.write_zeroes(0, 4096, CommandFlags::empty()) {
        Err(e @ Error::Server(_)) => assert_eq!(e.errno(), Some(28)),
        other => panic!("expected ENOSPC, got {other:?}"),
    }
    c.flush().unwrap();
    c.disconnect().unwrap();
}

#[test]
fn qemu_nbd_extended_headers_and_interchange_with_qemu_io() {
    if !require_peer("qemu-nbd") || !require_peer("qemu-io") || !require_peer("qemu-img") {
        return;
    }
    let dir = TempDir::new();
    let img = dir.join("disk.raw");
    run_ok("qemu-img", &["create", "-f", "raw", img.to_str().unwrap(), "32M"]);
    let peer = qemu_nbd(&dir, &["-f", "raw", "-x", "disk", img.to_str().unwrap()]);
    let uri = peer.uri("disk");
    let mut c = Client::connect(&uri).unwrap();
    assert_eq!(c.mode(), Mode::Extended, "qemu-nbd negotiates extended headers");
    exercise_all_commands(&mut c);
    // Ours writes, qemu-io reads back with a pattern check.
    c.write(&vec![0x5a; 1 << 20], 8 << 20).unwrap();
    c.flush().unwrap();
    c.disconnect().unwrap();
    let out = run_ok("qemu-io", &["-f", "raw", "-c", "read -P 0x5a 8M 1M", &uri]);
    assert!(out.contains("read 1048576/1048576"), "{out}");
    // qemu-io writes, ours reads back.
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0xc3 12M 512k", &uri]);
    let mut c = Client::connect(&uri).unwrap();
    let mut buf = vec![0u8; 512 * 1024];
    c.read(&mut buf, 12 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0xc3));
    // 64-bit block status through extended headers sees the data.
    let st = c.block_status(12 << 20, 1 << 20, CommandFlags::empty()).unwrap();
    assert_eq!(st[0].extents[0].flags & 1, 0);
    // Extended headers on, and still refused: requests past the end.
    assert!(matches!(
        c.block_status(c.size(), 1, CommandFlags::empty()),
        Err(Error::Request(RequestError::OutOfRange { .. }))
    ));
    c.disconnect().unwrap();
}

#[test]
fn nbdcopy_reads_what_we_wrote_and_we_read_what_it_wrote() {
    if !require_peer("nbdkit") || !require_peer("nbdcopy") {
        return;
    }
    let dir = TempDir::new();
    let peer = nbdkit(&dir, &["memory", "4M"]);
    let data = pattern(4 << 20, 11);
    let mut c = Client::connect(&peer.uri("")).unwrap();
    c.write(&data, 0).unwrap();
    c.disconnect().unwrap();
    let out = dir.join("out.raw");
    run_ok("nbdcopy", &[&peer.uri(""), out.to_str().unwrap()]);
    assert_eq!(std::fs::read(&out).unwrap(), data, "nbdcopy sees our writes");
    // The other way: nbdcopy writes a file into the server, we read it.
    let src = dir.join("src.raw");
    let data2 = pattern(4 << 20, 99);
    std::fs::write(&src, &data2).unwrap();
    run_ok("nbdcopy", &[src.to_str().unwrap(), &peer.uri("")]);
    let mut c = Client::connect(&peer.uri("")).unwrap();
    let mut back = vec![0u8; data2.len()];
    c.read(&mut back, 0).unwrap();
    assert_eq!(back, data2);
    c.disconnect().unwrap();
}

#[test]
fn nbd_server_several_exports() {
    if !require_peer("nbd-server") {
        return;
    }
    let dir = TempDir::new();
    let a = dir.join("a.img");
    let b = dir.join("b.img");
    std::fs::write(&a, vec![0u8; 2 << 20]).unwrap();
    std::fs::write(&b, vec![0x11u8; 1 << 20]).unwrap();
    let peer = nbd_server(&dir, &[("a", a.as_path(), false), ("b", b.as_path(), true)]);
    let uri = NbdUri::parse(&peer.uri("")).unwrap();
    let mut neg = Negotiation::connect(&uri, ClientConfig::default()).unwrap();
    let mut names: Vec<String> = neg.list().unwrap().into_iter().map(|e| e.name).collect();
    names.sort();
    assert_eq!(names, ["a", "b"]);
    neg.abort().unwrap();

    let mut ca = Client::connect(&peer.uri("a")).unwrap();
    assert_eq!(ca.size(), 2 << 20);
    let data = pattern(65536, 1);
    ca.write(&data, 4096).unwrap();
    // nbd-server advertises FLUSH only with `flush = true`.
    assert!(matches!(
        ca.flush(),
        Err(Error::Request(RequestError::NotAdvertised { .. }))
    ));
    let mut back = vec![0u8; data.len()];
    ca.read(&mut back, 4096).unwrap();
    assert_eq!(back, data);
    ca.disconnect().unwrap();

    let mut cb = Client::connect(&peer.uri("b")).unwrap();
    assert!(cb.is_read_only());
    let mut buf = vec![0u8; 4096];
    cb.read(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&x| x == 0x11));
    assert!(matches!(
        cb.write(&buf, 0),
        Err(Error::Request(RequestError::ReadOnly(Command::WRITE)))
    ));
    cb.disconnect().unwrap();
    // Data written through nbd-server landed in the file.
    let file = std::fs::read(&a).unwrap();
    assert_eq!(&file[4096..4096 + data.len()], &data[..]);
}
