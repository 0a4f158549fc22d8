//! Test harness of the store tests: a throwaway Postgres 15 instance (run as
//! the `postgres` OS user when the tests run as root) set up as a monitor
//! database, and store connections to it.

#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use hapg_monitor::store::etcd::EtcdStore;
use hapg_monitor::store::postgres::PgStore;
use hapg_monitor::store::ChangeFeed;
use hapg_monitor::MonitorStore;

/// Where Debian puts the Postgres 15 binaries (override with `PG_BINDIR`).
fn bindir() -> PathBuf {
    std::env::var_os("PG_BINDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

/// The `postgres` user's ids when running as root.
fn postgres_ids() -> Option<(u32, u32)> {
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind port 0")
        .local_addr()
        .expect("local addr")
        .port()
}

/// A running Postgres holding a migrated monitor database; stopped on drop.
pub struct PgMonitor {
    dir: tempfile::TempDir,
    port: u16,
}

impl PgMonitor {
    pub async fn start() -> PgMonitor {
        let dir = tempfile::tempdir().expect("tempdir");
        if let Some((uid, gid)) = postgres_ids() {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown");
        }
        let data = dir.path().join("data");
        let out = pg_command("initdb")
            .args(["-D", data.to_str().expect("utf8"), "-U", "postgres"])
            .args(["-A", "trust", "-E", "UTF8", "--locale=C", "-N"])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut started = None;
        for _ in 0..5 {
            let port = free_port();
            let opts = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                dir.path().display()
            );
            let out = pg_command("pg_ctl")
                .args(["-D", data.to_str().expect("utf8"), "-l"])
                .arg(dir.path().join("log"))
                .args(["-w", "-t", "30", "-o", &opts, "start"])
                .output()
                .expect("run pg_ctl");
            if out.status.success() {
                started = Some(port);
                break;
            }
        }
        let port = started.expect("postgres starts");
        let monitor = PgMonitor { dir, port };
        let admin = monitor.superuser("postgres").await;
        admin
            .client_batch("CREATE ROLE autoctl_node LOGIN; CREATE DATABASE pg_auto_failover")
            .await;
        let (mut store, _) = PgStore::from_connection(
            hapg_monitor::pgconn::connect(
                monitor.config("pg_auto_failover"),
                Duration::from_secs(5),
            )
            .await
            .expect("connect as superuser"),
        );
        store.migrate().await.expect("migrate");
        monitor
    }

    fn config(&self, dbname: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .user("postgres")
            .dbname(dbname);
        config
    }

    async fn superuser(&self, dbname: &str) -> Superuser {
        let connection = hapg_monitor::pgconn::connect(self.config(dbname), Duration::from_secs(5))
            .await
            .expect("connect as superuser");
        Superuser(connection.client)
    }

    /// The URI keepers, routers and the CLI use.
    pub fn uri(&self) -> String {
        format!(
            "postgres://autoctl_node@127.0.0.1:{}/pg_auto_failover",
            self.port
        )
    }

    /// A new store connection, as a client makes one.
    pub async fn store(&self) -> (PgStore, ChangeFeed) {
        PgStore::connect(&self.uri())
            .await
            .expect("connect the store")
    }
}

struct Superuser(tokio_postgres::Client);

impl Superuser {
    async fn client_batch(&self, sql: &str) {
        for statement in sql.split(';') {
            self.0
                .batch_execute(statement)
                .await
                .expect("admin statement");
        }
    }
}

impl Drop for PgMonitor {
    fn drop(&mut self) {
        let _ = pg_command("pg_ctl")
            .args(["-D"])
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// A one-member etcd cluster on free loopback ports in a temporary
/// directory; killed on drop.
pub struct Etcd {
    _dir: tempfile::TempDir,
    child: std::process::Child,
    client_port: u16,
}

impl Etcd {
    pub async fn start() -> Etcd {
        let mut last = String::new();
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("tempdir");
            let (client_port, peer_port) = (free_port(), free_port());
            let client = format!("http://127.0.0.1:{client_port}");
            let peer = format!("http://127.0.0.1:{peer_port}");
            let log = std::fs::File::create(dir.path().join("etcd.log")).expect("log file");
            let child = Command::new("etcd")
                .arg("--name=store-test")
                .arg(format!("--data-dir={}", dir.path().join("data").display()))
                .arg(format!("--listen-client-urls={client}"))
                .arg(format!("--advertise-client-urls={client}"))
                .arg(format!("--listen-peer-urls={peer}"))
                .arg(format!("--initial-advertise-peer-urls={peer}"))
                .arg(format!("--initial-cluster=store-test={peer}"))
                .stdout(log.try_clone().expect("log file"))
                .stderr(log)
                .spawn()
                .expect("run etcd (Debian package etcd-server)");
            let mut etcd = Etcd {
                _dir: dir,
                child,
                client_port,
            };
            // Ready when a store can open it: bounded wait.
            for _ in 0..100 {
                if let Ok(Ok(_)) =
                    tokio::time::timeout(Duration::from_secs(2), EtcdStore::open(&etcd.uri())).await
                {
                    let (mut store, _) = EtcdStore::open(&etcd.uri()).await.expect("open");
                    store.migrate().await.expect("migrate");
                    return etcd;
                }
                if etcd.child.try_wait().ok().flatten().is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            last = std::fs::read_to_string(etcd._dir.path().join("etcd.log")).unwrap_or_default();
        }
        panic!("etcd did not start: {last}");
    }

    pub fn uri(&self) -> String {
        format!("etcd://127.0.0.1:{}/hapg-test", self.client_port)
    }

    /// A new store connection, as a client makes one.
    pub async fn store(&self) -> (EtcdStore, ChangeFeed) {
        EtcdStore::connect(&self.uri())
            .await
            .expect("connect the store")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
