//! Ceph RBD images as NBD exports, through librbd's asynchronous API
//! (feature `rbd`; needs librbd and librados, Debian's `librbd-dev`).
//!
//! An image is named the way QEMU names it:
//!
//! ```text
//! rbd:POOL/[NAMESPACE/]IMAGE[@SNAPSHOT][:conf=FILE][:id=USER][:OPTION=VALUE...]
//! ```
//!
//! `conf` is the Ceph configuration file (default: Ceph's own search,
//! `$CEPH_CONF` then /etc/ceph/ceph.conf, ...), `id` the Ceph user without
//! its `client.` prefix (default `admin`), and any other `OPTION=VALUE` a
//! Ceph configuration option set on the connection (`rbd_cache=false`,
//! `mon_host=...`, `keyring=...`). A `:`, `@`, `/`, `=` or `\` that belongs
//! to a name or value is escaped with a backslash. See [`RbdSpec`].
//!
//! # How requests run
//!
//! READ, WRITE, FLUSH, TRIM and WRITE_ZEROES are librbd asynchronous
//! requests (`rbd_aio_*`) whose completions answer the NBD request from
//! librbd's own threads: no thread waits per request. READ buffers are
//! filled by librbd in place; they stay owned by the request until its
//! completion runs.
//!
//! * FLUSH is `rbd_aio_flush`; a FUA write or trim is followed by one
//!   before it is answered.
//! * TRIM is `rbd_aio_discard` (librbd may leave partial objects alone, as
//!   TRIM allows).
//! * WRITE_ZEROES is `rbd_aio_write_zeroes`: without `NBD_CMD_FLAG_NO_HOLE`
//!   whole objects are deallocated and partial ones zeroed in the OSDs (no
//!   zero data crosses the network, so `NBD_CMD_FLAG_FAST_ZERO` is
//!   honoured); with NO_HOLE it writes zeroes (thick provisioning), which is
//!   no faster than a write, so NO_HOLE together with FAST_ZERO fails at
//!   once with `EOPNOTSUPP`.
//! * BLOCK_STATUS (`base:allocation`) comes from `rbd_diff_iterate2` over
//!   the image's history (its parents included), in whole objects when the
//!   image has the default striping: allocated objects are data, the rest
//!   holes that read as zeroes. librbd has no asynchronous form of it, so
//!   it runs on two helper threads per export. With a valid fast-diff
//!   object map the answer comes from the map; without, librbd asks the
//!   OSDs about every object, so one answer covers at most
//!   [`SLOW_STATUS_OBJECTS`] objects.
//! * `@SNAPSHOT` exports are read-only, as are exports opened read-only;
//!   neither takes the image's exclusive lock.
//!
//! Every connection to an export shares one image handle, so writes made
//! through one connection are seen by reads through every other and a
//! flush on one flushes them all: the export advertises
//! `NBD_FLAG_CAN_MULTI_CONN`.
//!
//! # Failures
//!
//! librbd's errors reach the client as NBD errors (by errno). librbd
//! itself would wait forever for an OSD or monitor that does not answer;
//! unless the configuration sets them, the connection's
//! `rados_osd_op_timeout` and `rados_mon_op_timeout` are
//! [`DEFAULT_OP_TIMEOUT_SECS`] seconds, so a read from a stopped OSD fails
//! with `ETIMEDOUT` after that long instead of hanging. Some requests wait
//! in librbd for longer than any Ceph timeout: a write, trim or flush that
//! must first take the exclusive lock waits until librbd has registered its
//! watch on the image again, which it retries forever. The server answers
//! every request still unanswered after [`DEADLINE_FACTOR`] times
//! `rados_osd_op_timeout` itself, with `ETIMEDOUT`. A FLUSH with no write
//! completed successfully since the last successful flush is answered at
//! once without librbd (which would take the lock for it); one while
//! librbd holds requests answered that way fails at once, as librbd's
//! flush would wait for them.

mod ffi;
mod tracker;

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tracker::Tracker;

use crate::{AsyncStorage, Capabilities, Completion, Extent, ZeroFlags, check_range, clamp_status_range, push_extent};

/// The timeout, in seconds, of requests to OSDs and monitors when the
/// configuration sets none (librbd's default is to wait forever).
pub const DEFAULT_OP_TIMEOUT_SECS: u32 = 30;

