//! `nbd-copy` at nbdcopy's habits, each checked against libnbd's nbdcopy
//! doing the same: `-` as stdin and stdout, pipes and FIFOs both ways,
//! servers run as `[ CMD ARGS ... ]` (qemu-nbd, nbdkit, nbd-serve) on
//! either side, `--progress` and `--progress=FD`, `--allocated`,
//! `--no-extents`, `--queue-size`, `--synchronous`, and exit codes.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use nbd_tests::*;

/// Runs `script` with `sh -c`, its arguments as `$1`, `$2`, ...
fn sh(script: &str, args: &[&str]) -> Output {
    let mut full = vec!["-c", script, "sh"];
    full.extend_from_slice(args);
    run("sh", &full)
}

/// [`sh`] that must succeed.
fn sh_ok(script: &str, args: &[&str]) {
    let out = sh(script, args);
    assert!(
        out.status.success(),
        "`{script}` {args:?} failed\n{}",
        describe_output(&out)
    );
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A sparse source of 8 MiB and 4 bytes (not a whole number of requests):
/// data at 1 MiB and 5 MiB, and at the very end. Returns its path and
/// contents.
fn source(dir: &TempDir) -> (PathBuf, Vec<u8>) {
    let path = dir.join("src.img");
    let f = std::fs::File::create(&path).unwrap();
    let size = (8 << 20) + 4;
    f.set_len(size).unwrap();
    let mut image = vec![0u8; size as usize];
    for (i, at) in [1u64 << 20, 5 << 20].into_iter().enumerate() {
        let data = pattern(300_000, i as u64 + 7);
        f.write_all_at(&data, at).unwrap();
        image[at as usize..at as usize + data.len()].copy_from_slice(&data);
    }
    f.write_all_at(b"tail", size - 4).unwrap();
    image[size as usize - 4..].copy_from_slice(b"tail");
    (path, image)
}

/// What one tool produced in each stream case, by case name.
fn stream_cases(tool: &str, dir: &TempDir, src: &Path, tag: &str) -> HashMap<&'static str, Vec<u8>> {
    let kit = nbdkit(dir, &["memory", "16M"]);
    let uri = kit.uri("");
    let mut out = HashMap::new();
    let file = |name: &str| dir.join(format!("{tag}-{name}"));
    // A pipe into an export, then the export out through a pipe.
    sh_ok("cat \"$2\" | \"$1\" - \"$3\"", &[tool, p(src), &uri]);
    let f = file("nbd-to-pipe");
    sh_ok("\"$1\" \"$2\" - | cat > \"$3\"", &[tool, &uri, p(&f)]);
    out.insert("pipe to nbd to pipe", std::fs::read(&f).unwrap());
    // `nbdcopy URI - | gzip`.
    let f = file("gz");
    sh_ok("\"$1\" \"$2\" - | gzip -n > \"$3\"", &[tool, &uri, p(&f)]);
    out.insert("nbd to gzip", std::fs::read(&f).unwrap());
    // stdout redirected to a regular file.
    let f = file("stdout-file");
    sh_ok("\"$1\" \"$2\" - > \"$3\"", &[tool, p(src), p(&f)]);
    out.insert("file to stdout file", std::fs::read(&f).unwrap());
    // A pipe through to a pipe.
    let f = file("pipe-pipe");
    sh_ok("cat \"$2\" | \"$1\" - - | cat > \"$3\"", &[tool, p(src), p(&f)]);
    out.insert("pipe to pipe", std::fs::read(&f).unwrap());
    // FIFOs (named pipes) as the destination and as the source.
    let fifo = file("fifo");
    sh_ok("mkfifo \"$1\"", &[p(&fifo)]);
    let f = file("from-fifo");
    sh_ok(
        "cat \"$2\" > \"$3\" & \"$1\" \"$3\" - | cat > \"$4\"; wait",
        &[tool, p(src), p(&fifo), p(&f)],
    );
    out.insert("fifo source", std::fs::read(&f).unwrap());
    let f = file("to-fifo");
    sh_ok(
        "cat \"$3\" > \"$4\" & \"$1\" \"$2\" \"$3\"; wait",
        &[tool, p(src), p(&fifo), p(&f)],
    );
    out.insert("fifo destination", std::fs::read(&f).unwrap());
    out
}

