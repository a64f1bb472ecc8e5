//! `tollgate-loadgen`: an open-loop load generator for the latency half of the load bench
//! (`benches/load.sh`): requests at a given rate with sub-millisecond send times, on
//! keep-alive HTTP/1.1 connections over loopback.
//!
//! Why not wrk: wrk's timers tick once a millisecond, so a paced wrk sends each
//! millisecond's requests together (about 25 at once at 25,000 req/s). The last request of
//! such a burst waits for the proxy to finish the others, so the latency it reports at
//! "half load" is mostly queueing within the burst: it grows with CPU time per request
//! times the burst size, not with what a request costs on its own. Here each connection has
//! its own send times, Poisson (the default: independent callers) or evenly spaced, and one
//! thread sends them on time: non-blocking sockets under epoll, woken by a timerfd
//! (nanosecond resolution, timer slack 1 ns). Sends due within 20 µs of a wake-up leave
//! together, which saves wake-ups on the core the generator shares with the mock.
//!
//! A connection carries one request at a time. When its send time comes while its previous
//! response is still out, the send waits; sends that leave more than 50 µs late are
//! counted (`late_sends`; latency is timed from the actual send, as in wrk). Every request
//! carries `Authorization: Bearer tg-bench-<i>` for a random i below `--nkeys`, and the
//! chat body of `benches/load/chat.lua`. The result is one line `LOADJSON {...}` in the
//! same shape as chat.lua's, so the bench reads either.
//!
//! Several `--addr`s: the targets take turns, `--epoch-ms` each, one turn each per cycle in
//! an order shuffled per cycle, each with its own `--connections` connections and send
//! times that fall only in its own turns (at `--rate` while it is its turn). One `LOADJSON` line
//! per target, with its `addr`; its `duration_us` is the time it was its turn. Slow drifts
//! in the machine's speed (another tenant, frequency, the hypervisor) then hit every target
//! alike, which separate runs seconds apart cannot promise: the comparison of their tails is
//! paired in time.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::{Parser, ValueEnum};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Open-loop HTTP/1.1 load at a fixed rate, for latency measurements.
#[derive(Parser, Debug)]
#[command(name = "tollgate-loadgen", version, about)]
struct Args {
    /// Target, `host:port` (loopback in the bench). Repeat it to interleave several
    /// targets in time (see `--epoch-ms`).
    #[arg(long, required = true)]
    addr: Vec<SocketAddr>,
    /// With several targets: how long each one's turn lasts, in milliseconds.
    #[arg(long, default_value_t = 200)]
    epoch_ms: u64,
    /// Request path.
    #[arg(long, default_value = "/v1/chat/completions")]
    path: String,
    /// Total requests per second over all connections.
    #[arg(long)]
    rate: f64,
    /// Connections (one request in flight on each).
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// How long to send, in seconds.
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,
    /// Keys `tg-bench-0` .. `tg-bench-<n-1>`, picked at random per request.
    #[arg(long, default_value_t = 10_000)]
    nkeys: usize,
    /// `max_tokens` of the chat request.
    #[arg(long, default_value_t = 16)]
    max_tokens: u32,
    /// Ask for an SSE stream.
    #[arg(long)]
    stream: bool,
    /// How send times are spread.
    #[arg(long, value_enum, default_value_t = Arrivals::Poisson)]
    arrivals: Arrivals,
    /// A response not complete after this many seconds counts as a timeout.
    #[arg(long, default_value_t = 10)]
    timeout_s: u64,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Arrivals {
    /// Exponential gaps: the superposition of all connections is a Poisson process.
    Poisson,
    /// Evenly spaced sends, connections interleaved.
    Uniform,
}

/// What the run saw.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    bytes: u64,
    late_sends: u64,
    errors: Errors,
}

#[derive(Default, Clone, Copy)]
struct Errors {
    connect: u64,
    read: u64,
    write: u64,
    status: u64,
    timeout: u64,
}

