//! A formation whose monitor and nodes serve HTTP health checks and metrics
//! (`--http-listen` on free loopback ports), built on the `support` harness,
//! and a small HTTP/1.1 client for the tests that read them.

#![allow(dead_code)]

mod metrics_text;

#[allow(unused_imports)]
pub use self::metrics_text::{promtool, sample};

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::support::{free_port, Cluster, Node};

/// A running formation and the HTTP address of each of its processes
/// (`monitor`, and each node by name).
pub struct HttpFormation {
    /// The cluster.
    pub cluster: Cluster,
    /// Process name -> `--http-listen` address.
    pub http: BTreeMap<String, SocketAddr>,
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

impl HttpFormation {
    /// The monitor, then `names` in order (the first ends up primary), each
    /// with `--http-listen` on a free loopback port, and `extra` arguments
    /// (such as `--log-format json`) given to every `create ... --run`.
    pub fn start(names: &[&str], extra: &[&str], timeout: Duration) -> HttpFormation {
        let mut cluster = Cluster::new();
        let mut http = BTreeMap::new();
        cluster.monitor_port = free_port();
        let addr = loopback();
        let port = cluster.monitor_port.to_string();
        let addr_s = addr.to_string();
        let mut args = vec![
            "create",
            "monitor",
            "--pgdata",
            "./monitor",
            "--pgport",
            &port,
            "--hostname",
            "localhost",
            "--auth",
            "trust",
            "--ssl-self-signed",
            "--http-listen",
            &addr_s,
            "--run",
        ];
        args.extend_from_slice(extra);
        cluster.spawn("monitor", &args);
        http.insert("monitor".to_string(), addr);
        cluster.eventually("the monitor to answer", Duration::from_secs(60), || {
            cluster
                .run(&["show", "state", "--pgdata", "./monitor"])
                .status
                .success()
        });
        let monitor_uri = cluster.monitor_uri();
        for (i, name) in names.iter().enumerate() {
            let port = free_port();
            let addr = loopback();
            let (port_s, addr_s, pgdata) =
                (port.to_string(), addr.to_string(), format!("./{name}"));
            let mut args = vec![
                "create",
                "postgres",
                "--pgdata",
                &pgdata,
                "--pgport",
                &port_s,
                "--hostname",
                "localhost",
                "--name",
                name,
                "--dbname",
                "appdb",
                "--auth",
                "trust",
                "--ssl-self-signed",
                "--monitor",
                &monitor_uri,
                "--http-listen",
                &addr_s,
                "--run",
            ];
            args.extend_from_slice(extra);
            cluster.spawn(name, &args);
            let pgdata = cluster.path().join(name);
            cluster.nodes.push(Node {
                name: name.to_string(),
                pgdata,
                port,
            });
            http.insert(name.to_string(), addr);
            if i == 0 {
                cluster.wait_states(&[(name, "single")], timeout);
            }
        }
        let want: Vec<(&str, &str)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (*n, if i == 0 { "primary" } else { "secondary" }))
            .collect();
        if names.len() > 1 {
            cluster.wait_states(&want, timeout);
        }
        HttpFormation { cluster, http }
    }

    /// The HTTP address of process `name`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.http[name]
    }

    /// `GET path` on process `name`: (status, body); status 0 when it does not answer.
    pub fn get(&self, name: &str, path: &str) -> (u16, String) {
        get(self.addr(name), path)
    }

    /// Waits (bounded) until `GET path` on `name` answers `status`.
    pub fn wait_status(&self, name: &str, path: &str, status: u16, timeout: Duration) {
        let mut last = (0, String::new());
        self.cluster.eventually(
            &format!("{name} {path} to answer {status}"),
            timeout,
            || {
                last = self.get(name, path);
                last.0 == status
            },
        );
    }
}

/// `GET path` over HTTP/1.1 at `addr`, within 5 s: (status, body); status 0
/// when nothing answers.
pub fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    get_with(addr, path, "")
}

/// [`get`] with extra header lines (each ending in `\r\n`).
pub fn get_with(addr: SocketAddr, path: &str, headers: &str) -> (u16, String) {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        return (0, String::new());
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}
