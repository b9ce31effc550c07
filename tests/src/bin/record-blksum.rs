//! `record-blksum BLKSUM`: prints the digest tables of
//! `tests/tests/blkhash.rs` (`EXPECTED`: `blksum OPTIONS < IMAGE`, exactly
//! the image's bytes; `EXPECTED_QEMU`: `blksum OPTIONS IMAGE`, which blksum
//! serves through qemu-nbd) as computed by the blksum at BLKSUM, for the
//! test's images and parameters. CI cannot build blksum, so the test checks
//! what this recorded.

use std::process::ExitCode;

use nbd_tests::blkhash_images::{IMAGES, PARAMS, make_image};
use nbd_tests::{TempDir, run_ok};

fn main() -> ExitCode {
    let Some(blksum) = std::env::args().nth(1) else {
        eprintln!("usage: record-blksum /path/to/blksum");
        return ExitCode::FAILURE;
    };
    let dir = TempDir::new();
    for (table, stdin) in [("EXPECTED", true), ("EXPECTED_QEMU", false)] {
        println!("const {table}: [[&str; 4]; 4] = [");
        for name in IMAGES {
            let img = make_image(&dir, name);
            let img = img.to_str().expect("UTF-8 path");
            println!("    // {name}");
            let mut row = Vec::new();
            for (_, opts) in PARAMS {
                let redirect = if stdin { "<" } else { "" };
                let cmd = format!("{blksum} {} {redirect} {img}", opts.join(" "));
                let out = run_ok("sh", &["-c", &cmd]);
                // blksum prints `DIGEST  NAME`.
                let digest = out.split_whitespace().next().unwrap_or_default();
                row.push(format!("\"{digest}\""));
            }
            println!("    [{}],", row.join(", "));
        }
        println!("];");
    }
    ExitCode::SUCCESS
}
