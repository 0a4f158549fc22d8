//! Server connections: open one to the primary, negotiate TLS, log in with the
//! router's credentials, collect ParameterStatus and BackendKeyData, check the
//! server is not in recovery, and run the few statements the router issues
//! itself (session restore) before the connection is handed to the relay.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use hapg_config::router::ServerSslMode;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use crate::net::{self, Stream};
use crate::params::{set_shared_param, Params};
use crate::protocol::backend::{parse_error, parse_parameter_status, ErrorFields};
use crate::protocol::frame;
use crate::protocol::tag::backend as tag;
use crate::protocol::ProtocolError;
use crate::server_list::Listed;
use crate::slots::{NodeSlot, PoolId};

/// Largest message the router accepts from a server outside the relay.
const MAX_SERVER_MESSAGE: usize = 1 << 30;

/// Where a server connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Host name or address.
    pub host: Arc<str>,
    /// Port.
    pub port: u16,
    /// The routing epoch this target is the primary of.
    pub epoch: i64,
}

/// The first epoch of a read-only route's target (`read_pool.rs`): far
/// above any primary epoch. A target of such an epoch is a standby, and a
/// server connection to it must be in recovery.
pub(crate) const READ_EPOCH_BASE: i64 = 1 << 48;

/// How the router logs into servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    /// Server user.
    pub user: String,
    /// Password, when the server asks for one.
    pub password: Option<String>,
    /// Database.
    pub database: String,
    /// Other startup parameters, as the client sent them.
    pub params: Vec<(String, String)>,
    /// TLS to the server (over TCP; a Unix socket carries none, as with libpq).
    pub sslmode: ServerSslMode,
    /// Where a server on this machine has its Unix socket (`server.unix_socket_dir`).
    pub unix_socket_dir: Option<PathBuf>,
}

/// Why a server connection could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Network error.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The connection took longer than `server.connect_timeout_ms`.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The server refused the login or a statement.
    #[error("server said: {} {} ({})", .0.severity, .0.message, .0.code)]
    Refused(ErrorFields),
    /// The server is a standby.
    #[error("the server is in recovery (a standby), not a writable primary")]
    InRecovery,
    /// A read-only route's standby is no longer in recovery (promoted).
    #[error("the server is not in recovery: it is no longer a standby")]
    NotInRecovery,
    /// The server wants something the router cannot give.
    #[error("cannot log in: {0}")]
    Auth(String),
    /// TLS was required and refused, or the handshake failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// The server broke the protocol.
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// The server closed the connection.
    #[error("the server closed the connection")]
    Closed,
}

/// A logged-in server connection, ready for queries.
pub struct ServerConn {
    /// The stream.
    pub stream: Stream,
    /// Bytes read from the server and not yet consumed.
    pub buf: BytesMut,
    /// Routing epoch the connection belongs to.
    pub epoch: i64,
    /// Peer address, for cancel requests.
    pub addr: SocketAddr,
    /// BackendKeyData process id.
    pub pid: i32,
    /// BackendKeyData secret.
    pub secret: i32,
    /// ParameterStatus values, updated by the router's own statements.
    pub params: Params,
    /// ParameterStatus values as the login left them: what a client with the
    /// same startup parameters is owed when it takes the connection from the
    /// pool (transaction mode keeps a previous client's session-level SETs).
    pub opened: Params,
    /// The startup parameters the connection was opened with (other than
    /// user and database): a pooled connection only serves clients that sent
    /// the same ones.
    pub startup: Vec<(String, String)>,
    /// The pool the connection belongs to (none outside a pool).
    pub pool: Option<PoolId>,
    /// When the connection was opened.
    pub born: Instant,
    /// The pool slot the connection holds (none outside a pool).
    pub permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The router-wide slot the connection holds towards its node (none
    /// outside a pool), see [`NodeSlot`].
    pub node_slot: Option<NodeSlot>,
    /// Named prepared statements on this connection (transaction pooling):
    /// name and Parse frame. Every statement the server has is here; an entry
    /// whose frame is empty may or may not exist on the server.
    pub prepared: HashMap<Box<[u8]>, Bytes>,
    /// Its entry in `SHOW SERVERS` (none outside a pool), removed when
    /// the connection is dropped.
    pub listed: Option<Listed>,
}

impl ServerConn {
    /// Connects, logs in, and checks the server is writable, within `timeout`.
    pub async fn connect(
        target: &Target,
        login: &Login,
        tls: &Arc<rustls::ClientConfig>,
        liveness: &net::Liveness,
        timeout: Duration,
    ) -> Result<Box<ServerConn>, ServerError> {
        tokio::time::timeout(timeout, Self::connect_inner(target, login, tls, liveness))
            .await
            .map_err(|_| ServerError::Timeout(timeout))?
    }

