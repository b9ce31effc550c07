//! `nbd-copy`: copy between NBD exports, local files and block devices,
//! stdin and stdout, in the manner of libnbd's `nbdcopy`.
//!
//! `--dirty-bitmap=NAME` makes an incremental backup copy, as
//! virtnbdbackup, oVirt and Incus make them (nbdcopy cannot): only the
//! extents the source's QEMU dirty bitmap (the `qemu:dirty-bitmap:NAME`
//! metadata context, e.g. from `qemu-nbd -B NAME` or `nbd-serve -B NAME`)
//! marks dirty are copied, onto the previous full copy. The source must be
//! an NBD export offering the bitmap; the destination must exist and be
//! at least the source's size, and is never created, truncated or
//! resized; inside the dirty extents holes and zeroes are written as
//! zeroes, outside them nothing is written. `--progress` counts the dirty
//! bytes.
//!
//! `--blkhash[=DIGEST[/BLOCKSIZE]]` computes the source's blkhash while
//! copying (Nir Soffer's block-based hash, as `blksum` and nbdcopy 1.20's
//! `--blkhash` compute it; see `nbd_tools::blkhash`): sha256 of 64 KiB
//! blocks by default; holes and zero extents are hashed without being
//! read. The lowercase hex digest is printed on stdout at the end, or
//! written (with a newline) to `--blkhash-file=PATH`. `null:` as
//! DESTINATION computes the checksum alone. `--blkhash=imageio[/BLOCKSIZE]`
//! computes oVirt imageio's checksum instead (blake2b of 4 MiB blocks, as
//! imageio's checksum API and its client's `checksum()` compute it), and
//! `--blkhash-json` prints it in imageio's JSON form.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Parser;
use nbd_net::resilience::{Reconnect, Timeouts};
use nbd_proto::client::TlsMode;
use nbd_tools::blkhash::{BlkhashSpec, IMAGEIO_SPEC, hex};
use nbd_tools::captive::{CaptiveServer, command_index, extract_commands};
use nbd_tools::copy::{BROKEN_PIPE, CopyOptions, Location, Progress, copy_hashed};
use nbd_tools::progress::{Reporter, Target};

