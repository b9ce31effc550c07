//! Another NBD server as storage: [`NbdStorage`] serves an export of an
//! upstream NBD server (a proxy), through this crate's async [`Pool`], so
//! with its deadlines and its reconnection.
//!
//! With [`Reconnect`] on, a restart of the upstream server is invisible to
//! the clients of the proxy: requests in flight when the upstream broke are
//! sent again once it is back (see [`nbd_net::resilience`] for what is sent
//! again and what that promises), new ones wait for it meanwhile, and
//! neither the proxy's clients nor their connections see anything but a
//! pause. If the upstream stays away longer than the reconnect delay, the
//! requests waiting fail with `EIO` (never hang); the next request dials
//! again (at most once a second while the upstream stays unreachable), so
//! the proxy serves again once the upstream is back, provided it offers the
//! same export (same size).
//!
//! Every operation is started on smol's executor and reports its end
//! through the server's [`Completion`]: no thread waits on a request.
//!
//! What is served mirrors the upstream export: its size, and its
//! transmission flags as [`Capabilities`] (read-only, flush, FUA, trim,
//! write zeroes, fast zero, cache, multi-conn, rotational) and its
//! block-size constraints. Block status answers `base:allocation` from the
//! upstream's own; other metadata contexts of the upstream
//! (`qemu:dirty-bitmap:NAME`, `qemu:allocation-depth`) are not passed
//! through, because [`AsyncStorage`] answers `base:allocation` only.
//!
//! ```no_run
//! # nbd_smol::block_on(async {
//! use std::time::Duration;
//! use nbd_smol::NbdUri;
//! use nbd_smol::client::{ConnectOptions, Reconnect, Timeouts};
//! use nbd_smol::upstream::{NbdStorage, UpstreamOptions};
//!
//! let uri = NbdUri::parse("nbd+unix:///disk?socket=/tmp/upstream.sock")?;
//! let connect = ConnectOptions::default()
//!     .timeouts(Timeouts::default().connect(Some(Duration::from_secs(30))))
//!     .reconnect(Some(Reconnect::within(Duration::from_secs(60))));
//! let storage = NbdStorage::connect(&uri, UpstreamOptions::default().connect(connect)).await?;
//! // Serve it: nbd_server::Backend::Async(std::sync::Arc::new(storage)).
//! # Ok::<(), nbd_smol::Error>(())
//! # });
//! ```

use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nbd_proto::client::ClientConfig;
use nbd_proto::common::Mode;
use nbd_proto::uri::NbdUri;
use nbd_proto::wire::{
    AllocationFlags, BlockSizeConstraints, CONTEXT_BASE_ALLOCATION, CommandFlags, TransmissionFlags,
};
use nbd_storage::{
    AsyncStorage, Capabilities, Completion, Extent, ZeroFlags, check_range, errno_error, fast_zero_unsupported,
};

use crate::client::{ConnectOptions, Error, Reconnect};
use crate::pool::Pool;

/// How [`NbdStorage::connect`] connects to the upstream.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct UpstreamOptions {
    /// Deadlines, reconnection and TLS credentials of every connection.
    /// The default: no deadlines, and reconnection for up to 60 s.
    pub connect: ConnectOptions,
    /// Connections to open if the upstream allows multi-conn (default 4).
    pub connections: usize,
    /// Requests in flight on each connection (default 64).
    pub max_in_flight: usize,
    /// Serve the export read-only, whatever the upstream allows.
    pub read_only: bool,
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        UpstreamOptions {
            connect: ConnectOptions::default().reconnect(Some(Reconnect::within(Duration::from_secs(60)))),
            connections: 4,
            max_in_flight: 64,
            read_only: false,
        }
    }
}

impl UpstreamOptions {
    /// Sets the deadlines, reconnection and TLS credentials.
    pub fn connect(mut self, v: ConnectOptions) -> Self {
        self.connect = v;
        self
    }

    /// Sets the number of connections (used if the upstream allows
    /// multi-conn).
    pub fn connections(mut self, v: usize) -> Self {
        self.connections = v;
        self
    }

