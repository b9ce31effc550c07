//! Images read through any [`Storage`]: a qcow2 image (and its backing
//! chain) on a web server, or on any other source a [`Storage`] reads, is
//! served as the guest disk it holds, read in place (no scratch copy).
//!
//! [`SourceStorage`] makes a [`Storage`] an `imago` storage object, so
//! `imago`'s qcow2 driver reads the image's metadata and data through it;
//! the chain is then served by the same [`ImageStorage`] as local images
//! (reads, `base:allocation` with the holes and zero clusters of the
//! qcow2 layers, `qemu:allocation-depth`, snapshot mode).
//!
//! Backing files named in an image's header are found by a
//! [`LayerSource`], which knows how names resolve on its kind of source
//! (`http::HttpLayers` resolves them as URLs relative to the image's).
//!
//! The layers are only read: the top image is read-only unless snapshot
//! mode puts a temporary overlay on top of it.

use std::fmt;
use std::io;
use std::sync::Arc;

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::storage::drivers::CommonStorageHelper;

use super::header::ReadAt;
use super::qcow2::{
    Access, Layer, backing_format, check_depth, checked_header, open_qcow2_layer, open_raw_layer, serve_chain,
};
use super::{ImageFormat, ImageOptions, ImageStorage, Probed, probe};
use crate::{Storage, errno_error};

/// How many bytes of an image are probed (as [`probe`] expects).
const PROBE_BYTES: u64 = 512;

/// Finds the backing files of images read from one kind of source.
pub trait LayerSource: Send + Sync {
    /// Opens the backing file `name`, as recorded in the header of the
    /// image at `image` (a location this source gave out, or the top
    /// image's): returns its location (for messages and for resolving its
    /// own backing file) and its storage. Names the source cannot resolve
    /// are refused with an error that says why.
    fn open_backing(&self, image: &str, name: &str) -> io::Result<(String, Arc<dyn Storage>)>;
}

/// A [`Storage`] as an `imago` storage object, read-only: reads past the
/// end read zeroes (as `imago` expects of a file), writes fail with
/// `EROFS`.
pub struct SourceStorage {
    inner: Arc<dyn Storage>,
    location: String,
    helper: CommonStorageHelper,
}

impl SourceStorage {
    /// Wraps `inner`, known as `location` in messages.
    pub fn new(inner: Arc<dyn Storage>, location: impl Into<String>) -> SourceStorage {
        SourceStorage {
            inner,
            location: location.into(),
            helper: CommonStorageHelper::default(),
        }
    }
}

impl fmt::Debug for SourceStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceStorage")
            .field("location", &self.location)
            .field("size", &self.inner.size())
            .finish_non_exhaustive()
    }
}

impl fmt::Display for SourceStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.location)
    }
}

/// Reads `buf` at `offset` from `storage`; what lies past its end reads as
/// zeroes.
fn read_padded(storage: &dyn Storage, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let size = storage.size();
    let avail = size.saturating_sub(offset).min(buf.len() as u64) as usize;
    let (data, past) = buf.split_at_mut(avail);
    if !data.is_empty() {
        storage.read_at(data, offset)?;
    }
    past.fill(0);
    Ok(())
}

impl imago::Storage for SourceStorage {
    fn size(&self) -> io::Result<u64> {
        Ok(self.inner.size())
    }

    unsafe fn pure_readv(&self, bufv: IoVectorMut<'_>, mut offset: u64) -> io::Result<()> {
        for mut slice in bufv.into_inner() {
            let buf: &mut [u8] = &mut slice;
            read_padded(self.inner.as_ref(), buf, offset)?;
            offset = offset
                .checked_add(buf.len() as u64)
                .ok_or_else(|| errno_error(libc::EINVAL))?;
        }
        Ok(())
    }

    unsafe fn pure_writev(&self, _bufv: IoVector<'_>, _offset: u64) -> io::Result<()> {
        Err(errno_error(libc::EROFS))
    }

    unsafe fn pure_write_zeroes(&self, _offset: u64, _length: u64) -> io::Result<()> {
        Err(errno_error(libc::EROFS))
    }

    unsafe fn pure_write_allocated_zeroes(&self, _offset: u64, _length: u64) -> io::Result<()> {
        Err(errno_error(libc::EROFS))
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    unsafe fn invalidate_cache(&self) -> io::Result<()> {
        Ok(())
    }

    fn get_storage_helper(&self) -> &CommonStorageHelper {
        &self.helper
    }
}

/// The header checks read through the same storage.
struct HeaderReader<'a>(&'a dyn Storage);