    async fn connect_inner(
        target: &Target,
        login: &Login,
        tls: &Arc<rustls::ClientConfig>,
        liveness: &net::Liveness,
    ) -> Result<Box<ServerConn>, ServerError> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((&*target.host, target.port))
            .await?
            .collect();
        let local = match &login.unix_socket_dir {
            Some(dir) => connect_local(dir, &addrs).await,
            None => None,
        };
        let (stream, addr) = match local {
            Some(local) => local,
            None => {
                let tcp = TcpStream::connect(&addrs[..]).await?;
                net::tune_server(&tcp, liveness)?;
                let addr = tcp.peer_addr()?;
                (
                    negotiate_tls(tcp, &target.host, login.sslmode, tls).await?,
                    addr,
                )
            }
        };
        // Boxed: a connection moves between a session and its pool at
        // every transaction boundary in transaction mode, and a pointer
        // moves without a copy of the struct.
        let mut conn = Box::new(ServerConn {
            stream,
            buf: BytesMut::with_capacity(net::READ_CHUNK),
            epoch: target.epoch,
            addr,
            pid: 0,
            secret: 0,
            params: Params::default(),
            opened: Params::default(),
            startup: login.params.clone(),
            pool: None,
            born: Instant::now(),
            permit: None,
            node_slot: None,
            prepared: HashMap::new(),
            listed: None,
        });
        conn.login(login).await?;
        conn.opened = conn.params.clone();
        let in_recovery = match conn.param("in_hot_standby") {
            Some("off") => false,
            Some(_) => true,
            None => {
                let rows = conn.simple_query("SELECT pg_is_in_recovery()").await?;
                rows.first().map(String::as_str) != Some("f")
            }
        };
        match (in_recovery, target.epoch >= READ_EPOCH_BASE) {
            (true, false) => Err(ServerError::InRecovery),
            (false, true) => Err(ServerError::NotInRecovery),
            _ => Ok(conn),
        }
    }

    /// Marks the connection as used by client `client` (0: back in its
    /// pool), for `SHOW SERVERS`.
    #[inline]
    pub fn set_link(&self, client: i32) {
        if let Some(listed) = &self.listed {
            listed.entry.set_link(client);
        }
    }

    /// Where a cancel request for this connection goes.
    pub fn cancel_target(&self) -> crate::cancel::CancelTarget {
        crate::cancel::CancelTarget {
            addr: self.addr,
            pid: self.pid,
            secret: self.secret,
        }
    }

