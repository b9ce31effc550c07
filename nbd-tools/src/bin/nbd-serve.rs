//! `nbd-serve`: serve files, block devices or memory over NBD.
//!
//! With no backend it serves a sparse 1 GiB in-memory export on
//! 127.0.0.1:10809 until it is stopped. The command line is qemu-nbd's
//! where qemu-nbd has the option (`-t`, `-e`, `-f`, `-s`, `-k`, `-x`,
//! `-D`, `-r`, `-b`, `-p`, `-A`, `-B`, `--fork`, `--pid-file`,
//! `--handshake-limit`), so a qemu-nbd command line works unchanged, and
//! nbdkit's for what qemu-nbd lacks (`--run`, `--print-uri`, `--single`,
//! `--tls=...`). Systemd socket activation (`LISTEN_FDS`) is honoured, so
//! `nbdinfo -- [ nbd-serve FILE ]` works. TLS as nbdkit takes it:
//! `--tls=off|on|require` with `--tls-certificates=DIR` (or
//! `--tls-cert`, `--tls-key` and optionally `--tls-ca`). Disk images as
//! qemu-nbd serves them: `-f raw|qcow2` (probed when not given; a format
//! nbd-serve does not serve is refused rather than served as raw), `-s`
//! (snapshot: writes go to a temporary overlay), `-A`
//! (`qemu:allocation-depth`), `-B NAME` (a qcow2 persistent dirty bitmap as
//! `qemu:dirty-bitmap:NAME`), with QEMU's image locks taken on every file.
//!
//! A FILE that is an `http://` or `https://` URL is a disk on a web
//! server, read with HTTP range requests as nbdkit's curl plugin reads it
//! (read-only; `-s` puts a copy-on-write overlay on it; `--http
//! KEY=VALUE` takes nbdkit curl's parameters). Its first bytes are probed
//! as a file's are: a qcow2 image is served as the guest disk it holds,
//! with its backing chain read from the same server (`-f raw` serves the
//! bytes as they are), and other formats are refused unless `-f raw`.
//!
//! A FILE that is an NBD URI (`nbd://`, `nbds://`, `nbd+unix://`,
//! `nbds+unix://`) is an export of another NBD server, served through this
//! one (a proxy) with the async client's deadlines and reconnection: a
//! restart of the upstream server within `--upstream-reconnect-delay`
//! (60 s by default) is invisible to the clients, whose requests wait and
//! are sent again. The export's size, flags and block sizes (and, unless
//! `-x` or `-D` say otherwise, its name and description) are the
//! upstream's; `-r` serves it read-only.
//!
//! Built with the cargo feature `rbd`, it also serves Ceph RBD images named
//! as QEMU names them: `nbd-serve rbd:POOL/IMAGE[@SNAP][:conf=FILE][:id=USER]`
//! or `--export NAME=rbd:...`.
//!
//! Lifecycle: SIGTERM, SIGINT and SIGHUP stop it (as they stop qemu-nbd
//! and nbdkit): it stops accepting, answers what clients sent, waits up
//! to `--shutdown-timeout` seconds for them, closes what is still open,
//! flushes the exports and removes its socket and pid file. A second
//! signal closes every connection at once.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use clap::Parser;
use nbd_proto::common::TlsMode;
use nbd_proto::server::{ServerConfig, TlsPolicy};
use nbd_proto::uri::{NbdUri, Transport};
use nbd_server::{Backend, Export, Limits};
use nbd_smol::client::{ConnectOptions, Reconnect, Timeouts};
use nbd_smol::server::{Listener, Server, ServerOptions};
use nbd_smol::tls::ServerTlsOptions;
use nbd_smol::upstream::{NbdStorage, UpstreamOptions};
use nbd_storage::cow::CowStorage;
use nbd_storage::filter::{self, FilterSpec};
use nbd_storage::http::{HttpLayers, HttpOptions, HttpStorage};
use nbd_storage::image::remote;
use nbd_storage::image::{ImageFormat, ImageOptions, ImageSet};
use nbd_storage::{MemoryStorage, Storage};
use nbd_tools::captive::describe_status;
use nbd_tools::cli::{PrivateDir, shell_quote};
use nbd_tools::parse_size;

