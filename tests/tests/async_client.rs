//! The async multiplexed client against real servers: many tasks on one
//! connection, replies in any order, typed errors, a server that dies,
//! option mode, and abstract Unix sockets (for both clients).

use nbd_proto::client::{ClientConfig, HandshakeError};
use nbd_proto::wire::{CommandFlags, ErrorCode, ReplyType};
use nbd_smol::client::{Client, Error, Negotiation};
use nbd_tests::*;

#[test]
fn many_tasks_share_one_connection() {
    if !require_peer("nbdkit") {
        return;
    }
    let dir = TempDir::new();
    // The delay filter makes replies come back out of order under load.
    let peer = nbdkit(
        &dir,
        &["--filter=delay", "memory", "64M", "delay-read=1ms", "delay-write=2ms"],
    );
    smol::block_on(async {
        let c = Client::connect(&peer.uri("")).await.unwrap();
        let mut tasks = Vec::new();
        for t in 0..32u64 {
            let c = c.clone();
            tasks.push(smol::spawn(async move {
                let off = t * 256 * 1024;
                let data = pattern(256 * 1024, t);
                let (r, data) = c.write(data, off).await;
                r.unwrap();
                let (r, back) = c.read(vec![0u8; 256 * 1024], off).await;
                r.unwrap();
                assert_eq!(back, data, "task {t}");
            }));
        }
        for t in tasks {
            t.await;
        }
        c.flush().await.unwrap();
        // Holes read as zeroes even into a dirty buffer.
        c.trim(32 << 20, 1 << 20, CommandFlags::empty()).await.unwrap();
        let (r, b) = c.read(vec![0xffu8; 65536], 32 << 20).await;
        r.unwrap();
        assert!(b.iter().all(|&x| x == 0));
        let st = c.block_status(0, 64 << 20, CommandFlags::empty()).await.unwrap();
        assert_eq!(st.len(), 1);
        assert!(!st[0].extents.is_empty());
        c.disconnect().await.unwrap();
    });
}

#[test]
fn server_errors_are_typed_and_connection_survives() {
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
        ],
    );
    smol::block_on(async {
        let c = Client::connect(&peer.uri("")).await.unwrap();
        let reads: Vec<_> = (0..8)
            .map(|i| {
                let c = c.clone();
                smol::spawn(async move { c.read(vec![0u8; 4096], i * 4096).await.0 })
            })
            .collect();
        for r in reads {
            match r.await {
                Err(Error::Server(e)) => assert_eq!(e.code, ErrorCode::EIO),
                other => panic!("expected EIO, got {other:?}"),
            }
        }
        let (r, _) = c.write(vec![1u8; 4096], 0).await;
        r.unwrap();
    });
}

#[test]
fn a_dying_server_fails_outstanding_requests_at_once() {
    if !require_peer("nbdkit") {
        return;
    }
    let dir = TempDir::new();
    let mut peer = nbdkit(&dir, &["--filter=delay", "memory", "8M", "delay-read=3"]);
    smol::block_on(async {
        let c = Client::connect(&peer.uri("")).await.unwrap();
        let pending: Vec<_> = (0..4)
            .map(|i| {
                let c = c.clone();
                smol::spawn(async move { c.read(vec![0u8; 4096], i * 4096).await.0 })
            })
            .collect();
        smol::Timer::after(std::time::Duration::from_millis(300)).await;
        let start = std::time::Instant::now();
        peer.kill();
        for p in pending {
            assert!(matches!(p.await, Err(Error::Disconnected(_))));
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(2), "failed promptly");
        // New requests fail at once too.
        assert!(matches!(c.flush().await, Err(Error::Disconnected(_))));
    });
}

/// Option mode in the async client, against nbdkit with two named
/// exports: list, info, meta contexts, a typed refusal, then GO.
#[test]
fn option_mode_lists_and_asks_then_goes() {
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
    let uri = nbd_proto::uri::NbdUri::parse(&peer.uri("")).unwrap();
    smol::block_on(async {
        let mut neg = Negotiation::connect(&uri, ClientConfig::default()).await.unwrap();
        assert!(neg.session().fixed_newstyle() && neg.session().structured_replies());
        let names: Vec<String> = neg.list().await.unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["alpha", "beta"]);
        let info = neg.info("beta").await.unwrap();
        assert_eq!(info.size, 4 << 20);
        assert_eq!(info.description.as_deref(), Some("a memory disk"));
        let listed = neg.list_meta_contexts("beta", &[]).await.unwrap();
        assert!(listed.iter().any(|c| c.name == "base:allocation"));
        let refused = neg.try_info("gamma").await.unwrap().unwrap_err();
        assert_eq!(refused.reply, ReplyType::ERR_UNKNOWN);
        assert!(matches!(
            neg.info("gamma").await,
            Err(Error::Handshake(HandshakeError::Refused(_)))
        ));
        // (Last before GO: nbdkit forgets the selection at an INFO for
        // another export.)
        let set = neg.set_meta_contexts("alpha", &["base:allocation"]).await.unwrap();
        assert_eq!(set.len(), 1);
        let c = neg.go("alpha").await.unwrap();
        assert_eq!(c.negotiated().export_name, "alpha");
        let (r, _) = c.write(vec![9u8; 4096], 0).await;
        r.unwrap();
        let st = c.block_status(0, 8192, CommandFlags::empty()).await.unwrap();
        assert_eq!(st[0].context, "base:allocation");
        c.disconnect().await.unwrap();

        // Abort ends a session politely.
        let neg = Negotiation::connect(&uri, ClientConfig::default()).await.unwrap();
        neg.abort().await.unwrap();
    });
}

/// Both clients connect to an abstract Unix socket (`socket=%00NAME`):
/// here a relay to nbdkit's socket listens on one.
#[test]
fn both_clients_connect_to_abstract_sockets() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
    if !require_peer("nbdkit") {
        return;
    }
    let dir = TempDir::new();
    let peer = nbdkit(&dir, &["memory", "8M"]);
    let name = format!("nbd-rs-test-{}", std::process::id());
    let listener = UnixListener::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
    let target = peer.socket().to_path_buf();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(a) = conn else { return };
            let Ok(b) = UnixStream::connect(&target) else { return };
            let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
            std::thread::spawn(move || std::io::copy(&mut a2, &mut b2));
            let (mut a, mut b) = (a, b);
            std::thread::spawn(move || std::io::copy(&mut b, &mut a));
        }
    });
    let uri = format!("nbd+unix:///?socket=%00{name}");
    let mut c = nbd_blocking::Client::connect(&uri).unwrap();
    c.write(&[7u8; 4096], 8192).unwrap();
    c.disconnect().unwrap();
    smol::block_on(async {
        let c = Client::connect(&uri).await.unwrap();
        let (r, back) = c.read(vec![0u8; 4096], 8192).await;
        r.unwrap();
        assert_eq!(back, vec![7u8; 4096]);
        c.disconnect().await.unwrap();
    });
}
