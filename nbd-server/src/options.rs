//! What both servers (the blocking one and the async one) are configured
//! with.

#[cfg(feature = "tls")]
use std::sync::Arc;

use crate::Limits;
use nbd_proto::server::ServerConfig;

/// How a server behaves: negotiation ([`ServerConfig`], which also holds
/// the handshake timeout and the payload limit), resource limits, TLS.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Negotiation settings.
    pub config: ServerConfig,
    /// Requests in flight per connection, payload memory, I/O threads.
    pub limits: Limits,
    /// Connections served at once (default 1024); the async server leaves
    /// more in the listen queue, the blocking one closes them.
    pub max_connections: usize,
    /// Log each connection's negotiated mode and export to stderr.
    pub verbose: bool,
    /// The TLS certificate and key (see `nbd_net::ServerTlsOptions`),
    /// needed unless `config.tls` is
    /// [`TlsPolicy::NoTls`](nbd_proto::server::TlsPolicy::NoTls): without
    /// them a client's `NBD_OPT_STARTTLS` is acknowledged by the policy but
    /// the connection is then closed.
    #[cfg(feature = "tls")]
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            config: ServerConfig::default(),
            limits: Limits::default(),
            max_connections: 1024,
            verbose: false,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}
