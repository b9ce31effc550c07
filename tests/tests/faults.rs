//! Faults and data integrity.
//!
//! - Injected errors (nbdkit's error filter, with its delay filter making
//!   replies come back out of order) under our async client with many
//!   concurrent requests: every error surfaces as a typed server error with
//!   the injected code, the connection stays usable, nothing hangs, and the
//!   reads that succeed return the right data.
//! - Integrity under load: fio's verifying workloads through several
//!   connections with deep queues against `nbd-serve`, and our async
//!   client's random writes from many tasks over a multi-conn pool checked
//!   against a model of the export.
//! - Durability: writes acknowledged with FUA, or before an acknowledged
//!   FLUSH, are in the file after `nbd-serve` is killed with SIGKILL right
//!   after the acknowledgement.

use std::fs;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use nbd_blocking::client::{Client, Error as BlockingError};
use nbd_proto::client::ClientConfig;
use nbd_proto::uri::NbdUri;
use nbd_proto::wire::{CommandFlags, ErrorCode, TransmissionFlags};
use nbd_smol::client::{Client as AsyncClient, Error};
use nbd_smol::pool::Pool;
use nbd_tests::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// A small deterministic random number generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// A number in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| (self.next() >> 56) as u8).collect()
    }
}

/// The byte at `offset` of the known pattern written before the faults.
fn pattern_byte(offset: u64) -> u8 {
    let x = offset.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x >> 56) as u8 ^ (offset >> 12) as u8
}

fn pattern_at(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64).map(pattern_byte).collect()
}

/// Runs a future on smol; panics if it takes longer than `limit`.
fn block_on_within<T>(what: &str, limit: Duration, fut: impl Future<Output = T>) -> T {
    smol::block_on(async {
        let done = async { Some(fut.await) };
        let timeout = async {
            smol::Timer::after(limit).await;
            None
        };
        smol::future::or(done, timeout).await
    })
    .unwrap_or_else(|| panic!("{what}: did not finish within {limit:?}"))
}

/// Starts `nbd-serve --socket SOCKET ARGS...`.
fn serve(dir: &TempDir, args: &[&str]) -> Peer {
    let socket = dir.socket_path("nbd-serve");
    let socket_arg = socket.to_str().expect("UTF-8 path").to_owned();
    let mut full = vec!["--socket", socket_arg.as_str()];
    full.extend_from_slice(args);
    Peer::start(dir, &our_bin("nbd-serve"), &full, Endpoint::Unix(socket))
}

// ---------------------------------------------------------------------------
// Injected errors
// ---------------------------------------------------------------------------

