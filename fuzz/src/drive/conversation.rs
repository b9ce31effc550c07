//! The `conversation` target: a client session talks to a server session.

use super::*;

// ---------------------------------------------------------------------------
// The `conversation` target
// ---------------------------------------------------------------------------

/// How a driver of the `conversation` target reads.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum Feeding {
    /// Exactly the counts `need()` gives; READ data and WRITE payloads
    /// moved by the driver.
    Exact,
    /// Whatever arrived, in pieces of at most this many bytes (plus one).
    Chunks(u16),
    /// Exact counts and pieces of varying sizes, in turn.
    Mixed(u8),
}

/// The disk both exports of the `conversation` target show.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub struct DiskChoice {
    /// Size (a table).
    pub size: u8,
    /// Block sizes ([`block_size`]).
    pub block: u8,
    /// Transmission flags offered.
    pub flags: u16,
    /// Contexts offered (bits of the export contexts), block sizes
    /// required (bit 5), `ro` only over TLS (bit 6).
    pub bits: u8,
}

/// A step of a [`Scenario`].
#[derive(Debug, Clone, Copy)]
pub enum Step {
    /// An option-mode call ([`OptCall::decode`]), if the client negotiates.
    Opt(u8, u8, u8),
    /// A request (after `opt_go` in option mode): [`command`], flags, and
    /// offset and length in 512-byte units (or bytes, when `raw`).
    Request {
        /// Command.
        cmd: u8,
        /// Flags.
        flags: u8,
        /// Offset.
        at: u16,
        /// Length.
        len: u16,
        /// Units of one byte.
        raw: bool,
        /// The WRITE's data.
        seed: u8,
    },
    /// Move bytes until both sides wait.
    Run,
    /// Move bytes once each way.
    Round,
    /// The connection breaks: each side reads at most this many more
    /// bytes, then both see it closed.
    Cut(u16),
    /// After a cut, a new connection to the same disk.
    Reconnect,
    /// The server shuts down.
    Shutdown,
    /// Release completed requests' slots.
    Release,
    /// `NBD_CMD_DISC`
    Disconnect,
}

/// The `conversation` target's input: a client session talks to a server
/// session over memory. (Built by [`Scenario::decode`].)
#[derive(Debug, Clone)]
pub struct Scenario {
    /// [`client_config`]
    pub client: [u8; 4],
    /// How the client reads.
    pub client_feeding: Feeding,
    /// [`server_config`] (oldstyle only with bit 1 of byte 2).
    pub server: [u8; 3],
    /// How the server reads.
    pub server_feeding: Feeding,
    /// Bit `i % 32` of `faults & faults >> 11 & faults >> 21` fails the
    /// `i`th request the server executes.
    pub faults: u32,
    /// The disk.
    pub disk: DiskChoice,
    /// What happens.
    pub steps: Vec<Step>,
}

impl Scenario {
    /// The scenario `data` stands for: the fields with `arbitrary`, then
    /// steps until the data runs out (at most 256).
    pub fn decode(data: &[u8]) -> Option<Scenario> {
        let mut u = Unstructured::new(data);
        let mut sc = Scenario {
            client: u.arbitrary().ok()?,
            client_feeding: u.arbitrary().ok()?,
            server: u.arbitrary().ok()?,
            server_feeding: u.arbitrary().ok()?,
            faults: u.arbitrary().ok()?,
            disk: u.arbitrary().ok()?,
            steps: Vec::new(),
        };
        while !u.is_empty() && sc.steps.len() < 256 {
            sc.steps.push(Step::decode(&mut u)?);
        }
        Some(sc)
    }
}

impl Step {
    /// A step, requests the likeliest.
    pub(super) fn decode(u: &mut Unstructured<'_>) -> Option<Step> {
        let k: u8 = u.arbitrary().ok()?;
        Some(match k {
            0..=127 => {
                let (cmd, flags, at, len, raw, seed): (u8, u8, u16, u16, u8, u8) = u.arbitrary().ok()?;
                Step::Request {
                    cmd,
                    flags,
                    at,
                    len,
                    raw: raw & 7 == 0,
                    seed,
                }
            }
            128..=143 => Step::Round,
            144..=175 => {
                let (w, n, q) = u.arbitrary().ok()?;
                Step::Opt(w, n, q)
            }
            176..=183 => Step::Cut(u.arbitrary().ok()?),
            184..=191 => Step::Reconnect,
            192..=193 => Step::Shutdown,
            196..=203 => Step::Release,
            204..=207 => Step::Disconnect,
            _ => Step::Run,
        })
    }
}

