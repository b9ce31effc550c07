//! The blkhash construction (Nir Soffer's block-based hash, as `blksum`
//! and nbdcopy's `--blkhash` compute it), for `nbd-copy --blkhash`.
//!
//! The image is cut into blocks of [`BlkhashSpec::block_size`] bytes (the
//! last one may be shorter). Each block is hashed with the digest
//! (`D(block)`); the digest of the image is
//!
//! ```text
//! D( D(block 0) || D(block 1) || ... || D(block n-1) || le64(image size) )
//! ```
//!
//! A full block of zeroes hashes to `D(zero block)`, computed once, so
//! holes and zero extents are hashed without being read, and data blocks
//! that read as zeroes need no digest work. An empty image is
//! `D(le64(0))`. The defaults are blkhash's: sha256, 64 KiB blocks.
//!
//! oVirt imageio's checksum (its `/images/TICKET/checksum` API and its
//! client's `checksum()`), asked for as `--blkhash=imageio`, is the same
//! walk with another digest and no size at the end
//! ([`Variant::Imageio`]): blake2b with a 32-byte digest, 4 MiB blocks,
//!
//! ```text
//! D( D(block 0) || D(block 1) || ... || D(block n-1) )
//! ```
//!
//! the last block hashed as the shorter block it is (zeroes or not), and
//! an empty image `D()`, the digest of nothing. Its JSON form is
//! [`BlkhashSpec::imageio_json`].
//!
//! [`Blkhash`] hashes an image given in order; [`Combiner`] takes block
//! hashes computed in parallel, in any order, and combines them in
//! order, holding at most [`Combiner::PENDING_LIMIT`] runs that arrived
//! ahead of their turn.

use std::collections::BTreeMap;
use std::sync::Mutex;

use sha2::digest::DynDigest;

/// A digest algorithm `--blkhash` supports (OpenSSL's names, as blksum
/// and nbdcopy take them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// `sha1`
    Sha1,
    /// `sha224`
    Sha224,
    /// `sha256` (the default)
    Sha256,
    /// `sha384`
    Sha384,
    /// `sha512`
    Sha512,
    /// `sha512-224`
    Sha512_224,
    /// `sha512-256`
    Sha512_256,
    /// blake2b with a 32-byte digest (`hashlib.blake2b(digest_size=32)`),
    /// imageio's digest; only with [`Variant::Imageio`], so not in
    /// [`Algorithm::ALL`] (blksum has no such digest).
    Blake2b256,
}

impl Algorithm {
    /// Every digest `--blkhash=DIGEST` names (blksum's; imageio's
    /// [`Algorithm::Blake2b256`] comes with `--blkhash=imageio` alone).
    pub const ALL: [Algorithm; 7] = [
        Algorithm::Sha1,
        Algorithm::Sha224,
        Algorithm::Sha256,
        Algorithm::Sha384,
        Algorithm::Sha512,
        Algorithm::Sha512_224,
        Algorithm::Sha512_256,
    ];

    /// The OpenSSL name (imageio's, `blake2b`, for
    /// [`Algorithm::Blake2b256`]).
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha1 => "sha1",
            Algorithm::Sha224 => "sha224",
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha384 => "sha384",
            Algorithm::Sha512 => "sha512",
            Algorithm::Sha512_224 => "sha512-224",
            Algorithm::Sha512_256 => "sha512-256",
            Algorithm::Blake2b256 => "blake2b",
        }
    }

    /// The algorithm of an OpenSSL name (any case).
    pub fn from_name(name: &str) -> Option<Algorithm> {
        let n = name.to_ascii_lowercase();
        Algorithm::ALL.into_iter().find(|a| a.name() == n)
    }

    fn hasher(self) -> Box<dyn DynDigest + Send> {
        match self {
            Algorithm::Sha1 => Box::new(sha1::Sha1::default()),
            Algorithm::Sha224 => Box::new(sha2::Sha224::default()),
            Algorithm::Sha256 => Box::new(sha2::Sha256::default()),
            Algorithm::Sha384 => Box::new(sha2::Sha384::default()),
            Algorithm::Sha512 => Box::new(sha2::Sha512::default()),
            Algorithm::Sha512_224 => Box::new(sha2::Sha512_224::default()),
            Algorithm::Sha512_256 => Box::new(sha2::Sha512_256::default()),
            Algorithm::Blake2b256 => Box::new(blake2::Blake2b::<blake2::digest::consts::U32>::default()),
        }
    }

    /// `D(data)`.
    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        let mut h = self.hasher();
        h.update(data);
        h.finalize().into_vec()
    }
}

