//! A client on an event loop of its own: one non-blocking socket under
//! `mio`, a [`ClientSession`] driven directly, many READs in flight.
//!
//! [`Buffers`] keeps the input and output bookkeeping, the session says
//! where each byte of READ data belongs in the export
//! ([`ClientEvent::Data`]'s `offset`) and what to wait for
//! ([`ClientSession::interest`]). It reads the whole export and prints its
//! SHA-256 and size, as `sha256sum` would print the file's hash.
//!
//! ```text
//! cargo run -p nbd-proto --example custom_loop -- 'nbd+unix:///?socket=/tmp/nbd.sock' [REQUESTS]
//! ```
//!
//! REQUESTS (64 by default) is the number of requests kept in flight.
//! TLS is left out (a real loop would run rustls' unbuffered API where the
//! session says `ClientNeed::StartTls`), and so is a timeout.

use std::io::{self, Read, Write};

use mio::{Events, Interest, Poll, Token};
use nbd_proto::client::{ClientConfig, ClientEvent, ClientSession, Request};
use nbd_proto::common::TlsMode;
use nbd_proto::driver::Buffers;
use nbd_proto::uri::{NbdUri, Transport};
use nbd_proto::wire::Command;
use sha2::{Digest, Sha256};

/// Bytes per READ request.
const CHUNK: u64 = 128 * 1024;

type BoxError = Box<dyn std::error::Error>;

fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let uri = NbdUri::parse(&args.next().ok_or("usage: custom_loop URI [REQUESTS]")?)?;
    let requests: usize = args.next().map_or(Ok(64), |n| n.parse())?;
    if uri.tls != TlsMode::Off {
        return Err("this example does not do TLS".into());
    }
    let mut config = uri.client_config(ClientConfig::default());
    config.max_in_flight = requests;
    config.meta_contexts.clear(); // plain reads: no block status needed
    let (hash, size) = match &uri.transport {
        Transport::Tcp { host, port } => {
            let s = std::net::TcpStream::connect((host.as_str(), *port))?;
            s.set_nodelay(true)?;
            s.set_nonblocking(true)?;
            run(mio::net::TcpStream::from_std(s), config)?
        }
        Transport::Unix { socket } => {
            let s = std::os::unix::net::UnixStream::connect(socket)?;
            s.set_nonblocking(true)?;
            run(mio::net::UnixStream::from_std(s), config)?
        }
    };
    println!("{hash}  {size}");
    Ok(())
}

/// The event loop: returns the export's SHA-256 (hex) and size.
fn run<S: Read + Write + mio::event::Source>(mut sock: S, config: ClientConfig) -> Result<(String, u64), BoxError> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(8);
    poll.registry()
        .register(&mut sock, Token(0), Interest::READABLE | Interest::WRITABLE)?;
    let mut session = ClientSession::new(config);
    let mut bufs = Buffers::new(256 * 1024);
    let (mut image, mut next) = (Vec::new(), 0u64);
    loop {
        // Queue READs while there is room; disconnect once all are done.
        let size = session.size();
        if session.is_connected() && image.len() as u64 != size {
            image = vec![0; usize::try_from(size)?];
        }
        while session.can_start_request() && next < size {
            let len = CHUNK.min(size - next);
            session.start_request(Request::new(Command::READ, next, len))?;
            next += len;
        }
        let all_read = session.is_connected() && next >= size && session.in_flight() == 0;
        if all_read && session.can_start_request() {
            session.disconnect()?;
        }
        // Send what is queued (READs carry no payload).
        bufs.queue_client(&mut session, |_, _| {});
        match sock.write(bufs.output()) {
            Ok(n) => bufs.written(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
        if all_read && !bufs.has_output() {
            return Ok((format!("{:x}", Sha256::digest(&image)), size));
        }
        // Read what the socket has, then feed it all to the session.
        let drained = match sock.read(bufs.read_buf()) {
            Ok(0) => return Err("the server closed the connection".into()),
            Ok(n) => {
                bufs.filled(n);
                false
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
            Err(e) => return Err(e.into()),
        };
        bufs.feed_client(&mut session, |event| -> Result<(), BoxError> {
            match event {
                ClientEvent::Data { offset, data, .. } => {
                    image[offset as usize..offset as usize + data.len()].copy_from_slice(data)
                }
                ClientEvent::Done { result, .. } => result?,
                _ => {} // Connected; holes: the image starts zeroed
            }
            Ok(())
        })?;
        // Block only when the socket is drained and nothing else is to do.
        let more = session.interest().write || (session.can_start_request() && next < session.size());
        if drained && !more {
            let want = bufs.interest(session.interest());
            if !want.read && !want.write {
                return Err("the session waits on a step this example does not do".into());
            }
            poll.poll(&mut events, None)?;
        }
    }
}