/// What a `conversation` run reached (for choosing seeds).
#[derive(Debug, Default, Clone)]
pub struct Summary {
    /// Modes of the connections that reached transmission.
    pub modes: Vec<Mode>,
    /// A connection upgraded to TLS.
    pub tls: bool,
    /// The client negotiated in option mode.
    pub opt_mode: bool,
    /// Option outcomes received.
    pub options: usize,
    /// Requests completed successfully.
    pub ok: usize,
    /// Requests that failed (by the server's error or a cut).
    pub failed: usize,
    /// READs whose data was checked against the model.
    pub reads: usize,
    /// Connections made.
    pub connections: usize,
    /// Connections whose handshake failed.
    pub refused: usize,
    /// Why sessions failed.
    pub errors: Vec<String>,
}

/// Both sides of one connection.
pub(super) struct Link {
    pub(super) c: ClientDriver,
    pub(super) s: ServerDriver<Disk>,
    pub(super) to_server: Pipe,
    pub(super) to_client: Pipe,
    /// Bytes pushed into each pipe so far, and where TLS bytes start.
    pub(super) pushed: [u64; 2],
    pub(super) tls_at: [Option<u64>; 2],
    pub(super) rounds: usize,
}

pub(super) struct Conversation<'a> {
    pub(super) sc: &'a Scenario,
    pub(super) link: Link,
    pub(super) model: Model,
    /// Requests started, in order, with a WRITE's data.
    pub(super) issued: std::collections::VecDeque<(u64, Option<Vec<u8>>)>,
    pub(super) summary: Summary,
}

pub(super) fn exports(disk: &DiskChoice, size: u64) -> Exports {
    let mut d = ExportDetails::new("disk", size);
    d.flags = TransmissionFlags::from_bits_retain(disk.flags) - TransmissionFlags::READ_ONLY;
    d.block_size = block_size(disk.block);
    d.block_size_required = disk.bits & 0xe0 == 0xe0;
    d.meta_contexts = EXPORT_CONTEXTS
        .iter()
        .take(4)
        .enumerate()
        .filter(|(i, _)| disk.bits & (1 << i) != 0)
        .map(|(_, c)| (*c).to_owned())
        .collect();
    let mut ro = d.clone();
    ro.name = "ro".into();
    ro.flags |= TransmissionFlags::READ_ONLY;
    ro.tls_only = disk.bits & 64 != 0;
    Exports(vec![
        ExportSpec {
            name: "disk".into(),
            details: d,
            default: true,
        },
        ExportSpec {
            name: "ro".into(),
            details: ro,
            default: false,
        },
    ])
}

impl Link {
    pub(super) fn new(sc: &Scenario, disk: Disk) -> Link {
        // Mostly names the server knows ("", "disk", "ro"), sometimes not.
        let mut cb = sc.client;
        cb[1] = [0, 1, 2, 1, 0, 1, 3, 5][cb[1] as usize % 8];
        if cb[3] & 0x80 == 0 {
            // Mostly valid queries.
            cb[3] &= 0x3f;
        }
        let (config, manual) = client_config(cb);
        let mut sconfig = server_config(sc.server);
        if sc.server[2] & 2 == 0 {
            sconfig.oldstyle = false;
        }
        let size = disk.data.len() as u64;
        Link {
            c: ClientDriver::new(config, manual, true),
            s: ServerDriver::new(sconfig, exports(&sc.disk, size), disk),
            to_server: Pipe::default(),
            to_client: Pipe::default(),
            pushed: [0; 2],
            tls_at: [None; 2],
            rounds: 0,
        }
    }

    pub(super) fn over(&self) -> bool {
        self.c.over && self.s.over
    }
}

/// Reads as `f` says, once; false when nothing was read.
pub(super) fn read_client(c: &mut ClientDriver, f: Feeding, round: usize, src: &mut Pipe) -> bool {
    match feeding_step(f, round) {
        None => c.exact(src),
        Some(k) => c.chunk(src, k),
    }
}

pub(super) fn read_server(s: &mut ServerDriver<Disk>, f: Feeding, round: usize, src: &mut Pipe) -> bool {
    match feeding_step(f, round) {
        None => s.exact(src),
        Some(k) => s.chunk(src, k),
    }
}

