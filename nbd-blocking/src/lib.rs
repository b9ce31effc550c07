//! Blocking NBD client and server over std sockets, driving `nbd_proto`.
//!
//! - [`client::Client`]: connect from an NBD URI, read, write, flush, trim,
//!   write zeroes, cache, block status, disconnect; `std::io` traits via
//!   [`client::Client::into_io`]. The same API as `nbd_smol::Client`, with
//!   borrowed buffers instead of owned ones.
//! - [`client::Negotiation`]: option mode, to list exports and ask about
//!   them before (or instead of) entering transmission.
//! - [`server::Server`]: a thread-per-connection server on the same
//!   state machines and storage as the async one.
//!
//! Both speak TLS (STARTTLS, rustls `StreamOwned`) with the credentials
//! `nbd_net` builds: the client from the URI (`nbds://`,
//! `tls-certificates=DIR`, ...), the server from
//! `server::ServerOptions::tls`. Errors are [`nbd_net::Error`], the
//! async client's too.
//!
//! Cargo features (both on by default): `tls` (STARTTLS with rustls) and
//! `server` (the server, with nbd-storage's backends). A simple client
//! tool turns both off and compiles nbd-proto, nbd-net and a handful of
//! small crates:
//!
//! ```toml
//! nbd-blocking = { version = "0.1", default-features = false }
//! ```
#![warn(missing_docs)]

pub mod client;
#[cfg(feature = "server")]
pub mod server;

pub use client::{BlockStatus, Client, ClientIo, Error, Negotiation, Result, Socket};
pub use nbd_net::LazyClientTls;
pub use nbd_proto::client::{ClientConfig, TlsMode};
pub use nbd_proto::uri::NbdUri;
pub use nbd_proto::wire::CommandFlags;
