//! A real etcd cluster on loopback for the tests and the bench of the
//! etcd-backed monitor: members on free ports under one directory, each one
//! killed (SIGKILL), frozen (SIGSTOP), thawed and restarted on its own data,
//! and every member stopped when the cluster is dropped. With
//! [`EtcdCluster::start_tls`] the members serve their clients over TLS only,
//! with certificates of a test CA made in the cluster's directory.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Where Debian's `etcd-server` and `etcd-client` packages put the programs.
pub const ETCD: &str = "/usr/bin/etcd";
/// etcd's command-line client, used to ask a member whether it is healthy.
pub const ETCDCTL: &str = "/usr/bin/etcdctl";

/// How long a member may take to start and join.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors starting or driving the cluster.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// etcd is not installed.
    #[error("{ETCD} not found: install Debian's etcd-server and etcd-client packages (.ci/install does)")]
    Missing,
    /// A process could not be run.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The test certificates could not be made.
    #[error("making the test certificates: {0}")]
    Certificate(#[from] rcgen::Error),
    /// The cluster did not become healthy in time.
    #[error("etcd members {endpoints} not healthy within {seconds} s; logs in {dir}")]
    NotHealthy {
        /// The members asked.
        endpoints: String,
        /// How long it waited.
        seconds: u64,
        /// Where the members' logs are.
        dir: String,
    },
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// An etcd cluster of real `etcd` processes on 127.0.0.1.
pub struct EtcdCluster {
    dir: PathBuf,
    token: String,
    members: Vec<Member>,
    tls: Option<TlsFiles>,
}

/// The files of a TLS cluster, all PEM, in `DIR/tls/`: the CA that signed
/// the members' certificate, the members' certificate (for 127.0.0.1 and
/// localhost) and key, a client certificate and key of the same CA (the
/// members require one when `client_certs`), and a CA that signed nothing
/// here (to show that a wrong CA is refused).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA the members' certificate is signed by.
    pub ca: PathBuf,
    /// The members' certificate.
    pub server_cert: PathBuf,
    /// The members' key.
    pub server_key: PathBuf,
    /// A client certificate signed by `ca`.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
    /// Another CA, which signed none of these.
    pub other_ca: PathBuf,
    /// Whether the members require a client certificate.
    pub client_certs: bool,
}

impl TlsFiles {
    /// Makes a CA, the members' and a client's certificates, and another CA,
    /// and writes them under `dir`.
    fn make(dir: &Path, client_certs: bool) -> Result<TlsFiles, EtcdError> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        let io = |what: String| move |source| EtcdError::Io { what, source };
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let write = |name: &str, text: String| -> Result<PathBuf, EtcdError> {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(io(format!("writing {}", path.display())))?;
            Ok(path)
        };
        let ca = |name: &str| -> Result<(rcgen::Certificate, KeyPair), EtcdError> {
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let key = KeyPair::generate()?;
            let cert = params.self_signed(&key)?;
            Ok((cert, key))
        };
        let (ca_cert, ca_key) = ca("hapg test etcd CA")?;
        let (other, _) = ca("hapg test unrelated CA")?;
        let issue = |names: Vec<String>,
                     name: &str,
                     usage: ExtendedKeyUsagePurpose|
         -> Result<(String, String), EtcdError> {
            let mut params = CertificateParams::new(names)?;
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
            Ok((cert.pem(), key.serialize_pem()))
        };
        let (server_cert, server_key) = issue(
            vec!["127.0.0.1".to_string(), "localhost".to_string()],
            "hapg test etcd member",
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let (client_cert, client_key) = issue(
            Vec::new(),
            "hapg test etcd client",
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        Ok(TlsFiles {
            ca: write("ca.pem", ca_cert.pem())?,
            server_cert: write("server.pem", server_cert)?,
            server_key: write("server-key.pem", server_key)?,
            client_cert: write("client.pem", client_cert)?,
            client_key: write("client-key.pem", client_key)?,
            other_ca: write("other-ca.pem", other.pem())?,
            client_certs,
        })
    }

    /// The options of an etcd URI that trust `ca` (and present the client
    /// certificate when the members require one).
    pub fn query(&self, ca: &Path) -> String {
        let mut query = format!("cacert={}", ca.display());
        if self.client_certs {
            query.push_str(&format!(
                "&cert={}&key={}",
                self.client_cert.display(),
                self.client_key.display()
            ));
        }
        query
    }
}

fn free_port() -> Result<u16, EtcdError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| EtcdError::Io {
            what: "picking a free port".into(),
            source,
        })
}

