//! Serving exports: the request executor both server runtimes share.
//!
//! [`Exports`] answers the handshake's export lookups and lists;
//! [`Connection`] drives `nbd_proto`'s server transmission machine against
//! a [`Storage`]: the runtime reads exactly the bytes [`Connection::next`]
//! asks for (request headers, or a WRITE payload straight into
//! [`Connection::payload_buffer`]), and writes [`Connection::output`] when
//! it has no more requests buffered. READ data is read by the storage
//! directly into the output buffer behind its reply header, so a reply is
//! assembled without copying, and buffers are reused, so the steady state
//! allocates nothing.

use std::io;
use std::sync::Arc;

use nbd_proto::client::Mode;
use nbd_proto::server::{
    ExportDetails, ExportListing, ReplyEncoder, RequestEvent, ServerNegotiated, ServerReceive, ServerRequest,
    ServerTransmission, ServerTransmissionError,
};
use nbd_proto::wire::{AllocationFlags, CONTEXT_BASE_ALLOCATION, Command, CommandFlags, ErrorCode, TransmissionFlags};

use crate::{Capabilities, Extent, Storage, ZeroFlags};

/// One export: a name, a description and its storage.
#[derive(Clone)]
pub struct Export {
    /// The export name (`""` is the default export).
    pub name: String,
    /// A description shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: String,
    /// The storage behind it.
    pub storage: Arc<dyn Storage>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("description", &self.description)
            .field("size", &self.storage.size())
            .finish()
    }
}

impl Export {
    /// An export.
    pub fn new(name: impl Into<String>, description: impl Into<String>, storage: Arc<dyn Storage>) -> Export {
        Export {
            name: name.into(),
            description: description.into(),
            storage,
        }
    }

    /// The transmission flags this export's storage supports.
    pub fn flags(&self) -> TransmissionFlags {
        flags_of(&self.storage.capabilities())
    }

    /// What the handshake tells clients about this export.
    pub fn details(&self) -> ExportDetails {
        let caps = self.storage.capabilities();
        let mut d = ExportDetails::new(self.name.clone(), self.storage.size());
        d.description = self.description.clone();
        d.flags = flags_of(&caps);
        d.block_size = caps.block_size;
        d
    }
}

/// The transmission flags a set of capabilities allows.
pub fn flags_of(caps: &Capabilities) -> TransmissionFlags {
    let mut f = TransmissionFlags::HAS_FLAGS;
    let rw = !caps.read_only;
    for (on, flag) in [
        (caps.read_only, TransmissionFlags::READ_ONLY),
        (caps.can_flush, TransmissionFlags::SEND_FLUSH),
        (caps.can_fua && rw, TransmissionFlags::SEND_FUA),
        (caps.rotational, TransmissionFlags::ROTATIONAL),
        (caps.can_trim && rw, TransmissionFlags::SEND_TRIM),
        (caps.can_zero && rw, TransmissionFlags::SEND_WRITE_ZEROES),
        (
            caps.can_zero && caps.can_fast_zero && rw,
            TransmissionFlags::SEND_FAST_ZERO,
        ),
        (caps.can_multi_conn, TransmissionFlags::CAN_MULTI_CONN),
        (caps.can_cache, TransmissionFlags::SEND_CACHE),
        (true, TransmissionFlags::BLOCK_STATUS_PAYLOAD),
    ] {
        if on {
            f |= flag;
        }
    }
    f
}

/// The set of exports a server offers.
#[derive(Debug, Clone, Default)]
pub struct Exports {
    list: Vec<Export>,
}

impl Exports {
    /// A set of exports; the first is the default one when none is named `""`.
    pub fn new(list: Vec<Export>) -> Exports {
        Exports { list }
    }

    /// Finds an export by name: an exact match, else (for `""`) the first export.
    pub fn lookup(&self, name: &str) -> Option<usize> {
        self.list
            .iter()
            .position(|e| e.name == name)
            .or(if name.is_empty() && !self.list.is_empty() {
                Some(0)
            } else {
                None
            })
    }

    /// The details of export `i` for the handshake.
    pub fn details(&self, i: usize) -> ExportDetails {
        self.list[i].details()
    }

    /// The listing for `NBD_OPT_LIST`.
    pub fn listing(&self) -> Vec<ExportListing<'_>> {
        self.list
            .iter()
            .map(|e| ExportListing {
                name: &e.name,
                description: &e.description,
                tls_only: false,
            })
            .collect()
    }

    /// Export `i`.
    pub fn get(&self, i: usize) -> &Export {
        &self.list[i]
    }

    /// Number of exports.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether there are no exports.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

