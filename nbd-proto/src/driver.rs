//! The bookkeeping every buffered driver of a session writes, without
//! I/O: [`Buffers`] owns the input buffer (what the socket gave and the
//! session has not consumed yet, compacted when room runs out) and the
//! output buffer (what the session or the driver queued and the socket
//! has not taken yet, with the position of partial writes).
//!
//! A loop on a reactor (mio, epoll) then reads into
//! [`Buffers::read_buf`], reports [`Buffers::filled`], takes events with
//! [`Buffers::feed_client`] (or [`Buffers::feed_server`], which also
//! takes the replies), queues the
//! session's output with [`Buffers::queue_client`] (or
//! [`Buffers::queue_server`]), writes [`Buffers::output`] and reports
//! [`Buffers::written`]; [`Buffers::interest`] says what to wait for.
//!
//! This is the simple way: WRITE payloads are copied into the output
//! buffer and READ data is handed out of the input buffer. A driver that
//! moves payloads straight between the socket and its own buffers uses
//! the sessions' exact-count methods instead (`need`, `data_received`,
//! `payload_received`) and vectored writes.

use alloc::vec;
use alloc::vec::Vec;

use crate::client::{ClientEvent, ClientSession, ClientSessionError, Cookie};
use crate::common::Interest;
use crate::server::{ExportLookup, ServerEvent, ServerSession, ServerSessionError};

/// Input and output buffers of one connection; see the [module](self)
/// documentation.
#[derive(Debug, Clone)]
pub struct Buffers {
    input: Vec<u8>,
    start: usize,
    end: usize,
    output: Vec<u8>,
    sent: usize,
}

impl Buffers {
    /// Buffers whose input side holds `input_capacity` bytes (at least
    /// 4 KiB): the most one read takes.
    pub fn new(input_capacity: usize) -> Buffers {
        Buffers {
            input: vec![0; input_capacity.max(4096)],
            start: 0,
            end: 0,
            output: Vec::new(),
            sent: 0,
        }
    }

    /// Where to read the next bytes from the socket into (never empty
    /// while the session consumes what it is given); report the count
    /// with [`Buffers::filled`].
    pub fn read_buf(&mut self) -> &mut [u8] {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.end == self.input.len() {
            self.input.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        &mut self.input[self.end..]
    }

    /// `n` bytes were read into [`Buffers::read_buf`].
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.input.len());
    }

    /// The input the session has not consumed yet.
    pub fn input(&self) -> &[u8] {
        &self.input[self.start..self.end]
    }

    /// The output the socket has not taken yet.
    pub fn output(&self) -> &[u8] {
        &self.output[self.sent..]
    }

    /// The socket took `n` bytes of [`Buffers::output`].
    pub fn written(&mut self, n: usize) {
        self.sent = (self.sent + n).min(self.output.len());
        if self.sent == self.output.len() {
            self.output.clear();
            self.sent = 0;
        }
    }

    /// Whether output waits for the socket.
    pub fn has_output(&self) -> bool {
        self.sent < self.output.len()
    }

    /// What to wait for on the socket: the session's interest, plus
    /// writability while these buffers hold output. Call it after queuing
    /// the session's output and feeding the input.
    pub fn interest(&self, session: Interest) -> Interest {
        Interest {
            read: session.read,
            write: session.write || self.has_output(),
        }
    }

    /// Moves the client session's output into the output buffer; a WRITE
    /// request's payload (all of the buffer the caller gave for its
    /// cookie) is appended by `payload`, right behind its header.
    pub fn queue_client(&mut self, session: &mut ClientSession, mut payload: impl FnMut(Cookie, &mut Vec<u8>)) {
        while let Some(t) = session.poll_transmit(&mut self.output) {
            if let Some(p) = t.payload {
                payload(p.cookie, &mut self.output);
            }
        }
    }

    /// Moves the server session's handshake bytes into the output buffer.
    /// (Replies are the driver's, appended to the output buffer; the
    /// session keeps them behind the handshake's bytes, see
    /// [`ServerSession::feed`].)
    pub fn queue_server<X: ExportLookup>(&mut self, session: &mut ServerSession<X>) {
        while session.poll_transmit(&mut self.output).is_some() {}
    }

    /// Feeds the buffered input to the client session until it takes
    /// nothing more, handing each event to `on_event`
    /// ([`ClientEvent::Data`] borrows the input buffer, and carries the
    /// export offset of its bytes). Then send the output and read more.
    /// Returns whether the session took any input or gave any event.
    pub fn feed_client<E: From<ClientSessionError>>(
        &mut self,
        session: &mut ClientSession,
        mut on_event: impl FnMut(ClientEvent<'_>) -> Result<(), E>,
    ) -> Result<bool, E> {
        let mut any = false;
        loop {
            let (n, event) = session.feed(&self.input[self.start..self.end])?;
            // The event borrows the input, not the counters.
            let progress = n > 0 || event.is_some();
            if let Some(e) = event {
                on_event(e)?;
            }
            self.start += n;
            if !progress {
                return Ok(any);
            }
            any = true;
        }
    }

    /// Feeds the buffered input to the server session until it takes
    /// nothing more, handing each event to `on_event` with the session (for
    /// its encoder and export) and the output buffer (to append replies
    /// to). [`ServerEvent::WriteData`] borrows the input buffer. Then
    /// queue the session's output, send, and read more. Returns whether
    /// the session took any input or gave any event: while handshake
    /// bytes wait to be queued it takes no request, so a driver with input
    /// left after a call that made progress queues and sends, then feeds
    /// again before it reads.
    pub fn feed_server<X: ExportLookup, E: From<ServerSessionError>>(
        &mut self,
        session: &mut ServerSession<X>,
        mut on_event: impl FnMut(&mut ServerSession<X>, ServerEvent<'_>, &mut Vec<u8>) -> Result<(), E>,
    ) -> Result<bool, E> {
        let mut any = false;
        loop {
            let (n, event) = session.feed(&self.input[self.start..self.end])?;
            let progress = n > 0 || event.is_some();
            if let Some(e) = event {
                on_event(session, e, &mut self.output)?;
            }
            self.start += n;
            if !progress {
                return Ok(any);
            }
            any = true;
        }
    }
}
