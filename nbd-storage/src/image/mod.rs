//! Disk images: raw files and qcow2 images (through the `imago` crate),
//! opened as QEMU opens them.
//!
//! [`open`] is the one entry point a tool needs: it probes or checks the
//! format ([`ImageFormat`]), takes QEMU's image locks on every file it
//! opens ([`lock`]), opens the backing chain read-only, optionally puts a
//! temporary overlay on top (snapshot mode, as `qemu-nbd -s`), and returns
//! a [`Storage`] that offers the metadata contexts asked for
//! (`base:allocation` always, `qemu:allocation-depth` with
//! [`ImageOptions::allocation_depth`], `qemu:dirty-bitmap:NAME` for each of
//! [`ImageOptions::bitmaps`]).
//!
//! [`ImageSet`] opens the images of several exports, each file once
//! however many exports name it (read-only and snapshot views of one
//! image, as one node exported under several names in QEMU).
//!
//! [`remote`] reads images through any [`Storage`] instead of a local
//! file (a qcow2 image and its backing chain on a web server), served by
//! the same [`ImageStorage`].
//!
//! # Safety rules
//!
//! * A file is served as raw only when it does not probe as a format: an
//!   image that looks like qcow2, or like another format we do not serve
//!   (VMDK, VDI, VHDX, VPC, QED, LUKS, ...), is refused unless the caller
//!   asks for [`ImageFormat::Raw`] explicitly, so that a guest's writes can
//!   never reach an image's metadata by accident.
//! * qcow2 images are never written unless opened writable: backing files
//!   are always opened read-only, and so is the image in snapshot mode.
//! * imago does not know persistent dirty bitmaps, and opening an image
//!   writable clears the header's autoclear bits, which makes QEMU drop
//!   every bitmap. So a qcow2 image with valid persistent bitmaps is
//!   refused for writable serving: serve it read-only (`-r`), in snapshot
//!   mode (`-s`, the image itself is then only read), or remove the bitmaps
//!   first (`qemu-img bitmap --remove`).

pub mod bitmap;
pub mod header;
pub mod lock;
mod qcow2;
pub mod remote;
mod shared;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nbd_proto::wire::{CONTEXT_BASE_ALLOCATION, CONTEXT_QEMU_ALLOCATION_DEPTH};

use crate::{Capabilities, Extent, FileStorage, StatusExtent, Storage, ZeroFlags, clamp_status_range};
use lock::{LockPerms, lock_image};

pub use qcow2::ImageStorage;
pub use shared::ImageSet;

/// An image format we can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// The bytes of the file are the disk.
    Raw,
    /// QEMU's copy-on-write format, versions 2 and 3.
    Qcow2,
}

impl ImageFormat {
    /// The format's name, as QEMU spells it.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

impl std::str::FromStr for ImageFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            other => Err(format!("unsupported image format {other:?} (supported: raw, qcow2)")),
        }
    }
}

/// How [`open`] opens an image.
#[derive(Debug, Clone, Default)]
pub struct ImageOptions {
    /// The format; `None` probes it as QEMU does (and refuses formats we do
    /// not serve rather than serve them as raw).
    pub format: Option<ImageFormat>,
    /// Open the image read-only: every modifying request is refused.
    pub read_only: bool,
    /// Snapshot mode (`qemu-nbd -s`): the image is opened read-only and
    /// writes go to a temporary qcow2 overlay, which disappears when the
    /// storage is dropped (or the process dies).
    pub snapshot: bool,
    /// Offer `qemu:allocation-depth` (`qemu-nbd -A`).
    pub allocation_depth: bool,
    /// Persistent dirty bitmaps of a qcow2 image to offer as
    /// `qemu:dirty-bitmap:NAME` (`qemu-nbd -B NAME`).
    pub bitmaps: Vec<String>,
    /// Directory for the snapshot overlay; `None` uses `$TMPDIR`, else
    /// `/var/tmp` as QEMU does.
    pub temp_dir: Option<PathBuf>,
}

/// What a file's first bytes say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probed {
    /// A format we serve.
    Format(ImageFormat),
    /// A format QEMU knows and we do not serve (its name).
    Unsupported(&'static str),
}

