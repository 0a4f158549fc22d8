//! Memory after authentication (issue 23, item 2): 20 logged-in clients each
//! send a 60 MiB Bind (a bytea parameter of `SELECT octet_length($1)`); the
//! router streams each to the server in pieces as it arrives, every client
//! gets its answer, and the router's resident memory (this process's VmRSS:
//! the router runs in-process, and the clients write from one static
//! buffer) grows by less than 32 MiB. In a test binary of its own, so that
//! no other test's allocations count.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BufMut;
use support::*;
use tokio::io::AsyncWriteExt;

const PARAM: usize = 60 * 1024 * 1024;
const CLIENTS: usize = 20;
/// The bound on the router's growth while the 20 clients send (buffering
/// the messages whole would be 1.2 GB).
const BOUND: u64 = 32 * 1024 * 1024;
static BYTES: [u8; 64 * 1024] = [7; 64 * 1024];

fn tagged(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.put_u32((body.len() + 4) as u32);
    out.extend_from_slice(body);
    out
}

/// One client: Parse, then a Bind carrying 60 MiB written piece by piece,
/// Execute and Sync; returns the value the server computed.
async fn big_bind(addr: std::net::SocketAddr) -> String {
    let mut raw = Raw::login(addr, "postgres").await;
    let mut head = tagged(b'P', b"\0SELECT octet_length($1::bytea)\0\0\0");
    // Bind: portal "", statement "", one binary parameter, no result formats.
    head.push(b'B');
    head.put_u32((4 + 2 + 2 + 2 + 2 + 4 + PARAM + 2) as u32);
    head.extend_from_slice(b"\0\0");
    head.put_u16(1);
    head.put_u16(1);
    head.put_u16(1);
    head.put_u32(PARAM as u32);
    raw.send(&head).await;
    let mut sent = 0;
    while sent < PARAM {
        let n = BYTES.len().min(PARAM - sent);
        raw.stream
            .write_all(&BYTES[..n])
            .await
            .expect("parameter bytes");
        sent += n;
    }
    let mut tail = vec![0, 0];
    tail.extend_from_slice(&tagged(b'E', b"\0\0\0\0\0"));
    tail.extend_from_slice(&tagged(b'S', b""));
    raw.send(&tail).await;
    let mut value = None;
    loop {
        let (tag, body) = raw.recv().await.expect("the answer");
        assert_ne!(tag, b'E', "{}", field(&body, b'M'));
        if tag == b'D' {
            value = Some(String::from_utf8_lossy(&body[6..]).into_owned());
        }
        if tag == b'Z' {
            return value.expect("a row");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_clients_sending_60_mib_are_streamed_in_bounded_memory() {
    let c = Cluster::start(false, "", "").await;
    let addr = c.router.addr;
    // Warm up the runtime, the allocator and the pool with one client.
    let warm = connect(&c.router.url("postgres")).await.expect("connect");
    warm.batch_execute("SELECT 1").await.expect("warm up");

    let before = rss_bytes();
    let peak = Arc::new(AtomicU64::new(before));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(300) {
                peak.fetch_max(rss_bytes(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let clients: Vec<_> = (0..CLIENTS).map(|_| tokio::spawn(big_bind(addr))).collect();
    for client in clients {
        let value = tokio::time::timeout(Duration::from_secs(240), client)
            .await
            .expect("answered in time")
            .expect("client task");
        assert_eq!(value, PARAM.to_string());
    }
    stop.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");
    let peak = peak.load(Ordering::Relaxed);
    println!(
        "{CLIENTS} clients sent 60 MiB each; RSS before {} KiB, peak {} KiB (+{} KiB)",
        before / 1024,
        peak / 1024,
        peak.saturating_sub(before) / 1024
    );
    assert!(
        peak.saturating_sub(before) < BOUND,
        "router memory grew by {} KiB while {CLIENTS} clients sent 60 MiB each",
        peak.saturating_sub(before) / 1024
    );
    c.router.stop().await;
}
