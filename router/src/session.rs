//! A client connection from its first byte to the start of the relay:
//! encryption negotiation (TLS or 'N'), cancel requests, the StartupMessage,
//! authentication at the router, the first server connection (or a deferred
//! one while paused), and the client's BackendKeyData, ParameterStatus and
//! ReadyForQuery.

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use hapg_config::router::AuthType;
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::auth::scram::ScramServer;
use crate::auth::{md5, AuthError, Secret};
use crate::net::{self, Stream};
use crate::pool::CheckoutError;
use crate::protocol::backend::{self, sqlstate, Severity};
use crate::protocol::startup::{self, FirstPacket, Startup};
use crate::protocol::{cstr, frame, ProtocolError};
use crate::relay::{Session, SETTABLE};
use crate::server::{set_shared_param, Login, Params, ServerConn, ServerError};
use crate::{Runtime, Shared};

/// Parameters a client is told about when no server connection could be
/// opened yet and none was ever opened: what Postgres 15 reports by default.
const FALLBACK_PARAMS: &[(&str, &str)] = &[
    ("server_version", "15.0"),
    ("server_encoding", "UTF8"),
    ("client_encoding", "UTF8"),
    ("DateStyle", "ISO, MDY"),
    ("IntervalStyle", "postgres"),
    ("TimeZone", "UTC"),
    ("integer_datetimes", "on"),
    ("standard_conforming_strings", "on"),
    ("is_superuser", "off"),
    ("default_transaction_read_only", "off"),
    ("in_hot_standby", "off"),
];

/// The largest message a client may send before it has logged in (a
/// PasswordMessage, SASLInitialResponse or SASLResponse), counted as its length
/// field counts it: Postgres 15's `PG_MAX_AUTH_TOKEN_LENGTH`, the limit its
/// `recv_password_packet` and SASL exchange give `pq_getmessage`. An md5 answer
/// is 36 bytes and a SCRAM message a few hundred, so no client needs more;
/// a client gets no more of the router's memory than this before it has
/// proved who it is. (The startup packet has its own limit,
/// [`startup::MAX_STARTUP_LEN`], Postgres' `MAX_STARTUP_PACKET_LENGTH`.)
const MAX_AUTH_MESSAGE: usize = 65_535;

/// How long a refused client that has not logged in may go on sending before
/// the router closes (see [`ClientConn::refuse`]).
const REFUSE_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Client parameters a server echoes back as ParameterStatus.
const ECHOED: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
];

/// The client side of a connection: stream, read buffer and write buffer.
pub(crate) struct ClientConn {
    pub stream: Stream,
    pub rbuf: BytesMut,
    pub wbuf: BytesMut,
    pub max: usize,
}

/// The session ended (already reported to the client when it could be).
pub(crate) struct Ended;

impl ClientConn {
    pub async fn read_more(&mut self) -> Result<(), Ended> {
        net::read_room(&mut self.rbuf);
        match self.stream.read_buf(&mut self.rbuf).await {
            Ok(0) | Err(_) => Err(Ended),
            Ok(_) => Ok(()),
        }
    }

