//! Images served through `imago`: qcow2 (with its backing chain), and any
//! image in snapshot mode (under a temporary qcow2 overlay).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{
    DenyImplicitOpenGate, DynStorage, FormatAccess, FormatCreateBuilder, FormatDriverBuilder, Mapping, ShallowMapping,
    StorageOpenOptions,
};
use nbd_proto::wire::{AllocationFlags, CONTEXT_QEMU_ALLOCATION_DEPTH, CONTEXT_QEMU_DIRTY_BITMAP_PREFIX};

use super::bitmap::{DirtyBitmap, Qcow2Bitmaps};
use super::header::{Qcow2Header, ReadAt};
use super::lock::{LockPerms, lock_image};
use super::{ImageFormat, ImageOptions, Probed, anonymous_temp_file, contexts, default_temp_dir, open_file, probe};
use crate::{
    Capabilities, Extent, StatusExtent, Storage, ZeroFlags, check_range, clamp_status_range, errno_error,
    fast_zero_unsupported, push_extent, write_zero_buffers,
};

/// Most runs one block-status call reports.
const MAX_STATUS_RUNS: usize = 16 * 1024;
/// Longest backing chain followed (a guard against loops).
const MAX_CHAIN: usize = 64;

/// Every layer's storage object is boxed, so that local files and
/// remote sources (any [`Storage`], through [`super::remote`]) share one
/// chain type and one serving code.
pub(super) type Layer = Box<dyn DynStorage>;
pub(super) type Access = FormatAccess<Layer>;

/// An image served through `imago`: a qcow2 image with its backing chain,
/// or (in snapshot mode) a temporary qcow2 overlay on top of the image.
///
/// One instance is shared by every connection. Reads, writes, zeroing
/// and flushes run concurrently under a shared lock; TRIM and
/// deallocating WRITE_ZEROES, which `imago` lets invalidate other
/// requests' mappings, run alone under the exclusive lock.
pub struct ImageStorage {
    access: RwLock<Access>,
    size: u64,
    read_only: bool,
    description: String,
    contexts: Vec<String>,
    /// Loaded bitmaps with their context names, and the image file they
    /// are read from.
    bitmaps: Vec<(String, DirtyBitmap)>,
    bitmap_file: Option<File>,
    raw_layers: RawLayers,
}

impl std::fmt::Debug for ImageStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStorage")
            .field("description", &self.description)
            .field("size", &self.size)
            .field("read_only", &self.read_only)
            .field("contexts", &self.contexts)
            .finish()
    }
}

