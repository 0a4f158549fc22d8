//! The relay allocates nothing per message. A client runs pgbench-like
//! transactions (BEGIN, two statements, END, then one statement on its own,
//! each a separate Query) through a router running in this process, in
//! session mode and in transaction mode, while a counting global allocator
//! watches the whole process. Once warmed up, the count over 1,000 rounds
//! must stay far below one allocation per statement: a `String` made per
//! statement (as `lost::ends_transaction` once did) or per transaction (as
//! the pool's key and the routing target once did) fails it.
//!
//! One test in this binary: the counter is global, so nothing else may run
//! beside it.

mod support;

use std::alloc::System;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use support::*;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const ROUNDS: usize = 1_000;
const STATEMENTS: [&str; 5] = [
    "BEGIN;",
    "SELECT 1;",
    "SELECT 2 WHERE true;",
    "END;",
    "SELECT 3;",
];

/// A blocking protocol client that allocates nothing after it is made: its
/// messages are encoded up front and replies are read into one buffer.
struct Client {
    stream: TcpStream,
    queries: Vec<Vec<u8>>,
    body: Vec<u8>,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let mut stream = TcpStream::connect(addr).expect("connect to the router");
        stream.set_nodelay(true).expect("nodelay");
        let mut startup = Vec::new();
        startup.extend_from_slice(&196_608u32.to_be_bytes());
        for (key, value) in [("user", "postgres"), ("database", "postgres")] {
            startup.extend_from_slice(key.as_bytes());
            startup.push(0);
            startup.extend_from_slice(value.as_bytes());
            startup.push(0);
        }
        startup.push(0);
        let mut packet = ((startup.len() + 4) as u32).to_be_bytes().to_vec();
        packet.extend_from_slice(&startup);
        stream.write_all(&packet).expect("send startup");
        let queries = STATEMENTS
            .iter()
            .map(|sql| {
                let mut q = vec![b'Q'];
                q.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
                q.extend_from_slice(sql.as_bytes());
                q.push(0);
                q
            })
            .collect();
        let mut client = Client {
            stream,
            queries,
            body: Vec::with_capacity(64 * 1024),
        };
        client.until_ready();
        client
    }

    /// Reads messages up to ReadyForQuery; panics on an ErrorResponse.
    fn until_ready(&mut self) {
        loop {
            let mut header = [0u8; 5];
            self.stream.read_exact(&mut header).expect("read a header");
            let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
            assert!(
                len >= 4 && len - 4 <= self.body.capacity(),
                "message length {len}"
            );
            self.body.resize(len - 4, 0);
            self.stream.read_exact(&mut self.body).expect("read a body");
            match header[0] {
                b'Z' => return,
                b'E' => panic!(
                    "error from the router: {}",
                    String::from_utf8_lossy(&self.body)
                ),
                _ => {}
            }
        }
    }

    fn rounds(&mut self, n: usize) {
        for _ in 0..n {
            for i in 0..self.queries.len() {
                self.stream
                    .write_all(&self.queries[i])
                    .expect("send a query");
                self.until_ready();
            }
        }
    }
}

/// Allocations in the whole process while one client runs `ROUNDS` rounds,
/// after a warm-up.
async fn allocations_per_statement(pool: &str) -> f64 {
    let c = Cluster::start(false, "", pool).await;
    let addr = c.router.addr;
    let counted = tokio::task::spawn_blocking(move || {
        let mut client = Client::connect(addr);
        // Buffers, pools and the session's tables reach their steady size.
        client.rounds(200);
        let region = Region::new(GLOBAL);
        let started = std::time::Instant::now();
        client.rounds(ROUNDS);
        let busy = region.change().allocations;
        // The rest of the process (the follower reads the monitor every
        // second, the pool's maintenance runs every second) allocates
        // whether or not clients run: counted over as long again, idle, and
        // taken off, so that a slow machine does not fail the test.
        let region = Region::new(GLOBAL);
        std::thread::sleep(started.elapsed());
        (busy, region.change().allocations)
    })
    .await
    .expect("client thread");
    c.router.stop().await;
    let (busy, idle) = counted;
    let statements = ROUNDS * STATEMENTS.len();
    let per_statement = busy.saturating_sub(idle) as f64 / statements as f64;
    eprintln!(
        "{pool:?}: {busy} allocations over {statements} statements, {idle} while idle as long: \
         {per_statement:.3} per statement"
    );
    per_statement
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_allocates_nothing_per_statement() {
    // A tenth of an allocation per statement leaves room for the noise of
    // the background's allocations and none for one per statement or per
    // transaction.
    let session = allocations_per_statement("[pool]\nmode = \"session\"\n").await;
    let transaction = allocations_per_statement("[pool]\nmode = \"transaction\"\n").await;
    assert!(
        session < 0.1,
        "session mode: {session:.3} allocations per statement"
    );
    assert!(
        transaction < 0.1,
        "transaction mode: {transaction:.3} allocations per statement"
    );
}
