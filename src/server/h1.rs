//! The client-facing HTTP/1.1 connection: one task per connection reads a request head
//! (`httparse`), runs the handler in the same task, writes the response (head and first body
//! bytes in one write, chunked or length-delimited), and goes round again. hyper's server,
//! which this replaces, hands every request body across a channel to the handler, runs a
//! dispatcher state machine and an encoder around each message, and buffers writes through
//! its own queue: about 14 k of the 55 k instructions of a proxied chat request.
//!
//! What it keeps of HTTP/1.1 (RFC 9112): keep-alive (HTTP/1.0 only when asked for),
//! pipelined requests (answered in order, one at a time), `Expect: 100-continue` (answered
//! when the handler first reads the body), content-length and chunked request bodies, and
//! request smuggling defences (a length together with chunked, conflicting lengths, or a
//! transfer coding other than chunked last are refused). The handler reads the body as an
//! [`http_body::Body`] ([`RequestBody`]) straight off the socket; a body it leaves unread is
//! read and discarded after the response (up to [`MAX_DRAIN_BYTES`]), or the connection
//! closes. While the handler runs and while a response waits for its next bytes, a client
//! that closes its connection is noticed: the handler (or the response body) is dropped,
//! which is how the meter learns that the client went away.

use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::Activity;
use crate::config::Dialect;
use crate::http_client::{ChunkState, UpstreamError};
use crate::provider::{Endpoint, ErrorKind};