/// Without a valid fast-diff object map, one block-status answer covers
/// at most this many objects (librbd asks an OSD about each).
pub const SLOW_STATUS_OBJECTS: u64 = 64;

/// With a valid fast-diff object map, one block-status answer covers at
/// most this many objects.
pub const FAST_STATUS_OBJECTS: u64 = 4096;

/// Threads per export that run block-status queries.
const STATUS_THREADS: usize = 2;

/// An image named as QEMU names it:
/// `rbd:POOL/[NAMESPACE/]IMAGE[@SNAPSHOT][:OPTION=VALUE...]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RbdSpec {
    /// The pool.
    pub pool: String,
    /// The RADOS namespace inside the pool (`""`: none).
    pub namespace: String,
    /// The image.
    pub image: String,
    /// The snapshot to serve (read-only), if any.
    pub snapshot: Option<String>,
    /// `conf=FILE`: the Ceph configuration file to read instead of Ceph's
    /// default search.
    pub conf: Option<String>,
    /// `id=USER`: the Ceph user (without `client.`).
    pub user: Option<String>,
    /// Every other `OPTION=VALUE`, in order: Ceph configuration options.
    pub options: Vec<(String, String)>,
}

/// Why an `rbd:` image name could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid RBD image name {spec:?}: {reason}")]
pub struct RbdSpecError {
    spec: String,
    reason: &'static str,
}

/// Splits `s` at the first unescaped byte in `delims`: (before, the
/// delimiter, after). Escapes are kept (see [`unescape`]).
fn split_unescaped<'a>(s: &'a str, delims: &[u8]) -> (&'a str, Option<u8>, &'a str) {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            i += 2;
            continue;
        }
        if delims.contains(&b[i]) {
            return (&s[..i], Some(b[i]), &s[i + 1..]);
        }
        i += 1;
    }
    (s, None, "")
}

/// Drops the backslash of each `\x` escape.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(n) => out.push(n),
                None => out.push(c),
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Escapes, with a backslash, each of `special` and each backslash.
fn escape(s: &str, special: &[char]) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '\\' || special.contains(&c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// What is escaped in pool, namespace, image and snapshot names.
const NAME: &[char] = &[':', '@', '/'];
/// What is escaped in option names.
const KEY: &[char] = &[':', '='];
/// What is escaped in option values.
const VALUE: &[char] = &[':'];

impl RbdSpec {
    /// Parses `rbd:POOL/[NAMESPACE/]IMAGE[@SNAPSHOT][:OPTION=VALUE...]`.
    pub fn parse(spec: &str) -> Result<RbdSpec, RbdSpecError> {
        let err = |reason| RbdSpecError {
            spec: spec.to_owned(),
            reason,
        };
        let rest = spec
            .strip_prefix("rbd:")
            .ok_or_else(|| err("it does not start with rbd:"))?;
        let (location, _, mut options) = split_unescaped(rest, b":");
        let (pool, slash, path) = split_unescaped(location, b"/");
        if slash.is_none() {
            return Err(err("expected POOL/IMAGE"));
        }
        let (path, at, snapshot) = split_unescaped(path, b"@");
        let (first, slash, second) = split_unescaped(path, b"/");
        let (namespace, image) = if slash.is_some() {
            if split_unescaped(second, b"/").1.is_some() {
                return Err(err("too many / in POOL/NAMESPACE/IMAGE"));
            }
            (first, second)
        } else {
            ("", first)
        };
        let mut out = RbdSpec {
            pool: unescape(pool),
            namespace: unescape(namespace),
            image: unescape(image),
            snapshot: at.map(|_| unescape(snapshot)),
            ..RbdSpec::default()
        };
        if out.pool.is_empty() {
            return Err(err("the pool name is empty"));
        }
        if out.image.is_empty() {
            return Err(err("the image name is empty"));
        }
        if out.snapshot.as_deref() == Some("") {
            return Err(err("the snapshot name is empty"));
        }
        if [&out.pool, &out.namespace, &out.image].iter().any(|s| s.contains('\0'))
            || out.snapshot.as_deref().is_some_and(|s| s.contains('\0'))
        {
            return Err(err("names cannot contain NUL"));
        }
        while !options.is_empty() {
            let (pair, _, next) = split_unescaped(options, b":");
            options = next;
            let (key, eq, value) = split_unescaped(pair, b"=");
            if eq.is_none() {
                return Err(err("an option has no =VALUE"));
            }
            let (key, value) = (unescape(key), unescape(value));
            if key.is_empty() {
                return Err(err("an option has an empty name"));
            }
            if key.contains('\0') || value.contains('\0') {
                return Err(err("options cannot contain NUL"));
            }
            match key.as_str() {
                "conf" => out.conf = Some(value),
                "id" => out.user = Some(value),
                _ => out.options.push((key, value)),
            }
        }
        Ok(out)
    }

    /// The image's name without options: `POOL/[NAMESPACE/]IMAGE[@SNAP]`.
    pub fn image_path(&self) -> String {
        let mut s = escape(&self.pool, NAME);
        s.push('/');
        if !self.namespace.is_empty() {
            s.push_str(&escape(&self.namespace, NAME));
            s.push('/');
        }
        s.push_str(&escape(&self.image, NAME));
        if let Some(snap) = &self.snapshot {
            s.push('@');
            s.push_str(&escape(snap, NAME));
        }
        s
    }

    /// Whether two names connect to the cluster the same way (same
    /// configuration file, user and options), so they can share one
    /// connection.
    pub fn same_connection(&self, other: &RbdSpec) -> bool {
        self.conf == other.conf && self.user == other.user && self.options == other.options
    }
}

impl fmt::Display for RbdSpec {
    /// The name in QEMU's syntax (options included).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rbd:{}", self.image_path())?;
        if let Some(c) = &self.conf {
            write!(f, ":conf={}", escape(c, VALUE))?;
        }
        if let Some(u) = &self.user {
            write!(f, ":id={}", escape(u, VALUE))?;
        }
        for (k, v) in &self.options {
            write!(f, ":{}={}", escape(k, KEY), escape(v, VALUE))?;
        }
        Ok(())
    }
}

