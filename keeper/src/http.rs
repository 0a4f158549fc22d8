//! The HTTP server `hapg run` starts on `http.listen`: health checks and
//! `/metrics`, answered from the latest snapshot the keeper (or the
//! monitor's poller) published, so a request never waits on Postgres or the
//! monitor, and the keeper's loop never waits on a request. Served by the
//! bounded server of `hapg_monitor::http_server`.

use std::net::SocketAddr;
use std::time::Instant;

use hapg_monitor::http_server::{self, Asked, Limits};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::KeeperError;
use crate::monitor_status::MonitorStatus;
use crate::node_status::{self, Answer, NodeStatus};

/// 64 connections at once (a health checker opens one or two, Prometheus
/// one), 5 s for the headers, 30 s per connection, 8 kB of headers.
const LIMITS: Limits = Limits::with_connections(64);

/// What the server answers from.
#[derive(Clone)]
pub enum Endpoints {
    /// A node: its keeper's snapshot.
    Node(watch::Receiver<NodeStatus>),
    /// The monitor: its poller's snapshot.
    Monitor(watch::Receiver<MonitorStatus>),
}

impl Endpoints {
    fn answer(&self, asked: Asked<'_>) -> Answer {
        let now = Instant::now();
        let (path, query) = (asked.path, asked.query);
        match self {
            Endpoints::Node(status) => {
                let status = status.borrow().clone();
                if path == "/metrics" {
                    return match query {
                        None => {
                            Answer::metrics_as_asked(crate::metrics::node(&status, now), &asked)
                        }
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
                        None => {
                            Answer::metrics_as_asked(crate::metrics::monitor(&status, now), &asked)
                        }
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
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving health checks and metrics over HTTP");
    }
    http_server::serve(
        listener,
        LIMITS,
        move |asked| endpoints.answer(asked),
        token,
    )
    .await;
}
