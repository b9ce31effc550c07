//! `nbd-info`: show information about an NBD server and its exports, in
//! the manner of libnbd's `nbdinfo`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser;
use nbd_blocking::client::{Client, Negotiation};
use nbd_proto::client::{ClientConfig, TlsMode};
use nbd_proto::uri::NbdUri;
use nbd_proto::wire::{AllocationFlags, CONTEXT_BASE_ALLOCATION, CommandFlags};
use nbd_tools::info::{ExportReport, human_size};

/// Show information about an NBD server and its exports.
#[derive(Parser, Debug)]
#[command(name = "nbd-info", version, about)]
struct Args {
    /// Print JSON (the same keys and values as `nbdinfo --json`).
    #[arg(long)]
    json: bool,
    /// List every export of the server.
    #[arg(short = 'L', long)]
    list: bool,
    /// Print the map of a metadata context (default `base:allocation`).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = CONTEXT_BASE_ALLOCATION, value_name = "CONTEXT")]
    map: Option<String>,
    /// Print only the export size in bytes.
    #[arg(long)]
    size: bool,
    /// TLS on an nbd:// URI: off, allow (use it if the server offers it)
    /// or require. nbds:// URIs always require TLS.
    #[arg(long, value_enum, value_name = "MODE")]
    tls: Option<TlsFlag>,
    /// The NBD URI, e.g. `nbd://localhost/disk` or `nbd+unix:///?socket=/tmp/sock`.
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

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(out) => {
            let mut stdout = std::io::stdout().lock();
            if stdout.write_all(out.as_bytes()).and_then(|_| stdout.flush()).is_err() {
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nbd-info: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<String, String> {
    let mut uri = NbdUri::parse(&args.uri).map_err(|e| format!("{}: {e}", args.uri))?;
    if let Some(flag) = args.tls {
        nbd_net::apply_tls_flag(&mut uri, flag.into())?;
    }
    let connect_err = |e: nbd_blocking::Error| format!("{}: {e}", args.uri);
    if let Some(context) = &args.map {
        return map(&uri, context, args.json).map_err(|e| match e {
            MapError::Nbd(e) => connect_err(e),
            MapError::NoContext(c) => format!("--map: server does not support metadata context {c:?}"),
        });
    }
    if args.size {
        let client = Client::connect_uri(
            &uri,
            ClientConfig {
                meta_contexts: Vec::new(),
                ..ClientConfig::default()
            },
        )
        .map_err(connect_err)?;
        let size = client.size();
        let _ = client.disconnect();
        return Ok(format!("{size}\n"));
    }
    let config = ClientConfig {
        export_name: uri.export.clone(),
        ..ClientConfig::default()
    };
    let mut neg = Negotiation::connect(&uri, config).map_err(connect_err)?;
    let mut reports = Vec::new();
    if args.list {
        if neg.is_done() {
            return Err(format!(
                "{}: the server does not support listing exports (no fixed newstyle)",
                args.uri
            ));
        }
        let exports = neg.list().map_err(connect_err)?;
        for e in exports {
            let mut r = ExportReport::from_option_mode(&mut neg, &uri, &e.name).map_err(connect_err)?;
            if r.description.is_none() {
                r.description = e.description.clone();
            }
            reports.push(r);
        }
        let header = nbd_tools::info::ProtocolReport::from_negotiation(&neg);
        let _ = neg.abort();
        return Ok(if args.json {
            render_json(&header, &reports)
        } else {
            render_human(&header, &reports)
        });
    }
    let header = nbd_tools::info::ProtocolReport::from_negotiation(&neg);
    let r = ExportReport::single(neg, &uri).map_err(connect_err)?;
    let header = nbd_tools::info::ProtocolReport {
        protocol: r.protocol,
        ..header
    };
    reports.push(r);
    Ok(if args.json {
        render_json(&header, &reports)
    } else {
        render_human(&header, &reports)
    })
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
    NoContext(String),
}

impl From<nbd_blocking::Error> for MapError {
    fn from(e: nbd_blocking::Error) -> Self {
        MapError::Nbd(e)
    }
}

fn map(uri: &NbdUri, context: &str, json: bool) -> Result<String, MapError> {
    let config = ClientConfig {
        export_name: uri.export.clone(),
        meta_contexts: vec![context.to_string()],
        ..ClientConfig::default()
    };
    let mut client = Client::connect_uri(uri, config)?;
    let Some(id) = client.negotiated().context_id(context) else {
        let _ = client.disconnect();
        return Err(MapError::NoContext(context.to_string()));
    };
    let size = client.size();
    let c = client.constraints();
    // Ask for as much as a request can describe, aligned to the minimum.
    let max_req: u64 = if client.mode().extended() {
        1 << 62
    } else {
        (u32::MAX as u64) & !(c.minimum as u64 - 1)
    };
    let mut merged: Vec<(u64, u64, u64)> = Vec::new();
    let mut offset = 0u64;
    while offset < size {
        let len = (size - offset).min(max_req);
        let statuses = client.block_status(offset, len, CommandFlags::empty())?;
        let Some(st) = statuses.into_iter().find(|s| s.context_id == id) else {
            break;
        };
        let mut advanced = 0u64;
        for e in st.extents {
            let l = e.length.min(size - offset - advanced);
            if l == 0 {
                break;
            }
            match merged.last_mut() {
                Some(last) if last.2 == e.flags && last.0 + last.1 == offset + advanced => last.1 += l,
                _ => merged.push((offset + advanced, l, e.flags)),
            }
            advanced += l;
        }
        if advanced == 0 {
            break;
        }
        offset += advanced;
    }
    let _ = client.disconnect();
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
        for (o, l, t) in &merged {
            let _ = writeln!(out, "{o:>10}  {l:>10}  {t:>3}  {}", describe(context, *t));
        }
    }
    Ok(out)
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

fn render_json(h: &nbd_tools::info::ProtocolReport, reports: &[ExportReport]) -> String {
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
        let _ = writeln!(o, "\t\"uri\": {},", json_str(&r.uri));
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

fn render_human(h: &nbd_tools::info::ProtocolReport, reports: &[ExportReport]) -> String {
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
        let _ = writeln!(o, "\turi: {}", r.uri);
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
