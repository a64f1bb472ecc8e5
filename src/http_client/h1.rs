//! The request path's HTTP/1.1 exchange, driven by the request's own task. The pool lends a
//! [`Connection`]; the request's head and (buffered) body leave in one write; the response
//! head is parsed with `httparse`; and the body ([`H1Body`]) is read and decoded
//! (content-length, chunked, or up to the connection's end) as the client-facing body polls
//! it. hyper's client connection, which this replaces on the request path, runs a task per
//! connection and hands each request and response across a channel to it: two tasks woken per
//! exchange instead of one, and its own header map round trip for the request.
//!
//! One request at a time per connection: no pipelining, no protocol upgrades (a 101 is an
//! error), and trailers are read and dropped (tollgate's clients get HTTP/1.1 without them).

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::{OriginPool, UpstreamBody, UpstreamError};

/// What the connector hands over: TCP, or TLS over TCP.
pub(super) type Stream = TokioIo<MaybeHttpsStream<TokioIo<TcpStream>>>;

/// Read buffer of a connection, allocated once per connection.
const READ_BUFFER_BYTES: usize = 16 * 1024;
/// Longest response head (and longest chunk-size or trailer line) accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most response header fields accepted (hyper's default too).
const MAX_HEADERS: usize = 100;
/// Request bodies up to this size are copied behind the head, so both leave in one write.
const COPY_BODY_BYTES: usize = 64 * 1024;

/// An open HTTP/1.1 connection to the origin with its read buffer. Boxed wherever it goes: a
/// TLS stream is large, and the connection moves in and out of the pool once per request.
pub(super) struct Connection {
    io: Stream,
    /// `buf[start..end]` is read and not yet used; the whole of `buf` is initialised.
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Connection {
    pub(super) fn new(io: Stream) -> Box<Self> {
        Box::new(Self {
            io,
            buf: vec![0; READ_BUFFER_BYTES],
            start: 0,
            end: 0,
        })
    }

    fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start >= self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads more bytes behind those buffered; `Ok(0)` at the connection's end. The buffer
    /// grows (up to [`MAX_HEAD_BYTES`]) only when one head or line does not fit.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, UpstreamError>> {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.buf.len() < MAX_HEAD_BYTES {
                let grown = (self.buf.len() * 2).min(MAX_HEAD_BYTES);
                self.buf.resize(grown, 0);
            } else {
                return Poll::Ready(Err(UpstreamError::Malformed(
                    "response head or line longer than 64 KiB".into(),
                )));
            }
        }
        let mut read = ReadBuf::new(&mut self.buf[self.end..]);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut read))?;
        let n = read.filled().len();
        self.end += n;
        Poll::Ready(Ok(n))
    }

    /// Whether an idle connection can take a request: nothing arrived on it while it was idle,
    /// not even its end. One non-blocking read attempt; after a response was read to its end,
    /// tokio usually answers it from its readiness state without a system call.
    pub(super) fn is_idle_open(&mut self) -> bool {
        if self.start != self.end {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        matches!(self.poll_fill(&mut cx), Poll::Pending)
    }

    /// Writes an encoded request ([`encode_request`]) and, when it was too large to copy into
    /// the head, the body after it. Whenever a write waits or fails, what the origin sent is
    /// read: an origin may answer before it has the whole request (an early 413 or 401) and
    /// stop reading it, and that answer is the response. Returns whether the whole request
    /// went out; when not, the rest is not sent and the connection is not reused.
    pub(super) async fn write_request(
        &mut self,
        encoded: &[u8],
        req: &Request<Bytes>,
    ) -> io::Result<bool> {
        let body: &[u8] = if req.body().len() > COPY_BODY_BYTES {
            req.body()
        } else {
            &[]
        };
        let mut written = 0;
        std::future::poll_fn(|cx| {
            loop {
                let rest = match encoded.get(written..) {
                    Some(rest) if !rest.is_empty() => rest,
                    _ => &body[written - encoded.len()..],
                };
                let polled = if rest.is_empty() {
                    Pin::new(&mut self.io).poll_flush(cx).map_ok(|()| 0)
                } else {
                    Pin::new(&mut self.io).poll_write(cx, rest)
                };
                let failed = match polled {
                    Poll::Ready(Ok(0)) if rest.is_empty() => return Poll::Ready(Ok(true)),
                    Poll::Ready(Ok(0)) => Some(io::ErrorKind::WriteZero.into()),
                    Poll::Ready(Ok(n)) => {
                        written += n;
                        continue;
                    }
                    Poll::Ready(Err(e)) => Some(e),
                    Poll::Pending => None,
                };
                return match (self.poll_answered(cx), failed) {
                    (Poll::Ready(Ok(())), _) => Poll::Ready(Ok(false)),
                    (_, Some(e)) | (Poll::Ready(Err(e)), None) => Poll::Ready(Err(e)),
                    (Poll::Pending, None) => Poll::Pending,
                };
            }
        })
        .await
    }

    /// Whether the origin has started its final response (interim ones are skipped); an
    /// error when it closed the connection without one.
    fn poll_answered(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut parsed = httparse::Response::new(&mut fields);
            match parsed.parse(self.buffered()) {
                Ok(httparse::Status::Complete(len))
                    if parsed
                        .code
                        .is_some_and(|c| (100..200).contains(&c) && c != 101) =>
                {
                    self.consume(len);
                    continue;
                }
                Ok(httparse::Status::Partial) => {}
                // A final head, or something read_head will report.
                _ => return Poll::Ready(Ok(())),
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) if self.start == self.end => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "upstream closed the connection before the request was written",
                    )));
                }
                Ok(0) => return Poll::Ready(Ok(())),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(io::Error::other(e))),
            }
        }
    }

    /// Reads the response head, skipping interim (1xx) responses.
    async fn read_head(&mut self) -> Result<ResponseHead, UpstreamError> {
        loop {
            if let Some(head) = self.parse_head()? {
                if head.status == StatusCode::SWITCHING_PROTOCOLS {
                    return Err(UpstreamError::Malformed(
                        "101 Switching Protocols to a request that asked for no upgrade".into(),
                    ));
                }
                if head.status.is_informational() {
                    continue;
                }
                return Ok(head);
            }
            let n = std::future::poll_fn(|cx| self.poll_fill(cx)).await?;
            if n == 0 {
                return Err(UpstreamError::Closed(if self.start == self.end {
                    "before responding"
                } else {
                    "in the middle of the response head"
                }));
            }
        }
    }

    /// Parses a complete head from the buffer (and consumes it); `None` when more is needed.
    fn parse_head(&mut self) -> Result<Option<ResponseHead>, UpstreamError> {
        let mut fields = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut parsed,
            &self.buf[self.start..self.end],
            &mut fields,
        ) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(UpstreamError::Malformed(format!("response head: {e}"))),
        };
        let status = parsed
            .code
            .and_then(|code| StatusCode::from_u16(code).ok())
            .ok_or_else(|| UpstreamError::Malformed("response status code".into()))?;
        let version = match parsed.version {
            Some(0) => Version::HTTP_10,
            _ => Version::HTTP_11,
        };
        // One more than the head holds: the gateway adds its record id header, which in a
        // map filled to its capacity would regrow it (for every response).
        let mut headers = HeaderMap::with_capacity(parsed.headers.len() + 1);
        for field in parsed.headers.iter() {
            let name = HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| {
                UpstreamError::Malformed(format!("header name `{}`", field.name.escape_debug()))
            })?;
            let value = HeaderValue::from_bytes(field.value)
                .map_err(|_| UpstreamError::Malformed(format!("value of header `{name}`")))?;
            headers.append(name, value);
        }
        self.consume(len);
        Ok(Some(ResponseHead {
            status,
            version,
            headers,
        }))
    }
}

