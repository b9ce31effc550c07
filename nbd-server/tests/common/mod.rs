//! What the in-memory tests of `ServeConnection` share.

use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use nbd_proto::client::{ClientConfig, ClientSession};
use nbd_proto::server::ServerConfig;
use nbd_server::{Export, Limits, ReplyWriter, ServeConnection, ServeContext};
use nbd_storage::Storage;

/// A server connection exporting `storage` (as the default export, with
/// `limits`), its reply writer, and a client, both at the start of the
/// handshake ([`handshake`] takes them to transmission).
pub fn connection(storage: Arc<dyn Storage>, limits: Limits) -> (ServeConnection, ReplyWriter, ClientSession) {
    let ctx = Arc::new(ServeContext::new(
        vec![Export::new("", "", storage)],
        ServerConfig::default(),
        limits,
    ));
    let server = ServeConnection::new(&ctx);
    let writer = server.reply_writer();
    (server, writer, ClientSession::new(ClientConfig::default()))
}

/// Moves the handshake's bytes between `server` and `client` until both
/// are in transmission (panics if they do not get there).
pub fn handshake(server: &mut ServeConnection, client: &mut ClientSession) {
    for _ in 0..100 {
        let mut to_client = Vec::new();
        while server.poll_transmit(&mut to_client).is_some() {}
        let mut rest = &to_client[..];
        loop {
            let (n, ev) = client.feed(rest).expect("client accepts");
            rest = &rest[n..];
            if ev.is_none() && n == 0 {
                break;
            }
        }
        let mut to_server = Vec::new();
        while client.poll_transmit(&mut to_server).is_some() {}
        let mut used = 0;
        while used < to_server.len() {
            used += server.input(&to_server[used..]).expect("server accepts");
        }
        if client.is_connected() && server.is_transmitting() {
            break;
        }
    }
    assert!(client.is_connected() && server.is_transmitting());
}

/// A waker that does nothing (the tests poll by hand).
pub fn noop_waker() -> Waker {
    struct Noop;
    impl Wake for Noop {
        fn wake(self: Arc<Self>) {}
    }
    Waker::from(Arc::new(Noop))
}

/// Everything the writer holds, as a runtime writes it.
pub fn drain(writer: &mut ReplyWriter, waker: &Waker) -> Vec<u8> {
    let mut out = Vec::new();
    let mut cx = Context::from_waker(waker);
    while let Poll::Ready(true) = writer.poll_batch(&mut cx) {
        while !writer.is_empty() {
            let n = writer.with_slices(|slices| {
                slices
                    .iter()
                    .map(|s| {
                        out.extend_from_slice(s);
                        s.len()
                    })
                    .sum()
            });
            writer.advance(n);
        }
    }
    out
}
