//! The file and block-device backend (Linux).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::Path;

use crate::{
    Capabilities, Extent, Storage, ZeroFlags, check_range, clamp_status_range, errno_error, fast_zero_unsupported,
    push_extent, write_zero_buffers,
};

/// Most `lseek(SEEK_DATA)` steps one `block_status` call makes.
const MAX_STATUS_STEPS: usize = 1024;

/// An export backed by a regular file or a block device.
///
/// All I/O is positional (`pread`/`pwrite`) on one file descriptor shared by
/// every connection, so the export supports `can_multi_conn`: every
/// connection goes through the same page cache, and a flush on any of them
/// (`fdatasync`) makes all completed writes durable.
///
/// * **Size** is taken once, when the file is opened: from the metadata of
///   a regular file, by seeking to the end of a block device.
/// * **FLUSH and FUA** use `fdatasync`.
/// * **BLOCK_STATUS** of a regular file walks `lseek(SEEK_DATA/SEEK_HOLE)`;
///   filesystems without hole support report all data, which the call then
///   reports too. Block devices are always reported as data.
/// * **TRIM** punches a hole (`fallocate(PUNCH_HOLE | KEEP_SIZE)`); where the
///   filesystem or device cannot, trimming is a successful no-op, as TRIM is
///   advisory.
/// * **WRITE_ZEROES** on a regular file punches a hole (unless `no_hole`),
///   else uses `fallocate(ZERO_RANGE)`, else (with `no_hole`, for
///   filesystems such as tmpfs that lack `ZERO_RANGE`) reserves the range,
///   punches it and reserves it again. On a block device it uses the
///   kernel's fast, unmapping zero-out (`PUNCH_HOLE`, unless `no_hole`) or
///   its possibly slow, allocating one (`ZERO_RANGE`, not with `fast`).
///   When nothing fast works a `fast` request fails with `EOPNOTSUPP`, and
///   any other is served by writing zero buffers of 1 MiB.
/// * **CACHE** is `posix_fadvise(POSIX_FADV_WILLNEED)`.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    size: u64,
    read_only: bool,
    block_device: bool,
    rotational: bool,
    /// Sparse reads find holes in the bytes read ([`SparseReads::Contents`]):
    /// on tmpfs and block devices.
    ///
    /// [`SparseReads::Contents`]: crate::SparseReads::Contents
    holes_by_contents: bool,
}