#[test]
fn pipes_both_ways_match_nbdcopy_byte_for_byte() {
    if !require_peers(&["nbdcopy", "nbdkit", "gzip"]) {
        return;
    }
    let dir = TempDir::new();
    let ours = our_bin("nbd-copy");
    let (src, image) = source(&dir);
    let mut padded = image.clone();
    padded.resize(16 << 20, 0);
    let mine = stream_cases(&ours, &dir, &src, "ours");
    let theirs = stream_cases("nbdcopy", &dir, &src, "theirs");
    for (case, bytes) in &mine {
        assert!(
            bytes == &theirs[case],
            "{case}: nbd-copy's output differs from nbdcopy's"
        );
    }
    assert!(mine["pipe to nbd to pipe"] == padded, "the export's contents are wrong");
    for case in ["file to stdout file", "pipe to pipe", "fifo source", "fifo destination"] {
        assert!(mine[case] == image, "{case}: not the source");
    }
    // A pipe into a regular file: the file takes the stream's size, and
    // zeroes are holes (nbdcopy 1.14 cannot do this one: it truncates the
    // file to the unknown size -1).
    let out = dir.join("from-pipe.img");
    sh_ok("cat \"$2\" | \"$1\" - \"$3\"", &[&ours, p(&src), p(&out)]);
    assert!(std::fs::read(&out).unwrap() == image);
    let allocated = std::fs::metadata(&out).unwrap().blocks() * 512;
    assert!(allocated < 2 << 20, "{allocated} bytes allocated: not sparse");
    // A stream longer than the export is an error, not a silent cut.
    let small = nbdkit(&dir, &["memory", "4M"]);
    let out = sh("cat \"$2\" | \"$1\" - \"$3\"", &[&ours, p(&src), &small.uri("")]);
    assert_eq!(out.status.code(), Some(1), "{}", describe_output(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("smaller than the source"));
}

/// Starts `tool SRC -` with stdout on a pipe, reads a little, closes the
/// pipe; returns how the tool ended and what it said.
fn reader_goes_away(tool: &str, src: &str) -> (std::process::ExitStatus, String) {
    let mut child = command(tool)
        .args([src, "-"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = [0u8; 512];
    stdout.read_exact(&mut buf).unwrap();
    drop(stdout);
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (child.wait().unwrap(), err)
}

#[test]
fn a_reader_that_goes_away_ends_both_by_sigpipe() {
    if !require_peers(&["nbdcopy", "nbdkit"]) {
        return;
    }
    let dir = TempDir::new();
    let kit = nbdkit(&dir, &["pattern", "64M"]);
    let (theirs, _) = reader_goes_away("nbdcopy", &kit.uri(""));
    let (mine, err) = reader_goes_away(&our_bin("nbd-copy"), &kit.uri(""));
    assert_eq!(theirs.signal(), Some(libc::SIGPIPE), "nbdcopy: {theirs}");
    assert_eq!(mine.signal(), Some(libc::SIGPIPE), "nbd-copy: {mine}: {err}");
    assert_eq!(err, "", "no message for a closed pipe");
}

#[test]
fn captive_servers_on_either_side() {
    if !require_peers(&["nbdcopy", "nbdkit", "qemu-nbd", "qemu-img"]) {
        return;
    }
    let dir = TempDir::new();
    let ours = our_bin("nbd-copy");
    let serve = our_bin("nbd-serve");
    let (src, image) = source(&dir);
    // `cat disk | nbdcopy -- - [ qemu-nbd -f qcow2 output.qcow2 ]`, the
    // manual's example, into two images that must then be identical.
    let mut images = Vec::new();
    for tool in [ours.as_str(), "nbdcopy"] {
        let q = dir.join(format!("{}.qcow2", images.len()));
        run_ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&q), "9M"]);
        sh_ok(
            "cat \"$2\" | \"$1\" -- - [ qemu-nbd -f qcow2 \"$3\" ]",
            &[tool, p(&src), p(&q)],
        );
        images.push(q);
    }
    run_ok("qemu-img", &["compare", "-q", p(&images[0]), p(&images[1])]);
    // And out again through a pipe, with qemu-nbd, nbdkit and nbd-serve.
    let sources: Vec<Vec<&str>> = vec![
        vec!["qemu-nbd", "-r", "-f", "qcow2", p(&images[0])],
        vec!["nbdkit", "pattern", "3M"],
        vec![&serve, "-r", p(&src)],
    ];
    for cmd in &sources {
        let read = |tool: &str| {
            let mut args = vec!["--", "["];
            args.extend_from_slice(cmd);
            args.extend_from_slice(&["]", "-"]);
            let out = run(tool, &args);
            assert!(out.status.success(), "{tool} {args:?}\n{}", describe_output(&out));
            out.stdout
        };
        let mine = read(&ours);
        assert!(mine == read("nbdcopy"), "{cmd:?}: differs from nbdcopy's");
        if cmd[0] != "nbdkit" {
            let mut expect = image.clone();
            expect.resize(mine.len(), 0);
            assert!(mine == expect, "{cmd:?}: not the source");
        }
    }
    // Servers on both sides: nbd-serve to nbd-serve, nbdkit to qemu-nbd.
    let out = dir.join("both.img");
    std::fs::File::create(&out)
        .unwrap()
        .set_len(image.len() as u64)
        .unwrap();
    run_ok(
        &ours,
        &["--", "[", &serve, "-r", p(&src), "]", "[", &serve, p(&out), "]"],
    );
    assert!(std::fs::read(&out).unwrap() == image);
    let raw = dir.join("kit.raw");
    std::fs::File::create(&raw).unwrap().set_len(3 << 20).unwrap();
    run_ok(
        &ours,
        &[
            "--",
            "[",
            "nbdkit",
            "pattern",
            "3M",
            "]",
            "[",
            "qemu-nbd",
            "-f",
            "raw",
            p(&raw),
            "]",
        ],
    );
    let theirs = run("nbdcopy", &["--", "[", "nbdkit", "pattern", "3M", "]", "-"]);
    assert!(std::fs::read(&raw).unwrap() == theirs.stdout);
    // A server that fails to start: exit 1 for both, and ours says how
    // the server ended.
    let missing = p(&dir.join("missing.img")).to_string();
    let args = ["--", "[", "qemu-nbd", "-f", "raw", &missing, "]", "null:"];
    let mine = run(&ours, &args);
    let theirs = run("nbdcopy", &args);
    assert_eq!(mine.status.code(), Some(1));
    assert_eq!(theirs.status.code(), Some(1));
    let err = String::from_utf8_lossy(&mine.stderr);
    assert!(err.contains("nbd-copy: [ qemu-nbd -f raw "), "{err}");
}

