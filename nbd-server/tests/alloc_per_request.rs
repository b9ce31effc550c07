//! Steady state allocates nothing: a counting allocator watches a client
//! session and a served connection (with its reply writer, over the memory
//! export, which runs in place) exchange requests and replies in every
//! header mode, after a warm-up that lets every reusable buffer reach its
//! size.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use std::task::{Context, Poll, Wake, Waker};

use nbd_proto::client::{ClientConfig, ClientEvent, ClientSession, Request};
use nbd_proto::common::Mode;
use nbd_proto::server::ServerConfig;
use nbd_proto::wire::{Command, CommandFlags};
use nbd_server::{Export, Limits, ReplyWriter, ServeConnection, ServeContext};
use nbd_storage::MemoryStorage;

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
    client: ClientSession,
    server: ServeConnection,
    writer: ReplyWriter,
    to_server: Vec<u8>,
    to_client: Vec<u8>,
    buf: Vec<u8>,
    waker: Waker,
    mode: Mode,
}

fn noop_waker() -> Waker {
    struct Noop;
    impl Wake for Noop {
        fn wake(self: Arc<Self>) {}
    }
    Waker::from(Arc::new(Noop))
}

impl Pair {
    /// A real handshake between a client session and a served connection
    /// on a 64 MiB memory export, reaching `mode`.
    fn new(mode: Mode) -> Pair {
        let size = 64 << 20;
        let storage = Arc::new(MemoryStorage::new(size));
        let mut server_config = ServerConfig::default();
        let mut config = ClientConfig::default();
        match mode {
            Mode::ExportNameOnly => {
                server_config.support_go = false;
                config.structured_replies = false;
                config.extended_headers = false;
            }
            Mode::Simple => {
                config.structured_replies = false;
                config.extended_headers = false;
            }
            Mode::Structured => config.extended_headers = false,
            _ => {}
        }
        let ctx = Arc::new(ServeContext::new(
            vec![Export::new("", "", storage)],
            server_config,
            Limits::default(),
        ));
        let server = ServeConnection::new(&ctx);
        let writer = server.reply_writer();
        let mut p = Pair {
            client: ClientSession::new(config),
            server,
            writer,
            to_server: Vec::with_capacity(1 << 20),
            to_client: Vec::with_capacity(1 << 20),
            buf: vec![0u8; 1 << 20],
            waker: noop_waker(),
            mode,
        };
        for _ in 0..100 {
            while p.server.poll_transmit(&mut p.to_client).is_some() {}
            while p.client.poll_transmit(&mut p.to_server).is_some() {}
            let input = std::mem::take(&mut p.to_server);
            let mut used = 0;
            while used < input.len() {
                let n = p.server.input(&input[used..]).expect("server accepts");
                assert!(n > 0, "the server takes the handshake");
                used += n;
            }
            let input = std::mem::take(&mut p.to_client);
            let mut rest = &input[..];
            loop {
                let (n, ev) = p.client.feed(rest).expect("client accepts");
                rest = &rest[n..];
                if ev.is_none() && n == 0 {
                    break;
                }
            }
            if p.client.is_connected() && p.server.is_transmitting() {
                assert_eq!(p.client.mode(), Some(mode));
                return p;
            }
        }
        panic!("no transmission");
    }

    /// One request through both sides; returns the number of extents seen.
    fn round_trip(&mut self, req: Request, payload: &[u8]) -> usize {
        let cookie = self.client.start_request(req).expect("client accepts");
        self.to_server.clear();
        while let Some(t) = self.client.poll_transmit(&mut self.to_server) {
            if t.payload.is_some() {
                self.to_server.extend_from_slice(payload);
            }
        }
        let mut used = 0;
        while used < self.to_server.len() {
            used += self.server.input(&self.to_server[used..]).expect("server accepts");
        }
        // The writer side: everything the replies hold, as the runtime would
        // write it.
        self.to_client.clear();
        let mut cx = Context::from_waker(&self.waker);
        while let Poll::Ready(true) = self.writer.poll_batch(&mut cx) {
            while !self.writer.is_empty() {
                let n = self.writer.with_slices(|slices| {
                    let mut n = 0;
                    for s in slices {
                        self.to_client.extend_from_slice(s);
                        n += s.len();
                    }
                    n
                });
                self.writer.advance(n);
            }
        }
        let mut rest = &self.to_client[..];
        let mut extents = 0;
        let mut done = false;
        loop {
            let (n, ev) = self.client.feed(rest).expect("valid reply");
            rest = &rest[n..];
            match ev {
                Some(ClientEvent::Data { buf_offset, data, .. }) => {
                    let o = buf_offset as usize;
                    self.buf[o..o + data.len()].copy_from_slice(data);
                }
                Some(ClientEvent::BlockStatus { extents: e, .. }) => extents += e.count(),
                Some(ClientEvent::Done { cookie: c, result, .. }) => {
                    assert_eq!(c, cookie);
                    result.expect("request succeeds");
                    done = true;
                }
                Some(_) => {}
                None if n == 0 => break,
                None => {}
            }
        }
        assert!(done, "the request completed");
        assert!(rest.is_empty(), "every reply byte consumed");
        extents
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
        if self.mode.structured() {
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
        if self.mode.structured() {
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
