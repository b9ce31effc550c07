//! `nbd-serve`: serve files, block devices or memory over NBD.
//!
//! With no backend it serves a sparse 1 GiB in-memory export on
//! 127.0.0.1:10809. The flags follow what users of qemu-nbd and nbdkit
//! expect; systemd socket activation (`LISTEN_FDS`) is honoured, so
//! `nbdinfo -- [ nbd-serve FILE ]` works. TLS as nbdkit takes it:
//! `--tls=off|on|require` with `--tls-certificates=DIR` (or
//! `--tls-cert`, `--tls-key` and optionally `--tls-ca`). Disk images as
//! qemu-nbd serves them: `-f raw|qcow2` (probed when not given; a format
//! nbd-serve does not serve is refused rather than served as raw), `-s`
//! (snapshot: writes go to a temporary overlay), `-A`
//! (`qemu:allocation-depth`), `-B NAME` (a qcow2 persistent dirty bitmap as
//! `qemu:dirty-bitmap:NAME`), with QEMU's image locks taken on every file.
//!
//! Built with the cargo feature `rbd`, it also serves Ceph RBD images named
//! as QEMU names them: `nbd-serve rbd:POOL/IMAGE[@SNAP][:conf=FILE][:id=USER]`
//! or `--export NAME=rbd:...`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use nbd_proto::server::{ServerConfig, TlsPolicy};
use nbd_smol::server::{Listener, Server, ServerOptions};
use nbd_smol::tls::ServerTlsOptions;
use nbd_storage::image::{ImageFormat, ImageOptions};
use nbd_storage::serve::{Backend, Export, Limits};
use nbd_storage::{MemoryStorage, Storage};

/// Serve files, block devices or memory over the Network Block Device protocol.
#[derive(Parser, Debug)]
#[command(
    name = "nbd-serve",
    version,
    about,
    after_help = "With no FILE and no --memory, serves a sparse 1G in-memory export on 127.0.0.1:10809."
)]
struct Args {
    /// File or block device to serve (the default export); with RBD support
    /// (cargo feature rbd) also `rbd:POOL/IMAGE[@SNAP][:conf=FILE][:id=USER]`.
    file: Option<PathBuf>,
    /// Serve a sparse in-memory export of this size (e.g. 1G, 512M).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory: Option<u64>,
    /// Name of the default export.
    #[arg(short = 'x', long = "export-name", value_name = "NAME", default_value = "")]
    export_name: String,
    /// Description of the default export.
    #[arg(short = 'D', long, value_name = "TEXT")]
    description: Option<String>,
    /// Image format of the files: raw or qcow2 (default: probed; an image
    /// in a format nbd-serve does not serve is refused, never served as
    /// raw).
    #[arg(short = 'f', long = "format", value_name = "FORMAT")]
    format: Option<ImageFormat>,
    /// Snapshot mode: writes go to a temporary overlay; the image files
    /// are left unchanged.
    #[arg(short = 's', long = "snapshot")]
    snapshot: bool,
    /// Offer the qemu:allocation-depth metadata context.
    #[arg(short = 'A', long = "allocation-depth")]
    allocation_depth: bool,
    /// Offer the qcow2 image's persistent dirty bitmap NAME as the
    /// qemu:dirty-bitmap:NAME metadata context (repeatable; the default
    /// export's FILE only).
    #[arg(short = 'B', long = "bitmap", value_name = "NAME")]
    bitmaps: Vec<String>,
    /// More exports: NAME=FILE, NAME=memory:SIZE or NAME=rbd:POOL/IMAGE...
    /// (repeatable; -f, -s, -A apply to files, -r to all).
    #[arg(long = "export", value_name = "NAME=FILE")]
    exports: Vec<String>,
    /// Serve every export read-only.
    #[arg(short = 'r', long = "read-only", alias = "readonly")]
    read_only: bool,
    /// Listen on a Unix socket instead of TCP.
    #[arg(short = 'k', long = "socket", alias = "unix", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// TCP address to listen on.
    #[arg(short = 'b', long = "bind", value_name = "ADDR", default_value = "127.0.0.1")]
    bind: IpAddr,
    /// TCP port to listen on.
    #[arg(short = 'p', long, default_value_t = 10809)]
    port: u16,
    /// Threads serving connections (default 1, or SMOL_THREADS).
    #[arg(short = 't', long, value_name = "N")]
    threads: Option<usize>,
    /// Maximum number of connections served at once.
    #[arg(short = 'e', long = "max-connections", alias = "shared", default_value_t = 1024)]
    max_connections: usize,
    /// Write the process id to this file once listening.
    #[arg(long = "pidfile", alias = "pid-file", value_name = "PATH")]
    pidfile: Option<PathBuf>,
    /// Seconds a client has to finish the handshake.
    #[arg(long = "handshake-timeout", value_name = "SECS", default_value_t = 10)]
    handshake_timeout: u64,
    /// Largest READ or WRITE accepted from a client that negotiated no block
    /// sizes (the spec asks for at least 32M; clients that asked for block
    /// sizes are held to the 32M maximum they were sent). WRITE payloads
    /// reach storage in 1M pieces as they arrive, so this costs no memory
    /// up front.
    #[arg(long = "max-payload", value_name = "SIZE", value_parser = parse_size, default_value = "64M")]
    max_payload: u64,
    /// Payload memory (READ replies and WRITE pieces in flight) over all
    /// clients; a client that would exceed it waits.
    #[arg(long = "payload-memory", value_name = "SIZE", value_parser = parse_size, default_value = "1G")]
    payload_memory: u64,
    /// Threads that run blocking storage calls (file and block-device I/O).
    #[arg(long = "io-threads", value_name = "N", default_value_t = 16)]
    io_threads: usize,
    /// Use oldstyle negotiation (legacy clients only; default export only).
    #[arg(long)]
    oldstyle: bool,
    /// Do not offer structured replies (nor extended headers).
    #[arg(long = "no-sr")]
    no_structured_replies: bool,
    /// Do not offer extended headers.
    #[arg(long = "no-extended-headers")]
    no_extended_headers: bool,
    /// Refuse NBD_OPT_GO/INFO as an old server would (clients fall back to
    /// NBD_OPT_EXPORT_NAME).
    #[arg(long = "no-go", hide = true)]
    no_go: bool,
    /// Log each connection's negotiated mode (e.g. "extended headers") and
    /// export to stderr.
    #[arg(short = 'v', long)]
    verbose: bool,
    /// TLS: off (never), on (offered; clients choose), require (every
    /// option but STARTTLS and ABORT is refused until TLS runs). Default:
    /// require when a certificate is given, else off.
    #[arg(long, value_enum, value_name = "MODE")]
    tls: Option<TlsArg>,
    /// Directory with server-cert.pem, server-key.pem and ca-cert.pem,
    /// as nbdkit's --tls-certificates and QEMU's tls-creds-x509 dir=.
    #[arg(long = "tls-certificates", value_name = "DIR")]
    tls_certificates: Option<PathBuf>,
    /// The server's certificate (PEM); overrides the directory's.
    #[arg(long = "tls-cert", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The server certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long = "tls-key", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Require client certificates issued by this CA (PEM).
    #[arg(long = "tls-ca", value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Require client certificates issued by the CA of --tls-certificates
    /// (its ca-cert.pem), as nbdkit's --tls-verify-peer.
    #[arg(long = "tls-verify-peer")]
    tls_verify_peer: bool,
    /// Accepted for compatibility: nbd-serve always runs in the foreground.
    #[arg(long, hide = true)]
    foreground: bool,
}

