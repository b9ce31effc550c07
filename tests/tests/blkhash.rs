//! `nbd-copy --blkhash`: the checksum of blksum (nirs/blkhash) and of
//! nbdcopy 1.20's `--blkhash`, computed while copying, from files (holes
//! included) and from NBD sources (nbd-serve, qemu-nbd), checked against
//! digests recorded from blksum itself (CI cannot build blksum); and
//! `--blkhash=imageio`, oVirt imageio's checksum, checked against
//! imageio's own Python module (`ovirt-imageio`, installed by
//! `scripts/install-peers.sh`) run on the same images.

use std::path::Path;

use nbd_tests::blkhash_images::{IMAGES, PARAMS, make_image};
use nbd_tests::*;

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// blksum's digests of [`IMAGES`] × [`PARAMS`] read from stdin
/// (`blksum OPTIONS < IMAGE`: exactly the image's bytes), recorded from
/// blksum 0.11.0 (nirs/blkhash at 283a48f, `v0.10.1-32-g283a48f`, built
/// with meson without its tests: `meson setup build -Dblake3=disabled
/// -Dman=disabled && ninja -C build`) by `cargo run -p nbd-tests --bin
/// record-blksum -- /path/to/blksum`.
const EXPECTED: [[&str; 4]; 4] = [
    // mixed
    [
        "5f61821abd189c6f3380c135c89006e1c6ca7b15b101fb6d31650e1298657247",
        "d6b6b4ea6c5d8c662ccb6a3240b7f3ec41a333e7",
        "536ac02a817ef24574f773f5ad9952b71ba49105bc36db3e2d98540928957947e7b0a85013d987e4f60c40eeff741e6197f1d25d69d0618a3f7ac1a9874c4176",
        "7b3aafd976bdbae9b4603318534ab9b178beeb4126474217d7bac19779f58c8b",
    ],
    // zero
    [
        "7e129f08f492faecb24047c479c19bcc8b2abb98367c0a7d8637164a7e973c66",
        "6b154eb5591dcf7a4a761f0648e7d94aff47c00d",
        "c097bb0fcac26ed38502778044fcfa0d6785c9d8e098ad79f595a621d73d68f074c8efd2666477ed9d780b17cded79492c1335545e4719babf708c022aec5da5",
        "2615b02528e9d599e6a4bc54f4cddea99f06851b1c4a28e1978af5b2df89da14",
    ],
    // sparse
    [
        "76050d0d5f7e67166707857ed567472314c50e02f05ddd939fab7c8a7c50e47a",
        "172a9a8991d59b7e9a6a9df3c76783113a5cf277",
        "d1d7944ab7a39e48c8fea0d9400fc2ebe9b1de67411a226de7e222c8eea75d96c8364f4f4a2c954e1fc3feda58163962d84f1a5bfed725967892e1df5f08ed3c",
        "36468d077034ab23d2ee6fce327d77e8f2a4ce21af5e037dc2cc7b49db120fad",
    ],
    // empty
    [
        "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc",
        "05fe405753166f125559e7c9ac558654f107c7e9",
        "1b7409ccf0d5a34d3a77eaabfa9fe27427655be9297127ee9522aa1bf4046d4f945983678169cb1a7348edcac47ef0d9e2c924130e5bcc5f0d94937852c42f1b",
        "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc",
    ],
];