/// Reads fail 30% of the time (nbdkit's error filter on reads only, so the
/// pattern is written through a path without faults); 64 tasks read
/// concurrently on one connection with replies delayed out of order. Each
/// read either returns exactly the pattern or fails with `Error::Server`
/// carrying `NBD_EIO`.
#[test]
fn injected_read_errors_are_typed_and_good_reads_are_right() {
    if !require_peer("nbdkit") {
        return;
    }
    const SIZE: u64 = 16 * MIB;
    let dir = TempDir::new();
    let peer = nbdkit(
        &dir,
        &[
            "--filter=error",
            "--filter=delay",
            "memory",
            "16M",
            "error-pread=EIO",
            "error-pread-rate=30%",
            "delay-read=1ms",
        ],
    );
    let uri = peer.uri("");
    block_on_within("reads with injected errors", Duration::from_secs(120), async {
        let c = AsyncClient::connect(&uri).await.unwrap();
        // The pattern, through writes (which the filter leaves alone).
        let writes: Vec<_> = (0..SIZE / MIB)
            .map(|i| {
                let c = c.clone();
                smol::spawn(async move { c.write(pattern_at(i * MIB, MIB as usize), i * MIB).await.0 })
            })
            .collect();
        for w in writes {
            w.await.unwrap();
        }
        let tasks: Vec<_> = (0..64u64)
            .map(|t| {
                let c = c.clone();
                smol::spawn(async move {
                    let mut rng = Rng::new(t);
                    let (mut ok, mut failed) = (0u32, 0u32);
                    let mut buf = Vec::new();
                    for _ in 0..25 {
                        let len = 1 + rng.below(256 * 1024) as usize;
                        let offset = rng.below(SIZE - len as u64);
                        buf.clear();
                        // A dirty buffer: every byte must come from the server.
                        buf.resize(len, 0xee);
                        let (r, back) = c.read(std::mem::take(&mut buf), offset).await;
                        match r {
                            Ok(()) => {
                                assert!(
                                    back == pattern_at(offset, len),
                                    "task {t}: read of {len} bytes at {offset} returned other data"
                                );
                                ok += 1;
                            }
                            Err(Error::Server(e)) => {
                                assert_eq!(e.code, ErrorCode::EIO, "task {t}: {e}");
                                failed += 1;
                            }
                            Err(e) => panic!("task {t}: read at {offset}: {e:?}"),
                        }
                        buf = back;
                    }
                    (ok, failed)
                })
            })
            .collect();
        let (mut ok, mut failed) = (0, 0);
        for t in tasks {
            let (o, f) = t.await;
            ok += o;
            failed += f;
        }
        let total = ok + failed;
        assert_eq!(total, 64 * 25);
        assert!(
            failed > total / 10 && failed < total / 2,
            "{failed} of {total} reads failed with a 30% error rate"
        );
        // The connection survived every error.
        assert!(!c.is_closed());
        c.flush().await.unwrap();
        let (r, _) = c.write(pattern_at(0, 4096), 0).await;
        r.unwrap();
        c.disconnect().await.unwrap();
        eprintln!("{ok} reads returned the right data, {failed} failed with EIO");
    });
}

/// Every kind of request fails 30% of the time, each with its own error
/// value, under many concurrent tasks: the errors come back typed, with the
/// value injected for that command, and the connection stays usable.
#[test]
fn injected_errors_on_every_command() {
    if !require_peer("nbdkit") {
        return;
    }
    let dir = TempDir::new();
    let peer = nbdkit(
        &dir,
        &[
            "--filter=error",
            "--filter=delay",
            "memory",
            "64M",
            "error-rate=30%",
            "error-pread=EIO",
            "error-pwrite=ENOSPC",
            "error-zero=EPERM",
            "error-trim=EINVAL",
            "error-extents=ENOMEM",
            "error-cache=ESHUTDOWN",
            "delay-read=1ms",
            "delay-write=1ms",
        ],
    );
    let uri = peer.uri("");
    // Kinds of request, with the error each may fail with.
    const KINDS: [(&str, ErrorCode); 6] = [
        ("read", ErrorCode::EIO),
        ("write", ErrorCode::ENOSPC),
        ("zero", ErrorCode::EPERM),
        ("trim", ErrorCode::EINVAL),
        ("block status", ErrorCode::ENOMEM),
        ("cache", ErrorCode::ESHUTDOWN),
    ];
    block_on_within("requests with injected errors", Duration::from_secs(120), async {
        let c = AsyncClient::connect(&uri).await.unwrap();
        let has_cache = c.flags().contains(TransmissionFlags::SEND_CACHE);
        let tasks: Vec<_> = (0..48u64)
            .map(|t| {
                let c = c.clone();
                smol::spawn(async move {
                    let mut rng = Rng::new(1000 + t);
                    let mut counts = [(0u32, 0u32); 6];
                    for i in 0..30 {
                        let kind = ((t + i) % 6) as usize;
                        if kind == 5 && !has_cache {
                            continue;
                        }
                        let offset = rng.below(60) * MIB + rng.below(1024) * 512;
                        let len = 512 * (1 + rng.below(256));
                        let r = match kind {
                            0 => c.read(vec![0u8; len as usize], offset).await.0,
                            1 => c.write(rng.bytes(len as usize), offset).await.0,
                            2 => c.write_zeroes(offset, len, CommandFlags::empty()).await,
                            3 => c.trim(offset, len, CommandFlags::empty()).await,
                            4 => c.block_status(offset, len, CommandFlags::empty()).await.map(|_| ()),
                            _ => c.cache(offset, len).await,
                        };
                        match r {
                            Ok(()) => counts[kind].0 += 1,
                            Err(Error::Server(e)) => {
                                assert_eq!(e.code, KINDS[kind].1, "task {t}: {}: {e}", KINDS[kind].0);
                                counts[kind].1 += 1;
                            }
                            Err(e) => panic!("task {t}: {}: {e:?}", KINDS[kind].0),
                        }
                    }
                    counts
                })
            })
            .collect();
        let mut counts = [(0u32, 0u32); 6];
        for t in tasks {
            for (sum, c) in counts.iter_mut().zip(t.await) {
                sum.0 += c.0;
                sum.1 += c.1;
            }
        }
        for (kind, (ok, failed)) in counts.iter().enumerate() {
            if kind == 5 && !has_cache {
                continue;
            }
            let name = KINDS[kind].0;
            assert!(*ok > 0 && *failed > 0, "{name}: {ok} succeeded, {failed} failed");
            eprintln!("{name}: {ok} succeeded, {failed} failed with {}", KINDS[kind].1);
        }
        assert!(!c.is_closed());
        c.flush().await.unwrap();
        c.disconnect().await.unwrap();
    });

    // The blocking client sees the same typed errors, and goes on after each.
    let mut c = Client::connect(&uri).unwrap();
    let (mut ok, mut failed) = (0, 0);
    for i in 0..100u64 {
        match c.write(&[i as u8; 4096], i * 4096) {
            Ok(()) => ok += 1,
            Err(BlockingError::Server(e)) => {
                assert_eq!(e.code, ErrorCode::ENOSPC, "{e}");
                assert_eq!(BlockingError::Server(e).errno(), Some(28));
                failed += 1;
            }
            Err(e) => panic!("blocking client: {e:?}"),
        }
    }
    assert!(ok > 0 && failed > 0, "{ok} writes succeeded, {failed} failed");
    c.flush().unwrap();
    c.disconnect().unwrap();
}

