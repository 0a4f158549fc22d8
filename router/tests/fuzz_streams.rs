//! The front door against arbitrary bytes. First the parsers alone: random
//! and mutated byte streams through the framing and the startup parsing never
//! panic, never hand out a frame beyond the limit, and never consume bytes
//! they did not parse. Then a running router (real PostgreSQL 15 behind it):
//! a few thousand mutated startup, authentication and query streams, each on
//! its own connection, with a normal client served after every hundred and
//! the process's memory bounded. Seeded, so a failure can be replayed; bounded
//! in count and time.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use hapg_router::protocol::{frame, startup};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::{connect, rss_bytes, startup_packet, Cluster};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SEED: u64 = 0x6861_7067;

/// Panics anywhere in this process, the router's session tasks included (a
/// task's panic would otherwise only end that task, unseen by the test).
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default(info);
    }));
}

/// A frame of `tag` with `body`.
fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Well-formed streams a client sends, to be mutated.
fn seeds() -> Vec<Vec<u8>> {
    let startup = startup_packet(&[("user", "postgres"), ("database", "postgres")]);
    let query = msg(b'Q', b"SELECT 1\0");
    let mut extended = Vec::new();
    extended.extend(msg(b'P', b"s1\0SELECT $1::int\0\0\0"));
    extended.extend(msg(b'B', b"\0s1\0\0\0\0\x01\0\0\0\x011\0\0"));
    extended.extend(msg(b'E', b"\0\0\0\0\0"));
    extended.extend(msg(b'S', b""));
    let ssl = vec![0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    let cancel = {
        let mut c = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
        c.extend_from_slice(&7_i32.to_be_bytes());
        c.extend_from_slice(&9_i32.to_be_bytes());
        c
    };
    let password = msg(b'p', b"secret\0");
    let sasl = msg(
        b'p',
        b"SCRAM-SHA-256\0\0\0\0\x20n,,n=,r=rOprNGfwEbeRWgbNEkqO%hvYDpWU",
    );
    let copy = [msg(b'd', b"1\t2\n"), msg(b'c', b"")].concat();
    vec![
        [startup.clone(), query.clone(), msg(b'X', b"")].concat(),
        [startup.clone(), extended].concat(),
        [startup.clone(), password].concat(),
        [startup.clone(), sasl].concat(),
        [startup.clone(), copy, query].concat(),
        [ssl, startup.clone()].concat(),
        cancel,
        startup,
    ]
}

/// One random change: flip, overwrite, insert, delete, truncate, duplicate a
/// slice, or set a length field to an extreme value.
fn mutate(rng: &mut StdRng, mut bytes: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.gen_range(1..4) {
        if bytes.is_empty() {
            bytes.push(rng.gen());
            continue;
        }
        let at = rng.gen_range(0..bytes.len());
        match rng.gen_range(0..7) {
            0 => bytes[at] ^= 1 << rng.gen_range(0..8),
            1 => bytes[at] = rng.gen(),
            2 => bytes.insert(at, rng.gen()),
            3 => {
                bytes.remove(at);
            }
            4 => bytes.truncate(at),
            5 => {
                let end = (at + rng.gen_range(1..32)).min(bytes.len());
                let slice = bytes[at..end].to_vec();
                bytes.splice(at..at, slice);
            }
            _ => {
                let value: u32 = match rng.gen_range(0..4) {
                    0 => 0,
                    1 => 3,
                    2 => u32::MAX,
                    _ => rng.gen_range(0..1 << 30),
                };
                let end = (at + 4).min(bytes.len());
                let be = value.to_be_bytes();
                bytes[at..end].copy_from_slice(&be[..end - at]);
            }
        }
    }
    bytes
}

#[test]
fn framing_and_startup_parsing_take_any_bytes() {
    let mut rng = StdRng::seed_from_u64(SEED);
    let seeds = seeds();
    for round in 0..20_000 {
        let max = [5, 16, 64, 1 << 16][rng.gen_range(0..4)];
        let bytes = if round % 4 == 0 {
            (0..rng.gen_range(0..200)).map(|_| rng.gen()).collect()
        } else {
            let seed = seeds[rng.gen_range(0..seeds.len())].clone();
            mutate(&mut rng, seed)
        };

        // Startup parsing: either it needs more bytes (and took none), an
        // error, or a packet taken off the front.
        let mut buf = BytesMut::from(&bytes[..]);
        match startup::parse(&mut buf) {
            Ok(None) => assert_eq!(buf.len(), bytes.len(), "round {round}: took bytes"),
            Ok(Some(_)) => assert!(buf.len() < bytes.len(), "round {round}"),
            Err(_) => {}
        }

        // Framing: every frame handed out fits the limit and the bytes left
        // are exactly what followed it.
        let mut buf = BytesMut::from(&bytes[..]);
        let mut taken = 0;
        for _ in 0..bytes.len() + 1 {
            let before = buf.len();
            match frame::split(&mut buf, max) {
                Ok(Some((_, body))) => {
                    let frame_len = before - buf.len();
                    assert!(frame_len <= max, "round {round}: {frame_len} > {max}");
                    assert_eq!(body.len() + 5, frame_len, "round {round}");
                    taken += frame_len;
                }
                Ok(None) | Err(_) => break,
            }
        }
        assert_eq!(&bytes[taken..], &buf[..], "round {round}: bytes lost");
    }
}

/// Sends `bytes` on a new connection and reads what comes back until the
/// router closes or stays silent for a moment; then hangs up.
async fn hit(addr: std::net::SocketAddr, bytes: Vec<u8>) {
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return;
    };
    // The router may close before everything is written: that is an answer too.
    let _ = stream.write_all(&bytes).await;
    let mut buf = vec![0_u8; 16 * 1024];
    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        match tokio::time::timeout_at(deadline.into(), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_router_survives_thousands_of_mutated_streams() {
    count_panics();
    let c = Cluster::start(false, "login_timeout_ms = 2000", "").await;
    let mut rng = StdRng::seed_from_u64(SEED);
    let seeds = seeds();
    let started = Instant::now();
    let rss_before = rss_bytes() / 1024;
    let mut rss_peak = rss_before;
    let mut sent = 0;
    for batch in 0..30 {
        if started.elapsed() > Duration::from_secs(120) {
            break;
        }
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..100 {
            let bytes = if rng.gen_ratio(1, 10) {
                (0..rng.gen_range(1..400)).map(|_| rng.gen()).collect()
            } else {
                let seed = seeds[rng.gen_range(0..seeds.len())].clone();
                mutate(&mut rng, seed)
            };
            tasks.spawn(hit(c.router.addr, bytes));
            sent += 1;
        }
        while tasks.join_next().await.is_some() {}
        rss_peak = rss_peak.max(rss_bytes() / 1024);
        // A normal client is still served.
        let client =
            tokio::time::timeout(Duration::from_secs(10), connect(&c.router.url("postgres")))
                .await
                .unwrap_or_else(|_| panic!("batch {batch}: login timed out (seed {SEED})"))
                .unwrap_or_else(|e| panic!("batch {batch}: login failed: {e} (seed {SEED})"));
        let row = client
            .query_one("SELECT 41 + 1", &[])
            .await
            .unwrap_or_else(|e| panic!("batch {batch}: query failed: {e} (seed {SEED})"));
        assert_eq!(row.get::<_, i32>(0), 42);
    }
    eprintln!(
        "{sent} mutated streams in {:?}; RSS {rss_before} KiB before, {rss_peak} KiB peak",
        started.elapsed()
    );
    assert!(
        sent >= 1_000,
        "only {sent} streams sent in the time allowed"
    );
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        0,
        "a task panicked (seed {SEED})"
    );
    assert!(
        rss_peak < rss_before + 64 * 1024,
        "memory grew from {rss_before} to {rss_peak} KiB"
    );
    // A quick extended-protocol exchange from a raw client after all that.
    let mut raw = support::Raw::login(c.router.addr, "postgres").await;
    let mut q = BytesMut::new();
    q.put_slice(&msg(b'Q', b"SELECT 1\0"));
    raw.send(&q).await;
    let mut saw_row = false;
    for _ in 0..10 {
        match raw.recv().await {
            Some((b'D', _)) => saw_row = true,
            Some((b'Z', _)) | None => break,
            Some(_) => {}
        }
    }
    assert!(saw_row, "the raw client's query returns its row");
    c.router.stop().await;
}