/// A send this much after its scheduled time counts as late.
const LATE: Duration = Duration::from_micros(50);
/// Sends due this soon go out now: one wake-up of the loop serves them together. Each
/// wake-up programs a timer and switches tasks on the load generator's core, which it
/// shares with the mock upstream.
const COALESCE: Duration = Duration::from_micros(20);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !(args.rate > 0.0 && args.rate.is_finite()) {
        bail!("--rate must be a positive number of requests per second");
    }
    if args.connections == 0 || args.nkeys == 0 || args.epoch_ms == 0 {
        bail!("--connections, --nkeys and --epoch-ms must be at least 1");
    }
    if args.addr.len() > MAX_TARGETS {
        bail!("at most {MAX_TARGETS} --addr");
    }
    set_timer_slack_ns(1);
    let requests: Vec<Vec<Vec<u8>>> = args
        .addr
        .iter()
        .map(|addr| format_requests(&args, *addr))
        .collect();
    let mut tallies: Vec<Tally> = args.addr.iter().map(|_| Tally::default()).collect();
    let start = Instant::now() + Duration::from_millis(20);
    let mut run = Run::new(&args, start)?;
    run.drive(&requests, &mut tallies)?;
    let elapsed = Instant::now().saturating_duration_since(start);
    for (k, tally) in tallies.iter_mut().enumerate() {
        let duration = if args.addr.len() == 1 {
            elapsed
        } else {
            run.turns
                .owned_time(k, Duration::from_secs_f64(args.duration_s))
        };
        println!("{}", report(tally, duration.as_micros(), args.addr[k]));
    }
    Ok(())
}

/// Which target's turn it is when: `n` targets, turns of `epoch` each from `start`. Every
/// target has one turn per cycle of `n` turns, in an order shuffled per cycle (fixed by the
/// cycle's number), so that no target always takes over from the same one: a turn begins
/// with the core warm from, and still finishing the last responses of, the one before.
#[derive(Clone, Copy, Debug)]
struct Turns {
    start: Instant,
    epoch: Duration,
    n: usize,
}

impl Turns {
    /// The target whose turn it is at `t` (the first one before `start`).
    fn owner(&self, t: Instant) -> usize {
        let turn = t.saturating_duration_since(self.start).as_nanos() / self.epoch.as_nanos();
        let n = self.n as u128;
        self.order(turn / n)[(turn % n) as usize]
    }

    /// The targets in the order of their turns in `cycle`: a Fisher-Yates shuffle driven by
    /// splitmix64 of the cycle number.
    fn order(&self, cycle: u128) -> [usize; MAX_TARGETS] {
        let mut order = std::array::from_fn(|i| i);
        let mut x = cycle as u64 ^ 0x9e37_79b9_7f4a_7c15;
        for i in (1..self.n).rev() {
            x = splitmix64(x);
            order.swap(i, (x % (i as u64 + 1)) as usize);
        }
        order
    }

    /// How much of the first `span` after `start` is target `k`'s.
    fn owned_time(&self, k: usize, span: Duration) -> Duration {
        let (epoch, n) = (self.epoch.as_nanos(), self.n as u128);
        let span = span.as_nanos();
        let whole_cycles = span / (epoch * n);
        let rest = span - whole_cycles * epoch * n;
        // Its place in the last, unfinished cycle.
        let order = self.order(whole_cycles);
        let slot = order[..self.n].iter().position(|&t| t == k).unwrap_or(0) as u128;
        let in_rest = rest.saturating_sub(slot * epoch).min(epoch);
        Duration::from_nanos((whole_cycles * epoch + in_rest) as u64)
    }
}

/// Most `--addr`s one run takes turns between.
const MAX_TARGETS: usize = 8;

