//! STARTTLS for the async client and server: the TLS handshake runs over
//! the two halves of a connection joined again ([`Duplex`]), and the TLS
//! stream is split into halves for the rest of the session. The rustls
//! configurations come from `nbd_net`, shared with the blocking runtime.

//!
//! Without the cargo feature `tls` only the credential types remain (see
//! `nbd_net::tls`): TLS is then refused with `TlsError::NotBuilt`.

#[cfg(feature = "tls")]
use std::io;
#[cfg(all(feature = "tls", feature = "server"))]
use std::sync::Arc;

#[cfg(feature = "tls")]
use futures_lite::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
#[cfg(all(feature = "tls", feature = "server"))]
use futures_rustls::TlsAcceptor;
#[cfg(feature = "tls")]
use futures_rustls::TlsConnector;
pub use nbd_net::{ClientTls, ClientTlsOptions, LazyClientTls, TlsError};
#[cfg(feature = "tls")]
pub use nbd_net::{ServerTlsOptions, rustls};

#[cfg(feature = "tls")]
use crate::io::Duplex;

/// A client's TLS session over the halves of a connection.
#[cfg(feature = "tls")]
pub type ClientStream<R, W> = futures_rustls::client::TlsStream<Duplex<R, W>>;
/// A server's TLS session over the halves of a connection.
#[cfg(all(feature = "tls", feature = "server"))]
pub type ServerStream<R, W> = futures_rustls::server::TlsStream<Duplex<R, W>>;

/// Runs the client side of a TLS handshake over `read` and `write` (right
/// after the server acknowledged `NBD_OPT_STARTTLS`) and returns the
/// session's halves.
#[cfg(feature = "tls")]
pub async fn connect<R, W>(
    read: R,
    write: W,
    tls: &ClientTls,
) -> io::Result<(ReadHalf<ClientStream<R, W>>, WriteHalf<ClientStream<R, W>>)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let connector = TlsConnector::from(tls.config().clone());
    let stream = connector
        .connect(tls.server_name().clone(), Duplex { read, write })
        .await?;
    Ok(futures_lite::io::split(stream))
}

/// Runs the server side of a TLS handshake over `read` and `write` (right
/// after the acknowledgement of `NBD_OPT_STARTTLS` went out) and returns
/// the session's halves.
#[cfg(all(feature = "tls", feature = "server"))]
pub async fn accept<R, W>(
    read: R,
    write: W,
    config: Arc<rustls::ServerConfig>,
) -> io::Result<(ReadHalf<ServerStream<R, W>>, WriteHalf<ServerStream<R, W>>)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let stream = TlsAcceptor::from(config).accept(Duplex { read, write }).await?;
    Ok(futures_lite::io::split(stream))
}
