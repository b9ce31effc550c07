//! Copies with a stream at one end or both: stdin or stdout (`-`), pipes,
//! FIFOs, sockets, character devices. A stream is read or written in
//! order, by a thread of its own; the other end runs as in any copy:
//!
//! - from a stream: a reader thread fills request-sized buffers in order
//!   and `connections × requests` workers write them to the destination
//!   (NBD, a file, a block device, `null:`) in any order; buffers of
//!   zeroes become holes (or nothing on a destination known to be zero,
//!   or allocated zeroes with `--allocated`). The size is what the stream
//!   held: an NBD export or a block device must be large enough, a
//!   regular file takes that size.
//! - to a stream: the source's allocation map is walked as usual; data is
//!   read ahead in parallel, and a writer thread writes it, and the holes
//!   as zeroes, in order.
//! - stream to stream: one thread reads and writes.
//!
//! A stream destination whose reader went away ends the copy with
//! [`BROKEN_PIPE`].

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use nbd_proto::wire::TransmissionFlags;
use nbd_storage::FileStorage;

use super::{
    BROKEN_PIPE, CopyOptions, Location, Planner, Progress, Side, Work, finish, is_zero, open_nbd, read, write,
    write_zeroes,
};

/// The reading end of a stream copy.
#[derive(Debug)]
pub(super) struct StreamIn {
    file: File,
    name: String,
}

impl StreamIn {
    /// A stream to read, named `name` in messages.
    pub(super) fn new(file: File, name: String) -> StreamIn {
        StreamIn { file, name }
    }
}

/// The writing end of a stream copy.
#[derive(Debug)]
pub(super) struct StreamOut {
    file: File,
    name: String,
}

/// A copy of stdin (`fd` 0) or stdout (1) that can be owned and closed
/// without closing the process's own.
pub(super) fn dup_stdio(fd: i32, name: &str) -> Result<File, String> {
    // SAFETY: F_DUPFD_CLOEXEC only duplicates the descriptor.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if copy == -1 {
        return Err(format!("{name}: {}", io::Error::last_os_error()));
    }
    // SAFETY: `copy` was just made and is owned here alone.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(copy) }))
}

/// The destination as a stream, if it is one: `-` unless stdout is a
/// regular file or block device that can be written at any offset (not
/// opened for appending), or a path that exists and is neither a regular
/// file nor a block device. `-` on a terminal is refused, as nbdcopy
/// refuses it.
pub(super) fn stream_destination(dst: &Location) -> Result<Option<StreamOut>, String> {
    match dst {
        Location::Stdio => {
            let f = dup_stdio(1, "stdout")?;
            // SAFETY: isatty and fcntl(F_GETFL) only query the descriptor.
            let (tty, flags) = unsafe {
                (
                    libc::isatty(f.as_raw_fd()) == 1,
                    libc::fcntl(f.as_raw_fd(), libc::F_GETFL),
                )
            };
            if tty {
                return Err("stdout: refusing to write to a terminal".into());
            }
            let kind = f.metadata().map_err(|e| format!("stdout: {e}"))?.file_type();
            let appending = flags != -1 && flags & libc::O_APPEND != 0;
            let writable = flags != -1 && flags & libc::O_ACCMODE != libc::O_RDONLY;
            if (kind.is_file() || kind.is_block_device()) && !appending && writable {
                return Ok(None);
            }
            Ok(Some(StreamOut {
                file: f,
                name: "stdout".into(),
            }))
        }
        Location::File(p) => match std::fs::metadata(p) {
            Ok(m) if !m.file_type().is_file() && !m.file_type().is_block_device() && !m.is_dir() => {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .map_err(|e| format!("{}: {e}", p.display()))?;
                Ok(Some(StreamOut {
                    file,
                    name: p.display().to_string(),
                }))
            }
            _ => Ok(None),
        },
        Location::Nbd(_) | Location::Null | Location::Http(_) => Ok(None),
    }
}

