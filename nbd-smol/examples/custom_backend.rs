//! A storage backend of your own, served by the same machinery as
//! `nbd-serve` (the async server, its I/O pool, TLS, limits): the way an
//! nbdkit plugin is, but in Rust and in-process.
//!
//! This one is nbdkit's `pattern` plugin: a read-only disk whose every
//! 8-byte word holds its own offset, big-endian; nothing is stored.
//!
//! ```sh
//! cargo run -p nbd-smol --example custom_backend -- /tmp/pattern.sock 1G
//! nbdcopy 'nbd+unix:///?socket=/tmp/pattern.sock' - | od -A d -t x1 | head
//! ```

use std::io;
use std::sync::Arc;

use nbd_proto::wire::ErrorCode;
use nbd_server::Export;
use nbd_smol::server::{Listener, Server, ServerOptions};
use nbd_storage::{Capabilities, Storage, check_range};

struct Pattern {
    size: u64,
}

impl Storage for Pattern {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
            .read_only(true)
            .can_multi_conn(true) // nothing changes, so every connection agrees
            .can_cache(true)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        for (i, b) in buf.iter_mut().enumerate() {
            let at = offset + i as u64;
            *b = (at & !7).to_be_bytes()[(at & 7) as usize];
        }
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: u64, _fua: bool) -> io::Result<()> {
        // The servers refuse writes to read-only exports before they get
        // here; say EPERM all the same.
        Err(io::Error::from_raw_os_error(ErrorCode::EPERM.to_errno()))
    }

    fn never_blocks(&self) -> bool {
        true // computed in memory: run in place, not on the I/O pool
    }
}

fn main() -> io::Result<()> {
    let mut args = std::env::args().skip(1);
    let socket = args.next().unwrap_or_else(|| "/tmp/pattern.sock".into());
    let size = match args.next().as_deref().map(|s| s.trim_end_matches(['G', 'g'])) {
        Some(g) => g.parse::<u64>().map_err(io::Error::other)? << 30,
        None => 1 << 30,
    };
    let export = Export::new("", "nbdkit's pattern plugin, in Rust", Arc::new(Pattern { size }));
    let server = Server::new(vec![export], ServerOptions::default());
    let listener = Listener::bind_unix(&socket)?;
    println!("serving a {size}-byte pattern on {socket}");
    nbd_smol::block_on(server.serve(vec![listener]))
}