/// Spare room kept in the read buffer before each read.
const READ_BUFFER_BYTES: usize = 8 * 1024;
/// Longest request head accepted (431 beyond it). nginx's default allows 4 × 8 KiB.
pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header fields in a request head (hyper's default too; 431 beyond it).
const MAX_HEADERS: usize = 100;
/// Bytes of a request body left unread by the handler that are read and discarded to keep
/// the connection; past this, the connection closes after the response.
pub(crate) const MAX_DRAIN_BYTES: u64 = 1024 * 1024;
/// Response body frames up to this size are copied behind the head or the previous frame,
/// so that what is ready leaves in one write; larger ones are written from where they are.
const COPY_FRAME_BYTES: usize = 16 * 1024;
/// Response bytes gathered, at most, before they are written.
const MAX_OUT_BYTES: usize = 64 * 1024;
/// Pipelined bytes read ahead while a response is in progress, at most (to notice the
/// client's end of the connection); past this, reading waits for the response to finish.
const MAX_READ_AHEAD_BYTES: usize = 64 * 1024;
/// How long a connection closed with request bytes still coming keeps reading (and
/// discarding) them, so that the kernel does not answer them with a reset that could
/// destroy the response before the client reads it.
const LINGER: Duration = Duration::from_secs(2);
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// What a connection shares with the request body it lends the handler.
pub(super) struct Shared {
    pub(super) stream: TcpStream,
    pub(super) activity: Activity,
    /// The body was read to its end (its leftover bytes, if any, in `leftover`).
    body_done: AtomicBool,
    /// Bytes the body still had to read when it was dropped unfinished.
    body_unread: AtomicU64,
    /// Bytes read past a chunked body's end (the next pipelined request).
    leftover: Mutex<Option<Bytes>>,
}

impl Shared {
    pub(super) fn new(stream: TcpStream) -> Arc<Self> {
        Arc::new(Self {
            stream,
            activity: Activity::default(),
            body_done: AtomicBool::new(false),
            body_unread: AtomicU64::new(u64::MAX),
            leftover: Mutex::new(None),
        })
    }

    /// Reads what the socket has into `buf`; `Ok(0)` at the client's end.
    fn poll_read(&self, cx: &mut Context<'_>, buf: &mut BytesMut) -> Poll<io::Result<usize>> {
        if buf.capacity() - buf.len() < READ_BUFFER_BYTES / 2 {
            buf.reserve(READ_BUFFER_BYTES);
        }
        loop {
            ready!(self.stream.poll_read_ready(cx))?;
            match self.stream.try_read_buf(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    /// Writes from `bufs` (advancing past what went out) until all is written.
    fn poll_write_all(&self, cx: &mut Context<'_>, bufs: &mut [&[u8]]) -> Poll<io::Result<()>> {
        loop {
            let mut slices = [IoSlice::new(&[]); 2];
            let mut n = 0;
            for b in bufs.iter().filter(|b| !b.is_empty()) {
                if n < slices.len() {
                    slices[n] = IoSlice::new(b);
                    n += 1;
                }
            }
            if n == 0 {
                self.activity.set_waiting(false);
                return Poll::Ready(Ok(()));
            }
            if self.stream.poll_write_ready(cx)?.is_pending() {
                // The client is not reading: the idle check may end the connection.
                self.activity.set_waiting(true);
                return Poll::Pending;
            }
            let mut written = match self.stream.try_write_vectored(&slices[..n]) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            };
            let total = self.activity.written.load(Ordering::Relaxed);
            self.activity
                .written
                .store(total + written as u64, Ordering::Relaxed);
            for b in bufs.iter_mut() {
                let used = written.min(b.len());
                *b = &b[used..];
                written -= used;
            }
        }
    }
}

/// Why a body read failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BodyError(String);

/// A request body, read from the client's connection as the handler polls it. A poll that
/// finds no bytes marks the connection as waiting on the client (the idle check cuts a wait
/// of a whole period), so a handler that stops polling it must drop it, not hold it.
pub struct RequestBody {
    /// Body bytes that arrived with the head.
    first: Option<Bytes>,
    /// The rest, still on the wire; `None` once all is read.
    wire: Option<Box<Wire>>,
}

struct Wire {
    shared: Arc<Shared>,
    framing: WireFraming,
    /// Bytes of `100 Continue` still to write before the body is read.
    continue_left: usize,
    buf: BytesMut,
}

enum WireFraming {
    /// This many bytes still to come.
    Length(u64),
    Chunked(ChunkState),
    /// The chunked body's end was read.
    Ended,
}

impl RequestBody {
    /// A body with nothing in it.
    pub fn empty() -> Self {
        Self {
            first: None,
            wire: None,
        }
    }

    fn read_length(wire: &mut Wire, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, String>>> {
        let WireFraming::Length(left) = &mut wire.framing else {
            unreachable!()
        };
        if *left == 0 {
            return Poll::Ready(None);
        }
        let want = usize::try_from(*left).map_or(64 * 1024, |l| l.min(64 * 1024));
        wire.buf.reserve(want);
        loop {
            if let Err(e) = ready!(wire.shared.stream.poll_read_ready(cx)) {
                return Poll::Ready(Some(Err(format!("reading the request body: {e}"))));
            }
            match wire
                .shared
                .stream
                .try_read_buf(&mut (&mut wire.buf).limit(want))
            {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Some(Err(format!("reading the request body: {e}")))),
                Ok(0) => {
                    return Poll::Ready(Some(Err(format!(
                        "the client closed the connection with {left} bytes of the request \
                         body still to send"
                    ))));
                }
                Ok(n) => {
                    *left -= n as u64;
                    wire.shared.activity.add_read(n);
                    // A small read is copied out, so that the frame the handler may keep
                    // does not hold the whole buffer; the buffer is reused.
                    let data = if n * 2 < wire.buf.capacity() {
                        let data = Bytes::copy_from_slice(&wire.buf);
                        wire.buf.clear();
                        data
                    } else {
                        wire.buf.split().freeze()
                    };
                    return Poll::Ready(Some(Ok(data)));
                }
            }
        }
    }

    fn read_chunked(wire: &mut Wire, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, String>>> {
        let Wire {
            shared,
            framing,
            buf,
            ..
        } = wire;
        let WireFraming::Chunked(state) = framing else {
            unreachable!()
        };
        let mut out = BytesMut::new();
        loop {
            let (used, done) = match state.decode(buf, &mut out) {
                Ok(r) => r,
                Err(UpstreamError::Malformed(m)) => {
                    return Poll::Ready(Some(Err(format!("malformed chunked request body: {m}"))));
                }
                Err(e) => return Poll::Ready(Some(Err(e.to_string()))),
            };
            buf.advance(used);
            if done {
                *framing = WireFraming::Ended;
                // What follows the body is the next request's.
                let rest = buf.split().freeze();
                if !rest.is_empty() {
                    *shared.leftover.lock().unwrap_or_else(|p| p.into_inner()) = Some(rest);
                }
                return Poll::Ready(if out.is_empty() {
                    None
                } else {
                    Some(Ok(out.freeze()))
                });
            }
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(out.freeze())));
            }
            // Undecoded bytes stay bounded: the decoder refuses size lines over 4 KiB and
            // trailers over 16 KiB.
            match ready!(shared.poll_read(cx, buf)) {
                Ok(0) => {
                    return Poll::Ready(Some(Err(
                        "the client closed the connection before the end of the chunked \
                         request body"
                            .into(),
                    )));
                }
                Ok(n) => shared.activity.add_read(n),
                Err(e) => return Poll::Ready(Some(Err(format!("reading the request body: {e}")))),
            }
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        let Some(wire) = this.wire.as_deref_mut() else {
            return Poll::Ready(None);
        };
        while wire.continue_left > 0 {
            let mut rest = [&CONTINUE[CONTINUE.len() - wire.continue_left..]];
            let before = rest[0].len();
            let r = wire.shared.poll_write_all(cx, &mut rest);
            wire.continue_left -= before - rest[0].len();
            match r {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Some(Err(BodyError(format!("writing 100 Continue: {e}")))));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        let read = match wire.framing {
            WireFraming::Length(_) => Self::read_length(wire, cx),
            WireFraming::Chunked(_) => Self::read_chunked(wire, cx),
            WireFraming::Ended => Poll::Ready(None),
        };
        // Waiting for body bytes the client has not sent: the idle check may end it.
        wire.shared.activity.set_waiting(read.is_pending());
        let read = ready!(read);
        let finished = match &read {
            None => true,
            Some(Ok(_)) => matches!(wire.framing, WireFraming::Length(0) | WireFraming::Ended),
            Some(Err(_)) => false,
        };
        if finished {
            if let Some(wire) = this.wire.take() {
                wire.shared.body_done.store(true, Ordering::Release);
            }
        }
        Poll::Ready(read.map(|r| r.map(Frame::data).map_err(BodyError)))
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.wire.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let first = self.first.as_ref().map_or(0, |b| b.len() as u64);
        match self.wire.as_deref().map(|w| &w.framing) {
            None => SizeHint::with_exact(first),
            Some(WireFraming::Length(left)) => SizeHint::with_exact(first + left),
            Some(WireFraming::Ended) => SizeHint::with_exact(first),
            Some(WireFraming::Chunked(_)) => {
                let mut hint = SizeHint::new();
                hint.set_lower(first);
                hint
            }
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if let Some(wire) = &self.wire {
            wire.shared.activity.set_waiting(false);
            let unread = match wire.framing {
                WireFraming::Length(left) if wire.continue_left == 0 => left,
                // Chunked, or the client still waits for 100 Continue: not drained.
                _ => u64::MAX,
            };
            wire.shared.body_unread.store(unread, Ordering::Relaxed);
        }
    }
}

/// A request head refused before the handler sees it.
struct Refused {
    status: StatusCode,
    message: String,
}

impl Refused {
    fn bad(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

/// Where a parsed request head's parts are in the read buffer (offsets, so that the
/// buffer can be frozen and shared by the request's values: no copy per field).
struct Head {
    len: usize,
    method: Method,
    target: (u32, u32),
    version: Version,
}

/// A header field's name and value, as offset and length in the head.
type FieldAt = (u32, u32, u32, u32);

/// What a request head's fields say, read into a map.
struct Fields {
    headers: HeaderMap,
    /// `content-length`.
    length: Option<u64>,
    chunked: bool,
    keep_alive: bool,
    expect_continue: bool,
}

/// Reads the fields found at `fields` in `data` (a frozen head: values share it), refusing
/// framing that is ambiguous or not supported.
#[inline(always)] // once per request, on its hot path: returning `Fields` by value costs a copy
fn read_fields(fields: &[FieldAt], data: &Bytes, http10: bool) -> Result<Fields, Refused> {
    let slice = |at: u32, len: u32| data.slice(at as usize..(at + len) as usize);
    let mut keep_alive = !http10;
    let mut framing = None;
    let mut chunked = false;
    let mut expect_continue = false;
    let mut headers = HeaderMap::with_capacity(fields.len());
    for &(name_at, name_len, value_at, value_len) in fields {
        let name = HeaderName::from_bytes(&data[name_at as usize..(name_at + name_len) as usize])
            .map_err(|_| Refused::bad("malformed header name"))?;
        // httparse admits what a header value may hold (no control bytes but tab).
        let value = HeaderValue::from_maybe_shared(slice(value_at, value_len))
            .map_err(|_| Refused::bad(format!("malformed value of header `{name}`")))?;
        let bytes = value.as_bytes();
        if name == header::CONTENT_LENGTH {
            for part in bytes.split(|&b| b == b',') {
                let n = std::str::from_utf8(part.trim_ascii())
                    .ok()
                    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| Refused::bad("malformed content-length"))?;
                if framing.is_some_and(|l| l != n) {
                    return Err(Refused::bad("conflicting content-lengths"));
                }
                framing = Some(n);
            }
        } else if name == header::TRANSFER_ENCODING {
            if http10 {
                return Err(Refused::bad("transfer-encoding in an HTTP/1.0 request"));
            }
            // Chunked must be the last coding, and nothing may follow it.
            for coding in bytes.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if chunked {
                    return Err(Refused::bad("a transfer coding after chunked"));
                }
                chunked = coding.eq_ignore_ascii_case(b"chunked");
                if !chunked {
                    return Err(Refused {
                        status: StatusCode::NOT_IMPLEMENTED,
                        message: "request bodies may only be chunked, not otherwise \
                                  transfer-coded"
                            .into(),
                    });
                }
            }
        } else if name == header::CONNECTION {
            for token in bytes.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && http10 {
                    keep_alive = true;
                }
            }
        } else if name == header::EXPECT {
            if bytes.eq_ignore_ascii_case(b"100-continue") {
                expect_continue = !http10;
            } else {
                return Err(Refused {
                    status: StatusCode::EXPECTATION_FAILED,
                    message: "the only expectation met is 100-continue".into(),
                });
            }
        }
        headers.append(name, value);
    }
    if chunked && framing.is_some() {
        return Err(Refused::bad(
            "both content-length and transfer-encoding (a request smuggling pattern)",
        ));
    }
    Ok(Fields {
        headers,
        length: framing,
        chunked,
        keep_alive,
        expect_continue,
    })
}

impl Head {
    /// Parses a whole head at the start of `buf`, leaving where its fields are in `at`;
    /// `None` when more bytes are needed.
    fn parse(buf: &[u8], at: &mut Vec<FieldAt>) -> Result<Option<Head>, Refused> {
        let mut fields = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
            &mut parsed,
            buf,
            &mut fields,
        ) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Refused {
                    status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    message: format!("more than {MAX_HEADERS} header fields"),
                });
            }
            Err(httparse::Error::Version) => {
                return Err(Refused {
                    status: StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                    message: "only HTTP/1.0 and HTTP/1.1 are served here".into(),
                });
            }
            Err(e) => return Err(Refused::bad(format!("malformed request head: {e}"))),
        };
        let base = buf.as_ptr() as usize;
        // The head is under MAX_HEAD_BYTES (64 KiB), so offsets fit in u32.
        let offset = |s: &[u8]| (s.as_ptr() as usize - base) as u32;
        let head = Head {
            len,
            method: Method::from_bytes(parsed.method.unwrap_or("").as_bytes())
                .map_err(|_| Refused::bad("malformed request method"))?,
            target: parsed
                .path
                .map_or((0, 0), |p| (offset(p.as_bytes()), p.len() as u32)),
            version: match parsed.version {
                Some(0) => Version::HTTP_10,
                _ => Version::HTTP_11,
            },
        };
        at.clear();
        at.extend(parsed.headers.iter().map(|field| {
            (
                offset(field.name.as_bytes()),
                field.name.len() as u32,
                offset(field.value),
                field.value.len() as u32,
            )
        }));
        Ok(Some(head))
    }
}

