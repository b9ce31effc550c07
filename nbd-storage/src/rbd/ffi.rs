//! The part of librados and librbd's C API the RBD backend uses, and safe
//! wrappers around it. Every `unsafe` block of the backend is in this
//! module.
//!
//! The declarations follow `rados/librados.h` and `rbd/librbd.h` of Ceph
//! (the C API has been stable since Nautilus; everything used here exists
//! in librbd 1.12 and later). librbd reports errors as negative errno
//! values; the wrappers turn them into [`io::Error`]s carrying the errno.
//!
//! Ownership rules of the asynchronous calls, which the wrappers keep:
//!
//! * A call that returns a negative value did not take the completion: its
//!   callback will not run and the caller still owns everything passed.
//! * A call that returns 0 runs the completion's callback exactly once, on
//!   a librbd thread or (for requests librbd refuses at once) on the
//!   calling thread before the call returns. Until then librbd may read a
//!   WRITE's buffer and write a READ's buffer: the buffers live, unmoved,
//!   in the heap allocation owned by the callback's context.
//! * `rbd_close` waits for every request in flight, callbacks included, so
//!   an image handle outlives every callback of its requests.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr;
use std::sync::Arc;

type RadosT = *mut c_void;
type RadosIoctxT = *mut c_void;
type RbdImageT = *mut c_void;
type RbdCompletionT = *mut c_void;
type RbdCallbackT = extern "C" fn(RbdCompletionT, *mut c_void);
type DiffCallbackT = extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int;

/// `RBD_WRITE_ZEROES_FLAG_THICK_PROVISION`: zeroes are written, nothing is
/// deallocated.
const RBD_WRITE_ZEROES_FLAG_THICK_PROVISION: c_int = 1;

/// `RBD_FEATURE_FAST_DIFF`.
pub(crate) const RBD_FEATURE_FAST_DIFF: u64 = 1 << 4;
/// `RBD_FEATURE_STRIPINGV2`.
pub(crate) const RBD_FEATURE_STRIPINGV2: u64 = 1 << 1;
/// `RBD_FLAG_FAST_DIFF_INVALID`.
pub(crate) const RBD_FLAG_FAST_DIFF_INVALID: u64 = 1 << 1;

/// `rbd_image_info_t`.
#[repr(C)]
struct RbdImageInfo {
    size: u64,
    obj_size: u64,
    num_objs: u64,
    order: c_int,
    block_name_prefix: [c_char; 24],
    parent_pool: i64,
    parent_name: [c_char; 96],
}

#[link(name = "rados")]
unsafe extern "C" {
    fn rados_create(cluster: *mut RadosT, id: *const c_char) -> c_int;
    fn rados_conf_read_file(cluster: RadosT, path: *const c_char) -> c_int;
    fn rados_conf_set(cluster: RadosT, option: *const c_char, value: *const c_char) -> c_int;
    fn rados_conf_get(cluster: RadosT, option: *const c_char, buf: *mut c_char, len: usize) -> c_int;
    fn rados_connect(cluster: RadosT) -> c_int;
    fn rados_shutdown(cluster: RadosT);
    fn rados_ioctx_create(cluster: RadosT, pool: *const c_char, ioctx: *mut RadosIoctxT) -> c_int;
    fn rados_ioctx_destroy(io: RadosIoctxT);
    fn rados_ioctx_set_namespace(io: RadosIoctxT, nspace: *const c_char);
    fn rados_stat(io: RadosIoctxT, oid: *const c_char, psize: *mut u64, pmtime: *mut libc::time_t) -> c_int;
}