    pub async fn flush(&mut self) -> Result<(), Ended> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let result = self.stream.write_all(&self.wbuf).await;
        self.wbuf.clear();
        result.map_err(|_| Ended)
    }

    /// Sends a FATAL error; the caller then closes.
    pub async fn fatal(&mut self, code: &str, message: &str, hint: Option<&str>) -> Ended {
        backend::error(&mut self.wbuf, Severity::Fatal, code, message, hint);
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
        Ended
    }

    /// Refuses a client that has not logged in: sends a FATAL, then reads and
    /// discards what the client is still sending, for at most
    /// [`REFUSE_DRAIN`], before closing. Closing with unread bytes makes the
    /// kernel reset the connection, and a reset can cost a client still
    /// writing a large message the reason it was about to read (Linux over
    /// loopback keeps it readable; other stacks and lost segments may not).
    /// The discarding reads into a small fixed buffer, so it costs no memory.
    pub async fn refuse(&mut self, code: &str, message: &str, hint: Option<&str>) -> Ended {
        backend::error(&mut self.wbuf, Severity::Fatal, code, message, hint);
        if self.flush().await.is_err() {
            return Ended;
        }
        let _ = self.stream.shutdown().await;
        self.rbuf = BytesMut::new();
        let mut sink = vec![0u8; 8192];
        let _ = tokio::time::timeout(REFUSE_DRAIN, async {
            while let Ok(n) = self.stream.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        Ended
    }

    /// Reads one tagged message during authentication, at most
    /// [`MAX_AUTH_MESSAGE`] bytes: the limit is checked on the header, so a
    /// client that announces more is refused before anything is buffered.
    async fn read_frame(&mut self) -> Result<(u8, BytesMut), Ended> {
        loop {
            match frame::split(&mut self.rbuf, MAX_AUTH_MESSAGE + 1) {
                Ok(Some(frame)) => return Ok(frame),
                Ok(None) => self.read_more().await?,
                Err(e) => {
                    return Err(self
                        .refuse(
                            sqlstate::PROTOCOL_VIOLATION,
                            &format!("invalid authentication message: {e}"),
                            None,
                        )
                        .await)
                }
            }
        }
    }
}

/// Serves one accepted connection to its end.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: std::net::SocketAddr,
    shutdown: CancellationToken,
    kill: CancellationToken,
) {
    if let Err(e) = net::tune(&tcp) {
        tracing::debug!(error = %e, "could not tune client socket");
    }
    let rt = shared.runtime.load_full();
    let started = tokio::select! {
        r = tokio::time::timeout(rt.config.login_timeout(), start(&shared, &rt, tcp, peer)) => r,
        _ = kill.cancelled() => return,
    };
    match started {
        Err(_) => tracing::info!(%peer, "client did not complete its startup in time"),
        Ok(Err(Ended)) | Ok(Ok(None)) => {}
        Ok(Ok(Some((client, ready)))) => {
            Session::new(shared, client, ready, shutdown, kill)
                .run()
                .await;
        }
    }
}

/// What the relay starts from.
pub(crate) struct Ready {
    pub login: Login,
    pub server: Option<ServerConn>,
    pub known: Params,
    pub cancel: crate::cancel::CancelKey,
}