/// What the runtime must do next for a connection in transmission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Read exactly this many bytes and pass them to [`Connection::handle_bytes`].
    Bytes(usize),
    /// Read exactly this many bytes into [`Connection::payload_buffer`],
    /// then call [`Connection::payload_received`].
    Payload(usize),
    /// Read and drop this many bytes, then call [`Connection::discarded`].
    Discard(u64),
    /// Send the remaining output and close the connection.
    Close,
}

/// Reads of at least this many bytes are sent sparsely (holes as
/// `NBD_REPLY_TYPE_OFFSET_HOLE`) when structured replies are in use.
pub const SPARSE_READ_THRESHOLD: u64 = 64 * 1024;

/// Output kept between flushes is shrunk back to this capacity when a
/// large reply made it grow beyond [`OUTPUT_SHRINK_ABOVE`].
const OUTPUT_KEEP: usize = 1 << 20;
const OUTPUT_SHRINK_ABOVE: usize = 40 << 20;

/// One connection in transmission: the protocol machine, the storage, and
/// reusable buffers.
pub struct Connection {
    tx: ServerTransmission,
    enc: ReplyEncoder,
    storage: Arc<dyn Storage>,
    out: Vec<u8>,
    payload: Vec<u8>,
    pending_write: Option<ServerRequest>,
    extents: Vec<Extent>,
    allocation_id: Option<u32>,
    requests: u64,
    /// A run of data `[start, end)` learnt from the storage: reads inside
    /// it skip the hole lookup.
    known_data: (u64, u64),
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("mode", &self.tx.mode())
            .field("requests", &self.requests)
            .finish()
    }
}

fn errno_of(e: &io::Error) -> ErrorCode {
    ErrorCode::from_errno(e.raw_os_error().unwrap_or(5))
}

impl Connection {
    /// A connection for a negotiated handshake on `export`.
    pub fn new(negotiated: &ServerNegotiated, export: &Export) -> Connection {
        let tx = ServerTransmission::new(negotiated);
        let enc = tx.encoder();
        let allocation_id = negotiated
            .contexts
            .iter()
            .find(|c| c.name == CONTEXT_BASE_ALLOCATION)
            .map(|c| c.id);
        Connection {
            tx,
            enc,
            storage: export.storage.clone(),
            out: Vec::with_capacity(64 * 1024),
            payload: Vec::new(),
            pending_write: None,
            extents: Vec::new(),
            allocation_id,
            requests: 0,
            known_data: (0, 0),
        }
    }

    /// The protocol flavour in use.
    pub fn mode(&self) -> Mode {
        self.tx.mode()
    }

    /// Requests handled so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// Starts a graceful shutdown: new requests are refused with
    /// `NBD_ESHUTDOWN`.
    pub fn shutdown(&mut self) {
        self.tx.shutdown();
    }

    /// What to read next.
    pub fn next(&self) -> Next {
        match self.tx.next() {
            ServerReceive::Bytes(n) => Next::Bytes(n),
            ServerReceive::Payload { length, .. } => Next::Payload(length as usize),
            ServerReceive::Discard(n) => Next::Discard(n),
            ServerReceive::Closed => Next::Close,
        }
    }

    /// Whether replies are waiting to be written.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// The replies to write.
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// Hands the pending replies over in `spare` (which must be empty; its
    /// capacity is reused for the next replies), so a runtime can write
    /// them while this connection goes on executing requests.
    pub fn swap_output(&mut self, spare: &mut Vec<u8>) {
        spare.clear();
        std::mem::swap(&mut self.out, spare);
    }

    /// Returns a written-out buffer's capacity to a sensible size before
    /// it is reused with [`Connection::swap_output`].
    pub fn recycle(buf: &mut Vec<u8>) {
        buf.clear();
        if buf.capacity() > OUTPUT_SHRINK_ABOVE {
            buf.shrink_to(OUTPUT_KEEP);
        }
    }

    /// The runtime wrote all of [`Connection::output`].
    pub fn output_sent(&mut self) {
        self.out.clear();
        if self.out.capacity() > OUTPUT_SHRINK_ABOVE {
            self.out.shrink_to(OUTPUT_KEEP);
        }
    }

