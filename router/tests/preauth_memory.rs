//! Memory before authentication (issue 23, item 1): 20 clients that have not
//! logged in each announce and send a 60 MiB message (a startup packet, a
//! PasswordMessage, a SASLInitialResponse or a SASLResponse); the router
//! refuses each at its header, tells the client why with a FATAL 08P01 it can
//! read, and its resident memory (this process's VmRSS: the router runs
//! in-process, and the clients write from one static buffer) stays within
//! 32 MiB of what it was before. In a test binary of its own, so that no
//! other test's allocations count.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BufMut;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MESSAGE: usize = 60 * 1024 * 1024;
const CLIENTS: usize = 20;
/// The bound on the router's growth while the 20 clients send (the whole
/// 1.2 GB buffered would be the failure).
const BOUND: u64 = 32 * 1024 * 1024;
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// Which message carries the 60 MiB.
#[derive(Debug, Clone, Copy)]
enum Big {
    Startup,
    Password,
    SaslInitial,
    SaslResponse,
}

/// One message frame: tag, length field, body.
fn tagged(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Reads messages until an ErrorResponse; returns its body (`None` when the
/// connection ends first). Bounded by 60 s.
async fn read_error(read: &mut tokio::net::tcp::OwnedReadHalf) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        while buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < len + 1 {
                break;
            }
            let tag = buf[0];
            let body = buf[5..len + 1].to_vec();
            buf.drain(..len + 1);
            if tag == b'E' {
                return Some(body);
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, read.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            Ok(_) => return None,
            Err(_) => panic!("no FATAL within 60 s"),
        }
    }
}

/// Reads one message (the authentication request); bounded by 10 s.
async fn read_one(read: &mut tokio::net::tcp::OwnedReadHalf) -> (u8, Vec<u8>) {
    let mut header = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(10), read.read_exact(&mut header))
        .await
        .expect("a message in time")
        .expect("a message");
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let mut body = vec![0u8; len - 4];
    read.read_exact(&mut body).await.expect("message body");
    (header[0], body)
}

/// One hostile client: the header of a 60 MiB message, then its body written
/// while the client reads; returns the ErrorResponse it read.
async fn hostile(addr: std::net::SocketAddr, big: Big, n: usize) -> Option<Vec<u8>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut read, mut write) = stream.into_split();
    let header: Vec<u8> = match big {
        Big::Startup => {
            let mut h = Vec::new();
            h.put_u32((MESSAGE + 8) as u32);
            h.put_u32(196_608);
            h
        }
        _ => {
            let user = match big {
                Big::Password => format!("ghost{n}"),
                _ => "scram".to_string(),
            };
            write
                .write_all(&startup_packet(&[
                    ("user", &user),
                    ("database", "postgres"),
                ]))
                .await
                .expect("startup");
            let (tag, body) = read_one(&mut read).await;
            assert_eq!(tag, b'R', "{big:?}: an authentication request");
            let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            match big {
                Big::Password => assert_eq!(code, 5, "md5 asked for {user}"),
                _ => assert_eq!(code, 10, "SASL asked for {user}"),
            }
            if let Big::SaslResponse = big {
                let first = b"n,,n=,r=abcdefghijklmnop";
                let mut body = b"SCRAM-SHA-256\0".to_vec();
                body.put_i32(first.len() as i32);
                body.extend_from_slice(first);
                write
                    .write_all(&tagged(b'p', &body))
                    .await
                    .expect("SASLInitialResponse");
                let (tag, body) = read_one(&mut read).await;
                assert_eq!(tag, b'R');
                assert_eq!(&body[..4], &11i32.to_be_bytes(), "server-first");
            }
            let mut h = vec![b'p'];
            h.put_u32((MESSAGE + 4) as u32);
            if let Big::SaslInitial = big {
                h.extend_from_slice(b"SCRAM-SHA-256\0");
                h.put_i32((MESSAGE - 18) as i32);
            }
            h
        }
    };
    let send = async move {
        if write.write_all(&header).await.is_err() {
            return;
        }
        let mut sent = header.len();
        while sent < MESSAGE {
            let n = ZEROS.len().min(MESSAGE - sent);
            if write.write_all(&ZEROS[..n]).await.is_err() {
                return;
            }
            sent += n;
        }
    };
    if n.is_multiple_of(2) {
        // As libpq does: the whole message is written before anything is read.
        send.await;
        return read_error(&mut read).await;
    }
    let writer = tokio::spawn(send);
    let error = read_error(&mut read).await;
    writer.abort();
    error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_clients_sending_60_mib_are_refused_in_bounded_memory() {
    let monitor = Monitor::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let users = dir.path().join("users.txt");
    let verifier = postgres_protocol::password::scram_sha_256(b"pw");
    std::fs::write(
        &users,
        format!("\"plain\" \"pw\"\n\"scram\" \"{verifier}\"\n"),
    )
    .expect("userlist");
    let sections = format!("[auth]\ntype = \"md5\"\nfile = \"{}\"\n", users.display());
    let router = RouterHandle::start(&monitor.uri(), "", &sections).await;
    let addr = router.addr;
    // Warm up the runtime and allocator with one refused client.
    let mut raw = Raw::connect(addr).await;
    raw.send(&[0, 0x10, 0, 0, 0, 3, 0, 0]).await;
    expect_error(&mut raw, "08P01").await;
    drop(raw);

    let before = rss_bytes();
    let peak = Arc::new(AtomicU64::new(before));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(120) {
                peak.fetch_max(rss_bytes(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let kinds = [
        Big::Startup,
        Big::Password,
        Big::SaslInitial,
        Big::SaslResponse,
    ];
    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| {
            let big = kinds[n % kinds.len()];
            (big, tokio::spawn(hostile(addr, big, n)))
        })
        .collect();
    let mut errors = Vec::new();
    for (big, client) in clients {
        errors.push((big, client.await.expect("client task")));
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
        "router memory grew by {} KiB while {CLIENTS} unauthenticated clients sent 60 MiB each",
        peak.saturating_sub(before) / 1024
    );
    for (big, error) in errors {
        let error =
            error.unwrap_or_else(|| panic!("{big:?}: the connection ended without a FATAL"));
        assert_eq!(field(&error, b'V'), "FATAL", "{big:?}");
        assert_eq!(
            sqlstate(&error),
            "08P01",
            "{big:?}: {}",
            field(&error, b'M')
        );
    }
    // The router still serves: a normal client gets its authentication request.
    let mut raw = Raw::connect(addr).await;
    raw.send(&startup_packet(&[("user", "plain")])).await;
    let (tag, _) = raw.recv().await.expect("auth request");
    assert_eq!(tag, b'R');
    router.stop().await;
}
