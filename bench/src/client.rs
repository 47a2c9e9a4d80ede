//! The command benchmark's HTTP/1.1 client: hyper's connection API over a pool of keep-alive
//! connections to one server, and nothing else per request.
//!
//! The load generator runs on the same two cores as the server it measures, so its own CPU
//! time is taken from the server's. reqwest does much that a benchmark against one address
//! never needs, per request: parsing a URL, a redirect policy, a timer, the checkout of a
//! general-purpose pool keyed by host. It took 27 % of the process's CPU in the half-load
//! commands, more than the server's own HTTP layer (BENCHMARKS.md, Commands). Here a request
//! takes an idle connection (or opens one), sends a request built from parts, reads the whole
//! answer, and gives the connection back.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderValue, Method, Request, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use super::{Answered, Failure, lock};

/// How long one request may take before it counts as failed.
const TIMEOUT: Duration = Duration::from_secs(30);

/// A pool of keep-alive connections to one server; cheap to clone.
#[derive(Clone)]
pub(super) struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    addr: SocketAddr,
    host: HeaderValue,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
    max_idle: usize,
}

impl Client {
    /// A client of the server at `addr`, keeping up to `max_idle` idle connections.
    pub(super) fn new(addr: SocketAddr, max_idle: usize) -> Self {
        let host = HeaderValue::from_str(&addr.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Client {
            inner: Arc::new(Inner {
                addr,
                host,
                idle: Mutex::new(Vec::with_capacity(max_idle)),
                max_idle,
            }),
        }
    }

    /// Sends one request (a JSON body when `body` is given) and checks that its status is
    /// `expected`; the answer's `Server-Timing` gives the server's own time.
    pub(super) async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        idempotency_key: Option<&str>,
        expected: u16,
    ) -> Result<Answered, Failure> {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.inner.host.clone());
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        if let Some(key) = idempotency_key {
            request = request.header("idempotency-key", key);
        }
        let request = request
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|error| Failure::new("request", error))?;
        match tokio::time::timeout(TIMEOUT, self.exchange(request, expected)).await {
            Ok(result) => result,
            Err(_) => Err(Failure::new("timeout", format!("no answer in {TIMEOUT:?}"))),
        }
    }

    async fn exchange(
        &self,
        request: Request<Full<Bytes>>,
        expected: u16,
    ) -> Result<Answered, Failure> {
        let mut connection = self.connection().await?;
        let response = connection
            .send_request(request)
            .await
            .map_err(|error| Failure::new("transport", error))?;
        let status = response.status().as_u16();
        let server = crate::server_time_of(response.headers());
        // The whole body, so the connection is free for the next request.
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|error| Failure::new("transport", error))?
            .to_bytes();
        self.give_back(connection);
        if status == expected {
            Ok(Answered { server })
        } else {
            Err(Failure::new(
                format!("HTTP {status}"),
                String::from_utf8_lossy(&body),
            ))
        }
    }

    /// An idle connection that can take a request, or a new one.
    async fn connection(&self) -> Result<SendRequest<Full<Bytes>>, Failure> {
        loop {
            let idle = lock(&self.inner.idle).pop();
            let Some(mut connection) = idle else { break };
            // Closed by the server meanwhile: drop it and try the next.
            if connection.ready().await.is_ok() {
                return Ok(connection);
            }
        }
        let stream = tokio::net::TcpStream::connect(self.inner.addr)
            .await
            .map_err(|error| Failure::new("connect", error))?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|error| Failure::new("connect", error))?;
        tokio::spawn(async move {
            // Ends when the connection closes; its errors show in the requests on it.
            let _ = connection.await;
        });
        Ok(sender)
    }

    fn give_back(&self, connection: SendRequest<Full<Bytes>>) {
        let mut idle = lock(&self.inner.idle);
        if idle.len() < self.inner.max_idle && !connection.is_closed() {
            idle.push(connection);
        }
    }
}