/// Checks nbdcopy's machine-readable progress: `N/100` lines, N from 0 to
/// 100, never going back, 0 first and 100 last.
fn check_progress_lines(who: &str, text: &str) {
    let numbers: Vec<u32> = text
        .lines()
        .map(|l| {
            l.strip_suffix("/100")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{who}: bad progress line {l:?} in {text:?}"))
        })
        .collect();
    assert!(text.ends_with('\n'), "{who}: {text:?}");
    assert_eq!(numbers.first(), Some(&0), "{who}: {text:?}");
    assert_eq!(numbers.last(), Some(&100), "{who}: {text:?}");
    assert!(
        numbers.windows(2).all(|w| w[0] <= w[1] && w[1] <= 100),
        "{who}: {text:?}"
    );
}

#[test]
fn progress_on_any_stderr_and_on_a_descriptor() {
    if !require_peer("nbdcopy") {
        return;
    }
    let dir = TempDir::new();
    let ours = our_bin("nbd-copy");
    let (src, _) = source(&dir);
    for (tool, tag) in [(ours.as_str(), "ours"), ("nbdcopy", "theirs")] {
        for (script, case) in [
            ("\"$1\" --progress=3 \"$2\" null: 3> \"$3\"", "file"),
            ("cat \"$2\" | \"$1\" --progress=3 - null: 3> \"$3\"", "stream"),
        ] {
            let f = dir.join(format!("{tag}-{case}.progress"));
            sh_ok(script, &[tool, p(&src), p(&f)]);
            check_progress_lines(&format!("{tag} {case}"), &std::fs::read_to_string(&f).unwrap());
        }
    }
    // The bar goes to stderr even when it is a file, and ends at 100%.
    let out = run(&ours, &["--progress", p(&src), "null:"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("100% [****************************************]\n"),
        "{err:?}"
    );
    assert!(err.contains("  0% ["), "{err:?}");
    // -p too; a descriptor that is not open is an error, before copying.
    assert!(run(&ours, &["-p", p(&src), "null:"]).status.success());
    let out = run(&ours, &["--progress=9", p(&src), "null:"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--progress=9"));
}

/// The largest number of requests one connection of nbdkit's log filter
/// had in flight at once, and the number of connections that read.
fn in_flight(log: &str) -> (usize, usize) {
    let mut open: HashMap<String, usize> = HashMap::new();
    let mut most = 0;
    for line in log.lines() {
        let Some(conn) = line.split_whitespace().find(|w| w.starts_with("connection=")) else {
            continue;
        };
        // Only reads count: the previous run's connections may still log
        // their disconnection after it ended.
        if line.contains(" Read id=") && line.ends_with("...") {
            let count = open.entry(conn.to_string()).or_default();
            *count += 1;
            most = most.max(*count);
        } else if line.contains(" ...Read id=")
            && let Some(count) = open.get_mut(conn)
        {
            *count = count.saturating_sub(1);
        }
    }
    (most, open.len())
}

#[test]
fn allocated_no_extents_queue_size_synchronous() {
    if !require_peers(&["nbdcopy", "nbdkit"]) {
        return;
    }
    let dir = TempDir::new();
    let ours = our_bin("nbd-copy");
    let (src, image) = source(&dir);
    // A source whose map lies: it calls its first MiB a hole. With its
    // map, both tools copy zeroes there; with --no-extents, the data.
    let list = dir.join("extents");
    std::fs::write(&list, "0 1048576 hole,zero\n1048576 1048576\n").unwrap();
    let lying = format!("extentlist={}", p(&list));
    let read = |tool: &str, flags: &[&str]| {
        let mut args = flags.to_vec();
        args.extend_from_slice(&[
            "--",
            "[",
            "nbdkit",
            "--filter=extentlist",
            "pattern",
            "2M",
            &lying,
            "]",
            "-",
        ]);
        let out = run(tool, &args);
        assert!(out.status.success(), "{tool} {args:?}\n{}", describe_output(&out));
        out.stdout
    };
    let pattern_out = run("nbdcopy", &["--", "[", "nbdkit", "pattern", "2M", "]", "-"]).stdout;
    let with_map = read(&ours, &[]);
    assert!(with_map == read("nbdcopy", &[]), "with the map: differs from nbdcopy");
    assert!(with_map[..1 << 20].iter().all(|&b| b == 0) && with_map[1 << 20..] == pattern_out[1 << 20..]);
    let without = read(&ours, &["--no-extents"]);
    assert!(
        without == read("nbdcopy", &["--no-extents"]),
        "--no-extents differs from nbdcopy"
    );
    assert!(without == pattern_out, "--no-extents did not read everything");

    // --allocated: a fully allocated file with the same contents as
    // nbdcopy's; without it, a sparse one.
    let full = dir.join("allocated.img");
    run_ok(&ours, &["--allocated", p(&src), p(&full)]);
    let theirs = dir.join("allocated-theirs.img");
    run_ok("nbdcopy", &["--allocated", p(&src), p(&theirs)]);
    assert!(std::fs::read(&full).unwrap() == std::fs::read(&theirs).unwrap());
    assert!(std::fs::read(&full).unwrap() == image);
    let blocks = std::fs::metadata(&full).unwrap().blocks() * 512;
    assert!(blocks >= image.len() as u64 / 4096 * 4096, "{blocks}: not allocated");
    let sparse = dir.join("sparse.img");
    run_ok(&ours, &[p(&src), p(&sparse)]);
    assert!(std::fs::metadata(&sparse).unwrap().blocks() * 512 < 2 << 20);
    // Over NBD, --allocated zeroes without trimming (NBD_CMD_FLAG_NO_HOLE),
    // as nbdcopy does; without it, zeroes may be holes.
    let zeroes = |tool: &str, flags: &[&str]| {
        let log = dir.join(format!("zero-{}.log", flags.len()));
        let _ = std::fs::remove_file(&log);
        let logfile = format!("logfile={}", p(&log));
        let mut args = flags.to_vec();
        args.extend_from_slice(&[
            "--",
            p(&src),
            "[",
            "nbdkit",
            "--filter=log",
            "memory",
            "9M",
            &logfile,
            "]",
        ]);
        run_ok(tool, &args);
        let text = std::fs::read_to_string(&log).unwrap();
        let trims: Vec<bool> = text
            .lines()
            .filter(|l| l.contains(" Zero id="))
            .map(|l| l.contains(" trim=1 "))
            .collect();
        assert!(!trims.is_empty(), "{tool} {flags:?}: no zero requests\n{text}");
        trims
    };
    for tool in [ours.as_str(), "nbdcopy"] {
        assert!(zeroes(tool, &["--allocated"]).iter().all(|t| !t), "{tool}");
        assert!(zeroes(tool, &[]).iter().all(|t| *t), "{tool}");
    }

    // --synchronous: one connection, one request at a time, even to a
    // server that allows multi-conn; --queue-size: at most that many
    // bytes in flight per connection.
    let log = dir.join("reads.log");
    // (The delay makes requests that are sent together overlap in the
    // log, so that the counts mean something.)
    let kit = nbdkit(
        &dir,
        &[
            "--filter=log",
            "--filter=delay",
            "pattern",
            "16M",
            "rdelay=20ms",
            &format!("logfile={}", p(&log)),
        ],
    );
    let uri = kit.uri("");
    let count = |flags: &[&str]| {
        let before = std::fs::read_to_string(&log).unwrap_or_default().len();
        let mut args = flags.to_vec();
        args.extend_from_slice(&[&uri, "null:"]);
        run_ok(&ours, &args);
        in_flight(&std::fs::read_to_string(&log).unwrap()[before..])
    };
    let (most, connections) = count(&["-C", "4"]);
    assert!(most > 1 && connections == 4, "{most} in flight on {connections}");
    assert_eq!(count(&["--synchronous"]), (1, 1));
    let (most, _) = count(&["-R", "3"]);
    assert!(most <= 3, "{most} in flight with -R 3");
    let (most, connections) = count(&["-C", "1", "--request-size=256K", "--queue-size=512K"]);
    assert!(most <= 2 && connections == 1, "{most} in flight on {connections}");
    let (most, connections) = count(&["-C", "4", "--request-size=64K", "--queue-size=128K"]);
    assert!(most <= 2 && connections == 4, "{most} in flight on {connections}");
}

#[test]
fn exit_codes_match_nbdcopy() {
    if !require_peers(&["nbdcopy", "nbdkit"]) {
        return;
    }
    let dir = TempDir::new();
    let ours = our_bin("nbd-copy");
    let (src, _) = source(&dir);
    let ro = nbdkit(&dir, &["-r", "memory", "16M"]);
    let small = nbdkit(&dir, &["memory", "1M"]);
    let nowhere = format!("nbd+unix:///?socket={}", p(&dir.join("none.sock")));
    let src = p(&src).to_string();
    let (ro, small) = (ro.uri(""), small.uri(""));
    let absent = p(&dir.join("absent.img")).to_string();
    let cases: Vec<(Vec<&str>, i32)> = vec![
        (vec!["--help"], 0),
        (vec!["--version"], 0),
        (vec![&src, "null:"], 0),
        (vec![], 1),
        (vec![&src], 1),
        (vec![&src, "null:", "extra"], 1),
        (vec!["--no-such-flag", &src, "null:"], 1),
        (vec!["-C", "0", &src, "null:"], 1),
        (vec!["--", "[", "nbdkit", "memory", "1M", "null:"], 1),
        (vec![&absent, "null:"], 1),
        (vec![&nowhere, "null:"], 1),
        (vec![&src, &ro], 1),
        (vec![&src, &small], 1),
    ];
    for (args, code) in cases {
        let mine = run(&ours, &args);
        let theirs = run("nbdcopy", &args);
        assert_eq!(theirs.status.code(), Some(code), "nbdcopy {args:?}");
        assert_eq!(
            mine.status.code(),
            Some(code),
            "nbd-copy {args:?}\n{}",
            describe_output(&mine)
        );
        if code == 1 {
            assert!(!mine.stderr.is_empty(), "{args:?}: no message");
        }
    }
}