#[link(name = "rbd")]
unsafe extern "C" {
    fn rbd_open(io: RadosIoctxT, name: *const c_char, image: *mut RbdImageT, snap: *const c_char) -> c_int;
    fn rbd_open_read_only(io: RadosIoctxT, name: *const c_char, image: *mut RbdImageT, snap: *const c_char) -> c_int;
    fn rbd_close(image: RbdImageT) -> c_int;
    fn rbd_stat(image: RbdImageT, info: *mut RbdImageInfo, infosize: usize) -> c_int;
    fn rbd_get_features(image: RbdImageT, features: *mut u64) -> c_int;
    fn rbd_get_flags(image: RbdImageT, flags: *mut u64) -> c_int;
    fn rbd_get_id(image: RbdImageT, id: *mut c_char, id_len: usize) -> c_int;
    fn rbd_get_stripe_unit(image: RbdImageT, stripe_unit: *mut u64) -> c_int;
    fn rbd_get_stripe_count(image: RbdImageT, stripe_count: *mut u64) -> c_int;
    fn rbd_diff_iterate2(
        image: RbdImageT,
        fromsnapname: *const c_char,
        ofs: u64,
        len: u64,
        include_parent: u8,
        whole_object: u8,
        cb: DiffCallbackT,
        arg: *mut c_void,
    ) -> c_int;
    fn rbd_aio_create_completion(cb_arg: *mut c_void, complete_cb: RbdCallbackT, c: *mut RbdCompletionT) -> c_int;
    fn rbd_aio_get_return_value(c: RbdCompletionT) -> isize;
    fn rbd_aio_release(c: RbdCompletionT);
    fn rbd_aio_read(image: RbdImageT, off: u64, len: usize, buf: *mut c_char, c: RbdCompletionT) -> c_int;
    fn rbd_aio_write(image: RbdImageT, off: u64, len: usize, buf: *const c_char, c: RbdCompletionT) -> c_int;
    fn rbd_aio_discard(image: RbdImageT, off: u64, len: u64, c: RbdCompletionT) -> c_int;
    fn rbd_aio_write_zeroes(
        image: RbdImageT,
        off: u64,
        len: usize,
        c: RbdCompletionT,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> c_int;
    fn rbd_aio_flush(image: RbdImageT, c: RbdCompletionT) -> c_int;
    fn rbd_flush(image: RbdImageT) -> c_int;
}

/// A librados/librbd return value: negative errno values become errors.
fn check(r: c_int) -> io::Result<c_int> {
    if r < 0 {
        Err(io::Error::from_raw_os_error(r.saturating_neg()))
    } else {
        Ok(r)
    }
}

/// The error for a failed asynchronous request (librbd's `-errno`): the
/// errno values an NBD client can act on are kept (`EINVAL`, `EPERM`,
/// `EROFS`, `ENOSPC`, `EDQUOT`, `ENOMEM`, `EOPNOTSUPP`, `EIO`); any other
/// (`ETIMEDOUT` from a cluster that does not answer, `ENOENT`,
/// `EBLOCKLISTED`, ...) is an I/O error that names it, not something the
/// NBD protocol would misread (`EBLOCKLISTED` is `ESHUTDOWN`, which NBD
/// reserves for a server that shuts down).
fn request_error(errno: i32) -> io::Error {
    match errno {
        libc::EINVAL
        | libc::EPERM
        | libc::EROFS
        | libc::ENOSPC
        | libc::EDQUOT
        | libc::ENOMEM
        | libc::EOPNOTSUPP
        | libc::EIO => io::Error::from_raw_os_error(errno),
        libc::ESHUTDOWN => io::Error::other("librbd: this client was blocklisted by the Ceph cluster"),
        _ => {
            let e = io::Error::from_raw_os_error(errno);
            io::Error::new(e.kind(), format!("librbd: {e}"))
        }
    }
}

/// A C string of `s`, or `EINVAL` if it holds a NUL byte.
fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{s:?} contains a NUL byte")))
}

/// A connection to a Ceph cluster (`rados_t`): created and configured,
/// then connected.
#[derive(Debug)]
pub(crate) struct Cluster {
    raw: RadosT,
}