impl EtcdCluster {
    /// Starts `size` members under `dir` (their data and logs) and waits
    /// until every one answers healthy.
    pub fn start(dir: &Path, size: usize) -> Result<EtcdCluster, EtcdError> {
        EtcdCluster::start_with(dir, size, None)
    }

    /// [`EtcdCluster::start`] with the members serving their clients over
    /// TLS only (https), with certificates made in `dir/tls` (see
    /// [`TlsFiles`]); with `client_certs` they also require a client
    /// certificate of the same CA. The members talk to each other in plain
    /// http, as the peers' traffic is not what is tested.
    pub fn start_tls(
        dir: &Path,
        size: usize,
        client_certs: bool,
    ) -> Result<EtcdCluster, EtcdError> {
        let tls = TlsFiles::make(&dir.join("tls"), client_certs)?;
        EtcdCluster::start_with(dir, size, Some(tls))
    }

    fn start_with(
        dir: &Path,
        size: usize,
        tls: Option<TlsFiles>,
    ) -> Result<EtcdCluster, EtcdError> {
        if !Path::new(ETCD).exists() {
            return Err(EtcdError::Missing);
        }
        std::fs::create_dir_all(dir).map_err(|source| EtcdError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        let mut members = Vec::with_capacity(size);
        for i in 0..size {
            members.push(Member {
                name: format!("etcd{i}"),
                client_port: free_port()?,
                peer_port: free_port()?,
                child: None,
            });
        }
        let mut cluster = EtcdCluster {
            dir: dir.to_path_buf(),
            token: format!("hapg-{}", crate::netns::run_seed()),
            members,
            tls,
        };
        for i in 0..size {
            cluster.spawn(i, "new")?;
        }
        cluster.wait_healthy(&(0..size).collect::<Vec<_>>(), START_TIMEOUT)?;
        Ok(cluster)
    }

    /// The certificates of a cluster started with [`EtcdCluster::start_tls`].
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Client URLs of every member (`http://127.0.0.1:PORT`, or `https://`).
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!(
            "{}://127.0.0.1:{}",
            self.scheme(),
            self.members[i].client_port
        )
    }

    /// A monitor URI for this cluster: `etcd://127.0.0.1:P1,.../prefix`,
    /// with the options that trust the cluster's CA when it serves TLS.
    pub fn uri(&self, prefix: &str) -> String {
        let plain = self.plain_uri(prefix);
        match &self.tls {
            Some(tls) => format!("{plain}?{}", tls.query(&tls.ca)),
            None => plain,
        }
    }

    /// The monitor URI with no options (no TLS), whatever the members serve.
    pub fn plain_uri(&self, prefix: &str) -> String {
        let hosts: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect();
        format!(
            "etcd://{}/{}",
            hosts.join(","),
            prefix.trim_start_matches('/')
        )
    }