/// The bound on connecting and on the handshake without `--timeout`: a
/// handshake is a few round trips, which no healthy server takes a
/// minute over.
const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// Copy between NBD exports, local files or block devices, stdin and
/// stdout, and null:, as libnbd's nbdcopy does.
///
/// SOURCE and DESTINATION are each an NBD URI (nbd://, nbds://,
/// nbd+unix://, ...), a local file or block device, `-` (stdin as the
/// source, stdout as the destination), a pipe or other stream, or
/// `[ CMD ARGS ... ]`: an NBD server run as a subprocess with systemd
/// socket activation (qemu-nbd, nbdkit, nbd-serve), stopped at the end
/// (the flags inside are the command's; `--` before the first `[`, which
/// nbdcopy needs, is taken too). DESTINATION may also be `null:`, and
/// SOURCE an http:// or https:// URL: a disk on a web server, read
/// with range requests (as nbdkit's curl plugin reads it; see --http),
/// probed as nbd-serve probes files: a qcow2 image is copied as the guest
/// disk it holds, its backing chain read from the same server (-f raw
/// copies its bytes).
///
/// Exit status: 0 when everything was copied, 1 on any error (usage
/// errors included); killed by SIGPIPE when the reader of a stream
/// destination goes away, as the other programs of a pipeline are.
#[derive(Parser, Debug)]
#[command(
    name = "nbd-copy",
    version,
    after_help = "Examples:\n  \
        nbd-copy nbd://example.com local.img\n  \
        nbd-copy local.img nbd://example.com\n  \
        nbd-copy nbd://example.com - | file -\n  \
        nbd-copy https://example.com/disk.img disk.raw\n  \
        cat disk1 disk2 | nbd-copy -- - [ qemu-nbd -f qcow2 output.qcow2 ]\n  \
        nbd-copy --dirty-bitmap=b0 -- [ qemu-nbd -r -f qcow2 -B b0 disk.qcow2 ] full-backup.raw\n  \
        nbd-copy --blkhash disk.raw null:\n  \
        nbd-copy --blkhash=sha1/1M --blkhash-file=disk.sum nbd://server disk.raw\n  \
        nbd-copy --blkhash=imageio --blkhash-json nbd://server null:"
)]
struct Args {
    /// Source: an NBD URI, an http:// or https:// URL, a file or block
    /// device, `-` for stdin, or `[ CMD ARGS ... ]`.
    #[arg(value_name = "SOURCE")]
    source: String,
    /// Destination: an NBD URI, a file or block device, `-` for stdout,
    /// `[ CMD ARGS ... ]`, or null:.
    #[arg(value_name = "DESTINATION")]
    destination: String,
    /// Connections per NBD side (when the server allows multi-conn; one
    /// to a server run as `[ CMD ARGS ... ]`).
    #[arg(short = 'C', long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    connections: u32,
    /// Requests in flight per connection (default 16; 4 with --blkhash,
    /// whose hashing is faster on data still in the CPU's caches).
    #[arg(short = 'R', long, value_parser = clap::value_parser!(u32).range(1..))]
    requests: Option<u32>,
    /// Bytes per request (e.g. 262144, 256K, 1M; at most 32M).
    #[arg(long = "request-size", value_parser = parse_request_size, default_value = "256K")]
    request_size: u64,
    /// At most this many bytes in flight per connection (e.g. 16M): fewer
    /// requests than --requests when they would hold more.
    #[arg(long = "queue-size", value_parser = parse_queue_size, value_name = "BYTES")]
    queue_size: Option<u64>,
    /// One connection and one request at a time, for servers that cannot
    /// take more.
    #[arg(long)]
    synchronous: bool,
    /// Write the destination fully allocated: zeroes are written, not
    /// punched as holes, and runs of zeroes in the data are kept.
    #[arg(long)]
    allocated: bool,
    /// Read everything instead of skipping the source's holes with its
    /// allocation map (for a server whose map is wrong or slow).
    #[arg(long = "no-extents")]
    no_extents: bool,
    /// The destination already reads as zeroes: skip zeroing it.
    #[arg(long = "destination-is-zero", alias = "target-is-zero")]
    destination_is_zero: bool,
    /// Flush the destination at the end.
    #[arg(long)]
    flush: bool,
    /// Show a progress bar on stderr; with =FD, write nbdcopy's
    /// machine-readable "N/100" lines to descriptor FD instead.
    #[arg(
        short = 'p',
        long,
        value_name = "FD",
        num_args = 0..=1,
        require_equals = true,
        value_parser = clap::value_parser!(i32).range(0..)
    )]
    progress: Option<Option<i32>>,
    /// TLS on nbd:// URIs: off, allow (use it if the server offers it) or
    /// require. nbds:// URIs always require TLS.
    #[arg(long, value_enum, value_name = "MODE")]
    tls: Option<TlsFlag>,
    /// Give up on a server that does not answer within SECS seconds:
    /// connecting, the handshake and each request (0: wait forever).
    /// Without it, connecting and the handshake are bounded at 60 s and
    /// requests wait as long as they take (a FLUSH, or zeroing a
    /// gigabyte, can take a healthy server minutes).
    #[arg(long, value_name = "SECS", value_parser = nbd_tools::parse_seconds)]
    timeout: Option<nbd_tools::Seconds>,
    /// When a connection breaks, reconnect for up to SECS seconds and send
    /// the requests in flight again (QEMU's reconnect-delay); the copy
    /// goes on across a restart of the server. 0 (the default): fail.
    #[arg(long = "reconnect-delay", value_name = "SECS", value_parser = nbd_tools::parse_seconds, default_value = "0")]
    reconnect_delay: nbd_tools::Seconds,
    /// Incremental copy: only the extents the source's dirty bitmap NAME
    /// (the qemu:dirty-bitmap:NAME metadata context; NAME may be given
    /// so too) marks dirty, onto DESTINATION, an existing file, block
    /// device or NBD export at least the source's size (the previous full
    /// copy), which is never truncated or resized. SOURCE must be an NBD
    /// export offering the bitmap. Holes and zeroes inside dirty extents
    /// are written as zeroes; nothing is written outside them. --progress
    /// counts the dirty bytes. Not with --destination-is-zero.
    #[arg(long = "dirty-bitmap", value_name = "NAME")]
    dirty_bitmap: Option<String>,
    /// A parameter of an http:// or https:// source, with nbdkit curl's
    /// names (repeatable): header=NAME:VALUE, cainfo=FILE, capath=DIR,
    /// sslverify=false, timeout=SECS, connect-timeout=SECS, proxy=URL,
    /// noproxy=HOSTS, user-agent=TEXT, cookie=TEXT, followlocation=false,
    /// connections=N, retries=N (attempts of a read, default 5).
    #[arg(long = "http", value_name = "KEY=VALUE", value_parser = parse_http_param)]
    http: Vec<(String, String)>,
    /// The format of an http:// or https:// source: raw or qcow2
    /// (default: probed; a qcow2 image is copied as its guest disk, a
    /// format that cannot be read is refused unless -f raw copies its
    /// bytes).
    #[arg(short = 'f', long = "format", value_name = "FORMAT")]
    format: Option<nbd_storage::image::ImageFormat>,
    /// Compute the source's blkhash while copying (the checksum of
    /// blksum and of nbdcopy's --blkhash: a digest of per-block digests;
    /// holes are hashed without being read) and print it in hex on
    /// stdout at the end. DIGEST: sha256 (the default), sha1, sha224,
    /// sha384, sha512, sha512-224, sha512-256; BLOCKSIZE: 64K by
    /// default, a multiple of 512 up to 32M (e.g. --blkhash=sha256/1M).
    /// DIGEST imageio is oVirt imageio's checksum instead (its checksum
    /// API's and its client's: blake2b with a 32-byte digest of 4M blocks
    /// by default, no size hashed; e.g. --blkhash=imageio/1M); see
    /// --blkhash-json. Use null: as DESTINATION for the checksum alone.
    /// Only between random-access sides (not a stream), not with
    /// --dirty-bitmap.
    #[arg(
        long,
        value_name = "DIGEST[/BLOCKSIZE]",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "",
        value_parser = BlkhashSpec::parse
    )]
    blkhash: Option<BlkhashSpec>,
    /// Write the blkhash (hex, and a newline) to PATH instead of stdout;
    /// implies --blkhash (with its defaults unless given).
    #[arg(long = "blkhash-file", value_name = "PATH")]
    blkhash_file: Option<std::path::PathBuf>,
    /// Print (or write to --blkhash-file) imageio's checksum as imageio's
    /// checksum API returns it: {"algorithm": "blake2b", "block_size":
    /// 4194304, "checksum": "HEX"}. Implies --blkhash=imageio unless
    /// --blkhash is given, which must then be imageio.
    #[arg(long = "blkhash-json")]
    blkhash_json: bool,
}