struct ResponseHead {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
}

/// Encodes `req` (origin-form URI) as an HTTP/1.1 request head, with the body behind it when
/// it is at most [`COPY_BODY_BYTES`]. `Host` is `host` unless the request names one; the
/// body's length is always declared (no chunked request bodies: they are buffered).
pub(super) fn encode_request(req: &Request<Bytes>, host: &HeaderValue) -> Vec<u8> {
    let body = req.body();
    let copied = if body.len() <= COPY_BODY_BYTES {
        body.len()
    } else {
        0
    };
    let mut out = Vec::with_capacity(256 + req.headers().len() * 48 + copied);
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if !req.headers().contains_key(header::HOST) {
        field(&mut out, "host", host.as_bytes());
    }
    for (name, value) in req.headers() {
        if name != header::CONTENT_LENGTH && name != header::TRANSFER_ENCODING {
            field(&mut out, name.as_str(), value.as_bytes());
        }
    }
    // Like hyper: a body-less GET (and the like) declares no length; POST, PUT and PATCH
    // always do, even when empty.
    if !body.is_empty() || matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH) {
        let mut digits = itoa::Buffer::new();
        field(
            &mut out,
            "content-length",
            digits.format(body.len()).as_bytes(),
        );
    }
    out.extend_from_slice(b"\r\n");
    if copied > 0 {
        out.extend_from_slice(body);
    }
    out
}

fn field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Reads the response to the request just written on `conn`. `head_request`: the request was
/// `HEAD`, so the response has no body whatever its headers say.
/// `whole`: the whole request went out ([`Connection::write_request`]); when not, the
/// connection is not reused.
pub(super) async fn read_response(
    pool: &Arc<OriginPool>,
    mut conn: Box<Connection>,
    head_request: bool,
    whole: bool,
) -> Result<Response<UpstreamBody>, UpstreamError> {
    let head = conn.read_head().await?;
    let (framing, keep_alive) = framing(&head, head_request)?;
    let keep_alive = keep_alive && whole;
    let body = H1Body::new(conn, pool.clone(), framing, keep_alive);
    let mut response = Response::new(UpstreamBody::H1(body));
    *response.status_mut() = head.status;
    *response.version_mut() = head.version;
    *response.headers_mut() = head.headers;
    Ok(response)
}

/// How the body is delimited (RFC 9112 §6.3), and whether the connection can be reused.
fn framing(head: &ResponseHead, head_request: bool) -> Result<(Framing, bool), UpstreamError> {
    let headers = &head.headers;
    let mut keep_alive = head.version == Version::HTTP_11;
    for value in headers.get_all(header::CONNECTION) {
        for token in value.as_bytes().split(|&b| b == b',') {
            let token = token.trim_ascii();
            if token.eq_ignore_ascii_case(b"close") {
                keep_alive = false;
            } else if token.eq_ignore_ascii_case(b"keep-alive") && head.version == Version::HTTP_10
            {
                keep_alive = true;
            }
        }
    }
    if head_request
        || head.status == StatusCode::NO_CONTENT
        || head.status == StatusCode::NOT_MODIFIED
    {
        return Ok((Framing::Done, keep_alive));
    }
    let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter().peekable();
    if codings.peek().is_some() {
        // Chunked only when it is the last coding; otherwise the body runs to the end. Sent
        // together with a length, the message is suspect: not reused.
        let last = codings
            .last()
            .and_then(|v| v.as_bytes().rsplit(|&b| b == b',').next())
            .map(<[u8]>::trim_ascii);
        let chunked = last.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"));
        keep_alive &= chunked && !headers.contains_key(header::CONTENT_LENGTH);
        let framing = if chunked {
            Framing::Chunked(ChunkState::Size)
        } else {
            Framing::ToEnd
        };
        return Ok((framing, keep_alive));
    }
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&b| b == b',') {
            let n = std::str::from_utf8(part.trim_ascii())
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| UpstreamError::Malformed("content-length".into()))?;
            if length.is_some_and(|l| l != n) {
                return Err(UpstreamError::Malformed(
                    "conflicting content-lengths".into(),
                ));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) => (Framing::Done, keep_alive),
        Some(n) => (Framing::Length(n), keep_alive),
        None => (Framing::ToEnd, false),
    })
}

