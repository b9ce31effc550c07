//! A blocking tool that checksums an export: reads it from start to end
//! with `nbd_blocking::Client` and prints its SHA-256 and size, as
//! `sha256sum` prints a file's hash.
//!
//! ```text
//! cargo run -p nbd-blocking --example checksum -- 'nbd+unix:///?socket=/tmp/nbd.sock'
//! ```
//!
//! Any NBD URI works, TLS ones included (`nbds://...?tls-certificates=DIR`).

use nbd_blocking::{Client, ClientConfig, NbdUri};
use sha2::{Digest, Sha256};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let uri = std::env::args().nth(1).ok_or("usage: checksum URI")?;
    let uri = NbdUri::parse(&uri)?;
    // Plain reads: no metadata context is needed.
    let config = ClientConfig::default().meta_contexts(Vec::new());
    let mut client = Client::connect_uri(&uri, config)?;
    let size = client.size();
    let mut hasher = Sha256::new();
    // One buffer for the whole export; `read` splits it into requests the
    // server accepts, and holes arrive as zeroes.
    let mut buf = vec![0u8; 4 << 20];
    let mut offset = 0;
    while offset < size {
        let n = (size - offset).min(buf.len() as u64) as usize;
        client.read(&mut buf[..n], offset)?;
        hasher.update(&buf[..n]);
        offset += n as u64;
    }
    client.disconnect()?;
    println!("{:x}  {size}", hasher.finalize());
    Ok(())
}