    /// A ParameterStatus value the server reported.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    async fn login(&mut self, login: &Login) -> Result<(), ServerError> {
        let mut out = BytesMut::with_capacity(256);
        let mut params: Vec<(&str, &str)> = vec![
            ("user", login.user.as_str()),
            ("database", login.database.as_str()),
        ];
        for (k, v) in &login.params {
            if k != "user" && k != "database" && !k.starts_with("_pq_.") {
                params.push((k.as_str(), v.as_str()));
            }
        }
        frontend::startup_message(params, &mut out)?;
        self.stream.write_all(&out).await?;
        let mut scram: Option<ScramSha256> = None;
        loop {
            let (tag, body) = self.read_message().await?;
            match tag {
                tag::AUTHENTICATION => {
                    out.clear();
                    if answer_auth(login, body, &mut scram, &mut out)? {
                        self.stream.write_all(&out).await?;
                    }
                }
                tag::PARAMETER_STATUS => {
                    if let Some((name, value)) = parse_parameter_status(&body) {
                        set_shared_param(&mut self.params, name, value);
                    }
                }
                tag::BACKEND_KEY_DATA => {
                    let mut body = body;
                    if body.len() < 8 {
                        return Err(ProtocolError::Malformed {
                            what: "BackendKeyData",
                        }
                        .into());
                    }
                    self.pid = body.get_i32();
                    self.secret = body.get_i32();
                }
                tag::ERROR_RESPONSE => return Err(ServerError::Refused(parse_error(&body))),
                tag::NOTICE_RESPONSE => {}
                tag::READY_FOR_QUERY => return Ok(()),
                other => {
                    return Err(ProtocolError::Unexpected {
                        tag: other as char,
                        during: "server login",
                    }
                    .into())
                }
            }
        }
    }

    /// Reads one whole message.
    pub async fn read_message(&mut self) -> Result<(u8, BytesMut), ServerError> {
        loop {
            if let Some(frame) = frame::split(&mut self.buf, MAX_SERVER_MESSAGE)? {
                return Ok(frame);
            }
            net::read_room(&mut self.buf);
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(ServerError::Closed);
            }
        }
    }

    /// Runs statements the router issues itself; returns the first column of
    /// each row (text), fails on any error. ParameterStatus updates are kept.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<String>, ServerError> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out)?;
        self.stream.write_all(&out).await?;
        self.until_ready().await
    }

    /// Sends raw frames (Parse messages being replayed) followed by Sync, and
    /// waits for ReadyForQuery; fails on any error.
    pub async fn replay(&mut self, frames: &[u8]) -> Result<(), ServerError> {
        let mut out = BytesMut::with_capacity(frames.len() + 5);
        out.extend_from_slice(frames);
        frontend::sync(&mut out);
        self.stream.write_all(&out).await?;
        self.until_ready().await.map(|_| ())
    }

    async fn until_ready(&mut self) -> Result<Vec<String>, ServerError> {
        let mut rows = Vec::new();
        let mut failure = None;
        loop {
            let (tag, body) = self.read_message().await?;
            match tag {
                tag::DATA_ROW => {
                    let mut body = body;
                    if body.len() >= 6 && body.get_i16() >= 1 {
                        let len = body.get_i32();
                        if len >= 0 && body.len() >= len as usize {
                            rows.push(String::from_utf8_lossy(&body[..len as usize]).into_owned());
                        }
                    }
                }
                tag::PARAMETER_STATUS => {
                    if let Some((name, value)) = parse_parameter_status(&body) {
                        set_shared_param(&mut self.params, name, value);
                    }
                }
                tag::ERROR_RESPONSE => {
                    let fields = parse_error(&body);
                    if fields.is_fatal() {
                        return Err(ServerError::Refused(fields));
                    }
                    failure.get_or_insert(fields);
                }
                tag::READY_FOR_QUERY => {
                    return match failure {
                        Some(fields) => Err(ServerError::Refused(fields)),
                        None => Ok(rows),
                    }
                }
                _ => {}
            }
        }
    }

    /// True when nothing arrived on the idle connection (no end of file, no
    /// FATAL from a terminated backend); for TLS only end of file is seen.
    pub fn looks_alive(&self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        // The reactor's view first, which costs no system call: a socket it
        // has not seen become readable since the last read has nothing new
        // (no read is pending on an idle connection, so the no-op waker
        // displaces nobody's).
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if self.stream.poll_read_ready(&mut cx).is_pending() {
            return true;
        }
        match self.stream.peek_socket() {
            Ok(0) => false,
            Ok(_) => self.stream.is_tls(),
            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        }
    }

    /// Says goodbye (Terminate) without waiting.
    pub async fn terminate(mut self: Box<Self>) {
        let mut out = BytesMut::new();
        frontend::terminate(&mut out);
        let _ = tokio::time::timeout(Duration::from_millis(100), async {
            let _ = self.stream.write_all(&out).await;
            let _ = self.stream.shutdown().await;
        })
        .await;
    }
}

