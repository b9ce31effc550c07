//! `nbd-fuse`: mount an NBD export as one file in a FUSE filesystem, in
//! the manner of libnbd's `nbdfuse`:
//!
//! ```text
//! nbd-fuse [-r] [-C N] [-P PIDFILE] MOUNTPOINT[/FILENAME] URI
//! nbd-fuse [-r] MOUNTPOINT[/FILENAME] [ CMD ARGS ... ]
//! ```
//!
//! It stays in the foreground until the filesystem is unmounted
//! (`fusermount -u MOUNTPOINT`), or until SIGTERM, SIGINT or SIGHUP, which
//! unmount it (lazily if it is busy) and exit 0. The filesystem itself is
//! `nbd_tools::fuse`.

use std::ffi::OsString;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Parser;
use nbd_net::resilience::{Reconnect, Timeouts};
use nbd_proto::client::ClientConfig;
use nbd_proto::uri::NbdUri;
use nbd_proto::wire::{CONTEXT_BASE_ALLOCATION, TransmissionFlags};
use nbd_smol::Pool;
use nbd_smol::client::ConnectOptions;
use nbd_tools::captive::{CaptiveServer, command_index, extract_commands};
use nbd_tools::fuse::{FuseOptions, NbdFs};

/// How long connecting and the handshake may take without --timeout.
const DEFAULT_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Mount an NBD export as a file in a FUSE filesystem.
#[derive(Parser, Debug)]
#[command(
    name = "nbd-fuse",
    version,
    args_override_self = true,
    after_help = "MOUNTPOINT is an existing directory; the file in it is named nbd, or FILENAME with \
                  MOUNTPOINT/FILENAME.\n\
                  NBD is an NBD URI, or [ CMD ARGS ... ]: a server run as a subprocess with systemd socket \
                  activation, e.g. nbd-fuse dir [ qemu-nbd -f qcow2 disk.qcow2 ].\n\
                  nbd-fuse stays in the foreground until unmounted (fusermount -u MOUNTPOINT); SIGTERM, \
                  SIGINT and SIGHUP unmount and exit 0."
)]
struct Args {
    /// Read-only: the file has mode 0444 and opening it for writing fails
    /// with EACCES. Implied by a read-only export.
    #[arg(short = 'r', long = "readonly", alias = "read-only")]
    readonly: bool,
    /// Connections to the server when it allows multi-conn (a captive
    /// server gets one).
    #[arg(short = 'C', long, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    connections: u32,
    /// When the filesystem is ready, write the process id to PIDFILE.
    #[arg(short = 'P', long, value_name = "PIDFILE")]
    pidfile: Option<PathBuf>,
    /// FUSE mount options, comma-separated: allow_other, allow_root,
    /// kernel_cache (keep the page cache across opens), ro, and any other
    /// option fusermount takes.
    #[arg(short = 'o', value_name = "FUSE-OPTION", action = clap::ArgAction::Append)]
    options: Vec<String>,
    /// Accepted for nbdfuse's sake: requests are always handled
    /// concurrently.
    #[arg(short = 's', hide = true)]
    single: bool,
    /// Print each failed request on stderr.
    #[arg(short = 'v', long, visible_short_alias = 'd')]
    verbose: bool,
    /// Give up on a server that does not answer within SECS seconds:
    /// connecting, the handshake and each request, which then fails with
    /// EIO (0: wait forever). Without it, connecting and the handshake
    /// are bounded at 60 s and requests wait as long as they take. A
    /// server that goes away fails requests at once either way.
    #[arg(long, value_name = "SECS", value_parser = nbd_tools::parse_seconds)]
    timeout: Option<nbd_tools::Seconds>,
    /// When a connection breaks, reconnect for up to SECS seconds and send
    /// the requests in flight again; they fail with EIO only then. 0 (the
    /// default): fail at once.
    #[arg(long = "reconnect-delay", value_name = "SECS", value_parser = nbd_tools::parse_seconds,
          default_value = "0")]
    reconnect_delay: nbd_tools::Seconds,
    /// MOUNTPOINT or MOUNTPOINT/FILENAME.
    #[arg(value_name = "MOUNTPOINT[/FILENAME]")]
    mountpoint: PathBuf,
    /// The NBD URI, e.g. `nbd://localhost/disk` or
    /// `nbd+unix:///?socket=/tmp/sock`, or `[ CMD ARGS ... ]`.
    #[arg(value_name = "NBD")]
    uri: String,
}

fn main() -> ExitCode {
    if std::env::var_os("SMOL_THREADS").is_none() {
        // Half the cores run the requests: the rest is for the kernel's
        // side of FUSE and the programs doing the I/O. On 2 cores, fio's
        // 1 MiB reads x16 went from 1.5 to 1.9 GB/s with 1 thread instead
        // of 4, and 4 KiB random reads from 53k to 57k IOPS.
        let n = std::thread::available_parallelism()
            .map_or(1, |n| n.get() / 2)
            .clamp(1, 4);
        // SAFETY: no other thread runs yet.
        unsafe { std::env::set_var("SMOL_THREADS", n.to_string()) };
    }
    let (argv, commands) = match extract_commands(std::env::args()) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("nbd-fuse: {e}");
            return ExitCode::FAILURE;
        }
    };
    let args: Args = match nbd_tools::cli::parse_args(argv) {
        Ok(a) => a,
        Err(code) => return code,
    };
    if commands.len() > 1 {
        eprintln!("nbd-fuse: only one [ CMD ARGS ... ] can be given");
        return ExitCode::FAILURE;
    }
    match run(&args, &commands) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nbd-fuse: {e}");
            ExitCode::FAILURE
        }
    }
}

