//! `nbd-info` at nbdinfo's habits, checked against nbdinfo on the same
//! exports: `--can`/`--is` exit codes, `--map --totals` (text and JSON),
//! servers run as `[ CMD ARGS ... ]` (qemu-nbd, nbdkit, nbd-serve), and
//! errors and usage errors that exit 1.

use std::process::Output;

use nbd_tests::*;

/// Runs nbd-info and nbdinfo with the same arguments.
fn both(args: &[&str]) -> (Output, Output) {
    (run(&our_bin("nbd-info"), args), run("nbdinfo", args))
}

/// A 4 MiB raw image with data at 1 MiB and 3 MiB, holes elsewhere.
fn image(dir: &TempDir) -> String {
    let path = dir.sparse_file("disk.raw", 4 << 20);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&pattern(65536, 1), 1 << 20).unwrap();
    f.write_all_at(&pattern(4096, 2), 3 << 20).unwrap();
    path.to_str().unwrap().to_string()
}

/// Every feature nbdinfo 1.14 knows, by the names its manual gives.
const FEATURES: &[(&str, &str)] = &[
    ("--can", "connect"),
    ("--can", "read"),
    ("--can", "write"),
    ("--can", "cache"),
    ("--can", "df"),
    ("--can", "fast-zero"),
    ("--can", "flush"),
    ("--can", "fua"),
    ("--can", "multi-conn"),
    ("--can", "structured-reply"),
    ("--can", "trim"),
    ("--can", "zero"),
    ("--is", "read-only"),
    ("--is", "rotational"),
    ("--is", "tls"),
];

#[test]
fn can_and_is_exit_codes_match_nbdinfo() {
    if !require_peers(&["nbdinfo", "nbdkit", "qemu-nbd"]) {
        return;
    }
    let dir = TempDir::new();
    let img = image(&dir);
    let serve = our_bin("nbd-serve");
    let exports: Vec<Vec<&str>> = vec![
        vec!["nbdkit", "memory", "1M"],
        vec!["nbdkit", "-r", "pattern", "1M"],
        vec!["nbdkit", "--filter=nozero", "memory", "1M", "zeromode=none"],
        vec!["qemu-nbd", "-f", "raw", &img],
        vec!["qemu-nbd", "-r", "-f", "raw", &img],
        vec![&serve, "--memory", "1M"],
        vec![&serve, "-r", &img],
    ];
    let mut seen = [0usize; 3];
    for export in &exports {
        for (flag, feature) in FEATURES {
            let mut args = vec![*flag, feature, "--", "["];
            args.extend_from_slice(export);
            args.push("]");
            let (mine, theirs) = both(&args);
            let code = theirs.status.code().unwrap();
            assert_eq!(
                mine.status.code(),
                Some(code),
                "{args:?}: nbdinfo says {code}\n{}",
                describe_output(&mine)
            );
            assert!(mine.stdout.is_empty(), "{args:?}: prints nothing");
            seen[code as usize] += 1;
        }
    }
    // Both answers occurred (1 would be an error).
    assert!(seen[0] > 0 && seen[2] > 0 && seen[1] == 0, "{seen:?}");
    // The last of several --can/--is counts, as in nbdinfo.
    let mut args = vec!["--can", "write", "--is", "read-only", "--", "["];
    args.extend_from_slice(&exports[0]);
    args.push("]");
    let (mine, theirs) = both(&args);
    assert_eq!(mine.status.code(), theirs.status.code());
    assert_eq!(mine.status.code(), Some(2));
}

#[test]
fn totals_and_captive_servers_match_nbdinfo() {
    if !require_peers(&["nbdinfo", "nbdkit", "qemu-nbd"]) {
        return;
    }
    let dir = TempDir::new();
    let img = image(&dir);
    let serve = our_bin("nbd-serve");
    let servers: Vec<Vec<&str>> = vec![
        vec!["qemu-nbd", "-r", "-f", "raw", &img],
        vec!["nbdkit", "-r", "file", &img],
        vec![&serve, "-r", &img],
    ];
    for server in &servers {
        for flags in [
            &["--size"][..],
            &["--map"],
            &["--map", "--totals"],
            &["--map", "--totals", "--json"],
            &["--map=base:allocation", "--json"],
        ] {
            let mut args = flags.to_vec();
            args.extend_from_slice(&["--", "["]);
            args.extend_from_slice(server);
            args.push("]");
            let (mine, theirs) = both(&args);
            assert!(
                theirs.status.success(),
                "nbdinfo {args:?}\n{}",
                describe_output(&theirs)
            );
            assert!(mine.status.success(), "nbd-info {args:?}\n{}", describe_output(&mine));
            if flags.contains(&"--json") {
                let a: serde_json::Value = serde_json::from_slice(&mine.stdout).unwrap();
                let b: serde_json::Value = serde_json::from_slice(&theirs.stdout).unwrap();
                assert_eq!(a, b, "{args:?}");
            } else {
                assert_eq!(
                    String::from_utf8_lossy(&mine.stdout),
                    String::from_utf8_lossy(&theirs.stdout),
                    "{args:?}"
                );
            }
        }
    }
    // The totals of a sparse file: data and holes, with percentages.
    let (mine, _) = both(&["--map", "--totals", "--", "[", "qemu-nbd", "-r", "-f", "raw", &img, "]"]);
    let text = String::from_utf8_lossy(&mine.stdout);
    assert!(
        text.contains("data") && text.contains("hole,zero") && text.contains('.'),
        "{text}"
    );
    // A plain URI to a running server gives the same totals.
    let kit = nbdkit(&dir, &["-r", "file", &img]);
    let (mine, theirs) = both(&["--map", "--totals", &kit.uri("")]);
    assert!(mine.status.success());
    assert_eq!(mine.stdout, theirs.stdout);
}

#[test]
fn errors_and_usage_errors_exit_1_as_nbdinfo() {
    if !require_peers(&["nbdinfo", "nbdkit"]) {
        return;
    }
    let dir = TempDir::new();
    let nowhere = format!("nbd+unix:///?socket={}", dir.join("none.sock").display());
    let kit = nbdkit(&dir, &["memory", "1M"]);
    let uri = kit.uri("");
    let cases: Vec<Vec<&str>> = vec![
        vec![],
        vec!["--no-such-flag", &uri],
        vec!["--can", "no-such-feature", &uri],
        vec!["--can", "flush"],
        vec!["--can", "flush", &nowhere],
        vec!["--is", "read-only", &nowhere],
        vec!["--totals", &uri],
        vec!["--size", "--map", &uri],
        vec!["--can", "flush", "--size", &uri],
        vec![&nowhere],
        vec!["--", "[", "nbdkit", "memory", "1M"],
        vec!["--size", "--", "[", "no-such-nbd-server-program", "]"],
        vec!["--size", "--", "[", "nbdkit", "no-such-plugin", "]"],
    ];
    for args in cases {
        let (mine, theirs) = both(&args);
        assert_eq!(theirs.status.code(), Some(1), "nbdinfo {args:?}");
        assert_eq!(
            mine.status.code(),
            Some(1),
            "nbd-info {args:?}\n{}",
            describe_output(&mine)
        );
        assert!(!mine.stderr.is_empty(), "{args:?}: no message");
    }
    // And a captive server that works, for contrast.
    let (mine, _) = both(&["--size", "--", "[", "nbdkit", "memory", "1M", "]"]);
    assert_eq!(String::from_utf8_lossy(&mine.stdout), "1048576\n");
}
