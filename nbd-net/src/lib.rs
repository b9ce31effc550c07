//! What the NBD runtimes (`nbd-blocking`, `nbd-smol`) share on the `std`
//! side of `nbd-proto`: the client's error type and small helpers of
//! transmission ([`client`]; each runtime drives transmission's receive
//! side on the session itself), the one negotiation both clients
//! run over their own sockets (handshake, option mode, dialing and
//! redialing: [`negotiate`]), deadlines and reconnection
//! ([`resilience`]), connecting to the server a URI
//! names ([`socket`]), the clock that tells the sessions the time
//! ([`time`]) and TLS credentials ([`tls`], re-exported here).
//! It knows nothing of storage or of serving (the `nbd-server` crate).
//!
//! Cargo features: `tls` (on by default) builds the TLS credentials with
//! rustls; without it, TLS is refused with `TlsError::NotBuilt`
//! errors and rustls is not compiled.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod negotiate;
pub mod resilience;
pub mod socket;
pub mod time;
pub mod tls;

pub use client::{BlockStatus, Error, Result};
pub use resilience::{ConnectOptions, Reconnect, Stats, StatsSnapshot, Timeouts};
pub use socket::{Socket, connect};
pub use tls::*;
