//! `nbd-info`: show information about an NBD server and its exports, in
//! the manner of libnbd's `nbdinfo`: the same modes (`--json`, `--list`,
//! `--map [--totals]`, `--size`, `--can`/`--is`), the same exit codes
//! (`--can` and `--is`: 0 true, 2 false, 1 error; 1 for every error and
//! usage error), and a server run as a subprocess with
//! `nbd-info -- [ CMD ARGS ... ]`.
//!
//! Two things nbdinfo 1.14 lacks (its TODO asks for both):
//!
//! - `--map --offset=N --length=N` maps only `[N, N+LENGTH)` (LENGTH
//!   defaults to the end of the export): the block-status requests cover
//!   only that range, the first extent starts at the offset and the last
//!   is clipped at the end of the range; `--totals` then gives the shares
//!   of the range.
//! - `--map` given several times maps several contexts over one
//!   connection (`--map` alone is `base:allocation`; a context given twice
//!   counts once). With one context the output is nbdinfo's. With several,
//!   the text output is one section per context, in the order given: a
//!   line with the context's name alone, then its map (or `--totals`)
//!   lines exactly as for that context alone, and an empty line between
//!   sections. `--json` prints one object whose keys are the context
//!   names, in the order given, and whose values are the arrays the
//!   context alone would print.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser;
use nbd_blocking::client::{Client, ConnectOptions, Negotiation, Timeouts};
use nbd_proto::client::{ClientConfig, TlsMode};
use nbd_proto::uri::NbdUri;
use nbd_proto::wire::{AllocationFlags, CONTEXT_BASE_ALLOCATION, CommandFlags, TransmissionFlags};
use nbd_tools::captive::{CaptiveServer, command_index, extract_commands};
use nbd_tools::info::{ExportReport, human_size};

/// Show information about an NBD server and its exports.
#[derive(Parser, Debug)]
#[command(
    name = "nbd-info",
    version,
    args_override_self = true,
    after_help = "NBD is an NBD URI, or [ CMD ARGS ... ]: a server run as a subprocess with systemd socket \
                  activation (qemu-nbd, nbdkit, nbd-serve), e.g. nbd-info -- [ qemu-nbd -r -f qcow2 disk.qcow2 ].\n\
                  Exit status: 0, or 1 for an error; with --can and --is, 0 if true, 2 if false, 1 for an error."
)]
struct Args {
    /// Print JSON (the same keys and values as `nbdinfo --json`).
    #[arg(long)]
    json: bool,
    /// List every export of the server.
    #[arg(short = 'L', long)]
    list: bool,
    /// Print the map of a metadata context (default `base:allocation`).
    /// Give --map several times for several contexts over one connection:
    /// the text output is then a line with each context's name followed by
    /// its map, an empty line between contexts; --json prints an object
    /// keyed by context name whose values are the single-context arrays.
    #[arg(
        long,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = CONTEXT_BASE_ALLOCATION,
        value_name = "CONTEXT",
        action = clap::ArgAction::Append
    )]
    map: Vec<String>,
    /// With --map: print how much of the export (or of the range of
    /// --offset and --length) each type covers, in bytes and percent,
    /// instead of the map.
    #[arg(long, alias = "total")]
    totals: bool,
    /// With --map: start the map at byte N (K, M, G, T suffixes) instead
    /// of 0.
    #[arg(long, value_name = "N", value_parser = nbd_tools::parse_size)]
    offset: Option<u64>,
    /// With --map: map N bytes (K, M, G, T suffixes) from --offset instead
    /// of up to the end of the export.
    #[arg(long, value_name = "N", value_parser = nbd_tools::parse_size)]
    length: Option<u64>,
    /// Print only the export size in bytes.
    #[arg(long)]
    size: bool,
    /// Test a feature and print nothing: exit 0 if true, 2 if false, 1 on
    /// error. FEATURE: connect, read, write, read-only, rotational, tls,
    /// structured-reply, extended-headers, cache, df, fast-zero, flush,
    /// fua, multi-conn, trim, zero, block-status-payload. --is and --can
    /// take the same features; the last one given counts.
    #[arg(long = "can", visible_alias = "is", value_name = "FEATURE")]
    can: Option<String>,
    /// TLS on an nbd:// URI: off, allow (use it if the server offers it)
    /// or require. nbds:// URIs always require TLS.
    #[arg(long, value_enum, value_name = "MODE")]
    tls: Option<TlsFlag>,
    /// Give up on a server that does not answer within SECS seconds:
    /// connecting, the handshake and each request (0: wait forever).
    /// Nothing nbd-info asks takes a healthy server a minute.
    #[arg(long, value_name = "SECS", value_parser = nbd_tools::parse_seconds, default_value = "60")]
    timeout: nbd_tools::Seconds,
    /// The NBD URI, e.g. `nbd://localhost/disk` or
    /// `nbd+unix:///?socket=/tmp/sock`, or `[ CMD ARGS ... ]`.
    #[arg(value_name = "NBD")]
    uri: String,
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

