//! Steady state allocates nothing: a counting allocator watches the client
//! transmission machine and the server's request executor (over the memory
//! export) exchange requests and replies in every header mode, after a
//! warm-up that lets every reusable buffer reach its size.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use nbd_proto::client::{ClientTransmission, MetaContext, Mode, Negotiated, ReceiveNext, ReplyEvent, Request};
use nbd_proto::server::ServerNegotiated;
use nbd_proto::wire::{Command, CommandFlags, TransmissionFlags};
use nbd_storage::MemoryStorage;
use nbd_storage::serve::{Connection, Export, Next};

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator, only counting calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCS.with(|c| c.get())
}

struct Pair {
    client: ClientTransmission,
    server: Connection,
    wire: Vec<u8>,
    buf: Vec<u8>,
    scratch: Vec<u8>,
}

impl Pair {
    fn new(mode: Mode) -> Pair {
        let size = 64 << 20;
        let storage = Arc::new(MemoryStorage::new(size));
        let export = Export::new("", "", storage);
        let flags = export.flags() | TransmissionFlags::SEND_DF;
        let contexts = vec![MetaContext {
            id: 1,
            name: "base:allocation".into(),
        }];
        let snego = ServerNegotiated {
            mode,
            export_name: String::new(),
            requested_name: String::new(),
            size,
            flags,
            block_size: None,
            contexts: contexts.clone(),
            tls: false,
            client_requested_block_size: true,
        };
        let cnego = Negotiated {
            mode,
            tls: false,
            export_name: String::new(),
            description: None,
            size,
            flags,
            block_size: None,
            contexts,
        };
        Pair {
            client: ClientTransmission::new(&cnego, 8),
            server: Connection::new(&snego, &export),
            wire: Vec::with_capacity(1 << 20),
            buf: vec![0u8; 1 << 20],
            scratch: Vec::with_capacity(1 << 20),
        }
    }

    /// One request through both machines; returns the number of extents seen.
    fn round_trip(&mut self, req: Request, payload: &[u8]) -> usize {
        let (cookie, header) = self.client.start_request(req).expect("client accepts");
        // Client -> server: the header, then the payload straight into the
        // server's payload buffer.
        let mut hdr = header.as_bytes();
        let mut payload = payload;
        loop {
            match self.server.next() {
                Next::Bytes(n) if !hdr.is_empty() => {
                    self.server.handle_bytes(&hdr[..n]).expect("server accepts");
                    hdr = &hdr[n..];
                }
                Next::Payload(n) => {
                    self.server.payload_buffer(n).copy_from_slice(&payload[..n]);
                    payload = &payload[n..];
                    self.server.payload_received().expect("payload");
                }
                _ => break,
            }
        }
        // Server -> client.
        self.wire.clear();
        self.wire.extend_from_slice(self.server.output());
        self.server.output_sent();
        let mut pos = 0;
        let mut extents = 0;
        loop {
            let ev = match self.client.next() {
                ReceiveNext::Bytes(n) => {
                    self.scratch.clear();
                    self.scratch.extend_from_slice(&self.wire[pos..pos + n]);
                    pos += n;
                    match self.client.handle_bytes(&self.scratch).expect("valid reply") {
                        ReplyEvent::BlockStatus { extents: e, .. } => {
                            extents += e.count();
                            continue;
                        }
                        ReplyEvent::Done { cookie: c, result, .. } => Some((c, result)),
                        _ => None,
                    }
                }
                ReceiveNext::Data { buf_offset, length, .. } => {
                    let (o, l) = (buf_offset as usize, length as usize);
                    self.buf[o..o + l].copy_from_slice(&self.wire[pos..pos + l]);
                    pos += l;
                    match self.client.data_received().expect("valid data") {
                        ReplyEvent::Done { cookie: c, result, .. } => Some((c, result)),
                        _ => None,
                    }
                }
                ReceiveNext::Complete => match self.client.complete_pending().expect("valid") {
                    ReplyEvent::Done { cookie: c, result, .. } => Some((c, result)),
                    _ => None,
                },
            };
            if let Some((c, result)) = ev {
                assert_eq!(c, cookie);
                result.expect("request succeeds");
                assert_eq!(pos, self.wire.len(), "every reply byte consumed");
                return extents;
            }
        }
    }

    /// Writes land on allocated pages (the warm-up fills the first 48 MiB),
    /// and TRIM / WRITE_ZEROES work in the last 16 MiB which is never
    /// written: the memory export allocates pages for new data, which is
    /// the storage's business, not the protocol's.
    fn workload(&mut self, data: &[u8], i: u64) {
        let off = (i * 7919 % 700) * 65536;
        let spare = (48 << 20) + (i % 200) * 65536;
        self.round_trip(Request::new(Command::WRITE, off, 4096), &data[..4096]);
        self.round_trip(Request::new(Command::READ, off, 4096), &[]);
        if self.client.mode().structured() {
            self.round_trip(Request::new(Command::READ, off, 4096).with_flags(CommandFlags::DF), &[]);
        }
        self.round_trip(
            Request::new(Command::WRITE, off + 4096, 65536).with_flags(CommandFlags::FUA),
            &data[..65536],
        );
        // A large read goes through the sparse path when structured.
        self.round_trip(Request::new(Command::READ, off, 131072), &[]);
        self.round_trip(Request::new(Command::FLUSH, 0, 0), &[]);
        self.round_trip(Request::new(Command::TRIM, spare, 32768), &[]);
        self.round_trip(Request::new(Command::WRITE_ZEROES, spare + 32768, 4096), &[]);
        self.round_trip(Request::new(Command::CACHE, off, 4096), &[]);
        if self.client.mode().structured() {
            let n = self.round_trip(Request::new(Command::BLOCK_STATUS, 0, 64 << 20), &[]);
            assert!(n > 0);
        }
    }
}

#[test]
fn steady_state_allocates_nothing_in_any_mode() {
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 13) as u8).collect();
    for mode in [Mode::ExportNameOnly, Mode::Simple, Mode::Structured, Mode::Extended] {
        let mut p = Pair::new(mode);
        for off in (0..48u64 << 20).step_by(65536) {
            p.round_trip(Request::new(Command::WRITE, off, 65536), &data);
        }
        for i in 0..200 {
            p.workload(&data, i);
        }
        let before = allocations();
        let rounds = 500;
        for i in 200..200 + rounds {
            p.workload(&data, i);
        }
        let n = allocations() - before;
        let requests = rounds * if mode.structured() { 11 } else { 9 };
        println!("{mode:?}: {n} allocations in {requests} requests");
        assert_eq!(n, 0, "{mode:?}: {n} allocations in {requests} requests of steady state");
    }
}