/// One step of splitmix64 (a fast, well-mixed sequence from any seed).
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One request per key, formatted once.
fn format_requests(args: &Args, addr: SocketAddr) -> Vec<Vec<u8>> {
    let body = format!(
        concat!(
            r#"{{"model":"gpt-4o-mini","messages":["#,
            r#"{{"role":"system","content":"You are a helpful assistant."}},"#,
            r#"{{"role":"user","content":"Write a short poem about metering proxies and tokens."}}],"#,
            r#""max_tokens":{}{}}}"#
        ),
        args.max_tokens,
        if args.stream { r#","stream":true"# } else { "" }
    );
    (0..args.nkeys)
        .map(|i| {
            format!(
                "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
                 Authorization: Bearer tg-bench-{i}\r\nContent-Length: {}\r\n\r\n{body}",
                args.path,
                addr,
                body.len()
            )
            .into_bytes()
        })
        .collect()
}

/// One connection and its schedule.
struct Conn {
    /// Index of its target.
    target: usize,
    stream: Option<TcpStream>,
    /// When its next request is due.
    next: Instant,
    /// When the request in flight was sent.
    in_flight: Option<Instant>,
    buf: Vec<u8>,
    filled: usize,
}

/// The event loop: one thread, non-blocking sockets under epoll, and a timerfd armed for the
/// next send time (nanosecond resolution, unlike epoll's millisecond timeout).
struct Run {
    conns: Vec<Conn>,
    epoll: OwnedFd,
    timer: OwnedFd,
    /// What the timer is set to.
    armed: Option<Instant>,
    end: Instant,
    gap: Duration,
    arrivals: Arrivals,
    timeout: Duration,
    addrs: Vec<SocketAddr>,
    turns: Turns,
    rng: StdRng,
}

/// epoll token of the timer (connections use their index).
const TIMER_TOKEN: u64 = u64::MAX;

impl Run {
    fn new(args: &Args, start: Instant) -> anyhow::Result<Self> {
        // SAFETY: plain syscalls returning new descriptors, owned at once.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        anyhow::ensure!(
            epoll >= 0,
            "epoll_create1: {}",
            std::io::Error::last_os_error()
        );
        let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
        let timer = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        anyhow::ensure!(
            timer >= 0,
            "timerfd_create: {}",
            std::io::Error::last_os_error()
        );
        let timer = unsafe { OwnedFd::from_raw_fd(timer) };
        watch(&epoll, timer.as_raw_fd(), TIMER_TOKEN, libc::EPOLL_CTL_ADD)?;
        // Per connection: the mean gap between its sends.
        let gap = Duration::from_secs_f64(args.connections as f64 / args.rate);
        let turns = Turns {
            start,
            epoch: Duration::from_millis(args.epoch_ms),
            n: args.addr.len(),
        };
        let mut run = Self {
            conns: Vec::with_capacity(args.connections * args.addr.len()),
            epoll,
            timer,
            armed: None,
            end: start + Duration::from_secs_f64(args.duration_s),
            gap,
            arrivals: args.arrivals,
            timeout: Duration::from_secs(args.timeout_s),
            addrs: args.addr.clone(),
            turns,
            rng: StdRng::seed_from_u64(0x2545_f491_4f6c_dd1d),
        };
        for target in 0..args.addr.len() {
            for i in 0..args.connections {
                let first = start
                    + match args.arrivals {
                        Arrivals::Poisson => gap.mul_f64(exponential(&mut run.rng)),
                        // Connection i starts i/C of a gap in: the sends interleave evenly.
                        Arrivals::Uniform => gap.mul_f64(i as f64 / args.connections as f64),
                    };
                let next = run.in_turn(target, first);
                run.conns.push(Conn {
                    target,
                    stream: None,
                    next,
                    in_flight: None,
                    buf: vec![0; 64 * 1024],
                    filled: 0,
                });
            }
        }
        Ok(run)
    }

    /// The gap to a connection's next send.
    fn draw_gap(&mut self) -> Duration {
        match self.arrivals {
            Arrivals::Poisson => self.gap.mul_f64(exponential(&mut self.rng)),
            Arrivals::Uniform => self.gap,
        }
    }

    /// `t`, or, when that is not `target`'s turn, its first send time after `t` that is:
    /// the schedule goes on drawing gaps and leaves out the sends that fall in the other
    /// targets' turns (for Poisson arrivals, still a Poisson process within its turns).
    fn in_turn(&mut self, target: usize, mut t: Instant) -> Instant {
        while self.turns.owner(t) != target && t < self.end {
            t += self.draw_gap();
        }
        t
    }

    /// Sends on schedule until the end, then waits for the responses still out.
    fn drive(&mut self, requests: &[Vec<Vec<u8>>], tallies: &mut [Tally]) -> anyhow::Result<()> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        loop {
            let now = Instant::now();
            let mut earliest: Option<Instant> = None;
            let mut busy = false;
            for i in 0..self.conns.len() {
                let target = self.conns[i].target;
                let tally = &mut tallies[target];
                if let Some(sent) = self.conns[i].in_flight {
                    if now.duration_since(sent) > self.timeout {
                        tally.errors.timeout += 1;
                        self.close(i);
                    } else {
                        busy = true;
                        continue;
                    }
                }
                let next = self.conns[i].next;
                if next >= self.end {
                    continue;
                }
                if next > now + COALESCE {
                    earliest = earlier(earliest, next);
                    continue;
                }
                if now > next && self.turns.n > 1 && self.turns.owner(now) != target {
                    // Held back (its previous response was still out) until another
                    // target's turn: left out, with any others due meanwhile, as if they
                    // had fallen in that turn.
                    let mut t = next;
                    while t <= now {
                        let after = t + self.draw_gap();
                        t = self.in_turn(target, after);
                    }
                    self.conns[i].next = t;
                    if self.conns[i].next < self.end {
                        earliest = earlier(earliest, self.conns[i].next);
                    }
                    continue;
                }
                if now - next > LATE {
                    tally.late_sends += 1;
                }
                let after = next + self.draw_gap();
                self.conns[i].next = self.in_turn(target, after);
                let requests = &requests[target];
                let request = &requests[self.rng.random_range(0..requests.len())];
                if self.send(i, request, tally)? {
                    busy = true;
                } else if self.conns[i].next < self.end {
                    earliest = earlier(earliest, self.conns[i].next);
                }
            }
            if !busy && earliest.is_none() {
                return Ok(());
            }
            if let Some(at) = earliest
                && self.armed != Some(at)
            {
                self.arm(at.saturating_duration_since(Instant::now()))?;
                self.armed = Some(at);
            }
            // The timer wakes the loop for sends; 100 ms bounds the wait for timeouts.
            // SAFETY: `events` is a valid buffer of the length passed.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    100,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                bail!("epoll_wait: {e}");
            }
            for ev in &events[..n as usize] {
                let token = ev.u64;
                if token == TIMER_TOKEN {
                    self.armed = None;
                    let mut expirations = [0u8; 8];
                    // SAFETY: reads at most 8 bytes into an 8-byte buffer.
                    let _ = unsafe {
                        libc::read(self.timer.as_raw_fd(), expirations.as_mut_ptr().cast(), 8)
                    };
                } else {
                    let i = token as usize;
                    self.on_readable(i, &mut tallies[self.conns[i].target]);
                }
            }
        }
    }

    /// Connects when needed and writes the request; false when the connection failed.
    fn send(&mut self, i: usize, request: &[u8], tally: &mut Tally) -> anyhow::Result<bool> {
        let addr = self.addrs[self.conns[i].target];
        let stream = match &mut self.conns[i].stream {
            Some(stream) => stream,
            slot @ None => {
                let Ok(stream) = TcpStream::connect(addr) else {
                    tally.errors.connect += 1;
                    return Ok(false);
                };
                stream.set_nodelay(true)?;
                stream.set_nonblocking(true)?;
                watch(
                    &self.epoll,
                    stream.as_raw_fd(),
                    i as u64,
                    libc::EPOLL_CTL_ADD,
                )?;
                slot.insert(stream)
            }
        };
        // Timed from before the write, as wrk does: the write itself may run the whole
        // loopback exchange before it returns.
        let sent = Instant::now();
        // One write: the request is small and the socket's buffer empty (a short write
        // would mean the server stopped reading; it counts as an error).
        if !matches!(stream.write(request), Ok(n) if n == request.len()) {
            tally.errors.write += 1;
            self.close(i);
            return Ok(false);
        }
        let conn = &mut self.conns[i];
        conn.in_flight = Some(sent);
        conn.filled = 0;
        Ok(true)
    }

    /// Reads what arrived (level-triggered: what is left is reported again) and, once the
    /// response is whole, records it. Stops reading at a whole response, which saves the
    /// read that would only say "nothing more".
    fn on_readable(&mut self, i: usize, tally: &mut Tally) {
        let conn = &mut self.conns[i];
        let Some(stream) = conn.stream.as_mut() else {
            return;
        };
        let parsed = loop {
            if conn.filled == conn.buf.len() {
                let grown = conn.buf.len() * 2;
                conn.buf.resize(grown, 0);
            }
            match stream.read(&mut conn.buf[conn.filled..]) {
                Ok(0) => {
                    if conn.in_flight.is_some() {
                        tally.errors.read += 1;
                    }
                    self.close(i);
                    return;
                }
                Ok(n) => conn.filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    tally.errors.read += 1;
                    self.close(i);
                    return;
                }
            }
            match parse_response(&conn.buf[..conn.filled]) {
                Parsed::Partial => {}
                done => break done,
            }
        };
        let (Some(sent), Parsed::Complete(response)) = (conn.in_flight, parsed) else {
            // Invalid, or bytes with no request out: the server misbehaves.
            tally.errors.read += 1;
            self.close(i);
            return;
        };
        let us = sent.elapsed().as_micros();
        tally
            .latencies_us
            .push(u32::try_from(us).unwrap_or(u32::MAX));
        tally.bytes += response.len as u64;
        if !(200..300).contains(&response.status) {
            tally.errors.status += 1;
        }
        conn.in_flight = None;
        // One request at a time: bytes past this response would be a protocol error.
        if !response.keep_alive || response.len != conn.filled {
            tally.errors.read += u64::from(response.len != conn.filled);
            self.close(i);
        }
    }

    fn close(&mut self, i: usize) {
        let conn = &mut self.conns[i];
        if let Some(stream) = conn.stream.take() {
            let _ = watch(
                &self.epoll,
                stream.as_raw_fd(),
                i as u64,
                libc::EPOLL_CTL_DEL,
            );
        }
        conn.in_flight = None;
        conn.filled = 0;
    }

    /// Arms the timer to fire once, `after` from now (at least 1 ns: zero would disarm it).
    fn arm(&self, after: Duration) -> anyhow::Result<()> {
        let after = after.max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: libc::c_long::from(after.subsec_nanos() as i32),
            },
        };
        // SAFETY: valid descriptor and itimerspec; the old value is not asked for.
        let rc = unsafe {
            libc::timerfd_settime(self.timer.as_raw_fd(), 0, &spec, std::ptr::null_mut())
        };
        anyhow::ensure!(
            rc == 0,
            "timerfd_settime: {}",
            std::io::Error::last_os_error()
        );
        Ok(())
    }
}

