//! `nbd-info` against `nbdinfo` on the same exports: the same keys and
//! values, and clear errors.

use nbd_tests::*;
use serde_json::Value;

/// The keys the two tools must agree on (nbdinfo's "content" comes from
/// running file(1) on the first sector and is not compared).
fn compare(ours: &Value, theirs: &Value) {
    for k in ["protocol", "TLS", "structured"] {
        assert_eq!(
            ours[k], theirs[k],
            "top-level key {k}\nours: {ours:#}\ntheirs: {theirs:#}"
        );
    }
    let (oe, te) = (
        ours["exports"].as_array().unwrap(),
        theirs["exports"].as_array().unwrap(),
    );
    assert_eq!(oe.len(), te.len(), "number of exports");
    for (o, t) in oe.iter().zip(te) {
        let t = t.as_object().unwrap();
        for (k, v) in t {
            if k == "content" {
                continue;
            }
            assert_eq!(&o[k.as_str()], v, "export key {k}\nours: {o:#}\ntheirs: {t:#?}");
        }
        // And nothing nbdinfo left out that we added under its names.
        for k in ["description", "contexts", "block_size_minimum"] {
            assert_eq!(o.get(k).is_some(), t.contains_key(k), "presence of {k}");
        }
    }
}

fn both(args: &[&str], uri: &str) -> (Value, Value) {
    let mut a: Vec<&str> = args.to_vec();
    a.push(uri);
    let ours = run_ok(&our_bin("nbd-info"), &a);
    let theirs = run_ok("nbdinfo", &a);
    (
        serde_json::from_str(&ours).unwrap_or_else(|e| panic!("our JSON does not parse: {e}\n{ours}")),
        serde_json::from_str(&theirs).unwrap(),
    )
}

#[test]
fn json_matches_nbdinfo_on_nbdkit_exports() {
    if !require_peer("nbdkit") || !require_peer("nbdinfo") {
        return;
    }
    let dir = TempDir::new();
    let cases: Vec<Vec<&str>> = vec![
        vec!["memory", "1M"],
        vec!["-r", "--no-sr", "memory", "1000"],
        vec!["--oldstyle", "memory", "3G"],
        vec![
            "--filter=blocksize-policy",
            "memory",
            "8M",
            "blocksize-minimum=512",
            "blocksize-preferred=4096",
            "blocksize-maximum=65536",
        ],
        vec![
            "--filter=exportname",
            "memory",
            "2M",
            "exportdesc=fixed:described export",
        ],
    ];
    for (i, args) in cases.iter().enumerate() {
        let sub = TempDir::new();
        let peer = nbdkit(&sub, args);
        let (o, t) = both(&["--json"], &peer.uri(""));
        compare(&o, &t);
        let _ = i;
    }
    drop(dir);
}

#[test]
fn list_json_matches_nbdinfo() {
    if !require_peer("nbdkit") || !require_peer("nbdinfo") {
        return;
    }
    let dir = TempDir::new();
    let peer = nbdkit(
        &dir,
        &[
            "--filter=exportname",
            "memory",
            "2M",
            "exportname=one",
            "exportname=two",
            "exportname-list=explicit",
            "exportdesc=fixed:memory",
        ],
    );
    let (o, t) = both(&["--json", "--list"], &peer.uri(""));
    compare(&o, &t);
    let names: Vec<&str> = o["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["one", "two"]);
}

#[test]
fn json_and_map_match_nbdinfo_on_qemu_nbd() {
    if !require_peer("qemu-nbd") || !require_peer("nbdinfo") || !require_peer("qemu-io") {
        return;
    }
    let dir = TempDir::new();
    let img = dir.join("d.raw");
    run_ok("qemu-img", &["create", "-f", "raw", img.to_str().unwrap(), "16M"]);
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 1 1M 64k",
            "-c",
            "write -P 2 5M 1M",
            img.to_str().unwrap(),
        ],
    );
    let peer = qemu_nbd(&dir, &["-f", "raw", "-x", "d", img.to_str().unwrap()]);
    let (o, t) = both(&["--json"], &peer.uri("d"));
    compare(&o, &t);
    assert_eq!(o["extended"], Value::Bool(true));
    // --map --json: identical.
    let (o, t) = both(&["--map", "--json"], &peer.uri("d"));
    assert_eq!(o, t);
    let extents = o.as_array().unwrap();
    assert!(extents.iter().any(|e| e["description"] == "data"));
    assert!(extents.iter().any(|e| e["description"] == "hole,zero"));
    // Human --map: identical text.
    let ours = run_ok(&our_bin("nbd-info"), &["--map", &peer.uri("d")]);
    let theirs = run_ok("nbdinfo", &["--map", &peer.uri("d")]);
    assert_eq!(ours, theirs);
    // --size.
    let ours = run_ok(&our_bin("nbd-info"), &["--size", &peer.uri("d")]);
    assert_eq!(ours.trim(), (16u64 << 20).to_string());
}

#[test]
fn clear_errors() {
    let bin = our_bin("nbd-info");
    let dir = TempDir::new();
    let missing = format!("nbd+unix:///?socket={}", dir.join("nothing.sock").display());
    for uri in [missing.as_str(), "nbd://[::1", "http://example.com/", "nbd+unix:///x"] {
        let out = run(&bin, &[uri]);
        assert!(!out.status.success(), "{uri} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "one line on stderr for {uri}: {err}");
        assert!(err.starts_with("nbd-info: "), "{err}");
    }
    if require_peer("nbdkit") {
        let peer = nbdkit(
            &dir,
            &[
                "--filter=exportname",
                "memory",
                "1M",
                "exportname=a",
                "exportname-strict=true",
            ],
        );
        let out = run(&bin, &[&peer.uri("nope")]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("NBD_REP_ERR_UNKNOWN"), "{err}");
    }
}
