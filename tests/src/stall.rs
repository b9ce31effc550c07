//! A fake NBD server that stops answering at a chosen point, to prove
//! that the clients' and tools' deadlines fire.
//!
//! It listens on a Unix socket and serves every connection in a thread of
//! its own: an honest fixed-newstyle handshake (structured replies and
//! `base:allocation`, no extended headers), honest block status (all
//! data), and then silence where [`Stall`] says. A silent connection is
//! held open until the client hangs up, so only the client's own deadline
//! can end the wait.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use crate::{Endpoint, TempDir};

/// Where the fake server stops answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    /// Never accepts: its listen queue is full (of connections the fake
    /// server made to itself), so a client's connect cannot complete.
    Connect,
    /// Accepts the connection and never says a word (not even the
    /// greeting).
    Handshake,
    /// Completes the handshake, then reads requests and answers none.
    AfterHandshake,
    /// Completes the handshake; cuts the reply to the first READ or
    /// BLOCK_STATUS in the middle (half of a READ's data, or a block
    /// status chunk's context id without its extents) and then says
    /// nothing more.
    MidReply,
    /// Like [`Stall::MidReply`], but answers BLOCK_STATUS in full (all
    /// data) and cuts only the first READ's reply.
    MidRead,
}

/// The size of the fake export.
pub const STALL_EXPORT_SIZE: u64 = 16 << 20;

/// The id of `base:allocation` on the fake server.
const CONTEXT_ID: u32 = 1;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const OPT_GO: u32 = 7;
const OPT_INFO: u32 = 6;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;
const OPT_ABORT: u32 = 2;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNSUP: u32 = 0x8000_0001;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_BLOCK_STATUS: u16 = 7;

const REPLY_FLAG_DONE: u16 = 1;
const CHUNK_OFFSET_DATA: u16 = 1;
const CHUNK_BLOCK_STATUS: u16 = 5;

/// A running fake server; stops accepting when dropped.
#[derive(Debug)]
pub struct StallServer {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    _dir: TempDir,
}

impl StallServer {
    /// Starts a fake server that stalls as `stall` says.
    pub fn start(stall: Stall) -> StallServer {
        let dir = TempDir::new();
        let socket = dir.socket_path("stall");
        let stop = Arc::new(AtomicBool::new(false));
        if stall == Stall::Connect {
            let queue = full_queue(&socket);
            let stopped = stop.clone();
            thread::spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    thread::sleep(Duration::from_millis(20));
                }
                drop(queue);
            });
            return StallServer {
                socket,
                stop,
                _dir: dir,
            };
        }
        let listener = UnixListener::bind(&socket).expect("bind the fake server's socket");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let stopped = stop.clone();
        thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        thread::spawn(move || {
                            let _ = s.set_nonblocking(false);
                            let _ = serve(s, stall);
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(5)),
                    Err(_) => return,
                }
            }
        });
        StallServer {
            socket,
            stop,
            _dir: dir,
        }
    }

    /// The URI of its export.
    pub fn uri(&self) -> String {
        Endpoint::Unix(self.socket.clone()).uri("")
    }
}

impl Drop for StallServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A listener on `path` that never accepts, with its listen queue filled:
/// the listener and the connections in its queue, to be kept open.
fn full_queue(path: &std::path::Path) -> (socket2::Socket, Vec<socket2::Socket>) {
    use socket2::{Domain, SockAddr, Socket, Type};
    let addr = SockAddr::unix(path).expect("the fake server's address");
    let listener = Socket::new(Domain::UNIX, Type::STREAM, None).expect("a socket");
    listener.bind(&addr).expect("bind the fake server's socket");
    listener.listen(0).expect("listen");
    let mut queued = Vec::new();
    loop {
        let s = Socket::new(Domain::UNIX, Type::STREAM, None).expect("a socket");
        s.set_nonblocking(true).expect("non-blocking socket");
        match s.connect(&addr) {
            Ok(()) => queued.push(s),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (listener, queued),
            Err(e) => panic!("cannot fill the fake server's listen queue: {e}"),
        }
        assert!(queued.len() < 1024, "the listen queue of the fake server does not fill");
    }
}

/// Reads until the client hangs up (holding the connection open).
fn hold(s: &mut UnixStream) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    while s.read(&mut buf)? > 0 {}
    Ok(())
}

fn recv(s: &mut UnixStream, n: usize) -> io::Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b)?;
    Ok(b)
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap_or_default())
}

