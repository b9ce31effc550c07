//! What the NBD runtimes (`nbd-blocking`, `nbd-smol`) share on the `std`
//! side of `nbd-proto`: the client's error type and the I/O-free parts of
//! driving a client session ([`client`]), connecting to the server a URI
//! names ([`socket`]), TLS credentials ([`tls`], re-exported here) and the
//! servers' options ([`ServerOptions`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod server;
pub mod socket;
pub mod tls;

pub use client::{BlockStatus, Error, Result};
pub use server::ServerOptions;
pub use socket::{Socket, connect};
pub use tls::*;
