//! `nbd-copy`: copy between NBD exports, local files and block devices,
//! in the manner of libnbd's `nbdcopy`.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Parser;
use nbd_proto::client::TlsMode;
use nbd_tools::copy::{CopyOptions, Location, Progress, copy};

/// Copy between NBD exports (URIs), local files or block devices, and null:.
#[derive(Parser, Debug)]
#[command(name = "nbd-copy", version, about)]
struct Args {
    /// Source: an NBD URI, or a local file or block device.
    source: String,
    /// Destination: an NBD URI, a local file or block device, or null:.
    destination: String,
    /// Connections per NBD side (when the server allows multi-conn).
    #[arg(short = 'C', long, default_value_t = 4)]
    connections: usize,
    /// Requests in flight per connection.
    #[arg(short = 'R', long, default_value_t = 16)]
    requests: usize,
    /// Bytes per request (e.g. 256K, 1M).
    #[arg(long = "request-size", value_parser = parse_size, default_value = "256K")]
    request_size: u64,
    /// The destination already reads as zeroes: skip zeroing it.
    #[arg(long = "destination-is-zero", alias = "target-is-zero")]
    destination_is_zero: bool,
    /// Flush the destination at the end.
    #[arg(long)]
    flush: bool,
    /// Show a progress bar.
    #[arg(short = 'p', long)]
    progress: bool,
    /// TLS on nbd:// URIs: off, allow (use it if the server offers it) or
    /// require. nbds:// URIs always require TLS.
    #[arg(long, value_enum, value_name = "MODE")]
    tls: Option<TlsFlag>,
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

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let v = n.checked_mul(mult).ok_or_else(|| format!("size {s:?} is too large"))?;
    if v == 0 || v > 32 << 20 {
        return Err(format!("request size {s:?} must be between 1 and 32M"));
    }
    Ok(v)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let run = || -> Result<u64, String> {
        let src = location(&args.source, args.tls)?;
        let dst = location(&args.destination, args.tls)?;
        let opts = CopyOptions {
            connections: args.connections.max(1),
            requests: args.requests.max(1),
            request_size: args.request_size as usize,
            destination_is_zero: args.destination_is_zero,
            flush: args.flush,
        };
        let progress = Arc::new(Progress::default());
        let bar = args.progress.then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {percent:>3}% {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let p = progress.clone();
            let bar2 = bar.clone();
            std::thread::spawn(move || {
                loop {
                    bar2.set_length(p.total.load(Ordering::Relaxed));
                    bar2.set_position(p.done.load(Ordering::Relaxed));
                    if bar2.is_finished() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
            bar
        });
        let p2 = progress.clone();
        let r = nbd_smol::block_on(smol::spawn(async move { copy(&src, &dst, &opts, p2).await }));
        if let Some(bar) = bar {
            bar.set_length(progress.total.load(Ordering::Relaxed));
            bar.set_position(progress.done.load(Ordering::Relaxed));
            if r.is_ok() {
                bar.finish();
            } else {
                bar.abandon();
            }
        }
        r
    };
    match run() {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nbd-copy: {e}");
            ExitCode::FAILURE
        }
    }
}
