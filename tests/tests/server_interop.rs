//! Our async server, `nbd-serve`, under real clients that nobody here
//! wrote: nbdinfo, qemu-img, qemu-io, nbdcopy, nbdsh (libnbd's Python
//! API) and fio's nbd engine, each run against `nbd-serve` started on a
//! Unix socket in a temporary directory (or as a socket-activated
//! subprocess of nbdinfo and nbdcopy).

use std::fs;
use std::path::Path;
use std::process::Output;

use nbd_blocking::client::{Client, Error};
use nbd_proto::client::RequestError;
use nbd_proto::wire::CommandFlags;
use nbd_tests::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// Starts `nbd-serve --socket SOCKET ARGS...` and waits until it listens.
fn serve(dir: &TempDir, args: &[&str]) -> Peer {
    let socket = dir.socket_path("nbd-serve");
    let socket_arg = path_str(&socket).to_owned();
    let mut full = vec!["--socket", socket_arg.as_str()];
    full.extend_from_slice(args);
    Peer::start(dir, &our_bin("nbd-serve"), &full, Endpoint::Unix(socket))
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// Deterministic pseudo-random bytes (xorshift), different per seed.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn parse_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("invalid JSON ({e}):\n{text}"))
}

/// A run of bytes that is either data or a hole, as `(offset, length, hole)`.
type Run = (u64, u64, bool);

/// Merges adjacent runs of the same kind (the tools split them freely).
fn merge(runs: impl IntoIterator<Item = Run>) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for (offset, length, hole) in runs {
        if let Some(last) = out.last_mut() {
            assert_eq!(
                last.0 + last.1,
                offset,
                "runs are not contiguous: {last:?} then {offset}"
            );
            if last.2 == hole {
                last.1 += length;
                continue;
            }
        }
        out.push((offset, length, hole));
    }
    out
}

/// `nbdinfo --map --json URI` as merged runs (type bit 0 = hole).
fn nbdinfo_map(uri: &str) -> Vec<Run> {
    let map = parse_json(&run_ok("nbdinfo", &["--map", "--json", uri]));
    merge(
        map.as_array()
            .expect("nbdinfo --map --json gives an array")
            .iter()
            .map(|e| {
                (
                    e["offset"].as_u64().unwrap(),
                    e["length"].as_u64().unwrap(),
                    e["type"].as_u64().unwrap() & 1 == 1,
                )
            }),
    )
}