impl FileStorage {
    /// Opens a regular file or a block device, read-write or (with
    /// `read_only`) with `O_RDONLY`. Other kinds of files are refused with
    /// `EINVAL` (`EISDIR` for directories).
    pub fn open<P: AsRef<Path>>(path: P, read_only: bool) -> io::Result<FileStorage> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        FileStorage::from_file(file, read_only)
    }

    /// Creates (or truncates) a regular file at `path`, sets its length to
    /// `size` without allocating anything (a sparse file of zeroes) and opens
    /// it read-write.
    pub fn create<P: AsRef<Path>>(path: P, size: u64) -> io::Result<FileStorage> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len(size)?;
        FileStorage::from_file(file, false)
    }

    /// Serves an already open regular file or block device. With
    /// `read_only` every modification is refused with `EPERM`, whatever
    /// the file's access mode; without it the file must be open for writing.
    pub fn from_file(file: File, read_only: bool) -> io::Result<FileStorage> {
        let meta = file.metadata()?;
        let kind = meta.file_type();
        let (block_device, size, device) = if kind.is_file() {
            (false, meta.len(), meta.dev())
        } else if kind.is_block_device() {
            (true, (&file).seek(SeekFrom::End(0))?, meta.rdev())
        } else if kind.is_dir() {
            return Err(errno_error(libc::EISDIR));
        } else {
            return Err(errno_error(libc::EINVAL));
        };
        let rotational = is_rotational(device);
        let holes_by_contents = block_device || !seek_data_is_cheap(&file);
        Ok(FileStorage {
            file,
            size,
            read_only,
            block_device,
            rotational,
            holes_by_contents,
        })
    }

    /// Whether the export is a block device (as opposed to a regular file).
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn check_writable(&self, offset: u64, length: u64) -> io::Result<()> {
        if self.read_only {
            return Err(errno_error(libc::EPERM));
        }
        check_range(self.size, offset, length)
    }

    /// `fallocate(2)` on the file, retried on `EINTR`.
    fn fallocate(&self, mode: libc::c_int, offset: u64, length: u64) -> io::Result<()> {
        let (offset, length) = (to_off(offset)?, to_off(length)?);
        loop {
            // SAFETY: fallocate only takes integers; the descriptor is owned
            // by `self.file`, which outlives the call.
            let ret = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, length) };
            if ret == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// `lseek(2)` with `whence` (`SEEK_DATA` or `SEEK_HOLE`).
    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<u64> {
        let offset = to_off(offset)?;
        // SAFETY: lseek only takes integers; the descriptor is owned by
        // `self.file`, which outlives the call. Moving the shared file
        // position is harmless: all I/O is positional.
        let ret = unsafe { libc::lseek(self.file.as_raw_fd(), offset, whence) };
        u64::try_from(ret).map_err(|_| io::Error::last_os_error())
    }

    /// Whether `fallocate` refused because the filesystem or device cannot
    /// do this (or, for block devices, the range is not sector-aligned).
    fn unsupported(&self, err: &io::Error) -> bool {
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::ENOSYS) => true,
            Some(libc::EINVAL) => self.block_device,
            _ => false,
        }
    }

    /// Runs `fallocate`; `Ok(false)` if unsupported.
    fn try_fallocate(&self, mode: libc::c_int, offset: u64, length: u64) -> io::Result<bool> {
        match self.fallocate(mode, offset, length) {
            Ok(()) => Ok(true),
            Err(err) if self.unsupported(&err) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Zeroes the range without writing buffers if the file system or device
    /// can; `Ok(false)` (with the data unchanged) if it cannot.
    fn fast_zero(&self, offset: u64, length: u64, flags: ZeroFlags) -> io::Result<bool> {
        const PUNCH: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        const ZERO: libc::c_int = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        const RESERVE: libc::c_int = libc::FALLOC_FL_KEEP_SIZE;
        if !flags.no_hole && self.try_fallocate(PUNCH, offset, length)? {
            return Ok(true);
        }
        if self.block_device {
            // ZERO_RANGE on a block device falls back to writing zeroes in
            // the kernel, so it does not count as fast.
            return if flags.fast {
                Ok(false)
            } else {
                self.try_fallocate(ZERO, offset, length)
            };
        }
        if self.try_fallocate(ZERO, offset, length)? {
            return Ok(true);
        }
        if !flags.no_hole {
            return Ok(false);
        }
        // No ZERO_RANGE (tmpfs, for one): reserve the space first, which
        // changes no data and fails early if impossible, then punch and
        // reserve again.
        if !self.try_fallocate(RESERVE, offset, length)? || !self.try_fallocate(PUNCH, offset, length)? {
            return Ok(false);
        }
        if !self.try_fallocate(RESERVE, offset, length)? {
            // Cannot happen on a sane filesystem; the data is zero already,
            // so finish the job whatever `fast` says.
            self.write_zero_buffers(offset, length)?;
        }
        Ok(true)
    }

    fn write_zero_buffers(&self, offset: u64, length: u64) -> io::Result<()> {
        write_zero_buffers(offset, length, |buf, off| {
            self.file.write_all_at(buf, off).map_err(with_errno)
        })
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data().map_err(with_errno)
    }
}

impl Storage for FileStorage {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        let writable = !self.read_only;
        Capabilities {
            read_only: self.read_only,
            can_flush: writable,
            can_fua: writable,
            can_trim: writable,
            can_zero: writable,
            can_fast_zero: writable,
            can_cache: true,
            can_multi_conn: true,
            rotational: self.rotational,
            block_size: None,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        self.file.read_exact_at(buf, offset).map_err(with_errno)
    }

    /// Where `lseek(SEEK_DATA)` is cheap, a read that lies in a hole or in
    /// unwritten (fallocated, never written or read) extents is sent as a
    /// hole without being read, as qemu-nbd does (reading it would also
    /// fill the page cache with zeroes); any other read is read whole and
    /// its holes found in its bytes
    /// ([`SparseReads::ContentsUnlessHole`](crate::SparseReads::ContentsUnlessHole)):
    /// walking a map fragmented by cached pages, which `lseek` calls data,
    /// would cost a system call per page. On tmpfs `lseek(SEEK_DATA)` walks
    /// the page cache from the offset to the next data, which in a
    /// fallocated file is its end, whatever the read's size: there (and on
    /// block devices, which have no holes to ask about) holes come from the
    /// bytes read alone.
    fn sparse_reads(&self) -> crate::SparseReads {
        if self.holes_by_contents {
            crate::SparseReads::Contents
        } else {
            crate::SparseReads::ContentsUnlessHole
        }
    }

    /// `preadv2(RWF_NOWAIT)`: only what the page cache holds.
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        if let Err(e) = check_range(self.size, offset, buf.len() as u64) {
            return Some(Err(e));
        }
        if buf.is_empty() {
            return Some(Ok(()));
        }
        let off = to_off(offset).ok()?;
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: `iov` describes `buf`, which is valid for writes of its
        // length for the duration of the call; the descriptor is owned by
        // `self.file`.
        let n = unsafe { libc::preadv2(self.file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
        // A short read (part of the range cached) or EAGAIN: let the pool
        // read it all. Any other error is the pool's to report too.
        (n >= 0 && n as usize == buf.len()).then_some(Ok(()))
    }

    /// `pwritev2(RWF_NOWAIT)`: only when the filesystem can take the write
    /// into the page cache without waiting.
    fn try_write_at(&self, buf: &[u8], offset: u64) -> Option<io::Result<()>> {
        if let Err(e) = self.check_writable(offset, buf.len() as u64) {
            return Some(Err(e));
        }
        if buf.is_empty() || self.block_device {
            return None;
        }
        let off = to_off(offset).ok()?;
        let iov = libc::iovec {
            iov_base: buf.as_ptr().cast_mut().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: `iov` describes `buf`, valid for reads of its length for
        // the duration of the call (pwritev2 does not write through it).
        let n = unsafe { libc::pwritev2(self.file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
        if n < 0 {
            return None;
        }
        // Partly written: the pool writes it all again (the same bytes at
        // the same place).
        (n as usize == buf.len()).then_some(Ok(()))
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.check_writable(offset, buf.len() as u64)?;
        self.file.write_all_at(buf, offset).map_err(with_errno)?;
        if fua { self.sync() } else { Ok(()) }
    }

    fn flush(&self) -> io::Result<()> {
        self.sync()
    }

    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        self.check_writable(offset, length)?;
        if length == 0 {
            return Ok(());
        }
        // Where punching is unsupported, trimming is a no-op.
        self.try_fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, length)?;
        if fua { self.sync() } else { Ok(()) }
    }

    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> io::Result<()> {
        self.check_writable(offset, length)?;
        if length == 0 {
            return Ok(());
        }
        if !self.fast_zero(offset, length, flags)? {
            if flags.fast {
                return Err(fast_zero_unsupported());
            }
            self.write_zero_buffers(offset, length)?;
        }
        if flags.fua { self.sync() } else { Ok(()) }
    }

    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        check_range(self.size, offset, length)?;
        if length == 0 {
            return Ok(());
        }
        let (offset, length) = (to_off(offset)?, to_off(length)?);
        // SAFETY: posix_fadvise only takes integers; the descriptor is owned
        // by `self.file`, which outlives the call.
        let ret = unsafe { libc::posix_fadvise(self.file.as_raw_fd(), offset, length, libc::POSIX_FADV_WILLNEED) };
        if ret == 0 { Ok(()) } else { Err(errno_error(ret)) }
    }

    /// One SEEK_DATA and at most one SEEK_HOLE: the whole extent at `offset`.
    fn extent_at(&self, offset: u64, _scratch: &mut Vec<Extent>) -> io::Result<Extent> {
        let length = clamp_status_range(self.size, offset, self.size - offset.min(self.size))?;
        if self.block_device {
            return Ok(Extent::data(length));
        }
        let end = offset + length;
        Ok(match self.seek(offset, libc::SEEK_DATA) {
            Ok(data) if data > offset => Extent::hole(data.min(end) - offset),
            Ok(_) => match self.seek(offset, libc::SEEK_HOLE) {
                Ok(hole) if hole > offset => Extent::data(hole.min(end) - offset),
                _ => Extent::data(length),
            },
            Err(err) if err.raw_os_error() == Some(libc::ENXIO) => Extent::hole(length),
            Err(_) => Extent::data(length),
        })
    }

    fn block_status(&self, offset: u64, length: u64, out: &mut Vec<Extent>) -> io::Result<()> {
        let length = clamp_status_range(self.size, offset, length)?;
        let end = offset + length;
        if self.block_device {
            out.push(Extent::data(length));
            return Ok(());
        }
        let first = out.len();
        let mut pos = offset;
        let mut steps = 0;
        while pos < end && steps < MAX_STATUS_STEPS {
            steps += 1;
            match self.seek(pos, libc::SEEK_DATA) {
                Ok(data) if data > pos => {
                    let hole_end = data.min(end);
                    push_extent(out, first, Extent::hole(hole_end - pos));
                    pos = hole_end;
                }
                Ok(_) => {
                    // Data at `pos`; it runs to the next hole (a race with
                    // a concurrent punch may leave none: call it data).
                    let data_end = match self.seek(pos, libc::SEEK_HOLE) {
                        Ok(hole) if hole > pos => hole.min(end),
                        _ => end,
                    };
                    push_extent(out, first, Extent::data(data_end - pos));
                    pos = data_end;
                }
                // No data after `pos`: a hole up to the end of the file.
                Err(err) if err.raw_os_error() == Some(libc::ENXIO) => {
                    push_extent(out, first, Extent::hole(end - pos));
                    pos = end;
                }
                // Anything else (no SEEK_DATA support, I/O error): calling
                // everything data is always correct.
                Err(_) => {
                    push_extent(out, first, Extent::data(end - pos));
                    pos = end;
                }
            }
        }
        Ok(())
    }
}

/// Converts an offset or length to `off_t`; `EINVAL` if it does not fit.
/// Whether `lseek(SEEK_DATA)` on `file` costs in proportion to the extents
/// it passes rather than to the bytes (`false` on tmpfs, whose holes are
/// found page by page, and when the file system cannot be told).
fn seek_data_is_cheap(file: &File) -> bool {
    // SAFETY: `statfs` is plain old data, valid when zeroed; the
    // descriptor is owned by `file`, and `fstatfs` writes only `st`.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    st.f_type != libc::TMPFS_MAGIC
}

fn to_off(value: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(value).map_err(|_| errno_error(libc::EINVAL))
}

/// Gives errors without an OS error number (short reads past the end of a
/// file that shrank, zero-length writes) the number `EIO`.
fn with_errno(err: io::Error) -> io::Error {
    if err.raw_os_error().is_some() {
        err
    } else {
        errno_error(libc::EIO)
    }
}

/// Whether sysfs says the block device `device` (or, for a partition, its
/// disk) is rotational; `false` if unknown.
fn is_rotational(device: u64) -> bool {
    let base = format!("/sys/dev/block/{}:{}", libc::major(device), libc::minor(device));
    ["queue/rotational", "../queue/rotational"]
        .iter()
        .find_map(|tail| std::fs::read_to_string(format!("{base}/{tail}")).ok())
        .is_some_and(|s| s.trim() == "1")
}