/// How the block digests are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Variant {
    /// blkhash's (blksum, nbdcopy): the image size (`le64`) is hashed
    /// after the block digests.
    #[default]
    Blksum,
    /// oVirt imageio's checksum: the block digests alone.
    Imageio,
}

impl Variant {
    /// Whether `le64(image size)` ends the outer digest's input.
    fn hashes_size(self) -> bool {
        self == Variant::Blksum
    }
}

/// What `--blkhash[=DIGEST[/BLOCKSIZE]]` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkhashSpec {
    /// The digest.
    pub algorithm: Algorithm,
    /// Bytes per block.
    pub block_size: u64,
    /// How the block digests are combined.
    pub variant: Variant,
}

impl Default for BlkhashSpec {
    fn default() -> Self {
        BlkhashSpec {
            algorithm: Algorithm::Sha256,
            block_size: 64 << 10,
            variant: Variant::Blksum,
        }
    }
}

/// The name `--blkhash` takes for imageio's checksum.
pub const IMAGEIO: &str = "imageio";

/// imageio's checksum with its defaults: blake2b (32 bytes), 4 MiB
/// blocks.
pub const IMAGEIO_SPEC: BlkhashSpec = BlkhashSpec {
    algorithm: Algorithm::Blake2b256,
    block_size: 4 << 20,
    variant: Variant::Imageio,
};

/// The smallest and the largest block size accepted.
pub const BLOCK_SIZE_RANGE: (u64, u64) = (512, 32 << 20);

impl BlkhashSpec {
    /// Parses `DIGEST`, `DIGEST/BLOCKSIZE` or the empty string (the
    /// defaults); BLOCKSIZE takes K and M suffixes (`sha256/64k`) and
    /// must be a multiple of 512 from 512 bytes to 32 MiB. DIGEST
    /// `imageio` (any case) is imageio's checksum ([`IMAGEIO_SPEC`]),
    /// whose block size may be changed the same way (`imageio/1M`).
    pub fn parse(s: &str) -> Result<BlkhashSpec, String> {
        let mut spec = BlkhashSpec::default();
        let (name, size) = match s.split_once('/') {
            Some((n, b)) => (n, Some(b)),
            None => (s, None),
        };
        if name.eq_ignore_ascii_case(IMAGEIO) {
            spec = IMAGEIO_SPEC;
        } else if !name.is_empty() {
            spec.algorithm = Algorithm::from_name(name).ok_or_else(|| {
                let names: Vec<&str> = Algorithm::ALL.iter().map(|a| a.name()).collect();
                format!(
                    "--blkhash: unsupported digest {name:?} (supported: {}; or {IMAGEIO} for \
                     oVirt imageio's checksum)",
                    names.join(", ")
                )
            })?;
        }
        if let Some(b) = size {
            let v = crate::parse_size(b).map_err(|e| format!("--blkhash: block size: {e}"))?;
            let (lo, hi) = BLOCK_SIZE_RANGE;
            if v < lo || v > hi || v % 512 != 0 {
                return Err(format!(
                    "--blkhash: block size {b:?} must be a multiple of 512 between 512 and 32M"
                ));
            }
            spec.block_size = v;
        }
        Ok(spec)
    }