impl From<TlsFlag> for TlsMode {
    fn from(f: TlsFlag) -> TlsMode {
        match f {
            TlsFlag::Off => TlsMode::Off,
            TlsFlag::Allow => TlsMode::Allow,
            TlsFlag::Require => TlsMode::Require,
        }
    }
}

/// What a run of nbd-info ends with.
enum Outcome {
    /// Print this on stdout (all at once: on an error nothing is printed).
    Print(String),
    /// The answer of --can / --is.
    Feature(bool),
}

/// Exit code of a `--can`/`--is` test that is false, as nbdinfo's.
const FALSE: u8 = 2;

fn main() -> ExitCode {
    let (argv, commands) = match extract_commands(std::env::args()) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("nbd-info: {e}");
            return ExitCode::FAILURE;
        }
    };
    let args: Args = match nbd_tools::cli::parse_args(argv) {
        Ok(a) => a,
        Err(code) => return code,
    };
    if let Err(e) = check_modes(&args, commands.len()) {
        eprintln!("nbd-info: {e}");
        return ExitCode::FAILURE;
    }
    let mut captive = None;
    let target = match command_index(&args.uri) {
        Some(i) => match CaptiveServer::start(&commands[i]) {
            Ok(c) => {
                let uri = c.uri().clone();
                captive = Some(c);
                Ok(Target { uri, shown: None })
            }
            Err(e) => Err(e.to_string()),
        },
        None => target_uri(&args),
    };
    let outcome = target.and_then(|t| run(&args, &t));
    let code = match outcome {
        Ok(Outcome::Print(out)) => {
            let mut stdout = std::io::stdout().lock();
            if let Err(e) = stdout.write_all(out.as_bytes()).and_then(|_| stdout.flush()) {
                eprintln!("nbd-info: stdout: {e}");
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Ok(Outcome::Feature(true)) => ExitCode::SUCCESS,
        Ok(Outcome::Feature(false)) => ExitCode::from(FALSE),
        Err(e) => {
            match &mut captive {
                Some(c) => eprintln!("nbd-info: {}", c.explain(e)),
                None => eprintln!("nbd-info: {e}"),
            }
            ExitCode::FAILURE
        }
    };
    drop(captive);
    code
}

/// Refuses what nbdinfo refuses: more than one of --list, --map, --size,
/// --can/--is; --totals without --map; a --can or --is feature nobody
/// knows; more than one server. And --offset or --length without --map,
/// or a range past 2^64.
fn check_modes(args: &Args, commands: usize) -> Result<(), String> {
    let mapping = !args.map.is_empty();
    let modes = [args.list, mapping, args.size, args.can.is_some()];
    if modes.iter().filter(|m| **m).count() > 1 {
        return Err("you cannot use --list, --map, --size and --can/--is together".into());
    }
    if args.totals && !mapping {
        return Err("you must use --totals only with --map".into());
    }
    if !mapping && (args.offset.is_some() || args.length.is_some()) {
        return Err("you must use --offset and --length only with --map".into());
    }
    if let (Some(o), Some(l)) = (args.offset, args.length)
        && o.checked_add(l).is_none()
    {
        return Err(format!("--offset={o} plus --length={l} overflows 64 bits"));
    }
    if let Some(f) = &args.can
        && Feature::parse(f).is_none()
    {
        return Err(format!("unknown --can or --is feature: {f}"));
    }
    if commands > 1 {
        return Err("give one server: a URI or one [ CMD ARGS ... ]".into());
    }
    Ok(())
}

/// Where to connect, and the URI reports show (`None` for a subprocess,
/// whose socket is gone once nbd-info exits: nbdinfo leaves the field out
/// then too).
struct Target {
    uri: NbdUri,
    shown: Option<String>,
}

fn target_uri(args: &Args) -> Result<Target, String> {
    let mut uri = NbdUri::parse(&args.uri).map_err(|e| format!("{}: {e}", args.uri))?;
    if let Some(flag) = args.tls {
        nbd_net::apply_tls_flag(&mut uri, flag.into())?;
    }
    Ok(Target {
        uri,
        shown: Some(args.uri.clone()),
    })
}

/// A feature `--can` and `--is` test, under the names nbdinfo accepts
/// (and the two later protocol extensions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Feature {
    Connect,
    ReadOnly,
    Write,
    Tls,
    StructuredReply,
    ExtendedHeaders,
    Flag(TransmissionFlags),
}

