//! A transmitting connection keeps its own idle period: `poll_timeout`
//! names the moment it gives its buffers back ([`IDLE_RELEASE`] after the
//! first time it was told once idle), `handle_timeout` does it then (not
//! before, once per idle period), and a request in between starts a new
//! idle period.

mod common;

use std::sync::Arc;
use std::task::Waker;
use std::time::Duration;

use nbd_proto::client::{ClientEvent, ClientSession, Request};
use nbd_proto::time::Timestamp;
use nbd_proto::wire::Command;
use nbd_server::{IDLE_RELEASE, Limits, ReplyWriter, ServeConnection};
use nbd_storage::MemoryStorage;

fn at(ms: u64) -> Timestamp {
    Timestamp::from_origin(Duration::from_millis(ms))
}

struct Pair {
    server: ServeConnection,
    writer: ReplyWriter,
    client: ClientSession,
    waker: Waker,
}

impl Pair {
    /// A connection driven in memory to transmission, told the time 0 at
    /// its start.
    fn transmitting() -> Pair {
        let storage = Arc::new(MemoryStorage::new(1 << 20));
        let (mut server, writer, mut client) = common::connection(storage, Limits::default());
        server.handle_timeout(at(0)).expect("the handshake just started");
        assert!(server.poll_timeout().is_some(), "the handshake's deadline");
        common::handshake(&mut server, &mut client);
        Pair {
            server,
            writer,
            client,
            waker: common::noop_waker(),
        }
    }

    /// The header of a WRITE of `len` bytes, then `sent` of its payload.
    fn write(&mut self, len: usize, sent: usize) -> Vec<u8> {
        self.client
            .start_request(Request::new(Command::WRITE, 0, len as u64))
            .expect("client accepts");
        let mut header = Vec::new();
        let t = self.client.poll_transmit(&mut header).expect("the request");
        assert!(t.payload.is_some());
        assert_eq!(self.server.input(&header).expect("header"), header.len());
        let payload = vec![0x5a; len];
        self.payload(&payload[..sent]);
        payload[sent..].to_vec()
    }

    fn payload(&mut self, bytes: &[u8]) {
        let mut used = 0;
        while used < bytes.len() {
            used += self.server.input(&bytes[used..]).expect("payload");
        }
    }

    /// Takes the replies and checks the client accepts them: `n` of them.
    fn replies(&mut self, n: usize) {
        let replies = common::drain(&mut self.writer, &self.waker);
        let mut rest = &replies[..];
        let mut done = 0;
        loop {
            let (used, ev) = self.client.feed(rest).expect("valid reply");
            rest = &rest[used..];
            match ev {
                Some(ClientEvent::Done { result, .. }) => {
                    result.expect("the request succeeds");
                    done += 1;
                }
                Some(_) => {}
                None if used == 0 => break,
                None => {}
            }
        }
        assert_eq!(done, n, "replies");
    }

    fn tell(&mut self, ms: u64) {
        self.server
            .handle_timeout(at(ms))
            .expect("transmission never times out");
    }
}

#[test]
fn an_idle_connection_releases_its_buffers_at_the_deadline_it_names() {
    let mut p = Pair::transmitting();
    let idle = IDLE_RELEASE.as_millis() as u64;
    // A WRITE (run in place), answered: nothing in flight.
    p.write(64 << 10, 64 << 10);
    p.replies(1);
    assert_eq!(p.server.in_flight(), 0);
    assert_eq!(p.server.poll_timeout(), None, "not told the time since the input");
    assert_eq!(p.server.idle_releases(), 0);

    // Idle from the first time told.
    p.tell(5_000);
    assert_eq!(p.server.poll_timeout(), Some(at(5_000 + idle)));
    // A stale clock neither fires it nor moves it.
    p.tell(4_000);
    assert_eq!(p.server.poll_timeout(), Some(at(5_000 + idle)));
    p.tell(5_000 + idle - 1);
    assert_eq!(p.server.idle_releases(), 0, "not before the deadline");
    assert_eq!(p.server.poll_timeout(), Some(at(5_000 + idle)));

    // At it: released, once.
    p.tell(5_000 + idle);
    assert_eq!(p.server.idle_releases(), 1, "released at the deadline");
    assert_eq!(p.server.poll_timeout(), None, "nothing more to do while idle");
    p.tell(5_000 + 10 * idle);
    assert_eq!(p.server.idle_releases(), 1, "once per idle period");

    // The connection still serves, and its next idle period releases again.
    p.write(4096, 4096);
    p.replies(1);
    p.tell(20_000);
    assert_eq!(p.server.poll_timeout(), Some(at(20_000 + idle)));
    p.tell(20_000 + idle);
    assert_eq!(p.server.idle_releases(), 2);
}

#[test]
fn a_request_restarts_the_idle_period() {
    let mut p = Pair::transmitting();
    let idle = IDLE_RELEASE.as_millis() as u64;
    p.tell(1_000);
    assert_eq!(p.server.poll_timeout(), Some(at(1_000 + idle)));

    // A request before the deadline.
    p.tell(1_000 + idle / 2);
    p.write(4096, 4096);
    p.replies(1);
    assert_eq!(p.server.poll_timeout(), None, "input ended the idle period");
    p.tell(1_000 + idle / 2 + 1);
    let deadline = 1_000 + idle / 2 + 1 + idle;
    assert_eq!(p.server.poll_timeout(), Some(at(deadline)));
    p.tell(1_000 + idle);
    assert_eq!(p.server.idle_releases(), 0, "the old deadline no longer counts");
    p.tell(deadline - 1);
    assert_eq!(p.server.idle_releases(), 0);
    p.tell(deadline);
    assert_eq!(p.server.idle_releases(), 1);
}

#[test]
fn a_request_in_flight_is_not_idle() {
    let mut p = Pair::transmitting();
    let idle = IDLE_RELEASE.as_millis() as u64;
    // A WRITE whose payload has not all arrived: in flight.
    let rest = p.write(8192, 4096);
    assert_eq!(p.server.in_flight(), 1);
    p.tell(1_000);
    let recheck = p.server.poll_timeout().expect("a moment to look again");
    assert!(recheck > at(1_000) && recheck < at(1_000 + idle), "{recheck:?}");
    // Long past: still in flight, so nothing is released.
    p.tell(1_000 + 5 * idle);
    assert_eq!(p.server.idle_releases(), 0);
    let again = p.server.poll_timeout().expect("a moment to look again");
    assert!(again > at(1_000 + 5 * idle), "{again:?}");

    // The payload completes it: idle from the first time told after that.
    p.payload(&rest);
    p.replies(1);
    p.tell(1_000 + 6 * idle);
    assert_eq!(p.server.poll_timeout(), Some(at(1_000 + 7 * idle)));
    p.tell(1_000 + 7 * idle - 1);
    assert_eq!(p.server.idle_releases(), 0);
    p.tell(1_000 + 7 * idle);
    assert_eq!(p.server.idle_releases(), 1);
}

#[test]
fn no_idle_deadline_once_nothing_more_is_read() {
    let mut p = Pair::transmitting();
    p.tell(1_000);
    assert!(p.server.poll_timeout().is_some());
    p.server.input_closed();
    assert_eq!(p.server.poll_timeout(), None);
    p.tell(100_000);
    assert_eq!(p.server.idle_releases(), 0);
}
