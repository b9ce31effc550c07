//! What the NBD runtimes (`nbd-blocking`, `nbd-smol`) share on the `std`
//! side of `nbd-proto`: TLS credentials ([`tls`], re-exported here).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod tls;

pub use tls::*;