fn parse_http_param(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))?;
    // Checked here, so a bad one is a usage error.
    nbd_storage::http::HttpOptions::default().set(k, v)?;
    Ok((k.to_string(), v.to_string()))
}

/// `--tls` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TlsFlag {
    /// Never ask for TLS.
    Off,
    /// Ask for TLS; go on in clear if the server refuses.
    Allow,
    /// Ask for TLS; fail if the server refuses.
    Require,
}

/// Parses a location and applies `--tls` to it if it is an NBD URI.
fn location(s: &str, tls: Option<TlsFlag>) -> Result<Location, String> {
    let mut l = Location::parse(s)?;
    if let (Location::Nbd(uri), Some(tls)) = (&mut l, tls) {
        let mode = match tls {
            TlsFlag::Off => TlsMode::Off,
            TlsFlag::Allow => TlsMode::Allow,
            TlsFlag::Require => TlsMode::Require,
        };
        nbd_net::apply_tls_flag(uri, mode)?;
    }
    Ok(l)
}

/// A size in bytes with an optional K, M or G suffix (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} is too large"))
}

fn parse_request_size(s: &str) -> Result<u64, String> {
    let v = parse_size(s)?;
    if v == 0 || v > 32 << 20 {
        return Err(format!("request size {s:?} must be between 1 and 32M"));
    }
    Ok(v)
}

