//! The filesystem of `nbd-fuse`: one directory holding one regular file
//! whose bytes are an NBD export's, as libnbd's `nbdfuse` presents it.
//!
//! Built on [`fuser`], which speaks the FUSE protocol itself and mounts
//! through `fusermount` (no libfuse). fuser hands each request to one
//! thread; every request that reaches the export is turned into a task on
//! smol's global executor, which answers the kernel when the NBD reply
//! comes, so the kernel's requests run concurrently (over the
//! connections of a multi-conn [`Pool`]) and a slow one never blocks the
//! others.
//!
//! What the file does:
//!
//! - read and write go to the export (in pieces no larger than the
//!   server's maximum payload);
//! - `flush` (each `close`) and `fsync` send NBD FLUSH when the server
//!   takes it;
//! - `lseek(SEEK_DATA)` and `lseek(SEEK_HOLE)` are answered from the
//!   `base:allocation` map (a hole is an extent with `NBD_STATE_HOLE`);
//!   without it the whole file is data;
//! - `fallocate(PUNCH_HOLE | KEEP_SIZE)` is WRITE_ZEROES that lets the
//!   server punch (NBD TRIM does not promise zeroes, a punched hole
//!   must read back as zeroes), `fallocate(ZERO_RANGE)` is WRITE_ZEROES
//!   with `NO_HOLE`; a server without WRITE_ZEROES gets zeroes written;
//! - a read-only file (`-r`, or a read-only export) refuses opening for
//!   writing with EACCES, as nbdfuse does;
//! - an NBD error is the server's errno; any other failure (the server
//!   gone, a deadline expired) is EIO.

use std::ffi::{OsStr, OsString};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig,
    LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use nbd_proto::wire::{AllocationFlags, CONTEXT_BASE_ALLOCATION, CommandFlags, TransmissionFlags};
use nbd_smol::Pool;

/// The file's inode number (the directory is [`INodeNo::ROOT`]).
const FILE_INO: INodeNo = INodeNo(2);

/// How long the kernel may keep names and attributes: they never change.
const TTL: Duration = Duration::from_secs(3600);

/// The largest piece of one WRITE_ZEROES or block-status request.
const BIG_PIECE: u64 = 1 << 30;

/// The largest piece of zeroes written for a server without
/// WRITE_ZEROES.
const ZERO_BUF: u64 = 1 << 20;

/// What the filesystem is made with.
#[derive(Debug, Clone)]
pub struct FuseOptions {
    /// The file's name in the mount's directory.
    pub name: OsString,
    /// Refuse writes (set also when the export is read-only).
    pub readonly: bool,
    /// Keep the kernel's page cache across opens (`-o kernel_cache`).
    pub kernel_cache: bool,
    /// Print each failed request to stderr.
    pub verbose: bool,
}

/// The filesystem: an export as one file.
#[derive(Debug)]
pub struct NbdFs {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: Arc<Pool>,
    opts: FuseOptions,
    size: u64,
    /// The server's largest payload.
    max_payload: u64,
    /// The `base:allocation` context id, if negotiated.
    allocation: Option<u32>,
    uid: u32,
    gid: u32,
    time: SystemTime,
    /// Data buffers given back once their request is done (a READ's
    /// reply sent, a WRITE acknowledged), reused so that a request
    /// neither zeroes nor faults in fresh memory.
    free_bufs: Mutex<Vec<Vec<u8>>>,
}

/// Data buffers kept for reuse (at most this many bytes in all).
const KEEP_FREE_BYTES: usize = 32 << 20;