/// `qemu-img map --output=json -f raw IMAGE` as merged runs (no data = hole).
fn qemu_img_map(image: &str) -> Vec<Run> {
    let map = parse_json(&run_ok("qemu-img", &["map", "--output=json", "-f", "raw", image]));
    merge(map.as_array().expect("qemu-img map gives an array").iter().map(|e| {
        (
            e["start"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            !e["data"].as_bool().unwrap(),
        )
    }))
}

/// The only export of `nbdinfo --json` output.
fn only_export(info: &Value) -> &Value {
    let exports = info["exports"].as_array().expect("exports");
    assert_eq!(exports.len(), 1, "{info:#}");
    &exports[0]
}

// ---------------------------------------------------------------------------
// nbdinfo
// ---------------------------------------------------------------------------

#[test]
fn nbdinfo_json_shows_size_description_flags_and_contexts() {
    if !require_peer("nbdinfo") {
        return;
    }
    let dir = TempDir::new();
    let peer = serve(&dir, &["--memory", "16M", "-D", "a test disk"]);
    let info = parse_json(&run_ok("nbdinfo", &["--json", &peer.uri("")]));
    assert_eq!(info["protocol"], "newstyle-fixed", "{info:#}");
    assert_eq!(info["structured"], true);
    let e = only_export(&info);
    assert_eq!(e["export-size"], 16 * MIB, "{e:#}");
    assert_eq!(e["description"], "a test disk");
    for key in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_cache",
        "can_df",
        "can_multi_conn",
    ] {
        assert_eq!(e[key], true, "{key} of a writable memory export\n{e:#}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["is_rotational"], false);
    let contexts = e["contexts"].as_array().expect("contexts");
    assert!(contexts.iter().any(|c| c == "base:allocation"), "{e:#}");
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 * MIB);

    // Read-only: every writing flag goes away.
    let ro = serve(&dir, &["--memory", "1M", "-r"]);
    let info = parse_json(&run_ok("nbdinfo", &["--json", &ro.uri("")]));
    let e = only_export(&info);
    assert_eq!(e["is_read_only"], true, "{e:#}");
    for key in ["can_trim", "can_zero", "can_fast_zero", "can_fua"] {
        assert_eq!(e[key], false, "{key} of a read-only export\n{e:#}");
    }
    assert_eq!(e["export-size"], MIB);

    // The plain modes agree with the JSON.
    assert_eq!(run_ok("nbdinfo", &["--size", &peer.uri("")]).trim(), "16777216");
    assert!(run("nbdinfo", &["--is", "read-only", &ro.uri("")]).status.success());
    assert!(!run("nbdinfo", &["--is", "read-only", &peer.uri("")]).status.success());

    // Older protocol flavours, as libnbd sees them.
    for (args, protocol, structured) in [
        (["--memory", "2M", "--no-sr"], "newstyle-fixed", false),
        (["--memory", "2M", "--oldstyle"], "oldstyle", false),
    ] {
        let old = serve(&dir, &args);
        let info = parse_json(&run_ok("nbdinfo", &["--json", &old.uri("")]));
        assert_eq!(info["protocol"], protocol, "{args:?}: {info:#}");
        assert_eq!(info["structured"], structured, "{args:?}: {info:#}");
        let e = only_export(&info);
        assert_eq!(e["export-size"], 2 * MIB);
        assert!(
            e.get("contexts")
                .is_none_or(|c| c.as_array().is_some_and(Vec::is_empty)),
            "{e:#}"
        );
        assert_eq!(e["can_df"], false, "no DF without structured replies: {e:#}");
    }
}

#[test]
fn nbdinfo_lists_several_exports() {
    if !require_peer("nbdinfo") {
        return;
    }
    let dir = TempDir::new();
    let file = dir.sparse_file("b.img", 4 * MIB);
    let b = format!("b={}", path_str(&file));
    let peer = serve(
        &dir,
        &[
            "--memory",
            "2M",
            "-x",
            "main",
            "-D",
            "the main disk",
            "--export",
            "a=memory:1M",
            "--export",
            &b,
        ],
    );
    let list = parse_json(&run_ok("nbdinfo", &["--list", "--json", &peer.uri("")]));
    let exports = list["exports"].as_array().expect("exports");
    let summary: Vec<(&str, u64)> = exports
        .iter()
        .map(|e| (e["export-name"].as_str().unwrap(), e["export-size"].as_u64().unwrap()))
        .collect();
    assert_eq!(summary, [("main", 2 * MIB), ("a", MIB), ("b", 4 * MIB)], "{list:#}");
    assert_eq!(exports[0]["description"], "the main disk");
    for e in exports {
        let contexts = e["contexts"].as_array().expect("contexts");
        assert!(contexts.iter().any(|c| c == "base:allocation"), "{e:#}");
        let name = e["export-name"].as_str().unwrap();
        assert_eq!(e["uri"].as_str().unwrap(), peer.uri(name));
    }
    // Each export on its own, by name; "" is the first one.
    for (name, size) in [("a", MIB), ("b", 4 * MIB), ("", 2 * MIB)] {
        let info = parse_json(&run_ok("nbdinfo", &["--json", &peer.uri(name)]));
        assert_eq!(only_export(&info)["export-size"], size, "export {name:?}");
    }
    // A name nobody serves is an error.
    let out = run("nbdinfo", &["--json", &peer.uri("nope")]);
    assert!(!out.status.success(), "{}", describe_output(&out));
    // libnbd hangs up after NBD_OPT_ABORT without reading our ack: that
    // is not worth an error message.
    assert!(
        !peer.stderr().contains("Broken pipe"),
        "nbd-serve logged a client's ordinary hang-up:\n{}",
        peer.stderr()
    );
}

#[test]
fn nbdinfo_map_shows_holes_and_data_where_they_are() {
    if !require_peer("nbdinfo") {
        return;
    }
    let dir = TempDir::new();
    let peer = serve(&dir, &["--memory", "16M"]);
    assert_eq!(nbdinfo_map(&peer.uri("")), [(0, 16 * MIB, true)]);

    let mut c = Client::connect(&peer.uri("")).unwrap();
    c.write(&random_bytes(MIB as usize, 1), MIB).unwrap();
    c.write(&random_bytes(64 * 1024, 2), 8 * MIB).unwrap();
    // Zeroing without NO_HOLE may punch a hole into the data.
    c.write_zeroes(MIB + 512 * 1024, 256 * 1024, CommandFlags::empty())
        .unwrap();
    // Trimming releases a whole written megabyte again.
    c.write(&random_bytes(MIB as usize, 3), 12 * MIB).unwrap();
    c.trim(12 * MIB, MIB, CommandFlags::empty()).unwrap();
    c.disconnect().unwrap();

    let expected = [
        (0, MIB, true),
        (MIB, 512 * 1024, false),
        (MIB + 512 * 1024, 256 * 1024, true),
        (MIB + 768 * 1024, 256 * 1024, false),
        (2 * MIB, 6 * MIB, true),
        (8 * MIB, 64 * 1024, false),
        (8 * MIB + 64 * 1024, 8 * MIB - 64 * 1024, true),
    ];
    assert_eq!(nbdinfo_map(&peer.uri("")), expected);
    // The text form says the same.
    let text = run_ok("nbdinfo", &["--map", &peer.uri("")]);
    let first: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(first, ["0", "1048576", "3", "hole,zero"], "{text}");
    assert!(text.contains("1048576      524288    0  data"), "{text}");
}

// ---------------------------------------------------------------------------
// qemu-img and qemu-io
// ---------------------------------------------------------------------------

#[test]
fn qemu_img_info_convert_and_compare() {
    if !require_peers(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = TempDir::new();
    let peer = serve(&dir, &["--memory", "8M"]);
    let uri = peer.uri("");

    let info = parse_json(&run_ok("qemu-img", &["info", "--output=json", &uri]));
    assert_eq!(info["virtual-size"], 8 * MIB, "{info:#}");
    let text = run_ok("qemu-img", &["info", &uri]);
    assert!(text.contains("virtual size: 8 MiB (8388608 bytes)"), "{text}");

    // A local qcow2 image with a pattern...
    let src = dir.join("src.qcow2");
    let src = path_str(&src);
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", src, "8M"]);
    run_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 1M 512k",
            "-c",
            "write -P 0xa5 6M 64k",
            "-c",
            "write -P 0x33 8388096 512",
            src,
        ],
    );
    // ...converted into the existing NBD export...
    run_ok("qemu-img", &["convert", "-n", "-f", "qcow2", "-O", "raw", src, &uri]);
    let same = run_ok("qemu-img", &["compare", "-f", "qcow2", "-F", "raw", src, &uri]);
    assert!(same.contains("Images are identical"), "{same}");
    // ...and out of it into a local raw file.
    let out = dir.join("out.raw");
    let out = path_str(&out);
    run_ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", &uri, out]);
    let same = run_ok("qemu-img", &["compare", "-f", "qcow2", "-F", "raw", src, out]);
    assert!(same.contains("Images are identical"), "{same}");
    let bytes = fs::read(out).unwrap();
    assert_eq!(bytes.len() as u64, 8 * MIB);
    assert!(bytes[MIB as usize..][..512 * 1024].iter().all(|&b| b == 0x5a));
    assert!(bytes[6 * MIB as usize..][..64 * 1024].iter().all(|&b| b == 0xa5));
    assert!(bytes[8 * MIB as usize - 512..].iter().all(|&b| b == 0x33));
    assert!(bytes[..MIB as usize].iter().all(|&b| b == 0));

    // One changed byte in the export is found, in its 512-byte sector
    // (qemu-img compare reports the sector's offset).
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x11 7340133 1", &uri]);
    let diff = run("qemu-img", &["compare", "-f", "qcow2", "-F", "raw", src, &uri]);
    assert_eq!(diff.status.code(), Some(1), "{}", describe_output(&diff));
    let stdout = String::from_utf8_lossy(&diff.stdout);
    assert!(stdout.contains("Content mismatch at offset 7340032"), "{stdout}");
    // And the strict compare (-s) of the copy sees the same difference.
    let diff = run("qemu-img", &["compare", "-s", "-f", "raw", "-F", "raw", out, &uri]);
    assert_eq!(diff.status.code(), Some(1), "{}", describe_output(&diff));
}