/// `--tls` values, named as nbdkit names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TlsArg {
    /// No TLS (NOTLS).
    Off,
    /// TLS offered, plain connections allowed (SELECTIVETLS with no
    /// TLS-only export).
    On,
    /// TLS required (FORCEDTLS).
    Require,
}

/// The TLS policy and the rustls configuration the flags ask for.
fn tls_setup(args: &Args) -> Result<(TlsPolicy, Option<Arc<nbd_smol::tls::rustls::ServerConfig>>), String> {
    let mut opts = args
        .tls_certificates
        .as_deref()
        .map(|d| ServerTlsOptions::from_dir(d, args.tls_verify_peer));
    if args.tls_verify_peer && opts.is_none() && args.tls_ca.is_none() {
        return Err("--tls-verify-peer needs --tls-certificates (or use --tls-ca)".into());
    }
    match (&args.tls_cert, &args.tls_key, &mut opts) {
        (Some(c), Some(k), o) => {
            let client_ca = o.as_ref().and_then(|o| o.client_ca.clone());
            *o = Some(ServerTlsOptions {
                cert: c.clone(),
                key: k.clone(),
                client_ca,
            });
        }
        (Some(c), None, Some(o)) => o.cert = c.clone(),
        (None, Some(k), Some(o)) => o.key = k.clone(),
        (Some(_), None, None) | (None, Some(_), None) => {
            return Err("--tls-cert and --tls-key go together (or give --tls-certificates)".into());
        }
        (None, None, _) => {}
    }
    if let Some(ca) = &args.tls_ca {
        match &mut opts {
            Some(o) => o.client_ca = Some(ca.clone()),
            None => return Err("--tls-ca needs a server certificate (--tls-cert and --tls-key)".into()),
        }
    }
    let mode = args
        .tls
        .unwrap_or(if opts.is_some() { TlsArg::Require } else { TlsArg::Off });
    let policy = match mode {
        TlsArg::Off if opts.is_some() => {
            return Err("--tls=off with a TLS certificate: choose --tls=on or --tls=require".into());
        }
        TlsArg::Off => return Ok((TlsPolicy::NoTls, None)),
        TlsArg::On => TlsPolicy::SelectiveTls,
        TlsArg::Require => TlsPolicy::ForcedTls,
    };
    let Some(opts) = opts else {
        return Err("--tls=on and --tls=require need --tls-certificates=DIR or --tls-cert and --tls-key".into());
    };
    let config = opts.build().map_err(|e| e.to_string())?;
    Ok((policy, Some(config)))
}

