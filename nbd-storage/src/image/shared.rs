//! Several exports of one image: [`ImageSet`] opens each file once, however
//! many exports name it.
//!
//! Two exports that opened one file twice would take QEMU's image locks
//! against each other (OFD locks conflict between two open file
//! descriptions, even in one process) and, with both writable, each would
//! cache its own view of the image's metadata. So the set opens every
//! distinct file (by device and inode, whatever path names it) once, in the
//! strongest mode any of its exports needs, takes the locks once, and gives
//! each export a view of that one image, as one node exported under several
//! names in QEMU:
//!
//! * a writable export gets the image itself;
//! * a read-only export gets a read-only view of it, which sees the writes
//!   made through a writable export of the same file;
//! * a snapshot export gets a copy-on-write overlay of its own
//!   ([`CowStorage`]) on top of the image: its writes stay in the overlay,
//!   and writes made through a writable export show through where the
//!   overlay has not written.
//!
//! A file named by one export only is opened by [`open`] exactly as alone.
//! Two servers (or a server and QEMU) on one file still exclude each other
//! as QEMU's locks say.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{ImageFormat, ImageOptions, contexts, decide_format, open, open_file};
use crate::cow::CowStorage;
use crate::{Capabilities, Extent, StatusExtent, Storage, ZeroFlags, errno_error};

/// Images to open for several exports, each file once.
///
/// Two exports that opened one file twice would take QEMU's image locks
/// against each other (OFD locks conflict between two open file
/// descriptions, even in one process). So the set opens every distinct
/// file (by device and inode, whatever path names it) once, in the
/// strongest mode any of its exports needs, takes the locks once, and
/// gives each export a view of that one image: a writable export gets the
/// image itself, a read-only one a read-only view that sees the writable
/// one's writes, a snapshot one a copy-on-write overlay of its own
/// ([`CowStorage`](crate::cow::CowStorage)). A file named by one export
/// only is opened exactly as [`open`] opens it.
///
/// ```no_run
/// use nbd_storage::image::{ImageOptions, ImageSet};
///
/// let mut set = ImageSet::new();
/// // nbd-server's "cfgmulti": one file, a copy-on-write export and a
/// // read-only one.
/// set.add("disk.img", ImageOptions { snapshot: true, ..ImageOptions::default() });
/// set.add("disk.img", ImageOptions { read_only: true, ..ImageOptions::default() });
/// let storages = set.open()?;
/// assert_eq!(storages.len(), 2);
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, Default)]
pub struct ImageSet {
    wanted: Vec<(PathBuf, ImageOptions)>,
}

/// What identifies a file whatever path names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileId {
    Inode { dev: u64, ino: u64 },
    BlockDevice { rdev: u64 },
}

