//! Async NBD client and server over smol/async-io, driving `nbd_proto`.
//!
//! - [`client::Client`]: a multiplexed client; many tasks share one
//!   connection, requests are pipelined and replies matched by cookie.
//!   The same API as `nbd_blocking::Client`, with owned buffers given
//!   back with each result.
//! - [`client::Negotiation`]: option mode (list exports, ask about them,
//!   meta contexts, then go or abort).
//! - [`pool::Pool`]: several connections to one export (multi-conn).
//! - `server::Server` (feature `server`): an async server for many clients and several
//!   exports, serving from `nbd_storage`.
//! - `upstream::NbdStorage` (feature `server`): another NBD server's
//!   export as storage for the server (a proxy), with this client's
//!   deadlines and reconnection.
//! - [`tls`]: STARTTLS for both (feature `tls`) (futures-rustls over the connection's
//!   halves; credentials from `nbd_net`).
//!
//! Errors are [`nbd_net::Error`], the blocking client's too. See
//! [`client`] for the threads the client runs on.
//!
//! Cargo features (both on by default): `tls` (STARTTLS with
//! futures-rustls) and `server` (the server, with nbd-storage's
//! backends). An async client without TLS turns both off and compiles the
//! smol stack, nbd-proto and nbd-net only.
#![warn(missing_docs)]

pub mod client;
pub mod io;
pub mod pool;
#[cfg(feature = "server")]
pub mod server;
pub mod tls;
#[cfg(feature = "server")]
pub mod upstream;

pub use client::{BlockStatus, Client, Error, Negotiation, Result, Socket};
pub use nbd_proto::{client::ClientConfig, client::TlsMode, uri::NbdUri, wire::CommandFlags};
pub use pool::Pool;
pub use tls::LazyClientTls;

/// Runs a future to completion on the current thread. Connections and
/// client tasks run on smol's global executor, whose number of threads is
/// set by `SMOL_THREADS` (one by default; `nbd-serve --threads N` sets it
/// to N, and without the flag keeps the environment's value).
pub fn block_on<T>(fut: impl std::future::Future<Output = T>) -> T {
    smol::block_on(fut)
}
