//! The images and `--blkhash` parameters of `tests/tests/blkhash.rs`,
//! shared with `record-blksum`, which records blksum's digests of them
//! (CI cannot build blksum).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::{TempDir, pattern};

/// The test images, by name (made in a directory by [`make_image`]). Sizes are not multiples of
/// the block sizes; `mixed` has a run of zeroes written as data,
/// `zero` is all zeroes written as data, `sparse` has holes (one at
/// the end, ending in a partial block) around three runs of data,
/// `empty` is empty.
pub const IMAGES: [&str; 4] = ["mixed", "zero", "sparse", "empty"];

/// Makes image `name` (one of [`IMAGES`]) in `dir` and returns its path.
pub fn make_image(dir: &TempDir, name: &str) -> PathBuf {
    let path = dir.join(format!("{name}.raw"));
    match name {
        "mixed" => {
            let mut data = pattern(3 * (1 << 20) + 12345, 1);
            data[512 << 10..(1 << 20) + 4096].fill(0);
            std::fs::write(&path, data).unwrap();
        }
        "zero" => std::fs::write(&path, vec![0u8; (1 << 20) + 1000]).unwrap(),
        "sparse" => {
            let path = dir.sparse_file("sparse.raw", 8 * (1 << 20) + 777);
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            f.write_all_at(&pattern(70000, 2), 100000).unwrap();
            f.write_all_at(&pattern(300000, 3), 4 * (1 << 20) + 1234).unwrap();
            f.write_all_at(&pattern(5000, 4), 8 * (1 << 20) - 5000).unwrap();
            return path;
        }
        "empty" => std::fs::write(&path, b"").unwrap(),
        other => panic!("no test image {other:?}"),
    }
    path
}

/// The `--blkhash` parameters checked, with blksum's options for them.
pub const PARAMS: [(&str, &[&str]); 4] = [
    ("", &[]),
    ("sha1/4k", &["--digest=sha1", "--block-size=4096"]),
    (
        "sha512/1M",
        &["--digest=sha512", "--block-size=1048576", "--read-size=1048576"],
    ),
    ("sha256/192k", &["--block-size=196608", "--read-size=786432"]),
];
