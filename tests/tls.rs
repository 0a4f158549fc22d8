//! A formation with real certificates, verified end to end (issue 23 item 7):
//! `create monitor|postgres --ssl-ca-file --server-cert --server-key` as
//! pg_autoctl takes them, with a CA and a "localhost" certificate of the
//! test's own; real `hapg` processes and Postgres.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use support::*;

/// A CA certificate (PEM) and a server certificate and key it signed.
fn issue(ca_name: &str, names: &[&str]) -> (String, String, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, ca_name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().expect("CA key");
    let ca = params.self_signed(&ca_key).expect("CA certificate");
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names).expect("server params");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().expect("server key");
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .expect("server certificate");
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// Writes `text` to `dir/name`; a key is made readable by Postgres' OS user
/// only, as Postgres insists.
fn write(dir: &Path, name: &str, text: &str, key: bool) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write TLS file");
    if key {
        if let Ok(Some(user)) = nix::unistd::User::from_name("postgres") {
            if nix::unistd::geteuid().is_root() {
                std::os::unix::fs::chown(&path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
                    .expect("chown key");
            }
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    } else {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    path
}

fn create_args<'a>(
    kind: &'a str,
    pgdata: &'a str,
    port: &'a str,
    tls: &'a [String],
) -> Vec<&'a str> {
    let mut args = vec![
        "create",
        kind,
        "--pgdata",
        pgdata,
        "--pgport",
        port,
        "--hostname",
        "localhost",
        "--auth",
        "trust",
    ];
    args.extend(tls.iter().map(String::as_str));
    args
}

/// Rows of `sql` (one text column) on the Postgres at `port`, as its superuser.
fn query(port: u16, sql: &str) -> Vec<String> {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let client = connect(&format!(
            "host=127.0.0.1 port={port} user=postgres dbname=postgres"
        ))
        .await
        .expect("connect as superuser");
        client
            .query(sql, &[])
            .await
            .expect(sql)
            .iter()
            .map(|row| row.get::<_, String>(0))
            .collect()
    })
}

#[test]
fn a_formation_with_a_ca_verifies_every_connection() {
    let mut cluster = Cluster::new();
    let certs = cluster.path().join("certs");
    std::fs::create_dir(&certs).expect("certs dir");
    std::fs::set_permissions(&certs, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let (ca, cert, key) = issue("hapg test CA", &["localhost", "127.0.0.1"]);
    let ca_file = write(&certs, "ca.pem", &ca, false);
    let cert_file = write(&certs, "server.crt", &cert, false);
    let key_file = write(&certs, "server.key", &key, true);
    let tls: Vec<String> = [
        ("--ssl-ca-file", &ca_file),
        ("--server-cert", &cert_file),
        ("--server-key", &key_file),
    ]
    .iter()
    .flat_map(|(flag, path)| [flag.to_string(), path.display().to_string()])
    .collect();

    cluster.monitor_port = free_port();
    let port = cluster.monitor_port.to_string();
    let mut args = create_args("monitor", "./monitor", &port, &tls);
    args.push("--run");
    cluster.spawn("monitor", &args);
    cluster.eventually("the monitor to answer", Duration::from_secs(60), || {
        cluster
            .run(&["show", "state", "--pgdata", "./monitor"])
            .status
            .success()
    });

    // The URI keepers, routers and the CLI are given verifies the monitor.
    let monitor_uri = cluster.monitor_uri();
    assert!(monitor_uri.contains("sslmode=verify-full"), "{monitor_uri}");
    assert!(monitor_uri.contains("sslrootcert="), "{monitor_uri}");

    for name in ["node_a", "node_b"] {
        let port = free_port();
        let port_s = port.to_string();
        let pgdata = format!("./{name}");
        let mut args = create_args("postgres", &pgdata, &port_s, &tls);
        args.extend([
            "--name",
            name,
            "--monitor",
            &monitor_uri,
            "--dbname",
            "appdb",
            "--run",
        ]);
        cluster.spawn(name, &args);
        let pgdata = cluster.path().join(name);
        cluster.nodes.push(Node {
            name: name.to_string(),
            pgdata,
            port,
        });
        if name == "node_a" {
            cluster.wait_states(&[("node_a", "single")], Duration::from_secs(90));
        }
    }
    cluster.wait_states(
        &[("node_a", "primary"), ("node_b", "secondary")],
        Duration::from_secs(120),
    );

    // Postgres serves the given certificate, and each node's configuration
    // says so.
    let a = cluster.node("node_a");
    let conf = std::fs::read_to_string(a.pgdata.join("postgresql.hapg.conf")).expect("hapg conf");
    for line in [
        format!("ssl_cert_file = '{}'", cert_file.display()),
        format!("ssl_key_file = '{}'", key_file.display()),
        format!("ssl_ca_file = '{}'", ca_file.display()),
    ] {
        assert!(conf.contains(&line), "{line} in\n{conf}");
    }

    // Every keeper's connection to the monitor is encrypted (it was made
    // with verify-full: a certificate the CA did not sign is refused below).
    let keepers = query(
        cluster.monitor_port,
        "SELECT s.ssl::text FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
          WHERE a.usename = 'autoctl_node' AND a.application_name <> 'hapg monitor'",
    );
    assert!(!keepers.is_empty(), "keepers connected to the monitor");
    assert!(keepers.iter().all(|ssl| ssl == "true"), "{keepers:?}");

    // The standby streams from the primary with verify-full too.
    let b = cluster.node("node_b");
    let standby =
        std::fs::read_to_string(b.pgdata.join("postgresql.hapg-standby.conf")).expect("standby");
    assert!(standby.contains("sslmode=verify-full"), "{standby}");
    let streams = query(
        a.port,
        "SELECT s.ssl::text FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)",
    );
    assert_eq!(streams, vec!["true".to_string()], "the standby's stream");

    // The formation URI `show uri` prints verifies the nodes, and works.
    let app = cluster.app_uri();
    assert!(app.contains("sslmode=verify-full"), "{app}");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(wait_writable(&app, Duration::from_secs(30)));

    // The same URI with another CA: the CLI refuses the monitor's
    // certificate and says so, rather than connecting unverified.
    let (other_ca, _, _) = issue("some other CA", &["localhost"]);
    let other_file = write(&certs, "other-ca.pem", &other_ca, false);
    let wrong = monitor_uri.replace(
        &format!("sslrootcert={}", ca_file.display()).replace('/', "%2F"),
        &format!("sslrootcert={}", other_file.display()),
    );
    assert_ne!(wrong, monitor_uri, "the CA file is named in the URI");
    let err = cluster.fails(&["show", "state", "--monitor", &wrong]);
    assert!(err.contains("certificate"), "{err}");
    assert!(err.contains("sslrootcert"), "{err}");
}