enum Framing {
    /// This many body bytes still to come.
    Length(u64),
    Chunked(ChunkState),
    /// The body ends with the connection.
    ToEnd,
    Done,
}

/// Longest chunk-size line (size and extensions) accepted.
const MAX_CHUNK_LINE_BYTES: usize = 4 * 1024;
/// Most bytes of trailer section accepted after the last chunk (trailers are discarded).
const MAX_TRAILER_BYTES: u32 = 16 * 1024;
/// Most trailer fields accepted.
const MAX_TRAILER_FIELDS: u32 = 100;

/// Where a chunked body's decoder stands. Decoding is strict (RFC 9112 §7.1): every line ends
/// in CRLF, a chunk-size line holds hex digits and extensions without control bytes, and
/// lines and trailers are bounded. A lenient decoder that takes a bare LF as a line end reads
/// a different body than a strict one in front of or behind it: the gap request smuggling
/// uses.
#[derive(Debug, PartialEq)]
pub(crate) enum ChunkState {
    /// Expecting a chunk-size line.
    Size,
    /// In a chunk's data, this many bytes still to come.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines up to an empty line (bytes and fields so far).
    Trailers { bytes: u32, fields: u32 },
}

impl ChunkState {
    /// Decodes what `input` holds, appending the data of at most one chunk to `out` (one
    /// frame per upstream chunk, as hyper hands them over: a budgeted stream is checked, and
    /// can be cut, after each). Returns the bytes used and whether the body ended; an
    /// incomplete line or CRLF is left for the next call.
    pub(crate) fn decode(
        &mut self,
        input: &[u8],
        out: &mut BytesMut,
    ) -> Result<(usize, bool), UpstreamError> {
        let mut pos = 0;
        loop {
            let rest = &input[pos..];
            match self {
                ChunkState::Size => match chunk_size_line(rest)? {
                    Some((_, size)) if size > 0 && !out.is_empty() => {
                        return Ok((pos, false)); // the next chunk goes in the next frame
                    }
                    Some((used, size)) => {
                        pos += used;
                        *self = if size == 0 {
                            ChunkState::Trailers {
                                bytes: 0,
                                fields: 0,
                            }
                        } else {
                            ChunkState::Data(size)
                        };
                    }
                    None => return Ok((pos, false)),
                },
                ChunkState::Data(remaining) => {
                    if rest.is_empty() {
                        return Ok((pos, false));
                    }
                    let n = usize::try_from(*remaining).map_or(rest.len(), |r| r.min(rest.len()));
                    out.extend_from_slice(&rest[..n]);
                    pos += n;
                    *remaining -= n as u64;
                    if *remaining == 0 {
                        *self = ChunkState::DataEnd;
                    }
                }
                ChunkState::DataEnd => match rest {
                    [b'\r', b'\n', ..] => {
                        pos += 2;
                        *self = ChunkState::Size;
                    }
                    [] | [b'\r'] => return Ok((pos, false)),
                    _ => {
                        return Err(UpstreamError::Malformed(
                            "chunk data not followed by CRLF".into(),
                        ));
                    }
                },
                ChunkState::Trailers { bytes, fields } => {
                    let line = memchr::memchr(b'\n', rest);
                    let len = line.map_or(rest.len(), |i| i + 1);
                    if u64::from(*bytes) + len as u64 > u64::from(MAX_TRAILER_BYTES) {
                        return Err(UpstreamError::Malformed(format!(
                            "trailers over {} KiB",
                            MAX_TRAILER_BYTES / 1024
                        )));
                    }
                    let Some(i) = line else {
                        return Ok((pos, false));
                    };
                    if i == 0 || rest[i - 1] != b'\r' {
                        return Err(UpstreamError::Malformed(
                            "a trailer line not ended by CRLF".into(),
                        ));
                    }
                    // No other CR (a bare CR makes the line invalid, RFC 9112 §2.2), nor
                    // any control byte but tab.
                    if rest[..i - 1]
                        .iter()
                        .any(|&b| (b < b' ' && b != b'\t') || b == 0x7f)
                    {
                        return Err(UpstreamError::Malformed(
                            "a control byte in a trailer line".into(),
                        ));
                    }
                    pos += i + 1;
                    if i == 1 {
                        return Ok((pos, true));
                    }
                    *bytes += (i + 1) as u32;
                    *fields += 1;
                    if *fields > MAX_TRAILER_FIELDS {
                        return Err(UpstreamError::Malformed(format!(
                            "more than {MAX_TRAILER_FIELDS} trailer fields"
                        )));
                    }
                }
            }
        }
    }
}