    /// Sets the number of requests in flight on each connection.
    pub fn max_in_flight(mut self, v: usize) -> Self {
        self.max_in_flight = v;
        self
    }

    /// Sets whether the export is served read-only.
    pub fn read_only(mut self, v: bool) -> Self {
        self.read_only = v;
        self
    }
}

/// An export of an upstream NBD server, served as [`AsyncStorage`]; see
/// the [module docs](self).
#[derive(Debug, Clone)]
pub struct NbdStorage {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    uri: NbdUri,
    config: ClientConfig,
    options: UpstreamOptions,
    size: u64,
    flags: TransmissionFlags,
    block_size: Option<BlockSizeConstraints>,
    name: String,
    description: Option<String>,
    /// Whether the upstream selected `base:allocation`.
    base_allocation: bool,
    /// The largest length of one TRIM, WRITE_ZEROES, CACHE or BLOCK_STATUS
    /// request to the upstream.
    max_length: u64,
    read_only: bool,
    pool: Mutex<Arc<Pool>>,
    /// Held while dialing again after the pool closed; the time and error
    /// of the last failed attempt.
    redial: smol::lock::Mutex<Option<(Instant, String)>>,
}

/// How long requests fail with the last error before dialing again, while
/// the upstream stays unreachable.
const REDIAL_INTERVAL: Duration = Duration::from_secs(1);

/// The `io::Error` a server turns into an NBD error: the upstream's errno
/// where there is one, `EIO` with the text otherwise.
fn io_error(e: Error) -> io::Error {
    match e.errno() {
        Some(errno) => io::Error::from_raw_os_error(errno),
        None => match e {
            Error::Request(_) => errno_error(libc::EINVAL),
            other => io::Error::other(UpstreamError(other.to_string())),
        },
    }
}

/// A failure of the upstream with no errno (servers answer it with `EIO`).
#[derive(Debug)]
struct UpstreamError(String);

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "upstream NBD server: {}", self.0)
    }
}

impl std::error::Error for UpstreamError {}

impl NbdStorage {
    /// Connects to the export `uri` names (its export name, TLS settings
    /// and credentials are the URI's).
    pub async fn connect(uri: &NbdUri, options: UpstreamOptions) -> Result<NbdStorage, Error> {
        let config = uri.client_config(
            ClientConfig::default()
                .meta_contexts(vec![CONTEXT_BASE_ALLOCATION.to_string()])
                .max_in_flight(options.max_in_flight.max(1)),
        );
        let pool = Pool::connect_with(uri, config.clone(), options.connections.max(1), &options.connect).await?;
        let n = pool.negotiated().clone();
        let min = u64::from(n.constraints().minimum.max(1));
        let max_length = if n.mode == Mode::Extended {
            1 << 62
        } else {
            // The largest 32-bit length aligned to the minimum block size.
            u64::from(u32::MAX) / min * min
        };
        let read_only = options.read_only || n.flags.contains(TransmissionFlags::READ_ONLY);
        Ok(NbdStorage {
            inner: Arc::new(Inner {
                uri: uri.clone(),
                config,
                size: n.size,
                flags: n.flags,
                block_size: n.block_size,
                name: n.export_name.clone(),
                description: n.description.clone(),
                base_allocation: n.context_id(CONTEXT_BASE_ALLOCATION).is_some(),
                max_length,
                read_only,
                options,
                pool: Mutex::new(Arc::new(pool)),
                redial: smol::lock::Mutex::new(None),
            }),
        })
    }

    /// The upstream's name of the export.
    pub fn export_name(&self) -> &str {
        &self.inner.name
    }

    /// The upstream's description of the export, if it sent one.
    pub fn description(&self) -> Option<&str> {
        self.inner.description.as_deref()
    }

    /// The upstream's transmission flags.
    pub fn upstream_flags(&self) -> TransmissionFlags {
        self.inner.flags
    }

    /// The connections in use now (a new pool after the upstream was
    /// dialled again), e.g. for their [`crate::client::StatsSnapshot`]s.
    pub fn pool(&self) -> Arc<Pool> {
        self.inner.current()
    }