/// Probes the format of the image that starts with `head` (its first 512
/// bytes or fewer, for a shorter file), as QEMU's probes do: known magic
/// numbers decide, everything else is raw.
pub fn probe(head: &[u8]) -> Probed {
    let starts = |m: &[u8]| head.len() >= m.len() && &head[..m.len()] == m;
    if starts(&bitmap::QCOW2_MAGIC) {
        return Probed::Format(ImageFormat::Qcow2);
    }
    let unsupported: &[(&[u8], &'static str)] = &[
        (b"QFI\x00", "qcow (version 1)"),
        (b"QED\x00", "qed"),
        (b"KDMV", "vmdk"),
        (b"# Disk DescriptorFile", "vmdk"),
        (b"#Disk Descriptor", "vmdk"),
        (b"vhdxfile", "vhdx"),
        (b"conectix", "vpc"),
        (b"LUKS\xba\xbe", "luks"),
        (b"WithoutFreeSpace", "bochs"),
        (b"WithouFreSpacExt", "parallels"),
        (b"cloop", "cloop"),
        (b"\x00\x00\x01\x00QCOW", "dmg"),
    ];
    for (magic, name) in unsupported {
        if starts(magic) {
            return Probed::Unsupported(name);
        }
    }
    // VDI: its signature sits at offset 64.
    if head.len() >= 68 && head[64..68] == [0x7f, 0x10, 0xda, 0xbe] {
        return Probed::Unsupported("vdi");
    }
    // The 512-byte "Bochs Virtual HD Image" and cow/cloop headers are rare;
    // vhd footers at the end are raw to QEMU as well without -f.
    Probed::Format(ImageFormat::Raw)
}

fn open_file(path: &Path, writable: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

fn read_head(file: &File) -> io::Result<Vec<u8>> {
    let mut head = vec![0u8; 512];
    let mut n = 0;
    while n < head.len() {
        match file.read_at(&mut head[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    head.truncate(n);
    // The probe's bytes (and what the kernel read ahead of them) leave the
    // page cache again: in a file of unwritten (fallocated) extents, cached
    // pages are data to `lseek(SEEK_DATA)`, and sparse reads would read
    // them and, through readahead, ever more of the file after them.
    // SAFETY: an advice on a descriptor `file` owns; integers only.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            0,
            PROBE_UNCACHE as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    Ok(head)
}

/// How much of the start of a file leaves the page cache after a probe.
const PROBE_UNCACHE: u64 = 1 << 20;

/// Decides the format of an opened file: the one asked for, else the
/// probed one, refusing what we must not serve as raw.
fn decide_format(file: &File, asked: Option<ImageFormat>, path: &Path) -> io::Result<ImageFormat> {
    let probed = probe(&read_head(file)?);
    match (asked, probed) {
        (Some(f), _) => Ok(f),
        (None, Probed::Format(f)) => Ok(f),
        (None, Probed::Unsupported(name)) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: the image looks like {name}, a format nbd-serve does not serve; \
                 it is not served as raw unless the format is given explicitly (-f raw)",
                path.display()
            ),
        )),
    }
}

/// Opens the image at `path` as `options` say and returns the storage to
/// serve; see the module documentation for what it checks.
pub fn open(path: &Path, options: &ImageOptions) -> io::Result<Arc<dyn Storage>> {
    let writable_open = !options.read_only && !options.snapshot;
    let file = open_file(path, writable_open)?;
    let format = decide_format(&file, options.format, path)?;
    let what = path.display().to_string();
    if options.snapshot || format == ImageFormat::Qcow2 {
        return Ok(Arc::new(qcow2::open_image(path, file, format, options)?));
    }
    // Raw, served in place: our sparse-aware file backend.
    if !options.bitmaps.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what}: a raw image has no persistent dirty bitmaps (-B needs qcow2)"),
        ));
    }
    let perms = if writable_open {
        LockPerms::RAW_WRITABLE
    } else {
        LockPerms::RAW_READ_ONLY
    };
    lock_image(&file, perms, &what)?;
    let inner = FileStorage::from_file(file, options.read_only)?;
    Ok(Arc::new(RawImage {
        inner,
        contexts: contexts(options.allocation_depth, &[]),
    }))
}