/// What the connection needs to know of the request it is answering.
struct Exchange {
    head_request: bool,
    /// HTTP/1.0 client (no chunked responses; keep-alive only when asked).
    http10: bool,
    keep_alive: bool,
    /// A body was still on the wire when the handler got the request.
    body_on_wire: bool,
}

/// One client connection.
pub(super) struct Conn<H> {
    shared: Arc<Shared>,
    handler: H,
    buf: BytesMut,
    out: Vec<u8>,
    /// Where the fields of the head being served are ([`Head::parse`]).
    fields: Vec<FieldAt>,
    /// How much of `buf` was looked at for a head's end.
    scanned: usize,
    /// The client closed its sending side with pipelined requests in `buf`.
    read_closed: bool,
    /// Heads parsed (or tried), for tests.
    #[cfg(test)]
    parses: usize,
}

impl<H, F, B> Conn<H>
where
    H: Fn(Request<RequestBody>) -> F,
    F: Future<Output = Response<B>>,
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display + Send,
{
    pub(super) fn new(shared: Arc<Shared>, handler: H) -> Self {
        Self {
            shared,
            handler,
            buf: BytesMut::with_capacity(READ_BUFFER_BYTES),
            out: Vec::with_capacity(1024),
            fields: Vec::with_capacity(32),
            scanned: 0,
            read_closed: false,
            #[cfg(test)]
            parses: 0,
        }
    }

    /// Serves requests until the client closes, a request says `close`, something breaks,
    /// or `drain` changes (the request in progress is finished first; an idle connection
    /// closes at once).
    pub(super) async fn run(mut self, mut drain: watch::Receiver<bool>) -> io::Result<()> {
        loop {
            // A head already buffered is served (its response says `close` when draining);
            // waiting for one, the connection closes when the drain starts.
            let head = tokio::select! {
                biased;
                head = std::future::poll_fn(|cx| self.poll_head(cx)) => head,
                _ = drain.changed() => return Ok(()),
            };
            let head = match head {
                Ok(Some(head)) => head,
                Ok(None) => return Ok(()),
                Err(refused) => {
                    self.started();
                    self.refuse(refused, None).await;
                    return Ok(());
                }
            };
            self.started();
            let (request, exchange) = match self.take_request(head) {
                Ok(r) => r,
                Err((refused, dialect)) => {
                    self.refuse(refused, dialect).await;
                    return Ok(());
                }
            };
            if !self.exchange(request, &exchange, &drain).await? {
                return Ok(());
            }
        }
    }

    /// Handles one request and writes its response; whether the connection goes on.
    async fn exchange(
        &mut self,
        request: Request<RequestBody>,
        exchange: &Exchange,
        drain: &watch::Receiver<bool>,
    ) -> io::Result<bool> {
        let mut watching = !exchange.body_on_wire;
        let response = {
            let mut handled = std::pin::pin!((self.handler)(request));
            std::future::poll_fn(|cx| {
                if let Poll::Ready(response) = handled.as_mut().poll(cx) {
                    return Poll::Ready(Some(response));
                }
                // Once the body is in, the client's end is watched.
                if !watching && self.shared.body_done.load(Ordering::Acquire) {
                    self.take_leftover();
                    watching = true;
                }
                if watching && client_gone(&self.shared, &mut self.buf, &mut self.read_closed, cx) {
                    return Poll::Ready(None);
                }
                Poll::Pending
            })
            .await
        };
        let Some(response) = response else {
            return Ok(false); // the client went away: the handler was dropped
        };
        // Draining (or the listener gone) by the time the response starts: it says `close`.
        let draining = drain.has_changed().unwrap_or(true);
        let mut keep_alive = exchange.keep_alive && !draining;
        let mut unread = 0;
        if exchange.body_on_wire {
            if self.shared.body_done.swap(false, Ordering::Acquire) {
                self.take_leftover();
                watching = true;
            } else {
                unread = self.shared.body_unread.swap(u64::MAX, Ordering::Relaxed);
                keep_alive &= unread <= MAX_DRAIN_BYTES;
            }
        }
        self.respond(response, exchange, &mut keep_alive, watching)
            .await?;
        if keep_alive {
            return Ok(unread == 0 || self.discard(unread).await);
        }
        if unread > 0 || self.input_pending() {
            self.linger().await;
        }
        Ok(false)
    }

    /// Reads until a whole head is buffered: where its parts are, `None` at a clean end (the
    /// client closed between requests), or what to refuse it with.
    fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Head>, Refused>> {
        loop {
            // Empty lines before a request line are skipped (RFC 9112 §2.2), once: left in
            // the buffer, they would make every read look like a head's end.
            let mut blank = 0;
            loop {
                match self.buf[blank..] {
                    [b'\n', ..] => blank += 1,
                    [b'\r', b'\n', ..] => blank += 2,
                    _ => break,
                }
            }
            if blank > 0 {
                self.buf.advance(blank);
                self.scanned = self.scanned.saturating_sub(blank);
            }
            if !self.buf.is_empty() {
                // Parsed when the first bytes come (to refuse what is not HTTP at once) and
                // when new bytes may end the head, not on every read of a head that trickles
                // in.
                let look = self.scanned == 0 || ends_head(&self.buf, self.scanned);
                self.scanned = self.buf.len();
                let head = if look {
                    #[cfg(test)]
                    {
                        self.parses += 1;
                    }
                    Head::parse(&self.buf, &mut self.fields)?
                } else {
                    None
                };
                if head.as_ref().map_or(self.buf.len(), |h| h.len) > MAX_HEAD_BYTES {
                    return Poll::Ready(Err(Refused {
                        status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                        message: format!("request head over {} KiB", MAX_HEAD_BYTES / 1024),
                    }));
                }
                if head.is_some() {
                    self.scanned = 0;
                    return Poll::Ready(Ok(head));
                }
            }
            match ready!(self.shared.poll_read(cx, &mut self.buf)) {
                Ok(0) | Err(_) => return Poll::Ready(Ok(None)),
                Ok(_) => {}
            }
        }
    }

    /// Builds the request whose head is buffered, taking its body's bytes.
    fn take_request(
        &mut self,
        head: Head,
    ) -> Result<(Request<RequestBody>, Exchange), (Refused, Option<Dialect>)> {
        let Head {
            len,
            method,
            target,
            version,
        } = head;
        let fields = &self.fields;
        let data = self.buf.split().freeze();
        let slice = |at: u32, len: u32| data.slice(at as usize..(at + len) as usize);
        let uri = Uri::from_maybe_shared(slice(target.0, target.1))
            .map_err(|e| (Refused::bad(format!("malformed request target: {e}")), None))?;

        let http10 = version == Version::HTTP_10;
        // A request refused for its fields is answered in the dialect of its path (worked
        // out only then).
        let Fields {
            headers,
            length: framing,
            chunked,
            keep_alive,
            expect_continue,
        } = read_fields(fields, &data, http10)
            .map_err(|refused| (refused, Endpoint::classify(&method, uri.path()).dialect()))?;

        // The body: what of it arrived with the head, and the rest on the wire.
        let rest = data.slice(len..);
        let mut body = RequestBody::empty();
        let mut pipelined = rest.clone();
        let on_wire = if chunked {
            pipelined = Bytes::new();
            Some((
                WireFraming::Chunked(ChunkState::Size),
                BytesMut::from(&rest[..]),
            ))
        } else {
            let length = framing.unwrap_or(0);
            let have = usize::try_from(length).map_or(rest.len(), |l| l.min(rest.len()));
            if have > 0 {
                body.first = Some(rest.slice(..have));
                pipelined = rest.slice(have..);
            }
            let left = length - have as u64;
            (left > 0).then(|| (WireFraming::Length(left), BytesMut::new()))
        };
        let body_on_wire = on_wire.is_some();
        if let Some((framing, buf)) = on_wire {
            let nothing_yet = buf.is_empty() && body.first.is_none();
            body.wire = Some(Box::new(Wire {
                shared: self.shared.clone(),
                framing,
                continue_left: if expect_continue && nothing_yet {
                    CONTINUE.len()
                } else {
                    0
                },
                buf,
            }));
        }
        if !pipelined.is_empty() {
            self.buf.extend_from_slice(&pipelined);
        }

        let mut request = Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.version_mut() = version;
        *request.headers_mut() = headers;
        let exchange = Exchange {
            head_request: request.method() == Method::HEAD,
            http10,
            keep_alive,
            body_on_wire,
        };
        Ok((request, exchange))
    }

    /// Bytes a chunked body read past its end go back in front of the read buffer.
    fn take_leftover(&mut self) {
        let leftover = self
            .shared
            .leftover
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(leftover) = leftover {
            let behind = self.buf.split();
            self.buf.extend_from_slice(&leftover);
            self.buf.extend_from_slice(&behind);
        }
    }

    /// Writes `response`; `keep_alive` is cleared when its framing ends the connection.
    /// `watching`: the request is all read, so the client's end can be watched while the
    /// body waits for more.
    async fn respond<B2>(
        &mut self,
        response: Response<B2>,
        exchange: &Exchange,
        keep_alive: &mut bool,
        watching: bool,
    ) -> io::Result<()>
    where
        B2: Body<Data = Bytes> + Unpin,
        B2::Error: std::fmt::Display + Send,
    {
        let (parts, mut body) = response.into_parts();
        let status = parts.status;
        let bodiless = exchange.head_request
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
        out.extend_from_slice(b"\r\n");
        // One pass over the headers: written, except the framing ones, which are read.
        let mut declared = None;
        let mut dated = false;
        for (name, value) in &parts.headers {
            if name == header::CONTENT_LENGTH {
                declared = value
                    .to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok());
            } else if name == header::CONNECTION {
                if value
                    .as_bytes()
                    .split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
                {
                    *keep_alive = false;
                }
            } else if name != header::TRANSFER_ENCODING {
                dated |= name == header::DATE;
                field(out, name.as_str().as_bytes(), value.as_bytes());
            }
        }
        let mut framing = if bodiless {
            Out::Length(0)
        } else if let Some(n) = declared.or_else(|| body.size_hint().exact()) {
            Out::Length(n)
        } else if exchange.http10 {
            *keep_alive = false;
            Out::ToEnd
        } else {
            Out::Chunked
        };
        // A HEAD response keeps the length the handler declared; others say what is sent.
        let length_field = match framing {
            Out::Length(_) if bodiless => declared.filter(|_| exchange.head_request),
            Out::Length(n) => Some(n),
            _ => None,
        };
        if let Some(n) = length_field {
            let mut digits = itoa::Buffer::new();
            field(out, b"content-length", digits.format(n).as_bytes());
        } else if framing == Out::Chunked {
            field(out, b"transfer-encoding", b"chunked");
        }
        if !dated {
            date::with(|d| field(out, b"date", d));
        }
        if !*keep_alive && !exchange.http10 {
            field(out, b"connection", b"close");
        } else if *keep_alive && exchange.http10 {
            field(out, b"connection", b"keep-alive");
        }
        out.extend_from_slice(b"\r\n");
        if bodiless {
            drop(body);
            self.finished();
            return self.flush(&[]).await;
        }

        loop {
            let step = std::future::poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
                Poll::Ready(frame) => Poll::Ready(Step::Frame(frame)),
                // Nothing more ready: send what is buffered before waiting.
                Poll::Pending if !self.out.is_empty() => Poll::Ready(Step::Flush),
                Poll::Pending
                    if watching
                        && client_gone(&self.shared, &mut self.buf, &mut self.read_closed, cx) =>
                {
                    Poll::Ready(Step::ClientGone)
                }
                Poll::Pending => Poll::Pending,
            })
            .await;
            let frame = match step {
                Step::Flush => {
                    self.flush(&[]).await?;
                    continue;
                }
                Step::ClientGone => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the client closed the connection",
                    ));
                }
                Step::Frame(frame) => frame,
            };
            match frame {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue; // trailers are not sent
                    };
                    if data.is_empty() {
                        continue;
                    }
                    match &mut framing {
                        Out::Length(left) => {
                            if data.len() as u64 > *left {
                                return Err(io::Error::other(
                                    "the response body is longer than its content-length",
                                ));
                            }
                            *left -= data.len() as u64;
                        }
                        Out::Chunked => {
                            let mut size = [0u8; 18];
                            self.out
                                .extend_from_slice(chunk_line(&mut size, data.len()));
                        }
                        Out::ToEnd => {}
                    }
                    if data.len() <= COPY_FRAME_BYTES {
                        self.out.extend_from_slice(&data);
                    } else {
                        self.flush(&data).await?;
                    }
                    if framing == Out::Chunked {
                        self.out.extend_from_slice(b"\r\n");
                    }
                    // A body whose frames are always ready is written as it goes.
                    if self.out.len() >= MAX_OUT_BYTES {
                        self.flush(&[]).await?;
                    }
                }
                Some(Err(e)) => {
                    // What went before reaches the client; the missing end tells it the
                    // response broke off.
                    self.finished();
                    let _ = self.flush(&[]).await;
                    return Err(io::Error::other(format!("response body: {e}")));
                }
                None => {
                    drop(body);
                    self.finished();
                    if let Out::Length(left) = framing
                        && left > 0
                    {
                        let _ = self.flush(&[]).await;
                        return Err(io::Error::other(
                            "the response body is shorter than its content-length",
                        ));
                    }
                    if framing == Out::Chunked {
                        self.out.extend_from_slice(b"0\r\n\r\n");
                    }
                    return self.flush(&[]).await;
                }
            }
        }
    }

    /// A request is in (or refused), for the idle check.
    fn started(&self) {
        let started = &self.shared.activity.started;
        started.store(started.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    /// A response is done with (its body ended or dropped), for the idle check.
    fn finished(&self) {
        let finished = &self.shared.activity.finished;
        finished.store(finished.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    /// Writes the buffered output, then `then`.
    async fn flush(&mut self, then: &[u8]) -> io::Result<()> {
        let mut bufs = [&self.out[..], then];
        std::future::poll_fn(|cx| self.shared.poll_write_all(cx, &mut bufs)).await?;
        self.out.clear();
        Ok(())
    }

    /// Reads and discards `unread` body bytes the handler left; whether the connection can
    /// go on.
    async fn discard(&mut self, mut unread: u64) -> bool {
        loop {
            // Some may have been read ahead already.
            let have = usize::try_from(unread).map_or(self.buf.len(), |u| u.min(self.buf.len()));
            self.buf.advance(have);
            unread -= have as u64;
            if unread == 0 {
                return true;
            }
            match std::future::poll_fn(|cx| self.shared.poll_read(cx, &mut self.buf)).await {
                Ok(0) | Err(_) => return false,
                Ok(_) => {}
            }
        }
    }

    /// Whether the client sent bytes that were not read (pipelined, or after its body), which
    /// would make the close a reset.
    fn input_pending(&self) -> bool {
        let mut byte = [MaybeUninit::uninit()];
        !self.buf.is_empty()
            || socket2::SockRef::from(&self.shared.stream)
                .peek(&mut byte)
                .is_ok_and(|n| n > 0)
    }

    /// Closes the sending side and reads (discarding) what the client still sends for a
    /// while, so that unread request bytes do not turn the close into a reset that destroys
    /// the response in flight.
    async fn linger(&mut self) {
        let _ = socket2::SockRef::from(&self.shared.stream).shutdown(std::net::Shutdown::Write);
        let _ = tokio::time::timeout(LINGER, async {
            let mut seen = 0;
            while seen < MAX_DRAIN_BYTES {
                self.buf.clear();
                match std::future::poll_fn(|cx| self.shared.poll_read(cx, &mut self.buf)).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen += n as u64,
                }
            }
        })
        .await;
    }

    /// Answers a request refused before it reached the handler, and ends the connection.
    async fn refuse(&mut self, refused: Refused, dialect: Option<Dialect>) {
        let body = refusal_body(&refused.message, dialect);
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(refused.status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(refused.status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        field(out, b"content-type", b"application/json");
        let mut digits = itoa::Buffer::new();
        field(out, b"content-length", digits.format(body.len()).as_bytes());
        date::with(|d| field(out, b"date", d));
        field(out, b"connection", b"close");
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&body);
        self.finished();
        if self.flush(&[]).await.is_ok() {
            self.linger().await;
        }
    }
}

/// Whether the client closed its end (or the connection broke). Reads ahead what it sends
/// meanwhile (a pipelined request), up to [`MAX_READ_AHEAD_BYTES`]. A client that closes
/// its sending side after pipelined requests still waits for their answers: that end is
/// noted in `read_closed` and not taken for the client going away.
fn client_gone(
    shared: &Shared,
    buf: &mut BytesMut,
    read_closed: &mut bool,
    cx: &mut Context<'_>,
) -> bool {
    while !*read_closed && buf.len() < MAX_READ_AHEAD_BYTES {
        match shared.poll_read(cx, buf) {
            Poll::Pending => return false,
            Poll::Ready(Ok(0)) if !buf.is_empty() => *read_closed = true,
            Poll::Ready(Ok(0) | Err(_)) => return true,
            Poll::Ready(Ok(_)) => {}
        }
    }
    false
}

/// Whether the bytes of `buf` from `from` on (and the three before them) hold an empty line:
/// the end of a head.
fn ends_head(buf: &[u8], from: usize) -> bool {
    let start = from.saturating_sub(3);
    memchr::memchr_iter(b'\n', &buf[start..]).any(|i| {
        let at = start + i;
        matches!(buf.get(at + 1), Some(b'\n'))
            || matches!(buf.get(at + 1..at + 3), Some([b'\r', b'\n']))
    })
}

/// What the response loop does next.
enum Step<F> {
    Frame(Option<F>),
    Flush,
    ClientGone,
}

/// How a response body is delimited on the wire.
#[derive(Clone, Copy, PartialEq)]
enum Out {
    /// This many bytes still to send.
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, no length known).
    ToEnd,
}

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A chunk's size line (`{len:x}\r\n`), written into `buf`.
fn chunk_line(buf: &mut [u8; 18], len: usize) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut at = 16;
    let mut n = len;
    loop {
        at -= 1;
        buf[at] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    buf[16] = b'\r';
    buf[17] = b'\n';
    &buf[at..]
}

/// The JSON body of a request refused by the connection: in the dialect of its path when it
/// names a provider endpoint, else shaped so that both OpenAI's (`error.message`) and
/// Anthropic's (`type: error`, `error.type`) clients read it.
fn refusal_body(message: &str, dialect: Option<Dialect>) -> Vec<u8> {
    if let Some(dialect) = dialect {
        return crate::provider::error_body(dialect, ErrorKind::InvalidRequest, message).to_vec();
    }
    serde_json::to_vec(&serde_json::json!({
        "type": "error",
        "error": {"type": "invalid_request_error", "message": message},
    }))
    .unwrap_or_default()
}

/// The `date` header's value, formatted once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
    }

    pub(super) fn with(f: impl FnOnce(&[u8])) {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with(|cached| {
            let mut cached = cached.borrow_mut();
            if cached.0 != second {
                let text = httpdate::fmt_http_date(now);
                if text.len() == 29 {
                    cached.1.copy_from_slice(text.as_bytes());
                    cached.0 = second;
                }
            }
            f(&cached.1);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[test]
    fn chunk_lines_are_lowercase_hex() {
        let mut buf = [0u8; 18];
        assert_eq!(chunk_line(&mut buf, 0), b"0\r\n");
        assert_eq!(chunk_line(&mut buf, 10), b"a\r\n");
        assert_eq!(chunk_line(&mut buf, 0x1f40), b"1f40\r\n");
        assert_eq!(chunk_line(&mut buf, usize::MAX), b"ffffffffffffffff\r\n");
    }

    #[test]
    fn the_date_is_an_imf_fixdate() {
        let mut got = Vec::new();
        date::with(|d| got.extend_from_slice(d));
        let text = String::from_utf8(got).unwrap();
        assert!(httpdate::parse_http_date(&text).is_ok(), "{text}");
        assert!(text.ends_with(" GMT"), "{text}");
    }

    /// A server whose handler answers by path:
    /// - `/echo`: the body read whole (`echo:` and the bytes), or `body error: ...` (400);
    /// - `/ignore`: `ignored`, the body left unread;
    /// - `/wait`: answers after 5 s; `dropped` counts the handlers dropped before that;
    /// - `/stream`: three chunks of unknown total length, 20 ms apart;
    /// - `/slow`: `slow`, after 300 ms;
    /// - `/flood`: [`FLOOD_FRAMES`] frames of 16 KiB, always ready; `polled` counts those
    ///   taken;
    /// - anything else: `ok`.
    struct Server {
        addr: SocketAddr,
        stop: watch::Sender<bool>,
        dropped: Arc<AtomicUsize>,
        polled: Arc<AtomicUsize>,
    }

    const FLOOD_FRAMES: usize = 4096;

    struct CountDrop(Arc<AtomicUsize>, bool);

    impl Drop for CountDrop {
        fn drop(&mut self) {
            if !self.1 {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    async fn server() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let dropped = Arc::new(AtomicUsize::new(0));
        let counter = dropped.clone();
        let polled = Arc::new(AtomicUsize::new(0));
        let flooded = polled.clone();
        super::super::spawn_listener(
            listener,
            Duration::from_secs(2),
            Duration::from_secs(30),
            stop_rx,
            move |req: Request<RequestBody>| {
                let counter = counter.clone();
                let flooded = flooded.clone();
                async move {
                    let text = |s: String| Full::new(Bytes::from(s)).boxed();
                    let (status, body) = match req.uri().path() {
                        "/echo" => match req.into_body().collect().await {
                            Ok(b) => {
                                let mut out = b"echo:".to_vec();
                                out.extend_from_slice(&b.to_bytes());
                                (200, Full::new(Bytes::from(out)).boxed())
                            }
                            Err(e) => (400, text(format!("body error: {e}"))),
                        },
                        "/ignore" => (200, text("ignored".into())),
                        "/wait" => {
                            let mut guard = CountDrop(counter, false);
                            tokio::time::sleep(Duration::from_secs(5)).await;
                            guard.1 = true;
                            (200, text("waited".into()))
                        }
                        "/stream" => {
                            let frames = futures::stream::iter(["one;", "two;", "three;"]).then(
                                |s| async move {
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                    Ok::<_, std::convert::Infallible>(Frame::data(
                                        Bytes::from_static(s.as_bytes()),
                                    ))
                                },
                            );
                            (200, BodyExt::boxed(http_body_util::StreamBody::new(frames)))
                        }
                        "/slow" => {
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            (200, text("slow".into()))
                        }
                        "/flood" => {
                            let frames = futures::stream::iter(0..FLOOD_FRAMES).map(move |_| {
                                flooded.fetch_add(1, Ordering::SeqCst);
                                Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(
                                    vec![b'f'; 16 * 1024],
                                )))
                            });
                            (200, BodyExt::boxed(http_body_util::StreamBody::new(frames)))
                        }
                        _ => (200, text("ok".into())),
                    };
                    let mut response = Response::new(body);
                    *response.status_mut() = StatusCode::from_u16(status).unwrap();
                    response
                }
            },
        );
        Server {
            addr,
            stop,
            dropped,
            polled,
        }
    }

    use futures::StreamExt;

    /// One response read off `conn`: status, headers (lower-case names) and body (length,
    /// chunked, or to the end when neither is given).
    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        }
    }

    async fn read_some(conn: &mut TcpStream, buf: &mut [u8]) -> usize {
        tokio::time::timeout(Duration::from_secs(5), conn.read(buf))
            .await
            .expect("reply in time")
            .unwrap_or(0)
    }

    /// Reads one response from `conn` (`pending` holds bytes read past the previous one).
    async fn read_reply(conn: &mut TcpStream, pending: &mut Vec<u8>, head_request: bool) -> Reply {
        let mut buf = [0u8; 4096];
        let (status, headers, len) = loop {
            let mut fields = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Response::new(&mut fields);
            if let httparse::Status::Complete(len) = parsed.parse(pending).unwrap() {
                let headers = parsed
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect::<Vec<_>>();
                break (parsed.code.unwrap(), headers, len);
            }
            let n = read_some(conn, &mut buf).await;
            assert!(
                n > 0,
                "closed before a whole head: {:?}",
                String::from_utf8_lossy(pending)
            );
            pending.extend_from_slice(&buf[..n]);
        };
        pending.drain(..len);
        let mut reply = Reply {
            status,
            headers,
            body: Vec::new(),
        };
        if head_request || status == 100 {
            return reply;
        }
        if let Some(length) = reply.header("content-length") {
            let length: usize = length.parse().unwrap();
            while pending.len() < length {
                let n = read_some(conn, &mut buf).await;
                assert!(n > 0, "closed in the body");
                pending.extend_from_slice(&buf[..n]);
            }
            reply.body = pending.drain(..length).collect();
        } else if reply.header("transfer-encoding") == Some("chunked") {
            let mut state = ChunkState::Size;
            let mut out = BytesMut::new();
            loop {
                let (used, done) = state.decode(pending, &mut out).unwrap();
                pending.drain(..used);
                reply.body.extend_from_slice(&out.split());
                if done {
                    break;
                }
                if used == 0 {
                    let n = read_some(conn, &mut buf).await;
                    assert!(n > 0, "closed in a chunked body");
                    pending.extend_from_slice(&buf[..n]);
                }
            }
        } else {
            loop {
                let n = read_some(conn, &mut buf).await;
                if n == 0 {
                    break;
                }
                pending.extend_from_slice(&buf[..n]);
            }
            reply.body = std::mem::take(pending);
        }
        reply
    }

    /// Whether the server closes `conn` within 3 s (reading nothing more).
    async fn closed(conn: &mut TcpStream) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(3), conn.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    async fn connect(s: &Server) -> TcpStream {
        TcpStream::connect(s.addr).await.unwrap()
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order() {
        let s = server().await;
        let mut conn = connect(&s).await;
        // A length-delimited body, a chunked one, and a GET, in one write.
        conn.write_all(
            b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n\r\nhello\
              POST /echo HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n\
              3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nx-trailer: 1\r\n\r\n\
              GET /plain HTTP/1.1\r\nhost: t\r\n\r\n",
        )
        .await
        .unwrap();
        let mut pending = Vec::new();
        let one = read_reply(&mut conn, &mut pending, false).await;
        let two = read_reply(&mut conn, &mut pending, false).await;
        let three = read_reply(&mut conn, &mut pending, false).await;
        assert_eq!(one.body, b"echo:hello");
        assert_eq!(two.body, b"echo:abcde");
        assert_eq!(three.body, b"ok");
        assert!(one.header("date").is_some());
        assert_eq!(one.header("content-length"), Some("10"));
        assert_eq!(one.header("connection"), None);
    }

    #[tokio::test]
    async fn a_body_arriving_in_pieces_is_read_whole() {
        let s = server().await;
        let mut conn = connect(&s).await;
        conn.write_all(b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 11\r\n\r\nhel")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        conn.write_all(b"lo ").await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        conn.write_all(b"world").await.unwrap();
        let mut pending = Vec::new();
        assert_eq!(
            read_reply(&mut conn, &mut pending, false).await.body,
            b"echo:hello world"
        );
        // Chunked, split inside a size line and inside the data.
        conn.write_all(b"POST /echo HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        conn.write_all(b"b\r\nhello ").await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        conn.write_all(b"world\r\n0\r\n\r\n").await.unwrap();
        assert_eq!(
            read_reply(&mut conn, &mut pending, false).await.body,
            b"echo:hello world"
        );
    }

    #[tokio::test]
    async fn expect_100_continue_is_answered_when_the_body_is_wanted() {
        let s = server().await;
        let mut conn = connect(&s).await;
        conn.write_all(
            b"POST /echo HTTP/1.1\r\nhost: t\r\nexpect: 100-continue\r\ncontent-length: 4\r\n\r\n",
        )
        .await
        .unwrap();
        let mut pending = Vec::new();
        let interim = read_reply(&mut conn, &mut pending, false).await;
        assert_eq!(interim.status, 100);
        conn.write_all(b"ping").await.unwrap();
        let reply = read_reply(&mut conn, &mut pending, false).await;
        assert_eq!(reply.body, b"echo:ping");

        // Not wanted: no 100, and the connection closes after the answer (the client
        // would otherwise send the body as the next request).
        conn.write_all(
            b"POST /ignore HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 4\r\n\r\n",
        )
        .await
        .unwrap();
        let reply = read_reply(&mut conn, &mut pending, false).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body, b"ignored");
        assert_eq!(reply.header("connection"), Some("close"));
        assert!(closed(&mut conn).await);
    }

    #[tokio::test]
    async fn an_unread_body_is_discarded_and_the_connection_kept() {
        let s = server().await;
        let mut conn = connect(&s).await;
        // The head alone first, so the body is still on the wire when the handler answers.
        conn.write_all(b"POST /ignore HTTP/1.1\r\ncontent-length: 20000\r\n\r\n")
            .await
            .unwrap();
        let mut pending = Vec::new();
        let reply = read_reply(&mut conn, &mut pending, false).await;
        assert_eq!(reply.body, b"ignored");
        assert_eq!(reply.header("connection"), None);
        conn.write_all(&[b'x'; 20000]).await.unwrap();
        conn.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert_eq!(read_reply(&mut conn, &mut pending, false).await.body, b"ok");
    }

    #[tokio::test]
    async fn an_unread_body_too_large_to_discard_closes_the_connection() {
        let s = server().await;
        let mut conn = connect(&s).await;
        let length = MAX_DRAIN_BYTES + 1;
        conn.write_all(
            format!("POST /ignore HTTP/1.1\r\ncontent-length: {length}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut pending = Vec::new();
        let reply = read_reply(&mut conn, &mut pending, false).await;
        assert_eq!(reply.body, b"ignored");
        assert_eq!(reply.header("connection"), Some("close"));
        assert!(closed(&mut conn).await);
    }

    /// Sends `request` on a new connection: the reply, and whether the server closed after.
    async fn one_shot(s: &Server, request: &[u8]) -> (Reply, bool) {
        let mut conn = connect(s).await;
        conn.write_all(request).await.unwrap();
        let mut pending = Vec::new();
        let reply = read_reply(&mut conn, &mut pending, false).await;
        let closed = closed(&mut conn).await;
        (reply, closed)
    }

    #[tokio::test]
    async fn ambiguous_or_broken_framing_is_refused_and_the_connection_closed() {
        let s = server().await;
        for (request, status, says) in [
            (
                &b"POST /echo HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"[..],
                400,
                "smuggling",
            ),
            (b"POST /echo HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd", 400, "conflicting"),
            (b"POST /echo HTTP/1.1\r\ncontent-length: -1\r\n\r\n", 400, "content-length"),
            (b"POST /echo HTTP/1.1\r\ncontent-length: 1x\r\n\r\n", 400, "content-length"),
            (b"POST /echo HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n", 501, "chunked"),
            (b"POST /echo HTTP/1.1\r\ntransfer-encoding: chunked, gzip\r\n\r\n", 400, "after chunked"),
            (b"POST /echo HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n", 400, "HTTP/1.0"),
            (b"GET / HTTP/1.1\r\nexpect: something\r\n\r\n", 417, "100-continue"),
            (b"GET / HTTP/2.0\r\n\r\n", 505, "HTTP/1.1"),
            (b"GET /\x01 HTTP/1.1\r\n\r\n", 400, "malformed"),
            (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", 400, "malformed"),
        ] {
            let (reply, closed) = one_shot(&s, request).await;
            let shown = String::from_utf8_lossy(request);
            assert_eq!(reply.status, status, "{shown}");
            assert!(closed, "{shown}: left open");
            let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains(says), "{shown}: {message}");
            assert_eq!(body["type"], "error");
        }
    }

    #[tokio::test]
    async fn oversized_heads_are_refused_with_431() {
        let s = server().await;
        let long = format!(
            "GET / HTTP/1.1\r\nx-big: {}\r\n\r\n",
            "a".repeat(MAX_HEAD_BYTES)
        );
        let (reply, closed) = one_shot(&s, long.as_bytes()).await;
        assert_eq!(reply.status, 431);
        assert!(closed);
        let mut many = String::from("GET / HTTP/1.1\r\n");
        for i in 0..=MAX_HEADERS {
            many.push_str(&format!("x-{i}: 1\r\n"));
        }
        many.push_str("\r\n");
        let (reply, closed) = one_shot(&s, many.as_bytes()).await;
        assert_eq!(reply.status, 431);
        assert!(closed);
        // Just under both limits is served.
        let mut fine = String::from("GET / HTTP/1.1\r\n");
        for i in 0..MAX_HEADERS {
            fine.push_str(&format!("x-{i}: 1\r\n"));
        }
        fine.push_str("\r\n");
        let (reply, _) = one_shot(&s, fine.as_bytes()).await;
        assert_eq!(reply.body, b"ok");
    }

    #[tokio::test]
    async fn http_1_0_clients_get_close_delimited_or_asked_for_keep_alive() {
        let s = server().await;
        // No keep-alive asked: closed after the response.
        let (reply, closed) = one_shot(&s, b"GET / HTTP/1.0\r\n\r\n").await;
        assert_eq!(reply.body, b"ok");
        assert!(closed);
        // Asked for: kept, and said so.
        let mut conn = connect(&s).await;
        let mut pending = Vec::new();
        conn.write_all(b"GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
            .await
            .unwrap();
        let reply = read_reply(&mut conn, &mut pending, false).await;
        assert_eq!(reply.header("connection"), Some("keep-alive"));
        // A body of unknown length cannot be chunked for HTTP/1.0: it runs to the close.
        conn.write_all(b"GET /stream HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
            .await
            .unwrap();
        let reply = read_reply(&mut conn, &mut pending, false).await;
        assert_eq!(reply.header("transfer-encoding"), None);
        assert_eq!(reply.body, b"one;two;three;");
    }

    #[tokio::test]
    async fn streams_are_chunked_and_head_responses_have_no_body() {
        let s = server().await;
        let mut conn = connect(&s).await;
        let mut pending = Vec::new();
        conn.write_all(b"GET /stream HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let reply = read_reply(&mut conn, &mut pending, false).await;
        assert_eq!(reply.header("transfer-encoding"), Some("chunked"));
        assert_eq!(reply.body, b"one;two;three;");
        conn.write_all(b"HEAD / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let head = read_reply(&mut conn, &mut pending, true).await;
        assert_eq!(head.status, 200);
        // No body bytes came: the next response follows the head directly.
        let next = read_reply(&mut conn, &mut pending, false).await;
        assert_eq!(next.body, b"ok");
    }

    #[tokio::test]
    async fn a_client_that_closes_while_the_handler_runs_drops_the_handler() {
        let s = server().await;
        let mut conn = connect(&s).await;
        conn.write_all(b"GET /wait HTTP/1.1\r\n\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(conn);
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while s.dropped.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(s.dropped.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error_for_the_handler() {
        let s = server().await;
        let mut conn = connect(&s).await;
        conn.write_all(b"POST /echo HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n")
            .await
            .unwrap();
        let mut pending = Vec::new();
        let reply = read_reply(&mut conn, &mut pending, false).await;
        assert_eq!(reply.status, 400);
        let text = String::from_utf8_lossy(&reply.body);
        assert!(text.contains("malformed chunked request body"), "{text}");

        let mut conn = connect(&s).await;
        conn.write_all(b"POST /echo HTTP/1.1\r\ncontent-length: 10\r\n\r\nabc")
            .await
            .unwrap();
        conn.shutdown().await.unwrap();
        let reply = read_reply(&mut conn, &mut Vec::new(), false).await;
        assert_eq!(reply.status, 400);
        let text = String::from_utf8_lossy(&reply.body);
        assert!(text.contains("7 bytes of the request body"), "{text}");
    }

    #[tokio::test]
    async fn draining_closes_idle_connections_and_finishes_busy_ones() {
        let s = server().await;
        let mut idle = connect(&s).await;
        let mut pending = Vec::new();
        idle.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        read_reply(&mut idle, &mut pending, false).await;
        let mut busy = connect(&s).await;
        busy.write_all(b"GET /stream HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        s.stop.send(true).unwrap();
        assert!(closed(&mut idle).await, "the idle connection stayed open");
        let reply = read_reply(&mut busy, &mut Vec::new(), false).await;
        assert_eq!(reply.body, b"one;two;three;");
        assert!(closed(&mut busy).await, "the busy connection stayed open");
        assert!(
            TcpStream::connect(s.addr).await.is_err() || {
                // Accepted by the kernel's backlog at most, never served.
                let mut late = TcpStream::connect(s.addr).await.unwrap();
                late.write_all(b"GET / HTTP/1.1\r\n\r\n").await.ok();
                closed(&mut late).await
            }
        );
    }

    #[test]
    fn a_head_end_is_found_in_the_new_bytes_or_just_before_them() {
        for head in [
            &b"GET / HTTP/1.1\r\na: b\r\n\r\n"[..],
            b"GET / HTTP/1.1\na: b\n\n",
        ] {
            let end = head.len() - 1; // where the empty line ends
            for from in 0..=end {
                assert!(ends_head(head, from), "from {from} in {head:?}");
            }
            // Not in a line that merely ends.
            assert!(!ends_head(&head[..head.len() - 2], 0));
        }
    }

    #[tokio::test]
    async fn a_head_arriving_a_byte_at_a_time_is_served() {
        let s = server().await;
        let mut conn = connect(&s).await;
        for &b in b"GET / HTTP/1.1\r\nhost: t\r\n\r\n" {
            conn.write_all(&[b]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(
            read_reply(&mut conn, &mut Vec::new(), false).await.body,
            b"ok"
        );
        // Garbage is refused as soon as it comes, not after 64 KiB or an empty line.
        conn.write_all(b"\x16\x03\x01\x02\x00\x01").await.unwrap();
        let reply = read_reply(&mut conn, &mut Vec::new(), false).await;
        assert_eq!(reply.status, 400);
    }

    #[tokio::test]
    async fn bare_lf_or_cr_in_a_chunked_body_is_refused_not_read_leniently() {
        let s = server().await;
        for body in [
            // A bare LF ending the trailers: a lenient reader would take the bytes after it
            // for a second request.
            &b"0\r\n\nGET /smuggled HTTP/1.1\r\n\r\n"[..],
            b"3;x\nyy\r\nabc\r\n0\r\n\r\n",
            b"3\nabc\r\n0\r\n\r\n",
            // A bare CR: `\r\r\n` is no empty line, nor part of a trailer.
            b"0\r\n\r\r\nGET /smuggled HTTP/1.1\r\nhost: t\r\n\r\n",
            b"0\r\nx: a\rb\r\n\r\n",
        ] {
            let mut request = b"POST /echo HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            request.extend_from_slice(body);
            let (reply, closed) = one_shot(&s, &request).await;
            let text = String::from_utf8_lossy(&reply.body);
            assert_eq!(reply.status, 400, "{text}");
            assert!(text.contains("malformed chunked request body"), "{text}");
            assert!(closed, "{text}: left open");
        }
    }

    #[tokio::test]
    async fn a_drain_while_the_handler_runs_makes_its_response_say_close() {
        let s = server().await;
        let mut conn = connect(&s).await;
        conn.write_all(b"GET /slow HTTP/1.1\r\n\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.stop.send(true).unwrap();
        let reply = read_reply(&mut conn, &mut Vec::new(), false).await;
        assert_eq!(reply.body, b"slow");
        assert_eq!(reply.header("connection"), Some("close"));
        assert!(closed(&mut conn).await);
    }

    #[tokio::test]
    async fn pipelined_requests_then_a_half_close_are_all_answered() {
        let s = server().await;
        let mut conn = connect(&s).await;
        conn.write_all(b"GET /slow HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        conn.shutdown().await.unwrap();
        let mut pending = Vec::new();
        assert_eq!(
            read_reply(&mut conn, &mut pending, false).await.body,
            b"slow"
        );
        assert_eq!(read_reply(&mut conn, &mut pending, false).await.body, b"ok");
        assert!(closed(&mut conn).await);
        assert_eq!(s.dropped.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn an_always_ready_body_is_written_as_it_goes_not_gathered_whole() {
        let s = server().await;
        let mut conn = connect(&s).await;
        conn.write_all(b"GET /flood HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        // The client reads nothing: the server can only get as far as the socket buffers.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let taken = s.polled.load(Ordering::SeqCst);
        assert!(
            taken < FLOOD_FRAMES / 2,
            "{taken} frames taken with nothing read"
        );
        // Reading, it all comes.
        let reply = read_reply(&mut conn, &mut Vec::new(), false).await;
        assert_eq!(reply.body.len(), FLOOD_FRAMES * 16 * 1024);
    }

    #[tokio::test]
    async fn empty_lines_before_a_request_are_skipped_not_parsed_on_every_read() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let mut conn = Conn::new(Shared::new(stream), |_req: Request<RequestBody>| async {
            Response::new(http_body_util::Empty::<Bytes>::new())
        });
        let sender = tokio::spawn(async move {
            for i in 0..1000 {
                client.write_all(b"\r\n").await.unwrap();
                if i % 50 == 0 {
                    // Read on their own, in twenty reads or more.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            client.write_all(b"\nGET / HTTP/1.1\r\n\r\n").await.unwrap();
            client
        });
        let head = std::future::poll_fn(|cx| conn.poll_head(cx)).await;
        let Ok(Some(head)) = head else {
            panic!("no head")
        };
        assert_eq!(head.method, Method::GET);
        assert!(conn.parses <= 2, "{} parses", conn.parses);
        let _client = sender.await.unwrap();
    }

    #[tokio::test]
    async fn a_drain_closes_connections_waiting_for_the_rest_of_a_head() {
        let s = server().await;
        let mut blank = connect(&s).await;
        blank.write_all(b"\r\n\r\n").await.unwrap();
        // Half a head behind a whole request: left in the buffer when the first is answered.
        let mut partial = connect(&s).await;
        partial
            .write_all(b"GET / HTTP/1.1\r\n\r\nGET / HT")
            .await
            .unwrap();
        let reply = read_reply(&mut partial, &mut Vec::new(), false).await;
        assert_eq!(reply.body, b"ok");
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.stop.send(true).unwrap();
        assert!(
            closed(&mut blank).await,
            "the connection sending empty lines stayed"
        );
        assert!(
            closed(&mut partial).await,
            "the one with half a head stayed"
        );
    }

    /// A connection closed with client bytes unread in the kernel would be reset, and the
    /// response bytes still in the send buffer lost. Here an HTTP/1.0 client sends the extra
    /// CRLF after a POST body that RFC 9112 §2.2 mentions, while a close-delimited response
    /// is under way.
    #[tokio::test]
    async fn a_close_with_unread_client_bytes_does_not_reset_away_the_response() {
        let s = server().await;
        let mut conn = connect(&s).await;
        conn.write_all(b"POST /flood HTTP/1.0\r\ncontent-length: 2\r\n\r\nhi")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        conn.write_all(b"\r\n").await.unwrap();
        let reply = read_reply(&mut conn, &mut Vec::new(), false).await;
        assert_eq!(
            reply.body.len(),
            FLOOD_FRAMES * 16 * 1024,
            "response cut short"
        );
    }

    #[tokio::test]
    async fn a_refused_request_to_a_provider_path_is_answered_in_its_dialect() {
        let s = server().await;
        let smuggle = |path: &str| {
            format!(
                "POST {path} HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
            )
        };
        let (reply, _) = one_shot(&s, smuggle("/v1/chat/completions?x=1").as_bytes()).await;
        assert_eq!(reply.status, 400);
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert!(body.get("type").is_none(), "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        assert!(
            body["error"].get("param").is_some(),
            "OpenAI's shape: {body}"
        );
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("smuggling")
        );

        let (reply, _) = one_shot(&s, smuggle("/v1/messages").as_bytes()).await;
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(body["type"], "error", "Anthropic's shape: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        assert!(body["error"].get("param").is_none(), "{body}");
    }
}