    fn has(&self, flag: TransmissionFlags) -> bool {
        self.inner.flags.contains(flag)
    }

    /// Checks a modifying request: read-only (`EPERM`), range (`EINVAL`).
    fn writable(&self, offset: u64, length: u64) -> io::Result<()> {
        if self.inner.read_only {
            return Err(errno_error(libc::EPERM));
        }
        check_range(self.inner.size, offset, length)
    }

    /// Runs `op` on smol's executor with the pool.
    fn spawn<F, Fut>(&self, done: Completion, op: F)
    where
        F: FnOnce(Arc<Pool>, Arc<Inner>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = io::Result<()>> + Send + 'static,
    {
        let inner = self.inner.clone();
        smol::spawn(async move {
            let r = match inner.pool().await {
                Ok(pool) => op(pool, inner.clone()).await,
                Err(e) => Err(e),
            };
            done.complete(r);
        })
        .detach();
    }
}

impl Inner {
    fn current(&self) -> Arc<Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The pool, dialled again if it closed (the upstream stayed away
    /// longer than the reconnect delay, or reconnection is off).
    async fn pool(&self) -> io::Result<Arc<Pool>> {
        let closed = |p: &Pool| p.clients().iter().any(|c| c.is_closed());
        let pool = self.current();
        if !closed(&pool) {
            return Ok(pool);
        }
        let mut last = self.redial.lock().await;
        let pool = self.current();
        if !closed(&pool) {
            return Ok(pool);
        }
        if let Some((at, e)) = &*last
            && at.elapsed() < REDIAL_INTERVAL
        {
            return Err(io::Error::other(UpstreamError(e.clone())));
        }
        let dialled = Pool::connect_with(
            &self.uri,
            self.config.clone(),
            self.options.connections.max(1),
            &self.options.connect,
        )
        .await
        .map_err(|e| e.to_string())
        .and_then(|p| {
            let n = p.negotiated();
            if n.size != self.size {
                Err(format!(
                    "the export's size changed from {} to {} bytes",
                    self.size, n.size
                ))
            } else if n.flags.contains(TransmissionFlags::READ_ONLY) && !self.read_only {
                Err("the export became read-only".to_string())
            } else {
                Ok(p)
            }
        });
        match dialled {
            Ok(p) => {
                *last = None;
                let p = Arc::new(p);
                *self.pool.lock().unwrap_or_else(|p| p.into_inner()) = p.clone();
                Ok(p)
            }
            Err(e) => {
                *last = Some((Instant::now(), e.clone()));
                Err(io::Error::other(UpstreamError(e)))
            }
        }
    }

    /// Runs `op` on consecutive pieces of `offset..offset + length` no
    /// longer than one upstream request may be.
    async fn in_pieces<F, Fut>(&self, offset: u64, length: u64, mut op: F) -> io::Result<()>
    where
        F: FnMut(u64, u64) -> Fut,
        Fut: std::future::Future<Output = Result<(), Error>>,
    {
        let mut at = 0;
        while at < length {
            let n = (length - at).min(self.max_length);
            op(offset + at, n).await.map_err(io_error)?;
            at += n;
        }
        Ok(())
    }
}

impl AsyncStorage for NbdStorage {
    fn size(&self) -> u64 {
        self.inner.size
    }

    fn capabilities(&self) -> Capabilities {
        let rw = !self.inner.read_only;
        let f = |flag| self.has(flag);
        Capabilities::default()
            .read_only(self.inner.read_only)
            .can_flush(f(TransmissionFlags::SEND_FLUSH))
            .can_fua(rw && f(TransmissionFlags::SEND_FUA))
            .can_trim(rw && f(TransmissionFlags::SEND_TRIM))
            .can_zero(rw && f(TransmissionFlags::SEND_WRITE_ZEROES))
            .can_fast_zero(rw && f(TransmissionFlags::SEND_WRITE_ZEROES) && f(TransmissionFlags::SEND_FAST_ZERO))
            .can_cache(f(TransmissionFlags::SEND_CACHE))
            .can_multi_conn(f(TransmissionFlags::CAN_MULTI_CONN))
            .rotational(f(TransmissionFlags::ROTATIONAL))
            .block_size(self.inner.block_size)
    }