// SAFETY: a rados_t may be used from any thread and concurrently (librados
// locks internally); configuration happens before it is shared.
unsafe impl Send for Cluster {}
// SAFETY: as above.
unsafe impl Sync for Cluster {}

impl Cluster {
    /// A handle for user `id` (e.g. "admin"; `None` for Ceph's default).
    /// Reads `CEPH_ARGS` as librados does.
    pub(crate) fn create(id: Option<&str>) -> io::Result<Cluster> {
        let id = id.map(cstring).transpose()?;
        let mut raw: RadosT = ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer; `id` is NULL or a C string
        // that lives across the call.
        check(unsafe { rados_create(&mut raw, id.as_ref().map_or(ptr::null(), |s| s.as_ptr())) })?;
        if raw.is_null() {
            return Err(io::Error::other("rados_create returned no handle"));
        }
        Ok(Cluster { raw })
    }

    /// Reads a configuration file; `None` searches Ceph's default
    /// locations (`$CEPH_CONF`, /etc/ceph/ceph.conf, ...).
    pub(crate) fn read_conf_file(&self, path: Option<&str>) -> io::Result<()> {
        let path = path.map(cstring).transpose()?;
        // SAFETY: the handle is valid and not yet connected; `path` is NULL
        // or a C string that lives across the call.
        check(unsafe { rados_conf_read_file(self.raw, path.as_ref().map_or(ptr::null(), |s| s.as_ptr())) })?;
        Ok(())
    }

    /// Sets a configuration option (`ENOENT` for an unknown option).
    pub(crate) fn set(&self, option: &str, value: &str) -> io::Result<()> {
        let (o, v) = (cstring(option)?, cstring(value)?);
        // SAFETY: valid handle; both strings live across the call.
        check(unsafe { rados_conf_set(self.raw, o.as_ptr(), v.as_ptr()) })?;
        Ok(())
    }

    /// The value of a configuration option.
    pub(crate) fn get(&self, option: &str) -> io::Result<String> {
        let o = cstring(option)?;
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: valid handle; `buf` is writable for `buf.len()` bytes
            // and librados NUL-terminates what it writes there.
            let r = unsafe { rados_conf_get(self.raw, o.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
            if r == -libc::ENAMETOOLONG && buf.len() < 1 << 20 {
                buf.resize(buf.len() * 4, 0);
                continue;
            }
            check(r)?;
            let s = CStr::from_bytes_until_nul(&buf).map_err(|_| io::Error::other("unterminated option value"))?;
            return Ok(s.to_string_lossy().into_owned());
        }
    }

    /// Connects to the monitors.
    pub(crate) fn connect(&self) -> io::Result<()> {
        // SAFETY: valid handle, connected at most once (by the caller).
        check(unsafe { rados_connect(self.raw) })?;
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: the handle is valid and every I/O context made from it
        // is gone (each holds an Arc of the cluster).
        unsafe { rados_shutdown(self.raw) }
    }
}

/// An I/O context: a pool (and namespace) of a connected cluster.
#[derive(Debug)]
pub(crate) struct IoCtx {
    raw: RadosIoctxT,
    _cluster: Arc<Cluster>,
}

// SAFETY: rados_ioctx_t is thread-safe for I/O; its namespace is set
// before it is shared.
unsafe impl Send for IoCtx {}
// SAFETY: as above.
unsafe impl Sync for IoCtx {}

impl IoCtx {
    /// An I/O context for `pool` (and `namespace`, when not empty).
    pub(crate) fn new(cluster: &Arc<Cluster>, pool: &str, namespace: &str) -> io::Result<IoCtx> {
        let p = cstring(pool)?;
        let ns = cstring(namespace)?;
        let mut raw: RadosIoctxT = ptr::null_mut();
        // SAFETY: the cluster is connected and valid; `p` lives across the
        // call; `raw` is a valid out-pointer.
        check(unsafe { rados_ioctx_create(cluster.raw, p.as_ptr(), &mut raw) })?;
        if raw.is_null() {
            return Err(io::Error::other("rados_ioctx_create returned no context"));
        }
        // SAFETY: `raw` was just created and is not shared yet.
        unsafe { rados_ioctx_set_namespace(raw, ns.as_ptr()) };
        Ok(IoCtx {
            raw,
            _cluster: cluster.clone(),
        })
    }
}

impl IoCtx {
    /// Whether object `oid` exists: `Ok(false)` when the OSD says
    /// `ENOENT`, an error when it cannot tell. Blocks until the OSD answers
    /// (or `rados_osd_op_timeout` passes).
    pub(crate) fn exists(&self, oid: &str) -> io::Result<bool> {
        let o = cstring(oid)?;
        let (mut size, mut mtime): (u64, libc::time_t) = (0, 0);
        // SAFETY: the context is valid; `o` lives across the call and the
        // out-pointers are valid for their types.
        let r = unsafe { rados_stat(self.raw, o.as_ptr(), &mut size, &mut mtime) };
        match r {
            0.. => Ok(true),
            r if r == -libc::ENOENT => Ok(false),
            r => Err(io::Error::from_raw_os_error(r.saturating_neg())),
        }
    }
}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: the context is valid and no image opened in it is left
        // (each holds an Arc of it).
        unsafe { rados_ioctx_destroy(self.raw) }
    }
}