impl Feature {
    fn parse(s: &str) -> Option<Feature> {
        let name = s.to_ascii_lowercase().replace(['_', ' '], "-");
        Some(match name.as_str() {
            "connect" | "read" => Feature::Connect,
            "tls" => Feature::Tls,
            "sr" | "structured" | "structured-reply" | "structured-replies" => Feature::StructuredReply,
            "eh" | "extended" | "extended-headers" | "extended-header" => Feature::ExtendedHeaders,
            "readonly" | "read-only" => Feature::ReadOnly,
            "write" => Feature::Write,
            "rotational" => Feature::Flag(TransmissionFlags::ROTATIONAL),
            "cache" => Feature::Flag(TransmissionFlags::SEND_CACHE),
            "df" => Feature::Flag(TransmissionFlags::SEND_DF),
            "fastzero" | "fast-zero" => Feature::Flag(TransmissionFlags::SEND_FAST_ZERO),
            "flush" => Feature::Flag(TransmissionFlags::SEND_FLUSH),
            "fua" => Feature::Flag(TransmissionFlags::SEND_FUA),
            "multiconn" | "multi-conn" => Feature::Flag(TransmissionFlags::CAN_MULTI_CONN),
            "trim" => Feature::Flag(TransmissionFlags::SEND_TRIM),
            "zero" => Feature::Flag(TransmissionFlags::SEND_WRITE_ZEROES),
            "block-status-payload" => Feature::Flag(TransmissionFlags::BLOCK_STATUS_PAYLOAD),
            _ => return None,
        })
    }
}

/// `--can FEATURE` / `--is FEATURE`: connects (NBD_OPT_GO) and answers
/// from what was negotiated.
fn can(uri: &NbdUri, feature: Feature, opts: &ConnectOptions) -> Result<bool, nbd_blocking::Error> {
    let config = ClientConfig::default()
        .export_name(uri.export.clone())
        .meta_contexts(Vec::new());
    let client = Client::connect_with(uri, config, opts)?;
    let n = client.negotiated();
    let answer = match feature {
        Feature::Connect => true,
        Feature::Tls => n.tls,
        Feature::StructuredReply => n.mode.structured(),
        Feature::ExtendedHeaders => n.mode.extended(),
        Feature::ReadOnly => n.flags.contains(TransmissionFlags::READ_ONLY),
        Feature::Write => !n.flags.contains(TransmissionFlags::READ_ONLY),
        Feature::Flag(f) => n.flags.contains(f),
    };
    let _ = client.disconnect();
    Ok(answer)
}