    /// The hashes of the blocks of `data`, which starts on a block
    /// boundary, concatenated; a full block of zeroes takes `zero_md`
    /// without being hashed.
    pub fn block_hashes(&self, data: &[u8], zero_md: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len().div_ceil(self.block_size as usize) * zero_md.len());
        for block in data.chunks(self.block_size as usize) {
            if block.len() as u64 == self.block_size && is_zero(block) {
                out.extend_from_slice(zero_md);
            } else {
                out.extend_from_slice(&self.algorithm.digest(block));
            }
        }
        out
    }

    /// `D(zero block)`.
    pub fn zero_md(&self) -> Vec<u8> {
        self.algorithm.digest(&vec![0u8; self.block_size as usize])
    }

    /// The digest `md` in the JSON form of imageio's checksum API,
    /// `{"algorithm": "blake2b", "block_size": 4194304, "checksum": "HEX"}`
    /// (Python's `json.dumps` spacing); an error for a blksum digest,
    /// which imageio does not compute.
    pub fn imageio_json(&self, md: &[u8]) -> Result<String, String> {
        if self.variant != Variant::Imageio {
            return Err(format!(
                "the JSON form is imageio's checksum's: it needs --blkhash={IMAGEIO}, not {}",
                self.algorithm.name()
            ));
        }
        Ok(format!(
            "{{\"algorithm\": \"{}\", \"block_size\": {}, \"checksum\": \"{}\"}}",
            self.algorithm.name(),
            self.block_size,
            hex(md)
        ))
    }
}

fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(4096).all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

/// Lowercase hex, as blksum and nbdcopy print a digest.
pub fn hex(md: &[u8]) -> String {
    md.iter().map(|b| format!("{b:02x}")).collect()
}

/// The blkhash of an image given in order (data and zeroes, any sizes).
pub struct Blkhash {
    spec: BlkhashSpec,
    zero_md: Vec<u8>,
    outer: Box<dyn DynDigest + Send>,
    /// A partial block: its bytes.
    pending: Vec<u8>,
    length: u64,
}

impl Blkhash {
    /// A hash of nothing yet.
    pub fn new(spec: BlkhashSpec) -> Blkhash {
        Blkhash {
            spec,
            zero_md: spec.zero_md(),
            outer: spec.algorithm.hasher(),
            pending: Vec::new(),
            length: 0,
        }
    }

    fn take_block(&mut self, block: &[u8]) {
        if block.len() as u64 == self.spec.block_size && is_zero(block) {
            self.outer.update(&self.zero_md);
        } else {
            let md = self.spec.algorithm.digest(block);
            self.outer.update(&md);
        }
    }

    /// Adds data.
    pub fn update(&mut self, mut data: &[u8]) {
        let bs = self.spec.block_size as usize;
        self.length += data.len() as u64;
        if !self.pending.is_empty() {
            let n = data.len().min(bs - self.pending.len());
            self.pending.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.pending.len() < bs {
                return;
            }
            let block = std::mem::take(&mut self.pending);
            self.take_block(&block);
        }
        let full = data.len() / bs * bs;
        for block in data[..full].chunks(bs) {
            self.take_block(block);
        }
        self.pending.extend_from_slice(&data[full..]);
    }

    /// Adds `len` zero bytes (a hole), hashing nothing but partial
    /// blocks.
    pub fn zero(&mut self, mut len: u64) {
        let bs = self.spec.block_size;
        if !self.pending.is_empty() {
            let n = len.min(bs - self.pending.len() as u64);
            self.update(&vec![0u8; n as usize]);
            len -= n;
        }
        self.length += len / bs * bs;
        for _ in 0..len / bs {
            self.outer.update(&self.zero_md);
        }
        self.update(&vec![0u8; (len % bs) as usize]);
    }

    /// The digest.
    pub fn finish(mut self) -> Vec<u8> {
        if !self.pending.is_empty() {
            let block = std::mem::take(&mut self.pending);
            self.take_block(&block);
        }
        if self.spec.variant.hashes_size() {
            self.outer.update(&self.length.to_le_bytes());
        }
        self.outer.finalize().into_vec()
    }
}

/// A run of blocks handed to a [`Combiner`].
#[derive(Debug)]
pub enum Run {
    /// The concatenated hashes of consecutive blocks.
    Hashes(Vec<u8>),
    /// This many bytes of zeroes: full zero blocks, then (at the end of
    /// the image) a partial one.
    Zero(u64),
}

struct State {
    outer: Box<dyn DynDigest + Send>,
    /// The index of the next block to combine.
    next: u64,
    /// Runs that arrived ahead of their turn, by first block.
    pending: BTreeMap<u64, Run>,
}

/// Combines runs of block hashes computed in parallel into the blkhash of
/// an image of known size, in block order whatever order they come in.
pub struct Combiner {
    spec: BlkhashSpec,
    zero_md: Vec<u8>,
    md_len: usize,
    size: u64,
    state: Mutex<State>,
    advanced: event_listener::Event,
}