/// What `rbd_stat` and friends say about an image.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ImageInfo {
    pub(crate) size: u64,
    pub(crate) object_size: u64,
    pub(crate) features: u64,
    pub(crate) stripe_unit: u64,
    pub(crate) stripe_count: u64,
}

/// An open RBD image (`rbd_image_t`), closed on drop.
#[derive(Debug)]
pub(crate) struct Image {
    raw: RbdImageT,
    _ioctx: Arc<IoCtx>,
}

// SAFETY: librbd image handles are thread-safe: any number of threads may
// issue requests on one handle concurrently.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl Image {
    /// Opens image `name` (at snapshot `snap` if given, which is always
    /// read-only). A read-only open takes no exclusive lock.
    pub(crate) fn open(ioctx: &Arc<IoCtx>, name: &str, snap: Option<&str>, read_only: bool) -> io::Result<Image> {
        let n = cstring(name)?;
        let s = snap.map(cstring).transpose()?;
        let snap_ptr = s.as_ref().map_or(ptr::null(), |s| s.as_ptr());
        let mut raw: RbdImageT = ptr::null_mut();
        // SAFETY: the I/O context is valid; the strings live across the
        // call; `raw` is a valid out-pointer.
        let r = unsafe {
            if read_only {
                rbd_open_read_only(ioctx.raw, n.as_ptr(), &mut raw, snap_ptr)
            } else {
                rbd_open(ioctx.raw, n.as_ptr(), &mut raw, snap_ptr)
            }
        };
        check(r)?;
        if raw.is_null() {
            return Err(io::Error::other("rbd_open returned no image"));
        }
        Ok(Image {
            raw,
            _ioctx: ioctx.clone(),
        })
    }

    /// Size, object size, features and striping.
    pub(crate) fn info(&self) -> io::Result<ImageInfo> {
        let mut info = RbdImageInfo {
            size: 0,
            obj_size: 0,
            num_objs: 0,
            order: 0,
            block_name_prefix: [0; 24],
            parent_pool: 0,
            parent_name: [0; 96],
        };
        let (mut features, mut unit, mut count) = (0u64, 0u64, 0u64);
        // SAFETY: the image is open; every out-pointer is valid for its
        // type and `infosize` is the size of the struct passed.
        unsafe {
            check(rbd_stat(self.raw, &mut info, std::mem::size_of::<RbdImageInfo>()))?;
            check(rbd_get_features(self.raw, &mut features))?;
            check(rbd_get_stripe_unit(self.raw, &mut unit))?;
            check(rbd_get_stripe_count(self.raw, &mut count))?;
        }
        Ok(ImageInfo {
            size: info.size,
            object_size: info.obj_size,
            features,
            stripe_unit: unit,
            stripe_count: count,
        })
    }

    /// The name of the image's header object: `rbd_header.ID` (format 2),
    /// or `NAME.rbd` for a format 1 image, which has no id.
    pub(crate) fn header_oid(&self, name: &str) -> String {
        let mut buf = [0u8; 128];
        // SAFETY: the image is open; `buf` is writable for its length and
        // librbd NUL-terminates the id it writes there.
        let r = unsafe { rbd_get_id(self.raw, buf.as_mut_ptr().cast(), buf.len()) };
        match CStr::from_bytes_until_nul(&buf) {
            Ok(id) if r >= 0 && !id.is_empty() => format!("rbd_header.{}", id.to_string_lossy()),
            _ => format!("{name}.rbd"),
        }
    }

    /// The image's flags (`RBD_FLAG_*`): they change at run time (an
    /// object map can become invalid).
    pub(crate) fn flags(&self) -> io::Result<u64> {
        let mut flags = 0u64;
        // SAFETY: the image is open; `flags` is a valid out-pointer.
        let r = unsafe { rbd_get_flags(self.raw, &mut flags) };
        if r < 0 {
            return Err(request_error(r.saturating_neg()));
        }
        Ok(flags)
    }

    /// Flushes every completed write, waiting until they are durable.
    pub(crate) fn flush(&self) -> io::Result<()> {
        // SAFETY: the image is open.
        check(unsafe { rbd_flush(self.raw) })?;
        Ok(())
    }

    /// `rbd_diff_iterate2` against the beginning of time (no snapshot):
    /// calls `f(offset, length, exists)` for each allocated (or, for
    /// `exists == false`, deallocated since a snapshot) run in
    /// `offset..offset + length`, in order, until `f` returns `false`.
    /// Blocks the calling thread until librbd is done.
    pub(crate) fn diff_iterate(
        &self,
        offset: u64,
        length: u64,
        whole_object: bool,
        f: &mut dyn FnMut(u64, u64, bool) -> bool,
    ) -> io::Result<()> {
        /// What the callback needs: the closure, and whether it panicked.
        struct State<'a> {
            f: &'a mut dyn FnMut(u64, u64, bool) -> bool,
            stopped: bool,
            panicked: bool,
        }
        /// Returned by the callback to stop the iteration early; not an
        /// errno librbd produces.
        const STOP: c_int = -9000;
        extern "C" fn cb(off: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
            // SAFETY: `arg` is the `State` that `diff_iterate` keeps alive
            // (and does not otherwise touch) while rbd_diff_iterate2 runs,
            // which calls back on the calling thread or while it waits.
            let st = unsafe { &mut *arg.cast::<State<'_>>() };
            match catch_unwind(AssertUnwindSafe(|| (st.f)(off, len as u64, exists != 0))) {
                Ok(true) => 0,
                Ok(false) => {
                    st.stopped = true;
                    STOP
                }
                Err(_) => {
                    st.panicked = true;
                    STOP
                }
            }
        }
        let mut st = State {
            f,
            stopped: false,
            panicked: false,
        };
        // SAFETY: the image is open; `cb` matches the callback type and
        // `st` outlives the call (see `cb`).
        let r = unsafe {
            rbd_diff_iterate2(
                self.raw,
                ptr::null(),
                offset,
                length,
                1,
                u8::from(whole_object),
                cb,
                (&mut st as *mut State<'_>).cast(),
            )
        };
        if st.panicked {
            return Err(io::Error::other("block status callback panicked"));
        }
        if st.stopped && r == STOP {
            return Ok(());
        }
        if r < 0 {
            return Err(request_error(r.saturating_neg()));
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`; `done` gets the
    /// buffer back with the result (a short read is zero-filled).
    pub(crate) fn aio_read(
        &self,
        offset: u64,
        buf: Vec<u8>,
        done: impl FnOnce(Vec<u8>, io::Result<()>) + Send + 'static,
    ) {
        submit(
            Op {
                buf,
                kind: Kind::Read,
                image: self.raw,
                done: BufDone(done),
            },
            |raw, buf, len, c| {
                // SAFETY: `raw` is open; `buf` is the heap buffer owned by
                // the operation, `len` bytes long, which stays put and
                // alive until the callback has run.
                unsafe { rbd_aio_read(raw, offset, len, buf.cast(), c) }
            },
        );
    }

    /// Writes `buf` at `offset`; with `fua`, flushes once the write is
    /// done, before `done` gets the buffer back with the result.
    pub(crate) fn aio_write(
        &self,
        offset: u64,
        buf: Vec<u8>,
        fua: bool,
        done: impl FnOnce(Vec<u8>, io::Result<()>) + Send + 'static,
    ) {
        submit(
            Op {
                buf,
                kind: if fua { Kind::WriteFua } else { Kind::Write },
                image: self.raw,
                done: BufDone(done),
            },
            |raw, buf, len, c| {
                // SAFETY: as in `aio_read`; librbd only reads the buffer.
                unsafe { rbd_aio_write(raw, offset, len, buf.cast_const().cast(), c) }
            },
        );
    }

    /// Discards `offset..offset + length`.
    pub(crate) fn aio_discard(
        &self,
        offset: u64,
        length: u64,
        fua: bool,
        done: impl FnOnce(io::Result<()>) + Send + 'static,
    ) {
        submit(self.op(fua, done), |raw, _, _, c| {
            // SAFETY: the image is open; the completion is fresh.
            unsafe { rbd_aio_discard(raw, offset, length, c) }
        });
    }

    /// Zeroes `offset..offset + length` (`length` fits in `usize`): with
    /// `thick`, by writing zeroes (nothing is deallocated); without, the
    /// way librbd finds fastest (whole objects are deallocated).
    pub(crate) fn aio_write_zeroes(
        &self,
        offset: u64,
        length: usize,
        thick: bool,
        fua: bool,
        done: impl FnOnce(io::Result<()>) + Send + 'static,
    ) {
        let flags = if thick {
            RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
        } else {
            0
        };
        submit(self.op(fua, done), |raw, _, _, c| {
            // SAFETY: the image is open; the completion is fresh.
            unsafe { rbd_aio_write_zeroes(raw, offset, length, c, flags, 0) }
        });
    }

    /// Flushes every write completed before the call.
    pub(crate) fn aio_flush(&self, done: impl FnOnce(io::Result<()>) + Send + 'static) {
        submit(self.op(false, done), |raw, _, _, c| {
            // SAFETY: the image is open; the completion is fresh.
            unsafe { rbd_aio_flush(raw, c) }
        });
    }

    fn op<F: FnOnce(io::Result<()>) + Send + 'static>(&self, fua: bool, done: F) -> Op<NoBuf<F>> {
        Op {
            buf: Vec::new(),
            kind: if fua { Kind::WriteFua } else { Kind::Other },
            image: self.raw,
            done: NoBuf(done),
        }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: the handle is valid and used by nobody else any more;
        // rbd_close flushes and waits for the requests in flight.
        unsafe {
            rbd_close(self.raw);
        }
    }
}

/// How an asynchronous operation ends.
trait Done: Send + 'static {
    fn done(self, buf: Vec<u8>, result: io::Result<()>);
}

/// An end that gets the buffer back.
struct BufDone<F>(F);

impl<F: FnOnce(Vec<u8>, io::Result<()>) + Send + 'static> Done for BufDone<F> {
    fn done(self, buf: Vec<u8>, result: io::Result<()>) {
        (self.0)(buf, result)
    }
}

/// An end without a buffer.
struct NoBuf<F>(F);

impl<F: FnOnce(io::Result<()>) + Send + 'static> Done for NoBuf<F> {
    fn done(self, _buf: Vec<u8>, result: io::Result<()>) {
        (self.0)(result)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    /// A modification followed by a flush before it completes.
    WriteFua,
    Other,
}

/// One asynchronous operation: owned by librbd (as the completion's
/// argument) from a successful submission until its callback.
struct Op<D> {
    /// The READ or WRITE buffer (empty for other operations). Its heap
    /// allocation is what librbd reads or writes; it is neither moved nor
    /// touched while librbd owns the operation.
    buf: Vec<u8>,
    kind: Kind,
    /// The image, for the flush that follows a FUA write.
    image: RbdImageT,
    done: D,
}

/// Submits `op` with `start(image, buf, completion)`; on failure to
/// submit, ends it at once with the error.
fn submit<D: Done>(mut op: Op<D>, start: impl FnOnce(RbdImageT, *mut u8, usize, RbdCompletionT) -> c_int) {
    let raw = op.image;
    // The buffer's heap allocation does not move with the `Op`.
    let (buf, len) = (op.buf.as_mut_ptr(), op.buf.len());
    let op = Box::into_raw(Box::new(op));
    let mut c: RbdCompletionT = ptr::null_mut();
    // SAFETY: `op` is a valid, uniquely owned pointer; `complete::<D>`
    // takes it back exactly once, in the callback.
    let r = unsafe { rbd_aio_create_completion(op.cast(), complete::<D>, &mut c) };
    if r < 0 || c.is_null() {
        // SAFETY: no completion exists, so nobody else has `op`.
        let op = unsafe { Box::from_raw(op) };
        let e = check(r).err().unwrap_or_else(|| io::Error::other("no completion"));
        return finish(*op, Err(e));
    }
    // From here on `op` belongs to the completion (its callback may even
    // run before `start` returns): it is not touched unless refused.
    let r = start(raw, buf, len, c);
    if r < 0 {
        // SAFETY: a refused submission does not run the callback (see the
        // module documentation): the completion and `op` are ours again.
        let op = unsafe {
            rbd_aio_release(c);
            Box::from_raw(op)
        };
        finish(*op, Err(request_error(r.saturating_neg())));
    }
}

/// The completion callback: takes the operation back and ends it (or
/// starts the flush that a FUA write still needs).
extern "C" fn complete<D: Done>(c: RbdCompletionT, arg: *mut c_void) {
    // SAFETY: `c` is the completion this callback belongs to, and `arg`
    // the operation `submit` gave it, which nobody else holds any more.
    let (r, op) = unsafe {
        let r = rbd_aio_get_return_value(c);
        rbd_aio_release(c);
        (r, Box::from_raw(arg.cast::<Op<D>>()))
    };
    let mut op = *op;
    let result = if r < 0 {
        Err(request_error(i32::try_from(r.saturating_neg()).unwrap_or(libc::EIO)))
    } else {
        if op.kind == Kind::Read {
            // A short read (never expected inside the image): the rest
            // reads as zeroes.
            let got = usize::try_from(r).unwrap_or(usize::MAX).min(op.buf.len());
            op.buf[got..].fill(0);
        }
        Ok(())
    };
    if op.kind == Kind::WriteFua && result.is_ok() {
        op.kind = Kind::Other;
        let image = op.image;
        // The image outlives this callback (rbd_close waits for it), so
        // the flush may be started on it from here.
        return submit(op, |_, _, _, c| {
            // SAFETY: see above; the completion is fresh.
            unsafe { rbd_aio_flush(image, c) }
        });
    }
    finish(op, result);
}

/// Ends an operation; a panic in the caller's closure stops here (it must
/// not unwind into librbd).
fn finish<D: Done>(op: Op<D>, result: io::Result<()>) {
    let Op { buf, done, .. } = op;
    let _ = catch_unwind(AssertUnwindSafe(move || done.done(buf, result)));
}