/// The same from `blksum OPTIONS IMAGE`: blksum serves a file with
/// qemu-nbd, whose raw driver rounds the size up to 512 bytes, so these
/// are the digests of the images padded with zeroes, as nbd-copy sees
/// them from qemu-nbd.
const EXPECTED_QEMU: [[&str; 4]; 4] = [
    // mixed
    [
        "2247a5d11bcee6d28b716a383d7fb28f4e491256e17d9ec98b738aa2013bdd1d",
        "3095eda587ab3b2f7a636a0e54552d3c8a7ba494",
        "783ce581f067749c8df355b8778bf710d036d2274be899bfe575cce946503fe300d31f92f38251f1bcb275f7d41cec9258ab66a755a534316c0acb33f17b63fa",
        "95b0c94ebe5bba935e41497e4518b73808f9c0e9b1b555e7094e6fe70bfac529",
    ],
    // zero
    [
        "087359549c822a9a04e987e0dfbce364e897db3b16283a3dc5ffdcb39db60af5",
        "8d3512209cc46e9daf84dd8e023bdf8bdea395e5",
        "6b578dcfe0101088bc94594353d07b8eaabc17fde889072d5808e2b0be25a7266ca86eea2de474293c8a84151940df917c8f557fd8daa0f63636144f1708ea9d",
        "b03dc7533b53181d2c5167caf31ab0410d189528245af428c63cc6311270d0ef",
    ],
    // sparse
    [
        "1d4610a326ad5b08c9953c9047bcd5d04cc8a6b084564469a0bef7b88aa6c561",
        "8e1c042574bbcdcb92a4393765ae46ed6bcb69e9",
        "d2fcc4885cae0061b7ace7507c4bccfdbc49cedfb273f8aab72e99748ce36ad47df5314a761ef93d7a8b173c34778f2846f3f4dce48797e922d32f8bc1923727",
        "0a1f9feefeb842748311528e52d4edf54a158da7410807f4c8b9fc0244222aee",
    ],
    // empty
    [
        "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc",
        "05fe405753166f125559e7c9ac558654f107c7e9",
        "1b7409ccf0d5a34d3a77eaabfa9fe27427655be9297127ee9522aa1bf4046d4f945983678169cb1a7348edcac47ef0d9e2c924130e5bcc5f0d94937852c42f1b",
        "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc",
    ],
];

fn blkhash_arg(param: &str) -> String {
    if param.is_empty() {
        "--blkhash".into()
    } else {
        format!("--blkhash={param}")
    }
}

/// Runs nbd-copy `args` and returns the digest it printed on stdout.
fn copy_digest(args: &[&str]) -> String {
    let out = run_ok(&our_bin("nbd-copy"), args);
    assert!(out.ends_with('\n') && out.lines().count() == 1, "{out:?}");
    out.trim_end().to_string()
}

#[test]
fn files_to_null_match_blksum() {
    let dir = TempDir::new();
    for (i, name) in IMAGES.iter().enumerate() {
        let img = make_image(&dir, name);
        for (j, (param, _)) in PARAMS.iter().enumerate() {
            let got = copy_digest(&[&blkhash_arg(param), s(&img), "null:"]);
            assert_eq!(got, EXPECTED[i][j], "{name} {param}");
            // Read whole, without the allocation map, in small requests.
            let got = copy_digest(&[
                &blkhash_arg(param),
                "--no-extents",
                "--request-size=12345",
                s(&img),
                "null:",
            ]);
            assert_eq!(got, EXPECTED[i][j], "{name} {param} --no-extents");
        }
    }
}

#[test]
fn blkhash_file_and_a_real_copy() {
    let dir = TempDir::new();
    for (i, name) in IMAGES.iter().enumerate() {
        let img = make_image(&dir, name);
        for (j, (param, _)) in PARAMS.iter().enumerate() {
            let sum = dir.join(format!("{name}-{j}.sum"));
            let dst = dir.join(format!("{name}-{j}.copy"));
            let file_arg = format!("--blkhash-file={}", s(&sum));
            let out = run_ok(
                &our_bin("nbd-copy"),
                &[&blkhash_arg(param), &file_arg, s(&img), s(&dst)],
            );
            assert_eq!(out, "", "nothing on stdout with --blkhash-file");
            assert_eq!(std::fs::read_to_string(&sum).unwrap(), format!("{}\n", EXPECTED[i][j]));
            assert!(
                std::fs::read(&dst).unwrap() == std::fs::read(&img).unwrap(),
                "{name} {param}: the copy differs"
            );
        }
    }
    // --blkhash-file alone is the default --blkhash.
    let img = make_image(&dir, "sparse");
    let sum = dir.join("default.sum");
    run_ok(
        &our_bin("nbd-copy"),
        &[&format!("--blkhash-file={}", s(&sum)), s(&img), "null:"],
    );
    assert_eq!(std::fs::read_to_string(&sum).unwrap(), format!("{}\n", EXPECTED[2][0]));
}