/// Serve files, block devices, disk images or memory over the Network
/// Block Device protocol, with qemu-nbd's options (and nbdkit's --run,
/// --print-uri, --single and --tls).
#[derive(Parser, Debug)]
#[command(
    name = "nbd-serve",
    version,
    after_help = "With no FILE and no --memory, serves a sparse 1G in-memory export on 127.0.0.1:10809.\n\
                  It serves until stopped (SIGTERM, SIGINT or SIGHUP); --no-persistent exits after the last client, \
                  as qemu-nbd does without -t.\n\
                  Examples:\n  \
                  nbd-serve -t -k /tmp/s disk.img                 (qemu-nbd's command line)\n  \
                  nbd-serve --fork --persistent --shared=5 --socket=/tmp/s --read-only --format=qcow2 disk.qcow2\n  \
                  nbd-serve disk.img --run 'nbdcopy \"$uri\" out.img'   (nbdkit's captive mode)\n  \
                  nbdinfo -- [ nbd-serve -r disk.img ]            (socket activation)\n  \
                  nbd-serve --filter=cow --filter=retry https://host/disk.img   (a disk on a web server)\n  \
                  nbd-serve -k /tmp/proxy nbd+unix:///disk?socket=/tmp/upstream   (a proxy that rides out upstream restarts)"
)]
struct Args {
    /// File or block device to serve (the default export); or an
    /// `http://` or `https://` URL (a disk on a web server, read with
    /// range requests, read-only; probed: a qcow2 image is served as its
    /// guest disk, its backing chain from the same server); or an NBD URI (`nbd://HOST/EXPORT`,
    /// `nbds://...`, `nbd+unix:///EXPORT?socket=PATH`): an export of
    /// another NBD server, served through this one; with RBD support
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
    /// More exports: NAME=FILE, NAME=URL, NAME=NBD-URI, NAME=memory:SIZE
    /// or NAME=rbd:POOL/IMAGE...
    /// (repeatable; -f, -s, -A apply to files, -r to all). Prefixes make
    /// one export read-only (`ro:`) or a snapshot (`snapshot:`), e.g.
    /// `--export cow=snapshot:disk.img --export ro=ro:disk.img`. Exports
    /// of one file share one open image: the read-only ones see the
    /// writable one's writes.
    #[arg(long = "export", value_name = "NAME=FILE")]
    exports: Vec<String>,
    /// Stack a filter on every export, with nbdkit's filter names and
    /// parameters: NAME[:KEY=VALUE,...] (repeatable; as with nbdkit, the
    /// first one given is the one clients talk to, the last sits on the
    /// storage), e.g. `--filter=cow --filter=retry:retries=3
    /// --filter=delay:rdelay=100ms`. Filters: cache (cache=writeback,
    /// writethrough or unsafe, cache-on-read, cache-min-block-size,
    /// cache-max-size, cache-high-threshold, cache-low-threshold,
    /// cachedir), cow (cow-block-size), delay
    /// (rdelay, wdelay, delay-read, -write, -zero, -trim, -extents,
    /// -cache, delay-fast-zero), error (error, error-rate, error-file and
    /// per operation error-pread..., error-pwrite..., error-trim...,
    /// error-zero..., error-extents..., error-cache...), readahead (no
    /// parameters), retry (retries,
    /// retry-delay, retry-exponential, retry-readonly). Not on RBD or NBD
    /// (upstream server) exports.
    #[arg(long = "filter", value_name = "NAME[:KEY=VALUE,...]")]
    filters: Vec<String>,
    /// A parameter of the http:// and https:// exports, with nbdkit curl's
    /// names (repeatable): header=NAME:VALUE, cainfo=FILE, capath=DIR,
    /// sslverify=false, timeout=SECS, connect-timeout=SECS, proxy=URL,
    /// noproxy=HOSTS, user-agent=TEXT, cookie=TEXT, followlocation=false,
    /// connections=N, retries=N (attempts of a read, default 5).
    #[arg(long = "http", value_name = "KEY=VALUE")]
    http: Vec<String>,
    /// NBD upstreams (nbd://... exports): how long requests wait for a
    /// broken connection to the upstream server to be made again (its
    /// restart), in seconds; past it they fail with EIO, and the next
    /// request dials again. 0: no reconnection (requests fail at once when
    /// the connection breaks).
    #[arg(long = "upstream-reconnect-delay", value_name = "SECS", default_value_t = 60)]
    upstream_reconnect_delay: u64,
    /// NBD upstreams: seconds to open a connection, and again to finish
    /// the handshake (0: no limit).
    #[arg(long = "upstream-timeout", value_name = "SECS", default_value_t = 30)]
    upstream_timeout: u64,
    /// NBD upstreams: seconds each request may take before the connection
    /// is deemed broken (and made again, with reconnection) (0, the
    /// default: no limit; a live but slow upstream is waited for).
    #[arg(long = "upstream-request-timeout", value_name = "SECS", default_value_t = 0)]
    upstream_request_timeout: u64,
    /// NBD upstreams: connections to each upstream export, if it allows
    /// multi-conn.
    #[arg(long = "upstream-connections", value_name = "N", default_value_t = 4)]
    upstream_connections: usize,
    /// Serve every export read-only.
    #[arg(short = 'r', long = "read-only", alias = "readonly")]
    read_only: bool,
    /// Listen on a Unix socket instead of TCP (-b and -p are then ignored,
    /// as qemu-nbd ignores them). `-` makes a private socket in a new
    /// temporary directory, as nbdkit's `-U -` (see --print-uri, --run).
    #[arg(short = 'k', long = "socket", alias = "unix", short_alias = 'U', value_name = "PATH")]
    socket: Option<PathBuf>,
    /// TCP address to listen on [default: 127.0.0.1].
    #[arg(short = 'b', long = "bind", value_name = "ADDR")]
    bind: Option<IpAddr>,
    /// TCP port to listen on (0: any free port, see --print-uri) [default:
    /// 10809].
    #[arg(short = 'p', long)]
    port: Option<u16>,
    /// Keep serving after the last client disconnects. This is the
    /// default; the flag is accepted for qemu-nbd command lines.
    #[arg(short = 't', long, overrides_with = "no_persistent")]
    persistent: bool,
    /// Exit when the last client disconnects, as qemu-nbd does without
    /// -t (the server waits for a first client).
    #[arg(long = "no-persistent", overrides_with = "persistent")]
    no_persistent: bool,
    /// Serve at most N clients at once; more wait in the listen queue
    /// (0: no limit). qemu-nbd's default is 1.
    #[arg(
        short = 'e',
        long = "shared",
        alias = "max-connections",
        value_name = "N",
        default_value_t = 1024
    )]
    shared: usize,
    /// Threads serving connections (default 1, or SMOL_THREADS).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Write the process id to this file once listening; it is removed
    /// when nbd-serve exits.
    #[arg(long = "pid-file", alias = "pidfile", short_alias = 'P', value_name = "PATH")]
    pid_file: Option<PathBuf>,
    /// Go to the background once serving; the command exits 0 then, or
    /// with the server's error if it could not start (as qemu-nbd
    /// --fork). Its output goes to /dev/null from then on (stderr too,
    /// unless -v).
    #[arg(long)]
    fork: bool,
    /// Seconds a client has to finish the handshake (0: no limit).
    #[arg(
        long = "handshake-limit",
        alias = "handshake-timeout",
        value_name = "SECS",
        default_value_t = 10
    )]
    handshake_limit: u64,
    /// Seconds to let clients finish what they sent when stopped
    /// (SIGTERM, SIGINT, SIGHUP, the end of --run or of the last client
    /// with --no-persistent); connections still open then are closed (0:
    /// at once).
    #[arg(long = "shutdown-timeout", value_name = "SECS", default_value_t = 5)]
    shutdown_timeout: u64,
    /// Run CMD with sh once serving, then stop when it exits and exit
    /// with its status (nbdkit's captive mode). CMD sees the shell
    /// variables $uri (and its old name $nbd), $unixsocket, $port,
    /// $exportname and $tls. Without -k, -b or -p, the server listens on a
    /// private Unix socket.
    #[arg(long, value_name = "CMD")]
    run: Option<String>,
    /// Print the NBD URI of the default export on stdout once serving.
    #[arg(long = "print-uri")]
    print_uri: bool,
    /// Serve one client on stdin/stdout (a socket, or a pair of pipes),
    /// then exit: for inetd and for libnbd's nbd_connect_command (nbdkit's
    /// -s; here -s is qemu-nbd's --snapshot).
    #[arg(long = "single", alias = "stdin")]
    single: bool,
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
    /// Accepted for compatibility: nbd-serve runs in the foreground unless
    /// --fork is given.
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