fn parse_queue_size(s: &str) -> Result<u64, String> {
    let v = parse_size(s)?;
    if v == 0 || v > 1 << 40 {
        return Err(format!("queue size {s:?} must be between 1 and 1T"));
    }
    Ok(v)
}

impl Args {
    /// The copy's options: --synchronous is one connection and one
    /// request; --queue-size caps the requests in flight (never below
    /// one, as nbdcopy raises a queue smaller than a request to one
    /// request); a server run as `[ CMD ARGS ... ]` gets one connection,
    /// as nbdcopy gives it (qemu-nbd takes one client by default).
    fn options(&self, captive: bool) -> Result<CopyOptions, String> {
        let mut connections = self.connections as usize;
        let mut requests = match self.requests {
            Some(r) => r as usize,
            // Fewer buffers in flight: each is hashed soon after it
            // arrives, while it is still in the caches (1 GiB half data
            // to null: 0.38 s against 0.48 s with 16).
            None if self.blkhash.is_some() => 4,
            None => 16,
        };
        if let Some(q) = self.queue_size {
            requests = requests.min((q / self.request_size).max(1) as usize);
        }
        if self.synchronous {
            connections = 1;
            requests = 1;
        }
        if captive {
            connections = 1;
        }
        let dirty_bitmap = match &self.dirty_bitmap {
            None => None,
            Some(_) if self.destination_is_zero => {
                return Err(
                    "--dirty-bitmap and --destination-is-zero cannot go together: an incremental copy \
                            writes onto the previous copy, which does not read as zeroes"
                        .into(),
                );
            }
            Some(name) => Some(nbd_tools::copy::dirty_bitmap_context(name)?),
        };
        let mut http = nbd_storage::http::HttpOptions::default();
        for (k, v) in &self.http {
            // Checked by parse_http_param.
            let _ = http.set(k, v);
        }
        Ok(CopyOptions {
            http,
            format: self.format,
            connections,
            requests,
            request_size: self.request_size as usize,
            destination_is_zero: self.destination_is_zero,
            flush: self.flush,
            allocated: self.allocated,
            extents: !self.no_extents,
            timeouts: match self.timeout {
                Some(t) => t.0.map(Timeouts::all).unwrap_or_default(),
                None => Timeouts::default()
                    .connect(Some(DEFAULT_HANDSHAKE_TIMEOUT))
                    .handshake(Some(DEFAULT_HANDSHAKE_TIMEOUT))
                    .request(None),
            },
            reconnect: self.reconnect_delay.0.map(Reconnect::within),
            dirty_bitmap,
            blkhash: self.blkhash_spec(),
        })
    }
}

impl Args {
    /// The blkhash asked for: --blkhash, or --blkhash-file alone (the
    /// default blkhash), or --blkhash-json alone (imageio's).
    fn blkhash_spec(&self) -> Option<BlkhashSpec> {
        self.blkhash.or_else(|| {
            if self.blkhash_json {
                Some(IMAGEIO_SPEC)
            } else {
                self.blkhash_file.as_ref().map(|_| BlkhashSpec::default())
            }
        })
    }
}

