//! The router's TLS policy (issue 23 item 7) against real Postgres: clients
//! that must use TLS (`tls.client_mode = require`), and node certificates
//! checked against a CA (`server.sslmode = verify-ca | verify-full` with
//! `server.sslrootcert`), with certificates made by the test's own CA.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use support::*;

/// A test certificate authority.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        Ca { cert, key }
    }

    /// A server certificate for `names` (host names or addresses): PEM
    /// certificate and key.
    fn issue(&self, names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "hapg test server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().expect("server key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("server certificate");
        (cert.pem(), key.serialize_pem())
    }

    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, self.cert.pem()).expect("write CA");
        path
    }
}

/// Turns TLS on in `pg` with this certificate and key (a reload, as an
/// operator would), and waits until a new session sees it.
async fn serve_tls(pg: &Pg, (cert, key): &(String, String)) {
    let data = pg.data();
    let owner = std::fs::metadata(&data).expect("data dir");
    for (name, text) in [("server.crt", cert), ("server.key", key)] {
        let path = data.join(name);
        std::fs::write(&path, text).expect("write TLS file");
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid())).expect("chown");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let admin = pg.connect("postgres").await;
    for sql in ["ALTER SYSTEM SET ssl = on", "SELECT pg_reload_conf()"] {
        admin.batch_execute(sql).await.expect("ssl on");
    }
    let start = Instant::now();
    loop {
        let row = pg
            .connect("postgres")
            .await
            .query_one("SHOW ssl", &[])
            .await
            .expect("show ssl");
        if row.get::<_, String>(0) == "on" {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "ssl never on");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A monitor and one node routed to in epoch 1.
async fn one_node() -> (Monitor, Pg) {
    let monitor = Monitor::start().await;
    let a = Pg::start();
    let node = monitor.add_node("node_a", a.port, "single").await;
    monitor.set_primary(node, 1).await;
    (monitor, a)
}

/// Whether the router's server connection is encrypted, as the node sees it.
async fn server_side_ssl(client: &tokio_postgres::Client) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// A router with `server.sslmode = mode` and `server.sslrootcert = ca`.
async fn checking_router(monitor: &Monitor, mode: &str, ca: &Path) -> RouterHandle {
    let sections = format!(
        "[server]\nsslmode = \"{mode}\"\nsslrootcert = \"{}\"\n",
        ca.display()
    );
    let router = RouterHandle::start(&monitor.uri(), "pause_timeout_ms = 1500", &sections).await;
    router.wait_epoch(1).await;
    router
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_mode_require_refuses_a_plain_client_before_authentication_and_admits_tls() {
    let (monitor, a) = one_node().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("hapg test CA");
    let (cert, key) = ca.issue(&["localhost", "127.0.0.1"]);
    std::fs::write(dir.path().join("cert.pem"), cert).expect("cert");
    std::fs::write(dir.path().join("key.pem"), key).expect("key");
    let sections = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_mode = \"require\"\n",
        dir.path().join("cert.pem").display(),
        dir.path().join("key.pem").display()
    );
    let router = RouterHandle::start(&monitor.uri(), "", &sections).await;
    router.wait_epoch(1).await;

    // A plain startup packet: the first answer is the FATAL (no
    // authentication request, no AuthenticationOk under trust), then the end.
    let mut raw = Raw::connect(router.addr).await;
    raw.send(&startup_packet(&[
        ("user", "postgres"),
        ("database", "postgres"),
    ]))
    .await;
    let message = expect_error(&mut raw, "28000").await;
    assert!(message.contains("only TLS"), "{message}");
    assert!(raw.closed().await, "the router closes after the refusal");

    // libpq-style clients read it too: tokio-postgres without TLS.
    let err = connect(&router.url("postgres"))
        .await
        .expect_err("a plain client is refused");
    let db = err.as_db_error().expect("the router's FATAL");
    assert_eq!(db.code().code(), "28000");
    assert_eq!(db.severity(), "FATAL");
    assert!(
        db.hint().is_some_and(|h| h.contains("sslmode=require")),
        "{db:?}"
    );

    // A TLS client is admitted, and verifies the router's certificate
    // against the CA (verify-full through hapg's own connector).
    let url = format!(
        "postgres://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
        router.addr.port(),
        ca.write(dir.path(), "ca.pem").display()
    );
    let info = hapg_config::conninfo::parse(&url).expect("conninfo");
    let tls = hapg_monitor::pgconn::client_config(&info.cert_check).expect("CA");
    let connection = hapg_monitor::pgconn::connect_with(
        info.config,
        tokio_postgres_rustls::MakeRustlsConnect::new(tls),
        Duration::from_secs(5),
    )
    .await
    .expect("a TLS client is admitted");
    assert_eq!(
        server_port(&connection.client).await.expect("query"),
        a.port
    );
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_admits_a_node_certified_by_the_ca_and_refuses_another_ca() {
    let (monitor, a) = one_node().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("hapg test CA");
    let other = Ca::new("some other CA");
    serve_tls(&a, &ca.issue(&["localhost", "127.0.0.1"])).await;

    let router = checking_router(&monitor, "verify-full", &ca.write(dir.path(), "ca.pem")).await;
    let client = connect(&router.url("postgres")).await.expect("login");
    assert!(
        server_side_ssl(&client)
            .await
            .expect("query through the router"),
        "the router's server connection is encrypted"
    );
    router.stop().await;

    let router = checking_router(
        &monitor,
        "verify-full",
        &other.write(dir.path(), "other.pem"),
    )
    .await;
    let client = connect(&router.url("postgres")).await.expect("login");
    let err = server_side_ssl(&client)
        .await
        .expect_err("no server connection with a certificate of another CA");
    let message = err.as_db_error().expect("the router's error").message();
    assert!(message.contains("server.sslrootcert"), "{message}");
    assert!(message.contains("UnknownIssuer"), "{message}");
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_refuses_a_wrong_host_name_that_verify_ca_accepts() {
    let (monitor, a) = one_node().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("hapg test CA");
    // Signed by the CA, but for another host than 127.0.0.1, where the
    // monitor says the node is.
    serve_tls(&a, &ca.issue(&["elsewhere.example"])).await;
    let ca_file = ca.write(dir.path(), "ca.pem");

    let router = checking_router(&monitor, "verify-full", &ca_file).await;
    let client = connect(&router.url("postgres")).await.expect("login");
    let err = server_side_ssl(&client)
        .await
        .expect_err("the host name is checked");
    let message = err.as_db_error().expect("the router's error").message();
    assert!(message.contains("verify-full"), "{message}");
    assert!(message.contains("not valid for name"), "{message}");
    router.stop().await;

    let router = checking_router(&monitor, "verify-ca", &ca_file).await;
    let client = connect(&router.url("postgres")).await.expect("login");
    assert!(server_side_ssl(&client)
        .await
        .expect("verify-ca checks the chain only"));
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monitor_connection_verifies_the_monitor_certificate() {
    let (monitor, _a) = one_node().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("hapg test CA");
    let other = Ca::new("some other CA");
    serve_tls(&monitor.pg, &ca.issue(&["localhost", "127.0.0.1"])).await;
    let uri = |ca_file: &Path| {
        format!(
            "{}?sslmode=verify-full&sslrootcert={}",
            monitor.uri(),
            ca_file.display()
        )
    };

    let router = RouterHandle::start(&uri(&ca.write(dir.path(), "ca.pem")), "", "").await;
    router.wait_epoch(1).await;
    let encrypted = monitor
        .client
        .query(
            "SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
              WHERE a.usename = 'autoctl_node'",
            &[],
        )
        .await
        .expect("the router's monitor connections");
    assert!(!encrypted.is_empty(), "the router is connected");
    assert!(encrypted.iter().all(|row| row.get::<_, bool>(0)));
    router.stop().await;

    // A monitor certificate of another CA: the router never reads the
    // routing from it.
    let router = RouterHandle::start(&uri(&other.write(dir.path(), "other.pem")), "", "").await;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        assert!(
            router.router.routing().target().is_none(),
            "routing read from a monitor whose certificate the CA did not sign"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    router.stop().await;
}

/// `server.sslmode = require` (issue 27, part 2 item 3): the server
/// connection is encrypted without checking whose certificate it is, and a
/// node that does not offer TLS is refused, with the reason, rather than
/// used in the clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_encrypts_without_checking_and_refuses_a_node_without_tls() {
    let (monitor, a) = one_node().await;
    let sections = "[server]\nsslmode = \"require\"\n";
    let router = RouterHandle::start(&monitor.uri(), "pause_timeout_ms = 1500", sections).await;
    router.wait_epoch(1).await;
    let client = connect(&router.url("postgres")).await.expect("login");
    let err = server_side_ssl(&client)
        .await
        .expect_err("a node without TLS is not used in the clear");
    let message = err.as_db_error().expect("the router's error").message();
    assert!(
        message.contains("does not accept TLS") && message.contains("server.sslmode is require"),
        "{message}"
    );
    router.stop().await;

    // A certificate no one vouches for: require does not check it.
    let stranger = Ca::new("nobody's CA");
    serve_tls(&a, &stranger.issue(&["elsewhere.example"])).await;
    let router = RouterHandle::start(&monitor.uri(), "pause_timeout_ms = 1500", sections).await;
    router.wait_epoch(1).await;
    let client = connect(&router.url("postgres")).await.expect("login");
    assert!(
        server_side_ssl(&client)
            .await
            .expect("query through the router"),
        "the router's server connection is encrypted"
    );
    router.stop().await;
}
