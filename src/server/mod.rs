//! The data-plane listener: accepts connections, serves HTTP/1.1 on each ([`h1`]), closes
//! client connections that sit idle or send a request head too slowly, and shuts down
//! gracefully (stop accepting, let in-flight requests finish within the grace period, then
//! sync the ledger).

mod h1;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http_body::Body;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use h1::{BodyError, RequestBody};

use crate::proxy::Gateway;

/// Backoff after `accept` fails (e.g. out of file descriptors), so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

pub(crate) fn spawn_data_plane(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    grace: Duration,
    idle_timeout: Duration,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    // Boxed once: the request's future is several kilobytes (it holds the meter, the request
    // parts and the upstream exchange), and each layer that moves it by value copies it all.
    spawn_listener(listener, grace, idle_timeout, stop, move |req| {
        Box::pin(gateway.clone().handle(req))
    })
}

/// Serves HTTP/1.1 on `listener` with `handler` until `stop` changes, then drains: idle
/// connections close at once, busy ones after the response in progress, and whatever is left
/// after `grace` is left to the runtime's end.
///
/// A client connection with no request in progress that completes no request head and takes
/// no response bytes for a whole `idle_timeout` is closed: an idle keep-alive connection, or
/// one sending its head too slowly (a slow-loris client), goes after between one and two
/// periods. A timer armed and dropped for every request would cost 2 % of the instructions
/// of a proxied chat request; this checks once per period (see [`until_idle`]).
pub(crate) fn spawn_listener<H, F, B>(
    listener: TcpListener,
    grace: Duration,
    idle_timeout: Duration,
    mut stop: watch::Receiver<bool>,
    handler: H,
) -> JoinHandle<()>
where
    H: Fn(http::Request<RequestBody>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = http::Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: std::fmt::Display + Send,
{
    tokio::spawn(async move {
        // Each connection holds a receiver: the sender sees when the last one has ended.
        let (drain, draining) = watch::channel(false);
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.changed() => break,
            };
            let (stream, _peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let shared = h1::Shared::new(stream);
            let conn = h1::Conn::new(shared.clone(), handler.clone());
            let draining = draining.clone();
            tokio::spawn(async move {
                match until_idle(conn.run(draining), &shared.activity, idle_timeout).await {
                    Some(Err(e)) => tracing::debug!(error = %e, "connection ended with an error"),
                    Some(Ok(())) => {}
                    None => tracing::debug!("closed an idle client connection"),
                }
            });
        }
        drop(listener);
        drop(draining);
        let _ = drain.send(true);
        if tokio::time::timeout(grace, drain.closed()).await.is_err() {
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                "grace period over; dropping in-flight connections"
            );
        }
    })
}

/// Runs `conn` to its end (`Some`), or until a check every `period` finds it idle (`None`;
/// dropping the connection closes its socket).
async fn until_idle<C: Future>(
    conn: C,
    activity: &Activity,
    period: Duration,
) -> Option<C::Output> {
    let mut conn = std::pin::pin!(conn);
    let mut tick = std::pin::pin!(tokio::time::sleep(period));
    let mut registered = false;
    let mut last = Mark::default();
    std::future::poll_fn(|cx| {
        // The timer is polled when it is due, not at every wake of the connection (several
        // per request): its first poll registered this task's waker, which wakes it when due.
        // It is polled before the connection, while the task's coop budget is whole: a poll
        // refused for budget would register nothing, and the check would never run again.
        while !registered || tick.is_elapsed() {
            if tick.as_mut().poll(cx).is_pending() {
                registered = true;
                break;
            }
            if activity.idle_since(last) {
                return Poll::Ready(None);
            }
            last = activity.mark();
            tick.as_mut().reset(tokio::time::Instant::now() + period);
            registered = false;
        }
        conn.as_mut().poll(cx).map(Some)
    })
    .await
}

/// What a connection's idle check looks at: request heads completed, responses done (their
/// bodies ended or dropped), bytes written to the client (a slow client may still be taking
/// the last of a response), request body bytes read, and whether the request in progress
/// waits on the client (for body bytes, or for room to write). All are counted on the
/// connection's own task, as is the check, so relaxed atomics suffice.
#[derive(Default)]
struct Activity {
    started: AtomicU64,
    finished: AtomicU64,
    written: AtomicU64,
    read: AtomicU64,
    waiting_on_client: AtomicBool,
    /// Waits on the client begun (the flag set from false): a wait's start counts as
    /// movement, so a check cuts only a wait that spans a whole period.
    waits: AtomicU64,
}

