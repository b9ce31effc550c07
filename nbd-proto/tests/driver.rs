//! The driver's helpers: `Buffers` carrying a whole conversation between a
//! client and a server session in memory, the export offsets on READ data
//! and holes, `request` by cookie, `interest`, and the server's output
//! order (no request decoded while handshake bytes wait).

use nbd_proto::client::{ClientConfig, ClientEvent, ClientSession, Request};
use nbd_proto::common::Interest;
use nbd_proto::driver::Buffers;
use nbd_proto::server::{
    ExportDetails, ExportListing, ExportLookup, ServerConfig, ServerEvent, ServerSession, ServerSessionError,
};
use nbd_proto::wire::Command;

const SIZE: u64 = 1 << 20;

struct One;

impl ExportLookup for One {
    type Export = ();
    fn lookup(&self, name: &str) -> Option<(ExportDetails, ())> {
        name.is_empty().then(|| (ExportDetails::new("", SIZE), ()))
    }
    fn list(&self, each: &mut dyn FnMut(ExportListing<'_>)) {
        each(ExportListing {
            name: "",
            description: "",
            tls_only: false,
        });
    }
}

/// The byte at `offset` of the server's export.
fn byte(offset: u64) -> u8 {
    (offset % 251) as u8
}

/// Answers READs: the first half of each as data, the second as a hole
/// (structured replies), or all data (simple replies).
fn serve(server: &mut ServerSession<One>, event: ServerEvent<'_>, out: &mut Vec<u8>) -> Result<(), ServerSessionError> {
    let (ServerEvent::Request(req), Some(enc)) = (event, server.encoder()) else {
        return Ok(());
    };
    assert_eq!(req.command, Command::READ);
    if enc.mode().structured() {
        let half = req.length / 2;
        let h = enc.offset_data_header(&req, req.offset, half, false).unwrap();
        out.extend_from_slice(h.as_bytes());
        out.extend((req.offset..req.offset + half).map(byte));
        let h = enc
            .hole_chunk(&req, req.offset + half, req.length - half, false)
            .unwrap();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(enc.reply_ok(&req).as_bytes());
    } else {
        out.extend_from_slice(enc.read_reply_header(&req).unwrap().as_bytes());
        out.extend((req.offset..req.offset + req.length).map(byte));
    }
    Ok(())
}

/// Moves the output of one side's buffers into the other's input.
fn carry(from: &mut Buffers, to: &mut Buffers) {
    let n = from.output().len().min(to.read_buf().len());
    to.read_buf()[..n].copy_from_slice(&from.output()[..n]);
    to.filled(n);
    from.written(n);
}

#[test]
fn a_conversation_through_buffers() {
    for structured in [true, false] {
        let mut client = ClientSession::new(
            ClientConfig::default()
                .structured_replies(structured)
                .extended_headers(false)
                .meta_contexts(Vec::new()),
        );
        let mut server = ServerSession::new(ServerConfig::default(), One);
        let (mut cb, mut sb) = (Buffers::new(4096), Buffers::new(4096));
        assert_eq!(
            client.interest(),
            Interest {
                read: true,
                write: false
            }
        );
        assert!(!client.can_start_request());
        let mut image = vec![0xeeu8; SIZE as usize];
        let mut next = 0u64;
        let mut done = 0;
        for _ in 0..10_000 {
            while client.can_start_request() && next < SIZE {
                let cookie = client.start_request(Request::new(Command::READ, next, 8192)).unwrap();
                assert_eq!(client.request(cookie).map(|r| r.offset), Some(next));
                next += 8192;
            }
            cb.queue_client(&mut client, |_, _| unreachable!("no WRITEs"));
            carry(&mut cb, &mut sb);
            sb.feed_server(&mut server, serve).unwrap();
            sb.queue_server(&mut server);
            carry(&mut sb, &mut cb);
            cb.feed_client(&mut client, |event| {
                match event {
                    ClientEvent::Data { offset, data, .. } => {
                        image[offset as usize..offset as usize + data.len()].copy_from_slice(data)
                    }
                    ClientEvent::Hole { offset, length, .. } => {
                        image[offset as usize..(offset + length) as usize].fill(0)
                    }
                    ClientEvent::Done { result, .. } => {
                        result.unwrap();
                        done += 1;
                    }
                    _ => {}
                }
                Ok::<_, nbd_proto::client::ClientSessionError>(())
            })
            .unwrap();
            if done == SIZE / 8192 {
                break;
            }
        }
        assert_eq!(done, SIZE / 8192, "structured {structured}");
        for (k, chunk) in image.chunks(8192).enumerate() {
            let base = k as u64 * 8192;
            for (i, &b) in chunk.iter().enumerate() {
                let want = if structured && i >= 4096 {
                    0
                } else {
                    byte(base + i as u64)
                };
                assert_eq!(b, want, "structured {structured}: byte {}", base + i as u64);
            }
        }
        assert_eq!(
            client.interest(),
            Interest {
                read: true,
                write: false
            }
        );
        assert!(client.can_start_request());
    }
}

/// A client that sends its first request right behind `NBD_OPT_GO`: the
/// server session decodes it only once the driver took the handshake's
/// last bytes, so no reply can overtake them.
#[test]
fn no_request_before_the_handshake_bytes_are_taken() {
    type CErr = nbd_proto::client::ClientSessionError;
    // A handshake to the end, recording everything the client sends.
    let mut client = ClientSession::new(ClientConfig::default());
    let mut server = ServerSession::new(ServerConfig::default(), One);
    let (mut cb, mut sb) = (Buffers::new(1 << 16), Buffers::new(1 << 16));
    let mut sent = Vec::new();
    for _ in 0..100 {
        sb.queue_server(&mut server);
        carry(&mut sb, &mut cb);
        cb.feed_client(&mut client, |_| Ok::<_, CErr>(())).unwrap();
        cb.queue_client(&mut client, |_, _| {});
        sent.extend_from_slice(cb.output());
        carry(&mut cb, &mut sb);
        sb.feed_server(&mut server, |_, _, _| Ok::<_, ServerSessionError>(()))
            .unwrap();
        if client.is_connected() {
            break;
        }
    }
    assert!(client.is_connected());
    // The same bytes and a READ right behind them, to a fresh server whose
    // driver does not take its output in between.
    client.start_request(Request::new(Command::READ, 0, 512)).unwrap();
    let mut header = Vec::new();
    while client.poll_transmit(&mut header).is_some() {}
    sent.extend_from_slice(&header);
    let mut server = ServerSession::new(ServerConfig::default(), One);
    let mut sb = Buffers::new(1 << 16);
    sb.read_buf()[..sent.len()].copy_from_slice(&sent);
    sb.filled(sent.len());
    let mut requests = 0;
    let mut count = |s: &mut ServerSession<One>, e: ServerEvent<'_>, _: &mut Vec<u8>| {
        if let ServerEvent::Request(r) = e {
            assert!(!s.has_output(), "a request decoded while handshake bytes wait");
            assert_eq!((r.command, r.offset, r.length), (Command::READ, 0, 512));
            requests += 1;
        }
        Ok::<_, ServerSessionError>(())
    };
    assert!(sb.feed_server(&mut server, &mut count).unwrap());
    assert!(server.has_output(), "the handshake's last bytes wait");
    assert_eq!(sb.input().len(), header.len(), "the request is held");
    assert!(!server.interest().read || server.interest().write);
    sb.queue_server(&mut server);
    sb.feed_server(&mut server, &mut count).unwrap();
    assert_eq!(requests, 1, "the request came once the bytes were taken");
    assert!(sb.input().is_empty());
}