/// `None`: an exact read; else a piece of this many bytes.
pub(super) fn feeding_step(f: Feeding, round: usize) -> Option<usize> {
    match f {
        Feeding::Exact => None,
        Feeding::Chunks(k) => Some(k as usize + 1),
        Feeding::Mixed(seed) => {
            let v = (round as u64).wrapping_mul(seed as u64 | 1).wrapping_mul(0x9e37_79b9) >> 7;
            match v % 4 {
                0 => None,
                1 => Some(1),
                2 => Some((v % 97) as usize + 1),
                _ => Some((v % 9000) as usize + 1),
            }
        }
    }
}

impl Conversation<'_> {
    /// Moves bytes once each way; whether anything moved.
    pub(super) fn round(&mut self) -> bool {
        let l = &mut self.link;
        l.rounds += 1;
        let mut moved = false;
        for _ in 0..4096 {
            l.c.settle();
            if l.c.over || !read_client(&mut l.c, self.sc.client_feeding, l.rounds, &mut l.to_client) {
                break;
            }
            moved = true;
            l.rounds += 1;
        }
        for _ in 0..4096 {
            l.s.settle();
            if l.s.over || !read_server(&mut l.s, self.sc.server_feeding, l.rounds, &mut l.to_server) {
                break;
            }
            moved = true;
            l.rounds += 1;
        }
        l.c.settle();
        l.s.settle();
        // Output goes on the wire; TLS bytes are marked.
        for (i, out, mark, peer_tls, inbox) in [
            (0, &mut l.c.out, &mut l.c.tls_mark, l.s.tls, &mut l.s.inbox),
            (1, &mut l.s.out, &mut l.s.tls_mark, l.c.tls, &mut l.c.inbox),
        ] {
            if let Some(m) = mark.take() {
                l.tls_at[i] = Some(l.pushed[i] + m as u64);
            }
            if !out.is_empty() {
                moved = true;
            }
            l.pushed[i] += out.len() as u64;
            if i == 0 {
                l.to_server.push(out);
            } else {
                l.to_client.push(out);
            }
            out.clear();
            if !peer_tls {
                inbox.limit = l.tls_at[i];
            }
        }
        // A side that closed: the other sees the end once it read everything.
        if l.c.over && !l.s.over && l.to_server.len() == 0 {
            l.s.lose();
            moved = true;
        }
        if l.s.over && !l.c.over && l.to_client.len() == 0 {
            l.c.lose();
            moved = true;
        }
        self.account();
        moved
    }

    /// Moves bytes until both sides wait; then neither may wait for the
    /// other.
    pub(super) fn run(&mut self) {
        for _ in 0..100_000 {
            if !self.round() {
                let l = &mut self.link;
                if !l.c.over {
                    let n = l.c.need();
                    assert!(
                        matches!(n, CNeed::Negotiating | CNeed::Idle),
                        "deadlock: the client waits with {n:?}, the server with {:?}",
                        l.s.need()
                    );
                }
                if !l.s.over {
                    let n = l.s.need();
                    assert!(matches!(n, SNeed::Bytes(_)), "deadlock: the server waits with {n:?}");
                }
                if !l.c.over {
                    assert_eq!(
                        l.to_client.len() + l.c.inbox.len(),
                        0,
                        "bytes for the client nobody reads"
                    );
                }
                if !l.s.over {
                    assert_eq!(
                        l.to_server.len() + l.s.inbox.len(),
                        0,
                        "bytes for the server nobody reads"
                    );
                }
                return;
            }
        }
        panic!("the conversation does not settle");
    }

    /// Checks what completed against the model and the server's errors.
    pub(super) fn account(&mut self) {
        let l = &mut self.link;
        let shut = l.s.shut;
        for (r, reason) in l.s.rejects.drain(..) {
            // The spec leaves requests of length 0 to the server.
            assert!(
                shut || r.length == 0,
                "the server refused what the client sent ({r:?}: {reason})"
            );
        }
        if let Some(e) = &l.c.error {
            match e {
                ClientSessionError::Handshake(h) if !l.c.connected => {
                    assert!(
                        !matches!(h, nbd_proto::client::HandshakeError::Violation(_)),
                        "our server broke the handshake: {e}"
                    );
                }
                e => panic!("client failed in transmission: {e}"),
            }
        }
        if let Some(e) = &l.s.error {
            match e {
                ServerSessionError::Handshake(h) if !l.s.ready => {
                    assert!(
                        !matches!(h, nbd_proto::server::ServerHandshakeError::Violation(_)),
                        "our client broke the handshake: {e}"
                    );
                }
                e => panic!("server failed in transmission: {e}"),
            }
        }
        for done in l.c.completions.drain(..) {
            let (cookie, data) = self.issued.pop_front().expect("a completion nobody started");
            assert_eq!(cookie, done.cookie, "completions in the order the server executed");
            let r = done.req;
            let (o, n) = (r.offset as usize, r.length as usize);
            match done.result {
                Ok(()) => {
                    self.summary.ok += 1;
                    match r.command {
                        Command::WRITE => {
                            self.model.data[o..o + n].copy_from_slice(&data.expect("the WRITE's data"));
                            self.model.known[o..o + n].fill(true);
                        }
                        Command::WRITE_ZEROES | Command::TRIM => {
                            self.model.data[o..o + n].fill(0);
                            self.model.known[o..o + n].fill(true);
                        }
                        Command::READ => {
                            let got = done.data.expect("a READ buffer");
                            for (i, b) in got.iter().enumerate() {
                                if self.model.known[o + i] {
                                    assert_eq!(*b, self.model.data[o + i], "READ at {o} differs at byte {i}");
                                }
                            }
                            self.summary.reads += 1;
                        }
                        _ => {}
                    }
                }
                Err(code) => {
                    self.summary.failed += 1;
                    let injected = l.s.x_failed(cookie);
                    assert!(
                        injected || (shut && code == ErrorCode::ESHUTDOWN) || r.length == 0,
                        "{r:?} failed with {code:?}, which nothing caused"
                    );
                }
            }
        }
        for (cookie, lost) in l.c.lost.drain(..) {
            self.summary.failed += 1;
            self.model.forget(&lost.req);
            let i = self
                .issued
                .iter()
                .position(|(c, _)| *c == cookie)
                .expect("a lost request was started");
            self.issued.remove(i);
        }
        if l.c.over {
            assert!(self.issued.is_empty(), "requests neither completed nor failed");
        }
        if let Some(n) = l.c.s.negotiated()
            && !self.summary.modes.contains(&n.mode)
            && l.c.connected
        {
            self.summary.modes.push(n.mode);
        }
        self.summary.tls |= l.c.tls;
        self.summary.options += l.c.outcomes.len();
        l.c.outcomes.clear();
    }

    /// Both sessions connected: they agree on what was negotiated.
    pub(super) fn check_agreement(&self) {
        let l = &self.link;
        let (Some(c), Some(s)) = (l.c.s.negotiated(), l.s.s.negotiated()) else {
            return;
        };
        if !(l.c.connected && l.s.ready) {
            return;
        }
        assert_eq!(c.mode, s.mode, "mode");
        assert_eq!(c.size, s.size, "size");
        assert_eq!(c.flags, s.flags, "flags");
        assert_eq!(c.tls, s.tls, "TLS");
        assert_eq!(c.contexts, s.contexts, "contexts");
        if s.client_requested_block_size {
            assert_eq!(c.block_size, s.block_size, "block sizes");
        }
    }

    /// In option mode, GO once the caller wants transmission.
    pub(super) fn go(&mut self) {
        if self.link.c.over || self.link.c.connected {
            return;
        }
        if self.link.c.need() == CNeed::Negotiating && self.link.c.opt_pending.is_none() {
            self.link.c.opt(OptCall::Go);
        }
        self.run();
        self.check_agreement();
    }

    pub(super) fn request(&mut self, cmd: u8, flags: u8, at: u16, len: u16, raw: bool, seed: u8) {
        self.go();
        let l = &mut self.link;
        if l.c.over || !l.c.connected {
            return;
        }
        let size = l.c.s.size();
        let (offset, length) = if raw {
            (at as u64, len as u64)
        } else {
            let blocks = size / 512;
            let o = (at as u64 % (blocks + 1)) * 512;
            (o, ((len as u64 % 64) + 1) * 512)
        };
        let length = if raw {
            length
        } else {
            length.min(size.saturating_sub(offset))
        };
        // Mostly no flags, else mostly known ones.
        let flags = match flags >> 6 {
            0 | 1 => 0,
            2 => flags as u16 & 0x1f,
            _ => flags as u16,
        };
        let r = Request {
            command: command(cmd),
            flags: CommandFlags::from_bits_retain(flags),
            offset,
            length,
        };
        let data = (r.command == Command::WRITE && length <= size).then(|| {
            (0..length)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                .collect::<Vec<u8>>()
        });
        if let Some(cookie) = l.c.request(r, data.clone()) {
            self.issued.push_back((cookie.0, data));
        }
    }

    pub(super) fn cut(&mut self, deliver: u16) {
        let l = &mut self.link;
        if !l.c.over {
            l.c.chunk(&mut l.to_client, deliver as usize);
            l.c.settle();
        }
        if !l.s.over {
            l.s.chunk(&mut l.to_server, deliver as usize);
            l.s.settle();
        }
        l.c.lose();
        l.s.lose();
        self.account();
    }

    pub(super) fn reconnect(&mut self) {
        if !self.link.over() {
            return;
        }
        if self.summary.connections >= 8 {
            return;
        }
        self.count_refused();
        let disk = std::mem::replace(
            &mut self.link.s.x,
            Disk {
                data: Vec::new(),
                written: Vec::new(),
                faults: 0,
                executed: 0,
                failed: HashSet::new(),
            },
        );
        self.link = Link::new(self.sc, disk);
        self.summary.connections += 1;
        self.summary.opt_mode |= self.link.c.config.opt_mode;
    }

    pub(super) fn count_refused(&mut self) {
        if !self.link.c.connected {
            self.summary.refused += 1;
        }
        if let Some(e) = &self.link.c.error {
            self.summary.errors.push(format!("client: {e}"));
        }
        if let Some(e) = &self.link.s.error {
            self.summary.errors.push(format!("server: {e}"));
        }
    }
}