impl std::str::FromStr for RbdSpec {
    type Err = RbdSpecError;
    fn from_str(s: &str) -> Result<RbdSpec, RbdSpecError> {
        RbdSpec::parse(s)
    }
}

/// Adds what was being done to an error, keeping its errno.
fn context(e: io::Error, what: impl fmt::Display) -> io::Error {
    match e.raw_os_error() {
        Some(n) => io::Error::new(
            e.kind(),
            format!("{what}: {} (errno {n})", io::Error::from_raw_os_error(n)),
        ),
        None => io::Error::new(e.kind(), format!("{what}: {e}")),
    }
}

/// A connection to a Ceph cluster, shared by the images opened through it.
#[derive(Clone)]
pub struct RbdCluster {
    cluster: Arc<ffi::Cluster>,
    spec: RbdSpec,
    /// `rados_osd_op_timeout` (`None`: wait forever).
    op_timeout: Option<Duration>,
}

impl fmt::Debug for RbdCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RbdCluster")
            .field("conf", &self.spec.conf)
            .field("user", &self.spec.user)
            .finish()
    }
}

impl RbdCluster {
    /// Connects the way `spec` says (its `conf`, `id` and options; the
    /// image part is ignored). Blocks until the monitors answer (or
    /// `client_mount_timeout` passes).
    pub fn connect(spec: &RbdSpec) -> io::Result<RbdCluster> {
        let cluster =
            ffi::Cluster::create(spec.user.as_deref()).map_err(|e| context(e, "cannot create a Ceph client"))?;
        match &spec.conf {
            Some(path) => cluster
                .read_conf_file(Some(path))
                .map_err(|e| context(e, format_args!("cannot read Ceph configuration {path}")))?,
            // Like QEMU: Ceph's default locations, if there is a file.
            None => {
                let _ = cluster.read_conf_file(None);
            }
        }
        for option in ["rados_osd_op_timeout", "rados_mon_op_timeout"] {
            if cluster.get(option).is_ok_and(|v| v.trim() == "0") {
                cluster
                    .set(option, &DEFAULT_OP_TIMEOUT_SECS.to_string())
                    .map_err(|e| context(e, format_args!("cannot set {option}")))?;
            }
        }
        for (key, value) in &spec.options {
            cluster
                .set(key, value)
                .map_err(|e| context(e, format_args!("invalid Ceph option {key}={value}")))?;
        }
        cluster
            .connect()
            .map_err(|e| context(e, "cannot connect to the Ceph cluster"))?;
        let op_timeout = cluster
            .get("rados_osd_op_timeout")
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|&t| t > 0.0 && t < 1e9)
            .map(Duration::from_secs_f64);
        Ok(RbdCluster {
            cluster: Arc::new(cluster),
            op_timeout,
            spec: RbdSpec {
                conf: spec.conf.clone(),
                user: spec.user.clone(),
                options: spec.options.clone(),
                ..RbdSpec::default()
            },
        })
    }

    /// Whether `spec` connects the way this connection was made.
    pub fn serves(&self, spec: &RbdSpec) -> bool {
        self.spec.same_connection(spec)
    }
}

