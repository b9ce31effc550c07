//! Concurrent reads under smol: many tasks share one `nbd_smol::Client`,
//! each with its own buffer, requests pipelined on one connection. Reads
//! the whole export and prints its SHA-256 and size (as `sha256sum`).
//!
//! ```text
//! cargo run -p nbd-smol --example smol_reads -- 'nbd+unix:///?socket=/tmp/nbd.sock' [TASKS]
//! ```
//!
//! Threads: `smol::block_on` runs `main`'s future on the main thread. The
//! client's reader and writer tasks (and the tasks spawned here) run on
//! smol's global executor, which starts `SMOL_THREADS` threads (one by
//! default) the first time something is spawned. async-io starts its
//! reactor thread (`async-io`) for the moments no `block_on` drives the
//! reactor, and connecting runs on smol's blocking pool (a thread that
//! exits when idle). nbd-smol starts no other thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nbd_smol::{Client, ClientConfig, NbdUri};
use sha2::{Digest, Sha256};

/// Bytes per read.
const CHUNK: u64 = 256 * 1024;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let uri = NbdUri::parse(&args.next().ok_or("usage: smol_reads URI [TASKS]")?)?;
    let tasks: usize = args.next().map_or(Ok(16), |n| n.parse())?;
    smol::block_on(async {
        let config = ClientConfig::default().meta_contexts(Vec::new());
        let client = Client::connect_uri(&uri, config).await?;
        let size = client.size();
        let image = Arc::new(Mutex::new(vec![0u8; in_memory(size)?]));
        let next = Arc::new(AtomicU64::new(0));
        let workers: Vec<smol::Task<nbd_smol::Result<()>>> = (0..tasks)
            .map(|_| {
                let (client, image, next) = (client.clone(), image.clone(), next.clone());
                smol::spawn(async move {
                    let mut buf = Vec::with_capacity(CHUNK as usize);
                    loop {
                        let offset = next.fetch_add(CHUNK, Ordering::Relaxed);
                        if offset >= size {
                            return Ok(());
                        }
                        buf.resize(CHUNK.min(size - offset) as usize, 0);
                        let (r, back) = client.read(buf, offset).await;
                        r?;
                        let at = offset as usize;
                        image.lock().unwrap()[at..at + back.len()].copy_from_slice(&back);
                        buf = back;
                    }
                })
            })
            .collect();
        for w in workers {
            w.await?;
        }
        client.disconnect().await?;
        let hash = Sha256::digest(&*image.lock().unwrap());
        println!("{hash:x}  {size}");
        Ok(())
    })
}

/// The export's size as a buffer length: the size comes from the server,
/// so it is checked before anything is allocated from it.
fn in_memory(size: u64) -> Result<usize, String> {
    const LIMIT: u64 = 1 << 30;
    if size > LIMIT {
        return Err(format!(
            "the export has {size} bytes; this example reads at most {LIMIT} into memory"
        ));
    }
    usize::try_from(size).map_err(|e| e.to_string())
}
