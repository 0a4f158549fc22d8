//! Test harness: throwaway Postgres 15 instances (run as the `postgres` OS user
//! when the tests run as root), a monitor database whose rows the tests edit to
//! play the monitor's decisions, an in-process router, and a raw protocol client.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use hapg_router::Router;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Where Debian puts the Postgres 15 binaries (override with `PG_BINDIR`).
pub fn bindir() -> PathBuf {
    std::env::var_os("PG_BINDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

fn postgres_ids() -> Option<(u32, u32)> {
    // SAFETY-free check of root: /proc/self/status Uid line.
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let uid: u32 = status
        .lines()
        .find(|l| l.starts_with("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    if uid != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let line = passwd.lines().find(|l| l.starts_with("postgres:"))?;
    let mut fields = line.split(':');
    let uid = fields.nth(2)?.parse().ok()?;
    let gid = fields.next()?.parse().ok()?;
    Some((uid, gid))
}

fn pg_command(program: &str) -> Command {
    let mut cmd = Command::new(bindir().join(program));
    if let Some((uid, gid)) = postgres_ids() {
        cmd.uid(uid).gid(gid);
    }
    cmd.env_remove("PGPORT").env_remove("PGHOST");
    cmd
}

/// Resident memory of this process, in bytes: the in-process router's, for
/// the tests that bound it.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmRSS line");
    kb * 1024
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind port 0")
        .local_addr()
        .expect("local addr")
        .port()
}

/// A running throwaway Postgres instance (trust authentication on loopback).
pub struct Pg {
    pub dir: tempfile::TempDir,
    pub port: u16,
}

impl Pg {
    pub fn start() -> Pg {
        let dir = tempfile::tempdir().expect("tempdir");
        if let Some((uid, gid)) = postgres_ids() {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown");
        }
        let data = dir.path().join("data");
        let out = pg_command("initdb")
            .args([
                "-D",
                data.to_str().expect("utf8"),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "-N",
            ])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            let opts = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50",
                dir.path().display()
            );
            let out = pg_command("pg_ctl")
                .args(["-D", data.to_str().expect("utf8"), "-l"])
                .arg(dir.path().join("log"))
                .args(["-w", "-t", "30", "-o", &opts, "start"])
                .output()
                .expect("run pg_ctl");
            if out.status.success() {
                return Pg { dir, port };
            }
            last = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
        }
        panic!("postgres did not start: {last}");
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn url(&self, user: &str, db: &str) -> String {
        format!("host=127.0.0.1 port={} user={user} dbname={db}", self.port)
    }

    /// A direct connection as the superuser.
    pub async fn connect(&self, db: &str) -> tokio_postgres::Client {
        connect(&self.url("postgres", db))
            .await
            .expect("connect to postgres")
    }

    /// Restarts the instance in recovery (a standby with nothing to follow:
    /// `standby.signal` and no upstream), on the same port.
    pub fn restart_in_recovery(&self) {
        self.stop();
        let signal = self.data().join("standby.signal");
        std::fs::write(&signal, "").expect("write standby.signal");
        if let Some((uid, gid)) = postgres_ids() {
            std::os::unix::fs::chown(&signal, Some(uid), Some(gid)).expect("chown");
        }
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50",
            self.port,
            self.dir.path().display()
        );
        let out = pg_command("pg_ctl")
            .args(["-D", self.data().to_str().expect("utf8"), "-l"])
            .arg(self.dir.path().join("log"))
            .args(["-w", "-t", "30", "-o", &opts, "start"])
            .output()
            .expect("run pg_ctl");
        assert!(
            out.status.success(),
            "restart in recovery: {}",
            std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
        );
    }

    pub fn stop(&self) {
        let _ = pg_command("pg_ctl")
            .args([
                "-D",
                self.data().to_str().expect("utf8"),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .output();
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Connects without TLS and drives the connection in a task.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// A Postgres instance set up as the monitor, plus helpers that play the
/// monitor's decisions by editing its rows and notifying.
pub struct Monitor {
    pub pg: Pg,
    pub client: tokio_postgres::Client,
}

impl Monitor {
    pub async fn start() -> Monitor {
        let pg = Pg::start();
        let admin = pg.connect("postgres").await;
        for sql in [
            "CREATE ROLE autoctl_node LOGIN",
            "CREATE DATABASE pg_auto_failover",
        ] {
            admin.batch_execute(sql).await.expect("create monitor db");
        }
        let mut client = pg.connect("pg_auto_failover").await;
        hapg_monitor::schema::migrate(&mut client)
            .await
            .expect("migrate");
        Monitor { pg, client }
    }

    pub fn uri(&self) -> String {
        format!(
            "postgres://autoctl_node@127.0.0.1:{}/pg_auto_failover",
            self.pg.port
        )
    }

    /// Registers a node row; returns its id.
    pub async fn add_node(&self, name: &str, port: u16, state: &str) -> i64 {
        self.client
            .query_one(
                "INSERT INTO hapg.node (formation_id, node_name, node_host, node_port, goal_state, reported_state)
                 VALUES ('default', $1, '127.0.0.1', $2, $3::text::hapg.replication_state, $3::text::hapg.replication_state)
                 RETURNING node_id",
                &[&name, &i32::from(port), &state],
            )
            .await
            .expect("insert node")
            .get(0)
    }

    /// Sets a node's goal and reported states and notifies.
    pub async fn set_states(&self, node: i64, goal: &str, reported: &str) {
        self.client
            .execute(
                "UPDATE hapg.node SET goal_state = $2::text::hapg.replication_state,
                        reported_state = $3::text::hapg.replication_state WHERE node_id = $1",
                &[&node, &goal, &reported],
            )
            .await
            .expect("update node");
        self.notify(node).await;
    }

    /// Makes `node` the formation's primary with a new epoch, and notifies.
    pub async fn set_primary(&self, node: i64, epoch: i64) {
        self.client
            .execute(
                "UPDATE hapg.formation SET primary_epoch = $2, primary_node_id = $1 WHERE formation_id = 'default'",
                &[&node, &epoch],
            )
            .await
            .expect("update formation");
        self.notify(node).await;
    }

    async fn notify(&self, node: i64) {
        self.client
            .execute(
                "SELECT pg_notify('hapg_state', json_build_object('nodeId', $1::bigint)::text)",
                &[&node],
            )
            .await
            .expect("notify");
    }

    /// Plays `hapg perform switchover` being accepted: the formation's drain
    /// request is set and notified on `hapg_drain`.
    pub async fn request_switchover(&self) {
        self.client
            .batch_execute(
                "UPDATE hapg.formation SET switchover_requested_at = clock_timestamp()
                  WHERE formation_id = 'default';
                 SELECT pg_notify('hapg_drain', 'default');",
            )
            .await
            .expect("request switchover");
    }

    /// Plays an abandoned switchover: the request goes back to NULL, with no
    /// epoch change and no notification (as the monitor does).
    pub async fn abandon_switchover(&self) {
        self.client
            .batch_execute(
                "UPDATE hapg.formation SET switchover_requested_at = NULL WHERE formation_id = 'default'",
            )
            .await
            .expect("abandon switchover");
    }

    /// Plays the monitor going on with the switchover: in one transaction, the
    /// primary `node` is told to drain and the request is cleared; notified.
    pub async fn proceed_with_switchover(&self, node: i64) {
        self.client
            .batch_execute(&format!(
                "UPDATE hapg.node SET goal_state = 'draining' WHERE node_id = {node};
                 UPDATE hapg.formation SET switchover_requested_at = NULL WHERE formation_id = 'default';
                 SELECT pg_notify('hapg_state', json_build_object('nodeId', {node}::bigint)::text);"
            ))
            .await
            .expect("proceed with switchover");
    }

    /// True when the router's `drained_at` acknowledges the pending request.
    pub async fn drain_acked(&self) -> bool {
        self.client
            .query_opt(
                "SELECT coalesce(r.drained_at >= f.switchover_requested_at, false)
                   FROM hapg.router r JOIN hapg.formation f USING (formation_id)",
                &[],
            )
            .await
            .expect("read router")
            .is_some_and(|r| r.get(0))
    }

    /// Waits (at most `limit`) until the router acknowledges the pending
    /// request; returns how long that took.
    pub async fn wait_drain_acked(&self, limit: Duration) -> Duration {
        let start = Instant::now();
        while !self.drain_acked().await {
            assert!(
                start.elapsed() < limit,
                "the router did not acknowledge the drain within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        start.elapsed()
    }

    /// The router row's `last_seen` (seconds since the epoch) and `routed_epoch`.
    pub async fn router_row(&self) -> Option<(f64, i64)> {
        self.client
            .query_opt(
                "SELECT extract(epoch FROM last_seen)::float8, routed_epoch FROM hapg.router",
                &[],
            )
            .await
            .expect("read router")
            .map(|r| (r.get(0), r.get(1)))
    }

    /// The router's registered epoch, if registered.
    pub async fn routed_epoch(&self) -> Option<i64> {
        self.client
            .query_opt("SELECT routed_epoch FROM hapg.router", &[])
            .await
            .expect("read router")
            .map(|r| r.get(0))
    }
}

/// A router running in-process.
pub struct RouterHandle {
    pub router: Router,
    pub addr: SocketAddr,
    pub config_path: PathBuf,
    pub dir: tempfile::TempDir,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

impl RouterHandle {
    /// Starts a router on a free port; `extra` is appended to the `[router]`
    /// section, `sections` after it.
    pub async fn start(monitor_uri: &str, extra: &str, sections: &str) -> RouterHandle {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("router.toml");
        write_config(&config_path, monitor_uri, extra, sections);
        let router = Router::new(config_path.clone()).expect("router config");
        let listener = hapg_router::bind(&router.config()).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let serving = router.clone();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            serving.serve(listener, stop).await.expect("serve");
        });
        RouterHandle {
            router,
            addr,
            config_path,
            dir,
            shutdown,
            task,
        }
    }

    pub fn url(&self, user: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} dbname=postgres",
            self.addr.port()
        )
    }

    /// Waits until the routing table satisfies `done`.
    pub async fn wait_routing(
        &self,
        what: &str,
        done: impl Fn(&hapg_router::routing::Routing) -> bool,
    ) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(15) {
            if done(&self.router.routing()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "routing never reached: {what}; now {:?}",
            self.router.routing()
        );
    }

    /// Waits until the router routes to `epoch`.
    pub async fn wait_epoch(&self, epoch: i64) {
        self.wait_routing(&format!("writable epoch {epoch}"), |r| {
            r.target().is_some_and(|t| t.epoch == epoch)
        })
        .await;
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(20), self.task).await;
    }
}

pub fn write_config(path: &Path, monitor_uri: &str, extra: &str, sections: &str) {
    let listen = format!("127.0.0.1:{}", free_port());
    // A test that configures [server] itself says how to reach the nodes.
    let server = if sections.contains("[server]") {
        ""
    } else {
        "[server]\nsslmode = \"disable\"\n"
    };
    let text = format!(
        "[router]\nlisten = \"{listen}\"\nmonitor = \"{monitor_uri}\"\nformation = \"default\"\n{extra}\n\n{server}\n{sections}\n"
    );
    std::fs::write(path, text).expect("write config");
}

/// One node acting as the primary of epoch 1, a second node standing by, a
/// monitor, and a router routing to the first node.
pub struct Cluster {
    pub monitor: Monitor,
    pub a: Pg,
    pub b: Option<Pg>,
    pub node_a: i64,
    pub node_b: Option<i64>,
    pub router: RouterHandle,
}

impl Cluster {
    pub async fn start(two_nodes: bool, extra: &str, sections: &str) -> Cluster {
        let monitor = Monitor::start().await;
        let a = Pg::start();
        let node_a = monitor.add_node("node_a", a.port, "single").await;
        let (b, node_b) = if two_nodes {
            let b = Pg::start();
            let id = monitor.add_node("node_b", b.port, "secondary").await;
            (Some(b), Some(id))
        } else {
            (None, None)
        };
        monitor.set_primary(node_a, 1).await;
        let router = RouterHandle::start(&monitor.uri(), extra, sections).await;
        router.wait_epoch(1).await;
        Cluster {
            monitor,
            a,
            b,
            node_a,
            node_b,
            router,
        }
    }

    /// Plays a switchover from node A to node B, as the monitor sequences it:
    /// A stops taking writes (pause), then B becomes writable in epoch 2.
    pub async fn move_primary_to_b(&self) {
        let b = self.node_b.expect("two nodes");
        self.monitor
            .set_states(self.node_a, "draining", "primary")
            .await;
        self.monitor.set_primary(b, 2).await;
        self.monitor
            .set_states(b, "wait_primary", "wait_primary")
            .await;
        self.monitor
            .set_states(self.node_a, "demoted", "demoted")
            .await;
    }
}

/// The port of the server a client's session runs on.
pub async fn server_port(client: &tokio_postgres::Client) -> Result<u16, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT current_setting('port')::int", &[])
        .await?;
    let port: i32 = row.get(0);
    Ok(port as u16)
}

// ---- raw protocol client ----

/// A StartupMessage for protocol 3.0.
pub fn startup_packet(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = BytesMut::new();
    body.put_u32(196_608);
    for (k, v) in params {
        body.put_slice(k.as_bytes());
        body.put_u8(0);
        body.put_slice(v.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    let mut out = Vec::new();
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// A raw connection to the router.
pub struct Raw {
    pub stream: TcpStream,
    pub buf: BytesMut,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        Raw {
            stream: TcpStream::connect(addr).await.expect("connect to router"),
            buf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    /// Next message, or `None` when the router closed the connection (5 s limit).
    pub async fn recv(&mut self) -> Option<(u8, Vec<u8>)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if self.buf.len() > len {
                    let tag = self.buf[0];
                    self.buf.advance(5);
                    let body = self.buf.split_to(len - 4).to_vec();
                    return Some((tag, body));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return None,
                Err(_) => panic!("no message from the router within 5 s"),
            }
        }
    }

    /// Reads one byte (the answer to SSLRequest/GSSENCRequest).
    pub async fn recv_byte(&mut self) -> u8 {
        tokio::time::timeout(Duration::from_secs(5), self.stream.read_u8())
            .await
            .expect("answer in time")
            .expect("a byte")
    }

    /// True when the router closed the connection (after any pending messages).
    pub async fn closed(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            self.buf.clear();
            match tokio::time::timeout(left, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    /// Logs in with trust and reads until ReadyForQuery.
    pub async fn login(addr: SocketAddr, user: &str) -> Raw {
        let mut raw = Raw::connect(addr).await;
        raw.send(&startup_packet(&[("user", user), ("database", "postgres")]))
            .await;
        loop {
            let (tag, body) = raw.recv().await.expect("login messages");
            assert_ne!(
                tag,
                b'E',
                "login failed: {}",
                String::from_utf8_lossy(&body)
            );
            if tag == b'Z' {
                return raw;
            }
        }
    }
}

/// The SQLSTATE field of an ErrorResponse body.
pub fn sqlstate(body: &[u8]) -> String {
    field(body, b'C')
}

/// A field of an ErrorResponse body.
pub fn field(body: &[u8], which: u8) -> String {
    let mut rest = body;
    while let [f, tail @ ..] = rest {
        if *f == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        if *f == which {
            return String::from_utf8_lossy(&tail[..end]).into_owned();
        }
        rest = &tail[(end + 1).min(tail.len())..];
    }
    String::new()
}

/// Expects a FATAL/ERROR ErrorResponse with `code` next.
pub async fn expect_error(raw: &mut Raw, code: &str) -> String {
    let (tag, body) = raw.recv().await.expect("an ErrorResponse");
    assert_eq!(tag, b'E', "expected ErrorResponse, got {:?}", tag as char);
    assert_eq!(sqlstate(&body), code, "{}", field(&body, b'M'));
    field(&body, b'M')
}