    /// Feeds the bytes [`Next::Bytes`] asked for; executes the request they
    /// complete (except a WRITE, whose payload comes next).
    pub fn handle_bytes(&mut self, bytes: &[u8]) -> Result<(), ServerTransmissionError> {
        match self.tx.handle_bytes(bytes)? {
            RequestEvent::Continue | RequestEvent::Disconnect => {}
            RequestEvent::Reject { request, error, reason } => {
                self.requests += 1;
                self.enc.reply_error(&request, error, reason, &mut self.out);
            }
            RequestEvent::Request(req) => {
                self.requests += 1;
                if req.command == Command::WRITE && req.length > 0 {
                    self.pending_write = Some(req);
                } else {
                    self.execute(&req);
                }
            }
        }
        Ok(())
    }

    /// The buffer the announced WRITE payload goes into.
    pub fn payload_buffer(&mut self, n: usize) -> &mut [u8] {
        if self.payload.len() < n {
            self.payload.resize(n, 0);
        }
        &mut self.payload[..n]
    }

    /// The runtime filled [`Connection::payload_buffer`]: the WRITE runs.
    pub fn payload_received(&mut self) -> Result<(), ServerTransmissionError> {
        self.tx.payload_received()?;
        if let Some(req) = self.pending_write.take() {
            let len = req.length as usize;
            let r = self.storage.write_at(&self.payload[..len], req.offset, req.fua());
            self.finish(&req, r);
        }
        Ok(())
    }

    /// The announced WRITE payload, already in the runtime's own receive
    /// buffer: the WRITE runs straight from `data` (no copy into
    /// [`Connection::payload_buffer`]). `data` must be exactly the length
    /// [`Next::Payload`] announced.
    pub fn payload_from(&mut self, data: &[u8]) -> Result<(), ServerTransmissionError> {
        self.tx.payload_received()?;
        if let Some(req) = self.pending_write.take() {
            let r = match data.get(..req.length as usize) {
                Some(d) => self.storage.write_at(d, req.offset, req.fua()),
                None => Err(io::Error::new(io::ErrorKind::InvalidInput, "short payload")),
            };
            self.finish(&req, r);
        }
        Ok(())
    }

    /// The runtime dropped the announced bytes.
    pub fn discarded(&mut self) -> Result<(), ServerTransmissionError> {
        self.tx.discarded()
    }

    fn finish(&mut self, req: &ServerRequest, r: io::Result<()>) {
        match r {
            Ok(()) => self.out.extend_from_slice(self.enc.reply_ok(req).as_bytes()),
            Err(e) => self.enc.reply_error(req, errno_of(&e), &e.to_string(), &mut self.out),
        }
    }

    fn execute(&mut self, req: &ServerRequest) {
        let st = &*self.storage;
        match req.command {
            Command::READ => self.read(req),
            Command::FLUSH => {
                let r = st.flush();
                self.finish(req, r)
            }
            Command::TRIM => {
                let r = st.trim(req.offset, req.length, req.fua());
                self.finish(req, r)
            }
            Command::WRITE_ZEROES => {
                let flags = ZeroFlags {
                    no_hole: req.flags.contains(CommandFlags::NO_HOLE),
                    fast: req.flags.contains(CommandFlags::FAST_ZERO),
                    fua: req.fua(),
                };
                let r = st.write_zeroes(req.offset, req.length, flags);
                self.finish(req, r)
            }
            Command::CACHE => {
                let r = st.cache(req.offset, req.length);
                self.finish(req, r)
            }
            Command::BLOCK_STATUS => self.block_status(req),
            Command::WRITE => {
                // Zero-length write: nothing to do.
                self.finish(req, Ok(()))
            }
            _ => self
                .enc
                .reply_error(req, ErrorCode::EINVAL, "unsupported command", &mut self.out),
        }
    }

    fn read(&mut self, req: &ServerRequest) {
        let structured = self.tx.mode().structured();
        if structured && !req.flags.contains(CommandFlags::DF) && req.length >= SPARSE_READ_THRESHOLD {
            let end = req.offset + req.length;
            let (kd_start, kd_end) = self.known_data;
            let mut known = req.offset >= kd_start && end <= kd_end;
            if !known {
                // Learn how far the data at this offset runs (one lookup
                // for a long run, instead of one per read).
                if let Ok(e) = self.storage.extent_at(req.offset, &mut self.extents) {
                    if !e.flags.contains(AllocationFlags::ZERO) {
                        self.known_data = (req.offset, req.offset.saturating_add(e.length));
                        known = end <= self.known_data.1;
                    }
                }
            }
            if !known {
                self.sparse_read(req);
                return;
            }
            // Inside a known run of data: a plain read. (Had another
            // client punched a hole here meanwhile, the zeroes read from it
            // are still the right contents; data is never reported as a
            // hole from this cache.)
        }
        let start = self.out.len();
        let header = match self.enc.read_reply_header(req) {
            Ok(h) => h,
            Err(e) => {
                self.enc
                    .reply_error(req, ErrorCode::EINVAL, &e.to_string(), &mut self.out);
                return;
            }
        };
        if req.length == 0 {
            self.out.extend_from_slice(header.as_bytes());
            return;
        }
        self.out.extend_from_slice(header.as_bytes());
        let data_start = self.out.len();
        self.out.resize(data_start + req.length as usize, 0);
        if let Err(e) = self.storage.read_at(&mut self.out[data_start..], req.offset) {
            // Nothing of this reply was sent yet: replace it by the error.
            self.out.truncate(start);
            self.enc.reply_error(req, errno_of(&e), &e.to_string(), &mut self.out);
        }
    }

