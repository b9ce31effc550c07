//! Async NBD client and server over smol/async-io, driving `nbd_proto`.
//!
//! - [`client::Client`]: a multiplexed client; many tasks share one
//!   connection, requests are pipelined and replies matched by cookie.
//! - [`server::Server`]: an async server for many clients and several
//!   exports, serving from `nbd_storage`.
//! - [`tls`]: STARTTLS for both (futures-rustls over the connection's
//!   halves; credentials from `nbd_net`).
#![warn(missing_docs)]

pub mod client;
pub mod io;
pub mod pool;
pub mod server;
pub mod tls;

pub use client::Client;

/// Runs a future to completion on the current thread. Connections and
/// client tasks run on smol's global executor, whose number of threads is
/// set by `SMOL_THREADS` (one by default; `nbd-serve` sets one per CPU).
pub fn block_on<T>(fut: impl std::future::Future<Output = T>) -> T {
    smol::block_on(fut)
}
