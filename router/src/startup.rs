//! The startup handshake: a client connection from its first byte to the
//! start of its session:
//! encryption negotiation (TLS or 'N'), cancel requests, the StartupMessage,
//! authentication at the router, the first server connection (or a deferred
//! one while paused), and the client's BackendKeyData, ParameterStatus and
//! ReadyForQuery.

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use hapg_config::router::{AuthType, ClientTlsMode};
use rand::RngCore;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::auth::scram::ScramServer;
use crate::auth::{md5, AuthError, Secret};
use crate::client::{ClientConn, Ended};
use crate::client_error::ClientError;
use crate::net::{self, Stream};
use crate::params::{set_config_sql, set_shared_param, Params, SETTABLE};
use crate::pool::CheckoutError;
use crate::protocol::backend::{self, sqlstate, TxStatus};
use crate::protocol::startup::{self, FirstPacket, Startup};
use crate::protocol::{cstr, tag, ProtocolError};
use crate::server::{Login, ServerConn, ServerError};
use crate::shared::{Runtime, Shared};

/// The virtual databases of the admin console: a client that logs in to
/// one of them is served by `console`, not relayed.
const CONSOLE_DATABASES: [&str; 2] = ["pgbouncer", "hapg"];

fn is_console_database(database: &str) -> bool {
    CONSOLE_DATABASES.contains(&database)
}

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

/// Client parameters a server echoes back as ParameterStatus.
const ECHOED: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
];

/// What the relay starts from.
pub(crate) struct Ready {
    pub login: Login,
    pub server: Option<Box<ServerConn>>,
    pub known: Params,
    pub cancel: crate::cancel::CancelKey,
    /// The user the client logged in as (`login.user` is the server's).
    pub client_user: String,
}

/// A client of the admin console (the virtual database `pgbouncer` or
/// `hapg`), logged in.
pub(crate) struct ConsoleLogin {
    pub user: String,
    pub database: String,
    /// In `admin.admin_users` (else in `admin.stats_users`: SHOW only).
    pub admin: bool,
    pub cancel: crate::cancel::CancelKey,
    pub application_name: String,
}

/// Where a client goes after the handshake. Moved once per login: boxing
/// the session's side would cost every login an allocation for nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Started {
    Session(Ready),
    Console(ConsoleLogin),
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
        match first_packet(&mut client).await? {
            packet @ (FirstPacket::SslRequest | FirstPacket::GssEncRequest) => {
                negotiations += 1;
                client =
                    encrypt(client, rt, packet == FirstPacket::SslRequest, negotiations).await?;
            }
            FirstPacket::Cancel { pid, secret } => {
                forward_cancel(shared, pid, &secret).await;
                return Ok(None);
            }
            FirstPacket::Startup(s) => {
                if rt.config.tls.client_mode == ClientTlsMode::Require
                    && matches!(client.stream, Stream::Plain(_))
                {
                    // Refused before authentication, as Postgres refuses a
                    // client no `hostssl` line admits: nothing of the
                    // exchange (password, challenge) may travel in the clear.
                    let user = s.get("user").unwrap_or_default();
                    tracing::warn!(
                        user,
                        "client refused: it did not ask for TLS and tls.client_mode is require"
                    );
                    return Err(client
                        .refuse(ClientError::fatal(
                            sqlstate::INVALID_AUTHORIZATION,
                            "this router accepts only TLS connections (tls.client_mode = require), and this connection is not encrypted",
                            Some("Connect with sslmode=require (or verify-ca, verify-full)."),
                        ))
                        .await);
                }
                return Ok(Some((client, s)));
            }
        }
    }
}

/// The next unauthenticated packet (SSLRequest, GSSENCRequest,
/// CancelRequest or StartupMessage).
async fn first_packet(client: &mut ClientConn) -> Result<FirstPacket, Ended> {
    loop {
        let refusal = match startup::parse(&mut client.rbuf) {
            Ok(Some(packet)) => return Ok(packet),
            Ok(None) => {
                client.read_more().await?;
                continue;
            }
            Err(e @ ProtocolError::UnsupportedVersion { .. }) => {
                ClientError::fatal(sqlstate::FEATURE_NOT_SUPPORTED, e.to_string(), None)
            }
            Err(e) => ClientError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                format!("invalid startup packet: {e}"),
                None,
            ),
        };
        return Err(client.refuse(refusal).await);
    }
}