/// Parses a chunk-size line at the start of `line`: `1*HEXDIG [ws] *(";" ext) CRLF`, where
/// an extension holds no control bytes but tab. The bytes it took and the size, or `None`
/// when the line is not all there yet.
fn chunk_size_line(line: &[u8]) -> Result<Option<(usize, u64)>, UpstreamError> {
    let malformed = |what: &str| Err(UpstreamError::Malformed(format!("chunk size line: {what}")));
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    // Leading zeros are allowed (as hyper and nginx allow them), within the line's limit.
    let significant = line[..digits].iter().skip_while(|&&b| b == b'0').count();
    if significant > 16 {
        return malformed("a size over 64 bits");
    }
    if digits == line.len() {
        // All hex so far: the line goes on.
        return if digits >= MAX_CHUNK_LINE_BYTES {
            malformed("longer than 4 KiB")
        } else {
            Ok(None)
        };
    }
    if digits == 0 {
        return malformed("no size");
    }
    let mut size = 0u64;
    for &b in &line[digits - significant..digits] {
        // At most 16 significant hex digits: no overflow.
        size = size << 4 | u64::from(char::from(b).to_digit(16).unwrap_or(0));
    }
    let mut at = digits;
    while at < line.len() && matches!(line[at], b' ' | b'\t') {
        at += 1;
    }
    if at < line.len() && line[at] == b';' {
        // Extensions (ignored): anything printable up to the CR.
        while at < line.len() && (line[at] == b'\t' || (line[at] >= b' ' && line[at] != 0x7f)) {
            at += 1;
        }
    }
    match line.get(at..) {
        Some([b'\r', b'\n', ..]) => Ok(Some((at + 2, size))),
        Some([] | [b'\r']) if at < MAX_CHUNK_LINE_BYTES => Ok(None),
        Some([] | [b'\r']) => malformed("longer than 4 KiB"),
        Some([b'\n', ..]) => malformed("ended by a bare LF"),
        _ => malformed("a control byte or junk after the size"),
    }
}

/// A response body read off its connection as it is polled. Once read to the end, the
/// connection goes back to the pool (when the response allows reuse and nothing follows it);
/// dropped earlier or failed, the connection is closed with it.
pub struct H1Body {
    conn: Option<Box<Connection>>,
    pool: Arc<OriginPool>,
    framing: Framing,
    keep_alive: bool,
}

impl H1Body {
    fn new(
        conn: Box<Connection>,
        pool: Arc<OriginPool>,
        framing: Framing,
        keep_alive: bool,
    ) -> Self {
        let mut body = Self {
            conn: Some(conn),
            pool,
            framing,
            keep_alive,
        };
        if matches!(body.framing, Framing::Done) {
            body.finish(); // nothing to read (e.g. 204): the server may never poll it
        }
        body
    }

    fn finish(&mut self) {
        self.framing = Framing::Done;
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && conn.start == conn.end
        {
            self.pool.give_back(conn);
        }
    }

