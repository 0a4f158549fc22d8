//! The router's front door against clients it must not let in (issue 23):
//! empty passwords, malformed and duplicate entries of the auth file, the
//! audit log of failures, and unknown users that look like known ones. Raw
//! protocol clients of the test's own drive the exchanges, so that what the
//! router shows before authentication (challenge type, salt, iterations) can
//! be compared.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::BufMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use support::*;

/// Everything the router logs in this test binary.
fn log() -> Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber");
        buf
    })
    .clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log").extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A router with `auth.type = kind` and the auth file `users`.
async fn router(monitor: &Monitor, kind: &str, users: &str) -> RouterHandle {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.keep().join("users.txt");
    std::fs::write(&file, users).expect("userlist");
    let sections = format!("[auth]\ntype = \"{kind}\"\nfile = \"{}\"\n", file.display());
    RouterHandle::start(&monitor.uri(), "", &sections).await
}

fn tagged(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Starts a session as `user`; returns the connection and the authentication
/// request (its code and data).
async fn challenge(router: &RouterHandle, user: &str) -> (Raw, i32, Vec<u8>) {
    let mut raw = Raw::connect(router.addr).await;
    raw.send(&startup_packet(&[("user", user), ("database", "postgres")]))
        .await;
    let (tag, body) = raw.recv().await.expect("an authentication request");
    assert_eq!(tag, b'R', "{user}: {}", field(&body, b'M'));
    let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    (raw, code, body[4..].to_vec())
}

/// Answers an md5 challenge with `password`; returns the next message.
async fn md5_login(router: &RouterHandle, user: &str, password: &str) -> (u8, Vec<u8>) {
    let (mut raw, code, salt) = challenge(router, user).await;
    assert_eq!(code, 5, "{user}: md5 asked");
    let salt: [u8; 4] = salt[..4].try_into().expect("salt");
    let hash =
        postgres_protocol::authentication::md5_hash(user.as_bytes(), password.as_bytes(), salt);
    let mut body = hash.into_bytes();
    body.push(0);
    raw.send(&tagged(b'p', &body)).await;
    raw.recv().await.expect("an answer")
}

/// Runs the SCRAM exchange up to the server-first message; returns the
/// connection, the client and the server-first text.
async fn scram_first(
    router: &RouterHandle,
    user: &str,
    password: &str,
) -> (Raw, ScramSha256, String) {
    let (mut raw, code, _) = challenge(router, user).await;
    assert_eq!(code, 10, "{user}: SASL asked");
    let client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
    let mut body = b"SCRAM-SHA-256\0".to_vec();
    body.put_i32(client.message().len() as i32);
    body.extend_from_slice(client.message());
    raw.send(&tagged(b'p', &body)).await;
    let (tag, body) = raw.recv().await.expect("server-first");
    assert_eq!(tag, b'R', "{user}: {}", field(&body, b'M'));
    assert_eq!(&body[..4], &11i32.to_be_bytes(), "{user}: SASLContinue");
    (
        raw,
        client,
        String::from_utf8(body[4..].to_vec()).expect("utf8"),
    )
}

/// The full SCRAM exchange with `password`; returns the message that follows
/// the client's proof.
async fn scram_login(router: &RouterHandle, user: &str, password: &str) -> (u8, Vec<u8>) {
    let (mut raw, mut client, first) = scram_first(router, user, password).await;
    client
        .update(first.as_bytes())
        .expect("server-first parses");
    raw.send(&tagged(b'p', client.message())).await;
    raw.recv().await.expect("an answer")
}

/// The salt and iteration count of a server-first message.
fn salt_and_iterations(server_first: &str) -> (String, String) {
    let attr = |name: &str| {
        server_first
            .split(',')
            .find_map(|a| a.strip_prefix(name))
            .expect("attribute")
            .to_string()
    };
    (attr("s="), attr("i="))
}

fn assert_refused(answer: (u8, Vec<u8>), what: &str) {
    let (tag, body) = answer;
    assert_eq!(tag, b'E', "{what}: let in (message {:?})", tag as char);
    assert_eq!(sqlstate(&body), "28P01", "{what}: {}", field(&body, b'M'));
    assert_eq!(field(&body, b'V'), "FATAL", "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_passwords_are_refused_under_md5_and_scram() {
    let monitor = Monitor::start().await;
    let users = "\"postgres\" \"\"\n\"alice\" \"pw\"\n";
    let md5 = router(&monitor, "md5", users).await;
    let scram = router(&monitor, "scram-sha-256", users).await;
    assert_refused(md5_login(&md5, "postgres", "").await, "md5, empty");
    assert_refused(scram_login(&scram, "postgres", "").await, "scram, empty");
    // The same exchanges with a wrong password for a user that has one.
    assert_refused(md5_login(&md5, "alice", "").await, "md5, wrong");
    assert_refused(scram_login(&scram, "alice", "").await, "scram, wrong");
    md5.stop().await;
    scram.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_failures_are_logged_with_address_user_and_reason() {
    let log = log();
    let monitor = Monitor::start().await;
    let md5 = router(&monitor, "md5", "\"alice\" \"pw\"\n\"emptyuser\" \"\"\n").await;
    let mut cases = Vec::new();
    for (user, password, reason) in [
        (
            "alice",
            "wrong",
            "password does not match for user \"alice\"",
        ),
        ("nobody", "pw", "user \"nobody\" is not in the auth file"),
        ("emptyuser", "", "empty password"),
    ] {
        let (mut raw, code, salt) = challenge(&md5, user).await;
        assert_eq!(code, 5);
        let port = raw.stream.local_addr().expect("local addr").port();
        let salt: [u8; 4] = salt[..4].try_into().expect("salt");
        let hash =
            postgres_protocol::authentication::md5_hash(user.as_bytes(), password.as_bytes(), salt);
        let mut body = hash.into_bytes();
        body.push(0);
        raw.send(&tagged(b'p', &body)).await;
        expect_error(&mut raw, "28P01").await;
        cases.push((format!("127.0.0.1:{port}"), user, reason));
    }
    for (client, user, reason) in cases {
        let start = Instant::now();
        loop {
            let text = String::from_utf8_lossy(&log.lock().expect("log")).into_owned();
            let line = text
                .lines()
                .find(|l| l.contains(&client))
                .map(str::to_string);
            if let Some(line) = line {
                assert!(line.contains("WARN"), "{line}");
                assert!(line.contains("client authentication failed"), "{line}");
                assert!(line.contains(&format!("user=\"{user}\"")), "{line}");
                assert!(line.contains(reason), "{line}");
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "no log line names {client}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    md5.stop().await;
}

/// The median time of 9 exchanges from the startup packet to server-first.
async fn median_to_server_first(router: &RouterHandle, user: &str) -> Duration {
    let mut times = Vec::new();
    for _ in 0..9 {
        let start = Instant::now();
        let _ = scram_first(router, user, "x").await;
        times.push(start.elapsed());
    }
    times.sort();
    times[times.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_users_look_like_known_ones() {
    let monitor = Monitor::start().await;
    let verifier = postgres_protocol::password::scram_sha_256(b"pw");
    let md5_hash = postgres_protocol::password::md5(b"pw", "dave");
    let mixed = format!("\"alice\" \"pw\"\n\"carol\" \"{verifier}\"\n\"dave\" \"{md5_hash}\"\n");
    let scram = router(&monitor, "scram-sha-256", &mixed).await;

    // SCRAM: an unknown user gets a salt and iteration count that are the same
    // at every attempt, as a user with a verifier or a plain password does,
    // with the iteration count of the file's verifiers.
    let mut seen = Vec::new();
    for user in [
        "ghost", "ghost", "alice", "alice", "carol", "carol", "dave", "dave",
    ] {
        let (_, _, first) = scram_first(&scram, user, "x").await;
        seen.push((user, salt_and_iterations(&first)));
    }
    for pair in seen.chunks(2) {
        assert_eq!(
            pair[0], pair[1],
            "{}: the salt changed between attempts",
            pair[0].0
        );
    }
    for (user, (salt, iterations)) in &seen {
        assert_eq!(iterations, "4096", "{user}");
        assert_eq!(salt.len(), 24, "{user}: a 16-byte salt in base64");
    }
    assert_ne!(seen[0].1, seen[2].1, "ghost and alice share a salt");
    let (_, _, other) = scram_first(&scram, "ghost2", "x").await;
    assert_ne!(
        salt_and_iterations(&other).0,
        seen[0].1 .0,
        "two unknown users share a salt"
    );

    // The same work: reaching server-first takes as long for a plain-text user
    // as for an unknown one (before, a plain-text user took a PBKDF2 run).
    let plain = median_to_server_first(&scram, "alice").await;
    let unknown = median_to_server_first(&scram, "ghost").await;
    println!("server-first: plain-text user {plain:?}, unknown user {unknown:?} (medians of 9)");
    assert!(
        plain < unknown * 3 + Duration::from_millis(3),
        "a plain-text user takes {plain:?} to server-first, an unknown one {unknown:?}"
    );
    scram.stop().await;

    // md5 with plain-text and md5 users: an unknown user is asked for md5, as
    // they are; with only SCRAM verifiers in the file, for SCRAM, as they are.
    let md5 = router(&monitor, "md5", &mixed).await;
    for user in ["alice", "dave", "ghost"] {
        assert_eq!(challenge(&md5, user).await.1, 5, "{user}: md5 asked");
    }
    assert_eq!(challenge(&md5, "carol").await.1, 10, "carol: SCRAM asked");
    md5.stop().await;
    let only_scram = router(&monitor, "md5", &format!("\"carol\" \"{verifier}\"\n")).await;
    for user in ["carol", "ghost"] {
        assert_eq!(
            challenge(&only_scram, user).await.1,
            10,
            "{user}: SCRAM asked"
        );
    }
    let (_, _, first) = scram_first(&only_scram, "ghost", "x").await;
    let (_, _, again) = scram_first(&only_scram, "ghost", "x").await;
    assert_eq!(salt_and_iterations(&first), salt_and_iterations(&again));
    assert_refused(
        scram_login(&only_scram, "ghost", "pw").await,
        "unknown user",
    );
    only_scram.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_secrets_and_duplicate_users_stop_the_router_naming_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("router.toml");
    let verifier = postgres_protocol::password::scram_sha_256(b"pw");
    for (users, expected) in [
        (
            "\"a\" \"pw\"\n\"b\" \"SCRAM-SHA-256$4096:zzz$bad:bad\"\n".to_string(),
            "ul.txt:2: user \"b\": a secret starting with \"SCRAM-SHA-256$\" must be",
        ),
        (
            "\"a\" \"md5nothex\"\n".to_string(),
            "ul.txt:1: user \"a\": a secret starting with \"md5\" must be",
        ),
        (
            format!("\"a\" \"{verifier}\"\n\n\"a\" \"pw\"\n"),
            "ul.txt:3: user \"a\" is listed twice (first on line 1)",
        ),
    ] {
        std::fs::write(dir.path().join("ul.txt"), &users).expect("userlist");
        write_config(
            &config,
            "postgres://autoctl_node@127.0.0.1:1/pg_auto_failover",
            "",
            "[auth]\ntype = \"scram-sha-256\"\nfile = \"ul.txt\"\n",
        );
        let err = match hapg_router::Router::new(config.clone()) {
            Ok(_) => panic!("the router started with {users:?}"),
            Err(e) => e,
        };
        // As `hapg` prints it: the error and its sources.
        let mut text = err.to_string();
        let mut next = std::error::Error::source(&err);
        while let Some(e) = next {
            text.push_str(&format!(": {e}"));
            next = e.source();
        }
        assert!(text.contains(expected), "{text}");
        assert_eq!(text.matches("ul.txt").count(), 1, "repeated: {text}");
    }
}

/// Logs in raw as `user` and returns the ParameterStatus value of `name`.
async fn login_reporting(
    addr: std::net::SocketAddr,
    user: &str,
    name: &str,
) -> (Raw, Option<String>) {
    let mut raw = Raw::connect(addr).await;
    raw.send(&startup_packet(&[("user", user), ("database", "postgres")]))
        .await;
    let mut value = None;
    loop {
        let (tag, body) = raw.recv().await.expect("login messages");
        assert_ne!(tag, b'E', "login failed: {}", field(&body, b'M'));
        if tag == b'S' {
            let mut parts = body.split(|&b| b == 0);
            if parts.next() == Some(name.as_bytes()) {
                value = parts
                    .next()
                    .map(|v| String::from_utf8_lossy(v).into_owned());
            }
        }
        if tag == b'Z' {
            return (raw, value);
        }
    }
}

/// The value of a one-row, one-column simple query over a raw connection.
async fn raw_value(raw: &mut Raw, sql: &str) -> String {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    raw.send(&tagged(b'Q', &body)).await;
    let mut value = String::new();
    loop {
        let (tag, body) = raw.recv().await.expect("query answer");
        assert_ne!(tag, b'E', "{sql}: {}", field(&body, b'M'));
        if tag == b'D' {
            let len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]);
            value = String::from_utf8_lossy(&body[6..6 + len.max(0) as usize]).into_owned();
        }
        if tag == b'Z' {
            return value;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_mode_does_not_pass_application_name_to_the_next_client() {
    let c = Cluster::start(false, "", "[pool]\nmode = \"transaction\"\npool_size = 1\n").await;
    let addr = c.router.addr;
    // A sets its application_name at session level; its connection goes back
    // to the pool (the only one) with it.
    let (mut a, _) = login_reporting(addr, "postgres", "application_name").await;
    raw_value(&mut a, "SET application_name = 'leaky'").await;
    assert_eq!(raw_value(&mut a, "SHOW application_name").await, "leaky");
    // B sets none: it is told "" and sees "", at login and after.
    let (mut b, told) = login_reporting(addr, "postgres", "application_name").await;
    assert_eq!(
        told.as_deref(),
        Some(""),
        "B told A's application_name at login"
    );
    assert_eq!(raw_value(&mut b, "SHOW application_name").await, "");
    // A still has its own.
    assert_eq!(raw_value(&mut a, "SHOW application_name").await, "leaky");
    assert_eq!(raw_value(&mut b, "SHOW application_name").await, "");
    // C logs in while A's transaction holds the only connection: the router
    // answers the login itself, and tells C the default, not A's value.
    raw_value(&mut a, "BEGIN").await;
    raw_value(&mut a, "SELECT 1").await;
    let (mut late, told) = login_reporting(addr, "postgres", "application_name").await;
    assert_eq!(
        told.as_deref(),
        Some(""),
        "C told A's application_name at login"
    );
    raw_value(&mut a, "COMMIT").await;
    assert_eq!(raw_value(&mut late, "SHOW application_name").await, "");
    assert_eq!(raw_value(&mut a, "SHOW application_name").await, "leaky");
    c.router.stop().await;
}