fn run(args: &Args, target: &Target) -> Result<Outcome, String> {
    let uri = &target.uri;
    let name = target.shown.clone().unwrap_or_else(|| uri.to_uri_string());
    let connect_err = |e: nbd_blocking::Error| format!("{name}: {e}");
    let opts = ConnectOptions::default().timeouts(args.timeout.0.map(Timeouts::all).unwrap_or_default());
    if let Some(f) = &args.can {
        let feature = Feature::parse(f).ok_or_else(|| format!("unknown --can or --is feature: {f}"))?;
        return can(uri, feature, &opts).map(Outcome::Feature).map_err(connect_err);
    }
    if !args.map.is_empty() {
        let mut contexts: Vec<&str> = Vec::new();
        for c in &args.map {
            if !contexts.contains(&c.as_str()) {
                contexts.push(c);
            }
        }
        let range = Range {
            offset: args.offset.unwrap_or(0),
            length: args.length,
        };
        let maps = map(uri, &contexts, range, &opts).map_err(|e| match e {
            MapError::Nbd(e) => connect_err(e),
            MapError::NoContext(c) if c.len() == 1 => {
                format!("--map: server does not support metadata context {:?}", c[0])
            }
            MapError::NoContext(c) => format!("--map: server does not support metadata contexts {c:?}"),
            MapError::Range(e) => e,
        })?;
        let render = |context: &str, m: &Map| {
            if args.totals {
                render_totals(context, m, args.json)
            } else {
                render_map(context, &m.extents, args.json)
            }
        };
        if let [m] = &maps[..] {
            return Ok(Outcome::Print(render(contexts[0], m)));
        }
        let mut out = String::new();
        if args.json {
            out.push_str("{\n");
        }
        for (i, (context, m)) in contexts.iter().zip(&maps).enumerate() {
            let last = i + 1 == maps.len();
            if args.json {
                let body = render(context, m);
                let body = body.trim_end_matches('\n');
                let _ = writeln!(out, "{}: {body}{}", json_str(context), if last { "" } else { "," });
            } else {
                let _ = writeln!(out, "{context}");
                out.push_str(&render(context, m));
                if !last {
                    out.push('\n');
                }
            }
        }
        if args.json {
            out.push_str("}\n");
        }
        return Ok(Outcome::Print(out));
    }
    if args.size {
        let client =
            Client::connect_with(uri, ClientConfig::default().meta_contexts(Vec::new()), &opts).map_err(connect_err)?;
        let size = client.size();
        let _ = client.disconnect();
        return Ok(Outcome::Print(format!("{size}\n")));
    }
    let config = ClientConfig::default().export_name(uri.export.clone());
    let mut neg = Negotiation::connect_with(uri, config, &opts).map_err(connect_err)?;
    let mut reports = Vec::new();
    let show_uri = target.shown.is_some();
    if args.list {
        if neg.is_done() {
            return Err(format!(
                "{name}: the server does not support listing exports (no fixed newstyle)"
            ));
        }
        let exports = neg.list().map_err(connect_err)?;
        for e in exports {
            let mut r = ExportReport::from_option_mode(&mut neg, uri, &e.name).map_err(connect_err)?;
            if r.description.is_none() {
                r.description = e.description.clone();
            }
            reports.push(r);
        }
        let header = nbd_tools::info::ProtocolReport::from_negotiation(&neg);
        let _ = neg.abort();
        return Ok(Outcome::Print(if args.json {
            render_json(&header, &reports, show_uri)
        } else {
            render_human(&header, &reports, show_uri)
        }));
    }
    let header = nbd_tools::info::ProtocolReport::from_negotiation(&neg);
    let r = ExportReport::single(neg, uri).map_err(connect_err)?;
    let header = nbd_tools::info::ProtocolReport {
        protocol: r.protocol,
        ..header
    };
    reports.push(r);
    Ok(Outcome::Print(if args.json {
        render_json(&header, &reports, show_uri)
    } else {
        render_human(&header, &reports, show_uri)
    }))
}

fn describe(context: &str, flags: u64) -> String {
    if context == CONTEXT_BASE_ALLOCATION {
        let known = u64::from(AllocationFlags::all().bits());
        let mut parts = Vec::new();
        for (flag, name) in [(AllocationFlags::HOLE, "hole"), (AllocationFlags::ZERO, "zero")] {
            if flags & u64::from(flag.bits()) != 0 {
                parts.push(name.to_string());
            }
        }
        if flags & !known != 0 {
            parts.push(format!("unknown ({:#x})", flags & !known));
        }
        if parts.is_empty() {
            return "data".into();
        }
        return parts.join(",");
    }
    if context.starts_with("qemu:dirty-bitmap:") {
        return if flags & 1 != 0 { "dirty".into() } else { "clean".into() };
    }
    if context == "qemu:allocation-depth" {
        return match flags {
            0 => "absent".into(),
            1 => "local".into(),
            n => format!("backing depth {n}"),
        };
    }
    String::new()
}