    fn fail(
        &mut self,
        e: UpstreamError,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, UpstreamError>>> {
        self.conn = None;
        self.framing = Framing::Done;
        Poll::Ready(Some(Err(e)))
    }

    pub(super) fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Done)
    }

    pub(super) fn size_hint(&self) -> http_body::SizeHint {
        match self.framing {
            Framing::Length(n) => http_body::SizeHint::with_exact(n),
            Framing::Done => http_body::SizeHint::with_exact(0),
            _ => http_body::SizeHint::default(),
        }
    }

    pub(super) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, UpstreamError>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            // Hand out what is buffered first.
            let buffered = conn.buffered();
            let data = match &mut self.framing {
                Framing::Done => return Poll::Ready(None),
                Framing::Length(remaining) => {
                    let n = usize::try_from(*remaining)
                        .map_or(buffered.len(), |r| r.min(buffered.len()));
                    *remaining -= n as u64;
                    let data = Bytes::copy_from_slice(&buffered[..n]);
                    conn.consume(n);
                    if *remaining == 0 {
                        self.finish();
                    }
                    data
                }
                Framing::ToEnd => {
                    let data = Bytes::copy_from_slice(buffered);
                    let n = buffered.len();
                    conn.consume(n);
                    data
                }
                Framing::Chunked(state) => {
                    let mut out = BytesMut::with_capacity(buffered.len());
                    let (used, done) = match state.decode(buffered, &mut out) {
                        Ok(decoded) => decoded,
                        Err(e) => return self.fail(e),
                    };
                    conn.consume(used);
                    if done {
                        self.finish();
                    }
                    out.freeze()
                }
            };
            if !data.is_empty() {
                return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
            }
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if matches!(self.framing, Framing::ToEnd) => {
                    self.conn = None;
                    self.framing = Framing::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => return self.fail(UpstreamError::Closed("in the middle of the body")),
                Ok(_) => {}
                Err(e) => return self.fail(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::collections::VecDeque;
    use std::net::SocketAddr;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use http_body_util::BodyExt;
    use proptest::prelude::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::http_client::{ClientOptions, PoolError};

    /// Runs the decoder over `pieces` as they would arrive, the way [`H1Body`] does; returns
    /// the frames and whether the body ended.
    fn decode_pieces(pieces: &[&[u8]]) -> Result<(Vec<Vec<u8>>, bool), UpstreamError> {
        let mut state = ChunkState::Size;
        let mut buffered = Vec::new();
        let mut frames = Vec::new();
        for piece in pieces {
            buffered.extend_from_slice(piece);
            loop {
                let mut out = BytesMut::new();
                let (used, done) = state.decode(&buffered, &mut out)?;
                buffered.drain(..used);
                if !out.is_empty() {
                    frames.push(out.to_vec());
                }
                if done {
                    assert!(buffered.is_empty(), "bytes after the body");
                    return Ok((frames, true));
                }
                if used == 0 && out.is_empty() {
                    break;
                }
            }
        }
        Ok((frames, false))
    }

    #[test]
    fn chunked_bodies_decode_at_every_split_one_frame_per_chunk_at_most() {
        let body: &[u8] =
            b"5;name=value\r\nhello\r\n1\r\n \r\nB\r\nhello world\r\n0\r\ntrailer: x\r\n\r\n";
        for cut in 0..=body.len() {
            let (frames, done) = decode_pieces(&[&body[..cut], &body[cut..]]).unwrap();
            assert!(done, "cut at {cut}");
            assert_eq!(frames.concat(), b"hello hello world", "cut at {cut}");
            // A frame never spans two chunks: a cut inside a chunk splits it in two frames.
            assert!((3..=4).contains(&frames.len()), "cut at {cut}: {frames:?}");
        }
        // Bounded: a size line over 4 KiB, trailers over 16 KiB or 100 fields.
        let long_ext = format!("1;{}", "x".repeat(4096));
        let e = decode_pieces(&[long_ext.as_bytes()]).unwrap_err();
        assert!(e.to_string().contains("longer than 4 KiB"), "{e}");
        assert!(decode_pieces(&[&long_ext.as_bytes()[..4000], b"\r\na\r\n"]).is_ok());
        let big_trailer = format!("0\r\nx: {}\r\n\r\n", "y".repeat(16 * 1024));
        let e = decode_pieces(&[big_trailer.as_bytes()]).unwrap_err();
        assert!(e.to_string().contains("trailers over 16 KiB"), "{e}");
        let many = |n: usize| format!("0\r\n{}\r\n", "t: v\r\n".repeat(n));
        assert!(decode_pieces(&[many(100).as_bytes()]).unwrap().1);
        let e = decode_pieces(&[many(101).as_bytes()]).unwrap_err();
        assert!(
            e.to_string().contains("more than 100 trailer fields"),
            "{e}"
        );
        // Leading zeros, however many, within the line's limit.
        let (frames, done) = decode_pieces(&[b"00000000000000000003\r\nabc\r\n0\r\n\r\n"]).unwrap();
        assert_eq!((frames.concat(), done), (b"abc".to_vec(), true));
        let zeros = "0".repeat(4096);
        let e = decode_pieces(&[zeros.as_bytes()]).unwrap_err();
        assert!(e.to_string().contains("longer than 4 KiB"), "{e}");
        // Tabs and spaces after the size, and tabs in extensions, are allowed.
        let (frames, done) = decode_pieces(&[b"3 \t;a=\"b\tc\"\r\nabc\r\n0\r\n\r\n"]).unwrap();
        assert_eq!((frames.concat(), done), (b"abc".to_vec(), true));
        // Without the terminating empty line the body has not ended.
        let (frames, done) = decode_pieces(&[b"2\r\nab\r\n0\r\n"]).unwrap();
        assert_eq!((frames, done), (vec![b"ab".to_vec()], false));
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for bad in [
            &b"zz\r\nab\r\n"[..],
            b"2\r\nabX\r\n0\r\n\r\n",
            b"fffffffffffffffff\r\n",
            b"10000000000000000\r\n",
            b"000010000000000000000\r\n",
            // Bare LFs, where a lenient decoder and a strict one would part ways.
            b"3\nabc\r\n",
            b"3;x\nyy\r\nabc\r\n",
            b"0\r\n\n",
            b"0\r\ntrailer: x\n\r\n",
            // Bare CRs in trailers: `\r\r\n` is no empty line.
            b"0\r\n\r\r\n\r\n",
            b"0\r\nx: a\rb\r\n\r\n",
            b"0\r\nx: y\r\r\n\r\n",
            b"0\r\nx: \x01\r\n\r\n",
            // Control bytes and junk on the size line.
            b"3;a\x01b\r\nabc\r\n",
            b"3\rabc\r\n",
            b"3 4\r\nabc\r\n",
            b";x\r\n",
            b"-3\r\n",
        ] {
            let e = decode_pieces(&[bad]).unwrap_err();
            assert!(matches!(e, UpstreamError::Malformed(_)), "{bad:?}: {e}");
        }
    }

    proptest! {
        #[test]
        fn chunked_encoding_round_trips(
            data in proptest::collection::vec(any::<u8>(), 0..600),
            chunk in 1usize..90,
            piece in 1usize..40,
        ) {
            let mut encoded = Vec::new();
            for c in data.chunks(chunk) {
                encoded.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                encoded.extend_from_slice(c);
                encoded.extend_from_slice(b"\r\n");
            }
            encoded.extend_from_slice(b"0\r\n\r\n");
            let pieces: Vec<&[u8]> = encoded.chunks(piece).collect();
            let (frames, done) = decode_pieces(&pieces).unwrap();
            prop_assert!(done);
            prop_assert_eq!(frames.concat(), data);
        }
    }

    fn head(status: u16, version: Version, fields: &[(&str, &str)]) -> ResponseHead {
        let mut headers = HeaderMap::new();
        for (name, value) in fields {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        ResponseHead {
            status: StatusCode::from_u16(status).unwrap(),
            version,
            headers,
        }
    }

    /// The framing's kind and the connection's reuse.
    fn framed(head: &ResponseHead, head_request: bool) -> Result<(&'static str, bool), String> {
        framing(head, head_request)
            .map(|(f, keep)| {
                let kind = match f {
                    Framing::Length(_) => "length",
                    Framing::Chunked(_) => "chunked",
                    Framing::ToEnd => "to-end",
                    Framing::Done => "none",
                };
                (kind, keep)
            })
            .map_err(|e| e.to_string())
    }

    #[test]
    fn framing_follows_rfc_9112() {
        use Version as V;
        let cl = ("content-length", "5");
        let te = ("transfer-encoding", "chunked");
        assert_eq!(
            framed(&head(200, V::HTTP_11, &[cl]), false),
            Ok(("length", true))
        );
        assert_eq!(
            framed(&head(200, V::HTTP_11, &[cl]), true),
            Ok(("none", true))
        );
        assert_eq!(
            framed(&head(204, V::HTTP_11, &[]), false),
            Ok(("none", true))
        );
        assert_eq!(
            framed(&head(304, V::HTTP_11, &[cl]), false),
            Ok(("none", true))
        );
        assert_eq!(
            framed(&head(200, V::HTTP_11, &[te]), false),
            Ok(("chunked", true))
        );
        let gzip_chunked = ("transfer-encoding", "gzip, chunked");
        assert_eq!(
            framed(&head(200, V::HTTP_11, &[gzip_chunked]), false),
            Ok(("chunked", true))
        );
        let gzip = ("transfer-encoding", "gzip");
        assert_eq!(
            framed(&head(200, V::HTTP_11, &[gzip]), false),
            Ok(("to-end", false))
        );
        assert_eq!(
            framed(&head(200, V::HTTP_11, &[te, cl]), false),
            Ok(("chunked", false))
        );
        assert_eq!(
            framed(&head(200, V::HTTP_11, &[]), false),
            Ok(("to-end", false))
        );
        let close = ("connection", "keep-alive, Close");
        assert_eq!(
            framed(&head(200, V::HTTP_11, &[cl, close]), false),
            Ok(("length", false))
        );
        assert_eq!(
            framed(&head(200, V::HTTP_10, &[cl]), false),
            Ok(("length", false))
        );
        let keep = ("connection", "keep-alive");
        assert_eq!(
            framed(&head(200, V::HTTP_10, &[cl, keep]), false),
            Ok(("length", true))
        );
        let zero = ("content-length", "0");
        assert_eq!(
            framed(&head(200, V::HTTP_11, &[zero]), false),
            Ok(("none", true))
        );
        let same_twice = ("content-length", "5, 5");
        assert_eq!(
            framed(&head(200, V::HTTP_11, &[same_twice]), false),
            Ok(("length", true))
        );
        for bad in ["5, 6", "-1", "+5", "", "0x5"] {
            let h = head(200, V::HTTP_11, &[("content-length", bad)]);
            assert!(framed(&h, false).is_err(), "content-length `{bad}`");
        }
    }

    #[test]
    fn requests_are_encoded_with_host_and_length() {
        let host = HeaderValue::from_static("up.example:8080");
        let mut post = Request::new(Bytes::from_static(b"{}"));
        *post.method_mut() = Method::POST;
        *post.uri_mut() = "/v1/chat/completions?x=1".parse().unwrap();
        let headers = post.headers_mut();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.insert("content-length", HeaderValue::from_static("999"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        assert_eq!(
            String::from_utf8(encode_request(&post, &host)).unwrap(),
            "POST /v1/chat/completions?x=1 HTTP/1.1\r\nhost: up.example:8080\r\n\
             content-type: application/json\r\nx-multi: a\r\nx-multi: b\r\n\
             content-length: 2\r\n\r\n{}"
        );
        let mut get = Request::new(Bytes::new());
        *get.uri_mut() = "/v1/models".parse().unwrap();
        get.headers_mut()
            .insert("host", HeaderValue::from_static("named"));
        assert_eq!(
            String::from_utf8(encode_request(&get, &host)).unwrap(),
            "GET /v1/models HTTP/1.1\r\nhost: named\r\n\r\n"
        );
        *get.method_mut() = Method::PUT;
        assert!(
            String::from_utf8(encode_request(&get, &host))
                .unwrap()
                .ends_with("content-length: 0\r\n\r\n")
        );
    }

    /// What the scripted origin does with the next request.
    enum Reply {
        /// Writes these pieces (a short pause between them), then waits for the next request.
        Send(Vec<&'static [u8]>),
        /// Writes them and closes the connection.
        SendAndClose(Vec<&'static [u8]>),
    }

    /// A scripted HTTP/1.1 origin on loopback: answers each request with the next [`Reply`].
    struct Origin {
        addr: SocketAddr,
        accepted: Arc<AtomicUsize>,
        requests: Arc<Mutex<Vec<Vec<u8>>>>,
    }

    impl Origin {
        async fn start(script: Vec<Reply>) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let accepted = Arc::new(AtomicUsize::new(0));
            let requests = Arc::new(Mutex::new(Vec::new()));
            let script = Arc::new(Mutex::new(VecDeque::from(script)));
            let (count, seen) = (accepted.clone(), requests.clone());
            tokio::spawn(async move {
                loop {
                    let (mut conn, _) = listener.accept().await.unwrap();
                    count.fetch_add(1, Ordering::SeqCst);
                    let (script, seen) = (script.clone(), seen.clone());
                    tokio::spawn(async move {
                        while let Some(request) = read_request(&mut conn).await {
                            seen.lock().unwrap().push(request);
                            let Some(reply) = script.lock().unwrap().pop_front() else {
                                return;
                            };
                            let (pieces, close) = match reply {
                                Reply::Send(p) => (p, false),
                                Reply::SendAndClose(p) => (p, true),
                            };
                            for piece in pieces {
                                conn.write_all(piece).await.unwrap();
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            if close {
                                return;
                            }
                        }
                    });
                }
            });
            Self {
                addr,
                accepted,
                requests,
            }
        }

        fn pool(&self) -> Arc<OriginPool> {
            pool_for(self.addr)
        }

        fn accepted(&self) -> usize {
            self.accepted.load(Ordering::SeqCst)
        }
    }

    /// Reads until `got` holds a whole request head; returns the head's length (blank line
    /// included) and the declared content-length (0 when none). `None` at the connection's end.
    async fn read_request_head(conn: &mut TcpStream, got: &mut Vec<u8>) -> Option<(usize, usize)> {
        let mut buf = [0u8; 8192];
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                return Some((end + 4, length));
            }
            let n = conn.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            got.extend_from_slice(&buf[..n]);
        }
    }

    /// Reads one request (head and content-length body); `None` at the connection's end.
    async fn read_request(conn: &mut TcpStream) -> Option<Vec<u8>> {
        let mut request = Vec::new();
        let (head, length) = read_request_head(conn, &mut request).await?;
        let mut buf = [0u8; 8192];
        while request.len() < head + length {
            let n = conn.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            request.extend_from_slice(&buf[..n]);
        }
        Some(request)
    }

    fn post(path: &str, body: impl Into<Bytes>) -> Request<Bytes> {
        let mut req = Request::new(body.into());
        *req.method_mut() = Method::POST;
        *req.uri_mut() = path.parse().unwrap();
        req
    }

    /// Sends a request and reads the whole body: its status and body.
    async fn exchange(
        pool: &Arc<OriginPool>,
        req: Request<Bytes>,
    ) -> Result<(u16, Vec<u8>), PoolError> {
        let response = pool.send(req).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body.to_vec()))
    }

    #[tokio::test]
    async fn one_connection_serves_length_chunked_and_head_responses_in_turn() {
        let origin = Origin::start(vec![
            Reply::Send(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"]),
            Reply::Send(vec![
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r",
                b"\nhel",
                b"lo\r\n6\r\n world\r\n0\r\n",
                b"x-trailer: 1\r\n\r\n",
            ]),
            Reply::Send(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\n\r\n"]),
            Reply::Send(vec![b"HTTP/1.1 204 No Content\r\n\r\n"]),
        ])
        .await;
        let pool = origin.pool();
        let big = vec![b'x'; COPY_BODY_BYTES + 1000];
        assert_eq!(
            exchange(&pool, post("/a", "{}")).await.unwrap(),
            (200, b"hello".to_vec())
        );
        assert_eq!(
            exchange(&pool, post("/b", big.clone())).await.unwrap(),
            (200, b"hello world".to_vec())
        );
        let mut head = post("/c", "");
        *head.method_mut() = Method::HEAD;
        assert_eq!(exchange(&pool, head).await.unwrap(), (200, Vec::new()));
        assert_eq!(
            exchange(&pool, post("/d", "")).await.unwrap(),
            (204, Vec::new())
        );
        assert_eq!(origin.accepted(), 1, "all four on one connection");
        let requests = origin.requests.lock().unwrap().clone();
        let first = String::from_utf8(requests[0].clone()).unwrap();
        assert_eq!(
            first,
            format!(
                "POST /a HTTP/1.1\r\nhost: {}\r\ncontent-length: 2\r\n\r\n{{}}",
                origin.addr
            )
        );
        // The large body went out behind its head, whole.
        assert!(requests[1].ends_with(&big));
        assert!(
            String::from_utf8_lossy(&requests[1])
                .contains(&format!("content-length: {}\r\n\r\n", big.len()))
        );
    }

    #[tokio::test]
    async fn connections_are_not_reused_when_the_response_says_close_or_was_not_read() {
        let origin = Origin::start(vec![
            Reply::Send(vec![
                b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
            ]),
            Reply::Send(vec![b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok"]),
            Reply::Send(vec![
                b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01234",
                b"56789",
            ]),
            Reply::Send(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]),
            Reply::Send(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]),
        ])
        .await;
        let pool = origin.pool();
        for expected in 1..=2 {
            exchange(&pool, post("/", "")).await.unwrap();
            assert_eq!(origin.accepted(), expected);
        }
        // A body dropped before its end takes its connection with it.
        let response = pool.send(post("/", "")).await.unwrap();
        drop(response);
        exchange(&pool, post("/", "")).await.unwrap();
        assert_eq!(origin.accepted(), 4);
        // That one was read to its end: reused.
        exchange(&pool, post("/", "")).await.unwrap();
        assert_eq!(origin.accepted(), 4);
    }

    #[tokio::test]
    async fn an_idle_connection_the_origin_closed_is_replaced_not_failed() {
        let origin = Origin::start(vec![
            Reply::SendAndClose(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]),
            Reply::Send(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nnew"]),
        ])
        .await;
        let pool = origin.pool();
        exchange(&pool, post("/", "")).await.unwrap();
        // Let the origin's close arrive while the connection sits in the pool.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            exchange(&pool, post("/", "")).await.unwrap(),
            (200, b"new".to_vec())
        );
        assert_eq!(origin.accepted(), 2);
    }

    #[tokio::test]
    async fn interim_responses_are_skipped_and_an_undelimited_body_runs_to_the_close() {
        let origin = Origin::start(vec![Reply::SendAndClose(vec![
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil ",
            b"the end",
        ])])
        .await;
        let pool = origin.pool();
        let response = pool.send(post("/", "")).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/plain");
        assert!(!response.headers().contains_key("link"));
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"until the end");
    }

    #[tokio::test]
    async fn broken_responses_are_errors_that_say_what_broke() {
        let cases: Vec<(Reply, &str)> = vec![
            (
                Reply::SendAndClose(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01234"]),
                "upstream closed the connection in the middle of the body",
            ),
            (
                Reply::SendAndClose(vec![
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab",
                ]),
                "upstream closed the connection in the middle of the body",
            ),
            (
                Reply::SendAndClose(vec![
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nQ\r\n",
                ]),
                "malformed response from upstream: chunk size line",
            ),
            (
                Reply::SendAndClose(vec![]),
                "upstream closed the connection before responding",
            ),
            (
                Reply::SendAndClose(vec![b"HTTP/1.1 200 OK\r\ncontent-le"]),
                "upstream closed the connection in the middle of the response head",
            ),
            (
                Reply::SendAndClose(vec![b"HTTP/1.1 2000 OK\r\n\r\n"]),
                "malformed response from upstream: response head",
            ),
            (
                Reply::SendAndClose(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\n"]),
                "malformed response from upstream: conflicting content-lengths",
            ),
            (
                Reply::SendAndClose(vec![b"HTTP/1.1 101 Switching Protocols\r\n\r\n"]),
                "malformed response from upstream: 101",
            ),
        ];
        for (reply, expected) in cases {
            let origin = Origin::start(vec![reply]).await;
            let e = exchange(&origin.pool(), post("/", ""))
                .await
                .expect_err(expected);
            let message = crate::http_client::error_chain(&*e);
            assert!(message.starts_with(expected), "{message}");
        }
    }

    #[tokio::test]
    async fn an_oversized_response_head_is_refused() {
        let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
        let value = "v".repeat(4000);
        while head.len() <= MAX_HEAD_BYTES {
            head.extend_from_slice(format!("x-filler: {value}\r\n").as_bytes());
        }
        let head: &'static [u8] = head.leak();
        let origin = Origin::start(vec![Reply::SendAndClose(vec![head])]).await;
        let e = exchange(&origin.pool(), post("/", "")).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "malformed response from upstream: response head or line longer than 64 KiB"
        );
    }

    /// An origin running `handle` on each connection it accepts, with the connection's number
    /// (from 0).
    async fn serve<F, Fut>(handle: F) -> Arc<OriginPool>
    where
        F: Fn(TcpStream, usize) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for n in 0.. {
                let (conn, _) = listener.accept().await.unwrap();
                tokio::spawn(handle(conn, n));
            }
        });
        pool_for(addr)
    }

    fn pool_for(addr: SocketAddr) -> Arc<OriginPool> {
        OriginPool::new(
            &format!("http://{addr}"),
            &ClientOptions {
                ca_file: None,
                connect_timeout: Duration::from_secs(2),
                pool_max_idle_per_host: 8,
            },
        )
        .unwrap()
    }

    /// Reads up to the end of a request head; returns how many body bytes came with it and the
    /// request's content-length.
    async fn read_head_only(conn: &mut TcpStream) -> Option<(usize, usize)> {
        let mut got = Vec::new();
        let (head, length) = read_request_head(conn, &mut got).await?;
        Some((got.len() - head, length))
    }

    /// An origin may answer a large request before reading all of it (hyper's client takes
    /// that answer too): whether it then closes (the unread bytes reset the connection) or
    /// holds the connection without reading, the answer is the response, and the connection
    /// is not reused. An interim 100 Continue is no such answer: the body still goes out.
    #[tokio::test]
    async fn an_answer_before_the_whole_request_is_the_response() {
        const REFUSAL: &[u8] = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\n\r\nbig";
        let pool = serve(|mut conn, n| async move {
            match n {
                0 | 1 => {
                    read_head_only(&mut conn).await;
                    conn.write_all(REFUSAL).await.unwrap();
                    if n == 1 {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                }
                _ => {
                    while let Some((mut read, length)) = read_head_only(&mut conn).await {
                        conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                            .await
                            .unwrap();
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        let mut buf = vec![0; 1 << 16];
                        while read < length {
                            read += conn.read(&mut buf).await.unwrap();
                        }
                        let reply: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        conn.write_all(reply).await.unwrap();
                    }
                }
            }
        })
        .await;
        let large = Bytes::from(vec![b'x'; 32 << 20]);
        for expected in [
            (413, &b"big"[..]),
            (413, b"big"),
            (200, b"ok"),
            (200, b"ok"),
        ] {
            let (status, body) = tokio::time::timeout(
                Duration::from_secs(10),
                exchange(&pool, post("/", large.clone())),
            )
            .await
            .expect("no response")
            .map_err(|e| crate::http_client::error_chain(&*e))
            .unwrap();
            assert_eq!((status, &body[..]), expected);
        }
    }

    /// Bytes behind a response's end (a second response nobody asked for) never answer the
    /// next request: the connection they came on is not reused.
    #[tokio::test]
    async fn bytes_after_a_response_are_not_taken_for_the_next_one() {
        let origin = Origin::start(vec![
            Reply::Send(vec![
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nevil",
            ]),
            Reply::Send(vec![
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nevil",
            ]),
            Reply::Send(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ngood"]),
        ])
        .await;
        let pool = origin.pool();
        for expected in [&b"ok"[..], b"ok", b"good"] {
            let (_, body) = exchange(&pool, post("/", "")).await.unwrap();
            assert_eq!(body, expected);
        }
        assert_eq!(origin.accepted(), 3);
    }

    /// Bodies many times the read buffer, chunked (sizes, long chunk extensions and the
    /// pieces they arrive in drawn at random) and with a length, come through whole on one
    /// connection.
    #[tokio::test]
    async fn bodies_larger_than_the_read_buffer_come_whole() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let data: Vec<u8> = (0..300_000).map(|_| rng.random()).collect();
        let mut chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        for c in data.chunks(rng.random_range(1000..40_000)) {
            let ext = "e".repeat(rng.random_range(0..3000));
            chunked.extend_from_slice(format!("{:x};x=\"{ext}\"\r\n", c.len()).as_bytes());
            chunked.extend_from_slice(c);
            chunked.extend_from_slice(b"\r\n");
        }
        chunked.extend_from_slice(b"0\r\nx-t: 1\r\n\r\n");
        let mut length =
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", data.len()).into_bytes();
        length.extend_from_slice(&data);
        let mut script = Vec::new();
        for response in [&chunked, &length, &chunked] {
            let mut pieces: Vec<&'static [u8]> = Vec::new();
            let mut at = 0;
            while at < response.len() {
                let n = rng.random_range(1..20_000).min(response.len() - at);
                pieces.push(response[at..at + n].to_vec().leak());
                at += n;
            }
            script.push(Reply::Send(pieces));
        }
        let origin = Origin::start(script).await;
        let pool = origin.pool();
        for _ in 0..3 {
            let (_, body) = exchange(&pool, post("/", "")).await.unwrap();
            assert!(body == data);
        }
        assert_eq!(origin.accepted(), 1);
    }
}