/// Adds (or removes) `fd` to the epoll set for reads (level-triggered), tagged `token`.
fn watch(epoll: &OwnedFd, fd: RawFd, token: u64, op: libc::c_int) -> anyhow::Result<()> {
    let mut event = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
        u64: token,
    };
    // SAFETY: valid descriptors and a valid event struct.
    let rc = unsafe { libc::epoll_ctl(epoll.as_raw_fd(), op, fd, &mut event) };
    anyhow::ensure!(rc == 0, "epoll_ctl: {}", std::io::Error::last_os_error());
    Ok(())
}

/// A whole response at the start of a buffer.
#[derive(Debug, PartialEq)]
struct Response {
    status: u16,
    /// Head and body, in bytes.
    len: usize,
    keep_alive: bool,
}

#[derive(Debug, PartialEq)]
enum Parsed {
    Complete(Response),
    Partial,
    Invalid,
}

/// Parses one response: head, then a `content-length` or chunked body. A response framed
/// by closing the connection is not supported (the bench's servers never send one).
fn parse_response(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut head = httparse::Response::new(&mut headers);
    let head_len = match head.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Invalid,
    };
    let mut length = None;
    let mut chunked = false;
    let mut keep_alive = true;
    for h in head.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            match std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
            {
                Some(n) => length = Some(n),
                None => return Parsed::Invalid,
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = h.value.eq_ignore_ascii_case(b"chunked");
        } else if h.name.eq_ignore_ascii_case("connection") {
            keep_alive = !h.value.eq_ignore_ascii_case(b"close");
        }
    }
    let status = head.code.unwrap_or(0);
    let body_len = if chunked {
        match chunked_end(&buf[head_len..]) {
            ChunkScan::Done(n) => n,
            ChunkScan::Partial => return Parsed::Partial,
            ChunkScan::Invalid => return Parsed::Invalid,
        }
    } else if let Some(n) = length {
        if buf.len() - head_len < n {
            return Parsed::Partial;
        }
        n
    } else if status == 204 || status == 304 || status < 200 {
        0
    } else {
        return Parsed::Invalid;
    };
    Parsed::Complete(Response {
        status,
        len: head_len + body_len,
        keep_alive,
    })
}