/// Reads until `buf` is full or the stream ends; returns how much it
/// read.
fn read_full(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A write error of a stream destination, with [`BROKEN_PIPE`] for a
/// reader that went away.
fn write_error(name: &str, e: io::Error) -> String {
    if e.kind() == io::ErrorKind::BrokenPipe {
        BROKEN_PIPE.to_string()
    } else {
        format!("{name}: {e}")
    }
}

/// Where a stream's bytes go.
enum Destination {
    /// NBD, a block device, `null:`: bounded by their size.
    Side(Side, bool),
    /// A regular file, which takes the stream's size: emptied first (so
    /// skipped zeroes are holes), written at any offset, then given the
    /// stream's length.
    Growing(Arc<File>, String),
}

/// Copies a stream to `dst`; returns the bytes copied.
pub(super) async fn from_stream(
    input: StreamIn,
    dst: &Location,
    opts: &CopyOptions,
    progress: Arc<Progress>,
) -> Result<u64, String> {
    if let Some(out) = stream_destination(dst)? {
        return stream_to_stream(input, out, opts, progress).await;
    }
    let destination = match dst {
        Location::Nbd(u) => {
            let p = open_nbd(u, opts, Vec::new()).await?;
            if p.flags().contains(TransmissionFlags::READ_ONLY) {
                return Err(format!("{}: the destination export is read-only", u.to_uri_string()));
            }
            Destination::Side(Side::Nbd(p), opts.destination_is_zero)
        }
        Location::File(p) => {
            let name = p.display().to_string();
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(p)
                .map_err(|e| format!("{name}: {e}"))?;
            growing_or_device(f, name, opts)?
        }
        Location::Stdio => growing_or_device(dup_stdio(1, "stdout")?, "stdout".into(), opts)?,
        Location::Null => Destination::Side(Side::Null, true),
        Location::Http(url) => return Err(super::http_destination(url)),
    };
    let limit = match &destination {
        Destination::Side(side, _) => side.size(),
        Destination::Growing(..) => None,
    };
    let workers = match &destination {
        Destination::Side(Side::Nbd(p), _) => p.clients().len() * opts.requests.max(1),
        _ => opts.requests.max(1),
    };
    // Buffers go round: the reader fills them, the workers give them back.
    let (full_tx, full_rx) = smol::channel::bounded::<Result<(u64, Vec<u8>), String>>(workers);
    let (free_tx, free_rx) = smol::channel::unbounded::<Vec<u8>>();
    let read_total = Arc::new(AtomicU64::new(0));
    {
        let read_total = read_total.clone();
        let request_size = opts.request_size;
        let StreamIn { mut file, name } = input;
        let buffers = workers + 1;
        std::thread::spawn(move || {
            let mut made = 0;
            let mut offset = 0u64;
            loop {
                let mut buf = match free_rx.try_recv() {
                    Ok(b) => b,
                    Err(_) if made < buffers => {
                        made += 1;
                        Vec::with_capacity(request_size)
                    }
                    Err(_) => match free_rx.recv_blocking() {
                        Ok(b) => b,
                        Err(_) => return,
                    },
                };
                buf.resize(request_size, 0);
                match read_full(&mut file, &mut buf) {
                    Err(e) => {
                        let _ = full_tx.send_blocking(Err(format!("{name}: {e}")));
                        return;
                    }
                    Ok(0) => return,
                    Ok(n) => {
                        buf.truncate(n);
                        let at = offset;
                        offset += n as u64;
                        read_total.store(offset, Ordering::SeqCst);
                        if full_tx.send_blocking(Ok((at, buf))).is_err() || n < request_size {
                            return;
                        }
                    }
                }
            }
        });
    }
    let destination = Arc::new(destination);
    let failed = Arc::new(AtomicBool::new(false));
    let tasks: Vec<smol::Task<Result<(), String>>> = (0..workers)
        .map(|_| {
            let destination = destination.clone();
            let full_rx = full_rx.clone();
            let free_tx = free_tx.clone();
            let progress = progress.clone();
            let failed = failed.clone();
            let allocated = opts.allocated;
            smol::spawn(async move {
                let r = async {
                    while let Ok(item) = full_rx.recv().await {
                        if failed.load(Ordering::Relaxed) {
                            break;
                        }
                        let (offset, buf) = item?;
                        let len = buf.len() as u64;
                        if let Some(size) = limit
                            && offset + len > size
                        {
                            return Err(format!(
                                "the destination ({size} bytes) is smaller than the source (more than {size} bytes)"
                            ));
                        }
                        let buf = write_piece(&destination, offset, buf, allocated).await?;
                        progress.done.fetch_add(len, Ordering::Relaxed);
                        let _ = free_tx.send(buf).await;
                    }
                    Ok(())
                }
                .await;
                if r.is_err() {
                    failed.store(true, Ordering::Relaxed);
                    // Let the reader see that nobody takes its buffers.
                    full_rx.close();
                }
                r
            })
        })
        .collect();
    drop(full_rx);
    drop(free_tx);
    let mut first_error = None;
    for t in tasks {
        if let Err(e) = t.await
            && first_error.is_none()
        {
            first_error = Some(e);
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let total = read_total.load(Ordering::SeqCst);
    match &*destination {
        Destination::Side(side, _) => finish(&Side::Null, side, opts).await?,
        Destination::Growing(f, name) => {
            let f = f.clone();
            let flush = opts.flush;
            let name = name.clone();
            smol::unblock(move || {
                f.set_len(total)?;
                if flush { f.sync_all() } else { Ok(()) }
            })
            .await
            .map_err(|e| format!("{name}: {e}"))?;
        }
    }
    Ok(total)
}

/// A regular file grows with the stream; a block device is written in
/// place, as far as it goes.
fn growing_or_device(f: File, name: String, opts: &CopyOptions) -> Result<Destination, String> {
    let kind = f.metadata().map_err(|e| format!("{name}: {e}"))?.file_type();
    if kind.is_block_device() {
        let s = FileStorage::from_file(f, false).map_err(|e| format!("{name}: {e}"))?;
        return Ok(Destination::Side(
            Side::File(Arc::new(s), false),
            opts.destination_is_zero,
        ));
    }
    f.set_len(0).map_err(|e| format!("{name}: {e}"))?;
    Ok(Destination::Growing(Arc::new(f), name))
}

/// Writes one buffer of the stream at `offset`: zeroes as a hole (or not
/// at all where the destination is zero already) unless `allocated`.
/// Gives the buffer back.
async fn write_piece(dst: &Destination, offset: u64, mut buf: Vec<u8>, allocated: bool) -> Result<Vec<u8>, String> {
    let len = buf.len() as u64;
    let zero = !allocated && is_zero(&buf);
    match dst {
        Destination::Side(side, known_zero) => {
            if zero {
                if !known_zero {
                    write_zeroes(side, offset, len, false, &mut buf).await?;
                }
                Ok(buf)
            } else {
                write(side, offset, buf).await
            }
        }
        Destination::Growing(f, name) => {
            if zero {
                // The file was emptied: what is not written reads as zeroes.
                return Ok(buf);
            }
            let f = f.clone();
            let name = name.clone();
            smol::unblock(move || f.write_all_at(&buf, offset).map(|()| buf))
                .await
                .map_err(|e| format!("{name}: write at {offset}: {e}"))
        }
    }
}

/// Both ends are streams: one thread reads and writes.
async fn stream_to_stream(
    input: StreamIn,
    out: StreamOut,
    opts: &CopyOptions,
    progress: Arc<Progress>,
) -> Result<u64, String> {
    let request_size = opts.request_size;
    smol::unblock(move || {
        let StreamIn { mut file, name } = input;
        let StreamOut {
            file: mut w,
            name: out_name,
        } = out;
        let mut buf = vec![0u8; request_size];
        let mut total = 0u64;
        loop {
            let n = read_full(&mut file, &mut buf).map_err(|e| format!("{name}: {e}"))?;
            if n == 0 {
                break;
            }
            w.write_all(&buf[..n]).map_err(|e| write_error(&out_name, e))?;
            total += n as u64;
            progress.done.fetch_add(n as u64, Ordering::Relaxed);
            if n < request_size {
                break;
            }
        }
        w.flush().map_err(|e| write_error(&out_name, e))?;
        Ok(total)
    })
    .await
}

/// What the writer of a stream destination is handed, in order.
enum Piece {
    /// Bytes read from the source.
    Data(Vec<u8>),
    /// This many zeroes (a hole of the source).
    Zeroes(u64),
}

/// A piece on its way: a read still running, or zeroes.
enum Pending {
    Read(smol::Task<Result<Vec<u8>, String>>),
    Zeroes(u64),
}

/// Copies a random-access source to a stream, in order, with reads
/// running ahead; returns the bytes copied.
pub(super) async fn to_stream(
    src: Side,
    out: StreamOut,
    opts: &CopyOptions,
    progress: Arc<Progress>,
) -> Result<u64, String> {
    let size = src.size().unwrap_or(0);
    progress.total.store(size, Ordering::Relaxed);
    let depth = match &src {
        Side::Nbd(p) => p.clients().len() * opts.requests.max(1),
        _ => opts.requests.max(1),
    };
    let src = Arc::new(src);
    let (tx, rx) = smol::channel::bounded::<Piece>(depth);
    let (free_tx, free_rx) = smol::channel::unbounded::<Vec<u8>>();
    let writer = {
        let progress = progress.clone();
        std::thread::spawn(move || -> Result<(), String> {
            let StreamOut { file: mut w, name } = out;
            let zeroes = vec![0u8; 1 << 20];
            while let Ok(piece) = rx.recv_blocking() {
                match piece {
                    Piece::Data(buf) => {
                        w.write_all(&buf).map_err(|e| write_error(&name, e))?;
                        progress.done.fetch_add(buf.len() as u64, Ordering::Relaxed);
                        let _ = free_tx.send_blocking(buf);
                    }
                    Piece::Zeroes(mut n) => {
                        while n > 0 {
                            let k = n.min(zeroes.len() as u64) as usize;
                            w.write_all(&zeroes[..k]).map_err(|e| write_error(&name, e))?;
                            progress.done.fetch_add(k as u64, Ordering::Relaxed);
                            n -= k as u64;
                        }
                    }
                }
            }
            w.flush().map_err(|e| write_error(&name, e))
        })
    };
    let mut planner = Planner::new(size, opts);
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let copied: Result<(), String> = async {
        loop {
            while pending.len() < depth {
                let work = match planner.queue.pop_front() {
                    Some(w) => w,
                    None if planner.next_offset < planner.size => {
                        planner.refill(&src).await?;
                        continue;
                    }
                    None => break,
                };
                pending.push_back(match work {
                    Work::Zero { length, .. } => Pending::Zeroes(length),
                    Work::Data { offset, length } => {
                        let mut buf = free_rx.try_recv().unwrap_or_default();
                        buf.resize(length as usize, 0);
                        let src = src.clone();
                        Pending::Read(smol::spawn(async move { read(&src, offset, buf).await }))
                    }
                });
            }
            let Some(next) = pending.pop_front() else {
                return Ok(());
            };
            let piece = match next {
                Pending::Read(t) => Piece::Data(t.await?),
                Pending::Zeroes(n) => Piece::Zeroes(n),
            };
            if tx.send(piece).await.is_err() {
                // The writer stopped: its error says why.
                return Ok(());
            }
        }
    }
    .await;
    drop(tx);
    drop(pending);
    let written = smol::unblock(move || writer.join())
        .await
        .unwrap_or_else(|_| Err("the writer thread panicked".into()));
    copied?;
    written?;
    finish(&src, &Side::Null, opts).await?;
    Ok(progress.done.load(Ordering::Relaxed))
}