fn other(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Reads and checks the header of the qcow2 image `file` (at `path`) as
/// QEMU does when it opens one; run first on every qcow2 layer, before
/// the bitmap parser and `imago` look at it. The error names the file and
/// the header field.
pub(super) fn checked_header<R: ReadAt + ?Sized>(what: &str, file: &R) -> io::Result<Qcow2Header> {
    Qcow2Header::read(file).map_err(|e| {
        let kind = match &e {
            super::header::HeaderError::Io(e) => e.kind(),
            super::header::HeaderError::Invalid { .. } => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, format!("{what}: {e}"))
    })
}

/// Opens one layer of a chain: `file` (already opened by the caller,
/// read-write exactly when `writable`) in `format`, locking it as QEMU
/// would, and its backing chain below it (read-only).
/// The raw layers of a chain: the address of the imago storage object
/// their mappings point into, and our own descriptor of the same file, to
/// find its holes (`SEEK_DATA`/`SEEK_HOLE`) as QEMU's raw format does.
type RawLayers = Vec<(usize, File)>;

fn open_layer(
    path: &Path,
    file: File,
    format: ImageFormat,
    writable: bool,
    level: usize,
    raw_layers: &mut RawLayers,
) -> io::Result<Access> {
    let what = path.display().to_string();
    check_depth(&what, level)?;
    if format == ImageFormat::Qcow2 {
        checked_header(&what, &file)?;
    }
    let perms = match (format, writable, level) {
        (ImageFormat::Qcow2, true, _) => LockPerms::QCOW2_WRITABLE,
        (ImageFormat::Qcow2, false, _) => LockPerms::QCOW2_READ_ONLY,
        (ImageFormat::Raw, false, _) => LockPerms::RAW_BACKING,
        (ImageFormat::Raw, true, _) => LockPerms::RAW_WRITABLE,
    };
    lock_image(&file, perms, &what)?;
    let dup = file.try_clone()?;
    let opts = StorageOpenOptions::new().write(writable).filename(path);
    let storage: Layer = Box::new(ImagoFile::from_open_file(file, opts).map_err(|e| other(format!("{what}: {e}")))?);
    match format {
        ImageFormat::Raw => {
            let access = open_raw_layer(storage, writable, &what)?;
            // The storage object lives on the heap, so its address stays
            // put when the access object moves.
            if access.size() > 0
                && let (Mapping::Raw { storage, .. }, _) = access.get_mapping(0, 1).map_err(imago_err)?
            {
                raw_layers.push((layer_key(storage), dup));
            }
            Ok(access)
        }
        ImageFormat::Qcow2 => open_qcow2_layer(storage, writable, &what, |name, recorded| {
            let bpath = resolve_backing(path, name);
            let bfile = open_file(&bpath, false)?;
            let bwhat = bpath.display().to_string();
            let bformat = backing_format(&what, &bwhat, recorded, || super::read_head(&bfile))?;
            open_layer(&bpath, bfile, bformat, false, level + 1, raw_layers)
        }),
    }
}

/// Refuses a chain deeper than [`MAX_CHAIN`] (a loop of backing names).
pub(super) fn check_depth(what: &str, level: usize) -> io::Result<()> {
    if level > MAX_CHAIN {
        return Err(other(format!(
            "{what}: backing chain longer than {MAX_CHAIN} images (a loop?)"
        )));
    }
    Ok(())
}

/// The key under which a raw layer's storage object is known in
/// [`RawLayers`]: the address of the object itself (on the heap).
fn layer_key(storage: &Layer) -> usize {
    let object: &dyn DynStorage = storage.as_ref();
    object as *const dyn DynStorage as *const () as usize
}

/// Opens `storage` (the layer `what`) as a raw image.
pub(super) fn open_raw_layer(storage: Layer, writable: bool, what: &str) -> io::Result<Access> {
    let raw = Raw::open_image(storage, writable).map_err(|e| other(format!("{what}: {e}")))?;
    Ok(FormatAccess::new(raw))
}

/// Opens `storage` (the layer `what`, whose header was checked) as a
/// qcow2 image, with the backing layer `open_backing` opens for the name
/// the header records (and the backing format recorded there, if any)
/// below it. Wherever the layers come from, this is the one place that
/// opens a qcow2 driver.
pub(super) fn open_qcow2_layer(
    storage: Layer,
    writable: bool,
    what: &str,
    open_backing: impl FnOnce(&str, Option<&str>) -> io::Result<Access>,
) -> io::Result<Access> {
    let mut q = Qcow2::<Layer>::open_image(storage, writable)
        .map_err(|e| other(format!("{what}: not a usable qcow2 image: {e}")))?;
    if q.requires_external_data_file() {
        return Err(other(format!(
            "{what}: qcow2 images with an external data file are not supported"
        )));
    }
    q.set_data_file(None);
    let backing = match q.implicit_backing_file() {
        None => None,
        Some(name) => {
            let name = name.clone();
            let recorded = q.implicit_backing_format().cloned();
            Some(open_backing(&name, recorded.as_deref())?)
        }
    };
    q.set_backing(backing);
    // Everything is set explicitly: nothing may be opened behind our back
    // (unlocked, or from somewhere else than the chain's source).
    q.open_implicit_dependencies_gated(DenyImplicitOpenGate::default())?;
    Ok(FormatAccess::new(q))
}

/// The format of the backing file `bwhat` of `what`: the one its header
/// records, else probed from the backing file's first bytes (`head`), as
/// QEMU does (a backing file is only ever read).
pub(super) fn backing_format(
    what: &str,
    bwhat: &str,
    recorded: Option<&str>,
    head: impl FnOnce() -> io::Result<Vec<u8>>,
) -> io::Result<ImageFormat> {
    match recorded {
        Some("qcow2") => Ok(ImageFormat::Qcow2),
        Some("raw") | Some("file") => Ok(ImageFormat::Raw),
        Some(f) => Err(other(format!(
            "{what}: backing file {bwhat} has format {f:?}, which is not supported"
        ))),
        None => match probe(&head()?) {
            Probed::Format(f) => Ok(f),
            Probed::Unsupported(n) => Err(other(format!(
                "{what}: backing file {bwhat} looks like {n}, which is not supported"
            ))),
        },
    }
}

/// A backing file name from an image header, resolved as QEMU does:
/// absolute names as they are, relative ones against the image's directory.
fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    image.parent().unwrap_or(Path::new("")).join(p)
}

