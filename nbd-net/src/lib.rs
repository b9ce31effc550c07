//! What the NBD runtimes (`nbd-blocking`, `nbd-smol`) share on the `std`
//! side of `nbd-proto`: TLS credentials ([`tls`], re-exported here) and the
//! servers' options ([`ServerOptions`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod server;
pub mod tls;

pub use server::ServerOptions;
pub use tls::*;
