//! Steady state allocates nothing per request in the session-driven
//! clients: a counting allocator (every thread of this process) watches
//! the blocking client and the async client (its reader and writer tasks
//! included) exchange requests with nbdkit, which runs in a process of its
//! own, after a warm-up that lets every reusable buffer reach its size.
//!
//! The blocking client allocates nothing at all. Under the async client
//! the runtime allocates on its own account, not per request: async-io's
//! reactor gathers the wakers of each wake-up in a new `Vec`, and smol's
//! executor queue grows in blocks of 31 tasks (backtraces of a run show
//! nothing else). So the async client's figure must stay well below one
//! allocation per request; one per request would fail it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use nbd_proto::client::ClientConfig;
use nbd_proto::uri::NbdUri;
use nbd_proto::wire::CommandFlags;
use nbd_tests::*;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator, only counting calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCS.load(Ordering::Relaxed)
}

/// Requests of every kind but block status (whose answer is a new `Vec`).
fn blocking_round(c: &mut nbd_blocking::Client, buf: &mut [u8], i: u64) {
    let off = (i * 7919 % 500) * 65536;
    c.pwrite(&buf[..4096], off, CommandFlags::empty()).unwrap();
    c.pread(&mut buf[..65536], off, CommandFlags::empty()).unwrap();
    c.pwrite(&buf[..65536], off + 65536, CommandFlags::FUA).unwrap();
    c.flush().unwrap();
    c.trim(off, 4096, CommandFlags::empty()).unwrap();
    c.write_zeroes(off + 4096, 4096, CommandFlags::empty()).unwrap();
    c.cache(off, 4096).unwrap();
}

/// One request stream of the async client: rounds of reads, writes and
/// zeroes with its own two buffers (lent to the client and given back).
async fn stream(c: &nbd_smol::Client, bufs: &mut (Vec<u8>, Vec<u8>), k: u64, rounds: std::ops::Range<u64>) {
    for i in rounds {
        let off = ((i * 8 + k) * 7919 % 500) * 65536;
        let (r, back) = c.pwrite(std::mem::take(&mut bufs.0), off, CommandFlags::empty()).await;
        r.unwrap();
        bufs.0 = back;
        let (r, back) = c.pread(std::mem::take(&mut bufs.1), off, CommandFlags::empty()).await;
        r.unwrap();
        bufs.1 = back;
        c.write_zeroes(off + 65536, 4096, CommandFlags::empty()).await.unwrap();
    }
}

/// Eight streams at once on one connection.
async fn streams(c: &nbd_smol::Client, bufs: &mut [(Vec<u8>, Vec<u8>); 8], rounds: std::ops::Range<u64>) {
    use smol::future::zip;
    let [b0, b1, b2, b3, b4, b5, b6, b7] = bufs;
    let r = || rounds.clone();
    zip(
        zip(
            zip(stream(c, b0, 0, r()), stream(c, b1, 1, r())),
            zip(stream(c, b2, 2, r()), stream(c, b3, 3, r())),
        ),
        zip(
            zip(stream(c, b4, 4, r()), stream(c, b5, 5, r())),
            zip(stream(c, b6, 6, r()), stream(c, b7, 7, r())),
        ),
    )
    .await;
}

#[test]
fn steady_state_allocates_nothing_in_either_client() {
    if !require_peer("nbdkit") {
        return;
    }
    let dir = TempDir::new();
    let peer = nbdkit(&dir, &["memory", "64M"]);
    let config = ClientConfig::default().max_in_flight(16);
    let uri = NbdUri::parse(&peer.uri("")).unwrap();

    // The blocking client.
    let mut c = nbd_blocking::Client::connect_uri(&uri, config.clone()).unwrap();
    let mut buf = pattern(65536, 1);
    for i in 0..200 {
        blocking_round(&mut c, &mut buf, i);
    }
    let before = allocations();
    for i in 200..700 {
        blocking_round(&mut c, &mut buf, i);
    }
    let n = allocations() - before;
    println!("blocking client: {n} allocations in {} requests", 500 * 7);
    assert_eq!(n, 0, "blocking client: {n} allocations in steady state");
    c.disconnect().unwrap();

    // The async client: eight request streams at once on one connection.
    smol::block_on(async {
        let c = nbd_smol::Client::connect_uri(&uri, config).await.unwrap();
        let mut bufs: [(Vec<u8>, Vec<u8>); 8] = std::array::from_fn(|k| (pattern(65536, k as u64), vec![0u8; 65536]));
        streams(&c, &mut bufs, 0..200).await;
        let before = allocations();
        streams(&c, &mut bufs, 200..500).await;
        let n = allocations() - before;
        let requests = 300 * 8 * 3;
        println!("async client: {n} allocations (the runtime's) in {requests} requests");
        assert!(
            n < requests / 2,
            "async client: {n} allocations in {requests} requests of steady state"
        );
        c.disconnect().await.unwrap();
    });
}