enum MapError {
    Nbd(nbd_blocking::Error),
    /// The contexts the server does not offer.
    NoContext(Vec<String>),
    /// --offset or --length past the end of the export.
    Range(String),
}

impl From<nbd_blocking::Error> for MapError {
    fn from(e: nbd_blocking::Error) -> Self {
        MapError::Nbd(e)
    }
}

/// The part of the export `--map` covers: `--offset` and `--length`
/// (`None`: up to the end of the export).
#[derive(Debug, Clone, Copy)]
struct Range {
    offset: u64,
    length: Option<u64>,
}

/// A metadata context's map of the range.
struct Map {
    /// The number of bytes mapped: the range's length (the export's size
    /// without --offset and --length).
    size: u64,
    /// (offset, length, type), adjacent runs of one type merged, from the
    /// range's start to its end.
    extents: Vec<(u64, u64, u64)>,
}

/// Maps `contexts` (at least one, no duplicates) over `range`, all on one
/// connection: each block-status request covers the range from the
/// lowest offset some context still lacks, and its reply extends every
/// context's map (a server may describe less than asked, and each context
/// a different length).
fn map(uri: &NbdUri, contexts: &[&str], range: Range, opts: &ConnectOptions) -> Result<Vec<Map>, MapError> {
    let config = ClientConfig::default()
        .export_name(uri.export.clone())
        .meta_contexts(contexts.iter().map(|c| c.to_string()).collect());
    let mut client = Client::connect_with(uri, config, opts)?;
    let ids: Vec<Option<u32>> = contexts.iter().map(|c| client.negotiated().context_id(c)).collect();
    let missing: Vec<String> = contexts
        .iter()
        .zip(&ids)
        .filter(|(_, id)| id.is_none())
        .map(|(c, _)| c.to_string())
        .collect();
    if !missing.is_empty() {
        let _ = client.disconnect();
        return Err(MapError::NoContext(missing));
    }
    let size = client.size();
    let start = range.offset;
    let end = match range.length {
        None => Some(size),
        Some(l) => start.checked_add(l),
    };
    let end = match end {
        Some(end) if start <= size && end <= size => end,
        _ => {
            let _ = client.disconnect();
            return Err(MapError::Range(if start > size {
                format!("--offset={start} is beyond the end of the export ({size} bytes)")
            } else {
                format!(
                    "--offset={start} --length={} ends beyond the end of the export ({size} bytes)",
                    range.length.unwrap_or(0)
                )
            }));
        }
    };
    let c = client.constraints();
    let minimum = u64::from(c.minimum).max(1);
    // Ask for as much as a request can describe, aligned to the minimum.
    let max_req: u64 = if client.mode().extended() {
        1 << 62
    } else {
        (u32::MAX as u64) - (u32::MAX as u64) % minimum
    };
    let mut maps: Vec<Vec<(u64, u64, u64)>> = vec![Vec::new(); contexts.len()];
    // How far each context's map goes.
    let mut reached = vec![start; contexts.len()];
    loop {
        let from = reached.iter().copied().min().unwrap_or(end);
        if from >= end {
            break;
        }
        // Requests aligned to the minimum block size, within the export.
        let req_start = from - from % minimum;
        let req_end = end.checked_next_multiple_of(minimum).unwrap_or(size).min(size);
        let len = (req_end - req_start).min(max_req);
        let statuses = client.block_status(req_start, len, CommandFlags::empty())?;
        for (i, id) in ids.iter().enumerate() {
            let Some(st) = statuses.iter().find(|s| Some(s.context_id) == *id) else {
                continue;
            };
            let mut pos = req_start;
            for e in &st.extents {
                let e_end = pos.saturating_add(e.length);
                let (lo, hi) = (pos.max(reached[i]), e_end.min(end));
                if hi > lo && lo == reached[i] {
                    match maps[i].last_mut() {
                        Some(last) if last.2 == e.flags && last.0 + last.1 == lo => last.1 += hi - lo,
                        _ => maps[i].push((lo, hi - lo, e.flags)),
                    }
                    reached[i] = hi;
                }
                pos = e_end;
                if pos >= end {
                    break;
                }
            }
        }
        // A server that describes nothing of where a map stops.
        if reached.iter().copied().min() == Some(from) {
            break;
        }
    }
    let _ = client.disconnect();
    Ok(maps
        .into_iter()
        .map(|extents| Map {
            size: end - start,
            extents,
        })
        .collect())
}

