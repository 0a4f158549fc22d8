//! The HTTP server `hapg run` starts on `http.listen`: health checks and
//! `/metrics`, answered from the latest snapshot the keeper (or the
//! monitor's poller) published, so a request never waits on Postgres or the
//! monitor, and the keeper's loop never waits on a request. Bounded against
//! hostile clients: connections at once, header size, time per request and
//! per connection; request bodies are never read.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::error::KeeperError;
use crate::monitor_status::MonitorStatus;
use crate::node_status::{self, Answer, NodeStatus};

/// Connections served at once; more are closed at once (a health checker
/// opens one or two, Prometheus one).
const MAX_CONNECTIONS: usize = 64;
/// A client must send its request headers within this long.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection, kept alive or not, is closed after this long.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// Request line and headers larger than this are refused (hyper's minimum).
const MAX_HEADER_BYTES: usize = 8 * 1024;

/// What the server answers from.
#[derive(Clone)]
pub enum Endpoints {
    /// A node: its keeper's snapshot.
    Node(watch::Receiver<NodeStatus>),
    /// The monitor: its poller's snapshot.
    Monitor(watch::Receiver<MonitorStatus>),
}

impl Endpoints {
    fn answer(&self, path: &str, query: Option<&str>, openmetrics: bool) -> Answer {
        let now = Instant::now();
        let metrics = |text: String| {
            if openmetrics {
                Answer::metrics(text)
            } else {
                Answer::prometheus(crate::metrics::prometheus_text(&text))
            }
        };
        match self {
            Endpoints::Node(status) => {
                let status = status.borrow().clone();
                if path == "/metrics" {
                    return match query {
                        None => metrics(crate::metrics::node(&status, now)),
                        Some(_) => Answer::bad_request("/metrics takes no parameter"),
                    };
                }
                node_status::answer(&status, path, query, now)
                    .unwrap_or_else(|| Answer::not_found(path))
            }
            Endpoints::Monitor(status) => {
                let status = status.borrow().clone();
                if path == "/metrics" {
                    return match query {
                        None => metrics(crate::metrics::monitor(&status, now)),
                        Some(_) => Answer::bad_request("/metrics takes no parameter"),
                    };
                }
                status
                    .answer(path, query, now)
                    .unwrap_or_else(|| Answer::not_found(path))
            }
        }
    }
}

/// Binds the listener (an address in use is reported at start, naming the key).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, KeeperError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| KeeperError::Refused(format!("http.listen {addr}: cannot listen ({e})")))
}

/// Serves until `token` is cancelled.
pub async fn serve(listener: TcpListener, endpoints: Endpoints, token: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving health checks and metrics over HTTP");
    }
    loop {
        let accepted = tokio::select! {
            _ = token.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: do not spin.
                tracing::warn!(error = %e, "http: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "http: too many connections, closing this one");
            continue;
        };
        let endpoints = endpoints.clone();
        let token = token.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let answer = respond(&endpoints, &request);
                async move { Ok::<_, Infallible>(answer) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = token.cancelled() => {}
                _ = tokio::time::timeout(CONNECTION_LIFETIME, connection) => {}
            }
            drop(slot);
        });
    }
}

fn respond(endpoints: &Endpoints, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let answer = if request.method() == Method::GET || request.method() == Method::HEAD {
        // Prometheus asks for OpenMetrics in its Accept header; other
        // clients get the classic text format.
        let openmetrics = request
            .headers()
            .get_all(hyper::header::ACCEPT)
            .iter()
            .any(|v| {
                v.to_str()
                    .is_ok_and(|v| v.contains("application/openmetrics-text"))
            });
        endpoints.answer(request.uri().path(), request.uri().query(), openmetrics)
    } else {
        Answer {
            status: 405,
            content_type: "text/plain; charset=utf-8",
            body: "only GET and HEAD\n".to_string(),
        }
    };
    let body = if request.method() == Method::HEAD {
        Bytes::new()
    } else {
        Bytes::from(answer.body)
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = hyper::StatusCode::from_u16(answer.status)
        .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(value) = hyper::header::HeaderValue::from_str(answer.content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}