fn file_id(path: &Path) -> io::Result<FileId> {
    let meta = std::fs::metadata(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    Ok(if meta.file_type().is_block_device() {
        FileId::BlockDevice { rdev: meta.rdev() }
    } else {
        FileId::Inode {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    })
}

impl ImageSet {
    /// An empty set.
    pub fn new() -> ImageSet {
        ImageSet::default()
    }

    /// Adds an export of the image at `path`, opened as `options` say;
    /// returns its index in what [`ImageSet::open`] returns.
    pub fn add(&mut self, path: impl Into<PathBuf>, options: ImageOptions) -> usize {
        self.wanted.push((path.into(), options));
        self.wanted.len() - 1
    }

    /// Opens every image, each file once, and returns the storage of each
    /// export in the order they were added.
    ///
    /// Exports of one file must agree on its format (the one given, or the
    /// probed one). A snapshot export of a file that other exports also
    /// name offers `base:allocation` only (neither `-A` nor `-B`).
    pub fn open(self) -> io::Result<Vec<Arc<dyn Storage>>> {
        let mut ids = Vec::with_capacity(self.wanted.len());
        for (path, _) in &self.wanted {
            ids.push(file_id(path)?);
        }
        let mut out: Vec<Option<Arc<dyn Storage>>> = vec![None; self.wanted.len()];
        for i in 0..self.wanted.len() {
            if out[i].is_some() {
                continue;
            }
            let group: Vec<usize> = (i..self.wanted.len()).filter(|&j| ids[j] == ids[i]).collect();
            if group.len() == 1 {
                let (path, options) = &self.wanted[i];
                out[i] = Some(open(path, options)?);
                continue;
            }
            for (j, storage) in self.open_group(&group)? {
                out[j] = Some(storage);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Opens one file that several exports (`group`, indices into
    /// `wanted`) name.
    fn open_group(&self, group: &[usize]) -> io::Result<Vec<(usize, Arc<dyn Storage>)>> {
        let (path, _) = &self.wanted[group[0]];
        let what = path.display();
        let format = self.group_format(path, group)?;
        let writer = group.iter().any(|&j| {
            let o = &self.wanted[j].1;
            !o.read_only && !o.snapshot
        });
        let mut bitmaps: Vec<String> = Vec::new();
        for &j in group {
            for b in &self.wanted[j].1.bitmaps {
                if !bitmaps.contains(b) {
                    bitmaps.push(b.clone());
                }
            }
        }
        let base_options = ImageOptions {
            format: Some(format),
            read_only: !writer,
            snapshot: false,
            allocation_depth: group.iter().any(|&j| self.wanted[j].1.allocation_depth),
            bitmaps,
            temp_dir: None,
        };
        let base = open(path, &base_options)?;
        let mut views = Vec::with_capacity(group.len());
        for &j in group {
            let options = &self.wanted[j].1;
            let storage: Arc<dyn Storage> = if options.snapshot {
                if options.allocation_depth || !options.bitmaps.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "{what}: a snapshot export of an image that other exports also serve offers \
                             base:allocation only (no qemu:allocation-depth, no dirty bitmaps)"
                        ),
                    ));
                }
                let dir = options.temp_dir.clone();
                Arc::new(CowStorage::new(base.clone(), dir.as_deref())?)
            } else {
                Arc::new(ExportView {
                    inner: base.clone(),
                    read_only: options.read_only,
                    contexts: contexts(options.allocation_depth, &options.bitmaps),
                })
            };
            views.push((j, storage));
        }
        Ok(views)
    }

    /// The one format of a file that several exports name: the one each
    /// gives, else the probed one (probed once, and only if needed).
    fn group_format(&self, path: &Path, group: &[usize]) -> io::Result<ImageFormat> {
        let mut probed = None;
        let mut format: Option<ImageFormat> = None;
        for &j in group {
            let f = match self.wanted[j].1.format {
                Some(f) => f,
                None => match probed {
                    Some(f) => f,
                    None => *probed.insert(decide_format(&open_file(path, false)?, None, path)?),
                },
            };
            match format {
                Some(g) if g != f => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "{}: exports of one image must agree on its format ({} and {})",
                            path.display(),
                            g.name(),
                            f.name()
                        ),
                    ));
                }
                _ => format = Some(f),
            }
        }
        format.ok_or_else(|| errno_error(libc::EINVAL))
    }
}

/// One export's view of an image that several exports share: read-only
/// if the export is, offering the metadata contexts the export asked for.
/// Every [`Storage`] method is passed through (keep it so when the trait
/// grows).
struct ExportView {
    inner: Arc<dyn Storage>,
    read_only: bool,
    contexts: Vec<String>,
}

impl std::fmt::Debug for ExportView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportView")
            .field("read_only", &self.read_only)
            .field("contexts", &self.contexts)
            .finish_non_exhaustive()
    }
}

impl ExportView {
    fn writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(errno_error(libc::EPERM))
        } else {
            Ok(())
        }
    }
}

