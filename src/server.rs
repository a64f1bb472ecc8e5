//! The data-plane listener: accepts connections, serves HTTP/1.1 with hyper, and shuts down
//! gracefully (stop accepting, let in-flight requests finish within the grace period, then
//! sync the ledger).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::proxy::Gateway;

/// Backoff after `accept` fails (e.g. out of file descriptors), so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

pub(crate) fn spawn_data_plane(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    grace: Duration,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    // Boxed once: the request's future is several kilobytes (it holds the meter, the request
    // parts and the upstream exchange), and each layer that moves it by value copies it all.
    spawn_listener(listener, grace, stop, move |req| {
        Box::pin(gateway.clone().handle(req))
    })
}

/// Serves HTTP/1.1 on `listener` with `handler` until `stop` changes, then drains.
pub(crate) fn spawn_listener<H, F, B>(
    listener: TcpListener,
    grace: Duration,
    mut stop: watch::Receiver<bool>,
    handler: H,
) -> JoinHandle<()>
where
    H: Fn(hyper::Request<hyper::body::Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = hyper::Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::spawn(async move {
        let graceful = GracefulShutdown::new();
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new());
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
            let handler = handler.clone();
            let service = service_fn(move |req| {
                let response = handler(req);
                async move { Ok::<_, std::convert::Infallible>(response.await) }
            });
            let conn = http.serve_connection(TokioIo::new(stream), service);
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            });
        }
        drop(listener);
        if tokio::time::timeout(grace, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                "grace period over; dropping in-flight connections"
            );
        }
    })
}

/// Reports the address a listener really bound (port 0 resolved).
pub(crate) fn local_addr(listener: &TcpListener) -> std::io::Result<SocketAddr> {
    listener.local_addr()
}