/// qemu-io's output for `-c` commands, which must all succeed.
fn qemu_io(uri: &str, extra: &[&str], commands: &[&str]) -> Output {
    let mut args: Vec<&str> = extra.to_vec();
    args.extend(["-f", "raw"]);
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(uri);
    let out = run("qemu-io", &args);
    assert!(out.status.success(), "qemu-io {args:?}\n{}", describe_output(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("failed"),
        "qemu-io {args:?}\n{}",
        describe_output(&out)
    );
    out
}

/// Every command qemu-io has for a block device, then the pattern checks.
fn qemu_io_commands(uri: &str) {
    let out = qemu_io(
        uri,
        &[],
        &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "write -P 0xcd 2M 128k",
            "discard 2M 64k",
            "write -z 1M 64k",
            "write -z -u 1088k 64k",
            "flush",
            "aio_write -P 0x55 4M 64k",
            "aio_write -P 0x66 5M 32k",
            "aio_flush",
            "aio_read -P 0x55 4M 64k",
            "aio_read -P 0x66 5M 32k",
            "aio_flush",
            "read -P 0 1M 128k",
            "read -P 0xcd 2112k 64k",
            "writev -P 0x77 6M 4k 8k 512",
            "readv -P 0x77 6M 12k 512",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in [
        "wrote 1048576/1048576 bytes at offset 0",
        "read 1048576/1048576 bytes at offset 0",
        "discard 65536/65536 bytes at offset 2097152",
        "wrote 65536/65536 bytes at offset 1048576",
        "wrote 65536/65536 bytes at offset 1114112",
        "wrote 65536/65536 bytes at offset 4194304",
        "read 65536/65536 bytes at offset 4194304",
        "read 32768/32768 bytes at offset 5242880",
        "read 131072/131072 bytes at offset 1048576",
        "wrote 12800/12800 bytes at offset 6291456",
        "read 12800/12800 bytes at offset 6291456",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in\n{stdout}");
    }
    // A pattern check that must fail proves the checks look at the data.
    let out = run("qemu-io", &["-f", "raw", "-c", "read -P 0xab 4M 4k", uri]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("Pattern verification failed at offset 4194304"),
        "{}",
        describe_output(&out)
    );
}

#[test]
fn qemu_io_every_command_with_and_without_extended_headers() {
    if !require_peer("qemu-io") {
        return;
    }
    let dir = TempDir::new();
    let extended = serve(&dir, &["--memory", "8M", "-v"]);
    let structured = serve(&dir, &["--memory", "8M", "-v", "--no-extended-headers"]);
    qemu_io_commands(&extended.uri(""));
    qemu_io_commands(&structured.uri(""));

    // QEMU's own trace of the handshake shows what was negotiated.
    let trace = |uri: &str| {
        let out = qemu_io(uri, &["--trace", "nbd_receive_option_reply"], &["read 0 4k"]);
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let t = trace(&extended.uri(""));
    assert!(
        t.contains("option reply 11 (extended headers), type 1 (ack)"),
        "qemu did not negotiate extended headers:\n{t}"
    );
    let t = trace(&structured.uri(""));
    assert!(
        t.contains("option reply 11 (extended headers)") && t.contains("(unsupported)"),
        "{t}"
    );
    assert!(t.contains("option reply 8 (structured reply), type 1 (ack)"), "{t}");
    // And so does the server's log.
    let log = extended.stderr();
    assert!(log.contains("client negotiated extended headers"), "{log}");
    assert!(!log.contains("structured replies"), "{log}");
    let log = structured.stderr();
    assert!(log.contains("client negotiated structured replies"), "{log}");
    assert!(!log.contains("extended headers"), "{log}");
}

// ---------------------------------------------------------------------------
// nbdcopy, nbdsh, fio
// ---------------------------------------------------------------------------

#[test]
fn nbdcopy_both_ways_preserves_every_byte() {
    if !require_peer("nbdcopy") {
        return;
    }
    let dir = TempDir::new();
    let size = 32 * MIB as usize;
    let data = random_bytes(size, 42);
    let src = dir.join("src.img");
    fs::write(&src, &data).unwrap();
    let peer = serve(&dir, &["--memory", "32M"]);
    let uri = peer.uri("");
    run_ok("nbdcopy", &[path_str(&src), &uri]);
    let back = dir.join("back.img");
    run_ok("nbdcopy", &[&uri, path_str(&back)]);
    let copied = fs::read(&back).unwrap();
    assert_eq!(copied.len(), size);
    if let Some(i) = copied.iter().zip(&data).position(|(a, b)| a != b) {
        panic!("byte {i} differs after the round trip through nbd-serve");
    }
    // Our client sees the same bytes nbdcopy wrote.
    let mut c = Client::connect(&uri).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    c.read(&mut buf, 17 * MIB).unwrap();
    assert_eq!(buf, data[17 * MIB as usize..][..1 << 20]);
    c.disconnect().unwrap();
}

#[test]
fn nbdsh_every_command_through_libnbd() {
    if !require_peer("nbdsh") {
        return;
    }
    let dir = TempDir::new();
    let peer = serve(&dir, &["--memory", "16M", "-D", "for nbdsh"]);
    let script = r#"
M = 1 << 20
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri)
assert h.get_size() == 16 * M
assert h.get_protocol() == "newstyle-fixed"
assert h.get_structured_replies_negotiated()
for name in ["can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
             "can_cache", "can_df", "can_multi_conn"]:
    assert getattr(h, name)(), name
assert not h.is_read_only()
assert not h.is_rotational()
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * M

def extents():
    got = []
    def cb(meta, offset, entries, err):
        assert meta == nbd.CONTEXT_BASE_ALLOCATION
        assert offset == 0
        got.extend(entries)
        return 0
    h.block_status(16 * M, 0, cb)
    runs = []
    pos = 0
    for i in range(0, len(got), 2):
        length, flags = got[i], got[i + 1]
        hole = (flags & nbd.STATE_HOLE) != 0
        if runs and runs[-1][2] == hole:
            runs[-1][1] += length
        else:
            runs.append([pos, length, hole])
        pos += length
    assert pos == 16 * M, pos
    return runs

assert extents() == [[0, 16 * M, True]], extents()

data = bytes((i * 7 + 3) % 256 for i in range(M))
h.pwrite(data, M)
h.pwrite(data[:4096], 4 * M, nbd.CMD_FLAG_FUA)
assert h.pread(M, M) == data
assert h.pread(4096, 4 * M) == data[:4096]
h.flush()
h.cache(M, 0)

# Zero inside the data without a hole, then trim the rest of it.
h.zero(65536, M + 65536, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(65536, M + 65536) == bytes(65536)
assert h.pread(65536, M) == data[:65536]
h.trim(M // 2, M + M // 2)
assert extents() == [[0, M, True], [M, M // 2, False], [M + M // 2, 4 * M - M - M // 2, True],
                     [4 * M, 32768, False], [4 * M + 32768, 12 * M - 32768, True]], extents()

# A fast zero is either fast or refused with ENOTSUP, never slow.
try:
    h.zero(M, 8 * M, nbd.CMD_FLAG_FAST_ZERO)
    assert h.pread(M, 8 * M) == bytes(M)
except nbd.Error as e:
    assert e.errno in ("ENOTSUP", "EOPNOTSUPP"), e.errno

# REQ_ONE: exactly one extent, not longer than asked.
one = []
def cb1(meta, offset, entries, err):
    one.extend(entries)
    return 0
h.block_status(8192, M + 4096, cb1, nbd.CMD_FLAG_REQ_ONE)
assert len(one) == 2 and one[0] <= 8192 and one[1] & nbd.STATE_HOLE == 0, one

# Structured reads: a hole comes back as a hole chunk, unless DF.
def chunks(flags):
    got = []
    def chunk(buf, offset, status, err):
        got.append((offset, len(buf), status))
        return 0
    buf = h.pread_structured(2 * M, 0, chunk, flags)
    assert buf == bytes(M) + data[:65536] + bytes(65536) + data[131072:M // 2] + bytes(M // 2), \
        "pread_structured data"
    return got
sparse = chunks(0)
assert (0, M, nbd.READ_HOLE) in sparse, sparse
assert (M, M // 2, nbd.READ_DATA) in sparse, sparse
assert chunks(nbd.CMD_FLAG_DF) == [(0, 2 * M, nbd.READ_DATA)]

# Errors come back as errno values and the connection goes on.
h.set_strict_mode(0)
try:
    h.pread(4096, 16 * M - 1024)
    raise AssertionError("read past the end succeeded")
except nbd.Error as e:
    assert e.errno == "EINVAL", e.errno
try:
    h.pwrite(b"x" * 4096, 16 * M - 1024)
    raise AssertionError("write past the end succeeded")
except nbd.Error as e:
    assert e.errno == "ENOSPC", e.errno
assert h.pread(4096, 4 * M) == data[:4096]
h.shutdown()
print("nbdsh: all commands ok")
"#;
    let uri_line = format!("uri = {:?}", peer.uri(""));
    let out = run("nbdsh", &["-c", &uri_line, "-c", script]);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("nbdsh: all commands ok"));
}

#[test]
fn fio_nbd_engine_verifies_crc32c() {
    if !require_peer("fio") {
        return;
    }
    let help = run("fio", &["--enghelp=nbd"]);
    if !help.status.success() || !String::from_utf8_lossy(&help.stdout).contains("uri") {
        assert!(!peers_required(), "fio has no nbd engine\n{}", describe_output(&help));
        eprintln!("skipping: fio has no nbd engine");
        return;
    }
    let dir = TempDir::new();
    let peer = serve(&dir, &["--memory", "32M"]);
    let uri_arg = format!("--uri={}", peer.uri(""));
    for rw in ["randwrite", "write"] {
        let out = run(
            "fio",
            &[
                "--name=verify",
                "--ioengine=nbd",
                &uri_arg,
                &format!("--rw={rw}"),
                "--bs=4k",
                "--size=16M",
                "--iodepth=16",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                // No verify state file in the working directory.
                "--verify_state_save=0",
                "--output-format=json",
            ],
        );
        assert!(out.status.success(), "{}", describe_output(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        // fio prints "fio: connected to NBD server" before the JSON.
        let json = parse_json(&stdout[stdout.find('{').expect("fio JSON output")..]);
        let job = &json["jobs"][0];
        assert_eq!(job["error"], 0, "{job:#}");
        assert_eq!(job["write"]["io_bytes"], 16 * MIB, "{job:#}");
        // The verify pass read every block back and checked its crc32c.
        assert_eq!(job["read"]["io_bytes"], 16 * MIB, "{job:#}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("verify"), "{}", describe_output(&out));
    }
}

// ---------------------------------------------------------------------------
// Read-only exports, file exports, socket activation
// ---------------------------------------------------------------------------

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    if !require_peers(&["nbdsh", "qemu-io"]) {
        return;
    }
    let dir = TempDir::new();
    let file = dir.join("ro.img");
    let content = random_bytes(4 * MIB as usize, 9);
    fs::write(&file, &content).unwrap();
    let peer = serve(&dir, &["-r", path_str(&file)]);
    let uri = peer.uri("");

    // libnbd with its client-side checks off sends the writes anyway: the
    // server answers EPERM to each (the spec's SHOULD for write, trim and
    // write zeroes on a read-only export), and reads still work.
    let script = r#"
h.set_strict_mode(0)
h.connect_uri(uri)
assert h.is_read_only()
for name, call in [("pwrite", lambda: h.pwrite(b"x" * 512, 0)),
                   ("pwrite fua", lambda: h.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_FUA)),
                   ("trim", lambda: h.trim(4096, 0)),
                   ("zero", lambda: h.zero(4096, 0)),
                   ("zero no-hole", lambda: h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE))]:
    try:
        call()
        raise AssertionError(name + " succeeded on a read-only export")
    except nbd.Error as e:
        assert e.errno == "EPERM", (name, e.errno, e.string)
print(h.pread(4, 0).hex())
"#;
    let uri_line = format!("uri = {uri:?}");
    let out = run("nbdsh", &["-c", &uri_line, "-c", script]);
    assert!(out.status.success(), "{}", describe_output(&out));
    let first: String = content[..4].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), first);

    // qemu-io will not even open it for writing, and with -r refuses writes.
    let out = run("qemu-io", &["-f", "raw", "-c", "write 0 4k", &uri]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Permission denied"), "{}", describe_output(&out));
    let out = run("qemu-io", &["-r", "-f", "raw", "-c", "write 0 4k", &uri]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("read-only"), "{}", describe_output(&out));
    let pattern = format!("read -P 0x{:02x} 0 1", content[0]);
    qemu_io(&uri, &["-r"], &[&pattern]);

    // Our own client refuses before the wire.
    let mut c = Client::connect(&uri).unwrap();
    assert!(c.is_read_only());
    assert!(matches!(
        c.write(&[0u8; 512], 0),
        Err(Error::Request(RequestError::ReadOnly(_)))
    ));
    c.disconnect().unwrap();
    assert_eq!(fs::read(&file).unwrap(), content, "the file is unchanged");
}

#[test]
fn file_export_map_agrees_with_qemu_img_map() {
    if !require_peers(&["nbdinfo", "qemu-img"]) {
        return;
    }
    let dir = TempDir::new();
    let file = dir.sparse_file("sparse.img", 16 * MIB);
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&file).unwrap();
        for (at, len) in [(MIB, MIB), (5 * MIB, 2 * MIB), (12 * MIB, MIB), (15 * MIB, MIB)] {
            f.write_all_at(&random_bytes(len as usize, at), at).unwrap();
        }
        f.sync_all().unwrap();
    }
    let local = qemu_img_map(path_str(&file));
    if local.len() == 1 {
        // A file system without SEEK_HOLE reports all data: nothing to learn.
        eprintln!("skipping: {} is not sparse here", file.display());
        return;
    }
    assert_eq!(
        local,
        [
            (0, MIB, true),
            (MIB, MIB, false),
            (2 * MIB, 3 * MIB, true),
            (5 * MIB, 2 * MIB, false),
            (7 * MIB, 5 * MIB, true),
            (12 * MIB, MIB, false),
            (13 * MIB, 2 * MIB, true),
            (15 * MIB, MIB, false),
        ]
    );
    let peer = serve(&dir, &["-r", path_str(&file)]);
    assert_eq!(
        nbdinfo_map(&peer.uri("")),
        local,
        "nbdinfo --map over NBD vs the local file"
    );
    // qemu-img over NBD sees the same (through our base:allocation).
    assert_eq!(
        qemu_img_map(&peer.uri("")),
        local,
        "qemu-img map over NBD vs the local file"
    );
}

#[test]
fn socket_activation_by_nbdinfo_and_nbdcopy() {
    if !require_peers(&["nbdinfo", "nbdcopy"]) {
        return;
    }
    let dir = TempDir::new();
    let serve_bin = our_bin("nbd-serve");

    // nbdinfo -- [ CMD ARGS ] runs the server with LISTEN_FDS.
    let info = parse_json(&run_ok(
        "nbdinfo",
        &[
            "--json",
            "--",
            "[",
            &serve_bin,
            "--memory",
            "16M",
            "-D",
            "activated",
            "]",
        ],
    ));
    let e = only_export(&info);
    assert_eq!(e["export-size"], 16 * MIB, "{info:#}");
    assert_eq!(e["description"], "activated");

    // nbdcopy into a file export served by a socket-activated nbd-serve...
    let data = random_bytes(3 * MIB as usize, 5);
    let src = dir.join("src.img");
    fs::write(&src, &data).unwrap();
    let dst = dir.sparse_file("dst.img", 3 * MIB);
    run_ok("nbdcopy", &["--", path_str(&src), "[", &serve_bin, path_str(&dst), "]"]);
    assert_eq!(fs::read(&dst).unwrap(), data, "nbdcopy wrote through nbd-serve");
    // ...and back out of one.
    let back = dir.join("back.img");
    run_ok(
        "nbdcopy",
        &["--", "[", &serve_bin, "-r", path_str(&dst), "]", path_str(&back)],
    );
    assert_eq!(fs::read(&back).unwrap(), data, "nbdcopy read through nbd-serve");
}

/// A file export on tmpfs finds the holes of a structured READ from the
/// bytes it reads (lseek over a fallocated tmpfs file costs in proportion
/// to the file): zero blocks come back as hole chunks, at offsets not
/// aligned to them too, fallocated but unwritten space reads as a hole,
/// and the data read back is exact, with DF as one data chunk.
#[test]
fn tmpfs_file_export_sends_zero_blocks_of_structured_reads_as_holes() {
    if !require_peer("nbdsh") {
        return;
    }
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("skipping: no /dev/shm");
        return;
    }
    let dir = TempDir::new();
    let file = shm.join(format!("nbd-tests-{}-holes.img", std::process::id()));
    struct Remove<'a>(&'a Path);
    impl Drop for Remove<'_> {
        fn drop(&mut self) {
            let _ = fs::remove_file(self.0);
        }
    }
    let _remove = Remove(&file);
    {
        use std::os::fd::AsRawFd;
        let f = fs::File::create(&file).expect("create image");
        // SAFETY: fallocate(2) on a file we own, integers only.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 4 << 20) };
        if r != 0 {
            f.set_len(4 << 20).expect("size image");
        }
    }
    let peer = serve(&dir, &[path_str(&file)]);
    let script = r#"
M = 1024 * 1024
h.connect_uri(uri)
assert h.get_structured_replies_negotiated()
data = bytes((i * 7 + 3) % 251 + 1 for i in range(M))
# From M: 1000 zero bytes, data, 8192 zero bytes written over data at
# M + 40960, data up to 2 M; the rest never written.
h.pwrite(data[:M], M)
h.pwrite(bytes(8192), M + 40960)
h.pwrite(bytes(1000), M)
expect = bytes(M) + bytes(1000) + data[1000:40960] + bytes(8192) + data[49152:]
def chunks(offset, length, flags):
    got = []
    def chunk(buf, off, status, err):
        got.append((off, len(buf), status))
        return 0
    buf = h.pread_structured(length, offset, chunk, flags)
    assert buf == expect[offset:offset + length], "pread_structured data"
    return sorted(got)
# Unwritten (fallocated) space: one hole.
assert chunks(0, M, 0) == [(0, M, nbd.READ_HOLE)], chunks(0, M, 0)
# A read starting off the 4 KiB grain: its first partial block is zero.
got = chunks(M - 100, 200 * 1024, 0)
assert got[0] == (M - 100, 100, nbd.READ_HOLE), got
assert got[1] == (M, 40960, nbd.READ_DATA), got
assert (M + 40960, 8192, nbd.READ_HOLE) in got, got
assert sum(n for _, n, _ in got) == 200 * 1024, got
assert chunks(M - 100, 200 * 1024, nbd.CMD_FLAG_DF) == [(M - 100, 200 * 1024, nbd.READ_DATA)]
h.shutdown()
print("nbdsh: holes ok")
"#;
    let uri_line = format!("uri = {:?}", peer.uri(""));
    let out = run("nbdsh", &["-c", &uri_line, "-c", script]);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("nbdsh: holes ok"));
}