impl ReadAt for HeaderReader<'_> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let fits = offset
            .checked_add(buf.len() as u64)
            .is_some_and(|end| end <= self.0.size());
        if !fits {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the image is too short"));
        }
        self.0.read_at(buf, offset)
    }

    fn file_len(&self) -> io::Result<u64> {
        Ok(self.0.size())
    }
}

/// The first bytes of `storage` (at most 512), for [`probe`].
fn read_head(storage: &dyn Storage) -> io::Result<Vec<u8>> {
    let n = storage.size().min(PROBE_BYTES) as usize;
    let mut head = vec![0u8; n];
    storage.read_at(&mut head, 0)?;
    Ok(head)
}

/// Decides the format of the image `location` read through `storage`, as
/// [`super::open`] does for files: the one `asked` for, else the probed
/// one; a format we do not serve is refused rather than served as raw.
pub fn probe_storage(storage: &dyn Storage, location: &str, asked: Option<ImageFormat>) -> io::Result<ImageFormat> {
    if let Some(f) = asked {
        return Ok(f);
    }
    let head = read_head(storage).map_err(|e| io::Error::new(e.kind(), format!("{location}: {e}")))?;
    match probe(&head) {
        Probed::Format(f) => Ok(f),
        Probed::Unsupported(name) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{location}: the image looks like {name}, a format that cannot be read here; \
                 it is not read as raw unless the format is given explicitly (-f raw)"
            ),
        )),
    }
}

/// Opens the qcow2 image `location`, read through `top`, with its backing
/// chain from `layers`, and serves it as `options` say: read-only (the
/// top image is never written), or with a temporary overlay in snapshot
/// mode. `options.format` is not looked at: the caller decided the format
/// (see [`probe_storage`]); persistent dirty bitmaps are not offered.
pub fn open_qcow2(
    top: Arc<dyn Storage>,
    location: &str,
    layers: &dyn LayerSource,
    options: &ImageOptions,
) -> io::Result<ImageStorage> {
    if !options.bitmaps.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{location}: persistent dirty bitmaps are offered for local images only"),
        ));
    }
    let image = open_layer(top, location, ImageFormat::Qcow2, 0, layers)?;
    let options = ImageOptions {
        read_only: options.read_only || !options.snapshot,
        ..options.clone()
    };
    serve_chain(image, location, ImageFormat::Qcow2, &options)
}