/// Answers an encryption request (the `negotiations`th): TLS when it is an
/// SSLRequest and the router has a certificate, else `N`.
async fn encrypt(
    mut client: ClientConn,
    rt: &Runtime,
    is_ssl: bool,
    negotiations: u32,
) -> Result<ClientConn, Ended> {
    let already_tls = !matches!(client.stream, Stream::Plain(_));
    let refusal = if negotiations > 2 || already_tls {
        Some("repeated encryption request")
    } else if !client.rbuf.is_empty() {
        // Bytes sent before the answer could be read by an attacker in the
        // middle; Postgres refuses them too.
        Some("received unencrypted data after encryption request")
    } else {
        None
    };
    if let Some(message) = refusal {
        return Err(client
            .refuse(ClientError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                message,
                None,
            ))
            .await);
    }
    let Some(acceptor) = rt.tls.as_ref().filter(|_| is_ssl) else {
        client.wbuf.extend_from_slice(b"N");
        client.flush().await?;
        return Ok(client);
    };
    let Stream::Plain(mut tcp) = client.stream else {
        return Err(Ended);
    };
    tcp.write_all(b"S").await.map_err(|_| Ended)?;
    let tls = acceptor.accept(tcp).await.map_err(|e| {
        tracing::info!(error = %e, "client TLS handshake failed");
        Ended
    })?;
    client.stream = Stream::ClientTls(Box::new(tls));
    Ok(client)
}

