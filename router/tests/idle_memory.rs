//! Memory of idle client connections: many clients log in through the router
//! (transaction pooling, so idle clients hold no server connection) and stay
//! idle; the router's resident memory (this process's VmRSS) is read before
//! and while they are connected. The clients live in a child process (this
//! test binary again, running `idle_client_holder`), so that the file
//! descriptor limit and the RSS cover the router's side only.
//!
//! `HAPG_IDLE_CLIENTS` sets the number of clients (default 10000). The
//! result is printed; docs/performance.md records it.

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const CHILD_ENV: &str = "HAPG_IDLE_HOLDER";
const READY_ENV: &str = "HAPG_IDLE_READY";

/// Each client costs a file descriptor in the holder and one in the router
/// (this process): raises the soft limit on open files to fit `count` and
/// room for the rest, and the hard limit too when allowed (as root). The
/// holder inherits the limit.
fn raise_nofile_limit(count: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let want = u64::try_from(count)
        .unwrap_or(u64::MAX)
        .saturating_add(1024);
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    if soft >= want {
        return;
    }
    if setrlimit(Resource::RLIMIT_NOFILE, want, hard.max(want)).is_ok() {
        return;
    }
    assert!(
        hard >= want,
        "{count} idle clients need {want} open files, the hard limit is {hard}: \
         raise it (ulimit -Hn, as root) or set HAPG_IDLE_CLIENTS lower"
    );
    setrlimit(Resource::RLIMIT_NOFILE, want, hard).expect("setrlimit");
}

/// Logs `count` clients in (in chunks) and keeps them idle until stdin closes.
#[test]
#[ignore = "the child process of idle_client_connections_hold_bounded_memory"]
fn idle_client_holder() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (addr, count) = spec.split_once(' ').expect("addr count");
    let addr: SocketAddr = addr.parse().expect("addr");
    let count: usize = count.parse().expect("count");
    raise_nofile_limit(count);
    let packet = startup_packet(&[("user", "app"), ("database", "postgres")]);
    let mut conns = Vec::with_capacity(count);
    let mut buf = vec![0u8; 4096];
    while conns.len() < count {
        let chunk = (count - conns.len()).min(500);
        let start = conns.len();
        for _ in 0..chunk {
            let mut s = std::net::TcpStream::connect(addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
            s.write_all(&packet).expect("startup");
            conns.push(s);
        }
        for s in &mut conns[start..] {
            // Read frames until ReadyForQuery.
            let mut pending: Vec<u8> = Vec::new();
            'login: loop {
                let n = s.read(&mut buf).expect("read login");
                assert!(n > 0, "the router closed a client");
                pending.extend_from_slice(&buf[..n]);
                while pending.len() >= 5 {
                    let len = u32::from_be_bytes([pending[1], pending[2], pending[3], pending[4]])
                        as usize;
                    if pending.len() < len + 1 {
                        break;
                    }
                    assert_ne!(pending[0], b'E', "login refused");
                    if pending[0] == b'Z' {
                        break 'login;
                    }
                    pending.drain(..len + 1);
                }
            }
        }
    }
    let ready = std::env::var(READY_ENV).expect("ready file");
    std::fs::write(ready, conns.len().to_string()).expect("write ready file");
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(conns);
}

/// Starts the holder for `count` clients and waits until all are logged in.
fn hold(addr: SocketAddr, count: usize) -> Child {
    let dir = tempfile::tempdir().expect("tempdir");
    let ready = dir.path().join("ready");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "idle_client_holder",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{addr} {count}"))
        .env(READY_ENV, &ready)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn holder");
    let start = Instant::now();
    loop {
        if ready.exists() {
            return child;
        }
        if start.elapsed() > Duration::from_secs(300) || !matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the holder ended or took too long before its clients were logged in");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn release(mut child: Child) {
    drop(child.stdin.take());
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

async fn wait_clients(c: &Cluster, n: usize) {
    let start = Instant::now();
    while c.router.router.client_count() != n {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "router still counts {} clients",
            c.router.router.client_count()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_connections_hold_bounded_memory() {
    let count: usize = std::env::var("HAPG_IDLE_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    raise_nofile_limit(count);
    let c = Cluster::start(
        false,
        "max_client_connections = 30000",
        "[pool]\nmode = \"transaction\"\npool_size = 4\n",
    )
    .await;
    c.a.connect("postgres")
        .await
        .batch_execute("CREATE ROLE app LOGIN")
        .await
        .expect("create role");
    let addr = c.router.addr;
    // Warm up (allocator arenas, pools, runtime) with a smaller round.
    let warm = tokio::task::spawn_blocking(move || hold(addr, 500))
        .await
        .expect("holder");
    wait_clients(&c, 500).await;
    tokio::task::spawn_blocking(move || release(warm))
        .await
        .expect("release");
    wait_clients(&c, 0).await;
    let before = rss_bytes();
    let child = tokio::task::spawn_blocking(move || hold(addr, count))
        .await
        .expect("holder");
    wait_clients(&c, count).await;
    // Let sessions settle into their idle state.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = rss_bytes();
    let open = c.router.router.pool_stats("app", "postgres").open;
    tokio::task::spawn_blocking(move || release(child))
        .await
        .expect("release");
    wait_clients(&c, 0).await;
    let after = rss_bytes();
    let per = during.saturating_sub(before) / count as u64;
    println!(
        "idle clients: {count}; router RSS before {} KiB, with the clients {} KiB, after they left {} KiB; {per} bytes per idle client connection; {open} server connections",
        before / 1024,
        during / 1024,
        after / 1024
    );
    assert!(open <= 4, "{open} server connections");
    assert!(
        per < 64 * 1024,
        "{per} bytes per idle client connection is not bounded by 64 KiB"
    );
    c.router.stop().await;
}
