//! A WRITE whose payload arrives in several reads, on a connection that
//! allows one request in flight: the WRITE itself is that request, so the
//! limit must not stop the reading of its payload (it did: the connection
//! said Blocked forever, found by the `serve_connection` fuzz target).

mod common;

use std::sync::Arc;

use nbd_proto::client::{ClientEvent, Request};
use nbd_proto::wire::Command;
use nbd_server::{Limits, Status};
use nbd_storage::MemoryStorage;

#[test]
fn write_payload_in_pieces_with_one_request_in_flight() {
    let storage = Arc::new(MemoryStorage::new(1 << 20));
    let (mut server, mut writer, mut client) = common::connection(storage, Limits::default().max_in_flight(1));
    let waker = common::noop_waker();

    // The handshake.
    common::handshake(&mut server, &mut client);

    // The WRITE header, then its payload in three reads.
    let len = 3 * 4096;
    let cookie = client
        .start_request(Request::new(Command::WRITE, 0, len))
        .expect("client accepts");
    let mut header = Vec::new();
    let t = client.poll_transmit(&mut header).expect("the request");
    assert!(t.payload.is_some());
    assert_eq!(server.input(&header).expect("header"), header.len());
    let payload = vec![0x5a; len as usize];
    for piece in payload.chunks(4096) {
        assert!(
            matches!(server.status(Some(&waker)), Status::Read),
            "the WRITE's own payload must be read"
        );
        assert_eq!(server.input(piece).expect("payload"), piece.len());
    }

    // Its reply.
    let replies = common::drain(&mut writer, &waker);
    let mut rest = &replies[..];
    let mut done = false;
    loop {
        let (n, ev) = client.feed(rest).expect("valid reply");
        rest = &rest[n..];
        match ev {
            Some(ClientEvent::Done { cookie: c, result, .. }) => {
                assert_eq!(c, cookie);
                result.expect("the WRITE succeeds");
                done = true;
            }
            Some(_) => {}
            None if n == 0 => break,
            None => {}
        }
    }
    assert!(done, "the WRITE was answered");
    assert!(matches!(server.status(Some(&waker)), Status::Read));
}