/// Opens images, sharing one cluster connection between the images whose
/// names connect the same way ([`RbdSpec::same_connection`]).
#[derive(Debug, Default)]
pub struct RbdConnections {
    clusters: Vec<RbdCluster>,
}

impl RbdConnections {
    /// No connections yet.
    pub fn new() -> RbdConnections {
        RbdConnections::default()
    }

    /// Opens the image `spec` names (read-only if `read_only` or a
    /// snapshot), connecting to its cluster unless already connected.
    pub fn open(&mut self, spec: &RbdSpec, read_only: bool) -> io::Result<RbdStorage> {
        let cluster = match self.clusters.iter().find(|c| c.serves(spec)) {
            Some(c) => c.clone(),
            None => {
                let c = RbdCluster::connect(spec)?;
                self.clusters.push(c.clone());
                c
            }
        };
        RbdStorage::open(&cluster, spec, read_only)
    }
}

/// One block-status query for the helper threads.
struct StatusJob {
    offset: u64,
    length: u64,
    key: tracker::Key,
}

/// An RBD image served as an NBD export.
pub struct RbdStorage {
    inner: Arc<Inner>,
    tracker: Arc<Tracker>,
    /// Block-status queries, started with the first one.
    status: OnceLock<StatusPool>,
}

struct Inner {
    image: ffi::Image,
    info: ffi::ImageInfo,
    read_only: bool,
    name: String,
    /// Counts the writes (WRITE, TRIM, WRITE_ZEROES) librbd finished
    /// successfully, each before it is answered. Failed writes are not
    /// counted: FLUSH makes no promise about their data.
    written: AtomicU64,
    /// The value of `written` when the last successful flush began: while
    /// `written` still has it, nothing was written since and a FLUSH has
    /// nothing to do.
    flushed: AtomicU64,
}

impl Inner {
    /// Notes that librbd finished a write successfully.
    fn wrote(&self) {
        self.written.fetch_add(1, Ordering::SeqCst);
    }
}

impl fmt::Debug for RbdStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RbdStorage")
            .field("image", &self.inner.name)
            .field("size", &self.inner.info.size)
            .field("read_only", &self.inner.read_only)
            .finish()
    }
}

impl RbdStorage {
    /// Opens the image `spec` names through `cluster` (read-only if
    /// `read_only` or a snapshot is named).
    pub fn open(cluster: &RbdCluster, spec: &RbdSpec, read_only: bool) -> io::Result<RbdStorage> {
        let read_only = read_only || spec.snapshot.is_some();
        let name = spec.image_path();
        let ioctx = ffi::IoCtx::new(&cluster.cluster, &spec.pool, &spec.namespace)
            .map_err(|e| context(e, format_args!("cannot open pool {:?}", spec.pool)))?;
        let ioctx = Arc::new(ioctx);
        let image = ffi::Image::open(&ioctx, &spec.image, spec.snapshot.as_deref(), read_only)
            .map_err(|e| context(e, format_args!("cannot open RBD image {name}")))?;
        let info = image
            .info()
            .map_err(|e| context(e, format_args!("cannot stat RBD image {name}")))?;
        let header = image.header_oid(&spec.image);
        let deadline = cluster.op_timeout.map(|t| t * DEADLINE_FACTOR);
        let tracker = Arc::new(Tracker::new(name.clone(), deadline));
        start_monitor(&tracker, ioctx, header, name.clone())?;
        Ok(RbdStorage {
            inner: Arc::new(Inner {
                image,
                info,
                read_only,
                name,
                written: AtomicU64::new(0),
                flushed: AtomicU64::new(0),
            }),
            tracker,
            status: OnceLock::new(),
        })
    }

