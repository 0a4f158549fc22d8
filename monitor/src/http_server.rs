//! The one bounded HTTP server of hapg, for health checks and `/metrics`
//! (a node's and the monitor's `hapg run`, the router's `[metrics]`). It
//! lives in hapg-monitor because that is the lowest crate both the keeper
//! and the router depend on. Bounded against hostile clients: connections
//! at once, header size, time to send the headers, and each connection's
//! lifetime; request bodies are never read; only `GET` and `HEAD` are
//! answered. What to answer is the caller's: a closure from the request's
//! path, query and preferred metrics format to an [`Answer`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The server's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; more are closed at once.
    pub max_connections: usize,
    /// A client must send its request headers within this long.
    pub header_read_timeout: Duration,
    /// A connection, kept alive or not, is closed after this long.
    pub connection_lifetime: Duration,
    /// Request line and headers larger than this are refused (8 kB is
    /// hyper's minimum).
    pub max_header_bytes: usize,
}

impl Limits {
    /// 5 s for the headers, 30 s per connection, 8 kB of headers, and
    /// `max_connections` at once.
    pub const fn with_connections(max_connections: usize) -> Limits {
        Limits {
            max_connections,
            header_read_timeout: Duration::from_secs(5),
            connection_lifetime: Duration::from_secs(30),
            max_header_bytes: 8 * 1024,
        }
    }
}

/// What a `GET` or `HEAD` asked for.
#[derive(Debug, Clone, Copy)]
pub struct Asked<'a> {
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// The client takes OpenMetrics (Prometheus says so in its `Accept`
    /// header); others get the Prometheus text format 0.0.4.
    pub openmetrics: bool,
}

/// An answer: status, content type and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Answer {
    /// A plain text answer.
    pub fn text(status: u16, body: impl Into<String>) -> Answer {
        Answer {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    /// A health check: 200 `what`, or 503 `not what`.
    pub fn check(ok: bool, what: &str) -> Answer {
        if ok {
            Answer::text(200, format!("{what}\n"))
        } else {
            Answer::text(503, format!("not {what}\n"))
        }
    }

    /// 400 naming the parameter at fault.
    pub fn bad_request(message: impl Into<String>) -> Answer {
        Answer::text(400, format!("{}\n", message.into()))
    }

    /// 404.
    pub fn not_found(path: &str) -> Answer {
        Answer::text(404, format!("no such endpoint: {path}\n"))
    }

    /// 200 with metrics in the OpenMetrics text format.
    pub fn metrics(body: String) -> Answer {
        Answer {
            status: 200,
            content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body,
        }
    }

    /// 200 with metrics in the Prometheus text format 0.0.4.
    pub fn prometheus(body: String) -> Answer {
        Answer {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body,
        }
    }

    /// 200 with the OpenMetrics text `openmetrics` in the format the client
    /// asked for.
    pub fn metrics_as_asked(openmetrics: String, asked: &Asked<'_>) -> Answer {
        if asked.openmetrics {
            Answer::metrics(openmetrics)
        } else {
            Answer::prometheus(prometheus_text(&openmetrics))
        }
    }

    /// 200 with a JSON body.
    pub fn json(body: String) -> Answer {
        Answer {
            status: 200,
            content_type: "application/json",
            body,
        }
    }
}

/// The Prometheus text format (0.0.4) of an OpenMetrics text, for scrapers
/// and tools that do not ask for OpenMetrics (`promtool check metrics`
/// reads only this one). The two differ, for what hapg exposes, in three
/// ways: a counter's family is named with its `_total` suffix, and there is
/// no `# UNIT` line and no `# EOF`.
pub fn prometheus_text(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut text = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(line) => text.push_str(&line),
            None => text.push_str(line),
        }
        text.push('\n');
    }
    text
}

/// Serves `listener` within `limits` until `stop` is cancelled, answering
/// each `GET` and `HEAD` with `respond`.
pub async fn serve<F>(listener: TcpListener, limits: Limits, respond: F, stop: CancellationToken)
where
    F: Fn(Asked<'_>) -> Answer + Send + Sync + 'static,
{
    let respond = Arc::new(respond);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
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
        let respond = respond.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let answer = reply(&*respond, &request);
                async move { Ok::<_, Infallible>(answer) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_buf_size(limits.max_header_bytes)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::timeout(limits.connection_lifetime, connection) => {}
            }
            drop(slot);
        });
    }
}

fn reply<F>(respond: &F, request: &Request<Incoming>) -> Response<Full<Bytes>>
where
    F: Fn(Asked<'_>) -> Answer,
{
    let head = request.method() == Method::HEAD;
    let answer = if request.method() == Method::GET || head {
        let openmetrics = request
            .headers()
            .get_all(hyper::header::ACCEPT)
            .iter()
            .any(|v| {
                v.to_str()
                    .is_ok_and(|v| v.contains("application/openmetrics-text"))
            });
        respond(Asked {
            path: request.uri().path(),
            query: request.uri().query(),
            openmetrics,
        })
    } else {
        Answer::text(405, "only GET and HEAD\n")
    };
    let body = if head {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prometheus_text_names_counters_with_total_and_drops_unit_and_eof() {
        let openmetrics = "# HELP up Up.\n# TYPE up gauge\nup 1\n\
            # HELP changes Changes.\n# TYPE changes counter\n# UNIT changes seconds\n\
            changes_total 2\n# EOF\n";
        assert_eq!(
            prometheus_text(openmetrics),
            "# HELP up Up.\n# TYPE up gauge\nup 1\n\
             # HELP changes_total Changes.\n# TYPE changes_total counter\nchanges_total 2\n"
        );
    }
}