impl ServerDriver<Disk> {
    /// Whether the server failed this request on purpose.
    pub(super) fn x_failed(&mut self, cookie: u64) -> bool {
        self.x.failed.remove(&cookie)
    }
}

/// The `conversation` target: a [`Scenario`] built with `arbitrary`.
pub fn conversation(data: &[u8]) -> Summary {
    let Some(sc) = Scenario::decode(data) else {
        return Summary::default();
    };
    run_scenario(&sc)
}

/// Runs a scenario and says what it reached.
pub fn run_scenario(sc: &Scenario) -> Summary {
    let size: u64 = match sc.disk.size % 8 {
        0 => 0,
        1 => 512,
        2 => 4096,
        3 => 65536,
        4 => 65536 + 512,
        5 => 262_144,
        6 => 1 << 20,
        _ => 3 * 4096 + 100,
    };
    let disk = Disk {
        data: vec![0; size as usize],
        written: vec![false; size.div_ceil(BLOCK) as usize],
        faults: sc.faults & sc.faults >> 11 & sc.faults >> 21,
        executed: 0,
        failed: HashSet::new(),
    };
    let mut conv = Conversation {
        sc,
        link: Link::new(sc, disk),
        model: Model {
            data: vec![0; size as usize],
            known: vec![true; size as usize],
        },
        issued: Default::default(),
        summary: Summary {
            connections: 1,
            ..Summary::default()
        },
    };
    conv.summary.opt_mode = conv.link.c.config.opt_mode;
    conv.run();
    for step in sc.steps.iter().take(256) {
        match *step {
            Step::Opt(w, n, q) => {
                let c = &mut conv.link.c;
                if !c.over && c.need() == CNeed::Negotiating && c.opt_pending.is_none() {
                    c.opt(OptCall::decode(w, n, q));
                    conv.run();
                }
            }
            Step::Request {
                cmd,
                flags,
                at,
                len,
                raw,
                seed,
            } => conv.request(cmd, flags, at, len, raw, seed),
            Step::Run => {
                conv.run();
                conv.check_agreement();
            }
            Step::Round => {
                conv.round();
            }
            Step::Cut(deliver) => conv.cut(deliver),
            Step::Reconnect => {
                conv.reconnect();
                conv.run();
            }
            Step::Shutdown => {
                let s = &mut conv.link.s;
                if !s.over {
                    s.s.shutdown();
                    s.shut = true;
                }
            }
            Step::Release => conv.link.c.release(),
            Step::Disconnect => {
                conv.go();
                conv.request(9, 0, 0, 0, true, 0);
            }
        }
    }
    conv.go();
    conv.run();
    conv.check_agreement();
    // Every request was answered; then the client says goodbye.
    let l = &mut conv.link;
    if !l.c.over {
        assert!(l.c.live.is_empty(), "requests left unanswered");
        if l.c.connected && !l.c.disconnecting {
            l.c.request(Request::new(Command::DISC, 0, 0), None);
            conv.run();
            assert!(conv.link.s.disconnected || conv.link.s.over);
        }
    }
    let l = &mut conv.link;
    l.c.lose();
    l.s.lose();
    conv.account();
    conv.count_refused();
    assert!(conv.issued.is_empty());
    conv.summary
}