/// Answers one Authentication request of the server's (`body` after the
/// tag) into `out`: true when there is an answer to send, false when the
/// request needs none (AuthenticationOk, SASL final).
fn answer_auth(
    login: &Login,
    mut body: BytesMut,
    scram: &mut Option<ScramSha256>,
    out: &mut BytesMut,
) -> Result<bool, ServerError> {
    if body.len() < 4 {
        return Err(ProtocolError::Malformed {
            what: "Authentication",
        }
        .into());
    }
    let code = body.get_i32();
    let password = || {
        login.password.as_deref().ok_or_else(|| {
            ServerError::Auth(format!(
                "the server asks a password for user {:?}; set server.password or give the user a plain-text password in the auth file",
                login.user
            ))
        })
    };
    match code {
        0 => return Ok(false),
        3 => frontend::password_message(password()?.as_bytes(), out)?,
        5 => {
            let salt: [u8; 4] = body[..].try_into().map_err(|_| ProtocolError::Malformed {
                what: "AuthenticationMD5Password",
            })?;
            let hash = postgres_protocol::authentication::md5_hash(
                login.user.as_bytes(),
                password()?.as_bytes(),
                salt,
            );
            frontend::password_message(hash.as_bytes(), out)?;
        }
        10 => {
            if !body[..].split(|&b| b == 0).any(|m| m == b"SCRAM-SHA-256") {
                return Err(ServerError::Auth(
                    "the server offers no SASL mechanism the router supports".into(),
                ));
            }
            let client = ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
            frontend::sasl_initial_response("SCRAM-SHA-256", client.message(), out)?;
            *scram = Some(client);
        }
        11 => {
            let client = scram.as_mut().ok_or(ProtocolError::Unexpected {
                tag: 'R',
                during: "login (SASL continue without SASL)",
            })?;
            client
                .update(&body)
                .map_err(|e| ServerError::Auth(format!("SCRAM: {e}")))?;
            frontend::sasl_response(client.message(), out)?;
        }
        12 => {
            let mut client = scram.take().ok_or(ProtocolError::Unexpected {
                tag: 'R',
                during: "login (SASL final without SASL)",
            })?;
            client
                .finish(&body)
                .map_err(|e| ServerError::Auth(format!("SCRAM: {e}")))?;
            return Ok(false);
        }
        other => {
            return Err(ServerError::Auth(format!(
                "unsupported authentication request {other}"
            )))
        }
    }
    Ok(true)
}

/// Connects to the Unix socket in `dir` of the server at `addrs` when that
/// server is on this machine: one of `addrs` is a loopback address or one
/// bound to an interface here (binding to it succeeds), and its socket,
/// `<dir>/.s.PGSQL.<port>`, accepts the connection. Returns the stream and
/// that TCP address, which stays the connection's address for cancel
/// requests (the same postmaster listens on both). `None` means TCP: the
/// server is elsewhere, or its socket is not there (logged).
async fn connect_local(dir: &Path, addrs: &[SocketAddr]) -> Option<(Stream, SocketAddr)> {
    let addr = *addrs.iter().find(|addr| is_this_machine(addr.ip()))?;
    let path = dir.join(format!(".s.PGSQL.{}", addr.port()));
    match UnixStream::connect(&path).await {
        Ok(stream) => Some((Stream::Local(stream), addr)),
        Err(e) => {
            tracing::warn!(socket = %path.display(), server = %addr, error = %e, "the server is on this machine but its Unix socket does not answer (check server.unix_socket_dir); using TCP");
            None
        }
    }
}

