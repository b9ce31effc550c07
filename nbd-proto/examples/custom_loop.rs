//! A client on an event loop of its own: one non-blocking socket under
//! `mio`, a [`ClientSession`] driven directly, many READs in flight.
//!
//! The loop is the one the session's docs give: queue requests, send what
//! `poll_transmit` gives, read whatever the socket has and `feed` all of
//! it (the session keeps partial headers itself, and hands READ data back
//! as events borrowing the input), then wait for the socket. It reads the
//! whole export and prints its SHA-256 and size, as
//! `sha256sum` would print the file's hash.
//!
//! ```text
//! cargo run -p nbd-proto --example custom_loop -- 'nbd+unix:///?socket=/tmp/nbd.sock' [REQUESTS]
//! ```
//!
//! REQUESTS (64 by default) is the number of requests kept in flight.
//! TLS is left out (a real loop would run rustls' unbuffered API where the
//! session says [`ClientNeed::StartTls`]), and so is a timeout.

use std::io::{self, Read, Write};

use mio::{Events, Interest, Poll, Token};
use nbd_proto::client::{ClientConfig, ClientEvent, ClientNeed, ClientSession, Request};
use nbd_proto::common::TlsMode;
use nbd_proto::uri::{NbdUri, Transport};
use nbd_proto::wire::Command;
use sha2::{Digest, Sha256};

/// Bytes per READ request.
const CHUNK: u64 = 128 * 1024;

type BoxError = Box<dyn std::error::Error>;

fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let uri = NbdUri::parse(&args.next().ok_or("usage: custom_loop URI [REQUESTS]")?)?;
    let requests: usize = match args.next() {
        Some(n) => n.parse()?,
        None => 64,
    };
    if uri.tls != TlsMode::Off {
        return Err("this example does not do TLS".into());
    }
    let mut config = uri.client_config(ClientConfig::default());
    config.max_in_flight = requests;
    // Plain reads: no block status needed.
    config.meta_contexts = Vec::new();
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
    const SOCKET: Token = Token(0);
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(8);
    poll.registry()
        .register(&mut sock, SOCKET, Interest::READABLE | Interest::WRITABLE)?;

    let mut session = ClientSession::new(config);
    // Output: what poll_transmit gave and the socket has not taken yet.
    let mut out: Vec<u8> = Vec::new();
    let mut out_pos = 0;
    // Input: what the socket gave and the session has not consumed yet.
    let mut input = vec![0u8; 256 * 1024];
    let (mut in_start, mut in_end) = (0, 0);
    // The export, and the offset each in-flight request (by slot) reads.
    let mut image: Vec<u8> = Vec::new();
    let mut request_offset = vec![0u64; session.capacity()];
    let mut next_offset = 0u64;
    let mut disconnecting = false;

    loop {
        // 1. Queue requests while there is room.
        if session.is_connected() && !disconnecting {
            let size = session.size();
            while session.in_flight() < session.capacity() && next_offset < size {
                let len = CHUNK.min(size - next_offset);
                let cookie = session.start_request(Request::new(Command::READ, next_offset, len))?;
                request_offset[cookie.slot()] = next_offset;
                next_offset += len;
            }
            if next_offset >= size && session.in_flight() == 0 {
                session.disconnect()?;
                disconnecting = true;
            }
        }

        // 2. Send what the session has (READs carry no payload).
        while session.poll_transmit(&mut out).is_some() {}
        while out_pos < out.len() {
            match sock.write(&out[out_pos..]) {
                Ok(n) => out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        if out_pos == out.len() {
            out.clear();
            out_pos = 0;
            if disconnecting {
                let size = image.len() as u64;
                return Ok((format!("{:x}", Sha256::digest(&image)), size));
            }
        }

        // 3. Feed everything received, until the session takes no more.
        loop {
            let (n, event) = session.feed(&input[in_start..in_end])?;
            in_start += n;
            match event {
                Some(ClientEvent::Connected) => {
                    let size = usize::try_from(session.size())?;
                    image = vec![0; size];
                }
                Some(ClientEvent::Data {
                    cookie,
                    buf_offset,
                    data,
                }) => {
                    let at = (request_offset[cookie.slot()] + buf_offset) as usize;
                    image[at..at + data.len()].copy_from_slice(data);
                }
                Some(ClientEvent::Hole {
                    cookie,
                    buf_offset,
                    length,
                }) => {
                    let at = (request_offset[cookie.slot()] + buf_offset) as usize;
                    image[at..at + length as usize].fill(0);
                }
                Some(ClientEvent::Done { result, .. }) => result?,
                Some(_) => {}
                None if n == 0 => break,
                None => {}
            }
        }
        match session.need() {
            ClientNeed::Closed => return Err("the session closed".into()),
            ClientNeed::StartTls(_) | ClientNeed::Negotiating => return Err("unexpected handshake step".into()),
            _ => {}
        }
        let room = session.is_connected()
            && !disconnecting
            && session.in_flight() < session.capacity()
            && (next_offset < session.size() || session.in_flight() == 0);
        if session.has_output() || room {
            // More to queue or to send before waiting.
            continue;
        }

        // 4. Read what the socket has; wait for it when it has nothing.
        if in_start == in_end {
            (in_start, in_end) = (0, 0);
        } else if in_end == input.len() {
            input.copy_within(in_start..in_end, 0);
            (in_start, in_end) = (0, in_end - in_start);
        }
        match sock.read(&mut input[in_end..]) {
            Ok(0) => return Err("the server closed the connection".into()),
            Ok(n) => in_end += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => poll.poll(&mut events, None)?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}