/// Opens `file` (at `path`, already probed as `format`) as `options` say.
pub(super) fn open_image(
    path: &Path,
    file: File,
    format: ImageFormat,
    options: &ImageOptions,
) -> io::Result<ImageStorage> {
    let what = path.display().to_string();
    let writable_open = !options.read_only && !options.snapshot;
    // Persistent bitmaps, read before anything else touches the image.
    let mut bitmaps = Vec::new();
    let mut bitmap_file = None;
    if format == ImageFormat::Qcow2 {
        // The header check comes first (open_layer repeats it, as it does
        // for every layer of the chain).
        let header = checked_header(&what, &file)?;
        let parsed = Qcow2Bitmaps::from_header(&file, &header).map_err(|e| other(format!("{what}: {e}")))?;
        if writable_open && !parsed.bitmaps.is_empty() {
            let names: Vec<&str> = parsed.bitmaps.iter().map(|b| b.name.as_str()).collect();
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{what}: the image has persistent dirty bitmaps ({}), which serving it writable would \
                     invalidate; serve it read-only (-r) or in snapshot mode (-s), or remove the bitmaps \
                     (qemu-img bitmap --remove)",
                    names.join(", ")
                ),
            ));
        }
        for name in &options.bitmaps {
            let info = parsed.get(name).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{what}: no persistent bitmap named {name:?}"),
                )
            })?;
            let loaded = parsed.load(&file, info).map_err(|e| other(format!("{what}: {e}")))?;
            bitmaps.push((format!("{CONTEXT_QEMU_DIRTY_BITMAP_PREFIX}{name}"), loaded));
        }
        if !bitmaps.is_empty() {
            bitmap_file = Some(file.try_clone()?);
        }
    } else if !options.bitmaps.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what}: a raw image has no persistent dirty bitmaps (-B needs qcow2)"),
        ));
    }
    let mut raw_layers = RawLayers::new();
    let image = open_layer(path, file, format, writable_open, 0, &mut raw_layers)?;
    let mut storage = serve_chain(image, &what, format, options)?;
    storage.bitmaps = bitmaps;
    storage.bitmap_file = bitmap_file;
    storage.raw_layers = raw_layers;
    Ok(storage)
}

/// Serves an opened chain (`image`, the layer `what` in `format`) as
/// `options` say: under a temporary qcow2 overlay in snapshot mode, with
/// the metadata contexts asked for. Local and remote chains end here.
pub(super) fn serve_chain(
    image: Access,
    what: &str,
    format: ImageFormat,
    options: &ImageOptions,
) -> io::Result<ImageStorage> {
    let size = image.size();
    let (access, description) = if options.snapshot {
        let dir = options.temp_dir.clone().unwrap_or_else(default_temp_dir);
        let tmp = anonymous_temp_file(&dir)?;
        let storage: Layer = Box::new(ImagoFile::from_open_file(tmp, StorageOpenOptions::new().write(true))?);
        let overlay = Qcow2::<Layer>::create_builder(storage)
            .size(size)
            .create_open(DenyImplicitOpenGate::default(), |s| {
                Ok(Qcow2::<Layer>::builder(s).write(true).backing(Some(image)))
            })
            .map_err(|e| other(format!("creating the snapshot overlay in {}: {e}", dir.display())))?;
        (
            FormatAccess::new(overlay),
            format!("{what} ({}, snapshot)", format.name()),
        )
    } else {
        (image, format!("{what} ({})", format.name()))
    };
    Ok(ImageStorage {
        access: RwLock::new(access),
        size,
        read_only: options.read_only,
        description,
        contexts: contexts(options.allocation_depth, &options.bitmaps),
        bitmaps: Vec::new(),
        bitmap_file: None,
        raw_layers: RawLayers::new(),
    })
}