    /// The directory of the members' data and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Process id of member `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(Child::id)
    }

    /// SIGKILLs member `i` (its sockets are reset at once) and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` to member `i` (SIGSTOP freezes it without a word to
    /// its peers or clients; SIGCONT thaws it).
    pub fn signal(&self, i: usize, signal: Signal) {
        if let Some(pid) = self.pid(i) {
            let _ = kill(Pid::from_raw(pid as i32), signal);
        }
    }

    /// Starts member `i` again on its own data after [`EtcdCluster::kill`],
    /// and waits until it is healthy.
    pub fn restart(&mut self, i: usize) -> Result<(), EtcdError> {
        self.kill(i);
        self.spawn(i, "existing")?;
        self.wait_healthy(&[i], START_TIMEOUT)
    }

    fn spawn(&mut self, i: usize, state: &str) -> Result<(), EtcdError> {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect();
        let member = &self.members[i];
        let data = self.dir.join(&member.name);
        let log_path = self.dir.join(format!("{}.log", member.name));
        let io = |what: String| move |source| EtcdError::Io { what, source };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("opening {}", log_path.display())))?;
        let log2 = log
            .try_clone()
            .map_err(io(format!("opening {}", log_path.display())))?;
        let scheme = self.scheme();
        let client = format!("{scheme}://127.0.0.1:{}", member.client_port);
        let peer = format!("http://127.0.0.1:{}", member.peer_port);
        let mut command = Command::new(ETCD);
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&tls.server_cert)
                .arg("--key-file")
                .arg(&tls.server_key);
            if tls.client_certs {
                command
                    .arg("--client-cert-auth")
                    .arg("--trusted-ca-file")
                    .arg(&tls.ca);
            }
        }
        let child = command
            .arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", &self.token])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(io(format!("starting {ETCD}")))?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// Waits until each member of `which` says it is healthy (which it says
    /// only while its cluster has a quorum).
    pub fn wait_healthy(&self, which: &[usize], timeout: Duration) -> Result<(), EtcdError> {
        let endpoints: Vec<String> = which.iter().map(|&i| self.endpoint(i)).collect();
        let deadline = Instant::now() + timeout;
        loop {
            if self.healthy(&endpoints) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(EtcdError::NotHealthy {
                    endpoints: endpoints.join(","),
                    seconds: timeout.as_secs(),
                    dir: self.dir.display().to_string(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether every member of `endpoints` answers healthy now.
    pub fn healthy(&self, endpoints: &[String]) -> bool {
        let mut command = Command::new(ETCDCTL);
        if let Some(tls) = &self.tls {
            command.arg("--cacert").arg(&tls.ca);
            if tls.client_certs {
                command
                    .arg("--cert")
                    .arg(&tls.client_cert)
                    .arg("--key")
                    .arg(&tls.client_key);
            }
        }
        command
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &endpoints.join(",")])
            .args(["--dial-timeout", "1s", "--command-timeout", "2s"])
            .args(["endpoint", "health"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            // SIGKILL ends a frozen member too; the SIGCONT is for a
            // member whose process outlives this value for any reason.
            self.signal(i, Signal::SIGCONT);
            self.kill(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three real members: healthy together; with one killed the other two
    /// keep a quorum; with two killed the last one is not healthy (no
    /// quorum); restarted on their data, all three are healthy again.
    #[test]
    fn three_members_keep_a_quorum_of_two() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cluster = EtcdCluster::start(dir.path(), 3).expect("etcd cluster");
        assert!(cluster.healthy(&cluster.endpoints()));
        cluster.kill(0);
        cluster
            .wait_healthy(&[1, 2], Duration::from_secs(10))
            .expect("two of three keep the quorum");
        cluster.kill(1);
        assert!(
            !cluster.healthy(&[cluster.endpoint(2)]),
            "one member of three has no quorum"
        );
        cluster.restart(0).expect("member 0 back");
        cluster.restart(1).expect("member 1 back");
        assert!(cluster.healthy(&cluster.endpoints()));
        assert!(cluster.uri("hapg/test").starts_with("etcd://127.0.0.1:"));
    }

    /// A TLS cluster answers etcdctl over https with its CA (and the
    /// client certificate it requires), and its URI carries the options.
    #[test]
    fn tls_members_serve_https() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cluster = EtcdCluster::start_tls(dir.path(), 1, true).expect("etcd cluster");
        assert!(cluster.endpoint(0).starts_with("https://"));
        assert!(cluster.healthy(&cluster.endpoints()));
        let tls = cluster.tls().expect("tls");
        assert!(cluster.uri("p").ends_with(&format!(
            "/p?cacert={}&cert={}&key={}",
            tls.ca.display(),
            tls.client_cert.display(),
            tls.client_key.display()
        )));
    }
}
