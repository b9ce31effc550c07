//! Socket plumbing shared by the client and the server.

use std::io;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_lite::io::{AsyncRead, AsyncWrite};
use smol::Async;

/// One half of a socket shared by reference: `&Async<T>` reads and writes
/// when `&T` does, so a reading task and a writing task need no lock.
pub struct SharedHalf<T>(pub Arc<Async<T>>);

impl<T> SharedHalf<T> {
    /// Two halves of one socket.
    pub fn pair(s: Async<T>) -> (SharedHalf<T>, SharedHalf<T>) {
        let a = Arc::new(s);
        (SharedHalf(a.clone()), SharedHalf(a))
    }
}

impl<T> AsyncRead for SharedHalf<T>
where
    for<'a> &'a T: io::Read,
{
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut &*self.0).poll_read(cx, buf)
    }
}

impl<T> AsyncWrite for SharedHalf<T>
where
    for<'a> &'a T: io::Write,
{
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut &*self.0).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut &*self.0).poll_write_vectored(cx, bufs)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut &*self.0).poll_flush(cx)
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut &*self.0).poll_close(cx)
    }
}

/// Writes a header and a payload with vectored writes until both are out.
pub async fn write_all_vectored<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    header: &[u8],
    payload: &[u8],
) -> io::Result<()> {
    let mut g = nbd_net::socket::Gather::new(header, payload);
    while !g.is_done() {
        let n = futures_lite::future::poll_fn(|cx| Pin::new(&mut *w).poll_write_vectored(cx, &g.slices())).await?;
        g.advance(n)?;
    }
    Ok(())
}

/// A reading half and a writing half joined into one stream, e.g. to run
/// TLS over a connection that was split for its handshake.
#[derive(Debug)]
pub struct Duplex<R, W> {
    /// The reading half.
    pub read: R,
    /// The writing half.
    pub write: W,
}

impl<R: AsyncRead + Unpin, W: Unpin> AsyncRead for Duplex<R, W> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().read).poll_read(cx, buf)
    }
}

impl<R: Unpin, W: AsyncWrite + Unpin> AsyncWrite for Duplex<R, W> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().write).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().write).poll_write_vectored(cx, bufs)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().write).poll_flush(cx)
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().write).poll_close(cx)
    }
}