// ---------------------------------------------------------------------------
// Integrity under load
// ---------------------------------------------------------------------------

/// fio with its crc32c verification through four connections (one per
/// job), 32 requests deep each, against nbd-serve: no mismatch.
#[test]
fn fio_verifies_through_several_deep_connections() {
    if !require_peer("fio") {
        return;
    }
    let help = run("fio", &["--enghelp=nbd"]);
    if !help.status.success() || !String::from_utf8_lossy(&help.stdout).contains("uri") {
        assert!(!peers_required(), "fio has no nbd engine\n{}", describe_output(&help));
        eprintln!("skipping: fio has no nbd engine");
        return;
    }
    let dir = TempDir::new();
    let peer = serve(&dir, &["--memory", "64M"]);
    let uri_arg = format!("--uri={}", peer.uri(""));
    // Each job writes its own 16 MiB (offset_increment), in random order,
    // then reads it back and checks every block's checksum (fio exits with
    // an error at the first mismatch: verify_fatal).
    for sizes in ["--bs=4k,64k", "--bsrange=4k-128k"] {
        let out = run(
            "fio",
            &[
                "--name=verify",
                "--ioengine=nbd",
                &uri_arg,
                "--numjobs=4",
                "--iodepth=32",
                "--rw=randwrite",
                sizes,
                "--size=16M",
                "--offset_increment=16M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--verify_state_save=0",
                // Overlapping writes are not in flight at once, so the
                // last one written is the one verified.
                "--serialize_overlap=1",
                "--output-format=json",
            ],
        );
        assert!(out.status.success(), "fio {sizes}\n{}", describe_output(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let json: Value = serde_json::from_str(&stdout[stdout.find('{').expect("fio JSON output")..])
            .unwrap_or_else(|e| panic!("fio's JSON: {e}\n{stdout}"));
        let jobs = json["jobs"].as_array().expect("jobs");
        assert_eq!(jobs.len(), 4, "{json:#}");
        for job in jobs {
            assert_eq!(job["error"], 0, "{sizes}: {job:#}");
            // fio's random map never writes a block twice; with mixed
            // sizes it ends when no free run fits the next write.
            let written = job["write"]["io_bytes"].as_u64().unwrap_or(0);
            assert!(written >= 8 * MIB, "{sizes}: wrote only {written} bytes: {job:#}");
            // The verify pass read back and checked everything written.
            assert_eq!(job["read"]["io_bytes"], written, "{sizes}: {job:#}");
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("verify"), "{sizes}\n{}", describe_output(&out));
    }
}

/// Random writes (and zeroes, and reads checked on the way) from 32 tasks
/// over a pool of 4 connections with 32 requests in flight each, against a
/// model of the export: at the end every byte read through every
/// connection matches the model.
///
/// Each task owns a 2 MiB region and awaits its requests one at a time, so
/// the model is exact; the tasks run concurrently, and the pool spreads
/// each task's requests over the connections, so a region written on one
/// connection is read back on another (nbd-serve advertises multi-conn and
/// serves every connection from the same storage).
#[test]
fn async_pool_random_writes_match_a_model() {
    const TASKS: u64 = 32;
    const REGION: u64 = 2 * MIB;
    const SIZE: u64 = TASKS * REGION;
    let dir = TempDir::new();
    let peer = serve(&dir, &["--memory", "64M"]);
    let uri = NbdUri::parse(&peer.uri("")).unwrap();
    block_on_within("random writes over a pool", Duration::from_secs(120), async {
        let pool = Arc::new(
            Pool::connect(&uri, ClientConfig::default().max_in_flight(32), 4)
                .await
                .unwrap(),
        );
        assert_eq!(pool.clients().len(), 4, "nbd-serve advertises multi-conn");
        assert_eq!(pool.size(), SIZE);
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let pool = pool.clone();
                smol::spawn(async move {
                    let base = t * REGION;
                    let mut model = vec![0u8; REGION as usize];
                    let mut rng = Rng::new(t + 77);
                    for i in 0..150 {
                        let len = 1 + rng.below(128 * 1024) as usize;
                        let at = rng.below(REGION - len as u64) as usize;
                        let offset = base + at as u64;
                        match rng.below(10) {
                            0..=6 => {
                                let data = rng.bytes(len);
                                model[at..at + len].copy_from_slice(&data);
                                let (r, _) = pool.write(data, offset).await;
                                r.unwrap_or_else(|e| panic!("task {t} op {i}: write: {e}"));
                            }
                            7 => {
                                model[at..at + len].fill(0);
                                let flags = if i % 2 == 0 {
                                    CommandFlags::NO_HOLE
                                } else {
                                    CommandFlags::empty()
                                };
                                pool.write_zeroes(offset, len as u64, flags)
                                    .await
                                    .unwrap_or_else(|e| panic!("task {t} op {i}: zero: {e}"));
                            }
                            _ => {
                                let (r, back) = pool.read(vec![0xee; len], offset).await;
                                r.unwrap_or_else(|e| panic!("task {t} op {i}: read: {e}"));
                                if back[..] != model[at..at + len] {
                                    let d = back.iter().zip(&model[at..]).position(|(a, b)| a != b).unwrap();
                                    panic!("task {t} op {i}: byte {} differs from the model", offset + d as u64);
                                }
                            }
                        }
                    }
                    model
                })
            })
            .collect();
        let mut model = Vec::with_capacity(SIZE as usize);
        for t in tasks {
            model.extend_from_slice(&t.await);
        }
        pool.flush().await.unwrap();
        // Every connection sees every byte of the model.
        for (n, c) in pool.clients().iter().enumerate() {
            for chunk in 0..SIZE / (8 * MIB) {
                let offset = chunk * 8 * MIB;
                let (r, back) = c.read(vec![0xee; (8 * MIB) as usize], offset).await;
                r.unwrap();
                let want = &model[offset as usize..][..back.len()];
                if back[..] != *want {
                    let d = back.iter().zip(want).position(|(a, b)| a != b).unwrap();
                    panic!("connection {n}: byte {} differs from the model", offset + d as u64);
                }
            }
        }
        pool.disconnect().await.unwrap();
    });
}