    /// Connects to the cluster and opens the image `spec` names; see
    /// [`RbdConnections`] to share connections between images.
    pub fn open_spec(spec: &RbdSpec, read_only: bool) -> io::Result<RbdStorage> {
        RbdStorage::open(&RbdCluster::connect(spec)?, spec, read_only)
    }

    /// The image's name (`POOL/[NAMESPACE/]IMAGE[@SNAP]`).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The size of the image's objects in bytes.
    pub fn object_size(&self) -> u64 {
        self.inner.info.object_size
    }

    /// Flushes every completed write, blocking until they are durable
    /// (dropping the storage does this too, and closes the image). Refused
    /// when the image was removed or librbd holds requests it never
    /// finished: the flush would wait for them forever.
    pub fn flush_blocking(&self) -> io::Result<()> {
        if self.tracker.stuck() {
            return Err(io::Error::other(format!(
                "{}: not flushed: the image was removed or requests to it never finished",
                self.inner.name
            )));
        }
        self.inner.image.flush()
    }

    fn writable_range(&self, offset: u64, length: u64) -> io::Result<()> {
        if self.inner.read_only {
            return Err(crate::errno_error(libc::EROFS));
        }
        check_range(self.inner.info.size, offset, length)
    }

    /// Tracks a request; `None` when it was answered already (the export
    /// is dead).
    fn begin(&self, done: Completion) -> Option<tracker::Key> {
        match self.tracker.begin(done) {
            Ok(key) => Some(key),
            Err(done) => {
                done.complete(Err(self.tracker.refusal()));
                None
            }
        }
    }

    /// A closure that answers request `key` with librbd's result.
    fn finisher(&self, key: tracker::Key) -> impl FnOnce(io::Result<()>) + Send + 'static {
        let tracker = self.tracker.clone();
        move |r| {
            if let Some(done) = tracker.end(key) {
                done.complete(r);
            }
        }
    }

    /// [`RbdStorage::finisher`] for a request that changes the image:
    /// counted as a write (see `Inner::written`) if librbd finishes it
    /// successfully.
    fn write_finisher(&self, key: tracker::Key) -> impl FnOnce(io::Result<()>) + Send + 'static {
        let (inner, finish) = (self.inner.clone(), self.finisher(key));
        move |r: io::Result<()>| {
            if r.is_ok() {
                inner.wrote();
            }
            finish(r);
        }
    }

    /// The helper threads' queue, started on first use.
    fn status_queue(&self) -> io::Result<&StatusPool> {
        if let Some(q) = self.status.get() {
            return Ok(q);
        }
        let (tx, rx) = channel::<StatusJob>();
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::new();
        for i in 0..STATUS_THREADS {
            let (inner, tracker, rx) = (self.inner.clone(), self.tracker.clone(), rx.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("rbd-status-{i}"))
                    .spawn(move || status_thread(&inner, &tracker, &rx))?,
            );
        }
        let pool = StatusPool {
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(threads),
        };
        // Another caller may have won the race: its pool is used and this
        // one's threads end when `pool` is dropped.
        Ok(self.status.get_or_init(|| pool))
    }
}