    /// A structured READ that sends holes as `NBD_REPLY_TYPE_OFFSET_HOLE`.
    fn sparse_read(&mut self, req: &ServerRequest) {
        let start = self.out.len();
        self.extents.clear();
        let mut extents = std::mem::take(&mut self.extents);
        let r = self.sparse_read_inner(req, &mut extents);
        self.extents = extents;
        if let Err(e) = r {
            self.out.truncate(start);
            self.enc.reply_error(req, errno_of(&e), &e.to_string(), &mut self.out);
        }
    }

    fn sparse_read_inner(&mut self, req: &ServerRequest, extents: &mut Vec<Extent>) -> io::Result<()> {
        let end = req.offset + req.length;
        let mut off = req.offset;
        while off < end {
            extents.clear();
            self.storage.block_status(off, end - off, extents)?;
            if extents.is_empty() {
                // A storage that says nothing: send the rest as data.
                extents.push(Extent::data(end - off));
            }
            for e in extents.iter() {
                if off >= end {
                    break;
                }
                let len = e.length.min(end - off);
                if len == 0 {
                    break;
                }
                if e.flags.contains(AllocationFlags::ZERO) {
                    let mut left = len;
                    let mut o = off;
                    while left > 0 {
                        // Hole chunks carry 32-bit sizes.
                        let piece = left.min(1 << 31);
                        let h = self.enc.hole_chunk(req, o, piece, false).map_err(invalid)?;
                        self.out.extend_from_slice(h.as_bytes());
                        o += piece;
                        left -= piece;
                    }
                } else {
                    let h = self.enc.offset_data_header(req, off, len, false).map_err(invalid)?;
                    self.out.extend_from_slice(h.as_bytes());
                    let data_start = self.out.len();
                    self.out.resize(data_start + len as usize, 0);
                    self.storage.read_at(&mut self.out[data_start..], off)?;
                }
                off += len;
            }
        }
        self.out.extend_from_slice(self.enc.reply_ok(req).as_bytes());
        Ok(())
    }

    fn block_status(&mut self, req: &ServerRequest) {
        let n_ctx = self.tx.contexts().len();
        let n = (0..n_ctx).filter(|i| req.contexts.includes(*i)).count();
        let start = self.out.len();
        let mut k = 0;
        for i in 0..n_ctx {
            if !req.contexts.includes(i) {
                continue;
            }
            let (id, is_alloc) = {
                let c = &self.tx.contexts()[i];
                (c.id, c.name == CONTEXT_BASE_ALLOCATION)
            };
            k += 1;
            let done = k == n;
            if !is_alloc || Some(id) != self.allocation_id {
                // A context we do not compute: report "no information" (0),
                // which the spec says is always safe.
                let r = self
                    .enc
                    .block_status_chunk(req, id, [(req.length, 0u64)], done, &mut self.out);
                if let Err(e) = r {
                    self.out.truncate(start);
                    self.enc
                        .reply_error(req, ErrorCode::EINVAL, &e.to_string(), &mut self.out);
                    return;
                }
                continue;
            }
            self.extents.clear();
            let limit = req.length.min(self.storage.size().saturating_sub(req.offset));
            if let Err(e) = self.storage.block_status(req.offset, limit, &mut self.extents) {
                self.out.truncate(start);
                self.enc.reply_error(req, errno_of(&e), &e.to_string(), &mut self.out);
                return;
            }
            let iter = self.extents.iter().map(|e| (e.length, e.flags.bits() as u64));
            if let Err(e) = self.enc.block_status_chunk(req, id, iter, done, &mut self.out) {
                self.out.truncate(start);
                self.enc
                    .reply_error(req, ErrorCode::EINVAL, &e.to_string(), &mut self.out);
                return;
            }
        }
        if n == 0 {
            self.enc
                .reply_error(req, ErrorCode::EINVAL, "no metadata context selected", &mut self.out);
        }
    }
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
}