async fn negotiate(
    shared: &Shared,
    rt: &Runtime,
    tcp: TcpStream,
) -> Result<Option<(ClientConn, Startup)>, Ended> {
    let mut client = ClientConn {
        stream: Stream::Plain(tcp),
        rbuf: BytesMut::with_capacity(net::READ_CHUNK),
        wbuf: BytesMut::with_capacity(1024),
        max: rt.config.router.max_message_size as usize,
    };
    let mut negotiations = 0;
    loop {
        let packet = loop {
            match startup::parse(&mut client.rbuf) {
                Ok(Some(packet)) => break packet,
                Ok(None) => client.read_more().await?,
                Err(e @ ProtocolError::UnsupportedVersion { .. }) => {
                    return Err(client
                        .refuse(sqlstate::FEATURE_NOT_SUPPORTED, &e.to_string(), None)
                        .await)
                }
                Err(e) => {
                    return Err(client
                        .refuse(
                            sqlstate::PROTOCOL_VIOLATION,
                            &format!("invalid startup packet: {e}"),
                            None,
                        )
                        .await)
                }
            }
        };
        match packet {
            FirstPacket::SslRequest | FirstPacket::GssEncRequest => {
                negotiations += 1;
                let is_ssl = packet == FirstPacket::SslRequest;
                let already_tls = !matches!(client.stream, Stream::Plain(_));
                if negotiations > 2 || already_tls {
                    return Err(client
                        .refuse(
                            sqlstate::PROTOCOL_VIOLATION,
                            "repeated encryption request",
                            None,
                        )
                        .await);
                }
                if !client.rbuf.is_empty() {
                    // Bytes sent before the answer could be read by an attacker
                    // in the middle; Postgres refuses them too.
                    return Err(client
                        .refuse(
                            sqlstate::PROTOCOL_VIOLATION,
                            "received unencrypted data after encryption request",
                            None,
                        )
                        .await);
                }
                match (&rt.tls, is_ssl) {
                    (Some(acceptor), true) => {
                        let Stream::Plain(mut tcp) = client.stream else {
                            return Err(Ended);
                        };
                        tcp.write_all(b"S").await.map_err(|_| Ended)?;
                        let tls = acceptor.accept(tcp).await.map_err(|e| {
                            tracing::info!(error = %e, "client TLS handshake failed");
                            Ended
                        })?;
                        client.stream = Stream::ClientTls(Box::new(tls));
                    }
                    _ => {
                        client.wbuf.extend_from_slice(b"N");
                        client.flush().await?;
                    }
                }
            }
            FirstPacket::Cancel { pid, secret } => {
                match shared.cancels.lookup(pid, &secret) {
                    Some(target) => {
                        tracing::info!(pid, server = %target.addr, "forwarding cancel request");
                        let sent = tokio::time::timeout(
                            std::time::Duration::from_secs(5),
                            crate::server::send_cancel(target.addr, target.pid, target.secret),
                        )
                        .await;
                        if !matches!(sent, Ok(Ok(()))) {
                            tracing::info!(pid, "could not forward cancel request");
                        }
                    }
                    None => tracing::debug!(pid, "cancel request for no known session"),
                }
                return Ok(None);
            }
            FirstPacket::Startup(s) => return Ok(Some((client, s))),
        }
    }
}