/// MOUNTPOINT[/FILENAME] as nbdfuse reads it: a directory alone means
/// the file `nbd` in it.
fn split_mountpoint(p: &Path) -> Result<(PathBuf, OsString), String> {
    if p.is_dir() {
        return Ok((p.to_owned(), OsString::from("nbd")));
    }
    let (Some(dir), Some(name)) = (p.parent(), p.file_name()) else {
        return Err(format!("{}: not a directory", p.display()));
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    if !dir.is_dir() {
        return Err(format!("{}: not a directory", dir.display()));
    }
    Ok((dir.to_owned(), name.to_owned()))
}

fn run(args: &Args, commands: &[Vec<String>]) -> Result<(), String> {
    let (mountpoint, name) = split_mountpoint(&args.mountpoint)?;
    let mut captive = None;
    let (uri, connections) = match command_index(&args.uri) {
        Some(i) => {
            let c = CaptiveServer::start(&commands[i]).map_err(|e| e.to_string())?;
            let uri = c.uri().clone();
            captive = Some(c);
            (uri, 1)
        }
        None => (
            NbdUri::parse(&args.uri).map_err(|e| format!("{}: {e}", args.uri))?,
            args.connections,
        ),
    };
    let timeouts = match args.timeout {
        Some(t) => t.0.map(Timeouts::all).unwrap_or_default(),
        None => Timeouts::default()
            .connect(Some(DEFAULT_HANDSHAKE_TIMEOUT))
            .handshake(Some(DEFAULT_HANDSHAKE_TIMEOUT))
            .request(None),
    };
    let connect = ConnectOptions::default()
        .timeouts(timeouts)
        .reconnect(args.reconnect_delay.0.map(Reconnect::within))
        .tls(None);
    let config = ClientConfig::default()
        .meta_contexts(vec![CONTEXT_BASE_ALLOCATION.to_string()])
        .max_in_flight(64);
    let pool = nbd_smol::block_on(Pool::connect_with(&uri, config, connections as usize, &connect));
    let pool = match pool {
        Ok(p) => Arc::new(p),
        Err(e) => {
            let e = format!("{}: {e}", uri.to_uri_string());
            return Err(match &mut captive {
                Some(c) => c.explain(e),
                None => e,
            });
        }
    };

    let mut kernel_cache = false;
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(format!("nbd-fuse:{}", uri.to_uri_string())),
        fuser::MountOption::Subtype("nbd-fuse".into()),
    ];
    for o in args.options.iter().flat_map(|o| o.split(',')).filter(|o| !o.is_empty()) {
        match o {
            "allow_other" => config.acl = fuser::SessionACL::All,
            "allow_root" => config.acl = fuser::SessionACL::RootAndOwner,
            "kernel_cache" => kernel_cache = true,
            "ro" => config.mount_options.push(fuser::MountOption::RO),
            other => config.mount_options.push(fuser::MountOption::CUSTOM(other.to_string())),
        }
    }
    let readonly = args.readonly || pool.flags().contains(TransmissionFlags::READ_ONLY);
    let fs = NbdFs::new(
        pool.clone(),
        FuseOptions {
            name,
            readonly,
            kernel_cache,
            verbose: args.verbose,
        },
    );
    let mut session =
        fuser::Session::new(fs, &mountpoint, &config).map_err(|e| format!("{}: mount: {e}", mountpoint.display()))?;

    // SIGTERM, SIGINT, SIGHUP: unmount; the session then ends.
    let mut unmounter = session.unmount_callable();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])
    .map_err(|e| format!("signals: {e}"))?;
    let handle = signals.handle();
    let stopping = Arc::new(AtomicBool::new(false));
    let stop = stopping.clone();
    let mp = mountpoint.clone();
    let signal_thread = std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            stop.store(true, Ordering::SeqCst);
            if unmounter.unmount().is_err() {
                // Busy: detach it now; the session ends when the last user
                // lets go.
                lazy_unmount(&mp);
            }
        }
    });

    if let Some(p) = &args.pidfile {
        let r = std::fs::File::create(p).and_then(|mut f| writeln!(f, "{}", std::process::id()));
        if let Err(e) = r {
            lazy_unmount(&mountpoint);
            return Err(format!("{}: {e}", p.display()));
        }
    }

    let r = session.run();
    handle.close();
    let _ = signal_thread.join();
    let r = r.map_err(|e| format!("{}: {e}", mountpoint.display()));
    // Every request has been answered: flush what the server may cache
    // and say goodbye (neither matters if the server is gone).
    nbd_smol::block_on(async {
        if !readonly && pool.flags().contains(TransmissionFlags::SEND_FLUSH) {
            let _ = pool.flush().await;
        }
        let _ = pool.disconnect().await;
    });
    drop(captive);
    if stopping.load(Ordering::SeqCst) {
        // A signal asked us to stop: that is a clean end.
        return Ok(());
    }
    r
}

/// `umount2(MNT_DETACH)`, or `fusermount -u -z` for an unprivileged user.
fn lazy_unmount(mountpoint: &Path) {
    if let Ok(c) = nbd_tools::cli::c_string(mountpoint.as_os_str().as_encoded_bytes()) {
        // SAFETY: `c` is a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
            return;
        }
    }
    let _ = std::process::Command::new("fusermount")
        .args(["-u", "-z", "--"])
        .arg(mountpoint)
        .status();
}