impl NbdFs {
    /// A filesystem over `pool`.
    pub fn new(pool: Arc<Pool>, mut opts: FuseOptions) -> NbdFs {
        if pool.flags().contains(TransmissionFlags::READ_ONLY) {
            opts.readonly = true;
        }
        let neg = pool.negotiated();
        let max_payload = u64::from(neg.constraints().maximum).clamp(4096, 32 << 20);
        let allocation = neg.context_id(CONTEXT_BASE_ALLOCATION);
        // SAFETY: getuid and getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        NbdFs {
            inner: Arc::new(Inner {
                size: pool.size(),
                pool,
                opts,
                max_payload,
                allocation,
                uid,
                gid,
                time: SystemTime::now(),
                free_bufs: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Whether the file is read-only.
    pub fn readonly(&self) -> bool {
        self.inner.opts.readonly
    }

    /// Runs `f` on smol's executor.
    fn spawn<F, Fut>(&self, f: F)
    where
        F: FnOnce(Arc<Inner>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        smol::spawn(f(self.inner.clone())).detach();
    }
}

impl Inner {
    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            INodeNo::ROOT => (FileType::Directory, 0o555, 0, 2),
            FILE_INO => (
                FileType::RegularFile,
                if self.opts.readonly { 0o444 } else { 0o666 },
                self.size,
                1,
            ),
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    /// The errno a failed request answers the kernel with.
    fn errno(&self, what: &str, e: &nbd_smol::Error) -> Errno {
        if self.opts.verbose {
            eprintln!("nbd-fuse: {what}: {e}");
        }
        match e {
            nbd_smol::Error::Server(_) => Errno::from_i32(e.errno().unwrap_or(libc::EIO)),
            _ => Errno::EIO,
        }
    }

    /// `[offset, offset + len)` clipped to the export.
    fn clip(&self, offset: u64, len: u64) -> (u64, u64) {
        let offset = offset.min(self.size);
        (offset, len.min(self.size - offset))
    }

    /// A buffer of `len` bytes (contents unspecified: the caller fills
    /// it), a reused one when one is free.
    fn take_buf(&self, len: usize) -> Vec<u8> {
        let mut b = {
            let mut free = self.free_bufs.lock().unwrap_or_else(|p| p.into_inner());
            match free.iter().position(|b| b.capacity() >= len) {
                Some(i) => free.swap_remove(i),
                None => free.pop().unwrap_or_default(),
            }
        };
        if b.len() >= len {
            b.truncate(len);
        } else {
            b.resize(len, 0);
        }
        b
    }

    /// Gives back a buffer from [`Inner::take_buf`].
    fn give_buf(&self, buf: Vec<u8>) {
        let mut free = self.free_bufs.lock().unwrap_or_else(|p| p.into_inner());
        let kept: usize = free.iter().map(Vec::capacity).sum();
        if kept + buf.capacity() <= KEEP_FREE_BYTES {
            free.push(buf);
        }
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, Errno> {
        let (offset, len) = self.clip(offset, len);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(self.max_payload);
            let (r, buf) = self.pool.read(self.take_buf(n as usize), pos).await;
            if let Err(e) = r {
                self.give_buf(buf);
                return Err(self.errno("read", &e));
            }
            if pos == offset && n == len {
                return Ok(buf);
            }
            out.reserve_exact(len as usize - out.len());
            out.extend_from_slice(&buf);
            self.give_buf(buf);
            pos += n;
        }
        Ok(out)
    }

    async fn write(&self, offset: u64, data: Vec<u8>) -> Result<u32, Errno> {
        if offset.saturating_add(data.len() as u64) > self.size {
            return Err(Errno::ENOSPC);
        }
        let total = data.len() as u32;
        if data.len() as u64 <= self.max_payload {
            let (r, buf) = self.pool.write(data, offset).await;
            self.give_buf(buf);
            r.map_err(|e| self.errno("write", &e))?;
            return Ok(total);
        }
        for (i, piece) in data.chunks(self.max_payload as usize).enumerate() {
            let mut buf = self.take_buf(piece.len());
            buf.copy_from_slice(piece);
            let (r, buf) = self.pool.write(buf, offset + i as u64 * self.max_payload).await;
            self.give_buf(buf);
            r.map_err(|e| self.errno("write", &e))?;
        }
        self.give_buf(data);
        Ok(total)
    }

    async fn flush(&self) -> Result<(), Errno> {
        if self.opts.readonly || !self.pool.flags().contains(TransmissionFlags::SEND_FLUSH) {
            return Ok(());
        }
        self.pool.flush().await.map_err(|e| self.errno("flush", &e))
    }

    /// Zeroes `[offset, offset + len)`; `punch` lets the server unmap.
    async fn zero(&self, offset: u64, len: u64, punch: bool) -> Result<(), Errno> {
        let (offset, len) = self.clip(offset, len);
        let end = offset + len;
        let mut pos = offset;
        if self.pool.flags().contains(TransmissionFlags::SEND_WRITE_ZEROES) {
            let flags = if punch {
                CommandFlags::empty()
            } else {
                CommandFlags::NO_HOLE
            };
            while pos < end {
                let n = (end - pos).min(BIG_PIECE);
                self.pool
                    .write_zeroes(pos, n, flags)
                    .await
                    .map_err(|e| self.errno("write zeroes", &e))?;
                pos += n;
            }
        } else {
            let piece = ZERO_BUF.min(self.max_payload);
            while pos < end {
                let n = (end - pos).min(piece);
                let (r, _) = self.pool.write(vec![0; n as usize], pos).await;
                r.map_err(|e| self.errno("write", &e))?;
                pos += n;
            }
        }
        Ok(())
    }

    /// `lseek(SEEK_DATA)` (`data`) or `lseek(SEEK_HOLE)` from `offset`.
    async fn seek(&self, offset: u64, data: bool) -> Result<u64, Errno> {
        if offset >= self.size {
            return Err(Errno::ENXIO);
        }
        let Some(id) = self.allocation else {
            return Ok(if data { offset } else { self.size });
        };
        let hole_bit = u64::from(AllocationFlags::HOLE.bits());
        let mut pos = offset;
        while pos < self.size {
            let n = (self.size - pos).min(BIG_PIECE);
            let st = self
                .pool
                .block_status(pos, n, CommandFlags::empty())
                .await
                .map_err(|e| self.errno("block status", &e))?;
            let extents = st
                .into_iter()
                .find(|s| s.context_id == id)
                .map(|s| s.extents)
                .unwrap_or_default();
            if extents.is_empty() {
                return Err(Errno::EIO);
            }
            for e in extents {
                if (e.flags & hole_bit == 0) == data {
                    return Ok(pos);
                }
                pos = pos.saturating_add(e.length);
                if pos >= self.size {
                    break;
                }
            }
        }
        if data { Err(Errno::ENXIO) } else { Ok(self.size) }
    }
}

impl Filesystem for NbdFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        // Direct I/O submitted asynchronously (io_submit, io_uring) reaches
        // us as concurrent requests instead of one at a time, as libfuse
        // asks by default; a kernel without it keeps the old behaviour.
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        // Readahead and writeback requests in flight at once (the kernel's
        // default is 12): enough for the connections' queues.
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.inner.attr(FILE_INO) {
            Some(attr) if parent == INodeNo::ROOT && name == self.inner.opts.name => {
                reply.entry(&TTL, &attr, Generation(0))
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.inner.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.inner.attr(ino) else {
            return reply.error(Errno::ENOENT);
        };
        // The export's size is fixed; times and modes are not kept.
        match size {
            Some(s) if s != attr.size => reply.error(Errno::EINVAL),
            _ => reply.attr(&TTL, &attr),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.inner.opts.readonly && flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EACCES);
        }
        let flags = if self.inner.opts.kernel_cache {
            FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        };
        reply.opened(FileHandle(0), flags);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.spawn(move |fs| async move {
            match fs.read(offset, u64::from(size)).await {
                Ok(buf) => {
                    reply.data(&buf);
                    fs.give_buf(buf);
                }
                Err(e) => reply.error(e),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if self.inner.opts.readonly {
            return reply.error(Errno::EACCES);
        }
        // Copied into a reused buffer: the kernel's is only lent for this
        // call.
        let mut buf = self.inner.take_buf(data.len());
        buf.copy_from_slice(data);
        self.spawn(move |fs| async move {
            match fs.write(offset, buf).await {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(e),
            }
        });
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        self.spawn(move |fs| async move {
            match fs.flush().await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.spawn(move |fs| async move {
            match fs.flush().await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, OsStr::new(".")),
            (INodeNo::ROOT, FileType::Directory, OsStr::new("..")),
            (FILE_INO, FileType::RegularFile, self.inner.opts.name.as_os_str()),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(self.inner.size.div_ceil(4096), 0, 0, 2, 0, 4096, 255, 4096);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if self.inner.opts.readonly {
            return reply.error(Errno::EACCES);
        }
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let end = offset.saturating_add(length);
        let grows = end > self.inner.size && !keep_size;
        let op = mode & !libc::FALLOC_FL_KEEP_SIZE;
        let punch = match op {
            // Allocation: the export is as allocated as it will be; it
            // cannot grow.
            0 if grows => return reply.error(Errno::EOPNOTSUPP),
            0 => return reply.ok(),
            libc::FALLOC_FL_PUNCH_HOLE if keep_size => true,
            libc::FALLOC_FL_ZERO_RANGE if !grows => false,
            _ => return reply.error(Errno::EOPNOTSUPP),
        };
        self.spawn(move |fs| async move {
            match fs.zero(offset, length, punch).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn lseek(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        let data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => return reply.error(Errno::EINVAL),
        };
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(Errno::ENXIO);
        };
        self.spawn(move |fs| async move {
            match fs.seek(offset, data).await {
                Ok(o) => reply.offset(o as i64),
                Err(e) => reply.error(e),
            }
        });
    }
}