/// `--map`, as nbdinfo prints it.
fn render_map(context: &str, merged: &[(u64, u64, u64)], json: bool) -> String {
    let mut out = String::new();
    if json {
        out.push_str("[\n");
        for (i, (o, l, t)) in merged.iter().enumerate() {
            let _ = write!(
                out,
                "{{ \"offset\": {o}, \"length\": {l}, \"type\": {t}, \"description\": {}}}",
                json_str(&describe(context, *t))
            );
            out.push_str(if i + 1 < merged.len() { ",\n" } else { "\n" });
        }
        out.push_str("]\n");
    } else {
        for (o, l, t) in merged {
            let _ = writeln!(out, "{o:>10}  {l:>10}  {t:>3}  {}", describe(context, *t));
        }
    }
    out
}

/// `--map --totals`, as nbdinfo prints it: one line per type, in
/// ascending order of type, with the bytes it covers and their share of
/// the export.
fn render_totals(context: &str, map: &Map, json: bool) -> String {
    let mut totals: Vec<(u64, u64)> = Vec::new();
    for &(_, len, t) in &map.extents {
        match totals.iter_mut().find(|(ty, _)| *ty == t) {
            Some(e) => e.1 += len,
            None => totals.push((t, len)),
        }
    }
    totals.sort_unstable();
    let mut out = String::new();
    if map.size == 0 {
        if json {
            out.push_str("[]\n");
        }
        return out;
    }
    if json {
        out.push_str("[\n");
    }
    for (i, &(t, bytes)) in totals.iter().enumerate() {
        let percent = 100.0 * bytes as f64 / map.size as f64;
        let description = describe(context, t);
        if json {
            let _ = write!(
                out,
                "{{ \"size\": {bytes}, \"percent\": {}, \"type\": {t}",
                format_g(percent)
            );
            if !description.is_empty() {
                let _ = write!(out, ", \"description\": {}", json_str(&description));
            }
            out.push_str(" }");
            out.push_str(if i + 1 < totals.len() { ",\n" } else { "\n" });
        } else {
            let _ = write!(out, "{bytes:>10} {percent:>5.1}% {t:>3}");
            if !description.is_empty() {
                let _ = write!(out, " {description}");
            }
            out.push('\n');
        }
    }
    if json {
        out.push_str("]\n");
    }
    out
}