/// The block-status helper threads of one export.
struct StatusPool {
    tx: Mutex<Option<Sender<StatusJob>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl StatusPool {
    /// Closes the queue without waiting for the threads.
    fn detach(self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Ok(mut threads) = self.threads.lock() {
            threads.clear();
        }
    }
}

impl Drop for StatusPool {
    fn drop(&mut self) {
        // Closing the queue ends the threads; once they are gone, nothing
        // but the storage holds the image.
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Ok(mut threads) = self.threads.lock() {
            for t in threads.drain(..) {
                let _ = t.join();
            }
        }
    }
}

impl Drop for RbdStorage {
    /// Closes the image (`rbd_close` flushes librbd's cache and releases
    /// the exclusive lock, so another server can take the image over at
    /// once), waiting for the requests in flight; unless the image was
    /// removed or librbd holds requests it never finished, which
    /// `rbd_close` would wait for forever: then the image is left open.
    fn drop(&mut self) {
        self.tracker.close();
        let stuck = self.tracker.stuck();
        // The helper threads hold the image too: they end first.
        if let Some(pool) = self.status.take() {
            if stuck { pool.detach() } else { drop(pool) }
        }
        if stuck {
            // librbd holds requests it may never finish (the image was
            // removed, or the cluster stopped answering): rbd_close would
            // wait for them forever, so the image is left open.
            std::mem::forget(self.inner.clone());
        }
    }
}

/// Requests unanswered for this many times `rados_osd_op_timeout` are
/// answered with `ETIMEDOUT` by the server itself. librbd answers most of
/// them with its own `ETIMEDOUT` before; not those waiting for the
/// exclusive lock, which librbd takes only once its watch on the image is
/// registered again, and retries that forever.
pub const DEADLINE_FACTOR: u32 = 2;

/// Starts the thread that watches the export's requests in flight and
/// checks that the image (its header object) still exists.
fn start_monitor(tracker: &Arc<Tracker>, ioctx: Arc<ffi::IoCtx>, header: String, name: String) -> io::Result<()> {
    let t = tracker.clone();
    let checking = Arc::new(AtomicBool::new(false));
    std::thread::Builder::new().name("rbd-monitor".into()).spawn(move || {
        t.monitor(|| {
            // One check at a time, on its own thread: with an OSD down it
            // blocks until rados_osd_op_timeout.
            if checking.swap(true, Ordering::SeqCst) {
                return;
            }
            let (t, ioctx, header, name, flag) =
                (t.clone(), ioctx.clone(), header.clone(), name.clone(), checking.clone());
            let spawned = std::thread::Builder::new().name("rbd-check".into()).spawn(move || {
                if let Ok(false) = ioctx.exists(&header) {
                    t.kill(format!("RBD image {name} was removed"));
                }
                flag.store(false, Ordering::SeqCst);
            });
            if spawned.is_err() {
                checking.store(false, Ordering::SeqCst);
            }
        });
    })?;
    Ok(())
}

fn status_thread(inner: &Inner, tracker: &Tracker, rx: &Mutex<Receiver<StatusJob>>) {
    let mut extents = Vec::new();
    loop {
        let job = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(StatusJob { offset, length, key }) = job else {
            return;
        };
        extents.clear();
        let r = inner.block_status(offset, length, &mut extents);
        if let Some(done) = tracker.end(key) {
            done.complete_status(&extents, r);
        }
    }
}

impl Inner {
    /// The allocation of `offset..offset + length` (clamped to the image and
    /// to a bounded number of objects) as extents.
    fn block_status(&self, offset: u64, length: u64, out: &mut Vec<Extent>) -> io::Result<()> {
        let info = &self.info;
        let length = clamp_status_range(info.size, offset, length)?;
        let object = info.object_size.max(1);
        let flags = self.image.flags()?;
        let fast = info.features & ffi::RBD_FEATURE_FAST_DIFF != 0 && flags & ffi::RBD_FLAG_FAST_DIFF_INVALID == 0;
        let default_striping = info.features & ffi::RBD_FEATURE_STRIPINGV2 == 0
            || (info.stripe_unit == info.object_size && info.stripe_count == 1);
        let objects = if fast { FAST_STATUS_OBJECTS } else { SLOW_STATUS_OBJECTS };
        let end = offset.saturating_add(length.min(objects.saturating_mul(object)));
        // With whole objects the query starts at an object boundary (librbd
        // reports whole objects anyway, and older librbd got unaligned
        // fast-diff offsets wrong).
        let start = if default_striping {
            offset - offset % object
        } else {
            offset
        };
        let first = out.len();
        let mut cursor = offset;
        self.image
            .diff_iterate(start, end - start, default_striping, &mut |off, len, exists| {
                let (a, b) = (off.max(cursor), off.saturating_add(len).min(end));
                if a >= b {
                    return off < end;
                }
                push_extent(out, first, Extent::hole(a - cursor));
                let e = if exists {
                    Extent::data(b - a)
                } else {
                    Extent::hole(b - a)
                };
                push_extent(out, first, e);
                cursor = b;
                b < end
            })?;
        push_extent(out, first, Extent::hole(end - cursor));
        Ok(())
    }
}

impl AsyncStorage for RbdStorage {
    fn size(&self) -> u64 {
        self.inner.info.size
    }