/// True when `ip` is an address of this machine, in this network namespace.
fn is_this_machine(ip: IpAddr) -> bool {
    ip.is_loopback() || (!ip.is_unspecified() && std::net::UdpSocket::bind((ip, 0)).is_ok())
}

async fn negotiate_tls(
    mut tcp: TcpStream,
    host: &str,
    mode: ServerSslMode,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<Stream, ServerError> {
    if mode == ServerSslMode::Disable {
        return Ok(Stream::Plain(tcp));
    }
    let mut out = BytesMut::new();
    frontend::ssl_request(&mut out);
    tcp.write_all(&out).await?;
    let answer = tcp.read_u8().await?;
    match answer {
        b'S' => {
            let name = ServerName::try_from(host.to_string())
                .map_err(|e| ServerError::Tls(format!("server name {host:?}: {e}")))?;
            let stream = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
                    Some(rustls::Error::InvalidCertificate(why)) => ServerError::Tls(format!(
                        "the certificate of {host} is refused by server.sslmode {} against server.sslrootcert: {why}",
                        if mode == ServerSslMode::VerifyFull { "verify-full" } else { "verify-ca" }
                    )),
                    _ => ServerError::Tls(e.to_string()),
                })?;
            Ok(Stream::ServerTls(Box::new(stream)))
        }
        b'N' if mode == ServerSslMode::Prefer => Ok(Stream::Plain(tcp)),
        b'N' => Err(ServerError::Tls(format!(
            "the server does not accept TLS and server.sslmode is {}",
            match mode {
                ServerSslMode::VerifyCa => "verify-ca",
                ServerSslMode::VerifyFull => "verify-full",
                _ => "require",
            }
        ))),
        other => Err(ProtocolError::Unexpected {
            tag: other as char,
            during: "the answer to SSLRequest",
        }
        .into()),
    }
}

/// Sends a CancelRequest for (`pid`, `secret`) to `addr`.
pub async fn send_cancel(addr: SocketAddr, pid: i32, secret: i32) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut out = BytesMut::new();
    frontend::cancel_request(pid, secret, &mut out);
    stream.write_all(&out).await?;
    // Postgres closes the connection once it has read the request.
    let mut sink = [0u8; 1];
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut sink)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machine_is_loopback_and_the_addresses_bound_here() {
        for local in ["127.0.0.1", "127.0.0.2", "::1"] {
            assert!(is_this_machine(local.parse().expect("address")), "{local}");
        }
        // The wildcard is nobody's address; 192.0.2.0/24 (TEST-NET-1) is
        // never assigned to a real interface.
        for elsewhere in ["0.0.0.0", "::", "192.0.2.1"] {
            assert!(
                !is_this_machine(elsewhere.parse().expect("address")),
                "{elsewhere}"
            );
        }
    }

    #[tokio::test]
    async fn a_server_elsewhere_or_without_a_socket_is_reached_over_tcp() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let elsewhere: SocketAddr = "192.0.2.1:5432".parse().expect("address");
        assert!(connect_local(dir.path(), &[elsewhere]).await.is_none());
        // On this machine, but nothing listens on the socket path.
        let here: SocketAddr = "127.0.0.1:5432".parse().expect("address");
        assert!(connect_local(dir.path(), &[here]).await.is_none());
        // On this machine, with a socket: the stream, and the TCP address
        // kept for cancel requests.
        let listener = tokio::net::UnixListener::bind(dir.path().join(".s.PGSQL.5432"))
            .expect("bind the socket");
        let (stream, addr) = connect_local(dir.path(), &[elsewhere, here])
            .await
            .expect("connected through the socket");
        assert!(matches!(stream, Stream::Local(_)));
        assert_eq!(addr, here);
        drop(listener);
    }
}