/// Ends the process as a pipeline's writer does when its reader went
/// away: by SIGPIPE (nbdcopy's fate, and what `set -o pipefail` expects).
fn die_of_sigpipe() -> ExitCode {
    // SAFETY: resetting a signal to its default and raising it have no
    // memory-safety preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::raise(libc::SIGPIPE);
    }
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    let (argv, commands) = match extract_commands(std::env::args()) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("nbd-copy: {e}");
            return ExitCode::FAILURE;
        }
    };
    let args: Args = match nbd_tools::cli::parse_args(argv) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let mut captives: Vec<CaptiveServer> = Vec::new();
    let r = run(&args, &commands, &mut captives);
    // The servers stop before the message: theirs come first.
    let explained = match &r {
        Err(e) if e != BROKEN_PIPE && captives.len() == 1 => Err(captives[0].explain(e)),
        _ => r,
    };
    drop(captives);
    match explained {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) if e == BROKEN_PIPE => die_of_sigpipe(),
        Err(e) => {
            eprintln!("nbd-copy: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Opens a side: a URI, a path, `-`, or a `[ CMD ARGS ... ]` started
/// here.
fn side(
    arg: &str,
    args: &Args,
    commands: &[Vec<String>],
    captives: &mut Vec<CaptiveServer>,
) -> Result<Location, String> {
    match command_index(arg) {
        Some(i) => {
            let c = CaptiveServer::start(&commands[i]).map_err(|e| e.to_string())?;
            let uri = c.uri().clone();
            captives.push(c);
            Ok(Location::Nbd(uri))
        }
        None => location(arg, args.tls),
    }
}

fn run(args: &Args, commands: &[Vec<String>], captives: &mut Vec<CaptiveServer>) -> Result<u64, String> {
    let captive = !commands.is_empty();
    let opts = args.options(captive)?;
    if opts.blkhash.is_some() && args.blkhash_file.is_none() && args.destination == "-" {
        return Err("--blkhash prints the checksum on stdout, which is the destination: use --blkhash-file".into());
    }
    let json_spec = match opts.blkhash {
        Some(spec) if args.blkhash_json => {
            // Refused now, not after the copy.
            spec.imageio_json(&[]).map_err(|e| format!("--blkhash-json: {e}"))?;
            Some(spec)
        }
        _ => None,
    };
    let src = side(&args.source, args, commands, captives)?;
    let dst = side(&args.destination, args, commands, captives)?;
    let progress = Arc::new(Progress::default());
    let reporter = match args.progress {
        None => None,
        Some(None) => Some(Target::Stderr),
        Some(Some(fd)) => Some(Target::Fd(fd)),
    }
    .map(|t| {
        Reporter::start(t, progress.clone()).map_err(|e| match t {
            Target::Fd(fd) => format!("--progress={fd}: {e}"),
            Target::Stderr => format!("--progress: stderr: {e}"),
        })
    })
    .transpose()?;
    let p2 = progress.clone();
    let r = nbd_smol::block_on(smol::spawn(async move { copy_hashed(&src, &dst, &opts, p2).await }));
    if let Some(rep) = reporter {
        rep.finish(r.is_ok());
    }
    let reconnects = progress.reconnects.load(Ordering::Relaxed);
    if reconnects > 0 {
        eprintln!(
            "nbd-copy: reconnected {reconnects} times, sent {} requests again",
            progress.resent.load(Ordering::Relaxed)
        );
    }
    let (n, md) = r?;
    if let Some(md) = md {
        let text = match json_spec {
            Some(spec) => spec.imageio_json(&md)?,
            None => hex(&md),
        };
        let line = format!("{text}\n");
        match &args.blkhash_file {
            Some(path) => std::fs::write(path, line).map_err(|e| format!("--blkhash-file: {}: {e}", path.display()))?,
            None => {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                out.write_all(line.as_bytes())
                    .and_then(|_| out.flush())
                    .map_err(|e| format!("stdout: {e}"))?;
            }
        }
    }
    Ok(n)
}
