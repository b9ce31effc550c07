//! READ replies as the client sees them: a reply queued with pages the
//! storage lent is not changed by a WRITE that arrives before it is sent,
//! and a sparse READ that fails after some of its chunks were built is
//! answered by its error alone (the chunks built before are dropped, and
//! the connection goes on).

mod common;

use std::io;
use std::sync::Arc;

use nbd_proto::client::{ClientEvent, ClientSession, Cookie, Request};
use nbd_proto::wire::Command;
use nbd_server::{Limits, ReplyWriter, ServeConnection};
use nbd_storage::{Capabilities, Extent, MemoryStorage, Storage};

/// A connection driven in memory, in transmission.
struct Pair {
    server: ServeConnection,
    writer: ReplyWriter,
    client: ClientSession,
}

impl Pair {
    fn new(storage: Arc<dyn Storage>) -> Pair {
        let (mut server, writer, mut client) = common::connection(storage, Limits::default());
        common::handshake(&mut server, &mut client);
        Pair { server, writer, client }
    }

    /// Sends a request (with its payload, if any) to the server.
    fn send(&mut self, request: Request, payload: &[u8]) -> Cookie {
        let cookie = self.client.start_request(request).expect("client accepts");
        let mut bytes = Vec::new();
        let t = self.client.poll_transmit(&mut bytes).expect("the request");
        if t.payload.is_some() {
            bytes.extend_from_slice(payload);
        }
        let mut used = 0;
        while used < bytes.len() {
            used += self.server.input(&bytes[used..]).expect("server accepts");
        }
        cookie
    }

    /// Everything the server replied until now, fed to the client: per
    /// request, the bytes its READ got (holes as zeroes) and its outcome.
    fn replies(&mut self) -> Vec<(Cookie, Vec<u8>, bool)> {
        let bytes = common::drain(&mut self.writer, &common::noop_waker());
        let mut out: Vec<(Cookie, Vec<u8>, bool)> = Vec::new();
        let mut data: Vec<(Cookie, u64, Vec<u8>)> = Vec::new();
        let mut rest = &bytes[..];
        loop {
            let (n, ev) = self.client.feed(rest).expect("a valid reply stream");
            rest = &rest[n..];
            match ev {
                Some(ClientEvent::Data {
                    cookie,
                    buf_offset,
                    data: d,
                    ..
                }) => data.push((cookie, buf_offset, d.to_vec())),
                Some(ClientEvent::Hole {
                    cookie,
                    buf_offset,
                    length,
                    ..
                }) => data.push((cookie, buf_offset, vec![0; length as usize])),
                Some(ClientEvent::Done { cookie, result, .. }) => {
                    let mut buf = Vec::new();
                    for (_, at, d) in data.iter().filter(|(c, ..)| *c == cookie) {
                        let at = *at as usize;
                        if buf.len() < at + d.len() {
                            buf.resize(at + d.len(), 0);
                        }
                        buf[at..at + d.len()].copy_from_slice(d);
                    }
                    data.retain(|(c, ..)| *c != cookie);
                    out.push((cookie, buf, result.is_ok()));
                }
                Some(_) => {}
                None if n == 0 => break,
                None => {}
            }
        }
        assert!(rest.is_empty(), "{} bytes of a partial reply", rest.len());
        out
    }
}

#[test]
fn a_write_after_a_read_does_not_change_its_queued_reply() {
    let storage = Arc::new(MemoryStorage::new(1 << 20));
    let mut pair = Pair::new(storage);
    let len = 256 << 10;
    let old: Vec<u8> = (0..len).map(|i| (i % 253) as u8 + 1).collect();
    let new = vec![0xEE; len];
    let w1 = pair.send(Request::new(Command::WRITE, 4096, len as u64), &old);
    let r1 = pair.send(Request::new(Command::READ, 4096, len as u64), &[]);
    // Not yet written to the client: the WRITE lands first.
    let w2 = pair.send(Request::new(Command::WRITE, 0, len as u64), &new);
    let r2 = pair.send(Request::new(Command::READ, 4096, len as u64), &[]);
    let replies = pair.replies();
    let find = |cookie| replies.iter().find(|(c, ..)| *c == cookie).expect("answered");
    assert!(find(w1).2 && find(w2).2 && find(r1).2 && find(r2).2);
    assert!(find(r1).1 == old, "the first READ's reply changed after it was queued");
    let mut expected = new[4096..].to_vec();
    expected.extend_from_slice(&old[len - 4096..]);
    assert!(find(r2).1 == expected, "the second READ sees the WRITE");
}

/// 256 KiB: data, a hole, then data that cannot be read.
#[derive(Debug)]
struct FailsAfterAHole;

const FAIL_AT: u64 = 128 << 10;

impl Storage for FailsAfterAHole {
    fn size(&self) -> u64 {
        256 << 10
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default().read_only(true)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if offset + buf.len() as u64 > FAIL_AT {
            return Err(io::Error::other("the disk is gone"));
        }
        buf.fill(0xAB);
        Ok(())
    }

    fn write_at(&self, _: &[u8], _: u64, _: bool) -> io::Result<()> {
        Err(io::Error::other("read-only"))
    }

    fn block_status(&self, offset: u64, length: u64, out: &mut Vec<Extent>) -> io::Result<()> {
        let end = offset + length;
        for (a, b, hole) in [
            (0, 64 << 10, false),
            (64 << 10, FAIL_AT, true),
            (FAIL_AT, 256 << 10, false),
        ] {
            let (a, b) = (a.max(offset), b.min(end));
            if a < b {
                out.push(if hole { Extent::hole(b - a) } else { Extent::data(b - a) });
            }
        }
        Ok(())
    }

    fn never_blocks(&self) -> bool {
        true
    }
}

#[test]
fn a_sparse_read_failing_midway_is_answered_by_its_error_alone() {
    let mut pair = Pair::new(Arc::new(FailsAfterAHole));
    let bad = pair.send(Request::new(Command::READ, 0, 256 << 10), &[]);
    let good = pair.send(Request::new(Command::READ, 0, 128 << 10), &[]);
    let replies = pair.replies();
    assert_eq!(replies.len(), 2, "{replies:?}");
    let (cookie, data, ok) = &replies[0];
    assert_eq!(*cookie, bad);
    assert!(!ok, "the failing READ reports its error");
    assert!(
        data.is_empty(),
        "no chunk of the failed READ is sent ({} bytes were)",
        data.len()
    );
    let (cookie, data, ok) = &replies[1];
    assert_eq!(*cookie, good);
    assert!(ok);
    let mut expected = vec![0xAB; 64 << 10];
    expected.resize(128 << 10, 0);
    assert!(*data == expected, "the READ after it is answered whole");
}