/// Parses sizes like `1G`, `512M`, `4096`, `1.5G` (binary multiples).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'P' => 1 << 50,
                'E' => 1 << 60,
                _ => return Err(format!("invalid size {s:?}: unknown suffix {c:?}")),
            };
            (&t[..t.len() - 1], m)
        }
        _ => (t, 1),
    };
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or_else(|| format!("size {s:?} is too large"));
    }
    match num.parse::<f64>() {
        Ok(f) if f >= 0.0 && f.is_finite() && f * (mult as f64) < u64::MAX as f64 => Ok((f * mult as f64) as u64),
        _ => Err(format!("invalid size {s:?}")),
    }
}

/// The RBD images opened so far: their cluster connections are shared,
/// and each is closed (flushed, its exclusive lock released) before
/// nbd-serve exits.
#[cfg(feature = "rbd")]
#[derive(Default)]
struct Rbd {
    connections: nbd_storage::rbd::RbdConnections,
    images: Vec<(String, std::sync::Weak<nbd_storage::rbd::RbdStorage>)>,
}

#[cfg(not(feature = "rbd"))]
#[derive(Default)]
struct Rbd {
    _nothing: (),
}

impl Rbd {
    /// Opens `rbd:POOL/IMAGE...`.
    #[cfg(feature = "rbd")]
    fn open(&mut self, spec: &str, read_only: bool) -> Result<Backend, String> {
        let parsed = nbd_storage::rbd::RbdSpec::parse(spec).map_err(|e| e.to_string())?;
        let image = Arc::new(self.connections.open(&parsed, read_only).map_err(|e| e.to_string())?);
        self.images.push((image.name().to_string(), Arc::downgrade(&image)));
        Ok(Backend::Async(image))
    }

    #[cfg(not(feature = "rbd"))]
    fn open(&mut self, spec: &str, _read_only: bool) -> Result<Backend, String> {
        Err(format!(
            "{spec}: this nbd-serve was built without RBD support (cargo feature rbd)"
        ))
    }

    /// Closes every image once the server let go of it: writes
    /// acknowledged to clients are made durable (librbd's cache
    /// acknowledges them before they reach the OSDs) and the exclusive
    /// locks released. An image still held after a while is flushed.
    #[cfg(feature = "rbd")]
    fn close_all(self) -> Result<(), String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        for (name, image) in self.images {
            while image.strong_count() > 0 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if let Some(image) = image.upgrade() {
                image
                    .flush_blocking()
                    .map_err(|e| format!("flushing RBD image {name}: {e}"))?;
            }
        }
        Ok(())
    }

    #[cfg(not(feature = "rbd"))]
    fn close_all(self) -> Result<(), String> {
        Ok(())
    }
}

/// Opens what a FILE argument or an --export's right side names.
fn open_backend(spec: &str, args: &Args, bitmaps: &[String], rbd: &mut Rbd) -> Result<Backend, String> {
    if spec.starts_with("rbd:") {
        if !bitmaps.is_empty() {
            return Err("-B/--bitmap needs a qcow2 image, not an RBD image".into());
        }
        return rbd.open(spec, args.read_only);
    }
    open_storage(spec, args, bitmaps).map(Backend::Sync)
}

fn open_storage(spec: &str, args: &Args, bitmaps: &[String]) -> Result<Arc<dyn Storage>, String> {
    if let Some(size) = spec.strip_prefix("memory:") {
        let size = parse_size(size)?;
        return Ok(Arc::new(MemoryStorage::with_options(size, args.read_only)));
    }
    let options = ImageOptions {
        format: args.format,
        read_only: args.read_only,
        snapshot: args.snapshot,
        allocation_depth: args.allocation_depth,
        bitmaps: bitmaps.to_vec(),
        temp_dir: None,
    };
    // The errors name the file themselves.
    nbd_storage::image::open(std::path::Path::new(spec), &options).map_err(|e| e.to_string())
}