/// The metadata contexts an image offers.
fn contexts(depth: bool, bitmaps: &[String]) -> Vec<String> {
    let mut v = vec![CONTEXT_BASE_ALLOCATION.to_string()];
    if depth {
        v.push(CONTEXT_QEMU_ALLOCATION_DEPTH.to_string());
    }
    for b in bitmaps {
        v.push(format!("{}{b}", nbd_proto::wire::CONTEXT_QEMU_DIRTY_BITMAP_PREFIX));
    }
    v
}

/// A raw image: [`FileStorage`] plus the metadata contexts of an image.
/// Every [`Storage`] method is passed through (keep it so when the trait
/// grows).
#[derive(Debug)]
struct RawImage {
    inner: FileStorage,
    contexts: Vec<String>,
}

impl Storage for RawImage {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.inner.write_at(buf, offset, fua)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        self.inner.trim(offset, length, fua)
    }
    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> io::Result<()> {
        self.inner.write_zeroes(offset, length, flags)
    }
    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        self.inner.cache(offset, length)
    }
    fn block_status(&self, offset: u64, length: u64, out: &mut Vec<Extent>) -> io::Result<()> {
        self.inner.block_status(offset, length, out)
    }
    fn extent_at(&self, offset: u64, scratch: &mut Vec<Extent>) -> io::Result<Extent> {
        self.inner.extent_at(offset, scratch)
    }
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        self.inner.try_read_at(buf, offset)
    }
    fn try_write_at(&self, buf: &[u8], offset: u64) -> Option<io::Result<()>> {
        self.inner.try_write_at(buf, offset)
    }
    fn never_blocks(&self) -> bool {
        self.inner.never_blocks()
    }
    fn sparse_reads(&self) -> crate::SparseReads {
        self.inner.sparse_reads()
    }
    fn meta_contexts(&self) -> Vec<String> {
        self.contexts.clone()
    }
    fn context_status(&self, context: &str, offset: u64, length: u64, out: &mut Vec<StatusExtent>) -> io::Result<()> {
        if context == CONTEXT_QEMU_ALLOCATION_DEPTH && self.contexts.iter().any(|c| c == context) {
            // A raw file is its own top layer: every byte is "local"
            // (depth 1), holes included, as QEMU reports it.
            let length = clamp_status_range(self.size(), offset, length)?;
            out.push(StatusExtent { length, status: 1 });
            return Ok(());
        }
        crate::default_context_status(self, context, offset, length, out)
    }
}

/// Creates an anonymous temporary file in `dir` (`O_TMPFILE`; where the
/// filesystem lacks it, a uniquely named file that is unlinked at once),
/// so that nothing is left behind whatever happens to the process.
pub(crate) fn anonymous_temp_file(dir: &Path) -> io::Result<File> {
    match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .mode(0o600)
        .open(dir)
    {
        Ok(f) => return Ok(f),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)) => {}
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
    }
    for n in 0u32..1000 {
        let p = dir.join(format!(".nbd-snapshot-{}-{n}", std::process::id()));
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&p)
        {
            Ok(f) => {
                std::fs::remove_file(&p)?;
                return Ok(f);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", p.display()))),
        }
    }
    Err(io::Error::other(
        "could not create a temporary file for the snapshot overlay",
    ))
}

pub(crate) fn default_temp_dir() -> PathBuf {
    std::env::var_os("TMPDIR")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes() {
        assert_eq!(probe(b"QFI\xfb\0\0\0\x03"), Probed::Format(ImageFormat::Qcow2));
        assert_eq!(probe(b""), Probed::Format(ImageFormat::Raw));
        assert_eq!(probe(&[0u8; 512]), Probed::Format(ImageFormat::Raw));
        assert_eq!(probe(b"KDMV...."), Probed::Unsupported("vmdk"));
        assert_eq!(probe(b"conectix"), Probed::Unsupported("vpc"));
        let mut vdi = vec![0u8; 512];
        vdi[64..68].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
        assert_eq!(probe(&vdi), Probed::Unsupported("vdi"));
        assert_eq!("qcow2".parse::<ImageFormat>(), Ok(ImageFormat::Qcow2));
        assert!("vmdk".parse::<ImageFormat>().is_err());
    }
}