/// Reports `offset..offset + length` of a raw file as data and holes, by
/// `lseek(SEEK_DATA/SEEK_HOLE)`; filesystems that cannot tell report data.
fn file_extents(file: &File, offset: u64, length: u64, mut push: impl FnMut(Extent)) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let seek = |at: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
        let at = libc::off_t::try_from(at).map_err(|_| errno_error(libc::EINVAL))?;
        // SAFETY: lseek only takes integers; the descriptor is owned by
        // `file`, which outlives the call. All I/O on it is positional.
        let r = unsafe { libc::lseek(file.as_raw_fd(), at, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        }
    };
    let end = offset + length;
    let mut pos = offset;
    let mut steps = 0;
    while pos < end {
        steps += 1;
        let data = match seek(pos, libc::SEEK_DATA) {
            Ok(d) => d.unwrap_or(u64::MAX),
            // No hole support here: all data.
            Err(_) => pos,
        };
        if data > pos {
            let n = data.min(end) - pos;
            push(Extent::hole(n));
            pos += n;
            continue;
        }
        let hole = match seek(pos, libc::SEEK_HOLE) {
            Ok(Some(h)) if h > pos && steps < 1024 => h,
            _ => end,
        };
        let n = hole.min(end) - pos;
        push(Extent::data(n));
        pos += n;
    }
    Ok(())
}

fn imago_err(e: io::Error) -> io::Error {
    if e.raw_os_error().is_some() {
        return e;
    }
    // imago's own errors carry no errno: keep the message, report EIO.
    io::Error::other(e.to_string())
}

impl ImageStorage {
    /// What is served, e.g. `disk.qcow2 (qcow2, snapshot)`.
    pub fn description(&self) -> &str {
        &self.description
    }

    fn shared(&self) -> RwLockReadGuard<'_, Access> {
        self.access.read().unwrap_or_else(|p| p.into_inner())
    }

    fn exclusive(&self) -> RwLockWriteGuard<'_, Access> {
        self.access.write().unwrap_or_else(|p| p.into_inner())
    }

    fn check_writable(&self, offset: u64, length: u64) -> io::Result<()> {
        if self.read_only {
            return Err(errno_error(libc::EPERM));
        }
        check_range(self.size, offset, length)
    }

    fn sync_all(&self, access: &Access) -> io::Result<()> {
        access.flush().map_err(imago_err)?;
        access.sync().map_err(imago_err)
    }

    /// `qemu:allocation-depth`: 0 unallocated in the whole chain, 1 the top
    /// image, 2 and up the backing layers.
    fn depth_status(&self, offset: u64, length: u64, out: &mut Vec<StatusExtent>) -> io::Result<()> {
        let length = clamp_status_range(self.size, offset, length)?;
        let top = self.shared();
        let first = out.len();
        let end = offset + length;
        let mut off = offset;
        while off < end && out.len() - first < MAX_STATUS_RUNS {
            let mut layer: &Access = &top;
            let mut depth = 1u32;
            let mut lo = off;
            let mut max = end - off;
            let (status, len) = loop {
                let (m, l) = layer.get_shallow_mapping(lo, max).map_err(imago_err)?;
                let l = l.min(max);
                match m {
                    ShallowMapping::Indirect {
                        layer: below, offset, ..
                    } => {
                        layer = below;
                        lo = offset;
                        max = l;
                        depth += 1;
                    }
                    ShallowMapping::Zero { explicit: false, .. } => break (0, l),
                    ShallowMapping::Eof { .. } if depth == 1 => break (0, 0),
                    // Past the end of a backing file: QEMU counts the
                    // zeroes read there as that layer's.
                    ShallowMapping::Eof { .. } => break (depth, max),
                    _ => break (depth, l),
                }
            };
            if len == 0 {
                break;
            }
            let n = out.len();
            match out.last_mut() {
                Some(last) if n > first && last.status == status => last.length += len,
                _ => out.push(StatusExtent { length: len, status }),
            }
            off += len;
        }
        if out.len() == first {
            return Err(io::Error::other("no mapping information at this offset"));
        }
        Ok(())
    }
}

