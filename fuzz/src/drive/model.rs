//! The server's storage in a conversation and the model of the disk its reads are checked against.

use super::*;

pub(super) const BLOCK: u64 = 4096;

/// The server's storage: blocks never written read as holes.
#[derive(Debug)]
pub struct Disk {
    pub(super) data: Vec<u8>,
    pub(super) written: Vec<bool>,
    pub(super) faults: u32,
    pub(super) executed: u32,
    /// Cookies of requests failed on purpose.
    pub(super) failed: HashSet<u64>,
}

impl Disk {
    pub(super) fn store(&mut self, offset: u64, bytes: &[u8]) {
        let o = offset as usize;
        self.data[o..o + bytes.len()].copy_from_slice(bytes);
        for b in offset / BLOCK..(offset + bytes.len() as u64).div_ceil(BLOCK) {
            self.written[b as usize] = true;
        }
    }
}

impl Executor for Disk {
    fn execute(&mut self, s: &ServerSession<Exports>, r: &ServerRequest, payload: &[u8], out: &mut Vec<u8>) {
        let enc = s.encoder().expect("an encoder in transmission");
        let structured = enc.mode().structured();
        let i = self.executed;
        self.executed += 1;
        let (o, l) = (r.offset as usize, r.length as usize);
        if self.faults >> (i % 32) & 1 != 0 && r.command != Command::DISC {
            self.failed.insert(r.cookie);
            if structured && r.command == Command::READ && l > 512 && !r.flags.contains(CommandFlags::DF) {
                // Some data, then an error at the offset where it stopped.
                let h = enc.offset_data_header(r, r.offset, 512, false).expect("a data chunk");
                out.extend_from_slice(h.as_bytes());
                out.extend_from_slice(&self.data[o..o + 512]);
                enc.reply_error_offset(r, ErrorCode::EIO, "injected", r.offset + 512, true, out)
                    .expect("an error chunk");
            } else {
                enc.reply_error(r, ErrorCode::EIO, "injected", out);
            }
            return;
        }
        match r.command {
            Command::READ if l == 0 => out.extend_from_slice(enc.reply_ok(r).as_bytes()),
            Command::READ if structured && !r.flags.contains(CommandFlags::DF) => {
                // Holes as OFFSET_HOLE and data as OFFSET_DATA, a block at a time.
                let end = r.offset + r.length;
                let mut off = r.offset;
                while off < end {
                    let n = (BLOCK - off % BLOCK).min(end - off);
                    if self.written[(off / BLOCK) as usize] {
                        let h = enc.offset_data_header(r, off, n, false).expect("a data chunk");
                        out.extend_from_slice(h.as_bytes());
                        out.extend_from_slice(&self.data[off as usize..(off + n) as usize]);
                    } else {
                        let h = enc.hole_chunk(r, off, n, false).expect("a hole chunk");
                        out.extend_from_slice(h.as_bytes());
                    }
                    off += n;
                }
                out.extend_from_slice(enc.reply_ok(r).as_bytes());
            }
            Command::READ => {
                let h = enc.read_reply_header(r).expect("a read reply");
                out.extend_from_slice(h.as_bytes());
                out.extend_from_slice(&self.data[o..o + l]);
            }
            Command::WRITE => {
                assert_eq!(payload.len(), l, "the whole payload");
                self.store(r.offset, payload);
                out.extend_from_slice(enc.reply_ok(r).as_bytes());
            }
            Command::WRITE_ZEROES | Command::TRIM => {
                self.data[o..o + l].fill(0);
                out.extend_from_slice(enc.reply_ok(r).as_bytes());
            }
            Command::FLUSH | Command::CACHE => out.extend_from_slice(enc.reply_ok(r).as_bytes()),
            Command::BLOCK_STATUS => {
                let ids: Vec<(u32, bool)> = s
                    .selected_contexts(r)
                    .map(|(_, c)| (c.id, c.name == CONTEXT_BASE_ALLOCATION))
                    .collect();
                assert!(!ids.is_empty(), "block status for no context");
                let size = s.size();
                for (k, (id, alloc)) in ids.iter().enumerate() {
                    let written = &self.written;
                    let extents = (r.offset / BLOCK..size.div_ceil(BLOCK)).take(64).map(|b| {
                        let start = (b * BLOCK).max(r.offset);
                        let end = (b * BLOCK + BLOCK).min(size);
                        let status = match (alloc, written[b as usize]) {
                            (true, false) => 3,
                            (false, true) => 1,
                            _ => 0,
                        };
                        (end - start, status)
                    });
                    enc.block_status_chunk(r, *id, extents, k + 1 == ids.len(), out)
                        .expect("a status chunk");
                }
            }
            c => panic!("executing {c}"),
        }
    }

    fn reject(
        &mut self,
        s: &ServerSession<Exports>,
        r: &ServerRequest,
        error: ErrorCode,
        reason: &str,
        out: &mut Vec<u8>,
    ) {
        let enc = s.encoder().expect("an encoder in transmission");
        enc.reply_error(r, error, reason, out);
    }
}

/// What the disk holds, as the completed requests say.
#[derive(Debug)]
pub(super) struct Model {
    pub(super) data: Vec<u8>,
    /// Bytes a request lost with the connection may have changed.
    pub(super) known: Vec<bool>,
}

impl Model {
    pub(super) fn forget(&mut self, r: &Request) {
        if matches!(r.command, Command::WRITE | Command::WRITE_ZEROES | Command::TRIM) {
            self.known[r.offset as usize..(r.offset + r.length) as usize].fill(false);
        }
    }
}
