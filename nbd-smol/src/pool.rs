//! Multi-conn: several connections to one export behind one handle.
//!
//! When the server advertises `NBD_FLAG_CAN_MULTI_CONN`, the effects of
//! FLUSH (and FUA) on one connection are visible on all of them, so
//! requests can be spread over several connections. [`Pool::flush`] still
//! sends FLUSH on every connection, as libnbd does, so that a flush covers
//! the writes completed on each of them whatever the server's cache.

use std::sync::atomic::{AtomicUsize, Ordering};

use nbd_proto::client::{ClientConfig, Negotiated};
use nbd_proto::uri::NbdUri;
use nbd_proto::wire::{CommandFlags, TransmissionFlags};

use crate::client::{BlockStatus, Client, ConnectOptions, Error, Result, StatsSnapshot};
use crate::tls::LazyClientTls;

/// A pool of connections to one export.
///
/// ```no_run
/// # smol::block_on(async {
/// use nbd_smol::{ClientConfig, NbdUri, Pool};
///
/// let uri = NbdUri::parse("nbd://localhost/disk")?;
/// // Four connections if the server allows multi-conn, 32 requests each.
/// let config = ClientConfig::default().max_in_flight(32);
/// let pool = Pool::connect(&uri, config, 4).await?;
/// let (r, buf) = pool.read(vec![0u8; 1 << 20], 0).await;
/// r?;
/// pool.flush().await?;
/// pool.disconnect().await?;
/// # Ok::<(), nbd_smol::Error>(())
/// # });
/// ```
#[derive(Debug)]
pub struct Pool {
    clients: Vec<Client>,
    next: AtomicUsize,
}

impl Pool {
    /// Opens `connections` connections (just one if the server does not
    /// advertise multi-conn), each with `config.max_in_flight` requests.
    pub async fn connect(uri: &NbdUri, config: ClientConfig, connections: usize) -> Result<Pool> {
        Self::connect_with(uri, config, connections, &ConnectOptions::default()).await
    }

    /// [`Pool::connect`] with deadlines and reconnection for every
    /// connection (each reconnects on its own; see
    /// [`nbd_net::resilience`]).
    pub async fn connect_with(
        uri: &NbdUri,
        config: ClientConfig,
        connections: usize,
        opts: &ConnectOptions,
    ) -> Result<Pool> {
        // One set of TLS credentials: read once, one session cache.
        let opts = opts.clone().tls(Some(match &opts.tls {
            Some(t) => t.clone(),
            None => LazyClientTls::from_uri(uri)?,
        }));
        let first = Client::connect_with(uri, config.clone(), &opts).await?;
        let mut clients = vec![first];
        let multi = clients[0].flags().contains(TransmissionFlags::CAN_MULTI_CONN);
        if multi {
            let more = (1..connections.max(1)).map(|_| Client::connect_with(uri, config.clone(), &opts));
            for c in join_all(more).await {
                clients.push(c?);
            }
        }
        Ok(Pool {
            clients,
            next: AtomicUsize::new(0),
        })
    }

    /// A pool over connections opened elsewhere (all to the same export);
    /// `None` if `clients` is empty.
    pub fn from_clients(clients: Vec<Client>) -> Option<Pool> {
        if clients.is_empty() {
            return None;
        }
        Some(Pool {
            clients,
            next: AtomicUsize::new(0),
        })
    }

    /// The connections.
    pub fn clients(&self) -> &[Client] {
        &self.clients
    }

    /// What the first connection negotiated.
    pub fn negotiated(&self) -> &Negotiated {
        self.clients[0].negotiated()
    }

    /// Export size.
    pub fn size(&self) -> u64 {
        self.clients[0].size()
    }

    /// Transmission flags.
    pub fn flags(&self) -> TransmissionFlags {
        self.clients[0].flags()
    }

    /// The counters of every connection, added up.
    pub fn stats(&self) -> StatsSnapshot {
        self.clients
            .iter()
            .fold(StatsSnapshot::default(), |sum, c| sum + c.stats())
    }

    /// The next connection, round robin.
    pub fn pick(&self) -> &Client {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        &self.clients[i]
    }

    /// Reads `buf.len()` bytes at `offset` on one of the connections.
    pub async fn read(&self, buf: Vec<u8>, offset: u64) -> (Result<()>, Vec<u8>) {
        self.pick().read(buf, offset).await
    }

    /// Writes `buf` at `offset` on one of the connections.
    pub async fn write(&self, buf: Vec<u8>, offset: u64) -> (Result<()>, Vec<u8>) {
        self.pick().write(buf, offset).await
    }

    /// Writes zeroes on one of the connections.
    pub async fn write_zeroes(&self, offset: u64, length: u64, flags: CommandFlags) -> Result<()> {
        self.pick().write_zeroes(offset, length, flags).await
    }

    /// Trims on one of the connections.
    pub async fn trim(&self, offset: u64, length: u64, flags: CommandFlags) -> Result<()> {
        self.pick().trim(offset, length, flags).await
    }

    /// Block status on one of the connections.
    pub async fn block_status(&self, offset: u64, length: u64, flags: CommandFlags) -> Result<Vec<BlockStatus>> {
        self.pick().block_status(offset, length, flags).await
    }

    /// FLUSH on every connection (after the caller has seen the replies of
    /// the writes it wants covered, as the spec requires).
    pub async fn flush(&self) -> Result<()> {
        let mut first_err: Option<Error> = None;
        for r in join_all(self.clients.iter().map(|c| c.flush())).await {
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Disconnects every connection politely.
    pub async fn disconnect(&self) -> Result<()> {
        for r in join_all(self.clients.iter().map(|c| c.disconnect())).await {
            r?;
        }
        Ok(())
    }
}

/// Runs futures concurrently on the current task and collects their outputs.
async fn join_all<F: std::future::Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut futs: Vec<std::pin::Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    futures_lite::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in futs.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}
