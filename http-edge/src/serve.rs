//! The one way every server of the platform (the parts and the gateway) serves HTTP: hyper's
//! HTTP/1.1 connections with a header-read timeout, a request deadline, a connection cap and a
//! graceful drain.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;

use crate::error::ApiError;

/// What every HTTP server of the platform (the parts and the gateway) allows a connection.
#[derive(Debug, Clone, clap::Args)]
pub struct HttpSettings {
    /// A connection is closed when a request's headers have not all arrived this long (ms)
    /// after it opened or after its previous answer: a client that sends nothing, or its
    /// headers a byte at a time (slowloris), holds a connection no longer than this.
    #[arg(
        long,
        env = "PLATFORM_HTTP_HEADER_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub http_header_timeout_ms: u64,

    /// A request not answered within this long (ms), its body's arrival included, gets 503.
    /// A command sent with an `Idempotency-Key` may then be sent again safely.
    #[arg(
        long,
        env = "PLATFORM_HTTP_REQUEST_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub http_request_timeout_ms: u64,

    /// Connections served at once; further ones wait in the kernel's accept queue until one
    /// closes.
    #[arg(long, env = "PLATFORM_HTTP_MAX_CONNECTIONS", default_value_t = 1024)]
    pub http_max_connections: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        crate::flag_defaults()
    }
}

/// How long a stop waits for the requests in flight once it stops accepting connections.
const DRAIN: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` until `signal` completes, within `limits`
/// ([`HttpSettings`]): a connection whose request headers have not all arrived
/// `http_header_timeout_ms` after it opened (or after its previous answer) is closed, a
/// request not answered within `http_request_timeout_ms` gets 503, and at most
/// `http_max_connections` connections are served at once (further ones wait in the kernel's
/// accept queue). On `signal` it stops accepting and lets the requests in flight finish (up
/// to [`DRAIN`]). Every server of the platform, the gateway's too, runs on it.
pub async fn serve_http(
    listener: TcpListener,
    router: Router,
    limits: &HttpSettings,
    signal: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let router = router.layer(axum::middleware::from_fn_with_state(
        Duration::from_millis(limits.http_request_timeout_ms),
        request_deadline,
    ));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(limits.http_header_timeout_ms));
    let connections = Arc::new(tokio::sync::Semaphore::new(
        limits.http_max_connections.max(1),
    ));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let signal = std::pin::pin!(signal);
    let mut signal = signal;
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut signal => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors, a connection reset before it was taken: wait a
                    // moment rather than spin.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut signal => break,
        };
        no_delay(&stream);
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "HTTP connection ended");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after {DRAIN:?}; stopping anyway");
    }
    Ok(())
}

/// Answers 503 for a request not answered within its deadline (its body's arrival included).
async fn request_deadline(
    State(deadline): State<Duration>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match tokio::time::timeout(deadline, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Unavailable(format!(
            "the request was not answered within {} ms (a slow body, or a busy server); a command sent with an Idempotency-Key may be sent again",
            deadline.as_millis()
        ))
        .into_response(),
    }
}

/// Sets `TCP_NODELAY` on an accepted connection: an answer is one small write, and with
/// Nagle's algorithm a write that follows another unacknowledged one waits for the peer's
/// delayed acknowledgement (up to 40 ms on Linux).
pub fn no_delay(stream: &tokio::net::TcpStream) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "cannot set TCP_NODELAY on an accepted connection");
    }
}