/// Opens one layer read through `storage`, and the layers below it.
fn open_layer(
    storage: Arc<dyn Storage>,
    location: &str,
    format: ImageFormat,
    level: usize,
    layers: &dyn LayerSource,
) -> io::Result<Access> {
    check_depth(location, level)?;
    if format == ImageFormat::Qcow2 {
        checked_header(location, &HeaderReader(storage.as_ref()))?;
    }
    let object: Layer = Box::new(SourceStorage::new(storage, location));
    match format {
        ImageFormat::Raw => open_raw_layer(object, false, location),
        ImageFormat::Qcow2 => open_qcow2_layer(object, false, location, |name, recorded| {
            let (blocation, bstorage) = layers
                .open_backing(location, name)
                .map_err(|e| io::Error::new(e.kind(), format!("{location}: backing file {name:?}: {e}")))?;
            let bformat = backing_format(location, &blocation, recorded, || read_head(bstorage.as_ref()))?;
            open_layer(bstorage, &blocation, bformat, level + 1, layers)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStorage;
    use crate::image::bitmap::QCOW2_MAGIC;

    struct NoLayers;

    impl LayerSource for NoLayers {
        fn open_backing(&self, _image: &str, name: &str) -> io::Result<(String, Arc<dyn Storage>)> {
            Err(io::Error::new(io::ErrorKind::NotFound, format!("{name}: not found")))
        }
    }

    #[test]
    fn probes_through_storage() {
        let m = MemoryStorage::new(4096);
        assert_eq!(probe_storage(&m, "m", None).unwrap(), ImageFormat::Raw);
        m.write_at(b"KDMV", 0, false).unwrap();
        let e = probe_storage(&m, "m", None).unwrap_err();
        assert!(e.to_string().contains("looks like vmdk"), "{e}");
        assert_eq!(
            probe_storage(&m, "m", Some(ImageFormat::Raw)).unwrap(),
            ImageFormat::Raw
        );
        m.write_at(&QCOW2_MAGIC, 0, false).unwrap();
        assert_eq!(probe_storage(&m, "m", None).unwrap(), ImageFormat::Qcow2);
        // A header that is only a magic number is refused, naming the image.
        let e = open_qcow2(Arc::new(m), "mem://x", &NoLayers, &ImageOptions::default()).unwrap_err();
        assert!(e.to_string().starts_with("mem://x: "), "{e}");
    }

    /// Backing files from memory, by name.
    struct MemoryLayers(Vec<(&'static str, Arc<dyn Storage>)>);

    impl LayerSource for MemoryLayers {
        fn open_backing(&self, _image: &str, name: &str) -> io::Result<(String, Arc<dyn Storage>)> {
            let (n, s) = self
                .0
                .iter()
                .find(|(n, _)| *n == name)
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such layer"))?;
            Ok((format!("mem:{n}"), s.clone()))
        }
    }

    /// A qcow2 overlay (made by imago in a file, then copied to memory)
    /// over a raw base in memory: the chain is read through
    /// `MemoryStorage`, a source that is neither a file nor HTTP.
    #[test]
    fn a_chain_read_through_any_storage() {
        use imago::file::File as ImagoFile;
        use imago::qcow2::Qcow2;
        use imago::{FormatAccess, FormatCreateBuilder, StorageOpenOptions};
        use std::os::unix::fs::FileExt;

        const SIZE: u64 = (1 << 20) + 4096;
        let file = super::super::anonymous_temp_file(&super::super::default_temp_dir()).unwrap();
        let open = || {
            let opts = StorageOpenOptions::new().write(true);
            ImagoFile::from_open_file(file.try_clone().unwrap(), opts).unwrap()
        };
        Qcow2::<ImagoFile>::create_builder(open())
            .size(SIZE)
            .backing("base.raw".into(), "raw".into())
            .create()
            .unwrap();
        let mut q = Qcow2::<ImagoFile>::open_image(open(), true).unwrap();
        q.set_backing(None);
        let access = FormatAccess::new(q);
        access.write(&[0xaau8; 65536][..], 65536).unwrap();
        access.flush().unwrap();
        drop(access);
        let len = file.metadata().unwrap().len();
        let mut bytes = vec![0u8; len as usize];
        FileExt::read_exact_at(&file, &mut bytes, 0).unwrap();
        let top = MemoryStorage::new(len);
        top.write_at(&bytes, 0, false).unwrap();
        let base = MemoryStorage::new(SIZE);
        base.write_at(&[0x55; 131072], 0, false).unwrap();
        let layers = MemoryLayers(vec![("base.raw", Arc::new(base))]);
        let image = open_qcow2(Arc::new(top), "mem:top.qcow2", &layers, &ImageOptions::default()).unwrap();
        assert_eq!(image.size(), SIZE);
        assert!(image.capabilities().read_only);
        let mut buf = vec![0u8; 196608];
        image.read_at(&mut buf, 0).unwrap();
        assert!(buf[..65536].iter().all(|&b| b == 0x55), "the base shows through");
        assert!(buf[65536..131072].iter().all(|&b| b == 0xaa), "the overlay's cluster");
        assert!(buf[131072..].iter().all(|&b| b == 0), "zeroes past the base's data");
        let e = image.write_at(&[1], 0, false).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        // A backing file the source does not have is an error naming it.
        let e = open_qcow2(
            Arc::new(MemoryStorage::new(0)),
            "mem:empty",
            &MemoryLayers(Vec::new()),
            &ImageOptions::default(),
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("mem:empty: "), "{e}");
        let top = MemoryStorage::new(len);
        top.write_at(&bytes, 0, false).unwrap();
        let e = open_qcow2(
            Arc::new(top),
            "mem:top",
            &MemoryLayers(Vec::new()),
            &ImageOptions::default(),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("backing file \"base.raw\": no such layer"),
            "{e}"
        );
    }

    #[test]
    fn reads_past_the_end_as_zeroes() {
        let m = MemoryStorage::new(8);
        m.write_at(&[7u8; 8], 0, false).unwrap();
        let mut buf = [1u8; 6];
        read_padded(&m, &mut buf, 5).unwrap();
        assert_eq!(buf, [7, 7, 7, 0, 0, 0]);
        read_padded(&m, &mut buf, 100).unwrap();
        assert_eq!(buf, [0; 6]);
    }
}