#[test]
fn nbd_sources_match_blksum() {
    if !require_peers(&["qemu-nbd"]) {
        return;
    }
    let dir = TempDir::new();
    for (i, name) in IMAGES.iter().enumerate() {
        let img = make_image(&dir, name);
        let ours = {
            let sock = dir.socket_path("serve");
            let full = ["--socket", s(&sock), "-r", s(&img)];
            Peer::start(&dir, &our_bin("nbd-serve"), &full, Endpoint::Unix(sock.clone()))
        };
        let qemu = qemu_nbd(&dir, &["-r", "-f", "raw", s(&img)]);
        for (j, (param, _)) in PARAMS.iter().enumerate() {
            for (who, uri, want) in [
                ("nbd-serve", ours.uri(""), EXPECTED[i][j]),
                ("qemu-nbd", qemu.uri(""), EXPECTED_QEMU[i][j]),
            ] {
                let got = copy_digest(&[&blkhash_arg(param), &uri, "null:"]);
                assert_eq!(got, want, "{name} {param} from {who}");
                let sum = dir.join("nbd.sum");
                let dst = dir.join("nbd.copy");
                let _ = std::fs::remove_file(&dst);
                run_ok(
                    &our_bin("nbd-copy"),
                    &[
                        &blkhash_arg(param),
                        &format!("--blkhash-file={}", s(&sum)),
                        "--connections=2",
                        "--request-size=64k",
                        &uri,
                        s(&dst),
                    ],
                );
                assert_eq!(std::fs::read_to_string(&sum).unwrap(), format!("{want}\n"));
                let (copy, orig) = (std::fs::read(&dst).unwrap(), std::fs::read(&img).unwrap());
                assert!(copy.starts_with(&orig) && copy[orig.len()..].iter().all(|&b| b == 0));
            }
        }
    }
}

/// The Python module of imageio's checksum.
const IMAGEIO_MODULE: &str = "ovirt_imageio._internal.blkhash";

/// `--blkhash=` values of imageio's checksum, with their block sizes: the
/// default (4 MiB: one partial block for most images) and smaller blocks,
/// so that full data, zero and hole blocks come before the partial one.
const IMAGEIO_PARAMS: [(&str, u64); 3] = [("imageio", 4 << 20), ("imageio/1M", 1 << 20), ("imageio/64k", 64 << 10)];

/// imageio's checksum of the file `path`, as its Python module computes
/// it (`blkhash.checksum`, which reads the file and detects zero blocks),
/// in the JSON form of imageio's checksum API (`json.dumps` of the dict
/// it returns).
fn imageio_checksum(path: &Path, block_size: u64) -> String {
    let script = "import json, sys\n\
                  from ovirt_imageio._internal import blkhash\n\
                  print(json.dumps(blkhash.checksum(sys.argv[1], block_size=int(sys.argv[2]))))";
    let out = run_ok("python3", &["-c", script, s(path), &block_size.to_string()]);
    assert!(out.ends_with('\n') && out.lines().count() == 1, "{out:?}");
    out.trim_end().to_string()
}

/// The hex digest in imageio's JSON.
fn json_hex(json: &str) -> &str {
    let (_, rest) = json
        .split_once("\"checksum\": \"")
        .unwrap_or_else(|| panic!("no checksum in {json}"));
    let hex = rest
        .strip_suffix("\"}")
        .unwrap_or_else(|| panic!("not imageio's JSON: {json}"));
    assert_eq!(hex.len(), 64, "{json}");
    hex
}

#[test]
fn imageio_files_match_ovirt_imageio() {
    if !require_python_module(IMAGEIO_MODULE) {
        return;
    }
    let dir = TempDir::new();
    for name in IMAGES {
        let img = make_image(&dir, name);
        for (param, block_size) in IMAGEIO_PARAMS {
            let want = imageio_checksum(&img, block_size);
            let arg = format!("--blkhash={param}");
            let got = copy_digest(&[&arg, s(&img), "null:"]);
            assert_eq!(got, json_hex(&want), "{name} {param}");
            let got = copy_digest(&[&arg, "--no-extents", "--request-size=12345", s(&img), "null:"]);
            assert_eq!(got, json_hex(&want), "{name} {param} --no-extents");
            let got = copy_digest(&[&arg, "--blkhash-json", s(&img), "null:"]);
            assert_eq!(got, want, "{name} {param} --blkhash-json");
            // A real copy, the JSON in a file.
            let sum = dir.join(format!("{name}-imageio.sum"));
            let dst = dir.join(format!("{name}-imageio.copy"));
            let _ = std::fs::remove_file(&dst);
            let out = run_ok(
                &our_bin("nbd-copy"),
                &[
                    &arg,
                    "--blkhash-json",
                    &format!("--blkhash-file={}", s(&sum)),
                    s(&img),
                    s(&dst),
                ],
            );
            assert_eq!(out, "", "nothing on stdout with --blkhash-file");
            assert_eq!(std::fs::read_to_string(&sum).unwrap(), format!("{want}\n"));
            assert!(
                std::fs::read(&dst).unwrap() == std::fs::read(&img).unwrap(),
                "{name} {param}: the copy differs"
            );
        }
        // --blkhash-json alone is imageio's checksum with its defaults.
        let got = copy_digest(&["--blkhash-json", s(&img), "null:"]);
        assert_eq!(got, imageio_checksum(&img, 4 << 20), "{name} --blkhash-json alone");
    }
}