async fn start(
    shared: &Arc<Shared>,
    rt: &Runtime,
    tcp: TcpStream,
    peer: std::net::SocketAddr,
) -> Result<Option<(ClientConn, Ready)>, Ended> {
    let Some((mut client, startup)) = negotiate(shared, rt, tcp).await? else {
        return Ok(None);
    };
    let Some(user) = startup
        .get("user")
        .filter(|u| !u.is_empty())
        .map(str::to_string)
    else {
        return Err(client
            .refuse(
                sqlstate::INVALID_AUTHORIZATION,
                "no PostgreSQL user name specified in startup packet",
                None,
            )
            .await);
    };
    if let Some(r) = startup.get("replication") {
        if !matches!(
            r.to_ascii_lowercase().as_str(),
            "false" | "off" | "no" | "0"
        ) {
            return Err(client
                .refuse(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "the hapg router does not relay replication connections",
                    Some("Connect to the Postgres node directly for replication."),
                )
                .await);
        }
    }
    let database = startup
        .get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or(&user)
        .to_string();
    let unrecognised: Vec<&str> = startup
        .params
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| k.starts_with("_pq_."))
        .collect();
    if startup.minor > 0 || !unrecognised.is_empty() {
        backend::negotiate_protocol_version(&mut client.wbuf, 0, &unrecognised);
    }

    if let Err(e) = authenticate(&mut client, rt, &user).await {
        match e {
            AuthOutcome::Ended => return Err(Ended),
            AuthOutcome::Refused(e) => {
                // The audit trail: who tried, from where, and why it failed
                // (the client itself only learns "password authentication failed").
                tracing::warn!(client = %peer, user, reason = %e, "client authentication failed");
                let message = format!("password authentication failed for user \"{user}\"");
                return Err(client
                    .refuse(sqlstate::INVALID_PASSWORD, &message, None)
                    .await);
            }
        }
    }
    backend::auth_ok(&mut client.wbuf);

    let server_user = rt
        .config
        .server
        .user
        .clone()
        .unwrap_or_else(|| user.clone());
    let password = rt.config.server.password.clone().or_else(|| {
        rt.users
            .get(&server_user)
            .and_then(Secret::plain)
            .filter(|p| !p.is_empty())
            .map(str::to_string)
    });
    let login = Login {
        user: server_user,
        password,
        database,
        params: startup
            .params
            .iter()
            .filter(|(k, _)| k != "user" && k != "database" && k != "replication")
            .cloned()
            .collect(),
        sslmode: rt.config.server.sslmode,
        unix_socket_dir: rt.config.server.unix_socket_dir.clone(),
    };

    let mut server = None;
    if let Some(target) = shared.routing.load().target() {
        match shared
            .pools
            .checkout(
                shared,
                &target,
                &login,
                None,
                rt.config.connect_timeout(),
                None,
            )
            .await
        {
            Ok(mut conn) => match reset_drifted(&mut conn).await {
                Ok(()) => server = Some(conn),
                Err(e) => {
                    tracing::info!(error = %e, "could not reset a pooled connection's settings at login; deferring to the first statement");
                    conn.terminate().await;
                }
            },
            Err(CheckoutError::Full { size }) => tracing::debug!(
                size,
                "the pool is full at login; deferring to the first statement"
            ),
            Err(CheckoutError::Server(ServerError::Refused(fields)))
                if !["57", "53", "08"]
                    .iter()
                    .any(|c| fields.code.starts_with(c)) =>
            {
                // The primary's definitive answer (no such database, role, ...).
                return Err(client.fatal(&fields.code, &fields.message, None).await);
            }
            Err(CheckoutError::Server(e)) => tracing::info!(
                server = %format!("{}:{}", target.host, target.port),
                error = %e,
                "no server connection at login; deferring to the first statement"
            ),
        }
    }

    let known: Params = match &server {
        Some(conn) => {
            shared.remember_params(&conn.params);
            learn_server_defaults(shared, conn);
            conn.params.clone()
        }
        None => {
            let last = shared.last_params.load_full();
            let mut params: Params = if last.is_empty() {
                Arc::new(
                    FALLBACK_PARAMS
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                )
            } else {
                last
            };
            // The newest connection's values may be a previous client's
            // session-level SETs (transaction mode): a client is told what it
            // asked for, else the server's own value when the router knows it
            // (an empty application_name when it does not: Postgres' default).
            let defaults = shared
                .server_defaults
                .lock()
                .map(|d| d.clone())
                .unwrap_or_default();
            for name in ECHOED {
                let value = startup
                    .get(name)
                    .or_else(|| {
                        defaults
                            .iter()
                            .find(|(k, _)| k == name)
                            .map(|(_, v)| v.as_str())
                    })
                    .or((*name == "application_name").then_some(""));
                if let Some(value) = value {
                    set_shared_param(&mut params, name, value);
                }
            }
            set_shared_param(&mut params, "session_authorization", &user);
            params
        }
    };
    for (name, value) in known.iter() {
        backend::parameter_status(&mut client.wbuf, name, value);
    }
    let cancel = shared.cancels.register();
    if let Some(conn) = &server {
        cancel.set_target(Some(conn.cancel_target()));
    }
    backend::backend_key_data(&mut client.wbuf, cancel.pid, cancel.secret());
    backend::ready_for_query(&mut client.wbuf, b'I');
    client.flush().await?;
    Ok(Some((
        client,
        Ready {
            login,
            server,
            known,
            cancel,
        },
    )))
}

/// Keeps the values `conn` reported at its login for the startup-settable
/// parameters its startup packet did not set: the server's own values.
fn learn_server_defaults(shared: &Shared, conn: &ServerConn) {
    let Ok(mut defaults) = shared.server_defaults.lock() else {
        return;
    };
    for name in ECHOED {
        if conn.startup.iter().any(|(k, _)| k == name) {
            continue;
        }
        if let Some((_, value)) = conn.opened.iter().find(|(k, _)| k == name) {
            if !defaults.iter().any(|(k, v)| k == name && v == value) {
                crate::server::set_param(&mut defaults, name, value);
            }
        }
    }
}