fn run(args: Args) -> Result<(), String> {
    let mut exports = Vec::new();
    let mut rbd = Rbd::default();
    let memory = |size| Backend::Sync(Arc::new(MemoryStorage::with_options(size, args.read_only)) as Arc<dyn Storage>);
    let default = match (&args.file, args.memory) {
        (Some(_), Some(_)) => return Err("give either FILE or --memory, not both".into()),
        (Some(f), None) => Some(open_backend(
            f.to_str().ok_or("file name is not UTF-8")?,
            &args,
            &args.bitmaps,
            &mut rbd,
        )?),
        (None, Some(size)) => Some(memory(size)),
        (None, None) if args.exports.is_empty() => Some(memory(1 << 30)),
        (None, None) => None,
    };
    if !args.bitmaps.is_empty() && args.file.is_none() {
        return Err("-B/--bitmap needs a FILE (the default export's image)".into());
    }
    if let Some(backend) = default {
        exports.push(Export {
            name: args.export_name.clone(),
            description: args.description.clone().unwrap_or_default(),
            backend,
        });
    }
    for spec in &args.exports {
        let (name, backend) = spec
            .split_once('=')
            .ok_or_else(|| format!("--export {spec:?}: expected NAME=FILE"))?;
        if exports.iter().any(|e| e.name == name) {
            return Err(format!("export {name:?} given twice"));
        }
        exports.push(Export {
            name: name.to_string(),
            description: String::new(),
            backend: open_backend(backend, &args, &[], &mut rbd)?,
        });
    }
    let (tls_policy, tls) = tls_setup(&args)?;
    if args.oldstyle && tls_policy == TlsPolicy::ForcedTls {
        return Err("--oldstyle cannot do TLS: it would refuse every client".into());
    }
    let config = ServerConfig {
        tls: tls_policy,
        oldstyle: args.oldstyle,
        structured_replies: !args.no_structured_replies,
        extended_headers: !args.no_extended_headers && !args.no_structured_replies,
        support_go: !args.no_go,
        handshake_timeout: Some(Duration::from_secs(args.handshake_timeout)),
        unnegotiated_max_payload: args.max_payload,
        ..ServerConfig::default()
    };
    let options = ServerOptions {
        config,
        max_connections: args.max_connections,
        verbose: args.verbose,
        tls,
        limits: Limits {
            payload_budget: args.payload_memory.max(args.max_payload),
            io_threads: args.io_threads.max(1),
            ..Limits::default()
        },
    };
    let listeners = match Listener::from_systemd().map_err(|e| format!("socket activation: {e}"))? {
        Some(l) => l,
        None => match &args.socket {
            Some(p) => vec![Listener::bind_unix(p).map_err(|e| format!("{}: {e}", p.display()))?],
            None => {
                let addr = SocketAddr::new(args.bind, args.port);
                vec![Listener::bind_tcp(addr).map_err(|e| format!("{addr}: {e}"))?]
            }
        },
    };
    if let Some(p) = &args.pidfile {
        std::fs::write(p, format!("{}\n", std::process::id())).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    // Image backends keep metadata in memory: flush them when serving ends.
    let storages: Vec<Arc<dyn Storage>> = exports
        .iter()
        .filter_map(|e| match &e.backend {
            nbd_storage::serve::Backend::Sync(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    let server = Server::new(exports, options);
    {
        let server = server.clone();
        let mut signals =
            signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])
                .map_err(|e| format!("signals: {e}"))?;
        std::thread::spawn(move || {
            if signals.forever().next().is_some() {
                server.shutdown();
            }
        });
    }
    let mut r = nbd_smol::block_on(server.serve(listeners)).map_err(|e| e.to_string());
    for s in &storages {
        if let Err(e) = s.flush() {
            r = r.and(Err(format!("flushing an export on exit: {e}")));
        }
    }
    drop(server);
    r = r.and(rbd.close_all());
    if let Some(p) = &args.pidfile {
        let _ = std::fs::remove_file(p);
    }
    r
}

/// Payload buffers (READ replies, WRITE pieces) are large and come and go
/// with the load: with glibc's default, the threshold above which it maps
/// them separately grows after the first ones are freed, and later ones
/// come from heaps that are not given back to the system, so an idle
/// server would keep the memory of its busiest moment. A fixed threshold
/// keeps every large buffer mapped on its own: freed, it is returned.
fn return_freed_buffers_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes a malloc tunable; it is called before
    // any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

fn main() -> ExitCode {
    return_freed_buffers_to_the_system();
    let args = Args::parse();
    // Connections are served by smol's global executor, with `--threads`
    // threads (SMOL_THREADS when the flag is not given). One thread runs the
    // socket reactor and the connections together without cross-thread
    // wake-ups, which measured fastest for a client or a few on 2 CPUs.
    if let Some(n) = args.threads {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("SMOL_THREADS", n.max(1).to_string()) };
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nbd-serve: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1.5K"), Ok(1536));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999E").is_err());
    }
}
