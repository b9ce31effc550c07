//! What both servers (the blocking one and the async one) are configured
//! with.

#[cfg(feature = "tls")]
use std::sync::Arc;

use crate::Limits;
use nbd_proto::server::ServerConfig;

/// How a server behaves: negotiation ([`ServerConfig`], which also holds
/// the handshake timeout and the payload limit), resource limits, TLS.
#[derive(Debug, Clone)]
#[non_exhaustive]
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

/// Chainable setters, one per field (the struct is `#[non_exhaustive]`:
/// other crates build it from [`ServerOptions::default`]).
impl ServerOptions {
    /// Sets the negotiation settings.
    pub fn config(mut self, v: ServerConfig) -> Self {
        self.config = v;
        self
    }

    /// Sets the resource limits.
    pub fn limits(mut self, v: Limits) -> Self {
        self.limits = v;
        self
    }

    /// Sets the connections served at once.
    pub fn max_connections(mut self, v: usize) -> Self {
        self.max_connections = v;
        self
    }

    /// Sets whether to log each connection to stderr.
    pub fn verbose(mut self, v: bool) -> Self {
        self.verbose = v;
        self
    }

    /// Sets the TLS certificate and key.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, v: Option<Arc<rustls::ServerConfig>>) -> Self {
        self.tls = v;
        self
    }
}