// ---------------------------------------------------------------------------
// Durability
// ---------------------------------------------------------------------------

/// Writes acknowledged with FUA, or covered by an acknowledged FLUSH,
/// survive `nbd-serve` being killed with SIGKILL right after the
/// acknowledgement: they are in the file when it is read directly.
///
/// A process kill does not lose the kernel's page cache, so this checks
/// that nbd-serve keeps no acknowledged write in user space (it writes
/// through to the file before it replies); that FLUSH and FUA reach the
/// disk itself (`fdatasync`) would take a power cut to show.
#[test]
fn acknowledged_writes_survive_sigkill() {
    const SIZE: u64 = 16 * MIB;
    let dir = TempDir::new();
    // On tmpfs when there is one: quick, and a file like any other.
    let shm = std::path::Path::new("/dev/shm");
    let file_dir = if shm.is_dir() && fs::metadata(shm).is_ok_and(|m| !m.permissions().readonly()) {
        let d = shm.join(dir.path().file_name().unwrap());
        fs::create_dir(&d).unwrap();
        Some(RemoveOnDrop(d))
    } else {
        None
    };
    let image = file_dir
        .as_ref()
        .map_or_else(|| dir.join("disk.img"), |d| d.0.join("disk.img"));
    fs::File::create(&image).unwrap().set_len(SIZE).unwrap();
    let image_arg = image.to_str().unwrap().to_owned();
    let mut rng = Rng::new(5);

    for round in 0..6u64 {
        let mut peer = serve(&dir, &[&image_arg]);
        let uri = peer.uri("");
        let mut expect: Vec<(u64, Vec<u8>)> = Vec::new();
        match round % 3 {
            0 => {
                // One FUA write with the blocking client.
                let mut c = Client::connect(&uri).unwrap();
                assert!(c.flags().contains(TransmissionFlags::SEND_FUA));
                let offset = rng.below(SIZE - MIB) & !511;
                let data = rng.bytes(MIB as usize);
                c.write_with(&data, offset, CommandFlags::FUA).unwrap();
                peer.kill();
                expect.push((offset, data));
            }
            1 => {
                // 64 concurrent writes, then a FLUSH, with the async client.
                let writes: Vec<(u64, Vec<u8>)> = (0..64)
                    .map(|i| {
                        let offset = i * (SIZE / 64) + rng.below(SIZE / 128);
                        let len = 1 + rng.below(65536) as usize;
                        (offset, rng.bytes(len))
                    })
                    .collect();
                let c = block_on_within("writes", Duration::from_secs(30), async {
                    let c = AsyncClient::connect(&uri).await.unwrap();
                    let tasks: Vec<_> = writes
                        .iter()
                        .map(|(offset, data)| {
                            let c = c.clone();
                            let (offset, data) = (*offset, data.clone());
                            smol::spawn(async move { c.write(data, offset).await.0 })
                        })
                        .collect();
                    for t in tasks {
                        t.await.unwrap();
                    }
                    c.flush().await.unwrap();
                    c
                });
                peer.kill();
                drop(c);
                expect.extend(writes);
            }
            _ => {
                // Zeroes with FUA over data written and flushed before.
                let mut c = Client::connect(&uri).unwrap();
                let offset = rng.below(SIZE / MIB - 1) * MIB;
                c.write(&rng.bytes(MIB as usize), offset).unwrap();
                c.flush().unwrap();
                c.write_zeroes(offset + 4096, 65536, CommandFlags::FUA | CommandFlags::NO_HOLE)
                    .unwrap();
                peer.kill();
                expect.push((offset + 4096, vec![0u8; 65536]));
            }
        }
        let content = fs::read(&image).unwrap();
        assert_eq!(content.len() as u64, SIZE);
        for (offset, data) in &expect {
            let got = &content[*offset as usize..][..data.len()];
            if got != &data[..] {
                let d = got.iter().zip(data).position(|(a, b)| a != b).unwrap();
                panic!(
                    "round {round}: byte {} of an acknowledged write is not in the file after SIGKILL",
                    offset + d as u64
                );
            }
        }
    }
}

/// A directory removed (with its content) on drop.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