/// Sets back, on a pooled connection a client takes at login, the reported
/// settings a previous client changed at session level (transaction mode
/// leaves them on the connection): the client is owed the values the
/// connection was opened with, since it sent the same startup parameters.
/// Without this it would be told, and would run with, the previous client's
/// `application_name` (or `TimeZone`, ...). Later transactions are kept in
/// step by the relay's restore, against what the client was told.
async fn reset_drifted(conn: &mut ServerConn) -> Result<(), ServerError> {
    if Arc::ptr_eq(&conn.params, &conn.opened) {
        return Ok(());
    }
    let mut fixes = String::new();
    for (name, value) in conn.opened.iter() {
        if SETTABLE.contains(&name.as_str()) && conn.param(name) != Some(value.as_str()) {
            fixes.push_str(&format!(
                "SELECT set_config({}, {}, false);",
                postgres_protocol::escape::escape_literal(name),
                postgres_protocol::escape::escape_literal(value)
            ));
        }
    }
    if !fixes.is_empty() {
        conn.simple_query(&fixes).await?;
    }
    Ok(())
}

enum AuthOutcome {
    Ended,
    Refused(AuthError),
}

impl From<Ended> for AuthOutcome {
    fn from(_: Ended) -> Self {
        AuthOutcome::Ended
    }
}

async fn password_message(client: &mut ClientConn) -> Result<BytesMut, AuthOutcome> {
    client.flush().await?;
    let (tag, body) = client.read_frame().await?;
    if tag != b'p' {
        return Err(AuthOutcome::Refused(AuthError::Malformed(
            "expected a password message",
        )));
    }
    Ok(body)
}

async fn authenticate(
    client: &mut ClientConn,
    rt: &Runtime,
    user: &str,
) -> Result<(), AuthOutcome> {
    let secret = rt.users.get(user);
    let scram = match (rt.config.auth.kind, secret) {
        (AuthType::Trust, _) => return Ok(()),
        (AuthType::ScramSha256, _) | (AuthType::Md5, Some(Secret::Scram(_))) => true,
        (AuthType::Md5, Some(_)) => false,
        // An unknown user is asked what a known one would be (see
        // `Userlist::unknown_gets_scram`).
        (AuthType::Md5, None) => rt.users.unknown_gets_scram(),
    };
    if !scram {
        let mut salt = [0u8; 4];
        rand::thread_rng().fill_bytes(&mut salt);
        backend::authentication(&mut client.wbuf, 5, &salt);
        let body = password_message(client).await?;
        let answer = cstr(&body).map(|(a, _)| a).unwrap_or(&body[..]);
        return md5::check(user, secret, salt, answer).map_err(AuthOutcome::Refused);
    }
    backend::auth_sasl(&mut client.wbuf);
    let mut body = password_message(client).await?;
    let malformed = || AuthOutcome::Refused(AuthError::Malformed("SASLInitialResponse"));
    let (mechanism, rest) = cstr(&body).ok_or_else(malformed)?;
    if mechanism != b"SCRAM-SHA-256" {
        return Err(AuthOutcome::Refused(AuthError::Malformed(
            "unsupported SASL mechanism",
        )));
    }
    let offset = body.len() - rest.len();
    body.advance(offset);
    if body.len() < 4 {
        return Err(malformed());
    }
    let len = body.get_i32();
    if len < 0 || len as usize != body.len() {
        return Err(malformed());
    }
    let (verifier, refusal) = rt.users.scram_secret(user, &rt.mock_key);
    let (exchange, server_first) =
        ScramServer::start(user, verifier, refusal, &body).map_err(AuthOutcome::Refused)?;
    backend::authentication(&mut client.wbuf, 11, server_first.as_bytes());
    let body = password_message(client).await?;
    let server_final = exchange.finish(&body).map_err(AuthOutcome::Refused)?;
    backend::authentication(&mut client.wbuf, 12, server_final.as_bytes());
    Ok(())
}