/// Forwards a CancelRequest to the server of the session it names, if any.
async fn forward_cancel(shared: &Shared, pid: i32, secret: &[u8]) {
    match shared.cancels.lookup(pid, secret) {
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
}

pub(crate) async fn start(
    shared: &Arc<Shared>,
    rt: &Runtime,
    tcp: TcpStream,
    peer: std::net::SocketAddr,
    read_only: bool,
) -> Result<Option<(ClientConn, Started)>, Ended> {
    let Some((mut client, startup)) = negotiate(shared, rt, tcp).await? else {
        return Ok(None);
    };
    let (user, database) = check_startup(&mut client, &startup).await?;
    log_in(&mut client, rt, &user, peer).await?;
    if is_console_database(&database) {
        return console_login(client, rt, shared, &startup, user, database, peer)
            .await
            .map(|(client, login)| Some((client, Started::Console(login))));
    }
    let login = server_login(rt, &user, database, &startup);
    // A read-only session picks its standby at its first statement.
    let server = if read_only {
        None
    } else {
        first_server(shared, rt, &login, &mut client).await?
    };
    let known = match &server {
        Some(conn) => {
            shared.last_params.remember(&conn.params);
            learn_server_defaults(shared, conn);
            conn.params.clone()
        }
        None => params_without_server(shared, &startup, &user),
    };
    for (name, value) in known.iter() {
        backend::parameter_status(&mut client.wbuf, name, value);
    }
    let cancel = shared.cancels.register();
    if let Some(conn) = &server {
        cancel.set_target(Some(conn.cancel_target()));
    }
    backend::backend_key_data(&mut client.wbuf, cancel.pid, cancel.secret());
    backend::ready_for_query(&mut client.wbuf, TxStatus::Idle);
    client.flush().await?;
    Ok(Some((
        client,
        Started::Session(Ready {
            login,
            server,
            known,
            cancel,
            client_user: user,
        }),
    )))
}

/// The user and database the StartupMessage names; refuses one without a
/// user, and replication connections. Asks for protocol 3.0 when the client
/// asked for a later minor version or for protocol options.
async fn check_startup(
    client: &mut ClientConn,
    startup: &Startup,
) -> Result<(String, String), Ended> {
    let Some(user) = startup
        .get("user")
        .filter(|u| !u.is_empty())
        .map(str::to_string)
    else {
        return Err(client
            .refuse(ClientError::fatal(
                sqlstate::INVALID_AUTHORIZATION,
                "no PostgreSQL user name specified in startup packet",
                None,
            ))
            .await);
    };
    if let Some(r) = startup.get("replication") {
        if !matches!(
            r.to_ascii_lowercase().as_str(),
            "false" | "off" | "no" | "0"
        ) {
            return Err(client
                .refuse(ClientError::fatal(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "the hapg router does not relay replication connections",
                    Some("Connect to the Postgres node directly for replication."),
                ))
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
    Ok((user, database))
}

/// Authenticates the client at the router (AuthenticationOk written), or
/// refuses it.
async fn log_in(
    client: &mut ClientConn,
    rt: &Runtime,
    user: &str,
    peer: std::net::SocketAddr,
) -> Result<(), Ended> {
    match authenticate(client, rt, user).await {
        Ok(()) => {
            backend::auth_ok(&mut client.wbuf);
            Ok(())
        }
        Err(AuthOutcome::Ended) => Err(Ended),
        Err(AuthOutcome::Refused(e)) => {
            // The audit trail: who tried, from where, and why it failed
            // (the client itself only learns "password authentication failed").
            tracing::warn!(client = %peer, user, reason = %e, "client authentication failed");
            let message = format!("password authentication failed for user \"{user}\"");
            Err(client
                .refuse(ClientError::fatal(
                    sqlstate::INVALID_PASSWORD,
                    message,
                    None,
                ))
                .await)
        }
    }
}

/// How the router logs in to servers for this client.
fn server_login(rt: &Runtime, user: &str, database: String, startup: &Startup) -> Login {
    let server_user = rt
        .config
        .server
        .user
        .clone()
        .unwrap_or_else(|| user.to_string());
    let password = rt.config.server.password.clone().or_else(|| {
        rt.users
            .get(&server_user)
            .and_then(Secret::plain)
            .filter(|p| !p.is_empty())
            .map(str::to_string)
    });
    Login {
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
    }
}

/// The session's first server connection, when one can be had without
/// waiting; none defers it to the first statement. The primary's
/// definitive refusal (no such database, role, ...) ends the client.
async fn first_server(
    shared: &Shared,
    rt: &Runtime,
    login: &Login,
    client: &mut ClientConn,
) -> Result<Option<Box<ServerConn>>, Ended> {
    let Some(target) = shared.routing.load().target() else {
        return Ok(None);
    };
    let checkout = shared
        .pools
        .checkout(
            &shared.opener(rt),
            &target,
            login,
            None,
            rt.config.connect_timeout(),
            None,
        )
        .await;
    match checkout {
        Ok(mut conn) => match reset_drifted(&mut conn).await {
            Ok(()) => return Ok(Some(conn)),
            Err(e) => {
                tracing::info!(error = %e, "could not reset a pooled connection's settings at login; deferring to the first statement");
                conn.terminate().await;
            }
        },
        Err(CheckoutError::Full { size }) => tracing::debug!(
            size,
            "the pool is full at login; deferring to the first statement"
        ),
        Err(CheckoutError::NodeFull(limit)) => tracing::debug!(
            limit = limit.limit,
            "the router's connections to the primary are at their limit at login; deferring to the first statement"
        ),
        Err(CheckoutError::Server(ServerError::Refused(fields))) if !fields.is_transient() => {
            // The primary's definitive answer (no such database, role, ...).
            return Err(client
                .end_with(ClientError::fatal(fields.code, fields.message, None))
                .await);
        }
        Err(CheckoutError::Server(e)) => tracing::info!(
            server = %format!("{}:{}", target.host, target.port),
            error = %e,
            "no server connection at login; deferring to the first statement"
        ),
    }
    Ok(None)
}

/// What a client logging in without a server connection is told: the
/// newest connection's parameters (Postgres' defaults when there was none),
/// with what the client asked for in its startup packet, else the server's
/// own values when the router knows them.
fn params_without_server(shared: &Shared, startup: &Startup, user: &str) -> Params {
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
    set_shared_param(&mut params, "session_authorization", user);
    params
}

/// An authenticated client of the admin console: refused unless its user is
/// in `admin.admin_users` or `admin.stats_users`; else told the parameters
/// a Postgres 15 would tell it, a cancel key, and ReadyForQuery.
async fn console_login(
    mut client: ClientConn,
    rt: &Runtime,
    shared: &Arc<Shared>,
    startup: &Startup,
    user: String,
    database: String,
    peer: std::net::SocketAddr,
) -> Result<(ClientConn, ConsoleLogin), Ended> {
    if !rt.config.may_show(&user) {
        tracing::warn!(client = %peer, user, "admin console refused: the user is in neither admin.admin_users nor admin.stats_users");
        return Err(client
            .refuse(ClientError::fatal(
                sqlstate::INVALID_AUTHORIZATION,
                format!("user \"{user}\" may not use the admin console"),
                Some("List the user in [admin] admin_users or stats_users in router.toml."),
            ))
            .await);
    }
    let application_name = startup
        .get("application_name")
        .unwrap_or_default()
        .to_string();
    for (name, value) in FALLBACK_PARAMS {
        backend::parameter_status(&mut client.wbuf, name, value);
    }
    backend::parameter_status(&mut client.wbuf, "application_name", &application_name);
    let cancel = shared.cancels.register();
    backend::backend_key_data(&mut client.wbuf, cancel.pid, cancel.secret());
    backend::ready_for_query(&mut client.wbuf, TxStatus::Idle);
    client.flush().await?;
    tracing::info!(client = %peer, user, "admin console login");
    Ok((
        client,
        ConsoleLogin {
            admin: rt.config.is_admin(&user),
            user,
            database,
            cancel,
            application_name,
        },
    ))
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
                crate::params::set_param(&mut defaults, name, value);
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
    let fixes = set_config_sql(conn.opened.iter().filter(|(name, value)| {
        SETTABLE.contains(&name.as_str()) && conn.param(name) != Some(value.as_str())
    }));
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
    if tag != tag::frontend::PASSWORD {
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