impl Storage for ImageStorage {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        let rw = !self.read_only;
        Capabilities {
            read_only: self.read_only,
            can_flush: true,
            can_fua: rw,
            can_trim: rw,
            can_zero: rw,
            can_fast_zero: false,
            can_cache: false,
            // One image instance behind every connection: writes are
            // visible to all at once and a flush covers everything.
            can_multi_conn: true,
            rotational: false,
            block_size: None,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.shared().read(buf, offset).map_err(imago_err)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.check_writable(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let access = self.shared();
        access.write(buf, offset).map_err(imago_err)?;
        if fua {
            self.sync_all(&access)?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.sync_all(&self.shared())
    }

    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        self.check_writable(offset, length)?;
        if length == 0 {
            return Ok(());
        }
        let mut access = self.exclusive();
        match access.discard_to_any(offset, length) {
            Ok(()) => {}
            // qcow2 v2 has no zero clusters: drop the clusters instead
            // (trimmed contents are unspecified; a backing file may show).
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                access.discard_to_backing(offset, length).map_err(imago_err)?
            }
            Err(e) => return Err(imago_err(e)),
        }
        if fua {
            self.sync_all(&access)?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> io::Result<()> {
        self.check_writable(offset, length)?;
        if flags.fast {
            return Err(fast_zero_unsupported());
        }
        if length == 0 {
            return Ok(());
        }
        let r = if flags.no_hole {
            self.shared().write_zeroes(offset, length)
        } else {
            self.exclusive().discard_to_zero(offset, length)
        };
        match r {
            Ok(()) => {}
            // qcow2 v2 has no zero clusters: write the zeroes out.
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                let access = self.shared();
                write_zero_buffers(offset, length, |buf, off| access.write(buf, off).map_err(imago_err))?;
            }
            Err(e) => return Err(imago_err(e)),
        }
        if flags.fua {
            self.sync_all(&self.shared())?;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, length: u64, out: &mut Vec<Extent>) -> io::Result<()> {
        let length = clamp_status_range(self.size, offset, length)?;
        let access = self.shared();
        let first = out.len();
        let end = offset + length;
        let mut off = offset;
        while off < end && out.len() - first < MAX_STATUS_RUNS {
            let (m, l) = access.get_mapping(off, end - off).map_err(imago_err)?;
            let l = l.min(end - off);
            if l == 0 {
                break;
            }
            let hole = AllocationFlags::HOLE | AllocationFlags::ZERO;
            match m {
                Mapping::Eof { .. } => break,
                Mapping::Zero { .. } => push_extent(out, first, Extent { length: l, flags: hole }),
                Mapping::Raw { storage, offset, .. } => {
                    let key = layer_key(storage);
                    match self.raw_layers.iter().find(|(k, _)| *k == key) {
                        // A raw layer: its file's holes are holes.
                        Some((_, file)) => file_extents(file, offset, l, |e| push_extent(out, first, e))?,
                        None => push_extent(out, first, Extent::data(l)),
                    }
                }
                _ => push_extent(out, first, Extent::data(l)),
            }
            off += l;
        }
        if out.len() == first {
            return Err(io::Error::other("no mapping information at this offset"));
        }
        Ok(())
    }

    fn meta_contexts(&self) -> Vec<String> {
        self.contexts.clone()
    }

    fn context_status(&self, context: &str, offset: u64, length: u64, out: &mut Vec<StatusExtent>) -> io::Result<()> {
        if context == CONTEXT_QEMU_ALLOCATION_DEPTH && self.contexts.iter().any(|c| c == context) {
            return self.depth_status(offset, length, out);
        }
        if let Some((_, bitmap)) = self.bitmaps.iter().find(|(name, _)| name == context) {
            let file = self.bitmap_file.as_ref().ok_or_else(|| errno_error(libc::EIO))?;
            let length = clamp_status_range(self.size, offset, length)?;
            let mut runs = Vec::new();
            bitmap.status(file, offset, length, MAX_STATUS_RUNS, &mut runs)?;
            out.extend(runs.into_iter().map(|(length, dirty)| StatusExtent {
                length,
                status: dirty as u32,
            }));
            return Ok(());
        }
        crate::default_context_status(self, context, offset, length, out)
    }
}

impl Drop for ImageStorage {
    fn drop(&mut self) {
        // imago flushes its metadata caches when the image is dropped;
        // make that durable too.
        if !self.read_only {
            let access = self.access.get_mut().unwrap_or_else(|p| p.into_inner());
            let _ = access.flush();
            let _ = access.sync();
        }
    }
}
