//! `nbd-info --map` beyond nbdinfo 1.14: `--offset`/`--length` ranges and
//! several `--map` contexts in one run, against qemu-nbd and nbd-serve
//! serving a qcow2 image with a dirty bitmap (and nbdinfo for the
//! base:allocation map), and the usage errors these flags bring.

use nbd_tests::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
const BITMAP: &str = "qemu:dirty-bitmap:b0";
const CONTEXTS: [&str; 3] = ["base:allocation", BITMAP, "qemu:allocation-depth"];

/// A 16 MiB qcow2 image: data at 1 MiB written before the bitmap b0 was
/// added, then data at 5 MiB and an unaligned 100 KiB at 9 MiB that b0
/// records.
fn image(dir: &TempDir) -> String {
    let img = dir.join("d.qcow2");
    let img = img.to_str().unwrap();
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", img, "16M"]);
    run_ok("qemu-io", &["-f", "qcow2", "-c", "write -P 1 1M 64k", img]);
    run_ok("qemu-img", &["bitmap", "--add", img, "b0"]);
    run_ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 2 5M 1M", "-c", "write -P 3 9M 100k", img],
    );
    img.to_string()
}

/// The servers, as `[ CMD ARGS ... ]` for a captive run.
fn servers(img: &str) -> Vec<Vec<String>> {
    let serve = our_bin("nbd-serve");
    [serve.as_str(), "qemu-nbd"]
        .iter()
        .map(|s| {
            [*s, "-r", "-f", "qcow2", "-A", "-B", "b0", img]
                .iter()
                .map(|a| a.to_string())
                .collect()
        })
        .collect()
}

/// `nbd-info ARGS -- [ SERVER ]` (or nbdinfo's), which must succeed.
fn info(program: &str, args: &[&str], server: &[String]) -> String {
    let mut full: Vec<&str> = args.to_vec();
    full.extend(["--", "["]);
    full.extend(server.iter().map(String::as_str));
    full.push("]");
    let out = run(program, &full);
    assert!(out.status.success(), "{program} {full:?}\n{}", describe_output(&out));
    String::from_utf8(out.stdout).unwrap()
}

fn ours(args: &[&str], server: &[String]) -> String {
    info(&our_bin("nbd-info"), args, server)
}

/// One map line: offset, length, type, description.
type Extent = (u64, u64, u64, String);

fn parse_text(map: &str) -> Vec<Extent> {
    map.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 3, "map line {l:?}");
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
                f[3..].join(" "),
            )
        })
        .collect()
}

