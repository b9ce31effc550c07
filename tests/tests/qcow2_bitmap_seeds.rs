//! Replays the qcow2_bitmaps fuzz seeds (real images made by qemu-img,
//! with and without persistent bitmaps) through the bitmap parser: each
//! parses, and every bitmap in them loads and answers status.

use nbd_storage::image::bitmap::Qcow2Bitmaps;

#[test]
fn seeds_parse_and_load() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/qcow2_bitmaps");
    let mut with_bitmaps = 0;
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        seen += 1;
        let parsed = Qcow2Bitmaps::parse(&data[..]).unwrap();
        for info in &parsed.bitmaps {
            with_bitmaps += 1;
            let bitmap = parsed.load(&data[..], info).unwrap();
            let mut runs = Vec::new();
            bitmap
                .status(&data[..], 0, parsed.disk_size, 10_000, &mut runs)
                .unwrap();
            assert_eq!(runs.iter().map(|r| r.0).sum::<u64>(), parsed.disk_size);
            assert!(
                runs.iter().any(|r| r.1) || info.name == "x",
                "{}: nothing dirty",
                info.name
            );
        }
    }
    assert!(seen >= 4 && with_bitmaps >= 4, "{seen} seeds, {with_bitmaps} bitmaps");
}