/// What one export serves, before anything is opened.
enum Source {
    Memory {
        size: u64,
        read_only: bool,
    },
    Rbd {
        spec: String,
        read_only: bool,
    },
    /// An export of another NBD server.
    Nbd {
        uri: NbdUri,
        read_only: bool,
    },
    /// An index into the [`ImageSet`] that opens every file once.
    Image(usize),
    /// A disk on a web server (always read-only).
    Http {
        url: String,
        snapshot: bool,
    },
}

/// Parses what a FILE argument or an --export's right side names: its
/// per-export prefixes (`ro:`, `snapshot:`, in any order, before the rest),
/// then `memory:SIZE`, `rbd:...` or a file, which goes into `images`.
fn parse_source(spec: &str, args: &Args, bitmaps: &[String], images: &mut ImageSet) -> Result<Source, String> {
    let mut rest = spec;
    let (mut read_only, mut snapshot) = (args.read_only, args.snapshot);
    loop {
        if let Some(r) = rest.strip_prefix("ro:") {
            read_only = true;
            rest = r;
        } else if let Some(r) = rest.strip_prefix("snapshot:") {
            snapshot = true;
            rest = r;
        } else {
            break;
        }
    }
    if let Some(size) = rest.strip_prefix("memory:") {
        if snapshot {
            return Err(format!("{spec}: a memory export has no snapshot mode"));
        }
        return Ok(Source::Memory {
            size: parse_size(size)?,
            read_only,
        });
    }
    if rest.starts_with("rbd:") {
        if !bitmaps.is_empty() {
            return Err("-B/--bitmap needs a qcow2 image, not an RBD image".into());
        }
        if snapshot {
            return Err(format!("{spec}: an RBD export has no snapshot mode"));
        }
        return Ok(Source::Rbd {
            spec: rest.to_string(),
            read_only,
        });
    }
    if is_nbd_uri(rest) {
        let uri = NbdUri::parse(rest).map_err(|e| format!("{rest}: {e}"))?;
        if !bitmaps.is_empty() {
            return Err("-B/--bitmap needs a qcow2 image, not an NBD upstream".into());
        }
        if snapshot {
            return Err(format!("{spec}: an NBD upstream has no snapshot mode"));
        }
        if args.format == Some(ImageFormat::Qcow2) {
            return Err(format!("{rest}: NBD upstreams are served as they are (not -f qcow2)"));
        }
        return Ok(Source::Nbd { uri, read_only });
    }
    if nbd_storage::http::is_http_url(rest) {
        if !bitmaps.is_empty() {
            return Err(
                "-B/--bitmap: persistent dirty bitmaps are offered for local qcow2 images only, not over HTTP".into(),
            );
        }
        return Ok(Source::Http {
            url: rest.to_string(),
            snapshot,
        });
    }
    let options = ImageOptions {
        format: args.format,
        read_only,
        snapshot,
        allocation_depth: args.allocation_depth,
        bitmaps: bitmaps.to_vec(),
        temp_dir: None,
    };
    Ok(Source::Image(images.add(rest, options)))
}