fn parse_json(map: &str) -> Vec<Extent> {
    let v: Value = serde_json::from_str(map).unwrap_or_else(|e| panic!("bad JSON {e}: {map}"));
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
                e["description"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The full map cut to `[start, end)`.
fn clip(full: &[Extent], start: u64, end: u64) -> Vec<Extent> {
    full.iter()
        .filter_map(|(o, l, t, d)| {
            let (lo, hi) = ((*o).max(start), (o + l).min(end));
            (hi > lo).then(|| (lo, hi - lo, *t, d.clone()))
        })
        .collect()
}

/// `--totals` text as nbd-info (and nbdinfo) prints it, for these extents
/// of a range of `len` bytes.
fn totals_text(extents: &[Extent], len: u64) -> String {
    let mut totals: Vec<(u64, u64, String)> = Vec::new();
    for (_, l, t, d) in extents {
        match totals.iter_mut().find(|x| x.0 == *t) {
            Some(x) => x.1 += l,
            None => totals.push((*t, *l, d.clone())),
        }
    }
    totals.sort();
    let mut out = String::new();
    for (t, bytes, d) in totals {
        let percent = 100.0 * bytes as f64 / len as f64;
        out.push_str(&format!("{bytes:>10} {percent:>5.1}% {t:>3} {d}\n"));
    }
    out
}

/// The ranges tried: (--offset, --length), `None` for a flag left out.
const RANGES: &[(Option<u64>, Option<u64>)] = &[
    (None, None),
    (Some(0), Some(SIZE)),
    (Some(1_000_000), Some(5 * MIB)),
    (Some(5 * MIB), Some(MIB)),
    (Some(5 * MIB + 1), Some(MIB - 2)),
    (Some(9 * MIB + 4096), None),
    (None, Some(1_048_577)),
    (Some(SIZE - 1), Some(1)),
    (Some(SIZE), None),
    (Some(3), Some(0)),
];

fn range_args(offset: Option<u64>, length: Option<u64>) -> Vec<String> {
    let mut a = Vec::new();
    if let Some(o) = offset {
        a.push(format!("--offset={o}"));
    }
    if let Some(l) = length {
        a.push(format!("--length={l}"));
    }
    a
}

#[test]
fn ranges_are_the_full_map_clipped() {
    if !require_peers(&["qemu-nbd", "qemu-img", "qemu-io", "nbdinfo"]) {
        return;
    }
    let dir = TempDir::new();
    let img = image(&dir);
    for server in servers(&img) {
        for context in CONTEXTS {
            let flag = format!("--map={context}");
            let full = parse_text(&ours(&[&flag], &server));
            assert_eq!(full.first().map(|e| e.0), Some(0), "{server:?} {context}");
            assert_eq!(full.iter().map(|e| e.1).sum::<u64>(), SIZE, "{server:?} {context}");
            // nbdinfo's map of base:allocation, to clip the same way.
            let theirs = (context == "base:allocation").then(|| parse_text(&info("nbdinfo", &["--map"], &server)));
            if let Some(t) = &theirs {
                assert_eq!(&full, t, "{server:?}: full map as nbdinfo's");
            }
            for &(offset, length) in RANGES {
                let start = offset.unwrap_or(0);
                let end = length.map_or(SIZE, |l| start + l);
                let expected = clip(&full, start, end);
                let ra = range_args(offset, length);
                let mut args: Vec<&str> = vec![&flag];
                args.extend(ra.iter().map(String::as_str));
                let what = format!("{server:?} {args:?}");
                let text = ours(&args, &server);
                assert_eq!(parse_text(&text), expected, "{what}\n{text}");
                if let Some(t) = &theirs {
                    assert_eq!(parse_text(&text), clip(t, start, end), "{what}: nbdinfo's map clipped");
                }
                // The lines themselves are nbdinfo's format.
                let lines: String = expected
                    .iter()
                    .map(|(o, l, t, d)| format!("{o:>10}  {l:>10}  {t:>3}  {d}\n"))
                    .collect();
                assert_eq!(text, lines, "{what}");
                args.push("--json");
                assert_eq!(parse_json(&ours(&args, &server)), expected, "{what}");
                args.pop();
                args.push("--totals");
                let totals = ours(&args, &server);
                if end > start {
                    assert_eq!(totals, totals_text(&expected, end - start), "{what}");
                } else {
                    assert_eq!(totals, "", "{what}");
                }
                args.push("--json");
                let tj: Value = serde_json::from_str(&ours(&args, &server)).unwrap();
                let sum: u64 = tj.as_array().unwrap().iter().map(|t| t["size"].as_u64().unwrap()).sum();
                assert_eq!(sum, end - start, "{what}: {tj}");
            }
        }
    }
}

#[test]
fn requests_cover_only_the_range() {
    if !require_peer("nbdkit") {
        return;
    }
    let dir = TempDir::new();
    let log = dir.join("log");
    let log_arg = format!("logfile={}", log.display());
    let server: Vec<String> = ["nbdkit", "--filter=log", "memory", "16M", &log_arg]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (start, len) = (1_000_000u64, 3 * MIB);
    let out = ours(
        &["--map", &format!("--offset={start}"), &format!("--length={len}")],
        &server,
    );
    // nbdkit describes past the request; the map stops at the range's end.
    assert_eq!(out, format!("{start:>10}  {len:>10}    3  hole,zero\n"));
    let log = std::fs::read_to_string(&log).unwrap();
    let hex = |line: &str, key: &str| -> u64 {
        let v = line.split_whitespace().find_map(|w| w.strip_prefix(key)).unwrap();
        u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap()
    };
    let requests: Vec<(u64, u64)> = log
        .lines()
        .filter(|l| l.contains(" Extents id=") && l.contains("offset="))
        .map(|l| (hex(l, "offset="), hex(l, "count=")))
        .collect();
    assert!(!requests.is_empty(), "{log}");
    for (o, c) in requests {
        assert!(
            o >= start && o + c <= start + len,
            "request {o}+{c} outside the range\n{log}"
        );
    }
}

#[test]
fn several_contexts_equal_the_single_runs() {
    if !require_peers(&["qemu-nbd", "qemu-img", "qemu-io"]) {
        return;
    }
    let dir = TempDir::new();
    let img = image(&dir);
    let maps: Vec<String> = CONTEXTS.iter().map(|c| format!("--map={c}")).collect();
    for server in servers(&img) {
        for &(offset, length) in &[(None, None), (Some(1_000_000), Some(9 * MIB))] {
            let ra = range_args(offset, length);
            for mode in [&[][..], &["--totals"]] {
                let mut common: Vec<&str> = ra.iter().map(String::as_str).collect();
                common.extend_from_slice(mode);
                // `--map` alone is base:allocation, and a repeated context counts once.
                let mut several: Vec<&str> = vec!["--map", &maps[1], &maps[2], &maps[0]];
                several.extend_from_slice(&common);
                let what = format!("{server:?} {several:?}");
                let singles: Vec<String> = maps
                    .iter()
                    .map(|m| {
                        let mut a = vec![m.as_str()];
                        a.extend_from_slice(&common);
                        ours(&a, &server)
                    })
                    .collect();
                // Text: the context's name, its map, an empty line between.
                let expected: Vec<String> = CONTEXTS
                    .iter()
                    .zip(&singles)
                    .map(|(c, s)| format!("{c}\n{s}"))
                    .collect();
                assert_eq!(ours(&several, &server), expected.join("\n"), "{what}");
                // JSON: an object keyed by context, in the order given.
                several.push("--json");
                let json = ours(&several, &server);
                let v: Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{what}: {e}\n{json}"));
                let obj = v.as_object().unwrap();
                assert_eq!(obj.len(), CONTEXTS.len(), "{what}\n{json}");
                let mut at = 0;
                for (c, m) in CONTEXTS.iter().zip(&maps) {
                    let mut a = vec![m.as_str()];
                    a.extend_from_slice(&common);
                    a.push("--json");
                    let single: Value = serde_json::from_str(&ours(&a, &server)).unwrap();
                    assert_eq!(obj[*c], single, "{what}: {c}");
                    let pos = json.find(&format!("\"{c}\":")).unwrap();
                    assert!(pos >= at, "{what}: keys in the order given\n{json}");
                    at = pos;
                }
            }
        }
        // One context given twice is that context's output alone.
        assert_eq!(
            ours(&["--map", "--map=base:allocation"], &server),
            ours(&["--map"], &server)
        );
    }
}

#[test]
fn range_and_context_errors_exit_1() {
    if !require_peers(&["qemu-nbd", "qemu-img", "qemu-io"]) {
        return;
    }
    let dir = TempDir::new();
    let img = image(&dir);
    let bin = our_bin("nbd-info");
    for server in servers(&img) {
        let cases: &[(&[&str], &str)] = &[
            (&["--map", "--offset=17M"], "beyond the end"),
            (&["--map", "--offset=16777217", "--length=0"], "beyond the end"),
            (&["--map", "--offset=1M", "--length=16M"], "beyond the end"),
            (&["--map", "--length=16777217"], "beyond the end"),
            (&["--map", "--offset=1", "--length=18446744073709551615"], "overflows"),
            (&["--offset=1M"], "only with --map"),
            (&["--length=1M"], "only with --map"),
            (&["--size", "--offset=0"], "only with --map"),
            (&["--map", "--offset=lots"], "--offset"),
            (&["--map", "--map=qemu:dirty-bitmap:nope"], "qemu:dirty-bitmap:nope"),
            (&["--map=qemu:dirty-bitmap:nope"], "qemu:dirty-bitmap:nope"),
        ];
        for (flags, needle) in cases {
            let mut args = flags.to_vec();
            args.extend(["--", "["]);
            args.extend(server.iter().map(String::as_str));
            args.push("]");
            let out = run(&bin, &args);
            assert_eq!(out.status.code(), Some(1), "{args:?}\n{}", describe_output(&out));
            assert!(out.stdout.is_empty(), "{args:?}: prints no map");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(needle), "{args:?}: {needle:?} not in {err}");
        }
    }
}

/// A file on the machine's disk (not tmpfs) with unwritten (fallocated,
/// never written) extents, data and a hole: its map is qemu-nbd's, and a
/// READ over the unwritten extents comes back as hole chunks, unread.
#[test]
fn fallocated_extents_map_as_qemu_nbd_and_read_as_holes() {
    if !require_peers(&["qemu-nbd", "nbdinfo", "nbdsh", "fallocate", "fincore"]) {
        return;
    }
    let dir = TempDir::new();
    let path = dir.join("fallocated.img");
    let file = path.to_str().unwrap();
    // 0-6 MiB fallocated, 1-2 MiB written, 6-8 MiB a hole.
    run_ok("fallocate", &["-l", "6M", file]);
    let data: Vec<u8> = (0..MIB as usize).map(|i| (i % 241) as u8 + 1).collect();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&data, MIB).unwrap();
        f.set_len(8 * MIB).unwrap();
        f.sync_all().unwrap();
    }
    let ours = our_bin("nbd-serve");
    let map = |server: &str| {
        let out = run_ok("nbdinfo", &["--map", "--", "[", server, "-r", "-f", "raw", file, "]"]);
        parse_text(&out)
    };
    let (our_map, qemu_map) = (map(&ours), map("qemu-nbd"));
    assert_eq!(our_map, qemu_map, "nbd-serve's map, then qemu-nbd's");
    assert!(
        our_map.iter().any(|e| e.0 == 2 * MIB && e.2 == 3),
        "the unwritten extent after the data is a hole: {our_map:?}"
    );

    // READs: the unwritten 4 MiB as hole chunks only; the data as data.
    let sock = dir.socket_path("serve");
    let peer = Peer::start(
        &dir,
        &ours,
        &["--socket", sock.to_str().unwrap(), "-r", file],
        Endpoint::Unix(sock.clone()),
    );
    let script = "\
chunks = []
def chunk(buf, offset, status, err):
    chunks.append((offset, len(buf), status, not any(bytes(buf))))
    return 0
for (offset, count) in ((2 << 20, 4 << 20), (1 << 20, 1 << 20)):
    chunks.clear()
    h.pread_structured(count, offset, chunk)
    kinds = sorted(set('hole' if s == nbd.READ_HOLE else 'data' for (_, _, s, _) in chunks))
    print(offset, sum(n for (_, n, _, _) in chunks), ','.join(kinds), all(z for (_, _, _, z) in chunks))
";
    let out = run_ok("nbdsh", &["-u", &peer.uri(""), "-c", script]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            format!("{} {} hole True", 2 * MIB, 4 * MIB).as_str(),
            format!("{} {} data False", MIB, MIB).as_str()
        ],
        "{out}"
    );
    // Unread: of the file, only the written MiB (and the first bytes, which
    // the format probe reads) is in the page cache, not the 4 MiB read.
    {
        let res = run_ok("fincore", &["--bytes", "--noheadings", "--output", "RES", file]);
        let resident: u64 = res
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("fincore said {res:?}: {e}"));
        assert!(
            resident < 2 * MIB,
            "{resident} bytes of the file were read into the page cache"
        );
    }
}