impl Combiner {
    /// Runs held ahead of their turn before [`Combiner::wait_room`] makes
    /// new work wait: with 256 KiB requests, 1 GiB of copy ahead of the
    /// slowest request (and some 128 KiB of hashes).
    pub const PENDING_LIMIT: usize = 4096;

    /// A combiner for an image of `size` bytes.
    pub fn new(spec: BlkhashSpec, size: u64) -> Combiner {
        let zero_md = spec.zero_md();
        Combiner {
            spec,
            md_len: zero_md.len(),
            zero_md,
            size,
            state: Mutex::new(State {
                outer: spec.algorithm.hasher(),
                next: 0,
                pending: BTreeMap::new(),
            }),
            advanced: event_listener::Event::new(),
        }
    }

    /// The parameters.
    pub fn spec(&self) -> BlkhashSpec {
        self.spec
    }

    /// `D(zero block)`, for [`BlkhashSpec::block_hashes`].
    pub fn zero_md(&self) -> &[u8] {
        &self.zero_md
    }

    fn blocks(&self, run: &Run) -> u64 {
        match run {
            Run::Hashes(h) => (h.len() / self.md_len) as u64,
            Run::Zero(len) => len.div_ceil(self.spec.block_size),
        }
    }

    fn feed(&self, outer: &mut dyn DynDigest, run: &Run) {
        match run {
            Run::Hashes(h) => outer.update(h),
            Run::Zero(len) => {
                let bs = self.spec.block_size;
                for _ in 0..len / bs {
                    outer.update(&self.zero_md);
                }
                if len % bs != 0 {
                    outer.update(&self.spec.algorithm.digest(&vec![0u8; (len % bs) as usize]));
                }
            }
        }
    }