    fn capabilities(&self) -> Capabilities {
        let rw = !self.inner.read_only;
        Capabilities {
            read_only: self.inner.read_only,
            can_flush: true,
            can_fua: rw,
            can_trim: rw,
            can_zero: rw,
            can_fast_zero: rw,
            can_cache: false,
            can_multi_conn: true,
            rotational: false,
            block_size: None,
        }
    }

    fn read(&self, offset: u64, buf: Vec<u8>, done: Completion) {
        if let Err(e) = check_range(self.inner.info.size, offset, buf.len() as u64) {
            return done.complete_read(buf, Err(e));
        }
        let key = match self.tracker.begin(done) {
            Ok(key) => key,
            Err(done) => return done.complete_read(buf, Err(self.tracker.refusal())),
        };
        let tracker = self.tracker.clone();
        self.inner.image.aio_read(offset, buf, move |buf, r| {
            // Answered already (past the deadline): the buffer is dropped.
            if let Some(done) = tracker.end(key) {
                done.complete_read(buf, r);
            }
        });
    }

    fn write(&self, offset: u64, buf: Vec<u8>, fua: bool, done: Completion) {
        if let Err(e) = self.writable_range(offset, buf.len() as u64) {
            return done.complete_write(buf, Err(e));
        }
        let key = match self.tracker.begin(done) {
            Ok(key) => key,
            Err(done) => return done.complete_write(buf, Err(self.tracker.refusal())),
        };
        let (tracker, inner) = (self.tracker.clone(), self.inner.clone());
        self.inner.image.aio_write(offset, buf, fua, move |buf, r| {
            if r.is_ok() {
                inner.wrote();
            }
            if let Some(done) = tracker.end(key) {
                done.complete_write(buf, r);
            }
        });
    }