    fn read(&self, offset: u64, buf: Vec<u8>, done: Completion) {
        if let Err(e) = check_range(self.inner.size, offset, buf.len() as u64) {
            return done.complete_read(buf, Err(e));
        }
        let inner = self.inner.clone();
        smol::spawn(async move {
            match inner.pool().await {
                Ok(pool) => {
                    let (r, buf) = pool.read(buf, offset).await;
                    done.complete_read(buf, r.map_err(io_error));
                }
                Err(e) => done.complete_read(buf, Err(e)),
            }
        })
        .detach();
    }

    fn write(&self, offset: u64, buf: Vec<u8>, fua: bool, done: Completion) {
        if let Err(e) = self.writable(offset, buf.len() as u64) {
            return done.complete_write(buf, Err(e));
        }
        let flags = if fua && self.has(TransmissionFlags::SEND_FUA) {
            CommandFlags::FUA
        } else {
            CommandFlags::empty()
        };
        // Without FUA upstream, a flush after the write makes it durable.
        let flush = fua && flags.is_empty() && self.has(TransmissionFlags::SEND_FLUSH);
        let inner = self.inner.clone();
        smol::spawn(async move {
            match inner.pool().await {
                Ok(pool) => {
                    let (mut r, buf) = pool.pick().write_with(buf, offset, flags).await;
                    if r.is_ok() && flush {
                        r = pool.flush().await;
                    }
                    done.complete_write(buf, r.map_err(io_error));
                }
                Err(e) => done.complete_write(buf, Err(e)),
            }
        })
        .detach();
    }

    fn flush(&self, done: Completion) {
        if !self.has(TransmissionFlags::SEND_FLUSH) {
            return done.complete(Ok(()));
        }
        self.spawn(done, |pool, _| async move { pool.flush().await.map_err(io_error) });
    }

    fn trim(&self, offset: u64, length: u64, fua: bool, done: Completion) {
        if let Err(e) = self.writable(offset, length) {
            return done.complete(Err(e));
        }
        if length == 0 || !self.has(TransmissionFlags::SEND_TRIM) {
            // Trimming is advisory.
            return done.complete(Ok(()));
        }
        let flags = if fua && self.has(TransmissionFlags::SEND_FUA) {
            CommandFlags::FUA
        } else {
            CommandFlags::empty()
        };
        self.spawn(done, move |pool, inner| async move {
            let client = pool.pick().clone();
            inner
                .in_pieces(offset, length, |o, n| {
                    let client = client.clone();
                    async move { client.trim(o, n, flags).await }
                })
                .await
        });
    }

    fn write_zeroes(&self, offset: u64, length: u64, zf: ZeroFlags, done: Completion) {
        if let Err(e) = self.writable(offset, length) {
            return done.complete(Err(e));
        }
        let zeroes = self.has(TransmissionFlags::SEND_WRITE_ZEROES);
        if zf.fast && !(zeroes && self.has(TransmissionFlags::SEND_FAST_ZERO)) {
            return done.complete(Err(fast_zero_unsupported()));
        }
        if length == 0 {
            return done.complete(Ok(()));
        }
        let fua = self.has(TransmissionFlags::SEND_FUA);
        let mut flags = CommandFlags::empty();
        if zf.fua && fua && zeroes {
            flags |= CommandFlags::FUA;
        }
        if zf.no_hole {
            flags |= CommandFlags::NO_HOLE;
        }
        if zf.fast {
            flags |= CommandFlags::FAST_ZERO;
        }
        // Without FUA upstream (or written as plain zeroes), a flush
        // afterwards makes the zeroes durable.
        let flush = zf.fua && (!zeroes || !fua) && self.has(TransmissionFlags::SEND_FLUSH);
        self.spawn(done, move |pool, inner| async move {
            let client = pool.pick().clone();
            if zeroes {
                inner
                    .in_pieces(offset, length, |o, n| {
                        let client = client.clone();
                        async move { client.write_zeroes(o, n, flags).await }
                    })
                    .await?;
            } else {
                // No WRITE_ZEROES upstream: write buffers of zeroes.
                let chunk = length.min(nbd_storage::ZERO_CHUNK as u64) as usize;
                let mut buf = vec![0u8; chunk];
                let mut at = 0;
                while at < length {
                    let n = (length - at).min(chunk as u64) as usize;
                    buf.truncate(n);
                    let (r, b) = client.write(buf, offset + at).await;
                    r.map_err(io_error)?;
                    buf = b;
                    at += n as u64;
                }
            }
            if flush {
                pool.flush().await.map_err(io_error)?;
            }
            Ok(())
        });
    }

