//! An NBD server written straight on `nbd_proto::ServerSession`: one
//! thread per connection, an in-memory disk, std sockets. Everything about
//! the protocol (options, TLS refusals, structured replies, validation of
//! every request) is the session's; [`Buffers`] keeps the input and output
//! bookkeeping; this file only moves bytes and runs requests.
//!
//! ```sh
//! cargo run -p nbd-proto --example server -- /tmp/nbd.sock 64M
//! nbdinfo 'nbd+unix:///?socket=/tmp/nbd.sock'
//! qemu-io -f raw -c 'write -P 7 0 1M' 'nbd+unix:///?socket=/tmp/nbd.sock'
//! ```

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

use nbd_proto::driver::Buffers;
use nbd_proto::server::{
    ExportDetails, ExportListing, ExportLookup, ReplyEncoder, ServerConfig, ServerEvent, ServerNeed, ServerRequest,
    ServerSession, ServerSessionError,
};
use nbd_proto::wire::{Command, ErrorCode, TransmissionFlags};

/// The one export: a disk in memory, shared by every connection.
#[derive(Clone)]
struct Disk(Arc<Mutex<Vec<u8>>>);

impl ExportLookup for Disk {
    type Export = Disk;
    fn lookup(&self, name: &str) -> Option<(ExportDetails, Disk)> {
        if !name.is_empty() {
            return None;
        }
        let mut d = ExportDetails::new("", self.0.lock().unwrap().len() as u64);
        d.description = "an example disk in memory".into();
        d.flags |= TransmissionFlags::SEND_TRIM | TransmissionFlags::SEND_WRITE_ZEROES;
        d.meta_contexts.clear(); // no block status here
        Some((d, self.clone()))
    }
    fn list(&self, each: &mut dyn FnMut(ExportListing<'_>)) {
        each(ExportListing {
            name: "",
            description: "an example disk in memory",
            tls_only: false,
        });
    }
}

/// Executes a request; the reply goes into `out`.
fn execute(disk: &Disk, enc: &ReplyEncoder, req: &ServerRequest, out: &mut Vec<u8>) {
    let mut data = disk.0.lock().unwrap();
    let range = req.offset as usize..(req.offset + req.length) as usize;
    match req.command {
        Command::READ => match enc.read_reply_header(req) {
            Ok(header) => {
                out.extend_from_slice(header.as_bytes());
                out.extend_from_slice(&data[range]);
            }
            Err(e) => enc.reply_error(req, ErrorCode::EINVAL, &e.to_string(), out),
        },
        Command::TRIM | Command::WRITE_ZEROES => {
            data[range].fill(0);
            out.extend_from_slice(enc.reply_ok(req).as_bytes());
        }
        // WRITE (its payload is stored as it arrives), FLUSH, CACHE.
        _ => out.extend_from_slice(enc.reply_ok(req).as_bytes()),
    }
}

fn serve(mut stream: UnixStream, disk: Disk) -> std::io::Result<()> {
    let mut session = ServerSession::new(ServerConfig::default(), disk);
    let mut bufs = Buffers::new(256 * 1024);
    loop {
        let progress = bufs
            .feed_server(&mut session, |session, event, out| {
                let (Some(enc), Some(disk)) = (session.encoder(), session.export().cloned()) else {
                    return Ok::<_, ServerSessionError>(()); // still negotiating: Aborted and the like
                };
                match event {
                    ServerEvent::Request(req) if req.command == Command::WRITE && req.length > 0 => {}
                    ServerEvent::Request(req) => execute(&disk, &enc, &req, out),
                    ServerEvent::WriteData {
                        request,
                        offset,
                        data,
                        last,
                    } => {
                        let at = (request.offset + offset) as usize;
                        disk.0.lock().unwrap()[at..at + data.len()].copy_from_slice(data);
                        if last {
                            out.extend_from_slice(enc.reply_ok(&request).as_bytes());
                        }
                    }
                    ServerEvent::Reject { request, error, reason } => enc.reply_error(&request, error, reason, out),
                    _ => {} // Ready, Disconnect (need() then says Closed)
                }
                Ok(())
            })
            .map_err(std::io::Error::other)?;
        // Handshake bytes, then replies: the session keeps that order.
        bufs.queue_server(&mut session);
        stream.write_all(bufs.output())?;
        bufs.written(bufs.output().len());
        if let ServerNeed::Closed = session.need() {
            return Ok(());
        }
        if progress && !bufs.input().is_empty() {
            continue; // requests held behind the handshake's last bytes
        }
        match stream.read(bufs.read_buf())? {
            0 => return Ok(()), // the client went away
            n => bufs.filled(n),
        }
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "/tmp/nbd-example.sock".into());
    let size = match args.next().as_deref().map(|s| s.trim_end_matches(['M', 'm'])) {
        Some(m) => m.parse::<usize>().map_err(std::io::Error::other)? << 20,
        None => 64 << 20,
    };
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    println!("serving {size} bytes on {path}");
    let disk = Disk(Arc::new(Mutex::new(vec![0; size])));
    for stream in listener.incoming() {
        let disk = disk.clone();
        let stream = stream?;
        std::thread::spawn(move || {
            if let Err(e) = serve(stream, disk) {
                eprintln!("connection: {e}");
            }
        });
    }
    Ok(())
}