fn option_reply(s: &mut UnixStream, option: u32, reply: u32, data: &[u8]) -> io::Result<()> {
    let mut m = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&reply.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m)
}

fn serve(mut s: UnixStream, stall: Stall) -> io::Result<()> {
    if stall == Stall::Handshake {
        return hold(&mut s);
    }
    // Fixed newstyle, no zeroes.
    let mut g = NBDMAGIC.to_be_bytes().to_vec();
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&3u16.to_be_bytes());
    s.write_all(&g)?;
    recv(&mut s, 4)?;
    let mut structured = false;
    loop {
        let h = recv(&mut s, 16)?;
        let option = be32(&h[8..]);
        let len = be32(&h[12..]) as usize;
        if len > 1 << 16 {
            return Ok(());
        }
        recv(&mut s, len)?;
        match option {
            OPT_STRUCTURED_REPLY if !structured => {
                structured = true;
                option_reply(&mut s, option, REP_ACK, &[])?;
            }
            OPT_SET_META_CONTEXT | OPT_LIST_META_CONTEXT if structured => {
                let mut reply = CONTEXT_ID.to_be_bytes().to_vec();
                reply.extend_from_slice(b"base:allocation");
                option_reply(&mut s, option, REP_META_CONTEXT, &reply)?;
                option_reply(&mut s, option, REP_ACK, &[])?;
            }
            OPT_GO | OPT_INFO => {
                // HAS_FLAGS | SEND_FLUSH | SEND_WRITE_ZEROES
                let flags: u16 = 1 | 4 | 32;
                let mut info = vec![0, 0];
                info.extend_from_slice(&STALL_EXPORT_SIZE.to_be_bytes());
                info.extend_from_slice(&flags.to_be_bytes());
                option_reply(&mut s, option, REP_INFO, &info)?;
                option_reply(&mut s, option, REP_ACK, &[])?;
                if option == OPT_GO {
                    break;
                }
            }
            OPT_ABORT => {
                option_reply(&mut s, option, REP_ACK, &[])?;
                return Ok(());
            }
            _ => option_reply(&mut s, option, REP_ERR_UNSUP, &[])?,
        }
    }
    if stall == Stall::AfterHandshake {
        return hold(&mut s);
    }
    loop {
        let h = recv(&mut s, 28)?;
        if be32(&h) != REQUEST_MAGIC {
            return Ok(());
        }
        let command = u16::from_be_bytes([h[6], h[7]]);
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap_or_default());
        let offset = u64::from_be_bytes(h[16..24].try_into().unwrap_or_default());
        let length = be32(&h[24..]);
        match command {
            CMD_BLOCK_STATUS if stall == Stall::MidRead => {
                // All data, in one extent.
                let mut m = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
                m.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
                m.extend_from_slice(&CHUNK_BLOCK_STATUS.to_be_bytes());
                m.extend_from_slice(&cookie.to_be_bytes());
                m.extend_from_slice(&12u32.to_be_bytes());
                m.extend_from_slice(&CONTEXT_ID.to_be_bytes());
                m.extend_from_slice(&length.to_be_bytes());
                m.extend_from_slice(&0u32.to_be_bytes());
                s.write_all(&m)?;
            }
            CMD_BLOCK_STATUS => {
                // Announce one extent, send the context id, go silent.
                let mut m = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
                m.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
                m.extend_from_slice(&CHUNK_BLOCK_STATUS.to_be_bytes());
                m.extend_from_slice(&cookie.to_be_bytes());
                m.extend_from_slice(&12u32.to_be_bytes());
                m.extend_from_slice(&CONTEXT_ID.to_be_bytes());
                s.write_all(&m)?;
                return hold(&mut s);
            }
            CMD_READ => {
                // Announce all of the data, send half of it, go silent.
                let mut m = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
                m.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
                m.extend_from_slice(&CHUNK_OFFSET_DATA.to_be_bytes());
                m.extend_from_slice(&cookie.to_be_bytes());
                m.extend_from_slice(&(8 + length).to_be_bytes());
                m.extend_from_slice(&offset.to_be_bytes());
                m.resize(m.len() + length as usize / 2, 0x5a);
                s.write_all(&m)?;
                return hold(&mut s);
            }
            CMD_WRITE => {
                recv(&mut s, length as usize)?;
                return hold(&mut s);
            }
            CMD_DISC => return Ok(()),
            _ => return hold(&mut s),
        }
    }
}
