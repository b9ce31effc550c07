#![no_main]

//! The qcow2 persistent-bitmap parser of nbd-storage on arbitrary image
//! files: parsing, loading every bitmap and reading its status must never
//! panic or allocate more than the input justifies, and what it reports
//! must be consistent.

use libfuzzer_sys::fuzz_target;
use nbd_storage::image::bitmap::Qcow2Bitmaps;

fuzz_target!(|data: &[u8]| {
    let Ok(parsed) = Qcow2Bitmaps::parse(data) else {
        return;
    };
    for info in &parsed.bitmaps {
        let Ok(bitmap) = parsed.load(data, info) else {
            continue;
        };
        if parsed.disk_size == 0 {
            continue;
        }
        // At most 64 MiB of the disk, so one input stays fast.
        let length = parsed.disk_size.min(64 << 20);
        let mut runs = Vec::new();
        if bitmap.status(data, 0, length, 1000, &mut runs).is_ok() {
            assert!(!runs.is_empty() && runs.len() <= 1000);
            let total: u64 = runs.iter().map(|r| r.0).sum();
            assert!(total <= length);
            assert!(runs.iter().all(|r| r.0 > 0));
            assert!(runs.windows(2).all(|w| w[0].1 != w[1].1));
        }
    }
});