/// A number as C's `printf("%g")` writes it (six significant digits,
/// trailing zeros dropped, an exponent for very small or large values),
/// which is how nbdinfo writes the percentages of `--totals --json`.
fn format_g(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return if v == 0.0 { "0".into() } else { v.to_string() };
    }
    // The exponent after rounding to six significant digits.
    let sci = format!("{v:.5e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let trim = |s: &str| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s.to_string()
        }
    };
    if !(-4..6).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", trim(mantissa), exp.abs())
    } else {
        let decimals = (5 - exp).max(0) as usize;
        trim(&format!("{v:.decimals$}"))
    }
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn render_json(h: &nbd_tools::info::ProtocolReport, reports: &[ExportReport], show_uri: bool) -> String {
    let mut o = String::new();
    o.push_str("{\n");
    let _ = writeln!(o, "\"protocol\": {},", json_str(h.protocol));
    let _ = writeln!(o, "\"TLS\": {},", h.tls);
    let _ = writeln!(o, "\"structured\": {},", h.structured);
    let _ = writeln!(o, "\"extended\": {},", h.extended);
    o.push_str("\"exports\": [");
    for (i, r) in reports.iter().enumerate() {
        o.push_str("\n\t{\n");
        let _ = writeln!(o, "\t\"export-name\": {},", json_str(&r.name));
        if let Some(d) = &r.description {
            let _ = writeln!(o, "\t\"description\": {},", json_str(d));
        }
        if show_uri {
            let _ = writeln!(o, "\t\"uri\": {},", json_str(&r.uri));
        }
        if let Some(ctxs) = &r.contexts {
            o.push_str("\t\"contexts\": [");
            for (j, c) in ctxs.iter().enumerate() {
                let _ = write!(o, "\n\t\t{}", json_str(c));
                if j + 1 < ctxs.len() {
                    o.push(',');
                }
            }
            o.push_str("\n\t],\n");
        }
        for (k, v) in r.bools() {
            let _ = writeln!(o, "\t\"{k}\": {v},");
        }
        if let Some(b) = r.block_size {
            let _ = writeln!(o, "\t\"block_size_minimum\": {},", b.minimum);
            let _ = writeln!(o, "\t\"block_size_preferred\": {},", b.preferred);
            let _ = writeln!(o, "\t\"block_size_maximum\": {},", b.maximum);
        }
        let _ = writeln!(o, "\t\"export-size\": {},", r.size);
        let _ = write!(o, "\t\"export-size-str\": {}\n\t}}", json_str(&human_size(r.size)));
        if i + 1 < reports.len() {
            o.push(',');
        }
    }
    o.push_str(" ]\n}\n");
    o
}

fn render_human(h: &nbd_tools::info::ProtocolReport, reports: &[ExportReport], show_uri: bool) -> String {
    let mut o = String::new();
    let packets = if h.extended {
        "extended"
    } else if h.structured {
        "structured"
    } else {
        "simple"
    };
    let _ = writeln!(
        o,
        "protocol: {} {} TLS, using {packets} packets",
        h.protocol,
        if h.tls { "with" } else { "without" }
    );
    for r in reports {
        let _ = writeln!(o, "export={}:", json_str(&r.name));
        if let Some(d) = &r.description {
            let _ = writeln!(o, "\tdescription: {d}");
        }
        let hs = human_size(r.size);
        if hs == r.size.to_string() {
            let _ = writeln!(o, "\texport-size: {}", r.size);
        } else {
            let _ = writeln!(o, "\texport-size: {} ({hs})", r.size);
        }
        if show_uri {
            let _ = writeln!(o, "\turi: {}", r.uri);
        }
        if let Some(ctxs) = &r.contexts {
            o.push_str("\tcontexts:\n");
            for c in ctxs {
                let _ = writeln!(o, "\t\t{c}");
            }
        }
        for (k, v) in r.bools() {
            let _ = writeln!(o, "\t{k}: {v}");
        }
        if let Some(b) = r.block_size {
            let _ = writeln!(o, "\tblock_size_minimum: {}", b.minimum);
            let _ = writeln!(o, "\tblock_size_preferred: {}", b.preferred);
            let _ = writeln!(o, "\tblock_size_maximum: {}", b.maximum);
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_as_printf_g() {
        for (v, s) in [
            (100.0, "100"),
            (50.0, "50"),
            (100.0 / 3.0, "33.3333"),
            (200.0 / 3.0, "66.6667"),
            (0.5, "0.5"),
            (0.001, "0.001"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.0 / 7.0e5, "1.42857e-06"),
            (99.99999, "100"),
            (12.5, "12.5"),
            (0.0, "0"),
        ] {
            assert_eq!(format_g(v), s, "{v}");
        }
    }

    #[test]
    fn features_by_nbdinfo_names() {
        assert_eq!(Feature::parse("read-only"), Some(Feature::ReadOnly));
        assert_eq!(Feature::parse("READONLY"), Some(Feature::ReadOnly));
        assert_eq!(
            Feature::parse("multi_conn"),
            Some(Feature::Flag(TransmissionFlags::CAN_MULTI_CONN))
        );
        assert_eq!(Feature::parse("structured replies"), Some(Feature::StructuredReply));
        assert_eq!(
            Feature::parse("fastzero"),
            Some(Feature::Flag(TransmissionFlags::SEND_FAST_ZERO))
        );
        assert_eq!(Feature::parse("extents"), None);
    }
}