#[test]
fn imageio_nbd_sources_match_ovirt_imageio() {
    // Both checked, so that each missing one is reported.
    let module = require_python_module(IMAGEIO_MODULE);
    if !require_peers(&["qemu-nbd"]) || !module {
        return;
    }
    let dir = TempDir::new();
    for name in IMAGES {
        let img = make_image(&dir, name);
        // qemu-nbd's raw driver rounds the size up to 512 bytes: what it
        // serves is the image padded with zeroes.
        let padded = dir.join(format!("{name}.padded"));
        std::fs::copy(&img, &padded).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&padded).unwrap();
        f.set_len(f.metadata().unwrap().len().div_ceil(512) * 512).unwrap();
        drop(f);
        let ours = {
            let sock = dir.socket_path("serve");
            let full = ["--socket", s(&sock), "-r", s(&img)];
            Peer::start(&dir, &our_bin("nbd-serve"), &full, Endpoint::Unix(sock.clone()))
        };
        let qemu = qemu_nbd(&dir, &["-r", "-f", "raw", s(&img)]);
        for (param, block_size) in IMAGEIO_PARAMS {
            let arg = format!("--blkhash={param}");
            for (who, uri, file) in [("nbd-serve", ours.uri(""), &img), ("qemu-nbd", qemu.uri(""), &padded)] {
                let want = imageio_checksum(file, block_size);
                let got = copy_digest(&[&arg, "--blkhash-json", &uri, "null:"]);
                assert_eq!(got, want, "{name} {param} from {who}");
                let sum = dir.join("imageio-nbd.sum");
                let dst = dir.join("imageio-nbd.copy");
                let _ = std::fs::remove_file(&dst);
                run_ok(
                    &our_bin("nbd-copy"),
                    &[
                        &arg,
                        &format!("--blkhash-file={}", s(&sum)),
                        "--connections=2",
                        "--request-size=64k",
                        &uri,
                        s(&dst),
                    ],
                );
                assert_eq!(
                    std::fs::read_to_string(&sum).unwrap(),
                    format!("{}\n", json_hex(&want)),
                    "{name} {param} from {who}, copied"
                );
                assert!(
                    std::fs::read(&dst).unwrap() == std::fs::read(file).unwrap(),
                    "{name} {param} from {who}: the copy differs"
                );
            }
        }
    }
}

#[test]
fn refusals() {
    let dir = TempDir::new();
    let img = make_image(&dir, "mixed");
    for (args, why) in [
        (vec!["--blkhash=md5", s(&img), "null:"], "unsupported digest"),
        (vec!["--blkhash=sha256/1000", s(&img), "null:"], "multiple of 512"),
        (vec!["--blkhash", s(&img), "-"], "--blkhash-file"),
        (vec!["--blkhash=imageio/100", s(&img), "null:"], "multiple of 512"),
        (
            vec!["--blkhash=sha256", "--blkhash-json", s(&img), "null:"],
            "needs --blkhash=imageio",
        ),
    ] {
        let out = run(&our_bin("nbd-copy"), &args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{args:?}: {err}");
    }
    let help = run_ok(&our_bin("nbd-copy"), &["--help"]);
    assert!(help.contains("--blkhash"), "{help}");
    assert!(help.contains("imageio") && help.contains("--blkhash-json"), "{help}");
}