/// What a check saw: heads completed, bytes written, body bytes read.
#[derive(Clone, Copy, Default, PartialEq)]
struct Mark {
    heads: u64,
    written: u64,
    read: u64,
    waits: u64,
}

impl Activity {
    fn mark(&self) -> Mark {
        Mark {
            heads: self.started.load(Ordering::Relaxed),
            written: self.written.load(Ordering::Relaxed),
            read: self.read.load(Ordering::Relaxed),
            waits: self.waits.load(Ordering::Relaxed),
        }
    }

    /// Nothing moved since `last` (no head completed, no byte written, no body byte read),
    /// and no request is in progress or the one in progress waits on the client: a stalled
    /// upload or a client that stopped reading its response. A request waiting on its
    /// upstream is never idle (upstream timeouts govern that).
    fn idle_since(&self, last: Mark) -> bool {
        let now = self.mark();
        now == last
            && (now.heads == self.finished.load(Ordering::Relaxed)
                || self.waiting_on_client.load(Ordering::Relaxed))
    }

    fn set_waiting(&self, waiting: bool) {
        if waiting && !self.waiting_on_client.load(Ordering::Relaxed) {
            self.waits
                .store(self.waits.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        }
        self.waiting_on_client.store(waiting, Ordering::Relaxed);
    }

    fn add_read(&self, n: usize) {
        self.read.store(
            self.read.load(Ordering::Relaxed) + n as u64,
            Ordering::Relaxed,
        );
    }
}

/// Reports the address a listener really bound (port 0 resolved).
pub(crate) fn local_addr(listener: &TcpListener) -> std::io::Result<SocketAddr> {
    listener.local_addr()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::{Frame, SizeHint};
    use http_body_util::{BodyExt, Full};
    use std::pin::Pin;
    use std::task::Context;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    const IDLE: Duration = Duration::from_millis(150);

    /// A chunked body of `left` chunks, one every 60 ms.
    struct Drip {
        left: u32,
        sleep: Pin<Box<tokio::time::Sleep>>,
    }

    impl Body for Drip {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if self.left == 0 {
                return Poll::Ready(None);
            }
            std::task::ready!(self.sleep.as_mut().poll(cx));
            self.left -= 1;
            let next = tokio::time::Instant::now() + Duration::from_millis(60);
            self.sleep.as_mut().reset(next);
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"drop;")))))
        }
    }

    enum TestBody {
        Full(Full<Bytes>),
        Drip(Drip),
    }

    impl Body for TestBody {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            match self.get_mut() {
                TestBody::Full(b) => Pin::new(b).poll_frame(cx),
                TestBody::Drip(b) => Pin::new(b).poll_frame(cx),
            }
        }

        fn size_hint(&self) -> SizeHint {
            match self {
                TestBody::Full(b) => b.size_hint(),
                TestBody::Drip(_) => SizeHint::default(),
            }
        }
    }

    /// A listener with a short idle timeout: `/drip` streams 10 chunks over 600 ms (four
    /// idle periods), `/upload` reads the body whole and answers its length, `/slow-read`
    /// takes the body's first frame, thinks for 2.5 periods (as a handler waiting on its
    /// upstream would), then reads the rest and answers its length, `/think` answers after
    /// 600 ms, `/big` answers 32 MiB, anything else answers `ok`.
    async fn serve() -> (SocketAddr, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stop_rx) = watch::channel(false);
        spawn_listener(
            listener,
            Duration::from_secs(1),
            IDLE,
            stop_rx,
            |req: http::Request<h1::RequestBody>| async move {
                let full = |b: Bytes| TestBody::Full(Full::new(b));
                let body = match req.uri().path() {
                    "/drip" => TestBody::Drip(Drip {
                        left: 10,
                        sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
                    }),
                    "/upload" => match req.into_body().collect().await {
                        Ok(b) => full(Bytes::from(format!("got {}", b.to_bytes().len()))),
                        Err(e) => full(Bytes::from(format!("body error: {e}"))),
                    },
                    "/slow-read" => {
                        let mut body = req.into_body();
                        let first = match body.frame().await {
                            Some(Ok(f)) => f.into_data().map_or(0, |d| d.len()),
                            _ => 0,
                        };
                        tokio::time::sleep(IDLE * 5 / 2).await;
                        full(Bytes::from(match body.collect().await {
                            Ok(b) => format!("got {}", first + b.to_bytes().len()),
                            Err(e) => format!("body error: {e}"),
                        }))
                    }
                    "/think" => {
                        tokio::time::sleep(4 * IDLE).await;
                        full(Bytes::from_static(b"thought"))
                    }
                    "/big" => full(Bytes::from(vec![b'x'; 32 << 20])),
                    _ => full(Bytes::from_static(b"ok")),
                };
                http::Response::new(body)
            },
        );
        (addr, stop)
    }

    /// Sends a GET and reads its response up to `end`.
    async fn get(conn: &mut TcpStream, path: &str, end: &[u8]) -> Vec<u8> {
        let req = format!("GET {path} HTTP/1.1\r\nhost: t\r\n\r\n");
        conn.write_all(req.as_bytes()).await.unwrap();
        read_until(conn, end).await
    }

    /// Reads from `conn` until what came ends with `end` (failing if it closes first).
    async fn read_until(conn: &mut TcpStream, end: &[u8]) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(end) {
            let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
                .await
                .expect("response in time")
                .unwrap();
            assert!(
                n > 0,
                "closed mid-response: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    /// Whether the server closes `conn` within `within` (reading nothing more).
    async fn closed_within(conn: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(within, conn.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed() {
        let (addr, _stop) = serve().await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        get(&mut conn, "/", b"ok").await;
        let idle = std::time::Instant::now();
        assert!(closed_within(&mut conn, Duration::from_secs(3)).await);
        assert!(idle.elapsed() >= IDLE, "closed after {:?}", idle.elapsed());

        // A connection that never sends a request goes too.
        let mut conn = TcpStream::connect(addr).await.unwrap();
        assert!(closed_within(&mut conn, Duration::from_secs(3)).await);
    }

    #[tokio::test]
    async fn a_head_sent_too_slowly_is_cut_off() {
        let (addr, _stop) = serve().await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        get(&mut conn, "/", b"ok").await;
        conn.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        // A header line every 30 ms: bytes keep coming, the head never completes.
        let started = std::time::Instant::now();
        let mut closed = false;
        for i in 0..100 {
            if conn
                .write_all(format!("x-slow-{i}: 1\r\n").as_bytes())
                .await
                .is_err()
                || closed_within(&mut conn, Duration::from_millis(30)).await
            {
                closed = true;
                break;
            }
        }
        assert!(closed, "still open after {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn a_response_streaming_for_several_periods_is_not_cut() {
        let (addr, _stop) = serve().await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let got = get(&mut conn, "/drip", b"0\r\n\r\n").await;
        let text = String::from_utf8_lossy(&got);
        assert_eq!(text.matches("drop;").count(), 10, "{text}");
        // Idle afterwards: closed then.
        assert!(closed_within(&mut conn, Duration::from_secs(3)).await);
    }

    #[tokio::test]
    async fn a_connection_in_use_stays_open() {
        let (addr, _stop) = serve().await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        // Twelve requests 50 ms apart: four idle periods, each with requests in it.
        for _ in 0..12 {
            let got = get(&mut conn, "/", b"ok").await;
            assert!(got.starts_with(b"HTTP/1.1 200"));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A `Sleep` polled with the task's coop budget used up returns `Pending` without creating
    /// its timer entry (tokio 1.54: `poll_proceed` comes first); were the timer polled after
    /// the connection, `is_elapsed()` would stay false and the check never run again. Here
    /// the connection's first poll spends the budget, as a handler polled in it may.
    #[tokio::test]
    async fn the_idle_check_survives_a_first_poll_that_spent_the_budget() {
        let activity = Activity::default();
        let mut first = true;
        let conn = std::future::poll_fn(move |cx| {
            if first {
                first = false;
                loop {
                    let mut spend = Box::pin(tokio::task::consume_budget());
                    if spend.as_mut().poll(cx).is_pending() {
                        break;
                    }
                }
            }
            Poll::<()>::Pending
        });
        let r = tokio::time::timeout(IDLE * 10, until_idle(conn, &activity, IDLE)).await;
        assert!(
            matches!(r, Ok(None)),
            "an idle connection was never checked"
        );
    }

    /// Serves `handler` with the test idle timeout.
    async fn serve_full<H, F>(handler: H) -> (SocketAddr, watch::Sender<bool>)
    where
        H: Fn(http::Request<RequestBody>) -> F + Clone + Send + Sync + 'static,
        F: std::future::Future<Output = http::Response<Full<Bytes>>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stop_rx) = watch::channel(false);
        spawn_listener(listener, Duration::from_secs(1), IDLE, stop_rx, handler);
        (addr, stop)
    }

    /// The same through `spawn_listener`: a handler that spends the budget in the
    /// connection's first poll leaves that connection open for good once idle.
    #[tokio::test]
    async fn a_connection_whose_first_request_spent_the_budget_is_closed_when_idle() {
        let (addr, _stop) = serve_full(|_req| async move {
            for _ in 0..300 {
                tokio::task::consume_budget().await;
            }
            http::Response::new(Full::new(Bytes::from_static(b"ok")))
        })
        .await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        get(&mut conn, "/", b"ok").await;
        assert!(
            closed_within(&mut conn, Duration::from_secs(3)).await,
            "never closed"
        );
    }

    /// A response is counted finished when its last frame is taken, before it is all
    /// written (a 32 MB `Full` frame goes out as the client reads it): without the bytes
    /// written counted, a check finding the connection idle would drop it with the rest
    /// unsent. Here a steady reader of a 32 MB response takes about 2 s (over ten periods).
    #[tokio::test]
    async fn a_large_response_is_not_cut_while_a_slow_client_reads_it() {
        const SIZE: usize = 32 << 20;
        let (addr, _stop) = serve_full(|_req| async move {
            http::Response::new(Full::new(Bytes::from(vec![b'x'; SIZE])))
        })
        .await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
            .await
            .unwrap();
        let mut got = 0;
        let mut buf = vec![0u8; 64 << 10];
        while got < SIZE {
            let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
                .await
                .expect("response in time")
                .unwrap_or(0);
            assert!(n > 0, "closed after {got} of the response's {SIZE}+ bytes");
            got += n;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    #[tokio::test]
    async fn a_stalled_upload_is_cut_off_but_a_slow_one_is_not() {
        let (addr, _stop) = serve().await;
        // Slow but moving: a byte every 50 ms for 12 periods' worth.
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"POST /upload HTTP/1.1\r\ncontent-length: 36\r\n\r\n")
            .await
            .unwrap();
        for _ in 0..36 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            conn.write_all(b"x").await.unwrap();
        }
        read_until(&mut conn, b"got 36").await;
        // Stalled: part of the body, then nothing.
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"POST /upload HTTP/1.1\r\ncontent-length: 10\r\n\r\nabc")
            .await
            .unwrap();
        assert!(
            closed_within(&mut conn, Duration::from_secs(3)).await,
            "still open"
        );
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_its_response_is_cut_off() {
        let (addr, _stop) = serve().await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"GET /big HTTP/1.1\r\n\r\n").await.unwrap();
        // Nothing read: the server fills the socket buffers and waits on the client.
        tokio::time::sleep(IDLE * 6).await;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0;
        loop {
            match tokio::time::timeout(Duration::from_secs(3), conn.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => break,
                Ok(Ok(n)) => total += n,
                Err(_) => panic!("still open after {total} bytes"),
            }
        }
        assert!(total < 32 << 20, "the whole response came");
    }

    #[tokio::test]
    async fn a_request_waiting_on_its_upstream_is_not_idle() {
        let (addr, _stop) = serve().await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        // Four idle periods without a byte either way, the body (none) all read.
        get(&mut conn, "/think", b"thought").await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"POST /think HTTP/1.1\r\ncontent-length: 2\r\n\r\nhi")
            .await
            .unwrap();
        read_until(&mut conn, b"thought").await;
    }

    /// The handler spends 2.5 periods on its own work, then waits on the client for one
    /// period: the check at 3.0 sees nothing moved since 2.0 and the client waited on, but
    /// the wait began after 2.0, so it is not a whole period yet.
    #[tokio::test]
    async fn a_wait_on_the_client_is_timed_from_its_start() {
        let (addr, _stop) = serve().await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"POST /slow-read HTTP/1.1\r\ncontent-length: 6\r\n\r\nabc")
            .await
            .unwrap();
        tokio::time::sleep(IDLE * 7 / 2).await;
        let _ = conn.write_all(b"def").await;
        read_until(&mut conn, b"got 6").await;
    }

    /// A body the handler left unread is discarded after the response; its bytes are no
    /// progress (the response is done), so a client trickling it (the proxy answers 401
    /// without reading the body: no key needed) is closed after one to two periods.
    #[tokio::test]
    async fn a_trickled_discard_is_cut_off() {
        let (addr, _stop) = serve().await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"POST / HTTP/1.1\r\ncontent-length: 100000\r\n\r\n")
            .await
            .unwrap();
        read_until(&mut conn, b"ok").await;
        let mut buf = [0u8; 64];
        // Ten periods of one byte every third of a period.
        for _ in 0..30 {
            if conn.write_all(b"x").await.is_err() {
                return; // closed
            }
            match tokio::time::timeout(IDLE / 3, conn.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => return, // closed
                Ok(Ok(n)) => panic!("unexpected bytes: {n}"),
                Err(_) => {}
            }
        }
        panic!("a client trickling the unread body kept its connection for ten periods");
    }
}