    fn cache(&self, offset: u64, length: u64, done: Completion) {
        if let Err(e) = check_range(self.inner.size, offset, length) {
            return done.complete(Err(e));
        }
        if length == 0 || !self.has(TransmissionFlags::SEND_CACHE) {
            return done.complete(Ok(()));
        }
        self.spawn(done, move |pool, inner| async move {
            let client = pool.pick().clone();
            inner
                .in_pieces(offset, length, |o, n| {
                    let client = client.clone();
                    async move { client.cache(o, n).await }
                })
                .await
        });
    }

    fn block_status(&self, offset: u64, length: u64, done: Completion) {
        let size = self.inner.size;
        if length == 0 || offset >= size {
            return done.complete_status(&[], Err(errno_error(libc::EINVAL)));
        }
        let length = length.min(size - offset).min(self.inner.max_length);
        if !self.inner.base_allocation {
            return done.complete_status(&[Extent::data(length)], Ok(()));
        }
        let inner = self.inner.clone();
        smol::spawn(async move {
            let r = match inner.pool().await {
                Ok(pool) => pool
                    .block_status(offset, length, CommandFlags::empty())
                    .await
                    .map_err(io_error),
                Err(e) => Err(e),
            };
            match r {
                Ok(statuses) => {
                    let extents = statuses
                        .iter()
                        .find(|s| s.context == CONTEXT_BASE_ALLOCATION)
                        .map(|s| allocation_extents(&s.extents, length))
                        .unwrap_or_default();
                    if extents.is_empty() {
                        done.complete_status(&[Extent::data(length)], Ok(()));
                    } else {
                        done.complete_status(&extents, Ok(()));
                    }
                }
                Err(e) => done.complete_status(&[], Err(e)),
            }
        })
        .detach();
    }
}

/// The upstream's `base:allocation` extents as nbd-storage's: clipped to
/// `length` bytes, adjacent equal ones merged.
fn allocation_extents(upstream: &[nbd_proto::client::Extent], length: u64) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::with_capacity(upstream.len());
    let mut total = 0u64;
    for e in upstream {
        if total >= length {
            break;
        }
        let n = e.length.min(length - total);
        if n == 0 {
            continue;
        }
        let flags = AllocationFlags::from_bits_truncate((e.flags & 0xffff_ffff) as u32);
        match out.last_mut() {
            Some(last) if last.flags == flags => last.length += n,
            _ => out.push(Extent { length: n, flags }),
        }
        total += n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbd_proto::client::Extent as Up;

    #[test]
    fn extents_are_clipped_and_merged() {
        let up = [
            Up { length: 10, flags: 0 },
            Up { length: 5, flags: 0 },
            Up { length: 20, flags: 3 },
            Up { length: 100, flags: 0 },
        ];
        assert_eq!(allocation_extents(&up, 30), vec![Extent::data(15), Extent::hole(15)]);
        assert_eq!(allocation_extents(&up, 7), vec![Extent::data(7)]);
        assert!(allocation_extents(&[], 7).is_empty());
    }

    /// A memory export behind our server, proxied by a second server
    /// through [`NbdStorage`]: every command reaches the upstream.
    #[test]
    fn proxies_every_command() {
        use crate::client::Client;
        use crate::server::{Listener, Server, ServerOptions};
        use nbd_server::Export;
        use nbd_storage::MemoryStorage;

        let dir = std::env::temp_dir().join(format!("nbd-smol-upstream-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (up_sock, px_sock) = (dir.join("up.sock"), dir.join("px.sock"));
        let size = 8 << 20;
        let memory = Arc::new(MemoryStorage::new(size));
        let upstream = Server::new(
            vec![Export::new("disk", "the upstream", memory.clone())],
            ServerOptions::default(),
        );
        let up_listener = Listener::bind_unix(&up_sock).unwrap();
        let up_task = smol::spawn({
            let upstream = upstream.clone();
            async move { upstream.serve(vec![up_listener]).await }
        });
        crate::block_on(async {
            let uri = NbdUri::parse(&format!("nbd+unix:///disk?socket={}", up_sock.display())).unwrap();
            let storage = NbdStorage::connect(&uri, UpstreamOptions::default()).await.unwrap();
            assert_eq!(storage.export_name(), "disk");
            assert_eq!(storage.description(), Some("the upstream"));
            assert_eq!(AsyncStorage::size(&storage), size);
            let caps = storage.capabilities();
            assert!(!caps.read_only && caps.can_trim && caps.can_zero && caps.can_flush);
            let proxy = Server::new(
                vec![Export::new_async("disk", "", Arc::new(storage))],
                ServerOptions::default(),
            );
            let px_listener = Listener::bind_unix(&px_sock).unwrap();
            let px_task = smol::spawn({
                let proxy = proxy.clone();
                async move { proxy.serve(vec![px_listener]).await }
            });
            let c = Client::connect(&format!("nbd+unix:///disk?socket={}", px_sock.display()))
                .await
                .unwrap();
            assert_eq!(c.size(), size);
            let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
            let (r, _) = c.write_with(data.clone(), 1 << 20, CommandFlags::FUA).await;
            r.unwrap();
            let mut direct = vec![0u8; data.len()];
            nbd_storage::Storage::read_at(&*memory, &mut direct, 1 << 20).unwrap();
            assert!(direct == data, "the write did not reach the upstream");
            let (r, back) = c.read(vec![0u8; data.len()], 1 << 20).await;
            r.unwrap();
            assert!(back == data);
            c.write_zeroes(2 << 20, 4096, CommandFlags::empty()).await.unwrap();
            let (r, back) = c.read(vec![1u8; 4096], 2 << 20).await;
            r.unwrap();
            assert!(back.iter().all(|&b| b == 0));
            c.trim(3 << 20, 1 << 20, CommandFlags::empty()).await.unwrap();
            c.flush().await.unwrap();
            c.cache(0, 4096).await.unwrap();
            let status = c.block_status(0, size, CommandFlags::empty()).await.unwrap();
            let base = status.iter().find(|s| s.context == CONTEXT_BASE_ALLOCATION).unwrap();
            // A hole first (nothing written below 1 MiB), data after.
            assert_eq!(base.extents[0].length, 1 << 20);
            assert_eq!(base.extents[0].flags & 1, 1, "{:?}", base.extents);
            assert_eq!(base.extents[1].flags & 1, 0, "{:?}", base.extents);
            // Out of range: refused, not passed on.
            let (r, _) = c.read(vec![0u8; 4096], size - 1).await;
            assert!(r.is_err());
            c.disconnect().await.unwrap();
            proxy.shutdown();
            let _ = px_task.await;
        });
        upstream.shutdown();
        let _ = crate::block_on(up_task);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn errors_keep_their_errno() {
        let e = io_error(Error::TimedOut {
            phase: crate::client::Phase::Request,
            after: Duration::from_secs(1),
        });
        assert_eq!(e.raw_os_error(), Some(libc::ETIMEDOUT));
        let e = io_error(Error::Disconnected("gone".into()));
        assert_eq!(e.raw_os_error(), None);
        assert!(e.to_string().contains("gone"), "{e}");
    }
}