enum ChunkScan {
    /// The body ends `n` bytes in (after the last chunk and its CRLF).
    Done(usize),
    /// More bytes are needed.
    Partial,
    Invalid,
}

/// Walks whole chunks of a chunked body (no trailers: the bench's servers send none).
fn chunked_end(data: &[u8]) -> ChunkScan {
    let mut at = 0;
    loop {
        let Some(line_end) = memchr::memmem::find(&data[at..], b"\r\n") else {
            return ChunkScan::Partial;
        };
        let size_field = &data[at..at + line_end];
        let size_field = match memchr::memchr(b';', size_field) {
            Some(semi) => &size_field[..semi],
            None => size_field,
        };
        let Some(size) = std::str::from_utf8(size_field)
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
        else {
            return ChunkScan::Invalid;
        };
        let chunk_end = at + line_end + 2 + size + 2;
        if data.len() < chunk_end {
            return ChunkScan::Partial;
        }
        if &data[chunk_end - 2..chunk_end] != b"\r\n" {
            return ChunkScan::Invalid;
        }
        if size == 0 {
            return ChunkScan::Done(chunk_end);
        }
        at = chunk_end;
    }
}

/// The `LOADJSON` line of one target (sorts the latencies).
fn report(all: &mut Tally, duration_us: u128, addr: SocketAddr) -> String {
    let lat = &mut all.latencies_us;
    lat.sort_unstable();
    let pct = |p: f64| -> u32 {
        if lat.is_empty() {
            return 0;
        }
        let rank = ((p / 100.0) * lat.len() as f64).ceil() as usize;
        lat[rank.clamp(1, lat.len()) - 1]
    };
    let n = lat.len() as f64;
    let mean = if lat.is_empty() {
        0.0
    } else {
        lat.iter().map(|&v| f64::from(v)).sum::<f64>() / n
    };
    let stdev = if lat.len() < 2 {
        0.0
    } else {
        (lat.iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / (n - 1.0))
            .sqrt()
    };
    let e = all.errors;
    format!(
        concat!(
            r#"LOADJSON {{"addr":"{}","requests":{},"duration_us":{},"bytes":{},"late_sends":{},"#,
            r#""errors":{{"connect":{},"read":{},"write":{},"status":{},"timeout":{}}},"#,
            r#""latency_us":{{"min":{},"mean":{:.1},"max":{},"stdev":{:.1},"#,
            r#""p50":{},"p90":{},"p99":{},"p999":{}}}}}"#
        ),
        addr,
        lat.len(),
        duration_us,
        all.bytes,
        all.late_sends,
        e.connect,
        e.read,
        e.write,
        e.status,
        e.timeout,
        lat.first().copied().unwrap_or(0),
        mean,
        lat.last().copied().unwrap_or(0),
        stdev,
        pct(50.0),
        pct(90.0),
        pct(99.0),
        pct(99.9),
    )
}