fn run(args: Args, forked: Option<Forked>) -> Result<u8, String> {
    check_modes(&args)?;
    let filters: Vec<FilterSpec> = args
        .filters
        .iter()
        .map(|f| f.parse().map_err(|e| format!("--filter {e}")))
        .collect::<Result<_, _>>()?;
    let mut http_options = HttpOptions::default();
    for p in &args.http {
        http_options.set_param(p).map_err(|e| format!("--http {e}"))?;
    }
    let mut images = ImageSet::new();
    // (name, description, source) of every export, in order.
    let mut wanted: Vec<(String, String, Source)> = Vec::new();
    let default = match (&args.file, args.memory) {
        (Some(_), Some(_)) => return Err("give either FILE or --memory, not both".into()),
        (Some(f), None) => Some(parse_source(
            f.to_str().ok_or("file name is not UTF-8")?,
            &args,
            &args.bitmaps,
            &mut images,
        )?),
        (None, Some(size)) => Some(Source::Memory {
            size,
            read_only: args.read_only,
        }),
        (None, None) if args.exports.is_empty() => Some(Source::Memory {
            size: 1 << 30,
            read_only: args.read_only,
        }),
        (None, None) => None,
    };
    if !args.bitmaps.is_empty() && args.file.is_none() {
        return Err("-B/--bitmap needs a FILE (the default export's image)".into());
    }
    if let Some(source) = default {
        wanted.push((
            args.export_name.clone(),
            args.description.clone().unwrap_or_default(),
            source,
        ));
    }
    for spec in &args.exports {
        let (name, rest) = spec
            .split_once('=')
            .ok_or_else(|| format!("--export {spec:?}: expected NAME=FILE"))?;
        if wanted.iter().any(|(n, _, _)| n == name) {
            return Err(format!("export {name:?} given twice"));
        }
        let source = parse_source(rest, &args, &[], &mut images)?;
        wanted.push((name.to_string(), String::new(), source));
    }
    // Every file once, however many exports name it. The errors name the
    // file themselves.
    let mut opened: Vec<Option<Arc<dyn Storage>>> = images
        .open()
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(Some)
        .collect();
    let mut rbd = Rbd::default();
    let mut exports = Vec::with_capacity(wanted.len());
    for (mut name, mut description, source) in wanted {
        let backend = match source {
            Source::Memory { size, read_only } => {
                Backend::Sync(Arc::new(MemoryStorage::with_options(size, read_only)) as Arc<dyn Storage>)
            }
            Source::Rbd { .. } if !filters.is_empty() => {
                return Err("--filter applies to files, images and memory exports, not to RBD exports".into());
            }
            Source::Rbd { spec, read_only } => rbd.open(&spec, read_only)?,
            Source::Nbd { .. } if !filters.is_empty() => {
                return Err("--filter applies to files, images and memory exports, not to NBD upstreams".into());
            }
            Source::Nbd { uri, read_only } => {
                let upstream = open_upstream(&uri, read_only, &args)?;
                if name.is_empty() && !upstream.export_name().is_empty() {
                    // The upstream's name, unless -x named it.
                    name = upstream.export_name().to_string();
                }
                if description.is_empty()
                    && let Some(d) = upstream.description()
                {
                    description = d.to_string();
                }
                Backend::Async(Arc::new(upstream))
            }
            Source::Image(i) => Backend::Sync(opened[i].take().ok_or("an image was opened for two exports")?),
            Source::Http { url, snapshot } => Backend::Sync(open_http(&url, snapshot, &http_options, &args)?),
        };
        let backend = match backend {
            Backend::Sync(s) if !filters.is_empty() => {
                Backend::Sync(filter::stack(s, &filters, None).map_err(|e| format!("--filter {e}"))?)
            }
            other => other,
        };
        exports.push(Export {
            name,
            description,
            backend,
        });
    }
    let (tls_policy, tls) = tls_setup(&args)?;
    if args.oldstyle && tls_policy == TlsPolicy::ForcedTls {
        return Err("--oldstyle cannot do TLS: it would refuse every client".into());
    }
    let config = ServerConfig::default()
        .tls(tls_policy)
        .oldstyle(args.oldstyle)
        .structured_replies(!args.no_structured_replies)
        .extended_headers(!args.no_extended_headers && !args.no_structured_replies)
        .support_go(!args.no_go)
        .handshake_timeout((args.handshake_limit > 0).then(|| Duration::from_secs(args.handshake_limit)))
        .unnegotiated_max_payload(args.max_payload);
    let options = ServerOptions::default()
        .config(config)
        .max_connections(if args.shared == 0 { 1 << 30 } else { args.shared })
        .verbose(args.verbose)
        .tls(tls)
        .limits(
            Limits::default()
                .payload_budget(args.payload_memory.max(args.max_payload))
                .io_threads(args.io_threads.max(1)),
        );
    // Image backends keep metadata in memory: flush them when serving ends.
    let storages: Vec<Arc<dyn Storage>> = exports
        .iter()
        .filter_map(|e| match &e.backend {
            nbd_server::Backend::Sync(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    let server = Server::new(exports, options);
    server.stop_after_last_client(args.no_persistent);
    let grace = Duration::from_secs(args.shutdown_timeout);
    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ])
    .map_err(|e| format!("signals: {e}"))?;
    // The --run command, once started (0: none), gets the stop signal too.
    let command_pid = Arc::new(AtomicU32::new(0));
    // The signal thread reaches the server through this slot, emptied when
    // serving ends: the server (and the images its exports hold) must not
    // outlive serving, or RBD images would never be closed.
    let for_signals = Arc::new(std::sync::Mutex::new(Some(server.clone())));
    {
        let slot = for_signals.clone();
        let command_pid = command_pid.clone();
        let mut signals = signals;
        std::thread::spawn(move || {
            let mut first = true;
            for signal in signals.forever() {
                let guard = slot.lock().unwrap_or_else(|p| p.into_inner());
                let Some(server) = guard.as_ref() else {
                    continue;
                };
                if first {
                    server.shutdown_within(grace);
                    let pid = command_pid.load(Ordering::SeqCst);
                    if let Ok(pid) = libc::pid_t::try_from(pid)
                        && pid > 0
                    {
                        // SAFETY: kill(2) has no memory-safety preconditions.
                        unsafe { libc::kill(pid, signal) };
                    }
                    first = false;
                } else {
                    // A second signal: do not wait any longer.
                    server.close_connections();
                }
            }
        });
    }
    let served = if args.single {
        serve_stdio(&server).map(|()| 0)
    } else {
        serve_listening(&args, &server, forked, &command_pid, grace)
    };
    for_signals.lock().unwrap_or_else(|p| p.into_inner()).take();
    let mut r = served;
    for s in &storages {
        if let Err(e) = s.flush() {
            r = r.and(Err(format!("flushing an export on exit: {e}")));
        }
    }
    drop(server);
    if let Err(e) = rbd.close_all() {
        r = r.and(Err(e));
    }
    r
}

/// Opens an http:// or https:// export: read-only, under a copy-on-write
/// overlay with `-s`. Its first bytes are probed as a file's are: a qcow2
/// image is served as its guest disk (its backing chain read from the same
/// server), raw bytes as they are, and a format nbd-serve does not serve
/// is refused unless `-f raw` says to serve its bytes (nbd-serve never
/// serves an image as raw by accident).
fn open_http(url: &str, snapshot: bool, opts: &HttpOptions, args: &Args) -> Result<Arc<dyn Storage>, String> {
    let http: Arc<dyn Storage> = Arc::new(HttpStorage::open_with(url, opts).map_err(|e| e.to_string())?);
    let format = remote::probe_storage(http.as_ref(), url, args.format).map_err(|e| e.to_string())?;
    if format == ImageFormat::Qcow2 {
        let options = ImageOptions {
            format: Some(format),
            // The image itself is only read; a snapshot's overlay takes
            // the writes.
            read_only: !snapshot,
            snapshot,
            allocation_depth: args.allocation_depth,
            bitmaps: Vec::new(),
            temp_dir: None,
        };
        let image =
            remote::open_qcow2(http, url, &HttpLayers::new(opts.clone()), &options).map_err(|e| e.to_string())?;
        return Ok(Arc::new(image));
    }
    if snapshot {
        let cow = CowStorage::new(http, None).map_err(|e| format!("{url}: the snapshot overlay: {e}"))?;
        return Ok(Arc::new(cow));
    }
    Ok(http)
}

/// Whether an export's source is an NBD URI (an upstream server).
fn is_nbd_uri(s: &str) -> bool {
    [
        "nbd://",
        "nbds://",
        "nbd+unix://",
        "nbds+unix://",
        "nbd+vsock://",
        "nbds+vsock://",
    ]
    .iter()
    .any(|p| s.starts_with(p))
}

/// Connects to an NBD upstream with the --upstream-* settings.
fn open_upstream(uri: &NbdUri, read_only: bool, args: &Args) -> Result<NbdStorage, String> {
    let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
    let timeouts = Timeouts::default()
        .connect(secs(args.upstream_timeout))
        .handshake(secs(args.upstream_timeout))
        .request(secs(args.upstream_request_timeout));
    let connect = ConnectOptions::default()
        .timeouts(timeouts)
        .reconnect(secs(args.upstream_reconnect_delay).map(Reconnect::within));
    let options = UpstreamOptions::default()
        .connect(connect)
        .connections(args.upstream_connections.max(1))
        .read_only(read_only);
    nbd_smol::block_on(NbdStorage::connect(uri, options)).map_err(|e| format!("{}: {e}", uri.to_uri_string()))
}

/// Refuses flags that cannot go together.
fn check_modes(args: &Args) -> Result<(), String> {
    if args.single {
        let with = [
            (args.socket.is_some(), "-k/--socket"),
            (args.bind.is_some(), "-b/--bind"),
            (args.port.is_some(), "-p/--port"),
            (args.run.is_some(), "--run"),
            (args.print_uri, "--print-uri"),
            (args.fork, "--fork"),
            (args.no_persistent, "--no-persistent"),
            (
                std::env::var_os("LISTEN_FDS").is_some(),
                "socket activation (LISTEN_FDS)",
            ),
        ];
        if let Some((_, name)) = with.iter().find(|(on, _)| *on) {
            return Err(format!(
                "--single serves the client on stdin/stdout: it cannot be combined with {name}"
            ));
        }
    }
    if args.run.is_some() && args.fork {
        return Err("--run waits for its command: it cannot be combined with --fork".into());
    }
    Ok(())
}

/// Serves the listening sockets (socket activation's, or the ones the
/// flags ask for) until stopped; returns the exit code (the --run
/// command's, else 0).
fn serve_listening(
    args: &Args,
    server: &Server,
    forked: Option<Forked>,
    command_pid: &Arc<AtomicU32>,
    grace: Duration,
) -> Result<u8, String> {
    let (listeners, private) = listen(args)?;
    let uri = listeners.first().and_then(|l| uri_of(args, l));
    // Removed when this function returns, whichever way.
    let _pid_file = match &args.pid_file {
        Some(p) => Some(PidFile::write(p)?),
        None => None,
    };
    if args.print_uri {
        let Some(uri) = &uri else {
            return Err("--print-uri: the socket has no address to print".into());
        };
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", uri.to_uri_string())
            .and_then(|()| out.flush())
            .map_err(|e| format!("--print-uri: {e}"))?;
    }
    if let Some(forked) = forked {
        forked.ready(args.verbose);
    }
    let command = match &args.run {
        Some(cmd) => Some(start_command(cmd, args, uri.as_ref(), server, command_pid, grace)?),
        None => None,
    };
    let served = nbd_smol::block_on(server.serve(listeners)).map_err(|e| e.to_string());
    let status = command.map(|c| c.join().unwrap_or(1));
    drop(private);
    served?;
    Ok(status.unwrap_or(0))
}

/// The sockets to listen on, and the private directory of `-k -` (or of
/// --run without an address), which must outlive them.
fn listen(args: &Args) -> Result<(Vec<Listener>, Option<PrivateDir>), String> {
    if let Some(l) = Listener::from_systemd().map_err(|e| format!("socket activation: {e}"))? {
        return Ok((l, None));
    }
    let private_wanted = args.socket.as_deref() == Some(Path::new("-"))
        || (args.run.is_some() && args.socket.is_none() && args.bind.is_none() && args.port.is_none());
    if private_wanted {
        let dir = PrivateDir::new("nbd-serve-").map_err(|e| format!("private socket directory: {e}"))?;
        let path = dir.join("socket");
        let l = Listener::bind_unix(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        return Ok((vec![l], Some(dir)));
    }
    if let Some(p) = &args.socket {
        let l = Listener::bind_unix(p).map_err(|e| format!("{}: {e}", p.display()))?;
        return Ok((vec![l], None));
    }
    let addr = SocketAddr::new(
        args.bind.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        args.port.unwrap_or(10809),
    );
    let l = Listener::bind_tcp(addr).map_err(|e| format!("{addr}: {e}"))?;
    Ok((vec![l], None))
}

/// The URI of the default export on `listener`, as nbdkit's `$uri`
/// (`nbds` when TLS is required; a wildcard address as `localhost`).
fn uri_of(args: &Args, listener: &Listener) -> Option<NbdUri> {
    let transport = if let Some(path) = listener.unix_path() {
        Transport::Unix {
            socket: path.to_str()?.to_string(),
        }
    } else {
        let addr = listener.tcp_addr()?;
        let host = if addr.ip().is_unspecified() {
            "localhost".to_string()
        } else {
            addr.ip().to_string()
        };
        Transport::Tcp {
            host,
            port: addr.port(),
        }
    };
    Some(NbdUri {
        transport,
        export: args.export_name.clone(),
        tls: if tls_required(args) {
            TlsMode::Require
        } else {
            TlsMode::Off
        },
        tls_certificates: None,
        tls_hostname: None,
        tls_verify_peer: true,
        tls_type: None,
        user: None,
    })
}

/// The TLS mode the flags give: `--tls`, else require with a certificate.
fn tls_mode(args: &Args) -> TlsArg {
    args.tls
        .unwrap_or(if args.tls_certificates.is_some() || args.tls_cert.is_some() {
            TlsArg::Require
        } else {
            TlsArg::Off
        })
}

fn tls_required(args: &Args) -> bool {
    tls_mode(args) == TlsArg::Require
}

/// Starts the --run command with nbdkit's shell variables; a thread waits
/// for it, then stops the server. Joining the thread gives the exit code
/// (the command's, or 128 + the signal that killed it).
fn start_command(
    cmd: &str,
    args: &Args,
    uri: Option<&NbdUri>,
    server: &Server,
    command_pid: &Arc<AtomicU32>,
    grace: Duration,
) -> Result<std::thread::JoinHandle<u8>, String> {
    let uri_string = uri.map(NbdUri::to_uri_string).unwrap_or_default();
    let (port, unixsocket) = match uri.map(|u| &u.transport) {
        Some(Transport::Tcp { port, .. }) => (port.to_string(), String::new()),
        Some(Transport::Unix { socket }) => (String::new(), socket.clone()),
        None => (String::new(), String::new()),
    };
    let mut script = format!(
        "uri={}\nnbd=\"$uri\"\nexportname={}\nport={}\nunixsocket={}\n",
        shell_quote(&uri_string),
        shell_quote(&args.export_name),
        shell_quote(&port),
        shell_quote(&unixsocket)
    );
    match tls_mode(args) {
        TlsArg::On => script.push_str("tls=1\n"),
        TlsArg::Require => script.push_str("tls=2\n"),
        TlsArg::Off => {}
    }
    script.push_str(cmd);
    let mut child = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .spawn()
        .map_err(|e| format!("--run: {e}"))?;
    command_pid.store(child.id(), Ordering::SeqCst);
    let server = server.clone();
    let command_pid = command_pid.clone();
    Ok(std::thread::spawn(move || {
        let code = match child.wait() {
            Ok(status) => match (status.code(), std::os::unix::process::ExitStatusExt::signal(&status)) {
                (Some(c), _) => c.clamp(0, 255) as u8,
                (None, Some(sig)) => {
                    eprintln!("nbd-serve: the --run command {}", describe_status(status));
                    (128 + sig).clamp(0, 255) as u8
                }
                _ => 1,
            },
            Err(e) => {
                eprintln!("nbd-serve: --run: {e}");
                1
            }
        };
        command_pid.store(0, Ordering::SeqCst);
        server.shutdown_within(grace);
        code
    }))
}

/// `--single`: one client on stdin (reading) and stdout (writing), which
/// may be one socket (inetd, libnbd's nbd_connect_command) or two pipes.
fn serve_stdio(server: &Server) -> Result<(), String> {
    let half = |fd: i32, name: &str| -> Result<smol::Async<std::fs::File>, String> {
        // SAFETY: dup only duplicates the descriptor; the copy is owned
        // below, so stdin and stdout themselves stay open.
        let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
        if copy == -1 {
            return Err(format!("--single: {name}: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: `copy` is a descriptor we just made and own alone.
        let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(copy) });
        smol::Async::new(file)
            .map_err(|e| format!("--single: {name} must be a socket or a pipe (not a file or a terminal): {e}"))
    };
    let r = half(libc::STDIN_FILENO, "stdin")?;
    let w = half(libc::STDOUT_FILENO, "stdout")?;
    let result = nbd_smol::block_on(server.serve_connection(r, w));
    // The client may hang up without waiting for the last reply.
    match result {
        Err(e)
            if !matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
            ) =>
        {
            Err(format!("--single: {e}"))
        }
        _ => Ok(()),
    }
}

/// The pid file: written (atomically: a reader never sees it half
/// written) once the server listens, removed when dropped if it still
/// holds this process's id.
struct PidFile {
    path: PathBuf,
}

impl PidFile {
    fn write(path: &Path) -> Result<PidFile, String> {
        let err = |e: std::io::Error| format!("{}: {e}", path.display());
        let tmp = path.with_file_name(format!(
            ".{}.{}.tmp",
            path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
            std::process::id()
        ));
        std::fs::write(&tmp, format!("{}\n", std::process::id())).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            err(e)
        })?;
        Ok(PidFile { path: path.to_owned() })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let ours =
            std::fs::read_to_string(&self.path).is_ok_and(|s| s.trim().parse::<u32>().ok() == Some(std::process::id()));
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The server half of `--fork`: tells the waiting parent that the server
/// is up.
struct Forked {
    pipe: OwnedFd,
}

impl Forked {
    /// Serving: detach from the terminal's streams (stdin and stdout to
    /// /dev/null, stderr too unless `verbose`, as qemu-nbd does) and let
    /// the parent exit with success.
    fn ready(self, verbose: bool) {
        if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
            let mut fds = vec![libc::STDIN_FILENO, libc::STDOUT_FILENO];
            if !verbose {
                fds.push(libc::STDERR_FILENO);
            }
            for fd in fds {
                // SAFETY: dup2 onto the standard descriptors, which this
                // process owns for its whole life.
                unsafe { libc::dup2(null.as_raw_fd(), fd) };
            }
        }
        let mut pipe = std::fs::File::from(self.pipe);
        let _ = pipe.write_all(b"R");
    }
}

/// `--fork`: forks; the parent waits until the child is serving (exit 0)
/// or has failed (its exit status), and never returns. The child goes on
/// in a new session, with what it needs to tell the parent it is ready.
/// Must run before any other thread exists.
fn fork_into_background() -> Result<Forked, String> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == -1 {
        return Err(format!("--fork: pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors were just made and are owned here alone.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: no other thread exists yet (see the caller), so the child
    // may go on running Rust code.
    match unsafe { libc::fork() } {
        -1 => Err(format!("--fork: {}", std::io::Error::last_os_error())),
        0 => {
            drop(read);
            // SAFETY: setsid only changes the process's session.
            unsafe { libc::setsid() };
            Ok(Forked { pipe: write })
        }
        child => {
            drop(write);
            let mut byte = [0u8; 1];
            let mut read = std::fs::File::from(read);
            let got = loop {
                match std::io::Read::read(&mut read, &mut byte) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    r => break r,
                }
            };
            if matches!(got, Ok(1)) && byte[0] == b'R' {
                std::process::exit(0);
            }
            // The child failed before serving (it said why on stderr).
            let mut status = 0;
            // SAFETY: waitpid writes the status of our own child.
            let r = unsafe { libc::waitpid(child, &mut status, 0) };
            let code = if r == child && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) != 0 {
                libc::WEXITSTATUS(status)
            } else {
                1
            };
            std::process::exit(code);
        }
    }
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

/// With socket activation for this process (`LISTEN_FDS`, and
/// `LISTEN_PID` ours if set), checks before any file or socket is opened
/// that the descriptors from 3 on are open: were one missing, the next
/// file opened would get its number and be taken for the socket.
fn check_activation_descriptors() -> Result<(), String> {
    let Ok(fds) = std::env::var("LISTEN_FDS") else {
        return Ok(());
    };
    if std::env::var("LISTEN_PID").is_ok_and(|pid| pid.parse::<u32>().ok() != Some(std::process::id())) {
        return Ok(());
    }
    let Ok(n) = fds.parse::<i32>() else {
        // Listener::from_systemd says what is wrong with it.
        return Ok(());
    };
    for fd in 3..3 + n.clamp(0, 1024) {
        // SAFETY: F_GETFD only reads the descriptor's flags.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            return Err(format!(
                "LISTEN_FDS={fds} but descriptor {fd} is not open: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    return_freed_buffers_to_the_system();
    let args: Args = match nbd_tools::cli::parse_args(std::env::args()) {
        Ok(a) => a,
        Err(code) => return code,
    };
    if let Err(e) = check_activation_descriptors() {
        eprintln!("nbd-serve: socket activation: {e}");
        return ExitCode::FAILURE;
    }
    // Connections are served by smol's global executor, with `--threads`
    // threads (SMOL_THREADS when the flag is not given). One thread runs the
    // socket reactor and the connections together without cross-thread
    // wake-ups, which measured fastest for a client or a few on 2 CPUs.
    if let Some(n) = args.threads {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("SMOL_THREADS", n.max(1).to_string()) };
    }
    let forked = if args.fork {
        if let Err(e) = check_modes(&args) {
            eprintln!("nbd-serve: {e}");
            return ExitCode::FAILURE;
        }
        match fork_into_background() {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("nbd-serve: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    match run(args, forked) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("nbd-serve: {e}");
            ExitCode::FAILURE
        }
    }
}