    fn flush(&self, done: Completion) {
        // Tracked like any request, so that a dead export refuses it.
        let Some(key) = self.begin(done) else {
            return;
        };
        // Nothing written successfully since the last successful flush (or
        // since the image was opened): nothing to make durable. librbd
        // would take the exclusive lock first, which with an OSD down can
        // wait until the server gives up on the request (twice the OSD
        // timeout).
        let written = self.inner.written.load(Ordering::SeqCst);
        if self.inner.flushed.load(Ordering::SeqCst) == written {
            if let Some(done) = self.tracker.end(key) {
                done.complete(Ok(()));
            }
            return;
        }
        if self.tracker.abandoned() {
            // librbd's flush would wait for requests it has not finished
            // within the deadline (with an OSD down, writes waiting for the
            // exclusive lock): fail now rather than at the deadline again.
            if let Some(done) = self.tracker.end(key) {
                done.complete(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{}: not flushed: the Ceph cluster has not finished earlier requests",
                        self.inner.name
                    ),
                )));
            }
            return;
        }
        let (inner, finish) = (self.inner.clone(), self.finisher(key));
        self.inner.image.aio_flush(move |r| {
            if r.is_ok() {
                // Flushes may finish out of order: keep the latest.
                inner.flushed.fetch_max(written, Ordering::SeqCst);
            }
            finish(r);
        });
    }

    fn trim(&self, offset: u64, length: u64, fua: bool, done: Completion) {
        if let Err(e) = self.writable_range(offset, length) {
            return done.complete(Err(e));
        }
        if length == 0 {
            return done.complete(Ok(()));
        }
        if let Some(key) = self.begin(done) {
            self.inner
                .image
                .aio_discard(offset, length, fua, self.write_finisher(key));
        }
    }

    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags, done: Completion) {
        if let Err(e) = self.writable_range(offset, length) {
            return done.complete(Err(e));
        }
        if flags.fast && flags.no_hole {
            // Keeping the range allocated means writing zeroes: no faster
            // than the client writing them.
            return done.complete(Err(crate::fast_zero_unsupported()));
        }
        if length == 0 {
            return done.complete(Ok(()));
        }
        let Ok(len) = usize::try_from(length) else {
            return done.complete(Err(crate::errno_error(libc::EINVAL)));
        };
        if let Some(key) = self.begin(done) {
            self.inner
                .image
                .aio_write_zeroes(offset, len, flags.no_hole, flags.fua, self.write_finisher(key));
        }
    }

    fn block_status(&self, offset: u64, length: u64, done: Completion) {
        if let Err(e) = clamp_status_range(self.inner.info.size, offset, length) {
            return done.complete_status(&[], Err(e));
        }
        let queue = match self.status_queue() {
            Ok(q) => q,
            Err(e) => return done.complete_status(&[], Err(e)),
        };
        let Some(key) = self.begin(done) else {
            return;
        };
        let sent = match queue.tx.lock() {
            Ok(tx) => tx
                .as_ref()
                .is_some_and(|tx| tx.send(StatusJob { offset, length, key }).is_ok()),
            Err(_) => false,
        };
        if sent {
            return;
        }
        if let Some(done) = self.tracker.end(key) {
            done.complete_status(&[], Err(io::Error::other("block-status threads are gone")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(pool: &str, ns: &str, image: &str, snap: Option<&str>) -> RbdSpec {
        RbdSpec {
            pool: pool.into(),
            namespace: ns.into(),
            image: image.into(),
            snapshot: snap.map(Into::into),
            ..RbdSpec::default()
        }
    }

    #[test]
    fn parses_qemu_names() {
        assert_eq!(RbdSpec::parse("rbd:p/i").unwrap(), spec("p", "", "i", None));
        assert_eq!(RbdSpec::parse("rbd:p/i@s").unwrap(), spec("p", "", "i", Some("s")));
        assert_eq!(RbdSpec::parse("rbd:p/ns/i@s").unwrap(), spec("p", "ns", "i", Some("s")));
        let full = RbdSpec::parse("rbd:pool/img@snap:conf=/etc/c.conf:id=nbd:rbd_cache=false").unwrap();
        assert_eq!(full.conf.as_deref(), Some("/etc/c.conf"));
        assert_eq!(full.user.as_deref(), Some("nbd"));
        assert_eq!(full.options, vec![("rbd_cache".to_string(), "false".to_string())]);
        assert_eq!(full.snapshot.as_deref(), Some("snap"));
        // Escapes: a ':' in a value, an '@' in an image name.
        let e = RbdSpec::parse(r"rbd:p/a\@b:mon_host=127.0.0.1\:3300").unwrap();
        assert_eq!(e.image, "a@b");
        assert_eq!(e.snapshot, None);
        assert_eq!(e.options, vec![("mon_host".to_string(), "127.0.0.1:3300".to_string())]);
        // An '@' in an option value is not a snapshot.
        let o = RbdSpec::parse("rbd:p/i:keyring=/k@x").unwrap();
        assert_eq!(o.snapshot, None);
        assert_eq!(o.options[0].1, "/k@x");
    }

    #[test]
    fn round_trips() {
        for s in [
            "rbd:p/i",
            "rbd:p/ns/i@s:conf=/c:id=u:a=b",
            r"rbd:p\:q/i\@j@s\/t:k\=x=v\:w@/=",
        ] {
            let parsed = RbdSpec::parse(s).unwrap();
            assert_eq!(parsed.to_string(), s);
            assert_eq!(RbdSpec::parse(&parsed.to_string()).unwrap(), parsed);
        }
    }

    #[test]
    fn rejects_bad_names() {
        for s in [
            "p/i",
            "rbd:",
            "rbd:p",
            "rbd:/i",
            "rbd:p/",
            "rbd:p/i@",
            "rbd:p/ns/",
            "rbd:p/a/b/c",
            "rbd:p/i:novalue",
            "rbd:p/i:=v",
        ] {
            assert!(RbdSpec::parse(s).is_err(), "{s} accepted");
        }
    }

    #[test]
    fn connections_are_shared_by_equal_options() {
        let a = RbdSpec::parse("rbd:p/a:conf=/c").unwrap();
        let b = RbdSpec::parse("rbd:q/b@s:conf=/c").unwrap();
        let c = RbdSpec::parse("rbd:p/a:conf=/c:id=x").unwrap();
        assert!(a.same_connection(&b));
        assert!(!a.same_connection(&c));
    }
}
