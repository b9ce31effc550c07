//! The async multiplexed client against real servers: many tasks on one
//! connection, replies in any order, typed errors, and a server that dies.

use nbd_proto::wire::{CommandFlags, ErrorCode};
use nbd_smol::client::{Client, Error};
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