impl Storage for ExportView {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn capabilities(&self) -> Capabilities {
        let mut caps = self.inner.capabilities();
        if self.read_only {
            caps.read_only = true;
            caps.can_fua = false;
            caps.can_trim = false;
            caps.can_zero = false;
            caps.can_fast_zero = false;
        }
        caps
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.writable()?;
        self.inner.write_at(buf, offset, fua)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        self.writable()?;
        self.inner.trim(offset, length, fua)
    }
    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> io::Result<()> {
        self.writable()?;
        self.inner.write_zeroes(offset, length, flags)
    }
    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        self.inner.cache(offset, length)
    }
    fn block_status(&self, offset: u64, length: u64, out: &mut Vec<Extent>) -> io::Result<()> {
        self.inner.block_status(offset, length, out)
    }
    fn meta_contexts(&self) -> Vec<String> {
        self.contexts.clone()
    }
    fn context_status(&self, context: &str, offset: u64, length: u64, out: &mut Vec<StatusExtent>) -> io::Result<()> {
        if !self.contexts.iter().any(|c| c == context) {
            return Err(errno_error(libc::EINVAL));
        }
        self.inner.context_status(context, offset, length, out)
    }
    fn extent_at(&self, offset: u64, scratch: &mut Vec<Extent>) -> io::Result<Extent> {
        self.inner.extent_at(offset, scratch)
    }
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        self.inner.try_read_at(buf, offset)
    }
    fn try_write_at(&self, buf: &[u8], offset: u64) -> Option<io::Result<()>> {
        if self.read_only {
            return Some(Err(errno_error(libc::EPERM)));
        }
        self.inner.try_write_at(buf, offset)
    }
    fn sparse_reads(&self) -> crate::SparseReads {
        self.inner.sparse_reads()
    }
    fn never_blocks(&self) -> bool {
        self.inner.never_blocks()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nbd-shared-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn opts(read_only: bool, snapshot: bool) -> ImageOptions {
        ImageOptions {
            read_only,
            snapshot,
            ..ImageOptions::default()
        }
    }

    #[test]
    fn one_file_under_three_names() {
        let dir = temp_dir("three");
        let path = dir.join("disk.img");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let mut set = ImageSet::new();
        set.add(&path, opts(false, false));
        // Another path to the same file.
        set.add(dir.join(".").join("disk.img"), opts(true, false));
        set.add(&path, opts(false, true));
        let s = set.open().unwrap();
        let (rw, ro, cow) = (&s[0], &s[1], &s[2]);
        assert!(!rw.capabilities().read_only);
        assert!(ro.capabilities().read_only);
        assert!(!cow.capabilities().read_only);
        assert_eq!(
            ro.write_at(&[1], 0, false).unwrap_err().raw_os_error(),
            Some(libc::EPERM)
        );
        rw.write_at(&[1; 4096], 0, false).unwrap();
        cow.write_at(&[2; 4096], 8192, false).unwrap();
        let mut buf = vec![0u8; 4096];
        ro.read_at(&mut buf, 0).unwrap();
        assert_eq!(
            buf,
            vec![1; 4096],
            "the read-only export sees the writable one's writes"
        );
        cow.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, vec![1; 4096], "and so does the snapshot where it has not written");
        ro.read_at(&mut buf, 8192).unwrap();
        assert_eq!(buf, vec![7; 4096], "the snapshot's writes stay in its overlay");
        // A second server on the file is still refused by the locks.
        let e = open(&path, &opts(false, false))
            .err()
            .expect("a second open is refused");
        assert!(e.to_string().contains("lock"), "{e}");
        drop(s);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn formats_must_agree() {
        let dir = temp_dir("formats");
        let path = dir.join("disk.img");
        std::fs::write(&path, vec![0u8; 65536]).unwrap();
        let mut set = ImageSet::new();
        set.add(&path, opts(true, false));
        set.add(
            &path,
            ImageOptions {
                format: Some(ImageFormat::Qcow2),
                read_only: true,
                ..ImageOptions::default()
            },
        );
        let Err(e) = set.open() else { panic!("formats differ") };
        assert!(e.to_string().contains("agree on its format"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