/// The earlier of `a` (when there is one) and `b`.
fn earlier(a: Option<Instant>, b: Instant) -> Option<Instant> {
    Some(a.map_or(b, |a| a.min(b)))
}

/// An exponentially distributed sample with mean 1.
fn exponential(rng: &mut StdRng) -> f64 {
    // `random` is in [0, 1): 1 - it is in (0, 1], whose logarithm is finite.
    -(1.0 - rng.random::<f64>()).ln()
}

/// Sleeps end within `ns` of their deadline instead of Linux's default 50 µs slack.
fn set_timer_slack_ns(ns: u64) {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and touches no memory.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, ns as libc::c_ulong);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = ns;
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
        transfer-encoding: chunked\r\n\r\n\
        6\r\ndata: \r\n18;ext=1\r\n{\"choices\":[]}\n\n[DONE]\n\n\r\n0\r\n\r\n";

    #[test]
    fn content_length_response_is_whole_only_with_its_body() {
        let whole = b"HTTP/1.1 201 Created\r\ncontent-length: 5\r\n\r\nhello";
        for cut in 0..whole.len() {
            assert_eq!(
                parse_response(&whole[..cut]),
                Parsed::Partial,
                "cut at {cut}"
            );
        }
        let expected = Response {
            status: 201,
            len: whole.len(),
            keep_alive: true,
        };
        assert_eq!(parse_response(whole), Parsed::Complete(expected));
    }

    #[test]
    fn chunked_response_ends_at_the_last_chunk_wherever_it_is_cut() {
        for cut in 0..CHUNKED.len() {
            assert_eq!(
                parse_response(&CHUNKED[..cut]),
                Parsed::Partial,
                "cut at {cut}"
            );
        }
        let Parsed::Complete(r) = parse_response(CHUNKED) else {
            panic!("not complete");
        };
        assert_eq!((r.status, r.len, r.keep_alive), (200, CHUNKED.len(), true));
        // Bytes after the response are not part of it (the caller treats them as an error).
        let mut more = CHUNKED.to_vec();
        more.extend_from_slice(b"HTTP/1.1");
        assert_eq!(parse_response(&more), Parsed::Complete(r));
    }

    #[test]
    fn bad_framing_and_connection_close_are_reported() {
        let bad_size = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n";
        assert_eq!(parse_response(bad_size), Parsed::Invalid);
        let bad_end = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabXY0\r\n\r\n";
        assert_eq!(parse_response(bad_end), Parsed::Invalid);
        let no_length = b"HTTP/1.1 200 OK\r\n\r\nbody";
        assert_eq!(parse_response(no_length), Parsed::Invalid);
        assert_eq!(parse_response(b"SMTP ready\r\n\r\n"), Parsed::Invalid);
        let closing =
            b"HTTP/1.1 429 Too Many Requests\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
        let expected = Response {
            status: 429,
            len: closing.len(),
            keep_alive: false,
        };
        assert_eq!(parse_response(closing), Parsed::Complete(expected));
    }

    #[test]
    fn targets_take_turns_and_each_owns_its_share_of_the_time() {
        let start = Instant::now();
        let turns = Turns {
            start,
            epoch: Duration::from_millis(200),
            n: 2,
        };
        let at = |ms| start + Duration::from_millis(ms);
        for n in 1..=4 {
            let turns = Turns { n, ..turns };
            // Every cycle of n turns gives each target one.
            for cycle in 0..50 {
                let mut seen: Vec<usize> = (0..n)
                    .map(|slot| turns.owner(at(200 * (cycle * n as u64 + slot as u64))))
                    .collect();
                seen.sort_unstable();
                assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n {n}, cycle {cycle}");
            }
            // Owned time agrees with the owner, counted millisecond by millisecond, for spans
            // that end in the middle of a cycle.
            for span_ms in [0, 150, 1100, 1999, 2345] {
                let mut counted = vec![0u64; n];
                for ms in 0..span_ms {
                    counted[turns.owner(at(ms))] += 1;
                }
                let span = Duration::from_millis(span_ms);
                let owned: Vec<u64> = (0..n)
                    .map(|k| turns.owned_time(k, span).as_millis() as u64)
                    .collect();
                assert_eq!(owned, counted, "n {n}, span {span_ms} ms");
            }
        }
        // Three targets: each one takes over from each of the others, about equally often.
        let three = Turns { n: 3, ..turns };
        let order: Vec<usize> = (0..600).map(|i| three.owner(at(200 * i))).collect();
        let mut follows = [[0u32; 3]; 3];
        for w in order.windows(2) {
            follows[w[1]][w[0]] += 1;
        }
        for (k, before) in follows.iter().enumerate() {
            for (j, &count) in before.iter().enumerate() {
                if j != k {
                    assert!(
                        count >= 60,
                        "target {k} follows {j} {count} times: {follows:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn each_target_gets_the_rate_within_its_own_turns_only() {
        let args = Args::parse_from([
            "tollgate-loadgen",
            "--addr",
            "127.0.0.1:1",
            "--addr",
            "127.0.0.1:2",
            "--rate",
            "2000",
            "--connections",
            "4",
            "--duration-s",
            "20",
            "--epoch-ms",
            "100",
        ]);
        let start = Instant::now();
        let mut run = Run::new(&args, start).unwrap();
        let conns: Vec<(usize, Instant)> = run.conns.iter().map(|c| (c.target, c.next)).collect();
        assert_eq!(conns.len(), 8);
        let mut sends = [0u32; 2];
        for (target, mut t) in conns {
            while t < run.end {
                assert_eq!(run.turns.owner(t), target, "a send outside its turn");
                sends[target] += 1;
                let after = t + run.draw_gap();
                t = run.in_turn(target, after);
            }
        }
        // 2000/s for the 10 s that are each target's: 20,000 sends each, give or take the
        // Poisson noise (sd ~140).
        for (target, n) in sends.iter().enumerate() {
            assert!((19_300..=20_700).contains(n), "target {target}: {n} sends");
        }
    }

    #[test]
    fn exponential_gaps_average_one() {
        let mut rng = StdRng::seed_from_u64(7);
        let n = 100_000;
        let mean = (0..n).map(|_| exponential(&mut rng)).sum::<f64>() / f64::from(n);
        assert!((mean - 1.0).abs() < 0.02, "mean {mean}");
    }
}