    /// Hands over the run of blocks starting at block `first`.
    pub fn submit(&self, first: u64, run: Run) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if first != st.next {
            st.pending.insert(first, run);
            return;
        }
        let State { outer, next, pending } = &mut *st;
        self.feed(outer.as_mut(), &run);
        *next += self.blocks(&run);
        while let Some(r) = pending.remove(next) {
            self.feed(outer.as_mut(), &r);
            *next += self.blocks(&r);
        }
        drop(st);
        self.advanced.notify(usize::MAX);
    }

    fn has_room(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).pending.len() < Self::PENDING_LIMIT
    }

    /// Waits while [`Combiner::PENDING_LIMIT`] runs wait for an earlier
    /// one.
    pub async fn wait_room(&self) {
        loop {
            if self.has_room() {
                return;
            }
            let l = self.advanced.listen();
            if self.has_room() {
                return;
            }
            l.await;
        }
    }

    /// The digest, once every block of the image was submitted; an error
    /// if some are missing.
    pub fn finish(&self) -> Result<Vec<u8>, String> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let blocks = self.size.div_ceil(self.spec.block_size);
        if st.next != blocks || !st.pending.is_empty() {
            return Err(format!(
                "blkhash: {} of {blocks} blocks were hashed in order ({} runs out of order)",
                st.next,
                st.pending.len()
            ));
        }
        let outer = &mut st.outer;
        if self.spec.variant.hashes_size() {
            outer.update(&self.size.to_le_bytes());
        }
        Ok(outer.finalize_reset().into_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_specs() {
        assert_eq!(BlkhashSpec::parse(""), Ok(BlkhashSpec::default()));
        assert_eq!(
            BlkhashSpec::parse("sha1/4k"),
            Ok(BlkhashSpec {
                algorithm: Algorithm::Sha1,
                block_size: 4096,
                variant: Variant::Blksum,
            })
        );
        assert_eq!(BlkhashSpec::parse("imageio"), Ok(IMAGEIO_SPEC));
        assert_eq!(
            BlkhashSpec::parse("ImageIO/1M"),
            Ok(BlkhashSpec {
                block_size: 1 << 20,
                ..IMAGEIO_SPEC
            })
        );
        assert_eq!(BlkhashSpec::parse("SHA512").unwrap().algorithm, Algorithm::Sha512);
        assert_eq!(BlkhashSpec::parse("/1M").unwrap().block_size, 1 << 20);
        for bad in [
            "md5",
            "blake2b512",
            "blake2b",
            "sha256/100",
            "sha256/0",
            "sha256/64M",
            "sha256/x",
            "imageio/100",
            "imageio/x",
        ] {
            assert!(BlkhashSpec::parse(bad).is_err(), "{bad}");
        }
    }

    fn pseudo(len: usize) -> Vec<u8> {
        let mut x = 0x9e3779b97f4a7c15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// The construction written out plainly.
    fn reference(spec: BlkhashSpec, data: &[u8]) -> Vec<u8> {
        let mut outer = Vec::new();
        for b in data.chunks(spec.block_size as usize) {
            outer.extend(spec.algorithm.digest(b));
        }
        if spec.variant == Variant::Blksum {
            outer.extend((data.len() as u64).to_le_bytes());
        }
        spec.algorithm.digest(&outer)
    }

    #[test]
    fn incremental_matches_the_construction() {
        let spec = BlkhashSpec::parse("sha256/4k").unwrap();
        let mut data = pseudo(4096 * 5 + 1000);
        data[4096..8192].fill(0);
        data[12000..20480].fill(0);
        let want = reference(spec, &data);
        for step in [1usize, 100, 4096, 5000, 1 << 20] {
            let mut h = Blkhash::new(spec);
            for c in data.chunks(step) {
                h.update(c);
            }
            assert_eq!(h.finish(), want, "step {step}");
        }
        // The zero ranges given as holes.
        let mut h = Blkhash::new(spec);
        h.update(&data[..4096]);
        h.zero(4096);
        h.update(&data[8192..12000]);
        h.zero(20480 - 12000);
        h.update(&data[20480..]);
        assert_eq!(h.finish(), want);
        assert_eq!(Blkhash::new(spec).finish(), spec.algorithm.digest(&0u64.to_le_bytes()));
    }

    #[test]
    fn combiner_takes_runs_in_any_order() {
        let spec = BlkhashSpec::parse("sha1/4k").unwrap();
        let mut data = pseudo(4096 * 6 + 300);
        data[8192..16384].fill(0);
        data[24576..].fill(0);
        let want = reference(spec, &data);
        let c = Combiner::new(spec, data.len() as u64);
        c.submit(6, Run::Zero(300));
        c.submit(4, Run::Hashes(spec.block_hashes(&data[16384..24576], c.zero_md())));
        c.submit(2, Run::Zero(8192));
        assert!(c.finish().is_err());
        c.submit(0, Run::Hashes(spec.block_hashes(&data[..8192], c.zero_md())));
        assert_eq!(c.finish().unwrap(), want);
    }

    #[test]
    fn imageio_variant() {
        // blake2b-256 of nothing: imageio's checksum of an empty image.
        assert_eq!(
            hex(&Blkhash::new(IMAGEIO_SPEC).finish()),
            "0e5751c026e543b2e8ab2eb06099daa1d1e5df47778f7787faab45cdf12fe3a8"
        );
        let spec = BlkhashSpec::parse("imageio/4k").unwrap();
        let mut data = pseudo(4096 * 6 + 300);
        data[8192..16384].fill(0);
        data[24576..].fill(0);
        let want = reference(spec, &data);
        let mut h = Blkhash::new(spec);
        h.update(&data[..8192]);
        h.zero(8192);
        h.update(&data[16384..24576]);
        h.zero(300);
        assert_eq!(h.finish(), want);
        let c = Combiner::new(spec, data.len() as u64);
        c.submit(6, Run::Zero(300));
        c.submit(2, Run::Zero(8192));
        c.submit(0, Run::Hashes(spec.block_hashes(&data[..8192], c.zero_md())));
        c.submit(4, Run::Hashes(spec.block_hashes(&data[16384..24576], c.zero_md())));
        assert_eq!(c.finish().unwrap(), want);
        // The same blocks under blksum's construction differ by the size.
        assert_ne!(
            reference(
                BlkhashSpec {
                    variant: Variant::Blksum,
                    ..spec
                },
                &data
            ),
            want
        );
        assert_eq!(
            spec.imageio_json(&want).unwrap(),
            format!(
                "{{\"algorithm\": \"blake2b\", \"block_size\": 4096, \"checksum\": \"{}\"}}",
                hex(&want)
            )
        );
        assert!(BlkhashSpec::default().imageio_json(&want).is_err());
    }
}
